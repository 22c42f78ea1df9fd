//! Primary-backup replication of one shard. The map names a primary and an epoch per
//! shard. The primary orders writes (sequence numbers in its log, stamped with the
//! epoch), ships them to every backup in order, one replicator task per backup, and
//! acknowledges a write once the write quorum holds it durably: every live serving
//! replica, and at least two when the replication factor is two or more. A backup
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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use shoal_proto::replica as rpb;
use shoal_proto::replica::replica_client::ReplicaClient;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use super::disk::DiskGuard;
use super::replicas::ReplicaKey;
use crate::shard::{self, epoch_at, Shard, ShardError, WalBatch, WriteAck, WriteOp};

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

/// gRPC channels to other nodes' internal ports, shared by the gateway and replicators.
#[derive(Default)]
pub struct Channels(Mutex<HashMap<String, Channel>>);

impl Channels {
    pub fn client(&self, addr: &str) -> Result<ReplicaClient<Channel>, Status> {
        let mut ch = self.0.lock();
        let c = match ch.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| Status::internal(format!("bad node address {addr:?}: {e}")))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .connect_lazy();
                ch.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(ReplicaClient::new(c)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }
}

/// Another replica of the shard, as the map has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub addr: String,
    /// Serving (not a copy in progress, not leaving): counts towards the quorum.
    pub serving: bool,
    /// Its node is up (or draining): the quorum waits for it.
    pub live: bool,
}

/// This replica's place in its replica set, from the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub epoch: u64,
    pub primary: String,
    pub is_primary: bool,
    pub peers: Vec<Peer>,
    pub replication_factor: u32,
    /// The collection's write quorum (replicas, the primary included); 0 = default.
    pub write_quorum: u32,
    /// An operator started this epoch accepting data loss: the primary's copy is the
    /// shard, replacing replicas that hold more.
    pub forced: bool,
}

impl Role {
    /// The backups that count towards a write's quorum (live and serving) and how
    /// many of them must hold it: by default all of them, and at least one when the
    /// replication factor is 2 or more; with an explicit quorum `q`, any `q - 1`.
    pub fn quorum(&self) -> (Vec<String>, usize) {
        let peers: Vec<String> = self
            .peers
            .iter()
            .filter(|p| p.serving && p.live)
            .map(|p| p.node.clone())
            .collect();
        let needed = match self.write_quorum {
            0 => peers.len().max(usize::from(self.replication_factor >= 2)),
            q => q as usize - 1,
        };
        (peers, needed)
    }

    /// Pure: whether this primary (at `epoch`) may overwrite what backup `node` holds
    /// past it: only on an operator's forced epoch, or when that backup is a copy
    /// outside the quorum (a replica that failed and left it, or a move's target),
    /// whose extra batches were never acknowledged. A serving backup ahead, never.
    pub fn overwrites_ahead(&self, epoch: u64, node: &str) -> bool {
        self.epoch == epoch
            && (self.forced || self.peers.iter().any(|p| p.node == node && !p.serving))
    }
}

/// Where a backup stands against its primary, from the primary's probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its history is a prefix of the primary's: ship what follows.
    Prefix,
    /// It holds batches of an older epoch the primary never had (a deposed primary's,
    /// never acknowledged): replaced by a snapshot.
    Diverged,
    /// Its position is past the primary's: it may hold acknowledged writes the primary
    /// lost (an emptied or older volume). Never overwritten.
    Ahead,
}

/// Pure: compares a backup's (last sequence, epoch of that batch) with the primary's
/// history. `forced`: what the backup holds past the primary may be overwritten (the
/// primary's epoch was forced by an operator, or the backup is a copy outside the
/// quorum), so a backup ahead is replaced like a diverged one.
pub fn standing(
    epochs: &[(u64, u64)],
    last: u64,
    backup_seq: u64,
    backup_epoch: u64,
    forced: bool,
) -> Standing {
    let own = (epoch_at(epochs, last), last);
    if backup_seq <= last && epoch_at(epochs, backup_seq) == backup_epoch {
        Standing::Prefix
    } else if (backup_epoch, backup_seq) > own && !forced {
        Standing::Ahead
    } else {
        Standing::Diverged
    }
}

pub fn shard_status(e: ShardError) -> Status {
    match e {
        ShardError::InvalidDocument { .. }
        | ShardError::InvalidQuery(_)
        | ShardError::InvalidConfig(_) => Status::invalid_argument(e.to_string()),
        ShardError::NotEnoughVectors { .. } | ShardError::BuildInProgress(_) => {
            Status::failed_precondition(e.to_string())
        }
        e => Status::internal(e.to_string()),
    }
}

