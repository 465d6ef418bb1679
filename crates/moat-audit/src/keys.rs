//! The audit keys: versioned 32-byte HMAC keys, one of them current.
//!
//! Records are MAC'd under the current version and name it
//! (`key_version`); verification picks each record's key by that number, so
//! rotating (adding a version and making it current) keeps every older
//! record verifiable as long as its version stays in the set.
//!
//! The caller normally supplies the set (the server loads it from its
//! keyring). So that the crate is usable end to end on its own, a keys file
//! is supported too: JSON, owner-only (mode 0600; a file group or others can
//! read or write is refused),
//!
//! ```json
//! {"current": 2, "keys": {"1": "<64 hex digits>", "2": "<base64 of 32 bytes>"}}
//! ```
//!
//! where each key is 64 hex digits or standard base64 of 32 bytes.

use crate::record::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Length of an audit key in bytes.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("audit keys file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "audit keys file {path} is accessible by group or others (mode {mode:04o}); run `chmod 600` on it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("audit keys file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("audit keys: {0}")]
    Invalid(String),
    #[error("audit keys: no randomness from the operating system: {0}")]
    Random(String),
}

/// A set of versioned audit keys and the version new records use.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKeys {
    current: u32,
    /// The key of `current` (also in `keys`), held apart so that no lookup
    /// can miss.
    current_key: [u8; KEY_LEN],
    keys: BTreeMap<u32, [u8; KEY_LEN]>,
}

impl fmt::Debug for AuditKeys {
    // Never the key bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKeys")
            .field("current", &self.current)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    current: u32,
    keys: BTreeMap<String, String>,
}

impl AuditKeys {
    /// A set from its parts; `current` must be one of the versions, and
    /// versions start at 1.
    pub fn new(current: u32, keys: BTreeMap<u32, [u8; KEY_LEN]>) -> Result<Self, KeysError> {
        if keys.contains_key(&0) {
            return Err(KeysError::Invalid("key versions start at 1".into()));
        }
        let Some(current_key) = keys.get(&current).copied() else {
            return Err(KeysError::Invalid(format!(
                "the current version {current} has no key"
            )));
        };
        Ok(Self {
            current,
            current_key,
            keys,
        })
    }

    /// One key, current.
    pub fn single(version: u32, key: [u8; KEY_LEN]) -> Result<Self, KeysError> {
        Self::new(version, BTreeMap::from([(version, key)]))
    }

    /// A single fresh random key, version 1.
    pub fn random() -> Result<Self, KeysError> {
        Self::single(1, random_key()?)
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The current version and its key.
    pub fn current(&self) -> (u32, &[u8; KEY_LEN]) {
        (self.current, &self.current_key)
    }

    /// The key of `version`, if held.
    pub fn get(&self, version: u32) -> Option<&[u8; KEY_LEN]> {
        self.keys.get(&version)
    }

    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }

    /// A copy with a new random version (one above the highest), made current.
    pub fn rotated(&self) -> Result<Self, KeysError> {
        let next = self
            .keys
            .keys()
            .next_back()
            .map_or(Some(1), |v| v.checked_add(1))
            .ok_or_else(|| KeysError::Invalid("no key version left".into()))?;
        let mut keys = self.keys.clone();
        keys.insert(next, random_key()?);
        Self::new(next, keys)
    }

    /// [`crate::prompt_hmac`] under a key derived from the current audit key
    /// (HMAC(key, "moat-audit prompt-hmac v1")), so that prompt hashes and
    /// chain MACs never share a key.
    pub fn prompt_hmac(&self, prompt: &str) -> String {
        let (_, key) = self.current();
        let derived = hmac(key, &[b"moat-audit prompt-hmac v1"]);
        crate::prompt_hmac(&derived, prompt)
    }

