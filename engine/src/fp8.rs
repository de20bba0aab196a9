//! FP8 (E4M3) linear layers: weights quantized once with a per-tensor scale, activations quantized
//! per call with a dynamic scale (amax / 448) for the whole activation or for each row (token),
//! products accumulated in f32 and written in the activation dtype (`ActivationScaling`). On CUDA
//! the product is one cuBLASLt FP8 matmul; the per-tensor amax is taken by the kernel that makes
//! the activation (RMSNorm, SwiGLU) and a second kernel casts, while a row scale needs no second
//! pass (`kernels/zimage.cu`); where cuBLASLt has no row-scaled products (Hopper with cuBLAS 13.0,
//! measured) the next kernel applies the row scales. Elsewhere the same arithmetic is emulated by
//! dequantizing, so the CPU tests exercise the quantization the GPU uses (per tensor by default
//! there: the row modes' fused kernels are CUDA's; `quantize_rows` is tested directly).

#[cfg(feature = "cuda")]
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

/// E4M3's largest finite magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// How activations are scaled to E4M3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationScaling {
    /// One scale for the whole activation: its amax needs a pass of its own before the cast.
    Tensor,
    /// One scale per row (token): the kernel making a row also takes its amax and casts it, and
    /// outliers in one token no longer coarsen every other token's values.
    Row,
    /// One scale per row for the layers whose product goes straight into a kernel that takes the
    /// row scales (the block's SwiGLU and gated residual norms: `transformer`), the products run
    /// with a unit activation scale and those kernels multiply each row by its scale as they read
    /// it; per tensor elsewhere (q|k|v). Row scales without row-scaled products (Hopper).
    RowFolded,
}

impl ActivationScaling {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tensor => "per tensor",
            Self::Row => "per row",
            Self::RowFolded => "per row, applied by the next kernel (q|k|v per tensor)",
        }
    }
    /// `ZIMAGE_FP8_SCALING=tensor|row|folded` (for comparisons); None when unset.
    fn from_env() -> Result<Option<Self>> {
        match std::env::var("ZIMAGE_FP8_SCALING").as_deref() {
            Err(_) | Ok("") => Ok(None),
            Ok("tensor") => Ok(Some(Self::Tensor)),
            Ok("row") => Ok(Some(Self::Row)),
            Ok("folded") => Ok(Some(Self::RowFolded)),
            Ok(other) => candle_core::bail!("ZIMAGE_FP8_SCALING={other}: expected tensor, row or folded"),
        }
    }
}

/// Shared state of the FP8 linears of one model on one device (the cuBLASLt handle, its workspace
/// and cached matmul plans on CUDA; nothing elsewhere) and the activation scaling they use.
#[derive(Clone)]
pub struct Fp8Context {
    #[cfg(feature = "cuda")]
    gemm: Option<Arc<crate::cuda::Fp8Gemm>>,
    scaling: ActivationScaling,
    /// A one-element 1.0 on the device: the activation scale of products whose row scales the
    /// next kernel applies (a fixed buffer, so CUDA graphs capture its address).
    unit_scale: Tensor,
}

impl Fp8Context {
    /// With cuBLASLt algorithm autotuning (see `crate::cuda::Fp8Gemm::new`) unless
    /// `ZIMAGE_FP8_AUTOTUNE=0` (the heuristic's first pick; for comparisons).
    pub fn new(device: &Device) -> Result<Self> {
        let autotune = !matches!(std::env::var("ZIMAGE_FP8_AUTOTUNE").as_deref(), Ok("0") | Ok("off") | Ok("false"));
        Self::with_autotune(device, autotune)
    }

