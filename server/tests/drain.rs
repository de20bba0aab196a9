//! Graceful drain and restart, on the real binary: `zimage serve --model tiny` on a free port and
//! a fresh data folder; one job running and one waiting when SIGTERM comes. The running job
//! finishes and its client gets the image, the waiting one's client gets 503 with the reason, the
//! process exits 0; started again on the same folder, the finished image, its share page and its
//! history entry are all served.

#![cfg(unix)]

mod common;

use common::{header, http, Proc};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);

/// Starts `zimage serve` on the tiny model and waits until `/readyz` answers 200.
fn start_server(data: &std::path::Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["serve", "--model", "tiny", "--devices", "cpu", "--addr", "127.0.0.1:0"])
        .args(["--submissions-per-minute", "0", "--max-queued-per-client", "0", "--drain-timeout-secs", "300"])
        .arg("--data-dir")
        .arg(data)
        .arg("--site-root")
        .arg(data.join("no-site"));
    let server = Proc::spawn(cmd, true, Duration::from_secs(120));
    server.wait_ready(LIMIT);
    server
}

fn json_field(body: &[u8], pointer: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v.pointer(pointer).cloned().unwrap_or_default()
}

#[test]
fn sigterm_drains_and_a_restart_serves_every_finished_image() {
    let data = std::env::temp_dir().join(format!("zimage-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut server = start_server(&data);
    let addr = server.addr.unwrap();
    let log = server.log();
    assert!(log.find("port ").unwrap() < log.find("listening on").unwrap(), "the port opens before the model loads: {log}");

    let job = |prompt: &str| {
        format!(r#"{{"prompt":"{prompt}","steps":8,"seed":3,"kind":{{"mode":"generate","width":1344,"height":768}}}}"#)
    };
    // a running job and a waiting one, each a client waiting on /api/generate
    let running = std::thread::spawn({
        let body = job("a lighthouse");
        move || http(addr, "POST", "/api/generate", Some(&body))
    });
    let t0 = Instant::now();
    while json_field(&http(addr, "GET", "/readyz", None).2, "/workers/busy") != 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the first job did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiting = std::thread::spawn({
        let body = job("a harbor");
        move || http(addr, "POST", "/api/generate", Some(&body))
    });
    while json_field(&http(addr, "GET", "/readyz", None).2, "/queue/waiting") != 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the second job was not queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal("-TERM");

    let (status, _, body) = waiting.join().unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let reason = json_field(&body, "/reason");
    assert!(reason.as_str().unwrap().contains("shutting down"), "{reason}");
    let (status, _, body) = running.join().unwrap();
    assert_eq!(status, 200, "the running job finished: {}", String::from_utf8_lossy(&body));
    let image_id = json_field(&body, "/image_id").as_str().unwrap().to_string();
    let share_url = json_field(&body, "/share_url").as_str().unwrap().to_string();
    assert_eq!(server.wait(LIMIT), Some(0), "{}", server.log());
    let log = server.log();
    assert!(log.contains("1 waiting jobs told") && log.contains("stopped cleanly"), "{log}");

    // started again on the same folder: nothing finished is lost
    let mut again = start_server(&data);
    let again_addr = again.addr.unwrap();
    let (status, head, png) = http(again_addr, "GET", &format!("/images/{image_id}.png"), None);
    assert_eq!(status, 200, "{head}");
    assert_eq!(header(&head, "content-type"), Some("image/png"));
    assert!(png.starts_with(b"\x89PNG"));
    let (status, _, page) = http(again_addr, "GET", &share_url, None);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains(&image_id), "the share page shows the image");
    let (status, _, history) = http(again_addr, "POST", "/api/history", Some(r#"{"search":"","page":0}"#));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&history).contains(&image_id));
    again.signal("-TERM");
    assert_eq!(again.wait(LIMIT), Some(0), "{}", again.log());
    std::fs::remove_dir_all(&data).ok();
}
