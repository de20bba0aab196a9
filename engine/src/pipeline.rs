//! The sampling loop: text-to-image and image-to-image as diffusers' `ZImagePipeline` /
//! `ZImageImg2ImgPipeline` compute them (f32 latents, negated model output, Euler steps on the
//! shifted flow-matching schedule, optional CFG with normalization and truncation), with per-step
//! callbacks carrying the denoised estimate and a preview, cancellation at every step, batches of
//! n images with seeds seed+i, and VAE slicing/tiling on decode.

use std::time::{Duration, Instant};
#[cfg(feature = "cuda")]
pub use crate::device::open_cuda;
pub use crate::device::{default_dtype, dense_copy_device, device_memory_breakdown, device_memory_used_mib, fp8_supported, reset_device_memory_highs, LoadOptions, Precision};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{SchedulerConfig, TextEncoderConfig, TransformerConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::ops::Quantization;
use crate::graph::GraphCache;
use crate::loader::{read_config, resolve_hub_model, ModelFiles, ModelSource};
use crate::scheduler::{img2img_start_step, Schedule, MAX_STEPS};
use crate::text_encoder::{encode_streamed, TextEncoder};
use crate::tokenizer::PromptTokenizer;
use crate::transformer::{Conditioning, ZImageTransformer};
use crate::vae::{AutoencoderKl, TilingOptions};
use crate::weights::{checked_var_builder, ensure_no_problems, lazy_checked_var_builder};

/// The model name of `Pipeline::random_full_size`.
pub const RANDOM_FULL_SIZE_NAME: &str = "random-full-size";

/// Pixel sizes must be multiples of this (VAE factor 8 x patch 2).
pub const SIZE_MULTIPLE: usize = 16;
pub const MIN_SIZE: usize = 16;
pub const MAX_SIZE: usize = 4096;
pub const MAX_BATCH: usize = 16;

/// One generation request. `init_image` switches to image-to-image.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub seed: u64,
    /// Number of images; image i uses seed + i.
    pub n: usize,
    /// 0 disables classifier-free guidance (Turbo's default).
    pub guidance_scale: f32,
    /// > 0 caps ||guided|| at this times ||positive|| (0 = off).
    pub cfg_normalization: f32,
    /// Guidance is dropped once the normalized time (1000 - t)/1000 exceeds this (1 = never).
    pub cfg_truncation: f32,
    pub init_image: Option<image::RgbImage>,
    /// Image-to-image strength in (0, 1].
    pub strength: f32,
    /// Starting noise (n, 16, H/8, W/8) f32, instead of drawing it from the seeds.
    pub noise: Option<Tensor>,
    /// Compute a preview image of the denoised estimate at every step.
    pub preview: bool,
    /// 0..=1: how far each image's text conditioning is moved by a perturbation drawn from its
    /// variation seed (`vary_conditioning`); 0 is the plain conditioning, bit for bit.
    pub variation: f32,
    /// The perturbation's seed for image 0 (image i: + i); `None`: the image's own seed, so that
    /// every seed gets its own variation (A1111's `subseed`, when given).
    pub variation_seed: Option<u64>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 1024,
            height: 1024,
            steps: 8,
            seed: 0,
            n: 1,
            guidance_scale: 0.0,
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
            init_image: None,
            strength: 0.6,
            noise: None,
            preview: false,
            variation: 0.0,
            variation_seed: None,
        }
    }
}

fn nearest_sizes(v: usize) -> String {
    let down = (v / SIZE_MULTIPLE * SIZE_MULTIPLE).max(MIN_SIZE);
    let up = v.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE;
    if down == up {
        format!("{down}")
    } else {
        format!("{down} or {up}")
    }
}

impl GenerateRequest {
    /// The seed of image `i`'s variation perturbation: `variation_seed` (or the seed) + i.
    pub fn variation_seed_of(&self, i: usize) -> u64 {
        self.variation_seed.unwrap_or(self.seed) + i as u64
    }

    /// Checks every parameter; the error says what is wrong and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v % SIZE_MULTIPLE != 0 {
                return bad(format!("{name} {v} is not a multiple of {SIZE_MULTIPLE}; the nearest valid values are {}", nearest_sizes(v)));
            }
            if !(MIN_SIZE..=MAX_SIZE).contains(&v) {
                return bad(format!("{name} {v} is outside {MIN_SIZE}..={MAX_SIZE}"));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return bad(format!("steps must be between 1 and {MAX_STEPS} (Turbo is made for 8), got {}", self.steps));
        }
        if self.n == 0 || self.n > MAX_BATCH {
            return bad(format!("n (images per request) must be between 1 and {MAX_BATCH}, got {}", self.n));
        }
        if self.seed.checked_add(self.n as u64 - 1).is_none() {
            return bad(format!("seed {} + {} images overflows u64", self.seed, self.n));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 || self.guidance_scale > 50.0 {
            return bad(format!("guidance scale must be in [0, 50], got {}", self.guidance_scale));
        }
        if !self.cfg_normalization.is_finite() || self.cfg_normalization < 0.0 {
            return bad(format!("cfg normalization must be >= 0, got {}", self.cfg_normalization));
        }
        if !self.cfg_truncation.is_finite() || self.cfg_truncation < 0.0 {
            return bad(format!("cfg truncation must be >= 0, got {}", self.cfg_truncation));
        }
        if let Some(img) = &self.init_image {
            if img.width() == 0 || img.height() == 0 {
                return bad("the input image is empty".into());
            }
            img2img_start_step(self.steps, self.strength)?;
        }
        if !self.variation.is_finite() || !(0.0..=1.0).contains(&self.variation) {
            return bad(format!("variation must be between 0 and 1, got {}", self.variation));
        }
        if let Some(noise) = &self.noise {
            let want = [self.n, 16, self.height / 8, self.width / 8];
            if noise.dims() != want && !(self.n == 1 && noise.dims() == &want[1..]) {
                return bad(format!("noise has shape {:?}, expected {:?}", noise.dims(), want));
            }
        }
        Ok(())
    }
}

/// Whether the loop goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// Reported after every denoising step.
pub struct StepEvent<'a> {
    /// Which image of the batch `preview` shows (always the first).
    pub image_index: usize,
    /// 1-based step among the steps this request runs.
    pub step: usize,
    pub total: usize,
    /// Sigma at the start of this step.
    pub sigma: f32,
    /// Time since the request started.
    pub elapsed: Duration,
    /// Denoised estimate x0 = x - sigma * v for every image, (n, 16, h, w) f32.
    pub denoised: &'a Tensor,
    /// The latents after this step, (n, 16, h, w) f32.
    pub latents: &'a Tensor,
    /// Latent-to-RGB preview of image 0's estimate, when requested.
    pub preview: Option<&'a image::RgbImage>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub text_encoding: Duration,
    pub vae_encode: Duration,
    pub denoising: Duration,
    pub vae_decode: Duration,
    pub total: Duration,
}

