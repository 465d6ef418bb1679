//! The checks every request passes, in one layer ([`guard`]) that runs
//! them in order. Before it, the accept loop (`listen.rs`) has already
//! applied the network allowlist, TLS and the connection limits (header
//! bytes, header-read and idle timeouts).
//!
//! 1. the request context: mints the request id (answered in
//!    `x-request-id` on every response, errors included) and the
//!    [`RequestContext`] that records the request when it ends; it comes
//!    first so that requests refused by any later check are still
//!    recorded, audited and counted.
//! 2. the request timeout: the time to the response head is bounded (504).
//! 3. [`authenticate`]: every route needs a credential (API key, JWT, or a
//!    mapped client certificate) unless it is in the plane's public list,
//!    so a new route cannot skip authentication by being forgotten. The
//!    [`Principal`] goes into the request extensions.
//! 4. authorize ([`Authorize`]): role permissions (`[rbac]`):
//!    `metrics:read` on the metrics plane, `inference` on the inference
//!    plane and `management::authorize` (plus TOTP step-up) on the
//!    management plane; per-model scopes in the handlers.
//! 5. [`rate_limit`]: global cap, per-principal concurrency and
//!    requests/min; it needs the principal, so it comes after
//!    authentication (an unauthenticated flood is refused by the cheaper
//!    checks above, and counted). Token budgets are charged in the chat
//!    handler, once `max_tokens` is known.
//! 6. the handler.
//!
//! One layer rather than one per check: each axum layer clones and boxes
//! the service and its future on every request, and on the proxy path
//! (bench/guard.sh) those layers cost more than the checks themselves.

use crate::auth::{TokenRefusal, mtls_principal};
use crate::error::{ApiError, ErrorCode};
use crate::listen::ClientCert;
use crate::metrics::{Plane, Rejection};
use crate::state::{AppState, RequestContext};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moat_guard::{AuthError, Permission, Principal};
use std::sync::Arc;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C Trace Context: a caller's trace, continued by ours.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A request id: 24 hex digits, unique within the process and unlikely to
/// repeat across restarts. Ids need to be unique, not secret, and one is
/// minted per request, so no syscall: a process-wide counter under a
/// random per-process key, through a bijective mix (distinct counters give
/// distinct ids), after a random per-process prefix.
fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<(u32, u64)> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (prefix, key) = *SEED.get_or_init(|| {
        let mut b = [0u8; 12];
        if getrandom::fill(&mut b).is_err() {
            // No OS randomness: the start time still separates restarts.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            b.copy_from_slice(&t.to_le_bytes()[..12]);
        }
        let [p0, p1, p2, p3, k @ ..] = b;
        (u32::from_le_bytes([p0, p1, p2, p3]), u64::from_le_bytes(k))
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed) ^ key;
    format!("{prefix:08x}{:016x}", mix64(n))
}

/// SplitMix64's finaliser: a bijection on u64 that scatters neighbouring
/// inputs, so consecutive ids do not look consecutive.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a plane checks once the caller is known.
#[derive(Clone)]
pub enum Authorize {
    /// `/v1/...` needs the `inference` permission.
    Inference,
    /// `/metrics` needs `metrics:read` unless `metrics.public`.
    Metrics,
    /// Per-route permissions, model control and TOTP step-up.
    Management(Arc<crate::management::Management>),
}

/// One plane's checks: the state, which plane it is (for the records and
/// metrics), its public routes and its authorization.
#[derive(Clone)]
pub struct Guard {
    pub state: Arc<AppState>,
    pub plane: Plane,
    /// The plane speaks TLS: responses carry HSTS.
    pub tls: bool,
    pub public: PublicRoutes,
    pub authorize: Authorize,
}