/// Recent batches by sequence number, each with its size (counted once, on insert):
/// always a contiguous run of the local shard's own history. Kept on backups too, so a
/// backup promoted after a failover can catch the others up batch by batch.
struct Recent {
    batches: BTreeMap<u64, (Arc<WalBatch>, usize)>,
    bytes: usize,
    cap: usize,
    /// The shard's last sequence number when the log was (re)started: every later
    /// batch is remembered once it is written (or applied, on a backup).
    floor: u64,
}

/// Whether the recent log can ship a batch.
#[derive(Debug, PartialEq, Eq)]
enum Hold {
    Held,
    /// Written to the shard but not remembered yet (the writer is between the two):
    /// held in a moment.
    Pending,
    /// Older than anything held: only a snapshot catches up from there.
    Gone,
}

impl Recent {
    fn new(cap: usize, floor: u64) -> Self {
        Self {
            batches: BTreeMap::new(),
            bytes: 0,
            cap,
            floor,
        }
    }

    fn hold(&self, seq: u64) -> Hold {
        let newest = self.batches.last_key_value().map_or(0, |(&s, _)| s);
        if self.batches.contains_key(&seq) {
            Hold::Held
        } else if seq > newest.max(self.floor) {
            Hold::Pending
        } else {
            Hold::Gone
        }
    }

    fn remember(&mut self, batches: impl IntoIterator<Item = Arc<WalBatch>>) {
        for b in batches {
            let size = b.approx_bytes();
            if let Some((_, old)) = self.batches.insert(b.seq, (b, size)) {
                self.bytes -= old;
            }
            self.bytes += size;
        }
        while self.bytes > self.cap && self.batches.len() > 1 {
            if let Some((_, (_, old))) = self.batches.pop_first() {
                self.bytes -= old;
            }
        }
    }
}

struct Replicator {
    epoch: u64,
    addr: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct Replication {
    pub key: ReplicaKey,
    pub collection_id: u64,
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
    channels: Arc<Channels>,
    /// The node is shutting down and handing this primary role over: new writes are
    /// refused (retried by clients) so the backup can hold everything first.
    handing_over: AtomicBool,
    /// On a primary: a backup found ahead of it (node, its seq, its epoch), at the
    /// role's epoch. No writes until another replica is promoted.
    ahead: Mutex<Option<(u64, String, u64, u64)>>,
    /// On a primary: the backups probed (node -> the role epoch of the probe), whose
    /// position is known not to be past this one's.
    probed: Mutex<HashMap<String, u64>>,
    /// The data volume's flood stage: no write, as primary or backup, below it.
    disk: Arc<DiskGuard>,
    /// On a primary: backups refusing batches for lack of disk space (node -> why).
    refusing: Mutex<HashMap<String, String>>,
    /// Why the replica could not be opened, until it is.
    open_failure: Mutex<Option<String>>,
}

impl Replication {
    pub fn new(
        key: ReplicaKey,
        node_id: String,
        channels: Arc<Channels>,
        recent_log_bytes: usize,
        disk: Arc<DiskGuard>,
    ) -> Arc<Self> {
        Arc::new(Self {
            disk,
            collection_id: key.collection_id,
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
            channels,
            handing_over: AtomicBool::new(false),
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
    pub fn shard(&self) -> Result<Shard, Status> {
        self.shard
            .read()
            .clone()
            .ok_or_else(|| Status::unavailable(format!("replica {} is not open", self.key)))
    }

    /// Sets the open engine (opened, reopened after a crash, or replaced by a
    /// snapshot). The recent log restarts from what its write-ahead log replayed: the
    /// batches held before may not be this engine's history any more.
    pub fn set_shard(&self, s: Shard) {
        let replayed = s.take_replayed();
        let mut r = self.recent.lock();
        *r = Recent::new(r.cap, s.last().0);
        r.remember(replayed);
        *self.shard.write() = Some(s);
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
        self.known_epoch.load(Ordering::Acquire)
    }

    /// True on a primary; on a backup, once it has everything its primary sent.
    pub fn caught_up(&self) -> bool {
        self.role.read().as_ref().is_some_and(|r| r.is_primary)
            || self.caught_up.load(Ordering::Acquire)
    }

    /// Reads are served by the primary and by backups that are caught up.
    pub fn check_readable(&self) -> Result<(), Status> {
        if self.caught_up() {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "replica {} on {} is catching up with its primary",
                self.key, self.node_id
            )))
        }
    }

