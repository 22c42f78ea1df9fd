//! The cluster map: the coordinator's replicated state machine, as plain data.
//!
//! Every change is a [`Command`] applied by [`ClusterMap::apply`], which validates the
//! whole command before touching anything (nothing is half-applied) and is
//! deterministic (no clocks, no randomness), so every member that applies the same log
//! holds the same map. Each successful command bumps `version` by one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::operations::{self, Operation, OperationKind, Outcome, Step};
pub use crate::split::{SealPoint, SplitRole};
use serde::{Deserialize, Serialize};
use shoal_proto::auth::KeyRecord;
use shoal_proto::filter::PayloadField;

pub type NodeId = String;

pub const MAX_DIMENSION: u32 = 4096;
pub const MAX_SHARDS: u32 = 1024;
pub const DEFAULT_REPLICA_MEMORY: u64 = 256 << 20;

/// A collection's index parameters and model (`index.rs`: below the map, which
/// operations share).
pub use crate::index::{EncoderRef, IndexParams};
/// The shared metric (`shoal_proto::metric`): its variant order is the log's format.
pub use shoal_proto::metric::Metric;
/// The shared re-ranking precision (`shoal_proto::precision`), likewise.
pub use shoal_proto::precision::Precision;

/// What a user asks for; validated by [`CollectionSpec::validate`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CollectionSpec {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    pub encoder: Option<EncoderRef>,
    pub index: IndexParams,
    pub shard_count: u32,
    pub replication_factor: u32,
    pub replica_memory_bytes: u64,
    /// The fewest in-sync replicas (the primary included) a shard takes writes with
    /// (issue 16: Kafka's min.insync.replicas); 0 = 2 at RF >= 2, else 1. Every write is
    /// acknowledged only once every in-sync replica holds it, whatever this says; it
    /// bounds how far the in-sync set may shrink ([`ClusterMap::check_leave_in_sync`]).
    pub write_quorum: u32,
}

impl CollectionSpec {
    /// The fewest in-sync replicas a shard of this collection writes with.
    pub fn min_in_sync(&self) -> usize {
        match self.write_quorum {
            0 => self.replication_factor.min(2) as usize,
            q => q as usize,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Collection {
    /// Unique for the life of the cluster: a dropped and re-created name gets a new id.
    pub id: u64,
    pub spec: CollectionSpec,
    pub created_version: u64,
    /// What may change after creation ([`Command::SetCollectionPolicy`]).
    pub policy: CollectionPolicy,
}

/// A collection's settings that change at run time (issue 18); of its spec, only the
/// index parameters change, by a rebuild's switch or rollback (issue 21, `rebuild.rs`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct CollectionPolicy {
    /// Rows written since a shard's serving index generation that start a rebuild of
    /// it: `None` = the nodes' default (`--auto-rebuild-tail`), 0 = never (off during
    /// a bulk load, then one build).
    pub auto_rebuild_rows: Option<u64>,
    /// The metadata fields every shard indexes for filters (issue 22); a change makes
    /// each replica re-read its documents' metadata (`Shard::set_payload_fields`).
    pub payload_fields: Vec<PayloadField>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Capacity {
    pub memory_bytes: u64,
    pub gpu: bool,
    pub zone: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Registered, not yet heartbeating as ready.
    Joining,
    Up,
    /// Missed heartbeats past the suspect timeout; keeps its replicas.
    Suspect,
    /// Missed heartbeats past the down timeout; its replicas are re-assigned.
    Down,
    /// Operator asked to empty it; receives nothing new.
    Draining,
}

impl NodeState {
    /// Heartbeating and serving (up, or draining but still serving until its replicas
    /// move): its replicas count towards quorums and reads, and may be promoted. The
    /// one definition; the node's view of the map uses the same rule
    /// (`shoal_proto::coordinator::NodeState::is_live`).
    pub fn is_live(self) -> bool {
        matches!(self, NodeState::Up | NodeState::Draining)
    }

    /// Whether placement may put new replicas here.
    pub fn accepts_replicas(self) -> bool {
        self == NodeState::Up
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub addr: String,
    pub capacity: Capacity,
    pub state: NodeState,
    /// An operator asked to empty it: kept through liveness changes and restarts, so
    /// a draining node that goes silent for a while comes back draining.
    pub draining: bool,
    /// The node's data volume, as it last registered ("" = not told): a node back
    /// with another volume holds none of its replicas' data.
    pub volume: String,
}

impl Node {
    /// The state a heartbeating node should be in.
    pub fn live_state(&self) -> NodeState {
        if self.draining {
            NodeState::Draining
        } else {
            NodeState::Up
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    Serving,
    /// Target of a move: receiving data, not yet serving.
    Copying,
    /// Source of a move: serving until its replacement is ready, then removed.
    Leaving,
}

impl ReplicaState {
    /// In the shard's in-sync set (issue 16): writes wait for it. A leaving replica
    /// stays in it until its copy replaces it (or it lags and goes), but is never
    /// promoted.
    pub fn in_sync(self) -> bool {
        matches!(self, ReplicaState::Serving | ReplicaState::Leaving)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub node: NodeId,
    pub state: ReplicaState,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    pub collection: String,
    pub index: u32,
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.collection, self.index)
    }
}

/// A shard's replica set and index generations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub key: ShardKey,
    pub collection_id: u64,
    pub primary: Option<NodeId>,
    pub replicas: Vec<Replica>,
    /// Bumped whenever the primary changes, so a deposed primary can be fenced.
    pub epoch: u64,
    pub serving_generation: u64,
    /// 0 when no build is under way.
    pub building_generation: u64,
    /// The epoch an operator started by accepting data loss (a forced promotion, an
    /// empty allocation), 0 = none: in that epoch the primary's copy is the shard even
    /// where a replica holds more (issue 14: otherwise a replica ahead is never
    /// overwritten).
    pub forced_epoch: u64,
    /// Its part in a running split (issue 19, `split.rs`), if any.
    pub split: Option<SplitRole>,
    /// The restore operation (issue 20) its primary is writing its data from, until its
    /// step is done: meanwhile no node creates it empty, and after a failed restore
    /// only an operator's `AllocateEmpty` (or dropping the collection) ends the wait.
    pub restoring: Option<u64>,
}

impl Shard {
    pub fn holds(&self, node: &str) -> bool {
        self.replicas.iter().any(|r| r.node == node)
    }

    /// Replicas that count towards the replication factor (not leaving).
    pub fn live_count(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Leaving)
            .count()
    }
}

/// One step of placement, applied atomically per shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// Add a replica on `to`; `from`, if any, becomes Leaving until `to` is ready.
    /// `to` starts Serving when there is nothing to copy (a new, empty shard).
    Add {
        shard: ShardKey,
        to: NodeId,
        from: Option<NodeId>,
    },
    /// Drop the replica on a down node from the map (refused unless a serving copy stays
    /// on a live node; the node keeps its files until its map shows the data elsewhere).
    Evict { shard: ShardKey, node: NodeId },
}

/// A change to the map, as stored in the Raft log. Entries are bincode, which names a
/// variant by its index: new variants go at the end, and a variant's fields never
/// change (add a variant instead).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A request for a new collection, as clients and forwarding members send it. The
    /// leader turns it into [`Command::CreateCollectionPlaced`] before proposing it
    /// (`Coordinator::decide`); `apply` refuses it, so the log never runs placement. (Logs
    /// written before issue 15 hold these, and do not replay: no deployment had any.)
    CreateCollection(CollectionSpec),
    DropCollection {
        name: String,
    },
    /// A node (re)joins. With a `volume` other than the one the map holds, its data
    /// is gone: its replicas become copies to fill from the others, and the shards it
    /// was primary of have no primary until the leader promotes the most up-to-date
    /// serving replica.
    RegisterNode {
        id: NodeId,
        addr: String,
        capacity: Capacity,
        volume: String,
    },
    /// Names the cluster, once (the bootstrapping leader's first command): nodes
    /// refuse maps and coordinators refuse nodes of another cluster.
    InitCluster {
        id: String,
    },
    /// An operator's decision that a shard's data is lost: the replica on `node` (added
    /// when it has none) becomes an empty serving primary under a new epoch. Refused
    /// while a serving replica sits on a live node: promote that one instead.
    AllocateEmpty {
        shard: ShardKey,
        node: NodeId,
    },
    /// Applied only when the node is still in one of `from` (so a decision made on an
    /// older view cannot undo a newer one).
    SetNodeState {
        id: NodeId,
        state: NodeState,
        from: Vec<NodeState>,
    },
    ApplyMoves(Vec<Move>),
    /// A move's target has caught up: it serves, and the leaving source goes.
    ReplicaReady {
        shard: ShardKey,
        node: NodeId,
    },
    SetGenerations {
        shard: ShardKey,
        serving: u64,
        building: u64,
    },
    /// Makes `node` (a serving backup) the shard's primary under a new epoch, if the
    /// shard is still at `epoch` (a decision made on an older view is dropped).
    Promote {
        shard: ShardKey,
        node: NodeId,
        epoch: u64,
    },
    /// [`Command::Promote`] on an operator's word that writes the replica lacks may be
    /// lost: the new epoch is marked forced ([`Shard::forced_epoch`]), and the replica
    /// may be a copy outside the in-sync set.
    PromoteAcceptingLoss {
        shard: ShardKey,
        node: NodeId,
        epoch: u64,
    },
    /// Cancels an operator's drain: a draining node is up again (a silent one keeps
    /// its liveness state and comes back up, not draining).
    Undrain {
        id: NodeId,
    },
    /// A replica its node reports failed (a write's I/O error, a failed open) leaves
    /// its shard's quorum: it becomes a copy, serving again once its node has reopened
    /// it and it has caught up. A failed primary hands its role to `successor` (a
    /// serving replica the leader chose by position) under a new epoch; a failed backup
    /// names none. Applied only at `epoch`; refused when no serving replica would remain.
    ReplicaFailed {
        shard: ShardKey,
        node: NodeId,
        epoch: u64,
        successor: Option<NodeId>,
    },
    /// A new collection with the placement the leader chose for it (primary first per
    /// shard, from its view of the nodes and their disks): `apply` only validates it,
    /// so replaying the log rebuilds the same map whatever today's placement code does.
    CreateCollectionPlaced {
        spec: CollectionSpec,
        placement: Vec<Vec<NodeId>>,
    },
    /// A serving backup leaves its shard's in-sync set (issue 16): it becomes a copy,
    /// which the primary no longer waits for and which cannot be promoted until the
    /// primary admits it again ([`Command::JoinInSync`]). Asked by the primary at
    /// `epoch` (the backup lags it) or by the leader (its node turned suspect or down);
    /// applied only at `epoch`, and refused when fewer in-sync replicas than the
    /// collection's write quorum would remain ([`ClusterMap::check_leave_in_sync`]).
    LeaveInSync {
        shard: ShardKey,
        node: NodeId,
        epoch: u64,
    },
    /// The primary at `epoch` reports a copy in sync: it already waits for the copy on
    /// every write and the copy holds everything acknowledged before. The copy serves
    /// (and may be promoted); a leaving replica makes way for it, and when that was the
    /// primary, the copy leads under a new epoch. Replaces the copy's own word
    /// ([`Command::ReplicaReady`], which the primary might not yet have counted).
    JoinInSync {
        shard: ShardKey,
        node: NodeId,
        epoch: u64,
    },
    /// An API key (issue 17): its record, never its secret. Refused when the id is
    /// taken or the map holds [`MAX_KEYS`] already.
    PutKey(KeyRecord),
    /// Revokes a key: every process refuses it once its map holds this change.
    RevokeKey {
        id: String,
    },
    /// Replaces a collection's policy, if `name` is still the collection `id` (one
    /// dropped and re-created in between is another).
    SetCollectionPolicy {
        name: String,
        id: u64,
        policy: CollectionPolicy,
    },
    /// Starts an operation on collection `collection` (incarnation `collection_id`):
    /// the map gives it the next id and a pending step per shard (from each shard's
    /// serving generation now). Refused while one of its kind runs on the collection.
    StartOperation {
        kind: OperationKind,
        collection: String,
        collection_id: u64,
        started_ms: u64,
    },
    /// A step's end reported by a node (a build that failed), while it is pending.
    OperationStep {
        id: u64,
        shard: u32,
        step: Step,
    },
    /// An operator ends a running operation.
    CancelOperation {
        id: u64,
        reason: String,
    },
    /// Starts doubling a collection's shard count (issue 19, `split.rs`): its shards
    /// sealed, their siblings forking on the same nodes.
    StartSplit {
        collection: String,
        collection_id: u64,
        started_ms: u64,
    },
    /// A sealed source's primary holds nothing in flight and its log ends at `at`.
    SplitSealed {
        shard: ShardKey,
        operation: u64,
        at: SealPoint,
    },
    /// The split's cut-over: the shard count doubles; `replicas` are each sibling's
    /// replicas that hold their source's seal point (the leader's decision,
    /// `split::cut_over`).
    CutOverSplit {
        operation: u64,
        replicas: BTreeMap<u32, Vec<NodeId>>,
    },
    /// A collection restored from a backup (issue 20): created as
    /// `CreateCollectionPlaced` would (the leader placed it), each shard at the epoch its
    /// backup ends in (so the restored history goes on in it), its first node the
    /// primary, which restores the shard from the repository, and the others copies
    /// filled from it once it serves; with a `Restore` operation, a step per shard.
    RestoreCollection {
        spec: CollectionSpec,
        placement: Vec<Vec<NodeId>>,
        epochs: Vec<u64>,
        url: String,
        backup: String,
        started_ms: u64,
    },
    /// A fresh group takes an exported map back (issue 20: the coordinator group's
    /// disaster recovery): only while its own map has no nodes and no collections. It
    /// becomes the exported cluster, versions [`IMPORT_VERSION_GAP`] past the export's,
    /// so its nodes, which saw versions after the export, take it as newer.
    ImportMap {
        map: Box<ClusterMap>,
    },
    /// Shards whose every copy is lost, restored from a backup into their collection
    /// (issue 20: an operator accepting the writes after the backup's position, instead
    /// of `AllocateEmpty`'s all): each on the node named (up, holding no replica of it),
    /// its primary under a new forced epoch past the backup's, `restoring` until its
    /// step of the `Restore` operation started here (one step per shard named) is done.
    RestoreShards {
        collection: String,
        collection_id: u64,
        /// shard -> (node, the backup's newest epoch of that shard)
        shards: BTreeMap<u32, (NodeId, u64)>,
        url: String,
        backup: String,
        started_ms: u64,
    },
    /// A rebuild's switch (issue 21, `rebuild.rs`): the leader's, once every shard is
    /// staged and every serving replica holds its staged generation; the collection's
    /// index parameters become the rebuild's.
    SwitchRebuild {
        operation: u64,
    },
    /// An operator keeps a switched rebuild: the previous generations may be deleted.
    CommitRebuild {
        collection: String,
        operation: u64,
    },
    /// An operator undoes a rebuild: the previous generations and parameters serve
    /// again (before the switch: the staged generations are dropped). Refused once
    /// committed.
    RollbackRebuild {
        collection: String,
        operation: u64,
    },
    /// Points `alias` at `collection` (issue 21; `None` removes it): searches and writes
    /// may name an alias. One command, so it switches atomically.
    SetAlias {
        alias: String,
        collection: Option<String>,
    },
}

/// Aliases the map holds at most.
pub const MAX_ALIASES: usize = 10_000;

/// How far an imported map's version jumps past the exported one's: past any version a
/// node of that cluster saw after the export (each command is one version).
pub const IMPORT_VERSION_GAP: u64 = 1 << 32;

/// Keys the map holds at most (each is checked against by id, not scanned).
pub const MAX_KEYS: usize = 10_000;

/// What a command changed, for watchers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Change {
    CollectionPut(Collection),
    CollectionDropped(String),
    NodePut(Node),
    ShardPut(Shard),
    KeyPut(KeyRecord),
    KeyRevoked(String),
    OperationPut(Operation),
    /// A shard left the map without its collection (a cancelled split's sibling).
    ShardDropped(ShardKey),
    /// An alias now names a collection, or (`None`) nothing.
    AliasPut(String, Option<String>),
    /// The whole map was replaced ([`Command::ImportMap`]): watchers take it whole.
    Imported,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
}

