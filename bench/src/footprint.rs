//! `shoal-bench footprint` (issue 19): what a vector costs in memory.
//! - The id index and row table alone, next to the structure they replaced (a
//!   `HashMap<Arc<str>, u64>` of live ids, a `Vec` of `(Arc<str>, u64)` rows and a
//!   liveness bitset), each filled with the same ids in its own fresh process:
//!   anonymous resident bytes per row over the process's baseline, insert and lookup
//!   nanoseconds (hits in random order, then misses) on the same ids.
//! - One whole shard after a reopen (inner product, the default IVF-PQ with PQ48 at
//!   384-d, ids of `--id-bytes`): anonymous resident bytes per vector of a fresh
//!   process that opened it and answered queries (the FAISS codes and ids, the row
//!   table and id index, the request dedupe; the vectors are page cache, reported apart).
//! - Then compaction (`--churn`): half the documents replaced and a quarter deleted,
//!   disk and resident memory measured, the shard compacted (a `Compact` batch, then
//!   the rewrite), measured again; disk is the files' allocated blocks, next to the
//!   live documents' own bytes (their records and vectors).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shoal_engine::{CollectionConfig, Document, Metadata, Metric, RowTable, Shard};

use crate::measure::rss;

#[derive(Args)]
pub struct FootprintArgs {
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Length of every document id (zero-padded numbers).
    #[arg(long, default_value_t = 24)]
    id_bytes: usize,
    /// Lookups timed per structure (hits; as many misses again).
    #[arg(long, default_value_t = 1_000_000)]
    lookups: usize,
    /// The id index and row table only (no shard ingest, build and reopen).
    #[arg(long)]
    index_only: bool,
    /// After the shard's measurement: replace half, delete a quarter, compact.
    #[arg(long)]
    churn: bool,
    /// Where the shard is written (a temporary dir under it).
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
}

