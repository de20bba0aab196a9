//! The prompt enhancer: the text encoder's weights run as the causal LM they are (Qwen3 with tied
//! embeddings: every layer, the final norm, logits through the embedding table, a KV cache) to
//! rewrite a short idea into one detailed image prompt.
//!
//! The messages (our system prompt, `enhance_prompt.txt`, unless the caller gives another or none,
//! then the user's idea) go through the model's own chat template with the generation prompt and
//! thinking off. Decoding is greedy at temperature 0, otherwise temperature + top-p sampling from
//! a seeded generator (same seed, same text). It stops at `<|im_end|>` (or `<|endoftext|>`) or
//! after `max_new_tokens`; `<think>…</think>` blocks are removed from what it says. When the
//! prompt and the new tokens do not fit the context limit, the user's text is cut (from its end)
//! until they do, and the output says so.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::pipeline::Control;
use crate::rng::Rng;
use crate::text_encoder::{KvCache, TextEncoder};
use crate::tokenizer::{PromptTokenizer, ENDOFTEXT, IM_END};

/// Our system prompt for turning a short idea into one detailed image prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str = include_str!("enhance_prompt.txt");

/// Default bound on prompt + new tokens (the KV cache grows with it).
pub const DEFAULT_CONTEXT_LIMIT: usize = 2048;
pub const DEFAULT_MAX_NEW_TOKENS: usize = 300;

/// What to enhance and how to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct EnhanceRequest {
    /// The user's idea (or, for chat completions, the last user message).
    pub prompt: String,
    /// `None`: our system prompt; `Some("")`: no system message; otherwise this one.
    pub system: Option<String>,
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probabilities add up to this.
    pub top_p: f32,
    pub seed: u64,
    /// Prompt and new tokens together stay within this (and within the model's positions).
    pub context_limit: usize,
}

impl Default for EnhanceRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            system: None,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            context_limit: DEFAULT_CONTEXT_LIMIT,
        }
    }
}

impl EnhanceRequest {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if self.prompt.trim().is_empty() {
            return bad("the prompt to enhance is empty".into());
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be a number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.context_limit < 16 {
            return bad(format!("the context limit must be at least 16 tokens, got {}", self.context_limit));
        }
        Ok(())
    }

    /// The chat messages: the system message (unless empty) and the user's idea.
    pub fn messages(&self, prompt: &str) -> Vec<ChatMessage> {
        let system = self.system.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT).trim();
        let mut m = Vec::with_capacity(2);
        if !system.is_empty() {
            m.push(ChatMessage::new("system", system));
        }
        m.push(ChatMessage::new("user", prompt));
        m
    }
}

/// Decoding parameters of [`generate_ids`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer (a stop token).
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One streamed piece of the answer.
pub struct EnhanceEvent<'a> {
    /// New visible text since the previous event (may be empty while a token is incomplete
    /// UTF-8 or inside a think block).
    pub delta: &'a str,
    pub new_tokens: usize,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnhanceOutput {
    /// The answer, think blocks removed, trimmed.
    pub text: String,
    pub finish: FinishReason,
    /// Tokens of the (possibly truncated) templated prompt.
    pub prompt_tokens: usize,
    /// The templated prompt's token count before the user's text was cut to fit the context.
    pub prompt_truncated_from: Option<usize>,
    /// Generated ids (the stop token not included).
    pub token_ids: Vec<u32>,
    /// From the call to the first new token.
    pub first_token: Duration,
    pub total: Duration,
}

impl EnhanceOutput {
    /// The user-facing note when the prompt was cut, `None` otherwise.
    pub fn truncation_note(&self) -> Option<String> {
        self.prompt_truncated_from.map(|n| {
            format!(
                "The prompt was too long for the enhancer's context ({n} tokens with the instructions); its end was cut to {} tokens.",
                self.prompt_tokens
            )
        })
    }
}

/// The ids that end an answer: `<|im_end|>` and `<|endoftext|>` where the tokenizer has them.
pub fn stop_ids(tok: &PromptTokenizer) -> Vec<u32> {
    [IM_END, ENDOFTEXT].iter().filter_map(|t| tok.inner().token_to_id(t)).collect()
}

