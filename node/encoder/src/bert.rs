//! BERT as a Burn module, generic over the backend. Field names mirror the Hugging
//! Face checkpoint (`encoder.layer.N.attention.self.query`, ...) so weights load by
//! path; `LayerNorm` and `self` are renamed on load (see `Bert::load`).
//!
//! MPNet (issue 21: all-mpnet-base-v2, the second model) is the same layer stack with
//! its attention weights named `attention.attn.{q,k,v,o}` (mapped onto BERT's on load),
//! no token-type embeddings, position ids counted from past the padding id, and one
//! relative-position bias (`encoder.relative_attention_bias`, T5-style buckets) added
//! to every layer's attention scores.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use burn_store::{
    HalfPrecisionAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};

use crate::error::{EncoderError, Result};
use crate::model_dir::{BertConfig, ModelSpec};
use crate::{AttentionMask, Precision};

#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    word_embeddings: Embedding<B>,
    position_embeddings: Embedding<B>,
    /// BERT's; MPNet has none.
    token_type_embeddings: Option<Embedding<B>>,
    layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
}

#[derive(Module, Debug)]
pub struct DenseNorm<B: Backend> {
    dense: Linear<B>,
    layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    self_attn: SelfAttention<B>,
    output: DenseNorm<B>,
}

#[derive(Module, Debug)]
pub struct Intermediate<B: Backend> {
    dense: Linear<B>,
}

#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    attention: Attention<B>,
    intermediate: Intermediate<B>,
    output: DenseNorm<B>,
}

#[derive(Module, Debug)]
pub struct LayerStack<B: Backend> {
    layer: Vec<Layer<B>>,
    /// MPNet's relative-position bias: `[buckets, heads]`.
    relative_attention_bias: Option<Embedding<B>>,
}

#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    embeddings: Embeddings<B>,
    encoder: LayerStack<B>,
}

/// A loaded BERT with its head count and how attention masks padding (plain values,
/// kept out of the module tree).
pub struct Bert<B: Backend> {
    model: BertModel<B>,
    heads: usize,
    pub mask: AttentionMask,
    /// MPNet: its position ids start at `pad_token_id + 1`, and its attention adds the
    /// relative-position bias of this many buckets.
    mpnet: Option<(usize, usize)>,
}

/// Padding as the backend's attention takes it (see [`AttentionMask`]).
#[derive(Clone)]
enum Padding<B: Backend> {
    /// `[b, 1, s, s]`, -1e4 on padding keys, broadcast over the heads.
    Bias(Tensor<B, 4>),
    /// `[b, heads, s, s]`, true on padding keys, materialised per head: a GPU flash
    /// kernel indexes the mask by (batch × heads) without broadcasting.
    Bool(Tensor<B, 4, Bool>),
}

impl<B: Backend> Padding<B> {
    /// The part of the mask for heads `r` (a bias of one head is shared by every head;
    /// MPNet's has one per head).
    fn heads(&self, r: std::ops::Range<usize>) -> Self {
        match self {
            Padding::Bias(t) if t.dims()[1] > 1 => {
                let [b, _, s, _] = t.dims();
                Padding::Bias(t.clone().slice([0..b, r, 0..s, 0..s]))
            }
            Padding::Bias(t) => Padding::Bias(t.clone()),
            Padding::Bool(t) => {
                let [b, _, s, _] = t.dims();
                Padding::Bool(t.clone().slice([0..b, r, 0..s, 0..s]))
            }
        }
    }
}

/// Inputs of at most this many token rows split each linear's output columns in two
/// halves computed side by side (see [`Bert::forward`]).
const SPLIT_ROWS: usize = 64;

fn linear<B: Backend>(i: usize, o: usize, d: &B::Device) -> Linear<B> {
    LinearConfig::new(i, o).init(d)
}

fn norm<B: Backend>(c: &BertConfig, d: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(c.hidden_size)
        .with_epsilon(c.layer_norm_eps)
        .init(d)
}

