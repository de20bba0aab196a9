//! Numerics shared by the model components, written to match the PyTorch reference: norms compute
//! their statistics in f32 whatever the activation dtype (fused kernels), attention dispatches to flash attention
//! when built with the `flash-attn` (FA2) or `flash-attn-v3` (FA3, Hopper) feature and running on CUDA.

use candle_core::{DType, Module, Result, Tensor, D};

use crate::fp8::{Fp8Context, Fp8Weight, QuantizedActivation};
use crate::int8::{Int8Activation, Int8Context, Int8Weight};

/// RMSNorm as diffusers/transformers compute it: statistics in f32, then scaled by the weight.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

/// A copy of `t` in fresh device memory (from the pool current now: see
/// `device::with_weight_pool`); a tensor in host memory is shared, not copied.
pub fn copy_storage_of(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() {
        Ok(t.clone())
    } else {
        t.copy()
    }
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }
    /// Moves the weight into fresh device memory (`copy_storage_of`).
    pub fn copy_storage(&mut self) -> Result<()> {
        self.weight = copy_storage_of(&self.weight)?;
        Ok(())
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl RmsNorm {
    /// The weight in `dtype`, times a per-channel `scale` when given: folding the scale into the
    /// (dim-sized) weight spares a broadcast multiply over the whole activation.
    fn scaled_weight(&self, dtype: DType, scale: Option<&Tensor>) -> Result<Tensor> {
        let w = self.weight.to_dtype(dtype)?;
        match scale {
            // A scale row (dim) or one row per step (S, dim).
            Some(s) => w.broadcast_mul(&s.to_dtype(dtype)?),
            None => Ok(w),
        }
    }

    /// rms_norm(x) * weight * scale in one fused pass.
    pub fn forward_scaled(&self, x: &Tensor, scale: &Tensor) -> Result<Tensor> {
        rms_norm_weighted(x, &self.scaled_weight(x.dtype(), Some(scale))?, self.eps)
    }

    /// x + rms_norm(y) * weight [* scale]: a block's (gated) residual. One fused pass on CUDA bf16.
    pub fn add_to(&self, x: &Tensor, y: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
        add_rms_norm_weighted(x, y, &self.scaled_weight(y.dtype(), scale)?, self.eps)
    }

    /// The weight times `scale` (both rounded to `dtype` first, the product in `dtype`), as
    /// `forward_scaled` and `add_to` fold it; for precomputing a step's folded weights.
    pub fn fold(&self, dtype: DType, scale: &Tensor) -> Result<Tensor> {
        self.scaled_weight(dtype, Some(scale))
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// rms_norm(x) * w with a given (already folded) weight w (dim): candle's fused kernel, statistics
/// in f32.
pub fn rms_norm_weighted(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 {
        if let Some((y, _)) = crate::cuda::rms_norm_v8(x, w, eps as f32, false)? {
            return Ok(y);
        }
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, &w.to_dtype(x.dtype())?, eps as f32)
}

/// x + rms_norm(y) * w with a given (already folded) weight w (dim). One fused pass on CUDA bf16.
pub fn add_rms_norm_weighted(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() && y.dtype() == DType::BF16 && x.dtype() == DType::BF16 {
        return crate::cuda::add_rms_norm(x, y, w, eps as f32);
    }
    x + candle_nn::ops::rms_norm(&y.contiguous()?, &w.to_dtype(y.dtype())?, eps as f32)?
}

impl Module for RmsNorm {
    /// candle's fused kernel: one pass, f32 accumulation for half-precision inputs.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() { self.weight.clone() } else { self.weight.to_dtype(x.dtype())? };
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)
    }
}

/// a · b, batched like `Tensor::matmul`. candle's CPU backend has no bf16 matmul: there bf16
/// operands are multiplied in f32 and the product rounded once to bf16, which is what bf16 GEMMs
/// on GPUs (and torch's on CPU) compute, accumulating in f32.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::BF16 {
        return a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

/// LayerNorm without affine parameters (statistics in f32).
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// Whether x (B, C, H, W) is stored channels-last and not also contiguous NCHW: a permuted view
/// of a contiguous (B, H, W, C) (the CUDA VAE decoder's layout, which its kernels keep).
pub fn is_channels_last(x: &Tensor) -> bool {
    x.rank() == 4 && !x.is_contiguous() && x.permute((0, 2, 3, 1)).is_ok_and(|t| t.is_contiguous())
}

/// x (B, C, H, W) copied channels-last (the same shape, NHWC memory).
pub fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// Which attention kernel `attention` runs: the best one built in for the card unless the
/// `ZIMAGE_ATTENTION` environment variable names another (`fa3-fp8`, `fa3`, `fa2` or `composed`;
/// `auto` or unset: the default), so that one binary can measure them side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKernel {
    /// FlashAttention-3's FP8 forward for the transformer's self-attention (q and k quantized by
    /// the norm + RoPE kernel, v per tensor); every other attention takes `FlashAttention3`.
    FlashAttention3Fp8,
    FlashAttention3,
    FlashAttention2,
    Composed,
}

