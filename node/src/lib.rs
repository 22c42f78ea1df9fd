//! shoal worker node. For now: the shard engine, the unit the coordinator places,
//! replicates, rebuilds and queries.

pub mod beir;
pub mod cluster;
pub mod datasets;
pub mod shard;
pub mod telemetry;
