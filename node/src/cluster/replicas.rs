//! Shard replicas as actors: one `ReplicaActor` per hosted replica owns its shard
//! engine; the `ReplicaSupervisor` opens, closes and, when one crashes, restarts them
//! from disk while the others keep serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use shoal_engine::{
    CollectionConfig, GenerationInfo, SearchParams, SearchResult, Shard, ShardError, ShardStats,
    StoredDocument,
};

use super::replication::Replication;

pub use super::ids::ReplicaKey;

type Reply<T> = RpcReplyPort<Result<T, ShardError>>;

pub enum ReplicaMsg {
    Search(Vec<f32>, SearchParams, Reply<SearchResult>),
    Get(String, Reply<Option<StoredDocument>>),
    /// A new index generation, built beside the serving one.
    Build(Reply<GenerationInfo>),
    Stats(RpcReplyPort<ShardStats>),
    /// Replace this replica with the snapshot assembled in the given directory.
    Install(PathBuf, Reply<()>),
    /// Fault injection for tests: the actor panics, its supervisor restarts it.
    #[cfg(feature = "testsuite")]
    Crash,
    /// The engine was poisoned by a failed write: the actor stops with an error and
    /// its supervisor reopens it from disk (the log replay repairs it).
    Reopen,
}

#[derive(Clone)]
pub struct ReplicaArgs {
    pub dir: PathBuf,
    pub config: CollectionConfig,
    pub repl: Arc<Replication>,
    /// The map places a copy to fill here (`Copying`): an empty directory may be
    /// created even where this node held the replica before.
    pub filling: bool,
}

/// The marker that says this node created (or opened) the replica in `dir`:
/// `<data_dir>/created/<collection>-<id>-<index>`, outside the replica's directory, so
/// a directory wiped on its own (the volume intact) is found missing, not re-created
/// empty (issue 14).
fn marker_of(dir: &Path) -> Option<PathBuf> {
    // <data_dir>/shards/<collection>-<id>/<index>
    let coll = dir.parent()?.file_name()?.to_string_lossy().into_owned();
    let index = dir.file_name()?.to_string_lossy().into_owned();
    Some(
        dir.parent()?
            .parent()?
            .parent()?
            .join("created")
            .join(format!("{coll}-{index}")),
    )
}

/// Opens the replica in `dir`. A missing directory is created empty only when this
/// node never held the replica, or the map has it filled from another (`filling`):
/// otherwise its data is missing (a wiped directory) and the replica fails to open,
/// is reported failed and is refilled from another replica, or, with none, waits for
/// an operator (`shoal shard allocate-empty`).
pub fn open_replica(
    dir: &Path,
    config: CollectionConfig,
    filling: bool,
) -> Result<Shard, ShardError> {
    recover_install(dir)?;
    let marker = marker_of(dir);
    let exists = Shard::exists(dir);
    if !exists && !filling && marker.as_ref().is_some_and(|m| m.exists()) {
        return Err(ShardError::InvalidConfig(format!(
            "replica data missing: {} held this replica before and its directory has no \
             shard; it is not re-created empty (refilled from another replica, or an \
             operator's allocate-empty)",
            dir.display()
        )));
    }
    let tail = config.auto_rebuild_tail;
    // Compactions run under the node's build slots (`builds.rs`), not on the engine's
    // own thread: opened manual, a pending one waits for them.
    let shard = if exists {
        Shard::open_manual(dir)?
    } else {
        let shard = Shard::create(dir, config)?;
        shard.set_auto_compact(false);
        shard
    };
    // The manifest holds the value at creation; the map's policy is what counts now.
    shard.set_auto_rebuild_tail(tail);
    mark_created(dir)?;
    Ok(shard)
}

/// Records that this node holds the replica in `dir` (see [`marker_of`]): from now
/// on a missing directory is data lost, never a replica to create empty. A split's
/// fork is marked once made (issue 19), before the cut-over can name it.
pub fn mark_created(dir: &Path) -> Result<(), ShardError> {
    if let Some(m) = marker_of(dir).filter(|m| !m.exists()) {
        let parent = m.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        std::fs::write(&m, b"").map_err(io_at(&m))?;
        shoal_engine::sync_dir(parent)?;
    }
    Ok(())
}

pub struct ReplicaActor;

