//! LoRA on the command line: `--lora FILE[:SCALE]` for `generate` and `bench`, and `zimage lora`
//! (what a file holds and how it matches the model; `--make-random` writes an all-module LoRA
//! for timing without downloads).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use engine::config::TransformerConfig;
use engine::lora::{LoraFile, LoraPatcher};
use engine::pipeline::Pipeline;

/// `FILE[:SCALE]` -> (FILE, SCALE); a suffix that is not a number is part of the file name.
pub fn parse_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((file, scale)) = spec.rsplit_once(':') {
        if let Ok(s) = scale.trim().parse::<f32>() {
            if !s.is_finite() {
                bail!("LoRA scale `{scale}` in `{spec}` is not a finite number");
            }
            return Ok((PathBuf::from(file), s));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Reads every `--lora` file (errors name the file).
pub fn read_specs(specs: &[String]) -> Result<Vec<(LoraFile, f32)>> {
    specs
        .iter()
        .map(|s| {
            let (path, scale) = parse_spec(s)?;
            Ok((LoraFile::read(&path)?, scale))
        })
        .collect()
}

/// Applies the `--lora` set to a loaded pipeline, printing warnings; returns the patcher (which
/// holds the base weights) and the apply time.
pub fn apply(pipe: &mut Pipeline, loras: &[(LoraFile, f32)]) -> Result<(LoraPatcher, std::time::Duration)> {
    let mut patcher = LoraPatcher::new();
    let set: Vec<(&LoraFile, f32)> = loras.iter().map(|(f, s)| (f, *s)).collect();
    let t = std::time::Instant::now();
    let report = patcher.set(pipe, &set)?;
    pipe.device().synchronize()?;
    let took = t.elapsed();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !loras.is_empty() {
        eprintln!("LoRA: {} file(s), {} layers patched in {:.1?}", loras.len(), report.layers, took);
    }
    Ok((patcher, took))
}

#[derive(Args)]
pub struct LoraArgs {
    /// The LoRA file to describe.
    file: Option<PathBuf>,
    /// The model to match against: `random` (the full-size architecture, default), `tiny`, or a
    /// diffusers-layout folder (its transformer/config.json).
    #[arg(long, default_value = "random")]
    model: String,
    /// Instead: write a LoRA with random factors for every linear of the model (diffusers keys,
    /// bf16), for timing apply/revert and steps with a LoRA (`zimage bench --lora OUT`).
    #[arg(long)]
    make_random: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    rank: usize,
}

fn model_config(model: &str) -> Result<TransformerConfig> {
    Ok(match model {
        "random" => TransformerConfig::z_image_turbo(),
        "tiny" => engine::tiny::transformer_config(),
        dir => engine::loader::read_config(&Path::new(dir).join("transformer/config.json"))?,
    })
}

pub fn run(a: LoraArgs) -> Result<()> {
    let cfg = model_config(&a.model)?;
    if let Some(out) = &a.make_random {
        return make_random(&cfg, a.rank, out);
    }
    let Some(path) = &a.file else { bail!("name a LoRA file (or --make-random OUT)") };
    let file = LoraFile::read(path)?;
    println!("file: {}", path.display());
    println!("sha256: {} (A1111 short hash {})", file.sha256, &file.sha256[..12]);
    let styles: Vec<&str> = file.styles().iter().map(|s| s.describe()).collect();
    let kinds: BTreeSet<&str> = file.adapters.iter().map(|a| a.weights.kind()).collect();
    println!("layout: {} ({})", if styles.is_empty() { "none".to_string() } else { styles.join(" + ") }, kinds.into_iter().collect::<Vec<_>>().join(", "));
    let ranks: BTreeSet<usize> = file.adapters.iter().filter_map(|a| a.weights.rank()).collect();
    println!("rank: {}", ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "));
    let mut alphas: BTreeMap<String, usize> = BTreeMap::new();
    for ad in &file.adapters {
        *alphas.entry(ad.alpha.map(|x| format!("{x}")).unwrap_or_else(|| "none (= rank)".into())).or_default() += 1;
    }
    println!("alpha: {}", alphas.into_iter().map(|(a, n)| format!("{a} x{n}")).collect::<Vec<_>>().join(", "));
    let triggers = file.trigger_words(12);
    println!("trigger words: {}", if triggers.is_empty() { "none in the metadata".into() } else { triggers.join(", ") });
    match file.match_model(&cfg) {
        Ok(m) => {
            // module kinds: the name without its block index
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            for (_, target) in &m.matched {
                let mut parts: Vec<&str> = target.name.split('.').collect();
                if ["layers", "noise_refiner", "context_refiner"].contains(&parts[0]) {
                    parts[1] = "N";
                }
                let generic = parts.join(".");
                *kinds.entry(generic).or_default() += 1;
            }
            println!("modules: {} matched: {}", m.matched.len(), kinds.into_iter().map(|(k, n)| format!("{k} x{n}")).collect::<Vec<_>>().join(", "));
            println!("unmatched: {}", if m.unmatched.is_empty() { "none".into() } else { m.unmatched.join(", ") });
        }
        Err(e) => println!("does not fit the model: {e}"),
    }
    if !file.text_encoder_keys.is_empty() {
        println!("text encoder: {} keys, not applied (the Qwen3 encoder is not adapted)", file.text_encoder_keys.len());
    }
    if !file.unsupported.is_empty() {
        println!("skipped: {}", file.unsupported.join("; "));
    }
    Ok(())
}

/// A rank-`rank` LoRA on every linear module of `cfg`, diffusers keys, bf16, alpha = rank
/// (metadata), small random deltas (|delta| ~ 1e-3 of the weights' scale).
fn make_random(cfg: &TransformerConfig, rank: usize, out: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<(String, engine::lora::Target)> = engine::lora::targets(cfg).into_iter().filter(|(n, t)| *n == t.name && !n.ends_with(".qkv")).collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in &names {
        let a = (Tensor::randn(0f32, 1.0, (rank, t.cols), &dev)? / (t.cols as f64).sqrt())?;
        let b = (Tensor::randn(0f32, 1.0, (t.rows, rank), &dev)? * 1e-3)?;
        tensors.insert(format!("transformer.{name}.lora_A.weight"), a.to_dtype(DType::BF16)?);
        tensors.insert(format!("transformer.{name}.lora_B.weight"), b.to_dtype(DType::BF16)?);
    }
    candle_core::safetensors::save(&tensors, out).with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {} (rank {rank}, {} modules)", out.display(), names.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_the_scale_off_the_file() {
        assert_eq!(parse_spec("a.safetensors").unwrap(), (PathBuf::from("a.safetensors"), 1.0));
        assert_eq!(parse_spec("dir/a.safetensors:-0.5").unwrap(), (PathBuf::from("dir/a.safetensors"), -0.5));
        assert_eq!(parse_spec("C:/x/a.safetensors").unwrap(), (PathBuf::from("C:/x/a.safetensors"), 1.0));
        assert!(parse_spec("a.safetensors:inf").is_err());
    }
}
