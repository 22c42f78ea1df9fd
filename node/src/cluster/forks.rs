//! A node's part in online shard splits (issue 19; the protocol is in the
//! coordinator's `split.rs`): it forks each source replica it holds into the sibling's
//! directory once the replica holds its source's seal point, reports the forks with
//! its heartbeat, gives every hosted replica the routing of its collection's current
//! shard count (reads skip the sibling's half), and has its primaries log the
//! `WriteOp::Retain` that deletes that half once the split is cut over.
//!
//! Decisions are pure ([`fork_due`]); cloning and retaining run on blocking threads,
//! one at a time per shard.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use shoal_engine::{Shard, WriteOp};
use shoal_proto::coordinator as cpb;
use shoal_proto::routing::Routing;

use super::ids::ReplicaKey;
use super::mapview::MapView;
use super::replicas::{self, Registry};

/// A fork this node should hold: the sibling, its source, and the position to make
/// it at (the source's current seal point: last sequence number, its epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkDue {
    pub sibling: ReplicaKey,
    pub source: ReplicaKey,
    pub at: (u64, u64),
}

/// Pure: the forks the map asks of node `me` now (siblings forking with a replica here
/// whose source has a current seal point).
pub fn fork_due(view: &MapView, me: &str) -> Vec<ForkDue> {
    let mut out = Vec::new();
    for s in view.shards.values() {
        let Some(from) = s.forking_from else { continue };
        if !s.replicas.iter().any(|r| r.node_id == me) {
            continue;
        }
        let Some(c) = view.collections.get(&s.collection) else {
            continue;
        };
        let Some(src) = view.shards.get(&(s.collection.clone(), from)) else {
            continue;
        };
        let Some(seal) = src.seal.as_ref().filter(|p| p.epoch == src.epoch) else {
            continue;
        };
        let key = |index| ReplicaKey {
            collection: c.name.clone(),
            collection_id: c.id,
            index,
        };
        out.push(ForkDue {
            sibling: key(s.index),
            source: key(from),
            at: (seal.seq, seal.batch_epoch),
        });
    }
    out
}

pub(super) struct Forks {
    /// Forks made here and not yet cut over: sibling -> its position.
    made: Mutex<HashMap<ReplicaKey, (u64, u64)>>,
    /// Shards with a clone or a retain under way.
    busy: Mutex<HashSet<ReplicaKey>>,
    /// The routing each primary here has retained at (this process).
    retained: Mutex<HashMap<ReplicaKey, Routing>>,
    /// Wakes the reconciler: a fork made is opened at once, not at the next map.
    reconcile: Arc<tokio::sync::Notify>,
}

impl Forks {
    pub fn new(reconcile: Arc<tokio::sync::Notify>) -> Arc<Self> {
        Arc::new(Self {
            made: Mutex::default(),
            busy: Mutex::default(),
            retained: Mutex::default(),
            reconcile,
        })
    }

    /// Whether forking shard `s`'s fork here is made at its source's current seal
    /// point: then the reconciler opens it as a replica (sealed: it takes no write),
    /// whose heartbeat report carries the position the leader's cut-over checks.
    pub fn made_now(&self, view: &MapView, s: &cpb::Shard) -> bool {
        let (Some(from), Some(c)) = (s.forking_from, view.collections.get(&s.collection)) else {
            return false;
        };
        let Some(seal) = view
            .shards
            .get(&(s.collection.clone(), from))
            .and_then(|src| src.seal.filter(|p| p.epoch == src.epoch))
        else {
            return false;
        };
        let key = ReplicaKey {
            collection: c.name.clone(),
            collection_id: c.id,
            index: s.index,
        };
        self.made.lock().get(&key) == Some(&(seal.seq, seal.batch_epoch))
    }

