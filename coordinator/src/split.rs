//! Online shard splits in the cluster map (issue 19; design in
//! docs/adr/0003-online-shard-split.md): the commands' checks and effects, and the
//! leader's decisions as pure functions of the map and the replicas' reports.
//!
//! A split doubles a collection's shard count `S` keeping its routing rule
//! (`shoal_proto::routing`): shard `i` keeps the ids of residue `i` among `2S` and its
//! new sibling `i + S` takes the rest. The sibling is forked **in place**: on every
//! node that holds a replica of `i`, a copy of that replica at one log position (as
//! Elasticsearch's split API hard-links an index into one of twice the shards on the
//! same nodes, and placement spreads them afterwards). The steps, each a command:
//!
//! 1. `StartSplit`: the sources are *sealed* (their primaries take no writes) and the
//!    siblings enter the map *forking*, with the replica set of their source; the
//!    collection still routes by `S`, so nothing reads or writes them yet.
//! 2. `SplitSealed`: a sealed primary reports that nothing is in flight and where its
//!    log ends; the map records that seal point (epoch, sequence) for the source.
//! 3. Each node clones its replica of the source once the replica holds exactly the
//!    seal point, and reports the clone's position as the sibling's replica.
//! 4. `CutOverSplit`: once every sibling's replicas on live nodes hold the seal point
//!    (at least the collection's write quorum of them), the shard count becomes `2S`,
//!    siblings and sources are ordinary shards again, and both halves delete the
//!    other's ids (`WriteOp::Retain`, logged by their primaries; reads filter them
//!    meanwhile).
//!
//! A primary change of a source during the seal makes its seal point stale (it names
//! the old epoch): the new primary reports its own, and clones are made again.
//! Cancelling the operation (an operator, or the leader after the seal has waited too
//! long) unseals the sources and drops the siblings; nothing acknowledged lives only in
//! a sibling, since the sources took no writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::map::{
    invalid, Change, ClusterMap, MapError, NodeId, Replica, ReplicaState, Result, Shard, ShardKey,
    MAX_SHARDS,
};
use crate::operations::{self, Operation, OperationKind, Outcome, Step};

/// A position in a shard's history that every replica of it can hold: the shard's
/// epoch in the map when its primary reported it, and the last batch (sequence
/// number, the epoch it was written in).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealPoint {
    pub epoch: u64,
    pub seq: u64,
    pub batch_epoch: u64,
}

/// A shard's part in a running split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum SplitRole {
    /// A source: its primary takes no writes. `at` is where its log ends, once its
    /// primary reported it (valid only while `at.epoch` is the shard's epoch).
    Sealed {
        operation: u64,
        at: Option<SealPoint>,
    },
    /// A sibling being forked from shard `from` on the nodes that hold it; routed to
    /// by no one until the cut-over.
    Forking { operation: u64, from: u32 },
}

impl Shard {
    /// The seal point of a sealed source, while it is current (the shard's epoch).
    pub fn seal_point(&self) -> Option<SealPoint> {
        match &self.split {
            Some(SplitRole::Sealed { at: Some(p), .. }) if p.epoch == self.epoch => Some(*p),
            _ => None,
        }
    }

    /// Whether this shard is a split's sibling not yet cut over.
    pub fn forking(&self) -> bool {
        matches!(self.split, Some(SplitRole::Forking { .. }))
    }
}

impl ClusterMap {
    /// The running split of `collection`, if any.
    pub fn running_split(&self, collection: &str) -> Option<&Operation> {
        self.operations.values().find(|o| {
            o.running()
                && o.collection == collection
                && matches!(o.kind, OperationKind::Split { .. })
        })
    }

