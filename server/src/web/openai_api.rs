//! The OpenAI Images API on the studio's queue, for the `openai` SDKs and the tools built on them:
//! `POST /v1/images/generations` (JSON), `POST /v1/images/edits` (multipart: Transform),
//! `GET /v1/models`, `GET /v1/models/{id}`. Answers and errors have OpenAI's shapes
//! (`{"created", "data": [{"b64_json" | "url", "revised_prompt"}]}`,
//! `{"error": {"message", "type", "param", "code"}}`). Our extensions ride as extra body fields:
//! `seed`, `steps`, `style`, `negative_prompt`, and `strength` for edits. Every job goes through the
//! studio's own checks and fair queue; a client that disconnects cancels its jobs.

use app::backend::{Backend, ClientId};
use app::types::{limits, JobKind, JobRequest, JobResult, LoraChoice, Style, ASPECT_RATIOS};
use app::{ErrorKind, StudioError};
use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use super::studio::Studio;

/// The model id clients name (`model=`); the server's own model name is accepted too.
pub const MODEL_ID: &str = "z-image-turbo";
const DEFAULT_STEPS: u32 = 8;
const MAX_IMAGES: u64 = 4;

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// `Retry-After` in seconds, for refusals that pass with time.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: Some(param.into()), code: None, retry_after: None }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: message.into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key"), retry_after: None }
    }
}

impl From<StudioError> for ApiError {
    fn from(e: StudioError) -> Self {
        let (kind, code) = match e.kind {
            ErrorKind::InvalidInput => ("invalid_request_error", None),
            ErrorKind::NotFound => ("invalid_request_error", Some("not_found")),
            ErrorKind::PayloadTooLarge => ("invalid_request_error", Some("payload_too_large")),
            ErrorKind::UnsupportedMedia => ("invalid_request_error", Some("unsupported_image")),
            ErrorKind::QueueFull => ("server_error", Some("queue_full")),
            // OpenAI's own rate-limit answers are 429 with type `requests` and code `rate_limit_exceeded`
            ErrorKind::RateLimited => ("requests", Some("rate_limit_exceeded")),
            ErrorKind::Unavailable => ("server_error", Some("unavailable")),
            ErrorKind::Timeout => ("invalid_request_error", Some("timeout")),
            ErrorKind::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ErrorKind::Cancelled => ("server_error", Some("cancelled")),
            ErrorKind::Network | ErrorKind::Internal => ("server_error", None),
        };
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self { status, message: e.reason, kind, param: None, code, retry_after: e.retry_after_secs }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        app::error::with_retry_after((self.status, Json(body)).into_response(), self.retry_after)
    }
}

/// One request's fields as JSON values (a JSON body, or multipart text fields parsed as JSON where
/// they are numbers).
struct Fields(Map<String, Value>);

impl Fields {
    fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(name, format!("`{name}` must be a string."))),
        }
    }
    /// `loras: [{"name", "scale"}]` (the `openai` SDK sends it in `extra_body`; a multipart form
    /// as a JSON text field).
    fn loras(&self) -> Result<Vec<LoraChoice>, ApiError> {
        let v = match self.0.get("loras") {
            None | Some(Value::Null) => return Ok(vec![]),
            Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| ApiError::invalid("loras", format!("`loras` is not JSON: {e}")))?,
            Some(v) => v.clone(),
        };
        serde_json::from_value(v).map_err(|e| ApiError::invalid("loras", format!("`loras` must be a list of {{\"name\", \"scale\"}}: {e}")))
    }
    fn int(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let v = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(_) => None,
        };
        match v {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::invalid(name, format!("`{name}` must be an integer from {min} to {max}."))),
        }
    }
    fn float(&self, name: &str) -> Result<Option<f32>, ApiError> {
        let v = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        };
        v.filter(|v| v.is_finite()).map(|v| Some(v as f32)).ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a number.")))
    }
}

fn allowed_sizes() -> String {
    ASPECT_RATIOS.iter().map(|r| format!("{}x{}", r.width, r.height)).collect::<Vec<_>>().join(", ")
}

