//! A shard's row table and id index in flat arrays, with no allocation per row
//! (issue 19: at 1M vectors the engine held 167 B resident per vector, of which FAISS's
//! codes and ids are 56 B; the rest was an `Arc<str>` per row, a `HashMap<Arc<str>,
//! u64>` entry per live id and a 24-byte `Row`).
//!
//! Rows are numbered in arrival order and never move or change; only liveness goes
//! from live to dead. Per row this keeps:
//! - its id once, in an arena in row order (a one- or two-byte length, then the
//!   bytes), found through a 64-bit base per block of [`BLOCK`] rows and a 16-bit
//!   offset into the block (64 ids of at most `MAX_ID_BYTES` fit in 64 KiB);
//! - its record's offset in the documents file, 48 bits (256 TiB);
//! - one liveness bit;
//! - for a live row, a slot in [`IdIndex`]: open addressing over `u32` row numbers
//!   with a one-byte tag of the id's hash beside each slot, so a probe reads the arena
//!   only when the tag matches.
//!
//! With 24-byte ids that is ~26 + 2 + 6 + 0.1 B, plus 5 B a slot at a load of at most
//! 0.75: 41.3 B a row measured (`shoal-bench footprint`) where the heap structures
//! took 124.5 B. A shard holds fewer than
//! [`MAX_ROWS`] rows; the writer refuses a batch that would pass it.

use std::ops::Range;

use crate::config::MAX_ID_BYTES;

/// Rows per block of the id arena's offsets.
const BLOCK: usize = 64;
const _: () = assert!(BLOCK * (MAX_ID_BYTES + 2) <= u16::MAX as usize + 1);

/// Most rows a shard's table holds (row numbers are stored as `u32 + 1`, with two
/// values reserved for empty and deleted slots).
pub const MAX_ROWS: u64 = u32::MAX as u64 - 2;
/// The documents file offsets a row can point at (48 bits).
pub const MAX_DOC_OFFSET: u64 = (1 << 48) - 1;

#[derive(Default)]
pub struct Rows {
    arena: Vec<u8>,
    block_base: Vec<u64>,
    id_rel: Vec<u16>,
    doc: Vec<[u8; 6]>,
    /// Liveness of each row as a bitset: re-scoring checks it for every candidate, and
    /// 1M rows fit in 125 KiB of cache where a flag per row entry would miss per row.
    live: Vec<u64>,
    index: IdIndex,
}

