//! The replication layer, through the in-process transport: real shard engines on
//! disk, real replica actors and replicators, the real Append / InstallSnapshot
//! handlers; no sockets and no coordinator (each test sets the roles a map would).
//! A node taken off the `InProcessNet` is unreachable, as a partitioned one. Each test
//! runs in about a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use shoal_engine::{CollectionConfig, Metric};
use shoal_node::cluster::disk::DiskGuard;
use shoal_node::cluster::error::ReplicaError;
use shoal_node::cluster::lease::Lease;
use shoal_node::cluster::replicas::{
    Registry, ReplicaArgs, ReplicaKey, ReplicaSupervisor, SupervisorMsg,
};
use shoal_node::cluster::replication::{Peer, Replication, Role};
use shoal_node::cluster::transport::{Faults, InProcessNet, LocalReplicas, ReplicaApi, Transports};
use shoal_proto::coordinator as cpb;
use shoal_proto::limits::Limits;
use shoal_proto::replica as rpb;

const DIM: usize = 8;
const CALL: Duration = Duration::from_secs(10);
/// The lag timeout here: a backup behind one target this long is reported lagging.
const LAG: Duration = Duration::from_millis(300);

/// One node's replica side: its replicas' actors and replication, answering on `net`.
struct Node {
    id: String,
    addr: String,
    dir: tempfile::TempDir,
    registry: Registry,
    local: Arc<LocalReplicas>,
    supervisor: ActorRef<SupervisorMsg>,
    transports: Arc<Transports>,
    /// The node's primary lease, granted for an hour (no coordinator renews it here).
    lease: Arc<Lease>,
}

impl Node {
    async fn start(id: &str, net: &InProcessNet) -> Node {
        let registry: Registry = Arc::default();
        let opened = Arc::new(tokio::sync::Notify::new());
        let (supervisor, _) = Actor::spawn(
            None,
            ReplicaSupervisor,
            (registry.clone(), Arc::default(), opened.clone()),
        )
        .await
        .unwrap();
        let local = LocalReplicas::new(registry.clone(), Limits::default());
        let addr = format!("{id}.in-process");
        net.add(&addr, &local);
        Node {
            id: id.to_string(),
            addr,
            dir: tempfile::tempdir().unwrap(),
            registry,
            local,
            supervisor,
            transports: Transports::in_process_as(net.clone(), &format!("{id}.in-process")),
            lease: {
                let l = Arc::new(Lease::default());
                l.renew(Instant::now(), Duration::from_secs(3600));
                l
            },
        }
    }

    /// Opens (or finds) the test shard's replica here, with `recent_log_bytes` of
    /// recent log, and gives it `role`.
    async fn open(&self, role: Role, recent_log_bytes: usize) -> Arc<Replication> {
        let key = key();
        let args = self.args(&key, recent_log_bytes);
        let repl = args.repl.clone();
        self.supervisor
            .cast(SupervisorMsg::Ensure(key.clone(), args))
            .unwrap();
        eventually(CALL, "the replica opened", || {
            self.registry.read().contains_key(&key)
        })
        .await;
        repl.set_role(role);
        repl
    }

    /// What the supervisor opens replica `key` with: its directory under this node's,
    /// and its replication (the hosted one's, or a new one).
    fn args(&self, key: &ReplicaKey, recent_log_bytes: usize) -> ReplicaArgs {
        let hosted = self.registry.read().get(key).map(|h| h.repl.clone());
        let repl = hosted.unwrap_or_else(|| {
            Replication::new(
                key.clone(),
                self.id.clone(),
                self.transports.clone(),
                recent_log_bytes,
                Arc::new(DiskGuard {
                    node: self.id.clone(),
                    dir: self.dir.path().to_path_buf(),
                    reserve: 0,
                }),
                self.lease.clone(),
                LAG,
            )
        });
        ReplicaArgs {
            dir: self.replica_dir(key),
            config: CollectionConfig::new(DIM, Metric::InnerProduct),
            repl,
            filling: false,
        }
    }

    fn replica_dir(&self, key: &ReplicaKey) -> std::path::PathBuf {
        self.dir
            .path()
            .join("shards")
            .join(format!("{}-{}", key.collection, key.collection_id))
            .join(key.index.to_string())
    }

    fn peer(&self, serving: bool, live: bool) -> Peer {
        Peer {
            node: self.id.clone(),
            addr: self.addr.clone(),
            serving,
            leaving: false,
            live,
        }
    }

    fn position(&self) -> (u64, u64) {
        self.try_position().expect("the replica is open")
    }

    /// The position, or None while the replica is closed (a snapshot being installed
    /// swaps the shard out for a moment).
    fn try_position(&self) -> Option<(u64, u64)> {
        let repl = self.registry.read()[&key()].repl.clone();
        repl.shard().ok().map(|s| s.last())
    }
}

fn key() -> ReplicaKey {
    ReplicaKey {
        collection: "c".into(),
        collection_id: 1,
        index: 0,
    }
}

fn shard_ref() -> Option<cpb::ShardId> {
    Some(cpb::ShardId {
        collection: "c".into(),
        collection_id: 1,
        index: 0,
    })
}

fn role(epoch: u64, primary: &Node, me: &Node, peers: Vec<Peer>, rf: u32) -> Role {
    Role {
        sealed: false,
        epoch,
        primary: primary.id.clone(),
        is_primary: primary.id == me.id,
        peers,
        replication_factor: rf,
        write_quorum: 0,
        forced: false,
        leaving: false,
    }
}

