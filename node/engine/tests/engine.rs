//! Shard engine integration tests: semantics, bad input, search quality, online
//! rebuilds, corruption handling and crash recovery under SIGKILL.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use shoal_engine::{
    CollectionConfig, Document, IvfPqParams, Metadata, Metric, Precision, Scoring, SearchMode,
    SearchParams, Shard, ShardError, WalOp, WriteOp,
};
use shoal_proto::routing::{shard_of, Routing};

/// The id of a batch's first operation.
fn b1_id(b: &shoal_engine::WalBatch) -> String {
    match &b.ops[0] {
        WalOp::Upsert { id, .. } | WalOp::Delete { id } | WalOp::SetVector { id, .. } => id.clone(),
        _ => String::new(),
    }
}

const DIM: usize = 32;

fn config(metric: Metric) -> CollectionConfig {
    let mut c = CollectionConfig::new(DIM, metric);
    c.index = IvfPqParams {
        nlist: 16,
        m: 8,
        nbits: 8,
    };
    c.nprobe = 4;
    c.train_sample = 4096;
    c.auto_rebuild_tail = 0;
    c
}

/// splitmix64: deterministic pseudo-random stream from a seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| mix(h ^ b as u64))
}

/// A clustered vector derived from `key`: 32 cluster centres plus noise.
fn vector_for(key: &str) -> Vec<f32> {
    let h = hash(key);
    let centre = h % 32;
    (0..DIM)
        .map(|i| {
            let c = (mix(centre * 1000 + i as u64) % 1000) as f32 / 100.0;
            let n = (mix(h ^ (i as u64) << 32) % 1000) as f32 / 1000.0 - 0.5;
            c + n
        })
        .collect()
}

fn doc(id: &str) -> Document {
    Document {
        id: id.into(),
        text: Some(format!("text of {id}")),
        metadata: Metadata::from_value(&json!({ "key": id, "n": hash(id) % 100 })).unwrap(),
        vector: vector_for(id),
    }
}

fn docs(prefix: &str, n: usize) -> Vec<Document> {
    (0..n).map(|i| doc(&format!("{prefix}{i}"))).collect()
}

fn exact(k: usize) -> SearchParams {
    SearchParams {
        k,
        mode: SearchMode::Exact,
        ..SearchParams::default()
    }
}

fn top_id(shard: &Shard, v: &[f32], p: SearchParams) -> String {
    shard.search(v, p.clone()).unwrap().hits[0].id.to_string()
}

#[test]
fn t10_upsert_replace_delete_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::create(dir.path(), config(Metric::L2)).unwrap();
    let ack = shard.upsert(docs("d", 50)).unwrap();
    assert_eq!((ack.seq, ack.upserted), (1, 50));

    // Replace d7 with the vector of "other": the old version must never come back.
    let mut replaced = doc("d7");
    replaced.vector = vector_for("other");
    replaced.metadata = Metadata::from_value(&json!({ "version": 2 })).unwrap();
    shard.upsert(vec![replaced.clone()]).unwrap();
    let ack = shard.delete(vec!["d3".into(), "missing".into()]).unwrap();
    assert_eq!(ack.deleted, 1);

    let check = |s: &Shard| {
        assert_eq!(s.len(), 49);
        assert!(s.get("d3").unwrap().is_none());
        let got = s.get("d7").unwrap().unwrap();
        assert_eq!(got.vector, replaced.vector);
        assert_eq!(got.metadata.to_value(), json!({ "version": 2 }));
        assert_eq!(
            s.get("d8").unwrap().unwrap().text.as_deref(),
            Some("text of d8")
        );
        let hits = s.search(&vector_for("d7"), exact(50)).unwrap().hits;
        assert_eq!(hits.len(), 49);
        assert!(hits.iter().all(|h| &*h.id != "d3"));
        assert_eq!(hits.iter().filter(|h| &*h.id == "d7").count(), 1);
        assert_eq!(top_id(s, &vector_for("other"), exact(1)), "d7");
        assert_ne!(top_id(s, &vector_for("d7"), exact(1)), "d7");
    };
    check(&shard);
    drop(shard);
    let shard = Shard::open(dir.path()).unwrap();
    check(&shard);

    // The same through an index generation, and after another reopen.
    shard
        .rebuild(Some(IvfPqParams {
            nlist: 4,
            m: 8,
            nbits: 4,
        }))
        .unwrap();
    let r = shard
        .search(&vector_for("other"), SearchParams::top(3))
        .unwrap();
    assert_eq!(r.generation, Some(1));
    assert_eq!(&*r.hits[0].id, "d7");
    drop(shard);
    check(&Shard::open(dir.path()).unwrap());
}

#[test]
fn t11_bad_input_is_refused_with_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad_cfg = config(Metric::L2);
    bad_cfg.index.m = 7;
    let e = Shard::create(dir.path(), bad_cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("pq m = 7 must divide the dimension 32"), "{e}");

    let shard = Shard::create(dir.path(), config(Metric::InnerProduct)).unwrap();
    // An index build on an empty shard is refused (it used to panic the caller).
    let e = shard.rebuild(None).unwrap_err();
    assert!(
        matches!(e, ShardError::NotEnoughVectors { have: 0, .. }),
        "{e:?}"
    );
    shard.upsert(docs("ok", 20)).unwrap();
    let before = shard.stats();

    let mut wrong_dim = doc("w");
    wrong_dim.vector.pop();
    let mut nan = doc("n");
    nan.vector[5] = f32::NAN;
    let mut inf = doc("i");
    inf.vector[0] = f32::INFINITY;
    let mut empty = doc("e");
    empty.id.clear();
    let mut huge = doc("h");
    huge.text = Some("x".repeat(2 << 20));
    let cases = [
        (wrong_dim, "dimension 31, the collection's is 32"),
        (nan, "non-finite value at position 5 (NaN)"),
        (inf, "non-finite value at position 0 (inf)"),
        (empty, "id is empty"),
        (huge, "the limit is 1048576"),
    ];
    for (bad, expect) in cases {
        // A good document before the bad one: the batch must be refused whole.
        let batch = vec![
            WriteOp::Upsert(doc("good-in-bad-batch")),
            WriteOp::Upsert(bad),
        ];
        let e = shard.write(batch).unwrap_err();
        assert!(matches!(e, ShardError::InvalidDocument { .. }), "{e:?}");
        assert!(e.to_string().contains(expect), "{e} lacks {expect}");
    }
    assert!(shard.get("good-in-bad-batch").unwrap().is_none());
    let after = shard.stats();
    assert_eq!((after.rows, after.last_seq), (before.rows, before.last_seq));

    let q = vector_for("q");
    let query_err =
        |p: SearchParams, v: &[f32]| shard.search(v, p.clone()).unwrap_err().to_string();
    assert!(query_err(SearchParams::top(0), &q).contains("top_k 0 must be between 1 and 10000"));
    assert!(query_err(SearchParams::top(10_001), &q).contains("top_k 10001"));
    let p = SearchParams {
        nprobe: Some(17),
        ..SearchParams::top(5)
    };
    // Over nlist: every list is probed, as FAISS does.
    assert_eq!(
        shard.search(&q, p.clone()).unwrap().hits,
        shard
            .search(
                &q,
                SearchParams {
                    nprobe: Some(16),
                    ..SearchParams::top(5)
                }
            )
            .unwrap()
            .hits
    );
    let p0 = SearchParams {
        nprobe: Some(0),
        ..SearchParams::top(5)
    };
    assert!(query_err(p0, &q).contains("nprobe 0"));
    assert!(query_err(SearchParams::top(5), &q[..8]).contains("dimension 8"));
    let mut nanq = q.clone();
    nanq[1] = f32::NAN;
    assert!(query_err(SearchParams::top(5), &nanq).contains("position 1 (NaN)"));
    let e = shard
        .rebuild(Some(IvfPqParams {
            nlist: 8,
            m: 5,
            nbits: 8,
        }))
        .unwrap_err();
    assert!(
        e.to_string().contains("must divide the dimension 32"),
        "{e}"
    );
    let e = shard
        .rebuild(Some(IvfPqParams {
            nlist: 64,
            m: 8,
            nbits: 8,
        }))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ShardError::NotEnoughVectors {
                have: 20,
                need: 256
            }
        ),
        "{e}"
    );
}

fn recall(shard: &Shard, queries: &[Vec<f32>], p: SearchParams) -> f64 {
    let mut hit = 0;
    for q in queries {
        let truth: Vec<_> = shard.search(q, exact(p.k)).unwrap().hits;
        let got = shard.search(q, p.clone()).unwrap().hits;
        hit += got
            .iter()
            .filter(|h| truth.iter().any(|t| t.id == h.id))
            .count();
    }
    hit as f64 / (queries.len() * p.k) as f64
}

#[test]
fn t20_generate_rank_search_and_read_your_writes() {
    for metric in [Metric::L2, Metric::InnerProduct] {
        let dir = tempfile::tempdir().unwrap();
        let shard = Shard::create(dir.path(), config(metric)).unwrap();
        for chunk in docs("v", 6000).chunks(1000) {
            shard.upsert(chunk.to_vec()).unwrap();
        }
        let info = shard.rebuild(None).unwrap();
        assert_eq!(
            (info.id, info.indexed_vectors, info.covered_rows),
            (1, 6000, 6000)
        );
        let queries: Vec<_> = (0..50).map(|i| vector_for(&format!("query{i}"))).collect();
        let rerank = recall(&shard, &queries, SearchParams::top(10));
        let approx = recall(
            &shard,
            &queries,
            SearchParams {
                mode: SearchMode::Approximate,
                ..SearchParams::top(10)
            },
        );
        assert!(rerank >= 0.9, "{metric:?} rerank recall {rerank}");
        assert!(
            rerank >= approx,
            "{metric:?}: rerank {rerank} < approx {approx}"
        );
        // Exact scores come back with re-ranking.
        let q = &queries[0];
        let r = shard.search(q, SearchParams::top(5)).unwrap();
        let e = shard.search(q, exact(5)).unwrap();
        for h in &r.hits {
            let stored = shard.get(&h.id).unwrap().unwrap().vector;
            assert!((metric.score(q, &stored) - h.score).abs() < 1e-3);
        }
        // The best of 10 is the exact best for nearly every query (always when the
        // true nearest is among the 100 candidates: their scores are exact).
        let same_top = queries
            .iter()
            .filter(|q| {
                let r = shard.search(q, SearchParams::top(10)).unwrap();
                r.hits[0].id == shard.search(q, exact(10)).unwrap().hits[0].id
            })
            .count();
        assert!(
            same_top >= 45,
            "{metric:?}: top hit exact for {same_top} of 50"
        );

        // Writes after the build are visible at once through the fresh-tail scan.
        let mut fresh = doc("fresh");
        // Scaled so it is the top hit under inner product too.
        let scale = if metric == Metric::L2 { 1.0 } else { 10.0 };
        fresh.vector = vector_for("query0").iter().map(|x| x * scale).collect();
        shard.upsert(vec![fresh]).unwrap();
        let r = shard
            .search(&vector_for("query0"), SearchParams::top(1))
            .unwrap();
        assert_eq!((&*r.hits[0].id, r.fresh_rows), ("fresh", 1));
        // Deleted and replaced rows inside the index are never returned.
        let victim = r.hits[0].id.to_string();
        shard.delete(vec![victim.clone()]).unwrap();
        let indexed = e.hits[0].id.to_string();
        shard.delete(vec![indexed.clone()]).unwrap();
        let r = shard.search(q, SearchParams::top(100)).unwrap();
        assert!(r.hits.iter().all(|h| *h.id != *victim && *h.id != *indexed));
    }
}

