//! `shoal-bench filter`: filtered search on one shard of `--n` synthetic vectors
//! (issue 22). Every document carries `{"r": 0..999, "c": "a".."j"}` drawn from a hash
//! of its id (independent of its vector), indexed as `r:number`, `c:keyword`. For
//! filters admitting 50%, 10%, 1% and 0.1% of the rows (`r < 500, 100, 10, 1`) and a
//! keyword one (`c = "a"`, 10%), each plan the engine has is run on the same queries —
//! the one it chooses, exact scoring of the admitted rows, IVF-PQ restricted to them
//! (FAISS `IDSelectorBitmap`), IVF-PQ post-filtered — next to unfiltered search on the
//! same generation: recall@10 against the exact filtered top 10 (the reference) and
//! queries per second, as ratios to unfiltered search. JSON lines, then a summary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use shoal_engine::{
    CollectionConfig, Document, Filter, FilterPlan, Metadata, Metric, PayloadField, SearchMode,
    SearchParams, Shard,
};
use shoal_eval::datasets;

use crate::measure::run_queries;

const K: usize = 10;

#[derive(Args, Debug)]
pub struct FilterArgs {
    /// Rows of the synthetic set (384-d, inner product).
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Lists probed (unfiltered; the filtered plans widen it as the engine does).
    #[arg(long, default_value_t = 32)]
    nprobe: usize,
    #[arg(long, default_value_t = 10)]
    refine: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where the shard is written (a temporary dir under it).
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

pub fn run(args: FilterArgs) -> Result<()> {
    let t = Instant::now();
    let data = datasets::synthetic(args.n, args.queries, 384, 42);
    let nq = data.n_queries();
    let dir = tempfile::Builder::new()
        .prefix("shoal-filter-bench")
        .tempdir_in(&args.work_dir)?;
    let mut cfg = CollectionConfig::new(384, Metric::InnerProduct);
    let (nlist, sample) = shoal_proto::sizing::size_index(args.n as u64, 65_536);
    cfg.index.nlist = nlist as usize;
    cfg.train_sample = sample as usize;
    cfg.nprobe = args.nprobe;
    cfg.refine_factor = args.refine;
    cfg.auto_rebuild_tail = 0;
    cfg.build_threads = 2;
    cfg.payload_fields = ["r:number", "c:keyword"]
        .iter()
        .map(|f| PayloadField::parse(f).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let shard = Shard::create(dir.path(), cfg)?;
    shard.set_auto_compact(false);
    let keywords = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    let ingest = Instant::now();
    for start in (0..args.n).step_by(10_000) {
        let docs: Vec<Document> = (start..(start + 10_000).min(args.n))
            .map(|i| {
                let h = mix(i as u64);
                Document {
                    id: format!("d{i}"),
                    text: None,
                    metadata: Metadata::from_value(&json!({
                        "r": h % 1000,
                        "c": keywords[((h >> 20) % 10) as usize],
                    }))
                    .expect("an object"),
                    vector: data.row(i).to_vec(),
                }
            })
            .collect();
        shard.upsert(docs)?;
    }
    let ingest_s = ingest.elapsed().as_secs_f64();
    let build = Instant::now();
    let g = shard.rebuild(None)?;
    let build_s = build.elapsed().as_secs_f64();
    emit(
        json!({"section": "setup", "rows": args.n, "dim": 384, "nlist": g.params.nlist,
                "pq_m": g.params.m, "ingest_s": ingest_s, "build_s": build_s}),
    );

    let base = SearchParams {
        k: K,
        nprobe: Some(args.nprobe),
        refine_factor: Some(args.refine),
        mode: SearchMode::Rerank,
        ..SearchParams::default()
    };
    let ids = |r: &shoal_engine::SearchResult| -> Vec<String> {
        r.hits.iter().map(|h| h.id.to_string()).collect()
    };
    let recall = |got: &[Vec<String>], truth: &[Vec<String>]| -> f64 {
        let (mut hit, mut all) = (0usize, 0usize);
        for (g, t) in got.iter().zip(truth) {
            all += t.len();
            hit += g.iter().filter(|id| t.contains(id)).count();
        }
        hit as f64 / all.max(1) as f64
    };
    // Unfiltered: the reference point each filtered figure is a ratio to.
    let exact = SearchParams {
        mode: SearchMode::Exact,
        ..base.clone()
    };
    let (truth, _) = run_queries(nq, 2, |i| {
        ids(&shard.search(data.query(i), exact.clone()).unwrap())
    });
    let (got, unfiltered_qps) = run_queries(nq, args.threads, |i| {
        ids(&shard.search(data.query(i), base.clone()).unwrap())
    });
    let unfiltered_recall = recall(&got, &truth);
    emit(
        json!({"section": "unfiltered", "recall_at_10": unfiltered_recall, "qps": unfiltered_qps}),
    );

    let cases: [(&str, String); 5] = [
        (
            "50%",
            r#"{"must": [{"key": "r", "range": {"lt": 500}}]}"#.into(),
        ),
        (
            "10%",
            r#"{"must": [{"key": "r", "range": {"lt": 100}}]}"#.into(),
        ),
        (
            "10% keyword",
            r#"{"must": [{"key": "c", "match": "a"}]}"#.into(),
        ),
        (
            "1%",
            r#"{"must": [{"key": "r", "range": {"lt": 10}}]}"#.into(),
        ),
        ("0.1%", r#"{"must": [{"key": "r", "match": 0}]}"#.into()),
    ];
    let mut summary = Vec::new();
    for (name, json_filter) in &cases {
        let filter = Arc::new(Filter::from_json(json_filter).map_err(anyhow::Error::msg)?);
        let with = |plan: Option<FilterPlan>, mode: SearchMode| SearchParams {
            filter: Some(filter.clone()),
            plan,
            mode,
            ..base.clone()
        };
        let reference = with(None, SearchMode::Exact);
        let (truth, _) = run_queries(nq, 2, |i| {
            ids(&shard.search(data.query(i), reference.clone()).unwrap())
        });
        let admitted = truth.iter().map(Vec::len).min().unwrap_or(0);
        let mut row = serde_json::Map::new();
        for (label, plan) in [
            ("chosen", None),
            ("exact", Some(FilterPlan::Exact)),
            ("ivf-filtered", Some(FilterPlan::IvfFiltered)),
            ("post-filtered", Some(FilterPlan::PostFiltered)),
        ] {
            let p = with(plan, SearchMode::Rerank);
            let (res, qps) = run_queries(nq, args.threads, |i| {
                shard.search(data.query(i), p.clone()).unwrap()
            });
            let got: Vec<Vec<String>> = res.iter().map(&ids).collect();
            let ran = res[0].plan.map(FilterPlan::name).unwrap_or("none");
            let r = recall(&got, &truth);
            let short = got.iter().filter(|g| g.len() < K).count();
            emit(
                json!({"section": "filtered", "selectivity": name, "filter": json_filter,
                        "plan": label, "ran": ran, "recall_at_10": r, "qps": qps,
                        "qps_vs_unfiltered": qps / unfiltered_qps,
                        "queries_short_of_k": short, "fewest_truth_hits": admitted}),
            );
            row.insert(
                label.to_string(),
                json!({"ran": ran, "recall_at_10": (r * 1e4).round() / 1e4,
                       "qps": qps.round(), "qps_vs_unfiltered": (qps / unfiltered_qps * 1e3).round() / 1e3}),
            );
        }
        summary.push(json!({"selectivity": name, "plans": row}));
    }
    emit(
        json!({"summary": "filter", "rows": args.n, "queries": nq, "nprobe": args.nprobe,
                "refine": args.refine, "threads": args.threads,
                "unfiltered": {"recall_at_10": unfiltered_recall, "qps": unfiltered_qps},
                "filtered": summary, "took_s": t.elapsed().as_secs_f64()}),
    );
    Ok(())
}
