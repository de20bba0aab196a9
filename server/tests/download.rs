//! The model download on the real binary, against a local server in the Hugging Face hub's layout
//! (scripts/tests/fake_hub.py, reached through `HF_ENDPOINT`) serving the tiny model's files as a
//! hub repository: the first start downloads while the studio already serves its page and says how
//! far the download is; an interrupted download resumes (within the run, and after a kill on the
//! next start) instead of starting again; a missing file, a full disk, a refused token and
//! `HF_HUB_OFFLINE` end in a sentence that says so while the server goes on serving.

#![cfg(unix)]

mod common;

use common::{http, Proc, Scratch};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = "test-org/tiny-zimage";
const COMMIT: &str = "5eed0c0ffee5eed0c0ffee5eed0c0ffee5eed0c0";
const LIMIT: Duration = Duration::from_secs(240);

fn tmp(name: &str) -> Scratch {
    Scratch::new(&format!("dl-{name}"))
}

/// The tiny model as a hub repository: its diffusers folder, a chat template in the tokenizer
/// folder (every tokenizer file must come), and a README and an image the engine does not need.
fn repo_files(dir: &Path) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_zimage")).args(["tiny", "--out"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("tokenizer/chat_template.jinja"), "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    std::fs::write(dir.join("README.md"), "# tiny").unwrap();
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("assets/cover.png"), [0u8; 1000]).unwrap();
    dir_size(dir)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dir_size(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

/// The largest file of the repository (the one the fake hub interrupts).
fn largest_file(dir: &Path) -> (String, u64) {
    fn walk(root: &Path, dir: &Path, best: &mut (String, u64)) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), best);
            } else if e.metadata().unwrap().len() > best.1 {
                *best = (e.path().strip_prefix(root).unwrap().display().to_string(), e.metadata().unwrap().len());
            }
        }
    }
    let mut best = (String::new(), 0);
    walk(dir, dir, &mut best);
    best
}

struct Hub {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Hub {
    fn start(root: &Path, log: &Path, extra: &[&str]) -> Hub {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tests/fake_hub.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--root")
            .arg(root)
            .args(["--repo", REPO, "--port", "0", "--log"])
            .arg(log)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the fake hub");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("port ").expect("the hub says its port");
        Hub { child, url: format!("http://127.0.0.1:{port}"), log: log.to_path_buf() }
    }

    /// Every request so far: (path, Range header).
    fn requests(&self) -> Vec<(String, Option<String>)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["path"].as_str().unwrap().to_string(), v["range"].as_str().map(String::from))
            })
            .collect()
    }

    /// Where each request for `file` started (0 without a Range).
    fn starts_of(&self, file: &str) -> Vec<u64> {
        self.requests()
            .into_iter()
            .filter(|(p, _)| p.ends_with(&format!("/{file}")))
            .map(|(_, r)| r.map(|r| r.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap()).unwrap_or(0))
            .collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `zimage serve --model test-org/tiny-zimage` against `hub`, with its own Hugging Face home.
fn serve(hub_url: &str, hf_home: &Path, data: &Path, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["serve", "--model", REPO, "--devices", "cpu", "--addr", "127.0.0.1:0"])
        .args(["--submissions-per-minute", "0", "--max-queued-per-client", "0"])
        .arg("--data-dir")
        .arg(data)
        .arg("--site-root")
        .arg(data.join("no-site"))
        .env("HF_ENDPOINT", hub_url)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(cmd, true, Duration::from_secs(60))
}

fn readyz(server: &Proc) -> (u16, serde_json::Value) {
    let (status, _, body) = http(server.addr.unwrap(), "GET", "/readyz", None);
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// Polls `/readyz` until `done` holds for its JSON; every answer seen on the way.
fn wait_for(server: &Proc, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let (_, v) = readyz(server);
        let stop = done(&v);
        seen.push(v);
        if stop {
            return seen;
        }
        assert!(t0.elapsed() < LIMIT, "{what} did not happen; last /readyz {:?}\n{}", seen.last(), server.log());
        std::thread::sleep(Duration::from_millis(40));
    }
}

