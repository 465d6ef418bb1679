//! The management plane: models (`GET/POST /models`, `GET/PUT/DELETE
//! /models/{name}`) and API keys (`GET/POST /keys`, `DELETE /keys/{id}`),
//! on its own listener (`[management]`, default 127.0.0.1:8081) with its
//! own CIDR allowlist, TLS and public routes.
//!
//! Layers, outermost first (as on the other planes): request id and audit
//! record → request timeout → authenticate → [`authorize`] → rate limit →
//! handler. [`authorize`] is one table from (method, route) to the
//! permission it needs, so a new route is refused until it is listed.
//! Writes also need, when the caller's role says `totp_required`, a
//! current TOTP code in `x-moat-totp` (never accepted twice).
//!
//! Model control: in `none` (the default) the model set is fixed at start
//! and every model write answers 405; in `explicit` a `POST /models` runs
//! the whole pull path (sources policy → fetch → hash → scan → lock →
//! promote) then the load path (rescan → verify → signature → engine) off
//! the async runtime, and swaps the new engine into the served set in one
//! store. `DELETE` takes a model out of the set at once (new requests get
//! 404) and waits, up to `limits.drain_timeout`, for the requests already
//! holding it; `PUT` switches the active stored version the same way.

use crate::config::{Config, ModelControl};
use crate::error::ApiError;
use crate::metrics::{ModelLoadReport, Plane, Rejection};
use crate::middleware::{Authorize, Guard, PublicRoutes, guard};
use crate::state::{AppState, RequestContext};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use moat_artifact::Store;
use moat_artifact::name::ModelName;
use moat_artifact::policy::SignaturePolicy;
use moat_artifact::pull::{PullError, PullOutcome, PullRequest};
use moat_artifact::source::policy::{Scheme, SourcePolicy};
use moat_artifact::source::{Env, Source, SourceError};
use moat_audit::{AuditRecord, Outcome, action};
use moat_engine::generate::EngineOptions;
use moat_guard::keys::{KeyRecord, KeyStore, now_unix, parse_duration};
use moat_guard::rbac::{Escalation, Grants, Permission, grants_within};
use moat_guard::totp::TotpStore;
use moat_guard::{Principal, Role};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The header carrying the TOTP code of a step-up.
pub const TOTP_HEADER: &str = "x-moat-totp";

/// Everything the management handlers need beside the shared state.
pub struct Management {
    pub app: Arc<AppState>,
    pub control: ModelControl,
    pub home: PathBuf,
    pub sources: SourcePolicy,
    pub engine: EngineOptions,
    /// `[[models]]` signature policies by name: a model added or switched
    /// over the API must satisfy the same signer rule as at start.
    pub signatures: BTreeMap<String, Arc<SignaturePolicy>>,
    pub keys: KeyStore,
    /// Encryption at rest: pulls seal blobs when `[store] encrypt`, and
    /// encrypted versions load through the keyring.
    pub encryption: crate::config::EncryptionConfig,
    totp: Mutex<TotpState>,
    pub drain_timeout: Duration,
    pub public_routes: Vec<String>,
    /// One model write at a time: two concurrent pulls or switches of the
    /// served set must not interleave their swaps.
    writes: tokio::sync::Mutex<()>,
}

struct TotpState {
    store: TotpStore,
    stamp: Option<(std::time::SystemTime, u64, u64)>,
}

