//! What the tests that run the real binaries share: a child process with its stderr collected
//! (and the address it announces with `port ADDR`), and one HTTP/1.1 exchange over a raw socket.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process with its stderr collected (and, when it prints `port ADDR`, that address).
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub addr: Option<SocketAddr>,
}

impl Proc {
    /// Spawns `cmd`; with `announces_port`, waits (up to `port_wait`) for its `port ADDR` line.
    pub fn spawn(mut cmd: Command, announces_port: bool, port_wait: Duration) -> Proc {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawning");
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
        let addr = announces_port.then(|| rx.recv_timeout(port_wait).expect("the port is announced"));
        Proc { child, log, addr }
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, limit: Duration) {
        let t0 = Instant::now();
        while http(self.addr.expect("a server announces its port"), "GET", "/readyz", None).0 != 200 {
            assert!(t0.elapsed() < limit, "not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal (`-TERM`, `-KILL`) with `kill`.
    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success());
    }

    /// Waits for the exit; its code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(t0.elapsed() < limit, "did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange: status, head (lowercased), body (de-chunked); status 0 when the
/// connection failed.
pub fn http(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> (u16, String, Vec<u8>) {
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

/// A header's value in a lowercased head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// A scratch folder (made empty at creation) removed when the test ends, so repeated runs do not
/// fill the disk.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    /// `<temp>/zimage-<name>-<pid>`, empty.
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("zimage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
