//! EC keys as the tool uses them: P-256, P-384 and P-521, each signing with
//! the hash of its size (SHA-256, SHA-384, SHA-512), signatures DER-encoded.
//! Private keys come as PEM PKCS#8 (`PRIVATE KEY`) or SEC1
//! (`EC PRIVATE KEY`, which `openssl ecparam -genkey` writes, possibly after
//! an `EC PARAMETERS` block); public keys as PEM SubjectPublicKeyInfo.
//!
//! A bundle names its key by a hint: the SHA-256 of the public key's PEM
//! SubjectPublicKeyInfo text (64-column base64, `\n` line ends), exactly as
//! Python's `cryptography` renders it.

use super::error::KeyError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, SECP_256_R_1, SECP_384_R_1, SECP_521_R_1};
use der::Decode;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};
use std::fmt;

/// The curves the tool accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
    P521,
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
        })
    }
}

fn curve_of(oid: ObjectIdentifier) -> Result<Curve, KeyError> {
    match oid {
        SECP_256_R_1 => Ok(Curve::P256),
        SECP_384_R_1 => Ok(Curve::P384),
        SECP_521_R_1 => Ok(Curve::P521),
        other => Err(KeyError::Unsupported(format!("EC curve {other}"))),
    }
}

/// One `-----BEGIN label-----` … `-----END label-----` block of a PEM file.
pub(crate) struct PemBlock {
    pub label: String,
    pub der: Vec<u8>,
    /// Whether the block carried RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`).
    pub has_headers: bool,
}

/// Every PEM block in `text`, in order; text between blocks is skipped (as
/// OpenSSL skips it), base64 may be wrapped at any width.
pub(crate) fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, KeyError> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(label) = line
            .trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut has_headers = false;
        let mut closed = false;
        for l in lines.by_ref() {
            let l = l.trim();
            if l == end {
                closed = true;
                break;
            }
            if l.contains(':') {
                has_headers = true;
                continue;
            }
            body.push_str(l);
        }
        if !closed {
            return Err(KeyError::Pem(format!("\"{label}\" block has no END line")));
        }
        let der = STANDARD
            .decode(body.as_bytes())
            .map_err(|e| KeyError::Pem(format!("\"{label}\" block: bad base64: {e}")))?;
        out.push(PemBlock {
            label: label.to_owned(),
            der,
            has_headers,
        });
    }
    if out.is_empty() {
        return Err(KeyError::Pem("no -----BEGIN line".to_owned()));
    }
    Ok(out)
}

#[derive(Clone)]
enum PrivateInner {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
}

/// A signing key. Its `Debug` never shows key material.
#[derive(Clone)]
pub struct PrivateKey(PrivateInner);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({})", self.curve())
    }
}

impl PrivateKey {
    /// Parse the first private key in a PEM file.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        for block in pem_blocks(text)? {
            match block.label.as_str() {
                "PRIVATE KEY" => return Self::from_pkcs8_der(&block.der),
                "EC PRIVATE KEY" if block.has_headers => return Err(KeyError::Encrypted),
                "EC PRIVATE KEY" => return Self::from_sec1_der(&block.der),
                "ENCRYPTED PRIVATE KEY" => return Err(KeyError::Encrypted),
                "RSA PRIVATE KEY" | "DSA PRIVATE KEY" | "OPENSSH PRIVATE KEY" => {
                    return Err(KeyError::Unsupported(block.label));
                }
                _ => {}
            }
        }
        Err(KeyError::Label {
            found: "(none)".to_owned(),
            expected: "a PRIVATE KEY or EC PRIVATE KEY block",
        })
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let info = p256::pkcs8::PrivateKeyInfoRef::from_der(der)
            .map_err(|e| KeyError::Invalid(format!("PKCS#8: {e}")))?;
        if info.algorithm.oid != ID_EC_PUBLIC_KEY {
            return Err(KeyError::Unsupported(format!(
                "key algorithm {}",
                info.algorithm.oid
            )));
        }
        let curve = curve_of(
            info.algorithm
                .parameters_oid()
                .map_err(|e| KeyError::Invalid(format!("PKCS#8 curve: {e}")))?,
        )?;
        let bad = |e: p256::pkcs8::Error| KeyError::Invalid(format!("PKCS#8 {curve} key: {e}"));
        Ok(PrivateKey(match curve {
            Curve::P256 => PrivateInner::P256(p256::ecdsa::SigningKey::from_pkcs8_der(der).map_err(bad)?),
            Curve::P384 => PrivateInner::P384(p384::ecdsa::SigningKey::from_pkcs8_der(der).map_err(bad)?),
            Curve::P521 => PrivateInner::P521(p521::ecdsa::SigningKey::from_pkcs8_der(der).map_err(bad)?),
        }))
    }

    fn from_sec1_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = sec1::EcPrivateKey::try_from(der).map_err(|e| KeyError::Invalid(format!("SEC1: {e}")))?;
        let oid = key
            .parameters
            .and_then(|p| p.named_curve())
            .ok_or_else(|| KeyError::Invalid("SEC1 key without a named curve".to_owned()))?;
        let curve = curve_of(oid)?;
        let bad = |e: p256::elliptic_curve::DecodeError| KeyError::Invalid(format!("SEC1 {curve} key: {e}"));
        Ok(PrivateKey(match curve {
            Curve::P256 => PrivateInner::P256(p256::SecretKey::from_sec1_der(der).map_err(bad)?.into()),
            Curve::P384 => PrivateInner::P384(p384::SecretKey::from_sec1_der(der).map_err(bad)?.into()),
            Curve::P521 => PrivateInner::P521(p521::SecretKey::from_sec1_der(der).map_err(bad)?.into()),
        }))
    }

    pub fn curve(&self) -> Curve {
        match &self.0 {
            PrivateInner::P256(_) => Curve::P256,
            PrivateInner::P384(_) => Curve::P384,
            PrivateInner::P521(_) => Curve::P521,
        }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(match &self.0 {
            PrivateInner::P256(k) => PublicInner::P256(*k.verifying_key()),
            PrivateInner::P384(k) => PublicInner::P384(*k.verifying_key()),
            PrivateInner::P521(k) => PublicInner::P521(*k.verifying_key()),
        })
    }

    /// ECDSA over `msg` with the curve's hash (RFC 6979 nonces), DER-encoded.
    pub(crate) fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match &self.0 {
            PrivateInner::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
            PrivateInner::P384(k) => {
                let s: p384::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
            PrivateInner::P521(k) => {
                let s: p521::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PublicInner {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
}

/// A verifying key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(PublicInner);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, {})", self.curve(), self.hint())
    }
}

/// Which hash the ECDSA signature was computed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashChoice {
    /// The curve's own (what the tool uses since v1.0).
    Curve,
    /// SHA-256 whatever the curve (certificate signatures of v0.2).
    Sha256,
}

