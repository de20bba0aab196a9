//! Test helpers: the committed parity fixtures (made by scripts/make_fixtures.py with diffusers)
//! and a scale-aware closeness check.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_model_dir() -> PathBuf {
    fixtures_dir().join("tiny_model")
}

pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join("expected.safetensors"), &Device::Cpu)
        .expect("parity fixtures: run scripts/make_fixtures.py")
}

pub fn expected_json() -> serde_json::Value {
    let s = std::fs::read_to_string(fixtures_dir().join("expected.json")).expect("expected.json");
    serde_json::from_str(&s).expect("expected.json parses")
}

/// Max |a - b|, and asserts it is at most `tol * max(1, max|b|)`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(g.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    assert!(err <= tol * scale, "{what}: max abs err {err:e} > {tol:e} x scale {scale}");
    eprintln!("{what}: max abs err {err:e} (scale {scale})");
    err
}
