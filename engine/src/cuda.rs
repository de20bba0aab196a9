//! CUDA-only pieces: launches of our own kernels (`kernels/zimage.cu`, PTX built by build.rs) and
//! the cuBLASLt FP8 matmul. Every function here has an equivalent written with candle ops that the
//! callers use on other devices; the device checks in `zimage bench --check` compare the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use float8::F8E4M3;
use half::bf16;

use crate::ops::is_channels_last;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/zimage.ptx"));
const MODULE: &str = "zimage_engine_kernels";
const THREADS: u32 = 256;
/// (token, head) rows one warp of `zimage_qk_norm_rope_e4m3_d128` takes (its QK_ROWS).
const QK_ROWS_PER_WARP: u32 = 4;

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("expected a CUDA tensor"),
    }
}

/// The (major, minor) compute capability of the tensor's GPU.
pub fn compute_capability(t: &Tensor) -> Result<(i32, i32)> {
    device_compute_capability(&cuda_device(t)?)
}

pub fn device_compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    use cudarc::driver::sys::CUdevice_attribute as Attr;
    let ctx = dev.cuda_stream().context().clone();
    let major = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).w()?;
    let minor = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).w()?;
    Ok((major, minor))
}

/// Runs `f` on the tensor's CUDA slice of element type T (contiguous, offset applied).
fn with_slice<T: candle_core::cuda_backend::CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(cudarc::driver::CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (st, layout) = t.storage_and_layout();
    let Some((o1, o2)) = layout.contiguous_offsets() else { bail!("kernel input must be contiguous") };
    match &*st {
        Storage::Cuda(s) => f(s.as_cuda_slice::<T>()?.slice(o1..o2)),
        _ => bail!("expected a CUDA tensor"),
    }
}

/// A tensor's CUDA storage held for reading whatever its strides, for kernels that take the
/// strides as arguments (head-range views of a fused product read in place).
struct StridedView<G: std::ops::Deref<Target = Storage>> {
    storage: G,
    start: usize,
}

impl<G: std::ops::Deref<Target = Storage>> StridedView<G> {
    /// The storage as T from the tensor's start offset on.
    fn slice<T: candle_core::cuda_backend::CudaDType>(&self) -> Result<cudarc::driver::CudaView<'_, T>> {
        match &*self.storage {
            Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(self.start..)),
            _ => bail!("expected a CUDA tensor"),
        }
    }
}

fn strided_view(t: &Tensor) -> StridedView<impl std::ops::Deref<Target = Storage> + '_> {
    let (storage, layout) = t.storage_and_layout();
    StridedView { storage, start: layout.start_offset() }
}

fn wrap<T: candle_core::cuda_backend::CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

fn grid_for(work_items: usize) -> u32 {
    // Enough blocks to fill an H100 several times over; grid-stride loops cover the rest.
    (work_items.div_ceil(THREADS as usize)).clamp(1, 132 * 16) as u32
}

