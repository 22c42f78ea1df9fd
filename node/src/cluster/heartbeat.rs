//! What a node tells the coordinators with each heartbeat: one report per hosted
//! replica (position, generations, catch-up, failure, a replica found ahead, and on a
//! primary the in-sync set changes it asks for). [`reports`] is pure, over [`ReplicaState`] snapshots
//! taken from the replicas' memory; `run` is the loop that sends them and acts on the
//! answer (the lease, planned handovers the leader asks for).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use tokio::sync::watch;

use super::builds::{BuildReport, Builds};
use super::disk::DiskGuard;
use super::handover;
use super::identity::Identity;
use super::ids::ReplicaKey;
use super::lease::Lease;
use super::replicas::Registry;
use super::replication::{InSyncReport, Replication};
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
    /// On a primary: its in-sync set changes to ask for.
    pub in_sync: InSyncReport,
    /// Its build for a cluster operation: queued, or why it failed (issue 18).
    pub build: BuildReport,
    /// The newest compaction operation its primary has done, and the batch its
    /// segments were last compacted at (issue 19).
    pub compacted_operation: u64,
    pub layout: u64,
    /// A primary sealed by a split with no write in flight (issue 19).
    pub sealed: bool,
    /// A backup or restore step its primary finished, or failed, and why (issue 20).
    pub finished_operation: u64,
    pub failed_operation: u64,
    pub operation_error: String,
    /// The rebuild operation whose generation it holds staged, and that one's id
    /// (issue 21).
    pub staged: (u64, u64),
}

impl ReplicaState {
    /// Reads a replica's state (memory only: no disk I/O). On a primary this takes its
    /// in-sync report, which marks the copies it reports (`Replication::in_sync_report`).
    pub fn of(r: &Replication) -> Self {
        let mut s = Self {
            key: r.key.clone(),
            caught_up: r.caught_up(),
            known_epoch: r.known_epoch(),
            sealed: r.sealed_and_drained(),
            ahead: r.ahead(),
            failure: r.failure(),
            in_sync: r.in_sync_report(),
            ..Self::default()
        };
        if let Ok(shard) = r.shard() {
            let stats = shard.stats();
            s.position = Some(shard.last());
            s.serving_generation = stats.serving.map_or(0, |g| g.id);
            s.building_generation = stats.building.unwrap_or(0);
            s.live_docs = stats.live_docs as u64;
            s.staged = stats.staged.map_or((0, 0), |g| (g.tag, g.id));
        }
        s
    }
}

/// Pure: the heartbeat's replica reports. A replica that could not open reports only
/// its failure (it has no position); a primary adds the in-sync set changes it asks for.
pub fn reports(replicas: &[ReplicaState]) -> Vec<cpb::ReplicaReport> {
    let mut out = Vec::with_capacity(replicas.len());
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
            lagging: r.in_sync.lagging.clone(),
            in_sync: r.in_sync.in_sync.clone(),
            compacted_operation: r.compacted_operation,
            layout: r.layout,
            sealed: r.sealed,
            finished_operation: r.finished_operation,
            failed_operation: r.failed_operation,
            operation_error: {
                let mut e = r.operation_error.clone();
                e.truncate(e.floor_char_boundary(FAILURE_BYTES));
                e
            },
            staged_operation: r.staged.0,
            staged_generation: r.staged.1,
            gate: {
                let mut g = r.build.gate.clone();
                g.truncate(g.floor_char_boundary(FAILURE_BYTES));
                g
            },
            build_operation: r.build.operation,
            build_queued: r.build.queued,
            build_error: {
                let mut e = r.build.error.clone();
                e.truncate(e.floor_char_boundary(FAILURE_BYTES));
                e
            },
        });
    }
    out
}

/// Everything the heartbeat loop needs.
pub(super) struct Heartbeat {
    pub cfg: NodeConfig,
    pub advertised: String,
    pub registry: Registry,
    pub identity: Arc<RwLock<Identity>>,
    pub disk: Arc<DiskGuard>,
    pub lease: Arc<Lease>,
    /// The map version of the leader's last answer (the map watch compares).
    pub leader_version: Arc<AtomicU64>,
    pub client: Client,
    pub builds: Arc<Builds>,
    pub compactions: Arc<super::compactions::Compactions>,
    pub backups: Arc<super::backups::Backups>,
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
                repls
                    .iter()
                    .map(|r| {
                        let mut s = ReplicaState::of(r);
                        s.build = self.builds.report(&r.key);
                        (s.compacted_operation, s.layout) =
                            self.compactions.report(&r.key, r.shard().ok().as_ref());
                        (s.finished_operation, s.failed_operation, s.operation_error) =
                            self.backups.report(&r.key);
                        s
                    })
                    .collect()
            };
            // Compactions due on this node's primaries are logged (in the background).
            self.compactions.tick();
            let mut reports = reports(&states);
            // A restore that failed before its replica opened reports on its own.
            let hosted = states.iter().map(|s| s.key.clone()).collect();
            reports.extend(self.backups.unhosted_failures(&hosted));
            let (dg, data_dir) = (self.disk.clone(), self.cfg.data_dir.clone());
            let (free, total, trash) = tokio::task::spawn_blocking(move || {
                let (free, total) = dg.usage().unwrap_or((0, 0));
                (free, total, replicas::trash_bytes(&data_dir))
            })
            .await
            .unwrap_or((0, 0, 0));
            let req = cpb::HeartbeatRequest {
                id: self.cfg.id.clone(),
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
                    self.lease.renew_at(sent, lease, r.map_version);
                    self.leader_version
                        .fetch_max(r.map_version, Ordering::AcqRel);
                    if !r.hand_over.is_empty() {
                        let from = handover::From {
                            node_id: self.cfg.id.clone(),
                            cluster_id: self.identity.read().cluster_id.clone(),
                        };
                        handover::asked(&self.registry, &self.client, &from, r.hand_over);
                    }
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

    #[test]
    fn an_open_replica_reports_its_position_and_a_primary_its_in_sync_asks() {
        let r = ReplicaState {
            key: key(1),
            position: Some((7, 2)),
            serving_generation: 3,
            building_generation: 4,
            live_docs: 5,
            caught_up: true,
            known_epoch: 2,
            in_sync: InSyncReport {
                lagging: vec!["b".into()],
                in_sync: vec!["c".into()],
            },
            ..Default::default()
        };
        let reports = reports(std::slice::from_ref(&r));
        assert_eq!(reports.len(), 1);
        let id = reports[0].shard.clone().unwrap();
        assert_eq!((id.collection_id, id.index), (1, 0));
        assert_eq!((reports[0].applied_seq, reports[0].last_epoch), (7, 2));
        assert_eq!(reports[0].building_generation, 4);
        assert_eq!(reports[0].lagging, vec!["b".to_string()]);
        assert_eq!(reports[0].in_sync, vec!["c".to_string()]);
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
        let reports = reports(&[closed, quiet]);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].failed.len(), FAILURE_BYTES);
        assert_eq!((reports[0].epoch, reports[0].applied_seq), (3, 0));
    }
}
