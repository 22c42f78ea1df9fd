//! Long-running cluster operations (issue 18): what one is (kind, target, per-shard
//! steps, outcome) and how it moves, as plain data and pure functions the map applies.
//! An operation lives in the cluster map, so it survives leader changes, and nodes learn
//! of it from the map watch, so it survives their restarts: a node that comes back finds
//! the steps still pending for the shards it holds and takes them up again.
//!
//! Index builds are the first kind: [`OperationKind::BuildIndex`] carries parameters
//! chosen once for the whole collection ([`size_index`]), each shard's step is pending
//! until its primary serves a generation newer than the one it served when the build
//! started (reported by heartbeat, committed by `SetGenerations`, which advances the
//! operation in the same apply), or failed on its primary's report. The operation ends
//! when no step is pending. The growth, rebuild and client issues add kinds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Finished operations the map keeps (the oldest go first); running ones are bounded
/// by one per kind and collection.
pub const KEEP_FINISHED: usize = 100;

/// Parameters of an index build, the same for every shard of the collection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BuildParams {
    pub nlist: u32,
    pub pq_m: u32,
    pub pq_nbits: u32,
    /// Vectors sampled to train the coarse quantizer and the PQ codebooks.
    pub train_sample: u64,
    /// The largest shard's live documents when the build was asked for (what sized it).
    pub rows_per_shard: u64,
    /// The generations' re-ranking precision (issue 19): the request's, else the last
    /// build's, else the collection's.
    pub rerank: shoal_proto::precision::Precision,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum OperationKind {
    BuildIndex(BuildParams),
    /// Compact every shard (issue 19): a shard's step is done once its primary
    /// reports the compaction it logged for this operation done.
    Compact,
    /// Double the shard count from `from_shards` (issue 19, `split.rs`): one step per
    /// source shard, all done at the cut-over.
    Split {
        from_shards: u32,
    },
    /// A backup of every shard into a repository (issue 20, `shoal_node::backup`): a
    /// shard's step is done once its primary reports its shard stored (the record
    /// written), with the sequence number it was stored at.
    Backup {
        url: String,
        backup: String,
    },
    /// A collection restored from a repository (issue 20): created by
    /// `RestoreCollection` with this operation; a shard's step is done once its
    /// primary reports its copy restored and open.
    Restore {
        url: String,
        backup: String,
    },
    /// A rebuild of every shard's index to new parameters (issue 21, `rebuild.rs`): each
    /// shard's primary builds a generation beside the serving one and gates it against
    /// the serving one (its step `Staged` with the gate's figures, or failed with them);
    /// the backups take it staged; once every serving replica holds it the leader
    /// switches the whole collection in one command; commit or rollback end it.
    Rebuild(RebuildParams),
}

/// A rebuild's parameters and where it stands (issue 21).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RebuildParams {
    pub build: BuildParams,
    /// Search parameters the new generations serve with.
    pub nprobe: u32,
    pub refine: u32,
    /// The gate compares recall@`gate_k`; the new generation may lose at most
    /// `margin_bp` / 10,000 of it.
    pub gate_k: u32,
    pub margin_bp: u32,
    /// The collection's index parameters before (a rollback restores them).
    pub previous: crate::index::IndexParams,
    pub phase: RebuildPhase,
    /// A re-embed: every document re-encoded by another model, into a vector set each
    /// shard keeps beside its stored vectors until the commit (`shoal_engine`'s
    /// `vector_set`). `None`: the model stays.
    pub model: Option<crate::index::ModelChange>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildPhase {
    /// Shards build and gate; nothing serves the new generations yet.
    Building,
    /// The collection serves the new generations; the previous ones are kept.
    Switched,
    /// The previous generations are gone (the operation succeeded).
    Committed,
    /// The previous generations serve again (the operation is cancelled).
    RolledBack,
}

impl RebuildPhase {
    pub fn name(self) -> &'static str {
        match self {
            RebuildPhase::Building => "building",
            RebuildPhase::Switched => "switched",
            RebuildPhase::Committed => "committed",
            RebuildPhase::RolledBack => "rolled_back",
        }
    }
}