pub struct GenerateOutput {
    pub images: Vec<image::RgbImage>,
    pub seeds: Vec<u64>,
    pub timings: Timings,
    /// Token count of the prompt when it was truncated to 512 tokens.
    pub prompt_truncated: Option<usize>,
    /// Final latents (n, 16, h, w) f32, before the VAE.
    pub latents: Tensor,
}

/// Salt of the variation perturbation's generator: its draws differ from the starting noise's
/// for the same seed.
const VARIATION_SALT: u64 = 0x7A5E_ED0F_A51A_7100;

/// The text conditioning (tokens, hidden) moved by `variation` times a Gaussian perturbation
/// from `seed`, scaled per token to the token's RMS (its norm grows by about
/// sqrt(1 + variation^2)). Why the conditioning and not the starting noise: the noise already
/// differs between seeds, and Turbo's few distilled steps map different noises to near-identical
/// compositions; moving the conditioning moves what the steps converge to. At 0 it returns
/// `caption` itself, bit for bit.
pub fn vary_conditioning(caption: &Tensor, variation: f32, seed: u64) -> Result<Tensor> {
    if variation == 0.0 {
        return Ok(caption.clone());
    }
    let dims = caption.dims().to_vec();
    let count: usize = dims.iter().product();
    let noise = Tensor::from_vec(crate::rng::normal_vec(seed ^ VARIATION_SALT, count), dims.as_slice(), &Device::Cpu)?
        .to_device(caption.device())?;
    let c = caption.to_dtype(DType::F32)?;
    let rms = c.sqr()?.mean_keepdim(candle_core::D::Minus1)?.sqrt()?;
    let moved = (&c + noise.broadcast_mul(&rms)?.affine(variation as f64, 0.0)?)?;
    Ok(moved.to_dtype(caption.dtype())?)
}

/// A device fault a test makes the next generations fail with (`Pipeline::inject_fault`), at
/// their first denoising step, as the real fault would surface from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// As CUDA reports an allocation failure.
    OutOfMemory,
    /// As a device error (e.g. an illegal address, a lost device) surfaces from a kernel launch.
    DeviceError,
    /// A panic inside the generation (a bug).
    Panic,
}

/// What fixes the shapes of one denoiser call: the conditioning's (batch, padded caption length,
/// latent f, h, w), the latent channels and the attention kernel.
type DenoiseKey = ([usize; 5], usize, crate::ops::AttentionKernel);

type TextEncoderLoader = Box<dyn Fn() -> Result<TextEncoder> + Send + Sync>;
type StreamedEncoder = Box<dyn Fn(&[u32]) -> Result<Tensor> + Send + Sync>;

enum TextEncoderSlot {
    Resident(TextEncoder),
    /// Not kept in memory: a prompt is encoded one layer at a time from the weights (`encode`, so
    /// the device never holds more than one layer of it); the enhancer loads it whole for its call
    /// (`load`). `hidden` is the configured width, checked against the transformer once.
    OnDemand { load: TextEncoderLoader, encode: StreamedEncoder, hidden: usize },
}

/// A loaded model, ready to generate. Holds no per-request state, so one instance can serve
/// requests one after another from any thread.
pub struct Pipeline {
    transformer: ZImageTransformer,
    text_encoder: TextEncoderSlot,
    tokenizer: PromptTokenizer,
    vae: AutoencoderKl,
    scheduler: SchedulerConfig,
    tiling: TilingOptions,
    device: Device,
    dtype: DType,
    model_name: String,
    is_tiny: bool,
    denoise_graphs: GraphCache<DenoiseKey>,
    /// Device memory after each loading stage.
    load_memory: crate::device::MemoryTrace,
    /// Test hook: faults to raise in the next generations (fault, how many more).
    injected: std::sync::Mutex<Option<(InjectedFault, usize)>>,
}

