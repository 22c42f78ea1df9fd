//! Online rebuilds (issue 21): the map's side of a `Rebuild` operation and the leader's
//! decision to switch, as `ClusterMap` methods and one pure function.
//!
//! A rebuild's shards build and gate apart (`Step::Staged` from each primary's report),
//! but the collection switches as one: [`ready_to_switch`] (pure, the leader's) names a
//! rebuild once every shard is staged and every serving replica on a live node reports
//! holding the staged generation, and `SwitchRebuild` then changes the collection's
//! index parameters and the operation's phase in one command, so nodes move from the
//! old generations to the new ones on one map version. `CommitRebuild` ends it (nodes
//! delete the kept generations); `RollbackRebuild` restores the previous parameters and
//! nodes serve the kept generations again; after a commit a rollback is refused.

use crate::map::{
    invalid, Change, ClusterMap, IndexParams, MapError, NodeId, ReplicaState, Result, ShardKey,
};
use crate::operations::{Operation, OperationKind, Outcome, RebuildParams, RebuildPhase, Step};

/// The most a rebuild may set its re-rank factor to (the gateway's limits bound each
/// query's candidates on top of this).
pub const MAX_REFINE: u32 = 100;

/// The index parameters a rebuild switches its collection to.
pub fn switched_params(p: &RebuildParams) -> IndexParams {
    IndexParams {
        nlist: p.build.nlist,
        pq_m: p.build.pq_m,
        pq_nbits: p.build.pq_nbits,
        nprobe: p.nprobe,
        refine: p.refine,
        rerank: p.build.rerank,
    }
}

impl RebuildParams {
    /// Checks a rebuild's parameters against the collection's dimension (a re-embed's:
    /// against its model's).
    pub fn check(&self, dimension: u32) -> Result<()> {
        let dimension = match &self.model {
            Some(m) => {
                check_model(m, dimension)?;
                m.dimension
            }
            None => dimension,
        };
        check_params(self, dimension)
    }

    /// Whether it re-embeds (changes the model), or only rebuilds the index.
    pub fn reembeds(&self) -> bool {
        self.model.is_some()
    }
}

fn check_model(m: &crate::index::ModelChange, dimension: u32) -> Result<()> {
    if m.dimension == 0 || m.dimension > 65_536 {
        return Err(invalid(format!(
            "the new model's dimension {}: 1 to 65536",
            m.dimension
        )));
    }
    let hash = &m.encoder.content_hash;
    if hash.is_empty() || hash.len() > 128 || m.encoder.model_id.len() > 1024 {
        return Err(invalid(
            "a re-embed names its model by content hash (1 to 128 bytes)",
        ));
    }
    if m.previous.as_ref().is_some_and(|p| p.content_hash == *hash) {
        return Err(invalid(format!(
            "the collection's vectors already come from model {hash}"
        )));
    }
    if m.previous_dimension != dimension {
        return Err(invalid(format!(
            "the re-embed says the collection's dimension is {}, it is {dimension}",
            m.previous_dimension
        )));
    }
    Ok(())
}

fn check_params(p: &RebuildParams, dimension: u32) -> Result<()> {
    let b = &p.build;
    if b.nlist == 0 || b.nlist > 1 << 20 {
        return Err(invalid(format!("nlist {}: 1 to 2^20", b.nlist)));
    }
    if b.pq_m == 0 || !dimension.is_multiple_of(b.pq_m) {
        return Err(invalid(format!(
            "pq_m {} must divide the dimension {dimension}",
            b.pq_m
        )));
    }
    if !(1..=16).contains(&b.pq_nbits) {
        return Err(invalid(format!("pq_nbits {}: 1 to 16", b.pq_nbits)));
    }
    if p.nprobe == 0 || p.nprobe > b.nlist {
        return Err(invalid(format!(
            "nprobe {} must be 1 to nlist ({})",
            p.nprobe, b.nlist
        )));
    }
    if p.refine == 0 || p.refine > MAX_REFINE {
        return Err(invalid(format!("refine {}: 1 to {MAX_REFINE}", p.refine)));
    }
    if p.gate_k == 0 || p.gate_k > 100 {
        return Err(invalid(format!("the gate's k {}: 1 to 100", p.gate_k)));
    }
    if p.margin_bp > 10_000 {
        return Err(invalid(format!(
            "margin {} exceeds the whole recall",
            p.margin_bp as f64 / 10_000.0
        )));
    }
    if b.train_sample < b.nlist as u64 {
        return Err(invalid(format!(
            "a training sample of {} cannot train {} lists",
            b.train_sample, b.nlist
        )));
    }
    if p.phase != RebuildPhase::Building {
        return Err(invalid("a rebuild starts building"));
    }
    Ok(())
}

