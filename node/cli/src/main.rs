//! The `shoal` command. Thin: parses flags and calls library functions.

mod backup;
mod cluster;
mod coordinator;
mod demo;
mod embed;
mod import;

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
    /// Export traces over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317);
    /// no export when unset. `shoal dev` passes it to the processes it starts.
    #[arg(long, global = true, env = "SHOAL_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    keys: KeyArgs,
}

/// API keys (issue 17). Servers (`shoal node`, `shoal coordinator`): the cluster's root
/// key file turns keys on, and without TLS and keys a server starts only with
/// `--insecure`. Clients: the key every call carries.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct KeyArgs {
    /// The API key this command's calls carry (`shoal keys create` makes one).
    #[arg(long, global = true, env = "SHOAL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file holding the API key (its first line), e.g. a mounted secret.
    #[arg(
        long,
        global = true,
        env = "SHOAL_API_KEY_FILE",
        conflicts_with = "api_key"
    )]
    api_key_file: Option<PathBuf>,
    /// Servers: the file holding the cluster's root key (an admin key every process
    /// accepts; `shoal dev` makes one). With it, every call needs a key.
    #[arg(long, global = true, env = "SHOAL_ROOT_KEY_FILE")]
    root_key_file: Option<PathBuf>,
    /// Servers: append audit records (admin actions, refused calls) to this file.
    #[arg(long, global = true, env = "SHOAL_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Servers: start without TLS or without API keys. UNSAFE: anyone who reaches a
    /// port can read, write and drop everything, and join the cluster.
    #[arg(long, global = true, env = "SHOAL_INSECURE")]
    insecure: bool,
}

impl KeyArgs {
    /// A client command's key, from the flag, the environment or the file.
    fn use_for_clients(&self) -> anyhow::Result<()> {
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(f)) => {
                Some(shoal_proto::auth::read_key_file(f).map_err(anyhow::Error::msg)?)
            }
            (None, None) => None,
        };
        if let Some(k) = key {
            shoal_proto::auth::use_key(k);
        }
        Ok(())
    }

    /// A server's security settings.
    fn server(&self) -> Security {
        Security {
            root_key_file: self.root_key_file.clone(),
            audit_log: self.audit_log.clone(),
            insecure: self.insecure,
        }
    }
}

/// A server's API keys and audit log, from the global flags, and whether it may run
/// open.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub root_key_file: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub insecure: bool,
}

impl Security {
    /// Puts the flags' key file and audit log over a config's, then refuses to start an
    /// open server unless `--insecure` ([`Security::check`]).
    pub fn apply(
        &self,
        tls: bool,
        root_key_file: &mut Option<PathBuf>,
        audit_log: &mut Option<PathBuf>,
        what: &str,
    ) -> anyhow::Result<()> {
        if self.root_key_file.is_some() {
            root_key_file.clone_from(&self.root_key_file);
        }
        if self.audit_log.is_some() {
            audit_log.clone_from(&self.audit_log);
        }
        self.check(tls, root_key_file.is_some(), what)
    }

    /// Refuses to start a server that would be open (no TLS, or no keys) unless the
    /// operator said `--insecure`.
    pub fn check(&self, tls: bool, keys: bool, what: &str) -> anyhow::Result<()> {
        if (!tls || !keys) && !self.insecure {
            anyhow::bail!(
                "refusing to start this {what} {}: give --tls-ca/--tls-cert/--tls-key and \
                 --root-key-file (`shoal dev` makes them; deploy/README.md explains \
                 certificates and keys), or --insecure to run open (unsafe outside a test)",
                match (tls, keys) {
                    (false, false) => "without TLS and without API keys",
                    (false, true) => "without TLS",
                    _ => "without API keys",
                }
            );
        }
        Ok(())
    }
}

