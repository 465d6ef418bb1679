//! Certificate-mode trust: the bundle carries the signing certificate and
//! the intermediates the signer chose to include; the verifier supplies the
//! certificates it trusts. This mirrors what `model_signing` asks OpenSSL to
//! check (an `X509Store` of the given certificates, default flags, no
//! purpose), then the tool's own signing-usage test:
//!
//! - a path leads from the signing certificate, through bundle or trusted
//!   certificates, to a *self-signed certificate from the trusted set*; a
//!   trusted intermediate alone is not enough (OpenSSL without
//!   `PARTIAL_CHAIN`), and an untrusted self-signed certificate ends in
//!   refusal;
//! - every link's signature verifies with its issuer's key (ECDSA with
//!   SHA-256/384/512 on P-256/384/521, or RSA PKCS#1 v1.5 with
//!   SHA-256/384/512; SHA-1, RSA-PSS and others are refused);
//! - validity is checked at the signing certificate's `notBefore` for every
//!   certificate of the path, as the tool does (a bundle has no trusted
//!   timestamp, so "valid when it was issued" is the claim that can be
//!   checked; an expired certificate still verifies);
//! - every issuer is a CA (basicConstraints `cA`, or OpenSSL's legacy
//!   allowances: a v1 self-signed root, or keyCertSign without
//!   basicConstraints), no issuer's keyUsage lacks keyCertSign, and
//!   pathLenConstraint holds;
//! - an unknown critical extension anywhere is refused; nameConstraints,
//!   which OpenSSL enforces and moat does not implement, are refused too
//!   (fail closed);
//! - the signing certificate may sign: keyUsage has digitalSignature, or
//!   extendedKeyUsage has codeSigning; its key is EC P-256/384/521.
//!
//! Not checked (neither does the tool): revocation (CRL/OCSP), certificate
//! policies, and the current time.

use super::error::{KeyError, SignatureError};
use super::keys::{PublicKey, pem_blocks};
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, ID_CE_AUTHORITY_KEY_IDENTIFIER,
    ID_CE_BASIC_CONSTRAINTS, ID_CE_CERTIFICATE_POLICIES, ID_CE_CRL_DISTRIBUTION_POINTS, ID_CE_EXT_KEY_USAGE,
    ID_CE_INHIBIT_ANY_POLICY, ID_CE_KEY_USAGE, ID_CE_NAME_CONSTRAINTS, ID_CE_POLICY_CONSTRAINTS,
    ID_CE_POLICY_MAPPINGS, ID_CE_SUBJECT_ALT_NAME, ID_CE_SUBJECT_KEY_IDENTIFIER, ID_KP_CODE_SIGNING,
    SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};
use der::asn1::AnyRef;
use der::{Decode, Encode, Reader, SliceReader};
use sha2::{Digest, Sha256, Sha384, Sha512};
use std::time::Duration;
use x509_cert::Certificate;
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName,
    SubjectKeyIdentifier,
};

/// Longest path accepted (OpenSSL's default depth is 100; real chains are 2–4).
const MAX_DEPTH: usize = 16;

/// Critical extensions the path check understands (OpenSSL's supported set,
/// less the ones moat refuses outright).
const KNOWN_CRITICAL: [ObjectIdentifier; 10] = [
    ID_CE_KEY_USAGE,
    ID_CE_SUBJECT_ALT_NAME,
    ID_CE_BASIC_CONSTRAINTS,
    ID_CE_CERTIFICATE_POLICIES,
    ID_CE_CRL_DISTRIBUTION_POINTS,
    ID_CE_EXT_KEY_USAGE,
    ID_CE_POLICY_CONSTRAINTS,
    ID_CE_POLICY_MAPPINGS,
    ID_CE_INHIBIT_ANY_POLICY,
    ID_CE_SUBJECT_KEY_IDENTIFIER,
];

/// A parsed certificate with the bytes its signature covers.
#[derive(Clone)]
pub(crate) struct Cert {
    pub der: Vec<u8>,
    pub cert: Certificate,
    tbs_der: Vec<u8>,
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
}

impl std::fmt::Debug for Cert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cert({})", self.subject())
    }
}

