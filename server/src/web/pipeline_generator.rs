//! The engine's [`Pipeline`] as a worker's [`Generator`], with the job's LoRA set merged into the
//! weights before it runs. The pipeline sits behind a mutex only its worker takes (one worker per
//! device); the base weights for reverting are the `LoraPatcher`'s transformer snapshot, which
//! shares storage with the loaded model: a LoRA set costs device memory only for the layers it
//! patches (their merged copies), and changing or dropping the set never reads the model again.

use app::types::LoraChoice;
use candle_core::Device;
use engine::lora::{LoraFile, LoraLibrary, LoraPatcher};
use engine::pipeline::{Control, GenerateOutput, GenerateRequest, Pipeline, StepEvent};
use engine::config::TransformerConfig;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::queue::Generator;

struct Patched {
    pipe: Pipeline,
    patcher: LoraPatcher,
}

pub struct PipelineGenerator {
    state: Mutex<Patched>,
    loras: Arc<LoraLibrary>,
    // read without the lock (the status pages ask while a job runs)
    model_name: String,
    tiny: bool,
    random_weights: bool,
    device: Device,
    config: TransformerConfig,
}

impl PipelineGenerator {
    pub fn new(pipe: Pipeline, loras: Arc<LoraLibrary>) -> PipelineGenerator {
        PipelineGenerator {
            model_name: pipe.model_name().to_string(),
            tiny: pipe.is_tiny(),
            random_weights: pipe.has_random_weights(),
            device: pipe.device().clone(),
            config: pipe.transformer().config().clone(),
            state: Mutex::new(Patched { pipe, patcher: LoraPatcher::new() }),
            loras,
        }
    }

    /// Runs `f` on the pipeline (waiting for a running job).
    #[cfg(test)]
    pub fn with_pipeline<R>(&self, f: impl FnOnce(&Pipeline) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()).pipe)
    }

    /// The job's LoRA files from this worker's folder, each checked against the hash the job
    /// was accepted with.
    fn files(&self, loras: &[LoraChoice]) -> engine::Result<Vec<(Arc<LoraFile>, f32)>> {
        loras
            .iter()
            .map(|choice| {
                let file = self.loras.load(&choice.name).map_err(|e| {
                    engine::Error::InvalidRequest(match e {
                        engine::Error::Lora { reason, .. } if reason.starts_with("no LoRA named") => format!(
                            "LoRA `{}` is not in this worker's LoRA folder ({}); every worker needs the same files.",
                            choice.name,
                            self.loras.dir().display()
                        ),
                        other => format!("LoRA `{}` cannot be used: {other}", choice.name),
                    })
                })?;
                if let Some(want) = &choice.sha256 {
                    if *want != file.sha256 {
                        return Err(engine::Error::InvalidRequest(format!(
                            "LoRA `{}` in this worker's folder is not the file the job was accepted with (sha256 {} here, {} asked); put the same file in every worker's LoRA folder.",
                            choice.name,
                            &file.sha256[..12],
                            &want[..want.len().min(12)]
                        )));
                    }
                }
                Ok((file, choice.scale))
            })
            .collect()
    }
}

impl Generator for PipelineGenerator {
    fn model_name(&self) -> String {
        self.model_name.clone()
    }
    fn is_tiny(&self) -> bool {
        self.tiny
    }
    fn has_random_weights(&self) -> bool {
        self.random_weights
    }
    fn device_memory_used_bytes(&self) -> Option<f64> {
        engine::pipeline::device_memory_used_mib(&self.device).map(|mib| mib * 1024.0 * 1024.0)
    }
    fn check_lora(&self, file: &LoraFile) -> Result<(), String> {
        file.match_model(&self.config).map(|_| ()).map_err(|e| e.to_string())
    }
    fn generate(
        &self,
        req: &GenerateRequest,
        loras: &[LoraChoice],
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> engine::Result<GenerateOutput> {
        let files = self.files(loras)?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Patched { pipe, patcher } = &mut *state;
        let set: Vec<(&LoraFile, f32)> = files.iter().map(|(f, s)| (f.as_ref(), *s)).collect();
        let started = Instant::now();
        let report = patcher.set(pipe, &set).map_err(|e| match e {
            engine::Error::Lora { path, reason } => {
                engine::Error::InvalidRequest(format!("LoRA {} cannot be applied: {reason}", path.display()))
            }
            other => other,
        })?;
        if report.layers > 0 {
            eprintln!(
                "[lora] {} applied ({} layers) in {:.0?}",
                loras.iter().map(|l| l.prompt_tag()).collect::<Vec<_>>().join(" "),
                report.layers,
                started.elapsed()
            );
        }
        for w in &report.warnings {
            eprintln!("[lora] warning: {w}");
        }
        pipe.generate(req, on_step)
    }
    fn enhance(
        &self,
        req: &engine::enhancer::EnhanceRequest,
        on_event: &mut dyn FnMut(&engine::enhancer::EnhanceEvent) -> Control,
    ) -> engine::Result<engine::enhancer::EnhanceOutput> {
        // the text encoder's weights are not touched by LoRAs (they patch the transformer only)
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pipe.enhance(req, on_event)
    }
}
