//! `shoal-bench rebuild` (issue 21): an online rebuild of a collection to other index
//! parameters through a running local cluster (`shoal dev`, loaded by `shoal eval
//! --build-index`), under a closed-loop query load (2 clients, the collection's own
//! nprobe): queries failed and partial, p50/p99 before, during and after; the wall
//! time until the switch; the shard directories' bytes before, at their peak and after
//! the commit (extra disk at peak); the gate's figures per shard; nDCG@10 of the BEIR
//! queries before the rebuild, after the switch and after a rollback (the previous
//! generations' answers), with the sentence-transformers reference beside them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use shoal_eval::beir::{ndcg_at, read_jsonl, read_qrels};
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;

use crate::ir::encode_all;
use crate::scale::{collection_bytes, join_phases, query_clients, Queries};

#[derive(Args)]
pub struct RebuildArgs {
    #[arg(long, default_value = "../shared/data/ir/scifact")]
    dataset: PathBuf,
    /// The collection `shoal eval` loaded.
    #[arg(long, default_value = "scifact")]
    collection: String,
    #[arg(
        long,
        env = "SHOAL_MODEL_DIR",
        default_value = shoal_encoder::DEFAULT_MODEL_DIR
    )]
    model_dir: PathBuf,
    /// The cluster's data directory (its shard directories are measured).
    #[arg(long)]
    dev_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    coordinators: String,
    #[arg(long, default_value = "127.0.0.1:7201,127.0.0.1:7202")]
    nodes: String,
    /// The rebuild's parameters.
    #[arg(long, default_value_t = 128)]
    nlist: u32,
    #[arg(long, default_value_t = 0)]
    pq_m: u32,
    #[arg(long, default_value_t = 16)]
    nprobe: u32,
    /// First a rebuild the gate should refuse (nlist, nprobe), its figures reported.
    #[arg(long, value_delimiter = ',')]
    refused: Vec<u32>,
    /// Seconds of load measured before and after the switch.
    #[arg(long, default_value_t = 15)]
    window: u64,
    /// sentence-transformers' nDCG@10 on the dataset (docs/benchmarks.md, measured
    /// here with torch on CPU; SciFact 0.645).
    #[arg(long, default_value_t = 0.645)]
    reference_ndcg: f64,
}