    /// `autotune` false takes cuBLASLt's first heuristic pick for every shape (for comparisons).
    /// Activations are scaled per row where the GPU's cuBLASLt applies row scales, else per row
    /// applied by the next kernel (`RowFolded`); `ZIMAGE_FP8_SCALING=tensor|row|folded` chooses.
    pub fn with_autotune(device: &Device, autotune: bool) -> Result<Self> {
        let wanted = ActivationScaling::from_env()?;
        let unit_scale = Tensor::ones(1, DType::F32, device)?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let gemm = crate::cuda::Fp8Gemm::new(dev, autotune)?;
            let row_ok = gemm.row_scaling_problem().is_none();
            let scaling = match wanted {
                Some(ActivationScaling::Row) if !row_ok => {
                    candle_core::bail!("ZIMAGE_FP8_SCALING=row: this GPU's cuBLASLt has no FP8 products with row scales (cuBLAS 12.9+ on Hopper needed)")
                }
                Some(s) => s,
                None if row_ok => ActivationScaling::Row,
                None => ActivationScaling::RowFolded,
            };
            return Ok(Self { gemm: Some(Arc::new(gemm)), scaling, unit_scale });
        }
        let _ = (device, autotune);
        Ok(Self {
            #[cfg(feature = "cuda")]
            gemm: None,
            // per tensor unless asked: the fused kernels of the other modes are CUDA's
            scaling: wanted.unwrap_or(ActivationScaling::Tensor),
            unit_scale,
        })
    }

    /// Why this device cannot scale FP8 activations per row (None where it can, or off CUDA).
    pub fn row_scaling_problem(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gemm {
            return g.row_scaling_problem();
        }
        None
    }

    /// How this context's layers scale their activations.
    pub fn scaling(&self) -> ActivationScaling {
        self.scaling
    }

    /// A (rows, in) activation quantized the way this context's products expect.
    pub fn quantize_activation(&self, x: &Tensor) -> Result<QuantizedActivation> {
        let (q, scale) = match self.scaling {
            ActivationScaling::Tensor | ActivationScaling::RowFolded => quantize(x)?,
            ActivationScaling::Row => quantize_rows(x)?,
        };
        Ok(QuantizedActivation { q, scale })
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
    /// Moves the E4M3 weight into fresh device memory (`ops::copy_storage_of`).
    pub fn copy_storage(&mut self) -> Result<()> {
        self.q = crate::ops::copy_storage_of(&self.q)?;
        Ok(())
    }
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
        let scale = x.scale.to_dtype(DType::F32)?;
        let scale = if scale.elem_count() == 1 { scale } else { scale.reshape((scale.elem_count(), 1))? };
        let xd = e4m3_to_f32(&x.q)?.broadcast_mul(&scale)?;
        xd.matmul(&self.dequantize(DType::F32)?.t()?)?.to_dtype(out_dtype)
    }

    /// x_q (rows, in) times this weight transposed with a unit activation scale: row r of the
    /// result is the true product's row r divided by the activation's scale for that row, which
    /// the caller applies (`ActivationScaling::RowFolded`).
    pub fn matmul_unscaled(&self, x_q: &Tensor, out_dtype: DType) -> Result<Tensor> {
        let x = QuantizedActivation { q: x_q.clone(), scale: self.ctx.unit_scale.clone() };
        self.matmul(&x, out_dtype)
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

/// An activation (rows, in) in E4M3 with its scale as an f32 tensor on the device: (1,) for the
/// whole activation or (rows,) one per row (computed on the device and never read back, so
/// quantizing does not synchronize).
pub struct QuantizedActivation {
    pub q: Tensor,
    pub scale: Tensor,
}

impl QuantizedActivation {
    /// Quantized with one scale for the whole activation.
    pub fn new(x: &Tensor) -> Result<Self> {
        let (q, scale) = quantize(x)?;
        Ok(Self { q, scale })
    }
}

/// Per-row E4M3 quantization of a (rows, in) activation: (q, scale (rows,)) with scale[r] =
/// amax(row r) / 448 and q = round(x / scale[r]) (one fused kernel on CUDA for bf16).
pub fn quantize_rows(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, _) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        if let Some(qs) = crate::cuda::quantize_e4m3_rows(x)? {
            return Ok(qs);
        }
        // Other shapes or dtypes (the tiny model): on the host, as `quantize` does.
        let (q, s) = quantize_rows(&x.to_device(&Device::Cpu)?)?;
        return Ok((q.to_device(x.device())?, s.to_device(x.device())?));
    }
    let xf = x.to_dtype(DType::F32)?;
    let amax = xf.abs()?.max_keepdim(1)?;
    let scale = (amax.maximum(1e-12f32)? / E4M3_MAX as f64)?;
    let q = xf
        .broadcast_div(&scale)?
        .clamp(-E4M3_MAX, E4M3_MAX)?
        .to_dtype(DType::F8E4M3)?;
    Ok((q, scale.reshape(rows)?))
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
    fn row_quantization_scales_each_row_by_its_own_amax() {
        // Rows of very different magnitudes: each row's largest value maps to 448 exactly, and a
        // small row keeps its precision instead of falling toward E4M3's subnormals.
        let dev = Device::Cpu;
        let small = (Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap() * 1e-3).unwrap();
        let large = (Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap() * 1e3).unwrap();
        let x = Tensor::cat(&[&small, &large], 0).unwrap();
        let (q, s) = quantize_rows(&x).unwrap();
        assert_eq!((q.dims(), s.dims()), (&[16usize, 64][..], &[16usize][..]));
        let qf = q.to_dtype(DType::F32).unwrap();
        let row_max: Vec<f32> = qf.abs().unwrap().max(1).unwrap().to_vec1().unwrap();
        assert!(row_max.iter().all(|&m| m == E4M3_MAX), "{row_max:?}");
        let scales: Vec<f32> = s.to_vec1().unwrap();
        let amax: Vec<f32> = x.abs().unwrap().max(1).unwrap().to_vec1().unwrap();
        for (sc, a) in scales.iter().zip(&amax) {
            assert!((sc - a / E4M3_MAX).abs() <= 1e-6 * sc, "scale {sc} for amax {a}");
        }
        let back = qf.broadcast_mul(&s.reshape((16, 1)).unwrap()).unwrap();
        let row_err = relative_l2(&back.narrow(0, 0, 8).unwrap(), &small).unwrap();
        assert!(row_err < 4e-2, "small rows, per-row scales: {row_err}");
        // One scale for the whole tensor loses the small rows (their values underflow).
        let (qt, st) = quantize(&x).unwrap();
        let back_t = qt.to_dtype(DType::F32).unwrap().broadcast_mul(&st).unwrap();
        let tensor_err = relative_l2(&back_t.narrow(0, 0, 8).unwrap(), &small).unwrap();
        assert!(tensor_err > 0.5, "small rows, one scale: {tensor_err}");
    }

    #[test]
    fn row_scaled_matmul_applies_each_rows_scale() {
        let dev = Device::Cpu;
        let ctx = Fp8Context::new(&dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (32, 128), &dev).unwrap();
        // rows scaled 1..32: a scale applied to the wrong rows would be far off
        let ramp = Tensor::arange(1f32, 33.0, &dev).unwrap().reshape((32, 1)).unwrap();
        let x = x.broadcast_mul(&ramp).unwrap();
        let w = (Tensor::randn(0f32, 1.0, (48, 128), &dev).unwrap() * 0.05).unwrap();
        let fw = Fp8Weight::quantize(&w, &ctx).unwrap();
        let (q, scale) = quantize_rows(&x).unwrap();
        let xq = QuantizedActivation { q, scale };
        assert_eq!(xq.scale.dims(), &[32]);
        let y = fw.matmul(&xq, DType::F32).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        for r in [0usize, 31] {
            let err = relative_l2(&y.narrow(0, r, 1).unwrap(), &want.narrow(0, r, 1).unwrap()).unwrap();
            assert!(err > 1e-4 && err < 5e-2, "row {r}: relative error {err}");
        }
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