/// Pure: the running rebuilds ready to switch: every shard staged, and every serving
/// replica on a live node holding its staged generation (`staged(shard, node)`: the
/// operation the replica last reported a staged generation for).
pub fn ready_to_switch(map: &ClusterMap, staged: impl Fn(&ShardKey, &NodeId) -> u64) -> Vec<u64> {
    map.operations
        .values()
        .filter(|o| {
            o.running()
                && matches!(&o.kind, OperationKind::Rebuild(p) if p.phase == RebuildPhase::Building)
                && !o.steps.is_empty()
                && o.steps.values().all(|s| matches!(s, Step::Staged { .. }))
        })
        .filter(|o| {
            o.steps.keys().all(|&index| {
                let key = ShardKey {
                    collection: o.collection.clone(),
                    index,
                };
                map.shards.get(&key).is_some_and(|s| {
                    s.replicas
                        .iter()
                        .filter(|r| r.state == ReplicaState::Serving)
                        .filter(|r| map.nodes.get(&r.node).is_some_and(|n| n.state.is_live()))
                        .all(|r| staged(&key, &r.node) == o.id)
                })
            })
        })
        .map(|o| o.id)
        .collect()
}

impl ClusterMap {
    /// The newest rebuild of `collection`'s current incarnation.
    pub fn rebuild_of(&self, collection: &str) -> Option<&Operation> {
        let id = self.collections.get(collection)?.id;
        self.operations.values().rev().find(|o| {
            o.collection == collection
                && o.collection_id == id
                && matches!(o.kind, OperationKind::Rebuild(_))
        })
    }

    /// Rebuild `operation`, and its phase; with `collection`, only a rebuild of it.
    fn rebuild_mut(
        &mut self,
        operation: u64,
        collection: Option<&str>,
    ) -> Result<(&mut Operation, RebuildPhase)> {
        let op = self
            .operations
            .get_mut(&operation)
            .ok_or_else(|| MapError::NotFound(format!("no operation {operation}")))?;
        let OperationKind::Rebuild(p) = &op.kind else {
            return Err(invalid(format!("operation {operation} is not a rebuild")));
        };
        if let Some(c) = collection.filter(|c| *c != op.collection) {
            return Err(invalid(format!(
                "operation {operation} rebuilds {}, not {c}",
                op.collection
            )));
        }
        let phase = p.phase;
        Ok((op, phase))
    }

    fn set_phase(op: &mut Operation, phase: RebuildPhase) -> RebuildParams {
        let OperationKind::Rebuild(p) = &mut op.kind else {
            unreachable!("checked by rebuild_mut")
        };
        p.phase = phase;
        p.clone()
    }