    pub(crate) fn start_split(
        &mut self,
        collection: &str,
        collection_id: u64,
        started_ms: u64,
    ) -> Result<Vec<Change>> {
        let from = self
            .incarnation(collection, collection_id)?
            .spec
            .shard_count;
        if from * 2 > MAX_SHARDS {
            return Err(invalid(format!(
                "collection {collection:?} has {from} shards: a split to {} would pass the limit of {MAX_SHARDS}",
                from * 2
            )));
        }
        if let Some(o) = self
            .operations
            .values()
            .find(|o| o.running() && o.collection == collection)
        {
            return Err(MapError::FailedPrecondition(format!(
                "operation {} ({}) is running on {collection}: a split waits for it (or cancel it)",
                o.id,
                o.kind.name()
            )));
        }
        let sources: Vec<Shard> = self.shards_of(collection).cloned().collect();
        for s in &sources {
            if s.primary.is_none() || s.replicas.iter().any(|r| r.state != ReplicaState::Serving) {
                return Err(MapError::FailedPrecondition(format!(
                    "shard {} is moving or has no primary: a split starts once every replica serves",
                    s.key
                )));
            }
        }
        let id = self.next_operation_id + 1;
        self.next_operation_id = id;
        let op = Operation {
            id,
            kind: OperationKind::Split { from_shards: from },
            collection: collection.to_string(),
            collection_id,
            started_ms,
            started_version: self.version + 1,
            steps: sources
                .iter()
                .map(|s| {
                    (
                        s.key.index,
                        Step::Pending {
                            from_generation: s.serving_generation,
                        },
                    )
                })
                .collect(),
            outcome: None,
            finished_version: 0,
        };
        let mut changes = vec![Change::OperationPut(op.clone())];
        self.operations.insert(id, op);
        for s in sources {
            let sibling = Shard {
                key: ShardKey {
                    collection: collection.to_string(),
                    index: s.key.index + from,
                },
                split: Some(SplitRole::Forking {
                    operation: id,
                    from: s.key.index,
                }),
                forced_epoch: 0,
                building_generation: 0,
                ..s.clone()
            };
            let source = self.shards.get_mut(&s.key).expect("listed above");
            source.split = Some(SplitRole::Sealed {
                operation: id,
                at: None,
            });
            changes.push(Change::ShardPut(source.clone()));
            changes.push(Change::ShardPut(sibling.clone()));
            self.shards.insert(sibling.key.clone(), sibling);
        }
        Ok(changes)
    }

