//! LoRAs through the real server: `zimage serve --model tiny` with a LoRA folder holding a LoRA
//! for the tiny model (the engine's ai-toolkit fixture), one for another architecture and a
//! corrupt file. The listing says which can be used and why not; a job with the LoRA changes the image
//! and names it in the PNG parameters; scale 0 and going back to no LoRA give exactly the base
//! image (the base weights come back without reloading); unknown and unusable LoRAs are refused
//! with their reasons while the server goes on; uploads are checked; A1111's prompt tags and
//! LoRA listing work.

#![cfg(unix)]

mod common;

use common::{http, Proc, Scratch};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

/// A safetensors file of `tensors` (name, shape), f32 zeros.
fn safetensors(path: &Path, tensors: &[(&str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(vec![0u8; offset]);
    std::fs::write(path, out).unwrap();
}

fn post_bytes(addr: SocketAddr, path: &str, body: &[u8], auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = auth.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// Generates at the smallest size with `loras` (JSON list); the PNG bytes and its parameters.
fn generate(addr: SocketAddr, loras: &str) -> Result<(Vec<u8>, String), (u16, String)> {
    let body = format!(
        r#"{{"prompt":"a lighthouse","steps":4,"seed":7,"kind":{{"mode":"generate","width":1024,"height":1024}},"loras":{loras}}}"#
    );
    let (status, _, answer) = http(addr, "POST", "/api/generate", Some(&body));
    if status != 200 {
        return Err((status, String::from_utf8_lossy(&answer).to_string()));
    }
    let url = json(&answer)["image_url"].as_str().unwrap().to_string();
    let (status, _, png) = http(addr, "GET", &url, None);
    assert_eq!(status, 200);
    let params = engine::png_meta::read_parameters(&png).expect("parameters in the PNG");
    Ok((png, params))
}

fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

#[test]
fn loras_from_the_folder_change_the_image_and_come_off_exactly() {
    let root = Scratch::new("loras");
    let loras = root.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    // an ai-toolkit layout LoRA for the tiny model (the engine's diffusers parity fixture)
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/lora/aitoolkit.safetensors");
    std::fs::copy(&fixture, loras.join("style.safetensors")).unwrap();
    safetensors(&loras.join("sdxl thing.safetensors"), &[
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", &[4, 320]),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", &[320, 4]),
    ]);
    std::fs::write(loras.join("broken.safetensors"), b"PK\x03\x04 a zip, not safetensors").unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["serve", "--model", "tiny", "--devices", "cpu", "--addr", "127.0.0.1:0"])
        .args(["--submissions-per-minute", "0", "--max-queued-per-client", "0"])
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--lora-dir")
        .arg(&loras)
        .arg("--site-root")
        .arg(root.join("no-site"))
        .args(["--api-key", "sekret"]);
    let server = Proc::spawn(cmd, true, Duration::from_secs(120));
    server.wait_ready(LIMIT);
    let addr = server.addr.unwrap();

    // the listing: which files can be used, and why the others cannot
    let (status, _, body) = http(addr, "GET", "/api/loras", None);
    assert_eq!(status, 200);
    let list = json(&body);
    let entry = |name: &str| list.as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or_else(|| panic!("{name} in {list}"));
    assert_eq!(entry("style")["usable"], true, "{list}");
    assert_eq!(entry("style")["short_hash"].as_str().unwrap().len(), 12);
    assert_eq!(entry("sdxl thing")["usable"], false);
    assert!(entry("sdxl thing")["summary"].as_str().unwrap().contains("does not fit this model"), "{list}");
    assert_eq!(entry("broken")["usable"], false);

    let (base_png, base_params) = generate(addr, "[]").unwrap();
    assert!(!base_params.contains("<lora:"), "{base_params}");
    let (styled_png, styled_params) = generate(addr, r#"[{"name":"style","scale":2}]"#).unwrap();
    assert_ne!(pixels(&styled_png), pixels(&base_png), "the LoRA changes the image");
    let hash = entry("style")["short_hash"].as_str().unwrap().to_string();
    assert!(styled_params.starts_with("a lighthouse <lora:style:2>\n"), "{styled_params}");
    assert!(styled_params.contains(&format!("Lora hashes: \"style: {hash}\"")), "{styled_params}");
    // scale 0 merges nothing; back to no LoRA restores the base weights exactly
    let (zero_png, _) = generate(addr, r#"[{"name":"style","scale":0}]"#).unwrap();
    assert_eq!(pixels(&zero_png), pixels(&base_png));
    let (again_png, _) = generate(addr, "[]").unwrap();
    assert_eq!(pixels(&again_png), pixels(&base_png), "reverting gives the base image back");
    let (again_styled, _) = generate(addr, r#"[{"name":"style","scale":2}]"#).unwrap();
    assert_eq!(pixels(&again_styled), pixels(&styled_png), "the same set gives the same image");

    // variation: 0 is the plain image; a variation moves it and is named in the PNG
    let variation = |v: &str| {
        let body = format!(r#"{{"prompt":"a lighthouse","steps":4,"seed":7,"kind":{{"mode":"generate","width":1024,"height":1024}},"variation":{v}}}"#);
        let (status, _, answer) = http(addr, "POST", "/api/generate", Some(&body));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let (_, _, png) = http(addr, "GET", json(&answer)["image_url"].as_str().unwrap(), None);
        png
    };
    assert_eq!(pixels(&variation("0")), pixels(&base_png), "variation 0 is the plain image");
    let varied = variation("0.5");
    assert_ne!(pixels(&varied), pixels(&base_png));
    let params = engine::png_meta::read_parameters(&varied).unwrap();
    assert!(params.contains("Variation seed: 7, Variation seed strength: 0.5"), "{params}");

    // refusals with their reasons; the server goes on
    let (status, why) = generate(addr, r#"[{"name":"nope","scale":1}]"#).unwrap_err();
    assert_eq!(status, 400);
    assert!(why.contains("Unknown LoRA `nope`"), "{why}");
    let (status, why) = generate(addr, r#"[{"name":"sdxl thing","scale":1}]"#).unwrap_err();
    assert_eq!(status, 400);
    assert!(why.contains("does not fit this model"), "{why}");
    let (status, why) = generate(addr, r#"[{"name":"broken","scale":1}]"#).unwrap_err();
    assert_eq!(status, 400);
    assert!(why.contains("LoRA `broken` cannot be used"), "{why}");
    let (status, why) = generate(addr, r#"[{"name":"style","scale":3}]"#).unwrap_err();
    assert_eq!(status, 400);
    assert!(why.contains("between -2 and 2"), "{why}");
    assert!(generate(addr, "[]").is_ok(), "the server goes on");

    // uploads: the API key, the checks, then a name jobs can use
    let bytes = std::fs::read(loras.join("style.safetensors")).unwrap();
    let (status, why) = post_bytes(addr, "/api/loras/uploaded.safetensors", &bytes, None);
    assert_eq!(status, 401, "{why}");
    let (status, why) = post_bytes(addr, "/api/loras/junk.safetensors", b"not a safetensors file at all", Some("sekret"));
    assert_eq!(status, 400, "{why}");
    assert!(why.contains("not a LoRA we can read"), "{why}");
    let (status, answer) = post_bytes(addr, "/api/loras/..%2Fuploaded.safetensors", &bytes, Some("sekret"));
    assert_eq!(status, 200, "{answer}");
    let info: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(info["name"], "uploaded");
    assert!(loras.join("uploaded.safetensors").exists(), "stored in the folder, under a clean name");
    let (status, why) = post_bytes(addr, "/api/loras/uploaded.safetensors", &bytes, Some("sekret"));
    assert_eq!(status, 400);
    assert!(why.contains("already in the folder"), "{why}");
    let (uploaded_png, _) = generate(addr, r#"[{"name":"uploaded","scale":2}]"#).unwrap();
    assert_eq!(pixels(&uploaded_png), pixels(&styled_png), "the same file under another name");

    // A1111: the listing and `<lora:name:weight>` in the prompt
    let a1111 = |method: &str, path: &str, body: Option<&str>| {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = body.unwrap_or("");
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let status: u16 = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, raw.split_once("\r\n\r\n").unwrap().1.to_string())
    };
    let (status, listed) = a1111("GET", "/sdapi/v1/loras", None);
    assert_eq!(status, 200, "{listed}");
    assert!(listed.contains("\"style\"") && !listed.contains("broken"), "{listed}");
    assert_eq!(a1111("POST", "/sdapi/v1/refresh-loras", None).0, 200);
    let (status, answer) = a1111("POST", "/sdapi/v1/txt2img", Some(r#"{"prompt":"a lighthouse <lora:style:2>","steps":4,"seed":7,"width":1024,"height":1024}"#));
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let png = base64_decode(v["images"][0].as_str().unwrap());
    assert_eq!(pixels(&png), pixels(&styled_png), "the tag applies the LoRA like the `loras` field");
    let (status, why) = a1111("POST", "/sdapi/v1/txt2img", Some(r#"{"prompt":"x <lora:nope:1>","steps":4}"#));
    assert!(status == 400 || status == 422, "{status} {why}");
    assert!(why.contains("Unknown LoRA `nope`"), "{why}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
