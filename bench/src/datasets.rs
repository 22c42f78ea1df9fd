//! Benchmark datasets: real (Fashion-MNIST, the ann-benchmarks L2 set) and a seeded
//! clustered synthetic set for scale and inner product.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shoal_node::shard::Metric;

pub struct Dataset {
    pub name: String,
    pub dim: usize,
    pub metric: Metric,
    pub base: Vec<f32>,
    pub queries: Vec<f32>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.base.len() / self.dim
    }
    pub fn n_queries(&self) -> usize {
        self.queries.len() / self.dim
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.base[i * self.dim..(i + 1) * self.dim]
    }
    pub fn query(&self, i: usize) -> &[f32] {
        &self.queries[i * self.dim..(i + 1) * self.dim]
    }
}

/// Debian's `dataset-fashion-mnist` installs the IDX files here.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

fn read_idx_images(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening {} (install Debian's dataset-fashion-mnist)", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .with_context(|| format!("decompressing {}", path.display()))?;
    let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    if bytes.len() < 16 || word(0) != 0x0803 {
        bail!("{} is not an idx3-ubyte image file", path.display());
    }
    let (n, rows, cols) = (word(4), word(8), word(12));
    let dim = rows * cols;
    if bytes.len() != 16 + n * dim {
        bail!("{}: expected {} bytes of pixels, found {}", path.display(), n * dim, bytes.len() - 16);
    }
    // Raw pixel values as floats, as ann-benchmarks' fashion-mnist-784-euclidean does.
    Ok((n, dim, bytes[16..].iter().map(|&p| p as f32).collect()))
}

pub fn fashion_mnist(dir: &Path) -> Result<Dataset> {
    let (_, dim, base) = read_idx_images(&dir.join("train-images-idx3-ubyte.gz"))?;
    let (_, qdim, queries) = read_idx_images(&dir.join("t10k-images-idx3-ubyte.gz"))?;
    if dim != qdim {
        bail!("train and test images differ in size");
    }
    Ok(Dataset {
        name: "fashion-mnist".into(),
        dim,
        metric: Metric::L2,
        base,
        queries,
    })
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller; one value per call is plenty fast for a one-off data set.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
}

/// `n` unit vectors around 1,024 random unit centres (noise of norm ~0.7), searched
/// by inner product, like normalised sentence embeddings. Queries come from the same
/// distribution, drawn from a different stream.
pub fn synthetic(n: usize, nq: usize, dim: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..1024)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| gaussian(&mut rng)).collect();
            normalise(&mut c);
            c
        })
        .collect();
    let sigma = 0.7 / (dim as f32).sqrt();
    let draw = |count: usize, rng: &mut StdRng| {
        let mut out = Vec::with_capacity(count * dim);
        for _ in 0..count {
            let c = &centres[rng.random_range(0..centres.len())];
            let start = out.len();
            out.extend(c.iter().map(|x| x + sigma * gaussian(rng)));
            normalise(&mut out[start..]);
        }
        out
    };
    let base = draw(n, &mut rng);
    let mut qrng = StdRng::seed_from_u64(seed ^ 0xdead_beef);
    let queries = draw(nq, &mut qrng);
    Dataset {
        name: "synthetic".into(),
        dim,
        metric: Metric::InnerProduct,
        base,
        queries,
    }
}
