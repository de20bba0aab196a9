//! The AUTOMATIC1111 web UI API (`/sdapi/v1/*`) on the studio's queue, for the many tools written
//! for it (`webuiapi`, editor plugins, bots): txt2img, img2img, progress, interrupt, sd-models,
//! samplers, options. Answers have A1111's shapes (`{"images": [base64 PNG], "parameters",
//! "info": "<json>"}`, the infotext being the PNG's `parameters` text). What does not apply to
//! Turbo is accepted and left alone (`cfg_scale`, the sampler, hires and script fields); sizes that
//! are not one of the studio's 18 and masks are refused with 422 and a reason: nothing is resized
//! or dropped silently.

use app::backend::{Backend, ClientId};
use app::types::{limits, take_lora_tags, JobEvent, JobKind, JobRequest, JobTicket, LoraChoice, ASPECT_RATIOS};
use app::{ErrorKind, StudioError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::openai_api::MODEL_ID;
use super::studio::Studio;

/// At most this many images per request (batch_size x n_iter).
const MAX_IMAGES: u64 = 8;
const DEFAULT_STEPS: u64 = 8;

/// The A1111 requests in flight: their jobs, for /progress and /interrupt.
#[derive(Default)]
pub struct A1111State {
    requests: Mutex<Vec<InFlight>>,
}

struct InFlight {
    jobs: Vec<String>,
    started: Instant,
}

#[derive(Clone)]
pub struct A1111 {
    pub studio: Arc<Studio>,
    pub state: Arc<A1111State>,
}

/// An error as A1111's API answers them.
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
    /// `Retry-After` in seconds, for refusals that pass with time.
    retry_after: Option<u64>,
}

impl ApiError {
    fn unprocessable(detail: impl Into<String>) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, error: "ValidationError", detail: detail.into(), retry_after: None }
    }
    pub fn unauthorized() -> Self {
        Self { status: StatusCode::UNAUTHORIZED, error: "Unauthorized", detail: "Not authenticated: send `Authorization: Bearer <key>` (the server's --api-key).".into(), retry_after: None }
    }
}

impl From<StudioError> for ApiError {
    fn from(e: StudioError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let error = match e.kind {
            ErrorKind::InvalidInput => "ValidationError",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::PayloadTooLarge => "PayloadTooLarge",
            ErrorKind::UnsupportedMedia => "UnsupportedMedia",
            ErrorKind::QueueFull => "QueueFull",
            ErrorKind::RateLimited => "TooManyRequests",
            ErrorKind::Unavailable => "ServiceUnavailable",
            ErrorKind::Timeout => "RequestTimeout",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::Cancelled => "Interrupted",
            ErrorKind::Network | ErrorKind::Internal => "RuntimeError",
        };
        Self { status, error, detail: e.reason, retry_after: e.retry_after_secs }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let res = (self.status, Json(json!({"error": self.error, "detail": self.detail, "body": "", "errors": ""}))).into_response();
        app::error::with_retry_after(res, self.retry_after)
    }
}

fn body_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::unprocessable("The body must be a JSON object.")),
        Err(e) => Err(ApiError::unprocessable(format!("The body is not valid JSON: {e}."))),
    }
}

fn get_str<'a>(m: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::unprocessable(format!("`{name}` must be a string."))),
    }
}

fn get_int(m: &Map<String, Value>, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64)) {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::unprocessable(format!("`{name}` must be an integer from {min} to {max}."))),
        },
        Some(_) => Err(ApiError::unprocessable(format!("`{name}` must be an integer."))),
    }
}

fn get_float(m: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().filter(|f| f.is_finite()).map(Some).ok_or_else(|| ApiError::unprocessable(format!("`{name}` must be a number."))),
        Some(_) => Err(ApiError::unprocessable(format!("`{name}` must be a number."))),
    }
}

/// The fields both generation routes share, checked.
struct Common {
    prompt: String,
    negative_prompt: String,
    steps: u32,
    seeds: Vec<u64>,
    size: Option<(u32, u32)>,
    cfg_scale: f64,
    parameters: Map<String, Value>,
    /// From the prompt's `<lora:name:weight>` tags (taken out of the prompt the model sees).
    loras: Vec<LoraChoice>,
    /// `subseed_strength` (our variation) and `subseed` (-1 or absent: each image's own seed).
    variation: f32,
    subseed: Option<u64>,
}

