//! `shoal-bench scale` (issue 18): a seeded synthetic corpus through a local cluster of
//! processes, each figure next to its reference in the same run:
//! - the data: N × D float32 as `.npy` with 24-byte string ids in a sidecar (a Gaussian
//!   mixture: `--clusters` centres drawn N(0, 1), each row a centre plus N(0, σ²)
//!   noise, σ = `--noise`; queries drawn the same way, not in the corpus), written once
//!   and reused by later runs with the same parameters;
//! - import: `shoal import` (a process, `--concurrency` requests over every node) into a
//!   collection with automatic rebuilds off, vectors/s, next to one shard engine's own
//!   durable ingest of the same rows in the same batches from four threads;
//! - build: `shoal index-build --wait` (one cluster operation, every shard, parameters
//!   sized from the data), next to raw FAISS building each shard's rows with the same
//!   parameters one after another (the same work on the same cores), in alternating
//!   order when `--build-rounds` > 1;
//! - memory: the node processes' resident bytes per vector, over their idle baseline;
//! - quality and latency: recall@10 against exact (FAISS Flat over the corpus) at
//!   nprobe 1, 4, 16 through the cluster, next to raw FAISS IVF-PQ + exact re-ranking on
//!   the same shards with the same parameters merged the same way; p50/p99 at 1 and 4
//!   clients.
//!
//! - at RF ≥ 2: the time until every backup serves its primary's generation after the
//!   build (fetched, not trained); with `--restore`, a node SIGKILLed after the queries
//!   and the time until every shard is back at its replication factor (declared down,
//!   then copied), and the first queries on each restored copy, straight to its replica.
//!
//! The cluster is `shoal dev --no-model --insecure` under the work dir (its fixed ports:
//! nothing else may run one). The harness checks free space first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use faiss::index::autotune::ParameterSpace;
use faiss::Index;
use rand::{Rng, SeedableRng};
use shoal_engine::{CollectionConfig, Document, Metadata, Metric, Shard, WriteOp};
use shoal_eval::percentile;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;

use crate::measure::{recall_at, rss_of};

#[derive(Args)]
pub struct ScaleArgs {
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    #[arg(long, default_value_t = 4096)]
    clusters: usize,
    #[arg(long, default_value_t = 0.6)]
    noise: f32,
    #[arg(long, default_value_t = 20260101)]
    seed: u64,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 3)]
    shards: u32,
    #[arg(long, default_value_t = 1)]
    replication_factor: u32,
    /// Rows per import request, and requests in flight.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Rows the engine reference ingests (timed the same way).
    #[arg(long, default_value_t = 200_000)]
    engine_rows: u64,
    #[arg(long, default_value_t = 200)]
    queries: usize,
    #[arg(long, default_value_t = 1)]
    build_rounds: usize,
    /// Extra raw-FAISS peers trained on each shard's rows in other orders (the peer's
    /// own spread in recall).
    #[arg(long, default_value_t = 0)]
    peer_orders: usize,
    /// Query latency against shard count: collections of these shard counts, each
    /// with the first `--sweep-rows` rows (empty: no sweep).
    #[arg(long, value_delimiter = ',')]
    sweep_shards: Vec<u32>,
    #[arg(long, default_value_t = 1_000_000)]
    sweep_rows: u64,
    /// Import from Parquet (the same rows and ids, written once beside the .npy:
    /// `id`, `vector` as a fixed-size list of float32) instead of .npy + ids.
    #[arg(long)]
    parquet: bool,
    /// After the queries, SIGKILL the second node, drop the page cache, start it
    /// again and time it back to complete answers.
    #[arg(long)]
    restart: bool,
    /// After the queries, SIGKILL the last node and time the shards' return to their
    /// replication factor (needs --replication-factor 2 or more).
    #[arg(long)]
    restore: bool,
    /// After the queries, double the shard count online (`shoal collection split`)
    /// under query load (2 clients) and ingest load (one writer of new rows): the
    /// split's duration, failed and partial queries and failed writes, and query
    /// latency before, during and after (issue 19).
    #[arg(long)]
    split: bool,
    /// Seconds of load measured before and after the split (and the backup).
    #[arg(long, default_value_t = 15)]
    split_window: u64,
    /// After the queries, back the collection up into a directory repository under 2
    /// query clients (issue 20), back it up again (nothing changed: the incremental
    /// cost), copy the same shard directories with `cp -r` (the reference), and
    /// restore the backup as a new collection: throughput of each, query latency
    /// before, during and after the backup.
    #[arg(long)]
    backup: bool,
    /// After the queries, rebuild the collection online to other parameters (issue
    /// 21) under 2 query clients (the collection's own nprobe): the gate's figures, the
    /// time to the switch, query latency before, during and after, recall@10 before and
    /// after, the shard directories' bytes before, at their peak and after the commit.
    #[arg(long)]
    rebuild: bool,
    /// The rebuild's nlist and nprobe (0: twice the collection's).
    #[arg(long, default_value_t = 0)]
    rebuild_nlist: u32,
    #[arg(long, default_value_t = 0)]
    rebuild_nprobe: u32,
    /// Skip raw FAISS (its builds and its recall): for runs measuring the cluster
    /// alone (restart and restore at a size whose reference build would double the
    /// run); the build ratio and recall comparison come from runs without it.
    #[arg(long)]
    no_peer: bool,
    /// Data, the cluster and the reference shard go here.
    #[arg(long, default_value = "scale-work")]
    work_dir: PathBuf,
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// Row `i`'s id: 24 bytes.
fn id_of(i: u64) -> String {
    format!("doc-{i:020}")
}

fn row_of(id: &str) -> Option<i64> {
    id.strip_prefix("doc-")?.parse().ok()
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// The generator: centres, then row `i` from its own seed (any row can be made alone).
struct Gen {
    centres: Vec<f32>,
    dim: usize,
    noise: f32,
    seed: u64,
    clusters: usize,
}

impl Gen {
    fn new(a: &ScaleArgs) -> Gen {
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
        let centres = (0..a.clusters * a.dimension)
            .map(|_| normal(&mut rng))
            .collect();
        Gen {
            centres,
            dim: a.dimension,
            noise: a.noise,
            seed: a.seed,
            clusters: a.clusters,
        }
    }

    /// Row `i` (queries use rows past the corpus).
    fn row(&self, i: u64, out: &mut Vec<f32>) {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(self.seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let c = rng.random_range(0..self.clusters);
        let centre = &self.centres[c * self.dim..(c + 1) * self.dim];
        out.extend(centre.iter().map(|x| x + self.noise * normal(&mut rng)));
    }
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        bail!("statvfs {}", dir.display());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

fn shoal_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("shoal");
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p shoal",
            bin.display()
        );
    }
    Ok(bin)
}

/// Resident bytes of every `shoal node` process under `dir`: (anonymous, file-backed:
/// the mmapped vectors and segments).
fn nodes_rss(dir: &Path) -> (u64, u64) {
    let needle = dir.to_string_lossy().to_string();
    let (mut anon, mut file) = (0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" node ") && cmd.contains(&needle) {
            let (a, f) = rss_of(&p);
            anon += a;
            file += f;
        }
    }
    (anon, file)
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; `shoal dev` stops its processes on SIGTERM.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn shoal(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("SHOAL_INSECURE", "true").stdin(Stdio::null());
    c
}

fn last_json(out: &[u8]) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(out);
    let start = text.find('{').context("no JSON in the output")?;
    serde_json::from_str(&text[start..]).with_context(|| format!("parsing {}", &text[start..]))
}

