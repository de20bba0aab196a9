//! The job queue: bounded, fair between clients (round-robin: each client's jobs in their order,
//! the clients taking turns), one worker thread per device. Every state change is published as a
//! [`JobEvent`] on a broadcast channel (the websocket sessions filter it by job id) and kept as the
//! job's latest snapshot, so a client that (re)connects gets the current state at once.
//!
//! A job makes an image or rewrites a prompt (the enhancer runs the text encoder on the same
//! device, so enhancements wait in the same line); an enhancement streams its text as
//! `enhance_text` events and stops at the next token when cancelled.

use app::backend::ClientId;
use app::types::{EnhanceResult, JobEvent, JobKind, JobRequest, JobResult, JobSource, TimingsMs};
use app::{ErrorKind, StudioError};
use engine::enhancer::{EnhanceEvent, EnhanceOutput, EnhanceRequest, FinishReason};
use engine::pipeline::{Control, GenerateOutput, GenerateRequest, StepEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;

use super::history::History;
use super::metrics::Metrics;
use super::store::{new_id, ImageStore};

/// Finished jobs' last events are kept this long for reconnecting clients.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);
const KEEP_FINISHED_MAX: usize = 2000;
/// Longest side of the live preview sent to browsers.
const PREVIEW_MAX_SIDE: u32 = 256;
/// What a client over its cap of queued jobs is told to wait: about one job's time.
const CLIENT_CAP_RETRY_SECS: u64 = 10;

/// The queue's bounds.
#[derive(Clone, Debug)]
pub struct QueueLimits {
    /// How many jobs may wait (all clients together; running ones not counted).
    pub capacity: usize,
    /// How many jobs one client may have waiting or running; 0: no cap.
    pub max_per_client: usize,
    /// A job running longer is stopped and fails with a reason; `None`: no bound.
    pub job_timeout: Option<Duration>,
}

impl QueueLimits {
    /// A queue of `capacity` with no cap per client and no job timeout.
    pub fn capacity(capacity: usize) -> QueueLimits {
        QueueLimits { capacity, max_per_client: 0, job_timeout: None }
    }
}

/// What a worker runs; the engine's pipeline in production (`PipelineGenerator`), a fake in tests.
pub trait Generator: Send + Sync + 'static {
    fn model_name(&self) -> String;
    fn is_tiny(&self) -> bool;
    /// Random weights (the tiny model, or the full-size architecture for benchmarks).
    fn has_random_weights(&self) -> bool {
        self.is_tiny()
    }
    /// Memory in use on the generator's device in bytes, where the device says (CUDA).
    fn device_memory_used_bytes(&self) -> Option<f64> {
        None
    }
    /// Whether a LoRA file fits this generator's model (one for another architecture does not).
    fn check_lora(&self, _file: &engine::lora::LoraFile) -> Result<(), String> {
        Ok(())
    }
    /// Runs `req` with `loras` (from the worker's LoRA folder) merged into the weights.
    fn generate(
        &self,
        req: &GenerateRequest,
        loras: &[app::types::LoraChoice],
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> engine::Result<GenerateOutput>;
    /// Rewrites `req.prompt` with the model's text encoder run as a language model; `on_event`
    /// gets the text as it grows and stops it with `Control::Cancel`.
    fn enhance(
        &self,
        _req: &EnhanceRequest,
        _on_event: &mut dyn FnMut(&EnhanceEvent) -> Control,
    ) -> engine::Result<EnhanceOutput> {
        Err(engine::Error::InvalidRequest("this worker cannot enhance prompts".into()))
    }
}

/// A validated job.
pub struct Job {
    pub id: String,
    /// Which door the request came in by (kept in the history).
    pub source: JobSource,
    /// Who submitted it (the fair queue's turns and the cap per client).
    pub client: ClientId,
    pub work: Work,
    pub submitted: Instant,
    cancel: AtomicBool,
    /// Set when the server, not the client, stopped the job (timeout, shutdown): the job then
    /// fails with this reason instead of counting as cancelled.
    stop_reason: OnceLock<String>,
}

/// What a job does.
pub enum Work {
    Image(ImageWork),
    /// Rewrite a prompt (the engine's request, its seed fixed).
    Enhance(EnhanceRequest),
}

/// An image job's request and what the server settled for it.
pub struct ImageWork {
    pub request: JobRequest,
    /// Prompt with the style suffix.
    pub full_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

impl Job {
    /// An image job.
    pub fn new(request: JobRequest, seed: u64, width: u32, height: u32, source: JobSource, client: ClientId) -> Job {
        let work = Work::Image(ImageWork { full_prompt: request.full_prompt(), request, seed, width, height });
        Job::with_work(work, source, client)
    }
    /// A prompt enhancement.
    pub fn enhancement(request: EnhanceRequest, source: JobSource, client: ClientId) -> Job {
        Job::with_work(Work::Enhance(request), source, client)
    }
    fn with_work(work: Work, source: JobSource, client: ClientId) -> Job {
        Job {
            id: new_id(),
            source,
            client,
            work,
            submitted: Instant::now(),
            cancel: AtomicBool::new(false),
            stop_reason: OnceLock::new(),
        }
    }
    /// The image part of an image job.
    pub fn image(&self) -> Option<&ImageWork> {
        match &self.work {
            Work::Image(w) => Some(w),
            Work::Enhance(_) => None,
        }
    }
    pub fn is_enhancement(&self) -> bool {
        matches!(self.work, Work::Enhance(_))
    }
    /// The job under the id and submission time a front end gave it (a Redis worker running a
    /// job a front end accepted).
    pub fn accepted_as(mut self, id: String, submitted: Instant) -> Job {
        self.id = id;
        self.submitted = submitted;
        self
    }
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    /// Stops the job at its next step; it fails with `reason` (the first reason given wins).
    fn stop(&self, reason: String) {
        let _ = self.stop_reason.set(reason);
        self.cancel.store(true, Ordering::SeqCst);
    }
    /// The job's final event after the engine stopped on a cancel.
    fn cancelled_event(&self) -> JobEvent {
        match self.stop_reason.get() {
            Some(reason) => JobEvent::Error { job_id: self.id.clone(), reason: reason.clone() },
            None => JobEvent::Cancelled { job_id: self.id.clone() },
        }
    }
}

/// The waiting jobs, served round-robin between clients: one client's fifty jobs wait behind
/// another client's one.
#[derive(Default)]
struct Waiting {
    /// Each client's jobs in submission order.
    by_client: HashMap<ClientId, VecDeque<Arc<Job>>>,
    /// The clients with waiting jobs, in the order they are served.
    turns: VecDeque<ClientId>,
    len: usize,
}

impl Waiting {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, job: Arc<Job>) {
        let jobs = self.by_client.entry(job.client.clone()).or_default();
        if jobs.is_empty() {
            self.turns.push_back(job.client.clone());
        }
        jobs.push_back(job);
        self.len += 1;
    }

    /// The next job to run: the first of the client whose turn it is; that client goes to the back.
    fn pop(&mut self) -> Option<Arc<Job>> {
        let client = self.turns.pop_front()?;
        let jobs = self.by_client.get_mut(&client).expect("a client in turns has jobs");
        let job = jobs.pop_front().expect("a client in turns has jobs");
        if jobs.is_empty() {
            self.by_client.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.len -= 1;
        Some(job)
    }

    fn remove(&mut self, job_id: &str) -> Option<Arc<Job>> {
        let (client, i) = self
            .by_client
            .iter()
            .find_map(|(c, jobs)| jobs.iter().position(|j| j.id == job_id).map(|i| (c.clone(), i)))?;
        let jobs = self.by_client.get_mut(&client).expect("found above");
        let job = jobs.remove(i).expect("index from position");
        if jobs.is_empty() {
            self.by_client.remove(&client);
            self.turns.retain(|c| *c != client);
        }
        self.len -= 1;
        Some(job)
    }

    fn count_for(&self, client: &ClientId) -> usize {
        self.by_client.get(client).map_or(0, VecDeque::len)
    }

    /// The waiting jobs in the order they will start: round r takes each client's r-th job,
    /// the clients in their turn order.
    fn in_order(&self) -> Vec<Arc<Job>> {
        let queues: Vec<&VecDeque<Arc<Job>>> = self.turns.iter().map(|c| &self.by_client[c]).collect();
        let rounds = queues.iter().map(|q| q.len()).max().unwrap_or(0);
        let mut out = Vec::with_capacity(self.len);
        for r in 0..rounds {
            out.extend(queues.iter().filter_map(|q| q.get(r).cloned()));
        }
        out
    }

    fn take_all(&mut self) -> Vec<Arc<Job>> {
        let all = self.in_order();
        *self = Waiting::default();
        all
    }
}

struct Snapshot {
    event: JobEvent,
    finished: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    waiting: Waiting,
    running: HashMap<String, Arc<Job>>,
    snapshots: HashMap<String, Snapshot>,
    /// No new jobs (the server is stopping); the workers finish what runs.
    draining: bool,
    shutdown: bool,
}

pub struct JobQueue {
    inner: Mutex<Inner>,
    cv: Condvar,
    events: broadcast::Sender<JobEvent>,
    limits: QueueLimits,
    pub metrics: Arc<Metrics>,
}

impl JobQueue {
    pub fn new(limits: QueueLimits, metrics: Arc<Metrics>) -> Arc<JobQueue> {
        let (events, _) = broadcast::channel(1024);
        let limits = QueueLimits { capacity: limits.capacity.max(1), ..limits };
        Arc::new(JobQueue { inner: Mutex::new(Inner::default()), cv: Condvar::new(), events, limits, metrics })
    }

    pub fn capacity(&self) -> usize {
        self.limits.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// The latest event of a job (queued / step / done …), if the job is known.
    pub fn snapshot(&self, job_id: &str) -> Option<JobEvent> {
        self.lock().snapshots.get(job_id).map(|s| s.event.clone())
    }

    /// Whether `job_id` is an enhancement still waiting or running.
    pub fn is_pending_enhancement(&self, job_id: &str) -> bool {
        let inner = self.lock();
        inner.running.get(job_id).map(|j| j.is_enhancement()).unwrap_or_else(|| {
            inner.waiting.by_client.values().flatten().any(|j| j.id == job_id && j.is_enhancement())
        })
    }

    pub fn waiting_len(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn running_len(&self) -> usize {
        self.lock().running.len()
    }

    pub fn is_draining(&self) -> bool {
        self.lock().draining
    }

    /// Records and broadcasts an event (under the lock, so snapshots and broadcasts agree).
    fn publish_locked(&self, inner: &mut Inner, ev: JobEvent) {
        let finished = ev.is_terminal().then(Instant::now);
        let outcome = match &ev {
            JobEvent::Done { .. } | JobEvent::EnhanceDone { .. } => Some("done"),
            JobEvent::Error { .. } => Some("error"),
            JobEvent::Cancelled { .. } => Some("cancelled"),
            _ => None,
        };
        // a job ends once: a second terminal event for it (never sent today) is not counted again
        if let Some(outcome) = outcome.filter(|_| !inner.snapshots.get(ev.job_id()).is_some_and(|s| s.finished.is_some())) {
            self.metrics.jobs.with_label_values(&[outcome]).inc();
        }
        inner.snapshots.insert(ev.job_id().to_string(), Snapshot { event: ev.clone(), finished });
        let _ = self.events.send(ev);
    }

    pub fn publish(&self, ev: JobEvent) {
        let mut inner = self.lock();
        self.publish_locked(&mut inner, ev);
    }

    /// Announces every place in line that changed (a newcomer from another client may go ahead of
    /// a flooding client's jobs).
    fn publish_positions(&self, inner: &mut Inner) {
        let updates: Vec<JobEvent> = inner
            .waiting
            .in_order()
            .iter()
            .enumerate()
            .map(|(i, j)| JobEvent::Queued { job_id: j.id.clone(), position: i + 1 })
            .filter(|ev| inner.snapshots.get(ev.job_id()).is_none_or(|s| s.event != *ev))
            .collect();
        for ev in updates {
            self.publish_locked(inner, ev);
        }
        self.metrics.queue_depth.set(inner.waiting.len() as i64);
        self.metrics.running.set(inner.running.len() as i64);
    }

    fn prune(inner: &mut Inner) {
        let now = Instant::now();
        inner
            .snapshots
            .retain(|_, s| s.finished.is_none_or(|t| now.duration_since(t) < KEEP_FINISHED));
        if inner.snapshots.len() > KEEP_FINISHED_MAX {
            let mut done: Vec<(Instant, String)> = inner
                .snapshots
                .iter()
                .filter_map(|(k, s)| s.finished.map(|t| (t, k.clone())))
                .collect();
            done.sort();
            let excess = inner.snapshots.len() - KEEP_FINISHED_MAX;
            for (_, k) in done.into_iter().take(excess) {
                inner.snapshots.remove(&k);
            }
        }
    }

    /// Enqueues a job; returns its 1-based position. Refuses while draining, when `capacity` jobs
    /// already wait, or when the job's client has its cap of jobs waiting or running.
    pub fn submit(&self, job: Job) -> Result<usize, StudioError> {
        let mut inner = self.lock();
        if inner.shutdown || inner.draining {
            self.metrics.refusals.with_label_values(&["unavailable"]).inc();
            return Err(shutting_down());
        }
        if inner.waiting.len() >= self.limits.capacity {
            self.metrics.refusals.with_label_values(&["queue_full"]).inc();
            return Err(StudioError::new(
                ErrorKind::QueueFull,
                format!(
                    "The queue is full ({} jobs waiting). Please try again in a minute.",
                    inner.waiting.len()
                ),
            ));
        }
        let cap = self.limits.max_per_client;
        if cap > 0 {
            let running = inner.running.values().filter(|j| j.client == job.client).count();
            let mine = inner.waiting.count_for(&job.client) + running;
            if mine >= cap {
                self.metrics.refusals.with_label_values(&["client_cap"]).inc();
                return Err(StudioError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "You already have {mine} jobs queued or running (at most {cap} per client). \
                         Wait for one to finish, then submit again."
                    ),
                )
                .retry_after(CLIENT_CAP_RETRY_SECS));
            }
        }
        Self::prune(&mut inner);
        let job = Arc::new(job);
        let job_id = job.id.clone();
        inner.waiting.push(job);
        self.publish_positions(&mut inner);
        let position = inner.waiting.in_order().iter().position(|j| j.id == job_id).map_or(inner.waiting.len(), |i| i + 1);
        drop(inner);
        self.cv.notify_one();
        Ok(position)
    }

    /// Stops taking jobs and fails every waiting one with `reason`; the running ones go on.
    /// Returns how many waiting jobs were failed.
    pub fn drain(&self, reason: &str) -> usize {
        let mut inner = self.lock();
        inner.draining = true;
        let waiting = inner.waiting.take_all();
        for job in &waiting {
            job.cancel.store(true, Ordering::SeqCst);
            self.publish_locked(&mut inner, JobEvent::Error { job_id: job.id.clone(), reason: reason.to_string() });
        }
        self.metrics.queue_depth.set(0);
        waiting.len()
    }

    /// Stops every running job at its next step; each fails with `reason`.
    pub fn stop_running(&self, reason: &str) {
        for job in self.lock().running.values() {
            job.stop(reason.to_string());
        }
    }

    /// Cancels a waiting job at once; a running one stops at its next step.
    /// Cancelling a finished job is a no-op.
    pub fn cancel(&self, job_id: &str) -> Result<(), StudioError> {
        let mut inner = self.lock();
        if let Some(job) = inner.waiting.remove(job_id) {
            job.cancel.store(true, Ordering::SeqCst);
            self.publish_locked(&mut inner, JobEvent::Cancelled { job_id: job.id.clone() });
            self.publish_positions(&mut inner);
            return Ok(());
        }
        if let Some(job) = inner.running.get(job_id) {
            job.cancel.store(true, Ordering::SeqCst);
            return Ok(());
        }
        if inner.snapshots.contains_key(job_id) {
            return Ok(());
        }
        Err(StudioError::not_found("No such job."))
    }

    /// Blocks until a job is waiting (the next in the clients' turns) and marks it running; `None`
    /// after [`shutdown`].
    pub fn next_job(&self) -> Option<Arc<Job>> {
        let mut inner = self.lock();
        loop {
            if inner.shutdown {
                return None;
            }
            if let Some(job) = inner.waiting.pop() {
                inner.running.insert(job.id.clone(), job.clone());
                self.metrics.queue_wait_seconds.observe(job.submitted.elapsed().as_secs_f64());
                self.publish_positions(&mut inner);
                return Some(job);
            }
            inner = self.cv.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Publishes a job's final event and forgets it as running.
    pub fn finish(&self, ev: JobEvent) {
        let mut inner = self.lock();
        inner.running.remove(ev.job_id());
        self.metrics.running.set(inner.running.len() as i64);
        self.publish_locked(&mut inner, ev);
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.cv.notify_all();
    }
}

/// The refusal of a submission while the server stops.
pub fn shutting_down() -> StudioError {
    StudioError::new(ErrorKind::Unavailable, "The server is shutting down; please try again in a minute.").retry_after(30)
}

/// Work a worker hands to its publisher thread, in order: step previews (JPEG, base64) and the
/// end of each job (PNG encoding, storing, the final event). The worker goes straight on to the
/// next step or the next job, so that this CPU work overlaps the GPU's.
enum Post {
    Step { job_id: String, step: u32, total: u32, elapsed_ms: u64, eta_ms: u64, preview: Option<image::RgbImage> },
    Finished { job: Arc<Job>, outcome: Result<Generated, JobEvent> },
}

/// A finished generation on its way to the store.
struct Generated {
    out: GenerateOutput,
    strength: Option<f32>,
    queued: Duration,
    model: String,
    tiny: bool,
}

/// Where a finished job's PNG goes: into this process's data folder and history (`zimage serve`),
/// or handed on (a Redis worker sends it to the front ends, which store it); the answer is the
/// job's final event.
pub enum ResultSink {
    Store { history: Arc<History> },
    Forward(ForwardResult),
}

/// Hands on a finished job's PNG and result; returns the job's final event.
pub type ForwardResult = Box<dyn Fn(&Job, Vec<u8>, JobResult) -> JobEvent + Send + Sync>;

/// Starts one worker thread running jobs from `queue` on `generator` (one per device), and its
/// publisher thread.
pub fn spawn_worker(
    name: String,
    queue: Arc<JobQueue>,
    generator: Arc<dyn Generator>,
    store: Arc<ImageStore>,
    history: Arc<History>,
) -> std::thread::JoinHandle<()> {
    spawn_worker_with(name, queue, generator, store, ResultSink::Store { history })
}

/// [`spawn_worker`] with the finished PNGs going to `sink`.
pub fn spawn_worker_with(
    name: String,
    queue: Arc<JobQueue>,
    generator: Arc<dyn Generator>,
    store: Arc<ImageStore>,
    sink: ResultSink,
) -> std::thread::JoinHandle<()> {
    let (posts, inbox) = std::sync::mpsc::channel::<Post>();
    let publisher_queue = queue.clone();
    let publisher_store = store.clone();
    std::thread::Builder::new()
        .name(format!("{name}-publish"))
        .spawn(move || {
            for post in inbox {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| publish(&publisher_queue, &publisher_store, &sink, post)));
                if let Err(job_id) = outcome.unwrap_or_else(|_| Err(None)) {
                    if let Some(job_id) = job_id {
                        publisher_queue.finish(JobEvent::Error {
                            job_id,
                            reason: "Storing the image crashed; the error was logged on the server.".into(),
                        });
                    }
                }
            }
        })
        .expect("spawning a publisher thread");
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            while let Some(job) = queue.next_job() {
                let started = Instant::now();
                if let Work::Enhance(req) = &job.work {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_enhancement(&queue, &*generator, &job, req)));
                    queue.metrics.job_seconds.observe(started.elapsed().as_secs_f64());
                    // the deltas went out from this thread; the end follows them (after any step
                    // post of an earlier image job still on its way: that job is another's)
                    queue.finish(outcome.unwrap_or_else(|_| JobEvent::Error {
                        job_id: job.id.clone(),
                        reason: "The enhancement crashed; the error was logged on the server.".into(),
                    }));
                    continue;
                }
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_job(&queue, &*generator, &store, &job, &posts)
                }));
                queue.metrics.job_seconds.observe(started.elapsed().as_secs_f64());
                let outcome = outcome.unwrap_or_else(|_| {
                    Err(JobEvent::Error {
                        job_id: job.id.clone(),
                        reason: "The generation crashed; the error was logged on the server.".into(),
                    })
                });
                if posts.send(Post::Finished { job: job.clone(), outcome }).is_err() {
                    queue.finish(JobEvent::Error { job_id: job.id.clone(), reason: "The server is shutting down.".into() });
                }
            }
        })
        .expect("spawning a worker thread")
}

