//! moat's audit trail: who did what, provably unedited.
//!
//! - [`AuditLog`] chains [`AuditRecord`]s (each carries the hash of the one
//!   before it and an HMAC under a versioned [`AuditKeys`] key), writes them
//!   as JSON lines to a [`FileSink`] (size-rotated) and/or stdout, and makes
//!   them durable with group commit, so that a fail-closed server can wait
//!   for its record on every request. See `log.rs` for the failure rules.
//! - [`verify`] checks a set of files and names the first bad record.
//! - The line format and the canonical bytes the hash and MAC cover are
//!   specified in `record.rs`, precisely enough to verify a log without
//!   this crate.
//!
//! [`RequestLog`] is the separate, cheap per-request access log.

mod keys;
mod log;
mod record;
mod request;
mod sink;
mod time;
mod verify;

pub use keys::{AuditKeys, KEY_LEN, KeysError};
pub use log::{AuditError, AuditLog, AuditOptions, AuditStats};
pub use record::{AuditRecord, Checkpoint, GENESIS_PREV, Outcome, action, prompt_hmac};
pub use request::{RequestLog, RequestRecord};
pub use sink::{FileSink, Sink, Tail, WriterSink, rotated_files, rotated_name};
pub use time::{now_rfc3339, rfc3339_millis};
pub use verify::{
    ChainError, FileSummary, MAX_LINE, Problem, VerifyError, VerifyOptions, VerifySummary, verify,
    verify_with,
};
