//! Load against a running cluster (e.g. `shoal dev`): a closed loop of N concurrent
//! gRPC clients searching a collection's queries for a fixed time, reporting QPS,
//! latency percentiles, errors, partial answers and recall@k against the cluster's
//! own exact search (`exact: true`, every stored vector scored). Then ingest
//! throughput through the cluster next to the encoder alone, on the same documents in
//! the same run: the ingest path's overhead over encoding.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use shoal_encoder::pool::{EncoderPool, PoolConfig};
use shoal_eval::beir::read_jsonl;
use shoal_eval::percentile;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;

use crate::target::{connect, ingest_when_ready, ClusterTarget};

#[derive(Args)]
pub struct LoadArgs {
    /// A BEIR dir whose collection the cluster holds (`shoal eval DIR` ingests it):
    /// its queries drive the load, its corpus feeds the ingest comparison.
    dir: PathBuf,
    /// Collection name; default: the dir's name.
    #[arg(long)]
    collection: Option<String>,
    #[command(flatten)]
    target: ClusterTarget,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Documents ingested for the ingest-vs-encoder comparison (0: skip it).
    #[arg(long, default_value_t = 256)]
    ingest_docs: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value = shoal_encoder::DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
}

#[derive(Default)]
struct ClientStats {
    latencies_ms: Vec<f64>,
    errors: u64,
    partial: u64,
    recall_sum: f64,
}

pub fn run(a: LoadArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(a))
}

async fn run_async(a: LoadArgs) -> Result<()> {
    let tls = a.target.secure()?;
    let name = a.collection.clone().unwrap_or_else(|| {
        a.dir
            .file_name()
            .map_or("eval".into(), |n| n.to_string_lossy().to_string())
    });
    let queries: Vec<String> = read_jsonl(&a.dir.join("queries.jsonl"))?
        .into_iter()
        .map(|q| q.text)
        .filter(|t| !t.trim().is_empty())
        .take(500)
        .collect();
    anyhow::ensure!(!queries.is_empty(), "no queries in {}", a.dir.display());

    // The reference: each query's exact top k, from the same cluster and encoder.
    let mut c = connect(&a.target.nodes[0]).await?;
    let mut truth = Vec::with_capacity(queries.len());
    for q in &queries {
        let r = c
            .search(pb::SearchRequest {
                collection: name.clone(),
                text: q.clone(),
                k: a.k,
                exact: true,
                // The dense path is what this measures (AUTO would fuse BM25 in).
                mode: pb::RetrievalMode::Dense as i32,
                ..Default::default()
            })
            .await
            .with_context(|| format!("exact search in {name}"))?
            .into_inner();
        truth.push(r.hits.into_iter().map(|h| h.id).collect::<HashSet<_>>());
    }
    let queries = Arc::new(queries);
    let truth = Arc::new(truth);

    let deadline = Instant::now() + Duration::from_secs(a.duration_s);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        let addr = a.target.node(i).to_string();
        let (queries, truth, name, k) = (queries.clone(), truth.clone(), name.clone(), a.k);
        tasks.push(tokio::spawn(async move {
            let mut s = ClientStats::default();
            let mut c = connect(&addr).await?;
            let mut n = i;
            while Instant::now() < deadline {
                let qi = n % queries.len();
                n += a.clients;
                let t = Instant::now();
                let r = c
                    .search(pb::SearchRequest {
                        collection: name.clone(),
                        text: queries[qi].clone(),
                        k,
                        // The dense path is what this measures (AUTO would fuse BM25 in).
                        mode: pb::RetrievalMode::Dense as i32,
                        ..Default::default()
                    })
                    .await;
                s.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        s.partial += u64::from(r.partial);
                        let want = &truth[qi];
                        let got = r.hits.iter().filter(|h| want.contains(&h.id)).count();
                        s.recall_sum += got as f64 / want.len().max(1) as f64;
                    }
                    Err(_) => s.errors += 1,
                }
            }
            anyhow::Ok(s)
        }));
    }
    let mut all = ClientStats::default();
    for t in tasks {
        let s = t.await??;
        all.latencies_ms.extend(s.latencies_ms);
        all.errors += s.errors;
        all.partial += s.partial;
        all.recall_sum += s.recall_sum;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = all.latencies_ms.len();
    all.latencies_ms.sort_by(f64::total_cmp);
    let answered = (n as u64 - all.errors).max(1) as f64;
    let search = serde_json::json!({
        "bench": "search_load", "collection": name, "clients": a.clients, "tls": tls,
        "duration_s": elapsed, "queries": n, "qps": n as f64 / elapsed,
        "p50_ms": percentile(&all.latencies_ms, 0.50), "p95_ms": percentile(&all.latencies_ms, 0.95),
        "p99_ms": percentile(&all.latencies_ms, 0.99), "errors": all.errors,
        "partial": all.partial, "k": a.k, "recall_at_k_vs_exact": all.recall_sum / answered,
    });
    println!("{search}");

    let mut summary = search.clone();
    if a.ingest_docs > 0 {
        let ingest = ingest_vs_encoder(&a, &name).await?;
        println!("{ingest}");
        summary["ingest_docs_per_s"] = ingest["ingest_docs_per_s"].clone();
        summary["encoder_docs_per_s"] = ingest["encoder_docs_per_s"].clone();
        summary["ingest_vs_encoder"] = ingest["ingest_vs_encoder"].clone();
    }
    summary["bench"] = "load".into();
    println!("{summary}");
    Ok(())
}

