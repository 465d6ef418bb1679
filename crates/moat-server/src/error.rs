//! The one mapping from failures to HTTP: OpenAI-shaped bodies
//! (`{"error":{"message","type","param","code"}}`) with the status codes of
//! DESIGN.md. Messages never contain secrets or request payloads.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use moat_engine::EngineError;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<String>,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(param: Option<String>, message: impl Into<String>) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
                message,
            )
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", "forbidden", message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or is not served here"),
            )
        }
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "no such route",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "this route does not accept that HTTP method",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body exceeds inference.max_body_bytes ({limit} bytes)"),
        )
    }

    /// 503 with `Retry-After` (whole seconds, at least 1): the model's
    /// queue or KV-cache budget is full.
    pub fn overloaded(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded_error",
                "overloaded",
                message,
            )
        }
    }

    pub fn audit_unavailable() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "audit_unavailable",
                "the audit record of this request could not be written; the request was refused (audit.fail_closed)",
            )
        }
    }

    /// 504: no response head within `limits.request_timeout`.
    pub fn timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "request_timeout",
            format!("no response within {limit:?} (limits.request_timeout)"),
        )
    }

    /// 429 with `Retry-After` (whole seconds, rounded up, at least 1).
    pub fn rate_limited(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", code, message)
        }
    }

    /// 503: the shared rate limiter did not answer (`on_redis_error = "closed"`).
    pub fn limiter_unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "rate_limiter_unavailable",
                message,
            )
        }
    }

    /// The server is shutting down and the drain deadline passed.
    pub fn shutting_down() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "the server is shutting down and its drain deadline passed; retry the request \
                 (another replica will answer it)",
            )
        }
    }

    /// 503: no upstream of the model could answer; `Retry-After` is when
    /// the first one comes out of its cooldown.
    pub fn upstream_unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "upstream_unavailable",
                message,
            )
        }
    }

    /// 502: an upstream failed in a way no retry could hide (mid-stream).
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", "upstream_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest { param, message } => ApiError::bad_request(param, message),
            EngineError::Overloaded { retry_after, .. } => ApiError::overloaded(e.to_string(), retry_after),
            EngineError::Unavailable { retry_after, .. } => {
                ApiError::upstream_unavailable(e.to_string(), retry_after)
            }
            EngineError::BadGateway(m) => ApiError::bad_gateway(m),
            EngineError::Load { .. } | EngineError::Inference(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // Lets the request record carry the error code.
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

/// The error code of a rejected request, for the request record.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);
