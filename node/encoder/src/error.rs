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
    #[error("the encoder worker failed on this request's batch ({0}); it was restarted, retry")]
    WorkerFailed(String),
    #[error("the encoder did not answer within {secs} s")]
    TimedOut { secs: u64 },
}

pub type Result<T, E = EncoderError> = std::result::Result<T, E>;
