//! Weight sources for `VarBuilder`: safetensors shards that report EVERY missing or mis-shaped
//! tensor at once (instead of failing on the first), and a deterministic random source that
//! makes the built-in `tiny` model (and records what it made so it can be saved).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};

/// Shared log of problems found while a model is built from checked weights.
#[derive(Default)]
pub struct Problems(Mutex<Vec<String>>);

impl Problems {
    fn push(&self, p: String) {
        self.0.lock().expect("problems lock").push(p);
    }
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("problems lock"))
    }
}

/// Safetensors files behind a check: a missing tensor or a shape mismatch is recorded and a
/// zero-cost broadcast placeholder returned, so construction goes on and names them all.
struct CheckedSafetensors {
    inner: MmapedSafetensors,
    /// Every tensor of the files, already in the builder's dtype on its device (see `preload`);
    /// `get` takes them out, so what the model does not ask for is freed with the builder.
    preloaded: Mutex<std::collections::HashMap<String, Tensor>>,
    /// Lazy builders: a tensor of a numbered block (`layers.7.…`) that is asked for brings the
    /// rest of its block with it, loaded by the same pool of threads, so a caller that walks the
    /// blocks in turn holds about one block and still reads with every core.
    block_preload: bool,
    problems: std::sync::Arc<Problems>,
}

/// `model.layers.7.mlp.up_proj.weight` -> `model.layers.7.`: the name up to its first numeric
/// component (the block), or `None` outside numbered blocks.
fn block_of(name: &str) -> Option<&str> {
    let mut end = 0;
    for part in name.split('.') {
        end += part.len() + 1;
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            return (end < name.len()).then(|| &name[..end]);
        }
    }
    None
}

/// Loads every tensor of `inner` in `dtype` onto `device` with a pool of threads: the copy out of
/// the memory-mapped files (page faults), the dtype conversion (f32 shards -> bf16) and the upload
/// of one tensor overlap with those of others, where one thread doing them in turn left the disk,
/// the cores and the bus mostly idle (18 s for 20 GB from the page cache on an H200 machine).
/// Tensors that fail to load are left out; `get` then loads them itself and reports the error.
fn preload(inner: &MmapedSafetensors, dtype: DType, device: &Device) -> std::collections::HashMap<String, Tensor> {
    let names: Vec<String> = inner.tensors().into_iter().map(|(name, _)| name).collect();
    preload_names(inner, names, dtype, device)
}

/// `preload` of the tensors named.
fn preload_names(inner: &MmapedSafetensors, names: Vec<String>, dtype: DType, device: &Device) -> std::collections::HashMap<String, Tensor> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8).min(names.len().max(1));
    let next = AtomicUsize::new(0);
    let loaded = Mutex::new(std::collections::HashMap::with_capacity(names.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                let t = inner.load(name, &Device::Cpu).and_then(|t| {
                    // narrow on the CPU, so the device never holds the wide copy of a large tensor
                    let t = if t.dtype() != dtype && t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
                    t.to_device(device)
                });
                if let Ok(t) = t {
                    loaded.lock().expect("preload lock").insert(name.clone(), t);
                }
            });
        }
    });
    loaded.into_inner().expect("preload lock")
}

fn placeholder(s: Shape, dtype: DType) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(s)
}

impl SimpleBackend for CheckedSafetensors {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = match self.inner.get(name) {
            Ok(v) => v,
            Err(_) => {
                self.problems.push(format!("missing tensor `{name}` (expected shape {:?})", s.dims()));
                return placeholder(s, dtype);
            }
        };
        if view.shape() != s.dims() {
            self.problems.push(format!(
                "tensor `{name}` has shape {:?}, the config expects {:?}",
                view.shape(),
                s.dims()
            ));
            return placeholder(s, dtype);
        }
        let ready = {
            let mut preloaded = self.preloaded.lock().expect("preload lock");
            match block_of(name) {
                Some(block) if self.block_preload && !preloaded.contains_key(name) => {
                    let names = self.inner.tensors().into_iter().map(|(n, _)| n).filter(|n| n.starts_with(block)).collect();
                    preloaded.extend(preload_names(&self.inner, names, dtype, dev));
                }
                _ => {}
            }
            preloaded.remove(name)
        };
        if let Some(t) = ready {
            let t = if t.dtype() != dtype { t.to_dtype(dtype)? } else { t };
            return if t.device().same_device(dev) { Ok(t) } else { t.to_device(dev) };
        }
        // Convert on the CPU first when narrowing (f32 shards -> bf16), so the device never holds
        // the wide copy of a large tensor.
        let t = self.inner.load(name, &Device::Cpu)?;
        if t.dtype() != dtype {
            t.to_dtype(dtype)?.to_device(dev)
        } else {
            t.to_device(dev)
        }
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.load(name, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}

/// Reads `files` once, in order, on a background thread, so that they sit in the page cache when
/// the loader's memory-mapped reads (page faults, one tensor after another) reach them: the disk
/// streams at full speed while the loader converts and uploads. Errors are ignored (the loader
/// reports missing or unreadable files itself).
pub fn prefetch(files: Vec<std::path::PathBuf>) {
    let spawned = std::thread::Builder::new().name("zimage-prefetch".into()).spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 16 << 20];
        for f in files {
            if let Ok(mut file) = std::fs::File::open(&f) {
                while matches!(file.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
    });
    drop(spawned); // detached; without a thread the loader just reads the files itself
}

/// A `VarBuilder` over safetensors files whose problems are collected in the returned log.
pub fn checked_var_builder(
    files: &[impl AsRef<Path>],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, std::sync::Arc<Problems>)> {
    checked_var_builder_with(files, dtype, device, true)
}

/// [`checked_var_builder`] without the preload of everything: a tensor is read when asked for,
/// with the rest of its numbered block (`layers.N.`), so a caller that frees each block after
/// using it holds about one block at a time (the streamed text encoder).
pub fn lazy_checked_var_builder(
    files: &[impl AsRef<Path>],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, std::sync::Arc<Problems>)> {
    checked_var_builder_with(files, dtype, device, false)
}

fn checked_var_builder_with(
    files: &[impl AsRef<Path>],
    dtype: DType,
    device: &Device,
    preload_all: bool,
) -> Result<(VarBuilder<'static>, std::sync::Arc<Problems>)> {
    for f in files {
        if !f.as_ref().exists() {
            return Err(Error::MissingFiles {
                root: f.as_ref().parent().map(|p| p.to_path_buf()).unwrap_or_default(),
                missing: vec![f.as_ref().display().to_string()],
                hint: "the weight file named in the index is absent; download the model again".into(),
            });
        }
    }
    // Safety: the files are memory-mapped read-only; the model files must not be modified while loaded.
    let inner = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Config {
        path: files.first().map(|f| f.as_ref().to_path_buf()).unwrap_or_default(),
        reason: format!("cannot read safetensors: {e}"),
    })?;
    let problems = std::sync::Arc::new(Problems::default());
    let preloaded = Mutex::new(if preload_all { preload(&inner, dtype, device) } else { Default::default() });
    let backend = CheckedSafetensors { inner, preloaded, block_preload: !preload_all, problems: problems.clone() };
    Ok((VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), problems))
}