#[test]
fn t21_a_generation_is_a_function_of_the_live_documents_not_their_arrival_order() {
    // The same documents reach two shards in opposite orders, with a different
    // history of replaced and deleted rows; each trains generation 1 on 4,096 of its
    // 6,000 live rows. The training sample is keyed by the documents' ids, so both
    // train the same quantizers on the same vectors in the same order and give the
    // same approximate (PQ) scores. Sampling row positions, as before, picks other
    // vectors in each and moves every score.
    let all = docs("o", 6000);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Shard::create(da.path(), config(Metric::L2)).unwrap();
    let b = Shard::create(db.path(), config(Metric::L2)).unwrap();
    for chunk in all.chunks(1000) {
        a.upsert(chunk.to_vec()).unwrap();
    }
    let mut reversed = all.clone();
    reversed.reverse();
    b.upsert(docs("gone", 500)).unwrap();
    for chunk in reversed.chunks(700) {
        b.upsert(chunk.to_vec()).unwrap();
    }
    b.upsert(all[..300].to_vec()).unwrap();
    b.delete((0..500).map(|i| format!("gone{i}")).collect())
        .unwrap();
    assert_eq!((a.len(), b.len()), (6000, 6000));
    assert_eq!(
        (a.rebuild(None).unwrap().id, b.rebuild(None).unwrap().id),
        (1, 1)
    );
    let approx = SearchParams {
        mode: SearchMode::Approximate,
        nprobe: Some(2),
        ..SearchParams::top(10)
    };
    for i in 0..50 {
        let q = vector_for(&format!("query{i}"));
        let scores = |s: &Shard| -> Vec<f32> {
            s.search(&q, approx.clone())
                .unwrap()
                .hits
                .iter()
                .map(|h| h.score)
                .collect()
        };
        let (sa, sb) = (scores(&a), scores(&b));
        assert_eq!(sa.len(), 10);
        for (x, y) in sa.iter().zip(&sb) {
            assert!(
                (x - y).abs() <= 1e-3 * x.abs().max(1.0),
                "query {i}: {sa:?} vs {sb:?}"
            );
        }
    }
}

#[test]
fn t30_rebuild_while_searching_and_writing() {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::create(dir.path(), config(Metric::L2)).unwrap();
    shard.upsert(docs("base", 8000)).unwrap();
    shard.rebuild(None).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let searches = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut threads = Vec::new();
    for t in 0..2 {
        let (shard, stop, searches, acked) =
            (shard.clone(), stop.clone(), searches.clone(), acked.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                // Read-your-writes across the swap: the newest acked doc is always found.
                let newest = acked.lock().unwrap().last().cloned();
                let target = newest.unwrap_or_else(|| format!("base{}", i % 8000));
                let r = shard
                    .search(&vector_for(&target), SearchParams::top(3))
                    .expect("search during rebuild");
                assert!(
                    r.hits.iter().any(|h| *h.id == *target),
                    "thread {t}: {target} missing from {:?}",
                    r.hits
                );
                searches.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let writer = {
        let (shard, stop, acked) = (shard.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("live{i}");
                shard.upsert(vec![doc(&id)]).expect("write during rebuild");
                acked.lock().unwrap().push(id);
                i += 1;
            }
        })
    };
    let builds: Vec<_> = (0..3)
        .map(|_| {
            let h = shard.spawn_rebuild(Some(IvfPqParams {
                nlist: 32,
                m: 16,
                nbits: 8,
            }));
            let info = h.join().unwrap().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            info
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    writer.join().unwrap();
    assert_eq!(
        builds.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert!(builds
        .windows(2)
        .all(|w| w[1].covered_rows >= w[0].covered_rows));
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty() && searches.load(Ordering::Relaxed) > 0);
    let check = |s: &Shard| {
        assert_eq!(s.len(), 8000 + acked.len());
        for id in acked
            .iter()
            .chain(["base0".to_string(), "base7999".to_string()].iter())
        {
            assert_eq!(s.get(id).unwrap().unwrap().vector, vector_for(id), "{id}");
        }
        assert_eq!(s.stats().serving.unwrap().id, 4);
    };
    check(&shard);
    // Only the serving generation's index file is left.
    let gens: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(gens, vec!["gen-00000004.faiss".to_string()]);
    drop(shard);
    check(&Shard::open(dir.path()).unwrap());
}

fn flip_byte(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap();
    b[offset as usize] ^= 0x5a;
    fs::write(path, b).unwrap();
}

/// A shard with an index generation, reopened once so its segments are checkpointed.
fn built_shard(dir: &Path) {
    let shard = Shard::create(dir, config(Metric::L2)).unwrap();
    for chunk in docs("c", 2000).chunks(500) {
        shard.upsert(chunk.to_vec()).unwrap();
    }
    shard.rebuild(None).unwrap();
    drop(shard);
    drop(Shard::open(dir).unwrap());
}

#[test]
fn t40_corrupt_index_file_is_refused_before_faiss_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    built_shard(dir.path());
    let index = dir.path().join("gen-00000001.faiss");
    let len = fs::metadata(&index).unwrap().len();
    flip_byte(&index, len / 2);
    let e = Shard::open(dir.path()).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, ShardError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("gen-00000001.faiss") && msg.contains("checksum"),
        "{msg}"
    );
    // Truncation too.
    flip_byte(&index, len / 2);
    fs::OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert!(Shard::open(dir.path())
        .err()
        .unwrap()
        .to_string()
        .contains("checksum"));
}

#[test]
fn t41_corrupt_segments_name_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    built_shard(dir.path());
    let docs_path = dir.path().join("docs.dat");
    let mid = fs::metadata(&docs_path).unwrap().len() / 2;
    flip_byte(&docs_path, mid);
    let msg = Shard::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("docs.dat at offset"), "{msg}");
    flip_byte(&docs_path, mid);
    Shard::open(dir.path()).unwrap();

    // A damaged vector: open does not read the vectors (its time grows with the
    // index, not the data); the scrubber's pass and a read of the row find it, named.
    let vec_path = dir.path().join("vectors.f32");
    flip_byte(&vec_path, 128 * 100 + 3);
    let shard = Shard::open(dir.path()).unwrap();
    let (next, bytes) = shard.scrub(0, 100).unwrap();
    assert_eq!((next, bytes), (100, 100 * 128));
    let e = shard.scrub(next, 100).err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("vector of row 100 (\"c100\")") && msg.contains("vectors.f32 at offset 12800"),
        "{msg}"
    );
    let msg = shard.get("c100").err().unwrap().to_string();
    assert!(msg.contains("vector of row 100"), "{msg}");
    assert!(shard.get("c101").unwrap().is_some());
    // Past the last row: nothing to check, start over.
    assert_eq!(shard.scrub(2000, 100).unwrap(), (2000, 0));
    // Marked corrupt: out of service, and no reopen serves the damage again.
    shard.mark_corrupt(&e).unwrap();
    assert!(shard.failure().unwrap().contains("corrupt data"));
    assert!(shard.upsert(docs("z", 1)).is_err());
    drop(shard);
    let msg = Shard::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("vector of row 100"), "{msg}");
    // Repaired (here: the byte put back), it opens, checked, and the mark is lifted.
    flip_byte(&vec_path, 128 * 100 + 3);
    let shard = Shard::open(dir.path()).unwrap();
    assert!(!dir.path().join("CORRUPT").exists());
    assert_eq!(shard.scrub(0, u64::MAX).unwrap(), (2000, 2000 * 128));
}

#[test]
fn t42_torn_wal_tail_is_cut_and_mid_log_damage_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::create(dir.path(), config(Metric::L2)).unwrap();
    for i in 0..5 {
        shard.upsert(docs(&format!("w{i}-"), 10)).unwrap();
    }
    // Keep the log un-checkpointed: copy it while the shard is open, as a crash would.
    let wal: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    assert_eq!(wal.len(), 1);
    let log = fs::read(&wal[0]).unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    for e in fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, snapshot.path().join(p.file_name().unwrap())).unwrap();
    }
    drop(shard);
    let wal_copy = snapshot.path().join(wal[0].file_name().unwrap());

    // A torn last frame: the unacknowledged batch disappears, the rest survive.
    let mut torn = log.clone();
    torn.truncate(log.len() - 7);
    fs::write(&wal_copy, &torn).unwrap();
    let s = Shard::open(snapshot.path()).unwrap();
    assert_eq!(s.len(), 40);
    assert!(s.get("w3-9").unwrap().is_some() && s.get("w4-0").unwrap().is_none());
    drop(s);

    // Damage in the middle of the log, with good frames after it, is refused.
    let broken = tempfile::tempdir().unwrap();
    for e in fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, broken.path().join(p.file_name().unwrap())).unwrap();
    }
    let manifest = broken.path().join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    m["applied_seq"] = json!(0);
    m["docs_len"] = json!(0);
    m["rows"] = json!(0);
    fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let mut bad = log.clone();
    bad[log.len() / 3] ^= 0xff;
    let name = wal[0].file_name().unwrap();
    for e in fs::read_dir(broken.path()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "log") {
            fs::remove_file(p).unwrap();
        }
    }
    fs::write(broken.path().join(name), &bad).unwrap();
    let msg = Shard::open(broken.path()).err().unwrap().to_string();
    assert!(
        msg.contains(".log at offset") && msg.contains("followed by a valid record"),
        "{msg}"
    );
}

/// Every file in `dir` with its length, inode and allocated blocks (what a full disk
/// would refuse).
fn files_of(dir: &Path) -> Vec<(String, u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.ino(),
                m.blocks(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Issue 14: a full disk must not stop a node's replicas from reopening. Opening a
/// cleanly closed shard allocates nothing (no checkpoint, no new log file, no manifest
/// rewrite, no block of any file), and the reopened log takes writes that survive the
/// next open.
#[test]
fn t44_opening_a_cleanly_closed_shard_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::create(dir.path(), config(Metric::L2)).unwrap();
    shard.upsert(docs("a", 50)).unwrap();
    drop(shard);
    let before = files_of(dir.path());
    let s = Shard::open(dir.path()).unwrap();
    assert_eq!(s.len(), 50);
    assert_eq!(files_of(dir.path()), before, "open allocated space");
    s.upsert(docs("b", 10)).unwrap();
    let last = s.last();
    // Crash-like: the writes stay in the log, which the next open replays.
    let copy = tempfile::tempdir().unwrap();
    for e in fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
    }
    drop(s);
    let s = Shard::open(copy.path()).unwrap();
    assert_eq!((s.len(), s.last()), (60, last));
    assert!(s.get("b9").unwrap().is_some());
}

#[test]
fn t43_interrupted_build_leaves_the_old_generation_serving() {
    let dir = tempfile::tempdir().unwrap();
    built_shard(dir.path());
    // What a build killed mid-way leaves behind: a partial file and an unreferenced one.
    fs::write(
        dir.path().join("gen-00000002.faiss.partial"),
        b"half an index",
    )
    .unwrap();
    fs::write(dir.path().join("gen-00000003.faiss"), b"never swapped in").unwrap();
    let s = Shard::open(dir.path()).unwrap();
    assert_eq!(s.stats().serving.unwrap().id, 1);
    assert!(!dir.path().join("gen-00000002.faiss.partial").exists());
    assert!(!dir.path().join("gen-00000003.faiss").exists());
    assert_eq!(top_id(&s, &vector_for("c42"), SearchParams::top(1)), "c42");
    assert_eq!(s.rebuild(None).unwrap().id, 2);
}

/// Batch `i` of the crash test: its size and ids are a function of `i`.
fn crash_batch(i: u64) -> Vec<Document> {
    let n = 1 + (mix(i) % 40) as usize;
    (0..n).map(|j| doc(&format!("k{i}-{j}"))).collect()
}

/// Child side of `t50`: ingests batches forever, printing each acknowledgement.
#[test]
#[ignore = "child process of t50_sigkill_at_random_points_loses_no_acknowledged_write"]
fn t50_child_writer() {
    let dir = std::env::var("SHOAL_CRASH_DIR").expect("run by t50");
    let start: u64 = std::env::var("SHOAL_CRASH_START").unwrap().parse().unwrap();
    let mut cfg = config(Metric::L2);
    cfg.auto_rebuild_tail = 1500; // builds run (and get killed) in the background too
    let shard = Shard::open_or_create(Path::new(&dir), cfg).unwrap();
    for i in start.. {
        shard.upsert(crash_batch(i)).unwrap();
        println!("ack {i}");
    }
}

