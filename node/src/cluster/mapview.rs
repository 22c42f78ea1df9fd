//! A node's copy of the cluster map, kept current from the coordinator's watch stream.
//! Pure: events in, state out.

use std::collections::BTreeMap;

use shoal_proto::auth::KeyRecord;
use shoal_proto::coordinator as cpb;

#[derive(Clone, Debug, Default)]
pub struct MapView {
    pub version: u64,
    pub collections: BTreeMap<String, cpb::Collection>,
    pub nodes: BTreeMap<String, cpb::NodeInfo>,
    /// (collection, shard index) -> replica set.
    pub shards: BTreeMap<(String, u32), cpb::Shard>,
    /// The cluster the map belongs to.
    pub cluster_id: String,
    /// Every collection id up to this one was issued (ids only grow): a collection of
    /// a lower id absent from the map was dropped.
    pub last_collection_id: u64,
    /// API keys by id (their hashes; issue 17).
    pub keys: BTreeMap<String, KeyRecord>,
    /// Cluster operations by id (issue 18): running ones and the last finished.
    pub operations: BTreeMap<u64, cpb::Operation>,
    /// Collection aliases (issue 21): alias -> collection.
    pub aliases: BTreeMap<String, String>,
}

/// What a node does with a replica the map no longer assigns to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Its collection was dropped, or the shard is served by a serving replica on a
    /// live node elsewhere: into the trash (removed after a grace period).
    Trash,
    /// Nothing in the map shows the data lives elsewhere (a map restored from an older
    /// backup, a shard whose every other copy is down): closed, left where it is.
    Keep,
}

impl MapView {
    /// Applies a watch event; false (and nothing changed) for one older than the map
    /// this node holds. Maps only move forward at a node: a coordinator restarted
    /// behind, or a stale stream, must not make it act on (and delete by) an old map.
    pub fn apply(&mut self, ev: cpb::MapEvent) -> bool {
        use cpb::map_change::Change as C;
        let stale = match ev.event {
            Some(cpb::map_event::Event::Full(_)) => ev.version < self.version,
            _ => ev.version <= self.version && self.version > 0,
        };
        if stale {
            return false;
        }
        match ev.event {
            Some(cpb::map_event::Event::Full(m)) => {
                self.cluster_id = m.cluster_id;
                self.last_collection_id = m.last_collection_id;
                self.collections = m
                    .collections
                    .into_iter()
                    .map(|c| (c.name.clone(), c))
                    .collect();
                self.nodes = m.nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
                self.keys = m
                    .keys
                    .into_iter()
                    .filter_map(KeyRecord::from_pb)
                    .map(|k| (k.id.clone(), k))
                    .collect();
                self.shards = m
                    .shards
                    .into_iter()
                    .map(|s| ((s.collection.clone(), s.index), s))
                    .collect();
                self.operations = m.operations.into_iter().map(|o| (o.id, o)).collect();
                self.aliases = m
                    .aliases
                    .into_iter()
                    .map(|a| (a.alias, a.collection))
                    .collect();
            }
            Some(cpb::map_event::Event::Changes(cs)) => {
                for c in cs.changes.into_iter().filter_map(|c| c.change) {
                    match c {
                        C::CollectionPut(c) => {
                            // A re-created collection replaces every shard of the old one.
                            if self.collections.get(&c.name).is_some_and(|o| o.id != c.id) {
                                self.shards.retain(|(n, _), _| *n != c.name);
                            }
                            self.last_collection_id = self.last_collection_id.max(c.id);
                            self.collections.insert(c.name.clone(), c);
                        }
                        C::CollectionDropped(name) => {
                            self.collections.remove(&name);
                            self.shards.retain(|(n, _), _| *n != name);
                        }
                        C::NodePut(n) => {
                            self.nodes.insert(n.id.clone(), n);
                        }
                        C::ShardPut(s) => {
                            self.shards.insert((s.collection.clone(), s.index), s);
                        }
                        C::AliasPut(a) if a.collection.is_empty() => {
                            self.aliases.remove(&a.alias);
                        }
                        C::AliasPut(a) => {
                            self.aliases.insert(a.alias, a.collection);
                        }
                        C::ShardDropped(id) => {
                            self.shards.remove(&(id.collection, id.index));
                        }
                        C::KeyPut(k) => {
                            if let Some(k) = KeyRecord::from_pb(k) {
                                self.keys.insert(k.id.clone(), k);
                            }
                        }
                        C::KeyRevoked(id) => {
                            self.keys.remove(&id);
                        }
                        C::OperationPut(o) => {
                            self.operations.insert(o.id, *o);
                            // As the map: the last finished ones only.
                            let finished: Vec<u64> = self
                                .operations
                                .values()
                                .filter(|o| o.state != "running")
                                .map(|o| o.id)
                                .collect();
                            for id in finished.iter().take(finished.len().saturating_sub(100)) {
                                self.operations.remove(id);
                            }
                        }
                    }
                }
            }
            None => {}
        }
        self.version = ev.version;
        true
    }