impl AttentionKernel {
    pub fn name(self) -> &'static str {
        match self {
            Self::FlashAttention3Fp8 => "FlashAttention-3 FP8 (E4M3 q/k/v)",
            Self::FlashAttention3 => "FlashAttention-3",
            Self::FlashAttention2 => "FlashAttention-2",
            Self::Composed => "composed (candle ops)",
        }
    }

    /// The kernel `ZIMAGE_ATTENTION` names (`fa3-fp8`, `fa3`, `fa2`, `composed`); empty when it is
    /// unset, empty or `auto` (the default choice).
    fn named() -> String {
        std::env::var("ZIMAGE_ATTENTION").ok().filter(|v| v != "auto").unwrap_or_default()
    }

    /// Whether `ZIMAGE_ATTENTION` names a kernel (the default choice is off).
    pub fn named_by_env() -> bool {
        !Self::named().is_empty()
    }

    /// The kernel `attention` takes for bf16, head-dim-128 inputs on `device`.
    pub fn for_device(device: &candle_core::Device) -> Self {
        Self::for_device_named(device, &Self::named())
    }

    fn for_device_named(device: &candle_core::Device, wanted: &str) -> Self {
        #[cfg(any(feature = "flash-attn", feature = "flash-attn-v3"))]
        if let candle_core::Device::Cuda(_dev) = device {
            if wanted == "composed" {
                return Self::Composed;
            }
            // FlashAttention-3 is built for Hopper (sm_90) only; other cards take FlashAttention-2.
            #[cfg(feature = "flash-attn-v3")]
            if wanted != "fa2" && crate::cuda::device_compute_capability(_dev).map(|c| c.0 == 9).unwrap_or(false) {
                #[cfg(feature = "flash-attn-v3-fp8")]
                if wanted == "fa3-fp8" {
                    return Self::FlashAttention3Fp8;
                }
                return Self::FlashAttention3;
            }
            #[cfg(feature = "flash-attn")]
            return Self::FlashAttention2;
        }
        let _ = (device, wanted);
        Self::Composed
    }

    /// The kernel for the denoiser's self-attention: on Hopper an FP8-quantized model with head
    /// dim 128 takes FlashAttention-3's FP8 forward (its image differs from bf16 attention's by
    /// less than FP8 linears already make it differ from the bf16 model: 38 dB against 33 dB at
    /// 1024, docs/PERF.md), unless `ZIMAGE_ATTENTION` names a kernel; the bf16 model keeps bf16
    /// attention (its purpose is fidelity). Other head dims cannot take the FP8 kernel.
    pub fn for_transformer(device: &candle_core::Device, quantization: Quantization, head_dim: usize) -> Self {
        let wanted = Self::named();
        match Self::for_device_named(device, &wanted) {
            Self::FlashAttention3Fp8 if head_dim != 128 => Self::FlashAttention3,
            Self::FlashAttention3 if cfg!(feature = "flash-attn-v3-fp8") && wanted.is_empty() && quantization == Quantization::Fp8 && head_dim == 128 => {
                Self::FlashAttention3Fp8
            }
            kernel => kernel,
        }
    }
}

/// Scaled dot-product attention over (B, L, H, D) tensors (the layout linear layers produce and
/// flash attention reads), no mask, scale 1/sqrt(D); returns (B, L, H, D). Softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_with(AttentionKernel::for_device(q.device()), q, k, v, false)
}

/// `attention` with the kernel chosen by the caller, optionally causal (query i sees keys <= i;
/// q and k of one length).
pub fn attention_with(kernel: AttentionKernel, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    #[cfg(any(feature = "flash-attn", feature = "flash-attn-v3"))]
    if kernel != AttentionKernel::Composed && q.device().is_cuda() && q.dtype() == DType::BF16 && q.dim(D::Minus1)? == 128 {
        // Flash attention reads batch, token and head strides: views whose head dim is packed (v
        // straight out of the fused qkv product) need no copy.
        let packed = |t: &Tensor| -> Result<Tensor> {
            if t.stride().last() == Some(&1) { Ok(t.clone()) } else { t.contiguous() }
        };
        let (q, k, v) = (packed(q)?, packed(k)?, packed(v)?);
        let scale = 1.0 / (q.dim(D::Minus1)? as f32).sqrt();
        #[cfg(feature = "flash-attn-v3")]
        if matches!(kernel, AttentionKernel::FlashAttention3 | AttentionKernel::FlashAttention3Fp8) {
            return candle_flash_attn_v3::flash_attn(&q, &k, &v, scale, causal, false);
        }
        #[cfg(feature = "flash-attn")]
        if kernel == AttentionKernel::FlashAttention2 {
            return candle_flash_attn::flash_attn(&q, &k, &v, scale, causal);
        }
    }
    let _ = kernel;
    if causal {
        attention_composed_causal(q, k, v)
    } else {
        attention_composed(q, k, v)
    }
}

