use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("model dir {dir}: missing {file}")]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error("model file {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("text {index} is empty")]
    EmptyText { index: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("encoder is overloaded: {queued} texts queued, the limit is {limit}")]
    Overloaded { queued: usize, limit: usize },
    #[error("backend: {0}")]
    Backend(String),
    #[error("encoder pool is shut down")]
    ShutDown,
}

pub type Result<T, E = EncoderError> = std::result::Result<T, E>;
