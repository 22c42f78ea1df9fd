//! Retrieval evaluation, outside the node library: BEIR-layout data sets read and
//! scored as BEIR scores them (`beir`: nDCG@k, recall@k), and the vector data sets
//! the benchmarks and the demo load or generate (`datasets`). Used by `shoal eval`,
//! `shoal demo` and `bench/`.

pub mod beir;
pub mod datasets;