    /// Applies the map's view of this replica set: starts or stops the replicators.
    pub fn set_role(self: &Arc<Self>, role: Role) {
        let previous = self.known_epoch.fetch_max(role.epoch, Ordering::AcqRel);
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
        *self.role.write() = Some(role);
        // Writes waiting for their quorum re-read it.
        self.matched.send_modify(|_| {});
    }

    /// Stops taking writes and waits (up to `within`) until a live serving backup
    /// holds everything this primary logged; returns that backup's node id.
    pub async fn prepare_handover(&self, within: Duration) -> Option<String> {
        self.handing_over.store(true, Ordering::Release);
        let role = self.role().filter(|r| r.is_primary)?;
        let last = self.shard().ok()?.last().0;
        // The backups that count towards writes: live and serving.
        let (candidates, _) = role.quorum();
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
        tokio::time::timeout(within, wait).await.ok().flatten()
    }

    /// Takes writes again (a handover that did not happen).
    pub fn cancel_handover(&self) {
        self.handing_over.store(false, Ordering::Release);
    }

    /// Stops the replicators (the replica is closing).
    pub fn stop(&self) {
        for (_, r) in self.replicators.lock().drain() {
            let _ = r.stop.send(true);
            r.task.abort();
        }
    }

    /// A write at the primary: ordered, logged, replicated to the quorum.
    pub async fn write(
        &self,
        ops: Vec<WriteOp>,
        request_id: String,
    ) -> Result<(WriteAck, u32), Status> {
        let role = self
            .role()
            .ok_or_else(|| Status::unavailable(format!("replica {} has no role yet", self.key)))?;
        if !role.is_primary {
            return Err(Status::unavailable(format!(
                "node {} is not the primary of shard {} (the primary at epoch {} is {})",
                self.node_id, self.key, role.epoch, role.primary
            )));
        }
        self.check_fenced(role.epoch)?;
        if self.handing_over.load(Ordering::Acquire) {
            return Err(Status::unavailable(format!(
                "node {} is shutting down and handing shard {} to a backup; retry",
                self.node_id, self.key
            )));
        }
        let (peers, needed) = role.quorum();
        if peers.len() < needed {
            return Err(Status::unavailable(format!(
                "shard {} has {} live serving replica(s), writes need {}; \
                 retry once the cluster restores its replicas",
                self.key,
                1 + peers.len(),
                1 + needed
            )));
        }
        self.wait_probed(&role, &peers, needed).await?;
        self.disk.check()?;
        let shard = self.shard()?;
        let epoch = role.epoch;
        let recent = self.recent.clone();
        let ack = shard::run_blocking(move || {
            let (ack, batch) = shard.write_as(ops, epoch, &request_id)?;
            if let Some(b) = batch {
                recent.lock().remember([b]);
            }
            Ok(ack)
        })
        .await
        .map_err(shard_status)?;
        self.appended.notify_waiters();
        let holders = self.wait_quorum(ack.seq, epoch).await?;
        Ok((ack, 1 + holders as u32))
    }

    /// Refuses writes while a backup is known to be ahead of this primary, and holds
    /// the first writes of an epoch until the backups the quorum needs were probed: a
    /// primary that lost data must not write past a backup that holds more.
    async fn wait_probed(
        &self,
        role: &Role,
        peers: &[String],
        needed: usize,
    ) -> Result<(), Status> {
        let mut rx = self.matched.subscribe();
        let wait = async {
            loop {
                if let Some((_, node, seq, epoch)) =
                    self.ahead.lock().clone().filter(|a| a.0 == role.epoch)
                {
                    return Err(Status::unavailable(format!(
                        "the primary of shard {} on {} is behind its replica on {node} \
                         (epoch {epoch}, seq {seq}); it takes no writes until the most \
                         up-to-date replica is promoted: retry",
                        self.key, self.node_id
                    )));
                }
                let probed = {
                    let p = self.probed.lock();
                    peers
                        .iter()
                        .filter(|n| p.get(*n) == Some(&role.epoch))
                        .count()
                };
                if probed >= needed {
                    return Ok(());
                }
                if rx.changed().await.is_err() {
                    return Err(Status::unavailable("replica closed"));
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(2), wait).await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable(format!(
                "the primary of shard {} has not yet heard where its backups stand; retry",
                self.key
            ))),
        }
    }

    fn check_fenced(&self, epoch: u64) -> Result<(), Status> {
        let known = self.known_epoch();
        if known > epoch {
            return Err(Status::unavailable(format!(
                "shard {}: this primary's epoch {epoch} was superseded by epoch {known}; \
                 the write was not acknowledged",
                self.key
            )));
        }
        Ok(())
    }

