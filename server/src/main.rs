//! `zimage`: the command line of Z-Image Turbo Studio. `generate` runs the engine once and writes
//! PNGs with their parameters, `tiny` writes the built-in tiny model as a diffusers folder, `info`
//! reads a PNG's parameters back, `serve` starts the web studio (with its own workers, or as a
//! front end of a Redis queue), `worker` runs a Redis queue's jobs on one device, `bench` times
//! the stages.
//! This binary parses arguments, reports progress and maps errors to messages; the math lives in
//! `engine`, the web app in `web` and `app`.

#![recursion_limit = "256"]

mod bench;
mod lora_cli;
mod enhance_cli;
mod parity;
mod web;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use engine::loader::ModelSource;
use engine::pipeline::{Control, GenerateRequest, Pipeline};

#[derive(Parser)]
#[command(name = "zimage", version, about = "Z-Image-Turbo text-to-image and image-to-image, on a Rust engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (add --image for image-to-image).
    Generate(GenerateArgs),
    /// Write the built-in tiny model (random weights) as a diffusers-layout folder.
    Tiny {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the generation parameters stored in a PNG.
    Info { file: PathBuf },
    /// Start the web studio.
    Serve(ServeArgs),
    /// Run jobs from a Redis queue (`zimage serve --queue redis://…` front ends) on one device.
    Worker(WorkerArgs),
    /// Time text encoding, each denoising step, VAE decode and whole requests; prints JSON.
    Bench(bench::BenchArgs),
    /// Describe a LoRA file: layout, rank, alpha, modules, trigger words, what does not match.
    Lora(lora_cli::LoraArgs),
    /// Rewrite a short idea into a detailed image prompt with the text encoder run as a language
    /// model; prints only the new prompt on stdout.
    Enhance(enhance_cli::EnhanceArgs),
    /// Run the engine stage by stage on a diffusers run's saved inputs (scripts/gpu/parity_full.py).
    #[command(hide = true)]
    Parity(parity::ParityArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// `tiny`, `random`, a diffusers-layout folder, or a Hugging Face hub id (downloaded into the
    /// Hugging Face cache when missing). Default: on a GPU Tongyi-MAI/Z-Image-Turbo; on the CPU
    /// that model if the cache holds it, else `tiny`.
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, cuda or cuda:N. Default: cuda when built with it and a GPU is present, else cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of the transformer's block linears: `auto` (FP8 E4M3 on GPUs that run FP8
    /// matmuls, compute capability 8.9+; bf16 on other GPUs; f32 on the CPU), `fp8`, `int8`
    /// (W8A8, for GPUs with int8 tensor cores and no FP8: A100, RTX 30), or `bf16`.
    #[arg(long, default_value = "auto", env = "ZIMAGE_PRECISION")]
    pub precision: engine::pipeline::Precision,
    /// Same as `--precision fp8`.
    #[arg(long, env = "ZIMAGE_FP8", conflicts_with = "precision")]
    pub fp8: bool,
    /// Keep the text encoder out of memory: each prompt is encoded one layer at a time from the
    /// weight files, so the GPU holds one layer of it (~0.2 GB) instead of ~8 GB (for small cards).
    #[arg(long, env = "ZIMAGE_FREE_TEXT_ENCODER")]
    pub free_text_encoder: bool,
    /// Run every step as kernel launches instead of replaying a CUDA graph (for comparisons).
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

impl ModelArgs {
    pub fn precision(&self) -> engine::pipeline::Precision {
        if self.fp8 {
            engine::pipeline::Precision::Fp8
        } else {
            self.precision
        }
    }
    /// How to load on `device` (FP8 depends on the device under `auto`).
    pub fn load_options(&self, device: &candle_core::Device) -> engine::pipeline::LoadOptions {
        let base = engine::pipeline::LoadOptions::default();
        engine::pipeline::LoadOptions {
            quantization: self.precision().quantization_on(device),
            free_text_encoder: self.free_text_encoder,
            cuda_graphs: base.cuda_graphs && !self.no_cuda_graphs,
            keep_dense_for_lora: false,
        }
    }
    /// The model to load; `gpu`: it runs on a GPU (the real model is then the default).
    pub fn source(&self, gpu: bool) -> ModelSource {
        match &self.model {
            Some(m) => ModelSource::parse(m),
            None => ModelSource::default_source(gpu),
        }
    }
}

/// The full-size model on the CPU works but is very slow: say how slow before loading it.
fn warn_full_size_on_cpu(source: &ModelSource) {
    if matches!(source, ModelSource::Tiny) {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem_gib = system_memory_gib();
    eprintln!(
        "warning: {} runs on the CPU here ({cores} cores{}). It needs about 45 GiB of memory in f32 \
         (transformer 24.6 GB, text encoder 16 GB) and about half a petaFLOP of arithmetic per 1024x1024 \
         image: expect tens of minutes to hours an image. A build with an NVIDIA GPU takes about a second \
         (scripts/studio.sh builds for the GPU when nvidia-smi finds one); `--model tiny` is the quick demo.",
        source.display_name(),
        mem_gib.map(|g| format!(", {g:.0} GiB of memory")).unwrap_or_default()
    );
}

/// Total memory from /proc/meminfo (Linux), in GiB.
fn system_memory_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0 / 1024.0)
}

impl ModelArgs {
}

/// Opens CUDA device `i` the way the engine wants it (see `engine::pipeline::open_cuda`).
pub fn open_cuda(i: usize) -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        engine::pipeline::open_cuda(i).with_context(|| format!("cannot open CUDA device {i}"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        bail!("cannot open CUDA device {i}: this binary was built without `--features cuda`")
    }
}

pub fn pick_device(spec: &str) -> Result<candle_core::Device> {
    use candle_core::Device;
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                open_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = s.strip_prefix("cuda:").map(|i| i.parse()).transpose().context("cuda:N")?.unwrap_or(0);
            open_cuda(idx).with_context(|| {
                format!("cannot open {s}: is this binary built with `--features cuda` and a GPU present?")
            })?
        }
        other => bail!("unknown device `{other}`: use cpu, cuda or cuda:N"),
    })
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Input image for image-to-image.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Image-to-image strength in (0, 1].
    #[arg(long, default_value_t = 0.6)]
    strength: f32,
    /// Default 1024, or the input image's width rounded down to a multiple of 16.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// 0 to 4294967295 (the range the studio and the APIs use). Default: random (printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Number of images; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Classifier-free guidance scale (Turbo: 0).
    #[arg(long, default_value_t = 0.0)]
    guidance_scale: f32,
    #[arg(long, default_value_t = 0.0)]
    cfg_normalization: f32,
    #[arg(long, default_value_t = 1.0)]
    cfg_truncation: f32,
    /// Start from these latents: a safetensors file with one tensor (n, 16, H/8, W/8).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Output PNG; with --n > 1 the images are OUT-STEM-<i>.png.
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// Write each step's latent preview as PNGs into this folder.
    #[arg(long)]
    preview_dir: Option<PathBuf>,
    /// Apply a LoRA (repeatable); SCALE defaults to 1.0 and may be negative.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// 0-1: move each image's text conditioning by a perturbation from its seed, so that seeds
    /// give more different pictures (0: the plain image).
    #[arg(long, default_value_t = 0.0)]
    variation: f32,
    /// The perturbation's seed for the first image (default: each image's own seed).
    #[arg(long)]
    variation_seed: Option<u64>,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: std::net::SocketAddr,
    /// Where generated images are kept (share links).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Origins allowed to embed /embed in an iframe (CSP frame-ancestors); repeatable.
    #[arg(long = "frame-ancestor")]
    frame_ancestors: Vec<String>,
    /// Jobs that may wait in the queue before new ones are refused.
    #[arg(long, default_value_t = 32)]
    queue_capacity: usize,
    /// The built site (wasm, JS, CSS, public files).
    #[arg(long, env = "LEPTOS_SITE_ROOT", default_value = "target/site")]
    site_root: PathBuf,
    /// Require `Authorization: Bearer KEY` on the script APIs (OpenAI `/v1/*`, A1111 `/sdapi/*`);
    /// the studio's own pages and API stay open.
    #[arg(long, env = "ZIMAGE_API_KEY")]
    api_key: Option<String>,
    /// Devices to run workers on, one worker each: `auto` (every CUDA GPU, else the CPU), `cpu`,
    /// or a list such as `cuda:0,cuda:1`.
    #[arg(long, default_value = "auto", env = "ZIMAGE_DEVICES")]
    devices: String,
    /// Job submissions per minute per client (the API key's holder, else the IP address), with a
    /// minute's worth allowed at once; 0: unlimited.
    #[arg(long, default_value_t = 30)]
    submissions_per_minute: u32,
    /// Jobs one client may have queued or running at once; 0: no cap.
    #[arg(long, default_value_t = 4)]
    max_queued_per_client: usize,
    /// A job running longer is stopped and fails with a reason; 0: no bound.
    #[arg(long, default_value_t = 600)]
    job_timeout_secs: u64,
    /// A client must send its request headers within this many seconds.
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// A request body must arrive within this many seconds.
    #[arg(long, default_value_t = 120)]
    body_timeout_secs: u64,
    /// A websocket silent this long (browsers answer the server's pings by themselves) is closed.
    #[arg(long, default_value_t = 120)]
    ws_idle_secs: u64,
    /// On SIGTERM / Ctrl-C, how long the running jobs may take to finish before they are stopped.
    #[arg(long, default_value_t = 60)]
    drain_timeout_secs: u64,
    /// Put jobs on this Redis (redis://HOST:PORT[/DB]) for `zimage worker`s instead of running
    /// them here; no model is loaded by this process.
    #[arg(long, env = "ZIMAGE_QUEUE")]
    queue: Option<String>,
    /// With --queue: a finished image another front end took but did not store within this many
    /// milliseconds is stored by this one.
    #[arg(long, default_value_t = 30_000)]
    claim_idle_ms: u64,
    /// Load no model: one worker whose every job waits this many milliseconds and returns a grey
    /// image (for measuring the queue's own cost, docs/SCALE.md).
    #[arg(long)]
    simulate_job_ms: Option<u64>,
    /// LoRA files (`NAME.safetensors`) jobs may apply by name; new files appear without a
    /// restart. Default: `<data-dir>/loras`.
    #[arg(long, env = "ZIMAGE_LORA_DIR")]
    lora_dir: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct WorkerArgs {
    /// The Redis the front ends queue jobs on: redis://HOST:PORT[/DB].
    #[arg(long, env = "ZIMAGE_QUEUE")]
    queue: String,
    /// A job whose worker has not renewed its claim for this many milliseconds (the process died)
    /// is run again by another worker; live workers renew every third of it.
    #[arg(long, default_value_t = 30_000)]
    claim_idle_ms: u64,
    /// A job running longer is stopped and fails with a reason; 0: no bound.
    #[arg(long, default_value_t = 600)]
    job_timeout_secs: u64,
    /// Load no model: every job waits this many milliseconds and returns a grey image (for
    /// measuring the queue at scale, docs/SCALE.md).
    #[arg(long)]
    simulate_job_ms: Option<u64>,
    /// The LoRA folder: the same files as the front ends' (a job names each LoRA with its sha256;
    /// a worker without that file fails the job, saying so).
    #[arg(long, env = "ZIMAGE_LORA_DIR", default_value = "data/loras")]
    lora_dir: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
}

