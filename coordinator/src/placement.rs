//! Placement: pure functions from the cluster map to replica assignments and moves.
//!
//! Rules, in priority order: never two replicas of a shard on one node; never past a
//! node's memory capacity; restore the replication factor first (replicas on down
//! nodes are evicted, lost copies re-created), then empty draining nodes, then even out
//! replicas per node to within one; prefer zones the shard does not use yet; at most
//! `max_moves` moves per step and `max_in_flight` copies under way at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::map::{ClusterMap, CollectionSpec, Move, NodeId, NodeState, ReplicaState, ShardKey};

#[derive(Clone, Debug)]
pub struct Options {
    /// Moves returned by one call of [`plan`].
    pub max_moves: usize,
    /// Copying replicas allowed across the cluster (a new node fills gradually).
    pub max_in_flight: usize,
    /// Nodes whose data volume is over a watermark, by their last heartbeat (a node
    /// not listed is under both).
    pub disk: BTreeMap<NodeId, DiskLevel>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_moves: 16,
            max_in_flight: 8,
            disk: BTreeMap::new(),
        }
    }
}

/// Where a node's data volume stands against the disk watermarks (Elasticsearch's
/// low / high; the flood stage is the node's own `--disk-reserve-bytes`, where it
/// refuses writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiskLevel {
    Ok,
    /// Over the low watermark: takes no new replicas.
    Low,
    /// Over the high watermark: its replicas move to other nodes, one copy at a time.
    High,
}

/// Pure: the level of a volume with `free` of `total` bytes, `reclaimable` of them in
/// the node's trash (given back when its grace period ends), against the used
/// fractions `low` < `high`. The high watermark counts the trash as free (space already
/// on its way back is no reason to move more replicas off); the low one does not (a new
/// replica needs the space now). Counting the trash for both made a full node that had
/// just shed a replica take new ones it could not create, and shed them again (seen in
/// the full-disk chaos test). An unknown total (0) is Ok.
pub fn disk_level(free: u64, reclaimable: u64, total: u64, low: f64, high: f64) -> DiskLevel {
    if total == 0 {
        return DiskLevel::Ok;
    }
    let used = |free: u64| total.saturating_sub(free) as f64 / total as f64;
    if used(free.saturating_add(reclaimable)) >= high {
        DiskLevel::High
    } else if used(free) >= low {
        DiskLevel::Low
    } else {
        DiskLevel::Ok
    }
}

/// Per-node bookkeeping while planning.
struct Pool {
    /// Up nodes: (zone, capacity bytes or u64::MAX when unknown).
    nodes: BTreeMap<NodeId, (String, u64)>,
    load: BTreeMap<NodeId, usize>,
    used: BTreeMap<NodeId, u64>,
    /// Up nodes over a disk watermark: never chosen for a new replica.
    disk_full: BTreeSet<NodeId>,
}

impl Pool {
    fn with_disk(map: &ClusterMap, disk: &BTreeMap<NodeId, DiskLevel>) -> Self {
        let mut p = Self::new(map);
        p.disk_full = disk
            .iter()
            .filter(|(_, l)| **l > DiskLevel::Ok)
            .map(|(n, _)| n.clone())
            .collect();
        p
    }

    fn new(map: &ClusterMap) -> Self {
        let nodes: BTreeMap<_, _> = map
            .nodes
            .values()
            .filter(|n| n.state.accepts_replicas())
            .map(|n| {
                let cap = match n.capacity.memory_bytes {
                    0 => u64::MAX,
                    b => b,
                };
                (n.id.clone(), (n.capacity.zone.clone(), cap))
            })
            .collect();
        let mut load: BTreeMap<NodeId, usize> = nodes.keys().map(|k| (k.clone(), 0)).collect();
        let mut used: BTreeMap<NodeId, u64> = BTreeMap::new();
        for s in map.shards.values() {
            let mem = replica_memory(map, &s.key);
            for r in &s.replicas {
                *used.entry(r.node.clone()).or_default() += mem;
                if r.state != ReplicaState::Leaving {
                    if let Some(l) = load.get_mut(&r.node) {
                        *l += 1;
                    }
                }
            }
        }
        Self {
            nodes,
            load,
            used,
            disk_full: BTreeSet::new(),
        }
    }

    fn fits(&self, node: &str, mem: u64) -> bool {
        if self.disk_full.contains(node) {
            return false;
        }
        let cap = self.nodes.get(node).map_or(0, |(_, c)| *c);
        self.used
            .get(node)
            .copied()
            .unwrap_or(0)
            .saturating_add(mem)
            <= cap
    }

