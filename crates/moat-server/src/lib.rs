//! The HTTP planes: inference (OpenAI-compatible) and metrics, each its own
//! listener. This crate wires the others together; the rules (what a valid
//! key is, what a verified model is) live in the crates that own them.

pub mod at_rest;
pub mod audit_cli;
pub mod auth;
pub mod capture;
pub mod config;
pub mod error;
pub mod listen;
pub mod management;
pub mod metrics;
pub mod middleware;
pub mod net;
pub mod openai;
pub mod ratelimit;
pub mod reload;
pub mod state;
pub mod tls;
pub mod trace;

use crate::config::{Config, RequestLogTarget};
use crate::error::ApiError;
use crate::metrics::{LoadStage, ModelLoadReport, Plane};
use crate::middleware::{Authorize, Guard, PublicRoutes, guard};
use crate::state::AppState;
use crate::tls::Reloadable;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use moat_artifact::Store;
use moat_audit::{
    AuditKeys, AuditLog, AuditOptions, AuditRecord, FileSink, Outcome, RequestLog, WriterSink, action,
};
use moat_engine::{Backend, Engine};
use moat_guard::keys::KeyStore;
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({plane} plane): {source}")]
    Bind {
        plane: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Keys { path: PathBuf, message: String },
    #[error("request log {path}: {source}")]
    RequestLog { path: PathBuf, source: std::io::Error },
    #[error("store {path}: {source}")]
    Store { path: PathBuf, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("audit log {path}: {message}")]
    Audit { path: PathBuf, message: String },
    #[error("{plane} plane TLS: {source}")]
    Tls {
        plane: &'static str,
        source: crate::tls::TlsError,
    },
    #[error("{0}")]
    Auth(String),
}

/// Models that loaded, and those refused with the reason.
pub struct LoadedModels {
    pub engines: Vec<Backend>,
    pub refused: Vec<(String, String)>,
    /// How each model's load went, stage by stage, for the metrics.
    pub reports: Vec<ModelLoadReport>,
}

