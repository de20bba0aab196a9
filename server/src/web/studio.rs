//! The studio backend: validates requests, feeds the queue (this process's, or with `--queue
//! redis://…` the Redis one that `zimage worker`s run), answers the server functions.

use app::backend::{Backend, ClientId};
use app::types::{
    is_valid_id, EnhanceRequest, EnhanceTicket, HistoryPage, JobEvent, JobKind, JobRequest, JobResult, JobSource, JobTicket, QueueDepth, Readiness, ServerInfo,
    ServerState, UploadInfo, WorkerCounts,
};
use app::{ErrorKind, StudioError};
use engine::lora::LoraLibrary;
use engine::pipeline::GenerateRequest;
use std::sync::Arc;

use super::cluster::RedisFrontEnd;
use super::history::History;
use super::limits::RateLimiter;
use super::metrics::Metrics;
use super::queue::{spawn_worker, Generator, Job, JobQueue, QueueLimits};
use super::startup::{Phase, Startup};
use super::store::{random_seed, ImageStore};

/// The limits on submissions: the queue's bounds and the rate per client.
#[derive(Clone, Debug)]
pub struct StudioLimits {
    pub queue: QueueLimits,
    /// Submissions per minute per client; 0: unlimited.
    pub submissions_per_minute: u32,
}

impl StudioLimits {
    /// A queue of `capacity`, nothing limited per client (the tests' studios).
    pub fn capacity(capacity: usize) -> StudioLimits {
        StudioLimits { queue: QueueLimits::capacity(capacity), submissions_per_minute: 0 }
    }
}

/// New tokens an enhancement on the tiny model writes when the request does not say.
const TINY_DEFAULT_ENHANCE_TOKENS: usize = 64;

pub struct Studio {
    /// The jobs' events and latest states as this process knows them (the websockets and the
    /// HTTP APIs read them here); with no `redis`, also the queue the local workers run.
    pub queue: Arc<JobQueue>,
    /// With `--queue redis://…`: jobs go to Redis and run on `zimage worker`s.
    redis: Option<Arc<RedisFrontEnd>>,
    pub store: Arc<ImageStore>,
    pub history: Arc<History>,
    /// The model line; the device and precision are known once the model is loaded.
    info: std::sync::RwLock<ServerInfo>,
    rate: RateLimiter,
    /// Each worker's device and generator (for `/readyz` and the GPU memory in `/metrics`); empty
    /// while the model loads.
    devices: std::sync::RwLock<Vec<(String, Arc<dyn Generator>)>>,
    /// Downloading, loading, ready or failed (`/readyz`, the page, submissions).
    pub startup: Startup,
    /// Turns true when the server stops: the websocket sessions close.
    closing: tokio::sync::watch::Sender<bool>,
    workers: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The LoRA folder jobs pick from (`serve --lora-dir`).
    pub(super) loras: Arc<LoraLibrary>,
}

