//! shoal's text encoder: any sentence-transformers BERT model directory (Hugging Face
//! layout) as a Burn model, generic over the backend, plus a dynamic-batching actor pool.
//!
//! Burn stays inside this crate so the rest of the node compiles without it.

mod bert;
mod encoder;
mod error;
mod model_dir;
pub mod pool;

pub use encoder::{tokenizer, Encoded, Encoder};
pub use error::{EncoderError, Result};
pub use model_dir::{BertConfig, ModelSpec, Pooling};

/// Numeric precision of weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// Half precision, for GPU backends.
    F16,
}

/// How attention ignores padding keys. Same result either way; which is faster is the
/// backend's business: burn-cubecl (CUDA) sends an additive bias to its multi-kernel
/// fallback and only a boolean mask to its flash-attention kernels, while burn-flex
/// (CPU) treats both alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionMask {
    /// A float bias of -1e4 on padding keys, built once per batch as `[b, 1, s, s]`.
    #[default]
    Bias,
    /// A boolean mask, true on padding keys, `[b, heads, s, s]`.
    Bool,
}

/// Where scripts/fetch-model.sh installs all-MiniLM-L6-v2, relative to the repo root.
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";

/// The default CPU backend (burn-flex: SIMD kernels and gemm; the fastest of Burn's CPU
/// backends here, see docs/benchmarks.md).
pub type CpuBackend = burn::backend::Flex;

#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;

/// Loads a model dir on the default CPU backend, splitting batches over the cores.
pub fn load_cpu(dir: &std::path::Path) -> Result<Encoder<CpuBackend>> {
    Ok(Encoder::load(dir, Default::default())?.with_threads(cpu_threads()))
}

/// Cores this process may use.
pub fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
