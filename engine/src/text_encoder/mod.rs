//! The Qwen3 text encoder (transformers `Qwen3Model`), run only as far as the pipeline needs.
//!
//! Z-Image conditions on `hidden_states[-2]`: the output of decoder layer `L - 2` of `L`, without
//! the final norm. So only the first `L - 1` layers are loaded and run; the last layer and
//! `norm.weight` are never read (and need not be present).
//!
//! The math follows transformers' eager Qwen3: RMSNorm computed in f32 and cast back before the
//! weight; q/k/v/o without bias; per-head `q_norm`/`k_norm` before RoPE; rotate-half RoPE with
//! the tables computed in f32; grouped-query attention; causal softmax (in f32) with scale
//! `1/sqrt(head_dim)`; SwiGLU MLP. Batch size is one and only real tokens are fed: causal
//! attention makes the pipeline's right padding irrelevant to them.
//!
//! On CUDA (bf16) the same math runs as fewer, larger kernels: q|k|v and gate|up as one product
//! each, candle's fused RMSNorm, RoPE on the (token, head, dim) layout and causal flash attention;
//! the whole encoder is replayed as a CUDA graph per token-count bucket (multiples of 64: the
//! padded tail tokens come after every real token, so causal attention keeps them out of the real
//! tokens' outputs).
//!
//! The same weights are a causal LM (the prompt enhancer, `enhancer.rs`): when the checkpoint has
//! the last layer and `norm.weight` they are loaded too, and [`TextEncoder::lm_step`] (`lm.rs`)
//! runs every layer over new tokens with a KV cache, the final norm, and logits through the tied
//! embedding.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::TextEncoderConfig;
use crate::error::{Error, Result};
use crate::graph::GraphCache;
use crate::ops::AttentionKernel;

mod lm;
pub use lm::KvCache;

/// Token counts are padded up to a multiple of this for CUDA graph replays.
const GRAPH_BUCKET: usize = 64;

/// Collects every missing or misshapen weight so that one error names them all.
struct Loader<'a> {
    vb: VarBuilder<'a>,
    problems: Vec<String>,
}

impl<'a> Loader<'a> {
    fn get(&mut self, shape: &[usize], name: &str) -> Option<Tensor> {
        let full = if self.vb.prefix().is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.vb.prefix())
        };
        if !self.vb.contains_tensor(name) {
            self.problems
                .push(format!("missing tensor {full} (expected shape {shape:?})"));
            return None;
        }
        match self.vb.get(shape, name) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problems.push(format!("{full}: {e}"));
                None
            }
        }
    }
    fn pp(&self, s: impl ToString) -> Loader<'a> {
        Loader {
            vb: self.vb.pp(s),
            problems: vec![],
        }
    }
    fn absorb(&mut self, other: Loader<'a>) {
        self.problems.extend(other.problems);
    }
}

/// `weight * (x / sqrt(mean(x^2) + eps))`, normalised in f32 and cast back to x's dtype before
/// the weight multiplies it (transformers' `Qwen3RMSNorm`).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// `rms_norm` as one fused kernel (statistics in f32, the weight applied before the one rounding to
/// bf16), used on CUDA where the composed version is nine launches.
fn rms_norm_fast(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cuda() {
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &weight.to_dtype(x.dtype())?, eps as f32)?);
    }
    rms_norm(x, weight, eps)
}

/// `x @ w^T` for x of shape (L, in) and a (out, in) weight.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(crate::ops::matmul(x, &w.t()?)?)
}

struct Attention {
    /// q, k and v projections stacked along the output dim: one product.
    qkv_proj: Tensor,
    o_proj: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

impl Attention {
    fn load(cfg: &TextEncoderConfig, ld: &mut Loader) -> Option<Self> {
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim(),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        let q_proj = ld.get(&[nh * hd, h], "q_proj.weight");
        let k_proj = ld.get(&[nkv * hd, h], "k_proj.weight");
        let v_proj = ld.get(&[nkv * hd, h], "v_proj.weight");
        let o_proj = ld.get(&[h, nh * hd], "o_proj.weight");
        let q_norm = ld.get(&[hd], "q_norm.weight");
        let k_norm = ld.get(&[hd], "k_norm.weight");
        let qkv_proj = match Tensor::cat(&[q_proj?, k_proj?, v_proj?], 0) {
            Ok(t) => t,
            Err(e) => {
                ld.problems.push(format!("{}: stacking q/k/v: {e}", ld.vb.prefix()));
                return None;
            }
        };
        Some(Self {
            qkv_proj,
            o_proj: o_proj?,
            q_norm: q_norm?,
            k_norm: k_norm?,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
        })
    }