/// Runs the ignored test `child` of this binary as a process writing into `dir` from
/// batch `start`, printing "ack i" per acknowledged batch; kills it `after` its first
/// acknowledgement. Returns the first and the later acknowledged batches.
fn run_child_until_killed(child: &str, dir: &Path, start: u64, after: Duration) -> (u64, Vec<u64>) {
    let exe = std::env::current_exe().unwrap();
    let mut proc = Command::new(&exe)
        .args([
            "--exact",
            child,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SHOAL_CRASH_DIR", dir)
        .env("SHOAL_CRASH_START", start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = proc.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // libtest may print its "test ... " prefix on the same line.
            if let Some(pos) = line.find("ack ") {
                if tx
                    .send(line[pos + 4..].trim().parse::<u64>().unwrap())
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    // Wait for some progress, then kill at the moment asked.
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("child acked nothing");
    std::thread::sleep(after);
    proc.kill().unwrap();
    proc.wait().unwrap();
    reader.join().unwrap();
    (first, rx.try_iter().collect())
}

#[test]
fn t50_sigkill_at_random_points_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut next = 0u64;
    let mut rounds_with_build = 0;
    let started = Instant::now();
    for round in 0..24u64 {
        let (first, rest) = run_child_until_killed(
            "t50_child_writer",
            dir.path(),
            next,
            Duration::from_millis(mix(round) % 400),
        );
        let mut this_round = vec![first];
        this_round.extend(rest);
        assert!(this_round.windows(2).all(|w| w[1] == w[0] + 1));
        let last = *this_round.last().unwrap();
        acked.extend(this_round);

        let shard = Shard::open(dir.path()).unwrap();
        if shard.stats().serving.is_some() {
            rounds_with_build += 1;
        }
        for &i in &acked {
            for d in crash_batch(i) {
                let got = shard.get(&d.id).unwrap();
                let got = got.unwrap_or_else(|| panic!("round {round}: acked {} lost", d.id));
                assert_eq!(got.vector, d.vector, "{}", d.id);
                assert_eq!(got.metadata, d.metadata);
            }
        }
        // The batch in flight at the kill is whole or absent; nothing after it exists.
        let in_flight = crash_batch(last + 1);
        let present = in_flight
            .iter()
            .filter(|d| shard.get(&d.id).unwrap().is_some())
            .count();
        assert!(
            present == 0 || present == in_flight.len(),
            "round {round}: batch {} is partial ({present}/{})",
            last + 1,
            in_flight.len()
        );
        if present > 0 {
            acked.push(last + 1);
        }
        assert!(shard.get(&crash_batch(last + 2)[0].id).unwrap().is_none());
        let expected: usize = acked.iter().map(|&i| crash_batch(i).len()).sum();
        if shard.len() != expected {
            let stray: Vec<u64> = (0..last + 3)
                .filter(|i| !acked.contains(i))
                .filter(|&i| shard.get(&crash_batch(i)[0].id).unwrap().is_some())
                .collect();
            panic!("round {round}: {} docs, expected {expected}; unacked batches present: {stray:?}, last {last}", shard.len());
        }
        let probe = &crash_batch(acked[acked.len() / 2])[0];
        assert_eq!(
            top_id(&shard, &probe.vector, SearchParams::top(1)),
            probe.id
        );
        next = last + 2;
    }
    eprintln!(
        "t50: {} batches acked over 24 kills, {rounds_with_build} reopens with an index, {:?}",
        acked.len(),
        started.elapsed()
    );
}

#[test]
fn t60_replication_primitives_epochs_request_ids_and_snapshots() {
    let (pd, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Shard::create(pd.path(), config(Metric::L2)).unwrap();
    let backup = Shard::create(bd.path(), config(Metric::L2)).unwrap();
    // The primary stamps batches with its epoch and returns them for shipping.
    let (a1, b1) = primary
        .write_as(vec![WriteOp::Upsert(doc("a"))], 1, "req-1")
        .unwrap();
    let (a2, b2) = primary
        .write_as(vec![WriteOp::Upsert(doc("b"))], 2, "req-2")
        .unwrap();
    assert_eq!((a1.seq, a2.seq), (1, 2));
    assert_eq!(primary.epochs(), vec![(1, 1), (2, 2)]);
    assert_eq!(shoal_engine::epoch_at(&primary.epochs(), 1), 1);
    assert_eq!(shoal_engine::epoch_at(&primary.epochs(), 2), 2);
    // A retried request id is answered from the first attempt, and writes nothing.
    let (dup, none) = primary
        .write_as(vec![WriteOp::Upsert(doc("zzz"))], 2, "req-1")
        .unwrap();
    assert!(dup.duplicate && dup.seq == 1 && none.is_none());
    assert_eq!(primary.len(), 2);
    // A backup applies batches only in order, and learns the request ids too.
    let (b1, b2) = ((*b1.unwrap()).clone(), (*b2.unwrap()).clone());
    assert!(backup.append_replicated(std::slice::from_ref(&b2)).is_err());
    // A peer's metadata is checked as a client's is: one JSON object, or nothing
    // (`null`, as builds before metadata was kept as bytes logged it).
    let mut bad = b1.clone();
    for (text, ok) in [
        ("[1]", false),
        ("{\"k\":", false),
        ("null", true),
        ("{}", true),
    ] {
        if let WalOp::Upsert { metadata, .. } = &mut bad.ops[0] {
            *metadata = text.to_string();
        }
        let tmp = tempfile::tempdir().unwrap();
        let other = Shard::create(tmp.path(), backup.config().clone()).unwrap();
        let r = other.append_replicated(std::slice::from_ref(&bad));
        assert_eq!(r.is_ok(), ok, "{text}: {r:?}");
        if ok {
            let got = other.get(&b1_id(&bad)).unwrap().unwrap();
            assert_eq!(
                got.metadata.as_str(),
                if text == "null" { "" } else { text }
            );
        }
    }
    assert_eq!(backup.append_replicated(&[b1, b2]).unwrap(), 2);
    assert_eq!(backup.last(), (2, 2));
    assert_eq!(backup.epochs(), primary.epochs());
    let (dup, _) = backup
        .write_as(vec![WriteOp::Upsert(doc("x"))], 2, "req-2")
        .unwrap();
    assert!(dup.duplicate);
    // History, epochs and request ids survive a reopen (log replay).
    drop(backup);
    let backup = Shard::open(bd.path()).unwrap();
    assert_eq!(backup.last(), (2, 2));
    assert!(backup.write_as(vec![], 2, "req-2").unwrap().0.duplicate);
    // A snapshot names a consistent prefix of the segments; copied and installed
    // elsewhere, it opens to the same documents and history.
    primary
        .write_as(vec![WriteOp::Upsert(doc("c"))], 2, "")
        .unwrap();
    let snap = primary.snapshot().unwrap();
    assert_eq!(snap.last_seq, 3);
    let cd = tempfile::tempdir().unwrap();
    copy_snapshot(&snap, cd.path());
    let copy = Shard::open(cd.path()).unwrap();
    assert_eq!(copy.last(), (3, 2));
    assert_eq!(copy.len(), 3);
    assert_eq!(copy.get("c").unwrap().unwrap().vector, doc("c").vector);
    assert!(
        copy.take_replayed().is_empty(),
        "a snapshot has no log to replay"
    );
    // After a crash (retired: no checkpoint on close) the reopened primary hands the
    // batches its log replayed to replication, once, so a backup that missed them gets
    // them by Append. (The snapshot above checkpointed: the log starts after seq 3.)
    for (i, id) in ["d", "e"].into_iter().enumerate() {
        primary
            .write_as(vec![WriteOp::Upsert(doc(id))], 2, &format!("req-{id}"))
            .unwrap();
        assert_eq!(primary.last().0, 4 + i as u64);
    }
    primary.retire();
    drop(primary);
    let primary = Shard::open(pd.path()).unwrap();
    let replayed = primary.take_replayed();
    let seqs: Vec<(u64, u64)> = replayed.iter().map(|b| (b.seq, b.epoch)).collect();
    assert_eq!(seqs, vec![(4, 2), (5, 2)]);
    assert_eq!(replayed[1].request_id, "req-e");
    assert!(primary.take_replayed().is_empty(), "taken once");
}

/// Copies a snapshot's files through its handles, as a transfer does, and installs it.
fn copy_snapshot(snap: &shoal_engine::SnapshotSource, to: &Path) {
    use std::os::unix::fs::FileExt;
    for (name, len, f) in &snap.files {
        let mut data = vec![0u8; *len as usize];
        f.read_exact_at(&mut data, 0).unwrap();
        fs::write(to.join(name), &data).unwrap();
    }
    Shard::install_manifest(to, &snap.manifest).unwrap();
}

#[test]
fn t61_a_snapshot_carries_the_serving_index_even_past_its_successor() {
    let pd = tempfile::tempdir().unwrap();
    let primary = Shard::create(pd.path(), config(Metric::L2)).unwrap();
    for chunk in docs("c", 2000).chunks(500) {
        primary.upsert(chunk.to_vec()).unwrap();
    }
    let built = primary.rebuild(None).unwrap();
    // Written after the build: the copy's fresh tail, as the primary's.
    primary.upsert(docs("t", 30)).unwrap();
    primary.delete(vec!["c7".into()]).unwrap();
    let approx = SearchParams {
        k: 10,
        mode: SearchMode::Approximate,
        ..SearchParams::default()
    };
    let queries = ["c7", "c100", "t3", "q-1", "q-2"];
    let answer = |shard: &Shard, q: &str| -> Vec<String> {
        let r = shard.search(&vector_for(q), approx.clone()).unwrap();
        assert_eq!(r.generation, Some(built.id), "{q}");
        assert_eq!(r.fresh_rows, 30, "{q}");
        r.hits.into_iter().map(|h| h.id.to_string()).collect()
    };
    let want: Vec<Vec<String>> = queries.iter().map(|q| answer(&primary, q)).collect();
    let snap = primary.snapshot().unwrap();
    let names: Vec<&str> = snap.files.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[2].starts_with("gen-"), "{names:?}");
    // A rebuild swaps in a successor and removes the file the snapshot names: the
    // handle taken with the snapshot still reads it whole.
    let next = primary.rebuild(None).unwrap();
    assert!(next.id > built.id);
    assert!(!pd.path().join(names[2]).exists());
    let cd = tempfile::tempdir().unwrap();
    copy_snapshot(&snap, cd.path());
    let copy = Shard::open(cd.path()).unwrap();
    let stats = copy.stats();
    assert_eq!(stats.serving.as_ref().map(|g| g.id), Some(built.id));
    // The copy answers by IVF-PQ at once, as the primary's same generation did: the
    // same approximate hits, the same fresh tail, the deleted row gone.
    for (q, want) in queries.iter().zip(&want) {
        let got = answer(&copy, q);
        assert!(got.iter().all(|id| id != "c7"), "deleted row served");
        assert_eq!(&got, want, "{q}");
    }
    // Its own next build numbers on past the generation it received.
    assert!(copy.rebuild(None).unwrap().id > built.id);
}

/// Fetches generation `id` from `from` in small chunks, as a backup does, into a file
/// under `to`; returns (meta, path).
fn fetch_generation(from: &Shard, id: u64, to: &Path) -> (Vec<u8>, std::path::PathBuf) {
    let path = to.join("incoming.faiss");
    let mut data = Vec::new();
    loop {
        let c = from
            .generation_chunk(id, data.len() as u64, 100_000)
            .unwrap();
        data.extend_from_slice(&c.data);
        if data.len() as u64 == c.total {
            fs::write(&path, &data).unwrap();
            return (c.meta, path);
        }
    }
}

#[test]
fn t62_a_backup_takes_its_primarys_generation_only_with_the_same_history() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let open = |i: usize| Shard::create(dirs[i].path(), config(Metric::L2)).unwrap();
    let (primary, backup, other) = (open(0), open(1), open(2));
    // The backup follows the primary batch by batch; `other` has the same documents
    // written in another epoch (another history at the same positions).
    for (i, chunk) in docs("c", 2000).chunks(250).enumerate() {
        let ops: Vec<WriteOp> = chunk.iter().cloned().map(WriteOp::Upsert).collect();
        let (_, batch) = primary.write_as(ops.clone(), 1, &format!("r{i}")).unwrap();
        backup
            .append_replicated(&[(*batch.unwrap()).clone()])
            .unwrap();
        other.write_as(ops, 2, &format!("r{i}")).unwrap();
    }
    let built = primary.rebuild(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (meta, file) = fetch_generation(&primary, built.id, tmp.path());
    // Another history: refused by name, nothing changed.
    let e = other.install_generation(&meta, &file).unwrap_err();
    assert!(e.to_string().contains("histories differ"), "{e}");
    assert!(other.stats().serving.is_none());
    // A damaged transfer: refused on its checksum.
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = tmp.path().join("bad.faiss");
    fs::write(&bad, &bytes).unwrap();
    let e = backup.install_generation(&meta, &bad).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    // A backup behind the rows it covers waits for them.
    let behind_dir = tempfile::tempdir().unwrap();
    let behind = Shard::create(behind_dir.path(), config(Metric::L2)).unwrap();
    let e = behind.install_generation(&meta, &file).unwrap_err();
    assert!(e.to_string().contains("holds up to 0"), "{e}");
    // The same history: taken as built, answering exactly as the primary does.
    let got = backup.install_generation(&meta, &file).unwrap();
    assert_eq!((got.id, got.covered_rows), (built.id, built.covered_rows));
    let approx = SearchParams {
        k: 10,
        mode: SearchMode::Approximate,
        ..SearchParams::default()
    };
    for q in ["c1", "c999", "q-7"] {
        let a = primary.search(&vector_for(q), approx.clone()).unwrap();
        let b = backup.search(&vector_for(q), approx.clone()).unwrap();
        assert_eq!(a.hits, b.hits, "{q}");
        assert_eq!(b.generation, Some(built.id));
    }
    // Once served it is not taken again; it survives a reopen; the backup's own next
    // build numbers past it.
    let e = backup.install_generation(&meta, &file).unwrap_err();
    assert!(e.to_string().contains("already served"), "{e}");
    drop(backup);
    let backup = Shard::open(dirs[1].path()).unwrap();
    assert_eq!(backup.stats().serving.map(|g| g.id), Some(built.id));
    assert!(backup.rebuild(None).unwrap().id > built.id);
    // A generation no longer served is refused to a fetcher.
    primary.rebuild(None).unwrap();
    let e = primary.generation_chunk(built.id, 0, 10).unwrap_err();
    assert!(e.to_string().contains("not served"), "{e}");
}

// ---- compaction (issue 19) ----

/// Bytes of the shard's segment files (documents and the vectors it holds: the vector
/// file grows in 64 MiB steps, so its rows count, not its length).
fn segment_bytes(shard: &Shard) -> u64 {
    let docs: u64 = fs::read_dir(shard.dir())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("docs"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    docs + shard.rows() as u64 * DIM as u64 * 4
}

/// What a shard answers: exact and generate-rank hits (ids and scores) for a few
/// queries, and a read of every id in `ids`.
fn answers(shard: &Shard, ids: &[String]) -> (Vec<Vec<shoal_engine::Hit>>, Vec<Option<Vec<f32>>>) {
    let mut hits = Vec::new();
    for q in ["q1", "q2", "c5", "c1500", "v-c10"] {
        hits.push(shard.search(&vector_for(q), exact(20)).unwrap().hits);
        hits.push(
            shard
                .search(&vector_for(q), SearchParams::top(10))
                .unwrap()
                .hits,
        );
    }
    let got = ids
        .iter()
        .map(|id| shard.get(id).unwrap().map(|d| d.vector))
        .collect();
    (hits, got)
}

/// 2,000 documents under an index, then half of them replaced and a quarter deleted
/// (after the build: the replacements are the fresh tail).
fn churned_shard(dir: &Path) -> (Shard, Vec<String>) {
    let shard = Shard::create(dir, config(Metric::L2)).unwrap();
    shard.set_auto_compact(false);
    for chunk in docs("c", 2000).chunks(500) {
        shard.upsert(chunk.to_vec()).unwrap();
    }
    shard.rebuild(None).unwrap();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(250) {
        let replaced = chunk
            .iter()
            .map(|i| {
                let mut d = doc(&format!("c{i}"));
                d.vector = vector_for(&format!("v-c{i}"));
                d
            })
            .collect();
        shard.upsert(replaced).unwrap();
    }
    shard
        .delete((1000..1500).map(|i| format!("c{i}")).collect())
        .unwrap();
    let ids = (0..2000).map(|i| format!("c{i}")).collect();
    (shard, ids)
}

#[test]
fn t70_a_compaction_drops_dead_rows_and_answers_exactly_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, ids) = churned_shard(dir.path());
    let before = answers(&shard, &ids);
    let stats = shard.stats();
    let bytes_before = segment_bytes(&shard);
    assert_eq!((stats.rows, stats.live_docs), (3000, 1500));

    let ack = shard.write(vec![WriteOp::Compact]).unwrap();
    assert_eq!(shard.compaction_pending(), Some(ack.seq));
    // Logged but not yet done: nothing changed.
    assert_eq!(answers(&shard, &ids), before);
    let report = shard.compact_pending().unwrap().expect("a compaction ran");
    assert_eq!(
        (report.seq, report.rows_before, report.rows_after),
        (ack.seq, 3000, 1500)
    );
    assert_eq!(shard.compaction_pending(), None);
    assert_eq!(shard.layout(), ack.seq);
    let after = shard.stats();
    assert_eq!((after.rows, after.live_docs), (1500, 1500));
    // The generation built before serves on through the row map: the same fresh
    // tail (the 1,000 replacements), the same hits and scores.
    assert_eq!(
        after.serving.as_ref().map(|g| g.id),
        stats.serving.as_ref().map(|g| g.id)
    );
    assert_eq!(after.fresh_rows, stats.fresh_rows);
    assert_eq!(answers(&shard, &ids), before);
    let bytes_after = segment_bytes(&shard);
    eprintln!(
        "t70: segments {bytes_before} -> {bytes_after} bytes, {:.3}s",
        report.seconds
    );
    assert!(
        bytes_after * 10 < bytes_before * 6,
        "{bytes_before} -> {bytes_after}"
    );
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n == "docs.dat" || n == "vectors.f32"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.starts_with("remap-")), "{names:?}");

    // Writes go on in the new numbering; all of it survives a reopen.
    shard.upsert(docs("n", 20)).unwrap();
    shard.delete(vec!["c0".into(), "n3".into()]).unwrap();
    let mut ids = ids;
    ids.extend((0..20).map(|i| format!("n{i}")));
    let before = answers(&shard, &ids);
    assert!(before.1[0].is_none());
    drop(shard);
    let shard = Shard::open(dir.path()).unwrap();
    assert_eq!(shard.layout(), ack.seq);
    assert_eq!(answers(&shard, &ids), before);
    // The next build numbers rows as they are now: its row map is gone.
    shard.rebuild(None).unwrap();
    assert_eq!(answers(&shard, &ids).1, before.1);
    let exact_after: Vec<_> = answers(&shard, &ids).0.into_iter().step_by(2).collect();
    let exact_before: Vec<_> = before.0.into_iter().step_by(2).collect();
    assert_eq!(exact_after, exact_before);
    assert!(!fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("remap-")));
}

