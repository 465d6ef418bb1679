//! OpenSSF model signing, byte-compatible with the `model_signing` tool
//! (PyPI `model-signing` 1.1): a Sigstore bundle (v0.3 JSON) holding a DSSE
//! envelope around an in-toto statement that lists every file of the model
//! with its SHA-256. moat signs with an EC key (optionally with a certificate
//! chain) and verifies key, certificate and legacy (v0.2) signatures.
//!
//! Verification is two steps so a caller that already trusts per-file
//! hashes (a `moat.lock` checked at pull) need not hash again:
//! [`open_with_key`] / [`open_with_certificates`] check who signed and
//! return a [`SignedManifest`]; [`SignedManifest::check_dir`] re-hashes a
//! folder, [`SignedManifest::check_lock`] compares with the lock's digests.
//! [`verify_key`] and [`verify_certificate`] do both.
//!
//! Where moat and the tool (1.1.1, as its CLI runs) differ, on purpose:
//! - moat re-hashes with the method the signature names (`files` or
//!   `shards`); the tool's CLI always re-hashes by files, so it cannot verify
//!   a `shards` signature (its Python API can).
//! - ignored paths are left out before anything else, so a symlink or socket
//!   under `.git` does not fail a signature it is not part of.
//! - the subject name is checked only when asked
//!   ([`VerifyOptions::expected_model_name`]); the tool never checks it (a
//!   renamed folder still verifies).
//! - certificate verification needs the trusted certificates to be given;
//!   there is no fallback to a system or web PKI bundle.
//! - only `sha256` resources can be checked (the tool also has blake2 and
//!   blake3), and encrypted private keys are not read.
//!
//! Sigstore keyless signatures (Fulcio certificate, Rekor entry) are not
//! supported: they are refused as an unverifiable chain, never accepted.

mod bundle;
mod error;
mod keys;
mod manifest;
mod pyjson;
mod statement;
mod x509;

#[cfg(test)]
mod tests;

pub use error::{Difference, KeyError, SignError, SignatureError};
pub use keys::{Curve, PrivateKey, PublicKey};
pub use manifest::{DEFAULT_SHARD_SIZE, GIT_PATHS, Method, Resource, Serialization};
pub use statement::COMPAT_MODEL_NAME;
pub use x509::{CertificateIdentity, TrustRoots};

use crate::lock::LockedFile;
use bundle::{Bundle, Material, PAYLOAD_TYPE, pae, pae_compat};
use keys::HashChoice;
use manifest::{IgnoreSet, ResourceKey, compare, hash_model, model_name, posix_components};
use statement::Statement;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use x509::{Anchor, Cert, parse_pem_certificates, verify_chain};

/// The signature file name the tool uses by default.
pub const DEFAULT_SIGNATURE_NAME: &str = "model.sig";

/// How to hash the model when signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignOptions {
    pub method: Method,
    /// Paths relative to the model folder to leave out (and record as
    /// ignored). Put the signature file here when it lives inside the model.
    pub ignore_paths: Vec<String>,
    /// Leave out `.git`, `.gitattributes`, `.github`, `.gitignore` (the
    /// tool's default).
    pub ignore_git_paths: bool,
    /// Hash symlinked files as their targets' content instead of refusing.
    pub allow_symlinks: bool,
}

impl Default for SignOptions {
    fn default() -> Self {
        Self {
            method: Method::Files,
            ignore_paths: Vec::new(),
            ignore_git_paths: true,
            allow_symlinks: false,
        }
    }
}

/// How to check a model against a signature. The paths the signature
/// records as ignored are always ignored as well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Extra model-relative paths to leave out (the signature file, when it
    /// lives inside the model).
    pub ignore_paths: Vec<String>,
    pub ignore_git_paths: bool,
    /// As in the tool, this is the verifier's choice, not the signer's.
    pub allow_symlinks: bool,
    /// Require the signed subject name (the folder name at signing time).
    pub expected_model_name: Option<String>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            ignore_paths: Vec::new(),
            ignore_git_paths: true,
            allow_symlinks: false,
            expected_model_name: None,
        }
    }
}

/// A private key with its certificate chain, for certificate signing.
#[derive(Debug, Clone)]
pub struct CertificateSigner {
    key: PrivateKey,
    /// Signing certificate first, then the given chain, all DER.
    chain: Vec<Vec<u8>>,
}

