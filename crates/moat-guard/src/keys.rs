//! API keys.
//!
//! A key is `moat_<public id>_<secret>`: 16 hex digits of id (safe to log,
//! used to find the record) and 64 hex digits (256 bits) of secret. The keys
//! file stores only SHA-256 of the secret (a fast hash is enough for 256-bit
//! random secrets: there is nothing to brute-force), and the check compares
//! hashes in constant time. The secret is shown once, at creation.
//!
//! The keys file is JSON, mode 0600, rewritten atomically (temp file, fsync,
//! rename) under an advisory lock so concurrent `moat keys` commands cannot
//! lose each other's changes. A running server re-reads it when it changes,
//! so a revocation takes effect without a restart.
//!
//! At rest the file may be sealed (`[encryption] encrypt_keys_file`): the
//! same JSON inside an AES-256-GCM envelope whose data key the keyring's KEK
//! wraps. The cipher lives in moat-artifact; this crate sees it only as a
//! [`FileCodec`], so it stays free of key management. A sealed file starts
//! with the envelope magic `MOATENC` and a JSON one with `{`, so the two are
//! told apart without a flag, and a plain file keeps working until its next
//! write (or `moat keys encrypt`) seals it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use subtle::ConstantTimeEq;

/// Every API key starts with this; any other bearer value is not a key.
pub const KEY_PREFIX: &str = "moat_";
const PREFIX: &str = KEY_PREFIX;
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
const FILE_VERSION: u32 = 1;

/// The longest role name (bytes); names are `[a-z][a-z0-9_-]{0,31}`.
pub const MAX_ROLE_NAME: usize = 32;

/// A role's name, checked: a lower-case letter, then up to 31 lower-case
/// letters, digits, `_` or `-`. Which permissions it carries is the
/// `[rbac]` table's business ([`crate::Rbac`]); a name alone grants nothing.
///
/// An `Arc<str>` so that cloning one (every request clones its principal's)
/// is a reference-count increment, never an allocation. The two built-in
/// names are allocated once per process ([`Role::admin`], [`Role::user`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Role(Arc<str>);

impl Role {
    /// Checks `name`; the error says what a role name may hold.
    pub fn new(name: &str) -> Result<Role, KeyError> {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !first_ok || !rest_ok || name.len() > MAX_ROLE_NAME {
            return Err(KeyError::Invalid(format!(
                "role {name:?}: a role name is a lower-case letter followed by at most \
                 {} lower-case letters, digits, '_' or '-' (e.g. ops)",
                MAX_ROLE_NAME - 1
            )));
        }
        Ok(match name {
            // Share the process-wide built-ins rather than allocate anew.
            "admin" => Role::admin(),
            "user" => Role::user(),
            _ => Role(Arc::from(name)),
        })
    }

    /// The built-in role holding every permission by default.
    pub fn admin() -> Role {
        static ADMIN: LazyLock<Role> = LazyLock::new(|| Role(Arc::from("admin")));
        ADMIN.clone()
    }

    /// The built-in role for inference callers (inference and reading the
    /// model list by default).
    pub fn user() -> Role {
        static USER: LazyLock<Role> = LazyLock::new(|| Role(Arc::from("user")));
        USER.clone()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_admin(&self) -> bool {
        self.as_str() == "admin"
    }
}

impl std::str::FromStr for Role {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Role::new(s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({:?})", &*self.0)
    }
}

/// In the keys file a role is its name, as it always was (`"role": "user"`),
/// so files written before custom roles existed read unchanged.
impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Role::new(&name).map_err(serde::de::Error::custom)
    }
}

/// One key as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub id: String,
    pub role: Role,
    /// Models this key may use; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub expires: Option<u64>,
    #[serde(default)]
    pub revoked: Option<u64>,
    /// Lower-case hex SHA-256 of the secret part.
    pub secret_sha256: String,
    /// Limits on top of the role's; the tighter of the two applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::limits::KeyLimits>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    keys: Vec<KeyRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: invalid keys file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("no key with id {0:?}")]
    NotFound(String),
    #[error("cannot get random bytes from the OS: {0}")]
    Random(String),
}

