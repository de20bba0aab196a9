//! The web studio: axum + leptos_axum serving the `app` crate (pages, server functions), the
//! `/ws` progress socket, stored images, and the built site (wasm, JS, CSS, PWA files).
//!
//! Routes:
//! * `/`, `/embed`, `/share/{id}` — Leptos pages (SSR, hydrated by the wasm in `/pkg`)
//! * `/api/*` — server functions (`app::api`), errors as JSON `{kind, reason}` with a status;
//!   `/api/generate` and `/api/enhance` (JSON or server-sent events) for scripts
//! * `/v1/*` — OpenAI's images and chat completions (the enhancer); `/sdapi/*` — A1111's
//! * `/ws` — job events (JSON, `app::types::JobEvent`)
//! * `/images/{id}.png`, `/uploads/{id}.png` — stored PNGs under unguessable ids
//! * `/healthz` — liveness; `/readyz` — readiness (503 while the model loads or the server
//!   drains); `/metrics` — Prometheus text
//! * everything else — files of the built site (`site_root`), else the 404 page
//!
//! Every request body is bounded and read before anything answers (`bodies`); submissions are
//! limited per client (`limits`, the queue's cap per client); the queue is fair between clients.

mod a1111_api;
mod bodies;
mod cluster;
mod enhance_api;
mod generate_api;
mod history;
mod jobs;
mod limits;
mod listen;
mod loras;
mod metrics;
mod openai_api;
mod pipeline_generator;
mod queue;
mod security;
mod settings;
mod simulate;
pub mod startup;
mod store;
mod studio;
#[cfg(test)]
mod tests;
mod ws;

use anyhow::Context;
use app::backend::{Backend, BackendHandle};
use app::{shell, App, StudioError};
use app::ErrorKind;
use axum::extract::{DefaultBodyLimit, FromRef, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use leptos::config::{Env, LeptosOptions};
use leptos_axum::{generate_route_list, LeptosRoutes};
use std::sync::Arc;
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;

pub use cluster::{run_worker, WorkerOptions};
pub use pipeline_generator::PipelineGenerator;
pub use queue::{Generator, QueueLimits};
pub use simulate::SimulatedGenerator;
pub use security::FramePolicy;
pub use settings::{ApiKey, RouterSettings, Timeouts};
pub use store::ImageStore;
pub use studio::{Studio, StudioLimits};

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
    /// The built site (`scripts/build-site.sh` writes `target/site`).
    pub site_root: std::path::PathBuf,
    /// When set, the script APIs (`/v1/*`, `/sdapi/*`) need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Submissions per minute per client (0: unlimited), the cap of a client's queued and
    /// running jobs (0: none), and the bound on a job's run time.
    pub limits: StudioLimits,
    pub timeouts: Timeouts,
    /// `--queue redis://…`: this process is a front end; jobs run on `zimage worker`s.
    pub queue_url: Option<String>,
    /// Run one simulated worker instead of loading the model (measurements, docs/SCALE.md).
    pub simulate_job: Option<Duration>,
    /// With a Redis queue: a result a front end took but did not store within this is stored by
    /// another.
    pub claim_idle: Duration,
    /// The LoRA files jobs may name (read again on every listing: new files need no restart).
    pub lora_dir: std::path::PathBuf,
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

    // The port opens first; until the studio exists (the history is open, Redis joined), `/readyz`
    // answers 503 and everything else a reason.
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .with_context(|| format!("binding {}", opts.addr))?;
    let local = listener.local_addr()?;
    eprintln!("port {local} open");
    let (app_tx, app_rx) = tokio::sync::watch::channel(starting_router(opts.timeouts.body));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(listen::serve(listener, app_rx, opts.timeouts.header_read, stop_rx, Duration::from_secs(5)));

    let loras = Arc::new(engine::lora::LoraLibrary::new(&opts.lora_dir));
    let studio = match &opts.queue_url {
        Some(url) => Studio::start_redis(url, opts.claim_idle, &opts.model, store.clone(), opts.limits.clone(), loras.clone())
            .await
            .with_context(|| format!("joining the Redis queue {url}"))?,
        None => {
            let first_phase = match &opts.model {
                engine::loader::ModelSource::Hub(id) if opts.simulate_job.is_none() && engine::loader::needs_download(id) => {
                    startup::Phase::Downloading { model: id.clone(), status: Default::default() }
                }
                _ => startup::Phase::Loading { device: opts.devices.first().map(|d| d.1.clone()).unwrap_or_default() },
            };
            Studio::open(&opts.model, store.clone(), opts.limits.clone(), first_phase, loras.clone())
                .map_err(|e| anyhow::anyhow!("opening the history in {}: {}", opts.data_dir.display(), e.reason))?
        }
    };
    let options = leptos_options(local, &site_root);
    let settings = RouterSettings { api_key: opts.api_key.clone(), timeouts: opts.timeouts.clone() };
    let _ = app_tx.send(router_with(studio.clone(), options, frames, settings));
    eprintln!(
        "Z-Image Turbo Studio listening on http://{local} ({:.1?} after start){}",
        started.elapsed(),
        if studio.startup.is_ready() { "" } else { "; the page shows the model's progress and /readyz answers 503 until it is loaded" }
    );

    if opts.queue_url.is_none() {
        // Download and load beside the serving; the studio takes jobs once this attaches workers.
        let studio = studio.clone();
        let model = opts.model.clone();
        let devices = opts.devices.clone();
        let options: Vec<_> = devices.iter().map(|(d, _)| (opts.load_options)(d)).collect();
        let simulate = opts.simulate_job;
        std::thread::Builder::new()
            .name("zimage-load".into())
            .spawn(move || {
                let loaded = match simulate {
                    Some(job_time) => {
                        let simulated = simulate::SimulatedGenerator { job_time };
                        Ok(vec![(simulated.label(), Arc::new(simulated) as Arc<dyn Generator>)])
                    }
                    None => load_generators(&model, devices, options, &studio.startup, &loras),
                };
                match loaded {
                    Ok(generators) => {
                        studio.attach(generators);
                        eprintln!("ready {:.1?} after start", started.elapsed());
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        eprintln!("the studio keeps serving stored images and the history; fix the cause and start it again");
                        studio.startup.set(startup::Phase::Failed { reason: format!("{e:#}") });
                    }
                }
            })
            .context("starting the loading thread")?;
    }
    serve_studio(studio, store, opts.timeouts.drain, stop_tx, server).await
}