/// Re-verify and load every configured model. A model that fails (missing,
/// tampered, unloadable) is refused with a log line; the others still load.
/// Blocking: run before the runtime serves requests.
pub fn load_models(config: &Config) -> Result<LoadedModels, ServerError> {
    let store = Store::open(&config.home).map_err(|source| ServerError::Store {
        path: config.home.clone(),
        source,
    })?;
    let mut engines = Vec::new();
    let mut refused = Vec::new();
    let mut reports = Vec::new();
    // Loaded on first need: a store without encrypted versions needs no
    // keyring (nor KMS credentials) to serve.
    let keyring_cell: std::cell::OnceCell<Result<moat_artifact::crypto::Keyring, String>> =
        std::cell::OnceCell::new();
    let keyring_for = |dir: &std::path::Path| -> Result<Option<&moat_artifact::crypto::Keyring>, String> {
        if !dir.join(moat_artifact::store::ENCRYPTED_MARKER).exists() {
            return Ok(None);
        }
        keyring_cell
            .get_or_init(|| {
                moat_artifact::crypto::load_keyring(&config.encryption.keyring, |k| std::env::var(k).ok())
                    .map_err(|e| format!("the model is encrypted and the keyring cannot be loaded: {e}"))
            })
            .as_ref()
            .map(Some)
            .map_err(Clone::clone)
    };
    for model in &config.models {
        let name = &model.name;
        if let config::ModelBackend::Upstream(pool) = &model.backend {
            // Nothing local to verify: the pool is built now (no I/O) and
            // its health checks start with the runtime.
            let mut report = ModelLoadReport::new(name.as_str());
            let result = moat_engine::upstream::UpstreamPool::new((**pool).clone());
            report.loaded = result.is_ok();
            reports.push(report);
            match result {
                Ok(p) => {
                    tracing::info!(model = %name, upstreams = pool.upstreams.len(), "model served by upstreams");
                    engines.push(Backend::Upstream(Arc::new(p)));
                }
                Err(e) => {
                    tracing::error!(model = %name, reason = %e, "refusing model");
                    refused.push((name.to_string(), e.to_string()));
                }
            }
            continue;
        }
        let started = std::time::Instant::now();
        let mut report = ModelLoadReport::new(name.as_str());
        // The active version's folder, as `models/NAME/current` names it now.
        let result = store
            .model_dir(name)
            .map_err(|e| e.to_string())
            .and_then(|dir| keyring_for(&dir).map(|k| (dir, k)))
            .and_then(|(dir, keyring)| {
                load_model(
                    name.as_str(),
                    &dir,
                    keyring,
                    model.signature.as_deref(),
                    moat_engine::generate::EngineOptions {
                        quantize: model.quantize,
                        ..config.engine.clone()
                    },
                    &mut report,
                )
            });
        report.seconds = started.elapsed().as_secs_f64();
        report.loaded = result.is_ok();
        reports.push(report);
        match result {
            Ok(engine) => {
                tracing::info!(
                    model = %name,
                    revision = engine.revision(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "model verified and loaded"
                );
                engines.push(Backend::Embedded(engine));
            }
            Err(reason) => {
                tracing::error!(model = %name, %reason, "refusing model");
                refused.push((name.to_string(), reason));
            }
        }
    }
    Ok(LoadedModels {
        engines,
        refused,
        reports,
    })
}

/// Scan, verify (and check the signature policy of) one stored version
/// folder, then start its engine. Blocking (hashes every file): the start
/// path calls it before serving, the management plane from
/// `spawn_blocking`.
pub fn load_model(
    name: &str,
    dir: &std::path::Path,
    keyring: Option<&moat_artifact::crypto::Keyring>,
    signature: Option<&moat_artifact::policy::SignaturePolicy>,
    engine: moat_engine::generate::EngineOptions,
    report: &mut ModelLoadReport,
) -> Result<Engine, String> {
    // Encrypted files cannot be scanned on disk (ciphertext); they were
    // scanned as plaintext when pulled (docs/security.md).
    if keyring.is_none() {
        report.time(LoadStage::Scan, || rescan(dir))?;
    }
    let m = report.time(LoadStage::Verify, || {
        moat_artifact::verify::load_verified_with(dir, keyring)
            .map_err(|e| format!("verification failed: {e}"))
    })?;
    let m = match signature {
        None => m,
        // The lock's digests were just checked against the bytes, so the
        // signature is checked against them without re-hashing.
        Some(policy) => report.time(LoadStage::Signature, || {
            policy
                .check(m.file(&policy.file), &m.lock().files)
                .map(|v| {
                    tracing::info!(model = %name, signer = %v.signer, "signature verified");
                    m
                })
                .map_err(|e| format!("signature policy ({}): {}: {e}", policy.describe(), e.rule()))
        })?,
    };
    report.time(LoadStage::Engine, || {
        Engine::start(m, engine).map_err(|e| e.to_string())
    })
}

/// Scan a stored model again before loading: the lock proves the bytes are
/// the ones pulled, and this applies the rules of the running version (which
/// may be stricter than those of the version that pulled). Safetensors
/// checks read headers only, so this costs little.
fn rescan(dir: &std::path::Path) -> Result<(), String> {
    let report = moat_scan::scan_paths(&[dir.join(moat_artifact::store::FILES_DIR)]);
    match report.first_unsafe().or_else(|| report.first_error()) {
        None => Ok(()),
        Some((file, finding)) => Err(format!(
            "scan refused {}: {}: {}",
            file.path, finding.rule, finding.message
        )),
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let refused: Vec<_> = state
        .refused
        .iter()
        .map(|(n, r)| json!({"model": n, "reason": r}))
        .collect();
    let draining = state.shutdown.is_draining();
    let engines = state.engines();
    let ready = !engines.is_empty() && !draining;
    // Per upstream-served model, how many replicas are in rotation: a model
    // whose upstreams are all out still counts as loaded (moat can do
    // nothing about it by restarting), but an operator sees it here.
    let upstreams: serde_json::Map<String, serde_json::Value> = engines
        .iter()
        .filter_map(|(name, b)| match &**b {
            Backend::Upstream(pool) => {
                let status = pool.status();
                let healthy = status.iter().filter(|r| r.healthy && !r.cooling_down).count();
                Some((name.clone(), json!({"available": healthy, "total": status.len()})))
            }
            Backend::Embedded(_) => None,
        })
        .collect();
    let body = json!({"ready": ready, "draining": draining, "models": engines.keys().collect::<Vec<_>>(), "refused": refused, "upstreams": upstreams});
    let status = if !ready {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::OK
    };
    (status, axum::Json(body))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.observe_engines(&state.engines());
    // The audit log counts its own failures (including records whose write
    // failed after `submit` returned); the counter mirrors it.
    if let Some(log) = &state.audit {
        let counted = state.metrics.audit_failures.get();
        let now = log.failures();
        if now > counted {
            state.metrics.audit_failures.inc_by(now - counted);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn fallback() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Layers are listed innermost first (axum wraps each `layer` around what
/// came before); see `middleware.rs` for the order they run in.
pub fn inference_router(state: Arc<AppState>, tls: bool) -> Router {
    let public = PublicRoutes(Arc::new(state.public_routes.clone()));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model}", get(openai::get_model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            Guard {
                state: state.clone(),
                plane: Plane::Inference,
                tls,
                public,
                authorize: Authorize::Inference,
            },
            guard,
        ))
        .with_state(state)
}

pub fn metrics_router(state: Arc<AppState>, tls: bool) -> Router {
    let public = PublicRoutes(Arc::new(if state.metrics_public {
        vec!["/metrics".to_owned()]
    } else {
        Vec::new()
    }));
    Router::new()
        .route("/metrics", get(metrics_text))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Guard {
                state: state.clone(),
                plane: Plane::Metrics,
                tls,
                public,
                authorize: Authorize::Metrics,
            },
            guard,
        ))
        .with_state(state)
}

