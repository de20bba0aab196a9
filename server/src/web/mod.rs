//! The web studio: axum + leptos_axum serving the `app` crate (pages, server functions), the
//! `/ws` progress socket, stored images, and the built site (wasm, JS, CSS, PWA files).
//!
//! Routes:
//! * `/`, `/embed`, `/share/{id}` — Leptos pages (SSR, hydrated by the wasm in `/pkg`)
//! * `/api/*` — server functions (`app::api`), errors as JSON `{kind, reason}` with a status
//! * `/ws` — job events (JSON, `app::types::JobEvent`)
//! * `/images/{id}.png`, `/uploads/{id}.png` — stored PNGs under unguessable ids
//! * `/healthz` — liveness
//! * everything else — files of the built site (`site_root`), else the 404 page

mod generate_api;
mod history;
mod a1111_api;
mod jobs;
mod openai_api;
mod queue;
mod security;
mod store;
mod studio;
#[cfg(test)]
mod tests;
mod ws;

use anyhow::Context;
use app::backend::{Backend, BackendHandle};
use app::types::limits::MAX_UPLOAD_BYTES;
use app::{shell, App, StudioError};
use axum::extract::{FromRef, Path, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use leptos::config::{Env, LeptosOptions};
use leptos_axum::{generate_route_list, LeptosRoutes};
use std::sync::Arc;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;

pub use queue::Generator;
pub use security::FramePolicy;
pub use store::ImageStore;
pub use studio::Studio;

/// Everything `zimage serve` passes in.
pub struct ServeOptions {
    pub addr: std::net::SocketAddr,
    pub model: engine::loader::ModelSource,
    /// One worker per device, with its label for the studio's model line.
    pub devices: Vec<(candle_core::Device, String)>,
    /// How to load on each device (FP8 depends on the card).
    pub load_options: Box<dyn Fn(&candle_core::Device) -> engine::pipeline::LoadOptions + Send + Sync>,
    /// Generated images and uploads are kept here.
    pub data_dir: std::path::PathBuf,
    /// Origins allowed to frame `/embed` (CSP frame-ancestors), e.g. `https://blog.example`;
    /// `*` allows any. Other pages may only be framed by the studio itself.
    pub frame_ancestors: Vec<String>,
    /// How many jobs may wait before new ones are refused.
    pub queue_capacity: usize,
    /// The built site (`scripts/build-site.sh` writes `target/site`).
    pub site_root: std::path::PathBuf,
    /// When set, the script APIs (`/v1/*`, `/sdapi/*`) need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

/// Builds its own tokio runtime, loads the model (on a blocking thread), serves until killed.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zimage-web")
        .build()
        .context("starting the tokio runtime")?;
    let r = rt.block_on(run(opts));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}

async fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let frames = FramePolicy::new(&opts.frame_ancestors)?;
    let site_root = opts.site_root.clone();
    let wasm = site_root.join("pkg").join(format!("{}.wasm", app::OUTPUT_NAME));
    if !wasm.exists() {
        eprintln!(
            "warning: {} is missing: the pages will render but not run. Build the site first with \
             `scripts/build-site.sh` (or pass --site-root).",
            wasm.display()
        );
    }
    let store = Arc::new(
        ImageStore::open(&opts.data_dir)
            .with_context(|| format!("opening the data folder {}", opts.data_dir.display()))?,
    );
    store.prune_uploads();

    // one worker per device: every CUDA GPU (when built with CUDA), else the CPU
    let mut generators: Vec<(String, Arc<dyn Generator>)> = Vec::new();
    for (device, label) in opts.devices.clone() {
        let source = opts.model.clone();
        let load_options = (opts.load_options)(&device);
        eprintln!("loading model {} on {label}…", source.display_name());
        let t = std::time::Instant::now();
        // The driver's one-time kernel compilation runs beside the loading (see
        // engine::cuda::precompile_kernels).
        #[cfg(feature = "cuda")]
        let precompile = match &device {
            candle_core::Device::Cuda(dev) => {
                let dev = dev.clone();
                Some(std::thread::spawn(move || engine::cuda::precompile_kernels(&dev)))
            }
            _ => None,
        };
        let pipeline =
            tokio::task::spawn_blocking(move || {
                let dtype = engine::pipeline::default_dtype(&device);
                engine::pipeline::Pipeline::load_with_options(&source, &device, dtype, load_options)
            })
                .await
                .context("model loading thread")?
                .with_context(|| format!("loading the model on {label}"))?;
        eprintln!("model {} loaded on {label} in {:.1?}", pipeline.model_name(), t.elapsed());
        #[cfg(feature = "cuda")]
        if let Some(h) = precompile {
            match h.join() {
                Ok(Ok(d)) => eprintln!("CUDA kernels compiled (or found in the driver's cache) in {d:.1?}, beside the loading"),
                Ok(Err(e)) => eprintln!("warning: {e}"),
                Err(_) => eprintln!("warning: the kernel compile thread panicked"),
            }
        }
        // On GPUs the first run compiles the kernels (once per process): do it before serving.
        let pipeline = if pipeline.device().is_cpu() {
            pipeline
        } else {
            let (pipeline, warm) = tokio::task::spawn_blocking(move || {
                let r = pipeline.warm_up();
                (pipeline, r)
            })
            .await
            .context("warm-up thread")?;
            match warm {
                Ok(d) => eprintln!("warmed up on {label} in {d:.1?}"),
                Err(e) => eprintln!("warning: the warm-up generation on {label} failed: {e}"),
            }
            pipeline
        };
        if generators.is_empty() && pipeline.is_tiny() {
            eprintln!(
                "note: this is the built-in tiny model with random weights; images will look like noise."
            );
        }
        // Say how the model is held, next to the device, in the studio's model line.
        let precision = match (pipeline.is_fp8(), pipeline.dtype()) {
            (true, _) => "FP8 transformer",
            (false, candle_core::DType::BF16) => "bf16",
            (false, candle_core::DType::F32) => "f32",
            (false, _) => "other precision",
        };
        let te = if pipeline.text_encoder_resident() { "" } else { ", text encoder loaded per prompt" };
        let label = format!("{label} ({precision}{te})");
        generators.push((label, Arc::new(pipeline)));
    }
    let studio = Studio::start(generators, store.clone(), opts.queue_capacity)
        .map_err(|e| anyhow::anyhow!("opening the history in {}: {}", opts.data_dir.display(), e.reason))?;

    let options = leptos_options(opts.addr, &site_root);
    let app = router_with_key(studio.clone(), options, frames, opts.api_key.clone());

    // prune old uploads hourly
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.prune_uploads()).await;
        }
    });

    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .with_context(|| format!("binding {}", opts.addr))?;
    eprintln!(
        "Z-Image Turbo Studio listening on http://{} (ready {:.1?} after start)",
        listener.local_addr()?,
        started.elapsed()
    );
    tokio::select! {
        r = axum::serve(listener, app) => r.context("serving")?,
        _ = shutdown_signal() => eprintln!("shutting down"),
    }
    studio.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