/// The transformer's self-attention straight from its fused (B, L, H + 2 KV, D) qkv product with
/// FlashAttention-3's FP8 forward: q and k normed, rotated and quantized to E4M3 in one kernel
/// (static per-tensor scales that cannot saturate) that also takes v's amax, v quantized per
/// tensor in one more pass, bf16 out (B, L, H, D).
/// None when `kernel` is not the FP8 one or the inputs do not suit it: the caller then runs the
/// bf16 path (`qk_norm_rope` + `attention`).
#[allow(clippy::too_many_arguments)]
pub fn attention_qkv_fp8(
    kernel: AttentionKernel,
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    norm_q: Option<&RmsNorm>,
    norm_k: Option<&RmsNorm>,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "flash-attn-v3-fp8")]
    if kernel == AttentionKernel::FlashAttention3Fp8 && qkv.device().is_cuda() && qkv.dim(D::Minus1)? == 128 {
        let (Some(nq), Some(nk)) = (norm_q, norm_k) else { return Ok(None) };
        if nq.eps != nk.eps {
            return Ok(None);
        }
        let Some((q, k, dq, dk, v_amax)) = crate::cuda::qk_norm_rope_e4m3(qkv, heads, kv_heads, &nq.weight, &nk.weight, nq.eps as f32, cos, sin)? else {
            return Ok(None);
        };
        let Some((v, dv)) = crate::cuda::quantize_e4m3_heads(&qkv.narrow(2, heads + kv_heads, kv_heads)?, Some(&v_amax))? else {
            return Ok(None);
        };
        return crate::flash_fp8::flash_attn_e4m3(&q, &k, &v, &dq, &dk, &dv).map(Some);
    }
    let _ = (kernel, qkv, heads, kv_heads, norm_q, norm_k, cos, sin);
    Ok(None)
}

/// `attention_qkv_fp8`'s whole path from candle ops in f32 (its reference, any head dim): the q
/// and k heads normed and rotated in f32 and quantized with the static scales
/// (`quantize_e4m3_normed`), v quantized with its amax, then `attention_e4m3_composed`. Norms are
/// required (the static scales come from them). Returns bf16 (B, L, H, D) on qkv's device.
#[allow(clippy::too_many_arguments)]
pub fn attention_qkv_e4m3_composed(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    norm_q: &RmsNorm,
    norm_k: &RmsNorm,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let qkv = qkv.to_dtype(DType::F32)?;
    let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
    let q = qk_norm_rope_composed(&qkv.narrow(2, 0, heads)?.contiguous()?, Some(norm_q), &cos, &sin)?;
    let k = qk_norm_rope_composed(&qkv.narrow(2, heads, kv_heads)?.contiguous()?, Some(norm_k), &cos, &sin)?;
    let (q8, dq) = quantize_e4m3_normed(&q, norm_q)?;
    let (k8, dk) = quantize_e4m3_normed(&k, norm_k)?;
    let (v8, dv) = crate::fp8::quantize(&qkv.narrow(2, heads + kv_heads, kv_heads)?.contiguous()?)?;
    let dv = dv.to_device(&candle_core::Device::Cpu)?.reshape(())?.to_scalar::<f32>()?;
    attention_e4m3_composed(&q8, &k8, &crate::fp8::e4m3_to_f32(&v8)?, dq, dk, dv)
}

/// E4M3 rounding (round to nearest even, saturating at 448) of f32 values, on the CPU.
fn round_e4m3(x: &Tensor) -> Result<Tensor> {
    use crate::fp8::E4M3_MAX;
    let cpu = x.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F32)?;
    cpu.clamp(-E4M3_MAX, E4M3_MAX)?.to_dtype(DType::F8E4M3)?.to_dtype(DType::F32)?.to_device(x.device())
}

