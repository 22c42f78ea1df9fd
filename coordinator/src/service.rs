//! gRPC services: the public Admin and ClusterMap services, and the internal Raft
//! service (peer traffic, forwarded writes, read-index), with proto conversions.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use shoal_proto::coordinator as cpb;
use shoal_proto::filter::PayloadField;
use shoal_proto::raft as raftpb;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::map::{
    Capacity, Change, ClusterMap, Collection, CollectionPolicy, CollectionSpec, Command,
    EncoderRef, IndexParams, Metric, Node, NodeState, Precision, ReplicaState, Shard, ShardKey,
    SplitRole, DEFAULT_REPLICA_MEMORY,
};
use crate::member::{Coordinator, Reports};
use crate::operations::{
    size_index, BuildParams, Operation, OperationKind, Outcome, RebuildParams, RebuildPhase, Step,
};
use crate::raft::{open, payload, Member};
use shoal_proto::auth::{self, KeyRecord, Need, Principal, Role};
use shoal_proto::wire::WireError;

/// A peer's payload that cannot be used: another format is FAILED_PRECONDITION (the
/// peer is fine, the versions differ), anything else INVALID_ARGUMENT.
fn bad_payload(e: WireError) -> Status {
    match e {
        WireError::Format { .. } => Status::failed_precondition(format!("raft payload: {e}")),
        e => Status::invalid_argument(format!("undecodable raft payload: {e}")),
    }
}

/// Refuses a name longer than the limit `name_bytes` before it is looked up or echoed
/// in an error (an error message travels in an HTTP/2 header).
fn check_name(c: &Coordinator, name: &str, what: &str) -> Result<(), Status> {
    shoal_proto::within!(c.limits, name_bytes, name.len(), format!("{what}'s length"))?;
    Ok(())
}

/// Volume and cluster ids are 32 hex digits made by shoal, not user input: a fixed
/// bound, checked before an id is compared or quoted in an error.
fn check_made_id(v: &str, what: &str) -> Result<(), Status> {
    if v.len() > 64 {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes, over the limit of 64",
            v.len()
        )));
    }
    Ok(())
}

// ---- conversions ---------------------------------------------------------------

pub fn encoder_pb(e: &EncoderRef) -> cpb::EncoderRef {
    cpb::EncoderRef {
        model_id: e.model_id.clone(),
        content_hash: e.content_hash.clone(),
    }
}

pub fn collection_pb(c: &Collection) -> cpb::Collection {
    let s = &c.spec;
    cpb::Collection {
        name: s.name.clone(),
        id: c.id,
        dimension: s.dimension,
        metric: Metric::wire(s.metric),
        encoder: s.encoder.as_ref().map(encoder_pb),
        index: Some(index_pb(&s.index)),
        shard_count: s.shard_count,
        replication_factor: s.replication_factor,
        replica_memory_bytes: s.replica_memory_bytes,
        write_quorum: s.write_quorum,
        created_version: c.created_version,
        auto_rebuild_rows: c.policy.auto_rebuild_rows,
        payload_fields: c
            .policy
            .payload_fields
            .iter()
            .map(PayloadField::wire)
            .collect(),
    }
}

/// A request's indexed fields, checked against this process's limits.
fn payload_fields(
    c: &Coordinator,
    fields: &[cpb::PayloadField],
) -> Result<Vec<PayloadField>, Status> {
    let fields = fields
        .iter()
        .map(PayloadField::from_wire)
        .collect::<Result<Vec<_>, _>>()
        .map_err(Status::invalid_argument)?;
    PayloadField::check_all(&fields, &c.limits).map_err(Status::invalid_argument)?;
    Ok(fields)
}

fn node_state_pb(s: NodeState) -> i32 {
    (match s {
        NodeState::Joining => cpb::NodeState::Joining,
        NodeState::Up => cpb::NodeState::Up,
        NodeState::Suspect => cpb::NodeState::Suspect,
        NodeState::Down => cpb::NodeState::Down,
        NodeState::Draining => cpb::NodeState::Draining,
    }) as i32
}

pub fn node_pb(n: &Node, map: &ClusterMap) -> cpb::NodeInfo {
    cpb::NodeInfo {
        id: n.id.clone(),
        addr: n.addr.clone(),
        capacity: Some(cpb::Capacity {
            memory_bytes: n.capacity.memory_bytes,
            gpu: n.capacity.gpu,
            zone: n.capacity.zone.clone(),
        }),
        state: node_state_pb(n.state),
        replicas: map.shards.values().filter(|s| s.holds(&n.id)).count() as u32,
        map_version: map.version,
        cluster_id: map.cluster_id.clone(),
    }
}

pub fn shard_pb(s: &Shard) -> cpb::Shard {
    shard_pb_with(s, &Reports::default())
}

/// A shard with each replica's last heartbeat report (sequence number, lag, index
/// generation), as the leader has them.
pub fn shard_pb_with(s: &Shard, reports: &Reports) -> cpb::Shard {
    let report = |node: &str| reports.get(&s.key, node);
    let primary_seq = s
        .primary
        .as_deref()
        .and_then(report)
        .map_or(0, |r| r.applied_seq);
    cpb::Shard {
        collection: s.key.collection.clone(),
        index: s.key.index,
        primary: s.primary.clone().unwrap_or_default(),
        replicas: s
            .replicas
            .iter()
            .map(|r| {
                let rep = report(&r.node).cloned().unwrap_or_default();
                cpb::Replica {
                    node_id: r.node.clone(),
                    state: (match r.state {
                        ReplicaState::Serving => cpb::ReplicaState::Serving,
                        ReplicaState::Copying => cpb::ReplicaState::Copying,
                        ReplicaState::Leaving => cpb::ReplicaState::Leaving,
                    }) as i32,
                    applied_seq: rep.applied_seq,
                    lag: primary_seq.saturating_sub(rep.applied_seq),
                    serving_generation: rep.serving_generation,
                    live_docs: rep.live_docs,
                    caught_up: rep.caught_up,
                    epoch: rep.epoch,
                }
            })
            .collect(),
        epoch: s.epoch,
        serving_generation: s.serving_generation,
        building_generation: s.building_generation,
        forced_epoch: s.forced_epoch,
        sealed_by: match &s.split {
            Some(SplitRole::Sealed { operation, .. }) => *operation,
            _ => 0,
        },
        seal: s.seal_point().map(|p| cpb::SealPoint {
            epoch: p.epoch,
            seq: p.seq,
            batch_epoch: p.batch_epoch,
        }),
        forking_from: match &s.split {
            Some(SplitRole::Forking { from, .. }) => Some(*from),
            _ => None,
        },
        forking_for: match &s.split {
            Some(SplitRole::Forking { operation, .. }) => *operation,
            _ => 0,
        },
        restoring: s.restoring.unwrap_or(0),
    }
}

fn map_pb(map: &ClusterMap) -> cpb::ClusterMapSnapshot {
    cpb::ClusterMapSnapshot {
        version: map.version,
        collections: map.collections.values().map(collection_pb).collect(),
        nodes: map.nodes.values().map(|n| node_pb(n, map)).collect(),
        shards: map.shards.values().map(shard_pb).collect(),
        cluster_id: map.cluster_id.clone(),
        last_collection_id: map.next_collection_id,
        keys: map.keys.values().map(|k| k.to_pb(true)).collect(),
        operations: map
            .operations
            .values()
            .map(|o| operation_pb(o, map, None))
            .collect(),
        aliases: aliases_pb(map).aliases,
    }
}

