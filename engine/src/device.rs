//! How the model is held on its device: the precision of the transformer's linears, the options
//! a pipeline is loaded with, the compute dtype, device memory, opening a CUDA device. No model
//! code; `pipeline` re-exports these for its callers.

use candle_core::{DType, Device};

use crate::ops::Quantization;
#[cfg(feature = "cuda")]
use crate::error::Result;

/// How to hold the model on its device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Quantize the transformer blocks' linear layers while loading: FP8 E4M3 or INT8 (half their
    /// memory; on CUDA the products run as cuBLASLt FP8 or INT8 matmuls).
    pub quantization: Quantization,
    /// Do not keep the text encoder resident: encode each prompt one layer at a time from the
    /// weights (saves its memory on small cards, costs a read of its weights per request).
    pub free_text_encoder: bool,
    /// Replay denoiser steps (and text encodings) as CUDA graphs on CUDA devices (see `graph`).
    pub cuda_graphs: bool,
    /// With quantization: keep the dense weights of the quantized layers (on the GPU where it
    /// has room for them, see `dense_copy_device`, else in host memory), so that LoRAs merge into
    /// the dense weights and are quantized after (bf16-merge-then-quantize quality) rather than
    /// into the dequantized ones.
    pub keep_dense_for_lora: bool,
}

impl LoadOptions {
    /// Where the quantized layers keep their dense weights for LoRA merges on `device`
    /// (`dense_copy_device`), or `None` when none are kept.
    pub fn dense_copy_on(&self, device: &Device) -> Option<Device> {
        (self.keep_dense_for_lora && self.quantization != Quantization::None).then(|| dense_copy_device(device))
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            quantization: Quantization::None,
            free_text_encoder: false,
            cuda_graphs: crate::graph::enabled_by_env(),
            keep_dense_for_lora: false,
        }
    }
}

/// Precision of the transformer's block linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// FP8 where the GPU runs FP8 matmuls (compute capability 8.9+), else the compute dtype.
    #[default]
    Auto,
    /// FP8 E4M3 (on devices without FP8 matmuls the products are emulated, slowly).
    Fp8,
    /// INT8 weights and activations (W8A8), for GPUs with int8 tensor cores and no FP8
    /// (compute capability 8.0-8.7); elsewhere the integer products are computed in f32, slowly.
    Int8,
    /// The compute dtype: bf16 on GPUs, f32 on the CPU.
    Full,
}

impl Precision {
    /// The quantization of the block linears on `device`. `auto` is FP8 on 8.9+ and the compute
    /// dtype elsewhere: INT8 has not been measured on an 8.x card (A100, RTX 30) yet, so it is
    /// asked for by name.
    pub fn quantization_on(self, device: &Device) -> Quantization {
        match self {
            Precision::Auto if fp8_supported(device) => Quantization::Fp8,
            Precision::Auto | Precision::Full => Quantization::None,
            Precision::Fp8 => Quantization::Fp8,
            Precision::Int8 => Quantization::Int8,
        }
    }
    /// Whether the block linears run in FP8 on `device`.
    pub fn fp8_on(self, device: &Device) -> bool {
        self.quantization_on(device) == Quantization::Fp8
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Precision::Auto),
            "fp8" => Ok(Precision::Fp8),
            "int8" => Ok(Precision::Int8),
            "bf16" | "full" => Ok(Precision::Full),
            other => Err(format!("unknown precision `{other}`: use auto, fp8, int8 or bf16")),
        }
    }
}

/// Whether `device` runs FP8 matmuls: CUDA with compute capability 8.9 (Ada) or newer.
pub fn fp8_supported(device: &Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::device_compute_capability(dev).map(|c| c >= (8, 9)).unwrap_or(false),
        _ => false,
    }
}