/// A freshly created key. `secret` is the whole key string, shown once.
pub struct NewKey {
    pub record: KeyRecord,
    pub secret: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("record", &self.record)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Parse a duration like `30d`, `12h`, `15m`, `3600s` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, KeyError> {
    let bad = || {
        KeyError::Invalid(format!(
            "duration {s:?}: expected a number followed by s, m, h or d (e.g. 30d)"
        ))
    };
    let (num, unit) = s.split_at(s.len().checked_sub(1).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(bad)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_hex(n: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(hex::encode(buf))
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The first bytes of a sealed keys file (the moat envelope magic).
pub const SEALED_MAGIC: &[u8] = b"MOATENC";

/// Seals and opens the keys file's bytes (an envelope under a keyring).
/// Errors are messages naming the KEK version or the fault, never secrets.
pub trait FileCodec: Send + Sync + fmt::Debug {
    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String>;
    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String>;
}

/// Whether the keys file at `path` is sealed (false if absent or plain).
pub fn is_sealed(path: &Path) -> io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 7];
    match fs::File::open(path) {
        Ok(mut f) => Ok(f.read_exact(&mut head).is_ok() && head == SEALED_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The keys file on disk.
#[derive(Debug, Clone)]
pub struct KeyStore {
    path: PathBuf,
    /// Opens a sealed file; with `seal`, every write seals.
    codec: Option<std::sync::Arc<dyn FileCodec>>,
    seal: bool,
}

impl KeyStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            codec: None,
            seal: false,
        }
    }

    /// Open sealed files with `codec`; when `seal_writes`, every write seals
    /// the file (so a plain file is migrated by its next change).
    pub fn with_codec(mut self, codec: std::sync::Arc<dyn FileCodec>, seal_writes: bool) -> Self {
        self.codec = Some(codec);
        self.seal = seal_writes;
        self
    }

    /// Rewrite the file under the current key (a fresh data key wrapped by
    /// the keyring's current KEK): `moat keys encrypt`, and after
    /// `rotate-kek`. Needs a codec and `seal_writes`.
    pub fn reseal(&self) -> Result<usize, KeyError> {
        if self.codec.is_none() || !self.seal {
            return Err(KeyError::Invalid(
                "sealing the keys file needs the keyring ([encryption] keyring)".into(),
            ));
        }
        self.update(|keys| Ok(keys.len()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl FnOnce(io::Error) -> KeyError + '_ {
        |source| KeyError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// All records; a missing file is an empty set.
    pub fn records(&self) -> Result<Vec<KeyRecord>, KeyError> {
        let mut text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io()(e)),
        };
        if text.starts_with(SEALED_MAGIC) {
            let codec = self.codec.as_ref().ok_or_else(|| KeyError::Format {
                path: self.path.clone(),
                message: "the file is encrypted; set [encryption] keyring (or --keyring) to open it".into(),
            })?;
            text = codec.open(&text).map_err(|message| KeyError::Format {
                path: self.path.clone(),
                message: format!("cannot decrypt: {message}"),
            })?;
        }
        let file: KeyFile = serde_json::from_slice(&text).map_err(|e| KeyError::Format {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        if file.version != FILE_VERSION {
            return Err(KeyError::Format {
                path: self.path.clone(),
                message: format!(
                    "version {} is not supported (expected {FILE_VERSION})",
                    file.version
                ),
            });
        }
        Ok(file.keys)
    }

    /// Load into the form the server checks requests against.
    pub fn keyring(&self) -> Result<Keyring, KeyError> {
        Ok(Keyring::new(self.records()?))
    }

    /// Read-modify-write under an exclusive advisory lock.
    fn update<T>(&self, f: impl FnOnce(&mut Vec<KeyRecord>) -> Result<T, KeyError>) -> Result<T, KeyError> {
        let _lock = moat_fs::lock_for(&self.path).map_err(self.io())?;
        let mut keys = self.records()?;
        let out = f(&mut keys)?;
        let mut body = serde_json::to_vec_pretty(&KeyFile {
            version: FILE_VERSION,
            keys,
        })
        .map_err(|e| KeyError::Invalid(e.to_string()))?;
        body.push(b'\n');
        if let Some(codec) = self.codec.as_ref().filter(|_| self.seal) {
            body = codec.seal(&body).map_err(|message| KeyError::Format {
                path: self.path.clone(),
                message: format!("cannot encrypt: {message}"),
            })?;
        }
        moat_fs::write_atomic(&self.path, &body).map_err(self.io())?;
        Ok(out)
    }

    pub fn create(&self, role: Role, models: Vec<String>, ttl_secs: Option<u64>) -> Result<NewKey, KeyError> {
        self.create_with(role, models, ttl_secs, None)
    }

    /// Creates a key with its own limits in one write of the file, so no
    /// moment exists where the key works without them.
    pub fn create_with(
        &self,
        role: Role,
        models: Vec<String>,
        ttl_secs: Option<u64>,
        limits: Option<crate::limits::KeyLimits>,
    ) -> Result<NewKey, KeyError> {
        if let Some(l) = &limits {
            l.validate().map_err(KeyError::Invalid)?;
        }
        let limits = limits.filter(|l| !l.is_empty());
        let id = random_hex(ID_BYTES)?;
        let secret = random_hex(SECRET_BYTES)?;
        let created = now_unix();
        let record = KeyRecord {
            id: id.clone(),
            role,
            models,
            created,
            expires: ttl_secs.map(|t| created.saturating_add(t)),
            revoked: None,
            secret_sha256: secret_hash(&secret),
            limits,
        };
        let rec = record.clone();
        self.update(move |keys| {
            keys.push(rec);
            Ok(())
        })?;
        Ok(NewKey {
            record,
            secret: format!("{PREFIX}{id}_{secret}"),
        })
    }

    pub fn revoke(&self, id: &str) -> Result<KeyRecord, KeyError> {
        self.update(|keys| {
            let rec = keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
            if rec.revoked.is_none() {
                rec.revoked = Some(now_unix());
            }
            Ok(rec.clone())
        })
    }

    /// Sets (or, with `None`, clears) a key's own limits. Values are
    /// checked first so that the file never holds a limit no request
    /// could pass.
    pub fn set_limits(
        &self,
        id: &str,
        limits: Option<crate::limits::KeyLimits>,
    ) -> Result<KeyRecord, KeyError> {
        if let Some(l) = &limits {
            l.validate().map_err(KeyError::Invalid)?;
        }
        let limits = limits.filter(|l| !l.is_empty());
        self.update(|keys| {
            let rec = keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
            rec.limits = limits;
            Ok(rec.clone())
        })
    }
}

/// Why a request's credentials were not accepted. Messages never echo the
/// presented secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("API key {0} has been revoked")]
    Revoked(String),
    #[error("API key {0} has expired")]
    Expired(String),
}

/// An authenticated caller.
/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    ApiKey,
    Jwt,
    Mtls,
}

/// Who is calling, whatever the credential: an API key, a JWT subject or a
/// client certificate. `key_id` is the stable name used in logs, audit
/// records and rate-limit keys (the key's public id, `jwt:ISSUER#SUB`, or
/// `mtls:NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
    pub kind: PrincipalKind,
    /// `None`: every model; `Some(list)`: only these (possibly none).
    models: Option<Vec<String>>,
    /// When the credential stops working (Unix seconds), when known: keys
    /// it creates may not outlive it.
    pub expires: Option<u64>,
}

impl Principal {
    /// A principal from a credential other than an API key.
    pub fn new(kind: PrincipalKind, id: String, role: Role, models: Option<Vec<String>>) -> Self {
        Principal {
            key_id: id,
            role,
            kind,
            models,
            expires: None,
        }
    }

    /// The credential's expiry (Unix seconds).
    pub fn with_expiry(mut self, expires: Option<u64>) -> Self {
        self.expires = expires;
        self
    }

    /// The model scope: `None` for every model.
    pub fn models(&self) -> Option<&[String]> {
        self.models.as_deref()
    }

    pub fn may_use_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|list| list.iter().any(|m| m == model))
    }
    pub fn is_admin(&self) -> bool {
        self.role.is_admin()
    }
}

