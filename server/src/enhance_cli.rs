//! `zimage enhance` (one prompt rewritten into a detailed image prompt, the text alone on stdout)
//! and `zimage bench --enhance` (new tokens per second and first-token latency, as JSON).

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::enhancer::{EnhanceRequest, Enhancer, Sampling};
use engine::pipeline::Control;
use serde::Serialize;

#[derive(Args)]
pub struct EnhanceArgs {
    /// `tiny`, `random`, a diffusers-layout folder or a hub id (its text encoder and tokenizer
    /// are loaded; default: as `generate`).
    #[arg(long)]
    model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The short idea to rewrite.
    #[arg(long)]
    prompt: String,
    /// The system message; default: our image-prompt instructions; "" for none.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = engine::enhancer::DEFAULT_MAX_NEW_TOKENS)]
    max_new_tokens: usize,
    /// 0: greedy (the same text every time).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.8)]
    top_p: f32,
    /// Sampling seed (same seed, same text). Default: random (printed on stderr).
    #[arg(long)]
    seed: Option<u64>,
    /// Prompt + new tokens stay within this; a longer prompt is cut (with a note on stderr).
    #[arg(long, default_value_t = engine::enhancer::DEFAULT_CONTEXT_LIMIT)]
    context_limit: usize,
}

fn load(model: Option<&str>, device_spec: &str) -> Result<(Enhancer, candle_core::Device)> {
    let device = crate::pick_device(device_spec)?;
    let source = match model {
        Some(m) => engine::loader::ModelSource::parse(m),
        None => engine::loader::ModelSource::default_source(!device.is_cpu()),
    };
    crate::web::startup::download_if_missing(&source, &|_| {})?;
    let t = Instant::now();
    let enhancer = Enhancer::load(&source, &device, engine::pipeline::default_dtype(&device))
        .with_context(|| format!("cannot load the text encoder of {}", source.display_name()))?;
    eprintln!("model: {} (text encoder) on {:?}, loaded in {:.2?}", source.display_name(), device, t.elapsed());
    Ok((enhancer, device))
}

pub fn enhance(a: EnhanceArgs) -> Result<()> {
    let seed = a.seed.unwrap_or_else(crate::rand_seed);
    let req = EnhanceRequest {
        prompt: a.prompt.clone(),
        system: a.system.clone(),
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed,
        context_limit: a.context_limit,
    };
    req.validate()?;
    let (enhancer, _) = load(a.model.as_deref(), &a.device)?;
    if enhancer.model_name() == engine::tiny::TINY_NAME {
        eprintln!("note: the tiny model has random weights; its text is gibberish");
    }
    let out = enhancer.enhance(&req, &mut |_| Control::Continue)?;
    if let Some(note) = out.truncation_note() {
        eprintln!("warning: {note}");
    }
    let decode_s = out.total.saturating_sub(out.first_token).as_secs_f64();
    eprintln!(
        "seed {seed}: {} prompt tokens, {} new tokens ({:?}), first token {:.0?}, {:.1} tokens/s",
        out.prompt_tokens,
        out.token_ids.len(),
        out.finish,
        out.first_token,
        if decode_s > 0.0 { out.token_ids.len().saturating_sub(1) as f64 / decode_s } else { 0.0 }
    );
    println!("{}", out.text);
    Ok(())
}

#[derive(Serialize)]
struct EnhanceRun {
    prompt_tokens: usize,
    new_tokens: usize,
    /// From the call (template, tokenizing, prefill) to the first new token on the host.
    first_token_ms: f64,
    /// New tokens after the first, per second of decoding.
    decode_tokens_per_s: f64,
}

#[derive(Serialize)]
struct EnhanceReport {
    model: String,
    device: String,
    dtype: String,
    /// Bytes of weights one decode step reads (every layer + the LM head): the memory-bound
    /// limit is the device's bandwidth divided by this.
    weight_bytes_per_token: u64,
    runs: Vec<EnhanceRun>,
    median_first_token_ms: f64,
    median_decode_tokens_per_s: f64,
    /// The same greedy run without CUDA graphs: tokens/s, and how many leading tokens agree with
    /// the graph replays' (all of them when the replays compute what the eager steps compute).
    eager_decode_tokens_per_s: f64,
    eager_tokens_agreeing: usize,
}