/// Largest input image accepted: 16k per side and 512 MiB decoded.
pub fn image_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(16384);
    l.max_image_height = Some(16384);
    l.max_alloc = Some(512 * 1024 * 1024);
    l
}

/// Decodes an input image with size limits; the error says what was wrong.
pub fn read_input_image(path: &Path) -> Result<image::RgbImage> {
    let mut reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if reader.format().is_none() {
        bail!("{} is not an image (PNG, JPEG or WebP expected)", path.display());
    }
    reader.limits(image_limits());
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => {
            anyhow::anyhow!("{} is too large to process ({l}); the limit is 16384 px per side", path.display())
        }
        e => anyhow::anyhow!("{} could not be decoded as an image: {e}", path.display()),
    })?;
    Ok(img.to_rgb8())
}

fn load_noise(path: &Path) -> Result<candle_core::Tensor> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot read noise file {}", path.display()))?;
    match tensors.len() {
        1 => Ok(tensors.into_values().next().expect("one tensor")),
        0 => bail!("{} holds no tensor", path.display()),
        _ => tensors
            .get("noise")
            .cloned()
            .with_context(|| format!("{} holds several tensors and none is named `noise`", path.display())),
    }
}

fn output_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn generate(args: GenerateArgs) -> Result<()> {
    let init = args.image.as_deref().map(read_input_image).transpose()?;
    let (dw, dh) = match &init {
        Some(img) => ((img.width() as usize / 16 * 16).max(16), (img.height() as usize / 16 * 16).max(16)),
        None => (1024, 1024),
    };
    // One seed range for the CLI, the studio and every API: 0..=4294967295 (u32).
    const MAX_SEED: u64 = u32::MAX as u64;
    let n = args.n.max(1) as u64;
    let seed = match args.seed {
        Some(s) if s > MAX_SEED || s + (n - 1) > MAX_SEED => {
            bail!("the seed must be between 0 and {} (with --n {n}, at most {})", MAX_SEED, MAX_SEED - (n - 1))
        }
        Some(s) => s,
        None => rand_seed() % (MAX_SEED - n + 2),
    };
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width.unwrap_or(dw),
        height: args.height.unwrap_or(dh),
        steps: args.steps,
        seed,
        n: args.n,
        guidance_scale: args.guidance_scale,
        cfg_normalization: args.cfg_normalization,
        cfg_truncation: args.cfg_truncation,
        init_image: init,
        strength: args.strength,
        noise: args.noise.as_deref().map(load_noise).transpose()?,
        preview: args.preview_dir.is_some(),
        variation: args.variation,
        variation_seed: args.variation_seed,
    };
    req.validate()?;
    let loras = lora_cli::read_specs(&args.loras)?;
    let device = pick_device(&args.model.device)?;
    let source = args.model.source(!device.is_cpu());
    eprintln!("model: {} on {:?}", source.display_name(), device);
    if device.is_cpu() {
        warn_full_size_on_cpu(&source);
    }
    web::startup::download_if_missing(&source, &|_| {})?;
    let t = Instant::now();
    let mut opts = args.model.load_options(&device);
    // With LoRAs, quantized layers are quantized after the merge, from the merged dense weights
    // (the quality of merge-then-quantize); the dense model is then held until the merge is done.
    let quantize_after = opts.quantization;
    if !loras.is_empty() {
        opts.quantization = engine::ops::Quantization::None;
    }
    let mut pipe = Pipeline::load_with_options(&source, &device, engine::pipeline::default_dtype(&device), opts)?;
    if !loras.is_empty() {
        drop(lora_cli::apply(&mut pipe, &loras)?); // drops the base weights: a CLI run never reverts
        pipe.quantize(quantize_after)?;
    }
    eprintln!("loaded in {:.2?}{}", t.elapsed(), match pipe.quantization() {
        engine::ops::Quantization::Fp8 => " (transformer in FP8)",
        engine::ops::Quantization::Int8 => " (transformer in INT8)",
        engine::ops::Quantization::None => "",
    });
    if pipe.is_tiny() {
        eprintln!("note: the tiny model has random weights; its images are patterns, not pictures");
    }
    if let Some(d) = &args.preview_dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg}").expect("template"),
    );
    let mut preview_err = None;
    let mut steps_run = 0u32;
    let out = pipe.generate(&req, &mut |ev| {
        steps_run = ev.total as u32;
        bar.set_length(ev.total as u64);
        bar.set_position(ev.step as u64);
        bar.set_message(format!("sigma {:.3}, {:.2?}", ev.sigma, ev.elapsed));
        if let (Some(dir), Some(p)) = (&args.preview_dir, ev.preview) {
            if let Err(e) = p.save(dir.join(format!("step-{:02}.png", ev.step))) {
                preview_err = Some(e);
            }
        }
        Control::Continue
    })?;
    bar.finish();
    if let Some(e) = preview_err {
        eprintln!("warning: could not write a preview: {e}");
    }
    if let Some(n) = out.prompt_truncated {
        eprintln!("warning: the prompt is {n} tokens with its template; it was truncated to 512 tokens as the reference does");
    }
    for (i, (img, seed)) in out.images.iter().zip(&out.seeds).enumerate() {
        let params = engine::png_meta::Parameters {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            steps: req.steps,
            seed: *seed,
            width: img.width(),
            height: img.height(),
            model: pipe.model_name().to_string(),
            strength: req.init_image.as_ref().map(|_| req.strength),
            guidance_scale: req.guidance_scale,
            loras: loras
                .iter()
                .map(|(f, scale)| engine::png_meta::LoraUse {
                    name: f.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                    scale: *scale,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            variation: Some((req.variation_seed_of(i), req.variation)),
        };
        let path = output_path(&args.out, i, out.images.len());
        let bytes = engine::png_meta::encode_png(img, &params)?;
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        println!("seed {seed}: {}", path.display());
    }
    let tm = &out.timings;
    eprintln!(
        "time: text encoding {:.1?}, vae encode {:.1?}, denoising {:.1?} ({:.1?}/step), vae decode {:.1?}, total {:.1?}",
        tm.text_encoding,
        tm.vae_encode,
        tm.denoising,
        tm.denoising / steps_run.max(1),
        tm.vae_decode,
        tm.total
    );
    Ok(())
}

pub fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() & u32::MAX as u64 // the seed range the studio and the APIs use
}

