//! Queue, store and HTTP tests with a fake generator (fast, deterministic), plus one run of the
//! real tiny model through the whole stack.

use super::queue::{Generator, JobQueue};
use super::store::ImageStore;
use super::studio::Studio;
use super::*;
use app::backend::{Backend, ClientId};
use app::types::{JobEvent, JobKind, JobRequest, Style};
use app::ErrorKind;
use axum::body::Body;
use axum::http::{Method, Request as HttpRequest, StatusCode};
use candle_core::{DType, Device, Tensor};
use engine::pipeline::{Control, GenerateOutput, GenerateRequest, StepEvent, Timings};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// Steps take `step_ms`; when `gated`, the first step waits until `open()` is called.
struct Fake {
    step_ms: u64,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Fake {
    fn new(step_ms: u64, gated: bool) -> Arc<Fake> {
        Arc::new(Fake { step_ms, gate: Arc::new((Mutex::new(!gated), Condvar::new())) })
    }
    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

impl Generator for Fake {
    fn model_name(&self) -> String {
        "fake".into()
    }
    fn is_tiny(&self) -> bool {
        true
    }
    fn generate(
        &self,
        req: &GenerateRequest,
        _loras: &[app::types::LoraChoice],
        on_step: &mut dyn FnMut(&StepEvent) -> Control,
    ) -> engine::Result<GenerateOutput> {
        let start = Instant::now();
        let latents = Tensor::zeros((1, 16, 2, 2), DType::F32, &Device::Cpu)?;
        let preview = image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        for step in 1..=req.steps {
            if step == 1 {
                let mut open = self.gate.0.lock().unwrap();
                while !*open {
                    open = self.gate.1.wait(open).unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(self.step_ms));
            let ev = StepEvent {
                image_index: 0,
                step,
                total: req.steps,
                sigma: 1.0 - step as f32 / req.steps as f32,
                elapsed: start.elapsed(),
                denoised: &latents,
                latents: &latents,
                preview: Some(&preview),
            };
            if on_step(&ev) == Control::Cancel {
                return Err(engine::Error::Cancelled);
            }
        }
        Ok(GenerateOutput {
            images: vec![image::RgbImage::from_pixel(req.width as u32, req.height as u32, image::Rgb([200, 100, 50]))],
            seeds: vec![req.seed],
            timings: Timings { total: start.elapsed(), ..Timings::default() },
            prompt_truncated: None,
            latents,
        })
    }
}

fn tmp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("zimage-web-test-{}", store::new_id()))
}

fn studio_with(generator: Arc<dyn Generator>, capacity: usize) -> (Arc<Studio>, std::path::PathBuf) {
    let dir = tmp_dir();
    let store = Arc::new(ImageStore::open(&dir).unwrap());
    (Studio::start(vec![("CPU".into(), generator)], store, StudioLimits::capacity(capacity)).unwrap(), dir)
}

/// The one client of the tests that need only one.
fn local() -> ClientId {
    ClientId::new("ip:127.0.0.1")
}

fn gen_req(prompt: &str, steps: u32) -> JobRequest {
    JobRequest {
            negative_prompt: String::new(),
        prompt: prompt.into(),
        style: Style::Cinematic,
        steps,
        seed: Some(7),
        kind: JobKind::Generate { width: 1344, height: 768 },
        loras: vec![],
        variation: 0.0,
        variation_seed: None,
        written_prompt: None,
    }
}

/// Collects events until `n` jobs finished (or a timeout).
fn collect_until_done(rx: &mut tokio::sync::broadcast::Receiver<JobEvent>, n: usize) -> Vec<JobEvent> {
    // a liveness guard, generous for a loaded 2-core machine (the tiny model takes ~10 s unloaded)
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut out = Vec::new();
    let mut done = 0;
    while done < n && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(ev) => {
                if ev.is_terminal() {
                    done += 1;
                }
                out.push(ev);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert_eq!(done, n, "jobs did not finish: {out:?}");
    out
}

#[test]
fn fifo_positions_progress_and_stored_png() {
    let (studio, dir) = studio_with(Fake::new(5, false), 8);
    let mut rx = studio.queue.subscribe();
    let tickets: Vec<_> = ["one", "two", "three"]
        .iter()
        .map(|p| studio.submit(gen_req(p, 4), &local()).unwrap())
        .collect();
    assert_eq!(tickets[0].seed, 7);
    assert_eq!((tickets[0].width, tickets[0].height), (1344, 768));
    let events = collect_until_done(&mut rx, 3);
    let done: Vec<&str> = events
        .iter()
        .filter(|e| matches!(e, JobEvent::Done { .. }))
        .map(|e| e.job_id())
        .collect();
    let ids: Vec<&str> = tickets.iter().map(|t| t.job_id.as_str()).collect();
    assert_eq!(done, ids, "first in, first out");
    // the third job heard its position improve
    let third_positions: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Queued { job_id, position } if job_id == ids[2] => Some(*position),
            _ => None,
        })
        .collect();
    assert!(third_positions.contains(&1), "positions pushed: {third_positions:?}");
    // step events with previews for every step of the first job
    let steps: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Step { job_id, step, preview, total, .. } if job_id == ids[0] => {
                assert_eq!(*total, 4);
                assert!(preview.as_deref().unwrap().starts_with("data:image/jpeg;base64,"));
                Some(*step)
            }
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let JobEvent::Done { result, .. } = events.iter().find(|e| matches!(e, JobEvent::Done { .. })).unwrap() else {
        unreachable!()
    };
    assert_eq!(result.prompt, "one");
    assert_eq!((result.width, result.height), (1344, 768));
    let png = std::fs::read(studio.store.image_path(&result.image_id).unwrap()).unwrap();
    let params = engine::png_meta::read_parameters(&png).unwrap();
    assert!(params.starts_with("one, cinematic"), "{params}");
    assert!(params.contains("Seed: 7"));
    assert_eq!(studio.image(&result.image_id).unwrap(), *result);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bounded_queue_refuses_and_cancel_works() {
    let fake = Fake::new(5, true);
    let (studio, dir) = studio_with(fake.clone(), 1);
    let mut rx = studio.queue.subscribe();
    let running = studio.submit(gen_req("running", 8), &local()).unwrap();
    // wait until the worker took it
    let t0 = Instant::now();
    while studio.queue.waiting_len() > 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let waiting = studio.submit(gen_req("waiting", 8), &local()).unwrap();
    assert_eq!(waiting.position, 1);
    let full = studio.submit(gen_req("refused", 8), &local()).unwrap_err();
    assert_eq!(full.kind, ErrorKind::QueueFull);
    assert_eq!(full.status(), 503);
    assert!(full.reason.contains("queue is full"), "{}", full.reason);

    // cancel the waiting job: immediate
    studio.cancel(&waiting.job_id).unwrap();
    assert_eq!(studio.queue.snapshot(&waiting.job_id), Some(JobEvent::Cancelled { job_id: waiting.job_id.clone() }));
    // cancel the running one: it stops at its next step
    studio.cancel(&running.job_id).unwrap();
    fake.open();
    let events = collect_until_done(&mut rx, 2);
    let running_steps = events
        .iter()
        .filter(|e| matches!(e, JobEvent::Step { job_id, .. } if *job_id == running.job_id))
        .count();
    assert!(running_steps <= 1, "stopped at the next step, saw {running_steps}");
    assert!(events.contains(&JobEvent::Cancelled { job_id: running.job_id.clone() }));
    // unknown ids
    assert_eq!(studio.cancel(&store::new_id()).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(studio.cancel("nope").unwrap_err().kind, ErrorKind::InvalidInput);
    // the queue has room again
    assert!(studio.submit(gen_req("again", 4), &local()).is_ok());
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn server_side_validation() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let bad = |r: JobRequest| studio.submit(r, &local()).unwrap_err();
    assert_eq!(bad(gen_req("x", 2)).kind, ErrorKind::InvalidInput);
    assert_eq!(bad(gen_req("   ", 8)).kind, ErrorKind::InvalidInput);
    let mut r = gen_req("x", 8);
    r.kind = JobKind::Generate { width: 4096, height: 4096 };
    assert_eq!(bad(r).kind, ErrorKind::InvalidInput);
    let mut r = gen_req("x", 8);
    r.seed = Some(1 << 40);
    assert_eq!(bad(r).kind, ErrorKind::InvalidInput);
    let mut r = gen_req("x", 8);
    r.kind = JobKind::Transform { upload_id: store::new_id(), strength: 0.5 };
    assert_eq!(bad(r).kind, ErrorKind::NotFound);
    let mut png = Vec::new();
    image::RgbImage::new(64, 64).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let up = studio.store_upload(png, None).unwrap();
    assert_eq!((up.width, up.height), (512, 512));
    let mut r = gen_req("x", 4);
    r.kind = JobKind::Transform { upload_id: up.upload_id.clone(), strength: 0.05 };
    let e = bad(r);
    assert!(e.reason.contains("Strength must be between 0.1 and 1"), "{}", e.reason);
    let mut r = gen_req("x", 8);
    r.kind = JobKind::Transform { upload_id: up.upload_id, strength: 0.5 };
    let t = studio.submit(r, &local()).unwrap();
    assert_eq!((t.width, t.height), (512, 512));
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

// ------------------------------------------------------------------------------------------
// HTTP

fn test_router(studio: Arc<Studio>) -> Router {
    let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
    router(studio, options, FramePolicy::new(&["http://127.0.0.1:3101".into()]).unwrap())
}

async fn send(app: &Router, req: HttpRequest<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap().to_vec();
    (status, headers, body)
}

fn json_post(path: &str, body: serde_json::Value) -> HttpRequest<Body> {
    HttpRequest::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_with_status() {
    let (studio, dir) = studio_with(Fake::new(1, true), 1);
    let app = test_router(studio.clone());

    // invalid input -> 400 {kind, reason}
    let mut req = serde_json::to_value(gen_req("a cat", 99)).unwrap();
    let (s, _, b) = send(&app, json_post("/api/submit_job", serde_json::json!({ "req": req.clone() }))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e: StudioError = serde_json::from_slice(&b).unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.reason.contains("Steps must be between 4 and 16"), "{}", e.reason);

    // unreadable body -> 400
    let (s, h, b) = send(&app, json_post("/api/submit_job", serde_json::json!({ "nope": 1 }))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{h:?} {}", String::from_utf8_lossy(&b));

    // accepted, then the queue fills up -> 503
    req["steps"] = 8.into();
    let (s, _, b) = send(&app, json_post("/api/submit_job", serde_json::json!({ "req": req.clone() }))).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let t: app::types::JobTicket = serde_json::from_slice(&b).unwrap();
    assert_eq!(t.seed, 7);
    let mut status = StatusCode::OK;
    for _ in 0..3 {
        status = send(&app, json_post("/api/submit_job", serde_json::json!({ "req": req.clone() }))).await.0;
    }
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // unknown image -> 404 JSON
    let get = |uri: &str| HttpRequest::builder().uri(uri).body(Body::empty()).unwrap();
    let (s, _, b) = send(&app, get(&format!("/images/{}.png", store::new_id()))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&b).contains("not_found"));
    let (s, _, _) = send(&app, get("/images/..%2F..%2Fetc%2Fpasswd.png")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = send(&app, json_post("/api/image_info", serde_json::json!({ "image_id": store::new_id() }))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // uploads: declared too large -> 413 before reading; not an image -> 415
    let boundary = "XyZ";
    let big = HttpRequest::builder()
        .method(Method::POST)
        .uri("/api/upload_image")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .header("content-length", (30 * 1024 * 1024).to_string())
        .body(Body::empty())
        .unwrap();
    let (s, _, b) = send(&app, big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&b));
    let text = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    );
    let up = HttpRequest::builder()
        .method(Method::POST)
        .uri("/api/upload_image")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(text))
        .unwrap();
    let (s, _, b) = send(&app, up).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", String::from_utf8_lossy(&b));
    let e: StudioError = serde_json::from_slice(&b).unwrap();
    assert!(e.reason.contains("PNG, JPEG or WebP"));

    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_api_answers_with_the_png_or_its_json() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let app = test_router(studio.clone());
    let body = serde_json::to_value(gen_req("a cat", 4)).unwrap();
    let png_post = |b: &serde_json::Value| {
        HttpRequest::builder()
            .method(Method::POST)
            .uri("/api/generate")
            .header("content-type", "application/json")
            .body(Body::from(b.to_string()))
            .unwrap()
    };

    let (s, h, png) = send(&app, png_post(&body)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&png));
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["x-seed"], "7");
    assert_eq!(h["x-size"], "1344x768");
    assert_eq!(image::load_from_memory(&png).unwrap().dimensions_wh(), (1344, 768));
    // the same bytes are kept for the share link
    let id = h["x-image-id"].to_str().unwrap().to_string();
    assert_eq!(h["content-location"].to_str().unwrap(), format!("/images/{id}.png"));
    assert_eq!(h["x-share-url"].to_str().unwrap(), format!("/share/{id}"));
    let (s, _, stored) = send(&app, HttpRequest::builder().uri(format!("/images/{id}.png")).body(Body::empty()).unwrap()).await;
    assert_eq!((s, stored == png), (StatusCode::OK, true));

    // Accept: application/json -> the JobResult
    let (s, h, b) = send(&app, json_post("/api/generate", body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert!(h["content-type"].to_str().unwrap().starts_with("application/json"));
    let r: app::types::JobResult = serde_json::from_slice(&b).unwrap();
    assert_eq!((r.width, r.height, r.seed, r.steps), (1344, 768, 7, 4));
    assert_ne!(r.image_id, id);

    // bad input and unreadable bodies -> 400 {kind, reason}
    let mut bad = body.clone();
    bad["steps"] = 99.into();
    let (s, _, b) = send(&app, png_post(&bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e: StudioError = serde_json::from_slice(&b).unwrap();
    assert!(e.reason.contains("Steps must be between 4 and 16"), "{}", e.reason);
    let (s, _, b) = send(&app, png_post(&serde_json::json!({ "prompt": "no kind" }))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e: StudioError = serde_json::from_slice(&b).unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.reason.contains("not a generation request"), "{}", e.reason);

    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_keeps_every_image_across_a_restart_with_parallel_writers() {
    // Two workers write history rows at the same time; the server restarts; everything is there:
    // rows (searchable, newest first, with their source), files, thumbnails and share pages.
    let dir = tmp_dir();
    let gens: Vec<(String, Arc<dyn Generator>)> = vec![("A".into(), Fake::new(1, false)), ("B".into(), Fake::new(1, false))];
    let studio = Studio::start(gens, Arc::new(ImageStore::open(&dir).unwrap()), StudioLimits::capacity(16)).unwrap();
    let app = test_router(studio.clone());
    let mut handles = Vec::new();
    for i in 0..8u64 {
        let app = app.clone();
        let mut req = gen_req(if i % 2 == 0 { "red fox" } else { "blue whale" }, 4);
        req.seed = Some(100 + i);
        let body = serde_json::to_value(req).unwrap();
        handles.push(tokio::spawn(async move { send(&app, json_post("/api/generate", body)).await }));
    }
    let mut ids = Vec::new();
    for h in handles {
        let (s, _, b) = h.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        ids.push(serde_json::from_slice::<app::types::JobResult>(&b).unwrap().image_id);
    }
    // a studio-page job too
    let ticket = studio.submit(gen_req("studio fox", 4), &local()).unwrap();
    let mut rx = studio.queue.subscribe();
    while studio.queue.snapshot(&ticket.job_id).is_none_or(|e| !e.is_terminal()) {
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
    }
    studio.shutdown();
    drop(app);
    drop(studio);

    let studio = Studio::start(vec![("CPU".into(), Fake::new(1, false) as Arc<dyn Generator>)], Arc::new(ImageStore::open(&dir).unwrap()), StudioLimits::capacity(4)).unwrap();
    let app = test_router(studio.clone());
    let all = studio.history("", 0).unwrap();
    assert_eq!(all.total, 9, "every image is listed after the restart");
    let foxes = studio.history("fox", 0).unwrap();
    assert_eq!(foxes.total, 5);
    assert_eq!(foxes.items[0].result.source, app::types::JobSource::Studio, "newest first: the studio job");
    assert!(foxes.items[1..].iter().all(|i| i.result.source == app::types::JobSource::HttpApi));
    for id in &ids {
        for path in [format!("/images/{id}.png"), format!("/thumbs/{id}.jpg")] {
            let (s, _, _) = send(&app, HttpRequest::builder().uri(&path).body(Body::empty()).unwrap()).await;
            assert_eq!(s, StatusCode::OK, "{path}");
        }
        assert_eq!(&studio.image(id).unwrap().image_id, id, "share page metadata");
    }
    // delete: row, files, thumbnail and share page go; a second delete is a 404
    studio.delete_image(&ids[0]).unwrap();
    assert_eq!(studio.history("", 0).unwrap().total, 8);
    let (s, _, _) = send(&app, HttpRequest::builder().uri(format!("/images/{}.png", ids[0])).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(studio.image(&ids[0]).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(studio.delete_image(&ids[0]).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(studio.delete_image("../etc").unwrap_err().kind, ErrorKind::InvalidInput);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_device_fault_fails_that_job_alone_and_both_workers_go_on() {
    // Two workers (as two GPUs would be), each on the real engine (the tiny model on the CPU), with
    // a fault injected through the engine's test hook: an out-of-memory error on one, a panic
    // inside the generation on the other. Each fails its own job with a clear reason; every other
    // job finishes, and both workers keep taking jobs.
    use engine::pipeline::{InjectedFault, Pipeline};
    let a = Pipeline::load(&engine::loader::ModelSource::Tiny, &Device::Cpu).unwrap();
    let b = Pipeline::load(&engine::loader::ModelSource::Tiny, &Device::Cpu).unwrap();
    a.inject_fault(InjectedFault::OutOfMemory, 1);
    b.inject_fault(InjectedFault::Panic, 1);
    let dir = tmp_dir();
    let loras = Arc::new(engine::lora::LoraLibrary::new(dir.join("loras")));
    let a = Arc::new(super::PipelineGenerator::new(a, loras.clone()));
    let b = Arc::new(super::PipelineGenerator::new(b, loras));
    let gens: Vec<(String, Arc<dyn Generator>)> = vec![("GPU 0".into(), a.clone()), ("GPU 1".into(), b.clone())];
    let studio = Studio::start(gens, Arc::new(ImageStore::open(&dir).unwrap()), StudioLimits::capacity(16)).unwrap();
    let mut rx = studio.queue.subscribe();
    let mut finals = Vec::new();
    for round in 0..2 {
        for i in 0..4u64 {
            let mut r = gen_req("a lighthouse", 4);
            r.seed = Some(round * 10 + i);
            r.kind = JobKind::Generate { width: 1024, height: 1024 };
            studio.submit(r, &local()).unwrap();
        }
        finals.extend(collect_until_done(&mut rx, 4).into_iter().filter(|e| e.is_terminal()));
    }
    let reasons: Vec<String> = finals.iter().filter_map(|e| match e { JobEvent::Error { reason, .. } => Some(reason.clone()), _ => None }).collect();
    let done = finals.iter().filter(|e| matches!(e, JobEvent::Done { .. })).count();
    assert_eq!((a.with_pipeline(|p| p.pending_faults()), b.with_pipeline(|p| p.pending_faults())), (0, 0), "both faults fired");
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("ran out of memory")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("crashed")), "{reasons:?}");
    assert_eq!(done, 6, "every other job finished");
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

/// The id of the next job a worker starts.
async fn next_started(rx: &mut tokio::sync::broadcast::Receiver<JobEvent>) -> String {
    loop {
        if let JobEvent::Started { job_id, .. } = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap() {
            return job_id;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_api_cancels_the_job_of_a_client_that_left_and_reports_cancels() {
    let fake = Fake::new(1, true);
    let (studio, dir) = studio_with(fake.clone(), 4);
    let app = test_router(studio.clone());
    let body = serde_json::to_value(gen_req("a cat", 4)).unwrap();
    let mut rx = studio.queue.subscribe();

    // a client that goes away while its job runs: the job is cancelled, not finished for nobody
    let call = tokio::spawn({
        let app = app.clone();
        let body = body.clone();
        async move { send(&app, json_post("/api/generate", body)).await }
    });
    let job_id = next_started(&mut rx).await;
    call.abort();
    let _ = call.await;
    fake.open();
    let end = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        if ev.is_terminal() && ev.job_id() == job_id {
            break ev;
        }
    };
    assert!(matches!(end, JobEvent::Cancelled { .. }), "{end:?}");

    // a job cancelled through cancel_job answers its waiting client with 409
    let fake2 = Fake::new(1, true);
    let (studio2, dir2) = studio_with(fake2.clone(), 4);
    let app2 = test_router(studio2.clone());
    let mut rx2 = studio2.queue.subscribe();
    let call = tokio::spawn({
        let app2 = app2.clone();
        async move { send(&app2, json_post("/api/generate", body)).await }
    });
    let job_id = next_started(&mut rx2).await;
    studio2.cancel(&job_id).unwrap();
    fake2.open();
    let (s, _, b) = call.await.unwrap();
    assert_eq!(s, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&b));
    let e: StudioError = serde_json::from_slice(&b).unwrap();
    assert_eq!(e.kind, ErrorKind::Cancelled);

    studio.shutdown();
    studio2.shutdown();
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir2).ok();
}

/// A GET as a browser at 127.0.0.1:3400 sends it.
fn page_get(uri: &str) -> HttpRequest<Body> {
    HttpRequest::builder().uri(uri).header("host", "127.0.0.1:3400").body(Body::empty()).unwrap()
}

/// The page's CSP is the studio's policy with exactly the hashes of the page's inline scripts,
/// which are found here without the middleware's tokenizer (every `<script>` without `src`).
fn assert_csp_allows_exactly_the_inline_scripts(headers: &axum::http::HeaderMap, html: &str, ancestors: &str) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut hashes: Vec<String> = Vec::new();
    for open in html.split("<script").skip(1) {
        let (tag, rest) = open.split_once('>').unwrap();
        if tag.contains(" src=") {
            continue;
        }
        let text = rest.split_once("</script>").map_or(rest, |(text, _)| text);
        let h = format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text)));
        if !hashes.contains(&h) {
            hashes.push(h);
        }
    }
    assert!(!hashes.is_empty(), "every page has the hydration script");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert_eq!(csp, security::content_security_policy(ancestors, Some("127.0.0.1:3400"), &hashes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_render_with_security_headers() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let app = test_router(studio.clone());

    let (s, h, b) = send(&app, page_get("/")).await;
    assert_eq!(s, StatusCode::OK);
    let html = String::from_utf8_lossy(&b);
    assert!(html.contains("Z-Image Turbo Studio"));
    assert!(html.contains("tiny-banner"), "tiny model banner is rendered on the server");
    assert!(html.contains("/manifest.webmanifest"));
    assert!(html.contains("/pkg/zimage.js"), "the hydration script loads the bundle");
    assert!(!html.contains(" style="), "style-src 'self' refuses inline style attributes");
    assert_eq!(h["x-frame-options"], "SAMEORIGIN");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_csp_allows_exactly_the_inline_scripts(&h, &html, "'self'");

    let (s, h, b) = send(&app, page_get("/embed")).await;
    assert_eq!(s, StatusCode::OK);
    let html = String::from_utf8_lossy(&b);
    assert!(html.contains("embed-prompt"));
    assert!(h.get("x-frame-options").is_none());
    assert_csp_allows_exactly_the_inline_scripts(&h, &html, "'self' http://127.0.0.1:3101");

    let (s, h, b) = send(&app, page_get(&format!("/share/{}", store::new_id()))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let html = String::from_utf8_lossy(&b);
    assert!(html.contains("does not exist"));
    assert_csp_allows_exactly_the_inline_scripts(&h, &html, "'self'");

    let (s, h, b) = send(&app, page_get("/no/such/page")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_csp_allows_exactly_the_inline_scripts(&h, &String::from_utf8_lossy(&b), "'self'");

    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_full_of_markup_adds_no_script_to_its_share_page() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let app = test_router(studio.clone());
    let share_page = |prompt: &'static str| {
        let app = app.clone();
        async move {
            let req = serde_json::to_value(gen_req(prompt, 4)).unwrap();
            let (s, _, b) = send(&app, json_post("/api/generate", req)).await;
            assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            let r: app::types::JobResult = serde_json::from_slice(&b).unwrap();
            let (s, h, b) = send(&app, page_get(&r.share_url)).await;
            assert_eq!(s, StatusCode::OK);
            let html = String::from_utf8(b).unwrap();
            assert_csp_allows_exactly_the_inline_scripts(&h, &html, "'self'");
            html
        }
    };
    let plain = share_page("a quiet harbour").await;
    // (the share page's <title> holds the prompt's first 60 characters)
    let hostile = share_page("</title><script>alert(1)</script><!--<script>--><img src=x onerror=alert(2)><style>*{}</style>").await;
    // Leptos streams a Suspense out of order when its resource resolves late (a loaded machine):
    // that adds one fixed swap script to either page, so it is left out of the comparison.
    let page_scripts = |html: &str| -> Vec<Vec<u8>> {
        security::inline_scripts(html.as_bytes())
            .into_iter()
            .filter(|s| !s.starts_with(b"(function() { let id = "))
            .map(<[u8]>::to_vec)
            .collect()
    };
    let plain_scripts = page_scripts(&plain).len();
    let hostile_scripts = page_scripts(&hostile);
    assert_eq!(hostile_scripts.len(), plain_scripts, "the prompt made no script of its own");
    assert!(hostile_scripts.iter().all(|s| !s.contains(&b'<')), "the serialized prompt cannot close its script");
    assert!(!hostile_scripts.iter().any(|s| s.starts_with(b"alert(")), "the prompt's script is not allowed");
    assert!(!hostile.contains("<img src=x"), "the prompt is escaped in the markup");
    assert!(hostile.contains("<title>&lt;/title&gt;&lt;script&gt;alert(1)"), "the title too");
    assert!(hostile.contains("class=\"share-prompt\""));

    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_responses_keep_their_bodies_and_get_the_policy_without_hashes() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let app = test_router(studio.clone());
    let (s, h, b) = send(&app, page_get("/healthz")).await;
    assert_eq!((s, b.as_slice()), (StatusCode::OK, b"ok".as_slice()));
    assert_eq!(h["content-security-policy"], security::content_security_policy("'self'", Some("127.0.0.1:3400"), &[]));
    let (s, h, b) = send(&app, page_get(&format!("/images/{}.png", store::new_id()))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(h["content-type"].to_str().unwrap().starts_with("application/json"));
    assert!(serde_json::from_slice::<StudioError>(&b).is_ok());
    assert!(!h["content-security-policy"].to_str().unwrap().contains("sha256-"));
    // an /embed response keeps the embed's ancestors whatever its type
    let (_, h, _) = send(&app, page_get("/embed/nothing-here")).await;
    assert!(h["content-security-policy"].to_str().unwrap().ends_with("frame-ancestors 'self' http://127.0.0.1:3101"));

    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

/// The real tiny model through the queue: one Generate at a real ratio and one Transform.
#[test]
fn tiny_model_end_to_end() {
    let pipeline = engine::pipeline::Pipeline::load(&engine::loader::ModelSource::Tiny, &Device::Cpu).unwrap();
    let loras = Arc::new(engine::lora::LoraLibrary::new(tmp_dir().join("loras")));
    let (studio, dir) = studio_with(Arc::new(super::PipelineGenerator::new(pipeline, loras)), 4);
    let mut rx = studio.queue.subscribe();
    let t = Instant::now();
    let g = studio.submit(gen_req("a lighthouse at dusk", 4), &local()).unwrap();
    let events = collect_until_done(&mut rx, 1);
    eprintln!("tiny 1344x768, 4 steps: {:.1?}", t.elapsed());
    let Some(JobEvent::Done { result, .. }) = events.last() else { panic!("{events:?}") };
    assert_eq!(result.image_id.len(), 32);
    let png = std::fs::read(studio.store.image_path(&result.image_id).unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().dimensions_wh(), (1344, 768));
    assert!(events.iter().any(|e| matches!(e, JobEvent::Step { job_id, preview: Some(_), .. } if *job_id == g.job_id)));

    let mut input = Vec::new();
    image::RgbImage::from_pixel(640, 480, image::Rgb([30, 90, 200]))
        .write_to(&mut std::io::Cursor::new(&mut input), image::ImageFormat::Jpeg)
        .unwrap();
    let up = studio.store_upload(input, Some("image/jpeg".into())).unwrap();
    assert_eq!((up.width, up.height), (688, 512));
    let mut r = gen_req("watercolor harbor", 4);
    r.kind = JobKind::Transform { upload_id: up.upload_id, strength: 0.5 };
    studio.submit(r, &local()).unwrap();
    let events = collect_until_done(&mut rx, 1);
    let Some(JobEvent::Done { result, .. }) = events.last() else { panic!("{events:?}") };
    assert_eq!((result.width, result.height), (688, 512));
    assert_eq!(result.strength, Some(0.5));
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

trait Wh {
    fn dimensions_wh(&self) -> (u32, u32);
}
impl Wh for image::DynamicImage {
    fn dimensions_wh(&self) -> (u32, u32) {
        (self.width(), self.height())
    }
}

#[allow(dead_code)]
fn _assert_queue_is_shareable(q: Arc<JobQueue>) -> impl Send + Sync {
    q
}

// ------------------------------------------------------------------------------------------
// Limits per client, fair queue, bodies, timeouts, readiness (issue 10)

fn client(ip: &str) -> ClientId {
    ClientId::new(format!("ip:{ip}"))
}

fn studio_limited(generator: Arc<dyn Generator>, limits: StudioLimits) -> (Arc<Studio>, std::path::PathBuf) {
    let dir = tmp_dir();
    let store = Arc::new(ImageStore::open(&dir).unwrap());
    (Studio::start(vec![("CPU".into(), generator)], store, limits).unwrap(), dir)
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn fair_queue_starts_another_clients_job_next_but_one() {
    let fake = Fake::new(1, true);
    let (studio, dir) = studio_with(fake.clone(), 64);
    let mut rx = studio.queue.subscribe();
    let (flooder, other) = (client("10.0.0.1"), client("10.0.0.2"));
    let first = studio.submit(gen_req("flood 0", 4), &flooder).unwrap();
    wait_until("the worker took the first job", || studio.queue.running_len() == 1);
    let flood: Vec<_> = (1..50).map(|i| studio.submit(gen_req(&format!("flood {i}"), 4), &flooder).unwrap()).collect();
    assert_eq!(flood.last().unwrap().position, 49);
    let mine = studio.submit(gen_req("just one", 4), &other).unwrap();
    assert_eq!(mine.position, 2, "behind the flooder's next job, ahead of its other 48");
    // the flooder's third job moved back one place, and was told so
    assert_eq!(studio.queue.snapshot(&flood[1].job_id), Some(JobEvent::Queued { job_id: flood[1].job_id.clone(), position: 3 }));
    fake.open();
    let events = collect_until_done(&mut rx, 51);
    let started: Vec<&str> = events
        .iter()
        .filter_map(|e| matches!(e, JobEvent::Started { .. }).then(|| e.job_id()))
        .collect();
    assert_eq!(&started[..3], &[first.job_id.as_str(), flood[0].job_id.as_str(), mine.job_id.as_str()]);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn cap_per_client_counts_waiting_and_running_jobs() {
    let fake = Fake::new(1, true);
    let limits = StudioLimits { queue: QueueLimits { capacity: 16, max_per_client: 2, job_timeout: None }, submissions_per_minute: 0 };
    let (studio, dir) = studio_limited(fake.clone(), limits);
    let (a, b) = (client("10.0.0.1"), client("10.0.0.2"));
    let running = studio.submit(gen_req("a0", 4), &a).unwrap();
    wait_until("the worker took the first job", || studio.queue.running_len() == 1);
    studio.submit(gen_req("a1", 4), &a).unwrap();
    let e = studio.submit(gen_req("a2", 4), &a).unwrap_err();
    assert_eq!((e.kind, e.status(), e.retry_after_secs), (ErrorKind::RateLimited, 429, Some(10)));
    assert!(e.reason.contains("at most 2 per client"), "{}", e.reason);
    // another client is not held back
    studio.submit(gen_req("b0", 4), &b).unwrap();
    // once a job ends, the client may submit again
    studio.cancel(&running.job_id).unwrap();
    fake.open();
    wait_until("the cancelled job ended", || studio.queue.snapshot(&running.job_id).is_some_and(|e| e.is_terminal()));
    studio.submit(gen_req("a2", 4), &a).unwrap();
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_job_past_the_time_limit_fails_with_a_reason() {
    let limits = StudioLimits {
        queue: QueueLimits { capacity: 4, max_per_client: 0, job_timeout: Some(Duration::from_millis(100)) },
        submissions_per_minute: 0,
    };
    let (studio, dir) = studio_limited(Fake::new(60, false), limits);
    let mut rx = studio.queue.subscribe();
    let slow = studio.submit(gen_req("slow", 16), &local()).unwrap();
    let events = collect_until_done(&mut rx, 1);
    let steps = events.iter().filter(|e| matches!(e, JobEvent::Step { .. })).count();
    assert!(steps < 16, "stopped early ({steps} steps)");
    match events.last().unwrap() {
        JobEvent::Error { job_id, reason } => {
            assert_eq!(job_id, &slow.job_id);
            assert!(reason.contains("ran longer than this server's limit"), "{reason}");
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(studio.metrics_text().contains("zimage_jobs_total{outcome=\"error\"} 1"), "{}", studio.metrics_text());
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

fn from(req: HttpRequest<Body>, ip: &str) -> HttpRequest<Body> {
    let mut req = req;
    let addr: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
    req
}

/// Every submission door refuses an over-limit client with 429, `Retry-After` and a reason in its
/// own error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_clients_get_429_with_retry_after_on_every_api() {
    let fake = Fake::new(1, true);
    let limits = StudioLimits { queue: QueueLimits { capacity: 16, max_per_client: 0, job_timeout: None }, submissions_per_minute: 2 };
    let (studio, dir) = studio_limited(fake.clone(), limits);
    let app = test_router(studio.clone());
    let req = serde_json::to_value(gen_req("a cat", 4)).unwrap();
    for _ in 0..2 {
        let (s, _, b) = send(&app, from(json_post("/api/submit_job", serde_json::json!({ "req": req.clone() })), "10.0.0.1")).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    }
    let retry = |h: &axum::http::HeaderMap| h.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());

    let (s, h, b) = send(&app, from(json_post("/api/submit_job", serde_json::json!({ "req": req.clone() })), "10.0.0.1")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry(&h).is_some_and(|r| (1..=30).contains(&r)), "{h:?}");
    let e: StudioError = serde_json::from_slice(&b).unwrap();
    assert_eq!(e.kind, ErrorKind::RateLimited);
    assert!(e.reason.contains("2 per minute"), "{}", e.reason);

    let (s, h, b) = send(&app, from(json_post("/api/generate", req.clone()), "10.0.0.1")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry(&h).is_some());
    assert_eq!(serde_json::from_slice::<StudioError>(&b).unwrap().kind, ErrorKind::RateLimited);

    let (s, h, b) = send(&app, from(json_post("/v1/images/generations", serde_json::json!({"prompt": "a cat"})), "10.0.0.1")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry(&h).is_some());
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("per minute"));

    let (s, h, b) = send(&app, from(json_post("/sdapi/v1/txt2img", serde_json::json!({"prompt": "a cat"})), "10.0.0.1")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry(&h).is_some());
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"], "TooManyRequests", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("per minute"));

    // another address has its own allowance
    let (s, _, _) = send(&app, from(json_post("/api/submit_job", serde_json::json!({ "req": req.clone() })), "10.0.0.2")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(studio.metrics_text().contains("zimage_submissions_refused_total{reason=\"rate_limited\"} 4"), "{}", studio.metrics_text());
    fake.open();
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

/// The API key's holder is one client wherever it connects from; without the key, the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_names_the_client() {
    let fake = Fake::new(1, true);
    let limits = StudioLimits { queue: QueueLimits { capacity: 16, max_per_client: 1, job_timeout: None }, submissions_per_minute: 0 };
    let (studio, dir) = studio_limited(fake.clone(), limits);
    let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
    let settings = RouterSettings { api_key: Some("sesame".into()), timeouts: Timeouts::default() };
    let app = router_with(studio.clone(), options, FramePolicy::new(&[]).unwrap(), settings)
        .layer(axum::extract::connect_info::MockConnectInfo(std::net::SocketAddr::from(([10, 0, 0, 9], 1))));
    let req = serde_json::to_value(gen_req("a cat", 4)).unwrap();
    let keyed = |ip: &str| {
        let mut r = from(json_post("/api/submit_job", serde_json::json!({ "req": req.clone() })), ip);
        r.headers_mut().insert("authorization", "Bearer sesame".parse().unwrap());
        r
    };
    assert_eq!(send(&app, keyed("10.0.0.1")).await.0, StatusCode::OK);
    assert_eq!(send(&app, keyed("10.0.0.2")).await.0, StatusCode::TOO_MANY_REQUESTS, "same key, other address: same client");
    // no key and no ConnectInfo of its own: the MockConnectInfo address, a client of its own
    let plain = json_post("/api/submit_job", serde_json::json!({ "req": req.clone() }));
    assert_eq!(send(&app, plain).await.0, StatusCode::OK);
    fake.open();
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let app = test_router(studio.clone());
    let get = |uri: &str| HttpRequest::builder().uri(uri).body(Body::empty()).unwrap();
    let (s, _, b) = send(&app, get("/readyz")).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((v["ready"].clone(), v["model_loaded"].clone(), v["workers"]["total"].clone()), (true.into(), true.into(), 1.into()), "{v}");
    assert_eq!(v["queue"]["waiting"], 0);
    studio.submit(gen_req("one", 4), &local()).unwrap();
    let mut rx = studio.queue.subscribe();
    collect_until_done(&mut rx, 1);
    let (s, h, b) = send(&app, get("/metrics")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(b).unwrap();
    for needle in [
        "zimage_jobs_total{outcome=\"done\"} 1",
        "zimage_queue_depth 0",
        "zimage_step_seconds_count 3",
        "zimage_job_seconds_count 1",
        "zimage_queue_wait_seconds_count 1",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }
    // draining: not ready, submissions refused with 503 and a reason
    studio.queue.drain("stopping");
    let (s, _, b) = send(&app, get("/readyz")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&b).contains("draining"));
    let (s, _, b) = send(&app, json_post("/api/submit_job", serde_json::json!({ "req": gen_req("late", 4) }))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(serde_json::from_slice::<StudioError>(&b).unwrap().reason.contains("shutting down"));
    // while the model loads: alive, not ready, and everything else refused with a reason
    let starting = starting_router(Duration::from_secs(5));
    assert_eq!(send(&starting, get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(send(&starting, get("/readyz")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (s, h, b) = send(&starting, json_post("/v1/images/generations", serde_json::json!({"prompt": "x"}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"));
    assert!(String::from_utf8_lossy(&b).contains("still loading"));
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn drain_fails_waiting_jobs_and_stopped_running_ones_with_a_reason() {
    let fake = Fake::new(1, true);
    let (studio, dir) = studio_with(fake.clone(), 8);
    let mut rx = studio.queue.subscribe();
    let running = studio.submit(gen_req("running", 4), &local()).unwrap();
    wait_until("the worker took the first job", || studio.queue.running_len() == 1);
    let waiting = studio.submit(gen_req("waiting", 4), &local()).unwrap();
    assert_eq!(studio.queue.drain("The server is shutting down."), 1);
    assert_eq!(studio.submit(gen_req("late", 4), &local()).unwrap_err().kind, ErrorKind::Unavailable);
    assert_eq!(studio.queue.snapshot(&waiting.job_id), Some(JobEvent::Error { job_id: waiting.job_id.clone(), reason: "The server is shutting down.".into() }));
    // past the drain deadline the running job is stopped: it fails with the reason, not as "cancelled"
    studio.queue.stop_running("Stopped by the shutdown.");
    fake.open();
    let events = collect_until_done(&mut rx, 2);
    assert!(events.contains(&JobEvent::Error { job_id: waiting.job_id.clone(), reason: "The server is shutting down.".into() }));
    assert!(events.contains(&JobEvent::Error { job_id: running.job_id.clone(), reason: "Stopped by the shutdown.".into() }), "{events:?}");
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

// --- over real sockets: what a client library sees ----------------------------------------

/// Serves `app` on 127.0.0.1:0 with our accept loop; the address, and the switch that stops it.
pub(super) async fn serve_on_socket(app: Router, header_timeout: Duration) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_app_tx, app_rx) = tokio::sync::watch::channel(app);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _app_tx;
        listen::serve(listener, app_rx, header_timeout, stop_rx, Duration::from_secs(1)).await
    });
    (addr, stop_tx)
}

/// A raw socket that has asked for `/ws`'s upgrade (the answer is left for the caller to read).
pub(super) async fn websocket_upgrade(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    s
}

/// Sends `head` and then `body` in full (as a client library does, whatever the server
/// answers meanwhile), then reads the whole answer. A server that answered and closed without
/// reading makes the write or the read fail with a reset.
async fn raw_exchange(addr: std::net::SocketAddr, head: String, body: Vec<u8>) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(64 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.flush().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut answer)).await.expect("an answer in time");
    let wrote = writer.await.unwrap();
    read?;
    wrote?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn post_head(path: &str, content_type: &str, len: usize) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_wrong_type_bodies_get_their_reason_not_a_reset() {
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let (addr, stop) = serve_on_socket(test_router(studio.clone()), Duration::from_secs(5)).await;
    let three_mb = vec![b'x'; 3 * 1024 * 1024];
    for (path, shape) in [("/api/submit_job", "\"kind\":\"payload_too_large\""), ("/v1/images/generations", "\"code\":\"payload_too_large\""), ("/sdapi/v1/txt2img", "\"error\":\"PayloadTooLarge\"")] {
        for _ in 0..5 {
            let answer = raw_exchange(addr, post_head(path, "application/json", three_mb.len()), three_mb.clone()).await.expect("no reset");
            assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {}", &answer[..answer.len().min(300)]);
            assert!(answer.contains("at most 256 KiB") && answer.contains(shape), "{path}: {answer}");
        }
    }
    // a body over the limit without a declared length (chunked)
    let mut chunked = String::new();
    for _ in 0..48 {
        chunked.push_str(&format!("{:x}\r\n{}\r\n", 8192, "y".repeat(8192)));
    }
    chunked.push_str("0\r\n\r\n");
    let head = "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string();
    let answer = raw_exchange(addr, head, chunked.into_bytes()).await.expect("no reset");
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("256 KiB"), "{answer}");
    // an upload over 20 MB, and a GIF-sized body that is not a form, to the upload function
    let thirty_mb = vec![0u8; 30 * 1024 * 1024];
    let answer = raw_exchange(addr, post_head("/api/upload_image", "multipart/form-data; boundary=XyZ", thirty_mb.len()), thirty_mb).await.expect("no reset");
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("at most 20 MB"), "{}", &answer[..answer.len().min(300)]);
    let gif = [b"GIF89a".as_slice(), &[0u8; 200_000]].concat();
    let answer = raw_exchange(addr, post_head("/api/upload_image", "image/gif", gif.len()), gif).await.expect("no reset");
    assert!(answer.starts_with("HTTP/1.1 415") && answer.contains("multipart/form-data"), "{answer}");
    // the server is still fine
    let answer = raw_exchange(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), vec![]).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop.send_replace(true);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
    let timeouts = Timeouts { body: Duration::from_secs(1), ..Timeouts::default() };
    let app = router_with(studio.clone(), options, FramePolicy::new(&[]).unwrap(), RouterSettings { api_key: None, timeouts });
    let (addr, stop) = serve_on_socket(app, Duration::from_secs(1)).await;

    // slowloris: headers that never end are cut off after the header timeout
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("closed by the server");
    assert!(r.is_err() || !String::from_utf8_lossy(&buf).contains("200 OK"), "{}", String::from_utf8_lossy(&buf));
    assert!(t0.elapsed() < Duration::from_secs(5), "cut off after about 1 s, took {:?}", t0.elapsed());

    // a body that stops coming: 408 with the reason
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(post_head("/api/generate", "application/json", 1000).as_bytes()).await.unwrap();
    s.write_all(b"{\"prompt\":").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("answered in time").unwrap();
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("within 1 s"), "{answer}");
    stop.send_replace(true);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

/// A websocket message over our 16 KiB bound is answered with close code 1009, not a dropped
/// connection; `/metrics` asks for the API key when the server has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_message_gets_1009_and_metrics_need_the_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
    let settings = RouterSettings { api_key: Some("sesame".into()), timeouts: Timeouts::default() };
    let app = router_with(studio.clone(), options, FramePolicy::new(&[]).unwrap(), settings);

    let metrics = |auth: Option<&str>| {
        let mut r = HttpRequest::builder().uri("/metrics");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(Body::empty()).unwrap()
    };
    let (s, h, b) = send(&app, metrics(None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h["www-authenticate"], "Bearer");
    assert!(String::from_utf8_lossy(&b).contains("--api-key"));
    assert_eq!(send(&app, metrics(Some("Bearer wrong"))).await.0, StatusCode::UNAUTHORIZED);
    let (s, _, b) = send(&app, metrics(Some("Bearer sesame"))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&b).contains("zimage_queue_depth"));

    let (addr, stop) = serve_on_socket(app, Duration::from_secs(5)).await;
    let mut s = websocket_upgrade(addr).await;
    // one masked text frame of 20,000 bytes (mask 0: the payload goes as it is)
    let payload = vec![b'x'; 20_000];
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&payload);
    s.write_all(&frame).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("closed by the server").ok();
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
    let frames = &buf[buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    // 0x88: close; 0x03F1 = 1009
    let close = frames.windows(4).position(|w| w[0] == 0x88 && w[2] == 0x03 && w[3] == 0xF1);
    assert!(close.is_some(), "a close frame with code 1009 in {frames:?}");
    stop.send_replace(true);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_is_closed_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let (studio, dir) = studio_with(Fake::new(1, false), 4);
    let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
    let timeouts = Timeouts { ws_idle: Duration::from_secs(1), ..Timeouts::default() };
    let app = router_with(studio.clone(), options, FramePolicy::new(&[]).unwrap(), RouterSettings { api_key: None, timeouts });
    let (addr, stop) = serve_on_socket(app, Duration::from_secs(5)).await;
    let mut s = websocket_upgrade(addr).await;
    // a client that never answers (no pong, no message): pings, then a close frame with 1001
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("closed by the server");
    let _ = r;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let frames = &buf[buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let close = frames.windows(4).position(|w| w[0] == 0x88 && w[2] == 0x03 && w[3] == 0xE9);
    assert!(close.is_some(), "a close frame with code 1001 in {frames:?}");
    assert!(frames.starts_with(&[0x89, 0x00]), "pinged first: {frames:?}");
    assert!(t0.elapsed() >= Duration::from_millis(900) && t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    stop.send_replace(true);
    studio.shutdown();
    std::fs::remove_dir_all(dir).ok();
}