impl<B: Backend> BertModel<B> {
    fn init(c: &BertConfig, d: &B::Device) -> Self {
        let h = c.hidden_size;
        let layer = (0..c.num_hidden_layers)
            .map(|_| Layer {
                attention: Attention {
                    self_attn: SelfAttention {
                        query: linear(h, h, d),
                        key: linear(h, h, d),
                        value: linear(h, h, d),
                    },
                    output: DenseNorm {
                        dense: linear(h, h, d),
                        layer_norm: norm(c, d),
                    },
                },
                intermediate: Intermediate {
                    dense: linear(h, c.intermediate_size, d),
                },
                output: DenseNorm {
                    dense: linear(c.intermediate_size, h, d),
                    layer_norm: norm(c, d),
                },
            })
            .collect();
        Self {
            embeddings: Embeddings {
                word_embeddings: EmbeddingConfig::new(c.vocab_size, h).init(d),
                position_embeddings: EmbeddingConfig::new(c.max_position_embeddings, h).init(d),
                token_type_embeddings: (!c.is_mpnet())
                    .then(|| EmbeddingConfig::new(c.type_vocab_size, h).init(d)),
                layer_norm: norm(c, d),
            },
            encoder: LayerStack {
                layer,
                relative_attention_bias: c.is_mpnet().then(|| {
                    EmbeddingConfig::new(c.relative_attention_num_buckets, c.num_attention_heads)
                        .init(d)
                }),
            },
        }
    }
}

impl<B: Backend> Bert<B> {
    /// Builds the module tree from `config.json` and fills it from `model.safetensors`.
    /// Every parameter must be present in the file; extra tensors (the unused pooler,
    /// `position_ids`) are ignored.
    pub fn load(spec: &ModelSpec, device: &B::Device, precision: Precision) -> Result<Self> {
        let mut model = BertModel::init(&spec.bert, device);
        let store = SafetensorsStore::from_file(&spec.weights);
        let store = match precision {
            Precision::F32 => store.with_from_adapter(PyTorchToBurnAdapter),
            // Weights cast to f16 as they load (the file holds f32).
            Precision::F16 => {
                store.with_from_adapter(PyTorchToBurnAdapter.chain(HalfPrecisionAdapter::new()))
            }
        };
        // MPNet's attention names, onto BERT's (before the general renames below).
        let store = if spec.bert.is_mpnet() {
            store
                .with_key_remapping(r"attention\.attn\.q\.", "attention.self_attn.query.")
                .with_key_remapping(r"attention\.attn\.k\.", "attention.self_attn.key.")
                .with_key_remapping(r"attention\.attn\.v\.", "attention.self_attn.value.")
                .with_key_remapping(r"attention\.attn\.o\.", "attention.output.dense.")
                .with_key_remapping(r"attention\.LayerNorm", "attention.output.layer_norm")
        } else {
            store
        };
        let mut store = store
            .with_key_remapping(r"\.self\.", ".self_attn.")
            .with_key_remapping(r"LayerNorm", "layer_norm")
            .allow_partial(true);
        let bad = |reason: String| EncoderError::BadFile {
            path: spec.weights.clone(),
            reason,
        };
        let result = model
            .load_from(&mut store)
            .map_err(|e| bad(e.to_string()))?;
        if !result.missing.is_empty() || !result.errors.is_empty() {
            let missing: Vec<_> = result
                .missing
                .iter()
                .map(|(p, _)| p.as_str())
                .take(5)
                .collect();
            return Err(bad(format!(
                "{} parameters missing (first: {missing:?}), {} load errors (first: {:?})",
                result.missing.len(),
                result.errors.len(),
                result.errors.first()
            )));
        }
        Ok(Self {
            model,
            heads: spec.bert.num_attention_heads,
            mask: AttentionMask::default(),
            mpnet: spec.bert.is_mpnet().then_some((
                spec.bert.pad_token_id,
                spec.bert.relative_attention_num_buckets,
            )),
        })
    }