/// The same documents, in the same batches: encoded by an encoder pool in this
/// process, then ingested through the cluster into a scratch collection (dropped).
async fn ingest_vs_encoder(a: &LoadArgs, name: &str) -> Result<serde_json::Value> {
    let docs: Vec<(String, String)> = read_jsonl(&a.dir.join("corpus.jsonl"))?
        .into_iter()
        .map(|r| (r.id.clone(), r.text()))
        .filter(|(_, t)| !t.trim().is_empty())
        .take(a.ingest_docs)
        .collect();
    let dir = a.model_dir.clone();
    let enc = tokio::task::spawn_blocking(move || shoal_encoder::load_cpu(&dir)).await??;
    let pool = EncoderPool::start(vec![enc], PoolConfig::default()).await?;
    let texts: Vec<String> = docs.iter().map(|(_, t)| t.clone()).collect();
    // Warm up, then time.
    pool.encode(texts[..texts.len().min(8)].to_vec()).await?;
    let t = Instant::now();
    for chunk in texts.chunks(a.batch.max(1)) {
        pool.encode(chunk.to_vec()).await?;
    }
    let encoder_rate = texts.len() as f64 / t.elapsed().as_secs_f64();
    drop(pool);

    let scratch = format!("{name}-ingest-bench");
    let create = cpb::CreateCollectionRequest {
        name: scratch.clone(),
        dimension: 384,
        metric: cpb::Metric::InnerProduct as i32,
        shard_count: 3,
        replication_factor: 1,
        ..Default::default()
    };
    a.target.create(create).await?;
    let mut c = connect(&a.target.nodes[0]).await?;
    let ingest = |chunk: &[(String, String)]| pb::IngestRequest {
        collection: scratch.clone(),
        documents: chunk
            .iter()
            .map(|(id, text)| pb::Document {
                id: id.clone(),
                text: text.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    // The new collection's shards open within moments: retry until the first lands.
    let first = &docs[..docs.len().min(8)];
    ingest_when_ready(&mut c, ingest(first)).await?;
    let t = Instant::now();
    for chunk in docs.chunks(a.batch.max(1)) {
        c.ingest(ingest(chunk)).await.context("ingesting")?;
    }
    let ingest_rate = docs.len() as f64 / t.elapsed().as_secs_f64();
    a.target.drop(&scratch).await;
    Ok(serde_json::json!({
        "bench": "ingest_vs_encoder", "documents": docs.len(), "batch": a.batch,
        "encoder_docs_per_s": encoder_rate, "ingest_docs_per_s": ingest_rate,
        "ingest_vs_encoder": ingest_rate / encoder_rate,
    }))
}
