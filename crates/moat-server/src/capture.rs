//! Prompt/response capture for compliance archives (`[audit] capture =
//! true`, off by default).
//!
//! Each captured exchange is one file `<capture_dir>/<request id>.moatenc`:
//! a JSON document (request id, time, principal, model, the messages, the
//! answer) sealed as its own envelope under the keyring (fresh data key,
//! wrapped by the current KEK), written 0600 and fsynced. The plaintext
//! exists only in memory. The request's audit record carries the id in its
//! `capture` field, so the chain proves which captures belong to which
//! decision; `moat audit show-capture ID` decrypts one (and is itself
//! audited). A capture can be rewrapped (`moat keys rewrap FILE`) and is
//! refused once the KEK that wraps it is retired, like every envelope.

use moat_artifact::crypto::{self, Keyring};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// File suffix of a capture.
pub const SUFFIX: &str = "moatenc";

/// What one capture holds (the plaintext inside the envelope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRecord {
    pub request_id: String,
    /// RFC 3339, when the exchange finished.
    pub time: String,
    pub principal: Option<String>,
    pub model: String,
    /// The messages as `[role, content]` pairs, as the prompt HMAC covers them.
    pub prompt: Vec<[String; 2]>,
    pub response: String,
    #[serde(default)]
    pub reasoning: String,
    /// `stop`, `length`, or why the exchange ended early.
    pub finish: String,
}

/// The capture writer of a running server.
#[derive(Debug)]
pub struct Capture {
    dir: PathBuf,
    keyring: Keyring,
}

/// A capture id is a request id: hex only, so it can never steer a path.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{id:?} is not a capture id (the hex request id of an audit record)"
        ));
    }
    Ok(())
}

/// `<dir>/<id>.moatenc`.
pub fn capture_path(dir: &Path, id: &str) -> Result<PathBuf, String> {
    check_id(id)?;
    Ok(dir.join(format!("{id}.{SUFFIX}")))
}

impl Capture {
    /// Create the folder (0700) if needed.
    pub fn open(dir: PathBuf, keyring: Keyring) -> Result<Self, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self { dir, keyring })
    }

    /// Seal and write one capture durably. Blocking (fsync, and a KMS call
    /// when the current KEK lives in KMS).
    pub fn write(&self, rec: &CaptureRecord) -> Result<PathBuf, String> {
        let path = capture_path(&self.dir, &rec.request_id)?;
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(rec).map_err(|e| e.to_string())?);
        let sealed = crypto::seal(&self.keyring, &plain).map_err(|e| e.to_string())?;
        let io_err = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        f.write_all(&sealed).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        Ok(path)
    }
}

/// Decrypt the capture `id` in `dir` (`moat audit show-capture`).
pub fn read(dir: &Path, keyring: &Keyring, id: &str) -> Result<CaptureRecord, String> {
    let path = capture_path(dir, id)?;
    let sealed = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let plain = zeroize::Zeroizing::new(
        crypto::open(keyring, &sealed).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    serde_json::from_slice(&plain).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    // Tests: a failed step must abort loudly.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use moat_artifact::crypto::{KeyringFile, NewKek};

    #[test]
    fn capture_round_trip_never_plaintext_and_ids_cannot_escape() {
        let t = tempfile::tempdir().unwrap();
        let ring = KeyringFile::new(t.path().join("keyring.json"));
        ring.rotate(NewKek::Local).unwrap();
        let cap = Capture::open(t.path().join("cap"), ring.load().unwrap()).unwrap();
        let rec = CaptureRecord {
            request_id: "00ff00ff00ff".into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            principal: Some("abc".into()),
            model: "demo".into(),
            prompt: vec![["user".into(), "the secret prompt".into()]],
            response: "the secret answer".into(),
            reasoning: String::new(),
            finish: "stop".into(),
        };
        let path = cap.write(&rec).unwrap();
        let raw = fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains("secret"), "plaintext on disk");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            read(&t.path().join("cap"), &ring.load().unwrap(), "00ff00ff00ff").unwrap(),
            rec
        );
        // Written once: a second capture under the same id is refused.
        assert!(cap.write(&rec).is_err());
        for bad in ["../keys", "", "zz", "a/b"] {
            assert!(capture_path(t.path(), bad).is_err(), "{bad}");
        }
        ring.rotate(NewKek::Local).unwrap();
        ring.retire(1, false).unwrap();
        let err = read(&t.path().join("cap"), &ring.load().unwrap(), "00ff00ff00ff").unwrap_err();
        assert!(err.contains("KEK version 1 is retired"), "{err}");
    }
}
