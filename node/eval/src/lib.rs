//! Retrieval evaluation, outside the node library: BEIR-layout data sets read and
//! scored as BEIR scores them (`beir`: nDCG@k, recall@k), and the vector data sets
//! the benchmarks and the demo load or generate (`datasets`). Used by `shoal eval`,
//! `shoal demo` and `bench/`.

pub mod beir;
pub mod datasets;

/// The `p` quantile (0..=1) of ascending `sorted` values, nearest rank; 0 when empty.
/// The one percentile of the harnesses (`shoal eval`, `shoal demo`, `bench/`).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}
