//! The backup's side: appends from the primary (fenced by epoch, applied only when they
//! follow this replica's history) and snapshots received into a staging directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shoal_engine::{epoch_at, Shard, WalBatch};
use shoal_proto::replica as rpb;

use super::Replication;
use crate::cluster::error::ReplicaError;
use crate::cluster::transport::SnapshotStream;

impl Replication {
    /// A backup's side of Append: fence stale epochs, check the history matches, log.
    pub async fn append(
        &self,
        req: rpb::AppendRequest,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        // Decoded (bounded, format checked) before anything is locked or compared: a
        // payload that cannot be read is refused whatever the backup's position.
        let batches: Vec<Arc<WalBatch>> = if req.batches.is_empty() {
            Vec::new()
        } else {
            shoal_proto::wire::check_format(req.format)
                .map_err(|e| ReplicaError::Refused(format!("append batches: {e}")))?;
            shoal_proto::wire::decode::<Vec<WalBatch>>(&req.batches)
                .map_err(|e| ReplicaError::Invalid(format!("append batches: {e}")))?
                .into_iter()
                .map(Arc::new)
                .collect()
        };
        let _g = self.apply.lock().await;
        self.accept_epoch(req.epoch, &req.primary)?;
        let shard = self.shard()?;
        let (last, last_epoch) = shard.last();
        let epochs = shard.epochs();
        if req.prev_seq != last || epoch_at(&epochs, last) != req.prev_epoch {
            return Ok(rpb::AppendResponse {
                ok: false,
                last_seq: last,
                last_epoch,
            });
        }
        let last = if batches.is_empty() {
            last
        } else {
            self.disk.check()?;
            let (s, recent) = (shard.clone(), self.recent.clone());
            shoal_engine::run_blocking(move || {
                let last = s.append_replicated(&batches)?;
                recent.lock().remember(batches);
                Ok(last)
            })
            .await
            .map_err(ReplicaError::from)?
        };
        self.caught_up
            .store(last >= req.primary_seq, Ordering::Release);
        let (last, last_epoch) = shard.last();
        Ok(rpb::AppendResponse {
            ok: true,
            last_seq: last,
            last_epoch,
        })
    }

    /// Refuses a sender whose epoch is older than one this replica has seen, or that
    /// claims this replica's own epoch while this replica is the primary.
    pub fn accept_epoch(&self, epoch: u64, from: &str) -> Result<(), ReplicaError> {
        let known = self.known_epoch();
        if epoch < known {
            return Err(ReplicaError::StaleEpoch(format!(
                "stale epoch {epoch} from {from}: replica {} on {} is at epoch {known}",
                self.key, self.node_id
            )));
        }
        if let Some(r) = self.role() {
            if r.is_primary && epoch <= r.epoch && from != self.node_id {
                return Err(ReplicaError::StaleEpoch(format!(
                    "stale epoch {epoch} from {from}: {} is the primary of {} at epoch {}",
                    self.node_id, self.key, r.epoch
                )));
            }
        }
        self.known_epoch.fetch_max(epoch, Ordering::AcqRel);
        Ok(())
    }

