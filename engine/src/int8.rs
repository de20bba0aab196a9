//! INT8 (W8A8) linear layers, for GPUs with int8 tensor cores and no FP8 (compute capability
//! 8.0-8.7: A100, RTX 30): weights quantized once, symmetric, one scale per output channel;
//! activations quantized per call, one scale per row (token); int8 x int8 products accumulated in
//! int32, then scaled by (row scale x channel scale) into the activation dtype.
//!
//! The arithmetic, which the CUDA path (`cuda::Int8Gemm` and the kernels in `kernels/zimage.cu`)
//! must reproduce and the CPU path computes directly:
//! * scale = max(amax, 1e-12) / 127 with amax the largest |value| of the row (or channel);
//! * q = round_half_even(value / scale), clamped to [-127, 127] (-128 is never used, so the range
//!   is symmetric); a row of zeros gives q = 0;
//! * y[r, c] = f32(sum_k qx[r, k] * qw[c, k]) * sx[r] * sw[c], in that order, then rounded once.
//!
//! Quantized values are stored as their two's-complement bytes in `U8` tensors (candle has no i8
//! dtype), on every device, so the CPU and the GPU hold the same bytes.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

/// The largest quantized magnitude (symmetric range).
pub const I8_MAX: f32 = 127.0;
/// Smallest amax a scale is computed from: a row of zeros gets a tiny, finite scale.
const AMAX_FLOOR: f32 = 1e-12;

/// Shared state of the INT8 linears of one model on one device (cuBLASLt on CUDA).
#[derive(Clone)]
pub struct Int8Context {
    #[cfg(feature = "cuda")]
    gemm: Option<Arc<crate::cuda::Int8Gemm>>,
}

impl Int8Context {
    pub fn new(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let gemm = match device {
                Device::Cuda(dev) => Some(Arc::new(crate::cuda::Int8Gemm::new_int8(dev)?)),
                _ => None,
            };
            Ok(Self { gemm })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }
}

/// Rounds to the nearest integer, ties to even (as `__float2int_rn` on the GPU and torch.round).
pub fn round_half_even(x: &Tensor) -> Result<Tensor> {
    let rounded = x.round()?; // ties away from zero
    let ties = (x - x.floor()?)?.eq(0.5)?;
    let even = ((x / 2.0)?.round()? * 2.0)?;
    ties.where_cond(&even, &rounded)
}

/// Per-row symmetric quantization of a (rows, cols) tensor: (q as U8 bytes, scale (rows,) f32).
pub fn quantize_rows(x: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 {
        if let Some(r) = crate::cuda::quantize_rows_i8(x)? {
            return Ok(r);
        }
    }
    let xf = x.to_dtype(DType::F32)?;
    let amax = xf.abs()?.max_keepdim(1)?;
    let scale = (amax.maximum(AMAX_FLOOR)? / I8_MAX as f64)?;
    let q = round_half_even(&xf.broadcast_div(&scale)?)?.clamp(-I8_MAX, I8_MAX)?;
    Ok((to_bytes(&q)?, scale.squeeze(1)?))
}

/// Integer-valued f32 in [-128, 127] -> their two's-complement bytes.
fn to_bytes(q: &Tensor) -> Result<Tensor> {
    let wrapped = q.lt(0f32)?.where_cond(&(q + 256.0)?, q)?;
    wrapped.to_dtype(DType::U8)
}

/// Two's-complement bytes -> their signed values as f32.
pub fn bytes_to_f32(q: &Tensor) -> Result<Tensor> {
    let v = q.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let signed = v.gt(127f32)?.where_cond(&(&v - 256.0)?, &v)?;
    signed.to_device(q.device())
}

/// A weight (out, in) in int8 with one scale per output channel.
#[derive(Clone)]
pub struct Int8Weight {
    q: Tensor,
    scale: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    ctx: Int8Context,
}

