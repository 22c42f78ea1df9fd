//! `shoal-bench reembed` (issue 21): a collection re-embedded with another model
//! through a running local cluster (`shoal dev` with both models, the collection loaded
//! by `shoal eval --build-index` with the first), under a closed-loop load of text
//! queries (2 clients; the gateway encodes each with the collection's model, so the
//! load switches models with the collection): queries failed and partial, p50/p99
//! before, during and after; the wall time until the switch; the shard directories'
//! bytes before, at their peak and after the commit; the gate's figures per shard;
//! nDCG@10 of the BEIR queries (as text) before, after the switch and after the
//! commit, beside the sentence-transformers reference of each model.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use shoal_eval::beir::{read_jsonl, read_qrels};
use shoal_proto::coordinator as cpb;

use crate::rebuild::{ndcg, operation};
use crate::scale::{collection_bytes, join_phases, query_clients, Queries};

#[derive(Args)]
pub struct ReembedArgs {
    #[arg(long, default_value = "../shared/data/ir/cranfield")]
    dataset: PathBuf,
    /// The collection `shoal eval` loaded.
    #[arg(long, default_value = "cranfield")]
    collection: String,
    /// The new model's directory (the nodes hold it: `--extra-model-dir`).
    #[arg(long, default_value = "models/all-mpnet-base-v2")]
    new_model_dir: PathBuf,
    /// The cluster's data directory (its shard directories are measured).
    #[arg(long)]
    dev_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    coordinators: String,
    #[arg(long, default_value = "127.0.0.1:7201,127.0.0.1:7202")]
    nodes: String,
    /// Seconds of load measured before and after the switch.
    #[arg(long, default_value_t = 15)]
    window: u64,
    /// sentence-transformers' nDCG@10 with the old and the new model
    /// (`scripts/reference/beir_reference.py`, torch on CPU here).
    #[arg(long)]
    reference_old: Option<f64>,
    #[arg(long)]
    reference_new: Option<f64>,
}

pub fn run(a: ReembedArgs) -> Result<()> {
    let queries = read_jsonl(&a.dataset.join("queries.jsonl"))?;
    let qrels = read_qrels(&a.dataset.join("qrels/test.tsv"))?;
    let scored: Vec<(String, Vec<f32>, String)> = queries
        .into_iter()
        .filter(|q| qrels.contains_key(&q.id))
        .map(|q| (q.id, Vec::new(), q.text))
        .collect();
    let texts: Vec<String> = scored.iter().map(|(_, _, t)| t.clone()).collect();
    let dimension = shoal_encoder::ModelSpec::load(&a.new_model_dir)?.dimension() as u32;
    let hash = shoal_node::model::content_hash(&a.new_model_dir)?;
    let nodes: Vec<String> = a.nodes.split(',').map(String::from).collect();
    let name = a.collection.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = shoal_proto::client::Client::new(a.coordinators.split(',').map(String::from));
        c.patience = Duration::from_secs(60);
        let before_coll = c
            .describe_collection(cpb::DescribeCollectionRequest { name: name.clone() })
            .await?
            .collection
            .unwrap_or_default();
        let ndcg_before = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        let bytes_before = collection_bytes(&a.dev_dir, &name);
        let phase = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = query_clients(&nodes, &name, Queries::Texts(&texts), 0, &phase, &stop);
        let window = Duration::from_secs(a.window);
        tokio::time::sleep(window).await;
        phase.store(1, Ordering::Relaxed);
        let t = Instant::now();
        let op = c
            .start_rebuild(cpb::StartRebuildRequest {
                collection: name.clone(),
                encoder: Some(cpb::EncoderRef {
                    model_id: a
                        .new_model_dir
                        .file_name()
                        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
                    content_hash: hash.clone(),
                }),
                dimension,
                // PQ over the new dimension as the collection's over its own (d/8).
                pq_m: (dimension / 8).max(1),
                ..Default::default()
            })
            .await?;
        let mut peak = bytes_before;
        let switched = loop {
            peak = peak.max(collection_bytes(&a.dev_dir, &name));
            let o = operation(&mut c, &name, op.id).await?;
            let now = o.rebuild.as_ref().map_or("", |r| r.phase.as_str()).to_string();
            if o.state != "running" {
                bail!("re-embed {} {}: {}", o.id, o.state, o.reason);
            }
            if now == "switched" {
                break o;
            }
            if t.elapsed() > Duration::from_secs(3 * 3600) {
                bail!("no switch within three hours");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let switch_s = t.elapsed().as_secs_f64();
        phase.store(2, Ordering::Relaxed);
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
        let [before, during, after] = join_phases(clients).await?;
        let ndcg_switched = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        c.commit_rebuild(cpb::EndRebuildRequest {
            collection: name.clone(),
            operation: op.id,
        })
        .await?;
        // Every replica logs the commit (the set becomes the stored vectors).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let bytes_committed = collection_bytes(&a.dev_dir, &name);
        let ndcg_committed = ndcg(&nodes[0], &name, &scored, &qrels).await?;
        println!(
            "{}",
            json!({
                "bench": "reembed", "dataset": a.dataset.file_name().map(|n| n.to_string_lossy()),
                "collection": name, "queries_scored": scored.len(),
                "from": {"model": before_coll.encoder.map(|e| e.content_hash), "dimension": before_coll.dimension},
                "to": {"model": hash, "dimension": dimension, "dir": a.new_model_dir},
                "switch_s": switch_s,
                "gate": switched.steps.iter().map(|s| json!({"shard": s.shard, "gate": s.gate})).collect::<Vec<_>>(),
                "queries_before": before.json(), "queries_during": during.json(),
                "queries_after": after.json(),
                "shard_bytes_before": bytes_before, "shard_bytes_peak": peak,
                "extra_disk_at_peak": peak.saturating_sub(bytes_before),
                "shard_bytes_after_commit": bytes_committed,
                "ndcg_at_10_before": ndcg_before, "ndcg_at_10_switched": ndcg_switched,
                "ndcg_at_10_committed": ndcg_committed,
                "ndcg_at_10_reference_old": a.reference_old, "ndcg_at_10_reference_new": a.reference_new,
            })
        );
        anyhow::Ok(())
    })
}