/// "WxH" -> one of the studio's 18 sizes.
pub fn parse_size(s: &str) -> Result<(u32, u32), ApiError> {
    let parsed = s.split_once('x').and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)));
    match parsed {
        Some((w, h)) if ASPECT_RATIOS.iter().any(|r| r.width == w && r.height == h) => Ok((w, h)),
        _ => Err(ApiError::invalid("size", format!("`size` must be one of: {}.", allowed_sizes()))),
    }
}

pub fn parse_style(s: &str) -> Result<Style, ApiError> {
    serde_json::from_value(Value::String(s.to_string())).map_err(|_| {
        let names: Vec<String> = Style::ALL.iter().map(|s| serde_json::to_value(s).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()).collect();
        ApiError::invalid("style", format!("`style` must be one of: {}.", names.join(", ")))
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Url,
    B64Json,
}

/// What both endpoints share, checked.
struct Common {
    prompt: String,
    negative_prompt: String,
    n: u64,
    size: Option<(u32, u32)>,
    format: Format,
    seed: Option<u64>,
    steps: u32,
    style: Style,
    loras: Vec<LoraChoice>,
    variation: f32,
}

fn common(f: &Fields, studio: &Studio) -> Result<Common, ApiError> {
    let prompt = f.str("prompt")?.ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required."))?.to_string();
    if let Some(model) = f.str("model")? {
        let ours = studio.info().model;
        if model != MODEL_ID && model != ours {
            return Err(ApiError { code: Some("model_not_found"), ..ApiError::invalid("model", format!("The model `{model}` does not exist here; use `{MODEL_ID}`.")) });
        }
    }
    let format = match f.str("response_format")? {
        None | Some("url") => Format::Url,
        Some("b64_json") => Format::B64Json,
        Some(other) => return Err(ApiError::invalid("response_format", format!("`response_format` must be `url` or `b64_json`, not `{other}`."))),
    };
    let n = f.int("n", 1, MAX_IMAGES)?.unwrap_or(1);
    let seed = f.int("seed", 0, limits::MAX_SEED)?;
    if let Some(s) = seed {
        if s + n - 1 > limits::MAX_SEED {
            return Err(ApiError::invalid("seed", format!("With n = {n}, `seed` must be at most {} (image i uses seed + i, up to {}).", limits::MAX_SEED - (n - 1), limits::MAX_SEED)));
        }
    }
    let steps = f.int("steps", limits::MIN_STEPS as u64, limits::MAX_STEPS as u64)?.map(|s| s as u32).unwrap_or(DEFAULT_STEPS);
    let style = f.str("style")?.map(parse_style).transpose()?.unwrap_or_default();
    let size = f.str("size")?.filter(|s| *s != "auto").map(parse_size).transpose()?;
    let loras = f.loras()?;
    let variation = f
        .float("variation")
        .ok()
        .map(|v| v.unwrap_or(0.0))
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| ApiError::invalid("variation", "`variation` must be a number between 0 and 1."))?;
    Ok(Common { prompt, negative_prompt: f.str("negative_prompt")?.unwrap_or_default().to_string(), n, size, format, seed, steps, style, loras, variation })
}

/// The seeds of n images: seed..seed+n-1, the first random when none was given.
fn seeds(seed: Option<u64>, n: u64) -> Vec<u64> {
    let base = seed.unwrap_or_else(|| super::store::random_seed() % (limits::MAX_SEED - n + 2));
    (0..n).map(|i| base + i).collect()
}

/// Where clients reach this server, for `url` answers: the request's Host (and a proxy's
/// X-Forwarded-Proto).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    let proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).filter(|p| *p == "https").unwrap_or("http");
    format!("{proto}://{host}")
}

