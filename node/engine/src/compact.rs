//! Compaction: the segment files rewritten without the rows that were dead at a
//! logged point, swapped in the way index generations are (issue 19: deleted and
//! replaced rows were never reclaimed, on disk, in the row table, in snapshots or in
//! the open-time scan).
//!
//! **Where numbering comes from.** Index generations and snapshots name rows by
//! number, so every replica of a shard must number rows alike. A compaction is a
//! batch in the replicated log (`WalOp::Compact`); its point is the state after that
//! batch, which every replica reaches with the same rows and liveness. Each replica
//! rewrites its own files (no shard-sized transfer; the alternative, the primary
//! compacting and shipping the result, moves the whole shard over the network per
//! compaction) and renumbers deterministically: rows live at the point keep their
//! order, numbered from 0; rows written after the point follow, shifted, dead or
//! not. Liveness only ever goes from live to dead, so compacting at point A and then
//! at B numbers rows as compacting at B alone: a replica that had not started A when
//! B was logged does B only; one rewriting for A finishes it, locates B in the new
//! files and does B next. The manifest's `layout` is the batch of the last
//! compaction: two replicas with the same layout and history number every row alike.
//!
//! **The serving index** keeps its labels: a compaction writes a row map (a bit per
//! old row and a rank per 64) that a generation built before it applies to each
//! candidate, until the next build, whose labels are the new numbers. Reads and
//! writes go on during the rewrite; the swap holds the writer for the rows written
//! since the last catch-up pass.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Result, ShardError};
use crate::manifest::{remap_file, segment_files, CompactionPoint, RemapMeta};
use crate::record;
use crate::rows::Rows;
use crate::storage::{self, DocsFile, SegmentEntry, VectorStore, VectorView};
use crate::{checkpoint, Generation, Shard, Work};

/// How long automatic compactions wait after one failed.
const COMPACT_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// Row labels of one layout carried to the next: rows below `old_rows` whose bit is
/// set are numbered densely from 0 in order; rows from `old_rows` on follow the kept
/// ones in order. 0.19 B per old row in memory (a bit, and 4 B per 64 rows).
pub struct RowMap {
    kept: Vec<u64>,
    /// Kept rows before each word of `kept`.
    rank: Vec<u32>,
    old_rows: u64,
    kept_rows: u64,
}

impl RowMap {
    pub fn new(kept: Vec<u64>, old_rows: u64) -> Self {
        let mut rank = Vec::with_capacity(kept.len());
        let mut n = 0u64;
        for w in &kept {
            rank.push(n as u32);
            n += u64::from(w.count_ones());
        }
        Self {
            kept,
            rank,
            old_rows,
            kept_rows: n,
        }
    }

    /// The new number of old row `row`; `None` for a row the compaction dropped.
    #[inline]
    pub fn map(&self, row: u64) -> Option<u64> {
        if row >= self.old_rows {
            return Some(self.kept_rows + (row - self.old_rows));
        }
        let (w, b) = ((row / 64) as usize, row % 64);
        let word = self.kept[w];
        (word & (1 << b) != 0)
            .then(|| u64::from(self.rank[w]) + u64::from((word & ((1u64 << b) - 1)).count_ones()))
    }

