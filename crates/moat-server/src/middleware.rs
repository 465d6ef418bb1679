//! The layers every request passes, outermost first. Before any of them,
//! the accept loop (`listen.rs`) has already applied the network allowlist,
//! TLS and the connection limits (header bytes, header-read and idle
//! timeouts).
//!
//! 1. [`request_context`]: mints the request id (answered in `x-request-id`
//!    on every response, errors included) and the [`RequestContext`] that
//!    records the request when it ends; it sits outermost so that requests
//!    rejected by any later layer are still recorded, audited and counted.
//! 2. [`request_timeout`]: the time to the response head is bounded (504).
//! 3. [`authenticate`]: every route needs a credential (API key, JWT, or a
//!    mapped client certificate) unless it is in the plane's public list,
//!    so a new route cannot skip authentication by being forgotten. The
//!    [`Principal`] goes into the request extensions.
//! 4. authorize: role permissions (`[rbac]`): [`require_admin`]
//!    (`metrics:read`) on the metrics plane, [`require_inference`] on the
//!    inference plane and `management::authorize` (plus TOTP step-up) on
//!    the management plane; per-model scopes in the handlers.
//! 5. [`rate_limit`]: global cap, per-principal concurrency and
//!    requests/min; it needs the principal, so it comes after
//!    authentication (an unauthenticated flood is refused by the cheaper
//!    checks above, and counted). Token budgets are charged in the chat
//!    handler, once `max_tokens` is known.
//! 6. the handler.

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

fn new_request_id() -> String {
    let mut b = [0u8; 12];
    // Ids need to be unique, not secret; fall back to time if the OS has no
    // randomness rather than failing the request.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&t.to_le_bytes()[..12]);
    }
    hex::encode(b)
}

pub async fn request_context(
    State((state, plane)): State<(Arc<AppState>, Plane)>,
    mut req: Request,
    next: Next,
) -> Response {
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
        plane,
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
    let mut resp = next.run(req).await;
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
    resp
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

pub async fn authenticate(
    State((state, public)): State<(Arc<AppState>, PublicRoutes)>,
    mut req: Request,
    next: Next,
) -> Response {
    if public.0.iter().any(|p| p == req.uri().path()) {
        return next.run(req).await;
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
            next.run(req).await
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
            resp
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
pub async fn rate_limit(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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

/// Bounds the time to the response head (`limits.request_timeout`): a
/// handler stuck behind a slow engine answers 504 instead of holding the
/// connection forever. Streams are not cut once their head is sent.
pub async fn request_timeout(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::timeout(state.request_timeout).into_response(),
    }
}

/// Metrics need the `metrics:read` permission (an admin by default) unless
/// `metrics.public = true`. The reason label stays `admin_required`, the
/// name dashboards already count.
pub async fn require_admin(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.metrics_public {
        return next.run(req).await;
    }
    match req.extensions().get::<Principal>() {
        Some(p)
            if state
                .rbac_for(req.extensions())
                .allows(p, Permission::MetricsRead) =>
        {
            next.run(req).await
        }
        _ => {
            if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
                ctx.set_rejection(Rejection::new("rbac", "admin_required"));
            }
            ApiError::forbidden("this route needs the metrics:read permission (an admin key by default)")
                .into_response()
        }
    }
}

/// The OpenAI routes (`/v1/...`) need the `inference` permission; `/health`
/// and `/ready` need only a credential (or none when public).
pub async fn require_inference(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    match req.extensions().get::<Principal>() {
        Some(p) if !state.rbac_for(req.extensions()).allows(p, Permission::Inference) => {
            if let Some(ctx) = req.extensions().get::<Arc<RequestContext>>() {
                ctx.set_rejection(Rejection::new("rbac", "missing_permission"));
            }
            ApiError::forbidden(format!(
                "role {} lacks the inference permission this route needs",
                p.role
            ))
            .into_response()
        }
        _ => next.run(req).await,
    }
}
