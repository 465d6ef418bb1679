//! Prometheus metrics (OpenMetrics text on the metrics plane), chosen to
//! answer "is it healthy": requests and their latency by plane, route,
//! status and model; time to first token and time per output token; tokens;
//! the engine queue; in-flight requests; every rejection by stage and
//! reason; how each model's load, scan and verification went; the process
//! itself; and, with the `nvml` feature, the GPU. Every name is documented
//! in `docs/operations.md` (the "Metrics" table) and used by the shipped
//! alert rules and dashboard in `deploy/`.
//!
//! Cardinality is bounded by construction: `route` is the matched route
//! template (never the raw path), `model` is only ever a configured model
//! name (set once the model was found), and stage/reason are fixed strings.

mod gpu;
mod process;

pub use process::ProcessStats;

use moat_engine::Backend;
use moat_engine::upstream::{Outcome, PoolObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Plane {
    Inference,
    Metrics,
    Management,
}

impl Plane {
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Inference => "inference",
            Plane::Metrics => "metrics",
            Plane::Management => "management",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub plane: &'static str,
    pub route: String,
    pub status: u16,
    /// The model the request was for, once found and allowed; empty (which
    /// PromQL reads as absent) otherwise.
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaneLabels {
    pub plane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub stage: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelResultLabels {
    pub model: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStageLabels {
    pub model: String,
    pub stage: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    pub model: String,
    pub check: &'static str,
    pub result: &'static str,
}

/// One upstream replica of a model; `upstream` is its configured base URL
/// (no credentials ever), so cardinality is bounded by the config.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub model: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamOutcomeLabels {
    pub model: String,
    pub upstream: String,
    pub outcome: &'static str,
}

/// Where a request was refused, and why; fixed strings only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub stage: &'static str,
    pub reason: &'static str,
}

impl Rejection {
    pub const fn new(stage: &'static str, reason: &'static str) -> Self {
        Self { stage, reason }
    }

    /// The rejection a response stands for when no layer named one
    /// explicitly: derived from the status and the error code of the one
    /// `ApiError` mapping. `None` for answers that are not refusals.
    pub fn from_response(status: u16, code: Option<&str>) -> Option<Self> {
        Some(match (status, code) {
            (401, _) => Self::new("auth", "invalid_api_key"),
            (403, _) => Self::new("rbac", "forbidden"),
            (413, _) => Self::new("limits", "body_too_large"),
            (504, Some("request_timeout")) => Self::new("limits", "request_timeout"),
            (429, _) => Self::new("rate_limit", "rate_limited"),
            (503, Some("overloaded")) => Self::new("overload", "queue_full"),
            (503, Some("audit_unavailable")) => Self::new("audit", "audit_unavailable"),
            (400, _) => Self::new("validation", "invalid_request"),
            (404, Some("model_not_found")) => Self::new("validation", "model_not_found"),
            _ => return None,
        })
    }
}

/// One stage of a model's start-up load: how long it took and whether it
/// passed. Collected by `load_models` (before the metrics exist) and
/// recorded when the server starts.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTiming {
    pub stage: LoadStage,
    pub seconds: f64,
    pub ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadStage {
    /// The re-scan of the stored files with the running version's rules.
    Scan,
    /// Every file re-hashed against `moat.lock`.
    Verify,
    /// The configured signature policy (only when one is configured).
    Signature,
    /// Weights, tokenizer and template into the engine.
    Engine,
}

impl LoadStage {
    fn as_str(self) -> &'static str {
        match self {
            LoadStage::Scan => "scan",
            LoadStage::Verify => "verify",
            LoadStage::Signature => "signature",
            LoadStage::Engine => "engine",
        }
    }
}

/// How one configured model's start-up load went.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelLoadReport {
    pub model: String,
    pub stages: Vec<StageTiming>,
    pub seconds: f64,
    pub loaded: bool,
}