pub fn leptos_options(addr: std::net::SocketAddr, site_root: &std::path::Path) -> LeptosOptions {
    LeptosOptions::builder()
        .output_name(app::OUTPUT_NAME)
        .site_root(site_root.to_string_lossy().to_string())
        .site_pkg_dir("pkg")
        .site_addr(addr)
        .env(Env::PROD)
        .hash_files(false)
        .build()
}

/// Router state: handlers take what they need through `State<…>` (`FromRef`).
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub studio: Arc<Studio>,
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(s: &AppState) -> Self {
        s.leptos_options.clone()
    }
}

impl FromRef<AppState> for Arc<Studio> {
    fn from_ref(s: &AppState) -> Self {
        s.studio.clone()
    }
}

/// The whole app as an axum router, the script APIs open (used by the tests).
#[cfg(test)]
pub fn router(studio: Arc<Studio>, options: LeptosOptions, frames: FramePolicy) -> Router {
    router_with_key(studio, options, frames, None)
}

/// The key the script APIs ask for (none: open).
#[derive(Clone)]
pub struct ApiKey(Option<Arc<str>>);

impl ApiKey {
    /// Whether the request carries `Authorization: Bearer <key>` (always true without a key).
    fn admits(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(key) = &self.0 else { return true };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // same time whatever prefix matches
        given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

async fn a1111_auth(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    a1111_api::ApiError::unauthorized().into_response()
}

async fn openai_auth(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    openai_api::ApiError::unauthorized("Incorrect or missing API key: send `Authorization: Bearer <key>` (the server's --api-key).").into_response()
}

/// The whole app as an axum router (used by `serve`).
pub fn router_with_key(studio: Arc<Studio>, options: LeptosOptions, frames: FramePolicy, api_key: Option<String>) -> Router {
    let state = AppState { leptos_options: options.clone(), studio: studio.clone() };
    let routes = generate_route_list(App);
    let studio_for_apis = studio.clone();
    let backend = BackendHandle(studio as Arc<dyn Backend>);
    let key = ApiKey(api_key.map(Arc::from));
    let openai = Router::new()
        .route("/v1/images/generations", axum::routing::post(openai_api::generations))
        .route("/v1/images/edits", axum::routing::post(openai_api::edits))
        .route("/v1/models", get(openai_api::models))
        .route("/v1/models/{id}", get(openai_api::model))
        .route_layer(axum::middleware::from_fn_with_state(key.clone(), openai_auth));
    let a1111 = a1111_api::A1111 { studio: studio_for_apis.clone(), state: Default::default() };
    let sdapi = Router::new()
        .route("/sdapi/v1/txt2img", axum::routing::post(a1111_api::txt2img))
        .route("/sdapi/v1/img2img", axum::routing::post(a1111_api::img2img))
        .route("/sdapi/v1/progress", get(a1111_api::progress))
        .route("/sdapi/v1/interrupt", axum::routing::post(a1111_api::interrupt))
        .route("/sdapi/v1/sd-models", get(a1111_api::sd_models))
        .route("/sdapi/v1/samplers", get(a1111_api::samplers))
        .route("/sdapi/v1/scripts", get(a1111_api::scripts))
        .route("/sdapi/v1/options", get(a1111_api::get_options).post(a1111_api::set_options))
        .route_layer(axum::middleware::from_fn_with_state(key.clone(), a1111_auth))
        .with_state(a1111);
    Router::new()
        .merge(openai)
        .merge(sdapi)
        .route("/ws", get(ws::ws_handler))
        .route("/api/generate", axum::routing::post(generate_api::generate))
        .route("/images/{file}", get(image_file))
        .route("/uploads/{file}", get(upload_file))
        .route("/thumbs/{file}", get(thumb_file))
        .route("/healthz", get(|| async { "ok" }))
        .leptos_routes(&state, routes, {
            let options = options.clone();
            move || shell(options.clone())
        })
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(shell))
        .layer(Extension(backend))
        .layer(axum::middleware::from_fn(api_error_status))
        // inside the compression: it reads the pages' HTML to hash their inline scripts
        .layer(axum::middleware::from_fn_with_state(Arc::new(frames), security::security_headers))
        .layer(CompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(2 * MAX_UPLOAD_BYTES))
        .with_state(state)
}

/// A stored PNG with the given Cache-Control, or 404 JSON.
async fn png_file(path: Option<std::path::PathBuf>, cache: &'static str) -> Response {
    let missing = || StudioError::not_found("No such image.").into_response();
    let Some(path) = path else { return missing() };
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
                (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => missing(),
    }
}

async fn image_file(State(studio): State<Arc<Studio>>, Path(file): Path<String>) -> Response {
    let path = file.strip_suffix(".png").and_then(|id| studio.store.image_path(id));
    png_file(path, "public, max-age=31536000, immutable").await
}

async fn thumb_file(State(studio): State<Arc<Studio>>, Path(file): Path<String>) -> Response {
    let path = file.strip_suffix(".jpg").and_then(|id| studio.history.thumb_path(id));
    let Some(path) = path else { return StudioError::not_found("No such thumbnail.").into_response() };
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
                (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable")),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StudioError::not_found("No such thumbnail.").into_response(),
    }
}

async fn upload_file(State(studio): State<Arc<Studio>>, Path(file): Path<String>) -> Response {
    let path = file.strip_suffix(".png").and_then(|id| studio.store.upload_path(id));
    png_file(path, "private, max-age=86400").await
}

/// Server-function errors leave server_fn as 500 when they happen before our code runs (e.g. an
/// unreadable body); give every one the status of its [`StudioError`] kind.
async fn api_error_status(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    if res.headers().get(leptos::server_fn::error::SERVER_FN_ERROR_HEADER).is_none() {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    if let Ok(e) = serde_json::from_slice::<StudioError>(&bytes) {
        if let Ok(code) = axum::http::StatusCode::from_u16(e.status()) {
            parts.status = code;
        }
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}