/// nDCG@10 of `queries` (judged ids, and a vector or a text the gateway encodes)
/// through node `addr`, the collection's own search parameters.
pub(crate) async fn ndcg(
    addr: &str,
    name: &str,
    queries: &[(String, Vec<f32>, String)],
    qrels: &std::collections::HashMap<String, std::collections::HashMap<String, u32>>,
) -> Result<f64> {
    let ch = shoal_proto::channel(addr, None)?;
    let mut g = shoal_proto::auth::shoal_client(ch);
    let mut total = 0.0;
    for (id, v, text) in queries {
        let r = g
            .search(pb::SearchRequest {
                collection: name.into(),
                vector: v.clone(),
                text: text.clone(),
                k: 11,
                // The dense path is what this measures (AUTO would fuse BM25 in).
                mode: pb::RetrievalMode::Dense as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        if r.partial {
            bail!("a partial answer while scoring");
        }
        let ranked: Vec<&str> = r
            .hits
            .iter()
            .map(|h| h.id.as_str())
            .filter(|d| d != id)
            .collect();
        total += ndcg_at(10, &ranked, &qrels[id]);
    }
    Ok(total / queries.len() as f64)
}

pub(crate) async fn operation(
    c: &mut shoal_proto::client::Client,
    name: &str,
    id: u64,
) -> Result<cpb::Operation> {
    let ops = c
        .list_operations(cpb::ListOperationsRequest {
            collection: name.into(),
        })
        .await?;
    ops.operations
        .into_iter()
        .find(|o| o.id == id)
        .ok_or_else(|| anyhow::anyhow!("operation {id} not listed"))
}

pub fn run(a: RebuildArgs) -> Result<()> {
    let queries = read_jsonl(&a.dataset.join("queries.jsonl"))?;
    let qrels = read_qrels(&a.dataset.join("qrels/test.tsv"))?;
    let judged: Vec<_> = queries
        .into_iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    let encoder = shoal_encoder::load_cpu(&a.model_dir)?;
    let texts: Vec<String> = judged.iter().map(|q| q.text.clone()).collect();
    let (vectors, _) = encode_all(&encoder, &texts, 32)?;
    let dim = encoder.dimension();
    drop(encoder);
    let scored: Vec<(String, Vec<f32>, String)> = judged
        .iter()
        .map(|q| q.id.clone())
        .zip(vectors.iter().cloned())
        .map(|(id, v)| (id, v, String::new()))
        .collect();
    let flat: Vec<f32> = vectors.concat();
    let nodes: Vec<String> = a.nodes.split(',').map(String::from).collect();
    let name = a.collection.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = shoal_proto::client::Client::new(a.coordinators.split(',').map(String::from));
        c.patience = Duration::from_secs(60);
        let before_ix = c
            .describe_collection(cpb::DescribeCollectionRequest { name: name.clone() })
            .await?
            .collection
            .and_then(|c| c.index)
            .unwrap_or_default();
        let ndcg_before = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        // The gate replays recent real queries: give it some before the refused one.
        let refused = if let [nlist, nprobe] = a.refused[..] {
            ndcg(&nodes[1], &name, &scored, &qrels).await?;
            let op = c
                .start_rebuild(cpb::StartRebuildRequest {
                    collection: name.clone(),
                    nlist,
                    nprobe,
                    ..Default::default()
                })
                .await?;
            let t = Instant::now();
            let o = crate::scale::wait_operation(&mut c, &name, op.id).await?;
            json!({"nlist": nlist, "nprobe": nprobe, "outcome": o.state, "reason": o.reason,
                   "seconds": t.elapsed().as_secs_f64()})
        } else {
            serde_json::Value::Null
        };
        let bytes_before = collection_bytes(&a.dev_dir, &name);
        let request = cpb::StartRebuildRequest {
            collection: name.clone(),
            nlist: a.nlist,
            pq_m: a.pq_m,
            nprobe: a.nprobe,
            ..Default::default()
        };
        let phase = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = query_clients(&nodes, &name, Queries::Vectors(&flat, dim), 0, &phase, &stop);
        let window = Duration::from_secs(a.window);
        tokio::time::sleep(window).await;
        phase.store(1, Ordering::Relaxed);
        let t = Instant::now();
        let op = c
            .start_rebuild(request.clone())
            .await?;
        // Until every replica serves the new generations (the phase switched, and the
        // nodes wrote it: a moment later), sampling the disk.
        let mut peak = bytes_before;
        let switched = loop {
            peak = peak.max(collection_bytes(&a.dev_dir, &name));
            let o = operation(&mut c, &name, op.id).await?;
            let phase_now = o.rebuild.as_ref().map_or("", |r| r.phase.as_str()).to_string();
            if o.state != "running" && phase_now != "switched" {
                bail!("rebuild {} {}: {}", o.id, o.state, o.reason);
            }
            if phase_now == "switched" {
                break o;
            }
            if t.elapsed() > Duration::from_secs(3600) {
                bail!("no switch within an hour");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let switch_s = t.elapsed().as_secs_f64();
        for _ in 0..10 {
            peak = peak.max(collection_bytes(&a.dev_dir, &name));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        phase.store(2, Ordering::Relaxed);
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
        let [before, during, after] = join_phases(clients).await?;
        let ndcg_after = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        // Rollback: the previous generations' answers again; then the rebuild once
        // more, committed (the collection ends rebuilt, the kept generations gone).
        let tr = Instant::now();
        c.rollback_rebuild(cpb::EndRebuildRequest { collection: name.clone(), operation: op.id })
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ndcg_rolled_back = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        let rollback_s = tr.elapsed().as_secs_f64();
        let op2 = c
            .start_rebuild(request.clone())
            .await?;
        loop {
            let o = operation(&mut c, &name, op2.id).await?;
            if o.rebuild.as_ref().is_some_and(|r| r.phase == "switched") {
                break;
            }
            if o.state != "running" {
                bail!("second rebuild {} {}: {}", o.id, o.state, o.reason);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.commit_rebuild(cpb::EndRebuildRequest { collection: name.clone(), operation: op2.id })
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let bytes_committed = collection_bytes(&a.dev_dir, &name);
        let ndcg_committed = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        println!(
            "{}",
            json!({
                "bench": "rebuild", "dataset": a.dataset.file_name().map(|n| n.to_string_lossy()),
                "collection": name, "queries_scored": scored.len(),
                "from": {"nlist": before_ix.nlist, "pq_m": before_ix.pq_m, "nprobe": before_ix.nprobe},
                "to": {"nlist": a.nlist, "pq_m": a.pq_m, "nprobe": a.nprobe},
                "switch_s": switch_s, "refused_rebuild": refused,
                "gate": switched.steps.iter().map(|s| json!({"shard": s.shard, "gate": s.gate})).collect::<Vec<_>>(),
                "queries_before": before.json(), "queries_during": during.json(),
                "queries_after": after.json(),
                "shard_bytes_before": bytes_before, "shard_bytes_peak": peak,
                "extra_disk_at_peak": peak.saturating_sub(bytes_before),
                "shard_bytes_after_commit": bytes_committed,
                "ndcg_at_10_before": ndcg_before, "ndcg_at_10_switched": ndcg_after,
                "ndcg_at_10_rolled_back": ndcg_rolled_back, "rollback_s": rollback_s,
                "ndcg_at_10_committed": ndcg_committed,
                "ndcg_at_10_reference": a.reference_ndcg,
            })
        );
        anyhow::Ok(())
    })
}