/// Serves the full app on the open port until a stop signal, then drains.
async fn serve_studio(
    studio: Arc<Studio>,
    store: Arc<ImageStore>,
    drain_deadline: Duration,
    stop_tx: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    // prune old uploads hourly
    let pruning = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.prune_uploads()).await;
        }
    });

    shutdown_signal().await;
    pruning.abort();
    drain(&studio, drain_deadline).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    studio.shutdown();
    let history = studio.history.clone();
    tokio::task::spawn_blocking(move || history.checkpoint())
        .await
        .context("history checkpoint thread")?
        .map_err(|e| anyhow::anyhow!("flushing the history: {}", e.reason))?;
    eprintln!("stopped cleanly");
    Ok(())
}

/// Loads the model on one device and, on a GPU, warms it up (the first run compiles the kernels,
/// once per process: before the first job, not during it). Blocking; `serve` runs it per device,
/// `zimage worker` on its one. `phase` hears each step (`/readyz` shows it).
pub fn load_pipeline(
    source: &engine::loader::ModelSource,
    device: candle_core::Device,
    label: &str,
    load_options: engine::pipeline::LoadOptions,
    phase: &dyn Fn(startup::Phase),
) -> anyhow::Result<engine::pipeline::Pipeline> {
    eprintln!("loading model {} on {label}…", source.display_name());
    phase(startup::Phase::Loading { device: label.to_string() });
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
    let dtype = engine::pipeline::default_dtype(&device);
    let pipeline = engine::pipeline::Pipeline::load_with_options(source, &device, dtype, load_options)
        .with_context(|| format!("loading the model on {label}"))?;
    eprintln!("model {} loaded on {label} in {:.1?}", pipeline.model_name(), t.elapsed());
    #[cfg(feature = "cuda")]
    if let Some(h) = precompile {
        if !h.is_finished() {
            phase(startup::Phase::CompilingKernels { device: label.to_string() });
        }
        match h.join() {
            Ok(Ok(d)) => eprintln!("CUDA kernels compiled (or found in the driver's cache) in {d:.1?}, beside the loading"),
            Ok(Err(e)) => eprintln!("warning: {e}"),
            Err(_) => eprintln!("warning: the kernel compile thread panicked"),
        }
    }
    if !pipeline.device().is_cpu() {
        phase(startup::Phase::WarmingUp { device: label.to_string() });
        match pipeline.warm_up() {
            Ok(d) => eprintln!("warmed up on {label} in {d:.1?}"),
            Err(e) => eprintln!("warning: the warm-up generation on {label} failed: {e}"),
        }
    }
    Ok(pipeline)
}

