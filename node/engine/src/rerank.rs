//! Reduced-precision re-ranking copies (issue 19): the exact re-scoring step reads
//! candidates' vectors from a per-generation copy at 2 bytes (fp16) or 1 byte (SQ8) a
//! dimension instead of the 4-byte `vectors` file, so the page cache a shard needs to
//! re-rank from memory is a half or a quarter of full precision.
//!
//! The copy belongs to an index generation: `gen-<N>.rerank` holds one code per label
//! of the generation (its build's rows `0..covered_rows`, dead ones included, so a
//! label is its code's position and a later compaction's row maps do not touch it).
//! Rows newer than the generation, `get` and exact searches keep reading the full
//! vectors, which stay the durable source for rebuilds, snapshots and the scrubber.
//!
//! The codecs are FAISS's scalar quantizer's (`SQfp16`, and `SQ8` = `QT_8bit`: per
//! dimension, trained as the sample's min and max, a code `floor(255 x')` of
//! `x' = (x - min) / (max - min)` clipped to [0, 1], decoded at its cell's centre),
//! written here so every replica encodes its own copy from the trained ranges a
//! generation carries (a backup taking its primary's generation fetches the index and
//! encodes the copy from its own identical vectors); the unit tests check the codes
//! against FAISS's own encoder.
//!
//! File: `SHOALRR1`, then a little-endian header (precision, dimension, rows), the
//! SQ8 ranges (`min`, `max - min`, `dimension` f32 each), zero padding to 64 bytes,
//! then `rows × code_bytes` codes; its crc32 and length are in the manifest.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::config::{Metric, Scoring};
use super::error::{Result, ShardError};
use super::storage::{self, VectorView};

pub use shoal_proto::precision::Precision;

/// A precision's number in the file header.
fn precision_code(p: Precision) -> u32 {
    match p {
        Precision::F32 => 0,
        Precision::F16 => 1,
        Precision::Sq8 => 2,
    }
}

fn precision_of(code: u32) -> Option<Precision> {
    Precision::ALL
        .into_iter()
        .find(|p| precision_code(*p) == code)
}

const MAGIC: &[u8; 8] = b"SHOALRR1";
const HEADER_ALIGN: usize = 64;

/// A trained codec: fp16 needs no training; SQ8 its per-dimension ranges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Codec {
    pub precision: Precision,
    pub dim: usize,
    /// SQ8: each dimension's minimum and range (`max - min`) over the training sample.
    #[serde(default)]
    pub vmin: Vec<f32>,
    #[serde(default)]
    pub vdiff: Vec<f32>,
}

impl Codec {
    /// The codec of `precision` for `dim`-d vectors, trained on `sample` (row-major);
    /// `None` for full precision, which needs no copy.
    pub fn train(precision: Precision, dim: usize, sample: &[f32]) -> Option<Self> {
        let (vmin, vdiff) = match precision {
            Precision::F32 => return None,
            Precision::F16 => (Vec::new(), Vec::new()),
            Precision::Sq8 => {
                let mut lo = vec![f32::INFINITY; dim];
                let mut hi = vec![f32::NEG_INFINITY; dim];
                for v in sample.chunks_exact(dim) {
                    for i in 0..dim {
                        lo[i] = lo[i].min(v[i]);
                        hi[i] = hi[i].max(v[i]);
                    }
                }
                if sample.is_empty() {
                    lo.fill(0.0);
                    hi.fill(0.0);
                }
                let diff = lo.iter().zip(&hi).map(|(l, h)| h - l).collect();
                (lo, diff)
            }
        };
        Some(Self {
            precision,
            dim,
            vmin,
            vdiff,
        })
    }

    pub fn code_bytes(&self) -> usize {
        self.precision.code_bytes(self.dim)
    }

