//! `shoal coordinator` (run a member) and the admin commands that talk to the group.

use shoal_proto::filter::PayloadField;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use shoal_coordinator::{Config, Peer};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::precision::Precision;

/// Flags for one member; each also reads `SHOAL_*` from the environment, and any left
/// unset come from `--config FILE` (TOML with the same names) or the defaults.
#[derive(Args)]
pub struct CoordinatorArgs {
    /// TOML file with any of the settings below (flags and environment win).
    #[arg(long, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// This member's Raft id (non-zero, unique in the group).
    #[arg(long, env = "SHOAL_ID")]
    id: Option<u64>,
    /// Public gRPC address (admin and cluster map).
    #[arg(long, env = "SHOAL_LISTEN")]
    listen: Option<String>,
    /// Internal Raft address (other members only).
    #[arg(long, env = "SHOAL_RAFT_LISTEN")]
    raft_listen: Option<String>,
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Initial voters, this member included: ID=RAFT_ADDR/API_ADDR, comma-separated.
    /// The lowest id initialises a fresh group; on restart the log on disk wins.
    #[arg(long, env = "SHOAL_PEERS", value_delimiter = ',')]
    peers: Vec<Peer>,
    #[arg(long, env = "SHOAL_SUSPECT_AFTER_MS")]
    suspect_after_ms: Option<u64>,
    #[arg(long, env = "SHOAL_DOWN_AFTER_MS")]
    down_after_ms: Option<u64>,
    #[arg(long, env = "SHOAL_SNAPSHOT_EVERY")]
    snapshot_every: Option<u64>,
    /// How long the cluster stays settled with uneven primaries before one is handed
    /// over to even them out (one handover per period).
    #[arg(long, env = "SHOAL_REBALANCE_SETTLE_MS")]
    rebalance_settle_ms: Option<u64>,
    /// Used fraction of a node's volume over which it takes no new replica.
    #[arg(long, env = "SHOAL_DISK_LOW_WATERMARK")]
    disk_low_watermark: Option<f64>,
    /// Used fraction (trash counted as free) over which its replicas move elsewhere.
    #[arg(long, env = "SHOAL_DISK_HIGH_WATERMARK")]
    disk_high_watermark: Option<f64>,
    /// false: placement ignores disk usage.
    #[arg(long, env = "SHOAL_DISK_THRESHOLD_ENABLED", action = clap::ArgAction::Set)]
    disk_threshold_enabled: Option<bool>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve plaintext grpc.health alone here (Kubernetes' gRPC probes speak no TLS).
    #[arg(long, env = "SHOAL_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
    /// A limit over its default, NAME=VALUE (repeatable; `shoal limits` lists them).
    #[arg(long = "limit", env = "SHOAL_LIMITS", value_delimiter = ',')]
    limits: Vec<String>,
    /// The coordinator group's disaster recovery (issue 20), instead of running a member.
    #[command(subcommand)]
    pub action: Option<CoordinatorAction>,
    /// From the global `--tls-*` flags.
    #[arg(skip)]
    pub tls: Option<shoal_proto::tls::TlsFiles>,
    /// From the global key flags.
    #[arg(skip)]
    pub security: crate::Security,
}

impl CoordinatorArgs {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_toml_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            id,
            listen,
            raft_listen,
            data_dir,
            suspect_after_ms,
            down_after_ms,
            snapshot_every,
            rebalance_settle_ms,
            disk_low_watermark,
            disk_high_watermark,
            disk_threshold_enabled
        );
        if !self.peers.is_empty() {
            c.peers = self.peers;
        }
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        if self.health_listen.is_some() {
            c.health_listen = self.health_listen;
        }
        if self.tls.is_some() {
            c.tls = self.tls;
        }
        self.security.apply(
            c.tls.is_some(),
            &mut c.root_key_file,
            &mut c.audit_log,
            "coordinator",
        )?;
        c.limits.extend(self.limits);
        Ok(c)
    }
}

