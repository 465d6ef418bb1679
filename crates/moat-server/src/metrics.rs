//! Prometheus metrics (OpenMetrics text on the metrics plane): requests and
//! their latency by route and status, tokens by model. Route labels are the
//! matched route template (never the raw path) so cardinality stays bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram>,
    pub prompt_tokens: Family<ModelLabels, Counter>,
    pub completion_tokens: Family<ModelLabels, Counter>,
    /// Audit records that could not be written (fail-open) or that turned a
    /// request into a 503 (fail-closed).
    pub audit_failures: Counter,
}

/// Latency buckets from 1 ms to 60 s: request-path overhead at the bottom,
/// long generations at the top.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moat");
        let requests = Family::<RouteLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        let prompt_tokens = Family::<ModelLabels, Counter>::default();
        let completion_tokens = Family::<ModelLabels, Counter>::default();
        let audit_failures = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration (to the end of the body, streams included) by route and status",
            duration.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed, by model",
            prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Completion tokens generated, by model",
            completion_tokens.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written durably",
            audit_failures.clone(),
        );
        Self {
            audit_failures,
            registry,
            requests,
            duration,
            prompt_tokens,
            completion_tokens,
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
