//! Signature policy: who must have signed a model before moat will store or
//! serve it. Configured per model (`[models.signature]`), enforced by `moat
//! pull` (the verified signer is recorded in `moat.lock`) and re-checked on
//! every load by `moat serve`.
//!
//! The check never re-hashes: the lock already holds every file's SHA-256,
//! which is exactly what an OpenSSF model signature (files method) lists, and
//! at load those digests have just been re-verified against the bytes.

use crate::lock::LockedFile;
use crate::signing::{self, PublicKey, SignatureError, Signer, TrustRoots, VerifiedSignature, VerifyOptions};
use std::path::{Path, PathBuf};

/// The default signature file, as `model_signing` and `moat sign` write it.
pub const DEFAULT_SIGNATURE_FILE: &str = "model.sig";

#[derive(Debug, Clone)]
pub enum RequiredSigner {
    /// A bare EC public key (`moat sign key` / `model_signing sign key`).
    Key(PublicKey),
    /// A certificate chaining to one of these roots, optionally with a given
    /// identity (a SAN such as `email:release@vendor.com`, or the subject)
    /// and issuer (RFC 4514 name of the signing certificate's issuer).
    Certificate {
        roots: TrustRoots,
        identity: Option<String>,
        issuer: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    pub signer: RequiredSigner,
    /// Model-relative path of the signature inside the model folder.
    pub file: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

/// Why a model does not meet its policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyViolation {
    #[error("no signature: {0} is not in the model")]
    Missing(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("signed by {got}, but the policy requires {want}")]
    Identity { got: String, want: String },
}

impl PolicyViolation {
    /// A stable rule id for refusals.
    pub fn rule(&self) -> &'static str {
        match self {
            PolicyViolation::Missing(_) => "signature.missing",
            PolicyViolation::Signature(_) => "signature.invalid",
            PolicyViolation::Identity { .. } => "signature.signer",
        }
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })
}

impl SignaturePolicy {
    /// Build a policy from files named in config or on the command line:
    /// exactly one of a public key or a certificate chain.
    pub fn from_files(
        public_key: Option<&Path>,
        certificate_chain: &[PathBuf],
        identity: Option<String>,
        issuer: Option<String>,
        file: Option<String>,
    ) -> Result<Self, PolicyError> {
        let signer = match (public_key, certificate_chain.is_empty()) {
            (Some(p), true) => {
                if identity.is_some() || issuer.is_some() {
                    return Err(PolicyError::Config(
                        "identity and issuer apply to certificate signatures, not to a public key".into(),
                    ));
                }
                let key = PublicKey::from_pem(&read(p)?).map_err(|e| PolicyError::Invalid {
                    path: p.to_owned(),
                    message: e.to_string(),
                })?;
                RequiredSigner::Key(key)
            }
            (None, false) => {
                let mut pem = String::new();
                for p in certificate_chain {
                    pem.push_str(&read(p)?);
                    pem.push('\n');
                }
                let roots = TrustRoots::from_pem(&pem).map_err(|e| PolicyError::Invalid {
                    path: certificate_chain[0].clone(),
                    message: e.to_string(),
                })?;
                RequiredSigner::Certificate {
                    roots,
                    identity,
                    issuer,
                }
            }
            (Some(_), false) => {
                return Err(PolicyError::Config(
                    "give a public key or a certificate chain, not both".into(),
                ));
            }
            (None, true) => {
                return Err(PolicyError::Config(
                    "give a public key or a certificate chain".into(),
                ));
            }
        };
        let file = file.unwrap_or_else(|| DEFAULT_SIGNATURE_FILE.to_owned());
        crate::lock::check_rel_path(&file).map_err(PolicyError::Config)?;
        Ok(Self { signer, file })
    }

    /// A short description of the required signer, for logs.
    pub fn describe(&self) -> String {
        match &self.signer {
            RequiredSigner::Key(k) => format!("key sha256:{}", k.hint()),
            RequiredSigner::Certificate { identity, issuer, .. } => format!(
                "certificate{}{}",
                identity.as_ref().map_or(String::new(), |i| format!(" for {i:?}")),
                issuer
                    .as_ref()
                    .map_or(String::new(), |i| format!(" issued by {i:?}")),
            ),
        }
    }

    /// Check the model described by `files` (a lock's entries, whose
    /// digests the caller has verified) against this policy. `signature` is
    /// the content of [`Self::file`], if the model has one.
    pub fn check(
        &self,
        signature: Option<&[u8]>,
        files: &[LockedFile],
    ) -> Result<VerifiedSignature, PolicyViolation> {
        let bundle = signature.ok_or_else(|| PolicyViolation::Missing(self.file.clone()))?;
        let opened = match &self.signer {
            RequiredSigner::Key(key) => signing::open_with_key(bundle, key)?,
            RequiredSigner::Certificate { roots, .. } => signing::open_with_certificates(bundle, roots)?,
        };
        let opts = VerifyOptions {
            ignore_paths: vec![self.file.clone()],
            ..VerifyOptions::default()
        };
        let verified = opened.check_lock(files, &opts)?;
        if let (RequiredSigner::Certificate { identity, issuer, .. }, Signer::Certificate(got)) =
            (&self.signer, &verified.signer)
        {
            let identity_ok = identity
                .as_ref()
                .is_none_or(|want| got.subject == *want || got.san.contains(want));
            let issuer_ok = issuer.as_ref().is_none_or(|want| got.issuer == *want);
            if !(identity_ok && issuer_ok) {
                return Err(PolicyViolation::Identity {
                    got: verified.signer.to_string(),
                    want: self.describe(),
                });
            }
        }
        Ok(verified)
    }
}