impl CertificateSigner {
    /// `signing_certificate` must hold the public half of `key`; `chain` may
    /// hold any number of certificates (intermediates, usually), or none.
    pub fn new(key: PrivateKey, signing_certificate: &str, chain: &str) -> Result<Self, KeyError> {
        let leaf = parse_pem_certificates(signing_certificate)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                KeyError::Certificate("no CERTIFICATE block in the signing certificate".to_owned())
            })?;
        if leaf.public_key()? != key.public_key() {
            return Err(KeyError::CertificateKeyMismatch);
        }
        let rest: Vec<Cert> = if chain.trim().is_empty() {
            Vec::new()
        } else {
            parse_pem_certificates(chain)?
        };
        let mut ders = vec![leaf.der];
        ders.extend(rest.into_iter().map(|c| c.der));
        Ok(Self { key, chain: ders })
    }
}

/// Who made a verified signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    /// Signed with a bare key; `fingerprint` is the hex SHA-256 of its PEM
    /// SubjectPublicKeyInfo (the bundle's key hint).
    Key {
        fingerprint: String,
    },
    Certificate(CertificateIdentity),
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Key { fingerprint } => write!(f, "key sha256:{fingerprint}"),
            Signer::Certificate(c) => {
                write!(f, "certificate \"{}\"", c.subject)?;
                if !c.san.is_empty() {
                    write!(f, " ({})", c.san.join(", "))?;
                }
                write!(f, " issued by \"{}\"", c.issuer)
            }
        }
    }
}

/// A signature whose signer checked out and whose every resource matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The signed subject name ([`COMPAT_MODEL_NAME`] for v0.2 signatures).
    pub model_name: String,
    pub signer: Signer,
    pub serialization: Serialization,
    /// As signed, in signed order.
    pub resources: Vec<Resource>,
    /// The v0.2 `Digests/v0.1` predicate.
    pub legacy: bool,
}

impl VerifiedSignature {
    /// Number of distinct files covered (shards of one file count once).
    pub fn file_count(&self) -> usize {
        count_files(
            self.resources.iter().map(|r| r.name.as_str()),
            self.serialization.method,
        )
    }
}

fn count_files<'a>(names: impl Iterator<Item = &'a str>, method: Method) -> usize {
    names
        .map(|n| match method {
            Method::Files => n,
            Method::Shards { .. } => n.rsplitn(3, ':').nth(2).unwrap_or(n),
        })
        .collect::<BTreeSet<_>>()
        .len()
}

/// A bundle whose signature and signer have been checked, not yet compared
/// with any model.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    statement: Statement,
    signer: Signer,
}

impl SignedManifest {
    pub fn model_name(&self) -> &str {
        &self.statement.model_name
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn serialization(&self) -> &Serialization {
        &self.statement.serialization
    }

    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.statement.resources.iter().map(|(_, r)| r)
    }

    pub fn is_legacy(&self) -> bool {
        self.statement.legacy
    }

    fn ignore_set(&self, opts: &VerifyOptions) -> IgnoreSet {
        let mut ignore = IgnoreSet::with(&opts.ignore_paths, opts.ignore_git_paths);
        for p in &self.statement.serialization.ignore_paths {
            ignore.add(p);
        }
        ignore
    }

    fn precheck(&self, opts: &VerifyOptions) -> Result<(), SignatureError> {
        if let Some(expected) = &opts.expected_model_name
            && *expected != self.statement.model_name
        {
            return Err(SignatureError::ModelName {
                signed: self.statement.model_name.clone(),
                expected: expected.clone(),
            });
        }
        let hash_type = &self.statement.serialization.hash_type;
        if hash_type != "sha256" {
            return Err(SignatureError::Unsupported(format!(
                "resources hashed with \"{hash_type}\" (only sha256 can be checked)"
            )));
        }
        Ok(())
    }

    fn expected(&self) -> BTreeMap<ResourceKey, (String, String)> {
        self.statement
            .resources
            .iter()
            .map(|(k, r)| (k.clone(), (r.algorithm.clone(), r.digest.clone())))
            .collect()
    }

    fn finish(
        self,
        actual: BTreeMap<ResourceKey, (String, String)>,
    ) -> Result<VerifiedSignature, SignatureError> {
        let differences = compare(&self.expected(), &actual);
        if !differences.is_empty() {
            return Err(SignatureError::Mismatch { differences });
        }
        Ok(VerifiedSignature {
            model_name: self.statement.model_name,
            signer: self.signer,
            serialization: self.statement.serialization,
            resources: self.statement.resources.into_iter().map(|(_, r)| r).collect(),
            legacy: self.statement.legacy,
        })
    }

