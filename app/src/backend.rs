//! The server side of the server functions: a trait the server crate implements (job queue, image
//! store), reached from a server function through an axum extractor on the request's extensions.

use crate::error::StudioError;
use crate::types::{EnhanceRequest, EnhanceTicket, HistoryPage, JobRequest, JobResult, JobTicket, LoraInfo, ServerInfo, UploadInfo};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use std::sync::Arc;

pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> ServerInfo;
    /// Validates and enqueues for `client`; refuses when the queue is full or the client is over
    /// its limits.
    fn submit(&self, req: JobRequest, client: &ClientId) -> Result<JobTicket, StudioError>;
    /// Cancels a queued job at once, or a running one at its next step.
    fn cancel(&self, job_id: &str) -> Result<(), StudioError>;
    /// A stored image's metadata (for share links).
    fn image(&self, image_id: &str) -> Result<JobResult, StudioError>;
    /// Decodes, resizes and stores an uploaded Transform input. Blocking: call off the runtime.
    fn store_upload(&self, bytes: Vec<u8>, content_type: Option<String>) -> Result<UploadInfo, StudioError>;
    /// One page (0-based) of finished images, newest first, those whose prompt matches `search`
    /// (every word, as a prefix) when it is not empty. Blocking.
    fn history(&self, search: &str, page: u32) -> Result<HistoryPage, StudioError>;
    /// Deletes a finished image: its history row, files and share page. Blocking.
    fn delete_image(&self, image_id: &str) -> Result<(), StudioError>;
    /// The LoRA folder's files, each saying whether it can be used with this model. Blocking.
    fn loras(&self) -> Result<Vec<LoraInfo>, StudioError>;
    /// Validates and enqueues a prompt enhancement for `client` (the same queue and limits as
    /// images); its text comes as `enhance_*` job events.
    fn enhance(&self, req: EnhanceRequest, client: &ClientId) -> Result<EnhanceTicket, StudioError>;
}

/// The backend, put into every request's extensions by the server (`axum::Extension` layer) and
/// taken out by server functions with `leptos_axum::extract::<BackendHandle>()`.
#[derive(Clone)]
pub struct BackendHandle(pub Arc<dyn Backend>);

impl std::ops::Deref for BackendHandle {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for BackendHandle {
    type Rejection = StudioError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<BackendHandle>()
            .cloned()
            .ok_or_else(|| StudioError::internal("The studio backend is not attached to this request."))
    }
}

/// Who sent a request, for the limits per client: the holder of the server's API key when the
/// request carries it, else the peer's IP address. The server puts it into every request's
/// extensions; a request without one (never from the server's own listener) counts as one
/// anonymous client.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub Arc<str>);

impl ClientId {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        ClientId(id.into())
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<ClientId>().cloned().unwrap_or_else(|| ClientId::new("anonymous")))
    }
}