    /// Pure: whether a replica of (collection, its id, shard index) that the map no
    /// longer places on `me` may go to the trash (issue 14: never on one map event
    /// alone; only when the map shows its data dropped or served elsewhere).
    pub fn removal(&self, collection: &str, collection_id: u64, index: u32, me: &str) -> Removal {
        let current = self.collections.get(collection).map(|c| c.id);
        match current {
            Some(id) if id == collection_id => {}
            // Re-created under a newer id, or dropped: an explicit operator decision.
            Some(id) if id > collection_id => return Removal::Trash,
            None if collection_id <= self.last_collection_id => return Removal::Trash,
            _ => return Removal::Keep,
        }
        // Not listed (a map restored from before a split, or a cancelled split's fork,
        // which `forks.rs` trashes itself as the split it made it for): kept.
        let Some(s) = self.shards.get(&(collection.to_string(), index)) else {
            return Removal::Keep;
        };
        let served_elsewhere = s.replicas.iter().any(|r| {
            r.node_id != me
                && r.state == cpb::ReplicaState::Serving as i32
                && self
                    .nodes
                    .get(&r.node_id)
                    .is_some_and(|n| cpb::NodeState::is_live_value(n.state))
        });
        if served_elsewhere {
            Removal::Trash
        } else {
            Removal::Keep
        }
    }

    /// The collection a request names: an alias's, else the name itself.
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        self.aliases.get(name).map_or(name, |c| c.as_str())
    }

    pub fn shards_of<'a>(&'a self, collection: &'a str) -> impl Iterator<Item = &'a cpb::Shard> {
        self.shards
            .range((collection.to_string(), 0)..)
            .take_while(move |((c, _), _)| c == collection)
            .map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(version: u64, collections: &[&str]) -> cpb::MapEvent {
        cpb::MapEvent {
            version,
            event: Some(cpb::map_event::Event::Full(cpb::ClusterMapSnapshot {
                version,
                collections: collections
                    .iter()
                    .map(|n| cpb::Collection {
                        name: n.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn maps_only_move_forward() {
        let mut v = MapView::default();
        assert!(v.apply(full(10, &["a", "b"])));
        // An older whole map (a coordinator restarted behind) changes nothing.
        assert!(!v.apply(full(7, &["a"])));
        assert_eq!(v.version, 10);
        assert!(v.collections.contains_key("b"));
        // Neither does a change set at or below the current version.
        let old_change = cpb::MapEvent {
            version: 10,
            event: Some(cpb::map_event::Event::Changes(cpb::ChangeSet {
                changes: vec![cpb::MapChange {
                    change: Some(cpb::map_change::Change::CollectionDropped("b".into())),
                }],
            })),
        };
        assert!(!v.apply(old_change.clone()));
        assert!(v.collections.contains_key("b"));
        // The same whole map again is harmless; a newer one applies.
        assert!(v.apply(full(10, &["a", "b"])));
        assert!(v.apply(cpb::MapEvent {
            version: 11,
            ..old_change
        }));
        assert!(!v.collections.contains_key("b"));
    }

    /// Issue 14: a replica leaves a node's disk only when the map shows its data
    /// dropped by an operator or served by a live serving replica elsewhere.
    #[test]
    fn replicas_go_to_the_trash_only_when_the_map_shows_them_dropped_or_served() {
        let node = |id: &str, state: cpb::NodeState| cpb::NodeInfo {
            id: id.into(),
            state: state as i32,
            ..Default::default()
        };
        let replica = |id: &str, state: cpb::ReplicaState| cpb::Replica {
            node_id: id.into(),
            state: state as i32,
            ..Default::default()
        };
        let mut v = MapView::default();
        v.apply(cpb::MapEvent {
            version: 5,
            event: Some(cpb::map_event::Event::Full(cpb::ClusterMapSnapshot {
                version: 5,
                collections: vec![cpb::Collection {
                    name: "c".into(),
                    id: 7,
                    ..Default::default()
                }],
                nodes: vec![
                    node("a", cpb::NodeState::Up),
                    node("b", cpb::NodeState::Down),
                ],
                shards: vec![
                    cpb::Shard {
                        collection: "c".into(),
                        index: 0,
                        replicas: vec![replica("a", cpb::ReplicaState::Serving)],
                        ..Default::default()
                    },
                    cpb::Shard {
                        collection: "c".into(),
                        index: 1,
                        replicas: vec![
                            replica("b", cpb::ReplicaState::Serving),
                            replica("a", cpb::ReplicaState::Copying),
                        ],
                        ..Default::default()
                    },
                ],
                last_collection_id: 7,
                ..Default::default()
            })),
        });
        // Served by a live serving copy elsewhere: trash.
        assert_eq!(v.removal("c", 7, 0, "me"), Removal::Trash);
        // Its only serving copy is on a down node, the other is a copy: keep.
        assert_eq!(v.removal("c", 7, 1, "me"), Removal::Keep);
        // An older incarnation of the collection, or one dropped: trash.
        assert_eq!(v.removal("c", 3, 0, "me"), Removal::Trash);
        assert_eq!(v.removal("gone", 6, 0, "me"), Removal::Trash);
        // A collection this map never heard of (a coordinator restored behind): keep.
        assert_eq!(v.removal("later", 9, 0, "me"), Removal::Keep);
        assert_eq!(v.removal("c", 8, 0, "me"), Removal::Keep);
        // A shard index the map does not list: keep.
        assert_eq!(v.removal("c", 7, 5, "me"), Removal::Keep);
    }
}