impl Int8Weight {
    /// Moves the weight and its scales into fresh device memory (`ops::copy_storage_of`).
    pub fn copy_storage(&mut self) -> Result<()> {
        self.q = crate::ops::copy_storage_of(&self.q)?;
        self.scale = crate::ops::copy_storage_of(&self.scale)?;
        Ok(())
    }
    pub fn quantize(w: &Tensor, ctx: &Int8Context) -> Result<Self> {
        let (q, scale) = quantize_rows(w)?;
        Ok(Self { q, scale, ctx: ctx.clone() })
    }
    pub fn device(&self) -> &Device {
        self.q.device()
    }
    /// The shared context this weight multiplies through (to quantize a replacement alike).
    pub fn context(&self) -> &Int8Context {
        &self.ctx
    }
    pub fn out_dim(&self) -> usize {
        self.q.dims()[0]
    }
    /// The weight as the matmul sees it: q * scale per channel.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        bytes_to_f32(&self.q)?.broadcast_mul(&self.scale.unsqueeze(1)?)?.to_dtype(dtype)
    }

    /// The product computed on the integers in f32 and scaled after (what the CUDA path must
    /// equal: the integer sums are exact in f32 up to 2^24, past it within f32 rounding).
    pub fn matmul_reference(&self, x: &Int8Activation, out_dtype: DType) -> Result<Tensor> {
        let acc = bytes_to_f32(&x.q)?.matmul(&bytes_to_f32(&self.q)?.t()?)?;
        acc.broadcast_mul(&x.scale.unsqueeze(1)?)?.broadcast_mul(&self.scale.unsqueeze(0)?)?.to_dtype(out_dtype)
    }

    /// x_q (rows, in) times this weight transposed: (rows, out) in `out_dtype`.
    pub fn matmul(&self, x: &Int8Activation, out_dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(gemm), true) = (&self.ctx.gemm, out_dtype == DType::BF16) {
            // cuBLASLt's int8 kernels want the widths in multiples of 16 (true of the real model)
            let (n, k) = (self.q.dims()[0], self.q.dims()[1]);
            if n % 16 == 0 && k % 16 == 0 {
                return gemm.matmul_i8(&x.q, &x.scale, &self.q, &self.scale);
            }
        }
        self.matmul_reference(x, out_dtype)
    }
}

impl Int8Weight {
    /// For a gate|up layer (w1 rows then w3 rows): silu(gate) * up of its product with x,
    /// quantized per row for the next INT8 layer, in one pass after the integer product (CUDA,
    /// bf16 activations). None where that path does not apply; then take `matmul`, SwiGLU and
    /// `Int8Activation::new`, which compute the same values through bf16 tensors.
    pub fn matmul_swiglu(&self, x: &Int8Activation, out_dtype: DType) -> Result<Option<Int8Activation>> {
        #[cfg(feature = "cuda")]
        if let (Some(gemm), true) = (&self.ctx.gemm, out_dtype == DType::BF16) {
            let (n, k) = (self.q.dims()[0], self.q.dims()[1]);
            if n % 32 == 0 && k % 16 == 0 {
                if let Some((q, scale)) = gemm.matmul_i8_swiglu(&x.q, &x.scale, &self.q, &self.scale)? {
                    return Ok(Some(Int8Activation { q, scale }));
                }
            }
        }
        let _ = (x, out_dtype);
        Ok(None)
    }
}

/// An activation (rows, in) in int8 with one scale per row, both on the activation's device.
pub struct Int8Activation {
    pub q: Tensor,
    pub scale: Tensor,
}

