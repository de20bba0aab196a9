//! LoRA for the transformer: reading the files people publish (`file`), matching their modules to
//! our linear layers (fused q|k|v and w1|w3 included), and merging them into the weights:
//! W = W0 + sum_i scale_i * (alpha_i / rank_i) * delta_i, computed in f32 and stored in the
//! model's dtype (quantized layers are quantized again from the merged weight).
//!
//! Switching sets never rereads the model: `LoraPatcher` keeps the unpatched transformer (a clone
//! sharing its weight storage), so the base weights of patched layers stay on the device next to
//! the merged ones — extra memory equal to the patched layers' size in their stored format — and
//! reverting is putting that clone back.
//!
//! `library`: a folder of LoRAs by name (for the server's `--lora-dir`) and A1111's
//! `<lora:name:weight>` prompt tags.

pub mod file;
pub mod library;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};

pub use file::{Adapter, AdapterWeights, Factor, KeyStyle, LoraFile};
pub use library::{LoraEntry, LoraLibrary};

use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::transformer::ZImageTransformer;

/// Where a module name lands: rows [row, row + rows) of the layer `layer` (in features `cols`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The module's diffusers name (fused aliases: `…attention.qkv`).
    pub name: String,
    pub layer: String,
    pub row: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Every name a LoRA may use for a module of a model of `cfg`, dotted (diffusers, ComfyUI) and
/// underscored (kohya), including the fused `attention.qkv` and `attention.out` of ComfyUI and
/// musubi's converted files, and ComfyUI's `x_embedder` / `final_layer` names.
pub fn targets(cfg: &TransformerConfig) -> HashMap<String, Target> {
    let (dim, hd, hidden, ada) = (cfg.dim, cfg.head_dim(), cfg.ffn_hidden(), cfg.adaln_dim());
    let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let (p, pf) = (cfg.patch_size(), cfg.f_patch_size());
    let patch_dim = pf * p * p * cfg.in_channels;
    let key = format!("{p}-{pf}");
    let mut dotted: Vec<(String, Target)> = vec![];
    let single = |name: String, rows: usize, cols: usize, aliases: &[String], out: &mut Vec<(String, Target)>| {
        let t = Target { name: name.clone(), layer: name.clone(), row: 0, rows, cols };
        for a in aliases {
            out.push((a.clone(), t.clone()));
        }
        out.push((name, t));
    };
    single("t_embedder.mlp.0".into(), 1024, 256, &[], &mut dotted);
    single("t_embedder.mlp.2".into(), ada, 1024, &[], &mut dotted);
    single("cap_embedder.1".into(), dim, cfg.cap_feat_dim, &[], &mut dotted);
    single(format!("all_x_embedder.{key}"), dim, patch_dim, &["x_embedder".into()], &mut dotted);
    single(format!("all_final_layer.{key}.linear"), patch_dim, dim, &["final_layer.linear".into()], &mut dotted);
    single(format!("all_final_layer.{key}.adaLN_modulation.1"), dim, ada, &["final_layer.adaLN_modulation.1".into()], &mut dotted);
    for (group, n, modulated) in [("noise_refiner", cfg.n_refiner_layers, true), ("context_refiner", cfg.n_refiner_layers, false), ("layers", cfg.n_layers, true)] {
        for i in 0..n {
            let at = format!("{group}.{i}");
            let qkv = format!("{at}.attention.to_qkv");
            for (name, row, rows) in [("to_q", 0, q), ("to_k", q, kv), ("to_v", q + kv, kv), ("qkv", 0, q + 2 * kv)] {
                dotted.push((format!("{at}.attention.{name}"), Target { name: format!("{at}.attention.{name}"), layer: qkv.clone(), row, rows, cols: dim }));
            }
            single(format!("{at}.attention.to_out.0"), dim, q, &[format!("{at}.attention.out"), format!("{at}.attention.to_out")], &mut dotted);
            let w13 = format!("{at}.feed_forward.w13");
            dotted.push((format!("{at}.feed_forward.w1"), Target { name: format!("{at}.feed_forward.w1"), layer: w13.clone(), row: 0, rows: hidden, cols: dim }));
            dotted.push((format!("{at}.feed_forward.w3"), Target { name: format!("{at}.feed_forward.w3"), layer: w13, row: hidden, rows: hidden, cols: dim }));
            single(format!("{at}.feed_forward.w2"), dim, hidden, &[], &mut dotted);
            if modulated {
                single(format!("{at}.adaLN_modulation.0"), 4 * dim, ada, &[], &mut dotted);
            }
        }
    }
    let mut map = HashMap::new();
    for (name, t) in dotted {
        map.insert(name.replace('.', "_"), t.clone());
        map.insert(name, t);
    }
    map
}

