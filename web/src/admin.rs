//! Cluster administration as JSON (issue 23): the coordinators' `Admin` RPCs an
//! operator or the console needs, at `POST /v1/admin/<name>`, over any implementation of
//! the `Admin` trait. A coordinator serves them from its own service (in process); a
//! node forwards each to the coordinator group with the caller's key
//! ([`RemoteAdmin`]), so every node's port takes them too. Either way the coordinator
//! checks the key: read keys see, admin keys act.
//!
//! Left out on purpose (the CLI has them): membership changes, API keys (their secrets
//! are shown once, to a terminal), allocating an empty shard over lost data and
//! restores (decisions that give data up, taken with `shoal` and a confirmation), and
//! the map's export and import (disaster recovery of the coordinator group itself).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::routing::post;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::coordinator::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::{call, Route};

macro_rules! admin_routes {
    ($($path:literal => $method:ident, $rpc:literal, $req:ident -> $resp:ident, $summary:literal;)*) => {
        /// Every admin route, in the order the document lists them.
        pub const ADMIN_ROUTES: &[Route] = &[$(Route {
            path: $path,
            rpc: $rpc,
            request: concat!("shoal.coordinator.v1.", stringify!($req)),
            response: concat!("shoal.coordinator.v1.", stringify!($resp)),
            summary: $summary,
        },)*];

        /// The admin routes over `admin` (no body limit or fallback: the caller's router
        /// sets those for all its routes).
        pub fn routes<A: Admin>(admin: Arc<A>, max_body: usize) -> axum::Router {
            let mut r = axum::Router::new();
            $({
                let a = admin.clone();
                r = r.route($path, post(move |headers: HeaderMap, body: Result<Bytes, BytesRejection>| async move {
                    call::<cpb::$req, _, _>(max_body, &headers, body, stringify!($req), async move |req| {
                        a.$method(req).await
                    })
                    .await
                }));
            })*
            r
        }
    };
}

admin_routes! {
    "/v1/admin/cluster-status" => cluster_status, "ClusterStatus", ClusterStatusRequest -> ClusterStatusResponse,
        "The coordinator group: members, leader, term, map version";
    "/v1/admin/list-nodes" => list_nodes, "ListNodes", ListNodesRequest -> ListNodesResponse,
        "The nodes and their state";
    "/v1/admin/drain-node" => drain_node, "DrainNode", DrainNodeRequest -> NodeInfo,
        "Move every replica off a node (undo: take replicas again)";
    "/v1/admin/list-collections" => list_collections, "ListCollections", ListCollectionsRequest -> ListCollectionsResponse,
        "The collections";
    "/v1/admin/create-collection" => create_collection, "CreateCollection", CreateCollectionRequest -> CollectionInfo,
        "Create a collection (shards placed on the nodes)";
    "/v1/admin/describe-collection" => describe_collection, "DescribeCollection", DescribeCollectionRequest -> CollectionInfo,
        "One collection with its shards";
    "/v1/admin/drop-collection" => drop_collection, "DropCollection", DropCollectionRequest -> DropCollectionResponse,
        "Drop a collection (its replicas go to the nodes' trash)";
    "/v1/admin/set-collection-policy" => set_collection_policy, "SetCollectionPolicy", SetCollectionPolicyRequest -> CollectionInfo,
        "Change a collection's automatic rebuild policy";
    "/v1/admin/list-shards" => list_shards, "ListShards", ListShardsRequest -> ListShardsResponse,
        "Shards with their replicas' last reports (lag, documents, generation)";
    "/v1/admin/promote-replica" => promote_replica, "PromoteReplica", PromoteReplicaRequest -> Shard,
        "Make a replica its shard's primary";
    "/v1/admin/start-index-build" => start_index_build, "StartIndexBuild", StartIndexBuildRequest -> Operation,
        "Start an index build operation (every shard)";
    "/v1/admin/start-compaction" => start_compaction, "StartCompaction", StartCompactionRequest -> Operation,
        "Start a compaction operation";
    "/v1/admin/start-split" => start_split, "StartSplit", StartSplitRequest -> Operation,
        "Double a collection's shard count online";
    "/v1/admin/start-backup" => start_backup, "StartBackup", StartBackupRequest -> Operation,
        "Back a collection up into a repository";
    "/v1/admin/start-rebuild" => start_rebuild, "StartRebuild", StartRebuildRequest -> Operation,
        "Rebuild a collection online to new parameters or a new model";
    "/v1/admin/commit-rebuild" => commit_rebuild, "CommitRebuild", EndRebuildRequest -> Operation,
        "Commit a switched rebuild";
    "/v1/admin/rollback-rebuild" => rollback_rebuild, "RollbackRebuild", EndRebuildRequest -> Operation,
        "Serve the previous generations again";
    "/v1/admin/list-operations" => list_operations, "ListOperations", ListOperationsRequest -> ListOperationsResponse,
        "Cluster operations, running and finished";
    "/v1/admin/cancel-operation" => cancel_operation, "CancelOperation", CancelOperationRequest -> Operation,
        "Cancel a running operation";
    "/v1/admin/set-alias" => set_alias, "SetAlias", SetAliasRequest -> ListAliasesResponse,
        "Point an alias at a collection (switched atomically)";
    "/v1/admin/list-aliases" => list_aliases, "ListAliases", ListAliasesRequest -> ListAliasesResponse,
        "The aliases";
}

