//! Durable Raft storage: the log, vote and commit index in one redb database (every
//! write transaction fsyncs before it returns), and the state machine (the cluster map)
//! in memory, persisted as snapshot files written atomically (temp file, fsync,
//! rename, fsync the dir). On restart the map is the last snapshot plus the committed
//! log after it, which openraft re-applies.

// openraft's StorageError is large and its trait signatures fix it as the error type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::fs;
use std::io::{Cursor, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership, Vote,
};
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::map::{Change, ClusterMap};
use crate::raft::{decode, encode, Entry, LogId, Member, Response, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

fn io_err(e: impl ToString) -> AnyError {
    AnyError::error(e.to_string())
}

fn logs_err(e: impl ToString) -> StorageError {
    StorageError::IO {
        source: StorageIOError::write_logs(io_err(e)),
    }
}

/// Runs blocking redb work off the async runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(logs_err)?
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// A handle that tells when every clone of this store (openraft keeps log readers in
    /// its replication tasks, which end a moment after the core) has been dropped and the
    /// file's lock released.
    pub fn closed(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let tx = self.db.begin_read().map_err(logs_err)?;
        let table = tx.open_table(META).map_err(logs_err)?;
        match table.get(key).map_err(logs_err)? {
            Some(v) => Ok(Some(decode(v.value()).map_err(logs_err)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, v: &T) -> Result<(), StorageError> {
        let db = self.db.clone();
        let bytes = encode(v);
        blocking(move || {
            let tx = db.begin_write().map_err(logs_err)?;
            tx.open_table(META)
                .map_err(logs_err)?
                .insert(key, bytes.as_slice())
                .map_err(logs_err)?;
            tx.commit().map_err(logs_err)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(i) => Some(i - 1),
            Bound::Unbounded => None,
        };
        let tx = self.db.begin_read().map_err(logs_err)?;
        let table = tx.open_table(LOG).map_err(logs_err)?;
        let iter = match end {
            Some(e) if e < start => return Ok(Vec::new()),
            Some(e) => table.range(start..=e),
            None => table.range(start..),
        }
        .map_err(logs_err)?;
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(logs_err)?;
            out.push(decode(v.value()).map_err(logs_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        // Stored as an Option (see `purge`): decoded as a bare LogId its tag byte
        // shifted every field, and a restarted member looked for purged entries.
        let last_purged = self.get_meta::<Option<LogId>>("last_purged")?.flatten();
        let tx = self.db.begin_read().map_err(logs_err)?;
        let table = tx.open_table(LOG).map_err(logs_err)?;
        let last = match table.last().map_err(logs_err)? {
            Some((_, v)) => Some(decode::<Entry>(v.value()).map_err(logs_err)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let Some(committed) = self.get_meta::<Option<LogId>>("committed")?.flatten() else {
            return Ok(None);
        };
        // A leader can learn an entry is committed from its followers' acknowledgements
        // before its own append of it is durable (the two are separate transactions).
        // Killed in between, it would restart with a commit point beyond its log:
        // re-apply only what it holds (committed too); the rest comes from the leader.
        match self.get_log_state().await?.last_log_id {
            Some(last) if last.index < committed.index => {
                tracing::warn!(
                    committed = committed.index,
                    last_log = last.index,
                    "saved commit point is ahead of the log; re-applying up to the log's end"
                );
                Ok(Some(last))
            }
            _ => Ok(Some(committed)),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, encode(&e)))
            .collect();
        let db = self.db.clone();
        let res = blocking(move || {
            let tx = db.begin_write().map_err(logs_err)?;
            {
                let mut t = tx.open_table(LOG).map_err(logs_err)?;
                for (i, bytes) in &rows {
                    t.insert(*i, bytes.as_slice()).map_err(logs_err)?;
                }
            }
            tx.commit().map_err(logs_err)
        })
        .await;
        // Durable (redb fsyncs on commit) before openraft may count it towards a quorum.
        callback.log_io_completed(
            res.as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        res
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(logs_err)?;
            tx.open_table(LOG)
                .map_err(logs_err)?
                .retain_in(log_id.index.., |_, _| false)
                .map_err(logs_err)?;
            tx.commit().map_err(logs_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        let bytes = encode(&Some(log_id));
        blocking(move || {
            let tx = db.begin_write().map_err(logs_err)?;
            tx.open_table(META)
                .map_err(logs_err)?
                .insert("last_purged", bytes.as_slice())
                .map_err(logs_err)?;
            tx.open_table(LOG)
                .map_err(logs_err)?
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(logs_err)?;
            tx.commit().map_err(logs_err)
        })
        .await
    }
}

/// A snapshot's metadata and its encoded file.
type StoredSnapshot = (SnapshotMeta<u64, Member>, Vec<u8>);

/// What a snapshot file holds.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, Member>,
    map: ClusterMap,
}

/// The applied state: the map plus Raft's bookkeeping. Shared with the API layer, which
/// reads the map after a linearizable barrier.
#[derive(Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership<u64, Member>,
    pub map: ClusterMap,
}

#[derive(Clone)]
pub struct StateMachine {
    pub state: Arc<Mutex<Applied>>,
    dir: PathBuf,
    /// Snapshot last built or installed: (meta, encoded file bytes).
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// Every applied change, with the version it produced, for map watchers.
    pub changes: broadcast::Sender<(u64, Vec<Change>)>,
}

impl StateMachine {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let (changes, _) = broadcast::channel(4096);
        let sm = Self {
            state: Arc::default(),
            dir: dir.to_path_buf(),
            current: Arc::default(),
            changes,
        };
        let path = sm.snapshot_path();
        if path.exists() {
            let bytes = unseal(&fs::read(&path)?)
                .map_err(|e| anyhow::anyhow!("damaged snapshot {}: {e}", path.display()))?;
            let file: SnapshotFile = decode(&bytes)
                .map_err(|e| anyhow::anyhow!("corrupt snapshot {}: {e}", path.display()))?;
            let mut st = sm.state.lock();
            st.last_applied = file.meta.last_log_id;
            st.membership = file.meta.last_membership.clone();
            st.map = file.map;
            *sm.current.lock() = Some((file.meta, bytes));
        }
        Ok(sm)
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.bin")
    }

    async fn persist_async(
        &self,
        meta: &SnapshotMeta<u64, Member>,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.persist(&bytes))
            .await
            .map_err(logs_err)?
            .map_err(|e| StorageError::IO {
                source: StorageIOError::write_snapshot(Some(meta.signature()), io_err(e)),
            })
    }

    /// Atomically replaces the snapshot file (sealed: header and checksum).
    fn persist(&self, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join("snapshot.bin.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&seal(bytes))?;
        f.sync_all()?;
        fs::rename(&tmp, self.snapshot_path())?;
        fs::File::open(&self.dir)?.sync_all()
    }
}

/// First bytes of a snapshot file; the format number follows the name.
const SNAPSHOT_MAGIC: &[u8; 8] = b"SHOALSN1";

/// A snapshot's bytes as its file holds them: magic, length (u64 LE), crc32 (u32 LE),
/// then the bytes. A flipped bit or a short file is found on load, not decoded.
fn seal(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 20);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The bytes of a sealed snapshot file, checked against its length and checksum.
fn unseal(file: &[u8]) -> Result<Vec<u8>, String> {
    if file.len() < 20 || &file[..8] != SNAPSHOT_MAGIC {
        return Err("not a shoal snapshot file (missing or unknown header)".into());
    }
    let len = u64::from_le_bytes(file[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(file[16..20].try_into().expect("4 bytes"));
    let body = &file[20..];
    if body.len() as u64 != len {
        return Err(format!(
            "holds {} bytes, its header says {len} (truncated?)",
            body.len()
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(format!(
            "checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"
        ));
    }
    Ok(body.to_vec())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, bytes) = {
            let st = self.state.lock();
            let id = st
                .last_applied
                .map(|l| format!("{}-{}", l.leader_id, l.index))
                .unwrap_or_else(|| "empty".into());
            let meta = SnapshotMeta {
                last_log_id: st.last_applied,
                last_membership: st.membership.clone(),
                snapshot_id: format!("{id}-v{}", st.map.version),
            };
            let file = SnapshotFile {
                meta: meta.clone(),
                map: st.map.clone(),
            };
            (meta, encode(&file))
        };
        self.persist_async(&meta, bytes.clone()).await?;
        *self.current.lock() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<u64, Member>), StorageError> {
        let st = self.state.lock();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut st = self.state.lock();
        for e in entries {
            st.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Response {
                    version: st.map.version,
                    error: None,
                }),
                EntryPayload::Normal(req) => match st.map.apply(&req.command) {
                    Ok(changes) => {
                        let v = st.map.version;
                        // No receivers is fine: nobody is watching.
                        let _ = self.changes.send((v, changes));
                        out.push(Response {
                            version: v,
                            error: None,
                        });
                    }
                    Err(err) => out.push(Response {
                        version: st.map.version,
                        error: Some(err),
                    }),
                },
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Response {
                        version: st.map.version,
                        error: None,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let file: SnapshotFile = decode(&bytes).map_err(|e| StorageError::IO {
            source: StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)),
        })?;
        self.persist_async(meta, bytes.clone()).await?;
        {
            let mut st = self.state.lock();
            st.last_applied = meta.last_log_id;
            st.membership = meta.last_membership.clone();
            st.map = file.map;
            // Watchers cannot diff across a snapshot: an empty change set at the new
            // version tells them to re-read the whole map.
            let _ = self.changes.send((st.map.version, Vec::new()));
        }
        *self.current.lock() = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current.lock().as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(2, 1), index)
    }

    #[test]
    fn snapshot_files_are_checksummed() {
        let body = b"the map".to_vec();
        let sealed = seal(&body);
        assert_eq!(unseal(&sealed).unwrap(), body);
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unseal(&flipped).unwrap_err().contains("checksum"));
        assert!(unseal(&sealed[..sealed.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        assert!(unseal(&body).unwrap_err().contains("header"));

        // A damaged file on disk stops the member from opening, by name.
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(dir.path()).unwrap();
        sm.persist(&encode(&SnapshotFile {
            meta: SnapshotMeta::default(),
            map: ClusterMap::default(),
        }))
        .unwrap();
        assert!(StateMachine::open(dir.path()).is_ok());
        let path = dir.path().join("snapshot.bin");
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let e = StateMachine::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("damaged snapshot") && e.contains("checksum"),
            "{e}"
        );
    }

    /// Entries 1..=n written straight into the log table.
    fn fill(s: &LogStore, n: u64) {
        let tx = s.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(LOG).unwrap();
            for i in 1..=n {
                let e = Entry {
                    log_id: id(i),
                    payload: EntryPayload::Blank,
                };
                t.insert(i, encode(&e).as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    /// A leader killed after saving a commit point its own log had not made durable
    /// yet restarts re-applying what its log holds (it failed to start before).
    #[tokio::test]
    async fn a_commit_point_beyond_the_log_is_clamped_to_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(&dir.path().join("raft-log.redb")).unwrap();
        fill(&s, 3);
        s.save_committed(Some(id(5))).await.unwrap();
        assert_eq!(s.read_committed().await.unwrap(), Some(id(3)));
        s.save_committed(Some(id(2))).await.unwrap();
        assert_eq!(s.read_committed().await.unwrap(), Some(id(2)));
        let entries = s.try_get_log_entries(1..=3).await.unwrap();
        assert_eq!(entries.len(), 3);
    }

    /// After a purge the log state names the purged entry itself (a restarted member
    /// failed with "try to get log at index N but got None" once its log was first
    /// purged after a snapshot).
    #[tokio::test]
    async fn purge_is_remembered_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(&dir.path().join("raft-log.redb")).unwrap();
        fill(&s, 8);
        s.purge(id(5)).await.unwrap();
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(id(5)));
        assert_eq!(st.last_log_id, Some(id(8)));
        // And after reopening the file.
        drop(s);
        let mut s = LogStore::open(&dir.path().join("raft-log.redb")).unwrap();
        assert_eq!(
            s.get_log_state().await.unwrap().last_purged_log_id,
            Some(id(5))
        );
        assert_eq!(s.try_get_log_entries(6..=8).await.unwrap().len(), 3);
    }
}