fn main() {
    // The driver caches the kernels it compiles from PTX on disk; its default cap (256 MiB) is
    // below what candle's and our modules take for one card, which would recompile them at every
    // start. Set before any CUDA call, while the process is single-threaded.
    if std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
        std::env::set_var("CUDA_CACHE_MAXSIZE", "4294967296");
    }
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Tiny { out } => engine::tiny::write_dir(&out)
            .map(|_| println!("wrote the tiny model to {}", out.display()))
            .map_err(Into::into),
        Command::Info { file } => info(&file),
        Command::Serve(a) => serve(a),
        Command::Worker(a) => worker(a),
        Command::Bench(a) => bench::run(a),
        Command::Lora(a) => lora_cli::run(a),
        Command::Enhance(a) => enhance_cli::enhance(a),
        Command::Parity(a) => parity::run(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn info(file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    match engine::png_meta::read_parameters(&bytes) {
        Some(p) => {
            println!("{p}");
            Ok(())
        }
        None => bail!("{} has no `parameters` text chunk", file.display()),
    }
}

/// glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
/// large request bodies and decoded images come from the heap and leave it fragmented: under the
/// load harness the server's resident memory grew 20-25 MiB a round without levelling off
/// (218 -> 307 MiB over 5 rounds). A fixed threshold keeps every block of 1 MiB and more in its
/// own mapping, returned to the system when freed (68 -> 77 MiB over the same rounds).
fn bound_heap_fragmentation() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called before the server's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    bound_heap_fragmentation();
    let devices = serve_devices(&a.devices)?;
    let on_gpu = devices.iter().any(|(d, _)| !d.is_cpu());
    let source = a.model.source(on_gpu);
    if !on_gpu && a.queue.is_none() && a.simulate_job_ms.is_none() {
        warn_full_size_on_cpu(&source);
    }
    let model = a.model.clone();
    let data_dir = a.data_dir.clone();
    let lora_dir = a.lora_dir.clone().unwrap_or_else(|| data_dir.join("loras"));
    let keep_dense = folder_has_loras(&lora_dir);
    web::serve(web::ServeOptions {
        addr: a.addr,
        model: source,
        devices,
        load_options: Box::new(move |d| engine::pipeline::LoadOptions { keep_dense_for_lora: keep_dense, ..model.load_options(d) }),
        data_dir: a.data_dir,
        frame_ancestors: a.frame_ancestors,
        site_root: a.site_root,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        limits: web::StudioLimits {
            queue: web::QueueLimits {
                capacity: a.queue_capacity,
                max_per_client: a.max_queued_per_client,
                job_timeout: (a.job_timeout_secs > 0).then(|| secs(a.job_timeout_secs)),
            },
            submissions_per_minute: a.submissions_per_minute,
        },
        timeouts: web::Timeouts {
            header_read: secs(a.header_timeout_secs.max(1)),
            body: secs(a.body_timeout_secs.max(1)),
            ws_idle: secs(a.ws_idle_secs.max(1)),
            drain: secs(a.drain_timeout_secs),
        },
        queue_url: a.queue,
        simulate_job: a.simulate_job_ms.map(std::time::Duration::from_millis),
        claim_idle: std::time::Duration::from_millis(a.claim_idle_ms.max(100)),
        lora_dir,
    })
}