    pub(crate) fn split_sealed(
        &mut self,
        shard: &ShardKey,
        operation: u64,
        at: SealPoint,
    ) -> Result<Vec<Change>> {
        let s = self
            .shards
            .get_mut(shard)
            .ok_or_else(|| MapError::NotFound(format!("shard {shard} not found")))?;
        if !matches!(&s.split, Some(SplitRole::Sealed { operation: o, .. }) if *o == operation) {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} is not sealed by operation {operation}"
            )));
        }
        if s.epoch != at.epoch {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} is at epoch {}, not {}",
                s.epoch, at.epoch
            )));
        }
        if s.seal_point() == Some(at) {
            return Err(MapError::FailedPrecondition(format!(
                "shard {shard} is already sealed at {at:?}"
            )));
        }
        s.split = Some(SplitRole::Sealed {
            operation,
            at: Some(at),
        });
        Ok(vec![Change::ShardPut(s.clone())])
    }

    /// The cut-over: `replicas` names each sibling's replicas that hold its source's
    /// seal point (the leader's reading of the reports, [`cut_over`]).
    pub(crate) fn cut_over_split(
        &mut self,
        operation: u64,
        replicas: &BTreeMap<u32, Vec<NodeId>>,
    ) -> Result<Vec<Change>> {
        let op = self
            .operations
            .get(&operation)
            .filter(|o| o.running())
            .ok_or_else(|| MapError::NotFound(format!("no running operation {operation}")))?;
        let OperationKind::Split { from_shards } = op.kind else {
            return Err(MapError::FailedPrecondition(format!(
                "operation {operation} is not a split"
            )));
        };
        let collection = op.collection.clone();
        let min = self
            .collections
            .get(&collection)
            .map_or(1, |c| c.spec.min_in_sync().max(1));
        // Every check first: nothing changes unless all of it holds.
        let mut plan = Vec::new();
        for i in 0..from_shards {
            let key = ShardKey {
                collection: collection.clone(),
                index: i,
            };
            let sib_key = ShardKey {
                collection: collection.clone(),
                index: i + from_shards,
            };
            let (Some(src), Some(sib)) = (self.shards.get(&key), self.shards.get(&sib_key)) else {
                return Err(MapError::FailedPrecondition(format!(
                    "split {operation}: shard {key} or {sib_key} is missing"
                )));
            };
            if src.seal_point().is_none() {
                return Err(MapError::FailedPrecondition(format!(
                    "split {operation}: shard {key} has no current seal point"
                )));
            }
            let ready = replicas.get(&sib_key.index).cloned().unwrap_or_default();
            if ready.len() < min
                || ready.iter().any(|n| !sib.holds(n))
                || ready
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    != ready.len()
            {
                return Err(MapError::FailedPrecondition(format!(
                    "split {operation}: shard {sib_key} needs at least {min} distinct replicas of its own holding the seal point, not {ready:?}"
                )));
            }
            plan.push((key, sib_key, ready));
        }
        let version = self.version + 1;
        let mut changes = Vec::new();
        for (key, sib_key, ready) in plan {
            let src = self.shards.get_mut(&key).expect("checked");
            src.split = None;
            let (src_primary, src_epoch) = (src.primary.clone(), src.epoch);
            changes.push(Change::ShardPut(src.clone()));
            let sib = self.shards.get_mut(&sib_key).expect("checked");
            sib.split = None;
            sib.replicas = ready
                .iter()
                .map(|n| Replica {
                    node: n.clone(),
                    state: ReplicaState::Serving,
                })
                .collect();
            // Every listed replica holds every acknowledged write of the source; the
            // source's primary leads on where it holds a copy, under the same epoch
            // (the same history), else the first, under a new one.
            match src_primary.filter(|p| ready.contains(p)) {
                Some(p) => {
                    sib.primary = Some(p);
                    sib.epoch = src_epoch;
                }
                None => {
                    sib.primary = ready.first().cloned();
                    sib.epoch = src_epoch + 1;
                }
            }
            changes.push(Change::ShardPut(sib.clone()));
        }
        let c = self
            .collections
            .get_mut(&collection)
            .expect("the operation's");
        c.spec.shard_count = from_shards * 2;
        changes.push(Change::CollectionPut(c.clone()));
        let op = self.operations.get_mut(&operation).expect("checked");
        for step in op.steps.values_mut() {
            *step = Step::Done { generation: 0 };
        }
        op.end(Outcome::Succeeded, version);
        changes.push(Change::OperationPut(op.clone()));
        operations::prune(&mut self.operations);
        Ok(changes)
    }

    /// A cancelled split: its sources unsealed, its siblings gone.
    pub(crate) fn undo_split(&mut self, operation: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let keys: Vec<ShardKey> = self.shards.keys().cloned().collect();
        for k in keys {
            let s = self.shards.get_mut(&k).expect("listed");
            match s.split {
                Some(SplitRole::Sealed { operation: o, .. }) if o == operation => {
                    s.split = None;
                    changes.push(Change::ShardPut(s.clone()));
                }
                Some(SplitRole::Forking { operation: o, .. }) if o == operation => {
                    self.shards.remove(&k);
                    changes.push(Change::ShardDropped(k));
                }
                _ => {}
            }
        }
        changes
    }
}