/// Identity of the keys file's current content, to notice edits cheaply.
pub(crate) fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Re-read the keys file whenever it changes (a revoked key stops working
/// within about a second, no restart). A file that fails to parse is
/// reported and the previous keys stay in force.
fn watch_keys(state: Arc<AppState>, store: KeyStore) {
    tokio::spawn(async move {
        let mut last = file_stamp(store.path());
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let now = file_stamp(store.path());
            if now == last {
                continue;
            }
            last = now;
            match store.records() {
                Ok(records) => {
                    tracing::info!(keys = records.len(), "keys file changed; reloaded");
                    state.set_keys(records);
                }
                Err(e) => {
                    tracing::error!(error = %e, "keys file changed but cannot be read; keeping the previous keys")
                }
            }
        }
    });
}

/// Appends CLI audit records spooled while this server holds the log
/// (see [`audit_cli`]) about once a second.
fn watch_spool(log: Arc<AuditLog>, a: config::AuditConfig) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (log, a) = (log.clone(), a.clone());
            let drained = tokio::task::spawn_blocking(move || audit_cli::drain_spool(&log, &a)).await;
            match drained {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(records = n, "appended spooled CLI audit records"),
                Ok(Err(e)) => tracing::error!(error = %e, "spooled CLI audit records not appended"),
                Err(e) => tracing::error!(error = %e, "spool drain task failed"),
            }
        }
    });
}

/// Re-reads changed JWKS files, and re-fetches URL and discovery JWKS
/// whose refresh interval has passed, about once a second. It works on the
/// issuers in force at each tick, so issuers swapped in by a reload are
/// refreshed from then on and the replaced ones are let go.
fn watch_jwks(state: Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(j) = Option::clone(&state.jwt.load()) else {
                continue;
            };
            let _ = tokio::task::spawn_blocking(move || {
                j.reload_changed_files();
                j.refresh_due();
            })
            .await;
        }
    });
}

/// Bound listeners, before serving: lets the caller learn the real ports
/// (when configured as port 0) before anything is served.
pub struct Bound {
    inference: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
    inference_tls: Option<Arc<Reloadable>>,
    metrics_tls: Option<Arc<Reloadable>>,
    /// The management plane's listener and TLS, when `[management]` is set.
    management: Option<(tokio::net::TcpListener, Option<Arc<Reloadable>>)>,
    reload: ReloadHandle,
    reload_rx: reload::Receiver,
    pub inference_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub management_addr: Option<SocketAddr>,
}

impl Bound {
    /// The hook that reloads keys, certificates and the reloadable
    /// configuration now (the CLI calls it on SIGHUP; see `reload.rs`).
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }
}

pub use reload::ReloadHandle;