    /// Re-hash the model at `model` (a folder, or a single file) the way the
    /// signature says, and compare every resource.
    pub fn check_dir(self, model: &Path, opts: &VerifyOptions) -> Result<VerifiedSignature, SignatureError> {
        self.precheck(opts)?;
        let ser = &self.statement.serialization;
        let algorithm = ser.resource_algorithm();
        let hashed = hash_model(model, ser.method, &self.ignore_set(opts), opts.allow_symlinks)?;
        let actual = hashed
            .into_iter()
            .map(|(k, d)| (k, (algorithm.clone(), d)))
            .collect();
        self.finish(actual)
    }

    /// Compare with per-file SHA-256s already known to describe the model
    /// (a `moat.lock`), without reading any file. Exact for `files`
    /// signatures; a `shards` signature can be checked this way only when no
    /// file is larger than its shard size (a single shard is the whole file).
    pub fn check_lock(
        self,
        files: &[LockedFile],
        opts: &VerifyOptions,
    ) -> Result<VerifiedSignature, SignatureError> {
        self.precheck(opts)?;
        let ignore = self.ignore_set(opts);
        let ser = &self.statement.serialization;
        let algorithm = ser.resource_algorithm();
        let mut actual = BTreeMap::new();
        for f in files {
            let components = posix_components(&f.path);
            if ignore.matches(&components) {
                continue;
            }
            let digest = f.sha256.to_ascii_lowercase();
            match ser.method {
                Method::Files => {
                    actual.insert(ResourceKey::file(components), (algorithm.clone(), digest));
                }
                Method::Shards { shard_size } => {
                    if f.size > shard_size {
                        return Err(SignatureError::Unsupported(format!(
                            "{}: {} bytes is more than the signature's shard size ({shard_size}); its shards can only be checked by re-hashing the file",
                            f.path, f.size
                        )));
                    }
                    if f.size > 0 {
                        actual.insert(
                            ResourceKey {
                                components,
                                range: Some((0, f.size)),
                            },
                            (algorithm.clone(), digest),
                        );
                    }
                }
            }
        }
        self.finish(actual)
    }
}

fn sign_with(
    model: &Path,
    key: &PrivateKey,
    material: Material,
    opts: &SignOptions,
) -> Result<Vec<u8>, SignError> {
    let ignore = IgnoreSet::with(&opts.ignore_paths, opts.ignore_git_paths);
    if let Method::Shards { shard_size: 0 } = opts.method {
        return Err(SignError::Encode("the shard size must be positive".to_owned()));
    }
    let hashed = hash_model(model, opts.method, &ignore, opts.allow_symlinks)?;
    let serialization = Serialization {
        method: opts.method,
        hash_type: "sha256".to_owned(),
        allow_symlinks: opts.allow_symlinks,
        ignore_paths: ignore.to_strings(),
    };
    let algorithm = serialization.resource_algorithm();
    let resources: Vec<Resource> = hashed
        .iter()
        .map(|(k, d)| Resource {
            name: k.name(),
            algorithm: algorithm.clone(),
            digest: d.clone(),
        })
        .collect();
    let name = model_name(model)?;
    let payload = statement::render(&name, &serialization, &resources).map_err(SignError::Encode)?;
    let signature = key.sign(&pae(&payload));
    Bundle {
        material,
        payload_type: PAYLOAD_TYPE.to_owned(),
        payload,
        signature,
    }
    .to_json()
    .map_err(|e| SignError::Encode(e.to_string()))
}

/// Sign the model at `model` with a bare key; returns the bundle to write.
pub fn sign_key(model: &Path, key: &PrivateKey, opts: &SignOptions) -> Result<Vec<u8>, SignError> {
    let hint = key.public_key().hint();
    sign_with(model, key, Material::Key { hint: Some(hint) }, opts)
}

/// Sign the model at `model` with a certificate's key; the bundle carries
/// the certificate and chain.
pub fn sign_certificate(
    model: &Path,
    signer: &CertificateSigner,
    opts: &SignOptions,
) -> Result<Vec<u8>, SignError> {
    sign_with(model, &signer.key, Material::Chain(signer.chain.clone()), opts)
}

fn open_payload(bundle: &Bundle, signer: Signer) -> Result<SignedManifest, SignatureError> {
    if bundle.payload_type != PAYLOAD_TYPE {
        return Err(SignatureError::UnsupportedPayloadType(
            bundle.payload_type.clone(),
        ));
    }
    Ok(SignedManifest {
        statement: statement::parse(&bundle.payload)?,
        signer,
    })
}