/// The leader's cut-over decision for a running split (pure): once every source has
/// a current seal point and each sibling's replicas on live nodes all report holding
/// it (`position(shard, node)` = (batch epoch, sequence) of their last report), at
/// least the write quorum of them, the command that cuts over. `None`: not yet.
pub fn cut_over(
    map: &ClusterMap,
    operation: &Operation,
    position: impl Fn(&ShardKey, &str) -> Option<(u64, u64)>,
) -> Option<crate::map::Command> {
    let OperationKind::Split { from_shards } = operation.kind else {
        return None;
    };
    let min = map
        .collections
        .get(&operation.collection)
        .map_or(1, |c| c.spec.min_in_sync().max(1));
    let mut replicas = BTreeMap::new();
    for i in 0..from_shards {
        let src = map.shard_named(&operation.collection, operation.collection_id, i)?;
        let at = src.seal_point()?;
        let sib = map.shard_named(
            &operation.collection,
            operation.collection_id,
            i + from_shards,
        )?;
        let mut ready = Vec::new();
        for r in &sib.replicas {
            let live = map.nodes.get(&r.node).is_some_and(|n| n.state.is_live());
            let holds = position(&sib.key, &r.node) == Some((at.batch_epoch, at.seq));
            match (live, holds) {
                (_, true) => ready.push(r.node.clone()),
                (true, false) => return None, // a live replica still cloning
                (false, false) => {}          // away: left out, placement re-creates it
            }
        }
        if ready.len() < min {
            return None;
        }
        replicas.insert(sib.key.index, ready);
    }
    Some(crate::map::Command::CutOverSplit {
        operation: operation.id,
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::tests::{map_with_nodes, placed, spec};
    use crate::map::{Command, NodeState};

    fn key(i: u32) -> ShardKey {
        ShardKey {
            collection: "c".into(),
            index: i,
        }
    }

    /// Three nodes, collection `c` of 2 shards at RF 2, a split started.
    fn splitting() -> (ClusterMap, u64) {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 2, 2))).unwrap();
        let id = m.collections["c"].id;
        m.apply(&Command::StartSplit {
            collection: "c".into(),
            collection_id: id,
            started_ms: 0,
        })
        .unwrap();
        let op = m.running_split("c").unwrap().id;
        (m, op)
    }

    fn seal(m: &mut ClusterMap, op: u64, i: u32, seq: u64) -> Result<Vec<Change>> {
        let epoch = m.shards[&key(i)].epoch;
        m.apply(&Command::SplitSealed {
            shard: key(i),
            operation: op,
            at: SealPoint {
                epoch,
                seq,
                batch_epoch: epoch,
            },
        })
    }

    #[test]
    fn a_split_seals_forks_in_place_and_cuts_over_to_twice_the_shards() {
        let (mut m, op) = splitting();
        assert_eq!(
            m.collections["c"].spec.shard_count, 2,
            "routing unchanged until the cut-over"
        );
        for i in 0..2 {
            let (src, sib) = (&m.shards[&key(i)], &m.shards[&key(i + 2)]);
            assert!(matches!(
                src.split,
                Some(SplitRole::Sealed { at: None, .. })
            ));
            assert!(sib.forking());
            assert_eq!(
                sib.replicas, src.replicas,
                "forked on the nodes holding the source"
            );
            assert_eq!(
                (sib.primary.clone(), sib.epoch),
                (src.primary.clone(), src.epoch)
            );
        }
        // Another operation waits for the split, and a second split is refused.
        let id = m.collections["c"].id;
        let before = m.clone();
        assert!(m
            .apply(&Command::StartOperation {
                kind: OperationKind::Compact,
                collection: "c".into(),
                collection_id: id,
                started_ms: 0,
            })
            .is_err());
        assert!(m
            .apply(&Command::StartSplit {
                collection: "c".into(),
                collection_id: id,
                started_ms: 0,
            })
            .is_err());
        assert_eq!(m, before);

        // Not before every source has a seal point.
        let all = |m: &ClusterMap| -> BTreeMap<u32, Vec<NodeId>> {
            (2..4)
                .map(|i| {
                    (
                        i,
                        m.shards[&key(i)]
                            .replicas
                            .iter()
                            .map(|r| r.node.clone())
                            .collect(),
                    )
                })
                .collect()
        };
        let cut = Command::CutOverSplit {
            operation: op,
            replicas: all(&m),
        };
        seal(&mut m, op, 0, 10).unwrap();
        assert!(seal(&mut m, op, 0, 10).is_err(), "the same point twice");
        let before = m.clone();
        assert!(m.apply(&cut).is_err());
        assert_eq!(m, before, "a refused cut-over changes nothing");
        // A seal point from an older epoch is stale: a promotion makes it so.
        seal(&mut m, op, 1, 7).unwrap();
        let s1 = m.shards[&key(1)].clone();
        let backup = s1
            .replicas
            .iter()
            .find(|r| Some(&r.node) != s1.primary.as_ref())
            .unwrap()
            .node
            .clone();
        m.apply(&Command::Promote {
            shard: key(1),
            node: backup.clone(),
            epoch: s1.epoch,
        })
        .unwrap();
        assert_eq!(m.shards[&key(1)].seal_point(), None);
        assert!(m.apply(&cut).is_err());
        seal(&mut m, op, 1, 7).unwrap();

        // Too few replicas, or a node not holding the sibling, are refused.
        let mut short = all(&m);
        short.get_mut(&2).unwrap().truncate(1);
        assert!(m
            .apply(&Command::CutOverSplit {
                operation: op,
                replicas: short
            })
            .is_err());
        let mut foreign = all(&m);
        foreign.get_mut(&2).unwrap()[0] = "n-none".into();
        assert!(m
            .apply(&Command::CutOverSplit {
                operation: op,
                replicas: foreign
            })
            .is_err());

        m.apply(&cut).unwrap();
        assert_eq!(m.collections["c"].spec.shard_count, 4);
        assert!(m.shards.values().all(|s| s.split.is_none()));
        // Shard 3's source changed primary: the sibling follows the source's primary
        // under the source's epoch (one history).
        let (s1, s3) = (&m.shards[&key(1)], &m.shards[&key(3)]);
        assert_eq!(
            (s3.primary.as_deref(), s3.epoch),
            (Some(backup.as_str()), s1.epoch)
        );
        let o = &m.operations[&op];
        assert_eq!(o.outcome, Some(Outcome::Succeeded));
        // Once cut over, another split may start (from four shards).
        m.apply(&Command::StartSplit {
            collection: "c".into(),
            collection_id: id,
            started_ms: 0,
        })
        .unwrap();
        assert!(matches!(
            m.running_split("c").unwrap().kind,
            OperationKind::Split { from_shards: 4 }
        ));
    }

    #[test]
    fn a_cancelled_split_unseals_and_drops_its_forks() {
        let (mut m, op) = splitting();
        seal(&mut m, op, 0, 3).unwrap();
        let changes = m
            .apply(&Command::CancelOperation {
                id: op,
                reason: "operator".into(),
            })
            .unwrap();
        assert!(changes.contains(&Change::ShardDropped(key(2))));
        assert!(changes.contains(&Change::ShardDropped(key(3))));
        assert_eq!(m.shards.len(), 2);
        assert!(m.shards.values().all(|s| s.split.is_none()));
        assert_eq!(m.collections["c"].spec.shard_count, 2);
        assert!(matches!(
            m.operations[&op].outcome,
            Some(Outcome::Cancelled { .. })
        ));
    }

    #[test]
    fn a_split_needs_settled_shards_and_room() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 600, 1))).unwrap();
        let id = m.collections["c"].id;
        let start = Command::StartSplit {
            collection: "c".into(),
            collection_id: id,
            started_ms: 0,
        };
        let before = m.clone();
        assert!(
            matches!(m.apply(&start), Err(MapError::InvalidArgument(_))),
            "1,200 shards pass the limit"
        );
        assert_eq!(m, before);
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 2, 1))).unwrap();
        let id = m.collections["c"].id;
        let holder = m.shards[&key(0)].replicas[0].node.clone();
        let to = ["n0", "n1", "n2"]
            .into_iter()
            .find(|n| *n != holder)
            .unwrap();
        m.apply(&Command::ApplyMoves(vec![crate::map::Move::Add {
            shard: key(0),
            to: to.into(),
            from: Some(holder),
        }]))
        .unwrap();
        let start = Command::StartSplit {
            collection: "c".into(),
            collection_id: id,
            started_ms: 0,
        };
        assert!(
            matches!(m.apply(&start), Err(MapError::FailedPrecondition(_))),
            "a move in flight"
        );
    }

    #[test]
    fn the_leader_cuts_over_once_every_live_fork_holds_the_seal_point() {
        let (mut m, op) = splitting();
        seal(&mut m, op, 0, 10).unwrap();
        let operation = m.operations[&op].clone();
        assert!(
            cut_over(&m, &operation, |_, _| Some((1, 10))).is_none(),
            "shard 1 not sealed"
        );
        seal(&mut m, op, 1, 4).unwrap();
        let at = |i: u32| m.shards[&key(i)].seal_point().unwrap();
        let (p0, p1) = (at(0), at(1));
        let holds = |k: &ShardKey, _: &str| match k.index {
            2 => Some((p0.batch_epoch, p0.seq)),
            3 => Some((p1.batch_epoch, p1.seq)),
            _ => None,
        };
        let Some(Command::CutOverSplit { replicas, .. }) = cut_over(&m, &operation, holds) else {
            panic!("every fork holds its point");
        };
        assert_eq!(replicas[&2].len(), 2);
        // One fork behind on a live node: wait.
        let lagging = m.shards[&key(3)].replicas[1].node.clone();
        let behind = |k: &ShardKey, n: &str| {
            if k.index == 3 && n == lagging {
                Some((1, 3))
            } else {
                holds(k, n)
            }
        };
        assert!(cut_over(&m, &operation, behind).is_none());
        // The same node down: left out, while the write quorum (2 at RF 2) is not met.
        m.apply(&Command::SetNodeState {
            id: lagging.clone(),
            state: NodeState::Down,
            from: vec![],
        })
        .unwrap();
        assert!(
            cut_over(&m, &operation, behind).is_none(),
            "one fork is below the quorum of 2"
        );
    }
}
