//! The primary's side: a write is ordered, logged and acknowledged once its quorum holds
//! it; one replicator task per backup probes it, then ships batches from the recent log
//! or a snapshot.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shoal_engine::{epoch_at, Shard, WalBatch, WriteAck, WriteOp};
use shoal_proto::replica as rpb;
use tokio::sync::watch;

use super::recent::Next;
use super::{
    standing, Replication, Role, Standing, APPEND_BYTES, KEEPALIVE, QUORUM_TIMEOUT, SNAPSHOT_CHUNK,
};
use crate::cluster::error::ReplicaError;
use crate::cluster::transport::ReplicaApi;

/// Marks a backup as receiving a snapshot for as long as the transfer runs (also
/// when the replicator is stopped mid-transfer).
struct Sending<'a>(
    &'a parking_lot::Mutex<std::collections::HashSet<String>>,
    String,
);

impl<'a> Sending<'a> {
    fn start(set: &'a parking_lot::Mutex<std::collections::HashSet<String>>, node: &str) -> Self {
        set.lock().insert(node.to_string());
        Self(set, node.to_string())
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// Counts a write in [`Replication`]'s `appending` while it lives.
struct Appending<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Appending<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long one Append (or probe) may take at a backup.
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A snapshot transfer has no time limit of its own (it may carry hundreds of GB);
/// it fails when the receiver takes no chunk for this long, and resumes where it
/// stopped on the next attempt.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);
/// Once every chunk was taken: how long the receiver may take to sync and open it.
const SNAPSHOT_INSTALL: Duration = Duration::from_secs(600);

impl Replication {
    /// A write at the primary: ordered, logged, replicated to the quorum. `shard_count`
    /// is the count the caller routed its ids by (0: the node's own writes, which are
    /// not routed): checked after the seal, so a write routed by a count a split has
    /// just doubled never lands after the cut-over (the node changes a replica's
    /// routing before it unseals it; issue 19).
    pub async fn write(
        &self,
        ops: Vec<WriteOp>,
        request_id: String,
        shard_count: u32,
    ) -> Result<(WriteAck, u32), ReplicaError> {
        self.write_if(ops, request_id, shard_count, Vec::new())
            .await
    }

    /// [`Replication::write`] applied only if every expectation holds when the batch
    /// is numbered (`Shard::write_if`, issue 22): else [`ReplicaError::Conflict`] and
    /// nothing logged. Only the primary checks; the batch it ships is an ordinary one.
    pub async fn write_if(
        &self,
        ops: Vec<WriteOp>,
        request_id: String,
        shard_count: u32,
        expect: Vec<shoal_engine::Expect>,
    ) -> Result<(WriteAck, u32), ReplicaError> {
        let role = self.role().ok_or_else(|| {
            ReplicaError::Unavailable(format!("replica {} has no role yet", self.key))
        })?;
        if !role.is_primary {
            return Err(ReplicaError::Unavailable(format!(
                "node {} is not the primary of shard {} (the primary at epoch {} is {})",
                self.node_id, self.key, role.epoch, role.primary
            )));
        }
        self.check_fenced(role.epoch)?;
        self.lease.check(&self.key)?;
        // Counted from before the handover check until logged: a handover reads the
        // last batch its successor must hold only once no write is in between.
        let appending = Appending::enter(&self.appending);
        if self.handing_over_at(role.epoch) {
            // Moving: the gateway sends it again once the map names the successor.
            return Err(ReplicaError::Moving(format!(
                "node {} is handing the primary role of shard {} to another replica; retry",
                self.node_id, self.key
            )));
        }
        if self.sealed_at(role.epoch) {
            return Err(ReplicaError::Moving(format!(
                "shard {} is sealed while it splits (its forks are being made); retry",
                self.key
            )));
        }
        self.check_routing(shard_count)?;
        let quorum = role.quorum(&self.admitted_at(role.epoch));
        if quorum.short() {
            return Err(ReplicaError::Unavailable(format!(
                "shard {} has {} in-sync replica(s), writes need {}; \
                 retry once the cluster restores its replicas",
                self.key,
                1 + quorum.members.len(),
                quorum.min_copies
            )));
        }
        self.wait_probed(&role, &quorum.members).await?;
        self.disk.check()?;
        let shard = self.shard()?;
        let epoch = role.epoch;
        let recent = self.recent.clone();
        let ack = shoal_engine::run_blocking(move || {
            let (ack, batch) = shard.write_if(ops, epoch, &request_id, &expect)?;
            if let Some(b) = batch {
                recent.lock().remember([b]);
            }
            Ok(ack)
        })
        .await
        .map_err(ReplicaError::from)?;
        drop(appending);
        self.appended.notify_waiters();
        let holders = self.wait_quorum(ack.seq, epoch).await?;
        // A handover began meanwhile: the successor may lead before this answer
        // arrives, and no primary acknowledges once a newer epoch may exist (issue 16).
        // The write is logged; a retry with its request id is answered by whoever leads.
        if self.handing_over_at(epoch) {
            // Moving: sent again with its request id, the successor answers it once.
            return Err(ReplicaError::Moving(format!(
                "shard {}: write {} was logged while its primary began handing its role \
                 over; its outcome is unknown (retry with the same request id)",
                self.key, ack.seq
            )));
        }
        self.check_fenced(epoch)?;
        // The lease may have lapsed while the quorum was gathered: a successor may be
        // promoted from now on, so this primary acknowledges nothing more (the write
        // is durable here and on its quorum; a retry with its request id answers it).
        self.lease.check(&self.key)?;
        Ok((ack, 1 + holders as u32))
    }

    /// Refuses writes while a backup is known to be ahead of this primary, and holds
    /// the first writes of an epoch until every member of the write quorum was probed:
    /// a primary that lost data must not write past a backup that holds more.
    pub(super) async fn wait_probed(
        &self,
        role: &Role,
        peers: &[String],
    ) -> Result<(), ReplicaError> {
        let mut rx = self.matched.subscribe();
        let wait = async {
            loop {
                if let Some((_, node, seq, epoch)) =
                    self.ahead.lock().clone().filter(|a| a.0 == role.epoch)
                {
                    return Err(ReplicaError::Unavailable(format!(
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
                if probed >= peers.len() {
                    return Ok(());
                }
                if rx.changed().await.is_err() {
                    return Err(ReplicaError::Unavailable("replica closed".into()));
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(2), wait).await {
            Ok(r) => r,
            Err(_) => Err(ReplicaError::Unavailable(format!(
                "the primary of shard {} has not yet heard where its backups stand; retry",
                self.key
            ))),
        }
    }

    pub(super) fn check_fenced(&self, epoch: u64) -> Result<(), ReplicaError> {
        let known = self.known_epoch();
        if known > epoch {
            return Err(ReplicaError::Unavailable(format!(
                "shard {}: this primary's epoch {epoch} was superseded by epoch {known}; \
                 the write was not acknowledged",
                self.key
            )));
        }
        Ok(())
    }

    /// Waits until every member of the write quorum holds `seq`; returns how many
    /// backups hold it. The quorum is re-read on every change: a backup the map takes
    /// out of the in-sync set no longer holds writes up, a copy admitted meanwhile does.
    pub(super) async fn wait_quorum(&self, seq: u64, epoch: u64) -> Result<usize, ReplicaError> {
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
                    .ok_or_else(|| ReplicaError::Unavailable("replica closed".into()))?;
                // Read under the admission lock (see `admit`).
                let quorum = role.quorum(&self.admitted_at(epoch));
                if quorum.short() {
                    return Err(ReplicaError::Unavailable(format!(
                        "shard {}: write {seq} lost its quorum ({} in-sync replica(s), \
                         {} needed); its outcome is unknown (retry with the same request id)",
                        self.key,
                        1 + quorum.members.len(),
                        quorum.min_copies
                    )));
                }
                let have = holding(&rx.borrow_and_update(), &quorum.members);
                if have >= quorum.members.len() {
                    return Ok(have);
                }
                {
                    let refusing = self.refusing.lock();
                    let why: Vec<&String> = quorum
                        .members
                        .iter()
                        .filter_map(|n| refusing.get(n))
                        .collect();
                    if !why.is_empty() {
                        return Err(ReplicaError::DiskFull(format!(
                            "shard {}: write {seq} cannot reach its quorum, a replica is out \
                             of disk space ({why:?}); its outcome is unknown (retry with the \
                             same request id)",
                            self.key
                        )));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(ReplicaError::Unavailable("replica closed".into()));
                }
            }
        };
        match tokio::time::timeout(QUORUM_TIMEOUT, wait).await {
            Ok(r) => r,
            Err(_) => {
                let have = rx.borrow().clone();
                let missing: Vec<String> = self
                    .role()
                    .map(|r| r.quorum(&self.admitted_at(epoch)).members)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|n| have.get(n).is_none_or(|&m| m < seq))
                    .collect();
                Err(ReplicaError::Unavailable(format!(
                    "shard {}: write {seq} not confirmed by {missing:?} within {:?}; \
                     its outcome is unknown (retry with the same request id)",
                    self.key, QUORUM_TIMEOUT
                )))
            }
        }
    }

    /// The replicator for one backup: probe where it stands, then ship batches in
    /// order (or a snapshot), keeping `matched` current for the writes that wait.
    pub(super) async fn replicate_to(
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
            let full = matches!(&step, Err(ReplicaError::DiskFull(_)));
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
                    if let ReplicaError::StaleEpoch(_) = e {
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
    pub(super) async fn replicate_step(
        &self,
        node: &str,
        addr: &str,
        epoch: u64,
        next: &mut Option<u64>,
    ) -> Result<bool, ReplicaError> {
        let shard = self.shard()?;
        let (last, _) = shard.last();
        let epochs = shard.epochs();
        let to = self.transports.to(node, addr)?;
        let from = match *next {
            Some(n) => n,
            None => {
                // Probe with an empty append claiming our last batch.
                let r = self
                    .send_append(&*to, epoch, last, &epochs, &[], last)
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
                        self.send_snapshot(node, &*to, epoch, &shard).await?;
                        return Ok(true);
                    }
                    Standing::Prefix => {}
                }
                self.probed.lock().insert(node.to_string(), epoch);
                self.set_matched(node, r.last_seq);
                self.admit(node, epoch, r.last_seq);
                // Writes waiting for their first probes re-check.
                self.matched.send_modify(|_| {});
                r.last_seq + 1
            }
        };
        let next_send = self.recent.lock().next(from, last, APPEND_BYTES);
        let batches = match next_send {
            Next::UpToDate => {
                // Nothing new: a keep-alive, which also tells the backup it is caught up.
                let r = self
                    .send_append(&*to, epoch, from - 1, &epochs, &[], last)
                    .await?;
                if !r.ok {
                    *next = None;
                    return Ok(true);
                }
                self.admit(node, epoch, from - 1);
                *next = Some(from);
                return Ok(false);
            }
            Next::Snapshot => {
                metrics::counter!("shoal_replication_snapshots_sent_total", "reason" => "behind")
                    .increment(1);
                tracing::info!(shard = %self.key, backup = node, from, primary_seq = last, "backup is behind the recent log; sending a snapshot");
                self.send_snapshot(node, &*to, epoch, &shard).await?;
                *next = None;
                return Ok(true);
            }
            // A batch the shard logged a moment ago is about to be remembered (its
            // writer notifies `appended` right after): not a reason for a snapshot.
            Next::Wait => return Ok(false),
            Next::Ship(batches) => batches,
        };
        let r = self
            .send_append(&*to, epoch, from - 1, &epochs, &batches, last)
            .await?;
        if r.ok {
            metrics::counter!("shoal_replication_batches_sent_total")
                .increment(batches.len() as u64);
            self.set_matched(node, r.last_seq);
            self.admit(node, epoch, r.last_seq);
            *next = Some(r.last_seq + 1);
        } else {
            *next = None;
        }
        Ok(true)
    }

    pub(super) fn set_matched(&self, node: &str, seq: u64) {
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

    pub(super) async fn send_append(
        &self,
        to: &dyn ReplicaApi,
        epoch: u64,
        prev_seq: u64,
        epochs: &[(u64, u64)],
        batches: &[Arc<WalBatch>],
        primary_seq: u64,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        // Encoded from references: the same bytes as a Vec<WalBatch>, without copying
        // the batches' vectors first.
        let refs: Vec<&WalBatch> = batches.iter().map(|b| &**b).collect();
        let payload = shoal_proto::wire::encode(&refs);
        let req = rpb::AppendRequest {
            shard: Some(self.key.shard_id()),
            epoch,
            primary: self.node_id.clone(),
            prev_seq,
            prev_epoch: epoch_at(epochs, prev_seq),
            batches: payload,
            primary_seq,
            format: shoal_proto::wire::FORMAT,
        };
        to.append(req, APPEND_TIMEOUT).await
    }

    pub(super) async fn send_snapshot(
        &self,
        node: &str,
        to: &dyn ReplicaApi,
        epoch: u64,
        shard: &Shard,
    ) -> Result<(), ReplicaError> {
        let t = std::time::Instant::now();
        let s = shard.clone();
        let src = shoal_engine::run_blocking(move || s.snapshot())
            .await
            .map_err(ReplicaError::from)?;
        // What an earlier, unfinished transfer left staged there (none from a peer
        // that cannot say: everything is sent).
        let staged: HashMap<String, (u64, u32)> = match to
            .snapshot_staged(
                rpb::SnapshotStagedRequest {
                    shard: Some(self.key.shard_id()),
                    epoch,
                    primary: self.node_id.clone(),
                },
                APPEND_TIMEOUT,
            )
            .await
        {
            Ok(r) => r
                .files
                .into_iter()
                .map(|f| (f.name, (f.bytes, f.crc32)))
                .collect(),
            Err(e) => {
                tracing::debug!(shard = %self.key, backup = node, error = %e, "no staged snapshot to resume");
                HashMap::new()
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<rpb::SnapshotChunk>(4);
        let first = rpb::SnapshotChunk {
            shard: Some(self.key.shard_id()),
            epoch,
            primary: self.node_id.clone(),
            manifest: src.manifest.clone(),
            // The probe's decision, carried to the receiver, which refuses a snapshot
            // behind it without this (the two sides must agree, or a copy outside the
            // quorum that is ahead is neither overwritten nor promoted: issue 14's
            // rack-loss flake).
            forced: self.role().is_some_and(|r| r.overwrites_ahead(epoch, node)),
            resume: !staged.is_empty(),
            ..Default::default()
        };
        let files = src.files.clone();
        let bytes: u64 = files.iter().map(|(_, n, _)| n).sum();
        let resumed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = {
            let (resumed, sent) = (resumed.clone(), sent.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                use std::os::unix::fs::FileExt;
                if tx.blocking_send(first).is_err() {
                    return Ok(());
                }
                // Read through the handles the snapshot opened: an index file a rebuild
                // has since replaced is still there for them.
                for (name, len, f) in files {
                    // Resumed from what the receiver holds, where its bytes are this
                    // file's first bytes (the segments only grow; an index file never
                    // changes, and one of the same name from another history fails
                    // the checksum and is sent whole).
                    let mut offset = match staged.get(&name) {
                        Some(&(have, crc)) if have > 0 && have <= len => {
                            let (n, mine) = super::backup::crc_of_file(&f, have)?;
                            if n == have && mine == crc {
                                have
                            } else {
                                0
                            }
                        }
                        _ => 0,
                    };
                    resumed.fetch_add(offset, Ordering::Relaxed);
                    // At least one chunk per file, so the receiver opens each.
                    loop {
                        let n = ((len - offset) as usize).min(SNAPSHOT_CHUNK);
                        let mut data = vec![0u8; n];
                        f.read_exact_at(&mut data, offset)?;
                        let chunk = rpb::SnapshotChunk {
                            file: name.clone(),
                            offset,
                            data,
                            ..Default::default()
                        };
                        if tx.blocking_send(chunk).is_err() {
                            return Ok(());
                        }
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                        offset += n as u64;
                        if offset >= len {
                            break;
                        }
                    }
                }
                Ok(())
            })
        };
        // The receiver's progress: when it last took a chunk, and whether it took all.
        let progress = Arc::new(parking_lot::Mutex::new((std::time::Instant::now(), false)));
        let chunks = {
            let (seen, end) = (progress.clone(), progress.clone());
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .inspect(move |_| seen.lock().0 = std::time::Instant::now())
                .chain(
                    futures::stream::once(async move {
                        *end.lock() = (std::time::Instant::now(), true);
                        None
                    })
                    .filter_map(|c: Option<rpb::SnapshotChunk>| async move { c }),
                )
                .map(Ok)
                .boxed()
        };
        let _sending = Sending::start(&self.snapshotting, node);
        // The whole install's deadline is the stall watchdog's (and, once every chunk
        // was taken, the install limit's): the call itself gets a day.
        let install = to.install_snapshot(chunks, Duration::from_secs(24 * 3600));
        let watchdog = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (at, all) = *progress.lock();
                let limit = if all {
                    SNAPSHOT_INSTALL
                } else {
                    SNAPSHOT_STALL
                };
                if at.elapsed() > limit {
                    return (all, limit);
                }
            }
        };
        let r = tokio::select! {
            r = install => r,
            (all, limit) = watchdog => Err(ReplicaError::Unavailable(format!(
                "snapshot of shard {} to {node}: {} for {limit:?}; the next transfer resumes it",
                self.key,
                if all { "not installed" } else { "no chunk taken" }
            ))),
        };
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ReplicaError::Internal(format!("reading the snapshot: {e}"))),
            Err(e) => return Err(ReplicaError::Internal(format!("snapshot reader: {e}"))),
        }
        let resumed = resumed.load(Ordering::Relaxed);
        metrics::counter!("shoal_replication_snapshot_bytes_total", "kind" => "resumed")
            .increment(resumed);
        metrics::counter!("shoal_replication_snapshot_bytes_total", "kind" => "sent")
            .increment(sent.load(Ordering::Relaxed));
        let r = r?;
        tracing::info!(shard = %self.key, backup = node, seq = r.last_seq, bytes, resumed, took_ms = t.elapsed().as_millis() as u64, "snapshot installed on backup");
        self.set_matched(node, r.last_seq);
        Ok(())
    }
}
