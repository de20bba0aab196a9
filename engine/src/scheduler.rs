//! Flow-matching Euler schedule as diffusers' `FlowMatchEulerDiscreteScheduler` computes it for
//! Z-Image: sigmas = shift(linspace(1, 1/N, N)) in f32 then a final 0, timesteps = 1000 * sigma,
//! and the image-to-image start step from the strength.

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// Largest step count a request may ask for (the distilled model wants 8; 100 is already absurd).
pub const MAX_STEPS: usize = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// N + 1 values, the last 0.
    pub sigmas: Vec<f32>,
    /// N values, 1000 * sigma.
    pub timesteps: Vec<f32>,
}

impl Schedule {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if steps == 0 || steps > MAX_STEPS {
            return Err(Error::InvalidRequest(format!("steps must be between 1 and {MAX_STEPS}, got {steps}")));
        }
        if cfg.use_dynamic_shifting {
            return Err(Error::InvalidRequest("use_dynamic_shifting schedulers are not supported".into()));
        }
        let shift = cfg.shift as f32;
        let mut sigmas: Vec<f32> = linspace_f32(1.0, (1.0 / steps as f64) as f32, steps)
            .into_iter()
            .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        let train = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|s| s * train).collect();
        sigmas.push(0.0);
        Ok(Self { sigmas, timesteps })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The time the transformer is given at step i: (1000 - t) / 1000, in f32 as the pipeline does.
    pub fn model_time(&self, i: usize) -> f32 {
        (1000.0 - self.timesteps[i]) / 1000.0
    }
}

/// torch.linspace for float32: a float32 step, the first half counted from the start and the
/// second half from the end.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// First step to run for image-to-image: int(max(N - min(N * strength, N), 0)).
/// Errors when the strength is outside (0, 1] or leaves no step to run.
pub fn img2img_start_step(steps: usize, strength: f32) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidRequest(format!("strength must be in (0, 1], got {strength}")));
    }
    let n = steps as f64;
    let init = (n * strength as f64).min(n);
    let start = (n - init).max(0.0) as usize;
    if start >= steps {
        let min_strength = 1.0 / steps as f64;
        return Err(Error::InvalidRequest(format!(
            "strength {strength} with {steps} steps leaves no step to run; use strength >= {min_strength:.3} or more steps"
        )));
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_steps_match_the_reference_sheet() {
        let s = Schedule::new(&SchedulerConfig::default(), 8).unwrap();
        let want = [1.0, 0.95455, 0.9, 0.83333, 0.75, 0.64286, 0.5, 0.3, 0.0];
        for (a, b) in s.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{:?}", s.sigmas);
        }
    }

    #[test]
    fn strength_to_start_step() {
        assert_eq!(img2img_start_step(8, 0.6).unwrap(), 3);
        assert_eq!(img2img_start_step(8, 0.3).unwrap(), 5);
        assert_eq!(img2img_start_step(8, 1.0).unwrap(), 0);
        assert_eq!(img2img_start_step(8, 0.1).unwrap(), 7, "any strength > 0 leaves one step");
        assert!(img2img_start_step(8, 1e-20).is_err(), "8 - 8e-20 rounds to 8: no step left");
        assert!(img2img_start_step(8, 0.0).is_err());
        assert!(img2img_start_step(8, 1.5).is_err());
        assert!(img2img_start_step(8, f32::NAN).is_err());
    }

    #[test]
    fn bad_step_counts_are_refused() {
        assert!(Schedule::new(&SchedulerConfig::default(), 0).is_err());
        assert!(Schedule::new(&SchedulerConfig::default(), MAX_STEPS + 1).is_err());
    }
}
