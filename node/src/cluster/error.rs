//! The replica protocol's errors, typed. Replication, the local replica handlers and
//! the transports speak [`ReplicaError`]; it becomes a gRPC status only where a call
//! leaves the process (`service.rs`, and the gateway's answers to its clients) and is
//! read back from one where a remote replica answers (`transport::GrpcReplica`), both
//! through the two `From` impls below. The kind travels in the
//! `shoal-error` metadata key beside the code, so a kind that shares a code with
//! another (a stale epoch and a refused snapshot are both FAILED_PRECONDITION) comes
//! back as itself; a status without the key (a proxy's, tonic's own) is read by code.
//!
//! Architecture invariant: no replica call's `tonic::Code` is read outside this file
//! (the coordinator client's statuses are still read by code where it is called).

use shoal_engine::ShardError;
use shoal_proto::limits::Exceeded;
use tonic::{Code, Status};

/// The metadata key naming a [`ReplicaError`]'s kind on the wire.
pub const ERROR_KIND_KEY: &str = "shoal-error";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The request is malformed or over a limit: the same on every replica, so no
    /// retry elsewhere helps.
    #[error("{0}")]
    Invalid(String),
    /// The request would cost more than this node allows (an exact search's rows).
    #[error("{0}")]
    TooCostly(String),
    /// The data volume is under its reserve: writes resume once space is freed.
    #[error("{0}")]
    DiskFull(String),
    /// Not answerable here now: the replica is not open, not primary, fenced, handing
    /// over or without its quorum, or the node is unreachable. Another replica, or a
    /// retry, may answer.
    #[error("{0}")]
    Unavailable(String),
    /// The shard is splitting (issue 19): sealed while its forks are made, or the
    /// caller routed by another shard count than this replica's map holds. The map
    /// moves within seconds; gateways retry these on their own (UNAVAILABLE).
    #[error("{0}")]
    Moving(String),
    /// The sender's epoch is older than one this replica has seen: a newer primary
    /// exists.
    #[error("{0}")]
    StaleEpoch(String),
    /// Refused on this replica's state: a snapshot behind its copy, an index that
    /// cannot be trained yet or is already building, a wire format it cannot read.
    #[error("{0}")]
    Refused(String),
    /// The caller's deadline passed.
    #[error("{0}")]
    Deadline(String),
    /// A conditional write's expected version no longer holds (issue 22): read again.
    #[error("{0}")]
    Conflict(String),
    /// A fault on the answering node (its disk, a snapshot it could not read).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