impl ModelLoadReport {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            stages: Vec::new(),
            seconds: 0.0,
            loaded: false,
        }
    }

    /// Run one stage, recording its duration and whether it succeeded.
    pub fn time<T, E>(&mut self, stage: LoadStage, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let started = std::time::Instant::now();
        let r = f();
        self.stages.push(StageTiming {
            stage,
            seconds: started.elapsed().as_secs_f64(),
            ok: r.is_ok(),
        });
        r
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub in_flight: Family<PlaneLabels, Gauge>,
    pub time_to_first_token: Family<ModelLabels, Histogram>,
    pub inter_token_latency: Family<ModelLabels, Histogram>,
    pub prompt_tokens: Family<ModelLabels, Counter>,
    pub completion_tokens: Family<ModelLabels, Counter>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub queue_capacity: Family<ModelLabels, Gauge>,
    /// Requests the embedded engine dropped because the client went away.
    pub engine_cancelled: Family<ModelLabels, Counter>,
    pub queue_wait: Family<ModelLabels, Histogram>,
    pub rejections: Family<RejectionLabels, Counter>,
    pub model_load: Family<ModelResultLabels, Histogram>,
    pub model_stage: Family<ModelStageLabels, Histogram>,
    pub verifications: Family<VerificationLabels, Counter>,
    pub scans: Family<ModelResultLabels, Counter>,
    pub models_loaded: Gauge,
    pub models_refused: Gauge,
    /// Audit records that could not be written (fail-open) or that turned a
    /// request into a 503 (fail-closed).
    pub audit_failures: Counter,
    /// OTLP trace export outcomes (see `trace/export.rs`).
    pub trace_spans: crate::trace::export::Counters,
    /// Engine KV cache: tokens held now, and the most it may hold, by model.
    pub kv_cache_tokens: Family<ModelLabels, Gauge>,
    pub kv_cache_capacity_tokens: Family<ModelLabels, Gauge>,
    pub kv_cache_bytes: Family<ModelLabels, Gauge>,
    pub kv_cache_capacity_bytes: Family<ModelLabels, Gauge>,
    pub upstream_requests: Family<UpstreamOutcomeLabels, Counter>,
    pub upstream_latency: Family<UpstreamLabels, Histogram>,
    pub upstream_failovers: Family<ModelLabels, Counter>,
    pub upstream_healthy: Family<UpstreamLabels, Gauge>,
    pub upstream_cooling_down: Family<UpstreamLabels, Gauge>,
    pub upstream_in_flight: Family<UpstreamLabels, Gauge>,
}

/// The pools' view of the metrics: attempts and failovers as they happen.
pub struct UpstreamMetrics {
    requests: Family<UpstreamOutcomeLabels, Counter>,
    latency: Family<UpstreamLabels, Histogram>,
    failovers: Family<ModelLabels, Counter>,
}

impl PoolObserver for UpstreamMetrics {
    fn attempt(&self, model: &str, upstream: &str, outcome: Outcome, latency: Option<Duration>) {
        self.requests
            .get_or_create(&UpstreamOutcomeLabels {
                model: model.to_owned(),
                upstream: upstream.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(l) = latency {
            self.latency
                .get_or_create(&UpstreamLabels {
                    model: model.to_owned(),
                    upstream: upstream.to_owned(),
                })
                .observe(l.as_secs_f64());
        }
    }

    fn failover(&self, model: &str) {
        self.failovers
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .inc();
    }
}

/// Latency buckets from 1 ms to 60 s: request-path overhead at the bottom,
/// long generations at the top; 0.5 s is a bucket edge so the 500 ms SLO
/// reads exactly.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Per-token latency: 100 µs (a tiny model on a fast GPU) to 5 s (a 70B
/// model on CPU).
const TOKEN_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Model loading: re-hashing tens of GB takes minutes.
const LOAD_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

fn token_histogram() -> Histogram {
    Histogram::new(TOKEN_BUCKETS)
}

fn load_histogram() -> Histogram {
    Histogram::new(LOAD_BUCKETS)
}

fn histograms<L>(make: fn() -> Histogram) -> Family<L, Histogram>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(make)
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_proc_root(std::path::Path::new("/proc"))
    }

