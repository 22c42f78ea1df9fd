//! The coordinator's one error type, and its mapping to gRPC status codes.

use tonic::{Code, Status};

use crate::map::MapError;

/// Metadata key carrying the leader's public address on a not-leader answer, so a
/// client can go straight there.
pub use shoal_proto::client::LEADER_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("not the leader (leader is member {leader:?} at {api_addr:?})")]
    NotLeader {
        leader: Option<u64>,
        api_addr: Option<String>,
    },
    #[error("no leader elected; retry shortly")]
    NoLeader,
    /// A write this member proposed as leader, which then lost its group: it commits
    /// only if the member regains its group while still leading. UNAVAILABLE, so the
    /// client tries another member; the message says the outcome is unknown.
    #[error("this member lost its group while the write was pending; its outcome is unknown: retry (a retried create may find the collection made)")]
    LeadershipLost,
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error(transparent)]
    Limit(#[from] shoal_proto::limits::Exceeded),
    #[error("{0}")]
    ResourceExhausted(String),
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        let msg = e.to_string();
        match e {
            CoordinatorError::Map(m) => match m {
                MapError::InvalidArgument(_) => Status::invalid_argument(msg),
                MapError::AlreadyExists(_) => Status::already_exists(msg),
                MapError::NotFound(_) => Status::not_found(msg),
                MapError::FailedPrecondition(_) => Status::failed_precondition(msg),
            },
            CoordinatorError::NotLeader { api_addr, .. } => {
                let mut s = Status::new(Code::Unavailable, msg);
                if let Some(v) = api_addr.and_then(|a| a.parse().ok()) {
                    s.metadata_mut().insert(LEADER_HEADER, v);
                }
                s
            }
            CoordinatorError::NoLeader | CoordinatorError::LeadershipLost => {
                Status::unavailable(msg)
            }
            CoordinatorError::Unknown(_) => Status::unknown(msg),
            CoordinatorError::Raft(_) => Status::internal(msg),
            CoordinatorError::Limit(_) => Status::invalid_argument(msg),
            CoordinatorError::ResourceExhausted(_) => Status::resource_exhausted(msg),
        }
    }
}
