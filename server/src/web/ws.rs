//! `/ws`: pushes [`JobEvent`]s of the jobs a browser watches. A `watch` is answered at once with
//! the job's latest state, so a reconnecting client picks up where it was. The server pings; a
//! socket that sends nothing back (not even the pong browsers send by themselves) for the idle
//! timeout is closed, and so is every socket when the server stops. Enhancements the socket
//! watched are cancelled when it closes (the page that asked for the text is gone), which frees
//! the worker at the next token; images go on (they land in the history).

use app::types::{is_valid_id, JobEvent, WsClientMsg};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

use super::studio::Studio;

const MAX_WATCHED: usize = 64;
/// Our messages are a few hundred bytes; a longer one is refused with 1009 (message too big).
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;
/// The protocol-level bound, above ours so that an oversized message still reaches the check
/// that answers it with a close code instead of a dropped connection.
const MAX_FRAME: usize = 1024 * 1024;
/// Longest time between two pings.
const PING_EVERY: Duration = Duration::from_secs(20);

/// How long a socket may stay silent before it is closed.
#[derive(Clone, Copy, Debug)]
pub struct IdleTimeout(pub Duration);

pub async fn ws_handler(ws: WebSocketUpgrade, State(studio): State<Arc<Studio>>, State(IdleTimeout(idle)): State<IdleTimeout>) -> Response {
    ws.max_message_size(MAX_FRAME).max_frame_size(MAX_FRAME).on_upgrade(move |socket| session(socket, studio, idle))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

fn text(ev: &JobEvent) -> Message {
    Message::Text(serde_json::to_string(ev).expect("events serialize").into())
}

async fn session(socket: WebSocket, studio: Arc<Studio>, idle: Duration) {
    let (mut sink, mut stream) = socket.split();
    let mut events = studio.queue.subscribe();
    let mut closing = studio.closing();
    let mut watched: HashSet<String> = HashSet::new();
    // at least two pings within the idle timeout, so a live client always answers in time
    let mut ping = tokio::time::interval(PING_EVERY.min(idle / 3).max(Duration::from_millis(100)));
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    'session: loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break };
                last_heard = tokio::time::Instant::now();
                let size = match &msg {
                    Message::Text(t) => t.len(),
                    Message::Binary(b) => b.len(),
                    _ => 0,
                };
                if size > MAX_CLIENT_MESSAGE {
                    let _ = sink.send(close(1009, "message too big (at most 16 KiB)")).await;
                    break;
                }
                let Message::Text(t) = msg else {
                    if matches!(msg, Message::Close(_)) { break }
                    continue;
                };
                match serde_json::from_str::<WsClientMsg>(t.as_str()) {
                    Ok(WsClientMsg::Watch { job_id }) => {
                        if !is_valid_id(&job_id) || watched.len() >= MAX_WATCHED {
                            continue;
                        }
                        let ev = studio.snapshot(&job_id).await.unwrap_or_else(|| JobEvent::Error {
                            job_id: job_id.clone(),
                            reason: "This job is unknown to the server (it may have restarted). Please submit it again.".into(),
                        });
                        if !ev.is_terminal() {
                            watched.insert(job_id);
                        }
                        if sink.send(text(&ev)).await.is_err() { break }
                    }
                    Ok(WsClientMsg::Unwatch { job_id }) => { watched.remove(&job_id); }
                    Err(_) => {}
                }
            }
            ev = events.recv() => match ev {
                Ok(ev) => {
                    if watched.contains(ev.job_id()) {
                        if ev.is_terminal() { watched.remove(ev.job_id()); }
                        if sink.send(text(&ev)).await.is_err() { break }
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // missed some: send the latest state of everything watched
                    let snaps: Vec<JobEvent> = watched.iter().filter_map(|id| studio.queue.snapshot(id)).collect();
                    for ev in snaps {
                        if ev.is_terminal() { watched.remove(ev.job_id()); }
                        if sink.send(text(&ev)).await.is_err() { break 'session }
                    }
                }
                Err(RecvError::Closed) => break,
            },
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    // 1001: going away (an idle client reconnects when it needs to)
                    let _ = sink.send(close(1001, "idle for too long")).await;
                    break;
                }
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break }
            }
            _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                let _ = sink.send(close(1012, "the server is restarting")).await;
                break;
            }
        }
    }
    for job_id in &watched {
        if studio.queue.is_pending_enhancement(job_id) {
            let _ = studio.queue.cancel(job_id);
        }
    }
}
