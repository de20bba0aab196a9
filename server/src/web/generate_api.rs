//! `POST /api/generate`: the studio in one HTTP request, for scripts. The body is the JSON of a
//! [`JobRequest`] (what the browser submits); the job goes through the same checks and the same
//! fair queue as the browser's, the request waits for it, and the answer is the PNG itself, with
//! the seed, image id and share page in headers (or the [`JobResult`] JSON when the client accepts
//! `application/json`). A client that goes away cancels its job. Errors are the studio's JSON
//! `{kind, reason}` with the kind's status.

use app::backend::Backend;
use app::types::{JobEvent, JobRequest, JobResult};
use app::{ErrorKind, StudioError};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

use super::studio::Studio;

/// Cancels the job when the request is dropped before the job ended (the client disconnected).
struct CancelOnDrop {
    studio: Arc<Studio>,
    job_id: Option<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.job_id.take() {
            let _ = self.studio.cancel(&id);
        }
    }
}

pub async fn generate(
    State(studio): State<Arc<Studio>>,
    headers: HeaderMap,
    body: Result<Json<JobRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return StudioError::invalid(format!("The request body is not a generation request: {}", e.body_text())).into_response(),
    };
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("image/png"));
    // Subscribe before submitting, so no event of the job can be missed.
    let mut events = studio.queue.subscribe();
    let ticket = match studio.submit(req) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let mut guard = CancelOnDrop { studio: studio.clone(), job_id: Some(ticket.job_id.clone()) };
    let outcome = loop {
        match events.recv().await {
            Ok(ev) if ev.is_terminal() && ev.job_id() == ticket.job_id => break ev,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                if let Some(ev) = studio.queue.snapshot(&ticket.job_id).filter(JobEvent::is_terminal) {
                    break ev;
                }
            }
            Err(RecvError::Closed) => return StudioError::internal("The studio is shutting down.").into_response(),
        }
    };
    guard.job_id = None;
    match outcome {
        JobEvent::Done { result, .. } if wants_json => Json(result).into_response(),
        JobEvent::Done { result, .. } => png_response(&studio, &result).await,
        JobEvent::Error { reason, .. } => StudioError::internal(reason).into_response(),
        _ => StudioError::new(ErrorKind::Cancelled, "The job was cancelled before it finished.").into_response(),
    }
}

async fn png_response(studio: &Studio, result: &JobResult) -> Response {
    let mut res = super::png_file(studio.store.image_path(&result.image_id), "no-store").await;
    if !res.status().is_success() {
        return StudioError::internal("The finished image could not be read back from the image store.").into_response();
    }
    let value = |v: String| HeaderValue::from_str(&v).expect("ids, numbers and paths are valid header values");
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_LOCATION, value(result.image_url.clone()));
    headers.insert("x-image-id", value(result.image_id.clone()));
    headers.insert("x-share-url", value(result.share_url.clone()));
    headers.insert("x-seed", value(result.seed.to_string()));
    headers.insert("x-size", value(format!("{}x{}", result.width, result.height)));
    res
}