    /// x: (L, hidden); cos/sin: (L, head_dim/2) in x's dtype; `mask`: (L, L) f32 additive causal
    /// mask for the composed attention, `None` with a flash `kernel` (causal by construction).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, kernel: AttentionKernel) -> Result<Tensor> {
        let l = x.dim(0)?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = nh / nkv;

        let qkv = linear(x, &self.qkv_proj)?.reshape((l, nh + 2 * nkv, hd))?;
        let (q, k, v) = (qkv.narrow(1, 0, nh)?, qkv.narrow(1, nh, nkv)?, qkv.narrow(1, nh + nkv, nkv)?);
        let Some(mask) = mask else {
            // Flash: (1, L, heads, hd) throughout, GQA handled by the kernel.
            let q = rms_norm_fast(&q, &self.q_norm, self.eps)?.unsqueeze(0)?;
            let k = rms_norm_fast(&k, &self.k_norm, self.eps)?.unsqueeze(0)?;
            let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?;
            let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?;
            let out = crate::ops::attention_with(kernel, &q, &k, &v.unsqueeze(0)?, true)?;
            return linear(&out.reshape((l, nh * hd))?, &self.o_proj);
        };
        // Per-head norms before RoPE, then heads first: (1, heads, L, hd).
        let q = rms_norm(&q, &self.q_norm, self.eps)?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let k = rms_norm(&k, &self.k_norm, self.eps)?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?; // (nh, L, hd)
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?; // (nkv, L, hd)
        let v = v.transpose(0, 1)?.contiguous()?; // (nkv, L, hd)

        // GQA without copying k/v: query head h uses kv head h / rep, so the `rep` query heads
        // of one kv head are stacked along the sequence axis.
        let q = q.reshape((nkv, rep * l, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (crate::ops::matmul(&q, &k.t()?)? * scale)?; // (nkv, rep*L, L)
        let scores = scores
            .to_dtype(DType::F32)?
            .reshape((nh, l, l))?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = crate::ops::matmul(&probs.reshape((nkv, rep * l, l))?, &v)?; // (nkv, rep*L, hd)
        let out = out
            .reshape((nh, l, hd))?
            .transpose(0, 1)?
            .reshape((l, nh * hd))?;
        linear(&out, &self.o_proj)
    }
}

struct Mlp {
    /// gate and up projections stacked along the output dim: one product.
    gate_up_proj: Tensor,
    down_proj: Tensor,
    intermediate: usize,
}

impl Mlp {
    fn load(cfg: &TextEncoderConfig, ld: &mut Loader) -> Option<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_proj = ld.get(&[i, h], "gate_proj.weight");
        let up_proj = ld.get(&[i, h], "up_proj.weight");
        let down_proj = ld.get(&[h, i], "down_proj.weight");
        let gate_up_proj = match Tensor::cat(&[gate_proj?, up_proj?], 0) {
            Ok(t) => t,
            Err(e) => {
                ld.problems.push(format!("{}: stacking gate/up: {e}", ld.vb.prefix()));
                return None;
            }
        };
        Some(Self { gate_up_proj, down_proj: down_proj?, intermediate: i })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = linear(x, &self.gate_up_proj)?;
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, self.intermediate)?)?;
        let up = gate_up.narrow(1, self.intermediate, self.intermediate)?;
        linear(&(gate * up)?, &self.down_proj)
    }
}

struct DecoderLayer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f64,
}