    /// A well-formed codec for `dim` (a peer's or a file's, checked before use).
    pub fn check(&self, dim: usize) -> std::result::Result<(), String> {
        let ranges = match self.precision {
            Precision::F32 => return Err("full precision has no re-ranking copy".into()),
            Precision::F16 => 0,
            Precision::Sq8 => dim,
        };
        if self.dim != dim || self.vmin.len() != ranges || self.vdiff.len() != ranges {
            return Err(format!(
                "a {} codec for {} dimensions with {} and {} ranges does not fit {dim} dimensions",
                self.precision.name(),
                self.dim,
                self.vmin.len(),
                self.vdiff.len()
            ));
        }
        if self.vmin.iter().chain(&self.vdiff).any(|x| !x.is_finite())
            || self.vdiff.iter().any(|d| *d < 0.0)
        {
            return Err("an SQ8 range is not finite or negative".into());
        }
        Ok(())
    }

    /// Encodes one vector into `out` (`code_bytes` long).
    pub fn encode(&self, v: &[f32], out: &mut [u8]) {
        debug_assert_eq!(v.len(), self.dim);
        match self.precision {
            Precision::F32 => unreachable!("no copy at full precision"),
            Precision::F16 => {
                for (x, o) in v.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
                }
            }
            Precision::Sq8 => {
                for i in 0..self.dim {
                    let d = self.vdiff[i];
                    let x = if d > 0.0 {
                        ((v[i] - self.vmin[i]) / d).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    out[i] = (255.0 * x) as u8;
                }
            }
        }
    }

    /// Decodes one code into `out` (`dim` long).
    #[inline]
    pub fn decode(&self, code: &[u8], out: &mut [f32]) {
        match self.precision {
            Precision::F32 => unreachable!("no copy at full precision"),
            Precision::F16 => {
                use half::slice::HalfFloatSliceExt;
                // Through half's slice conversion: F16C instructions where the CPU has
                // them (detected at run time); one value at a time decoded in software
                // made fp16 re-ranking 0.89x float32's queries per second on
                // Fashion-MNIST.
                match bytemuck_f16(code) {
                    Some(h) => h.convert_to_f32_slice(out),
                    None => {
                        for (c, o) in code.chunks_exact(2).zip(out.iter_mut()) {
                            *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                        }
                    }
                }
            }
            Precision::Sq8 => {
                for i in 0..self.dim {
                    out[i] = self.vmin[i] + (code[i] as f32 + 0.5) / 255.0 * self.vdiff[i];
                }
            }
        }
    }

    fn header(&self, rows: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_ALIGN + 8 * self.vmin.len());
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&precision_code(self.precision).to_le_bytes());
        h.extend_from_slice(&(self.dim as u32).to_le_bytes());
        h.extend_from_slice(&rows.to_le_bytes());
        for x in self.vmin.iter().chain(&self.vdiff) {
            h.extend_from_slice(&x.to_le_bytes());
        }
        h.resize(h.len().next_multiple_of(HEADER_ALIGN), 0);
        h
    }
}

