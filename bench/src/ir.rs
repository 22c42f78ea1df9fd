//! `shoal-bench ndcg`: retrieval quality end to end on a BEIR-layout collection:
//! encode the corpus and the queries with shoal's Burn encoder, store the vectors in a
//! shard, exact inner-product search, nDCG@10 scored as BEIR does (pytrec_eval: linear
//! gain, ideal ranking from the judgements, identical query/doc ids ignored).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use shoal_engine::{CollectionConfig, Document, Metric, SearchMode, SearchParams, Shard};
use shoal_eval::beir::{ndcg_at, read_jsonl, read_qrels, Row};

#[derive(Args, Debug)]
pub struct NdcgArgs {
    /// A BEIR-layout collection (corpus.jsonl, queries.jsonl, qrels/test.tsv).
    #[arg(long, default_value = "../shared/data/ir/scifact")]
    dataset: PathBuf,
    #[arg(
        long,
        env = "SHOAL_MODEL_DIR",
        default_value = shoal_encoder::DEFAULT_MODEL_DIR
    )]
    model_dir: PathBuf,
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// `texts` encoded in length order (less padding), returned in their order, with the
/// count of texts the encoder truncated.
pub fn encode_all(
    encoder: &shoal_encoder::Encoder<shoal_encoder::CpuBackend>,
    texts: &[String],
    batch: usize,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut vectors = vec![Vec::new(); texts.len()];
    let mut truncated = 0;
    for chunk in order.chunks(batch) {
        let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
        let out = encoder.encode(&batch)?;
        truncated += out.truncated;
        for (&i, v) in chunk.iter().zip(out.vectors) {
            vectors[i] = v;
        }
    }
    Ok((vectors, truncated))
}

pub fn run(args: NdcgArgs) -> Result<()> {
    let corpus = read_jsonl(&args.dataset.join("corpus.jsonl"))?;
    let queries = read_jsonl(&args.dataset.join("queries.jsonl"))?;
    let qrels = read_qrels(&args.dataset.join("qrels/test.tsv"))?;
    let encoder = shoal_encoder::load_cpu(&args.model_dir)?;

    let started = Instant::now();
    let texts: Vec<String> = corpus.iter().map(Row::text).collect();
    let (vectors, truncated) = encode_all(&encoder, &texts, args.batch)?;
    let encode_s = started.elapsed().as_secs_f64();

    let dir = tempfile::tempdir()?;
    let mut cfg = CollectionConfig::new(encoder.dimension(), Metric::InnerProduct);
    cfg.auto_rebuild_tail = 0;
    let shard = Shard::create(dir.path(), cfg)?;
    let docs: Vec<Document> = corpus
        .iter()
        .zip(vectors)
        .map(|(r, v)| Document {
            id: r.id.clone(),
            text: None,
            metadata: shoal_engine::Metadata::none(),
            vector: v,
        })
        .collect();
    for chunk in docs.chunks(1000) {
        shard.upsert(chunk.to_vec())?;
    }

    let judged: Vec<&Row> = queries
        .iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    let qtexts: Vec<&str> = judged.iter().map(|q| q.text.as_str()).collect();
    let mut total = 0.0;
    for (chunk, qs) in qtexts.chunks(args.batch).zip(judged.chunks(args.batch)) {
        for (v, q) in encoder.encode(chunk)?.vectors.iter().zip(qs) {
            let p = SearchParams {
                mode: SearchMode::Exact,
                ..SearchParams::top(11)
            };
            let hits = shard.search(v, p)?.hits;
            let ranked: Vec<&str> = hits.iter().map(|h| &*h.id).filter(|d| *d != q.id).collect();
            total += ndcg_at(10, &ranked, &qrels[&q.id]);
        }
    }
    let ndcg = total / judged.len() as f64;
    println!(
        "{}",
        json!({"bench": "ndcg", "dataset": args.dataset.file_name().map(|n| n.to_string_lossy()),
               "docs": corpus.len(), "queries": judged.len(), "ndcg_at_10": ndcg,
               "encoder": "burn-flex all-MiniLM-L6-v2", "search": "exact inner product",
               "docs_truncated": truncated, "corpus_encode_s": encode_s,
               "docs_per_s": corpus.len() as f64 / encode_s})
    );
    Ok(())
}
