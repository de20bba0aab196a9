//! `POST /api/generate`: the studio in one HTTP request, for scripts. The body is the JSON of a
//! [`JobRequest`] (what the browser submits); the job goes through the same checks and the same
//! fair queue as the browser's, the request waits for it, and the answer is the PNG itself, with
//! the seed, image id and share page in headers (or the [`JobResult`] JSON when the client accepts
//! `application/json`). A client that goes away cancels its job. Errors are the studio's JSON
//! `{kind, reason}` with the kind's status.

use app::backend::ClientId;
use app::types::{JobRequest, JobResult};
use app::StudioError;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

use super::studio::Studio;

pub async fn generate(
    State(studio): State<Arc<Studio>>,
    client: ClientId,
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
    match super::jobs::run_jobs(&studio, app::types::JobSource::HttpApi, &client, vec![req], |_| {}).await {
        Ok(mut results) => {
            let result = results.remove(0);
            if wants_json {
                Json(result).into_response()
            } else {
                png_response(&studio, &result).await
            }
        }
        Err(e) => e.into_response(),
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
