//! CUDA graphs for fixed-shape calls: a function of device tensors (one denoiser step, one text
//! encoding) is run once eagerly, then captured once into a CUDA graph over static copies of its
//! inputs, and replayed: one launch instead of hundreds, no host work between kernels.
//!
//! A `GraphCache` keeps a few captures per key (the shapes). Where graphs do not apply (CPU, a
//! build without `cuda`, graphs turned off, or a capture that failed) it runs the function itself,
//! so callers have one code path. Replays compute exactly what the eager call computes: the same
//! kernels with the same arguments (`zimage bench --check` compares them).
//!
//! What a captured function must not do: read tensors back to the host, synchronize, upload host
//! data other than the kernel parameters candle caches while capturing, or drop tensors that
//! existed before the call. Every tensor it allocates must be dropped before it returns, except the
//! returned output (copied into the capture's static output).

use std::sync::Mutex;

use candle_core::{Result, Tensor};

/// How many captures a cache keeps (least recently used goes first): each holds its
/// intermediates' device memory.
pub const DEFAULT_CAPACITY: usize = 3;

/// Whether CUDA graphs are used (`ZIMAGE_CUDA_GRAPHS=0` turns them off, for comparisons).
pub fn enabled_by_env() -> bool {
    !matches!(std::env::var("ZIMAGE_CUDA_GRAPHS").as_deref(), Ok("0") | Ok("off") | Ok("false"))
}