/// `shoal coordinator backup|restore`: the map itself, not a collection's data.
#[derive(Subcommand)]
pub enum CoordinatorAction {
    /// Writes the cluster map (cluster id, nodes and their volumes, collections,
    /// shards and replica sets, keys, operations) to FILE, as the group holds it now.
    Backup {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        to: PathBuf,
    },
    /// Gives a group rebuilt from nothing the map in FILE: it becomes that cluster, so
    /// its nodes, which refuse a group of another cluster id, come back with their
    /// data. Refused by a group that has nodes or collections already.
    Restore {
        #[command(flatten)]
        target: Target,
        file: PathBuf,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        anyhow::bail!("the map is not hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| anyhow::anyhow!("the map: {e}")))
        .collect()
}

pub async fn action(a: CoordinatorAction) -> anyhow::Result<()> {
    match a {
        CoordinatorAction::Backup { target, to } => {
            let mut client = Client::new(target.coordinators);
            let r = client.export_map(cpb::ExportMapRequest {}).await?;
            let doc = serde_json::json!({
                "cluster_id": r.cluster_id, "map_version": r.map_version,
                "format": r.format, "map": hex(&r.map),
            });
            let tmp = to.with_extension("partial");
            std::fs::write(&tmp, serde_json::to_vec(&doc)?)?;
            std::fs::rename(&tmp, &to)?;
            print_json(serde_json::json!({
                "file": to, "cluster_id": r.cluster_id, "map_version": r.map_version,
                "bytes": r.map.len(),
            }));
        }
        CoordinatorAction::Restore { target, file } => {
            let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
            let map = unhex(doc["map"].as_str().unwrap_or_default())?;
            let format = doc["format"].as_u64().unwrap_or(0) as u32;
            let mut client = Client::new(target.coordinators);
            let r = client
                .import_map(cpb::ImportMapRequest { map, format })
                .await?;
            print_json(serde_json::json!({
                "restored": true, "cluster_id": r.cluster_id, "map_version": r.map_version,
            }));
        }
    }
    Ok(())
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    if let Some(a) = args.action {
        return action(a).await;
    }
    let handle = shoal_coordinator::start(args.into_config()?).await?;
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// Where the admin commands find the coordinators: a local `shoal dev` cluster's by default.
#[derive(Args, Clone)]
pub struct Target {
    /// Coordinator public addresses, comma-separated (any member; writes are forwarded).
    #[arg(
        long = "addr",
        env = "SHOAL_COORDINATORS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        global = true
    )]
    pub coordinators: Vec<String>,
}

#[derive(Subcommand)]
pub enum CollectionCmd {
    /// Creates a collection; zero index parameters take defaults for the dimension.
    Create {
        name: String,
        #[arg(long, default_value_t = 384)]
        dimension: u32,
        /// ip (inner product) or l2.
        #[arg(long, default_value = "ip")]
        metric: String,
        #[arg(long, default_value_t = 3)]
        shards: u32,
        /// Copies of every shard (primary + backups).
        #[arg(long, default_value_t = 2)]
        replication_factor: u32,
        /// The fewest in-sync replicas (the primary included) the collection writes
        /// with; every in-sync replica holds each acknowledged write. 0 = 2 at RF >= 2.
        #[arg(long, default_value_t = 0)]
        write_quorum: u32,
        #[arg(long, default_value_t = 0)]
        nlist: u32,
        #[arg(long, default_value_t = 0)]
        pq_m: u32,
        #[arg(long, default_value_t = 0)]
        pq_nbits: u32,
        #[arg(long, default_value_t = 0)]
        nprobe: u32,
        #[arg(long, default_value_t = 0)]
        refine: u32,
        /// What re-ranking reads: f32 (the stored vectors), f16 or sq8 (a copy each
        /// index generation writes at 2 or 1 bytes a dimension).
        #[arg(long, value_parser = parse_rerank)]
        rerank: Option<Precision>,
        /// Encoder model id (e.g. all-MiniLM-L6-v2); none for precomputed vectors.
        #[arg(long)]
        model: Option<String>,
        /// The model's directory: its content hash is the collection's (issue 21), and
        /// a node encodes the collection's text only with exactly that model.
        #[arg(long, env = "SHOAL_MODEL_DIR", default_value = shoal_encoder::DEFAULT_MODEL_DIR)]
        model_dir: std::path::PathBuf,
        /// A metadata field indexed for filters, as PATH:KIND (`year:number`,
        /// `lang:keyword`, `author.name:keyword`); repeat for more.
        #[arg(long = "index-field", value_parser = PayloadField::parse)]
        index_fields: Vec<PayloadField>,
    },
    List,
    Describe {
        name: String,
    },
    Drop {
        name: String,
    },
    /// Changes a collection's run-time policy: `--auto-rebuild off` before a bulk
    /// load (then `shoal index-build` once), `--auto-rebuild N` to rebuild a shard's
    /// index once N rows are newer than it, `--auto-rebuild default` for the nodes'
    /// `--auto-rebuild-tail`.
    /// `--index-field PATH:KIND` (repeated) replaces the fields indexed for filters
    /// (each replica re-reads its documents' metadata); `--no-index-fields` drops them.
    /// What is not given stays as it is.
    Policy {
        name: String,
        #[arg(long)]
        auto_rebuild: Option<String>,
        #[arg(long = "index-field", value_parser = PayloadField::parse)]
        index_fields: Vec<PayloadField>,
        #[arg(long, conflicts_with = "index_fields")]
        no_index_fields: bool,
    },
    /// Compacts every shard: each primary logs a compaction and every replica rewrites
    /// its segments without replaced and deleted rows (reads and writes go on). With
    /// `--wait`, follows the operation to its end.
    Compact {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Doubles the collection's shard count online (issue 19): each shard forks a
    /// sibling on the nodes that hold it (writes wait while the forks are copied,
    /// searches go on), then shard i keeps the ids routed to i among twice the shards
    /// and its sibling i + S the rest. Placement spreads the new shards afterwards.
    /// With `--wait`, follows the operation to its end.
    Split {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Rebuilds every shard's index to new parameters online (issue 21): each
    /// primary builds beside its serving generation and gates it (recall@k on recent
    /// queries and stored vectors against the serving one and exact search; refused
    /// past `--margin`), backups take it, then the whole collection switches at once.
    /// The previous generations stay until `commit`; `rollback` serves them again.
    /// Parameters not given keep the collection's. `--dry-run` prints the plan (memory,
    /// disk, time); `--wait` follows it until it switches or ends.
    Rebuild {
        name: String,
        #[arg(long, default_value_t = 0)]
        nlist: u32,
        #[arg(long, default_value_t = 0)]
        pq_m: u32,
        #[arg(long, default_value_t = 0)]
        pq_nbits: u32,
        #[arg(long, default_value_t = 0)]
        nprobe: u32,
        #[arg(long, default_value_t = 0)]
        refine: u32,
        #[arg(long, value_parser = parse_rerank)]
        rerank: Option<Precision>,
        /// Recall@k the new generation may lose against the serving one.
        #[arg(long, default_value_t = 0.01)]
        margin: f64,
        /// The gate's k.
        #[arg(long, default_value_t = 10)]
        gate_k: u32,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Re-embeds every document with another model online (issue 21): each shard's
    /// primary re-encodes its stored texts (throttled: `--reembed-duty` on the nodes)
    /// into a vector set beside the stored vectors, backups receive it by replication,
    /// new writes are encoded with both models; then an index over the new vectors is
    /// built and gated as a rebuild's, and the whole collection switches at once:
    /// queries are encoded by the new model from then on. `commit` makes the new
    /// vectors the stored ones; `rollback` goes back to the old model. Refused when
    /// documents were stored without text, or a node serving the collection lacks the
    /// model. `--dry-run` prints the disk and time it will take.
    Reembed {
        name: String,
        /// The new model's directory (hashed here: every node must hold the same files).
        #[arg(long)]
        model_dir: std::path::PathBuf,
        /// The model's name as the collection shows it [default: the directory's name].
        #[arg(long)]
        model_id: Option<String>,
        #[arg(long, default_value_t = 0)]
        nlist: u32,
        #[arg(long, default_value_t = 0)]
        pq_m: u32,
        #[arg(long, default_value_t = 0)]
        nprobe: u32,
        #[arg(long, default_value_t = 0)]
        refine: u32,
        /// Recall@k the new index may lose against exact search over the new vectors,
        /// beside the serving index's against the old ones.
        #[arg(long, default_value_t = 0.01)]
        margin: f64,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Keeps a switched rebuild: every shard's previous generation is deleted (a
    /// rollback is refused after this).
    Commit {
        name: String,
    },
    /// Serves the previous generations and parameters again (before the switch: drops
    /// the staged ones).
    Rollback {
        name: String,
    },
}

/// Collection aliases (issue 21): searches and writes may name an alias; `set`
/// switches it atomically.
#[derive(Subcommand)]
pub enum AliasCmd {
    Set { alias: String, collection: String },
    Remove { alias: String },
    List,
}

pub async fn alias(target: Target, cmd: AliasCmd) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    let r = match cmd {
        AliasCmd::Set { alias, collection } => {
            client
                .set_alias(cpb::SetAliasRequest { alias, collection })
                .await?
        }
        AliasCmd::Remove { alias } => {
            client
                .set_alias(cpb::SetAliasRequest {
                    alias,
                    collection: String::new(),
                })
                .await?
        }
        AliasCmd::List => client.list_aliases(cpb::ListAliasesRequest {}).await?,
    };
    print_json(serde_json::json!({
        "aliases": r.aliases.iter().map(|a| (a.alias.clone(), serde_json::Value::from(a.collection.clone()))).collect::<serde_json::Map<_, _>>(),
    }));
    Ok(())
}

/// A collection's model: its id and the content hash of `dir` (issue 21). Without the
/// directory here the hash stays empty (nodes then check only the dimension), said once.
pub(crate) fn encoder_ref(model_id: &str, dir: &std::path::Path) -> cpb::EncoderRef {
    let content_hash = match shoal_node::model::content_hash(dir) {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "warning: model dir {} unreadable ({e}): the collection names its model without a content hash",
                dir.display()
            );
            String::new()
        }
    };
    cpb::EncoderRef {
        model_id: model_id.to_string(),
        content_hash,
    }
}

/// Texts a 2-core node encodes a second (docs/benchmarks.md, Cranfield-length
/// abstracts): MiniLM-L6 (384-d) 18 through ingest; MPNet (768-d) 1.8 in the re-embed
/// benchmark's fill (at duty 0.5: 0.9). Other dimensions are scaled from these.
fn encode_rate(dimension: u32) -> f64 {
    if dimension <= 384 {
        18.0
    } else {
        1.8 * (768.0 / dimension as f64).powi(2)
    }
}

/// `collection reembed --dry-run`: per shard, the rows its primary re-encodes, the
/// disk its vector set takes on each replica (rows × dimension × 4 bytes, held until
/// the commit), and the time at the measured rate (scaled by 768-d models' ~8x cost).
fn reembed_plan(
    shards: &[cpb::Shard],
    dimension: u32,
    encoder: &cpb::EncoderRef,
) -> serde_json::Value {
    let rate = encode_rate(dimension);
    let mut total_disk = 0u64;
    let mut busiest: std::collections::BTreeMap<String, f64> = Default::default();
    let per_shard: Vec<serde_json::Value> = shards
        .iter()
        .map(|s| {
            let rows = s
                .replicas
                .iter()
                .find(|r| r.node_id == s.primary)
                .map_or(0, |r| r.live_docs);
            let disk = rows * dimension as u64 * 4;
            total_disk += disk * s.replicas.len() as u64;
            let secs = rows as f64 / rate;
            *busiest.entry(s.primary.clone()).or_default() += secs;
            serde_json::json!({"shard": s.index, "primary": s.primary, "rows": rows,
                "vector_set_disk_bytes_per_replica": disk, "replicas": s.replicas.len(),
                "encode_seconds_estimate": secs})
        })
        .collect();
    let seconds = busiest.values().copied().fold(0.0, f64::max);
    serde_json::json!({"model": encoder.content_hash, "model_id": encoder.model_id,
        "dimension": dimension, "shards": per_shard, "extra_disk_bytes": total_disk,
        "encode_texts_per_sec_assumed": rate, "seconds_estimate": seconds,
        "note": "each primary encodes its shard's texts once, a node's shards one after another through its encoder; throttled by the nodes' --reembed-duty (the estimate assumes 1: divide by the duty)"})
}

/// Rows a 2-core node indexes a second in a build (docs/benchmarks.md: a 1M-vector
/// IVF1024,PQ48 build took 118-128 s here, training included).
const BUILD_ROWS_PER_SEC: f64 = 8_000.0;

/// `collection rebuild --dry-run`: per shard, the rows its primary last reported, the
/// memory its build reserves, the disk its new generation takes beside the serving one
/// on each replica, and the build time at the measured rate.
fn rebuild_plan(
    coll: &cpb::Collection,
    shards: &[cpb::Shard],
    nlist: u32,
    pq_m: u32,
    pq_nbits: u32,
    rerank: Precision,
) -> serde_json::Value {
    let ix = coll.index.unwrap_or_default();
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let (m, nbits) = (or(pq_m, ix.pq_m), or(pq_nbits, ix.pq_nbits));
    let mut total_disk = 0u64;
    let mut busiest: std::collections::BTreeMap<String, f64> = Default::default();
    let rows_of = |s: &cpb::Shard| {
        s.replicas
            .iter()
            .find(|r| r.node_id == s.primary)
            .map_or(0, |r| r.live_docs)
    };
    let per_shard: Vec<serde_json::Value> = shards
        .iter()
        .map(|s| {
            let rows = rows_of(s);
            let nl = if nlist > 0 {
                nlist
            } else if ix.nlist > 0 {
                ix.nlist
            } else {
                shoal_proto::sizing::size_index(rows, 0).0
            };
            let params = shoal_engine::IvfPqParams {
                nlist: nl as usize,
                m: m as usize,
                nbits: nbits as usize,
            };
            let sample = (39 * nl as usize).max(65_536.min(rows as usize));
            let memory = shoal_engine::build_memory(rows, coll.dimension as usize, params, sample);
            let code = (m as u64 * nbits as u64).div_ceil(8);
            let copy = match rerank {
                Precision::F32 => 0,
                Precision::F16 => 2 * coll.dimension as u64,
                Precision::Sq8 => coll.dimension as u64,
            };
            let disk = rows * (code + 8 + copy);
            total_disk += disk * s.replicas.len() as u64;
            let secs = rows as f64 / BUILD_ROWS_PER_SEC;
            *busiest.entry(s.primary.clone()).or_default() += secs;
            serde_json::json!({"shard": s.index, "primary": s.primary, "rows": rows,
                "nlist": nl, "build_memory_bytes": memory,
                "new_generation_disk_bytes_per_replica": disk, "replicas": s.replicas.len(),
                "build_seconds_estimate": secs})
        })
        .collect();
    serde_json::json!({
        "collection": coll.name, "dry_run": true,
        "params": {"nlist": nlist, "pq_m": m, "pq_nbits": nbits, "rerank": rerank.name()},
        "shards": per_shard,
        "extra_disk_bytes_at_peak": total_disk,
        // Primaries build apart (each node's build slots), backups fetch: the node
        // leading the most rows sets the pace.
        "seconds_estimate": busiest.values().cloned().fold(0.0, f64::max),
        "rate_rows_per_sec": BUILD_ROWS_PER_SEC,
    })
}

#[derive(Subcommand)]
pub enum ShardCmd {
    /// Hands the shard's primary role to its serving replica on NODE (new epoch).
    /// Refused when that replica is behind the primary or its node is not up.
    Promote {
        collection: String,
        shard: u32,
        node: String,
        /// Promote anyway: writes the replica lacks are lost, and the old primary
        /// truncates them when it rejoins as a backup.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Re-creates the shard as an empty primary on NODE after its data is gone (every
    /// serving copy lost). Refused while a serving replica sits on a live node, and
    /// without --accept-data-loss: every acknowledged write of the shard is given up.
    AllocateEmpty {
        collection: String,
        shard: u32,
        node: String,
        #[arg(long)]
        accept_data_loss: bool,
    },
}

pub async fn shard(target: Target, cmd: ShardCmd) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    match cmd {
        ShardCmd::Promote {
            collection,
            shard,
            node,
            accept_data_loss,
        } => {
            let req = cpb::PromoteReplicaRequest {
                collection,
                shard,
                node_id: node,
                accept_data_loss,
            };
            let s = client.promote_replica(req).await?;
            print_json(shard_json(&s));
        }
        ShardCmd::AllocateEmpty {
            collection,
            shard,
            node,
            accept_data_loss,
        } => {
            let req = cpb::AllocateEmptyShardRequest {
                collection,
                shard,
                node_id: node,
                accept_data_loss,
            };
            let s = client.allocate_empty_shard(req).await?;
            print_json(shard_json(&s));
        }
    }
    Ok(())
}

pub(crate) fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}

fn collection_json(c: &cpb::Collection) -> serde_json::Value {
    let ix = c.index.unwrap_or_default();
    serde_json::json!({
        "name": c.name, "id": c.id, "dimension": c.dimension,
        "metric": cpb::Metric::try_from(c.metric).map(|m| m.as_str_name()).unwrap_or("?"),
        "shards": c.shard_count, "replication_factor": c.replication_factor,
        "write_quorum": c.write_quorum,
        "index": {"nlist": ix.nlist, "pq_m": ix.pq_m, "pq_nbits": ix.pq_nbits,
                  "nprobe": ix.nprobe, "refine": ix.refine,
                  "rerank": Precision::from_wire(ix.rerank).unwrap_or_default().name()},
        "encoder": c.encoder.as_ref().map(|e| e.model_id.clone()),
        "auto_rebuild": match c.auto_rebuild_rows {
            None => serde_json::json!("node default"),
            Some(0) => serde_json::json!("off"),
            Some(n) => serde_json::json!(n),
        },
        "index_fields": c.payload_fields.iter()
            .map(|f| PayloadField::from_wire(f).map_or_else(|e| e, |f| f.to_string()))
            .collect::<Vec<_>>(),
    })
}

fn shard_json(s: &cpb::Shard) -> serde_json::Value {
    serde_json::json!({
        "shard": format!("{}/{}", s.collection, s.index),
        "primary": s.primary, "epoch": s.epoch,
        "backups": s.replicas.iter().filter(|r| r.node_id != s.primary)
            .map(|r| r.node_id.clone()).collect::<Vec<_>>(),
        // Sequence numbers and lag as the replicas last reported them to the leader.
        "replicas": s.replicas.iter().map(|r| serde_json::json!({
            "node": r.node_id,
            "role": if r.node_id == s.primary { "primary" } else { "backup" },
            "state": cpb::ReplicaState::try_from(r.state).map(|x| x.as_str_name()).unwrap_or("?")
                .trim_start_matches("REPLICA_STATE_").to_lowercase(),
            "seq": r.applied_seq, "lag": r.lag, "epoch": r.epoch,
            "caught_up": r.caught_up, "live_docs": r.live_docs,
            "generation": r.serving_generation,
        })).collect::<Vec<_>>(),
        "serving_generation": s.serving_generation,
        "building_generation": s.building_generation,
    })
}

pub async fn collection(target: Target, cmd: CollectionCmd) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    match cmd {
        CollectionCmd::Create {
            name,
            dimension,
            metric,
            shards,
            replication_factor,
            write_quorum,
            nlist,
            pq_m,
            pq_nbits,
            nprobe,
            refine,
            rerank,
            model,
            model_dir,
            index_fields,
        } => {
            let metric = match metric.as_str() {
                "ip" | "inner_product" | "cosine" => cpb::Metric::InnerProduct,
                "l2" => cpb::Metric::L2,
                m => anyhow::bail!("unknown metric {m:?}: use ip or l2"),
            };
            let req = cpb::CreateCollectionRequest {
                name,
                dimension,
                metric: metric as i32,
                encoder: model.map(|m| encoder_ref(&m, &model_dir)),
                index: Some(cpb::IndexParams {
                    nlist,
                    pq_m,
                    pq_nbits,
                    nprobe,
                    refine,
                    rerank: rerank.map_or(0, Precision::wire),
                }),
                shard_count: shards,
                replication_factor,
                replica_memory_bytes: 0,
                write_quorum,
                payload_fields: index_fields.iter().map(PayloadField::wire).collect(),
            };
            let info = client.create_collection(req).await?;
            print_json(serde_json::json!({
                "collection": info.collection.as_ref().map(collection_json),
                "shards": info.shards.iter().map(shard_json).collect::<Vec<_>>(),
                "map_version": info.map_version,
            }));
        }
        CollectionCmd::List => {
            let r = client
                .admin(
                    |mut a| async move { a.list_collections(cpb::ListCollectionsRequest {}).await },
                )
                .await?
                .into_inner();
            print_json(serde_json::json!({
                "collections": r.collections.iter().map(collection_json).collect::<Vec<_>>(),
                "map_version": r.map_version,
            }));
        }
        CollectionCmd::Describe { name } => {
            let info = client
                .admin(|mut a| {
                    let name = name.clone();
                    async move {
                        a.describe_collection(cpb::DescribeCollectionRequest { name })
                            .await
                    }
                })
                .await?
                .into_inner();
            print_json(serde_json::json!({
                "collection": info.collection.as_ref().map(collection_json),
                "shards": info.shards.iter().map(shard_json).collect::<Vec<_>>(),
                "map_version": info.map_version,
            }));
        }
        CollectionCmd::Drop { name } => {
            let r = client
                .admin(|mut a| {
                    let name = name.clone();
                    async move { a.drop_collection(cpb::DropCollectionRequest { name }).await }
                })
                .await?
                .into_inner();
            print_json(serde_json::json!({"dropped": true, "map_version": r.map_version}));
        }
        CollectionCmd::Policy {
            name,
            auto_rebuild,
            index_fields,
            no_index_fields,
        } => {
            // The request replaces the whole policy: what is not given is kept.
            let current = client
                .admin(|mut a| {
                    let name = name.clone();
                    async move {
                        a.describe_collection(cpb::DescribeCollectionRequest { name })
                            .await
                    }
                })
                .await?
                .into_inner()
                .collection
                .ok_or_else(|| anyhow::anyhow!("collection {name:?} not described"))?;
            let auto_rebuild_rows = match auto_rebuild.as_deref() {
                None => current.auto_rebuild_rows,
                Some("default") => None,
                Some("off") => Some(0),
                Some(n) => Some(n.parse::<u64>().map_err(|_| {
                    anyhow::anyhow!("--auto-rebuild {n:?}: expected off, default or a row count")
                })?),
            };
            let payload_fields = if no_index_fields {
                Vec::new()
            } else if index_fields.is_empty() {
                current.payload_fields
            } else {
                index_fields.iter().map(PayloadField::wire).collect()
            };
            let info = client
                .set_collection_policy(cpb::SetCollectionPolicyRequest {
                    name,
                    auto_rebuild_rows,
                    payload_fields,
                })
                .await?;
            print_json(serde_json::json!({
                "collection": info.collection.as_ref().map(collection_json),
                "map_version": info.map_version,
            }));
        }
        CollectionCmd::Compact { name, wait } => {
            let op = client
                .start_compaction(cpb::StartCompactionRequest {
                    collection: name.clone(),
                })
                .await?;
            follow_operation(&mut client, op, &name, wait).await?;
        }
        CollectionCmd::Split { name, wait } => {
            let op = client
                .start_split(cpb::StartSplitRequest {
                    collection: name.clone(),
                })
                .await?;
            follow_operation(&mut client, op, &name, wait).await?;
        }
        CollectionCmd::Rebuild {
            name,
            nlist,
            pq_m,
            pq_nbits,
            nprobe,
            refine,
            rerank,
            margin,
            gate_k,
            dry_run,
            wait,
        } => {
            if dry_run {
                let info = client
                    .describe_collection(cpb::DescribeCollectionRequest { name: name.clone() })
                    .await?;
                let coll = info
                    .collection
                    .ok_or_else(|| anyhow::anyhow!("collection {name:?} not found"))?;
                // The replicas' reports (rows) are in the leader's memory.
                let shards = client
                    .list_shards(cpb::ListShardsRequest {
                        collection: name.clone(),
                    })
                    .await?
                    .shards;
                let rerank = rerank.unwrap_or_else(|| {
                    Precision::from_wire(coll.index.unwrap_or_default().rerank).unwrap_or_default()
                });
                print_json(rebuild_plan(&coll, &shards, nlist, pq_m, pq_nbits, rerank));
                return Ok(());
            }
            let op = client
                .start_rebuild(cpb::StartRebuildRequest {
                    collection: name.clone(),
                    nlist,
                    pq_m,
                    pq_nbits,
                    nprobe,
                    refine,
                    train_sample: 0,
                    rerank: rerank.map_or(0, Precision::wire),
                    gate_k,
                    margin: Some(margin),
                    encoder: None,
                    dimension: 0,
                })
                .await?;
            follow_until(&mut client, op, &name, wait, switched_or_ended).await?;
        }
        CollectionCmd::Reembed {
            name,
            model_dir,
            model_id,
            nlist,
            pq_m,
            nprobe,
            refine,
            margin,
            dry_run,
            wait,
        } => {
            let dimension = shoal_encoder::ModelSpec::load(&model_dir)
                .map_err(|e| anyhow::anyhow!("model dir {}: {e}", model_dir.display()))?
                .dimension() as u32;
            let id = model_id.unwrap_or_else(|| {
                model_dir
                    .file_name()
                    .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
            });
            let encoder = encoder_ref(&id, &model_dir);
            if encoder.content_hash.is_empty() {
                anyhow::bail!("model dir {} could not be hashed", model_dir.display());
            }
            if dry_run {
                let shards = client
                    .list_shards(cpb::ListShardsRequest {
                        collection: name.clone(),
                    })
                    .await?
                    .shards;
                print_json(reembed_plan(&shards, dimension, &encoder));
                return Ok(());
            }
            let op = client
                .start_rebuild(cpb::StartRebuildRequest {
                    collection: name.clone(),
                    nlist,
                    pq_m,
                    pq_nbits: 0,
                    nprobe,
                    refine,
                    train_sample: 0,
                    rerank: 0,
                    gate_k: 10,
                    margin: Some(margin),
                    encoder: Some(encoder),
                    dimension,
                })
                .await?;
            follow_until(&mut client, op, &name, wait, switched_or_ended).await?;
        }
        CollectionCmd::Commit { name } => {
            let o = client
                .commit_rebuild(cpb::EndRebuildRequest {
                    collection: name,
                    operation: 0,
                })
                .await?;
            print_json(operation_json(&o));
        }
        CollectionCmd::Rollback { name } => {
            let o = client
                .rollback_rebuild(cpb::EndRebuildRequest {
                    collection: name,
                    operation: 0,
                })
                .await?;
            print_json(operation_json(&o));
        }
    }
    Ok(())
}

