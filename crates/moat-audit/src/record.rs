//! The audit record, its line format, and the chain arithmetic (hash and
//! HMAC), kept in one place so that the writer and the verifier cannot
//! disagree about the bytes.
//!
//! # Line format
//!
//! A log is UTF-8 JSON lines, one record per line, each line ending in `\n`.
//! The writer serializes [`AuditRecord`] compactly (no whitespace, fields in
//! the declaration order below, absent `checkpoint` omitted, other absent
//! values written as `null`) and the `mac` member is always the last one:
//!
//! ```text
//! {"seq":7,"time":"…",…,"key_version":1,"prev":"<64 hex>","mac":"<64 hex>"}\n
//! ```
//!
//! # Canonical bytes
//!
//! The canonical bytes of a record are its line as written, without the
//! trailing `\n` and without its final `,"mac":"<64 lowercase hex>"` member;
//! that is, the line minus its last 75 bytes (`,"mac":"` + 64 hex + `"}\n`)
//! followed by one `}`. They are defined on bytes, not on a re-serialization,
//! so a verifier in any language needs no JSON canonicalization: strip the
//! suffix, append `}`, hash. The writer produces exactly these bytes by
//! serializing the record with `mac` absent.
//!
//! - `mac` = lowercase hex of HMAC-SHA256(key, canonical bytes), where key is
//!   the 32-byte audit key of version `key_version`.
//! - `prev` = lowercase hex of SHA-256(canonical bytes of the previous record
//!   in the chain); [`GENESIS_PREV`] (64 zeros) for the first record of a new
//!   log, whose `seq` is 1. `seq` grows by exactly one per record.
//!
//! Because `prev` covers the previous record's `prev`, every record commits to
//! the whole history before it; because of the `mac`, nobody without the key
//! can write a record that verifies.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev` of the first record of a brand-new log.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bytes after the canonical prefix of a line: `,"mac":"` + 64 hex + `"}`.
const MAC_PREFIX: &[u8] = b",\"mac\":\"";
const MAC_SUFFIX_LEN: usize = MAC_PREFIX.len() + 64 + 2;

/// Action names used by moat. The set is open (a record may carry any
/// dotted name); these are the ones the server and CLI write.
pub mod action {
    pub const INFERENCE_CHAT: &str = "inference.chat";
    pub const INFERENCE_COMPLETION: &str = "inference.completion";
    pub const INFERENCE_MODELS: &str = "inference.models";
    pub const AUTH_REJECT: &str = "auth.reject";
    pub const MODEL_PULL: &str = "model.pull";
    pub const MODEL_VERIFY: &str = "model.verify";
    pub const MODEL_SCAN: &str = "model.scan";
    pub const MODEL_LOAD: &str = "model.load";
    pub const MODEL_UNLOAD: &str = "model.unload";
    pub const MODEL_REFUSE: &str = "model.refuse";
    pub const KEY_CREATE: &str = "key.create";
    pub const KEY_REVOKE: &str = "key.revoke";
    /// `moat keys encrypt`: the API-key file sealed under the keyring.
    pub const KEYS_ENCRYPT: &str = "keys.encrypt";
    /// `moat keys rotate-kek`: a new KEK version is current.
    pub const KEK_ROTATE: &str = "kek.rotate";
    /// `moat keys retire-kek`: a KEK version can no longer unwrap.
    pub const KEK_RETIRE: &str = "kek.retire";
    /// `moat keys rewrap`: data keys moved to the current KEK version.
    pub const KEK_REWRAP: &str = "kek.rewrap";
    /// `moat audit show-capture`: an admin decrypted a captured exchange.
    pub const CAPTURE_READ: &str = "capture.read";
    pub const TOTP_ENROL: &str = "totp.enrol";
    pub const CONFIG_RELOAD: &str = "config.reload";
    pub const SERVER_START: &str = "server.start";
    pub const SERVER_STOP: &str = "server.stop";
    /// Written by the log itself every `checkpoint_every` records.
    pub const CHECKPOINT: &str = "checkpoint";
    /// Written by the log itself, first in the next batch that succeeds,
    /// after records could not be written: the gap in events is itself on
    /// the chain.
    pub const AUDIT_WRITE_FAILED: &str = "audit.write_failed";
    /// Written by the log itself when it opened a file whose last line was
    /// incomplete (a crash between write and fsync) and cut that line off.
    pub const AUDIT_REPAIR: &str = "audit.repair";
}

