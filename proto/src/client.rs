//! The client of the coordinator group, for nodes, the CLI and tests: it tries the
//! given addresses in turn and follows not-leader hints (the `x-shoal-leader` header a
//! follower sets), so callers need not know the leader. Typed methods for every unary
//! RPC; `admin` / `cluster` / `call` for anything else (a stream, a custom deadline).
//! It lives in the proto crate so a node links no Raft or storage code to reach the
//! coordinators.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::coordinator::admin_client::AdminClient;
use crate::coordinator::cluster_map_client::ClusterMapClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::{Attach, Authed};
use crate::coordinator as cpb;

/// The header a follower sets on UNAVAILABLE to name the leader's public address.
pub const LEADER_HEADER: &str = "x-shoal-leader";

/// A typed unary call through [`Client::admin`] or [`Client::cluster`].
macro_rules! unary {
    ($($service:ident :: $name:ident($req:ty) -> $resp:ty;)*) => {
        $(
            pub async fn $name(&mut self, req: $req) -> Result<$resp, Status> {
                self.$service(|mut c| {
                    let r = req.clone();
                    async move { c.$name(r).await }
                })
                .await
                .map(tonic::Response::into_inner)
            }
        )*
    };
}

#[derive(Clone)]
pub struct Client {
    addrs: Vec<String>,
    /// Index into `addrs` of the member that last answered.
    current: usize,
    /// How long one call keeps retrying through elections.
    pub patience: Duration,
    /// The API key its calls carry (the process's, [`crate::auth::use_key`], unless
    /// set with [`Client::with_key`]).
    key: Option<std::sync::Arc<str>>,
}