/// Keys indexed by public id, as loaded by a server.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    by_id: HashMap<String, KeyRecord>,
}

impl Keyring {
    pub fn new(records: Vec<KeyRecord>) -> Self {
        Self {
            by_id: records.into_iter().map(|r| (r.id.clone(), r)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Check an `Authorization` header value (`Bearer <key>`) at time `now`.
    pub fn authenticate(&self, authorization: Option<&str>, now: u64) -> Result<Principal, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid);
        }
        let (id, secret) = token
            .trim()
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .ok_or(AuthError::Invalid)?;
        let rec = self.by_id.get(id).ok_or(AuthError::Invalid)?;
        let presented = secret_hash(secret);
        if !bool::from(presented.as_bytes().ct_eq(rec.secret_sha256.as_bytes())) {
            return Err(AuthError::Invalid);
        }
        // Only a caller holding the real secret learns the key's state.
        if rec.revoked.is_some() {
            return Err(AuthError::Revoked(rec.id.clone()));
        }
        if rec.expires.is_some_and(|e| now >= e) {
            return Err(AuthError::Expired(rec.id.clone()));
        }
        Ok(Principal {
            key_id: rec.id.clone(),
            role: rec.role.clone(),
            kind: PrincipalKind::ApiKey,
            // An empty list in the keys file means every model.
            models: (!rec.models.is_empty()).then(|| rec.models.clone()),
            expires: rec.expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_authenticate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("keys.json"));
        let k = store.create(Role::user(), vec!["demo".into()], None).unwrap();
        assert!(k.secret.starts_with("moat_"));
        let text = fs::read_to_string(store.path()).unwrap();
        let secret_part = k.secret.rsplit('_').next().unwrap();
        assert!(!text.contains(secret_part), "plaintext secret stored");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(store.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let ring = store.keyring().unwrap();
        let header = format!("Bearer {}", k.secret);
        let p = ring.authenticate(Some(&header), now_unix()).unwrap();
        assert_eq!(p.role, Role::user());
        assert!(p.may_use_model("demo"));
        assert!(!p.may_use_model("other"));

        // Change the last hex digit (to one it is not).
        let last = if k.secret.ends_with('0') { '1' } else { '0' };
        let wrong = format!("Bearer {}{last}", &k.secret[..k.secret.len() - 1]);
        assert_eq!(
            ring.authenticate(Some(&wrong), now_unix()),
            Err(AuthError::Invalid)
        );
        assert_eq!(ring.authenticate(None, now_unix()), Err(AuthError::Missing));
        assert_eq!(
            ring.authenticate(Some("Basic abc"), now_unix()),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            ring.authenticate(Some("Bearer moat_x"), now_unix()),
            Err(AuthError::Invalid)
        );

        store.revoke(&k.record.id).unwrap();
        let ring = store.keyring().unwrap();
        assert_eq!(
            ring.authenticate(Some(&header), now_unix()),
            Err(AuthError::Revoked(k.record.id.clone()))
        );
        assert!(matches!(store.revoke("nope"), Err(KeyError::NotFound(_))));
    }

    #[test]
    fn expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("keys.json"));
        let k = store.create(Role::admin(), vec![], Some(60)).unwrap();
        let ring = store.keyring().unwrap();
        let header = format!("Bearer {}", k.secret);
        let created = k.record.created;
        assert!(ring.authenticate(Some(&header), created + 59).is_ok());
        assert_eq!(
            ring.authenticate(Some(&header), created + 60),
            Err(AuthError::Expired(k.record.id))
        );
    }