#[test]
fn t71_a_compaction_under_concurrent_writes_deletes_and_queries() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = churned_shard(dir.path());
    // Documents nobody touches from here on: every read and search must find them.
    let stable: Vec<String> = (1500..2000).map(|i| format!("c{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (shard, stable, stop) = (shard.clone(), stable.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = &stable[n % stable.len()];
                let got = shard
                    .get(id)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{id} lost"));
                assert_eq!(got.vector, vector_for(id));
                for p in [exact(1), SearchParams::top(1)] {
                    let hits = shard.search(&vector_for(id), p.clone()).unwrap().hits;
                    assert_eq!(&*hits[0].id, id.as_str(), "{p:?}");
                }
                n += 1;
            }
            n
        })
    };
    let writer = {
        let shard = shard.clone();
        std::thread::spawn(move || {
            // id -> the key its vector derives from (None: deleted).
            let mut model: HashMap<String, Option<String>> = HashMap::new();
            for i in 0..150u64 {
                let mut ops = Vec::new();
                for j in 0..20 {
                    let id = format!("w{}", (i * 20 + j) % 1700);
                    let key = format!("{id}-{i}");
                    let mut d = doc(&id);
                    d.vector = vector_for(&key);
                    ops.push(WriteOp::Upsert(d));
                    model.insert(id, Some(key));
                }
                let gone = format!("w{}", mix(i) % 1700);
                if model.contains_key(&gone)
                    && !ops
                        .iter()
                        .any(|o| matches!(o, WriteOp::Upsert(d) if d.id == gone))
                {
                    model.insert(gone.clone(), None);
                    ops.push(WriteOp::Delete(gone));
                }
                shard.write(ops).unwrap();
            }
            model
        })
    };
    // Two compactions while the writer runs: the second may land mid-rewrite of the
    // first.
    let mut reports = 0;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(50));
        shard.write(vec![WriteOp::Compact]).unwrap();
        while shard.compaction_pending().is_some() {
            match shard.compact_pending() {
                Ok(r) => reports += usize::from(r.is_some()),
                Err(ShardError::CompactionInProgress(_)) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let model = writer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reports >= 1);
    let check = |shard: &Shard| {
        for (id, key) in &model {
            let got = shard.get(id).unwrap().map(|d| d.vector);
            assert_eq!(got, key.as_ref().map(|k| vector_for(k)), "{id}");
        }
        let live = model.values().filter(|k| k.is_some()).count() + 500 + 1000;
        assert_eq!(shard.len(), live);
        for (id, key) in model.iter().take(50) {
            let hits = shard
                .search(&vector_for(&format!("{id}-x")), exact(30))
                .unwrap()
                .hits;
            assert!(
                hits.iter()
                    .all(|h| model.get(&*h.id).is_none_or(|k| k.is_some())),
                "dead id served"
            );
            if let Some(k) = key {
                assert_eq!(top_id(shard, &vector_for(k), exact(1)), *id);
            }
        }
    };
    check(&shard);
    eprintln!(
        "t71: {reads} reads during, layout {}, rows {}",
        shard.layout(),
        shard.rows()
    );
    // Compact once more with nothing running: only live rows remain.
    shard.write(vec![WriteOp::Compact]).unwrap();
    shard.compact_pending().unwrap().unwrap();
    assert_eq!(shard.rows(), shard.len());
    check(&shard);
    drop(shard);
    check(&Shard::open(dir.path()).unwrap());
}

/// Replicas that compact at the same logged batch number their rows alike, whenever
/// each does the work, and a backup that missed one compaction's rewrite does the
/// later one only: a generation built on one is taken as built by the other, and a
/// snapshot taken while a compaction is pending compacts on the copy.
#[test]
fn t72_replicas_and_snapshots_number_rows_alike_across_compactions() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let open = |i: usize| {
        let s = Shard::create(dirs[i].path(), config(Metric::L2)).unwrap();
        s.set_auto_compact(false);
        s
    };
    let (primary, backup) = (open(0), open(1));
    let mut seq_batch = 0;
    let mut send = |ops: Vec<WriteOp>| {
        seq_batch += 1;
        let (_, b) = primary.write_as(ops, 1, &format!("r{seq_batch}")).unwrap();
        backup.append_replicated(&[(*b.unwrap()).clone()]).unwrap();
    };
    for chunk in docs("c", 2000).chunks(400) {
        send(chunk.iter().cloned().map(WriteOp::Upsert).collect());
    }
    send(
        (0..600)
            .map(|i| WriteOp::Delete(format!("c{}", i * 3)))
            .collect(),
    );
    send(vec![WriteOp::Compact]);
    // The primary compacts at once; the backup not yet.
    primary.compact_pending().unwrap().unwrap();
    send(docs("d", 300).into_iter().map(WriteOp::Upsert).collect());
    send(
        (0..100)
            .map(|i| WriteOp::Delete(format!("d{}", i * 2)))
            .collect(),
    );
    send(vec![WriteOp::Compact]);
    primary.compact_pending().unwrap().unwrap();
    send(docs("e", 100).into_iter().map(WriteOp::Upsert).collect());
    // The backup does both in one rewrite (the later point supersedes the first).
    let r = backup.compact_pending().unwrap().unwrap();
    assert_eq!(r.rows_before, 2000 + 300 + 100);
    assert_eq!(primary.layout(), backup.layout());
    assert_eq!(primary.rows(), backup.rows());

    // A snapshot taken with a compaction pending compacts on the copy.
    send((0..50).map(|i| WriteOp::Delete(format!("e{i}"))).collect());
    send(vec![WriteOp::Compact]);
    let snap = backup.snapshot().unwrap();
    let cd = tempfile::tempdir().unwrap();
    copy_snapshot(&snap, cd.path());
    let copy = Shard::open(cd.path()).unwrap(); // starts the compaction itself
    primary.compact_pending().unwrap().unwrap();
    backup.compact_pending().unwrap().unwrap();
    let t = Instant::now();
    while copy.compaction_pending().is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the copy never compacted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(copy.layout(), primary.layout());

    // One build, taken as built by both others: the same answers everywhere.
    let built = primary.rebuild(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for other in [&backup, &copy] {
        let (meta, file) = fetch_generation(&primary, built.id, tmp.path());
        let got = other.install_generation(&meta, &file).unwrap();
        assert_eq!(got.covered_rows, built.covered_rows);
    }
    let approx = SearchParams {
        k: 10,
        mode: SearchMode::Approximate,
        ..SearchParams::default()
    };
    for q in ["c1", "c999", "d7", "e70", "q-7"] {
        let a = primary.search(&vector_for(q), approx.clone()).unwrap().hits;
        assert_eq!(
            a,
            backup.search(&vector_for(q), approx.clone()).unwrap().hits,
            "{q}"
        );
        assert_eq!(
            a,
            copy.search(&vector_for(q), approx.clone()).unwrap().hits,
            "{q}"
        );
    }
    // A generation from before a compaction is not shipped: its labels are another
    // numbering.
    send(vec![WriteOp::Compact]);
    primary.compact_pending().unwrap().unwrap();
    let e = primary.generation_chunk(built.id, 0, 10).unwrap_err();
    assert!(e.to_string().contains("compaction"), "{e}");
}

