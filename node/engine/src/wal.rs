//! The write-ahead log: one checksummed frame per write batch, fsynced before the
//! batch is acknowledged. Files are named `wal-<first seq>.log`; a checkpoint starts a
//! new file and deletes the ones it covers.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Result, ShardError};
use super::record::{self, ScanEnd};
use super::storage::{decode, encode, sync_dir};

/// One operation of a batch, as logged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WalOp {
    Upsert {
        id: String,
        text: Option<String>,
        /// Metadata as JSON text: the binary codec cannot carry a self-describing value.
        metadata: String,
        vector: Vec<f32>,
    },
    Delete {
        id: String,
    },
    /// Compact the shard at this batch (`compact`): alone in its batch.
    Compact,
    /// Delete every live id `shoal_proto::routing::shard_of(id, modulus)` does not send
    /// to `residue` (a split shard's half; issue 19): alone in its batch. A variant
    /// added last: the log names variants by index.
    Retain {
        modulus: u32,
        residue: u32,
    },
    /// Issue 21, re-embedding (`vector_set.rs`): start the vector set of operation
    /// `tag` for `model`'s vectors of `dimension` (`from_model`: the stored vectors'
    /// model); alone in its batch.
    SetBegin {
        tag: u64,
        model: String,
        from_model: String,
        dimension: u32,
    },
    /// The set's vector of `id`'s live row, if that row was written by batch `version`
    /// (0: by the upsert just before it in this batch); otherwise nothing (a stale
    /// re-encoding is dropped alike on every replica).
    SetVector {
        tag: u64,
        id: String,
        version: u64,
        vector: Vec<f32>,
    },
    /// Drop the set (a rollback); alone in its batch.
    SetDrop {
        tag: u64,
    },
    /// The set becomes the stored vectors (a commit); alone in its batch, refused
    /// while a live row lacks its vector.
    SetCommit {
        tag: u64,
    },
}

/// A batch shares one frame and one fsync: it is recovered whole or not at all.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WalBatch {
    pub seq: u64,
    /// The replica set's epoch when the primary ordered the batch: two replicas hold
    /// the same history up to `seq` when their batches at `seq` share an epoch.
    pub epoch: u64,
    /// The client's request id, if it gave one (idempotent retries); empty otherwise.
    pub request_id: String,
    pub ops: Vec<WalOp>,
}

impl WalBatch {
    /// Roughly the memory the batch holds (ids, text, metadata, vectors).
    pub fn approx_bytes(&self) -> usize {
        let op = |op: &WalOp| match op {
            WalOp::Upsert {
                id,
                text,
                metadata,
                vector,
            } => {
                id.len() + text.as_ref().map_or(0, String::len) + metadata.len() + vector.len() * 4
            }
            WalOp::Delete { id } => id.len(),
            WalOp::SetVector { id, vector, .. } => id.len() + vector.len() * 4,
            WalOp::SetBegin {
                model, from_model, ..
            } => model.len() + from_model.len(),
            WalOp::Compact
            | WalOp::Retain { .. }
            | WalOp::SetDrop { .. }
            | WalOp::SetCommit { .. } => 0,
        };
        self.ops.iter().map(op).sum::<usize>() + self.request_id.len() + 64
    }
}

pub struct Wal {
    file: File,
    path: PathBuf,
    bytes: u64,
}

fn wal_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("wal-{first_seq:020}.log"))
}

/// WAL files in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(ShardError::io(dir))? {
        let entry = entry.map_err(ShardError::io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name
            .strip_prefix("wal-")
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Replays every batch with `seq > after` in log order. A torn tail of the last file
/// is cut off (it was never acknowledged); any other damage is an error.
pub fn replay(dir: &Path, after: u64, mut apply: impl FnMut(WalBatch) -> Result<()>) -> Result<()> {
    let files = list(dir)?;
    for (i, (_, path)) in files.iter().enumerate() {
        let map = super::storage::map_file(path)?;
        let data: &[u8] = map.as_deref().unwrap_or_default();
        let mut apply_err = None;
        let end = record::scan(data, |_, payload| {
            let batch: WalBatch = decode(payload)?;
            if batch.seq > after {
                if let Err(e) = apply(batch) {
                    apply_err = Some(e);
                    return Err("apply failed".into());
                }
            }
            Ok(())
        });
        if let Some(e) = apply_err {
            return Err(e);
        }
        let corrupt = |offset, reason| ShardError::Corrupt {
            file: path.clone(),
            offset,
            reason,
        };
        match end.map_err(|(off, reason)| corrupt(off, reason))? {
            ScanEnd::Clean => {}
            ScanEnd::TornTail { offset } if i + 1 == files.len() => {
                drop(map);
                tracing::warn!(file = %path.display(), offset, "cutting torn wal tail");
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(ShardError::io(path))?;
                f.set_len(offset).map_err(ShardError::io(path))?;
                f.sync_all().map_err(ShardError::io(path))?;
            }
            ScanEnd::TornTail { offset } => {
                return Err(corrupt(
                    offset,
                    "damaged record in a wal file that is not the last".into(),
                ))
            }
            ScanEnd::Corrupt { offset, reason } => return Err(corrupt(offset, reason)),
        }
    }
    Ok(())
}

impl Wal {
    /// Starts a fresh log file whose first batch will be `first_seq`, and deletes the
    /// older files: the caller has made everything before `first_seq` durable elsewhere.
    pub fn start(dir: &Path, first_seq: u64) -> Result<Self> {
        let path = wal_path(dir, first_seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(ShardError::io(&path))?;
        let bytes = file.metadata().map_err(ShardError::io(&path))?.len();
        sync_dir(dir)?;
        for (seq, old) in list(dir)? {
            if seq < first_seq {
                fs::remove_file(&old).map_err(ShardError::io(&old))?;
            }
        }
        Ok(Self { file, path, bytes })
    }

    /// Reopens the newest log file for appending (a torn tail already cut by
    /// [`replay`]), writing nothing; starts one at `first_seq` if there is none. For an
    /// open that must not need free space.
    pub fn resume(dir: &Path, first_seq: u64) -> Result<Self> {
        let Some((_, path)) = list(dir)?.pop() else {
            return Self::start(dir, first_seq);
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(ShardError::io(&path))?;
        let bytes = file.metadata().map_err(ShardError::io(&path))?.len();
        Ok(Self { file, path, bytes })
    }

    /// Appends one batch and fsyncs it; returns only once the batch is durable.
    pub fn append(&mut self, batch: &WalBatch) -> Result<()> {
        let frame = record::encode(&encode(batch));
        self.file
            .write_all(&frame)
            .map_err(ShardError::io(&self.path))?;
        self.file.sync_data().map_err(ShardError::io(&self.path))?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}
