//! Prometheus metrics of a coordinator member (`--metrics-listen`): its Raft role and
//! position, and the health of the cluster map as this member has applied it (shards
//! short of their replication factor, shards with no serving replica on a live node,
//! copies in flight, nodes by state). Every member exports them; dashboards take the
//! maximum, or the leader's.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{describe_gauge, gauge};
use openraft::ServerState;

use crate::map::{ClusterMap, NodeState, ReplicaState};
use crate::member::Coordinator;

/// Installs the process-wide exporter (once per process).
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| anyhow::anyhow!("starting the metrics endpoint on {addr}: {e}"))?;
    describe_gauge!(
        "shoal_coordinator_is_leader",
        "1 on the Raft leader, else 0"
    );
    describe_gauge!("shoal_coordinator_raft_term", "current Raft term");
    describe_gauge!(
        "shoal_coordinator_raft_applied_index",
        "last log index applied to this member's cluster map"
    );
    describe_gauge!(
        "shoal_coordinator_map_version",
        "cluster map version (one per applied command)"
    );
    describe_gauge!("shoal_coordinator_nodes", "worker nodes by state");
    describe_gauge!("shoal_coordinator_collections", "collections");
    describe_gauge!("shoal_coordinator_shards", "shards of all collections");
    describe_gauge!(
        "shoal_coordinator_shards_under_replicated",
        "shards with fewer serving replicas on live nodes than their replication factor"
    );
    describe_gauge!(
        "shoal_coordinator_shards_unavailable",
        "shards with no serving replica on a live node (searches miss them)"
    );
    describe_gauge!(
        "shoal_coordinator_replicas_copying",
        "replicas being copied (placement moves in flight)"
    );
    describe_gauge!(
        "shoal_coordinator_operation_steps",
        "shard steps of running operations, by kind and state (pending, staged, done, failed)"
    );
    describe_gauge!(
        "shoal_coordinator_rebuilds_switched",
        "rebuilds serving their new generations and awaiting commit or rollback (issue 21)"
    );
    Ok(())
}

/// What the map says about the cluster's health (pure: unit-tested).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MapHealth {
    /// Nodes by state name, every state present (0 when none).
    pub nodes: Vec<(&'static str, u64)>,
    pub collections: u64,
    pub shards: u64,
    pub under_replicated: u64,
    pub unavailable: u64,
    pub copying: u64,
    /// Shard steps of running operations: (kind, state) -> count, every pair present.
    pub steps: Vec<((&'static str, &'static str), u64)>,
    pub rebuilds_switched: u64,
}

/// Operation kinds and step states the step gauges name (every pair is set, so an
/// operation that ends takes its counts to 0).
const KINDS: [&str; 6] = [
    "build_index",
    "compact",
    "split",
    "backup",
    "restore",
    "rebuild",
];
const STEP_STATES: [&str; 4] = ["pending", "staged", "done", "failed"];

pub fn map_health(map: &ClusterMap) -> MapHealth {
    let states = [
        (NodeState::Joining, "joining"),
        (NodeState::Up, "up"),
        (NodeState::Suspect, "suspect"),
        (NodeState::Down, "down"),
        (NodeState::Draining, "draining"),
    ];
    let nodes = states
        .iter()
        .map(|(s, name)| {
            let n = map.nodes.values().filter(|n| n.state == *s).count();
            (*name, n as u64)
        })
        .collect();
    // A draining node still serves its replicas until they move.
    let live = |node: &str| map.nodes.get(node).is_some_and(|n| n.state.is_live());
    let mut h = MapHealth {
        nodes,
        collections: map.collections.len() as u64,
        shards: map.shards.len() as u64,
        ..MapHealth::default()
    };
    for shard in map.shards.values() {
        let rf = map
            .collections
            .get(&shard.key.collection)
            .map_or(0, |c| c.spec.replication_factor as usize);
        let serving = shard
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Copying && live(&r.node))
            .count();
        h.under_replicated += u64::from(serving < rf);
        h.unavailable += u64::from(serving == 0);
        h.copying += shard
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Copying)
            .count() as u64;
    }
    use crate::operations::{OperationKind, RebuildPhase, Step};
    let running: Vec<_> = map.operations.values().filter(|o| o.running()).collect();
    h.steps = KINDS
        .iter()
        .flat_map(|&k| STEP_STATES.iter().map(move |&st| (k, st)))
        .map(|(kind, state)| {
            let n = running
                .iter()
                .filter(|o| o.kind.name() == kind)
                .flat_map(|o| o.steps.values())
                .filter(|s| {
                    state
                        == match s {
                            Step::Pending { .. } => "pending",
                            Step::Staged { .. } => "staged",
                            Step::Done { .. } => "done",
                            Step::Failed { .. } => "failed",
                        }
                })
                .count();
            ((kind, state), n as u64)
        })
        .collect();
    h.rebuilds_switched = running
        .iter()
        .filter(
            |o| matches!(&o.kind, OperationKind::Rebuild(p) if p.phase == RebuildPhase::Switched),
        )
        .count() as u64;
    h
}

