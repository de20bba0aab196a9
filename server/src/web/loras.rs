//! The studio's LoRA folder: what the page and the APIs list, the check a job's LoRA list gets
//! when it is submitted (each name resolved to its file's sha256, which the worker verifies), and
//! uploads from the page or scripts (`POST /api/loras/{name}`, behind the API key when one is set).

use app::types::{is_valid_lora_name, limits, LoraChoice, LoraInfo};
use app::StudioError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use engine::lora::{LoraEntry, LoraFile};
use std::collections::BTreeSet;
use std::sync::Arc;

use super::studio::Studio;
use super::AppState;

impl Studio {
    /// Resolves every LoRA of a job against the folder: unknown names, unreadable files and files
    /// for another model are refused with the reason; each choice gets its file's sha256.
    pub fn resolve_loras(&self, loras: &mut [LoraChoice]) -> Result<(), StudioError> {
        for choice in loras.iter_mut() {
            let file = self.loras.load(&choice.name).map_err(|e| lora_error(&choice.name, e))?;
            if let Some(g) = self.first_generator() {
                g.check_lora(&file)
                    .map_err(|why| StudioError::invalid(format!("LoRA `{}` does not fit this model: {why}", choice.name)))?;
            }
            choice.sha256 = Some(file.sha256.clone());
        }
        Ok(())
    }

    pub fn lora_dir(&self) -> &std::path::Path {
        self.loras.dir()
    }

    /// The folder's LoRAs, each with what the page shows (files that cannot be used say why).
    /// Blocking: a new or changed file is read and hashed.
    pub fn lora_list(&self) -> Result<Vec<LoraInfo>, StudioError> {
        let entries = self.loras.list().map_err(|e| StudioError::internal(e.to_string()))?;
        Ok(entries.iter().map(|e| self.lora_info(e)).collect())
    }

    fn lora_info(&self, entry: &LoraEntry) -> LoraInfo {
        let mut info = LoraInfo {
            name: entry.name.clone(),
            size_bytes: entry.size,
            short_hash: String::new(),
            trigger_words: vec![],
            summary: String::new(),
            usable: false,
        };
        let file = match self.loras.load(&entry.name) {
            Ok(f) => f,
            Err(e) => {
                info.summary = lora_error(&entry.name, e).reason;
                return info;
            }
        };
        info.short_hash = file.sha256[..12].to_string();
        info.trigger_words = file.trigger_words(8);
        let fits = self.first_generator().map(|g| g.check_lora(&file)).unwrap_or(Ok(()));
        match fits {
            Ok(()) => {
                info.usable = true;
                info.summary = describe(&file);
            }
            Err(why) => info.summary = format!("does not fit this model: {why}"),
        }
        info
    }