    /// One pass over the map: forks made, stale ones made again, routings given,
    /// retains logged. `dir_of` names a replica's directory.
    pub fn sync(
        self: &Arc<Self>,
        view: &MapView,
        me: &str,
        registry: &Registry,
        dir_of: impl Fn(&ReplicaKey) -> PathBuf,
    ) {
        let due = fork_due(view, me);
        // Forks no longer asked for: cut over (now an ordinary replica) or cancelled
        // (the sibling is gone from the map: its copy goes to the trash).
        self.made.lock().retain(|k, _| {
            let still = due.iter().any(|d| &d.sibling == k);
            let dir = dir_of(k);
            if !still
                && dir.exists()
                && !view.shards.contains_key(&(k.collection.clone(), k.index))
                && !registry.read().contains_key(k)
            {
                match replicas::move_to_trash(&dir) {
                    Ok(to) => tracing::info!(replica = %k, trash = %to.display(), "a cancelled split's fork moved to the trash"),
                    Err(e) => tracing::warn!(replica = %k, error = %e, "moving a cancelled fork to the trash"),
                }
            }
            still
        });
        for d in due {
            if self.made.lock().get(&d.sibling) == Some(&d.at) {
                continue;
            }
            // An open fork at an older seal point is closed by the reconciler first.
            if registry.read().contains_key(&d.sibling) {
                continue;
            }
            let Some(source) = registry
                .read()
                .get(&d.source)
                .and_then(|h| h.repl.shard().ok())
            else {
                continue;
            };
            if source.last() != d.at || !self.busy.lock().insert(d.sibling.clone()) {
                continue; // still catching up with its sealed primary, or under way
            }
            let (this, dir) = (self.clone(), dir_of(&d.sibling));
            tokio::task::spawn_blocking(move || {
                let made = fork(&source, &dir, d.at);
                match made {
                    Ok(()) => {
                        tracing::info!(fork = %d.sibling, from = %d.source, seq = d.at.0, epoch = d.at.1, "split: fork made");
                        this.made.lock().insert(d.sibling.clone(), d.at);
                        this.reconcile.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(fork = %d.sibling, error = %e, "split: fork not made; retried on the next map")
                    }
                }
                this.busy.lock().remove(&d.sibling);
            });
        }
        // A retain for primaries holding the other half of a split.
        let hosted: Vec<_> = registry
            .read()
            .iter()
            .map(|(k, h)| (k.clone(), h.repl.clone()))
            .collect();
        for (k, repl) in hosted {
            let Some(c) = view
                .collections
                .get(&k.collection)
                .filter(|c| c.id == k.collection_id)
            else {
                continue;
            };
            if k.index >= c.shard_count {
                continue;
            }
            let routing = Routing::of_shard(k.index, c.shard_count);
            let Ok(shard) = repl.shard() else { continue };
            if repl.routing() != Some(routing) {
                continue; // given by the reconciler first
            }
            let primary = repl.role().is_some_and(|r| r.is_primary && !r.sealed);
            if !primary
                || self.retained.lock().get(&k) == Some(&routing)
                || !self.busy.lock().insert(k.clone())
            {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                let s = shard.clone();
                let foreign = shoal_engine::run_blocking(move || Ok(s.foreign_live(routing)))
                    .await
                    .unwrap_or(0);
                let done = if foreign == 0 {
                    true
                } else {
                    let id = format!("retain-{}-{}", routing.modulus, routing.residue);
                    match repl.write(vec![WriteOp::Retain(routing)], id, 0).await {
                        Ok((ack, _)) => {
                            tracing::info!(replica = %k, deleted = ack.deleted, modulus = routing.modulus, "split: the other half's documents deleted");
                            true
                        }
                        Err(e) => {
                            tracing::info!(replica = %k, error = %e, "split: retain not logged; retried on the next map");
                            false
                        }
                    }
                };
                if done {
                    this.retained.lock().insert(k.clone(), routing);
                }
                this.busy.lock().remove(&k);
            });
        }
    }
}

/// Makes (or re-makes) the fork of `source` at `at` in `dir`: a fork there at another
/// position (an older seal point) goes to the trash first.
fn fork(source: &Shard, dir: &std::path::Path, at: (u64, u64)) -> shoal_engine::Result<()> {
    if dir.exists() {
        if Shard::stored_position(dir).ok() == Some(at) {
            return Ok(());
        }
        trash(dir)?;
    }
    let made = source.clone_into(dir)?;
    replicas::mark_created(dir)?;
    if made != at {
        // The source moved past the seal point (a new epoch's writes): not this fork.
        trash(dir)?;
        return Err(shoal_engine::ShardError::InvalidConfig(format!(
            "the source is at {made:?}, not the seal point {at:?}"
        )));
    }
    Ok(())
}

fn trash(dir: &std::path::Path) -> shoal_engine::Result<()> {
    replicas::move_to_trash(dir).map(drop).map_err(|e| {
        shoal_engine::ShardError::InvalidConfig(format!(
            "moving the stale fork {} to the trash: {e}",
            dir.display()
        ))
    })
}
