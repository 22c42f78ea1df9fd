//! Where a document lives: the one routing rule (issue 19), used by the gateway to
//! route, by a shard to filter what a split left it, and by `WriteOp::Retain`.
//!
//! A collection of `S` shards sends id `x` to `crc32(x) mod S`. An online split
//! doubles `S`, and `crc32(x) mod 2S` is either `crc32(x) mod S` or that plus `S`, so a
//! split shard `i` keeps the ids of residue `i` and gives those of residue `i + S` to
//! its new sibling (Elasticsearch's split API keeps a routing rule for the same
//! reason: only half of each shard moves, and nothing else does).

use serde::{Deserialize, Serialize};

/// The shard a document id belongs to among `shard_count`. Stable across processes
/// and releases: it decides where data lives.
pub fn shard_of(id: &str, shard_count: u32) -> u32 {
    crc32fast::hash(id.as_bytes()) % shard_count.max(1)
}

/// Which ids a shard holds: those that [`shard_of`] sends to `residue` among
/// `modulus` shards.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Routing {
    pub modulus: u32,
    pub residue: u32,
}

impl Routing {
    /// Shard `index` of a collection of `shard_count` shards.
    pub fn of_shard(index: u32, shard_count: u32) -> Self {
        Self {
            modulus: shard_count.max(1),
            residue: index,
        }
    }

    /// Whether `id` belongs here.
    #[inline]
    pub fn holds(&self, id: &str) -> bool {
        shard_of(id, self.modulus) == self.residue
    }

    /// A routing a shard can have: at least one shard, and the residue one of them.
    pub fn check(&self) -> Result<(), String> {
        if self.modulus == 0 || self.residue >= self.modulus {
            return Err(format!(
                "routing residue {} of modulus {}: the residue must be below a modulus of at least 1",
                self.residue, self.modulus
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_the_shard_count_splits_each_shard_in_two() {
        for i in 0..10_000 {
            let id = format!("doc-{i}");
            let before = shard_of(&id, 6);
            let after = shard_of(&id, 12);
            assert!(
                after == before || after == before + 6,
                "{id}: {before} -> {after}"
            );
            assert!(Routing::of_shard(after, 12).holds(&id));
        }
        // Each old shard gives away about half.
        let moved = (0..10_000)
            .filter(|i| shard_of(&format!("doc-{i}"), 12) >= 6)
            .count();
        assert!((4_500..5_500).contains(&moved), "{moved}");
    }

    #[test]
    fn a_routing_names_one_of_its_shards() {
        assert!(Routing {
            modulus: 4,
            residue: 3
        }
        .check()
        .is_ok());
        assert!(Routing {
            modulus: 4,
            residue: 4
        }
        .check()
        .is_err());
        assert!(Routing {
            modulus: 0,
            residue: 0
        }
        .check()
        .is_err());
    }
}
