//! The Redis queue on real processes: a `redis-server` on a free port (no persistence, a temp
//! folder), two `zimage serve --queue` front ends sharing one data folder, two `zimage worker`s on
//! the tiny model. Checked: jobs submitted through both front ends spread over both workers with
//! the places in line counted across front ends; a worker killed with SIGKILL mid-job has its job
//! run again by the other (its client sees `restarted`, one image is kept); jobs submitted
//! through one front end are cancelled through the other, one running, one waiting (it never
//! runs); a front end restarted
//! mid-job lets its client reconnect and get the result.
//!
//! Needs `redis-server` on PATH, so it is ignored by a plain `cargo test`;
//! `scripts/redis-cluster-test.sh` (part of `scripts/test.sh`) installs Redis and runs it.

#![cfg(unix)]

mod common;

use common::{http, Proc};
use serde_json::Value;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Claim idle time of the test's processes: a killed worker's job moves on after this.
const CLAIM_IDLE_MS: &str = "2000";
const LIMIT: Duration = Duration::from_secs(120);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_server(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(dir);
    let redis = Proc::spawn(cmd, false, LIMIT);
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "redis-server did not start: {}", redis.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    (redis, format!("redis://127.0.0.1:{port}/0"))
}

fn front_end(url: &str, data: &Path, addr: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["serve", "--queue", url, "--model", "tiny", "--addr", addr, "--claim-idle-ms", CLAIM_IDLE_MS])
        .args(["--submissions-per-minute", "0", "--max-queued-per-client", "0"])
        .arg("--data-dir")
        .arg(data)
        .arg("--site-root")
        .arg(data.join("no-site"));
    let fe = Proc::spawn(cmd, true, Duration::from_secs(60));
    fe.wait_ready(LIMIT);
    fe
}