    fn zone(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|(z, _)| z.as_str())
    }

    /// The best node for a new replica of a shard that already has `holders`.
    /// Preference: a zone the shard does not use yet, then the least-loaded node, then
    /// the least-loaded zone (so zones fill evenly and later shards can still spread),
    /// then the id (deterministic).
    fn choose(&self, holders: &[NodeId], mem: u64) -> Option<NodeId> {
        let zones: BTreeSet<&str> = holders.iter().filter_map(|h| self.zone(h)).collect();
        let mut zone_load: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, (zone, _)) in &self.nodes {
            *zone_load.entry(zone.as_str()).or_default() += self.load[id];
        }
        self.nodes
            .iter()
            .filter(|(id, _)| !holders.contains(id) && self.fits(id, mem))
            .min_by_key(|(id, (zone, _))| {
                (
                    zones.contains(zone.as_str()),
                    self.load[*id],
                    zone_load[zone.as_str()],
                    (*id).clone(),
                )
            })
            .map(|(id, _)| id.clone())
    }

    fn add(&mut self, node: &str, mem: u64) {
        *self.load.get_mut(node).expect("up node") += 1;
        *self.used.entry(node.to_string()).or_default() += mem;
    }
}

fn replica_memory(map: &ClusterMap, key: &ShardKey) -> u64 {
    map.collections
        .get(&key.collection)
        .map_or(0, |c| c.spec.replica_memory_bytes)
}

/// Nodes for each shard of a new collection (primary first), or why it cannot be
/// placed; nodes over a disk watermark (`disk`) take none.
pub fn initial(
    map: &ClusterMap,
    spec: &CollectionSpec,
    disk: &BTreeMap<NodeId, DiskLevel>,
) -> Result<Vec<Vec<NodeId>>, String> {
    let mut pool = Pool::with_disk(map, disk);
    let mem = spec.replica_memory_bytes;
    let mut out = Vec::with_capacity(spec.shard_count as usize);
    // Primaries take the writes (and encode the documents): spread them like replicas.
    let mut leads: HashMap<NodeId, usize> = HashMap::new();
    for p in map.shards.values().filter_map(|s| s.primary.as_ref()) {
        *leads.entry(p.clone()).or_default() += 1;
    }
    for index in 0..spec.shard_count {
        let mut holders = Vec::new();
        for _ in 0..spec.replication_factor {
            let node = pool.choose(&holders, mem).ok_or_else(|| {
                format!(
                    "no node has room for replica {} of shard {index} ({mem} bytes each, \
                     replication_factor {})",
                    holders.len() + 1,
                    spec.replication_factor
                )
            })?;
            pool.add(&node, mem);
            holders.push(node);
        }
        // The first holder becomes the primary: the one leading fewest shards.
        let lead = (0..holders.len())
            .min_by_key(|&i| (leads.get(&holders[i]).copied().unwrap_or(0), i))
            .unwrap_or(0);
        holders.swap(0, lead);
        if let Some(p) = holders.first() {
            *leads.entry(p.clone()).or_default() += 1;
        }
        out.push(holders);
    }
    Ok(out)
}

/// A replica's position as it last reported it: (epoch of its last batch, sequence).
pub type Position = (u64, u64);

/// The replica to make `s`'s primary: the most up-to-date serving replica on a live
/// node (up or draining) other than the current primary, by reported position. A
/// replica that has not reported yet is not chosen (it may be empty): `None` until it
/// does, and the shard takes no writes meanwhile. Every choice of a successor goes
/// through here (issue 14: the most up-to-date replica or none).
pub fn successor(
    map: &ClusterMap,
    s: &crate::map::Shard,
    position: impl Fn(&str) -> Option<Position>,
) -> Option<(NodeId, Position)> {
    s.replicas
        .iter()
        .filter(|r| Some(&r.node) != s.primary.as_ref() && r.state == ReplicaState::Serving)
        .filter(|r| map.nodes.get(&r.node).is_some_and(|n| n.state.is_live()))
        .filter_map(|r| Some((r.node.clone(), position(&r.node)?)))
        .max_by_key(|(_, p)| *p)
}

/// Shards that need a primary: none named (its replica was evicted or its volume
/// lost), or the named one on a node that is down.
pub fn headless(map: &ClusterMap) -> Vec<ShardKey> {
    map.shards
        .values()
        .filter(|s| match &s.primary {
            None => true,
            Some(p) => map.nodes.get(p).is_none_or(|n| n.state == NodeState::Down),
        })
        .map(|s| s.key.clone())
        .collect()
}

/// The cluster is settled, and primaries may be evened out: every node up, down or
/// draining (none suspect, whose roles may be about to move), and every replica
/// serving (no copy in flight).
pub fn settled(map: &ClusterMap) -> bool {
    map.nodes.values().all(|n| {
        matches!(
            n.state,
            NodeState::Up | NodeState::Down | NodeState::Draining
        )
    }) && map
        .shards
        .values()
        .all(|s| s.replicas.iter().all(|r| r.state == ReplicaState::Serving))
}

