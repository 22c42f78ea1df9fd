//! Engine errors as gRPC statuses: the one place replication maps a typed error to a
//! code, at the service boundary.

use tonic::Status;

use crate::shard::ShardError;

pub fn shard_status(e: ShardError) -> Status {
    match e {
        ShardError::InvalidDocument { .. }
        | ShardError::InvalidQuery(_)
        | ShardError::InvalidConfig(_) => Status::invalid_argument(e.to_string()),
        ShardError::NotEnoughVectors { .. } | ShardError::BuildInProgress(_) => {
            Status::failed_precondition(e.to_string())
        }
        e => Status::internal(e.to_string()),
    }
}