impl Pipeline {
    /// Loads a model in the device's default dtype.
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        Self::load_with_options(source, device, default_dtype(device), LoadOptions::default())
    }

    pub fn load_with_options(source: &ModelSource, device: &Device, dtype: DType, opts: LoadOptions) -> Result<Self> {
        match source {
            ModelSource::Tiny => Self::tiny_with_options(device, dtype, opts),
            ModelSource::Dir(dir) => Self::from_files(
                &ModelFiles::from_dir(dir)?,
                device,
                dtype,
                &dir.display().to_string(),
                false,
                opts,
            ),
            ModelSource::Hub(id) => Self::from_files(&resolve_hub_model(id)?, device, dtype, id, false, opts),
            ModelSource::RandomFullSize => Self::random_full_size(device, dtype, opts),
        }
    }

    /// Builds every component from resolved files; all weight problems of a component are named.
    /// The transformer is loaded (and quantized) first so that peak memory stays near the final
    /// footprint.
    pub fn from_files(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        name: &str,
        is_tiny: bool,
        opts: LoadOptions,
    ) -> Result<Self> {
        let t_cfg: TransformerConfig = read_config(&files.transformer.config)?;
        let te_cfg: TextEncoderConfig = read_config(&files.text_encoder.config)?;
        let vae_cfg: VaeConfig = read_config(&files.vae.config)?;
        let sched: SchedulerConfig = read_config(&files.scheduler_config)?;
        let tokenizer = PromptTokenizer::from_file(&files.tokenizer)?;

        // Each component's files stream into the page cache while the one before loads.
        crate::weights::prefetch(files.transformer.weights.clone());
        if !opts.free_text_encoder {
            crate::weights::prefetch(files.text_encoder.weights.clone());
        }
        crate::weights::prefetch(files.vae.weights.clone());
        // Quantized: read block by block and quantize each as it arrives (the device never holds
        // the whole dense model); dense: everything at once with the pool of threads.
        let quantizing = opts.quantization != Quantization::None;
        let (vb, problems) = if quantizing {
            lazy_checked_var_builder(&files.transformer.weights, dtype, device)?
        } else {
            checked_var_builder(&files.transformer.weights, dtype, device)?
        };
        let mut memory = crate::device::MemoryTrace::default();
        memory.mark(device, "start");
        let transformer = ZImageTransformer::new_quantized(&t_cfg, vb, opts.quantization, opts.dense_copy_on(device).as_ref());
        ensure_no_problems("transformer", &problems)?;
        let transformer = transformer?;
        memory.mark(device, "transformer");

        let hidden = te_cfg.hidden_size;
        let te_weights = files.text_encoder.weights.clone();
        let te_device = device.clone();
        let (stream_weights, stream_device, stream_cfg) = (te_weights.clone(), te_device.clone(), te_cfg.clone());
        let load_te: TextEncoderLoader = Box::new(move || {
            // Layer by layer (each layer's tensors read together by the pool of threads): the
            // fused q|k|v and gate|up copies are made while only that layer's parts are on the
            // device, so the parts' freed memory is reused by the next layer instead of leaving
            // holes across the whole encoder (about 1 GiB more in use with everything preloaded).
            let (vb, problems) = lazy_checked_var_builder(&te_weights, dtype, &te_device)?;
            let text_encoder = TextEncoder::new(&te_cfg, vb);
            ensure_no_problems("text_encoder", &problems)?;
            let mut text_encoder = text_encoder?;
            text_encoder.set_cuda_graphs(opts.cuda_graphs);
            Ok(text_encoder)
        });
        let encode: StreamedEncoder = Box::new(move |ids| {
            let (vb, problems) = lazy_checked_var_builder(&stream_weights, dtype, &stream_device)?;
            let out = encode_streamed(&stream_cfg, vb, ids);
            ensure_no_problems("text_encoder", &problems)?;
            out
        });
        let text_encoder = Self::text_encoder_slot(load_te, encode, hidden, opts)?;
        memory.mark(device, "text encoder");

        let (vb, problems) = checked_var_builder(&files.vae.weights, dtype, device)?;
        let vae = AutoencoderKl::new(&vae_cfg, vb);
        ensure_no_problems("vae", &problems)?;
        let vae = vae?;
        memory.mark(device, "vae");

        Self::assemble(transformer, text_encoder, tokenizer, vae, sched, device, dtype, name, is_tiny, opts, memory)
    }

    fn text_encoder_slot(load: TextEncoderLoader, encode: StreamedEncoder, hidden: usize, opts: LoadOptions) -> Result<TextEncoderSlot> {
        Ok(if opts.free_text_encoder {
            TextEncoderSlot::OnDemand { load, encode, hidden }
        } else {
            TextEncoderSlot::Resident(load()?)
        })
    }

    /// The real architecture (Z-Image-Turbo configs) with random weights drawn on the device, and
    /// the tiny byte-level tokenizer: for benchmarks where the real files are absent.
    pub fn random_full_size(device: &Device, dtype: DType, opts: LoadOptions) -> Result<Self> {
        use crate::weights::device_random_var_builder;
        let mut te = TextEncoderConfig::qwen3_4b();
        te.vocab_size = te.vocab_size.max(259);
        Self::from_var_builders(
            &TransformerConfig::z_image_turbo(),
            &te,
            &VaeConfig::flux(),
            SchedulerConfig::default(),
            PromptTokenizer::tiny()?,
            [device_random_var_builder(dtype, device), device_random_var_builder(dtype, device), device_random_var_builder(dtype, device)],
            RANDOM_FULL_SIZE_NAME,
            false,
            opts,
        )
    }

    /// The built-in tiny model (`tiny.rs`), built in memory.
    pub fn tiny(device: &Device, dtype: DType) -> Result<Self> {
        Self::tiny_with_options(device, dtype, LoadOptions::default())
    }

    pub fn tiny_with_options(device: &Device, dtype: DType, opts: LoadOptions) -> Result<Self> {
        use crate::tiny;
        Self::from_var_builders(
            &tiny::transformer_config(),
            &tiny::text_encoder_config(),
            &tiny::vae_config(),
            SchedulerConfig::default(),
            PromptTokenizer::tiny()?,
            tiny::var_builders(device, dtype),
            tiny::TINY_NAME,
            true,
            opts,
        )
    }

    /// Builds the components from one `VarBuilder` per component (used by the tiny model).
    #[allow(clippy::too_many_arguments)]
    pub fn from_var_builders(
        t_cfg: &TransformerConfig,
        te_cfg: &TextEncoderConfig,
        vae_cfg: &VaeConfig,
        sched: SchedulerConfig,
        tokenizer: PromptTokenizer,
        vbs: [VarBuilder<'static>; 3],
        name: &str,
        is_tiny: bool,
        opts: LoadOptions,
    ) -> Result<Self> {
        let [t_vb, te_vb, vae_vb] = vbs;
        let (device, dtype) = (t_vb.device().clone(), t_vb.dtype());
        let mut memory = crate::device::MemoryTrace::default();
        memory.mark(&device, "start");
        let transformer = ZImageTransformer::new_quantized(t_cfg, t_vb, opts.quantization, opts.dense_copy_on(&device).as_ref())?;
        memory.mark(&device, "transformer");
        let te_cfg = te_cfg.clone();
        let hidden = te_cfg.hidden_size;
        let (stream_cfg, stream_vb) = (te_cfg.clone(), te_vb.clone());
        let text_encoder = Self::text_encoder_slot(
            Box::new(move || {
                let mut te = TextEncoder::new(&te_cfg, te_vb.clone())?;
                te.set_cuda_graphs(opts.cuda_graphs);
                Ok(te)
            }),
            Box::new(move |ids| encode_streamed(&stream_cfg, stream_vb.clone(), ids)),
            hidden,
            opts,
        )?;
        memory.mark(&device, "text encoder");
        let vae = AutoencoderKl::new(vae_cfg, vae_vb)?;
        memory.mark(&device, "vae");
        Self::assemble(transformer, text_encoder, tokenizer, vae, sched, &device, dtype, name, is_tiny, opts, memory)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        transformer: ZImageTransformer,
        text_encoder: TextEncoderSlot,
        tokenizer: PromptTokenizer,
        vae: AutoencoderKl,
        scheduler: SchedulerConfig,
        device: &Device,
        dtype: DType,
        name: &str,
        is_tiny: bool,
        opts: LoadOptions,
        load_memory: crate::device::MemoryTrace,
    ) -> Result<Self> {
        let hidden = match &text_encoder {
            TextEncoderSlot::Resident(te) => te.hidden_size(),
            TextEncoderSlot::OnDemand { hidden, .. } => *hidden,
        };
        let cap = transformer.config().cap_feat_dim;
        if cap != hidden {
            return Err(Error::WeightMismatch {
                component: "pipeline".into(),
                problems: vec![format!("transformer cap_feat_dim {cap} != text encoder hidden size {hidden}")],
            });
        }
        if transformer.config().in_channels != vae.config().latent_channels {
            return Err(Error::WeightMismatch {
                component: "pipeline".into(),
                problems: vec![format!(
                    "transformer in_channels {} != VAE latent_channels {}",
                    transformer.config().in_channels,
                    vae.config().latent_channels
                )],
            });
        }
        Ok(Self {
            transformer,
            text_encoder,
            tokenizer,
            vae,
            scheduler,
            tiling: TilingOptions::default(),
            device: device.clone(),
            dtype,
            model_name: name.to_string(),
            is_tiny,
            denoise_graphs: GraphCache::new(opts.cuda_graphs, crate::graph::DEFAULT_CAPACITY),
            load_memory,
            injected: std::sync::Mutex::new(None),
        })
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }
    /// Device memory in use (MiB, whole device) after each loading stage; empty off CUDA.
    pub fn load_memory_mib(&self) -> Vec<(String, f64)> {
        self.load_memory.stages.iter().map(|(n, b)| (n.clone(), b.used_mib)).collect()
    }

    /// The same stages split by owner (`MemoryBreakdown`); empty off CUDA.
    pub fn load_memory_breakdowns(&self) -> &[(String, crate::device::MemoryBreakdown)] {
        &self.load_memory.stages
    }
    pub fn is_tiny(&self) -> bool {
        self.is_tiny
    }
    /// The tiny model or the full-size architecture with random weights: images are noise.
    pub fn has_random_weights(&self) -> bool {
        self.is_tiny || self.model_name == RANDOM_FULL_SIZE_NAME
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn transformer(&self) -> &ZImageTransformer {
        &self.transformer
    }
    pub fn vae(&self) -> &AutoencoderKl {
        &self.vae
    }
    /// Token ids -> (L, hidden) embeddings, loading the text encoder first when it is not resident.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.text_encoder {
            TextEncoderSlot::Resident(te) => te.encode_ids(ids),
            TextEncoderSlot::OnDemand { encode, .. } => encode(ids),
        }
    }
    pub fn is_fp8(&self) -> bool {
        self.transformer.is_fp8()
    }
    /// How the FP8 layers scale their activations (None when not FP8).
    pub fn fp8_scaling(&self) -> Option<crate::fp8::ActivationScaling> {
        self.transformer.fp8_scaling()
    }
    /// Test hook: the next `count` generations fail at their first step with `fault`.
    pub fn inject_fault(&self, fault: InjectedFault, count: usize) {
        *self.injected.lock().unwrap_or_else(|p| p.into_inner()) = (count > 0).then_some((fault, count));
    }

    /// How many injected faults are still to fire.
    pub fn pending_faults(&self) -> usize {
        self.injected.lock().unwrap_or_else(|p| p.into_inner()).map(|(_, n)| n).unwrap_or(0)
    }

    fn take_injected_fault(&self) -> Option<InjectedFault> {
        let mut g = self.injected.lock().unwrap_or_else(|p| p.into_inner());
        let (fault, n) = (*g)?;
        *g = (n > 1).then_some((fault, n - 1));
        Some(fault)
    }

    /// Turns CUDA graph replays on or off (drops the captures held), for comparisons.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.set_denoise_graphs(on);
        if let TextEncoderSlot::Resident(te) = &mut self.text_encoder {
            te.set_cuda_graphs(on);
        }
    }
    /// Turns CUDA graph replays of the denoiser steps alone on or off (the text encoder keeps its
    /// setting), so that a comparison sees only the steps' difference.
    pub fn set_denoise_graphs(&mut self, on: bool) {
        self.denoise_graphs = GraphCache::new(on, crate::graph::DEFAULT_CAPACITY);
    }
    /// Whether denoiser steps replay as CUDA graphs (CUDA devices only).
    pub fn uses_cuda_graphs(&self) -> bool {
        self.denoise_graphs.enabled() && self.device.is_cuda()
    }
    /// The attention kernel the transformer's self-attention runs (see
    /// `AttentionKernel::for_transformer`).
    pub fn attention_kernel(&self) -> crate::ops::AttentionKernel {
        crate::ops::AttentionKernel::for_transformer(&self.device, self.transformer.quantization(), self.transformer.config().head_dim())
    }
    /// Quantizes the loaded transformer's block linears in place (from its dense weights).
    pub fn quantize(&mut self, q: Quantization) -> Result<()> {
        self.transformer.quantize(q)?;
        // captured graphs hold the old weights' addresses
        self.set_denoise_graphs(self.denoise_graphs.enabled());
        Ok(())
    }
    pub fn quantization(&self) -> Quantization {
        self.transformer.quantization()
    }
    /// A copy of the transformer sharing its weights' storage (no device memory): to quantize
    /// the same dense weights more than one way (`bench --check`).
    pub fn transformer_snapshot(&self) -> ZImageTransformer {
        self.transformer.clone()
    }
    /// Puts back a transformer taken with `transformer_snapshot` (captured graphs are dropped).
    pub fn restore_transformer(&mut self, transformer: ZImageTransformer) {
        self.transformer = transformer;
        self.set_denoise_graphs(self.denoise_graphs.enabled());
    }
    pub fn text_encoder_resident(&self) -> bool {
        matches!(self.text_encoder, TextEncoderSlot::Resident(_))
    }
    /// Rewrites a short idea into a detailed prompt with the text encoder run as a causal LM
    /// (`enhancer.rs`); with a freed text encoder it is loaded for the call.
    pub fn enhance(
        &self,
        req: &crate::enhancer::EnhanceRequest,
        on_event: &mut dyn FnMut(&crate::enhancer::EnhanceEvent) -> Control,
    ) -> Result<crate::enhancer::EnhanceOutput> {
        match &self.text_encoder {
            TextEncoderSlot::Resident(te) => crate::enhancer::enhance(te, &self.tokenizer, req, on_event),
            TextEncoderSlot::OnDemand { load, .. } => crate::enhancer::enhance(&load()?, &self.tokenizer, req, on_event),
        }
    }
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }
    pub fn set_tiling(&mut self, tiling: TilingOptions) {
        self.tiling = tiling;
    }

    fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    /// Prompt -> (L, hidden) embeddings in the compute dtype, and the pre-truncation token count
    /// when the prompt was cut to 512 tokens.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Option<usize>)> {
        let enc = self.tokenizer.encode(prompt)?;
        Ok((self.encode_ids(&enc.ids)?, enc.truncated_from))
    }

    /// Image (any size) -> (1, 3, H, W) in [-1, 1], resized with Lanczos3 when the size differs.
    pub fn preprocess_image(&self, img: &image::RgbImage, width: usize, height: usize) -> Result<Tensor> {
        let resized;
        let img = if img.width() as usize != width || img.height() as usize != height {
            resized = image::imageops::resize(img, width as u32, height as u32, image::imageops::FilterType::Lanczos3);
            &resized
        } else {
            img
        };
        let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        let t = Tensor::from_vec(data, (height, width, 3), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?;
        Ok(t.to_device(&self.device)?)
    }

    /// Raw VAE latent mean -> model latent: (z - shift) * scale, f32.
    pub fn encode_image(&self, img: &Tensor) -> Result<Tensor> {
        let cfg = self.vae.config();
        let mean = self.vae.encode_mean_auto(&img.to_dtype(self.vae.dtype())?, &self.tiling)?;
        Ok(((mean.to_dtype(DType::F32)? - cfg.shift())? * cfg.scaling_factor)?)
    }

    /// Model latents -> raw VAE output: z / scale + shift, decoded per item (slicing), tiled when large.
    fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        let cfg = self.vae.config();
        let z = ((latents / cfg.scaling_factor)? + cfg.shift())?;
        Ok(self.vae.decode_auto(&z.to_dtype(self.vae.dtype())?, &self.tiling)?)
    }

    /// Model latents (n, 16, h, w) f32 -> RGB images, one image at a time.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        (0..latents.dim(0)?)
            .map(|i| to_rgb_image(&self.decode_raw(&latents.narrow(0, i, 1)?)?.squeeze(0)?))
            .collect()
    }

    /// Float image in [0, 1] (n, H, W, 3) exactly as the reference's `output_type="np"`.
    pub fn decode_latents_float(&self, latents: &Tensor) -> Result<Tensor> {
        let img = self.decode_raw(latents)?.to_dtype(DType::F32)?;
        Ok(((img * 0.5)? + 0.5)?.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?)
    }

    fn initial_noise(&self, req: &GenerateRequest, h: usize, w: usize) -> Result<Tensor> {
        let c = self.latent_channels();
        if let Some(noise) = &req.noise {
            let noise = if noise.rank() == 3 { noise.unsqueeze(0)? } else { noise.clone() };
            return Ok(noise.to_dtype(DType::F32)?.to_device(&self.device)?);
        }
        // Drawn on the CPU with our own generator: the same seed gives the same noise everywhere.
        let per = c * h * w;
        let mut all = Vec::with_capacity(req.n * per);
        for i in 0..req.n {
            all.extend(crate::rng::normal_vec(req.seed + i as u64, per));
        }
        Ok(Tensor::from_vec(all, (req.n, c, h, w), &Device::Cpu)?.to_device(&self.device)?)
    }

    /// One small text-to-image and image-to-image run (256x256, two steps, previews on), so that a
    /// server's first real request does not pay the one-time costs: on CUDA the driver compiles
    /// every kernel module (PTX) on its first launch, 15-20 s on a machine that never ran them.
    pub fn warm_up(&self) -> Result<std::time::Duration> {
        let t = std::time::Instant::now();
        let req = GenerateRequest { prompt: "warm-up".into(), width: 256, height: 256, steps: 2, preview: true, ..Default::default() };
        let out = self.generate(&req, &mut |_| Control::Continue)?;
        let init = out.images.into_iter().next().expect("one image was asked for");
        let i2i = GenerateRequest { init_image: Some(init), strength: 0.6, ..req };
        self.generate(&i2i, &mut |_| Control::Continue)?;
        Ok(t.elapsed())
    }

    /// One denoiser call: x (B, C, 1, H, W) in the model dtype, one step's modulation, the
    /// request's conditioning. On CUDA it is a CUDA graph replay after the first call of a shape.
    fn denoise(&self, x: &Tensor, modulation: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let key = (cond.shape_key(), x.dim(1)?, self.attention_kernel());
        let f = |ins: &[Tensor]| self.transformer.forward_prepared(&ins[0], &ins[1], &cond.with_captions(ins[2].clone())?);
        Ok(self.denoise_graphs.run(&key, &[x, modulation, cond.captions()], &cond.tables(), &f)?)
    }

    /// Runs one request. `on_step` is called after every step; returning `Control::Cancel` stops
    /// the run with `Error::Cancelled`.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> Result<GenerateOutput> {
        let start = Instant::now();
        req.validate()?;
        let mut timings = Timings::default();
        let schedule = Schedule::new(&self.scheduler, req.steps)?;
        let first_step = match &req.init_image {
            Some(_) => img2img_start_step(req.steps, req.strength)?,
            None => 0,
        };
        let (h, w) = (2 * (req.height / 16), 2 * (req.width / 16));

        // Text.
        let t = Instant::now();
        let (pos, truncated) = self.encode_prompt(&req.prompt)?;
        let use_cfg = req.guidance_scale > 0.0;
        let neg = if use_cfg { Some(self.encode_prompt(&req.negative_prompt)?.0) } else { None };
        timings.text_encoding = t.elapsed();

        // Starting latents.
        let noise = self.initial_noise(req, h, w)?;
        let mut x = match &req.init_image {
            Some(img) => {
                let t = Instant::now();
                let z = self.encode_image(&self.preprocess_image(img, req.width, req.height)?)?;
                let z = z.broadcast_as(noise.shape())?;
                let s = schedule.sigmas[first_step] as f64;
                let x = ((&noise * s)? + (z * (1.0 - s))?)?;
                timings.vae_encode = t.elapsed();
                x
            }
            None => noise,
        };

        // Denoising. The caption side and every step's modulation are computed once, up front.
        let t_loop = Instant::now();
        let n = req.n;
        let latent = (1, h, w);
        let captions = (0..n)
            .map(|i| vary_conditioning(&pos, req.variation, req.variation_seed_of(i)))
            .collect::<Result<Vec<_>>>()?;
        let cond_pos = self.transformer.condition(&Tensor::stack(&captions, 0)?, latent)?;
        let cond_neg = neg.map(|neg| self.transformer.condition(&Tensor::stack(&vec![neg; n], 0)?, latent)).transpose()?;
        let times: Vec<f32> = (first_step..req.steps).map(|i| schedule.model_time(i)).collect();
        let modulations = self.transformer.modulations(&times)?;
        let total = req.steps - first_step;
        for (k, i) in (first_step..req.steps).enumerate() {
            if k == 0 {
                match self.take_injected_fault() {
                    Some(InjectedFault::OutOfMemory) => {
                        return Err(Error::Candle(candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (injected)".into())))
                    }
                    Some(InjectedFault::DeviceError) => {
                        return Err(Error::Candle(candle_core::Error::Msg("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\") (injected)".into())))
                    }
                    Some(InjectedFault::Panic) => panic!("injected panic inside the generation"),
                    None => {}
                }
            }
            let sigma = schedule.sigmas[i];
            let model_t = times[k];
            let x_in = x.unsqueeze(2)?.to_dtype(self.dtype)?;
            let out_pos = self.denoise(&x_in, &modulations[k], &cond_pos)?.squeeze(2)?.to_dtype(DType::F32)?;
            let guidance_now = match &cond_neg {
                Some(_) if req.cfg_truncation <= 1.0 && model_t > req.cfg_truncation => 0.0,
                Some(_) => req.guidance_scale,
                None => 0.0,
            };
            let pred = match (&cond_neg, guidance_now > 0.0) {
                (Some(cond_neg), true) => {
                    let out_neg = self.denoise(&x_in, &modulations[k], cond_neg)?.squeeze(2)?.to_dtype(DType::F32)?;
                    guide(&out_pos, &out_neg, guidance_now, req.cfg_normalization)?
                }
                _ => out_pos,
            };
            let v = pred.neg()?;
            let denoised = (&x - (&v * sigma as f64)?)?;
            x = (&x + (&v * (schedule.sigmas[i + 1] - sigma) as f64)?)?;
            let preview = if req.preview { Some(crate::preview::latent_to_rgb(&denoised.get(0)?)?) } else { None };
            let event = StepEvent {
                image_index: 0,
                step: i - first_step + 1,
                total,
                sigma,
                elapsed: start.elapsed(),
                denoised: &denoised,
                latents: &x,
                preview: preview.as_ref(),
            };
            if on_step(&event) == Control::Cancel {
                return Err(Error::Cancelled);
            }
        }
        // Make the loop's time real on asynchronous devices before reading the clock.
        self.device.synchronize()?;
        timings.denoising = t_loop.elapsed();
        crate::graph::trim_graph_memory(&self.device);

        let t = Instant::now();
        let images = self.decode_latents(&x)?;
        timings.vae_decode = t.elapsed();
        timings.total = start.elapsed();
        Ok(GenerateOutput {
            images,
            seeds: (0..n as u64).map(|i| req.seed + i).collect(),
            timings,
            prompt_truncated: truncated,
            latents: x,
        })
    }
}

