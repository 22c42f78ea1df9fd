//! Checksummed record framing shared by the write-ahead log and the document segment.
//!
//! A frame is a 16-byte header, then the payload:
//! `magic u32 | payload len u32 | payload crc32 u32 | header crc32 u32` (little endian).
//! The header has its own checksum so a scan can tell a torn tail (the last write cut
//! short by a crash: nothing valid follows it) from corruption in the middle of a file
//! (a valid frame follows the bad bytes), which must never be silently cut.

use std::io::Read;

const MAGIC: u32 = 0x5348_4f41; // "SHOA"
pub const HEADER_LEN: usize = 16;
/// Upper bound on one frame's payload: a batch of 64 MiB is far beyond any sane
/// request and keeps a garbage length from allocating gigabytes.
pub const MAX_PAYLOAD: usize = 256 << 20;

pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hcrc = crc32fast::hash(&out[..12]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A parsed, checksum-verified header.
struct Header {
    len: usize,
    crc: u32,
}

fn parse_header(h: &[u8]) -> Option<Header> {
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != MAGIC || crc32fast::hash(&h[..12]) != word(12) {
        return None;
    }
    let len = word(4) as usize;
    (len <= MAX_PAYLOAD).then_some(Header { len, crc: word(8) })
}

/// How a scan of a framed file ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a valid frame.
    Clean,
    /// The file ends in an incomplete or unverifiable frame at `offset`, and no valid
    /// frame follows: the remains of a write that was never acknowledged.
    TornTail { offset: u64 },
    /// A bad frame at `offset` is followed by valid frames: real corruption.
    Corrupt { offset: u64, reason: String },
}

/// Scans all frames of `data`, calling `each(offset, payload)` for every valid one,
/// in order, until the first bad frame.
pub fn scan(
    data: &[u8],
    mut each: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<ScanEnd, (u64, String)> {
    let mut off = 0usize;
    while off < data.len() {
        let bad = |reason: &str| classify(data, off, reason);
        if data.len() - off < HEADER_LEN {
            return Ok(bad("truncated header"));
        }
        let Some(h) = parse_header(&data[off..off + HEADER_LEN]) else {
            return Ok(bad("bad frame header"));
        };
        let start = off + HEADER_LEN;
        if data.len() - start < h.len {
            return Ok(bad("frame extends past end of file"));
        }
        let payload = &data[start..start + h.len];
        if crc32fast::hash(payload) != h.crc {
            return Ok(bad("payload checksum mismatch"));
        }
        each(off as u64, payload).map_err(|e| (off as u64, e))?;
        off = start + h.len;
    }
    Ok(ScanEnd::Clean)
}

/// A bad frame is a torn tail only when no valid frame starts anywhere after it.
fn classify(data: &[u8], off: usize, reason: &str) -> ScanEnd {
    let mut probe = off + 1;
    while probe + HEADER_LEN <= data.len() {
        if let Some(h) = parse_header(&data[probe..probe + HEADER_LEN]) {
            let start = probe + HEADER_LEN;
            if data.len() - start >= h.len && crc32fast::hash(&data[start..start + h.len]) == h.crc
            {
                return ScanEnd::Corrupt {
                    offset: off as u64,
                    reason: format!("{reason}, followed by a valid record at offset {probe}"),
                };
            }
        }
        probe += 1;
    }
    ScanEnd::TornTail { offset: off as u64 }
}

/// Reads one frame at the current position of `r` (used for random access reads of
/// a document whose offset is known).
pub fn read_one(r: &mut impl Read) -> Result<Vec<u8>, String> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)
        .map_err(|e| format!("reading header: {e}"))?;
    let h = parse_header(&h).ok_or("bad frame header")?;
    let mut payload = vec![0u8; h.len];
    r.read_exact(&mut payload)
        .map_err(|e| format!("reading payload: {e}"))?;
    if crc32fast::hash(&payload) != h.crc {
        return Err("payload checksum mismatch".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut data = Vec::new();
        let mut offs = Vec::new();
        for i in 0..n {
            offs.push(data.len());
            data.extend(encode(format!("record number {i}").as_bytes()));
        }
        (data, offs)
    }

    fn count(data: &[u8]) -> (usize, ScanEnd) {
        let mut n = 0;
        let end = scan(data, |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        (n, end)
    }

    #[test]
    fn clean_file_reads_every_frame() {
        let (data, _) = frames(5);
        assert_eq!(count(&data), (5, ScanEnd::Clean));
    }

    #[test]
    fn every_truncation_is_a_torn_tail() {
        let (data, offs) = frames(4);
        for cut in 0..data.len() {
            let (n, end) = count(&data[..cut]);
            let whole = offs.iter().filter(|&&o| o < cut).count();
            let last_start = offs[whole.saturating_sub(1)];
            if cut == 0 || offs.contains(&cut) {
                assert_eq!(end, ScanEnd::Clean, "cut {cut}");
                assert_eq!(n, offs.iter().filter(|&&o| o < cut).count());
            } else {
                assert_eq!(
                    end,
                    ScanEnd::TornTail {
                        offset: last_start as u64
                    },
                    "cut {cut}"
                );
                assert_eq!(n, whole - 1);
            }
        }
    }

    #[test]
    fn zero_filled_tail_is_torn_not_corrupt() {
        let (mut data, _) = frames(3);
        let len = data.len();
        data.extend(std::iter::repeat_n(0u8, 4096));
        assert_eq!(count(&data).1, ScanEnd::TornTail { offset: len as u64 });
    }

    #[test]
    fn flipped_byte_in_the_middle_is_corruption() {
        let (data, offs) = frames(4);
        for pos in offs[1]..offs[2] {
            let mut bad = data.clone();
            bad[pos] ^= 0x40;
            match count(&bad) {
                (1, ScanEnd::Corrupt { offset, .. }) => assert_eq!(offset, offs[1] as u64),
                other => panic!("byte {pos}: {other:?}"),
            }
        }
    }
}