fn aliases_pb(map: &ClusterMap) -> cpb::ListAliasesResponse {
    cpb::ListAliasesResponse {
        aliases: map
            .aliases
            .iter()
            .map(|(a, c)| cpb::Alias {
                alias: a.clone(),
                collection: c.clone(),
            })
            .collect(),
    }
}

fn index_pb(ix: &IndexParams) -> cpb::IndexParams {
    cpb::IndexParams {
        nlist: ix.nlist,
        pq_m: ix.pq_m,
        pq_nbits: ix.pq_nbits,
        nprobe: ix.nprobe,
        refine: ix.refine,
        rerank: ix.rerank.wire(),
    }
}

/// An operation on the wire; with the leader's reports, a pending build step says
/// whether its primary is queued for a build slot or building.
pub fn operation_pb(op: &Operation, map: &ClusterMap, reports: Option<&Reports>) -> cpb::Operation {
    let steps = op
        .steps
        .iter()
        .map(|(&index, step)| {
            let key = ShardKey {
                collection: op.collection.clone(),
                index,
            };
            let node = map
                .shards
                .get(&key)
                .and_then(|s| s.primary.clone())
                .unwrap_or_default();
            let mut out = cpb::OperationStep {
                shard: index,
                node: node.clone(),
                ..Default::default()
            };
            match step {
                Step::Pending { from_generation } => {
                    out.from_generation = *from_generation;
                    let r = reports.and_then(|r| r.get(&key, &node));
                    out.state = match r {
                        Some(r) if r.building_generation > 0 => "building",
                        Some(r) if r.build_queued && r.build_operation == op.id => "queued",
                        _ => "pending",
                    }
                    .into();
                }
                Step::Done { generation } => {
                    out.state = "done".into();
                    out.generation = *generation;
                }
                Step::Failed { reason } => {
                    out.state = "failed".into();
                    out.reason = reason.clone();
                }
                Step::Staged { generation, gate } => {
                    out.state = "staged".into();
                    out.generation = *generation;
                    out.gate = gate.clone();
                }
            }
            out
        })
        .collect();
    let (state, reason) = match &op.outcome {
        None => ("running", String::new()),
        Some(Outcome::Succeeded) => ("succeeded", String::new()),
        Some(Outcome::Failed { reason }) => ("failed", reason.clone()),
        Some(Outcome::Cancelled { reason }) => ("cancelled", reason.clone()),
    };
    let build = match &op.kind {
        OperationKind::BuildIndex(p) | OperationKind::Rebuild(RebuildParams { build: p, .. }) => {
            Some(cpb::IndexBuild {
                nlist: p.nlist,
                pq_m: p.pq_m,
                pq_nbits: p.pq_nbits,
                train_sample: p.train_sample,
                rows_per_shard: p.rows_per_shard,
                rerank: p.rerank.wire(),
            })
        }
        _ => None,
    };
    let backup = match &op.kind {
        OperationKind::Backup { url, backup } | OperationKind::Restore { url, backup } => {
            Some(cpb::BackupTarget {
                url: url.clone(),
                backup: backup.clone(),
            })
        }
        _ => None,
    };
    cpb::Operation {
        id: op.id,
        kind: op.kind.name().into(),
        collection: op.collection.clone(),
        collection_id: op.collection_id,
        started_ms: op.started_ms,
        started_version: op.started_version,
        steps,
        state: state.into(),
        reason,
        finished_version: op.finished_version,
        build,
        backup,
        rebuild: match &op.kind {
            OperationKind::Rebuild(p) => Some(cpb::Rebuild {
                nprobe: p.nprobe,
                refine: p.refine,
                gate_k: p.gate_k,
                margin: p.margin_bp as f64 / 10_000.0,
                phase: p.phase.name().into(),
                previous: Some(index_pb(&p.previous)),
                model: p.model.as_ref().map(|m| cpb::ModelChange {
                    encoder: Some(encoder_pb(&m.encoder)),
                    dimension: m.dimension,
                    previous: m.previous.as_ref().map(encoder_pb),
                    previous_dimension: m.previous_dimension,
                }),
            }),
            _ => None,
        },
    }
}

/// A change as the watch sends it; `None` for an imported map (its version jumps, so
/// every watcher is sent the whole map).
fn change_pb(c: &Change, map: &ClusterMap) -> Option<cpb::MapChange> {
    use cpb::map_change::Change as C;
    Some(cpb::MapChange {
        change: Some(match c {
            Change::Imported => return None,
            Change::CollectionPut(c) => C::CollectionPut(collection_pb(c)),
            Change::CollectionDropped(n) => C::CollectionDropped(n.clone()),
            Change::NodePut(n) => C::NodePut(node_pb(n, map)),
            Change::ShardPut(s) => C::ShardPut(shard_pb(s)),
            Change::KeyPut(k) => C::KeyPut(k.to_pb(true)),
            Change::KeyRevoked(id) => C::KeyRevoked(id.clone()),
            Change::OperationPut(o) => C::OperationPut(Box::new(operation_pb(o, map, None))),
            Change::AliasPut(a, c) => C::AliasPut(cpb::Alias {
                alias: a.clone(),
                collection: c.clone().unwrap_or_default(),
            }),
            Change::ShardDropped(k) => C::ShardDropped(cpb::ShardId {
                collection: k.collection.clone(),
                collection_id: map.collections.get(&k.collection).map_or(0, |c| c.id),
                index: k.index,
            }),
        }),
    })
}

/// A create request as a spec: zero index fields take the defaults for the dimension.
pub fn spec_from_pb(r: cpb::CreateCollectionRequest) -> Result<CollectionSpec, Status> {
    let metric = Metric::from_wire(r.metric)
        .ok_or_else(|| Status::invalid_argument(format!("unknown metric {}", r.metric)))?;
    let d = IndexParams::defaults(r.dimension.max(1));
    let ix = r.index.unwrap_or_default();
    let rerank = rerank_from_pb(ix.rerank)?.unwrap_or_default();
    let or = |v: u32, dflt: u32| if v == 0 { dflt } else { v };
    Ok(CollectionSpec {
        name: r.name,
        dimension: r.dimension,
        metric,
        encoder: r.encoder.map(|e| EncoderRef {
            model_id: e.model_id,
            content_hash: e.content_hash,
        }),
        index: IndexParams {
            // 0: chosen from the shards' size when an index is built (issue 18).
            nlist: ix.nlist,
            pq_m: or(ix.pq_m, d.pq_m),
            pq_nbits: or(ix.pq_nbits, d.pq_nbits),
            nprobe: or(ix.nprobe, d.nprobe.min(or(ix.nlist, d.nlist))),
            refine: or(ix.refine, d.refine),
            rerank,
        },
        shard_count: r.shard_count,
        // Unset: two copies of every shard, so one lost node loses nothing.
        replication_factor: or(r.replication_factor, 2),
        write_quorum: r.write_quorum,
        replica_memory_bytes: if r.replica_memory_bytes == 0 {
            DEFAULT_REPLICA_MEMORY
        } else {
            r.replica_memory_bytes
        },
    })
}

/// A request's re-ranking precision: `None` when unspecified, refused when unknown.
fn rerank_from_pb(v: i32) -> Result<Option<Precision>, Status> {
    if v == 0 {
        return Ok(None);
    }
    Precision::from_wire(v).map(Some).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown re-ranking precision {v} (float32 = 1, float16 = 2, sq8 = 3)"
        ))
    })
}