impl DecoderLayer {
    /// Moves every tensor of the layer into fresh device memory (see `TextEncoder::new`).
    fn copy_storage(&mut self) -> candle_core::Result<()> {
        use crate::ops::copy_storage_of as fresh;
        let a = &mut self.attn;
        for t in [&mut a.qkv_proj, &mut a.o_proj, &mut a.q_norm, &mut a.k_norm, &mut self.mlp.gate_up_proj, &mut self.mlp.down_proj, &mut self.input_layernorm, &mut self.post_attention_layernorm] {
            *t = fresh(t)?;
        }
        Ok(())
    }

    fn load(cfg: &TextEncoderConfig, ld: &mut Loader) -> Option<Self> {
        let h = cfg.hidden_size;
        let mut a = ld.pp("self_attn");
        let attn = Attention::load(cfg, &mut a);
        ld.absorb(a);
        let mut m = ld.pp("mlp");
        let mlp = Mlp::load(cfg, &mut m);
        ld.absorb(m);
        let ln1 = ld.get(&[h], "input_layernorm.weight");
        let ln2 = ld.get(&[h], "post_attention_layernorm.weight");
        Some(Self {
            attn: attn?,
            mlp: mlp?,
            input_layernorm: ln1?,
            post_attention_layernorm: ln2?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, kernel: AttentionKernel) -> Result<Tensor> {
        let h = self.attn.forward(&rms_norm_fast(x, &self.input_layernorm, self.eps)?, cos, sin, mask, kernel)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&rms_norm_fast(&x, &self.post_attention_layernorm, self.eps)?)?;
        Ok((x + h)?)
    }
}

/// Qwen3 text encoder producing Z-Image's prompt embeddings (`hidden_states[-2]`).
pub struct TextEncoder {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    /// The last decoder layer and the final norm, present when the checkpoint has them: what
    /// turns the encoder into the full causal LM (the conditioning never runs them).
    lm_tail: Option<(DecoderLayer, Tensor)>,
    /// The tied embedding on the compute device, as the LM head (uploaded on first use).
    lm_head: std::sync::OnceLock<Tensor>,
    cfg: TextEncoderConfig,
    device: Device,
    dtype: DType,
    graphs: GraphCache<(usize, AttentionKernel)>,
    /// The causal LM's decoding step, one capture per KV buffer set (`lm.rs`).
    decode_graphs: GraphCache<(usize, u64)>,
    /// KV buffer sets free for the next generation (their captures stay valid).
    kv_pool: lm::KvPool,
}

/// The error naming every missing or misshapen weight (or an unusable config).
fn weight_mismatch(problems: Vec<String>) -> Error {
    Error::WeightMismatch { component: "text_encoder".into(), problems }
}

/// Refuses configs the encoder cannot run.
fn check_config(cfg: &TextEncoderConfig) -> Result<()> {
    let bad = weight_mismatch;
    if cfg.num_hidden_layers == 0
        || cfg.num_attention_heads == 0
        || cfg.num_key_value_heads == 0
        || !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
        || !cfg.head_dim().is_multiple_of(2)
    {
        return Err(bad(vec![format!(
            "unsupported config: {} layers, {} heads, {} kv heads, head_dim {} (need >= 1 layer, heads a multiple of kv heads, even head_dim)",
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim()
        )]));
    }
    Ok(())
}

/// A prompt's ids: at least one, each inside the vocabulary.
fn check_prompt_ids(cfg: &TextEncoderConfig, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::InvalidRequest("the prompt produced no tokens".into()));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(Error::InvalidRequest(format!(
            "token id {bad} is outside the text encoder's vocabulary ({} ids); tokenizer and model do not match",
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// The attention kernel of the encoder's prompt pass: causal flash attention on CUDA in bf16 with
/// head_dim 128, the composed math (with a mask) elsewhere.
fn encoder_kernel(cfg: &TextEncoderConfig, device: &Device, dtype: DType) -> AttentionKernel {
    let kernel = AttentionKernel::for_device(device);
    let flash = kernel != AttentionKernel::Composed && dtype == DType::BF16 && cfg.head_dim() == 128;
    if flash { kernel } else { AttentionKernel::Composed }
}

/// Keys under `model.` (a `Qwen3ForCausalLM` checkpoint) or at the top (a saved `Qwen3Model`).
fn model_prefix(vb: VarBuilder) -> VarBuilder {
    if !vb.contains_tensor("embed_tokens.weight") && vb.contains_tensor("model.embed_tokens.weight") {
        vb.pp("model")
    } else {
        vb
    }
}

/// The prompt embeddings `TextEncoder::new(cfg, vb)?.encode_ids(ids)` gives, computed one decoder
/// layer at a time: each layer's weights are read, run and freed before the next. The device holds
/// one layer (~0.2 GB for Qwen3-4B in
/// bf16) instead of the whole encoder (~8 GB): what a freed text encoder (`--free-text-encoder`)
/// needs to fit beside the transformer on a small card. `vb` should read lazily (not preload).
pub fn encode_streamed(cfg: &TextEncoderConfig, vb: VarBuilder, ids: &[u32]) -> Result<Tensor> {
    check_config(cfg)?;
    check_prompt_ids(cfg, ids)?;
    let vb = model_prefix(vb);
    let (device, dtype) = (vb.device().clone(), vb.dtype());
    let bad = weight_mismatch;
    let mut ld = Loader { vb: vb.clone(), problems: vec![] };
    let x = {
        // The table (0.73 GiB for Qwen3-4B) is read, gathered from and freed before the first
        // layer: the device holds it only while nothing else of the encoder is there.
        let embed = ld.get(&[cfg.vocab_size, cfg.hidden_size], "embed_tokens.weight");
        let Some(embed) = embed else { return Err(bad(ld.problems)) };
        embed.index_select(&Tensor::from_vec(ids.to_vec(), ids.len(), &device)?, 0)?
    };
    let kernel = encoder_kernel(cfg, &device, dtype);
    let (cos, sin) = rope_tables(cfg, 0, ids.len(), &device, dtype)?;
    let mask = if kernel == AttentionKernel::Composed { Some(causal_mask(ids.len(), &device)?) } else { None };
    let mut x = x;
    for i in 0..cfg.num_hidden_layers - 1 {
        let mut l = ld.pp(format!("layers.{i}"));
        let layer = DecoderLayer::load(cfg, &mut l);
        ld.absorb(l);
        let Some(layer) = layer.filter(|_| ld.problems.is_empty()) else { return Err(bad(ld.problems)) };
        x = layer.forward(&x, &cos, &sin, mask.as_ref(), kernel)?;
    }
    Ok(x)
}

/// RoPE tables of positions `start..start + l`: (l, head_dim/2) cos and sin, computed in f32 as
/// transformers does (`inv_freq = 1 / theta^(2i/d)`, `freqs = pos * inv_freq`), then cast to
/// `dtype`.
fn rope_tables(cfg: &TextEncoderConfig, start: usize, l: usize, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let theta = cfg.rope_theta() as f32;
    let inv_freq: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0f32 / theta.powf(i as f32 / hd as f32))
        .collect();
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(l * half);
    let mut sin = Vec::with_capacity(l * half);
    for p in start..start + l {
        for &f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (l, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (l, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Additive causal mask (l, l) in f32: 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (l, l), device)?)
}

impl TextEncoder {
    /// Loads the embedding and the first `num_hidden_layers - 1` decoder layers. Accepts the keys
    /// of a saved `Qwen3Model` (`embed_tokens.weight`, `layers.{i}....`) or the same under
    /// `model.` (a `Qwen3ForCausalLM` checkpoint). Computes in the VarBuilder's dtype and device.
    pub fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let bad = weight_mismatch;
        check_config(cfg)?;
        let vb = model_prefix(vb);
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let mut ld = Loader {
            vb,
            problems: vec![],
        };
        let embed_tokens = ld.get(&[cfg.vocab_size, cfg.hidden_size], "embed_tokens.weight");
        let n_run = cfg.num_hidden_layers - 1;
        let mut layers = Vec::with_capacity(n_run);
        for i in 0..n_run {
            let mut l = ld.pp(format!("layers.{i}"));
            let layer = DecoderLayer::load(cfg, &mut l);
            ld.absorb(l);
            if let Some(mut layer) = layer {
                // Read (and its q|k|v and gate|up fused) in the default pool, where the parts come
                // and go; what stays is packed into the weight pool (see `device::with_weight_pool`).
                crate::device::with_weight_pool(&device, || layer.copy_storage())?;
                layers.push(layer);
            }
        }
        if !ld.problems.is_empty() {
            return Err(bad(ld.problems));
        }
        // The causal LM's tail is optional: only loaded when every one of its tensors is there.
        let last = format!("layers.{n_run}");
        let lm_tail = if ld.vb.contains_tensor("norm.weight") && ld.vb.contains_tensor(&format!("{last}.mlp.down_proj.weight")) {
            let mut l = ld.pp(&last);
            let layer = DecoderLayer::load(cfg, &mut l);
            let norm = ld.get(&[cfg.hidden_size], "norm.weight");
            match (layer, norm) {
                (Some(mut layer), Some(norm)) if l.problems.is_empty() && ld.problems.is_empty() => {
                    let norm = crate::device::with_weight_pool(&device, || {
                        layer.copy_storage()?;
                        crate::ops::copy_storage_of(&norm)
                    })?;
                    Some((layer, norm))
                }
                _ => None,
            }
        } else {
            None
        };
        let embed_tokens = embed_tokens.expect("no problems means the embedding loaded");
        // The embedding table (vocab x hidden, 0.73 GiB for Qwen3-4B in bf16) is only gathered
        // from, a few hundred rows per prompt: on accelerators it lives in host memory.
        let embed_tokens = if device.is_cpu() { embed_tokens } else { embed_tokens.to_device(&Device::Cpu)? };
        Ok(Self {
            embed_tokens,
            layers,
            lm_tail,
            lm_head: std::sync::OnceLock::new(),
            cfg: cfg.clone(),
            device,
            dtype,
            graphs: GraphCache::new(crate::graph::enabled_by_env(), 512 / GRAPH_BUCKET),
            decode_graphs: GraphCache::new(crate::graph::enabled_by_env(), lm::KV_POOL_SIZE),
            kv_pool: lm::KvPool::default(),
        })
    }

    /// Turns CUDA graph replays of the encoder on or off (on by default unless
    /// `ZIMAGE_CUDA_GRAPHS=0`); they apply on CUDA devices only.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs = GraphCache::new(on, 512 / GRAPH_BUCKET);
        self.decode_graphs = GraphCache::new(on, lm::KV_POOL_SIZE);
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Width of each output row (the config's `hidden_size`).
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// The rotary tables of positions `start..start + l` only (a decoding step needs one row,
    /// not the whole prefix again).
    fn rope_tables_at(&self, start: usize, l: usize) -> Result<(Tensor, Tensor)> {
        rope_tables(&self.cfg, start, l, &self.device, self.dtype)
    }

    /// Prompt embeddings for token ids of shape (1, L) or (L) (u32 or i64): the output of
    /// decoder layer `num_hidden_layers - 2`, shape (L, hidden), in the model dtype.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = match input_ids.dims() {
            [_] => input_ids.clone(),
            [1, _] => input_ids.squeeze(0)?,
            d => {
                return Err(Error::InvalidRequest(format!(
                    "text encoder input ids must have shape (1, L) or (L), got {d:?}"
                )))
            }
        };
        let ids: Vec<u32> = match ids.dtype() {
            DType::U32 => ids.to_vec1::<u32>()?,
            _ => ids
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
                .collect(),
        };
        self.encode_ids(&ids)
    }

    /// Same as [`forward`](Self::forward) from a slice of ids.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let l = ids.len();
        check_prompt_ids(&self.cfg, ids)?;
        // Padded to a bucket for graph replays (the pad ids' rows come after every real row).
        let padded = if self.graphs.enabled() && self.device.is_cuda() { l.div_ceil(GRAPH_BUCKET) * GRAPH_BUCKET } else { l };
        self.encode_padded(ids, padded)
    }

    /// `encode_ids` run on the ids followed by pad ids up to `padded` tokens, returning the real
    /// tokens' rows: under causal attention they equal the unpadded run's.
    fn encode_padded(&self, ids: &[u32], padded: usize) -> Result<Tensor> {
        let l = ids.len();
        let kernel = encoder_kernel(&self.cfg, &self.device, self.dtype);
        let flash = kernel != AttentionKernel::Composed;
        let mut all_ids = ids.to_vec();
        all_ids.resize(padded, 0);
        let ids = Tensor::from_vec(all_ids, padded, self.embed_tokens.device())?;
        let x = self.embed_tokens.index_select(&ids, 0)?.to_device(&self.device)?; // (L, hidden)
        let (cos, sin) = self.rope_tables_at(0, padded)?;
        let mask = if flash { None } else { Some(causal_mask(padded, &self.device)?) };
        let mut constants = vec![cos.clone(), sin.clone()];
        constants.extend(mask.clone());
        let f = |ins: &[Tensor]| -> candle_core::Result<Tensor> {
            let mut x = ins[0].clone();
            for layer in &self.layers {
                x = layer.forward(&x, &cos, &sin, mask.as_ref(), kernel).map_err(candle_core::Error::wrap)?;
            }
            Ok(x)
        };
        let out = self.graphs.run(&(padded, kernel), &[&x], &constants, &f)?;
        Ok(if padded == l { out } else { out.narrow(0, 0, l)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert!(
            dir.join("expected.safetensors").is_file()
                && dir
                    .join("tiny_model/text_encoder/model.safetensors")
                    .is_file(),
            "test fixtures missing under {}: generate them with the fixture script",
            dir.display()
        );
        dir
    }

    fn tiny_config() -> TextEncoderConfig {
        let p = fixtures().join("tiny_model/text_encoder/config.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn tiny_weights() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(
            fixtures().join("tiny_model/text_encoder/model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn load_tiny() -> TextEncoder {
        let path = fixtures().join("tiny_model/text_encoder/model.safetensors");
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap()
        };
        TextEncoder::new(&tiny_config(), vb).unwrap()
    }

    fn expected() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap()
    }

    /// (max abs error, max |expected|).
    fn compare(got: &Tensor, want: &Tensor) -> (f32, f32) {
        assert_eq!(got.dims(), want.dims());
        let want = want.to_dtype(DType::F32).unwrap();
        let err = (got.to_dtype(DType::F32).unwrap() - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        let scale = want.abs().unwrap().max_all().unwrap();
        (
            err.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        )
    }

    fn check_case(enc: &TextEncoder, exp: &HashMap<String, Tensor>, key: &str) {
        let ids = exp[&format!("{key}.input_ids")].unsqueeze(0).unwrap(); // (1, L) i64
        let want = &exp[&format!("{key}.embeds")];
        let got = enc.forward(&ids).unwrap();
        let (err, scale) = compare(&got, want);
        let tol = 1e-4 * scale.max(1.0);
        eprintln!(
            "{key}: L={} max abs err {err:.3e} (max |expected| {scale:.3}, tol {tol:.1e})",
            got.dim(0).unwrap()
        );
        assert!(err <= tol, "{key}: max abs err {err} > {tol}");
        // u32 ids give the same result.
        let ids_u32 = ids.to_dtype(DType::U32).unwrap();
        let again = enc.forward(&ids_u32).unwrap();
        assert_eq!(compare(&again, &got).0, 0.0);
    }

    #[test]
    fn tiny_matches_reference_short() {
        let enc = load_tiny();
        assert_eq!(enc.layers.len(), 2);
        check_case(&enc, &expected(), "te");
    }

    #[test]
    fn tiny_matches_reference_long() {
        check_case(&load_tiny(), &expected(), "te_long");
    }

    #[test]
    fn causal_prefix_is_stable() {
        // Causality: a prefix of the ids gives the prefix of the output.
        let enc = load_tiny();
        let exp = expected();
        let ids = exp["te.input_ids"].to_dtype(DType::U32).unwrap();
        let full = enc.forward(&ids).unwrap();
        let part = enc.forward(&ids.narrow(0, 0, 20).unwrap()).unwrap();
        let (err, _) = compare(&part, &full.narrow(0, 0, 20).unwrap());
        assert!(err < 1e-5, "prefix err {err}");
    }

    #[test]
    fn padding_to_a_bucket_leaves_the_real_tokens_unchanged() {
        // What the CUDA graph replays rely on: pad ids after the prompt do not reach its rows.
        let enc = load_tiny();
        let ids: Vec<u32> = expected()["te.input_ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        let plain = enc.encode_ids(&ids).unwrap();
        let padded = enc.encode_padded(&ids, ids.len().div_ceil(GRAPH_BUCKET) * GRAPH_BUCKET + GRAPH_BUCKET).unwrap();
        assert_eq!(padded.dims(), plain.dims());
        let (err, _) = compare(&padded, &plain);
        assert!(err < 1e-5, "padded vs plain {err}");
    }

    #[test]
    fn accepts_causal_lm_prefix_and_needs_no_last_layer_or_norm() {
        let cfg = tiny_config();
        let last = format!("layers.{}.", cfg.num_hidden_layers - 1);
        let weights: HashMap<String, Tensor> = tiny_weights()
            .into_iter()
            .filter(|(k, _)| k != "norm.weight" && !k.starts_with(&last))
            .map(|(k, v)| (format!("model.{k}"), v))
            .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let enc = TextEncoder::new(&cfg, vb).unwrap();
        let exp = expected();
        let got = enc.forward(&exp["te.input_ids"]).unwrap();
        let reference = load_tiny().forward(&exp["te.input_ids"]).unwrap();
        assert_eq!(compare(&got, &reference).0, 0.0);
    }

    #[test]
    fn encoding_one_layer_at_a_time_equals_the_resident_encoder() {
        let path = fixtures().join("tiny_model/text_encoder/model.safetensors");
        let ids: Vec<u32> = (0..37).map(|i| (i * 13 % 250) as u32).collect();
        let (vb, problems) = crate::weights::lazy_checked_var_builder(&[&path], DType::F32, &Device::Cpu).unwrap();
        let streamed = encode_streamed(&tiny_config(), vb, &ids).unwrap();
        assert!(problems.take().is_empty());
        let resident = load_tiny().encode_ids(&ids).unwrap();
        assert_eq!(streamed.to_vec2::<f32>().unwrap(), resident.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn the_streamed_encoder_names_a_missing_layer_weight() {
        let mut weights = tiny_weights();
        let last_run = tiny_config().num_hidden_layers - 2;
        weights.remove(&format!("layers.{last_run}.mlp.down_proj.weight"));
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        match encode_streamed(&tiny_config(), vb, &[1, 2, 3]) {
            Err(Error::WeightMismatch { problems, .. }) => {
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert!(problems[0].contains(&format!("layers.{last_run}.mlp.down_proj.weight")), "{problems:?}");
            }
            other => panic!("expected a weight mismatch, got {:?}", other.map(|t| t.dims().to_vec())),
        }
        assert!(matches!(encode_streamed(&tiny_config(), VarBuilder::from_tensors(tiny_weights(), DType::F32, &Device::Cpu), &[]), Err(Error::InvalidRequest(_))));
    }

    #[test]
    fn missing_and_misshapen_weights_are_all_named() {
        let cfg = tiny_config();
        let mut weights = tiny_weights();
        weights.remove("layers.0.self_attn.q_norm.weight");
        weights.insert(
            "layers.1.mlp.up_proj.weight".into(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        match TextEncoder::new(&cfg, vb) {
            Err(Error::WeightMismatch {
                component,
                problems,
            }) => {
                assert_eq!(component, "text_encoder");
                assert_eq!(problems.len(), 2, "{problems:?}");
                assert!(
                    problems[0].contains("layers.0.self_attn.q_norm.weight"),
                    "{problems:?}"
                );
                assert!(
                    problems[1].contains("layers.1.mlp.up_proj.weight"),
                    "{problems:?}"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("loading should fail"),
        }
    }

    #[test]
    fn rejects_out_of_vocab_ids() {
        let enc = load_tiny();
        assert!(matches!(
            enc.encode_ids(&[1, 2, 259]),
            Err(Error::InvalidRequest(_))
        ));
        assert!(matches!(enc.encode_ids(&[]), Err(Error::InvalidRequest(_))));
    }
}
