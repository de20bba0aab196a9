//! The one error type of the studio: what went wrong (`kind`, which maps to an HTTP status) and a
//! sentence for the user (`reason`). Server functions return it (serialized as JSON with the status
//! set from `kind`), the websocket and the plain axum routes answer with it, the UI shows `reason`.

use serde::{Deserialize, Serialize};
use server_fn::{codec::JsonEncoding, error::FromServerFnError, ServerFnError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input: 400.
    InvalidInput,
    /// Unknown job / image / upload id: 404.
    NotFound,
    /// Upload larger than the limit: 413.
    PayloadTooLarge,
    /// Upload of a type we don't read: 415.
    UnsupportedMedia,
    /// The job queue is full: 503.
    QueueFull,
    /// This client sent too many jobs (per minute, or waiting at once): 429, with `retry_after_secs`.
    RateLimited,
    /// The server is starting (model loading) or draining before it stops: 503.
    Unavailable,
    /// The request body came too slowly: 408.
    Timeout,
    /// A request that needs the server's API key came without it: 401.
    Unauthorized,
    /// The job was cancelled (by a `cancel_job` call) before it finished: 409.
    Cancelled,
    /// The browser could not reach the server (client side only).
    Network,
    /// Anything else: 500.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidInput => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UnsupportedMedia => 415,
            ErrorKind::QueueFull => 503,
            ErrorKind::RateLimited => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 408,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Cancelled => 409,
            ErrorKind::Network => 502,
            ErrorKind::Internal => 500,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}")]
pub struct StudioError {
    pub kind: ErrorKind,
    pub reason: String,
    /// When to try again (the `Retry-After` header), for refusals that pass with time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl StudioError {
    pub fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        StudioError { kind, reason: reason.into(), retry_after_secs: None }
    }
    /// The same refusal, saying when to try again.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, reason)
    }
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, reason)
    }
    pub fn internal(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, reason)
    }
    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

impl FromServerFnError for StudioError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(value: server_fn::error::ServerFnErrorErr) -> Self {
        use server_fn::error::ServerFnErrorErr as E;
        match value {
            E::Args(m) | E::MissingArg(m) => {
                StudioError::invalid(format!("The request could not be read: {m}"))
            }
            E::Request(m) => StudioError::new(
                ErrorKind::Network,
                format!("Could not reach the server ({m}). Check your connection and try again."),
            ),
            // on the server this is a request body that does not match the arguments
            E::Deserialization(m) if !cfg!(target_arch = "wasm32") => {
                StudioError::invalid(format!("The request could not be read: {m}"))
            }
            E::Deserialization(m) => {
                StudioError::internal(format!("The server's answer could not be read: {m}"))
            }
            other => StudioError::internal(other.to_string()),
        }
    }
}

impl From<ServerFnError> for StudioError {
    fn from(e: ServerFnError) -> Self {
        StudioError::internal(e.to_string())
    }
}

#[cfg(feature = "ssr")]
pub use ssr::with_retry_after;

#[cfg(feature = "ssr")]
mod ssr {
    use super::StudioError;
    use axum::response::{IntoResponse, Response};

    /// Adds `Retry-After` when the refusal says when to try again; every API shape (the studio's,
    /// OpenAI's, A1111's) answers through this.
    pub fn with_retry_after(mut res: Response, retry_after_secs: Option<u64>) -> Response {
        if let Some(secs) = retry_after_secs {
            res.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        res
    }

    impl IntoResponse for StudioError {
        fn into_response(self) -> Response {
            let status = axum::http::StatusCode::from_u16(self.status())
                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
            let retry = self.retry_after_secs;
            with_retry_after((status, axum::Json(self)).into_response(), retry)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = StudioError::new(ErrorKind::QueueFull, "The queue is full.");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"kind":"queue_full","reason":"The queue is full."}"#
        );
        assert_eq!(e.status(), 503);
        assert_eq!(e.to_string(), "The queue is full.");
        let e = StudioError::new(ErrorKind::RateLimited, "Slow down.").retry_after(7);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"kind":"rate_limited","reason":"Slow down.","retry_after_secs":7}"#
        );
        assert_eq!(e.status(), 429);
        let back: StudioError = serde_json::from_str(r#"{"kind":"unavailable","reason":"x"}"#).unwrap();
        assert_eq!(back.retry_after_secs, None);
    }
}