impl Cert {
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let cert = Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        // The signature covers the TBSCertificate exactly as encoded; take it
        // from the input rather than re-encoding.
        let outer = AnyRef::from_der(der).map_err(|e| e.to_string())?;
        let mut reader = SliceReader::new(outer.value()).map_err(|e| e.to_string())?;
        let tbs = reader.tlv_bytes().map_err(|e| e.to_string())?.to_vec();
        let tbs_cert = cert.tbs_certificate();
        let subject_der = tbs_cert.subject().to_der().map_err(|e| e.to_string())?;
        let issuer_der = tbs_cert.issuer().to_der().map_err(|e| e.to_string())?;
        Ok(Cert {
            der: der.to_vec(),
            cert,
            tbs_der: tbs,
            subject_der,
            issuer_der,
        })
    }

    pub fn subject(&self) -> String {
        self.cert.tbs_certificate().subject().to_string()
    }

    pub fn issuer(&self) -> String {
        self.cert.tbs_certificate().issuer().to_string()
    }

    fn spki_der(&self) -> Result<Vec<u8>, String> {
        self.cert
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| e.to_string())
    }

    /// The EC key of this certificate.
    pub fn public_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_spki_der(&self.spki_der().map_err(KeyError::Certificate)?)
    }

    fn ext<'a, T: Decode<'a> + const_oid::AssociatedOid>(&'a self) -> Result<Option<T>, String>
    where
        <T as Decode<'a>>::Error: std::fmt::Display,
    {
        self.cert
            .tbs_certificate()
            .get_extension::<T>()
            .map(|o| o.map(|(_, v)| v))
            .map_err(|e| format!("{}: extension {}: {e}", self.subject(), T::OID))
    }

    fn key_id(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .ext::<SubjectKeyIdentifier>()?
            .map(|k| k.0.as_bytes().to_vec()))
    }

    fn authority_key_id(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .ext::<AuthorityKeyIdentifier>()?
            .and_then(|a| a.key_identifier)
            .map(|k| k.as_bytes().to_vec()))
    }

    /// Issued by `issuer` as far as names and key identifiers tell (no
    /// signature check): OpenSSL's `X509_check_issued`.
    fn names_issuer(&self, issuer: &Cert) -> Result<bool, String> {
        if self.issuer_der != issuer.subject_der {
            return Ok(false);
        }
        Ok(match (self.authority_key_id()?, issuer.key_id()?) {
            (Some(a), Some(s)) => a == s,
            _ => true,
        })
    }

    fn self_signed(&self) -> Result<bool, String> {
        self.names_issuer(self)
    }

    fn validity(&self) -> (Duration, Duration) {
        let v = self.cert.tbs_certificate().validity();
        (v.not_before.to_unix_duration(), v.not_after.to_unix_duration())
    }

    /// OpenSSL's `X509_check_ca` without strict mode.
    fn is_ca(&self) -> Result<bool, String> {
        let ku = self.ext::<KeyUsage>()?;
        if ku.as_ref().is_some_and(|k| !k.key_cert_sign()) {
            return Ok(false);
        }
        Ok(match self.ext::<BasicConstraints>()? {
            Some(bc) => bc.ca,
            None => {
                (self.cert.tbs_certificate().version() == Version::V1 && self.self_signed()?) || ku.is_some()
            }
        })
    }

    /// Whether `self`'s signature verifies with `issuer`'s key.
    fn signed_by(&self, issuer: &Cert) -> Result<(), String> {
        let alg = self.cert.signature_algorithm().oid;
        let sig = self
            .cert
            .signature()
            .as_bytes()
            .ok_or_else(|| format!("{}: signature is not whole bytes", self.subject()))?;
        let spki = issuer.spki_der()?;
        let ok = match alg {
            ECDSA_WITH_SHA_256 | ECDSA_WITH_SHA_384 | ECDSA_WITH_SHA_512 => {
                let key = PublicKey::from_spki_der(&spki)
                    .map_err(|e| format!("{}: issuer key: {e}", issuer.subject()))?;
                let digest = match alg {
                    ECDSA_WITH_SHA_256 => Sha256::digest(&self.tbs_der).to_vec(),
                    ECDSA_WITH_SHA_384 => Sha384::digest(&self.tbs_der).to_vec(),
                    _ => Sha512::digest(&self.tbs_der).to_vec(),
                };
                key.verify_prehash(&digest, sig)
            }
            SHA_256_WITH_RSA_ENCRYPTION => rsa_verify::<Sha256>(&spki, &self.tbs_der, sig)?,
            SHA_384_WITH_RSA_ENCRYPTION => rsa_verify::<Sha384>(&spki, &self.tbs_der, sig)?,
            SHA_512_WITH_RSA_ENCRYPTION => rsa_verify::<Sha512>(&spki, &self.tbs_der, sig)?,
            other => {
                return Err(format!(
                    "{}: unsupported signature algorithm {other}",
                    self.subject()
                ));
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the signature on \"{}\" does not verify with the key of \"{}\"",
                self.subject(),
                issuer.subject()
            ))
        }
    }
}

