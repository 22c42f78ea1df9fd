//! Backup repositories (issue 20): where a collection's backups live, in a local or
//! mounted directory or S3-compatible storage (through `object_store`), and everything
//! that reads or writes one: a shard's upload and download, list, verify, prune.
//! Nodes upload their primaries' shards (`cluster/backups.rs`) and download restored
//! ones; the CLI lists, verifies and prunes, and reads a backup's records to restore it.
//!
//! Layout under the repository's root:
//! - `blobs/<sha256>`: file contents in chunks of at most [`CHUNK`] bytes, stored once
//!   by content hash. Segment files are append-only, so a later backup of a grown shard
//!   shares every full chunk of the earlier one and uploads only the new tail; index
//!   generation files are immutable and shared whole. This is what makes a second
//!   backup incremental.
//! - `backups/<id>/collection.json`: the collection's spec as the map held it (name,
//!   dimension, metric, model reference, index parameters, shard count, replication).
//! - `backups/<id>/shard-<i>.json`: shard i at one recorded position (sequence number,
//!   epoch): the engine's manifest at that position and, per file, its length and its
//!   chunks' hashes. Written last, once every chunk is stored: a shard record names only
//!   blobs that exist. A backup is complete when every shard has one.
//!
//! A blob is written under its hash and never changed; one whose bytes do not hash to
//! its name is corrupt, and `verify` and a restore name it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use shoal_engine::{Shard, SnapshotSource};
use shoal_proto::coordinator as cpb;
use shoal_proto::filter::PayloadField;

/// The largest chunk a file is stored in, unless the repository's `repository.json`
/// says otherwise ([`Repository::init`]). 16 MiB: a 1M-vector 384-d shard's vectors are
/// ~92 chunks, a backup of a shard grown by a few rows uploads one or two of them.
pub const CHUNK: u64 = 16 << 20;

/// Chunks a backup or a restore of one shard has in flight (read, hashed, sent): the
/// disk, the hashing and the store overlap; 4 × 16 MiB of buffers at most.
const IN_FLIGHT: usize = 4;

/// The repository's own settings, at its root, written once when it is first used.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RepositorySettings {
    pub format: u32,
    pub chunk_bytes: u64,
}

/// The file a restored shard's directory holds naming the restore that wrote it (the
/// node's `cluster/backups.rs` writes the operation's id).
pub const RESTORED_MARKER: &str = "restored-by";

/// The repository records' format; a record of another is refused by name.
pub const FORMAT: u32 = 1;

