//! Vector data sets for the demo and the benchmarks: Fashion-MNIST (real images, the
//! ann-benchmarks L2 set, from Debian's `dataset-fashion-mnist`) and a seeded clustered
//! synthetic set for scale and inner product.

use std::io::Read;
use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};

use shoal_engine::Metric;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DatasetError(String);

type Result<T> = std::result::Result<T, DatasetError>;

fn bail<T>(msg: String) -> Result<T> {
    Err(DatasetError(msg))
}

pub struct Dataset {
    pub name: String,
    /// Class names of the base vectors, where the set has them.
    pub labels: Option<Vec<&'static str>>,
    /// Class names of the queries, where the set has them.
    pub query_labels: Option<Vec<&'static str>>,
    pub dim: usize,
    pub metric: Metric,
    pub base: Vec<f32>,
    pub queries: Vec<f32>,
}

impl Dataset {
    pub fn n_base(&self) -> usize {
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

/// Fashion-MNIST's ten classes, by label number.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| {
        DatasetError(format!(
            "opening {}: {e} (scripts/setup.sh installs Debian's dataset-fashion-mnist)",
            path.display()
        ))
    })?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| DatasetError(format!("decompressing {}: {e}", path.display())))?;
    Ok(bytes)
}

fn be_word(bytes: &[u8], i: usize) -> usize {
    u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes")) as usize
}

fn read_idx_images(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let bytes = read_gz(path)?;
    if bytes.len() < 16 || be_word(&bytes, 0) != 0x0803 {
        return bail(format!(
            "{} is not an idx3-ubyte image file",
            path.display()
        ));
    }
    let (n, rows, cols) = (be_word(&bytes, 4), be_word(&bytes, 8), be_word(&bytes, 12));
    let dim = rows * cols;
    if bytes.len() != 16 + n * dim {
        return bail(format!(
            "{}: expected {} bytes of pixels, found {}",
            path.display(),
            n * dim,
            bytes.len() - 16
        ));
    }
    // Raw pixel values as floats, as ann-benchmarks' fashion-mnist-784-euclidean does.
    Ok((n, dim, bytes[16..].iter().map(|&p| p as f32).collect()))
}

fn read_idx_labels(path: &Path, n: usize) -> Result<Vec<&'static str>> {
    let bytes = read_gz(path)?;
    if bytes.len() != 8 + n || be_word(&bytes, 0) != 0x0801 {
        return bail(format!(
            "{} is not an idx1-ubyte file of {n} labels",
            path.display()
        ));
    }
    bytes[8..]
        .iter()
        .map(|&l| {
            FASHION_MNIST_CLASSES
                .get(l as usize)
                .copied()
                .ok_or_else(|| {
                    DatasetError(format!("label {l} out of range in {}", path.display()))
                })
        })
        .collect()
}

/// The 60,000 training images as the base set, the 10,000 test images as queries.
pub fn fashion_mnist(dir: &Path) -> Result<Dataset> {
    let (n, dim, base) = read_idx_images(&dir.join("train-images-idx3-ubyte.gz"))?;
    let (nq, qdim, queries) = read_idx_images(&dir.join("t10k-images-idx3-ubyte.gz"))?;
    if dim != qdim {
        return bail("train and test images differ in size".into());
    }
    let labels = read_idx_labels(&dir.join("train-labels-idx1-ubyte.gz"), n)?;
    let query_labels = read_idx_labels(&dir.join("t10k-labels-idx1-ubyte.gz"), nq)?;
    Ok(Dataset {
        name: "fashion-mnist".into(),
        labels: Some(labels),
        query_labels: Some(query_labels),
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
    let n = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
}

/// `n` unit vectors in 1,024 clusters, searched by inner product, like normalised
/// sentence embeddings. Each point is its cluster's centre plus a displacement in a
/// shared 32-dimensional subspace (norm ~0.5) plus small isotropic noise (norm ~0.1),
/// then normalised: real embedding sets have low intrinsic dimension, and that is
/// what gives nearest neighbours meaning. (Isotropic noise alone in 384-d makes every
/// point of a cluster a near-tie with every other, and recall@10 a coin toss for any
/// index, FAISS's included.) Queries come from the same distribution, another stream.
pub fn synthetic(n: usize, nq: usize, dim: usize, seed: u64) -> Dataset {
    const LATENT: usize = 32;
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..1024)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| gaussian(&mut rng)).collect();
            normalise(&mut c);
            c
        })
        .collect();
    let basis: Vec<Vec<f32>> = (0..LATENT)
        .map(|_| {
            let mut b: Vec<f32> = (0..dim).map(|_| gaussian(&mut rng)).collect();
            normalise(&mut b);
            b
        })
        .collect();
    let latent_sigma = 0.5 / (LATENT as f32).sqrt();
    let iso_sigma = 0.1 / (dim as f32).sqrt();
    let draw = |count: usize, rng: &mut StdRng| {
        let mut out = Vec::with_capacity(count * dim);
        for _ in 0..count {
            let c = &centres[rng.random_range(0..centres.len())];
            let start = out.len();
            out.extend(c.iter().map(|x| x + iso_sigma * gaussian(rng)));
            for b in &basis {
                let z = latent_sigma * gaussian(rng);
                for (o, bv) in out[start..].iter_mut().zip(b) {
                    *o += z * bv;
                }
            }
            normalise(&mut out[start..]);
        }
        out
    };
    let base = draw(n, &mut rng);
    let mut qrng = StdRng::seed_from_u64(seed ^ 0xdead_beef);
    let queries = draw(nq, &mut qrng);
    Dataset {
        name: "synthetic".into(),
        labels: None,
        query_labels: None,
        dim,
        metric: Metric::InnerProduct,
        base,
        queries,
    }
}
