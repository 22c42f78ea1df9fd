//! shoal's gRPC API, generated from `proto/shoal/*.proto`. Public services (admin,
//! cluster map) and internal ones (raft) live in separate packages so a deployment
//! can expose one port and firewall the other.

pub mod coordinator {
    tonic::include_proto!("shoal.coordinator.v1");
}

pub mod raft {
    tonic::include_proto!("shoal.raft.v1");
}
