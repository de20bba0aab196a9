//! The built-in `tiny` model: the Z-Image architecture at small dims with deterministic random
//! weights and a byte-level tokenizer, so everything runs offline. Its images are noise-like
//! patterns, not pictures. `write_dir` saves it in the diffusers layout for the real loader.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;

use crate::config::{SchedulerConfig, TextEncoderConfig, TransformerConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::tokenizer::write_tiny_tokenizer_files;
use crate::weights::{random_var_builder, RandomWeights};

pub const TINY_NAME: &str = "tiny";
/// Seeds of the three components' weights; changing them changes every tiny image.
const SEEDS: [u64; 3] = [0x5EED_0001, 0x5EED_0002, 0x5EED_0003];

pub fn transformer_config() -> TransformerConfig {
    TransformerConfig {
        dim: 64,
        n_layers: 2,
        n_refiner_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        cap_feat_dim: 64,
        axes_dims: vec![8, 12, 12],
        ..TransformerConfig::z_image_turbo()
    }
}

pub fn text_encoder_config() -> TextEncoderConfig {
    TextEncoderConfig {
        vocab_size: 259,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: Some(16),
        max_position_embeddings: 1024,
        ..TextEncoderConfig::qwen3_4b()
    }
}

pub fn vae_config() -> VaeConfig {
    VaeConfig { block_out_channels: vec![8, 16, 16, 32], layers_per_block: 1, norm_num_groups: 8, ..VaeConfig::flux() }
}

/// The three random weight sources, in (transformer, text encoder, VAE) order.
fn sources() -> [Arc<RandomWeights>; 3] {
    SEEDS.map(|s| Arc::new(RandomWeights::new(s)))
}

/// The tiny model's text encoder alone (every layer: the enhancer's causal LM too).
pub fn text_encoder(device: &Device, dtype: DType) -> Result<crate::text_encoder::TextEncoder> {
    let [_, te, _] = sources();
    crate::text_encoder::TextEncoder::new(&text_encoder_config(), random_var_builder(&te, dtype, device))
}

/// The tiny model's weights, one `VarBuilder` per component (transformer, text encoder, VAE):
/// `Pipeline::tiny` builds the pipeline from them.
pub fn var_builders(device: &Device, dtype: DType) -> [VarBuilder<'static>; 3] {
    sources().map(|w| random_var_builder(&w, dtype, device))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    let s = serde_json::to_string_pretty(v).expect("json");
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

fn with_class(v: impl serde::Serialize, class: &str, lib: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(v).expect("config serializes");
    v[if lib == "diffusers" { "_class_name" } else { "architectures" }] =
        if lib == "diffusers" { json!(class) } else { json!([class]) };
    v
}

fn save(tensors: BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, path).map_err(Error::from)
}

/// Writes the tiny model in the diffusers layout (weights in f32).
pub fn write_dir(dir: &Path) -> Result<()> {
    let [t, te, vae] = sources();
    // Building the components pulls every tensor through the random sources, which records them.
    let cpu = Device::Cpu;
    crate::transformer::ZImageTransformer::new(&transformer_config(), random_var_builder(&t, DType::F32, &cpu))?;
    crate::text_encoder::TextEncoder::new(&text_encoder_config(), random_var_builder(&te, DType::F32, &cpu))?;
    crate::vae::AutoencoderKl::new(&vae_config(), random_var_builder(&vae, DType::F32, &cpu))?;
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "ZImagePipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &with_class(SchedulerConfig::default(), "FlowMatchEulerDiscreteScheduler", "diffusers"))?;
    write_json(&dir.join("transformer/config.json"), &with_class(transformer_config(), "ZImageTransformer2DModel", "diffusers"))?;
    write_json(&dir.join("text_encoder/config.json"), &with_class(text_encoder_config(), "Qwen3Model", "transformers"))?;
    write_json(&dir.join("vae/config.json"), &with_class(vae_config(), "AutoencoderKL", "diffusers"))?;
    save(t.tensors(), &dir.join("transformer/diffusion_pytorch_model.safetensors"))?;
    save(te.tensors(), &dir.join("text_encoder/model.safetensors"))?;
    save(vae.tensors(), &dir.join("vae/diffusion_pytorch_model.safetensors"))?;
    write_tiny_tokenizer_files(dir.join("tokenizer"))?;
    Ok(())
}