impl Client {
    pub fn new(addrs: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            addrs: addrs.into_iter().map(Into::into).collect(),
            current: 0,
            patience: Duration::from_secs(15),
            key: crate::auth::process_key(),
        }
    }

    /// Calls carry `key` (or none).
    pub fn with_key(mut self, key: Option<&str>) -> Self {
        self.key = key.map(Into::into);
        self
    }

    fn channel(addr: &str) -> Result<Channel, Status> {
        crate::channel(addr, Some(Duration::from_secs(12)))
            .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))
    }

    /// Runs `f` against a member, moving to the hinted leader or the next address on
    /// UNAVAILABLE, until it succeeds, fails for another reason, or patience runs out.
    /// Only UNAVAILABLE is retried: the request was not applied.
    /// Moves on to the next address: the member this client talks to answers but has
    /// stopped advancing (a node's map watch uses it; see `reconcile::follow_map`).
    pub fn skip(&mut self) {
        if !self.addrs.is_empty() {
            self.current = (self.current + 1) % self.addrs.len();
        }
    }

    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        if self.addrs.is_empty() {
            return Err(Status::invalid_argument("no coordinator address given"));
        }
        let deadline = Instant::now() + self.patience;
        loop {
            let addr = self.addrs[self.current % self.addrs.len()].clone();
            let err = match f(Self::channel(&addr)?).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == Code::Unavailable => s,
                Err(s) => return Err(s),
            };
            let hint = err
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match hint.and_then(|h| {
                self.addrs.iter().position(|a| *a == h).or_else(|| {
                    self.addrs.push(h);
                    Some(self.addrs.len() - 1)
                })
            }) {
                Some(i) if i != self.current => self.current = i,
                _ => {
                    self.current = (self.current + 1) % self.addrs.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if Instant::now() > deadline {
                return Err(err);
            }
        }
    }

    pub async fn admin<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(AdminClient<Authed>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let key = Attach::key(self.key.clone());
        self.call(|ch| f(AdminClient::with_interceptor(ch, key.clone())))
            .await
    }

    pub async fn cluster<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(ClusterMapClient<Authed>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let key = Attach::key(self.key.clone());
        self.call(|ch| f(ClusterMapClient::with_interceptor(ch, key.clone())))
            .await
    }

    /// Creates a collection. A create retried after an outcome it could not know (a
    /// member that lost its group while the write was pending answers UNAVAILABLE, and
    /// the write may have committed) may find the collection made: when it is the one
    /// asked for (same dimension, metric, shards, replication factor), that is success.
    pub async fn create_collection(
        &mut self,
        req: cpb::CreateCollectionRequest,
    ) -> Result<cpb::CollectionInfo, Status> {
        let mut attempts = 0u32;
        let r = self
            .admin(|mut c| {
                attempts += 1;
                let r = req.clone();
                async move { c.create_collection(r).await }
            })
            .await
            .map(tonic::Response::into_inner);
        match r {
            Err(e) if e.code() == Code::AlreadyExists && attempts > 1 => {
                let info = self
                    .describe_collection(cpb::DescribeCollectionRequest {
                        name: req.name.clone(),
                    })
                    .await?;
                let ours = info.collection.as_ref().is_some_and(|c| {
                    c.dimension == req.dimension
                        && c.metric == req.metric
                        && (req.shard_count == 0 || c.shard_count == req.shard_count)
                        && (req.replication_factor == 0
                            || c.replication_factor == req.replication_factor)
                });
                if ours {
                    Ok(info)
                } else {
                    Err(e)
                }
            }
            r => r,
        }
    }

    unary! {
        admin::drop_collection(cpb::DropCollectionRequest) -> cpb::DropCollectionResponse;
        admin::describe_collection(cpb::DescribeCollectionRequest) -> cpb::CollectionInfo;
        admin::list_collections(cpb::ListCollectionsRequest) -> cpb::ListCollectionsResponse;
        admin::list_nodes(cpb::ListNodesRequest) -> cpb::ListNodesResponse;
        admin::list_shards(cpb::ListShardsRequest) -> cpb::ListShardsResponse;
        admin::cluster_status(cpb::ClusterStatusRequest) -> cpb::ClusterStatusResponse;
        admin::add_learner(cpb::AddLearnerRequest) -> cpb::ClusterStatusResponse;
        admin::change_membership(cpb::ChangeMembershipRequest) -> cpb::ClusterStatusResponse;
        admin::drain_node(cpb::DrainNodeRequest) -> cpb::NodeInfo;
        admin::promote_replica(cpb::PromoteReplicaRequest) -> cpb::Shard;
        admin::allocate_empty_shard(cpb::AllocateEmptyShardRequest) -> cpb::Shard;
        admin::create_key(cpb::CreateKeyRequest) -> cpb::CreateKeyResponse;
        admin::list_keys(cpb::ListKeysRequest) -> cpb::ListKeysResponse;
        admin::revoke_key(cpb::RevokeKeyRequest) -> cpb::ApiKey;
        admin::set_collection_policy(cpb::SetCollectionPolicyRequest) -> cpb::CollectionInfo;
        admin::start_index_build(cpb::StartIndexBuildRequest) -> cpb::Operation;
        admin::start_compaction(cpb::StartCompactionRequest) -> cpb::Operation;
        admin::start_split(cpb::StartSplitRequest) -> cpb::Operation;
        admin::start_backup(cpb::StartBackupRequest) -> cpb::Operation;
        admin::restore_collection(cpb::RestoreCollectionRequest) -> cpb::Operation;
        admin::restore_shards(cpb::RestoreShardsRequest) -> cpb::Operation;
        admin::export_map(cpb::ExportMapRequest) -> cpb::ExportMapResponse;
        admin::import_map(cpb::ImportMapRequest) -> cpb::ExportMapResponse;
        admin::start_rebuild(cpb::StartRebuildRequest) -> cpb::Operation;
        admin::commit_rebuild(cpb::EndRebuildRequest) -> cpb::Operation;
        admin::rollback_rebuild(cpb::EndRebuildRequest) -> cpb::Operation;
        admin::set_alias(cpb::SetAliasRequest) -> cpb::ListAliasesResponse;
        admin::list_aliases(cpb::ListAliasesRequest) -> cpb::ListAliasesResponse;
        admin::list_operations(cpb::ListOperationsRequest) -> cpb::ListOperationsResponse;
        admin::cancel_operation(cpb::CancelOperationRequest) -> cpb::Operation;
        cluster::register_node(cpb::RegisterNodeRequest) -> cpb::NodeInfo;
        cluster::heartbeat(cpb::HeartbeatRequest) -> cpb::HeartbeatResponse;
        cluster::hand_over(cpb::HandOverRequest) -> cpb::HandOverResponse;
    }
}