impl PublicKey {
    /// Parse the first `PUBLIC KEY` block of a PEM file.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let blocks = pem_blocks(text)?;
        let Some(block) = blocks.iter().find(|b| b.label == "PUBLIC KEY") else {
            return Err(KeyError::Label {
                found: blocks.first().map(|b| b.label.clone()).unwrap_or_default(),
                expected: "PUBLIC KEY",
            });
        };
        Self::from_spki_der(&block.der)
    }

    /// Parse a DER SubjectPublicKeyInfo (as found in a certificate).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = spki::SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| KeyError::Invalid(format!("SubjectPublicKeyInfo: {e}")))?;
        if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
            return Err(KeyError::Unsupported(format!(
                "key algorithm {}",
                spki.algorithm.oid
            )));
        }
        let curve = curve_of(
            spki.algorithm
                .parameters_oid()
                .map_err(|e| KeyError::Invalid(format!("EC curve: {e}")))?,
        )?;
        let bad = |e: spki::Error| KeyError::Invalid(format!("{curve} public key: {e}"));
        Ok(PublicKey(match curve {
            Curve::P256 => {
                PublicInner::P256(p256::ecdsa::VerifyingKey::from_public_key_der(der).map_err(bad)?)
            }
            Curve::P384 => {
                PublicInner::P384(p384::ecdsa::VerifyingKey::from_public_key_der(der).map_err(bad)?)
            }
            Curve::P521 => {
                PublicInner::P521(p521::ecdsa::VerifyingKey::from_public_key_der(der).map_err(bad)?)
            }
        }))
    }

    pub fn curve(&self) -> Curve {
        match &self.0 {
            PublicInner::P256(_) => Curve::P256,
            PublicInner::P384(_) => Curve::P384,
            PublicInner::P521(_) => Curve::P521,
        }
    }

    /// The PEM SubjectPublicKeyInfo, as `cryptography` writes it.
    pub fn to_pem(&self) -> String {
        let pem = match &self.0 {
            PublicInner::P256(k) => k.to_public_key_pem(LineEnding::LF),
            PublicInner::P384(k) => k.to_public_key_pem(LineEnding::LF),
            PublicInner::P521(k) => k.to_public_key_pem(LineEnding::LF),
        };
        // Encoding a valid in-memory key cannot fail; an empty string would
        // only make the hint (and so verification) fail, never pass.
        pem.unwrap_or_default()
    }

    /// The bundle's `publicKey.hint`: hex SHA-256 of [`PublicKey::to_pem`].
    pub fn hint(&self) -> String {
        hex::encode(Sha256::digest(self.to_pem().as_bytes()))
    }

    /// Whether `sig_der` is a valid ECDSA signature over `msg`.
    pub(crate) fn verify(&self, msg: &[u8], sig_der: &[u8], hash: HashChoice) -> bool {
        match hash {
            HashChoice::Curve => {
                macro_rules! check {
                    ($curve:ident, $k:expr) => {{
                        let Ok(sig) = $curve::ecdsa::Signature::from_der(sig_der) else {
                            return false;
                        };
                        $k.verify(msg, &sig).is_ok()
                    }};
                }
                match &self.0 {
                    PublicInner::P256(k) => check!(p256, k),
                    PublicInner::P384(k) => check!(p384, k),
                    PublicInner::P521(k) => check!(p521, k),
                }
            }
            HashChoice::Sha256 => self.verify_prehash(&Sha256::digest(msg), sig_der),
        }
    }

    /// Whether `sig_der` is a valid ECDSA signature over an already computed
    /// digest (certificate signatures name their hash separately from the
    /// curve: a P-384 CA commonly signs with SHA-256).
    pub(crate) fn verify_prehash(&self, prehash: &[u8], sig_der: &[u8]) -> bool {
        macro_rules! check {
            ($curve:ident, $k:expr) => {{
                let Ok(sig) = $curve::ecdsa::Signature::from_der(sig_der) else {
                    return false;
                };
                $k.verify_prehash(prehash, &sig).is_ok()
            }};
        }
        match &self.0 {
            PublicInner::P256(k) => check!(p256, k),
            PublicInner::P384(k) => check!(p384, k),
            PublicInner::P521(k) => check!(p521, k),
        }
    }
}