const GENERATE: &str = r#"{"prompt":"a lighthouse","steps":4,"seed":1,"kind":{"mode":"generate","width":1024,"height":1024}}"#;

fn snapshot(hf_home: &Path) -> PathBuf {
    hf_home.join("hub/models--test-org--tiny-zimage/snapshots").join(COMMIT)
}

#[test]
fn the_first_start_downloads_with_progress_while_the_studio_serves() {
    let root = tmp("first-repo");
    let total = repo_files(&root);
    let home = tmp("first-home");
    let data = tmp("first-data");
    // slow enough to be watched: about three seconds for the whole repository
    let rate = (total / 3).to_string();
    let hub = Hub::start(&root, &home.join("hub.log"), &["--rate", &rate]);
    let server = serve(&hub.url, &home, &data, &[]);
    let addr = server.addr.unwrap();

    let mut checked_while_loading = false;
    let seen = wait_for(&server, "the download", |v| {
        let d = &v["download"];
        v["state"] == "downloading" && d["bytes_done"].as_u64().unwrap_or(0) > 0 && d["bytes_done"].as_u64() < d["bytes_total"].as_u64()
    });
    let v = seen.last().unwrap();
    assert_eq!((v["ready"].clone(), v["model_loaded"].clone()), (false.into(), false.into()));
    assert!(v["message"].as_str().unwrap().starts_with(&format!("Downloading {REPO}: ")), "{v}");
    // while it downloads: the page and the server functions answer, a job is refused with the reason
    if readyz(&server).1["state"] == "downloading" {
        let (status, _, body) = http(addr, "GET", "/", None);
        assert_eq!(status, 200, "the page is served while the model downloads");
        assert!(String::from_utf8_lossy(&body).contains("Z-Image Turbo Studio"));
        let (status, _, body) = http(addr, "POST", "/api/server_info", Some("{}"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let (status, head, body) = http(addr, "POST", "/api/generate", Some(GENERATE));
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert!(head.contains("retry-after"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("still loading"), "{}", String::from_utf8_lossy(&body));
        checked_while_loading = true;
    }
    assert!(checked_while_loading, "the download ended before it could be watched");

    wait_for(&server, "ready", |v| v["ready"] == true);
    let (status, _, body) = http(addr, "POST", "/api/generate", Some(GENERATE));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let result: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let image_id = result["image_id"].as_str().unwrap_or_else(|| panic!("{result}"));
    let (status, _, png) = http(addr, "GET", &format!("/images/{image_id}.png"), None);
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG"));
    let log = server.log();
    assert!(log.contains(&format!("downloading {REPO}: ")), "progress lines in the terminal: {log}");

    // the cache in huggingface_hub's layout: every tokenizer file, nothing the engine does not read
    let snap = snapshot(&home);
    assert!(snap.join("tokenizer/chat_template.jinja").exists());
    assert!(snap.join("transformer/config.json").exists());
    assert!(!snap.join("README.md").exists() && !snap.join("assets/cover.png").exists());
    let main = std::fs::read_to_string(home.join("hub/models--test-org--tiny-zimage/refs/main")).unwrap();
    assert_eq!(main, COMMIT);
    assert!(std::fs::symlink_metadata(snap.join("model_index.json")).unwrap().file_type().is_symlink());

    // a second start finds the model in the cache and asks the hub nothing
    drop(server);
    let asked = hub.requests().len();
    let again = serve(&hub.url, &home, &data, &[]);
    again.wait_ready(LIMIT);
    assert_eq!(hub.requests().len(), asked, "the second start fetched something");
    for d in [root, home, data] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let root = tmp("resume-repo");
    repo_files(&root);
    let (big, big_size) = largest_file(&root);
    let home = tmp("resume-home");
    let data = tmp("resume-data");

    // within the run: the connection breaks halfway through the largest file
    let half = big_size / 2;
    let hub = Hub::start(&root, &home.join("hub.log"), &["--drop-after", &half.to_string()]);
    let server = serve(&hub.url, &home, &data, &[]);
    server.wait_ready(LIMIT);
    assert_eq!(hub.starts_of(&big), vec![0, half], "a second request continues from the broken one");
    drop(server);
    drop(hub);

    // over a restart: killed while the largest file is partly there, started again
    let home = tmp("resume-home2");
    let slow = (big_size / 4).to_string(); // about four seconds for that file
    let hub = Hub::start(&root, &home.join("hub.log"), &["--rate", &slow]);
    let mut server = serve(&hub.url, &home, &data, &[]);
    // the hub names an LFS file's blob by its SHA-256, as the cache does
    assert!(big.ends_with(".safetensors"), "{big}");
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(root.join(&big)).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let part = home.join("hub/models--test-org--tiny-zimage/blobs").join(format!("{sha}.incomplete"));
    let t0 = Instant::now();
    let partial = loop {
        if let Some(len) = std::fs::metadata(&part).ok().map(|m| m.len()).filter(|&len| len > big_size / 8) {
            break len;
        }
        assert!(t0.elapsed() < LIMIT, "no partial {} appeared: {}", part.display(), server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    server.signal("-KILL");
    server.wait(Duration::from_secs(10));
    drop(hub);
    let hub = Hub::start(&root, &home.join("hub2.log"), &[]);
    let server = serve(&hub.url, &home, &data, &[]);
    server.wait_ready(LIMIT);
    let starts = hub.starts_of(&big);
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert!(starts[0] >= partial, "the next start continued from byte {} (at least {partial} were there)", starts[0]);
    assert!(snapshot(&home).join(&big).exists());
    for d in [root, home, data] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn failures_say_why_and_the_studio_goes_on_serving() {
    let root = tmp("fail-repo");
    repo_files(&root);
    let data = tmp("fail-data");
    let failed = |server: &Proc| -> String {
        let v = wait_for(server, "the failure", |v| v["state"] == "failed").pop().unwrap();
        assert_eq!(readyz(server).0, 503);
        // still serving what needs no model
        assert_eq!(http(server.addr.unwrap(), "GET", "/", None).0, 200);
        v["message"].as_str().unwrap().to_string()
    };

    // a file the hub lists but does not have
    let home = tmp("fail-missing");
    let hub = Hub::start(&root, &home.join("hub.log"), &["--missing", "vae/config.json"]);
    let server = serve(&hub.url, &home, &data, &[]);
    let m = failed(&server);
    assert!(m.contains("vae/config.json") && m.contains("404"), "{m}");
    let (status, _, body) = http(server.addr.unwrap(), "POST", "/api/generate", Some(GENERATE));
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("could not be loaded"), "{}", String::from_utf8_lossy(&body));
    drop((server, hub));

    // more than the disk holds
    let home = tmp("fail-huge");
    let hub = Hub::start(&root, &home.join("hub.log"), &["--huge", "transformer/config.json"]);
    let server = serve(&hub.url, &home, &data, &[]);
    let m = failed(&server);
    assert!(m.contains("not enough disk space") && m.contains("free at"), "{m}");
    assert_eq!(hub.starts_of("transformer/config.json"), Vec::<u64>::new(), "nothing fetched before the check");
    drop((server, hub));

    // a gated repository: refused without the token, served with HF_TOKEN
    let home = tmp("fail-token");
    let hub = Hub::start(&root, &home.join("hub.log"), &["--token", "hf_sesame"]);
    let server = serve(&hub.url, &home, &data, &[]);
    let m = failed(&server);
    assert!(m.contains("gated or private") && m.contains("HF_TOKEN"), "{m}");
    drop(server);
    let server = serve(&hub.url, &home, &data, &[("HF_TOKEN", "hf_sesame")]);
    server.wait_ready(LIMIT);
    drop((server, hub));

    // offline: nothing is asked of the hub, the missing files are named
    let home = tmp("fail-offline");
    let hub = Hub::start(&root, &home.join("hub.log"), &[]);
    let server = serve(&hub.url, &home, &data, &[("HF_HUB_OFFLINE", "1")]);
    let m = failed(&server);
    assert!(m.contains("HF_HUB_OFFLINE") && m.contains("model_index.json"), "{m}");
    assert!(hub.requests().is_empty(), "offline, yet the hub was asked: {:?}", hub.requests());
    drop((server, hub));
    for d in [root, data] {
        std::fs::remove_dir_all(d).ok();
    }
}