fn common(m: &Map<String, Value>) -> Result<Common, ApiError> {
    let (prompt, loras) = take_lora_tags(get_str(m, "prompt")?.unwrap_or_default()).map_err(|e| ApiError::unprocessable(e.reason))?;
    let negative_prompt = get_str(m, "negative_prompt")?.unwrap_or_default().to_string();
    let steps = get_int(m, "steps", limits::MIN_STEPS as i64, limits::MAX_STEPS as i64)?.map(|s| s as u64).unwrap_or(DEFAULT_STEPS) as u32;
    let batch = get_int(m, "batch_size", 1, MAX_IMAGES as i64)?.unwrap_or(1) as u64;
    let n_iter = get_int(m, "n_iter", 1, MAX_IMAGES as i64)?.unwrap_or(1) as u64;
    let total = batch * n_iter;
    if total > MAX_IMAGES {
        return Err(ApiError::unprocessable(format!("batch_size x n_iter is {total}; at most {MAX_IMAGES} images per request.")));
    }
    let seed = get_int(m, "seed", -1, limits::MAX_SEED as i64)?.unwrap_or(-1);
    let first = if seed < 0 {
        super::store::random_seed() % (limits::MAX_SEED - total + 2)
    } else {
        let s = seed as u64;
        if s + total - 1 > limits::MAX_SEED {
            return Err(ApiError::unprocessable(format!("With {total} images, `seed` must be at most {} (image i uses seed + i).", limits::MAX_SEED - (total - 1))));
        }
        s
    };
    let size = match (get_int(m, "width", 1, 100_000)?, get_int(m, "height", 1, 100_000)?) {
        (None, None) => None,
        (Some(w), Some(h)) => {
            let (w, h) = (w as u32, h as u32);
            if !ASPECT_RATIOS.iter().any(|r| r.width == w && r.height == h) {
                let sizes: Vec<String> = ASPECT_RATIOS.iter().map(|r| format!("{}x{}", r.width, r.height)).collect();
                return Err(ApiError::unprocessable(format!("{w}x{h} is not a size this model runs at; use one of: {}.", sizes.join(", "))));
            }
            Some((w, h))
        }
        _ => return Err(ApiError::unprocessable("Give both `width` and `height`, or neither.")),
    };
    let cfg_scale = get_float(m, "cfg_scale")?.unwrap_or(1.0);
    let variation = get_float(m, "subseed_strength")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&variation) {
        return Err(ApiError::unprocessable(format!("`subseed_strength` must be between 0 and 1 (got {variation}).")));
    }
    let subseed = get_int(m, "subseed", -1, (limits::MAX_SEED - total + 1) as i64)?.filter(|s| *s >= 0).map(|s| s as u64);
    Ok(Common { prompt, negative_prompt, steps, seeds: (0..total).map(|i| first + i).collect(), size, cfg_scale, parameters: m.clone(), loras, variation: variation as f32, subseed })
}

