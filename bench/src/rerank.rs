//! `shoal-bench rerank`: re-ranking from the stored float32 vectors next to the
//! reduced-precision copies (issue 19: fp16, SQ8) on the same data and the same IVF-PQ
//! generation (three shards of the same documents, each building generation 1 from
//! the same training sample): recall@10 against exact search, nDCG@10 on a BEIR set,
//! queries per second and the bytes per vector re-ranking reads, as ratios to float32.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use shoal_engine::{
    CollectionConfig, Document, Metric, Precision, SearchMode, SearchParams, Shard,
};
use shoal_eval::beir::{ndcg_at, read_jsonl, read_qrels, Row};
use shoal_eval::datasets;

use crate::measure::run_queries;

const K: usize = 10;

#[derive(Args, Debug)]
pub struct RerankArgs {
    /// `fashion-mnist` (60,000 x 784, L2), `synthetic` (`--n` x 384, inner product,
    /// clustered) or a BEIR-layout directory, encoded with shoal's Burn encoder (inner
    /// product).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    #[arg(
        long,
        env = "SHOAL_MODEL_DIR",
        default_value = shoal_encoder::DEFAULT_MODEL_DIR
    )]
    model_dir: PathBuf,
    /// Queries used (the first N).
    #[arg(long)]
    queries: Option<usize>,
    #[arg(long)]
    nlist: Option<usize>,
    #[arg(long)]
    nprobe: Option<usize>,
    #[arg(long)]
    refine: Option<usize>,
    /// Search threads for the QPS figures.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Rows of the synthetic set.
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    /// Queries run under a page-cache budget of this many bytes (0: none): each
    /// shard's files are dropped from the page cache and its queries run in a memory
    /// cgroup (v1) of that size, so the rows re-ranking reads and that do not fit are
    /// read from disk again: the case the reduced copies are for.
    #[arg(long, default_value_t = 0)]
    cache_limit: u64,
    /// Where the shards are written (temporary dirs under it).
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
}

struct Data {
    name: String,
    dim: usize,
    metric: Metric,
    ids: Vec<String>,
    base: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
    /// BEIR: each query's id and judgements.
    judged: Option<Vec<(String, std::collections::HashMap<String, u32>)>>,
}

