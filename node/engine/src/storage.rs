//! Segment files and small file-system helpers.
//!
//! * `docs.dat`: framed [`SegmentEntry`] records, the durable document store and
//!   the id → row history (replaying it rebuilds the id map).
//! * `vectors.f32`: full-precision vectors, row-major, row `r` at `r * dim * 4`,
//!   read through a shared memory map so re-ranking never holds a second copy in RAM.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::error::{Result, ShardError};
use super::record;

#[cfg(target_endian = "big")]
compile_error!(
    "vectors.f32 is read in place as little-endian f32: big-endian hosts are unsupported"
);

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    shoal_proto::wire::encode(v)
}

/// A record's value: bounded by its frame (a damaged length prefix is `Corrupt`, not
/// an allocation), and the whole frame must be the value.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    shoal_proto::wire::decode(b).map_err(|e| format!("undecodable record: {e}"))
}

/// Maps a whole file read-only for a sequential scan: recovery reads logs and segments
/// of any size without copying them onto the heap. `None` for an empty file.
pub fn map_file(path: &Path) -> Result<Option<Mmap>> {
    let file = File::open(path).map_err(ShardError::io(path))?;
    map_open(&file, path)
}

/// [`map_file`] of a file already open (it may have been unlinked since).
pub fn map_open(file: &File, path: &Path) -> Result<Option<Mmap>> {
    if file.metadata().map_err(ShardError::io(path))?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: segment files are append-only: bytes below a length the writer
    // published are never written again, and readers read only those (recovery reads
    // before the writer exists; a compaction or the scrubber up to lengths taken from
    // the writer).
    let map = unsafe { Mmap::map(file) }.map_err(ShardError::io(path))?;
    Ok(Some(map))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ShardError::io(dir))
}

/// Replaces `path` with `bytes` atomically: write a temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(ShardError::io(&tmp))?;
    f.write_all(bytes).map_err(ShardError::io(&tmp))?;
    f.sync_all().map_err(ShardError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(ShardError::io(path))?;
    sync_dir(path.parent().expect("file in a dir"))
}

/// Opens (creating if absent) a segment file for reading and appending; returns it
/// with its current length.
fn open_segment(path: &Path) -> Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(ShardError::io(path))?;
    let len = file.metadata().map_err(ShardError::io(path))?.len();
    Ok((file, len))
}

/// One record of the document segment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum SegmentEntry {
    Put {
        seq: u64,
        row: u64,
        id: String,
        text: Option<String>,
        metadata: String,
        /// crc32 of the row's bytes in `vectors.f32`, checked by the scrubber
        /// ([`crate::Shard::scrub`]) and on every read of the row.
        vector_crc: u32,
    },
    Delete {
        seq: u64,
        id: String,
    },
}

/// Append-only document segment.
pub struct DocsFile {
    pub path: PathBuf,
    file: File,
    len: u64,
}

impl DocsFile {
    /// Opens `docs.dat`, keeping only its first `len` bytes (the checkpointed part;
    /// anything after was applied from the WAL, which will apply it again).
    pub fn open(path: PathBuf, len: u64) -> Result<Self> {
        let (file, actual) = open_segment(&path)?;
        if actual < len {
            return Err(ShardError::Corrupt {
                file: path,
                offset: actual,
                reason: format!("file is shorter than its checkpointed length {len}"),
            });
        }
        file.set_len(len).map_err(ShardError::io(&path))?;
        Ok(Self { path, file, len })
    }

    pub fn append(&mut self, entry: &SegmentEntry) -> Result<u64> {
        let off = self.len;
        let frame = record::encode(&encode(entry));
        self.file
            .write_all_at(&frame, off)
            .map_err(ShardError::io(&self.path))?;
        self.len += frame.len() as u64;
        Ok(off)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(ShardError::io(&self.path))
    }

    /// A second handle for readers (positional reads need no lock).
    pub fn reader(&self) -> Result<DocsReader> {
        let file = File::open(&self.path).map_err(ShardError::io(&self.path))?;
        Ok(DocsReader {
            path: self.path.clone(),
            file: Arc::new(file),
        })
    }
}

#[derive(Clone)]
pub struct DocsReader {
    path: PathBuf,
    file: Arc<File>,
}

impl DocsReader {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file mapped, through this handle (valid after a compaction unlinks
    /// the file).
    pub fn map(&self) -> Result<Option<Mmap>> {
        map_open(&self.file, &self.path)
    }

    pub fn read_at(&self, offset: u64) -> Result<SegmentEntry> {
        let corrupt = |reason| ShardError::Corrupt {
            file: self.path.clone(),
            offset,
            reason,
        };
        let mut f = self.file.try_clone().map_err(ShardError::io(&self.path))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(ShardError::io(&self.path))?;
        let payload = record::read_one(&mut std::io::BufReader::new(f)).map_err(corrupt)?;
        decode(&payload).map_err(corrupt)
    }
}

/// A read-only view of the first `rows` vectors; cheap to clone, valid as long as
/// it lives even while the store grows (a remap makes a new map, old views keep theirs).
#[derive(Clone)]
pub struct VectorView {
    map: Option<Arc<Mmap>>,
    dim: usize,
    rows: u64,
}

impl VectorView {
    pub fn rows(&self) -> u64 {
        self.rows
    }

