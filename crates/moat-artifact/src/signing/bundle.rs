//! The Sigstore bundle (v0.3, JSON) that carries a DSSE envelope, and the
//! DSSE pre-authentication encoding the signature covers.
//!
//! Writing follows the tool byte for byte: compact JSON, keys in the order
//! `mediaType`, `verificationMaterial`, `dsseEnvelope`, an empty
//! `tlogEntries`, `keyid: ""`, no trailing newline. Reading accepts any JSON
//! layout and the older shapes the tool still verifies (`keyid: null`, no
//! `tlogEntries`, `publicKey.rawBytes` instead of a hint); each missing or
//! mistyped field is reported by its path.

use super::error::SignatureError;
use super::pyjson::python_bytes_repr;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

pub(crate) const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
pub(crate) const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// DSSE v1 PAE: `DSSEv1 <len(type)> <type> <len(body)> <body>`.
pub(crate) fn pae(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {PAYLOAD_TYPE} {} ", PAYLOAD_TYPE.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// What model_signing v0.2 signed instead of the PAE: `DSSEV1` (capital V)
/// and the Python repr of the payload bytes. Only ever used to verify.
pub(crate) fn pae_compat(payload: &[u8]) -> Vec<u8> {
    format!(
        "DSSEV1 {} {PAYLOAD_TYPE} {} {}",
        PAYLOAD_TYPE.len(),
        payload.len(),
        python_bytes_repr(payload)
    )
    .into_bytes()
}

/// Who vouches for the signature, as stored in `verificationMaterial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Material {
    /// `publicKey.hint` (absent in bundles written before v1.1).
    Key { hint: Option<String> },
    /// DER certificates, signing certificate first.
    Chain(Vec<Vec<u8>>),
}

/// A bundle as read: nothing in it is trusted yet.
#[derive(Debug, Clone)]
pub(crate) struct Bundle {
    pub material: Material,
    pub payload_type: String,
    pub payload: Vec<u8>,
    /// The first signature (the only one the tool looks at).
    pub signature: Vec<u8>,
}

fn field<'a>(obj: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value, SignatureError> {
    obj.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| SignatureError::malformed(format!("{path}{key}"), "missing"))
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, SignatureError> {
    v.as_object()
        .ok_or_else(|| SignatureError::malformed(path, "not a JSON object"))
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str, SignatureError> {
    v.as_str()
        .ok_or_else(|| SignatureError::malformed(path, "not a string"))
}

fn base64_field(v: &Value, path: &str) -> Result<Vec<u8>, SignatureError> {
    STANDARD
        .decode(string(v, path)?.as_bytes())
        .map_err(|e| SignatureError::malformed(path, format!("bad base64: {e}")))
}

impl Bundle {
    pub fn parse(bytes: &[u8]) -> Result<Self, SignatureError> {
        let root: Value = serde_json::from_slice(bytes)
            .map_err(|e| SignatureError::malformed("(bundle)", format!("not JSON: {e}")))?;
        let root = object(&root, "(bundle)")?;
        let media = string(field(root, "", "mediaType")?, "mediaType")?;
        if media != BUNDLE_MEDIA_TYPE {
            return Err(SignatureError::UnsupportedMediaType(media.to_owned()));
        }

        let vm = object(field(root, "", "verificationMaterial")?, "verificationMaterial")?;
        let material = if let Some(chain) = vm.get("x509CertificateChain").filter(|v| !v.is_null()) {
            let chain = object(chain, "verificationMaterial.x509CertificateChain")?;
            let certs = field(
                chain,
                "verificationMaterial.x509CertificateChain.",
                "certificates",
            )?
            .as_array()
            .ok_or_else(|| {
                SignatureError::malformed(
                    "verificationMaterial.x509CertificateChain.certificates",
                    "not an array",
                )
            })?;
            let mut ders = Vec::new();
            for (i, c) in certs.iter().enumerate() {
                let path = format!("verificationMaterial.x509CertificateChain.certificates[{i}]");
                let c = object(c, &path)?;
                ders.push(base64_field(
                    field(c, &format!("{path}."), "rawBytes")?,
                    &format!("{path}.rawBytes"),
                )?);
            }
            if ders.is_empty() {
                return Err(SignatureError::malformed(
                    "verificationMaterial.x509CertificateChain.certificates",
                    "empty",
                ));
            }
            Material::Chain(ders)
        } else if let Some(cert) = vm.get("certificate").filter(|v| !v.is_null()) {
            let cert = object(cert, "verificationMaterial.certificate")?;
            let der = base64_field(
                field(cert, "verificationMaterial.certificate.", "rawBytes")?,
                "verificationMaterial.certificate.rawBytes",
            )?;
            Material::Chain(vec![der])
        } else if let Some(pk) = vm.get("publicKey").filter(|v| !v.is_null()) {
            let pk = object(pk, "verificationMaterial.publicKey")?;
            let hint = match pk.get("hint") {
                None | Some(Value::Null) => None,
                Some(h) => Some(string(h, "verificationMaterial.publicKey.hint")?.to_owned()),
            };
            Material::Key {
                hint: hint.filter(|h| !h.is_empty()),
            }
        } else {
            return Err(SignatureError::malformed(
                "verificationMaterial",
                "has neither publicKey nor x509CertificateChain",
            ));
        };

        let env = object(field(root, "", "dsseEnvelope")?, "dsseEnvelope")?;
        let payload = base64_field(field(env, "dsseEnvelope.", "payload")?, "dsseEnvelope.payload")?;
        let payload_type = string(
            field(env, "dsseEnvelope.", "payloadType")?,
            "dsseEnvelope.payloadType",
        )?
        .to_owned();
        let sigs = field(env, "dsseEnvelope.", "signatures")?
            .as_array()
            .ok_or_else(|| SignatureError::malformed("dsseEnvelope.signatures", "not an array"))?;
        let first = sigs
            .first()
            .ok_or_else(|| SignatureError::malformed("dsseEnvelope.signatures", "empty"))?;
        let first = object(first, "dsseEnvelope.signatures[0]")?;
        let signature = base64_field(
            field(first, "dsseEnvelope.signatures[0].", "sig")?,
            "dsseEnvelope.signatures[0].sig",
        )?;
        Ok(Bundle {
            material,
            payload_type,
            payload,
            signature,
        })
    }

    /// The bundle as the tool writes it.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let material = match &self.material {
            Material::Key { hint } => json!({
                "publicKey": {"hint": hint.clone().unwrap_or_default()},
                "tlogEntries": [],
            }),
            Material::Chain(ders) => json!({
                "x509CertificateChain": {
                    "certificates": ders
                        .iter()
                        .map(|d| json!({"rawBytes": STANDARD.encode(d)}))
                        .collect::<Vec<_>>(),
                },
                "tlogEntries": [],
            }),
        };
        serde_json::to_vec(&json!({
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": material,
            "dsseEnvelope": {
                "payload": STANDARD.encode(&self.payload),
                "payloadType": self.payload_type,
                "signatures": [{"sig": STANDARD.encode(&self.signature), "keyid": ""}],
            },
        }))
    }
}
