//! The background OTLP/HTTP exporter: a bounded queue in front of one
//! thread that batches spans and POSTs them to the collector.
//!
//! Requests only ever `try_send` into the queue, so a slow or dead
//! collector costs them nothing: when the queue is full, or an export
//! fails, the spans are dropped and counted
//! (`moat_trace_spans_dropped_total`), and the failure is logged once per
//! outage rather than once per batch. A plain thread with the blocking
//! `ureq` client (already a dependency) keeps the exporter off the async
//! runtime entirely.

use super::SpanData;
use super::otlp::encode_request;
use crate::config::tracing::TracingConfig;
use prometheus_client::metrics::counter::Counter;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Spans per export request at most.
const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for company.
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// Export outcomes, shared with `/metrics`.
#[derive(Clone, Default)]
pub struct Counters {
    pub exported: Counter,
    pub dropped: Counter,
}

pub struct Exporter {
    tx: Mutex<Option<SyncSender<SpanData>>>,
    finished: Mutex<Option<Receiver<()>>>,
    counters: Counters,
}

impl Exporter {
    pub fn start(config: &TracingConfig, counters: Counters) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(config.max_queue_spans);
        let (done_tx, done_rx) = sync_channel(1);
        let worker = Worker {
            url: config.traces_url.clone(),
            service_name: config.service_name.clone(),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(config.export_timeout))
                .http_status_as_error(false)
                .max_redirects(0)
                .build()
                .into(),
            counters: counters.clone(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("otlp-export".to_owned())
            .spawn(move || {
                worker.run(rx);
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            finished: Mutex::new(Some(done_rx)),
            counters,
        })
    }

    pub fn offer(&self, spans: Vec<SpanData>) {
        let guard = match self.tx.lock() {
            Ok(g) => g,
            Err(poison) => poison.into_inner(),
        };
        let Some(tx) = guard.as_ref() else {
            self.counters.dropped.inc_by(spans.len() as u64);
            return;
        };
        for s in spans {
            match tx.try_send(s) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.counters.dropped.inc();
                }
            }
        }
    }

    /// Closes the queue; the thread sends what is left and stops. Waits at
    /// most `timeout` for it (a dead collector must not hold up exit).
    pub fn shutdown(&self, timeout: Duration) {
        let tx = match self.tx.lock() {
            Ok(mut g) => g.take(),
            Err(poison) => poison.into_inner().take(),
        };
        drop(tx);
        let done = match self.finished.lock() {
            Ok(mut g) => g.take(),
            Err(poison) => poison.into_inner().take(),
        };
        if let Some(done) = done
            && done.recv_timeout(timeout).is_err()
        {
            tracing::warn!("trace export did not finish before shutdown; the last spans may be lost");
        }
    }
}

struct Worker {
    url: String,
    service_name: String,
    agent: ureq::Agent,
    counters: Counters,
    /// The last export failed: log the next failure quietly, and the
    /// recovery loudly.
    failing: bool,
}

impl Worker {
    fn run(mut self, rx: Receiver<SpanData>) {
        // `recv` fails once every sender is gone and the queue is empty.
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let deadline = Instant::now() + BATCH_DELAY;
            let mut closed = false;
            while batch.len() < MAX_BATCH {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(s) => batch.push(s),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.send(&batch);
            if closed {
                break;
            }
        }
    }

    fn send(&mut self, batch: &[SpanData]) {
        let body = encode_request(&self.service_name, batch);
        let result = self
            .agent
            .post(&self.url)
            .header("content-type", "application/x-protobuf")
            .send(&body[..])
            .map_err(|e| e.to_string())
            .and_then(|resp| {
                let status = resp.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("collector answered {status}"))
                }
            });
        match result {
            Ok(()) => {
                self.counters.exported.inc_by(batch.len() as u64);
                if self.failing {
                    tracing::info!(url = %self.url, "trace export works again");
                    self.failing = false;
                }
            }
            Err(e) => {
                self.counters.dropped.inc_by(batch.len() as u64);
                if !self.failing {
                    tracing::warn!(url = %self.url, error = %e, spans = batch.len(), "trace export failed; dropping spans until the collector answers");
                    self.failing = true;
                }
            }
        }
    }
}