fn worker(a: WorkerArgs) -> Result<()> {
    bound_heap_fragmentation();
    let opts = web::WorkerOptions {
        url: a.queue.clone(),
        claim_idle: std::time::Duration::from_millis(a.claim_idle_ms.max(100)),
        job_timeout: (a.job_timeout_secs > 0).then(|| secs(a.job_timeout_secs)),
    };
    if let Some(ms) = a.simulate_job_ms {
        let generator = web::SimulatedGenerator { job_time: std::time::Duration::from_millis(ms) };
        return web::run_worker(opts, generator.label(), std::sync::Arc::new(generator));
    }
    let device = pick_device(&a.model.device)?;
    let label = if device.is_cpu() { "CPU".to_string() } else { a.model.device.clone() };
    let load_options = engine::pipeline::LoadOptions { keep_dense_for_lora: folder_has_loras(&a.lora_dir), ..a.model.load_options(&device) };
    let source = a.model.source(!device.is_cpu());
    web::startup::download_if_missing(&source, &|_| {})?;
    let pipe = web::load_pipeline(&source, device, &label, load_options, &|_| {})?;
    let loras = std::sync::Arc::new(engine::lora::LoraLibrary::new(a.lora_dir));
    web::run_worker(opts, label, std::sync::Arc::new(web::PipelineGenerator::new(pipe, loras)))
}

