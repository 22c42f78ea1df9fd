//! shoal worker node runtime: replica actors over the shard engine (`shoal-engine`),
//! primary-backup replication, the gateway and the gRPC services (`cluster`), and the
//! process's telemetry.

pub mod backup;
pub mod cluster;
pub mod model;
pub mod telemetry;