    /// `SwitchRebuild`: the collection serves the rebuild's generations.
    pub(crate) fn switch_rebuild(&mut self, operation: u64) -> Result<Vec<Change>> {
        let (op, phase) = self.rebuild_mut(operation, None)?;
        if !op.running() || phase != RebuildPhase::Building {
            return Err(MapError::FailedPrecondition(format!(
                "rebuild {operation} is {} ({}): nothing to switch",
                phase.name(),
                if op.running() { "running" } else { "ended" }
            )));
        }
        if let Some((i, _)) = op
            .steps
            .iter()
            .find(|(_, s)| !matches!(s, Step::Staged { .. }))
        {
            return Err(MapError::FailedPrecondition(format!(
                "rebuild {operation}: shard {i} has not staged its generation"
            )));
        }
        let (name, id) = (op.collection.clone(), op.collection_id);
        self.incarnation(&name, id)?;
        let (op, _) = self.rebuild_mut(operation, None)?;
        let p = Self::set_phase(op, RebuildPhase::Switched);
        let op = op.clone();
        let c = self.collections.get_mut(&name).expect("checked");
        c.spec.index = switched_params(&p);
        // A re-embed's queries are encoded by the new model from this map version on.
        if let Some(m) = &p.model {
            c.spec.encoder = Some(m.encoder.clone());
            c.spec.dimension = m.dimension;
        }
        Ok(vec![
            Change::OperationPut(op),
            Change::CollectionPut(c.clone()),
        ])
    }

    /// `CommitRebuild`: a switched rebuild's previous generations may go.
    pub(crate) fn commit_rebuild(
        &mut self,
        collection: &str,
        operation: u64,
    ) -> Result<Vec<Change>> {
        let version = self.version + 1;
        let (op, phase) = self.rebuild_mut(operation, Some(collection))?;
        match phase {
            RebuildPhase::Switched => {}
            RebuildPhase::Building if op.running() => {
                return Err(MapError::FailedPrecondition(format!(
                    "rebuild {operation} has not switched yet: wait for it, or roll it back"
                )))
            }
            p => {
                return Err(MapError::FailedPrecondition(format!(
                    "rebuild {operation} is {}: nothing to commit",
                    if op.running() { p.name() } else { "over" }
                )))
            }
        }
        Self::set_phase(op, RebuildPhase::Committed);
        op.end(Outcome::Succeeded, version);
        Ok(vec![Change::OperationPut(op.clone())])
    }

