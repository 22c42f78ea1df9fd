//! A collection's index parameters and model: what a collection is created with, what
//! a build, a rebuild or a re-embed (issue 21) changes. Below the map and the
//! operations, which both name them.

use serde::{Deserialize, Serialize};
use shoal_proto::precision::Precision;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IndexParams {
    pub nlist: u32,
    pub pq_m: u32,
    pub pq_nbits: u32,
    pub nprobe: u32,
    pub refine: u32,
    /// What re-ranking reads (issue 19); a build may choose another.
    pub rerank: Precision,
}

impl IndexParams {
    /// Defaults for a dimension, matching the shard engine's (IVF1024, PQ d/8 x 8 bits,
    /// nprobe 32, re-rank 10x); `m` falls back to the largest divisor of `d` at most d/8.
    pub fn defaults(dimension: u32) -> Self {
        let target = (dimension / 8).max(1);
        let pq_m = (1..=target)
            .rev()
            .find(|m| dimension.is_multiple_of(*m))
            .unwrap_or(1);
        Self {
            nlist: 1024,
            pq_m,
            pq_nbits: 8,
            nprobe: 32,
            refine: 10,
            rerank: Precision::F32,
        }
    }
}

/// The model a collection's vectors come from, known by content hash (issue 21).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EncoderRef {
    pub model_id: String,
    pub content_hash: String,
}

/// A re-embed's change of model (issue 21): the collection's model and dimension after
/// the switch, and before it (a rollback restores them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModelChange {
    pub encoder: EncoderRef,
    pub dimension: u32,
    pub previous: Option<EncoderRef>,
    pub previous_dimension: u32,
}