/// Downloads the model when the cache lacks it, then loads it on every device, one generator per
/// device, telling `startup` each step. Blocking.
fn load_generators(
    model: &engine::loader::ModelSource,
    devices: Vec<(candle_core::Device, String)>,
    load_options: Vec<engine::pipeline::LoadOptions>,
    startup: &startup::Startup,
    loras: &Arc<engine::lora::LoraLibrary>,
) -> anyhow::Result<Vec<(String, Arc<dyn Generator>)>> {
    if let engine::loader::ModelSource::Hub(id) = model {
        startup::download_if_missing(model, &|status| {
            startup.set(startup::Phase::Downloading { model: id.clone(), status: status.clone() })
        })?;
    }
    let mut generators: Vec<(String, Arc<dyn Generator>)> = Vec::new();
    for ((device, label), options) in devices.into_iter().zip(load_options) {
        let pipeline = load_pipeline(model, device, &label, options, &|p| startup.set(p))?;
        if generators.is_empty() && pipeline.is_tiny() {
            eprintln!(
                "note: this is the built-in tiny model with random weights; images will look like noise."
            );
        }
        // Say how the model is held, next to the device, in the studio's model line.
        let precision = match (pipeline.quantization(), pipeline.dtype()) {
            (engine::ops::Quantization::Fp8, _) => "FP8 transformer",
            (engine::ops::Quantization::Int8, _) => "INT8 transformer",
            (_, candle_core::DType::BF16) => "bf16",
            (_, candle_core::DType::F32) => "f32",
            (_, _) => "other precision",
        };
        let te = if pipeline.text_encoder_resident() { "" } else { ", text encoder loaded per prompt" };
        let label = format!("{label} ({precision}{te})");
        generators.push((label, Arc::new(PipelineGenerator::new(pipeline, loras.clone()))));
    }
    Ok(generators)
}

/// Stops taking jobs, fails the waiting ones with a reason, lets the running ones finish within
/// `deadline` (then stops them, each failing with a reason), and closes the websockets once their
/// clients have the final events.
async fn drain(studio: &Studio, deadline: Duration) {
    let failed = studio.queue.drain("The server is shutting down, so this job was not started. Please submit it again in a minute.");
    let running = studio.queue.running_len();
    eprintln!("shutting down: {failed} waiting jobs told, waiting up to {deadline:?} for {running} running");
    let wait_until_idle = |limit: Duration| async move {
        let end = tokio::time::Instant::now() + limit;
        while studio.queue.running_len() > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        studio.queue.running_len() == 0
    };
    if !wait_until_idle(deadline).await {
        eprintln!("shutting down: the drain deadline passed; stopping the running jobs");
        studio.queue.stop_running("The server is shutting down and this job could not finish in time. Please submit it again in a minute.");
        // a job stops at its next step; the text encoder or the VAE may take a while
        if !wait_until_idle(Duration::from_secs(30)).await {
            eprintln!("shutting down: a job did not stop; leaving it");
        }
    }
    // the websocket sessions forward the last events, then close
    tokio::time::sleep(Duration::from_millis(300)).await;
    studio.close_sockets();
}

pub(crate) async fn shutdown_signal() {
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
    pub ws_idle: ws::IdleTimeout,
}

impl FromRef<AppState> for ws::IdleTimeout {
    fn from_ref(s: &AppState) -> Self {
        s.ws_idle
    }
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

/// The whole app as an axum router, the script APIs open, default timeouts (used by the tests).
#[cfg(test)]
pub fn router(studio: Arc<Studio>, options: LeptosOptions, frames: FramePolicy) -> Router {
    router_with(studio, options, frames, RouterSettings { api_key: None, timeouts: Timeouts::default() })
}

async fn a1111_auth(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    a1111_api::ApiError::unauthorized().into_response()
}

/// The reason given when a route that needs the API key did not get it.
const NO_API_KEY: &str = "Incorrect or missing API key: send `Authorization: Bearer <key>` (the server's --api-key).";

async fn openai_auth(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    openai_api::ApiError::unauthorized(NO_API_KEY).into_response()
}

/// Changes to the server (adding a LoRA) ask for the API key when the server has one.
async fn studio_auth(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    StudioError::new(
        ErrorKind::Unauthorized,
        "This server needs its API key for this: enter it beside the upload button (scripts: `Authorization: Bearer <key>`).",
    )
    .into_response()
}

/// `/metrics` asks for the API key when the server has one (queue depth and job counts are the
/// operator's business); Prometheus sends it with `authorization: { credentials: <key> }`.
async fn metrics_auth(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    let body = serde_json::json!({
        "kind": "unauthorized",
        "reason": NO_API_KEY,
    });
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))], Json(body)).into_response()
}

