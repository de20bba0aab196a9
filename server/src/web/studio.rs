//! The studio backend: validates requests, feeds the queue, answers the server functions.

use app::backend::Backend;
use app::types::{is_valid_id, JobKind, JobRequest, JobResult, JobTicket, ServerInfo, UploadInfo};
use app::StudioError;
use engine::pipeline::GenerateRequest;
use std::sync::Arc;

use super::queue::{spawn_worker, Generator, Job, JobQueue};
use super::store::{random_seed, ImageStore};

pub struct Studio {
    pub queue: Arc<JobQueue>,
    pub store: Arc<ImageStore>,
    info: ServerInfo,
    workers: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Studio {
    /// Starts one worker per `(device label, generator)`.
    pub fn start(
        generators: Vec<(String, Arc<dyn Generator>)>,
        store: Arc<ImageStore>,
        queue_capacity: usize,
    ) -> Arc<Studio> {
        let queue = JobQueue::new(queue_capacity);
        let first = &generators.first().expect("at least one device").1;
        let info = ServerInfo {
            model: first.model_name(),
            tiny_model: first.is_tiny(),
            random_weights: first.has_random_weights(),
            device: generators.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>().join(", "),
            queue_capacity: queue.capacity(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let workers = generators
            .into_iter()
            .enumerate()
            .map(|(i, (_, g))| spawn_worker(format!("zimage-worker-{i}"), queue.clone(), g, store.clone()))
            .collect();
        Arc::new(Studio { queue, store, info, workers: std::sync::Mutex::new(workers) })
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
        self.info.clone()
    }

    fn submit(&self, req: JobRequest) -> Result<JobTicket, StudioError> {
        req.validate()?;
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
        let job = Job::new(req, seed, width, height);
        let job_id = job.id.clone();
        let position = self.queue.submit(job)?;
        Ok(JobTicket { job_id, position, seed, width, height })
    }

    fn cancel(&self, job_id: &str) -> Result<(), StudioError> {
        if !is_valid_id(job_id) {
            return Err(StudioError::invalid("That is not a job id."));
        }
        self.queue.cancel(job_id)
    }

    fn image(&self, image_id: &str) -> Result<JobResult, StudioError> {
        self.store.load_meta(image_id)
    }

    fn store_upload(&self, bytes: Vec<u8>, _content_type: Option<String>) -> Result<UploadInfo, StudioError> {
        // the bytes decide the type (a browser may send a wrong or missing content type)
        self.store.save_upload(&bytes)
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
