//! What a node tells the coordinators with each heartbeat: one report per hosted
//! replica (position, generations, catch-up, failure, a replica found ahead) and the
//! copies that finished filling. [`reports`] is pure, over [`ReplicaState`] snapshots
//! taken from the replicas' memory; `run` is the loop that sends them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use tokio::sync::watch;

use super::disk::DiskGuard;
use super::identity::Identity;
use super::ids::ReplicaKey;
use super::lease::Lease;
use super::mapview::MapView;
use super::replicas::Registry;
use super::replication::Replication;
use super::{register, replicas, NodeConfig};

/// At most this much of a replica's failure travels (the coordinators keep 1 KiB).
const FAILURE_BYTES: usize = 1024;

/// One hosted replica as the heartbeat sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaState {
    pub key: ReplicaKey,
    /// Its engine is open: (last sequence, epoch of that batch).
    pub position: Option<(u64, u64)>,
    pub serving_generation: u64,
    pub building_generation: u64,
    pub live_docs: u64,
    pub caught_up: bool,
    pub known_epoch: u64,
    pub ahead: Option<String>,
    pub failure: Option<String>,
}

impl ReplicaState {
    /// Reads a replica's state (memory only: no disk I/O).
    pub fn of(r: &Replication) -> Self {
        let mut s = Self {
            key: r.key.clone(),
            caught_up: r.caught_up(),
            known_epoch: r.known_epoch(),
            ahead: r.ahead(),
            failure: r.failure(),
            ..Self::default()
        };
        if let Ok(shard) = r.shard() {
            let stats = shard.stats();
            s.position = Some(shard.last());
            s.serving_generation = stats.serving.map_or(0, |g| g.id);
            s.building_generation = stats.building.unwrap_or(0);
            s.live_docs = stats.live_docs as u64;
        }
        s
    }
}

/// Pure: the heartbeat's replica reports, and the replicas this node fills (`Copying`
/// in `view`, the same collection incarnation) that have caught up with their primary.
/// A replica that could not open reports only its failure (it has no position).
pub fn reports(
    replicas: &[ReplicaState],
    view: &MapView,
    me: &str,
) -> (Vec<cpb::ReplicaReport>, Vec<cpb::ShardId>) {
    let mut out = Vec::with_capacity(replicas.len());
    let mut ready = Vec::new();
    for r in replicas {
        let mut failed = r.failure.clone().unwrap_or_default();
        failed.truncate(failed.floor_char_boundary(FAILURE_BYTES));
        let Some((applied_seq, last_epoch)) = r.position else {
            if !failed.is_empty() {
                out.push(cpb::ReplicaReport {
                    shard: Some(r.key.shard_id()),
                    epoch: r.known_epoch,
                    failed,
                    ..Default::default()
                });
            }
            continue;
        };
        out.push(cpb::ReplicaReport {
            shard: Some(r.key.shard_id()),
            applied_seq,
            last_epoch,
            serving_generation: r.serving_generation,
            building_generation: r.building_generation,
            live_docs: r.live_docs,
            caught_up: r.caught_up,
            epoch: r.known_epoch,
            ahead: r.ahead.clone().unwrap_or_default(),
            failed,
        });
        let filling = view
            .shards
            .get(&(r.key.collection.clone(), r.key.index))
            .filter(|_| {
                view.collections
                    .get(&r.key.collection)
                    .is_some_and(|c| c.id == r.key.collection_id)
            })
            .is_some_and(|s| {
                s.replicas
                    .iter()
                    .any(|x| x.node_id == me && x.state == cpb::ReplicaState::Copying as i32)
            });
        if filling && r.caught_up {
            ready.push(r.key.shard_id());
        }
    }
    (out, ready)
}

/// Everything the heartbeat loop needs.
pub(super) struct Heartbeat {
    pub cfg: NodeConfig,
    pub advertised: String,
    pub view: Arc<RwLock<MapView>>,
    pub registry: Registry,
    pub identity: Arc<RwLock<Identity>>,
    pub disk: Arc<DiskGuard>,
    pub lease: Arc<Lease>,
    /// The map version of the leader's last answer (the map watch compares).
    pub leader_version: Arc<AtomicU64>,
    pub client: Client,
}