/// What a read of one collection, or of every collection (empty name), needs.
fn read_need(collection: &str) -> Need<'_> {
    if collection.is_empty() {
        Need::role(Role::Read)
    } else {
        Need::on(Role::Read, collection)
    }
}

/// An index build's parameters: the request's, else the collection's, else sized from
/// the largest shard ([`size_index`]); a training sample of at least 39 vectors a list
/// (and the engine's 65,536 where the shard has them); the re-ranking precision given
/// (the caller's choice: the request's, the last build's or the collection's).
pub fn build_params(
    spec: &CollectionSpec,
    rows: u64,
    nlist: u32,
    train_sample: u64,
    rerank: Precision,
) -> BuildParams {
    let nlist = [nlist, spec.index.nlist]
        .into_iter()
        .find(|&n| n > 0)
        .unwrap_or_else(|| size_index(rows, 0).0);
    let floor = 39 * nlist as u64;
    let train_sample = if train_sample > 0 {
        train_sample
    } else {
        floor.max(65_536.min(rows))
    };
    let d = IndexParams::defaults(spec.dimension.max(1));
    let or = |v: u32, dflt: u32| if v == 0 { dflt } else { v };
    BuildParams {
        nlist,
        pq_m: or(spec.index.pq_m, d.pq_m),
        pq_nbits: or(spec.index.pq_nbits, d.pq_nbits),
        train_sample,
        rows_per_shard: rows,
        rerank,
    }
}

fn collection_info(map: &ClusterMap, name: &str) -> Result<cpb::CollectionInfo, Status> {
    let c = map
        .collections
        .get(name)
        .ok_or_else(|| Status::not_found(format!("collection {name:?} not found")))?;
    Ok(cpb::CollectionInfo {
        collection: Some(collection_pb(c)),
        shards: map.shards_of(name).map(shard_pb).collect(),
        map_version: map.version,
    })
}

// ---- public: Admin -----------------------------------------------------------------

pub struct AdminService(pub Arc<Coordinator>);

impl AdminService {
    /// Commits a new operation on `collection` and answers with it as the map holds it.
    /// The largest shard of `collection`, in live documents its primary last reported.
    /// On the leader only (its memory holds the reports): a follower would size every
    /// build from nothing, so it answers UNAVAILABLE naming the leader.
    fn largest_shard(&self, map: &ClusterMap, collection: &str) -> Result<u64, Status> {
        self.0.require_leader()?;
        let reports = self.0.reports.lock();
        Ok(map
            .shards_of(collection)
            .filter_map(|s| {
                let p = s.primary.as_deref()?;
                reports.get(&s.key, p).map(|r| r.live_docs)
            })
            .max()
            .unwrap_or(0))
    }

    /// Commits (`commit`) or rolls back a collection's rebuild (the newest unless named).
    async fn end_rebuild(
        &self,
        req: Request<cpb::EndRebuildRequest>,
        commit: bool,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        let what = if commit {
            "CommitRebuild"
        } else {
            "RollbackRebuild"
        };
        self.admin(req, what, target, true, move |req| async move {
            let req = req.into_inner();
            check_name(&self.0, &req.collection, "the collection name")?;
            let operation = match req.operation {
                0 => {
                    let map = self.0.read().await?;
                    map.rebuild_of(&req.collection)
                        .map(|o| o.id)
                        .ok_or_else(|| {
                            Status::not_found(format!(
                                "collection {:?} has no rebuild",
                                req.collection
                            ))
                        })?
                }
                id => id,
            };
            let collection = req.collection.clone();
            self.0
                .write(if commit {
                    Command::CommitRebuild {
                        collection,
                        operation,
                    }
                } else {
                    Command::RollbackRebuild {
                        collection,
                        operation,
                    }
                })
                .await?;
            let map = self.0.read().await?;
            let op = map
                .operations
                .get(&operation)
                .ok_or_else(|| Status::not_found(format!("operation {operation} not found")))?;
            Ok(Response::new(operation_pb(op, &map, None)))
        })
        .await
    }

    async fn start_operation(
        &self,
        kind: OperationKind,
        collection: &str,
        collection_id: u64,
    ) -> Result<cpb::Operation, Status> {
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let cmd = match kind {
            OperationKind::Split { .. } => Command::StartSplit {
                collection: collection.to_string(),
                collection_id,
                started_ms,
            },
            kind => Command::StartOperation {
                kind,
                collection: collection.to_string(),
                collection_id,
                started_ms,
            },
        };
        let v = self.0.write(cmd).await?;
        self.started(v).await
    }

    /// The operation the command applied at map version `v` started.
    async fn started(&self, v: u64) -> Result<cpb::Operation, Status> {
        let map = self.0.read().await?;
        let op = map
            .operations
            .values()
            .find(|o| o.started_version == v)
            .ok_or_else(|| Status::internal("the started operation is not in the map"))?;
        let reports = self.0.reports.lock();
        Ok(operation_pb(op, &map, Some(&reports)))
    }

    fn status(&self) -> cpb::ClusterStatusResponse {
        let c = &self.0;
        let m = c.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, n)| cpb::Member {
                id: *id,
                raft_addr: n.raft_addr.clone(),
                api_addr: n.api_addr.clone(),
                voter: voters.contains(id),
            })
            .collect::<Vec<_>>();
        let leader_api_addr = m
            .current_leader
            .and_then(|l| members.iter().find(|x| x.id == l))
            .map(|x| x.api_addr.clone())
            .unwrap_or_default();
        // One lock, let go before the answer is built (a second `lock()` in the
        // literal below would wait on the first for ever: parking_lot is not
        // reentrant and temporaries live to the end of the statement).
        let (map_version, cluster_id) = {
            let st = c.sm.state.lock();
            (st.map.version, st.map.cluster_id.clone())
        };
        cpb::ClusterStatusResponse {
            id: c.id,
            leader: m.current_leader.unwrap_or(0),
            leader_api_addr,
            term: m.current_term,
            members,
            map_version,
            last_applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            cluster_id,
        }
    }
}

#[tonic::async_trait]
impl cpb::admin_server::Admin for AdminService {
    async fn create_collection(
        &self,
        req: Request<cpb::CreateCollectionRequest>,
    ) -> Result<Response<cpb::CollectionInfo>, Status> {
        let target = req.get_ref().name.clone();
        self.admin(
            req,
            "CreateCollection",
            target,
            true,
            move |req| async move {
                check_name(&self.0, &req.get_ref().name, "the collection name")?;
                let fields = payload_fields(&self.0, &req.get_ref().payload_fields)?;
                let spec = spec_from_pb(req.into_inner())?;
                shoal_proto::within!(
                    self.0.limits,
                    replication_factor,
                    spec.replication_factor,
                    "replication_factor"
                )?;
                let name = spec.name.clone();
                self.0.write(Command::CreateCollection(spec)).await?;
                // The indexed fields are the new collection's policy: set by a second
                // command conditional on its id (as SetCollectionPolicy would; a
                // failure here leaves the collection without them, and says so).
                if !fields.is_empty() {
                    let id = self.0.read().await?.collections.get(&name).map(|c| c.id);
                    let Some(id) = id else {
                        return Err(Status::aborted(format!(
                            "collection {name:?} was dropped while it was created"
                        )));
                    };
                    let policy = CollectionPolicy {
                        payload_fields: fields,
                        ..CollectionPolicy::default()
                    };
                    self.0
                        .write(Command::SetCollectionPolicy {
                            name: name.clone(),
                            id,
                            policy,
                        })
                        .await
                        .map_err(|e| {
                            let e = Status::from(e);
                            Status::new(
                                e.code(),
                                format!(
                                    "collection {name:?} was created, but its indexed fields were not set ({}); set them with SetCollectionPolicy",
                                    e.message()
                                ),
                            )
                        })?;
                }
                let map = self.0.read().await?;
                Ok(Response::new(collection_info(&map, &name)?))
            },
        )
        .await
    }

