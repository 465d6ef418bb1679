//! Versioned key-encryption keys (KEKs).
//!
//! The keyring file (default `<home>/keyring.json`) is JSON, mode 0600 (any
//! group or other permission bit is refused, as ssh does for private keys),
//! rewritten atomically (temp file, fsync, rename, fsync of the folder) under
//! an advisory lock on `<file>.lock`, so concurrent `moat keys` commands
//! cannot lose each other's changes:
//!
//! ```json
//! {
//!   "format": 1,
//!   "current": 2,
//!   "keks": [
//!     {"version": 1, "kind": "local", "created": 1760000000, "retired": 1760100000,
//!      "key": "<64 hex digits>"},
//!     {"version": 2, "kind": "aws-kms", "created": 1760050000,
//!      "key_id": "arn:aws:kms:eu-west-1:111122223333:key/…"}
//!   ]
//! }
//! ```
//!
//! A `local` version holds 32 random bytes (from the OS); an `aws-kms`
//! version names a KMS key, and the key itself never leaves KMS. New objects
//! are wrapped by `current`; every non-retired version still unwraps.
//! Retiring a version (`retired`: Unix seconds) refuses it for unwrapping;
//! retiring with `destroy` also erases a local version's key bytes, so even
//! an old copy of an object cannot be decrypted with this file again.

use super::kms::KmsClient;
use super::stream::{WrapScheme, WrappedKey};
use super::{CryptoError, Key32};
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const FILE_FORMAT: u32 = 1;
const WRAP_AAD: &[u8] = b"moat-kek-wrap v1";
/// Local wraps: nonce ‖ encrypted DEK ‖ tag.
const LOCAL_WRAP_LEN: usize = 12 + 32 + 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyring {
    format: u32,
    current: u32,
    keks: Vec<RawKek>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKek {
    version: u32,
    kind: KekKind,
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired: Option<u64>,
    /// Local versions: 64 hex digits; absent once destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// AWS KMS versions: key id or ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
}

/// Where a KEK version's key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KekKind {
    Local,
    AwsKms,
}

impl std::fmt::Display for KekKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KekKind::Local => "local",
            KekKind::AwsKms => "aws-kms",
        })
    }
}

/// A KEK version as listed (never the key bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekInfo {
    pub version: u32,
    pub kind: KekKind,
    pub created: u64,
    pub retired: Option<u64>,
    /// A retired local version whose key bytes were erased.
    pub destroyed: bool,
    pub current: bool,
    /// AWS KMS versions: the key id or ARN.
    pub key_id: Option<String>,
}

/// The key of a new version.
#[derive(Debug, Clone)]
pub enum NewKek {
    /// 32 fresh random bytes, stored in the keyring file.
    Local,
    /// An existing AWS KMS key (id, ARN or alias ARN).
    AwsKms { key_id: String },
}

#[derive(Debug, Clone)]
enum Material {
    Local(Key32),
    AwsKms { key_id: String },
    Destroyed,
}

#[derive(Debug, Clone)]
struct Kek {
    material: Material,
    retired: bool,
}

/// The KEKs in memory: wraps new data keys with the current version,
/// unwraps with any version that is not retired.
#[derive(Debug, Clone)]
pub struct Keyring {
    current: u32,
    keks: BTreeMap<u32, Kek>,
    kms: Option<KmsClient>,
}

fn kms_context(version: u32) -> Value {
    json!({"moat:purpose": "data-key", "moat:kek-version": version.to_string()})
}

fn wrap_aad(version: u32, scheme: WrapScheme) -> Vec<u8> {
    let mut aad = WRAP_AAD.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.push(scheme as u8);
    aad
}

impl Keyring {
    /// Attach the KMS client used for `aws-kms` versions.
    pub fn with_kms(mut self, client: KmsClient) -> Self {
        self.kms = Some(client);
        self
    }