    /// Waits until the write quorum holds `seq`; returns how many backups hold it.
    /// The quorum is re-read from the role on every change, so a backup whose node
    /// the map stops counting as live no longer holds writes up.
    async fn wait_quorum(&self, seq: u64, epoch: u64) -> Result<usize, Status> {
        let mut rx = self.matched.subscribe();
        let holding = |m: &HashMap<String, u64>, peers: &[String]| {
            peers
                .iter()
                .filter(|n| m.get(*n).is_some_and(|&s| s >= seq))
                .count()
        };
        let wait = async {
            loop {
                self.check_fenced(epoch)?;
                let role = self
                    .role()
                    .ok_or_else(|| Status::unavailable("replica closed"))?;
                let (peers, needed) = role.quorum();
                if peers.len() < needed {
                    return Err(Status::unavailable(format!(
                        "shard {}: write {seq} lost its quorum ({} live serving replica(s), \
                         {} needed); its outcome is unknown (retry with the same request id)",
                        self.key,
                        1 + peers.len(),
                        1 + needed
                    )));
                }
                let have = holding(&rx.borrow_and_update(), &peers);
                if have >= needed {
                    return Ok(have);
                }
                {
                    let refusing = self.refusing.lock();
                    let able = peers.iter().filter(|n| !refusing.contains_key(*n)).count();
                    if able < needed {
                        let why: Vec<&String> = refusing.values().collect();
                        return Err(Status::resource_exhausted(format!(
                            "shard {}: write {seq} cannot reach its quorum, a replica is out \
                             of disk space ({why:?}); its outcome is unknown (retry with the \
                             same request id)",
                            self.key
                        )));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(Status::unavailable("replica closed"));
                }
            }
        };
        match tokio::time::timeout(QUORUM_TIMEOUT, wait).await {
            Ok(r) => r,
            Err(_) => {
                let have = rx.borrow().clone();
                let missing: Vec<String> = self
                    .role()
                    .map(|r| r.quorum().0)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|n| have.get(n).is_none_or(|&m| m < seq))
                    .collect();
                Err(Status::unavailable(format!(
                    "shard {}: write {seq} not confirmed by {missing:?} within {:?}; \
                     its outcome is unknown (retry with the same request id)",
                    self.key, QUORUM_TIMEOUT
                )))
            }
        }
    }

