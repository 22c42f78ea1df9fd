//! The node's names for what it hosts, shared by the replica actors, replication, the
//! internal service and the reconciler (one spelling, so no module reaches into
//! another for an id), and their conversions to the wire's names.

use shoal_proto::coordinator as cpb;
use shoal_proto::limits::Limits;
use shoal_proto::within;

use super::error::ReplicaError;

/// A replica's identity: collection name, the collection's unique id (a re-created
/// collection is a different one), shard index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaKey {
    pub collection: String,
    pub collection_id: u64,
    pub index: u32,
}

impl ReplicaKey {
    /// The shard as the wire names it (`ShardId`, in the coordinator's API and the
    /// replica protocol alike).
    pub fn shard_id(&self) -> cpb::ShardId {
        cpb::ShardId {
            collection: self.collection.clone(),
            collection_id: self.collection_id,
            index: self.index,
        }
    }

    /// A replica protocol request's shard, checked: present, its name within the
    /// limit (it is echoed in errors; the map refuses longer names).
    pub fn from_wire(r: Option<&cpb::ShardId>) -> Result<Self, ReplicaError> {
        let r = r.ok_or_else(|| ReplicaError::Invalid("shard reference missing".into()))?;
        within!(
            Limits::default(),
            name_bytes,
            r.collection.len(),
            "the collection name's length"
        )?;
        Ok(Self {
            collection: r.collection.clone(),
            collection_id: r.collection_id,
            index: r.index,
        })
    }
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.collection, self.index)
    }
}