/// The coordinators' `Admin` service as a node reaches it: each call forwarded to the
/// group (following its leader) with the key the caller presented, so the coordinator
/// decides what the key may do exactly as for a gRPC caller.
#[derive(Clone)]
pub struct RemoteAdmin {
    client: Client,
}

impl RemoteAdmin {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn client<T>(&self, req: &Request<T>) -> Client {
        let key = shoal_proto::auth::presented(req.metadata());
        self.client.clone().with_key(key)
    }
}

/// A coordinator's own service first, and where it is not the leader and the answer
/// needs the leader (the replicas' reports live in its memory: UNAVAILABLE naming it),
/// the leader through the group, with the caller's key: the console and the admin
/// routes answer alike on every member.
#[derive(Clone)]
pub struct LeaderFirst<A> {
    local: Arc<A>,
}

impl<A> LeaderFirst<A> {
    pub fn new(local: Arc<A>) -> Self {
        Self { local }
    }
}

/// The leader's address a follower's refusal names, if it names one.
fn leader_of(s: &Status) -> Option<String> {
    if s.code() != tonic::Code::Unavailable {
        return None;
    }
    let v = s.metadata().get(shoal_proto::client::LEADER_HEADER)?;
    v.to_str().ok().map(str::to_string)
}

macro_rules! forward {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl Admin for RemoteAdmin {
            $(async fn $name(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                let mut c = self.client(&req);
                c.$name(req.into_inner()).await.map(Response::new)
            })*
        }

        #[tonic::async_trait]
        impl<A: Admin> Admin for LeaderFirst<A> {
            $(async fn $name(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                let (meta, _, msg) = req.into_parts();
                let again = || Request::from_parts(meta.clone(), Default::default(), msg.clone());
                match self.local.$name(again()).await {
                    Err(s) => match leader_of(&s) {
                        Some(leader) => RemoteAdmin::new(Client::new([leader])).$name(again()).await,
                        None => Err(s),
                    },
                    ok => ok,
                }
            })*
        }
    };
}

forward! {
    create_collection(cpb::CreateCollectionRequest) -> cpb::CollectionInfo;
    drop_collection(cpb::DropCollectionRequest) -> cpb::DropCollectionResponse;
    describe_collection(cpb::DescribeCollectionRequest) -> cpb::CollectionInfo;
    list_collections(cpb::ListCollectionsRequest) -> cpb::ListCollectionsResponse;
    list_nodes(cpb::ListNodesRequest) -> cpb::ListNodesResponse;
    list_shards(cpb::ListShardsRequest) -> cpb::ListShardsResponse;
    cluster_status(cpb::ClusterStatusRequest) -> cpb::ClusterStatusResponse;
    add_learner(cpb::AddLearnerRequest) -> cpb::ClusterStatusResponse;
    change_membership(cpb::ChangeMembershipRequest) -> cpb::ClusterStatusResponse;
    drain_node(cpb::DrainNodeRequest) -> cpb::NodeInfo;
    promote_replica(cpb::PromoteReplicaRequest) -> cpb::Shard;
    allocate_empty_shard(cpb::AllocateEmptyShardRequest) -> cpb::Shard;
    create_key(cpb::CreateKeyRequest) -> cpb::CreateKeyResponse;
    list_keys(cpb::ListKeysRequest) -> cpb::ListKeysResponse;
    revoke_key(cpb::RevokeKeyRequest) -> cpb::ApiKey;
    set_collection_policy(cpb::SetCollectionPolicyRequest) -> cpb::CollectionInfo;
    start_index_build(cpb::StartIndexBuildRequest) -> cpb::Operation;
    start_compaction(cpb::StartCompactionRequest) -> cpb::Operation;
    start_split(cpb::StartSplitRequest) -> cpb::Operation;
    start_backup(cpb::StartBackupRequest) -> cpb::Operation;
    restore_collection(cpb::RestoreCollectionRequest) -> cpb::Operation;
    restore_shards(cpb::RestoreShardsRequest) -> cpb::Operation;
    export_map(cpb::ExportMapRequest) -> cpb::ExportMapResponse;
    import_map(cpb::ImportMapRequest) -> cpb::ExportMapResponse;
    start_rebuild(cpb::StartRebuildRequest) -> cpb::Operation;
    commit_rebuild(cpb::EndRebuildRequest) -> cpb::Operation;
    rollback_rebuild(cpb::EndRebuildRequest) -> cpb::Operation;
    set_alias(cpb::SetAliasRequest) -> cpb::ListAliasesResponse;
    list_aliases(cpb::ListAliasesRequest) -> cpb::ListAliasesResponse;
    list_operations(cpb::ListOperationsRequest) -> cpb::ListOperationsResponse;
    cancel_operation(cpb::CancelOperationRequest) -> cpb::Operation;
}