/// What became of the action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A request decision: let through.
    Allowed,
    /// A request decision: refused (see `stage` and `reason`).
    Denied,
    /// An operation that succeeded.
    #[default]
    Ok,
    /// An operation that failed.
    Error,
}

/// A checkpoint restates the chain position so it can be shipped and
/// compared on its own: `records` is the number of records before it in the
/// chain (its `seq` − 1) and `head` equals its `prev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub records: u64,
    pub head: String,
}

/// One audit record. The caller fills the event fields; `seq`, `prev`,
/// `key_version` and `mac` are set by [`crate::AuditLog`] when the record is
/// written (values given are overwritten), and `time` is set then too when
/// left empty.
///
/// The declaration order is the JSON field order (see the module comment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds (when the event happened).
    pub time: String,
    pub request_id: Option<String>,
    /// Who: the API key id, or the token subject; `None` when unauthenticated.
    pub principal: Option<String>,
    /// What: see [`action`].
    pub action: String,
    /// On what: a model name, key id, route or config path.
    pub resource: Option<String>,
    pub outcome: Outcome,
    /// Why, for denials and errors: a stable error code or short message.
    pub reason: Option<String>,
    /// For denials: the middleware stage that refused (`network`, `limits`,
    /// `auth`, `authz`, `ratelimit`, …).
    pub stage: Option<String>,
    pub model: Option<String>,
    /// Digest of the model served (e.g. the lock's `sha256:…`).
    pub model_digest: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Client socket address (`ip:port`).
    pub client_addr: Option<String>,
    /// [`prompt_hmac`] of the prompt; the prompt itself is never stored here.
    pub prompt_hmac: Option<String>,
    /// Id of the encrypted prompt/response capture of this request
    /// (`[audit] capture = true`; `moat audit show-capture ID`). Omitted
    /// when there is none, so logs without capture keep their line format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    pub key_version: u32,
    pub prev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl AuditRecord {
    /// A record of `action` with `outcome`, time now, other fields empty.
    pub fn new(action: &str, outcome: Outcome) -> Self {
        Self {
            time: crate::now_rfc3339(),
            action: action.to_owned(),
            outcome,
            ..Self::default()
        }
    }
}

/// Keyed hash of a prompt: lowercase hex HMAC-SHA256(key, prompt bytes).
/// Equal prompts give equal values under one key, so an auditor holding the
/// key can check whether a given prompt was sent, but the log never holds
/// the prompt. [`crate::AuditKeys::prompt_hmac`] uses a key derived from the
/// current audit key, kept apart from the chain MAC key.
pub fn prompt_hmac(key: &[u8; 32], prompt: &str) -> String {
    hex::encode(hmac(key, &[prompt.as_bytes()]))
}

pub(crate) fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC pads a key shorter than the block to the block size with zeros
    // (RFC 2104), so this is HMAC under the 32-byte key, without the
    // fallible variable-length constructor.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Append `rec` (whose `mac` must be `None`) to `out` as one complete line,
/// MAC'd under `key`; returns the SHA-256 of its canonical bytes (the next
/// record's `prev`).
pub(crate) fn encode_line(
    rec: &AuditRecord,
    key: &[u8; 32],
    out: &mut Vec<u8>,
) -> Result<[u8; 32], serde_json::Error> {
    let start = out.len();
    serde_json::to_writer(&mut *out, rec)?;
    let canonical = &out[start..];
    let hash = sha256(&[canonical]);
    let mac = hmac(key, &[canonical]);
    let mut mac_hex = [0u8; 64];
    // Cannot fail: the buffer is exactly twice the input.
    let _ = hex::encode_to_slice(mac, &mut mac_hex);
    out.pop(); // the closing '}' of the canonical bytes
    out.extend_from_slice(MAC_PREFIX);
    out.extend_from_slice(&mac_hex);
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
}

