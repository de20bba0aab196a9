//! The job queue: FIFO, bounded, one worker thread per device. Every state change is published as
//! a [`JobEvent`] on a broadcast channel (the websocket sessions filter it by job id) and kept as
//! the job's latest snapshot, so a client that (re)connects gets the current state at once.

use app::types::{JobEvent, JobKind, JobRequest, JobResult, JobSource, TimingsMs};
use app::{ErrorKind, StudioError};
use engine::pipeline::{Control, GenerateOutput, GenerateRequest, Pipeline, StepEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;

use super::history::History;
use super::store::{new_id, ImageStore};

/// Finished jobs' last events are kept this long for reconnecting clients.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);
const KEEP_FINISHED_MAX: usize = 2000;
/// Longest side of the live preview sent to browsers.
const PREVIEW_MAX_SIDE: u32 = 256;

/// What a worker runs; the engine's [`Pipeline`] in production, a fake in tests.
pub trait Generator: Send + Sync + 'static {
    fn model_name(&self) -> String;
    fn is_tiny(&self) -> bool;
    /// Random weights (the tiny model, or the full-size architecture for benchmarks).
    fn has_random_weights(&self) -> bool {
        self.is_tiny()
    }
    fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> engine::Result<GenerateOutput>;
}

impl Generator for Pipeline {
    fn model_name(&self) -> String {
        Pipeline::model_name(self).to_string()
    }
    fn is_tiny(&self) -> bool {
        Pipeline::is_tiny(self)
    }
    fn has_random_weights(&self) -> bool {
        Pipeline::has_random_weights(self)
    }
    fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> engine::Result<GenerateOutput> {
        Pipeline::generate(self, req, on_step)
    }
}

/// A validated job.
pub struct Job {
    pub id: String,
    /// Which door the request came in by (kept in the history).
    pub source: JobSource,
    pub request: JobRequest,
    /// Prompt with the style suffix.
    pub full_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub submitted: Instant,
    cancel: AtomicBool,
}

