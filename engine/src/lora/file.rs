//! Reading a LoRA `.safetensors` file: its tensors grouped by the module they adapt, whatever the
//! producer's key convention (diffusers/PEFT, ai-toolkit/ComfyUI, kohya/musubi, LyCORIS), with
//! each module's alpha found where that producer writes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::Digest;

use crate::error::{Error, Result};

/// How a file names its modules (the prefix convention; several may mix in one file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyStyle {
    /// `transformer.layers.0.attention.to_q.lora_A.weight` (diffusers `save_lora_weights`).
    Diffusers,
    /// The same without a prefix (PEFT `save_pretrained` of the transformer).
    Bare,
    /// `diffusion_model.layers.0…` (ai-toolkit, ComfyUI).
    DiffusionModel,
    /// `lora_unet_layers_0_attention_to_q.lora_down.weight` (kohya, musubi-tuner).
    Kohya,
    /// `lycoris_layers_0_attention_to_q.hada_w1_a` (LyCORIS).
    Lycoris,
}

impl KeyStyle {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Diffusers => "diffusers/PEFT (`transformer.` prefix)",
            Self::Bare => "diffusers/PEFT (no prefix)",
            Self::DiffusionModel => "ai-toolkit/ComfyUI (`diffusion_model.` prefix)",
            Self::Kohya => "kohya/musubi-tuner (`lora_unet_`)",
            Self::Lycoris => "LyCORIS (`lycoris_`)",
        }
    }
    /// Kohya-style names replace the dots of module names by underscores.
    pub fn underscored(self) -> bool {
        matches!(self, Self::Kohya | Self::Lycoris)
    }
}

/// A low-rank factor pair or a full matrix (LoKr's two Kronecker factors are either).
#[derive(Debug, Clone)]
pub enum Factor {
    Full(Tensor),
    /// a (m, r) @ b (r, n)
    Low(Tensor, Tensor),
}

/// The adapter of one module, as stored (tensors on the CPU, in the file's dtype).
#[derive(Debug, Clone)]
pub enum AdapterWeights {
    /// delta = up (out, r) @ down (r, in)
    LoRA { down: Tensor, up: Tensor },
    /// delta = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise
    LoHa { w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor },
    /// delta = kron(w1, w2)
    LoKr { w1: Factor, w2: Factor },
}

impl AdapterWeights {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LoRA { .. } => "LoRA",
            Self::LoHa { .. } => "LoHa",
            Self::LoKr { .. } => "LoKr",
        }
    }
    /// The rank alpha is divided by (None: a LoKr of two full factors, whose alpha is unused).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Self::LoRA { down, .. } => Some(down.dims()[0]),
            Self::LoHa { w1_b, .. } => Some(w1_b.dims()[0]),
            Self::LoKr { w1, w2 } => match (w1, w2) {
                (_, Factor::Low(_, b)) | (Factor::Low(_, b), _) => Some(b.dims()[0]),
                _ => None,
            },
        }
    }
}

/// One adapted module of a file.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The module name as the file writes it, prefix removed (dots or underscores per style).
    pub module: String,
    pub style: KeyStyle,
    pub weights: AdapterWeights,
    /// From a `.alpha` tensor or the PEFT metadata; None: alpha = rank (scale 1).
    pub alpha: Option<f32>,
    /// rsLoRA (PEFT `use_rslora`): alpha / sqrt(rank) instead of alpha / rank.
    pub rslora: bool,
}

impl Adapter {
    /// alpha / rank (or / sqrt(rank)); 1 without an alpha.
    pub fn factor(&self) -> f32 {
        match (self.alpha, self.weights.rank()) {
            (Some(a), Some(r)) if self.rslora => a / (r as f32).sqrt(),
            (Some(a), Some(r)) => a / r as f32,
            _ => 1.0,
        }
    }
}

/// A parsed LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    /// sha256 of the whole file, lowercase hex.
    pub sha256: String,
    pub metadata: BTreeMap<String, String>,
    pub adapters: Vec<Adapter>,
    /// Keys addressed to the text encoder (not applied: Z-Image LoRAs train the transformer).
    pub text_encoder_keys: Vec<String>,
    /// Keys of kinds we do not apply (DoRA scales, conv/Tucker factors, …) or incomplete modules,
    /// each with the reason.
    pub unsupported: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Param {
    Down,
    Up,
    Alpha,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
}