/// One primary handover that evens out how many shards the nodes lead (primaries take
/// the writes): from a node leading the most to a serving backup on a node leading at
/// least two fewer, the widest such gap first. Nodes that are up and not draining
/// count. Only collections with the default write quorum qualify, where every live
/// serving replica holds every acknowledged write; the caller still checks the
/// target's reported position. `None` when no handover narrows a gap.
pub fn rebalance_primary(map: &ClusterMap) -> Option<(ShardKey, NodeId)> {
    let eligible = |n: &str| {
        map.nodes
            .get(n)
            .is_some_and(|n| n.state == NodeState::Up && !n.draining)
    };
    let mut leads: BTreeMap<&str, usize> = map
        .nodes
        .values()
        .filter(|n| eligible(&n.id))
        .map(|n| (n.id.as_str(), 0))
        .collect();
    for p in map.shards.values().filter_map(|s| s.primary.as_deref()) {
        if let Some(c) = leads.get_mut(p) {
            *c += 1;
        }
    }
    let mut best: Option<(usize, &ShardKey, &str)> = None;
    for s in map.shards.values() {
        let Some(p) = s.primary.as_deref().filter(|p| eligible(p)) else {
            continue;
        };
        if map
            .collections
            .get(&s.key.collection)
            .is_none_or(|c| c.spec.write_quorum != 0)
        {
            continue;
        }
        for r in &s.replicas {
            if r.node == p || r.state != ReplicaState::Serving || !eligible(&r.node) {
                continue;
            }
            let gap = leads[p] - leads[r.node.as_str()].min(leads[p]);
            if gap >= 2 && best.is_none_or(|(g, ..)| gap > g) {
                best = Some((gap, &s.key, &r.node));
            }
        }
    }
    best.map(|(_, k, n)| (k.clone(), n.to_string()))
}

/// The next moves towards a placement that satisfies the rules above. Applying them and
/// calling again converges: every rebalancing move lowers the sum of squared loads.
pub fn plan(map: &ClusterMap, opts: &Options) -> Vec<Move> {
    let mut pool = Pool::with_disk(map, &opts.disk);
    let mut moves = Vec::new();
    let in_flight = map
        .shards
        .values()
        .flat_map(|s| &s.replicas)
        .filter(|r| r.state == ReplicaState::Copying)
        .count();
    let mut copies_left = opts.max_in_flight.saturating_sub(in_flight);
    let state = |n: &str| map.nodes.get(n).map(|n| n.state);

    // 1. Evict replicas on down nodes; 2. re-create lost copies.
    for s in map.shards.values() {
        let Some(c) = map.collections.get(&s.key.collection) else {
            continue;
        };
        let mem = c.spec.replica_memory_bytes;
        let mut holders: Vec<NodeId> = Vec::new();
        let mut live = 0usize;
        // Replicas on down nodes are evicted only while a serving copy stays on a live
        // node: a shard whose every copy is away stays as it is, unavailable, and takes
        // its copies back when their nodes return (never re-created empty).
        let copy_survives = s.replicas.iter().any(|r| {
            r.state == ReplicaState::Serving
                && !matches!(state(&r.node), Some(NodeState::Down) | None)
        });
        for r in &s.replicas {
            if matches!(state(&r.node), Some(NodeState::Down) | None) {
                if copy_survives && moves.len() < opts.max_moves {
                    moves.push(Move::Evict {
                        shard: s.key.clone(),
                        node: r.node.clone(),
                    });
                }
            } else {
                holders.push(r.node.clone());
                if r.state != ReplicaState::Leaving {
                    live += 1;
                }
            }
        }
        while live < c.spec.replication_factor as usize
            && moves.len() < opts.max_moves
            && copies_left > 0
        {
            let Some(to) = pool.choose(&holders, mem) else {
                break;
            };
            pool.add(&to, mem);
            moves.push(Move::Add {
                shard: s.key.clone(),
                to: to.clone(),
                from: None,
            });
            holders.push(to);
            live += 1;
            copies_left -= 1;
        }
    }

    // 3. Empty draining nodes, and move replicas off nodes over the high disk
    // watermark, one copy per such node at a time (the space comes back when the copy
    // is done, through the node's trash, which the watermark counts as free). Targets
    // chosen above count as holders too.
    let mut disk_moves: BTreeSet<NodeId> = map
        .shards
        .values()
        .filter(|s| s.replicas.iter().any(|r| r.state == ReplicaState::Copying))
        .flat_map(|s| &s.replicas)
        .filter(|r| r.state == ReplicaState::Leaving)
        .map(|r| r.node.clone())
        .collect();
    let high = |n: &str| opts.disk.get(n) == Some(&DiskLevel::High);
    for s in map.shards.values() {
        let mem = replica_memory(map, &s.key);
        let mut holders: Vec<NodeId> = s.replicas.iter().map(|r| r.node.clone()).collect();
        holders.extend(moves.iter().filter_map(|m| match m {
            Move::Add { shard, to, .. } if *shard == s.key => Some(to.clone()),
            _ => None,
        }));
        for r in &s.replicas {
            let draining = state(&r.node) == Some(NodeState::Draining);
            let off_disk = !draining
                && high(&r.node)
                && state(&r.node) == Some(NodeState::Up)
                && !disk_moves.contains(&r.node)
                && s.replicas.iter().all(|x| x.state == ReplicaState::Serving);
            if r.state != ReplicaState::Serving || !(draining || off_disk) {
                continue;
            }
            if moves.len() >= opts.max_moves || copies_left == 0 {
                return moves;
            }
            if let Some(to) = pool.choose(&holders, mem) {
                pool.add(&to, mem);
                holders.push(to.clone());
                moves.push(Move::Add {
                    shard: s.key.clone(),
                    to,
                    from: Some(r.node.clone()),
                });
                copies_left -= 1;
                if off_disk {
                    disk_moves.insert(r.node.clone());
                }
            }
        }
    }

    // 4. Even out: move one serving replica at a time from a most-loaded node to a
    // least-loaded one while they differ by more than one. Shards already moving are
    // left alone; moves that keep the shard's zone spread are preferred.
    let moving: BTreeSet<ShardKey> = map
        .shards
        .values()
        .filter(|s| s.replicas.iter().any(|r| r.state != ReplicaState::Serving))
        .map(|s| s.key.clone())
        .chain(moves.iter().map(|m| match m {
            Move::Add { shard, .. } | Move::Evict { shard, .. } => shard.clone(),
        }))
        .collect();
    let mut moved: BTreeSet<ShardKey> = BTreeSet::new();
    while moves.len() < opts.max_moves && copies_left > 0 {
        let Some(m) = best_rebalance(map, &pool, &moving, &moved) else {
            break;
        };
        let Move::Add { shard, to, from } = &m else {
            unreachable!()
        };
        let mem = replica_memory(map, shard);
        pool.add(to, mem);
        if let Some(f) = from {
            *pool.load.get_mut(f).expect("up node") -= 1;
        }
        moved.insert(shard.clone());
        moves.push(m);
        copies_left -= 1;
    }
    moves
}

