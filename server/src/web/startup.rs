//! The server's way from start to ready: downloading the model, loading it, the GPU driver
//! compiling kernels, warming up; or failing with a reason. `/readyz` and the page read the phase
//! here (with a sentence for people); the terminal gets progress lines. Everything that needs no
//! model (the page, stored images, share pages, history) is served meanwhile.

use app::types::{fmt_bytes, DownloadStatus, ServerState};
use std::sync::Mutex;

/// Where the start-up is.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    Downloading { model: String, status: DownloadStatus },
    Loading { device: String },
    CompilingKernels { device: String },
    WarmingUp { device: String },
    Ready,
    Failed { reason: String },
}

impl Phase {
    pub fn state(&self) -> ServerState {
        match self {
            Phase::Downloading { .. } => ServerState::Downloading,
            Phase::Loading { .. } => ServerState::Loading,
            Phase::CompilingKernels { .. } => ServerState::CompilingKernels,
            Phase::WarmingUp { .. } => ServerState::WarmingUp,
            Phase::Ready => ServerState::Ready,
            Phase::Failed { .. } => ServerState::Failed,
        }
    }

    /// The phase in a sentence.
    pub fn message(&self) -> String {
        match self {
            Phase::Downloading { model, status } if status.bytes_total == 0 => format!("Downloading {model}: listing its files…"),
            Phase::Downloading { model, status } => format!("Downloading {model}: {}.", status.summary()),
            Phase::Loading { device } => format!("Loading the model on {device}…"),
            Phase::CompilingKernels { device } => {
                format!("The GPU driver is compiling the kernels for {device} (once per machine)…")
            }
            Phase::WarmingUp { device } => format!("Warming up on {device} (one small image)…"),
            Phase::Ready => "Ready.".into(),
            Phase::Failed { reason } => format!("The model could not be loaded: {reason}"),
        }
    }

    pub fn download(&self) -> Option<DownloadStatus> {
        match self {
            Phase::Downloading { status, .. } => Some(status.clone()),
            _ => None,
        }
    }
}

/// The current phase, shared by the loading thread and the request handlers.
pub struct Startup {
    phase: Mutex<Phase>,
}

impl Startup {
    pub fn new(phase: Phase) -> Startup {
        Startup { phase: Mutex::new(phase) }
    }

    pub fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    pub fn get(&self) -> Phase {
        self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_ready(&self) -> bool {
        matches!(*self.phase.lock().unwrap_or_else(|p| p.into_inner()), Phase::Ready)
    }
}

/// The engine's download progress in the shape `/readyz` shows.
pub fn download_status(p: &engine::hub::DownloadProgress) -> DownloadStatus {
    DownloadStatus {
        file: p.file.clone(),
        files_done: p.files_done as u32,
        files_total: p.files_total as u32,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_per_sec: p.bytes_per_sec as u64,
        eta_secs: p.eta_secs(),
    }
}

/// Prints a progress line when the file changes and at every 5% (readable in a terminal and in a
/// log file alike); `last` remembers what was printed.
pub fn print_download(model: &str, s: &DownloadStatus, last: &mut Option<(String, u64)>) {
    let step = (s.bytes_total / 20).max(1);
    let key = (s.file.clone(), s.bytes_done / step);
    if last.as_ref() == Some(&key) {
        return;
    }
    *last = Some(key);
    eprintln!(
        "downloading {model}: {} ({:.0}%) [{} of {} files; {}]",
        s.summary(),
        100.0 * s.bytes_done as f64 / s.bytes_total.max(1) as f64,
        s.files_done,
        s.files_total,
        if s.file.is_empty() { "-" } else { s.file.as_str() }
    );
}

/// Downloads a hub model into the cache when it is not there (no-op otherwise), with progress
/// lines and `on_status` for each update. Used by `serve`, `worker` and `generate` before loading.
pub fn download_if_missing(
    source: &engine::loader::ModelSource,
    on_status: &dyn Fn(&DownloadStatus),
) -> engine::Result<()> {
    let engine::loader::ModelSource::Hub(id) = source else { return Ok(()) };
    if !engine::loader::needs_download(id) {
        return Ok(());
    }
    let settings = engine::hub::HubSettings::from_env();
    eprintln!(
        "{id} is not in the Hugging Face cache at {}: downloading it from {} (resumable: an interrupted \
         download continues where it stopped)",
        settings.cache.display(),
        settings.endpoint
    );
    let mut last = None;
    let started = std::time::Instant::now();
    let mut total = 0;
    engine::loader::resolve_hub_model_with(&settings, id, &mut |p| {
        let s = download_status(p);
        total = s.bytes_total;
        print_download(id, &s, &mut last);
        on_status(&s);
    })?;
    eprintln!("downloaded {id} ({}) in {:.0?}", fmt_bytes(total), started.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_reads_as_a_sentence() {
        let status = DownloadStatus {
            file: "transformer/diffusion_pytorch_model-00001-of-00003.safetensors".into(),
            files_done: 3,
            files_total: 17,
            bytes_done: 3_200_000_000,
            bytes_total: 32_800_000_000,
            bytes_per_sec: 85_000_000,
            eta_secs: Some(348),
        };
        let p = Phase::Downloading { model: "Tongyi-MAI/Z-Image-Turbo".into(), status };
        assert_eq!(p.message(), "Downloading Tongyi-MAI/Z-Image-Turbo: 3.2 GB of 32.8 GB at 85 MB/s, about 6 min left.");
        assert_eq!(p.state(), ServerState::Downloading);
        assert!(Phase::Failed { reason: "disk full".into() }.message().contains("disk full"));
        let s = Startup::new(Phase::Loading { device: "CPU".into() });
        assert!(!s.is_ready());
        s.set(Phase::Ready);
        assert!(s.is_ready());
    }
}