/// FlashAttention-3's FP8 forward computed from candle ops in f32, the reference it is checked
/// against: q, k, v hold E4M3 values (as f32, (B, L, H, D)) and their descales; scores in f32,
/// softmax numerators exp(s - max) * 2^8 rounded to E4M3 for the product with v (the kernel's
/// max offset of 8 octaves keeps them in E4M3's normal range), divided by the unrounded row sums.
/// The kernel takes the maximum over the keys seen so far rather than all of them, so it rounds
/// some numerators at a different scale: agreement is to E4M3's precision, not to the bit.
pub fn attention_e4m3_composed(q: &Tensor, k: &Tensor, v: &Tensor, descale_q: f32, descale_k: f32, descale_v: f32) -> Result<Tensor> {
    let scale = descale_q as f64 * descale_k as f64 / (q.dim(D::Minus1)? as f64).sqrt();
    let f32_heads = |t: &Tensor| t.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous();
    let (q, k, v) = (f32_heads(q)?, f32_heads(k)?, f32_heads(v)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let p = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    let row_sum = p.sum_keepdim(D::Minus1)?;
    let p8 = round_e4m3(&(p * 256.0)?)?;
    let out = (p8.matmul(&v)? * (descale_v as f64 / 256.0))?.broadcast_div(&row_sum)?;
    out.to_dtype(DType::BF16)?.transpose(1, 2)
}

/// Per-tensor E4M3 quantization with the static scales of the FP8 attention path, from candle
/// ops (the reference of `cuda::qk_norm_rope_e4m3`): after a per-head RMSNorm with weight w and a
/// rotation no value exceeds sqrt(D) * max|w|, which maps onto 448. Returns (E4M3 values as f32,
/// descale).
pub fn quantize_e4m3_normed(x: &Tensor, norm: &RmsNorm) -> Result<(Tensor, f32)> {
    let d = x.dim(D::Minus1)?;
    let wmax = norm.weight.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?;
    use crate::fp8::E4M3_MAX;
    let bound = ((d as f32).sqrt() * wmax).max(1e-30);
    let q = round_e4m3(&(x.to_dtype(DType::F32)? * (E4M3_MAX / bound) as f64)?)?;
    Ok((q, bound / E4M3_MAX))
}

/// `attention` from candle ops, computed as flash attention does (the CPU path, and the reference
/// the flash kernels are checked against): scores and softmax statistics in f32, the unnormalized
/// probabilities rounded to the input dtype for the product with v (accumulated in f32), then
/// divided by their f32 row sums and rounded once.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let f32_heads = |t: &Tensor| t.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous();
    let (q, k, v) = (f32_heads(q)?, f32_heads(k)?, f32_heads(v)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let p = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    let row_sum = p.sum_keepdim(D::Minus1)?;
    let p = p.to_dtype(dtype)?.to_dtype(DType::F32)?;
    p.matmul(&v)?.broadcast_div(&row_sum)?.to_dtype(dtype)?.transpose(1, 2)
}

/// `attention_composed` with a causal mask (query i sees keys 0..=i), grouped-query heads allowed
/// (k and v may have fewer heads than q, a divisor of them).
pub fn attention_composed_causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, l, h, _) = q.dims4()?;
    let kv = k.dim(2)?;
    let rep = h / kv;
    let (k, v) = if rep > 1 {
        // (B, L, KV, D) -> (B, L, KV * rep, D): query head j reads kv head j / rep.
        let expand = |t: &Tensor| -> Result<Tensor> {
            let (b, l, kv, d) = t.dims4()?;
            t.unsqueeze(3)?.broadcast_as((b, l, kv, rep, d))?.reshape((b, l, kv * rep, d))
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let f32_heads = |t: &Tensor| t.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous();
    let (q, k, v) = (f32_heads(q)?, f32_heads(&k)?, f32_heads(&v)?);
    let mask: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (l, l), q.device())?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
    let p = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    let row_sum = p.sum_keepdim(D::Minus1)?;
    let p = p.to_dtype(dtype)?.to_dtype(DType::F32)?;
    p.matmul(&v)?.broadcast_div(&row_sum)?.to_dtype(dtype)?.transpose(1, 2)
}

/// Per-head RMSNorm (when `norm` is given) then interleaved RoPE, on (B, L, H, D) queries or keys;
/// cos/sin (L, D/2) f32. The rotation is computed in f32 and rounded once to x's dtype, as the
/// reference does. On CUDA with bf16 this is one fused kernel in place of a norm, two casts, two
/// transposes and a rotation; elsewhere it is those candle ops.
pub fn qk_norm_rope(x: &Tensor, norm: Option<&RmsNorm>, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 {
        return crate::cuda::qk_norm_rope(x, norm.map(|n| &n.weight), norm.map(|n| n.eps as f32).unwrap_or(0.0), cos, sin);
    }
    qk_norm_rope_composed(x, norm, cos, sin)
}

/// `qk_norm_rope` from candle ops (the CPU path, and the reference the fused kernel is checked against).
pub fn qk_norm_rope_composed(x: &Tensor, norm: Option<&RmsNorm>, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = match norm {
        Some(n) => n.forward(x)?,
        None => x.clone(),
    };
    let xf = x.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?;
    candle_nn::rotary_emb::rope_i(&xf, cos, sin)?.to_dtype(x.dtype())?.transpose(1, 2)?.contiguous()
}

/// The number format of a layer's weights and of the activations it multiplies them with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense weights in the model dtype (bf16 on GPUs, f32 on the CPU).
    #[default]
    None,
    /// FP8 E4M3, per-tensor scales for weights and activations (see `fp8`).
    Fp8,
    /// INT8, per-output-channel weight scales, per-row activation scales (see `int8`).
    Int8,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
        }
    }
}

/// The per-device state a quantized layer keeps (cuBLASLt handles and plans on CUDA), made once
/// per model and shared by its layers.
#[derive(Clone)]
pub enum QuantContext {
    Fp8(Fp8Context),
    Int8(Int8Context),
}

impl QuantContext {
    /// The context for `q` on `device`; None for dense weights.
    pub fn new(q: Quantization, device: &candle_core::Device) -> Result<Option<Self>> {
        Ok(match q {
            Quantization::None => None,
            Quantization::Fp8 => Some(Self::Fp8(Fp8Context::new(device)?)),
            Quantization::Int8 => Some(Self::Int8(Int8Context::new(device)?)),
        })
    }
}