impl Heartbeat {
    /// Every `cfg.heartbeat`: the reports, the disk's levels; registers again when the
    /// coordinators declared this node down or do not know it.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        // The lease-too-short error is logged once per lease value, not every beat.
        let mut warned_lease = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let states: Vec<ReplicaState> = {
                let repls: Vec<Arc<Replication>> = self
                    .registry
                    .read()
                    .values()
                    .map(|h| h.repl.clone())
                    .collect();
                repls.iter().map(|r| ReplicaState::of(r)).collect()
            };
            let (reports, ready) = reports(&states, &self.view.read(), &self.cfg.id);
            let (dg, data_dir) = (self.disk.clone(), self.cfg.data_dir.clone());
            let (free, total, trash) = tokio::task::spawn_blocking(move || {
                let (free, total) = dg.usage().unwrap_or((0, 0));
                (free, total, replicas::trash_bytes(&data_dir))
            })
            .await
            .unwrap_or((0, 0, 0));
            let req = cpb::HeartbeatRequest {
                id: self.cfg.id.clone(),
                ready,
                replicas: reports,
                cluster_id: self.identity.read().cluster_id.clone(),
                disk_free_bytes: free,
                disk_total_bytes: total,
                disk_trash_bytes: trash,
            };
            let sent = Instant::now();
            let again = match self.client.heartbeat(req).await {
                Ok(r) if r.state == cpb::NodeState::Down as i32 => {
                    tracing::warn!("declared down by the coordinators; registering again");
                    self.lease.revoke();
                    true
                }
                Ok(r) => {
                    let lease = Duration::from_millis(r.lease_ms);
                    if lease <= self.cfg.heartbeat * 2 && warned_lease != Some(r.lease_ms) {
                        warned_lease = Some(r.lease_ms);
                        tracing::error!(
                            lease_ms = r.lease_ms,
                            heartbeat_ms = self.cfg.heartbeat.as_millis() as u64,
                            "the coordinators' lease (their suspect timeout) is not above two \
                             heartbeat periods: primaries will refuse writes between heartbeats"
                        );
                    }
                    self.lease.renew(sent, lease);
                    self.leader_version
                        .fetch_max(r.map_version, Ordering::AcqRel);
                    false
                }
                Err(s) if s.code() == tonic::Code::NotFound => true,
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tracing::error!(error = %s.message(), "heartbeat refused");
                    false
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "heartbeat failed");
                    false
                }
            };
            if again {
                let _ = register(
                    &mut self.client,
                    &self.cfg,
                    &self.advertised,
                    &self.identity,
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(collection_id: u64) -> ReplicaKey {
        ReplicaKey {
            collection: "c".into(),
            collection_id,
            index: 0,
        }
    }

    fn view(copying_on: &str, collection_id: u64) -> MapView {
        let mut v = MapView::default();
        v.collections.insert(
            "c".into(),
            cpb::Collection {
                name: "c".into(),
                id: collection_id,
                ..Default::default()
            },
        );
        v.shards.insert(
            ("c".into(), 0),
            cpb::Shard {
                collection: "c".into(),
                index: 0,
                primary: "p".into(),
                replicas: vec![
                    cpb::Replica {
                        node_id: "p".into(),
                        state: cpb::ReplicaState::Serving as i32,
                        ..Default::default()
                    },
                    cpb::Replica {
                        node_id: copying_on.into(),
                        state: cpb::ReplicaState::Copying as i32,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        v
    }

    fn open(collection_id: u64, caught_up: bool) -> ReplicaState {
        ReplicaState {
            key: key(collection_id),
            position: Some((7, 2)),
            serving_generation: 3,
            building_generation: 4,
            live_docs: 5,
            caught_up,
            known_epoch: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_caught_up_copy_of_this_incarnation_is_ready_and_nothing_else_is() {
        // (replica, map, what is ready)
        let cases = [
            (open(1, true), view("me", 1), true),
            (open(1, false), view("me", 1), false),
            // The map's copy is on another node.
            (open(1, true), view("other", 1), false),
            // The collection was dropped and created again: an old replica's catch-up
            // must not mark the new incarnation's copy ready.
            (open(1, true), view("me", 2), false),
        ];
        for (i, (r, v, want)) in cases.into_iter().enumerate() {
            let (reports, ready) = reports(std::slice::from_ref(&r), &v, "me");
            assert_eq!(reports.len(), 1, "case {i}");
            let id = reports[0].shard.clone().unwrap();
            assert_eq!((id.collection_id, id.index), (r.key.collection_id, 0));
            assert_eq!(
                (reports[0].applied_seq, reports[0].last_epoch),
                (7, 2),
                "case {i}"
            );
            assert_eq!(reports[0].building_generation, 4, "case {i}");
            assert_eq!(ready.len(), usize::from(want), "case {i}");
        }
    }

    #[test]
    fn a_replica_that_could_not_open_reports_only_its_failure() {
        let closed = ReplicaState {
            key: key(1),
            known_epoch: 3,
            failure: Some("x".repeat(5000)),
            ..Default::default()
        };
        let quiet = ReplicaState {
            key: key(1),
            ..Default::default()
        };
        let (reports, ready) = reports(&[closed, quiet], &view("me", 1), "me");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].failed.len(), FAILURE_BYTES);
        assert_eq!((reports[0].epoch, reports[0].applied_seq), (3, 0));
        assert!(ready.is_empty());
    }
}
