//! Replication under faults, on a real cluster of processes (three coordinators,
//! three nodes, RF 2): nodes killed during ingest, a primary paused past the failure
//! timeout and fenced when it resumes, a node lost for good; primaries moved under
//! writers by a drain and by a scale-out. A query loop runs through each fault. Short
//! by default; `SHOAL_CHAOS_SOAK=1` runs longer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_chaos_tests::*;
use shoal_proto::coordinator as cpb;
use shoal_proto::replica as rpb;
use shoal_proto::v1 as pb;

/// One cluster at a time: each is six processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COLLECTION: &str = "chaos";

struct Queries {
    stats: Arc<Mutex<QueryStats>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Queries {
    fn start(nodes: Arc<Mutex<Vec<String>>>) -> Self {
        let stats = Arc::new(Mutex::new(QueryStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(query_loop(
            nodes,
            COLLECTION.into(),
            stats.clone(),
            stop.clone(),
        ));
        Self { stats, stop, task }
    }

    /// The stats so far, and a fresh count from now on.
    fn take(&self) -> QueryStats {
        std::mem::take(&mut *self.stats.lock().unwrap())
    }

    async fn finish(self) -> QueryStats {
        self.stop.store(true, Ordering::Relaxed);
        let stats = self.stats.clone();
        let _ = self.task.await;
        let s = std::mem::take(&mut *stats.lock().unwrap());
        s
    }
}

async fn replicated_cluster() -> Cluster {
    let c = Cluster::start(3).await;
    c.create_collection(COLLECTION, 3, 2).await;
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    c
}

fn spawn_ingest(
    nodes: &Arc<Mutex<Vec<String>>>,
    first_batch: u64,
    batches: u64,
    until: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Record> {
    tokio::spawn(ingest(
        nodes.clone(),
        COLLECTION.into(),
        first_batch,
        batches,
        20,
        Duration::from_secs(120),
        until.clone(),
    ))
}

async fn final_check(c: &Cluster, acked: &[u64]) {
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    let node = c.running_nodes()[0].clone();
    check_acknowledged(&node, COLLECTION, acked).await;
    // Each acknowledged document once, nothing else: the primaries hold exactly them.
    let t = Instant::now();
    loop {
        let live = live_docs(&c.shards(COLLECTION).await);
        if live == acked.len() as u64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "primaries hold {live} documents, {} were acknowledged",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_killed_during_ingest_lose_no_acknowledged_write() {
    let _g = SERIAL.lock().await;
    let mut c = replicated_cluster().await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let q = Queries::start(nodes.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = q.take();
    let done = Arc::new(AtomicBool::new(false));
    let ingest = spawn_ingest(&nodes, 0, u64::MAX, &done);
    let kills = if soak() { 20 } else { 4 };
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let i = k % c.nodes.len();
        c.kill(i);
        tokio::time::sleep(Duration::from_millis(800)).await;
        c.restart(i);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    done.store(true, Ordering::Relaxed);
    let rec = ingest.await.unwrap();
    let during = q.finish().await;
    let acked = rec.acknowledged_docs();
    assert!(
        rec.batches.iter().all(|(_, o)| *o == Outcome::Acknowledged),
        "a batch was never acknowledged despite retries"
    );
    assert!(acked.len() >= 200, "too little ingested: {}", acked.len());
    final_check(&c, &acked).await;
    // Search latency is exported as a histogram (buckets add up across nodes, which
    // the Grafana dashboard in deploy/ relies on).
    let mut buckets = 0.0;
    for i in 0..c.nodes.len() {
        buckets += c
            .metric(i, "shoal_gateway_search_duration_seconds_bucket")
            .await;
    }
    assert!(buckets > 0.0, "no latency histogram buckets exported");
    report(
        serde_json::json!({
            "test": "sigkill_during_ingest", "kills": kills, "batches": rec.batches.len(),
            "acknowledged_docs": acked.len(), "attempts": rec.attempts, "retries": rec.retries,
        }),
        &before,
        &during,
    );
    assert_eq!(
        during.failed, 0,
        "queries failed outright during the faults: {:?}",
        during.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_primary_is_fenced_and_acknowledged_writes_survive() {
    let _g = SERIAL.lock().await;
    let c = replicated_cluster().await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let never = Arc::new(AtomicBool::new(false));
    let first = spawn_ingest(&nodes, 0, 20, &never).await.unwrap();
    // The victim: the primary of shard 0.
    let shard0 = c.shard(COLLECTION, 0).await;
    let victim = c.node_index(&shard0.primary);
    let internal = c.internal_addrs().await.remove(&shard0.primary).unwrap();
    let coll_id = c.collection_id(COLLECTION).await;
    // Gateways other than the victim, for the workload and the queries.
    *nodes.lock().unwrap() = c.gateways_except(victim);
    let q = Queries::start(nodes.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = q.take();
    let done = Arc::new(AtomicBool::new(false));
    let ingest = spawn_ingest(&nodes, 1000, u64::MAX, &done);

    let paused = Instant::now();
    c.pause(victim);
    let promoted = loop {
        let s = c.shard(COLLECTION, 0).await;
        if s.epoch > shard0.epoch && s.primary != shard0.primary {
            break paused.elapsed();
        }
        assert!(paused.elapsed() < Duration::from_secs(30), "no promotion");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let writes flow under the new primary, then wake the old one and have it try a
    // write of its own at once, as a primary that missed the news would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.resume(victim);
    let late = replica_client(&internal)
        .await
        .write(rpb::WriteRequest {
            set_tag: 0,
            shard: Some(cpb::ShardId {
                collection: COLLECTION.into(),
                collection_id: coll_id,
                index: 0,
            }),
            upserts: vec![rpb::StoredDoc {
                id: "late-write".into(),
                vector: vector(999_999),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    let refusal = match &late {
        Ok(_) => panic!("the deposed primary acknowledged a write"),
        Err(e) => format!("{:?}: {}", e.code(), e.message()),
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, Ordering::Relaxed);
    let second = ingest.await.unwrap();
    let during = q.finish().await;
    let mut acked = first.acknowledged_docs();
    acked.extend(second.acknowledged_docs());
    final_check(&c, &acked).await;
    let mut g = connect(&c.running_nodes()[0]).await.unwrap();
    let r = g
        .get(pb::GetRequest {
            collection: COLLECTION.into(),
            id: "late-write".into(),
            with_vector: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.found, "the refused late write is visible");
    report(
        serde_json::json!({
            "test": "sigstop_primary", "promoted_after_s": promoted.as_secs_f64(),
            "late_write": refusal, "acknowledged_docs": acked.len(),
            "retries": second.retries,
        }),
        &before,
        &during,
    );
    assert!(
        during.success_rate() >= 0.99,
        "success rate {} during the pause",
        during.success_rate()
    );
}

/// A clean shutdown (SIGTERM) of a node that leads shards hands its primary roles to
/// caught-up backups before it exits, so writes move on without waiting for the
/// coordinators' down timeout, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clean_shutdown_hands_primaries_over_before_the_down_timeout() {
    let _g = SERIAL.lock().await;
    let mut c = replicated_cluster().await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let never = Arc::new(AtomicBool::new(false));
    let first = spawn_ingest(&nodes, 0, 20, &never).await.unwrap();
    let shard0 = c.shard(COLLECTION, 0).await;
    let victim = c.node_index(&shard0.primary);
    let led = c
        .shards(COLLECTION)
        .await
        .iter()
        .filter(|s| s.primary == shard0.primary)
        .count();
    *nodes.lock().unwrap() = c.gateways_except(victim);
    let q = Queries::start(nodes.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = q.take();
    let done = Arc::new(AtomicBool::new(false));
    let ingest = spawn_ingest(&nodes, 1000, u64::MAX, &done);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t = Instant::now();
    let exited = c.terminate(victim, Duration::from_secs(15)).await;
    // Every shard it led has a new primary, and the node is not (yet) down.
    let moved = loop {
        let shards = c.shards(COLLECTION).await;
        if shards.iter().all(|s| s.primary != shard0.primary) {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no handover: {shards:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let state = c
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.id == shard0.primary)
        .unwrap()
        .state;
    tokio::time::sleep(Duration::from_secs(2)).await;
    done.store(true, Ordering::Relaxed);
    let second = ingest.await.unwrap();
    let during = q.finish().await;
    let mut acked = first.acknowledged_docs();
    acked.extend(second.acknowledged_docs());
    assert!(
        second
            .batches
            .iter()
            .all(|(_, o)| *o == Outcome::Acknowledged),
        "a batch was never acknowledged despite retries"
    );
    final_check(&c, &acked).await;
    report(
        serde_json::json!({
            "test": "sigterm_primary", "primaries_led": led,
            "exited_after_s": exited.as_secs_f64(), "handed_over_after_s": moved.as_secs_f64(),
            "node_state_then": cpb::NodeState::try_from(state).map(|s| s.as_str_name()).unwrap_or("?"),
            "acknowledged_docs": acked.len(), "retries": second.retries,
            "down_after_ms": DOWN_MS,
        }),
        &before,
        &during,
    );
    assert!(
        moved < Duration::from_millis(DOWN_MS),
        "handover took {moved:?}, no sooner than the down timeout"
    );
    assert_ne!(
        state,
        cpb::NodeState::Down as i32,
        "declared down before handing over"
    );
    assert_eq!(during.failed, 0, "{:?}", during.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_node_is_re_replicated_while_queries_succeed() {
    let _g = SERIAL.lock().await;
    let mut c = replicated_cluster().await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let never = Arc::new(AtomicBool::new(false));
    let batches = if soak() { 500 } else { 60 };
    let rec = spawn_ingest(&nodes, 0, batches, &never).await.unwrap();
    let q = Queries::start(nodes.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = q.take();
    let victim = 2;
    c.kill(victim);
    let t = Instant::now();
    c.wait_node_state(
        &c.nodes[victim].id,
        cpb::NodeState::Down,
        Duration::from_secs(30),
    )
    .await;
    let declared_down = t.elapsed();
    // The coordinators' own metrics say what the map says: while the lost node's
    // replicas are being re-created, shards are short of their replication factor.
    let mut short_seen = 0.0f64;
    for i in 0..3 {
        short_seen = short_seen.max(
            c.coordinator_metric(i, "shoal_coordinator_shards_under_replicated")
                .await,
        );
    }
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    let restored = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = q.finish().await;
    let acked = rec.acknowledged_docs();
    final_check(&c, &acked).await;
    // Once restored, every member's gauges agree: one leader, one node down, two up,
    // no shard short or unavailable (gauges refresh every second).
    let t2 = Instant::now();
    loop {
        let mut leaders = 0.0;
        let mut ok = true;
        for i in 0..3 {
            let m = |name: &'static str| c.coordinator_metric(i, name);
            leaders += m("shoal_coordinator_is_leader").await;
            ok &= m("shoal_coordinator_nodes{state=\"down\"}").await == 1.0
                && m("shoal_coordinator_nodes{state=\"up\"}").await == 2.0
                && m("shoal_coordinator_shards").await == 3.0
                && m("shoal_coordinator_shards_under_replicated").await == 0.0
                && m("shoal_coordinator_shards_unavailable").await == 0.0;
        }
        if ok && leaders == 1.0 {
            break;
        }
        assert!(
            t2.elapsed() < Duration::from_secs(10),
            "coordinator metrics disagree with the map ({leaders} leaders)"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    report(
        serde_json::json!({
            "test": "node_lost", "documents": acked.len(),
            "declared_down_after_s": declared_down.as_secs_f64(),
            "rf_restored_after_s": restored.as_secs_f64(),
            "down_after_ms": DOWN_MS,
            "shards_under_replicated_seen": short_seen,
        }),
        &before,
        &during,
    );
    assert!(
        during.success_rate() >= 0.99,
        "success rate {} with a node down",
        during.success_rate()
    );
}

async fn replica_client(
    addr: &str,
) -> shoal_proto::replica::replica_client::ReplicaClient<tonic::transport::Channel> {
    shoal_proto::replica::replica_client::ReplicaClient::new(
        shoal_proto::endpoint(addr)
            .unwrap()
            .timeout(Duration::from_secs(15))
            .connect()
            .await
            .unwrap(),
    )
}

/// Which of `docs` the replica at `addr` holds (read from that replica alone).
async fn held_by(addr: &str, shard: &cpb::ShardId, docs: &[u64]) -> Vec<u64> {
    try_held_by(addr, shard, docs)
        .await
        .unwrap_or_else(|e| panic!("reading from {addr}: {e:?}"))
}

async fn try_held_by(
    addr: &str,
    shard: &cpb::ShardId,
    docs: &[u64],
) -> Result<Vec<u64>, tonic::Status> {
    let ch = shoal_proto::endpoint(addr)
        .unwrap()
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let mut rc = rpb::replica_client::ReplicaClient::new(ch);
    let mut held = Vec::new();
    for &i in docs {
        let r = rc
            .get(rpb::ShardGetRequest {
                shard_count: 0,
                shard: Some(shard.clone()),
                id: doc_id(i),
            })
            .await?
            .into_inner();
        if r.found {
            assert_eq!(r.doc.unwrap().vector, vector(i), "{} on {addr}", doc_id(i));
            held.push(i);
        }
    }
    Ok(held)
}

/// Waits until the replica at `addr` serves every one of `docs`; returns how long.
async fn wait_held(addr: &str, shard: &cpb::ShardId, docs: &[u64], within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let r = try_held_by(addr, shard, docs).await;
        if r.as_ref().is_ok_and(|h| h.len() == docs.len()) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{addr} does not hold all of {docs:?} within {within:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A collection of one shard at `rf` with an explicit write quorum, on `c`; returns the
/// shard's reference, its primary and its backups (node ids).
async fn one_shard(
    c: &Cluster,
    name: &str,
    rf: u32,
    quorum: u32,
) -> (cpb::ShardId, String, Vec<String>) {
    c.create_collection_with_quorum(name, 1, rf, quorum).await;
    c.wait_replicated(name, rf as usize, Duration::from_secs(60))
        .await;
    let s = c.shard(name, 0).await;
    let backups = s
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .filter(|n| *n != s.primary)
        .collect();
    let shard = cpb::ShardId {
        collection: name.into(),
        collection_id: c.collection_id(name).await,
        index: 0,
    };
    (shard, s.primary, backups)
}

/// Ingests `batches` batches of 10 documents (numbered from `first_batch` × 10)
/// through `gateway`; returns the acknowledged ones.
async fn ingest_via(gateway: &str, name: &str, first_batch: u64, batches: u64) -> Vec<u64> {
    ingest(
        Arc::new(Mutex::new(vec![gateway.to_string()])),
        name.into(),
        first_batch,
        batches,
        10,
        Duration::from_secs(30),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .acknowledged_docs()
}

/// A primary that crashed and came back before the down timeout still has the batches
/// its write-ahead log replayed: a backup that missed them (paused meanwhile) gets
/// them by Append, not by a snapshot of the whole shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_primary_catches_its_backup_up_from_its_log() {
    let _g = SERIAL.lock().await;
    const NAME: &str = "restart-log";
    let mut c = Cluster::start_with(2, 20_000).await;
    let (shard, primary, backups) = one_shard(&c, NAME, 2, 1).await;
    let (p, b) = (c.node_index(&primary), c.node_index(&backups[0]));
    let addrs = c.internal_addrs().await;
    let gateway = c.nodes[p].public.clone();
    let mut all = ingest_via(&gateway, NAME, 0, 2).await;
    c.wait_replicated(NAME, 2, Duration::from_secs(30)).await;
    // The backup stops; the primary alone acknowledges more (quorum 1), then crashes
    // and restarts at once (well within the down timeout: it stays the primary).
    c.pause(b);
    let alone = ingest_via(&gateway, NAME, 100, 3).await;
    assert_eq!(alone.len(), 30);
    all.extend(&alone);
    c.kill(p);
    c.restart(p);
    wait_held(&addrs[&primary], &shard, &all, Duration::from_secs(30)).await;
    c.resume(b);
    let caught_up = wait_held(&addrs[&backups[0]], &shard, &all, Duration::from_secs(30)).await;
    let sent = c.metric(p, "shoal_replication_batches_sent_total").await;
    let snapshots = c.metric(p, "shoal_replication_snapshots_sent_total").await;
    println!(
        "{}",
        serde_json::json!({
            "test": "restarted_primary_log", "batches_sent": sent,
            "snapshots_sent": snapshots, "backup_caught_up_s": caught_up.as_secs_f64(),
        })
    );
    assert_eq!(snapshots, 0.0, "the restarted primary sent a snapshot");
    assert!(sent >= 3.0, "{sent} batches sent, the backup missed 3");
}

/// After a failover at RF 3 the promoted backup catches the other backup up with the
/// batches it received while it was a backup (backups keep the recent log too), not
/// with a snapshot of the whole shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promoted_backup_catches_the_other_up_from_its_log() {
    let _g = SERIAL.lock().await;
    const NAME: &str = "failover-log";
    let mut c = Cluster::start(3).await;
    let (shard, primary, backups) = one_shard(&c, NAME, 3, 2).await;
    let (ahead, behind) = (backups[0].clone(), backups[1].clone());
    let addrs = c.internal_addrs().await;
    let gateway = c.nodes[c.node_index(&primary)].public.clone();
    let mut all = ingest_via(&gateway, NAME, 0, 2).await;
    c.wait_replicated(NAME, 3, Duration::from_secs(30)).await;
    // One backup stops while the primary and the other acknowledge more (quorum 2);
    // then the primary dies, and the stopped backup resumes before it is declared down.
    c.pause(c.node_index(&behind));
    let more = ingest_via(&gateway, NAME, 100, 3).await;
    assert_eq!(more.len(), 30);
    all.extend(&more);
    let p = c.node_index(&primary);
    c.kill(p);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.resume(c.node_index(&behind));
    let t = Instant::now();
    loop {
        let s = c.shard(NAME, 0).await;
        if s.primary == ahead {
            break;
        }
        assert_ne!(
            s.primary, behind,
            "the backup that missed writes was promoted"
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no promotion: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = t.elapsed();
    let caught_up = wait_held(&addrs[&behind], &shard, &all, Duration::from_secs(30)).await;
    let a = c.node_index(&ahead);
    let sent = c.metric(a, "shoal_replication_batches_sent_total").await;
    let snapshots = c.metric(a, "shoal_replication_snapshots_sent_total").await;
    println!(
        "{}",
        serde_json::json!({
            "test": "promoted_backup_log", "batches_sent": sent,
            "snapshots_sent": snapshots,
            "promoted_after_s": promoted.as_secs_f64(),
            "behind_caught_up_s": caught_up.as_secs_f64(),
        })
    );
    assert_eq!(snapshots, 0.0, "the promoted backup sent a snapshot");
    assert!(
        sent >= 3.0,
        "{sent} batches sent, the other backup missed 3"
    );
}

/// The divergence path: with a write quorum of 1 the primary acknowledges writes its
/// backup (paused) never got, once the map has taken the lagging backup out of the
/// in-sync set (issue 16); an operator then promotes that backup, out of sync, accepting
/// the loss (refused without). The old primary is fenced at once and, when the new primary reaches it, its
/// history no longer matches (its last batch's epoch is one the new primary never
/// wrote at that sequence number): it is replaced by a snapshot, truncating the writes
/// its successor never had, and follows the new primary from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_primary_truncates_what_its_successor_never_had() {
    let _g = SERIAL.lock().await;
    const NAME: &str = "quorum-one";
    // The paused backup must not be declared down (and evicted) mid-test.
    let c = Cluster::start_with(3, 20_000).await;
    c.create_collection_with_quorum(NAME, 1, 2, 1).await;
    c.wait_replicated(NAME, 2, Duration::from_secs(60)).await;
    let shard0 = c.shards(NAME).await.remove(0);
    let old = shard0.primary.clone();
    let new = shard0
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .find(|n| *n != old)
        .unwrap();
    let addrs = c.internal_addrs().await;
    let coll_id = c.collection_id(NAME).await;
    let shard_ref = cpb::ShardId {
        collection: NAME.into(),
        collection_id: coll_id,
        index: 0,
    };
    let gateway = c.nodes[c.node_index(&old)].public.clone();
    let only_old = Arc::new(Mutex::new(vec![gateway.clone()]));
    let never = Arc::new(AtomicBool::new(false));
    let ingest_range = |first_batch, batches| {
        ingest(
            only_old.clone(),
            NAME.into(),
            first_batch,
            batches,
            10,
            Duration::from_secs(30),
            never.clone(),
        )
    };
    // Both replicas hold the first 40 documents.
    let shared = ingest_range(0, 4).await.acknowledged_docs();
    assert_eq!(shared.len(), 40);
    c.wait_replicated(NAME, 2, Duration::from_secs(30)).await;

    // The backup stops; the primary alone acknowledges 20 more (quorum 1).
    c.pause(c.node_index(&new));
    let t = Instant::now();
    let alone = ingest_range(100, 2).await.acknowledged_docs();
    let alone_took = t.elapsed();
    assert_eq!(alone.len(), 20, "quorum-1 writes not acknowledged");
    // The leader learns the primary's new sequence number from its next heartbeat.
    let primary_seq = loop {
        let s = c.shards(NAME).await.remove(0);
        let seq = |n: &str| {
            s.replicas
                .iter()
                .find(|r| r.node_id == n)
                .map_or(0, |r| r.applied_seq)
        };
        if seq(&old) > seq(&new) {
            break seq(&old);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no report: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let promote = |accept_data_loss| {
        let mut admin = c.admin();
        let req = cpb::PromoteReplicaRequest {
            collection: NAME.into(),
            shard: 0,
            node_id: new.clone(),
            accept_data_loss,
        };
        async move {
            admin
                .admin(|mut a| {
                    let r = req.clone();
                    async move { a.promote_replica(r).await }
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let refused = promote(false).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let promoted = promote(true).await.expect("promote with accept_data_loss");
    assert_eq!(
        (promoted.primary.as_str(), promoted.epoch),
        (new.as_str(), shard0.epoch + 1)
    );
    // The old primary hears of the new epoch from the map (its report says so) and
    // from then on refuses writes.
    loop {
        let s = c.shards(NAME).await.remove(0);
        if s.replicas
            .iter()
            .any(|r| r.node_id == old && r.epoch == promoted.epoch)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "old primary not told: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fenced = replica_client(&addrs[&old])
        .await
        .write(rpb::WriteRequest {
            shard: Some(shard_ref.clone()),
            upserts: vec![rpb::StoredDoc {
                id: "late-write".into(),
                vector: vector(999_999),
                ..Default::default()
            }],
            request_id: "late".into(),
            ..Default::default()
        })
        .await
        .expect_err("the old primary acknowledged a write after the promotion")
        .message()
        .to_string();
    c.resume(c.node_index(&new));
    let resumed = Instant::now();

    // The new primary snapshots itself onto the old one, which then holds exactly the
    // shared documents; new writes reach both.
    c.wait_replicated(NAME, 2, Duration::from_secs(60)).await;
    let rejoined = resumed.elapsed();
    let after = ingest_range(200, 2).await.acknowledged_docs();
    assert_eq!(after.len(), 20);
    c.wait_replicated(NAME, 2, Duration::from_secs(30)).await;
    let mut all: Vec<u64> = shared.clone();
    all.extend(&alone);
    all.extend(&after);
    // The old primary's Append in flight when the backup stopped may land when it
    // resumes, before it learns of its promotion: those writes are legitimately the
    // new primary's too. The rest of the quorum-1 writes exist on neither replica.
    let diverged = c
        .metric(
            c.node_index(&new),
            "shoal_replication_snapshots_sent_total{reason=\"diverged\"}",
        )
        .await;
    assert!(diverged >= 1.0, "no snapshot counted as diverged");
    let on_new = held_by(&addrs[&new], &shard_ref, &all).await;
    let on_old = held_by(&addrs[&old], &shard_ref, &all).await;
    assert_eq!(on_old, on_new, "the replicas differ after the handover");
    assert!(shared.iter().chain(&after).all(|d| on_new.contains(d)));
    let survived: Vec<u64> = alone
        .iter()
        .copied()
        .filter(|d| on_new.contains(d))
        .collect();
    let truncated = alone.len() - survived.len();
    assert!(
        truncated > 0,
        "nothing was truncated: the divergence path did not run"
    );
    // The coordinators' view agrees once both replicas have reported since (their
    // heartbeats carry the counts, up to one period late).
    let t = Instant::now();
    loop {
        let s = c.shard(NAME, 0).await;
        if s.replicas
            .iter()
            .all(|r| r.live_docs == on_new.len() as u64)
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{}",
        serde_json::json!({
            "test": "stale_primary_truncated", "quorum_one_acks": alone.len(),
            "quorum_one_ingest_ms": alone_took.as_millis() as u64,
            "old_primary_seq": primary_seq, "refused_without_flag": refused.message(),
            "old_primary_fenced": fenced, "truncated_docs": truncated,
            "delivered_in_flight": survived.len(),
            "rejoined_after_s": rejoined.as_secs_f64(),
        })
    );
}

/// Issue 16: primary moves go through the in-sync rule. Draining the node that leads
/// the most shards moves each of its replicas to a copy; a copy is waited for on every
/// write before the map counts it in sync, and a leaving primary's copy then leads
/// under a new epoch. Three writers through every gateway (each batch retried with its
/// request id) lose nothing, and the drained node ends with no replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_primaries_under_writers_loses_nothing() {
    let _g = SERIAL.lock().await;
    let c = replicated_cluster().await;
    let before = c.shards(COLLECTION).await;
    let mut leads: std::collections::BTreeMap<String, usize> = Default::default();
    for s in &before {
        *leads.entry(s.primary.clone()).or_default() += 1;
    }
    let (target, led) = leads.into_iter().max_by_key(|(_, n)| *n).unwrap();
    let writers = Writers::start(
        c.nodes.iter().map(|n| n.public.clone()).collect(),
        COLLECTION,
        3,
        5,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let req = cpb::DrainNodeRequest {
        id: target.clone(),
        undo: false,
    };
    c.admin()
        .admin(|mut a| {
            let r = req.clone();
            async move { a.drain_node(r).await }
        })
        .await
        .expect("drain");
    let after = eventually(
        Duration::from_secs(90),
        "the drained node holds no replica and every replica serves",
        || async {
            let shards = c.shards(COLLECTION).await;
            shards
                .iter()
                .all(|s| {
                    s.replicas.len() == 2
                        && s.replicas.iter().all(|r| {
                            r.node_id != target && r.state == cpb::ReplicaState::Serving as i32
                        })
                })
                .then_some(shards)
        },
    )
    .await;
    let drained = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let Written {
        docs,
        batches: acked,
        not_acknowledged: unknown,
    } = writers.finish().await;
    for s in &before {
        let a = after.iter().find(|x| x.index == s.index).unwrap();
        if s.primary == target {
            assert!(a.epoch > s.epoch && a.primary != target, "{a:#?}");
        }
    }
    let gateway = c
        .nodes
        .iter()
        .find(|n| n.id != target)
        .unwrap()
        .public
        .clone();
    check_acknowledged(&gateway, COLLECTION, &docs).await;
    println!(
        "{}",
        serde_json::json!({
            "test": "drain_primaries_under_writers", "primaries_moved": led,
            "drained_s": drained.as_secs_f64(), "batches": acked,
            "not_acknowledged": unknown, "docs_checked": docs.len(),
        })
    );
    assert_eq!(unknown, 0, "a batch was never acknowledged");
}

/// Issue 16: scale-out under writers. A fourth node joins a cluster of three holding
/// 4 shards at RF 2: placement moves replicas to it (a leaving primary stops its writes
/// and hands its role to the copy that joins, through its in-sync report), then the
/// leader evens out primaries by asking a primary to hand its role over (the planned
/// move's own path: writes stop, the successor holds every write, then it leads).
/// Three writers through every gateway lose nothing; the new node ends holding and
/// leading shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_out_under_writers_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = Cluster::start_spec(Spec {
        nodes: 4,
        held_back: 1,
        coordinator_flags: vec!["--rebalance-settle-ms".into(), "2000".into()],
        ..Spec::default()
    })
    .await;
    c.create_collection(COLLECTION, 4, 2).await;
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    let before = c.shards(COLLECTION).await;
    let writers = Writers::start(
        c.nodes[..3].iter().map(|n| n.public.clone()).collect(),
        COLLECTION,
        3,
        5,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    c.restart(3);
    let new = c.nodes[3].id.clone();
    let after = eventually(
        Duration::from_secs(120),
        "the new node holds replicas and leads a shard, and every replica serves",
        || async {
            let shards = c.shards(COLLECTION).await;
            let holds = shards
                .iter()
                .filter(|s| s.replicas.iter().any(|r| r.node_id == new))
                .count();
            let settled = shards.iter().all(|s| {
                s.replicas.len() == 2
                    && s.replicas
                        .iter()
                        .all(|r| r.state == cpb::ReplicaState::Serving as i32)
            });
            let leads = shards.iter().any(|s| s.primary == new);
            (holds >= 2 && settled && leads).then_some(shards)
        },
    )
    .await;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let Written {
        docs,
        batches,
        not_acknowledged,
    } = writers.finish().await;
    let moved: usize = after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.index == a.index).unwrap();
            a.replicas
                .iter()
                .filter(|r| !b.replicas.iter().any(|x| x.node_id == r.node_id))
                .count()
        })
        .sum();
    let new_primaries = after
        .iter()
        .filter(|a| {
            let b = before.iter().find(|b| b.index == a.index).unwrap();
            assert!(a.primary == b.primary || a.epoch > b.epoch, "{a:#?}");
            a.primary != b.primary
        })
        .count();
    check_acknowledged(&c.nodes[3].public, COLLECTION, &docs).await;
    check_acknowledged(&c.nodes[0].public, COLLECTION, &docs).await;
    println!(
        "{}",
        serde_json::json!({
            "test": "scale_out_under_writers", "replicas_moved": moved,
            "primaries_moved": new_primaries, "settled_s": took.as_secs_f64(),
            "batches": batches, "not_acknowledged": not_acknowledged,
            "docs_checked": docs.len(),
        })
    );
    assert_eq!(not_acknowledged, 0, "a batch was never acknowledged");
}