/// Linear layer; x may have any number of leading dims. The weight is dense (multiplied in its
/// dtype), FP8 E4M3 (see `fp8`) or INT8 (see `int8`), chosen after loading with `quantize`.
#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The dense weight a quantized layer was made from, kept when asked (`keep_dense`), on the
    /// layer's device or in host memory: LoRA merges start from it, so a merged layer is
    /// quantized from the dense merge, not from the dequantized weight.
    dense_copy: Option<Tensor>,
}

#[derive(Clone)]
enum LinearWeight {
    Dense(Tensor),
    Fp8(Fp8Weight),
    Int8(Int8Weight),
}

/// An activation quantized for one kind of layer.
pub enum QuantizedInput {
    Fp8(QuantizedActivation),
    Int8(Int8Activation),
}

/// An input flattened to (rows, in) and, for quantized layers, quantized once: several layers
/// reading the same activation (q, k, v; gate and up) share one quantization.
pub struct LinearInput {
    lead_dims: Vec<usize>,
    /// The activation itself: absent when only a quantized form was made (fused kernels).
    dense: Option<Tensor>,
    quantized: Option<QuantizedInput>,
    /// The activations' dtype, which the layer's output takes.
    dtype: DType,
}

impl LinearInput {
    /// The two leading dims of a (B, L, dim) input.
    pub fn lead_dims2(&self) -> Result<(usize, usize)> {
        match self.lead_dims[..] {
            [b, l] => Ok((b, l)),
            _ => candle_core::bail!("expected a (B, L, dim) input, got leading dims {:?}", self.lead_dims),
        }
    }
    /// An input already quantized (e.g. by a fused kernel), with its dense form for dense layers.
    pub fn from_parts(lead_dims: Vec<usize>, dense: Tensor, quantized: Option<QuantizedInput>) -> Self {
        let dtype = dense.dtype();
        Self { lead_dims, dense: Some(dense), quantized, dtype }
    }
    /// An input made only in a quantized form (a fused kernel that never wrote the activation in
    /// its dtype): for layers of that format only.
    pub fn quantized_only(lead_dims: Vec<usize>, quantized: QuantizedInput, dtype: DType) -> Self {
        Self { lead_dims, dense: None, quantized: Some(quantized), dtype }
    }
    fn dense(&self) -> Result<&Tensor> {
        self.dense.as_ref().ok_or_else(|| candle_core::Error::Msg("a linear input made only in a quantized form reached a layer of another format".into()))
    }
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight: LinearWeight::Dense(weight), bias, dense_copy: None })
    }
    /// One layer computing several layers' outputs side by side (their weights concatenated along
    /// the output dim), e.g. q, k and v from one input: one matmul instead of several. Loaded in
    /// `vb`'s dtype and device, as `new` does.
    pub fn fused(in_dim: usize, out_dims: &[usize], vbs: &[candle_nn::VarBuilder]) -> Result<Self> {
        let weights = out_dims
            .iter()
            .zip(vbs)
            .map(|(&out, vb)| vb.get((out, in_dim), "weight"))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { weight: LinearWeight::Dense(Tensor::cat(&weights, 0)?), bias: None, dense_copy: None })
    }
    pub fn quantization(&self) -> Quantization {
        match self.weight {
            LinearWeight::Dense(_) => Quantization::None,
            LinearWeight::Fp8(_) => Quantization::Fp8,
            LinearWeight::Int8(_) => Quantization::Int8,
        }
    }
    pub fn is_fp8(&self) -> bool {
        self.quantization() == Quantization::Fp8
    }
    fn out_dim(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[0],
            LinearWeight::Fp8(w) => w.out_dim(),
            LinearWeight::Int8(w) => w.out_dim(),
        }
    }
    /// Replaces a dense weight by its quantization; the dense copy is freed. A layer already
    /// quantized stays as it is (quantize from the dense weights, never from another format).
    /// Keeps the dense weight on `on` (the layer's own device: the same storage, no copy) for
    /// `weight_f32` once the layer is quantized (no-op for a layer already quantized).
    pub fn keep_dense(&mut self, on: &candle_core::Device) -> Result<()> {
        if let LinearWeight::Dense(w) = &self.weight {
            self.dense_copy = Some(w.to_device(on)?);
        }
        Ok(())
    }
    /// Moves every tensor of the layer into fresh device memory (`copy_storage_of`).
    pub fn copy_storage(&mut self) -> Result<()> {
        match &mut self.weight {
            LinearWeight::Dense(w) => *w = copy_storage_of(w)?,
            LinearWeight::Fp8(w) => w.copy_storage()?,
            LinearWeight::Int8(w) => w.copy_storage()?,
        }
        if let Some(b) = &mut self.bias {
            *b = copy_storage_of(b)?;
        }
        if let Some(d) = &mut self.dense_copy {
            *d = copy_storage_of(d)?;
        }
        Ok(())
    }
    pub fn quantize(&mut self, ctx: &QuantContext) -> Result<()> {
        if let LinearWeight::Dense(w) = &self.weight {
            self.weight = match ctx {
                QuantContext::Fp8(c) => LinearWeight::Fp8(Fp8Weight::quantize(w, c)?),
                QuantContext::Int8(c) => LinearWeight::Int8(Int8Weight::quantize(w, c)?),
            };
        }
        Ok(())
    }
    /// The activation quantization this layer's weights multiply with.
    fn quantize_input(&self, dense: &Tensor) -> Result<Option<QuantizedInput>> {
        Ok(match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Fp8(w) => Some(QuantizedInput::Fp8(w.context().quantize_activation(dense)?)),
            LinearWeight::Int8(_) => Some(QuantizedInput::Int8(Int8Activation::new(dense)?)),
        })
    }
    /// Flattens x and quantizes it when this layer is quantized; pass the result to
    /// `forward_input` of this or any other layer with the same input width and format.
    pub fn prepare(&self, x: &Tensor) -> Result<LinearInput> {
        let dims = x.dims();
        let in_dim = *dims.last().expect("linear input has a last dim");
        let lead_dims = dims[..dims.len() - 1].to_vec();
        let rows: usize = lead_dims.iter().product();
        let dense = x.reshape((rows, in_dim))?;
        let quantized = self.quantize_input(&dense)?;
        Ok(LinearInput::from_parts(lead_dims, dense, quantized))
    }
    /// `prepare(&rms_norm_weighted(x, w, eps))`; on CUDA bf16 one kernel writes the normed
    /// activation's quantization (FP8 with row scales: only that; FP8 per tensor: the normed
    /// activation and its amax; INT8: the normed activation, row scales and bytes), so a quantized
    /// layer needs no extra pass over the activation, or none at all.
    pub fn prepare_rms_normed(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<LinearInput> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.dtype() == DType::BF16 {
            let dims = x.dims();
            let in_dim = *dims.last().expect("linear input has a last dim");
            let lead_dims = dims[..dims.len() - 1].to_vec();
            let rows: usize = lead_dims.iter().product();
            let x2 = x.reshape((rows, in_dim))?;
            if let LinearWeight::Fp8(fw) = &self.weight {
                if fw.context().scaling() == crate::fp8::ActivationScaling::Row {
                    if let Some((q, scale)) = crate::cuda::rms_norm_e4m3_rows(&x2, w, eps as f32)? {
                        let quantized = QuantizedInput::Fp8(QuantizedActivation { q, scale });
                        return Ok(LinearInput::quantized_only(lead_dims, quantized, x.dtype()));
                    }
                }
            }
            if self.quantization() == Quantization::Int8 {
                if let Some((dense, (q, scale))) = crate::cuda::rms_norm_i8_v8(&x2, w, eps as f32)? {
                    let quantized = Some(QuantizedInput::Int8(Int8Activation { q, scale }));
                    return Ok(LinearInput::from_parts(lead_dims, dense, quantized));
                }
            } else if let Some((dense, fp8)) = crate::cuda::rms_norm_v8(&x2, w, eps as f32, self.is_fp8())? {
                let quantized = fp8.map(|(q, scale)| QuantizedInput::Fp8(QuantizedActivation { q, scale }));
                return Ok(LinearInput::from_parts(lead_dims, dense, quantized));
            }
        }
        self.prepare(&rms_norm_weighted(x, w, eps)?)
    }
    pub fn forward_input(&self, x: &LinearInput) -> Result<Tensor> {
        let dtype = x.dtype;
        let mut y = match (&self.weight, &x.quantized) {
            (LinearWeight::Dense(w), _) => matmul(x.dense()?, &w.t()?)?,
            (LinearWeight::Fp8(w), Some(QuantizedInput::Fp8(q))) => w.matmul(q, dtype)?,
            (LinearWeight::Fp8(w), _) => w.matmul(&w.context().quantize_activation(x.dense()?)?, dtype)?,
            (LinearWeight::Int8(w), Some(QuantizedInput::Int8(q))) => w.matmul(q, dtype)?,
            (LinearWeight::Int8(w), _) => w.matmul(&Int8Activation::new(x.dense()?)?, dtype)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        let mut out_dims = x.lead_dims.clone();
        out_dims.push(self.out_dim());
        y.reshape(out_dims)
    }
}