fn launch_cfg(blocks: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Whether a contiguous tensor's data starts on a `bytes` boundary (allocations are 256-byte
/// aligned, so this is its start offset): the vectorized kernels load 8 or 16 bytes at a time.
fn starts_aligned(t: &Tensor, bytes: usize) -> bool {
    (t.layout().start_offset() * t.dtype().size_in_bytes()) % bytes == 0
}

/// The device address of a contiguous f32 tensor's data, or 0 (a null kernel argument) for None;
/// the caller keeps the tensor alive until the launch.
fn f32_ptr_or_null(t: Option<&Tensor>, dev: &CudaDevice) -> Result<u64> {
    match t {
        None => Ok(0),
        Some(t) => with_slice::<f32, _>(t, |v| {
            let stream = dev.cuda_stream();
            let (ptr, _guard) = v.device_ptr(&stream);
            Ok(ptr)
        }),
    }
}

/// Threads for a one-block-per-row kernel over `vecs` 8-value vectors: about 4 vectors a thread.
fn row_threads(vecs: usize) -> u32 {
    (vecs.div_ceil(4).next_multiple_of(32)).clamp(32, 256) as u32
}

/// rms_norm(x) * w over the last dim of a bf16 tensor (w: dim values, any float dtype, used
/// rounded to bf16 as candle's kernel uses it), in one pass of a vectorized kernel; with
/// `quantize`, also the per-tensor E4M3 quantization of the result (q, scale), its amax taken in
/// that same pass. None when the shape or alignment does not suit the kernel (dim % 8 != 0).
#[allow(clippy::type_complexity)]
pub fn rms_norm_v8(x: &Tensor, w: &Tensor, eps: f32, quantize: bool) -> Result<Option<(Tensor, Option<(Tensor, Tensor)>)>> {
    let dev = cuda_device(x)?;
    let dim = *x.dims().last().unwrap_or(&0);
    if x.dtype() != DType::BF16 || dim == 0 || dim % 8 != 0 || w.elem_count() != dim {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let w = w.to_dtype(DType::BF16)?.contiguous()?;
    if !starts_aligned(&x, 16) || !starts_aligned(&w, 16) {
        return Ok(None);
    }
    let n = x.elem_count();
    let rows = n / dim;
    let mut out = unsafe { dev.alloc::<bf16>(n)? };
    let amax = if quantize { Some(dev.alloc_zeros::<u32>(1)?) } else { None };
    let (dim32, null) = (dim as u32, 0u64);
    with_slice::<bf16, _>(&x, |xs| {
        with_slice::<bf16, _>(&w, |ws| {
            let f = dev.get_or_load_custom_func("zimage_rms_norm_v8_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&xs);
            b.arg(&ws);
            b.arg(&mut out);
            b.arg(&dim32);
            b.arg(&eps);
            match &amax {
                Some(a) => b.arg(a),
                None => b.arg(&null),
            };
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(dim / 8), 1, 1), shared_mem_bytes: 0 };
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    let fp8 = match amax {
        Some(amax) => {
            let mut q = unsafe { dev.alloc::<F8E4M3>(n)? };
            let mut scale = unsafe { dev.alloc::<f32>(1)? };
            let n64 = n as u64;
            let f = dev.get_or_load_custom_func("zimage_quantize_e4m3_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&out);
            b.arg(&n64);
            b.arg(&amax);
            b.arg(&mut q);
            b.arg(&mut scale);
            unsafe { b.launch(launch_cfg(grid_for(n / 8))) }.w()?;
            Some((wrap(q, &dev, x.dims()), wrap(scale, &dev, &[1])))
        }
        None => None,
    };
    Ok(Some((wrap(out, &dev, x.dims()), fp8)))
}

/// `rms_norm_v8` followed by the per-row int8 quantization of its result, in one kernel:
/// (normed (rows, dim) bf16, (q as U8 bytes, scale (rows,) f32)). None when the shape or
/// alignment does not suit the kernel.
#[allow(clippy::type_complexity)]
pub fn rms_norm_i8_v8(x: &Tensor, w: &Tensor, eps: f32) -> Result<Option<(Tensor, (Tensor, Tensor))>> {
    let dev = cuda_device(x)?;
    let dim = *x.dims().last().unwrap_or(&0);
    if x.dtype() != DType::BF16 || x.rank() != 2 || dim == 0 || dim % 8 != 0 || w.elem_count() != dim {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let w = w.to_dtype(DType::BF16)?.contiguous()?;
    if !starts_aligned(&x, 16) || !starts_aligned(&w, 16) {
        return Ok(None);
    }
    let rows = x.dims()[0];
    let mut out = unsafe { dev.alloc::<bf16>(rows * dim)? };
    let mut q = unsafe { dev.alloc::<u8>(rows * dim)? };
    let mut scale = unsafe { dev.alloc::<f32>(rows)? };
    let dim32 = dim as u32;
    with_slice::<bf16, _>(&x, |xs| {
        with_slice::<bf16, _>(&w, |ws| {
            let f = dev.get_or_load_custom_func("zimage_rms_norm_i8_v8_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&xs);
            b.arg(&ws);
            b.arg(&mut out);
            b.arg(&dim32);
            b.arg(&eps);
            b.arg(&mut q);
            b.arg(&mut scale);
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(dim / 8), 1, 1), shared_mem_bytes: 0 };
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    Ok(Some((wrap(out, &dev, &[rows, dim]), (wrap(q, &dev, &[rows, dim]), wrap(scale, &dev, &[rows])))))
}

/// Nearest-neighbour 2x upsampling of NCHW bf16 with W % 4 == 0 (one read, two row writes per
/// 4 values); None when the shape or alignment does not suit the kernel.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Option<Tensor>> {
    let dev = cuda_device(x)?;
    let (b, c, h, w) = x.dims4()?;
    if is_channels_last(x) && x.dtype() == DType::BF16 && c % 8 == 0 && x.elem_count() / 2 <= u32::MAX as usize {
        // channels-last in, channels-last out
        let xl = x.permute((0, 2, 3, 1))?;
        if starts_aligned(&xl, 16) {
            let n_out_vecs = x.elem_count() * 4 / 8;
            let mut out = unsafe { dev.alloc::<bf16>(x.elem_count() * 4)? };
            let (nv, cv, h32, w32) = (n_out_vecs as u32, (c / 8) as u32, h as u32, w as u32);
            with_slice::<bf16, _>(&xl, |xs| {
                let f = dev.get_or_load_custom_func("zimage_upsample_nearest2x_nhwc_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                bld.arg(&mut out);
                bld.arg(&nv);
                bld.arg(&cv);
                bld.arg(&h32);
                bld.arg(&w32);
                unsafe { bld.launch(launch_cfg(grid_for(n_out_vecs))) }.w()?;
                Ok(())
            })?;
            return Ok(Some(wrap(out, &dev, &[b, 2 * h, 2 * w, c]).permute((0, 3, 1, 2))?));
        }
    }
    if x.dtype() != DType::BF16 || w % 4 != 0 || x.elem_count() / 4 > u32::MAX as usize {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if !starts_aligned(&x, 8) {
        return Ok(None);
    }
    let n_quads = x.elem_count() / 4;
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count() * 4)? };
    let (nq, wq) = (n_quads as u32, (w / 4) as u32);
    with_slice::<bf16, _>(&x, |xs| {
        let f = dev.get_or_load_custom_func("zimage_upsample_nearest2x_bf16", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        b.arg(&mut out);
        b.arg(&nq);
        b.arg(&wq);
        unsafe { b.launch(launch_cfg(grid_for(n_quads))) }.w()?;
        Ok(())
    })?;
    Ok(Some(wrap(out, &dev, &[b, c, 2 * h, 2 * w])))
}

/// Per-tensor E4M3 quantization of a contiguous bf16 tensor whose size is a multiple of 8:
/// an amax kernel then a quantize kernel, the scale staying on the device.
pub fn quantize_e4m3(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(x)?;
    let n = x.elem_count();
    if n % 8 != 0 || x.dtype() != DType::BF16 {
        bail!("quantize_e4m3: bf16 with a multiple of 8 elements, got {:?} {n}", x.dtype());
    }
    let amax = dev.alloc_zeros::<u32>(1)?;
    let mut q = unsafe { dev.alloc::<F8E4M3>(n)? };
    let mut scale = unsafe { dev.alloc::<f32>(1)? };
    let n64 = n as u64;
    with_slice::<bf16, _>(x, |xs| {
        let f = dev.get_or_load_custom_func("zimage_amax_bf16", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        b.arg(&n64);
        b.arg(&amax);
        unsafe { b.launch(launch_cfg(grid_for(n / 8))) }.w()?;
        let f = dev.get_or_load_custom_func("zimage_quantize_e4m3_bf16", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        b.arg(&n64);
        b.arg(&amax);
        b.arg(&mut q);
        b.arg(&mut scale);
        unsafe { b.launch(launch_cfg(grid_for(n / 8))) }.w()?;
        Ok(())
    })?;
    Ok((wrap(q, &dev, x.dims()), wrap(scale, &dev, &[1])))
}

/// E4M3 -> f32 without scaling (candle 0.11's CUDA cast from F8E4M3 looks up a kernel name that
/// candle-kernels does not define).
pub fn e4m3_to_f32(q: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let n = q.elem_count();
    if n % 2 != 0 || q.dtype() != DType::F8E4M3 {
        bail!("e4m3_to_f32: F8E4M3 with an even number of elements");
    }
    let q = q.contiguous()?;
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let pairs = (n / 2) as u64;
    with_slice::<F8E4M3, _>(&q, |qs| {
        let f = dev.get_or_load_custom_func("zimage_e4m3_to_f32", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&qs);
        b.arg(&pairs);
        b.arg(&mut out);
        unsafe { b.launch(launch_cfg(grid_for(n / 2))) }.w()?;
        Ok(())
    })?;
    Ok(wrap(out, &dev, q.dims()))
}

/// silu(gate) * up in bf16 (silu rounded first, as torch does) and its E4M3 quantization, with
/// the amax taken in the same pass that writes the product. `gate_up` (rows, 2 * hidden) is the
/// fused w1|w3 product: each row's gate values then its up values. Returns (rows, hidden) tensors.
pub fn swiglu_quantized(gate_up: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(gate_up)?;
    let (rows, width) = gate_up.dims2()?;
    let hidden = width / 2;
    if width % 2 != 0 || hidden % 2 != 0 || (rows * hidden) % 8 != 0 || gate_up.dtype() != DType::BF16 {
        bail!("swiglu_quantized: bf16 (rows, 2 * hidden) with an even hidden and rows * hidden a multiple of 8");
    }
    let gate_up = gate_up.contiguous()?;
    let n = rows * hidden;
    let amax = dev.alloc_zeros::<u32>(1)?;
    let mut out = unsafe { dev.alloc::<bf16>(n)? };
    let (pairs, row_pairs) = ((n / 2) as u64, (hidden / 2) as u64);
    let vectorized = hidden % 8 == 0 && n / 8 <= u32::MAX as usize && starts_aligned(&gate_up, 16);
    with_slice::<bf16, _>(&gate_up, |gs| {
        if vectorized {
            let (n_vecs, row_vecs) = ((n / 8) as u32, (hidden / 8) as u32);
            let f = dev.get_or_load_custom_func("zimage_swiglu_amax_v8_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&gs);
            b.arg(&mut out);
            b.arg(&n_vecs);
            b.arg(&row_vecs);
            b.arg(&amax);
            unsafe { b.launch(launch_cfg(grid_for(n / 8))) }.w()?;
            return Ok(());
        }
        let f = dev.get_or_load_custom_func("zimage_swiglu_amax_bf16", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&gs);
        b.arg(&mut out);
        b.arg(&pairs);
        b.arg(&row_pairs);
        b.arg(&amax);
        unsafe { b.launch(launch_cfg(grid_for(n / 2))) }.w()?;
        Ok(())
    })?;
    let mut q = unsafe { dev.alloc::<F8E4M3>(n)? };
    let mut scale = unsafe { dev.alloc::<f32>(1)? };
    let n64 = n as u64;
    let f = dev.get_or_load_custom_func("zimage_quantize_e4m3_bf16", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&out);
    b.arg(&n64);
    b.arg(&amax);
    b.arg(&mut q);
    b.arg(&mut scale);
    unsafe { b.launch(launch_cfg(grid_for(n / 8))) }.w()?;
    let dims = [rows, hidden];
    Ok((wrap(out, &dev, &dims), wrap(q, &dev, &dims), wrap(scale, &dev, &[1])))
}

/// Which row-scaled E4M3 kernel `e4m3_rows` launches.
enum RowQuantizer<'a> {
    /// RMSNorm with this weight (dim values) and eps, then the cast.
    RmsNorm(&'a Tensor, f32),
    /// silu(gate) * up of a fused gate|up row (the input holds 2 * width values a row), each row
    /// first multiplied by its factor when given ((rows,) f32).
    SwiGlu(Option<&'a Tensor>),
    /// The input itself.
    Plain,
}

/// One launch of a row-scaled E4M3 kernel over a (rows, in) bf16 input: (q (rows, width) E4M3,
/// scale (rows,) f32). None when the shape or alignment does not suit the kernels (width % 8).
fn e4m3_rows(x: &Tensor, kind: RowQuantizer<'_>) -> Result<Option<(Tensor, Tensor)>> {
    let dev = cuda_device(x)?;
    let (rows, cols) = x.dims2()?;
    let width = if matches!(kind, RowQuantizer::SwiGlu(_)) { cols / 2 } else { cols };
    if x.dtype() != DType::BF16 || rows == 0 || width == 0 || width % 8 != 0 || cols % 8 != 0 || rows > i32::MAX as usize {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if !starts_aligned(&x, 16) {
        return Ok(None);
    }
    let w = match &kind {
        RowQuantizer::RmsNorm(w, _) if w.elem_count() != width => return Ok(None),
        RowQuantizer::RmsNorm(w, _) => Some(w.to_dtype(DType::BF16)?.contiguous()?),
        _ => None,
    };
    let row_factor = match &kind {
        RowQuantizer::SwiGlu(Some(f)) if f.elem_count() != rows || f.dtype() != DType::F32 => {
            bail!("swiglu row factors {:?} {:?} for {rows} rows", f.dims(), f.dtype())
        }
        RowQuantizer::SwiGlu(Some(f)) => Some(f.contiguous()?),
        _ => None,
    };
    if w.as_ref().is_some_and(|w| !starts_aligned(w, 16)) {
        return Ok(None);
    }
    let mut q = unsafe { dev.alloc::<F8E4M3>(rows * width)? };
    let mut scale = unsafe { dev.alloc::<f32>(rows)? };
    let vecs = (width / 8) as u32;
    let factor_ptr = f32_ptr_or_null(row_factor.as_ref(), &dev)?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(width / 8), 1, 1), shared_mem_bytes: 0 };
    with_slice::<bf16, _>(&x, |xs| {
        let name = match kind {
            RowQuantizer::RmsNorm(..) => "zimage_rms_norm_e4m3_rows_v8_bf16",
            RowQuantizer::SwiGlu(_) => "zimage_swiglu_e4m3_rows_v8_bf16",
            RowQuantizer::Plain => "zimage_quantize_e4m3_rows_v8_bf16",
        };
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut launch = |ws: Option<&cudarc::driver::CudaView<'_, bf16>>| -> Result<()> {
            let mut b = f.builder();
            b.arg(&xs);
            if let Some(ws) = ws {
                b.arg(ws);
            }
            b.arg(&mut q);
            b.arg(&mut scale);
            if let RowQuantizer::RmsNorm(_, eps) = &kind {
                let dim = width as u32;
                b.arg(&dim);
                b.arg(eps);
                return unsafe { b.launch(cfg) }.w().map(|_| ());
            }
            b.arg(&vecs);
            if matches!(kind, RowQuantizer::SwiGlu(_)) {
                b.arg(&factor_ptr);
            }
            unsafe { b.launch(cfg) }.w().map(|_| ())
        };
        match &w {
            Some(w) => with_slice::<bf16, _>(w, |ws| launch(Some(&ws))),
            None => launch(None),
        }
    })?;
    Ok(Some((wrap(q, &dev, &[rows, width]), wrap(scale, &dev, &[rows]))))
}

/// E4M3 of rms_norm(x) * w with one scale per row (x: (rows, dim) bf16), in one kernel that never
/// writes the normed activation: (q, scale (rows,)). None when the kernel does not apply.
pub fn rms_norm_e4m3_rows(x: &Tensor, w: &Tensor, eps: f32) -> Result<Option<(Tensor, Tensor)>> {
    e4m3_rows(x, RowQuantizer::RmsNorm(w, eps))
}

/// E4M3 of silu(gate) * up with one scale per row, from the fused (rows, 2 * hidden) gate|up
/// product, in one kernel: (q (rows, hidden), scale (rows,)). `row_factor` ((rows,) f32): the
/// product's rows are in those units (an FP8 product left unscaled), multiplied in first. None
/// when the kernel does not apply.
pub fn swiglu_e4m3_rows(gate_up: &Tensor, row_factor: Option<&Tensor>) -> Result<Option<(Tensor, Tensor)>> {
    e4m3_rows(gate_up, RowQuantizer::SwiGlu(row_factor))
}

/// E4M3 of a (rows, dim) bf16 activation with one scale per row, in one kernel.
pub fn quantize_e4m3_rows(x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    e4m3_rows(x, RowQuantizer::Plain)
}

/// The token stride of a (B, L, H, D) tensor whose heads and dims are packed ([.., .., D, 1]) and
/// whose tokens are evenly spaced ([L * ts, ts, ..]): contiguous tensors and head-range views of a
/// fused qkv product alike.
fn token_stride(x: &Tensor) -> Option<usize> {
    let (_, l, h, d) = x.dims4().ok()?;
    let st = x.stride();
    let packed = st[3] == 1 && (st[2] == d || h == 1) && st[1] >= h * d;
    (packed && (st[0] == l * st[1] || x.dims()[0] == 1)).then_some(st[1])
}

/// Fused per-head RMSNorm + interleaved RoPE on (B, L, H, D) bf16; `weight` (D) f32 or None;
/// cos/sin (L, D/2) f32. x may be a head-range view of a fused qkv product (see `token_stride`).
/// Output (B, L, H, D) bf16, contiguous.
pub fn qk_norm_rope(x: &Tensor, weight: Option<&Tensor>, eps: f32, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (b, l, h, d) = x.dims4()?;
    if x.dtype() != DType::BF16 || d % 2 != 0 || cos.dims() != [l, d / 2] || sin.dims() != [l, d / 2] {
        bail!("qk_norm_rope: bf16 (B, L, H, D) with f32 tables (L, D/2)");
    }
    let (x, ts) = match token_stride(x) {
        Some(ts) => (x.clone(), ts as u64),
        None => (x.contiguous()?, (h * d) as u64),
    };
    let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
    if d == 128 && ts % 4 == 0 && starts_aligned(&x, 8) && starts_aligned(&cos, 8) && starts_aligned(&sin, 8) {
        return qk_norm_rope_d128(&dev, &x, ts, weight, eps, &cos, &sin);
    }
    let w = match weight {
        Some(w) => w.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::ones(d, DType::F32, x.device())?,
    };
    let rows = b * l * h;
    let mut out = unsafe { dev.alloc::<bf16>(rows * d)? };
    let (rows32, l32, h32, d32) = (rows as u32, l as u32, h as u32, d as u32);
    let has_weight: i32 = weight.is_some() as i32;
    let held = strided_view(&x);
    let xs = held.slice::<bf16>()?;
    with_slice::<f32, _>(&w, |ws| {
        with_slice::<f32, _>(&cos, |cs| {
            with_slice::<f32, _>(&sin, |ss| {
                let f = dev.get_or_load_custom_func("zimage_qk_norm_rope_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                bld.arg(&ws);
                bld.arg(&cs);
                bld.arg(&ss);
                bld.arg(&mut out);
                bld.arg(&rows32);
                bld.arg(&l32);
                bld.arg(&h32);
                bld.arg(&d32);
                bld.arg(&ts);
                bld.arg(&has_weight);
                bld.arg(&eps);
                let warps_per_block = THREADS / 32;
                let blocks = (rows as u32).div_ceil(warps_per_block);
                unsafe { bld.launch(launch_cfg(blocks)) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(wrap(out, &dev, &[b, l, h, d]))
}

/// `qk_norm_rope` for head dim 128: one warp per row, each lane's 4 values loaded once; the norm
/// weight used in bf16 (as the composed path uses it), so no per-call cast.
fn qk_norm_rope_d128(dev: &CudaDevice, x: &Tensor, ts: u64, weight: Option<&Tensor>, eps: f32, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, l, h, d) = x.dims4()?;
    let w = match weight {
        Some(w) => {
            let w = w.to_dtype(DType::BF16)?.contiguous()?;
            if !starts_aligned(&w, 8) {
                bail!("qk_norm_rope: norm weight not 8-byte aligned");
            }
            Some(w)
        }
        None => None,
    };
    let rows = b * l * h;
    let mut out = unsafe { dev.alloc::<bf16>(rows * d)? };
    let (rows32, l32, h32, null) = (rows as u32, l as u32, h as u32, 0u64);
    let held = strided_view(&x);
    let xs = held.slice::<bf16>()?;
    let launch = |ws: Option<cudarc::driver::CudaView<'_, bf16>>, out: &mut CudaSlice<bf16>| -> Result<()> {
        with_slice::<f32, _>(cos, |cs| {
            with_slice::<f32, _>(sin, |ss| {
                let f = dev.get_or_load_custom_func("zimage_qk_norm_rope_d128_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                match &ws {
                    Some(ws) => bld.arg(ws),
                    None => bld.arg(&null),
                };
                bld.arg(&cs);
                bld.arg(&ss);
                bld.arg(out);
                bld.arg(&rows32);
                bld.arg(&l32);
                bld.arg(&h32);
                bld.arg(&ts);
                bld.arg(&eps);
                let warps_per_block = THREADS / 32;
                unsafe { bld.launch(launch_cfg(rows32.div_ceil(warps_per_block))) }.w()?;
                Ok(())
            })
        })
    };
    match &w {
        Some(w) => with_slice::<bf16, _>(w, |ws| launch(Some(ws), &mut out))?,
        None => launch(None, &mut out)?,
    }
    Ok(wrap(out, dev, &[b, l, h, d]))
}

/// One cached cuBLASLt plan for an (m, n, k) shape: descriptors, the heuristic's candidate
/// algorithms, and (once timed on the first call) the fastest of them.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    chosen: Option<sys::cublasLtMatmulAlgo_t>,
}

impl Plan {
    fn destroy(self) {
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// How many algorithms the heuristic is asked for when autotuning; its first pick otherwise.
const AUTOTUNE_CANDIDATES: i32 = 8;

/// Which low-precision product a [`LtGemm`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LtKind {
    /// E4M3 x E4M3, f32 accumulation, bf16 out scaled by alpha (the weight's scale) and the
    /// activation's scale read from the device.
    Fp8,
    /// int8 x int8, int32 accumulation and int32 out (the scales are applied after, see `int8`).
    Int8,
}

/// cuBLASLt matmuls of one kind on one device, in the "TN" form both kinds require: with W (n, k)
/// and X (m, k) row-major, D (m, n) row-major = X · Wᵀ, computed column-major as
/// D (n x m) = op(W) (n x k) · X (k x m) with W read transposed.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: Mutex<CudaSlice<u8>>,
    workspace_size: usize,
    /// Keyed by (m, n, k, activation scaled per row).
    plans: Mutex<HashMap<(usize, usize, usize, bool), Plan>>,
    /// Per-row products take a vector of weight scales too (cuBLASLt scales both operands by
    /// vectors or neither): ones of each output width used, the weight's scale going in alpha.
    ones: Mutex<HashMap<usize, CudaSlice<f32>>>,
    autotune: bool,
    kind: LtKind,
    stream: Arc<CudaStream>,
    dev: CudaDevice,
}

/// FP8 products: D(bf16) = alpha * scale_b * (W_q · X_qᵀ) in f32 accumulation.
pub type Fp8Gemm = LtGemm;
/// INT8 products: D(int32) = W_q · X_qᵀ exactly.
pub type Int8Gemm = LtGemm;

// The raw handles are only used under the plans/workspace mutexes, on the device's one stream.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

fn lt_err(e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

impl LtGemm {
    /// FP8 matmuls. `autotune`: time the heuristic's candidate algorithms on each shape's first
    /// call and keep the fastest; otherwise take the heuristic's first pick.
    pub fn new(dev: &CudaDevice, autotune: bool) -> Result<Self> {
        Self::create(dev, autotune, LtKind::Fp8)
    }

    /// INT8 matmuls (int8 tensor cores: compute capability 8.0 and newer here), autotuned.
    pub fn new_int8(dev: &CudaDevice) -> Result<Self> {
        Self::create(dev, true, LtKind::Int8)
    }

    fn create(dev: &CudaDevice, autotune: bool, kind: LtKind) -> Result<Self> {
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let (major, minor) = device_compute_capability(dev)?;
        match kind {
            LtKind::Fp8 if (major, minor) < (8, 9) => {
                bail!("FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is {major}.{minor}: run without --fp8")
            }
            LtKind::Int8 if major < 8 => {
                bail!("INT8 here needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}: run with --precision bf16")
            }
            _ => {}
        }
        let handle = lt::create_handle().map_err(lt_err)?;
        let workspace_size = 32 << 20;
        let workspace = dev.alloc_zeros::<u8>(workspace_size)?;
        Ok(Self {
            handle,
            workspace: Mutex::new(workspace),
            workspace_size,
            plans: Mutex::new(HashMap::new()),
            ones: Mutex::new(HashMap::new()),
            autotune,
            kind,
            stream,
            dev: dev.clone(),
        })
    }

    /// Why FP8 products with one activation scale per row (outer-vector scaling) are unavailable
    /// on this GPU, None when they are: cuBLASLt's answer for a small shape.
    pub fn row_scaling_problem(&self) -> Option<String> {
        if self.kind != LtKind::Fp8 {
            return Some("not an FP8 context".into());
        }
        match self.plan(128, 128, 128, true) {
            Ok(p) if p.candidates.is_empty() => {
                p.destroy();
                Some("the heuristic's algorithms all failed".into())
            }
            Ok(p) => {
                p.destroy();
                None
            }
            Err(e) => Some(e.to_string()),
        }
    }

    /// The shape's plan; a row-scaled plan that finds no algorithm with fast accumulation is
    /// asked for again without it.
    fn plan(&self, m: usize, n: usize, k: usize, row_scaled: bool) -> Result<Plan> {
        match self.plan_with(m, n, k, row_scaled, true) {
            Err(_) if row_scaled => self.plan_with(m, n, k, row_scaled, false),
            other => other,
        }
    }

    fn plan_with(&self, m: usize, n: usize, k: usize, row_scaled: bool, fast_accum: bool) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        use sys::cudaDataType as T;
        let (compute, scale, operand, out) = match self.kind {
            LtKind::Fp8 => (sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, T::CUDA_R_32F, T::CUDA_R_8F_E4M3, T::CUDA_R_16BF),
            LtKind::Int8 => (sys::cublasComputeType_t::CUBLAS_COMPUTE_32I, T::CUDA_R_32I, T::CUDA_R_8I, T::CUDA_R_32I),
        };
        unsafe {
            let desc = lt::create_matmul_desc(compute, scale).map_err(lt_err)?;
            let ta = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
            let tb = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
            let set = |attr: A, p: *const std::ffi::c_void, size: usize| lt::set_matmul_desc_attribute(desc, attr, p, size).map_err(lt_err);
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const _ as *const _, std::mem::size_of_val(&ta))?;
            set(A::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const _ as *const _, std::mem::size_of_val(&tb))?;
            if self.kind == LtKind::Fp8 && fast_accum {
                let fast: i8 = 1;
                set(A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast as *const _ as *const _, 1)?;
            }
            if row_scaled {
                // CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F (written as its value: cudarc names
                // it only in bindings of CUDA 12.9 and newer). A's vector runs along op(A)'s rows
                // (our n outputs), B's along its columns (our m tokens).
                let outer_vec: u32 = 3;
                for attr in [A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE] {
                    if let Err(e) = set(attr, &outer_vec as *const _ as *const _, 4) {
                        let _ = lt::destroy_matmul_desc(desc);
                        return Err(e);
                    }
                }
            }
            let a = lt::create_matrix_layout(operand, k as u64, n as u64, k as i64).map_err(lt_err)?;
            let b = lt::create_matrix_layout(operand, k as u64, m as u64, k as i64).map_err(lt_err)?;
            let d = lt::create_matrix_layout(out, n as u64, m as u64, n as i64).map_err(lt_err)?;
            let pref = lt::create_matmul_pref().map_err(lt_err)?;
            let ws = self.workspace_size as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const _,
                std::mem::size_of_val(&ws),
            )
            .map_err(lt_err)?;
            let wanted = if self.autotune { AUTOTUNE_CANDIDATES } else { 1 };
            let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(wanted as usize);
            let mut found = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, d, d, pref, wanted, results.as_mut_ptr(), &mut found);
            lt::destroy_matmul_pref(pref).map_err(lt_err)?;
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || found <= 0 {
                let _ = (lt::destroy_matrix_layout(a), lt::destroy_matrix_layout(b), lt::destroy_matrix_layout(d));
                let _ = lt::destroy_matmul_desc(desc);
                bail!("no cuBLASLt {:?} algorithm for m={m} n={n} k={k} (row scaling {row_scaled}): {status:?}", self.kind);
            }
            results.set_len(found as usize);
            let candidates: Vec<_> = results
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            let chosen = (candidates.len() == 1).then(|| candidates[0]);
            Ok(Plan { desc, a, b, d, candidates, chosen })
        }
    }

    /// Launches D = alpha * op(W) · X (+ beta * D) for the shape's plan (made, and on its first
    /// call autotuned, here). Device pointers; `alpha`/`beta` point at host values of the plan's
    /// scale type; `b_scale`: the FP8 activation scale's device pointer.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        (m, n, k): (usize, usize, usize),
        w_ptr: u64,
        x_ptr: u64,
        o_ptr: u64,
        alpha: *const std::ffi::c_void,
        beta: *const std::ffi::c_void,
        b_scale: Option<u64>,
        a_scale_vec: Option<u64>,
    ) -> Result<()> {
        let key = (m, n, k, a_scale_vec.is_some());
        let mut plans = self.plans.lock().expect("cuBLASLt plan cache poisoned");
        if !plans.contains_key(&key) {
            let p = self.plan(m, n, k, key.3)?;
            plans.insert(key, p);
        }
        let plan = plans.get_mut(&key).expect("plan inserted above");
        let (desc, a_layout, b_layout, d_layout) = (plan.desc, plan.a, plan.b, plan.d);
        // This call's scale pointers (the plan's descriptor is shared by every call of its shape).
        use sys::cublasLtMatmulDescAttributes_t as A;
        for (attr, ptr) in [(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale), (A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale_vec)] {
            if let Some(ptr) = &ptr {
                unsafe { lt::set_matmul_desc_attribute(desc, attr, ptr as *const _ as *const _, std::mem::size_of_val(ptr)) }.map_err(lt_err)?;
            }
        }
        let mut ws = self.workspace.lock().expect("cuBLASLt workspace poisoned");
        let (ws_ptr, _gws) = ws.device_ptr_mut(&self.stream);
        let run = |algo: &sys::cublasLtMatmulAlgo_t| -> Result<()> {
            unsafe {
                lt::matmul(
                    self.handle,
                    desc,
                    alpha,
                    beta,
                    w_ptr as *const _,
                    a_layout,
                    x_ptr as *const _,
                    b_layout,
                    o_ptr as *const _,
                    d_layout,
                    o_ptr as *mut _,
                    d_layout,
                    algo,
                    ws_ptr as *mut _,
                    self.workspace_size,
                    self.stream.cu_stream() as *mut _,
                )
                .map_err(lt_err)
            }
        };
        if plan.chosen.is_none() {
            plan.chosen = Some(self.fastest(&plan.candidates, &run)?);
        }
        run(plan.chosen.as_ref().expect("chosen above"))
    }

    /// x_q (m, k) E4M3 with device scale x_scale, (1,) for the whole activation or (m,) one per
    /// row, f32; w_q (n, k) E4M3 with host scale w_scale. Returns (m, n) bf16.
    pub fn matmul(&self, x_q: &Tensor, x_scale: &Tensor, w_q: &Tensor, w_scale: f32) -> Result<Tensor> {
        let (m, k) = x_q.dims2()?;
        let (n, k2) = w_q.dims2()?;
        if self.kind != LtKind::Fp8 || k != k2 || x_q.dtype() != DType::F8E4M3 || w_q.dtype() != DType::F8E4M3 {
            bail!("fp8 matmul: x {:?} {:?}, w {:?} {:?}", x_q.dims(), x_q.dtype(), w_q.dims(), w_q.dtype());
        }
        if k % 16 != 0 || n % 16 != 0 {
            bail!("fp8 matmul: k={k} and n={n} must be multiples of 16");
        }
        let row_scaled = match x_scale.elem_count() {
            1 => false,
            rows if rows == m => true,
            other => bail!("fp8 matmul: {other} activation scales for {m} rows"),
        };
        let mut out = unsafe { self.dev.alloc::<bf16>(m * n)? };
        let (x_q, w_q, x_scale) = (x_q.contiguous()?, w_q.contiguous()?, x_scale.contiguous()?);
        let (alpha, beta) = (w_scale, 0f32);
        let mut ones = row_scaled.then(|| self.ones.lock().expect("cuBLASLt scale vectors poisoned"));
        if let Some(ones) = ones.as_mut().filter(|o| !o.contains_key(&n)) {
            ones.insert(n, self.stream.clone_htod(&vec![1f32; n]).w()?);
        }
        let a_vec = ones.as_ref().and_then(|o| o.get(&n));
        with_slice::<F8E4M3, _>(&x_q, |xs| {
            with_slice::<F8E4M3, _>(&w_q, |wsl| {
                with_slice::<f32, _>(&x_scale, |ss| {
                    let (x_ptr, _gx) = xs.device_ptr(&self.stream);
                    let (w_ptr, _gw) = wsl.device_ptr(&self.stream);
                    let (s_ptr, _gs) = ss.device_ptr(&self.stream);
                    let (o_ptr, _go) = out.device_ptr_mut(&self.stream);
                    let a_vec_ptr = a_vec.map(|v| v.device_ptr(&self.stream));
                    let (a, b) = (&alpha as *const f32 as *const _, &beta as *const f32 as *const _);
                    self.launch((m, n, k), w_ptr, x_ptr, o_ptr, a, b, Some(s_ptr), a_vec_ptr.as_ref().map(|(p, _)| *p))
                })
            })
        })?;
        Ok(wrap(out, &self.dev, &[m, n]))
    }

    /// The exact int32 product W_q · X_qᵀ of x_q (m, k) and w_q (n, k), int8 as U8 bytes: (m, n)
    /// row-major sums.
    fn product_i8(&self, x_q: &Tensor, w_q: &Tensor) -> Result<(CudaSlice<i32>, usize, usize)> {
        let (m, k) = x_q.dims2()?;
        let (n, k2) = w_q.dims2()?;
        if self.kind != LtKind::Int8 || k != k2 || x_q.dtype() != DType::U8 || w_q.dtype() != DType::U8 {
            bail!("int8 matmul: x {:?} {:?}, w {:?} {:?}", x_q.dims(), x_q.dtype(), w_q.dims(), w_q.dtype());
        }
        if k % 16 != 0 || n % 16 != 0 {
            bail!("int8 matmul: k={k} and n={n} must be multiples of 16");
        }
        let mut acc = unsafe { self.dev.alloc::<i32>(m * n)? };
        let (x_q, w_q) = (x_q.contiguous()?, w_q.contiguous()?);
        let (alpha, beta) = (1i32, 0i32);
        with_slice::<u8, _>(&x_q, |xs| {
            with_slice::<u8, _>(&w_q, |wsl| {
                let (x_ptr, _gx) = xs.device_ptr(&self.stream);
                let (w_ptr, _gw) = wsl.device_ptr(&self.stream);
                let (o_ptr, _go) = acc.device_ptr_mut(&self.stream);
                let (a, b) = (&alpha as *const i32 as *const _, &beta as *const i32 as *const _);
                self.launch((m, n, k), w_ptr, x_ptr, o_ptr, a, b, None, None)
            })
        })?;
        Ok((acc, m, n))
    }

    /// x_q (m, k) and w_q (n, k) int8 (as U8 bytes), per-row scales x_scale (m,) and w_scale (n,)
    /// f32: (m, n) bf16 = (int32 W_q · X_qᵀ) * x_scale[row] * w_scale[col], the scaling in one pass
    /// after the product (cuBLASLt's int8 products write int32 or int8, not bf16).
    pub fn matmul_i8(&self, x_q: &Tensor, x_scale: &Tensor, w_q: &Tensor, w_scale: &Tensor) -> Result<Tensor> {
        let (acc, m, n) = self.product_i8(x_q, w_q)?;
        let mut out = unsafe { self.dev.alloc::<bf16>(m * n)? };
        let (x_scale, w_scale) = (x_scale.contiguous()?, w_scale.contiguous()?);
        let (m32, n32) = (m as u32, n as u32);
        with_slice::<f32, _>(&x_scale, |sx| {
            with_slice::<f32, _>(&w_scale, |sw| {
                let f = self.dev.get_or_load_custom_func("zimage_dequant_i32_bf16", MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&acc);
                b.arg(&sx);
                b.arg(&sw);
                b.arg(&mut out);
                b.arg(&m32);
                b.arg(&n32);
                unsafe { b.launch(launch_cfg(grid_for(m * n / 4))) }.w()?;
                Ok(())
            })
        })?;
        Ok(wrap(out, &self.dev, &[m, n]))
    }

    /// The INT8 feed-forward's gate|up product (w_q: w1 rows then w3 rows, 2 * hidden) followed by
    /// silu(gate) * up and its per-row int8 quantization for w2, in one pass after the product:
    /// (q (m, hidden) as U8 bytes, scale (m,) f32). None when hidden % 4 != 0.
    pub fn matmul_i8_swiglu(&self, x_q: &Tensor, x_scale: &Tensor, w_q: &Tensor, w_scale: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let hidden = w_q.dims2()?.0 / 2;
        if hidden % 4 != 0 || hidden * 2 > 48 * 1024 {
            return Ok(None);
        }
        let (acc, m, _) = self.product_i8(x_q, w_q)?;
        let mut q = unsafe { self.dev.alloc::<u8>(m * hidden)? };
        let mut scale = unsafe { self.dev.alloc::<f32>(m)? };
        let (x_scale, w_scale) = (x_scale.contiguous()?, w_scale.contiguous()?);
        let hidden32 = hidden as u32;
        with_slice::<f32, _>(&x_scale, |sx| {
            with_slice::<f32, _>(&w_scale, |sw| {
                let f = self.dev.get_or_load_custom_func("zimage_swiglu_i32_i8", MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&acc);
                b.arg(&sx);
                b.arg(&sw);
                b.arg(&hidden32);
                b.arg(&mut q);
                b.arg(&mut scale);
                let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (row_threads(hidden / 8), 1, 1), shared_mem_bytes: (hidden * 2) as u32 };
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            })
        })?;
        Ok(Some((wrap(q, &self.dev, &[m, hidden]), wrap(scale, &self.dev, &[m]))))
    }

    /// The candidate with the lowest time: each is timed over 4 launches in 3 rounds that
    /// alternate between the candidates (so a clock change during tuning does not favour one),
    /// keeping its best round; candidates that fail to launch are skipped. (One 3-launch timing
    /// each picked an algorithm 19% slower than the heuristic's first for the q|k|v shape in one
    /// H100 run.)
    fn fastest(
        &self,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        launch: &dyn Fn(&sys::cublasLtMatmulAlgo_t) -> Result<()>,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut best_secs: Vec<Option<f64>> = candidates.iter().map(|algo| launch(algo).ok().map(|_| f64::INFINITY)).collect();
        for _round in 0..3 {
            for (algo, best) in candidates.iter().zip(best_secs.iter_mut()) {
                let Some(b) = best else { continue };
                self.stream.synchronize().w()?;
                let t = std::time::Instant::now();
                for _ in 0..4 {
                    launch(algo)?;
                }
                self.stream.synchronize().w()?;
                *b = b.min(t.elapsed().as_secs_f64());
            }
        }
        candidates
            .iter()
            .zip(&best_secs)
            .filter_map(|(a, t)| t.map(|t| (t, *a)))
            .min_by(|x, y| x.0.total_cmp(&y.0))
            .map(|(_, a)| a)
            .ok_or_else(|| candle_core::Error::Msg(format!("no cuBLASLt {:?} algorithm could be launched", self.kind)))
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        let plans = std::mem::take(&mut *self.plans.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, p) in plans {
            p.destroy();
        }
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// Per-row symmetric int8 quantization of a bf16 (rows, dim) tensor (dim % 8 == 0) in one kernel:
/// (q as U8 bytes, scale (rows,) f32), the arithmetic of `int8::quantize_rows`. None when the
/// shape or alignment does not suit the kernel.
pub fn quantize_rows_i8(x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let dev = cuda_device(x)?;
    let dim = *x.dims().last().unwrap_or(&0);
    if x.dtype() != DType::BF16 || x.rank() != 2 || dim == 0 || dim % 8 != 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if !starts_aligned(&x, 16) {
        return Ok(None);
    }
    let rows = x.dims()[0];
    let mut q = unsafe { dev.alloc::<u8>(rows * dim)? };
    let mut scale = unsafe { dev.alloc::<f32>(rows)? };
    let dim32 = dim as u32;
    with_slice::<bf16, _>(&x, |xs| {
        let f = dev.get_or_load_custom_func("zimage_quantize_rows_i8_bf16", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        b.arg(&dim32);
        b.arg(&mut q);
        b.arg(&mut scale);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(dim / 8), 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok(Some((wrap(q, &dev, &[rows, dim]), wrap(scale, &dev, &[rows]))))
}


/// `group_norm` of a channels-last x, output channels-last: statistics per (chunk of pixels,
/// group), merged per group, then applied; None where the kernels do not fit (C % 8, more than
/// 2048 channels, groups whose channels neither fill nor divide 8).
fn group_norm_nhwc(dev: &CudaDevice, x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f32, silu: bool) -> Result<Option<Tensor>> {
    let (b, c, h, w) = x.dims4()?;
    let cpg = c / groups;
    let c_vecs = c / 8;
    if c % 8 != 0 || c_vecs == 0 || c_vecs > 256 || 256 % c_vecs != 0 || !(cpg % 8 == 0 || 8 % cpg == 0) {
        return Ok(None);
    }
    let xl = x.permute((0, 2, 3, 1))?;
    let n_vecs = b * h * w * c_vecs;
    if !starts_aligned(&xl, 16) || n_vecs > u32::MAX as usize || h * w > u32::MAX as usize {
        return Ok(None);
    }
    let pixels = h * w;
    let rows = 256 / c_vecs;
    // about a thousand blocks over the batch, at least one pixel per row of threads
    let chunk_pixels = pixels.div_ceil((1024 / b).max(1)).max(rows);
    let chunks = pixels.div_ceil(chunk_pixels);
    let mut partial = unsafe { dev.alloc::<f32>(b * groups * chunks * 3)? };
    let mut stats = unsafe { dev.alloc::<f32>(b * groups * 2)? };
    let mut out = unsafe { dev.alloc::<bf16>(n_vecs * 8)? };
    let (pixels32, c_vecs32, chunk32, cpg32, groups32, chunks32, n_vecs32) =
        (pixels as u32, c_vecs as u32, chunk_pixels as u32, cpg as u32, groups as u32, chunks as u32, n_vecs as u32);
    let silu32 = silu as i32;
    with_slice::<bf16, _>(&xl, |xs| {
        let f = dev.get_or_load_custom_func("zimage_group_stats_nhwc_v8_bf16", MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xs);
        bld.arg(&pixels32);
        bld.arg(&c_vecs32);
        bld.arg(&chunk32);
        bld.arg(&cpg32);
        bld.arg(&groups32);
        bld.arg(&mut partial);
        let cfg = LaunchConfig { grid_dim: (chunks32, b as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { bld.launch(cfg) }.w()?;
        let f = dev.get_or_load_custom_func("zimage_group_finalize", MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&partial);
        bld.arg(&chunks32);
        bld.arg(&eps);
        bld.arg(&mut stats);
        let cfg = LaunchConfig { grid_dim: ((b * groups) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { bld.launch(cfg) }.w()?;
        with_slice::<f32, _>(gamma, |gs| {
            with_slice::<f32, _>(beta, |bs| {
                let f = dev.get_or_load_custom_func("zimage_group_norm_apply_nhwc_v8_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                bld.arg(&stats);
                bld.arg(&gs);
                bld.arg(&bs);
                bld.arg(&mut out);
                bld.arg(&n_vecs32);
                bld.arg(&c_vecs32);
                bld.arg(&pixels32);
                bld.arg(&cpg32);
                bld.arg(&groups32);
                bld.arg(&silu32);
                unsafe { bld.launch(launch_cfg(grid_for(n_vecs))) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(Some(wrap(out, dev, &[b, h, w, c]).permute((0, 3, 1, 2))?))
}

/// GroupNorm over NCHW bf16 (statistics in f32 with Welford/Chan merging, like torch), affine
/// `gamma`/`beta` (C) f32, optionally followed by SiLU, in two passes over x.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f32, silu: bool) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (b, c, h, w) = x.dims4()?;
    if x.dtype() != DType::BF16 || c % groups != 0 {
        bail!("group_norm: bf16 NCHW with channels divisible by groups");
    }
    let (gamma, beta) = (gamma.to_dtype(DType::F32)?.contiguous()?, beta.to_dtype(DType::F32)?.contiguous()?);
    if is_channels_last(x) {
        if let Some(y) = group_norm_nhwc(&dev, x, &gamma, &beta, groups, eps, silu)? {
            return Ok(y);
        }
    }
    let x = x.contiguous()?;
    if (h * w) % 8 == 0 && (c / groups * h * w) / 8 <= u32::MAX as usize && starts_aligned(&x, 16) {
        return group_norm_v8(&dev, &x, &gamma, &beta, groups, eps, silu);
    }
    let hw = (h * w) as u64;
    let cpg = (c / groups) as u32;
    let group_len = (c / groups * h * w) as u64;
    let chunk_len: u32 = 8192;
    let chunks = (group_len as usize).div_ceil(chunk_len as usize) as u32;
    let total_groups = (b * groups) as u32;
    let mut partial = unsafe { dev.alloc::<f32>(total_groups as usize * chunks as usize * 3)? };
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count())? };
    let cfg = LaunchConfig { grid_dim: (chunks, total_groups, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (groups32, silu32) = (groups as u32, silu as i32);
    with_slice::<bf16, _>(&x, |xs| {
        let f = dev.get_or_load_custom_func("zimage_group_stats_bf16", MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xs);
        bld.arg(&group_len);
        bld.arg(&chunk_len);
        bld.arg(&mut partial);
        unsafe { bld.launch(cfg) }.w()?;
        with_slice::<f32, _>(&gamma, |gs| {
            with_slice::<f32, _>(&beta, |bs| {
                let f = dev.get_or_load_custom_func("zimage_group_norm_apply_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                bld.arg(&partial);
                bld.arg(&gs);
                bld.arg(&bs);
                bld.arg(&mut out);
                bld.arg(&group_len);
                bld.arg(&chunk_len);
                bld.arg(&chunks);
                bld.arg(&hw);
                bld.arg(&cpg);
                bld.arg(&groups32);
                bld.arg(&eps);
                bld.arg(&silu32);
                unsafe { bld.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(wrap(out, &dev, &[b, c, h, w]))
}

/// `group_norm` when H*W is a multiple of 8: both passes 8 values a step, the partials of a group
/// merged by the whole block.
fn group_norm_v8(dev: &CudaDevice, x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f32, silu: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let group_vecs = (c / groups * h * w / 8) as u32;
    let chunk_vecs: u32 = 2048;
    let chunks = group_vecs.div_ceil(chunk_vecs);
    let total_groups = (b * groups) as u32;
    let mut partial = unsafe { dev.alloc::<f32>(total_groups as usize * chunks as usize * 3)? };
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count())? };
    let cfg = LaunchConfig { grid_dim: (chunks, total_groups, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (hw_vecs, cpg, groups32, silu32) = ((h * w / 8) as u32, (c / groups) as u32, groups as u32, silu as i32);
    with_slice::<bf16, _>(x, |xs| {
        let f = dev.get_or_load_custom_func("zimage_group_stats_v8_bf16", MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xs);
        bld.arg(&group_vecs);
        bld.arg(&chunk_vecs);
        bld.arg(&mut partial);
        unsafe { bld.launch(cfg) }.w()?;
        with_slice::<f32, _>(gamma, |gs| {
            with_slice::<f32, _>(beta, |bs| {
                let f = dev.get_or_load_custom_func("zimage_group_norm_apply_v8_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                bld.arg(&partial);
                bld.arg(&gs);
                bld.arg(&bs);
                bld.arg(&mut out);
                bld.arg(&group_vecs);
                bld.arg(&chunk_vecs);
                bld.arg(&chunks);
                bld.arg(&hw_vecs);
                bld.arg(&cpg);
                bld.arg(&groups32);
                bld.arg(&eps);
                bld.arg(&silu32);
                unsafe { bld.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(wrap(out, dev, &[b, c, h, w]))
}

#[cfg(feature = "cudnn")]
pub use conv::CudnnConv;

#[cfg(feature = "cudnn")]
mod conv {
    use super::*;
    use cudarc::cudnn::{sys as csys, ConvForward, Cudnn};

    /// (b, c, h, w, k, r, s, padding, stride, channels-last)
    type Key = [usize; 10];

    /// The output's (H', W') of a convolution with an (r, s) filter.
    fn out_hw(h: usize, w: usize, r: usize, s: usize, padding: usize, stride: usize) -> (usize, usize) {
        ((h + 2 * padding - r) / stride + 1, (w + 2 * padding - s) / stride + 1)
    }
    const MAX_WORKSPACE: usize = 256 << 20;

    struct Inner {
        cudnn: Arc<Cudnn>,
        algos: HashMap<Key, (csys::cudnnConvolutionFwdAlgo_t, usize)>,
        workspace: Option<CudaSlice<u8>>,
    }

    /// cuDNN convolutions with tensor-core math (bf16 data, f32 accumulation), the algorithm
    /// picked by cuDNN's heuristics once per shape, bias added by our own kernel.
    pub struct CudnnConv {
        inner: Mutex<Inner>,
        dev: CudaDevice,
    }

    // The cuDNN handle is used only under the mutex, on the device's one stream.
    unsafe impl Send for CudnnConv {}
    unsafe impl Sync for CudnnConv {}

    impl CudnnConv {
        /// The algorithm for `key` (picked once) and its workspace, grown to fit.
        fn algorithm(&self, inner: &mut Inner, op: &ConvForward<'_, bf16, f32, bf16>, key: Key) -> Result<(csys::cudnnConvolutionFwdAlgo_t, usize)> {
            let e = |e: cudarc::cudnn::CudnnError| candle_core::Error::Msg(format!("cuDNN: {e:?}"));
            let (algo, ws_size) = match inner.algos.get(&key) {
                Some(v) => *v,
                None => {
                    // The heuristic's first choice, unless its workspace exceeds the cap (the
                    // workspace is kept between calls): then implicit precomputed GEMM, which runs
                    // on tensor cores with a small workspace.
                    let mut algo = op.pick_algorithm().map_err(e)?;
                    let mut ws = op.get_workspace_size(algo).map_err(e)?;
                    if ws > MAX_WORKSPACE {
                        algo = csys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
                        ws = op.get_workspace_size(algo).map_err(e)?;
                    }
                    inner.algos.insert(key, (algo, ws));
                    (algo, ws)
                }
            };
            if ws_size > 0 && inner.workspace.as_ref().map(|w| w.len()).unwrap_or(0) < ws_size {
                inner.workspace = None;
                inner.workspace = Some(self.dev.alloc_zeros::<u8>(ws_size)?);
            }
            Ok((algo, ws_size))
        }

        /// cuDNN's convolution of x by w into a new buffer: NCHW x, KCRS w and NCHW out, or with
        /// `channels_last` NHWC x, KRSC w and NHWC out (both operands contiguous in that order).
        /// dims: (b, c, h, w, k, r, s).
        fn convolve(&self, x: &Tensor, w: &Tensor, dims: [usize; 7], padding: usize, stride: usize, channels_last: bool) -> Result<CudaSlice<bf16>> {
            let e = |e: cudarc::cudnn::CudnnError| candle_core::Error::Msg(format!("cuDNN: {e:?}"));
            let [b, c, h, wd, k, r, s] = dims;
            let (oh, ow) = out_hw(h, wd, r, s, padding, stride);
            self.dev.cuda_stream().context().bind_to_thread().w()?;
            let mut guard = self.inner.lock().expect("cudnn state poisoned");
            let inner = &mut *guard;
            let i = |v: usize| v as i32;
            let mut conv = inner
                .cudnn
                .create_conv2d::<f32>([i(padding); 2], [i(stride); 2], [1, 1], csys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
                .map_err(e)?;
            conv.set_math_type(csys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH).map_err(e)?;
            let format = if channels_last { csys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC } else { csys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW };
            let xd = inner.cudnn.create_4d_tensor::<bf16>(format, [i(b), i(c), i(h), i(wd)]).map_err(e)?;
            let wdesc = inner.cudnn.create_4d_filter::<bf16>(format, [i(k), i(c), i(r), i(s)]).map_err(e)?;
            let yd = inner.cudnn.create_4d_tensor::<bf16>(format, [i(b), i(k), i(oh), i(ow)]).map_err(e)?;
            let op = ConvForward { conv: &conv, x: &xd, w: &wdesc, y: &yd };
            let (algo, ws_size) = self.algorithm(inner, &op, [b, c, h, wd, k, r, s, padding, stride, channels_last as usize])?;
            let mut y = unsafe { self.dev.alloc::<bf16>(b * k * oh * ow)? };
            with_slice::<bf16, _>(x, |xs| {
                with_slice::<bf16, _>(w, |wsl| {
                    let ws = if ws_size > 0 { inner.workspace.as_mut() } else { None };
                    unsafe { op.launch(algo, ws, (bf16::ONE, bf16::ZERO), &xs, &wsl, &mut y) }.map_err(e)?;
                    Ok(())
                })
            })?;
            Ok(y)
        }

        /// `conv2d_add` of a channels-last x (see `is_channels_last`): cuDNN reads and writes NHWC
        /// (w read as KRSC), so it converts neither; the output is channels-last too, and so must
        /// the residual be (it is converted otherwise). An output channel count that is not a
        /// multiple of 8 (the VAE's 3-channel `conv_out`) is computed as the next multiple with
        /// zero filters (tensor cores need it) and narrowed: the result is then a strided view.
        fn conv2d_add_nhwc(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
            let (b, c, h, wd) = x.dims4()?;
            let (k_out, _, r, s) = w.dims4()?;
            let k = k_out.next_multiple_of(8);
            if k != k_out && residual.is_some() {
                bail!("cudnn conv2d: a residual needs a multiple of 8 output channels in channels-last, got {k_out}");
            }
            let (oh, ow) = out_hw(h, wd, r, s, padding, stride);
            let xl = x.permute((0, 2, 3, 1))?; // contiguous (B, H, W, C)
            let mut wl = w.permute((0, 2, 3, 1))?.contiguous()?; // (K, R, S, C); no copy for the VAE's weights
            let padded_bias;
            let mut bias = bias;
            if k != k_out {
                wl = Tensor::cat(&[&wl, &Tensor::zeros((k - k_out, r, s, c), wl.dtype(), wl.device())?], 0)?;
                if let Some(bt) = bias {
                    padded_bias = Tensor::cat(&[&bt.to_dtype(DType::F32)?, &Tensor::zeros(k - k_out, DType::F32, bt.device())?], 0)?;
                    bias = Some(&padded_bias);
                }
            }
            let mut y = self.convolve(&xl, &wl, [b, c, h, wd, k, r, s], padding, stride, true)?;
            let n = b * oh * ow * k;
            let residual = match residual {
                Some(rt) if rt.dims() != [b, k, oh, ow] || rt.dtype() != DType::BF16 => {
                    bail!("cudnn conv2d: residual {:?} {:?} for an output {:?}", rt.dims(), rt.dtype(), [b, k, oh, ow])
                }
                Some(rt) if is_channels_last(rt) => Some(rt.permute((0, 2, 3, 1))?),
                Some(rt) => Some(rt.permute((0, 2, 3, 1))?.contiguous()?),
                None => None,
            };
            let mut residual_added = false;
            if let Some(bias) = bias {
                let bias = bias.to_dtype(DType::F32)?.contiguous()?;
                let vec8 = k % 8 == 0 && n / 8 <= u32::MAX as usize && residual.as_ref().is_none_or(|r| starts_aligned(r, 16));
                with_slice::<f32, _>(&bias, |bs| {
                    let null = 0u64;
                    let name = if vec8 { "zimage_add_channel_bias_nhwc_v8_bf16" } else { "zimage_add_channel_bias_nhwc_bf16" };
                    let f = self.dev.get_or_load_custom_func(name, MODULE, PTX)?;
                    let launch = |res: Option<&cudarc::driver::CudaView<'_, bf16>>, y: &mut CudaSlice<bf16>| -> Result<()> {
                        let mut bld = f.builder();
                        bld.arg(y);
                        bld.arg(&bs);
                        let (n_vecs, c_vecs, n64, k32) = ((n / 8) as u32, (k / 8) as u32, n as u64, k as u32);
                        if vec8 {
                            bld.arg(&n_vecs);
                            bld.arg(&c_vecs);
                        } else {
                            bld.arg(&n64);
                            bld.arg(&k32);
                        }
                        match res {
                            Some(r) => bld.arg(r),
                            None => bld.arg(&null),
                        };
                        let items = if vec8 { n / 8 } else { n };
                        unsafe { bld.launch(launch_cfg(grid_for(items))) }.w()?;
                        Ok(())
                    };
                    match &residual {
                        Some(r) => with_slice::<bf16, _>(r, |rs| launch(Some(&rs), &mut y))?,
                        None => launch(None, &mut y)?,
                    }
                    Ok(())
                })?;
                residual_added = residual.is_some();
            }
            let mut y = wrap(y, &self.dev, &[b, oh, ow, k]);
            if let (Some(r), false) = (&residual, residual_added) {
                y = (y + r)?;
            }
            if k != k_out {
                y = y.narrow(3, 0, k_out)?;
            }
            y.permute((0, 3, 1, 2))
        }

        pub fn new(dev: &CudaDevice) -> Result<Self> {
            let stream = dev.cuda_stream();
            stream.context().bind_to_thread().w()?;
            let cudnn = Cudnn::new(stream).map_err(|e| candle_core::Error::Msg(format!("cuDNN: {e:?}")))?;
            Ok(Self { inner: Mutex::new(Inner { cudnn, algos: HashMap::new(), workspace: None }), dev: dev.clone() })
        }

        /// x (B, C, H, W) bf16, w (K, C, R, S) bf16, bias (K) -> (B, K, H', W') bf16.
        pub fn conv2d(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
            self.conv2d_add(x, w, bias, None, padding, stride)
        }

        /// `conv2d(..) + residual` (residual of the output's shape), the add done by the bias pass
        /// where it can (bias given, H*W % 8 == 0), else by a separate add.
        pub fn conv2d_add(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
            let (b, c, h, wd) = x.dims4()?;
            let (k, c2, r, s) = w.dims4()?;
            if c != c2 || x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
                bail!("cudnn conv2d: x {:?} {:?}, w {:?} {:?}", x.dims(), x.dtype(), w.dims(), w.dtype());
            }
            let (oh, ow) = out_hw(h, wd, r, s, padding, stride);
            // channels-last where the input channels suit tensor cores (8 bf16 = 16 bytes); the
            // 3-channel output convolution pads its filters to 8
            if is_channels_last(x) && c % 8 == 0 && (k % 8 == 0 || residual.is_none()) {
                return self.conv2d_add_nhwc(x, w, bias, residual, padding, stride);
            }
            let (x, w) = (x.contiguous()?, w.contiguous()?);
            let mut y = self.convolve(&x, &w, [b, c, h, wd, k, r, s], padding, stride, false)?;
            let out_dims = [b, k, oh, ow];
            let residual = match residual {
                Some(r) if r.dims() != out_dims || r.dtype() != DType::BF16 => {
                    bail!("cudnn conv2d: residual {:?} {:?} for an output {out_dims:?}", r.dims(), r.dtype())
                }
                Some(r) => Some(r.contiguous()?),
                None => None,
            };
            let mut residual_added = false;
            if let Some(bias) = bias {
                let bias = bias.to_dtype(DType::F32)?.contiguous()?;
                let n = (b * k * oh * ow) as u64;
                let hw = (oh * ow) as u64;
                let k32 = k as u32;
                let fold = residual.as_ref().is_none_or(|r| starts_aligned(r, 16));
                with_slice::<f32, _>(&bias, |bs| {
                    if hw % 8 == 0 && n / 8 <= u32::MAX as u64 && fold {
                        let (n_vecs, hw_vecs) = ((n / 8) as u32, (hw / 8) as u32);
                        let f = self.dev.get_or_load_custom_func("zimage_add_channel_bias_v8_bf16", MODULE, PTX)?;
                        let launch = |res: Option<&cudarc::driver::CudaView<'_, bf16>>, y: &mut CudaSlice<bf16>| -> Result<()> {
                            let null = 0u64;
                            let mut bld = f.builder();
                            bld.arg(y);
                            bld.arg(&bs);
                            bld.arg(&n_vecs);
                            bld.arg(&hw_vecs);
                            bld.arg(&k32);
                            match res {
                                Some(r) => bld.arg(r),
                                None => bld.arg(&null),
                            };
                            unsafe { bld.launch(launch_cfg(grid_for(n_vecs as usize))) }.w()?;
                            Ok(())
                        };
                        match &residual {
                            Some(r) => with_slice::<bf16, _>(r, |rs| launch(Some(&rs), &mut y))?,
                            None => launch(None, &mut y)?,
                        }
                        residual_added = residual.is_some();
                        return Ok(());
                    }
                    let f = self.dev.get_or_load_custom_func("zimage_add_channel_bias_bf16", MODULE, PTX)?;
                    let mut bld = f.builder();
                    bld.arg(&mut y);
                    bld.arg(&bs);
                    bld.arg(&n);
                    bld.arg(&hw);
                    bld.arg(&k32);
                    unsafe { bld.launch(launch_cfg(grid_for(n as usize))) }.w()?;
                    Ok(())
                })?;
            }
            let y = wrap(y, &self.dev, &out_dims);
            match residual {
                Some(r) if !residual_added => y + r,
                _ => Ok(y),
            }
        }
    }
}

/// x + rms_norm(y) * w for (.., dim) bf16 tensors of one shape, w (dim): one pass.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    add_rms_norm_scaled(x, y, w, eps, None)
}

/// `add_rms_norm` of y's rows multiplied by `row_factor` ((rows,) f32) first, in the same pass
/// (y an FP8 product left in units of its input's row scales).
pub fn add_rms_norm_scaled(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32, row_factor: Option<&Tensor>) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let dim = *x.dims().last().unwrap_or(&0);
    if x.dims() != y.dims() || x.dtype() != DType::BF16 || y.dtype() != DType::BF16 || w.dims() != [dim] {
        bail!("add_rms_norm: x {:?}, y {:?}, w {:?}", x.dims(), y.dims(), w.dims());
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let rows = x.elem_count() / dim;
    let row_factor = match row_factor {
        Some(f) if f.elem_count() != rows || f.dtype() != DType::F32 => bail!("add_rms_norm: row factors {:?} for {rows} rows", f.dims()),
        Some(f) => Some(f.contiguous()?),
        None => None,
    };
    if row_factor.is_some() && !(dim % 8 == 0 && starts_aligned(&x, 16) && starts_aligned(&y, 16)) {
        // the scalar kernel takes no factors: apply them first
        let f = row_factor.as_ref().expect("checked above").reshape((rows, 1))?;
        let y = y.reshape((rows, dim))?.to_dtype(DType::F32)?.broadcast_mul(&f)?.to_dtype(DType::BF16)?.reshape(x.dims())?;
        return add_rms_norm_scaled(&x, &y, w, eps, None);
    }
    if dim % 8 == 0 && starts_aligned(&x, 16) && starts_aligned(&y, 16) {
        let w = w.to_dtype(DType::BF16)?.contiguous()?;
        let factor_ptr = f32_ptr_or_null(row_factor.as_ref(), &dev)?;
        if starts_aligned(&w, 16) {
            let mut out = unsafe { dev.alloc::<bf16>(x.elem_count())? };
            let dim32 = dim as u32;
            with_slice::<bf16, _>(&x, |xs| {
                with_slice::<bf16, _>(&y, |ys| {
                    with_slice::<bf16, _>(&w, |ws| {
                        let f = dev.get_or_load_custom_func("zimage_add_rms_norm_v8_bf16", MODULE, PTX)?;
                        let mut bld = f.builder();
                        bld.arg(&xs);
                        bld.arg(&ys);
                        bld.arg(&ws);
                        bld.arg(&mut out);
                        bld.arg(&dim32);
                        bld.arg(&eps);
                        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(dim / 8), 1, 1), shared_mem_bytes: 0 };
                        bld.arg(&factor_ptr);
                        unsafe { bld.launch(cfg) }.w()?;
                        Ok(())
                    })
                })
            })?;
            return Ok(wrap(out, &dev, x.dims()));
        }
    }
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count())? };
    let dim32 = dim as u32;
    with_slice::<bf16, _>(&x, |xs| {
        with_slice::<bf16, _>(&y, |ys| {
            with_slice::<f32, _>(&w, |ws| {
                let f = dev.get_or_load_custom_func("zimage_add_rms_norm_bf16", MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xs);
                bld.arg(&ys);
                bld.arg(&ws);
                bld.arg(&mut out);
                bld.arg(&dim32);
                bld.arg(&eps);
                unsafe { bld.launch(launch_cfg(rows as u32)) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(wrap(out, &dev, x.dims()))
}

/// (free, total) device memory, MiB (whole device).
fn memory_mib(dev: &CudaDevice) -> Result<(f64, f64)> {
    let (free, total) = dev.cuda_stream().context().mem_get_info().w()?;
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    Ok((mib(free), mib(total)))
}

/// The device's memory (whole device, MiB).
pub fn memory_total_mib(dev: &CudaDevice) -> Result<f64> {
    Ok(memory_mib(dev)?.1)
}

/// softmax(x * scale) over the last dim of a bf16 tensor (last dim % 8 == 0), in f32 and written
/// in bf16, one pass of each row; None when the shape or alignment does not suit the kernel.
pub fn softmax_scaled_rows(x: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    let dev = cuda_device(x)?;
    let cols = *x.dims().last().unwrap_or(&0);
    if x.dtype() != DType::BF16 || cols == 0 || cols % 8 != 0 || x.elem_count() / cols > i32::MAX as usize {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if !starts_aligned(&x, 16) {
        return Ok(None);
    }
    let rows = x.elem_count() / cols;
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count())? };
    let row_vecs = (cols / 8) as u32;
    with_slice::<bf16, _>(&x, |xs| {
        let f = dev.get_or_load_custom_func("zimage_softmax_scaled_rows_bf16", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        b.arg(&mut out);
        b.arg(&row_vecs);
        b.arg(&scale);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(cols / 8), 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok(Some(wrap(out, &dev, x.dims())))
}

/// Free device memory (MiB).
pub fn memory_free_mib(dev: &CudaDevice) -> Result<f64> {
    Ok(memory_mib(dev)?.0)
}

/// Device memory in use (total - free, whole device, MiB), for reports.
pub fn memory_used_mib(dev: &CudaDevice) -> Result<f64> {
    let (free, total) = memory_mib(dev)?;
    Ok(total - free)
}

/// The weight pools made so far, one per device (by ordinal; the handles kept for the process
/// like the driver's own default pool).
static WEIGHT_POOLS: Mutex<Vec<(i32, usize)>> = Mutex::new(Vec::new());

/// The device's weight pool, if a load has made it.
fn existing_weight_pool(cu_device: i32) -> Option<cudarc::driver::sys::CUmemoryPool> {
    let pools = WEIGHT_POOLS.lock().unwrap_or_else(|e| e.into_inner());
    pools.iter().find(|(d, _)| *d == cu_device).map(|(_, p)| *p as cudarc::driver::sys::CUmemoryPool)
}

/// The memory pool lasting weights are allocated from on one device, made on first use.
fn weight_pool(cu_device: i32) -> Result<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys as drv;
    let mut pools = WEIGHT_POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(d, _)| *d == cu_device) {
        return Ok(*p as drv::CUmemoryPool);
    }
    // SAFETY: a zeroed props struct is valid (no handle types, no size limit); the three fields set
    // are the ones every driver version reads.
    let pool = unsafe {
        let mut props: drv::CUmemPoolProps = std::mem::zeroed();
        props.allocType = drv::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = drv::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = drv::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = cu_device;
        let mut pool: drv::CUmemoryPool = std::ptr::null_mut();
        drv::cuMemPoolCreate(&mut pool, &props).result().w()?;
        pool
    };
    pools.push((cu_device, pool as usize));
    Ok(pool)
}

/// The device's default (stream-ordered) pool: the one candle's allocations come from.
fn default_pool(cu_device: i32) -> Result<cudarc::driver::sys::CUmemoryPool> {
    let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver query on a valid device.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device).result().w()? };
    Ok(pool)
}

/// Runs `f` with the device's stream-ordered allocations coming from its weight pool instead of
/// the default pool, then makes the default pool current again. What `f` allocates and keeps
/// stays packed in that pool; a load's temporaries (parts before fusing, dense weights before
/// quantizing) come and go from the default pool, which then has nothing left to hold.
pub fn with_weight_pool<R>(dev: &CudaDevice, f: impl FnOnce() -> Result<R>) -> Result<R> {
    use cudarc::driver::sys as drv;
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return f();
    }
    ctx.bind_to_thread().w()?;
    let cu_device = ctx.cu_device();
    let pool = weight_pool(cu_device)?;
    // SAFETY: plain driver calls on a valid device and pools of that device.
    unsafe { drv::cuDeviceSetMemPool(cu_device, pool).result().w()? };
    let out = f();
    let restored = default_pool(cu_device).and_then(|d| unsafe { drv::cuDeviceSetMemPool(cu_device, d).result().w() });
    let out = out?;
    restored?;
    Ok(out)
}

/// One u64 attribute of a memory pool, in MiB.
fn pool_attr_mib(pool: cudarc::driver::sys::CUmemoryPool, attr: cudarc::driver::sys::CUmemPool_attribute) -> Result<f64> {
    let mut v: u64 = 0;
    // SAFETY: the attribute is one u64 of a valid pool.
    unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void).result().w()? };
    Ok(v as f64 / (1024.0 * 1024.0))
}

/// One u64 graph-memory attribute of a device, in MiB.
fn graph_attr_mib(cu_device: i32, attr: cudarc::driver::sys::CUgraphMem_attribute) -> Result<f64> {
    let mut v: u64 = 0;
    // SAFETY: the attribute is one u64 of a valid device.
    unsafe { cudarc::driver::sys::cuDeviceGetGraphMemAttribute(cu_device, attr, &mut v as *mut u64 as *mut std::ffi::c_void).result().w()? };
    Ok(v as f64 / (1024.0 * 1024.0))
}

/// Where the device memory in use goes: the stream-ordered pool candle allocates tensors from
/// (`cuMemAllocAsync` on the device's default pool), the weight pool (`with_weight_pool`), the
/// memory CUDA graphs hold for their intermediates, and the rest (context, kernel modules,
/// library handles and workspaces). A driver without memory pools reports only what is in use.
pub fn memory_breakdown(dev: &CudaDevice) -> Result<crate::device::MemoryBreakdown> {
    use cudarc::driver::sys::{CUgraphMem_attribute as G, CUmemPool_attribute as P};
    let used = memory_used_mib(dev)?;
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(crate::device::MemoryBreakdown { used_mib: used, other_mib: used, ..Default::default() });
    }
    ctx.bind_to_thread().w()?;
    let cu_device = ctx.cu_device();
    let pool = default_pool(cu_device)?;
    let (weight_pool_reserved_mib, weight_pool_used_mib) = match existing_weight_pool(cu_device) {
        Some(w) => (pool_attr_mib(w, P::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?, pool_attr_mib(w, P::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?),
        None => (0.0, 0.0),
    };
    let pool_reserved_mib = pool_attr_mib(pool, P::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
    let graph_reserved_mib = graph_attr_mib(cu_device, G::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT)?;
    Ok(crate::device::MemoryBreakdown {
        used_mib: used,
        pool_reserved_mib,
        pool_used_mib: pool_attr_mib(pool, P::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        pool_reserved_high_mib: pool_attr_mib(pool, P::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        pool_used_high_mib: pool_attr_mib(pool, P::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        graph_reserved_mib,
        graph_used_mib: graph_attr_mib(cu_device, G::CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT)?,
        graph_reserved_high_mib: graph_attr_mib(cu_device, G::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH)?,
        weight_pool_reserved_mib,
        weight_pool_used_mib,
        other_mib: used - pool_reserved_mib - graph_reserved_mib - weight_pool_reserved_mib,
    })
}

/// Starts the default pool's and the graphs' high-water marks again from their current values.
pub fn reset_memory_highs(dev: &CudaDevice) -> Result<()> {
    use cudarc::driver::sys::{self as drv, CUgraphMem_attribute as G, CUmemPool_attribute as P};
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    ctx.bind_to_thread().w()?;
    let cu_device = ctx.cu_device();
    let pool = default_pool(cu_device)?;
    // SAFETY: the driver accepts only 0 for these attributes (reset to the current value).
    unsafe {
        for a in [P::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, P::CU_MEMPOOL_ATTR_USED_MEM_HIGH] {
            let mut zero: u64 = 0;
            drv::cuMemPoolSetAttribute(pool, a, &mut zero as *mut u64 as *mut std::ffi::c_void).result().w()?;
        }
        for a in [G::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH, G::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH] {
            let mut zero: u64 = 0;
            drv::cuDeviceSetGraphMemAttribute(cu_device, a, &mut zero as *mut u64 as *mut std::ffi::c_void).result().w()?;
        }
    }
    Ok(())
}

/// Has the driver compile (JIT) every kernel module the engine loads from PTX, candle's and ours,
/// one thread per module, and drops the results. The driver keeps compiled modules in its disk
/// cache (`CUDA_CACHE_PATH`, `~/.nv/ComputeCache` by default; `CUDA_CACHE_MAXSIZE` must hold them,
/// `zimage` raises it to the 4 GiB maximum when unset), so the modules candle loads lazily later
/// come from the cache: on a new machine the compile costs the slowest module instead of the sum,
/// and it overlaps model loading; on a machine that ran before, it costs nothing. (candle loads
/// its kernels only as PTX, so they cannot be shipped as machine code without patching it.)
pub fn precompile_kernels(dev: &CudaDevice) -> Result<std::time::Duration> {
    use candle_core::cuda_backend::kernels as k;
    let start = std::time::Instant::now();
    let ctx = dev.cuda_stream().context().clone();
    // Every module but the quantized-matmul one (GGUF kernels, 5.8 MB of PTX, never used here).
    let modules: [(&str, &'static str); 11] = [
        ("affine", k::AFFINE.ptx()),
        ("binary", k::BINARY.ptx()),
        ("cast", k::CAST.ptx()),
        ("conv", k::CONV.ptx()),
        ("fill", k::FILL.ptx()),
        ("indexing", k::INDEXING.ptx()),
        ("reduce", k::REDUCE.ptx()),
        ("sort", k::SORT.ptx()),
        ("ternary", k::TERNARY.ptx()),
        ("unary", k::UNARY.ptx()),
        (MODULE, PTX),
    ];
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = modules
            .iter()
            .map(|(name, ptx)| {
                let ctx = ctx.clone();
                s.spawn(move || ctx.load_module(cudarc::nvrtc::Ptx::from_src(*ptx)).map(drop).map_err(|e| format!("{name}: {e:?}")))
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().unwrap_or_else(|_| Err("a compile thread panicked".into())).err()).collect()
    });
    if !failures.is_empty() {
        bail!("compiling CUDA kernels: {}", failures.join("; "));
    }
    Ok(start.elapsed())
}

/// The q and k heads of a fused (B, L, H + 2 KV, 128) bf16 qkv product (or a view with evenly
/// spaced tokens), per-head RMSNorm + RoPE as `qk_norm_rope`, written as E4M3 for FlashAttention-3's
/// FP8 forward with one static scale per tensor (see the kernel: no value can saturate). Returns
/// (q (B, L, H, 128), k (B, L, KV, 128), descale_q [1], descale_k [1]); None when the layout does
/// not suit the kernel (the caller runs bf16 attention). The fifth tensor is max |v| over the v
/// heads ([1] u32, the f32's bits), taken by the same launch: `quantize_e4m3_heads`'s `amax`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn qk_norm_rope_e4m3(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    weight_q: &Tensor,
    weight_k: &Tensor,
    eps: f32,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor, Tensor, Tensor)>> {
    let dev = cuda_device(qkv)?;
    let (b, l, _, d) = qkv.dims4()?;
    let Some(ts) = token_stride(qkv) else { return Ok(None) };
    if qkv.dtype() != DType::BF16 || d != 128 || ts % 4 != 0 || !starts_aligned(qkv, 8) || cos.dims() != [l, 64] {
        return Ok(None);
    }
    let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
    let (wq, wk) = (weight_q.to_dtype(DType::BF16)?.contiguous()?, weight_k.to_dtype(DType::BF16)?.contiguous()?);
    if !(starts_aligned(&cos, 8) && starts_aligned(&sin, 8) && starts_aligned(&wq, 8) && starts_aligned(&wk, 8)) {
        return Ok(None);
    }
    let tokens = b * l;
    let mut q8 = unsafe { dev.alloc::<F8E4M3>(tokens * heads * 128)? };
    let mut k8 = unsafe { dev.alloc::<F8E4M3>(tokens * kv_heads * 128)? };
    let mut descale_q = unsafe { dev.alloc::<f32>(1)? };
    let mut descale_k = unsafe { dev.alloc::<f32>(1)? };
    let mut v_amax = dev.alloc_zeros::<u32>(1)?;
    let (tokens32, l32, h32, kv32, ts64) = (tokens as u32, l as u32, heads as u32, kv_heads as u32, ts as u64);
    let held = strided_view(qkv);
    let xs = held.slice::<bf16>()?;
    with_slice::<bf16, _>(&wq, |wqs| {
        with_slice::<bf16, _>(&wk, |wks| {
            with_slice::<f32, _>(&cos, |cs| {
                with_slice::<f32, _>(&sin, |ss| {
                    let f = dev.get_or_load_custom_func("zimage_qk_norm_rope_e4m3_d128", MODULE, PTX)?;
                    let mut bld = f.builder();
                    bld.arg(&xs);
                    bld.arg(&wqs);
                    bld.arg(&wks);
                    bld.arg(&cs);
                    bld.arg(&ss);
                    bld.arg(&mut q8);
                    bld.arg(&mut k8);
                    bld.arg(&mut descale_q);
                    bld.arg(&mut descale_k);
                    bld.arg(&mut v_amax);
                    bld.arg(&tokens32);
                    bld.arg(&l32);
                    bld.arg(&h32);
                    bld.arg(&kv32);
                    bld.arg(&ts64);
                    bld.arg(&eps);
                    let rows = tokens32 * (h32 + kv32);
                    unsafe { bld.launch(launch_cfg(rows.div_ceil(QK_ROWS_PER_WARP * (THREADS / 32)))) }.w()?;
                    Ok(())
                })
            })
        })
    })?;
    Ok(Some((
        wrap(q8, &dev, &[b, l, heads, 128]),
        wrap(k8, &dev, &[b, l, kv_heads, 128]),
        wrap(descale_q, &dev, &[1]),
        wrap(descale_k, &dev, &[1]),
        wrap(v_amax, &dev, &[1]),
    )))
}

/// Per-tensor E4M3 quantization of a (B, L, H, D) bf16 tensor whose tokens are evenly spaced (the
/// v heads of a fused qkv product read in place): an amax pass (unless `amax`, [1] u32 holding
/// the f32 bits of max |x|, is given), then a quantize pass writing a contiguous tensor. Returns
/// (q, descale [1]) with real value = q * descale; None when the layout does not suit the 16-byte
/// loads.
pub fn quantize_e4m3_heads(x: &Tensor, amax: Option<&Tensor>) -> Result<Option<(Tensor, Tensor)>> {
    let dev = cuda_device(x)?;
    let (b, l, h, d) = x.dims4()?;
    let Some(ts) = token_stride(x) else { return Ok(None) };
    let row = h * d;
    if x.dtype() != DType::BF16 || row % 8 != 0 || ts % 8 != 0 || !starts_aligned(x, 16) {
        return Ok(None);
    }
    let rows = b * l;
    if amax.is_some_and(|a| a.dtype() != DType::U32 || a.elem_count() != 1) {
        bail!("quantize_e4m3_heads: amax is one u32");
    }
    let mut q = unsafe { dev.alloc::<F8E4M3>(rows * row)? };
    let mut descale = unsafe { dev.alloc::<f32>(1)? };
    let (rows32, vecs32, ts64) = (rows as u32, (row / 8) as u32, ts as u64);
    let held = strided_view(&x);
    let xs = held.slice::<bf16>()?;
    let blocks = grid_for(rows * row / 8);
    let quantize = |amax: cudarc::driver::CudaView<'_, u32>, q: &mut CudaSlice<F8E4M3>, descale: &mut CudaSlice<f32>| -> Result<()> {
        let f = dev.get_or_load_custom_func("zimage_quantize_e4m3_rows_strided_bf16", MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xs);
        bld.arg(&rows32);
        bld.arg(&vecs32);
        bld.arg(&ts64);
        bld.arg(&amax);
        bld.arg(q);
        bld.arg(descale);
        unsafe { bld.launch(launch_cfg(blocks)) }.w()?;
        Ok(())
    };
    match amax {
        Some(a) => with_slice::<u32, _>(a, |a| quantize(a, &mut q, &mut descale))?,
        None => {
            let amax = dev.alloc_zeros::<u32>(1)?;
            let f = dev.get_or_load_custom_func("zimage_amax_rows_strided_bf16", MODULE, PTX)?;
            let mut bld = f.builder();
            bld.arg(&xs);
            bld.arg(&rows32);
            bld.arg(&vecs32);
            bld.arg(&ts64);
            bld.arg(&amax);
            unsafe { bld.launch(launch_cfg(blocks)) }.w()?;
            quantize(amax.slice(..), &mut q, &mut descale)?;
        }
    }
    Ok(Some((wrap(q, &dev, &[b, l, h, d]), wrap(descale, &dev, &[1]))))
}