impl A1111 {
    fn register(&self, tickets: &[JobTicket]) -> usize {
        let mut r = self.state.requests.lock().unwrap_or_else(|p| p.into_inner());
        r.push(InFlight { jobs: tickets.iter().map(|t| t.job_id.clone()).collect(), started: Instant::now() });
        r.len()
    }
    fn unregister(&self, first_job: &str) {
        let mut r = self.state.requests.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|f| f.jobs.first().map(String::as_str) != Some(first_job));
    }

    /// Runs the jobs and answers like A1111.
    async fn run(&self, client: &ClientId, c: Common, kind_of: impl Fn() -> JobKind, denoising: Option<f32>) -> Result<Response, ApiError> {
        let reqs: Vec<JobRequest> = c
            .seeds
            .iter()
            .enumerate()
            .map(|(i, &seed)| JobRequest {
                prompt: c.prompt.clone(),
                style: Default::default(),
                steps: c.steps,
                seed: Some(seed),
                kind: kind_of(),
                negative_prompt: c.negative_prompt.clone(),
                loras: c.loras.clone(),
                variation: c.variation,
                variation_seed: c.subseed.map(|s| s + i as u64),
                written_prompt: None,
            })
            .collect();
        let mut first_job = String::new();
        let result = super::jobs::run_jobs(&self.studio, app::types::JobSource::A1111, client, reqs, |tickets| {
            first_job = tickets[0].job_id.clone();
            self.register(tickets);
        })
        .await;
        if !first_job.is_empty() {
            self.unregister(&first_job);
        }
        let results = result?;
        let mut images = Vec::with_capacity(results.len());
        let mut infotexts = Vec::with_capacity(results.len());
        for r in &results {
            use base64::Engine;
            let path = self.studio.store.image_path(&r.image_id).ok_or_else(|| StudioError::internal("The image store lost an image."))?;
            let png = tokio::fs::read(&path).await.map_err(|e| StudioError::internal(format!("Reading the image back failed: {e}")))?;
            infotexts.push(engine::png_meta::read_parameters(&png).unwrap_or_default());
            images.push(base64::engine::general_purpose::STANDARD.encode(png));
        }
        let first = &results[0];
        let info = json!({
            "prompt": c.prompt,
            "all_prompts": vec![c.prompt.clone(); results.len()],
            "negative_prompt": c.negative_prompt,
            "all_negative_prompts": vec![c.negative_prompt.clone(); results.len()],
            "seed": first.seed,
            "all_seeds": results.iter().map(|r| r.seed).collect::<Vec<_>>(),
            "subseed": first.variation_seed.map(|s| s as i64).unwrap_or(first.seed as i64),
            "all_subseeds": results.iter().map(|r| r.variation_seed.unwrap_or(r.seed)).collect::<Vec<_>>(),
            "subseed_strength": c.variation,
            "width": first.width,
            "height": first.height,
            "sampler_name": "Euler",
            "cfg_scale": c.cfg_scale,
            "steps": c.steps,
            "batch_size": results.len(),
            "restore_faces": false,
            "sd_model_name": MODEL_ID,
            "sd_model_hash": Value::Null,
            "denoising_strength": denoising,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": chrono_like_timestamp(),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": false,
            "version": concat!("zimage-", env!("CARGO_PKG_VERSION")),
        });
        let mut parameters = c.parameters;
        parameters.remove("init_images"); // A1111 echoes the request; not the images back
        Ok(Json(json!({"images": images, "parameters": parameters, "info": info.to_string()})).into_response())
    }
}

