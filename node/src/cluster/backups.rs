//! A node's part in backups and restores (issue 20; the repository is
//! `crate::backup`). The map's `backup` and `restore` operations have a step per
//! shard, taken by the shard's primary:
//! - a backup stores the primary's shard into the repository at one position (a
//!   snapshot: the files held open at their checkpointed lengths, so writes, builds
//!   and compactions go on), chunk by chunk, skipping chunks stored before, then writes
//!   the shard's record;
//! - a restore writes the shard's directory from the repository before the replica
//!   is first opened (the reconciler waits for it, so it is never created empty), then
//!   wakes the reconciler, which opens it as the primary at the epoch the backup ends
//!   in; the other replicas are copies the primary fills as it fills any copy.
//!
//! The heartbeat reports a finished or failed step; the leader commits it. A node that
//! restarts mid-step finds the step still pending and takes it again: a backup sends
//! only the chunks not stored yet, a restore starts its partial directory over.
//! Nothing here decides on its own: the map says what to do, the repository what holds.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use shoal_proto::coordinator as cpb;

use super::ids::ReplicaKey;
use super::mapview::MapView;
use super::replicas::{self, Registry};
use crate::backup::{CollectionRecord, Pace, Repository, FORMAT, RESTORED_MARKER};

/// A step the map asks of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub op: u64,
    pub restore: bool,
    pub url: String,
    pub backup: String,
    pub key: ReplicaKey,
}

/// Pure: the backup and restore steps the map asks of node `me` (pending steps of
/// running operations for shards it is the primary of).
pub fn jobs_due(view: &MapView, me: &str) -> Vec<Job> {
    let mut out = Vec::new();
    for o in view.operations.values() {
        let restore = match o.kind.as_str() {
            "backup" => false,
            "restore" => true,
            _ => continue,
        };
        let Some(t) = o.backup.as_ref().filter(|_| o.state == "running") else {
            continue;
        };
        let Some(c) = view
            .collections
            .get(&o.collection)
            .filter(|c| c.id == o.collection_id)
        else {
            continue;
        };
        for step in o.steps.iter().filter(|s| s.state == "pending") {
            let Some(s) = view.shards.get(&(o.collection.clone(), step.shard)) else {
                continue;
            };
            if s.primary != me {
                continue;
            }
            out.push(Job {
                op: o.id,
                restore,
                url: t.url.clone(),
                backup: t.backup.clone(),
                key: ReplicaKey {
                    collection: c.name.clone(),
                    collection_id: c.id,
                    index: step.shard,
                },
            });
        }
    }
    out
}

/// Whether `dir` holds a shard restore operation `op` wrote (its marker names it).
pub fn restored_by(dir: &std::path::Path, op: u64) -> bool {
    std::fs::read(dir.join(RESTORED_MARKER)).is_ok_and(|m| m == op.to_string().as_bytes())
}

/// The collection record a backup stores, from the map's collection.
pub fn collection_record(
    c: &cpb::Collection,
    op: u64,
    backup: &str,
    started_ms: u64,
) -> CollectionRecord {
    let ix = c.index.unwrap_or_default();
    let enc = c.encoder.clone().unwrap_or_default();
    CollectionRecord {
        format: FORMAT,
        backup: backup.to_string(),
        operation: op,
        started_ms,
        collection: c.name.clone(),
        collection_id: c.id,
        dimension: c.dimension,
        metric: c.metric,
        model_id: enc.model_id,
        model_hash: enc.content_hash,
        nlist: ix.nlist,
        pq_m: ix.pq_m,
        pq_nbits: ix.pq_nbits,
        nprobe: ix.nprobe,
        refine: ix.refine,
        rerank: ix.rerank,
        shard_count: c.shard_count,
        replication_factor: c.replication_factor,
        replica_memory_bytes: c.replica_memory_bytes,
        write_quorum: c.write_quorum,
        auto_rebuild_rows: c.auto_rebuild_rows,
        payload_fields: c
            .payload_fields
            .iter()
            .filter_map(|f| shoal_proto::filter::PayloadField::from_wire(f).ok())
            .collect(),
    }
}

#[derive(Default)]
struct State {
    /// Steps due, from the last map.
    due: HashMap<ReplicaKey, Job>,
    running: HashSet<ReplicaKey>,
    /// Steps done here: key -> operation.
    finished: HashMap<ReplicaKey, u64>,
    /// Steps that failed here: key -> (operation, why).
    failed: HashMap<ReplicaKey, (u64, String)>,
}

pub(super) struct Backups {
    registry: Registry,
    state: Mutex<State>,
    /// Every backup and restore on this node together (`--backup-bytes-per-sec`).
    pace: Pace,
    /// Wakes the reconciler: a restored shard is opened at once.
    reconcile: Arc<tokio::sync::Notify>,
}

