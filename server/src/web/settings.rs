//! Settings several web modules share: the API key the script APIs ask for, and the timeouts for
//! slow or idle clients. They live here, below `mod.rs` (which routes) and the modules that use them.

use axum::http::header;
use std::sync::Arc;
use std::time::Duration;

/// How long the server waits for slow or idle clients, and for the running job when it stops.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// From a connection's open (or its previous request) to the end of the request's headers.
    pub header_read: Duration,
    /// For a whole request body to arrive.
    pub body: Duration,
    /// A websocket with no frame from the client (browsers answer the server's pings) this long
    /// is closed.
    pub ws_idle: Duration,
    /// On SIGTERM / Ctrl-C, how long the running jobs may take to finish.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Duration::from_secs(10),
            body: Duration::from_secs(120),
            ws_idle: Duration::from_secs(120),
            drain: Duration::from_secs(60),
        }
    }
}

/// What the router needs beyond the studio.
pub struct RouterSettings {
    pub api_key: Option<String>,
    pub timeouts: Timeouts,
}

/// The key the script APIs ask for (none: open).
#[derive(Clone)]
pub struct ApiKey(pub Option<Arc<str>>);

impl ApiKey {
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Whether the request carries `Authorization: Bearer <key>` (always true without a key).
    pub fn admits(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(key) = &self.0 else { return true };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // same time whatever prefix matches
        given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