const PARAMS: &[(&str, Param)] = &[
    (".lora_A.default.weight", Param::Down),
    (".lora_B.default.weight", Param::Up),
    (".lora_A.weight", Param::Down),
    (".lora_B.weight", Param::Up),
    (".lora_down.weight", Param::Down),
    (".lora_up.weight", Param::Up),
    (".alpha", Param::Alpha),
    (".hada_w1_a", Param::HadaW1A),
    (".hada_w1_b", Param::HadaW1B),
    (".hada_w2_a", Param::HadaW2A),
    (".hada_w2_b", Param::HadaW2B),
    (".lokr_w1", Param::LokrW1),
    (".lokr_w1_a", Param::LokrW1A),
    (".lokr_w1_b", Param::LokrW1B),
    (".lokr_w2", Param::LokrW2),
    (".lokr_w2_a", Param::LokrW2A),
    (".lokr_w2_b", Param::LokrW2B),
];

fn is_text_encoder(key: &str) -> bool {
    ["lora_te", "text_encoder.", "text_encoders.", "te.", "te1.", "te2.", "lycoris_te"].iter().any(|p| key.starts_with(p))
}

/// The prefix style and the module name after it.
fn split_prefix(module: &str) -> (KeyStyle, &str) {
    for (p, style) in [
        ("transformer.", KeyStyle::Diffusers),
        ("model.diffusion_model.", KeyStyle::DiffusionModel),
        ("diffusion_model.", KeyStyle::DiffusionModel),
        ("base_model.model.", KeyStyle::Bare),
        ("lora_unet_", KeyStyle::Kohya),
        ("lycoris_", KeyStyle::Lycoris),
    ] {
        if let Some(rest) = module.strip_prefix(p) {
            return (style, rest);
        }
    }
    (KeyStyle::Bare, module)
}

/// The `__metadata__` of a safetensors file's JSON header, with errors that say what is wrong
/// with a damaged file.
fn read_header(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let bad = |reason: String| Error::Lora { path: path.to_path_buf(), reason };
    if bytes.len() < 8 {
        return Err(bad(format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n > bytes.len() - 8 {
        return Err(bad(format!("not a safetensors file (or truncated): header length {n} exceeds the file size {}", bytes.len())));
    }
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(format!("not a safetensors file: header is not JSON ({e})")))?;
    let meta = header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect())
        .unwrap_or_default();
    Ok(meta)
}

/// PEFT's adapter config as diffusers stores it in the metadata (`lora_adapter_metadata`, keys
/// optionally prefixed `transformer.`).
#[derive(Default, Debug)]
struct PeftConfig {
    alpha: Option<f32>,
    alpha_pattern: Vec<(String, f32)>,
    rslora: bool,
}

impl PeftConfig {
    fn from_metadata(meta: &BTreeMap<String, String>) -> Self {
        let Some(raw) = meta.get("lora_adapter_metadata") else { return Self::default() };
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(raw) else { return Self::default() };
        let get = |k: &str| obj.get(&format!("transformer.{k}")).or_else(|| obj.get(k));
        let alpha_pattern = get("alpha_pattern")
            .and_then(|v| v.as_object())
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32))).collect())
            .unwrap_or_default();
        Self {
            alpha: get("lora_alpha").and_then(|v| v.as_f64()).map(|v| v as f32),
            alpha_pattern,
            rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        }
    }
    /// PEFT matches a pattern key against the end of the module name (`(.*\.)?key$`).
    fn alpha_for(&self, module: &str) -> Option<f32> {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .or(self.alpha)
    }
}

fn to_2d(t: &Tensor) -> Result<Tensor> {
    // kohya stores linear factors of conv-converted modules as (r, in, 1, 1)
    let d = t.dims();
    if d.len() > 2 && d[2..].iter().all(|&x| x == 1) {
        return Ok(t.reshape((d[0], d[1]))?);
    }
    Ok(t.clone())
}