    async fn drop_collection(
        &self,
        req: Request<cpb::DropCollectionRequest>,
    ) -> Result<Response<cpb::DropCollectionResponse>, Status> {
        let target = req.get_ref().name.clone();
        self.admin(req, "DropCollection", target, true, move |req| async move {
            let name = req.into_inner().name;
            check_name(&self.0, &name, "the collection name")?;
            let v = self.0.write(Command::DropCollection { name }).await?;
            Ok(Response::new(cpb::DropCollectionResponse {
                map_version: v,
            }))
        })
        .await
    }

    async fn describe_collection(
        &self,
        req: Request<cpb::DescribeCollectionRequest>,
    ) -> Result<Response<cpb::CollectionInfo>, Status> {
        let target = req.get_ref().name.clone();
        self.allow(
            &req,
            "DescribeCollection",
            &target,
            Need::on(Role::Read, &target),
        )?;
        check_name(&self.0, &req.get_ref().name, "the collection name")?;
        let map = self.0.read().await?;
        Ok(Response::new(collection_info(
            &map,
            &req.into_inner().name,
        )?))
    }

    async fn list_collections(
        &self,
        req: Request<cpb::ListCollectionsRequest>,
    ) -> Result<Response<cpb::ListCollectionsResponse>, Status> {
        self.allow(&req, "ListCollections", "", Need::role(Role::Read))?;
        let map = self.0.read().await?;
        Ok(Response::new(cpb::ListCollectionsResponse {
            collections: map.collections.values().map(collection_pb).collect(),
            map_version: map.version,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<cpb::ListNodesRequest>,
    ) -> Result<Response<cpb::ListNodesResponse>, Status> {
        let target = String::new();
        self.allow(&req, "ListNodes", &target, Need::role(Role::Read))?;
        let map = self.0.read().await?;
        Ok(Response::new(cpb::ListNodesResponse {
            nodes: map.nodes.values().map(|n| node_pb(n, &map)).collect(),
            map_version: map.version,
        }))
    }

    async fn list_shards(
        &self,
        req: Request<cpb::ListShardsRequest>,
    ) -> Result<Response<cpb::ListShardsResponse>, Status> {
        let target = req.get_ref().collection.clone();
        self.allow(&req, "ListShards", &target, read_need(&target))?;
        let name = req.into_inner().collection;
        check_name(&self.0, &name, "the collection name")?;
        // The replicas' reports live in the leader's memory: a follower sends the
        // caller there (UNAVAILABLE naming the leader) rather than answer without them.
        self.0.require_leader()?;
        let map = self.0.read().await?;
        let reports = self.0.reports.lock();
        let pb = |s| shard_pb_with(s, &reports);
        let shards = if name.is_empty() {
            map.shards.values().map(pb).collect()
        } else {
            if !map.collections.contains_key(&name) {
                return Err(Status::not_found(format!("collection {name:?} not found")));
            }
            map.shards_of(&name).map(pb).collect()
        };
        Ok(Response::new(cpb::ListShardsResponse {
            shards,
            map_version: map.version,
        }))
    }

    async fn cluster_status(
        &self,
        req: Request<cpb::ClusterStatusRequest>,
    ) -> Result<Response<cpb::ClusterStatusResponse>, Status> {
        let target = String::new();
        self.allow(&req, "ClusterStatus", &target, Need::role(Role::Read))?;
        Ok(Response::new(self.status()))
    }

    async fn add_learner(
        &self,
        req: Request<cpb::AddLearnerRequest>,
    ) -> Result<Response<cpb::ClusterStatusResponse>, Status> {
        let target = req.get_ref().id.to_string();
        self.admin(req, "AddLearner", target, false, move |req| async move {
            self.0.require_leader()?;
            let r = req.into_inner();
            if r.id == 0 || r.raft_addr.is_empty() || r.api_addr.is_empty() {
                return Err(Status::invalid_argument(
                    "learner needs a non-zero id, a raft_addr and an api_addr",
                ));
            }
            let l = &self.0.limits;
            shoal_proto::within!(l, addr_bytes, r.raft_addr.len(), "the raft_addr's length")?;
            shoal_proto::within!(l, addr_bytes, r.api_addr.len(), "the api_addr's length")?;
            let (members, known) = {
                let metrics = self.0.raft.metrics();
                let m = metrics.borrow();
                let ids: Vec<u64> = m.membership_config.nodes().map(|(id, _)| *id).collect();
                (ids.len(), ids.contains(&r.id))
            };
            if !known && members >= l.coordinator_members {
                return Err(Status::resource_exhausted(format!(
                    "the group has {members} members, the limit coordinator_members = {}",
                    l.coordinator_members
                )));
            }
            let member = Member {
                raft_addr: r.raft_addr,
                api_addr: r.api_addr,
            };
            self.0
                .raft
                .add_learner(r.id, member, true)
                .await
                .map_err(|e| Status::failed_precondition(format!("add learner {}: {e}", r.id)))?;
            Ok(Response::new(self.status()))
        })
        .await
    }

    async fn change_membership(
        &self,
        req: Request<cpb::ChangeMembershipRequest>,
    ) -> Result<Response<cpb::ClusterStatusResponse>, Status> {
        let target = format!("{:?}", req.get_ref().voters);
        self.admin(
            req,
            "ChangeMembership",
            target,
            false,
            move |req| async move {
                self.0.require_leader()?;
                let voters: BTreeSet<u64> = req.into_inner().voters.into_iter().collect();
                if voters.is_empty() {
                    return Err(Status::invalid_argument("voters must not be empty"));
                }
                self.0
                    .raft
                    .change_membership(voters.clone(), false)
                    .await
                    .map_err(|e| {
                        Status::failed_precondition(format!("change membership to {voters:?}: {e}"))
                    })?;
                Ok(Response::new(self.status()))
            },
        )
        .await
    }

    async fn drain_node(
        &self,
        req: Request<cpb::DrainNodeRequest>,
    ) -> Result<Response<cpb::NodeInfo>, Status> {
        let target = req.get_ref().id.clone();
        self.admin(req, "DrainNode", target, false, move |req| async move {
            let r = req.into_inner();
            check_name(&self.0, &r.id, "the node id")?;
            let id = r.id;
            let cmd = if r.undo {
                Command::Undrain { id: id.clone() }
            } else {
                Command::SetNodeState {
                    id: id.clone(),
                    state: NodeState::Draining,
                    from: vec![NodeState::Up, NodeState::Joining, NodeState::Suspect],
                }
            };
            self.0.write(cmd).await?;
            let map = self.0.read().await?;
            let n = map
                .nodes
                .get(&id)
                .ok_or_else(|| Status::not_found(format!("node {id:?} not found")))?;
            Ok(Response::new(node_pb(n, &map)))
        })
        .await
    }

    async fn promote_replica(
        &self,
        req: Request<cpb::PromoteReplicaRequest>,
    ) -> Result<Response<cpb::Shard>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(req, "PromoteReplica", target, true, move |req| async move {
            let r = req.into_inner();
            let key = self.shard_target("promote", &r.collection, r.shard, &r.node_id)?;
            self.0.promote(&key, &r.node_id, r.accept_data_loss).await?;
            self.shard_answer(&key).await
        })
        .await
    }

    async fn allocate_empty_shard(
        &self,
        req: Request<cpb::AllocateEmptyShardRequest>,
    ) -> Result<Response<cpb::Shard>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(
            req,
            "AllocateEmptyShard",
            target,
            true,
            move |req| async move {
                let r = req.into_inner();
                let key =
                    self.shard_target("allocate-empty", &r.collection, r.shard, &r.node_id)?;
                self.0
                    .allocate_empty(&key, &r.node_id, r.accept_data_loss)
                    .await?;
                self.shard_answer(&key).await
            },
        )
        .await
    }

    async fn create_key(
        &self,
        req: Request<cpb::CreateKeyRequest>,
    ) -> Result<Response<cpb::CreateKeyResponse>, Status> {
        let target = req.get_ref().name.clone();
        self.admin(req, "CreateKey", target, false, move |req| async move {
            let r = req.into_inner();
            let role = Role::from_wire(r.role).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "role {} is not read (1), write (2) or admin (3)",
                    r.role
                ))
            })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let made = auth::generate(&r.name, role, r.collections, now);
            if let Some(p) = made.record.problem() {
                return Err(Status::invalid_argument(p));
            }
            self.0.write(Command::PutKey(made.record.clone())).await?;
            Ok(Response::new(cpb::CreateKeyResponse {
                key: made.key,
                info: Some(made.record.to_pb(false)),
            }))
        })
        .await
    }

    async fn list_keys(
        &self,
        req: Request<cpb::ListKeysRequest>,
    ) -> Result<Response<cpb::ListKeysResponse>, Status> {
        self.allow(&req, "ListKeys", "", Need::role(Role::Admin))?;
        let map = self.0.read().await?;
        Ok(Response::new(cpb::ListKeysResponse {
            keys: map.keys.values().map(|k| k.to_pb(false)).collect(),
        }))
    }

    async fn set_collection_policy(
        &self,
        req: Request<cpb::SetCollectionPolicyRequest>,
    ) -> Result<Response<cpb::CollectionInfo>, Status> {
        let target = req.get_ref().name.clone();
        self.admin(
            req,
            "SetCollectionPolicy",
            target,
            true,
            move |req| async move {
                let req = req.into_inner();
                check_name(&self.0, &req.name, "the collection name")?;
                let fields = payload_fields(&self.0, &req.payload_fields)?;
                let id = self
                    .0
                    .read()
                    .await?
                    .collections
                    .get(&req.name)
                    .map(|c| c.id)
                    .ok_or_else(|| {
                        Status::not_found(format!("collection {:?} not found", req.name))
                    })?;
                let policy = CollectionPolicy {
                    auto_rebuild_rows: req.auto_rebuild_rows,
                    payload_fields: fields,
                };
                self.0
                    .write(Command::SetCollectionPolicy {
                        name: req.name.clone(),
                        id,
                        policy,
                    })
                    .await?;
                let map = self.0.read().await?;
                Ok(Response::new(collection_info(&map, &req.name)?))
            },
        )
        .await
    }

    async fn start_index_build(
        &self,
        req: Request<cpb::StartIndexBuildRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(
            req,
            "StartIndexBuild",
            target,
            true,
            move |req| async move {
                let req = req.into_inner();
                check_name(&self.0, &req.collection, "the collection name")?;
                let map = self.0.read().await?;
                let c = map.collections.get(&req.collection).ok_or_else(|| {
                    Status::not_found(format!("collection {:?} not found", req.collection))
                })?;
                // Sized by the largest shard, as its primary last reported it.
                let rows = self.largest_shard(&map, &req.collection)?;
                if rows == 0 && req.nlist == 0 && c.spec.index.nlist == 0 {
                    return Err(Status::failed_precondition(format!(
                        "no shard of {} has reported documents yet, so its index cannot be \
                     sized: retry after the next heartbeat, or give nlist",
                        req.collection
                    )));
                }
                // A build that names no precision keeps the last build's (a rebuild
                // chose it for the collection), else the collection's.
                let last = map.operations.values().rev().find_map(|o| match &o.kind {
                    OperationKind::BuildIndex(p)
                        if o.collection == req.collection && o.collection_id == c.id =>
                    {
                        Some(p.rerank)
                    }
                    _ => None,
                });
                let rerank = rerank_from_pb(req.rerank)?
                    .or(last)
                    .unwrap_or(c.spec.index.rerank);
                let params = build_params(&c.spec, rows, req.nlist, req.train_sample, rerank);
                let started = self
                    .start_operation(OperationKind::BuildIndex(params), &req.collection, c.id)
                    .await?;
                Ok(Response::new(started))
            },
        )
        .await
    }

    async fn start_compaction(
        &self,
        req: Request<cpb::StartCompactionRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(
            req,
            "StartCompaction",
            target,
            true,
            move |req| async move {
                let req = req.into_inner();
                check_name(&self.0, &req.collection, "the collection name")?;
                let id = {
                    let map = self.0.read().await?;
                    let c = map.collections.get(&req.collection).ok_or_else(|| {
                        Status::not_found(format!("collection {:?} not found", req.collection))
                    })?;
                    c.id
                };
                let started = self
                    .start_operation(OperationKind::Compact, &req.collection, id)
                    .await?;
                Ok(Response::new(started))
            },
        )
        .await
    }

    async fn start_split(
        &self,
        req: Request<cpb::StartSplitRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(req, "StartSplit", target, true, move |req| async move {
            let req = req.into_inner();
            check_name(&self.0, &req.collection, "the collection name")?;
            let (id, from_shards) = {
                let map = self.0.read().await?;
                let c = map.collections.get(&req.collection).ok_or_else(|| {
                    Status::not_found(format!("collection {:?} not found", req.collection))
                })?;
                (c.id, c.spec.shard_count)
            };
            let started = self
                .start_operation(OperationKind::Split { from_shards }, &req.collection, id)
                .await?;
            Ok(Response::new(started))
        })
        .await
    }

    async fn start_backup(
        &self,
        req: Request<cpb::StartBackupRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(req, "StartBackup", target, true, move |req| async move {
            let req = req.into_inner();
            check_name(&self.0, &req.collection, "the collection name")?;
            crate::operations::check_target(&req.url, &req.backup)
                .map_err(Status::invalid_argument)?;
            let id = {
                let map = self.0.read().await?;
                let c = map.collections.get(&req.collection).ok_or_else(|| {
                    Status::not_found(format!("collection {:?} not found", req.collection))
                })?;
                c.id
            };
            let kind = OperationKind::Backup {
                url: req.url,
                backup: req.backup,
            };
            Ok(Response::new(
                self.start_operation(kind, &req.collection, id).await?,
            ))
        })
        .await
    }

    async fn restore_collection(
        &self,
        req: Request<cpb::RestoreCollectionRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req
            .get_ref()
            .collection
            .as_ref()
            .map_or(String::new(), |c| c.name.clone());
        self.admin(
            req,
            "RestoreCollection",
            target,
            true,
            move |req| async move {
                let req = req.into_inner();
                let create = req
                    .collection
                    .ok_or_else(|| Status::invalid_argument("a restore names its collection"))?;
                check_name(&self.0, &create.name, "the collection name")?;
                crate::operations::check_target(&req.url, &req.backup)
                    .map_err(Status::invalid_argument)?;
                let spec = spec_from_pb(create)?;
                shoal_proto::within!(
                    self.0.limits,
                    replication_factor,
                    spec.replication_factor,
                    "replication_factor"
                )?;
                if req.epochs.len() != spec.shard_count as usize {
                    return Err(Status::invalid_argument(format!(
                        "a restore names {} shard epochs for {} shards",
                        req.epochs.len(),
                        spec.shard_count
                    )));
                }
                let started_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let v = self
                    .0
                    .write(Command::RestoreCollection {
                        spec,
                        placement: Vec::new(),
                        epochs: req.epochs,
                        url: req.url,
                        backup: req.backup,
                        started_ms,
                    })
                    .await?;
                Ok(Response::new(self.started(v).await?))
            },
        )
        .await
    }

    async fn restore_shards(
        &self,
        req: Request<cpb::RestoreShardsRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(req, "RestoreShards", target, true, move |req| async move {
            let req = req.into_inner();
            check_name(&self.0, &req.collection, "the collection name")?;
            crate::operations::check_target(&req.url, &req.backup)
                .map_err(Status::invalid_argument)?;
            if !req.accept_data_loss {
                return Err(Status::failed_precondition(
                    "restoring a shard gives up every write after the backup's position: \
                     set accept_data_loss",
                ));
            }
            if req.shards.is_empty() || req.shards.len() != req.epochs.len() {
                return Err(Status::invalid_argument(format!(
                    "{} shards and {} epochs: one epoch per shard, at least one shard",
                    req.shards.len(),
                    req.epochs.len()
                )));
            }
            let map = self.0.read().await?;
            let c = map.collections.get(&req.collection).ok_or_else(|| {
                Status::not_found(format!("collection {:?} not found", req.collection))
            })?;
            if req.shards.iter().any(|&i| i >= c.spec.shard_count) {
                return Err(Status::invalid_argument(format!(
                    "collection {:?} has {} shards",
                    req.collection, c.spec.shard_count
                )));
            }
            // Each shard onto the up node holding fewest replicas that holds none of it
            // (the map checks the choice again when it applies the command).
            let mut load: BTreeMap<&str, usize> = map
                .nodes
                .values()
                .filter(|n| n.state == crate::map::NodeState::Up)
                .map(|n| (n.id.as_str(), 0))
                .collect();
            for s in map.shards.values() {
                for r in &s.replicas {
                    if let Some(l) = load.get_mut(r.node.as_str()) {
                        *l += 1;
                    }
                }
            }
            let mut shards = BTreeMap::new();
            for (&i, &epoch) in req.shards.iter().zip(&req.epochs) {
                let key = ShardKey {
                    collection: req.collection.clone(),
                    index: i,
                };
                let s = map
                    .shards
                    .get(&key)
                    .ok_or_else(|| Status::not_found(format!("shard {key} not found")))?;
                let node = load
                    .iter()
                    .filter(|(n, _)| !s.holds(n))
                    .min_by_key(|(n, l)| (**l, **n))
                    .map(|(n, _)| n.to_string())
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "no up node without a replica of shard {key} to restore it onto"
                        ))
                    })?;
                *load.get_mut(node.as_str()).expect("listed") += 1;
                shards.insert(i, (node, epoch));
            }
            let cmd = Command::RestoreShards {
                collection: req.collection.clone(),
                collection_id: c.id,
                shards,
                url: req.url,
                backup: req.backup,
                started_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            };
            drop(map);
            let v = self.0.write(cmd).await?;
            Ok(Response::new(self.started(v).await?))
        })
        .await
    }

    async fn export_map(
        &self,
        req: Request<cpb::ExportMapRequest>,
    ) -> Result<Response<cpb::ExportMapResponse>, Status> {
        self.admin(
            req,
            "ExportMap",
            String::new(),
            false,
            move |_| async move {
                let map = self.0.read().await?;
                Ok(Response::new(cpb::ExportMapResponse {
                    cluster_id: map.cluster_id.clone(),
                    map_version: map.version,
                    map: shoal_proto::wire::encode(&map),
                    format: shoal_proto::wire::FORMAT,
                }))
            },
        )
        .await
    }

    async fn import_map(
        &self,
        req: Request<cpb::ImportMapRequest>,
    ) -> Result<Response<cpb::ExportMapResponse>, Status> {
        self.admin(
            req,
            "ImportMap",
            String::new(),
            false,
            move |req| async move {
                let req = req.into_inner();
                if req.format != shoal_proto::wire::FORMAT {
                    return Err(Status::failed_precondition(format!(
                        "the map was exported in format {}; this coordinator reads {}",
                        req.format,
                        shoal_proto::wire::FORMAT
                    )));
                }
                let map: ClusterMap = shoal_proto::wire::decode(&req.map)
                    .map_err(|e| Status::invalid_argument(format!("the exported map: {e}")))?;
                let v = self
                    .0
                    .write(Command::ImportMap { map: Box::new(map) })
                    .await?;
                let map = self.0.read().await?;
                Ok(Response::new(cpb::ExportMapResponse {
                    cluster_id: map.cluster_id.clone(),
                    map_version: v,
                    map: Vec::new(),
                    format: shoal_proto::wire::FORMAT,
                }))
            },
        )
        .await
    }

    async fn list_operations(
        &self,
        req: Request<cpb::ListOperationsRequest>,
    ) -> Result<Response<cpb::ListOperationsResponse>, Status> {
        let target = req.get_ref().collection.clone();
        self.allow(&req, "ListOperations", &target, read_need(&target))?;
        let name = req.into_inner().collection;
        if !name.is_empty() {
            check_name(&self.0, &name, "the collection name")?;
        }
        // Steps' progress comes from the leader's reports (as ListShards).
        self.0.require_leader()?;
        let map = self.0.read().await?;
        let reports = self.0.reports.lock();
        Ok(Response::new(cpb::ListOperationsResponse {
            operations: map
                .operations
                .values()
                .filter(|o| name.is_empty() || o.collection == name)
                .map(|o| operation_pb(o, &map, Some(&reports)))
                .collect(),
        }))
    }

    async fn cancel_operation(
        &self,
        req: Request<cpb::CancelOperationRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().id.to_string();
        self.admin(
            req,
            "CancelOperation",
            target,
            false,
            move |req| async move {
                let req = req.into_inner();
                let reason = if req.reason.is_empty() {
                    "cancelled by an operator".to_string()
                } else {
                    req.reason
                };
                self.0
                    .write(Command::CancelOperation { id: req.id, reason })
                    .await?;
                let map = self.0.read().await?;
                let op = map
                    .operations
                    .get(&req.id)
                    .ok_or_else(|| Status::not_found(format!("operation {} not found", req.id)))?;
                Ok(Response::new(operation_pb(op, &map, None)))
            },
        )
        .await
    }

    async fn start_rebuild(
        &self,
        req: Request<cpb::StartRebuildRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        let target = req.get_ref().collection.clone();
        self.admin(req, "StartRebuild", target, true, move |req| async move {
            let req = req.into_inner();
            check_name(&self.0, &req.collection, "the collection name")?;
            let map = self.0.read().await?;
            let c = map.collections.get(&req.collection).ok_or_else(|| {
                Status::not_found(format!("collection {:?} not found", req.collection))
            })?;
            let rows = self.largest_shard(&map, &req.collection)?;
            let ix = &c.spec.index;
            let or = |v: u32, dflt: u32| if v == 0 { dflt } else { v };
            let rerank = rerank_from_pb(req.rerank)?.unwrap_or(ix.rerank);
            let mut spec = c.spec.clone();
            // A re-embed (issue 21): the new model's dimension sizes the index.
            let model = match req.encoder {
                Some(e) if !e.content_hash.is_empty() => {
                    if req.dimension == 0 {
                        return Err(Status::invalid_argument(
                            "a re-embed gives its model's dimension",
                        ));
                    }
                    let m = crate::index::ModelChange {
                        encoder: EncoderRef {
                            model_id: e.model_id,
                            content_hash: e.content_hash,
                        },
                        dimension: req.dimension,
                        previous: c.spec.encoder.clone(),
                        previous_dimension: c.spec.dimension,
                    };
                    spec.dimension = m.dimension;
                    if req.pq_m == 0 && !m.dimension.is_multiple_of(ix.pq_m) {
                        return Err(Status::invalid_argument(format!(
                            "the collection's pq_m {} does not divide the new model's dimension \
                             {}: give pq_m",
                            ix.pq_m, m.dimension
                        )));
                    }
                    Some(m)
                }
                _ => None,
            };
            spec.index.pq_m = or(req.pq_m, ix.pq_m);
            spec.index.pq_nbits = or(req.pq_nbits, ix.pq_nbits);
            if rows == 0 && req.nlist == 0 && ix.nlist == 0 {
                return Err(Status::failed_precondition(format!(
                    "no shard of {} has reported documents yet, so its index cannot be sized: \
                     retry after the next heartbeat, or give nlist",
                    req.collection
                )));
            }
            let build = build_params(&spec, rows, req.nlist, req.train_sample, rerank);
            let margin = req.margin.unwrap_or(0.01);
            if !(0.0..=1.0).contains(&margin) {
                return Err(Status::invalid_argument(format!(
                    "margin {margin}: a recall difference, 0 to 1"
                )));
            }
            let params = RebuildParams {
                nprobe: or(req.nprobe, ix.nprobe.min(build.nlist)),
                refine: or(req.refine, ix.refine),
                gate_k: or(req.gate_k, 10),
                margin_bp: (margin * 10_000.0).round() as u32,
                previous: ix.clone(),
                phase: RebuildPhase::Building,
                build,
                model,
            };
            let id = c.id;
            drop(map);
            let started = self
                .start_operation(OperationKind::Rebuild(params), &req.collection, id)
                .await?;
            Ok(Response::new(started))
        })
        .await
    }

    async fn commit_rebuild(
        &self,
        req: Request<cpb::EndRebuildRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        self.end_rebuild(req, true).await
    }

    async fn rollback_rebuild(
        &self,
        req: Request<cpb::EndRebuildRequest>,
    ) -> Result<Response<cpb::Operation>, Status> {
        self.end_rebuild(req, false).await
    }

    async fn set_alias(
        &self,
        req: Request<cpb::SetAliasRequest>,
    ) -> Result<Response<cpb::ListAliasesResponse>, Status> {
        let target = req.get_ref().alias.clone();
        self.admin(req, "SetAlias", target, true, move |req| async move {
            let req = req.into_inner();
            check_name(&self.0, &req.alias, "the alias")?;
            let collection = if req.collection.is_empty() {
                None
            } else {
                check_name(&self.0, &req.collection, "the collection name")?;
                Some(req.collection)
            };
            self.0
                .write(Command::SetAlias {
                    alias: req.alias,
                    collection,
                })
                .await?;
            let map = self.0.read().await?;
            Ok(Response::new(aliases_pb(&map)))
        })
        .await
    }

    async fn list_aliases(
        &self,
        req: Request<cpb::ListAliasesRequest>,
    ) -> Result<Response<cpb::ListAliasesResponse>, Status> {
        self.allow(&req, "ListAliases", "", read_need(""))?;
        let map = self.0.read().await?;
        Ok(Response::new(aliases_pb(&map)))
    }

    async fn revoke_key(
        &self,
        req: Request<cpb::RevokeKeyRequest>,
    ) -> Result<Response<cpb::ApiKey>, Status> {
        let target = req.get_ref().id.clone();
        self.admin(req, "RevokeKey", target, false, move |req| async move {
            let id = req.into_inner().id;
            check_made_id(&id, "the key id")?;
            let rec: Option<KeyRecord> = self.0.read().await?.keys.get(&id).cloned();
            self.0.write(Command::RevokeKey { id: id.clone() }).await?;
            let rec = rec.ok_or_else(|| Status::not_found(format!("key {id:?} not found")))?;
            Ok(Response::new(rec.to_pb(false)))
        })
        .await
    }
}

