//! A node's copy of the cluster map, kept current from the coordinator's watch stream.
//! Pure: events in, state out.

use std::collections::BTreeMap;

use shoal_proto::coordinator as pb;

#[derive(Clone, Debug, Default)]
pub struct MapView {
    pub version: u64,
    pub collections: BTreeMap<String, pb::Collection>,
    pub nodes: BTreeMap<String, pb::NodeInfo>,
    /// (collection, shard index) -> replica set.
    pub shards: BTreeMap<(String, u32), pb::Shard>,
}

impl MapView {
    /// Applies a watch event; false (and nothing changed) for one older than the map
    /// this node holds. Maps only move forward at a node: a coordinator restarted
    /// behind, or a stale stream, must not make it act on (and delete by) an old map.
    pub fn apply(&mut self, ev: pb::MapEvent) -> bool {
        use pb::map_change::Change as C;
        let stale = match ev.event {
            Some(pb::map_event::Event::Full(_)) => ev.version < self.version,
            _ => ev.version <= self.version && self.version > 0,
        };
        if stale {
            return false;
        }
        match ev.event {
            Some(pb::map_event::Event::Full(m)) => {
                self.collections = m
                    .collections
                    .into_iter()
                    .map(|c| (c.name.clone(), c))
                    .collect();
                self.nodes = m.nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
                self.shards = m
                    .shards
                    .into_iter()
                    .map(|s| ((s.collection.clone(), s.index), s))
                    .collect();
            }
            Some(pb::map_event::Event::Changes(cs)) => {
                for c in cs.changes.into_iter().filter_map(|c| c.change) {
                    match c {
                        C::CollectionPut(c) => {
                            // A re-created collection replaces every shard of the old one.
                            if self.collections.get(&c.name).is_some_and(|o| o.id != c.id) {
                                self.shards.retain(|(n, _), _| *n != c.name);
                            }
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
                    }
                }
            }
            None => {}
        }
        self.version = ev.version;
        true
    }

    pub fn shards_of<'a>(&'a self, collection: &'a str) -> impl Iterator<Item = &'a pb::Shard> {
        self.shards
            .range((collection.to_string(), 0)..)
            .take_while(move |((c, _), _)| c == collection)
            .map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(version: u64, collections: &[&str]) -> pb::MapEvent {
        pb::MapEvent {
            version,
            event: Some(pb::map_event::Event::Full(pb::ClusterMapSnapshot {
                version,
                collections: collections
                    .iter()
                    .map(|n| pb::Collection {
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
        let old_change = pb::MapEvent {
            version: 10,
            event: Some(pb::map_event::Event::Changes(pb::ChangeSet {
                changes: vec![pb::MapChange {
                    change: Some(pb::map_change::Change::CollectionDropped("b".into())),
                }],
            })),
        };
        assert!(!v.apply(old_change.clone()));
        assert!(v.collections.contains_key("b"));
        // The same whole map again is harmless; a newer one applies.
        assert!(v.apply(full(10, &["a", "b"])));
        assert!(v.apply(pb::MapEvent {
            version: 11,
            ..old_change
        }));
        assert!(!v.collections.contains_key("b"));
    }
}
