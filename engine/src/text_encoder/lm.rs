//! The text encoder's weights run as the causal LM they are (the prompt enhancer's model): every
//! layer, the final norm, and the tied embedding as the head, over a KV cache.
//!
//! The cache is a set of preallocated buffers, a (kv heads, capacity, head_dim) pair per layer, so
//! that a decoding step (one token) has fixed shapes and addresses: it writes its key and value at
//! its position (a device-side index), attends over the whole capacity with an additive mask that
//! hides the positions not yet written (their probabilities are exactly 0), and is replayed as one
//! CUDA graph per step on CUDA: one launch instead of ~1,100 small kernels, which is what bounds a
//! decoding step's time (eager elsewhere; the same code). A prompt (several tokens) runs eagerly
//! and fills the buffers with `slice_set`. Buffer sets go back to the encoder's pool when a
//! generation ends, so the next generation of the same capacity reuses them and their capture.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use super::{linear, rms_norm_fast, Attention, DecoderLayer, TextEncoder};
use crate::error::{Error, Result};

/// KV buffer sets kept for reuse (and decode captures kept, one per set).
pub const KV_POOL_SIZE: usize = 2;
/// Capacities are rounded up to a multiple of this, so generations of similar length share a set.
const CAPACITY_STEP: usize = 256;

/// One set of per-layer key and value buffers, (kv heads, capacity, head_dim) each.
struct KvBuffers {
    /// Names the set (and so the addresses its decode capture writes to).
    id: u64,
    capacity: usize,
    layers: Vec<(Tensor, Tensor)>,
}

/// Buffer sets free for the next generation.
#[derive(Default, Clone)]
pub(super) struct KvPool(Arc<Mutex<PoolState>>);

#[derive(Default)]
struct PoolState {
    free: Vec<KvBuffers>,
    next_id: u64,
}

impl KvPool {
    /// A free set of exactly `capacity`, or a new one from `make`.
    fn take(&self, capacity: usize, make: impl FnOnce() -> Result<Vec<(Tensor, Tensor)>>) -> Result<KvBuffers> {
        let id = {
            let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pos) = st.free.iter().position(|b| b.capacity == capacity) {
                return Ok(st.free.remove(pos));
            }
            st.next_id += 1;
            st.next_id
        };
        Ok(KvBuffers { id, capacity, layers: make()? })
    }

    fn give_back(&self, buffers: KvBuffers) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.free.push(buffers);
        if st.free.len() > KV_POOL_SIZE {
            st.free.remove(0);
        }
    }
}

/// Keys and values of the tokens a causal LM has seen. Its buffers return to the encoder's pool
/// when it is dropped.
#[derive(Default)]
pub struct KvCache {
    buffers: Option<KvBuffers>,
    pool: Option<KvPool>,
    len: usize,
    /// Tokens it is expected to hold (prompt + new tokens): sized once, not grown step by step.
    expected: usize,
}

impl KvCache {
    /// A cache sized for `tokens` (prompt and new tokens) from its first step.
    pub fn with_capacity(tokens: usize) -> Self {
        Self { buffers: None, pool: None, len: 0, expected: tokens }
    }
    /// How many tokens the cache holds (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Tokens the buffers can hold before they are replaced by larger ones.
    pub fn capacity(&self) -> usize {
        self.buffers.as_ref().map_or(0, |b| b.capacity)
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let (Some(b), Some(pool)) = (self.buffers.take(), self.pool.as_ref()) {
            pool.give_back(b);
        }
    }
}

impl Attention {
    /// The q, k, v of `x` (n tokens at positions given by `cos`/`sin`), heads first, normed and
    /// rotated: (heads, n, hd), (kv heads, n, hd), (kv heads, n, hd).
    fn qkv_heads_first(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let n = x.dim(0)?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = linear(x, &self.qkv_proj)?.reshape((n, nh + 2 * nkv, hd))?;
        let (q, k, v) = (qkv.narrow(1, 0, nh)?, qkv.narrow(1, nh, nkv)?, qkv.narrow(1, nh + nkv, nkv)?);
        let q = rms_norm_fast(&q, &self.q_norm, self.eps)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let k = rms_norm_fast(&k, &self.k_norm, self.eps)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        let v = v.transpose(0, 1)?.contiguous()?;
        Ok((q, k, v))
    }