/// The next token from f32 logits: argmax at temperature 0 (lowest id on ties), otherwise a draw
/// from softmax(logits / temperature) restricted to the top-p nucleus.
pub fn pick_token(logits: &Tensor, s: &Sampling, rng: &mut Rng) -> Result<u32> {
    let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    if logits.is_empty() {
        return Err(Error::InvalidRequest("empty logits".into()));
    }
    if s.temperature <= 0.0 {
        let mut best = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return Ok(best as u32);
    }
    let t = s.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &v)| (i, ((v as f64 - max) / t).exp())).collect();
    let sum: f64 = probs.iter().map(|p| p.1).sum();
    // most likely first; equal probabilities by id, so the order (and the draw) is deterministic
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / sum;
        if mass >= s.top_p as f64 {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let total: f64 = nucleus.iter().map(|p| p.1).sum();
    let u = ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) * total;
    let mut acc = 0.0;
    for p in nucleus {
        acc += p.1;
        if u < acc {
            return Ok(p.0 as u32);
        }
    }
    Ok(nucleus[kept - 1].0 as u32)
}

/// Runs the causal LM on `prompt_ids` and generates up to `max_new` ids, stopping after (and not
/// returning) a `stop` id. `on_token` sees each new id; `Control::Cancel` stops with
/// `Error::Cancelled`.
pub fn generate_ids(
    te: &TextEncoder,
    prompt_ids: &[u32],
    stop: &[u32],
    max_new: usize,
    sampling: &Sampling,
    on_token: &mut dyn FnMut(u32, &[u32]) -> Control,
) -> Result<(Vec<u32>, FinishReason)> {
    let mut rng = Rng::new(sampling.seed);
    let mut cache = KvCache::with_capacity(prompt_ids.len() + max_new);
    let mut logits = te.lm_step(prompt_ids, &mut cache)?;
    let mut out = Vec::new();
    loop {
        let id = pick_token(&logits, sampling, &mut rng)?;
        if stop.contains(&id) {
            return Ok((out, FinishReason::Stop));
        }
        out.push(id);
        if on_token(id, &out) == Control::Cancel {
            return Err(Error::Cancelled);
        }
        if out.len() >= max_new {
            return Ok((out, FinishReason::Length));
        }
        logits = te.lm_step(&[id], &mut cache)?;
    }
}

/// `text` without `<think>…</think>` blocks; an unclosed `<think>` hides the rest, and a trailing
/// partial `<think>` tag is held back (streaming).
pub fn visible_text(text: &str) -> &str {
    // Only a think block at the start is removed in place; the answer follows it.
    let mut rest = text;
    loop {
        let trimmed = rest.trim_start();
        if let Some(after) = trimmed.strip_prefix("<think>") {
            match after.find("</think>") {
                Some(end) => rest = &after[end + "</think>".len()..],
                None => return "",
            }
        } else if "<think>".starts_with(trimmed) && !trimmed.is_empty() {
            return "";
        } else {
            return trimmed;
        }
    }
}