    #[inline]
    pub fn get(&self, row: u64) -> &[f32] {
        assert!(
            row < self.rows,
            "row {row} outside view of {} rows",
            self.rows
        );
        let map = self.map.as_ref().expect("non-empty view has a map");
        let start = row as usize * self.dim * 4;
        let bytes = &map[start..start + self.dim * 4];
        // SAFETY: the map is page aligned and rows are multiples of 4 bytes, so the
        // pointer is f32-aligned; every bit pattern is a valid f32; rows below
        // `self.rows` were fully written before this view was published and are never
        // written again (the store is append-only).
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.dim) }
    }
}

/// Append-only vector file, grown in chunks and memory-mapped for reads.
pub struct VectorStore {
    pub path: PathBuf,
    file: File,
    dim: usize,
    rows: u64,
    capacity_rows: u64,
    map: Option<Arc<Mmap>>,
}

/// Growth step of the file and its map (rows are 1.5 KiB at d = 384: 64 MiB steps).
const GROW_BYTES: u64 = 64 << 20;

/// The rows a vector file grown to hold `rows` has room for: whole growth steps.
fn grown_capacity(rows: u64, row_bytes: u64) -> u64 {
    let step = (GROW_BYTES / row_bytes).max(1);
    rows.div_ceil(step).max(1) * step
}

impl VectorStore {
    /// Opens `vectors.f32` with exactly `rows` committed rows.
    pub fn open(path: PathBuf, dim: usize, rows: u64) -> Result<Self> {
        let (file, actual) = open_segment(&path)?;
        let row_bytes = (dim * 4) as u64;
        if actual < rows * row_bytes {
            return Err(ShardError::Corrupt {
                file: path,
                offset: actual,
                reason: format!("file holds fewer than its checkpointed {rows} rows"),
            });
        }
        let mut store = Self {
            path,
            file,
            dim,
            rows,
            capacity_rows: 0,
            map: None,
        };
        store
            .file
            .set_len(rows * row_bytes)
            .map_err(ShardError::io(&store.path))?;
        store.grow_to(rows)?;
        Ok(store)
    }

    fn row_bytes(&self) -> u64 {
        (self.dim * 4) as u64
    }

    fn grow_to(&mut self, rows: u64) -> Result<()> {
        if rows <= self.capacity_rows && self.map.is_some() {
            return Ok(());
        }
        let cap = grown_capacity(rows, self.row_bytes());
        self.file
            .set_len(cap * self.row_bytes())
            .map_err(ShardError::io(&self.path))?;
        // SAFETY: the file is only ever appended to by this store (single writer under
        // the shard's writer lock) and never truncated below a published view's rows
        // while the shard is open.
        let map = unsafe { Mmap::map(&self.file) }.map_err(ShardError::io(&self.path))?;
        self.map = Some(Arc::new(map));
        self.capacity_rows = cap;
        Ok(())
    }

    /// Writes the next row; it becomes visible to views taken after this returns.
    pub fn append(&mut self, v: &[f32]) -> Result<u64> {
        debug_assert_eq!(v.len(), self.dim);
        let row = self.rows;
        self.grow_to(row + 1)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, row * self.row_bytes())
            .map_err(ShardError::io(&self.path))?;
        self.rows += 1;
        Ok(row)
    }

    pub fn view(&self) -> VectorView {
        VectorView {
            map: self.map.clone(),
            dim: self.dim,
            rows: self.rows,
        }
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(ShardError::io(&self.path))
    }
}

/// crc32 of a vector's little-endian bytes, as stored. One pass over the row's bytes:
/// feeding the hasher 4 bytes at a time ran it at a fraction of its SIMD speed.
pub fn vector_crc(v: &[f32]) -> u32 {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte view of it is valid; on a little-
        // endian target its in-memory bytes are its stored bytes.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) };
        crc32fast::hash(bytes)
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut h = crc32fast::Hasher::new();
        for x in v {
            h.update(&x.to_le_bytes());
        }
        h.finalize()
    }
}