/// The whole app as an axum router (used by `serve`).
pub fn router_with(studio: Arc<Studio>, options: LeptosOptions, frames: FramePolicy, settings: RouterSettings) -> Router {
    let state = AppState {
        leptos_options: options.clone(),
        studio: studio.clone(),
        ws_idle: ws::IdleTimeout(settings.timeouts.ws_idle),
    };
    let routes = generate_route_list(App);
    let studio_for_apis = studio.clone();
    let backend = BackendHandle(studio as Arc<dyn Backend>);
    let key = ApiKey(settings.api_key.map(Arc::from));
    let openai = Router::new()
        .route("/v1/images/generations", axum::routing::post(openai_api::generations))
        .route("/v1/images/edits", axum::routing::post(openai_api::edits))
        .route("/v1/chat/completions", axum::routing::post(enhance_api::chat_completions))
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
        .route("/sdapi/v1/loras", get(a1111_api::loras))
        .route("/sdapi/v1/refresh-loras", axum::routing::post(a1111_api::refresh_loras))
        .route("/sdapi/v1/scripts", get(a1111_api::scripts))
        .route("/sdapi/v1/options", get(a1111_api::get_options).post(a1111_api::set_options))
        .route_layer(axum::middleware::from_fn_with_state(key.clone(), a1111_auth))
        .with_state(a1111);
    Router::new()
        .merge(openai)
        .merge(sdapi)
        .route("/ws", get(ws::ws_handler))
        .route("/api/generate", axum::routing::post(generate_api::generate))
        .route("/api/enhance", axum::routing::post(enhance_api::enhance))
        .route("/api/loras", get(loras::list))
        .route(
            "/api/loras/{name}",
            axum::routing::post(loras::upload).route_layer(axum::middleware::from_fn_with_state(key.clone(), studio_auth)),
        )
        .route("/images/{file}", get(image_file))
        .route("/uploads/{file}", get(upload_file))
        .route("/thumbs/{file}", get(thumb_file))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics).route_layer(axum::middleware::from_fn_with_state(key.clone(), metrics_auth)))
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
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(key, limits::client_identity))
        // `bodies` bounds every body (per route) and reads it before anything else answers
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(bodies::BodyTimeout(settings.timeouts.body), bodies::limit_bodies))
        .with_state(state)
}

/// The router for the moment before the studio exists (the history opening, Redis being joined):
/// alive, not ready, every other request refused with a reason.
fn starting_router(body_timeout: Duration) -> Router {
    async fn not_yet(req: Request) -> Response {
        let e = StudioError::new(ErrorKind::Unavailable, "The server is starting: the model is still loading. Try again in a moment.")
            .retry_after(5);
        bodies::refusal(req.uri().path(), e)
    }
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                let body = app::types::Readiness {
                    ready: false,
                    state: app::types::ServerState::Loading,
                    model_loaded: false,
                    model: String::new(),
                    message: "The server is starting.".into(),
                    download: None,
                    workers: None,
                    queue: None,
                };
                (StatusCode::SERVICE_UNAVAILABLE, [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(body))
            }),
        )
        .fallback(not_yet)
        .layer(axum::middleware::from_fn_with_state(bodies::BodyTimeout(body_timeout), bodies::limit_bodies))
}

/// `/readyz`: 200 with the model, workers and queue when ready; 503 while the model downloads or
/// loads (with its progress), after it failed to load, and while draining. Never cached: the page
/// polls it.
async fn readyz(State(studio): State<Arc<Studio>>) -> Response {
    let body = studio.readiness();
    let status = if body.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(body)).into_response()
}

/// `/metrics`: Prometheus text format.
async fn metrics(State(studio): State<Arc<Studio>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        studio.metrics_text(),
    )
        .into_response()
}

/// A handler that panicked answers 500 with a reason instead of dropping the connection.
fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    eprintln!("[web] a request handler panicked");
    StudioError::internal("The server hit an internal error while answering; it was logged.").into_response()
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
        let res = Response::from_parts(parts, axum::body::Body::from(bytes));
        return app::error::with_retry_after(res, e.retry_after_secs);
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}
