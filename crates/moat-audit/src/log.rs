//! The audit log: chains records, writes them through one writer thread,
//! and makes them durable with group commit.
//!
//! Appenders put records on a queue and wait. The writer thread takes the
//! whole queue as one batch, assigns `seq` and `prev`, MACs each record,
//! writes the batch to the primary sink with one write and (when `durable`)
//! one fsync, and then wakes every appender of the batch with its result.
//! While it fsyncs, new records pile up for the next batch, so the fsync
//! cost is shared by everyone who arrived during the previous one.
//!
//! Failure rules (the crate's promise: no record is dropped silently):
//! - a batch that could not be written (write or fsync error) fails for
//!   every record in it; each appender gets the error, [`AuditLog::failures`]
//!   counts them, and the chain head is not moved: the next record written
//!   chains onto the last record that was written, with the next `seq`;
//! - the next batch that succeeds starts with an `audit.write_failed` record
//!   saying how many records were lost and why, so the gap is on the chain;
//! - mirrors (sinks after the first) are best effort: the primary sink
//!   decides success; a mirror's failure is counted in
//!   [`AuditLog::mirror_failures`] and logged.
//!
//! [`AuditLog::append`] blocks the calling thread until the batch is
//! written; from async code use [`AuditLog::append_async`], which queues
//! the record at once and resolves when it is written without blocking a
//! runtime thread. [`AuditLog::close`] (and `Drop`) write everything queued
//! before returning.

use crate::keys::AuditKeys;
use crate::record::{AuditRecord, Checkpoint, GENESIS_PREV, Outcome, action, encode_line, parse_line};
use crate::sink::Sink;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;

/// Why a record was not written (or a log could not be opened).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The write or the fsync failed; the record is not in the log.
    #[error("audit record not written to {sink}: {source}")]
    Write { sink: String, source: Arc<io::Error> },
    #[error("the audit log is closed")]
    Closed,
    /// [`AuditLog::submit`] found the queue full.
    #[error("the audit queue is full ({0} records waiting)")]
    Overloaded(usize),
    #[error("cannot open the audit log {sink}: {source}")]
    Open { sink: String, source: Arc<io::Error> },
    /// The record the chain would continue from is not a record.
    #[error(
        "cannot continue the audit chain of {sink}: its last line is not an audit record ({message}); run `moat audit verify` on it"
    )]
    Resume { sink: String, message: String },
    #[error("no audit sink configured")]
    NoSink,
    #[error("cannot encode an audit record: {0}")]
    Encode(String),
}

impl AuditError {
    /// True when the record could not be stored: the request it describes
    /// must fail (503) when audit is fail-closed.
    pub fn is_write_failure(&self) -> bool {
        !matches!(self, Self::Open { .. } | Self::Resume { .. } | Self::NoSink)
    }
}

/// How the log behaves.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// fsync each batch before its appenders are told it is written.
    pub durable: bool,
    /// Write a `checkpoint` record after this many records (0: never).
    pub checkpoint_every: u64,
    /// Most records [`AuditLog::submit`] lets wait in the queue.
    pub max_pending: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            durable: true,
            checkpoint_every: 0,
            max_pending: 65_536,
        }
    }
}

/// Counters for metrics. All are totals since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records written (callers', checkpoints and the log's own notes).
    pub written: u64,
    /// Callers' records that could not be written.
    pub failures: u64,
    /// Batches written (each one write and, when durable, one fsync).
    pub batches: u64,
    /// Batches a mirror sink could not take.
    pub mirror_failures: u64,
    /// `seq` of the last record written (0 before the first).
    pub last_seq: u64,
}

/// The tamper-evident audit log. Cheap to share (`Arc<AuditLog>`); every
/// method takes `&self`.
pub struct AuditLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

type Reply = tokio::sync::oneshot::Sender<Result<(), AuditError>>;

struct Entry {
    rec: AuditRecord,
    reply: Option<Reply>,
}

/// The result of one batch, shared by its blocking appenders.
#[derive(Default)]
struct BatchSlot {
    result: OnceLock<Result<(), AuditError>>,
}