impl OperationKind {
    pub fn name(&self) -> &'static str {
        match self {
            OperationKind::BuildIndex(_) => "build_index",
            OperationKind::Compact => "compact",
            OperationKind::Split { .. } => "split",
            OperationKind::Backup { .. } => "backup",
            OperationKind::Restore { .. } => "restore",
            OperationKind::Rebuild(_) => "rebuild",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Waiting for the shard's primary to serve a generation past `from_generation`.
    Pending {
        from_generation: u64,
    },
    Done {
        generation: u64,
    },
    Failed {
        reason: String,
    },
    /// A rebuild's shard (issue 21): its primary built `generation` beside the serving
    /// one and the gate let it through, with the figures.
    Staged {
        generation: u64,
        gate: String,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed { reason: String },
    Cancelled { reason: String },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub id: u64,
    pub kind: OperationKind,
    pub collection: String,
    pub collection_id: u64,
    /// The leader's wall clock when it asked for the operation (for display only).
    pub started_ms: u64,
    pub started_version: u64,
    pub steps: BTreeMap<u32, Step>,
    /// `None` while running.
    pub outcome: Option<Outcome>,
    pub finished_version: u64,
}

impl Operation {
    pub fn running(&self) -> bool {
        self.outcome.is_none()
    }

    /// Ends the operation once no step is pending: succeeded when every step is done.
    /// Returns whether it ended now.
    pub fn settle(&mut self, version: u64) -> bool {
        if !self.running()
            || self
                .steps
                .values()
                .any(|s| matches!(s, Step::Pending { .. }))
        {
            return false;
        }
        let failed = |s: &Step| matches!(s, Step::Failed { .. });
        // A rebuild whose shards all staged waits for its switch, then its commit or
        // rollback (`rebuild.rs`); one whose gate refused a shard fails.
        if matches!(self.kind, OperationKind::Rebuild(_)) && !self.steps.values().any(failed) {
            return false;
        }
        let failed: Vec<String> = self
            .steps
            .iter()
            .filter_map(|(i, s)| match s {
                Step::Failed { reason } => Some(format!("shard {i}: {reason}")),
                _ => None,
            })
            .collect();
        self.outcome = Some(if failed.is_empty() {
            Outcome::Succeeded
        } else {
            Outcome::Failed {
                reason: failed.join("; "),
            }
        });
        self.finished_version = version;
        true
    }

    /// A shard's primary now serves `generation`: its step is done if that is newer
    /// than the one it served when the operation started. Returns whether it changed.
    pub fn served(&mut self, shard: u32, generation: u64) -> bool {
        if !matches!(self.kind, OperationKind::BuildIndex(_)) {
            return false;
        }
        match self.steps.get(&shard) {
            Some(Step::Pending { from_generation }) if generation > *from_generation => {
                self.steps.insert(shard, Step::Done { generation });
                true
            }
            _ => false,
        }
    }

    pub fn end(&mut self, outcome: Outcome, version: u64) {
        self.outcome = Some(outcome);
        self.finished_version = version;
    }
}

/// Drops the oldest finished operations beyond [`KEEP_FINISHED`].
pub fn prune(ops: &mut BTreeMap<u64, Operation>) {
    let finished: Vec<u64> = ops
        .values()
        .filter(|o| !o.running())
        .map(|o| o.id)
        .collect();
    for id in finished
        .iter()
        .take(finished.len().saturating_sub(KEEP_FINISHED))
    {
        ops.remove(id);
    }
}

pub use shoal_proto::sizing::size_index;

/// A repository URL and backup id an operation may carry: bounded, the id a plain name
/// (it becomes a path in the repository).
pub fn check_target(url: &str, backup: &str) -> Result<(), String> {
    if url.is_empty() || url.len() > 1024 {
        return Err(format!(
            "the repository URL must be 1 to 1024 bytes, not {}",
            url.len()
        ));
    }
    if backup.is_empty()
        || backup.len() > 128
        || backup.starts_with('.')
        || !backup
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "backup id {backup:?}: 1 to 128 of [A-Za-z0-9._-], not starting with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(steps: &[(u32, u64)]) -> Operation {
        Operation {
            id: 1,
            kind: OperationKind::BuildIndex(BuildParams {
                nlist: 4,
                pq_m: 4,
                pq_nbits: 8,
                train_sample: 1000,
                rows_per_shard: 1000,
                rerank: Default::default(),
            }),
            collection: "c".into(),
            collection_id: 1,
            started_ms: 0,
            started_version: 1,
            steps: steps
                .iter()
                .map(|&(i, g)| (i, Step::Pending { from_generation: g }))
                .collect(),
            outcome: None,
            finished_version: 0,
        }
    }

    #[test]
    fn a_build_ends_once_every_shard_served_a_newer_generation() {
        let mut op = build(&[(0, 0), (1, 3)]);
        assert!(op.served(0, 1));
        assert!(!op.settle(5), "shard 1 still pending");
        assert!(
            !op.served(1, 3),
            "the generation it started from is not new"
        );
        assert!(op.served(1, 4));
        assert!(op.settle(6));
        assert_eq!(op.outcome, Some(Outcome::Succeeded));
        assert_eq!(op.finished_version, 6);
        assert!(!op.served(0, 9), "a finished step does not move");
    }

    #[test]
    fn a_compaction_step_does_not_end_on_a_new_generation() {
        let mut op = build(&[(0, 0)]);
        op.kind = OperationKind::Compact;
        assert!(!op.served(0, 5), "a new generation is not a compaction");
        assert!(!op.settle(3));
    }

    #[test]
    fn a_failed_shard_fails_the_build_naming_it() {
        let mut op = build(&[(0, 0), (1, 0)]);
        op.steps.insert(
            1,
            Step::Failed {
                reason: "too few vectors".into(),
            },
        );
        assert!(!op.settle(2));
        op.served(0, 1);
        assert!(op.settle(3));
        assert!(
            matches!(&op.outcome, Some(Outcome::Failed { reason }) if reason == "shard 1: too few vectors")
        );
    }
}
