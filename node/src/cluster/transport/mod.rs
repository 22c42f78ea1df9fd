//! The replica protocol as a seam. [`ReplicaApi`] is what the gateway and a primary's
//! replicators call on one node's shard replicas; [`LocalReplicas`] answers it in this
//! process (the gateway's calls to its own node, and in-process tests of several
//! nodes), [`GrpcReplica`] over another node's internal port. [`Transports`] picks
//! one per (node, address). Both answer with the same typed [`ReplicaError`] (the gRPC
//! side reads it back from the peer's status), so a caller cannot tell which way a call
//! went, and a test through the in-process transport exercises the real protocol.
//!
//! The models: Quickwit's `SearchServiceClient { Local, Grpc }` and Qdrant's
//! `ShardOperation` (local and remote shards behind one trait).

mod faults;
mod local;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use shoal_proto::replica as rpb;
use shoal_proto::replica::replica_client::ReplicaClient;
use tonic::transport::Channel;

use crate::cluster::error::ReplicaError;
use crate::telemetry;

pub use faults::Faults;
pub use local::LocalReplicas;

use faults::Faulty;

/// A snapshot as it travels: the first chunk names the shard, epoch and manifest.
pub type SnapshotStream = BoxStream<'static, Result<rpb::SnapshotChunk, ReplicaError>>;

/// One node's shard replicas, as a caller sees them. Every call carries its deadline.
#[tonic::async_trait]
pub trait ReplicaApi: Send + Sync {
    /// A write to the shard's primary: acknowledged once its quorum holds it.
    async fn write(
        &self,
        req: rpb::WriteRequest,
        timeout: Duration,
    ) -> Result<rpb::WriteResponse, ReplicaError>;
    /// Batches from a primary to a backup (also its probe, with no batches).
    async fn append(
        &self,
        req: rpb::AppendRequest,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError>;
    /// A primary's segments replacing a backup's copy.
    async fn install_snapshot(
        &self,
        chunks: SnapshotStream,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError>;
    /// What a backup holds of an unfinished snapshot (to resume it).
    async fn snapshot_staged(
        &self,
        req: rpb::SnapshotStagedRequest,
        timeout: Duration,
    ) -> Result<rpb::SnapshotStagedResponse, ReplicaError>;
    async fn search(
        &self,
        req: rpb::ShardSearchRequest,
        timeout: Duration,
    ) -> Result<rpb::ShardSearchResponse, ReplicaError>;
    /// Several searches of one shard, answered in order (a batch search's part).
    async fn search_many(
        &self,
        req: rpb::ShardSearchBatch,
        timeout: Duration,
    ) -> Result<rpb::ShardSearchBatchResponse, ReplicaError>;
    async fn get(
        &self,
        req: rpb::ShardGetRequest,
        timeout: Duration,
    ) -> Result<rpb::ShardGetResponse, ReplicaError>;
    async fn build(
        &self,
        req: rpb::BuildRequest,
        timeout: Duration,
    ) -> Result<rpb::BuildResponse, ReplicaError>;
    /// A piece of a replica's serving index generation (a backup fetching its
    /// primary's).
    async fn fetch_generation(
        &self,
        req: rpb::FetchGenerationRequest,
        timeout: Duration,
    ) -> Result<rpb::FetchGenerationResponse, ReplicaError>;
}

/// Nodes living in one process, by address: a test's cluster without sockets. A node
/// missing from it (never added, or taken out) is unreachable, as a partitioned one;
/// calls between nodes that name themselves ([`Transports::in_process_as`]) also pass
/// through the net's [`Faults`].
#[derive(Clone, Default)]
pub struct InProcessNet {
    nodes: Arc<RwLock<HashMap<String, Weak<LocalReplicas>>>>,
    faults: Arc<Mutex<Faults>>,
}

impl InProcessNet {
    pub fn add(&self, addr: &str, node: &Arc<LocalReplicas>) {
        self.nodes
            .write()
            .insert(addr.to_string(), Arc::downgrade(node));
    }

    /// Takes a node off the network (its calls in and out fail UNAVAILABLE).
    pub fn remove(&self, addr: &str) {
        self.nodes.write().remove(addr);
    }

    /// The network's faults, to change.
    pub fn faults(&self) -> parking_lot::MutexGuard<'_, Faults> {
        self.faults.lock()
    }

    fn get(&self, addr: &str) -> Option<Arc<LocalReplicas>> {
        self.nodes.read().get(addr)?.upgrade()
    }
}

/// How this node reaches a node's replicas: its own directly, others over gRPC (or,
/// in an in-process test, through the [`InProcessNet`]).
pub struct Transports {
    /// This node and its replicas (weak: the replicas' replication holds these
    /// transports, and this must not keep them alive).
    local: Mutex<Option<(String, Weak<LocalReplicas>)>>,
    net: Option<InProcessNet>,
    /// In process: this node's own address on the net (its calls pass the faults).
    from: Option<String>,
    /// gRPC channels, one per address.
    channels: Mutex<HashMap<String, Channel>>,
}

impl Transports {
    /// Over gRPC, except this node's own replicas once [`Self::set_local`] names them.
    pub fn grpc() -> Arc<Self> {
        Arc::new(Self {
            local: Mutex::default(),
            net: None,
            from: None,
            channels: Mutex::default(),
        })
    }