    /// A backup's side of InstallSnapshot, after the first chunk was accepted: the
    /// files are written into a staging dir beside the replica's (with the primary's
    /// manifest), ready for the replica actor to swap in. Returns the dir and the bytes
    /// received. Hold [`Self::lock_apply`] across this and the swap.
    ///
    /// Resumable (issue 16): a transfer cut short leaves its staged files, and the
    /// next one (`first.resume`) continues each file from the offset its first chunk
    /// names. Every file the manifest lists must arrive whole, and nothing past its
    /// length is taken, before the snapshot is installed.
    pub async fn receive_snapshot(
        &self,
        first: &rpb::SnapshotChunk,
        stream: &mut SnapshotStream,
        max_files: usize,
    ) -> Result<(PathBuf, u64), ReplicaError> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let staging = staging_dir(self.shard()?.dir());
        let io = |e: std::io::Error| ReplicaError::Internal(format!("writing the snapshot: {e}"));
        let expected: HashMap<String, u64> = Shard::snapshot_files_of(&first.manifest)
            .map_err(|e| ReplicaError::Invalid(e.to_string()))?
            .into_iter()
            .collect();
        if expected.len() > max_files {
            return Err(ReplicaError::Invalid(format!(
                "a snapshot of {} files, over the limit snapshot_files = {max_files}",
                expected.len()
            )));
        }
        if !first.resume {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        tokio::fs::create_dir_all(&staging).await.map_err(io)?;
        // Each file: its handle and its length so far (chunks come in order).
        let mut files: HashMap<String, (tokio::fs::File, u64)> = HashMap::new();
        let mut bytes = 0u64;
        while let Some(chunk) = futures::StreamExt::next(stream).await {
            let chunk = chunk?;
            if !snapshot_file_name_ok(&chunk.file) {
                return Err(ReplicaError::Invalid(format!(
                    "bad snapshot file name {:?} (1 to 128 of [A-Za-z0-9._-], not \
                     manifest.json, no '..')",
                    &chunk.file[..chunk.file.floor_char_boundary(64)]
                )));
            }
            let Some(&len) = expected.get(&chunk.file) else {
                return Err(ReplicaError::Invalid(format!(
                    "snapshot file {:?} is not one its manifest lists",
                    chunk.file
                )));
            };
            if !files.contains_key(&chunk.file) {
                let path = staging.join(&chunk.file);
                let f = if chunk.offset == 0 {
                    tokio::fs::File::create(&path).await.map_err(io)?
                } else if first.resume {
                    let mut f = tokio::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .await
                        .map_err(io)?;
                    let have = f.metadata().await.map_err(io)?.len();
                    if have < chunk.offset {
                        return Err(ReplicaError::Invalid(format!(
                            "snapshot file {:?} resumes at offset {}, but {have} bytes are staged",
                            chunk.file, chunk.offset
                        )));
                    }
                    f.set_len(chunk.offset).await.map_err(io)?;
                    f.seek(std::io::SeekFrom::Start(chunk.offset))
                        .await
                        .map_err(io)?;
                    f
                } else {
                    return Err(ReplicaError::Invalid(format!(
                        "snapshot file {:?} starts at offset {} in a transfer that does not resume",
                        chunk.file, chunk.offset
                    )));
                };
                files.insert(chunk.file.clone(), (f, chunk.offset));
            }
            let (f, written) = files.get_mut(&chunk.file).expect("opened above");
            if chunk.offset != *written {
                return Err(ReplicaError::Invalid(format!(
                    "snapshot chunk of {:?} at offset {}, expected {written}",
                    chunk.file, chunk.offset
                )));
            }
            if *written + chunk.data.len() as u64 > len {
                return Err(ReplicaError::Invalid(format!(
                    "snapshot file {:?} runs past the {len} bytes its manifest gives it",
                    chunk.file
                )));
            }
            f.write_all(&chunk.data).await.map_err(io)?;
            *written += chunk.data.len() as u64;
            bytes += chunk.data.len() as u64;
        }
        for (name, &len) in &expected {
            let got = files.get(name).map_or(0, |(_, w)| *w);
            if got != len {
                // Kept staged: the sender's next transfer resumes it.
                return Err(ReplicaError::Unavailable(format!(
                    "the snapshot transfer ended with {got} of the {len} bytes of {name:?}; \
                     what arrived stays staged for the next transfer to resume"
                )));
            }
        }
        for (_, (f, _)) in files {
            f.sync_all().await.map_err(io)?;
        }
        let (dir, manifest) = (staging.clone(), first.manifest.clone());
        shoal_engine::run_blocking(move || Shard::install_manifest(&dir, &manifest))
            .await
            .map_err(ReplicaError::from)?;
        Ok((staging, bytes))
    }

    /// What the staging dir holds of a snapshot an earlier transfer left unfinished:
    /// each file's length and the crc32 of its bytes (read here: a node that crashed
    /// mid-transfer may hold a tail the disk never got, which the sender then finds
    /// not matching its own bytes). Empty when nothing is staged.
    pub async fn staged_snapshot(
        &self,
        max_files: usize,
    ) -> Result<Vec<rpb::StagedFile>, ReplicaError> {
        let staging = staging_dir(self.shard()?.dir());
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<rpb::StagedFile>> {
            let Ok(dir) = std::fs::read_dir(&staging) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in dir {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !snapshot_file_name_ok(&name) || !entry.file_type()?.is_file() {
                    continue;
                }
                if out.len() >= max_files {
                    break;
                }
                let (bytes, crc32) = crc_of(&entry.path(), u64::MAX)?;
                out.push(rpb::StagedFile { name, bytes, crc32 });
            }
            Ok(out)
        })
        .await
        .map_err(|e| ReplicaError::Internal(format!("reading the staged snapshot: {e}")))?
        .map_err(|e| ReplicaError::Internal(format!("reading the staged snapshot: {e}")))
    }

    /// Serialises snapshot installs with appends.
    pub async fn lock_apply(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.apply.lock().await
    }

    pub fn mark_behind(&self) {
        self.caught_up.store(false, Ordering::Release);
    }
}

/// A file name a snapshot may carry: plain, short, never the manifest (which travels in
/// the first chunk) and never a path.
fn snapshot_file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "manifest.json"
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// The length read and crc32 of the first `up_to` bytes of `path` (all of it, when
/// shorter).
pub fn crc_of(path: &Path, up_to: u64) -> std::io::Result<(u64, u32)> {
    crc_of_file(&std::fs::File::open(path)?, up_to)
}

/// [`crc_of`] through an open handle (positional reads: the handle's offset is not
/// moved, so it may be shared).
pub fn crc_of_file(f: &std::fs::File, up_to: u64) -> std::io::Result<(u64, u32)> {
    use std::os::unix::fs::FileExt;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    while n < up_to {
        let want = (up_to - n).min(buf.len() as u64) as usize;
        let k = f.read_at(&mut buf[..want], n)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize()))
}

/// Where a snapshot is assembled before it replaces the replica's directory.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".incoming");
    PathBuf::from(s)
}