/// Removes every think block (and trims): the final answer.
pub fn strip_think(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<think>") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</think>") {
            Some(end) => rest = &rest[start + end + "</think>".len()..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// The templated prompt's ids for the request, cutting the user's text from its end until prompt
/// + `max_new` fit `limit`. Returns (ids, count before the cut if cut).
fn fit_prompt(tok: &PromptTokenizer, template: &ChatTemplate, req: &EnhanceRequest, limit: usize, max_new: usize) -> Result<(Vec<u32>, Option<usize>)> {
    let render = |user: &str| -> Result<Vec<u32>> { tok.encode_raw(&template.render(&req.messages(user), false)?) };
    let ids = render(&req.prompt)?;
    let budget = limit.saturating_sub(max_new);
    if ids.len() <= budget {
        return Ok((ids, None));
    }
    let full = ids.len();
    let overhead = render("")?.len();
    if overhead >= budget {
        return Err(Error::InvalidRequest(format!(
            "the instructions alone take {overhead} tokens, leaving no room for the prompt within the context limit of {limit} tokens with {max_new} new tokens"
        )));
    }
    let user_ids = tok.encode_raw(&req.prompt)?;
    let mut keep = (budget - overhead).min(user_ids.len());
    loop {
        let text = tok.decode(&user_ids[..keep])?;
        // a cut inside a UTF-8 sequence decodes to U+FFFD: drop the partial character
        let text = text.trim_end_matches('\u{FFFD}');
        let ids = render(text)?;
        if ids.len() <= budget || keep == 0 {
            return Ok((ids, Some(full)));
        }
        keep -= (ids.len() - budget).min(keep).max(1);
    }
}

/// Enhances `req.prompt` with the text encoder `te` as a causal LM. `on_event` gets the visible
/// text as it grows; returning `Control::Cancel` stops with `Error::Cancelled`.
pub fn enhance(
    te: &TextEncoder,
    tok: &PromptTokenizer,
    req: &EnhanceRequest,
    on_event: &mut dyn FnMut(&EnhanceEvent) -> Control,
) -> Result<EnhanceOutput> {
    let started = Instant::now();
    req.validate()?;
    let template = tok.chat_template()?;
    let limit = req.context_limit.min(te.config().max_position_embeddings);
    // at least a quarter of the context stays for the prompt
    let max_new = req.max_new_tokens.min(limit - limit / 4);
    let (prompt_ids, truncated_from) = fit_prompt(tok, template, req, limit, max_new)?;
    let sampling = Sampling { temperature: req.temperature, top_p: req.top_p, seed: req.seed };
    let mut first_token = None;
    let mut shown = String::new();
    let mut on_token = |_id: u32, all: &[u32]| -> Control {
        let elapsed = started.elapsed();
        first_token.get_or_insert(elapsed);
        let Ok(text) = tok.decode(all) else { return Control::Continue };
        // hold back an incomplete UTF-8 sequence at the end
        let text = text.trim_end_matches('\u{FFFD}');
        let visible = visible_text(text);
        let delta = match visible.strip_prefix(shown.as_str()) {
            Some(d) => d.to_string(),
            None => String::new(),
        };
        shown.push_str(&delta);
        on_event(&EnhanceEvent { delta: &delta, new_tokens: all.len(), elapsed })
    };
    let (ids, finish) = generate_ids(te, &prompt_ids, &stop_ids(tok), max_new, &sampling, &mut on_token)?;
    let text = strip_think(&tok.decode(&ids)?);
    Ok(EnhanceOutput {
        text,
        finish,
        prompt_tokens: prompt_ids.len(),
        prompt_truncated_from: truncated_from,
        token_ids: ids,
        first_token: first_token.unwrap_or_else(|| started.elapsed()),
        total: started.elapsed(),
    })
}

/// The enhancer on its own: the text encoder (all layers) and the tokenizer, without the
/// transformer and the VAE (the CLI's `enhance` and `bench --enhance`).
pub struct Enhancer {
    te: TextEncoder,
    tok: PromptTokenizer,
    name: String,
}

impl Enhancer {
    /// Loads the text encoder and tokenizer of `source` in `dtype` on `device`.
    pub fn load(source: &crate::loader::ModelSource, device: &candle_core::Device, dtype: DType) -> Result<Self> {
        use crate::loader::ModelSource;
        let from_files = |files: &crate::loader::ModelFiles, name: &str| -> Result<Self> {
            let cfg: crate::config::TextEncoderConfig = crate::loader::read_config(&files.text_encoder.config)?;
            let (vb, problems) = crate::weights::checked_var_builder(&files.text_encoder.weights, dtype, device)?;
            let te = TextEncoder::new(&cfg, vb);
            crate::weights::ensure_no_problems("text_encoder", &problems)?;
            Ok(Self { te: te?, tok: PromptTokenizer::from_file(&files.tokenizer)?, name: name.to_string() })
        };
        match source {
            ModelSource::Tiny => Ok(Self {
                te: crate::tiny::text_encoder(device, dtype)?,
                tok: PromptTokenizer::tiny()?,
                name: crate::tiny::TINY_NAME.into(),
            }),
            ModelSource::RandomFullSize => {
                let mut cfg = crate::config::TextEncoderConfig::qwen3_4b();
                cfg.vocab_size = cfg.vocab_size.max(259);
                let te = TextEncoder::new(&cfg, crate::weights::device_random_var_builder(dtype, device))?;
                Ok(Self { te, tok: PromptTokenizer::tiny()?, name: "random".into() })
            }
            ModelSource::Dir(dir) => from_files(&crate::loader::ModelFiles::from_dir(dir)?, &dir.display().to_string()),
            ModelSource::Hub(id) => from_files(&crate::loader::resolve_hub_model(id)?, id),
        }
    }

    pub fn text_encoder(&self) -> &TextEncoder {
        &self.te
    }
    /// For switching CUDA graphs off and on (`bench --enhance` compares the two).
    pub fn text_encoder_mut(&mut self) -> &mut TextEncoder {
        &mut self.te
    }
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tok
    }
    pub fn model_name(&self) -> &str {
        &self.name
    }

    pub fn enhance(&self, req: &EnhanceRequest, on_event: &mut dyn FnMut(&EnhanceEvent) -> Control) -> Result<EnhanceOutput> {
        enhance(&self.te, &self.tok, req, on_event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn fixture_json() -> serde_json::Value {
        let p = fixtures().join("enhancer.json");
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}: run scripts/make_fixtures.py", p.display()))).unwrap()
    }

    fn fixture_model() -> (TextEncoder, PromptTokenizer) {
        let dir = fixtures().join("tiny_model");
        let cfg: crate::config::TextEncoderConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("text_encoder/config.json")).unwrap()).unwrap();
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("text_encoder/model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
        let te = TextEncoder::new(&cfg, vb).unwrap();
        assert!(te.has_lm_head());
        (te, PromptTokenizer::from_file(dir.join("tokenizer/tokenizer.json")).unwrap())
    }

    fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    }

    #[test]
    fn greedy_generation_matches_transformers_token_for_token() {
        let exp = fixture_json();
        let (te, tok) = fixture_model();
        let template = tok.chat_template().unwrap();
        for case in exp["cases"].as_array().unwrap() {
            let system = case["system"].as_str().unwrap();
            let req = EnhanceRequest { prompt: case["prompt"].as_str().unwrap().into(), system: Some(system.into()), ..Default::default() };
            let text = template.render(&req.messages(&req.prompt), false).unwrap();
            assert_eq!(text, case["chat"].as_str().unwrap(), "rendered chat template");
            let prompt_ids = tok.encode_raw(&text).unwrap();
            assert_eq!(prompt_ids, ids(&case["input_ids"]));
            let want = ids(&case["generated_ids"]);
            let max_new = case["max_new_tokens"].as_u64().unwrap() as usize;
            let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
            let (got, finish) = generate_ids(&te, &prompt_ids, &stop_ids(&tok), max_new, &greedy, &mut |_, _| Control::Continue).unwrap();
            // transformers' output includes the stop token when it stopped on one
            let stopped = want.last().is_some_and(|id| stop_ids(&tok).contains(id));
            let want_new: Vec<u32> = if stopped { want[..want.len() - 1].to_vec() } else { want.clone() };
            assert_eq!(got, want_new, "case {}", case["name"]);
            assert_eq!(finish == FinishReason::Stop, stopped);
        }
    }

    #[test]
    fn prefill_logits_match_transformers() {
        let exp = fixture_json();
        let (te, _) = fixture_model();
        let case = &exp["cases"][0];
        let mut cache = KvCache::default();
        let got: Vec<f32> = te.lm_step(&ids(&case["input_ids"]), &mut cache).unwrap().to_vec1().unwrap();
        let want: Vec<f32> = case["first_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-3, "max abs logit error {err}");
    }

    #[test]
    fn cached_decoding_equals_one_full_pass() {
        let (te, _) = fixture_model();
        let ids: Vec<u32> = b"a small test of the cache".iter().map(|&b| b as u32).collect();
        let mut full = KvCache::default();
        let a: Vec<f32> = te.lm_step(&ids, &mut full).unwrap().to_vec1().unwrap();
        let mut inc = KvCache::default();
        te.lm_step(&ids[..10], &mut inc).unwrap();
        te.lm_step(&ids[10..20], &mut inc).unwrap();
        let mut last = None;
        for &id in &ids[20..] {
            last = Some(te.lm_step(&[id], &mut inc).unwrap());
        }
        let b: Vec<f32> = last.unwrap().to_vec1().unwrap();
        assert_eq!(inc.len(), ids.len());
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-4, "{err}");
    }

    #[test]
    fn sampling_is_reproducible_per_seed() {
        let (te, tok) = fixture_model();
        let run = |seed: u64, temperature: f32| {
            let req = EnhanceRequest { prompt: "a fox".into(), system: Some(String::new()), max_new_tokens: 24, temperature, top_p: 0.95, seed, ..Default::default() };
            enhance(&te, &tok, &req, &mut |_| Control::Continue).unwrap().token_ids
        };
        // the random tiny model is peaked: a high temperature spreads its draws
        let a = run(7, 3.0);
        assert_eq!(a, run(7, 3.0));
        assert_ne!(a, run(8, 3.0), "another seed should draw other tokens");
        // temperature 0 ignores the seed
        assert_eq!(run(1, 0.0), run(2, 0.0));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = Tensor::new(&[0.0f32, 10.0, 9.0, -5.0], &Device::Cpu).unwrap();
        let mut rng = Rng::new(1);
        let s = Sampling { temperature: 1.0, top_p: 0.5, seed: 1 };
        for _ in 0..50 {
            assert_eq!(pick_token(&logits, &s, &mut rng).unwrap(), 1);
        }
        let s = Sampling { temperature: 1.0, top_p: 0.99, seed: 1 };
        let drawn: std::collections::HashSet<u32> = (0..200).map(|_| pick_token(&logits, &s, &mut rng).unwrap()).collect();
        assert_eq!(drawn, [1, 2].into_iter().collect());
        let s = Sampling { temperature: 0.0, top_p: 1.0, seed: 1 };
        assert_eq!(pick_token(&logits, &s, &mut rng).unwrap(), 1);
    }

    #[test]
    fn a_prompt_at_the_context_limit_is_cut_not_a_crash() {
        let (te, tok) = fixture_model();
        let req = EnhanceRequest { prompt: "word ".repeat(400), system: Some(String::new()), max_new_tokens: 8, context_limit: 120, ..Default::default() };
        let out = enhance(&te, &tok, &req, &mut |_| Control::Continue).unwrap();
        assert!(out.prompt_tokens + out.token_ids.len() <= 120, "{} + {}", out.prompt_tokens, out.token_ids.len());
        assert!(out.prompt_tokens > 100, "the cut keeps as much as fits: {}", out.prompt_tokens);
        assert!(out.prompt_truncated_from.unwrap() > 2000);
        assert!(out.truncation_note().unwrap().contains("cut"));
        // exactly at the limit: not cut
        let fits = EnhanceRequest { prompt: "abc".into(), system: Some(String::new()), max_new_tokens: 4, context_limit: 200, ..Default::default() };
        let out = enhance(&te, &tok, &fits, &mut |_| Control::Continue).unwrap();
        let exact = EnhanceRequest { context_limit: out.prompt_tokens + 4, ..fits.clone() };
        assert_eq!(enhance(&te, &tok, &exact, &mut |_| Control::Continue).unwrap().prompt_truncated_from, None);
        let over = EnhanceRequest { context_limit: out.prompt_tokens + 3, ..fits };
        assert!(enhance(&te, &tok, &over, &mut |_| Control::Continue).unwrap().prompt_truncated_from.is_some());
        // instructions longer than the context: a clear error
        let tiny_ctx = EnhanceRequest { prompt: "x".into(), context_limit: 40, max_new_tokens: 8, ..Default::default() };
        assert!(matches!(enhance(&te, &tok, &tiny_ctx, &mut |_| Control::Continue), Err(Error::InvalidRequest(m)) if m.contains("context")));
    }

    #[test]
    fn streaming_deltas_add_up_and_cancel_stops() {
        let (te, tok) = fixture_model();
        let req = EnhanceRequest { prompt: "a fox".into(), max_new_tokens: 30, temperature: 0.8, seed: 3, ..Default::default() };
        let mut streamed = String::new();
        let mut events = 0;
        let out = enhance(&te, &tok, &req, &mut |e| {
            streamed.push_str(e.delta);
            events += 1;
            Control::Continue
        })
        .unwrap();
        assert_eq!(events, out.token_ids.len());
        assert_eq!(streamed.trim(), out.text);
        let mut n = 0;
        let r = enhance(&te, &tok, &req, &mut |_| {
            n += 1;
            if n == 3 { Control::Cancel } else { Control::Continue }
        });
        assert!(matches!(r, Err(Error::Cancelled)));
        assert_eq!(n, 3);
    }

    #[test]
    fn think_blocks_are_removed() {
        assert_eq!(strip_think("<think>\nplan\n</think>\n\nA red fox."), "A red fox.");
        assert_eq!(strip_think("A <think>x</think>fox"), "A fox");
        assert_eq!(strip_think("<think>never closed"), "");
        assert_eq!(visible_text("<think>\n\n</think>\n\nA fox"), "A fox");
        assert_eq!(visible_text("<think>still thinking"), "");
        assert_eq!(visible_text("<thi"), "");
        assert_eq!(visible_text("  A fox"), "A fox");
    }

    #[test]
    fn requests_are_validated_and_the_system_message_is_optional() {
        let ok = EnhanceRequest { prompt: "a cat".into(), ..Default::default() };
        assert!(ok.validate().is_ok());
        for bad in [
            EnhanceRequest { prompt: "  ".into(), ..ok.clone() },
            EnhanceRequest { max_new_tokens: 0, ..ok.clone() },
            EnhanceRequest { temperature: -1.0, ..ok.clone() },
            EnhanceRequest { top_p: 0.0, ..ok.clone() },
            EnhanceRequest { top_p: f32::NAN, ..ok.clone() },
        ] {
            assert!(matches!(bad.validate(), Err(Error::InvalidRequest(_))), "{bad:?}");
        }
        assert_eq!(ok.messages("a cat")[0].content, DEFAULT_SYSTEM_PROMPT.trim());
        let none = EnhanceRequest { system: Some(String::new()), ..ok };
        assert_eq!(none.messages("a cat"), vec![ChatMessage::new("user", "a cat")]);
    }

    #[test]
    fn the_tiny_model_enhances_and_a_checkpoint_without_the_last_layer_says_why() {
        let p = crate::pipeline::Pipeline::tiny(&Device::Cpu, DType::F32).unwrap();
        let req = EnhanceRequest { prompt: "a cat".into(), max_new_tokens: 5, ..Default::default() };
        let out = p.enhance(&req, &mut |_| Control::Continue).unwrap();
        match out.finish {
            FinishReason::Length => assert_eq!(out.token_ids.len(), 5),
            FinishReason::Stop => assert!(out.token_ids.len() < 5),
        }
        assert!(out.prompt_tokens > DEFAULT_SYSTEM_PROMPT.len(), "the byte tokenizer: one id per byte of the system prompt at least");
        let (te, _) = fixture_model();
        let cfg = te.config().clone();
        let weights: std::collections::HashMap<String, Tensor> =
            candle_core::safetensors::load(fixtures().join("tiny_model/text_encoder/model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_iter()
                .filter(|(k, _)| k != "norm.weight")
                .collect();
        let te = TextEncoder::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap();
        assert!(!te.has_lm_head());
        assert!(matches!(te.lm_step(&[1, 2], &mut KvCache::default()), Err(Error::InvalidRequest(m)) if m.contains("last layer")));
    }
}
