//! The encoder on Burn's CUDA backend next to PyTorch on the same GPU.
//!
//! Run by `scripts/device/encoder-gpu.sh` on a lent GPU machine, after
//! `scripts/reference/torch_gpu_bench.py` has (1) written seeded random BERT weights
//! from the model's `config.json` into the model dir (the real weights are too large to
//! carry there), (2) embedded the exactness texts with PyTorch on the CPU in fp32, and
//! (3) timed PyTorch on the GPU in fp32 and fp16. This binary loads the same weights,
//! checks CUDA (fp32, fp16) against Burn's CPU backend and against PyTorch on the same
//! texts, times the same batch sizes and lengths, and prints one JSON line with ratios.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::Cuda;
use burn::tensor::backend::Backend;
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_encoder::{AttentionMask, CpuBackend, Encoder, Precision};

#[derive(Parser)]
struct Args {
    /// Model dir whose model.safetensors holds the seeded weights the torch script wrote.
    #[arg(long)]
    model_dir: PathBuf,
    /// The torch script's JSON output (texts, reference vectors, its timings).
    #[arg(long)]
    torch: PathBuf,
    /// Minimum seconds timed per measurement.
    #[arg(long, default_value_t = 2.0)]
    min_secs: f64,
    /// fp32, or fp16 (weights and activations in half precision). One per process:
    /// Burn fixes a device's default float type once.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// How attention masks padding: bias (an additive float bias; burn-cubecl runs its
    /// multi-kernel fallback) or bool (a boolean mask; its flash kernels may run).
    #[arg(long, default_value = "bias")]
    mask: String,
    /// Latency samples for the single short query.
    #[arg(long, default_value_t = 300)]
    latency_runs: usize,
}

#[derive(Deserialize)]
struct Torch {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
    batches: Vec<usize>,
    doc_len: usize,
    query_len: usize,
    /// dtype -> measurements (`b1`, `b8`, ... in texts/s; `p50_ms`, `p99_ms`).
    results: BTreeMap<String, BTreeMap<String, f64>>,
    device: String,
    torch: String,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| cosine(x, y))
        .fold(f64::INFINITY, f64::min)
}

/// Embeds the texts in batches of 16 (mixed lengths, so padding is exercised).
fn embed_texts<B: Backend>(enc: &Encoder<B>, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(16) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        out.extend(enc.encode(&refs)?.vectors);
    }
    Ok(out)
}

/// `batch` random sequences of `len` tokens framed by [CLS] .. [SEP], like a tokenizer's.
fn random_ids(rng: &mut rand::rngs::StdRng, batch: usize, len: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|_| {
            let mut s: Vec<u32> = (0..len).map(|_| rng.random_range(1000..vocab)).collect();
            s[0] = 101;
            s[len - 1] = 102;
            s
        })
        .collect()
}

/// Texts per second over at least `min_secs` (and 3 calls), after warm-up calls that
/// also let CubeCL compile and autotune its kernels for this shape. Each call includes
/// the host-to-device copy of the ids and the read-back of the vectors, as the torch
/// side does.
fn throughput<B: Backend>(enc: &Encoder<B>, ids: &[Vec<u32>], min_secs: f64) -> Result<f64> {
    for _ in 0..3 {
        enc.encode_token_ids(ids)?;
    }
    let t = Instant::now();
    let mut calls = 0usize;
    while calls < 3 || t.elapsed().as_secs_f64() < min_secs {
        enc.encode_token_ids(ids)?;
        calls += 1;
    }
    Ok((calls * ids.len()) as f64 / t.elapsed().as_secs_f64())
}

fn latency<B: Backend>(enc: &Encoder<B>, ids: &[Vec<u32>], runs: usize) -> Result<(f64, f64)> {
    for _ in 0..20 {
        enc.encode_token_ids(ids)?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        enc.encode_token_ids(ids)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    Ok((pct(0.50), pct(0.99)))
}

fn measure<B: Backend>(
    enc: &Encoder<B>,
    torch: &Torch,
    args: &Args,
    vocab: u32,
) -> Result<BTreeMap<String, f64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut out = BTreeMap::new();
    for &b in &torch.batches {
        let ids = random_ids(&mut rng, b, torch.doc_len, vocab);
        let tps = throughput(enc, &ids, args.min_secs)?;
        eprintln!(
            "  batch {b:>4} x {} tokens: {tps:>10.1} texts/s",
            torch.doc_len
        );
        out.insert(format!("b{b}"), tps);
    }
    let q = random_ids(&mut rng, 1, torch.query_len, vocab);
    let (p50, p99) = latency(enc, &q, args.latency_runs)?;
    eprintln!(
        "  query of {} tokens: p50 {p50:.3} ms, p99 {p99:.3} ms",
        torch.query_len
    );
    out.insert("p50_ms".into(), p50);
    out.insert("p99_ms".into(), p99);
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let torch: Torch = serde_json::from_slice(
        &std::fs::read(&args.torch).with_context(|| format!("reading {}", args.torch.display()))?,
    )
    .context("parsing the torch script's output")?;

    let cpu = Encoder::<CpuBackend>::load(&args.model_dir, Default::default())?;
    let vocab = cpu.spec().bert.vocab_size as u32;
    let cpu_vecs = embed_texts(&cpu, &torch.texts)?;
    drop(cpu);

    let mut report = serde_json::Map::new();
    report.insert("device".into(), json!(torch.device));
    report.insert("torch".into(), json!(torch.torch));
    report.insert("doc_len".into(), json!(torch.doc_len));
    report.insert("query_len".into(), json!(torch.query_len));
    report.insert(
        "min_cos_cpu_vs_torch".into(),
        json!(min_cosine(&cpu_vecs, &torch.vectors)),
    );

    let mut burn_results = BTreeMap::new();
    let dtype = args.precision.as_str();
    let precision = match dtype {
        "fp32" => Precision::F32,
        "fp16" => Precision::F16,
        p => anyhow::bail!("unknown precision {p:?}: fp32 or fp16"),
    };
    let mask = match args.mask.as_str() {
        "bias" => AttentionMask::Bias,
        "bool" => AttentionMask::Bool,
        m => anyhow::bail!("unknown mask {m:?}: bias or bool"),
    };
    // Every key names the precision and the mask, so runs can share one report file.
    let label = format!("{dtype}_{}", args.mask);
    eprintln!("burn-cuda {label}");
    let enc = Encoder::<Cuda>::load_with(&args.model_dir, Default::default(), precision)?
        .with_attention_mask(mask);
    let v = embed_texts(&enc, &torch.texts)?;
    report.insert(
        format!("min_cos_cuda_{label}_vs_cpu"),
        json!(min_cosine(&v, &cpu_vecs)),
    );
    report.insert(
        format!("min_cos_cuda_{label}_vs_torch"),
        json!(min_cosine(&v, &torch.vectors)),
    );
    burn_results.insert(label.clone(), measure(&enc, &torch, &args, vocab)?);

    for (label, ours) in &burn_results {
        let peer = torch.results.get(dtype);
        for (key, value) in ours {
            report.insert(format!("burn_{label}_{key}"), json!(value));
            let Some(p) = peer.and_then(|p| p.get(key)) else {
                continue;
            };
            report.insert(format!("torch_{dtype}_{key}"), json!(p));
            // Throughput: ours / theirs. Latency: theirs / ours, so > 1 means faster.
            let ratio = if key.ends_with("_ms") {
                p / value
            } else {
                value / p
            };
            report.insert(format!("ratio_{label}_{key}"), json!(ratio));
        }
    }
    println!("{}", Value::Object(report));
    Ok(())
}