impl Management {
    pub fn new(app: Arc<AppState>, config: &Config) -> Result<Self, String> {
        let m = config
            .management
            .as_ref()
            .ok_or_else(|| "no [management] table".to_owned())?;
        let totp = TotpStore::load(&m.totp_file).map_err(|e| e.to_string())?;
        Ok(Management {
            app,
            control: m.model_control,
            home: config.home.clone(),
            sources: config.sources.clone(),
            engine: config.engine.clone(),
            signatures: config
                .models
                .iter()
                .filter_map(|c| c.signature.clone().map(|s| (c.name.to_string(), s)))
                .collect(),
            keys: crate::at_rest::key_store(&config.keys_file, &config.encryption)?,
            encryption: config.encryption.clone(),
            totp: Mutex::new(TotpState {
                stamp: crate::file_stamp(&m.totp_file),
                store: totp,
            }),
            drain_timeout: config.limits.drain_timeout,
            public_routes: m.public_routes.clone(),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// Checks the step-up code of `principal`, re-reading the enrolments
    /// first when the file changed (`moat keys totp enroll` while serving).
    fn check_totp(&self, principal: &str, code: Option<&str>) -> Result<(), moat_guard::totp::TotpError> {
        let mut t = self.totp.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::file_stamp(t.store.path());
        if now != t.stamp {
            t.stamp = now;
            if let Err(e) = t.store.reload() {
                tracing::error!(error = %e, "TOTP file changed but cannot be read; keeping the previous enrolments");
            }
        }
        t.store.verify(principal, code, now_unix())
    }
}

/// The management router. Layers listed innermost first.
pub fn router(m: Arc<Management>, tls: bool) -> Router {
    let state = m.app.clone();
    let public = PublicRoutes(Arc::new(m.public_routes.clone()));
    Router::new()
        .route("/health", get(health))
        .route("/models", get(list_models).post(add_model))
        .route(
            "/models/{name}",
            get(get_model).put(switch_model).delete(delete_model),
        )
        .route("/keys", get(list_keys).post(create_key))
        .route("/keys/{id}", axum::routing::delete(revoke_key))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .layer(axum::middleware::from_fn_with_state(
            Guard {
                state,
                plane: Plane::Management,
                tls,
                public,
                authorize: Authorize::Management(m.clone()),
            },
            guard,
        ))
        .with_state(m)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// What a route needs: a permission, and whether it is a write (TOTP
/// step-up, model control). `None`: no permission (health, or a route
/// that does not exist and will answer 404/405).
fn required(method: &Method, route: &str) -> Option<(Permission, bool)> {
    Some(match (method.as_str(), route) {
        ("GET", "/models" | "/models/{name}") => (Permission::ModelsRead, false),
        ("POST", "/models") | ("PUT" | "DELETE", "/models/{name}") => (Permission::ModelsWrite, true),
        ("GET", "/keys") => (Permission::KeysWrite, false),
        ("POST", "/keys") | ("DELETE", "/keys/{id}") => (Permission::KeysWrite, true),
        _ => return None,
    })
}

fn refuse(req: &Request, stage: &'static str, reason: &'static str, err: ApiError) -> Response {
    if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
        ctx.set_rejection(Rejection::new(stage, reason));
    }
    err.into_response()
}

fn api_error(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> ApiError {
    ApiError {
        status,
        kind,
        code,
        param: None,
        message,
        retry_after: None,
    }
}

/// RBAC, model control and TOTP step-up, in that order: a caller without
/// the permission learns nothing more; a disabled write costs no code.
#[allow(
    clippy::result_large_err,
    reason = "the Ok side, the request, is as large: boxing the refusal would not shrink the result"
)]
pub fn authorize(m: &Management, req: Request) -> Result<Request, Response> {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let Some((perm, write)) = required(req.method(), &route) else {
        return Ok(req);
    };
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        // Only a public route reaches here without a principal, and no
        // management route with a permission can be configured public.
        let err = ApiError::forbidden("this route needs a credential");
        return Err(refuse(&req, "rbac", "missing_permission", err));
    };
    let rbac = m.app.rbac_for(req.extensions());
    if let Err(denied) = rbac.check(&principal, perm) {
        // An undefined role is named as such: "lacks the permission" would
        // send the operator looking in the wrong role's definition.
        let err = ApiError::forbidden(denied.to_string());
        return Err(refuse(&req, "rbac", "missing_permission", err));
    }
    if perm == Permission::ModelsWrite && m.control == ModelControl::None {
        let err = api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "model_control_disabled",
            "model control is \"none\": the served models are fixed at start; set \
             management.model_control = \"explicit\" to add, switch or remove models at run time"
                .to_owned(),
        );
        return Err(refuse(&req, "management", "model_control_none", err));
    }
    if write && rbac.totp_required(&principal) {
        let code = req.headers().get(TOTP_HEADER).and_then(|v| v.to_str().ok());
        if let Err(e) = m.check_totp(&principal.key_id, code) {
            let err = api_error(
                StatusCode::FORBIDDEN,
                "permission_error",
                e.reason(),
                format!("TOTP step-up refused for {}: {e}", principal.key_id),
            );
            return Err(refuse(&req, "totp", e.reason(), err));
        }
    }
    Ok(req)
}