/// Publishes one post; on a panic inside, `Err(Some(job id))` names the job to fail.
fn publish(queue: &JobQueue, store: &ImageStore, sink: &ResultSink, post: Post) -> Result<(), Option<String>> {
    match post {
        Post::Step { job_id, step, total, elapsed_ms, eta_ms, preview } => {
            let preview = preview.as_ref().and_then(preview_data_url);
            queue.publish(JobEvent::Step { job_id, step, total, elapsed_ms, eta_ms, preview });
        }
        Post::Finished { job, outcome } => {
            let job_id = job.id.clone();
            let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match outcome {
                Ok(generated) => store_result(store, sink, &job, generated),
                Err(ev) => ev,
            }))
            .map_err(|_| Some(job_id))?;
            queue.finish(event);
        }
    }
    Ok(())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn preview_data_url(img: &image::RgbImage) -> Option<String> {
    use base64::Engine;
    let img = if img.width().max(img.height()) > PREVIEW_MAX_SIDE {
        let s = PREVIEW_MAX_SIDE as f32 / img.width().max(img.height()) as f32;
        let (w, h) = (((img.width() as f32 * s) as u32).max(1), ((img.height() as f32 * s) as u32).max(1));
        image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle)
    } else {
        img.clone()
    };
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 80).encode_image(&img).ok()?;
    Some(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpg)))
}