/// A line split into its canonical bytes and its MAC.
pub(crate) struct SplitLine {
    pub canonical: Vec<u8>,
    pub mac: [u8; 32],
}

/// Split one line (without its `\n`) per the module comment. `None` when
/// the line does not end in a well-formed `mac` member.
pub(crate) fn split_line(line: &[u8]) -> Option<SplitLine> {
    let n = line.len();
    if n < MAC_SUFFIX_LEN + 1 || !line.ends_with(b"\"}") {
        return None;
    }
    let at = n - MAC_SUFFIX_LEN;
    if &line[at..at + MAC_PREFIX.len()] != MAC_PREFIX {
        return None;
    }
    let hex_part = &line[at + MAC_PREFIX.len()..n - 2];
    if !hex_part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut mac = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut mac).ok()?;
    let mut canonical = Vec::with_capacity(at + 1);
    canonical.extend_from_slice(&line[..at]);
    canonical.push(b'}');
    Some(SplitLine { canonical, mac })
}

/// Why a line is not a well-formed record (before any key or chain check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineProblem {
    NoMac,
    NotRecord(String),
}

/// Parse a line (without `\n`) into its record (with `mac` absent), its
/// canonical bytes and MAC.
pub(crate) fn parse_line(line: &[u8]) -> Result<(AuditRecord, SplitLine), LineProblem> {
    let split = split_line(line).ok_or(LineProblem::NoMac)?;
    let rec: AuditRecord =
        serde_json::from_slice(&split.canonical).map_err(|e| LineProblem::NotRecord(e.to_string()))?;
    if rec.mac.is_some() {
        return Err(LineProblem::NotRecord("a second mac field".into()));
    }
    Ok((rec, split))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_is_canonical_bytes_plus_mac_and_round_trips() {
        let key = [7u8; 32];
        let mut rec = AuditRecord::new(action::INFERENCE_CHAT, Outcome::Allowed);
        rec.seq = 1;
        rec.prev = GENESIS_PREV.into();
        rec.key_version = 1;
        rec.principal = Some("k1".into());
        let mut out = Vec::new();
        let hash = encode_line(&rec, &key, &mut out).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[..out.len() - 1];
        let canonical = serde_json::to_vec(&rec).unwrap();
        assert_eq!(&line[..canonical.len() - 1], &canonical[..canonical.len() - 1]);
        let (back, split) = parse_line(line).unwrap();
        assert_eq!(back, rec);
        assert_eq!(split.canonical, canonical);
        assert_eq!(split.mac, hmac(&key, &[&canonical]));
        assert_eq!(hash, sha256(&[&canonical]));
        // The field order is the documented one: seq first, mac last.
        let text = std::str::from_utf8(line).unwrap();
        assert!(text.starts_with("{\"seq\":1,\"time\":\""), "{text}");
        assert!(text.contains("\"key_version\":1,\"prev\":\"0000"), "{text}");
        assert!(!text.contains("checkpoint"), "{text}");
    }

    #[test]
    fn hmac_matches_an_independent_implementation() {
        // HMAC-SHA256 with a 32-byte key, computed independently with
        // Python: hmac.new(bytes(range(32)), b"hello", "sha256").hexdigest()
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            prompt_hmac(&key, "hello"),
            "53c40272a70c15ca4ee0af4df1f155fd6c41e00ce2307d8987ecd4bb36a7e990"
        );
    }

    #[test]
    fn malformed_lines_are_refused() {
        assert_eq!(parse_line(b"").err(), Some(LineProblem::NoMac));
        assert_eq!(parse_line(b"{\"seq\":1}").err(), Some(LineProblem::NoMac));
        let upper = format!("{{\"seq\":1,\"mac\":\"{}\"}}", "A".repeat(64));
        assert_eq!(parse_line(upper.as_bytes()).err(), Some(LineProblem::NoMac));
        let not_record = format!("{{\"seq\":1,\"mac\":\"{}\"}}", "a".repeat(64));
        assert!(matches!(
            parse_line(not_record.as_bytes()),
            Err(LineProblem::NotRecord(_))
        ));
    }
}