    /// Hidden states `[batch, seq, hidden]` for token ids and a 0/1 attention mask,
    /// both `[batch, seq]`. `split_single`: spread a single sequence's work over two
    /// threads (see [`Split`]); the caller splits larger batches by rows instead.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
        split_single: bool,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let e = &self.model.embeddings;
        // MPNet counts positions from past the padding id (padded positions get other
        // ids there, but they are masked keys and not pooled).
        let first = self.mpnet.map_or(0, |(pad, _)| pad as i64 + 1);
        let positions = Tensor::<B, 1, Int>::arange(first..first + s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let mut x = e.word_embeddings.forward(ids) + e.position_embeddings.forward(positions);
        if let Some(types) = &e.token_type_embeddings {
            x = x + types.forward(Tensor::<B, 2, Int>::zeros([b, s], &device));
        }
        let h = x.dims()[2];
        let mut x = e.layer_norm.forward(x).reshape([b * s, h]);
        // Padding keys get a large negative bias: softmax gives them exactly 0 weight.
        // -1e4 rather than -1e9: it must stay finite in f16 (0 x -inf would be NaN), and
        // exp(-1e4) is already 0 in f32.
        // Built once as a contiguous [b, 1, s, s]: the attention kernel then reads one
        // tile per sequence for every head, where an expanded [b, heads, s, s] view
        // would be copied out whole in every layer.
        let pad = (mask.ones_like() - mask).reshape([b, 1, 1, s]);
        let padding = match (self.mask, self.position_bias(s, &device)) {
            // MPNet: the relative-position bias per head, plus the padding's.
            (_, Some(positions)) => Padding::Bias(positions + pad.mul_scalar(-1.0e4)),
            (AttentionMask::Bias, None) => {
                Padding::Bias(Tensor::<B, 4>::zeros([b, 1, s, s], &device) + pad.mul_scalar(-1.0e4))
            }
            (AttentionMask::Bool, None) => Padding::Bool(
                (Tensor::<B, 4>::zeros([b, self.heads, s, s], &device) + pad).greater_elem(0.5),
            ),
        };
        let split = match (split_single && b == 1, s <= SPLIT_ROWS) {
            (false, _) => Split::None,
            (true, true) => Split::Short,
            (true, false) => Split::Long,
        };
        for layer in &self.model.encoder.layer {
            x = self.layer_forward(layer, x, &padding, b, split);
        }
        x.reshape([b, s, h])
    }

    /// MPNet's relative-position bias for `s` tokens, `[1, heads, s, s]` (None for BERT).
    fn position_bias(&self, s: usize, device: &B::Device) -> Option<Tensor<B, 4>> {
        let (_, buckets) = self.mpnet?;
        let table = self.model.encoder.relative_attention_bias.as_ref()?;
        let ids: Vec<i64> = (0..s)
            .flat_map(|q| (0..s).map(move |k| relative_bucket(k as i64 - q as i64, buckets, 128)))
            .collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [s * s]), device)
            .reshape([1, s * s]);
        // [1, s*s, heads] -> [1, heads, s, s]
        let v = table.forward(ids);
        Some(
            v.reshape([s, s, self.heads])
                .permute([2, 0, 1])
                .unsqueeze::<4>(),
        )
    }

    /// One encoder layer over `x` flattened to `[batch * seq, hidden]`: every linear is
    /// then a single large matrix product rather than one per sequence.
    fn layer_forward(
        &self,
        l: &Layer<B>,
        x: Tensor<B, 2>,
        padding: &Padding<B>,
        b: usize,
        split: Split,
    ) -> Tensor<B, 2> {
        let linear = |l: &Linear<B>, x: Tensor<B, 2>| match split {
            Split::Short => split_columns(l, x, |y| y),
            _ => l.forward(x),
        };
        let [bs, h] = x.dims();
        let s = bs / b;
        let (heads, dh) = (self.heads, h / self.heads);
        let to_heads = |t: Tensor<B, 2>| t.reshape([b, s, heads, dh]).swap_dims(1, 2);
        let a = &l.attention.self_attn;
        let q = to_heads(linear(&a.query, x.clone()));
        let k = to_heads(linear(&a.key, x.clone()));
        let v = to_heads(linear(&a.value, x.clone()));
        // The backend's fused attention (softmax(q kᵗ / sqrt(dh) + bias) v): burn-flex
        // runs it as two large matrix products or a tiled flash kernel, one head after
        // another; the bias broadcasts over heads.
        let attend = |q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, p: Padding<B>| {
            let (mask, bias) = match p {
                Padding::Bias(t) => (None, Some(t)),
                Padding::Bool(t) => (Some(t), None),
            };
            attention(q, k, v, mask, bias, AttentionModuleOptions::default())
        };
        let ctx = match split {
            Split::None => attend(q, k, v, padding.clone()),
            // A one-head model has no heads to share out.
            _ if heads < 2 => attend(q, k, v, padding.clone()),
            _ => {
                let half = heads / 2;
                let part = |t: &Tensor<B, 4>, r: std::ops::Range<usize>| {
                    t.clone().slice([0..b, r, 0..s, 0..dh])
                };
                let (x1, x2) = rayon::join(
                    || {
                        attend(
                            part(&q, 0..half),
                            part(&k, 0..half),
                            part(&v, 0..half),
                            padding.heads(0..half),
                        )
                    },
                    || {
                        attend(
                            part(&q, half..heads),
                            part(&k, half..heads),
                            part(&v, half..heads),
                            padding.heads(half..heads),
                        )
                    },
                );
                Tensor::cat(vec![x1, x2], 1)
            }
        };
        let ctx = ctx.swap_dims(1, 2).reshape([bs, h]);
        let o = &l.attention.output;
        let x = o.layer_norm.forward(linear(&o.dense, ctx) + x);
        let inter = match split {
            Split::None => gelu(l.intermediate.dense.forward(x.clone())),
            Split::Short => split_columns(&l.intermediate.dense, x.clone(), gelu),
            Split::Long => {
                let y = l.intermediate.dense.forward(x.clone());
                let [m, n] = y.dims();
                let (g1, g2) = rayon::join(
                    || gelu(y.clone().slice([0..m / 2, 0..n])),
                    || gelu(y.clone().slice([m / 2..m, 0..n])),
                );
                Tensor::cat(vec![g1, g2], 0)
            }
        };
        l.output
            .layer_norm
            .forward(linear(&l.output.dense, inter) + x)
    }
}