    /// Whether any usable version is an AWS KMS key (so a client is needed).
    pub fn needs_kms(&self) -> bool {
        self.keks
            .values()
            .any(|k| !k.retired && matches!(k.material, Material::AwsKms { .. }))
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    fn kms(&self, version: u32) -> Result<&KmsClient, CryptoError> {
        self.kms.as_ref().ok_or_else(|| {
            CryptoError::Invalid(format!(
                "KEK version {version} is an AWS KMS key, but no KMS client is configured (set AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ))
        })
    }

    fn usable(&self, version: u32) -> Result<&Material, CryptoError> {
        let kek = self.keks.get(&version).ok_or(CryptoError::UnknownKek(version))?;
        if kek.retired {
            return Err(CryptoError::Retired { version });
        }
        Ok(&kek.material)
    }

    /// A fresh data key and its wrapping under the current version.
    pub(crate) fn new_data_key(&self) -> Result<(Key32, WrappedKey), CryptoError> {
        let version = self.current;
        match self.usable(version)? {
            Material::AwsKms { key_id } => {
                let (dek, blob) = self
                    .kms(version)?
                    .generate_data_key(key_id, &kms_context(version))?;
                Ok((
                    dek,
                    WrappedKey {
                        kek_version: version,
                        scheme: WrapScheme::AwsKms,
                        bytes: blob,
                    },
                ))
            }
            _ => {
                let dek = Key32::random()?;
                let wrapped = self.wrap(&dek)?;
                Ok((dek, wrapped))
            }
        }
    }

    /// Wrap an existing data key under the current version.
    pub(crate) fn wrap(&self, dek: &Key32) -> Result<WrappedKey, CryptoError> {
        let version = self.current;
        match self.usable(version)? {
            Material::Local(kek) => {
                let mut nonce = [0u8; 12];
                super::fill_random(&mut nonce)?;
                let mut buf = *dek.bytes();
                let cipher = Aes256Gcm::new(kek.bytes().into());
                let tag = cipher
                    .encrypt_inout_detached(
                        &Nonce::from(nonce),
                        &wrap_aad(version, WrapScheme::Local),
                        buf.as_mut_slice().into(),
                    )
                    .map_err(|_| CryptoError::Invalid("AES-GCM refused to wrap a key".into()))?;
                let mut bytes = Vec::with_capacity(LOCAL_WRAP_LEN);
                bytes.extend_from_slice(&nonce);
                bytes.extend_from_slice(&buf);
                bytes.extend_from_slice(&tag);
                zeroize::Zeroize::zeroize(&mut buf);
                Ok(WrappedKey {
                    kek_version: version,
                    scheme: WrapScheme::Local,
                    bytes,
                })
            }
            Material::AwsKms { key_id } => Ok(WrappedKey {
                kek_version: version,
                scheme: WrapScheme::AwsKms,
                bytes: self.kms(version)?.encrypt(key_id, dek, &kms_context(version))?,
            }),
            Material::Destroyed => Err(CryptoError::Retired { version }),
        }
    }

    /// Recover a data key. Refuses retired versions before touching the key.
    pub(crate) fn unwrap(&self, wrapped: &WrappedKey) -> Result<Key32, CryptoError> {
        let version = wrapped.kek_version;
        let material = self.usable(version)?;
        let unwrap_err = |reason: &str| CryptoError::Unwrap {
            version,
            reason: reason.to_owned(),
        };
        match (material, wrapped.scheme) {
            (Material::Local(kek), WrapScheme::Local) => {
                if wrapped.bytes.len() != LOCAL_WRAP_LEN {
                    return Err(unwrap_err(&format!(
                        "a local wrapped key is {LOCAL_WRAP_LEN} bytes, this one is {}",
                        wrapped.bytes.len()
                    )));
                }
                let (nonce, rest) = wrapped.bytes.split_at(12);
                let (ct, tag) = rest.split_at(32);
                let mut buf = [0u8; 32];
                buf.copy_from_slice(ct);
                let nonce: [u8; 12] = nonce.try_into().map_err(|_| unwrap_err("bad nonce"))?;
                let tag = Tag::try_from(tag).map_err(|_| unwrap_err("bad tag"))?;
                let cipher = Aes256Gcm::new(kek.bytes().into());
                cipher
                    .decrypt_inout_detached(
                        &Nonce::from(nonce),
                        &wrap_aad(version, WrapScheme::Local),
                        buf.as_mut_slice().into(),
                        &tag,
                    )
                    .map_err(|_| {
                        unwrap_err("authentication failed: the wrapped key is corrupted or was not made by this keyring")
                    })?;
                let key = Key32::from_slice(&buf).ok_or_else(|| unwrap_err("bad key length"));
                zeroize::Zeroize::zeroize(&mut buf);
                key
            }
            (Material::AwsKms { key_id }, WrapScheme::AwsKms) => self
                .kms(version)?
                .decrypt(key_id, &wrapped.bytes, &kms_context(version))
                .map_err(|e| unwrap_err(&e.to_string())),
            (Material::Destroyed, _) => Err(CryptoError::Retired { version }),
            (Material::Local(_), WrapScheme::AwsKms) => Err(unwrap_err(
                "the object says AWS KMS wrapped its key, but this version is a local key",
            )),
            (Material::AwsKms { .. }, WrapScheme::Local) => Err(unwrap_err(
                "the object says a local key wrapped its key, but this version is an AWS KMS key",
            )),
        }
    }
}

/// The keyring file on disk.
#[derive(Debug, Clone)]
pub struct KeyringFile {
    path: PathBuf,
}

impl KeyringFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// `<home>/keyring.json`.
    pub fn default_path(home: &Path) -> PathBuf {
        home.join("keyring.json")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl FnOnce(io::Error) -> CryptoError + '_ {
        |source| CryptoError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn invalid(&self, message: impl Into<String>) -> CryptoError {
        CryptoError::Keyring {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// Read the raw file; `None` if it does not exist. Checks permissions on
    /// the open descriptor, so the file checked is the file read.
    fn read_raw(&self) -> Result<Option<RawKeyring>, CryptoError> {
        let mut file = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io()(e)),
        };
        let meta = file.metadata().map_err(self.io())?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CryptoError::Permissions {
                path: self.path.clone(),
                mode,
            });
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(self.io())?;
        let raw: RawKeyring = serde_json::from_slice(&text).map_err(|e| self.invalid(e.to_string()))?;
        self.validate(&raw)?;
        Ok(Some(raw))
    }

    /// Check everything the typed keyring relies on; errors name the entry.
    fn validate(&self, raw: &RawKeyring) -> Result<(), CryptoError> {
        if raw.format != FILE_FORMAT {
            return Err(self.invalid(format!(
                "format {} is not supported (expected {FILE_FORMAT})",
                raw.format
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, k) in raw.keks.iter().enumerate() {
            let at = format!("keks[{i}]");
            if k.version == 0 || !seen.insert(k.version) {
                return Err(self.invalid(format!("{at}.version: {} is zero or used twice", k.version)));
            }
            match k.kind {
                KekKind::Local => {
                    if k.key_id.is_some() {
                        return Err(self.invalid(format!("{at}.key_id: only aws-kms versions have one")));
                    }
                    match &k.key {
                        Some(hex_key) => {
                            let ok = hex::decode(hex_key).is_ok_and(|b| b.len() == 32);
                            if !ok {
                                return Err(self.invalid(format!("{at}.key: expected 64 hex digits")));
                            }
                        }
                        None if k.retired.is_some() => {}
                        None => {
                            return Err(self.invalid(format!(
                                "{at}.key: missing (only a retired version may have its key destroyed)"
                            )));
                        }
                    }
                }
                KekKind::AwsKms => {
                    if k.key.is_some() {
                        return Err(self.invalid(format!("{at}.key: aws-kms versions hold no key bytes")));
                    }
                    if k.key_id.as_deref().is_none_or(|s| s.trim().is_empty()) {
                        return Err(self.invalid(format!("{at}.key_id: missing")));
                    }
                }
            }
        }
        match raw.keks.iter().find(|k| k.version == raw.current) {
            None if raw.keks.is_empty() => Err(self.invalid("no KEK versions")),
            None => Err(self.invalid(format!("current: version {} is not in keks", raw.current))),
            Some(k) if k.retired.is_some() => {
                Err(self.invalid(format!("current: version {} is retired", raw.current)))
            }
            Some(_) => Ok(()),
        }
    }

    /// Load the keyring (without a KMS client; see [`Keyring::with_kms`]).
    pub fn load(&self) -> Result<Keyring, CryptoError> {
        let raw = self.read_raw()?.ok_or_else(|| CryptoError::NoKeyring {
            path: self.path.clone(),
        })?;
        let mut keks = BTreeMap::new();
        for k in raw.keks {
            let material = match (k.kind, k.key, k.key_id) {
                (KekKind::Local, Some(hex_key), _) => {
                    let bytes = zeroize::Zeroizing::new(
                        hex::decode(hex_key).map_err(|e| self.invalid(e.to_string()))?,
                    );
                    Material::Local(Key32::from_slice(&bytes).ok_or_else(|| self.invalid("bad key length"))?)
                }
                (KekKind::Local, None, _) => Material::Destroyed,
                (KekKind::AwsKms, _, key_id) => Material::AwsKms {
                    key_id: key_id.unwrap_or_default(),
                },
            };
            keks.insert(
                k.version,
                Kek {
                    material,
                    retired: k.retired.is_some(),
                },
            );
        }
        Ok(Keyring {
            current: raw.current,
            keks,
            kms: None,
        })
    }

    /// All versions, oldest first; a missing file is an empty list.
    pub fn list(&self) -> Result<Vec<KekInfo>, CryptoError> {
        Ok(self.read_raw()?.map_or_else(Vec::new, |raw| info(&raw)))
    }

    /// Add a new version and make it current (creates the file if needed).
    pub fn rotate(&self, new: NewKek) -> Result<KekInfo, CryptoError> {
        self.update(|raw| {
            let version = raw
                .keks
                .iter()
                .map(|k| k.version)
                .max()
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| self.invalid("no KEK versions left"))?;
            let (kind, key, key_id) = match new {
                NewKek::Local => (KekKind::Local, Some(hex::encode(Key32::random()?.bytes())), None),
                NewKek::AwsKms { key_id } => {
                    if key_id.trim().is_empty() {
                        return Err(CryptoError::Invalid("an AWS KMS key id must not be empty".into()));
                    }
                    (KekKind::AwsKms, None, Some(key_id))
                }
            };
            raw.keks.push(RawKek {
                version,
                kind,
                created: now_unix(),
                retired: None,
                key,
                key_id,
            });
            raw.current = version;
            Ok(version)
        })
        .and_then(|(raw, version)| self.info_of(&raw, version))
    }

    /// Retire a version (not the current one); `destroy` also erases a local
    /// version's key bytes. Retiring twice is allowed (and may destroy).
    pub fn retire(&self, version: u32, destroy: bool) -> Result<KekInfo, CryptoError> {
        self.update(|raw| {
            if raw.current == version {
                return Err(CryptoError::Invalid(format!(
                    "KEK version {version} is current; rotate to a new version first (moat keys rotate-kek)"
                )));
            }
            let k = raw
                .keks
                .iter_mut()
                .find(|k| k.version == version)
                .ok_or(CryptoError::UnknownKek(version))?;
            if k.retired.is_none() {
                k.retired = Some(now_unix());
            }
            if destroy {
                k.key = None;
            }
            Ok(version)
        })
        .and_then(|(raw, version)| self.info_of(&raw, version))
    }

    fn info_of(&self, raw: &RawKeyring, version: u32) -> Result<KekInfo, CryptoError> {
        info(raw)
            .into_iter()
            .find(|k| k.version == version)
            .ok_or(CryptoError::UnknownKek(version))
    }

    /// Read-modify-write under an exclusive advisory lock, atomically.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut RawKeyring) -> Result<T, CryptoError>,
    ) -> Result<(RawKeyring, T), CryptoError> {
        let _lock = moat_fs::lock_for(&self.path).map_err(self.io())?;
        let mut raw = self.read_raw()?.unwrap_or(RawKeyring {
            format: FILE_FORMAT,
            current: 0,
            keks: Vec::new(),
        });
        let out = f(&mut raw)?;
        self.validate(&raw)?;
        let mut body = serde_json::to_vec_pretty(&raw).map_err(|e| self.invalid(e.to_string()))?;
        body.push(b'\n');
        let result = moat_fs::write_atomic(&self.path, &body);
        zeroize::Zeroize::zeroize(&mut body);
        result.map_err(self.io())?;
        Ok((raw, out))
    }
}

fn info(raw: &RawKeyring) -> Vec<KekInfo> {
    raw.keks
        .iter()
        .map(|k| KekInfo {
            version: k.version,
            kind: k.kind,
            created: k.created,
            retired: k.retired,
            destroyed: k.kind == KekKind::Local && k.key.is_none(),
            current: k.version == raw.current,
            key_id: k.key_id.clone(),
        })
        .collect()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
