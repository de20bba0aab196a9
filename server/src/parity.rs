//! `zimage parity`: runs our engine stage by stage on inputs a diffusers run saved
//! (scripts/gpu/parity_full.py) and writes our outputs for the same stages, so the script can
//! report the relative error of each: text encoder, the transformer at every denoising step (fed the
//! reference's own latents, so errors do not compound), the whole sampling loop, the VAE decode.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use engine::pipeline::{Control, GenerateRequest, Pipeline};

#[derive(Args)]
pub struct ParityArgs {
    /// A diffusers-layout folder (the same weights the reference ran).
    #[arg(long)]
    model: String,
    /// Reference tensors: prompt_ids, noise, x.<i> (latents entering step i), latents (final).
    #[arg(long)]
    inputs: std::path::PathBuf,
    /// The prompt the reference encoded (for the end-to-end run).
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    out: std::path::PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on GPUs), f32 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

pub fn run(a: ParityArgs) -> Result<()> {
    let device = crate::pick_device(&a.device)?;
    let dtype = match a.dtype.as_str() {
        "auto" => engine::pipeline::default_dtype(&device),
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--dtype must be auto, f32 or bf16, not {other}"),
    };
    let source = engine::loader::ModelSource::parse(&a.model);
    let pipe = Pipeline::load_with_options(&source, &device, dtype, Default::default())?;
    let refs = candle_core::safetensors::load(&a.inputs, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot read {}", a.inputs.display()))?;
    let get = |k: &str| refs.get(k).cloned().with_context(|| format!("{} has no `{k}`", a.inputs.display()));
    let mut out: HashMap<String, Tensor> = HashMap::new();

    // Text encoder on the reference's token ids.
    let ids: Vec<u32> = get("prompt_ids")?.to_dtype(DType::I64)?.to_vec1::<i64>()?.iter().map(|&v| v as u32).collect();
    let ours_ids = pipe.tokenizer().encode(&a.prompt)?.ids;
    anyhow::ensure!(ours_ids == ids, "our tokenizer gives other ids for the prompt than the reference");
    let te = pipe.encode_ids(&ids)?;
    out.insert("te_embeds".into(), te.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?);

    // Transformer at every step, from the reference's latents and embeddings.
    let ref_embeds = get("te_embeds")?.to_device(&device)?.to_dtype(pipe.dtype())?;
    let steps = (0..).take_while(|i| refs.contains_key(&format!("x.{i}"))).count();
    let schedule = engine::scheduler::Schedule::new(&engine::config::SchedulerConfig::default(), steps)?;
    for i in 0..steps {
        let x = get(&format!("x.{i}"))?.to_device(&device)?;
        let t = Tensor::full(schedule.model_time(i), 1, &device)?;
        let o = pipe.transformer().forward(&x.unsqueeze(2)?.to_dtype(pipe.dtype())?, &t, &[ref_embeds.clone()])?;
        out.insert(format!("out.{i}"), o.squeeze(2)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?);
    }

    // Whole loop from the same noise (our own text encoding), and the VAE on the reference latents.
    let noise = get("noise")?;
    let (h, w) = (noise.dim(2)? * 8, noise.dim(3)? * 8);
    let req = GenerateRequest { prompt: a.prompt.clone(), width: w, height: h, steps, noise: Some(noise), ..Default::default() };
    let res = pipe.generate(&req, &mut |_| Control::Continue)?;
    out.insert("latents".into(), res.latents.to_device(&candle_core::Device::Cpu)?);
    let img = pipe.decode_latents_float(&get("latents")?.to_device(&device)?)?;
    out.insert("image_from_ref_latents".into(), img.to_device(&candle_core::Device::Cpu)?);
    candle_core::safetensors::save(&out, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