/// The f32 weight change of one adapter (before the user's scale), (out, in), on `dev`.
pub fn adapter_delta(a: &Adapter, dev: &candle_core::Device) -> Result<Tensor> {
    let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(dev)?) };
    let factor = |x: &Factor| -> Result<Tensor> {
        Ok(match x {
            Factor::Full(w) => f(w)?,
            Factor::Low(a, b) => f(a)?.matmul(&f(b)?)?,
        })
    };
    let d = match &a.weights {
        AdapterWeights::LoRA { down, up } => f(up)?.matmul(&f(down)?)?,
        AdapterWeights::LoHa { w1_a, w1_b, w2_a, w2_b } => (f(w1_a)?.matmul(&f(w1_b)?)? * f(w2_a)?.matmul(&f(w2_b)?)?)?,
        AdapterWeights::LoKr { w1, w2 } => kron(&factor(w1)?, &factor(w2)?)?,
    };
    Ok((d * a.factor() as f64)?)
}

/// Kronecker product of two matrices: (a, b) x (c, d) -> (a c, b d).
pub fn kron(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (a, b) = x.dims2()?;
    let (c, d) = y.dims2()?;
    let x4 = x.reshape((a, 1, b, 1))?;
    let y4 = y.reshape((1, c, 1, d))?;
    Ok(x4.broadcast_mul(&y4)?.reshape((a * c, b * d))?)
}

/// How one file matches a model: which module names land where, and what does not.
#[derive(Debug, Clone, Default)]
pub struct Matching {
    /// (adapter index, target)
    pub matched: Vec<(usize, Target)>,
    /// Modules whose name matches nothing in this model.
    pub unmatched: Vec<String>,
}

impl LoraFile {
    /// Matches the adapters against a model of `cfg`. Errors: nothing matches (a LoRA for another
    /// model), or a matched module's shape differs (another variant of the architecture).
    pub fn match_model(&self, cfg: &TransformerConfig) -> Result<Matching> {
        let bad = |reason: String| Error::Lora { path: self.path.clone(), reason };
        let names = targets(cfg);
        let mut m = Matching::default();
        for (i, a) in self.adapters.iter().enumerate() {
            let t = if a.style.underscored() { names.get(&a.module) } else { names.get(&a.module).filter(|_| a.module.contains('.')) };
            match t {
                Some(t) => {
                    let shape = adapter_shape(&a.weights)?;
                    if shape != (t.rows, t.cols) {
                        return Err(bad(format!(
                            "module `{}` changes a {}x{} weight, but this model's `{}` is {}x{}: the LoRA was made for another model",
                            a.module, shape.0, shape.1, a.module, t.rows, t.cols
                        )));
                    }
                    m.matched.push((i, t.clone()));
                }
                None => m.unmatched.push(a.module.clone()),
            }
        }
        if m.matched.is_empty() {
            let mut some: Vec<String> = self.adapters.iter().map(|a| a.module.clone()).collect();
            some.extend(self.text_encoder_keys.iter().cloned());
            some.extend(self.unsupported.iter().cloned());
            some.truncate(5);
            let what = if self.adapters.is_empty() && !self.text_encoder_keys.is_empty() {
                "it only adapts the text encoder, which Z-Image LoRAs do not change here"
            } else {
                "no module matches the Z-Image transformer (a LoRA for another model?)"
            };
            return Err(bad(format!("{what}; keys include: {}", some.join(", "))));
        }
        Ok(m)
    }
}

fn adapter_shape(w: &AdapterWeights) -> Result<(usize, usize)> {
    let dims = |x: &Factor| -> Result<(usize, usize)> {
        Ok(match x {
            Factor::Full(w) => w.dims2()?,
            Factor::Low(a, b) => (a.dims2()?.0, b.dims2()?.1),
        })
    };
    Ok(match w {
        AdapterWeights::LoRA { down, up } => (up.dims2()?.0, down.dims2()?.1),
        AdapterWeights::LoHa { w1_a, w1_b, .. } => (w1_a.dims2()?.0, w1_b.dims2()?.1),
        AdapterWeights::LoKr { w1, w2 } => {
            let (a, b) = dims(w1)?;
            let (c, d) = dims(w2)?;
            (a * c, b * d)
        }
    })
}

