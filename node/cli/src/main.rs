//! The `shoal` command. Thin: parses flags and calls library functions.

mod cluster;
mod coordinator;
mod demo;
mod embed;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "shoal: a distributed dense-retrieval cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Shard engine demo on Fashion-MNIST: durable ingest, an IVF-PQ generation,
    /// generate-rank search checked against exact search, read-your-writes, reopen.
    Demo {
        /// Keep the shard here (reopened on the next run) instead of a temp dir.
        #[arg(long, env = "SHOAL_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Test images used as queries.
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        /// Where Debian's dataset-fashion-mnist put the IDX files.
        #[arg(long, default_value = shoal_node::datasets::FASHION_MNIST_DIR)]
        dataset_dir: PathBuf,
    },
    /// Encodes text read from stdin, one text a line, and writes one JSON array of
    /// floats a line (the model's unit vectors).
    Embed {
        /// A sentence-transformers model dir (scripts/fetch-model.sh installs one).
        #[arg(
            long,
            env = "SHOAL_MODEL_DIR",
            default_value = shoal_encoder::DEFAULT_MODEL_DIR
        )]
        model_dir: PathBuf,
        /// Lines encoded per batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Runs one member of the Raft-replicated coordinator group.
    Coordinator(coordinator::CoordinatorArgs),
    /// Creates, lists, describes and drops collections.
    Collection {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::CollectionCmd,
    },
    /// The coordinator group, the nodes and every shard's replica set.
    Status {
        #[command(flatten)]
        target: coordinator::Target,
    },
    /// Runs a worker node: shard replicas, the encoder, the public API as a gateway.
    Node(cluster::NodeArgs),
    /// A local cluster on loopback: three coordinators and `--nodes` nodes as processes.
    Dev(cluster::DevArgs),
    /// Ingests a BEIR dir or a JSONL file through a node (text is encoded there).
    Ingest {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: cluster::IngestArgs,
    },
    /// Searches a collection by text through a node.
    Search {
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: cluster::SearchArgs,
    },
    /// Runs a BEIR collection's judged queries through the cluster (creating and
    /// ingesting it first if needed): nDCG@10, recall@100, latency; JSON last.
    Eval {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: cluster::EvalArgs,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Demo {
            data_dir,
            queries,
            dataset_dir,
        } => demo::run(&demo::DemoConfig {
            data_dir,
            queries,
            dataset_dir,
        }),
        Cmd::Embed { model_dir, batch } => embed::run(&model_dir, batch),
        Cmd::Coordinator(args) => runtime()?.block_on(coordinator::run(args)),
        Cmd::Collection { target, cmd } => {
            runtime()?.block_on(coordinator::collection(target, cmd))
        }
        Cmd::Status { target } => runtime()?.block_on(coordinator::status(target)),
        Cmd::Node(args) => runtime()?.block_on(cluster::run_node(args)),
        Cmd::Dev(args) => runtime()?.block_on(cluster::run_dev(args)),
        Cmd::Ingest { target, node, args } => {
            runtime()?.block_on(cluster::ingest(target, node, args))
        }
        Cmd::Search { node, args } => runtime()?.block_on(cluster::search(node, args)),
        Cmd::Eval { target, node, args } => runtime()?.block_on(cluster::eval(target, node, args)),
    }
}