impl AdminService {
    /// The caller's key against what `action` needs ([`shoal_proto::auth`]), checked
    /// with this member's map; a refusal is audited.
    fn allow<T>(
        &self,
        req: &Request<T>,
        action: &str,
        target: &str,
        need: Need,
    ) -> Result<Principal, Status> {
        let sm = &self.0.sm;
        let lookup = |id: &str| sm.state.lock().map.keys.get(id).cloned();
        self.0
            .keys
            .allow(req.metadata(), lookup, action, target, need)
    }

    /// An admin action: the caller's key must be an admin's (on `target`, a collection,
    /// when `on_collection`), then `f` runs and its outcome is audited.
    async fn admin<R, T, Fut>(
        &self,
        req: Request<R>,
        action: &str,
        target: String,
        on_collection: bool,
        f: impl FnOnce(Request<R>) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let need = if on_collection {
            Need::on(Role::Admin, &target)
        } else {
            Need::role(Role::Admin)
        };
        let who = self.allow(&req, action, &target, need)?;
        let out = f(req).await;
        shoal_proto::audit::admin(&who, action, &target, &out);
        out
    }

    /// A shard command's target, checked: the shard's key (the node is the caller's).
    fn shard_target(
        &self,
        what: &str,
        collection: &str,
        index: u32,
        node: &str,
    ) -> Result<ShardKey, Status> {
        check_name(&self.0, collection, "the collection name")?;
        check_name(&self.0, node, "the node id")?;
        if collection.is_empty() || node.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{what} needs a collection and a node_id"
            )));
        }
        Ok(ShardKey {
            collection: collection.to_string(),
            index,
        })
    }

    /// The shard as the map holds it after a command, with the replicas' reports.
    async fn shard_answer(&self, key: &ShardKey) -> Result<Response<cpb::Shard>, Status> {
        let map = self.0.read().await?;
        let s = map
            .shards
            .get(key)
            .ok_or_else(|| Status::not_found(format!("shard {key} not found")))?;
        Ok(Response::new(shard_pb_with(s, &self.0.reports.lock())))
    }
}

