use std::path::PathBuf;

/// Everything a shard operation can fail with. Input errors are checked before
/// anything is written, so an `Invalid*` error never leaves a partial write.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("invalid collection config: {0}")]
    InvalidConfig(String),
    #[error("invalid document {id:?}: {reason}")]
    InvalidDocument { id: String, reason: String },
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("corrupt shard data in {file} at offset {offset}: {reason}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("faiss: {0}")]
    Faiss(String),
    #[error("not enough vectors to train the index: {have} live, need at least {need}")]
    NotEnoughVectors { have: usize, need: usize },
    #[error("an index build is already running (generation {0})")]
    BuildInProgress(u64),
    /// A generation built elsewhere that this replica cannot take (another history,
    /// not yet caught up, no longer served): refused, nothing changed.
    #[error("index generation refused: {0}")]
    GenerationRefused(String),
    #[error("shard at {0} is closed after a failed write; reopen it to recover from its log")]
    Poisoned(PathBuf),
    #[error("no shard at {0}: manifest.json is missing")]
    NotFound(PathBuf),
    /// A compaction holds the shard's build claim (at this batch).
    #[error("a compaction (at batch {0}) is in progress on this shard; retry when it ends")]
    CompactionInProgress(u64),
    /// The batch would pass one of the shard's structural limits; nothing written.
    #[error("shard full: {0}; compact the shard or give the collection more shards")]
    Full(String),
    /// A re-embed's vector set refused the request (issue 21): the write or query
    /// does not match the set's state; nothing changed.
    #[error("vector set: {0}")]
    VectorSet(String),
    /// A scroll's row numbers no longer hold (a compaction renumbered the rows).
    #[error("scroll: {0}")]
    ScrollStale(String),
    /// A conditional write's expectation failed ([`crate::Expect`]): a document was
    /// written since the caller read it; nothing written.
    #[error("conflict: {0}")]
    Conflict(String),
}

impl ShardError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ShardError {
        let path = path.into();
        move |source| ShardError::Io { path, source }
    }

    pub(crate) fn invalid_doc(id: &str, reason: impl Into<String>) -> ShardError {
        ShardError::InvalidDocument {
            id: id.to_owned(),
            reason: reason.into(),
        }
    }
}

impl From<faiss::error::Error> for ShardError {
    fn from(e: faiss::error::Error) -> Self {
        ShardError::Faiss(e.to_string())
    }
}

pub type Result<T, E = ShardError> = std::result::Result<T, E>;