async fn answer(studio: &Arc<Studio>, client: &ClientId, c: &Common, kind_of: impl Fn() -> JobKind, headers: &HeaderMap) -> Result<Response, ApiError> {
    let reqs: Vec<JobRequest> = seeds(c.seed, c.n)
        .into_iter()
        .map(|seed| JobRequest {
            prompt: c.prompt.clone(),
            style: c.style,
            steps: c.steps,
            seed: Some(seed),
            kind: kind_of(),
            negative_prompt: c.negative_prompt.clone(),
            loras: c.loras.clone(),
            variation: c.variation,
            variation_seed: None,
            written_prompt: None,
        })
        .collect();
    let revised = reqs[0].full_prompt();
    let results: Vec<JobResult> = super::jobs::run_jobs(studio, app::types::JobSource::OpenAi, client, reqs, |_| {}).await?;
    let base = base_url(headers);
    let mut data = Vec::with_capacity(results.len());
    for r in &results {
        let item = match c.format {
            Format::Url => json!({"url": format!("{base}{}", r.image_url), "revised_prompt": revised}),
            Format::B64Json => {
                use base64::Engine;
                let path = studio.store.image_path(&r.image_id).ok_or_else(|| StudioError::internal("The image store lost an image."))?;
                let png = tokio::fs::read(&path).await.map_err(|e| StudioError::internal(format!("Reading the image back failed: {e}")))?;
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png), "revised_prompt": revised})
            }
        };
        data.push(item);
    }
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(Json(json!({"created": created, "data": data})).into_response())
}

/// `POST /v1/images/generations`.
pub async fn generations(State(studio): State<Arc<Studio>>, client: ClientId, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", format!("The body is not valid JSON: {e}.")))?;
        let Value::Object(map) = value else { return Err(ApiError::invalid("body", "The body must be a JSON object.")) };
        let f = Fields(map);
        let c = common(&f, &studio)?;
        let (width, height) = c.size.unwrap_or((1024, 1024));
        answer(&studio, &client, &c, || JobKind::Generate { width, height }, &headers).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/images/edits` (multipart/form-data: `image`, `prompt`, `n`, `size`, `response_format`,
/// `strength`, ...): Transform.
pub async fn edits(State(studio): State<Arc<Studio>>, client: ClientId, headers: HeaderMap, multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>) -> Response {
    let run = async {
        let mut multipart = multipart.map_err(|e| ApiError::invalid("body", format!("The body must be multipart/form-data: {e}.")))?;
        let mut map = Map::new();
        let mut image: Option<Bytes> = None;
        while let Some(field) = multipart.next_field().await.map_err(|e| ApiError::invalid("body", format!("The form could not be read: {e}.")))? {
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "image" | "image[]" => {
                    if image.is_some() {
                        return Err(ApiError::invalid("image", "Send one image; several are not supported."));
                    }
                    let bytes = field.bytes().await.map_err(|e| ApiError::invalid("image", format!("The image could not be read: {e}.")))?;
                    if bytes.len() > limits::MAX_UPLOAD_BYTES {
                        return Err(ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, code: Some("payload_too_large"), ..ApiError::invalid("image", format!("The image is too large: at most {} MB.", limits::MAX_UPLOAD_BYTES / (1024 * 1024))) });
                    }
                    image = Some(bytes);
                }
                "mask" => return Err(ApiError::invalid("mask", "Masks are not supported: the whole image is transformed.")),
                _ => {
                    let text = field.text().await.map_err(|e| ApiError::invalid(&name, format!("`{name}` could not be read: {e}.")))?;
                    map.insert(name, Value::String(text));
                }
            }
        }
        let f = Fields(map);
        let c = common(&f, &studio)?;
        let strength = f.float("strength")?.unwrap_or(0.6);
        let bytes = image.ok_or_else(|| ApiError::invalid("image", "`image` (a PNG, JPEG or WebP file) is required."))?;
        let store = studio.store.clone();
        let size = c.size;
        let upload = tokio::task::spawn_blocking(move || store.save_upload_at(&bytes, size))
            .await
            .map_err(|e| StudioError::internal(format!("The upload worker failed: {e}")))??;
        let upload_id = upload.upload_id;
        answer(&studio, &client, &c, || JobKind::Transform { upload_id: upload_id.clone(), strength }, &headers).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn model_object() -> Value {
    json!({"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "z-image-turbo-studio"})
}

/// `GET /v1/models`.
pub async fn models() -> Response {
    Json(json!({"object": "list", "data": [model_object()]})).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn model(Path(id): Path<String>) -> Response {
    if id == MODEL_ID {
        Json(model_object()).into_response()
    } else {
        ApiError { status: StatusCode::NOT_FOUND, code: Some("model_not_found"), ..ApiError::invalid("model", format!("The model `{id}` does not exist here; use `{MODEL_ID}`.")) }.into_response()
    }
}
