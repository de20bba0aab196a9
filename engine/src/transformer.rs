//! The Z-Image S3-DiT (`ZImageTransformer2DModel`): timestep embedder, caption embedder, noise
//! refiner (modulated) and context refiner (unmodulated) blocks, the joint blocks over
//! [image tokens, caption tokens], the final layer, with the reference's multiple-of-32 padding
//! (learned pad tokens) and 3-axis RoPE position ids.
//! It computes one denoiser call; the sampling loop lives in `pipeline`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::TransformerConfig;
use crate::ops::{add_rms_norm_weighted, attention_with, layer_norm_plain, qk_norm_rope, AttentionKernel, Linear, LinearInput, QuantContext, Quantization, RmsNorm};

/// Token lists are padded to a multiple of this (SEQ_MULTI_OF in the reference).
pub const SEQ_MULTIPLE: usize = 32;
const FREQ_EMBED_DIM: usize = 256;
const T_EMBED_MID: usize = 1024;

fn padded_len(n: usize) -> usize {
    n.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE
}

/// Sinusoidal timestep features followed by a two-layer MLP.
#[derive(Clone)]
struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
}

impl TimestepEmbedder {
    fn new(out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(FREQ_EMBED_DIM, T_EMBED_MID, true, vb.pp("mlp.0"))?,
            fc2: Linear::new(T_EMBED_MID, out, true, vb.pp("mlp.2"))?,
        })
    }
    /// `t` (B,) f32, already multiplied by t_scale.
    fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let half = FREQ_EMBED_DIM / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32).ln() * i as f32 / half as f32).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(dtype)?;
        self.fc2.forward(&self.fc1.forward(&emb)?.silu()?)
    }
}

/// SwiGLU feed-forward: w2(silu(w1 x) * w3 x), with w1 and w3 as one fused layer (gate then up).
#[derive(Clone)]
struct FeedForward {
    w13: Linear,
    w2: Linear,
    hidden: usize,
}

impl FeedForward {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            w13: Linear::fused(dim, &[hidden, hidden], &[vb.pp("w1"), vb.pp("w3")])?,
            w2: Linear::new(hidden, dim, false, vb.pp("w2"))?,
            hidden,
        })
    }
    fn quantize(&mut self, ctx: &QuantContext) -> Result<()> {
        self.w13.quantize(ctx)?;
        self.w2.quantize(ctx)
    }
    fn copy_storage(&mut self) -> Result<()> {
        self.w13.copy_storage()?;
        self.w2.copy_storage()
    }
    fn keep_dense(&mut self, on: &Device) -> Result<()> {
        self.w13.keep_dense(on)?;
        self.w2.keep_dense(on)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_input(&self.w13.prepare(x)?)
    }
    /// The feed-forward of an input already prepared for w1|w3 (see `Linear::prepare_rms_normed`).
    fn forward_input(&self, x: &LinearInput) -> Result<Tensor> {
        if let Some(h) = self.w13.forward_swiglu_int8(x)? {
            return self.w2.forward_input(&h);
        }
        let gate_up = self.w13.forward_input(x)?;
        #[cfg(feature = "cuda")]
        let rows = gate_up.elem_count() / (2 * self.hidden);
        #[cfg(feature = "cuda")]
        if self.w2.fp8_scaling() == Some(crate::fp8::ActivationScaling::Row) && gate_up.device().is_cuda() {
            // One kernel: silu(gate) * up cast to E4M3 with each row's scale, never written in bf16.
            let dims = gate_up.dims().to_vec();
            let lead = dims[..dims.len() - 1].to_vec();
            if let Some((q, scale)) = crate::cuda::swiglu_e4m3_rows(&gate_up.reshape((rows, 2 * self.hidden))?, None)? {
                let q = crate::ops::QuantizedInput::Fp8(crate::fp8::QuantizedActivation { q, scale });
                return self.w2.forward_input(&LinearInput::quantized_only(lead, q, gate_up.dtype()));
            }
        }
        #[cfg(feature = "cuda")]
        if matches!(self.w2.fp8_scaling(), Some(crate::fp8::ActivationScaling::Tensor | crate::fp8::ActivationScaling::RowFolded)) && gate_up.device().is_cuda() && gate_up.dtype() == DType::BF16 && (rows * self.hidden) % 8 == 0 && self.hidden % 2 == 0 {
            // One pass: silu(gate) * up, its amax, then its E4M3 quantization for w2 (the kernel
            // works in pairs and quantizes 8 values at a time; other widths take the ops below).
            let dims = gate_up.dims().to_vec();
            let lead = dims[..dims.len() - 1].to_vec();
            let (h, q, scale) = crate::cuda::swiglu_quantized(&gate_up.reshape((rows, 2 * self.hidden))?)?;
            let q = crate::ops::QuantizedInput::Fp8(crate::fp8::QuantizedActivation { q, scale });
            return self.w2.forward_input(&LinearInput::from_parts(lead, h, Some(q)));
        }
        let gate = gate_up.narrow(D::Minus1, 0, self.hidden)?;
        let up = gate_up.narrow(D::Minus1, self.hidden, self.hidden)?;
        self.w2.forward(&(gate.silu()? * up)?)
    }
}

