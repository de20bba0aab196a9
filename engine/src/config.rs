//! Model configurations, read from the diffusers/transformers `config.json` files (serde).
//! Every field that the real files carry and the math needs is here; unknown keys are ignored.

use serde::{Deserialize, Serialize};

/// `transformer/config.json` of `ZImageTransformer2DModel`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransformerConfig {
    #[serde(default = "d_patch")]
    pub all_patch_size: Vec<usize>,
    #[serde(default = "d_fpatch")]
    pub all_f_patch_size: Vec<usize>,
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    pub rope_theta: f64,
    pub t_scale: f64,
    pub axes_dims: Vec<usize>,
    pub axes_lens: Vec<usize>,
}
fn d_patch() -> Vec<usize> {
    vec![2]
}
fn d_fpatch() -> Vec<usize> {
    vec![1]
}

impl TransformerConfig {
    /// The published Z-Image-Turbo transformer.
    pub fn z_image_turbo() -> Self {
        Self {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1536, 512, 512],
        }
    }
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    /// SwiGLU hidden size: int(dim / 3 * 8), as the reference computes it in floating point.
    pub fn ffn_hidden(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }
    /// Width of the timestep conditioning vector (ADALN_EMBED_DIM = 256, capped by dim).
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(256)
    }
    pub fn patch_size(&self) -> usize {
        self.all_patch_size[0]
    }
    pub fn f_patch_size(&self) -> usize {
        self.all_f_patch_size[0]
    }
}

/// `text_encoder/config.json` of the Qwen3 text encoder (transformers `Qwen3Config`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// transformers < 5 writes `rope_theta` at the top level ...
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// ... transformers >= 5 writes it inside `rope_parameters`.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}
fn d_max_pos() -> usize {
    40960
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

impl TextEncoderConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(1_000_000.0)
    }
    /// The published Qwen3-4B text encoder.
    pub fn qwen3_4b() -> Self {
        Self {
            vocab_size: 151936,
            hidden_size: 2560,
            intermediate_size: 9728,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: Some(128),
            rms_norm_eps: 1e-6,
            rope_theta: Some(1_000_000.0),
            rope_parameters: None,
            max_position_embeddings: 40960,
            tie_word_embeddings: true,
        }
    }
}

/// `vae/config.json` of the Flux `AutoencoderKL`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub use_quant_conv: bool,
    #[serde(default)]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}
fn d_three() -> usize {
    3
}
fn d_groups() -> usize {
    32
}
fn d_true() -> bool {
    true
}

impl VaeConfig {
    /// The published Flux VAE used by Z-Image.
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 16,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }
    /// Pixels per latent pixel: 2^(number of blocks - 1).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }
}

/// `scheduler/scheduler_config.json` of `FlowMatchEulerDiscreteScheduler`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
}
fn d_train_steps() -> usize {
    1000
}
fn d_shift() -> f64 {
    3.0
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { num_train_timesteps: 1000, shift: 3.0, use_dynamic_shifting: false }
    }
}