fn doc(i: u32) -> rpb::StoredDoc {
    let mut vector = vec![0.0f32; DIM];
    vector[(i as usize) % DIM] = 1.0;
    vector[(i as usize + 1) % DIM] = 0.5;
    rpb::StoredDoc {
        set_vector: Vec::new(),
        id: format!("d{i}"),
        text: String::new(),
        metadata_json: String::new(),
        vector,
    }
}

/// Writes docs `range` through `node`'s local handler, one batch per write.
async fn write(node: &Node, range: std::ops::Range<u32>) -> Result<u64, ReplicaError> {
    let mut seq = 0;
    for i in range {
        let r = node
            .local
            .write(
                rpb::WriteRequest {
                    set_tag: 0,
                    expect: Vec::new(),
                    shard_count: 0,
                    shard: shard_ref(),
                    upserts: vec![doc(i)],
                    deletes: vec![],
                    request_id: format!("w{i}"),
                },
                CALL,
            )
            .await?;
        seq = r.seq;
    }
    Ok(seq)
}

async fn get(node: &Node, id: &str) -> Result<bool, ReplicaError> {
    let r = node
        .local
        .get(
            rpb::ShardGetRequest {
                shard_count: 0,
                shard: shard_ref(),
                id: id.into(),
            },
            CALL,
        )
        .await?;
    Ok(r.found)
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nodes a (primary, epoch 1) and b (its backup) of the test shard, RF 2.
async fn primary_and_backup() -> (InProcessNet, Node, Node) {
    let net = InProcessNet::default();
    let (a, b) = (Node::start("a", &net).await, Node::start("b", &net).await);
    a.open(role(1, &a, &a, vec![b.peer(true, true)], 2), 1 << 20)
        .await;
    b.open(role(1, &a, &b, vec![a.peer(true, true)], 2), 1 << 20)
        .await;
    (net, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_acknowledged_once_its_backup_holds_it() {
    let (_net, a, b) = primary_and_backup().await;
    let seq = write(&a, 0..50).await.unwrap();
    assert_eq!(seq, 50);
    // Acknowledged: the backup already holds every batch, in the same epoch.
    assert_eq!(b.position(), (50, 1));
    let backup = b.registry.read()[&key()].repl.clone();
    eventually(CALL, "the backup caught up", || backup.caught_up()).await;
    assert!(get(&b, "d49").await.unwrap());
    // Through the same seam as over gRPC: the backup refuses writes (not its primary).
    let e = write(&b, 100..101).await.unwrap_err();
    assert!(matches!(e, ReplicaError::Unavailable(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_backup_catches_up_from_the_recent_log_then_by_snapshot() {
    for (recent, what) in [(64 << 20, "recent log"), (1, "snapshot")] {
        let net = InProcessNet::default();
        let (a, b, c) = (
            Node::start("a", &net).await,
            Node::start("b", &net).await,
            Node::start("c", &net).await,
        );
        let ra = role(1, &a, &a, vec![b.peer(true, true), c.peer(true, true)], 3);
        let pa = a.open(ra, recent).await;
        b.open(
            role(1, &a, &b, vec![a.peer(true, true), c.peer(true, true)], 3),
            recent,
        )
        .await;
        c.open(
            role(1, &a, &c, vec![a.peer(true, true), b.peer(true, true)], 3),
            recent,
        )
        .await;
        write(&a, 0..10).await.unwrap();
        assert_eq!(c.position(), (10, 1));
        // c is partitioned away and the map takes it out of the in-sync set: writes
        // go on with b.
        net.remove(&c.addr);
        pa.set_role(role(
            1,
            &a,
            &a,
            vec![b.peer(true, true), c.peer(false, false)],
            3,
        ));
        // The node's heartbeat, as in a cluster: c may have answered an Append just
        // before the cut and, caught up as a copy, been admitted to the quorum; cut
        // off, it then lags and the report drops it before the write times out.
        let beat = {
            let pa = pa.clone();
            tokio::spawn(async move {
                loop {
                    pa.in_sync_report();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        write(&a, 10..40).await.unwrap();
        beat.abort();
        assert_eq!(b.position(), (40, 1));
        assert_eq!(c.position(), (10, 1), "{what}: c was cut off");
        // The primary's index: a snapshot carries it (a copy answers by IVF-PQ at once).
        let small = shoal_engine::IvfPqParams {
            nlist: 2,
            m: 2,
            nbits: 4,
        };
        let built = pa.shard().unwrap().rebuild(Some(small)).unwrap();
        // Back (its node up, still a copy): c catches up without a write to prompt it,
        // and the primary reports it in sync.
        net.add(&c.addr, &c.local);
        pa.set_role(role(
            1,
            &a,
            &a,
            vec![b.peer(true, true), c.peer(false, true)],
            3,
        ));
        eventually(CALL, &format!("c catches up by {what}"), || {
            c.try_position().is_some_and(|p| p.0 == 40)
        })
        .await;
        eventually(CALL, "the primary reports c in sync", || {
            pa.in_sync_report().in_sync == ["c"]
        })
        .await;
        let rc = c.registry.read()[&key()].repl.clone();
        eventually(CALL, "c reads again", || rc.caught_up()).await;
        let serving = rc.shard().unwrap().stats().serving.map(|g| g.id);
        if recent == 1 {
            assert_eq!(serving, Some(built.id), "the snapshot carried the index");
        } else {
            assert_eq!(serving, None, "the log carries writes, not indexes");
        }
        for i in [0, 10, 39] {
            assert!(
                get(&c, &format!("d{i}")).await.unwrap(),
                "{what}: d{i} on c"
            );
        }
    }
}

/// Issue 16: a snapshot transfer that breaks partway resumes where it broke. The
/// primary's recent log holds nothing, so a new copy is filled by snapshot; the stream
/// resets after every third chunk (1 MiB each) until the copy has staged 2 MiB, then
/// the link heals: the last transfer carries only what was not staged (checked against
/// the bytes that crossed the link), and the copy ends with every document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_snapshot_transfer_resumes_where_it_broke() {
    let net = InProcessNet::default();
    let (a, b) = (Node::start("a", &net).await, Node::start("b", &net).await);
    let pa = a.open(role(1, &a, &a, vec![], 1), 1).await;
    // About 6 MB of documents (300-byte texts), in batches of 500.
    for batch in 0..40u32 {
        let upserts = (batch * 500..(batch + 1) * 500)
            .map(|i| rpb::StoredDoc {
                set_vector: Vec::new(),
                text: format!("{i:0300}"),
                ..doc(i)
            })
            .collect();
        a.local
            .write(
                rpb::WriteRequest {
                    set_tag: 0,
                    expect: Vec::new(),
                    shard_count: 0,
                    shard: shard_ref(),
                    upserts,
                    deletes: vec![],
                    request_id: format!("b{batch}"),
                },
                CALL,
            )
            .await
            .unwrap();
    }
    let carried = net.faults().snapshot_bytes.clone();
    net.faults().snapshot_breaks_after = Some(3);
    let rb = b
        .open(role(1, &a, &b, vec![a.peer(true, true)], 2), 1)
        .await;
    pa.set_role(role(1, &a, &a, vec![b.peer(false, true)], 2));
    let staged = |files: &[rpb::StagedFile]| files.iter().map(|f| f.bytes).sum::<u64>();
    let t = Instant::now();
    let before = loop {
        let s = b
            .local
            .snapshot_staged_now(rpb::SnapshotStagedRequest {
                shard: shard_ref(),
                epoch: 1,
                primary: "a".into(),
            })
            .await
            .unwrap();
        if staged(&s.files) >= 2 << 20 {
            break staged(&s.files);
        }
        assert!(t.elapsed() < CALL, "nothing staged: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        rb.shard().map(|s| s.last().0).ok(),
        Some(0),
        "a broken transfer installed nothing"
    );
    // Heal; count what crosses from now on (a transfer in flight may still break once
    // more, staging more).
    let at_heal = {
        let mut f = net.faults();
        f.snapshot_breaks_after = None;
        carried.load(std::sync::atomic::Ordering::Relaxed)
    };
    let last = pa.shard().unwrap().last();
    // (Closed for a moment while the snapshot is swapped in.)
    eventually(CALL, "b installs the snapshot", || {
        rb.shard().map(|s| s.last()).ok() == Some(last)
    })
    .await;
    let after_heal = carried.load(std::sync::atomic::Ordering::Relaxed) - at_heal;
    let total: u64 = a.registry.read()[&key()]
        .repl
        .shard()
        .unwrap()
        .snapshot()
        .unwrap()
        .files
        .iter()
        .map(|(_, n, _)| n)
        .sum();
    eprintln!(
        "snapshot {total} B: {before} B staged before the heal, {after_heal} B carried after it"
    );
    assert!(
        after_heal + before <= total + (3 << 20),
        "the healed transfer carried {after_heal} B of {total} B with {before} B staged"
    );
    assert!(
        after_heal < total,
        "resent from byte 0: {after_heal} of {total} B"
    );
    eventually(CALL, "b reads again", || rb.caught_up()).await;
    for i in [0, 7_777, 19_999] {
        assert!(get(&b, &format!("d{i}")).await.unwrap(), "d{i} on b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_primary_cannot_acknowledge_a_write() {
    let (_net, a, b) = primary_and_backup().await;
    let rb = b.registry.read()[&key()].repl.clone();
    write(&a, 0..5).await.unwrap();
    // The map promotes b (epoch 2); a has not heard of it yet and still thinks it leads.
    rb.set_role(role(2, &b, &b, vec![a.peer(true, true)], 2));
    write(&b, 5..10).await.unwrap();
    assert_eq!(b.position(), (10, 2));
    let e = write(&a, 100..101).await.unwrap_err();
    assert!(
        matches!(
            e,
            ReplicaError::Unavailable(_) | ReplicaError::StaleEpoch(_)
        ),
        "{e:?}"
    );
    // b's epoch-2 batches reached a as its backup; nothing of a's refused write did.
    eventually(CALL, "a follows the new primary", || {
        a.try_position() == Some((10, 2))
    })
    .await;
    assert!(!get(&b, "d100").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_its_lease_acknowledges_nothing() {
    let (net, a, b) = primary_and_backup().await;
    write(&a, 0..5).await.unwrap();
    let refused = |e: ReplicaError| matches!(e, ReplicaError::Unavailable(ref m) if m.contains("holds no lease"));
    // Declared down (or never answered): refused before anything is logged.
    a.lease.revoke();
    let e = write(&a, 5..6).await.unwrap_err();
    assert!(refused(e.clone()), "{e:?}");
    assert_eq!(a.position(), (5, 1), "nothing logged without the lease");
    // Renewed: writes go on.
    a.lease.renew(Instant::now(), Duration::from_secs(3600));
    assert_eq!(write(&a, 5..6).await.unwrap(), 6);
    // The lease lapses while the quorum is gathered (b cut off for 600 ms, the lease
    // 300 ms): logged and replicated, but not acknowledged.
    a.lease.revoke();
    a.lease.renew(Instant::now(), Duration::from_millis(300));
    net.remove(&b.addr);
    let (r, ()) = tokio::join!(write(&a, 6..7), async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        net.add(&b.addr, &b.local);
    });
    let e = r.unwrap_err();
    assert!(refused(e.clone()), "{e:?}");
    assert_eq!(a.position(), (7, 1));
    eventually(CALL, "b holds the unacknowledged write", || {
        b.try_position() == Some((7, 1))
    })
    .await;
    // The client's retry with the same request id, once the lease is back, is answered
    // from the first attempt: applied once.
    a.lease.renew(Instant::now(), Duration::from_secs(3600));
    assert_eq!(write(&a, 6..7).await.unwrap(), 7);
    assert_eq!(a.position(), (7, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_behind_its_backups_overwrites_nothing_and_takes_no_writes() {
    let net = InProcessNet::default();
    let (a, b, c) = (
        Node::start("a", &net).await,
        Node::start("b", &net).await,
        Node::start("c", &net).await,
    );
    // Epoch 1: a leads with b; c is away (down, out of the in-sync set) and holds
    // nothing.
    a.open(
        role(1, &a, &a, vec![b.peer(true, true), c.peer(false, false)], 3),
        1 << 20,
    )
    .await;
    b.open(
        role(1, &a, &b, vec![a.peer(true, true), c.peer(false, false)], 3),
        1 << 20,
    )
    .await;
    write(&a, 0..20).await.unwrap();
    // A wrong promotion (what the map's successor rule exists to prevent): c, empty,
    // leads epoch 2. Its probes find a and b ahead: nothing is overwritten.
    let rc = c
        .open(
            role(2, &c, &c, vec![a.peer(true, true), b.peer(true, true)], 3),
            1 << 20,
        )
        .await;
    eventually(CALL, "c reports a replica ahead", || rc.ahead().is_some()).await;
    let e = write(&c, 100..101).await.unwrap_err();
    assert!(matches!(e, ReplicaError::Unavailable(_)), "{e:?}");
    assert_eq!(a.position(), (20, 1));
    assert_eq!(b.position(), (20, 1));
    assert!(get(&a, "d19").await.unwrap());
}

/// Issue 16, the in-sync rule: a write waits for every in-sync backup, even one the map
/// no longer counts as live; the primary reports it lagging after the lag timeout, and
/// only the map's change (taking it out of the set) lets writes go on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_for_every_in_sync_backup_until_the_map_takes_it_out() {
    let net = InProcessNet::default();
    let (a, b, c) = (
        Node::start("a", &net).await,
        Node::start("b", &net).await,
        Node::start("c", &net).await,
    );
    let with = |bc: (bool, bool)| vec![b.peer(true, true), c.peer(bc.0, bc.1)];
    let pa = a
        .open(role(1, &a, &a, with((true, true)), 3), 1 << 20)
        .await;
    b.open(
        role(1, &a, &b, vec![a.peer(true, true), c.peer(true, true)], 3),
        1 << 20,
    )
    .await;
    c.open(
        role(1, &a, &c, vec![a.peer(true, true), b.peer(true, true)], 3),
        1 << 20,
    )
    .await;
    write(&a, 0..5).await.unwrap();
    assert_eq!(c.position(), (5, 1));
    // c is cut off; its node even turns suspect in the map. Still in sync: the write
    // is logged and held by b, but not acknowledged.
    net.remove(&c.addr);
    pa.set_role(role(1, &a, &a, with((true, false)), 3));
    let pending = tokio::spawn({
        let local = a.local.clone();
        async move {
            local
                .write(
                    rpb::WriteRequest {
                        set_tag: 0,
                        expect: Vec::new(),
                        shard_count: 0,
                        shard: shard_ref(),
                        upserts: vec![doc(5)],
                        deletes: vec![],
                        request_id: "w5".into(),
                    },
                    CALL,
                )
                .await
        }
    });
    // The heartbeat's report starts the lag clock (c is behind the primary's last).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(pa.in_sync_report().lagging.is_empty(), "not lagging yet");
    tokio::time::sleep(LAG * 3).await;
    assert!(
        !pending.is_finished(),
        "acknowledged without an in-sync backup"
    );
    assert_eq!(b.position(), (6, 1));
    // The primary asks for c to leave the set; the coordinators' change takes it out
    // and the write is acknowledged by the two copies left.
    assert_eq!(pa.in_sync_report().lagging, ["c"]);
    pa.set_role(role(1, &a, &a, with((false, false)), 3));
    let r = tokio::time::timeout(CALL, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((r.seq, r.replicas), (6, 2));
    // Out of the set, c holds nothing new; writes need two in-sync copies, so with b
    // out too they are refused, not acknowledged by the primary alone.
    assert_eq!(c.position(), (5, 1));
    pa.set_role(role(
        1,
        &a,
        &a,
        vec![b.peer(false, true), c.peer(false, false)],
        3,
    ));
    let e = write(&a, 6..7).await.unwrap_err();
    assert!(
        matches!(e, ReplicaError::Unavailable(ref m) if m.contains("in-sync")),
        "{e:?}"
    );
}

/// Issue 16: a copy joins the write quorum before the map counts it in sync. Once the
/// primary has caught it up it waits for it on every write, and reports it only once it
/// holds everything logged at that moment; an admitted copy that falls behind before it
/// was reported is dropped again, so it never holds writes up for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_waited_for_before_the_map_counts_it_in_sync() {
    let net = InProcessNet::default();
    let (a, b, c) = (
        Node::start("a", &net).await,
        Node::start("b", &net).await,
        Node::start("c", &net).await,
    );
    let copy = vec![b.peer(true, true), c.peer(false, true)];
    let pa = a.open(role(1, &a, &a, copy.clone(), 3), 1 << 20).await;
    b.open(
        role(1, &a, &b, vec![a.peer(true, true), c.peer(false, true)], 3),
        1 << 20,
    )
    .await;
    // c starts cut off: writes go on with b alone (c is a copy).
    net.remove(&c.addr);
    write(&a, 0..10).await.unwrap();
    assert!(pa.in_sync_report().in_sync.is_empty());
    // c opens and is reachable: caught up, admitted, reported.
    c.open(
        role(1, &a, &c, vec![a.peer(true, true), b.peer(true, true)], 3),
        1 << 20,
    )
    .await;
    net.add(&c.addr, &c.local);
    eventually(CALL, "c reported in sync", || {
        pa.in_sync_report().in_sync == ["c"]
    })
    .await;
    // From now on every acknowledged write is on c, though the map still calls it a copy.
    write(&a, 10..20).await.unwrap();
    assert_eq!(c.position(), (20, 1));
    // Reported, c stays in the quorum until the map changes: cut off, a write waits.
    net.remove(&c.addr);
    let e = tokio::time::timeout(LAG * 3, write(&a, 20..21)).await;
    assert!(
        e.is_err(),
        "acknowledged without a copy reported in sync: {e:?}"
    );
    // A new epoch starts admissions afresh: c (a copy again, still cut off) is not
    // waited for.
    pa.set_role(role(2, &a, &a, copy.clone(), 3));
    b.open(
        role(2, &a, &b, vec![a.peer(true, true), c.peer(false, true)], 3),
        1 << 20,
    )
    .await;
    assert_eq!(write(&a, 21..22).await.unwrap(), 22);
}

// ---------------------------------------------------------------------------------
// Seeded fault schedules (issue 16): three nodes of one RF 3 shard driven by the real
// cluster map (`shoal_coordinator::map`), each node applying the map's roles when its
// (randomly late) watch delivers them, over a network that loses requests and replies,
// delays messages and has links cut one way. Writes go to random nodes; the
// coordinators' duties run as the leader runs them: the primary's in-sync reports
// (taken only at the map's epoch), backups on nodes away leaving the set, failovers
// that first take the primary's lease (as its expiry does before the down timeout)
// and promote any serving replica on a live node (by reports up to a heartbeat old,
// any may look most up to date), a primary behind a replica handing over to it. At the end everything heals and settles, then: every
// acknowledged write is on every replica, and no write was acknowledged by a primary
// after a newer epoch of the shard was committed. `SHOAL_SCHEDULES` sets how many
// (default 16), `SHOAL_SCHEDULE_SEED` the first seed.
// ---------------------------------------------------------------------------------

mod schedules {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use shoal_coordinator::map::{
        Capacity, ClusterMap, CollectionSpec, Command, IndexParams, NodeState,
        ReplicaState as MapState, ShardKey,
    };

    fn shard_key() -> ShardKey {
        ShardKey {
            collection: "c".into(),
            index: 0,
        }
    }

    struct Sim {
        nodes: Vec<Node>,
        map: ClusterMap,
        /// Whether the coordinators hear each node (a node "away" is declared down).
        up: Vec<bool>,
        /// The map version each node applied last.
        seen: Vec<u64>,
        /// The collection's write quorum (0 = the default).
        write_quorum: u32,
        /// Each committed epoch: its primary, when, and the primary it deposed after
        /// taking its lease (a failover; `None` for planned changes).
        epochs: Vec<(u64, String, Instant, Option<String>)>,
        /// The primary whose lease the next promotion follows.
        fencing: Option<String>,
    }

    impl Sim {
        fn idx(&self, id: &str) -> usize {
            self.nodes.iter().position(|n| n.id == id).unwrap()
        }

        fn repl(&self, i: usize) -> Arc<Replication> {
            self.nodes[i].registry.read()[&key()].repl.clone()
        }

        fn role_for(&self, i: usize) -> Role {
            let s = &self.map.shards[&shard_key()];
            let me = &self.nodes[i];
            let peers = s
                .replicas
                .iter()
                .filter(|r| r.node != me.id)
                .map(|r| {
                    let j = self.idx(&r.node);
                    Peer {
                        leaving: r.state == MapState::Leaving,
                        ..self.nodes[j].peer(r.state == MapState::Serving, self.up[j])
                    }
                })
                .collect();
            Role {
                sealed: false,
                epoch: s.epoch,
                primary: s.primary.clone().unwrap_or_default(),
                is_primary: s.primary.as_deref() == Some(me.id.as_str()),
                peers,
                replication_factor: 3,
                write_quorum: self.write_quorum,
                forced: false,
                leaving: s
                    .replicas
                    .iter()
                    .any(|r| r.node == me.id && r.state == MapState::Leaving),
            }
        }

        /// Node `i`'s map watch delivers the current map: its replica takes the role,
        /// and lease grants answered at this version take effect.
        fn deliver(&mut self, i: usize) {
            if self.seen[i] < self.map.version {
                self.repl(i).set_role(self.role_for(i));
                self.seen[i] = self.map.version;
                self.nodes[i].lease.applied(self.map.version);
            }
        }

        fn apply(&mut self, cmd: Command) -> bool {
            let epoch = self.map.shards[&shard_key()].epoch;
            let ok = self.map.apply(&cmd).is_ok();
            let s = &self.map.shards[&shard_key()];
            if s.epoch > epoch {
                self.epochs.push((
                    s.epoch,
                    s.primary.clone().unwrap_or_default(),
                    Instant::now(),
                    self.fencing.clone(),
                ));
            }
            ok
        }

        fn position(&self, id: &str) -> Option<(u64, u64)> {
            let i = self.idx(id);
            if !self.up[i] {
                return None;
            }
            let (seq, epoch) = self.repl(i).shard().ok()?.last();
            Some((epoch, seq))
        }

        /// The primary's heartbeat: its in-sync asks (at the map's epoch only) and a
        /// replica found ahead of it.
        fn primary_reports(&mut self) {
            let s = self.map.shards[&shard_key()].clone();
            let Some(p) = s.primary.clone() else { return };
            let i = self.idx(&p);
            if !self.up[i] {
                return;
            }
            let r = self.repl(i);
            if r.known_epoch() != s.epoch {
                return;
            }
            let report = r.in_sync_report();
            for n in report.lagging {
                self.apply(Command::LeaveInSync {
                    shard: shard_key(),
                    node: n,
                    epoch: s.epoch,
                });
            }
            for n in report.in_sync {
                self.apply(Command::JoinInSync {
                    shard: shard_key(),
                    node: n,
                    epoch: s.epoch,
                });
            }
            if r.ahead().is_some() {
                let own = self.position(&p);
                let map = self.map.clone();
                let s = &map.shards[&shard_key()];
                if let Some((to, pos)) =
                    shoal_coordinator::placement::successor(&map, s, |n| self.position(n))
                {
                    if Some(pos) > own {
                        self.apply(Command::Promote {
                            shard: shard_key(),
                            node: to,
                            epoch: s.epoch,
                        });
                    }
                }
            }
        }

        /// Node `i` goes away: the coordinators declare it down (its lease is gone
        /// before), its backup replica leaves the in-sync set where the write quorum
        /// allows, and a primary there is replaced by a serving replica on a live node:
        /// `pick` chooses which. The coordinators choose the most up-to-date by reports
        /// up to a heartbeat old, so any serving replica may look most up to date; the
        /// in-sync rule must make every such choice safe.
        async fn down(&mut self, i: usize, pick: usize) {
            self.nodes[i].lease.revoke();
            // The lease's lapse precedes the down timeout by seconds in a cluster; any
            // acknowledgement decided before the revocation has returned by now.
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.up[i] = false;
            let id = self.nodes[i].id.clone();
            self.map.nodes.get_mut(&id).unwrap().state = NodeState::Down;
            let s = self.map.shards[&shard_key()].clone();
            if s.primary.as_deref() == Some(id.as_str()) {
                let candidates: Vec<String> = s
                    .replicas
                    .iter()
                    .filter(|r| r.node != id && r.state == MapState::Serving)
                    .filter(|r| self.position(&r.node).is_some())
                    .map(|r| r.node.clone())
                    .collect();
                if !candidates.is_empty() {
                    self.fencing = Some(id.clone());
                    self.apply(Command::Promote {
                        shard: shard_key(),
                        node: candidates[pick % candidates.len()].clone(),
                        epoch: s.epoch,
                    });
                    self.fencing = None;
                }
            } else {
                self.apply(Command::LeaveInSync {
                    shard: shard_key(),
                    node: id,
                    epoch: s.epoch,
                });
            }
        }

        /// A planned move of the primary role (an operator's promote, evening out
        /// primaries) to the serving replica `pick` chooses, as the leader asks it: the
        /// primary stops its writes, waits until the successor holds every write it
        /// logged, and the leader promotes the successor if the primary still leads
        /// at that epoch. The old primary is fenced by its own handover: the strict
        /// check below covers it.
        async fn hand_over(&mut self, pick: usize) {
            let s = self.map.shards[&shard_key()].clone();
            let Some(p) = s.primary.clone() else { return };
            let i = self.idx(&p);
            let candidates: Vec<String> = s
                .replicas
                .iter()
                .filter(|r| r.node != p && r.state == MapState::Serving)
                .filter(|r| self.up[self.idx(&r.node)])
                .map(|r| r.node.clone())
                .collect();
            if !self.up[i] || candidates.is_empty() {
                return;
            }
            let to = candidates[pick % candidates.len()].clone();
            let r = self.repl(i);
            match r
                .prepare_handover(Duration::from_millis(300), Some(&to))
                .await
            {
                Some(h) if h.epoch == self.map.shards[&shard_key()].epoch => {
                    self.fencing = Some(p);
                    self.apply(Command::Promote {
                        shard: shard_key(),
                        node: to,
                        epoch: h.epoch,
                    });
                    self.fencing = None;
                }
                _ => r.cancel_handover(),
            }
        }

        fn back(&mut self, i: usize) {
            self.up[i] = true;
            let id = self.nodes[i].id.clone();
            self.map.nodes.get_mut(&id).unwrap().state = NodeState::Up;
            self.map.version += 1;
            // Its heartbeat answered at this map version: the lease holds once the
            // node has applied it.
            self.nodes[i].lease.renew_at(
                Instant::now(),
                Duration::from_secs(3600),
                self.map.version,
            );
        }
    }

    async fn start(seed: u64, write_quorum: u32) -> (InProcessNet, Sim) {
        let net = InProcessNet::default();
        *net.faults() = Faults::seeded(seed);
        let mut nodes = Vec::new();
        for id in ["a", "b", "c"] {
            nodes.push(Node::start(id, &net).await);
        }
        let mut map = ClusterMap::default();
        for n in &nodes {
            map.apply(&Command::RegisterNode {
                id: n.id.clone(),
                addr: n.addr.clone(),
                capacity: Capacity::default(),
                volume: "v".into(),
            })
            .unwrap();
            map.apply(&Command::SetNodeState {
                id: n.id.clone(),
                state: NodeState::Up,
                from: vec![],
            })
            .unwrap();
        }
        map.apply(&Command::CreateCollectionPlaced {
            spec: CollectionSpec {
                name: "c".into(),
                dimension: DIM as u32,
                metric: Metric::InnerProduct,
                encoder: None,
                index: IndexParams::defaults(DIM as u32),
                shard_count: 1,
                replication_factor: 3,
                replica_memory_bytes: 1 << 20,
                write_quorum,
            },
            placement: vec![vec!["a".into(), "b".into(), "c".into()]],
        })
        .unwrap();
        let mut sim = Sim {
            nodes,
            map,
            up: vec![true; 3],
            seen: vec![0; 3],
            epochs: Vec::new(),
            fencing: None,
            write_quorum,
        };
        let s = sim.map.shards[&shard_key()].clone();
        sim.epochs
            .push((s.epoch, s.primary.clone().unwrap(), Instant::now(), None));
        for i in 0..3 {
            let role = sim.role_for(i);
            sim.nodes[i].open(role, 1 << 20).await;
            sim.seen[i] = sim.map.version;
        }
        (net, sim)
    }

    /// One schedule, for a collection of `write_quorum`; returns (writes acknowledged,
    /// epochs, writes sent).
    async fn run(seed: u64, steps: usize, write_quorum: u32) -> (usize, u64, usize) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (net, mut sim) = start(seed, write_quorum).await;
        {
            let mut f = net.faults();
            f.lose_request = 0.02;
            f.lose_reply = 0.02;
            f.max_delay = Duration::from_millis(3);
        }
        let acks: Arc<std::sync::Mutex<Vec<(u32, String, Instant)>>> = Arc::default();
        let mut writes = Vec::new();
        let mut next_doc = 0u32;
        for _ in 0..steps {
            match rng.random_range(0..100) {
                0..40 => {
                    let i = rng.random_range(0..3);
                    let (local, id, acks) = (
                        sim.nodes[i].local.clone(),
                        sim.nodes[i].id.clone(),
                        acks.clone(),
                    );
                    let d = next_doc;
                    next_doc += 1;
                    writes.push(tokio::spawn(async move {
                        let r = local
                            .write(
                                rpb::WriteRequest {
                                    set_tag: 0,
                                    expect: Vec::new(),
                                    shard_count: 0,
                                    shard: shard_ref(),
                                    upserts: vec![doc(d)],
                                    deletes: vec![],
                                    request_id: format!("w{d}"),
                                },
                                Duration::from_secs(3),
                            )
                            .await;
                        if r.is_ok() {
                            acks.lock().unwrap().push((d, id, Instant::now()));
                        }
                    }));
                }
                40..55 => {
                    let (x, y) = (rng.random_range(0..3), rng.random_range(0..3));
                    if x != y {
                        let (a, b) = (sim.nodes[x].addr.clone(), sim.nodes[y].addr.clone());
                        net.faults().cut_one_way(&a, &b);
                    }
                }
                55..65 => {
                    if rng.random_bool(0.3) {
                        net.faults().heal_all();
                    } else {
                        let (x, y) = (rng.random_range(0..3), rng.random_range(0..3));
                        let (a, b) = (sim.nodes[x].addr.clone(), sim.nodes[y].addr.clone());
                        net.faults().heal_one_way(&a, &b);
                        net.faults().heal_one_way(&b, &a);
                    }
                }
                65..82 => sim.primary_reports(),
                82..88 => {
                    let i = rng.random_range(0..3);
                    // Up to two nodes away at once (the shard then takes no writes).
                    if sim.up[i] && sim.up.iter().filter(|u| !**u).count() < 2 {
                        let pick = rng.random_range(0..2);
                        sim.down(i, pick).await;
                    }
                }
                88..92 => {
                    if let Some(i) = sim.up.iter().position(|u| !*u) {
                        sim.back(i);
                    }
                }
                92..95 => sim.hand_over(rng.random_range(0..2)).await,
                _ => {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
                }
            }
            for i in 0..3 {
                if rng.random_bool(0.5) {
                    sim.deliver(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Heal, bring everything back, let the writes finish and the set settle.
        {
            let mut f = net.faults();
            f.heal_all();
            f.lose_request = 0.0;
            f.lose_reply = 0.0;
            f.max_delay = Duration::ZERO;
        }
        while let Some(i) = sim.up.iter().position(|u| !*u) {
            sim.back(i);
        }
        for w in writes {
            w.await.unwrap();
        }
        let t = Instant::now();
        loop {
            for i in 0..3 {
                sim.deliver(i);
            }
            sim.primary_reports();
            let s = sim.map.shards[&shard_key()].clone();
            let positions: Vec<_> = (0..3)
                .map(|i| sim.repl(i).shard().map(|s| s.last()).ok())
                .collect();
            if s.replicas.iter().all(|r| r.state == MapState::Serving)
                && positions.iter().all(|p| p.is_some() && *p == positions[0])
                && (0..3).all(|i| sim.repl(i).caught_up())
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "seed {seed}: did not settle: {s:?} {positions:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let acks = acks.lock().unwrap().clone();
        for (d, _, _) in &acks {
            for n in &sim.nodes {
                assert!(
                    get(n, &format!("d{d}")).await.unwrap(),
                    "seed {seed}: acknowledged d{d} missing on {}",
                    n.id
                );
            }
        }
        // No acknowledgement from a primary after a failover (its lease taken first) or
        // its own handover deposed it, unless it was promoted again since. (After the
        // map's own changes, the ahead rule, a primary that has not yet heard of it may
        // still acknowledge, but only writes its successor holds: the in-sync rule,
        // checked above.)
        for (d, by, at) in &acks {
            let before: Vec<_> = sim.epochs.iter().filter(|e| e.2 <= *at).collect();
            let led = before.iter().rposition(|e| &e.1 == by);
            let fenced = before
                .iter()
                .enumerate()
                .find(|(k, e)| led.is_none_or(|l| *k > l) && e.3.as_ref() == Some(by));
            assert!(
                fenced.is_none(),
                "seed {seed}: d{d} acknowledged by {by} after epoch {} replaced it",
                fenced.unwrap().1 .0
            );
        }
        let epoch = sim.map.shards[&shard_key()].epoch;
        (acks.len(), epoch, next_doc as usize)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_writes_survive_seeded_fault_schedules() {
        let n: u64 = std::env::var("SHOAL_SCHEDULES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let first: u64 = std::env::var("SHOAL_SCHEDULE_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let t = Instant::now();
        let (mut acked, mut sent, mut epochs) = (0, 0, 0);
        // Every fourth schedule with an explicit quorum of 1 (the primary alone once
        // both backups left the set), one in four with 3 (no backup may leave).
        for seed in first..first + n {
            let q = [0, 1, 0, 3][(seed % 4) as usize];
            let (a, e, s) = run(seed, 150, q).await;
            acked += a;
            sent += s;
            epochs += e;
        }
        println!(
            "{{\"schedules\":{n},\"writes\":{sent},\"acknowledged\":{acked},\"epochs\":{epochs},\"took_s\":{:.1}}}",
            t.elapsed().as_secs_f64()
        );
        assert!(acked > 0, "no write was acknowledged in any schedule");
    }
}

/// Replicas of a node open concurrently, off the supervisor's message loop: one whose
/// open is stuck (its manifest a FIFO nobody has written yet) does not hold up another
/// replica's open, and a close asked for meanwhile is carried out once that open ends
/// (the reply waits for it; the replica is not left hosted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_open_holds_up_no_other_replica_and_a_close_waits_for_it() {
    let net = InProcessNet::default();
    let n = Node::start("a", &net).await;
    // A real shard's files, its manifest to be delivered through a FIFO.
    let stuck = ReplicaKey {
        collection: "c".into(),
        collection_id: 1,
        index: 7,
    };
    let dir = n.replica_dir(&stuck);
    let made = tempfile::tempdir().unwrap();
    drop(
        shoal_engine::Shard::create(
            made.path(),
            CollectionConfig::new(DIM, Metric::InnerProduct),
        )
        .unwrap(),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = Vec::new();
    for e in std::fs::read_dir(made.path()).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "manifest.json" {
            manifest = std::fs::read(e.path()).unwrap();
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    assert!(!manifest.is_empty());
    let fifo = dir.join("manifest.json");
    let made_fifo = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made_fifo.success());
    n.supervisor
        .cast(SupervisorMsg::Ensure(
            stuck.clone(),
            n.args(&stuck, 1 << 20),
        ))
        .unwrap();

    // Another replica opens while that one is stuck.
    n.open(role(1, &n, &n, vec![], 1), 1 << 20).await;
    assert!(
        !n.registry.read().contains_key(&stuck),
        "the stuck open has not ended"
    );

    // A close of the opening replica waits for its open.
    let sup = n.supervisor.clone();
    let closing = stuck.clone();
    let close = tokio::spawn(async move {
        sup.call(|p| SupervisorMsg::Close(closing, false, p), Some(CALL))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!close.is_finished(), "the close waits for the open");
    tokio::task::spawn_blocking(move || std::fs::write(&fifo, manifest))
        .await
        .unwrap()
        .unwrap();
    let closed = close.await.unwrap().unwrap();
    assert!(matches!(closed, ractor::rpc::CallResult::Success(())));
    assert!(
        !n.registry.read().contains_key(&stuck),
        "closed once opened"
    );
    assert!(
        n.registry.read().contains_key(&key()),
        "the other replica is untouched"
    );
    // Opened for real (then closed, its files kept): it opens again.
    n.supervisor
        .cast(SupervisorMsg::Ensure(
            stuck.clone(),
            n.args(&stuck, 1 << 20),
        ))
        .unwrap();
    eventually(CALL, "the replica opened again", || {
        n.registry.read().contains_key(&stuck)
    })
    .await;
}
