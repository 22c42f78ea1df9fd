//! `shoal-bench encoder`: shoal's Burn encoder next to candle-transformers' BERT (the
//! Rust peer a user would otherwise pick) on the same weights, tokenizer settings and
//! texts, in one run: texts/s at batch sizes 1, 8, 32, 128 on SciFact documents, and
//! single short-query latency. Also times Burn's other CPU backend (ndarray).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use clap::Args;
use serde_json::json;
use shoal_encoder::Encoder;
use tokenizers::Tokenizer;

#[derive(Args, Debug)]
pub struct EncoderArgs {
    #[arg(long, default_value = "../shared/data/ir/scifact")]
    dataset: PathBuf,
    #[arg(
        long,
        env = "SHOAL_MODEL_DIR",
        default_value = shoal_encoder::DEFAULT_MODEL_DIR
    )]
    model_dir: PathBuf,
    /// Documents encoded per batch-size point.
    #[arg(long, default_value_t = 256)]
    docs: usize,
    /// Single queries timed for latency.
    #[arg(long, default_value_t = 200)]
    queries: usize,
}

/// candle-transformers' BERT with sentence-transformers pooling: the peer.
struct CandlePeer {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl CandlePeer {
    /// Same weights and the very tokenizer shoal uses, so only the model code differs.
    fn load(spec: &shoal_encoder::ModelSpec) -> Result<Self> {
        let dir = &spec.dir;
        let device = Device::Cpu;
        let config: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
        // SAFETY: the weights file is not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &device,
            )?
        };
        Ok(Self {
            model: BertModel::load(vb, &config)?,
            tokenizer: shoal_encoder::tokenizer(spec)?,
            device,
        })
    }

    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::msg)?;
        let (b, s) = (enc.len(), enc[0].len());
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let ids = Tensor::from_vec(ids, (b, s), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, s), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = hidden
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?)?;
        let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(pooled.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}

/// The first `n` texts of a BEIR jsonl file, as "title text".
fn read_texts(path: &Path, n: usize) -> Result<Vec<String>> {
    Ok(shoal_eval::beir::read_jsonl(path)?
        .iter()
        .take(n)
        .map(shoal_eval::beir::Row::text)
        .collect())
}

fn throughput(texts: &[String], batch: usize, mut f: impl FnMut(&[&str])) -> f64 {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    f(&refs[..batch.min(refs.len())]); // warm-up
    let started = Instant::now();
    for chunk in refs.chunks(batch) {
        f(chunk);
    }
    texts.len() as f64 / started.elapsed().as_secs_f64()
}

fn latencies(queries: &[String], mut f: impl FnMut(&str)) -> (f64, f64) {
    for q in queries.iter().take(10) {
        f(q);
    }
    let mut ms: Vec<f64> = queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            f(q);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let pick = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    (pick(0.5), pick(0.99))
}

fn burn_side<B: Backend>(enc: &Encoder<B>, docs: &[String], batch: usize) -> f64 {
    throughput(docs, batch, |t| {
        enc.encode(t).expect("encode");
    })
}

pub fn run(args: EncoderArgs) -> Result<()> {
    let docs = read_texts(&args.dataset.join("corpus.jsonl"), args.docs)?;
    let queries = read_texts(&args.dataset.join("queries.jsonl"), args.queries)?;
    let flex = shoal_encoder::load_cpu(&args.model_dir)?;

    let peer = CandlePeer::load(flex.spec())?;
    let ndarray: Encoder<burn::backend::NdArray> =
        Encoder::load(&args.model_dir, Default::default())?
            .with_threads(shoal_encoder::cpu_threads());

    // Same vectors from both, or the timing comparison means nothing.
    let probe: Vec<&str> = docs.iter().take(16).map(String::as_str).collect();
    let a = flex.encode(&probe)?.vectors;
    let b = peer.encode(&probe)?;
    let min_cos = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())
        .fold(f32::INFINITY, f32::min);
    println!(
        "{}",
        json!({"section": "agreement", "min_cosine_shoal_vs_candle": min_cos, "texts": probe.len()})
    );

    let mut ratios = Vec::new();
    let mut summary = serde_json::Map::new();
    for batch in [1usize, 8, 32, 128] {
        let shoal = burn_side(&flex, &docs, batch);
        let candle = throughput(&docs, batch, |t| {
            peer.encode(t).expect("candle encode");
        });
        let nd = burn_side(&ndarray, &docs, batch);
        ratios.push(shoal / candle);
        summary.insert(format!("ratio_b{batch}"), json!(shoal / candle));
        println!(
            "{}",
            json!({"section": "throughput", "batch": batch, "docs": docs.len(),
                   "shoal_flex_texts_per_s": shoal, "candle_texts_per_s": candle,
                   "burn_ndarray_texts_per_s": nd, "ratio_vs_candle": shoal / candle})
        );
    }
    let (s50, s99) = latencies(&queries, |q| {
        flex.encode(&[q]).expect("encode");
    });
    let (c50, c99) = latencies(&queries, |q| {
        peer.encode(&[q]).expect("candle encode");
    });
    println!(
        "{}",
        json!({"section": "latency", "queries": queries.len(), "shoal_p50_ms": s50, "shoal_p99_ms": s99,
               "candle_p50_ms": c50, "candle_p99_ms": c99, "p50_speedup_vs_candle": c50 / s50})
    );
    summary.insert("bench".into(), json!("encoder"));
    summary.insert("backend".into(), json!("burn-flex"));
    summary.insert(
        "min_throughput_ratio_vs_candle".into(),
        json!(ratios.iter().cloned().fold(f64::INFINITY, f64::min)),
    );
    summary.insert("p50_latency_speedup_vs_candle".into(), json!(c50 / s50));
    summary.insert("p99_latency_speedup_vs_candle".into(), json!(c99 / s99));
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