    /// Parse the JSON text of a keys file (see the module comment).
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        let raw: KeysFile = serde_json::from_str(text).map_err(|e| KeysError::Invalid(e.to_string()))?;
        let mut keys = BTreeMap::new();
        for (version, value) in &raw.keys {
            let v: u32 = version
                .parse()
                .map_err(|_| KeysError::Invalid(format!("keys.{version}: the version is not a number")))?;
            let key = decode_key(value).ok_or_else(|| {
                KeysError::Invalid(format!(
                    "keys.{version}: not 64 hex digits or base64 of {KEY_LEN} bytes"
                ))
            })?;
            keys.insert(v, key);
        }
        Self::new(raw.current, keys)
    }

    /// The JSON text of a keys file holding this set (keys in hex).
    pub fn to_file_text(&self) -> String {
        let raw = KeysFile {
            current: self.current,
            keys: self
                .keys
                .iter()
                .map(|(v, k)| (v.to_string(), hex::encode(k)))
                .collect(),
        };
        // Serializing strings and numbers cannot fail.
        serde_json::to_string_pretty(&raw).unwrap_or_default() + "\n"
    }

    /// Read a keys file, refusing one that group or others can access.
    pub fn from_file(path: &Path) -> Result<Self, KeysError> {
        let io_err = |source| KeysError::Io {
            path: path.to_owned(),
            source,
        };
        let file = fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(io_err(io::Error::other("not a regular file")));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeysError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = io::read_to_string(file).map_err(io_err)?;
        Self::parse(&text).map_err(|e| match e {
            KeysError::Invalid(message) => KeysError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Create a keys file (mode 0600; refuses to overwrite one) holding one
    /// fresh random key, version 1, and return the set.
    pub fn generate_file(path: &Path) -> Result<Self, KeysError> {
        let keys = Self::random()?;
        write_new(path, &keys.to_file_text()).map_err(|source| KeysError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(keys)
    }

    /// Add a fresh version to a keys file and make it current (the file is
    /// replaced atomically); returns the new set.
    pub fn rotate_file(path: &Path) -> Result<Self, KeysError> {
        let keys = Self::from_file(path)?.rotated()?;
        let io_err = |source| KeysError::Io {
            path: path.to_owned(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| io_err(io::Error::other("not a file path")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, &keys.to_file_text()).map_err(io_err)?;
        fs::rename(&tmp, path).map_err(io_err)?;
        sync_parent(path).map_err(io_err)?;
        Ok(keys)
    }
}

fn random_key() -> Result<[u8; KEY_LEN], KeysError> {
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| KeysError::Random(e.to_string()))?;
    Ok(key)
}

fn decode_key(value: &str) -> Option<[u8; KEY_LEN]> {
    let value = value.trim();
    let mut key = [0u8; KEY_LEN];
    if value.len() == 2 * KEY_LEN && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode_to_slice(value, &mut key).ok()?;
        return Some(key);
    }
    let bytes = STANDARD.decode(value).ok()?;
    key.copy_from_slice(bytes.get(..KEY_LEN).filter(|_| bytes.len() == KEY_LEN)?);
    Some(key)
}

/// Create `path` (must not exist) with mode 0600, write `text`, fsync it and
/// its folder.
fn write_new(path: &Path, text: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    sync_parent(path)
}

pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_read_rotate() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit-keys.json");
        let made = AuditKeys::generate_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(AuditKeys::from_file(&path).unwrap(), made);
        assert!(matches!(
            AuditKeys::generate_file(&path),
            Err(KeysError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists
        ));
        let rotated = AuditKeys::rotate_file(&path).unwrap();
        assert_eq!(rotated.current_version(), 2);
        assert_eq!(rotated.get(1), made.get(1));
        assert_ne!(rotated.get(2), made.get(1));
        assert_eq!(AuditKeys::from_file(&path).unwrap(), rotated);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn refuses_a_file_others_can_read() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("k.json");
        AuditKeys::generate_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = AuditKeys::from_file(&path).unwrap_err();
        assert!(matches!(e, KeysError::Permissions { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn hex_and_base64_keys() {
        let hex_key = "00".repeat(31) + "01";
        let b64 = STANDARD.encode([2u8; 32]);
        let text = format!(r#"{{"current":2,"keys":{{"1":"{hex_key}","2":"{b64}"}}}}"#);
        let keys = AuditKeys::parse(&text).unwrap();
        assert_eq!(keys.current(), (2, &[2u8; 32]));
        assert_eq!(keys.get(1).unwrap()[31], 1);
        for bad in [
            r#"{"current":1,"keys":{"1":"abcd"}}"#,
            r#"{"current":3,"keys":{"1":"0000000000000000000000000000000000000000000000000000000000000000"}}"#,
            r#"{"current":0,"keys":{"0":"0000000000000000000000000000000000000000000000000000000000000000"}}"#,
            r#"{"current":1,"keys":{"x":"0000000000000000000000000000000000000000000000000000000000000000"}}"#,
            r#"{"current":1,"keys":{},"extra":1}"#,
        ] {
            assert!(AuditKeys::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let keys = AuditKeys::single(1, [0xab; 32]).unwrap();
        let text = format!("{keys:?}");
        assert!(!text.contains("ab, ") && !text.contains("171"), "{text}");
        assert_ne!(keys.prompt_hmac("hi"), crate::prompt_hmac(&[0xab; 32], "hi"));
        assert_eq!(keys.prompt_hmac("hi"), keys.prompt_hmac("hi"));
    }
}