/// Parse a JSON body; errors name the field and position.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(None, format!("invalid JSON body: {e}")))
}

fn context(req: &axum::http::request::Parts) -> Option<Arc<RequestContext>> {
    req.extensions.get::<Arc<RequestContext>>().cloned()
}

fn scope_refusal(ctx: Option<&Arc<RequestContext>>, name: &str) -> ApiError {
    if let Some(c) = ctx {
        c.set_rejection(Rejection::new("rbac", "model_scope"));
    }
    ApiError::forbidden(format!("this credential may not use model `{name}`"))
}

fn model_name(name: &str) -> Result<ModelName, ApiError> {
    ModelName::parse(name).map_err(|e| ApiError::bad_request(Some("name".into()), e.to_string()))
}

fn open_store(m: &Management) -> Result<Store, ApiError> {
    let store =
        Store::open(&m.home).map_err(|e| ApiError::internal(format!("store {}: {e}", m.home.display())))?;
    if !m.encryption.encrypt_store {
        return Ok(store);
    }
    let keyring = crate::at_rest::load_keyring(&m.encryption)
        .map_err(|e| ApiError::internal(format!("[store] encrypt needs the keyring: {e}")))?;
    Ok(store.with_keyring(keyring))
}

/// Load the version at `dir` (through the keyring when it is encrypted),
/// with its stage timings for the metrics.
fn load_timed(
    name: &str,
    dir: &std::path::Path,
    enc: &crate::config::EncryptionConfig,
    signature: Option<&SignaturePolicy>,
    opts: EngineOptions,
) -> (Result<moat_engine::Engine, String>, ModelLoadReport) {
    let mut report = ModelLoadReport::new(name);
    let started = std::time::Instant::now();
    let engine = keyring_for(enc, dir)
        .and_then(|keyring| crate::load_model(name, dir, keyring.as_ref(), signature, opts, &mut report));
    report.seconds = started.elapsed().as_secs_f64();
    report.loaded = engine.is_ok();
    (engine, report)
}

