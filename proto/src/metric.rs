//! The similarity metric: one type for the map (stored in the Raft log as bincode,
//! which names a variant by its index: `InnerProduct` = 0, `L2` = 1, never reordered),
//! the shard engine (its JSON manifest names it `inner_product` / `l2`), the gateway's
//! merge and the wire enum (`coordinator::Metric`, converted here and nowhere else).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::coordinator as cpb;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Inner product: larger is closer (cosine when vectors are L2-normalised).
    InnerProduct,
    /// Squared euclidean distance: smaller is closer.
    L2,
}

impl Metric {
    /// True when score `a` ranks before score `b`.
    #[inline]
    pub fn better(self, a: f32, b: f32) -> bool {
        match self {
            Metric::L2 => a < b,
            Metric::InnerProduct => a > b,
        }
    }

    /// Best first: the order of a merged result list.
    pub fn rank(self, a: f32, b: f32) -> Ordering {
        match self {
            Metric::L2 => a.total_cmp(&b),
            Metric::InnerProduct => b.total_cmp(&a),
        }
    }

    /// From the wire enum's value; unspecified is inner product (the default).
    pub fn from_wire(v: i32) -> Option<Self> {
        match cpb::Metric::try_from(v).ok()? {
            cpb::Metric::Unspecified | cpb::Metric::InnerProduct => Some(Metric::InnerProduct),
            cpb::Metric::L2 => Some(Metric::L2),
        }
    }

    pub fn wire(self) -> i32 {
        match self {
            Metric::InnerProduct => cpb::Metric::InnerProduct as i32,
            Metric::L2 => cpb::Metric::L2 as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_stable() {
        // The Raft log (bincode: variant index) and shard manifests (JSON: names).
        assert_eq!(crate::wire::encode(&Metric::InnerProduct), vec![0]);
        assert_eq!(crate::wire::encode(&Metric::L2), vec![1]);
        assert_eq!(serde_json::to_string(&Metric::L2).unwrap(), "\"l2\"");
        assert_eq!(
            serde_json::to_string(&Metric::InnerProduct).unwrap(),
            "\"inner_product\""
        );
        for m in [Metric::InnerProduct, Metric::L2] {
            assert_eq!(Metric::from_wire(m.wire()), Some(m));
        }
        assert_eq!(Metric::from_wire(0), Some(Metric::InnerProduct));
        assert_eq!(Metric::from_wire(99), None);
        assert!(Metric::L2.better(1.0, 2.0) && Metric::InnerProduct.better(2.0, 1.0));
        assert_eq!(Metric::L2.rank(1.0, 2.0), Ordering::Less);
        assert_eq!(Metric::InnerProduct.rank(1.0, 2.0), Ordering::Greater);
    }
}
