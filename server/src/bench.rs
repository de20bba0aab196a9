//! `zimage bench`: times a request stage by stage (text encoding, every denoising step, VAE
//! decode, PNG encoding, the whole prompt-to-PNG-bytes request) over several runs and sizes, and
//! prints JSON. Device work is synchronized before each clock read so GPU times are real.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::pipeline::{default_dtype, Control, GenerateRequest, LoadOptions, Pipeline};
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
    /// Precision of the transformer's block linears: auto (FP8 on GPUs with FP8 matmuls), fp8, int8, bf16.
    #[arg(long, default_value = "auto")]
    precision: engine::pipeline::Precision,
    /// Same as `--precision fp8`.
    #[arg(long, conflicts_with = "precision")]
    fp8: bool,
    /// Run steps as kernel launches instead of CUDA graph replays.
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Decode latents larger than a VAE tile in tiles even where the GPU has memory for the
    /// whole decode (the default decodes those in one piece).
    #[arg(long)]
    vae_tiled: bool,
    /// Encode each prompt one text-encoder layer at a time from the weights (see `serve`).
    #[arg(long)]
    free_text_encoder: bool,
    /// Instead of timing: check the fused kernels against the candle ops they replace (and the
    /// INT8 kernels against the CPU reference arithmetic), then generate one image per size in
    /// bf16 and again after FP8 and after INT8 quantization of the same weights (same seed) and
    /// report the latents' relative error and the images' PSNR against bf16.
    #[arg(long)]
    check: bool,
    /// Apply a LoRA before timing (repeatable, FILE[:SCALE]); the JSON gains apply_ms/revert_ms.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// Instead of images: time the prompt enhancer (the text encoder as a causal LM, greedy, with
    /// the KV cache): first-token latency and new tokens per second, as JSON.
    #[arg(long)]
    enhance: bool,
    /// New tokens per enhancer run (`--enhance`).
    #[arg(long, default_value_t = 200)]
    new_tokens: usize,
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
    /// Largest device memory in use seen at a step boundary (CUDA only).
    memory_at_steps_mib: Option<f64>,
    /// Where the memory went (CUDA only): at the last step boundary with the high marks of the
    /// text encoding and the steps, then after the VAE decode with the high marks of the decode.
    memory_detail: Option<MemoryPhases>,
}

#[derive(Serialize)]
struct MemoryPhases {
    steps: Option<engine::device::MemoryBreakdown>,
    vae_decode: Option<engine::device::MemoryBreakdown>,
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
    fp8: bool,
    /// FP8 activation scales: "per row" or "per tensor" (absent when not FP8).
    fp8_scaling: Option<String>,
    /// The block linears' format: none (the dtype), fp8 or int8.
    quantization: String,
    /// The attention kernel the transformer ran.
    attention: String,
    /// Whether denoiser steps and text encodings replayed as CUDA graphs.
    cuda_graphs: bool,
    text_encoder_resident: bool,
    load_ms: f64,
    /// Device memory in use after loading (CUDA only, whole device).
    memory_after_load_mib: Option<f64>,
    /// The same after each loading stage (start, transformer, text encoder, vae).
    load_memory_mib: Vec<(String, f64)>,
    /// The same stages split by owner (pool, graphs, the rest; CUDA only).
    load_memory_detail: Vec<(String, engine::device::MemoryBreakdown)>,
    sizes: Vec<SizeReport>,
    /// With --lora: the time to merge the set into the weights, and to put the base back.
    lora: Option<LoraTimes>,
}