pub(crate) type Result<T> = std::result::Result<T, MapError>;

/// A conditional command's epoch against the shard's.
fn at_epoch(s: &Shard, epoch: u64) -> Result<()> {
    if s.epoch != epoch {
        return Err(MapError::FailedPrecondition(format!(
            "shard {} is at epoch {}, not {epoch}",
            s.key, s.epoch
        )));
    }
    Ok(())
}

pub(crate) fn invalid(msg: impl Into<String>) -> MapError {
    MapError::InvalidArgument(msg.into())
}

impl CollectionSpec {
    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        if n.is_empty() || n.len() > 128 {
            return Err(invalid("collection name must be 1 to 128 characters"));
        }
        if !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(format!(
                "collection name {n:?} may hold only ASCII letters, digits, '_' and '-'"
            )));
        }
        let d = self.dimension;
        if !(1..=MAX_DIMENSION).contains(&d) {
            return Err(invalid(format!(
                "dimension {d} must be between 1 and {MAX_DIMENSION}"
            )));
        }
        if !(1..=MAX_SHARDS).contains(&self.shard_count) {
            return Err(invalid(format!(
                "shard_count {} must be between 1 and {MAX_SHARDS}",
                self.shard_count
            )));
        }
        if self.replication_factor == 0 {
            return Err(invalid("replication_factor must be at least 1"));
        }
        if self.write_quorum > self.replication_factor {
            return Err(invalid(format!(
                "write_quorum {} exceeds the replication_factor {}",
                self.write_quorum, self.replication_factor
            )));
        }
        let ix = &self.index;
        // 0: chosen from the shards' size when an index is built (issue 18).
        if ix.nlist > 1 << 20 {
            return Err(invalid(format!(
                "nlist {} must be at most 1048576 (0: sized from the data)",
                ix.nlist
            )));
        }
        if ix.pq_m == 0 || !d.is_multiple_of(ix.pq_m) {
            return Err(invalid(format!(
                "pq_m {} must divide the dimension {d}",
                ix.pq_m
            )));
        }
        if !(1..=16).contains(&ix.pq_nbits) {
            return Err(invalid(format!(
                "pq_nbits {} is not supported (1 to 16)",
                ix.pq_nbits
            )));
        }
        // nlist 0: sized at build time (issue 18); nprobe then bounds nothing here.
        if ix.nprobe == 0 || (ix.nlist > 0 && ix.nprobe > ix.nlist) {
            return Err(invalid(format!(
                "nprobe {} must be between 1 and nlist {}",
                ix.nprobe, ix.nlist
            )));
        }
        if ix.refine == 0 || ix.refine > 1000 {
            return Err(invalid(format!(
                "refine {} must be between 1 and 1000",
                ix.refine
            )));
        }
        if let Some(e) = &self.encoder {
            if e.model_id.is_empty() {
                return Err(invalid("encoder model_id must not be empty"));
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClusterMap {
    pub version: u64,
    /// Made at bootstrap ([`Command::InitCluster`]); "" before.
    pub cluster_id: String,
    pub next_collection_id: u64,
    pub collections: BTreeMap<String, Collection>,
    pub nodes: BTreeMap<NodeId, Node>,
    pub shards: BTreeMap<ShardKey, Shard>,
    /// API keys by id (issue 17).
    pub keys: BTreeMap<String, KeyRecord>,
    /// Long-running operations by id (issue 18): the running ones and the last
    /// [`operations::KEEP_FINISHED`] finished.
    pub operations: BTreeMap<u64, Operation>,
    pub next_operation_id: u64,
    /// Collection aliases (issue 21): alias -> collection name.
    pub aliases: BTreeMap<String, String>,
}

impl ClusterMap {
    /// The shard a node names by (collection, collection id, index): only while the
    /// collection of that name is the same incarnation. A replica of a collection
    /// dropped and created again under its name speaks for nothing in the new one.
    pub fn shard_named(&self, collection: &str, collection_id: u64, index: u32) -> Option<&Shard> {
        let key = ShardKey {
            collection: collection.to_string(),
            index,
        };
        self.shards
            .get(&key)
            .filter(|s| s.collection_id == collection_id)
    }

    pub fn shards_of<'a>(&'a self, collection: &'a str) -> impl Iterator<Item = &'a Shard> + 'a {
        self.shards
            .range(
                ShardKey {
                    collection: collection.to_string(),
                    index: 0,
                }..,
            )
            .take_while(move |(k, _)| k.collection == collection)
            .map(|(_, s)| s)
    }

    /// Replicas (any state) hosted per node.
    pub fn replica_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts: BTreeMap<&str, usize> =
            self.nodes.keys().map(|k| (k.as_str(), 0)).collect();
        for s in self.shards.values() {
            for r in &s.replicas {
                *counts.entry(r.node.as_str()).or_default() += 1;
            }
        }
        counts
    }

    /// Applies `cmd`, or returns why not without changing anything.
    pub fn apply(&mut self, cmd: &Command) -> Result<Vec<Change>> {
        let changes = match cmd {
            Command::CreateCollection(spec) => {
                self.check_new_collection(spec)?;
                return Err(MapError::FailedPrecondition(format!(
                    "collection {:?} has no placement: the leader places a new collection \
                     (CreateCollectionPlaced) before committing it",
                    spec.name
                )));
            }
            Command::CreateCollectionPlaced { spec, placement } => {
                self.check_new_collection(spec)?;
                self.check_placement(spec, placement)?;
                self.create_collection(spec, placement.clone())?
            }
            Command::DropCollection { name } => self.drop_collection(name)?,
            Command::RegisterNode {
                id,
                addr,
                capacity,
                volume,
            } => self.register_node(id, addr, capacity, volume)?,
            Command::InitCluster { id } => {
                if id.is_empty() || id.len() > 64 {
                    return Err(invalid("a cluster id is 1 to 64 bytes"));
                }
                if !self.cluster_id.is_empty() {
                    return Err(MapError::FailedPrecondition(format!(
                        "the cluster is already named {:?}",
                        self.cluster_id
                    )));
                }
                self.cluster_id = id.clone();
                Vec::new()
            }
            Command::AllocateEmpty { shard, node } => self.allocate_empty(shard, node)?,
            Command::SetNodeState { id, state, from } => self.set_node_state(id, *state, from)?,
            Command::Undrain { id } => {
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or_else(|| MapError::NotFound(format!("node {id:?} not found")))?;
                if !node.draining {
                    return Err(MapError::FailedPrecondition(format!(
                        "node {id:?} is not draining"
                    )));
                }
                node.draining = false;
                if node.state == NodeState::Draining {
                    node.state = NodeState::Up;
                }
                vec![Change::NodePut(node.clone())]
            }
            Command::ApplyMoves(moves) => self.apply_moves(moves)?,
            Command::ReplicaReady { shard, node } => self.replica_ready(shard, node)?,
            Command::LeaveInSync { shard, node, epoch } => {
                self.check_leave_in_sync(shard, node, *epoch)?;
                let s = self.shards.get_mut(shard).expect("checked");
                // A leaving replica (a move's source) goes: the copy replacing it
                // fills from the primary, which holds every acknowledged write.
                s.replicas
                    .retain(|r| !(&r.node == node && r.state == ReplicaState::Leaving));
                if let Some(r) = s.replicas.iter_mut().find(|r| &r.node == node) {
                    r.state = ReplicaState::Copying;
                }
                vec![Change::ShardPut(s.clone())]
            }
            Command::PutKey(k) => {
                if let Some(p) = k.problem() {
                    return Err(invalid(p));
                }
                if self.keys.contains_key(&k.id) {
                    return Err(MapError::AlreadyExists(format!("key {} exists", k.id)));
                }
                if self.keys.len() >= MAX_KEYS {
                    return Err(MapError::FailedPrecondition(format!(
                        "the map holds {MAX_KEYS} keys, the most it takes: revoke some first"
                    )));
                }
                self.keys.insert(k.id.clone(), k.clone());
                vec![Change::KeyPut(k.clone())]
            }
            Command::RevokeKey { id } => {
                if self.keys.remove(id).is_none() {
                    return Err(MapError::NotFound(format!(
                        "key {:?} not found",
                        id.chars().take(32).collect::<String>()
                    )));
                }
                vec![Change::KeyRevoked(id.clone())]
            }
            Command::SetCollectionPolicy { name, id, policy } => {
                PayloadField::check_paths(&policy.payload_fields)
                    .map_err(MapError::InvalidArgument)?;
                let c = self
                    .collections
                    .get_mut(name)
                    .filter(|c| c.id == *id)
                    .ok_or_else(|| {
                        MapError::NotFound(format!("collection {name:?} (id {id}) not found"))
                    })?;
                c.policy = policy.clone();
                vec![Change::CollectionPut(c.clone())]
            }
            Command::JoinInSync { shard, node, epoch } => {
                let s = self
                    .shards
                    .get(shard)
                    .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
                at_epoch(s, *epoch)?;
                self.replica_ready(shard, node)?
            }
            Command::SetGenerations {
                shard,
                serving,
                building,
            } => {
                let s = self
                    .shards
                    .get_mut(shard)
                    .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
                if *serving < s.serving_generation {
                    return Err(MapError::FailedPrecondition(format!(
                        "shard {shard} already serves generation {}, not going back to {serving}",
                        s.serving_generation
                    )));
                }
                s.serving_generation = *serving;
                s.building_generation = *building;
                let mut changes = vec![Change::ShardPut(s.clone())];
                let version = self.version + 1;
                for op in self.operations.values_mut() {
                    if op.running()
                        && op.collection == shard.collection
                        && op.served(shard.index, *serving)
                    {
                        op.settle(version);
                        changes.push(Change::OperationPut(op.clone()));
                    }
                }
                operations::prune(&mut self.operations);
                changes
            }
            Command::StartOperation {
                kind,
                collection,
                collection_id,
                started_ms,
            } => self.start_operation(kind, collection, *collection_id, *started_ms)?,
            Command::OperationStep { id, shard, step } => {
                let version = self.version + 1;
                let op = self.running_operation(*id)?;
                if !matches!(op.steps.get(shard), Some(Step::Pending { .. })) {
                    return Err(MapError::FailedPrecondition(format!(
                        "operation {id} has no pending step for shard {shard}"
                    )));
                }
                if matches!(step, Step::Pending { .. }) {
                    return Err(invalid("a step can only end"));
                }
                op.steps.insert(*shard, step.clone());
                op.settle(version);
                let mut changes = vec![Change::OperationPut(op.clone())];
                // A restored shard's data is in place: its wait ends (issue 20).
                if matches!(op.kind, OperationKind::Restore { .. })
                    && matches!(step, Step::Done { .. })
                {
                    let key = ShardKey {
                        collection: op.collection.clone(),
                        index: *shard,
                    };
                    if let Some(s) = self
                        .shards
                        .get_mut(&key)
                        .filter(|s| s.restoring == Some(*id))
                    {
                        s.restoring = None;
                        changes.push(Change::ShardPut(s.clone()));
                    }
                }
                operations::prune(&mut self.operations);
                changes
            }
            Command::CancelOperation { id, reason } => {
                let version = self.version + 1;
                let op = self.running_operation(*id)?;
                if matches!(&op.kind, OperationKind::Rebuild(p) if p.phase != crate::operations::RebuildPhase::Building)
                {
                    return Err(MapError::FailedPrecondition(format!(
                        "rebuild {id} has switched: commit it or roll it back"
                    )));
                }
                op.end(
                    Outcome::Cancelled {
                        reason: reason.chars().take(256).collect(),
                    },
                    version,
                );
                let mut changes = vec![Change::OperationPut(op.clone())];
                if matches!(op.kind, OperationKind::Split { .. }) {
                    changes.extend(self.undo_split(*id));
                }
                operations::prune(&mut self.operations);
                changes
            }
            Command::StartSplit {
                collection,
                collection_id,
                started_ms,
            } => self.start_split(collection, *collection_id, *started_ms)?,
            Command::SwitchRebuild { operation } => self.switch_rebuild(*operation)?,
            Command::CommitRebuild {
                collection,
                operation,
            } => self.commit_rebuild(collection, *operation)?,
            Command::RollbackRebuild {
                collection,
                operation,
            } => self.rollback_rebuild(collection, *operation)?,
            Command::SetAlias { alias, collection } => {
                self.set_alias(alias, collection.as_deref())?
            }
            Command::SplitSealed {
                shard,
                operation,
                at,
            } => self.split_sealed(shard, *operation, *at)?,
            Command::CutOverSplit {
                operation,
                replicas,
            } => self.cut_over_split(*operation, replicas)?,
            Command::RestoreShards {
                collection,
                collection_id,
                shards,
                url,
                backup,
                started_ms,
            } => {
                self.restore_shards(collection, *collection_id, shards, url, backup, *started_ms)?
            }
            Command::ImportMap { map } => {
                if !self.nodes.is_empty() || !self.collections.is_empty() {
                    return Err(MapError::FailedPrecondition(format!(
                        "this group's map holds {} node(s) and {} collection(s): a map is \
                         imported only into a fresh group",
                        self.nodes.len(),
                        self.collections.len()
                    )));
                }
                if map.cluster_id.is_empty() || map.version == 0 {
                    return Err(invalid("the imported map names no cluster"));
                }
                let version = self.version.max(map.version) + IMPORT_VERSION_GAP;
                *self = (**map).clone();
                // `apply` adds one below.
                self.version = version - 1;
                vec![Change::Imported]
            }
            Command::RestoreCollection {
                spec,
                placement,
                epochs,
                url,
                backup,
                started_ms,
            } => {
                self.check_new_collection(spec)?;
                self.check_placement(spec, placement)?;
                crate::operations::check_target(url, backup).map_err(invalid)?;
                if epochs.len() != placement.len() || epochs.contains(&0) {
                    return Err(invalid(format!(
                        "a restore names {} epochs (none 0) for {} shards",
                        epochs.len(),
                        placement.len()
                    )));
                }
                let mut changes = self.create_collection(spec, placement.clone())?;
                let id = self.collections[&spec.name].id;
                let op = self.next_operation_id + 1;
                for c in &mut changes {
                    if let Change::ShardPut(s) = c {
                        s.epoch = epochs[s.key.index as usize];
                        s.restoring = Some(op);
                        for r in &mut s.replicas {
                            if Some(&r.node) != s.primary.as_ref() {
                                r.state = ReplicaState::Copying;
                            }
                        }
                        self.shards.insert(s.key.clone(), s.clone());
                    }
                }
                changes.extend(self.insert_operation(
                    &OperationKind::Restore {
                        url: url.clone(),
                        backup: backup.clone(),
                    },
                    &spec.name,
                    id,
                    *started_ms,
                ));
                changes
            }
            Command::ReplicaFailed {
                shard,
                node,
                epoch,
                successor,
            } => self.replica_failed(shard, node, *epoch, successor.as_deref())?,
            Command::Promote { shard, node, epoch }
            | Command::PromoteAcceptingLoss { shard, node, epoch } => {
                let s = self
                    .shards
                    .get_mut(shard)
                    .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
                if s.epoch != *epoch {
                    return Err(MapError::FailedPrecondition(format!(
                        "shard {shard} is at epoch {}, not {epoch}",
                        s.epoch
                    )));
                }
                // An in-sync (serving) replica; on an operator's word accepting the
                // loss, also a copy outside the set (issue 16: Kafka's unclean leader
                // election), which then serves.
                let forced = matches!(cmd, Command::PromoteAcceptingLoss { .. });
                let Some(r) = s.replicas.iter_mut().find(|r| {
                    &r.node == node
                        && (r.state == ReplicaState::Serving
                            || (forced && r.state == ReplicaState::Copying))
                }) else {
                    return Err(MapError::FailedPrecondition(format!(
                        "shard {shard} has no in-sync (serving) replica on {node:?}{}",
                        if forced {
                            ""
                        } else {
                            " (a copy out of sync may be promoted only accepting data loss)"
                        }
                    )));
                };
                r.state = ReplicaState::Serving;
                s.primary = Some(node.clone());
                s.epoch += 1;
                if matches!(cmd, Command::PromoteAcceptingLoss { .. }) {
                    s.forced_epoch = s.epoch;
                }
                vec![Change::ShardPut(s.clone())]
            }
        };
        self.version += 1;
        Ok(changes)
    }

    /// A new collection's spec against the map: valid, a new name, enough nodes up.
    pub(crate) fn check_new_collection(&self, spec: &CollectionSpec) -> Result<()> {
        spec.validate()?;
        if self.collections.contains_key(&spec.name) {
            return Err(MapError::AlreadyExists(format!(
                "collection {:?} already exists",
                spec.name
            )));
        }
        if let Some(c) = self.aliases.get(&spec.name) {
            return Err(MapError::AlreadyExists(format!(
                "{:?} is an alias of collection {c:?}: remove the alias first",
                spec.name
            )));
        }
        let up = self
            .nodes
            .values()
            .filter(|n| n.state.accepts_replicas())
            .count();
        if spec.replication_factor as usize > up {
            return Err(MapError::FailedPrecondition(format!(
                "replication_factor {} exceeds the {up} node(s) up",
                spec.replication_factor
            )));
        }
        Ok(())
    }

    /// A placement chosen by the leader, against the map at apply time: one list per
    /// shard, `replication_factor` distinct nodes each, every one up.
    fn check_placement(&self, spec: &CollectionSpec, placement: &[Vec<NodeId>]) -> Result<()> {
        if placement.len() != spec.shard_count as usize {
            return Err(invalid(format!(
                "the placement names {} shard(s); collection {:?} has {}",
                placement.len(),
                spec.name,
                spec.shard_count
            )));
        }
        for (index, nodes) in placement.iter().enumerate() {
            let distinct: BTreeSet<&NodeId> = nodes.iter().collect();
            if nodes.len() != spec.replication_factor as usize || distinct.len() != nodes.len() {
                return Err(invalid(format!(
                    "shard {index} is placed on {nodes:?}: it needs {} distinct node(s)",
                    spec.replication_factor
                )));
            }
            if let Some(n) = nodes.iter().find(|n| {
                !self
                    .nodes
                    .get(*n)
                    .is_some_and(|n| n.state.accepts_replicas())
            }) {
                return Err(MapError::FailedPrecondition(format!(
                    "shard {index} is placed on node {n:?}, which is not up"
                )));
            }
        }
        Ok(())
    }

    fn create_collection(
        &mut self,
        spec: &CollectionSpec,
        assignment: Vec<Vec<NodeId>>,
    ) -> Result<Vec<Change>> {
        let id = self.next_collection_id + 1;
        self.next_collection_id = id;
        let collection = Collection {
            id,
            spec: spec.clone(),
            created_version: self.version + 1,
            policy: CollectionPolicy::default(),
        };
        let mut changes = vec![Change::CollectionPut(collection.clone())];
        self.collections.insert(spec.name.clone(), collection);
        for (index, nodes) in assignment.into_iter().enumerate() {
            let key = ShardKey {
                collection: spec.name.clone(),
                index: index as u32,
            };
            let shard = Shard {
                key: key.clone(),
                collection_id: id,
                primary: nodes.first().cloned(),
                replicas: nodes
                    .into_iter()
                    .map(|node| Replica {
                        node,
                        state: ReplicaState::Serving,
                    })
                    .collect(),
                epoch: 1,
                serving_generation: 0,
                building_generation: 0,
                forced_epoch: 0,
                split: None,
                restoring: None,
            };
            changes.push(Change::ShardPut(shard.clone()));
            self.shards.insert(key, shard);
        }
        Ok(changes)
    }

    fn drop_collection(&mut self, name: &str) -> Result<Vec<Change>> {
        if self.collections.remove(name).is_none() {
            return Err(MapError::NotFound(format!("collection {name:?} not found")));
        }
        self.shards.retain(|k, _| k.collection != name);
        let mut changes = vec![Change::CollectionDropped(name.to_string())];
        // Its aliases go with it: a collection created later under the name is
        // another one, and an alias never silently names it.
        let aliased: Vec<String> = (self.aliases.iter())
            .filter(|(_, c)| *c == name)
            .map(|(a, _)| a.clone())
            .collect();
        for a in aliased {
            self.aliases.remove(&a);
            changes.push(Change::AliasPut(a, None));
        }
        let version = self.version + 1;
        for op in self.operations.values_mut() {
            if op.running() && op.collection == name {
                op.end(
                    Outcome::Cancelled {
                        reason: "the collection was dropped".into(),
                    },
                    version,
                );
                changes.push(Change::OperationPut(op.clone()));
            }
        }
        operations::prune(&mut self.operations);
        Ok(changes)
    }

    /// The collection a search or a write names: an alias's, else `name` itself.
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        self.aliases.get(name).map_or(name, |c| c.as_str())
    }

    fn set_alias(&mut self, alias: &str, collection: Option<&str>) -> Result<Vec<Change>> {
        if alias.is_empty() || alias.len() > 128 {
            return Err(invalid("an alias must be 1 to 128 characters"));
        }
        if self.collections.contains_key(alias) {
            return Err(MapError::AlreadyExists(format!(
                "{alias:?} is a collection's name: an alias cannot hide it"
            )));
        }
        match collection {
            None => {
                if self.aliases.remove(alias).is_none() {
                    return Err(MapError::NotFound(format!("alias {alias:?} not found")));
                }
            }
            Some(c) => {
                if !self.collections.contains_key(c) {
                    return Err(MapError::NotFound(format!("collection {c:?} not found")));
                }
                if !self.aliases.contains_key(alias) && self.aliases.len() >= MAX_ALIASES {
                    return Err(invalid(format!(
                        "the map holds {MAX_ALIASES} aliases, the most it takes"
                    )));
                }
                self.aliases.insert(alias.to_string(), c.to_string());
            }
        }
        Ok(vec![Change::AliasPut(
            alias.to_string(),
            collection.map(str::to_string),
        )])
    }

    /// Collection `name` while it is incarnation `id` (commands name both, so one
    /// meant for a dropped collection never touches its successor).
    pub(crate) fn incarnation(&self, name: &str, id: u64) -> Result<&Collection> {
        self.collections
            .get(name)
            .filter(|c| c.id == id)
            .ok_or_else(|| MapError::NotFound(format!("collection {name:?} (id {id}) not found")))
    }

    fn running_operation(&mut self, id: u64) -> Result<&mut Operation> {
        self.operations
            .get_mut(&id)
            .filter(|o| o.running())
            .ok_or_else(|| MapError::NotFound(format!("no running operation {id}")))
    }

    fn start_operation(
        &mut self,
        kind: &OperationKind,
        collection: &str,
        collection_id: u64,
        started_ms: u64,
    ) -> Result<Vec<Change>> {
        self.incarnation(collection, collection_id)?;
        match kind {
            OperationKind::BuildIndex(p) => {
                if p.nlist == 0
                    || p.nlist > 1 << 20
                    || p.pq_m == 0
                    || p.pq_nbits == 0
                    || p.pq_nbits > 16
                    || p.train_sample > 1 << 32
                {
                    return Err(invalid(format!("build parameters {p:?} are out of range")));
                }
                if p.train_sample < p.nlist as u64 {
                    return Err(invalid(format!(
                        "a training sample of {} cannot train {} lists",
                        p.train_sample, p.nlist
                    )));
                }
            }
            OperationKind::Compact => {}
            OperationKind::Split { .. } => {
                return Err(invalid("a split starts by its own command (StartSplit)"));
            }
            OperationKind::Backup { url, backup } => {
                crate::operations::check_target(url, backup).map_err(invalid)?;
                if let Some(o) = self.operations.values().find(|o| {
                    o.running()
                        && matches!(&o.kind, OperationKind::Backup { url: u, backup: b }
                            if u == url && b == backup)
                }) {
                    return Err(MapError::FailedPrecondition(format!(
                        "operation {} is writing backup {backup} to {url}",
                        o.id
                    )));
                }
            }
            OperationKind::Restore { .. } => {
                return Err(invalid(
                    "a restore starts by its own command (RestoreCollection)",
                ));
            }
            OperationKind::Rebuild(p) => {
                let c = self.incarnation(collection, collection_id)?;
                p.check(c.spec.dimension)?;
                if p.previous != c.spec.index {
                    return Err(MapError::FailedPrecondition(format!(
                        "the collection's index parameters changed since the rebuild was asked for ({:?}, not {:?})",
                        c.spec.index, p.previous
                    )));
                }
            }
        }
        // A build and a rebuild both make the shards' next generation: one at a time.
        let builds = ["build_index", "rebuild"];
        if builds.contains(&kind.name()) {
            if let Some(o) = self.operations.values().find(|o| {
                o.running() && o.collection == collection && builds.contains(&o.kind.name())
            }) {
                return Err(MapError::FailedPrecondition(format!(
                    "operation {} ({}) is running on {collection}: wait for it, or end it \
                     (cancel; a switched rebuild: commit or rollback)",
                    o.id,
                    o.kind.name()
                )));
            }
        }
        if let Some(o) = self.running_split(collection) {
            return Err(MapError::FailedPrecondition(format!(
                "split {} is running on {collection}: other operations wait for it",
                o.id
            )));
        }
        if let Some(o) = self
            .operations
            .values()
            .find(|o| o.running() && o.collection == collection && o.kind.name() == kind.name())
        {
            return Err(MapError::FailedPrecondition(format!(
                "operation {} ({}) is running on {collection}: wait for it or cancel it",
                o.id,
                o.kind.name()
            )));
        }
        Ok(self.insert_operation(kind, collection, collection_id, started_ms))
    }

    /// A new running operation with a pending step per shard (checked by the caller).
    fn insert_operation(
        &mut self,
        kind: &OperationKind,
        collection: &str,
        collection_id: u64,
        started_ms: u64,
    ) -> Vec<Change> {
        let id = self.next_operation_id + 1;
        self.next_operation_id = id;
        let steps = self
            .shards_of(collection)
            .map(|s| {
                (
                    s.key.index,
                    Step::Pending {
                        from_generation: s.serving_generation,
                    },
                )
            })
            .collect();
        let op = Operation {
            id,
            kind: kind.clone(),
            collection: collection.to_string(),
            collection_id,
            started_ms,
            started_version: self.version + 1,
            steps,
            outcome: None,
            finished_version: 0,
        };
        self.operations.insert(id, op.clone());
        vec![Change::OperationPut(op)]
    }

    fn register_node(
        &mut self,
        id: &str,
        addr: &str,
        capacity: &Capacity,
        volume: &str,
    ) -> Result<Vec<Change>> {
        if id.is_empty() || addr.is_empty() {
            return Err(invalid("node id and address must not be empty"));
        }
        // Re-registering (a restart) keeps the node's replicas; a down node comes back
        // as joining and turns up (or draining) on its first ready heartbeat.
        let old = self.nodes.get(id);
        let draining = old.is_some_and(|n| n.draining);
        let replaced = old.is_some_and(|n| !n.volume.is_empty() && n.volume != volume);
        let mut changes = Vec::new();
        if replaced {
            // Its replicas hold nothing now: none serves, counts towards a quorum or is
            // chosen as a source; each is filled again from a serving copy (or, with
            // none left, waits for an operator's allocate-empty).
            for s in self.shards.values_mut() {
                if !s.holds(id) {
                    continue;
                }
                s.replicas
                    .retain(|r| !(r.node == id && r.state == ReplicaState::Leaving));
                for r in s.replicas.iter_mut().filter(|r| r.node == id) {
                    r.state = ReplicaState::Copying;
                }
                if s.primary.as_deref() == Some(id) {
                    s.primary = None;
                    s.epoch += 1;
                }
                changes.push(Change::ShardPut(s.clone()));
            }
        }
        let node = Node {
            id: id.to_string(),
            addr: addr.to_string(),
            capacity: capacity.clone(),
            state: if draining {
                NodeState::Draining
            } else {
                NodeState::Joining
            },
            draining,
            volume: volume.to_string(),
        };
        self.nodes.insert(id.to_string(), node.clone());
        changes.insert(0, Change::NodePut(node));
        Ok(changes)
    }

    fn restore_shards(
        &mut self,
        collection: &str,
        collection_id: u64,
        shards: &BTreeMap<u32, (NodeId, u64)>,
        url: &str,
        backup: &str,
        started_ms: u64,
    ) -> Result<Vec<Change>> {
        self.incarnation(collection, collection_id)?;
        crate::operations::check_target(url, backup).map_err(invalid)?;
        if shards.is_empty() {
            return Err(invalid("a shard restore names at least one shard"));
        }
        if let Some(o) = self
            .operations
            .values()
            .find(|o| o.running() && o.collection == collection)
        {
            return Err(MapError::FailedPrecondition(format!(
                "operation {} ({}) is running on {collection}: wait for it or cancel it",
                o.id,
                o.kind.name()
            )));
        }
        for (&index, (node, epoch)) in shards {
            let key = ShardKey {
                collection: collection.to_string(),
                index,
            };
            let s = self
                .shards
                .get(&key)
                .ok_or_else(|| MapError::NotFound(format!("shard {key} not found")))?;
            if *epoch == 0 {
                return Err(invalid(format!("shard {key}: the backup names epoch 0")));
            }
            if !self
                .nodes
                .get(node)
                .is_some_and(|n| n.state.accepts_replicas())
            {
                return Err(MapError::FailedPrecondition(format!(
                    "node {node:?} is not up and cannot take shard {key}"
                )));
            }
            if s.holds(node) {
                return Err(MapError::FailedPrecondition(format!(
                    "node {node:?} holds a replica of shard {key}: restore onto another"
                )));
            }
            if let Some(r) = s.replicas.iter().find(|r| {
                r.state == ReplicaState::Serving
                    && self.nodes.get(&r.node).is_some_and(|n| n.state.is_live())
            }) {
                return Err(MapError::FailedPrecondition(format!(
                    "shard {key} has a serving replica on live node {:?}: it is not lost",
                    r.node
                )));
            }
        }
        let op = self.next_operation_id + 1;
        let mut changes = Vec::new();
        for (&index, (node, epoch)) in shards {
            let key = ShardKey {
                collection: collection.to_string(),
                index,
            };
            let s = self.shards.get_mut(&key).expect("checked above");
            s.replicas.push(Replica {
                node: node.clone(),
                state: ReplicaState::Serving,
            });
            s.primary = Some(node.clone());
            s.epoch = s.epoch.max(*epoch) + 1;
            s.forced_epoch = s.epoch;
            s.restoring = Some(op);
            changes.push(Change::ShardPut(s.clone()));
        }
        // A step for each shard named only.
        self.insert_operation(
            &OperationKind::Restore {
                url: url.to_string(),
                backup: backup.to_string(),
            },
            collection,
            collection_id,
            started_ms,
        );
        let o = self.operations.get_mut(&op).expect("just inserted");
        o.steps.retain(|i, _| shards.contains_key(i));
        changes.push(Change::OperationPut(o.clone()));
        Ok(changes)
    }

    fn allocate_empty(&mut self, shard: &ShardKey, node: &str) -> Result<Vec<Change>> {
        match self.nodes.get(node) {
            Some(n) if n.state.accepts_replicas() => {}
            _ => {
                return Err(MapError::FailedPrecondition(format!(
                    "node {node:?} is not up and cannot take the shard"
                )))
            }
        }
        let nodes = &self.nodes;
        let s = self
            .shards
            .get_mut(shard)
            .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
        // A shard still waiting for its restore has no data anywhere to promote.
        if let Some(r) = s.replicas.iter().find(|r| {
            s.restoring.is_none()
                && r.state == ReplicaState::Serving
                && nodes.get(&r.node).is_some_and(|n| n.state.is_live())
        }) {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} has a serving replica on live node {:?}: promote it instead",
                r.node
            )));
        }
        match s.replicas.iter_mut().find(|r| r.node == node) {
            Some(r) => r.state = ReplicaState::Serving,
            None => s.replicas.push(Replica {
                node: node.to_string(),
                state: ReplicaState::Serving,
            }),
        }
        s.primary = Some(node.to_string());
        s.epoch += 1;
        s.forced_epoch = s.epoch;
        s.restoring = None;
        Ok(vec![Change::ShardPut(s.clone())])
    }

    fn set_node_state(
        &mut self,
        id: &str,
        state: NodeState,
        from: &[NodeState],
    ) -> Result<Vec<Change>> {
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| MapError::NotFound(format!("node {id:?} not found")))?;
        if !from.is_empty() && !from.contains(&node.state) {
            return Err(MapError::FailedPrecondition(format!(
                "node {id:?} is {:?}, not one of {from:?}",
                node.state
            )));
        }
        node.state = state;
        if state == NodeState::Draining {
            node.draining = true;
        }
        // A primary on a node going down keeps the role here: the map cannot tell which
        // backup holds every write. The leader promotes the most up-to-date serving
        // backup by the replicas' reports (`Coordinator::promotions`) before and after
        // this; until then the shard takes no writes.
        Ok(vec![Change::NodePut(node.clone())])
    }

    fn apply_moves(&mut self, moves: &[Move]) -> Result<Vec<Change>> {
        // Validate all on a copy, then swap: all or nothing.
        let mut shards = self.shards.clone();
        let mut touched = Vec::new();
        for m in moves {
            match m {
                Move::Add { shard, to, from } => {
                    let s = shards
                        .get_mut(shard)
                        .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
                    match self.nodes.get(to) {
                        Some(n) if n.state.accepts_replicas() => {}
                        _ => {
                            return Err(MapError::FailedPrecondition(format!(
                                "node {to:?} cannot take replicas"
                            )))
                        }
                    }
                    if s.holds(to) {
                        return Err(MapError::FailedPrecondition(format!(
                            "shard {shard} already has a replica on {to:?}"
                        )));
                    }
                    if let Some(f) = from {
                        let r = s
                            .replicas
                            .iter_mut()
                            .find(|r| &r.node == f && r.state == ReplicaState::Serving)
                            .ok_or_else(|| {
                                MapError::FailedPrecondition(format!(
                                    "shard {shard} has no serving replica on {f:?} to move"
                                ))
                            })?;
                        r.state = ReplicaState::Leaving;
                    }
                    // A copy never becomes a primary here: it is empty until filled
                    // from a serving replica.
                    s.replicas.push(Replica {
                        node: to.clone(),
                        state: ReplicaState::Copying,
                    });
                    touched.push(shard.clone());
                }
                Move::Evict { shard, node } => {
                    let s = shards
                        .get_mut(shard)
                        .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
                    // The last serving copy on a live node is never dropped: what the
                    // other copies hold may be all there is of acknowledged writes.
                    let nodes = &self.nodes;
                    let keeps = s.replicas.iter().any(|r| {
                        &r.node != node
                            && r.state == ReplicaState::Serving
                            && nodes
                                .get(&r.node)
                                .is_some_and(|n| n.state != NodeState::Down)
                    });
                    if !keeps {
                        return Err(MapError::FailedPrecondition(format!(
                            "evicting {node:?} would leave shard {shard} without a serving \
                             copy on a live node"
                        )));
                    }
                    let before = s.replicas.len();
                    s.replicas.retain(|r| &r.node != node);
                    if s.replicas.len() == before {
                        return Err(MapError::FailedPrecondition(format!(
                            "shard {shard} has no replica on {node:?}"
                        )));
                    }
                    if s.primary.as_deref() == Some(node.as_str()) {
                        // Which serving copy is the most up to date is in the replicas'
                        // reports: the leader promotes it.
                        s.primary = None;
                        s.epoch += 1;
                    }
                    touched.push(shard.clone());
                }
            }
        }
        self.shards = shards;
        touched.sort();
        touched.dedup();
        Ok(touched
            .iter()
            .map(|k| Change::ShardPut(self.shards[k].clone()))
            .collect())
    }

    fn replica_failed(
        &mut self,
        shard: &ShardKey,
        node: &str,
        epoch: u64,
        successor: Option<&str>,
    ) -> Result<Vec<Change>> {
        let s = self
            .shards
            .get_mut(shard)
            .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
        if s.epoch != epoch {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} is at epoch {}, not {epoch}",
                s.epoch
            )));
        }
        let serving = |n: &str| {
            s.replicas
                .iter()
                .any(|r| r.node == n && r.state == ReplicaState::Serving)
        };
        if !serving(node) {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} has no serving replica on {node:?}"
            )));
        }
        let others = s
            .replicas
            .iter()
            .filter(|r| r.node != node && r.state == ReplicaState::Serving)
            .count();
        if others == 0 {
            return Err(MapError::FailedPrecondition(format!(
                "the replica on {node:?} is shard {shard}'s only serving one: it stays until its node reopens it"
            )));
        }
        let is_primary = s.primary.as_deref() == Some(node);
        match (is_primary, successor) {
            (true, Some(to)) if to != node && serving(to) => {
                s.primary = Some(to.to_string());
                s.epoch += 1;
            }
            (true, _) => {
                return Err(MapError::FailedPrecondition(format!(
                    "a failed primary of shard {shard} needs another serving replica as its successor, not {successor:?}"
                )))
            }
            (false, None) => {}
            (false, Some(_)) => {
                return Err(MapError::InvalidArgument(format!(
                    "{node:?} is not shard {shard}'s primary: a failed backup names no successor"
                )))
            }
        }
        if let Some(r) = s.replicas.iter_mut().find(|r| r.node == node) {
            r.state = ReplicaState::Copying;
        }
        Ok(vec![Change::ShardPut(s.clone())])
    }

    /// Whether `node`'s replica of `shard` may leave the in-sync set at `epoch`: it is
    /// a serving backup (never the primary, which is replaced by a promotion instead),
    /// and at least the collection's write quorum of in-sync replicas stays. The leader
    /// asks the same before proposing, so a refused shrink is not proposed every tick.
    pub fn check_leave_in_sync(&self, shard: &ShardKey, node: &str, epoch: u64) -> Result<()> {
        let s = self
            .shards
            .get(shard)
            .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
        at_epoch(s, epoch)?;
        if s.primary.as_deref() == Some(node) {
            return Err(MapError::FailedPrecondition(format!(
                "{node:?} is shard {shard}'s primary: it is replaced by a promotion, not \
                 taken out of the in-sync set"
            )));
        }
        if !s
            .replicas
            .iter()
            .any(|r| r.node == node && r.state.in_sync())
        {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} has no in-sync (serving or leaving) replica on {node:?}"
            )));
        }
        let min = self
            .collections
            .get(&shard.collection)
            .map_or(1, |c| c.spec.min_in_sync())
            .max(1);
        let stay = s
            .replicas
            .iter()
            .filter(|r| r.node != node && r.state.in_sync())
            .count();
        if stay < min {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} would keep {stay} in-sync replica(s), below its write quorum \
                 of {min}: the replica on {node:?} stays in sync (writes wait for it)"
            )));
        }
        Ok(())
    }

    fn replica_ready(&mut self, shard: &ShardKey, node: &str) -> Result<Vec<Change>> {
        let s = self
            .shards
            .get_mut(shard)
            .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
        let r = s
            .replicas
            .iter_mut()
            .find(|r| r.node == node && r.state == ReplicaState::Copying)
            .ok_or_else(|| {
                MapError::FailedPrecondition(format!(
                    "shard {shard} has no copying replica on {node:?}"
                ))
            })?;
        r.state = ReplicaState::Serving;
        // One leaving replica makes way for each one that became ready.
        if let Some(pos) = s
            .replicas
            .iter()
            .position(|r| r.state == ReplicaState::Leaving)
        {
            let gone = s.replicas.remove(pos);
            if s.primary.as_deref() == Some(gone.node.as_str()) {
                s.primary = Some(node.to_string());
                s.epoch += 1;
            }
        }
        Ok(vec![Change::ShardPut(s.clone())])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn spec(name: &str, shards: u32, rf: u32) -> CollectionSpec {
        CollectionSpec {
            name: name.into(),
            dimension: 384,
            metric: Metric::InnerProduct,
            encoder: None,
            index: IndexParams::defaults(384),
            shard_count: shards,
            replication_factor: rf,
            replica_memory_bytes: DEFAULT_REPLICA_MEMORY,
            write_quorum: 0,
        }
    }

    pub fn node(id: &str, zone: &str) -> Command {
        Command::RegisterNode {
            id: id.into(),
            addr: format!("127.0.0.1:{}", 7000 + id.len()),
            capacity: Capacity {
                memory_bytes: 64 << 30,
                gpu: false,
                zone: zone.into(),
            },
            volume: format!("vol-{id}"),
        }
    }

    pub fn up(id: &str) -> Command {
        Command::SetNodeState {
            id: id.into(),
            state: NodeState::Up,
            from: vec![],
        }
    }

    /// A collection placed as the leader commits it: shard i on the nodes that accept
    /// replicas, in id order from the i-th (placement's own choices are tested in
    /// placement.rs).
    pub fn placed(m: &ClusterMap, spec: CollectionSpec) -> Command {
        let up: Vec<NodeId> = m
            .nodes
            .values()
            .filter(|n| n.state.accepts_replicas())
            .map(|n| n.id.clone())
            .collect();
        let placement = if up.is_empty() {
            Vec::new()
        } else {
            (0..spec.shard_count as usize)
                .map(|s| {
                    (0..spec.replication_factor as usize)
                        .map(|r| up[(s + r) % up.len()].clone())
                        .collect()
                })
                .collect()
        };
        Command::CreateCollectionPlaced { spec, placement }
    }

    /// A shard's primary and its other replicas' nodes.
    pub fn primary_and_backups(s: &Shard) -> (String, Vec<String>) {
        let primary = s.primary.clone().unwrap();
        let backups = s
            .replicas
            .iter()
            .map(|r| r.node.clone())
            .filter(|n| *n != primary)
            .collect();
        (primary, backups)
    }

    pub fn map_with_nodes(n: usize) -> ClusterMap {
        let mut m = ClusterMap::default();
        for i in 0..n {
            let id = format!("n{i}");
            m.apply(&node(&id, &format!("z{}", i % 3))).unwrap();
            m.apply(&up(&id)).unwrap();
        }
        m
    }

    #[test]
    fn undrain_cancels_a_drain_whatever_the_liveness() {
        let mut m = map_with_nodes(2);
        let drain = |id: &str| Command::SetNodeState {
            id: id.into(),
            state: NodeState::Draining,
            from: vec![],
        };
        m.apply(&drain("n0")).unwrap();
        m.apply(&Command::Undrain { id: "n0".into() }).unwrap();
        assert_eq!(
            (m.nodes["n0"].state, m.nodes["n0"].draining),
            (NodeState::Up, false)
        );
        // A silent draining node keeps its liveness; it comes back up, not draining.
        m.apply(&drain("n1")).unwrap();
        m.apply(&Command::SetNodeState {
            id: "n1".into(),
            state: NodeState::Suspect,
            from: vec![],
        })
        .unwrap();
        m.apply(&Command::Undrain { id: "n1".into() }).unwrap();
        let n1 = &m.nodes["n1"];
        assert_eq!(
            (n1.state, n1.draining, n1.live_state()),
            (NodeState::Suspect, false, NodeState::Up)
        );
        let v = m.version;
        let e = m.apply(&Command::Undrain { id: "n1".into() }).unwrap_err();
        assert!(e.to_string().contains("not draining"), "{e}");
        assert!(m.apply(&Command::Undrain { id: "nx".into() }).is_err());
        assert_eq!(m.version, v, "a refused command changes nothing");
    }

    #[test]
    fn a_collection_policy_changes_only_for_the_collection_it_names() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("docs", 2, 1))).unwrap();
        let id = m.collections["docs"].id;
        let off = CollectionPolicy {
            auto_rebuild_rows: Some(0),
            payload_fields: Vec::new(),
        };
        let set = |name: &str, id: u64| Command::SetCollectionPolicy {
            name: name.into(),
            id,
            policy: off.clone(),
        };
        let changes = m.apply(&set("docs", id)).unwrap();
        assert!(
            matches!(&changes[..], [Change::CollectionPut(c)] if c.policy == off),
            "{changes:?}"
        );
        // Another incarnation of the name, or no such collection: refused, nothing changes.
        let v = m.version;
        assert!(m.apply(&set("docs", id + 1)).is_err());
        assert!(m.apply(&set("nope", id)).is_err());
        assert_eq!(m.version, v);
        assert_eq!(m.collections["docs"].policy, off);
        // Indexed fields (issue 22): a malformed or repeated path is refused whole.
        let field = |p: &str| PayloadField::parse(p).unwrap();
        for bad in [
            vec![field("a..b:number")],
            vec![field("year:number"), field("year:keyword")],
            vec![field(".x:keyword")],
        ] {
            let cmd = Command::SetCollectionPolicy {
                name: "docs".into(),
                id,
                policy: CollectionPolicy {
                    payload_fields: bad,
                    ..off.clone()
                },
            };
            assert!(m.apply(&cmd).is_err());
            assert_eq!(m.version, v);
        }
        let fields = vec![field("year:number"), field("author.name:keyword")];
        let cmd = Command::SetCollectionPolicy {
            name: "docs".into(),
            id,
            policy: CollectionPolicy {
                payload_fields: fields.clone(),
                ..off.clone()
            },
        };
        m.apply(&cmd).unwrap();
        assert_eq!(m.collections["docs"].policy.payload_fields, fields);
    }

    #[test]
    fn a_shard_is_named_by_its_collection_incarnation() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("docs", 2, 2))).unwrap();
        let first = m.collections["docs"].id;
        assert!(m.shard_named("docs", first, 1).is_some());
        m.apply(&Command::DropCollection {
            name: "docs".into(),
        })
        .unwrap();
        m.apply(&placed(&m, spec("docs", 2, 2))).unwrap();
        let second = m.collections["docs"].id;
        assert_ne!(first, second);
        // A report from a replica of the dropped incarnation names nothing.
        assert!(m.shard_named("docs", first, 1).is_none());
        assert_eq!(
            m.shard_named("docs", second, 1).map(|s| s.collection_id),
            Some(second)
        );
        assert!(m.shard_named("docs", second, 2).is_none());
    }

    #[test]
    fn create_assigns_distinct_nodes_and_bumps_version() {
        let mut m = map_with_nodes(3);
        let v = m.version;
        let changes = m.apply(&placed(&m, spec("docs", 4, 2))).unwrap();
        assert_eq!(m.version, v + 1);
        assert_eq!(changes.len(), 1 + 4);
        for s in m.shards_of("docs") {
            assert_eq!(s.replicas.len(), 2);
            assert_ne!(s.replicas[0].node, s.replicas[1].node);
            assert_eq!(s.primary.as_ref(), Some(&s.replicas[0].node));
        }
    }

    #[test]
    fn bad_specs_are_refused_and_change_nothing() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("docs", 1, 1))).unwrap();
        let before = m.clone();
        let cases: Vec<(CollectionSpec, &str)> = vec![
            (spec("docs", 1, 1), "already exists"),
            (spec("", 1, 1), "name"),
            (spec("a b", 1, 1), "name"),
            (
                CollectionSpec {
                    dimension: 0,
                    ..spec("x", 1, 1)
                },
                "dimension 0",
            ),
            (
                CollectionSpec {
                    dimension: 5000,
                    ..spec("x", 1, 1)
                },
                "dimension 5000",
            ),
            (spec("x", 0, 1), "shard_count 0"),
            (spec("x", 1025, 1), "shard_count 1025"),
            (spec("x", 1, 0), "replication_factor must"),
            (spec("x", 1, 3), "exceeds the 2 node"),
            (
                CollectionSpec {
                    write_quorum: 3,
                    ..spec("x", 1, 2)
                },
                "write_quorum 3 exceeds the replication_factor 2",
            ),
            (
                CollectionSpec {
                    index: IndexParams {
                        pq_m: 7,
                        ..IndexParams::defaults(384)
                    },
                    ..spec("x", 1, 1)
                },
                "pq_m 7 must divide",
            ),
            (
                CollectionSpec {
                    index: IndexParams {
                        pq_nbits: 17,
                        ..IndexParams::defaults(384)
                    },
                    ..spec("x", 1, 1)
                },
                "pq_nbits 17",
            ),
        ];
        for (s, want) in cases {
            let err = m.apply(&placed(&m, s.clone())).unwrap_err();
            assert!(err.to_string().contains(want), "{s:?}: {err}");
            assert_eq!(m, before, "{s:?} changed the map");
        }
        assert!(matches!(
            m.apply(&Command::DropCollection {
                name: "nope".into()
            }),
            Err(MapError::NotFound(_))
        ));
        assert_eq!(m, before);
    }

    #[test]
    fn promote_is_conditional_on_the_epoch_and_a_serving_replica() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 1, 2))).unwrap();
        let s = m.shards_of("c").next().unwrap().clone();
        let backup = s
            .replicas
            .iter()
            .find(|r| Some(&r.node) != s.primary.as_ref())
            .unwrap()
            .node
            .clone();
        let promote = |node: &str, epoch| Command::Promote {
            shard: s.key.clone(),
            node: node.into(),
            epoch,
        };
        // A decision made on an older epoch, or naming a node without a replica, is refused.
        assert!(m.apply(&promote(&backup, s.epoch + 5)).is_err());
        assert!(m.apply(&promote("nowhere", s.epoch)).is_err());
        m.apply(&promote(&backup, s.epoch)).unwrap();
        let s2 = &m.shards[&s.key];
        assert_eq!(s2.primary.as_deref(), Some(backup.as_str()));
        assert_eq!(s2.epoch, s.epoch + 1);
        // The same decision applied twice does not bump the epoch again.
        assert!(m.apply(&promote(&backup, s.epoch)).is_err());
        // A copy out of sync (the old primary, say) is promoted only accepting the loss.
        let old = s.primary.clone().unwrap();
        m.shards
            .get_mut(&s.key)
            .unwrap()
            .replicas
            .iter_mut()
            .for_each(|r| {
                if r.node == old {
                    r.state = ReplicaState::Copying;
                }
            });
        assert!(m.apply(&promote(&old, s.epoch + 1)).is_err());
        m.apply(&Command::PromoteAcceptingLoss {
            shard: s.key.clone(),
            node: old.clone(),
            epoch: s.epoch + 1,
        })
        .unwrap();
        let s3 = &m.shards[&s.key];
        assert_eq!(
            (s3.primary.as_deref(), s3.forced_epoch),
            (Some(old.as_str()), s.epoch + 2)
        );
        assert!(s3.replicas.iter().all(|r| r.state == ReplicaState::Serving));
    }

    #[test]
    fn drop_then_recreate_gets_a_new_id() {
        let mut m = map_with_nodes(1);
        m.apply(&placed(&m, spec("c", 2, 1))).unwrap();
        let id = m.collections["c"].id;
        m.apply(&Command::DropCollection { name: "c".into() })
            .unwrap();
        assert_eq!(m.shards_of("c").count(), 0);
        m.apply(&placed(&m, spec("c", 2, 1))).unwrap();
        assert!(m.collections["c"].id > id);
    }

    /// Issue 15: the leader's placement travels in the command; `apply` only checks it,
    /// and refuses one that does not fit the map, changing nothing.
    #[test]
    fn a_placed_collection_is_checked_not_placed_again() {
        let mut m = map_with_nodes(3);
        // An unplaced create never reaches the map: the leader places it first.
        let before = m.clone();
        let e = m
            .apply(&Command::CreateCollection(spec("c", 2, 2)))
            .unwrap_err();
        assert!(e.to_string().contains("no placement"), "{e}");
        assert_eq!(m, before);
        let placed = |placement: Vec<Vec<&str>>| Command::CreateCollectionPlaced {
            spec: spec("c", 2, 2),
            placement: placement
                .into_iter()
                .map(|s| s.into_iter().map(String::from).collect())
                .collect(),
        };
        for bad in [
            vec![vec!["n0", "n1"]],
            vec![vec!["n0", "n1"], vec!["n2", "n2"]],
            vec![vec!["n0", "n1"], vec!["n2"]],
            vec![vec!["n0", "n1"], vec!["n2", "elsewhere"]],
        ] {
            let before = m.clone();
            assert!(m.apply(&placed(bad.clone())).is_err(), "{bad:?}");
            assert_eq!(m, before);
        }
        m.apply(&Command::SetNodeState {
            id: "n2".into(),
            state: NodeState::Down,
            from: vec![],
        })
        .unwrap();
        assert!(matches!(
            m.apply(&placed(vec![vec!["n0", "n1"], vec!["n2", "n0"]])),
            Err(MapError::FailedPrecondition(_))
        ));
        m.apply(&placed(vec![vec!["n1", "n0"], vec!["n0", "n1"]]))
            .unwrap();
        let shards: Vec<&Shard> = m.shards_of("c").collect();
        assert_eq!(shards[0].primary.as_deref(), Some("n1"));
        assert_eq!(shards[1].primary.as_deref(), Some("n0"));
        assert!(m
            .apply(&placed(vec![vec!["n1", "n0"], vec!["n0", "n1"]]))
            .is_err());
    }

    /// Issue 14: a replica its node reports failed leaves the quorum through the map
    /// (a copy until it catches up again); a failed primary hands over to a successor;
    /// the only serving replica stays.
    #[test]
    fn a_failed_replica_leaves_its_quorum_through_the_map() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 1, 2))).unwrap();
        let s = m.shards_of("c").next().unwrap().clone();
        let primary = s.primary.clone().unwrap();
        let backup = s
            .replicas
            .iter()
            .find(|r| r.node != primary)
            .unwrap()
            .node
            .clone();
        let failed = |node: &str, epoch, successor: Option<&str>| Command::ReplicaFailed {
            shard: s.key.clone(),
            node: node.into(),
            epoch,
            successor: successor.map(Into::into),
        };
        let state_of = |m: &ClusterMap, n: &str| {
            m.shards[&s.key]
                .replicas
                .iter()
                .find(|r| r.node == n)
                .unwrap()
                .state
        };
        // A primary needs a successor; a backup names none; a stale epoch is refused.
        assert!(m.apply(&failed(&primary, s.epoch, None)).is_err());
        assert!(m.apply(&failed(&primary, s.epoch, Some(&primary))).is_err());
        assert!(m.apply(&failed(&backup, s.epoch, Some(&primary))).is_err());
        assert!(m.apply(&failed(&backup, s.epoch + 1, None)).is_err());
        assert_eq!(m.shards[&s.key], s, "a refused command changed the shard");
        // The failed primary hands over under a new epoch and becomes a copy.
        m.apply(&failed(&primary, s.epoch, Some(&backup))).unwrap();
        let s2 = m.shards[&s.key].clone();
        assert_eq!(s2.primary.as_deref(), Some(backup.as_str()));
        assert_eq!(s2.epoch, s.epoch + 1);
        assert_eq!(state_of(&m, &primary), ReplicaState::Copying);
        // Now the new primary is the only serving replica: its failure is refused.
        assert!(m.apply(&failed(&backup, s2.epoch, Some(&primary))).is_err());
        // Reopened and caught up, the copy serves again, as a backup.
        m.apply(&Command::ReplicaReady {
            shard: s.key.clone(),
            node: primary.clone(),
        })
        .unwrap();
        assert_eq!(state_of(&m, &primary), ReplicaState::Serving);
        assert_eq!(m.shards[&s.key].primary.as_deref(), Some(backup.as_str()));
        // A failed backup just leaves the quorum.
        m.apply(&failed(&primary, s2.epoch, None)).unwrap();
        assert_eq!(state_of(&m, &primary), ReplicaState::Copying);
        assert_eq!(m.shards[&s.key].epoch, s2.epoch);
    }

    /// Issue 16: a backup leaves the in-sync set only at the shard's epoch, never the
    /// primary, and never below the collection's write quorum (2 at RF >= 2, or the
    /// explicit one); a copy joins on the word of the primary at the current epoch.
    #[test]
    fn the_in_sync_set_shrinks_to_the_write_quorum_and_grows_at_the_epoch() {
        for (rf, write_quorum, leaves) in [(3, 0, 1), (3, 1, 2), (3, 3, 0), (2, 0, 0)] {
            let mut m = map_with_nodes(3);
            let mut sp = spec("c", 1, rf);
            sp.write_quorum = write_quorum;
            m.apply(&placed(&m, sp)).unwrap();
            let s = m.shards_of("c").next().unwrap().clone();
            let (primary, backups) = primary_and_backups(&s);
            let leave = |node: &str, epoch| Command::LeaveInSync {
                shard: s.key.clone(),
                node: node.into(),
                epoch,
            };
            let case = format!("rf {rf}, write quorum {write_quorum}");
            assert!(m.apply(&leave(&primary, s.epoch)).is_err(), "{case}");
            if let Some(b) = backups.first() {
                assert!(m.apply(&leave(b, s.epoch + 1)).is_err(), "{case}");
            }
            let left = backups
                .iter()
                .filter(|b| m.apply(&leave(b, s.epoch)).is_ok())
                .count();
            assert_eq!(left, leaves, "{case}");
            let s2 = m.shards[&s.key].clone();
            assert_eq!(s2.epoch, s.epoch, "{case}: leaving is no new epoch");
            let copies: Vec<&Replica> = s2
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Copying)
                .collect();
            assert_eq!(copies.len(), leaves, "{case}");
            // A copy joins again only at the shard's epoch.
            if let Some(c) = copies.first() {
                let join = |epoch| Command::JoinInSync {
                    shard: s.key.clone(),
                    node: c.node.clone(),
                    epoch,
                };
                assert!(m.apply(&join(s.epoch + 1)).is_err(), "{case}");
                m.apply(&join(s.epoch)).unwrap();
                assert!(m.shards[&s.key]
                    .replicas
                    .iter()
                    .any(|r| r.node == c.node && r.state == ReplicaState::Serving));
            }
        }
    }

    /// Issue 16: a move's leaving source stays in the in-sync set (a backup's move at
    /// RF 2 keeps the shard's write quorum of two), and when it lags it leaves the
    /// shard (its copy fills from the primary), never below the write quorum.
    #[test]
    fn a_leaving_replica_counts_in_sync_until_it_lags() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 1, 2))).unwrap();
        let s = m.shards_of("c").next().unwrap().clone();
        let (primary, backups) = primary_and_backups(&s);
        let third = ["n0", "n1", "n2"]
            .into_iter()
            .find(|n| !s.holds(n))
            .unwrap()
            .to_string();
        m.apply(&Command::ApplyMoves(vec![Move::Add {
            shard: s.key.clone(),
            to: third.clone(),
            from: Some(backups[0].clone()),
        }]))
        .unwrap();
        let state = |m: &ClusterMap, n: &str| {
            m.shards[&s.key]
                .replicas
                .iter()
                .find(|r| r.node == n)
                .map(|r| r.state)
        };
        assert_eq!(state(&m, &backups[0]), Some(ReplicaState::Leaving));
        assert!(ReplicaState::Leaving.in_sync() && !ReplicaState::Copying.in_sync());
        let leave = |node: &str| Command::LeaveInSync {
            shard: s.key.clone(),
            node: node.into(),
            epoch: s.epoch,
        };
        // The copy is no member; the leaving backup is the write quorum's second.
        assert!(m.apply(&leave(&third)).is_err());
        let err = m.apply(&leave(&backups[0])).unwrap_err();
        assert!(err.to_string().contains("below its write quorum"), "{err}");
        // With an explicit quorum of 1 it may go: it leaves the shard, not to a copy.
        m.collections.get_mut("c").unwrap().spec.write_quorum = 1;
        m.apply(&leave(&backups[0])).unwrap();
        assert_eq!(state(&m, &backups[0]), None);
        assert_eq!(state(&m, &third), Some(ReplicaState::Copying));
        assert_eq!(m.shards[&s.key].primary.as_deref(), Some(primary.as_str()));
    }

    /// A shard with no serving copy left is re-created empty only on an operator's
    /// word, and never while a serving copy sits on a live node.
    #[test]
    fn allocate_empty_needs_every_serving_copy_gone() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("c", 1, 1))).unwrap();
        let key = m.shards.keys().next().unwrap().clone();
        let holder = m.shards[&key].replicas[0].node.clone();
        let other = if holder == "n0" { "n1" } else { "n0" };
        let err = m
            .apply(&Command::AllocateEmpty {
                shard: key.clone(),
                node: other.into(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("promote it instead"), "{err}");
        m.apply(&Command::SetNodeState {
            id: holder.clone(),
            state: NodeState::Down,
            from: vec![],
        })
        .unwrap();
        let epoch = m.shards[&key].epoch;
        m.apply(&Command::AllocateEmpty {
            shard: key.clone(),
            node: other.into(),
        })
        .unwrap();
        let s = &m.shards[&key];
        assert_eq!(s.primary.as_deref(), Some(other));
        assert_eq!(s.epoch, epoch + 1);
        assert!(s
            .replicas
            .iter()
            .any(|r| r.node == other && r.state == ReplicaState::Serving));
        // The old copy stays listed: if its node comes back, its data is still there.
        assert!(s.holds(&holder));
    }

    /// A restored collection (issue 20): each shard at its backup's epoch, its first
    /// node the primary restoring it, the others copies; no shard of it is created
    /// empty until its step is done, or an operator allocates it empty.
    #[test]
    fn a_restored_collection_waits_for_its_data_and_only_an_operator_ends_the_wait() {
        let mut m = map_with_nodes(3);
        let Command::CreateCollectionPlaced { spec, placement } = placed(&m, spec("r", 2, 2))
        else {
            unreachable!()
        };
        let restore = |epochs: Vec<u64>, url: &str| Command::RestoreCollection {
            spec: spec.clone(),
            placement: placement.clone(),
            epochs,
            url: url.into(),
            backup: "b1".into(),
            started_ms: 0,
        };
        // Refused whole: an epoch per shard, none 0, a bounded URL.
        for bad in [
            restore(vec![3], "/r"),
            restore(vec![3, 0], "/r"),
            restore(vec![3, 4], ""),
        ] {
            let before = m.clone();
            assert!(m.apply(&bad).is_err());
            assert_eq!(m, before);
        }
        m.apply(&restore(vec![3, 7], "/r")).unwrap();
        let op = m.operations.values().next().unwrap().clone();
        assert_eq!(op.kind.name(), "restore");
        let shards: Vec<Shard> = m.shards_of("r").cloned().collect();
        for (s, epoch) in shards.iter().zip([3, 7]) {
            assert_eq!((s.epoch, s.restoring), (epoch, Some(op.id)));
            for r in &s.replicas {
                let want = if Some(&r.node) == s.primary.as_ref() {
                    ReplicaState::Serving
                } else {
                    ReplicaState::Copying
                };
                assert_eq!(r.state, want, "{s:?}");
            }
        }
        // Shard 0 restored; shard 1 failed: it keeps waiting.
        m.apply(&Command::OperationStep {
            id: op.id,
            shard: 0,
            step: Step::Done { generation: 10 },
        })
        .unwrap();
        m.apply(&Command::OperationStep {
            id: op.id,
            shard: 1,
            step: Step::Failed {
                reason: "blob corrupt".into(),
            },
        })
        .unwrap();
        let (s0, s1) = (&m.shards[&shards[0].key], &m.shards[&shards[1].key]);
        assert_eq!((s0.restoring, s1.restoring), (None, Some(op.id)));
        assert!(matches!(
            m.operations[&op.id].outcome,
            Some(Outcome::Failed { .. })
        ));
        // The operator's word: shard 1 empty on its primary's node, the wait over.
        let node = s1.primary.clone().unwrap();
        m.apply(&Command::AllocateEmpty {
            shard: shards[1].key.clone(),
            node,
        })
        .unwrap();
        assert_eq!(m.shards[&shards[1].key].restoring, None);
        assert_eq!(m.shards[&shards[1].key].epoch, 8);
    }

    /// Lost shards restored into their collection: only where no serving copy is on a
    /// live node, onto an up node holding none of it, under a forced epoch past the
    /// backup's; the operation has a step for those shards only.
    #[test]
    fn lost_shards_are_restored_only_where_every_copy_is_gone() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 3, 1))).unwrap();
        let id = m.collections["c"].id;
        let key = |i| ShardKey {
            collection: "c".into(),
            index: i,
        };
        let holder = m.shards[&key(1)].primary.clone().unwrap();
        let other = m.nodes.keys().find(|n| **n != holder).unwrap().clone();
        let cmd = |node: &str, epoch| Command::RestoreShards {
            collection: "c".into(),
            collection_id: id,
            shards: [(1, (node.to_string(), epoch))].into(),
            url: "/r".into(),
            backup: "b".into(),
            started_ms: 0,
        };
        // Its copy is on a live node: not lost.
        let err = m.apply(&cmd(&other, 5)).unwrap_err();
        assert!(err.to_string().contains("not lost"), "{err}");
        m.apply(&Command::SetNodeState {
            id: holder.clone(),
            state: NodeState::Down,
            from: vec![],
        })
        .unwrap();
        // Not onto a node holding it, nor with epoch 0.
        let before = m.clone();
        assert!(m.apply(&cmd(&holder, 5)).is_err());
        assert!(m.apply(&cmd(&other, 0)).is_err());
        assert_eq!(m, before);
        m.apply(&cmd(&other, 5)).unwrap();
        let s = &m.shards[&key(1)];
        let op = m.operations.values().last().unwrap();
        assert_eq!(s.primary.as_deref(), Some(other.as_str()));
        assert_eq!((s.epoch, s.forced_epoch, s.restoring), (6, 6, Some(op.id)));
        assert_eq!(op.steps.keys().copied().collect::<Vec<_>>(), vec![1]);
        // The old copy stays listed: if its node comes back, the forced epoch rules.
        assert!(s.holds(&holder));
    }

    /// A map is imported only into a fresh group, which becomes that cluster at a
    /// version past any its nodes saw.
    #[test]
    fn an_exported_map_is_imported_only_into_a_fresh_group() {
        let mut old = map_with_nodes(2);
        old.apply(&Command::InitCluster { id: "old".into() })
            .unwrap();
        old.apply(&placed(&old, spec("c", 2, 1))).unwrap();
        let mut fresh = ClusterMap::default();
        fresh
            .apply(&Command::InitCluster { id: "new".into() })
            .unwrap();
        let import = Command::ImportMap {
            map: Box::new(old.clone()),
        };
        let changes = fresh.apply(&import).unwrap();
        assert_eq!(changes, vec![Change::Imported]);
        assert_eq!(fresh.cluster_id, "old");
        assert_eq!(fresh.version, old.version + IMPORT_VERSION_GAP);
        assert_eq!(
            (fresh.collections.clone(), fresh.shards.clone()),
            (old.collections.clone(), old.shards.clone())
        );
        // Not again, and never into a group that holds a cluster.
        let before = fresh.clone();
        assert!(fresh.apply(&import).is_err());
        assert_eq!(fresh, before);
        assert!(old.clone().apply(&import).is_err());
        // A map naming no cluster is refused.
        let mut fresh = ClusterMap::default();
        assert!(fresh
            .apply(&Command::ImportMap {
                map: Box::new(ClusterMap::default())
            })
            .is_err());
    }

    #[test]
    fn the_cluster_is_named_once() {
        let mut m = ClusterMap::default();
        m.apply(&Command::InitCluster { id: "a".into() }).unwrap();
        assert!(m.apply(&Command::InitCluster { id: "b".into() }).is_err());
        assert_eq!(m.cluster_id, "a");
    }

    #[test]
    fn moves_are_all_or_nothing_and_ready_retires_the_source() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 1, 1))).unwrap();
        let key = ShardKey {
            collection: "c".into(),
            index: 0,
        };
        let src = m.shards[&key].replicas[0].node.clone();
        let dst = ["n0", "n1", "n2"]
            .into_iter()
            .find(|n| *n != src)
            .unwrap()
            .to_string();
        let before = m.clone();
        let bad = vec![
            Move::Add {
                shard: key.clone(),
                to: dst.clone(),
                from: Some(src.clone()),
            },
            Move::Add {
                shard: key.clone(),
                to: dst.clone(),
                from: None,
            },
        ];
        assert!(m.apply(&Command::ApplyMoves(bad)).is_err());
        assert_eq!(m, before);
        m.apply(&Command::ApplyMoves(vec![Move::Add {
            shard: key.clone(),
            to: dst.clone(),
            from: Some(src.clone()),
        }]))
        .unwrap();
        assert_eq!(m.shards[&key].replicas.len(), 2);
        m.apply(&Command::ReplicaReady {
            shard: key.clone(),
            node: dst.clone(),
        })
        .unwrap();
        let s = &m.shards[&key];
        assert_eq!(s.replicas.len(), 1);
        assert_eq!(s.replicas[0].node, dst);
        assert_eq!(s.replicas[0].state, ReplicaState::Serving);
        assert_eq!(s.primary.as_ref(), Some(&dst));
    }
}
