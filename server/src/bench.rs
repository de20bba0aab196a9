//! `zimage bench`: times a request stage by stage (text encoding, every denoising step, VAE
//! decode, PNG encoding, the whole prompt-to-PNG-bytes request) over several runs and sizes, and
//! prints JSON. Device work is synchronized before each clock read so GPU times are real.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::pipeline::{default_dtype, Control, GenerateRequest, Pipeline};
use serde::Serialize;

#[derive(Args)]
pub struct BenchArgs {
    /// `tiny`, `random` (full-size architecture, random weights on the device), a folder or a hub id.
    #[arg(long, default_value = "tiny")]
    model: String,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Comma-separated WxH sizes.
    #[arg(long, default_value = "256x256")]
    sizes: String,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Timed runs per size (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "a photo of a red fox in fresh snow, golden hour, 85mm")]
    prompt: String,
    /// Also write the JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Instead of whole requests, time the single operations one transformer block is made of, at
    /// the real 1024x1024 shapes (4224 tokens, dim 3840), to see where a step's time goes.
    #[arg(long)]
    ops: bool,
}

#[derive(Serialize)]
struct Run {
    text_encoding_ms: f64,
    steps_ms: Vec<f64>,
    denoising_ms: f64,
    vae_decode_ms: f64,
    png_encode_ms: f64,
    /// Prompt in, PNG bytes out.
    total_ms: f64,
}