impl Rows {
    /// A table expecting about `rows` rows with live ids (open: the manifest's count).
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            arena: Vec::with_capacity(rows * 26),
            block_base: Vec::with_capacity(rows.div_ceil(BLOCK)),
            id_rel: Vec::with_capacity(rows),
            doc: Vec::with_capacity(rows),
            live: Vec::with_capacity(rows.div_ceil(64)),
            index: IdIndex::with_capacity(rows),
        }
    }

    /// Rows ever appended, live or dead.
    pub fn len(&self) -> u64 {
        self.id_rel.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.id_rel.is_empty()
    }

    /// Live ids.
    pub fn live_len(&self) -> usize {
        self.index.len
    }

    /// Rows past the end are not live (an index's labels are checked here, not
    /// trusted: a generation may have been built elsewhere).
    #[inline]
    pub fn is_live(&self, row: u64) -> bool {
        self.live
            .get((row / 64) as usize)
            .is_some_and(|w| w & (1 << (row % 64)) != 0)
    }

    pub fn live_rows(&self, range: Range<u64>) -> Vec<u64> {
        range.filter(|&r| self.is_live(r)).collect()
    }

    /// The id of `row` (live or dead).
    pub fn id(&self, row: u64) -> &str {
        let r = row as usize;
        let at = self.block_base[r / BLOCK] as usize + self.id_rel[r] as usize;
        let (len, skip) = read_len(&self.arena[at..]);
        let bytes = &self.arena[at + skip..at + skip + len];
        // SAFETY: only `&str`s are ever written to the arena, at these bounds.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// Where `row`'s record starts in the documents file.
    pub fn doc_offset(&self, row: u64) -> u64 {
        let b = self.doc[row as usize];
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0])
    }

    /// The live row of `id`.
    pub fn get(&self, id: &str) -> Option<u64> {
        let h = hash(id.as_bytes());
        self.index
            .find(h, |row| self.id(row) == id)
            .map(|slot| self.index.row(slot))
    }

    /// Appends a live row for `id`, retiring the row of its previous version. The
    /// writer checks [`MAX_ROWS`], [`MAX_DOC_OFFSET`] and `MAX_ID_BYTES` first.
    pub fn put(&mut self, id: &str, doc_offset: u64) -> u64 {
        debug_assert!(self.len() < MAX_ROWS && doc_offset <= MAX_DOC_OFFSET);
        debug_assert!(id.len() <= MAX_ID_BYTES);
        let row = self.len();
        let r = row as usize;
        if r.is_multiple_of(BLOCK) {
            self.block_base.push(self.arena.len() as u64);
        }
        let rel = self.arena.len() as u64 - self.block_base[r / BLOCK];
        self.id_rel.push(rel as u16);
        write_len(&mut self.arena, id.len());
        self.arena.extend_from_slice(id.as_bytes());
        let d = doc_offset.to_le_bytes();
        self.doc.push([d[0], d[1], d[2], d[3], d[4], d[5]]);
        if r.is_multiple_of(64) {
            self.live.push(0);
        }
        self.live[r / 64] |= 1 << (row % 64);

        let h = hash(id.as_bytes());
        let old = self.index.find(h, |row| self.id(row) == id);
        match old {
            Some(slot) => {
                let old_row = self.index.row(slot);
                self.kill(old_row);
                self.index.set_row(slot, row);
            }
            None => {
                if self.index.needs_growth() {
                    self.index = self.index.grown(|r| hash(self.id(r).as_bytes()));
                }
                self.index.insert(h, row);
            }
        }
        row
    }

    /// Removes `id`; true when it was live.
    pub fn remove(&mut self, id: &str) -> bool {
        let h = hash(id.as_bytes());
        match self.index.find(h, |row| self.id(row) == id) {
            Some(slot) => {
                let row = self.index.row(slot);
                self.index.delete(slot);
                self.kill(row);
                true
            }
            None => false,
        }
    }

    fn kill(&mut self, row: u64) {
        self.live[(row / 64) as usize] &= !(1 << (row % 64));
    }

    /// Bytes of memory the table holds (its arrays' capacities).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.block_base.capacity() * 8
            + self.id_rel.capacity() * 2
            + self.doc.capacity() * 6
            + self.live.capacity() * 8
            + self.index.heap_bytes()
    }
}

fn write_len(arena: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        arena.push(len as u8);
    } else {
        arena.push(0x80 | (len & 0x7f) as u8);
        arena.push((len >> 7) as u8);
    }
}

/// (length, bytes the length took).
#[inline]
fn read_len(at: &[u8]) -> (usize, usize) {
    if at[0] < 0x80 {
        (at[0] as usize, 1)
    } else {
        ((at[0] & 0x7f) as usize | (at[1] as usize) << 7, 2)
    }
}

/// A 64-bit hash of an id, eight bytes at a time (ids are short: 24 bytes is three
/// rounds). Not keyed: the index's worst case is a client choosing colliding ids, which
/// costs that client's shard probe time, never memory or correctness.
#[inline]
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    // splitmix64's finaliser: every input bit reaches the slot's high bits and the tag.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

const EMPTY: u32 = 0;
const TAG_EMPTY: u8 = 0;
const TAG_DELETED: u8 = 1;
/// Grow past this share of slots used (live or deleted).
const MAX_LOAD: f64 = 0.75;

/// Live rows by id: linear probing over a slot count that need not be a power of two
/// (the home slot is the hash's high bits scaled to the length), each slot a row + 1
/// with a tag beside it: 0 empty, 1 deleted, else 2 + the id's hash mod 254.
#[derive(Default)]
struct IdIndex {
    slots: Vec<u32>,
    tags: Vec<u8>,
    len: usize,
    deleted: usize,
}

impl IdIndex {
    /// Room for `n` ids at a load of 0.7.
    fn with_capacity(n: usize) -> Self {
        Self::with_slots((n as f64 / 0.7) as usize)
    }

    fn with_slots(cap: usize) -> Self {
        let cap = cap.max(16);
        Self {
            slots: vec![EMPTY; cap],
            tags: vec![0; cap],
            len: 0,
            deleted: 0,
        }
    }

    #[inline]
    fn home(&self, h: u64) -> usize {
        ((h as u128 * self.slots.len() as u128) >> 64) as usize
    }

    /// 2..=255: 0 and 1 mark empty and deleted slots.
    #[inline]
    fn tag(h: u64) -> u8 {
        2 + (h % 254) as u8
    }

