//! The node's names for what it hosts, shared by the replica actors, replication, the
//! internal service and the reconciler (one spelling, so no module reaches into
//! another for an id).

/// A replica's identity: collection name, the collection's unique id (a re-created
/// collection is a different one), shard index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaKey {
    pub collection: String,
    pub collection_id: u64,
    pub index: u32,
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.collection, self.index)
    }
}
