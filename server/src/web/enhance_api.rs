//! Prompt enhancement over HTTP, on the studio's queue (the enhancer runs on the image workers'
//! device, so it waits its turn with the images):
//!
//! * `POST /api/enhance` — body: an [`EnhanceRequest`] (`{prompt, system?, max_new_tokens?,
//!   temperature?, top_p?, seed?, stream?}`). Answer: the [`EnhanceResult`] JSON with the
//!   `job_id`; with `"stream": true` or `Accept: text/event-stream`, server-sent events instead:
//!   each is a job event (`queued` with the place in line, `enhance_started`, one `enhance_text`
//!   per text delta, then `enhance_done`, `error` or `cancelled`), its `type` as the event name.
//!   Errors are the studio's `{kind, reason}`.
//! * `POST /v1/chat/completions` — OpenAI's chat completions (the `openai` SDKs): the system
//!   messages are the instructions (none given: ours), the last user message the prompt;
//!   `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stream` as OpenAI
//!   means them; streaming answers `chat.completion.chunk`s and `data: [DONE]`, with SSE comments
//!   saying where the request waits in the queue. Errors have OpenAI's shape.
//!
//! A client that goes away (a closed connection or stream) cancels its enhancement: the worker
//! stops at the next token.

use app::backend::ClientId;
use app::types::{limits, EnhanceRequest, EnhanceResult, JobEvent, JobSource};
use app::{ErrorKind, StudioError};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast::{self, error::RecvError};

use super::jobs::CancelOnDrop;
use super::openai_api::{ApiError, MODEL_ID};
use super::studio::Studio;

/// One enhancement submitted for this request: its events, and its cancel when the request goes.
struct Watch {
    events: broadcast::Receiver<JobEvent>,
    guard: CancelOnDrop,
    job_id: String,
    position: usize,
}

impl Watch {
    /// Submits `req` (subscribed first, so that no event of the job is missed).
    fn submit(studio: &Arc<Studio>, req: EnhanceRequest, source: JobSource, client: &ClientId) -> Result<Watch, StudioError> {
        let events = studio.queue.subscribe();
        let ticket = studio.enhance_from(req, source, client)?;
        Ok(Watch {
            events,
            guard: CancelOnDrop { studio: studio.clone(), pending: vec![ticket.job_id.clone()] },
            job_id: ticket.job_id,
            position: ticket.position,
        })
    }

    /// The job's next event; `None` once it ended (the final event was returned before) or the
    /// queue closed.
    async fn next(&mut self) -> Option<JobEvent> {
        if self.guard.pending.is_empty() {
            return None;
        }
        let ev = loop {
            match self.events.recv().await {
                Ok(ev) if ev.job_id() == self.job_id => break ev,
                Ok(_) => continue,
                // missed some (a flood of other jobs' events): the latest state, which ends the
                // stream when the job ended
                Err(RecvError::Lagged(_)) => match self.guard.studio.queue.snapshot(&self.job_id) {
                    Some(ev) => break ev,
                    None => continue,
                },
                Err(RecvError::Closed) => return None,
            }
        };
        if ev.is_terminal() {
            self.guard.pending.clear();
        }
        Some(ev)
    }

    /// Waits for the end: the result, or the failure as an error.
    async fn result(&mut self) -> Result<EnhanceResult, StudioError> {
        while let Some(ev) = self.next().await {
            match ev {
                JobEvent::EnhanceDone { result, .. } => return Ok(result),
                JobEvent::Error { reason, .. } => return Err(failure(reason)),
                JobEvent::Cancelled { .. } => return Err(StudioError::new(ErrorKind::Cancelled, "The enhancement was cancelled.")),
                _ => {}
            }
        }
        Err(StudioError::new(ErrorKind::Unavailable, "The server stopped before the enhancement finished.").retry_after(30))
    }
}

/// A failed enhancement's error: the engine's refusals (a prompt it cannot fit) are the caller's.
fn failure(reason: String) -> StudioError {
    if reason.starts_with("The enhancement failed") || reason.contains("crashed") {
        StudioError::internal(reason)
    } else if reason.contains("shutting down") || reason.contains("limit of") {
        StudioError::new(ErrorKind::Unavailable, reason)
    } else {
        StudioError::invalid(reason)
    }
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/event-stream"))
}

