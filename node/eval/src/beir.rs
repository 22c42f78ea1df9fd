//! BEIR-layout test collections (corpus.jsonl, queries.jsonl, qrels/test.tsv) and the
//! metrics BEIR reports, computed as pytrec_eval does.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Row {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub text: String,
}

impl Row {
    /// What gets encoded: "title text" when there is a title, as BEIR evaluates.
    pub fn text(&self) -> String {
        if self.title.is_empty() {
            self.text.clone()
        } else {
            format!("{} {}", self.title, self.text)
        }
    }
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
        .collect()
}

/// query id -> doc id -> relevance grade.
pub fn read_qrels(path: &Path) -> Result<HashMap<String, HashMap<String, u32>>> {
    let mut out: HashMap<String, HashMap<String, u32>> = HashMap::new();
    for line in std::fs::read_to_string(path)?.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() == 3 {
            out.entry(f[0].into())
                .or_default()
                .insert(f[1].into(), f[2].trim().parse()?);
        }
    }
    Ok(out)
}

/// nDCG@k of one ranking as pytrec_eval computes it (gain = grade, log2 discount).
pub fn ndcg_at(k: usize, ranked: &[&str], rels: &HashMap<String, u32>) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| rels.get(*d).copied().unwrap_or(0) as f64 / (i as f64 + 2.0).log2())
        .sum();
    let mut ideal: Vec<u32> = rels.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| *g as f64 / (i as f64 + 2.0).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

/// Recall@k: the share of a query's relevant documents (grade > 0) in the top k.
pub fn recall_at(k: usize, ranked: &[&str], rels: &HashMap<String, u32>) -> f64 {
    let relevant = rels.values().filter(|&&g| g > 0).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = ranked
        .iter()
        .take(k)
        .filter(|d| rels.get(**d).is_some_and(|&g| g > 0))
        .count();
    found as f64 / relevant as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_and_recall_by_hand() {
        let rels: HashMap<String, u32> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
        assert!((ndcg_at(10, &["a", "b"], &rels) - 1.0).abs() < 1e-12);
        // b first, a second: (1 + 2/log2 3) / (2 + 1/log2 3)
        let want = (1.0 + 2.0 / 3f64.log2()) / (2.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at(10, &["b", "a"], &rels) - want).abs() < 1e-12);
        assert_eq!(ndcg_at(10, &["x", "y"], &rels), 0.0);
        // Only the top k count.
        assert_eq!(ndcg_at(1, &["x", "a"], &rels), 0.0);
        assert_eq!(recall_at(1, &["x", "a"], &rels), 0.0);
        assert_eq!(recall_at(2, &["x", "a"], &rels), 0.5);
    }
}