fn rsa_verify<D>(spki_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<bool, String>
where
    D: sha2::Digest + const_oid::AssociatedOid,
{
    use rsa::signature::Verifier as _;
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der).map_err(|e| e.to_string())?;
    let key = rsa::pkcs1v15::VerifyingKey::<D>::try_from(spki).map_err(|e| format!("issuer RSA key: {e}"))?;
    let Ok(sig) = rsa::pkcs1v15::Signature::try_from(sig) else {
        return Ok(false);
    };
    Ok(key.verify(msg, &sig).is_ok())
}

/// The certificates a verifier trusts (`--certificate-chain`).
#[derive(Debug, Clone)]
pub struct TrustRoots {
    certs: Vec<Cert>,
}

impl TrustRoots {
    /// Every `CERTIFICATE` block of one or more concatenated PEM files.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let certs = parse_pem_certificates(text)?;
        if certs.is_empty() {
            return Err(KeyError::Certificate("no CERTIFICATE block".to_owned()));
        }
        Ok(Self { certs })
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn contains(&self, c: &Cert) -> bool {
        self.certs.iter().any(|t| t.der == c.der)
    }
}

pub(crate) fn parse_pem_certificates(text: &str) -> Result<Vec<Cert>, KeyError> {
    pem_blocks(text)?
        .into_iter()
        .filter(|b| b.label == "CERTIFICATE")
        .map(|b| Cert::from_der(&b.der).map_err(KeyError::Certificate))
        .collect()
}

/// Who signed, from the signing certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity {
    /// RFC 4514 subject.
    pub subject: String,
    /// Subject alternative names, as `email:…`, `dns:…`, `uri:…`, `ip:…`.
    pub san: Vec<String>,
    pub issuer: String,
    /// Hex SHA-256 of the certificate's DER.
    pub fingerprint: String,
}

fn identity(leaf: &Cert) -> Result<CertificateIdentity, String> {
    let san = leaf
        .ext::<SubjectAltName>()?
        .map(|s| s.0)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| match n {
            GeneralName::Rfc822Name(s) => Some(format!("email:{}", s.as_str())),
            GeneralName::DnsName(s) => Some(format!("dns:{}", s.as_str())),
            GeneralName::UniformResourceIdentifier(s) => Some(format!("uri:{}", s.as_str())),
            GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                4 => <[u8; 4]>::try_from(ip.as_bytes())
                    .ok()
                    .map(|b| format!("ip:{}", std::net::Ipv4Addr::from(b))),
                16 => <[u8; 16]>::try_from(ip.as_bytes())
                    .ok()
                    .map(|b| format!("ip:{}", std::net::Ipv6Addr::from(b))),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Ok(CertificateIdentity {
        subject: leaf.subject(),
        san,
        issuer: leaf.issuer(),
        fingerprint: hex::encode(Sha256::digest(&leaf.der)),
    })
}

fn when(d: Duration) -> String {
    der::DateTime::from_unix_duration(d).map_or_else(|_| format!("{}s", d.as_secs()), |t| t.to_string())
}

/// How far a chain must reach: a self-signed trusted certificate (the tool's
/// rule), or, for tests on published fixtures whose root is not published,
/// any trusted certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Anchor {
    SelfSignedTrusted,
    #[cfg_attr(not(test), allow(dead_code))]
    AnyTrusted,
}