/// The layer: context, timeout, authentication, authorization, rate
/// limits, in that order (see the module comment).
pub async fn guard(State(g): State<Guard>, mut req: Request, next: Next) -> Response {
    let state = &g.state;
    let id = new_request_id();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let ctx = Arc::new(RequestContext::new(
        state.clone(),
        id.clone(),
        req.method().to_string(),
        req.uri().path().to_owned(),
        route,
        g.plane,
    ));
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let client = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    ctx.start_trace(req.headers().get(&TRACEPARENT).and_then(|v| v.to_str().ok()));
    req.extensions_mut().insert(ctx.clone());
    let mut resp = match tokio::time::timeout(state.request_timeout, checked(&g, req, next)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::timeout(state.request_timeout).into_response(),
    };
    ctx.set_status(resp.status().as_u16());
    if let Some(code) = resp.extensions().get::<ErrorCode>() {
        ctx.set_error(code.0);
    }
    // The audit record of the decision. Fail-closed: it must be durable
    // before any byte of the response (streams included) leaves, else 503.
    if let Some(audit) = &state.audit {
        let rec = ctx.audit_record(client);
        let written = if state.audit_fail_closed {
            audit.append_async(rec).await
        } else {
            audit.submit(rec)
        };
        if let Err(e) = written {
            // The log counts every unwritten record itself (see /metrics).
            tracing::error!(error = %e, request_id = %id, "audit record not written");
            if state.audit_fail_closed {
                resp = ApiError::audit_unavailable().into_response();
                ctx.set_status(resp.status().as_u16());
                ctx.set_error("audit_unavailable");
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    // A refusal can be answered before the request body has arrived; hyper
    // then closes the connection after the answer (it cannot reuse a
    // connection with a body still in flight) but says nothing, and a
    // client that reuses the connection at once sees it vanish under its
    // next request. Found by bench/soak. Saying `Connection: close` on those
    // answers makes the close explicit: the client opens a new connection.
    if has_body && is_early_refusal(resp.status()) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    security_headers(&mut resp, g.tls);
    resp
}

/// Response headers every plane sends: `nosniff` everywhere (error bodies
/// are JSON and must never be sniffed as HTML), HSTS on TLS planes. No
/// `Server` header is ever added, so no version is advertised.
fn security_headers(resp: &mut Response, tls: bool) {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000"),
        );
    }
    h.remove(header::SERVER);
}

/// Steps 3 to 6, under the request timeout.
async fn checked(g: &Guard, req: Request, next: Next) -> Response {
    let req = match authenticate(&g.state, &g.public, req).await {
        Ok(req) => req,
        Err(refused) => return refused,
    };
    let authorized = match &g.authorize {
        Authorize::Inference => require_inference(&g.state, req),
        Authorize::Metrics => require_admin(&g.state, req),
        Authorize::Management(m) => crate::management::authorize(m, req),
    };
    match authorized {
        Ok(req) => rate_limit(&g.state, req, next).await,
        Err(refused) => refused,
    }
}

/// Statuses the layers before the handler answer without reading the body
/// (authentication, authorization, body limit, rate limits). Not 503: an
/// overloaded engine is refused after the body was read, and closing
/// connections under overload would add reconnections to the load.
fn is_early_refusal(status: axum::http::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 413 | 429)
}

/// Which public-route list a plane uses.
#[derive(Clone)]
pub struct PublicRoutes(pub Arc<Vec<String>>);