impl Backups {
    pub fn new(
        registry: Registry,
        reconcile: Arc<tokio::sync::Notify>,
        bytes_per_sec: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            state: Mutex::default(),
            pace: Pace::new(bytes_per_sec),
            reconcile,
        })
    }

    /// One pass over the map: starts the steps due that are not running or done.
    pub fn sync(
        self: &Arc<Self>,
        view: &MapView,
        me: &str,
        dir_of: impl Fn(&ReplicaKey) -> PathBuf,
    ) {
        let due = jobs_due(view, me);
        let mut st = self.state.lock();
        st.due = due.iter().map(|j| (j.key.clone(), j.clone())).collect();
        // What the map no longer asks for is forgotten (its step ended).
        let keep: HashSet<(ReplicaKey, u64)> = due.iter().map(|j| (j.key.clone(), j.op)).collect();
        st.finished.retain(|k, op| keep.contains(&(k.clone(), *op)));
        st.failed
            .retain(|k, (op, _)| keep.contains(&(k.clone(), *op)));
        for job in due {
            if st.running.contains(&job.key)
                || st.finished.get(&job.key) == Some(&job.op)
                || st.failed.get(&job.key).is_some_and(|(op, _)| *op == job.op)
            {
                continue;
            }
            st.running.insert(job.key.clone());
            let me = self.clone();
            let dir = dir_of(&job.key);
            let started_ms = view.operations.get(&job.op).map_or(0, |o| o.started_ms);
            let collection = view.collections.get(&job.key.collection).cloned();
            tokio::spawn(async move {
                let r = if job.restore {
                    me.restore(&job, dir).await
                } else {
                    me.backup(&job, collection, started_ms).await
                };
                let mut st = me.state.lock();
                st.running.remove(&job.key);
                match r {
                    Ok(Some(what)) => {
                        tracing::info!(replica = %job.key, operation = job.op, backup = %job.backup, "{what}");
                        st.finished.insert(job.key.clone(), job.op);
                    }
                    // Not ready (the replica still opening): tried again at the next map.
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(replica = %job.key, operation = job.op, backup = %job.backup, error = %e, "backup step failed");
                        st.failed.insert(job.key.clone(), (job.op, e));
                    }
                }
            });
        }
    }

    async fn backup(
        &self,
        job: &Job,
        collection: Option<cpb::Collection>,
        started_ms: u64,
    ) -> Result<Option<String>, String> {
        let Some(repl) = self.registry.read().get(&job.key).map(|h| h.repl.clone()) else {
            return Ok(None);
        };
        if !repl.role().is_some_and(|r| r.is_primary) {
            return Ok(None);
        }
        let Ok(shard) = repl.shard() else {
            return Ok(None);
        };
        let c = collection.ok_or("the collection left the map")?;
        let repo = Repository::create(&job.url).map_err(|e| e.to_string())?;
        // A backup id belongs to one operation: another's is never written over.
        match repo.collection(&job.backup).await {
            Ok(rec) if rec.operation != job.op || rec.collection_id != c.id => {
                return Err(format!(
                    "backup {} in {} exists (collection {}, operation {}): choose another id",
                    job.backup, job.url, rec.collection, rec.operation
                ))
            }
            Ok(_) => {}
            Err(crate::backup::RepoError::Missing(_)) => repo
                .put_collection(&collection_record(&c, job.op, &job.backup, started_ms))
                .await
                .map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        }
        if repo
            .has_shard(&job.backup, job.key.index)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(Some("shard already stored (before a restart)".into()));
        }
        let snap = {
            let s = shard.clone();
            shoal_engine::run_blocking(move || s.snapshot())
                .await
                .map_err(|e| e.to_string())?
        };
        let rec = repo
            .backup_shard(&job.backup, job.key.index, snap, &self.pace)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(format!(
            "shard stored at seq {} ({} bytes, {} new, {:.1} s)",
            rec.seq, rec.bytes, rec.uploaded_bytes, rec.seconds
        )))
    }

    async fn restore(&self, job: &Job, dir: PathBuf) -> Result<Option<String>, String> {
        if restored_by(&dir, job.op) {
            // Restored before (this process, or one before a restart): opened by the
            // reconciler; done once it is hosted.
            self.reconcile.notify_one();
            return Ok(self
                .registry
                .read()
                .contains_key(&job.key)
                .then(|| "shard restored and open".to_string()));
        }
        if dir.exists() {
            // Files this restore did not write (a replica this node held once and kept):
            // the operator's restore replaces them; they go to the trash, not away.
            if self.registry.read().contains_key(&job.key) {
                return Ok(None); // the reconciler closes it first
            }
            let to = replicas::move_to_trash(&dir).map_err(|e| e.to_string())?;
            tracing::warn!(replica = %job.key, trash = %to.display(), "a restore replaces files kept here: moved to the trash");
        }
        let repo = Repository::open(&job.url).map_err(|e| e.to_string())?;
        let rec = repo
            .shard(&job.backup, job.key.index)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let bytes = repo
            .restore_shard(&rec, &dir, &self.pace, job.op.to_string().as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        replicas::mark_created(&dir).map_err(|e| e.to_string())?;
        tracing::info!(replica = %job.key, seq = rec.seq, epoch = rec.epoch, bytes, "shard restored from the backup; opening it");
        self.reconcile.notify_one();
        // Reported done once the reconciler has it open (the next sync).
        Ok(None)
    }

    /// `key`'s finished and failed steps for its heartbeat report:
    /// (finished operation, failed operation, why).
    pub fn report(&self, key: &ReplicaKey) -> (u64, u64, String) {
        let st = self.state.lock();
        let finished = st.finished.get(key).copied().unwrap_or(0);
        let (failed, why) = st.failed.get(key).cloned().unwrap_or_default();
        (finished, failed, why)
    }

    /// Failed restores of shards not open here (no replica reports them otherwise).
    pub fn unhosted_failures(&self, hosted: &HashSet<ReplicaKey>) -> Vec<cpb::ReplicaReport> {
        self.state
            .lock()
            .failed
            .iter()
            .filter(|(k, _)| !hosted.contains(*k))
            .map(|(k, (op, why))| cpb::ReplicaReport {
                shard: Some(k.shard_id()),
                failed_operation: *op,
                operation_error: why.clone(),
                ..Default::default()
            })
            .collect()
    }
}
