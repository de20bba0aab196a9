//! FlashAttention-3's FP8 forward (E4M3 q, k, v with one device-side descale each, bf16 out) for
//! Hopper. The stock candle-flash-attn-v3 crate leaves these kernels out of its build; the
//! `flash-attn-v3-fp8` feature links against the copy that scripts/build-zimage.sh patches
//! (scripts/gpu/patches), which compiles them and exports `zimage_run_mha_v3_e4m3`.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Result, Storage, Tensor};
use float8::F8E4M3;
use half::bf16;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn zimage_run_mha_v3_e4m3(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        softmax_lse: *mut c_void,
        tile_count_semaphore: *mut i32,
        descale_q: *const f32,
        descale_k: *const f32,
        descale_v: *const f32,
        q_batch_stride: u32,
        k_batch_stride: u32,
        v_batch_stride: u32,
        o_batch_stride: u32,
        q_row_stride: u32,
        k_row_stride: u32,
        v_row_stride: u32,
        o_row_stride: u32,
        q_head_stride: u32,
        k_head_stride: u32,
        v_head_stride: u32,
        o_head_stride: u32,
        b: u32,
        h: u32,
        h_k: u32,
        softmax_scale: f32,
        seqlen_q: u32,
        seqlen_k: u32,
        stream: *mut c_void,
    );
}

/// Non-causal attention over contiguous E4M3 (B, L, H, 128) q and (B, S, KV, 128) k and v, each
/// dequantized by its descale ([1] f32 on the device: real = stored * descale), softmax scale
/// 1/sqrt(128). Returns (B, L, H, 128) bf16. The kernel rounds the softmax numerators to E4M3 too
/// (scaled by 2^8 so they keep their precision); see `ops::attention_e4m3_composed`.
pub fn flash_attn_e4m3(q: &Tensor, k: &Tensor, v: &Tensor, descale_q: &Tensor, descale_k: &Tensor, descale_v: &Tensor) -> Result<Tensor> {
    let (b, l, h, d) = q.dims4()?;
    let (bk, s, kv, dk) = k.dims4()?;
    if d != 128 || dk != 128 || bk != b || v.dims() != k.dims() || h % kv != 0 {
        bail!("flash_attn_e4m3: q (B, L, H, 128), k and v (B, S, KV, 128) with KV dividing H; got {:?} {:?} {:?}", q.dims(), k.dims(), v.dims());
    }
    for t in [q, k, v] {
        if t.dtype() != DType::F8E4M3 || !t.is_contiguous() {
            bail!("flash_attn_e4m3: contiguous F8E4M3 inputs, got {:?}", t.dtype());
        }
    }
    for t in [descale_q, descale_k, descale_v] {
        if t.dtype() != DType::F32 || t.elem_count() != 1 {
            bail!("flash_attn_e4m3: descales are one f32 each");
        }
    }
    let candle_core::Device::Cuda(dev) = q.device() else { bail!("flash_attn_e4m3: CUDA tensors") };
    let stream = dev.cuda_stream();
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (dqs, dql) = descale_q.storage_and_layout();
    let (dks, dkl) = descale_k.storage_and_layout();
    let (dvs, dvl) = descale_v.storage_and_layout();
    let (Storage::Cuda(qc), Storage::Cuda(kc), Storage::Cuda(vc)) = (&*qs, &*ks, &*vs) else { bail!("flash_attn_e4m3: CUDA tensors") };
    let (Storage::Cuda(dqc), Storage::Cuda(dkc), Storage::Cuda(dvc)) = (&*dqs, &*dks, &*dvs) else { bail!("flash_attn_e4m3: CUDA tensors") };
    let qv = qc.as_cuda_slice::<F8E4M3>()?.slice(ql.start_offset()..);
    let kv_ = kc.as_cuda_slice::<F8E4M3>()?.slice(kl.start_offset()..);
    let vv = vc.as_cuda_slice::<F8E4M3>()?.slice(vl.start_offset()..);
    let dqv = dqc.as_cuda_slice::<f32>()?.slice(dql.start_offset()..);
    let dkv = dkc.as_cuda_slice::<f32>()?.slice(dkl.start_offset()..);
    let dvv = dvc.as_cuda_slice::<f32>()?.slice(dvl.start_offset()..);
    let mut out = unsafe { dev.alloc::<bf16>(b * l * h * d)? };
    // The log-sum-exp rows the epilogue writes (every valid one; nothing reads them here).
    let mut lse = unsafe { dev.alloc::<f32>(b * h * l)? };
    // Zeroed for each launch: the persistent schedulers hand out tiles from it.
    let mut semaphore = dev.alloc_zeros::<i32>(1)?;
    unsafe {
        let (q_ptr, _g1) = qv.device_ptr(&stream);
        let (k_ptr, _g2) = kv_.device_ptr(&stream);
        let (v_ptr, _g3) = vv.device_ptr(&stream);
        let (dq_ptr, _g4) = dqv.device_ptr(&stream);
        let (dk_ptr, _g5) = dkv.device_ptr(&stream);
        let (dv_ptr, _g6) = dvv.device_ptr(&stream);
        let (o_ptr, _g7) = out.device_ptr_mut(&stream);
        let (lse_ptr, _g8) = lse.device_ptr_mut(&stream);
        let (sem_ptr, _g9) = semaphore.device_ptr_mut(&stream);
        let (q_row, kv_row) = ((h * d) as u32, (kv * d) as u32);
        zimage_run_mha_v3_e4m3(
            q_ptr as *const c_void,
            k_ptr as *const c_void,
            v_ptr as *const c_void,
            o_ptr as *mut c_void,
            lse_ptr as *mut c_void,
            sem_ptr as *mut i32,
            dq_ptr as *const f32,
            dk_ptr as *const f32,
            dv_ptr as *const f32,
            q_row * l as u32,
            kv_row * s as u32,
            kv_row * s as u32,
            q_row * l as u32,
            q_row,
            kv_row,
            kv_row,
            q_row,
            d as u32,
            d as u32,
            d as u32,
            d as u32,
            b as u32,
            h as u32,
            kv as u32,
            1.0 / (d as f32).sqrt(),
            l as u32,
            s as u32,
            stream.cu_stream() as *mut c_void,
        );
    }
    drop((qs, ks, vs, dqs, dks, dvs));
    let storage = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(Storage::Cuda(storage), (b, l, h, d), BackpropOp::none(), false))
}
