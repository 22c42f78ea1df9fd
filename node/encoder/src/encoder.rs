//! Text in, unit vectors out: tokenizer + BERT + pooling + normalisation.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::bert::Bert;
use crate::error::{EncoderError, Result};
use crate::model_dir::{ModelSpec, Pooling};
use crate::{AttentionMask, Precision};

/// The model's tokenizer with shoal's settings. The packaged tokenizer.json hard-codes
/// truncation and padding at 128: truncate at the model's own limit instead, and pad
/// each batch only to its longest text.
pub fn tokenizer(spec: &ModelSpec) -> Result<Tokenizer> {
    let mut tokenizer =
        Tokenizer::from_file(&spec.tokenizer).map_err(|e| EncoderError::BadFile {
            path: spec.tokenizer.clone(),
            reason: e.to_string(),
        })?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: spec.max_seq_length,
            ..TruncationParams::default()
        }))
        .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..PaddingParams::default()
    }));
    Ok(tokenizer)
}

pub struct Encoder<B: Backend> {
    spec: ModelSpec,
    tokenizer: Tokenizer,
    bert: Bert<B>,
    device: B::Device,
    /// Sub-batches run side by side on a CPU backend (see [`Encoder::with_threads`]).
    threads: usize,
}

/// Vectors for a batch, in input order.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub vectors: Vec<Vec<f32>>,
    /// Texts cut at the model's `max_seq_length`.
    pub truncated: usize,
    /// Which ones, in input order.
    pub was_truncated: Vec<bool>,
    /// Padded token positions the model ran over (batch x longest).
    pub padded_tokens: usize,
}

impl<B: Backend> Encoder<B> {
    pub fn load(dir: &Path, device: B::Device) -> Result<Self> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// Loads in the given precision. `F16` (for GPU backends) also makes f16 the device's
    /// default float type, so every activation runs in half precision too; Burn allows
    /// that once per device and process, before any other tensor is made on it.
    pub fn load_with(dir: &Path, device: B::Device, precision: Precision) -> Result<Self> {
        let spec = ModelSpec::load(dir)?;
        let tokenizer = tokenizer(&spec)?;
        if precision == Precision::F16 {
            burn::tensor::set_default_dtypes::<B>(
                &device,
                burn::tensor::DType::F16,
                <B::IntElem as burn::tensor::Element>::dtype(),
            )
            .map_err(|e| EncoderError::Backend(format!("switching the device to f16: {e:?}")))?;
        }
        let bert = Bert::load(&spec, &device, precision)?;
        tracing::info!(
            dir = %dir.display(),
            dimension = spec.dimension(),
            layers = spec.bert.num_hidden_layers,
            max_seq_length = spec.max_seq_length,
            pooling = ?spec.pooling,
            normalize = spec.normalize,
            "encoder loaded"
        );
        Ok(Self {
            spec,
            tokenizer,
            bert,
            device,
            threads: 1,
        })
    }

    /// Splits each batch into up to `n` sub-batches whose forward passes run on their
    /// own threads. On a CPU backend this puts every core on the work the backend
    /// itself runs on one (attention, GELU, layout copies), not only on its matrix
    /// products; GPU backends keep the default of 1.
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// How attention masks padding (see [`AttentionMask`]); the output is the same.
    pub fn with_attention_mask(mut self, mask: AttentionMask) -> Self {
        self.bert.mask = mask;
        self
    }

    pub fn dimension(&self) -> usize {
        self.spec.dimension()
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Token count of `text` after truncation (for grouping texts by length).
    pub fn token_len(&self, text: &str) -> Result<usize> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        Ok(enc.len())
    }

    pub fn encode(&self, texts: &[&str]) -> Result<Encoded> {
        if let Some(index) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(EncoderError::EmptyText { index });
        }
        if texts.is_empty() {
            return Ok(Encoded {
                vectors: Vec::new(),
                truncated: 0,
                was_truncated: Vec::new(),
                padded_tokens: 0,
            });
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        let (b, s) = (encodings.len(), encodings[0].len());
        let was_truncated: Vec<bool> = encodings
            .iter()
            .map(|e| !e.get_overflowing().is_empty())
            .collect();
        let truncated = was_truncated.iter().filter(|&&t| t).count();
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&x| x as i64));
            mask.extend(e.get_attention_mask().iter().map(|&x| x as f32));
        }
        Ok(Encoded {
            vectors: self.run(ids, mask, b, s)?,
            truncated,
            was_truncated,
            padded_tokens: b * s,
        })
    }

    /// Vectors for already-tokenized inputs (ids including the special tokens), padded
    /// here to the longest. For benchmarks that must feed two implementations the same
    /// token sequences; `encode` is the entry point for text.
    pub fn encode_token_ids(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let b = batch.len();
        let s = batch.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || s == 0 {
            return Err(EncoderError::EmptyText { index: 0 });
        }
        if s > self.spec.bert.max_position_embeddings {
            return Err(EncoderError::Tokenizer(format!(
                "{s} tokens exceed the model's {} positions",
                self.spec.bert.max_position_embeddings
            )));
        }
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for seq in batch {
            ids.extend(seq.iter().map(|&x| i64::from(x)));
            ids.resize(ids.len() + s - seq.len(), 0);
            mask.extend(std::iter::repeat_n(1.0f32, seq.len()));
            mask.resize(mask.len() + s - seq.len(), 0.0);
        }
        self.run(ids, mask, b, s)
    }

    /// Forward pass, pooling and normalisation over a padded `[b, s]` batch, in up to
    /// `threads` row blocks side by side.
    fn run(&self, ids: Vec<i64>, mask: Vec<f32>, b: usize, s: usize) -> Result<Vec<Vec<f32>>> {
        let parts = self.threads.min(b);
        if parts <= 1 {
            // One block: a single sequence may still spread over the cores.
            return self.run_block(ids, mask, b, s, self.threads > 1);
        }
        let rows = b.div_ceil(parts);
        std::thread::scope(|scope| {
            let blocks: Vec<_> = ids
                .chunks(rows * s)
                .zip(mask.chunks(rows * s))
                .map(|(i, m)| {
                    scope.spawn(move || {
                        self.run_block(i.to_vec(), m.to_vec(), i.len() / s, s, false)
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(b);
            for block in blocks {
                let vectors = block
                    .join()
                    .map_err(|_| EncoderError::Backend("an encoder thread panicked".into()))??;
                out.extend(vectors);
            }
            Ok(out)
        })
    }

    fn run_block(
        &self,
        ids: Vec<i64>,
        mask: Vec<f32>,
        b: usize,
        s: usize,
        split_single: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), &self.device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, s]), &self.device);
        let hidden = self.bert.forward(ids, mask.clone(), split_single);
        let h = self.dimension();
        let pooled: Tensor<B, 2> = match self.spec.pooling {
            Pooling::Mean => {
                let m = mask.reshape([b, s, 1]);
                let summed = (hidden * m.clone()).sum_dim(1).reshape([b, h]);
                let counts = m.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
                summed / counts
            }
            Pooling::Cls => hidden.slice([0..b, 0..1, 0..h]).reshape([b, h]),
        };
        let pooled = if self.spec.normalize {
            let norms = pooled
                .clone()
                .powf_scalar(2.0)
                .sum_dim(1)
                .sqrt()
                .clamp_min(1e-12);
            pooled / norms
        } else {
            pooled
        };
        let flat: Vec<f32> = pooled
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| EncoderError::Tokenizer(format!("reading output tensor: {e:?}")))?;
        Ok(flat.chunks(h).map(<[f32]>::to_vec).collect())
    }
}