/// Child side of `t73`: batches of upserts and deletes with a compaction every few,
/// compacting in the background, printing each acknowledgement.
#[test]
#[ignore = "child process of t73_sigkill_during_compactions_loses_no_acknowledged_write"]
fn t73_child_writer() {
    let dir = std::env::var("SHOAL_CRASH_DIR").expect("run by t73");
    let start: u64 = std::env::var("SHOAL_CRASH_START").unwrap().parse().unwrap();
    let shard = Shard::open_or_create(Path::new(&dir), config(Metric::L2)).unwrap();
    if shard.stats().serving.is_none() && shard.len() > 1000 {
        shard.spawn_rebuild(None);
    }
    for i in start.. {
        shard.write(churn_batch(i)).unwrap();
        println!("ack {i}");
    }
}

/// Batch `i` of t73: every 7th a compaction, else `crash_batch(i)` and a delete of
/// batch `i - 3`'s first document.
fn churn_batch(i: u64) -> Vec<WriteOp> {
    if i % 7 == 6 {
        return vec![WriteOp::Compact];
    }
    let mut ops: Vec<WriteOp> = crash_batch(i).into_iter().map(WriteOp::Upsert).collect();
    if i >= 3 {
        ops.push(WriteOp::Delete(format!("k{}-0", i - 3)));
    }
    ops
}

#[test]
fn t73_sigkill_during_compactions_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: std::collections::BTreeSet<u64> = Default::default();
    let mut next = 0u64;
    let (mut layouts, mut pending_at_open) = (std::collections::BTreeSet::new(), 0);
    for round in 0..16u64 {
        let (first, rest) = run_child_until_killed(
            "t73_child_writer",
            dir.path(),
            next,
            Duration::from_millis(mix(round ^ 0x73) % 600),
        );
        let mut last = first;
        acked.insert(first);
        for a in rest {
            acked.insert(a);
            last = a;
        }
        // Opened without starting the compaction, to see what the kill left.
        let shard = Shard::open_manual(dir.path()).unwrap();
        pending_at_open += usize::from(shard.compaction_pending().is_some());
        layouts.insert(shard.layout());
        // The batch in flight at the kill is whole or absent.
        let flight = last + 1;
        if flight % 7 != 6 && shard.get(&crash_batch(flight)[0].id).unwrap().is_some() {
            acked.insert(flight);
        }
        let live = |id_batch: u64, j: usize| {
            acked.contains(&id_batch)
                && !(j == 0 && acked.contains(&(id_batch + 3)) && (id_batch + 3) % 7 != 6)
        };
        let mut expected = 0;
        for &i in acked.iter().filter(|&&i| i % 7 != 6) {
            for (j, d) in crash_batch(i).into_iter().enumerate() {
                let got = shard.get(&d.id).unwrap().map(|g| g.vector);
                if live(i, j) {
                    expected += 1;
                    assert_eq!(
                        got.as_ref(),
                        Some(&d.vector),
                        "round {round}: {} lost",
                        d.id
                    );
                } else {
                    assert!(got.is_none(), "round {round}: deleted {} is back", d.id);
                }
            }
        }
        assert_eq!(shard.len(), expected, "round {round}");
        drop(shard);
        next = last + 2;
    }
    eprintln!(
        "t73: {} batches acked over 16 kills, layouts seen {layouts:?}, {pending_at_open} opens with a compaction pending",
        acked.len()
    );
    assert!(
        layouts.len() > 2,
        "compactions never completed: {layouts:?}"
    );
}

// ---- reduced-precision re-ranking copies (issue 19) ----

/// The shard's file names.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn t80_reduced_precision_copies_rerank_close_to_full_precision() {
    let queries: Vec<_> = (0..50).map(|i| vector_for(&format!("query{i}"))).collect();
    for metric in [Metric::L2, Metric::InnerProduct] {
        let mut recalls = Vec::new();
        for p in [Precision::F32, Precision::F16, Precision::Sq8] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(metric);
            cfg.rerank = p;
            let shard = Shard::create(dir.path(), cfg).unwrap();
            for chunk in docs("v", 6000).chunks(1000) {
                shard.upsert(chunk.to_vec()).unwrap();
            }
            let info = shard.rebuild(None).unwrap();
            assert_eq!(info.rerank, p.clone());
            // One code per covered row after a 64-byte-aligned header (SQ8's ranges
            // in it), only when there is a copy.
            let copy = dir.path().join("gen-00000001.rerank");
            match p {
                Precision::F32 => assert!(!copy.exists(), "{:?}", names_in(dir.path())),
                _ => {
                    let header = if p == Precision::Sq8 { 320 } else { 64 };
                    let want = header + 6000 * p.code_bytes(DIM) as u64;
                    assert_eq!(fs::metadata(&copy).unwrap().len(), want, "{p:?}");
                }
            }
            recalls.push(recall(&shard, &queries, SearchParams::top(10)));
            // Scores come from the copy: close to exact, not equal for SQ8.
            let q = &queries[3];
            let hits = shard.search(q, SearchParams::top(10)).unwrap().hits;
            let mut worst = 0f32;
            for h in &hits {
                let stored = shard.get(&h.id).unwrap().unwrap().vector;
                let exact = metric.score(q, &stored);
                worst = worst.max((exact - h.score).abs() / exact.abs().max(1.0));
            }
            let bound = match p {
                Precision::F32 => 1e-4,
                Precision::F16 => 1e-2,
                Precision::Sq8 => 0.1,
            };
            eprintln!("t80 {metric:?} {p:?}: worst relative score error {worst:.5}");
            assert!(worst <= bound, "{metric:?} {p:?}: score error {worst}");
            // Reopened, the copy is loaded and answers the same.
            drop(shard);
            let shard = Shard::open(dir.path()).unwrap();
            assert_eq!(shard.stats().serving.map(|g| g.rerank), Some(p));
            assert_eq!(shard.search(q, SearchParams::top(10)).unwrap().hits, hits);
        }
        eprintln!(
            "t80 {metric:?}: recall@10 f32 {:.3} f16 {:.3} sq8 {:.3}",
            recalls[0], recalls[1], recalls[2]
        );
        assert!(recalls[0] >= 0.9, "{recalls:?}");
        assert!(recalls[1] >= recalls[0] - 0.01, "{recalls:?}");
        assert!(recalls[2] >= recalls[0] - 0.05, "{recalls:?}");
    }
}

#[test]
fn t81_a_copy_follows_rebuilds_backups_snapshots_compactions_and_damage() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let primary = Shard::create(dirs[0].path(), config(Metric::L2)).unwrap();
    let backup = Shard::create(dirs[1].path(), config(Metric::L2)).unwrap();
    primary.set_auto_compact(false);
    backup.set_auto_compact(false);
    let follow = |ops: Vec<WriteOp>, i: &mut usize| {
        *i += 1;
        let (_, batch) = primary.write_as(ops, 1, &format!("r{i}")).unwrap();
        backup
            .append_replicated(&[(*batch.unwrap()).clone()])
            .unwrap();
    };
    let mut n = 0;
    for chunk in docs("c", 2000).chunks(500) {
        follow(chunk.iter().cloned().map(WriteOp::Upsert).collect(), &mut n);
    }
    // Chosen by a rebuild: the next generation has a copy, the one after it none
    // and the file goes with the generation it belonged to.
    assert_eq!(primary.rebuild(None).unwrap().rerank, Precision::F32);
    primary.set_rerank(Precision::Sq8);
    let built = primary.rebuild(None).unwrap();
    assert_eq!((built.id, built.rerank), (2, Precision::Sq8));
    assert!(names_in(dirs[0].path()).contains(&"gen-00000002.rerank".to_string()));

    // A backup taking the generation encodes its own copy, identical to the builder's.
    let tmp = tempfile::tempdir().unwrap();
    let (meta, file) = fetch_generation(&primary, built.id, tmp.path());
    assert_eq!(
        backup.rerank(),
        Precision::F32,
        "the backup's own choice is not asked"
    );
    let got = backup.install_generation(&meta, &file).unwrap();
    assert_eq!(got.rerank, Precision::Sq8);
    let copy = |d: &Path| fs::read(d.join("gen-00000002.rerank")).unwrap();
    assert_eq!(copy(dirs[0].path()), copy(dirs[1].path()));
    let queries: Vec<Vec<f32>> = ["c1", "c999", "q-7", "q-8"]
        .iter()
        .map(|q| vector_for(q))
        .collect();
    let top = |s: &Shard| -> Vec<Vec<shoal_engine::Hit>> {
        queries
            .iter()
            .map(|q| s.search(q, SearchParams::top(10)).unwrap().hits)
            .collect()
    };
    let want = top(&primary);
    assert_eq!(top(&backup), want);

    // A snapshot carries the copy; the restored shard answers the same.
    let snap = primary.snapshot().unwrap();
    let names: Vec<&str> = snap.files.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(names.contains(&"gen-00000002.rerank"), "{names:?}");
    copy_snapshot(&snap, dirs[2].path());
    let restored = Shard::open(dirs[2].path()).unwrap();
    assert_eq!(top(&restored), want);
    drop(restored);

    // A compaction keeps the copy serving through the row map: labels, not rows,
    // index it. The deleted rows go from the answers, nothing else changes.
    follow(
        vec![WriteOp::Delete("c1".into()), WriteOp::Delete("c2".into())],
        &mut n,
    );
    let want: Vec<Vec<shoal_engine::Hit>> = top(&primary);
    assert!(want.iter().flatten().all(|h| &*h.id != "c1"));
    follow(vec![WriteOp::Compact], &mut n);
    primary.compact_pending().unwrap().expect("compacted");
    backup.compact_pending().unwrap().expect("compacted");
    assert_eq!(top(&primary), want);
    assert_eq!(top(&backup), want);
    assert!(names_in(dirs[0].path()).contains(&"gen-00000002.rerank".to_string()));

    // A damaged copy is refused at open, by name; nothing is served from it.
    drop(backup);
    flip_byte(&dirs[1].path().join("gen-00000002.rerank"), 1000);
    let e = Shard::open(dirs[1].path())
        .err()
        .expect("a damaged copy is refused");
    assert!(
        matches!(e, ShardError::Corrupt { ref file, .. } if file.ends_with("gen-00000002.rerank")),
        "{e}"
    );

    // Back to full precision: the next generation has no copy, the old one's goes.
    primary.set_rerank(Precision::F32);
    assert_eq!(primary.rebuild(None).unwrap().rerank, Precision::F32);
    assert!(!names_in(dirs[0].path())
        .iter()
        .any(|n| n.ends_with(".rerank")));
}

