//! A node's side of a rebuild (issue 21): what each replica it hosts does about its
//! collection's newest rebuild operation, as one pure decision ([`action`]) from the
//! operation's phase and the replica's generations. The builds themselves (a
//! primary's staged build and gate, a backup's fetch of it) run in `builds.rs` under
//! its admission control; switching, committing and rolling back are single manifest
//! writes (`shoal_engine::Shard::switch_staged` and friends), run here.
//!
//! The node never decides when the collection switches: the leader does, in one map
//! change, once every serving replica reports the staged generation
//! (`coordinator::rebuild::ready_to_switch`).

use shoal_engine::{GateConfig, IvfPqParams, Shard};
use shoal_proto::coordinator as cpb;

use super::ids::ReplicaKey;
use super::mapview::MapView;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// A primary builds the generation beside its serving one and gates it.
    Stage,
    /// A backup takes its primary's staged generation (`generation`), staged.
    Fetch {
        generation: u64,
    },
    /// The staged generation serves; the serving one is kept.
    Switch,
    /// The kept generation goes.
    Commit,
    /// The kept generation serves again (or the staged one goes).
    RollBack,
    /// A re-embed's primary (issue 21, `reembeds.rs`): begins the shard's vector set
    /// and re-encodes the stored texts into it until every live row has its vector.
    Fill,
    /// A re-embed's primary logs its set's commit (the set becomes the stored
    /// vectors) or its drop; backups follow from the log.
    CommitSet,
    DropSet,
}

/// What a replica holds of a rebuild: its staged and serving generations' tags and
/// whether a previous one is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub staged: u64,
    pub serving: u64,
    pub previous: bool,
    /// A re-embed's vector set: its operation, and live rows still without a vector.
    pub set: u64,
    pub set_missing: u64,
}

impl Held {
    pub fn of(shard: &Shard) -> Self {
        let s = shard.stats();
        Self {
            staged: s.staged.map_or(0, |g| g.tag),
            serving: s.serving.map_or(0, |g| g.tag),
            previous: s.previous.is_some(),
            set: s.vector_set.as_ref().map_or(0, |v| v.tag),
            set_missing: s.vector_set.as_ref().map_or(0, |v| v.missing),
        }
    }
}

/// Pure: what a re-embed's replica does (see [`action`]). The set is filled and
/// committed or dropped by the primary through the log; the generation over it is
/// staged and fetched as a rebuild's, but never switched to in the engine: queries
/// name their model and the replica answers from the set ([`Shard::set_for_model`]).
fn reembed_action(
    op: &cpb::Operation,
    phase: &str,
    step: Option<&cpb::OperationStep>,
    primary: bool,
    held: Held,
) -> Action {
    let id = op.id;
    match (op.state.as_str(), phase) {
        ("running", "building") => match step.map(|s| s.state.as_str()) {
            Some("pending" | "queued" | "building") if primary => {
                if held.set != id || held.set_missing > 0 {
                    Action::Fill
                } else {
                    Action::Stage
                }
            }
            Some("staged") if !primary && held.staged != id && held.set == id => Action::Fetch {
                generation: step.map_or(0, |s| s.generation),
            },
            _ => Action::None,
        },
        (_, "committed") if primary && held.set == id => Action::CommitSet,
        (_, "rolled_back") | ("failed" | "cancelled", "building") if held.staged == id => {
            Action::RollBack
        }
        (_, "rolled_back") | ("failed" | "cancelled", "building") if primary && held.set == id => {
            Action::DropSet
        }
        _ => Action::None,
    }
}

/// Pure: what a primary does with a re-embed's vector set whose operation the map no
/// longer shows (another operation replaced it in the node's view while this replica
/// was away): the collection's model says how it ended. Its vectors' model named by
/// the collection: committed; otherwise: rolled back or failed.
pub fn orphan_set_action(set_model: &str, collection: &cpb::Collection) -> Action {
    match &collection.encoder {
        Some(e) if e.content_hash == set_model => Action::CommitSet,
        _ => Action::DropSet,
    }
}