    /// The replicator for one backup: probe where it stands, then ship batches in
    /// order (or a snapshot), keeping `matched` current for the writes that wait.
    async fn replicate_to(
        self: Arc<Self>,
        node: String,
        addr: String,
        epoch: u64,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut next: Option<u64> = None;
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            let step = self.replicate_step(&node, &addr, epoch, &mut next).await;
            // A backup out of disk space fails the writes waiting for it at once, with
            // its reason; cleared by its next accepted exchange.
            let full = matches!(&step, Err(e) if e.code() == tonic::Code::ResourceExhausted);
            let changed = {
                let mut r = self.refusing.lock();
                match (&step, full) {
                    (Err(e), true) => r.insert(node.clone(), e.message().to_string()).is_none(),
                    (Ok(_), _) => r.remove(&node).is_some(),
                    _ => false,
                }
            };
            if changed {
                self.matched.send_modify(|_| {});
            }
            let pause = match step {
                Ok(true) => {
                    failures = 0;
                    continue;
                }
                Ok(false) => {
                    failures = 0;
                    KEEPALIVE
                }
                Err(e) => {
                    failures += 1;
                    next = None;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(shard = %self.key, backup = %node, error = %e.message(), "replication to backup failing");
                    }
                    if e.code() == tonic::Code::FailedPrecondition
                        && e.message().contains("stale epoch")
                    {
                        // A newer primary exists: stop, and fail the writes waiting.
                        self.known_epoch.fetch_max(epoch + 1, Ordering::AcqRel);
                        self.matched.send_modify(|_| {});
                        return;
                    }
                    Duration::from_millis(200)
                }
            };
            tokio::select! {
                _ = self.appended.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One exchange with a backup; Ok(true) when there may be more to send now.
    async fn replicate_step(
        &self,
        node: &str,
        addr: &str,
        epoch: u64,
        next: &mut Option<u64>,
    ) -> Result<bool, Status> {
        let shard = self.shard()?;
        let (last, _) = shard.last();
        let epochs = shard.epochs();
        let from = match *next {
            Some(n) => n,
            None => {
                // Probe with an empty append claiming our last batch.
                let r = self
                    .send_append(addr, epoch, last, &epochs, &[], last)
                    .await?;
                let forced = self.role().is_some_and(|r| r.overwrites_ahead(epoch, node));
                match standing(&epochs, last, r.last_seq, r.last_epoch, forced) {
                    Standing::Ahead => {
                        let first = self
                            .ahead
                            .lock()
                            .replace((epoch, node.to_string(), r.last_seq, r.last_epoch))
                            .is_none_or(|a| a.0 != epoch);
                        if first {
                            metrics::counter!("shoal_replication_backup_ahead_total").increment(1);
                            tracing::warn!(shard = %self.key, backup = node, backup_seq = r.last_seq, backup_epoch = r.last_epoch, primary_seq = last, "backup is ahead of this primary: not overwriting it, taking no writes until the most up-to-date replica is promoted");
                        }
                        // Writes waiting re-check, and are refused.
                        self.matched.send_modify(|_| {});
                        return Ok(false);
                    }
                    Standing::Diverged => {
                        self.probed.lock().insert(node.to_string(), epoch);
                        metrics::counter!("shoal_replication_snapshots_sent_total", "reason" => "diverged").increment(1);
                        tracing::info!(shard = %self.key, backup = node, backup_seq = r.last_seq, backup_epoch = r.last_epoch, primary_seq = last, forced, "backup diverged; sending a snapshot");
                        self.send_snapshot(node, addr, epoch, &shard).await?;
                        return Ok(true);
                    }
                    Standing::Prefix => {}
                }
                self.probed.lock().insert(node.to_string(), epoch);
                self.set_matched(node, r.last_seq);
                // Writes waiting for their first probes re-check.
                self.matched.send_modify(|_| {});
                r.last_seq + 1
            }
        };
        if from > last {
            // Nothing new: a keep-alive, which also tells the backup it is caught up.
            let r = self
                .send_append(addr, epoch, from - 1, &epochs, &[], last)
                .await?;
            if !r.ok {
                *next = None;
                return Ok(true);
            }
            *next = Some(from);
            return Ok(false);
        }
        let batches: Vec<Arc<WalBatch>> = {
            let r = self.recent.lock();
            let mut out = Vec::new();
            let mut bytes = 0;
            for (&seq, (b, size)) in r.batches.range(from..) {
                if seq != from + out.len() as u64 || (bytes > APPEND_BYTES && !out.is_empty()) {
                    break;
                }
                bytes += size;
                out.push(b.clone());
            }
            out
        };
        if batches.is_empty() {
            let hold = self.recent.lock().hold(from);
            if hold == Hold::Gone {
                metrics::counter!("shoal_replication_snapshots_sent_total", "reason" => "behind")
                    .increment(1);
                tracing::info!(shard = %self.key, backup = node, from, primary_seq = last, "backup is behind the recent log; sending a snapshot");
                self.send_snapshot(node, addr, epoch, &shard).await?;
                *next = None;
                return Ok(true);
            }
            // A batch the shard logged a moment ago is about to be remembered (its
            // writer notifies `appended` right after): not a reason for a snapshot.
            return Ok(false);
        }
        let r = self
            .send_append(addr, epoch, from - 1, &epochs, &batches, last)
            .await?;
        if r.ok {
            metrics::counter!("shoal_replication_batches_sent_total")
                .increment(batches.len() as u64);
            self.set_matched(node, r.last_seq);
            *next = Some(r.last_seq + 1);
        } else {
            *next = None;
        }
        Ok(true)
    }

    fn set_matched(&self, node: &str, seq: u64) {
        self.matched.send_if_modified(|m| {
            let e = m.entry(node.to_string()).or_insert(0);
            if *e != seq {
                *e = seq;
                true
            } else {
                false
            }
        });
    }

    async fn send_append(
        &self,
        addr: &str,
        epoch: u64,
        prev_seq: u64,
        epochs: &[(u64, u64)],
        batches: &[Arc<WalBatch>],
        primary_seq: u64,
    ) -> Result<rpb::AppendResponse, Status> {
        // Encoded from references: the same bytes as a Vec<WalBatch>, without copying
        // the batches' vectors first.
        let refs: Vec<&WalBatch> = batches.iter().map(|b| &**b).collect();
        let payload = shoal_proto::wire::encode(&refs);
        let mut req = tonic::Request::new(rpb::AppendRequest {
            shard: Some(self.shard_ref()),
            epoch,
            primary: self.node_id.clone(),
            prev_seq,
            prev_epoch: epoch_at(epochs, prev_seq),
            batches: payload,
            primary_seq,
            format: shoal_proto::wire::FORMAT,
        });
        req.set_timeout(Duration::from_secs(10));
        Ok(self.channels.client(addr)?.append(req).await?.into_inner())
    }

    fn shard_ref(&self) -> rpb::ShardRef {
        rpb::ShardRef {
            collection: self.key.collection.clone(),
            collection_id: self.collection_id,
            index: self.key.index,
        }
    }

    async fn send_snapshot(
        &self,
        node: &str,
        addr: &str,
        epoch: u64,
        shard: &Shard,
    ) -> Result<(), Status> {
        let t = std::time::Instant::now();
        let s = shard.clone();
        let src = shard::run_blocking(move || s.snapshot())
            .await
            .map_err(shard_status)?;
        let dir = shard.dir().to_path_buf();
        let (tx, rx) = tokio::sync::mpsc::channel::<rpb::SnapshotChunk>(4);
        let first = rpb::SnapshotChunk {
            shard: Some(self.shard_ref()),
            epoch,
            primary: self.node_id.clone(),
            manifest: src.manifest.clone(),
            // The probe's decision, carried to the receiver, which refuses a snapshot
            // behind it without this (the two sides must agree, or a copy outside the
            // quorum that is ahead is neither overwritten nor promoted: issue 14's
            // rack-loss flake).
            forced: self.role().is_some_and(|r| r.overwrites_ahead(epoch, node)),
            ..Default::default()
        };
        let files = src.files.clone();
        let bytes: u64 = files.iter().map(|(_, n)| n).sum();
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Read;
            if tx.blocking_send(first).is_err() {
                return Ok(());
            }
            for (name, len) in files {
                let mut f = std::fs::File::open(dir.join(&name))?;
                let mut offset = 0u64;
                while offset < len {
                    let n = ((len - offset) as usize).min(SNAPSHOT_CHUNK);
                    let mut data = vec![0u8; n];
                    f.read_exact(&mut data)?;
                    let chunk = rpb::SnapshotChunk {
                        file: name.clone(),
                        offset,
                        data,
                        ..Default::default()
                    };
                    if tx.blocking_send(chunk).is_err() {
                        return Ok(());
                    }
                    offset += n as u64;
                }
            }
            Ok(())
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.set_timeout(Duration::from_secs(600));
        let r = self.channels.client(addr)?.install_snapshot(req).await;
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Status::internal(format!("reading the snapshot: {e}"))),
            Err(e) => return Err(Status::internal(format!("snapshot reader: {e}"))),
        }
        let r = r?.into_inner();
        tracing::info!(shard = %self.key, backup = node, seq = r.last_seq, bytes, took_ms = t.elapsed().as_millis() as u64, "snapshot installed on backup");
        self.set_matched(node, r.last_seq);
        Ok(())
    }