impl Job {
    pub fn new(request: JobRequest, seed: u64, width: u32, height: u32, source: JobSource) -> Job {
        Job {
            id: new_id(),
            source,
            full_prompt: request.full_prompt(),
            request,
            seed,
            width,
            height,
            submitted: Instant::now(),
            cancel: AtomicBool::new(false),
        }
    }
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

struct Snapshot {
    event: JobEvent,
    finished: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    waiting: VecDeque<Arc<Job>>,
    running: HashMap<String, Arc<Job>>,
    snapshots: HashMap<String, Snapshot>,
    shutdown: bool,
}

pub struct JobQueue {
    inner: Mutex<Inner>,
    cv: Condvar,
    events: broadcast::Sender<JobEvent>,
    capacity: usize,
}

impl JobQueue {
    /// `capacity`: how many jobs may wait (running ones not counted).
    pub fn new(capacity: usize) -> Arc<JobQueue> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(JobQueue {
            inner: Mutex::new(Inner::default()),
            cv: Condvar::new(),
            events,
            capacity: capacity.max(1),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
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

    pub fn waiting_len(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Records and broadcasts an event (under the lock, so snapshots and broadcasts agree).
    fn publish_locked(&self, inner: &mut Inner, ev: JobEvent) {
        let finished = ev.is_terminal().then(Instant::now);
        inner.snapshots.insert(ev.job_id().to_string(), Snapshot { event: ev.clone(), finished });
        let _ = self.events.send(ev);
    }

    pub fn publish(&self, ev: JobEvent) {
        let mut inner = self.lock();
        self.publish_locked(&mut inner, ev);
    }

    /// Re-announces everyone's place in line.
    fn publish_positions(&self, inner: &mut Inner) {
        let updates: Vec<JobEvent> = inner
            .waiting
            .iter()
            .enumerate()
            .map(|(i, j)| JobEvent::Queued { job_id: j.id.clone(), position: i + 1 })
            .collect();
        for ev in updates {
            self.publish_locked(inner, ev);
        }
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

    /// Enqueues a job; returns its 1-based position. Refuses when `capacity` jobs already wait.
    pub fn submit(&self, job: Job) -> Result<usize, StudioError> {
        let mut inner = self.lock();
        if inner.shutdown {
            return Err(StudioError::internal("The server is shutting down."));
        }
        if inner.waiting.len() >= self.capacity {
            return Err(StudioError::new(
                ErrorKind::QueueFull,
                format!(
                    "The queue is full ({} jobs waiting). Please try again in a minute.",
                    inner.waiting.len()
                ),
            ));
        }
        Self::prune(&mut inner);
        let job = Arc::new(job);
        inner.waiting.push_back(job.clone());
        let position = inner.waiting.len();
        self.publish_locked(&mut inner, JobEvent::Queued { job_id: job.id.clone(), position });
        drop(inner);
        self.cv.notify_one();
        Ok(position)
    }

    /// Cancels a waiting job at once; a running one stops at its next step.
    /// Cancelling a finished job is a no-op.
    pub fn cancel(&self, job_id: &str) -> Result<(), StudioError> {
        let mut inner = self.lock();
        if let Some(i) = inner.waiting.iter().position(|j| j.id == job_id) {
            let job = inner.waiting.remove(i).expect("index from position");
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

    /// Blocks until a job is waiting (FIFO) and marks it running; `None` after [`shutdown`].
    pub fn next_job(&self) -> Option<Arc<Job>> {
        let mut inner = self.lock();
        loop {
            if inner.shutdown {
                return None;
            }
            if let Some(job) = inner.waiting.pop_front() {
                inner.running.insert(job.id.clone(), job.clone());
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
        self.publish_locked(&mut inner, ev);
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.cv.notify_all();
    }
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

/// Starts one worker thread running jobs from `queue` on `generator` (one per device), and its
/// publisher thread.
pub fn spawn_worker(
    name: String,
    queue: Arc<JobQueue>,
    generator: Arc<dyn Generator>,
    store: Arc<ImageStore>,
    history: Arc<History>,
) -> std::thread::JoinHandle<()> {
    let (posts, inbox) = std::sync::mpsc::channel::<Post>();
    let publisher_queue = queue.clone();
    let publisher_store = store.clone();
    std::thread::Builder::new()
        .name(format!("{name}-publish"))
        .spawn(move || {
            for post in inbox {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| publish(&publisher_queue, &publisher_store, &history, post)));
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
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_job(&queue, &*generator, &store, &job, &posts)
                }));
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
fn publish(queue: &JobQueue, store: &ImageStore, history: &History, post: Post) -> Result<(), Option<String>> {
    match post {
        Post::Step { job_id, step, total, elapsed_ms, eta_ms, preview } => {
            let preview = preview.as_ref().and_then(preview_data_url);
            queue.publish(JobEvent::Step { job_id, step, total, elapsed_ms, eta_ms, preview });
        }
        Post::Finished { job, outcome } => {
            let job_id = job.id.clone();
            let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match outcome {
                Ok(generated) => store_result(store, history, &job, generated),
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
        return Err(JobEvent::Cancelled { job_id });
    }
    queue.publish(JobEvent::Started {
        job_id: job_id.clone(),
        width: job.width,
        height: job.height,
        steps: job.request.steps,
        seed: job.seed,
    });
    let (init_image, strength) = match &job.request.kind {
        JobKind::Generate { .. } => (None, None),
        JobKind::Transform { upload_id, strength } => match store.load_upload(upload_id) {
            Ok(img) => (Some(img), Some(*strength)),
            Err(e) => return Err(JobEvent::Error { job_id, reason: e.reason }),
        },
    };
    let req = GenerateRequest {
        prompt: job.full_prompt.clone(),
        negative_prompt: job.request.negative_prompt.clone(),
        width: job.width as usize,
        height: job.height as usize,
        steps: job.request.steps as usize,
        seed: job.seed,
        n: 1,
        init_image,
        strength: strength.unwrap_or(1.0),
        preview: true,
        ..GenerateRequest::default()
    };
    let mut first_step_at: Option<Duration> = None;
    let mut on_step = |ev: &StepEvent| -> Control {
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
    let out = match generator.generate(&req, &mut on_step) {
        Ok(out) => out,
        Err(engine::Error::Cancelled) => return Err(JobEvent::Cancelled { job_id }),
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
fn store_result(store: &ImageStore, history: &History, job: &Job, generated: Generated) -> JobEvent {
    let job_id = job.id.clone();
    let Generated { out, strength, queued, model, tiny } = generated;
    let Some(img) = out.images.first() else {
        return JobEvent::Error { job_id, reason: "The model returned no image.".into() };
    };
    let seed = out.seeds.first().copied().unwrap_or(job.seed);
    let params = engine::png_meta::Parameters {
        prompt: job.full_prompt.clone(),
        negative_prompt: job.request.negative_prompt.clone(),
        steps: job.request.steps as usize,
        seed,
        width: img.width(),
        height: img.height(),
        model: model.clone(),
        strength,
        guidance_scale: 0.0,
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
        prompt: job.request.prompt.trim().to_string(),
        style: job.request.style,
        seed,
        steps: job.request.steps,
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
        negative_prompt: job.request.negative_prompt.clone(),
        source: job.source,
    };
    if let Err(e) = store.save_image(&png, &result) {
        return JobEvent::Error { job_id, reason: e.reason };
    }
    // The image is stored and shareable either way; a history failure is logged, not fatal.
    if let Err(e) = history.add(&result, &png) {
        eprintln!("[web] job {job_id}: adding it to the history failed: {}", e.reason);
    }
    JobEvent::Done { job_id, result }
}
