//! Z-Image-Turbo inference on candle: the S3-DiT transformer, the Qwen3 text encoder, the Flux VAE,
//! the flow-matching scheduler and the sampling pipeline, plus model loading (diffusers layout,
//! Hugging Face hub: cache and download, or the built-in `tiny` model), and LoRA merging (`lora`).
//! This crate owns the math and the model files. It must not contain web code, global state,
//! or anything that blocks on user input; callers drive it through `pipeline::Pipeline`.

pub mod chat_template;
pub mod config;
pub mod device;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod enhancer;
pub mod error;
#[cfg(feature = "flash-attn-v3-fp8")]
pub mod flash_fp8;
pub mod fp8;
pub mod graph;
pub mod hub;
pub mod int8;
pub mod loader;
pub mod lora;
pub mod ops;
pub mod pipeline;
pub mod png_meta;
pub mod preview;
pub mod rng;
pub mod scheduler;
pub mod text_encoder;
pub mod tiny;
pub mod tokenizer;
pub mod transformer;
pub mod vae;
pub mod weights;

#[cfg(test)]
pub mod testutil;

pub use error::{Error, Result};