impl Linear {
    /// The FP8 product of activations quantized per row (x_q (rows, in) E4M3) with a unit
    /// activation scale: row r comes out divided by that row's scale, which the caller applies
    /// (`fp8::ActivationScaling::RowFolded`). Only for FP8 layers without a bias.
    pub fn fp8_matmul_unscaled(&self, x_q: &Tensor, dtype: DType) -> Result<Tensor> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Fp8(w), None) => w.matmul_unscaled(x_q, dtype),
            _ => candle_core::bail!("fp8_matmul_unscaled on a {self:?}"),
        }
    }

    /// The FP8 activation scaling of this layer (None for other formats).
    pub fn fp8_scaling(&self) -> Option<crate::fp8::ActivationScaling> {
        match &self.weight {
            LinearWeight::Fp8(w) => Some(w.context().scaling()),
            _ => None,
        }
    }

    /// For an INT8 layer computing gate|up side by side (w1|w3, no bias): silu(gate) * up,
    /// quantized per row for the next INT8 layer straight from the product's integer sums (one
    /// pass on CUDA). None where that path does not apply (other formats, devices or shapes):
    /// then `forward_input` and the SwiGLU ops compute the same values.
    pub fn forward_swiglu_int8(&self, x: &LinearInput) -> Result<Option<LinearInput>> {
        let (LinearWeight::Int8(w), Some(QuantizedInput::Int8(q)), None) = (&self.weight, &x.quantized, &self.bias) else {
            return Ok(None);
        };
        Ok(w.matmul_swiglu(q, x.dtype)?.map(|a| LinearInput {
            lead_dims: x.lead_dims.clone(),
            dense: None,
            quantized: Some(QuantizedInput::Int8(a)),
            dtype: x.dtype,
        }))
    }
}

