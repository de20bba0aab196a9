//! Server functions: every request from the UI goes through these.
//! Errors are [`StudioError`]s, sent as JSON with the HTTP status of their kind.

use crate::error::StudioError;
use crate::types::{EnhanceRequest, EnhanceTicket, HistoryPage, JobRequest, JobResult, JobTicket, LoraInfo, ServerInfo, UploadInfo};
use leptos::prelude::*;
use server_fn::codec::{Json, MultipartData, MultipartFormData};

#[cfg(feature = "ssr")]
mod ssr {
    use crate::backend::BackendHandle;
    use crate::error::StudioError;

    pub async fn backend() -> Result<BackendHandle, StudioError> {
        leptos_axum::extract::<BackendHandle>().await.map_err(|e| StudioError::internal(e.to_string()))
    }

    /// Sets the HTTP status of the server function's response from the error's kind.
    pub fn respond<T>(r: Result<T, StudioError>) -> Result<T, StudioError> {
        if let Err(e) = &r {
            if let Some(opts) = leptos::prelude::use_context::<leptos_axum::ResponseOptions>() {
                if let Ok(code) = axum::http::StatusCode::from_u16(e.status()) {
                    opts.set_status(code);
                }
            }
        }
        r
    }
}

/// Which model runs, and whether it is the random-weight tiny model.
#[server(endpoint = "server_info", input = Json)]
pub async fn get_server_info() -> Result<ServerInfo, StudioError> {
    let backend = ssr::backend().await;
    ssr::respond(backend.map(|b| b.info()))
}

/// The LoRAs of the server's folder (read again each time: new files show without a restart).
#[server(endpoint = "loras", input = Json)]
pub async fn list_loras() -> Result<Vec<LoraInfo>, StudioError> {
    let r = async {
        let backend = ssr::backend().await?;
        tokio::task::spawn_blocking(move || backend.loras())
            .await
            .map_err(|e| StudioError::internal(e.to_string()))?
    }
    .await;
    ssr::respond(r)
}

/// Enqueues a Generate or Transform job. Progress comes over `/ws`.
#[server(endpoint = "submit_job", input = Json)]
pub async fn submit_job(req: JobRequest) -> Result<JobTicket, StudioError> {
    let r = async {
        let client: crate::backend::ClientId =
            leptos_axum::extract().await.map_err(|e| StudioError::internal(e.to_string()))?;
        ssr::backend().await?.submit(req, &client)
    }
    .await;
    ssr::respond(r)
}

/// Enqueues a prompt enhancement (the Enhance button). Its text comes over `/ws` as it is written.
#[server(endpoint = "submit_enhance", input = Json)]
pub async fn submit_enhance(req: EnhanceRequest) -> Result<EnhanceTicket, StudioError> {
    let r = async {
        let client: crate::backend::ClientId =
            leptos_axum::extract().await.map_err(|e| StudioError::internal(e.to_string()))?;
        ssr::backend().await?.enhance(req, &client)
    }
    .await;
    ssr::respond(r)
}

/// Cancels a queued job, or stops a running one at its next step.
#[server(endpoint = "cancel_job", input = Json)]
pub async fn cancel_job(job_id: String) -> Result<(), StudioError> {
    let r = async { ssr::backend().await?.cancel(&job_id) }.await;
    ssr::respond(r)
}

/// A stored image's metadata, for share links.
#[server(endpoint = "image_info", input = Json)]
pub async fn image_info(image_id: String) -> Result<JobResult, StudioError> {
    let r = async { ssr::backend().await?.image(&image_id) }.await;
    ssr::respond(r)
}

/// Uploads a Transform input (multipart field `image`). Refused before it is read whole when its
/// declared or streamed size passes the limit.
#[server(endpoint = "upload_image", input = MultipartFormData)]
pub async fn upload_image(data: MultipartData) -> Result<UploadInfo, StudioError> {
    let r = async {
        use crate::error::ErrorKind;
        use crate::types::limits::{MAX_UPLOAD_BYTES, UPLOAD_TYPES};
        let too_large = || {
            StudioError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "The image is too large: at most {} MB.",
                    MAX_UPLOAD_BYTES / (1024 * 1024)
                ),
            )
        };
        let headers: axum::http::HeaderMap =
            leptos_axum::extract().await.map_err(|e| StudioError::internal(e.to_string()))?;
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // multipart framing adds a little; anything past limit + 64 KiB is refused unread.
        if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES + 64 * 1024) {
            return Err(too_large());
        }
        let backend = ssr::backend().await?;
        let mut multipart = data
            .into_inner()
            .ok_or_else(|| StudioError::internal("multipart data missing"))?;
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| StudioError::invalid(format!("The upload could not be read: {e}")))?
        {
            if field.name() != Some("image") {
                continue;
            }
            let content_type = field.content_type().map(|m| m.essence_str().to_string());
            if let Some(ct) = &content_type {
                if ct != "application/octet-stream" && !UPLOAD_TYPES.contains(&ct.as_str()) {
                    return Err(StudioError::new(
                        ErrorKind::UnsupportedMedia,
                        format!("{ct} is not supported: upload a PNG, JPEG or WebP image."),
                    ));
                }
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| StudioError::invalid(format!("The upload could not be read: {e}")))?
            {
                if bytes.len() + chunk.len() > MAX_UPLOAD_BYTES {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&chunk);
            }
            if bytes.is_empty() {
                return Err(StudioError::invalid("The uploaded file is empty."));
            }
            return tokio::task::spawn_blocking(move || backend.store_upload(bytes, content_type))
                .await
                .map_err(|e| StudioError::internal(format!("upload task failed: {e}")))?;
        }
        Err(StudioError::invalid("No image in the upload (expected a form field named `image`)."))
    }
    .await;
    ssr::respond(r)
}

/// One page of the history (newest first), filtered by a prompt search when not empty.
#[server(endpoint = "history", input = Json)]
pub async fn list_history(search: String, page: u32) -> Result<HistoryPage, StudioError> {
    let r = async {
        if search.chars().count() > 200 {
            return Err(StudioError::invalid("The search is too long (at most 200 characters)."));
        }
        let backend = ssr::backend().await?;
        tokio::task::spawn_blocking(move || backend.history(&search, page))
            .await
            .map_err(|e| StudioError::internal(e.to_string()))?
    }
    .await;
    ssr::respond(r)
}

/// Deletes a finished image (history row, files, share page).
#[server(endpoint = "delete_image", input = Json)]
pub async fn delete_image(image_id: String) -> Result<(), StudioError> {
    let r = async {
        let backend = ssr::backend().await?;
        tokio::task::spawn_blocking(move || backend.delete_image(&image_id))
            .await
            .map_err(|e| StudioError::internal(e.to_string()))?
    }
    .await;
    ssr::respond(r)
}