/// Rotary tables for one sequence: cos and sin of shape (L, head_dim/2), f32.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Angles per axis are computed as the reference does: frequencies in f64, the outer product
    /// with the position rounded to f32, then cos/sin.
    pub fn new(cfg: &TransformerConfig, positions: &[[usize; 3]], device: &Device) -> Result<Self> {
        let half: usize = cfg.axes_dims.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let axis_freqs: Vec<Vec<f64>> = cfg
            .axes_dims
            .iter()
            .map(|&d| (0..d / 2).map(|k| 1.0 / cfg.rope_theta.powf((2 * k) as f64 / d as f64)).collect())
            .collect();
        for pos in positions {
            for (axis, freqs) in axis_freqs.iter().enumerate() {
                for f in freqs {
                    let angle = (pos[axis] as f64 * f) as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let l = positions.len();
        Ok(Self {
            cos: Tensor::from_vec(cos, (l, half), device)?,
            sin: Tensor::from_vec(sin, (l, half), device)?,
        })
    }
    fn cat(parts: &[&Rope]) -> Result<Rope> {
        let cos: Vec<&Tensor> = parts.iter().map(|r| &r.cos).collect();
        let sin: Vec<&Tensor> = parts.iter().map(|r| &r.sin).collect();
        Ok(Rope { cos: Tensor::cat(&cos, 0)?, sin: Tensor::cat(&sin, 0)? })
    }
    /// x: (B, L, H, D), after the optional per-head norm. Rotates adjacent pairs (a complex
    /// multiply) in f32, rounding once to x's dtype, as the reference does.
    fn apply(&self, x: &Tensor, norm: Option<&RmsNorm>) -> Result<Tensor> {
        qk_norm_rope(x, norm, &self.cos, &self.sin)
    }
    /// The whole attention of a fused qkv product through the FP8 kernel, when `kernel` is that
    /// one and the inputs suit it (see `ops::attention_qkv_fp8`).
    fn attend_fp8(&self, kernel: AttentionKernel, qkv: &Tensor, heads: usize, kv_heads: usize, norm_q: Option<&RmsNorm>, norm_k: Option<&RmsNorm>) -> Result<Option<Tensor>> {
        crate::ops::attention_qkv_fp8(kernel, qkv, heads, kv_heads, norm_q, norm_k, &self.cos, &self.sin)
    }
}

/// Self-attention with q, k and v from one fused layer (its output holds the q heads, then the k
/// heads, then the v heads of each token).
#[derive(Clone)]
struct Attention {
    to_qkv: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let (dim, hd) = (cfg.dim, cfg.head_dim());
        let (norm_q, norm_k) = if cfg.qk_norm {
            (Some(RmsNorm::new(hd, 1e-5, vb.pp("norm_q"))?), Some(RmsNorm::new(hd, 1e-5, vb.pp("norm_k"))?))
        } else {
            (None, None)
        };
        let (q_out, kv_out) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        Ok(Self {
            to_qkv: Linear::fused(dim, &[q_out, kv_out, kv_out], &[vb.pp("to_q"), vb.pp("to_k"), vb.pp("to_v")])?,
            to_out: Linear::new(cfg.n_heads * hd, dim, false, vb.pp("to_out.0"))?,
            norm_q,
            norm_k,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
        })
    }
    fn quantize(&mut self, ctx: &QuantContext) -> Result<()> {
        self.to_qkv.quantize(ctx)?;
        self.to_out.quantize(ctx)
    }
    fn copy_storage(&mut self) -> Result<()> {
        self.to_qkv.copy_storage()?;
        self.to_out.copy_storage()?;
        for n in [&mut self.norm_q, &mut self.norm_k].into_iter().flatten() {
            n.copy_storage()?;
        }
        Ok(())
    }
    fn keep_dense(&mut self, on: &Device) -> Result<()> {
        self.to_qkv.keep_dense(on)?;
        self.to_out.keep_dense(on)
    }
    fn forward(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        self.forward_input(&self.to_qkv.prepare(x)?, rope)
    }
    /// Attention over an input (B, L, dim) already prepared for the qkv product.
    fn forward_input(&self, x: &LinearInput, rope: &Rope) -> Result<Tensor> {
        self.to_out.forward(&self.attend(x, rope)?)
    }
    /// The attention's heads (B, L, H * D) before the output projection.
    fn attend(&self, x: &LinearInput, rope: &Rope) -> Result<Tensor> {
        let (b, l) = x.lead_dims2()?;
        let (h, kv) = (self.n_heads, self.n_kv_heads);
        // (B, L, H + 2 KV, D); q, k and v are head-range views of it, read in place by the fused
        // norm + RoPE kernel and by flash attention.
        let qkv = self.to_qkv.forward_input(x)?.reshape((b, l, h + 2 * kv, self.head_dim))?;
        let kernel = AttentionKernel::for_transformer(qkv.device(), self.to_qkv.quantization(), self.head_dim);
        if let Some(out) = rope.attend_fp8(kernel, &qkv, h, kv, self.norm_q.as_ref(), self.norm_k.as_ref())? {
            return out.reshape((b, l, ()));
        }
        let q = rope.apply(&qkv.narrow(2, 0, h)?, self.norm_q.as_ref())?;
        let k = rope.apply(&qkv.narrow(2, h, kv)?, self.norm_k.as_ref())?;
        let v = qkv.narrow(2, h + kv, kv)?;
        let out = attention_with(kernel, &q, &k, &v, false)?; // (B, L, H, D)
        out.reshape((b, l, ()))
    }
}

/// A transformer block; `modulation` blocks scale and gate by the timestep embedding.
#[derive(Clone)]
struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    ada_ln: Option<Linear>,
}