fn sse<S: Stream<Item = Result<Event, Infallible>> + Send + 'static>(stream: S) -> Response {
    // proxies must not hold the events back (nginx buffers otherwise)
    let mut res = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    res.headers_mut().insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    res
}

/// `POST /api/enhance`.
pub async fn enhance(
    State(studio): State<Arc<Studio>>,
    client: ClientId,
    headers: HeaderMap,
    body: Result<Json<EnhanceRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return StudioError::invalid(format!("The request body is not an enhancement request: {}", e.body_text())).into_response(),
    };
    let stream = req.stream || wants_stream(&headers);
    let mut watch = match Watch::submit(&studio, req, JobSource::HttpApi, &client) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    if !stream {
        return match watch.result().await {
            Ok(result) => {
                let mut body = serde_json::to_value(&result).expect("results serialize");
                body["job_id"] = json!(watch.job_id);
                Json(body).into_response()
            }
            Err(e) => e.into_response(),
        };
    }
    let events = futures::stream::unfold(watch, |mut watch| async move {
        let ev = watch.next().await?;
        let name = serde_json::to_value(&ev).ok().and_then(|v| v["type"].as_str().map(str::to_string)).unwrap_or_default();
        let event = Event::default().event(name).json_data(&ev).expect("events serialize");
        Some((Ok::<_, Infallible>(event), watch))
    });
    sse(events)
}

/// The text of a message's `content`: a string, or OpenAI's list of parts (the text parts).
fn content_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (other, _) => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("Only text message parts are supported (got a part of type `{}`).", other.unwrap_or("?")),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid("messages", "A message's content must be a string or a list of text parts.")),
    }
}

/// The chat request as an enhancement: the system (and developer) messages as the instructions,
/// the last user message as the prompt.
fn chat_request(body: &Value, studio: &Studio) -> Result<(EnhanceRequest, bool), ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::invalid("body", "The request body must be a JSON object."))?;
    if let Some(model) = obj.get("model") {
        let model = model.as_str().ok_or_else(|| ApiError::invalid("model", "`model` must be a string."))?;
        let ours = app::backend::Backend::info(studio).model;
        if model != MODEL_ID && model != ours {
            return Err(ApiError { code: Some("model_not_found"), ..ApiError::invalid("model", format!("The model `{model}` does not exist here; use `{MODEL_ID}`.")) });
        }
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a non-empty list of {role, content}."))?;
    let mut system: Option<String> = None;
    let mut prompt: Option<String> = None;
    for m in messages {
        let role = m["role"].as_str().ok_or_else(|| ApiError::invalid("messages", "Every message needs a `role`."))?;
        let text = content_text(&m["content"])?;
        match role {
            "system" | "developer" => {
                let s = system.get_or_insert_with(String::new);
                if !s.is_empty() {
                    s.push_str("\n\n");
                }
                s.push_str(&text);
            }
            "user" => prompt = Some(text),
            "assistant" | "tool" => {}
            other => return Err(ApiError::invalid("messages", format!("Unknown message role `{other}`."))),
        }
    }
    let prompt = prompt.ok_or_else(|| ApiError::invalid("messages", "There is no user message to answer."))?;
    let number = |key: &str| -> Result<Option<f64>, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a number."))),
        }
    };
    if let Some(n) = number("n")? {
        if n != 1.0 {
            return Err(ApiError::invalid("n", "Only n = 1 is supported."));
        }
    }
    let max_tokens = match number("max_completion_tokens")?.or(number("max_tokens")?) {
        Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= limits::MAX_ENHANCE_TOKENS as f64 => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid("max_tokens", format!("`max_tokens` must be a whole number from 1 to {} (got {n}).", limits::MAX_ENHANCE_TOKENS)))
        }
        None => None,
    };
    let seed = match number("seed")? {
        Some(s) if s >= 0.0 && s.fract() == 0.0 && s <= u64::MAX as f64 => Some(s as u64),
        Some(s) => return Err(ApiError::invalid("seed", format!("`seed` must be a whole number >= 0 (got {s})."))),
        None => None,
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::invalid("stream", "`stream` must be true or false."))?,
    };
    let req = EnhanceRequest {
        prompt,
        system,
        max_new_tokens: max_tokens,
        temperature: number("temperature")?.map(|t| t as f32),
        top_p: number("top_p")?.map(|p| p as f32),
        seed,
        stream,
    };
    Ok((req, stream))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One streamed `chat.completion.chunk`.