struct Queue {
    entries: Vec<Entry>,
    /// The batch the queued blocking appenders will be answered through.
    open: Arc<BatchSlot>,
    /// The batch being written, if any.
    in_flight: Option<Arc<BatchSlot>>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The writer waits here for records.
    work: Condvar,
    /// Blocking appenders wait here for their batch.
    done: Condvar,
    keys: RwLock<Arc<AuditKeys>>,
    options: AuditOptions,
    written: AtomicU64,
    failures: AtomicU64,
    batches: AtomicU64,
    mirror_failures: AtomicU64,
    last_seq: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AuditLog {
    /// Open a log writing to `sinks`: the first is the primary (the chain
    /// continues from the last record it holds, and its failure fails the
    /// batch), the others are best-effort mirrors (e.g. a file, then stdout).
    pub fn open(
        sinks: Vec<Box<dyn Sink>>,
        keys: AuditKeys,
        options: AuditOptions,
    ) -> Result<Self, AuditError> {
        let mut sinks = sinks.into_iter();
        let mut primary = sinks.next().ok_or(AuditError::NoSink)?;
        let mirrors: Vec<Box<dyn Sink>> = sinks.collect();
        let name = primary.name();
        let tail = primary.resume().map_err(|e| AuditError::Open {
            sink: name.clone(),
            source: Arc::new(e),
        })?;
        let head = match &tail.last_line {
            None => Head { seq: 0, hash: None },
            Some(line) => {
                let (rec, split) = parse_line(line).map_err(|p| AuditError::Resume {
                    sink: name.clone(),
                    message: crate::verify::Problem::from(p).to_string(),
                })?;
                Head {
                    seq: rec.seq,
                    hash: Some(crate::record::sha256(&[&split.canonical])),
                }
            }
        };
        let mut notes = Vec::new();
        if let Some(what) = tail.repaired {
            tracing::warn!(sink = %name, "{what}");
            let mut rec = AuditRecord::new(action::AUDIT_REPAIR, Outcome::Error);
            rec.resource = Some(name.clone());
            rec.reason = Some(what);
            notes.push(rec);
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                entries: Vec::new(),
                open: Arc::default(),
                in_flight: None,
                closing: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            keys: RwLock::new(Arc::new(keys)),
            options,
            written: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            mirror_failures: AtomicU64::new(0),
            last_seq: AtomicU64::new(head.seq),
        });
        let writer = Writer {
            shared: shared.clone(),
            primary,
            mirrors,
            head,
            since_checkpoint: 0,
            lost: None,
            notes,
            buf: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("moat-audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Open {
                sink: name,
                source: Arc::new(e),
            })?;
        Ok(Self {
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Append `rec` and return once it is written (and fsynced, when
    /// durable), or with the error that kept it out of the log. Blocks the
    /// calling thread: from async code use [`Self::append_async`].
    pub fn append(&self, rec: AuditRecord) -> Result<(), AuditError> {
        let mut q = self.shared.lock();
        if q.closing {
            return Err(AuditError::Closed);
        }
        q.entries.push(Entry { rec, reply: None });
        let slot = q.open.clone();
        wake_writer(&self.shared, &q);
        wait_for(&self.shared, q, &slot)
    }

    /// Queue `rec` now (not at the first poll) and resolve once it is
    /// written, as [`Self::append`], without blocking an async runtime. A
    /// handler can call this early, do other work (run the model), and await
    /// the result before answering.
    pub fn append_async(&self, rec: AuditRecord) -> impl Future<Output = Result<(), AuditError>> + use<> {
        let rx = {
            let mut q = self.shared.lock();
            if q.closing {
                None
            } else {
                let (tx, rx) = tokio::sync::oneshot::channel();
                q.entries.push(Entry { rec, reply: Some(tx) });
                wake_writer(&self.shared, &q);
                Some(rx)
            }
        };
        async move {
            match rx {
                Some(rx) => rx.await.unwrap_or(Err(AuditError::Closed)),
                None => Err(AuditError::Closed),
            }
        }
    }

    /// Queue `rec` without waiting (for audit that is not fail-closed). A
    /// failure to write it later is counted and logged, never silent.
    pub fn submit(&self, rec: AuditRecord) -> Result<(), AuditError> {
        let mut q = self.shared.lock();
        if q.closing {
            return Err(AuditError::Closed);
        }
        if q.entries.len() >= self.shared.options.max_pending {
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(action = %rec.action, "audit queue full; record refused");
            return Err(AuditError::Overloaded(q.entries.len()));
        }
        q.entries.push(Entry { rec, reply: None });
        wake_writer(&self.shared, &q);
        Ok(())
    }

    /// Wait until every record queued before this call is written (or has
    /// failed); the result of the last batch.
    pub fn flush(&self) -> Result<(), AuditError> {
        let q = self.shared.lock();
        let slot = if !q.entries.is_empty() {
            q.open.clone()
        } else if let Some(s) = &q.in_flight {
            s.clone()
        } else {
            return Ok(());
        };
        wait_for(&self.shared, q, &slot)
    }

    /// Refuse new records, write every queued one, stop the writer. Later
    /// appends get [`AuditError::Closed`]. Idempotent; `Drop` calls it.
    pub fn close(&self) -> Result<(), AuditError> {
        let result = self.flush();
        {
            let mut q = self.shared.lock();
            q.closing = true;
            self.shared.work.notify_all();
        }
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            // The writer drains the queue before it exits; it cannot panic
            // (no panicking code paths), so a join error is not expected.
            if h.join().is_err() {
                tracing::error!("the audit writer thread ended abnormally");
            }
        }
        result
    }

    /// Replace the key set (after a rotation); later batches use its
    /// current version.
    pub fn set_keys(&self, keys: AuditKeys) {
        *self.shared.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    /// The key set in use (for [`AuditKeys::prompt_hmac`]).
    pub fn keys(&self) -> Arc<AuditKeys> {
        self.shared.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Callers' records that could not be written, since open.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> AuditStats {
        let s = &self.shared;
        AuditStats {
            written: s.written.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            mirror_failures: s.mirror_failures.load(Ordering::Relaxed),
            last_seq: s.last_seq.load(Ordering::Relaxed),
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "audit records failed while closing the log");
        }
    }
}

/// How long the writer waits for more fail-open records before writing a
/// batch, and the batch size that makes it write at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);
const LINGER_BATCH: usize = 64;

/// Wakes the writer for the record just queued, only if the queue was
/// empty before it. The writer sleeps only on an empty queue (checked under
/// the same lock), and once awake it takes everything queued before it
/// sleeps again; a wake per record would cost a futex syscall, and a
/// context switch on a busy machine, on every request.
fn wake_writer(shared: &Shared, q: &Queue) {
    if q.entries.len() == 1 {
        shared.work.notify_one();
    }
}

fn wait_for(shared: &Shared, mut q: MutexGuard<'_, Queue>, slot: &BatchSlot) -> Result<(), AuditError> {
    loop {
        if let Some(r) = slot.result.get() {
            return r.clone();
        }
        q = shared.done.wait(q).unwrap_or_else(|p| p.into_inner());
    }
}

/// The end of the chain: the last record written.
struct Head {
    seq: u64,
    /// SHA-256 of its canonical bytes; `None` for a new log.
    hash: Option<[u8; 32]>,
}

/// Records lost since the last successful batch, for the
/// `audit.write_failed` note.
struct Lost {
    count: u64,
    since: String,
    error: String,
}

struct Writer {
    shared: Arc<Shared>,
    primary: Box<dyn Sink>,
    mirrors: Vec<Box<dyn Sink>>,
    head: Head,
    since_checkpoint: u64,
    lost: Option<Lost>,
    /// Records of the log's own to write first in the next batch.
    notes: Vec<AuditRecord>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        let mut spare: Vec<Entry> = Vec::new();
        loop {
            let (mut batch, slot) = {
                let mut q = self.shared.lock();
                while q.entries.is_empty() && !q.closing {
                    q = self.shared.work.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                if q.entries.is_empty() {
                    break;
                }
                // Nobody waits on these records (fail-open submits): let
                // more arrive for a moment, so a busy server pays one write
                // and one fsync per few dozen records instead of per record,
                // and the writer does not preempt request threads per record.
                if !q.closing && q.entries.len() < LINGER_BATCH && q.entries.iter().all(|e| e.reply.is_none())
                {
                    drop(q);
                    std::thread::sleep(LINGER);
                    q = self.shared.lock();
                }
                let batch = std::mem::replace(&mut q.entries, std::mem::take(&mut spare));
                let slot = std::mem::take(&mut q.open);
                q.in_flight = Some(slot.clone());
                (batch, slot)
            };
            let result = self.commit(&mut batch);
            let _ = slot.result.set(result.clone());
            for e in batch.drain(..) {
                if let Some(reply) = e.reply {
                    // The receiver may have gone (a cancelled request); the
                    // record is written either way.
                    let _ = reply.send(result.clone());
                }
            }
            spare = batch;
            let mut q = self.shared.lock();
            q.in_flight = None;
            self.shared.done.notify_all();
        }
    }

    /// Chain, encode and write one batch; on failure the head stays where
    /// it was.
    fn commit(&mut self, batch: &mut [Entry]) -> Result<(), AuditError> {
        let keys = self.shared.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (version, key) = keys.current();
        let every = self.shared.options.checkpoint_every;
        self.buf.clear();
        let mut seq = self.head.seq;
        let mut hash = self.head.hash;
        let mut since_checkpoint = self.since_checkpoint;
        let mut written = 0u64;
        // Logged once written: a copy of the head kept outside the file.
        let mut checkpoints: Vec<(u64, Option<[u8; 32]>)> = Vec::new();

        let mut notes = std::mem::take(&mut self.notes);
        let own_notes = notes.len();
        if let Some(lost) = &self.lost {
            let mut rec = AuditRecord::new(action::AUDIT_WRITE_FAILED, Outcome::Error);
            rec.resource = Some(self.primary.name());
            rec.reason = Some(format!(
                "{} audit record(s) could not be written since {}: {}",
                lost.count, lost.since, lost.error
            ));
            notes.push(rec);
        }
        let records = notes.iter_mut().chain(batch.iter_mut().map(|e| &mut e.rec));
        let mut encode = |rec: &mut AuditRecord, buf: &mut Vec<u8>| -> Result<(), AuditError> {
            seq += 1;
            rec.seq = seq;
            rec.prev = hash.map_or_else(|| GENESIS_PREV.to_owned(), hex::encode);
            rec.key_version = version;
            rec.mac = None;
            if rec.time.is_empty() {
                rec.time = crate::now_rfc3339();
            }
            hash = Some(encode_line(rec, key, buf).map_err(|e| AuditError::Encode(e.to_string()))?);
            written += 1;
            since_checkpoint += 1;
            if every > 0 && since_checkpoint >= every {
                seq += 1;
                let prev = hash.map_or_else(|| GENESIS_PREV.to_owned(), hex::encode);
                let mut cp = AuditRecord::new(action::CHECKPOINT, Outcome::Ok);
                cp.seq = seq;
                cp.checkpoint = Some(Checkpoint {
                    records: seq - 1,
                    head: prev.clone(),
                });
                cp.prev = prev;
                cp.key_version = version;
                hash = Some(encode_line(&cp, key, buf).map_err(|e| AuditError::Encode(e.to_string()))?);
                written += 1;
                since_checkpoint = 0;
                checkpoints.push((seq, hash));
            }
            Ok(())
        };
        let mut encoded: Result<(), AuditError> = Ok(());
        for rec in records {
            encoded = encode(rec, &mut self.buf);
            if encoded.is_err() {
                break;
            }
        }
        let result = encoded.and_then(|()| {
            self.primary
                .write_batch(&self.buf, self.shared.options.durable)
                .map_err(|e| AuditError::Write {
                    sink: self.primary.name(),
                    source: Arc::new(e),
                })
        });
        match &result {
            Ok(()) => {
                self.head = Head { seq, hash };
                self.since_checkpoint = since_checkpoint;
                self.lost = None;
                for (seq, hash) in checkpoints {
                    tracing::info!(seq, hash = %hash.map(hex::encode).unwrap_or_default(), "audit checkpoint");
                }
                let s = &self.shared;
                s.written.fetch_add(written, Ordering::Relaxed);
                s.batches.fetch_add(1, Ordering::Relaxed);
                s.last_seq.store(seq, Ordering::Relaxed);
                for m in &mut self.mirrors {
                    if let Err(e) = m.write_batch(&self.buf, false) {
                        s.mirror_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(sink = %m.name(), error = %e, "audit mirror write failed");
                    }
                }
            }
            Err(e) => {
                let n = batch.len() as u64;
                self.shared.failures.fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %e, records = n, "audit records could not be written");
                // Keep the log's own notes (not the write-failed one, which
                // is rebuilt from `lost`) for the next try.
                notes.truncate(own_notes);
                self.notes = notes;
                let lost = self.lost.get_or_insert_with(|| Lost {
                    count: 0,
                    since: crate::now_rfc3339(),
                    error: String::new(),
                });
                lost.count += n;
                lost.error = e.to_string();
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::WriterSink;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn seq_prev_and_checkpoints() {
        let buf = Buf::default();
        let keys = AuditKeys::single(3, [1; 32]).unwrap();
        let log = AuditLog::open(
            vec![Box::new(WriterSink::new("buf", buf.clone()))],
            keys,
            AuditOptions {
                checkpoint_every: 2,
                ..AuditOptions::default()
            },
        )
        .unwrap();
        for i in 0..3 {
            let mut r = AuditRecord::new(action::MODEL_LOAD, Outcome::Ok);
            r.seq = 99; // overwritten
            r.resource = Some(format!("m{i}"));
            log.append(r).unwrap();
        }
        log.close().unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let recs: Vec<AuditRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let actions: Vec<_> = recs.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, ["model.load", "model.load", "checkpoint", "model.load"]);
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(recs[0].prev, GENESIS_PREV);
        assert!(recs.iter().all(|r| r.key_version == 3));
        let cp = recs[2].checkpoint.as_ref().unwrap();
        assert_eq!(cp.records, 2);
        assert_eq!(cp.head, recs[2].prev);
        assert_eq!(log.stats().written, 4);
        assert!(matches!(
            log.append(AuditRecord::new("x", Outcome::Ok)),
            Err(AuditError::Closed)
        ));
    }
}