impl LoraFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::Lora { path: path.to_path_buf(), reason };
        let metadata = read_header(path, bytes)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| bad(format!("cannot read its tensors: {e}")))?;
        let peft = PeftConfig::from_metadata(&metadata);
        let mut text_encoder_keys = vec![];
        let mut unsupported = vec![];
        // module (with prefix) -> params
        let mut groups: BTreeMap<String, BTreeMap<&'static str, (Param, String, Tensor)>> = BTreeMap::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for key in names {
            if is_text_encoder(key) {
                text_encoder_keys.push(key.clone());
                continue;
            }
            let Some((suffix, param)) = PARAMS.iter().find(|(s, _)| key.ends_with(s)) else {
                unsupported.push(format!("{key}: not a LoRA/LoHa/LoKr factor we apply"));
                continue;
            };
            let module = key[..key.len() - suffix.len()].to_string();
            groups.entry(module).or_default().insert(suffix, (*param, key.clone(), tensors[key].clone()));
        }
        let mut adapters = vec![];
        for (full_module, params) in groups {
            let (style, module) = split_prefix(&full_module);
            let find = |p: Param| params.values().find(|(q, _, _)| *q == p).map(|(_, _, t)| t.to_dtype(DType::F32));
            let keys: Vec<&str> = params.values().map(|(_, k, _)| k.as_str()).collect();
            let has = |p: Param| params.values().any(|(q, _, _)| *q == p);
            let weights = if has(Param::Down) || has(Param::Up) {
                match (find(Param::Down), find(Param::Up)) {
                    (Some(d), Some(u)) => Some(AdapterWeights::LoRA { down: to_2d(&d?)?, up: to_2d(&u?)? }),
                    _ => None,
                }
            } else if has(Param::HadaW1A) {
                match (find(Param::HadaW1A), find(Param::HadaW1B), find(Param::HadaW2A), find(Param::HadaW2B)) {
                    (Some(a), Some(b), Some(c), Some(d)) => Some(AdapterWeights::LoHa { w1_a: a?, w1_b: b?, w2_a: c?, w2_b: d? }),
                    _ => None,
                }
            } else if has(Param::LokrW1) || has(Param::LokrW1A) {
                let factor = |full: Param, a: Param, b: Param| -> Result<Option<Factor>> {
                    Ok(match (find(full), find(a), find(b)) {
                        (Some(w), _, _) => Some(Factor::Full(w?)),
                        (None, Some(a), Some(b)) => Some(Factor::Low(a?, b?)),
                        _ => None,
                    })
                };
                match (factor(Param::LokrW1, Param::LokrW1A, Param::LokrW1B)?, factor(Param::LokrW2, Param::LokrW2A, Param::LokrW2B)?) {
                    (Some(w1), Some(w2)) => Some(AdapterWeights::LoKr { w1, w2 }),
                    _ => None,
                }
            } else {
                None
            };
            let Some(weights) = weights else {
                unsupported.push(format!("{}: incomplete module (keys {})", full_module, keys.join(", ")));
                continue;
            };
            let alpha_tensor = match find(Param::Alpha) {
                Some(a) => Some(a?.flatten_all()?.to_vec1::<f32>()?.first().copied().ok_or_else(|| bad(format!("{full_module}.alpha is empty")))?),
                None => None,
            };
            let alpha = alpha_tensor.or_else(|| peft.alpha_for(module));
            adapters.push(Adapter { module: module.to_string(), style, weights, alpha, rslora: peft.rslora });
        }
        let sha256 = format!("{:x}", sha2::Sha256::digest(bytes));
        Ok(Self { path: path.to_path_buf(), sha256, metadata, adapters, text_encoder_keys, unsupported })
    }

    /// The key styles found, most common first.
    pub fn styles(&self) -> Vec<KeyStyle> {
        let mut count: BTreeMap<KeyStyle, usize> = BTreeMap::new();
        for a in &self.adapters {
            *count.entry(a.style).or_default() += 1;
        }
        let mut v: Vec<(KeyStyle, usize)> = count.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1));
        v.into_iter().map(|(s, _)| s).collect()
    }

    /// Trigger words from the metadata: `modelspec.trigger_phrase`, then kohya's most frequent
    /// training tags (`ss_tag_frequency`), at most `max`.
    pub fn trigger_words(&self, max: usize) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for k in ["modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "ss_trigger_words"] {
            if let Some(v) = self.metadata.get(k) {
                out.extend(v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
            }
        }
        if let Some(freq) = self.metadata.get("ss_tag_frequency").and_then(|s| serde_json::from_str::<BTreeMap<String, BTreeMap<String, f64>>>(s).ok()) {
            let mut tags: BTreeMap<String, f64> = BTreeMap::new();
            for dir in freq.values() {
                for (t, c) in dir {
                    *tags.entry(t.trim().to_string()).or_default() += c;
                }
            }
            let mut tags: Vec<(String, f64)> = tags.into_iter().filter(|(t, _)| !t.is_empty()).collect();
            tags.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
            out.extend(tags.into_iter().map(|(t, _)| t));
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|w| seen.insert(w.clone()));
        out.truncate(max);
        out
    }
}