pub async fn bind(config: &Config) -> Result<Bound, ServerError> {
    let listen = |plane, addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { plane, addr, source })
    };
    let tls = |plane, t: &Option<crate::tls::TlsSettings>| match t {
        None => Ok(None),
        Some(s) => Reloadable::new(s.clone())
            .map(|r| Some(Arc::new(r)))
            .map_err(|source| ServerError::Tls { plane, source }),
    };
    let inference_tls = tls("inference", &config.inference_access.tls)?;
    let metrics_tls = tls("metrics", &config.metrics_access.tls)?;
    let inference = listen("inference", config.inference_listen).await?;
    let metrics = listen("metrics", config.metrics_listen).await?;
    let local = |l: &tokio::net::TcpListener, plane, addr| {
        l.local_addr()
            .map_err(|source| ServerError::Bind { plane, addr, source })
    };
    let (management, management_addr) = match &config.management {
        None => (None, None),
        Some(m) => {
            let t = tls("management", &m.access.tls)?;
            let l = listen("management", m.listen).await?;
            let addr = local(&l, "management", m.listen)?;
            (Some((l, t)), Some(addr))
        }
    };
    let (reload, reload_rx) = reload::channel();
    Ok(Bound {
        management,
        management_addr,
        reload,
        reload_rx,
        inference_addr: local(&inference, "inference", config.inference_listen)?,
        metrics_addr: local(&metrics, "metrics", config.metrics_listen)?,
        inference,
        metrics,
        inference_tls,
        metrics_tls,
    })
}

/// Re-reads changed TLS files once a second (SIGHUP forces it at once, see
/// `reload.rs`). A file that fails to load is logged; the previous
/// certificate keeps serving.
fn watch_tls(tls: Vec<(&'static str, Arc<Reloadable>)>) {
    if tls.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for (plane, r) in &tls {
                match r.reload_if_changed(false) {
                    Ok(true) => tracing::info!(plane, "TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(plane, error = %e, "TLS files changed but cannot be loaded; keeping the previous certificate")
                    }
                }
            }
        }
    });
}

