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

/// Where a node runs its encoder: the CPU backend, or a CUDA GPU (by index) in a build
/// with the `cuda` feature. A node on a GPU says so when it registers
/// (`Capacity.gpu`), for placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn is_gpu(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown encoder device {s:?}: cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Loads a model dir on `device`, as the pool's worker type. CUDA in a build without
/// the `cuda` feature is an error that names it.
pub fn load_on(dir: &std::path::Path, device: Device) -> Result<Box<dyn pool::BatchEncode>> {
    match device {
        Device::Cpu => Ok(Box::new(load_cpu(dir)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(Box::new(Encoder::<CudaBackend>::load(
            dir,
            burn::backend::cuda::CudaDevice { index: n },
        )?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(EncoderError::Unsupported(format!(
            "encoder device {device}: this build has no CUDA backend (build with \
             --features cuda)"
        ))),
    }
}

/// Loads a model dir on the default CPU backend, splitting batches over the cores.
pub fn load_cpu(dir: &std::path::Path) -> Result<Encoder<CpuBackend>> {
    Ok(Encoder::load(dir, Default::default())?.with_threads(cpu_threads()))
}

/// Cores this process may use.
pub fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(s.parse::<Device>(), Ok(d));
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert!("gpu"
            .parse::<Device>()
            .unwrap_err()
            .contains("cpu, cuda or cuda:N"));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!(!Device::Cpu.is_gpu() && Device::Cuda(1).is_gpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_refused_by_name() {
        let e = load_on(std::path::Path::new("/nonexistent"), Device::Cuda(0))
            .err()
            .expect("no CUDA in this build");
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
