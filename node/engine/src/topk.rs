//! Pure top-k selection and merging by exact score.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::config::Metric;

/// A scored row. Ordered so that the *worst* candidate is the heap's maximum.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: f32,
    row: u64,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // Larger key = worse; ties broken by row so results are deterministic.
    fn cmp(&self, o: &Self) -> Ordering {
        self.key.total_cmp(&o.key).then(self.row.cmp(&o.row))
    }
}

/// Keeps the `k` best rows seen so far under a metric.
pub struct TopK {
    k: usize,
    metric: Metric,
    heap: BinaryHeap<Entry>,
}

impl TopK {
    pub fn new(k: usize, metric: Metric) -> Self {
        Self {
            k,
            metric,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Internal key: smaller is better for both metrics.
    #[inline]
    fn key(&self, score: f32) -> f32 {
        match self.metric {
            Metric::L2 => score,
            Metric::InnerProduct => -score,
        }
    }

    #[inline]
    pub fn push(&mut self, row: u64, score: f32) {
        let e = Entry {
            key: self.key(score),
            row,
        };
        if self.heap.len() < self.k {
            self.heap.push(e);
        } else if let Some(worst) = self.heap.peek() {
            if e < *worst {
                self.heap.pop();
                self.heap.push(e);
            }
        }
    }

    /// `(row, score)` best first.
    pub fn into_sorted(self) -> Vec<(u64, f32)> {
        let metric = self.metric;
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|e| {
                let score = match metric {
                    Metric::L2 => e.key,
                    Metric::InnerProduct => -e.key,
                };
                (e.row, score)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_k_for_each_metric() {
        let scores = [0.5f32, 0.1, 0.9, 0.3, 0.7, 0.2];
        let mut l2 = TopK::new(3, Metric::L2);
        let mut ip = TopK::new(3, Metric::InnerProduct);
        for (row, s) in scores.iter().enumerate() {
            l2.push(row as u64, *s);
            ip.push(row as u64, *s);
        }
        assert_eq!(l2.into_sorted(), vec![(1, 0.1), (5, 0.2), (3, 0.3)]);
        assert_eq!(ip.into_sorted(), vec![(2, 0.9), (4, 0.7), (0, 0.5)]);
    }

    #[test]
    fn fewer_than_k_and_ties() {
        let mut t = TopK::new(5, Metric::L2);
        t.push(7, 1.0);
        t.push(3, 1.0);
        assert_eq!(t.into_sorted(), vec![(3, 1.0), (7, 1.0)]);
    }
}
