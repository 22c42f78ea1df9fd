//! A shard's lexical index (issue 22): BM25 over the documents' stored text, so a
//! collection answers keyword queries and hybrid ones (dense fused with lexical) from
//! the same shards that hold its vectors.
//!
//! Terms are what [`tokenize`] makes of a text: lower-cased runs of letters, digits
//! and underscores (Python's `\w`) of at least two characters, each stemmed by the
//! Snowball English stemmer — the tokenisation `bm25s` applies with `PyStemmer`'s
//! English stemmer and no stop words, which `scripts/reference/bm25_reference.py`
//! runs as the reference. Per term a posting list of (row, term frequency); per row its
//! length in terms.
//!
//! Like the payload index it is derived from the documents file, never stored: rows
//! never change, so it only grows (a batch's terms are read in `stage`, outside the
//! state lock, and appended as `publish` places the rows); `open` builds it in the
//! record scan that builds the row table; a compaction renumbers it with its row map;
//! liveness is checked where rows are scored. Scoring needs the collection's statistics
//! (document count, mean length, each term's document frequency) so that every shard
//! scores alike: a gateway asks each shard for its part ([`LexicalIndex::stats`]) and
//! sends the sums with the query ([`LexicalIndex::search`]).

use std::collections::HashMap;

use crate::compact::RowMap;
use crate::topk::TopK;
use crate::Metric;

/// BM25's term-frequency saturation and length normalisation. The defaults are
/// Anserini's (k1 = 0.9, b = 0.4), the BM25 the dense-sparse interpolation paper
/// (Wang et al., ICTIR 2021) fuses with, fixed before any figure here was seen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bm25 {
    pub k1: f32,
    pub b: f32,
}

impl Default for Bm25 {
    fn default() -> Self {
        Bm25 { k1: 0.9, b: 0.4 }
    }
}

/// The terms of `text` (see the module comment), in order, repeats kept.
pub fn tokenize(text: &str) -> Vec<String> {
    let stemmer = rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English);
    let mut out = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if word.chars().count() >= 2 {
            out.push(stemmer.stem(word).into_owned());
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.extend(c.to_lowercase());
        } else {
            flush(&mut word, &mut out);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// One row's distinct terms with their frequencies and its length (read outside the
/// state lock).
#[derive(Debug, Default)]
pub struct RowTerms {
    terms: Vec<(String, u32)>,
    len: u32,
}

impl RowTerms {
    pub fn of(text: Option<&str>) -> RowTerms {
        let Some(text) = text.filter(|t| !t.is_empty()) else {
            return RowTerms::default();
        };
        let tokens = tokenize(text);
        let len = tokens.len() as u32;
        let mut counts: HashMap<String, u32> = HashMap::new();
        for t in tokens {
            *counts.entry(t).or_default() += 1;
        }
        RowTerms {
            terms: counts.into_iter().collect(),
            len,
        }
    }
}

/// A shard's part of the collection's statistics for some terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LexicalStats {
    /// Live rows with text.
    pub docs: u64,
    /// Their lengths' sum, in terms.
    pub total_len: u64,
    /// Per asked term, the live rows holding it.
    pub df: Vec<u64>,
}

#[derive(Default)]
pub struct LexicalIndex {
    ids: HashMap<Box<str>, u32>,
    postings: Vec<Vec<(u32, u32)>>,
    lengths: Vec<u32>,
}

impl LexicalIndex {
    /// Appends row `row` (the next one) with its terms.
    pub fn push(&mut self, row: u64, t: RowTerms) {
        debug_assert_eq!(row, self.lengths.len() as u64, "lexical rows out of order");
        let r = self.lengths.len() as u32;
        self.lengths.push(t.len);
        for (term, tf) in t.terms {
            let id = match self.ids.get(term.as_str()) {
                Some(&id) => id,
                None => {
                    let id = self.postings.len() as u32;
                    self.ids.insert(term.into_boxed_str(), id);
                    self.postings.push(Vec::new());
                    id
                }
            };
            self.postings[id as usize].push((r, tf));
        }
    }

    /// This index in a compaction's new numbering (`rows` rows after it).
    pub fn remapped(&self, map: &RowMap, rows: u64) -> LexicalIndex {
        let mut lengths = vec![0u32; rows as usize];
        for (r, &len) in self.lengths.iter().enumerate() {
            if let Some(n) = map.map(r as u64).filter(|&n| n < rows) {
                lengths[n as usize] = len;
            }
        }
        let postings = self
            .postings
            .iter()
            .map(|p| {
                p.iter()
                    .filter_map(|&(r, tf)| map.map(u64::from(r)).map(|n| (n as u32, tf)))
                    .collect()
            })
            .collect();
        LexicalIndex {
            ids: self.ids.clone(),
            postings,
            lengths,
        }
    }

    fn postings_of(&self, term: &str) -> &[(u32, u32)] {
        self.ids
            .get(term)
            .map_or(&[][..], |&id| &self.postings[id as usize])
    }

    /// This shard's statistics for `terms` over the rows `live` admits.
    pub fn stats(&self, terms: &[String], live: impl Fn(u64) -> bool) -> LexicalStats {
        let (mut docs, mut total_len) = (0u64, 0u64);
        for (r, &len) in self.lengths.iter().enumerate() {
            if len > 0 && live(r as u64) {
                docs += 1;
                total_len += u64::from(len);
            }
        }
        let df = terms
            .iter()
            .map(|t| {
                self.postings_of(t)
                    .iter()
                    .filter(|&&(r, _)| live(u64::from(r)))
                    .count() as u64
            })
            .collect();
        LexicalStats {
            docs,
            total_len,
            df,
        }
    }

