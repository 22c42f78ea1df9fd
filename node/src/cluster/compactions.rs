//! Compactions on this node's primaries (issue 19). A compaction is a batch in a
//! shard's replicated log (`WriteOp::Compact`, see `shoal_engine::compact`): the primary
//! writes it like any write, every replica applies it in order and rewrites its own
//! segments without the rows dead at that batch, numbering the rest alike.
//!
//! Two things make a primary log one:
//! - a `compact` operation in the map with its shard's step pending (`shoal collection
//!   compact`): logged once per operation (the request id names it, so a retry after a
//!   lost answer is not a second compaction); the primary's heartbeat reports the
//!   operation once its own compaction is done, and the leader ends the step;
//! - dead rows past the node's policy ([`compaction_due`]), checked every heartbeat,
//!   never while one is pending.
//!
//! Nothing here waits on the rewrite: every replica's node runs it under its build
//! slots (`builds.rs`), after any build that holds the shard's build claim.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use shoal_engine::WriteOp;

use super::ids::ReplicaKey;
use super::mapview::MapView;
use super::replicas::Registry;

/// When a primary compacts on its own: dead rows (replaced or deleted versions) at
/// least `dead_ratio` of all its rows and at least `min_dead_rows` of them. Pure.
pub fn compaction_due(rows: u64, live: u64, dead_ratio: f64, min_dead_rows: u64) -> bool {
    let dead = rows.saturating_sub(live);
    dead_ratio > 0.0 && dead >= min_dead_rows.max(1) && dead as f64 >= dead_ratio * rows as f64
}

/// The node's policy for compactions nobody asked for.
#[derive(Clone, Copy, Debug)]
pub struct CompactPolicy {
    /// 0: never on its own.
    pub dead_ratio: f64,
    pub min_dead_rows: u64,
}

/// What a primary logged: for which operation (0: its own policy), and the batch
/// (`None` while the write is in flight).
#[derive(Clone, Copy, Debug)]
struct Logged {
    op: u64,
    seq: Option<u64>,
}

#[derive(Default)]
struct State {
    /// Running compaction operations with a pending step for the shard of a replica
    /// here, from the last map.
    wanted: HashMap<ReplicaKey, u64>,
    logged: HashMap<ReplicaKey, Logged>,
}

pub struct Compactions {
    registry: Registry,
    policy: CompactPolicy,
    state: Mutex<State>,
}

impl Compactions {
    pub fn new(registry: Registry, policy: CompactPolicy) -> Arc<Self> {
        Arc::new(Self {
            registry,
            policy,
            state: Mutex::default(),
        })
    }

    /// Takes the map's running compaction operations with pending steps.
    pub fn sync(&self, view: &MapView) {
        let keys: Vec<ReplicaKey> = self.registry.read().keys().cloned().collect();
        let mut wanted = HashMap::new();
        for key in keys {
            let op = view
                .operations
                .values()
                .filter(|o| {
                    o.kind == "compact"
                        && o.state == "running"
                        && o.collection == key.collection
                        && o.collection_id == key.collection_id
                        && o.steps
                            .iter()
                            .any(|s| s.shard == key.index && s.state == "pending")
                })
                .map(|o| o.id)
                .max();
            if let Some(op) = op {
                wanted.insert(key, op);
            }
        }
        self.state.lock().wanted = wanted;
    }

    /// Logs the compactions due on this node's primaries (called every heartbeat).
    pub fn tick(self: &Arc<Self>) {
        let hosted: Vec<_> = self
            .registry
            .read()
            .iter()
            .map(|(k, h)| (k.clone(), h.repl.clone()))
            .collect();
        for (key, repl) in hosted {
            if !repl.role().is_some_and(|r| r.is_primary) {
                continue;
            }
            let Ok(shard) = repl.shard() else { continue };
            let op = {
                let st = self.state.lock();
                let logged = st.logged.get(&key).copied();
                if logged.is_some_and(|l| l.seq.is_none()) {
                    continue; // a write in flight
                }
                match st.wanted.get(&key) {
                    Some(&op) if logged.is_none_or(|l| l.op != op) => op,
                    _ => {
                        let stats = shard.stats();
                        if shard.compaction_pending().is_some()
                            || !compaction_due(
                                stats.rows,
                                stats.live_docs as u64,
                                self.policy.dead_ratio,
                                self.policy.min_dead_rows,
                            )
                        {
                            continue;
                        }
                        tracing::info!(replica = %key, rows = stats.rows, live = stats.live_docs, "dead rows past the policy: compacting");
                        0
                    }
                }
            };
            let request_id = match op {
                0 => format!("compact-auto-{}", shard.last().0),
                op => format!("compact-operation-{op}"),
            };
            self.state
                .lock()
                .logged
                .insert(key.clone(), Logged { op, seq: None });
            let me = self.clone();
            tokio::spawn(async move {
                let r = repl.write(vec![WriteOp::Compact], request_id, 0).await;
                let mut st = me.state.lock();
                match r {
                    Ok((ack, _)) => {
                        tracing::info!(replica = %key, operation = op, seq = ack.seq, "compaction logged");
                        st.logged.insert(
                            key,
                            Logged {
                                op,
                                seq: Some(ack.seq),
                            },
                        );
                    }
                    // Tried again at the next heartbeat (a primary without its quorum,
                    // a handover, a full disk).
                    Err(e) => {
                        tracing::info!(replica = %key, operation = op, error = %e, "compaction not logged yet");
                        st.logged.remove(&key);
                    }
                }
            });
        }
    }

    /// The newest operation whose compaction `key`'s replica (its primary) has done,
    /// and the batch its segments were last compacted at.
    pub fn report(&self, key: &ReplicaKey, shard: Option<&shoal_engine::Shard>) -> (u64, u64) {
        let Some(shard) = shard else { return (0, 0) };
        let layout = shard.layout();
        let done = self
            .state
            .lock()
            .logged
            .get(key)
            .filter(|l| l.op != 0 && l.seq.is_some_and(|s| layout >= s))
            .map_or(0, |l| l.op);
        (done, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::compaction_due;

    #[test]
    fn a_compaction_is_due_past_both_the_share_and_the_count_of_dead_rows() {
        assert!(compaction_due(1_000_000, 400_000, 0.5, 100_000));
        assert!(
            !compaction_due(1_000_000, 600_000, 0.5, 100_000),
            "40% dead"
        );
        assert!(
            !compaction_due(100_000, 10_000, 0.5, 100_000),
            "90% but few"
        );
        assert!(!compaction_due(1_000_000, 0, 0.0, 1), "policy off");
        assert!(!compaction_due(0, 0, 0.5, 0), "empty");
    }
}