    /// Stores an uploaded LoRA as `<name>.safetensors` after checking it is one (and, once the
    /// model is loaded, one for this model). Blocking.
    pub fn store_lora(&self, name: &str, bytes: &[u8]) -> Result<LoraInfo, StudioError> {
        let name = sanitize_name(name).ok_or_else(|| StudioError::invalid(format!("`{name}` cannot be a LoRA's name.")))?;
        if bytes.len() > limits::MAX_LORA_UPLOAD_BYTES {
            return Err(StudioError::new(
                app::ErrorKind::PayloadTooLarge,
                format!("The LoRA is too large: at most {} MB.", limits::MAX_LORA_UPLOAD_BYTES / (1024 * 1024)),
            ));
        }
        let dir = self.loras.dir().to_path_buf();
        let path = dir.join(format!("{name}.safetensors"));
        let file = LoraFile::from_bytes(&path, bytes)
            .map_err(|e| StudioError::invalid(format!("This file is not a LoRA we can read: {}", reason_of(e))))?;
        if file.adapters.is_empty() {
            return Err(StudioError::invalid("This safetensors file holds no LoRA weights."));
        }
        if let Some(g) = self.first_generator() {
            g.check_lora(&file).map_err(|why| StudioError::invalid(format!("This LoRA does not fit this model: {why}")))?;
        }
        if path.exists() {
            return Err(StudioError::invalid(format!(
                "A LoRA named `{name}` is already in the folder; rename the file or remove the old one first."
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| StudioError::internal(format!("creating {}: {e}", dir.display())))?;
        // written aside and renamed, so a listing never sees half a file
        let part = dir.join(format!(".{name}.safetensors.part"));
        std::fs::write(&part, bytes).map_err(|e| StudioError::internal(format!("writing {}: {e}", part.display())))?;
        std::fs::rename(&part, &path).map_err(|e| StudioError::internal(format!("storing {}: {e}", path.display())))?;
        let entry = LoraEntry { name: name.clone(), path, size: bytes.len() as u64 };
        eprintln!("[lora] stored `{name}` ({} bytes, sha256 {})", bytes.len(), &file.sha256[..12]);
        Ok(self.lora_info(&entry))
    }
}

/// "diffusers/PEFT, LoRA rank 32, 240 modules".
fn describe(file: &LoraFile) -> String {
    let styles: Vec<&str> = file.styles().iter().map(|s| s.describe()).collect();
    let kinds: BTreeSet<&str> = file.adapters.iter().map(|a| a.weights.kind()).collect();
    let ranks: BTreeSet<usize> = file.adapters.iter().filter_map(|a| a.weights.rank()).collect();
    let mut s = format!("{}, {}", styles.join(" + "), kinds.into_iter().collect::<Vec<_>>().join(" + "));
    if !ranks.is_empty() {
        s.push_str(&format!(" rank {}", ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("/")));
    }
    s.push_str(&format!(", {} modules", file.adapters.len()));
    s
}

fn reason_of(e: engine::Error) -> String {
    match e {
        engine::Error::Lora { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn lora_error(name: &str, e: engine::Error) -> StudioError {
    let reason = reason_of(e);
    if reason.starts_with("no LoRA named") {
        StudioError::invalid(format!("Unknown LoRA `{name}`: the server's LoRA folder has no `{name}.safetensors`."))
    } else {
        StudioError::invalid(format!("LoRA `{name}` cannot be used: {reason}"))
    }
}

/// A file name made into a LoRA name: the `.safetensors` extension dropped, characters the
/// names may not hold replaced by `_`.
fn sanitize_name(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let stem = raw.strip_suffix(".safetensors").unwrap_or(raw);
    // a path from a browser or a script: its last part
    let stem = stem.rsplit(['/', '\\']).next().unwrap_or(stem);
    let cleaned: String = stem
        .chars()
        .map(|c| if c.is_control() || matches!(c, '/' | '\\' | ':' | '<' | '>' | '"' | '|' | '?' | '*') { '_' } else { c })
        .collect();
    let cleaned = cleaned.trim_start_matches('.').trim().to_string();
    let cleaned: String = cleaned.chars().take(120).collect();
    is_valid_lora_name(&cleaned).then_some(cleaned)
}

/// `GET /api/loras`: the folder's LoRAs as JSON.
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<LoraInfo>>, StudioError> {
    let studio = state.studio.clone();
    let list = tokio::task::spawn_blocking(move || studio.lora_list())
        .await
        .map_err(|e| StudioError::internal(e.to_string()))??;
    Ok(Json(list))
}

/// `POST /api/loras/{name}` with the file as the body: stores it (the router asks for the API
/// key first when one is set).
pub async fn upload(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Result<Json<LoraInfo>, StudioError> {
    if body.is_empty() {
        return Err(StudioError::invalid("The uploaded file is empty."));
    }
    let studio: Arc<Studio> = state.studio.clone();
    let info = tokio::task::spawn_blocking(move || studio.store_lora(&name, &body))
        .await
        .map_err(|e| StudioError::internal(e.to_string()))??;
    Ok(Json(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_are_cleaned() {
        assert_eq!(sanitize_name("ink style.safetensors").as_deref(), Some("ink style"));
        assert_eq!(sanitize_name("C:\\Users\\me\\loras\\detail.safetensors").as_deref(), Some("detail"));
        assert_eq!(sanitize_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(sanitize_name("a<b>:c").as_deref(), Some("a_b__c"));
        assert_eq!(sanitize_name(".hidden").as_deref(), Some("hidden"));
        assert_eq!(sanitize_name("..").as_deref(), None);
        assert_eq!(sanitize_name("").as_deref(), None);
    }
}