fn best_rebalance(
    map: &ClusterMap,
    pool: &Pool,
    moving: &BTreeSet<ShardKey>,
    moved: &BTreeSet<ShardKey>,
) -> Option<Move> {
    let mut by_load: Vec<(&NodeId, usize)> = pool.load.iter().map(|(k, v)| (k, *v)).collect();
    by_load.sort_by_key(|(id, l)| (*l, (*id).clone()));
    let (&(_, min), &(_, max)) = (by_load.first()?, by_load.last()?);
    if max <= min + 1 {
        return None;
    }
    let mut fallback = None;
    // Sources from most loaded, targets from least loaded, only pairs that differ by 2+.
    for &(src, sl) in by_load.iter().rev() {
        for &(dst, dl) in by_load.iter() {
            if sl < dl + 2 {
                break;
            }
            for s in map.shards.values() {
                if moving.contains(&s.key) || moved.contains(&s.key) {
                    continue;
                }
                let Some(r) = s.replicas.iter().find(|r| &r.node == src) else {
                    continue;
                };
                if r.state != ReplicaState::Serving
                    || s.holds(dst)
                    || !pool.fits(dst, replica_memory(map, &s.key))
                {
                    continue;
                }
                let m = Move::Add {
                    shard: s.key.clone(),
                    to: dst.clone(),
                    from: Some(src.clone()),
                };
                let zones_before: BTreeSet<&str> = s
                    .replicas
                    .iter()
                    .filter_map(|r| pool.zone(&r.node))
                    .collect();
                let zones_after: BTreeSet<&str> = s
                    .replicas
                    .iter()
                    .filter(|r| &r.node != src)
                    .filter_map(|r| pool.zone(&r.node))
                    .chain(pool.zone(dst))
                    .collect();
                if zones_after.len() >= zones_before.len() {
                    return Some(m);
                }
                fallback.get_or_insert(m);
            }
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::map::tests::{map_with_nodes, node, spec, up};
    use crate::map::MapError;
    use crate::map::{Capacity, Command};

    /// The leader's create, as `Member::decide` makes it: placed by [`initial`] (no
    /// disk levels); a spec placement refuses stays unplaced, so `apply` refuses it.
    fn placed(m: &ClusterMap, spec: CollectionSpec) -> Command {
        match initial(m, &spec, &BTreeMap::new()) {
            Ok(placement) => Command::CreateCollectionPlaced { spec, placement },
            Err(_) => Command::CreateCollection(spec),
        }
    }

    /// Applies `plan` (and marks every copy ready) until it returns nothing.
    fn converge(m: &mut ClusterMap, opts: &Options) -> usize {
        let mut steps = 0;
        loop {
            promote_headless(m);
            let moves = plan(m, opts);
            assert!(moves.len() <= opts.max_moves, "step over the move bound");
            if moves.is_empty() {
                return steps;
            }
            m.apply(&Command::ApplyMoves(moves))
                .expect("planned moves apply");
            let copying: Vec<(ShardKey, NodeId)> = m
                .shards
                .values()
                .flat_map(|s| {
                    s.replicas
                        .iter()
                        .filter(|r| r.state == ReplicaState::Copying)
                        .map(|r| (s.key.clone(), r.node.clone()))
                })
                .collect();
            assert!(
                copying.len() <= opts.max_in_flight,
                "too many copies in flight"
            );
            for (shard, node) in copying {
                m.apply(&Command::ReplicaReady { shard, node }).unwrap();
            }
            steps += 1;
            assert!(steps < 10_000, "placement did not converge");
        }
    }

    /// The leader's part: every shard without a live primary gets its successor (all
    /// replicas report the same position here).
    fn promote_headless(m: &mut ClusterMap) {
        for key in headless(m) {
            let s = m.shards[&key].clone();
            if let Some((node, _)) = successor(m, &s, |_| Some((0, 0))) {
                m.apply(&Command::Promote {
                    shard: key,
                    node,
                    epoch: s.epoch,
                })
                .unwrap();
            }
        }
    }

    fn check_invariants(m: &ClusterMap) {
        for s in m.shards.values() {
            let nodes: BTreeSet<&str> = s.replicas.iter().map(|r| r.node.as_str()).collect();
            assert_eq!(
                nodes.len(),
                s.replicas.len(),
                "two replicas of {} on one node",
                s.key
            );
        }
        for n in m.nodes.values() {
            if n.capacity.memory_bytes == 0 {
                continue;
            }
            let used: u64 = m
                .shards
                .values()
                .filter(|s| s.holds(&n.id))
                .map(|s| m.collections[&s.key.collection].spec.replica_memory_bytes)
                .sum();
            assert!(
                used <= n.capacity.memory_bytes,
                "node {} over capacity",
                n.id
            );
        }
    }

    fn register(m: &mut ClusterMap, id: &str, zone: &str, mem: u64) {
        m.apply(&Command::RegisterNode {
            id: id.into(),
            addr: "127.0.0.1:1".into(),
            capacity: Capacity {
                memory_bytes: mem,
                gpu: false,
                zone: zone.into(),
            },
            volume: String::new(),
        })
        .unwrap();
        m.apply(&Command::SetNodeState {
            id: id.into(),
            state: NodeState::Up,
            from: vec![],
        })
        .unwrap();
    }

    fn set(m: &mut ClusterMap, id: &str, state: NodeState) {
        m.apply(&Command::SetNodeState {
            id: id.into(),
            state,
            from: vec![],
        })
        .unwrap();
    }

    fn loads(m: &ClusterMap) -> Vec<usize> {
        let counts = m.replica_counts();
        m.nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .map(|n| counts[n.id.as_str()])
            .collect()
    }

    #[test]
    fn disk_levels_count_the_trash_as_free_only_against_the_high_watermark() {
        let gib = 1u64 << 30;
        assert_eq!(disk_level(50 * gib, 0, 100 * gib, 0.85, 0.9), DiskLevel::Ok);
        assert_eq!(
            disk_level(15 * gib, 0, 100 * gib, 0.85, 0.9),
            DiskLevel::Low
        );
        assert_eq!(
            disk_level(5 * gib, 0, 100 * gib, 0.85, 0.9),
            DiskLevel::High
        );
        // 95 % used, 20 % of it in the trash: sheds nothing more, takes nothing new.
        assert_eq!(
            disk_level(5 * gib, 20 * gib, 100 * gib, 0.85, 0.9),
            DiskLevel::Low
        );
        // A full volume whose trash holds a shed replica: still takes nothing new.
        assert_eq!(
            disk_level(0, 30 * gib, 100 * gib, 0.85, 0.9),
            DiskLevel::Low
        );
        assert_eq!(
            disk_level(50 * gib, 20 * gib, 100 * gib, 0.85, 0.9),
            DiskLevel::Ok
        );
        assert_eq!(disk_level(0, 0, 0, 0.85, 0.9), DiskLevel::Ok);
    }

    /// Issue 14's watermarks: a node over the low watermark takes no new replica; one
    /// over the high watermark has its replicas moved off, one copy at a time.
    #[test]
    fn nodes_over_the_disk_watermarks_take_nothing_and_shed_replicas() {
        let mut m = ClusterMap::default();
        for (i, z) in ["a", "b", "c", "a", "b"].iter().enumerate() {
            register(&mut m, &format!("n{i}"), z, 0);
        }
        m.apply(&placed(&m, spec("c", 6, 2))).unwrap();
        fn count(m: &ClusterMap, n: &str) -> usize {
            m.replica_counts().get(n).copied().unwrap_or(0)
        }
        let low_before = count(&m, "n1");
        assert!(count(&m, "n0") > 0);
        let opts = Options {
            disk: [
                ("n0".into(), DiskLevel::High),
                ("n1".into(), DiskLevel::Low),
            ]
            .into(),
            ..Options::default()
        };
        let step = plan(&m, &opts);
        let off_n0 = step
            .iter()
            .filter(|mv| matches!(mv, Move::Add { from: Some(f), .. } if f == "n0"))
            .count();
        assert_eq!(off_n0, 1, "{step:?}");
        assert!(step
            .iter()
            .all(|mv| !matches!(mv, Move::Add { to, .. } if to == "n0" || to == "n1")));
        converge(&mut m, &opts);
        check_invariants(&m);
        assert_eq!(count(&m, "n0"), 0);
        assert!(count(&m, "n1") <= low_before);
        // Under the watermarks again, it fills back up.
        converge(&mut m, &Options::default());
        assert!(count(&m, "n0") > 0);
    }

    #[derive(Debug, Clone)]
    enum Event {
        AddNode(u8),
        Down(u8),
        Drain(u8),
        Create(u8, u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u8..3).prop_map(Event::AddNode),
            any::<u8>().prop_map(Event::Down),
            any::<u8>().prop_map(Event::Drain),
            (1u8..12, 1u8..4).prop_map(|(s, r)| Event::Create(s, r)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any history of joins, failures, drains and creates converges to a placement
        /// with distinct nodes per shard, full replication where nodes allow, and loads
        /// within one; no step exceeds the move or copy bounds.
        #[test]
        fn converges_balanced(zones in 1usize..4, start in 1usize..6,
                              events in proptest::collection::vec(event(), 1..25),
                              max_moves in 1usize..20, max_in_flight in 1usize..10) {
            let opts = Options { max_moves, max_in_flight, ..Options::default() };
            let mut m = ClusterMap::default();
            let mut next = 0usize;
            for _ in 0..start {
                register(&mut m, &format!("n{next:02}"), &format!("z{}", next % zones), 0);
                next += 1;
            }
            let mut created = 0;
            for e in events {
                let up: Vec<NodeId> = m.nodes.values()
                    .filter(|n| n.state == NodeState::Up).map(|n| n.id.clone()).collect();
                match e {
                    Event::AddNode(z) => {
                        register(&mut m, &format!("n{next:02}"), &format!("z{}", z as usize % zones), 0);
                        next += 1;
                    }
                    Event::Down(i) if up.len() > 1 => set(&mut m, &up[i as usize % up.len()], NodeState::Down),
                    Event::Drain(i) if up.len() > 1 => set(&mut m, &up[i as usize % up.len()], NodeState::Draining),
                    Event::Create(s, r) => {
                        let _ = m.apply(&placed(&m, spec(&format!("c{created}"), s.into(), r.into())));
                        created += 1;
                    }
                    _ => {}
                }
                converge(&mut m, &opts);
                check_invariants(&m);
                let l = loads(&m);
                let (lo, hi) = (l.iter().min().copied().unwrap_or(0), l.iter().max().copied().unwrap_or(0));
                prop_assert!(hi <= lo + 1, "loads {:?} not within one", l);
                let up_count = l.len();
                for s in m.shards.values() {
                    let rf = m.collections[&s.key.collection].spec.replication_factor as usize;
                    let on_up = s.replicas.iter().filter(|r| m.nodes[&r.node].state == NodeState::Up).count();
                    prop_assert_eq!(on_up, rf.min(up_count), "shard {} under-replicated", &s.key);
                    for r in &s.replicas {
                        let st = m.nodes[&r.node].state;
                        // A draining node keeps a replica only when no up node lacks one.
                        prop_assert!(st == NodeState::Up || (st == NodeState::Draining && on_up == up_count),
                            "replica of {} left on a {:?} node", &s.key, st);
                    }
                    prop_assert!(s.primary.as_ref().is_some_and(|p| s.holds(p)));
                }
            }
        }

        /// A new collection on equal zones spans as many zones as it can, and tight
        /// capacity is never exceeded (creation fails instead).
        #[test]
        fn initial_spreads_zones_and_respects_capacity(zones in 1usize..4, per_zone in 1usize..4,
                                                       shards in 1u32..40, rf in 1u32..4,
                                                       slots in 1u64..20) {
            let mut m = ClusterMap::default();
            let mem = crate::map::DEFAULT_REPLICA_MEMORY;
            for z in 0..zones {
                for i in 0..per_zone {
                    register(&mut m, &format!("z{z}n{i}"), &format!("z{z}"), slots * mem);
                }
            }
            let before = m.clone();
            match m.apply(&placed(&m, spec("c", shards, rf))) {
                Ok(_) => {
                    check_invariants(&m);
                    // Zones are spread whenever capacity does not force otherwise.
                    let ample = slots >= shards as u64;
                    for s in m.shards.values().filter(|_| ample) {
                        let zs: BTreeSet<&str> = s.replicas.iter()
                            .map(|r| m.nodes[&r.node].capacity.zone.as_str()).collect();
                        prop_assert_eq!(zs.len(), (rf as usize).min(zones));
                    }
                    // Primaries spread over the nodes: none leads more than one shard
                    // above another that holds replicas of the collection.
                    let mut leads: BTreeMap<&str, usize> = BTreeMap::new();
                    for s in m.shards.values() {
                        for r in &s.replicas {
                            leads.entry(r.node.as_str()).or_default();
                        }
                        *leads.entry(s.primary.as_deref().unwrap()).or_default() += 1;
                    }
                    let (lo, hi) = (leads.values().min().unwrap(), leads.values().max().unwrap());
                    prop_assert!(hi <= &(lo + 1), "primaries {:?}", leads);
                    // Zone spread comes first at creation; placement's rebalancing then
                    // evens loads out to within one (when capacity leaves room).
                    if ample {
                        converge(&mut m, &Options::default());
                        check_invariants(&m);
                        let l = loads(&m);
                        prop_assert!(l.iter().max().unwrap() <= &(l.iter().min().unwrap() + 1), "loads {:?}", l);
                    }
                }
                Err(_) => {
                    prop_assert_eq!(&m, &before);
                    prop_assert!(rf as usize > zones * per_zone
                        || (shards as u64) * (rf as u64) > slots * (zones * per_zone) as u64,
                        "refused although it fits");
                }
            }
        }
    }

    proptest! {
        /// Handing primaries over one at a time ends with every node leading within
        /// one shard of the others wherever a backup allows it, each step narrowing
        /// the spread (the sum of squared counts falls), and never touches a
        /// collection with an explicit write quorum.
        #[test]
        fn primaries_even_out(nodes in 2usize..6, shards in 1u32..30, rf in 2u32..4,
                              skew in 0usize..30) {
            let mut m = ClusterMap::default();
            for i in 0..nodes {
                register(&mut m, &format!("n{i}"), "z", 0);
            }
            let rf = rf.min(nodes as u32);
            m.apply(&placed(&m, spec("c", shards, rf))).unwrap();
            let mut q = spec("q", 3, rf);
            q.write_quorum = 1;
            m.apply(&placed(&m, q)).unwrap();
            // Skew: hand c's shards to n0 wherever it holds a replica.
            let keys: Vec<ShardKey> = m.shards.keys().filter(|k| k.collection == "c").cloned().collect();
            for k in keys.iter().take(skew) {
                let s = &m.shards[k];
                if s.holds("n0") && s.primary.as_deref() != Some("n0") {
                    m.apply(&Command::Promote { shard: k.clone(), node: "n0".into(), epoch: s.epoch }).unwrap();
                }
            }
            let fixed: Vec<Option<NodeId>> = m.shards.values()
                .filter(|s| s.key.collection == "q").map(|s| s.primary.clone()).collect();
            let squares = |m: &ClusterMap| {
                let mut leads: BTreeMap<String, usize> = BTreeMap::new();
                for p in m.shards.values().filter_map(|s| s.primary.clone()) {
                    *leads.entry(p).or_default() += 1;
                }
                leads.values().map(|c| c * c).sum::<usize>()
            };
            let mut steps = 0;
            while let Some((k, to)) = rebalance_primary(&m) {
                let before = squares(&m);
                let epoch = m.shards[&k].epoch;
                m.apply(&Command::Promote { shard: k, node: to, epoch }).unwrap();
                prop_assert!(squares(&m) < before, "a handover widened the spread");
                steps += 1;
                prop_assert!(steps <= 200, "no end");
            }
            let now: Vec<Option<NodeId>> = m.shards.values()
                .filter(|s| s.key.collection == "q").map(|s| s.primary.clone()).collect();
            prop_assert_eq!(now, fixed, "an explicit-quorum collection was rebalanced");
            // With every node holding a replica of every shard, within one.
            if rf as usize == nodes {
                let mut leads = vec![0usize; nodes];
                for s in m.shards.values().filter(|s| s.key.collection == "c") {
                    leads[s.primary.as_deref().unwrap()[1..].parse::<usize>().unwrap()] += 1;
                }
                // The q collection's fixed primaries also count: check the total.
                let mut total = vec![0usize; nodes];
                for s in m.shards.values() {
                    total[s.primary.as_deref().unwrap()[1..].parse::<usize>().unwrap()] += 1;
                }
                let (lo, hi) = (total.iter().min().unwrap(), total.iter().max().unwrap());
                prop_assert!(hi <= &(lo + 1), "primaries {:?} (c: {:?})", total, leads);
            }
        }
    }

    #[test]
    fn new_node_fills_gradually() {
        let mut m = ClusterMap::default();
        for i in 0..3 {
            register(&mut m, &format!("n{i}"), "z", 0);
        }
        m.apply(&placed(&m, spec("c", 30, 2))).unwrap();
        register(&mut m, "n3", "z", 0);
        let opts = Options {
            max_moves: 4,
            max_in_flight: 2,
            ..Options::default()
        };
        let first = plan(&m, &opts);
        assert_eq!(first.len(), 2, "bounded by copies in flight: {first:?}");
        assert!(first
            .iter()
            .all(|mv| matches!(mv, Move::Add { to, from: Some(_), .. } if to == "n3")));
        let steps = converge(&mut m, &opts);
        assert!(
            steps >= 8,
            "15 replicas should take several steps, took {steps}"
        );
        assert_eq!(loads(&m), vec![15, 15, 15, 15]);
    }

    /// Issue 14: the map alone cannot tell which backup holds every write, so a node
    /// going down keeps its primary roles until the leader promotes by position.
    #[test]
    fn down_primary_waits_for_a_promotion_by_position() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 1, 2))).unwrap();
        let s = m.shards_of("c").next().unwrap().clone();
        let old = s.primary.clone().unwrap();
        m.apply(&Command::SetNodeState {
            id: old.clone(),
            state: NodeState::Down,
            from: vec![NodeState::Up, NodeState::Suspect],
        })
        .unwrap();
        let s2 = m.shards_of("c").next().unwrap().clone();
        assert_eq!(s2.primary.as_ref(), Some(&old));
        assert_eq!(s2.epoch, s.epoch);
        assert_eq!(headless(&m), vec![s.key.clone()]);
        // No report from the backup yet: no successor; once it reports, it is chosen.
        assert_eq!(successor(&m, &s2, |_| None), None);
        let backup = s2
            .replicas
            .iter()
            .find(|r| r.node != old)
            .unwrap()
            .node
            .clone();
        let (to, _) = successor(&m, &s2, |_| Some((1, 5))).unwrap();
        assert_eq!(to, backup);
        // A conditional transition from a stale view is refused.
        let err = m
            .apply(&Command::SetNodeState {
                id: old,
                state: NodeState::Suspect,
                from: vec![NodeState::Up],
            })
            .unwrap_err();
        assert!(matches!(err, MapError::FailedPrecondition(_)));
    }

    /// Issue 14's rack loss: both copies of a shard on nodes that went down together.
    /// Placement must not evict them (a new, empty copy would become the shard), and the
    /// map refuses an eviction that drops the last serving copy on a live node.
    #[test]
    fn the_last_serving_copy_is_never_evicted() {
        let mut m = map_with_nodes(4);
        m.apply(&placed(&m, spec("c", 1, 2))).unwrap();
        let key = ShardKey {
            collection: "c".into(),
            index: 0,
        };
        let holders: Vec<NodeId> = m.shards[&key]
            .replicas
            .iter()
            .map(|r| r.node.clone())
            .collect();
        for n in &holders {
            m.apply(&Command::SetNodeState {
                id: n.clone(),
                state: NodeState::Down,
                from: vec![],
            })
            .unwrap();
        }
        let moves = plan(&m, &Options::default());
        assert!(
            !moves.iter().any(|mv| matches!(mv, Move::Evict { .. })),
            "{moves:?}"
        );
        let err = m
            .apply(&Command::ApplyMoves(vec![Move::Evict {
                shard: key.clone(),
                node: holders[0].clone(),
            }]))
            .unwrap_err();
        assert!(err.to_string().contains("without a serving copy"), "{err}");
        assert_eq!(m.shards[&key].replicas.len(), 2);
        // Whatever copies placement adds meanwhile, the shard's primary stays one of its
        // old holders, never an empty copy.
        for mv in &moves {
            let _ = m.apply(&Command::ApplyMoves(vec![mv.clone()]));
        }
        assert!(holders.contains(m.shards[&key].primary.as_ref().unwrap()));
        // One holder back: the other (still down) may go now, the shard keeps a copy.
        m.apply(&up(&holders[0])).unwrap();
        let moves = plan(&m, &Options::default());
        assert!(moves
            .iter()
            .any(|mv| matches!(mv, Move::Evict { node, .. } if *node == holders[1])));
    }

    /// Issue 14's replaced volume: a node back with another volume holds nothing, so
    /// none of its replicas serves or leads until filled from a serving copy.
    #[test]
    fn settled_only_without_suspects_or_copies() {
        let mut m = map_with_nodes(3);
        m.apply(&placed(&m, spec("c", 2, 2))).unwrap();
        assert!(settled(&m), "placed, all serving, all up");
        let mut suspect = m.clone();
        suspect.nodes.get_mut("n1").unwrap().state = NodeState::Suspect;
        assert!(
            !settled(&suspect),
            "a suspect node's roles may be about to move"
        );
        let mut down = m.clone();
        down.nodes.get_mut("n1").unwrap().state = NodeState::Down;
        assert!(settled(&down));
        let mut copying = m.clone();
        let s = copying.shards.values_mut().next().unwrap();
        s.replicas[0].state = ReplicaState::Copying;
        assert!(!settled(&copying), "a copy in flight");
    }

    #[test]
    fn a_node_back_with_another_volume_leads_nothing_and_serves_nothing() {
        let mut m = map_with_nodes(2);
        m.apply(&placed(&m, spec("c", 2, 2))).unwrap();
        let led: Vec<ShardKey> = m
            .shards
            .values()
            .filter(|s| s.primary.as_deref() == Some("n0"))
            .map(|s| s.key.clone())
            .collect();
        assert!(!led.is_empty());
        // The same volume again (a plain restart) changes nothing about the replicas.
        let before = m.shards.clone();
        m.apply(&node("n0", "z0")).unwrap();
        assert_eq!(m.shards, before);
        let mut fresh = node("n0", "z0");
        if let Command::RegisterNode { volume, .. } = &mut fresh {
            *volume = "vol-new".into();
        }
        m.apply(&fresh).unwrap();
        for s in m.shards.values() {
            let r = s.replicas.iter().find(|r| r.node == "n0").unwrap();
            assert_eq!(r.state, ReplicaState::Copying, "{}", s.key);
            assert_ne!(s.primary.as_deref(), Some("n0"));
        }
        for k in &led {
            assert_eq!(m.shards[k].primary, None);
            assert_eq!(m.shards[k].epoch, before[k].epoch + 1);
        }
        // The leader's choice: the serving copy on n1.
        let s = m.shards[&led[0]].clone();
        assert_eq!(
            successor(&m, &s, |_| Some((1, 1))).map(|(n, _)| n),
            Some("n1".to_string())
        );
    }
}
