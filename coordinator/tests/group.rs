//! Coordinator groups of three members in-process, over real loopback gRPC, with their
//! Raft logs and snapshots on disk: election, commit, failover, full restart, catch-up
//! by snapshot, forwarding, API errors, watch, node liveness with re-assignment, and
//! grpc.health turning NOT_SERVING once a member's Raft core stops.

use shoal_coordinator::testing::{eventually, free_port};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shoal_coordinator::map::ClusterMap;
use shoal_coordinator::{start, Config, Handle, Peer};
use shoal_proto::auth::Role;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use tokio::sync::Mutex;
use tonic::Code;

/// Groups share two cores: run one test at a time so election timing is what we test.
static SERIAL: Mutex<()> = Mutex::const_new(());

struct Group {
    _dir: tempfile::TempDir,
    configs: Vec<Config>,
    members: Vec<Option<Handle>>,
}

impl Group {
    async fn start(tweak: impl Fn(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let peers: Vec<Peer> = (1..=3)
            .map(|id| Peer {
                id,
                raft_addr: format!("127.0.0.1:{}", free_port()),
                api_addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let configs: Vec<Config> = peers
            .iter()
            .map(|p| {
                let mut c = Config {
                    id: p.id,
                    listen: p.api_addr.clone(),
                    raft_listen: p.raft_addr.clone(),
                    data_dir: dir.path().join(format!("c{}", p.id)),
                    peers: peers.clone(),
                    ..Config::default()
                };
                tweak(&mut c);
                c
            })
            .collect();
        let mut g = Group {
            _dir: dir,
            configs,
            members: vec![None, None, None],
        };
        for i in 0..3 {
            g.start_member(i).await;
        }
        g
    }

    async fn start_member(&mut self, i: usize) {
        self.members[i] = Some(start(self.configs[i].clone()).await.expect("member starts"));
    }

    async fn stop_member(&mut self, i: usize) {
        if let Some(h) = self.members[i].take() {
            h.shutdown().await;
        }
    }

    fn client(&self) -> Client {
        Client::new(self.configs.iter().map(|c| c.listen.clone()))
    }

    fn handle(&self, i: usize) -> &Handle {
        self.members[i].as_ref().expect("running")
    }

    /// Index of the member all running members agree leads, once they do.
    async fn leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let leaders: BTreeSet<Option<u64>> = self
                .members
                .iter()
                .flatten()
                .map(|h| h.coordinator.raft.metrics().borrow().current_leader)
                .collect();
            if let [Some(l)] = leaders.iter().cloned().collect::<Vec<_>>()[..] {
                let i = (l - 1) as usize;
                if self.members[i].is_some() {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn map(&self, i: usize) -> ClusterMap {
        self.handle(i).coordinator.sm.state.lock().map.clone()
    }

    async fn wait_applied(&self, i: usize, index: u64) {
        self.handle(i)
            .coordinator
            .raft
            .wait(Some(Duration::from_secs(20)))
            .applied_index_at_least(Some(index), "catch up")
            .await
            .expect("member catches up");
    }

    fn applied(&self, i: usize) -> u64 {
        let m = self.handle(i).coordinator.raft.metrics().borrow().clone();
        m.last_applied.map_or(0, |l| l.index)
    }
}

async fn register_up(client: &mut Client, id: &str, zone: &str) {
    let req = cpb::RegisterNodeRequest {
        id: id.into(),
        addr: format!("127.0.0.1:{}", free_port()),
        capacity: Some(cpb::Capacity {
            memory_bytes: 0,
            gpu: false,
            zone: zone.into(),
        }),
        ..Default::default()
    };
    client
        .cluster(|mut c| {
            let r = req.clone();
            async move { c.register_node(r).await }
        })
        .await
        .expect("register");
    heartbeat(client, id).await;
}

/// A shard as a node names it in its heartbeats.
fn sid(collection: &str, collection_id: u64, index: u32) -> cpb::ShardId {
    cpb::ShardId {
        collection: collection.into(),
        collection_id,
        index,
    }
}

fn sid_of(s: &shoal_coordinator::map::Shard) -> cpb::ShardId {
    sid(&s.key.collection, s.collection_id, s.key.index)
}

async fn heartbeat(client: &mut Client, id: &str) -> cpb::HeartbeatResponse {
    send_heartbeat(
        client,
        cpb::HeartbeatRequest {
            id: id.into(),
            ..Default::default()
        },
    )
    .await
}

async fn send_heartbeat(client: &mut Client, req: cpb::HeartbeatRequest) -> cpb::HeartbeatResponse {
    client
        .cluster(|mut c| {
            let r = req.clone();
            async move { c.heartbeat(r).await }
        })
        .await
        .expect("heartbeat")
        .into_inner()
}

/// A heartbeat from `node` reporting one replica of `shard` at (`epoch`, `seq`).
async fn report_applied(
    client: &mut Client,
    node: &str,
    shard: cpb::ShardId,
    epoch: u64,
    seq: u64,
) -> cpb::HeartbeatResponse {
    let replicas = vec![cpb::ReplicaReport {
        shard: Some(shard),
        applied_seq: seq,
        last_epoch: epoch,
        epoch,
        ..Default::default()
    }];
    send_heartbeat(
        client,
        cpb::HeartbeatRequest {
            id: node.into(),
            replicas,
            ..Default::default()
        },
    )
    .await
}

fn create_req(name: &str, shards: u32, rf: u32) -> cpb::CreateCollectionRequest {
    cpb::CreateCollectionRequest {
        name: name.into(),
        dimension: 384,
        metric: cpb::Metric::InnerProduct as i32,
        encoder: None,
        index: None,
        shard_count: shards,
        replication_factor: rf,
        replica_memory_bytes: 0,
        write_quorum: 0,
        payload_fields: Vec::new(),
    }
}

async fn create(
    client: &mut Client,
    name: &str,
    shards: u32,
    rf: u32,
) -> Result<cpb::CollectionInfo, tonic::Status> {
    let req = create_req(name, shards, rf);
    client
        .admin(|mut a| {
            let r = req.clone();
            async move { a.create_collection(r).await }
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elect_commit_failover_and_restart_from_disk() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|_| {}).await;
    let t = Instant::now();
    let first = g.leader(Duration::from_secs(10)).await;
    eprintln!("first leader: member {} after {:?}", first + 1, t.elapsed());
    let mut client = g.client();
    register_up(&mut client, "w1", "z1").await;
    for i in 0..5 {
        create(&mut client, &format!("before-{i}"), 2, 1)
            .await
            .unwrap();
    }

    // Stop the leader; a new one must commit within 3 s.
    g.stop_member(first).await;
    let t = Instant::now();
    create(&mut client, "after-failover", 1, 1).await.unwrap();
    let failover = t.elapsed();
    let second = g.leader(Duration::from_secs(5)).await;
    eprintln!(
        "failover: member {} committed after {failover:?}",
        second + 1
    );
    assert_ne!(first, second);
    assert!(
        failover < Duration::from_secs(3),
        "failover took {failover:?}"
    );

    // The stopped member comes back and catches up from the log.
    g.start_member(first).await;
    let target = g.applied(second);
    g.wait_applied(first, target).await;
    assert_eq!(g.map(first), g.map(second));

    // All three stop and restart from disk with the same map.
    for i in 0..3 {
        g.stop_member(i).await;
    }
    for i in 0..3 {
        g.start_member(i).await;
    }
    let l = g.leader(Duration::from_secs(10)).await;
    let read = g.handle(l).coordinator.read().await.unwrap();
    for i in 0..3 {
        g.wait_applied(i, g.applied(l)).await;
        assert_eq!(g.map(i), read, "member {} differs after restart", i + 1);
    }
    let names: Vec<&str> = read.collections.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "after-failover",
            "before-0",
            "before-1",
            "before-2",
            "before-3",
            "before-4"
        ]
    );
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_others_stops_acting_as_leader() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|_| {}).await;
    let l = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    register_up(&mut client, "w1", "z1").await;
    // An answered heartbeat grants the node's primaries a lease of the suspect timeout.
    let r = heartbeat(&mut client, "w1").await;
    assert_eq!(r.lease_ms, g.configs[l].suspect_after_ms);

    // The others stop: the Raft core still says it leads (openraft 0.9 has no
    // check-quorum), but within its lease (the shortest election timeout) it stops
    // answering heartbeats, so it renews no node's lease and declares no node down.
    for i in (0..3).filter(|i| *i != l) {
        g.stop_member(i).await;
    }
    let stopped = Instant::now();
    let mut alone = Client::new([g.configs[l].listen.clone()]);
    alone.patience = Duration::from_millis(200);
    let refused = loop {
        let r = alone
            .cluster(|mut c| async move {
                c.heartbeat(cpb::HeartbeatRequest {
                    id: "w1".into(),
                    ..Default::default()
                })
                .await
            })
            .await;
        match r {
            Ok(_) => {
                assert!(
                    stopped.elapsed() < Duration::from_secs(5),
                    "an isolated leader still answers heartbeats"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => break (s, stopped.elapsed()),
        }
    };
    assert_eq!(
        refused.0.code(),
        tonic::Code::Unavailable,
        "{:?}",
        refused.0
    );
    let lease = Duration::from_millis(g.configs[l].election_timeout_min_ms);
    eprintln!(
        "isolated leader refused heartbeats {:?} after the others stopped (lease {lease:?})",
        refused.1
    );
    assert_eq!(
        g.handle(l).coordinator.raft.metrics().borrow().state,
        openraft::ServerState::Leader,
        "the Raft core alone would still act as leader"
    );
    // Still refused a while later (no renewal without a quorum).
    tokio::time::sleep(lease).await;
    assert!(alone
        .cluster(|mut c| async move {
            c.heartbeat(cpb::HeartbeatRequest {
                id: "w1".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .is_err());

    // The others come back: a leader (with its lease) answers again.
    for i in (0..3).filter(|i| *i != l) {
        g.start_member(i).await;
    }
    g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    client.patience = Duration::from_secs(20);
    heartbeat(&mut client, "w1").await;
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_member_catches_up_by_snapshot() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|c| c.snapshot_every = 8).await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let lagger = (leader + 1) % 3;
    let mut client = g.client();
    register_up(&mut client, "w1", "z1").await;
    let behind = g.applied(lagger);
    g.stop_member(lagger).await;
    for i in 0..30 {
        create(&mut client, &format!("c{i}"), 1, 1).await.unwrap();
    }
    // The leader snapshots every 8 entries and then purges its log, in the background.
    let t = Instant::now();
    let purged = loop {
        let lm = g.handle(leader).coordinator.raft.metrics().borrow().clone();
        let purged = lm.purged.map_or(0, |p| p.index);
        if purged > behind {
            break purged;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "leader purged only up to {purged}, lagger has {behind}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    g.start_member(lagger).await;
    g.wait_applied(lagger, g.applied(leader)).await;
    let m = g.handle(lagger).coordinator.raft.metrics().borrow().clone();
    let snap = m.snapshot.map_or(0, |s| s.index);
    eprintln!("lagging member installed a snapshot at index {snap} (leader purged to {purged})");
    assert!(snap > 0, "lagging member did not receive a snapshot");
    assert_eq!(g.map(lagger), g.map(leader));
    assert_eq!(g.map(lagger).collections.len(), 30);
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_forwards_writes_errors_name_the_problem_and_watch_streams_changes() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|_| {}).await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    let mut client = g.client();
    register_up(&mut client, "w1", "z1").await;
    // Only the follower's address: the write is forwarded server-side.
    let mut fc = Client::new([g.configs[follower].listen.clone()]);
    let info = create(&mut fc, "docs", 4, 1).await.unwrap();
    assert_eq!(info.shards.len(), 4);

    let cases: Vec<(cpb::CreateCollectionRequest, Code, &str)> = vec![
        (
            create_req("docs", 1, 1),
            Code::AlreadyExists,
            "already exists",
        ),
        (
            cpb::CreateCollectionRequest {
                dimension: 0,
                ..create_req("x", 1, 1)
            },
            Code::InvalidArgument,
            "dimension 0",
        ),
        (
            create_req("x", 2000, 1),
            Code::InvalidArgument,
            "shard_count 2000",
        ),
        (
            create_req("x", 1, 2),
            Code::FailedPrecondition,
            "replication_factor 2",
        ),
        (
            cpb::CreateCollectionRequest {
                index: Some(cpb::IndexParams {
                    pq_m: 5,
                    ..Default::default()
                }),
                ..create_req("x", 1, 1)
            },
            Code::InvalidArgument,
            "pq_m 5",
        ),
    ];
    let before = g.map(leader).version;
    for (req, code, msg) in cases {
        let err = fc
            .admin(|mut a| {
                let r = req.clone();
                async move { a.create_collection(r).await }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(msg),
            "{:?} lacks {msg:?}",
            err.message()
        );
    }
    assert_eq!(
        g.map(leader).version,
        before,
        "a refused create changed the map"
    );
    let err = fc
        .admin(|mut a| async move {
            a.describe_collection(cpb::DescribeCollectionRequest {
                name: "nope".into(),
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nope"));

    // Reads at the follower are linearizable: they see the write just acknowledged.
    let listed = fc
        .admin(|mut a| async move { a.list_collections(cpb::ListCollectionsRequest {}).await })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.collections.len(), 1);

    // Watch from the follower: the whole map, then each change with its version.
    let mut w = shoal_proto::coordinator::cluster_map_client::ClusterMapClient::connect(format!(
        "http://{}",
        g.configs[follower].listen
    ))
    .await
    .unwrap();
    let mut stream = w
        .watch(cpb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(cpb::map_event::Event::Full(_))));
    create(&mut client, "second", 1, 1).await.unwrap();
    let next = stream.message().await.unwrap().unwrap();
    assert_eq!(next.version, first.version + 1);
    let Some(cpb::map_event::Event::Changes(cs)) = next.event else {
        panic!("expected changes, got {next:?}");
    };
    assert!(cs.changes.iter().any(|c| matches!(&c.change,
        Some(cpb::map_change::Change::CollectionPut(c)) if c.name == "second")));
    // Resuming at the current version (a reconnect) sends no full map, only what
    // comes next.
    drop(stream);
    drop(w);
    let mut w = shoal_proto::coordinator::cluster_map_client::ClusterMapClient::connect(format!(
        "http://{}",
        g.configs[follower].listen
    ))
    .await
    .unwrap();
    let mut stream = w
        .watch(cpb::WatchRequest {
            from_version: next.version,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    create(&mut client, "third", 1, 1).await.unwrap();
    let resumed = stream.message().await.unwrap().unwrap();
    assert_eq!(resumed.version, next.version + 1);
    assert!(matches!(
        resumed.event,
        Some(cpb::map_event::Event::Changes(_))
    ));
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_node_goes_suspect_then_down_and_its_replicas_move() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|c| {
        c.suspect_after_ms = 600;
        c.down_after_ms = 1500;
        c.tick_ms = 100;
    })
    .await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    for (id, zone) in [("w1", "a"), ("w2", "b"), ("w3", "c")] {
        register_up(&mut client, id, zone).await;
    }
    let info = create(&mut client, "docs", 6, 2).await.unwrap();
    let on_w3 = info
        .shards
        .iter()
        .filter(|s| s.replicas.iter().any(|r| r.node_id == "w3"))
        .count();
    assert!(on_w3 > 0);
    // w1 and w2 keep heartbeating and report finished copies; w3 falls silent.
    let t = Instant::now();
    let mut saw_suspect = false;
    loop {
        for id in ["w1", "w2"] {
            let map = g.map(leader);
            // Every hosted replica reports its position, as a node does: the leader
            // promotes only a replica whose position it knows. A primary reports its
            // copies in sync (issue 16: they join on its word).
            let replicas = map
                .shards
                .values()
                .filter(|s| s.holds(id))
                .map(|s| cpb::ReplicaReport {
                    shard: Some(sid_of(s)),
                    applied_seq: 5,
                    last_epoch: 1,
                    epoch: s.epoch,
                    in_sync: s
                        .replicas
                        .iter()
                        .filter(|r| {
                            s.primary.as_deref() == Some(id)
                                && r.state == shoal_coordinator::map::ReplicaState::Copying
                        })
                        .map(|r| r.node.clone())
                        .collect(),
                    ..Default::default()
                })
                .collect();
            send_heartbeat(
                &mut client,
                cpb::HeartbeatRequest {
                    id: id.into(),
                    replicas,
                    ..Default::default()
                },
            )
            .await;
        }
        let map = g.map(leader);
        let w3 = map.nodes["w3"].state;
        saw_suspect |= w3 == shoal_coordinator::map::NodeState::Suspect;
        let done = w3 == shoal_coordinator::map::NodeState::Down
            && map.shards.values().all(|s| {
                !s.holds("w3")
                    && s.replicas.len() == 2
                    && s.replicas
                        .iter()
                        .all(|r| r.state == shoal_coordinator::map::ReplicaState::Serving)
                    && s.primary.as_deref().is_some_and(|p| p != "w3")
            });
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not re-assigned: {map:#?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprintln!(
        "w3 down and its {on_w3} replicas re-assigned {:?} after its last heartbeat",
        t.elapsed()
    );
    assert!(saw_suspect, "w3 went down without being suspect first");
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_and_hand_over_refuse_a_lagging_backup_unless_told_to_lose_data() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|_| {}).await;
    g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    for (id, zone) in [("w1", "a"), ("w2", "b")] {
        register_up(&mut client, id, zone).await;
    }
    let bad = cpb::CreateCollectionRequest {
        write_quorum: 3,
        ..create_req("q", 1, 2)
    };
    let err = client
        .admin(|mut a| {
            let r = bad.clone();
            async move { a.create_collection(r).await }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("write_quorum 3 exceeds"), "{err:?}");
    let quorum_one = cpb::CreateCollectionRequest {
        write_quorum: 1,
        ..create_req("p", 1, 2)
    };
    let info = client
        .admin(|mut a| {
            let r = quorum_one.clone();
            async move { a.create_collection(r).await }
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.collection.as_ref().unwrap().write_quorum, 1);
    let coll_id = info.collection.as_ref().unwrap().id;
    let shard = &info.shards[0];
    let primary = shard.primary.clone();
    let backup = shard
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .find(|n| *n != primary)
        .unwrap();
    // The primary has applied 10 batches, the backup 5.
    for (node, seq) in [(&primary, 10), (&backup, 5)] {
        report_applied(&mut client, node, sid("p", coll_id, 0), shard.epoch, seq).await;
    }
    let promote = |node: &str, accept_data_loss: bool| cpb::PromoteReplicaRequest {
        collection: "p".into(),
        shard: 0,
        node_id: node.into(),
        accept_data_loss,
    };
    let promoter = client.clone();
    let call = |req: cpb::PromoteReplicaRequest| {
        let mut client = promoter.clone();
        async move {
            client
                .admin(|mut a| {
                    let r = req.clone();
                    async move { a.promote_replica(r).await }
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let err = call(promote(&backup, false)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("behind the primary (epoch"),
        "{err:?}"
    );
    let err = call(promote(&primary, false)).await.unwrap_err();
    assert!(err.message().contains("already the primary"), "{err:?}");
    let err = call(cpb::PromoteReplicaRequest {
        collection: "nope".into(),
        ..promote(&backup, true)
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let s = call(promote(&backup, true)).await.unwrap();
    assert_eq!(s.primary, backup);
    assert_eq!(s.epoch, shard.epoch + 1);
    // Caught up: the old primary may take the role back without the flag. Its
    // primary (on a live node) is asked to hand the role over itself (issue 16): the
    // ask rides on its heartbeat answers, the promotion waits for its HandOver.
    let e1 = shard.epoch + 1;
    report_applied(&mut client, &primary, sid("p", coll_id, 0), e1, 5).await;
    let promoting = tokio::spawn(call(promote(&primary, false)));
    let ask = eventually(Duration::from_secs(5), "the handover asked", || {
        let mut client = client.clone();
        let backup = backup.clone();
        async move {
            let r = report_applied(&mut client, &backup, sid("p", coll_id, 0), e1, 5).await;
            r.hand_over.into_iter().next()
        }
    })
    .await;
    assert_eq!((ask.epoch, ask.to.as_str()), (e1, primary.as_str()));
    let other = report_applied(&mut client, &primary, sid("p", coll_id, 0), e1, 5).await;
    assert!(
        other.hand_over.is_empty(),
        "asked of a node that does not lead"
    );
    assert!(
        !promoting.is_finished(),
        "promoted before the primary handed over"
    );
    client
        .hand_over(cpb::HandOverRequest {
            node_id: backup.clone(),
            shard: ask.shard.clone(),
            epoch: e1,
            to: primary.clone(),
            last_seq: 5,
            last_epoch: e1,
            ..Default::default()
        })
        .await
        .unwrap();
    let s = promoting.await.unwrap().unwrap();
    assert_eq!(
        (s.primary.as_str(), s.epoch),
        (primary.as_str(), shard.epoch + 2)
    );
    // The primary's own handover (its node shutting down): only from the node that
    // leads at that epoch, only to a replica whose report holds the position the
    // primary states (a heartbeat behind: FAILED_PRECONDITION, retried by the node).
    let e2 = shard.epoch + 2;
    let hand = |from: &str, epoch: u64, last_seq: u64| cpb::HandOverRequest {
        node_id: from.into(),
        shard: Some(sid("p", coll_id, 0)),
        epoch,
        to: backup.clone(),
        last_seq,
        last_epoch: e2,
        ..Default::default()
    };
    let err = client.hand_over(hand(&backup, e2, 7)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("does not lead"), "{err:?}");
    let err = client
        .hand_over(hand(&primary, e2 - 1, 7))
        .await
        .unwrap_err();
    assert!(err.message().contains("does not lead"), "{err:?}");
    let err = client
        .hand_over(cpb::HandOverRequest {
            shard: Some(sid("p", coll_id + 1, 0)),
            ..hand(&primary, e2, 7)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    report_applied(&mut client, &backup, sid("p", coll_id, 0), e2, 6).await;
    let err = client.hand_over(hand(&primary, e2, 7)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("behind the primary"), "{err:?}");
    report_applied(&mut client, &backup, sid("p", coll_id, 0), e2, 7).await;
    let r = client.hand_over(hand(&primary, e2, 7)).await.unwrap();
    assert_eq!(r.epoch, e2 + 1);
    let shards = client
        .list_shards(cpb::ListShardsRequest {
            collection: "p".into(),
        })
        .await
        .unwrap();
    let s = &shards.shards[0];
    assert_eq!((s.primary.as_str(), s.epoch), (backup.as_str(), e2 + 1));
    // Replayed (the node's retry after a lost answer): the sender no longer leads.
    let err = client.hand_over(hand(&primary, e2, 7)).await.unwrap_err();
    assert!(err.message().contains("does not lead"), "{err:?}");
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_node_that_goes_silent_comes_back_draining() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|c| {
        c.suspect_after_ms = 600;
        c.down_after_ms = 30_000;
        c.tick_ms = 100;
    })
    .await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    for (id, zone) in [("w1", "a"), ("w2", "b")] {
        register_up(&mut client, id, zone).await;
    }
    client
        .admin(|mut a| async move {
            a.drain_node(cpb::DrainNodeRequest {
                id: "w1".into(),
                undo: false,
            })
            .await
        })
        .await
        .unwrap();
    use shoal_coordinator::map::NodeState;
    let t = Instant::now();
    while g.map(leader).nodes["w1"].state != NodeState::Suspect {
        heartbeat(&mut client, "w2").await;
        assert!(t.elapsed() < Duration::from_secs(10), "w1 never suspect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = heartbeat(&mut client, "w1").await;
    assert_eq!(back.state, cpb::NodeState::Draining as i32);
    assert!(g.map(leader).nodes["w1"].draining);
    // A restart (re-registration) keeps it draining too.
    register_up(&mut client, "w1", "a").await;
    assert_eq!(g.map(leader).nodes["w1"].state, NodeState::Draining);
    // Until the operator cancels the drain.
    let undone = client
        .admin(|mut a| async move {
            a.drain_node(cpb::DrainNodeRequest {
                id: "w1".into(),
                undo: true,
            })
            .await
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(undone.state, cpb::NodeState::Up as i32);
    assert!(!g.map(leader).nodes["w1"].draining);
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_at_run_time() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|_| {}).await;
    g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    register_up(&mut client, "w1", "z1").await;
    create(&mut client, "before", 1, 1).await.unwrap();

    // A fourth member starts empty (no peers: it waits to be added), joins as a
    // learner, catches up, and is promoted while member 3 is removed.
    let mut c4 = g.configs[0].clone();
    c4.id = 4;
    c4.listen = format!("127.0.0.1:{}", free_port());
    c4.raft_listen = format!("127.0.0.1:{}", free_port());
    c4.data_dir = g._dir.path().join("c4");
    c4.peers = Vec::new();
    let m4 = start(c4.clone()).await.unwrap();
    let st = client
        .admin(|mut a| {
            let (raft_addr, api_addr) = (c4.raft_listen.clone(), c4.listen.clone());
            async move {
                a.add_learner(cpb::AddLearnerRequest {
                    id: 4,
                    raft_addr,
                    api_addr,
                })
                .await
            }
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.members.iter().any(|m| m.id == 4 && !m.voter));
    let st = client
        .admin(|mut a| async move {
            a.change_membership(cpb::ChangeMembershipRequest {
                voters: vec![1, 2, 4],
            })
            .await
        })
        .await
        .unwrap()
        .into_inner();
    let voters: BTreeSet<u64> = st
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 4]));
    assert!(
        st.members.iter().all(|m| m.id != 3),
        "removed voter still a member"
    );
    // The new voter holds the map, and the group commits without member 3.
    g.stop_member(2).await;
    let mut c = Client::new([c4.listen.clone()]);
    create(&mut c, "after", 1, 1).await.unwrap();
    let map = m4.coordinator.read().await.unwrap();
    assert!(map.collections.contains_key("before") && map.collections.contains_key("after"));
    let bad = client
        .admin(|mut a| async move {
            a.change_membership(cpb::ChangeMembershipRequest { voters: vec![] })
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    m4.shutdown().await;
    for i in 0..2 {
        g.stop_member(i).await;
    }
}

/// Primaries pushed onto one node (forced promotions) are handed back one at a time
/// once the cluster has stayed settled for the rebalance period, until each node leads
/// the same number of shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uneven_primaries_are_handed_over_once_settled() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|c| {
        c.rebalance_settle_ms = 300;
        c.tick_ms = 100;
        c.suspect_after_ms = 5_000;
        c.down_after_ms = 30_000;
    })
    .await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    for (id, zone) in [("w1", "a"), ("w2", "b")] {
        register_up(&mut client, id, zone).await;
    }
    create(&mut client, "even", 4, 2).await.unwrap();
    let leads = |m: &ClusterMap, n: &str| {
        m.shards
            .values()
            .filter(|s| s.primary.as_deref() == Some(n))
            .count()
    };
    assert_eq!(leads(&g.map(leader), "w1"), 2, "created even");
    let skewed: Vec<u32> = g
        .map(leader)
        .shards
        .values()
        .filter(|s| s.primary.as_deref() == Some("w2"))
        .map(|s| s.key.index)
        .collect();
    for shard in skewed {
        let req = cpb::PromoteReplicaRequest {
            collection: "even".into(),
            shard,
            node_id: "w1".into(),
            accept_data_loss: true,
        };
        client
            .admin(|mut a| {
                let r = req.clone();
                async move { a.promote_replica(r).await }
            })
            .await
            .unwrap();
    }
    assert_eq!(leads(&g.map(leader), "w1"), 4);
    // Both nodes report the same position on every shard (nothing would be lost).
    let t = Instant::now();
    let mut seen = vec![];
    loop {
        let m = g.map(leader);
        for node in ["w1", "w2"] {
            let replicas = m
                .shards
                .values()
                .map(|s| cpb::ReplicaReport {
                    shard: Some(sid_of(s)),
                    epoch: s.epoch,
                    ..Default::default()
                })
                .collect();
            let answer = send_heartbeat(
                &mut client,
                cpb::HeartbeatRequest {
                    id: node.into(),
                    replicas,
                    ..Default::default()
                },
            )
            .await;
            // The node's side of a planned move: hand over as asked (nothing to wait
            // for: both replicas are at the same position).
            for ask in answer.hand_over {
                client
                    .hand_over(cpb::HandOverRequest {
                        node_id: node.into(),
                        shard: ask.shard,
                        epoch: ask.epoch,
                        to: ask.to,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }
        let now = (leads(&m, "w1"), leads(&m, "w2"));
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        if now == (2, 2) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "primaries not evened out: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One handover per settle period: 4/0, then 3/1, then 2/2.
    assert_eq!(seen, vec![(4, 0), (3, 1), (2, 2)]);
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

/// A member whose Raft core has stopped (here: shut down under it, as a fatal storage
/// error would) reports NOT_SERVING on grpc.health, so a probe restarts it; its peers
/// stay SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_whose_raft_core_stopped_reports_not_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let g = Group::start(|_| {}).await;
    g.leader(Duration::from_secs(10)).await;
    let status = |i: usize| {
        let addr = g.handle(i).api_addr;
        async move {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    assert_eq!(status(0).await, ServingStatus::Serving as i32);
    g.handle(0).coordinator.raft.shutdown().await.unwrap();
    let t = Instant::now();
    while status(0).await != ServingStatus::NotServing as i32 {
        assert!(t.elapsed() < Duration::from_secs(5), "still SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(1).await, ServingStatus::Serving as i32);
}

/// Issue 14 at the coordinator: a node back with another volume leads and serves
/// nothing until filled, and its shards go to the replica whose position the leader
/// knows; a primary that reports a replica ahead of it hands the role to that replica;
/// a node whose data belongs to another cluster is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_volumes_stale_primaries_and_foreign_nodes() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::start(|c| c.tick_ms = 100).await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    let register = |id: &str, volume: &str, cluster: &str| cpb::RegisterNodeRequest {
        id: id.into(),
        addr: format!("127.0.0.1:{}", free_port()),
        capacity: Some(cpb::Capacity::default()),
        volume_id: volume.into(),
        cluster_id: cluster.into(),
    };
    let mut cluster_id = String::new();
    for id in ["w1", "w2"] {
        let r = register(id, &format!("vol-{id}"), "");
        let info = client
            .cluster(|mut c| {
                let r = r.clone();
                async move { c.register_node(r).await }
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!info.cluster_id.is_empty());
        cluster_id = info.cluster_id;
        heartbeat(&mut client, id).await;
    }
    let info = create(&mut client, "v", 2, 2).await.unwrap();
    let led_by_w1: Vec<String> = info
        .shards
        .iter()
        .filter(|s| s.primary == "w1")
        .map(|s| format!("v/{}", s.index))
        .collect();
    assert!(!led_by_w1.is_empty());
    // w2 reports every replica it holds (one heartbeat carries them all); w1 comes
    // back with an empty volume.
    let w2_reports = cpb::HeartbeatRequest {
        id: "w2".into(),
        replicas: info
            .shards
            .iter()
            .map(|s| cpb::ReplicaReport {
                shard: Some(sid("v", info.collection.as_ref().unwrap().id, s.index)),
                applied_seq: 7,
                last_epoch: 1,
                epoch: 1,
                ..Default::default()
            })
            .collect(),
        cluster_id: cluster_id.clone(),
        ..Default::default()
    };
    send_heartbeat(&mut client, w2_reports.clone()).await;
    let r = register("w1", "vol-new", &cluster_id);
    client
        .cluster(|mut c| {
            let r = r.clone();
            async move { c.register_node(r).await }
        })
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let map = g.map(leader);
        let ok = map.shards.values().all(|s| {
            s.primary.as_deref() == Some("w2")
                && s.replicas.iter().any(|r| {
                    r.node == "w1" && r.state == shoal_coordinator::map::ReplicaState::Copying
                })
        });
        if ok {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{map:#?}");
        // w2 keeps reporting (the leader promotes only replicas it has heard from).
        send_heartbeat(&mut client, w2_reports.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A primary (w2) that found w1's replica ahead of itself asks for it to lead; here
    // w1's replica of v/0 (filled again) reports more than w2 holds.
    let map = g.map(leader);
    let s0 = map.shards.values().next().unwrap().clone();
    send_heartbeat(
        &mut client,
        cpb::HeartbeatRequest {
            id: "w1".into(),
            replicas: vec![cpb::ReplicaReport {
                shard: Some(sid_of(&s0)),
                applied_seq: 9,
                last_epoch: s0.epoch,
                epoch: s0.epoch,
                caught_up: true,
                ..Default::default()
            }],
            cluster_id: cluster_id.clone(),
            ..Default::default()
        },
    )
    .await;
    send_heartbeat(
        &mut client,
        cpb::HeartbeatRequest {
            id: "w2".into(),
            replicas: vec![cpb::ReplicaReport {
                shard: Some(sid_of(&s0)),
                applied_seq: 7,
                last_epoch: 1,
                epoch: s0.epoch,
                ahead: "w1".into(),
                // The primary caught w1's copy up (issue 16: a copy joins the in-sync
                // set on its primary's word), then found it ahead.
                in_sync: vec!["w1".into()],
                ..Default::default()
            }],
            cluster_id: cluster_id.clone(),
            ..Default::default()
        },
    )
    .await;
    let map = g.map(leader);
    let s = map.shards.values().next().unwrap();
    assert_eq!(s.primary.as_deref(), Some("w1"), "{s:#?}");
    assert_eq!(s.epoch, s0.epoch + 1);
    // Another cluster's node: refused by name, on registration and on heartbeats.
    let r = register("w9", "vol-w9", "some-other-cluster");
    let err = client
        .cluster(|mut c| {
            let r = r.clone();
            async move { c.register_node(r).await }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--accept-cluster-id"), "{err:?}");
    let err = client
        .cluster(|mut c| async move {
            c.heartbeat(cpb::HeartbeatRequest {
                id: "w2".into(),
                cluster_id: "some-other-cluster".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    for i in 0..3 {
        g.stop_member(i).await;
    }
}

/// Issue 14 at the coordinator: a replica its node reports failed leaves its shard's
/// quorum through the map (a copy until it catches up); a failed primary hands its role
/// to the backup that has reported its position; the only serving replica stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_replicas_leave_their_quorum() {
    use shoal_coordinator::map::ReplicaState;
    let _serial = SERIAL.lock().await;
    let g = Group::start(|c| c.tick_ms = 100).await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    for id in ["w1", "w2"] {
        register_up(&mut client, id, "z").await;
    }
    let info = create(&mut client, "f", 1, 2).await.unwrap();
    let s = &info.shards[0];
    let (primary, backup) = if s.primary == "w1" {
        ("w1", "w2")
    } else {
        ("w2", "w1")
    };
    let report = |failed: &str| cpb::ReplicaReport {
        shard: Some(sid("f", info.collection.as_ref().unwrap().id, 0)),
        applied_seq: 5,
        last_epoch: 1,
        epoch: 1,
        failed: failed.into(),
        ..Default::default()
    };
    let beat = |node: &str, failed: &str| cpb::HeartbeatRequest {
        id: node.into(),
        replicas: vec![report(failed)],
        ..Default::default()
    };
    send_heartbeat(&mut client, beat(backup, "")).await;
    send_heartbeat(
        &mut client,
        beat(primary, "io error: No space left on device"),
    )
    .await;
    let map = g.map(leader);
    let s = map.shards.values().next().unwrap();
    assert_eq!(s.primary.as_deref(), Some(backup), "{s:#?}");
    let state = |n: &str| s.replicas.iter().find(|r| r.node == n).unwrap().state;
    assert_eq!(state(primary), ReplicaState::Copying);
    assert_eq!(state(backup), ReplicaState::Serving);
    // The new primary is the only serving replica now: its failure keeps it in place.
    send_heartbeat(&mut client, beat(backup, "io error")).await;
    let map = g.map(leader);
    let s2 = map.shards.values().next().unwrap();
    assert_eq!(s2, s, "the only serving replica was taken out");
    // Reopened and caught up, the copy serves again once the new primary reports it in
    // sync (its word at an older epoch is not taken).
    let in_sync = |epoch: u64| cpb::HeartbeatRequest {
        id: backup.into(),
        replicas: vec![cpb::ReplicaReport {
            epoch,
            in_sync: vec![primary.into()],
            ..report("")
        }],
        ..Default::default()
    };
    send_heartbeat(&mut client, in_sync(s2.epoch - 1)).await;
    assert_eq!(g.map(leader).shards.values().next().unwrap(), s);
    send_heartbeat(&mut client, in_sync(s2.epoch)).await;
    let map = g.map(leader);
    let s3 = map.shards.values().next().unwrap();
    assert!(
        s3.replicas.iter().all(|r| r.state == ReplicaState::Serving),
        "{s3:#?}"
    );
}

/// Issues 14 and 15: a node reporting a data volume over the low disk watermark gets no
/// replica of a new collection: the leader places it (with the disk levels only it
/// holds) and the create command carries that placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_collections_keep_off_nearly_full_volumes() {
    let _serial = SERIAL.lock().await;
    let g = Group::start(|c| c.tick_ms = 100).await;
    let leader = g.leader(Duration::from_secs(10)).await;
    let mut client = g.client();
    for id in ["w1", "w2"] {
        register_up(&mut client, id, "z").await;
    }
    let gib = 1u64 << 30;
    let w1_disk = |free: u64| cpb::HeartbeatRequest {
        id: "w1".into(),
        disk_free_bytes: free * gib,
        disk_total_bytes: 100 * gib,
        ..Default::default()
    };
    send_heartbeat(&mut client, w1_disk(5)).await;
    let info = create(&mut client, "spread", 4, 1).await.unwrap();
    assert!(info.shards.iter().all(|s| s.primary == "w2"), "{info:#?}");
    // Room again: the next collection uses both nodes.
    send_heartbeat(&mut client, w1_disk(50)).await;
    let info = create(&mut client, "spread2", 4, 1).await.unwrap();
    assert!(info.shards.iter().any(|s| s.primary == "w1"), "{info:#?}");
    let map = g.map(leader);
    assert_eq!(map.shards_of("spread").count(), 4);
}

/// Every Admin RPC, by the role it needs (issue 17). The rule (docs/ARCHITECTURE.md):
/// whatever changes the cluster (collections, index builds, membership, drains,
/// promotions, keys) is admin; reading the cluster's shape is read. A new RPC must be
/// added to one list (the test compares them with the proto).
const ADMIN_RPCS: &[&str] = &[
    "CreateCollection",
    "DropCollection",
    "AddLearner",
    "ChangeMembership",
    "DrainNode",
    "PromoteReplica",
    "AllocateEmptyShard",
    "CreateKey",
    "ListKeys",
    "RevokeKey",
    "SetCollectionPolicy",
    "StartIndexBuild",
    "StartCompaction",
    "StartSplit",
    "StartBackup",
    "RestoreCollection",
    "RestoreShards",
    "ExportMap",
    "ImportMap",
    "CancelOperation",
    "StartRebuild",
    "CommitRebuild",
    "RollbackRebuild",
    "SetAlias",
];
const READ_RPCS: &[&str] = &[
    "DescribeCollection",
    "ListCollections",
    "ListNodes",
    "ListShards",
    "ClusterStatus",
    "ListOperations",
    "ListAliases",
];

/// The RPCs of `service NAME { ... }` in a proto file's text.
fn rpcs_of(proto: &str, service: &str) -> BTreeSet<String> {
    let start = proto
        .find(&format!("service {service} {{"))
        .expect("the service");
    let body = &proto[start..start + proto[start..].find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l[..l.find('(').unwrap()].to_string())
        .collect()
}

/// Calls Admin RPC `rpc` with an empty request: the key is checked before anything.
async fn call_admin(c: &mut Client, rpc: &str) -> Result<(), tonic::Status> {
    match rpc {
        "CreateCollection" => c.create_collection(Default::default()).await.map(drop),
        "DropCollection" => c.drop_collection(Default::default()).await.map(drop),
        "DescribeCollection" => c.describe_collection(Default::default()).await.map(drop),
        "ListCollections" => c.list_collections(Default::default()).await.map(drop),
        "ListNodes" => c.list_nodes(Default::default()).await.map(drop),
        "ListShards" => c.list_shards(Default::default()).await.map(drop),
        "ClusterStatus" => c.cluster_status(Default::default()).await.map(drop),
        "AddLearner" => c.add_learner(Default::default()).await.map(drop),
        "ChangeMembership" => c.change_membership(Default::default()).await.map(drop),
        "DrainNode" => c.drain_node(Default::default()).await.map(drop),
        "PromoteReplica" => c.promote_replica(Default::default()).await.map(drop),
        "AllocateEmptyShard" => c.allocate_empty_shard(Default::default()).await.map(drop),
        "CreateKey" => c.create_key(Default::default()).await.map(drop),
        "ListKeys" => c.list_keys(Default::default()).await.map(drop),
        "RevokeKey" => c.revoke_key(Default::default()).await.map(drop),
        "SetCollectionPolicy" => c.set_collection_policy(Default::default()).await.map(drop),
        "StartIndexBuild" => c.start_index_build(Default::default()).await.map(drop),
        "StartCompaction" => c.start_compaction(Default::default()).await.map(drop),
        "StartSplit" => c.start_split(Default::default()).await.map(drop),
        "StartBackup" => c.start_backup(Default::default()).await.map(drop),
        "RestoreCollection" => c.restore_collection(Default::default()).await.map(drop),
        "RestoreShards" => c.restore_shards(Default::default()).await.map(drop),
        "ExportMap" => c.export_map(Default::default()).await.map(drop),
        "ImportMap" => c.import_map(Default::default()).await.map(drop),
        "ListOperations" => c.list_operations(Default::default()).await.map(drop),
        "StartRebuild" => c.start_rebuild(Default::default()).await.map(drop),
        "CommitRebuild" => c.commit_rebuild(Default::default()).await.map(drop),
        "RollbackRebuild" => c.rollback_rebuild(Default::default()).await.map(drop),
        "SetAlias" => c.set_alias(Default::default()).await.map(drop),
        "ListAliases" => c.list_aliases(Default::default()).await.map(drop),
        "CancelOperation" => c.cancel_operation(Default::default()).await.map(drop),
        other => panic!("no call for {other}: add one"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_rpcs_refuse_every_key_but_admin_and_the_audit_log_says_so() {
    let _serial = SERIAL.lock().await;
    let proto = include_str!("../../proto/proto/shoal/coordinator.proto");
    let listed: BTreeSet<String> = ADMIN_RPCS
        .iter()
        .chain(READ_RPCS)
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        listed,
        rpcs_of(proto, "Admin"),
        "every Admin RPC is classified"
    );

    let secrets = tempfile::tempdir().unwrap();
    let root = shoal_proto::auth::generate_root();
    let root_file = secrets.path().join("root.key");
    std::fs::write(&root_file, format!("{root}\n")).unwrap();
    let audit = secrets.path().join("audit.jsonl");
    let (rf, al) = (root_file.clone(), audit.clone());
    let mut g = Group::start(move |c| {
        c.root_key_file = Some(rf.clone());
        c.audit_log = Some(al.clone());
    })
    .await;
    g.leader(Duration::from_secs(10)).await;
    let mut as_root = g.client().with_key(Some(&root));
    let make = |role: Role| {
        let req = cpb::CreateKeyRequest {
            name: format!("{role:?}"),
            role: role.wire(),
            collections: vec![],
        };
        let mut c = as_root.clone();
        async move { c.create_key(req).await.unwrap().key }
    };
    let (writer, reader) = (make(Role::Write).await, make(Role::Read).await);
    // Every member checks keys with its own map: wait until all have both.
    for i in 0..3 {
        g.wait_applied(i, g.applied(g.leader(Duration::from_secs(5)).await))
            .await;
    }

    for key in [&writer, &reader] {
        let mut c = g.client().with_key(Some(key));
        for rpc in ADMIN_RPCS {
            let e = call_admin(&mut c, rpc).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{rpc}: {e}");
            assert!(e.message().contains("needs admin"), "{rpc}: {e}");
        }
        for rpc in READ_RPCS {
            if let Err(e) = call_admin(&mut c, rpc).await {
                assert!(
                    !matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{rpc} refused a {key:.12}... key: {e}"
                );
            }
        }
    }
    let mut anonymous = g.client().with_key(None);
    for rpc in ADMIN_RPCS.iter().chain(READ_RPCS) {
        let e = call_admin(&mut anonymous, rpc).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{rpc}: {e}");
    }
    // The root key passes the check (the empty request then fails on its own terms).
    let e = call_admin(&mut as_root, "DropCollection")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Revoked: refused.
    let (id, _) = shoal_proto::auth::parse(&writer).unwrap();
    as_root
        .revoke_key(cpb::RevokeKeyRequest { id: id.into() })
        .await
        .unwrap();
    let e = g
        .client()
        .with_key(Some(&writer))
        .list_nodes(Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for rpc in ADMIN_RPCS {
        assert!(
            records.iter().any(|r| r["kind"] == "refused"
                && r["action"] == *rpc
                && r["outcome"] == "PermissionDenied"
                && r["key"] == id),
            "no refusal of {rpc} recorded"
        );
    }
    let admin = |action: &str, outcome: &str| {
        records.iter().any(|r| {
            r["kind"] == "admin"
                && r["action"] == action
                && r["outcome"] == outcome
                && r["key"] == "root"
        })
    };
    assert!(admin("CreateKey", "ok"));
    assert!(admin("RevokeKey", "ok"));
    assert!(admin("DropCollection", "NotFound"));
    for i in 0..3 {
        g.stop_member(i).await;
    }
}