    /// How many new rows the old rows `0..end` became.
    pub fn map_end(&self, end: u64) -> u64 {
        if end >= self.old_rows {
            return self.kept_rows + (end - self.old_rows);
        }
        let (w, b) = ((end / 64) as usize, end % 64);
        u64::from(self.rank[w]) + u64::from((self.kept[w] & ((1u64 << b) - 1)).count_ones())
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.kept.len() * 8);
        out.extend_from_slice(&self.old_rows.to_le_bytes());
        for w in &self.kept {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn from_bytes(b: &[u8]) -> std::result::Result<Self, String> {
        if b.len() < 8 || !(b.len() - 8).is_multiple_of(8) {
            return Err(format!("{} bytes is not a row map", b.len()));
        }
        let old_rows = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let kept: Vec<u64> = b[8..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if kept.len() as u64 != old_rows.div_ceil(64) {
            return Err(format!("{} words for {old_rows} rows", kept.len()));
        }
        Ok(Self::new(kept, old_rows))
    }
}

/// Reads a generation's row map, checked against its manifest entry.
pub fn load_remap(dir: &Path, meta: &RemapMeta) -> Result<RowMap> {
    let path = dir.join(&meta.file);
    let bytes = fs::read(&path).map_err(ShardError::io(&path))?;
    let corrupt = |reason: String| ShardError::Corrupt {
        file: path.clone(),
        offset: 0,
        reason,
    };
    let crc = crc32fast::hash(&bytes);
    if crc != meta.crc32 || bytes.len() as u64 != meta.bytes {
        return Err(corrupt(format!(
            "row map checksum {crc:08x} ({} bytes) is not the manifest's {:08x} ({} bytes)",
            bytes.len(),
            meta.crc32,
            meta.bytes
        )));
    }
    RowMap::from_bytes(&bytes).map_err(corrupt)
}

/// What a compaction did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CompactionReport {
    /// The batch it compacted at (the new layout).
    pub seq: u64,
    pub rows_before: u64,
    pub rows_after: u64,
    /// Bytes of the documents and vectors files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub seconds: f64,
}

/// The rewrite in progress: new segment files and the row table that describes them.
struct Rewrite {
    point: CompactionPoint,
    docs: DocsFile,
    vectors: VectorStore,
    rows: Rows,
    map: RowMap,
    /// The old documents file is copied up to here.
    copied_to: u64,
    /// The old layout's checksum table (a re-embed's commit made it), if any.
    crcs: Option<Arc<Vec<u32>>>,
}

impl Shard {
    /// The batch of a compaction logged and not yet done.
    pub fn compaction_pending(&self) -> Option<u64> {
        self.inner.writer.lock().manifest.compacting.map(|p| p.seq)
    }

    /// The batch the segments were last compacted at (0: never).
    pub fn layout(&self) -> u64 {
        self.inner.writer.lock().manifest.layout
    }

    /// Does the compaction the log asked for, if any, blocking the calling thread
    /// (reads and writes go on). `None`: nothing pending. Refused while a build or
    /// another compaction holds the claim (it runs when that one ends).
    pub fn compact_pending(&self) -> Result<Option<CompactionReport>> {
        // A retired handle leaves the work to its successor.
        self.check_writable()?;
        {
            let mut b = self.inner.building.lock();
            if let Some(work) = *b {
                return Err(work.busy());
            }
            let w = self.inner.writer.lock();
            // A re-embed's vector set holds compactions: its rows keep their numbers
            // until it is committed or dropped (`vector_set.rs`).
            let (Some(p), None) = (w.manifest.compacting, &w.set) else {
                return Ok(None);
            };
            drop(w);
            *b = Some(Work::Compact(p.seq));
        }
        // A compaction logged during another's rewrite runs next, from the new files.
        let result = (|| {
            let mut last = None;
            loop {
                // Read apart: a guard in a `while let` head lives through the body.
                let pending = self.inner.writer.lock().manifest.compacting;
                let Some(point) = pending else {
                    return Ok(last);
                };
                last = Some(self.compact_at(point)?);
            }
        })();
        *self.inner.building.lock() = None;
        if let Err(e) = &result {
            tracing::warn!(dir = %self.inner.dir.display(), error = %e, "compaction failed; retried later");
            *self.inner.compact_failed.lock() = Some(Instant::now());
        }
        result
    }