    /// softmax(q k^T / sqrt(hd) + mask) v for q (heads, n, hd) over keys/values (kv heads, T, hd),
    /// grouped-query (the `rep` query heads of a kv head stacked along the token axis), the
    /// softmax in f32; `mask` broadcasts to (heads, n, T). Returns (n, heads * hd).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let n = q.dim(1)?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = nh / nkv;
        let total = k.dim(1)?;
        let q = q.reshape((nkv, rep * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (crate::ops::matmul(&q, &k.t()?)? * scale)?.to_dtype(DType::F32)?.reshape((nh, n, total))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = crate::ops::matmul(&probs.reshape((nkv, rep * n, total))?, v)?;
        Ok(out.reshape((nh, n, hd))?.transpose(0, 1)?.reshape((n, nh * hd))?)
    }

    /// Attention of `x` (n new tokens at positions `offset..offset+n`) over the cached keys and
    /// values plus its own, which it writes into the buffers at `offset` (eager: a prompt).
    fn forward_prefill(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, (kb, vb): &(Tensor, Tensor), offset: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (q, k, v) = self.qkv_heads_first(x, cos, sin)?;
        kb.slice_set(&k, 1, offset)?;
        vb.slice_set(&v, 1, offset)?;
        let total = offset + n;
        let (k, v) = (kb.narrow(1, 0, total)?.contiguous()?, vb.narrow(1, 0, total)?.contiguous()?);
        let mask = if n > 1 {
            // new token i (position offset+i) sees keys 0..=offset+i
            let m: Vec<f32> = (0..n)
                .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(m, (n, total), x.device())?)
        } else {
            None
        };
        linear(&self.attend(&q, &k, &v, mask.as_ref())?, &self.o_proj)
    }

    /// One token: its key and value written at the position held in `at` (a (kv heads, 1, hd)
    /// index tensor), attention over the buffers' whole capacity with `mask` (1, capacity): 0 up
    /// to the position, -inf after. Fixed shapes and addresses: capturable.
    fn forward_decode(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, (kb, vb): &(Tensor, Tensor), at: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (q, k, v) = self.qkv_heads_first(x, cos, sin)?;
        kb.scatter_set(at, &k, 1)?;
        vb.scatter_set(at, &v, 1)?;
        linear(&self.attend(&q, kb, vb, Some(mask))?, &self.o_proj)
    }
}

impl DecoderLayer {
    fn forward_prefill(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, kv: &(Tensor, Tensor), offset: usize) -> Result<Tensor> {
        let h = self.attn.forward_prefill(&rms_norm_fast(x, &self.input_layernorm, self.eps)?, cos, sin, kv, offset)?;
        self.finish(&(x + h)?)
    }

    fn forward_decode(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, kv: &(Tensor, Tensor), at: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.attn.forward_decode(&rms_norm_fast(x, &self.input_layernorm, self.eps)?, cos, sin, kv, at, mask)?;
        self.finish(&(x + h)?)
    }

    /// The MLP half of the layer, residual included.
    fn finish(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.mlp.forward(&rms_norm_fast(x, &self.post_attention_layernorm, self.eps)?)?;
        Ok((x + h)?)
    }
}

impl TextEncoder {
    /// Whether the checkpoint had the last layer and the final norm (the causal LM can run).
    pub fn has_lm_head(&self) -> bool {
        self.lm_tail.is_some()
    }

