//! What can go wrong when signing or checking a signature. Every refusal
//! names what was wrong (the field, the file and both digests, the key), so a
//! user can tell a tampered model from a wrong key from a broken bundle.

use std::fmt;
use std::path::PathBuf;

/// A key, certificate or PEM file that cannot be used (before any signature
/// is looked at): a usage or input error, not an invalid signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM document: {0}")]
    Pem(String),
    #[error("PEM label \"{found}\" where {expected} was expected")]
    Label { found: String, expected: &'static str },
    #[error("encrypted private keys are not supported; decrypt it first (openssl pkcs8 -topk8 -nocrypt)")]
    Encrypted,
    #[error("unsupported key: {0} (only EC keys on P-256, P-384 and P-521 are supported)")]
    Unsupported(String),
    #[error("invalid key: {0}")]
    Invalid(String),
    #[error("invalid certificate: {0}")]
    Certificate(String),
    #[error("the signing certificate's public key does not match the private key")]
    CertificateKeyMismatch,
}

/// Signing failed: the model could not be read as the options require.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Model(#[from] SignatureError),
    #[error("cannot encode the signature: {0}")]
    Encode(String),
}

/// One way a model on disk (or in a lock) differs from what was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Present in both, different content.
    Digest {
        name: String,
        signed: String,
        actual: String,
    },
    /// Signed, but not in the model.
    Missing { name: String },
    /// In the model, but not signed (and not ignored).
    Unsigned { name: String },
}

impl Difference {
    pub fn name(&self) -> &str {
        match self {
            Difference::Digest { name, .. }
            | Difference::Missing { name }
            | Difference::Unsigned { name } => name,
        }
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Digest { name, signed, actual } => {
                write!(f, "{name}: digest differs (signed {signed}, found {actual})")
            }
            Difference::Missing { name } => write!(f, "{name}: signed but missing"),
            Difference::Unsigned { name } => write!(f, "{name}: present but not signed"),
        }
    }
}

/// At most this many differences are spelled out in a message; all of them
/// stay available in [`SignatureError::Mismatch`].
const SHOWN_DIFFERENCES: usize = 20;

fn list_differences(d: &[Difference]) -> String {
    let mut s = d
        .iter()
        .take(SHOWN_DIFFERENCES)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if d.len() > SHOWN_DIFFERENCES {
        s.push_str(&format!("; and {} more", d.len() - SHOWN_DIFFERENCES));
    }
    s
}

/// Why a signature does not hold for a model. Everything except
/// [`SignatureError::Io`] means "invalid" (exit 1); `Io` means the check could
/// not be made (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("malformed signature bundle: {field}: {reason}")]
    Malformed { field: String, reason: String },
    #[error("unsupported bundle media type \"{0}\" (expected application/vnd.dev.sigstore.bundle.v0.3+json)")]
    UnsupportedMediaType(String),
    #[error("unsupported DSSE payload type \"{0}\" (expected application/vnd.in-toto+json)")]
    UnsupportedPayloadType(String),
    #[error("unsupported in-toto statement type \"{0}\" (expected https://in-toto.io/Statement/v1)")]
    UnsupportedStatement(String),
    #[error(
        "unsupported predicate type \"{0}\" (expected https://model_signing/signature/v1.0 or https://model_signing/Digests/v0.1)"
    )]
    UnsupportedPredicate(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("wrong key: the signature names public key {signed}, the given key is {given}")]
    WrongKey { signed: String, given: String },
    #[error("the signature does not match the payload: the payload or the signature was modified")]
    PayloadModified,
    #[error("the signature does not verify with the given key (wrong key, or the payload was modified)")]
    BadSignature,
    #[error("certificate chain rejected: {0}")]
    Certificate(String),
    #[error(
        "the signed manifest is inconsistent: the subject digest is {subject}, the signed resources hash to {computed}"
    )]
    InconsistentManifest { subject: String, computed: String },
    #[error("wrong model: the signature is for \"{signed}\", expected \"{expected}\"")]
    ModelName { signed: String, expected: String },
    #[error("{path}: is a symlink, and symlinks are not allowed (--allow-symlinks)")]
    Symlink { path: String },
    #[error("{path}: not a regular file or directory")]
    NotRegular { path: String },
    #[error("the model does not match its signature: {}", list_differences(.differences))]
    Mismatch { differences: Vec<Difference> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl SignatureError {
    /// True when the signature is invalid for this model (exit 1), false when
    /// the check itself could not be made (exit 2).
    pub fn is_invalid(&self) -> bool {
        !matches!(self, SignatureError::Io { .. })
    }

    pub(crate) fn malformed(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SignatureError::Malformed {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SignatureError::Io {
            path: path.into(),
            source,
        }
    }
}
