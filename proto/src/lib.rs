//! shoal's gRPC API, generated from `proto/shoal/*.proto`. Public services (admin,
//! cluster map) and internal ones (raft) live in separate packages so a deployment
//! can expose one port and firewall the other.
//!
//! One alias per package, the same in every file of the workspace: `pb` the public
//! API (`shoal.v1`), `cpb` the coordinator's (`shoal.coordinator.v1`), `rpb` the
//! replica protocol (`shoal.internal.v1`), `raftpb` the coordinators' Raft
//! (`shoal.raft.v1`).

pub mod audit;
pub mod auth;
pub mod client;
pub mod clip;
pub mod codec;
pub mod filter;
pub mod limits;
pub mod metric;
pub mod precision;
pub mod routing;
pub mod sizing;
pub mod tls;
pub mod wire;

/// The generated code, nested as the proto packages are, so that one package's
/// messages can name another's (the replica protocol names shards by the
/// coordinator's `ShardId`); the short names below are how the workspace uses them.
pub mod shoal {
    pub mod coordinator {
        pub mod v1 {
            tonic::include_proto!("shoal.coordinator.v1");
            include!(concat!(env!("OUT_DIR"), "/shoal.coordinator.v1.serde.rs"));

            impl NodeState {
                /// Heartbeating and serving (up, or draining but still serving until its
                /// replicas move): the same rule as the coordinator map's `NodeState::is_live`.
                pub fn is_live(self) -> bool {
                    matches!(self, NodeState::Up | NodeState::Draining)
                }

                /// [`NodeState::is_live`] for a state as it travels (an unknown value is not).
                pub fn is_live_value(state: i32) -> bool {
                    NodeState::try_from(state).is_ok_and(NodeState::is_live)
                }
            }
        }
    }

    pub mod raft {
        pub mod v1 {
            tonic::include_proto!("shoal.raft.v1");
        }
    }

    /// The public data API (ingest, search, get, delete), served by every node.
    pub mod v1 {
        tonic::include_proto!("shoal.v1");
        include!(concat!(env!("OUT_DIR"), "/shoal.v1.serde.rs"));
    }

    /// Internal: one shard replica's operations, node to node.
    pub mod internal {
        pub mod v1 {
            tonic::include_proto!("shoal.internal.v1");
        }
    }
}

pub use shoal::coordinator::v1 as coordinator;
pub use shoal::internal::v1 as replica;
pub use shoal::raft::v1 as raft;
pub use shoal::v1;

/// Every service's encoded `FileDescriptorSet`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shoal_descriptor.bin"));

/// How long opening a connection to another shoal process may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The one way a shoal process opens a client connection to another (node to node,
/// member to member, node or operator to the coordinators): connected lazily, on first
/// use, within [`CONNECT_TIMEOUT`], with `TCP_NODELAY` (see [`incoming`]), over TLS
/// when the process has it ([`tls::use_for_clients`]), and with
/// `request_timeout` as every call's deadline where given (was three builders with
/// different settings: the coordinator client's lacked `TCP_NODELAY`).
pub fn channel(
    addr: &str,
    request_timeout: Option<std::time::Duration>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut e = endpoint(addr)?;
    if let Some(t) = request_timeout {
        e = e.timeout(t);
    }
    Ok(e.connect_lazy())
}

/// The endpoint [`channel`] connects to (for a caller that connects at once): TLS when
/// the process has it, `CONNECT_TIMEOUT`, `TCP_NODELAY`.
pub fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let e = match tls::for_clients() {
        Some(tls) => {
            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?
        }
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?,
    };
    Ok(e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
}

/// A bound listener as a server's stream of connections, each with `TCP_NODELAY`:
/// gRPC sends small frames (a response's headers, then its body), and Nagle's algorithm
/// would hold the second until the client's delayed ACK, some 40 ms on Linux. (Tonic
/// sets this only on listeners it binds itself.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