/// "YYYYmmddHHMMSS" in UTC, as A1111's job_timestamp.
fn chrono_like_timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(State(api): State<A1111>, client: ClientId, body: Bytes) -> Response {
    let run = async {
        let m = body_object(&body)?;
        let c = common(&m)?;
        let (width, height) = c.size.unwrap_or((1024, 1024));
        api.run(&client, c, || JobKind::Generate { width, height }, None).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /sdapi/v1/img2img`: the first of `init_images` (base64, with or without a `data:` prefix).
pub async fn img2img(State(api): State<A1111>, client: ClientId, body: Bytes) -> Response {
    let run = async {
        let m = body_object(&body)?;
        if !matches!(m.get("mask"), None | Some(Value::Null)) {
            return Err(ApiError::unprocessable("Inpainting masks are not supported: the whole image is transformed."));
        }
        let c = common(&m)?;
        let strength = get_float(&m, "denoising_strength")?.unwrap_or(0.75) as f32;
        let image = match m.get("init_images") {
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(ApiError::unprocessable("`init_images` must hold at least one base64 image.")),
            },
            _ => return Err(ApiError::unprocessable("`init_images` (a list of base64 images) is required.")),
        };
        let b64 = image.split_once("base64,").map(|(_, d)| d).unwrap_or(&image).trim();
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::unprocessable(format!("`init_images[0]` is not base64: {e}.")))?;
        let store = api.studio.store.clone();
        let size = c.size;
        let upload = tokio::task::spawn_blocking(move || store.save_upload_at(&bytes, size))
            .await
            .map_err(|e| StudioError::internal(format!("The upload worker failed: {e}")))??;
        let upload_id = upload.upload_id;
        api.run(&client, c, || JobKind::Transform { upload_id: upload_id.clone(), strength }, Some(strength)).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /sdapi/v1/progress`: the newest A1111 request in flight (none: idle).
pub async fn progress(State(api): State<A1111>) -> Response {
    let inflight = {
        let r = api.state.requests.lock().unwrap_or_else(|p| p.into_inner());
        r.last().map(|f| (f.jobs.clone(), f.started))
    };
    let Some((jobs, started)) = inflight else {
        return Json(json!({"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": false, "interrupted": false, "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}, "current_image": Value::Null, "textinfo": Value::Null})).into_response();
    };
    let (mut done, mut step, mut steps, mut job_no, mut preview) = (0.0f64, 0u32, 0u32, 0usize, None);
    for (i, id) in jobs.iter().enumerate() {
        match api.studio.queue.snapshot(id) {
            Some(ev) if ev.is_terminal() => done += 1.0,
            Some(JobEvent::Step { step: s, total, preview: p, .. }) => {
                done += s as f64 / total.max(1) as f64;
                (step, steps, job_no) = (s, total, i);
                preview = p;
            }
            Some(JobEvent::Started { steps: total, .. }) => (steps, job_no) = (total, i),
            _ => {}
        }
    }
    let progress = done / jobs.len().max(1) as f64;
    let elapsed = started.elapsed().as_secs_f64();
    let eta = if progress > 0.0 { elapsed / progress - elapsed } else { 0.0 };
    let current_image = preview.and_then(|p| p.split_once("base64,").map(|(_, d)| d.to_string()));
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {"skipped": false, "interrupted": false, "job": jobs.get(job_no).cloned().unwrap_or_default(), "job_count": jobs.len(), "job_timestamp": chrono_like_timestamp(), "job_no": job_no, "sampling_step": step, "sampling_steps": steps},
        "current_image": current_image,
        "textinfo": Value::Null,
    }))
    .into_response()
}

/// `POST /sdapi/v1/interrupt`: cancels every A1111 job queued or running (their requests answer
/// with an `Interrupted` error).
pub async fn interrupt(State(api): State<A1111>) -> Response {
    let jobs: Vec<String> = api.state.requests.lock().unwrap_or_else(|p| p.into_inner()).iter().flat_map(|f| f.jobs.clone()).collect();
    for id in jobs {
        let _ = api.studio.cancel(&id);
    }
    Json(Value::Null).into_response()
}

pub async fn sd_models(State(api): State<A1111>) -> Response {
    let info = api.studio.info();
    Json(json!([{"title": MODEL_ID, "model_name": MODEL_ID, "hash": Value::Null, "sha256": Value::Null, "filename": info.model, "config": Value::Null}])).into_response()
}

/// `GET /sdapi/v1/loras`: the LoRA folder as A1111's Lora extension lists it (the names go in
/// `<lora:name:weight>` prompt tags). Files that cannot be used are left out.
pub async fn loras(State(api): State<A1111>) -> Result<Response, ApiError> {
    let studio = api.studio.clone();
    let list = tokio::task::spawn_blocking(move || studio.lora_list())
        .await
        .map_err(|e| ApiError::from(StudioError::internal(e.to_string())))??;
    let dir = api.studio.lora_dir();
    let items: Vec<Value> = list
        .into_iter()
        .filter(|l| l.usable)
        .map(|l| {
            json!({
                "name": l.name,
                "alias": l.name,
                "path": dir.join(format!("{}.safetensors", l.name)),
                "metadata": {"sshs_model_hash": l.short_hash, "trigger_words": l.trigger_words, "summary": l.summary},
            })
        })
        .collect();
    Ok(Json(items).into_response())
}

/// `POST /sdapi/v1/refresh-loras`: the folder is read again on every listing and every job, so
/// there is nothing to refresh; answered as A1111 does.
pub async fn refresh_loras() -> Response {
    Json(Value::Null).into_response()
}

pub async fn samplers() -> Response {
    Json(json!([{"name": "Euler", "aliases": ["euler", "k_euler"], "options": {}}])).into_response()
}

pub async fn scripts() -> Response {
    Json(json!({"txt2img": [], "img2img": []})).into_response()
}

fn options_object() -> Value {
    json!({"sd_model_checkpoint": MODEL_ID, "samples_format": "png", "sd_checkpoint_hash": Value::Null, "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0})
}

pub async fn get_options() -> Response {
    Json(options_object()).into_response()
}

/// `POST /sdapi/v1/options`: only the checkpoint applies (it must be ours); other settings are
/// accepted and have no effect on this model.
pub async fn set_options(body: Bytes) -> Response {
    let run = async {
        let m = body_object(&body)?;
        if let Some(ck) = get_str(&m, "sd_model_checkpoint")? {
            if ck != MODEL_ID {
                return Err(ApiError::unprocessable(format!("The checkpoint `{ck}` is not available; this server runs `{MODEL_ID}`.")));
            }
        }
        Ok(Json(Value::Null).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
