//! Graceful drain and restart, on the real binary: `zimage serve --model tiny` on a free port and
//! a fresh data folder; one job running and one waiting when SIGTERM comes. The running job
//! finishes and its client gets the image, the waiting one's client gets 503 with the reason, the
//! process exits 0; started again on the same folder, the finished image, its share page and its
//! history entry are all served.

#![cfg(unix)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `zimage serve` and waits until `/readyz` answers 200.
    fn start(data: &std::path::Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args(["serve", "--model", "tiny", "--devices", "cpu", "--addr", "127.0.0.1:0"])
            .args(["--submissions-per-minute", "0", "--max-queued-per-client", "0", "--drain-timeout-secs", "300"])
            .arg("--data-dir")
            .arg(data)
            .arg("--site-root")
            .arg(data.join("no-site"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("port ").and_then(|r| r.split_whitespace().next()) {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(120)).expect("the port is announced");
        let server = Server { child, addr, log };
        let t0 = Instant::now();
        while http(server.addr, "GET", "/readyz", None).0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(300), "not ready: {}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok);
    }

    /// Waits for the exit; its code.
    fn wait(&mut self) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// One HTTP/1.1 exchange: status, headers (lowercase names), body (de-chunked).
fn http(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> (u16, String, Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(addr) else { return (0, String::new(), Vec::new()) };
    let body = json.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new(), Vec::new());
    }
    let mut raw = Vec::new();
    if s.read_to_end(&mut raw).is_err() {
        return (0, String::new(), Vec::new());
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return (0, String::new(), Vec::new()) };
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + size]);
        b = &b[end + 2 + size + 2..];
    }
    out
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

fn json_field(body: &[u8], pointer: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v.pointer(pointer).cloned().unwrap_or_default()
}

#[test]
fn sigterm_drains_and_a_restart_serves_every_finished_image() {
    let data = std::env::temp_dir().join(format!("zimage-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut server = Server::start(&data);
    let addr = server.addr;
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
    server.sigterm();

    let (status, _, body) = waiting.join().unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let reason = json_field(&body, "/reason");
    assert!(reason.as_str().unwrap().contains("shutting down"), "{reason}");
    let (status, _, body) = running.join().unwrap();
    assert_eq!(status, 200, "the running job finished: {}", String::from_utf8_lossy(&body));
    let image_id = json_field(&body, "/image_id").as_str().unwrap().to_string();
    let share_url = json_field(&body, "/share_url").as_str().unwrap().to_string();
    assert_eq!(server.wait(), Some(0), "{}", server.log());
    let log = server.log();
    assert!(log.contains("1 waiting jobs told") && log.contains("stopped cleanly"), "{log}");

    // started again on the same folder: nothing finished is lost
    let mut again = Server::start(&data);
    let (status, head, png) = http(again.addr, "GET", &format!("/images/{image_id}.png"), None);
    assert_eq!(status, 200, "{head}");
    assert_eq!(header(&head, "content-type"), Some("image/png"));
    assert!(png.starts_with(b"\x89PNG"));
    let (status, _, page) = http(again.addr, "GET", &share_url, None);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains(&image_id), "the share page shows the image");
    let (status, _, history) = http(again.addr, "POST", "/api/history", Some(r#"{"search":"","page":0}"#));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&history).contains(&image_id));
    again.sigterm();
    assert_eq!(again.wait(), Some(0), "{}", again.log());
    std::fs::remove_dir_all(&data).ok();
}