#[derive(Serialize)]
struct SizeReport {
    width: usize,
    height: usize,
    steps: usize,
    runs: Vec<Run>,
    median_total_ms: f64,
    median_step_ms: f64,
    median_text_encoding_ms: f64,
    median_vae_decode_ms: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    dtype: String,
    load_ms: f64,
    sizes: Vec<SizeReport>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: BenchArgs) -> Result<()> {
    let device = crate::pick_device(&a.device)?;
    let dtype = default_dtype(&device);
    if a.ops {
        return op_profile(&device, dtype);
    }
    let t = Instant::now();
    let pipe = if a.model == "random" {
        Pipeline::random_full_size(&device, dtype)?
    } else {
        Pipeline::load(&engine::loader::ModelSource::parse(&a.model), &device)?
    };
    device.synchronize()?;
    let load_ms = ms(t.elapsed());
    let mut sizes = Vec::new();
    for size in a.sizes.split(',') {
        let (w, h) = size
            .split_once('x')
            .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
            .with_context(|| format!("size `{size}` is not WxH"))?;
        let req = GenerateRequest { prompt: a.prompt.clone(), width: w, height: h, steps: a.steps, seed: 1, ..Default::default() };
        req.validate()?;
        let mut runs = Vec::new();
        for i in 0..=a.runs {
            let run = one_run(&pipe, &req, &device)?;
            eprintln!("{w}x{h} run {i}{}: total {:.1} ms", if i == 0 { " (warm-up)" } else { "" }, run.total_ms);
            if i > 0 {
                runs.push(run);
            }
        }
        sizes.push(SizeReport {
            width: w,
            height: h,
            steps: a.steps,
            median_total_ms: median(runs.iter().map(|r| r.total_ms).collect()),
            median_step_ms: median(runs.iter().flat_map(|r| r.steps_ms.clone()).collect()),
            median_text_encoding_ms: median(runs.iter().map(|r| r.text_encoding_ms).collect()),
            median_vae_decode_ms: median(runs.iter().map(|r| r.vae_decode_ms).collect()),
            runs,
        });
    }
    let report = Report { model: pipe.model_name().into(), device: format!("{device:?}"), dtype: format!("{dtype:?}"), load_ms, sizes };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(p) = &a.out {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn one_run(pipe: &Pipeline, req: &GenerateRequest, device: &candle_core::Device) -> Result<Run> {
    device.synchronize()?;
    let start = Instant::now();
    let mut last = None;
    let mut steps_ms = Vec::new();
    let out = pipe.generate(req, &mut |_ev| {
        let _ = device.synchronize();
        let now = Instant::now();
        if let Some(prev) = last.replace(now) {
            steps_ms.push(ms(now - prev));
        }
        Control::Continue
    })?;
    let t = Instant::now();
    let params = engine::png_meta::Parameters {
        prompt: req.prompt.clone(),
        negative_prompt: String::new(),
        steps: req.steps,
        seed: req.seed,
        width: req.width as u32,
        height: req.height as u32,
        model: pipe.model_name().into(),
        strength: None,
        guidance_scale: 0.0,
    };
    let bytes = engine::png_meta::encode_png(&out.images[0], &params)?;
    let png_encode_ms = ms(t.elapsed());
    let total_ms = ms(start.elapsed());
    anyhow::ensure!(!bytes.is_empty());
    // The first step's time is the denoising total minus the others (its start is not observed).
    let denoising_ms = ms(out.timings.denoising);
    let rest: f64 = steps_ms.iter().sum();
    steps_ms.insert(0, (denoising_ms - rest).max(0.0));
    Ok(Run {
        text_encoding_ms: ms(out.timings.text_encoding),
        steps_ms,
        denoising_ms,
        vae_decode_ms: ms(out.timings.vae_decode),
        png_encode_ms,
        total_ms,
    })
}

/// Median time of `f` over 20 runs after 3 warm-ups, with a device synchronize around each.
fn time_op(device: &candle_core::Device, mut f: impl FnMut() -> candle_core::Result<candle_core::Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut v = Vec::new();
    for _ in 0..20 {
        device.synchronize()?;
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        v.push(ms(t.elapsed()));
    }
    Ok(median(v))
}

/// Per-op times of one joint block at 1024x1024 (L = 4224, dim 3840, 30 heads of 128, FFN 10240),
/// with how often each runs per block, so their sum can be set against the measured step.
fn op_profile(device: &candle_core::Device, dtype: candle_core::DType) -> Result<()> {
    use candle_core::Tensor;
    let (l, d, h, hd, f) = (4224usize, 3840usize, 30usize, 128usize, 10240usize);
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, device).and_then(|t| t.to_dtype(dtype));
    let x = r(&[1, l, d])?;
    let w_dd = r(&[d, d])?;
    let w_fd = r(&[f, d])?;
    let w_df = r(&[d, f])?;
    let hidden = r(&[1, l, f])?;
    let norm_w = r(&[d])?;
    let head_w = r(&[hd])?;
    let modv = r(&[1, 1, d])?;
    let q4 = r(&[1, l, h, hd])?;
    let cos = Tensor::randn(0f32, 1.0, (l, hd / 2), device)?;
    let sin = Tensor::randn(0f32, 1.0, (l, hd / 2), device)?;
    let x2 = x.reshape((l, d))?;
    let mut rows: Vec<(&str, usize, f64)> = vec![
        ("matmul L x 3840 x 3840 (q, k, v, out)", 4, time_op(device, || x2.matmul(&w_dd.t()?))?),
        ("matmul L x 3840 -> 10240 (w1, w3)", 2, time_op(device, || x2.matmul(&w_fd.t()?))?),
        ("matmul L x 10240 -> 3840 (w2)", 1, time_op(device, || hidden.reshape((l, f))?.matmul(&w_df.t()?))?),
        ("rms_norm (L, 3840)", 4, time_op(device, || candle_nn::ops::rms_norm(&x, &norm_w, 1e-5))?),
        ("rms_norm per head (L, 30, 128)", 2, time_op(device, || candle_nn::ops::rms_norm(&q4, &head_w, 1e-5))?),
        ("broadcast_mul (L, 3840) x (1, 3840)", 4, time_op(device, || x.broadcast_mul(&modv))?),
        ("add (L, 3840)", 2, time_op(device, || &x + &x)?),
        ("silu (L, 10240)", 1, time_op(device, || hidden.silu())?),
        ("mul (L, 10240)", 1, time_op(device, || &hidden * &hidden)?),
        ("rope: transpose + f32 + rope_i + cast back", 2, time_op(device, || {
            let t = q4.transpose(1, 2)?.to_dtype(candle_core::DType::F32)?.contiguous()?;
            candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?.to_dtype(dtype)
        })?),
        ("transpose (B, L, H, D) <-> (B, H, L, D) copy", 2, time_op(device, || q4.transpose(1, 2)?.contiguous())?),
    ];
    let qt = q4.transpose(1, 2)?.contiguous()?;
    rows.push(("attention (1, 30, 4224, 128)", 1, time_op(device, || engine::ops::attention(&qt, &qt, &qt))?));
    let mut total = 0.0;
    for (name, n, t) in &rows {
        total += *n as f64 * t;
        eprintln!("{name:48} x{n}  {t:8.3} ms  -> {:8.3} ms/block", *n as f64 * t);
    }
    eprintln!("sum per block {total:.2} ms; x 32 blocks = {:.1} ms per step (plus the caption refiners)", total * 32.0);
    let json: Vec<serde_json::Value> =
        rows.iter().map(|(n, c, t)| serde_json::json!({"op": n, "per_block": c, "ms": t})).collect();
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
