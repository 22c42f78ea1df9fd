//! One coordinator member: its Raft instance, the applied map, and the leader-only
//! duties (node liveness and placement).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ServerState;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use shoal_proto::raft::raft_client::RaftClient;

use shoal_proto::limits::Limits;

use crate::config::Config;
use crate::error::{CoordinatorError, Result};
use crate::map::{ClusterMap, Command, MapError, NodeId, NodeState, ReplicaState, Shard, ShardKey};
use crate::network;
use crate::placement;
use crate::raft::{open, payload, Member, Raft, Request, Response};
use crate::store::StateMachine;

/// Replica reports by node, then shard: a heartbeat replaces its node's entry whole.
#[derive(Clone, Default)]
pub struct Reports(HashMap<String, HashMap<ShardKey, shoal_proto::coordinator::ReplicaReport>>);

impl Reports {
    pub fn get(
        &self,
        shard: &ShardKey,
        node: &str,
    ) -> Option<&shoal_proto::coordinator::ReplicaReport> {
        self.0.get(node)?.get(shard)
    }

    /// `node`'s last reported position in `shard`: (epoch, seq) of its last batch.
    pub fn position(&self, shard: &ShardKey, node: &str) -> Option<(u64, u64)> {
        self.get(shard, node).map(|r| (r.last_epoch, r.applied_seq))
    }
}

/// Whether `node`'s replica of `shard` may take the primary role without losing an
/// acknowledged write: its node is live and its last report holds `floor` (the
/// primary's position: its last report for an operator's promotion, the position it
/// states for its own handover). `doing` names the action in the refusal.
pub fn may_take_over(
    map: &ClusterMap,
    reports: &Reports,
    shard: &ShardKey,
    node: &str,
    floor: Option<(u64, u64)>,
    doing: &str,
) -> std::result::Result<(), MapError> {
    if !map.nodes.get(node).is_some_and(|n| n.state.is_live()) {
        return Err(MapError::FailedPrecondition(format!(
            "node {node:?} is not up: {doing} refused (only an operator's promotion with \
             accept_data_loss may promote it)"
        )));
    }
    let target = reports.position(shard, node).ok_or_else(|| {
        MapError::FailedPrecondition(format!(
            "no report yet from the replica of {shard} on {node:?}; retry after its next heartbeat"
        ))
    })?;
    match floor {
        Some(floor) if target < floor => Err(MapError::FailedPrecondition(format!(
            "the replica of {shard} on {node:?} is behind the primary (epoch {} seq {} < \
             epoch {} seq {}); {doing} would lose acknowledged writes unless \
             accept_data_loss (or retry after its next heartbeat)",
            target.0, target.1, floor.0, floor.1
        ))),
        _ => Ok(()),
    }
}

/// How long a planned primary move is asked of the primary before the leader gives
/// up (the primary keeps its role). The primary stops writes for a few seconds of it
/// at most per attempt (the node's side).
pub const ASK_FOR: Duration = Duration::from_secs(10);

/// A planned move of a shard's primary role (an operator's promote, evening out
/// primaries), asked of the primary at `epoch` with its heartbeat answers until
/// `until`: it stops writes, waits until `to` holds every write it logged, and hands
/// the role over ([`Coordinator::hand_over`]), so no write is acknowledged at `epoch`
/// once `to` leads (issue 16; the map alone switching the primary would leave the old
/// one acknowledging until it heard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub epoch: u64,
    pub to: NodeId,
    pub until: Instant,
}

/// Pure: the asks due to `node`'s primaries at `now` (for shards it still leads at
/// the asked epoch), and whether each ask still stands (to prune the rest).
pub fn asks_for<'a>(
    map: &'a ClusterMap,
    asks: &'a HashMap<ShardKey, Ask>,
    node: &'a str,
    now: Instant,
) -> impl Iterator<Item = (&'a Shard, &'a Ask)> {
    asks.iter().filter_map(move |(k, a)| {
        let s = map.shards.get(k)?;
        (s.primary.as_deref() == Some(node) && s.epoch == a.epoch && now < a.until)
            .then_some((s, a))
    })
}

/// A follower's forwarded write, as the leader answers it.
#[derive(Serialize, Deserialize)]
pub enum ForwardReply {
    Applied(Response),
    NotLeader,
    Failed(String),
}

/// A follower's read-index request, as the leader answers it.
#[derive(Serialize, Deserialize)]
pub enum ReadIndexReply {
    Index(Option<u64>),
    NotLeader,
    Failed(String),
}

/// Who leads the group, as one member's Raft metrics say.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Leadership {
    /// This member.
    Me,
    /// Another member, with its addresses when the membership names it.
    Other { id: u64, member: Option<Member> },
    /// No leader known (an election, or this member just started).
    Unknown,
}

/// Pure: the leadership `metrics` show to member `me` (the one rule `write`,
/// `require_leader` and the leader's duties follow). A Raft leader whose lease has
/// lapsed (`lease_held`: a quorum acknowledged it within the lease, see
/// [`Coordinator::confirm_leadership`]) is not taken for the leader: a member cut off
/// from the others stops answering heartbeats and acting on the map before another
/// member can be elected (openraft 0.9 has no check-quorum of its own).
fn leadership(
    me: u64,
    metrics: &openraft::RaftMetrics<u64, Member>,
    lease_held: bool,
) -> Leadership {
    if metrics.state == ServerState::Leader {
        return if lease_held {
            Leadership::Me
        } else {
            Leadership::Unknown
        };
    }
    match metrics.current_leader {
        Some(id) if id != me => Leadership::Other {
            id,
            member: metrics
                .membership_config
                .nodes()
                .find(|(n, _)| **n == id)
                .map(|(_, m)| m.clone()),
        },
        _ => Leadership::Unknown,
    }
}

/// How long a write waits for a leader before giving up.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

pub struct Coordinator {
    pub id: u64,
    pub raft: Raft,
    pub sm: StateMachine,
    pub config: Arc<Config>,
    /// Last heartbeat per worker node (leader's view only; not replicated).
    heartbeats: Mutex<HashMap<String, Instant>>,
    /// When a quorum last acknowledged this member as leader, and in which term (timed
    /// from before the round that confirmed it): the leader's lease, see
    /// [`Coordinator::leadership`]. It counts only in the term it was won in.
    quorum_at: Mutex<Option<(u64, Instant)>>,
    /// When this member last became leader: nodes it has not heard from yet get their
    /// timeouts counted from here, so a failover does not declare everyone suspect.
    leader_since: Mutex<Option<Instant>>,
    /// Since when the settled cluster's primaries have been uneven (leader only).
    uneven_since: Mutex<Option<Instant>>,
    /// Since when this leader has seen each running split (leader memory: a new
    /// leader gives a split the whole `split_seal_timeout_ms` again).
    splits_since: Mutex<HashMap<u64, Instant>>,
    /// Each hosted replica's last report, by (shard, node): sequence numbers, index
    /// generation. Leader memory, rebuilt from heartbeats after a failover.
    pub reports: Mutex<Reports>,
    /// Each node's data volume against the disk watermarks, from its last heartbeat
    /// (leader memory, like `reports`).
    disks: Mutex<HashMap<String, placement::DiskLevel>>,
    /// Planned primary moves asked of primaries, by shard (leader memory): each
    /// primary named hands its role over itself (issue 16), see [`Ask`].
    asks: Mutex<HashMap<ShardKey, Ask>>,
    /// Set when the member shuts down; long-lived streams watch it.
    pub stopping: tokio::sync::watch::Sender<bool>,
    pub limits: Limits,
    /// API keys on or off, and the root key (issue 17); the keys are in the map.
    pub keys: shoal_proto::auth::Keys,
}

