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
use shoal_node::cluster::transport::{InProcessNet, LocalReplicas, ReplicaApi, Transports};
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
        let (supervisor, _) =
            Actor::spawn(None, ReplicaSupervisor, (registry.clone(), Arc::default()))
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
            transports: Transports::in_process(net.clone()),
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
        let hosted = self.registry.read().get(&key).map(|h| h.repl.clone());
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
        let args = ReplicaArgs {
            dir: self.dir.path().join("shards").join("c-1").join("0"),
            config: CollectionConfig::new(DIM, Metric::InnerProduct),
            repl: repl.clone(),
            filling: false,
        };
        let r = self
            .supervisor
            .call(|p| SupervisorMsg::Ensure(key, args, p), Some(CALL))
            .await
            .unwrap();
        assert!(matches!(r, ractor::rpc::CallResult::Success(Ok(()))));
        repl.set_role(role);
        repl
    }

    fn peer(&self, serving: bool, live: bool) -> Peer {
        Peer {
            node: self.id.clone(),
            addr: self.addr.clone(),
            serving,
            live,
        }
    }

    fn position(&self) -> (u64, u64) {
        self.registry.read()[&key()].repl.shard().unwrap().last()
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
        epoch,
        primary: primary.id.clone(),
        is_primary: primary.id == me.id,
        peers,
        replication_factor: rf,
        write_quorum: 0,
        forced: false,
    }
}

fn doc(i: u32) -> rpb::StoredDoc {
    let mut vector = vec![0.0f32; DIM];
    vector[(i as usize) % DIM] = 1.0;
    vector[(i as usize + 1) % DIM] = 0.5;
    rpb::StoredDoc {
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
        write(&a, 10..40).await.unwrap();
        assert_eq!(b.position(), (40, 1));
        assert_eq!(c.position(), (10, 1), "{what}: c was cut off");
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
            c.position().0 == 40
        })
        .await;
        eventually(CALL, "the primary reports c in sync", || {
            pa.in_sync_report().in_sync == ["c"]
        })
        .await;
        let rc = c.registry.read()[&key()].repl.clone();
        eventually(CALL, "c reads again", || rc.caught_up()).await;
        for i in [0, 10, 39] {
            assert!(
                get(&c, &format!("d{i}")).await.unwrap(),
                "{what}: d{i} on c"
            );
        }
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
        a.position() == (10, 2)
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
        b.position() == (7, 1)
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