/// `bench --enhance`: greedy decoding of `new_tokens` tokens (stop tokens ignored, so every run
/// decodes the same count) after the templated `prompt` without a system message.
pub fn bench(model: &str, device_spec: &str, prompt: &str, new_tokens: usize, runs: usize, out: Option<&std::path::Path>) -> Result<()> {
    let (mut enhancer, device) = load(Some(model), device_spec)?;
    let te = enhancer.text_encoder();
    let tok = enhancer.tokenizer();
    let cfg = te.config();
    let (h, i, hd) = (cfg.hidden_size as u64, cfg.intermediate_size as u64, cfg.head_dim() as u64);
    let per_layer = h * hd * (cfg.num_attention_heads as u64 * 2 + cfg.num_key_value_heads as u64 * 2) + 3 * h * i;
    let params = per_layer * cfg.num_hidden_layers as u64 + cfg.vocab_size as u64 * h;
    let weight_bytes_per_token = params * te.dtype().size_in_bytes() as u64;
    let req = EnhanceRequest { prompt: prompt.into(), system: Some(String::new()), ..Default::default() };
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
    let t = Instant::now();
    let prompt_ids = tok.encode_raw(&tok.chat_template()?.render(&req.messages(prompt), false)?)?;
    let template_ms = t.elapsed();
    // One greedy generation: its ids, the time to the first token (the template and tokenizing
    // included, as a request sees it) and the decoding rate after it.
    let generate = |te: &engine::text_encoder::TextEncoder| -> Result<(Vec<u32>, std::time::Duration, f64)> {
        let t = Instant::now();
        let mut first = None;
        let mut on_token = |_: u32, _: &[u32]| {
            first.get_or_insert(t.elapsed() + template_ms);
            Control::Continue
        };
        let (got, _) = engine::enhancer::generate_ids(te, &prompt_ids, &[], new_tokens, &greedy, &mut on_token)?;
        device.synchronize()?;
        let total = t.elapsed() + template_ms;
        let first = first.context("no token was generated")?;
        let rate = got.len().saturating_sub(1) as f64 / (total - first).as_secs_f64().max(1e-9);
        Ok((got, first, rate))
    };
    let mut results = Vec::new();
    let mut graph_ids = Vec::new();
    for r in 0..=runs {
        let (got, first, rate) = generate(te)?;
        let run = EnhanceRun {
            prompt_tokens: prompt_ids.len(),
            new_tokens: got.len(),
            first_token_ms: first.as_secs_f64() * 1e3,
            decode_tokens_per_s: rate,
        };
        eprintln!("run {r}{}: {} prompt tokens, first token {:.1} ms, {:.1} tokens/s", if r == 0 { " (warm-up)" } else { "" }, run.prompt_tokens, run.first_token_ms, run.decode_tokens_per_s);
        graph_ids = got;
        if r > 0 {
            results.push(run);
        }
    }
    let dtype = format!("{:?}", te.dtype());
    // The same run with every step eager: the replays' tokens must be the eager steps' tokens.
    enhancer.text_encoder_mut().set_cuda_graphs(false);
    let (eager_ids, _, eager_rate) = generate(enhancer.text_encoder())?;
    enhancer.text_encoder_mut().set_cuda_graphs(true);
    let agreeing = graph_ids.iter().zip(&eager_ids).take_while(|(a, b)| a == b).count();
    eprintln!("without CUDA graphs: {eager_rate:.1} tokens/s; {agreeing} of {} tokens agree with the replays", graph_ids.len());
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let report = EnhanceReport {
        model: enhancer.model_name().to_string(),
        device: format!("{device:?}"),
        dtype,
        weight_bytes_per_token,
        median_first_token_ms: median(results.iter().map(|r| r.first_token_ms).collect()),
        median_decode_tokens_per_s: median(results.iter().map(|r| r.decode_tokens_per_s).collect()),
        runs: results,
        eager_decode_tokens_per_s: eager_rate,
        eager_tokens_agreeing: agreeing,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(p) = out {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