fn chunk(id: &str, created: u64, delta: Value, finish_reason: Option<&str>) -> Event {
    let body = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    Event::default().data(body.to_string())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(studio): State<Arc<Studio>>,
    client: ClientId,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(v)) => v,
        Err(e) => return ApiError::invalid("body", format!("The request body is not JSON: {}", e.body_text())).into_response(),
    };
    let (req, stream) = match chat_request(&body, &studio) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut watch = match Watch::submit(&studio, req, JobSource::OpenAi, &client) {
        Ok(w) => w,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let id = format!("chatcmpl-{}", watch.job_id);
    let created = unix_now();
    if !stream {
        return match watch.result().await {
            Ok(r) => Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": MODEL_ID,
                "system_fingerprint": format!("seed-{}", r.seed),
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": r.finish_reason,
                }],
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.tokens, "total_tokens": r.prompt_tokens + r.tokens},
            }))
            .into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
    }
    // first the role, then one chunk per delta, the finish reason, [DONE]
    let first = vec![
        Event::default().comment(format!("queued: position {} (enhancements share the queue with images)", watch.position)),
        chunk(&id, created, json!({"role": "assistant", "content": ""}), None),
    ];
    let head = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>));
    let body = futures::stream::unfold((watch, false), move |(mut watch, ended)| {
        let id = id.clone();
        async move {
            if ended {
                return None;
            }
            let Some(ev) = watch.next().await else {
                let err = json!({"error": {"message": "The server stopped before the answer finished.", "type": "server_error", "param": null, "code": "unavailable"}});
                return Some((vec![Event::default().data(err.to_string()), Event::default().data("[DONE]")], (watch, true)));
            };
            let events = match ev {
                JobEvent::Queued { position, .. } => vec![Event::default().comment(format!("queued: position {position}"))],
                JobEvent::EnhanceStarted { .. } => vec![Event::default().comment("writing")],
                JobEvent::EnhanceText { delta, .. } => vec![chunk(&id, created, json!({"content": delta}), None)],
                JobEvent::EnhanceDone { result, .. } => {
                    return Some((vec![chunk(&id, created, json!({}), Some(&result.finish_reason)), Event::default().data("[DONE]")], (watch, true)))
                }
                JobEvent::Error { reason, .. } => {
                    let e = ApiError::from(failure(reason));
                    let err = json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": e.code}});
                    return Some((vec![Event::default().data(err.to_string()), Event::default().data("[DONE]")], (watch, true)));
                }
                JobEvent::Cancelled { .. } => {
                    let err = json!({"error": {"message": "The request was cancelled.", "type": "server_error", "param": null, "code": "cancelled"}});
                    return Some((vec![Event::default().data(err.to_string()), Event::default().data("[DONE]")], (watch, true)));
                }
                _ => vec![],
            };
            Some((events, (watch, false)))
        }
    })
    .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    sse(head.chain(body))
}