/// The caller's [`Principal`] into the request, or the refusal.
pub async fn authenticate(
    state: &AppState,
    public: &PublicRoutes,
    mut req: Request,
) -> Result<Request, Response> {
    if public.0.iter().any(|p| p == req.uri().path()) {
        return Ok(req);
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let now = moat_guard::keys::now_unix();
    let bearer = header.and_then(|h| {
        let (scheme, token) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    // One version of each for the whole request (see `reload.rs`).
    let jwt = state.jwt.load();
    let rbac = state.rbac.load();
    let result = match (bearer, jwt.as_ref()) {
        // Not a moat key: a JWT when issuers are configured.
        (Some(token), Some(jwt)) if !token.starts_with(moat_guard::keys::KEY_PREFIX) => {
            let token = token.to_owned();
            jwt.authenticate(&token, now).await.map_err(|r| match r {
                TokenRefusal::Invalid(e) => Refusal::Unauthenticated(e.reason(), e.to_string()),
                TokenRefusal::NoGrant { reason, message } => Refusal::Forbidden(reason, message),
            })
        }
        _ if header.is_none() => match req.extensions().get::<ClientCert>().and_then(|c| c.0.clone()) {
            Some(name) => mtls_principal(&name, &state.mtls_roles.load()).ok_or_else(|| {
                Refusal::Unauthenticated(
                    "mtls_unmapped",
                    format!("client certificate {name:?} is not mapped to a role ([auth.mtls] roles)"),
                )
            }),
            None => Err(key_refusal(AuthError::Missing)),
        },
        _ => state.keyring().authenticate(header, now).map_err(key_refusal),
    };
    match result {
        Ok(principal) => {
            if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
                ctx.set_key(&principal.key_id);
            }
            req.extensions_mut().insert(principal);
            req.extensions_mut().insert(crate::state::RbacSnapshot(rbac));
            Ok(req)
        }
        Err(refusal) => {
            let (stage, reason, resp) = match refusal {
                Refusal::Unauthenticated(reason, msg) => {
                    let mut resp = ApiError::unauthenticated(msg).into_response();
                    resp.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    ("auth", reason, resp)
                }
                Refusal::Forbidden(reason, msg) => ("rbac", reason, ApiError::forbidden(msg).into_response()),
            };
            if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
                ctx.set_rejection(Rejection::new(stage, reason));
            }
            Err(resp)
        }
    }
}

/// Why authentication refused, with the metrics reason and the message.
enum Refusal {
    Unauthenticated(&'static str, String),
    Forbidden(&'static str, String),
}

fn key_refusal(e: AuthError) -> Refusal {
    let reason = match &e {
        AuthError::Missing => "missing_key",
        AuthError::Invalid => "invalid_key",
        AuthError::Revoked(_) => "revoked_key",
        AuthError::Expired(_) => "expired_key",
    };
    let msg = match e {
        AuthError::Invalid => "Incorrect API key provided".to_owned(),
        other => other.to_string(),
    };
    Refusal::Unauthenticated(reason, msg)
}

/// Rate limits (after authentication: the limits are per principal and
/// per role). Public routes carry no principal and are not limited here;
/// the global cap applies to authenticated traffic on the inference plane
/// only: shedding load must not blind the operator (metrics scrapes) or
/// lock out the administrators who would fix it.
pub async fn rate_limit(state: &AppState, req: Request, next: Next) -> Response {
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        return next.run(req).await;
    };
    let ctx = req.extensions().get::<Arc<RequestContext>>().cloned();
    let global = ctx.as_ref().is_none_or(|c| c.plane() == Plane::Inference);
    match state.rate.load().admit(&principal, global).await {
        Ok(admission) => {
            if let Some(ctx) = &ctx {
                ctx.mark_admitted();
            }
            if let (Some(ctx), Some(p)) = (&ctx, admission.permit) {
                ctx.hold_permit(p);
            }
            let mut resp = next.run(req).await;
            for (name, value) in admission.headers {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    resp.headers_mut().insert(name, v);
                }
            }
            resp
        }
        Err(refused) => {
            if let Some(ctx) = &ctx {
                ctx.set_rejection(Rejection::new("rate_limit", refused.reason));
            }
            refused_response(refused)
        }
    }
}

/// The answer to a request a limit refused: 429 (503 when the limiter
/// itself is unavailable) with `Retry-After`.
pub fn refused_response(r: crate::ratelimit::Refused) -> Response {
    if r.unavailable {
        ApiError::limiter_unavailable(r.message).into_response()
    } else {
        ApiError::rate_limited(r.reason, r.message, r.retry_after).into_response()
    }
}

/// Metrics need the `metrics:read` permission (an admin by default) unless
/// `metrics.public = true`. The reason label stays `admin_required`, the
/// name dashboards already count.
#[allow(
    clippy::result_large_err,
    reason = "the Ok side, the request, is as large: boxing the refusal would not shrink the result"
)]
pub fn require_admin(state: &AppState, req: Request) -> Result<Request, Response> {
    if state.metrics_public {
        return Ok(req);
    }
    match req.extensions().get::<Principal>() {
        Some(p)
            if state
                .rbac_for(req.extensions())
                .allows(p, Permission::MetricsRead) =>
        {
            Ok(req)
        }
        _ => {
            if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
                ctx.set_rejection(Rejection::new("rbac", "admin_required"));
            }
            Err(
                ApiError::forbidden("this route needs the metrics:read permission (an admin key by default)")
                    .into_response(),
            )
        }
    }
}

/// The OpenAI routes (`/v1/...`) need the `inference` permission; `/health`
/// and `/ready` need only a credential (or none when public).
#[allow(
    clippy::result_large_err,
    reason = "the Ok side, the request, is as large: boxing the refusal would not shrink the result"
)]
pub fn require_inference(state: &AppState, req: Request) -> Result<Request, Response> {
    if !req.uri().path().starts_with("/v1/") {
        return Ok(req);
    }
    let Some(p) = req.extensions().get::<Principal>() else {
        return Ok(req);
    };
    match state.rbac_for(req.extensions()).check(p, Permission::Inference) {
        Ok(()) => Ok(req),
        Err(denied) => {
            if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
                ctx.set_rejection(Rejection::new("rbac", "missing_permission"));
            }
            // Names an undefined role as such, not as lacking a permission.
            Err(ApiError::forbidden(denied.to_string()).into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_unique_24_hex_digits() {
        let mut ids: Vec<String> = (0..10_000).map(|_| super::new_request_id()).collect();
        assert!(
            ids.iter()
                .all(|i| i.len() == 24 && i.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 10_000);
    }
}