// ---- public: ClusterMap ------------------------------------------------------------

pub struct ClusterMapService(pub Arc<Coordinator>);

impl ClusterMapService {
    /// The cluster-map service is the nodes' (register, heartbeat, hand over, watch the
    /// map with its key hashes): with TLS on, only callers showing a certificate of the
    /// cluster's CA (the public port verifies any certificate it is shown), or an admin
    /// key (an operator's tool watching the map).
    fn cluster_member<T>(&self, req: &Request<T>, action: &str) -> Result<(), Status> {
        if self.0.config.tls.is_none() || auth::has_cluster_certificate(req) {
            return Ok(());
        }
        if self.0.keys.on() && auth::presented(req.metadata()).is_some() {
            let sm = &self.0.sm;
            let lookup = |id: &str| sm.state.lock().map.keys.get(id).cloned();
            self.0
                .keys
                .allow(req.metadata(), lookup, action, "", Need::role(Role::Admin))?;
            return Ok(());
        }
        let why = auth::Denied::Unauthenticated(format!(
            "{action} is for the cluster's nodes: connect with a certificate from the cluster's CA"
        ));
        shoal_proto::audit::refused(None, action, "", &why);
        Err(why.into())
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<cpb::MapEvent, Status>> + Send>>;

fn full_event(map: &ClusterMap) -> cpb::MapEvent {
    cpb::MapEvent {
        version: map.version,
        event: Some(cpb::map_event::Event::Full(map_pb(map))),
    }
}

#[tonic::async_trait]
impl cpb::cluster_map_server::ClusterMap for ClusterMapService {
    async fn register_node(
        &self,
        req: Request<cpb::RegisterNodeRequest>,
    ) -> Result<Response<cpb::NodeInfo>, Status> {
        self.cluster_member(&req, "RegisterNode")?;
        let r = req.into_inner();
        let cap = r.capacity.unwrap_or_default();
        let l = &self.0.limits;
        shoal_proto::within!(l, node_id_bytes, r.id.len(), "the node id's length")?;
        shoal_proto::within!(l, addr_bytes, r.addr.len(), "the node address's length")?;
        shoal_proto::within!(l, zone_bytes, cap.zone.len(), "the zone name's length")?;
        {
            let st = self.0.sm.state.lock();
            if !st.map.nodes.contains_key(&r.id) && st.map.nodes.len() >= l.nodes {
                return Err(Status::resource_exhausted(format!(
                    "the map holds {} nodes, the limit nodes = {}",
                    st.map.nodes.len(),
                    l.nodes
                )));
            }
        }
        check_made_id(&r.volume_id, "volume_id")?;
        check_made_id(&r.cluster_id, "cluster_id")?;
        // Names the cluster on a fresh group, so the answer below carries its id.
        self.0.cluster_id().await?;
        self.0
            .check_cluster(&format!("node {:?}", r.id), &r.cluster_id)?;
        let id = r.id.clone();
        self.0
            .write(Command::RegisterNode {
                id: r.id,
                addr: r.addr,
                capacity: Capacity {
                    memory_bytes: cap.memory_bytes,
                    gpu: cap.gpu,
                    zone: cap.zone,
                },
                volume: r.volume_id,
            })
            .await?;
        let map = self.0.read().await?;
        let n = map
            .nodes
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("node {id:?} not found")))?;
        Ok(Response::new(node_pb(n, &map)))
    }