/// Issue 19, the engine's half of an online split: a shard cloned at one position into
/// two, each half retaining its routing's ids, answers together exactly as the one
/// shard did (no hit lost, none twice), before and after the retain batches, after a
/// reopen and after compacting the deleted half away; the routing filter hides the
/// sibling's rows before the retain lands; a retain is refused in a batch with others.
#[test]
fn t82_a_shard_cloned_and_retained_in_halves_answers_as_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("s0");
    let shard = Shard::create(&src_dir, config(Metric::InnerProduct)).unwrap();
    for chunk in docs("d", 1200).chunks(200) {
        shard.upsert(chunk.to_vec()).unwrap();
    }
    shard.rebuild(None).unwrap();
    shard.upsert(docs("t", 100)).unwrap(); // a fresh tail past the generation
    shard.delete(vec!["d5".into(), "t7".into()]).unwrap();
    let (seq, epoch) = shard.last();
    let whole: Vec<Vec<(String, f32)>> = (0..20)
        .map(|q| {
            let v = vector_for(&format!("q{q}"));
            let hits = shard.search(&v, exact(10)).unwrap().hits;
            hits.into_iter()
                .map(|h| (h.id.to_string(), h.score))
                .collect()
        })
        .collect();

    let twin_dir = dir.path().join("s1");
    assert_eq!(shard.clone_into(&twin_dir).unwrap(), (seq, epoch));
    assert!(!dir.path().join("s1.partial").exists());
    assert!(matches!(
        shard.clone_into(&twin_dir),
        Err(ShardError::InvalidConfig(_))
    ));
    let twin = Shard::open(&twin_dir).unwrap();
    assert_eq!(twin.last(), (seq, epoch));
    assert_eq!(
        twin.stats().serving.map(|g| g.id),
        shard.stats().serving.map(|g| g.id)
    );

    let halves = [(shard, 0u32), (twin, 1u32)];
    // Merged answers of the two halves, by exact and by IVF-PQ + re-ranking.
    let merged = |halves: &[(Shard, u32)], mode: SearchMode| -> Vec<Vec<(String, f32)>> {
        (0..20)
            .map(|q| {
                let v = vector_for(&format!("q{q}"));
                let mut all: Vec<(String, f32)> = halves
                    .iter()
                    .flat_map(|(s, _)| {
                        let p = SearchParams {
                            k: 10,
                            mode,
                            refine_factor: Some(50),
                            nprobe: Some(16),
                            set: None,
                            filter: None,
                            plan: None,
                        };
                        s.search(&v, p.clone()).unwrap().hits
                    })
                    .map(|h| (h.id.to_string(), h.score))
                    .collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                all.truncate(10);
                all
            })
            .collect()
    };
    // The routing filter alone: each half answers for its ids only.
    for (s, residue) in &halves {
        s.set_routing(Some(Routing::of_shard(*residue, 2)));
    }
    assert_eq!(merged(&halves, SearchMode::Exact), whole);
    assert_eq!(
        merged(&halves, SearchMode::Rerank),
        whole,
        "nprobe 16 of 16 lists: exact candidates"
    );
    for i in [0, 1, 2, 3, 1100] {
        let id = format!("d{i}");
        let owner = shard_of(&id, 2) as usize;
        assert!(halves[owner].0.get(&id).unwrap().is_some(), "{id}");
        assert!(halves[1 - owner].0.get(&id).unwrap().is_none(), "{id}");
    }
    // A retain travels alone and names a routing that exists.
    for (s, residue) in &halves {
        assert!(s
            .write(vec![
                WriteOp::Retain(Routing::of_shard(*residue, 2)),
                WriteOp::Delete("d1".into())
            ])
            .is_err());
        assert!(s
            .write(vec![WriteOp::Retain(Routing {
                modulus: 2,
                residue: 2
            })])
            .is_err());
    }
    // Then the retain batches, with the filter off: the deletes alone keep the halves apart.
    let live = halves[0].0.len();
    let mut deleted = 0;
    for (s, residue) in &halves {
        s.set_routing(None);
        let ack = s
            .write(vec![WriteOp::Retain(Routing::of_shard(*residue, 2))])
            .unwrap();
        assert_eq!(ack.seq, seq + 1);
        deleted += ack.deleted;
    }
    assert_eq!(
        deleted, live,
        "each live document deleted from exactly one half"
    );
    assert_eq!(halves[0].0.len() + halves[1].0.len(), live);
    assert_eq!(merged(&halves, SearchMode::Exact), whole);
    // Durable: a reopen replays or reads the same halves.
    let halves: Vec<(Shard, u32)> = halves
        .into_iter()
        .map(|(s, r)| {
            let d = s.dir().to_owned();
            drop(s);
            (Shard::open_manual(&d).unwrap(), r)
        })
        .collect();
    assert_eq!(merged(&halves, SearchMode::Exact), whole);
    // A compaction reclaims the deleted half of each.
    for (s, _) in &halves {
        let rows = s.stats().rows;
        s.write(vec![WriteOp::Compact]).unwrap();
        s.compact_pending().unwrap();
        let after = s.stats();
        assert_eq!(after.rows, after.live_docs as u64);
        assert!(after.rows * 10 < rows * 6, "{rows} -> {}", after.rows);
    }
    assert_eq!(merged(&halves, SearchMode::Exact), whole);
    assert_eq!(merged(&halves, SearchMode::Rerank), whole);
}

fn query_answers(shard: &Shard, p: SearchParams) -> Vec<Vec<String>> {
    (0..40)
        .map(|i| {
            let r = shard
                .search(&vector_for(&format!("q{i}")), p.clone())
                .unwrap();
            r.hits.into_iter().map(|h| h.id.to_string()).collect()
        })
        .collect()
}

#[test]
fn t90_a_rebuild_stages_gates_switches_rolls_back_and_commits() {
    use shoal_engine::GateConfig;
    let pd = tempfile::tempdir().unwrap();
    let primary = Shard::create(pd.path(), config(Metric::L2)).unwrap();
    primary.set_auto_compact(false);
    for chunk in docs("c", 3000).chunks(500) {
        primary.upsert(chunk.to_vec()).unwrap();
    }
    let old = primary.rebuild(None).unwrap();
    let approx = SearchParams {
        k: 10,
        mode: SearchMode::Approximate,
        ..SearchParams::default()
    };
    let before = query_answers(&primary, approx.clone());
    // A good rebuild (more lists): staged beside the serving one, which still answers.
    let good = IvfPqParams {
        nlist: 32,
        m: 8,
        nbits: 8,
    };
    let staged = primary.build_staged(good, 4096, 7).unwrap();
    assert_eq!(staged.tag, 7);
    let stats = primary.stats();
    assert_eq!(stats.serving.as_ref().map(|g| g.id), Some(old.id));
    assert_eq!(stats.staged.as_ref().map(|g| g.id), Some(staged.id));
    assert_eq!(
        query_answers(&primary, approx.clone()),
        before,
        "staging changes no answer"
    );
    let gate = GateConfig {
        staged: (Some(8), None),
        ..GateConfig::default()
    };
    let report = primary.gate(7, &gate).unwrap();
    assert!(report.passed, "{report}");
    assert!(report.queries >= 200, "{report}");
    assert!(
        report.recent_queries > 0,
        "the ring's real queries replayed: {report}"
    );
    assert!(primary.gate(8, &gate).is_err(), "another operation's");
    // Writes go on; the switch keeps the old generation, the reopen keeps both.
    primary.upsert(docs("w", 50)).unwrap();
    primary.switch_staged(7).unwrap();
    primary.switch_staged(7).unwrap(); // again: nothing to do
    let stats = primary.stats();
    assert_eq!(stats.serving.as_ref().map(|g| g.id), Some(staged.id));
    assert_eq!(stats.previous.as_ref().map(|g| g.id), Some(old.id));
    let after = query_answers(&primary, approx.clone());
    drop(primary);
    let primary = Shard::open(pd.path()).unwrap();
    assert_eq!(
        query_answers(&primary, approx.clone()),
        after,
        "reopened: the switched generation"
    );
    // A compaction while both are held renumbers rows for both.
    primary
        .delete((0..500).map(|i| format!("c{i}")).collect())
        .unwrap();
    primary.write(vec![WriteOp::Compact]).unwrap();
    primary
        .compact_pending()
        .unwrap()
        .expect("a compaction ran");
    let after = query_answers(&primary, approx.clone());
    // Rollback serves the kept generation at once: exactly the answers it gave (the
    // rows written since are the fresh tail of both).
    primary.roll_back(7).unwrap();
    let back = query_answers(&primary, approx.clone());
    // The rolled-back generation's files went, not the compaction's row map the kept
    // one shares with it: the shard reopens and answers alike.
    drop(primary);
    let primary = Shard::open(pd.path()).unwrap();
    primary.set_auto_compact(false);
    assert_eq!(
        query_answers(&primary, approx.clone()),
        back,
        "reopened after the rollback"
    );
    assert_eq!(primary.stats().serving.unwrap().id, old.id);
    assert!(primary.stats().previous.is_none());
    assert_ne!(back, after, "another index answers");
    primary.switch_staged(7).unwrap_err();
    // A bad rebuild (PQ with m = 2, one list probed) is refused by the gate.
    let bad = IvfPqParams {
        nlist: 64,
        m: 2,
        nbits: 4,
    };
    primary.build_staged(bad, 4096, 9).unwrap();
    let bad_gate = GateConfig {
        staged: (Some(1), Some(1)),
        ..GateConfig::default()
    };
    let report = primary.gate(9, &bad_gate).unwrap();
    assert!(!report.passed, "{report}");
    assert!(
        report.recall_staged < report.recall_serving - 0.01,
        "{report}"
    );
    primary.roll_back(9).unwrap();
    assert!(primary.stats().staged.is_none());
    // Commit drops the kept generation's files.
    primary.build_staged(good, 4096, 11).unwrap();
    primary.switch_staged(11).unwrap();
    let kept = primary.stats().previous.unwrap().id;
    primary.commit(11).unwrap();
    assert!(primary.stats().previous.is_none());
    assert!(!pd.path().join(format!("gen-{kept:08}.faiss")).exists());
    primary.roll_back(11).unwrap_err();
    drop(primary);
    let reopened = Shard::open(pd.path()).unwrap();
    assert_eq!(reopened.stats().serving.unwrap().tag, 11);
    // Nothing but the serving generation's files is left.
    let gens: Vec<String> = fs::read_dir(pd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(gens.len(), 1, "{gens:?}");
}

#[test]
fn t91_a_backup_stages_its_primarys_rebuild_and_a_snapshot_carries_only_the_serving_one() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let open = |i: usize| Shard::create(dirs[i].path(), config(Metric::L2)).unwrap();
    let (primary, backup) = (open(0), open(1));
    for (i, chunk) in docs("c", 2000).chunks(250).enumerate() {
        let ops: Vec<WriteOp> = chunk.iter().cloned().map(WriteOp::Upsert).collect();
        let (_, batch) = primary.write_as(ops, 1, &format!("r{i}")).unwrap();
        backup
            .append_replicated(&[(*batch.unwrap()).clone()])
            .unwrap();
    }
    primary.rebuild(None).unwrap();
    let params = IvfPqParams {
        nlist: 32,
        m: 8,
        nbits: 8,
    };
    let staged = primary.build_staged(params, 4096, 5).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (meta, file) = fetch_generation(&primary, staged.id, tmp.path());
    let got = backup.install_staged(&meta, &file).unwrap();
    assert_eq!((got.id, got.tag), (staged.id, 5));
    assert!(backup.stats().serving.is_none(), "staged, not served");
    backup.switch_staged(5).unwrap();
    let approx = SearchParams {
        k: 10,
        mode: SearchMode::Approximate,
        ..SearchParams::default()
    };
    primary.switch_staged(5).unwrap();
    assert_eq!(
        query_answers(&backup, approx.clone()),
        query_answers(&primary, approx.clone())
    );
    // A snapshot ships the serving generation, not the kept one.
    let snap = primary.snapshot().unwrap();
    let gens = snap
        .files
        .iter()
        .filter(|(n, _, _)| n.starts_with("gen-"))
        .count();
    assert_eq!(gens, 1);
    copy_snapshot(&snap, dirs[2].path());
    let copy = Shard::open(dirs[2].path()).unwrap();
    assert!(copy.stats().previous.is_none());
    assert_eq!(copy.stats().serving.unwrap().tag, 5);
}

/// Another "model": 48-d vectors of the same keys, clustered differently.
fn vector2_for(key: &str) -> Vec<f32> {
    let h = hash(key) ^ 0xabcdef;
    let centre = h % 16;
    (0..48)
        .map(|i| {
            let c = (mix(centre * 7000 + i as u64) % 1000) as f32 / 100.0;
            let n = (mix(h ^ (i as u64) << 40) % 1000) as f32 / 1000.0 - 0.5;
            c + n
        })
        .collect()
}