impl Block {
    fn new(cfg: &TransformerConfig, modulation: bool, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.dim;
        let ada_ln = if modulation {
            Some(Linear::new(cfg.adaln_dim(), 4 * dim, true, vb.pp("adaLN_modulation.0"))?)
        } else {
            None
        };
        Ok(Self {
            attention: Attention::new(cfg, vb.pp("attention"))?,
            feed_forward: FeedForward::new(dim, cfg.ffn_hidden(), vb.pp("feed_forward"))?,
            attention_norm1: RmsNorm::new(dim, cfg.norm_eps, vb.pp("attention_norm1"))?,
            attention_norm2: RmsNorm::new(dim, cfg.norm_eps, vb.pp("attention_norm2"))?,
            ffn_norm1: RmsNorm::new(dim, cfg.norm_eps, vb.pp("ffn_norm1"))?,
            ffn_norm2: RmsNorm::new(dim, cfg.norm_eps, vb.pp("ffn_norm2"))?,
            ada_ln,
        })
    }

    /// Moves every tensor of the block into fresh device memory (see `new_quantized`).
    fn copy_storage(&mut self) -> Result<()> {
        self.attention.copy_storage()?;
        self.feed_forward.copy_storage()?;
        for n in [&mut self.attention_norm1, &mut self.attention_norm2, &mut self.ffn_norm1, &mut self.ffn_norm2] {
            n.copy_storage()?;
        }
        if let Some(a) = &mut self.ada_ln {
            a.copy_storage()?;
        }
        Ok(())
    }

    fn quantize(&mut self, ctx: &QuantContext) -> Result<()> {
        self.attention.quantize(ctx)?;
        self.feed_forward.quantize(ctx)
    }
    fn keep_dense(&mut self, on: &Device) -> Result<()> {
        self.attention.keep_dense(on)?;
        self.feed_forward.keep_dense(on)
    }

    /// The four norm weights of a modulated block with its adaLN scales and tanh gates folded in,
    /// for each row of `adaln` (S, adaln_dim): (S, 4, dim), in the order attention_norm1 * (1 +
    /// scale_msa), attention_norm2 * tanh(gate_msa), ffn_norm1 * (1 + scale_mlp), ffn_norm2 *
    /// tanh(gate_mlp). rms_norm(x) * w * s == rms_norm(x, w * s): one fused pass per norm instead
    /// of a norm plus a broadcast multiply, and none of this work inside the denoising steps.
    fn folded_modulation(&self, adaln: &Tensor, dtype: DType) -> Result<Tensor> {
        let Some(ada) = &self.ada_ln else { candle_core::bail!("folded_modulation on an unmodulated block") };
        let s = adaln.dim(0)?;
        let m = ada.forward(adaln)?; // (S, 4 * dim)
        let dim = m.dim(1)? / 4;
        let chunk = |i: usize| m.narrow(1, i * dim, dim);
        let parts = [
            self.attention_norm1.fold(dtype, &(chunk(0)? + 1.0)?)?,
            self.attention_norm2.fold(dtype, &chunk(1)?.tanh()?)?,
            self.ffn_norm1.fold(dtype, &(chunk(2)? + 1.0)?)?,
            self.ffn_norm2.fold(dtype, &chunk(3)?.tanh()?)?,
        ];
        Tensor::stack(&parts, 1)?.reshape((s, 4, dim))
    }

    /// A modulated block with its folded weights `w` (4, dim) from `folded_modulation`.
    fn forward_folded(&self, x: &Tensor, rope: &Rope, w: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.forward_folded_row_scaled(x, rope, w)? {
            return Ok(y);
        }
        let eps = self.attention_norm1.eps();
        let attn_in = self.attention.to_qkv.prepare_rms_normed(x, &w.get(0)?, eps)?;
        let attn_out = self.attention.forward_input(&attn_in, rope)?;
        let x = add_rms_norm_weighted(x, &attn_out, &w.get(1)?, self.attention_norm2.eps())?;
        let ffn_in = self.feed_forward.w13.prepare_rms_normed(&x, &w.get(2)?, self.ffn_norm1.eps())?;
        let ffn_out = self.feed_forward.forward_input(&ffn_in)?;
        add_rms_norm_weighted(&x, &ffn_out, &w.get(3)?, self.ffn_norm2.eps())
    }

