//! A generator that only waits (`zimage worker --simulate-job-ms N`): for measuring the queue,
//! Redis and the front ends at a scale this machine has no GPUs for (docs/SCALE.md). It calls
//! back after every step like the engine (with a 256-px preview when asked, as the studio asks,
//! so the previews' JPEG encoding and transport are real) and returns a flat grey image of the
//! asked size, so the PNG encoding, the transport and the storing of results are real.

use engine::pipeline::{Control, GenerateOutput, GenerateRequest, StepEvent, Timings};
use std::time::{Duration, Instant};

use super::queue::Generator;

pub struct SimulatedGenerator {
    /// One job's time, spread evenly over its steps.
    pub job_time: Duration,
}

impl SimulatedGenerator {
    /// The device line the studio shows for it.
    pub fn label(&self) -> String {
        format!("a simulated device ({} ms per job)", self.job_time.as_millis())
    }
}

impl Generator for SimulatedGenerator {
    fn model_name(&self) -> String {
        "simulated".into()
    }
    fn is_tiny(&self) -> bool {
        true
    }
    fn generate(
        &self,
        req: &GenerateRequest,
        _loras: &[app::types::LoraChoice],
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> engine::Result<GenerateOutput> {
        req.validate()?;
        let t0 = Instant::now();
        let latents = candle_core::Tensor::zeros((1, 16, 1, 1), candle_core::DType::F32, &candle_core::Device::Cpu)
            .map_err(engine::Error::from)?;
        let steps = req.steps.max(1);
        // gradients with some texture, not a flat image: the JPEG is about a real preview's size
        let preview = req.preview.then(|| {
            image::RgbImage::from_fn(256, 256, |x, y| {
                let texture = ((x * 7 + y * 13) ^ (x * y)) % 24;
                image::Rgb([(x / 2 + texture) as u8, (y / 2 + texture) as u8, ((x + y) / 4 + texture) as u8])
            })
        });
        for step in 1..=steps {
            std::thread::sleep(self.job_time / steps as u32);
            let ev = StepEvent {
                image_index: 0,
                step,
                total: steps,
                sigma: 1.0 - step as f32 / steps as f32,
                elapsed: t0.elapsed(),
                denoised: &latents,
                latents: &latents,
                preview: preview.as_ref(),
            };
            if let Control::Cancel = on_step(&ev) {
                return Err(engine::Error::Cancelled);
            }
        }
        let image = image::RgbImage::from_pixel(req.width as u32, req.height as u32, image::Rgb([128, 128, 128]));
        let total = t0.elapsed();
        Ok(GenerateOutput {
            images: vec![image],
            seeds: vec![req.seed],
            timings: Timings { denoising: total, total, ..Timings::default() },
            prompt_truncated: None,
            latents,
        })
    }
}