    /// Starts [`Shard::compact_pending`] on its own thread when one is pending and
    /// nothing holds the build claim.
    pub(crate) fn maybe_compact(&self) {
        if !self
            .inner
            .auto_compact
            .load(std::sync::atomic::Ordering::Relaxed)
            || self.inner.building.lock().is_some()
            || {
                let w = self.inner.writer.lock();
                w.manifest.compacting.is_none() || w.set.is_some()
            }
            || self
                .inner
                .compact_failed
                .lock()
                .is_some_and(|t| t.elapsed() < COMPACT_RETRY)
        {
            return;
        }
        let shard = self.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-compact".into())
            .spawn(move || {
                if let Ok(Some(_)) = shard.compact_pending() {
                    // A build the compaction held off may be due now.
                    shard.maybe_auto_rebuild();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for a compaction; the next write tries again");
        }
    }

    /// Compacts at `point`.
    fn compact_at(&self, point: CompactionPoint) -> Result<CompactionReport> {
        let started = Instant::now();
        let dir = &self.inner.dir;
        let (old_docs, old_vectors) = {
            let w = self.inner.writer.lock();
            let (d, v) = w.manifest.segments();
            (dir.join(d), dir.join(v))
        };
        // Written under names of this attempt alone and renamed at the swap, under the
        // writer and only by a handle still in service: a retired handle's attempt
        // (its directory reopened by another) never touches the files its successor
        // writes or names. An open removes the `.tmp` leftovers of a crash.
        static ATTEMPT: AtomicU64 = AtomicU64::new(0);
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            ATTEMPT.fetch_add(1, Ordering::Relaxed)
        );
        let (docs_name, vectors_name) = segment_files(point.seq);
        let tmp = |name: &str| dir.join(format!("{name}.{nonce}.tmp"));
        let (docs_tmp, vectors_tmp) = (tmp(&docs_name), tmp(&vectors_name));
        let remove_tmp = || {
            for f in [&docs_tmp, &vectors_tmp] {
                let _ = fs::remove_file(f);
            }
        };
        let dim = self.inner.writer.lock().manifest.config.dimension;
        let rw = Rewrite {
            point,
            docs: DocsFile::open(docs_tmp.clone(), 0)?,
            vectors: VectorStore::open(vectors_tmp.clone(), dim, 0)?,
            rows: Rows::with_capacity(0),
            map: RowMap::new(Vec::new(), 0),
            copied_to: point.docs_len,
            crcs: self.inner.state.read().crcs.clone(),
        };
        let report = match self.rewrite(rw, &old_docs, started) {
            Ok(r) => r,
            Err(e) => {
                // Nothing if the swap renamed them (a failure after it poisons).
                remove_tmp();
                return Err(e);
            }
        };
        let old_crcs = crate::storage::crc_file(&old_vectors);
        let _ = fs::remove_file(&old_crcs);
        for f in [&old_docs, &old_vectors] {
            if let Err(e) = fs::remove_file(f) {
                tracing::warn!(file = %f.display(), error = %e, "a compacted segment stays until the next open");
            }
        }
        Ok(report)
    }

    fn rewrite(
        &self,
        mut rw: Rewrite,
        old_docs: &Path,
        started: Instant,
    ) -> Result<CompactionReport> {
        let point = rw.point;
        let dim = self.inner.writer.lock().manifest.config.dimension;
        let row_bytes = dim as u64 * 4;
        let view = self.inner.state.read().vectors.clone();
        let map = storage::map_file(old_docs)?;
        let data: &[u8] = map.as_deref().unwrap_or_default();
        let corrupt = corrupt_in(old_docs);
        if (data.len() as u64) < point.docs_len || view.rows() < point.rows {
            return Err(corrupt(
                point.docs_len,
                format!(
                    "the compaction point (batch {}, {} rows) is past the files",
                    point.seq, point.rows
                ),
            ));
        }
        // Liveness at the point: the records before it replayed into a scratch table.
        let mut at_point = Rows::with_capacity(point.rows as usize);
        scan_records(&data[..point.docs_len as usize], 0, |offset, entry| {
            match entry {
                SegmentEntry::Put { id, .. } => {
                    at_point.put(&id, offset);
                }
                SegmentEntry::Delete { id, .. } => {
                    at_point.remove(&id);
                }
            }
            Ok(())
        })
        .map_err(|(o, r)| corrupt(o, r))?;
        if at_point.len() != point.rows {
            return Err(corrupt(
                point.docs_len,
                format!(
                    "{} rows before the compaction point, the log said {}",
                    at_point.len(),
                    point.rows
                ),
            ));
        }
        // The rows live at the point, in order, numbered from 0.
        let mut kept = vec![0u64; point.rows.div_ceil(64) as usize];
        rw.rows = Rows::with_capacity(at_point.live_len());
        for row in 0..point.rows {
            if !at_point.is_live(row) {
                continue;
            }
            kept[(row / 64) as usize] |= 1 << (row % 64);
            let offset = at_point.doc_offset(row);
            let entry = decode_at(data, offset).map_err(|r| corrupt(offset, r))?;
            copy_put(&mut rw, entry, row, &view, old_docs, offset)?;
        }
        drop(at_point);
        drop(map);
        rw.map = RowMap::new(kept, point.rows);
        let tail_start = rw.docs.len();

        // Rows written since the point, without the writer while there are many.
        for _ in 0..4 {
            let (end, view) = {
                let w = self.inner.writer.lock();
                let st = self.inner.state.read();
                (w.docs.len(), st.vectors.clone())
            };
            if end - rw.copied_to < 1 << 20 {
                break;
            }
            copy_tail(&mut rw, old_docs, end, &view)?;
        }

        // The swap, under the writer: the last rows, then files, manifest and state.
        let mut w = self.inner.writer.lock();
        self.check_writable()?;
        if let Some(s) = &w.set {
            return Err(ShardError::VectorSet(format!(
                "operation {}'s vector set began during the compaction, which waits for it",
                s.meta.tag
            )));
        }
        let rows_before = w.vectors.view().rows();
        let bytes_before = w.docs.len() + rows_before * row_bytes;
        let view = self.inner.state.read().vectors.clone();
        copy_tail(&mut rw, old_docs, w.docs.len(), &view)?;
        rw.docs.sync()?;
        rw.vectors.sync()?;
        // A later compaction logged meanwhile: its point located in the new files
        // (the rows it saw, renumbered; the first record of a later batch).
        let next = match w.manifest.compacting {
            Some(p) if p.seq > point.seq => Some(CompactionPoint {
                seq: p.seq,
                rows: rw.map.map_end(p.rows),
                docs_len: offset_after(&rw.docs, tail_start, p.seq)?,
            }),
            _ => None,
        };
        let dir = &self.inner.dir;
        // A generation built before this compaction keeps its labels; the row map
        // carries them to the new numbers.
        let remap = match w.manifest.generations().next() {
            Some(_) => {
                let bytes = rw.map.to_bytes();
                let file = remap_file(point.seq);
                storage::write_atomic(&dir.join(&file), &bytes)?;
                Some(RemapMeta {
                    file,
                    crc32: crc32fast::hash(&bytes),
                    bytes: bytes.len() as u64,
                })
            }
            None => None,
        };
        storage::sync_dir(dir)?;
        let Rewrite {
            docs,
            vectors,
            rows,
            map,
            ..
        } = rw;
        let (docs_len, rows_after) = (docs.len(), vectors.view().rows());
        let bytes_after = docs_len + rows_after * row_bytes;
        let (docs_name, vectors_name) = segment_files(point.seq);
        let (docs_path, vectors_path) = (dir.join(docs_name), dir.join(vectors_name));
        fs::rename(&docs.path, &docs_path).map_err(ShardError::io(&docs_path))?;
        fs::rename(&vectors.path, &vectors_path).map_err(ShardError::io(&vectors_path))?;
        storage::sync_dir(dir)?;
        drop((docs, vectors));
        let docs = DocsFile::open(docs_path, docs_len)?;
        let vectors = VectorStore::open(vectors_path, dim, rows_after)?;
        let docs_reader = docs.reader()?;
        // From here on the writer points at the new files: a failure poisons the
        // handle, and a reopen reads whichever manifest is on disk (the old one names
        // the old files, still there).
        w.docs = docs;
        w.vectors = vectors;
        w.manifest.layout = point.seq;
        w.manifest.compacting = next;
        // The records carry every row's checksum again.
        w.manifest.vector_crcs = 0;
        // Every generation held (a rebuild's staged and kept ones too, issue 21)
        // shares the row map.
        if let Some(r) = remap {
            let m = &mut w.manifest;
            for g in [&mut m.serving, &mut m.staged, &mut m.previous]
                .into_iter()
                .flatten()
            {
                g.covered_rows = map.map_end(g.covered_rows);
                g.remaps.push(r.clone());
            }
        }
        if let Err(e) = checkpoint(dir, &mut w) {
            self.poison(&e);
            return Err(e);
        }
        {
            let mut st = self.inner.state.write();
            st.payload = st.payload.remapped(&map, rows.len());
            st.lexical = st.lexical.remapped(&map, rows.len());
            st.rows = rows;
            st.vectors = w.vectors.view();
            st.docs = docs_reader;
            st.layout = point.seq;
            st.crcs = None;
            let map = Arc::new(map);
            let st = &mut *st;
            for held in [&mut st.serving, &mut st.staged, &mut st.previous] {
                if let Some(g) = held.take() {
                    *held = Some(Arc::new(g.remapped(map.clone())));
                }
            }
        }
        drop(w);
        let report = CompactionReport {
            seq: point.seq,
            rows_before,
            rows_after,
            bytes_before,
            bytes_after,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            dir = %dir.display(),
            seq = report.seq,
            rows_before,
            rows_after,
            bytes_before,
            bytes_after,
            seconds = report.seconds,
            next = next.map(|p| p.seq),
            "shard compacted"
        );
        Ok(report)
    }
}

/// Appends old row `row`'s record (renumbered) and vector to the rewrite.
fn copy_put(
    rw: &mut Rewrite,
    entry: SegmentEntry,
    row: u64,
    view: &VectorView,
    old_docs: &Path,
    offset: u64,
) -> Result<()> {
    let corrupt = |reason: String| corrupt_in(old_docs)(offset, reason);
    let SegmentEntry::Put {
        seq,
        id,
        text,
        metadata,
        vector_crc,
        row: stored,
    } = entry
    else {
        return Err(corrupt(format!("row {row} points at a delete record")));
    };
    if stored != row || row >= view.rows() {
        return Err(corrupt(format!(
            "record of row {stored} where row {row} was expected"
        )));
    }
    let new_row = rw.vectors.append(view.get(row))?;
    // A re-embed's committed layout keeps its rows' checksums in a table: the new
    // records take them (the rewrite's layout has none).
    let vector_crc = crate::expected_crc(rw.crcs.as_deref(), row, vector_crc);
    let offset = rw.docs.append(&SegmentEntry::Put {
        seq,
        row: new_row,
        id: id.clone(),
        text,
        metadata,
        vector_crc,
    })?;
    let placed = rw.rows.put(&id, offset);
    debug_assert_eq!(placed, new_row);
    Ok(())
}

/// Copies the old documents file's records from where the rewrite stopped to `end`:
/// every row (numbered after the kept ones, dead or not) and every delete.
fn copy_tail(rw: &mut Rewrite, old_docs: &Path, end: u64, view: &VectorView) -> Result<()> {
    if end <= rw.copied_to {
        return Ok(());
    }
    let map = storage::map_file(old_docs)?;
    let data: &[u8] = map.as_deref().unwrap_or_default();
    let corrupt = corrupt_in(old_docs);
    if (data.len() as u64) < end {
        return Err(corrupt(end, "shorter than its writer's length".into()));
    }
    let from = rw.copied_to;
    // An I/O error inside the scan travels out as itself, not as corruption.
    let mut failed = None;
    let mut keep = |e: ShardError| {
        let m = e.to_string();
        failed = Some(e);
        m
    };
    scan_records(&data[from as usize..end as usize], from, |offset, entry| {
        match entry {
            SegmentEntry::Put { row, .. } => {
                // Rows after the point follow the kept ones in order.
                if rw.map.map(row) != Some(rw.rows.len()) {
                    return Err(format!("row {row} out of order"));
                }
                copy_put(rw, entry, row, view, old_docs, offset).map_err(&mut keep)?;
            }
            SegmentEntry::Delete { ref id, .. } => {
                let id = id.clone();
                rw.docs.append(&entry).map_err(&mut keep)?;
                rw.rows.remove(&id);
            }
        }
        Ok(())
    })
    .map_err(|(o, r)| failed.take().unwrap_or_else(|| corrupt(o, r)))?;
    rw.copied_to = end;
    Ok(())
}

impl Generation {
    /// This generation with one more row map (a compaction renumbered the rows).
    pub(crate) fn remapped(&self, map: Arc<RowMap>) -> Self {
        let mut remaps = self.remaps.clone();
        let mut info = self.info.clone();
        info.covered_rows = map.map_end(info.covered_rows);
        remaps.push(map);
        Self {
            info,
            index: self.index.clone(),
            rerank: self.rerank.clone(),
            remaps,
        }
    }