    /// `forward_folded` with FP8 row scales applied by the next kernel
    /// (`ActivationScaling::RowFolded`): the attention output, the feed-forward input (RMSNorm
    /// and cast in one kernel) and the SwiGLU output (one kernel) are quantized per row; their
    /// products run with a unit activation scale, and the SwiGLU and gated-residual kernels
    /// multiply each row by its scale as they read it. q|k|v keep one scale per tensor (V goes
    /// into attention, which takes no row scales). None where this path does not apply (other
    /// formats or devices, shapes the kernels refuse): then the block runs `forward_folded`'s
    /// other path from the start.
    #[cfg(feature = "cuda")]
    fn forward_folded_row_scaled(&self, x: &Tensor, rope: &Rope, w: &Tensor) -> Result<Option<Tensor>> {
        use crate::fp8::ActivationScaling::RowFolded;
        let ff = &self.feed_forward;
        let scalings = [self.attention.to_out.fp8_scaling(), ff.w13.fp8_scaling(), ff.w2.fp8_scaling()];
        if scalings.iter().any(|s| *s != Some(RowFolded)) || !x.device().is_cuda() || x.dtype() != DType::BF16 {
            return Ok(None);
        }
        let (b, l, dim) = x.dims3()?;
        let rows = b * l;
        let attn_in = self.attention.to_qkv.prepare_rms_normed(x, &w.get(0)?, self.attention_norm1.eps())?;
        let heads = self.attention.attend(&attn_in, rope)?;
        let Some((q, s)) = crate::cuda::quantize_e4m3_rows(&heads.reshape((rows, ()))?)? else { return Ok(None) };
        let y = self.attention.to_out.fp8_matmul_unscaled(&q, x.dtype())?.reshape((b, l, dim))?;
        let x = crate::cuda::add_rms_norm_scaled(x, &y, &w.get(1)?, self.attention_norm2.eps() as f32, Some(&s))?;
        let Some((q1, s1)) = crate::cuda::rms_norm_e4m3_rows(&x.reshape((rows, dim))?, &w.get(2)?, self.ffn_norm1.eps() as f32)? else {
            return Ok(None);
        };
        let gate_up = ff.w13.fp8_matmul_unscaled(&q1, x.dtype())?;
        let Some((q2, s2)) = crate::cuda::swiglu_e4m3_rows(&gate_up, Some(&s1))? else { return Ok(None) };
        let y = ff.w2.fp8_matmul_unscaled(&q2, x.dtype())?.reshape((b, l, dim))?;
        Ok(Some(crate::cuda::add_rms_norm_scaled(&x, &y, &w.get(3)?, self.ffn_norm2.eps() as f32, Some(&s2))?))
    }

    /// An unmodulated block (the context refiner).
    fn forward_plain(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        if self.ada_ln.is_some() {
            candle_core::bail!("modulated block called without its modulation");
        }
        let attn_out = self.attention.forward(&self.attention_norm1.forward(x)?, rope)?;
        let x = self.attention_norm2.add_to(x, &attn_out, None)?;
        let ffn_out = self.feed_forward.forward(&self.ffn_norm1.forward(&x)?)?;
        self.ffn_norm2.add_to(&x, &ffn_out, None)
    }
}

#[derive(Clone)]
struct FinalLayer {
    linear: Linear,
    ada_ln: Linear,
}

impl FinalLayer {
    fn new(cfg: &TransformerConfig, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(cfg.dim, out, true, vb.pp("linear"))?,
            ada_ln: Linear::new(cfg.adaln_dim(), cfg.dim, true, vb.pp("adaLN_modulation.1"))?,
        })
    }
    /// 1 + scale for each row of `adaln` (S, adaln_dim): (S, dim).
    fn scale(&self, adaln: &Tensor) -> Result<Tensor> {
        self.ada_ln.forward(&adaln.silu()?)? + 1.0
    }
    /// x (B, T, dim), scale (dim).
    fn forward(&self, x: &Tensor, scale: &Tensor) -> Result<Tensor> {
        self.linear.forward(&layer_norm_plain(x, 1e-6)?.broadcast_mul(scale)?)
    }
}

/// The caption side of a request for the denoiser, computed once and used at every step: the
/// caption tokens after the embedder, the learned padding and the context refiner (they depend on
/// neither the latents nor the time), and the RoPE tables for one latent size.
pub struct Conditioning {
    /// (B, cap_pad, dim), refined.
    cap: Tensor,
    img_rope: Rope,
    joint_rope: Rope,
    /// (f, h, w) of the latents this was made for.
    latent: (usize, usize, usize),
}