pub struct Hosted {
    shard: Arc<Shard>,
    args: ReplicaArgs,
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> ShardError {
    let p = p.to_path_buf();
    move |e| ShardError::Io { path: p, source: e }
}

/// Where the replaced directory waits during a snapshot swap.
fn old_dir(dir: &Path) -> PathBuf {
    dir.with_extension("old")
}

/// Swaps `dir` for the snapshot assembled (and fsynced) in `staging`, crash-safe: the
/// old directory is renamed aside, the staged one into place, the parent fsynced after
/// each rename, and only then is the old one removed. [`recover_install`] finishes or
/// undoes a swap a crash interrupted.
pub fn swap_in(dir: &Path, staging: &Path) -> Result<(), ShardError> {
    let parent = dir.parent().unwrap_or(dir);
    let old = old_dir(dir);
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_at(&old))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_at(dir))?;
        shoal_engine::sync_dir(parent)?;
    }
    std::fs::rename(staging, dir).map_err(io_at(staging))?;
    shoal_engine::sync_dir(parent)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Before a replica opens: finishes or undoes a snapshot swap a crash interrupted. A
/// directory whose manifest is missing while the set-aside one has it gets the old one
/// back (the swap never completed); a complete new directory lets the old one go; a
/// half-received staging directory is dropped (the primary sends it again).
pub fn recover_install(dir: &Path) -> Result<(), ShardError> {
    let old = old_dir(dir);
    let has_manifest = |d: &Path| d.join("manifest.json").exists();
    if old.exists() {
        if has_manifest(dir) {
            std::fs::remove_dir_all(&old).map_err(io_at(&old))?;
        } else if has_manifest(&old) {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(io_at(dir))?;
            }
            std::fs::rename(&old, dir).map_err(io_at(&old))?;
            shoal_engine::sync_dir(dir.parent().unwrap_or(dir))?;
            tracing::warn!(dir = %dir.display(), "an interrupted snapshot install was rolled back");
        }
    }
    let staging = super::replication::staging_dir(dir);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_at(&staging))?;
    }
    Ok(())
}

/// Swaps the replica's directory for a snapshot assembled in `staging`: the old
/// handle is retired first (it must not checkpoint or build into the new files), then
/// the directories are swapped ([`swap_in`]) and the new one opened.
async fn install(h: &Hosted, staging: PathBuf) -> Result<Shard, ShardError> {
    h.shard.retire();
    h.args.repl.retire_shard();
    let dir = h.args.dir.clone();
    tokio::task::spawn_blocking(move || {
        swap_in(&dir, &staging)?;
        // A snapshot may carry a compaction pending: the node's slots run it.
        Shard::open_manual(&dir)
    })
    .await
    .map_err(|e| ShardError::InvalidConfig(format!("install task: {e}")))?
}

