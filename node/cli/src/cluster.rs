//! `shoal node`, `shoal dev` (a local cluster of processes), and the data commands
//! that talk to any node: `ingest`, `search`, `eval`.

use shoal_proto::filter::Filter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use shoal_cli::layout::Layout;
use shoal_eval::beir::{ndcg_at, read_jsonl, read_qrels, recall_at, Row};
use shoal_eval::percentile;
use shoal_node::cluster::NodeConfig;
use shoal_proto::auth::Authed;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;

use crate::coordinator::Target;

/// Addresses `shoal dev` uses, which the other commands default to.
pub const DEV_NODE: &str = "127.0.0.1:7201";

/// Flags for one node; each also reads `SHOAL_*` from the environment, and any left
/// unset come from `--config FILE` (TOML with the same names, see
/// `shoal_node::cluster::config`) or the defaults there (the one place they live).
#[derive(Args)]
pub struct NodeArgs {
    /// TOML file with any of the settings below (flags and environment win).
    #[arg(long, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// Stable node id (the map's replicas name it).
    #[arg(long, env = "SHOAL_NODE_ID")]
    id: Option<String>,
    /// Public gRPC address (ingest, search, get, delete) [default: 127.0.0.1:7201].
    #[arg(long, env = "SHOAL_LISTEN")]
    listen: Option<String>,
    /// Internal gRPC address (replica traffic between nodes) [default: 127.0.0.1:7301].
    #[arg(long, env = "SHOAL_INTERNAL_LISTEN")]
    internal_listen: Option<String>,
    /// The internal address other nodes dial (HOST:PORT, e.g. a pod's DNS name);
    /// default: the internal listen address, which must then not be 0.0.0.0.
    #[arg(long, env = "SHOAL_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Coordinators' public addresses [default: 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003].
    #[arg(long, env = "SHOAL_COORDINATORS", value_delimiter = ',')]
    coordinators: Vec<String>,
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Sentence-transformers model dir; without one the node takes vectors only.
    #[arg(long, env = "SHOAL_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// More model dirs this node encodes with (issue 21): each collection is encoded
    /// by the model whose content hash it names.
    #[arg(long, env = "SHOAL_EXTRA_MODEL_DIRS", value_delimiter = ',')]
    extra_model_dir: Vec<PathBuf>,
    /// Where the encoder runs: cpu, cuda or cuda:N (CUDA needs a build with
    /// `--features cuda`) [default: cpu].
    #[arg(long, env = "SHOAL_ENCODER_DEVICE")]
    encoder_device: Option<shoal_encoder::Device>,
    #[arg(long, env = "SHOAL_ZONE")]
    zone: Option<String>,
    /// Memory placement may fill with replicas (0 = unbounded).
    #[arg(long, env = "SHOAL_MEMORY_BYTES")]
    memory_bytes: Option<u64>,
    /// Largest public request accepted, in bytes (the limit message_bytes).
    #[arg(long, env = "SHOAL_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// A limit over its default, NAME=VALUE (repeatable; `shoal limits` lists them).
    #[arg(long = "limit", env = "SHOAL_LIMITS", value_delimiter = ',')]
    limits: Vec<String>,
    /// Fresh rows per shard that trigger a background IVF-PQ build [default: 50000].
    #[arg(long, env = "SHOAL_AUTO_REBUILD_TAIL")]
    auto_rebuild_tail: Option<usize>,
    /// Index builds run at once [default: 1].
    #[arg(long, env = "SHOAL_BUILD_SLOTS")]
    build_slots: Option<usize>,
    /// Share of the time a re-embed's re-encoding runs (the rest it rests, so queries
    /// keep their latency) [default: 0.5].
    #[arg(long, env = "SHOAL_REEMBED_DUTY")]
    reembed_duty: Option<f64>,
    /// A primary compacts its shard once dead rows are this share of its rows; 0 = only
    /// when asked (`shoal collection compact`) [default: 0.5].
    #[arg(long, env = "SHOAL_COMPACT_DEAD_RATIO")]
    compact_dead_ratio: Option<f64>,
    /// ... and at least this many dead rows [default: 100000].
    #[arg(long, env = "SHOAL_COMPACT_MIN_DEAD_ROWS")]
    compact_min_dead_rows: Option<u64>,
    /// Memory the index builds running at once may hold; a build that does not fit
    /// waits [default: 0 = a quarter of the machine's memory].
    #[arg(long, env = "SHOAL_BUILD_MEMORY_BYTES")]
    build_memory_bytes: Option<u64>,
    /// Bytes of stored vectors the background scrubber checks per second; 0 = off
    /// [default: 33554432].
    #[arg(long, env = "SHOAL_SCRUB_BYTES_PER_SEC")]
    scrub_bytes_per_sec: Option<u64>,
    /// Bytes a second this node's backups and restores move, all shards together;
    /// 0 = unthrottled [default: 0].
    #[arg(long, env = "SHOAL_BACKUP_BYTES_PER_SEC")]
    backup_bytes_per_sec: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve plaintext grpc.health alone here (Kubernetes' gRPC probes speak no TLS).
    #[arg(long, env = "SHOAL_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
    /// How often the node reports to the coordinators (liveness, replica state)
    /// [default: 1000].
    #[arg(long, env = "SHOAL_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Per hosted replica: recent write batches kept for backups that fall behind
    /// (a backup further behind gets a whole-shard snapshot) [default: 64 MiB].
    #[arg(long, env = "SHOAL_RECENT_LOG_BYTES")]
    recent_log_bytes: Option<usize>,
    /// Seconds a replica dir the map no longer assigns here waits in DATA_DIR/trash
    /// before it is removed [default: 86400].
    #[arg(long, env = "SHOAL_TRASH_GRACE_SECS")]
    trash_grace_secs: Option<u64>,
    /// The operator's word that this node's data now belongs to the cluster with this
    /// id (its coordinator group was rebuilt or restored under another id). Without
    /// it, a node refuses coordinators of any cluster but the one DATA_DIR/node.json
    /// names.
    #[arg(long, env = "SHOAL_ACCEPT_CLUSTER_ID")]
    accept_cluster_id: Option<String>,
    /// Writes are refused (RESOURCE_EXHAUSTED) while DATA_DIR's file system has less
    /// free space than this many bytes, before the disk fills; 0 = never
    /// [default: 256 MiB].
    #[arg(long, env = "SHOAL_DISK_RESERVE_BYTES")]
    disk_reserve_bytes: Option<u64>,
    /// A serving backup that has not caught up with its primary for this long leaves
    /// its shard's in-sync set, so writes stop waiting for it [default: 3000].
    #[arg(long, env = "SHOAL_IN_SYNC_LAG_MS")]
    in_sync_lag_ms: Option<u64>,
    /// From the global `--tls-*` flags.
    #[arg(skip)]
    pub tls: Option<shoal_proto::tls::TlsFiles>,
    /// From the global key flags.
    #[arg(skip)]
    pub security: crate::Security,
}

impl NodeArgs {
    /// The file's settings (or the defaults), with every flag given over them.
    pub fn into_config(self) -> Result<NodeConfig> {
        let mut c = match &self.config {
            Some(p) => NodeConfig::from_toml_file(p)?,
            None => {
                anyhow::ensure!(
                    self.id.is_some() && self.data_dir.is_some(),
                    "a node needs --id and --data-dir (or --config FILE naming them)"
                );
                NodeConfig::default()
            }
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            id,
            listen,
            internal_listen,
            data_dir,
            encoder_device,
            zone,
            memory_bytes,
            auto_rebuild_tail,
            build_slots,
            reembed_duty,
            compact_dead_ratio,
            compact_min_dead_rows,
            build_memory_bytes,
            scrub_bytes_per_sec,
            backup_bytes_per_sec,
            recent_log_bytes,
            disk_reserve_bytes
        );
        if !self.extra_model_dir.is_empty() {
            c.extra_model_dirs = self.extra_model_dir.clone();
        }
        macro_rules! set_some {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        set_some!(
            advertise_addr,
            model_dir,
            metrics_listen,
            health_listen,
            accept_cluster_id,
            tls
        );
        if !self.coordinators.is_empty() {
            c.coordinators = self.coordinators;
        }
        self.security.apply(
            c.tls.is_some(),
            &mut c.root_key_file,
            &mut c.audit_log,
            "node",
        )?;
        if let Some(ms) = self.heartbeat_ms {
            c.heartbeat = Duration::from_millis(ms);
        }
        if let Some(ms) = self.in_sync_lag_ms {
            c.in_sync_lag = Duration::from_millis(ms);
        }
        if let Some(s) = self.trash_grace_secs {
            c.trash_grace = Duration::from_secs(s);
        }
        c.limits
            .apply_pairs(&self.limits)
            .map_err(anyhow::Error::msg)?;
        if let Some(m) = self.max_message_bytes {
            c.limits.message_bytes = m;
        }
        c.validate()?;
        Ok(c)
    }
}

pub async fn run_node(a: NodeArgs) -> Result<()> {
    let handle = shoal_node::cluster::start(a.into_config()?).await?;
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    let moved = handle.hand_over(Duration::from_secs(5)).await;
    if moved > 0 {
        tracing::info!(shards = moved, "primary roles handed over");
    }
    handle.shutdown().await;
    Ok(())
}

#[derive(Args)]
pub struct DevArgs {
    /// Everything (Raft logs, shards, logs/) goes under this dir.
    #[arg(long, default_value = ".shoal-dev")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    #[arg(long, env = "SHOAL_MODEL_DIR", default_value = shoal_encoder::DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
    /// Start the nodes without an encoder (vectors only).
    #[arg(long)]
    no_model: bool,
    /// A process that exits is reported and the others go on (fault experiments: a
    /// node killed on purpose); by default one exiting stops the cluster.
    #[arg(long)]
    keep_going: bool,
    /// Without TLS and API keys (the global `--insecure`). Otherwise the cluster gets
    /// a local CA and certificates under DATA_DIR/tls and a root key in
    /// DATA_DIR/keys/root.key, and `shoal dev` prints the variables clients need.
    #[arg(skip)]
    pub insecure: bool,
}

/// A child `shoal` process logging to `log`, exporting traces where the parent does.
fn spawn_logged(args: &[String], log: &Path, otlp: Option<&str>) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(exe)
        .args(args)
        .args(otlp.map(|ep| format!("--otlp-endpoint={ep}")))
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .context("spawning a cluster process")
}

/// SIGTERM to every process, then waits for them (SIGKILL after 10 s).
async fn stop_all(children: &mut [(String, Child)]) -> Result<()> {
    for (_, c) in children.iter() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (n, c) in children.iter_mut() {
        while c.try_wait()?.is_none() {
            if Instant::now() > deadline {
                tracing::warn!(process = %n, "did not stop in 10 s; killing");
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Three coordinators and `--nodes` nodes as separate processes on loopback
/// ([`Layout::fixed`]); Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL after
/// 10 s).
pub async fn run_dev(a: DevArgs, otlp: Option<&str>) -> Result<()> {
    let mut layout = Layout::fixed(&a.data_dir, a.nodes);
    std::fs::create_dir_all(a.data_dir.join("logs"))?;
    if !a.no_model && !a.model_dir.join("config.json").exists() {
        bail!(
            "no model at {} (run scripts/fetch-model.sh, or pass --no-model)",
            a.model_dir.display()
        );
    }
    if !a.no_model {
        layout.node_flags = vec![
            "--model-dir".into(),
            a.model_dir.to_string_lossy().to_string(),
        ];
    }
    if a.insecure {
        layout.insecure = true;
    } else {
        let tls = layout
            .make_tls()
            .context("making the local CA and certificates")?;
        let key = layout.make_keys().context("making the root key")?;
        let client = shoal_proto::tls::TlsFiles::in_dir(&tls, "client");
        eprintln!(
            "shoal dev: TLS and API keys on; for clients:\n  export SHOAL_TLS_CA={} SHOAL_TLS_CERT={} SHOAL_TLS_KEY={} SHOAL_API_KEY_FILE={}",
            client.ca.display(),
            client.cert.display(),
            client.key.display(),
            key.display()
        );
    }
    let mut children: Vec<(String, Child)> = Vec::new();
    for (k, c) in layout.coordinators.iter().enumerate() {
        let child = spawn_logged(&layout.coordinator_args(k), &layout.log(&c.name), otlp)?;
        children.push((c.name.clone(), child));
    }
    for (j, n) in layout.nodes.iter().enumerate() {
        let child = spawn_logged(&layout.node_args(j), &layout.log(&n.id), otlp)?;
        children.push((n.id.clone(), child));
    }
    let logs = a.data_dir.join("logs");
    eprintln!(
        "shoal dev: coordinators 127.0.0.1:7001-7003, nodes 127.0.0.1:7201-{} (public), \
         metrics http://127.0.0.1:9101-9103/metrics (coordinators) and \
         http://127.0.0.1:9201-{}/metrics (nodes); data and logs/ under {}; Ctrl-C stops the cluster",
        7200 + a.nodes,
        9200 + a.nodes,
        a.data_dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let exited = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = term.recv() => break None,
            _ = tick.tick() => {
                if let Some((i, n, s)) = children.iter_mut().enumerate().find_map(|(i, (n, c))| {
                    c.try_wait().ok().flatten().map(|s| (i, n.clone(), s))
                }) {
                    if !a.keep_going {
                        break Some((n, s));
                    }
                    eprintln!("shoal dev: {n} exited ({s}); the others go on (--keep-going)");
                    children.remove(i);
                }
            }
        }
    };
    // SIGTERM: each process shuts down cleanly; the nodes first, while the
    // coordinators still answer their handovers, then the coordinators.
    let (mut nodes, mut coordinators): (Vec<_>, Vec<_>) = children
        .into_iter()
        .partition(|(n, _)| n.starts_with("node"));
    stop_all(&mut nodes).await?;
    stop_all(&mut coordinators).await?;
    if let Some((n, s)) = exited {
        bail!("{n} exited ({s}); see its log in {}", logs.display());
    }
    eprintln!("shoal dev: stopped");
    Ok(())
}

#[derive(Args, Clone)]
pub struct NodeTarget {
    /// A node's public address (any node is a gateway).
    #[arg(long = "node", env = "SHOAL_NODE", default_value = DEV_NODE, global = true)]
    pub node: String,
}

pub(crate) fn connect(node: &str) -> Result<ShoalClient<Authed>> {
    // Over TLS when the command was given it (`--tls-ca`), with its key (`--api-key`).
    let c = shoal_proto::channel(node, None).with_context(|| format!("node address {node:?}"))?;
    let c = shoal_proto::auth::shoal_client(c);
    Ok(c.max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Documents of a BEIR dir (its corpus.jsonl) or of a JSONL file of the same rows
/// (`_id`, optional `title`, `text`).
fn read_docs(path: &Path) -> Result<Vec<Row>> {
    let file = if path.is_dir() {
        path.join("corpus.jsonl")
    } else {
        path.to_path_buf()
    };
    read_jsonl(&file)
}

/// Creates `name` (384-d, inner product) unless it exists; true when it was created.
async fn ensure_collection(target: &Target, name: &str, shards: u32, nlist: u32) -> Result<bool> {
    let mut c = Client::new(target.coordinators.clone());
    let exists = c
        .admin(|mut a| {
            let name = name.to_string();
            async move {
                a.describe_collection(cpb::DescribeCollectionRequest { name })
                    .await
            }
        })
        .await;
    match exists {
        Ok(_) => return Ok(false),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => bail!("describing {name}: {}", s.message()),
    }
    // The nodes' model (SHOAL_MODEL_DIR, as theirs): its hash names the collection's.
    let model_dir = std::path::PathBuf::from(
        std::env::var("SHOAL_MODEL_DIR")
            .unwrap_or_else(|_| shoal_encoder::DEFAULT_MODEL_DIR.into()),
    );
    c.admin(|mut a| {
        let name = name.to_string();
        let model_dir = model_dir.clone();
        async move {
            a.create_collection(cpb::CreateCollectionRequest {
                name,
                dimension: 384,
                metric: cpb::Metric::InnerProduct as i32,
                encoder: Some(crate::coordinator::encoder_ref(
                    "all-MiniLM-L6-v2",
                    &model_dir,
                )),
                index: Some(cpb::IndexParams {
                    nlist,
                    ..Default::default()
                }),
                shard_count: shards,
                replication_factor: 1,
                replica_memory_bytes: 0,
                write_quorum: 0,
                payload_fields: Vec::new(),
            })
            .await
        }
    })
    .await
    .with_context(|| format!("creating collection {name}"))?;
    Ok(true)
}

#[derive(Args)]
pub struct IngestArgs {
    /// A BEIR dir (corpus.jsonl inside) or a JSONL file of `_id`, `title`, `text`.
    path: PathBuf,
    #[arg(long)]
    collection: String,
    /// Documents per request.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// When the collection does not exist yet: its shard count.
    #[arg(long, default_value_t = 3)]
    shards: u32,
    /// When the collection does not exist yet: IVF lists per shard.
    #[arg(long, default_value_t = 64)]
    nlist: u32,
}

/// Sends `rows` in batches with a progress bar; returns docs/s.
async fn ingest_rows(node: &str, collection: &str, rows: &[Row], batch: usize) -> Result<f64> {
    let mut c = connect(node)?;
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} ingest {pos}/{len} docs [{elapsed_precise}] {bar:30} {per_sec} eta {eta}",
        )
        .expect("template"),
    );
    let t = Instant::now();
    for chunk in rows.chunks(batch.max(1)) {
        let docs = chunk
            .iter()
            .map(|r| pb::Document {
                id: r.id.clone(),
                text: r.text(),
                ..Default::default()
            })
            .collect();
        let req = pb::IngestRequest {
            collection: collection.to_string(),
            documents: docs,
            ..Default::default()
        };
        // UNAVAILABLE (a new collection's shards still opening, a node restarting)
        // is retried for a while; upserts are idempotent, so a retry is safe.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.ingest(req.clone()).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(s) => bail!(
                    "ingesting into {collection}: {:?}: {}",
                    s.code(),
                    s.message()
                ),
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    Ok(rows.len() as f64 / t.elapsed().as_secs_f64())
}

pub async fn ingest(target: Target, node: NodeTarget, a: IngestArgs) -> Result<()> {
    let mut rows = read_docs(&a.path)?;
    rows.retain(|r| !r.text().trim().is_empty());
    ensure_collection(&target, &a.collection, a.shards, a.nlist).await?;
    let rate = ingest_rows(&node.node, &a.collection, &rows, a.batch).await?;
    println!(
        "{}",
        serde_json::json!({"collection": a.collection, "ingested": rows.len(), "docs_per_s": rate})
    );
    Ok(())
}

/// How a search retrieves (issue 22), for `shoal search` and `shoal eval`.
#[derive(Args, Clone, Debug)]
pub struct RetrievalArgs {
    /// dense (the vector index), lexical (BM25 over the stored text), hybrid (both,
    /// fused) or auto (the server's default: hybrid for a text query, dense for a
    /// vector or --like).
    #[arg(long, default_value = "auto", value_parser = ["auto", "dense", "lexical", "hybrid"])]
    mode: String,
    /// hybrid: rrf (reciprocal ranks, k = 60) or linear (normalised scores, weighted).
    #[arg(long, default_value = "rrf", value_parser = ["rrf", "linear"])]
    fusion: String,
    /// linear: the dense side's weight in [0, 1] (default 0.5).
    #[arg(long)]
    dense_weight: Option<f32>,
    /// Vector pseudo-relevance feedback (dense, hybrid): Rocchio over the top 3
    /// documents' vectors (alpha 0.4, beta 0.6), then searched again.
    #[arg(long)]
    prf: bool,
}

impl RetrievalArgs {
    fn apply(&self, r: &mut pb::SearchRequest) {
        r.mode = match self.mode.as_str() {
            "lexical" => pb::RetrievalMode::Lexical,
            "hybrid" => pb::RetrievalMode::Hybrid,
            "dense" => pb::RetrievalMode::Dense,
            _ => pb::RetrievalMode::Auto,
        } as i32;
        r.fusion = match self.fusion.as_str() {
            "linear" => pb::Fusion::Linear,
            _ => pb::Fusion::Rrf,
        } as i32;
        r.dense_weight = self.dense_weight;
        r.prf = self.prf.then(|| pb::Prf {
            enabled: true,
            ..Default::default()
        });
    }

    /// How it is named in the eval's summary.
    fn describe(&self) -> serde_json::Value {
        // An eval's queries are text: auto runs hybrid.
        let hybrid = matches!(self.mode.as_str(), "hybrid" | "auto");
        serde_json::json!({
            "mode": self.mode,
            "fusion": hybrid.then_some(self.fusion.as_str()),
            "dense_weight": (hybrid && self.fusion == "linear")
                .then_some(self.dense_weight.unwrap_or(0.5)),
            "prf": self.prf,
        })
    }
}

#[derive(Args)]
pub struct SearchArgs {
    /// The query (or --like ID).
    #[arg(required_unless_present = "like")]
    text: Option<String>,
    /// More like this stored document: its vector (and text, lexically) is the query.
    #[arg(long, conflicts_with = "text")]
    like: Option<String>,
    #[arg(long)]
    collection: String,
    #[arg(short, long, default_value_t = 10)]
    k: u32,
    #[arg(long, default_value_t = 0)]
    nprobe: u32,
    /// Print each hit's metadata too (read by the shard that found it, in the same
    /// round trip).
    #[arg(long)]
    with_payload: bool,
    /// Only documents whose metadata passes this filter (JSON: {"must": [{"key":
    /// "year", "range": {"gte": 2000}}, {"key": "lang", "match": "en"}], "should":
    /// [...], "must_not": [...]}; the fields must be indexed: `--index-field`).
    #[arg(long, value_parser = Filter::from_json)]
    filter: Option<Filter>,
    #[command(flatten)]
    retrieval: RetrievalArgs,
}

pub async fn search(node: NodeTarget, a: SearchArgs) -> Result<()> {
    let mut c = connect(&node.node)?;
    let filtered = a.filter.is_some();
    let mut req = pb::SearchRequest {
        collection: a.collection,
        text: a.text.unwrap_or_default(),
        like_id: a.like.unwrap_or_default(),
        k: a.k,
        nprobe: a.nprobe,
        with_text: true,
        with_payload: a.with_payload,
        filter: a.filter.as_ref().map(Filter::wire),
        ..Default::default()
    };
    a.retrieval.apply(&mut req);
    let r = c
        .search(req)
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    for (i, h) in r.hits.iter().enumerate() {
        let snippet: String = h.text.chars().take(100).collect();
        println!("{:>3}. {:<12} {:.4}  {snippet}", i + 1, h.id, h.score);
        if a.with_payload {
            println!("     {}", h.metadata_json);
        }
    }
    println!(
        "shards answered {}/{}{}; {:.1} ms",
        r.shards_answered,
        r.shards_total,
        if r.partial { " (PARTIAL)" } else { "" },
        r.took_ms
    );
    if filtered {
        let plans: Vec<String> = r
            .shards
            .iter()
            .filter(|s| s.answered)
            .map(|s| format!("{}: {}", s.shard, s.plan))
            .collect();
        println!("filter plans by shard: {}", plans.join(", "));
    }
    Ok(())
}

#[derive(Args)]
pub struct CountArgs {
    collection: String,
    /// As `shoal search --filter`.
    #[arg(long, value_parser = Filter::from_json)]
    filter: Option<Filter>,
}

pub async fn count(node: NodeTarget, a: CountArgs) -> Result<()> {
    let r = connect(&node.node)?
        .count(pb::CountRequest {
            collection: a.collection.clone(),
            filter: a.filter.as_ref().map(Filter::wire),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!(
        "{}",
        serde_json::json!({"collection": a.collection, "count": r.count,
                           "partial": r.partial, "missing_shards": r.missing_shards})
    );
    Ok(())
}

#[derive(Args)]
pub struct ScrollArgs {
    collection: String,
    #[arg(long, value_parser = Filter::from_json)]
    filter: Option<Filter>,
    /// Documents per page.
    #[arg(long, default_value_t = 500)]
    page: u32,
    #[arg(long)]
    with_vector: bool,
}

pub async fn scroll(node: NodeTarget, a: ScrollArgs) -> Result<()> {
    use std::io::Write;
    let mut c = connect(&node.node)?;
    let mut cursor = String::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let r = c
            .scroll(pb::ScrollRequest {
                collection: a.collection.clone(),
                filter: a.filter.as_ref().map(Filter::wire),
                limit: a.page,
                cursor: cursor.clone(),
                with_text: true,
                with_payload: true,
                with_vector: a.with_vector,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        for d in &r.documents {
            let metadata: serde_json::Value =
                serde_json::from_str(&d.metadata_json).unwrap_or(serde_json::Value::Null);
            let mut line = serde_json::json!({"_id": d.id, "text": d.text, "metadata": metadata});
            if a.with_vector {
                line["vector"] = serde_json::json!(d.vector);
            }
            writeln!(out, "{line}")?;
        }
        if r.cursor.is_empty() {
            break;
        }
        cursor = r.cursor;
    }
    out.flush()?;
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// A BEIR dir: corpus.jsonl, queries.jsonl, qrels/test.tsv.
    dir: PathBuf,
    /// Collection name; default: the dir's name.
    #[arg(long)]
    collection: Option<String>,
    #[arg(long, default_value_t = 3)]
    shards: u32,
    #[arg(long, default_value_t = 64)]
    nlist: u32,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Print this many queries with their top hits.
    #[arg(long, default_value_t = 0)]
    show: usize,
    /// Build an IVF-PQ generation on every shard before querying (otherwise shards
    /// below their automatic build threshold answer by exact scan).
    #[arg(long)]
    build_index: bool,
    #[command(flatten)]
    retrieval: RetrievalArgs,
    /// Each query's nDCG@10 as JSON lines here (for paired significance tests between
    /// modes: `scripts/reference/paired.py`).
    #[arg(long)]
    per_query: Option<PathBuf>,
}

/// Creates and fills the collection if needed, runs every judged query through the
/// cluster, and prints nDCG@10, recall@100 and latency; the last line is JSON.
pub async fn eval(target: Target, node: NodeTarget, a: EvalArgs) -> Result<()> {
    let name = a.collection.clone().unwrap_or_else(|| {
        a.dir.file_name().map_or("eval".into(), |n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        })
    });
    let qrels = read_qrels(&a.dir.join("qrels/test.tsv"))?;
    let queries: Vec<Row> = read_jsonl(&a.dir.join("queries.jsonl"))?
        .into_iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    let mut ingest_rate = None;
    if ensure_collection(&target, &name, a.shards, a.nlist).await? {
        let mut rows = read_docs(&a.dir)?;
        rows.retain(|r| !r.text().trim().is_empty());
        ingest_rate = Some(ingest_rows(&node.node, &name, &rows, a.batch).await?);
    }
    if a.build_index {
        let b = connect(&node.node)?
            .build_index(pb::BuildIndexRequest {
                collection: name.clone(),
            })
            .await
            .with_context(|| format!("building the index of {name}"))?
            .into_inner();
        for s in &b.shards {
            if s.error.is_empty() {
                eprintln!(
                    "shard {}: generation {} ({} vectors, {:.1} s)",
                    s.shard, s.generation, s.indexed_vectors, s.build_seconds
                );
            } else {
                eprintln!("shard {}: no index ({})", s.shard, s.error);
            }
        }
    }
    let mut c = connect(&node.node)?;
    let (mut ndcg, mut recall, mut lat, mut partial) = (0.0, 0.0, Vec::new(), 0usize);
    let mut per_query = Vec::new();
    let mut shown = 0;
    for q in &queries {
        let t = Instant::now();
        let mut req = pb::SearchRequest {
            collection: name.clone(),
            text: q.text.clone(),
            k: 100,
            ..Default::default()
        };
        a.retrieval.apply(&mut req);
        let mut r = c
            .search(req)
            .await
            .with_context(|| format!("query {}", q.id))?
            .into_inner();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if shown < a.show {
            // Texts for display only, outside the timed query.
            let mut show = pb::SearchRequest {
                collection: name.clone(),
                text: q.text.clone(),
                k: 3,
                with_text: true,
                ..Default::default()
            };
            a.retrieval.apply(&mut show);
            let shown_hits = c.search(show).await?.into_inner().hits;
            for (h, s) in r.hits.iter_mut().zip(shown_hits) {
                h.text = s.text;
            }
        }
        partial += usize::from(r.partial);
        // BEIR ignores a document that has the query's own id.
        let ranked: Vec<&str> = r
            .hits
            .iter()
            .map(|h| h.id.as_str())
            .filter(|d| *d != q.id)
            .collect();
        let rels: &HashMap<String, u32> = &qrels[&q.id];
        let this = ndcg_at(10, &ranked, rels);
        ndcg += this;
        per_query.push(serde_json::json!({"query": q.id, "ndcg_at_10": this}));
        recall += recall_at(100, &ranked, rels);
        if shown < a.show {
            shown += 1;
            println!("query {}: {}", q.id, q.text);
            for h in r.hits.iter().take(3) {
                let rel = rels.get(&h.id).copied().unwrap_or(0);
                let snippet: String = h.text.chars().take(90).collect();
                println!("   {:<8} {:.3} rel={rel}  {snippet}", h.id, h.score);
            }
        }
    }
    let n = queries.len().max(1) as f64;
    if let Some(path) = &a.per_query {
        let lines: Vec<String> = per_query.iter().map(|v| v.to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!("| collection | queries | nDCG@10 | recall@100 | p50 ms | p99 ms | partial |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {name} | {} | {:.4} | {:.4} | {p50:.1} | {p99:.1} | {partial} |",
        queries.len(),
        ndcg / n,
        recall / n
    );
    println!(
        "{}",
        serde_json::json!({
            "collection": name, "queries": queries.len(),
            "retrieval": a.retrieval.describe(),
            "ndcg_at_10": ndcg / n, "recall_at_100": recall / n,
            "p50_ms": p50, "p99_ms": p99, "partial_results": partial,
            "ingest_docs_per_s": ingest_rate,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    /// A node's config from its flags, started open (the refusal is tested below).
    fn config(args: &[&str]) -> Result<NodeConfig> {
        let mut node =
            Cli::try_parse_from(std::iter::once("shoal").chain(args.iter().copied()))?.node;
        node.security.insecure = true;
        node.into_config()
    }

    #[test]
    fn a_node_without_tls_or_keys_starts_only_when_told_it_is_insecure() {
        let node = |insecure| {
            let mut n = Cli::try_parse_from(["shoal", "--id", "n", "--data-dir", "/d"])
                .unwrap()
                .node;
            n.security.insecure = insecure;
            n.into_config()
        };
        let e = node(false).unwrap_err().to_string();
        assert!(e.contains("without TLS and without API keys"), "{e}");
        assert!(e.contains("--insecure"), "{e}");
        assert!(node(true).is_ok());
    }

    #[test]
    fn flags_override_the_file_and_the_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "id = \"from-file\"\ndata_dir = \"/d\"\nheartbeat_ms = 300\nzone = \"z1\"\n\
             limits = [\"k=50\"]\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = config(&["--config", f, "--id", "n2", "--limit", "refine=7"]).unwrap();
        assert_eq!(c.id, "n2");
        assert_eq!(c.zone, "z1");
        assert_eq!(c.heartbeat, Duration::from_millis(300));
        assert_eq!((c.limits.k, c.limits.refine), (50, 7));
        let d = NodeConfig::default();
        assert_eq!(c.coordinators, d.coordinators);
        assert_eq!(c.disk_reserve_bytes, d.disk_reserve_bytes);
        assert_eq!(c.encoder_device, shoal_encoder::Device::Cpu);
        // Without a file, the id and the data dir are required.
        let e = config(&["--id", "n3"]).unwrap_err();
        assert!(e.to_string().contains("--data-dir"), "{e}");
        let c = config(&["--id", "n3", "--data-dir", "/x", "--heartbeat-ms", "20"]).unwrap();
        assert_eq!(c.heartbeat, Duration::from_millis(20));
        let e = config(&["--id", "n3", "--data-dir", "/x", "--encoder-device", "tpu"]);
        assert!(e.is_err());
    }
}