    #[test]
    fn role_names_are_checked() {
        for ok in [
            "admin",
            "user",
            "ops",
            "a",
            "sre-oncall",
            "team_2",
            &format!("a{}", "b".repeat(31)),
        ] {
            assert_eq!(Role::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "Ops",
            "2ops",
            "-ops",
            "_x",
            "ops!",
            "o ps",
            "ops.",
            "é",
            &"a".repeat(33),
        ] {
            let e = Role::new(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("lower-case"),
                "{bad}: {e}"
            );
        }
        // The built-ins are shared, not allocated per use.
        assert!(Arc::ptr_eq(&Role::new("admin").unwrap().0, &Role::admin().0));
        assert!(Role::admin().is_admin() && !Role::new("ops").unwrap().is_admin());
    }

    #[test]
    fn roles_in_the_keys_file_are_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        // A file written before custom roles existed reads unchanged.
        fs::write(
            &path,
            r#"{"version":1,"keys":[{"id":"00","role":"admin","created":1,"secret_sha256":"x"},
                {"id":"01","role":"user","created":1,"secret_sha256":"x"}]}"#,
        )
        .unwrap();
        let store = KeyStore::new(&path);
        let roles: Vec<Role> = store.records().unwrap().into_iter().map(|r| r.role).collect();
        assert_eq!(roles, [Role::admin(), Role::user()]);
        let ops = Role::new("ops").unwrap();
        let k = store.create(ops.clone(), vec![], None).unwrap();
        assert!(fs::read_to_string(&path).unwrap().contains(r#""role": "ops""#));
        let ring = store.keyring().unwrap();
        let p = ring
            .authenticate(Some(&format!("Bearer {}", k.secret)), now_unix())
            .unwrap();
        assert_eq!(p.role, ops);
        // A name no config could define is a format error naming the file.
        fs::write(
            &path,
            r#"{"version":1,"keys":[{"id":"00","role":"Root!","created":1,"secret_sha256":"x"}]}"#,
        )
        .unwrap();
        let e = store.records().unwrap_err().to_string();
        assert!(e.contains("keys.json") && e.contains("\"Root!\""), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("90m").unwrap(), 5400);
        for bad in ["", "d", "5", "5w", "-1d", "0d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// A stand-in for the real envelope (moat-artifact's AES-256-GCM, tested
    /// end to end in crates/moat/tests/crypto_keys.rs): magic + XOR, enough
    /// to show which path seals and which opens.
    #[derive(Debug)]
    struct XorCodec;

    impl FileCodec for XorCodec {
        fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
            let mut out = SEALED_MAGIC.to_vec();
            out.extend(plain.iter().map(|b| b ^ 0x5a));
            Ok(out)
        }
        fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
            let body = sealed.strip_prefix(SEALED_MAGIC).ok_or("no magic")?;
            Ok(body.iter().map(|b| b ^ 0x5a).collect())
        }
    }

    #[test]
    fn plain_file_is_sealed_on_next_write_and_needs_the_codec_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let plain = KeyStore::new(&path);
        let k1 = plain.create(Role::user(), vec![], None).unwrap();
        assert!(!is_sealed(&path).unwrap());

        // Reading through a codec that does not seal leaves the file plain.
        let codec: std::sync::Arc<dyn FileCodec> = std::sync::Arc::new(XorCodec);
        let reader = KeyStore::new(&path).with_codec(codec.clone(), false);
        assert_eq!(reader.records().unwrap().len(), 1);
        assert!(reader.reseal().is_err(), "sealing needs seal_writes");

        let sealing = KeyStore::new(&path).with_codec(codec, true);
        let k2 = sealing.create(Role::admin(), vec![], None).unwrap();
        assert!(is_sealed(&path).unwrap());
        let raw = fs::read(&path).unwrap();
        assert!(
            !raw.windows(16).any(|w| w == k1.record.id.as_bytes()),
            "ids are not in clear"
        );
        let ids: Vec<String> = sealing.records().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![k1.record.id.clone(), k2.record.id.clone()]);

        // Without the codec a sealed file is a clear error, not an empty set.
        let err = plain.records().unwrap_err().to_string();
        assert!(err.contains("encrypted") && err.contains("keys.json"), "{err}");
        assert_eq!(sealing.reseal().unwrap(), 2);
    }
}
