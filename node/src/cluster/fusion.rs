//! Hybrid retrieval's arithmetic (issue 22), pure: fusing a dense and a lexical
//! ranking into one, and vector pseudo-relevance feedback's query update. The gateway
//! gathers the lists (`gateway.rs`); everything that decides an order is here.
//!
//! - Reciprocal-rank fusion (Cormack et al., SIGIR 2009): a document scores
//!   Σ 1 / (k + rank) over the lists it appears in (rank from 1), k = 60 as the paper
//!   fixed it.
//! - Linear interpolation ("To Interpolate or not to Interpolate: PRF, Dense and Sparse
//!   Retrievers", Li et al., SIGIR 2022): each list's scores min-max normalised to
//!   [0, 1] (a list whose scores are all equal counts 1), a missing document 0, fused
//!   as w · dense + (1 − w) · lexical; w = 0.5 by default (an even mix; the paper
//!   tunes w per collection, so this is a starting point, not its figure).
//! - Rocchio PRF on dense vectors ("Improving Query Representations for Dense
//!   Retrieval with Pseudo Relevance Feedback: A Reproducibility Study", Li et al.,
//!   ECIR 2022): q' = α · q + β · mean(top-d documents' vectors), d = 3, α = 0.4,
//!   β = 0.6, taken from that study's Rocchio settings as recalled (not re-checked
//!   against its tables here), fixed before any shoal figure was seen.

use std::collections::HashMap;

use shoal_proto::metric::Metric;
use shoal_proto::v1 as pb;

/// RRF's constant.
pub const RRF_K: u32 = 60;
/// Linear interpolation's default weight of the dense side.
pub const DENSE_WEIGHT: f32 = 0.5;
/// Rocchio's defaults: documents fed back, the query's weight, theirs.
pub const PRF_DEPTH: u32 = 3;
pub const PRF_ALPHA: f32 = 0.4;
pub const PRF_BETA: f32 = 0.6;
/// Hits taken from each side before fusing, at least.
pub const FUSION_DEPTH: u32 = 100;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fusion {
    Rrf { k: u32 },
    Linear { dense_weight: f32 },
}

/// One list's scores as "higher is better" (an L2 distance negated).
fn better_high(score: f32, metric: Metric) -> f32 {
    match metric {
        Metric::InnerProduct => score,
        Metric::L2 => -score,
    }
}