/// Check a bundle's signature with a public key.
pub fn open_with_key(bundle: &[u8], key: &PublicKey) -> Result<SignedManifest, SignatureError> {
    let bundle = Bundle::parse(bundle)?;
    let Material::Key { hint } = &bundle.material else {
        return Err(SignatureError::malformed(
            "verificationMaterial.publicKey",
            "missing (the bundle carries a certificate chain: verify with certificates)",
        ));
    };
    let given = key.hint();
    if let Some(signed) = hint
        && !signed.eq_ignore_ascii_case(&given)
    {
        return Err(SignatureError::WrongKey {
            signed: signed.clone(),
            given,
        });
    }
    let ok = key.verify(&pae(&bundle.payload), &bundle.signature, HashChoice::Curve)
        || key.verify(&pae_compat(&bundle.payload), &bundle.signature, HashChoice::Curve);
    if !ok {
        return Err(if hint.is_some() {
            SignatureError::PayloadModified
        } else {
            SignatureError::BadSignature
        });
    }
    open_payload(&bundle, Signer::Key { fingerprint: given })
}

/// Check a bundle's certificate chain against `roots`, then its signature
/// with the signing certificate's key.
pub fn open_with_certificates(bundle: &[u8], roots: &TrustRoots) -> Result<SignedManifest, SignatureError> {
    open_with_certificates_anchored(bundle, roots, Anchor::SelfSignedTrusted)
}

fn open_with_certificates_anchored(
    bundle: &[u8],
    roots: &TrustRoots,
    anchor: Anchor,
) -> Result<SignedManifest, SignatureError> {
    let bundle = Bundle::parse(bundle)?;
    let Material::Chain(chain) = &bundle.material else {
        return Err(SignatureError::malformed(
            "verificationMaterial.x509CertificateChain",
            "missing (the bundle was signed with a bare key: verify with its public key)",
        ));
    };
    let (key, identity) = verify_chain(chain, roots, anchor)?;
    // v0.2 signed the buggy PAE with SHA-256 whatever the curve.
    let ok = key.verify(&pae(&bundle.payload), &bundle.signature, HashChoice::Curve)
        || key.verify(
            &pae_compat(&bundle.payload),
            &bundle.signature,
            HashChoice::Sha256,
        );
    if !ok {
        return Err(SignatureError::PayloadModified);
    }
    open_payload(&bundle, Signer::Certificate(identity))
}

/// Check a key signature and re-hash the model.
pub fn verify_key(
    model: &Path,
    bundle: &[u8],
    key: &PublicKey,
    opts: &VerifyOptions,
) -> Result<VerifiedSignature, SignatureError> {
    open_with_key(bundle, key)?.check_dir(model, opts)
}

/// Check a certificate signature against `roots` and re-hash the model.
pub fn verify_certificate(
    model: &Path,
    bundle: &[u8],
    roots: &TrustRoots,
    opts: &VerifyOptions,
) -> Result<VerifiedSignature, SignatureError> {
    open_with_certificates(bundle, roots)?.check_dir(model, opts)
}

/// Resolve a user-given path (relative to `cwd`) the way the tool does and
/// return it relative to the model folder, or `None` when it lies outside.
/// Symlinks are resolved as far as the path exists.
pub fn model_relative_path(model: &Path, path: &Path, cwd: &Path) -> std::io::Result<Option<String>> {
    let root = std::fs::canonicalize(model)?;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    let resolved = resolve_lenient(&abs);
    let Ok(rel) = resolved.strip_prefix(&root) else {
        return Ok(None);
    };
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => match s.to_str() {
                Some(s) => parts.push(s.to_owned()),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    Ok(Some(parts.join("/")))
}

/// `Path.resolve(strict=False)`: drop `.` and `..` lexically, canonicalise
/// the longest existing prefix (resolving its symlinks), keep the rest.
fn resolve_lenient(abs: &Path) -> PathBuf {
    let mut norm = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                norm.pop();
            }
            Component::CurDir => {}
            other => norm.push(other),
        }
    }
    let mut base = norm.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(mut p) = std::fs::canonicalize(&base) {
            for r in rest.iter().rev() {
                p.push(r);
            }
            return p;
        }
        match base.file_name().map(ToOwned::to_owned) {
            Some(n) => {
                rest.push(n);
                base.pop();
            }
            None => return norm,
        }
    }
}
