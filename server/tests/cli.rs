//! The `zimage` command line, run as a user would: generate on the tiny model, read the PNG's
//! parameters back, write the tiny model and load it as a folder, and clear errors for bad input.

mod common;

use common::Scratch;
use std::path::PathBuf;
use std::process::Command;

fn zimage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zimage"))
}

fn tmp(name: &str) -> Scratch {
    Scratch::new(&format!("cli-{name}"))
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = zimage().args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn generate_writes_a_png_with_parameters_and_info_reads_them() {
    let d = tmp("gen");
    let out = d.join("fox.png");
    let (ok, stdout, stderr) = run(&[
        "generate", "--model", "tiny", "--device", "cpu", "--prompt", "a red fox", "--width", "96", "--height", "64",
        "--steps", "3", "--seed", "5", "--n", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("seed 5:") && stdout.contains("seed 6:"), "{stdout}");
    assert!(stderr.contains("text encoding") && stderr.contains("vae decode"), "stage times printed: {stderr}");
    assert!(stderr.contains("random weights"), "the tiny model is announced: {stderr}");
    let first = d.join("fox-0.png");
    let img = image::open(&first).unwrap();
    assert_eq!((img.width(), img.height()), (96, 64));
    let (ok, info, _) = run(&["info", first.to_str().unwrap()]);
    assert!(ok);
    assert!(info.starts_with("a red fox\nSteps: 3,") && info.contains("Seed: 5, Size: 96x64, Model: tiny"), "{info}");
    let (_, info2, _) = run(&["info", d.join("fox-1.png").to_str().unwrap()]);
    assert!(info2.contains("Seed: 6,"), "{info2}");
}

/// PSNR of two PNGs of one size, in dB (infinite when equal).
fn psnr(a: &PathBuf, b: &PathBuf) -> f64 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    let mse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

#[test]
fn quantized_precisions_and_freed_text_encoder_generate_a_close_image() {
    let d = tmp("quantized");
    let args = |out: &PathBuf| -> Vec<String> {
        ["generate", "--model", "tiny", "--device", "cpu", "--prompt", "a red fox", "--width", "64", "--height", "64",
         "--steps", "3", "--seed", "9", "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let plain = d.join("plain.png");
    let o = zimage().args(args(&plain)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (flags, said) in [(&["--fp8", "--free-text-encoder"][..], "transformer in FP8"), (&["--precision", "int8"][..], "transformer in INT8")] {
        let quant = d.join(format!("{}.png", flags[flags.len() - 1].trim_start_matches('-')));
        let o = zimage().args(args(&quant)).args(flags).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert!(stderr.contains(said), "{stderr}");
        let p = psnr(&plain, &quant);
        assert!(p.is_finite(), "{flags:?} changed nothing: were the weights quantized?");
        assert!(p > 20.0, "{flags:?} image too far from the full-precision one: PSNR {p:.1} dB");
    }
    let (ok, _, err) = run(&["generate", "--model", "tiny", "--precision", "int4", "--prompt", "x"]);
    assert!(!ok && err.contains("auto, fp8, int8 or bf16"), "{err}");
}

#[test]
fn image_to_image_and_the_tiny_folder_round_trip() {
    let d = tmp("i2i");
    let model = d.join("tiny-model");
    let (ok, _, stderr) = run(&["tiny", "--out", model.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let input = d.join("in.png");
    image::RgbImage::from_fn(70, 50, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90])).save(&input).unwrap();
    let out = d.join("out.png");
    let (ok, _, stderr) = run(&[
        "generate", "--model", model.to_str().unwrap(), "--device", "cpu", "--prompt", "oil painting",
        "--image", input.to_str().unwrap(), "--strength", "0.5", "--steps", "4", "--seed", "1", "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    // 70x50 rounds down to 64x48, as the reference does.
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 48));
    let (_, info, _) = run(&["info", out.to_str().unwrap()]);
    assert!(info.contains("Denoising strength: 0.5"), "{info}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let d = tmp("bad");
    let not_image = d.join("notes.png");
    std::fs::write(&not_image, "hello").unwrap();
    let not_txt = d.join("notes.txt");
    std::fs::write(&not_txt, "hello").unwrap();
    let good = d.join("good.png");
    image::RgbImage::new(64, 64).save(&good).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--height".into(), "1000".into()], "nearest valid values are 992 or 1008"),
        (vec!["--steps".into(), "0".into()], "steps must be between"),
        (vec!["--image".into(), not_image.display().to_string()], "could not be decoded as an image"),
        (vec!["--image".into(), not_txt.display().to_string()], "is not an image"),
        (vec!["--image".into(), good.display().to_string(), "--strength".into(), "1.5".into()], "strength must be in (0, 1]"),
        (vec!["--n".into(), "100".into()], "n (images per request)"),
        (vec!["--seed".into(), "4294967296".into()], "the seed must be between 0 and 4294967295"),
        (vec!["--seed".into(), "4294967295".into(), "--n".into(), "2".into()], "at most 4294967294"),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> =
            ["generate", "--model", "tiny", "--device", "cpu", "--prompt", "x", "--width", "64"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (ok, _, stderr) = run(&refs);
        assert!(!ok, "{refs:?} should fail");
        assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = d.join("nothing-here");
    let (ok, _, stderr) =
        run(&["generate", "--model", missing.to_str().unwrap(), "--device", "cpu", "--prompt", "x", "--width", "64"]);
    assert!(!ok && stderr.contains("model files missing"), "{stderr}");
    let (ok, _, stderr) = run(&["info", not_image.to_str().unwrap()]);
    assert!(!ok && stderr.contains("no `parameters`"), "{stderr}");
}

#[test]
fn huge_images_are_refused_before_decoding() {
    let d = tmp("huge");
    // A valid PNG header claiming 100000 x 100000 pixels.
    let path = d.join("huge.png");
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 100_000, 100_000);
        enc.set_color(png::ColorType::Rgb);
        let _ = enc.write_header().map(|w| drop(w));
    }
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, stderr) = run(&[
        "generate", "--model", "tiny", "--device", "cpu", "--prompt", "x", "--image", path.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("too large") || stderr.contains("could not be decoded"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn lora_is_described_applied_with_its_scale_and_bad_files_are_refused() {
    let d = tmp("lora");
    let lora = d.join("style.safetensors");
    let (ok, out, err) = run(&["lora", "--make-random", lora.to_str().unwrap(), "--model", "tiny", "--rank", "4"]);
    assert!(ok, "{err}");
    assert!(out.contains("rank 4"), "{out}");
    let (ok, info, err) = run(&["lora", lora.to_str().unwrap(), "--model", "tiny"]);
    assert!(ok, "{err}");
    assert!(info.contains("layout: diffusers/PEFT (`transformer.` prefix) (LoRA)"), "{info}");
    assert!(info.contains("rank: 4") && info.contains("alpha: none (= rank)") && info.contains("unmatched: none"), "{info}");
    assert!(info.contains("layers.N.attention.to_q x2") && info.contains("noise_refiner.N.adaLN_modulation.0 x1"), "{info}");
    // the same file against the full-size architecture: named, with the reason
    let (ok, info, _) = run(&["lora", lora.to_str().unwrap()]);
    assert!(ok && info.contains("does not fit the model") && info.contains("another model"), "{info}");

    let gen = |name: &str, extra: &[&str]| -> PathBuf {
        let out = d.join(name);
        let mut args = vec!["generate", "--model", "tiny", "--device", "cpu", "--prompt", "a red fox", "--width", "64", "--height", "64", "--steps", "2", "--seed", "4", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, _, err) = run(&args);
        assert!(ok, "{err}");
        out
    };
    let base = gen("base.png", &[]);
    let spec = format!("{}:400", lora.display());
    let with = gen("with.png", &["--lora", &spec]);
    let zero_spec = format!("{}:0", lora.display());
    let zero = gen("zero.png", &["--lora", &zero_spec]);
    let twice = format!("{}:-400", lora.display());
    let cancelled = gen("cancel.png", &["--lora", &spec, "--lora", &twice]);
    assert!(psnr(&base, &with) < 40.0, "the LoRA changes the image");
    assert_eq!(psnr(&base, &zero), f64::INFINITY, "scale 0 changes nothing");
    assert!(psnr(&base, &cancelled) > 40.0, "+s and -s cancel out: {}", psnr(&base, &cancelled));
    // FP8: merged first, then quantized: close to the full-precision LoRA image, far from no LoRA
    let fp8 = gen("fp8.png", &["--lora", &spec, "--precision", "fp8"]);
    let (p_lora, p_base) = (psnr(&with, &fp8), psnr(&base, &fp8));
    assert!(p_lora > 20.0 && p_lora > p_base + 3.0, "FP8 + LoRA vs LoRA {p_lora:.1} dB, vs base {p_base:.1} dB");

    let bad = d.join("notes.safetensors");
    std::fs::write(&bad, b"hello, not a LoRA").unwrap();
    let (ok, _, err) = run(&["generate", "--model", "tiny", "--device", "cpu", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1", "--lora", bad.to_str().unwrap(), "--out", d.join("x.png").to_str().unwrap()]);
    assert!(!ok && err.contains("notes.safetensors") && err.contains("not a safetensors file"), "{err}");
}

#[test]
fn enhance_prints_only_the_text_and_is_reproducible_per_seed() {
    let enhance = |extra: &[&str]| {
        let mut args = vec!["enhance", "--model", "tiny", "--device", "cpu", "--prompt", "a red fox", "--max-new-tokens", "12"];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, a, stderr) = enhance(&["--seed", "3", "--temperature", "3"]);
    assert!(ok, "{stderr}");
    assert!(!a.trim().is_empty(), "the new prompt is printed");
    assert!(!a.contains("model:") && stderr.contains("model: tiny") && stderr.contains("new tokens"), "logs go to stderr: {a:?} / {stderr}");
    assert_eq!(enhance(&["--seed", "3", "--temperature", "3"]).1, a, "same seed, same text");
    assert_ne!(enhance(&["--seed", "4", "--temperature", "3"]).1, a, "another seed, another text");
    let g1 = enhance(&["--seed", "1", "--temperature", "0"]);
    assert!(g1.0, "{}", g1.2);
    assert_eq!(enhance(&["--seed", "2", "--temperature", "0"]).1, g1.1, "greedy ignores the seed");
    // no system message: a shorter templated prompt
    let (ok, _, no_sys) = enhance(&["--seed", "1", "--temperature", "0", "--system", ""]);
    assert!(ok, "{no_sys}");
    let tokens = |s: &str| s.split("seed 1: ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<usize>().ok()).unwrap();
    assert!(tokens(&no_sys) < tokens(&g1.2) / 4, "{no_sys} vs {}", g1.2);
    let (ok, _, err) = enhance(&["--top-p", "0"]);
    assert!(!ok && err.contains("top_p"), "{err}");
}

#[test]
fn bench_enhance_prints_tokens_per_second_and_first_token_latency() {
    let (ok, stdout, stderr) = run(&["bench", "--enhance", "--model", "tiny", "--device", "cpu", "--new-tokens", "8", "--runs", "1"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["runs"][0]["new_tokens"], 8);
    assert!(v["median_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["median_first_token_ms"].as_f64().unwrap() > 0.0);
    assert!(v["weight_bytes_per_token"].as_u64().unwrap() > 0);
}
