//! Errors of the web layer and how each becomes an HTTP response.
//!
//! API routes answer in OpenAI's error shape (`{"error":{"message","type","code"}}`), pages
//! answer with a small HTML page. Internal details (a database error) are logged for the
//! operator and replaced by a generic message on the wire; no error ever carries a secret.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use std::time::Duration;

/// A request that could not be served.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// No credential, or one that is wrong, expired or revoked.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// The credential is fine but does not allow this (CSRF token or origin check failed).
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("request body too large")]
    TooLarge,
    #[error("too many requests; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// Something on our side failed; the detail is for the log only.
    #[error("internal error")]
    Internal(String),
}

impl WebError {
    pub fn status(&self) -> StatusCode {
        match self {
            WebError::Unauthorized => StatusCode::UNAUTHORIZED,
            WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::NotFound => StatusCode::NOT_FOUND,
            WebError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            WebError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            WebError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the same request may succeed later without being changed.
    pub fn is_retryable(&self) -> bool {
        match self {
            WebError::RateLimited { .. } | WebError::ShuttingDown | WebError::Internal(_) => true,
            WebError::Unauthorized
            | WebError::Forbidden(_)
            | WebError::BadRequest(_)
            | WebError::NotFound
            | WebError::TooLarge => false,
        }
    }

    /// OpenAI's `error.type`.
    pub fn openai_type(&self) -> &'static str {
        match self {
            WebError::Unauthorized => "authentication_error",
            WebError::Forbidden(_) => "permission_error",
            WebError::BadRequest(_) | WebError::TooLarge => "invalid_request_error",
            WebError::NotFound => "not_found_error",
            WebError::RateLimited { .. } => "rate_limit_error",
            WebError::ShuttingDown | WebError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            WebError::Unauthorized => "invalid_api_key",
            WebError::Forbidden(_) => "forbidden",
            WebError::BadRequest(_) => "invalid_request",
            WebError::NotFound => "not_found",
            WebError::TooLarge => "request_too_large",
            WebError::RateLimited { .. } => "rate_limit_exceeded",
            WebError::ShuttingDown => "shutting_down",
            WebError::Internal(_) => "internal_error",
        }
    }

    /// The message shown to the client: never the internal detail.
    pub fn public_message(&self) -> String {
        match self {
            WebError::Unauthorized => "Missing or invalid credentials. Send 'Authorization: Bearer <your moltmate token>'.".to_string(),
            WebError::Internal(_) => "Something went wrong on the server. Please try again later.".to_string(),
            other => other.to_string(),
        }
    }

    /// The error as OpenAI's JSON error object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.public_message(), "type": self.openai_type(), "code": self.code() }
        })
    }

    fn log(&self) {
        if let WebError::Internal(detail) = self {
            tracing::error!(error = %detail, "web request failed");
        }
    }

    fn decorate(&self, response: &mut Response) {
        if let WebError::RateLimited { retry_after } = self {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if matches!(self, WebError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
    }

    /// The error as a small HTML page (for browser routes).
    pub fn into_html(self) -> Response {
        self.log();
        let body = crate::html::error_page(self.status(), &self.public_message());
        let mut response = (self.status(), Html(body)).into_response();
        self.decorate(&mut response);
        response
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (self.status(), axum::Json(self.to_json())).into_response();
        self.decorate(&mut response);
        response
    }
}

impl From<moltmate_store::StoreError> for WebError {
    fn from(e: moltmate_store::StoreError) -> Self {
        WebError::Internal(e.to_string())
    }
}

impl From<moltmate_core::channel::AcceptError> for WebError {
    fn from(e: moltmate_core::channel::AcceptError) -> Self {
        use moltmate_core::channel::AcceptError;
        match e {
            AcceptError::ShuttingDown => WebError::ShuttingDown,
            AcceptError::Storage(detail) => WebError::Internal(detail),
        }
    }
}

/// A browser-route error: same classification, rendered as HTML.
#[derive(Debug)]
pub struct PageError(pub WebError);

impl From<WebError> for PageError {
    fn from(e: WebError) -> Self {
        PageError(e)
    }
}

impl From<moltmate_store::StoreError> for PageError {
    fn from(e: moltmate_store::StoreError) -> Self {
        PageError(e.into())
    }
}

impl From<moltmate_ops::OpsError> for PageError {
    fn from(e: moltmate_ops::OpsError) -> Self {
        match e {
            moltmate_ops::OpsError::NoSuchUser(_) => PageError(WebError::NotFound),
            e if e.is_refusal() => PageError(WebError::BadRequest(e.to_string())),
            e => PageError(WebError::Internal(e.to_string())),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        self.0.into_html()
    }
}

/// Settings the web layer cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSettings {
    #[error("the rate limit per minute must be at least 1")]
    ZeroRate,
    #[error("the rate limit burst must be at least 1")]
    ZeroBurst,
}