impl Studio {
    /// Opens the history in the store's folder; jobs are refused (503, with what the server is
    /// doing) until [`Studio::attach`] gives the loaded model's workers. Everything else is served.
    pub fn open(
        model: &engine::loader::ModelSource,
        store: Arc<ImageStore>,
        limits: StudioLimits,
        phase: Phase,
        loras: Arc<LoraLibrary>,
    ) -> Result<Arc<Studio>, StudioError> {
        use engine::loader::ModelSource;
        let history = Arc::new(History::open(store.root())?);
        let queue = JobQueue::new(limits.queue.clone(), Arc::new(Metrics::new()));
        let tiny = matches!(model, ModelSource::Tiny);
        let info = ServerInfo {
            model: model.display_name(),
            tiny_model: tiny,
            random_weights: tiny || matches!(model, ModelSource::RandomFullSize),
            device: String::new(), // known once loaded; the page says "(loading)"
            queue_capacity: queue.capacity(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(Arc::new(Studio {
            queue,
            redis: None,
            store,
            history,
            info: std::sync::RwLock::new(info),
            rate: RateLimiter::new(limits.submissions_per_minute),
            devices: Default::default(),
            startup: Startup::new(phase),
            closing: tokio::sync::watch::Sender::new(false),
            workers: std::sync::Mutex::new(Vec::new()),
            loras,
        }))
    }

    /// The model is loaded: one worker per `(device label, generator)`, and the studio is ready.
    pub fn attach(&self, generators: Vec<(String, Arc<dyn Generator>)>) {
        let Some((_, first)) = generators.first() else {
            return self.startup.set(Phase::Failed { reason: "no device to run the model on".into() });
        };
        {
            let mut info = self.info.write().unwrap_or_else(|p| p.into_inner());
            info.model = first.model_name();
            info.tiny_model = first.is_tiny();
            info.random_weights = first.has_random_weights();
            info.device = generators.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>().join(", ");
        }
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (_, g)) in generators.iter().enumerate() {
            workers.push(spawn_worker(
                format!("zimage-worker-{i}"),
                self.queue.clone(),
                g.clone(),
                self.store.clone(),
                self.history.clone(),
            ));
        }
        *self.devices.write().unwrap_or_else(|p| p.into_inner()) = generators;
        self.startup.set(Phase::Ready);
    }

    /// `open` and `attach` at once: a studio whose generators are ready (tests, simulations).
    pub fn start(
        generators: Vec<(String, Arc<dyn Generator>)>,
        store: Arc<ImageStore>,
        limits: StudioLimits,
    ) -> Result<Arc<Studio>, StudioError> {
        let first = &generators.first().expect("at least one device").1;
        let source = if first.is_tiny() {
            engine::loader::ModelSource::Tiny
        } else {
            engine::loader::ModelSource::Hub(first.model_name())
        };
        let loras = Arc::new(LoraLibrary::new(store.root().join("loras")));
        let studio = Studio::open(&source, store, limits, Phase::Loading { device: "CPU".into() }, loras)?;
        studio.attach(generators);
        Ok(studio)
    }

    /// A front end of a Redis deployment: no local workers; jobs go to `zimage worker`s through
    /// the Redis at `url`. `model` is what the workers are told to load (the studio's model line).
    pub async fn start_redis(
        url: &str,
        claim_idle: std::time::Duration,
        model: &engine::loader::ModelSource,
        store: Arc<ImageStore>,
        limits: StudioLimits,
        loras: Arc<LoraLibrary>,
    ) -> anyhow::Result<Arc<Studio>> {
        let history = Arc::new(History::open(store.root()).map_err(|e| anyhow::anyhow!("opening the history: {}", e.reason))?);
        let queue = JobQueue::new(limits.queue.clone(), Arc::new(Metrics::new()));
        let redis = RedisFrontEnd::start(url, queue.capacity(), claim_idle, queue.clone(), store.clone(), history.clone()).await?;
        use engine::loader::ModelSource;
        let tiny = matches!(model, ModelSource::Tiny);
        let info = ServerInfo {
            model: model.display_name(),
            tiny_model: tiny,
            random_weights: tiny || matches!(model, ModelSource::RandomFullSize),
            device: "workers on a Redis queue".to_string(),
            queue_capacity: queue.capacity(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(Arc::new(Studio {
            queue,
            redis: Some(redis),
            store,
            history,
            info: std::sync::RwLock::new(info),
            rate: RateLimiter::new(limits.submissions_per_minute),
            devices: Default::default(),
            startup: Startup::new(Phase::Ready),
            closing: tokio::sync::watch::Sender::new(false),
            workers: std::sync::Mutex::new(Vec::new()),
            loras,
        }))
    }

    /// The first worker's generator (what LoRA files are checked against); none while loading
    /// and on a Redis front end.
    pub(super) fn first_generator(&self) -> Option<Arc<dyn Generator>> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).first().map(|(_, g)| g.clone())
    }

    /// A job's latest event: this process's, else (a Redis front end) the shared one.
    pub async fn snapshot(&self, job_id: &str) -> Option<JobEvent> {
        if let Some(ev) = self.queue.snapshot(job_id) {
            return Some(ev);
        }
        match &self.redis {
            Some(redis) => redis.snapshot(job_id).await,
            None => None,
        }
    }

    /// `submit` for a request from `client` that came in by `source`.
    pub fn submit_from(&self, mut req: JobRequest, source: JobSource, client: &ClientId) -> Result<JobTicket, StudioError> {
        req.validate()?;
        self.resolve_loras(&mut req.loras)?;
        let (width, height, strength) = match &req.kind {
            JobKind::Generate { width, height } => (*width, *height, None),
            JobKind::Transform { upload_id, strength } => {
                let (w, h) = self.store.upload_size(upload_id)?;
                (w, h, Some(*strength))
            }
        };
        let seed = req.seed.unwrap_or_else(random_seed);
        // the engine's own checks (sizes, steps, strength vs steps) with its readable reasons
        let probe = GenerateRequest {
            prompt: req.full_prompt(),
            width: width as usize,
            height: height as usize,
            steps: req.steps as usize,
            seed,
            n: 1,
            strength: strength.unwrap_or(1.0),
            ..GenerateRequest::default()
        };
        probe.validate().map_err(engine_reason)?;
        if let Some(s) = strength {
            engine::scheduler::img2img_start_step(req.steps as usize, s).map_err(engine_reason)?;
        }
        self.admit(client)?;
        let job = Job::new(req, seed, width, height, source, client.clone());
        let job_id = job.id.clone();
        let position = match &self.redis {
            Some(redis) => redis.submit(job)?,
            None => self.queue.submit(job)?,
        };
        Ok(JobTicket { job_id, position, seed, width, height })
    }

    /// Validates and enqueues a prompt enhancement from `client` that came in by `source`: the
    /// same queue, limits and readiness as images. Refused on a Redis front end (its workers'
    /// protocol carries image jobs only).
    pub fn enhance_from(&self, req: EnhanceRequest, source: JobSource, client: &ClientId) -> Result<EnhanceTicket, StudioError> {
        req.validate()?;
        if self.redis.is_some() {
            return Err(super::cluster::enhancement_on_redis());
        }
        let seed = req.seed.unwrap_or_else(random_seed);
        let engine_req = engine::enhancer::EnhanceRequest {
            prompt: req.prompt.trim().to_string(),
            system: req.system,
            max_new_tokens: req.max_new_tokens.unwrap_or(if self.info().tiny_model {
                // the tiny model's 1024 positions hold our instructions (~770 tokens of its byte
                // tokenizer) and little more
                TINY_DEFAULT_ENHANCE_TOKENS
            } else {
                app::types::limits::DEFAULT_ENHANCE_TOKENS
            }),
            temperature: req.temperature.unwrap_or(EnhanceRequest::DEFAULT_TEMPERATURE),
            top_p: req.top_p.unwrap_or(EnhanceRequest::DEFAULT_TOP_P),
            seed,
            context_limit: engine::enhancer::DEFAULT_CONTEXT_LIMIT,
        };
        engine_req.validate().map_err(engine_reason)?;
        self.admit(client)?;
        let job = Job::enhancement(engine_req, source, client.clone());
        let job_id = job.id.clone();
        let position = self.queue.submit(job)?;
        Ok(EnhanceTicket { job_id, position, seed })
    }

    /// Whether a new job may be taken now: not draining, the model ready, the client within its
    /// rate.
    fn admit(&self, client: &ClientId) -> Result<(), StudioError> {
        if self.queue.is_draining() {
            return Err(super::queue::shutting_down());
        }
        let phase = self.startup.get();
        if phase != Phase::Ready {
            let reason = match phase {
                Phase::Failed { .. } => phase.message(),
                _ => format!("The server is starting: the model is still loading. {} Try again when it is ready.", phase.message()),
            };
            return Err(StudioError::new(ErrorKind::Unavailable, reason).retry_after(5));
        }
        if let Err(e) = self.rate.take(client) {
            self.queue.metrics.refusals.with_label_values(&["rate_limited"]).inc();
            return Err(e);
        }
        Ok(())
    }

    /// `/readyz`'s answer: ready when the model is loaded and the server is not draining; what
    /// it is doing otherwise; the workers idle or busy, the queue's depth.
    pub fn readiness(&self) -> Readiness {
        let draining = self.queue.is_draining();
        let model = self.info.read().unwrap_or_else(|p| p.into_inner()).model.clone();
        if let Some(redis) = &self.redis {
            // a front end is ready when it can queue jobs: Redis answers
            let waiting = redis.waiting();
            let ready = !draining && waiting.is_ok();
            let (state, message) = match (draining, ready) {
                (true, _) => (ServerState::Draining, "The server is shutting down.".to_string()),
                (false, true) => (ServerState::Ready, "Ready.".to_string()),
                (false, false) => (ServerState::RedisUnreachable, "The job queue (Redis) does not answer.".to_string()),
            };
            return Readiness {
                ready,
                state,
                model_loaded: true,
                model,
                message,
                download: None,
                workers: None,
                queue: Some(QueueDepth { backend: Some("redis".into()), waiting: waiting.ok().map(|w| w as usize), capacity: self.queue.capacity() }),
            };
        }
        let phase = self.startup.get();
        let loaded = phase == Phase::Ready;
        let (state, message) = if draining {
            (ServerState::Draining, "The server is shutting down.".to_string())
        } else {
            (phase.state(), phase.message())
        };
        let running = self.queue.running_len();
        let workers = self.devices.read().unwrap_or_else(|p| p.into_inner()).len();
        Readiness {
            ready: loaded && !draining,
            state,
            model_loaded: loaded,
            model,
            message,
            download: phase.download(),
            workers: Some(WorkerCounts { total: workers, busy: running.min(workers), idle: workers.saturating_sub(running) }),
            queue: Some(QueueDepth { backend: None, waiting: Some(self.queue.waiting_len()), capacity: self.queue.capacity() }),
        }
    }

    /// `/metrics`: the counters and histograms, with the gauges read now.
    pub fn metrics_text(&self) -> String {
        let m = &self.queue.metrics;
        m.queue_depth.set(self.queue.waiting_len() as i64);
        m.running.set(self.queue.running_len() as i64);
        for (label, g) in self.devices.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(bytes) = g.device_memory_used_bytes() {
                m.gpu_memory_used_bytes.with_label_values(&[label.as_str()]).set(bytes);
            }
        }
        m.render()
    }

