//! The node's reconciliation with the cluster map: it follows the map's stream
//! ([`follow_map`]), and the [`Reconciler`] opens the replicas the map assigns here,
//! gives each its role ([`role_of`], pure), reopens the ones that failed, and closes the
//! ones the map no longer places here (into the trash only when the map shows their
//! data dropped or served elsewhere, otherwise kept on disk and re-checked).

use shoal_proto::filter::PayloadField;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::RwLock;
use ractor::ActorRef;
use shoal_engine::{CollectionConfig, Metric};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use tokio::sync::watch;

use super::disk;
use super::identity::Identity;
use super::lease::Lease;
use super::mapview::{self, MapView};
use super::replicas::{self, Registry, ReplicaArgs, ReplicaKey, ReplicaMsg, SupervisorMsg};
use super::replication::{Peer, Replication, Role};
use super::transport::Transports;

/// How often replicas that failed are retried between map changes.
const REPAIR_EVERY: Duration = Duration::from_secs(5);

/// A hosted replica's role in its replica set, from the map.
pub fn role_of(view: &MapView, s: &cpb::Shard, me: &str) -> Role {
    let (rf, write_quorum) = view
        .collections
        .get(&s.collection)
        .map_or((1, 0), |c| (c.replication_factor, c.write_quorum));
    let peers = s
        .replicas
        .iter()
        .filter(|r| r.node_id != me)
        .map(|r| {
            // A replica on a node the view lacks still counts (the write quorum waits
            // for every in-sync replica); unreachable, it lags and leaves the set.
            let n = view.nodes.get(&r.node_id);
            Peer {
                node: r.node_id.clone(),
                addr: n.map(|n| n.addr.clone()).unwrap_or_default(),
                serving: r.state == cpb::ReplicaState::Serving as i32,
                leaving: r.state == cpb::ReplicaState::Leaving as i32,
                live: n.is_some_and(|n| cpb::NodeState::is_live_value(n.state)),
            }
        })
        .collect();
    Role {
        epoch: s.epoch,
        primary: s.primary.clone(),
        is_primary: s.primary == me,
        peers,
        replication_factor: rf,
        write_quorum,
        forced: s.forced_epoch == s.epoch && s.epoch > 0,
        // A split's sealed source, or its fork (which takes no write before the
        // cut-over: its position is the seal point the cut-over checks).
        sealed: s.sealed_by != 0 || s.forking_from.is_some(),
        leaving: s
            .replicas
            .iter()
            .any(|r| r.node_id == me && r.state == cpb::ReplicaState::Leaving as i32),
    }
}

