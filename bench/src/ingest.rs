//! Vector ingest through a running cluster (e.g. `shoal dev --no-model`), next to the
//! shard engine alone on the same machine in the same run: W writers send batches of
//! B random D-d vectors for a fixed time, each batch with its own request id, round
//! robin over the nodes, into a scratch collection (S shards, replication factor R,
//! dropped at the end). The reference writes batches of the same shape into one local
//! `Shard` (one log frame and one fsync per batch, as each replica does) from W threads
//! for the same time. The ratio is what the gateway, gRPC, routing and replication cost
//! over the engine's own durable write; every batch must be acknowledged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use shoal_engine::{CollectionConfig, Document, Metadata, Metric, Shard, WriteOp};
use shoal_eval::percentile;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;

use crate::target::{connect, ingest_when_ready, ClusterTarget};

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    target: ClusterTarget,
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Documents per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Concurrent writers (cluster clients, and engine threads for the reference).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// Shards of the scratch collection; the run stops early at 45,000 documents
    /// per shard (below the automatic rebuild), so more shards allow longer runs.
    #[arg(long, default_value_t = 8)]
    shards: u32,
    #[arg(long, default_value_t = 2)]
    replication_factor: u32,
    /// Where the reference shard is written (the same disk as the cluster's data).
    #[arg(long, default_value = ".")]
    work_dir: std::path::PathBuf,
}

pub fn run(a: IngestArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tls = a.target.secure()?;
    let cluster = rt.block_on(cluster_rate(&a))?;
    println!("{cluster}");
    let engine = engine_rate(&a)?;
    println!("{engine}");
    let (c, e) = (
        cluster["docs_per_s"].as_f64().unwrap_or(0.0),
        engine["docs_per_s"].as_f64().unwrap_or(0.0),
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "vector_ingest", "tls": tls, "dimension": a.dimension, "batch": a.batch,
            "writers": a.writers, "shards": a.shards, "replication_factor": a.replication_factor,
            "cluster_docs_per_s": c, "engine_docs_per_s": e, "cluster_vs_engine": c / e,
            "cluster_batch_p50_ms": cluster["batch_p50_ms"], "cluster_batch_p99_ms": cluster["batch_p99_ms"],
        })
    );
    Ok(())
}

/// Batch `n` of writer `w`: ids unique across writers, vectors seeded by both.
fn batch(a: &IngestArgs, w: usize, n: u64) -> Vec<(String, Vec<f32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(((w as u64) << 40) ^ n);
    (0..a.batch)
        .map(|i| {
            let v = (0..a.dimension)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            (format!("w{w}-b{n}-{i}"), v)
        })
        .collect()
}

/// Rows per shard the cluster phase stops at (see `cluster_rate`).
const SHARD_ROWS_CAP: u64 = 45_000;

/// Dirty pages written back before a timed phase, so the kernel's writeback of the
/// previous phase does not land in this one's fsyncs (runs differed up to 2x without).
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

async fn cluster_rate(a: &IngestArgs) -> Result<serde_json::Value> {
    let name = format!("ingest-bench-{}", std::process::id());
    let create = cpb::CreateCollectionRequest {
        name: name.clone(),
        dimension: a.dimension as u32,
        metric: cpb::Metric::InnerProduct as i32,
        shard_count: a.shards,
        replication_factor: a.replication_factor,
        ..Default::default()
    };
    a.target.create(create).await?;
    let request = |w: usize, n: u64| pb::IngestRequest {
        collection: name.clone(),
        documents: batch(a, w, n)
            .into_iter()
            .map(|(id, vector)| pb::Document {
                id,
                vector,
                ..Default::default()
            })
            .collect(),
        request_id: format!("{name}-w{w}-b{n}"),
    };
    // The node may not have seen the create yet, and the shards open within moments:
    // retry the first batch until it lands (it is counted out of the timing).
    let mut c = connect(&a.target.nodes[0]).await?;
    ingest_when_ready(&mut c, request(usize::MAX >> 8, 0)).await?;
    settle();
    let until = Instant::now() + Duration::from_secs(a.duration_s);
    // Each shard kept under the engine's automatic rebuild threshold (50,000 rows
    // outside the index): a build would take the cores from the rest of the run.
    let cap = a.shards as u64 * SHARD_ROWS_CAP;
    let sent = &AtomicU64::new(0);
    let t = Instant::now();
    let writers = (0..a.writers).map(|w| {
        let addr = a.target.node(w).to_string();
        let request = &request;
        async move {
            let mut c = connect(&addr).await?;
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until
                && sent.fetch_add(a.batch as u64, Ordering::Relaxed) + a.batch as u64 <= cap
            {
                let r = request(w, n);
                let s = Instant::now();
                c.ingest(r)
                    .await
                    .with_context(|| format!("writer {w}, batch {n}"))?;
                lat.push(s.elapsed().as_secs_f64() * 1e3);
                n += 1;
            }
            anyhow::Ok(lat)
        }
    });
    let mut lat: Vec<f64> = Vec::new();
    for r in futures::future::join_all(writers).await {
        lat.extend(r?);
    }
    let secs = t.elapsed().as_secs_f64();
    a.target.drop(&name).await;
    lat.sort_by(f64::total_cmp);
    let docs = lat.len() * a.batch;
    Ok(serde_json::json!({
        "bench": "vector_ingest_cluster", "batches": lat.len(), "documents": docs,
        "seconds": secs, "docs_per_s": docs as f64 / secs, "capped": docs as u64 + a.batch as u64 > cap,
        "batch_p50_ms": percentile(&lat, 0.5), "batch_p99_ms": percentile(&lat, 0.99),
    }))
}

fn engine_rate(a: &IngestArgs) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir_in(&a.work_dir).context("creating the reference shard dir")?;
    let mut cfg = CollectionConfig::new(a.dimension, Metric::InnerProduct);
    cfg.auto_rebuild_tail = 0;
    let shard = Arc::new(Shard::create(dir.path(), cfg)?);
    let write = |w: usize, n: u64| -> Result<()> {
        let ops = batch(a, w, n)
            .into_iter()
            .map(|(id, vector)| {
                WriteOp::Upsert(Document {
                    id,
                    text: None,
                    metadata: Metadata::none(),
                    vector,
                })
            })
            .collect();
        shard.write_as(ops, 1, &format!("w{w}-b{n}"))?;
        Ok(())
    };
    write(usize::MAX >> 8, 0)?;
    settle();
    let done = AtomicBool::new(false);
    let batches = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..a.writers)
            .map(|w| {
                let (write, done, batches) = (&write, &done, &batches);
                s.spawn(move || -> Result<()> {
                    let mut n = 0;
                    while !done.load(Ordering::Relaxed) {
                        write(w, n)?;
                        batches.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(a.duration_s));
        done.store(true, Ordering::Relaxed);
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(_) => bail!("a reference writer panicked"),
            }
        }
        Ok(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    let docs = batches.load(Ordering::Relaxed) as usize * a.batch;
    Ok(serde_json::json!({
        "bench": "vector_ingest_engine", "documents": docs, "seconds": secs,
        "docs_per_s": docs as f64 / secs,
    }))
}