impl Linear {
    /// The weight in f32 as the layer multiplies with it (a quantized weight dequantized).
    pub fn weight_f32(&self) -> Result<Tensor> {
        if let Some(w) = &self.dense_copy {
            let dev = match &self.weight {
                LinearWeight::Dense(d) => d.device().clone(),
                LinearWeight::Fp8(q) => q.device().clone(),
                LinearWeight::Int8(q) => q.device().clone(),
            };
            return w.to_device(&dev)?.to_dtype(DType::F32);
        }
        match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32),
            LinearWeight::Fp8(w) => w.dequantize(DType::F32),
            LinearWeight::Int8(w) => w.dequantize(DType::F32),
        }
    }
    /// Replaces the weight by `w` (out, in), converted to `dtype` and, when this layer is
    /// quantized, quantized again in the same format from `w` itself (used by LoRA merging, which
    /// computes the merged weight in f32).
    pub fn set_weight(&mut self, w: &Tensor, dtype: DType) -> Result<()> {
        if w.dims() != [self.out_dim(), w.dim(1)?] {
            candle_core::bail!("new weight {:?} for a layer of {} outputs", w.dims(), self.out_dim());
        }
        let ctx = match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Fp8(old) => Some(QuantContext::Fp8(old.context().clone())),
            LinearWeight::Int8(old) => Some(QuantContext::Int8(old.context().clone())),
        };
        self.weight = LinearWeight::Dense(w.to_dtype(dtype)?);
        // the kept dense weight was the one before this change
        self.dense_copy = None;
        match ctx {
            Some(ctx) => self.quantize(&ctx),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.quantization() {
            Quantization::None => "dense",
            q => q.name(),
        };
        write!(f, "Linear({kind}, out {}, bias {})", self.out_dim(), self.bias.is_some())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_input(&self.prepare(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn e4m3_attention_reference_tracks_f32_attention_within_e4m3_precision() {
        // The reference of FA3's FP8 forward on E4M3-representable inputs: its only further
        // rounding is the softmax numerators' (x 2^8) to E4M3, 3 mantissa bits.
        let dev = Device::Cpu;
        let (l, h, d) = (200usize, 2usize, 128usize);
        let e4m3 = |t: Tensor| round_e4m3(&(t * 40.0).unwrap()).unwrap();
        let (q, k, v) = (
            e4m3(Tensor::randn(0f32, 1.0, (1, l, h, d), &dev).unwrap()),
            e4m3(Tensor::randn(0f32, 1.0, (1, l, h, d), &dev).unwrap()),
            e4m3(Tensor::randn(0f32, 1.0, (1, l, h, d), &dev).unwrap()),
        );
        let (dq, dk, dv) = (1.0 / 40.0, 1.0 / 40.0, 1.0 / 40.0);
        let got = attention_e4m3_composed(&q, &k, &v, dq, dk, dv).unwrap();
        let f32_attention = attention_composed(&(&q * dq as f64).unwrap(), &(&k * dk as f64).unwrap(), &(&v * dv as f64).unwrap()).unwrap();
        let err = crate::fp8::relative_l2(&got, &f32_attention).unwrap();
        eprintln!("E4M3 numerators vs f32 attention on the same inputs: relative L2 {err:.3e}");
        // the numerators' rounding moves the output by a few percent at most, and does move it
        assert!(err < 0.05 && err > 1e-4, "relative L2 {err}");
    }

    #[test]
    fn e4m3_attention_path_tracks_the_f32_path() {
        // The FP8 attention's whole path (norm + RoPE, static q/k scales, v amax, E4M3 numerators)
        // against the same attention in f32 on a fused qkv product with 2 + 2 + 2 heads.
        let dev = Device::Cpu;
        let (l, h, d) = (150usize, 2usize, 128usize);
        let qkv = (Tensor::randn(0f32, 1.0, (1, l, 3 * h, d), &dev).unwrap() * 3.0).unwrap();
        let norm = |seed: f32| RmsNorm {
            weight: Tensor::from_vec((0..d).map(|i| 0.6 + ((i as f32 * seed).sin()).abs()).collect::<Vec<f32>>(), d, &dev).unwrap(),
            eps: 1e-6,
        };
        let (nq, nk) = (norm(0.37), norm(0.91));
        let angles = Tensor::randn(0f32, 3.0, (l, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let got = attention_qkv_e4m3_composed(&qkv, h, h, &nq, &nk, &cos, &sin).unwrap();
        let q = qk_norm_rope_composed(&qkv.narrow(2, 0, h).unwrap().contiguous().unwrap(), Some(&nq), &cos, &sin).unwrap();
        let k = qk_norm_rope_composed(&qkv.narrow(2, h, h).unwrap().contiguous().unwrap(), Some(&nk), &cos, &sin).unwrap();
        let v = qkv.narrow(2, 2 * h, h).unwrap().contiguous().unwrap();
        let want = attention_composed(&q, &k, &v).unwrap();
        assert_eq!(got.dims(), want.dims());
        let err = crate::fp8::relative_l2(&got, &want).unwrap();
        eprintln!("E4M3 attention path vs f32: relative L2 {err:.3e}");
        // E4M3 keeps 3 mantissa bits: a few percent, not zero
        assert!(err < 0.1 && err > 1e-3, "relative L2 {err}");
    }

    #[test]
    fn static_e4m3_scale_of_normed_heads_never_saturates() {
        // Each head: one huge value (the norm puts it near sqrt(D)) and small noise; a rotation
        // keeps pair lengths. The static scale from sqrt(D) * max|w| must hold every value.
        let dev = Device::Cpu;
        let (l, h, d) = (16usize, 2usize, 128usize);
        let mut raw = Tensor::randn(0f32, 0.01, (1, l, h, d), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for row in 0..l * h {
            raw[row * d + (row % d)] = 100.0;
        }
        let x = Tensor::from_vec(raw, (1, l, h, d), &dev).unwrap();
        let weight = Tensor::from_vec((0..d).map(|i| if i % 2 == 0 { 0.5 + (i % 7) as f32 / 7.0 } else { -0.3 }).collect::<Vec<f32>>(), d, &dev).unwrap();
        let norm = RmsNorm { weight: weight.clone(), eps: 1e-6 };
        let angles = Tensor::randn(0f32, 3.0, (l, d / 2), &dev).unwrap();
        let roped = qk_norm_rope_composed(&x, Some(&norm), &angles.cos().unwrap(), &angles.sin().unwrap()).unwrap();
        let (q, descale) = quantize_e4m3_normed(&roped, &norm).unwrap();
        let qmax = q.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let xmax = roped.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // the largest value before rounding fits under E4M3's largest (it may round up to it)
        assert!(xmax <= descale * 448.0 * (1.0 + 1e-6), "{xmax} exceeds the bound {}", descale * 448.0);
        assert!(qmax <= 448.0, "largest quantized value {qmax}");
        // the bound is tight for such heads: the largest value uses most of the range
        assert!(qmax > 448.0 * 0.25, "largest quantized value {qmax}: the scale wastes range");
        assert!((qmax * descale - xmax).abs() <= xmax / 16.0, "{qmax} * {descale} vs {xmax}");
        let back = (q * descale as f64).unwrap();
        let err = crate::fp8::relative_l2(&back, &roped).unwrap();
        assert!(err < 0.04, "relative L2 of the round trip {err}");
    }

    #[test]
    fn causal_grouped_attention_matches_a_direct_computation() {
        // q: 4 heads, k/v: 2 heads (query head h reads kv head h / 2), 5 tokens, dim 8.
        let dev = Device::Cpu;
        let (l, h, kv, d) = (5usize, 4usize, 2usize, 8usize);
        let q = Tensor::randn(0f32, 1.0, (1, l, h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, l, kv, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, l, kv, d), &dev).unwrap();
        let got = attention_composed_causal(&q, &k, &v).unwrap();
        let q4: Vec<Vec<Vec<f32>>> = q.squeeze(0).unwrap().to_vec3().unwrap();
        let k4: Vec<Vec<Vec<f32>>> = k.squeeze(0).unwrap().to_vec3().unwrap();
        let v4: Vec<Vec<Vec<f32>>> = v.squeeze(0).unwrap().to_vec3().unwrap();
        let g4: Vec<Vec<Vec<f32>>> = got.squeeze(0).unwrap().to_vec3().unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        for i in 0..l {
            for head in 0..h {
                let kh = head / (h / kv);
                let scores: Vec<f32> = (0..=i).map(|j| (0..d).map(|c| q4[i][head][c] * k4[j][kh][c]).sum::<f32>() * scale).collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..d {
                    let want: f32 = (0..=i).map(|j| e[j] / z * v4[j][kh][c]).sum();
                    assert!((g4[i][head][c] - want).abs() < 1e-5, "token {i} head {head}: {} vs {want}", g4[i][head][c]);
                }
            }
        }
    }

    #[test]
    fn composed_is_the_attention_kernel_off_cuda() {
        assert_eq!(AttentionKernel::for_device(&Device::Cpu), AttentionKernel::Composed);
    }
}