/// Check the bundle's chain (`chain[0]` signs) against `roots`; on success the
/// signing key and who it belongs to.
pub(crate) fn verify_chain(
    chain: &[Vec<u8>],
    roots: &TrustRoots,
    anchor: Anchor,
) -> Result<(PublicKey, CertificateIdentity), SignatureError> {
    let fail = |m: String| SignatureError::Certificate(m);
    let Some((leaf_der, rest)) = chain.split_first() else {
        return Err(SignatureError::malformed(
            "verificationMaterial.x509CertificateChain.certificates",
            "empty",
        ));
    };
    if chain.len() > MAX_DEPTH {
        return Err(SignatureError::malformed(
            "verificationMaterial.x509CertificateChain.certificates",
            format!("{} certificates; at most {MAX_DEPTH} are accepted", chain.len()),
        ));
    }
    let leaf = Cert::from_der(leaf_der).map_err(|e| {
        SignatureError::malformed("verificationMaterial.x509CertificateChain.certificates[0]", e)
    })?;
    let mut untrusted = Vec::new();
    for (i, der) in rest.iter().enumerate() {
        untrusted.push(Cert::from_der(der).map_err(|e| {
            SignatureError::malformed(
                format!(
                    "verificationMaterial.x509CertificateChain.certificates[{}]",
                    i + 1
                ),
                e,
            )
        })?);
    }

    let path = build_path(leaf, &untrusted, roots, anchor).map_err(fail)?;
    check_path(&path).map_err(fail)?;

    let leaf = &path[0];
    let ku = leaf.ext::<KeyUsage>().map_err(fail)?;
    let eku = leaf.ext::<ExtendedKeyUsage>().map_err(fail)?;
    let may_sign =
        ku.is_some_and(|k| k.digital_signature()) || eku.is_some_and(|e| e.0.contains(&ID_KP_CODE_SIGNING));
    if !may_sign {
        return Err(fail(format!(
            "\"{}\" cannot be used for signing (neither keyUsage digitalSignature nor extendedKeyUsage codeSigning)",
            leaf.subject()
        )));
    }
    let key = leaf
        .public_key()
        .map_err(|e| fail(format!("signing certificate \"{}\": {e}", leaf.subject())))?;
    Ok((key, identity(leaf).map_err(fail)?))
}

fn build_path(
    leaf: Cert,
    untrusted: &[Cert],
    roots: &TrustRoots,
    anchor: Anchor,
) -> Result<Vec<Cert>, String> {
    let mut path = vec![leaf];
    loop {
        let Some(cur) = path.last() else {
            return Err("empty path".to_owned());
        };
        let trusted = roots.contains(cur);
        if trusted && (anchor == Anchor::AnyTrusted || cur.self_signed()?) {
            return Ok(path);
        }
        if cur.self_signed()? {
            return Err(format!(
                "\"{}\" is self-signed and not among the trusted certificates",
                cur.subject()
            ));
        }
        if path.len() >= MAX_DEPTH {
            return Err(format!("chain longer than {MAX_DEPTH} certificates"));
        }
        let mut last_error = None;
        let mut found = None;
        for cand in roots.certs.iter().chain(untrusted) {
            if path.iter().any(|p| p.der == cand.der) || !cur.names_issuer(cand)? {
                continue;
            }
            match cur.signed_by(cand) {
                Ok(()) => {
                    found = Some(cand.clone());
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        match found {
            Some(c) => path.push(c),
            None => {
                return Err(last_error.unwrap_or_else(|| {
                    format!(
                        "no issuer certificate for \"{}\" (issuer \"{}\") among the bundle's and the trusted certificates; the chain must end at a trusted self-signed root",
                        cur.subject(),
                        cur.issuer()
                    )
                }));
            }
        }
    }
}

fn check_path(path: &[Cert]) -> Result<(), String> {
    let Some(leaf) = path.first() else {
        return Err("empty path".to_owned());
    };
    let at = leaf.validity().0;
    let mut below_non_self_issued = 0usize;
    for (i, c) in path.iter().enumerate() {
        let (nb, na) = c.validity();
        if at < nb || at > na {
            return Err(format!(
                "\"{}\" is not valid at {} when the signing certificate was issued (valid {} to {})",
                c.subject(),
                when(at),
                when(nb),
                when(na)
            ));
        }
        for e in c.cert.tbs_certificate().extensions().map_or(&[][..], |v| &v[..]) {
            if e.extn_id == ID_CE_NAME_CONSTRAINTS {
                return Err(format!(
                    "\"{}\" has nameConstraints, which moat does not enforce",
                    c.subject()
                ));
            }
            if e.critical
                && !KNOWN_CRITICAL.contains(&e.extn_id)
                && e.extn_id != ID_CE_AUTHORITY_KEY_IDENTIFIER
            {
                return Err(format!(
                    "\"{}\" has an unsupported critical extension {}",
                    c.subject(),
                    e.extn_id
                ));
            }
        }
        if i == 0 {
            continue;
        }
        if !c.is_ca()? {
            return Err(format!("issuer \"{}\" is not a CA", c.subject()));
        }
        if let Some(max) = c.ext::<BasicConstraints>()?.and_then(|b| b.path_len_constraint)
            && below_non_self_issued > usize::from(max)
        {
            return Err(format!(
                "\"{}\" allows {max} intermediate CA(s) below it, the chain has {below_non_self_issued}",
                c.subject()
            ));
        }
        if c.issuer_der != c.subject_der {
            below_non_self_issued += 1;
        }
    }
    Ok(())
}