    /// A backup's side of Append: fence stale epochs, check the history matches, log.
    pub async fn append(&self, req: rpb::AppendRequest) -> Result<rpb::AppendResponse, Status> {
        // Decoded (bounded, format checked) before anything is locked or compared: a
        // payload that cannot be read is refused whatever the backup's position.
        let batches: Vec<Arc<WalBatch>> = if req.batches.is_empty() {
            Vec::new()
        } else {
            shoal_proto::wire::check_format(req.format)
                .map_err(|e| Status::failed_precondition(format!("append batches: {e}")))?;
            shoal_proto::wire::decode::<Vec<WalBatch>>(&req.batches)
                .map_err(|e| Status::invalid_argument(format!("append batches: {e}")))?
                .into_iter()
                .map(Arc::new)
                .collect()
        };
        let _g = self.apply.lock().await;
        self.accept_epoch(req.epoch, &req.primary)?;
        let shard = self.shard()?;
        let (last, last_epoch) = shard.last();
        let epochs = shard.epochs();
        if req.prev_seq != last || epoch_at(&epochs, last) != req.prev_epoch {
            return Ok(rpb::AppendResponse {
                ok: false,
                last_seq: last,
                last_epoch,
            });
        }
        let last = if batches.is_empty() {
            last
        } else {
            self.disk.check()?;
            let (s, recent) = (shard.clone(), self.recent.clone());
            shard::run_blocking(move || {
                let last = s.append_replicated(&batches)?;
                recent.lock().remember(batches);
                Ok(last)
            })
            .await
            .map_err(shard_status)?
        };
        self.caught_up
            .store(last >= req.primary_seq, Ordering::Release);
        let (last, last_epoch) = shard.last();
        Ok(rpb::AppendResponse {
            ok: true,
            last_seq: last,
            last_epoch,
        })
    }