/// Serve both planes until `shutdown` resolves; in-flight requests finish.
pub async fn serve(
    config: &Config,
    models: LoadedModels,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let keys =
        at_rest::key_store(&config.keys_file, &config.encryption).map_err(|message| ServerError::Keys {
            path: config.keys_file.clone(),
            message,
        })?;
    let key_records = keys.records().map_err(|e| ServerError::Keys {
        path: config.keys_file.clone(),
        message: e.to_string(),
    })?;
    if key_records.is_empty() {
        tracing::warn!(path = %config.keys_file.display(), "no API keys: authenticated routes will answer 401; create one with `moat keys create`");
    }
    let request_log = match &config.request_log {
        RequestLogTarget::Stdout => RequestLog::stdout(),
        RequestLogTarget::Stderr => RequestLog::stderr(),
        RequestLogTarget::File(p) => RequestLog::file(p).map_err(|source| ServerError::RequestLog {
            path: p.clone(),
            source,
        })?,
    };
    let audit = match &config.audit {
        None => None,
        Some(a) => Some(Arc::new(open_audit(a)?)),
    };
    let jwt = if config.jwt.is_empty() {
        None
    } else {
        let issuers = config.jwt.clone();
        let loaded = tokio::task::spawn_blocking(move || auth::JwtAuth::load(&issuers))
            .await
            .map_err(|e| ServerError::Auth(e.to_string()))?
            .map_err(ServerError::Auth)?;
        Some(Arc::new(loaded))
    };
    let metrics = metrics::Metrics::new();
    metrics.record_model_loads(&models.reports);
    let tracer = match &config.tracing {
        None => None,
        Some(t) => {
            let tracer = trace::Tracer::start(t, metrics.trace_spans.clone()).map_err(ServerError::Serve)?;
            tracing::info!(url = %t.traces_url, sample_ratio = t.sample_ratio, "exporting traces over OTLP/HTTP");
            Some(Arc::new(tracer))
        }
    };
    let engines: BTreeMap<String, Arc<Backend>> = models
        .engines
        .into_iter()
        .map(|e| (e.name().to_owned(), Arc::new(e)))
        .collect();
    let upstream_metrics = Arc::new(metrics.upstream_observer());
    for backend in engines.values() {
        if let Backend::Upstream(pool) = &**backend {
            pool.set_observer(upstream_metrics.clone());
            pool.start_health_checks();
        }
    }
    // Shutdown: SIGTERM starts draining (no new connections, /ready false);
    // `limits.drain_timeout` later, requests still running are ended.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (deadline_tx, deadline_rx) = tokio::sync::watch::channel(false);
    let drain_timeout = config.limits.drain_timeout;
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            "shutting down: draining"
        );
        let _ = stop_tx.send(true);
        tokio::time::sleep(drain_timeout).await;
        tracing::warn!("drain deadline passed: ending the requests still running");
        let _ = deadline_tx.send(true);
    });
    // Prompt/response capture: sealed under the keyring, so it cannot start
    // without one (never plaintext on disk).
    let capture = match config.audit.as_ref().and_then(|a| a.capture_dir.clone()) {
        None => None,
        Some(dir) => {
            let fail = |message: String| ServerError::Audit {
                path: dir.clone(),
                message,
            };
            let keyring = at_rest::load_keyring(&config.encryption)
                .map_err(|e| fail(format!("audit.capture needs the keyring: {e}")))?;
            tracing::info!(dir = %dir.display(), kek_version = keyring.current_version(), "capturing prompts and responses, encrypted");
            Some(Arc::new(
                capture::Capture::open(dir.clone(), keyring).map_err(fail)?,
            ))
        }
    };
    let state = Arc::new(AppState {
        engines: RwLock::new(Arc::new(engines)),
        rbac: reload::Swappable::new(config.rbac.clone()),
        capture,
        refused: models.refused,
        loaded_at: moat_guard::keys::now_unix(),
        keyring: RwLock::new(Arc::new(moat_guard::Keyring::default())),
        metrics,
        request_log,
        public_routes: config.public_routes.clone(),
        max_body_bytes: config.max_body_bytes,
        metrics_public: config.metrics_public,
        audit: audit.clone(),
        audit_fail_closed: config.audit.as_ref().is_some_and(|a| a.fail_closed),
        jwt: reload::Swappable::new(jwt),
        mtls_roles: reload::Swappable::new(config.mtls_roles.clone()),
        request_timeout: config.limits.request_timeout,
        rate: reload::Swappable::new(ratelimit::RateLimits::new(config.rate_limits.clone())),
        default_max_tokens: config.engine.default_max_tokens as u64,
        shutdown: state::Shutdown {
            draining: stop_rx.clone(),
            deadline: deadline_rx,
        },
        tracer: tracer.clone(),
    });
    state.set_keys(key_records);
    {
        // Forget limiter state that no longer limits anyone.
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                state.rate.load().sweep();
            }
        });
    }
    // Always: a reload may bring issuers to a server started without any.
    watch_jwks(state.clone());
    if let Some(log) = &audit {
        lifecycle(log, config, &state).await?;
        if let Some(a) = &config.audit {
            watch_spool(log.clone(), a.clone());
        }
    }
    let tls: Vec<_> = [
        ("inference", bound.inference_tls.clone()),
        ("metrics", bound.metrics_tls.clone()),
        ("management", bound.management.as_ref().and_then(|m| m.1.clone())),
    ]
    .into_iter()
    .filter_map(|(p, t)| t.map(|t| (p, t)))
    .collect();
    reload::Reloader {
        state: state.clone(),
        keys: keys.clone(),
        tls: tls.clone(),
        running: config.clone(),
    }
    .spawn(bound.reload_rx);
    watch_keys(state.clone(), keys);
    watch_tls(tls);
    let plane =
        |plane, listener, access: &config::PlaneAccess, tls: Option<Arc<Reloadable>>, router: Router| {
            listen::PlaneServer {
                plane,
                listener,
                allow: access.allow.clone(),
                tls,
                router,
                limits: config.limits,
            }
        };
    let scheme = |t: &Option<Arc<Reloadable>>| if t.is_some() { "https" } else { "http" };
    // Logged first: tests read the addresses from these lines, and the
    // management line must be there once the other two are.
    let management_plane = match (bound.management, bound.management_addr, &config.management) {
        (Some((listener, tls)), Some(addr), Some(mc)) => {
            let m = management::Management::new(state.clone(), config)
                .map_err(|message| ServerError::Auth(format!("management.totp_file: {message}")))?;
            tracing::info!(model_control = ?mc.model_control, scheme = scheme(&tls), addr = %addr, "management plane listening");
            let secure = tls.is_some();
            Some(plane(
                Plane::Management,
                listener,
                &mc.access,
                tls,
                management::router(Arc::new(m), secure),
            ))
        }
        _ => None,
    };
    tracing::info!(scheme = scheme(&bound.inference_tls), addr = %bound.inference_addr, "inference plane listening");
    tracing::info!(scheme = scheme(&bound.metrics_tls), addr = %bound.metrics_addr, "metrics plane listening");
    let inference = plane(
        Plane::Inference,
        bound.inference,
        &config.inference_access,
        bound.inference_tls.clone(),
        inference_router(state.clone(), bound.inference_tls.is_some()),
    );
    let metrics_plane = plane(
        Plane::Metrics,
        bound.metrics,
        &config.metrics_access,
        bound.metrics_tls.clone(),
        metrics_router(state.clone(), bound.metrics_tls.is_some()),
    );
    let management_run = {
        let (state, stop) = (state.clone(), stop_rx.clone());
        async move {
            if let Some(p) = management_plane {
                p.run(state, stop).await;
            }
        }
    };
    tokio::join!(
        inference.run(state.clone(), stop_rx.clone()),
        metrics_plane.run(state.clone(), stop_rx),
        management_run
    );
    // Every request has finished: its record is out before exit.
    state.request_log.flush();
    // Every request has finished: their spans go to the collector (a dead
    // one may delay exit by the export timeout, no more).
    if let Some(t) = &tracer {
        t.shutdown(
            config
                .tracing
                .as_ref()
                .map_or(Duration::ZERO, |c| c.export_timeout)
                + Duration::from_secs(1),
        );
    }
    // Every request has finished: the stop record, then everything queued
    // is written before exit (records are never lost on SIGTERM).
    if let Some(log) = &audit {
        let _ = log.submit(AuditRecord::new(action::SERVER_STOP, Outcome::Ok));
        if let Err(e) = log.close() {
            tracing::error!(error = %e, "audit log: could not write every record at shutdown");
        }
    }
    Ok(())
}

