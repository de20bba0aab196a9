//! The engine's one error type: every failure a caller can act on has its own variant and a
//! message that says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request parameter is out of range; the message says which and what is allowed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Model files are missing; each path is named with how to get it.
    #[error("model files missing from {root}:\n{}\n{hint}", missing.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    MissingFiles { root: PathBuf, missing: Vec<String>, hint: String },
    /// Tensors missing from the weights or with the wrong shape, each named.
    #[error("model weights do not match the architecture ({component}):\n{}", problems.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    WeightMismatch { component: String, problems: Vec<String> },
    /// A config file could not be read or parsed.
    #[error("bad config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// An input image could not be decoded or is too large.
    #[error("bad input image: {0}")]
    Image(String),
    /// A LoRA file that cannot be read or does not fit the model; the reason says which.
    #[error("LoRA {path}: {reason}")]
    Lora { path: PathBuf, reason: String },
    /// The caller asked to stop.
    #[error("cancelled")]
    Cancelled,
    #[error("hub download failed: {0}")]
    Hub(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
