//! Request bodies: a bound per route, a deadline for slow senders, and refusals that reach the
//! client. A body is read here, before any handler or refusal runs, so that whatever answers
//! (413, 415, 401, 429, 503 ...) answers a client that has finished sending: a server that answers
//! and closes while the client still sends makes the client's TCP stack see a reset, and an HTTP
//! library (or a browser) then reports a network error instead of our status and reason. A body
//! over its route's limit is read on (and dropped) up to a bound, then refused with 413 and the
//! limit in words.

use app::types::limits::MAX_UPLOAD_BYTES;
use app::{ErrorKind, StudioError};
use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::time::Duration;

/// JSON bodies (server functions, `/api/generate`, the script APIs' generations).
pub const JSON_BODY_LIMIT: usize = 256 * 1024;
/// Multipart framing and text fields around an uploaded image.
const FORM_OVERHEAD: usize = 64 * 1024;
/// At least this much of an oversize body is read before the refusal (a few MB JSON body).
const MIN_DRAIN: usize = 8 * 1024 * 1024;

/// The largest body `path` takes.
pub fn body_limit(path: &str) -> usize {
    match path {
        "/api/upload_image" | "/v1/images/edits" => MAX_UPLOAD_BYTES + FORM_OVERHEAD,
        // the image inside JSON as base64 (4 bytes per 3)
        "/sdapi/v1/img2img" => MAX_UPLOAD_BYTES / 3 * 4 + FORM_OVERHEAD,
        p if p.starts_with("/api/loras/") => app::types::limits::MAX_LORA_UPLOAD_BYTES,
        _ => JSON_BODY_LIMIT,
    }
}

/// How much of a refused body is read and dropped before answering; past it the answer goes out
/// anyway and the connection closes.
fn drain_bound(limit: usize) -> usize {
    (2 * limit).max(MIN_DRAIN)
}

/// "256 KiB", "20 MB".
fn in_words(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{} MB", bytes / (1024 * 1024))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// A refusal in the answering API's own error shape: OpenAI's under `/v1/`, A1111's under
/// `/sdapi/`, the studio's `{kind, reason}` elsewhere.
pub fn refusal(path: &str, e: StudioError) -> Response {
    if path.starts_with("/v1/") {
        super::openai_api::ApiError::from(e).into_response()
    } else if path.starts_with("/sdapi/") {
        super::a1111_api::ApiError::from(e).into_response()
    } else {
        e.into_response()
    }
}

#[derive(Clone, Copy)]
pub struct BodyTimeout(pub Duration);

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Whether the upload server function can read this: `multipart/form-data` with a boundary (a
/// body without one made server_fn fail hard instead of answering).
fn is_multipart_form(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let mut parts = ct.split(';');
    let essence = parts.next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("multipart/form-data")
        && parts.any(|p| {
            let p = p.trim();
            p.len() > "boundary=".len() && p[.."boundary=".len()].eq_ignore_ascii_case("boundary=")
        })
}

enum Read {
    Whole(Bytes),
    /// Over the limit: the rest of the body, unread.
    TooLarge(BodyDataStream),
    Broken(String),
}

async fn read_up_to(body: Body, limit: usize) -> Read {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if buf.len() + c.len() > limit {
                    return Read::TooLarge(stream);
                }
                buf.extend_from_slice(&c);
            }
            Err(e) => return Read::Broken(e.to_string()),
        }
    }
    Read::Whole(Bytes::from(buf))
}

/// Reads and drops up to `bound` bytes; whether the body ended within them.
async fn drain(mut stream: BodyDataStream, bound: usize) -> bool {
    let mut read = 0usize;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                read += c.len();
                if read > bound {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

fn closing(mut res: Response) -> Response {
    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// Refuses after reading the rest of the body (within the drain bound and the deadline).
async fn refuse_after_drain(path: &str, body: BodyDataStream, limit: usize, deadline: Duration, e: StudioError) -> Response {
    let drained = tokio::time::timeout(deadline, drain(body, drain_bound(limit))).await.unwrap_or(false);
    let res = refusal(path, e);
    if drained { res } else { closing(res) }
}

fn too_large(path: &str, limit: usize) -> StudioError {
    let what = if limit > JSON_BODY_LIMIT { "upload" } else { "request body" };
    StudioError::new(
        ErrorKind::PayloadTooLarge,
        format!("The {what} is too large: {path} takes at most {}.", in_words(limit)),
    )
}

/// The middleware: bounds, deadline and early refusals, all answered after the body is read.
pub async fn limit_bodies(State(BodyTimeout(deadline)): State<BodyTimeout>, req: Request, next: Next) -> Response {
    // the body's own size hint knows an empty body (and HTTP/2 bodies need no Content-Length)
    let hint = req.body().size_hint();
    if hint.exact() == Some(0) {
        return next.run(req).await;
    }
    let declared = declared_length(req.headers()).or(hint.exact().map(|n| n as usize));
    let path = req.uri().path().to_string();
    let limit = body_limit(&path);
    let upload_fn = path == "/api/upload_image";
    let early = if declared.is_some_and(|n| n > limit) {
        Some(too_large(&path, limit))
    } else if upload_fn && !is_multipart_form(req.headers()) {
        Some(StudioError::new(
            ErrorKind::UnsupportedMedia,
            "Send the image as multipart/form-data with a field named `image` (a PNG, JPEG or WebP file).",
        ))
    } else {
        None
    };
    let (parts, body) = req.into_parts();
    if let Some(e) = early {
        return refuse_after_drain(&path, body.into_data_stream(), limit, deadline, e).await;
    }
    match tokio::time::timeout(deadline, read_up_to(body, limit)).await {
        Ok(Read::Whole(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Read::TooLarge(rest)) => refuse_after_drain(&path, rest, limit, deadline, too_large(&path, limit)).await,
        Ok(Read::Broken(e)) => closing(refusal(&path, StudioError::invalid(format!("The request body could not be read: {e}")))),
        Err(_) => closing(refusal(
            &path,
            StudioError::new(
                ErrorKind::Timeout,
                format!("The request body came too slowly: it must arrive within {} s.", deadline.as_secs()),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_needs_a_boundary() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            m
        };
        assert!(is_multipart_form(&h("multipart/form-data; boundary=abc")));
        assert!(is_multipart_form(&h("Multipart/Form-Data;Boundary=x")));
        assert!(!is_multipart_form(&h("multipart/form-data")));
        assert!(!is_multipart_form(&h("multipart/form-data; boundary=")));
        assert!(!is_multipart_form(&h("application/json")));
        assert!(!is_multipart_form(&HeaderMap::new()));
    }

    #[test]
    fn limits_in_words() {
        assert_eq!(in_words(JSON_BODY_LIMIT), "256 KiB");
        assert_eq!(in_words(body_limit("/api/upload_image")), "20 MB");
        assert!(body_limit("/sdapi/v1/img2img") > MAX_UPLOAD_BYTES * 4 / 3);
    }
}