/// Prints an operation; with `wait`, polls it to its end and fails unless it succeeded.
pub(crate) async fn follow_operation(
    client: &mut Client,
    op: cpb::Operation,
    collection: &str,
    wait: bool,
) -> anyhow::Result<()> {
    follow_until(client, op, collection, wait, |o| o.state != "running").await
}

/// A rebuild (or re-embed) is followed until it switches or ends.
fn switched_or_ended(o: &cpb::Operation) -> bool {
    o.state != "running" || o.rebuild.as_ref().is_some_and(|r| r.phase != "building")
}

/// Prints an operation; with `wait`, polls it until `settled` and fails if it ended
/// other than succeeded.
async fn follow_until(
    client: &mut Client,
    op: cpb::Operation,
    collection: &str,
    wait: bool,
    settled: fn(&cpb::Operation) -> bool,
) -> anyhow::Result<()> {
    if !wait {
        print_json(operation_json(&op));
        return Ok(());
    }
    let t = std::time::Instant::now();
    loop {
        let ops = client
            .list_operations(cpb::ListOperationsRequest {
                collection: collection.to_string(),
            })
            .await?;
        if let Some(o) = ops.operations.iter().find(|o| o.id == op.id) {
            if settled(o) {
                let mut v = operation_json(o);
                v["seconds"] = t.elapsed().as_secs_f64().into();
                print_json(v);
                if o.state != "running" && o.state != "succeeded" {
                    anyhow::bail!("{} {} {}: {}", o.kind, o.id, o.state, o.reason);
                }
                return Ok(());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `shoal status`: the coordinator group, the nodes, and every shard's replica set.
fn group_json(st: &cpb::ClusterStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "answered_by": st.id, "leader": st.leader, "leader_addr": st.leader_api_addr,
        "term": st.term, "last_applied_index": st.last_applied_index,
        "snapshot_index": st.snapshot_index,
        "members": st.members.iter().map(|m| serde_json::json!({
            "id": m.id, "api_addr": m.api_addr, "raft_addr": m.raft_addr, "voter": m.voter,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Subcommand)]
pub enum MembersCmd {
    /// Adds a started, empty coordinator as a learner and waits until it has caught up
    /// with the log (then make it a voter with `voters`).
    Add {
        id: u64,
        /// Its Raft address, as the other members reach it.
        raft_addr: String,
        /// Its public address.
        api_addr: String,
    },
    /// Sets the voters (comma-separated ids): members left out stop voting and leave
    /// the group; learners named become voters.
    Voters {
        #[arg(value_delimiter = ',', required = true)]
        ids: Vec<u64>,
    },
}

/// The coordinator group's membership, changed at run time (replacing a lost member).
pub async fn members(target: Target, cmd: MembersCmd) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    let st = match cmd {
        MembersCmd::Add {
            id,
            raft_addr,
            api_addr,
        } => {
            let req = cpb::AddLearnerRequest {
                id,
                raft_addr,
                api_addr,
            };
            client
                .admin(|mut a| {
                    let r = req.clone();
                    async move { a.add_learner(r).await }
                })
                .await?
        }
        MembersCmd::Voters { ids } => {
            let req = cpb::ChangeMembershipRequest { voters: ids };
            client
                .admin(|mut a| {
                    let r = req.clone();
                    async move { a.change_membership(r).await }
                })
                .await?
        }
    };
    print_json(group_json(&st.into_inner()));
    Ok(())
}

pub async fn drain(target: Target, node: String, undo: bool) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    let req = cpb::DrainNodeRequest { id: node, undo };
    let n = client.drain_node(req).await?;
    print_json(node_json(&n));
    Ok(())
}

fn node_json(n: &cpb::NodeInfo) -> serde_json::Value {
    serde_json::json!({
        "id": n.id, "addr": n.addr, "replicas": n.replicas,
        "state": cpb::NodeState::try_from(n.state).map(|s| s.as_str_name()).unwrap_or("?")
            .trim_start_matches("NODE_STATE_").to_lowercase(),
        "zone": n.capacity.as_ref().map(|c| c.zone.clone()).unwrap_or_default(),
    })
}

pub async fn status(target: Target) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    let st = client.cluster_status(cpb::ClusterStatusRequest {}).await?;
    let nodes = client.list_nodes(cpb::ListNodesRequest {}).await?;
    // Replica reports (sequence numbers, lag) live in the leader's memory: ask it.
    let mut leader = if st.leader_api_addr.is_empty() {
        client.clone()
    } else {
        Client::new(vec![st.leader_api_addr.clone()])
    };
    let shards = leader
        .admin(|mut a| async move {
            a.list_shards(cpb::ListShardsRequest {
                collection: String::new(),
            })
            .await
        })
        .await?
        .into_inner();
    let ops = leader
        .list_operations(cpb::ListOperationsRequest::default())
        .await?;
    print_json(serde_json::json!({
        "coordinators": group_json(&st),
        "map_version": nodes.map_version,
        "nodes": nodes.nodes.iter().map(node_json).collect::<Vec<_>>(),
        "shards": shards.shards.iter().map(shard_json).collect::<Vec<_>>(),
        "operations_running": ops.operations.iter().filter(|o| o.state == "running")
            .map(operation_json).collect::<Vec<_>>(),
    }));
    Ok(())
}

fn operation_json(o: &cpb::Operation) -> serde_json::Value {
    let count = |state: &str| o.steps.iter().filter(|s| s.state == state).count();
    serde_json::json!({
        "id": o.id, "kind": o.kind, "collection": o.collection, "state": o.state,
        "reason": o.reason, "started_ms": o.started_ms,
        "backup": o.backup.as_ref().map(|b| serde_json::json!({"url": b.url, "backup": b.backup})),
        "build": o.build.map(|b| serde_json::json!({"nlist": b.nlist, "pq_m": b.pq_m,
                  "pq_nbits": b.pq_nbits, "train_sample": b.train_sample,
                  "rows_per_shard": b.rows_per_shard,
                  "rerank": Precision::from_wire(b.rerank).unwrap_or_default().name()})),
        "rebuild": o.rebuild.as_ref().map(|r| serde_json::json!({"phase": r.phase,
                  "nprobe": r.nprobe, "refine": r.refine, "gate_k": r.gate_k, "margin": r.margin})),
        "shards": {"total": o.steps.len(), "done": count("done"), "building": count("building"),
                   "queued": count("queued"), "pending": count("pending"), "failed": count("failed"),
                   "staged": count("staged")},
        "steps": o.steps.iter().map(|s| serde_json::json!({
            "shard": s.shard, "node": s.node, "state": s.state,
            "generation": s.generation, "reason": s.reason, "gate": s.gate,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Subcommand)]
pub enum OperationsCmd {
    /// Running operations and the last finished (per shard: pending, queued, building,
    /// done, failed).
    List {
        #[arg(long, default_value = "")]
        collection: String,
    },
    /// Ends a running operation (its shards' builds already running finish).
    Cancel {
        id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

pub async fn operations(target: Target, cmd: OperationsCmd) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    match cmd {
        OperationsCmd::List { collection } => {
            // Queued and building come from the replicas' reports, in the leader's memory.
            let st = client.cluster_status(cpb::ClusterStatusRequest {}).await?;
            let mut leader = if st.leader_api_addr.is_empty() {
                client
            } else {
                Client::new(vec![st.leader_api_addr])
            };
            let r = leader
                .list_operations(cpb::ListOperationsRequest { collection })
                .await?;
            print_json(serde_json::json!({
                "operations": r.operations.iter().map(operation_json).collect::<Vec<_>>(),
            }));
        }
        OperationsCmd::Cancel { id, reason } => {
            let o = client
                .cancel_operation(cpb::CancelOperationRequest { id, reason })
                .await?;
            print_json(operation_json(&o));
        }
    }
    Ok(())
}

/// A re-ranking precision as operators write it.
pub fn parse_rerank(s: &str) -> Result<Precision, String> {
    Precision::parse(s)
        .ok_or_else(|| format!("unknown re-ranking precision {s:?}: use f32, f16 or sq8"))
}

/// `shoal index build`: starts a collection's index build operation; with `--wait`,
/// follows it to its end.
pub async fn index_build(
    target: Target,
    collection: String,
    nlist: u32,
    train_sample: u64,
    rerank: Option<Precision>,
    wait: bool,
) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    let op = client
        .start_index_build(cpb::StartIndexBuildRequest {
            collection: collection.clone(),
            nlist,
            train_sample,
            rerank: rerank.map_or(0, Precision::wire),
        })
        .await?;
    follow_operation(&mut client, op, &collection, wait).await
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Makes a key and prints it once (the cluster keeps only its hash).
    Create {
        /// Who or what holds it (shown in listings and audit records).
        name: String,
        /// read, write or admin.
        #[arg(long, default_value = "read")]
        role: String,
        /// Limits the key to these collections (comma-separated); every one without.
        #[arg(long, value_delimiter = ',')]
        collections: Vec<String>,
    },
    /// Every key: id, name, role, collections (never a secret or a hash).
    List,
    /// Revokes a key by id: every process refuses it once its map holds the change.
    Revoke { id: String },
}

fn key_json(k: &cpb::ApiKey) -> serde_json::Value {
    serde_json::json!({
        "id": k.id, "name": k.name,
        "role": shoal_proto::auth::Role::from_wire(k.role).map_or("?", |r| r.name()),
        "collections": k.collections, "created_ms": k.created_ms,
    })
}

pub async fn keys(target: Target, cmd: KeysCmd) -> anyhow::Result<()> {
    let mut client = Client::new(target.coordinators);
    match cmd {
        KeysCmd::Create {
            name,
            role,
            collections,
        } => {
            let role = shoal_proto::auth::Role::parse(&role)
                .ok_or_else(|| anyhow::anyhow!("--role {role:?}: read, write or admin"))?;
            let r = client
                .create_key(cpb::CreateKeyRequest {
                    name,
                    role: role.wire(),
                    collections,
                })
                .await?;
            let mut j = r.info.as_ref().map(key_json).unwrap_or_default();
            j["key"] = serde_json::Value::String(r.key);
            print_json(j);
        }
        KeysCmd::List => {
            let r = client.list_keys(cpb::ListKeysRequest {}).await?;
            print_json(serde_json::json!(r
                .keys
                .iter()
                .map(key_json)
                .collect::<Vec<_>>()));
        }
        KeysCmd::Revoke { id } => {
            let k = client.revoke_key(cpb::RevokeKeyRequest { id }).await?;
            print_json(key_json(&k));
        }
    }
    Ok(())
}