/// Refreshes the gauges every `period` until `stop` fires.
pub async fn refresh(
    c: std::sync::Arc<Coordinator>,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let m = c.raft.metrics().borrow().clone();
        gauge!("shoal_coordinator_is_leader")
            .set(f64::from(u8::from(m.state == ServerState::Leader)));
        gauge!("shoal_coordinator_raft_term").set(m.current_term as f64);
        gauge!("shoal_coordinator_raft_applied_index")
            .set(m.last_applied.map_or(0, |l| l.index) as f64);
        let (version, h) = {
            let st = c.sm.state.lock();
            (st.map.version, map_health(&st.map))
        };
        gauge!("shoal_coordinator_map_version").set(version as f64);
        for (state, n) in &h.nodes {
            gauge!("shoal_coordinator_nodes", "state" => *state).set(*n as f64);
        }
        gauge!("shoal_coordinator_collections").set(h.collections as f64);
        gauge!("shoal_coordinator_shards").set(h.shards as f64);
        gauge!("shoal_coordinator_shards_under_replicated").set(h.under_replicated as f64);
        gauge!("shoal_coordinator_shards_unavailable").set(h.unavailable as f64);
        gauge!("shoal_coordinator_replicas_copying").set(h.copying as f64);
        for ((kind, state), n) in &h.steps {
            gauge!("shoal_coordinator_operation_steps", "kind" => *kind, "state" => *state)
                .set(*n as f64);
        }
        gauge!("shoal_coordinator_rebuilds_switched").set(h.rebuilds_switched as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::tests::{map_with_nodes, placed, spec};
    use crate::map::Command;

    fn set(m: &mut ClusterMap, node: &str, state: NodeState) {
        m.apply(&Command::SetNodeState {
            id: node.into(),
            state,
            from: vec![],
        })
        .unwrap();
    }

    #[test]
    fn health_counts_short_and_unavailable_shards() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("docs", 6, 2))).unwrap();
        let h = map_health(&m);
        assert_eq!((h.collections, h.shards), (1, 6));
        assert_eq!((h.under_replicated, h.unavailable, h.copying), (0, 0, 0));
        assert!(h.nodes.contains(&("up", 3)) && h.nodes.contains(&("down", 0)));
        // One node suspect: each shard it holds is short of RF 2, none unavailable.
        set(&mut m, "n0", NodeState::Suspect);
        let held = |m: &ClusterMap, n: &str| m.shards.values().filter(|s| s.holds(n)).count();
        let h = map_health(&m);
        assert!(held(&m, "n0") > 0);
        assert_eq!(h.under_replicated, held(&m, "n0") as u64);
        assert_eq!(h.unavailable, 0);
        // A second one: the shards both held have no live replica left.
        set(&mut m, "n1", NodeState::Down);
        let both = m
            .shards
            .values()
            .filter(|s| s.holds("n0") && s.holds("n1"))
            .count();
        assert!(both > 0, "no shard on both n0 and n1");
        let h = map_health(&m);
        assert_eq!(h.unavailable, both as u64);
        assert!(h.nodes.contains(&("suspect", 1)) && h.nodes.contains(&("down", 1)));
        // Draining nodes still serve.
        set(&mut m, "n0", NodeState::Draining);
        set(&mut m, "n1", NodeState::Up);
        assert_eq!(map_health(&m).under_replicated, 0);
        // A running compaction's steps, by state; every (kind, state) pair is named.
        let id = m.collections["docs"].id;
        m.apply(&Command::StartOperation {
            kind: crate::operations::OperationKind::Compact,
            collection: "docs".into(),
            collection_id: id,
            started_ms: 0,
        })
        .unwrap();
        let h = map_health(&m);
        assert_eq!(h.steps.len(), KINDS.len() * STEP_STATES.len());
        assert!(
            h.steps.contains(&(("compact", "pending"), 6)),
            "{:?}",
            h.steps
        );
        assert!(h.steps.contains(&(("rebuild", "staged"), 0)));
        assert_eq!(h.rebuilds_switched, 0);
    }
}