/// An upsert as a gateway sends it during a re-embed: both models' vectors.
fn dual(tag: u64, id: &str, key: &str) -> Vec<WriteOp> {
    let mut d = doc(id);
    d.vector = vector_for(key);
    vec![
        WriteOp::Upsert(d),
        WriteOp::SetVector {
            tag,
            id: id.into(),
            version: 0,
            vector: vector2_for(key),
        },
    ]
}

fn set_search(k: usize, set: Option<u64>) -> SearchParams {
    SearchParams {
        k,
        mode: SearchMode::Exact,
        set,
        ..SearchParams::default()
    }
}

#[test]
fn t92_a_re_embed_fills_a_vector_set_drops_stale_re_encodings_and_commits_it() {
    use shoal_engine::GateConfig;
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let primary = Shard::create(dirs[0].path(), config(Metric::L2)).unwrap();
    let backup = Shard::create(dirs[1].path(), config(Metric::L2)).unwrap();
    primary.set_auto_compact(false);
    backup.set_auto_compact(false);
    let n = std::cell::Cell::new(0);
    // Every write on the primary is replicated to the backup at once.
    let write = |p: &Shard, ops: Vec<WriteOp>| -> Result<shoal_engine::WriteAck, ShardError> {
        n.set(n.get() + 1);
        let (ack, batch) = p.write_as(ops, 1, &format!("r{}", n.get()))?;
        backup
            .append_replicated(&[(*batch.unwrap()).clone()])
            .unwrap();
        Ok(ack)
    };
    for chunk in docs("c", 2000).chunks(250) {
        write(
            &primary,
            chunk.iter().cloned().map(WriteOp::Upsert).collect(),
        )
        .unwrap();
    }
    primary.rebuild(None).unwrap();
    let begin = WriteOp::SetBegin {
        tag: 3,
        model: "m2".into(),
        from_model: "m1".into(),
        dimension: 48,
    };
    write(&primary, vec![begin]).unwrap();
    assert_eq!(primary.vector_set().unwrap().missing, 2000);
    assert_eq!(primary.set_for_model("m2").unwrap(), Some(3));
    assert_eq!(primary.set_for_model("m1").unwrap(), None);
    assert!(matches!(
        primary.set_for_model("m3"),
        Err(ShardError::VectorSet(_))
    ));
    // A second re-embed, a plain upsert, a set vector of the wrong size: refused,
    // nothing written.
    let last = primary.last();
    let another = WriteOp::SetBegin {
        tag: 4,
        model: "m3".into(),
        from_model: "m1".into(),
        dimension: 48,
    };
    assert!(matches!(
        primary.write(vec![another]),
        Err(ShardError::VectorSet(_))
    ));
    assert!(matches!(
        primary.upsert(vec![doc("plain")]),
        Err(ShardError::VectorSet(_))
    ));
    let short = WriteOp::SetVector {
        tag: 3,
        id: "c1".into(),
        version: 0,
        vector: vec![1.0; 47],
    };
    assert!(primary
        .write(vec![WriteOp::Upsert(doc("c1")), short])
        .is_err());
    assert_eq!(primary.last(), last);
    // New writes carry both vectors.
    write(&primary, dual(3, "new0", "new0")).unwrap();
    assert_eq!(primary.vector_set().unwrap().missing, 2000);

    // The re-encoder: rows lacking a vector, in row order, read with their version.
    let (first, next) = primary.set_pending(3, 0, 300).unwrap();
    assert_eq!(first.len(), 300);
    assert!(first.iter().all(|r| r.text.is_some() && r.version > 0));
    // Meanwhile a client updates one of them and deletes another: the re-encodings
    // read before are stale and dropped on both replicas.
    let (updated, deleted) = (first[0].id.clone(), first[1].id.clone());
    write(&primary, dual(3, &updated, "updated")).unwrap();
    write(&primary, vec![WriteOp::Delete(deleted.clone())]).unwrap();
    let encode = |rows: &[shoal_engine::PendingRow]| -> Vec<WriteOp> {
        rows.iter()
            .map(|r| WriteOp::SetVector {
                tag: 3,
                id: r.id.clone(),
                version: r.version,
                vector: vector2_for(&r.id),
            })
            .collect()
    };
    write(&primary, encode(&first)).unwrap();
    // 2,000 lacking, less the updated and deleted rows, less 298 re-encodings applied.
    assert_eq!(primary.vector_set().unwrap().missing, 2000 - 2 - 298);
    assert_eq!(backup.vector_set(), primary.vector_set());
    // Reopened mid-way: which rows have a vector is read back from the file.
    let before = primary.vector_set();
    drop(primary);
    let primary = Shard::open(dirs[0].path()).unwrap();
    primary.set_auto_compact(false);
    assert_eq!(primary.vector_set(), before);
    // A copy made now carries the set and goes on from the log.
    copy_snapshot(&primary.snapshot().unwrap(), dirs[2].path());
    let copy = Shard::open(dirs[2].path()).unwrap();
    assert_eq!(copy.vector_set(), before);
    // The set is not searched while incomplete; compactions wait for it.
    let q2 = vector2_for("c1500");
    assert!(matches!(
        primary.search(&q2, set_search(5, Some(3))),
        Err(ShardError::VectorSet(_))
    ));
    write(&primary, vec![WriteOp::Compact]).unwrap();
    assert!(
        primary.compact_pending().unwrap().is_none(),
        "held by the set"
    );
    // Nor committed: live rows would be left without vectors.
    let last = primary.last();
    assert!(matches!(
        primary.write(vec![WriteOp::SetCommit(3)]),
        Err(ShardError::VectorSet(_))
    ));
    assert_eq!(primary.last(), last, "nothing logged");
    let mut from = next;
    loop {
        let (rows, next) = primary.set_pending(3, from, 500).unwrap();
        if rows.is_empty() {
            break;
        }
        write(&primary, encode(&rows)).unwrap();
        from = next;
    }
    // The first 300 came back no more: the updated row has its dual write's vector.
    let (again, _) = primary.set_pending(3, 0, 10).unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(primary.vector_set().unwrap().missing, 0);
    assert_eq!(backup.vector_set(), primary.vector_set());
    // The set answers by the new model's vectors; the stored ones by the old.
    for (p, name) in [(&primary, "primary"), (&backup, "backup")] {
        let top = |q: &[f32], set| {
            p.search(q, set_search(1, set)).unwrap().hits[0]
                .id
                .to_string()
        };
        assert_eq!(top(&vector2_for("c1500"), Some(3)), "c1500", "{name}");
        assert_eq!(top(&vector2_for("updated"), Some(3)), updated, "{name}");
        assert_eq!(top(&vector_for("c1500"), None), "c1500", "{name}");
        let hits = p
            .search(&vector2_for(&deleted), set_search(2000, Some(3)))
            .unwrap();
        assert!(
            hits.hits.iter().all(|h| *h.id != *deleted),
            "{name}: deleted stays deleted"
        );
        assert!(
            p.search(&vector_for("c1"), set_search(1, Some(3))).is_err(),
            "old dimension"
        );
    }
    // A generation over the set, gated against exact search in the set.
    let params = IvfPqParams {
        nlist: 16,
        m: 8,
        nbits: 8,
    };
    let staged = primary.build_staged(params, 4096, 3).unwrap();
    let report = primary.gate(3, &GateConfig::default()).unwrap();
    assert!(report.passed && report.recent_queries == 0, "{report}");
    let approx = SearchParams {
        k: 10,
        mode: SearchMode::Rerank,
        set: Some(3),
        ..SearchParams::default()
    };
    let r = primary
        .search(&vector2_for("c700"), approx.clone())
        .unwrap();
    assert_eq!(r.generation, Some(staged.id));
    assert_eq!(&*r.hits[0].id, "c700");

    // Commit: the set becomes the stored vectors, on both replicas at one log position.
    write(&primary, vec![WriteOp::SetCommit(3)]).unwrap();
    for (p, name) in [(&primary, "primary"), (&backup, "backup")] {
        assert!(p.vector_set().is_none(), "{name}");
        assert_eq!(p.model(), "m2", "{name}");
        assert_eq!(
            top_id(p, &vector2_for("c1500"), exact(1)),
            "c1500",
            "{name}"
        );
        assert!(
            p.search(&vector_for("c1500"), exact(1)).is_err(),
            "{name}: old dimension"
        );
        assert_eq!(p.set_for_model("m2").unwrap(), None);
        assert!(
            p.set_for_model("m1").is_err(),
            "{name}: the old model's queries refused"
        );
    }
    assert_eq!(primary.stats().serving.unwrap().id, staged.id);
    // The records hold the old vectors' checksums; the commit's table the new ones'.
    assert_eq!(
        primary.get("c1500").unwrap().unwrap().vector,
        vector2_for("c1500")
    );
    assert_eq!(
        backup.get(&updated).unwrap().unwrap().vector,
        vector2_for("updated")
    );
    primary.scrub(0, u64::MAX).unwrap();
    // Plain 48-d upserts again; the held compaction runs now.
    write(&primary, {
        let mut d = doc("after");
        d.vector = vector2_for("after");
        vec![WriteOp::Upsert(d)]
    })
    .unwrap();
    primary
        .compact_pending()
        .unwrap()
        .expect("the compaction ran");
    let answers = primary
        .search(&vector2_for("c3"), approx_set_none())
        .unwrap()
        .hits;
    drop(primary);
    let primary = Shard::open(dirs[0].path()).unwrap();
    assert_eq!(
        primary
            .search(&vector2_for("c3"), approx_set_none())
            .unwrap()
            .hits,
        answers
    );
    assert_eq!(
        primary.get("after").unwrap().unwrap().vector,
        vector2_for("after")
    );
    let names: Vec<String> = fs::read_dir(dirs[0].path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vectors"))
        .collect();
    assert_eq!(names.len(), 1, "only the current vectors file: {names:?}");
    drop(backup);
    let backup = Shard::open(dirs[1].path()).unwrap();
    assert_eq!(top_id(&backup, &vector2_for("c9"), exact(1)), "c9");
    assert_eq!(backup.get("c9").unwrap().unwrap().vector, vector2_for("c9"));
    // A copy of the committed layout carries its checksum table.
    fs::create_dir_all(dirs[2].path().join("c")).unwrap();
    copy_snapshot(
        &backup.snapshot().unwrap(),
        dirs[2].path().join("c").as_path(),
    );
    let copy = Shard::open(&dirs[2].path().join("c")).unwrap();
    assert_eq!(copy.get("c9").unwrap().unwrap().vector, vector2_for("c9"));

    // A rollback drops the set: its file goes, plain upserts are taken again.
    let small = Shard::create(dirs[3].path(), config(Metric::L2)).unwrap();
    small.upsert(docs("s", 20)).unwrap();
    small
        .write(vec![WriteOp::SetBegin {
            tag: 9,
            model: "m2".into(),
            from_model: "m1".into(),
            dimension: 48,
        }])
        .unwrap();
    let file = dirs[3].path().join(format!("vectors-set-{:020}.f32", 9));
    assert!(file.exists());
    small.write(vec![WriteOp::SetDrop(9)]).unwrap();
    assert!(!file.exists() && small.vector_set().is_none());
    small.upsert(vec![doc("plain")]).unwrap();
    assert!(
        small.write(vec![WriteOp::SetCommit(9)]).is_err(),
        "nothing to commit"
    );
}

fn approx_set_none() -> SearchParams {
    SearchParams {
        k: 10,
        ..SearchParams::default()
    }
}

/// Metadata for filter tests: a number, a keyword, a list of keywords, sometimes none.
fn filter_doc(i: usize, round: usize) -> Document {
    let id = format!("f{i}");
    let groups = ["a", "b", "c"];
    let metadata = if i.is_multiple_of(17) {
        json!({})
    } else {
        json!({
            "n": (i * 7 + round) % 100,
            "g": groups[(i + round) % 3],
            "tags": [format!("t{}", i % 5), format!("t{}", (i + 2) % 5)],
            "year": 1990 + (i % 30),
        })
    };
    Document {
        id: id.clone(),
        text: None,
        metadata: Metadata::from_value(&metadata).unwrap(),
        vector: vector_for(&format!("{id}/{round}")),
    }
}

/// The exact filtered top `k` over `live` (the test's own record of every live
/// document): the oracle every plan is measured against.
fn filtered_truth(
    live: &std::collections::BTreeMap<String, Document>,
    fields: &[shoal_engine::PayloadField],
    f: &shoal_engine::Filter,
    q: &[f32],
    k: usize,
) -> Vec<String> {
    let mut scored: Vec<(f32, String)> = live
        .values()
        .filter(|d| f.matches(fields, &d.metadata.to_value()))
        .map(|d| {
            let s: f32 = q
                .iter()
                .zip(&d.vector)
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            (s, d.id.clone())
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

#[test]
fn t93_filtered_search_agrees_with_the_oracle_under_each_plan_across_replay_compaction_and_snapshots(
) {
    use shoal_engine::{Filter, FilterPlan, PayloadField};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let fields: Vec<PayloadField> = ["n:number", "g:keyword", "tags:keyword"]
        .iter()
        .map(|s| PayloadField::parse(s).unwrap())
        .collect();
    let mut cfg = config(Metric::L2);
    cfg.payload_fields = fields.clone();
    cfg.exact_filter_rows = 150;
    let shard = Shard::create(dir.path(), cfg).unwrap();
    shard.set_auto_compact(false);
    let mut live: BTreeMap<String, Document> = BTreeMap::new();
    let put = |shard: &Shard, docs: Vec<Document>, live: &mut BTreeMap<String, Document>| {
        shard.upsert(docs.clone()).unwrap();
        for d in docs {
            live.insert(d.id.clone(), d);
        }
    };
    for chunk in (0..3000)
        .map(|i| filter_doc(i, 0))
        .collect::<Vec<_>>()
        .chunks(500)
    {
        put(&shard, chunk.to_vec(), &mut live);
    }
    shard.rebuild(None).unwrap();
    // Updates (new rows, new values), deletes and a fresh tail past the index.
    put(
        &shard,
        (0..600).map(|i| filter_doc(i * 5, 1)).collect(),
        &mut live,
    );
    let gone: Vec<String> = (0..300).map(|i| format!("f{}", i * 7 + 1)).collect();
    shard.delete(gone.clone()).unwrap();
    for id in &gone {
        live.remove(id);
    }
    let filters: Vec<(&str, Option<FilterPlan>)> = vec![
        // ~1% of the rows: scored exactly.
        (
            r#"{"must": [{"key": "n", "match": 3}]}"#,
            Some(FilterPlan::Exact),
        ),
        // ~8%: the index restricted to them.
        (
            r#"{"must": [{"key": "n", "range": {"lt": 8}}]}"#,
            Some(FilterPlan::IvfFiltered),
        ),
        // A tenth of the rows or more: post-filtered.
        (
            r#"{"must": [{"key": "g", "match": "a"}]}"#,
            Some(FilterPlan::PostFiltered),
        ),
        (
            r#"{"must": [{"key": "n", "range": {"gte": 10, "lt": 40}}], "must_not": [{"key": "tags", "in": ["t1"]}]}"#,
            Some(FilterPlan::PostFiltered),
        ),
        (
            r#"{"must_not": [{"key": "g", "match": "c"}]}"#,
            Some(FilterPlan::PostFiltered),
        ),
        (
            r#"{"should": [{"key": "n", "exists": false}, {"filter": {"must": [{"key": "tags", "match": "t2"}, {"key": "n", "range": {"gt": 50}}]}}]}"#,
            None,
        ),
    ];
    let queries: Vec<Vec<f32>> = (0..20).map(|i| vector_for(&format!("fq{i}"))).collect();
    let approx = SearchParams {
        k: 10,
        nprobe: Some(4),
        refine_factor: Some(8),
        mode: SearchMode::Rerank,
        ..SearchParams::default()
    };
    // Every hit passes, the exact mode is the oracle, the index plans find nearly all.
    let check = |shard: &Shard, live: &BTreeMap<String, Document>, expect_plans: bool| {
        for (text, want_plan) in &filters {
            let f = Arc::new(Filter::from_json(text).unwrap());
            f.check(&fields, &shoal_proto::limits::Limits::default())
                .unwrap();
            let (mut found, mut total) = (0usize, 0usize);
            for q in &queries {
                let truth = filtered_truth(live, &fields, &f, q, 10);
                let p = SearchParams {
                    filter: Some(f.clone()),
                    mode: SearchMode::Exact,
                    ..approx.clone()
                };
                let exact_hits: Vec<String> = shard
                    .search(q, p)
                    .unwrap()
                    .hits
                    .iter()
                    .map(|h| h.id.to_string())
                    .collect();
                assert_eq!(exact_hits, truth, "{text}: exact filtered search");
                let r = shard
                    .search(
                        q,
                        SearchParams {
                            filter: Some(f.clone()),
                            ..approx.clone()
                        },
                    )
                    .unwrap();
                if expect_plans {
                    if let Some(want) = want_plan {
                        assert_eq!(r.plan, Some(*want), "{text}");
                    }
                }
                for h in &r.hits {
                    let d = live.get(&*h.id).expect("a live document");
                    assert!(
                        f.matches(&fields, &d.metadata.to_value()),
                        "{text}: {} fails",
                        h.id
                    );
                }
                total += truth.len();
                found += r
                    .hits
                    .iter()
                    .filter(|h| truth.iter().any(|t| *t == *h.id))
                    .count();
            }
            let recall = found as f64 / total.max(1) as f64;
            assert!(recall >= 0.9, "{text}: recall {recall:.3}");
        }
    };
    check(&shard, &live, true);
    // Count and scroll (issue 22): exactly the live rows a filter admits, page by page
    // in row order; a scroll begun before a compaction is refused after it.
    let g_a = Filter::from_json(r#"{"must": [{"key": "g", "match": "a"}]}"#).unwrap();
    let want: std::collections::BTreeSet<String> = live
        .values()
        .filter(|d| g_a.matches(&fields, &d.metadata.to_value()))
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(shard.count(Some(&g_a)).unwrap(), want.len() as u64);
    assert_eq!(shard.count(None).unwrap(), live.len() as u64);
    let (mut got, mut from, mut layout) = (Vec::new(), 0, None);
    loop {
        let page = shard.scroll(layout, from, 97, Some(&g_a)).unwrap();
        assert!(page.ids.len() <= 97);
        got.extend(page.ids.iter().map(|id| id.to_string()));
        layout = Some(page.layout);
        match page.next_row {
            Some(r) => from = r,
            None => break,
        }
    }
    assert_eq!(got.len(), want.len(), "no document twice");
    assert_eq!(
        got.into_iter().collect::<std::collections::BTreeSet<_>>(),
        want
    );
    let begun = shard.scroll(None, 0, 10, None).unwrap();
    // Reopened: the index rebuilt from the segments and the replayed log.
    drop(shard);
    let shard = Shard::open(dir.path()).unwrap();
    shard.set_auto_compact(false);
    check(&shard, &live, true);
    // Compacted: the rows renumbered (the index plans fall back where labels moved).
    shard.write(vec![WriteOp::Compact]).unwrap();
    shard.compact_pending().unwrap().expect("a compaction ran");
    check(&shard, &live, false);
    assert!(matches!(
        shard.scroll(Some(begun.layout), begun.next_row.unwrap(), 10, None),
        Err(ShardError::ScrollStale(_))
    ));
    assert_eq!(shard.count(Some(&g_a)).unwrap(), want.len() as u64);
    put(
        &shard,
        (0..50).map(|i| filter_doc(i + 5000, 2)).collect(),
        &mut live,
    );
    check(&shard, &live, false);
    // A snapshot's copy indexes the same rows.
    let snap = shard.snapshot().unwrap();
    let cd = tempfile::tempdir().unwrap();
    copy_snapshot(&snap, cd.path());
    let copy = Shard::open(cd.path()).unwrap();
    check(&copy, &live, false);
    // A field added later: every row's metadata read again, kept across a reopen.
    let mut more = fields.clone();
    more.push(PayloadField::parse("year:number").unwrap());
    assert!(copy.set_payload_fields(&more).unwrap());
    assert!(!copy.set_payload_fields(&more).unwrap());
    let f = Arc::new(
        Filter::from_json(r#"{"must": [{"key": "year", "range": {"lt": 1995}}]}"#).unwrap(),
    );
    let q = &queries[0];
    let want = filtered_truth(&live, &more, &f, q, 10);
    let p = SearchParams {
        filter: Some(f.clone()),
        mode: SearchMode::Exact,
        ..approx.clone()
    };
    let got: Vec<String> = copy
        .search(q, p.clone())
        .unwrap()
        .hits
        .iter()
        .map(|h| h.id.to_string())
        .collect();
    assert_eq!(got, want);
    drop(copy);
    let copy = Shard::open(cd.path()).unwrap();
    assert_eq!(copy.payload_fields(), more);
    let got: Vec<String> = copy
        .search(q, p)
        .unwrap()
        .hits
        .iter()
        .map(|h| h.id.to_string())
        .collect();
    assert_eq!(got, want);
    // A field the replica does not index is refused by name.
    let f = Arc::new(Filter::from_json(r#"{"must": [{"key": "zz", "exists": true}]}"#).unwrap());
    let e = shard
        .search(
            q,
            SearchParams {
                filter: Some(f),
                ..approx.clone()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("zz"), "{e}");
}

#[test]
fn t94_a_conditional_write_applies_only_over_the_version_it_read() {
    use shoal_engine::Expect;
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::create(dir.path(), config(Metric::L2)).unwrap();
    shard.upsert(docs("d", 20)).unwrap();
    let upsert = |id: &str, tag: u64| {
        let mut d = doc(id);
        d.metadata = Metadata::from_value(&json!({ "tag": tag })).unwrap();
        vec![WriteOp::Upsert(d)]
    };
    let expect = |id: &str, version: u64| {
        vec![Expect {
            id: id.into(),
            version,
        }]
    };
    let v = shard.get("d3").unwrap().unwrap().seq;
    assert_eq!(v, 1);
    // Two writers read version 1; the first applies, the second conflicts and
    // writes nothing (its batch is not numbered).
    let (first, _) = shard
        .write_if(upsert("d3", 1), 0, "", &expect("d3", v))
        .unwrap();
    let e = shard
        .write_if(upsert("d3", 2), 0, "", &expect("d3", v))
        .unwrap_err();
    assert!(matches!(e, ShardError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("\"d3\""), "{e}");
    let got = shard.get("d3").unwrap().unwrap();
    assert_eq!(
        (got.seq, got.metadata.to_value()),
        (first.seq, json!({ "tag": 1 }))
    );
    assert_eq!(shard.last().0, first.seq);
    // Version 0: the document must be absent (create-only).
    shard
        .write_if(upsert("new", 1), 0, "", &expect("new", 0))
        .unwrap();
    assert!(matches!(
        shard.write_if(upsert("new", 2), 0, "", &expect("new", 0)),
        Err(ShardError::Conflict(_))
    ));
    // A deleted document is absent again.
    shard.delete(vec!["d4".into()]).unwrap();
    shard
        .write_if(upsert("d4", 3), 0, "", &expect("d4", 0))
        .unwrap();
    // A retry of an applied request id answers its ack whatever the versions say now.
    let (a, _) = shard
        .write_if(upsert("d5", 1), 0, "req-1", &expect("d5", 1))
        .unwrap();
    let (again, batch) = shard
        .write_if(upsert("d5", 1), 0, "req-1", &expect("d5", 1))
        .unwrap();
    assert!(again.duplicate && batch.is_none() && again.seq == a.seq);
    // Versions survive a compaction (its rewrite keeps each row's batch) and a reopen.
    let before: Vec<u64> = ["d3", "d5", "d9"]
        .iter()
        .map(|id| shard.get(id).unwrap().unwrap().seq)
        .collect();
    shard.write(vec![WriteOp::Compact]).unwrap();
    shard.compact_pending().unwrap();
    let after = |s: &Shard| -> Vec<u64> {
        ["d3", "d5", "d9"]
            .iter()
            .map(|id| s.get(id).unwrap().unwrap().seq)
            .collect()
    };
    assert_eq!(after(&shard), before);
    drop(shard);
    let shard = Shard::open(dir.path()).unwrap();
    assert_eq!(after(&shard), before);
    shard
        .write_if(upsert("d9", 4), 0, "", &expect("d9", before[2]))
        .unwrap();
}
