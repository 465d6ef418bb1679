//! State shared by the planes, and the per-request context that becomes the
//! request record.
//!
//! A [`RequestContext`] is created for every request by the outermost layer
//! and shared (`Arc`) with the auth layer, the handler and, for streams, the
//! task that feeds the body. It writes the record and the metrics when the
//! last holder lets go, which is when the response really ended: for a stream
//! that is after `[DONE]` (or the client leaving), so the latency and token
//! counts in the record are the true ones.

use crate::metrics::{Metrics, ModelLabels, Plane, PlaneLabels, Rejection, RequestLabels};
use moat_audit::{AuditLog, AuditRecord, Outcome, RequestLog, RequestRecord, action, now_rfc3339};
use moat_engine::Backend;
use moat_guard::Keyring;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// The served models by name. Replaced whole (copy on write) when the
/// management plane adds, removes or switches a model, so a request takes
/// one snapshot and never sees a half-changed set.
pub type EngineMap = BTreeMap<String, Arc<Backend>>;

pub struct AppState {
    /// Read with [`AppState::engines`] / [`AppState::engine`]: one read
    /// lock and an `Arc` clone per request; writers are management calls.
    pub engines: RwLock<Arc<EngineMap>>,
    /// Role → permissions (`[rbac]`); swapped whole when SIGHUP brings a
    /// new `[rbac]`. A request reads it through [`AppState::rbac_for`], so
    /// every check of one request sees the same version.
    pub rbac: crate::reload::Swappable<moat_guard::Rbac>,
    /// Models configured but refused at load, with the reason.
    pub refused: Vec<(String, String)>,
    /// Unix time the models were loaded (the `created` of `/v1/models`).
    pub loaded_at: u64,
    pub keyring: RwLock<Arc<Keyring>>,
    pub metrics: Metrics,
    pub request_log: RequestLog,
    pub public_routes: Vec<String>,
    pub max_body_bytes: usize,
    pub metrics_public: bool,
    /// The tamper-evident audit log, and whether a request whose record
    /// cannot be written durably is refused (503).
    pub audit: Option<Arc<AuditLog>>,
    pub audit_fail_closed: bool,
    /// JWT issuers (`[[auth.jwt]]`), when any are configured; swapped
    /// whole when SIGHUP brings new issuers (the JWKS watcher follows).
    pub jwt: crate::reload::Swappable<Option<Arc<crate::auth::JwtAuth>>>,
    /// Client-certificate principal → role (`[auth.mtls]`); swapped whole
    /// at reload.
    pub mtls_roles: crate::reload::Swappable<BTreeMap<String, moat_guard::Role>>,
    /// Encrypted prompt/response capture (`[audit] capture`), when on.
    pub capture: Option<Arc<crate::capture::Capture>>,
    /// Longest wait for a response head (`limits.request_timeout`).
    pub request_timeout: std::time::Duration,
    /// Swapped whole when SIGHUP brings new `[rate_limits]`.
    pub rate: crate::reload::Swappable<crate::ratelimit::RateLimits>,
    /// `max_tokens` of a request that gives none (`engine.default_max_tokens`).
    pub default_max_tokens: u64,
    /// The shutdown phases: `draining` once SIGTERM arrived (`/ready` says
    /// false, listeners stop accepting), `deadline` once `limits.drain_timeout`
    /// has passed (streams end with a `shutting_down` error).
    pub shutdown: Shutdown,
    /// OTLP trace export (`[tracing]`), when configured.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

/// The `[rbac]` version a request was authenticated under: set by the
/// authentication layer with the principal, so that a reload between two
/// layers (or a layer and the handler) cannot change the rules halfway
/// through one request.
#[derive(Clone)]
pub struct RbacSnapshot(pub Arc<moat_guard::Rbac>);

/// Shutdown phases, observable by handlers.
#[derive(Debug, Clone)]
pub struct Shutdown {
    pub draining: tokio::sync::watch::Receiver<bool>,
    pub deadline: tokio::sync::watch::Receiver<bool>,
}

impl Shutdown {
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once the drain deadline has passed (never, if it does not).
    pub async fn deadline_passed(&self) {
        let mut rx = self.deadline.clone();
        if rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl AppState {
    /// The current model set.
    pub fn engines(&self) -> Arc<EngineMap> {
        match self.engines.read() {
            Ok(e) => e.clone(),
            Err(poison) => poison.into_inner().clone(),
        }
    }

    pub fn engine(&self, name: &str) -> Option<Arc<Backend>> {
        match self.engines.read() {
            Ok(e) => e.get(name).cloned(),
            Err(poison) => poison.into_inner().get(name).cloned(),
        }
    }

    /// Change the model set atomically: `f` edits a copy, which then
    /// replaces the current map in one store. Returns what `f` returned.
    pub fn update_engines<R>(&self, f: impl FnOnce(&mut EngineMap) -> R) -> R {
        let mut guard = match self.engines.write() {
            Ok(g) => g,
            Err(poison) => poison.into_inner(),
        };
        let mut next = EngineMap::clone(&guard);
        let out = f(&mut next);
        *guard = Arc::new(next);
        out
    }

    /// The roles a request is checked against: the version its
    /// authentication took, or the current one for a request that has none
    /// (a public route).
    pub fn rbac_for(&self, extensions: &axum::http::Extensions) -> Arc<moat_guard::Rbac> {
        match extensions.get::<RbacSnapshot>() {
            Some(s) => s.0.clone(),
            None => self.rbac.load(),
        }
    }

    pub fn keyring(&self) -> Arc<Keyring> {
        match self.keyring.read() {
            Ok(k) => k.clone(),
            Err(poison) => poison.into_inner().clone(),
        }
    }

    /// Installs the keys file's records: the keyring that authenticates
    /// and the per-key limits the rate limiter applies, from one read.
    pub fn set_keys(&self, records: Vec<moat_guard::keys::KeyRecord>) {
        crate::reload::warn_undefined_roles(&self.rbac.load(), &records);
        self.rate.load().set_key_limits(&records);
        self.set_keyring(Keyring::new(records));
    }

    pub fn set_keyring(&self, ring: Keyring) {
        let ring = Arc::new(ring);
        match self.keyring.write() {
            Ok(mut k) => *k = ring,
            Err(poison) => *poison.into_inner() = ring,
        }
    }
}

#[derive(Default)]
struct Fields {
    route: String,
    key_id: Option<String>,
    model: Option<String>,
    model_digest: Option<String>,
    prompt_hmac: Option<String>,
    /// Capture on: the request's messages, until the exchange ends.
    capture_prompt: Option<Vec<[String; 2]>>,
    /// This request is captured (set with the prompt, kept after the
    /// capture is written so the record still names it).
    captured: bool,
    status: u16,
    prompt_tokens: u64,
    completion_tokens: u64,
    error: Option<String>,
    /// Set by the layer that refused the request when it knows more than
    /// the status says (which auth failure, which permission).
    rejection: Option<Rejection>,
    /// The concurrency slot, held until the response's last byte.
    permit: Option<crate::ratelimit::ConcurrencySlot>,
    /// Tokens reserved at admission, settled against the real usage.
    reservation: Option<crate::ratelimit::TokenReservation>,
    /// The request's trace, when sampled; becomes spans at the end.
    trace: Option<crate::trace::RequestTrace>,
}

pub struct RequestContext {
    pub request_id: String,
    method: String,
    path: String,
    plane: Plane,
    started: Instant,
    state: Arc<AppState>,
    fields: Mutex<Fields>,
}

impl RequestContext {
    pub fn new(
        state: Arc<AppState>,
        request_id: String,
        method: String,
        path: String,
        route: String,
        plane: Plane,
    ) -> Self {
        // In flight from here until the context drops (a stream's last byte).
        state
            .metrics
            .in_flight
            .get_or_create(&PlaneLabels {
                plane: plane.as_str(),
            })
            .inc();
        Self {
            request_id,
            method,
            path,
            plane,
            started: Instant::now(),
            state,
            fields: Mutex::new(Fields {
                route,
                ..Fields::default()
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Fields) -> R) -> R {
        match self.fields.lock() {
            Ok(mut g) => f(&mut g),
            Err(poison) => f(&mut poison.into_inner()),
        }
    }

    /// The listener the request came in on.
    pub fn plane(&self) -> Plane {
        self.plane
    }

    /// When the first layer saw the request.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Starts this request's trace (when tracing is on and the request is
    /// sampled), continuing the caller's `traceparent` if valid.
    pub fn start_trace(&self, traceparent: Option<&str>) {
        if let Some(tracer) = &self.state.tracer {
            let t = tracer.begin(self.started, traceparent);
            self.with(|f| f.trace = t);
        }
    }

    fn trace(&self, mark: impl FnOnce(&mut crate::trace::RequestTrace)) {
        self.with(|f| f.trace.as_mut().map(mark));
    }

    /// Authentication and rate limits let the request through.
    pub fn mark_admitted(&self) {
        self.trace(|t| t.mark_admitted());
    }

    /// The worker took the request after `queue_wait` in its queue.
    pub fn mark_engine_started(&self, queue_wait: std::time::Duration) {
        self.trace(|t| t.mark_engine_started(queue_wait));
    }

    /// The engine finished generating (before the last byte is sent).
    pub fn mark_generation_done(&self) {
        self.trace(|t| t.mark_done());
    }

    pub fn set_rejection(&self, r: Rejection) {
        self.with(|f| f.rejection = Some(r));
    }

    pub fn hold_permit(&self, permit: crate::ratelimit::ConcurrencySlot) {
        self.with(|f| f.permit = Some(permit));
    }

    pub fn hold_reservation(&self, r: crate::ratelimit::TokenReservation) {
        self.with(|f| f.reservation = Some(r));
    }

    pub fn set_key(&self, key_id: &str) {
        self.with(|f| f.key_id = Some(key_id.to_owned()));
    }
    pub fn set_model(&self, model: &str, digest: &str) {
        self.with(|f| {
            f.model = Some(model.to_owned());
            f.model_digest = Some(digest.to_owned());
        });
    }

    pub fn set_prompt_hmac(&self, mac: String) {
        self.with(|f| f.prompt_hmac = Some(mac));
    }

    /// Capture on: remember the messages; the audit record then names the
    /// capture (its id is the request id).
    pub fn set_capture_prompt(&self, prompt: Vec<[String; 2]>) {
        self.with(|f| {
            f.capture_prompt = Some(prompt);
            f.captured = true;
        });
    }

    /// Capture on: seal and write the exchange (blocking work off the
    /// runtime). A failure is logged; the record still names the id, so a
    /// missing capture is visible to an auditor.
    pub async fn write_capture(&self, model: &str, response: String, reasoning: String, finish: &str) {
        let Some(capture) = self.state.capture.clone() else {
            return;
        };
        let (prompt, principal) = self.with(|f| (f.capture_prompt.take(), f.key_id.clone()));
        let Some(prompt) = prompt else { return };
        let rec = crate::capture::CaptureRecord {
            request_id: self.request_id.clone(),
            time: moat_audit::now_rfc3339(),
            principal,
            model: model.to_owned(),
            prompt,
            response,
            reasoning,
            finish: finish.to_owned(),
        };
        let id = self.request_id.clone();
        match tokio::task::spawn_blocking(move || capture.write(&rec)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(request_id = %id, error = %e, "capture not written"),
            Err(e) => tracing::error!(request_id = %id, error = %e, "capture task failed"),
        }
    }

    /// The audit record of this request's decision, as known now (the
    /// response status is set; stream token counts may still grow).
    pub fn audit_record(&self, client: Option<String>) -> AuditRecord {
        self.with(|f| {
            let act = match (f.status, self.method.as_str(), f.route.as_str()) {
                (401, _, _) => action::AUTH_REJECT,
                (_, "POST", "/models") => action::MODEL_PULL,
                (_, "PUT", "/models/{name}") => "model.activate",
                (_, "DELETE", "/models/{name}") => action::MODEL_UNLOAD,
                (_, _, "/models" | "/models/{name}") => "models.read",
                (_, "POST", "/keys") => action::KEY_CREATE,
                (_, "DELETE", "/keys/{id}") => action::KEY_REVOKE,
                (_, _, "/keys") => "keys.read",
                (_, _, "/v1/chat/completions") => action::INFERENCE_CHAT,
                (_, _, "/v1/completions") => "inference.completion",
                (_, _, "/v1/models" | "/v1/models/{model}") => action::INFERENCE_MODELS,
                (_, _, "/metrics") => "metrics.read",
                (_, _, "/health" | "/ready") => "health.read",
                _ => "http.request",
            };
            let (mut outcome, mut stage) = match f.status {
                0..=399 => (Outcome::Allowed, None),
                401 => (Outcome::Denied, Some("auth")),
                403 => (Outcome::Denied, Some("authz")),
                429 => (Outcome::Denied, Some("rate_limit")),
                400..=498 => (Outcome::Denied, Some("request")),
                _ => (Outcome::Error, Some("engine")),
            };
            // A refusal is recorded with the same stage and reason as the
            // `moat_rejections_total` counter it increments, so the two can
            // be joined; the error code stays in `reason` otherwise.
            let rejection = f
                .rejection
                .or_else(|| crate::metrics::Rejection::from_response(f.status, f.error.as_deref()));
            let mut reason = f.error.clone();
            if let Some(r) = rejection {
                // Shed load (503 overloaded) and cut requests (504) are
                // refusals by a limit, not engine failures.
                outcome = Outcome::Denied;
                stage = Some(r.stage);
                reason = Some(r.reason.to_owned());
            }
            let mut rec = AuditRecord::new(act, outcome);
            rec.request_id = Some(self.request_id.clone());
            rec.principal = f.key_id.clone();
            rec.resource = Some(format!("{} {}", self.method, self.path));
            rec.reason = reason;
            rec.stage = stage.map(str::to_owned);
            rec.model = f.model.clone();
            rec.model_digest = f.model_digest.clone();
            if f.model.is_some() {
                rec.prompt_tokens = Some(f.prompt_tokens);
                rec.completion_tokens = Some(f.completion_tokens);
            }
            rec.client_addr = client;
            rec.prompt_hmac = f.prompt_hmac.clone();
            if f.captured {
                rec.capture = Some(self.request_id.clone());
            }
            rec
        })
    }
    pub fn set_status(&self, status: u16) {
        self.with(|f| f.status = status);
    }
    pub fn set_error(&self, code: &str) {
        self.with(|f| f.error = Some(code.to_owned()));
    }
    /// Called on every generated delta; the first one ends prefill.
    pub fn set_completion_tokens(&self, completion: usize) {
        self.with(|f| {
            f.completion_tokens = completion as u64;
            if let Some(t) = f.trace.as_mut() {
                t.mark_first_token();
            }
        });
    }
    pub fn set_tokens(&self, prompt: usize, completion: usize) {
        self.with(|f| {
            f.prompt_tokens = prompt as u64;
            f.completion_tokens = completion as u64;
        });
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let mut f = std::mem::take(match self.fields.get_mut() {
            Ok(f) => f,
            Err(poison) => poison.into_inner(),
        });
        if f.status == 0 {
            // The handler was dropped before it answered: the client closed
            // the connection. 499 as in nginx's logs, so it is never a 200.
            f.status = 499;
            f.error.get_or_insert_with(|| "client_disconnected".to_owned());
        }
        if let Some(r) = f.reservation.take() {
            r.settle(f.completion_tokens);
        }
        drop(f.permit.take());
        let m = &self.state.metrics;
        let labels = RequestLabels {
            plane: self.plane.as_str(),
            route: f.route.clone(),
            status: f.status,
            model: f.model.clone().unwrap_or_default(),
        };
        m.requests.get_or_create(&labels).inc();
        m.duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
        m.in_flight
            .get_or_create(&PlaneLabels {
                plane: self.plane.as_str(),
            })
            .dec();
        if let Some(r) = f
            .rejection
            .or_else(|| Rejection::from_response(f.status, f.error.as_deref()))
        {
            m.reject(r);
        }
        if let Some(model) = &f.model {
            let l = ModelLabels { model: model.clone() };
            m.prompt_tokens.get_or_create(&l).inc_by(f.prompt_tokens);
            m.completion_tokens.get_or_create(&l).inc_by(f.completion_tokens);
        }
        if let (Some(t), Some(tracer)) = (f.trace.take(), &self.state.tracer) {
            let rejection = f
                .rejection
                .or_else(|| Rejection::from_response(f.status, f.error.as_deref()));
            let spans = t.finish(
                Instant::now(),
                &crate::trace::RequestSummary {
                    request_id: &self.request_id,
                    plane: self.plane.as_str(),
                    method: &self.method,
                    route: &f.route,
                    status: f.status,
                    principal: f.key_id.as_deref(),
                    model: f.model.as_deref(),
                    prompt_tokens: f.prompt_tokens,
                    completion_tokens: f.completion_tokens,
                    error: f.error.as_deref(),
                    rejection: rejection.as_ref().map(|r| (r.stage, r.reason)),
                },
            );
            tracer.export(spans);
        }
        let rec = RequestRecord {
            time: now_rfc3339(),
            request_id: std::mem::take(&mut self.request_id),
            key_id: f.key_id,
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            model: f.model,
            status: f.status,
            prompt_tokens: f.prompt_tokens,
            completion_tokens: f.completion_tokens,
            latency_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
            error: f.error,
        };
        // Failures are counted and reported inside `record`.
        let _ = self.state.request_log.record(&rec);
    }
}