impl Coordinator {
    pub fn new(id: u64, raft: Raft, sm: StateMachine, config: Arc<Config>, limits: Limits) -> Self {
        Self {
            limits,
            id,
            raft,
            sm,
            config,
            heartbeats: Mutex::default(),
            asks: Mutex::default(),
            reports: Mutex::default(),
            disks: Mutex::default(),
            leader_since: Mutex::default(),
            quorum_at: Mutex::default(),
            uneven_since: Mutex::default(),
            splits_since: Mutex::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            keys: shoal_proto::auth::Keys::off(),
        }
    }

    /// With API keys on (see [`shoal_proto::auth::Keys`]).
    pub fn with_keys(mut self, keys: shoal_proto::auth::Keys) -> Self {
        self.keys = keys;
        self
    }

    /// Commits `cmd` through the leader (forwarding if this member is a follower) and
    /// returns the map version it produced.
    pub async fn write(&self, cmd: Command) -> Result<u64> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        // The leader decides what the command leaves open; a follower forwards it as
        // it is and the leader decides on receipt. Decided on every attempt, by the
        // member that proposes it: one that becomes leader between attempts decides
        // then (proposing an undecided create would be refused when applied).
        // A member that knows of no leader for longer than an election takes is cut off
        // from its group (or the group has no majority): it says so, and the client
        // tries another member, rather than holding the call for the whole deadline.
        let mut leaderless_since: Option<Instant> = None;
        let election = Duration::from_millis(self.config.election_timeout_max_ms * 2);
        loop {
            let leadership = self.leadership();
            if let Leadership::Unknown = leadership {
                let since = *leaderless_since.get_or_insert_with(Instant::now);
                if since.elapsed() > election {
                    return Err(CoordinatorError::NoLeader);
                }
            } else {
                leaderless_since = None;
            }
            let proposal = if let Leadership::Me = leadership {
                self.decide(cmd.clone())?
            } else if Self::needs_leader(&cmd) {
                // Not proposed here: only the leader may decide it. To the leader the
                // metrics name, or wait for one.
                if let Leadership::Other {
                    member: Some(node), ..
                } = leadership
                {
                    match self.forward(&node, &cmd).await? {
                        ForwardReply::Applied(r) => return finish(r),
                        ForwardReply::Failed(e) => return Err(CoordinatorError::Raft(e)),
                        ForwardReply::NotLeader => {}
                    }
                }
                if Instant::now() > deadline {
                    return Err(CoordinatorError::NoLeader);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            } else {
                cmd.clone()
            };
            // A leader cut off from its group never commits: once it has not counted
            // as leader for an election's time, the outcome is unknown (the proposal
            // commits only if it regains its group while still leading) and the client
            // is told to try elsewhere.
            let lost = async {
                let mut since: Option<Instant> = None;
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Leadership::Me = self.leadership() {
                        since = None;
                    } else if since.get_or_insert_with(Instant::now).elapsed() > election {
                        return;
                    }
                }
            };
            let written = tokio::select! {
                r = self.raft.client_write(Request { command: proposal }) => r,
                () = lost => return Err(CoordinatorError::LeadershipLost),
            };
            match written {
                Ok(r) => return finish(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(node) = f.leader_node {
                        match self.forward(&node, &cmd).await? {
                            ForwardReply::Applied(r) => return finish(r),
                            ForwardReply::Failed(e) => return Err(CoordinatorError::Raft(e)),
                            ForwardReply::NotLeader => {}
                        }
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    return Err(CoordinatorError::Raft(e.to_string()))
                }
                Err(RaftError::Fatal(e)) => return Err(CoordinatorError::Raft(e.to_string())),
            }
            if Instant::now() > deadline {
                return Err(CoordinatorError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Commands only the leader may propose (it decides what they leave open).
    fn needs_leader(cmd: &Command) -> bool {
        matches!(cmd, Command::CreateCollection(_))
            || matches!(cmd, Command::RestoreCollection { placement, .. } if placement.is_empty())
    }

    /// Who leads, as this member's Raft metrics and its lease say now.
    fn leadership(&self) -> Leadership {
        let metrics = self.raft.metrics().borrow().clone();
        let held = self.quorum_at.lock().is_some_and(|(term, t)| {
            term == metrics.current_term && t.elapsed() < self.leader_lease()
        });
        leadership(self.id, &metrics, held)
    }

    /// How long a quorum's acknowledgement keeps this member the leader: the shortest
    /// election timeout. A follower that heard from this leader at `t` does not vote
    /// for another before `t + election_timeout_min`, and the acknowledgement is
    /// timed from before the round that collected it, so no other member can have
    /// been elected while the lease holds (with clocks whose rates agree closely; the
    /// confirmation repeats every Raft heartbeat, so the lease is rarely near its end).
    fn leader_lease(&self) -> Duration {
        Duration::from_millis(self.config.election_timeout_min_ms)
    }

    /// One round of the leader's lease: while the Raft core says this member leads, a
    /// ReadIndex round (`ensure_linearizable`: a quorum acknowledges the leader) renews
    /// the lease from the time the round started. Run every Raft heartbeat.
    pub async fn confirm_leadership(&self) {
        let (state, term) = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            (m.state, m.current_term)
        };
        if state != ServerState::Leader {
            *self.quorum_at.lock() = None;
            return;
        }
        let started = Instant::now();
        match tokio::time::timeout(self.leader_lease(), self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => {
                let mut q = self.quorum_at.lock();
                if q.is_none_or(|(t0, at)| t0 < term || (t0 == term && at < started)) {
                    *q = Some((term, started));
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "leadership not confirmed"),
            Err(_) => tracing::debug!("leadership not confirmed within the lease"),
        }
    }

    /// The leader's decisions inside a command, made from its own view before the
    /// command is proposed: a new collection's placement (with the nodes' disk levels,
    /// which only the leader holds), so that applying the log never runs placement.
    fn decide(&self, cmd: Command) -> Result<Command> {
        Ok(match cmd {
            Command::CreateCollection(spec) => {
                let placement = self.place_new(&spec)?;
                Command::CreateCollectionPlaced { spec, placement }
            }
            // A restore is placed as a new collection is (issue 20).
            Command::RestoreCollection {
                spec,
                placement,
                epochs,
                url,
                backup,
                started_ms,
            } if placement.is_empty() => {
                let placement = self.place_new(&spec)?;
                Command::RestoreCollection {
                    spec,
                    placement,
                    epochs,
                    url,
                    backup,
                    started_ms,
                }
            }
            other => other,
        })
    }

    /// A new collection's replicas, placed on the map as it stands (with the disk levels).
    fn place_new(&self, spec: &crate::map::CollectionSpec) -> Result<Vec<Vec<String>>> {
        let disk = self.disk_levels();
        let st = self.sm.state.lock();
        st.map.check_new_collection(spec)?;
        Ok(placement::initial(&st.map, spec, &disk).map_err(MapError::FailedPrecondition)?)
    }

    /// Nodes whose data volume is over a disk watermark, by their last heartbeat.
    fn disk_levels(&self) -> BTreeMap<String, placement::DiskLevel> {
        self.disks
            .lock()
            .iter()
            .filter(|(_, l)| **l != placement::DiskLevel::Ok)
            .map(|(n, l)| (n.clone(), *l))
            .collect()
    }

    /// Sends a write to the leader. A transport failure after sending leaves the outcome
    /// unknown (the leader may have committed it), so it is not retried here.
    async fn forward(&self, leader: &Member, cmd: &Command) -> Result<ForwardReply> {
        let channel = network::channel(&leader.raft_addr)
            .map_err(|e| CoordinatorError::Unknown(e.to_string()))?;
        let mut req = tonic::Request::new(payload(&Request {
            command: cmd.clone(),
        }));
        req.set_timeout(WRITE_DEADLINE);
        match RaftClient::new(channel).forward(req).await {
            Ok(r) => open(r.get_ref()).map_err(|e| CoordinatorError::Raft(e.to_string())),
            Err(s) if s.code() == tonic::Code::Unavailable => Ok(ForwardReply::NotLeader),
            Err(s) => Err(CoordinatorError::Unknown(format!(
                "forwarding to the leader failed: {}",
                s.message()
            ))),
        }
    }

    /// The leader's side of a forwarded write.
    pub async fn handle_forward(&self, req: Request) -> ForwardReply {
        // A command the leader cannot decide is proposed as it is: applying it gives
        // the typed error (a name taken, too few nodes up).
        let req = match self.decide(req.command.clone()) {
            Ok(command) => Request { command },
            Err(_) => req,
        };
        match self.raft.client_write(req).await {
            Ok(r) => ForwardReply::Applied(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                ForwardReply::NotLeader
            }
            Err(e) => ForwardReply::Failed(e.to_string()),
        }
    }

    /// The leader's side of a read-index request.
    pub async fn handle_read_index(&self) -> ReadIndexReply {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => ReadIndexReply::Index(log_id.map(|l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                ReadIndexReply::NotLeader
            }
            Err(e) => ReadIndexReply::Failed(e.to_string()),
        }
    }

    /// The map, linearizably: it reflects every write acknowledged before the call.
    /// On a follower this is the ReadIndex protocol: the leader confirms its leadership
    /// and names its commit index, and this member waits until it has applied that far.
    pub async fn read(&self) -> Result<ClusterMap> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        loop {
            match self.raft.ensure_linearizable().await {
                Ok(_) => return Ok(self.sm.state.lock().map.clone()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    if let Some(node) = f.leader_node {
                        if let Some(index) = self.read_index_from(&node).await? {
                            let left = deadline.saturating_duration_since(Instant::now());
                            self.raft
                                .wait(Some(left))
                                .applied_index_at_least(index, "linearizable read")
                                .await
                                .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
                            return Ok(self.sm.state.lock().map.clone());
                        }
                    }
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {}
                Err(RaftError::Fatal(e)) => return Err(CoordinatorError::Raft(e.to_string())),
            }
            if Instant::now() > deadline {
                return Err(CoordinatorError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `Some(Some(i))`: wait for index i; `Some(None)`: nothing to wait for (nothing
    /// committed); `None`: that member is not the leader any more, ask again.
    async fn read_index_from(&self, leader: &Member) -> Result<Option<Option<u64>>> {
        let channel = network::channel(&leader.raft_addr)
            .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        let mut req = tonic::Request::new(payload(&()));
        req.set_timeout(Duration::from_secs(3));
        match RaftClient::new(channel).read_index(req).await {
            Ok(r) => match open(r.get_ref()).map_err(|e| CoordinatorError::Raft(e.to_string()))? {
                ReadIndexReply::Index(i) => Ok(Some(i)),
                ReadIndexReply::NotLeader => Ok(None),
                ReadIndexReply::Failed(e) => Err(CoordinatorError::Raft(e)),
            },
            Err(_) => Ok(None),
        }
    }

    /// Records a worker node's heartbeat (on the leader) and reports copies it finished.
    pub async fn heartbeat(
        &self,
        node: &str,
        cluster: &str,
        replicas: Vec<shoal_proto::coordinator::ReplicaReport>,
        disk: (u64, u64, u64),
    ) -> Result<(u64, NodeState)> {
        self.require_leader()?;
        self.check_cluster(&format!("node {node:?}"), cluster)?;
        shoal_proto::within!(
            self.limits,
            reports_per_heartbeat,
            replicas.len(),
            "the heartbeat's replica reports"
        )?;
        // Only registered nodes are remembered: an unknown id keeps nothing here.
        if !self.sm.state.lock().map.nodes.contains_key(node) {
            return Err(CoordinatorError::Map(MapError::NotFound(format!(
                "node {node:?} is not registered"
            ))));
        }
        self.heartbeats
            .lock()
            .insert(node.to_string(), Instant::now());
        let (free, trash, total) = disk;
        let level = if self.config.disk_threshold_enabled {
            placement::disk_level(
                free,
                trash,
                total,
                self.config.disk_low_watermark,
                self.config.disk_high_watermark,
            )
        } else {
            placement::DiskLevel::Ok
        };
        let was = self.disks.lock().insert(node.to_string(), level);
        if was != Some(level) && level != placement::DiskLevel::Ok {
            tracing::warn!(
                node,
                ?level,
                free,
                trash,
                total,
                "node's data volume is over a disk watermark"
            );
        }
        // Index generations the primaries serve and build now go into the map (durable,
        // watched).
        let mut generations = Vec::new();
        // Shards whose primary (this node) found a replica ahead of itself.
        let mut superseded = Vec::new();
        // Serving replicas here that report a failure: they leave their quorum.
        let mut failed = Vec::new();
        // The in-sync set changes this node's primaries ask for.
        let mut in_sync = Vec::new();
        {
            let mut mine = HashMap::with_capacity(replicas.len());
            let st = self.sm.state.lock();
            for r in replicas {
                // Reports are kept for the replicas the map places here, nothing else.
                let Some(s) = r
                    .shard
                    .as_ref()
                    .and_then(|id| {
                        st.map
                            .shard_named(&id.collection, id.collection_id, id.index)
                    })
                    .filter(|s| s.holds(node))
                else {
                    continue;
                };
                let key = s.key.clone();
                // A split's fork (issue 19): its position is all the leader reads
                // (`split::cut_over`); it has no in-sync set, generations or
                // operations of its own until the cut-over.
                if s.forking() {
                    mine.insert(key, r);
                    continue;
                }
                in_sync.extend(Self::in_sync_changes(&st.map, s, node, &r));
                if s.primary.as_deref() == Some(node) && !r.ahead.is_empty() {
                    superseded.push((key.clone(), (r.last_epoch, r.applied_seq)));
                }
                let mut r = r;
                if !r.failed.is_empty() {
                    r.failed.truncate(r.failed.floor_char_boundary(1024));
                    if s.replicas
                        .iter()
                        .any(|x| x.node == node && x.state == ReplicaState::Serving)
                    {
                        failed.push((key.clone(), r.failed.clone()));
                    }
                }
                // The operation steps its primary's report ends (builds, rebuilds,
                // compactions, backups and restores).
                if s.primary.as_deref() == Some(node) {
                    generations.extend(operation_steps(&st.map, &key, node, &r));
                }
                // A sealed primary with nothing in flight names where its log ends.
                if let Some(crate::split::SplitRole::Sealed { operation, .. }) = &s.split {
                    let at = crate::split::SealPoint {
                        epoch: s.epoch,
                        seq: r.applied_seq,
                        batch_epoch: r.last_epoch,
                    };
                    if s.primary.as_deref() == Some(node)
                        && r.sealed
                        && r.epoch == s.epoch
                        && s.seal_point() != Some(at)
                    {
                        generations.push(Command::SplitSealed {
                            shard: key.clone(),
                            operation: *operation,
                            at,
                        });
                    }
                }
                {
                    if s.primary.as_deref() == Some(node)
                        && (r.serving_generation > s.serving_generation
                            || r.building_generation != s.building_generation)
                    {
                        generations.push(Command::SetGenerations {
                            shard: key.clone(),
                            serving: r.serving_generation.max(s.serving_generation),
                            building: r.building_generation,
                        });
                    }
                }
                mine.insert(key, r);
            }
            drop(st);
            self.reports.lock().0.insert(node.to_string(), mine);
        }
        for c in generations {
            if let Err(e) = self.write(c).await {
                tracing::debug!(error = %e, "generation update not applied");
            }
        }
        for c in in_sync {
            tracing::info!(change = ?c, "in-sync set change asked by the primary");
            if let Err(e) = self.write(c).await {
                tracing::info!(error = %e, "in-sync set change not applied");
            }
        }
        // A primary behind one of its replicas (its data lost or older) hands the role
        // to the most up-to-date replica, which must be ahead of it.
        if !superseded.is_empty() {
            let map = self.sm.state.lock().map.clone();
            for (key, own) in superseded {
                let Some(s) = map.shards.get(&key) else {
                    continue;
                };
                match placement::successor(&map, s, |n| self.position(&key, n)) {
                    Some((to, pos)) if pos > own => {
                        tracing::warn!(shard = %key, from = node, to = %to, from_position = ?own, to_position = ?pos, "primary is behind a replica; promoting the replica");
                        let cmd = Command::Promote {
                            shard: key.clone(),
                            node: to,
                            epoch: s.epoch,
                        };
                        if let Err(e) = self.write(cmd).await {
                            tracing::warn!(error = %e, "promotion not applied");
                        }
                    }
                    _ => {
                        tracing::debug!(shard = %key, "primary reports a replica ahead; waiting for its report")
                    }
                }
            }
        }
        if !failed.is_empty() {
            let map = self.sm.state.lock().map.clone();
            for c in Self::failures(&map, node, &failed, |k, n| self.position(k, n)) {
                if let Err(e) = self.write(c).await {
                    tracing::warn!(error = %e, "a failed replica stays in its quorum");
                }
            }
        }
        let (state, live) = {
            let st = self.sm.state.lock();
            let n = st.map.nodes.get(node).ok_or_else(|| {
                CoordinatorError::Map(crate::map::MapError::NotFound(format!(
                    "node {node:?} is not registered"
                )))
            })?;
            (n.state, n.live_state())
        };
        let mut version = self.sm.state.lock().map.version;
        let wanted = match state {
            NodeState::Joining | NodeState::Suspect => Some(live),
            _ => None,
        };
        if let Some(to) = wanted {
            version = self
                .write(Command::SetNodeState {
                    id: node.to_string(),
                    state: to,
                    from: vec![state],
                })
                .await?;
        }
        let state = self.sm.state.lock().map.nodes[node].state;
        Ok((version, state))
    }

    /// A replica's last reported position, (epoch of its last batch, sequence).
    fn position(&self, shard: &ShardKey, node: &str) -> Option<placement::Position> {
        self.reports
            .lock()
            .get(shard, node)
            .map(|r| (r.last_epoch, r.applied_seq))
    }

    /// Promotions for `shards`: each to its most up-to-date serving replica on a live
    /// node by the replicas' reports ([`placement::successor`]), none where no such
    /// replica has reported.
    fn promotions<'a>(
        &self,
        map: &ClusterMap,
        shards: impl IntoIterator<Item = &'a ShardKey>,
    ) -> Vec<Command> {
        shards
            .into_iter()
            .filter_map(|k| {
                let s = map.shards.get(k)?;
                let (to, pos) = placement::successor(map, s, |n| self.position(k, n))?;
                tracing::info!(shard = %k, from = ?s.primary, to = %to, position = ?pos, epoch = s.epoch + 1, "promoting the most up-to-date replica");
                Some(Command::Promote {
                    shard: k.clone(),
                    node: to,
                    epoch: s.epoch,
                })
            })
            .collect()
    }

    /// Pure: the map changes for replicas on `node` that report a failure (issue 14):
    /// each leaves its shard's quorum; a failed primary hands its role to the most
    /// up-to-date other serving replica ([`placement::successor`]). A replica that is
    /// its shard's only serving one, or a primary with no successor that has reported,
    /// stays (the shard's writes fail until its node reopens it).
    fn failures(
        map: &ClusterMap,
        node: &str,
        failed: &[(ShardKey, String)],
        position: impl Fn(&ShardKey, &str) -> Option<placement::Position>,
    ) -> Vec<Command> {
        failed
            .iter()
            .filter_map(|(k, why)| {
                let s = map.shards.get(k)?;
                let others = s
                    .replicas
                    .iter()
                    .any(|r| r.node != node && r.state == ReplicaState::Serving);
                if !others {
                    tracing::error!(shard = %k, node, failure = %why, "the shard's only serving replica failed; waiting for its node to reopen it");
                    return None;
                }
                let successor = if s.primary.as_deref() == Some(node) {
                    let Some((to, _)) = placement::successor(map, s, |n| position(k, n)) else {
                        tracing::error!(shard = %k, node, failure = %why, "a failed primary has no successor that has reported");
                        return None;
                    };
                    Some(to)
                } else {
                    None
                };
                tracing::warn!(shard = %k, node, failure = %why, successor = ?successor, "a failed replica leaves its shard's quorum");
                Some(Command::ReplicaFailed {
                    shard: k.clone(),
                    node: node.to_string(),
                    epoch: s.epoch,
                    successor,
                })
            })
            .collect()
    }

    /// Pure: the liveness transitions due, as conditional commands (each applies only
    /// from the state it was decided on): a node silent longer than `suspect` turns
    /// suspect (from up, joining or draining), a suspect one silent longer than `down`
    /// turns down. `silent(node)`: how long since its last heartbeat (or since this
    /// member became leader, whichever is later).
    fn liveness(
        map: &ClusterMap,
        silent: impl Fn(&str) -> Duration,
        suspect: Duration,
        down: Duration,
    ) -> Vec<Command> {
        map.nodes
            .values()
            .filter_map(|n| {
                let silent = silent(&n.id);
                let to = match n.state {
                    NodeState::Up | NodeState::Joining | NodeState::Draining
                        if silent > suspect =>
                    {
                        NodeState::Suspect
                    }
                    NodeState::Suspect if silent > down => NodeState::Down,
                    _ => return None,
                };
                tracing::warn!(node = %n.id, from = ?n.state, to = ?to, silent_ms = silent.as_millis() as u64, "node liveness change");
                Some(Command::SetNodeState {
                    id: n.id.clone(),
                    state: to,
                    from: vec![n.state],
                })
            })
            .collect()
    }

    /// Pure: the in-sync set changes a primary's report asks for (issue 16), as
    /// conditional commands at the shard's epoch: its lagging serving backups leave the
    /// set (where enough in-sync replicas stay), the copies it caught up and waits for
    /// join it. Only the shard's primary at the map's epoch speaks for its set; the
    /// lists are read no further than the shard has replicas.
    fn in_sync_changes(
        map: &ClusterMap,
        s: &crate::map::Shard,
        node: &str,
        r: &shoal_proto::coordinator::ReplicaReport,
    ) -> Vec<Command> {
        if s.primary.as_deref() != Some(node) || r.epoch != s.epoch {
            return Vec::new();
        }
        let state = |n: &str| s.replicas.iter().find(|x| x.node == n).map(|x| x.state);
        let leave = r
            .lagging
            .iter()
            .take(s.replicas.len())
            .filter(|n| map.check_leave_in_sync(&s.key, n, s.epoch).is_ok())
            .map(|n| Command::LeaveInSync {
                shard: s.key.clone(),
                node: n.clone(),
                epoch: s.epoch,
            });
        let join = r
            .in_sync
            .iter()
            .take(s.replicas.len())
            .filter(|n| state(n) == Some(ReplicaState::Copying))
            .map(|n| Command::JoinInSync {
                shard: s.key.clone(),
                node: n.clone(),
                epoch: s.epoch,
            });
        leave.chain(join).collect()
    }

    /// Pure: in-sync backups on nodes that turned suspect or down leave their shards'
    /// in-sync sets (issue 16; a leaving one leaves its shard), so their primaries stop waiting for them, wherever the
    /// collection's write quorum of in-sync replicas stays; a shard short of it keeps
    /// them (its writes could not be acknowledged anyway, and they stay promotable).
    fn out_of_sync(map: &ClusterMap) -> Vec<Command> {
        let away = |n: &str| {
            map.nodes
                .get(n)
                .is_some_and(|n| matches!(n.state, NodeState::Suspect | NodeState::Down))
        };
        let mut out = Vec::new();
        for s in map.shards.values().filter(|s| !s.forking()) {
            // One at a time per shard: each leaves only if the set stays large enough
            // after the ones before it.
            if let Some(r) = s.replicas.iter().find(|r| {
                r.state.in_sync()
                    && away(&r.node)
                    && map.check_leave_in_sync(&s.key, &r.node, s.epoch).is_ok()
            }) {
                out.push(Command::LeaveInSync {
                    shard: s.key.clone(),
                    node: r.node.clone(),
                    epoch: s.epoch,
                });
            }
        }
        out
    }

    /// The shards whose primary is on `node`.
    fn led_by<'a>(map: &'a ClusterMap, node: &'a str) -> impl Iterator<Item = &'a ShardKey> {
        map.shards
            .values()
            // A split's forking sibling has no role of its own until the cut-over.
            .filter(move |s| s.primary.as_deref() == Some(node) && !s.forking())
            .map(|s| &s.key)
    }

    /// An operator's handover of `shard`'s primary role to its serving replica on
    /// `node`, under a new epoch. Refused when that replica is behind the primary by
    /// the replicas' last reports, or its node is not up, unless `accept_data_loss`:
    /// the writes it lacks are then lost, and the old primary truncates them when it
    /// rejoins as a backup. A primary on a live node is asked to hand its role over
    /// itself ([`Ask`]); this waits until it has (or gave up within [`ASK_FOR`]).
    pub async fn promote(
        &self,
        shard: &ShardKey,
        node: &str,
        accept_data_loss: bool,
    ) -> Result<()> {
        let Some(epoch) = self
            .start_promotion(shard, node, accept_data_loss, false)
            .await?
        else {
            return Ok(());
        };
        let deadline = Instant::now() + ASK_FOR;
        loop {
            let now = {
                let st = self.sm.state.lock();
                st.map
                    .shards
                    .get(shard)
                    .map(|s| (s.epoch, s.primary.clone()))
            };
            match now {
                Some((e, p)) if e > epoch => {
                    return if p.as_deref() == Some(node) {
                        Ok(())
                    } else {
                        Err(MapError::FailedPrecondition(format!(
                            "shard {shard} moved to {p:?} at epoch {e} meanwhile"
                        ))
                        .into())
                    };
                }
                None => return Err(MapError::NotFound(format!("shard {shard} not found")).into()),
                _ if Instant::now() >= deadline => {
                    self.asks.lock().remove(shard);
                    return Err(MapError::FailedPrecondition(format!(
                        "the primary of shard {shard} did not hand its role to {node:?} within \
                         {ASK_FOR:?} (it stops writes until that replica holds every write it \
                         logged); it keeps the role: retry, or promote with accept_data_loss"
                    ))
                    .into());
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Checks a promotion and starts it: a primary on a live node is asked to hand its
    /// role over ([`Ask`], returns the epoch asked at); otherwise (no primary, one on a
    /// node that is suspect or down, whose lease has lapsed, or the operator accepting
    /// data loss) the promotion is committed at once (returns `None`).
    ///
    /// `planned` (the even-out, not an operator): a replica behind the primary's last
    /// report is still asked for. Under steady writes a backup's report nearly always
    /// trails the primary's by a batch or two, so the even-out waited for reports that
    /// happened to line up (a scale-out under writers settled in 3 s or in minutes);
    /// the handover itself is what keeps it safe: the primary stops writes and waits
    /// until the successor holds its last batch, and `HandOver` checks that position.
    async fn start_promotion(
        &self,
        shard: &ShardKey,
        node: &str,
        accept_data_loss: bool,
        planned: bool,
    ) -> Result<Option<u64>> {
        self.require_leader()?;
        let map = self.read().await?;
        let s = map
            .shards
            .get(shard)
            .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
        if s.primary.as_deref() == Some(node) {
            return Err(MapError::FailedPrecondition(format!(
                "{node:?} is already the primary of shard {shard} (epoch {})",
                s.epoch
            ))
            .into());
        }
        if !accept_data_loss {
            let live = |n: &str| map.nodes.get(n).is_some_and(|n| n.state.is_live());
            let asked = s.primary.as_deref().is_some_and(live)
                && s.replicas
                    .iter()
                    .any(|r| r.node == node && r.state == ReplicaState::Serving);
            let reports = self.reports.lock();
            let primary = s
                .primary
                .as_deref()
                .and_then(|p| reports.position(shard, p))
                .filter(|_| !(asked && planned));
            may_take_over(&map, &reports, shard, node, primary, "promoting it")?;
            drop(reports);
            if asked {
                tracing::info!(shard = %shard, from = ?s.primary, to = node, epoch = s.epoch, "asking the primary to hand its role over");
                self.asks.lock().insert(
                    shard.clone(),
                    Ask {
                        epoch: s.epoch,
                        to: node.to_string(),
                        until: Instant::now() + ASK_FOR,
                    },
                );
                return Ok(Some(s.epoch));
            }
        }
        tracing::info!(shard = %shard, to = node, epoch = s.epoch + 1, accept_data_loss, "promoting a replica on request");
        let (shard, node, epoch) = (shard.clone(), node.to_string(), s.epoch);
        self.write(if accept_data_loss {
            Command::PromoteAcceptingLoss { shard, node, epoch }
        } else {
            Command::Promote { shard, node, epoch }
        })
        .await?;
        Ok(None)
    }

    /// The planned moves to ask of `node`'s primaries with its heartbeat's answer
    /// (dropping asks that no longer stand).
    pub fn asks(&self, node: &str) -> Vec<shoal_proto::coordinator::HandOverAsk> {
        // Nearly always none: no map copy per heartbeat then.
        if self.asks.lock().is_empty() {
            return Vec::new();
        }
        let map = self.sm.state.lock().map.clone();
        let now = Instant::now();
        let mut asks = self.asks.lock();
        asks.retain(|k, a| map.shards.get(k).is_some_and(|s| s.epoch == a.epoch) && now < a.until);
        asks_for(&map, &asks, node, now)
            .map(|(s, a)| shoal_proto::coordinator::HandOverAsk {
                shard: Some(shoal_proto::coordinator::ShardId {
                    collection: s.key.collection.clone(),
                    collection_id: s.collection_id,
                    index: s.key.index,
                }),
                epoch: a.epoch,
                to: a.to.clone(),
            })
            .collect()
    }

    /// A primary's own handover (before its node shuts down): `to` leads `shard` under
    /// a new epoch, only while `from` still leads it at `epoch` and `to` has reported
    /// holding `last` (epoch, seq), the primary's last batch. Returns the new epoch.
    pub async fn hand_over(
        &self,
        from: &str,
        cluster_id: &str,
        shard: &shoal_proto::coordinator::ShardId,
        epoch: u64,
        to: &str,
        last: (u64, u64),
    ) -> Result<u64> {
        self.require_leader()?;
        self.check_cluster(from, cluster_id)?;
        let map = self.read().await?;
        let s = map
            .shard_named(&shard.collection, shard.collection_id, shard.index)
            .ok_or_else(|| {
                MapError::NotFound(format!(
                    "shard {}/{} of collection id {} not found",
                    shard.collection, shard.index, shard.collection_id
                ))
            })?;
        if s.primary.as_deref() != Some(from) || s.epoch != epoch {
            return Err(MapError::FailedPrecondition(format!(
                "{from:?} does not lead shard {} at epoch {epoch} (the map: {:?} at epoch {})",
                s.key, s.primary, s.epoch
            ))
            .into());
        }
        may_take_over(
            &map,
            &self.reports.lock(),
            &s.key,
            to,
            Some(last),
            "handing over",
        )?;
        tracing::info!(shard = %s.key, from, to, epoch = epoch + 1, "primary hands its role over");
        self.write(Command::Promote {
            shard: s.key.clone(),
            node: to.to_string(),
            epoch,
        })
        .await?;
        Ok(epoch + 1)
    }

    /// The cluster's id; the first call on a fresh group names it (a random id,
    /// committed once: a concurrent namer's id wins and is returned).
    pub async fn cluster_id(&self) -> Result<String> {
        let id = self.sm.state.lock().map.cluster_id.clone();
        if !id.is_empty() {
            return Ok(id);
        }
        let fresh = format!("{:032x}", rand::random::<u128>());
        match self.write(Command::InitCluster { id: fresh }).await {
            Ok(_) | Err(CoordinatorError::Map(MapError::FailedPrecondition(_))) => {}
            Err(e) => return Err(e),
        }
        Ok(self.sm.state.lock().map.cluster_id.clone())
    }

    /// Refuses a node (or watcher) whose data belongs to another cluster: `claimed` is
    /// the id it holds ("" = none yet). The map is never named empty once a node is in.
    pub fn check_cluster(&self, who: &str, claimed: &str) -> Result<()> {
        let id = self.sm.state.lock().map.cluster_id.clone();
        if claimed.is_empty() || id.is_empty() || claimed == id {
            return Ok(());
        }
        Err(MapError::FailedPrecondition(format!(
            "{who} holds data of cluster {claimed:?}, but these coordinators run cluster \
             {id:?}; if this coordinator group now stands for that cluster (rebuilt or \
             restored), restart the node with --accept-cluster-id {id}"
        ))
        .into())
    }

    /// An operator's decision that `shard`'s data is lost: an empty replica on `node`
    /// becomes its primary. Refused without `accept_data_loss`, and (by the map) while a
    /// serving replica sits on a live node.
    pub async fn allocate_empty(
        &self,
        shard: &ShardKey,
        node: &str,
        accept_data_loss: bool,
    ) -> Result<()> {
        self.require_leader()?;
        if !accept_data_loss {
            return Err(MapError::FailedPrecondition(format!(
                "allocating shard {shard} empty on {node:?} gives up every acknowledged write \
                 it held: set accept_data_loss (--accept-data-loss) to confirm"
            ))
            .into());
        }
        tracing::warn!(shard = %shard, node, "allocating an empty primary on an operator's request (data loss accepted)");
        self.write(Command::AllocateEmpty {
            shard: shard.clone(),
            node: node.to_string(),
        })
        .await?;
        Ok(())
    }

    /// Ok on the leader; otherwise a not-leader error naming the leader's public
    /// address, which clients follow.
    pub fn require_leader(&self) -> Result<()> {
        match self.leadership() {
            Leadership::Me => Ok(()),
            Leadership::Other { id, member } => Err(CoordinatorError::NotLeader {
                leader: Some(id),
                api_addr: member.map(|m| m.api_addr),
            }),
            Leadership::Unknown => Err(CoordinatorError::NotLeader {
                leader: None,
                api_addr: None,
            }),
        }
    }

    /// The leader's periodic duties: turn silent nodes suspect, then down; bring back
    /// suspects that heartbeat again; then run placement and commit its moves.
    pub async fn tick(&self) {
        let is_leader = matches!(self.leadership(), Leadership::Me);
        let since = {
            let mut ls = self.leader_since.lock();
            if !is_leader {
                *ls = None;
                return;
            }
            *ls.get_or_insert_with(Instant::now)
        };
        // A fresh group's leader names the cluster before anything joins it.
        if let Err(e) = self.cluster_id().await {
            tracing::debug!(error = %e, "cluster not named yet");
            return;
        }
        let now = Instant::now();
        let suspect = Duration::from_millis(self.config.suspect_after_ms);
        let down = Duration::from_millis(self.config.down_after_ms);
        let map = self.sm.state.lock().map.clone();
        let commands = {
            let hb = self.heartbeats.lock();
            let silent = |node: &str| {
                let last = hb.get(node).copied().unwrap_or(since).max(since);
                now.saturating_duration_since(last)
            };
            Self::liveness(&map, silent, suspect, down)
        };
        for c in commands {
            if let Command::SetNodeState {
                id,
                state: NodeState::Down,
                ..
            } = &c
            {
                for p in self.promotions(&map, Self::led_by(&map, id)) {
                    if let Err(e) = self.write(p).await {
                        tracing::warn!(error = %e, "promotion not applied");
                    }
                }
            }
            if let Err(e) = self.write(c).await {
                tracing::debug!(error = %e, "liveness update not applied");
            }
        }
        // Backups away from their primaries leave the in-sync sets.
        let map = self.sm.state.lock().map.clone();
        for c in Self::out_of_sync(&map) {
            tracing::warn!(change = ?c, "a backup on a node away leaves its in-sync set");
            if let Err(e) = self.write(c).await {
                tracing::info!(error = %e, "in-sync set change not applied");
            }
        }
        // Shards left without a live primary (none promotable at the down transition,
        // an evicted primary, a lost volume) get one as soon as a serving replica on a
        // live node has reported its position.
        let map = self.sm.state.lock().map.clone();
        let mut headless = placement::headless(&map);
        headless.retain(|k| map.shards.get(k).is_some_and(|s| !s.forking()));
        for p in self.promotions(&map, &headless) {
            if let Err(e) = self.write(p).await {
                tracing::warn!(error = %e, "promotion not applied");
            }
        }
        self.advance_splits().await;
        self.switch_rebuilds().await;
        let map = self.sm.state.lock().map.clone();
        let opts = placement::Options {
            max_moves: self.config.max_moves_per_step,
            max_in_flight: self.config.max_copies_in_flight,
            disk: self.disk_levels(),
        };
        // A splitting collection's replicas stay where its forks are being made.
        let moves: Vec<_> = placement::plan(&map, &opts)
            .into_iter()
            .filter(|m| {
                let (crate::map::Move::Add { shard, .. } | crate::map::Move::Evict { shard, .. }) =
                    m;
                map.running_split(&shard.collection).is_none()
            })
            .collect();
        if !moves.is_empty() {
            let shards: BTreeSet<String> = moves
                .iter()
                .map(|m| match m {
                    crate::map::Move::Add { shard, .. } | crate::map::Move::Evict { shard, .. } => {
                        shard.to_string()
                    }
                })
                .collect();
            tracing::info!(moves = moves.len(), shards = ?shards, "placement step");
            if let Err(e) = self.write(Command::ApplyMoves(moves)).await {
                tracing::warn!(error = %e, "placement step not applied");
            }
            *self.uneven_since.lock() = None;
            return;
        }
        self.rebalance_primaries(&map, now).await;
    }

    /// Switches each rebuild whose every serving replica holds its staged generation
    /// (`rebuild::ready_to_switch`): one command for the whole collection.
    async fn switch_rebuilds(&self) {
        let map = self.sm.state.lock().map.clone();
        let ready = {
            let reports = self.reports.lock();
            crate::rebuild::ready_to_switch(&map, |k, n| {
                reports.get(k, n).map_or(0, |r| r.staged_operation)
            })
        };
        for operation in ready {
            tracing::info!(
                operation,
                "rebuild: every replica holds its staged generation; switching the collection"
            );
            if let Err(e) = self.write(Command::SwitchRebuild { operation }).await {
                tracing::warn!(operation, error = %e, "rebuild switch not applied");
            }
        }
    }

    /// Cuts over each running split whose forks are made (`split::cut_over`), and
    /// cancels one whose sources have been sealed past `split_seal_timeout_ms`.
    async fn advance_splits(&self) {
        let map = self.sm.state.lock().map.clone();
        let now = Instant::now();
        let running: Vec<&crate::operations::Operation> = map
            .operations
            .values()
            .filter(|o| {
                o.running() && matches!(o.kind, crate::operations::OperationKind::Split { .. })
            })
            .collect();
        self.splits_since
            .lock()
            .retain(|id, _| running.iter().any(|o| o.id == *id));
        for op in running {
            let decided = {
                let reports = self.reports.lock();
                crate::split::cut_over(&map, op, |k, n| reports.position(k, n))
            };
            let since = *self.splits_since.lock().entry(op.id).or_insert(now);
            let timeout = Duration::from_millis(self.config.split_seal_timeout_ms);
            let cmd = match decided {
                Some(cmd) => {
                    tracing::info!(operation = op.id, collection = %op.collection, "split: every fork holds its source's seal point; cutting over");
                    cmd
                }
                None if now.saturating_duration_since(since) > timeout => {
                    tracing::warn!(operation = op.id, collection = %op.collection, "split: forks not made in time; cancelling it");
                    Command::CancelOperation {
                        id: op.id,
                        reason: format!(
                            "the shards' forks were not all made within {} s of sealing (split_seal_timeout_ms); writes resumed",
                            timeout.as_secs()
                        ),
                    }
                }
                None => continue,
            };
            if let Err(e) = self.write(cmd).await {
                tracing::warn!(operation = op.id, error = %e, "split step not applied");
            }
        }
    }

    /// Hands one primary role to a less loaded node once the cluster has been settled
    /// with uneven primaries for `rebalance_settle_ms` (see
    /// [`placement::rebalance_primary`]); the target must have reported holding
    /// everything the primary reported ([`Coordinator::promote`]'s check).
    async fn rebalance_primaries(&self, map: &ClusterMap, now: Instant) {
        let Some((shard, to)) = placement::settled(map)
            .then(|| placement::rebalance_primary(map))
            .flatten()
            .filter(|(shard, _)| map.running_split(&shard.collection).is_none())
        else {
            *self.uneven_since.lock() = None;
            return;
        };
        let since = *self.uneven_since.lock().get_or_insert(now);
        if now.saturating_duration_since(since)
            < Duration::from_millis(self.config.rebalance_settle_ms)
        {
            return;
        }
        *self.uneven_since.lock() = None;
        match self.start_promotion(&shard, &to, false, true).await {
            Ok(_) => {
                tracing::info!(shard = %shard, to = %to, "primary asked to hand over to even out primaries")
            }
            Err(e) => {
                tracing::info!(shard = %shard, to = %to, error = %e, "primary rebalance skipped")
            }
        }
    }
}

fn finish(r: Response) -> Result<u64> {
    match r.error {
        None => Ok(r.version),
        Some(e) => Err(CoordinatorError::Map(e)),
    }
}

/// Pure: the operation steps a shard's primary's report ends (issue 18-21): a build or
/// rebuild it could not make (failed, with its error), a rebuild's generation it
/// staged and gated (`Staged`, with the gate's figures), a compaction it did, a backup
/// or restore it finished or could not. Each only while its step is pending.
pub fn operation_steps(
    map: &ClusterMap,
    key: &ShardKey,
    node: &str,
    r: &shoal_proto::coordinator::ReplicaReport,
) -> Vec<Command> {
    use crate::operations::{OperationKind as K, Step};
    let pending = |id: u64, kind: &dyn Fn(&K) -> bool| {
        id != 0
            && map.operations.get(&id).is_some_and(|o| {
                o.running()
                    && kind(&o.kind)
                    && matches!(o.steps.get(&key.index), Some(Step::Pending { .. }))
            })
    };
    // A node's words in a step: at most 1 KiB, naming the node.
    let said = |text: &str| {
        let mut t = text.to_string();
        t.truncate(t.floor_char_boundary(1024));
        format!("on {node}: {t}")
    };
    let step = |id: u64, step: Step| Command::OperationStep {
        id,
        shard: key.index,
        step,
    };
    let mut out = Vec::new();
    if !r.build_error.is_empty() && pending(r.build_operation, &|_| true) {
        let reason = said(&r.build_error);
        out.push(step(r.build_operation, Step::Failed { reason }));
    }
    if !r.gate.is_empty() && pending(r.staged_operation, &|k| matches!(k, K::Rebuild(_))) {
        let gate = said(&r.gate);
        out.push(step(
            r.staged_operation,
            Step::Staged {
                generation: r.staged_generation,
                gate,
            },
        ));
    }
    if pending(r.compacted_operation, &|k| *k == K::Compact) {
        out.push(step(
            r.compacted_operation,
            Step::Done {
                generation: r.layout,
            },
        ));
    }
    let stored = |k: &K| matches!(k, K::Backup { .. } | K::Restore { .. });
    if pending(r.finished_operation, &stored) {
        out.push(step(
            r.finished_operation,
            Step::Done {
                generation: r.applied_seq,
            },
        ));
    } else if pending(r.failed_operation, &stored) {
        let reason = said(&r.operation_error);
        out.push(step(r.failed_operation, Step::Failed { reason }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::tests::{map_with_nodes, placed, primary_and_backups, spec};

    /// Issues 18-21: a primary's report ends the steps it names, each only while
    /// pending and of an operation of the right kind.
    #[test]
    fn a_primarys_report_ends_the_pending_steps_it_names() {
        use crate::operations::{BuildParams, OperationKind, RebuildParams, RebuildPhase, Step};
        use shoal_proto::coordinator::ReplicaReport;
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("c", 1, 1))).unwrap();
        let id = m.collections["c"].id;
        let index = m.collections["c"].spec.index.clone();
        let start = |m: &mut ClusterMap, kind: OperationKind| {
            m.apply(&Command::StartOperation {
                kind,
                collection: "c".into(),
                collection_id: id,
                started_ms: 0,
            })
            .unwrap();
            m.next_operation_id
        };
        let compact = start(&mut m, OperationKind::Compact);
        let build = BuildParams {
            nlist: 16,
            pq_m: 48,
            pq_nbits: 8,
            train_sample: 1000,
            rows_per_shard: 1000,
            rerank: Default::default(),
        };
        let rebuild = start(
            &mut m,
            OperationKind::Rebuild(RebuildParams {
                build,
                nprobe: 8,
                refine: 10,
                gate_k: 10,
                margin_bp: 100,
                previous: index,
                phase: RebuildPhase::Building,
                model: None,
            }),
        );
        let key = ShardKey {
            collection: "c".into(),
            index: 0,
        };
        let steps = |r: ReplicaReport| -> Vec<(u64, Step)> {
            operation_steps(&m, &key, "n0", &r)
                .into_iter()
                .map(|c| match c {
                    Command::OperationStep { id, step, .. } => (id, step),
                    c => panic!("{c:?}"),
                })
                .collect()
        };
        // A gate's figures end the rebuild's step as staged; the compaction's report
        // ends its own; a staged report without figures (a backup's) ends nothing.
        let r = ReplicaReport {
            staged_operation: rebuild,
            staged_generation: 4,
            gate: "recall@10 0.99 -> 0.99".into(),
            compacted_operation: compact,
            layout: 7,
            ..Default::default()
        };
        assert_eq!(
            steps(r.clone()),
            vec![
                (
                    rebuild,
                    Step::Staged {
                        generation: 4,
                        gate: "on n0: recall@10 0.99 -> 0.99".into()
                    }
                ),
                (compact, Step::Done { generation: 7 }),
            ]
        );
        assert!(steps(ReplicaReport {
            gate: String::new(),
            compacted_operation: 0,
            ..r.clone()
        })
        .is_empty());
        // A rebuild's report does not end a compaction, nor a finished report a
        // rebuild (only backups and restores).
        assert!(steps(ReplicaReport {
            staged_operation: compact,
            finished_operation: rebuild,
            compacted_operation: rebuild,
            ..r.clone()
        })
        .is_empty());
        // A build error fails the step, clipped to 1 KiB.
        let failed = steps(ReplicaReport {
            build_operation: rebuild,
            build_error: "x".repeat(5000),
            ..Default::default()
        });
        assert!(
            matches!(&failed[..], [(id, Step::Failed { reason })] if *id == rebuild && reason.len() < 1100)
        );
    }

    /// Issue 16: a planned move is asked only of the node leading the shard at the
    /// asked epoch, and only until the ask expires.
    #[test]
    fn asks_go_to_the_primary_at_their_epoch_until_they_expire() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 2, 2))).unwrap();
        let shards: Vec<Shard> = m.shards_of("c").cloned().collect();
        let now = Instant::now();
        let (p0, b0) = primary_and_backups(&shards[0]);
        let (p1, b1) = primary_and_backups(&shards[1]);
        let ask = |s: &Shard, to: &str, epoch_off: u64, secs: u64| Ask {
            epoch: s.epoch + epoch_off,
            to: to.into(),
            until: now + Duration::from_secs(secs),
        };
        let mut asks = HashMap::new();
        asks.insert(shards[0].key.clone(), ask(&shards[0], &b0[0], 0, 10));
        // An ask from an older view (the shard moved on since): never sent.
        asks.insert(shards[1].key.clone(), ask(&shards[1], &b1[0], 1, 10));
        let to = |node: &str, at: Instant| -> Vec<(ShardKey, NodeId)> {
            asks_for(&m, &asks, node, at)
                .map(|(s, a)| (s.key.clone(), a.to.clone()))
                .collect()
        };
        assert_eq!(to(&p0, now), vec![(shards[0].key.clone(), b0[0].clone())]);
        assert!(to(&b0[0], now).is_empty(), "asked of a backup");
        if p1 != p0 {
            assert!(to(&p1, now).is_empty(), "an ask at another epoch was sent");
        }
        assert!(
            to(&p0, now + Duration::from_secs(11)).is_empty(),
            "an expired ask was sent"
        );
    }

    #[test]
    fn a_leader_without_its_lease_is_no_leader() {
        let members: BTreeMap<u64, Member> = (1..=3)
            .map(|id| {
                let m = Member {
                    raft_addr: format!("r{id}"),
                    api_addr: format!("a{id}"),
                };
                (id, m)
            })
            .collect();
        let membership =
            openraft::Membership::new(vec![members.keys().copied().collect()], members);
        let metrics = |state, leader| {
            let mut m = openraft::RaftMetrics::<u64, Member>::new_initial(1);
            m.state = state;
            m.current_leader = leader;
            m.membership_config =
                Arc::new(openraft::StoredMembership::new(None, membership.clone()));
            m
        };
        // (Raft state, the leader it names, lease held, what member 1 takes it for)
        let cases = [
            (ServerState::Leader, Some(1), true, "me"),
            (ServerState::Leader, Some(1), false, "unknown"),
            (ServerState::Follower, Some(2), false, "2 at a2"),
            (ServerState::Follower, Some(2), true, "2 at a2"),
            (ServerState::Follower, None, true, "unknown"),
            (ServerState::Candidate, Some(1), true, "unknown"),
        ];
        for (state, leader, held, want) in cases {
            let got = match leadership(1, &metrics(state, leader), held) {
                Leadership::Me => "me".to_string(),
                Leadership::Unknown => "unknown".to_string(),
                Leadership::Other { id, member } => {
                    format!("{id} at {}", member.map(|m| m.api_addr).unwrap_or_default())
                }
            };
            assert_eq!(got, want, "{state:?} {leader:?} lease {held}");
        }
    }

    /// The leader's liveness duty as a table: (state, silent ms) -> transition, with
    /// suspect after 1 s and down after 3 s.
    #[test]
    fn liveness_transitions_by_state_and_silence() {
        let (suspect, down) = (Duration::from_secs(1), Duration::from_secs(3));
        let cases = [
            (NodeState::Up, 500, None),
            (NodeState::Up, 1_500, Some(NodeState::Suspect)),
            (NodeState::Joining, 1_500, Some(NodeState::Suspect)),
            (NodeState::Draining, 1_500, Some(NodeState::Suspect)),
            // Suspect waits for the down timeout, counted from the last heartbeat.
            (NodeState::Suspect, 1_500, None),
            (NodeState::Suspect, 3_500, Some(NodeState::Down)),
            // Up never skips suspect, however long the silence.
            (NodeState::Up, 60_000, Some(NodeState::Suspect)),
            (NodeState::Down, 60_000, None),
        ];
        for (state, silent_ms, want) in cases {
            let mut m = map_with_nodes(1);
            m.nodes.get_mut("n0").unwrap().state = state;
            let got =
                Coordinator::liveness(&m, |_| Duration::from_millis(silent_ms), suspect, down);
            let want: Vec<Command> = want
                .into_iter()
                .map(|to| Command::SetNodeState {
                    id: "n0".into(),
                    state: to,
                    from: vec![state],
                })
                .collect();
            assert_eq!(got, want, "{state:?} silent {silent_ms} ms");
        }
    }

    /// Issue 16: the in-sync changes a heartbeat asks for are taken only from the
    /// shard's primary at the map's epoch; the leader takes backups on nodes away out of
    /// their sets, one per shard per round, never below the write quorum.
    #[test]
    fn in_sync_changes_come_from_the_primary_and_the_leader() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 1, 3))).unwrap();
        let s = m.shards_of("c").next().unwrap().clone();
        let (primary, backups) = primary_and_backups(&s);
        let report = |epoch, lagging: Vec<String>, in_sync: Vec<String>| {
            shoal_proto::coordinator::ReplicaReport {
                epoch,
                lagging,
                in_sync,
                ..Default::default()
            }
        };
        let lag = report(s.epoch, backups.clone(), vec![]);
        // From a backup, or at another epoch: nothing.
        assert!(Coordinator::in_sync_changes(&m, &s, &backups[0], &lag).is_empty());
        let stale = report(s.epoch + 1, backups.clone(), vec![]);
        assert!(Coordinator::in_sync_changes(&m, &s, &primary, &stale).is_empty());
        // From the primary: both ask to leave (the map lets only the first through).
        let got = Coordinator::in_sync_changes(&m, &s, &primary, &lag);
        assert_eq!(got.len(), 2);
        m.apply(&got[0]).unwrap();
        assert!(m.apply(&got[1]).is_err(), "below the write quorum");
        // A copy it reports in sync joins; a serving one is no change.
        let s = m.shards[&s.key].clone();
        let join = report(s.epoch, vec![], backups.clone());
        let got = Coordinator::in_sync_changes(&m, &s, &primary, &join);
        assert_eq!(
            got,
            vec![Command::JoinInSync {
                shard: s.key.clone(),
                node: backups[0].clone(),
                epoch: s.epoch,
            }]
        );
        m.apply(&got[0]).unwrap();
        // The leader: a backup on a suspect node leaves; the second one then stays.
        assert!(Coordinator::out_of_sync(&m).is_empty(), "every node up");
        for b in &backups {
            m.nodes.get_mut(b).unwrap().state = NodeState::Suspect;
        }
        m.nodes.get_mut(&primary).unwrap().state = NodeState::Suspect;
        let got = Coordinator::out_of_sync(&m);
        assert_eq!(got.len(), 1, "{got:?}");
        m.apply(&got[0]).unwrap();
        assert!(Coordinator::out_of_sync(&m).is_empty(), "two in sync stay");
        assert_eq!(m.shards[&s.key].primary.as_deref(), Some(primary.as_str()));
    }
}