/// MPNet's bucket of a relative position (key minus query), as its reference computes
/// it (T5's bidirectional buckets: half for each direction, exact up to a quarter of
/// them, then logarithmic up to `max_distance`), in f32 as torch does.
pub fn relative_bucket(relative: i64, buckets: usize, max_distance: usize) -> i64 {
    let half = (buckets / 2) as i64;
    let n = -relative;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return ret + n;
    }
    let large = max_exact
        + ((n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32) as i64;
    ret += large.min(half - 1);
    ret
}

/// How one sequence's layer spreads over two threads (a batch of several is split by
/// rows before the model). A CPU backend runs attention and element-wise kernels on
/// one core, and matrix products under ~7M multiply-adds too.
#[derive(Clone, Copy)]
enum Split {
    None,
    /// At most [`SPLIT_ROWS`] tokens (a search query): every linear as two column
    /// halves, attention as two halves of the heads.
    Short,
    /// A long sequence: its products are large enough for the backend to share out;
    /// attention by halves of the heads, GELU by halves of the rows.
    Long,
}

/// `f(x W + b)` with the output columns in two halves, each on its own rayon thread.
fn split_columns<B: Backend>(
    l: &Linear<B>,
    x: Tensor<B, 2>,
    f: impl Fn(Tensor<B, 2>) -> Tensor<B, 2> + Sync,
) -> Tensor<B, 2> {
    let w = l.weight.val();
    let [i, o] = w.dims();
    let half = o / 2;
    let bias = l.bias.as_ref().map(|b| b.val());
    let part = |r: std::ops::Range<usize>| {
        let y = x.clone().matmul(w.clone().slice([0..i, r.clone()]));
        f(match &bias {
            Some(b) => y + b.clone().slice([r]).unsqueeze(),
            None => y,
        })
    };
    let (a, b) = rayon::join(|| part(0..half), || part(half..o));
    Tensor::cat(vec![a, b], 1)
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn mpnets_buckets_are_t5s_bidirectional_ones() {
        // Exact for |distance| < 8, the sign in the upper half, logarithmic to 128.
        let b = |r| relative_bucket(r, 32, 128);
        assert_eq!((b(0), b(1), b(7), b(-1), b(-7)), (0, 17, 23, 1, 7));
        assert_eq!((b(8), b(-8)), (24, 8));
        // (Python's own figures for the reference's formula.)
        assert_eq!((b(-15), b(-16), b(-127), b(-500)), (9, 10, 15, 15));
        assert_eq!((b(127), b(500)), (31, 31));
    }
}