pub fn run(a: ScaleArgs) -> Result<()> {
    std::fs::create_dir_all(&a.work_dir)?;
    let work = std::fs::canonicalize(&a.work_dir)?;
    let vector_bytes = a.rows * a.dimension as u64 * 4;
    // The file, the cluster's copies (1.23x the vectors on disk after checkpoints at
    // 1M: segments, records, the log; 1.5x for the log before one), the engine's
    // reference rows, and a margin.
    let need = vector_bytes * (2 + 3 * a.replication_factor as u64 + 2 * a.parquet as u64) / 2
        + a.engine_rows * a.dimension as u64 * 8
        + (4 << 30);
    let free = free_bytes(&work)?;
    if free < need {
        bail!(
            "{} has {free} bytes free; this run needs about {need} (--rows {} × {} dims)",
            work.display(),
            a.rows,
            a.dimension
        );
    }
    let bin = shoal_bin()?;
    let gen = Gen::new(&a);
    let tag = format!(
        "{}x{}-c{}-n{}-s{}",
        a.rows, a.dimension, a.clusters, a.noise, a.seed
    );
    let npy = work.join(format!("data-{tag}.npy"));
    let ids = work.join(format!("data-{tag}.ids"));
    if !npy.exists() || !ids.exists() {
        let t = Instant::now();
        let part = npy.with_extension("npy.part");
        shoal_cli::vectors::write_npy(&part, a.rows, a.dimension, |i, v| gen.row(i, v))?;
        std::fs::write(
            &ids,
            (0..a.rows).map(|i| id_of(i) + "\n").collect::<String>(),
        )?;
        std::fs::rename(&part, &npy)?;
        emit(
            serde_json::json!({"step": "generate", "rows": a.rows, "seconds": t.elapsed().as_secs_f64()}),
        );
    }
    let parquet = work.join(format!("data-{tag}.parquet"));
    if a.parquet && !parquet.exists() {
        let t = Instant::now();
        let part = parquet.with_extension("parquet.part.parquet");
        let rows = (0..a.rows).map(|i| {
            let mut vector = Vec::with_capacity(a.dimension);
            gen.row(i, &mut vector);
            shoal_cli::vectors::Row {
                id: id_of(i),
                vector,
                text: String::new(),
                metadata_json: String::new(),
            }
        });
        shoal_cli::write_parquet(&part, rows, a.dimension, true, 65_536)?;
        std::fs::rename(&part, &parquet)?;
        emit(
            serde_json::json!({"step": "generate_parquet", "rows": a.rows,
            "bytes": std::fs::metadata(&parquet)?.len(), "seconds": t.elapsed().as_secs_f64()}),
        );
    }
    // Mapped, not read: at 10M x 384 the file is 15 GB of a 24 GB machine.
    let file = std::fs::File::open(&npy)?;
    // SAFETY: the harness wrote the file and nothing changes it while it runs.
    let data = unsafe { memmap2::Mmap::map(&file)? };
    let offset = data.len() - vector_bytes as usize;
    let base: &[f32] = bytemuck_f32(&data[offset..]);

    // The engine's own durable ingest of the first rows, four writer threads.
    let engine = engine_ingest(&a, base, &work)?;
    emit(engine.clone());

    // The cluster.
    let dev_dir = work.join("dev");
    let _ = std::fs::remove_dir_all(&dev_dir);
    let log = std::fs::File::create(work.join("dev.log"))?;
    let dev = Dev(shoal(&bin)
        .args([
            "dev",
            "--no-model",
            "--keep-going",
            "--nodes",
            &a.nodes.to_string(),
            "--data-dir",
        ])
        .arg(&dev_dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?);
    let nodes: Vec<String> = (0..a.nodes)
        .map(|i| format!("127.0.0.1:{}", 7201 + i))
        .collect();
    let coords = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let name = "scale";
    rt.block_on(async {
        let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
        c.patience = Duration::from_secs(60);
        let t = Instant::now();
        loop {
            let up = c
                .list_nodes(cpb::ListNodesRequest {})
                .await
                .map(|r| {
                    r.nodes
                        .iter()
                        .filter(|n| n.state == cpb::NodeState::Up as i32)
                        .count()
                })
                .unwrap_or(0);
            if up == a.nodes {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the dev cluster did not come up (see {}/dev.log)",
                    work.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.create_collection(cpb::CreateCollectionRequest {
            name: name.into(),
            dimension: a.dimension as u32,
            metric: cpb::Metric::L2 as i32,
            shard_count: a.shards,
            replication_factor: a.replication_factor,
            ..Default::default()
        })
        .await?;
        c.set_collection_policy(cpb::SetCollectionPolicyRequest {
            name: name.into(),
            auto_rebuild_rows: Some(0),
            payload_fields: Vec::new(),
        })
        .await?;
        anyhow::Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = nodes_rss(&dev_dir);

    // Import.
    let mut import = shoal(&bin);
    import.arg("import");
    if a.parquet {
        import.arg(&parquet);
    } else {
        import.arg(&npy).arg("--ids").arg(&ids);
    }
    let out = import
        .args([
            "--collection",
            name,
            "--batch",
            &a.batch.to_string(),
            "--concurrency",
        ])
        .arg(a.concurrency.to_string())
        .args(["--gateways", &nodes.join(","), "--restart"])
        .env("SHOAL_COORDINATORS", coords)
        .env("SHOAL_NODE", &nodes[0])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("shoal import failed");
    }
    let import = last_json(&out.stdout)?;
    let import_rate = import["vectors_per_s"].as_f64().unwrap_or(0.0);
    let engine_rate = engine["vectors_per_s"].as_f64().unwrap_or(1.0);
    emit(serde_json::json!({
        "step": "import", "format": if a.parquet { "parquet" } else { "npy" },
        "rows": import["rows"], "seconds": import["seconds"],
        "cluster_vectors_per_s": import_rate, "engine_vectors_per_s": engine_rate,
        "cluster_vs_engine": import_rate / engine_rate,
    }));

    // The primaries' reports (heartbeats) size the build: wait until they hold
    // every row.
    rt.block_on(async {
        // Reports live in the leader's memory: the most any member shows.
        let t = Instant::now();
        loop {
            let mut live = 0u64;
            for addr in coords.split(',') {
                let mut c = shoal_proto::client::Client::new([addr.to_string()]);
                c.patience = Duration::from_millis(500);
                live = live.max(
                    c.list_shards(cpb::ListShardsRequest {
                        collection: name.into(),
                    })
                    .await
                    .map(|r| {
                        r.shards
                            .iter()
                            .filter_map(|s| s.replicas.iter().find(|x| x.node_id == s.primary))
                            .map(|x| x.live_docs)
                            .sum()
                    })
                    .unwrap_or(0),
                );
            }
            if live >= a.rows || t.elapsed() > Duration::from_secs(30) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // Rows per shard, as the cluster routes them.
    let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); a.shards as usize];
    for i in 0..a.rows {
        by_shard[shoal_node::cluster::gateway::shard_of(&id_of(i), a.shards) as usize].push(i);
    }

    // Build: the cluster operation, and raw FAISS on the same shards, alternating.
    let mut cluster_s = Vec::new();
    let mut faiss_s = Vec::new();
    let mut params = serde_json::Value::Null;
    let mut peers = Vec::new();
    // The generation the cluster's last build made: the peer trains on the sample the
    // engine draws for it (`training_sample`: keyed by the collection's seed, the
    // generation and the documents' ids, so the same vectors in the same order).
    let mut generation = 0;
    for round in 0..a.build_rounds {
        let cluster_first = round % 2 == 0;
        for turn in 0..2 {
            if a.no_peer && (turn == 0) != cluster_first {
                continue;
            }
            if (turn == 0) == cluster_first {
                let t = Instant::now();
                let out = shoal(&bin)
                    .args(["index-build", name, "--wait"])
                    .env("SHOAL_COORDINATORS", coords)
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "index build failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                cluster_s.push(t.elapsed().as_secs_f64());
                params = last_json(&out.stdout)?["build"].clone();
                generation = rt.block_on(primary_generation(coords, name))?;
            } else {
                if params.is_null() {
                    // Sized as the cluster sizes them (the largest shard).
                    let rows = by_shard.iter().map(|s| s.len()).max().unwrap_or(0) as u64;
                    let (nlist, sample) = shoal_proto::sizing::size_index(rows, 0);
                    let d = shoal_engine::CollectionConfig::new(a.dimension, Metric::L2).index;
                    params = serde_json::json!({"nlist": nlist, "pq_m": d.m, "pq_nbits": d.nbits,
                        "train_sample": (39 * nlist as u64).max(65_536.min(rows))});
                    let _ = sample;
                }
                let t = Instant::now();
                // Before the cluster's build of this round: the one it will make.
                let g = generation + u64::from(!cluster_first);
                peers = by_shard
                    .iter()
                    .map(|rows| faiss_shard(&a, base, rows, &params, g))
                    .collect::<Result<Vec<_>>>()?;
                faiss_s.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let (cs, fs) = (mean(&cluster_s), mean(&faiss_s));
    emit(serde_json::json!({
        "step": "build", "params": params, "shards": a.shards, "rounds": a.build_rounds,
        "cluster_s": cluster_s, "faiss_s": faiss_s, "cluster_vs_faiss": cs / fs,
    }));
    if a.replication_factor >= 2 {
        // The operation ends with the primaries' generations; the backups then fetch
        // theirs.
        let t = Instant::now();
        let all = rt.block_on(every_replica_serving(coords, name))?;
        emit(serde_json::json!({
            "step": "backups_serving", "after_build_s": t.elapsed().as_secs_f64(),
            "replicas": all,
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (anon, file) = nodes_rss(&dev_dir);
    let copies = (a.rows * a.replication_factor as u64) as f64;
    let anon_per_vector = anon.saturating_sub(idle_rss.0) as f64 / copies;
    emit(serde_json::json!({
        "step": "memory", "nodes_rss_anon_bytes": anon, "nodes_rss_file_bytes": file,
        "idle_rss_anon_bytes": idle_rss.0,
        "anon_bytes_per_vector": anon_per_vector,
        "file_bytes_per_vector": file.saturating_sub(idle_rss.1) as f64 / copies,
    }));

    // Quality: exact top 10 by FAISS Flat over the corpus.
    let nq = a.queries;
    let mut queries = Vec::with_capacity(nq * a.dimension);
    for q in 0..nq as u64 {
        gen.row(a.rows + 1_000_000_000 + q, &mut queries);
    }
    let truth = exact_top10(base, a.dimension, &queries)?;
    let refine = 10usize; // the collection's default refine for this dimension
    let mut quality = Vec::new();
    // The cluster's exact search checks ids, routing and the merge (recall 1 expected);
    // nprobe = nlist isolates PQ and re-ranking from the coarse quantizer's training.
    let (exact_ids, retries) = rt.block_on(cluster_exact(&nodes, name, &queries, a.dimension))?;
    let exact_recall = recall_at(10, &exact_ids, &truth[..exact_ids.len()]);
    emit(
        serde_json::json!({"step": "exact", "queries": exact_ids.len(),
        "recall_at_10": exact_recall, "retried_past_deadline": retries}),
    );
    let nlist = params["nlist"].as_u64().unwrap_or(16) as u32;
    for nprobe in [1u32, 4, 16, nlist] {
        // Raw FAISS: each shard's IVF-PQ + exact re-rank, merged by distance.
        let faiss_recall = (!a.no_peer).then(|| {
            recall_at(
                10,
                &peer_ids(&mut peers, &by_shard, base, &queries, nprobe, refine),
                &truth,
            )
        });
        for clients in [1usize, 4] {
            let (ids, lat) = rt.block_on(cluster_queries(
                &nodes,
                name,
                &queries,
                a.dimension,
                nprobe,
                clients,
            ))?;
            let recall = recall_at(10, &ids, &truth);
            let v = serde_json::json!({
                "step": "quality", "nprobe": nprobe, "clients": clients,
                "recall_at_10": recall, "faiss_recall_at_10": faiss_recall,
                "recall_diff": faiss_recall.map(|f| recall - f),
                "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
            });
            emit(v.clone());
            quality.push(v);
        }
    }
    // The peer's own spread: the same shards trained on other samples of their rows
    // (other generations' samples: what k-means variance alone moves recall by).
    for order in 1..=a.peer_orders {
        let mut p = by_shard
            .iter()
            .map(|rows| faiss_shard(&a, base, rows, &params, generation + 1000 * order as u64))
            .collect::<Result<Vec<_>>>()?;
        let recalls: Vec<f64> = [1u32, 4, 16]
            .iter()
            .map(|&np| {
                recall_at(
                    10,
                    &peer_ids(&mut p, &by_shard, base, &queries, np, refine),
                    &truth,
                )
            })
            .collect();
        emit(serde_json::json!({"step": "peer_order", "sample": order,
            "faiss_recall_at_10_nprobe_1_4_16": recalls}));
    }
    let split = if a.split {
        let v = rt.block_on(split_under_load(&a, &gen, coords, &nodes, name, &queries))?;
        emit(v.clone());
        v
    } else {
        serde_json::Value::Null
    };
    let backup = if a.backup {
        let v = rt.block_on(backup_under_load(
            &a, coords, &nodes, name, &queries, &dev_dir, &work,
        ))?;
        emit(v.clone());
        v
    } else {
        serde_json::Value::Null
    };
    let rebuild = if a.rebuild {
        let v = rt.block_on(rebuild_under_load(
            &a, coords, &nodes, name, &queries, &truth, &dev_dir, nlist,
        ))?;
        emit(v.clone());
        v
    } else {
        serde_json::Value::Null
    };
    let mut restarted = None;
    let restart = if a.restart {
        let (v, child) = rt.block_on(restart_node(coords, name, &dev_dir, &nodes[1]))?;
        restarted = Some(Dev(child));
        emit(v.clone());
        v
    } else {
        serde_json::Value::Null
    };
    let restore = if a.restore {
        let v = rt.block_on(restore_after_node_loss(
            coords,
            name,
            &dev_dir,
            nodes.last().expect("a node"),
            a.replication_factor as usize,
            &queries,
            a.dimension,
        ))?;
        emit(v.clone());
        v
    } else {
        serde_json::Value::Null
    };
    let mut sweep = Vec::new();
    for &shards in &a.sweep_shards {
        let v = shard_sweep(&a, &bin, &rt, &npy, &ids, &nodes, coords, &queries, shards)?;
        emit(v.clone());
        sweep.push(v);
    }
    drop(restarted);
    drop(dev);
    emit(serde_json::json!({
        "bench": "scale", "shard_sweep": sweep, "rows": a.rows, "dimension": a.dimension, "clusters": a.clusters,
        "noise": a.noise, "seed": a.seed, "nodes": a.nodes, "shards": a.shards,
        "replication_factor": a.replication_factor,
        "import_vectors_per_s": import_rate, "engine_vectors_per_s": engine_rate,
        "import_vs_engine": import_rate / engine_rate,
        "build_params": params, "build_cluster_s": cs, "build_faiss_s": fs, "build_cluster_vs_faiss": cs / fs,
        "anon_bytes_per_vector": anon_per_vector,
        "quality": quality, "restart": restart, "restore": restore, "split": split, "backup": backup,
        "rebuild": rebuild,
    }));
    Ok(())
}

/// One point of the shard-count sweep: a collection of `shards` shards holding the
/// first `--sweep-rows` rows, built, then queried at nprobe 4 by 1 and 4 clients.
#[allow(clippy::too_many_arguments)]
fn shard_sweep(
    a: &ScaleArgs,
    bin: &Path,
    rt: &tokio::runtime::Runtime,
    npy: &Path,
    ids: &Path,
    nodes: &[String],
    coords: &str,
    queries: &[f32],
    shards: u32,
) -> Result<serde_json::Value> {
    let name = format!("sweep-{shards}");
    let rows = a.sweep_rows.min(a.rows);
    rt.block_on(async {
        let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
        c.create_collection(cpb::CreateCollectionRequest {
            name: name.clone(),
            dimension: a.dimension as u32,
            metric: cpb::Metric::L2 as i32,
            shard_count: shards,
            replication_factor: 1,
            ..Default::default()
        })
        .await?;
        c.set_collection_policy(cpb::SetCollectionPolicyRequest {
            name: name.clone(),
            auto_rebuild_rows: Some(0),
            payload_fields: Vec::new(),
        })
        .await?;
        anyhow::Ok(())
    })?;
    let progress = a.work_dir.join(format!("{name}.progress"));
    let out = shoal(bin)
        .arg("import")
        .arg(npy)
        .arg("--ids")
        .arg(ids)
        .args([
            "--collection",
            &name,
            "--limit",
            &rows.to_string(),
            "--restart",
        ])
        .args([
            "--concurrency",
            &a.concurrency.to_string(),
            "--gateways",
            &nodes.join(","),
        ])
        .arg("--progress-file")
        .arg(&progress)
        .env("SHOAL_COORDINATORS", coords)
        .env("SHOAL_NODE", &nodes[0])
        .output()?;
    if !out.status.success() {
        bail!("sweep import: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Sized by the reports: wait for them (as the main run does).
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let out = shoal(bin)
        .args(["index-build", &name, "--wait"])
        .env("SHOAL_COORDINATORS", coords)
        .output()?;
    if !out.status.success() {
        bail!("sweep build: {}", String::from_utf8_lossy(&out.stderr));
    }
    let build_s = t.elapsed().as_secs_f64();
    let params = last_json(&out.stdout)?["build"].clone();
    let q = &queries[..(200 * a.dimension).min(queries.len())];
    let mut points = Vec::new();
    for clients in [1usize, 4] {
        let t = Instant::now();
        let (_, lat) = rt.block_on(cluster_queries(nodes, &name, q, a.dimension, 4, clients))?;
        let secs = t.elapsed().as_secs_f64();
        points.push(serde_json::json!({
            "clients": clients, "qps": lat.len() as f64 / secs,
            "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
        }));
    }
    rt.block_on(async {
        let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
        c.drop_collection(cpb::DropCollectionRequest { name: name.clone() })
            .await
    })?;
    Ok(serde_json::json!({
        "step": "shard_sweep", "shards": shards, "rows": rows, "build_s": build_s,
        "params": params, "nprobe": 4, "latency": points,
    }))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn bytemuck_f32(b: &[u8]) -> &[f32] {
    assert_eq!(
        b.as_ptr() as usize % 4,
        0,
        "the .npy data is 4-byte aligned"
    );
    // SAFETY: f32 has no invalid bit patterns; length and alignment checked.
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
}

/// The exact top 10 per query over the whole corpus, by FAISS Flat a million rows at a
/// time (a Flat index copies what it holds: the corpus at once would not fit at 10M).
fn exact_top10(base: &[f32], dim: usize, queries: &[f32]) -> Result<Vec<Vec<i64>>> {
    const CHUNK_ROWS: usize = 1_000_000;
    let nq = queries.len() / dim;
    let mut best: Vec<Vec<(f32, i64)>> = vec![Vec::new(); nq];
    for (c, chunk) in base.chunks(CHUNK_ROWS * dim).enumerate() {
        let mut flat = faiss::index_factory(dim as u32, "Flat", faiss::MetricType::L2)?;
        flat.add(chunk)?;
        let r = flat.search(queries, 10)?;
        for (q, hits) in best.iter_mut().enumerate() {
            for i in q * 10..(q + 1) * 10 {
                if let Some(l) = r.labels[i].get() {
                    hits.push((r.distances[i], (c * CHUNK_ROWS) as i64 + l as i64));
                }
            }
            hits.sort_by(|x, y| x.0.total_cmp(&y.0));
            hits.truncate(10);
        }
    }
    Ok(best
        .into_iter()
        .map(|h| h.into_iter().map(|(_, i)| i).collect())
        .collect())
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Raw FAISS's top 10 per query: each shard's IVF-PQ gives k x refine candidates,
/// re-ranked exactly against the full vectors (as generate-rank does; the vectors are
/// read from the mapped corpus, not copied into an RFlat layer, which at 10M would hold
/// the corpus in memory), merged by distance; `rows[s][i]` is the corpus row of shard
/// s's i-th added vector.
fn peer_ids(
    peers: &mut [faiss::index::IndexImpl],
    rows: &[Vec<u64>],
    base: &[f32],
    queries: &[f32],
    nprobe: u32,
    refine: usize,
) -> Vec<Vec<i64>> {
    let dim = peers.first().map_or(1, |p| p.d() as usize);
    for index in peers.iter_mut() {
        let ps = ParameterSpace::new().expect("parameter space");
        ps.set_index_parameter(&*index, "nprobe", nprobe as f64)
            .expect("nprobe");
    }
    (0..queries.len() / dim)
        .map(|q| {
            let query = &queries[q * dim..(q + 1) * dim];
            let mut all: Vec<(f32, i64)> = Vec::new();
            for (s, index) in peers.iter_mut().enumerate() {
                let r = index.search(query, 10 * refine).expect("search");
                let mut shard: Vec<(f32, i64)> = r
                    .labels
                    .iter()
                    .filter_map(|l| l.get())
                    .map(|v| {
                        let row = rows[s][v as usize] as usize;
                        (l2(query, &base[row * dim..(row + 1) * dim]), row as i64)
                    })
                    .collect();
                shard.sort_by(|x, y| x.0.total_cmp(&y.0));
                all.extend(shard.into_iter().take(10));
            }
            all.sort_by(|x, y| x.0.total_cmp(&y.0));
            all.into_iter().take(10).map(|(_, i)| i).collect()
        })
        .collect()
}

/// Raw FAISS on one shard's rows with the cluster's parameters: IVF-PQ (re-ranked by
/// [`peer_ids`], as generate-rank does), the same training sample size and all cores.
fn faiss_shard(
    a: &ScaleArgs,
    base: &[f32],
    rows: &[u64],
    params: &serde_json::Value,
    generation: u64,
) -> Result<faiss::index::IndexImpl> {
    let d = a.dimension;
    let nlist = params["nlist"].as_u64().unwrap_or(1);
    let (m, nbits) = (
        params["pq_m"].as_u64().unwrap_or(8),
        params["pq_nbits"].as_u64().unwrap_or(8),
    );
    let sample = params["train_sample"]
        .as_u64()
        .unwrap_or(65_536)
        .min(rows.len() as u64) as usize;
    let factory = format!("IVF{nlist},PQ{m}x{nbits}np");
    let mut index = faiss::index_factory(d as u32, &factory, faiss::MetricType::L2)?;
    let seed = shoal_engine::CollectionConfig::new(d, Metric::L2).seed;
    let ids: Vec<String> = rows.iter().map(|&r| id_of(r)).collect();
    let picked = shoal_engine::training_sample(seed, generation, rows.len(), |i| &ids[i], sample);
    drop(ids);
    let mut train = Vec::with_capacity(picked.len() * d);
    for p in picked {
        let r = rows[p] as usize;
        train.extend_from_slice(&base[r * d..(r + 1) * d]);
    }
    index.train(&train)?;
    drop(train);
    for chunk in rows.chunks(65_536) {
        let mut v = Vec::with_capacity(chunk.len() * d);
        for &r in chunk {
            let r = r as usize;
            v.extend_from_slice(&base[r * d..(r + 1) * d]);
        }
        index.add(&v)?;
    }
    Ok(index)
}

fn engine_ingest(a: &ScaleArgs, base: &[f32], work: &Path) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir_in(work)?;
    let mut cfg = CollectionConfig::new(a.dimension, Metric::L2);
    cfg.auto_rebuild_tail = 0;
    let shard = Shard::create(dir.path(), cfg)?;
    let rows = a.engine_rows.min(a.rows);
    let batches: Vec<u64> = (0..rows).step_by(a.batch).collect();
    let d = a.dimension;
    // SAFETY: sync(2) takes no arguments (the previous phase's writeback stays out).
    unsafe { libc::sync() };
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..4 {
            let (shard, batches) = (&shard, &batches);
            s.spawn(move || -> Result<()> {
                for (n, &first) in batches.iter().enumerate().skip(w).step_by(4) {
                    let ops = (first..(first + a.batch as u64).min(rows))
                        .map(|i| {
                            let i = i as usize;
                            WriteOp::Upsert(Document {
                                id: id_of(i as u64),
                                text: None,
                                metadata: Metadata::none(),
                                vector: base[i * d..(i + 1) * d].to_vec(),
                            })
                        })
                        .collect();
                    shard.write_as(ops, 1, &format!("b{n}"))?;
                }
                Ok(())
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "step": "engine_ingest", "rows": rows, "seconds": secs, "vectors_per_s": rows as f64 / secs,
        "writers": 4, "batch": a.batch,
    }))
}

/// Exact search through the cluster (every stored vector scored).
async fn cluster_exact(
    nodes: &[String],
    name: &str,
    queries: &[f32],
    dim: usize,
) -> Result<(Vec<Vec<i64>>, usize)> {
    let nq = (queries.len() / dim).min(100);
    let ch = shoal_proto::channel(&nodes[0], None)?;
    let mut g = shoal_proto::auth::shoal_client(ch).max_decoding_message_size(64 << 20);
    let mut out = Vec::new();
    let mut retries = 0;
    for q in 0..nq {
        let request = pb::SearchRequest {
            collection: name.into(),
            vector: queries[q * dim..(q + 1) * dim].to_vec(),
            k: 10,
            exact: true,
            ..Default::default()
        };
        // A scan of every stored vector from a cold page cache (at 10M, after the
        // harness's own exact pass and the peer's builds evicted the nodes' vectors)
        // can pass the nodes' 5 s search deadline; the scans that missed it still
        // warm the cache, so the same query is asked again, and the retries reported.
        let r = loop {
            match g.search(request.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(e)
                    if retries < 20
                        && matches!(
                            e.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ) =>
                {
                    retries += 1;
                    eprintln!("scale: exact query {q} retried: {}", e.message());
                }
                Err(e) => return Err(e.into()),
            }
        };
        out.push(r.hits.iter().filter_map(|h| row_of(&h.id)).collect());
    }
    Ok((out, retries))
}

async fn cluster_queries(
    nodes: &[String],
    name: &str,
    queries: &[f32],
    dim: usize,
    nprobe: u32,
    clients: usize,
) -> Result<(Vec<Vec<i64>>, Vec<f64>)> {
    let nq = queries.len() / dim;
    let tasks = (0..clients).map(|c| {
        let addr = nodes[c % nodes.len()].clone();
        async move {
            let ch = shoal_proto::channel(&addr, None)?;
            let mut g = shoal_proto::auth::shoal_client(ch).max_decoding_message_size(64 << 20);
            let mut out = Vec::new();
            for q in (c..nq).step_by(clients) {
                let t = Instant::now();
                let r = g
                    .search(pb::SearchRequest {
                        collection: name.into(),
                        vector: queries[q * dim..(q + 1) * dim].to_vec(),
                        k: 10,
                        nprobe,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if r.partial {
                    bail!("a partial answer: {:?}", r.missing_shards);
                }
                out.push((
                    q,
                    r.hits
                        .iter()
                        .filter_map(|h| row_of(&h.id))
                        .collect::<Vec<_>>(),
                    ms,
                ));
            }
            anyhow::Ok(out)
        }
    });
    let mut all = Vec::new();
    for r in futures::future::join_all(tasks).await {
        all.extend(r?);
    }
    all.sort_by_key(|x| x.0);
    let mut lat: Vec<f64> = all.iter().map(|x| x.2).collect();
    lat.sort_by(f64::total_cmp);
    Ok((all.into_iter().map(|x| x.1).collect(), lat))
}

/// The replica of `s` its primary holds, as the map lists it.
fn primary_replica(s: &cpb::Shard) -> Option<&cpb::Replica> {
    s.replicas.iter().find(|r| r.node_id == s.primary)
}

/// The generation every shard's primary of `name` serves (they build together, so
/// one number; an error when they differ).
async fn primary_generation(coords: &str, name: &str) -> Result<u64> {
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    let shards = c
        .list_shards(cpb::ListShardsRequest {
            collection: name.into(),
        })
        .await?
        .shards;
    let gens: std::collections::BTreeSet<u64> = shards
        .iter()
        .map(|s| primary_replica(s).map_or(0, |r| r.serving_generation))
        .collect();
    match gens.into_iter().collect::<Vec<_>>()[..] {
        [g] if g > 0 => Ok(g),
        ref g => bail!("the primaries of {name} serve generations {g:?}"),
    }
}

/// Waits until every replica of `name` serves its primary's generation; returns how
/// many replicas that is.
async fn every_replica_serving(coords: &str, name: &str) -> Result<usize> {
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    let t = Instant::now();
    loop {
        let shards = c
            .list_shards(cpb::ListShardsRequest {
                collection: name.into(),
            })
            .await?
            .shards;
        let serving = |s: &cpb::Shard| {
            let primary = primary_replica(s).map_or(0, |r| r.serving_generation);
            primary > 0 && s.replicas.iter().all(|r| r.serving_generation == primary)
        };
        if shards.iter().all(serving) {
            return Ok(shards.iter().map(|s| s.replicas.len()).sum());
        }
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("backups not serving their primaries' generations: {shards:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGKILLs the node serving `public` (one of `dev`'s), times the coordinators'
/// verdict and every shard's return to `rf` serving, caught-up replicas on nodes that
/// are up, then sends the first queries to each restored copy's replica directly.
async fn restore_after_node_loss(
    coords: &str,
    name: &str,
    dev: &Path,
    public: &str,
    rf: usize,
    queries: &[f32],
    dim: usize,
) -> Result<serde_json::Value> {
    use shoal_proto::replica as rpb;
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    let placed = |shards: &[cpb::Shard]| -> std::collections::HashSet<(u32, String)> {
        shards
            .iter()
            .flat_map(|s| s.replicas.iter().map(|r| (s.index, r.node_id.clone())))
            .collect()
    };
    let shards = |c: &mut shoal_proto::client::Client| {
        let mut c = c.clone();
        async move {
            c.list_shards(cpb::ListShardsRequest {
                collection: name.into(),
            })
            .await
            .map(|r| r.shards)
        }
    };
    let before = placed(&shards(&mut c).await?);
    let (pid, id, _) = node_process(dev, public)?;
    // SAFETY: kill(2) on a process this harness's cluster started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    let mut declared_down = None;
    let restored = loop {
        let nodes = c.list_nodes(cpb::ListNodesRequest {}).await?.nodes;
        let up: Vec<&str> = nodes
            .iter()
            .filter(|n| n.state == cpb::NodeState::Up as i32)
            .map(|n| n.id.as_str())
            .collect();
        if declared_down.is_none()
            && nodes
                .iter()
                .any(|n| n.id == id && n.state == cpb::NodeState::Down as i32)
        {
            declared_down = Some(t.elapsed().as_secs_f64());
        }
        let now = shards(&mut c).await?;
        let whole = now.iter().all(|s| {
            s.replicas
                .iter()
                .filter(|r| {
                    r.state == cpb::ReplicaState::Serving as i32
                        && up.contains(&r.node_id.as_str())
                        && r.lag == 0
                })
                .count()
                >= rf
        });
        if declared_down.is_some() && whole {
            break (t.elapsed().as_secs_f64(), now, nodes);
        }
        if t.elapsed() > Duration::from_secs(3 * 3600) {
            bail!("not back at RF {rf}: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (restored_s, now, nodes) = restored;
    // Back at RF, then serving by IVF-PQ: a snapshot carries the primary's index; a
    // copy filled from the recent log fetches it once caught up.
    let indexed_s = tokio::time::timeout(
        Duration::from_secs(300),
        every_replica_serving(coords, name),
    )
    .await
    .ok()
    .transpose()?
    .map(|_| t.elapsed().as_secs_f64());
    let collection_id = c
        .describe_collection(cpb::DescribeCollectionRequest { name: name.into() })
        .await?
        .collection
        .map_or(0, |x| x.id);
    // Each new copy: its first queries, straight to its replica.
    let mut copies = Vec::new();
    for (index, node) in placed(&now).difference(&before) {
        let addr = &nodes
            .iter()
            .find(|n| &n.id == node)
            .context("the copy's node")?
            .addr;
        let ch = shoal_proto::channel(addr, None)?;
        let mut r = rpb::replica_client::ReplicaClient::new(ch);
        let mut lat = Vec::new();
        let mut generation = 0;
        for q in 0..(queries.len() / dim).min(200) {
            let t = Instant::now();
            let a = r
                .search(rpb::ShardSearchRequest {
                    model: String::new(),
                    shard: Some(cpb::ShardId {
                        collection: name.into(),
                        collection_id,
                        index: *index,
                    }),
                    vector: queries[q * dim..(q + 1) * dim].to_vec(),
                    k: 10,
                    nprobe: 4,
                    ..Default::default()
                })
                .await?
                .into_inner();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            generation = a.generation;
        }
        let first = lat[0];
        lat.sort_by(f64::total_cmp);
        copies.push(serde_json::json!({
            "shard": index, "node": node, "generation": generation,
            "first_query_ms": first, "p50_ms": percentile(&lat, 0.5),
        }));
    }
    Ok(serde_json::json!({
        "step": "restore", "killed": id, "declared_down_s": declared_down,
        "restored_s": restored_s, "indexed_s": indexed_s, "copies": copies,
    }))
}

/// The `shoal node` process of `dev`'s cluster serving `public`: (pid, node id, argv).
fn node_process(dev: &Path, public: &str) -> Result<(i32, String, Vec<String>)> {
    let needle = dev.to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let arg = |name: &str| {
            argv.iter()
                .position(|a| a == name)
                .and_then(|i| argv.get(i + 1))
                .cloned()
        };
        if argv.get(1).map(String::as_str) == Some("node")
            && argv.iter().any(|a| a.contains(&needle))
            && arg("--listen").as_deref() == Some(public)
        {
            let pid: i32 = e.file_name().to_string_lossy().parse()?;
            let id = arg("--id").context("the node's --id")?;
            return Ok((pid, id, argv));
        }
    }
    bail!("no node process listening on {public}")
}

/// SIGKILLs the node serving `public`, drops the page cache, starts it again with the
/// same arguments and times it back to complete answers: its replicas serving and
/// caught up in the map, and a search through it answering from every shard.
async fn restart_node(
    coords: &str,
    name: &str,
    dev: &Path,
    public: &str,
) -> Result<(serde_json::Value, Child)> {
    let (pid, id, argv) = node_process(dev, public)?;
    // SAFETY: kill(2) on a process this harness's cluster started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while Path::new(&format!("/proc/{pid}")).exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A cold start: nothing of the node's files left in the page cache.
    let _ = Command::new("sync").status();
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let log = dev.join("logs").join(format!("{id}.restarted.log"));
    let f = std::fs::File::create(&log)?;
    let t = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("SHOAL_INSECURE", "true")
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()?;
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    let dim_probe = c
        .describe_collection(cpb::DescribeCollectionRequest { name: name.into() })
        .await?
        .collection
        .map_or(0, |x| x.dimension as usize);
    let mut up_s = None;
    loop {
        if up_s.is_none() {
            let nodes = c.list_nodes(cpb::ListNodesRequest {}).await?.nodes;
            if nodes
                .iter()
                .any(|n| n.id == id && n.state == cpb::NodeState::Up as i32)
            {
                up_s = Some(t.elapsed().as_secs_f64());
            }
        }
        let shards = c
            .list_shards(cpb::ListShardsRequest {
                collection: name.into(),
            })
            .await?
            .shards;
        let caught_up = shards.iter().all(|s| {
            s.replicas
                .iter()
                .filter(|r| r.node_id == id)
                .all(|r| r.state == cpb::ReplicaState::Serving as i32 && r.lag == 0 && r.caught_up)
        });
        if up_s.is_some() && caught_up {
            let answered = async {
                let ch = shoal_proto::channel(public, None)?;
                let mut g = shoal_proto::auth::shoal_client(ch);
                let r = g
                    .search(pb::SearchRequest {
                        collection: name.into(),
                        vector: vec![0.0; dim_probe],
                        k: 10,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::Ok(!r.partial && !r.hits.is_empty())
            }
            .await
            .unwrap_or(false);
            if answered {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("{id} not back within an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = serde_json::json!({
        "step": "restart", "node": id, "cold_page_cache": cold,
        "up_s": up_s, "complete_answers_s": t.elapsed().as_secs_f64(),
    });
    Ok((v, child))
}

/// One load phase's query outcomes: latencies of complete answers (ms), partial
/// answers, failed queries.
#[derive(Default)]
pub(crate) struct Phase {
    lat: Vec<f64>,
    partial: u64,
    failed: u64,
}

impl Phase {
    pub(crate) fn json(mut self) -> serde_json::Value {
        self.lat.sort_by(f64::total_cmp);
        serde_json::json!({"queries": self.lat.len() as u64 + self.partial + self.failed,
            "complete": self.lat.len(), "partial": self.partial, "failed": self.failed,
            "p50_ms": percentile(&self.lat, 0.5), "p99_ms": percentile(&self.lat, 0.99)})
    }
}

/// What the load clients ask: stored vectors (flat, of `dim`), or texts the gateway
/// encodes (issue 21's re-embed changes the model under them).
#[derive(Clone, Copy)]
pub(crate) enum Queries<'a> {
    Vectors(&'a [f32], usize),
    Texts(&'a [String]),
}

impl Queries<'_> {
    /// Each query as (vector, text), one of them empty.
    fn each(self) -> Vec<(Vec<f32>, String)> {
        match self {
            Queries::Vectors(flat, dim) => flat
                .chunks_exact(dim)
                .map(|v| (v.to_vec(), String::new()))
                .collect(),
            Queries::Texts(texts) => texts.iter().map(|t| (Vec::new(), t.clone())).collect(),
        }
    }
}

/// The load phases' query clients: 2 closed-loop clients (k 10, `nprobe`; 0: the collection's) until
/// `stop`, each query counted in the phase (0, 1, 2) it ended in.
pub(crate) fn query_clients(
    nodes: &[String],
    name: &str,
    queries: Queries<'_>,
    nprobe: u32,
    phase: &std::sync::Arc<std::sync::atomic::AtomicU8>,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Result<[Phase; 3]>>> {
    use std::sync::atomic::Ordering;
    let qs = std::sync::Arc::new(queries.each());
    let mut clients = Vec::new();
    for c in 0..2usize {
        let (addr, phase, stop) = (nodes[c % nodes.len()].clone(), phase.clone(), stop.clone());
        let qs = qs.clone();
        let name = name.to_string();
        clients.push(tokio::spawn(async move {
            let ch = shoal_proto::channel(&addr, None)?;
            let mut g = shoal_proto::auth::shoal_client(ch).max_decoding_message_size(64 << 20);
            let mut out: [Phase; 3] = Default::default();
            let mut q = c;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let (vector, text) = qs[q].clone();
                let r = g
                    .search(pb::SearchRequest {
                        collection: name.clone(),
                        vector,
                        text,
                        k: 10,
                        nprobe,
                        // The dense path is what this measures (AUTO would fuse BM25 in).
                        mode: pb::RetrievalMode::Dense as i32,
                        ..Default::default()
                    })
                    .await;
                let p = &mut out[phase.load(Ordering::Relaxed) as usize];
                match r {
                    Ok(r) if r.get_ref().partial => p.partial += 1,
                    Ok(_) => p.lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => p.failed += 1,
                }
                q = (q + 2) % qs.len();
            }
            anyhow::Ok(out)
        }));
    }
    clients
}

/// The clients' phases merged.
pub(crate) async fn join_phases(
    clients: Vec<tokio::task::JoinHandle<Result<[Phase; 3]>>>,
) -> Result<[Phase; 3]> {
    let mut phases: [Phase; 3] = Default::default();
    for cl in clients {
        for (i, p) in cl.await??.into_iter().enumerate() {
            phases[i].lat.extend(p.lat);
            phases[i].partial += p.partial;
            phases[i].failed += p.failed;
        }
    }
    Ok(phases)
}

/// `--split`: the collection's shard count doubled online while 2 clients query (nprobe
/// 16) and one writer ingests new rows; then the rows every primary holds, once the
/// retains are done, against what was acknowledged.
async fn split_under_load(
    a: &ScaleArgs,
    gen: &Gen,
    coords: &str,
    nodes: &[String],
    name: &str,
    queries: &[f32],
) -> Result<serde_json::Value> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
    use std::sync::Arc;
    let dim = a.dimension;
    // 0 before, 1 during, 2 after; the phase a query ends in counts it.
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = query_clients(
        nodes,
        name,
        Queries::Vectors(queries, dim),
        16,
        &phase,
        &stop,
    );
    // The writer: batches of 64 new rows (ids past the corpus), acknowledged or not.
    let acked = Arc::new(AtomicU64::new(0));
    let write_failed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (addr, stop, acked, failed) = (
            nodes[0].clone(),
            stop.clone(),
            acked.clone(),
            write_failed.clone(),
        );
        let (rows, name) = (a.rows, name.to_string());
        let batches: Vec<Vec<pb::Document>> = (0..2000u64)
            .map(|b| {
                (0..64u64)
                    .map(|j| {
                        let i = rows + b * 64 + j;
                        let mut v = Vec::with_capacity(dim);
                        gen.row(i, &mut v);
                        pb::Document {
                            id: id_of(i),
                            vector: v,
                            ..Default::default()
                        }
                    })
                    .collect()
            })
            .collect();
        tokio::spawn(async move {
            let ch = shoal_proto::channel(&addr, None)?;
            let mut g = shoal_proto::auth::shoal_client(ch).max_decoding_message_size(64 << 20);
            for (b, docs) in batches.into_iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = docs.len() as u64;
                match g
                    .ingest(pb::IngestRequest {
                        collection: name.clone(),
                        documents: docs,
                        request_id: format!("split-bench-{b}"),
                    })
                    .await
                {
                    Ok(_) => acked.fetch_add(n, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };
    let window = Duration::from_secs(a.split_window);
    tokio::time::sleep(window).await;
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    c.patience = Duration::from_secs(60);
    phase.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let op = c
        .start_split(cpb::StartSplitRequest {
            collection: name.into(),
        })
        .await?;
    let done = wait_operation(&mut c, name, op.id).await?;
    let split_s = t.elapsed().as_secs_f64();
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    let phases = join_phases(clients).await?;
    // The retains done: the primaries hold the corpus and the acknowledged rows once.
    let want = a.rows + acked.load(Ordering::Relaxed);
    let t2 = Instant::now();
    let (shards, held) = loop {
        let r = c
            .list_shards(cpb::ListShardsRequest {
                collection: name.into(),
            })
            .await?;
        let held: u64 = r
            .shards
            .iter()
            .filter_map(|s| s.replicas.iter().find(|x| x.node_id == s.primary))
            .map(|x| x.live_docs)
            .sum();
        if held == want || t2.elapsed() > Duration::from_secs(120) {
            break (r.shards.len(), held);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let [before, during, after] = phases;
    Ok(serde_json::json!({
        "step": "split", "outcome": done.state, "reason": done.reason,
        "from_shards": a.shards, "to_shards": shards, "split_s": split_s,
        "rows_before": a.rows, "rows_acknowledged_during_load": want - a.rows,
        "rows_held_after": held, "writes_failed": write_failed.load(Ordering::Relaxed),
        "queries_before": before.json(), "queries_during": during.json(), "queries_after": after.json(),
    }))
}

/// Polls operation `id` on `name` to its end.
pub(crate) async fn wait_operation(
    c: &mut shoal_proto::client::Client,
    name: &str,
    id: u64,
) -> Result<cpb::Operation> {
    let t = Instant::now();
    loop {
        let ops = c
            .list_operations(cpb::ListOperationsRequest {
                collection: name.into(),
            })
            .await?;
        if let Some(o) = ops
            .operations
            .into_iter()
            .find(|o| o.id == id && o.state != "running")
        {
            return Ok(o);
        }
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("operation {id} did not end in an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes under `dir` (files only).
/// Disk a directory tree takes: its files' allocated blocks (the vector files grow in
/// sparse 64 MiB steps, so their lengths overstate it; a file linked twice counts twice).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.blocks() * 512),
            Err(_) => 0,
        })
        .sum()
}

/// `name`'s shard directories on every node of the dev cluster.
fn collection_dirs(dev: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|n| {
            std::fs::read_dir(n.path().join("shards"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|d| d.file_name().to_string_lossy().starts_with(&prefix))
        .map(|d| d.path())
        .collect()
}

/// The bytes of `name`'s shard directories on every node of the dev cluster.
pub(crate) fn collection_bytes(dev: &Path, name: &str) -> u64 {
    collection_dirs(dev, name)
        .iter()
        .map(|d| dir_bytes(d))
        .sum()
}

/// `--rebuild`: an online rebuild under query load, committed.
#[allow(clippy::too_many_arguments)]
async fn rebuild_under_load(
    a: &ScaleArgs,
    coords: &str,
    nodes: &[String],
    name: &str,
    queries: &[f32],
    truth: &[Vec<i64>],
    dev: &Path,
    built_nlist: u32,
) -> Result<serde_json::Value> {
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    use std::sync::Arc;
    let dim = a.dimension;
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    c.patience = Duration::from_secs(60);
    let ix = c
        .describe_collection(cpb::DescribeCollectionRequest { name: name.into() })
        .await?
        .collection
        .and_then(|c| c.index)
        .unwrap_or_default();
    // The collection may leave nlist to shoal (0): the build chose `built_nlist`.
    let from_nlist = if ix.nlist > 0 { ix.nlist } else { built_nlist };
    let nlist = if a.rebuild_nlist > 0 {
        a.rebuild_nlist
    } else {
        from_nlist.max(1) * 2
    };
    let nprobe = if a.rebuild_nprobe > 0 {
        a.rebuild_nprobe
    } else {
        ix.nprobe.max(1) * 2
    };
    let (ids, _) = cluster_queries(nodes, name, queries, dim, 0, 1).await?;
    let recall_before = recall_at(10, &ids, truth);
    let bytes_before = collection_bytes(dev, name);
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = query_clients(
        nodes,
        name,
        Queries::Vectors(queries, dim),
        0,
        &phase,
        &stop,
    );
    let window = Duration::from_secs(a.split_window);
    tokio::time::sleep(window).await;
    phase.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let op = c
        .start_rebuild(cpb::StartRebuildRequest {
            collection: name.into(),
            nlist,
            nprobe,
            ..Default::default()
        })
        .await?;
    let mut peak = bytes_before;
    let switched = loop {
        peak = peak.max(collection_bytes(dev, name));
        let ops = c
            .list_operations(cpb::ListOperationsRequest {
                collection: name.into(),
            })
            .await?;
        let o = ops
            .operations
            .into_iter()
            .find(|o| o.id == op.id)
            .context("the rebuild is listed")?;
        let ph = o
            .rebuild
            .as_ref()
            .map_or("", |r| r.phase.as_str())
            .to_string();
        if ph == "switched" {
            break o;
        }
        if o.state != "running" {
            bail!("rebuild {} {}: {}", o.id, o.state, o.reason);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let switch_s = t.elapsed().as_secs_f64();
    phase.store(2, Ordering::Relaxed);
    let t2 = Instant::now();
    while t2.elapsed() < window {
        peak = peak.max(collection_bytes(dev, name));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let [before, during, after] = join_phases(clients).await?;
    let (ids, _) = cluster_queries(nodes, name, queries, dim, 0, 1).await?;
    let recall_after = recall_at(10, &ids, truth);
    c.commit_rebuild(cpb::EndRebuildRequest {
        collection: name.into(),
        operation: op.id,
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bytes_committed = collection_bytes(dev, name);
    Ok(serde_json::json!({
        "step": "rebuild", "from": {"nlist": from_nlist, "nprobe": ix.nprobe},
        "to": {"nlist": nlist, "nprobe": nprobe}, "switch_s": switch_s,
        "gate": switched.steps.iter().map(|s| serde_json::json!({"shard": s.shard, "gate": s.gate})).collect::<Vec<_>>(),
        "recall_at_10_before": recall_before, "recall_at_10_after": recall_after,
        "queries_before": before.json(), "queries_during": during.json(), "queries_after": after.json(),
        "collection_bytes_before": bytes_before, "collection_bytes_peak": peak,
        "extra_disk_at_peak": peak.saturating_sub(bytes_before),
        "collection_bytes_after_commit": bytes_committed,
    }))
}

/// `--backup`: a backup under query load (2 clients, nprobe 16), a second one of the
/// unchanged collection, the same shard directories copied by `cp -r`, and a restore.
async fn backup_under_load(
    a: &ScaleArgs,
    coords: &str,
    nodes: &[String],
    name: &str,
    queries: &[f32],
    dev: &Path,
    work: &Path,
) -> Result<serde_json::Value> {
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    use std::sync::Arc;
    let dim = a.dimension;
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = query_clients(
        nodes,
        name,
        Queries::Vectors(queries, dim),
        16,
        &phase,
        &stop,
    );
    let repo_dir = work.join("backup-repo");
    let _ = std::fs::remove_dir_all(&repo_dir);
    let url = repo_dir.display().to_string();
    let window = Duration::from_secs(a.split_window);
    tokio::time::sleep(window).await;
    let mut c = shoal_proto::client::Client::new(coords.split(',').map(String::from));
    c.patience = Duration::from_secs(60);
    phase.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let op = c
        .start_backup(cpb::StartBackupRequest {
            collection: name.into(),
            url: url.clone(),
            backup: "bench-1".into(),
        })
        .await?;
    let first = wait_operation(&mut c, name, op.id).await?;
    let backup_s = t.elapsed().as_secs_f64();
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let phases = join_phases(clients).await?;
    let repo = shoal_node::backup::Repository::open(&url)?;
    let (_, records) = repo.records("bench-1", None).await?;
    let bytes: u64 = records.iter().map(|r| r.bytes).sum();
    let docs: u64 = records.iter().map(|r| r.live_docs).sum();
    // The same collection again: nothing changed, nothing to send.
    let t = Instant::now();
    let op = c
        .start_backup(cpb::StartBackupRequest {
            collection: name.into(),
            url: url.clone(),
            backup: "bench-2".into(),
        })
        .await?;
    let second = wait_operation(&mut c, name, op.id).await?;
    let second_s = t.elapsed().as_secs_f64();
    let (_, again) = repo.records("bench-2", None).await?;
    let second_uploaded: u64 = again.iter().map(|r| r.uploaded_bytes).sum();
    // The reference: the collection's shard directories copied as files.
    let copy_dir = work.join("plain-copy");
    let _ = std::fs::remove_dir_all(&copy_dir);
    std::fs::create_dir_all(&copy_dir)?;
    let dirs = collection_dirs(dev, name);
    let t = Instant::now();
    for (i, d) in dirs.iter().enumerate() {
        let st = Command::new("cp")
            .args(["-r", "--reflink=never"])
            .arg(d)
            .arg(copy_dir.join(i.to_string()))
            .status()?;
        anyhow::ensure!(st.success(), "cp -r {} failed", d.display());
    }
    Command::new("sync").status()?;
    let copy_s = t.elapsed().as_secs_f64();
    let copy_bytes = dir_bytes(&copy_dir);
    let _ = std::fs::remove_dir_all(&copy_dir);
    // A restore of the first backup as a new collection, to complete answers.
    let restored = format!("{name}-restored");
    let (rec, shards) = repo.records("bench-1", None).await?;
    let t = Instant::now();
    let op = c
        .restore_collection(cpb::RestoreCollectionRequest {
            collection: Some(rec.create_request(&restored, None)),
            url: url.clone(),
            backup: "bench-1".into(),
            epochs: shards.iter().map(|s| s.epoch.max(1)).collect(),
        })
        .await?;
    let rdone = wait_operation(&mut c, &restored, op.id).await?;
    let restore_s = t.elapsed().as_secs_f64();
    let ch = shoal_proto::channel(&nodes[0], None)?;
    let mut g = shoal_proto::auth::shoal_client(ch).max_decoding_message_size(64 << 20);
    let answered = loop {
        let r = g
            .search(pb::SearchRequest {
                collection: restored.clone(),
                vector: queries[..dim].to_vec(),
                k: 10,
                nprobe: 16,
                ..Default::default()
            })
            .await;
        if r.is_ok_and(|r| !r.get_ref().partial) || t.elapsed() > Duration::from_secs(600) {
            break t.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = c
        .drop_collection(cpb::DropCollectionRequest {
            name: restored.clone(),
        })
        .await;
    let _ = std::fs::remove_dir_all(&repo_dir);
    let mb = |b: u64, s: f64| b as f64 / s / 1e6;
    let [before, during, after] = phases;
    Ok(serde_json::json!({
        "step": "backup", "outcome": first.state, "reason": first.reason,
        "shards": records.len(), "documents": docs, "bytes": bytes,
        "backup_s": backup_s, "backup_mb_per_s": mb(bytes, backup_s),
        "backup_vectors_per_s": docs as f64 / backup_s,
        "second_backup_outcome": second.state, "second_backup_s": second_s,
        "second_backup_uploaded_bytes": second_uploaded,
        "copy_bytes": copy_bytes, "copy_s": copy_s, "copy_mb_per_s": mb(copy_bytes, copy_s),
        "backup_vs_copy": mb(bytes, backup_s) / mb(copy_bytes, copy_s),
        "restore_outcome": rdone.state, "restore_reason": rdone.reason, "restore_s": restore_s,
        "restore_mb_per_s": mb(bytes, restore_s), "restore_vectors_per_s": docs as f64 / restore_s,
        "restore_vs_copy": mb(bytes, restore_s) / mb(copy_bytes, copy_s),
        "restored_complete_answers_s": answered,
        "queries_before": before.json(), "queries_during_backup": during.json(),
        "queries_after": after.json(),
    }))
}