fn worker(url: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["worker", "--queue", url, "--model", "tiny", "--device", "cpu", "--claim-idle-ms", CLAIM_IDLE_MS]);
    let w = Proc::spawn(cmd, false, LIMIT);
    let t0 = Instant::now();
    while !w.log().contains("is taking jobs") {
        assert!(t0.elapsed() < LIMIT, "the worker did not start: {}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    w
}

/// Submits a 4-step 1024x1024 job; its ticket.
fn submit(addr: SocketAddr, prompt: &str) -> Value {
    let req = format!(r#"{{"req":{{"prompt":"{prompt}","steps":4,"seed":5,"kind":{{"mode":"generate","width":1024,"height":1024}}}}}}"#);
    let (status, _, body) = http(addr, "POST", "/api/submit_job", Some(&req));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// A websocket watching jobs; every event it gets is kept in order.
struct Watcher {
    events: Arc<Mutex<Vec<Value>>>,
    closed: Arc<Mutex<bool>>,
    outbox: std::sync::mpsc::Sender<String>,
}

impl Watcher {
    fn connect(addr: SocketAddr, job_ids: &[&str]) -> Watcher {
        let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).expect("websocket");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let (outbox, inbox) = std::sync::mpsc::channel::<String>();
        for id in job_ids {
            outbox.send(format!(r#"{{"type":"watch","job_id":"{id}"}}"#)).unwrap();
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(false));
        let (sink, done) = (events.clone(), closed.clone());
        std::thread::spawn(move || loop {
            while let Ok(text) = inbox.try_recv() {
                if ws.send(tungstenite::Message::text(text)).is_err() {
                    break;
                }
            }
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => sink.lock().unwrap().push(serde_json::from_str::<Value>(t.as_str()).unwrap()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => {
                    *done.lock().unwrap() = true;
                    return;
                }
            }
        });
        Watcher { events, closed, outbox }
    }

    /// Waits for an event of `job_id` of type `kind`; returns it.
    fn wait_for(&self, job_id: &str, kind: &str, why: &dyn Fn() -> String) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(ev) = self.events.lock().unwrap().iter().find(|e| e["job_id"] == job_id && e["type"] == kind) {
                return ev.clone();
            }
            assert!(t0.elapsed() < LIMIT, "no `{kind}` event for {job_id}; got {:?}\n{}", self.events.lock().unwrap(), why());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_closed(&self) -> bool {
        *self.closed.lock().unwrap()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.outbox.send(String::new());
    }
}

fn history_count(addr: SocketAddr, prompt: &str) -> usize {
    let (status, _, body) = http(addr, "POST", "/api/history", Some(&format!(r#"{{"search":"{prompt}","page":0}}"#)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8_lossy(&body).matches(&format!("\"prompt\":\"{prompt}\"")).count()
}

fn worker_ran(w: &Proc, job_id: &str) -> bool {
    w.log().contains(&format!("running job {job_id}"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zimage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs redis-server; scripts/redis-cluster-test.sh runs it"]
fn two_front_ends_and_two_workers_share_one_redis_queue() {
    let dir = temp_dir("redis-cluster");
    let data = dir.join("data");
    let (_redis, url) = redis_server(&dir);
    let mut fe1 = front_end(&url, &data, "127.0.0.1:0");
    let fe2 = front_end(&url, &data, "127.0.0.1:0");
    let (a1, a2) = (fe1.addr.unwrap(), fe2.addr.unwrap());
    // 1. Four jobs through both front ends before any worker runs: their places in line count
    // every front end's jobs; then both workers run some.
    let tickets: Vec<Value> = (0..4).map(|i| submit(if i % 2 == 0 { a1 } else { a2 }, &format!("spread {i}"))).collect();
    let ids: Vec<&str> = tickets.iter().map(|t| t["job_id"].as_str().unwrap()).collect();
    let places: Vec<u64> = tickets.iter().map(|t| t["position"].as_u64().unwrap()).collect();
    assert_eq!(places, [1, 2, 3, 4], "places in line across front ends");
    let watch1 = Watcher::connect(a1, &ids);
    let watch2 = Watcher::connect(a2, &ids);
    let mut workers = [worker(&url), worker(&url)];
    let fe_logs = (fe1.log.clone(), fe2.log.clone());
    let worker_logs = (workers[0].log.clone(), workers[1].log.clone());
    let logs = || {
        let l = |m: &Arc<Mutex<String>>| m.lock().unwrap().clone();
        format!("-- fe1\n{}\n-- fe2\n{}\n-- w1\n{}\n-- w2\n{}", l(&fe_logs.0), l(&fe_logs.1), l(&worker_logs.0), l(&worker_logs.1))
    };

    for id in &ids {
        watch1.wait_for(id, "done", &logs);
        watch2.wait_for(id, "done", &logs);
    }
    // the fourth job was told its place moving up, on both front ends
    for watch in [&watch1, &watch2] {
        let places: Vec<u64> = watch.events.lock().unwrap().iter().filter(|e| e["job_id"] == ids[3] && e["type"] == "queued").map(|e| e["position"].as_u64().unwrap()).collect();
        assert!(places.len() >= 2 && places[0] == 4 && places.windows(2).all(|w| w[1] < w[0]), "{places:?}");
    }
    let by_w1 = ids.iter().filter(|id| worker_ran(&workers[0], id)).count();
    let by_w2 = ids.iter().filter(|id| worker_ran(&workers[1], id)).count();
    assert_eq!(by_w1 + by_w2, 4, "each job ran once\n{}", logs());
    assert!(by_w1 > 0 && by_w2 > 0, "jobs spread over both workers ({by_w1}, {by_w2})\n{}", logs());
    for (i, id) in ids.iter().enumerate() {
        let done = watch1.wait_for(id, "done", &logs);
        let url = done["result"]["image_url"].as_str().unwrap();
        for addr in [a1, a2] {
            let (status, head, png) = http(addr, "GET", url, None);
            assert_eq!(status, 200, "{head}");
            assert!(png.starts_with(b"\x89PNG"));
        }
        assert_eq!(history_count(a2, &format!("spread {i}")), 1, "one history entry per job");
    }
    drop((watch1, watch2));

    // 2. A worker killed mid-job: the other runs it again. Meanwhile a job submitted through
    // front end 2 and running on the other worker is cancelled through front end 1.
    let lost = submit(a1, "lost worker");
    let lost_id = lost["job_id"].as_str().unwrap().to_string();
    let doomed = submit(a2, "cancelled elsewhere");
    let doomed_id = doomed["job_id"].as_str().unwrap().to_string();
    let watch = Watcher::connect(a1, &[&lost_id]);
    let watch_doomed = Watcher::connect(a2, &[&doomed_id]);
    watch.wait_for(&lost_id, "step", &logs);
    watch_doomed.wait_for(&doomed_id, "started", &logs);
    // both workers busy: a third job waits; cancelled through the other front end, it ends at once
    // and is never run
    let waiting = submit(a2, "cancelled waiting");
    let waiting_id = waiting["job_id"].as_str().unwrap().to_string();
    assert_eq!(waiting["position"], 1, "{waiting}");
    let watch_waiting = Watcher::connect(a2, &[&waiting_id]);
    watch_waiting.wait_for(&waiting_id, "queued", &logs);
    let (status, _, body) = http(a1, "POST", "/api/cancel_job", Some(&format!(r#"{{"job_id":"{waiting_id}"}}"#)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    watch_waiting.wait_for(&waiting_id, "cancelled", &logs);
    let (victim, survivor) = if worker_ran(&workers[0], &lost_id) { (0, 1) } else { (1, 0) };
    assert!(worker_ran(&workers[victim], &lost_id), "{}", logs());
    workers[victim].signal("-KILL");
    workers[victim].wait(LIMIT);
    let survivor = &workers[survivor];
    let (status, _, body) = http(a1, "POST", "/api/cancel_job", Some(&format!(r#"{{"job_id":"{doomed_id}"}}"#)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    watch_doomed.wait_for(&doomed_id, "cancelled", &logs);
    assert!(worker_ran(survivor, &doomed_id), "the cancelled job ran on the other worker\n{}", logs());
    let restarted = watch.wait_for(&lost_id, "restarted", &logs);
    assert!(restarted["reason"].as_str().unwrap().contains("another worker"), "{restarted}");

    // 3. The client's front end restarts while the job runs again; the client reconnects.
    fe1.signal("-TERM");
    assert_eq!(fe1.wait(LIMIT), Some(0), "{}", fe1.log());
    let t0 = Instant::now();
    while !watch.is_closed() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the socket was closed by the stopping front end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fe1_again = front_end(&url, &data, &a1.to_string());
    let rewatch = Watcher::connect(a1, &[&lost_id]);
    let done = rewatch.wait_for(&lost_id, "done", &|| format!("{}\n-- fe1 again\n{}", logs(), fe1_again.log()));
    assert!(worker_ran(survivor, &lost_id));
    let url_png = done["result"]["image_url"].as_str().unwrap();
    let (status, _, png) = http(a1, "GET", url_png, None);
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(history_count(a1, "lost worker"), 1, "one image kept for the job run twice");
    assert_eq!(history_count(a1, "cancelled elsewhere"), 0);
    assert_eq!(history_count(a1, "cancelled waiting"), 0);
    assert!(!workers.iter().any(|w| worker_ran(w, &waiting_id)), "the cancelled waiting job never ran\n{}", logs());
    drop(fe1_again);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker started with `--lora-dir`.
fn worker_with_loras(url: &str, loras: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["worker", "--queue", url, "--model", "tiny", "--device", "cpu", "--claim-idle-ms", CLAIM_IDLE_MS]).arg("--lora-dir").arg(loras);
    let w = Proc::spawn(cmd, false, LIMIT);
    let t0 = Instant::now();
    while !w.log().contains("is taking jobs") {
        assert!(t0.elapsed() < LIMIT, "the worker did not start: {}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    w
}

#[test]
#[ignore = "needs redis-server; scripts/redis-cluster-test.sh runs it"]
fn a_job_names_its_lora_by_hash_and_a_worker_with_another_file_says_so() {
    let dir = temp_dir("redis-loras");
    let data = dir.join("data");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/lora");
    // the front end's folder (data/loras) and the worker's hold different files named `style`
    std::fs::create_dir_all(data.join("loras")).unwrap();
    std::fs::copy(fixtures.join("aitoolkit.safetensors"), data.join("loras/style.safetensors")).unwrap();
    let worker_loras = dir.join("worker-loras");
    std::fs::create_dir_all(&worker_loras).unwrap();
    std::fs::copy(fixtures.join("kohya.safetensors"), worker_loras.join("style.safetensors")).unwrap();
    let (_redis, url) = redis_server(&dir);
    let fe = front_end(&url, &data, "127.0.0.1:0");
    let addr = fe.addr.unwrap();
    let _worker = worker_with_loras(&url, &worker_loras);
    let submit_with_lora = |name: &str| {
        let req = format!(r#"{{"req":{{"prompt":"lora job","steps":4,"seed":5,"kind":{{"mode":"generate","width":1024,"height":1024}},"loras":[{{"name":"{name}","scale":1}}]}}}}"#);
        http(addr, "POST", "/api/submit_job", Some(&req))
    };
    // the front end refuses what its folder lacks
    let (status, _, body) = submit_with_lora("nope");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("Unknown LoRA `nope`"));
    // accepted with the front end's file's hash; the worker's file differs: the job fails, saying so
    let (status, _, body) = submit_with_lora("style");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let ticket: Value = serde_json::from_slice(&body).unwrap();
    let id = ticket["job_id"].as_str().unwrap();
    let watch = Watcher::connect(addr, &[id]);
    let err = watch.wait_for(id, "error", &|| fe.log());
    let reason = err["reason"].as_str().unwrap();
    assert!(reason.contains("LoRA `style`") && reason.contains("not the file the job was accepted with"), "{reason}");
    // with the same file the worker runs it
    std::fs::copy(fixtures.join("aitoolkit.safetensors"), worker_loras.join("style.safetensors")).unwrap();
    let (status, _, body) = submit_with_lora("style");
    assert_eq!(status, 200);
    let ticket: Value = serde_json::from_slice(&body).unwrap();
    let id = ticket["job_id"].as_str().unwrap();
    let watch = Watcher::connect(addr, &[id]);
    let done = watch.wait_for(id, "done", &|| fe.log());
    assert_eq!(done["result"]["loras"][0]["name"], "style", "{done}");
    let _ = std::fs::remove_dir_all(&dir);
}