/// What an apply did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Layers whose weights changed.
    pub layers: usize,
    /// Per file: modules of the file that matched nothing (the caller shows them as a warning).
    pub warnings: Vec<String>,
}

/// Merges `loras` (file, user scale) into `t`'s weights. On error `t` may be partly patched:
/// callers patch a clone (`LoraPatcher` does).
pub fn merge_into(t: &mut ZImageTransformer, loras: &[(&LoraFile, f32)]) -> Result<ApplyReport> {
    let cfg = t.config().clone();
    let mut report = ApplyReport::default();
    // layer -> (row offset, scaled delta) pieces
    let mut pieces: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    let dev = t.device().clone();
    for (file, scale) in loras {
        let m = file.match_model(&cfg)?;
        if !m.unmatched.is_empty() {
            report.warnings.push(format!("{}: {} modules match nothing and were skipped: {}", file.path.display(), m.unmatched.len(), m.unmatched.join(", ")));
        }
        if !file.text_encoder_keys.is_empty() {
            report.warnings.push(format!("{}: {} text-encoder keys not applied (the Qwen3 encoder is not adapted)", file.path.display(), file.text_encoder_keys.len()));
        }
        if !file.unsupported.is_empty() {
            report.warnings.push(format!("{}: skipped: {}", file.path.display(), file.unsupported.join("; ")));
        }
        for (i, target) in m.matched {
            let d = (adapter_delta(&file.adapters[i], &dev)? * *scale as f64)?;
            pieces.entry(target.layer.clone()).or_default().push((target.row, d));
        }
    }
    let dtype = t.dtype();
    for nl in t.named_linears_mut() {
        let Some(ps) = pieces.remove(&nl.layer) else { continue };
        let mut w = nl.linear.weight_f32()?;
        let total = w.dim(0)?;
        for (row, d) in ps {
            let rows = d.dim(0)?;
            w = (w + d.pad_with_zeros(0, row, total - row - rows)?)?;
        }
        nl.linear.set_weight(&w, dtype)?;
        report.layers += 1;
    }
    if let Some(layer) = pieces.keys().next() {
        return Err(Error::InvalidRequest(format!("LoRA target layer `{layer}` is not in the transformer")));
    }
    Ok(report)
}

/// Applies and reverts LoRA sets on a loaded pipeline without rereading the model (see the
/// module docs for where the base weights live).
#[derive(Default)]
pub struct LoraPatcher {
    base: Option<ZImageTransformer>,
    /// (sha256, scale) of the set applied now.
    applied: Vec<(String, f32)>,
}

impl LoraPatcher {
    pub fn new() -> Self {
        Self::default()
    }
    /// The set applied now: (sha256, scale) per file, in order.
    pub fn applied(&self) -> &[(String, f32)] {
        &self.applied
    }
    /// Makes `loras` the applied set: nothing to do when it already is; otherwise reverts to
    /// the base weights and merges the new set. On error the pipeline is left unpatched.
    pub fn set(&mut self, pipe: &mut Pipeline, loras: &[(&LoraFile, f32)]) -> Result<ApplyReport> {
        let want: Vec<(String, f32)> = loras.iter().map(|(f, s)| (f.sha256.clone(), *s)).collect();
        if want == self.applied {
            return Ok(ApplyReport::default());
        }
        self.revert(pipe);
        if loras.is_empty() {
            return Ok(ApplyReport::default());
        }
        let base = pipe.transformer_snapshot();
        let mut patched = base.clone();
        let report = merge_into(&mut patched, loras)?;
        pipe.restore_transformer(patched);
        self.base = Some(base);
        self.applied = want;
        Ok(report)
    }
    /// Puts the base weights back (no-op when nothing is applied).
    pub fn revert(&mut self, pipe: &mut Pipeline) {
        if let Some(base) = self.base.take() {
            pipe.restore_transformer(base);
        }
        self.applied.clear();
    }
}

#[cfg(test)]
mod tests;