    /// The current row of index label `label`; `None` for a row a compaction dropped.
    #[inline]
    pub(crate) fn row(&self, label: u64) -> Option<u64> {
        self.remaps.iter().try_fold(label, |r, m| m.map(r))
    }
}

/// Decodes every record of `data` (which starts at file offset `base`), stopping at
/// the first error; a torn or damaged record inside a range a writer wrote whole is
/// corruption.
fn scan_records(
    data: &[u8],
    base: u64,
    mut each: impl FnMut(u64, SegmentEntry) -> std::result::Result<(), String>,
) -> std::result::Result<(), (u64, String)> {
    let end = record::scan(data, |offset, payload| {
        let entry = storage::decode::<SegmentEntry>(payload)?;
        each(base + offset, entry)
    })
    .map_err(|(o, r)| (base + o, r))?;
    match end {
        record::ScanEnd::Clean => Ok(()),
        other => Err((base, format!("segment ends badly: {other:?}"))),
    }
}

/// Damage at an offset of `file`, as the engine names it.
fn corrupt_in(file: &Path) -> impl Fn(u64, String) -> ShardError + '_ {
    move |offset, reason| ShardError::Corrupt {
        file: file.to_owned(),
        offset,
        reason,
    }
}

/// The offset in `docs` of its first record after batch `seq`, looked for from `from`
/// (a record boundary at or before it); the file's length if there is none.
fn offset_after(docs: &DocsFile, from: u64, seq: u64) -> Result<u64> {
    let reader = docs.reader()?;
    let map = reader.map()?;
    let data: &[u8] = map.as_deref().unwrap_or_default();
    let data = &data[..docs.len() as usize];
    let mut found = None;
    scan_records(&data[from as usize..], from, |offset, entry| {
        let s = match entry {
            SegmentEntry::Put { seq, .. } | SegmentEntry::Delete { seq, .. } => seq,
        };
        if s > seq && found.is_none() {
            found = Some(offset);
        }
        Ok(())
    })
    .map_err(|(offset, reason)| corrupt_in(reader.path())(offset, reason))?;
    Ok(found.unwrap_or(docs.len()))
}

fn decode_at(data: &[u8], offset: u64) -> std::result::Result<SegmentEntry, String> {
    let at = data
        .get(offset as usize..)
        .ok_or_else(|| format!("offset {offset} past the file"))?;
    let payload = record::read_one(&mut &at[..])?;
    storage::decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_map_numbers_kept_rows_densely_then_shifts_the_tail() {
        // Old rows 0..200, every third dropped; rows from 200 on are the tail.
        let mut kept = vec![0u64; 4];
        for r in 0..200u64 {
            if r % 3 != 0 {
                kept[(r / 64) as usize] |= 1 << (r % 64);
            }
        }
        let m = RowMap::new(kept, 200);
        let mut next = 0;
        for r in 0..200u64 {
            if r % 3 == 0 {
                assert_eq!(m.map(r), None);
            } else {
                assert_eq!(m.map(r), Some(next));
                next += 1;
            }
            assert_eq!(m.map_end(r + 1), next);
        }
        assert_eq!(m.map(200), Some(next));
        assert_eq!(m.map(250), Some(next + 50));
        assert_eq!(m.map_end(260), next + 60);
        let back = RowMap::from_bytes(&m.to_bytes()).unwrap();
        assert!((0..300).all(|r| back.map(r) == m.map(r)));
        assert!(RowMap::from_bytes(&[1, 2, 3]).is_err());
        assert!(RowMap::from_bytes(&m.to_bytes()[..16]).is_err());
    }
}
