//! Primary-backup replication of one shard. The map names a primary and an epoch per
//! shard. The primary orders writes (sequence numbers in its log, stamped with the
//! epoch), ships them to every backup in order, one replicator task per backup, and
//! acknowledges a write once every replica of the shard's in-sync set holds it durably
//! (issue 16, the PacificA / Kafka ISR rule). The set is the map's serving replicas; a
//! replica leaves it only through a committed map change (its primary reports it
//! lagging, its node turns suspect, it fails), never on the primary's own judgement, so
//! a primary cut off from the coordinators cannot drop a backup and go on alone, and
//! every serving replica, the only ones a promotion picks from, holds every
//! acknowledged write. A copy joins the set on its primary's word: the primary first
//! admits it (waits for it on every write from then on), then reports it once it holds
//! everything logged at that moment, and only then does the map count it. Writes need
//! at least two in-sync replicas at RF >= 2 (or the collection's write quorum). A backup
//! accepts batches only from an epoch at least as new as any it has seen (so a
//! deposed primary is fenced) and only when they follow its own history exactly; a
//! backup that is behind catches up from the primary's recent log, and one whose log
//! the primary no longer holds, or whose history diverged (writes a deposed primary
//! never got acknowledged), is replaced by a snapshot of the primary's segments.
//!
//! Positions decide who is the source (issue 14): a backup whose position (the epoch of
//! its last batch, then its sequence number) is past the primary's may hold
//! acknowledged writes the primary lost, so it is never overwritten; the primary takes
//! no more writes and reports it, and the coordinators promote the most up-to-date
//! replica. A primary takes its first write of an epoch only once it has probed the
//! backups its quorum needs. Only an operator's forced epoch (data loss accepted)
//! lets a primary overwrite a replica that holds more.
//!
//! The module by role: [`role`] (the map's view of the replica set, the quorum, and
//! the pure decisions of who overwrites whom), [`recent`] (the recent log and the pure
//! choice of what a backup gets next), `primary` (writes, the quorum wait, one
//! replicator task per backup, reaching each through `transport::Transports`),
//! `backup` (appends, fencing, snapshot receive) and [`status`] (engine errors as
//! gRPC codes). Replica states and epochs:
//!
//! ```text
//!   map: Copying --ReplicaReady--> Serving --ReplicaFailed / Evict--> Copying / gone
//!   epoch e: primary P writes (e, seq); a promotion makes epoch e+1 with primary Q,
//!   whose history records e+1 starting after its last batch. A backup's batches of an
//!   older epoch past that start are Diverged (replaced by a snapshot); a backup past
//!   the primary in its own epoch or a newer one is Ahead (never overwritten unless
//!   outside the quorum or forced).
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use shoal_engine::Shard;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::disk::DiskGuard;
use super::ids::ReplicaKey;
use super::lease::Lease;
use super::transport::Transports;
use crate::cluster::error::ReplicaError;

mod backup;
mod primary;
pub mod recent;
pub mod role;

pub use backup::staging_dir;
pub use role::{standing, Lag, Peer, Quorum, Role, Standing};

use recent::Recent;

/// A primary ready to hand its role over: `to` holds its last batch (`last_epoch`,
/// `last_seq`); it leads at `epoch` and takes no writes meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    pub to: String,
    pub epoch: u64,
    pub last_seq: u64,
    pub last_epoch: u64,
}

/// How long a write waits for its quorum before reporting an unknown outcome.
pub const QUORUM_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on each replica's recent log (bytes, roughly): as much as the shard's
/// write-ahead log holds between checkpoints, so a restart can rebuild all of it.
pub const RECENT_LOG_BYTES: usize = 64 << 20;
/// Largest payload of one Append call.
const APPEND_BYTES: usize = 2 << 20;
/// Snapshot files travel in chunks of this size.
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// An idle primary still tells its backups where it stands this often.
const KEEPALIVE: Duration = Duration::from_millis(250);
/// Default lag timeout: a serving backup that has not caught up with its primary for
/// this long is reported lagging and leaves the in-sync set. Writes wait for it
/// meanwhile, so with the heartbeat and the map change it stays well below the
/// 10 s [`QUORUM_TIMEOUT`].
pub const LAG_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a leaving primary keeps its writes stopped for the copy that replaces it
/// to be reported in sync and promoted (a heartbeat and a map change, well under a
/// second in the chaos tests), before it takes writes again and tries later.
pub const HANDOVER_PATIENCE: Duration = Duration::from_secs(5);