/// Returns the device memory that captured graphs hold for their intermediates while none of them
/// runs (CUDA keeps it mapped between launches) to the device, so that work outside the graphs
/// (the VAE decode after the denoising loop) can use it; the next replay maps it again.
pub fn trim_graph_memory(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        let cu_device = dev.cuda_stream().context().cu_device();
        // SAFETY: a plain driver call on a valid device; memory of running graphs is kept.
        let _ = unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDeviceGraphMemTrim(cu_device) };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Captured calls keyed by `K` (whatever fixes the shapes).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GraphCache<K> {
    entries: Mutex<Vec<(K, Entry)>>,
    capacity: usize,
    enabled: bool,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Entry {
    #[cfg(feature = "cuda")]
    Captured(cuda::Captured),
    /// The capture failed for this key: run eagerly, do not try again.
    Eager,
}

impl<K: PartialEq + Clone + std::fmt::Debug> GraphCache<K> {
    pub fn new(enabled: bool, capacity: usize) -> Self {
        Self { entries: Mutex::new(Vec::new()), capacity: capacity.max(1), enabled }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Keys that hold a working capture, most recently used last.
    pub fn captured_keys(&self) -> Vec<K> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Eager))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// `f(inputs)`, through a CUDA graph where possible. `constants` are tensors `f` reads besides
    /// its inputs that must outlive a capture (they are kept with it). The output is a fresh
    /// tensor the caller owns.
    pub fn run(
        &self,
        key: &K,
        inputs: &[&Tensor],
        constants: &[Tensor],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let on_cuda = inputs.first().map(|t| t.device().is_cuda()).unwrap_or(false);
        if !self.enabled || !on_cuda {
            let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
            return f(&owned);
        }
        #[cfg(feature = "cuda")]
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pos) = entries.iter().position(|(k, _)| k == key) {
                let entry = entries.remove(pos);
                let out = match &entry.1 {
                    Entry::Captured(c) => c.replay(inputs),
                    Entry::Eager => {
                        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
                        f(&owned)
                    }
                };
                entries.push(entry); // most recently used last
                return out;
            }
            let (entry, out) = match cuda::Captured::capture(inputs, constants, f) {
                Ok((captured, out)) => (Entry::Captured(captured), out),
                Err(cuda::CaptureError::Eager(e)) => return Err(e),
                Err(cuda::CaptureError::Capture { output, reason }) => {
                    eprintln!("warning: CUDA graph capture failed for {key:?} ({reason}); running it without a graph");
                    (Entry::Eager, output)
                }
            };
            if entries.len() >= self.capacity {
                entries.remove(0);
            }
            entries.push((key.clone(), entry));
            Ok(out)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (key, constants);
            let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
            f(&owned)
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Device, Result, Tensor};

    /// One capture: the graph, the static input buffers it reads, the static output it writes.
    pub struct Captured {
        graph: CudaGraph,
        inputs: Vec<Tensor>,
        output: Tensor,
        _constants: Vec<Tensor>,
    }

    // The graph is launched only under the cache's mutex.
    unsafe impl Send for Captured {}
    unsafe impl Sync for Captured {}

    pub enum CaptureError {
        /// The eager run itself failed: a real error for the caller.
        Eager(candle_core::Error),
        /// The eager run worked (its output is here) but capturing did not.
        Capture { output: Tensor, reason: String },
    }

    fn static_copy(t: &Tensor) -> Result<Tensor> {
        let s = Tensor::zeros(t.shape(), t.dtype(), t.device())?;
        s.slice_set(&t.contiguous()?, 0, 0)?;
        Ok(s)
    }

    impl Captured {
        /// Runs `f` eagerly on static copies of `inputs` (which also fills candle's kernel-parameter
        /// cache and our cuBLASLt plans), then captures `f` over the same buffers. Returns the
        /// capture and the eager output.
        pub fn capture(
            inputs: &[&Tensor],
            constants: &[Tensor],
            f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        ) -> std::result::Result<(Self, Tensor), CaptureError> {
            let Device::Cuda(dev) = inputs[0].device() else {
                return Err(CaptureError::Eager(candle_core::Error::Msg("graph capture needs a CUDA tensor".into())));
            };
            let statics = inputs.iter().map(|t| static_copy(t)).collect::<Result<Vec<_>>>().map_err(CaptureError::Eager)?;
            let _cache = dev.enable_cuda_graph_htod_cache();
            let output = f(&statics).map_err(CaptureError::Eager)?;
            let fail = |output: Tensor, reason: String| CaptureError::Capture { output, reason };
            let captured_out = match static_copy(&output) {
                Ok(t) => t,
                Err(e) => return Err(fail(output, e.to_string())),
            };
            let stream = dev.cuda_stream();
            if let Err(e) = stream.synchronize().w() {
                return Err(fail(output, e.to_string()));
            }
            if let Err(e) = stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w() {
                return Err(fail(output, format!("begin capture: {e}")));
            }
            // Everything `f` allocates is freed before the capture ends (its frees are captured
            // too), except what is copied into the static output.
            let recorded = f(&statics).and_then(|out| captured_out.slice_set(&out.contiguous()?, 0, 0));
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
            match (recorded, graph) {
                (Ok(()), Ok(Some(graph))) => {
                    if let Err(e) = graph.upload().w() {
                        return Err(fail(output, format!("graph upload: {e}")));
                    }
                    Ok((Self { graph, inputs: statics, output: captured_out, _constants: constants.to_vec() }, output))
                }
                (Err(e), _) => Err(fail(output, e.to_string())),
                (Ok(()), Ok(None)) => Err(fail(output, "empty graph".into())),
                (Ok(()), Err(e)) => Err(fail(output, format!("end capture: {e}"))),
            }
        }

        /// Copies `inputs` into the static buffers, launches the graph, returns a copy of its output.
        pub fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
            if inputs.len() != self.inputs.len() {
                candle_core::bail!("graph replay with {} inputs, captured with {}", inputs.len(), self.inputs.len());
            }
            for (s, x) in self.inputs.iter().zip(inputs) {
                if s.dims() != x.dims() || s.dtype() != x.dtype() {
                    candle_core::bail!("graph replay input {:?} {:?}, captured {:?} {:?}", x.dims(), x.dtype(), s.dims(), s.dtype());
                }
                s.slice_set(&x.contiguous()?, 0, 0)?;
            }
            self.graph.launch().w()?;
            self.output.copy()
        }
    }
}
