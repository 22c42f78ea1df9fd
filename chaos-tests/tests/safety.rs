//! Issue 14's routine failures, on a real cluster of processes (three coordinators,
//! three nodes, RF 2, three shards), each under several concurrent writers with request
//! ids and a query loop that searches exactly for documents already acknowledged: a
//! rack of two nodes lost past the down timeout, a node back with an empty volume, the
//! whole node tier restarted past the down timeout, and a node pointed at the
//! coordinators of another cluster. At the end every acknowledged document is present,
//! with its exact vector, and no answer that claimed to be complete missed one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_chaos_tests::*;
use shoal_proto::coordinator as cpb;

/// One cluster at a time: each is six processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COLLECTION: &str = "safety";
const WRITERS: u64 = 3;
const PER_BATCH: u64 = 20;

/// Concurrent writers, each over its own range of batches (request ids), until `stop`.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Record>>,
}

impl Writers {
    fn start(nodes: &Arc<Mutex<Vec<String>>>, first_batch: u64, batches: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|w| {
                tokio::spawn(ingest(
                    nodes.clone(),
                    COLLECTION.into(),
                    first_batch + w * 1_000,
                    batches,
                    PER_BATCH,
                    Duration::from_secs(90),
                    stop.clone(),
                ))
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops them; (acknowledged documents, documents whose outcome is unknown).
    async fn finish(self) -> (Vec<u64>, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.join().await
    }

    /// Waits until they are done with their batches.
    async fn join(self) -> (Vec<u64>, Vec<u64>) {
        let (mut acked, mut unknown) = (Vec::new(), Vec::new());
        for t in self.tasks {
            let r = t.await.unwrap();
            acked.extend(r.acknowledged_docs());
            for ((first, n), o) in r.batches {
                if o == Outcome::Unknown {
                    unknown.extend(first..first + n);
                }
            }
        }
        (acked, unknown)
    }
}

struct Verify {
    stats: Arc<Mutex<VerifyStats>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Verify {
    fn start(nodes: &Arc<Mutex<Vec<String>>>, acked: &[u64]) -> Self {
        let stats = Arc::new(Mutex::new(VerifyStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(verify_loop(
            nodes.clone(),
            COLLECTION.into(),
            Arc::new(Mutex::new(acked.to_vec())),
            stats.clone(),
            stop.clone(),
        ));
        Self { stats, stop, task }
    }

    async fn finish(self) -> VerifyStats {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let s = self.stats.lock().unwrap().clone();
        s
    }
}

async fn cluster() -> Cluster {
    cluster_with(&[]).await
}

async fn cluster_with(coordinator_args: &[&str]) -> Cluster {
    let c = Cluster::start_full(3, DOWN_MS, coordinator_args).await;
    c.create_collection(COLLECTION, 3, 2).await;
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    c
}

/// Writes a first round through every node; all of it must be acknowledged.
async fn first_round(c: &Cluster) -> Vec<u64> {
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let (acked, unknown) = Writers::start(&nodes, 0, 4).join().await;
    assert!(unknown.is_empty(), "{} unknown outcomes", unknown.len());
    assert_eq!(acked.len() as u64, WRITERS * 4 * PER_BATCH);
    acked
}

/// The end state: every shard back at two caught-up serving replicas; every
/// acknowledged document present once with its exact vector, through every node; the
/// primaries hold nothing but acknowledged and unknown-outcome documents.
async fn final_check(c: &Cluster, acked: &[u64], unknown: &[u64]) -> Duration {
    let recovered = c
        .wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    for node in c.running_nodes() {
        check_acknowledged(&node, COLLECTION, acked).await;
    }
    // Writers that run to their last batch reuse the first round's request ids: count
    // each document once.
    let acked: std::collections::BTreeSet<u64> = acked.iter().copied().collect();
    let unknown = unknown.iter().filter(|d| !acked.contains(d)).count();
    let t = Instant::now();
    loop {
        let live = live_docs(&c.shards(COLLECTION).await);
        let range = acked.len() as u64..=(acked.len() + unknown) as u64;
        if range.contains(&live) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "primaries hold {live} documents; {} acknowledged, {unknown} unknown",
            acked.len(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    recovered
}

fn figures(test: &str, acked: usize, v: &VerifyStats, extra: serde_json::Value) {
    let mut j = serde_json::json!({
        "test": test, "acknowledged": acked, "lost": 0,
        "queries_complete": v.complete, "queries_partial": v.partial,
        "queries_failed": v.failed, "silent_misses": v.silent_misses.len(),
    });
    if let (Some(o), Some(e)) = (j.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    println!("{j}");
}

/// Issue 14's rack loss: two of three nodes killed together and kept away past the down
/// timeout. The shard whose both copies were on them is never re-created empty: it is
/// unavailable (searches partial, writes retried) until they come back with their data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rack_loss_past_the_down_timeout_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let mut acked = first_round(&c).await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    let writers = Writers::start(&nodes, 100, 1_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a, b) = (c.node_index("node-2"), c.node_index("node-3"));
    c.kill(a);
    c.kill(b);
    let t = Instant::now();
    c.wait_node_state("node-2", cpb::NodeState::Down, Duration::from_secs(20))
        .await;
    c.wait_node_state("node-3", cpb::NodeState::Down, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nothing on the surviving node took over a shard it never held.
    for s in c.shards(COLLECTION).await {
        let on_n1 = s.replicas.iter().find(|r| r.node_id == "node-1");
        if on_n1.is_none_or(|r| r.state != cpb::ReplicaState::Serving as i32) {
            assert_ne!(s.primary, "node-1", "an empty copy leads {s:#?}");
        }
    }
    c.restart(a);
    c.restart(b);
    let away = t.elapsed();
    let recovered_at = Instant::now();
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    let recovered = recovered_at.elapsed();
    // Writes go on a moment with everything back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (during, unknown) = writers.finish().await;
    let v = verify.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    assert!(
        v.partial > 0,
        "no answer during the loss said it was partial: {v:?}"
    );
    figures(
        "rack_loss",
        acked.len(),
        &v,
        serde_json::json!({"away_s": away.as_secs_f64(), "recover_s": recovered.as_secs_f64(),
                           "unknown_outcome": unknown.len()}),
    );
}

/// The rack loss's hard case, made certain: the primary of a shard logs a batch its
/// backup never receives (the backup is paused), then the primary and the third node
/// die together. The backup is promoted (it holds every acknowledged write) and the
/// deposed primary comes back holding one batch more, of the old epoch, never
/// acknowledged. Either copy may win (that batch's outcome was never reported), but the
/// shard must come back to two serving replicas that agree, with nothing acknowledged
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_primary_back_with_an_unacknowledged_batch_rejoins() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let acked = first_round(&c).await;
    let s = c.shard(COLLECTION, 0).await;
    let p = s.primary.clone();
    let b = s
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .find(|n| *n != p)
        .unwrap();
    let x = ["node-1", "node-2", "node-3"]
        .into_iter()
        .find(|n| *n != p && *n != b)
        .unwrap()
        .to_string();
    let (pi, bi, xi) = (c.node_index(&p), c.node_index(&b), c.node_index(&x));
    c.pause(bi);
    let unknown: Vec<u64> = (900_000..900_060).collect();
    let mut client = connect(&c.nodes[pi].public).await.unwrap();
    let req = shoal_proto::v1::IngestRequest {
        collection: COLLECTION.into(),
        documents: unknown
            .iter()
            .map(|&d| shoal_proto::v1::Document {
                id: doc_id(d),
                vector: vector(d),
                ..Default::default()
            })
            .collect(),
        request_id: "never-acknowledged".into(),
    };
    let pending = tokio::spawn(async move { client.ingest(req).await });
    // The primary logged the batch; its backup, paused, did not.
    let t = Instant::now();
    loop {
        let s = c.shard(COLLECTION, 0).await;
        let seq = |n: &str| {
            s.replicas
                .iter()
                .find(|r| r.node_id == n)
                .map_or(0, |r| r.applied_seq)
        };
        if seq(&p) > seq(&b) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the primary never logged the batch: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.kill(pi);
    c.kill(xi);
    c.resume(bi);
    assert!(
        pending.await.unwrap().is_err(),
        "acknowledged without its backup"
    );
    c.wait_node_state(&p, cpb::NodeState::Down, Duration::from_secs(20))
        .await;
    let t = Instant::now();
    while c.shard(COLLECTION, 0).await.primary != b {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the backup was never promoted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.restart(pi);
    c.restart(xi);
    let back = c
        .wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    final_check(&c, &acked, &unknown).await;
    // The two copies agree on the shard's documents.
    let s = c.shard(COLLECTION, 0).await;
    let live: Vec<u64> = s.replicas.iter().map(|r| r.live_docs).collect();
    assert!(live.windows(2).all(|w| w[0] == w[1]), "{s:#?}");
    println!(
        "{}",
        serde_json::json!({"test": "deposed_primary_rejoins", "acknowledged": acked.len(),
                           "lost": 0, "replicated_after_restart_s": back.as_secs_f64()})
    );
}

/// Issue 14's replaced volume: a node killed, its data dir wiped, restarted within the
/// down timeout. It registers with a new volume: its replicas stop serving and leading
/// and are filled again from the copies that hold the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_back_with_an_empty_volume_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let mut acked = first_round(&c).await;
    let led: Vec<u32> = c
        .shards(COLLECTION)
        .await
        .iter()
        .filter(|s| s.primary == "node-1")
        .map(|s| s.index)
        .collect();
    assert!(!led.is_empty(), "n1 leads no shard");
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    let writers = Writers::start(&nodes, 100, 1_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let i = c.node_index("node-1");
    c.kill(i);
    std::fs::remove_dir_all(c.node_dir(i)).unwrap();
    c.restart(i);
    let t = Instant::now();
    // The leader demotes the empty replicas and promotes the copies that hold the data.
    let shards = loop {
        let shards = c.shards(COLLECTION).await;
        if led.iter().all(|&k| {
            let s = &shards[k as usize];
            !s.primary.is_empty() && s.primary != "node-1"
        }) {
            break shards;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "n1's shards not handed over: {shards:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let handed_over = t.elapsed();
    for s in &shards {
        assert_ne!(s.primary, "node-1");
    }
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    let recovered = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (during, unknown) = writers.finish().await;
    let v = verify.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    assert!(c.node_log(i).contains("new data volume"));
    figures(
        "replaced_volume",
        acked.len(),
        &v,
        serde_json::json!({"handed_over_s": handed_over.as_secs_f64(),
                           "recover_s": recovered.as_secs_f64(), "unknown_outcome": unknown.len()}),
    );
}

/// Every node killed and kept away past the down timeout, then restarted; then one
/// node pointed at a coordinator group of another cluster, which it refuses (and which
/// refuses it) without touching its data, until it is pointed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_node_tier_restart_and_a_foreign_cluster_lose_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let mut acked = first_round(&c).await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    let writers = Writers::start(&nodes, 100, 1_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        c.kill(i);
    }
    let t = Instant::now();
    for n in ["node-1", "node-2", "node-3"] {
        c.wait_node_state(n, cpb::NodeState::Down, Duration::from_secs(20))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        c.restart(i);
    }
    let away = t.elapsed();
    let back = Instant::now();
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    let recovered = back.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (during, unknown) = writers.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;

    // Another cluster's coordinators: the node refuses to join them and exits, its
    // data untouched.
    let foreign = Cluster::start(0).await;
    let i = c.node_index("node-3");
    c.terminate(i, Duration::from_secs(20)).await;
    let before = dir_bytes(&c.node_dir(i));
    c.set_node_args(i, &foreign.coordinators, &[]);
    c.restart(i);
    let status = c
        .wait_exit(i, Duration::from_secs(60))
        .await
        .expect("the node joined a foreign cluster");
    assert!(!status.success());
    let log = c.node_log(i);
    assert!(log.contains("holds data of cluster"), "{log}");
    assert_eq!(
        dir_bytes(&c.node_dir(i)),
        before,
        "the refused node's data changed"
    );
    let coords = c.coordinators.clone();
    c.set_node_args(i, &coords, &[]);
    c.restart(i);
    final_check(&c, &acked, &unknown).await;
    let v = verify.finish().await;
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    figures(
        "whole_tier_restart_and_foreign_cluster",
        acked.len(),
        &v,
        serde_json::json!({"away_s": away.as_secs_f64(), "recover_s": recovered.as_secs_f64(),
                           "unknown_outcome": unknown.len(), "foreign_cluster_refused": true}),
    );
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A size-limited tmpfs mounted over a node's data dir (its contents copied in), and
/// unmounted (lazily) when dropped, also when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount_over(dir: &std::path::Path, bytes: u64) -> Tmpfs {
        let run = |args: &[&str]| {
            let st = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(st.success(), "{args:?}: {st}");
        };
        let aside = dir.with_extension("aside");
        std::fs::rename(dir, &aside).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let size = format!("size={bytes}");
        let d = dir.display().to_string();
        run(&["mount", "-t", "tmpfs", "-o", &size, "tmpfs", &d]);
        let guard = Tmpfs(dir.to_path_buf());
        run(&["cp", "-a", &format!("{}/.", aside.display()), &d]);
        std::fs::remove_dir_all(&aside).unwrap();
        guard
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &self.0.display().to_string()])
            .status();
    }
}

fn free_bytes(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1", &dir.display().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

/// A full disk on one node (a 64 MiB tmpfs, as root, which this machine and CI are):
/// once its free space falls under `--disk-reserve-bytes`, writes to its shards are
/// refused before the disk fills (RESOURCE_EXHAUSTED at a primary; a backup refuses
/// the batches, so nothing is acknowledged without it), searches go on, and once the
/// space is freed writes resume; nothing acknowledged is lost and no replica is
/// poisoned by a half-written batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_until_freed_and_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let mut acked = first_round(&c).await;
    let i = c.node_index("node-3");
    c.terminate(i, Duration::from_secs(20)).await;
    let dir = c.node_dir(i);
    let _mount = Tmpfs::mount_over(&dir, 64 << 20);
    let reserve: u64 = 16 << 20;
    let coords = c.coordinators.clone();
    c.set_node_args(i, &coords, &["--disk-reserve-bytes", &reserve.to_string()]);
    c.restart(i);
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    // Fill the volume to 8 MiB free, under the reserve.
    let ballast = dir.join("ballast");
    let fill = free_bytes(&dir) - (8 << 20);
    std::fs::write(&ballast, vec![7u8; fill as usize]).unwrap();
    let t = Instant::now();
    let refused = loop {
        let mut client = connect(&c.nodes[0].public).await.unwrap();
        let r = client
            .ingest(shoal_proto::v1::IngestRequest {
                collection: COLLECTION.into(),
                documents: (900_000..900_020)
                    .map(|d| shoal_proto::v1::Document {
                        id: doc_id(d),
                        vector: vector(d),
                        ..Default::default()
                    })
                    .collect(),
                request_id: "while-full".into(),
            })
            .await;
        if let Err(e) = r {
            break e;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "writes never refused"
        );
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("disk_reserve_bytes"),
        "{refused:?}"
    );
    let writers = Writers::start(&nodes, 100, 1_000);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let refusals = c.metric(i, "shoal_writes_refused_disk_total").await;
    assert!(refusals > 0.0, "node n3 refused no write for its disk");
    // Space back: writes resume by themselves.
    std::fs::remove_file(&ballast).unwrap();
    let freed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (during, mut unknown) = writers.finish().await;
    // The refused batch spans every shard: the shards whose replicas had room may have
    // applied their part (a batch is atomic per shard, not across shards).
    unknown.extend(900_000..900_020);
    let resumed = freed.elapsed();
    let v = verify.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    assert!(!c.node_log(i).contains("shard poisoned"));
    assert!(
        !during.is_empty(),
        "no write acknowledged after the space was freed"
    );
    figures(
        "full_disk",
        acked.len(),
        &v,
        serde_json::json!({"refused_with": format!("{:?}", refused.code()),
                           "refused_message": refused.message(), "disk_refusals": refusals,
                           "writes_after_freeing_s": resumed.as_secs_f64(),
                           "unknown_outcome": unknown.len()}),
    );
    c.terminate(i, Duration::from_secs(20)).await;
}

/// Keeps `dir`'s file system full to the last byte until dropped: a thread tops the
/// ballast file up every 20 ms, so space the node frees (a checkpoint dropping an old
/// log, its trash emptied) or tmpfs's per-CPU accounting slack lets through is taken
/// again (with a single fill, a node once went on writing for a minute).
struct Ballast {
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ballast {
    fn fill(dir: &std::path::Path) -> Ballast {
        use std::io::Write;
        let path = dir.join("ballast");
        let mut f = std::fs::File::create(&path).unwrap();
        let top_up = move |f: &mut std::fs::File| {
            let chunk = vec![7u8; 1 << 20];
            while f.write_all(&chunk).is_ok() {}
            while f.write_all(&[7u8]).is_ok() {}
        };
        top_up(&mut f);
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                top_up(&mut f);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ballast {
            path,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops topping up and deletes the ballast: the space is back.
    fn free(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::fs::remove_file(&self.path).unwrap();
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A disk that fills with no reserve (`--disk-reserve-bytes 0`) and faster than
/// placement's watermarks move anything (here they are off, so the path is certain;
/// left on, they sometimes moved the replicas off before a write failed): a write fails
/// with an I/O error and poisons the node's replica. The node reports it failed, the leader
/// takes it out of its shard's quorum through the map (a copy; a failed primary hands
/// over to its backup), so writes go on without it instead of timing out; once space
/// is back the node reopens it (open needs no free space beyond replaying its log),
/// it catches up and serves again. Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_poisoned_by_a_full_disk_leaves_its_quorum_and_comes_back() {
    let _g = SERIAL.lock().await;
    let mut c = cluster_with(&["--disk-threshold-enabled", "false"]).await;
    let mut acked = first_round(&c).await;
    let i = c.node_index("node-3");
    c.terminate(i, Duration::from_secs(20)).await;
    let dir = c.node_dir(i);
    let _mount = Tmpfs::mount_over(&dir, 64 << 20);
    let coords = c.coordinators.clone();
    c.set_node_args(i, &coords, &["--disk-reserve-bytes", "0"]);
    c.restart(i);
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
        .await;
    // RF 3 needs n3 up again, not only the RF 2 collection served by the others.
    c.wait_up(3, Duration::from_secs(30)).await;
    c.create_collection("safety3", 3, 3).await;
    c.wait_replicated("safety3", 3, Duration::from_secs(60))
        .await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    // Enough batches to keep writing until `finish` stops them: with 300 each, a slow
    // run (the full suite) finished all 912 before the disk filled, so no write met it
    // and nothing failed (the test timed out waiting for a failure).
    let writers = Writers::start(&nodes, 100, 1_000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The shards n3 serves when its disk fills, placement at rest (no copy moving):
    // the ones whose replicas must fail and leave their quorum.
    let t = Instant::now();
    let serving_on_n3: Vec<u32> = loop {
        let shards = c.shards(COLLECTION).await;
        let settled = shards.iter().all(|s| {
            s.replicas
                .iter()
                .all(|r| r.state == cpb::ReplicaState::Serving as i32)
        });
        let on_n3: Vec<u32> = shards
            .iter()
            .filter(|s| s.replicas.iter().any(|r| r.node_id == "node-3"))
            .map(|s| s.index)
            .collect();
        if settled && !on_n3.is_empty() {
            break on_n3;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "placement never settled with n3 serving a shard: {shards:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ballast = Ballast::fill(&dir);
    let full = Instant::now();
    // n3's replicas fail as writes reach them (a writer's batch spans every shard and is
    // retried whole, so once one shard refuses, the writers may stop reaching the
    // others): at least one of those it served is now a copy outside its quorum, and
    // no shard whose replica on n3 left is led by n3 (a failed primary handed over).
    let out = loop {
        let shards = c.shards(COLLECTION).await;
        let left: Vec<&cpb::Shard> = shards
            .iter()
            .filter(|s| serving_on_n3.contains(&s.index))
            .filter(|s| {
                s.replicas
                    .iter()
                    .filter(|r| r.node_id == "node-3")
                    .all(|r| r.state != cpb::ReplicaState::Serving as i32)
            })
            .collect();
        if !left.is_empty() && left.iter().all(|s| s.primary != "node-3") {
            break full.elapsed();
        }
        assert!(
            full.elapsed() < Duration::from_secs(60),
            "n3's failed replicas never left their quorum: {shards:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // They left because n3 reported them failed (its writes hit ENOSPC), not by chance.
    let log = c.node_log(i);
    assert!(
        log.contains("shard poisoned"),
        "no replica on n3 was poisoned; its log ends: {}",
        &log[log.floor_char_boundary(log.len().saturating_sub(6000))..]
    );
    assert!(
        (0..3).any(|k| c
            .coordinator_log(k)
            .contains("a failed replica leaves its shard's quorum")),
        "no coordinator took a failed replica out of its quorum"
    );
    // While n3's disk stays full: the RF 2 collection's writes to its shards are
    // refused at once with UNAVAILABLE (writes need two in-sync copies), not left to
    // time out; the RF 3 collection's writes go on with two.
    let probe = |collection: &str, first: u64, request_id: &str| shoal_proto::v1::IngestRequest {
        collection: collection.into(),
        documents: (first..first + 30)
            .map(|d| shoal_proto::v1::Document {
                id: doc_id(d),
                vector: vector(d),
                ..Default::default()
            })
            .collect(),
        request_id: request_id.into(),
    };
    let mut client = connect(&c.nodes[0].public).await.unwrap();
    let t = Instant::now();
    let refused = client
        .ingest(probe(COLLECTION, 800_000, "while-n3-is-out"))
        .await
        .unwrap_err();
    let refused_in = t.elapsed();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("in-sync replica"), "{refused:?}");
    let t = Instant::now();
    let acked_rf3 = loop {
        match client
            .ingest(probe("safety3", 0, "rf3-while-n3-is-out"))
            .await
        {
            Ok(_) => break t.elapsed(),
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(30),
                "no RF 3 write acknowledged while n3 was out: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let unknown_probe: Vec<u64> = (800_000..800_030).collect();
    // Space back: n3 reopens its replicas, they catch up and serve again.
    ballast.free();
    let freed = Instant::now();
    let back = c
        .wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    let (during, mut unknown) = writers.finish().await;
    unknown.extend(unknown_probe);
    let v = verify.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;
    c.wait_replicated("safety3", 3, Duration::from_secs(60))
        .await;
    for node in c.running_nodes() {
        assert_eq!(
            check_acknowledged(&node, "safety3", &(0..30).collect::<Vec<_>>()).await,
            30
        );
    }
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    assert!(!during.is_empty());
    figures(
        "replica_failed_on_full_disk",
        acked.len(),
        &v,
        serde_json::json!({"left_quorum_after_s": out.as_secs_f64(),
                           "serving_again_after_freeing_s": back.as_secs_f64(),
                           "rf2_write_refused_in_s": refused_in.as_secs_f64(),
                           "rf3_write_acknowledged_while_out_s": acked_rf3.as_secs_f64(),
                           "unknown_outcome": unknown.len(),
                           "freed_to_end_s": freed.elapsed().as_secs_f64()}),
    );
    c.terminate(i, Duration::from_secs(20)).await;
}

/// Snapshot installs in flight under a node's data dir: replica directories being
/// received (`<index>.incoming`) or swapped (`<index>.old`).
fn installs_in_flight(node_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(colls) = std::fs::read_dir(node_dir.join("shards")) else {
        return Vec::new();
    };
    colls
        .flatten()
        .filter_map(|c| std::fs::read_dir(c.path()).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "incoming" || e == "old"))
        .collect()
}

/// Issue 14: a node SIGKILLed in the middle of installing a snapshot (a watcher kills
/// it the moment a snapshot directory appears, and the test checks one was left
/// half-done) comes back to whole replicas: the half-received copy is dropped, an
/// interrupted swap finished or undone, and the copy filled again; nothing
/// acknowledged is lost and no answer claiming completeness misses a document.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_snapshot_install_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    // A recent log too small to catch a new copy up batch by batch: the primaries on
    // n2 and n3 fill n1's new volume with snapshots.
    let coords = c.coordinators.clone();
    for id in ["node-2", "node-3"] {
        let k = c.node_index(id);
        c.terminate(k, Duration::from_secs(20)).await;
        c.set_node_args(k, &coords, &["--recent-log-bytes", "4096"]);
        c.restart(k);
        c.wait_replicated(COLLECTION, 2, Duration::from_secs(60))
            .await;
    }
    let mut acked = first_round(&c).await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    let writers = Writers::start(&nodes, 100, 300);
    // Some data to copy.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let i = c.node_index("node-1");
    let dir = c.node_dir(i);
    let mut interrupted = Vec::new();
    let mut tries = 0;
    while interrupted.is_empty() && tries < 5 {
        tries += 1;
        // A new, empty volume: every replica on n1 is filled by a snapshot.
        c.kill(i);
        std::fs::remove_dir_all(&dir).unwrap();
        c.restart(i);
        let pid = c.nodes[i].pid().unwrap();
        let d = dir.clone();
        let seen = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if !installs_in_flight(&d).is_empty() {
                    // SAFETY: kill(2) on the node process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return true;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            false
        })
        .await
        .unwrap();
        c.kill(i);
        if seen {
            interrupted = installs_in_flight(&dir);
        }
    }
    assert!(
        !interrupted.is_empty(),
        "no snapshot install caught in flight in {tries} tries"
    );
    c.restart(i);
    let t = Instant::now();
    c.wait_replicated(COLLECTION, 2, Duration::from_secs(90))
        .await;
    let recovered = t.elapsed();
    assert!(installs_in_flight(&dir).is_empty());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (during, unknown) = writers.finish().await;
    let v = verify.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    figures(
        "killed_mid_snapshot_install",
        acked.len(),
        &v,
        serde_json::json!({"tries": tries,
                           "interrupted": interrupted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                           "recover_s": recovered.as_secs_f64(), "unknown_outcome": unknown.len()}),
    );
}

/// Issue 14: a coordinator member restarted *behind* (its data dir put back to a copy
/// taken before a collection was created and filled) while writers and the verifying
/// query loop run. The member catches up from the leader; no node takes a map older
/// than its own (nodes may hear from it while it is behind) and no node moves a replica
/// to the trash; every acknowledged document of both collections is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_restarted_behind_moves_nothing_backwards() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let mut acked = first_round(&c).await;
    // A follower: the leader keeps every committed entry.
    let leader = c.coordinator_status(0).await.expect("status").leader;
    let k = (0..3).find(|&k| k as u64 + 1 != leader).unwrap();
    let l = leader as usize - 1;
    c.stop_coordinator(k, Duration::from_secs(20)).await;
    let dir = c.coordinator_dir(k);
    let old = dir.with_extension("behind");
    let cp = std::process::Command::new("cp")
        .args(["-a", &dir.display().to_string(), &old.display().to_string()])
        .status()
        .unwrap();
    assert!(cp.success());
    let copied_at = c.coordinator_status(l).await.expect("leader status");
    c.start_coordinator(k);
    // The map moves on past the copy: a second collection, filled.
    c.create_collection("later", 2, 2).await;
    c.wait_replicated("later", 2, Duration::from_secs(60)).await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let later = ingest(
        nodes.clone(),
        "later".into(),
        0,
        10,
        PER_BATCH,
        Duration::from_secs(30),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .acknowledged_docs();
    assert_eq!(later.len() as u64, 10 * PER_BATCH);
    // Put the member back behind, and restart it under load.
    let ahead = c.coordinator_status(l).await.expect("leader status");
    assert!(ahead.map_version > copied_at.map_version);
    c.stop_coordinator(k, Duration::from_secs(20)).await;
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::rename(&old, &dir).unwrap();
    let verify = Verify::start(&nodes, &acked);
    let writers = Writers::start(&nodes, 100, 300);
    c.start_coordinator(k);
    let t = Instant::now();
    let caught_up = loop {
        if let Some(s) = c.coordinator_status(k).await {
            if s.map_version >= ahead.map_version
                && s.last_applied_index >= ahead.last_applied_index
            {
                break t.elapsed();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "member {} never caught up",
            k + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (during, unknown) = writers.finish().await;
    let v = verify.finish().await;
    acked.extend(&during);
    final_check(&c, &acked, &unknown).await;
    c.wait_replicated("later", 2, Duration::from_secs(30)).await;
    for node in c.running_nodes() {
        check_acknowledged(&node, "later", &later).await;
    }
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    let trashed: usize = (0..c.nodes.len())
        .map(|n| c.node_log(n).matches("to the trash").count())
        .sum();
    assert_eq!(trashed, 0, "a node moved a replica to the trash");
    let older_maps_ignored: usize = (0..c.nodes.len())
        .map(|n| c.node_log(n).matches("ignored a cluster map older").count())
        .sum();
    figures(
        "coordinator_restarted_behind",
        acked.len() + later.len(),
        &v,
        serde_json::json!({"behind_by_map_versions": ahead.map_version - copied_at.map_version,
                           "behind_by_log_entries": ahead.last_applied_index - copied_at.last_applied_index,
                           "caught_up_s": caught_up.as_secs_f64(),
                           "older_maps_ignored_by_nodes": older_maps_ignored,
                           "unknown_outcome": unknown.len()}),
    );
}

/// Issue 19: a collection's shard count doubled online (3 to 6, RF 2) under three
/// writers and the verifying query loop, with a node SIGKILLed while the shards are
/// sealed and forking and the coordinator leader SIGKILLed too; both come back. The
/// split completes; every acknowledged document is present once with its exact vector,
/// and no answer that claimed completeness missed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_with_a_node_and_the_leader_killed_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = cluster().await;
    let mut acked = first_round(&c).await;
    let nodes = Arc::new(Mutex::new(c.all_nodes()));
    let verify = Verify::start(&nodes, &acked);
    let writers = Writers::start(&nodes, 100, 1_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut admin = c.admin();
    let t = Instant::now();
    let op = admin
        .start_split(cpb::StartSplitRequest {
            collection: COLLECTION.into(),
        })
        .await
        .unwrap();
    let i = c.node_index("node-2");
    c.kill(i);
    let leader = c.coordinator_status(0).await.expect("status").leader;
    let l = leader as usize - 1;
    c.kill_coordinator(l);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.restart(i);
    c.start_coordinator(l);
    let done = loop {
        let ops = admin
            .list_operations(cpb::ListOperationsRequest {
                collection: COLLECTION.into(),
            })
            .await
            .map(|r| r.operations)
            .unwrap_or_default();
        if let Some(o) = ops
            .into_iter()
            .find(|o| o.id == op.id && o.state != "running")
        {
            break o;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the split did not end"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let split_s = t.elapsed();
    assert_eq!(done.state, "succeeded", "{done:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (during, unknown) = writers.finish().await;
    let v = verify.finish().await;
    acked.extend(&during);
    let shards = c.shards(COLLECTION).await;
    assert_eq!(shards.len(), 6, "{shards:#?}");
    final_check(&c, &acked, &unknown).await;
    assert!(v.silent_misses.is_empty(), "{:?}", v.silent_misses);
    figures(
        "split",
        acked.len(),
        &v,
        serde_json::json!({"split_s": split_s.as_secs_f64(), "unknown_outcome": unknown.len()}),
    );
}