#[derive(Serialize)]
struct LoraTimes {
    files: Vec<String>,
    layers_patched: usize,
    apply_ms: f64,
    revert_ms: f64,
    /// Device memory in use with the set applied (the base weights of patched layers are kept).
    memory_applied_mib: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// "1024x1024,2048x2048" -> [(1024, 1024), (2048, 2048)].
fn parse_sizes(spec: &str) -> Result<Vec<(usize, usize)>> {
    spec.split(',')
        .map(|size| {
            size.split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
                .with_context(|| format!("size `{size}` is not WxH"))
        })
        .collect()
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: BenchArgs) -> Result<()> {
    let device = crate::pick_device(&a.device)?;
    let dtype = default_dtype(&device);
    if a.enhance {
        return crate::enhance_cli::bench(&a.model, &a.device, &a.prompt, a.new_tokens, a.runs, a.out.as_deref());
    }
    if a.ops {
        return op_profile(&device, dtype);
    }
    let precision = if a.fp8 { engine::pipeline::Precision::Fp8 } else { a.precision };
    let opts = LoadOptions {
        quantization: if a.check { engine::ops::Quantization::None } else { precision.quantization_on(&device) },
        free_text_encoder: a.free_text_encoder,
        cuda_graphs: LoadOptions::default().cuda_graphs && !a.no_cuda_graphs,
        // as `serve` with a LoRA folder: merges start from the dense weights
        keep_dense_for_lora: !a.loras.is_empty(),
    };
    let t = Instant::now();
    let mut pipe = if a.model == "random" {
        Pipeline::random_full_size(&device, dtype, opts)?
    } else {
        Pipeline::load_with_options(&engine::loader::ModelSource::parse(&a.model), &device, dtype, opts)?
    };
    device.synchronize()?;
    let load_ms = ms(t.elapsed());
    let memory_after_load_mib = engine::pipeline::device_memory_used_mib(&device);
    if a.check {
        return check(&mut pipe, &a, &device);
    }
    if a.vae_tiled {
        pipe.set_tiling(engine::vae::TilingOptions { untiled_when_memory_allows: false, ..Default::default() });
    }
    let loras = crate::lora_cli::read_specs(&a.loras)?;
    let applied = if loras.is_empty() {
        None
    } else {
        let set: Vec<(&engine::lora::LoraFile, f32)> = loras.iter().map(|(f, s)| (f, *s)).collect();
        let mut patcher = engine::lora::LoraPatcher::new();
        let t = Instant::now();
        let rep = patcher.set(&mut pipe, &set)?;
        device.synchronize()?;
        let apply_ms = ms(t.elapsed());
        for w in &rep.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("LoRA applied: {} layers in {apply_ms:.1} ms", rep.layers);
        Some((patcher, rep.layers, apply_ms, engine::pipeline::device_memory_used_mib(&device)))
    };
    let mut sizes = Vec::new();
    for (w, h) in parse_sizes(&a.sizes)? {
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
    let lora = match applied {
        Some((mut patcher, layers_patched, apply_ms, memory_applied_mib)) => {
            let t = Instant::now();
            patcher.revert(&mut pipe);
            device.synchronize()?;
            Some(LoraTimes { files: a.loras.clone(), layers_patched, apply_ms, revert_ms: ms(t.elapsed()), memory_applied_mib })
        }
        None => None,
    };
    let report = Report {
        lora,
        model: pipe.model_name().into(),
        device: format!("{device:?}"),
        dtype: format!("{dtype:?}"),
        fp8: pipe.is_fp8(),
        fp8_scaling: pipe.fp8_scaling().map(|s| s.name().to_string()),
        quantization: pipe.quantization().name().into(),
        attention: pipe.attention_kernel().name().into(),
        cuda_graphs: pipe.uses_cuda_graphs(),
        text_encoder_resident: pipe.text_encoder_resident(),
        load_ms,
        memory_after_load_mib,
        load_memory_mib: pipe.load_memory_mib(),
        load_memory_detail: pipe.load_memory_breakdowns().to_vec(),
        sizes,
    };
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
    let mut mem_max: Option<f64> = None;
    let mut mem_steps = None;
    engine::pipeline::reset_device_memory_highs(device);
    let out = pipe.generate(req, &mut |ev| {
        let _ = device.synchronize();
        if let Some(m) = engine::pipeline::device_memory_used_mib(device) {
            mem_max = Some(mem_max.map_or(m, |v: f64| v.max(m)));
        }
        if ev.step == ev.total {
            // What the steps held; the marks start again for the decode.
            mem_steps = engine::pipeline::device_memory_breakdown(device);
            engine::pipeline::reset_device_memory_highs(device);
        }
        let now = Instant::now();
        if let Some(prev) = last.replace(now) {
            steps_ms.push(ms(now - prev));
        }
        Control::Continue
    })?;
    device.synchronize()?;
    let mem_vae = engine::pipeline::device_memory_breakdown(device);
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
        loras: vec![],
        variation: None,
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
        memory_at_steps_mib: mem_max,
        memory_detail: (mem_steps.is_some() || mem_vae.is_some()).then_some(MemoryPhases { steps: mem_steps, vae_decode: mem_vae }),
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
    let mut rows: Vec<(std::borrow::Cow<str>, usize, f64)> = [
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
    ]
    .into_iter()
    .map(|(name, n, t): (&'static str, usize, f64)| (name.into(), n, t))
    .collect();
    rows.push(("attention (1, 4224, 30, 128)".into(), 1, time_op(device, || engine::ops::attention(&q4, &q4, &q4))?));
    let qkv = r(&[1, l, 3 * h, hd])?;
    let (qv, kv, vv) = (qkv.narrow(2, 0, h)?, qkv.narrow(2, h, h)?, qkv.narrow(2, 2 * h, h)?);
    rows.push(("attention on qkv views (x0: shown, not summed)".into(), 0, time_op(device, || engine::ops::attention(&qv, &kv, &vv))?));
    rows.push(("fused qk norm + rope (1, 4224, 30, 128)".into(), 2, time_op(device, || engine::ops::qk_norm_rope(&q4, None, &cos, &sin))?));
    // FlashAttention-3's FP8 path on the same qkv product (x0: the alternative to the rows above).
    #[cfg(feature = "flash-attn-v3-fp8")]
    if device.is_cuda() && dtype == candle_core::DType::BF16 && engine::cuda::compute_capability(&qkv)?.0 == 9 {
        let norm_vb = candle_nn::VarBuilder::from_tensors([("weight".to_string(), (head_w.abs()? + 0.5)?)].into_iter().collect(), dtype, device);
        let norm = engine::ops::RmsNorm::new(hd, 1e-5, norm_vb)?;
        let kernel = engine::ops::AttentionKernel::FlashAttention3Fp8;
        let q_e4m3 = || engine::cuda::qk_norm_rope_e4m3(&qkv, h, h, norm.weight(), norm.weight(), 1e-5, &cos, &sin);
        let (q8, k8, dq, dk, v_amax) = q_e4m3()?.ok_or_else(|| anyhow::anyhow!("qk_norm_rope_e4m3 refused the qkv product"))?;
        let (v8, dv) = engine::cuda::quantize_e4m3_heads(&vv, Some(&v_amax))?.ok_or_else(|| anyhow::anyhow!("quantize_e4m3_heads refused the v view"))?;
        rows.push(("FP8 attention, whole (qk norm+rope->E4M3, v->E4M3, FA3 e4m3) (x0)".into(), 0, time_op(device, || {
            engine::ops::attention_qkv_fp8(kernel, &qkv, h, h, Some(&norm), Some(&norm), &cos, &sin)?.ok_or_else(|| candle_core::Error::Msg("refused".into()))
        })?));
        rows.push(("  FA3 e4m3 kernel alone (x0)".into(), 0, time_op(device, || engine::flash_fp8::flash_attn_e4m3(&q8, &k8, &v8, &dq, &dk, &dv))?));
        rows.push(("  qk norm + rope -> E4M3, q and k heads, v amax (x0)".into(), 0, time_op(device, || q_e4m3().and_then(|o| o.map(|o| o.0).ok_or_else(|| candle_core::Error::Msg("refused".into()))))?));
        rows.push(("  v view -> E4M3 per tensor, amax given (x0)".into(), 0, time_op(device, || engine::cuda::quantize_e4m3_heads(&vv, Some(&v_amax)).and_then(|o| o.map(|o| o.0).ok_or_else(|| candle_core::Error::Msg("refused".into()))))?));
    }
    {
        use engine::fp8::{Fp8Context, Fp8Weight, QuantizedActivation};
        // The block's FP8 products as the model runs them (q|k|v fused, w1|w3 fused, out, w2;
        // activations scaled as the context scales them: the unit-scale products of the folded
        // row scales are these same per-tensor products), with cuBLASLt's first heuristic pick
        // (x0: shown, not summed) and autotuned.
        let w_qkv = r(&[3 * d, d])?;
        let w_13 = r(&[2 * f, d])?;
        rows.push(("fp8 quantize activation (L, 3840)".into(), 2, time_op(device, || QuantizedActivation::new(&x2).map(|q| q.q))?));
        for autotune in [false, true] {
            let ctx = Fp8Context::with_autotune(device, autotune)?;
            let q = |w: &Tensor| Fp8Weight::quantize(w, &ctx);
            let (f_qkv, f_13, f_dd, f_df) = (q(&w_qkv)?, q(&w_13)?, q(&w_dd)?, q(&w_df)?);
            let (xq, hq) = (ctx.quantize_activation(&x2)?, ctx.quantize_activation(&hidden.reshape((l, f))?)?);
            let (n, pick) = if autotune { (1, "tuned") } else { (0, "heuristic") };
            for (name, w, x) in [
                ("fp8 matmul L x 3840 -> 11520 (qkv)", &f_qkv, &xq),
                ("fp8 matmul L x 3840 -> 20480 (w1|w3)", &f_13, &xq),
                ("fp8 matmul L x 3840 x 3840 (out)", &f_dd, &xq),
                ("fp8 matmul L x 10240 -> 3840 (w2)", &f_df, &hq),
            ] {
                rows.push((format!("{name}, {pick}").into(), n, time_op(device, || w.matmul(x, dtype))?));
            }
        }
        let gate_up = r(&[l, 2 * f])?;
        rows.push(("fused swiglu + amax + quantize (L, 2 x 10240)".into(), 1, time_op(device, || {
            #[cfg(feature = "cuda")]
            if device.is_cuda() {
                return engine::cuda::swiglu_quantized(&gate_up).map(|t| t.0);
            }
            let g = gate_up.narrow(1, 0, f)?;
            g.silu()? * gate_up.narrow(1, f, f)?
        })?));
        // The row-scaled FP8 path's fused kernels (x0: shown beside the per-tensor rows above, not
        // summed).
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let nw = (r(&[d])?.abs()? + 0.5)?;
            rows.push(("fp8 rms_norm -> E4M3 per row, one kernel (L, 3840)".into(), 0, time_op(device, || {
                engine::cuda::rms_norm_e4m3_rows(&x2, &nw, 1e-6)?.map(|t| t.0).ok_or_else(|| candle_core::Error::Msg("refused".into()))
            })?));
            rows.push(("fp8 swiglu -> E4M3 per row, one kernel (L, 2 x 10240)".into(), 0, time_op(device, || {
                engine::cuda::swiglu_e4m3_rows(&gate_up, None)?.map(|t| t.0).ok_or_else(|| candle_core::Error::Msg("refused".into()))
            })?));
        }
        // The INT8 path's products and quantizations at the same shapes (x0: shown beside the
        // FP8 rows, not summed into the block).
        use engine::int8::{Int8Activation, Int8Context, Int8Weight};
        let ctx = Int8Context::new(device)?;
        let q = |w: &Tensor| Int8Weight::quantize(w, &ctx);
        let (i_qkv, i_13, i_dd, i_df) = (q(&w_qkv)?, q(&w_13)?, q(&w_dd)?, q(&w_df)?);
        let (xi, hi) = (Int8Activation::new(&x2)?, Int8Activation::new(&hidden.reshape((l, f))?)?);
        rows.push(("int8 quantize activation per row (L, 3840)".into(), 0, time_op(device, || Int8Activation::new(&x2).map(|q| q.q))?));
        for (name, w, x) in [
            ("int8 matmul L x 3840 -> 11520 (qkv)", &i_qkv, &xi),
            ("int8 matmul L x 3840 -> 20480 (w1|w3)", &i_13, &xi),
            ("int8 matmul L x 3840 x 3840 (out)", &i_dd, &xi),
            ("int8 matmul L x 10240 -> 3840 (w2)", &i_df, &hi),
        ] {
            rows.push((name.into(), 0, time_op(device, || w.matmul(x, dtype))?));
        }
    }
    vae_profile(device, dtype)?;
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

#[derive(Serialize)]
struct KernelCheck {
    name: String,
    relative_l2: f32,
}

#[derive(Serialize)]
struct QualityReport {
    width: usize,
    height: usize,
    steps: usize,
    latents_relative_l2: f32,
    image_psnr_db: f64,
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let mse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// The fused kernels against the candle ops they replace (on the bench device, at the 1024x1024
/// shapes), then FP8 quality against bf16 with the same weights and seed.
fn check(pipe: &mut Pipeline, a: &BenchArgs, device: &candle_core::Device) -> Result<()> {
    use candle_core::{DType, Tensor};
    use engine::fp8::{relative_l2, Fp8Context, Fp8Weight, QuantizedActivation};
    let dtype = pipe.dtype();
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, device).and_then(|t| t.to_dtype(dtype));
    let mut kernels = Vec::new();
    let (l, d, h, hd, f) = (4224usize, 3840usize, 30usize, 128usize, 10240usize);
    let q4 = (r(&[1, l, h, hd])? * 3.0)?;
    let half = hd / 2;
    let angles = Tensor::randn(0f32, 3.0, (l, half), device)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let norm_vb = candle_nn::VarBuilder::from_tensors(
        [("weight".to_string(), (r(&[hd])?.abs()? + 0.5)?)].into_iter().collect(),
        dtype,
        device,
    );
    let norm = engine::ops::RmsNorm::new(hd, 1e-5, norm_vb)?;
    let fused = engine::ops::qk_norm_rope(&q4, Some(&norm), &cos, &sin)?;
    let composed = engine::ops::qk_norm_rope_composed(&q4, Some(&norm), &cos, &sin)?;
    kernels.push(KernelCheck { name: "qk_norm_rope fused vs candle ops".into(), relative_l2: relative_l2(&fused, &composed)? });
    // The same on a head-range view of a fused qkv product (read in place by the kernel), and
    // attention (flash kernels on CUDA) on such views against the composed softmax.
    let qkv = (r(&[1, l, 3 * h, hd])? * 3.0)?;
    let k_view = qkv.narrow(2, h, h)?;
    let fused = engine::ops::qk_norm_rope(&k_view, Some(&norm), &cos, &sin)?;
    let composed = engine::ops::qk_norm_rope_composed(&k_view.contiguous()?, Some(&norm), &cos, &sin)?;
    kernels.push(KernelCheck { name: "qk_norm_rope fused on a qkv view vs candle ops".into(), relative_l2: relative_l2(&fused, &composed)? });
    let (qa, ka, va) = (
        engine::ops::qk_norm_rope(&qkv.narrow(2, 0, h)?, Some(&norm), &cos, &sin)?,
        engine::ops::qk_norm_rope(&k_view, Some(&norm), &cos, &sin)?,
        qkv.narrow(2, 2 * h, h)?,
    );
    let got = engine::ops::attention(&qa, &ka, &va)?;
    let want = engine::ops::attention_composed(&qa, &ka, &va.contiguous()?)?;
    kernels.push(KernelCheck { name: "attention (1, 4224, 30, 128) on qkv views vs composed softmax".into(), relative_l2: relative_l2(&got, &want)? });
    #[cfg(feature = "flash-attn-v3-fp8")]
    if device.is_cuda() && dtype == DType::BF16 && engine::cuda::compute_capability(&qkv)?.0 == 9 {
        fp8_attention_checks(&mut kernels, &qkv, h, &norm, &cos, &sin, (&qa, &ka, &got))?;
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let gate_up = (r(&[l, 2 * f])? * 2.0)?;
        let composed = (gate_up.narrow(1, 0, f)?.silu()? * gate_up.narrow(1, f, f)?)?;
        let (h_fused, q_fused, s_fused) = engine::cuda::swiglu_quantized(&gate_up)?;
        kernels.push(KernelCheck { name: "swiglu fused (gate|up rows) vs candle ops".into(), relative_l2: relative_l2(&h_fused, &composed)? });
        let back = engine::fp8::e4m3_to_f32(&q_fused)?.broadcast_mul(&s_fused)?;
        kernels.push(KernelCheck { name: "swiglu fused: its E4M3 output vs its bf16 output".into(), relative_l2: relative_l2(&back, &h_fused)? });
        // Row-scaled E4M3 straight from gate|up (one kernel) against the bf16 product quantized
        // per row afterwards (should be 0: the same bf16 values, the same scales).
        let rows_deq = |(q, s): (Tensor, Tensor)| -> candle_core::Result<Tensor> {
            let n = s.elem_count();
            engine::fp8::e4m3_to_f32(&q)?.broadcast_mul(&s.reshape((n, 1))?)
        };
        if let (Some(fused), Some(after)) = (engine::cuda::swiglu_e4m3_rows(&gate_up, None)?, engine::cuda::quantize_e4m3_rows(&h_fused)?) {
            kernels.push(KernelCheck { name: "swiglu -> E4M3 per row, one kernel vs bf16 swiglu then row quantize".into(), relative_l2: relative_l2(&rows_deq(fused)?, &rows_deq(after)?)? });
        } else {
            anyhow::bail!("the row-scaled swiglu kernel refused ({l}, 2 x {f})");
        }
        // The row-folded path's kernels: gate|up rows in units of a per-row factor, multiplied
        // back by the kernel, against the plain rows (bf16 rounding of the divided rows apart).
        let factor = (Tensor::rand(0.5f32, 4.0, l, device)?).contiguous()?;
        let gate_up_div = gate_up.to_dtype(DType::F32)?.broadcast_div(&factor.reshape((l, 1))?)?.to_dtype(dtype)?;
        if let (Some(with_factor), Some(plain)) = (engine::cuda::swiglu_e4m3_rows(&gate_up_div, Some(&factor))?, engine::cuda::swiglu_e4m3_rows(&gate_up, None)?) {
            kernels.push(KernelCheck { name: "swiglu -> E4M3 per row with row factors vs without (rows pre-divided)".into(), relative_l2: relative_l2(&rows_deq(with_factor)?, &rows_deq(plain)?)? });
        }
        let (rx, ry) = (r(&[1, l, d])?, (r(&[1, l, d])? * 4.0)?);
        let nw = (r(&[d])?.abs()? + 0.5)?;
        let ry_div = ry.to_dtype(DType::F32)?.broadcast_div(&factor.reshape((1, l, 1))?)?.to_dtype(dtype)?;
        let scaled = engine::cuda::add_rms_norm_scaled(&rx, &ry_div, &nw, 1e-5, Some(&factor))?;
        let plain = engine::cuda::add_rms_norm(&rx, &ry, &nw, 1e-5)?;
        kernels.push(KernelCheck { name: "gated residual add_rms_norm with row factors vs without (rows pre-divided)".into(), relative_l2: relative_l2(&scaled, &plain)? });
        // The row quantization kernel against the same arithmetic on the host.
        let (q_host, s_host) = engine::fp8::quantize_rows(&h_fused.to_device(&candle_core::Device::Cpu)?)?;
        if let Some(dev_rows) = engine::cuda::quantize_e4m3_rows(&h_fused)? {
            let host = rows_deq((q_host, s_host))?;
            kernels.push(KernelCheck { name: "E4M3 row quantization kernel vs the host's".into(), relative_l2: relative_l2(&rows_deq(dev_rows)?.to_device(&candle_core::Device::Cpu)?, &host)? });
            kernels.push(KernelCheck { name: "E4M3 row quantization (4224, 10240) round trip".into(), relative_l2: relative_l2(&host, &h_fused.to_device(&candle_core::Device::Cpu)?)? });
        }
    }
    // The vectorized memory-bound kernels against candle ops at the model's shapes.
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 {
        let x = (r(&[1, l, d])? * 2.0)?;
        let w = (r(&[d])?.abs()? + 0.5)?;
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
        let Some((got, Some((q, s)))) = engine::cuda::rms_norm_v8(&x, &w, 1e-6, true)? else {
            anyhow::bail!("the vectorized rms_norm refused a (1, {l}, {d}) bf16 input");
        };
        kernels.push(KernelCheck { name: "rms_norm vectorized (+amax) vs candle's rms_norm".into(), relative_l2: relative_l2(&got, &want)? });
        let back = engine::fp8::e4m3_to_f32(&q)?.broadcast_mul(&s)?;
        kernels.push(KernelCheck { name: "rms_norm vectorized: its E4M3 output vs its bf16 output".into(), relative_l2: relative_l2(&back, &got)? });
        let x2 = x.reshape((l, d))?;
        match (engine::cuda::rms_norm_e4m3_rows(&x2, &w, 1e-6)?, engine::cuda::quantize_e4m3_rows(&got.reshape((l, d))?)?) {
            (Some((qf, sf)), Some((qa, sa))) => {
                let deq = |q: &Tensor, s: &Tensor| engine::fp8::e4m3_to_f32(q)?.broadcast_mul(&s.reshape((l, 1))?);
                let (fused, after) = (deq(&qf, &sf)?, deq(&qa, &sa)?);
                kernels.push(KernelCheck { name: "rms_norm -> E4M3 per row, one kernel vs bf16 rms_norm then row quantize".into(), relative_l2: relative_l2(&fused, &after)? });
                kernels.push(KernelCheck { name: "rms_norm -> E4M3 per row vs candle's rms_norm".into(), relative_l2: relative_l2(&fused, &want.reshape((l, d))?)? });
            }
            _ => anyhow::bail!("the row-scaled rms_norm kernels refused a ({l}, {d}) bf16 input"),
        }
        let (gc, gs, groups) = (128usize, 256usize, 32usize);
        let gx = ((r(&[1, gc, gs, gs])? * 2.0)? + 0.5)?;
        let (gamma, beta) = (r(&[gc])?, r(&[gc])?);
        let got = engine::cuda::group_norm(&gx, &gamma, &beta, groups, 1e-6, true)?;
        let xf = gx.to_dtype(DType::F32)?.reshape((1, groups, gc / groups * gs * gs))?;
        let mean = xf.mean_keepdim(2)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(2)?;
        let normed = centered.broadcast_div(&(var + 1e-6)?.sqrt()?)?.reshape((1, gc, gs, gs))?;
        let affine = normed
            .broadcast_mul(&gamma.to_dtype(DType::F32)?.reshape((1, gc, 1, 1))?)?
            .broadcast_add(&beta.to_dtype(DType::F32)?.reshape((1, gc, 1, 1))?)?;
        let want = candle_nn::ops::silu(&affine)?;
        kernels.push(KernelCheck { name: format!("group_norm+silu vectorized (1, {gc}, {gs}, {gs}) vs f32 candle ops"), relative_l2: relative_l2(&got, &want)? });
        // The VAE mid-block attention's softmax (bf16 scores of 1024 queries x 16384 keys).
        let scores = (r(&[1024, 128 * 128])? * 8.0)?;
        let scale = 1.0 / (512f64).sqrt();
        let Some(got) = engine::cuda::softmax_scaled_rows(&scores, scale as f32)? else { anyhow::bail!("softmax_scaled_rows refused (1024, 16384)") };
        let want = candle_nn::ops::softmax_last_dim(&(scores.to_dtype(DType::F32)? * scale)?)?;
        kernels.push(KernelCheck { name: "VAE attention softmax (1024, 16384) one kernel vs f32 candle softmax".into(), relative_l2: relative_l2(&got, &want)? });
        let ux = r(&[1, 64, 128, 128])?;
        let Some(got) = engine::cuda::upsample_nearest2x(&ux)? else { anyhow::bail!("upsample_nearest2x refused (1, 64, 128, 128)") };
        let want = ux.upsample_nearest2d(256, 256)?;
        kernels.push(KernelCheck { name: "nearest 2x upsampling vs candle's".into(), relative_l2: relative_l2(&got, &want)? });
    }
    let res_vb = candle_nn::VarBuilder::from_tensors(
        [("weight".to_string(), (r(&[d])?.abs()? + 0.5)?)].into_iter().collect(),
        dtype,
        device,
    );
    let res_norm = engine::ops::RmsNorm::new(d, 1e-5, res_vb.clone())?;
    let (rx, ry, gate) = (r(&[1, l, d])?, (r(&[1, l, d])? * 4.0)?, r(&[d])?.tanh()?);
    let fused = res_norm.add_to(&rx, &ry, Some(&gate))?;
    let w = (res_vb.get(d, "weight")?.to_dtype(dtype)? * &gate)?;
    let composed = (&rx + candle_nn::ops::rms_norm(&ry, &w, 1e-5)?)?;
    kernels.push(KernelCheck { name: "gated residual add_rms_norm fused vs candle ops".into(), relative_l2: relative_l2(&fused, &composed)? });
    let ctx = Fp8Context::new(device)?;
    match ctx.row_scaling_problem() {
        None => eprintln!("FP8 activations scaled {} (row-scaled products available)", ctx.scaling().name()),
        Some(why) => eprintln!("FP8 activations scaled {}; row-scaled products unavailable: {why}", ctx.scaling().name()),
    }
    let x = r(&[l, d])?;
    for (name, n_out, k_in) in [("fp8 matmul 4224x3840x3840", d, d), ("fp8 matmul 4224x3840->10240", f, d), ("fp8 matmul 4224x10240->3840", d, f)] {
        let x = if k_in == d { x.clone() } else { r(&[l, f])? };
        let w = (r(&[n_out, k_in])? * 0.02)?;
        let fw = Fp8Weight::quantize(&w, &ctx)?;
        let dense = x.matmul(&w.t()?)?;
        // per tensor; per row with row-scaled products, or with a unit scale and the row scales
        // applied after (as the next kernel applies them), as the context runs them
        let mut runs = vec![("per tensor", QuantizedActivation::new(&x)?, false)];
        let (q, scale) = engine::fp8::quantize_rows(&x)?;
        match ctx.scaling() {
            engine::fp8::ActivationScaling::Row => runs.push(("per row", QuantizedActivation { q, scale }, false)),
            engine::fp8::ActivationScaling::RowFolded => runs.push(("per row, unit-scale product, rows scaled after", QuantizedActivation { q, scale }, true)),
            engine::fp8::ActivationScaling::Tensor => {}
        }
        for (scaling, xq, folded) in &runs {
            let got = if *folded {
                fw.matmul_unscaled(&xq.q, dtype)?.to_dtype(DType::F32)?.broadcast_mul(&xq.scale.reshape((l, 1))?)?
            } else {
                fw.matmul(xq, dtype)?
            };
            let emulated = fw.matmul_emulated(xq, DType::F32)?;
            kernels.push(KernelCheck { name: format!("{name} ({scaling}): vs dequantized f32 product"), relative_l2: relative_l2(&got, &emulated)? });
            kernels.push(KernelCheck { name: format!("{name} ({scaling}): vs bf16 matmul"), relative_l2: relative_l2(&got, &dense)? });
        }
    }
    let (q, s) = engine::fp8::quantize(&x)?;
    let back = engine::fp8::e4m3_to_f32(&q)?.broadcast_mul(&s)?;
    kernels.push(KernelCheck { name: "fp8 quantize (4224, 3840) round trip".into(), relative_l2: relative_l2(&back, &x)? });
    int8_checks(&mut kernels, device, dtype)?;
    // The whole tiny model (same deterministic weights on both devices): the device path (fused
    // kernels, cuDNN convolutions, bf16) against the CPU f32 path, which matches diffusers.
    if !device.is_cpu() {
        let cpu = candle_core::Device::Cpu;
        let on_dev = Pipeline::tiny(device, dtype)?;
        let on_cpu = Pipeline::tiny(&cpu, DType::F32)?;
        for (w, h) in [(256usize, 256usize), (512, 384)] {
            let z = Tensor::randn(0f32, 1.0, (1, 16, h / 8, w / 8), &cpu)?;
            let img_dev = on_dev.vae().decode(&z.to_device(device)?)?;
            let img_cpu = on_cpu.vae().decode(&z)?;
            kernels.push(KernelCheck {
                name: format!("tiny VAE decode {w}x{h}: device bf16 vs CPU f32"),
                relative_l2: relative_l2(&img_dev.to_device(&cpu)?, &img_cpu)?,
            });
            let img_nhwc = with_env("ZIMAGE_VAE_LAYOUT", "nhwc", || Ok(on_dev.vae().decode(&z.to_device(device)?)?))?;
            let img_nchw = with_env("ZIMAGE_VAE_LAYOUT", "nchw", || Ok(on_dev.vae().decode(&z.to_device(device)?)?))?;
            kernels.push(KernelCheck {
                name: format!("tiny VAE decode {w}x{h}: channels-last vs NCHW (device)"),
                relative_l2: relative_l2(&img_nhwc, &img_nchw)?,
            });
            kernels.push(KernelCheck {
                name: format!("tiny VAE decode {w}x{h}: channels-last device bf16 vs CPU f32"),
                relative_l2: relative_l2(&img_nhwc.to_device(&cpu)?, &img_cpu)?,
            });
            let req = GenerateRequest { prompt: a.prompt.clone(), width: w, height: h, steps: 4, seed: 3, ..Default::default() };
            let out_dev = on_dev.generate(&req, &mut |_| Control::Continue)?;
            let out_cpu = on_cpu.generate(&req, &mut |_| Control::Continue)?;
            kernels.push(KernelCheck {
                name: format!("tiny pipeline {w}x{h} latents: device bf16 vs CPU f32"),
                relative_l2: relative_l2(&out_dev.latents.to_device(&cpu)?, &out_cpu.latents)?,
            });
        }
    }
    // The pipeline's VAE (full size with --model random): the channels-last decoder against the
    // NCHW one, same latent.
    if device.is_cuda() {
        let z = Tensor::randn(0f32, 1.0, (1, 16, 128, 128), device)?;
        let img = with_env("ZIMAGE_VAE_LAYOUT", "nhwc", || Ok(pipe.vae().decode(&z)?))?;
        let img_nchw = with_env("ZIMAGE_VAE_LAYOUT", "nchw", || Ok(pipe.vae().decode(&z)?))?;
        kernels.push(KernelCheck { name: "VAE decode 1024x1024: channels-last vs NCHW".into(), relative_l2: relative_l2(&img, &img_nchw)? });
    }
    // Causal attention with grouped kv heads (the text encoder's): flash vs the composed softmax.
    {
        let (tl, th, tkv) = (77usize, 32usize, 8usize);
        let (q, k, v) = (r(&[1, tl, th, hd])?, r(&[1, tl, tkv, hd])?, r(&[1, tl, tkv, hd])?);
        let kernel = engine::ops::AttentionKernel::for_device(device);
        let got = engine::ops::attention_with(kernel, &q, &k, &v, true)?;
        let want = engine::ops::attention_composed_causal(&q, &k, &v)?;
        kernels.push(KernelCheck { name: format!("causal GQA attention (1, 77, 32/8, 128), {} vs composed", kernel.name()), relative_l2: relative_l2(&got, &want)? });
    }
    // CUDA graph replays against the same steps run as kernel launches (same weights, seed and
    // kernels: they should agree to the last bit), and the text encoder's flash path against its
    // composed attention.
    if device.is_cuda() {
        let req = GenerateRequest { prompt: a.prompt.clone(), width: 512, height: 512, steps: 4, seed: 5, ..Default::default() };
        // Only the denoiser's graphs are toggled: the caption embeddings are the same in all three.
        pipe.set_cuda_graphs(true);
        let graphed = pipe.generate(&req, &mut |_| Control::Continue)?;
        let graphed_again = pipe.generate(&req, &mut |_| Control::Continue)?;
        pipe.set_denoise_graphs(false);
        let eager = pipe.generate(&req, &mut |_| Control::Continue)?;
        pipe.set_cuda_graphs(false);
        kernels.push(KernelCheck { name: "512x512 latents: CUDA graph replays vs kernel launches".into(), relative_l2: relative_l2(&graphed.latents, &eager.latents)? });
        kernels.push(KernelCheck { name: "512x512 latents: a second request replaying the same graphs vs launches".into(), relative_l2: relative_l2(&graphed_again.latents, &eager.latents)? });
        let (emb_eager, _) = pipe.encode_prompt(&a.prompt)?;
        pipe.set_cuda_graphs(true);
        let (emb_graph, _) = pipe.encode_prompt(&a.prompt)?;
        kernels.push(KernelCheck { name: "text encoder: graph replay (padded to 64 tokens) vs launches".into(), relative_l2: relative_l2(&emb_graph, &emb_eager)? });
        pipe.set_cuda_graphs(false);
        let (emb_composed, _) = with_env("ZIMAGE_ATTENTION", "composed", || Ok(pipe.encode_prompt(&a.prompt)?))?;
        kernels.push(KernelCheck { name: "text encoder: flash causal vs composed attention".into(), relative_l2: relative_l2(&emb_graph, &emb_composed)? });
    }
    for k in &kernels {
        eprintln!("{:60} relative L2 {:.3e}", k.name, k.relative_l2);
    }

    let mut quality = Vec::new();
    let mut bf16_runs = Vec::new();
    let sizes = parse_sizes(&a.sizes)?;
    let req = |w: usize, h: usize| GenerateRequest { prompt: a.prompt.clone(), width: w, height: h, steps: a.steps, seed: 7, ..Default::default() };
    for &(w, h) in &sizes {
        let out = pipe.generate(&req(w, h), &mut |_| Control::Continue)?;
        bf16_runs.push(out);
    }
    // The same dense weights quantized each way (the snapshot shares their storage).
    let dense = pipe.transformer_snapshot();
    let mut int8_quality = Vec::new();
    let mut fp8_attention_quality = Vec::new();
    for (q, reports) in [(engine::ops::Quantization::Fp8, &mut quality), (engine::ops::Quantization::Int8, &mut int8_quality)] {
        pipe.restore_transformer(dense.clone());
        pipe.quantize(q)?;
        let mut runs = Vec::new();
        for (&(w, h), base) in sizes.iter().zip(&bf16_runs) {
            // the linears' effect alone: bf16 attention unless a kernel is named (the FP8 model's
            // default FP8 attention is measured on its own below)
            let run = || Ok(pipe.generate(&req(w, h), &mut |_| Control::Continue)?);
            let out = if engine::ops::AttentionKernel::named_by_env() { run()? } else { with_env("ZIMAGE_ATTENTION", "fa3", run)? };
            let rel = relative_l2(&out.latents, &base.latents)?;
            let p = psnr(&out.images[0], &base.images[0]);
            eprintln!("{w}x{h}: {} vs bf16, same weights and seed: latents relative L2 {rel:.3e}, image PSNR {p:.2} dB", q.name());
            reports.push(QualityReport { width: w, height: h, steps: a.steps, latents_relative_l2: rel, image_psnr_db: p });
            runs.push(out);
        }
        // FP8 attention on the FP8 model against its bf16 attention (same weights and seed), and
        // against the bf16 model, where the binary has it and the card runs it.
        if q == engine::ops::Quantization::Fp8 {
            fp8_attention_quality = fp8_attention_psnr(pipe, &sizes, &runs, &bf16_runs, &req)?;
        }
    }
    drop(dense);
    let json = serde_json::to_string_pretty(&serde_json::json!({"model": pipe.model_name(), "device": format!("{device:?}"), "kernels": kernels, "fp8_quality": quality, "int8_quality": int8_quality, "fp8_attention_quality": fp8_attention_quality}))?;
    println!("{json}");
    if let Some(p) = &a.out {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// Images with FlashAttention-3's FP8 attention (`ZIMAGE_ATTENTION=fa3-fp8`) against the same
/// requests run with bf16 attention on the same (FP8) weights, and against the bf16 model. Empty
/// when the binary or the card has no FP8 attention.
fn fp8_attention_psnr(
    pipe: &mut Pipeline,
    sizes: &[(usize, usize)],
    fp8_runs: &[engine::pipeline::GenerateOutput],
    bf16_runs: &[engine::pipeline::GenerateOutput],
    req: &dyn Fn(usize, usize) -> GenerateRequest,
) -> Result<Vec<serde_json::Value>> {
    use engine::fp8::relative_l2;
    use engine::ops::AttentionKernel;
    with_env("ZIMAGE_ATTENTION", "fa3-fp8", || {
        let mut reports = Vec::new();
        if pipe.attention_kernel() != AttentionKernel::FlashAttention3Fp8 {
            return Ok(reports);
        }
        for ((&(w, h), fp8), bf16) in sizes.iter().zip(fp8_runs).zip(bf16_runs) {
            let out = pipe.generate(&req(w, h), &mut |_| Control::Continue)?;
            let (p_fp8, p_bf16) = (psnr(&out.images[0], &fp8.images[0]), psnr(&out.images[0], &bf16.images[0]));
            let rel = relative_l2(&out.latents, &fp8.latents)?;
            eprintln!("{w}x{h}: FP8 attention on the FP8 model vs its bf16 attention: latents relative L2 {rel:.3e}, image PSNR {p_fp8:.2} dB (vs the bf16 model: {p_bf16:.2} dB)");
            reports.push(serde_json::json!({"width": w, "height": h, "latents_relative_l2_vs_bf16_attention": rel, "image_psnr_db_vs_bf16_attention": p_fp8, "image_psnr_db_vs_bf16_model": p_bf16}));
        }
        Ok(reports)
    })
}

/// Runs `f` with the environment variable `var` set to `value`, then puts it back (the engine
/// reads these settings per call; bench runs one request at a time).
fn with_env<T>(var: &str, value: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let before = std::env::var(var).ok();
    std::env::set_var(var, value);
    let result = f();
    match before {
        Some(v) => std::env::set_var(var, v),
        None => std::env::remove_var(var),
    }
    result
}

/// FlashAttention-3's FP8 forward and its input kernels on a (1, 4224, 30 + 30 + 30, 128) qkv
/// product: q and k out of the norm + RoPE + E4M3 kernel against the bf16 kernel's (quantization
/// alone) and against the same static-scale quantization done on the CPU; v's per-tensor
/// quantization; the attention kernel against its E4M3 reference computed on the CPU from the same
/// bytes (two heads, and odd lengths); the whole FP8 attention against the bf16 one.
#[cfg(feature = "flash-attn-v3-fp8")]
#[allow(clippy::too_many_arguments)]
fn fp8_attention_checks(
    kernels: &mut Vec<KernelCheck>,
    qkv: &candle_core::Tensor,
    h: usize,
    norm: &engine::ops::RmsNorm,
    cos: &candle_core::Tensor,
    sin: &candle_core::Tensor,
    (q_bf16, k_bf16, out_bf16): (&candle_core::Tensor, &candle_core::Tensor, &candle_core::Tensor),
) -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use engine::fp8::relative_l2;
    let cpu = Device::Cpu;
    let dequant = |q: &Tensor, s: &Tensor| -> candle_core::Result<Tensor> {
        engine::fp8::e4m3_to_f32(q)?.broadcast_mul(&s.to_dtype(DType::F32)?)
    };
    let scalar = |s: &Tensor| -> candle_core::Result<f32> { s.to_device(&cpu)?.reshape(())?.to_scalar::<f32>() };
    let Some((q8, k8, dq, dk, v_amax)) = engine::cuda::qk_norm_rope_e4m3(qkv, h, h, norm.weight(), norm.weight(), norm.eps() as f32, cos, sin)? else {
        anyhow::bail!("qk_norm_rope_e4m3 refused a (1, 4224, 90, 128) bf16 qkv product");
    };
    kernels.push(KernelCheck { name: "qk norm + rope -> E4M3 (static scale): q dequantized vs the bf16 kernel".into(), relative_l2: relative_l2(&dequant(&q8, &dq)?, q_bf16)? });
    kernels.push(KernelCheck { name: "qk norm + rope -> E4M3 (static scale): k dequantized vs the bf16 kernel".into(), relative_l2: relative_l2(&dequant(&k8, &dk)?, k_bf16)? });
    let (q_ref, dq_ref) = engine::ops::quantize_e4m3_normed(&q_bf16.to_device(&cpu)?, norm)?;
    let (dqs, dks) = (scalar(&dq)?, scalar(&dk)?);
    eprintln!("FP8 attention: descale q {dqs:.4e} (CPU reference {dq_ref:.4e}), k {dks:.4e}");
    kernels.push(KernelCheck { name: "qk norm + rope -> E4M3: q vs the same scale applied on the CPU to the bf16 output".into(), relative_l2: relative_l2(&dequant(&q8, &dq)?.to_device(&cpu)?, &(q_ref * dq_ref as f64)?)? });
    let v = qkv.narrow(2, 2 * h, h)?;
    let Some((v8, dv)) = engine::cuda::quantize_e4m3_heads(&v, Some(&v_amax))? else { anyhow::bail!("quantize_e4m3_heads refused the v view") };
    kernels.push(KernelCheck { name: "v view -> E4M3 per tensor (amax from the qk kernel): dequantized vs input".into(), relative_l2: relative_l2(&dequant(&v8, &dv)?, &v)? });
    // The amax the qk kernel took on its way must be the amax pass's (exactly: same values).
    let Some((v8_own, dv_own)) = engine::cuda::quantize_e4m3_heads(&v, None)? else { anyhow::bail!("quantize_e4m3_heads refused the v view") };
    let v_amax_cpu = v.to_device(&cpu)?.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let dvs = scalar(&dv)?;
    eprintln!("FP8 attention: v descale {dvs:.6e} from the qk kernel's amax, {:.6e} from its own pass, {:.6e} from the CPU", scalar(&dv_own)?, v_amax_cpu / 448.0);
    kernels.push(KernelCheck { name: "v E4M3 with the qk kernel's amax vs with its own amax pass (0 expected)".into(), relative_l2: relative_l2(&dequant(&v8, &dv)?, &dequant(&v8_own, &dv_own)?)? });
    let out8 = engine::flash_fp8::flash_attn_e4m3(&q8, &k8, &v8, &dq, &dk, &dv)?;
    // The E4M3 reference for two heads (all 30 on the CPU would take minutes).
    let heads2 = |t: &Tensor| -> candle_core::Result<Tensor> { engine::fp8::e4m3_to_f32(t)?.narrow(2, 0, 2)?.to_device(&cpu) };
    let want = engine::ops::attention_e4m3_composed(&heads2(&q8)?, &heads2(&k8)?, &heads2(&v8)?, dqs, dks, dvs)?;
    kernels.push(KernelCheck { name: "FA3 FP8 (1, 4224, 30, 128), heads 0-1 vs its E4M3 reference on the CPU".into(), relative_l2: relative_l2(&out8.narrow(2, 0, 2)?.to_device(&cpu)?, &want)? });
    kernels.push(KernelCheck { name: "FA3 FP8 attention (1, 4224, 30, 128) vs FA3 bf16 on the same bf16 q/k/v".into(), relative_l2: relative_l2(&out8, out_bf16)? });
    let fused = engine::ops::attention_qkv_fp8(engine::ops::AttentionKernel::FlashAttention3Fp8, qkv, h, h, Some(norm), Some(norm), cos, sin)?;
    let Some(fused) = fused else { anyhow::bail!("attention_qkv_fp8 refused the qkv product") };
    kernels.push(KernelCheck { name: "attention_qkv_fp8 (the transformer's path) vs the kernels above".into(), relative_l2: relative_l2(&fused, &out8)? });
    // The whole path on a smaller fused product against its f32 reference on the CPU.
    {
        let small = qkv.narrow(1, 0, 1000)?.narrow(2, 0, 4)?;
        let small = Tensor::cat(&[&small, &qkv.narrow(1, 0, 1000)?.narrow(2, h, 4)?, &qkv.narrow(1, 0, 1000)?.narrow(2, 2 * h, 4)?], 2)?.contiguous()?;
        let (c, s) = (cos.narrow(0, 0, 1000)?, sin.narrow(0, 0, 1000)?);
        let got = engine::ops::attention_qkv_fp8(engine::ops::AttentionKernel::FlashAttention3Fp8, &small, 4, 4, Some(norm), Some(norm), &c, &s)?;
        let Some(got) = got else { anyhow::bail!("attention_qkv_fp8 refused a (1, 1000, 12, 128) qkv product") };
        let norm_vb = candle_nn::VarBuilder::from_tensors([("weight".to_string(), norm.weight().to_device(&cpu)?)].into_iter().collect(), DType::F32, &cpu);
        let norm_cpu = engine::ops::RmsNorm::new(128, norm.eps(), norm_vb)?;
        let want = engine::ops::attention_qkv_e4m3_composed(&small.to_device(&cpu)?, 4, 4, &norm_cpu, &norm_cpu, &c.to_device(&cpu)?, &s.to_device(&cpu)?)?;
        kernels.push(KernelCheck { name: "FP8 attention path (1, 1000, 4+4+4, 128) vs its f32 reference on the CPU".into(), relative_l2: relative_l2(&got.to_device(&cpu)?, &want)? });
    }
    // Lengths that are not multiples of the kernel's tiles, one (64) that takes its one-warpgroup
    // variant, and keys longer than queries.
    for (lq, lk, heads) in [(1000usize, 1000usize, 4usize), (64, 64, 4), (300, 777, 2), (4128, 4128, 2)] {
        let rq = (Tensor::randn(0f32, 1.0, (1, lq, heads, 128), qkv.device())?.to_dtype(DType::BF16)? * 2.0)?;
        let rk = (Tensor::randn(0f32, 1.0, (1, lk, heads, 128), qkv.device())?.to_dtype(DType::BF16)? * 2.0)?;
        let rv = Tensor::randn(0f32, 1.0, (1, lk, heads, 128), qkv.device())?.to_dtype(DType::BF16)?;
        let quant = |t: &Tensor| -> Result<(Tensor, Tensor)> {
            engine::cuda::quantize_e4m3_heads(t, None)?.ok_or_else(|| anyhow::anyhow!("quantize_e4m3_heads refused a contiguous tensor"))
        };
        let ((a, da), (b, db), (c, dc)) = (quant(&rq)?, quant(&rk)?, quant(&rv)?);
        let got = engine::flash_fp8::flash_attn_e4m3(&a, &b, &c, &da, &db, &dc)?;
        let all = |t: &Tensor| -> candle_core::Result<Tensor> { engine::fp8::e4m3_to_f32(t)?.to_device(&cpu) };
        let want = engine::ops::attention_e4m3_composed(&all(&a)?, &all(&b)?, &all(&c)?, scalar(&da)?, scalar(&db)?, scalar(&dc)?)?;
        kernels.push(KernelCheck { name: format!("FA3 FP8 q (1, {lq}, {heads}, 128) k/v {lk} vs its E4M3 reference on the CPU"), relative_l2: relative_l2(&got.to_device(&cpu)?, &want)? });
    }
    Ok(())
}

/// The INT8 kernels against the reference arithmetic of `engine::int8` computed on the CPU from
/// the same bf16 values (quantization: per-row scales and bytes; the int8 GEMM against the integer
/// sums scaled in f32 and against the bf16 product), at the block's shapes.
fn int8_checks(kernels: &mut Vec<KernelCheck>, device: &candle_core::Device, dtype: candle_core::DType) -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use engine::fp8::relative_l2;
    use engine::int8::{bytes_to_f32, quantize_rows, Int8Activation, Int8Context, Int8Weight};
    let cpu = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, device).and_then(|t| t.to_dtype(dtype));
    let dequant = |q: &Tensor, s: &Tensor| -> candle_core::Result<Tensor> {
        bytes_to_f32(q)?.to_device(&cpu)?.broadcast_mul(&s.to_device(&cpu)?.unsqueeze(1)?)
    };
    let (l, d, f) = (4224usize, 3840usize, 10240usize);
    // Quantization: device kernel (on CUDA) vs the CPU reference of the same bf16 values.
    let x = (r(&[l, d])? * 3.0)?;
    let (q, s) = quantize_rows(&x)?;
    let (q_ref, s_ref) = quantize_rows(&x.to_device(&cpu)?.to_dtype(DType::F32)?)?;
    let differing = q.to_device(&cpu)?.ne(&q_ref)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
    eprintln!("int8 quantize (4224, 3840): {:.2e} of the bytes differ from the CPU reference", differing);
    kernels.push(KernelCheck { name: "int8 quantize rows (4224, 3840): scales vs CPU reference".into(), relative_l2: relative_l2(&s.to_device(&cpu)?, &s_ref)? });
    kernels.push(KernelCheck { name: "int8 quantize rows (4224, 3840): dequantized vs CPU reference".into(), relative_l2: relative_l2(&dequant(&q, &s)?, &dequant(&q_ref, &s_ref)?)? });
    kernels.push(KernelCheck { name: "int8 quantize rows (4224, 3840): round trip vs input".into(), relative_l2: relative_l2(&dequant(&q, &s)?, &x.to_device(&cpu)?)? });
    // RMSNorm + quantize in one pass vs the norm then the reference quantization.
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 {
        let w = (r(&[d])?.abs()? + 0.5)?;
        let Some((normed, (q, s))) = engine::cuda::rms_norm_i8_v8(&x, &w, 1e-6)? else {
            anyhow::bail!("rms_norm_i8_v8 refused a ({l}, {d}) bf16 input");
        };
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
        kernels.push(KernelCheck { name: "rms_norm + int8 quantize fused: its bf16 output vs candle's rms_norm".into(), relative_l2: relative_l2(&normed, &want)? });
        let (q_ref, s_ref) = quantize_rows(&normed.to_device(&cpu)?.to_dtype(DType::F32)?)?;
        kernels.push(KernelCheck { name: "rms_norm + int8 quantize fused: its int8 output vs CPU reference".into(), relative_l2: relative_l2(&dequant(&q, &s)?, &dequant(&q_ref, &s_ref)?)? });
    }
    // The GEMM: integer sums exact, scales applied after (what `matmul_reference` computes).
    let ctx = Int8Context::new(device)?;
    for (name, n_out, k_in) in [("int8 matmul 4224x3840x3840", d, d), ("int8 matmul 4224x3840->10240", f, d), ("int8 matmul 4224x10240->3840", d, f)] {
        let x = if k_in == d { x.clone() } else { r(&[l, f])? };
        let w = (r(&[n_out, k_in])? * 0.02)?;
        let wq = Int8Weight::quantize(&w, &ctx)?;
        let xq = Int8Activation::new(&x)?;
        let got = wq.matmul(&xq, dtype)?;
        let reference = wq.matmul_reference(&xq, DType::F32)?;
        let dense = engine::ops::matmul(&x, &w.t()?)?;
        kernels.push(KernelCheck { name: format!("{name}: vs integer sums scaled in f32"), relative_l2: relative_l2(&got, &reference)? });
        kernels.push(KernelCheck { name: format!("{name}: vs bf16 matmul"), relative_l2: relative_l2(&got, &dense)? });
    }
    // The feed-forward's fused middle: w1|w3's integer sums -> silu(gate) * up -> int8 for w2,
    // against the same steps through bf16 tensors and the reference quantization.
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 {
        let wq = Int8Weight::quantize(&(r(&[2 * f, d])? * 0.02)?, &ctx)?;
        let xq = Int8Activation::new(&x)?;
        let Some(fused) = wq.matmul_swiglu(&xq, dtype)? else { anyhow::bail!("the fused int8 swiglu refused ({l}, {d}) x ({}, {d})", 2 * f) };
        let gate_up = wq.matmul(&xq, dtype)?;
        let h = (gate_up.narrow(1, 0, f)?.silu()? * gate_up.narrow(1, f, f)?)?;
        let (q_ref, s_ref) = quantize_rows(&h.to_device(&cpu)?.to_dtype(DType::F32)?)?;
        kernels.push(KernelCheck {
            name: "int8 w1|w3 product + swiglu + quantize fused vs bf16 ops + reference quantization".into(),
            relative_l2: relative_l2(&dequant(&fused.q, &fused.scale)?, &dequant(&q_ref, &s_ref)?)?,
        });
    }
    Ok(())
}

/// VAE decode at 1024x1024: stage times of a random-weight Flux decoder (synchronized at each
/// stage boundary) and the single convolutions, upsamplings and elementwise passes it is made of.
fn vae_profile(device: &candle_core::Device, dtype: candle_core::DType) -> Result<()> {
    use candle_core::Tensor;
    let z = Tensor::randn(0f32, 1.0, (1, 16, 128, 128), device)?.to_dtype(dtype)?;
    // channels-last (the default), then NCHW; each decoder built under its setting, as a
    // server started with it would be (the filters are stored in the layout it reads)
    for layout in ["nhwc", "nchw"] {
        let stages = with_env("ZIMAGE_VAE_LAYOUT", layout, || {
            let vae = engine::vae::AutoencoderKl::new(
                &engine::config::VaeConfig::flux(),
                engine::weights::device_random_var_builder(dtype, device),
            )?;
            for _ in 0..2 {
                vae.decode(&z)?;
            }
            let mut stages: Vec<(String, f64)> = Vec::new();
            for _ in 0..3 {
                device.synchronize()?;
                let mut last = Instant::now();
                let mut run = Vec::new();
                vae.decode_probed(&z, &mut |stage| {
                    let _ = device.synchronize();
                    let now = Instant::now();
                    run.push((stage.to_string(), ms(now - last)));
                    last = now;
                })?;
                stages = run; // the last run (warm)
            }
            Ok(stages)
        })?;
        let total: f64 = stages.iter().map(|(_, t)| t).sum();
        for (name, t) in &stages {
            eprintln!("vae decode 1024x1024 ({layout}) stage {name:24} {t:8.2} ms");
        }
        eprintln!("vae decode 1024x1024 ({layout}) total {total:.1} ms");
    }
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, device).and_then(|t| t.to_dtype(dtype));
    let mut rows: Vec<(String, f64)> = Vec::new();
    for (c_in, c_out, hw) in [(512, 512, 128), (512, 512, 256), (512, 256, 512), (256, 256, 512), (256, 128, 1024), (128, 128, 1024)] {
        let x = r(&[1, c_in, hw, hw])?;
        let w = (r(&[c_out, c_in, 3, 3])? * 0.02)?;
        rows.push((format!("candle conv2d 3x3 {c_in}->{c_out} at {hw}x{hw} (not used by our VAE)"), time_op(device, || x.conv2d(&w, 1, 1, 1, 1))?));
    }
    let x = r(&[1, 128, 1024, 1024])?;
    let bias = r(&[1, 128, 1, 1])?;
    rows.push(("bias broadcast_add 128 x 1024x1024".into(), time_op(device, || x.broadcast_add(&bias))?));
    rows.push(("silu 128 x 1024x1024".into(), time_op(device, || candle_nn::ops::silu(&x))?));
    rows.push(("add 128 x 1024x1024".into(), time_op(device, || &x + &x)?));
    rows.push(("to f32 128 x 1024x1024".into(), time_op(device, || x.to_dtype(candle_core::DType::F32))?));
    let x = r(&[1, 256, 512, 512])?;
    rows.push(("upsample_nearest2d 256 x 512 -> 1024".into(), time_op(device, || x.upsample_nearest2d(1024, 1024))?));
    for (name, t) in &rows {
        eprintln!("{name:48} {t:8.3} ms");
    }
    Ok(())
}