impl ReplicaError {
    /// The caller's fault, the same on every replica: the client hears it rather
    /// than a partial answer.
    pub fn is_request_fault(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::TooCostly(_))
    }

    /// The kind, as logs, per-shard answers and the wire name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::TooCostly(_) => "too_costly",
            Self::DiskFull(_) => "disk_full",
            Self::Unavailable(_) => "unavailable",
            Self::Moving(_) => "moving",
            Self::StaleEpoch(_) => "stale_epoch",
            Self::Refused(_) => "refused",
            Self::Deadline(_) => "deadline",
            Self::Conflict(_) => "conflict",
            Self::Internal(_) => "internal",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Invalid(m)
            | Self::TooCostly(m)
            | Self::DiskFull(m)
            | Self::Unavailable(m)
            | Self::Moving(m)
            | Self::StaleEpoch(m)
            | Self::Refused(m)
            | Self::Deadline(m)
            | Self::Conflict(m)
            | Self::Internal(m) => m,
        }
    }

    /// The same kind with `prefix: ` before the message (the shard and node a
    /// gateway's call went to).
    pub fn context(self, prefix: impl std::fmt::Display) -> Self {
        let m = format!("{prefix}: {}", self.message());
        self.with_message(m)
    }

    fn with_message(&self, m: String) -> Self {
        match self {
            Self::Invalid(_) => Self::Invalid(m),
            Self::TooCostly(_) => Self::TooCostly(m),
            Self::DiskFull(_) => Self::DiskFull(m),
            Self::Unavailable(_) => Self::Unavailable(m),
            Self::Moving(_) => Self::Moving(m),
            Self::StaleEpoch(_) => Self::StaleEpoch(m),
            Self::Refused(_) => Self::Refused(m),
            Self::Deadline(_) => Self::Deadline(m),
            Self::Conflict(_) => Self::Conflict(m),
            Self::Internal(_) => Self::Internal(m),
        }
    }

    fn code(&self) -> Code {
        match self {
            Self::Invalid(_) => Code::InvalidArgument,
            Self::TooCostly(_) | Self::DiskFull(_) => Code::ResourceExhausted,
            Self::Unavailable(_) | Self::Moving(_) => Code::Unavailable,
            Self::StaleEpoch(_) | Self::Refused(_) => Code::FailedPrecondition,
            Self::Deadline(_) => Code::DeadlineExceeded,
            Self::Conflict(_) => Code::Aborted,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ReplicaError> for Status {
    fn from(e: ReplicaError) -> Status {
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert(
            ERROR_KIND_KEY,
            tonic::metadata::MetadataValue::from_static(e.kind()),
        );
        Status::with_metadata(e.code(), e.message(), meta)
    }
}

impl From<Status> for ReplicaError {
    /// A remote replica's answer (or tonic's own status for a call that failed on
    /// the way: unreachable, cancelled, over the message size).
    fn from(s: Status) -> ReplicaError {
        let m = s.message().to_string();
        let kind = s
            .metadata()
            .get(ERROR_KIND_KEY)
            .and_then(|v| v.to_str().ok());
        match (kind, s.code()) {
            (Some("invalid"), _) | (None, Code::InvalidArgument | Code::OutOfRange) => {
                Self::Invalid(m)
            }
            (Some("too_costly"), _) => Self::TooCostly(m),
            (Some("disk_full"), _) | (None, Code::ResourceExhausted) => Self::DiskFull(m),
            (Some("stale_epoch"), _) => Self::StaleEpoch(m),
            (Some("moving"), _) => Self::Moving(m),
            (Some("refused"), _) | (None, Code::FailedPrecondition) => Self::Refused(m),
            (Some("deadline"), _) | (None, Code::DeadlineExceeded) => Self::Deadline(m),
            (Some("conflict"), _) => Self::Conflict(m),
            (Some("internal"), _) | (None, Code::Internal | Code::DataLoss) => Self::Internal(m),
            (None, Code::Unimplemented) => {
                Self::Internal(format!("the peer does not implement this call: {m}"))
            }
            (Some("unavailable"), _) | (None, Code::Unavailable) => Self::Unavailable(m),
            // What a call that never reached a handler reports (unknown, cancelled,
            // aborted), or a kind this build does not know: another try may answer.
            (_, code) => Self::Unavailable(format!("{code:?}: {m}")),
        }
    }
}

impl From<Exceeded> for ReplicaError {
    fn from(e: Exceeded) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl From<ShardError> for ReplicaError {
    fn from(e: ShardError) -> Self {
        match e {
            ShardError::InvalidDocument { .. }
            | ShardError::InvalidQuery(_)
            | ShardError::InvalidConfig(_) => Self::Invalid(e.to_string()),
            ShardError::NotEnoughVectors { .. }
            | ShardError::BuildInProgress(_)
            | ShardError::CompactionInProgress(_)
            | ShardError::GenerationRefused(_)
            | ShardError::ScrollStale(_)
            | ShardError::Full(_) => Self::Refused(e.to_string()),
            // A re-embed's state moved between the caller's map and this replica's
            // (issue 21): the caller asks again once its map has moved too.
            ShardError::VectorSet(_) => Self::Moving(e.to_string()),
            ShardError::Conflict(_) => Self::Conflict(e.to_string()),
            e => Self::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_wire() {
        let all = [
            ReplicaError::Invalid("a".into()),
            ReplicaError::TooCostly("b".into()),
            ReplicaError::DiskFull("c".into()),
            ReplicaError::Unavailable("d".into()),
            ReplicaError::StaleEpoch("e".into()),
            ReplicaError::Refused("f".into()),
            ReplicaError::Deadline("g".into()),
            ReplicaError::Conflict("i".into()),
            ReplicaError::Internal("h".into()),
        ];
        for e in all {
            let s = Status::from(e.clone());
            assert_eq!(s.message(), e.message());
            assert_eq!(ReplicaError::from(s), e);
        }
    }

    #[test]
    fn a_status_without_a_kind_is_read_by_its_code() {
        let r = ReplicaError::from(Status::unavailable("connection refused"));
        assert_eq!(r, ReplicaError::Unavailable("connection refused".into()));
        let r = ReplicaError::from(Status::cancelled("gone"));
        assert_eq!(r, ReplicaError::Unavailable("Cancelled: gone".into()));
        let r = ReplicaError::from(Status::resource_exhausted("over"));
        assert_eq!(r, ReplicaError::DiskFull("over".into()));
        let r = ReplicaError::from(Status::invalid_argument("bad"));
        assert!(r.is_request_fault());
    }
}