/// TLS (issue 17): the cluster's CA, and this process's certificate and key (PEM).
/// `shoal node` and `shoal coordinator` serve every port over TLS with them (mutual
/// TLS on the internal ones); every command's connections use them. Without
/// `--tls-ca`, plaintext: unsafe outside a test.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    #[arg(long, global = true, env = "SHOAL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[arg(long, global = true, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// A server's files: all three, or none.
    fn files(&self) -> anyhow::Result<Option<shoal_proto::tls::TlsFiles>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(shoal_proto::tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            _ => anyhow::bail!(
                "a node or coordinator with TLS needs --tls-ca, --tls-cert and --tls-key"
            ),
        }
    }

    /// A client command's connections: over TLS when `--tls-ca` is given (with the
    /// certificate when one is).
    fn use_for_clients(&self) -> anyhow::Result<()> {
        if let Some(ca) = &self.tls_ca {
            let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
            shoal_proto::tls::use_for_clients(shoal_proto::tls::client_config(ca, identity, None)?);
        }
        Ok(())
    }
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
        #[arg(long, default_value = shoal_eval::datasets::FASHION_MNIST_DIR)]
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
    Coordinator(Box<coordinator::CoordinatorArgs>),
    /// Creates, lists, describes and drops collections.
    Collection {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::CollectionCmd,
    },
    /// Collection aliases (issue 21): set, remove, list.
    Alias {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::AliasCmd,
    },
    /// Collection backups (issue 20): create, restore, list, verify, prune.
    Backup {
        #[command(subcommand)]
        cmd: backup::BackupCmd,
    },
    /// Long-running cluster operations (index builds): list, cancel.
    Operations {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::OperationsCmd,
    },
    /// Builds a new IVF-PQ generation on every shard of COLLECTION (a cluster
    /// operation: parameters chosen once from the shards' size unless given).
    IndexBuild {
        #[command(flatten)]
        target: coordinator::Target,
        collection: String,
        /// IVF lists (0: the collection's, else about 4·sqrt(rows per shard)).
        #[arg(long, default_value_t = 0)]
        nlist: u32,
        /// Training vectors (0: at least 39 per list).
        #[arg(long, default_value_t = 0)]
        train_sample: u64,
        /// Re-ranking precision of the new generations, kept by later builds: f32,
        /// f16 or sq8 (default: the last build's, else the collection's).
        #[arg(long, value_parser = coordinator::parse_rerank)]
        rerank: Option<shoal_proto::precision::Precision>,
        /// Follow the build to its end (the exit status says how it ended).
        #[arg(long)]
        wait: bool,
    },
    /// Operator actions on one shard's replica set.
    Shard {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::ShardCmd,
    },
    /// The coordinator group, the nodes and every shard's replica set.
    Status {
        #[command(flatten)]
        target: coordinator::Target,
    },
    /// Changes the coordinator group's members at run time (adding a replacement for
    /// a lost member, then setting the voters).
    Members {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::MembersCmd,
    },
    /// Moves every replica off NODE before it is removed (it takes nothing new; the
    /// drain survives its restarts); `--undo` cancels it. Watch its replica count in
    /// `shoal status` fall to 0.
    Drain {
        #[command(flatten)]
        target: coordinator::Target,
        node: String,
        #[arg(long)]
        undo: bool,
    },
    /// Runs a worker node: shard replicas, the encoder, the public API as a gateway.
    Node(Box<cluster::NodeArgs>),
    /// API keys: create (the key is printed once), list, revoke.
    Keys {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(subcommand)]
        cmd: coordinator::KeysCmd,
    },
    /// Every limit a client or peer can hit: name, default value, what it bounds (set
    /// one with `--limit NAME=VALUE` on `shoal node` / `shoal coordinator`).
    Limits,
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
    /// Imports precomputed vectors (.npy with an optional ids file, .fvecs, .bvecs,
    /// JSONL with a `vector` field) through the cluster: streamed, many requests in
    /// flight, resumable (rerun the same command after an interruption).
    Import {
        #[command(flatten)]
        target: coordinator::Target,
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: import::ImportArgs,
    },
    /// Searches a collection by text through a node.
    Search {
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: cluster::SearchArgs,
    },
    /// Counts a collection's documents (those passing --filter) through a node.
    Count {
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: cluster::CountArgs,
    },
    /// Writes a collection's documents (those passing --filter) as JSON lines to
    /// stdout, page by page (export and re-processing).
    Scroll {
        #[command(flatten)]
        node: cluster::NodeTarget,
        #[command(flatten)]
        args: cluster::ScrollArgs,
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

fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the problem (and the gRPC code, for a refused call); a
            // backtrace is for panics, not for a refused request.
            let status = e.chain().find_map(|c| c.downcast_ref::<tonic::Status>());
            match status {
                Some(s) => {
                    let context: Vec<String> = e
                        .chain()
                        .take_while(|c| c.downcast_ref::<tonic::Status>().is_none())
                        .map(|c| c.to_string())
                        .collect();
                    let mut line = context.join(": ");
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    eprintln!("error: {line}{} ({:?})", s.message(), s.code());
                }
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = runtime()?;
    let service = match &cli.cmd {
        Cmd::Coordinator(_) => "shoal-coordinator",
        Cmd::Node(_) => "shoal-node",
        _ => "shoal",
    };
    let telemetry =
        rt.block_on(async { shoal_node::telemetry::init(service, cli.otlp_endpoint.as_deref()) })?;
    let cmd = match cli.cmd {
        Cmd::Node(mut args) => {
            args.tls = cli.tls.files()?;
            args.security = cli.keys.server();
            Cmd::Node(args)
        }
        Cmd::Coordinator(args) if args.action.is_some() => {
            cli.tls.use_for_clients()?;
            cli.keys.use_for_clients()?;
            Cmd::Coordinator(args)
        }
        Cmd::Coordinator(mut args) => {
            args.tls = cli.tls.files()?;
            args.security = cli.keys.server();
            Cmd::Coordinator(args)
        }
        Cmd::Dev(mut args) => {
            args.insecure |= cli.keys.insecure;
            Cmd::Dev(args)
        }
        other => {
            cli.tls.use_for_clients()?;
            cli.keys.use_for_clients()?;
            other
        }
    };
    let r = run(cmd, cli.otlp_endpoint.as_deref(), &rt);
    // Flushes buffered spans while the runtime that drives the exporter still runs.
    drop(telemetry);
    r
}

fn run(cmd: Cmd, otlp: Option<&str>, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    match cmd {
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
        Cmd::Coordinator(args) => rt.block_on(coordinator::run(*args)),
        Cmd::Collection { target, cmd } => rt.block_on(coordinator::collection(target, cmd)),
        Cmd::Shard { target, cmd } => rt.block_on(coordinator::shard(target, cmd)),
        Cmd::Operations { target, cmd } => rt.block_on(coordinator::operations(target, cmd)),
        Cmd::Backup { cmd } => rt.block_on(backup::run(cmd)),
        Cmd::Alias { target, cmd } => rt.block_on(coordinator::alias(target, cmd)),
        Cmd::IndexBuild {
            target,
            collection,
            nlist,
            train_sample,
            rerank,
            wait,
        } => rt.block_on(coordinator::index_build(
            target,
            collection,
            nlist,
            train_sample,
            rerank,
            wait,
        )),
        Cmd::Status { target } => rt.block_on(coordinator::status(target)),
        Cmd::Members { target, cmd } => rt.block_on(coordinator::members(target, cmd)),
        Cmd::Drain { target, node, undo } => rt.block_on(coordinator::drain(target, node, undo)),
        Cmd::Node(args) => rt.block_on(cluster::run_node(*args)),
        Cmd::Keys { target, cmd } => rt.block_on(coordinator::keys(target, cmd)),
        Cmd::Limits => {
            use std::io::Write;
            // A closed pipe (`shoal limits | head`) ends the listing, not the process.
            let mut out = std::io::stdout().lock();
            for (name, value, doc) in shoal_proto::limits::Limits::default().describe() {
                if writeln!(out, "{name:<32} {value:>12}  {doc}").is_err() {
                    break;
                }
            }
            Ok(())
        }
        // Its processes export traces where this one does.
        Cmd::Dev(args) => rt.block_on(cluster::run_dev(args, otlp)),
        Cmd::Ingest { target, node, args } => rt.block_on(cluster::ingest(target, node, args)),
        Cmd::Import { target, node, args } => rt.block_on(import::import(target, node, args)),
        Cmd::Search { node, args } => rt.block_on(cluster::search(node, args)),
        Cmd::Count { node, args } => rt.block_on(cluster::count(node, args)),
        Cmd::Scroll { node, args } => rt.block_on(cluster::scroll(node, args)),
        Cmd::Eval { target, node, args } => rt.block_on(cluster::eval(target, node, args)),
    }
}