/// Pure: what a replica does about rebuild `op` (its collection's newest), given its
/// role, its shard's step and what it holds.
pub fn action(op: &cpb::Operation, shard_index: u32, is_primary: bool, held: Held) -> Action {
    let Some(r) = &op.rebuild else {
        return Action::None;
    };
    let id = op.id;
    let step = op.steps.iter().find(|s| s.shard == shard_index);
    if r.model.is_some() {
        return reembed_action(op, &r.phase, step, is_primary, held);
    }
    let mine = held.staged == id || held.serving == id;
    match (op.state.as_str(), r.phase.as_str()) {
        ("running", "building") => match step.map(|s| s.state.as_str()) {
            // Staged already (a restart lost its gate's report): gated again.
            Some("pending" | "queued" | "building") if is_primary => Action::Stage,
            Some("staged") if !is_primary && held.staged != id => Action::Fetch {
                generation: step.map_or(0, |s| s.generation),
            },
            _ => Action::None,
        },
        ("running", "switched") | (_, "committed") if held.staged == id => Action::Switch,
        // A backup that missed the staged generation (away when the leader switched
        // without it) takes it from its primary, which serves it now.
        ("running", "switched") | ("succeeded", "committed")
            if !is_primary && held.serving != id =>
        {
            Action::Fetch {
                generation: step.map_or(0, |s| s.generation),
            }
        }
        (_, "committed") if held.serving == id && held.previous => Action::Commit,
        // Rolled back, failed or cancelled: nothing of it stays.
        (_, "rolled_back") if mine => Action::RollBack,
        ("failed" | "cancelled", "building") if held.staged == id => Action::RollBack,
        _ => Action::None,
    }
}

/// The collection's newest rebuild operation, for `key`'s incarnation.
pub fn rebuild_op<'a>(view: &'a MapView, key: &ReplicaKey) -> Option<&'a cpb::Operation> {
    view.operations.values().rev().find(|o| {
        o.kind == "rebuild"
            && o.collection == key.collection
            && o.collection_id == key.collection_id
    })
}

/// A rebuild's gate, as its operation set it.
pub fn gate_config(op: &cpb::Operation, previous: &cpb::IndexParams) -> GateConfig {
    let r = op.rebuild.clone().unwrap_or_default();
    let nz = |v: u32| (v > 0).then_some(v as usize);
    GateConfig {
        k: r.gate_k.max(1) as usize,
        margin: r.margin,
        serving: (nz(previous.nprobe), nz(previous.refine)),
        staged: (nz(r.nprobe), nz(r.refine)),
        seed: op.id,
        ..GateConfig::default()
    }
}