/// The fused top `k` of `dense` (scored by `metric`) and `lexical` (BM25, higher is
/// better), each already in its own best-first order. A hit keeps the text and
/// metadata either side carried; its score is the fused one; ties go by id.
pub fn fuse(
    dense: &[pb::Hit],
    lexical: &[pb::Hit],
    metric: Metric,
    fusion: Fusion,
    k: usize,
) -> Vec<pb::Hit> {
    let mut fused: HashMap<String, (f32, pb::Hit)> = HashMap::new();
    let mut add = |list: &[pb::Hit], part: &dyn Fn(usize, &pb::Hit) -> f32| {
        for (i, h) in list.iter().enumerate() {
            let s = part(i, h);
            let e = fused.entry(h.id.clone()).or_insert_with(|| {
                (
                    0.0,
                    pb::Hit {
                        id: h.id.clone(),
                        shard: h.shard,
                        ..Default::default()
                    },
                )
            });
            e.0 += s;
            if e.1.text.is_empty() {
                e.1.text.clone_from(&h.text);
            }
            if e.1.metadata_json.is_empty() {
                e.1.metadata_json.clone_from(&h.metadata_json);
            }
        }
    };
    match fusion {
        Fusion::Rrf { k } => {
            let rrf = |i: usize, _: &pb::Hit| 1.0 / (k as f32 + i as f32 + 1.0);
            add(dense, &rrf);
            add(lexical, &rrf);
        }
        Fusion::Linear { dense_weight } => {
            let d = normaliser(dense.iter().map(|h| better_high(h.score, metric)));
            let l = normaliser(lexical.iter().map(|h| h.score));
            add(dense, &|_, h: &pb::Hit| {
                dense_weight * d(better_high(h.score, metric))
            });
            add(lexical, &|_, h: &pb::Hit| (1.0 - dense_weight) * l(h.score));
        }
    }
    let mut out: Vec<pb::Hit> = fused
        .into_values()
        .map(|(s, mut h)| {
            h.score = s;
            h
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    out.truncate(k);
    out
}

/// Min-max normalisation over `scores`: a function to [0, 1]; all equal → 1.
fn normaliser(scores: impl Iterator<Item = f32>) -> impl Fn(f32) -> f32 {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for s in scores {
        lo = lo.min(s);
        hi = hi.max(s);
    }
    move |s| {
        if hi > lo {
            (s - lo) / (hi - lo)
        } else {
            1.0
        }
    }
}

/// Rocchio: `alpha · query + beta · mean(feedback)`; the query itself when there is
/// no feedback. Every feedback vector has the query's length (the caller's check).
pub fn rocchio(query: &[f32], feedback: &[Vec<f32>], alpha: f32, beta: f32) -> Vec<f32> {
    if feedback.is_empty() {
        return query.to_vec();
    }
    let n = feedback.len() as f32;
    (0..query.len())
        .map(|i| alpha * query[i] + beta * feedback.iter().map(|v| v[i]).sum::<f32>() / n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: &str, score: f32) -> pb::Hit {
        pb::Hit {
            id: id.into(),
            score,
            ..Default::default()
        }
    }

    fn ids(h: &[pb::Hit]) -> Vec<&str> {
        h.iter().map(|h| h.id.as_str()).collect()
    }

    #[test]
    fn rrf_sums_reciprocal_ranks() {
        let dense = [hit("a", 0.9), hit("b", 0.8), hit("c", 0.1)];
        let lexical = [hit("c", 12.0), hit("a", 3.0), hit("d", 1.0)];
        let f = fuse(
            &dense,
            &lexical,
            Metric::InnerProduct,
            Fusion::Rrf { k: 60 },
            10,
        );
        // a: 1/61 + 1/62; c: 1/63 + 1/61; b: 1/62; d: 1/63.
        assert_eq!(ids(&f), ["a", "c", "b", "d"]);
        let want = [
            1.0 / 61.0 + 1.0 / 62.0,
            1.0 / 63.0 + 1.0 / 61.0,
            1.0 / 62.0,
            1.0 / 63.0,
        ];
        for (h, w) in f.iter().zip(want) {
            assert!((h.score - w).abs() < 1e-7, "{} {} {w}", h.id, h.score);
        }
        assert_eq!(
            ids(&fuse(
                &dense,
                &lexical,
                Metric::InnerProduct,
                Fusion::Rrf { k: 60 },
                2
            )),
            ["a", "c"]
        );
    }

    #[test]
    fn linear_interpolates_min_max_normalised_scores() {
        // L2: smaller is better; a's distance 1 is the best (1.0), c's 3 the worst (0).
        let dense = [hit("a", 1.0), hit("b", 2.0), hit("c", 3.0)];
        let lexical = [hit("c", 10.0), hit("d", 5.0), hit("b", 0.0)];
        let f = fuse(
            &dense,
            &lexical,
            Metric::L2,
            Fusion::Linear { dense_weight: 0.25 },
            10,
        );
        let score = |id: &str| f.iter().find(|h| h.id == id).unwrap().score;
        assert!((score("a") - 0.25).abs() < 1e-6);
        assert!((score("b") - 0.25 * 0.5).abs() < 1e-6);
        assert!((score("c") - 0.75).abs() < 1e-6);
        assert!((score("d") - 0.75 * 0.5).abs() < 1e-6);
        assert_eq!(ids(&f), ["c", "d", "a", "b"]);
        // Weight 1: the dense order alone (documents only lexical score 0).
        let only = fuse(
            &dense,
            &lexical,
            Metric::L2,
            Fusion::Linear { dense_weight: 1.0 },
            3,
        );
        assert_eq!(ids(&only), ["a", "b", "c"]);
        // One hit a side: its normalised score is 1.
        let one = fuse(
            &[hit("x", 7.0)],
            &[hit("x", 2.0)],
            Metric::InnerProduct,
            Fusion::Linear { dense_weight: 0.5 },
            1,
        );
        assert!((one[0].score - 1.0).abs() < 1e-6);
    }

    #[test]
    fn fused_hits_keep_payloads_from_either_side() {
        let mut d = hit("a", 1.0);
        d.text = "text".into();
        let mut l = hit("a", 2.0);
        l.metadata_json = "{}".into();
        let f = fuse(&[d], &[l], Metric::InnerProduct, Fusion::Rrf { k: 60 }, 1);
        assert_eq!(
            (f[0].text.as_str(), f[0].metadata_json.as_str()),
            ("text", "{}")
        );
    }

    #[test]
    fn rocchio_moves_the_query_toward_the_mean_of_its_feedback() {
        let q = [1.0, 0.0];
        let fb = vec![vec![0.0, 1.0], vec![0.0, 3.0]];
        assert_eq!(rocchio(&q, &fb, 0.4, 0.6), vec![0.4, 1.2]);
        assert_eq!(rocchio(&q, &[], 0.4, 0.6), vec![1.0, 0.0]);
    }
}
