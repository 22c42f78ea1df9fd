//! The re-ranking precision (issue 19): what the exact re-scoring step reads for an
//! index generation's candidates — the stored float32 vectors, or a reduced copy each
//! generation writes (fp16, or SQ8 as FAISS's scalar quantizer encodes it). One type
//! for the map (bincode, variant index: `F32` = 0, `F16` = 1, `Sq8` = 2, never
//! reordered), the shard engine's manifest (JSON: `f32`, `f16`, `sq8`), the CLI and
//! the wire enum (`coordinator::Rerank`, converted here and nowhere else).

use serde::{Deserialize, Serialize};

use crate::coordinator as cpb;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The stored float32 vectors (no copy).
    #[default]
    F32,
    /// IEEE half precision, 2 bytes a dimension.
    F16,
    /// 8-bit scalar quantization per dimension, 1 byte a dimension.
    Sq8,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Sq8];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Sq8 => "sq8",
        }
    }

    /// From a name as operators write it.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "full" => Some(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Some(Precision::F16),
            "sq8" | "int8" => Some(Precision::Sq8),
            _ => None,
        }
    }

    /// Bytes a vector of `dim` dimensions takes in this precision.
    pub fn code_bytes(self, dim: usize) -> usize {
        match self {
            Precision::F32 => dim * 4,
            Precision::F16 => dim * 2,
            Precision::Sq8 => dim,
        }
    }

    /// From the wire enum's value; `None` for unspecified (the caller's default) and
    /// for a value this build does not know (refused by the caller).
    pub fn from_wire(v: i32) -> Option<Self> {
        match cpb::Rerank::try_from(v).ok()? {
            cpb::Rerank::Unspecified => None,
            cpb::Rerank::Float32 => Some(Precision::F32),
            cpb::Rerank::Float16 => Some(Precision::F16),
            cpb::Rerank::Sq8 => Some(Precision::Sq8),
        }
    }

    pub fn wire(self) -> i32 {
        (match self {
            Precision::F32 => cpb::Rerank::Float32,
            Precision::F16 => cpb::Rerank::Float16,
            Precision::Sq8 => cpb::Rerank::Sq8,
        }) as i32
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_stable() {
        for (i, p) in Precision::ALL.into_iter().enumerate() {
            assert_eq!(crate::wire::encode(&p), vec![i as u8]);
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.name())
            );
            assert_eq!(Precision::from_wire(p.wire()), Some(p));
            assert_eq!(Precision::parse(p.name()), Some(p));
        }
        assert_eq!(Precision::from_wire(0), None);
        assert_eq!(Precision::from_wire(99), None);
        assert_eq!(Precision::parse("fp16"), Some(Precision::F16));
        assert_eq!(Precision::parse("bf16"), None);
        assert_eq!(Precision::Sq8.code_bytes(384), 384);
    }
}