    /// `proc` is where process metrics are read (tests point it elsewhere).
    pub fn with_proc_root(proc: &std::path::Path) -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector {
            proc: proc.to_owned(),
        }));
        if let Some(gpu) = gpu::GpuCollector::open() {
            root.register_collector(Box::new(gpu));
        }
        let m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            duration: histograms(latency_histogram),
            in_flight: Family::default(),
            time_to_first_token: histograms(latency_histogram),
            inter_token_latency: histograms(token_histogram),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            queue_depth: Family::default(),
            queue_capacity: Family::default(),
            engine_cancelled: Family::default(),
            queue_wait: histograms(latency_histogram),
            rejections: Family::default(),
            model_load: histograms(load_histogram),
            model_stage: histograms(load_histogram),
            verifications: Family::default(),
            scans: Family::default(),
            models_loaded: Gauge::default(),
            models_refused: Gauge::default(),
            audit_failures: Counter::default(),
            trace_spans: crate::trace::export::Counters::default(),
            kv_cache_tokens: Family::default(),
            kv_cache_capacity_tokens: Family::default(),
            kv_cache_bytes: Family::default(),
            kv_cache_capacity_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_latency: histograms(latency_histogram),
            upstream_failovers: Family::default(),
            upstream_healthy: Family::default(),
            upstream_cooling_down: Family::default(),
            upstream_in_flight: Family::default(),
        };
        let r = root.sub_registry_with_prefix("moat");
        r.register(
            "http_requests",
            "HTTP requests that ended, by plane, route template, status and model",
            m.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "HTTP request duration (to the end of the body, streams included) by plane, route, status and model",
            m.duration.clone(),
        );
        r.register(
            "http_requests_in_flight",
            "Requests being served now (streams until their last byte), by plane",
            m.in_flight.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time from receiving a chat request to its first generated token, by model (OpenTelemetry gen_ai.server.time_to_first_token)",
            m.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Mean time per output token after the first, one observation per request, by model (OpenTelemetry gen_ai.server.time_per_output_token)",
            m.inter_token_latency.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of requests admitted to the engine, by model",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Completion tokens generated, by model",
            m.completion_tokens.clone(),
        );
        r.register(
            "engine_queue_depth",
            "Requests waiting for the model's worker (not counting the one running), by model",
            m.queue_depth.clone(),
        );
        r.register(
            "engine_queue_capacity",
            "Requests that may wait before new ones are refused with 503, by model",
            m.queue_capacity.clone(),
        );
        r.register(
            "engine_cancelled",
            "Requests the embedded engine removed because the client went away (their compute stops within one step), by model",
            m.engine_cancelled.clone(),
        );
        r.register(
            "engine_queue_wait_seconds",
            "Time admitted requests waited in the queue before the worker started them, by model",
            m.queue_wait.clone(),
        );
        r.register(
            "rejections",
            "Requests refused, by the stage that refused them and the reason",
            m.rejections.clone(),
        );
        r.register(
            "model_load_seconds",
            "Start-up load of each configured model (scan, verify, signature, engine) and its result",
            m.model_load.clone(),
        );
        r.register(
            "model_load_stage_seconds",
            "Duration of each stage of a model's start-up load, by stage and result",
            m.model_stage.clone(),
        );
        r.register(
            "model_verifications",
            "Model integrity checks at load (hashes against moat.lock; signature policy), by result",
            m.verifications.clone(),
        );
        r.register(
            "model_scans",
            "Re-scans of stored model files at load, by result",
            m.scans.clone(),
        );
        r.register("models_loaded", "Models serving now", m.models_loaded.clone());
        r.register(
            "models_refused",
            "Configured models refused at load (see /ready for the reasons)",
            m.models_refused.clone(),
        );
        r.register(
            "audit_write_failures",
            "Audit records that could not be written durably",
            m.audit_failures.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Trace spans the OTLP collector accepted",
            m.trace_spans.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Trace spans dropped: export queue full or the collector unreachable or refusing",
            m.trace_spans.dropped.clone(),
        );
        r.register(
            "engine_kv_cache_tokens",
            "Tokens held in the model's KV cache now (prompt and generated tokens of the running request), by model",
            m.kv_cache_tokens.clone(),
        );
        r.register(
            "engine_kv_cache_capacity_tokens",
            "Tokens the model's KV cache may hold (engine.max_context, or the model's own context if smaller), by model",
            m.kv_cache_capacity_tokens.clone(),
        );
        r.register(
            "engine_kv_cache_bytes",
            "Bytes of KV-cache tensors held now (keys and values, every layer), by model",
            m.kv_cache_bytes.clone(),
        );
        r.register(
            "engine_kv_cache_capacity_bytes",
            "Bytes the model's KV cache takes when full, by model",
            m.kv_cache_capacity_bytes.clone(),
        );
        r.register(
            "upstream_requests",
            "Attempts on upstream replicas, by model, upstream and outcome (ok, connect_error, timeout, rate_limited, server_error, refused, client_error, protocol_error, interrupted)",
            m.upstream_requests.clone(),
        );
        r.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to the first piece of its answer (the whole answer when not streamed), by model and upstream",
            m.upstream_latency.clone(),
        );
        r.register(
            "upstream_failovers",
            "Requests moved to another replica after a failure, before anything reached the client, by model",
            m.upstream_failovers.clone(),
        );
        r.register(
            "upstream_healthy",
            "1 while an upstream passes its health checks, 0 once out of rotation, by model and upstream",
            m.upstream_healthy.clone(),
        );
        r.register(
            "upstream_cooling_down",
            "1 while an upstream is in its cooldown (circuit open after a 429, 5xx, connect error or timeout)",
            m.upstream_cooling_down.clone(),
        );
        r.register(
            "upstream_in_flight",
            "Requests outstanding on an upstream now (streams until their end), by model and upstream",
            m.upstream_in_flight.clone(),
        );
        Self { registry: root, ..m }
    }

    /// What the upstream pools report into.
    pub fn upstream_observer(&self) -> UpstreamMetrics {
        UpstreamMetrics {
            requests: self.upstream_requests.clone(),
            latency: self.upstream_latency.clone(),
            failovers: self.upstream_failovers.clone(),
        }
    }

    /// Record how each model's start-up load went.
    pub fn record_model_loads(&self, reports: &[ModelLoadReport]) {
        let mut loaded = 0;
        let mut refused = 0;
        for rep in reports {
            let result = if rep.loaded { "loaded" } else { "refused" };
            if rep.loaded {
                loaded += 1;
            } else {
                refused += 1;
            }
            self.model_load
                .get_or_create(&ModelResultLabels {
                    model: rep.model.clone(),
                    result,
                })
                .observe(rep.seconds);
            for s in &rep.stages {
                let result = if s.ok { "ok" } else { "failed" };
                self.model_stage
                    .get_or_create(&ModelStageLabels {
                        model: rep.model.clone(),
                        stage: s.stage.as_str(),
                        result,
                    })
                    .observe(s.seconds);
                match s.stage {
                    LoadStage::Scan => {
                        let result = if s.ok { "clean" } else { "refused" };
                        self.scans
                            .get_or_create(&ModelResultLabels {
                                model: rep.model.clone(),
                                result,
                            })
                            .inc();
                    }
                    LoadStage::Verify | LoadStage::Signature => {
                        let check = if s.stage == LoadStage::Verify {
                            "hashes"
                        } else {
                            "signature"
                        };
                        self.verifications
                            .get_or_create(&VerificationLabels {
                                model: rep.model.clone(),
                                check,
                                result,
                            })
                            .inc();
                    }
                    LoadStage::Engine => {}
                }
            }
        }
        self.models_loaded.set(loaded);
        self.models_refused.set(refused);
    }

    pub fn reject(&self, r: Rejection) {
        self.rejections
            .get_or_create(&RejectionLabels {
                stage: r.stage,
                reason: r.reason,
            })
            .inc();
    }

    pub fn observe_queue_wait(&self, model: &str, wait: Duration) {
        self.queue_wait
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .observe(wait.as_secs_f64());
    }

    /// Queue gauges are read from the engines at scrape time: always
    /// current, and nothing to keep in step on the request path.
    pub fn observe_engines(&self, engines: &BTreeMap<String, Arc<Backend>>) {
        for (name, b) in engines {
            let e = match &**b {
                Backend::Embedded(e) => e,
                Backend::Upstream(pool) => {
                    for r in pool.status() {
                        let l = UpstreamLabels {
                            model: name.clone(),
                            upstream: r.upstream,
                        };
                        self.upstream_healthy.get_or_create(&l).set(i64::from(r.healthy));
                        self.upstream_cooling_down
                            .get_or_create(&l)
                            .set(i64::from(r.cooling_down));
                        self.upstream_in_flight
                            .get_or_create(&l)
                            .set(i64::try_from(r.pending).unwrap_or(i64::MAX));
                    }
                    continue;
                }
            };
            let l = ModelLabels { model: name.clone() };
            self.queue_depth
                .get_or_create(&l)
                .set(i64::try_from(e.queue_depth()).unwrap_or(i64::MAX));
            self.queue_capacity
                .get_or_create(&l)
                .set(i64::try_from(e.queue_capacity()).unwrap_or(i64::MAX));
            // The engine counts; the counter follows it (fetch_max: two
            // concurrent scrapes cannot count twice).
            self.engine_cancelled
                .get_or_create(&l)
                .inner()
                .fetch_max(e.cancelled_total(), std::sync::atomic::Ordering::Relaxed);
            let kv = e.kv_cache();
            let gauge = |f: &Family<ModelLabels, Gauge>, v: usize| {
                f.get_or_create(&l).set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            gauge(&self.kv_cache_tokens, kv.tokens);
            gauge(&self.kv_cache_capacity_tokens, kv.capacity_tokens);
            gauge(&self.kv_cache_bytes, kv.bytes());
            gauge(&self.kv_cache_capacity_bytes, kv.capacity_bytes());
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Token timing of one generation, fed as deltas arrive; reports time to
/// first token and the mean time per output token after the first (the
/// OpenTelemetry GenAI definitions) when the generation ends.
pub struct TokenTimer {
    started: std::time::Instant,
    first: Option<(std::time::Instant, usize)>,
    last: Option<(std::time::Instant, usize)>,
}

impl TokenTimer {
    /// `started` is when the server received the request.
    pub fn new(started: std::time::Instant) -> Self {
        Self {
            started,
            first: None,
            last: None,
        }
    }

    /// A delta arrived carrying the cumulative completion-token count.
    pub fn tokens(&mut self, total: usize) {
        let now = std::time::Instant::now();
        if self.first.is_none() {
            self.first = Some((now, total));
        }
        self.last = Some((now, total));
    }

    /// Record into `metrics` for `model`; called once, at a successful end.
    pub fn finish(&self, metrics: &Metrics, model: &str) {
        let Some((first_at, first_n)) = self.first else {
            return;
        };
        let l = ModelLabels {
            model: model.to_owned(),
        };
        metrics
            .time_to_first_token
            .get_or_create(&l)
            .observe(first_at.duration_since(self.started).as_secs_f64());
        if let Some((last_at, last_n)) = self.last
            && last_n > first_n
        {
            let per = last_at.duration_since(first_at).as_secs_f64() / (last_n - first_n) as f64;
            metrics.inter_token_latency.get_or_create(&l).observe(per);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_map_every_refusal_and_nothing_else() {
        let r = |s, c| Rejection::from_response(s, c);
        assert_eq!(
            r(401, Some("invalid_api_key")),
            Some(Rejection::new("auth", "invalid_api_key"))
        );
        assert_eq!(
            r(503, Some("overloaded")),
            Some(Rejection::new("overload", "queue_full"))
        );
        assert_eq!(r(413, None), Some(Rejection::new("limits", "body_too_large")));
        assert_eq!(
            r(400, Some("invalid_request")).map(|x| x.stage),
            Some("validation")
        );
        assert_eq!(r(200, None), None);
        assert_eq!(r(404, Some("not_found")), None);
        assert_eq!(r(500, Some("internal_error")), None);
    }

    #[test]
    fn model_loads_become_series() {
        let m = Metrics::with_proc_root(std::path::Path::new("/nonexistent"));
        let mut ok = ModelLoadReport::new("a");
        let _ = ok.time(LoadStage::Scan, || Ok::<_, ()>(()));
        let _ = ok.time(LoadStage::Verify, || Ok::<_, ()>(()));
        ok.loaded = true;
        let mut bad = ModelLoadReport::new("b");
        let _ = bad.time(LoadStage::Scan, || Ok::<_, ()>(()));
        let _ = bad.time(LoadStage::Verify, || Err::<(), _>("sha256 mismatch"));
        m.record_model_loads(&[ok, bad]);
        let text = m.encode();
        for line in [
            "moat_model_verifications_total{model=\"a\",check=\"hashes\",result=\"ok\"} 1",
            "moat_model_verifications_total{model=\"b\",check=\"hashes\",result=\"failed\"} 1",
            "moat_model_scans_total{model=\"b\",result=\"clean\"} 1",
            "moat_model_load_seconds_count{model=\"b\",result=\"refused\"} 1",
            "moat_models_loaded 1",
            "moat_models_refused 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        // No /proc: process metrics are absent, not zero.
        assert!(!text.contains("process_"), "{text}");
    }

    #[test]
    fn token_timer_reports_ttft_and_per_token_time() {
        let m = Metrics::with_proc_root(std::path::Path::new("/nonexistent"));
        let start = std::time::Instant::now();
        let mut t = TokenTimer::new(start);
        t.tokens(1);
        std::thread::sleep(Duration::from_millis(20));
        t.tokens(5);
        t.finish(&m, "x");
        let text = m.encode();
        assert!(
            text.contains("moat_time_to_first_token_seconds_count{model=\"x\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moat_inter_token_latency_seconds_count{model=\"x\"} 1"),
            "{text}"
        );
        // 20 ms over 4 tokens is at least 5 ms per token: not in the 2.5 ms bucket.
        assert!(
            text.contains("moat_inter_token_latency_seconds_bucket{le=\"0.0025\",model=\"x\"} 0"),
            "{text}"
        );
        // A generation that produced nothing records nothing.
        TokenTimer::new(start).finish(&m, "y");
        assert!(!m.encode().contains("model=\"y\""));
    }
}
