//! Collection configuration as the shard sees it, and its validation.

use serde::{Deserialize, Serialize};

use super::error::ShardError;
use super::rerank::Precision;
use shoal_proto::filter::PayloadField;

/// Largest `k` a search may ask for: beyond it a scatter-gather query would move
/// megabytes per shard for a result nobody reads.
pub const MAX_TOP_K: usize = 10_000;
/// Longest document id, in bytes.
pub const MAX_ID_BYTES: usize = 512;
/// Largest encoded document (text + metadata), in bytes.
pub const MAX_DOC_BYTES: usize = 1 << 20;
/// Longest request id a batch carries, in bytes (kept per batch in the log and in the
/// manifest's recent-requests list).
pub const MAX_REQUEST_ID_BYTES: usize = 1024;
/// Most IVF-PQ candidates (k × refine) one search gathers and re-scores.
pub const MAX_CANDIDATES: usize = 1_000_000;

// The engine's ceilings: the cluster's configurable limits (shoal_proto::limits) sit at
// or below them by default, so a request the gateway lets through is never refused here.
const _: () = {
    let l = shoal_proto::limits::DEFAULT_CEILINGS;
    assert!(l.0 <= MAX_ID_BYTES && l.1 <= MAX_REQUEST_ID_BYTES && l.2 <= MAX_CANDIDATES);
};

pub use shoal_proto::metric::Metric;

/// The engine's side of a [`Metric`]: the exact score (FAISS's name for it is
/// `ann::faiss_metric`, inside the FAISS fence).
pub trait Scoring {
    fn score(self, q: &[f32], v: &[f32]) -> f32;
}

impl Scoring for Metric {
    /// The exact score of `v` for query `q`, in the metric's own units.
    #[inline]
    fn score(self, q: &[f32], v: &[f32]) -> f32 {
        match self {
            Metric::L2 => lanes(q, v, |a, b| (a - b) * (a - b)),
            Metric::InnerProduct => lanes(q, v, |a, b| a * b),
        }
    }
}