/// The keyring when the version at `dir` is encrypted, else `None` (a plain
/// store needs no keyring, nor KMS credentials).
fn keyring_for(
    enc: &crate::config::EncryptionConfig,
    dir: &std::path::Path,
) -> Result<Option<moat_artifact::crypto::Keyring>, String> {
    if !dir.join(moat_artifact::store::ENCRYPTED_MARKER).exists() {
        return Ok(None);
    }
    crate::at_rest::load_keyring(enc)
        .map(Some)
        .map_err(|e| format!("the model is encrypted and the keyring cannot be loaded: {e}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("background task failed: {e}")))
}

/// An extra audit record for a state change (the request's own record
/// says who asked and the outcome; this one names what changed).
async fn audit_change(
    m: &Management,
    act: &str,
    ctx: Option<&Arc<RequestContext>>,
    f: impl FnOnce(&mut AuditRecord),
) {
    let Some(log) = &m.app.audit else { return };
    let mut rec = AuditRecord::new(act, Outcome::Ok);
    if let Some(c) = ctx {
        rec.request_id = Some(c.request_id.clone());
    }
    f(&mut rec);
    if let Err(e) = log.append_async(rec).await {
        tracing::error!(error = %e, action = act, "audit record not written");
    }
}

// ------------------------------------------------------------------ models

async fn list_models(State(m): State<Arc<Management>>, principal: axum::Extension<Principal>) -> Response {
    let data: Vec<Value> = m
        .app
        .engines()
        .iter()
        .filter(|(name, _)| principal.may_use_model(name))
        .map(|(name, e)| json!({"id": name, "object": "model", "revision": e.revision(), "loaded": true}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(m): State<Arc<Management>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let model = model_name(&name)?;
    if !principal.may_use_model(&name) {
        return Err(scope_refusal(context(&parts).as_ref(), &name));
    }
    let engine = m.app.engine(&name);
    let store = open_store(&m)?;
    let info = blocking(move || store.model_info(&model)).await?;
    let versions: Vec<Value> = match &info {
        Ok(i) => i
            .versions
            .iter()
            .map(|v| {
                json!({"version": v.version, "active": v.active,
                       "revision": v.lock.as_ref().ok().map(|l| l.revision.clone())})
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    if engine.is_none() && info.is_err() {
        return Err(ApiError::model_not_found(&name));
    }
    Ok(axum::Json(json!({
        "id": name,
        "object": "model",
        "loaded": engine.is_some(),
        "revision": engine.as_ref().map(|e| e.revision().to_owned()),
        "active_version": info.as_ref().ok().and_then(|i| i.active.clone()),
        "versions": versions,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddModel {
    source: String,
    name: String,
    revision: Option<String>,
}

/// The sources policy, checked before anything is fetched: a URL the
/// policy refuses (cloud metadata, loopback, plain http, a host no rule
/// names) is a 403 that never opens a connection. The pull checks every
/// hop again (redirects, DNS answers pinned).
fn check_source(policy: &SourcePolicy, source: &str, revision: Option<&str>) -> Result<(), ApiError> {
    let parsed = Source::parse(source, revision).map_err(|e| match e {
        SourceError::Refused { .. } => ApiError::forbidden(e.to_string()),
        e => ApiError::bad_request(Some("source".into()), e.to_string()),
    })?;
    let refused = |r: moat_artifact::source::policy::PolicyRefusal| {
        ApiError::forbidden(format!("source {source:?} refused: {r}"))
    };
    match &parsed {
        Source::Local(root) => policy
            .check_source(Scheme::File, None, &root.display().to_string())
            .map_err(refused),
        Source::Https { url } => {
            let rules = policy.check_hop(Scheme::Https, url).map_err(refused)?;
            let uri: axum::http::Uri = url
                .parse()
                .map_err(|_| ApiError::bad_request(Some("source".into()), "not a URL"))?;
            let host = uri.host().unwrap_or_default();
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
            policy
                .resolve_checked(&rules, host, port)
                .map(|_| ())
                .map_err(refused)
        }
        // Their endpoints depend on the environment (region, mirror): the
        // pull checks them before it connects.
        Source::S3 { .. } | Source::Hf { .. } => Ok(()),
    }
}

fn pull_error(e: PullError) -> ApiError {
    match e {
        PullError::Refused(ref r) if r.iter().any(|r| r.rule.starts_with("source")) => {
            ApiError::forbidden(e.to_string())
        }
        PullError::Refused(_) => api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "model_refused",
            e.to_string(),
        ),
        PullError::Name(_) | PullError::Usage(_) => ApiError::bad_request(None, e.to_string()),
        PullError::Exists { .. }
        | PullError::Store(moat_artifact::store::StoreError::DifferentSource { .. }) => api_error(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "conflict",
            e.to_string(),
        ),
        PullError::Source(_) | PullError::Download(_) => api_error(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "source_unavailable",
            e.to_string(),
        ),
        PullError::Io { .. } | PullError::Store(_) => ApiError::internal(e.to_string()),
    }
}

/// Swap `engine` in under `name`; returns the revision it replaced.
fn install(app: &AppState, name: &str, engine: moat_engine::Engine) -> Option<String> {
    let engine = Arc::new(moat_engine::Backend::Embedded(engine));
    app.update_engines(|map| map.insert(name.to_owned(), engine))
        .map(|old| old.revision().to_owned())
}

async fn add_model(
    State(m): State<Arc<Management>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ctx = context(&parts);
    let req: AddModel = parse(&body)?;
    let name = model_name(&req.name)?;
    if !principal.may_use_model(&req.name) {
        return Err(scope_refusal(ctx.as_ref(), &req.name));
    }
    {
        let (policy, source, revision) = (m.sources.clone(), req.source.clone(), req.revision.clone());
        if let Err(e) = blocking(move || check_source(&policy, &source, revision.as_deref())).await? {
            if e.status == StatusCode::FORBIDDEN
                && let Some(c) = &ctx
            {
                c.set_rejection(Rejection::new("sources", "source_policy"));
            }
            return Err(e);
        }
    }
    let _writing = m.writes.lock().await;
    let store = open_store(&m)?;
    let signature = m.signatures.get(name.as_str()).cloned();
    let pull_req = PullRequest {
        source: req.source.clone(),
        name: req.name.clone(),
        revision: req.revision.clone(),
        replace: false,
        signature: signature.as_deref().cloned(),
        policy: m.sources.clone(),
        env: Env::process(),
        ..PullRequest::default()
    };
    let opts = m.engine.clone();
    let enc = m.encryption.clone();
    let model = req.name.clone();
    let loaded = blocking(move || {
        let outcome = moat_artifact::pull::pull(&store, &pull_req).map_err(pull_error)?;
        let (lock, dir) = match outcome {
            PullOutcome::Promoted { lock, dir, .. } | PullOutcome::AlreadyPresent { lock, dir } => {
                (lock, dir)
            }
        };
        let (engine, report) = load_timed(&model, &dir, &enc, signature.as_deref(), opts);
        Ok::<_, ApiError>((lock, dir, engine, report))
    })
    .await??;
    let (lock, dir, engine, report) = loaded;
    m.app.metrics.record_model_loads(std::slice::from_ref(&report));
    let engine = engine.map_err(|reason| {
        api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "model_refused",
            format!("model {} was stored but refused at load: {reason}", req.name),
        )
    })?;
    let revision = engine.revision().to_owned();
    if let Some(c) = &ctx {
        c.set_model(&req.name, &revision);
    }
    let replaced = install(&m.app, &req.name, engine);
    tracing::info!(model = %req.name, %revision, source = %lock.source, "model pulled and loaded over the management API");
    audit_change(&m, action::MODEL_LOAD, ctx.as_ref(), |r| {
        r.principal = Some(principal.key_id.clone());
        r.model = Some(req.name.clone());
        r.model_digest = Some(revision.clone());
        r.resource = Some(lock.source.clone());
    })
    .await;
    Ok(axum::Json(json!({
        "id": req.name,
        "object": "model",
        "revision": revision,
        "version": dir.file_name().map(|v| v.to_string_lossy().into_owned()),
        "files": lock.files.len(),
        "replaced_revision": replaced,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchModel {
    version: Option<String>,
    workers: Option<u32>,
}

async fn switch_model(
    State(m): State<Arc<Management>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ctx = context(&parts);
    let req: SwitchModel = parse(&body)?;
    let model = model_name(&name)?;
    if !principal.may_use_model(&name) {
        return Err(scope_refusal(ctx.as_ref(), &name));
    }
    if req.workers.is_some_and(|w| w != 1) {
        return Err(ApiError::bad_request(
            Some("workers".into()),
            "this engine runs one worker per model (requests queue behind it); the worker count cannot be changed",
        ));
    }
    let Some(selector) = req.version else {
        return Err(ApiError::bad_request(
            Some("version".into()),
            "give the version to activate: {\"version\": \"VERSION or revision\"}",
        ));
    };
    let _writing = m.writes.lock().await;
    let store = open_store(&m)?;
    let signature = m.signatures.get(&name).cloned();
    let opts = m.engine.clone();
    let enc = m.encryption.clone();
    let n = name.clone();
    let loaded = blocking(move || {
        let not_found = |e: moat_artifact::store::StoreError| {
            if e.is_not_found() {
                api_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "not_found",
                    e.to_string(),
                )
            } else {
                ApiError::bad_request(Some("version".into()), e.to_string())
            }
        };
        let info = store.model_info(&model).map_err(not_found)?;
        let version = info.resolve_version(&selector).map_err(not_found)?;
        let dir = store.version_dir(&model, &version);
        let (engine, report) = load_timed(&n, &dir, &enc, signature.as_deref(), opts);
        // `current` moves only once the version has verified and loaded.
        if engine.is_ok() {
            store
                .set_active(&model, &version)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        Ok::<_, ApiError>((version, engine, report))
    })
    .await??;
    let (version, engine, report) = loaded;
    m.app.metrics.record_model_loads(std::slice::from_ref(&report));
    let engine = engine.map_err(|reason| {
        api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "model_refused",
            format!("version {version} of {name} refused at load: {reason}"),
        )
    })?;
    let revision = engine.revision().to_owned();
    if let Some(c) = &ctx {
        c.set_model(&name, &revision);
    }
    let previous = install(&m.app, &name, engine);
    audit_change(&m, action::MODEL_LOAD, ctx.as_ref(), |r| {
        r.principal = Some(principal.key_id.clone());
        r.model = Some(name.clone());
        r.model_digest = Some(revision.clone());
        r.reason = Some(format!("version {version} activated"));
    })
    .await;
    Ok(axum::Json(json!({
        "id": name,
        "object": "model",
        "version": version,
        "revision": revision,
        "previous_revision": previous,
    }))
    .into_response())
}

async fn delete_model(
    State(m): State<Arc<Management>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let ctx = context(&parts);
    if !principal.may_use_model(&name) {
        return Err(scope_refusal(ctx.as_ref(), &name));
    }
    let _writing = m.writes.lock().await;
    // Out of the served set first: from here new requests get 404.
    let engine = m
        .app
        .update_engines(|map| map.remove(&name))
        .ok_or_else(|| ApiError::model_not_found(&name))?;
    let revision = engine.revision().to_owned();
    if let Some(c) = &ctx {
        c.set_model(&name, &revision);
    }
    // Every request that found the engine holds an `Arc` of it until its
    // last byte; wait for them (bounded), then let the worker stop.
    let deadline = tokio::time::Instant::now() + m.drain_timeout;
    while Arc::strong_count(&engine) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight = Arc::strong_count(&engine) - 1;
    drop(engine);
    tracing::info!(model = %name, in_flight, "model unloaded over the management API");
    audit_change(&m, action::MODEL_UNLOAD, ctx.as_ref(), |r| {
        r.principal = Some(principal.key_id.clone());
        r.model = Some(name.clone());
        r.model_digest = Some(revision.clone());
    })
    .await;
    Ok(axum::Json(json!({
        "id": name,
        "object": "model",
        "deleted": true,
        "drained": in_flight == 0,
        // Requests still running at the deadline finish on their own; the
        // engine stops when the last of them ends.
        "still_running": in_flight,
    }))
    .into_response())
}

// -------------------------------------------------------------------- keys

fn key_json(k: &KeyRecord, now: u64) -> Value {
    let state = if k.revoked.is_some() {
        "revoked"
    } else if k.expires.is_some_and(|e| now >= e) {
        "expired"
    } else {
        "active"
    };
    json!({
        "id": k.id, "object": "key", "role": k.role.to_string(),
        "models": if k.models.is_empty() { Value::Null } else { json!(k.models) },
        "created": k.created, "expires": k.expires, "revoked": k.revoked, "state": state,
        "limits": k.limits,
    })
}

fn key_error(e: moat_guard::keys::KeyError) -> ApiError {
    match e {
        moat_guard::keys::KeyError::NotFound(_) => api_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            e.to_string(),
        ),
        moat_guard::keys::KeyError::Invalid(_) => ApiError::bad_request(None, e.to_string()),
        e => ApiError::internal(e.to_string()),
    }
}

/// Reload the keyring from the file just written, so the change holds for
/// the next request (the file watcher would also see it within a second).
fn reload_keys(m: &Management) -> Result<(), ApiError> {
    let records = m.keys.records().map_err(key_error)?;
    m.app.set_keys(records);
    Ok(())
}

async fn list_keys(State(m): State<Arc<Management>>) -> Result<Response, ApiError> {
    let keys = m.keys.clone();
    let records = blocking(move || keys.records()).await?.map_err(key_error)?;
    let now = now_unix();
    let data: Vec<Value> = records.iter().map(|k| key_json(k, now)).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    role: String,
    models: Option<Vec<String>>,
    /// Lifetime, e.g. `30d`, `12h`.
    expires_in: Option<String>,
    /// The key's own limits (tightening its role's).
    limits: Option<moat_guard::KeyLimits>,
}

fn escalation(ctx: Option<&Arc<RequestContext>>, e: &Escalation) -> ApiError {
    if let Some(c) = ctx {
        c.set_rejection(Rejection::new("rbac", e.reason()));
    }
    api_error(
        StatusCode::FORBIDDEN,
        "permission_error",
        "grant_escalation",
        format!("refused: grant escalation: {e}"),
    )
}

async fn create_key(
    State(m): State<Arc<Management>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ctx = context(&parts);
    let req: CreateKey = parse(&body)?;
    let role = Role::new(&req.role).map_err(|e| ApiError::bad_request(Some("role".into()), e.to_string()))?;
    let rbac = m.app.rbac_for(&parts.extensions);
    if !rbac.is_defined(&role) {
        return Err(ApiError::bad_request(
            Some("role".into()),
            format!("role {role} is not defined in [rbac] (defined: {})", rbac.names()),
        ));
    }
    if let Some(list) = &req.models {
        if list.is_empty() {
            return Err(ApiError::bad_request(
                Some("models".into()),
                "an empty list would mean every model; omit `models` for that",
            ));
        }
        for name in list {
            ModelName::parse(name)
                .map_err(|e| ApiError::bad_request(Some("models".into()), format!("{name:?}: {e}")))?;
        }
    }
    let ttl = req
        .expires_in
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| ApiError::bad_request(Some("expires_in".into()), e.to_string()))?;
    let own_limits = req.limits.unwrap_or_default();
    own_limits
        .validate()
        .map_err(|e| ApiError::bad_request(Some("limits".into()), e))?;
    let now = now_unix();
    let requested = Grants {
        role: role.clone(),
        models: req.models.clone(),
        expires: ttl.map(|t| now.saturating_add(t)),
        limits: m.app.rate.load().role_limits(&role).tightest(&own_limits),
    };
    let creator = Grants::of(&principal, m.app.rate.load().limits_for(&principal));
    grants_within(&rbac, &creator, &requested).map_err(|e| escalation(ctx.as_ref(), &e))?;
    let keys = m.keys.clone();
    let models = req.models.unwrap_or_default();
    let key = blocking(move || keys.create_with(role, models, ttl, Some(own_limits)))
        .await?
        .map_err(key_error)?;
    reload_keys(&m)?;
    audit_change(&m, action::KEY_CREATE, ctx.as_ref(), |r| {
        r.principal = Some(principal.key_id.clone());
        r.resource = Some(format!("key {}", key.record.id));
        r.reason = Some(format!("role {}", key.record.role));
    })
    .await;
    let mut body = key_json(&key.record, now);
    // Shown once: only its hash is stored.
    body["key"] = Value::String(key.secret.clone());
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn revoke_key(
    State(m): State<Arc<Management>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let ctx = context(&parts);
    let keys = m.keys.clone();
    let records = blocking(move || keys.records()).await?.map_err(key_error)?;
    let target = records
        .iter()
        .find(|k| k.id == id)
        .ok_or_else(|| key_error(moat_guard::keys::KeyError::NotFound(id.clone())))?;
    // Revoking is a power over the key: only over keys whose grants the
    // caller could have created (a scoped user cannot cut off an admin).
    if target.id != principal.key_id {
        let role_limits = m.app.rate.load().role_limits(&target.role);
        let grants = Grants {
            role: target.role.clone(),
            models: (!target.models.is_empty()).then(|| target.models.clone()),
            expires: target.expires,
            limits: target
                .limits
                .as_ref()
                .map_or(role_limits, |l| role_limits.tightest(l)),
        };
        let creator = Grants::of(&principal, m.app.rate.load().limits_for(&principal));
        match grants_within(&m.app.rbac_for(&parts.extensions), &creator, &grants) {
            Ok(()) => {}
            // A key whose role is not defined holds nothing, so revoking it
            // takes nothing from anyone; it must stay revocable, or a role
            // removed from the config would leave keys no one can retire.
            Err(Escalation::UndefinedRole(_)) => {}
            Err(e) => return Err(escalation(ctx.as_ref(), &e)),
        }
    }
    let keys = m.keys.clone();
    let rec = blocking(move || keys.revoke(&id)).await?.map_err(key_error)?;
    reload_keys(&m)?;
    audit_change(&m, action::KEY_REVOKE, ctx.as_ref(), |r| {
        r.principal = Some(principal.key_id.clone());
        r.resource = Some(format!("key {}", rec.id));
    })
    .await;
    Ok(axum::Json(key_json(&rec, now_unix())).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use moat_artifact::source::policy::RawSources;

    #[test]
    fn the_route_table_covers_every_write() {
        let w = |m: Method, r: &str| required(&m, r);
        assert_eq!(w(Method::GET, "/models"), Some((Permission::ModelsRead, false)));
        assert_eq!(w(Method::POST, "/models"), Some((Permission::ModelsWrite, true)));
        assert_eq!(
            w(Method::PUT, "/models/{name}"),
            Some((Permission::ModelsWrite, true))
        );
        assert_eq!(
            w(Method::DELETE, "/models/{name}"),
            Some((Permission::ModelsWrite, true))
        );
        assert_eq!(w(Method::GET, "/keys"), Some((Permission::KeysWrite, false)));
        assert_eq!(w(Method::POST, "/keys"), Some((Permission::KeysWrite, true)));
        assert_eq!(
            w(Method::DELETE, "/keys/{id}"),
            Some((Permission::KeysWrite, true))
        );
        assert_eq!(w(Method::GET, "/health"), None);
    }

    #[test]
    fn sources_are_checked_before_any_connection() {
        let policy = SourcePolicy::default();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "https://169.254.169.254/m.safetensors",
            "https://127.0.0.1/m.safetensors",
            "https://[::1]:8443/manifest.json",
            "https://10.1.2.3/manifest.json",
            "http://example.com/manifest.json",
        ] {
            let e = check_source(&policy, url, None).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN, "{url}: {}", e.message);
            assert!(e.message.contains("sources policy"), "{}", e.message);
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        assert!(check_source(&policy, &url, None).is_ok());
        // A file rule narrowed to another folder refuses this one.
        let raw: RawSources =
            toml::from_str("defaults = false\n[[allow]]\nscheme = \"file\"\nprefix = \"/srv/models\"\n")
                .unwrap();
        let narrow = raw.validate("sources").unwrap();
        assert_eq!(
            check_source(&narrow, &url, None).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        let e = check_source(&policy, "ftp://x/y", None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