fn id_of(i: usize, width: usize) -> String {
    format!("{i:0>width$}")
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

pub fn run(a: FootprintArgs) -> Result<()> {
    let mut index = Vec::new();
    for kind in ["hashmap", "rows"] {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["footprint-child", kind])
            .args(["--rows", &a.rows.to_string()])
            .args(["--id-bytes", &a.id_bytes.to_string()])
            .args(["--lookups", &a.lookups.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "footprint child {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        emit(v.clone());
        index.push(v);
    }
    let ratio = |field: &str| {
        index[1][field].as_f64().unwrap_or(f64::NAN) / index[0][field].as_f64().unwrap_or(f64::NAN)
    };
    let mut summary = json!({
        "bench": "footprint", "rows": a.rows, "id_bytes": a.id_bytes,
        "index_bytes_per_row": {"hashmap": index[0]["bytes_per_row"], "rows": index[1]["bytes_per_row"]},
        "rows_vs_hashmap": {
            "bytes": ratio("bytes_per_row"), "hit_ns": ratio("hit_ns"),
            "miss_ns": ratio("miss_ns"), "insert_ns": ratio("insert_ns"),
        },
    });
    if !a.index_only {
        let shard = whole_shard(&a)?;
        emit(shard.clone());
        summary["shard"] = shard;
    }
    emit(summary);
    Ok(())
}

/// Child: fills one structure with `rows` ids and reports its resident bytes and
/// lookup times.
pub fn child(kind: &str, rows: usize, id_bytes: usize, lookups: usize) -> Result<()> {
    let (anon0, _) = rss();
    let t = Instant::now();
    let table = match kind {
        "hashmap" => Table::Old(Old::fill(rows, id_bytes)),
        "rows" => {
            let mut r = RowTable::with_capacity(0);
            for i in 0..rows {
                r.put(&id_of(i, id_bytes), i as u64 * 1700);
            }
            Table::New(r)
        }
        other => anyhow::bail!("unknown structure {other}"),
    };
    let insert_ns = t.elapsed().as_nanos() as f64 / rows as f64;
    #[cfg(target_env = "gnu")]
    // SAFETY: glibc's malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    let (anon1, _) = rss();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let hits: Vec<String> = (0..lookups.min(rows * 4))
        .map(|_| id_of(rng.random_range(0..rows), id_bytes))
        .collect();
    let misses: Vec<String> = (0..hits.len())
        .map(|_| id_of(rows + rng.random_range(0..rows.max(1)), id_bytes))
        .collect();
    let time = |ids: &[String], want: bool| -> Result<f64> {
        let t = Instant::now();
        let mut found = 0usize;
        for id in ids {
            found += usize::from(table.get(id).is_some());
        }
        let ns = t.elapsed().as_nanos() as f64 / ids.len().max(1) as f64;
        anyhow::ensure!(
            found == if want { ids.len() } else { 0 },
            "{kind}: {found} of {} found",
            ids.len()
        );
        Ok(ns)
    };
    // Twice each, the second timed: the first warms the caches and the branch history.
    time(&hits, true)?;
    let hit_ns = time(&hits, true)?;
    time(&misses, false)?;
    let miss_ns = time(&misses, false)?;
    println!(
        "{}",
        json!({"step": "id_index", "kind": kind, "rows": rows, "id_bytes": id_bytes,
            "bytes_per_row": anon1.saturating_sub(anon0) as f64 / rows as f64,
            "insert_ns": insert_ns, "hit_ns": hit_ns, "miss_ns": miss_ns})
    );
    drop(table);
    Ok(())
}

enum Table {
    Old(Old),
    New(RowTable),
}

impl Table {
    fn get(&self, id: &str) -> Option<u64> {
        match self {
            Table::Old(o) => o.ids.get(id).copied(),
            Table::New(r) => r.get(id),
        }
    }
}

/// The engine's structure before issue 19, as it was: an `Arc<str>` per row shared by
/// the map and the row table.
struct Old {
    ids: std::collections::HashMap<Arc<str>, u64>,
    // Held for the memory they take, as the engine held them; never read here.
    #[allow(dead_code)]
    rows: Vec<(Arc<str>, u64)>,
    #[allow(dead_code)]
    live: Vec<u64>,
}

impl Old {
    fn fill(n: usize, id_bytes: usize) -> Self {
        let mut o = Old {
            ids: Default::default(),
            rows: Vec::new(),
            live: Vec::new(),
        };
        for i in 0..n {
            let id: Arc<str> = Arc::from(id_of(i, id_bytes));
            let row = o.rows.len() as u64;
            o.ids.insert(id.clone(), row);
            if row.is_multiple_of(64) {
                o.live.push(0);
            }
            o.live[(row / 64) as usize] |= 1 << (row % 64);
            o.rows.push((id, i as u64 * 1700));
        }
        o
    }
}

/// A shard of `rows` random unit vectors (inner product) with ids of `id_bytes`,
/// built, closed, and reopened by a fresh process (`shard-rss`).
fn random_doc(rng: &mut rand::rngs::StdRng, i: usize, a: &FootprintArgs) -> Document {
    let mut v: Vec<f32> = (0..a.dimension)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter_mut().for_each(|x| *x /= norm);
    Document {
        id: id_of(i, a.id_bytes),
        text: None,
        metadata: Metadata::none(),
        vector: v,
    }
}

/// Allocated bytes of every file in `dir` (sparse preallocation not counted).
fn dir_bytes(dir: &std::path::Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.blocks() * 512;
    }
    Ok(total)
}

/// A reopened shard's resident memory, measured in a fresh process.
fn shard_rss(dir: &std::path::Path) -> Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("shard-rss")
        .arg(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "shard-rss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Replaces half the documents, deletes a quarter, measures, compacts, measures.
fn churn_and_compact(a: &FootprintArgs, dir: &std::path::Path) -> Result<serde_json::Value> {
    let shard = Shard::open_manual(dir)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for start in (0..a.rows / 2).step_by(10_000) {
        let batch: Vec<Document> = (start..(start + 10_000).min(a.rows / 2))
            .map(|i| random_doc(&mut rng, i, a))
            .collect();
        shard.upsert(batch)?;
    }
    let doomed: Vec<String> = (a.rows / 2..a.rows / 2 + a.rows / 4)
        .map(|i| id_of(i, a.id_bytes))
        .collect();
    for chunk in doomed.chunks(10_000) {
        shard.delete(chunk.to_vec())?;
    }
    let live = shard.len() as u64;
    // Each live document's own bytes: its vector, and its record (id, seq, row, crc,
    // framing: measured below from the compacted file, which holds only live rows).
    let rows_before = shard.rows() as u64;
    drop(shard);
    let disk_before = dir_bytes(dir)?;
    let rss_before = shard_rss(dir)?;
    let shard = Shard::open_manual(dir)?;
    let ack = shard.write(vec![shoal_engine::WriteOp::Compact])?;
    let report = shard
        .compact_pending()?
        .context("the compaction just logged is pending")?;
    anyhow::ensure!(report.seq == ack.seq && report.rows_after == live);
    drop(shard);
    let disk_after = dir_bytes(dir)?;
    let rss_after = shard_rss(dir)?;
    let live_bytes = report.bytes_after as f64;
    let per =
        |v: &serde_json::Value| v["anon_bytes_added"].as_f64().unwrap_or(f64::NAN) / live as f64;
    Ok(json!({
        "step": "compaction", "rows": a.rows, "replaced": a.rows / 2, "deleted": a.rows / 4,
        "live": live, "rows_before": rows_before, "rows_after": report.rows_after,
        "compaction_s": report.seconds,
        "segment_bytes": {"before": report.bytes_before, "after": report.bytes_after},
        "dir_bytes": {"before": disk_before, "after": disk_after},
        "dir_vs_live_segments": {"before": disk_before as f64 / live_bytes, "after": disk_after as f64 / live_bytes},
        "anon_bytes_per_live_vector": {"before": per(&rss_before), "after": per(&rss_after)},
    }))
}

fn whole_shard(a: &FootprintArgs) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir_in(&a.work_dir).context("creating the shard dir")?;
    let mut cfg = CollectionConfig::new(a.dimension, Metric::InnerProduct);
    cfg.auto_rebuild_tail = 0;
    let index = cfg.index;
    let shard = Shard::create(dir.path(), cfg)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let t = Instant::now();
    for start in (0..a.rows).step_by(10_000) {
        let batch: Vec<Document> = (start..(start + 10_000).min(a.rows))
            .map(|i| random_doc(&mut rng, i, a))
            .collect();
        shard.upsert(batch)?;
    }
    let ingest_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let info = shard.rebuild(None)?;
    let build_s = t.elapsed().as_secs_f64();
    drop(shard);
    let mem = shard_rss(dir.path())?;
    let anon = mem["anon_bytes_added"].as_f64().unwrap_or(0.0);
    if a.churn {
        emit(churn_and_compact(a, dir.path())?);
    }
    Ok(json!({
        "step": "shard", "rows": a.rows, "id_bytes": a.id_bytes, "metric": "inner_product",
        "index": index.factory_string(), "ingest_s": ingest_s, "build_s": build_s,
        "anon_bytes_per_vector": anon / a.rows as f64,
        "faiss_code_and_id_bytes": index.code_bytes() + 8,
        "index_file_bytes_per_vector": info.index_file_bytes as f64 / a.rows as f64,
        "file_bytes": mem["file_bytes"],
    }))
}