fn load(args: &RerankArgs) -> Result<Data> {
    // Vector sets: ids are row numbers, the truth is the shard's exact search.
    let vectors = |ds: datasets::Dataset| Data {
        name: ds.name.clone(),
        dim: ds.dim,
        metric: ds.metric,
        ids: (0..ds.n_base()).map(|i| i.to_string()).collect(),
        base: (0..ds.n_base()).map(|i| ds.row(i).to_vec()).collect(),
        queries: (0..ds.n_queries()).map(|i| ds.query(i).to_vec()).collect(),
        judged: None,
    };
    match args.dataset.as_str() {
        "synthetic" => return Ok(vectors(datasets::synthetic(args.n, 10_000, 384, 42))),
        "fashion-mnist" => {
            let dir = Path::new(datasets::FASHION_MNIST_DIR);
            return Ok(vectors(datasets::fashion_mnist(dir)?));
        }
        _ => {}
    }
    let dir = PathBuf::from(&args.dataset);
    let corpus = read_jsonl(&dir.join("corpus.jsonl"))?;
    let queries = read_jsonl(&dir.join("queries.jsonl"))?;
    let qrels = read_qrels(&dir.join("qrels/test.tsv"))?;
    let encoder = shoal_encoder::load_cpu(&args.model_dir)?;
    let started = Instant::now();
    let texts: Vec<String> = corpus.iter().map(Row::text).collect();
    let (base, _) = crate::ir::encode_all(&encoder, &texts, 32)?;
    let judged: Vec<&Row> = queries
        .iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    let qtexts: Vec<String> = judged.iter().map(|q| q.text.clone()).collect();
    let (qv, _) = crate::ir::encode_all(&encoder, &qtexts, 32)?;
    eprintln!(
        "encoded {} documents and {} queries in {:.0} s",
        base.len(),
        qv.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(Data {
        name: dir
            .file_name()
            .map_or("beir".into(), |n| n.to_string_lossy().into_owned()),
        dim: encoder.dimension(),
        metric: Metric::InnerProduct,
        ids: corpus.iter().map(|r| r.id.clone()).collect(),
        base,
        queries: qv,
        judged: Some(
            judged
                .iter()
                .map(|q| (q.id.clone(), qrels[&q.id].clone()))
                .collect(),
        ),
    })
}

/// Bytes of a shard's files whose names start with `prefix`.
fn bytes_of(dir: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn run(args: RerankArgs) -> Result<()> {
    let data = load(&args)?;
    let n = data.base.len();
    let nq = args
        .queries
        .unwrap_or(data.queries.len())
        .min(data.queries.len());
    let mut cfg = CollectionConfig::new(data.dim, data.metric);
    let (nlist, sample) = shoal_proto::sizing::size_index(n as u64, 65_536);
    cfg.index.nlist = args.nlist.unwrap_or(nlist as usize);
    cfg.train_sample = sample as usize;
    cfg.nprobe = args.nprobe.unwrap_or(cfg.nprobe).min(cfg.index.nlist);
    if let Some(r) = args.refine {
        cfg.refine_factor = r;
    }
    cfg.auto_rebuild_tail = 0;
    cfg.validate()?;
    println!(
        "{}",
        json!({"bench": "rerank", "section": "setup", "dataset": data.name, "n": n,
               "dim": data.dim, "queries": nq, "metric": format!("{:?}", data.metric),
               "index": cfg.index.factory_string(), "nprobe": cfg.nprobe,
               "refine_factor": cfg.refine_factor, "train_sample": cfg.train_sample.min(n),
               "threads": args.threads})
    );
    let work = tempfile::tempdir_in(&args.work_dir).context("creating the work dir")?;
    let mut truth: Vec<Vec<String>> = Vec::new();
    let mut baseline: Option<(f64, f64, Vec<Vec<String>>)> = None;
    for p in Precision::ALL {
        let dir = work.path().join(p.name());
        let mut c = cfg.clone();
        c.rerank = p;
        let shard = Shard::create(&dir, c)?;
        for (ids, vs) in data.ids.chunks(10_000).zip(data.base.chunks(10_000)) {
            let docs = ids
                .iter()
                .zip(vs)
                .map(|(id, v)| Document {
                    id: id.clone(),
                    text: None,
                    metadata: shoal_engine::Metadata::none(),
                    vector: v.clone(),
                })
                .collect();
            shard.upsert(docs)?;
        }
        let started = Instant::now();
        let info = shard.rebuild(None)?;
        let build_s = started.elapsed().as_secs_f64();
        if truth.is_empty() {
            let exact = SearchParams {
                mode: SearchMode::Exact,
                ..SearchParams::top(K)
            };
            let (t, _) = run_queries(nq, args.threads.max(2), |i| {
                ids_of(&shard, &data.queries[i], exact.clone())
            });
            truth = t;
        }
        let approx = SearchParams {
            mode: SearchMode::Approximate,
            ..SearchParams::top(K)
        };
        let (candidates, _) = run_queries(nq, args.threads, |i| {
            ids_of(&shard, &data.queries[i], approx.clone())
        });
        let top = SearchParams::top(K);
        // Under a budget the shard is closed (its maps let go of the pages), its files
        // dropped from the page cache, and opened again inside the cgroup: what it
        // holds and reads from then on counts against the budget.
        let (shard, limit) = match args.cache_limit {
            0 => (shard, None),
            bytes => {
                drop(shard);
                evict(&dir)?;
                let limit = CacheLimit::enter(bytes)?;
                (Shard::open(&dir)?, Some(limit))
            }
        };
        let faults_before = major_faults();
        // Warm-up, then the best of three timed passes.
        run_queries(nq.min(200), args.threads, |i| {
            ids_of(&shard, &data.queries[i], top.clone())
        });
        let mut got = Vec::new();
        let mut qps = 0f64;
        for _ in 0..3 {
            let (g, q) = run_queries(nq, args.threads, |i| {
                ids_of(&shard, &data.queries[i], top.clone())
            });
            got = g;
            qps = qps.max(q);
        }
        let faults = major_faults() - faults_before;
        drop(shard);
        drop(limit);
        let recall = got
            .iter()
            .zip(&truth)
            .map(|(g, t)| g.iter().filter(|id| t.contains(id)).count())
            .sum::<usize>() as f64
            / (nq * K) as f64;
        let ndcg = data.judged.as_ref().map(|judged| {
            got.iter()
                .zip(judged)
                .map(|(g, (qid, rels))| {
                    let ranked: Vec<&str> =
                        g.iter().map(String::as_str).filter(|d| d != qid).collect();
                    ndcg_at(10, &ranked, rels)
                })
                .sum::<f64>()
                / nq as f64
        });
        let rerank_bytes = match p {
            Precision::F32 => (n * data.dim * 4) as u64,
            _ => bytes_of(&dir, &format!("gen-{:08}.rerank", info.id)),
        };
        let vectors_bytes = (n * data.dim * 4) as u64;
        let disk = bytes_of(&dir, "") as f64;
        let (same_candidates, recall_ratio, qps_ratio) = match &baseline {
            None => (1.0, 1.0, 1.0),
            Some((r0, q0, c0)) => (
                candidates.iter().zip(c0).filter(|(a, b)| a == b).count() as f64 / nq as f64,
                recall / r0,
                qps / q0,
            ),
        };
        println!(
            "{}",
            json!({"bench": "rerank", "dataset": data.name, "rerank": p.name(),
                   "recall_at_10": recall, "ndcg_at_10": ndcg, "qps": qps,
                   "recall_vs_f32": recall_ratio, "qps_vs_f32": qps_ratio,
                   "rerank_bytes_per_vector": rerank_bytes as f64 / n as f64,
                   "rerank_bytes_vs_f32": rerank_bytes as f64 / vectors_bytes as f64,
                   "disk_bytes_per_vector": disk / n as f64,
                   "same_ivfpq_candidates": same_candidates,
                   "cache_limit_bytes": args.cache_limit,
                   "major_faults_per_query": faults as f64 / (nq * 3 + nq.min(200)) as f64,
                   "build_s": build_s, "generation": info.id})
        );
        if baseline.is_none() {
            baseline = Some((recall, qps, candidates));
        }
    }
    Ok(())
}

fn ids_of(shard: &Shard, q: &[f32], p: SearchParams) -> Vec<String> {
    shard
        .search(q, p)
        .expect("search")
        .hits
        .into_iter()
        .map(|h| h.id.to_string())
        .collect()
}

/// Drops a shard's files from the page cache (`POSIX_FADV_DONTNEED`, no privilege
/// needed): its next reads come from disk, charged to the cgroup they happen in.
fn evict(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(dir)? {
        let f = std::fs::File::open(e?.path())?;
        f.sync_all().ok();
        // SAFETY: a valid descriptor; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    Ok(())
}

/// Major page faults of this process so far (pages read from disk).
fn major_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; majflt is the 12th field.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(9))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// This process inside a child memory cgroup (v1) of `limit` bytes while it lives:
/// pages it faults in from then on (the re-ranked rows) count against the limit; what
/// it held before stays charged where it was.
struct CacheLimit {
    dir: PathBuf,
    parent: PathBuf,
}

impl CacheLimit {
    fn enter(limit: u64) -> Result<Self> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
        let path = cgroups
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))
            .context("no v1 memory cgroup for this process")?;
        let parent = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let dir = parent.join(format!("shoal-rerank-{}", std::process::id()));
        std::fs::create_dir_all(&dir).context("creating the memory cgroup")?;
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(Self { dir, parent })
    }
}

impl Drop for CacheLimit {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.parent.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}