    /// Every node through `net`, in this process.
    pub fn in_process(net: InProcessNet) -> Arc<Self> {
        Arc::new(Self {
            local: Mutex::default(),
            net: Some(net),
            from: None,
            channels: Mutex::default(),
        })
    }

    /// Every node through `net`, as the node at address `me`: its calls to the others
    /// pass through the net's faults.
    pub fn in_process_as(net: InProcessNet, me: &str) -> Arc<Self> {
        Arc::new(Self {
            local: Mutex::default(),
            net: Some(net),
            from: Some(me.to_string()),
            channels: Mutex::default(),
        })
    }

    /// Names this node's replicas: calls to `node_id` go to them directly.
    pub fn set_local(&self, node_id: &str, replicas: &Arc<LocalReplicas>) {
        *self.local.lock() = Some((node_id.to_string(), Arc::downgrade(replicas)));
    }

    /// The replicas of node `node` at `addr`.
    pub fn to(&self, node: &str, addr: &str) -> Result<Arc<dyn ReplicaApi>, ReplicaError> {
        if let Some((id, local)) = self.local.lock().as_ref() {
            if id == node {
                if let Some(l) = local.upgrade() {
                    return Ok(l);
                }
            }
        }
        if let Some(net) = &self.net {
            let l = net.get(addr).ok_or_else(|| {
                ReplicaError::Unavailable(format!("node {node} at {addr} unreachable"))
            })?;
            return Ok(match &self.from {
                Some(from) => Arc::new(Faulty {
                    inner: l,
                    faults: net.faults.clone(),
                    from: from.clone(),
                    to: addr.to_string(),
                }),
                None => l,
            });
        }
        let mut ch = self.channels.lock();
        let c = match ch.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = shoal_proto::channel(addr, None).map_err(|e| {
                    ReplicaError::Internal(format!("bad node address {addr:?}: {e}"))
                })?;
                ch.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(Arc::new(GrpcReplica(
            ReplicaClient::new(c)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )))
    }
}

/// Another node's replicas, over its internal port. Each call carries the deadline
/// (`grpc-timeout`) and the caller's trace context.
pub struct GrpcReplica(ReplicaClient<Channel>);

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    telemetry::inject(&mut r);
    r
}

/// A snapshot's chunks into `tx`, until the first error (the sender reports it) or
/// until the receiving side is gone.
async fn forward_ok(mut s: SnapshotStream, tx: tokio::sync::mpsc::Sender<rpb::SnapshotChunk>) {
    while let Some(Ok(c)) = s.next().await {
        if tx.send(c).await.is_err() {
            return;
        }
    }
}

/// `ReplicaApi` over the generated client: each unary call with the deadline and
/// trace context on its request, the peer's status read back as a [`ReplicaError`];
/// `$rest` the calls that are not unary. (The attribute inside the macro: it must see
/// the expanded methods.)
macro_rules! grpc_replica_api {
    (unary { $($method:ident($req:ty) -> $resp:ty;)* } $($rest:item)*) => {
        #[tonic::async_trait]
        impl ReplicaApi for GrpcReplica {
            $(
                async fn $method(&self, req: $req, timeout: Duration) -> Result<$resp, ReplicaError> {
                    Ok(self.0.clone().$method(request(req, timeout)).await?.into_inner())
                }
            )*
            $($rest)*
        }
    };
}

grpc_replica_api! {
    unary {
        write(rpb::WriteRequest) -> rpb::WriteResponse;
        append(rpb::AppendRequest) -> rpb::AppendResponse;
        snapshot_staged(rpb::SnapshotStagedRequest) -> rpb::SnapshotStagedResponse;
        search(rpb::ShardSearchRequest) -> rpb::ShardSearchResponse;
        search_many(rpb::ShardSearchBatch) -> rpb::ShardSearchBatchResponse;
        get(rpb::ShardGetRequest) -> rpb::ShardGetResponse;
        build(rpb::BuildRequest) -> rpb::BuildResponse;
        fetch_generation(rpb::FetchGenerationRequest) -> rpb::FetchGenerationResponse;
    }

    async fn install_snapshot(
        &self,
        chunks: SnapshotStream,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        // A chunk the sender failed to read ends the stream; the sender reports it.
        // Through a channel: tonic wants a concrete stream type it can prove Send.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let forward = tokio::spawn(forward_ok(chunks, tx));
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
        let r = self
            .0
            .clone()
            .install_snapshot(request(chunks, timeout))
            .await;
        forward.abort();
        Ok(r?.into_inner())
    }
}