/// Open the audit log: the chained file (created with its folder 0700),
/// optionally mirrored to stdout, under keys from the keys file (generated
/// 0600 on first start).
fn open_audit(a: &config::AuditConfig) -> Result<AuditLog, ServerError> {
    let err = |path: &std::path::Path, message: String| ServerError::Audit {
        path: path.to_owned(),
        message,
    };
    if let Some(dir) = a.file.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(dir, e.to_string()))?;
    }
    let keys = if a.keys_file.exists() {
        AuditKeys::from_file(&a.keys_file)
    } else {
        AuditKeys::generate_file(&a.keys_file)
    }
    .map_err(|e| err(&a.keys_file, e.to_string()))?;
    let file = FileSink::open(a.file.clone(), Some(a.max_bytes))
        .map(|s| s.with_max_age(a.rotate_every))
        .map_err(|e| err(&a.file, e.to_string()))?;
    let mut sinks: Vec<Box<dyn moat_audit::Sink>> = vec![Box::new(file)];
    if a.stdout {
        sinks.push(Box::new(WriterSink::stdout()));
    }
    let options = AuditOptions {
        durable: a.durable,
        checkpoint_every: a.checkpoint_every,
        ..AuditOptions::default()
    };
    AuditLog::open(sinks, keys, options).map_err(|e| err(&a.file, e.to_string()))
}

/// Start-up records: the server start and each model's load or refusal.
/// With `fail_closed`, a log that cannot record the start stops the start.
async fn lifecycle(log: &AuditLog, config: &Config, state: &AppState) -> Result<(), ServerError> {
    let mut recs = vec![AuditRecord::new(action::SERVER_START, Outcome::Ok)];
    for (name, engine) in state.engines().iter() {
        let mut r = AuditRecord::new(action::MODEL_LOAD, Outcome::Ok);
        r.model = Some(name.clone());
        r.model_digest = Some(engine.revision().to_owned());
        recs.push(r);
    }
    for (name, reason) in &state.refused {
        let mut r = AuditRecord::new(action::MODEL_REFUSE, Outcome::Error);
        r.model = Some(name.clone());
        r.reason = Some(reason.clone());
        recs.push(r);
    }
    // CLI events recorded while no server ran are on the chain already;
    // those spooled while a server held the log go on now.
    if let Some(a) = &config.audit {
        match audit_cli::drain_spool(log, a) {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "appended spooled CLI audit records"),
            Err(e) => tracing::error!(error = %e, "spooled CLI audit records not appended"),
        }
    }
    for r in recs {
        if let Err(e) = log.append_async(r).await {
            if config.audit.as_ref().is_some_and(|a| a.fail_closed) {
                return Err(ServerError::Audit {
                    path: config.audit.as_ref().map(|a| a.file.clone()).unwrap_or_default(),
                    message: format!("cannot record the start (audit.fail_closed): {e}"),
                });
            }
            tracing::error!(error = %e, "audit record not written");
        }
    }
    Ok(())
}