impl Conditioning {
    /// The refined caption tokens (B, cap_pad, dim).
    pub fn captions(&self) -> &Tensor {
        &self.cap
    }
    /// Tensors a captured forward reads besides its inputs (kept alive with the capture).
    pub fn tables(&self) -> Vec<Tensor> {
        vec![self.img_rope.cos.clone(), self.img_rope.sin.clone(), self.joint_rope.cos.clone(), self.joint_rope.sin.clone()]
    }
    /// What fixes the shapes of a forward with this conditioning: (batch, padded caption
    /// length, latent f, h, w).
    pub fn shape_key(&self) -> [usize; 5] {
        let (b, l, _) = self.cap.dims3().unwrap_or((0, 0, 0));
        [b, l, self.latent.0, self.latent.1, self.latent.2]
    }
    /// The same tables and shapes with other caption tokens of the same shape (the caption of a
    /// replayed forward is one of its inputs).
    pub fn with_captions(&self, cap: Tensor) -> Result<Self> {
        if cap.dims() != self.cap.dims() {
            candle_core::bail!("captions {:?} where {:?} were prepared", cap.dims(), self.cap.dims());
        }
        Ok(Self { cap, img_rope: self.img_rope.clone(), joint_rope: self.joint_rope.clone(), latent: self.latent })
    }
}

/// The denoiser. `forward` takes latents (B, C, F, H, W), model times (B,) in [0, 1]
/// (0 = pure noise) and one caption feature matrix (L_i, cap_feat_dim) per batch item.
#[derive(Clone)]
pub struct ZImageTransformer {
    cfg: TransformerConfig,
    t_embedder: TimestepEmbedder,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_embedder: Linear,
    final_layer: FinalLayer,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    dtype: DType,
    device: Device,
    quantization: Quantization,
}