    /// A watch that turns true when the websockets should close (the server stops).
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn close_sockets(&self) {
        self.closing.send_replace(true);
    }

    /// Stops the workers after their current job.
    pub fn shutdown(&self) {
        self.queue.shutdown();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        drop(workers); // detached: a running generation may take a while; the process is exiting
    }
}

impl Backend for Studio {
    fn info(&self) -> ServerInfo {
        self.info.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn submit(&self, req: JobRequest, client: &ClientId) -> Result<JobTicket, StudioError> {
        self.submit_from(req, JobSource::Studio, client)
    }

    fn cancel(&self, job_id: &str) -> Result<(), StudioError> {
        if !is_valid_id(job_id) {
            return Err(StudioError::invalid("That is not a job id."));
        }
        match &self.redis {
            Some(redis) => redis.cancel(job_id),
            None => self.queue.cancel(job_id),
        }
    }

    fn image(&self, image_id: &str) -> Result<JobResult, StudioError> {
        self.store.load_meta(image_id)
    }

    fn store_upload(&self, bytes: Vec<u8>, _content_type: Option<String>) -> Result<UploadInfo, StudioError> {
        // the bytes decide the type (a browser may send a wrong or missing content type)
        self.store.save_upload(&bytes)
    }

    fn history(&self, search: &str, page: u32) -> Result<HistoryPage, StudioError> {
        if page > 100_000 {
            return Err(StudioError::invalid("That page is past the end of the history."));
        }
        self.history.page(search, page)
    }

    fn delete_image(&self, image_id: &str) -> Result<(), StudioError> {
        if !is_valid_id(image_id) {
            return Err(StudioError::invalid("That is not an image id."));
        }
        let listed = self.history.remove(image_id)?;
        let stored = self.store.delete_image(image_id)?;
        if listed || stored {
            Ok(())
        } else {
            Err(StudioError::not_found("This image does not exist (or was already deleted)."))
        }
    }

    fn loras(&self) -> Result<Vec<app::types::LoraInfo>, StudioError> {
        self.lora_list()
    }

    fn enhance(&self, req: EnhanceRequest, client: &ClientId) -> Result<EnhanceTicket, StudioError> {
        self.enhance_from(req, JobSource::Studio, client)
    }
}

fn engine_reason(e: engine::Error) -> StudioError {
    match e {
        engine::Error::InvalidRequest(m) => {
            let mut m = m;
            if let Some(c) = m.get(0..1) {
                m.replace_range(0..1, &c.to_uppercase());
            }
            StudioError::invalid(m)
        }
        other => StudioError::internal(other.to_string()),
    }
}