/// Fails with every recorded problem of `component`, if any.
pub fn ensure_no_problems(component: &str, problems: &Problems) -> Result<()> {
    let p = problems.take();
    if p.is_empty() {
        Ok(())
    } else {
        Err(Error::WeightMismatch { component: component.to_string(), problems: p })
    }
}

/// Deterministic pseudo-random weights, keyed by tensor name (so the order in which a model asks
/// for them does not matter) and a model-wide seed. Scales keep activations O(1).
pub struct RandomWeights {
    seed: u64,
    made: Mutex<BTreeMap<String, Tensor>>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed, made: Mutex::new(BTreeMap::new()) }
    }
    /// Every tensor handed out so far, by name (CPU, f32).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.made.lock().expect("weights lock").clone()
    }
    fn make(&self, dims: &[usize], name: &str) -> candle_core::Result<Tensor> {
        let n: usize = dims.iter().product();
        let mut rng = crate::rng::Rng::new(self.seed ^ crate::rng::fnv1a(name.as_bytes()));
        let (mean, std) = init_rule(name, dims);
        let data: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
    }
}

/// (mean, std) of a random weight: norm weights 1 + N(0, 0.1), other vectors N(0, 0.05), pad
/// tokens N(0, 1), matrices and kernels N(0, 1/fan_in), so activations stay O(1).
fn init_rule(name: &str, dims: &[usize]) -> (f32, f32) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if dims.len() == 1 && name.contains("norm") && leaf == "weight" {
        (1.0, 0.1)
    } else if dims.len() == 1 {
        (0.0, 0.05)
    } else if name.ends_with("pad_token") {
        (0.0, 1.0)
    } else {
        let fan_in: usize = dims[1..].iter().product();
        (0.0, 1.0 / (fan_in as f32).sqrt())
    }
}

/// Newtype so the shared random source can be a `VarBuilder` backend.
struct RandomSource(std::sync::Arc<RandomWeights>);

impl SimpleBackend for RandomSource {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut made = self.0.made.lock().expect("weights lock");
        let t = match made.get(name) {
            Some(t) => t.clone(),
            None => {
                let t = self.0.make(s.dims(), name)?;
                made.insert(name.to_string(), t.clone());
                t
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.0.made.lock().expect("weights lock").get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("random weights: `{name}` has no shape yet"),
        }
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        // A random source can make any tensor; callers that probe for an optional prefix
        // (e.g. `model.`) probe the plain name first and so take the plain layout.
        true
    }
}

pub fn random_var_builder(weights: &std::sync::Arc<RandomWeights>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomSource(weights.clone())), dtype, device.clone())
}

/// Random weights drawn directly on the target device (fast at full size, not reproducible across
/// devices): for benchmarks of the real architecture without the real files.
struct DeviceRandom;

impl SimpleBackend for DeviceRandom {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (mean, std) = init_rule(name, s.dims());
        Tensor::randn(mean, std, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("device random weights: `{name}` needs a shape")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

pub fn device_random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(DeviceRandom), dtype, device.clone())
}

#[cfg(test)]
mod block_tests {
    use super::block_of;

    #[test]
    fn a_tensor_name_names_its_numbered_block() {
        assert_eq!(block_of("model.layers.7.mlp.up_proj.weight"), Some("model.layers.7."));
        assert_eq!(block_of("layers.12.self_attn.q_norm.weight"), Some("layers.12."));
        assert_eq!(block_of("model.embed_tokens.weight"), None);
        assert_eq!(block_of("norm.weight"), None);
        assert_eq!(block_of("layers.3"), None);
    }
}
