//! Batch search through a running cluster (issue 22): B vector queries as one
//! `SearchBatch` (one fan-out: each shard is asked all of them in one `SearchMany`
//! call) next to the same B queries as B concurrent `Search` calls and as B calls one
//! after another, in alternating rounds of the same run, into a scratch collection of
//! random vectors (S shards, dropped at the end). Every batch answer is compared with
//! the single searches' (the same ids in the same order), so the speed-up is of the
//! same answers.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use shoal_eval::percentile;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;

use crate::target::{connect, ingest_when_ready, ClusterTarget};

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    target: ClusterTarget,
    #[arg(long, default_value_t = 128)]
    dimension: usize,
    /// Documents in the scratch collection.
    #[arg(long, default_value_t = 20_000)]
    documents: usize,
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// Queries per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Rounds of each way, alternating.
    #[arg(long, default_value_t = 60)]
    rounds: usize,
    #[arg(long, default_value_t = 10)]
    k: u32,
}

pub fn run(a: BatchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    a.target.secure()?;
    rt.block_on(measure(&a))
}

fn vector(rng: &mut rand::rngs::StdRng, d: usize) -> Vec<f32> {
    (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

async fn measure(a: &BatchArgs) -> Result<()> {
    let name = format!("batch-bench-{}", std::process::id());
    a.target
        .create(cpb::CreateCollectionRequest {
            name: name.clone(),
            dimension: a.dimension as u32,
            metric: cpb::Metric::InnerProduct as i32,
            shard_count: a.shards,
            replication_factor: 1,
            ..Default::default()
        })
        .await?;
    let r = run_rounds(a, &name).await;
    a.target.drop(&name).await;
    r
}

async fn run_rounds(a: &BatchArgs, name: &str) -> Result<()> {
    let mut c = connect(&a.target.nodes[0]).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for (n, chunk) in (0..a.documents).collect::<Vec<_>>().chunks(500).enumerate() {
        let req = pb::IngestRequest {
            collection: name.to_string(),
            documents: chunk
                .iter()
                .map(|i| pb::Document {
                    id: format!("d{i}"),
                    vector: vector(&mut rng, a.dimension),
                    ..Default::default()
                })
                .collect(),
            request_id: format!("{name}-{n}"),
        };
        ingest_when_ready(&mut c, req).await?;
    }
    let query = |v: Vec<f32>| pb::SearchRequest {
        collection: name.to_string(),
        vector: v,
        k: a.k,
        ..Default::default()
    };
    let ids = |r: &pb::SearchResponse| r.hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
    let (mut batch_ms, mut concurrent_ms, mut sequential_ms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut compared, mut differ) = (0usize, 0usize);
    for round in 0..a.rounds + 1 {
        let queries: Vec<pb::SearchRequest> = (0..a.batch)
            .map(|_| query(vector(&mut rng, a.dimension)))
            .collect();
        // Each way first in turn, so none always runs on a warmer cache.
        let mut ways = [0, 1, 2];
        ways.rotate_left(round % 3);
        let (mut b, mut singles) = (None, None);
        for way in ways {
            let t = Instant::now();
            match way {
                0 => {
                    let r = c
                        .search_batch(pb::SearchBatchRequest {
                            searches: queries.clone(),
                        })
                        .await?
                        .into_inner();
                    b = Some(r.results);
                }
                1 => {
                    let calls = queries.iter().map(|q| {
                        let mut c = c.clone();
                        let q = q.clone();
                        async move { c.search(q).await.map(|r| r.into_inner()) }
                    });
                    let mut out = Vec::new();
                    for r in futures::future::join_all(calls).await {
                        out.push(r?);
                    }
                    singles = Some(out);
                }
                _ => {
                    for q in &queries {
                        c.search(q.clone()).await?;
                    }
                }
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            // Round 0 warms connections and caches: not counted.
            if round > 0 {
                [&mut batch_ms, &mut concurrent_ms, &mut sequential_ms][way].push(ms);
            }
        }
        let (b, singles) = (b.unwrap_or_default(), singles.unwrap_or_default());
        if b.iter().chain(&singles).any(|r| r.partial) {
            bail!("a partial answer in round {round}");
        }
        for (x, y) in b.iter().zip(&singles) {
            compared += 1;
            differ += usize::from(ids(x) != ids(y));
        }
    }
    let rate = |ms: &[f64]| (a.batch * ms.len()) as f64 / (ms.iter().sum::<f64>() / 1e3);
    let (qb, qc, qs) = (rate(&batch_ms), rate(&concurrent_ms), rate(&sequential_ms));
    let way = |ms: &mut Vec<f64>, q: f64| {
        ms.sort_by(f64::total_cmp);
        serde_json::json!({
            "queries_per_s": q,
            "p50_ms_per_batch": percentile(ms, 0.5),
            "p99_ms_per_batch": percentile(ms, 0.99),
        })
    };
    println!(
        "{}",
        serde_json::json!({
            "bench": "batch_search",
            "documents": a.documents,
            "dimension": a.dimension,
            "shards": a.shards,
            "batch": a.batch,
            "rounds": a.rounds,
            "k": a.k,
            "batch_search": way(&mut batch_ms, qb),
            "concurrent_searches": way(&mut concurrent_ms, qc),
            "sequential_searches": way(&mut sequential_ms, qs),
            "batch_vs_concurrent": qb / qc,
            "batch_vs_sequential": qb / qs,
            "answers_compared": compared,
            "answers_differing": differ,
        })
    );
    if differ > 0 {
        bail!("{differ} of {compared} batch answers differ from the single searches'");
    }
    Ok(())
}