    fn row(&self, slot: usize) -> u64 {
        u64::from(self.slots[slot] - 1)
    }

    fn set_row(&mut self, slot: usize, row: u64) {
        self.slots[slot] = row as u32 + 1;
    }

    /// The slot holding a row whose id `is` the one hashed to `h`. A miss reads only
    /// the tags (64 slots a cache line) up to the first empty one.
    fn find(&self, h: u64, is: impl Fn(u64) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let (n, tag) = (self.slots.len(), Self::tag(h));
        let mut i = self.home(h);
        loop {
            match self.tags[i] {
                TAG_EMPTY => return None,
                t if t == tag && is(u64::from(self.slots[i] - 1)) => return Some(i),
                _ => {}
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    fn needs_growth(&self) -> bool {
        (self.len + self.deleted + 1) as f64 > self.slots.len() as f64 * MAX_LOAD
    }

    /// Inserts `row` (whose id is not in the table) at the first free slot.
    fn insert(&mut self, h: u64, row: u64) {
        let n = self.slots.len();
        let mut i = self.home(h);
        loop {
            match self.tags[i] {
                TAG_EMPTY => break,
                TAG_DELETED => {
                    self.deleted -= 1;
                    break;
                }
                _ => {}
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        self.slots[i] = row as u32 + 1;
        self.tags[i] = Self::tag(h);
        self.len += 1;
    }

    fn delete(&mut self, slot: usize) {
        self.tags[slot] = TAG_DELETED;
        self.len -= 1;
        self.deleted += 1;
    }

    /// A copy with room to grow (1.5× the live entries at the maximum load), without
    /// deleted slots; `hash_of` gives a row's hash.
    fn grown(&self, hash_of: impl Fn(u64) -> u64) -> Self {
        let mut next = Self::with_slots(((self.len + 1) as f64 * 1.5 / MAX_LOAD) as usize);
        for (&s, &t) in self.slots.iter().zip(&self.tags) {
            if t > TAG_DELETED {
                let row = u64::from(s - 1);
                next.insert(hash_of(row), row);
            }
        }
        next
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * 4 + self.tags.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn rows_keep_ids_offsets_and_liveness_through_replacements_and_deletes() {
        let mut t = Rows::with_capacity(0);
        let mut model: HashMap<String, u64> = HashMap::new();
        let mut ids = Vec::new();
        let mut x = 7u64;
        for i in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // A mix of short, long (two-byte length) and repeated ids.
            let id = match x % 5 {
                0 => format!("{}", x % 3000),
                1 => "l".repeat(100 + (x % 400) as usize) + &format!("{}", x % 50),
                _ => format!("doc-{:020}", x % 9000),
            };
            if x.is_multiple_of(7) {
                assert_eq!(t.remove(&id), model.remove(&id).is_some());
                continue;
            }
            let row = t.put(&id, i * 1_000_003);
            if let Some(old) = model.insert(id.clone(), row) {
                assert!(!t.is_live(old));
            }
            ids.push((row, id, i * 1_000_003));
        }
        assert_eq!(t.live_len(), model.len());
        for (row, id, off) in &ids {
            assert_eq!(t.id(*row), id);
            assert_eq!(t.doc_offset(*row), *off);
            assert_eq!(t.is_live(*row), model.get(id) == Some(row));
        }
        for (id, row) in &model {
            assert_eq!(t.get(id), Some(*row));
        }
        assert_eq!(t.get("never"), None);
        assert!(!t.is_live(t.len()) && !t.is_live(u64::MAX / 2));
        assert_eq!(t.doc_offset(0), 0);
        let mut t2 = Rows::with_capacity(1);
        t2.put("a", MAX_DOC_OFFSET);
        assert_eq!(t2.doc_offset(0), MAX_DOC_OFFSET);
    }

    #[test]
    fn the_index_stays_bounded_under_churn() {
        // Upserts and deletes of the same few ids: deleted slots are reused or dropped
        // at growth, so the index never grows with the churn.
        let mut t = Rows::with_capacity(0);
        for round in 0..50_000u64 {
            let id = format!("k{}", round % 100);
            t.put(&id, round);
            if round.is_multiple_of(3) {
                t.remove(&id);
            }
        }
        assert!(t.live_len() <= 100);
        assert!(t.index.slots.len() < 1024, "{}", t.index.slots.len());
    }
}