    /// Refuses a sender whose epoch is older than one this replica has seen, or that
    /// claims this replica's own epoch while this replica is the primary.
    pub fn accept_epoch(&self, epoch: u64, from: &str) -> Result<(), Status> {
        let known = self.known_epoch();
        if epoch < known {
            return Err(Status::failed_precondition(format!(
                "stale epoch {epoch} from {from}: replica {} on {} is at epoch {known}",
                self.key, self.node_id
            )));
        }
        if let Some(r) = self.role() {
            if r.is_primary && epoch <= r.epoch && from != self.node_id {
                return Err(Status::failed_precondition(format!(
                    "stale epoch {epoch} from {from}: {} is the primary of {} at epoch {}",
                    self.node_id, self.key, r.epoch
                )));
            }
        }
        self.known_epoch.fetch_max(epoch, Ordering::AcqRel);
        Ok(())
    }

    /// A backup's side of InstallSnapshot, after the first chunk was accepted: the
    /// segment files are written into a staging dir beside the replica's (with the
    /// primary's manifest), ready for the replica actor to swap in. Returns the dir
    /// and the bytes received. Hold [`Self::lock_apply`] across this and the swap.
    pub async fn receive_snapshot(
        &self,
        first: &rpb::SnapshotChunk,
        stream: &mut tonic::Streaming<rpb::SnapshotChunk>,
        max_files: usize,
    ) -> Result<(PathBuf, u64), Status> {
        use tokio::io::AsyncWriteExt;
        let staging = staging_dir(self.shard()?.dir());
        let io = |e: std::io::Error| Status::internal(format!("writing the snapshot: {e}"));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        tokio::fs::create_dir_all(&staging).await.map_err(io)?;
        // Each file: its handle and the bytes written so far (chunks come in order).
        let mut files: HashMap<String, (tokio::fs::File, u64)> = HashMap::new();
        let mut bytes = 0u64;
        while let Some(chunk) = futures::StreamExt::next(stream).await {
            let chunk = chunk?;
            if !snapshot_file_name_ok(&chunk.file) {
                return Err(Status::invalid_argument(format!(
                    "bad snapshot file name {:?} (1 to 128 of [A-Za-z0-9._-], not \
                     manifest.json, no '..')",
                    &chunk.file[..chunk.file.floor_char_boundary(64)]
                )));
            }
            if !files.contains_key(&chunk.file) {
                if files.len() >= max_files {
                    return Err(Status::invalid_argument(format!(
                        "a snapshot of more than {max_files} files, over the limit \
                         snapshot_files = {max_files}"
                    )));
                }
                let f = tokio::fs::File::create(staging.join(&chunk.file))
                    .await
                    .map_err(io)?;
                files.insert(chunk.file.clone(), (f, 0));
            }
            let (f, written) = files.get_mut(&chunk.file).expect("opened above");
            if chunk.offset != *written {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk of {:?} at offset {}, expected {written}",
                    chunk.file, chunk.offset
                )));
            }
            f.write_all(&chunk.data).await.map_err(io)?;
            *written += chunk.data.len() as u64;
            bytes += chunk.data.len() as u64;
        }
        for (_, (f, _)) in files {
            f.sync_all().await.map_err(io)?;
        }
        let (dir, manifest) = (staging.clone(), first.manifest.clone());
        shard::run_blocking(move || Shard::install_manifest(&dir, &manifest))
            .await
            .map_err(shard_status)?;
        Ok((staging, bytes))
    }

    /// Serialises snapshot installs with appends.
    pub async fn lock_apply(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.apply.lock().await
    }

    pub fn mark_behind(&self) {
        self.caught_up.store(false, Ordering::Release);
    }
}