/// Opens CUDA device `ordinal` for the engine: its own stream, which every thread uses (loading
/// and generating may happen on different threads), and no per-buffer event tracking (one stream
/// needs none; it costs two events per allocation and would break CUDA graph capture).
#[cfg(feature = "cuda")]
pub fn open_cuda(ordinal: usize) -> Result<Device> {
    let dev = candle_core::cuda_backend::CudaDevice::new_with_stream(ordinal)?;
    // SAFETY: the engine uses only this device's one stream.
    unsafe { dev.disable_event_tracking() };
    Ok(Device::Cuda(dev))
}

/// Device memory in use (whole device, MiB) where the backend can tell (CUDA), for reports.
pub fn device_memory_used_mib(device: &Device) -> Option<f64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::memory_used_mib(dev).ok(),
        _ => None,
    }
}

/// Free device memory (MiB) where the backend can tell (CUDA).
pub fn device_memory_free_mib(device: &Device) -> Option<f64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::memory_free_mib(dev).ok(),
        _ => None,
    }
}

/// Where the device memory in use goes (MiB, CUDA): tensors come from the stream-ordered pool
/// (reserved: what the pool holds from the device; used: what live tensors take of it), CUDA
/// graphs hold their intermediates' memory, and "other" is the rest (context, kernel modules,
/// cuBLAS/cuDNN handles and workspaces). The high marks count from the last
/// `reset_device_memory_highs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MemoryBreakdown {
    pub used_mib: f64,
    pub pool_reserved_mib: f64,
    pub pool_used_mib: f64,
    pub pool_reserved_high_mib: f64,
    pub pool_used_high_mib: f64,
    pub graph_reserved_mib: f64,
    pub graph_used_mib: f64,
    pub graph_reserved_high_mib: f64,
    /// The pool lasting weights are packed into (`with_weight_pool`).
    pub weight_pool_reserved_mib: f64,
    pub weight_pool_used_mib: f64,
    pub other_mib: f64,
}

/// The breakdown of the device memory in use (CUDA only), for reports.
pub fn device_memory_breakdown(device: &Device) -> Option<MemoryBreakdown> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::memory_breakdown(dev).ok(),
        _ => None,
    }
}

/// Runs `f` with the device's new allocations coming from a pool kept for lasting weights (CUDA;
/// elsewhere just `f`). A load builds each part in the default pool (where its temporaries come
/// and go) and copies what stays into this pool, so the default pool is left empty: holes between
/// lasting tensors there kept 1.1 GiB reserved that no activation could use.
pub fn with_weight_pool<R>(device: &Device, f: impl FnOnce() -> candle_core::Result<R>) -> candle_core::Result<R> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::with_weight_pool(dev, f),
        _ => f(),
    }
}

/// Restarts the high-water marks of `device_memory_breakdown` (CUDA only; a no-op elsewhere).
pub fn reset_device_memory_highs(device: &Device) {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let _ = crate::cuda::reset_memory_highs(dev);
        }
        _ => {}
    }
}

/// Device memory after each stage of a load, split by owner (CUDA only; empty elsewhere), for
/// reports: where a model's memory goes beyond its weights.
#[derive(Debug, Clone, Default)]
pub struct MemoryTrace {
    pub stages: Vec<(String, MemoryBreakdown)>,
}

impl MemoryTrace {
    /// Records the memory once the device has finished its queued work.
    pub fn mark(&mut self, device: &Device, stage: &str) {
        if device.is_cpu() || device.synchronize().is_err() {
            return;
        }
        if let Some(b) = device_memory_breakdown(device) {
            self.stages.push((stage.to_string(), b));
        }
    }
}

/// Where a quantized model keeps its dense weights for LoRA merges: on the GPU when it has 48 GiB
/// or more (room for the 12 GB copy beside the model and a 2048x2048 job; merges then cost no
/// transfer), else in host memory.
pub fn dense_copy_device(device: &Device) -> Device {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => match crate::cuda::memory_total_mib(dev) {
            Ok(total) if total >= 48.0 * 1024.0 => device.clone(),
            _ => Device::Cpu,
        },
        _ => device.clone(),
    }
}

/// The compute dtype for a device: f32 on CPU, bf16 on accelerators.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}
