//! shoal benchmark harnesses. Each prints JSON lines and ends with one JSON summary
//! line; every figure sits next to its reference peer measured in the same run.

mod batch;
mod encoder;
mod filter;
mod footprint;
mod ingest;
mod ir;
mod load;
mod measure;
mod rebuild;
mod reembed;
mod rerank;
mod scale;
mod shard;
mod target;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shoal-bench",
    about = "shoal benchmarks, side by side with their reference peers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The shard engine next to raw FAISS (IVF-PQ and IVF-PQ + RFlat).
    Shard(shard::ShardArgs),
    /// Filtered search on one shard (issue 22): each plan's recall@10 against the exact
    /// filtered answer and its QPS next to unfiltered search.
    Filter(filter::FilterArgs),
    /// The Burn encoder next to candle-transformers' BERT on the same weights.
    Encoder(encoder::EncoderArgs),
    /// Retrieval quality: nDCG@10 of the Burn encoder + exact search on a BEIR collection.
    Ndcg(ir::NdcgArgs),
    /// Re-ranking from float32 vectors next to fp16 and SQ8 copies (issue 19).
    Rerank(rerank::RerankArgs),
    /// A running cluster under a closed-loop search load (QPS, latency, recall against
    /// exact), then ingest next to the encoder alone.
    Load(load::LoadArgs),
    /// Vector ingest through a running cluster next to the shard engine alone.
    Ingest(ingest::IngestArgs),
    /// Batch search (one fan-out) next to the same queries as concurrent and
    /// sequential single searches, through a running cluster (issue 22).
    Batch(batch::BatchArgs),
    /// A seeded synthetic corpus through a local cluster of processes: import next to
    /// the engine's ingest, builds next to raw FAISS, bytes per vector, recall next to
    /// raw FAISS, latency (issue 18).
    Scale(scale::ScaleArgs),
    /// An online rebuild of a loaded collection under query load (issue 21).
    Rebuild(rebuild::RebuildArgs),
    /// A loaded collection re-embedded with another model under query load (issue 21).
    Reembed(reembed::ReembedArgs),
    /// What a vector costs in memory: the id index and row table next to the
    /// structure they replaced, and one shard after a reopen (issue 19).
    Footprint(footprint::FootprintArgs),
    /// Internal: fills one id structure in a fresh process (footprint).
    #[command(hide = true)]
    FootprintChild {
        kind: String,
        #[arg(long)]
        rows: usize,
        #[arg(long)]
        id_bytes: usize,
        #[arg(long)]
        lookups: usize,
    },
    /// Internal: opens a shard in a fresh process and reports its resident memory.
    #[command(hide = true)]
    ShardRss { dir: std::path::PathBuf },
    #[command(hide = true)]
    TrainProbe { factory: String, sample: usize },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Shard(args) => shard::run(args),
        Cmd::Filter(args) => filter::run(args),
        Cmd::Ndcg(args) => ir::run(args),
        Cmd::Rerank(args) => rerank::run(args),
        Cmd::Encoder(args) => encoder::run(args),
        Cmd::Load(args) => load::run(args),
        Cmd::Ingest(args) => ingest::run(args),
        Cmd::Batch(args) => batch::run(args),
        Cmd::Scale(args) => scale::run(args),
        Cmd::Rebuild(args) => rebuild::run(args),
        Cmd::Reembed(args) => reembed::run(args),
        Cmd::Footprint(args) => footprint::run(args),
        Cmd::FootprintChild {
            kind,
            rows,
            id_bytes,
            lookups,
        } => footprint::child(&kind, rows, id_bytes, lookups),
        Cmd::ShardRss { dir } => shard::rss_child(&dir),
        Cmd::TrainProbe { factory, sample } => shard::train_probe(&factory, sample),
    }
}
