//! The cluster as processes, without injected faults beyond a plain SIGKILL: three
//! `shoal coordinator`s and two `shoal node`s; ingest through one node, search, get and
//! delete through the other, a node SIGKILLed and restarted, every acknowledged
//! document found and the node's Prometheus endpoint reporting it. The coordinator
//! group alone: creates sent while the leader is SIGKILLed and restarted ten times all
//! present exactly once; the 13-byte `Forward` that used to abort a member (issue 13)
//! refused by every member, which all keep serving.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_chaos_tests::{connect, eventually, scrape_text, Cluster, Spec};
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use tonic::Code;

fn vector(i: u64) -> Vec<f32> {
    shoal_chaos_tests::vector(i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_search_delete_and_node_restart_lose_nothing() {
    let mut c = Cluster::start(2).await;
    c.admin()
        .admin(|mut a| async move {
            a.create_collection(cpb::CreateCollectionRequest {
                name: "docs".into(),
                dimension: shoal_chaos_tests::DIM as u32,
                metric: cpb::Metric::L2 as i32,
                shard_count: 4,
                replication_factor: 1,
                index: Some(cpb::IndexParams {
                    nlist: 4,
                    pq_m: 2,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
        })
        .await
        .unwrap();

    let first = c.nodes[0].public.clone();
    let mut acked = BTreeSet::new();
    for batch in 0..10u64 {
        let docs: Vec<pb::Document> = (batch * 50..batch * 50 + 50)
            .map(|i| pb::Document {
                id: format!("d{i}"),
                vector: vector(i),
                ..Default::default()
            })
            .collect();
        let ids: Vec<String> = docs.iter().map(|d| d.id.clone()).collect();
        // The node may not have seen the create yet (NOT_FOUND: its map view lags the
        // coordinators' by up to one watch round trip) and the new collection's shards
        // may still be opening (UNAVAILABLE).
        eventually(Duration::from_secs(30), "an ingest accepted", || async {
            let mut g = connect(&first).await?;
            let r = g
                .ingest(pb::IngestRequest {
                    collection: "docs".into(),
                    documents: docs.clone(),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => Some(()),
                Err(s) if matches!(s.code(), Code::Unavailable | Code::NotFound) => None,
                Err(s) => panic!("ingest: {s:?}"),
            }
        })
        .await;
        acked.extend(ids);
    }
    let second = c.nodes[1].public.clone();
    let mut g2 = connect(&second).await.expect("node 2 answers");
    let del: Vec<String> = (0..50).map(|i| format!("d{}", i * 10)).collect();
    let r = g2
        .delete(pb::DeleteRequest {
            collection: "docs".into(),
            ids: del.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 50);
    for id in &del {
        acked.remove(id);
    }

    // SIGKILL node 1 and start it again from its data dir.
    c.kill(0);
    c.restart(0);
    let found: BTreeSet<String> = eventually(
        Duration::from_secs(60),
        "a full answer after node 1's restart",
        || async {
            let r = g2
                .clone()
                .search(pb::SearchRequest {
                    collection: "docs".into(),
                    vector: vector(3),
                    k: 1000,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (!r.partial).then(|| {
                assert_eq!(r.shards_total, 4);
                r.hits.into_iter().map(|h| h.id).collect()
            })
        },
    )
    .await;
    assert_eq!(
        found, acked,
        "search after the restart differs from the acknowledged set"
    );
    for id in ["d1", "d499", "d251"] {
        let g = g2
            .get(pb::GetRequest {
                collection: "docs".into(),
                id: id.into(),
                with_vector: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(g.found, "{id} lost");
        let n: u64 = id[1..].parse().unwrap();
        assert_eq!(g.document.unwrap().vector, vector(n));
    }
    eprintln!(
        "{} acknowledged documents all found after a node SIGKILL and restart",
        acked.len()
    );

    // Node 2's Prometheus endpoint reports what it did (refreshed every 2 s).
    let body = eventually(Duration::from_secs(10), "node 2's shard gauges", || async {
        let body = scrape_text(&c.nodes[1].metrics).await;
        body.contains("shoal_shard_live_documents").then_some(body)
    })
    .await;
    for name in [
        "shoal_gateway_searches_total{outcome=\"ok\"}",
        "shoal_gateway_search_duration_seconds",
        "shoal_node_replicas",
        "shoal_shard_live_documents{collection=\"docs\"",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
}

/// The coordinator group alone; worker liveness is not under test.
async fn coordinators_only() -> Cluster {
    Cluster::start_spec(Spec {
        nodes: 0,
        suspect_ms: 600_000,
        down_ms: 1_200_000,
        ..Spec::default()
    })
    .await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Sent at, acknowledged at.
    Acked(Instant, Instant),
    /// Might have been applied (a transport error after sending, or AlreadyExists on a
    /// retry that may have met its own first attempt).
    Unknown,
}

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_survive_ten_leader_kills() {
    let mut c = coordinators_only().await;
    let mut client = c.admin();
    client
        .cluster(|mut a| async move {
            a.register_node(cpb::RegisterNodeRequest {
                id: "w1".into(),
                addr: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .expect("register a worker node");
    client
        .cluster(|mut a| async move {
            a.heartbeat(cpb::HeartbeatRequest {
                id: "w1".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .expect("heartbeat");

    let outcomes: Arc<Mutex<BTreeMap<String, Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (outcomes, stop) = (outcomes.clone(), stop.clone());
        let mut client = c.admin();
        client.patience = Duration::from_secs(20);
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("c{i:05}");
                i += 1;
                let req = cpb::CreateCollectionRequest {
                    name: name.clone(),
                    dimension: 8,
                    metric: cpb::Metric::L2 as i32,
                    shard_count: 1,
                    replication_factor: 1,
                    index: Some(cpb::IndexParams {
                        nlist: 4,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let sent = Instant::now();
                let r = client
                    .admin(|mut a| {
                        let r = req.clone();
                        async move { a.create_collection(r).await }
                    })
                    .await;
                let o = match r {
                    Ok(_) => Outcome::Acked(sent, Instant::now()),
                    Err(s) if s.code() == Code::InvalidArgument => panic!("{s:?}"),
                    // UNAVAILABLE after the retries may follow an attempt that did
                    // commit; ALREADY_EXISTS may be a retry meeting its own first try.
                    Err(_) => Outcome::Unknown,
                };
                outcomes.lock().unwrap().insert(name, o);
            }
        })
    };

    let mut failovers = Vec::new();
    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let st = client
            .admin(|mut a| async move { a.cluster_status(cpb::ClusterStatusRequest {}).await })
            .await
            .expect("status")
            .into_inner();
        assert!(st.leader != 0, "no leader before round {round}");
        let k = (st.leader - 1) as usize;
        c.kill_coordinator(k);
        let killed_at = Instant::now();
        // Failover time: from the kill to the acknowledgement of the first create sent
        // after it.
        let acked_after = eventually(
            Duration::from_secs(30),
            format!("a commit after kill {round}"),
            || async {
                outcomes.lock().unwrap().values().find_map(|o| match o {
                    Outcome::Acked(sent, t) if *sent > killed_at => Some(*t),
                    _ => None,
                })
            },
        )
        .await;
        let f = acked_after.duration_since(killed_at);
        eprintln!(
            "round {round}: killed leader {}, next create acknowledged after {f:?}",
            st.leader
        );
        failovers.push(f);
        c.start_coordinator(k);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    let listed = client
        .admin(|mut a| async move { a.list_collections(cpb::ListCollectionsRequest {}).await })
        .await
        .expect("list")
        .into_inner();
    let names: Vec<String> = listed.collections.iter().map(|c| c.name.clone()).collect();
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "a collection is listed twice");
    let outcomes = outcomes.lock().unwrap().clone();
    let acked: Vec<&String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Acked(..)))
        .map(|(n, _)| n)
        .collect();
    for n in &acked {
        assert!(unique.contains(n), "acknowledged create {n} is missing");
    }
    for n in &names {
        assert!(
            outcomes.contains_key(n),
            "{n} is present but was never sent"
        );
    }
    failovers.sort();
    let median = failovers[failovers.len() / 2];
    let max = *failovers.last().unwrap();
    let unknown = outcomes
        .values()
        .filter(|o| **o == Outcome::Unknown)
        .count();
    eprintln!(
        "{} creates sent: {} acknowledged (all present once), {unknown} unknown; \
         failover over {KILLS} leader kills: median {median:?}, max {max:?}",
        outcomes.len(),
        acked.len()
    );
    println!(
        "{{\"kills\":{KILLS},\"acked\":{},\"failover_median_ms\":{},\"failover_max_ms\":{}}}",
        acked.len(),
        median.as_millis(),
        max.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_13_byte_forward_is_refused_and_every_member_lives() {
    use shoal_proto::raft::raft_client::RaftClient;
    use shoal_proto::raft::Payload;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let mut c = coordinators_only().await;
    let mut client = c.admin();
    client
        .admin(|mut a| async move { a.cluster_status(cpb::ClusterStatusRequest {}).await })
        .await
        .expect("the group answers");

    // Forward's Request: enum variant 0, then a string whose varint length (0xfd + u64)
    // claims 2^62 bytes. As the issue sent it (no format field), and with this build's
    // format so that it reaches the decoder.
    let mut data = vec![0u8, 0xfd];
    data.extend_from_slice(&(1u64 << 62).to_le_bytes());
    data.push(b'x');
    for m in c.layout.coordinators.clone() {
        // The group answers once two members are up; the third may still be binding
        // its Raft port on a loaded machine.
        let ch = eventually(
            Duration::from_secs(30),
            format!("member {}'s Raft port", m.id),
            || async { shoal_proto::endpoint(&m.raft).unwrap().connect().await.ok() },
        )
        .await;
        for format in [0, shoal_proto::wire::FORMAT, 0, shoal_proto::wire::FORMAT] {
            let p = Payload {
                data: data.clone(),
                format,
            };
            if format == 0 {
                assert_eq!(prost::Message::encoded_len(&p), 13);
            }
            let s = RaftClient::new(ch.clone())
                .forward(p)
                .await
                .expect_err("refused");
            let want = if format == 0 {
                Code::FailedPrecondition
            } else {
                Code::InvalidArgument
            };
            assert_eq!(s.code(), want, "member {}: {}", m.id, s.message());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (k, m) in c.layout.coordinators.clone().iter().enumerate() {
        assert!(
            !c.coordinator_exited(k),
            "member {} exited after the message",
            m.id
        );
        let ch = shoal_proto::endpoint(&m.api)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let h = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.status, ServingStatus::Serving as i32, "member {}", m.id);
    }
    // And the group still commits.
    client
        .cluster(|mut a| async move {
            a.register_node(cpb::RegisterNodeRequest {
                id: "after".into(),
                addr: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .expect("a write after the hostile messages");
}