/// The parameters a build or rebuild operation chose, as the engine takes them. The
/// training sample is at least what FAISS needs for them (39 a list, and 2^nbits for
/// each PQ codebook), whatever the sizing saw.
pub fn build_params(b: &cpb::IndexBuild) -> (IvfPqParams, usize) {
    let floor = (39 * b.nlist as u64).max(1 << b.pq_nbits.min(16));
    (
        IvfPqParams {
            nlist: b.nlist as usize,
            m: b.pq_m as usize,
            nbits: b.pq_nbits as usize,
        },
        b.train_sample.max(floor) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(state: &str, phase: &str, step: &str) -> cpb::Operation {
        cpb::Operation {
            id: 7,
            kind: "rebuild".into(),
            state: state.into(),
            steps: vec![cpb::OperationStep {
                shard: 0,
                state: step.into(),
                generation: 12,
                ..Default::default()
            }],
            rebuild: Some(cpb::Rebuild {
                phase: phase.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_replica_follows_its_rebuilds_phase() {
        let none = Held::default();
        let staged = Held {
            staged: 7,
            ..Held::default()
        };
        let switched = Held {
            serving: 7,
            previous: true,
            ..Held::default()
        };
        // Building: the primary stages, the backups fetch once it has.
        assert_eq!(
            action(&op("running", "building", "pending"), 0, true, none),
            Action::Stage
        );
        assert_eq!(
            action(&op("running", "building", "pending"), 0, false, none),
            Action::None
        );
        assert_eq!(
            action(&op("running", "building", "pending"), 0, true, staged),
            Action::Stage,
            "staged before a restart: gated again"
        );
        assert_eq!(
            action(&op("running", "building", "staged"), 0, false, none),
            Action::Fetch { generation: 12 }
        );
        assert_eq!(
            action(&op("running", "building", "staged"), 0, false, staged),
            Action::None
        );
        // Switched: the staged generation serves (once).
        assert_eq!(
            action(&op("running", "switched", "staged"), 0, false, staged),
            Action::Switch
        );
        assert_eq!(
            action(&op("running", "switched", "staged"), 0, true, switched),
            Action::None
        );
        assert_eq!(
            action(&op("running", "switched", "staged"), 0, false, none),
            Action::Fetch { generation: 12 },
            "a backup that missed it takes it from its primary"
        );
        // Committed: a replica that had not switched yet switches first, then drops the
        // kept generation.
        assert_eq!(
            action(&op("succeeded", "committed", "staged"), 0, true, staged),
            Action::Switch
        );
        assert_eq!(
            action(&op("succeeded", "committed", "staged"), 0, true, switched),
            Action::Commit
        );
        // Rolled back, or failed at the gate: nothing of it stays.
        assert_eq!(
            action(&op("cancelled", "rolled_back", "staged"), 0, true, switched),
            Action::RollBack
        );
        assert_eq!(
            action(&op("cancelled", "rolled_back", "staged"), 0, false, staged),
            Action::RollBack
        );
        assert_eq!(
            action(&op("failed", "building", "failed"), 0, true, staged),
            Action::RollBack
        );
        assert_eq!(
            action(&op("failed", "building", "failed"), 0, true, none),
            Action::None
        );
        // Another operation's generations are not this one's business.
        let other = Held {
            serving: 3,
            previous: true,
            ..Held::default()
        };
        assert_eq!(
            action(&op("cancelled", "rolled_back", "staged"), 0, true, other),
            Action::None
        );
    }

    #[test]
    fn a_re_embeds_primary_fills_then_stages_and_ends_its_set_through_the_log() {
        let reembed = |state: &str, phase: &str, step: &str| {
            let mut o = op(state, phase, step);
            o.rebuild.as_mut().unwrap().model = Some(cpb::ModelChange::default());
            o
        };
        let none = Held::default();
        let filling = Held {
            set: 7,
            set_missing: 10,
            ..Held::default()
        };
        let filled = Held {
            set: 7,
            ..Held::default()
        };
        let staged = Held {
            set: 7,
            staged: 7,
            ..Held::default()
        };
        let b = |state, phase, step| reembed(state, phase, step);
        // Building: the primary fills until no live row lacks its vector, then stages.
        assert_eq!(
            action(&b("running", "building", "pending"), 0, true, none),
            Action::Fill
        );
        assert_eq!(
            action(&b("running", "building", "building"), 0, true, filling),
            Action::Fill
        );
        assert_eq!(
            action(&b("running", "building", "building"), 0, true, filled),
            Action::Stage
        );
        assert_eq!(
            action(&b("running", "building", "pending"), 0, false, none),
            Action::None
        );
        // A backup fetches the staged generation once its set (from the log) exists.
        assert_eq!(
            action(&b("running", "building", "staged"), 0, false, filled),
            Action::Fetch { generation: 12 }
        );
        assert_eq!(
            action(&b("running", "building", "staged"), 0, false, none),
            Action::None
        );
        // Switched: nothing switches in the engine (queries pick the vectors).
        assert_eq!(
            action(&b("running", "switched", "staged"), 0, true, staged),
            Action::None
        );
        assert_eq!(
            action(&b("running", "switched", "staged"), 0, false, staged),
            Action::None
        );
        // Committed: the primary logs the commit; backups follow from the log.
        assert_eq!(
            action(&b("succeeded", "committed", "staged"), 0, true, staged),
            Action::CommitSet
        );
        assert_eq!(
            action(&b("succeeded", "committed", "staged"), 0, false, staged),
            Action::None
        );
        assert_eq!(
            action(&b("succeeded", "committed", "staged"), 0, true, none),
            Action::None
        );
        // Rolled back or failed: the staged generation goes, then the primary drops the set.
        assert_eq!(
            action(&b("cancelled", "rolled_back", "staged"), 0, true, staged),
            Action::RollBack
        );
        assert_eq!(
            action(&b("cancelled", "rolled_back", "staged"), 0, true, filled),
            Action::DropSet
        );
        assert_eq!(
            action(&b("cancelled", "rolled_back", "staged"), 0, false, filled),
            Action::None
        );
        assert_eq!(
            action(&b("failed", "building", "failed"), 0, true, filling),
            Action::DropSet
        );
        // A set whose operation left the view: the collection's model says how it ended.
        let coll = |hash: &str| cpb::Collection {
            encoder: Some(cpb::EncoderRef {
                content_hash: hash.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            orphan_set_action("sha256:new", &coll("sha256:new")),
            Action::CommitSet
        );
        assert_eq!(
            orphan_set_action("sha256:new", &coll("sha256:old")),
            Action::DropSet
        );
    }
}