    /// `RollbackRebuild`: the previous generations serve again (or, before the switch,
    /// the staged ones are dropped); refused once committed.
    pub(crate) fn rollback_rebuild(
        &mut self,
        collection: &str,
        operation: u64,
    ) -> Result<Vec<Change>> {
        let version = self.version + 1;
        let (op, phase) = self.rebuild_mut(operation, Some(collection))?;
        match phase {
            RebuildPhase::Committed => {
                return Err(MapError::FailedPrecondition(format!(
                    "rebuild {operation} was committed: its previous generations are deleted, \
                     so it cannot be rolled back (start another rebuild instead)"
                )))
            }
            RebuildPhase::RolledBack => {
                return Err(MapError::FailedPrecondition(format!(
                    "rebuild {operation} is already rolled back"
                )))
            }
            RebuildPhase::Building if !op.running() => {
                return Err(MapError::FailedPrecondition(format!(
                    "rebuild {operation} ended before its switch: nothing serves from it"
                )))
            }
            _ => {}
        }
        let p = Self::set_phase(op, RebuildPhase::RolledBack);
        op.end(
            Outcome::Cancelled {
                reason: match phase {
                    RebuildPhase::Switched => "rolled back: the previous generations serve".into(),
                    _ => "rolled back before the switch".into(),
                },
            },
            version,
        );
        let (op, name, id) = (op.clone(), op.collection.clone(), op.collection_id);
        let mut changes = vec![Change::OperationPut(op)];
        if phase == RebuildPhase::Switched {
            if let Some(c) = self.collections.get_mut(&name).filter(|c| c.id == id) {
                c.spec.index = p.previous;
                if let Some(m) = p.model {
                    c.spec.encoder = m.previous;
                    c.spec.dimension = m.previous_dimension;
                }
                changes.push(Change::CollectionPut(c.clone()));
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::tests::{map_with_nodes, placed, spec};
    use crate::map::Command;
    use crate::operations::BuildParams;

    fn start(m: &mut ClusterMap, nlist: u32, previous: IndexParams) -> Result<u64> {
        start_with(m, nlist, previous, None)
    }

    fn start_with(
        m: &mut ClusterMap,
        nlist: u32,
        previous: IndexParams,
        model: Option<crate::index::ModelChange>,
    ) -> Result<u64> {
        let id = m.collections["c"].id;
        m.apply(&Command::StartOperation {
            kind: OperationKind::Rebuild(RebuildParams {
                build: BuildParams {
                    nlist,
                    pq_m: 48,
                    pq_nbits: 8,
                    train_sample: 10_000,
                    rows_per_shard: 5_000,
                    rerank: Default::default(),
                },
                nprobe: 16,
                refine: 10,
                gate_k: 10,
                margin_bp: 100,
                previous,
                phase: RebuildPhase::Building,
                model,
            }),
            collection: "c".into(),
            collection_id: id,
            started_ms: 0,
        })?;
        Ok(m.next_operation_id)
    }

    fn stage(m: &mut ClusterMap, op: u64, shard: u32) {
        m.apply(&Command::OperationStep {
            id: op,
            shard,
            step: Step::Staged {
                generation: 5,
                gate: "recall@10 0.97 -> 0.97".into(),
            },
        })
        .unwrap();
    }

    #[test]
    fn a_rebuild_switches_once_every_replica_holds_it_and_rolls_back_until_committed() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 2, 2))).unwrap();
        let before = m.collections["c"].spec.index.clone();
        // Conditional on the parameters it was asked from.
        let mut stale = before.clone();
        stale.nprobe += 1;
        assert!(start(&mut m, 256, stale).is_err());
        let op = start(&mut m, 256, before.clone()).unwrap();
        assert!(
            start(&mut m, 128, before.clone()).is_err(),
            "one rebuild at a time"
        );
        let holds = |m: &ClusterMap, op: u64| ready_to_switch(m, |_, _| op);
        assert!(holds(&m, op).is_empty(), "no shard staged");
        stage(&mut m, op, 0);
        stage(&mut m, op, 1);
        assert!(m.operations[&op].running(), "staged waits for the switch");
        assert!(
            ready_to_switch(&m, |k, n| u64::from(k.index == 0 || n != "n2") * op).is_empty(),
            "a replica without the staged generation holds the switch"
        );
        assert_eq!(holds(&m, op), vec![op]);
        assert!(
            m.apply(&Command::CommitRebuild {
                collection: "c".into(),
                operation: op
            })
            .is_err(),
            "not switched yet"
        );
        m.apply(&Command::SwitchRebuild { operation: op }).unwrap();
        assert_eq!(m.collections["c"].spec.index.nlist, 256);
        assert_eq!(m.collections["c"].spec.index.nprobe, 16);
        assert!(holds(&m, op).is_empty(), "switched once");
        assert!(
            m.apply(&Command::CancelOperation {
                id: op,
                reason: String::new()
            })
            .is_err(),
            "a switched rebuild is committed or rolled back, not cancelled"
        );
        m.apply(&Command::RollbackRebuild {
            collection: "c".into(),
            operation: op,
        })
        .unwrap();
        assert_eq!(
            m.collections["c"].spec.index, before,
            "previous parameters back"
        );
        assert!(!m.operations[&op].running());
        // Another, committed: rollback refused after.
        let op = start(&mut m, 512, before.clone()).unwrap();
        stage(&mut m, op, 0);
        stage(&mut m, op, 1);
        m.apply(&Command::SwitchRebuild { operation: op }).unwrap();
        m.apply(&Command::CommitRebuild {
            collection: "c".into(),
            operation: op,
        })
        .unwrap();
        assert_eq!(m.operations[&op].outcome, Some(Outcome::Succeeded));
        let e = m
            .apply(&Command::RollbackRebuild {
                collection: "c".into(),
                operation: op,
            })
            .unwrap_err();
        assert!(e.to_string().contains("committed"), "{e}");
        assert_eq!(m.collections["c"].spec.index.nlist, 512);
        assert_eq!(m.rebuild_of("c").map(|o| o.id), Some(op));
    }

    #[test]
    fn a_gate_that_refuses_a_shard_fails_the_rebuild_naming_it() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("c", 2, 1))).unwrap();
        let before = m.collections["c"].spec.index.clone();
        let op = start(&mut m, 256, before.clone()).unwrap();
        stage(&mut m, op, 0);
        m.apply(&Command::OperationStep {
            id: op,
            shard: 1,
            step: Step::Failed {
                reason: "the gate refused: recall@10 0.97 -> 0.41".into(),
            },
        })
        .unwrap();
        let o = &m.operations[&op];
        assert!(
            matches!(&o.outcome, Some(Outcome::Failed { reason }) if reason.contains("shard 1") && reason.contains("0.41")),
            "{:?}",
            o.outcome
        );
        assert_eq!(m.collections["c"].spec.index, before, "nothing switched");
        assert!(ready_to_switch(&m, |_, _| op).is_empty());
    }

    #[test]
    fn aliases_switch_atomically_and_go_with_their_collection() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("a", 1, 1))).unwrap();
        m.apply(&placed(&m, spec("b", 1, 1))).unwrap();
        let set = |alias: &str, c: Option<&str>| Command::SetAlias {
            alias: alias.into(),
            collection: c.map(str::to_string),
        };
        m.apply(&set("live", Some("a"))).unwrap();
        assert_eq!(m.resolve("live"), "a");
        assert_eq!(m.resolve("b"), "b");
        m.apply(&set("live", Some("b"))).unwrap();
        assert_eq!(m.resolve("live"), "b");
        assert!(
            m.apply(&set("a", Some("b"))).is_err(),
            "a collection's name"
        );
        assert!(
            m.apply(&set("x", Some("nope"))).is_err(),
            "no such collection"
        );
        assert!(
            m.apply(&placed(&m, spec("live", 1, 1))).is_err(),
            "a collection cannot take an alias's name"
        );
        m.apply(&Command::DropCollection { name: "b".into() })
            .unwrap();
        assert!(m.aliases.is_empty(), "dropped with its collection");
        assert!(m.apply(&set("live", None)).is_err(), "already gone");
    }

    #[test]
    fn a_re_embed_switches_the_collections_model_and_a_rollback_restores_it() {
        use crate::index::{EncoderRef, ModelChange};
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("c", 2, 1))).unwrap();
        let before = m.collections["c"].spec.clone();
        let model = |hash: &str, previous_dimension: u32| ModelChange {
            encoder: EncoderRef {
                model_id: "mpnet".into(),
                content_hash: hash.into(),
            },
            dimension: 768,
            previous: before.encoder.clone(),
            previous_dimension,
        };
        let dim = before.dimension;
        // The new model's dimension is checked (PQ m divides it), and what the
        // collection holds now.
        assert!(start_with(&mut m, 64, before.index.clone(), Some(model("", dim))).is_err());
        assert!(start_with(
            &mut m,
            64,
            before.index.clone(),
            Some(model("sha256:b", dim + 1))
        )
        .is_err());
        let op = start_with(
            &mut m,
            64,
            before.index.clone(),
            Some(model("sha256:b", dim)),
        )
        .unwrap();
        stage(&mut m, op, 0);
        stage(&mut m, op, 1);
        m.apply(&Command::SwitchRebuild { operation: op }).unwrap();
        let c = &m.collections["c"].spec;
        assert_eq!(
            (
                c.dimension,
                c.encoder.as_ref().unwrap().content_hash.as_str()
            ),
            (768, "sha256:b")
        );
        m.apply(&Command::RollbackRebuild {
            collection: "c".into(),
            operation: op,
        })
        .unwrap();
        let c = &m.collections["c"].spec;
        assert_eq!(
            (c.dimension, &c.encoder),
            (before.dimension, &before.encoder)
        );
        assert_eq!(c.index, before.index);
    }
}