    async fn heartbeat(
        &self,
        req: Request<cpb::HeartbeatRequest>,
    ) -> Result<Response<cpb::HeartbeatResponse>, Status> {
        self.cluster_member(&req, "Heartbeat")?;
        let r = req.into_inner();
        check_name(&self.0, &r.id, "the node id")?;
        check_made_id(&r.cluster_id, "cluster_id")?;
        let id = r.id.clone();
        let (version, state) = self
            .0
            .heartbeat(
                &r.id,
                &r.cluster_id,
                r.replicas,
                (r.disk_free_bytes, r.disk_trash_bytes, r.disk_total_bytes),
            )
            .await?;
        Ok(Response::new(cpb::HeartbeatResponse {
            map_version: version,
            state: node_state_pb(state),
            // The primary lease (see the field): below the down timeout, after which
            // alone a silent node's primaries are replaced. None for a node declared
            // down: it registers again first.
            lease_ms: if state == NodeState::Down {
                0
            } else {
                self.0.config.suspect_after_ms
            },
            hand_over: self.0.asks(&id),
        }))
    }

    async fn hand_over(
        &self,
        req: Request<cpb::HandOverRequest>,
    ) -> Result<Response<cpb::HandOverResponse>, Status> {
        self.cluster_member(&req, "HandOver")?;
        let r = req.into_inner();
        check_name(&self.0, &r.node_id, "the node id")?;
        check_name(&self.0, &r.to, "the target node id")?;
        check_made_id(&r.cluster_id, "cluster_id")?;
        let shard = r
            .shard
            .ok_or_else(|| Status::invalid_argument("hand-over needs the shard"))?;
        check_name(&self.0, &shard.collection, "the collection name")?;
        let epoch = self
            .0
            .hand_over(
                &r.node_id,
                &r.cluster_id,
                &shard,
                r.epoch,
                &r.to,
                (r.last_epoch, r.last_seq),
            )
            .await?;
        Ok(Response::new(cpb::HandOverResponse { epoch }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<cpb::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.cluster_member(&req, "Watch")?;
        let r = req.into_inner();
        check_made_id(&r.cluster_id, "cluster_id")?;
        self.0.check_cluster("the watcher", &r.cluster_id)?;
        let from = r.from_version;
        let coord = self.0.clone();
        // Subscribe before reading the map, so no change falls in between.
        let mut rx = coord.sm.changes.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut sent = {
                let st = coord.sm.state.lock();
                // A watcher already at the current version needs nothing resent.
                if (from != st.map.version || from == 0)
                    && tx.try_send(Ok(full_event(&st.map))).is_err()
                {
                    return;
                }
                st.map.version
            };
            let mut stopping = coord.stopping.subscribe();
            loop {
                // Streams end when the member shuts down, so its server can close.
                let got = tokio::select! {
                    got = rx.recv() => got,
                    _ = stopping.wait_for(|s| *s) => return,
                };
                let ev = match got {
                    Ok((v, _)) if v <= sent => continue,
                    Ok((v, changes)) if v == sent + 1 && !changes.is_empty() => {
                        let st = coord.sm.state.lock();
                        cpb::MapEvent {
                            version: v,
                            event: Some(cpb::map_event::Event::Changes(cpb::ChangeSet {
                                changes: changes
                                    .iter()
                                    .filter_map(|c| change_pb(c, &st.map))
                                    .collect(),
                            })),
                        }
                    }
                    // A gap (lagging receiver, snapshot install): resend the whole map.
                    Ok(_) | Err(RecvError::Lagged(_)) => full_event(&coord.sm.state.lock().map),
                    Err(RecvError::Closed) => return,
                };
                sent = ev.version;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

// ---- internal: Raft ----------------------------------------------------------------

pub struct RaftService(pub Arc<Coordinator>);

#[tonic::async_trait]
impl raftpb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<raftpb::Payload>,
    ) -> Result<Response<raftpb::Payload>, Status> {
        let rpc = open(req.get_ref()).map_err(bad_payload)?;
        let res = self.0.raft.append_entries(rpc).await;
        Ok(Response::new(payload(&res)))
    }

    async fn vote(
        &self,
        req: Request<raftpb::Payload>,
    ) -> Result<Response<raftpb::Payload>, Status> {
        let rpc = open(req.get_ref()).map_err(bad_payload)?;
        let res = self.0.raft.vote(rpc).await;
        Ok(Response::new(payload(&res)))
    }

    async fn install_snapshot(
        &self,
        req: Request<raftpb::Payload>,
    ) -> Result<Response<raftpb::Payload>, Status> {
        let rpc = open(req.get_ref()).map_err(bad_payload)?;
        let res = self.0.raft.install_snapshot(rpc).await;
        Ok(Response::new(payload(&res)))
    }

    async fn forward(
        &self,
        req: Request<raftpb::Payload>,
    ) -> Result<Response<raftpb::Payload>, Status> {
        let r = open(req.get_ref()).map_err(bad_payload)?;
        let reply = self.0.handle_forward(r).await;
        Ok(Response::new(payload(&reply)))
    }

    async fn read_index(
        &self,
        _: Request<raftpb::Payload>,
    ) -> Result<Response<raftpb::Payload>, Status> {
        let reply = self.0.handle_read_index().await;
        Ok(Response::new(payload(&reply)))
    }
}