    /// The tied embedding on the compute device (uploaded on first use).
    fn lm_head(&self) -> Result<&Tensor> {
        if let Some(h) = self.lm_head.get() {
            return Ok(h);
        }
        let on_device = self.embed_tokens.to_device(&self.device)?;
        Ok(self.lm_head.get_or_init(|| on_device))
    }

    /// Makes `cache` hold at least `needed` tokens: a set from the pool (or new) of the expected
    /// size rounded up, with what the old set held copied over.
    fn reserve(&self, cache: &mut KvCache, needed: usize) -> Result<()> {
        if cache.capacity() >= needed {
            return Ok(());
        }
        let max = self.cfg.max_position_embeddings;
        let capacity = (needed.max(cache.expected).div_ceil(CAPACITY_STEP) * CAPACITY_STEP).min(max).max(needed);
        let (nkv, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim());
        let n_layers = self.layers.len() + 1;
        let fresh = self.kv_pool.take(capacity, || {
            (0..n_layers)
                .map(|_| {
                    let z = || Tensor::zeros((nkv, capacity, hd), self.dtype, &self.device);
                    Ok((z()?, z()?))
                })
                .collect()
        })?;
        if let Some(old) = cache.buffers.take() {
            if cache.len > 0 {
                for ((ok, ov), (nk, nv)) in old.layers.iter().zip(&fresh.layers) {
                    nk.slice_set(&ok.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&ov.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                }
            }
            self.kv_pool.give_back(old);
        }
        cache.buffers = Some(fresh);
        cache.pool = Some(self.kv_pool.clone());
        Ok(())
    }

    /// Runs the causal LM (every layer, the final norm, the tied embedding as the head) over
    /// `ids`, the tokens that follow those in `cache`, and appends them to it. Returns the f32
    /// logits (vocab,) of the last of `ids`: the distribution of the next token.
    pub fn lm_step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let Some((last, norm)) = &self.lm_tail else {
            return Err(Error::InvalidRequest(
                "this text encoder checkpoint has no last layer or final norm, so it cannot generate text".into(),
            ));
        };
        if ids.is_empty() {
            return Err(Error::InvalidRequest("no tokens to run".into()));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidRequest(format!("token id {bad} is outside the vocabulary ({} ids)", self.cfg.vocab_size)));
        }
        let offset = cache.len;
        let n = ids.len();
        if offset + n > self.cfg.max_position_embeddings {
            return Err(Error::InvalidRequest(format!(
                "{} tokens exceed the model's {} positions",
                offset + n,
                self.cfg.max_position_embeddings
            )));
        }
        self.reserve(cache, offset + n)?;
        let head = self.lm_head()?;
        let idt = Tensor::from_vec(ids.to_vec(), n, self.embed_tokens.device())?;
        let x = self.embed_tokens.index_select(&idt, 0)?.to_device(&self.device)?;
        let (cos, sin) = self.rope_tables_at(offset, n)?;
        let bufs = cache.buffers.as_ref().expect("reserve gave the cache its buffers");
        let layers = || self.layers.iter().chain(std::iter::once(last)).zip(&bufs.layers);
        let eps = self.cfg.rms_norm_eps;
        let logits = if n == 1 {
            let capacity = bufs.capacity;
            let (nkv, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim());
            let at = Tensor::from_vec(vec![offset as u32; nkv * hd], (nkv, 1, hd), &self.device)?;
            let mask: Vec<f32> = (0..capacity).map(|j| if j > offset { f32::NEG_INFINITY } else { 0.0 }).collect();
            let mask = Tensor::from_vec(mask, (1, capacity), &self.device)?;
            let mut constants: Vec<Tensor> = bufs.layers.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect();
            constants.push(head.clone());
            let step = |ins: &[Tensor]| -> candle_core::Result<Tensor> {
                let wrap = candle_core::Error::wrap;
                let (cos, sin, at, mask) = (&ins[1], &ins[2], &ins[3], &ins[4]);
                let mut x = ins[0].clone();
                for (layer, kv) in layers() {
                    x = layer.forward_decode(&x, cos, sin, kv, at, mask).map_err(wrap)?;
                }
                let h = rms_norm_fast(&x, norm, eps).map_err(wrap)?;
                linear(&h, head).map_err(wrap)?.squeeze(0)?.to_dtype(DType::F32)
            };
            self.decode_graphs.run(&(capacity, bufs.id), &[&x, &cos, &sin, &at, &mask], &constants, &step)?
        } else {
            let mut x = x;
            for (layer, kv) in layers() {
                x = layer.forward_prefill(&x, &cos, &sin, kv, offset)?;
            }
            let h = rms_norm_fast(&x.narrow(0, n - 1, 1)?, norm, eps)?;
            linear(&h, head)?.squeeze(0)?.to_dtype(DType::F32)?
        };
        cache.len = offset + n;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TextEncoderConfig;
    use candle_core::Device;

