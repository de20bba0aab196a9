//! `/ws`: pushes [`JobEvent`]s of the jobs a browser watches. A `watch` is answered at once with
//! the job's latest state, so a reconnecting client picks up where it was.

use app::types::{is_valid_id, JobEvent, WsClientMsg};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

use super::studio::Studio;

const MAX_WATCHED: usize = 64;

pub async fn ws_handler(ws: WebSocketUpgrade, State(studio): State<Arc<Studio>>) -> Response {
    ws.max_message_size(16 * 1024).on_upgrade(move |socket| session(socket, studio))
}

fn text(ev: &JobEvent) -> Message {
    Message::Text(serde_json::to_string(ev).expect("events serialize").into())
}

async fn session(socket: WebSocket, studio: Arc<Studio>) {
    let (mut sink, mut stream) = socket.split();
    let mut events = studio.queue.subscribe();
    let mut watched: HashSet<String> = HashSet::new();
    let mut ping = tokio::time::interval(Duration::from_secs(20));
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break };
                let Message::Text(t) = msg else {
                    if matches!(msg, Message::Close(_)) { break }
                    continue;
                };
                match serde_json::from_str::<WsClientMsg>(t.as_str()) {
                    Ok(WsClientMsg::Watch { job_id }) => {
                        if !is_valid_id(&job_id) || watched.len() >= MAX_WATCHED {
                            continue;
                        }
                        let ev = studio.queue.snapshot(&job_id).unwrap_or_else(|| JobEvent::Error {
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
                        if sink.send(text(&ev)).await.is_err() { return }
                    }
                }
                Err(RecvError::Closed) => break,
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break }
            }
        }
    }
}