/// Sums `f(q[i], v[i])` over 16 independent accumulators. A plain iterator sum is one
/// serial chain of float adds (IEEE order forbids reassociation), which LLVM cannot
/// vectorise: re-scoring 100 candidates at d = 784 was ~10% slower than FAISS's own
/// refine step until the sum was split into lanes.
#[inline(always)]
fn lanes(q: &[f32], v: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const L: usize = 16;
    debug_assert_eq!(q.len(), v.len());
    let mut acc = [0f32; L];
    let (qc, vc) = (q.chunks_exact(L), v.chunks_exact(L));
    let tail: f32 = qc
        .remainder()
        .iter()
        .zip(vc.remainder())
        .map(|(a, b)| f(*a, *b))
        .sum();
    for (a, b) in qc.zip(vc) {
        for i in 0..L {
            acc[i] += f(a[i], b[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// IVF-PQ parameters: `nlist` inverted lists, PQ with `m` sub-quantizers of `nbits` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IvfPqParams {
    pub nlist: usize,
    pub m: usize,
    pub nbits: usize,
}

impl IvfPqParams {
    /// The FAISS factory string. `np` turns off polysemous training, which FAISS
    /// enables for 8-bit PQ: it only helps Hamming-filtered search (which we never
    /// use) and made training 16x slower (184 s vs 11.6 s on SciFact, IVF64,PQ48).
    pub fn factory_string(&self) -> String {
        format!("IVF{},PQ{}x{}np", self.nlist, self.m, self.nbits)
    }

    /// Bytes of PQ code per vector.
    pub fn code_bytes(&self) -> usize {
        (self.m * self.nbits).div_ceil(8)
    }

    pub fn validate(&self, dimension: usize) -> Result<(), ShardError> {
        if self.nlist == 0 {
            return Err(ShardError::InvalidConfig("nlist must be at least 1".into()));
        }
        if self.m == 0 || !dimension.is_multiple_of(self.m) {
            return Err(ShardError::InvalidConfig(format!(
                "pq m = {} must divide the dimension {dimension}",
                self.m
            )));
        }
        if !(1..=16).contains(&self.nbits) {
            return Err(ShardError::InvalidConfig(format!(
                "pq nbits = {} must be between 1 and 16",
                self.nbits
            )));
        }
        Ok(())
    }
}

/// Everything a shard needs to know about its collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CollectionConfig {
    pub dimension: usize,
    pub metric: Metric,
    pub index: IvfPqParams,
    /// The IVF-PQ stage returns `k * refine_factor` candidates for exact re-scoring.
    pub refine_factor: usize,
    /// Inverted lists probed per query unless the query says otherwise.
    pub nprobe: usize,
    /// Vectors sampled (seeded) to train the coarse quantizer and PQ codebooks.
    pub train_sample: usize,
    /// Seed of that sample, so a rebuild of the same data trains the same index.
    pub seed: u64,
    /// Rows outside the serving index (the fresh tail) that trigger a background
    /// rebuild; 0 turns automatic rebuilds off.
    pub auto_rebuild_tail: usize,
    /// OpenMP threads one build may use. Search always runs FAISS on one thread:
    /// on a 2-core node concurrent queries give the parallelism, and OpenMP teams
    /// per query would oversubscribe the cores (see ADR 0001).
    pub build_threads: usize,
    /// What re-ranking reads for index candidates (issue 19): the full vectors, or a
    /// reduced-precision copy each generation writes (`rerank.rs`).
    #[serde(default)]
    pub rerank: Precision,
    /// The metadata fields the payload index keeps for filters (issue 22,
    /// `payload_index.rs`); changed by [`crate::Shard::set_payload_fields`].
    #[serde(default)]
    pub payload_fields: Vec<PayloadField>,
    /// A filtered search admitting at most this many rows scores them all exactly
    /// instead of asking the index (`crate::plan_filter`).
    #[serde(default = "default_exact_filter_rows")]
    pub exact_filter_rows: u64,
}

fn default_exact_filter_rows() -> u64 {
    crate::EXACT_FILTER_ROWS
}

impl CollectionConfig {
    /// Defaults sized for `dimension`-d vectors and corpora of 10^4..10^6 per shard.
    pub fn new(dimension: usize, metric: Metric) -> Self {
        // Eight dimensions per sub-quantizer when possible: the usual accuracy/size
        // point for sentence embeddings; fall back to the largest divisor <= d/8.
        let m = (1..=dimension / 8)
            .rev()
            .find(|m| dimension.is_multiple_of(*m))
            .unwrap_or(1);
        Self {
            dimension,
            metric,
            index: IvfPqParams {
                nlist: 1024,
                m,
                nbits: 8,
            },
            refine_factor: 10,
            nprobe: 32,
            train_sample: 65_536,
            seed: 0x0051_40a1,
            auto_rebuild_tail: 50_000,
            build_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            rerank: Precision::F32,
            payload_fields: Vec::new(),
            exact_filter_rows: crate::EXACT_FILTER_ROWS,
        }
    }

    pub fn validate(&self) -> Result<(), ShardError> {
        if self.dimension == 0 || self.dimension > 65_536 {
            return Err(ShardError::InvalidConfig(format!(
                "dimension {} must be between 1 and 65536",
                self.dimension
            )));
        }
        self.index.validate(self.dimension)?;
        if self.refine_factor == 0 {
            return Err(ShardError::InvalidConfig(
                "refine_factor must be at least 1".into(),
            ));
        }
        if self.nprobe == 0 || self.nprobe > self.index.nlist {
            return Err(ShardError::InvalidConfig(format!(
                "nprobe {} must be between 1 and nlist {}",
                self.nprobe, self.index.nlist
            )));
        }
        if self.train_sample < self.index.nlist {
            return Err(ShardError::InvalidConfig(format!(
                "train_sample {} must be at least nlist {}",
                self.train_sample, self.index.nlist
            )));
        }
        if self.build_threads == 0 {
            return Err(ShardError::InvalidConfig(
                "build_threads must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_m_divides_dimension() {
        for d in [8, 100, 384, 768, 784, 1536] {
            let c = CollectionConfig::new(d, Metric::L2);
            assert_eq!(d % c.index.m, 0);
            c.validate().unwrap();
        }
        assert_eq!(CollectionConfig::new(384, Metric::L2).index.m, 48);
    }

    #[test]
    fn lane_sums_match_the_naive_sums() {
        for d in [1, 15, 16, 17, 384, 784] {
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let v: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
            let l2: f64 = q
                .iter()
                .zip(&v)
                .map(|(a, b)| ((a - b) * (a - b)) as f64)
                .sum();
            let ip: f64 = q.iter().zip(&v).map(|(a, b)| (a * b) as f64).sum();
            assert!((Metric::L2.score(&q, &v) as f64 - l2).abs() < 1e-3 * (1.0 + l2));
            assert!(
                (Metric::InnerProduct.score(&q, &v) as f64 - ip).abs() < 1e-3 * (1.0 + ip.abs())
            );
        }
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = CollectionConfig::new(384, Metric::InnerProduct);
        c.index.m = 50;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("must divide the dimension 384"), "{e}");
        let mut c = CollectionConfig::new(384, Metric::InnerProduct);
        c.nprobe = 2000;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nprobe 2000"));
    }
}