/// A file name a snapshot may carry: plain, short, never the manifest (which travels in
/// the first chunk) and never a path.
fn snapshot_file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "manifest.json"
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// Where a snapshot is assembled before it replaces the replica's directory.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".incoming");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::WalOp;

    fn role(rf: u32, write_quorum: u32, peers: &[(bool, bool)]) -> Role {
        Role {
            epoch: 1,
            primary: "p".into(),
            is_primary: true,
            peers: peers
                .iter()
                .enumerate()
                .map(|(i, &(serving, live))| Peer {
                    node: format!("b{i}"),
                    addr: String::new(),
                    serving,
                    live,
                })
                .collect(),
            replication_factor: rf,
            write_quorum,
            forced: false,
        }
    }

    /// Issue 14: a backup past the primary is never overwritten; one holding an older
    /// epoch's batches the primary never had is; an operator's forced epoch overrides.
    #[test]
    fn positions_decide_who_is_overwritten() {
        // The primary wrote 1..=10 at epoch 2, then 11..=15 at epoch 4.
        let epochs = [(2, 1), (4, 11)];
        assert_eq!(standing(&epochs, 15, 12, 4, false), Standing::Prefix);
        assert_eq!(standing(&epochs, 15, 0, 0, false), Standing::Prefix);
        // A deposed epoch-3 primary's unacknowledged 11..=20: replaced.
        assert_eq!(standing(&epochs, 15, 20, 3, false), Standing::Diverged);
        // More of epoch 4 than the primary holds, or a newer epoch: ahead.
        assert_eq!(standing(&epochs, 15, 16, 4, false), Standing::Ahead);
        assert_eq!(standing(&epochs, 15, 3, 5, false), Standing::Ahead);
        // A primary that opened empty never overwrites a backup that has anything.
        assert_eq!(standing(&[], 0, 1, 1, false), Standing::Ahead);
        // ... unless an operator forced its epoch, accepting the loss.
        assert_eq!(standing(&[], 0, 1, 1, true), Standing::Diverged);
        // Who may be overwritten when ahead: a copy outside the quorum (b1), never a
        // serving backup (b0), and only under the role's own epoch.
        let r = role(3, 0, &[(true, true), (false, true)]);
        assert!(!r.overwrites_ahead(1, "b0"));
        assert!(r.overwrites_ahead(1, "b1"));
        assert!(!r.overwrites_ahead(2, "b1"));
        let forced = Role { forced: true, ..r };
        assert!(forced.overwrites_ahead(1, "b0"));
    }

    #[test]
    fn default_quorum_is_every_live_serving_replica_and_at_least_two() {
        // RF 3, all up: both backups.
        let (peers, needed) = role(3, 0, &[(true, true), (true, true)]).quorum();
        assert_eq!((peers.len(), needed), (2, 2));
        // A backup on a suspect node and a copy in progress do not count.
        let (peers, needed) = role(3, 0, &[(true, false), (false, true)]).quorum();
        assert_eq!((peers.len(), needed), (0, 1), "still needs a second copy");
        // RF 1: the primary alone.
        assert_eq!(role(1, 0, &[]).quorum(), (vec![], 0));
    }

    fn batch(seq: u64, floats: usize) -> Arc<WalBatch> {
        Arc::new(WalBatch {
            seq,
            epoch: 1,
            request_id: String::new(),
            ops: vec![WalOp::Upsert {
                id: format!("d{seq}"),
                text: None,
                metadata: String::new(),
                vector: vec![0.0; floats],
            }],
        })
    }

    #[test]
    fn recent_log_keeps_the_newest_batches_within_its_cap() {
        let size = batch(1, 1000).approx_bytes();
        let mut r = Recent::new(3 * size, 0);
        r.remember((1..=5).map(|s| batch(s, 1000)));
        assert_eq!(r.batches.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(r.bytes, 3 * size);
        // The same batch again (a re-sent Append) is not counted twice.
        r.remember([batch(5, 1000)]);
        assert_eq!(r.bytes, 3 * size);
        // One batch over the cap is still kept: the newest is always there to ship.
        let mut r = Recent::new(10, 0);
        r.remember([batch(7, 1000)]);
        assert_eq!(r.batches.len(), 1);
    }

    #[test]
    fn a_batch_not_yet_remembered_is_pending_not_gone() {
        // Opened at seq 10 (nothing replayed): 11 is being written, 10 and before are
        // only in the segments.
        let mut r = Recent::new(1 << 20, 10);
        assert_eq!(r.hold(11), Hold::Pending);
        assert_eq!(r.hold(10), Hold::Gone);
        r.remember([batch(11, 8), batch(12, 8)]);
        assert_eq!(r.hold(11), Hold::Held);
        assert_eq!(r.hold(13), Hold::Pending);
        assert_eq!(r.hold(9), Hold::Gone);
        // Evicted batches are gone for good.
        let size = batch(1, 1000).approx_bytes();
        let mut r = Recent::new(2 * size, 0);
        r.remember((1..=4).map(|s| batch(s, 1000)));
        assert_eq!(
            (r.hold(2), r.hold(3), r.hold(5)),
            (Hold::Gone, Hold::Held, Hold::Pending)
        );
    }

    #[test]
    fn explicit_quorum_counts_the_primary() {
        let r = role(3, 2, &[(true, true), (true, true)]);
        assert_eq!(r.quorum().1, 1, "any one backup");
        assert_eq!(role(2, 1, &[(true, false)]).quorum().1, 0, "primary alone");
        let (peers, needed) = role(3, 3, &[(true, true), (true, false)]).quorum();
        assert!(peers.len() < needed, "3 of 3 with one down cannot be met");
    }
}