impl Actor for ReplicaActor {
    type Msg = ReplicaMsg;
    type State = Hosted;
    type Arguments = ReplicaArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        args: ReplicaArgs,
    ) -> Result<Hosted, ActorProcessingErr> {
        // A crashed predecessor's handle must not checkpoint over what we open.
        args.repl.retire_shard();
        let (dir, config, filling) = (args.dir.clone(), args.config.clone(), args.filling);
        let opened =
            tokio::task::spawn_blocking(move || open_replica(&dir, config, filling)).await?;
        let shard = match opened {
            Ok(s) => s,
            Err(e) => {
                // Reported with the heartbeats; the reconciler tries again.
                args.repl.set_open_failure(Some(e.to_string()));
                return Err(e.into());
            }
        };
        args.repl.set_open_failure(None);
        args.repl.set_shard(shard.clone());
        Ok(Hosted {
            shard: Arc::new(shard),
            args,
        })
    }

    /// Operations run on tokio's blocking pool, so the actor keeps taking messages:
    /// searches of one replica run concurrently; the engine orders writes itself.
    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: ReplicaMsg,
        h: &mut Hosted,
    ) -> Result<(), ActorProcessingErr> {
        let shard = h.shard.clone();
        match msg {
            ReplicaMsg::Install(staging, reply) => match install(h, staging).await {
                Ok(new) => {
                    new.set_auto_rebuild_tail(h.args.config.auto_rebuild_tail);
                    h.args.repl.set_shard(new.clone());
                    h.shard = Arc::new(new);
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    // The directory may be half swapped: restart from disk.
                    return Err(ActorProcessingErr::from("snapshot install failed"));
                }
            },
            ReplicaMsg::Search(q, p, reply) => {
                tokio::spawn(async move {
                    let _ = reply.send(shard.search_async(q, p).await);
                });
            }
            ReplicaMsg::Get(id, reply) => {
                let r = tokio::task::spawn_blocking(move || shard.get(&id)).await?;
                let _ = reply.send(r);
            }
            ReplicaMsg::Build(reply) => {
                tokio::spawn(async move {
                    let _ = reply.send(shard.rebuild_async(None).await);
                });
            }
            ReplicaMsg::Stats(reply) => {
                let _ = reply.send(shard.stats());
            }
            #[cfg(feature = "testsuite")]
            ReplicaMsg::Crash => panic!("injected replica crash"),
            ReplicaMsg::Reopen => {
                h.shard.retire();
                h.args.repl.retire_shard();
                return Err(ActorProcessingErr::from(format!(
                    "reopening a failed replica: {}",
                    shard.failure().unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}

pub enum SupervisorMsg {
    /// Open this replica unless it is open or opening. The open runs on its own task
    /// (replicas of a node open concurrently; the supervisor keeps taking messages)
    /// and ends in `Opened`.
    Ensure(ReplicaKey, ReplicaArgs),
    /// An open started by `Ensure` ended: the replica is filed (or the failure logged,
    /// to be tried again by the reconciler).
    Opened(
        ReplicaKey,
        ReplicaArgs,
        Result<ActorRef<ReplicaMsg>, String>,
    ),
    /// Close (and with `true`, move to the trash); a replica still opening is closed
    /// as soon as its open ends, and the reply waits for that.
    Close(ReplicaKey, bool, RpcReplyPort<()>),
}

/// One hosted replica: its actor (engine operations; restarted by the supervisor after
/// a crash) and its replication (role, fencing, recent log; it outlives restarts).
#[derive(Clone)]
pub struct HostedReplica {
    pub actor: ActorRef<ReplicaMsg>,
    pub repl: Arc<Replication>,
}

/// This node's hosted replicas: one table, written only by the supervisor (open, close,
/// restart), read by the handlers, the reconciler, heartbeats and metrics without going
/// through an actor.
pub type Registry = Arc<RwLock<HashMap<ReplicaKey, HostedReplica>>>;

pub struct ReplicaSupervisor;

pub struct SupervisorState {
    registry: Registry,
    args: HashMap<ReplicaKey, ReplicaArgs>,
    pub restarts: Arc<std::sync::atomic::AtomicU64>,
    /// Replicas whose open is under way, with a close asked for meanwhile.
    opening: HashMap<ReplicaKey, Option<(bool, RpcReplyPort<()>)>>,
    /// Told when a replica is filed: the reconciler gives it its role at once.
    opened: Arc<tokio::sync::Notify>,
}

/// What the supervisor starts with: the registry it writes, the restart counter, and
/// whom to tell when a replica has opened.
pub type SupervisorArgs = (
    Registry,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<tokio::sync::Notify>,
);

impl ReplicaSupervisor {
    async fn spawn(
        me: &ActorRef<SupervisorMsg>,
        key: &ReplicaKey,
        args: ReplicaArgs,
    ) -> Result<ActorRef<ReplicaMsg>, String> {
        let (actor, _) = Actor::spawn_linked(None, ReplicaActor, args, me.get_cell())
            .await
            .map_err(|e| format!("opening replica {key}: {e}"))?;
        Ok(actor)
    }

    /// Stops a hosted replica and releases its shard; with `delete`, its directory
    /// goes to the trash.
    async fn close(st: &mut SupervisorState, key: ReplicaKey, delete: bool) {
        let hosted = st.registry.write().remove(&key);
        let args = st.args.remove(&key);
        if let Some(h) = hosted {
            h.actor.stop_and_wait(None, None).await.ok();
        }
        if let Some(args) = &args {
            args.repl.stop();
            if delete {
                args.repl.retire_shard();
            } else {
                args.repl.release_shard();
            }
        }
        if let (true, Some(args)) = (delete, args) {
            // Into the trash, not gone: a map event is not proof that the data
            // lives elsewhere (issue 14); the trash is emptied after a grace period.
            match move_to_trash(&args.dir) {
                Ok(to) => {
                    tracing::info!(replica = %key, trash = %to.display(), "replica dir moved to the trash")
                }
                Err(e) => {
                    tracing::warn!(replica = %key, error = %e, "moving the replica dir to the trash")
                }
            }
        }
        tracing::info!(replica = %key, deleted = delete, "replica closed");
    }
}

impl Actor for ReplicaSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        (registry, restarts, opened): Self::Arguments,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            registry,
            args: HashMap::new(),
            restarts,
            opening: HashMap::new(),
            opened,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Ensure(key, args) => {
                if st.registry.read().contains_key(&key) || st.opening.contains_key(&key) {
                    return Ok(());
                }
                st.opening.insert(key.clone(), None);
                // Opening reads the shard's records (and, for a replica marked corrupt,
                // every vector): on its own task, so one large replica does not hold up
                // the others or the supervisor's other messages.
                tokio::spawn(async move {
                    let r = Self::spawn(&me, &key, args.clone()).await;
                    let _ = me.cast(SupervisorMsg::Opened(key, args, r));
                });
            }
            SupervisorMsg::Opened(key, args, r) => {
                let close = st.opening.remove(&key).flatten();
                match r {
                    Ok(actor) => {
                        tracing::info!(replica = %key, dir = %args.dir.display(), "replica opened");
                        let repl = args.repl.clone();
                        st.registry
                            .write()
                            .insert(key.clone(), HostedReplica { actor, repl });
                        st.args.insert(key.clone(), args);
                        match close {
                            Some((delete, reply)) => {
                                Self::close(st, key, delete).await;
                                let _ = reply.send(());
                            }
                            None => st.opened.notify_one(),
                        }
                    }
                    Err(e) => {
                        tracing::error!(replica = %key, error = %e, "replica could not be opened");
                        if let Some((_, reply)) = close {
                            args.repl.stop();
                            let _ = reply.send(());
                        }
                    }
                }
            }
            SupervisorMsg::Close(key, delete, reply) => {
                if let Some(pending) = st.opening.get_mut(&key) {
                    *pending = Some((delete, reply));
                    return Ok(());
                }
                Self::close(st, key, delete).await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = evt else {
            return Ok(());
        };
        let key = st
            .registry
            .read()
            .iter()
            .find(|(_, h)| h.actor.get_id() == cell.get_id())
            .map(|(k, _)| k.clone());
        let Some(key) = key else {
            return Ok(());
        };
        tracing::error!(replica = %key, error = %err, "replica actor failed; reopening from disk");
        st.restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let args = st.args[&key].clone();
        match Self::spawn(&me, &key, args.clone()).await {
            Ok(actor) => {
                let repl = args.repl;
                st.registry
                    .write()
                    .insert(key, HostedReplica { actor, repl });
            }
            Err(e) => {
                tracing::error!(replica = %key, error = %e, "replica could not be reopened");
                st.registry.write().remove(&key);
                st.args.remove(&key);
                args.repl.stop();
            }
        }
        Ok(())
    }
}

/// The node's trash: `<data_dir>/trash`, beside `<data_dir>/shards` (one filesystem, so
/// a move is a rename).
fn trash_of(replica_dir: &Path) -> Option<PathBuf> {
    // <data_dir>/shards/<collection>-<id>/<index>
    Some(replica_dir.parent()?.parent()?.parent()?.join("trash"))
}

/// Moves a replica's directory into the trash as `<collection>-<id>-<index>.<unix ms>`,
/// fsyncing both parents; returns where it went.
pub fn move_to_trash(dir: &Path) -> std::io::Result<PathBuf> {
    let trash =
        trash_of(dir).ok_or_else(|| std::io::Error::other("replica dir has no data dir"))?;
    std::fs::create_dir_all(&trash)?;
    let coll = dir
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let index = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let to = trash.join(format!("{coll}-{index}.{ms}"));
    std::fs::rename(dir, &to)?;
    if let Some(m) = marker_of(dir) {
        let _ = std::fs::remove_file(m);
    }
    for d in [&trash, &dir.parent().unwrap_or(dir).to_path_buf()] {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(to)
}

/// Bytes held in the node's trash (counted as free by placement's disk watermarks:
/// the grace period gives them back).
pub fn trash_bytes(data_dir: &Path) -> u64 {
    fn walk(d: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(d) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(&data_dir.join("trash"))
}

/// Removes trash entries older than `grace` (by the time in their name); returns how
/// many went. Entries whose name has no time are left for an operator.
pub fn empty_trash(data_dir: &Path, grace: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(data_dir.join("trash")) else {
        return 0;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(ms) = name
            .rsplit_once('.')
            .and_then(|(_, t)| t.parse::<u128>().ok())
        else {
            continue;
        };
        if now.saturating_sub(ms) >= grace.as_millis() && std::fs::remove_dir_all(e.path()).is_ok()
        {
            tracing::info!(entry = %name, "trash entry past its grace period removed");
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod trash_tests {
    use super::*;

    /// A crash at any point of a snapshot swap leaves a directory that opens to either
    /// the old copy or the new one, whole.
    #[test]
    fn an_interrupted_snapshot_swap_recovers_to_one_whole_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("0");
        let write = |d: &Path, what: &[u8]| {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("manifest.json"), what).unwrap();
        };
        let read = |d: &Path| std::fs::read(d.join("manifest.json")).unwrap();
        // Crashed after the old copy was set aside, before the new one moved in.
        write(&old_dir(&dir), b"old");
        write(&super::super::replication::staging_dir(&dir), b"new");
        recover_install(&dir).unwrap();
        assert_eq!(read(&dir), b"old");
        assert!(!old_dir(&dir).exists());
        assert!(!super::super::replication::staging_dir(&dir).exists());
        // Crashed after the new copy moved in, before the old one was removed.
        write(&old_dir(&dir), b"old");
        std::fs::remove_dir_all(&dir).unwrap();
        write(&dir, b"new");
        recover_install(&dir).unwrap();
        assert_eq!(read(&dir), b"new");
        assert!(!old_dir(&dir).exists());
        // A whole swap.
        write(&super::super::replication::staging_dir(&dir), b"newer");
        swap_in(&dir, &super::super::replication::staging_dir(&dir)).unwrap();
        assert_eq!(read(&dir), b"newer");
        assert!(!old_dir(&dir).exists());
    }

    /// Issue 14: a replica directory wiped on its own (the volume and node identity
    /// intact) is found missing, not re-created empty, unless the map has it filled
    /// from another replica.
    #[test]
    fn a_wiped_replica_dir_is_not_re_created_empty() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("shards").join("c-7").join("2");
        let config = || shoal_engine::CollectionConfig::new(8, shoal_engine::Metric::L2);
        let doc = shoal_engine::Document {
            id: "acknowledged".into(),
            text: None,
            metadata: shoal_engine::Metadata::none(),
            vector: vec![1.0; 8],
        };
        // A replica this node never held is created.
        let s = open_replica(&dir, config(), false).unwrap();
        s.upsert(vec![doc]).unwrap();
        drop(s);
        assert_eq!(open_replica(&dir, config(), false).unwrap().len(), 1);
        // Wiped: refused, named as missing data.
        std::fs::remove_dir_all(&dir).unwrap();
        let e = open_replica(&dir, config(), false).err().unwrap();
        assert!(e.to_string().contains("replica data missing"), "{e}");
        assert!(!dir.exists());
        // The map fills it from another replica: created empty.
        assert_eq!(open_replica(&dir, config(), true).unwrap().len(), 0);
        // Into the trash, the marker goes too: a later placement here starts fresh.
        move_to_trash(&dir).unwrap();
        assert_eq!(open_replica(&dir, config(), false).unwrap().len(), 0);
    }

    #[test]
    fn deleted_replicas_wait_in_the_trash_for_their_grace_period() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("shards").join("c-7").join("2");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("docs.dat"), b"acknowledged").unwrap();
        let to = move_to_trash(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(std::fs::read(to.join("docs.dat")).unwrap(), b"acknowledged");
        assert!(to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("c-7-2."));
        // Within the grace period it stays; past it, it goes.
        assert_eq!(
            empty_trash(data.path(), std::time::Duration::from_secs(3600)),
            0
        );
        assert!(to.exists());
        assert_eq!(empty_trash(data.path(), std::time::Duration::ZERO), 1);
        assert!(!to.exists());
    }
}