/// pred = pos + g (pos - neg); with normalization c > 0, ||pred|| is capped at c ||pos|| per item.
fn guide(pos: &Tensor, neg: &Tensor, g: f32, normalization: f32) -> Result<Tensor> {
    let pred = (pos + ((pos - neg)? * g as f64)?)?;
    if normalization <= 0.0 {
        return Ok(pred);
    }
    let n = pred.dim(0)?;
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        let (p, q) = (pos.get(i)?, pred.get(i)?);
        let pos_norm = p.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let new_norm = q.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let max_norm = pos_norm * normalization;
        items.push(if new_norm > max_norm { (q * (max_norm / new_norm) as f64)? } else { q });
    }
    Ok(Tensor::stack(&items, 0)?)
}

/// (3, H, W) in about [-1, 1] -> RGB u8 with (x / 2 + 0.5).clamp(0, 1) * 255 rounded.
fn to_rgb_image(img: &Tensor) -> Result<image::RgbImage> {
    let (_, h, w) = img.dims3()?;
    let v = ((img.to_dtype(DType::F32)? * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    // Rounded to integers in [0, 255] and cast to u8 on the device: a quarter of the bytes to
    // copy back, and no per-pixel conversion on the host.
    let data: Vec<u8> = (v * 255.0)?
        .round()?
        .permute((1, 2, 0))?
        .contiguous()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    image::RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| Error::Image("decoded image has the wrong size".into()))
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Pipeline>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variation_zero_is_todays_image_and_variation_moves_it_per_seed() {
        let p = Pipeline::tiny(&Device::Cpu, DType::F32).unwrap();
        let base = GenerateRequest { prompt: "a lighthouse".into(), width: 64, height: 64, steps: 3, seed: 11, ..Default::default() };
        let run = |req: &GenerateRequest| p.generate(req, &mut |_| Control::Continue).unwrap().images;
        // mean absolute difference of two images, in 8-bit levels
        let diff = |a: &image::RgbImage, b: &image::RgbImage| {
            a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
        };
        let plain = run(&base);
        // 0 is exactly the plain image, whatever the variation seed
        assert!(run(&GenerateRequest { variation: 0.0, variation_seed: Some(99), ..base.clone() }) == plain, "variation 0 is bit for bit today's image");
        let varied = run(&GenerateRequest { variation: 0.6, ..base.clone() });
        let moved = diff(&varied[0], &plain[0]);
        assert!(moved > 2.0, "variation changes the image ({moved:.2} levels)");
        assert!(run(&GenerateRequest { variation: 0.6, ..base.clone() }) == varied, "deterministic");
        let other_seed = run(&GenerateRequest { variation: 0.6, variation_seed: Some(12), ..base.clone() });
        assert!(diff(&other_seed[0], &varied[0]) > 2.0, "the variation seed picks the perturbation");
        // image i of a batch is the single image of seed + i, variation included (up to the
        // batched matmuls' rounding)
        let batch = run(&GenerateRequest { n: 2, variation: 0.6, ..base.clone() });
        assert!(diff(&batch[0], &varied[0]) < 0.5);
        let second = run(&GenerateRequest { seed: 12, variation: 0.6, ..base.clone() });
        assert!(diff(&batch[1], &second[0]) < 0.5);
        assert!(GenerateRequest { variation: 1.5, ..base.clone() }.validate().is_err());
    }

    #[test]
    fn the_conditioning_perturbation_scales_with_each_token() {
        let c = Tensor::from_vec((0..8 * 256).map(|i| ((i % 256) as f32 / 64.0) * if i / 256 % 2 == 0 { 1.0 } else { 10.0 }).collect::<Vec<_>>(), (8, 256), &Device::Cpu).unwrap();
        let moved = vary_conditioning(&c, 0.5, 3).unwrap();
        let rms = |t: &Tensor| t.sqr().unwrap().mean_keepdim(1).unwrap().sqrt().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let delta = rms(&(&moved - &c).unwrap());
        for (d, r) in delta.iter().zip(rms(&c)) {
            assert!((d / r - 0.5).abs() < 0.08, "perturbation {d} vs token rms {r}");
        }
    }

    #[test]
    fn a_folder_written_by_tiny_write_dir_loads_as_the_in_memory_tiny_model() {
        let dir = std::env::temp_dir().join(format!("zimage-tiny-{}", std::process::id()));
        crate::tiny::write_dir(&dir).unwrap();
        let from_disk = Pipeline::load(&ModelSource::Dir(dir.clone()), &Device::Cpu).unwrap();
        let in_mem = Pipeline::load(&ModelSource::Tiny, &Device::Cpu).unwrap();
        let req = GenerateRequest { prompt: "a lighthouse at dusk".into(), width: 64, height: 48, steps: 3, seed: 7, ..Default::default() };
        let a = from_disk.generate(&req, &mut |_| Control::Continue).unwrap();
        let b = in_mem.generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(a.images[0], b.images[0]);
        std::fs::remove_dir_all(&dir).ok();
    }
    use crate::testutil::{assert_close, expected, expected_json, tiny_model_dir};

    fn fixture_pipeline() -> Pipeline {
        Pipeline::load(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu).unwrap()
    }

    fn request(case: &serde_json::Value, noise: &Tensor) -> GenerateRequest {
        GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
            cfg_normalization: case["cfg_normalization"].as_f64().unwrap_or(0.0) as f32,
            cfg_truncation: case["cfg_truncation"].as_f64().unwrap_or(1.0) as f32,
            strength: case["strength"].as_f64().unwrap_or(1.0) as f32,
            noise: Some(noise.clone()),
            ..Default::default()
        }
    }

    /// Runs a fixture case and compares the final latents and the float image.
    fn check_case(name: &str, init: Option<image::RgbImage>) -> Vec<Tensor> {
        let p = fixture_pipeline();
        let e = expected();
        let mut req = request(&expected_json()[name], &e[&format!("{name}.noise")]);
        req.init_image = init;
        let mut steps = Vec::new();
        let out = p
            .generate(&req, &mut |ev| {
                steps.push(ev.latents.clone());
                Control::Continue
            })
            .unwrap();
        assert_close(&format!("{name}.latents"), &out.latents, &e[&format!("{name}.latents")], 1e-4);
        let img = p.decode_latents_float(&out.latents).unwrap().squeeze(0).unwrap();
        assert_close(&format!("{name}.image"), &img, &e[&format!("{name}.image")], 1e-4);
        // The u8 output rounds the same float image.
        let want: Vec<f32> = e[&format!("{name}.image")].flatten_all().unwrap().to_vec1().unwrap();
        let got = out.images[0].as_raw();
        let off = got.iter().zip(&want).filter(|(g, w)| (**g as f32 - (*w * 255.0).round()).abs() > 1.0).count();
        assert_eq!(off, 0, "{name}: u8 pixels off by more than 1");
        steps
    }

    #[test]
    fn text_to_image_matches_diffusers() {
        let p = fixture_pipeline();
        let e = expected();
        let req = request(&expected_json()["t2i"], &e["t2i.noise"]);
        let mut xs = Vec::new();
        p.generate(&req, &mut |ev| {
            xs.push(ev.latents.clone());
            Control::Continue
        })
        .unwrap();
        for (i, x) in xs.iter().enumerate() {
            assert_close(&format!("t2i.step{i}"), x, &e[&format!("t2i.step{i}")], 1e-4);
        }
        check_case("t2i", None);
    }

    #[test]
    fn fp8_transformer_stays_close_to_full_precision() {
        // Same fixture weights and noise: FP8 block linears against the f32 pipeline (itself checked
        // against diffusers above). E4M3 rounding gives a few percent; a broken scale or layout
        // gives O(1).
        let opts = LoadOptions { quantization: Quantization::Fp8, ..Default::default() };
        let p = Pipeline::load_with_options(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu, DType::F32, opts).unwrap();
        assert!(p.is_fp8());
        let e = expected();
        let req = request(&expected_json()["t2i"], &e["t2i.noise"]);
        let got = p.generate(&req, &mut |_| Control::Continue).unwrap();
        let want = fixture_pipeline().generate(&req, &mut |_| Control::Continue).unwrap();
        let rel = crate::fp8::relative_l2(&got.latents, &want.latents).unwrap();
        assert!(rel > 1e-5 && rel < 0.1, "FP8 latents relative L2 {rel}");
    }

    #[test]
    fn int8_transformer_stays_close_to_full_precision_and_closer_than_fp8() {
        // Same fixture weights and noise: INT8 block linears (per-channel weights, per-token
        // activations: ~7 bits where E4M3 keeps 3 mantissa bits) against the f32 pipeline.
        let load = |quantization| {
            let opts = LoadOptions { quantization, ..Default::default() };
            Pipeline::load_with_options(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu, DType::F32, opts).unwrap()
        };
        let p = load(Quantization::Int8);
        assert_eq!(p.quantization(), Quantization::Int8);
        let e = expected();
        let req = request(&expected_json()["t2i"], &e["t2i.noise"]);
        let got = p.generate(&req, &mut |_| Control::Continue).unwrap();
        let want = fixture_pipeline().generate(&req, &mut |_| Control::Continue).unwrap();
        let rel = crate::fp8::relative_l2(&got.latents, &want.latents).unwrap();
        let fp8 = load(Quantization::Fp8).generate(&req, &mut |_| Control::Continue).unwrap();
        let rel_fp8 = crate::fp8::relative_l2(&fp8.latents, &want.latents).unwrap();
        assert!(rel > 1e-6 && rel < 0.05, "INT8 latents relative L2 {rel}");
        assert!(rel < rel_fp8, "INT8 {rel} should beat FP8 {rel_fp8} on these weights");
    }

    #[test]
    fn a_quantized_transformer_is_not_quantized_again_another_way() {
        let mut p = Pipeline::load_with_options(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu, DType::F32, LoadOptions::default()).unwrap();
        let dense = p.transformer_snapshot();
        p.quantize(Quantization::Int8).unwrap();
        p.quantize(Quantization::Int8).unwrap(); // same format: nothing to do
        let err = p.quantize(Quantization::Fp8).unwrap_err().to_string();
        assert!(err.contains("already quantized to int8"), "{err}");
        p.restore_transformer(dense);
        assert_eq!(p.quantization(), Quantization::None);
        p.quantize(Quantization::Fp8).unwrap();
        assert!(p.is_fp8());
    }

    #[test]
    fn precision_parses_and_auto_keeps_the_cpu_in_full_precision() {
        assert_eq!("auto".parse::<Precision>().unwrap(), Precision::Auto);
        assert_eq!("fp8".parse::<Precision>().unwrap(), Precision::Fp8);
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Full);
        assert_eq!("int8".parse::<Precision>().unwrap(), Precision::Int8);
        assert!("fp16".parse::<Precision>().unwrap_err().contains("auto, fp8, int8 or bf16"));
        assert_eq!(Precision::Int8.quantization_on(&Device::Cpu), Quantization::Int8);
        assert_eq!(Precision::Auto.quantization_on(&Device::Cpu), Quantization::None);
        assert!(!Precision::Auto.fp8_on(&Device::Cpu));
        assert!(Precision::Fp8.fp8_on(&Device::Cpu));
        assert!(!fp8_supported(&Device::Cpu));
    }

    #[test]
    fn prepared_conditioning_is_reused_across_steps() {
        // The pipeline's path (caption side and modulations once, then forward_prepared per step)
        // against the one-call forward, step by step on the fixture model.
        let p = fixture_pipeline();
        let t = p.transformer();
        let cap = Tensor::randn(0f32, 1.0, (1, 9, t.config().cap_feat_dim), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, t.config().in_channels, 1, 8, 8), &Device::Cpu).unwrap();
        let times = [0.1f32, 0.5, 0.9];
        let cond = t.condition(&cap, (1, 8, 8)).unwrap();
        let mods = t.modulations(&times).unwrap();
        for (i, &time) in times.iter().enumerate() {
            let prepared = t.forward_prepared(&x, &mods[i], &cond).unwrap();
            let direct = t.forward(&x, &Tensor::new(&[time], &Device::Cpu).unwrap(), &[cap.squeeze(0).unwrap()]).unwrap();
            let err = (prepared - direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "step {i}: {err}");
        }
    }

    #[test]
    fn warm_up_runs_both_modes() {
        let p = Pipeline::tiny(&Device::Cpu, DType::F32).unwrap();
        assert!(p.warm_up().unwrap() > std::time::Duration::ZERO);
    }

    #[test]
    fn bf16_pipeline_runs_on_cpu_close_to_f32() {
        // The GPU compute dtype on the CPU (matmuls and convolutions in f32 with bf16 rounding):
        // bf16 rounding gives about 5e-3 (0.35 levels); a wrong cast or layout gives O(1).
        let p = Pipeline::load_with_options(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu, DType::BF16, LoadOptions::default()).unwrap();
        assert_eq!(p.dtype(), DType::BF16);
        let e = expected();
        let req = request(&expected_json()["t2i"], &e["t2i.noise"]);
        let got = p.generate(&req, &mut |_| Control::Continue).unwrap();
        let want = fixture_pipeline().generate(&req, &mut |_| Control::Continue).unwrap();
        let rel = crate::fp8::relative_l2(&got.latents, &want.latents).unwrap();
        assert!(rel > 1e-5 && rel < 2.5e-2, "bf16 latents relative L2 {rel}");
        let img = |o: &GenerateOutput| o.images[0].as_raw().iter().map(|&v| v as f32).collect::<Vec<_>>();
        let (g, w) = (img(&got), img(&want));
        let mean_abs = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum::<f32>() / g.len() as f32;
        assert!(mean_abs < 1.5, "bf16 image differs by {mean_abs} levels on average");
    }

    #[test]
    fn freed_text_encoder_gives_the_same_image() {
        let opts = LoadOptions { free_text_encoder: true, ..Default::default() };
        let p = Pipeline::load_with_options(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu, DType::F32, opts).unwrap();
        assert!(!p.text_encoder_resident());
        let e = expected();
        let req = request(&expected_json()["t2i"], &e["t2i.noise"]);
        let got = p.generate(&req, &mut |_| Control::Continue).unwrap();
        let want = fixture_pipeline().generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(got.images[0].as_raw(), want.images[0].as_raw());
        // and again: the encoder is reloaded for every prompt
        let again = p.generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(again.images[0].as_raw(), want.images[0].as_raw());
    }

    #[test]
    fn guidance_with_normalization_matches_diffusers() {
        check_case("t2i_cfg", None);
    }

    #[test]
    fn guidance_truncation_matches_diffusers() {
        check_case("t2i_cfg_trunc", None);
    }

    #[test]
    fn image_to_image_matches_diffusers() {
        let init = image::open(crate::testutil::fixtures_dir().join("i2i_init.png")).unwrap().to_rgb8();
        let p = fixture_pipeline();
        let e = expected();
        let z = p.encode_image(&p.preprocess_image(&init, 64, 48).unwrap()).unwrap();
        assert_close("i2i.image_latents", &z, &e["i2i.image_latents"], 1e-4);
        let steps = check_case("i2i", Some(init));
        assert_eq!(steps.len(), 3, "strength 0.6 of 4 steps runs 3");
    }

    #[test]
    fn sigmas_and_strength_match_diffusers() {
        let j = expected_json();
        for (n, case) in j["sigmas"].as_object().unwrap() {
            let n: usize = n.parse().unwrap();
            let s = Schedule::new(&SchedulerConfig::default(), n).unwrap();
            let want: Vec<f32> = case["sigmas"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(s.sigmas, want, "sigmas N={n}");
            let want_t: Vec<f32> = case["model_t"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let got_t: Vec<f32> = (0..n).map(|i| s.model_time(i)).collect();
            assert_eq!(got_t, want_t, "model time N={n}");
            for (strength, st) in case["strength"].as_object().unwrap() {
                let strength: f32 = strength.parse().unwrap();
                let want_steps = st["num_steps"].as_u64().unwrap() as usize;
                match img2img_start_step(n, strength) {
                    Ok(k) => {
                        assert_eq!(k, st["t_start"].as_u64().unwrap() as usize, "N={n} strength={strength}");
                        assert_eq!(n - k, want_steps);
                    }
                    Err(_) => assert_eq!(want_steps, 0, "N={n} strength={strength} refused but the reference runs steps"),
                }
            }
        }
    }

    #[test]
    fn same_seed_same_image_and_batches_use_seed_plus_i() {
        let p = Pipeline::load(&ModelSource::Tiny, &Device::Cpu).unwrap();
        let req = GenerateRequest { prompt: "x".into(), width: 32, height: 32, steps: 2, seed: 11, n: 2, ..Default::default() };
        let a = p.generate(&req, &mut |_| Control::Continue).unwrap();
        let b = p.generate(&GenerateRequest { seed: 12, n: 1, ..req.clone() }, &mut |_| Control::Continue).unwrap();
        assert_eq!(a.seeds, vec![11, 12]);
        assert_eq!(a.images[1], b.images[0], "image 1 of seed 11 is image 0 of seed 12");
        assert_ne!(a.images[0], a.images[1]);
        let c = p.generate(&req, &mut |_| Control::Continue).unwrap();
        assert_eq!(a.images, c.images);
    }

    #[test]
    fn cancel_stops_at_the_next_step() {
        let p = Pipeline::load(&ModelSource::Tiny, &Device::Cpu).unwrap();
        let req = GenerateRequest { prompt: "x".into(), width: 32, height: 32, steps: 5, preview: true, ..Default::default() };
        let mut seen = 0;
        let r = p.generate(&req, &mut |ev| {
            seen += 1;
            assert!(ev.preview.is_some());
            if ev.step == 2 { Control::Cancel } else { Control::Continue }
        });
        assert!(matches!(r, Err(Error::Cancelled)));
        assert_eq!(seen, 2);
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        let ok = GenerateRequest { prompt: "x".into(), width: 64, height: 64, ..Default::default() };
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (GenerateRequest { width: 1000, ..ok.clone() }, "992 or 1008"),
            (GenerateRequest { height: 8200, ..ok.clone() }, "multiple of 16"),
            (GenerateRequest { width: 8192, ..ok.clone() }, "outside"),
            (GenerateRequest { steps: 0, ..ok.clone() }, "steps"),
            (GenerateRequest { steps: 1000, ..ok.clone() }, "steps"),
            (GenerateRequest { n: 0, ..ok.clone() }, "n (images"),
            (GenerateRequest { guidance_scale: f32::NAN, ..ok.clone() }, "guidance"),
            (GenerateRequest { seed: u64::MAX, n: 2, ..ok.clone() }, "overflows"),
            (GenerateRequest { init_image: Some(image::RgbImage::new(8, 8)), strength: 0.0, ..ok.clone() }, "strength"),
            (GenerateRequest { init_image: Some(image::RgbImage::new(8, 8)), steps: 4, strength: 1e-20, ..ok.clone() }, "no step"),
            (GenerateRequest { noise: Some(Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap()), ..ok.clone() }, "noise"),
        ];
        for (req, needle) in cases {
            let err = req.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in `{err}`");
        }
        ok.validate().unwrap();
    }
}