/// Writes the copy of rows `0..rows` of `view` to `path` (fsynced); returns its
/// crc32 and length.
pub fn write(path: &Path, codec: &Codec, view: &VectorView, rows: u64) -> Result<(u32, u64)> {
    let file = File::create(path).map_err(ShardError::io(path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    let header = codec.header(rows);
    crc.update(&header);
    out.write_all(&header).map_err(ShardError::io(path))?;
    let mut code = vec![0u8; codec.code_bytes()];
    for row in 0..rows {
        codec.encode(view.get(row), &mut code);
        crc.update(&code);
        out.write_all(&code).map_err(ShardError::io(path))?;
    }
    let file = out
        .into_inner()
        .map_err(|e| ShardError::io(path)(e.into_error()))?;
    file.sync_all().map_err(ShardError::io(path))?;
    let bytes = header.len() as u64 + rows * codec.code_bytes() as u64;
    Ok((crc.finalize(), bytes))
}

/// A generation's re-ranking copy, memory-mapped: its codes live in the page cache,
/// not in the process's heap.
pub struct RerankCopy {
    codec: Codec,
    map: Mmap,
    start: usize,
    rows: u64,
}

impl RerankCopy {
    /// Opens `path`, checked whole against the manifest's crc32 and length (the read
    /// also brings the codes into the page cache re-ranking reads them from).
    pub fn load(path: &Path, crc32: u32, bytes: u64, dim: usize) -> Result<Self> {
        let corrupt = |reason: String| ShardError::Corrupt {
            file: path.to_owned(),
            offset: 0,
            reason,
        };
        let (crc, len) = storage::file_crc(path)?;
        if crc != crc32 || len != bytes {
            return Err(corrupt(format!(
                "re-ranking copy checksum {crc:08x} ({len} bytes) is not the manifest's {crc32:08x} ({bytes} bytes)"
            )));
        }
        let map = storage::map_file(path)?.ok_or_else(|| corrupt("empty file".into()))?;
        let (codec, rows, start) = parse_header(&map).map_err(corrupt)?;
        codec.check(dim).map_err(corrupt)?;
        let need = start as u64 + rows * codec.code_bytes() as u64;
        if need != map.len() as u64 {
            return Err(corrupt(format!(
                "{rows} codes of {} bytes need {need} bytes, the file has {}",
                codec.code_bytes(),
                map.len()
            )));
        }
        Ok(Self {
            codec,
            map,
            start,
            rows,
        })
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The score of `label`'s decoded vector for `query`, `buf` a `dim`-long scratch;
    /// `None` past the copy's rows.
    #[inline]
    pub fn score(&self, metric: Metric, query: &[f32], label: u64, buf: &mut [f32]) -> Option<f32> {
        if label >= self.rows {
            return None;
        }
        let n = self.codec.code_bytes();
        let at = self.start + label as usize * n;
        self.codec.decode(&self.map[at..at + n], buf);
        Some(metric.score(query, buf))
    }
}

/// `code` as half floats, when it is 2-byte aligned (codes in a copy always are: the
/// map is page aligned, the header 64 bytes, each code 2 bytes a dimension).
#[inline]
fn bytemuck_f16(code: &[u8]) -> Option<&[half::f16]> {
    if !(code.as_ptr() as usize).is_multiple_of(2) || !code.len().is_multiple_of(2) {
        return None;
    }
    // SAFETY: aligned and sized for u16s as checked; `f16` is a transparent u16 and
    // every bit pattern is a valid f16; little-endian hosts only (storage.rs refuses
    // big-endian ones), so the stored bytes are the value.
    Some(unsafe { std::slice::from_raw_parts(code.as_ptr().cast::<half::f16>(), code.len() / 2) })
}

fn parse_header(b: &[u8]) -> std::result::Result<(Codec, u64, usize), String> {
    let word = |at: usize| -> std::result::Result<u32, String> {
        b.get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
            .ok_or_else(|| "truncated header".to_string())
    };
    if b.get(..8) != Some(MAGIC.as_slice()) {
        return Err("not a re-ranking copy (bad magic)".into());
    }
    let code = word(8)?;
    let precision = precision_of(code).ok_or_else(|| format!("unknown precision {code}"))?;
    let dim = word(12)? as usize;
    let rows = u64::from(word(16)?) | (u64::from(word(20)?) << 32);
    if dim == 0 || dim > 65_536 {
        return Err(format!("dimension {dim} out of range"));
    }
    let ranges = if precision == Precision::Sq8 { dim } else { 0 };
    let mut at = 24;
    let mut floats = |n: usize| -> std::result::Result<Vec<f32>, String> {
        let v = (0..n)
            .map(|i| word(at + 4 * i).map(f32::from_bits))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        at += 4 * n;
        Ok(v)
    };
    let vmin = floats(ranges)?;
    let vdiff = floats(ranges)?;
    let codec = Codec {
        precision,
        dim,
        vmin,
        vdiff,
    };
    Ok((codec, rows, at.next_multiple_of(HEADER_ALIGN)))
}

/// The file name of generation `id`'s copy.
pub fn file_name(id: u64) -> String {
    format!("gen-{id:08}.rerank")
}

/// Removes a copy's file if present (an interrupted write).
pub fn remove(path: &Path) {
    let _ = fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(n: usize, dim: usize) -> Vec<f32> {
        (0..n * dim)
            .map(|i| ((i as f32 * 0.618).sin() * 3.0) + (i % 7) as f32 * 0.1)
            .collect()
    }

    #[test]
    fn codes_round_trip_within_their_precision() {
        let dim = 24;
        let data = vectors(200, dim);
        for p in [Precision::F16, Precision::Sq8] {
            let c = Codec::train(p, dim, &data).unwrap();
            c.check(dim).unwrap();
            let mut code = vec![0u8; c.code_bytes()];
            let mut back = vec![0f32; dim];
            let mut worst = 0f32;
            for v in data.chunks_exact(dim) {
                c.encode(v, &mut code);
                c.decode(&code, &mut back);
                for i in 0..dim {
                    let tol = match p {
                        Precision::F16 => v[i].abs() / 1024.0 + 1e-6,
                        _ => c.vdiff[i] / 255.0 * 0.5 + 1e-6,
                    };
                    worst = worst.max((v[i] - back[i]).abs() / tol);
                }
            }
            assert!(worst <= 1.0, "{p:?}: error {worst} times its bound");
        }
        assert!(Codec::train(Precision::F32, dim, &data).is_none());
    }

    #[test]
    fn sq8_matches_faiss_scalar_quantizer() {
        let dim = 32;
        let sample = vectors(500, dim);
        let queries = vectors(60, dim)
            .iter()
            .map(|x| x * 1.3 - 0.2)
            .collect::<Vec<_>>();
        for (p, factory) in [(Precision::Sq8, "SQ8"), (Precision::F16, "SQfp16")] {
            let ours = Codec::train(p, dim, &sample).unwrap();
            let theirs = crate::ann::faiss_sa_encode(dim, factory, &sample, &queries);
            let mut code = vec![0u8; ours.code_bytes()];
            // Some of the queries fall outside the sample's ranges: the clipping too.
            for (v, t) in queries
                .chunks_exact(dim)
                .zip(theirs.chunks_exact(ours.code_bytes()))
            {
                ours.encode(v, &mut code);
                assert_eq!(code, t, "{p:?}: our codes are not FAISS's");
            }
        }
    }

    #[test]
    fn a_written_copy_loads_and_scores_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dim = 16;
        let data = vectors(50, dim);
        let path = dir.path().join(file_name(3));
        let mut store = storage::VectorStore::open(dir.path().join("vectors.f32"), dim, 0).unwrap();
        for v in data.chunks_exact(dim) {
            store.append(v).unwrap();
        }
        let codec = Codec::train(Precision::Sq8, dim, &data).unwrap();
        let (crc, bytes) = write(&path, &codec, &store.view(), 50).unwrap();
        let copy = RerankCopy::load(&path, crc, bytes, dim).unwrap();
        assert_eq!(copy.codec(), &codec);
        let q = &data[..dim];
        let mut buf = vec![0f32; dim];
        let exact = Metric::InnerProduct.score(q, &data[dim * 7..dim * 8]);
        let approx = copy.score(Metric::InnerProduct, q, 7, &mut buf).unwrap();
        assert!(
            (exact - approx).abs() < 0.05 * exact.abs().max(1.0),
            "{exact} vs {approx}"
        );
        assert!(copy.score(Metric::InnerProduct, q, 50, &mut buf).is_none());
        assert!(RerankCopy::load(&path, crc ^ 1, bytes, dim).is_err());
        assert!(RerankCopy::load(&path, crc, bytes, dim + 1).is_err());
        let mut raw = fs::read(&path).unwrap();
        raw[200] ^= 0xff;
        fs::write(&path, &raw).unwrap();
        let e = RerankCopy::load(&path, crc, bytes, dim)
            .err()
            .expect("damage refused");
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}
