//! Limits per client: who a request comes from ([`client_identity`]), and a token bucket of
//! submissions per minute ([`RateLimiter`]). The cap of jobs queued per client is the queue's
//! (`QueueLimits::max_per_client`), where it is checked under the queue's lock.

use app::backend::ClientId;
use app::{ErrorKind, StudioError};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use super::settings::ApiKey;

/// Buckets kept before the full ones (clients not seen for a minute or more) are dropped.
const MAX_TRACKED_CLIENTS: usize = 4096;

/// Puts the request's [`ClientId`] into its extensions: the API key's holder when the request
/// carries the server's key, else the peer's IP address (all ports of a host are one client).
pub async fn client_identity(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let client = if key.is_set() && key.admits(&parts.headers) {
        ClientId::new("api-key")
    } else {
        match ConnectInfo::<SocketAddr>::from_request_parts(&mut parts, &()).await {
            Ok(ConnectInfo(addr)) => ClientId::new(format!("ip:{}", addr.ip())),
            Err(_) => ClientId::new("anonymous"),
        }
    };
    parts.extensions.insert(client);
    next.run(Request::from_parts(parts, body)).await
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per client: `per_minute` submissions, refilled evenly, a full minute's worth
/// allowed in a burst. `per_minute == 0`: unlimited.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<ClientId, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter { per_minute, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one submission from `client`'s bucket, or says (429, `Retry-After`) when the next
    /// one is allowed.
    pub fn take(&self, client: &ClientId) -> Result<(), StudioError> {
        self.take_at(client, Instant::now())
    }

    fn take_at(&self, client: &ClientId, now: Instant) -> Result<(), StudioError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = self.per_minute as f64;
        let per_sec = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_CLIENTS && !buckets.contains_key(client) {
            // a full bucket holds no information: forget those clients
            buckets.retain(|_, b| b.tokens + now.duration_since(b.updated).as_secs_f64() * per_sec < capacity);
        }
        let b = buckets.entry(client.clone()).or_insert(Bucket { tokens: capacity, updated: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * per_sec).min(capacity);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - b.tokens) / per_sec).ceil() as u64;
        Err(StudioError::new(
            ErrorKind::RateLimited,
            format!(
                "Too many submissions: at most {} per minute per client. Try again in {wait} s.",
                self.per_minute
            ),
        )
        .retry_after(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_burst_then_refills_evenly() {
        let limiter = RateLimiter::new(6); // one every 10 s
        let (a, b) = (ClientId::new("ip:10.0.0.1"), ClientId::new("ip:10.0.0.2"));
        let t0 = Instant::now();
        for _ in 0..6 {
            limiter.take_at(&a, t0).unwrap();
        }
        let e = limiter.take_at(&a, t0).unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert_eq!(e.retry_after_secs, Some(10));
        assert!(e.reason.contains("6 per minute"), "{}", e.reason);
        // another client has its own bucket
        limiter.take_at(&b, t0).unwrap();
        // 10 s later one more is allowed, and only one
        limiter.take_at(&a, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(limiter.take_at(&a, t0 + Duration::from_secs(11)).unwrap_err().retry_after_secs, Some(9));
    }

    #[test]
    fn zero_is_unlimited() {
        let limiter = RateLimiter::new(0);
        let a = ClientId::new("ip:10.0.0.1");
        for _ in 0..1000 {
            limiter.take(&a).unwrap();
        }
    }
}