/// Runs one job's generation on the worker; the publisher stores the result
/// (`store_result`). Errors come back as the job's final event.
fn run_job(
    queue: &JobQueue,
    generator: &dyn Generator,
    store: &ImageStore,
    job: &Job,
    posts: &std::sync::mpsc::Sender<Post>,
) -> Result<Generated, JobEvent> {
    let job_id = job.id.clone();
    let queued = job.submitted.elapsed();
    if job.cancelled() {
        return Err(job.cancelled_event());
    }
    let Some(image) = job.image() else {
        return Err(JobEvent::Error { job_id, reason: "An enhancement reached the image runner.".into() });
    };
    let started = Instant::now();
    let mut last_step_elapsed = Duration::ZERO;
    queue.publish(JobEvent::Started {
        job_id: job_id.clone(),
        width: image.width,
        height: image.height,
        steps: image.request.steps,
        seed: image.seed,
    });
    let (init_image, strength) = match &image.request.kind {
        JobKind::Generate { .. } => (None, None),
        JobKind::Transform { upload_id, strength } => match store.load_upload(upload_id) {
            Ok(img) => (Some(img), Some(*strength)),
            Err(e) => return Err(JobEvent::Error { job_id, reason: e.reason }),
        },
    };
    let req = GenerateRequest {
        prompt: image.full_prompt.clone(),
        negative_prompt: image.request.negative_prompt.clone(),
        width: image.width as usize,
        height: image.height as usize,
        steps: image.request.steps as usize,
        seed: image.seed,
        n: 1,
        init_image,
        strength: strength.unwrap_or(1.0),
        preview: true,
        variation: image.request.variation,
        variation_seed: image.request.variation_seed,
        ..GenerateRequest::default()
    };
    let mut first_step_at: Option<Duration> = None;
    let mut on_step = |ev: &StepEvent| -> Control {
        // the engine's clock runs from the start of the generation (text encoding included), so a
        // step's time is the difference between two steps' clocks
        if ev.step > 1 {
            queue.metrics.step_seconds.observe(ev.elapsed.saturating_sub(last_step_elapsed).as_secs_f64());
        }
        last_step_elapsed = ev.elapsed;
        if let Some(limit) = queue.limits.job_timeout {
            if started.elapsed() > limit {
                job.stop(format!(
                    "The job ran longer than this server's limit of {} s per job and was stopped. Try fewer steps or a smaller size.",
                    limit.as_secs()
                ));
            }
        }
        if job.cancelled() {
            return Control::Cancel;
        }
        let (step, total) = (ev.step.max(1) as u64, ev.total as u64);
        // time per step, measured from the end of the first step once there are two
        let per_step = match first_step_at {
            Some(t0) if step > 1 => (ev.elapsed.saturating_sub(t0)) / (step as u32 - 1),
            _ => ev.elapsed / step as u32,
        };
        if step == 1 {
            first_step_at = Some(ev.elapsed);
        }
        let eta = per_step * total.saturating_sub(step) as u32;
        let _ = posts.send(Post::Step {
            job_id: job.id.clone(),
            step: ev.step as u32,
            total: ev.total as u32,
            elapsed_ms: ms(ev.elapsed),
            eta_ms: ms(eta),
            preview: ev.preview.cloned(),
        });
        if job.cancelled() {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let out = match generator.generate(&req, &image.request.loras, &mut on_step) {
        Ok(out) => out,
        Err(engine::Error::Cancelled) => return Err(job.cancelled_event()),
        Err(engine::Error::InvalidRequest(m)) => return Err(JobEvent::Error { job_id, reason: m }),
        Err(e) => {
            eprintln!("[web] job {job_id} failed: {e}");
            let text = e.to_string();
            let reason = if text.contains("OUT_OF_MEMORY") || text.contains("out of memory") {
                format!("The GPU ran out of memory for this job (try a smaller size); other jobs go on. ({text})")
            } else {
                format!("Generation failed: {text}")
            };
            return Err(JobEvent::Error { job_id, reason });
        }
    };
    Ok(Generated { out, strength, queued, model: generator.model_name(), tiny: generator.is_tiny() })
}

/// PNG-encodes and stores a finished generation; returns the job's final event.
fn store_result(store: &ImageStore, sink: &ResultSink, job: &Job, generated: Generated) -> JobEvent {
    let job_id = job.id.clone();
    let Some(image) = job.image() else {
        return JobEvent::Error { job_id, reason: "An enhancement reached the image store.".into() };
    };
    let Generated { out, strength, queued, model, tiny } = generated;
    let Some(img) = out.images.first() else {
        return JobEvent::Error { job_id, reason: "The model returned no image.".into() };
    };
    let seed = out.seeds.first().copied().unwrap_or(image.seed);
    let variation_seed = image.request.variation_seed.unwrap_or(seed);
    let params = engine::png_meta::Parameters {
        prompt: image.full_prompt.clone(),
        negative_prompt: image.request.negative_prompt.clone(),
        steps: image.request.steps as usize,
        seed,
        width: img.width(),
        height: img.height(),
        model: model.clone(),
        strength,
        guidance_scale: 0.0,
        loras: image
            .request
            .loras
            .iter()
            .map(|l| engine::png_meta::LoraUse { name: l.name.clone(), scale: l.scale, sha256: l.sha256.clone().unwrap_or_default() })
            .collect(),
        variation: Some((variation_seed, image.request.variation)),
    };
    let png = match engine::png_meta::encode_png(img, &params) {
        Ok(p) => p,
        Err(e) => return JobEvent::Error { job_id, reason: format!("Encoding the PNG failed: {e}") },
    };
    let image_id = new_id();
    let t = &out.timings;
    let result = JobResult {
        image_url: format!("/images/{image_id}.png"),
        share_url: format!("/share/{image_id}"),
        image_id,
        prompt: image.request.prompt.trim().to_string(),
        style: image.request.style,
        seed,
        steps: image.request.steps,
        width: img.width(),
        height: img.height(),
        strength,
        model,
        tiny_model: tiny,
        timings: TimingsMs {
            queued_ms: ms(queued),
            text_encoding_ms: ms(t.text_encoding),
            vae_encode_ms: ms(t.vae_encode),
            denoising_ms: ms(t.denoising),
            vae_decode_ms: ms(t.vae_decode),
            total_ms: ms(t.total),
        },
        prompt_truncated: out.prompt_truncated.is_some(),
        created_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        negative_prompt: image.request.negative_prompt.clone(),
        source: job.source,
        loras: image.request.loras.clone(),
        variation: image.request.variation,
        variation_seed: (image.request.variation > 0.0).then_some(variation_seed),
        written_prompt: image.request.written_prompt.clone(),
    };
    match sink {
        ResultSink::Store { history } => save_result(store, history, job_id, &png, result),
        ResultSink::Forward(forward) => forward(job, png, result),
    }
}

/// Writes a finished job's PNG and metadata into the data folder and its history; the job's final
/// event.
pub fn save_result(store: &ImageStore, history: &History, job_id: String, png: &[u8], result: JobResult) -> JobEvent {
    if let Err(e) = store.save_image(png, &result) {
        return JobEvent::Error { job_id, reason: e.reason };
    }
    // The image is stored and shareable either way; a history failure is logged, not fatal.
    if let Err(e) = history.add(&result, png) {
        eprintln!("[web] job {job_id}: adding it to the history failed: {}", e.reason);
    }
    JobEvent::Done { job_id, result }
}

/// Runs one enhancement on the worker, publishing its text as it grows; the job's final event.
fn run_enhancement(queue: &JobQueue, generator: &dyn Generator, job: &Job, req: &EnhanceRequest) -> JobEvent {
    let job_id = job.id.clone();
    let queued = job.submitted.elapsed();
    if job.cancelled() {
        return job.cancelled_event();
    }
    let started = Instant::now();
    queue.publish(JobEvent::EnhanceStarted { job_id: job_id.clone() });
    // the deltas sent, so that the end can send what the engine held back (an incomplete
    // character at the end of the text so far): the deltas always add up to the final text
    let mut shown = String::new();
    let mut on_event = |ev: &EnhanceEvent| -> Control {
        if let Some(limit) = queue.limits.job_timeout {
            if started.elapsed() > limit {
                job.stop(format!("The enhancement ran longer than this server's limit of {} s per job and was stopped.", limit.as_secs()));
            }
        }
        if job.cancelled() {
            return Control::Cancel;
        }
        let delta = printable(ev.delta);
        if !delta.is_empty() {
            shown.push_str(&delta);
            queue.publish(JobEvent::EnhanceText { job_id: job_id.clone(), delta, tokens: ev.new_tokens });
        }
        Control::Continue
    };
    let outcome = generator.enhance(req, &mut on_event);
    match outcome {
        Ok(out) => {
            let text = printable(&out.text);
            if let Some(rest) = text.strip_prefix(shown.as_str()).filter(|r| !r.is_empty()) {
                queue.publish(JobEvent::EnhanceText { job_id: job_id.clone(), delta: rest.to_string(), tokens: out.token_ids.len() });
            }
            JobEvent::EnhanceDone {
                job_id: job_id.clone(),
                result: EnhanceResult {
                    truncation_note: out.truncation_note(),
                    text,
                    tokens: out.token_ids.len(),
                    prompt_tokens: out.prompt_tokens,
                    finish_reason: match out.finish {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    }
                    .into(),
                    seed: req.seed,
                    model: generator.model_name(),
                    tiny_model: generator.has_random_weights(),
                    queued_ms: ms(queued),
                    first_token_ms: ms(out.first_token),
                    total_ms: ms(out.total),
                },
            }
        }
        Err(engine::Error::Cancelled) => job.cancelled_event(),
        Err(engine::Error::InvalidRequest(m)) => JobEvent::Error { job_id, reason: m },
        Err(e) => {
            eprintln!("[web] enhancement {job_id} failed: {e}");
            JobEvent::Error { job_id, reason: format!("The enhancement failed: {e}") }
        }
    }
}

/// `text` without control characters but line breaks and tabs: the text goes into a prompt box
/// and a prompt, which refuse NUL (a model with random weights writes any byte).
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control() || *c == '\n' || *c == '\t').collect()
}