impl Int8Activation {
    pub fn new(x: &Tensor) -> Result<Self> {
        let (q, scale) = quantize_rows(x)?;
        Ok(Self { q, scale })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::relative_l2;

    fn t(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        Tensor::from_vec(rows.concat(), (rows.len(), cols), &Device::Cpu).unwrap()
    }

    fn values(q: &Tensor) -> Vec<Vec<f32>> {
        bytes_to_f32(q).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn ties_round_to_even() {
        let x = Tensor::new(&[0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4, 2.6, -2.6, 3.0], &Device::Cpu).unwrap();
        let r: Vec<f32> = round_half_even(&x).unwrap().to_vec1().unwrap();
        assert_eq!(r, [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 2.0, 3.0, -3.0, 3.0]);
    }

    #[test]
    fn each_row_gets_its_own_scale_and_the_largest_value_maps_to_127() {
        let x = t(&[&[1.0, -2.0, 0.5, 4.0], &[-100.0, 50.0, 25.0, 0.0]]);
        let (q, s) = quantize_rows(&x).unwrap();
        assert_eq!(q.dtype(), DType::U8);
        let s: Vec<f32> = s.to_vec1().unwrap();
        assert_eq!(s, [4.0 / 127.0, 100.0 / 127.0]);
        let q = values(&q);
        // 1 / (4/127) = 31.75 -> 32; -2 -> -63.5 -> -64 (tie to even); 0.5 -> 15.875 -> 16
        assert_eq!(q[0], [32.0, -64.0, 16.0, 127.0]);
        // 50 / (100/127) = 63.5 exactly in f32 -> 64 (tie to even); 25 -> 31.75 -> 32
        assert_eq!(q[1], [-127.0, 64.0, 32.0, 0.0]);
    }

    #[test]
    fn negative_values_survive_the_byte_storage() {
        let x = t(&[&[-127.0, -1.0, 0.0, 1.0, 127.0]]);
        let (q, _) = quantize_rows(&x).unwrap();
        let bytes: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bytes, [129, 255, 0, 1, 127]);
        assert_eq!(values(&q)[0], [-127.0, -1.0, 0.0, 1.0, 127.0]);
    }

    #[test]
    fn never_saturates_past_127_and_never_uses_minus_128() {
        // values a hair above amax / scale * 127 after division rounding
        let x = Tensor::randn(0f32, 3.0, (16, 257), &Device::Cpu).unwrap();
        let (q, _) = quantize_rows(&x).unwrap();
        let v = bytes_to_f32(&q).unwrap();
        assert_eq!(v.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 127.0);
        assert!(v.min_all().unwrap().to_scalar::<f32>().unwrap() >= -127.0);
    }

    #[test]
    fn a_zero_row_quantizes_to_zero_with_a_finite_scale() {
        let x = t(&[&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]]);
        let (q, s) = quantize_rows(&x).unwrap();
        assert_eq!(values(&q)[0], [0.0, 0.0, 0.0]);
        let s: Vec<f32> = s.to_vec1().unwrap();
        assert!(s[0].is_finite() && s[0] > 0.0);
        let ctx = Int8Context::new(&Device::Cpu).unwrap();
        let w = Int8Weight::quantize(&t(&[&[1.0, 1.0, 1.0]]), &ctx).unwrap();
        let y: Vec<Vec<f32>> = w.matmul(&Int8Activation::new(&x).unwrap(), DType::F32).unwrap().to_vec2().unwrap();
        assert_eq!(y[0], [0.0]);
        assert!((y[1][0] - 6.0).abs() < 0.1, "{y:?}");
    }

    #[test]
    fn the_product_scales_the_integer_sums_by_row_and_channel() {
        // exact case: every value a multiple of its row's / channel's scale
        let x = t(&[&[127.0, 0.0], &[0.0, 254.0]]); // scales 1 and 2
        let w = t(&[&[1.27, 0.0], &[0.0, -12.7]]); // scales 0.01 and 0.1
        let ctx = Int8Context::new(&Device::Cpu).unwrap();
        let wq = Int8Weight::quantize(&w, &ctx).unwrap();
        let y: Vec<Vec<f32>> = wq.matmul(&Int8Activation::new(&x).unwrap(), DType::F32).unwrap().to_vec2().unwrap();
        let want = [[127.0 * 1.27, 0.0], [0.0, 254.0 * -12.7]];
        for (r, row) in y.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert!((v - want[r][c]).abs() < 1e-3 * want[r][c].abs().max(1.0), "{y:?}");
            }
        }
    }

    #[test]
    fn int8_matmul_tracks_the_full_precision_product() {
        let dev = Device::Cpu;
        let ctx = Int8Context::new(&dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (32, 128), &dev).unwrap();
        let w = (Tensor::randn(0f32, 1.0, (48, 128), &dev).unwrap() * 0.05).unwrap();
        let wq = Int8Weight::quantize(&w, &ctx).unwrap();
        let y = wq.matmul(&Int8Activation::new(&x).unwrap(), DType::F32).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let err = relative_l2(&y, &want).unwrap();
        // per-row/per-channel int8 keeps ~7 bits: about 1% on Gaussian data, better than E4M3's 3-bit mantissa
        assert!(err > 1e-4 && err < 2e-2, "relative error {err}");
        // the dequantized weight is the weight the product uses
        let via_dequant = x.matmul(&wq.dequantize(DType::F32).unwrap().t().unwrap()).unwrap();
        assert!(relative_l2(&via_dequant, &want).unwrap() < 1e-2);
    }
}
