//! `shoal demo`: the shard engine end to end on real data, with every claim checked
//! as it is printed (recall against exact search, class agreement, read-your-writes,
//! recovery on reopen).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde_json::json;

use shoal_engine::{CollectionConfig, Document, Metadata, SearchMode, SearchParams, Shard};
use shoal_eval::datasets;
use shoal_eval::percentile;

pub struct DemoConfig {
    pub data_dir: Option<PathBuf>,
    pub queries: usize,
    pub dataset_dir: PathBuf,
}

const K: usize = 10;

pub fn run(cfg: &DemoConfig) -> Result<()> {
    let ds = datasets::fashion_mnist(&cfg.dataset_dir)?;
    let labels = ds.labels.as_ref().context("fashion-mnist has labels")?;
    let query_labels = ds
        .query_labels
        .as_ref()
        .context("fashion-mnist has labels")?;
    let temp;
    let dir = match &cfg.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    println!(
        "shoal demo: {} images of {} pixels, shard at {}",
        ds.n_base(),
        ds.dim,
        dir.display()
    );
    let mut config = CollectionConfig::new(ds.dim, ds.metric);
    // 60k vectors: ~sqrt(n) lists keeps lists full and training short.
    config.index.nlist = 256;
    // 78 points per list; PQ training dominates the build and its cost is linear in it.
    config.train_sample = 20_000;
    config.auto_rebuild_tail = 0;
    let shard = Shard::open_or_create(&dir, config)?;

    if shard.len() < ds.n_base() {
        let started = Instant::now();
        for start in (shard.len()..ds.n_base()).step_by(5000) {
            let batch: Vec<Document> = (start..(start + 5000).min(ds.n_base()))
                .map(|i| Document {
                    id: format!("train-{i}"),
                    text: Some(format!("fashion-mnist training image {i}")),
                    metadata: Metadata::from_value(&json!({ "class": labels[i] }))
                        .expect("an object"),
                    vector: ds.row(i).to_vec(),
                })
                .collect();
            shard.upsert(batch)?;
        }
        let s = started.elapsed().as_secs_f64();
        println!(
            "ingested {} documents durably in {s:.1}s ({:.0} docs/s, one fsync per 5000-doc batch)",
            ds.n_base(),
            ds.n_base() as f64 / s
        );
    } else {
        println!(
            "reopened an existing shard holding {} documents",
            shard.len()
        );
    }
    let info = match shard.stats().serving {
        Some(g) if shard.stats().fresh_rows == 0 => g,
        _ => {
            let g = shard.rebuild(None)?;
            println!(
                "built index generation {} ({}) over {} vectors in {:.1}s: {:.0} bytes per vector on disk",
                g.id,
                g.params.factory_string(),
                g.indexed_vectors,
                g.build_seconds,
                g.index_file_bytes as f64 / g.indexed_vectors as f64
            );
            g
        }
    };

    let nq = cfg.queries.min(ds.n_queries());
    let (mut lat, mut recall_hits, mut same_class) = (Vec::with_capacity(nq), 0usize, 0usize);
    for (i, query_label) in query_labels.iter().enumerate().take(nq) {
        let q = ds.query(i);
        let t = Instant::now();
        let got = shard.search(q, SearchParams::top(K))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let exact = shard.search(
            q,
            SearchParams {
                mode: SearchMode::Exact,
                ..SearchParams::top(K)
            },
        )?;
        recall_hits += got
            .hits
            .iter()
            .filter(|h| exact.hits.iter().any(|e| e.id == h.id))
            .count();
        for h in &got.hits {
            let row: usize = h.id.trim_start_matches("train-").parse()?;
            same_class += usize::from(labels[row] == *query_label);
        }
    }
    lat.sort_by(f64::total_cmp);
    let recall = recall_hits as f64 / (nq * K) as f64;
    println!(
        "{nq} test images searched (nprobe {}, refine x{}): recall@10 vs exact search {recall:.4}, p50 {:.2} ms, p99 {:.2} ms",
        shard.config().nprobe,
        shard.config().refine_factor,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    let agreement = same_class as f64 / (nq * K) as f64;
    println!(
        "{:.1}% of the top-10 neighbours share the query's class",
        agreement * 100.0
    );
    let first = shard.search(ds.query(0), SearchParams::top(3))?;
    for h in &first.hits {
        let doc = shard.get(&h.id)?.context("hit is stored")?;
        println!(
            "  query 0 ({}) -> {} {} distance {:.0}",
            query_labels[0], h.id, doc.metadata, h.score
        );
    }

    // Read-your-writes: a write is searchable before any rebuild, a delete at once.
    let probe = "demo-probe";
    shard.upsert(vec![Document {
        id: probe.into(),
        text: Some("a copy of test image 0".into()),
        metadata: Metadata::from_value(&json!({ "class": query_labels[0] })).expect("an object"),
        vector: ds.query(0).to_vec(),
    }])?;
    let r = shard.search(ds.query(0), SearchParams::top(1))?;
    ensure!(&*r.hits[0].id == probe, "fresh write not found first");
    println!(
        "upserted {probe}: it is the top hit at once ({} fresh row scanned exactly)",
        r.fresh_rows
    );
    shard.delete(vec![probe.into()])?;
    let r = shard.search(ds.query(0), SearchParams::top(K))?;
    ensure!(
        r.hits.iter().all(|h| &*h.id != probe),
        "deleted document returned"
    );
    println!("deleted {probe}: gone from results");

    drop(shard);
    let reopened = Shard::open(&dir)?;
    ensure!(reopened.len() == ds.n_base(), "reopen lost documents");
    println!(
        "reopened: {} documents, serving generation {}",
        reopened.len(),
        info.id
    );
    println!(
        "{}",
        json!({"demo": "shard", "docs": ds.n_base(), "queries": nq, "recall_at_10": recall,
               "class_agreement_at_10": agreement, "p50_ms": percentile(&lat, 0.5),
               "p99_ms": percentile(&lat, 0.99), "generation": info.id})
    );
    ensure!(recall >= 0.95, "recall@10 {recall:.3} below 0.95");
    Ok(())
}
