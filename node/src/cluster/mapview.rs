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
    pub fn apply(&mut self, ev: pb::MapEvent) {
        use pb::map_change::Change as C;
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
    }

    pub fn shards_of<'a>(&'a self, collection: &'a str) -> impl Iterator<Item = &'a pb::Shard> {
        self.shards
            .range((collection.to_string(), 0)..)
            .take_while(move |((c, _), _)| c == collection)
            .map(|(_, s)| s)
    }
}
