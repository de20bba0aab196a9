//! FP8 (E4M3) linear layers: weights quantized once with a per-tensor scale, activations quantized
//! per call with a dynamic per-tensor scale (amax / 448), products accumulated in f32 and written
//! in the activation dtype. On CUDA the product is one cuBLASLt FP8 matmul and quantization is two
//! small kernels (`kernels/zimage.cu`); elsewhere the same arithmetic is emulated by dequantizing,
//! so the CPU tests exercise the quantization the GPU uses.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

/// E4M3's largest finite magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Shared state of the FP8 linears of one model on one device (the cuBLASLt handle, its workspace
/// and cached matmul plans on CUDA; nothing elsewhere).
#[derive(Clone)]
pub struct Fp8Context {
    #[cfg(feature = "cuda")]
    gemm: Option<Arc<crate::cuda::Fp8Gemm>>,
}

impl Fp8Context {
    /// With cuBLASLt algorithm autotuning (see `crate::cuda::Fp8Gemm::new`).
    pub fn new(device: &Device) -> Result<Self> {
        Self::with_autotune(device, true)
    }

    /// `autotune` false takes cuBLASLt's first heuristic pick for every shape (for comparisons).
    pub fn with_autotune(device: &Device, autotune: bool) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let gemm = match device {
                Device::Cuda(dev) => Some(Arc::new(crate::cuda::Fp8Gemm::new(dev, autotune)?)),
                _ => None,
            };
            Ok(Self { gemm })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (device, autotune);
            Ok(Self {})
        }
    }
}

/// A weight (out, in) in E4M3 with its dequantization scale.
#[derive(Clone)]
pub struct Fp8Weight {
    q: Tensor,
    scale: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    ctx: Fp8Context,
}

impl Fp8Weight {
    /// Quantizes a (out, in) weight with one scale for the whole tensor.
    pub fn quantize(w: &Tensor, ctx: &Fp8Context) -> Result<Self> {
        let (q, scale) = quantize(w)?;
        let scale: f32 = scale.to_vec1::<f32>()?[0];
        Ok(Self { q, scale, ctx: ctx.clone() })
    }
    /// The shared context this weight multiplies through (to quantize a replacement alike).
    pub fn context(&self) -> &Fp8Context {
        &self.ctx
    }
    pub fn out_dim(&self) -> usize {
        self.q.dims()[0]
    }
    pub fn device(&self) -> &candle_core::Device {
        self.q.device()
    }
    /// The weight as the matmul sees it: q * scale.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        (e4m3_to_f32(&self.q)? * self.scale as f64)?.to_dtype(dtype)
    }

    /// The matmul computed by dequantizing both operands and multiplying in f32 (what the CUDA
    /// path must equal up to accumulation order).
    pub fn matmul_emulated(&self, x: &QuantizedActivation, out_dtype: DType) -> Result<Tensor> {
        let xd = e4m3_to_f32(&x.q)?.broadcast_mul(&x.scale.to_dtype(DType::F32)?)?;
        xd.matmul(&self.dequantize(DType::F32)?.t()?)?.to_dtype(out_dtype)
    }

    /// x_q (rows, in) times this weight transposed: (rows, out) in `out_dtype`.
    pub fn matmul(&self, x: &QuantizedActivation, out_dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(gemm), true) = (&self.ctx.gemm, out_dtype == DType::BF16) {
            // cuBLASLt FP8 wants both matrix widths in multiples of 16 (true of the real model);
            // other shapes (the tiny model) take the emulated product.
            let (n, k) = (self.q.dims()[0], self.q.dims()[1]);
            if n % 16 == 0 && k % 16 == 0 {
                return gemm.matmul(&x.q, &x.scale, &self.q, self.scale);
            }
        }
        self.matmul_emulated(x, out_dtype)
    }
}

/// An activation (rows, in) in E4M3 with its scale as a one-element f32 tensor on the device (it
/// is computed on the device and never read back, so quantizing does not synchronize).
pub struct QuantizedActivation {
    pub q: Tensor,
    pub scale: Tensor,
}

impl QuantizedActivation {
    pub fn new(x: &Tensor) -> Result<Self> {
        let (q, scale) = quantize(x)?;
        Ok(Self { q, scale })
    }
}

/// Per-tensor E4M3 quantization: (q, scale) with q = round(x / scale), scale = amax / 448.
pub fn quantize(x: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        if x.dtype() == DType::BF16 && x.elem_count() % 8 == 0 {
            return crate::cuda::quantize_e4m3(&x.contiguous()?);
        }
        // Other shapes or dtypes (the tiny model): on the host, because candle 0.11's CUDA casts
        // to and from F8E4M3 look up kernels under names candle-kernels does not define.
        let (q, s) = quantize(&x.to_device(&Device::Cpu)?)?;
        return Ok((q.to_device(x.device())?, s.to_device(x.device())?));
    }
    let xf = x.to_dtype(DType::F32)?;
    let amax = xf.abs()?.max_all()?;
    let scale = (amax.maximum(1e-12f32)? / E4M3_MAX as f64)?;
    let q = xf
        .broadcast_div(&scale)?
        .clamp(-E4M3_MAX, E4M3_MAX)?
        .to_dtype(DType::F8E4M3)?;
    Ok((q, scale.reshape(1)?))
}

/// E4M3 values as f32 (no scale applied).
pub fn e4m3_to_f32(q: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        if q.elem_count() % 2 == 0 {
            return crate::cuda::e4m3_to_f32(q);
        }
        return q.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_device(q.device());
    }
    q.to_dtype(DType::F32)
}

/// Relative L2 distance ||a - b|| / ||b||, in f32.
pub fn relative_l2(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let num = (a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(num / den.max(f32::MIN_POSITIVE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_error_is_within_e4m3_precision() {
        // E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4 per element, ~2-3% in L2 for
        // Gaussian data once small values fall toward the subnormal range.
        let x = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu).unwrap();
        let (q, s) = quantize(&x).unwrap();
        assert_eq!(q.dtype(), DType::F8E4M3);
        let back = q.to_dtype(DType::F32).unwrap().broadcast_mul(&s).unwrap();
        let err = relative_l2(&back, &x).unwrap();
        assert!(err > 1e-3 && err < 4e-2, "relative error {err}");
        // The largest magnitude maps to exactly 448.
        let qmax = q.to_dtype(DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(qmax, E4M3_MAX);
    }

    #[test]
    fn fp8_matmul_tracks_the_full_precision_product() {
        let dev = Device::Cpu;
        let ctx = Fp8Context::new(&dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (32, 128), &dev).unwrap();
        let w = (Tensor::randn(0f32, 1.0, (48, 128), &dev).unwrap() * 0.05).unwrap();
        let fw = Fp8Weight::quantize(&w, &ctx).unwrap();
        let y = fw.matmul(&QuantizedActivation::new(&x).unwrap(), DType::F32).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let err = relative_l2(&y, &want).unwrap();
        assert!(err < 5e-2, "relative error {err}");
        // A wrong scale (e.g. the weight's applied twice) would be far off.
        assert!(err > 1e-4, "suspiciously exact: {err}");
    }
}