#[cfg(test)]
mod tests {
    use super::super::queue::Generator;
    use super::super::{leptos_options, router, FramePolicy, ImageStore, PipelineGenerator, Studio, StudioLimits};
    use app::backend::{Backend, ClientId};
    use app::types::{JobEvent, JobKind, JobRequest, Style};
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use axum::Router;
    use engine::enhancer::{EnhanceEvent, EnhanceOutput};
    use engine::pipeline::{Control, GenerateOutput, GenerateRequest, StepEvent, Timings};
    use futures::StreamExt;
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};
    use tower::ServiceExt;

    fn tmp_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("zimage-enhance-test-{}", super::super::store::new_id()))
    }

    fn studio_with(generator: Arc<dyn Generator>) -> (Arc<Studio>, Router, std::path::PathBuf) {
        let dir = tmp_dir();
        let store = Arc::new(ImageStore::open(&dir).unwrap());
        let studio = Studio::start(vec![("CPU".into(), generator)], store, StudioLimits::capacity(8)).unwrap();
        let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
        let app = router(studio.clone(), options, FramePolicy::new(&[]).unwrap());
        (studio, app, dir)
    }

    fn tiny_studio() -> (Arc<Studio>, Router, std::path::PathBuf) {
        let pipeline = engine::pipeline::Pipeline::load(&engine::loader::ModelSource::Tiny, &candle_core::Device::Cpu).unwrap();
        let loras = Arc::new(engine::lora::LoraLibrary::new(tmp_dir().join("loras")));
        studio_with(Arc::new(PipelineGenerator::new(pipeline, loras)))
    }

    fn post(path: &str, body: Value) -> Request<Body> {
        Request::builder().method(Method::POST).uri(path).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
    }

    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, String, String) {
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let ct = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    /// The `data:` payloads of an SSE body, with their event names.
    fn sse_events(body: &str) -> Vec<(String, String)> {
        body.split("\n\n")
            .filter_map(|block| {
                let mut name = String::new();
                let mut data = None;
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(d.to_string());
                    }
                }
                data.map(|d| (name, d))
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tiny_model_enhances_as_json_as_events_and_as_chat_completions() {
        let (studio, app, dir) = tiny_studio();
        // JSON: greedy is the same text twice
        let req = json!({"prompt": "a lighthouse at dusk", "max_new_tokens": 6, "temperature": 0});
        let (s, ct, b) = send(&app, post("/api/enhance", req.clone())).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert!(ct.starts_with("application/json"), "{ct}");
        let first: Value = serde_json::from_str(&b).unwrap();
        let tokens = first["tokens"].as_u64().unwrap();
        assert!((1..=6).contains(&tokens), "{first}");
        assert!(first["finish_reason"] == "stop" || first["finish_reason"] == "length", "{first}");
        assert_eq!(first["tiny_model"], true);
        assert_eq!(first["job_id"].as_str().unwrap().len(), 32);
        let (_, _, b) = send(&app, post("/api/enhance", req.clone())).await;
        let second: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(first["text"], second["text"]);
        // the page's request (every default: our instructions, sampling) fits the tiny model
        let (s, _, b) = send(&app, post("/api/enhance", json!({"prompt": "a lighthouse at dusk"}))).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let defaults: Value = serde_json::from_str(&b).unwrap();
        assert!((1..=64).contains(&defaults["tokens"].as_u64().unwrap()), "{defaults}");
        assert!(defaults["prompt_tokens"].as_u64().unwrap() > 500, "our instructions were sent: {defaults}");

        // events: queued, started, text deltas, done, the deltas adding up to the text
        let mut streamed = req.clone();
        streamed["stream"] = json!(true);
        let (s, ct, b) = send(&app, post("/api/enhance", streamed)).await;
        assert_eq!(s, StatusCode::OK);
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let events = sse_events(&b);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"queued"), "{b}");
        assert_eq!(names.get(1), Some(&"enhance_started"), "{b}");
        assert_eq!(names.last(), Some(&"enhance_done"), "{b}");
        let evs: Vec<JobEvent> = events.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        let deltas: String = evs.iter().filter_map(|e| if let JobEvent::EnhanceText { delta, .. } = e { Some(delta.as_str()) } else { None }).collect();
        let Some(JobEvent::EnhanceDone { result, .. }) = evs.last() else { unreachable!() };
        assert_eq!(result.text, first["text"].as_str().unwrap());
        assert_eq!(deltas.trim(), result.text, "the deltas add up to the text");

        // chat completions, whole and streamed
        let chat = json!({"model": "z-image-turbo", "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "a red fox"}], "max_tokens": 5, "temperature": 0, "seed": 3});
        let (s, _, b) = send(&app, post("/v1/chat/completions", chat.clone())).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let c: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["choices"][0]["message"]["role"], "assistant");
        let whole = c["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let n = c["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=5).contains(&n), "{c}");
        let mut streamed = chat.clone();
        streamed["stream"] = json!(true);
        let (s, _, b) = send(&app, post("/v1/chat/completions", streamed)).await;
        assert_eq!(s, StatusCode::OK);
        assert!(b.contains(": queued: position"), "{b}");
        let data: Vec<String> = sse_events(&b).into_iter().map(|(_, d)| d).collect();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{b}");
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let finish = chunks.last().unwrap()["choices"][0]["finish_reason"].as_str().unwrap().to_string();
        assert_eq!(finish, c["choices"][0]["finish_reason"].as_str().unwrap());
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text.trim(), whole, "the chunks add up to the answer");
        studio.shutdown();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_enhancement_requests_are_refused_with_a_reason() {
        let (studio, app, dir) = tiny_studio();
        let cases = [
            (json!({}), "not an enhancement request"),
            (json!({"prompt": "  "}), "enter a prompt"),
            (json!({"prompt": "x", "max_new_tokens": 0}), "max_new_tokens"),
            (json!({"prompt": "x", "temperature": -1}), "temperature"),
            (json!({"prompt": "x", "top_p": 2}), "top_p"),
            (json!({"prompt": "x", "max_tokens": 5}), "unknown field"),
        ];
        for (body, why) in cases {
            let (s, _, b) = send(&app, post("/api/enhance", body.clone())).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
            let e: app::StudioError = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{b}"));
            assert!(e.reason.contains(why), "{body}: {}", e.reason);
        }
        let cases = [
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"role": "system", "content": "be brief"}]}), "no user message"),
            (json!({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}), "does not exist"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
            (json!({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n = 1"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), "text message parts"),
        ];
        for (body, why) in cases {
            let (s, _, b) = send(&app, post("/v1/chat/completions", body.clone())).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
            let v: Value = serde_json::from_str(&b).unwrap();
            assert!(v["error"]["message"].as_str().unwrap().contains(why), "{body}: {v}");
        }
        // the chat API is behind the API key like the other /v1 routes
        let options = leptos_options("127.0.0.1:0".parse().unwrap(), std::path::Path::new("target/site"));
        let keyed = super::super::router_with(
            studio.clone(),
            options,
            FramePolicy::new(&[]).unwrap(),
            super::super::RouterSettings { api_key: Some("sekrit".into()), timeouts: Default::default() },
        );
        let (s, _, _) = send(&keyed, post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}]}))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        studio.shutdown();
        std::fs::remove_dir_all(dir).ok();
    }

    /// Writes "word " every 5 ms until cancelled (at most 4000 tokens); images wait for `gate`.
    struct Talker {
        gate: Arc<(Mutex<bool>, Condvar)>,
        tokens_written: AtomicUsize,
    }

    impl Generator for Talker {
        fn model_name(&self) -> String {
            "talker".into()
        }
        fn is_tiny(&self) -> bool {
            true
        }
        fn generate(&self, req: &GenerateRequest, _loras: &[app::types::LoraChoice], _on_step: &mut dyn FnMut(&StepEvent) -> Control) -> engine::Result<GenerateOutput> {
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
            Ok(GenerateOutput {
                images: vec![image::RgbImage::new(req.width as u32, req.height as u32)],
                seeds: vec![req.seed],
                timings: Timings::default(),
                prompt_truncated: None,
                latents: candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?,
            })
        }
        fn enhance(&self, req: &engine::enhancer::EnhanceRequest, on_event: &mut dyn FnMut(&EnhanceEvent) -> Control) -> engine::Result<EnhanceOutput> {
            let t = Instant::now();
            for n in 1..=req.max_new_tokens.min(4000) {
                std::thread::sleep(Duration::from_millis(5));
                self.tokens_written.store(n, Ordering::SeqCst);
                if on_event(&EnhanceEvent { delta: "word ", new_tokens: n, elapsed: t.elapsed() }) == Control::Cancel {
                    return Err(engine::Error::Cancelled);
                }
            }
            Err(engine::Error::InvalidRequest("the talker was never cancelled".into()))
        }
    }

    fn image_req() -> JobRequest {
        JobRequest {
            prompt: "a cat".into(),
            style: Style::None,
            steps: 4,
            seed: Some(1),
            kind: JobKind::Generate { width: 1024, height: 1024 },
            negative_prompt: String::new(),
            loras: vec![],
            variation: 0.0,
            variation_seed: None,
            written_prompt: None,
        }
    }

    async fn terminal_of(rx: &mut tokio::sync::broadcast::Receiver<JobEvent>, job_id: &str) -> JobEvent {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("the job ended in time").unwrap();
            if ev.job_id() == job_id && ev.is_terminal() {
                return ev;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_enhancement_waits_its_turn_and_a_closed_stream_frees_the_worker() {
        let talker = Arc::new(Talker { gate: Arc::new((Mutex::new(false), Condvar::new())), tokens_written: AtomicUsize::new(0) });
        let (studio, app, dir) = studio_with(talker.clone());
        let mut rx = studio.queue.subscribe();
        let local = ClientId::new("ip:127.0.0.1");
        let first_image = studio.submit(image_req(), &local).unwrap();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
            if matches!(&ev, JobEvent::Started { job_id, .. } if *job_id == first_image.job_id) {
                break;
            }
        }
        // the image runs (held at its gate): the enhancement waits behind it and says so
        let res = app.clone().oneshot(post("/api/enhance", json!({"prompt": "a cat", "stream": true, "max_new_tokens": 1000}))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let mut body = res.into_body().into_data_stream();
        let mut seen = String::new();
        while !seen.contains("\n\n") {
            seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
        }
        assert!(seen.starts_with("event: queued\n"), "{seen}");
        let queued: JobEvent = serde_json::from_str(&sse_events(&seen)[0].1).unwrap();
        assert!(matches!(queued, JobEvent::Queued { position: 1, .. }), "{queued:?}");
        let enhancement_id = queued.job_id().to_string();
        assert!(studio.queue.is_pending_enhancement(&enhancement_id));
        // a second image from another client waits behind the enhancement
        let second_image = studio.submit(image_req(), &ClientId::new("ip:10.0.0.2")).unwrap();
        *talker.gate.0.lock().unwrap() = true;
        talker.gate.1.notify_all();
        assert!(matches!(terminal_of(&mut rx, &first_image.job_id).await, JobEvent::Done { .. }));
        // text streams in; the client reads a few deltas and goes away
        while seen.matches("event: enhance_text").count() < 3 {
            seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
        }
        drop(body);
        let t = Instant::now();
        let end = terminal_of(&mut rx, &enhancement_id).await;
        assert!(matches!(end, JobEvent::Cancelled { .. }), "{end:?}");
        let written = talker.tokens_written.load(Ordering::SeqCst);
        assert!(written < 1000, "stopped at the next token, not at the end ({written} tokens)");
        // the worker is free: the waiting image runs at once
        assert!(matches!(terminal_of(&mut rx, &second_image.job_id).await, JobEvent::Done { .. }));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // a cancel from the page (cancel_job) stops a running enhancement too
        let ticket = studio.enhance(app::types::EnhanceRequest::new("a dog"), &local).unwrap();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
            if matches!(&ev, JobEvent::EnhanceText { job_id, .. } if *job_id == ticket.job_id) {
                break;
            }
        }
        assert!(studio.queue.is_pending_enhancement(&ticket.job_id));
        studio.cancel(&ticket.job_id).unwrap();
        assert!(matches!(terminal_of(&mut rx, &ticket.job_id).await, JobEvent::Cancelled { .. }));
        assert!(!studio.queue.is_pending_enhancement(&ticket.job_id));
        studio.shutdown();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_websocket_cancels_the_enhancement_it_watched() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let talker = Arc::new(Talker { gate: Arc::new((Mutex::new(true), Condvar::new())), tokens_written: AtomicUsize::new(0) });
        let (studio, app, dir) = studio_with(talker.clone());
        let mut rx = studio.queue.subscribe();
        let ticket = studio.enhance(app::types::EnhanceRequest::new("a cat"), &ClientId::new("ip:127.0.0.1")).unwrap();
        let (addr, stop) = super::super::tests::serve_on_socket(app, Duration::from_secs(5)).await;
        let mut s = super::super::tests::websocket_upgrade(addr).await;
        // one masked text frame (mask 0: the payload goes as it is)
        let watch = json!({"type": "watch", "job_id": ticket.job_id}).to_string();
        let mut frame = vec![0x81, 0x80 | watch.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(watch.as_bytes());
        s.write_all(&frame).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.windows(12).filter(|w| w == b"enhance_text").count() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the socket closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        drop(s);
        let end = terminal_of(&mut rx, &ticket.job_id).await;
        assert!(matches!(end, JobEvent::Cancelled { .. }), "{end:?}");
        assert!(talker.tokens_written.load(Ordering::SeqCst) < 4000);
        stop.send_replace(true);
        studio.shutdown();
        std::fs::remove_dir_all(dir).ok();
    }
}
