//! The `shoal` package's library: what the command shares with the workspace's
//! process tests and the benchmarks: the local cluster's process layout (`shoal dev`
//! and the multi-process harness start the same processes with the same flags), and
//! the vector file formats `shoal import` reads (the benchmark writes them).

pub mod layout;
mod parquet_rows;
pub mod vectors;

pub use parquet_rows::write_parquet;