/// Whether the LoRA folder holds any file at start: a quantized model then keeps its dense block
/// weights so LoRAs merge into them (merge-then-quantize quality; 12 GB at full size, on the GPU
/// when it has room, see `engine::pipeline::dense_copy_device`). Files added later merge into
/// the dequantized weights.
fn folder_has_loras(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| e.path().extension().is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))))
        .unwrap_or(false)
}

fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

/// `auto`, `cpu` or `cuda:0,cuda:1,...` -> the devices with their labels for the studio.
fn serve_devices(spec: &str) -> Result<Vec<(candle_core::Device, String)>> {
    let mut out = Vec::new();
    match spec.trim() {
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                for i in 0..64 {
                    match open_cuda(i) {
                        Ok(d) => out.push((d, format!("CUDA GPU {i}"))),
                        Err(_) => break,
                    }
                }
            }
            if out.is_empty() {
                out.push((candle_core::Device::Cpu, "CPU".to_string()));
            }
        }
        list => {
            for item in list.split(',').map(str::trim) {
                let device = pick_device(item).with_context(|| format!("--devices: `{item}`"))?;
                let label = match item {
                    "cpu" => "CPU".to_string(),
                    s => format!("CUDA GPU {}", s.strip_prefix("cuda:").unwrap_or("0")),
                };
                if out.iter().any(|(_, l)| *l == label) {
                    bail!("--devices names {label} twice");
                }
                out.push((device, label));
            }
        }
    }
    Ok(out)
}