/// crc32 of a whole file, streamed.
pub fn file_crc(path: &Path) -> Result<(u32, u64)> {
    use std::io::Read;
    let mut f = File::open(path).map_err(ShardError::io(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).map_err(ShardError::io(path))?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((h.finalize(), n))
}

/// A re-embed's vector set file (issue 21, `vector_set.rs`): row-aligned with the
/// segments' rows, each row written once, at any time after its row exists (the
/// re-encoder fills old rows in the background; new rows get theirs with their
/// upsert). Unwritten rows read as zeros; a row is read only once written (the set
/// answers no query while a live row lacks its vector).
pub struct SetStore {
    pub path: PathBuf,
    file: File,
    /// Each row's checksum (4 bytes a row, `crc_file`): the records hold the stored
    /// vectors' checksums, and these become the layout's at a commit.
    crcs: File,
    dim: usize,
    capacity_rows: u64,
    map: Option<Arc<Mmap>>,
}

/// The checksum table beside a vectors file whose rows' checksums are not the records'
/// (a re-embed's set, and the layout its commit makes).
pub fn crc_file(vectors: &Path) -> PathBuf {
    let mut p = vectors.as_os_str().to_owned();
    p.push(".crc");
    PathBuf::from(p)
}

/// Reads a checksum table of `rows` rows.
pub fn read_crcs(path: &Path, rows: u64) -> Result<Vec<u32>> {
    let bytes = fs::read(path).map_err(ShardError::io(path))?;
    if (bytes.len() as u64) < rows * 4 {
        return Err(ShardError::Corrupt {
            file: path.to_owned(),
            offset: bytes.len() as u64,
            reason: format!("checksum table holds fewer than its {rows} rows"),
        });
    }
    Ok(bytes[..rows as usize * 4]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl SetStore {
    /// Opens the set's file holding at least `rows` rows; `fresh` empties it first (a
    /// set begun again by a log replay).
    pub fn open(path: PathBuf, dim: usize, rows: u64, fresh: bool) -> Result<Self> {
        let (file, actual) = open_segment(&path)?;
        let crc_path = crc_file(&path);
        let (crcs, crc_len) = open_segment(&crc_path)?;
        let row_bytes = (dim * 4) as u64;
        if fresh {
            file.set_len(0).map_err(ShardError::io(&path))?;
            crcs.set_len(0).map_err(ShardError::io(&crc_path))?;
        } else if actual < rows * row_bytes || crc_len < rows * 4 {
            return Err(ShardError::Corrupt {
                file: path,
                offset: actual,
                reason: format!("vector set file holds fewer than its {rows} rows"),
            });
        }
        let mut store = Self {
            path,
            file,
            crcs,
            dim,
            capacity_rows: 0,
            map: None,
        };
        store.ensure(rows)?;
        Ok(store)
    }

    /// Room (zeros) for rows below `rows`.
    pub fn ensure(&mut self, rows: u64) -> Result<()> {
        if rows <= self.capacity_rows && self.map.is_some() {
            return Ok(());
        }
        let row_bytes = (self.dim * 4) as u64;
        let cap = grown_capacity(rows, row_bytes);
        let len = self
            .file
            .metadata()
            .map_err(ShardError::io(&self.path))?
            .len();
        if len < cap * row_bytes {
            self.file
                .set_len(cap * row_bytes)
                .map_err(ShardError::io(&self.path))?;
            self.crcs
                .set_len(cap * 4)
                .map_err(ShardError::io(crc_file(&self.path)))?;
        }
        // SAFETY: only this store writes the file (under the shard's writer lock), a
        // row is read only after it was written, and the file never shrinks while a
        // view of it is published.
        let map = unsafe { Mmap::map(&self.file) }.map_err(ShardError::io(&self.path))?;
        self.map = Some(Arc::new(map));
        self.capacity_rows = cap;
        Ok(())
    }

    pub fn write(&mut self, row: u64, v: &[f32]) -> Result<()> {
        debug_assert_eq!(v.len(), self.dim);
        self.ensure(row + 1)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, row * (self.dim * 4) as u64)
            .map_err(ShardError::io(&self.path))?;
        self.crcs
            .write_all_at(&vector_crc(v).to_le_bytes(), row * 4)
            .map_err(ShardError::io(crc_file(&self.path)))
    }

    /// Sets row `row`'s checksum without writing its vector (a dead row that never got
    /// one reads as zeros: its checksum is theirs).
    pub fn write_crc(&mut self, row: u64, crc: u32) -> Result<()> {
        self.crcs
            .write_all_at(&crc.to_le_bytes(), row * 4)
            .map_err(ShardError::io(crc_file(&self.path)))
    }

    pub fn view(&self, rows: u64) -> VectorView {
        VectorView {
            map: self.map.clone(),
            dim: self.dim,
            rows: rows.min(self.capacity_rows),
        }
    }

    /// Cuts the file to exactly `rows` rows and makes it durable (before it becomes a
    /// layout's vectors file).
    pub fn finish(&mut self, rows: u64) -> Result<()> {
        self.map = None;
        self.file
            .set_len(rows * (self.dim * 4) as u64)
            .map_err(ShardError::io(&self.path))?;
        self.crcs
            .set_len(rows * 4)
            .map_err(ShardError::io(crc_file(&self.path)))?;
        self.sync()
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(ShardError::io(&self.path))?;
        self.crcs
            .sync_data()
            .map_err(ShardError::io(crc_file(&self.path)))
    }
}
