//! Request records: one JSON line per request (request id, key id, model,
//! status, token counts, latency), written to stdout, stderr or a file for a
//! log shipper to pick up. A write that fails is never dropped silently: it
//! is counted ([`RequestLog::failures`]) and reported on stderr.
//!
//! This is the operational access log. The tamper-evident audit trail is
//! [`crate::AuditLog`]; the two are separate so that the access log stays
//! cheap and the audit log can be made durable and fail closed.

use serde::Serialize;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub request_id: String,
    /// Public id of the API key; never the secret. `None` when the request
    /// was not authenticated.
    pub key_id: Option<String>,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: f64,
    /// Error code for rejected requests (e.g. `invalid_api_key`).
    pub error: Option<String>,
}

/// Where request records go.
pub struct RequestLog {
    out: Mutex<Box<dyn Write + Send>>,
    failures: AtomicU64,
}

impl RequestLog {
    pub fn stdout() -> Self {
        Self::to_writer(Box::new(io::stdout()))
    }

    pub fn stderr() -> Self {
        Self::to_writer(Box::new(io::stderr()))
    }

    /// Append to a file (created 0600 if missing).
    pub fn file(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self::to_writer(Box::new(f)))
    }

    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
            failures: AtomicU64::new(0),
        }
    }

    /// Write one record as one line. On failure the error is counted,
    /// reported and returned.
    pub fn record(&self, rec: &RequestRecord) -> io::Result<()> {
        let result = (|| {
            let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
            line.push(b'\n');
            let mut out = self
                .out
                .lock()
                .map_err(|_| io::Error::other("request log writer poisoned"))?;
            // One write_all per line so concurrent records never interleave.
            out.write_all(&line)?;
            out.flush()
        })();
        if let Err(e) = &result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, request_id = %rec.request_id, "request record could not be written");
        }
        result
    }

    /// Records that could not be written since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_json_line_per_record() {
        let buf = Shared::default();
        let log = RequestLog::to_writer(Box::new(buf.clone()));
        let rec = RequestRecord {
            request_id: "r1".into(),
            status: 200,
            completion_tokens: 5,
            ..Default::default()
        };
        log.record(&rec).unwrap();
        log.record(&rec).unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["request_id"], "r1");
        assert_eq!(v["completion_tokens"], 5);
        assert_eq!(v["key_id"], serde_json::Value::Null);
    }

    #[test]
    fn failures_are_counted_not_dropped_silently() {
        let log = RequestLog::to_writer(Box::new(Broken));
        assert!(log.record(&RequestRecord::default()).is_err());
        assert_eq!(log.failures(), 1);
    }
}
