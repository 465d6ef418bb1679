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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

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
///
/// Records are serialised on the caller's thread into a shared buffer and
/// written by one writer thread, a batch at a time: the request path never
/// makes a write syscall or waits on the output (a pipe to a slow log
/// shipper, a full disk) unless the buffer is full. Measured on the proxy
/// path (bench/guard.sh): one `write(2)` per request cost about a tenth of
/// the guard's throughput. A record reaches the output within
/// [`BATCH_WINDOW`] of its request ending; [`RequestLog::flush`] (called at
/// shutdown, and on drop) waits until everything recorded is written.
pub struct RequestLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How long the writer gathers records after the first of a batch: under
/// load many requests share one write; an idle server's record is out
/// after this long at most.
pub const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Above this many buffered bytes, recording waits for the writer (the
/// same backpressure a synchronous write gave, without unbounded memory).
const MAX_BUFFERED: usize = 8 << 20;

struct Shared {
    state: Mutex<Buffer>,
    /// Signalled when the buffer becomes non-empty or the log closes.
    ready: Condvar,
    /// Signalled after each batch is written (room, and flush progress).
    written: Condvar,
    failures: AtomicU64,
}

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    lines: u64,
    /// Lines handed to the output so far, written or failed.
    done: u64,
    /// Lines accepted so far.
    accepted: u64,
    closed: bool,
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
        let shared = Arc::new(Shared {
            state: Mutex::new(Buffer::default()),
            ready: Condvar::new(),
            written: Condvar::new(),
            failures: AtomicU64::new(0),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("moat-request-log".into())
            .spawn(move || write_loop(&s, out));
        let writer = match writer {
            Ok(h) => Some(h),
            Err(e) => {
                // No thread: records are refused (and counted) rather than
                // buffered forever.
                tracing::error!(error = %e, "request log: cannot start its writer thread");
                lock(&shared.state).closed = true;
                None
            }
        };
        Self {
            shared,
            writer: Mutex::new(writer),
        }
    }

    /// Queue one record as one line. A record that cannot be queued (the
    /// log is closed) is counted, reported and returned as an error; write
    /// errors are counted and reported by the writer.
    pub fn record(&self, rec: &RequestRecord) -> io::Result<()> {
        let result = (|| {
            let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
            line.push(b'\n');
            let mut b = lock(&self.shared.state);
            while b.bytes.len() >= MAX_BUFFERED && !b.closed {
                b = self
                    .shared
                    .written
                    .wait(b)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if b.closed {
                return Err(io::Error::other("request log is closed"));
            }
            let was_empty = b.bytes.is_empty();
            b.bytes.extend_from_slice(&line);
            b.lines += 1;
            b.accepted += 1;
            drop(b);
            if was_empty {
                self.shared.ready.notify_one();
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, request_id = %rec.request_id, "request record could not be written");
        }
        result
    }

    /// Wait until every record queued before this call has been handed to
    /// the output (written, or counted as failed).
    pub fn flush(&self) {
        let mut b = lock(&self.shared.state);
        let target = b.accepted;
        self.shared.ready.notify_one();
        while b.done < target && !(b.closed && b.bytes.is_empty()) {
            b = self
                .shared
                .written
                .wait(b)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Records that could not be written since start.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }
}

impl Drop for RequestLog {
    /// Everything recorded is written before the log goes away.
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.ready.notify_one();
        let handle = match self.writer.get_mut() {
            Ok(h) => h.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn lock(m: &Mutex<Buffer>) -> std::sync::MutexGuard<'_, Buffer> {
    // A panic while holding the lock leaves whole lines only (each append
    // is one extend): the buffer is still good to write.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writer thread: wait for a first record, give the batch
/// [`BATCH_WINDOW`] to grow, write it in one call, repeat; on close, write
/// what is left and stop.
fn write_loop(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    loop {
        let mut b = lock(&shared.state);
        while b.bytes.is_empty() && !b.closed {
            b = shared.ready.wait(b).unwrap_or_else(PoisonError::into_inner);
        }
        if b.bytes.is_empty() && b.closed {
            return;
        }
        if !b.closed {
            // Let the batch grow; a flush or close cuts the wait short.
            b = shared
                .ready
                .wait_timeout(b, BATCH_WINDOW)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::swap(&mut batch, &mut b.bytes);
        let lines = std::mem::take(&mut b.lines);
        drop(b);
        let result = out.write_all(&batch).and_then(|()| out.flush());
        if let Err(e) = result {
            shared.failures.fetch_add(lines, Ordering::Relaxed);
            tracing::error!(error = %e, records = lines, "request records could not be written");
        }
        batch.clear();
        let mut b = lock(&shared.state);
        b.done += lines;
        drop(b);
        shared.written.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        log.flush();
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
        log.record(&RequestRecord::default()).unwrap();
        log.record(&RequestRecord::default()).unwrap();
        log.flush();
        assert_eq!(log.failures(), 2);
    }

    #[test]
    fn concurrent_records_are_whole_lines_and_drop_writes_them_all() {
        let buf = Shared::default();
        let log = Arc::new(RequestLog::to_writer(Box::new(buf.clone())));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let rec = RequestRecord {
                            request_id: format!("t{t}-{i}"),
                            ..Default::default()
                        };
                        log.record(&rec).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(Arc::into_inner(log).unwrap());
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let mut ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string())
            .collect();
        assert_eq!(ids.len(), 4000);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4000);
    }

    #[test]
    fn a_record_is_written_without_a_flush() {
        let buf = Shared::default();
        let log = RequestLog::to_writer(Box::new(buf.clone()));
        log.record(&RequestRecord::default()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while buf.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