/// A copy this primary waits for on every write (issue 16): admitted at `epoch` once
/// it held the primary's last batch; reported in sync once it holds `from`, everything
/// logged when it was admitted (so every write acknowledged without it, too).
#[derive(Clone, Copy, Debug)]
struct Admitted {
    epoch: u64,
    from: u64,
    reported: bool,
}

/// What a primary tells the coordinators about its in-sync set with a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InSyncReport {
    /// Serving backups lagging past the lag timeout: to leave the set.
    pub lagging: Vec<String>,
    /// Admitted copies that hold everything acknowledged: to join it.
    pub in_sync: Vec<String>,
}

struct Replicator {
    epoch: u64,
    addr: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct Replication {
    pub key: ReplicaKey,
    node_id: String,
    shard: RwLock<Option<Shard>>,
    role: RwLock<Option<Role>>,
    /// The newest epoch this replica has seen, from the map or from a primary.
    known_epoch: AtomicU64,
    /// A backup that holds everything its primary had when it last heard from it.
    caught_up: AtomicBool,
    /// Shared with the blocking writes, which remember each batch as they log it: a
    /// write whose caller went away still lands in the recent log.
    recent: Arc<Mutex<Recent>>,
    /// Per backup node: the highest sequence number it holds durably.
    matched: watch::Sender<HashMap<String, u64>>,
    appended: Notify,
    replicators: Mutex<HashMap<String, Replicator>>,
    /// Serialises a backup's appends and snapshot installs.
    apply: tokio::sync::Mutex<()>,
    /// How the primary reaches its backups.
    transports: Arc<Transports>,
    /// This primary is handing its role over (its node shutting down, a planned move
    /// asked by the leader, or it leaves the shard): new writes are refused (retried by
    /// clients) so the successor can hold everything first, and no write is
    /// acknowledged meanwhile (one the successor holds is answered by it on a retry).
    /// The epoch handed over (0 = none): a later epoch, as primary again, takes writes.
    handing_over: AtomicU64,
    /// The epoch this primary is sealed at by a split (0 = none; issue 19): new writes
    /// refused (retried by gateways) until the cut-over. Apart from the role so a
    /// write's check after it counts itself in `appending` pairs with
    /// [`Replication::sealed_and_drained`]'s reading of both.
    sealed: AtomicU64,
    /// The ids this replica answers for: its shard of the collection's current shard
    /// count (issue 19), from the map; given to every engine handle it opens.
    routing: Mutex<Option<shoal_proto::routing::Routing>>,
    /// Writes between their handover check and their local append: a handover waits
    /// for none before it reads the last batch its successor must hold.
    appending: AtomicUsize,
    /// On a leaving primary: since when it has stopped writes for the copy joining the
    /// in-sync set (see [`HANDOVER_PATIENCE`]).
    leaving_since: Mutex<Option<std::time::Instant>>,
    /// On a primary: a backup found ahead of it (node, its seq, its epoch), at the
    /// role's epoch. No writes until another replica is promoted.
    ahead: Mutex<Option<(u64, String, u64, u64)>>,
    /// On a primary: the backups probed (node -> the role epoch of the probe), whose
    /// position is known not to be past this one's.
    probed: Mutex<HashMap<String, u64>>,
    /// The data volume's flood stage: no write, as primary or backup, below it.
    disk: Arc<DiskGuard>,
    /// The node's primary lease: no acknowledgement as primary without it.
    lease: Arc<Lease>,
    /// On a primary: backups refusing batches for lack of disk space (node -> why).
    refusing: Mutex<HashMap<String, String>>,
    /// On a primary: the copies it admitted to its write quorum (node -> admission).
    admitted: Mutex<HashMap<String, Admitted>>,
    /// On a primary: how far behind each member of its write quorum is.
    lag: Mutex<Lag>,
    /// On a primary: backups a snapshot is being sent to (reported lagging at once:
    /// a transfer may take minutes, and writes must not wait for it).
    snapshotting: Mutex<std::collections::HashSet<String>>,
    lag_timeout: Duration,
    /// Why the replica could not be opened, until it is.
    open_failure: Mutex<Option<String>>,
}

impl Replication {
    pub fn new(
        key: ReplicaKey,
        node_id: String,
        transports: Arc<Transports>,
        recent_log_bytes: usize,
        disk: Arc<DiskGuard>,
        lease: Arc<Lease>,
        lag_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            disk,
            lease,
            admitted: Mutex::default(),
            lag: Mutex::default(),
            snapshotting: Mutex::default(),
            lag_timeout,
            key,
            node_id,
            shard: RwLock::new(None),
            role: RwLock::new(None),
            known_epoch: AtomicU64::new(0),
            caught_up: AtomicBool::new(false),
            recent: Arc::new(Mutex::new(Recent::new(recent_log_bytes, 0))),
            matched: watch::Sender::new(HashMap::new()),
            appended: Notify::new(),
            replicators: Mutex::default(),
            apply: tokio::sync::Mutex::new(()),
            transports,
            handing_over: AtomicU64::new(0),
            sealed: AtomicU64::new(0),
            routing: Mutex::new(None),
            appending: AtomicUsize::new(0),
            leaving_since: Mutex::new(None),
            ahead: Mutex::new(None),
            probed: Mutex::default(),
            refusing: Mutex::default(),
            open_failure: Mutex::default(),
        })
    }

    /// Why this replica cannot serve its role: it failed to open, or a write failed
    /// and poisoned its engine. Reported to the coordinators, which take it out of its
    /// shard's quorum (issue 14) until it is reopened and caught up.
    pub fn failure(&self) -> Option<String> {
        if let Some(s) = self.shard.read().as_ref() {
            return s.failure();
        }
        self.open_failure.lock().clone()
    }

    /// Records the outcome of opening the replica (`None`: it opened).
    pub fn set_open_failure(&self, why: Option<String>) {
        *self.open_failure.lock() = why;
    }

    /// The replica found ahead of this primary in its current epoch, if any (reported
    /// to the coordinators, which promote the most up-to-date replica).
    pub fn ahead(&self) -> Option<String> {
        let epoch = self.role().filter(|r| r.is_primary)?.epoch;
        self.ahead
            .lock()
            .as_ref()
            .filter(|a| a.0 == epoch)
            .map(|a| a.1.clone())
    }

    /// The open shard engine (set by the replica actor when it opens or reopens).
    pub fn shard(&self) -> Result<Shard, ReplicaError> {
        self.shard
            .read()
            .clone()
            .ok_or_else(|| ReplicaError::Unavailable(format!("replica {} is not open", self.key)))
    }

    /// Sets the open engine (opened, reopened after a crash, or replaced by a
    /// snapshot). The recent log restarts from what its write-ahead log replayed: the
    /// batches held before may not be this engine's history any more.
    pub fn set_shard(&self, s: Shard) {
        let replayed = s.take_replayed();
        let mut r = self.recent.lock();
        *r = Recent::new(r.cap, s.last().0);
        r.remember(replayed);
        s.set_routing(*self.routing.lock());
        *self.shard.write() = Some(s);
    }

    /// The shard's routing now (the map's shard count); the engine's reads skip ids it
    /// sends elsewhere (a split's other half, until the retain deletes it).
    pub fn set_routing(&self, r: shoal_proto::routing::Routing) {
        let mut cur = self.routing.lock();
        if *cur != Some(r) {
            *cur = Some(r);
            if let Some(s) = self.shard.read().as_ref() {
                s.set_routing(Some(r));
            }
        }
    }

    pub fn routing(&self) -> Option<shoal_proto::routing::Routing> {
        *self.routing.lock()
    }

    /// A request routed by `shard_count` shards (0: the caller does not say) against
    /// this replica's: another count means one side's map is behind a split's
    /// cut-over, and answering would miss or double half a shard (issue 19). Retryable.
    pub fn check_routing(&self, shard_count: u32) -> Result<(), ReplicaError> {
        match self.routing() {
            _ if shard_count == 0 => Ok(()),
            Some(r) if r.modulus == shard_count => Ok(()),
            Some(r) => Err(ReplicaError::Moving(format!(
                "shard {} was routed to by {shard_count} shards, and its collection has {} \
                 here: a map is behind a split; retry",
                self.key, r.modulus
            ))),
            None => Err(ReplicaError::Moving(format!(
                "replica {} does not know its routing yet; retry",
                self.key
            ))),
        }
    }

    /// Takes the engine out and retires it, so a dropped handle never checkpoints
    /// into a directory a new handle (or a snapshot) now owns.
    pub fn retire_shard(&self) {
        if let Some(s) = self.shard.write().take() {
            s.retire();
        }
    }

    /// Lets go of the engine (a clean close: the last handle checkpoints it).
    pub fn release_shard(&self) {
        self.shard.write().take();
    }

    /// Bytes held in the recent log (for the node's memory gauge).
    pub fn recent_log_bytes(&self) -> usize {
        self.recent.lock().bytes
    }

    pub fn role(&self) -> Option<Role> {
        self.role.read().clone()
    }

    pub fn known_epoch(&self) -> u64 {
        self.known_epoch.load(Ordering::SeqCst)
    }

    /// True on a primary; on a backup, once it has everything its primary sent.
    pub fn caught_up(&self) -> bool {
        self.role.read().as_ref().is_some_and(|r| r.is_primary)
            || self.caught_up.load(Ordering::Acquire)
    }

    /// Reads are served by the primary and by backups that are caught up.
    pub fn check_readable(&self) -> Result<(), ReplicaError> {
        if self.caught_up() {
            Ok(())
        } else {
            Err(ReplicaError::Unavailable(format!(
                "replica {} on {} is catching up with its primary",
                self.key, self.node_id
            )))
        }
    }

    /// Applies the map's view of this replica set: starts or stops the replicators.
    pub fn set_role(self: &Arc<Self>, role: Role) {
        let previous = self.known_epoch.fetch_max(role.epoch, Ordering::SeqCst);
        // After the epoch (a write at the old one, seeing no handover, sees it fenced).
        if !(role.is_primary && role.leaving) && self.leaving_since.lock().take().is_some() {
            // Handed over, or the move was undone (an undrain): as primary, writes again.
            self.cancel_handover();
        }
        if !role.is_primary && role.epoch > previous {
            // A new epoch: hear from the new primary before serving reads again.
            self.caught_up.store(false, Ordering::Release);
        }
        let mut reps = self.replicators.lock();
        if role.is_primary && role.epoch >= self.known_epoch() {
            let wanted: HashMap<&str, &Peer> =
                role.peers.iter().map(|p| (p.node.as_str(), p)).collect();
            reps.retain(|node, r| {
                let keep = wanted
                    .get(node.as_str())
                    .is_some_and(|p| p.addr == r.addr && r.epoch == role.epoch);
                if !keep {
                    let _ = r.stop.send(true);
                }
                keep
            });
            for p in &role.peers {
                if !reps.contains_key(&p.node) {
                    let (stop, rx) = watch::channel(false);
                    let task = tokio::spawn(self.clone().replicate_to(
                        p.node.clone(),
                        p.addr.clone(),
                        role.epoch,
                        rx,
                    ));
                    reps.insert(
                        p.node.clone(),
                        Replicator {
                            epoch: role.epoch,
                            addr: p.addr.clone(),
                            stop,
                            task,
                        },
                    );
                }
            }
        } else {
            for (_, r) in reps.drain() {
                let _ = r.stop.send(true);
            }
        }
        drop(reps);
        // Admissions hold within their epoch, for copies that are still copies (one the
        // map now serves is in the set anyway).
        self.admitted.lock().retain(|node, a| {
            role.is_primary
                && a.epoch == role.epoch
                && role.peers.iter().any(|p| &p.node == node && p.is_copy())
        });
        self.sealed.store(
            if role.sealed && role.is_primary {
                role.epoch
            } else {
                0
            },
            Ordering::SeqCst,
        );
        *self.role.write() = Some(role);
        // Writes waiting for their quorum re-read it.
        self.matched.send_modify(|_| {});
    }

    /// Stops taking writes and waits (up to `within`) until a live serving backup (`to`,
    /// when named) holds everything this primary logged; returns that backup and the
    /// position. Writes already past their check finish logging first, so the position
    /// covers every write this primary logs at its epoch.
    pub async fn prepare_handover(&self, within: Duration, to: Option<&str>) -> Option<Handover> {
        let role = self.role().filter(|r| r.is_primary)?;
        self.handing_over.store(role.epoch, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        while self.appending.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (last, last_epoch) = self.shard().ok()?.last();
        // In-sync backups on live nodes.
        let candidates: Vec<String> = role
            .peers
            .iter()
            .filter(|p| p.serving && p.live && to.is_none_or(|to| p.node == to))
            .map(|p| p.node.clone())
            .collect();
        let mut rx = self.matched.subscribe();
        let wait = async {
            loop {
                let held = candidates
                    .iter()
                    .find(|n| rx.borrow_and_update().get(*n).is_some_and(|&m| m >= last))
                    .cloned();
                if held.is_some() {
                    return held;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        let to = tokio::time::timeout_at(deadline, wait)
            .await
            .ok()
            .flatten()?;
        Some(Handover {
            to,
            epoch: role.epoch,
            last_seq: last,
            last_epoch,
        })
    }

    /// A sealed primary with no write between its checks and its log (issue 19): its
    /// last batch is where the shard's log ends until the split's cut-over.
    pub fn sealed_and_drained(&self) -> bool {
        let epoch = self.role().filter(|r| r.is_primary).map_or(0, |r| r.epoch);
        epoch > 0
            && self.sealed.load(Ordering::SeqCst) == epoch
            && self.appending.load(Ordering::SeqCst) == 0
    }

    pub(super) fn sealed_at(&self, epoch: u64) -> bool {
        epoch > 0 && self.sealed.load(Ordering::SeqCst) == epoch
    }

    /// Whether this primary is handing its role over (writes refused meanwhile).
    pub fn handing_over(&self) -> bool {
        self.handing_over_at(self.role().map_or(0, |r| r.epoch))
    }

    /// Whether this primary is handing over its role at `epoch`.
    pub(super) fn handing_over_at(&self, epoch: u64) -> bool {
        epoch > 0 && self.handing_over.load(Ordering::SeqCst) == epoch
    }

    /// The copies admitted to this primary's write quorum at `epoch`.
    pub(super) fn admitted_at(&self, epoch: u64) -> Vec<String> {
        self.admitted
            .lock()
            .iter()
            .filter(|(_, a)| a.epoch == epoch)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Admits copy `node` to the write quorum once it holds `matched` >= this
    /// primary's last batch (issue 16). Under the admission lock, which every write's
    /// quorum check also takes: a write acknowledged without the copy was logged before
    /// the admission, so at or below the `from` read here.
    pub(super) fn admit(&self, node: &str, epoch: u64, matched: u64) {
        let Some(role) = self.role().filter(|r| r.is_primary && r.epoch == epoch) else {
            return;
        };
        if !role.peers.iter().any(|p| p.node == node && p.is_copy()) {
            return;
        }
        let Ok(shard) = self.shard() else { return };
        let mut a = self.admitted.lock();
        if a.get(node).is_some_and(|a| a.epoch == epoch) || matched < shard.last().0 {
            return;
        }
        let from = shard.last().0;
        a.insert(
            node.to_string(),
            Admitted {
                epoch,
                from,
                reported: false,
            },
        );
        drop(a);
        tracing::info!(shard = %self.key, copy = node, from, "copy caught up: writes wait for it from now on");
        // Writes waiting re-read their quorum.
        self.matched.send_modify(|_| {});
    }

    /// On a primary, for the heartbeat: its serving backups lagging past the lag
    /// timeout, and the admitted copies that hold everything acknowledged (marked
    /// reported: from now on only a map change takes them out of the write quorum). An
    /// admitted copy that lags before it was reported is dropped from the quorum again.
    pub fn in_sync_report(&self) -> InSyncReport {
        let Some(role) = self.role().filter(|r| r.is_primary) else {
            return InSyncReport::default();
        };
        let Ok(shard) = self.shard() else {
            return InSyncReport::default();
        };
        let now = std::time::Instant::now();
        let last = shard.last().0;
        let matched = self.matched.borrow().clone();
        let held = |n: &str| matched.get(n).copied().unwrap_or(0);
        let mut admitted = self.admitted.lock();
        let quorum = role.quorum(
            &admitted
                .iter()
                .filter(|(_, a)| a.epoch == role.epoch)
                .map(|(n, _)| n.clone())
                .collect::<Vec<_>>(),
        );
        let mut lag = self.lag.lock();
        lag.retain(|n| quorum.members.iter().any(|m| m == n));
        for m in &quorum.members {
            lag.observe(m, held(m), last, now);
        }
        let mut lagging = lag.lagging(now, self.lag_timeout);
        lagging.extend(self.snapshotting.lock().iter().cloned());
        lagging.sort();
        lagging.dedup();
        let member = |n: &str| role.peers.iter().any(|p| p.node == n && p.in_sync());
        let before = admitted.len();
        admitted.retain(|n, a| {
            let drop = !a.reported && lagging.contains(n);
            if drop {
                tracing::info!(shard = %self.key, copy = %n, "admitted copy fell behind before it joined the in-sync set; writes stop waiting for it");
            }
            !drop
        });
        if admitted.len() < before {
            self.matched.send_modify(|_| {});
        }
        let mut in_sync: Vec<String> = admitted
            .iter()
            .filter(|(n, a)| a.epoch == role.epoch && held(n) >= a.from)
            .map(|(n, _)| n.clone())
            .collect();
        if role.leaving {
            in_sync = self.leaving_hands_over(in_sync, role.epoch, &shard, &held);
        }
        for n in &in_sync {
            if let Some(a) = admitted.get_mut(n) {
                a.reported = true;
            }
        }
        in_sync.sort();
        InSyncReport {
            lagging: lagging.into_iter().filter(|n| member(n)).collect(),
            in_sync,
        }
    }

    /// On a leaving primary (a drain or a move of its replica), the copies it may report
    /// in sync: the copy that joins takes the primary role with the map change (issue
    /// 16), so writes stop first, and a copy is reported only once it holds every write
    /// logged. Writes resume if the map has not moved within [`HANDOVER_PATIENCE`].
    fn leaving_hands_over(
        &self,
        ready: Vec<String>,
        epoch: u64,
        shard: &Shard,
        held: &dyn Fn(&str) -> u64,
    ) -> Vec<String> {
        let mut since = self.leaving_since.lock();
        let now = std::time::Instant::now();
        match *since {
            Some(t) if now.saturating_duration_since(t) > HANDOVER_PATIENCE => {
                tracing::warn!(shard = %self.key, "the copy replacing this leaving primary was not promoted in time; taking writes again");
                *since = None;
                self.cancel_handover();
                return Vec::new();
            }
            _ if ready.is_empty() => return ready,
            Some(_) => {}
            None => {
                tracing::info!(shard = %self.key, copies = ?ready, "leaving primary stops writes to hand its role to the copy that joins");
                *since = Some(now);
                self.handing_over.store(epoch, Ordering::SeqCst);
            }
        }
        if self.appending.load(Ordering::SeqCst) > 0 {
            return Vec::new();
        }
        let last = shard.last().0;
        ready.into_iter().filter(|n| held(n) >= last).collect()
    }

    /// Takes writes again (a handover that did not happen).
    pub fn cancel_handover(&self) {
        self.handing_over.store(0, Ordering::SeqCst);
    }

    /// Stops the replicators (the replica is closing).
    pub fn stop(&self) {
        for (_, r) in self.replicators.lock().drain() {
            let _ = r.stop.send(true);
            r.task.abort();
        }
    }
}