/// A backup id or collection name in a repository path: what ids may hold.
pub fn check_id(id: &str) -> Result<(), RepoError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || id.starts_with('.')
    {
        return Err(RepoError::Invalid(format!(
            "backup id {id:?}: 1 to 128 of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    Invalid(String),
    #[error("backup repository {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0} is missing")]
    Missing(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard engine: {0}")]
    Engine(#[from] shoal_engine::ShardError),
}

/// The collection as the map held it when the backup started.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CollectionRecord {
    pub format: u32,
    pub backup: String,
    /// The operation that took it (in the source cluster's map).
    pub operation: u64,
    pub started_ms: u64,
    pub collection: String,
    pub collection_id: u64,
    pub dimension: u32,
    /// `coordinator.Metric` (wire value).
    pub metric: i32,
    /// The model reference (id, content hash); empty for precomputed vectors.
    pub model_id: String,
    pub model_hash: String,
    pub nlist: u32,
    pub pq_m: u32,
    pub pq_nbits: u32,
    pub nprobe: u32,
    pub refine: u32,
    /// `coordinator.Rerank` (wire value).
    pub rerank: i32,
    pub shard_count: u32,
    pub replication_factor: u32,
    pub replica_memory_bytes: u64,
    pub write_quorum: u32,
    pub auto_rebuild_rows: Option<u64>,
    /// The fields indexed for filters (issue 22; absent in older backups: none).
    #[serde(default)]
    pub payload_fields: Vec<PayloadField>,
}

impl CollectionRecord {
    /// The create request a backup's collection record stands for, under a new name.
    pub fn create_request(&self, name: &str, rf: Option<u32>) -> cpb::CreateCollectionRequest {
        let c = self;
        cpb::CreateCollectionRequest {
            name: name.to_string(),
            dimension: c.dimension,
            metric: c.metric,
            encoder: (!c.model_id.is_empty() || !c.model_hash.is_empty()).then(|| {
                cpb::EncoderRef {
                    model_id: c.model_id.clone(),
                    content_hash: c.model_hash.clone(),
                }
            }),
            index: Some(cpb::IndexParams {
                nlist: c.nlist,
                pq_m: c.pq_m,
                pq_nbits: c.pq_nbits,
                nprobe: c.nprobe,
                refine: c.refine,
                rerank: c.rerank,
            }),
            shard_count: c.shard_count,
            replication_factor: rf.unwrap_or(c.replication_factor),
            replica_memory_bytes: c.replica_memory_bytes,
            write_quorum: match rf {
                Some(rf) => c.write_quorum.min(rf),
                None => c.write_quorum,
            },
            payload_fields: c.payload_fields.iter().map(PayloadField::wire).collect(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub sha256: String,
    pub len: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub name: String,
    pub len: u64,
    pub chunks: Vec<ChunkRecord>,
}

/// One shard of a backup, at one position.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ShardRecord {
    pub format: u32,
    pub backup: String,
    pub shard: u32,
    /// The last batch it holds and the epoch it was written in.
    pub seq: u64,
    pub batch_epoch: u64,
    /// The newest epoch of its history: a restored shard's primary leads on in it.
    pub epoch: u64,
    pub live_docs: u64,
    /// The shard engine's manifest at `seq` (JSON, as the engine writes it).
    pub manifest: serde_json::Value,
    pub files: Vec<FileRecord>,
    /// Bytes it holds, and the ones this backup stored (the rest were there already).
    pub bytes: u64,
    pub uploaded_bytes: u64,
    pub seconds: f64,
    pub finished_ms: u64,
}

/// A backup as `list` shows it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BackupSummary {
    pub backup: String,
    pub collection: String,
    pub started_ms: u64,
    pub shard_count: u32,
    /// Shards with a record (complete when equal to `shard_count`).
    pub shards_done: u32,
    pub complete: bool,
    pub docs: u64,
    pub bytes: u64,
    pub uploaded_bytes: u64,
}

/// What `verify` found: every problem names the backup, shard, file and blob.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct VerifyReport {
    pub backups: usize,
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    pub problems: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct PruneReport {
    pub deleted_backups: Vec<String>,
    pub kept_backups: Vec<String>,
    pub deleted_blobs: usize,
    pub deleted_bytes: u64,
}

/// A pace for a node's backup and restore traffic: each chunk reserves its bytes'
/// share of a second after the last reservation, and waits for it (reservations, not
/// a bucket, so an idle spell grants no burst). Shared by every shard on the node.
#[derive(Debug)]
pub struct Pace {
    bytes_per_sec: u64,
    next: parking_lot::Mutex<tokio::time::Instant>,
}

impl Pace {
    /// `bytes_per_sec` 0: no waiting.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec,
            next: parking_lot::Mutex::new(tokio::time::Instant::now()),
        }
    }

    pub async fn take(&self, bytes: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let at = {
            let mut next = self.next.lock();
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A repository, opened from its URL: `s3://bucket/prefix` (credentials, region and
/// endpoint from the `AWS_*` environment, as the AWS tools read them; an S3-compatible
/// server by `AWS_ENDPOINT`, plain HTTP with `AWS_ALLOW_HTTP=true`), `file:///dir` or a
/// directory path (which must exist: [`Repository::create`] makes it).
#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    root: Key,
    url: String,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({})", self.url)
    }
}

impl Repository {
    /// Opens the repository at `url`, making its directory if it is one.
    pub fn create(url: &str) -> Result<Self, RepoError> {
        if let Some(dir) = Self::local_dir(url)? {
            fs::create_dir_all(&dir)
                .map_err(|e| RepoError::Invalid(format!("backup repository {url:?}: {e}")))?;
        }
        Self::open(url)
    }

    /// The directory of a local repository's URL (`None` for S3).
    fn local_dir(url: &str) -> Result<Option<PathBuf>, RepoError> {
        if url.starts_with("s3://") {
            return Ok(None);
        }
        let dir = match url.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None if url.contains("://") => {
                return Err(RepoError::Invalid(format!(
                    "backup repository {url:?}: only s3:// and file:// URLs or a directory path"
                )))
            }
            None => PathBuf::from(url),
        };
        if dir.as_os_str().is_empty() || dir.is_relative() {
            return Err(RepoError::Invalid(format!(
                "backup repository {url:?}: a directory is named by its absolute path"
            )));
        }
        Ok(Some(dir))
    }

    pub fn open(url: &str) -> Result<Self, RepoError> {
        let invalid = |why: String| RepoError::Invalid(format!("backup repository {url:?}: {why}"));
        if url.len() > 4096 {
            return Err(invalid("longer than 4096 bytes".into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("names no bucket".into()));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| invalid(e.to_string()))?;
            let root = Key::parse(prefix.trim_matches('/')).map_err(|e| invalid(e.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                root,
                url: url.to_string(),
            });
        }
        let dir = Self::local_dir(url)?.expect("not s3");
        if !dir.is_dir() {
            return Err(invalid("no such directory".into()));
        }
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            root: Key::default(),
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        let mut k = self.root.clone();
        for part in rel.split('/') {
            k = k.child(part);
        }
        k
    }

    fn err(&self, source: object_store::Error) -> RepoError {
        match source {
            object_store::Error::NotFound { path, .. } => {
                RepoError::Missing(format!("{path} (in {})", self.url))
            }
            source => RepoError::Store {
                url: self.url.clone(),
                source,
            },
        }
    }

    async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), RepoError> {
        self.store
            .put(&self.key(rel), PutPayload::from(bytes))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn get(&self, rel: &str) -> Result<bytes::Bytes, RepoError> {
        let r = self
            .store
            .get(&self.key(rel))
            .await
            .map_err(|e| self.err(e))?;
        r.bytes().await.map_err(|e| self.err(e))
    }

    async fn exists(&self, rel: &str) -> Result<bool, RepoError> {
        match self.store.head(&self.key(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<T, RepoError> {
        let bytes = self.get(rel).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::Corrupt(format!("{rel}: not JSON: {e}")))?;
        let format = v.get("format").and_then(|f| f.as_u64());
        if format != Some(FORMAT as u64) {
            return Err(RepoError::Corrupt(format!(
                "{rel}: record format {format:?}, this shoal reads {FORMAT}"
            )));
        }
        serde_json::from_value(v).map_err(|e| RepoError::Corrupt(format!("{rel}: {e}")))
    }

    fn collection_rel(backup: &str) -> String {
        format!("backups/{backup}/collection.json")
    }

    fn shard_rel(backup: &str, shard: u32) -> String {
        format!("backups/{backup}/shard-{shard}.json")
    }

    fn blob_rel(sha: &str) -> String {
        format!("blobs/{sha}")
    }

    /// Gives a new repository its settings (chunks of `chunk_bytes`, at least 4 KiB);
    /// one that has them keeps its own. Returns the ones in force.
    pub async fn init(&self, chunk_bytes: u64) -> Result<RepositorySettings, RepoError> {
        if let Some(s) = self.settings().await? {
            return Ok(s);
        }
        if !(4096..=1 << 30).contains(&chunk_bytes) {
            return Err(RepoError::Invalid(format!(
                "chunks of {chunk_bytes} bytes: 4 KiB to 1 GiB"
            )));
        }
        let s = RepositorySettings {
            format: FORMAT,
            chunk_bytes,
        };
        self.put(
            "repository.json",
            serde_json::to_vec_pretty(&s).expect("serializes"),
        )
        .await?;
        Ok(s)
    }

    /// Its settings, if it has been given them.
    pub async fn settings(&self) -> Result<Option<RepositorySettings>, RepoError> {
        match self.get_json::<RepositorySettings>("repository.json").await {
            Ok(s) if (4096..=1 << 30).contains(&s.chunk_bytes) => Ok(Some(s)),
            Ok(s) => Err(RepoError::Corrupt(format!(
                "repository.json names chunks of {} bytes",
                s.chunk_bytes
            ))),
            Err(RepoError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the collection record (every node backing up a shard writes the same one).
    pub async fn put_collection(&self, c: &CollectionRecord) -> Result<(), RepoError> {
        check_id(&c.backup)?;
        let bytes = serde_json::to_vec_pretty(c).expect("a record serializes");
        self.put(&Self::collection_rel(&c.backup), bytes).await
    }

    pub async fn collection(&self, backup: &str) -> Result<CollectionRecord, RepoError> {
        check_id(backup)?;
        self.get_json(&Self::collection_rel(backup)).await
    }

    pub async fn shard(&self, backup: &str, shard: u32) -> Result<ShardRecord, RepoError> {
        check_id(backup)?;
        self.get_json(&Self::shard_rel(backup, shard)).await
    }

    pub async fn has_shard(&self, backup: &str, shard: u32) -> Result<bool, RepoError> {
        self.exists(&Self::shard_rel(backup, shard)).await
    }

    /// Stores one shard: every chunk of its snapshot's files not stored yet, then its
    /// record. `snapshot` holds the files open at their lengths, so writes, compactions
    /// and builds go on meanwhile without changing what is copied.
    pub async fn backup_shard(
        &self,
        backup: &str,
        shard: u32,
        snapshot: SnapshotSource,
        pace: &Pace,
    ) -> Result<ShardRecord, RepoError> {
        check_id(backup)?;
        let started = std::time::Instant::now();
        let (seq, batch_epoch) = Shard::manifest_position(&snapshot.manifest)?;
        let manifest: serde_json::Value = serde_json::from_slice(&snapshot.manifest)
            .map_err(|e| RepoError::Corrupt(format!("the shard's manifest: {e}")))?;
        let epoch = manifest["epochs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get(0).and_then(|x| x.as_u64()))
            .max()
            .unwrap_or(0)
            .max(batch_epoch);
        let chunk = self.init(CHUNK).await?.chunk_bytes;
        let (mut files, mut bytes, mut uploaded) = (Vec::new(), 0u64, 0u64);
        for (name, len, handle) in &snapshot.files {
            // Up to IN_FLIGHT chunks read, hashed and stored at once (in order).
            let work: Vec<_> = (0..*len)
                .step_by(chunk as usize)
                .map(|offset| {
                    self.store_chunk(handle.clone(), name, offset, chunk.min(len - offset), pace)
                })
                .collect();
            let stored: Vec<(ChunkRecord, bool)> = futures::stream::iter(work)
                .buffered(IN_FLIGHT)
                .try_collect()
                .await?;
            let mut chunks = Vec::with_capacity(stored.len());
            for (c, sent) in stored {
                bytes += c.len;
                if sent {
                    uploaded += c.len;
                }
                chunks.push(c);
            }
            files.push(FileRecord {
                name: name.clone(),
                len: *len,
                chunks,
            });
        }
        let record = ShardRecord {
            format: FORMAT,
            backup: backup.to_string(),
            shard,
            seq,
            batch_epoch,
            epoch,
            live_docs: snapshot.live_docs,
            manifest,
            files,
            bytes,
            uploaded_bytes: uploaded,
            seconds: started.elapsed().as_secs_f64(),
            finished_ms: now_ms(),
        };
        let out = serde_json::to_vec_pretty(&record).expect("a record serializes");
        self.put(&Self::shard_rel(backup, shard), out).await?;
        Ok(record)
    }

    /// Reads `n` bytes of `file` at `offset`, hashes them and stores them unless a blob of
    /// that hash is there (an earlier backup's, or this one's before a restart). Returns
    /// the chunk and whether it was sent.
    async fn store_chunk(
        &self,
        file: Arc<fs::File>,
        name: &str,
        offset: u64,
        n: u64,
        pace: &Pace,
    ) -> Result<(ChunkRecord, bool), RepoError> {
        pace.take(n).await;
        let (buf, sha) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n as usize];
            file.read_exact_at(&mut buf, offset)?;
            let sha = sha256_hex(&buf);
            Ok::<_, std::io::Error>((buf, sha))
        })
        .await
        .expect("a read task does not panic")
        .map_err(|e| RepoError::Io {
            path: PathBuf::from(name),
            source: e,
        })?;
        let rel = Self::blob_rel(&sha);
        let sent = !self.exists(&rel).await?;
        if sent {
            self.store
                .put(&self.key(&rel), PutPayload::from(buf))
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok((
            ChunkRecord {
                sha256: sha,
                len: n,
            },
            sent,
        ))
    }

    /// Fetches chunk `c`, checks it and writes it at `at` in `file`.
    async fn restore_chunk(
        &self,
        c: &ChunkRecord,
        what: String,
        file: Arc<fs::File>,
        path: PathBuf,
        at: u64,
        pace: &Pace,
    ) -> Result<(), RepoError> {
        pace.take(c.len).await;
        let bytes = self.checked_blob(c, &what).await?;
        tokio::task::spawn_blocking(move || file.write_all_at(&bytes, at))
            .await
            .expect("a write task does not panic")
            .map_err(|e| RepoError::Io { path, source: e })
    }

    /// Fetches a blob and checks it hashes to its name and has the length the record
    /// gives; `what` names where it belongs for the error.
    async fn checked_blob(&self, c: &ChunkRecord, what: &str) -> Result<bytes::Bytes, RepoError> {
        let rel = Self::blob_rel(&c.sha256);
        let bytes = match self.get(&rel).await {
            Err(RepoError::Missing(_)) => {
                return Err(RepoError::Missing(format!("{what}: blob {rel}")))
            }
            r => r?,
        };
        let b = bytes.clone();
        let sha = tokio::task::spawn_blocking(move || sha256_hex(&b))
            .await
            .expect("hashing does not panic");
        if sha != c.sha256 || bytes.len() as u64 != c.len {
            return Err(RepoError::Corrupt(format!(
                "{what}: blob {rel} is corrupt ({} bytes hashing to {sha}, the record names {} bytes)",
                bytes.len(),
                c.len
            )));
        }
        Ok(bytes)
    }

    /// Writes shard `record` into `dest` (which must not exist): every file assembled
    /// from its checked chunks in `dest.partial`, synced, its manifest installed, then
    /// renamed, so `dest` either holds the whole shard or does not exist. Returns the
    /// bytes written.
    /// `marker`, when not empty, is written into the directory as [`RESTORED_MARKER`]
    /// before it is renamed into place: what says which restore made it.
    pub async fn restore_shard(
        &self,
        record: &ShardRecord,
        dest: &Path,
        pace: &Pace,
        marker: &[u8],
    ) -> Result<u64, RepoError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| RepoError::Io { path: p, source: e }
        };
        if dest.exists() {
            return Err(RepoError::Invalid(format!(
                "cannot restore into {}: it exists",
                dest.display()
            )));
        }
        let parent = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
        let partial = parent.join(format!(
            "{}.partial",
            dest.file_name().unwrap_or_default().to_string_lossy()
        ));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut written = 0u64;
        for f in &record.files {
            check_file_name(&f.name)?;
            let path = partial.join(&f.name);
            let file = Arc::new(fs::File::create(&path).map_err(io(&path))?);
            let mut at = Vec::with_capacity(f.chunks.len());
            let mut offset = 0u64;
            for c in &f.chunks {
                at.push(offset);
                offset += c.len;
            }
            // Up to IN_FLIGHT chunks fetched, checked and written at once.
            let work: Vec<_> = f
                .chunks
                .iter()
                .zip(at)
                .enumerate()
                .map(|(n, (c, at))| {
                    let what = format!(
                        "backup {} shard {} file {} chunk {n}",
                        record.backup, record.shard, f.name
                    );
                    self.restore_chunk(c, what, file.clone(), path.clone(), at, pace)
                })
                .collect();
            futures::stream::iter(work)
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            if offset != f.len {
                return Err(RepoError::Corrupt(format!(
                    "backup {} shard {} file {}: chunks of {offset} bytes, the record names {}",
                    record.backup, record.shard, f.name, f.len
                )));
            }
            file.sync_all().map_err(io(&path))?;
            written += offset;
        }
        let manifest = serde_json::to_vec(&record.manifest).expect("JSON serializes");
        Shard::install_manifest(&partial, &manifest)?;
        if !marker.is_empty() {
            let m = partial.join(RESTORED_MARKER);
            fs::write(&m, marker).map_err(io(&m))?;
            fs::File::open(&m)
                .and_then(|f| f.sync_all())
                .map_err(io(&m))?;
        }
        shoal_engine::sync_dir(&partial)?;
        fs::rename(&partial, dest).map_err(io(dest))?;
        shoal_engine::sync_dir(&parent)?;
        Ok(written)
    }

    /// Backup ids in the repository.
    pub async fn ids(&self) -> Result<Vec<String>, RepoError> {
        let prefix = self.key("backups");
        let listed = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.err(e))?;
        let mut ids: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every backup, oldest first, with how complete it is.
    pub async fn list(&self) -> Result<Vec<BackupSummary>, RepoError> {
        let mut out = Vec::new();
        for id in self.ids().await? {
            let Ok(c) = self.collection(&id).await else {
                continue; // a backup whose first shard has not stored its records yet
            };
            let mut s = BackupSummary {
                backup: id.clone(),
                collection: c.collection.clone(),
                started_ms: c.started_ms,
                shard_count: c.shard_count,
                shards_done: 0,
                complete: false,
                docs: 0,
                bytes: 0,
                uploaded_bytes: 0,
            };
            for i in 0..c.shard_count {
                if let Ok(r) = self.shard(&id, i).await {
                    s.shards_done += 1;
                    s.docs += r.live_docs;
                    s.bytes += r.bytes;
                    s.uploaded_bytes += r.uploaded_bytes;
                }
            }
            s.complete = s.shards_done == s.shard_count;
            out.push(s);
        }
        out.sort_by_key(|s| (s.started_ms, s.backup.clone()));
        Ok(out)
    }

    /// The records of a complete backup (or of the `shards` asked for), refused by
    /// name when one is missing or unreadable.
    pub async fn records(
        &self,
        backup: &str,
        shards: Option<&[u32]>,
    ) -> Result<(CollectionRecord, Vec<ShardRecord>), RepoError> {
        let c = self.collection(backup).await?;
        let wanted: Vec<u32> = match shards {
            Some(s) => s.to_vec(),
            None => (0..c.shard_count).collect(),
        };
        let mut out = Vec::new();
        for i in wanted {
            if i >= c.shard_count {
                return Err(RepoError::Invalid(format!(
                    "backup {backup} has {} shards: no shard {i}",
                    c.shard_count
                )));
            }
            let r = self.shard(backup, i).await.map_err(|e| match e {
                RepoError::Missing(_) => RepoError::Missing(format!(
                    "backup {backup} shard {i} (the backup is incomplete)"
                )),
                e => e,
            })?;
            if r.shard != i || r.backup != backup {
                return Err(RepoError::Corrupt(format!(
                    "backup {backup} shard {i}: the record names backup {} shard {}",
                    r.backup, r.shard
                )));
            }
            out.push(r);
        }
        Ok((c, out))
    }

    /// Reads every blob of `backup` (or of every backup) and checks its hash and length.
    pub async fn verify(&self, backup: Option<&str>) -> Result<VerifyReport, RepoError> {
        let ids = match backup {
            Some(b) => vec![b.to_string()],
            None => self.ids().await?,
        };
        let mut report = VerifyReport::default();
        let mut seen = BTreeSet::new();
        for id in ids {
            report.backups += 1;
            let (_, records) = match self.records(&id, None).await {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(format!("backup {id}: {e}"));
                    continue;
                }
            };
            for r in records {
                for f in &r.files {
                    for (n, c) in f.chunks.iter().enumerate() {
                        let what =
                            format!("backup {id} shard {} file {} chunk {n}", r.shard, f.name);
                        if !seen.insert(c.sha256.clone()) {
                            continue;
                        }
                        match self.checked_blob(c, &what).await {
                            Ok(b) => {
                                report.blobs_checked += 1;
                                report.bytes_checked += b.len() as u64;
                            }
                            Err(e) => report.problems.push(e.to_string()),
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Keeps the newest `keep` complete backups (and any incomplete one newer than the
    /// oldest of them: it may be running) and deletes the rest, then every blob no
    /// remaining backup names that is older than `grace` (a running backup stores its
    /// blobs before the record that names them).
    pub async fn prune(&self, keep: usize, grace: Duration) -> Result<PruneReport, RepoError> {
        let all = self.list().await?;
        let complete: Vec<&BackupSummary> = all.iter().filter(|b| b.complete).collect();
        let kept_complete: BTreeSet<String> = complete
            .iter()
            .rev()
            .take(keep)
            .map(|b| b.backup.clone())
            .collect();
        let oldest_kept = complete
            .iter()
            .filter(|b| kept_complete.contains(&b.backup))
            .map(|b| b.started_ms)
            .min()
            .unwrap_or(u64::MAX);
        let mut report = PruneReport::default();
        for b in &all {
            let keep_it =
                kept_complete.contains(&b.backup) || (!b.complete && b.started_ms >= oldest_kept);
            if keep_it {
                report.kept_backups.push(b.backup.clone());
                continue;
            }
            let prefix = self.key(&format!("backups/{}", b.backup));
            let objects: Vec<_> = self
                .store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| self.err(e))?;
            // The collection record last, so a half-deleted backup is never listed complete.
            let mut keys: Vec<Key> = objects.into_iter().map(|o| o.location).collect();
            keys.sort_by_key(|k| k.filename() == Some("collection.json"));
            for k in keys {
                self.store.delete(&k).await.map_err(|e| self.err(e))?;
            }
            report.deleted_backups.push(b.backup.clone());
        }
        // Blobs every remaining backup (listed or still being written) names.
        let mut named = BTreeSet::new();
        for id in self.ids().await? {
            let Ok(c) = self.collection(&id).await else {
                continue;
            };
            for i in 0..c.shard_count {
                if let Ok(r) = self.shard(&id, i).await {
                    for f in r.files {
                        named.extend(f.chunks.into_iter().map(|c| c.sha256));
                    }
                }
            }
        }
        let now = now_ms();
        let blobs: Vec<_> = self
            .store
            .list(Some(&self.key("blobs")))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        for o in blobs {
            let Some(name) = o.location.filename() else {
                continue;
            };
            let age = now.saturating_sub(o.last_modified.timestamp_millis().max(0) as u64);
            if named.contains(name) || age < grace.as_millis() as u64 {
                continue;
            }
            self.store
                .delete(&o.location)
                .await
                .map_err(|e| self.err(e))?;
            report.deleted_blobs += 1;
            report.deleted_bytes += o.size;
        }
        Ok(report)
    }

    /// Bytes per stored blob, by hash (for tests and the benchmark: what a backup added).
    pub async fn blobs(&self) -> Result<BTreeMap<String, u64>, RepoError> {
        let blobs: Vec<_> = self
            .store
            .list(Some(&self.key("blobs")))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        Ok(blobs
            .into_iter()
            .filter_map(|o| Some((o.location.filename()?.to_string(), o.size)))
            .collect())
    }
}

/// A file name a record may name: a plain name in the shard's directory.
fn check_file_name(name: &str) -> Result<(), RepoError> {
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name == "."
        || name == ".."
        || name == "manifest.json"
    {
        return Err(RepoError::Corrupt(format!(
            "the record names a file {name:?}, which no shard holds"
        )));
    }
    Ok(())
}
