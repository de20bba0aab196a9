//! Numerics shared by the model components, written to match the PyTorch reference: norms compute
//! their statistics in f32 whatever the activation dtype (fused kernels), attention dispatches to flash attention
//! when built with the `flash-attn` feature and running on CUDA.

use candle_core::{DType, Module, Result, Tensor, D};

/// RMSNorm as diffusers/transformers compute it: statistics in f32, then scaled by the weight.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }
}

impl RmsNorm {
    /// rms_norm(x) * weight * scale, with `scale` (dim) folded into the weight: one fused pass
    /// instead of a norm plus a broadcast multiply over the whole activation.
    pub fn forward_scaled(&self, x: &Tensor, scale: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?.mul(&scale.to_dtype(x.dtype())?)?;
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)
    }
}

impl Module for RmsNorm {
    /// candle's fused kernel: one pass, f32 accumulation for half-precision inputs.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() { self.weight.clone() } else { self.weight.to_dtype(x.dtype())? };
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)
    }
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

/// Scaled dot-product attention over (B, H, L, D) tensors, no mask, scale 1/sqrt(D).
/// Softmax is taken in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    {
        if q.device().is_cuda() && q.dtype() == DType::BF16 && q.dim(D::Minus1)? == 128 {
            let scale = 1.0 / (q.dim(D::Minus1)? as f32).sqrt();
            // flash-attn wants (B, L, H, D)
            let (q2, k2, v2) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
            let out = candle_flash_attn::flash_attn(&q2.contiguous()?, &k2.contiguous()?, &v2.contiguous()?, scale, false)?;
            return out.transpose(1, 2);
        }
    }
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let q = (q.contiguous()? * scale)?;
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// Linear layer that multiplies in the weight's dtype; x may have any number of leading dims.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has a last dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("dims") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}
