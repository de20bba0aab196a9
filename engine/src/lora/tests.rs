//! LoRA tests on the tiny model: every key layout lands on the right rows of the right layer with
//! the right alpha, several files add up (negative scales too), bad files are refused with their
//! reasons, and reverting gives back the exact base weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::pipeline::{Control, GenerateRequest};

/// A safetensors file of f32 tensors with optional metadata (written by hand: the engine's
/// safetensors crate and candle's differ in version).
fn write_st(path: &Path, tensors: &[(&str, &Tensor)], meta: &[(&str, &str)]) {
    let mut header = serde_json::Map::new();
    if !meta.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = meta.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
        header.insert("__metadata__".into(), m.into());
    }
    let mut data: Vec<u8> = vec![];
    for (name, t) in tensors {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let start = data.len();
        for x in v {
            data.extend(x.to_le_bytes());
        }
        header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}));
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// A scratch file removed when the test ends, so repeated runs do not fill the disk.
struct ScratchFile(PathBuf);

impl std::ops::Deref for ScratchFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp(name: &str) -> ScratchFile {
    let d = std::env::temp_dir().join(format!("zimage-lora-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    ScratchFile(d.join(name))
}

fn randn(r: usize, c: usize, seed: u64) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let v: Vec<f32> = (0..r * c).map(|_| 0.1 * rng.normal()).collect();
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

fn tiny() -> ZImageTransformer {
    crate::pipeline::Pipeline::tiny(&Device::Cpu, DType::F32).unwrap().transformer_snapshot()
}

fn layer(t: &mut ZImageTransformer, name: &str) -> Tensor {
    t.named_linears_mut().into_iter().find(|n| n.layer == name).unwrap_or_else(|| panic!("no layer {name}")).linear.weight_f32().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Tiny dims: dim 64, 2 heads of 32 (q, k, v 64 rows each), ffn hidden from the config.
fn dims() -> (usize, usize) {
    let cfg = crate::tiny::transformer_config();
    (cfg.dim, cfg.ffn_hidden())
}

#[test]
fn targets_name_every_layer_of_the_model_with_its_rows() {
    let cfg = crate::tiny::transformer_config();
    let names = targets(&cfg);
    let mut t = tiny();
    for nl in t.named_linears_mut() {
        let w = nl.linear.weight_f32().unwrap();
        let (rows, cols) = w.dims2().unwrap();
        let mut covered = 0;
        for part in &nl.parts {
            let tg = names.get(part).unwrap_or_else(|| panic!("{part} has no target"));
            assert_eq!((tg.layer.as_str(), tg.row, tg.cols), (nl.layer.as_str(), covered, cols), "{part}");
            assert_eq!(names.get(&part.replace('.', "_")), Some(tg), "kohya name of {part}");
            covered += tg.rows;
        }
        assert_eq!(covered, rows, "{}", nl.layer);
    }
}

#[test]
fn every_key_layout_patches_the_right_rows_with_its_alpha() {
    let (dim, hidden) = dims();
    let r = 4;
    // (file keys, alpha tensor?, metadata, the layer, row offset, rows, expected alpha/rank)
    let a = randn(r, dim, 1);
    let b = randn(dim, r, 2);
    let alpha = Tensor::new(&[2.0f32], &Device::Cpu).unwrap();
    let peft_meta = r#"{"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"layers.1.attention.to_k": 1}}"#;
    let cases: Vec<(Vec<(String, Tensor)>, Vec<(&str, &str)>, &str, usize, f32)> = vec![
        // diffusers with metadata alpha 8 / rank 4
        (vec![("transformer.layers.0.attention.to_k.lora_A.weight".into(), a.clone()), ("transformer.layers.0.attention.to_k.lora_B.weight".into(), b.clone())], vec![("lora_adapter_metadata", peft_meta)], "layers.0.attention.to_qkv", dim, 2.0),
        // alpha_pattern overrides lora_alpha for that module
        (vec![("transformer.layers.1.attention.to_k.lora_A.weight".into(), a.clone()), ("transformer.layers.1.attention.to_k.lora_B.weight".into(), b.clone())], vec![("lora_adapter_metadata", peft_meta)], "layers.1.attention.to_qkv", dim, 0.25),
        // bare PEFT keys, no alpha anywhere: alpha = rank
        (vec![("layers.0.attention.to_v.lora_A.weight".into(), a.clone()), ("layers.0.attention.to_v.lora_B.weight".into(), b.clone())], vec![], "layers.0.attention.to_qkv", 2 * dim, 1.0),
        // transformer. keys with .alpha tensors (diffusers fails on these)
        (vec![("transformer.noise_refiner.0.attention.to_q.lora_A.weight".into(), a.clone()), ("transformer.noise_refiner.0.attention.to_q.lora_B.weight".into(), b.clone()), ("transformer.noise_refiner.0.attention.to_q.alpha".into(), alpha.clone())], vec![], "noise_refiner.0.attention.to_qkv", 0, 0.5),
        // ai-toolkit: diffusion_model., adaLN_modulation, no alpha
        (vec![("diffusion_model.layers.1.adaLN_modulation.0.lora_A.weight".into(), randn(r, cfg_ada(), 3)), ("diffusion_model.layers.1.adaLN_modulation.0.lora_B.weight".into(), randn(4 * dim, r, 4))], vec![], "layers.1.adaLN_modulation.0", 0, 1.0),
        // kohya: underscores inside names, lora_down/up + alpha; w3 is the second half of w1|w3
        (vec![("lora_unet_context_refiner_0_feed_forward_w3.lora_down.weight".into(), a.clone()), ("lora_unet_context_refiner_0_feed_forward_w3.lora_up.weight".into(), randn(hidden, r, 5)), ("lora_unet_context_refiner_0_feed_forward_w3.alpha".into(), alpha.clone())], vec![], "context_refiner.0.feed_forward.w13", hidden, 0.5),
        // kohya to_out_0
        (vec![("lora_unet_layers_0_attention_to_out_0.lora_down.weight".into(), a.clone()), ("lora_unet_layers_0_attention_to_out_0.lora_up.weight".into(), b.clone())], vec![], "layers.0.attention.to_out.0", 0, 1.0),
        // ComfyUI's attention.out
        (vec![("diffusion_model.layers.1.attention.out.lora_A.weight".into(), a.clone()), ("diffusion_model.layers.1.attention.out.lora_B.weight".into(), b.clone())], vec![], "layers.1.attention.to_out.0", 0, 1.0),
    ];
    for (i, (keys, meta, layer_name, row, factor)) in cases.into_iter().enumerate() {
        let path = tmp(&format!("case{i}.safetensors"));
        let refs: Vec<(&str, &Tensor)> = keys.iter().map(|(k, t)| (k.as_str(), t)).collect();
        write_st(&path, &refs, &meta);
        let file = LoraFile::read(&path).unwrap();
        let mut t = tiny();
        let base = layer(&mut t, layer_name);
        let report = merge_into(&mut t, &[(&file, 1.5)]).unwrap();
        assert_eq!(report.layers, 1, "case {i}");
        assert!(report.warnings.is_empty(), "case {i}: {:?}", report.warnings);
        let got = layer(&mut t, layer_name);
        let down = &keys.iter().find(|(k, _)| k.contains("lora_A") || k.contains("lora_down")).unwrap().1;
        let up = &keys.iter().find(|(k, _)| k.contains("lora_B") || k.contains("lora_up")).unwrap().1;
        let delta = (up.matmul(down).unwrap() * (1.5 * factor) as f64).unwrap();
        let total = base.dim(0).unwrap();
        let want = (&base + delta.pad_with_zeros(0, row, total - row - delta.dim(0).unwrap()).unwrap()).unwrap();
        let err = max_diff(&got, &want);
        assert!(err < 1e-6, "case {i} ({layer_name}): {err}");
        // and something changed, by the expected amount
        assert!(max_diff(&got, &base) > 1e-3, "case {i}: unchanged");
    }
}

fn cfg_ada() -> usize {
    crate::tiny::transformer_config().adaln_dim()
}

#[test]
fn fused_qkv_keys_split_by_rows_and_block_diagonal_up_is_exact() {
    let (dim, _) = dims();
    let r = 2;
    // musubi converted: down (3r, in) stacked, up block-diagonal (3 dim, 3r), alpha x3
    let downs: Vec<Tensor> = (0..3).map(|i| randn(r, dim, 10 + i)).collect();
    let ups: Vec<Tensor> = (0..3).map(|i| randn(dim, r, 20 + i)).collect();
    let down = Tensor::cat(&downs, 0).unwrap();
    let mut up = Tensor::zeros((3 * dim, 3 * r), DType::F32, &Device::Cpu).unwrap();
    for i in 0..3 {
        up = (up + ups[i].pad_with_zeros(0, i * dim, (2 - i) * dim).unwrap().pad_with_zeros(1, i * r, (2 - i) * r).unwrap()).unwrap();
    }
    let alpha = Tensor::new(&[3.0f32 * 1.0], &Device::Cpu).unwrap(); // per-part alpha 1, rank 2
    let p = tmp("qkv_kohya.safetensors");
    write_st(&p, &[("lora_unet_layers_0_attention_qkv.lora_down.weight", &down), ("lora_unet_layers_0_attention_qkv.lora_up.weight", &up), ("lora_unet_layers_0_attention_qkv.alpha", &alpha)], &[]);
    let fused = LoraFile::read(&p).unwrap();
    // the same LoRA as three separate kohya modules with alpha 1
    let one = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
    let names = ["to_q", "to_k", "to_v"];
    let mut sep: Vec<(String, Tensor)> = vec![];
    for i in 0..3 {
        sep.push((format!("lora_unet_layers_0_attention_{}.lora_down.weight", names[i]), downs[i].clone()));
        sep.push((format!("lora_unet_layers_0_attention_{}.lora_up.weight", names[i]), ups[i].clone()));
        sep.push((format!("lora_unet_layers_0_attention_{}.alpha", names[i]), one.clone()));
    }
    let p2 = tmp("qkv_sep.safetensors");
    write_st(&p2, &sep.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>(), &[]);
    let separate = LoraFile::read(&p2).unwrap();
    // ComfyUI attention.qkv: shared A (r, in), B (3 dim, r), rows q|k|v
    let a = randn(r, dim, 30);
    let b = randn(3 * dim, r, 31);
    let p3 = tmp("qkv_comfy.safetensors");
    write_st(&p3, &[("diffusion_model.layers.0.attention.qkv.lora_A.weight", &a), ("diffusion_model.layers.0.attention.qkv.lora_B.weight", &b)], &[]);
    let comfy = LoraFile::read(&p3).unwrap();

    let mut t1 = tiny();
    let mut t2 = tiny();
    let mut t3 = tiny();
    let base = layer(&mut t1, "layers.0.attention.to_qkv");
    merge_into(&mut t1, &[(&fused, 1.0)]).unwrap();
    merge_into(&mut t2, &[(&separate, 1.0)]).unwrap();
    merge_into(&mut t3, &[(&comfy, -0.5)]).unwrap();
    let (w1, w2, w3) = (layer(&mut t1, "layers.0.attention.to_qkv"), layer(&mut t2, "layers.0.attention.to_qkv"), layer(&mut t3, "layers.0.attention.to_qkv"));
    assert!(max_diff(&w1, &w2) < 1e-6);
    assert!(max_diff(&w1, &base) > 1e-3);
    let want3 = (&base + (b.matmul(&a).unwrap() * -0.5).unwrap()).unwrap();
    assert!(max_diff(&w3, &want3) < 1e-6);
}

#[test]
fn several_files_add_up_with_negative_scales_and_rslora() {
    let (dim, _) = dims();
    let (a1, b1, a2, b2) = (randn(4, dim, 40), randn(dim, 4, 41), randn(8, dim, 42), randn(dim, 8, 43));
    let p1 = tmp("sum1.safetensors");
    write_st(&p1, &[("transformer.layers.0.feed_forward.w2.lora_A.weight", &a1.pad_with_zeros(1, 0, dims().1 - dim).unwrap()), ("transformer.layers.0.feed_forward.w2.lora_B.weight", &b1)], &[("lora_adapter_metadata", r#"{"r": 4, "lora_alpha": 4, "use_rslora": true}"#)]);
    let p2 = tmp("sum2.safetensors");
    write_st(&p2, &[("diffusion_model.layers.0.feed_forward.w2.lora_A.weight", &a2.pad_with_zeros(1, 0, dims().1 - dim).unwrap()), ("diffusion_model.layers.0.feed_forward.w2.lora_B.weight", &b2)], &[]);
    let (f1, f2) = (LoraFile::read(&p1).unwrap(), LoraFile::read(&p2).unwrap());
    assert!((f1.adapters[0].factor() - 2.0).abs() < 1e-6, "rsLoRA: 4 / sqrt(4)");
    let mut t = tiny();
    let base = layer(&mut t, "layers.0.feed_forward.w2");
    merge_into(&mut t, &[(&f1, 0.7), (&f2, -1.2)]).unwrap();
    let got = layer(&mut t, "layers.0.feed_forward.w2");
    let pad = |x: &Tensor| x.pad_with_zeros(1, 0, dims().1 - dim).unwrap();
    let want = ((&base + (b1.matmul(&pad(&a1)).unwrap() * (0.7 * 2.0)).unwrap()).unwrap() + (b2.matmul(&pad(&a2)).unwrap() * -1.2).unwrap()).unwrap();
    assert!(max_diff(&got, &want) < 1e-6);
}

/// LoHa and LoKr against element-by-element loops (the NumPy reference of the same formulas is in
/// scripts/make_fixtures.py's LyCORIS section when present).
#[test]
fn loha_and_lokr_are_exact() {
    let (dim, _) = dims();
    let r = 3;
    let (w1a, w1b, w2a, w2b) = (randn(dim, r, 50), randn(r, dim, 51), randn(dim, r, 52), randn(r, dim, 53));
    let alpha = Tensor::new(&[1.5f32], &Device::Cpu).unwrap();
    let p = tmp("loha.safetensors");
    write_st(&p, &[("lycoris_layers_1_attention_to_out_0.hada_w1_a", &w1a), ("lycoris_layers_1_attention_to_out_0.hada_w1_b", &w1b), ("lycoris_layers_1_attention_to_out_0.hada_w2_a", &w2a), ("lycoris_layers_1_attention_to_out_0.hada_w2_b", &w2b), ("lycoris_layers_1_attention_to_out_0.alpha", &alpha)], &[]);
    let loha = LoraFile::read(&p).unwrap();
    let mut t = tiny();
    let base = layer(&mut t, "layers.1.attention.to_out.0");
    merge_into(&mut t, &[(&loha, 0.8)]).unwrap();
    let got: Vec<Vec<f32>> = (layer(&mut t, "layers.1.attention.to_out.0") - &base).unwrap().to_vec2().unwrap();
    let v = |x: &Tensor| -> Vec<Vec<f32>> { x.to_vec2().unwrap() };
    let (a1, b1, a2, b2) = (v(&w1a), v(&w1b), v(&w2a), v(&w2b));
    for i in 0..dim {
        for j in 0..dim {
            let p1: f32 = (0..r).map(|k| a1[i][k] * b1[k][j]).sum();
            let p2: f32 = (0..r).map(|k| a2[i][k] * b2[k][j]).sum();
            let want = 0.8 * (1.5 / r as f32) * p1 * p2;
            assert!((got[i][j] - want).abs() < 1e-6, "LoHa [{i}][{j}] {} vs {want}", got[i][j]);
        }
    }
    // LoKr: w1 full (4, 8), w2 low-rank (16, 2) @ (2, 8) -> (64, 64), alpha / 2
    let w1 = randn(4, 8, 60);
    let (w2a, w2b) = (randn(dim / 4, 2, 61), randn(2, dim / 8, 62));
    let p = tmp("lokr.safetensors");
    write_st(&p, &[("lycoris_noise_refiner_0_attention_to_v.lokr_w1", &w1), ("lycoris_noise_refiner_0_attention_to_v.lokr_w2_a", &w2a), ("lycoris_noise_refiner_0_attention_to_v.lokr_w2_b", &w2b), ("lycoris_noise_refiner_0_attention_to_v.alpha", &alpha)], &[]);
    let lokr = LoraFile::read(&p).unwrap();
    let mut t = tiny();
    let base = layer(&mut t, "noise_refiner.0.attention.to_qkv");
    merge_into(&mut t, &[(&lokr, 1.0)]).unwrap();
    let got: Vec<Vec<f32>> = (layer(&mut t, "noise_refiner.0.attention.to_qkv") - &base).unwrap().to_vec2().unwrap();
    let (m1, a, b) = (v(&w1), v(&w2a), v(&w2b));
    let (c, d) = (dim / 4, dim / 8);
    for i in 0..3 * dim {
        for j in 0..dim {
            let want = if (2 * dim..3 * dim).contains(&i) {
                let (ii, jj) = (i - 2 * dim, j);
                let w2: f32 = (0..2).map(|k| a[ii % c][k] * b[k][jj % d]).sum();
                (1.5 / 2.0) * m1[ii / c][jj / d] * w2
            } else {
                0.0
            };
            assert!((got[i][j] - want).abs() < 1e-6, "LoKr [{i}][{j}] {} vs {want}", got[i][j]);
        }
    }
}

#[test]
fn bad_files_are_refused_with_their_reasons() {
    let (dim, _) = dims();
    let cfg = crate::tiny::transformer_config();
    let err = |p: &Path| -> String {
        match LoraFile::read(p).and_then(|f| f.match_model(&cfg).map(|_| ())) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("{} accepted", p.display()),
        }
    };
    // another architecture (an SDXL-style kohya LoRA): nothing matches; the file and keys are named
    let p = tmp("sdxl.safetensors");
    write_st(&p, &[("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", &randn(4, 320, 1)), ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", &randn(320, 4, 2))], &[]);
    let e = err(&p);
    assert!(e.contains("sdxl.safetensors") && e.contains("no module matches") && e.contains("down_blocks_0_attentions_0_proj_in"), "{e}");
    // same names, other widths (the full-size model's LoRA on the tiny one)
    let p = tmp("wide.safetensors");
    write_st(&p, &[("transformer.layers.0.attention.to_q.lora_A.weight", &randn(4, 3840, 1)), ("transformer.layers.0.attention.to_q.lora_B.weight", &randn(3840, 4, 2))], &[]);
    let e = err(&p);
    assert!(e.contains("another model") && e.contains("3840"), "{e}");
    // text encoder only
    let p = tmp("te.safetensors");
    write_st(&p, &[("lora_te_layers_0_self_attn_q_proj.lora_down.weight", &randn(4, dim, 1)), ("lora_te_layers_0_self_attn_q_proj.lora_up.weight", &randn(dim, 4, 2))], &[]);
    assert!(err(&p).contains("text encoder"), "{}", err(&p));
    // corrupt: truncated, garbage, header length beyond the file
    let good = tmp("good.safetensors");
    write_st(&good, &[("transformer.layers.0.attention.to_q.lora_A.weight", &randn(4, dim, 1)), ("transformer.layers.0.attention.to_q.lora_B.weight", &randn(dim, 4, 2))], &[]);
    let bytes = std::fs::read(&good).unwrap();
    let p = tmp("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert!(err(&p).contains("cannot read its tensors"), "{}", err(&p));
    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"PK\x03\x04 this is a zip file, not safetensors").unwrap();
    assert!(err(&p).contains("not a safetensors file"), "{}", err(&p));
    std::fs::write(&p, b"abc").unwrap();
    assert!(err(&p).contains("shorter than the 8-byte header"), "{}", err(&p));
    // partly matching: applied, with the rest listed
    let p = tmp("partial.safetensors");
    write_st(&p, &[("transformer.layers.0.attention.to_q.lora_A.weight", &randn(4, dim, 1)), ("transformer.layers.0.attention.to_q.lora_B.weight", &randn(dim, 4, 2)), ("transformer.layers.9.attention.to_q.lora_A.weight", &randn(4, dim, 1)), ("transformer.layers.9.attention.to_q.lora_B.weight", &randn(dim, 4, 2)), ("transformer.layers.0.attention.to_q.dora_scale", &randn(1, dim, 3))], &[]);
    let f = LoraFile::read(&p).unwrap();
    let mut t = tiny();
    let rep = merge_into(&mut t, &[(&f, 1.0)]).unwrap();
    assert_eq!(rep.layers, 1);
    let w = rep.warnings.join("\n");
    assert!(w.contains("layers.9.attention.to_q") && w.contains("dora_scale"), "{w}");
}

#[test]
fn patcher_switches_sets_and_reverts_to_the_exact_base() {
    let (dim, _) = dims();
    let mut pipe = crate::pipeline::Pipeline::tiny(&Device::Cpu, DType::F32).unwrap();
    let p = tmp("style.safetensors");
    write_st(&p, &[("transformer.layers.0.attention.to_q.lora_A.weight", &randn(4, dim, 7)), ("transformer.layers.0.attention.to_q.lora_B.weight", &(randn(dim, 4, 8) * 20.0).unwrap())], &[("modelspec.trigger_phrase", "zxc style, neon")]);
    let f = LoraFile::read(&p).unwrap();
    assert_eq!(f.trigger_words(5), vec!["zxc style", "neon"]);
    let req = GenerateRequest { prompt: "a lighthouse".into(), width: 64, height: 48, steps: 2, seed: 3, ..Default::default() };
    let gen = |pipe: &Pipeline| pipe.generate(&req, &mut |_| Control::Continue).unwrap().images[0].clone();
    let before = gen(&pipe);
    let mut patcher = LoraPatcher::new();
    let rep = patcher.set(&mut pipe, &[(&f, 1.0)]).unwrap();
    assert_eq!(rep.layers, 1);
    let with = gen(&pipe);
    assert_ne!(before, with, "the LoRA changes the image");
    // same set again: nothing to do
    assert_eq!(patcher.set(&mut pipe, &[(&f, 1.0)]).unwrap().layers, 0);
    // another scale: from the base, not stacked on the previous merge
    patcher.set(&mut pipe, &[(&f, -1.0)]).unwrap();
    patcher.set(&mut pipe, &[(&f, 1.0)]).unwrap();
    assert_eq!(gen(&pipe), with);
    patcher.revert(&mut pipe);
    assert_eq!(gen(&pipe), before);
    assert!(patcher.applied().is_empty());
    // a failing set leaves the base in place
    let bad = tmp("bad.safetensors");
    write_st(&bad, &[("transformer.layers.0.attention.to_q.lora_A.weight", &randn(4, 3840, 1)), ("transformer.layers.0.attention.to_q.lora_B.weight", &randn(3840, 4, 2))], &[]);
    let badf = LoraFile::read(&bad).unwrap();
    assert!(patcher.set(&mut pipe, &[(&badf, 1.0)]).is_err());
    assert_eq!(gen(&pipe), before);
    let _ = BTreeMap::<u8, u8>::new();
}

#[test]
fn quantized_layers_are_requantized_from_the_merged_weight() {
    for q in [crate::ops::Quantization::Fp8, crate::ops::Quantization::Int8] {
        quantized_merge(q);
    }
}

fn quantized_merge(q: crate::ops::Quantization) {
    let (dim, _) = dims();
    let mut pipe = crate::pipeline::Pipeline::tiny(&Device::Cpu, DType::F32).unwrap();
    pipe.quantize(q).unwrap();
    let p = tmp("fp8.safetensors");
    let (a, b) = (randn(4, dim, 70), randn(dim, 4, 71));
    write_st(&p, &[("transformer.layers.0.attention.to_out.0.lora_A.weight", &a), ("transformer.layers.0.attention.to_out.0.lora_B.weight", &b)], &[]);
    let f = LoraFile::read(&p).unwrap();
    let mut t = pipe.transformer_snapshot();
    let base = layer(&mut t, "layers.0.attention.to_out.0");
    merge_into(&mut t, &[(&f, 1.0)]).unwrap();
    let got = layer(&mut t, "layers.0.attention.to_out.0");
    let merged = (&base + b.matmul(&a).unwrap()).unwrap();
    let rel = crate::fp8::relative_l2(&got, &merged).unwrap();
    assert!(rel < 4e-2 && rel > 0.0, "{} of the merged weight: {rel}", q.name());
    // closer to the merged weight than the unmerged base is
    assert!(rel < crate::fp8::relative_l2(&base, &merged).unwrap() / 4.0, "{}", q.name());
    assert_eq!(t.quantization(), q);
}

/// With the dense weights kept in host memory, merging into a quantized model is exactly
/// merge-then-quantize (what the CLI does); without them it merges into the dequantized weight.
#[test]
fn kept_dense_weights_make_a_quantized_merge_exactly_merge_then_quantize() {
    let (dim, _) = dims();
    let p = tmp("kept.safetensors");
    let (a, b) = (randn(4, dim, 80), randn(dim, 4, 81));
    write_st(&p, &[("transformer.layers.0.attention.to_out.0.lora_A.weight", &a), ("transformer.layers.0.attention.to_out.0.lora_B.weight", &b)], &[]);
    let f = LoraFile::read(&p).unwrap();
    let name = "layers.0.attention.to_out.0";
    for q in [crate::ops::Quantization::Fp8, crate::ops::Quantization::Int8] {
        // the reference: merge into the dense model, then quantize
        let mut want = tiny();
        merge_into(&mut want, &[(&f, 1.0)]).unwrap();
        want.quantize(q).unwrap();
        let want = layer(&mut want, name);
        // quantized first with the dense weights kept, then merged
        let mut kept = tiny();
        kept.keep_dense(&Device::Cpu).unwrap();
        kept.quantize(q).unwrap();
        merge_into(&mut kept, &[(&f, 1.0)]).unwrap();
        let got = layer(&mut kept, name);
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{}: merged from the kept dense weight", q.name());
        // without them the merge starts from the dequantized weight: not the same
        let mut lossy = tiny();
        lossy.quantize(q).unwrap();
        merge_into(&mut lossy, &[(&f, 1.0)]).unwrap();
        let diff = (&layer(&mut lossy, name) - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 0.0, "{}: the test can tell the two apart", q.name());
    }
}

/// Parity with diffusers 0.42.1: the tiny transformer's output with two LoRAs loaded by
/// `load_lora_weights` and weighted by `set_adapters` (one weight negative), for the three layouts
/// diffusers reads (fixtures from scripts/make_fixtures.py).
#[test]
fn two_loras_match_diffusers_set_adapters() {
    use crate::loader::ModelSource;
    use crate::testutil::{assert_close, expected, fixtures_dir, tiny_model_dir};
    let dir = fixtures_dir().join("lora");
    let e = expected();
    let want = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let cases: serde_json::Value = {
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap()
    };
    let mut pipe = Pipeline::load(&ModelSource::Dir(tiny_model_dir()), &Device::Cpu).unwrap();
    assert_eq!(pipe.dtype(), DType::F32);
    let x = e["dit.x"].unsqueeze(0).unwrap();
    let run = |pipe: &Pipeline| pipe.transformer().forward(&x, &e["dit.t"], &[e["dit.cap"].clone()]).unwrap().squeeze(0).unwrap();
    assert_close("lora base", &run(&pipe), &want["base.out"], 1e-4);
    let mut patcher = LoraPatcher::new();
    let mut compared = 0;
    for (name, set) in cases.as_object().unwrap() {
        if name == "base" {
            continue;
        }
        let files: Vec<(LoraFile, f32)> = set
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (LoraFile::read(&dir.join(c["file"].as_str().unwrap())).unwrap(), c["scale"].as_f64().unwrap() as f32))
            .collect();
        let refs: Vec<(&LoraFile, f32)> = files.iter().map(|(f, s)| (f, *s)).collect();
        let rep = patcher.set(&mut pipe, &refs).unwrap();
        assert!(rep.warnings.is_empty(), "{name}: {:?}", rep.warnings);
        let got = run(&pipe);
        assert_close(&format!("lora {name}"), &got, &want[&format!("{name}.out")], 1e-4);
        // and the LoRAs matter at that tolerance
        assert!(max_diff(&got, &want["base.out"]) > 1e-2, "{name}");
        compared += 1;
    }
    assert_eq!(compared, 2);
    patcher.revert(&mut pipe);
    assert_close("lora reverted", &run(&pipe), &want["base.out"], 1e-4);
}

/// LoHa and LoKr against the NumPy reference deltas of scripts/make_fixtures.py.
#[test]
fn loha_and_lokr_match_the_numpy_reference() {
    let dir = crate::testutil::fixtures_dir().join("lora");
    let want = candle_core::safetensors::load(dir.join("lycoris_expected.safetensors"), &Device::Cpu).unwrap();
    for (file, module, layer_name, row) in [
        ("loha.safetensors", "loha.layers.1.attention.to_out.0", "layers.1.attention.to_out.0", 0),
        ("lokr.safetensors", "lokr.noise_refiner.0.attention.to_v", "noise_refiner.0.attention.to_qkv", 2 * dims().0),
    ] {
        let f = LoraFile::read(&dir.join(file)).unwrap();
        let mut t = tiny();
        let base = layer(&mut t, layer_name);
        let rep = merge_into(&mut t, &[(&f, -0.7)]).unwrap();
        assert!(rep.warnings.is_empty() && rep.layers == 1, "{file}: {rep:?}");
        let delta = (layer(&mut t, layer_name) - &base).unwrap();
        let rows = want[module].dim(0).unwrap();
        let got = delta.narrow(0, row, rows).unwrap();
        let err = max_diff(&got, &(&want[module] * -0.7).unwrap());
        assert!(err < 1e-6, "{file}: {err}");
        // nothing outside the module's rows moved
        let total = delta.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let inside = got.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((total - inside).abs() < 1e-4, "{file}: rows outside changed");
    }
}