    /// A tiny Qwen3 with every layer and the final norm, random weights.
    fn tiny_lm() -> TextEncoder {
        let cfg = TextEncoderConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: Some(8),
            max_position_embeddings: 600,
            ..TextEncoderConfig::qwen3_4b()
        };
        let weights = std::sync::Arc::new(crate::weights::RandomWeights::new(7));
        TextEncoder::new(&cfg, crate::weights::random_var_builder(&weights, DType::F32, &Device::Cpu)).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn decoding_over_the_whole_capacity_equals_attending_only_the_tokens_seen() {
        let te = tiny_lm();
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 64) as u32).collect();
        // token by token (the masked full-capacity step) against one prompt run of all of them
        let mut inc = KvCache::default();
        let mut last = None;
        for &id in &ids {
            last = Some(te.lm_step(&[id], &mut inc).unwrap());
        }
        let mut full = KvCache::default();
        let all = te.lm_step(&ids, &mut full).unwrap();
        assert!(max_diff(&last.unwrap(), &all) < 1e-5);
        assert_eq!(inc.len(), 40);
        assert_eq!(inc.capacity(), CAPACITY_STEP);
    }

    #[test]
    fn a_cache_grows_past_its_capacity_and_keeps_what_it_held() {
        let te = tiny_lm();
        let ids: Vec<u32> = (0..300).map(|i| (i * 11 % 64) as u32).collect();
        let mut small = KvCache::with_capacity(10);
        te.lm_step(&ids[..200], &mut small).unwrap();
        assert_eq!(small.capacity(), 256);
        let grown = te.lm_step(&ids[200..], &mut small).unwrap();
        assert_eq!(small.capacity(), 512.min(600));
        let mut once = KvCache::with_capacity(300);
        let want = te.lm_step(&ids, &mut once).unwrap();
        assert!(max_diff(&grown, &want) < 1e-5);
    }

    #[test]
    fn buffers_go_back_to_the_pool_and_a_reused_set_gives_the_same_logits() {
        let te = tiny_lm();
        let run = |te: &TextEncoder| -> (u64, Tensor) {
            let mut cache = KvCache::with_capacity(20);
            te.lm_step(&[1, 2, 3, 4, 5], &mut cache).unwrap();
            te.lm_step(&[9], &mut cache).unwrap();
            let out = te.lm_step(&[10], &mut cache).unwrap();
            (cache.buffers.as_ref().unwrap().id, out)
        };
        // a longer first generation leaves stale keys beyond the second one's positions
        let mut first = KvCache::with_capacity(20);
        te.lm_step(&(0..60).map(|i| (i % 64) as u32).collect::<Vec<_>>(), &mut first).unwrap();
        let first_id = first.buffers.as_ref().unwrap().id;
        drop(first);
        let (id_a, a) = run(&te);
        assert_eq!(id_a, first_id, "the freed set is reused");
        let fresh = tiny_lm();
        let (_, b) = run(&fresh);
        assert!(max_diff(&a, &b) < 1e-6, "stale entries past the position must not count");
    }
}