impl ZImageTransformer {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_quantized(cfg, vb, Quantization::None, None)
    }

    /// `new` then `keep_dense(keep_dense_on)` and `quantize(q)`, done block by block as the blocks
    /// load: with a lazy `vb` (one block read at a time) the device never holds more than one
    /// block in the dense dtype beside the quantized ones, where loading everything first peaked
    /// at the whole dense model (12 GB at full size in bf16) before quantizing.
    pub fn new_quantized(cfg: &TransformerConfig, vb: VarBuilder, q: Quantization, keep_dense_on: Option<&Device>) -> Result<Self> {
        let ctx = QuantContext::new(q, vb.device())?;
        let (p, pf) = (cfg.patch_size(), cfg.f_patch_size());
        let patch_dim = pf * p * p * cfg.in_channels;
        let key = format!("{p}-{pf}");
        if cfg.head_dim() != cfg.axes_dims.iter().sum::<usize>() {
            candle_core::bail!("config: head_dim {} != sum(axes_dims) {:?}", cfg.head_dim(), cfg.axes_dims);
        }
        let blocks = |name: &str, n: usize, modulation: bool| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| {
                    let mut blk = Block::new(cfg, modulation, vb.pp(format!("{name}.{i}")))?;
                    if let Some(ctx) = &ctx {
                        if let Some(on) = keep_dense_on {
                            blk.keep_dense(on)?;
                        }
                        blk.quantize(ctx)?;
                        // The block was read and quantized in the default pool, where its dense
                        // weights come and go; what stays is packed into the weight pool, so no
                        // hole between lasting tensors stays reserved there.
                        crate::device::with_weight_pool(vb.device(), || blk.copy_storage())?;
                    }
                    Ok(blk)
                })
                .collect()
        };
        Ok(Self {
            t_embedder: TimestepEmbedder::new(cfg.adaln_dim(), vb.pp("t_embedder"))?,
            cap_norm: RmsNorm::new(cfg.cap_feat_dim, cfg.norm_eps, vb.pp("cap_embedder.0"))?,
            cap_linear: Linear::new(cfg.cap_feat_dim, cfg.dim, true, vb.pp("cap_embedder.1"))?,
            x_embedder: Linear::new(patch_dim, cfg.dim, true, vb.pp(format!("all_x_embedder.{key}")))?,
            final_layer: FinalLayer::new(cfg, patch_dim, vb.pp(format!("all_final_layer.{key}")))?,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks("layers", cfg.n_layers, true)?,
            x_pad_token: vb.get((1, cfg.dim), "x_pad_token")?,
            cap_pad_token: vb.get((1, cfg.dim), "cap_pad_token")?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            quantization: if ctx.is_some() { q } else { Quantization::None },
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Quantizes the attention and feed-forward linears of every block (FP8 E4M3 with per-tensor
    /// scales, or INT8 with per-channel weight and per-token activation scales). The timestep,
    /// caption and patch embedders, the adaLN projections, the final layer and the pad tokens stay
    /// in the model dtype: they are small and precision-sensitive. Only dense weights can be
    /// quantized: a model already quantized keeps its format (an error if another is asked).
    pub fn quantize(&mut self, q: Quantization) -> Result<()> {
        if self.quantization == q {
            return Ok(());
        }
        if self.quantization != Quantization::None {
            candle_core::bail!("the transformer is already quantized to {}; {} needs its dense weights", self.quantization.name(), q.name());
        }
        let Some(ctx) = QuantContext::new(q, &self.device)? else { return Ok(()) };
        for blk in self.noise_refiner.iter_mut().chain(self.context_refiner.iter_mut()).chain(self.layers.iter_mut()) {
            blk.quantize(&ctx)?;
        }
        self.quantization = q;
        Ok(())
    }
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }
    /// How the FP8 layers scale their activations (None when not FP8).
    pub fn fp8_scaling(&self) -> Option<crate::fp8::ActivationScaling> {
        self.layers.first().and_then(|b| b.attention.to_qkv.fp8_scaling())
    }
    /// Keeps the dense weights of every layer `quantize` will quantize, on `on` (the model's
    /// device: no copy, the memory stays in use; or the host), for LoRA merges from the dense
    /// weights. Call before `quantize`. Cost: the blocks' linears in the model's dtype, about
    /// 12 GB at full size in bf16.
    pub fn keep_dense(&mut self, on: &Device) -> Result<()> {
        for blk in self.noise_refiner.iter_mut().chain(self.context_refiner.iter_mut()).chain(self.layers.iter_mut()) {
            blk.keep_dense(on)?;
        }
        Ok(())
    }
    pub fn is_fp8(&self) -> bool {
        self.quantization == Quantization::Fp8
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the denoiser. Items whose caption lengths and timesteps agree run as one batch (always
    /// the case in our pipeline); otherwise each item runs alone, which equals the reference's
    /// masked batch (masked keys contribute nothing) and lets every block share one modulation.
    /// (The pipeline prepares conditioning and modulation once per request instead: `condition`,
    /// `modulations`, `forward_prepared`.)
    pub fn forward(&self, x: &Tensor, t: &Tensor, caps: &[Tensor]) -> Result<Tensor> {
        let b = x.dim(0)?;
        if caps.len() != b || t.dim(0)? != b {
            candle_core::bail!("transformer: {b} latents, {} captions, {} timesteps", caps.len(), t.dim(0)?);
        }
        let (_, _, f, h, w) = x.dims5()?;
        let l0 = caps[0].dim(0)?;
        let t_host: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
        let same_t = t_host.iter().all(|v| *v == t_host[0]);
        let x = x.to_dtype(self.dtype)?;
        if same_t && caps.iter().all(|c| c.dim(0).map(|l| l == l0).unwrap_or(false)) {
            let cond = self.condition(&Tensor::stack(caps, 0)?, (f, h, w))?;
            let m = self.modulations(&t_host[..1])?.remove(0);
            return self.forward_prepared(&x, &m, &cond);
        }
        let outs = (0..b)
            .map(|i| {
                let cond = self.condition(&caps[i].unsqueeze(0)?, (f, h, w))?;
                let m = self.modulations(&t_host[i..i + 1])?.remove(0);
                self.forward_prepared(&x.narrow(0, i, 1)?, &m, &cond)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }

    fn latent_tokens(&self, (f, h, w): (usize, usize, usize)) -> Result<(usize, usize, usize)> {
        let (p, pf) = (self.cfg.patch_size(), self.cfg.f_patch_size());
        if h % p != 0 || w % p != 0 || f % pf != 0 {
            candle_core::bail!("latent size {f}x{h}x{w} is not a multiple of the patch size");
        }
        Ok((f / pf, h / p, w / p))
    }

    /// Caption features (B, L, cap_dim), the same length for every item, for latents of (f, h,
    /// w): the embedded, padded and refined caption tokens and the RoPE tables.
    pub fn condition(&self, caps: &Tensor, latent: (usize, usize, usize)) -> Result<Conditioning> {
        let cfg = &self.cfg;
        let (ft, ht, wt) = self.latent_tokens(latent)?;
        let img_pad = padded_len(ft * ht * wt);
        let cap_len = caps.dim(1)?;
        let cap_pad = padded_len(cap_len);

        // Position ids: caption j -> (1+j, 0, 0) for pads too; image (f,h,w) -> (cap_pad+1+f, h, w); image pads -> 0.
        let cap_pos: Vec<[usize; 3]> = (0..cap_pad).map(|j| [1 + j, 0, 0]).collect();
        let mut img_pos: Vec<[usize; 3]> = Vec::with_capacity(img_pad);
        for fi in 0..ft {
            for hi in 0..ht {
                for wi in 0..wt {
                    img_pos.push([cap_pad + 1 + fi, hi, wi]);
                }
            }
        }
        img_pos.resize(img_pad, [0, 0, 0]);
        // Tables (f32) are made once per request and shared by every block and step.
        let img_rope = Rope::new(cfg, &img_pos, &self.device)?;
        let cap_rope = Rope::new(cfg, &cap_pos, &self.device)?;

        let cap = self.cap_linear.forward(&self.cap_norm.forward(&caps.to_dtype(self.dtype)?)?)?;
        let mut cap = self.append_pad(&cap, &self.cap_pad_token, cap_pad - cap_len)?;
        for blk in &self.context_refiner {
            cap = blk.forward_plain(&cap, &cap_rope)?;
        }
        let joint_rope = Rope::cat(&[&img_rope, &cap_rope])?;
        Ok(Conditioning { cap, img_rope, joint_rope, latent })
    }

    /// Rows of the folded modulation of one step: 4 per modulated block, then the final scale.
    pub fn modulation_rows(&self) -> usize {
        4 * (self.noise_refiner.len() + self.layers.len()) + 1
    }

    /// The folded modulation for each model time in `times` (0 = pure noise): one (rows, dim)
    /// tensor per time, holding every modulated block's norm weights with its adaLN scales and
    /// gates folded in (see `Block::folded_modulation`), then the final layer's 1 + scale. All
    /// steps of a request are computed in one pass before the first.
    pub fn modulations(&self, times: &[f32]) -> Result<Vec<Tensor>> {
        let n = times.len();
        let t = Tensor::from_vec(times.to_vec(), n, &self.device)?;
        let adaln = self.t_embedder.forward(&(t * self.cfg.t_scale)?, self.dtype)?; // (S, adaln_dim)
        let mut parts = Vec::with_capacity(self.noise_refiner.len() + self.layers.len() + 1);
        for blk in self.noise_refiner.iter().chain(&self.layers) {
            parts.push(blk.folded_modulation(&adaln, self.dtype)?);
        }
        parts.push(self.final_layer.scale(&adaln)?.to_dtype(self.dtype)?.unsqueeze(1)?);
        let all = Tensor::cat(&parts, 1)?.contiguous()?; // (S, rows, dim)
        (0..n).map(|i| all.get(i)).collect()
    }

    /// One denoiser call with prepared inputs: latents x (B, C, F, H, W) in the model dtype, one
    /// step's `modulations` row block and the request's `condition`. Returns (B, C, F, H, W) in the
    /// model dtype. Reads nothing from the host and uploads nothing but cached kernel parameters,
    /// so it can be captured as a CUDA graph (`crate::graph`).
    pub fn forward_prepared(&self, x: &Tensor, modulation: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, c, f, h, w) = x.dims5()?;
        if (f, h, w) != cond.latent || cond.cap.dim(0)? != b {
            candle_core::bail!("latents {:?} do not match the conditioning ({:?}, batch {})", x.dims(), cond.latent, cond.cap.dim(0)?);
        }
        if modulation.dims() != [self.modulation_rows(), cfg.dim] {
            candle_core::bail!("modulation {:?}, expected ({}, {})", modulation.dims(), self.modulation_rows(), cfg.dim);
        }
        let (p, pf) = (cfg.patch_size(), cfg.f_patch_size());
        let (ft, ht, wt) = self.latent_tokens((f, h, w))?;
        let img_len = ft * ht * wt;
        let img_pad = padded_len(img_len);

        // Patchify: (B, C, F, H, W) -> (B, T, pf*p*p*C), tokens in (f, h, w) order, features (pf, ph, pw, c).
        let patches = x
            .to_dtype(self.dtype)?
            .reshape(vec![b, c, ft, pf, ht, p, wt, p])?
            .permute(vec![0, 2, 4, 6, 3, 5, 7, 1])?
            .reshape((b, img_len, pf * p * p * c))?;
        let img = self.x_embedder.forward(&patches)?;
        let mut img = self.append_pad(&img, &self.x_pad_token, img_pad - img_len)?;

        let block_w = |i: usize| modulation.narrow(0, 4 * i, 4);
        let n_ref = self.noise_refiner.len();
        for (i, blk) in self.noise_refiner.iter().enumerate() {
            img = blk.forward_folded(&img, &cond.img_rope, &block_w(i)?)?;
        }
        let mut seq = Tensor::cat(&[&img, &cond.cap], 1)?;
        for (i, blk) in self.layers.iter().enumerate() {
            seq = blk.forward_folded(&seq, &cond.joint_rope, &block_w(n_ref + i)?)?;
        }
        let scale = modulation.get(self.modulation_rows() - 1)?;
        let out = self.final_layer.forward(&seq.narrow(1, 0, img_len)?, &scale)?; // (B, T, patch_dim)

        // Unpatchify back to (B, C, F, H, W).
        out.reshape(vec![b, ft, ht, wt, pf, p, p, c])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, c, f, h, w))
    }

    fn append_pad(&self, x: &Tensor, pad_token: &Tensor, n: usize) -> Result<Tensor> {
        if n == 0 {
            return Ok(x.clone());
        }
        let (b, _, d) = x.dims3()?;
        let pad = pad_token.to_dtype(x.dtype())?.reshape((1, 1, d))?.broadcast_as((b, n, d))?;
        Tensor::cat(&[x, &pad.contiguous()?], 1)
    }
}

/// The transformer's linear layers by name, for weight patching (LoRA, see `crate::lora`): each
/// layer with the diffusers module names whose rows it holds, in row order (a fused layer holds
/// several: q|k|v, w1|w3).
pub struct NamedLinear<'a> {
    /// A name for the layer itself (the diffusers name, or `…to_qkv` / `…w13` for fused ones).
    pub layer: String,
    pub parts: Vec<String>,
    pub linear: &'a mut Linear,
}

impl ZImageTransformer {
    /// Every linear layer, named as in the diffusers checkpoint (see `NamedLinear`).
    pub fn named_linears_mut(&mut self) -> Vec<NamedLinear<'_>> {
        let (p, pf) = (self.cfg.patch_size(), self.cfg.f_patch_size());
        let key = format!("{p}-{pf}");
        fn one(name: String, linear: &mut Linear) -> NamedLinear<'_> {
            NamedLinear { layer: name.clone(), parts: vec![name], linear }
        }
        let mut out = vec![];
        out.push(one("t_embedder.mlp.0".into(), &mut self.t_embedder.fc1));
        out.push(one("t_embedder.mlp.2".into(), &mut self.t_embedder.fc2));
        out.push(one("cap_embedder.1".into(), &mut self.cap_linear));
        out.push(one(format!("all_x_embedder.{key}"), &mut self.x_embedder));
        out.push(one(format!("all_final_layer.{key}.linear"), &mut self.final_layer.linear));
        out.push(one(format!("all_final_layer.{key}.adaLN_modulation.1"), &mut self.final_layer.ada_ln));
        for (group, blocks) in [("noise_refiner", &mut self.noise_refiner), ("context_refiner", &mut self.context_refiner), ("layers", &mut self.layers)] {
            for (i, b) in blocks.iter_mut().enumerate() {
                let at = format!("{group}.{i}");
                let parts = |names: &[&str]| names.iter().map(|n| format!("{at}.{n}")).collect();
                out.push(NamedLinear { layer: format!("{at}.attention.to_qkv"), parts: parts(&["attention.to_q", "attention.to_k", "attention.to_v"]), linear: &mut b.attention.to_qkv });
                out.push(one(format!("{at}.attention.to_out.0"), &mut b.attention.to_out));
                out.push(NamedLinear { layer: format!("{at}.feed_forward.w13"), parts: parts(&["feed_forward.w1", "feed_forward.w3"]), linear: &mut b.feed_forward.w13 });
                out.push(one(format!("{at}.feed_forward.w2"), &mut b.feed_forward.w2));
                if let Some(ada) = b.ada_ln.as_mut() {
                    out.push(one(format!("{at}.adaLN_modulation.0"), ada));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{read_config, ModelFiles};
    use crate::testutil::{assert_close, expected, tiny_model_dir};
    use crate::weights::{checked_var_builder, ensure_no_problems};

    fn load() -> ZImageTransformer {
        let files = ModelFiles::from_dir(&tiny_model_dir()).unwrap();
        let cfg: TransformerConfig = read_config(&files.transformer.config).unwrap();
        let (vb, problems) = checked_var_builder(&files.transformer.weights, DType::F32, &Device::Cpu).unwrap();
        let m = ZImageTransformer::new(&cfg, vb).unwrap();
        ensure_no_problems("transformer", &problems).unwrap();
        m
    }

    #[test]
    fn forward_matches_diffusers() {
        let m = load();
        let e = expected();
        let x = e["dit.x"].unsqueeze(0).unwrap();
        let out = m.forward(&x, &e["dit.t"], &[e["dit.cap"].clone()]).unwrap();
        assert_close("dit.out", &out.squeeze(0).unwrap(), &e["dit.out"], 1e-4);
    }

    #[test]
    fn batch_with_different_caption_lengths_matches_diffusers() {
        let m = load();
        let e = expected();
        let x = Tensor::stack(&[&e["dit_batch.x0"], &e["dit_batch.x1"]], 0).unwrap();
        let caps = [e["dit_batch.cap0"].clone(), e["dit_batch.cap1"].clone()];
        let out = m.forward(&x, &e["dit_batch.t"], &caps).unwrap();
        assert_close("dit_batch.out0", &out.get(0).unwrap(), &e["dit_batch.out0"], 1e-4);
        assert_close("dit_batch.out1", &out.get(1).unwrap(), &e["dit_batch.out1"], 1e-4);
    }

    #[test]
    fn mismatched_weights_are_all_named() {
        let files = ModelFiles::from_dir(&tiny_model_dir()).unwrap();
        let mut cfg: TransformerConfig = read_config(&files.transformer.config).unwrap();
        cfg.n_layers = 4; // the fixture has 2: layers.2 and layers.3 are missing
        cfg.cap_feat_dim = 32; // wrong shape for cap_embedder
        let (vb, problems) = checked_var_builder(&files.transformer.weights, DType::F32, &Device::Cpu).unwrap();
        ZImageTransformer::new(&cfg, vb).unwrap();
        let err = ensure_no_problems("transformer", &problems).unwrap_err().to_string();
        assert!(err.contains("layers.2.attention.to_q.weight"), "{err}");
        assert!(err.contains("layers.3.feed_forward.w2.weight"), "{err}");
        assert!(err.contains("cap_embedder.1.weight"), "{err}");
    }
}