    /// The top `k` rows `live` admits by BM25 for `terms` (repeats count: a term asked
    /// twice weighs twice), each term weighted by `idf` (the collection's, same
    /// order), lengths normalised by the collection's mean `avg_len`. Lucene's form:
    /// `idf · tf / (tf + k1 · (1 − b + b · len / avg_len))`.
    pub fn search(
        &self,
        terms: &[String],
        idf: &[f32],
        avg_len: f32,
        bm25: Bm25,
        k: usize,
        live: impl Fn(u64) -> bool,
    ) -> Vec<(u64, f32)> {
        let mut scores: HashMap<u32, f32> = HashMap::new();
        let avg = avg_len.max(f32::MIN_POSITIVE);
        for (term, &w) in terms.iter().zip(idf) {
            for &(r, tf) in self.postings_of(term) {
                let len = self.lengths[r as usize] as f32;
                let tf = tf as f32;
                let norm = bm25.k1 * (1.0 - bm25.b + bm25.b * len / avg);
                *scores.entry(r).or_default() += w * tf / (tf + norm);
            }
        }
        // Higher is better, as inner product.
        let mut top = TopK::new(k, Metric::InnerProduct);
        for (r, s) in scores {
            if live(u64::from(r)) {
                top.push(u64::from(r), s);
            }
        }
        top.into_sorted()
    }
}

/// BM25's inverse document frequency of a term held by `df` of `docs` documents
/// (Lucene's, never negative).
pub fn idf(docs: u64, df: u64) -> f32 {
    let (n, df) = (docs as f64, df as f64);
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lowercased_stemmed_words_of_two_characters_or_more() {
        assert_eq!(
            tokenize("Running runners ran; a B2-bomber's (flows) flowing_fast x"),
            [
                "run",
                "runner",
                "ran",
                "b2",
                "bomber",
                "flow",
                "flowing_fast"
            ]
        );
        assert!(tokenize("").is_empty());
        assert_eq!(tokenize("Über straße").len(), 2);
    }

    /// Scores against a direct computation of the formula over a tiny corpus, and the
    /// statistics split over two shards summing to the whole's.
    #[test]
    fn bm25_scores_follow_the_formula_and_shards_sum_to_the_collection() {
        let texts = [
            "the cat sat on the mat",
            "the dog sat",
            "cats and dogs and cats",
            "",
            "a mat for a dog",
        ];
        let mut whole = LexicalIndex::default();
        let mut halves = [LexicalIndex::default(), LexicalIndex::default()];
        let mut counts = [0u64, 0];
        for (r, t) in texts.iter().enumerate() {
            whole.push(r as u64, RowTerms::of(Some(t)));
            let h = r % 2;
            halves[h].push(counts[h], RowTerms::of(Some(t)));
            counts[h] += 1;
        }
        let q = tokenize("cat mat");
        let all = |_| true;
        let s = whole.stats(&q, all);
        assert_eq!(
            (s.docs, s.total_len, s.df.clone()),
            (4, 6 + 3 + 5 + 3, vec![2, 2])
        );
        let (a, b) = (halves[0].stats(&q, all), halves[1].stats(&q, all));
        assert_eq!(a.docs + b.docs, s.docs);
        assert_eq!(a.total_len + b.total_len, s.total_len);
        assert_eq!(vec![a.df[0] + b.df[0], a.df[1] + b.df[1]], s.df);
        let idfs: Vec<f32> = s.df.iter().map(|&df| idf(s.docs, df)).collect();
        let avg = s.total_len as f32 / s.docs as f32;
        let bm = Bm25::default();
        let hits = whole.search(&q, &idfs, avg, bm, 10, all);
        let direct = |text: &str| -> f32 {
            let toks = tokenize(text);
            let len = toks.len() as f32;
            q.iter()
                .zip(&idfs)
                .map(|(t, w)| {
                    let tf = toks.iter().filter(|x| *x == t).count() as f32;
                    if tf == 0.0 {
                        0.0
                    } else {
                        w * tf / (tf + bm.k1 * (1.0 - bm.b + bm.b * len / avg))
                    }
                })
                .sum()
        };
        assert_eq!(hits.len(), 3);
        for (row, score) in &hits {
            assert!((score - direct(texts[*row as usize])).abs() < 1e-5);
        }
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1));
        // A dead row is neither counted nor returned.
        let live = |r: u64| r != 0;
        assert_eq!(whole.stats(&q, live).df, vec![1, 1]);
        assert!(whole
            .search(&q, &idfs, avg, bm, 10, live)
            .iter()
            .all(|h| h.0 != 0));
        // Renumbered by a compaction that drops row 1: row 2 becomes 1.
        let map = RowMap::new(vec![0b11101], 5);
        let after = whole.remapped(&map, 4);
        let moved: Vec<u64> = after
            .search(&q, &idfs, avg, bm, 10, all)
            .iter()
            .map(|h| h.0)
            .collect();
        let before: Vec<u64> = hits.iter().map(|h| map.map(h.0).unwrap()).collect();
        assert_eq!(moved, before);
    }
}