/// Rows newer than the serving index that start a rebuild: the collection's policy in
/// the map (issue 18), else the node's `--auto-rebuild-tail`.
fn auto_rebuild_tail(c: &cpb::Collection, node_default: usize) -> usize {
    c.auto_rebuild_rows
        .map_or(node_default, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// The metadata fields the collection's shards index for filters (issue 22).
fn payload_fields(c: &cpb::Collection) -> Vec<PayloadField> {
    // The map only holds fields it validated.
    c.payload_fields
        .iter()
        .filter_map(|f| PayloadField::from_wire(f).ok())
        .collect()
}

fn shard_config(c: &cpb::Collection, node_default: usize) -> CollectionConfig {
    // The map only holds metrics it validated; unspecified is the default.
    let metric = Metric::from_wire(c.metric).unwrap_or(Metric::InnerProduct);
    let mut cfg = CollectionConfig::new(c.dimension as usize, metric);
    if let Some(ix) = &c.index {
        // 0: sized from the data (issue 18): the engine's default until a build's
        // parameters arrive (`builds.rs`), which every build then uses.
        if ix.nlist > 0 {
            cfg.index.nlist = ix.nlist as usize;
        }
        cfg.index.m = ix.pq_m as usize;
        cfg.index.nbits = ix.pq_nbits as usize;
        cfg.nprobe = ix.nprobe as usize;
        cfg.refine_factor = ix.refine as usize;
        cfg.rerank = shoal_engine::Precision::from_wire(ix.rerank).unwrap_or_default();
    }
    cfg.train_sample = cfg.train_sample.max(cfg.index.nlist);
    cfg.auto_rebuild_tail = auto_rebuild_tail(c, node_default);
    cfg.payload_fields = payload_fields(c);
    cfg
}

/// Opens and closes this node's replicas as the map says.
pub(super) struct Reconciler {
    pub(super) local: Arc<super::transport::LocalReplicas>,
    pub(super) forks: Arc<super::forks::Forks>,
    pub(super) backups: Arc<super::backups::Backups>,
    pub(super) builds: Arc<super::builds::Builds>,
    pub(super) compactions: Arc<super::compactions::Compactions>,
    pub(super) node_id: String,
    pub(super) data_dir: PathBuf,
    pub(super) registry: Registry,
    pub(super) transports: Arc<Transports>,
    pub(super) supervisor: ActorRef<SupervisorMsg>,
    pub(super) auto_rebuild_tail: usize,
    pub(super) recent_log_bytes: usize,
    pub(super) in_sync_lag: Duration,
    /// Replicas closed but kept on disk (the map showed no copy of their data
    /// elsewhere), re-checked on every map until it does.
    pub(super) kept: parking_lot::Mutex<HashMap<ReplicaKey, PathBuf>>,
    pub(super) disk: Arc<disk::DiskGuard>,
    pub(super) lease: Arc<Lease>,
    /// The supervisor's word that a replica opened (its role is given on the next
    /// reconcile, which this starts).
    pub(super) opened: Arc<tokio::sync::Notify>,
}

impl Reconciler {
    /// Opens the replicas the map assigns to this node and closes the ones it no
    /// longer does: into the trash when the map shows their data dropped or served
    /// elsewhere ([`MapView::removal`]), otherwise kept where they are.
    async fn reconcile(&self, view: &MapView) {
        // Replicas a failed write poisoned: reopened from disk, which replays the log
        // (issue 14: a failed replica is repaired, not left serving until a restart).
        for (k, h) in self.registry.read().iter() {
            if h.repl.shard().ok().and_then(|s| s.failure()).is_some() {
                tracing::warn!(replica = %k, "reopening a replica a failed write poisoned");
                let _ = h.actor.send_message(ReplicaMsg::Reopen);
            }
        }
        let mut wanted: HashMap<ReplicaKey, ReplicaArgs> = HashMap::new();
        let mut roles: Vec<(ReplicaKey, Role, usize, Vec<PayloadField>)> = Vec::new();
        for s in view.shards.values() {
            // A split's sibling is forked here (`forks.rs`) and opened once its fork is
            // made at the current seal point, before the cut-over (so it serves at once
            // after it); a fork at an older one is closed and made again.
            if !s.replicas.iter().any(|r| r.node_id == self.node_id)
                || (s.forking_from.is_some() && !self.forks.made_now(view, s))
            {
                continue;
            }
            let Some(c) = view.collections.get(&s.collection) else {
                continue;
            };
            let key = ReplicaKey {
                collection: c.name.clone(),
                collection_id: c.id,
                index: s.index,
            };
            let dir = self.replica_dir(&key);
            // A shard restored from a backup (issue 20) is opened once its directory
            // is written (`backups.rs`), never created empty before.
            if s.restoring != 0
                && s.primary == self.node_id
                && !super::backups::restored_by(&dir, s.restoring)
            {
                continue;
            }
            // A hosted replica keeps its replication; a new one gets its own, which
            // the supervisor files with the actor once the replica opens.
            let hosted = self.registry.read().get(&key).map(|h| h.repl.clone());
            let repl = hosted.unwrap_or_else(|| {
                Replication::new(
                    key.clone(),
                    self.node_id.clone(),
                    self.transports.clone(),
                    self.recent_log_bytes,
                    self.disk.clone(),
                    self.lease.clone(),
                    self.in_sync_lag,
                )
            });
            if s.index < c.shard_count {
                repl.set_routing(shoal_proto::routing::Routing::of_shard(
                    s.index,
                    c.shard_count,
                ));
            }
            roles.push((
                key.clone(),
                role_of(view, s, &self.node_id),
                auto_rebuild_tail(c, self.auto_rebuild_tail),
                payload_fields(c),
            ));
            wanted.insert(
                key,
                ReplicaArgs {
                    dir,
                    config: shard_config(c, self.auto_rebuild_tail),
                    repl,
                    filling: s.replicas.iter().any(|r| {
                        r.node_id == self.node_id && r.state == cpb::ReplicaState::Copying as i32
                    }),
                },
            );
        }
        *self.local.placed.write() = wanted.keys().cloned().collect();
        let have: Vec<ReplicaKey> = self.registry.read().keys().cloned().collect();
        for k in have {
            if !wanted.contains_key(&k) {
                let trash = view.removal(&k.collection, k.collection_id, k.index, &self.node_id)
                    == mapview::Removal::Trash;
                if !trash {
                    tracing::warn!(replica = %k, "the map no longer places this replica here but shows no other copy of its data: closing it, keeping its files");
                    self.kept.lock().insert(k.clone(), self.replica_dir(&k));
                }
                let _ = self
                    .supervisor
                    .call(
                        |r| SupervisorMsg::Close(k.clone(), trash, r),
                        Some(Duration::from_secs(30)),
                    )
                    .await;
            }
        }
        // Kept replicas: reopened when wanted again, trashed once the map shows their
        // data elsewhere.
        let kept: Vec<(ReplicaKey, PathBuf)> = self.kept.lock().clone().into_iter().collect();
        for (k, dir) in kept {
            if wanted.contains_key(&k) {
                self.kept.lock().remove(&k);
            } else if view.removal(&k.collection, k.collection_id, k.index, &self.node_id)
                == mapview::Removal::Trash
            {
                self.kept.lock().remove(&k);
                match replicas::move_to_trash(&dir) {
                    Ok(to) => {
                        tracing::info!(replica = %k, trash = %to.display(), "kept replica now served elsewhere: moved to the trash")
                    }
                    Err(e) => {
                        tracing::warn!(replica = %k, error = %e, "moving a kept replica to the trash")
                    }
                }
            }
        }
        // Opens run concurrently on the supervisor's tasks, not in this loop: the map
        // watch goes on while a large replica opens, and each replica that opens
        // wakes `follow_map` to reconcile again, which gives it its role.
        for (k, args) in wanted {
            if self.registry.read().contains_key(&k) {
                continue;
            }
            if self
                .supervisor
                .cast(SupervisorMsg::Ensure(k.clone(), args))
                .is_err()
            {
                tracing::error!(replica = %k, "the replica supervisor is gone: not opened");
            }
        }
        // Roles for the replicas that are open (one still opening, or that failed to
        // open, gets its role once it has).
        let hosted = self.registry.read().clone();
        for (k, role, tail, fields) in roles {
            if let Some(h) = hosted.get(&k) {
                if let Ok(shard) = h.repl.shard() {
                    if shard.auto_rebuild_tail() != tail {
                        tracing::info!(replica = %k, rows = tail, "automatic index rebuilds after this many new rows (0: off)");
                        shard.set_auto_rebuild_tail(tail);
                    }
                    // The collection's indexed fields changed (or the replica was
                    // made with others): its metadata read again, off the runtime.
                    if shard.payload_fields() != fields {
                        let k = k.clone();
                        tokio::task::spawn_blocking(move || {
                            let t = std::time::Instant::now();
                            match shard.set_payload_fields(&fields) {
                                Ok(true) => {
                                    tracing::info!(replica = %k, fields = fields.len(), took_ms = t.elapsed().as_millis() as u64, "payload index rebuilt for the collection's fields")
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    tracing::warn!(replica = %k, error = %e, "payload index not rebuilt")
                                }
                            }
                        });
                    }
                }
                if h.repl.role().as_ref() != Some(&role) {
                    tracing::info!(replica = %k, epoch = role.epoch, primary = %role.primary, is_primary = role.is_primary, "replica role");
                    h.repl.set_role(role);
                }
            }
        }
        // Split forks, routings, retains (issue 19).
        self.forks
            .sync(view, &self.node_id, &self.registry, |k| self.replica_dir(k));
        // Index builds and compactions the map's operations ask of these replicas.
        self.builds.sync(view);
        self.compactions.sync(view);
        // Backups and restores of the shards led here (issue 20).
        self.backups
            .sync(view, &self.node_id, |k| self.replica_dir(k));
    }
}

impl Reconciler {
    fn replica_dir(&self, k: &ReplicaKey) -> PathBuf {
        self.data_dir
            .join("shards")
            .join(format!("{}-{}", k.collection, k.collection_id))
            .join(k.index.to_string())
    }
}

/// Follows the cluster map: the whole map, then its changes, resuming from the last
/// version after a reconnect; each new map (and every [`REPAIR_EVERY`]) reconciled. A
/// map of another cluster ends the stream (and is logged); the coordinators refusing
/// this node's cluster is logged too.
/// Pure: whether the map watch has fallen behind for good. `leader` is the map version
/// the leader answered the last heartbeat with; a watch behind it for `limit` (well
/// over a watch event's delay) is on a member that stopped advancing: one cut off from
/// the group, or whose stream stalled. Returns since when it has been behind.
fn watch_stale(
    watched: u64,
    leader: u64,
    behind_since: Option<Instant>,
    now: Instant,
    limit: Duration,
) -> (Option<Instant>, bool) {
    if watched >= leader {
        return (None, false);
    }
    let since = behind_since.unwrap_or(now);
    (Some(since), now.saturating_duration_since(since) >= limit)
}

pub(super) async fn follow_map(
    reconciler: Reconciler,
    v: Arc<RwLock<MapView>>,
    mut c: Client,
    ident: Arc<RwLock<Identity>>,
    leader_version: Arc<AtomicU64>,
    stale_after: Duration,
    mut rx: watch::Receiver<bool>,
) {
    // Between maps, replicas that failed (a write's I/O error, a failed open) are
    // retried on this tick: reopened from disk, or opened again.
    let mut repair = tokio::time::interval(REPAIR_EVERY);
    repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(Duration::from_millis(500));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut behind_since = None;
        let from = v.read().version;
        let cluster_id = ident.read().cluster_id.clone();
        let stream = c
            .cluster(|mut cl| {
                let cluster_id = cluster_id.clone();
                async move {
                    cl.watch(cpb::WatchRequest {
                        from_version: from,
                        cluster_id,
                    })
                    .await
                }
            })
            .await;
        if let Err(e) = &stream {
            if e.code() == tonic::Code::FailedPrecondition {
                tracing::error!(error = %e.message(), "the coordinators refuse this node's cluster");
            }
        }
        if let Ok(s) = stream {
            let mut s = s.into_inner();
            loop {
                tokio::select! {
                    ev = s.next() => match ev {
                        Some(Ok(ev)) => {
                            let version = ev.version;
                            if let Some(cpb::map_event::Event::Full(m)) = &ev.event {
                                if !m.cluster_id.is_empty() && m.cluster_id != cluster_id {
                                    tracing::error!(map_cluster = %m.cluster_id, ours = %cluster_id, "refusing a map of another cluster");
                                    break;
                                }
                            }
                            if !v.write().apply(ev) {
                                tracing::warn!(version, held = v.read().version, "ignored a cluster map older than this node's");
                                continue;
                            }
                            let snapshot = v.read().clone();
                            reconciler.reconcile(&snapshot).await;
                            // Roles now follow this version: leases granted at it hold.
                            reconciler.lease.applied(snapshot.version);
                        }
                        _ => break,
                    },
                    _ = reconciler.opened.notified() => {
                        let snapshot = v.read().clone();
                        if snapshot.version > 0 {
                            reconciler.reconcile(&snapshot).await;
                        }
                    }
                    _ = repair.tick() => {
                        let snapshot = v.read().clone();
                        if snapshot.version > 0 {
                            reconciler.reconcile(&snapshot).await;
                        }
                    }
                    _ = check.tick() => {
                        let (watched, leader) = (v.read().version, leader_version.load(Ordering::Acquire));
                        let (since, stale) = watch_stale(watched, leader, behind_since, Instant::now(), stale_after);
                        behind_since = since;
                        if stale {
                            tracing::warn!(watched, leader, "the watched coordinator stopped advancing (the leader answers heartbeats with a newer map); watching another member");
                            c.skip();
                            break;
                        }
                    }
                    _ = rx.changed() => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = rx.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_behind_the_leader_for_the_limit_is_stale() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        // (watched, leader's, behind since, now, want since, want stale)
        let cases = [
            (5, 5, None, t, None, false),
            (6, 5, Some(t), t + s * 9, None, false),
            (4, 5, None, t, Some(t), false),
            (4, 5, Some(t), t + s, Some(t), false),
            (4, 5, Some(t), t + s * 2, Some(t), true),
            // Caught up in between: the clock starts again.
            (5, 5, Some(t), t + s * 3, None, false),
        ];
        for (i, (w, l, since, now, want_since, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                watch_stale(w, l, since, now, s * 2),
                (want_since, want),
                "case {i}"
            );
        }
    }
}
