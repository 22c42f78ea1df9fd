//! Hostile input, every RPC of every service (issue 13): a coordinator group, a node with
//! the real encoder, and a second coordinator that takes the admin, cluster-map and Raft
//! traffic, all in this process over loopback gRPC. Each RPC gets proptest cases that are
//! valid protobuf messages carrying hostile contents — bincode with huge length prefixes,
//! truncated and mutated payloads, huge strings, extreme numbers, NaN and infinity.
//!
//! Every answer must be a reply or an error status; no handler may panic (a panic hook
//! counts them: tonic would only drop the connection, so the process surviving is not
//! enough); no request may raise the process's peak memory by more than a bound; and at
//! the end the cluster still serves every document it acknowledged, exactly, and the
//! fuzzed coordinator still runs its Raft core.
//!
//! Cases per RPC: `SHOAL_FUZZ_CASES` (default 100, the CI size; 10000 for a long run).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shoal_coordinator::testing::free_port;
use shoal_node::cluster::{self, NodeConfig, NodeHandle};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::coordinator::admin_client::AdminClient;
use shoal_proto::coordinator::cluster_map_client::ClusterMapClient;
use shoal_proto::raft as raftpb;
use shoal_proto::raft::raft_client::RaftClient;
use shoal_proto::replica as rpb;
use shoal_proto::replica::replica_client::ReplicaClient;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

const DIM: usize = 384;
/// Peak resident memory the whole fuzz run may add (the model and FAISS are loaded
/// before the baseline is taken).
const MEMORY_BOUND: u64 = 1536 << 20;

static PANICS: AtomicU64 = AtomicU64::new(0);

fn cases() -> u32 {
    std::env::var("SHOAL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

fn model_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2")
}

fn unit_vector(seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..DIM)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.into_iter().map(|a| a / n).collect()
}

// ---- strategies ----------------------------------------------------------------------

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ".{0,24}",
        1 => Just(String::new()),
        1 => (prop::sample::select(vec![129usize, 513, 1025, 20_000, 70_000, 300_000, 2_100_000]),
              any::<char>())
            .prop_map(|(n, c)| c.to_string().repeat(n / c.len_utf8().max(1))),
        1 => Just("../../etc/passwd".to_string()),
        1 => Just("fuzz/0".to_string()),
    ]
}

fn hostile_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(u32::MAX),
        Just(1001),
        Just(100_000),
        0u32..4096,
        any::<u32>()
    ]
}

fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        0u64..64,
        any::<u64>()
    ]
}

fn hostile_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::MAX),
        Just(-f32::MAX),
        Just(3e19f32),
        Just(-0.0f32),
        Just(f32::MIN_POSITIVE / 2.0),
        -1.0f32..1.0,
    ]
}

/// Filters (issue 22): indexed and unknown keys, values of the wrong kind, NaN and
/// unbounded ranges, empty and huge `in` lists, missing tests, deep nesting.
fn hostile_filter() -> impl Strategy<Value = Option<cpb::Filter>> {
    use cpb::condition::Test;
    use cpb::field_value::Value as V;
    let key = prop_oneof![
        3 => prop::sample::select(vec!["n".to_string(), "k".to_string(), String::new()]),
        1 => hostile_string(),
    ];
    let value = prop_oneof![
        (-5.0f64..5.0).prop_map(|x| cpb::FieldValue {
            value: Some(V::Number(x))
        }),
        Just(cpb::FieldValue {
            value: Some(V::Number(f64::NAN))
        }),
        hostile_string().prop_map(|s| cpb::FieldValue {
            value: Some(V::Keyword(s))
        }),
        any::<bool>().prop_map(|b| cpb::FieldValue {
            value: Some(V::Flag(b))
        }),
        Just(cpb::FieldValue { value: None }),
    ];
    let bound = prop_oneof![
        Just(None),
        (-5.0f64..5.0).prop_map(Some),
        Just(Some(f64::INFINITY)),
        Just(Some(f64::NAN))
    ];
    let test = prop_oneof![
        value.clone().prop_map(|v| Some(Test::Match(v))),
        (prop::sample::select(vec![0usize, 1, 3]), value)
            .prop_map(|(n, v)| Some(Test::Any(cpb::ValueList { values: vec![v; n] }))),
        // Long lists of small values (a long list of long strings is the message
        // limit's case, and would be built in this process first).
        (-5.0f64..5.0).prop_map(|x| Some(Test::Any(cpb::ValueList {
            values: vec![
                cpb::FieldValue {
                    value: Some(V::Number(x))
                };
                5_000
            ]
        }))),
        (bound.clone(), bound.clone(), bound.clone(), bound)
            .prop_map(|(gt, gte, lt, lte)| { Some(Test::Range(cpb::Range { gt, gte, lt, lte })) }),
        any::<bool>().prop_map(|e| Some(Test::Exists(e))),
        Just(None),
    ];
    let leaf = (key, test).prop_map(|(key, test)| cpb::Condition { key, test });
    let condition = leaf.prop_recursive(12, 64, 4, |inner| {
        (
            prop::collection::vec(inner.clone(), 0..3),
            prop::collection::vec(inner, 0..2),
        )
            .prop_map(|(must, must_not)| cpb::Condition {
                key: String::new(),
                test: Some(Test::Filter(cpb::Filter {
                    must,
                    should: Vec::new(),
                    must_not,
                })),
            })
    });
    proptest::option::of(
        (
            prop::collection::vec(condition.clone(), 0..4),
            prop::collection::vec(condition.clone(), 0..3),
            prop::collection::vec(condition, 0..2),
        )
            .prop_map(|(must, should, must_not)| cpb::Filter {
                must,
                should,
                must_not,
            }),
    )
}

fn hostile_vector() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        2 => prop::collection::vec(-1.0f32..1.0, DIM),
        2 => (prop::collection::vec(-1.0f32..1.0, DIM), 0..DIM, hostile_f32())
            .prop_map(|(mut v, i, x)| { v[i] = x; v }),
        1 => Just(vec![1e19f32; DIM]),
        1 => prop::collection::vec(hostile_f32(), 0..(DIM * 2)),
        1 => Just(Vec::new()),
    ]
}

/// Bincode bytes a reader might choke on: huge length prefixes, truncated and mutated
/// copies of real encodings, random bytes.
fn hostile_bincode(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let valid = Arc::new(valid);
    let (v1, v2) = (valid.clone(), valid);
    prop_oneof![
        // A varint length prefix (0xfd = u64 follows) claiming up to 2^64 bytes.
        (
            0u8..4,
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(tag, len, tail)| {
                let mut b = vec![tag, 0xfd];
                b.extend_from_slice(&(len | (1 << 40)).to_le_bytes());
                b.extend(tail);
                b
            }),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(move |(w, cut)| {
            let b = &v1[w.index(v1.len())];
            b[..cut.index(b.len().max(1))].to_vec()
        }),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)
        )
            .prop_map(move |(w, flips)| {
                let mut b = v2[w.index(v2.len())].clone();
                if !b.is_empty() {
                    for (i, x) in flips {
                        let n = b.len();
                        b[i.index(n)] = x;
                    }
                }
                b
            }),
        prop::collection::vec(any::<u8>(), 0..256),
    ]
}

// ---- the runner ----------------------------------------------------------------------

/// What each RPC answered, by status code, for the report.
type Tally = Arc<Mutex<BTreeMap<String, BTreeMap<String, usize>>>>;

struct Fuzz {
    rt: tokio::runtime::Runtime,
    tally: Tally,
    cases: u32,
}

impl Fuzz {
    /// Runs `cases` proptest cases of `strategy` through `call`, checking each answer.
    fn rpc<S, F, Fut, T>(&self, name: &str, strategy: S, call: F)
    where
        S: Strategy,
        S::Value: std::fmt::Debug,
        F: Fn(S::Value) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut runner = TestRunner::new(Config {
            cases: self.cases,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        });
        let t = Instant::now();
        let result = runner.run(&strategy, |v| {
            let before = PANICS.load(Ordering::SeqCst);
            let r = self.rt.block_on(call(v));
            let code = match &r {
                Ok(_) => "OK".to_string(),
                Err(s) => format!("{:?}", s.code()),
            };
            *self
                .tally
                .lock()
                .unwrap()
                .entry(name.to_string())
                .or_default()
                .entry(code)
                .or_default() += 1;
            prop_assert_eq!(
                PANICS.load(Ordering::SeqCst),
                before,
                "{} panicked a handler",
                name
            );
            if let Err(s) = &r {
                // A dropped connection is what a panicking or aborting handler looks
                // like from the client.
                let m = s.message();
                prop_assert!(
                    !(m.contains("transport error")
                        || m.contains("h2 protocol error")
                        || m.contains("connection reset")
                        || m.contains("broken pipe")),
                    "{} lost its connection: {:?} {}",
                    name,
                    s.code(),
                    m
                );
                prop_assert!(
                    s.code() != Code::Unknown,
                    "{} answered UNKNOWN: {}",
                    name,
                    m
                );
            }
            Ok::<(), TestCaseError>(())
        });
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
        eprintln!(
            "fuzz {name}: {} cases in {:.1} s",
            self.cases,
            t.elapsed().as_secs_f64()
        );
    }
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(20));
    r
}

async fn channel(addr: impl std::fmt::Display) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

struct Cluster {
    coords: Vec<shoal_coordinator::Handle>,
    lone: shoal_coordinator::Handle,
    node: NodeHandle,
    addrs: Vec<String>,
}

async fn coordinator_group(
    dir: &std::path::Path,
    n: u64,
    tag: &str,
) -> (Vec<shoal_coordinator::Handle>, Vec<String>) {
    let peers: Vec<shoal_coordinator::Peer> = (1..=n)
        .map(|id| shoal_coordinator::Peer {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            api_addr: format!("127.0.0.1:{}", free_port()),
        })
        .collect();
    let mut handles = Vec::new();
    for p in &peers {
        handles.push(
            shoal_coordinator::start(shoal_coordinator::Config {
                id: p.id,
                listen: p.api_addr.clone(),
                raft_listen: p.raft_addr.clone(),
                data_dir: dir.join(format!("{tag}{}", p.id)),
                peers: peers.clone(),
                ..shoal_coordinator::testing::member_config()
            })
            .await
            .unwrap(),
        );
    }
    (handles, peers.iter().map(|p| p.api_addr.clone()).collect())
}

async fn create(admin: &mut Client, name: &'static str) {
    admin
        .admin(|mut c| async move {
            c.create_collection(cpb::CreateCollectionRequest {
                name: name.into(),
                dimension: DIM as u32,
                metric: cpb::Metric::InnerProduct as i32,
                shard_count: 2,
                replication_factor: 1,
                index: Some(cpb::IndexParams {
                    nlist: 2,
                    pq_nbits: 4,
                    ..Default::default()
                }),
                // Indexed for filters (issue 22): the fuzzed filters name these too.
                payload_fields: ["n:number", "k:keyword"]
                    .iter()
                    .map(|f| shoal_proto::filter::PayloadField::parse(f).unwrap().wire())
                    .collect(),
                ..Default::default()
            })
            .await
        })
        .await
        .unwrap();
}

async fn start(dir: &std::path::Path) -> Cluster {
    let (coords, addrs) = coordinator_group(dir, 3, "c").await;
    let (mut lone, _) = coordinator_group(dir, 1, "lone").await;
    let node = cluster::start(NodeConfig {
        id: "n1".into(),
        listen: format!("127.0.0.1:{}", free_port()),
        internal_listen: format!("127.0.0.1:{}", free_port()),
        coordinators: addrs.clone(),
        data_dir: dir.join("n1"),
        model_dir: Some(model_dir()),
        heartbeat: Duration::from_millis(200),
        ..NodeConfig::default()
    })
    .await
    .unwrap();
    let mut admin = Client::new(addrs.clone());
    let t = Instant::now();
    loop {
        let up = admin
            .admin(|mut c| async move { c.list_nodes(cpb::ListNodesRequest {}).await })
            .await
            .map(|r| {
                r.into_inner()
                    .nodes
                    .iter()
                    .any(|n| n.state == cpb::NodeState::Up as i32)
            })
            .unwrap_or(false);
        if up {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "node not up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    create(&mut admin, "kept").await;
    create(&mut admin, "fuzz").await;
    let t = Instant::now();
    while node.registry.read().len() < 4 {
        assert!(t.elapsed() < Duration::from_secs(30), "replicas not opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = &mut lone;
    Cluster {
        coords,
        lone: lone.pop().unwrap(),
        node,
        addrs,
    }
}

#[test]
fn every_rpc_survives_hostile_messages() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = rt.block_on(start(dir.path()));

    // What the cluster acknowledged before the fuzzing: it must all be there after.
    let kept: Vec<(String, Vec<f32>)> = (0..40)
        .map(|i| (format!("kept-{i}"), unit_vector(i)))
        .collect();
    let public = rt.block_on(channel(c.node.public_addr));
    let internal = rt.block_on(channel(c.node.internal_addr));
    rt.block_on(async {
        let mut s = ShoalClient::new(public.clone());
        s.ingest(pb::IngestRequest {
            collection: "kept".into(),
            documents: kept
                .iter()
                .map(|(id, v)| pb::Document {
                    id: id.clone(),
                    vector: v.clone(),
                    text: format!("document {id}"),
                    ..Default::default()
                })
                .collect(),
            request_id: "seed".into(),
        })
        .await
        .unwrap();
        s.ingest(pb::IngestRequest {
            collection: "fuzz".into(),
            documents: (0..20)
                .map(|i| pb::Document {
                    id: format!("f-{i}"),
                    vector: unit_vector(1000 + i),
                    ..Default::default()
                })
                .collect(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    });
    let fuzz_id = c.node.view.read().collections["fuzz"].id;
    let lone_api = c.lone.api_addr;
    let lone_raft = c.lone.raft_addr;
    let admin = rt.block_on(channel(lone_api));
    let raft = rt.block_on(channel(lone_raft));
    let baseline = peak_rss();
    let f = Fuzz {
        rt,
        tally: Tally::default(),
        cases: cases(),
    };

    // ---- shoal.v1.Shoal (public) ----
    let doc = || {
        (
            hostile_string(),
            hostile_string(),
            hostile_string(),
            hostile_vector(),
        )
            .prop_map(|(id, text, metadata_json, vector)| pb::Document {
                id,
                text,
                metadata_json,
                vector,
            })
    };
    let coll = || prop_oneof![Just("fuzz".to_string()), hostile_string()];
    let ingest = || {
        (coll(), prop::collection::vec(doc(), 0..4), hostile_string()).prop_map(
            |(collection, documents, request_id)| pb::IngestRequest {
                collection,
                documents,
                request_id,
            },
        )
    };
    f.rpc("Shoal/Ingest", ingest(), |r| {
        let mut s = ShoalClient::new(public.clone());
        async move { s.ingest(req(r)).await }
    });
    f.rpc(
        "Shoal/IngestStream",
        prop::collection::vec(ingest(), 0..3),
        |rs| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.ingest_stream(req(tokio_stream::iter(rs))).await }
        },
    );
    f.rpc(
        "Shoal/Delete",
        (
            coll(),
            prop::collection::vec(hostile_string(), 0..5),
            hostile_string(),
        )
            .prop_map(|(collection, ids, request_id)| pb::DeleteRequest {
                collection,
                ids: ids
                    .into_iter()
                    .filter(|i| !i.starts_with("kept-"))
                    .collect(),
                request_id,
            }),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.delete(req(r)).await }
        },
    );
    f.rpc(
        "Shoal/Count",
        (coll(), hostile_filter())
            .prop_map(|(collection, filter)| pb::CountRequest { collection, filter }),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.count(req(r)).await }
        },
    );
    f.rpc(
        "Shoal/Scroll",
        (
            (coll(), hostile_filter()),
            (
                hostile_u32(),
                prop_oneof![
                    Just(String::new()),
                    hostile_string(),
                    Just("scroll:2:1:0:5".to_string()),
                    Just("scroll:2:9:0:0".to_string()),
                    Just("scroll:3:0:0:0".to_string()),
                    Just("scroll:2:0:99:18446744073709551615".to_string())
                ],
            ),
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (collection, filter),
                    (limit, cursor),
                    (with_text, with_payload, with_vector),
                )| {
                    pb::ScrollRequest {
                        collection,
                        filter,
                        limit,
                        cursor,
                        with_text,
                        with_payload,
                        with_vector,
                    }
                },
            ),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.scroll(req(r)).await }
        },
    );
    f.rpc(
        "Shoal/DeleteByFilter",
        (coll(), hostile_filter())
            .prop_map(|(collection, filter)| pb::DeleteByFilterRequest { collection, filter }),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.delete_by_filter(req(r)).await }
        },
    );
    f.rpc(
        "Shoal/SetPayload",
        (
            coll(),
            hostile_string(),
            hostile_string(),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(collection, id, metadata_json, merge, if_version)| {
                pb::SetPayloadRequest {
                    collection,
                    id,
                    metadata_json,
                    merge,
                    if_version,
                }
            }),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.set_payload(req(r)).await }
        },
    );
    f.rpc(
        "Shoal/SearchBatch",
        (
            prop::sample::select(vec![0usize, 1, 3, 65]),
            coll(),
            hostile_vector(),
            hostile_u32(),
        )
            .prop_map(|(n, collection, vector, k)| pb::SearchBatchRequest {
                searches: vec![
                    pb::SearchRequest {
                        collection,
                        vector,
                        k,
                        ..Default::default()
                    };
                    n
                ],
            }),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.search_batch(req(r)).await }
        },
    );
    f.rpc(
        "Shoal/Get",
        (coll(), hostile_string(), any::<bool>()).prop_map(|(collection, id, with_vector)| {
            pb::GetRequest {
                collection,
                id,
                with_vector,
            }
        }),
        |r| {
            let mut s = ShoalClient::new(public.clone());
            async move { s.get(req(r)).await }
        },
    );
    // Retrieval modes (issue 22): unknown enums, weights and PRF settings of any value.
    let retrieval = (
        (hostile_u32(), hostile_u32()),
        proptest::option::of(hostile_f32()),
        (hostile_u32(), hostile_u32()),
        proptest::option::of((
            any::<bool>(),
            hostile_u32(),
            proptest::option::of(hostile_f32()),
            proptest::option::of(hostile_f32()),
        )),
    );
    let search = (
        (coll(), prop_oneof![Just(String::new()), hostile_string()]),
        prop_oneof![Just(Vec::new()), hostile_vector()],
        (hostile_u32(), hostile_u32(), hostile_u32()),
        (any::<bool>(), any::<bool>(), hostile_filter()),
        retrieval,
    )
        .prop_map(
            |(
                (collection, text),
                vector,
                (k, nprobe, refine),
                (with_text, exact, filter),
                ((mode, fusion), dense_weight, (rrf_k, fusion_depth), prf),
            )| {
                // More like this: sometimes the (hostile) text names the document.
                let like_id = if nprobe % 7 == 0 {
                    text.clone()
                } else {
                    String::new()
                };
                pb::SearchRequest {
                    like_id,
                    // Mostly known modes, so the lexical and hybrid paths run.
                    mode: (mode % 5) as i32,
                    fusion: (fusion % 3) as i32,
                    dense_weight,
                    rrf_k,
                    fusion_depth,
                    prf: prf.map(|(enabled, depth, alpha, beta)| pb::Prf {
                        enabled,
                        depth,
                        alpha,
                        beta,
                    }),
                    collection,
                    text,
                    vector,
                    k,
                    nprobe,
                    refine,
                    with_payload: with_text && exact,
                    with_text,
                    exact,
                    filter,
                }
            },
        );
    f.rpc(
        "Shoal/Search",
        (
            search,
            prop::sample::select(vec!["", "1n", "99999999H", "12345678S", "5m", "junk"]),
        ),
        |(r, timeout)| {
            let mut s = ShoalClient::new(public.clone());
            async move {
                let mut rq = tonic::Request::new(r);
                if !timeout.is_empty() {
                    // Set by hand: the header as any client may send it.
                    rq.metadata_mut()
                        .insert("grpc-timeout", timeout.parse().unwrap());
                }
                s.search(rq).await
            }
        },
    );
    f.rpc("Shoal/BuildIndex", coll(), |collection| {
        let mut s = ShoalClient::new(public.clone());
        async move {
            s.build_index(req(pb::BuildIndexRequest { collection }))
                .await
        }
    });

    // ---- shoal.internal.v1.Replica (node to node) ----
    let shard_ref = move || {
        prop_oneof![
            3 => (0u32..2).prop_map(move |index| Some(cpb::ShardId {
                collection: "fuzz".into(),
                collection_id: fuzz_id,
                index,
            })),
            1 => (hostile_string(), hostile_u64(), hostile_u32()).prop_map(|(collection, collection_id, index)| {
                Some(cpb::ShardId { collection, collection_id, index })
            }),
            1 => Just(None),
        ]
    };
    let stored = || {
        doc().prop_map(|d| rpb::StoredDoc {
            id: d.id,
            text: d.text,
            metadata_json: d.metadata_json,
            // A re-embed's set vector for a set no replica has (issue 21).
            set_vector: d.vector.iter().rev().copied().collect(),
            vector: d.vector,
        })
    };
    f.rpc(
        "Replica/Write",
        (
            shard_ref(),
            prop::collection::vec(stored(), 0..4),
            prop::collection::vec(hostile_string(), 0..4),
            hostile_string(),
            // Conditional writes' expectations (issue 22): any ids, any versions.
            prop::collection::vec((hostile_string(), any::<u64>()), 0..6),
        )
            .prop_map(
                |(shard, upserts, deletes, request_id, expect)| rpb::WriteRequest {
                    // 0 (unsaid), or a count no replica of it has: refused by name.
                    shard_count: (request_id.len() % 3) as u32 * 1000,
                    set_tag: request_id.len() as u64 % 2,
                    shard,
                    upserts,
                    deletes,
                    request_id,
                    expect: expect
                        .into_iter()
                        .map(|(id, version)| rpb::Expect { id, version })
                        .collect(),
                },
            ),
        |r| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.write(req(r)).await }
        },
    );
    // Real encodings of batches, for truncation and mutation.
    let batch_bytes: Vec<Vec<u8>> = (0..4u64)
        .map(|i| {
            #[derive(serde::Serialize)]
            struct Batch {
                seq: u64,
                epoch: u64,
                request_id: String,
                ops: Vec<Op>,
            }
            #[derive(serde::Serialize)]
            enum Op {
                Upsert {
                    id: String,
                    text: Option<String>,
                    metadata: String,
                    vector: Vec<f32>,
                },
                #[allow(dead_code)]
                Delete { id: String },
            }
            shoal_proto::wire::encode(&vec![Batch {
                seq: 100 + i,
                epoch: 1,
                request_id: format!("r{i}"),
                ops: vec![Op::Upsert {
                    id: format!("x{i}"),
                    text: Some("t".into()),
                    metadata: "{}".into(),
                    vector: unit_vector(i),
                }],
            }])
        })
        .collect();
    f.rpc(
        "Replica/Append",
        (
            shard_ref(),
            (
                hostile_u64(),
                hostile_string(),
                hostile_u64(),
                hostile_u64(),
            ),
            hostile_bincode(batch_bytes),
            (
                hostile_u64(),
                prop_oneof![Just(shoal_proto::wire::FORMAT), hostile_u32()],
            ),
        )
            .prop_map(
                |(
                    shard,
                    (epoch, primary, prev_seq, prev_epoch),
                    batches,
                    (primary_seq, format),
                )| {
                    rpb::AppendRequest {
                        shard,
                        epoch,
                        primary,
                        prev_seq,
                        prev_epoch,
                        batches,
                        primary_seq,
                        format,
                    }
                },
            ),
        |r| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.append(req(r)).await }
        },
    );
    let chunk = (
        shard_ref(),
        hostile_u64(),
        hostile_string(),
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![
            Just("docs.dat".to_string()),
            Just("../escape".to_string()),
            hostile_string()
        ],
        hostile_u64(),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(shard, epoch, primary, manifest, file, offset, data)| rpb::SnapshotChunk {
                shard,
                epoch,
                primary,
                manifest,
                file,
                offset,
                data,
                forced: epoch % 2 == 0,
                resume: offset % 3 == 0,
            },
        );
    f.rpc(
        "Replica/InstallSnapshot",
        prop::collection::vec(chunk, 0..4),
        |chunks| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.install_snapshot(req(tokio_stream::iter(chunks))).await }
        },
    );
    f.rpc(
        "Replica/SnapshotStaged",
        (shard_ref(), hostile_u64(), hostile_string()).prop_map(|(shard, epoch, primary)| {
            rpb::SnapshotStagedRequest {
                shard,
                epoch,
                primary,
            }
        }),
        |r| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.snapshot_staged(req(r)).await }
        },
    );
    f.rpc(
        "Replica/FetchGeneration",
        (shard_ref(), hostile_u64(), hostile_u64(), hostile_u32()).prop_map(
            |(shard, generation, offset, max_bytes)| rpb::FetchGenerationRequest {
                shard,
                generation,
                offset,
                max_bytes,
            },
        ),
        |r| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.fetch_generation(req(r)).await }
        },
    );
    let shard_search = || {
        (
            shard_ref(),
            hostile_vector(),
            (hostile_u32(), hostile_u32(), hostile_u32()),
            (any::<bool>(), hostile_filter()),
            proptest::option::of((
                prop::collection::vec(hostile_string(), 0..4),
                any::<bool>(),
                prop::collection::vec(hostile_f32(), 0..5),
                (hostile_f32(), hostile_f32(), hostile_f32()),
            )),
        )
            .prop_map(
                |(shard, vector, (k, nprobe, refine), (exact, filter), lexical)| {
                    rpb::ShardSearchRequest {
                        // BM25 (issue 22): terms, weights and parameters of any value.
                        lexical: lexical.map(|(terms, stats_only, idf, (avg_len, k1, b))| {
                            rpb::LexicalQuery {
                                terms,
                                stats_only,
                                idf,
                                avg_len,
                                k1,
                                b,
                            }
                        }),
                        with_vectors: refine % 2 == 0,
                        // Count and scroll (issue 22) through the same call.
                        count_only: k % 5 == 0,
                        scroll: (k % 7 == 0).then_some(rpb::ScrollQuery {
                            layout: (nprobe % 2 == 0).then_some(u64::from(nprobe)),
                            from_row: u64::from(refine),
                        }),
                        shard_count: k % 3,
                        // A model no replica holds vectors of, or none (issue 21).
                        model: if exact {
                            String::new()
                        } else {
                            format!("sha256:{nprobe}")
                        },
                        // Texts and metadata of the hits (issue 22), within payload_bytes.
                        with_text: k % 2 == 0,
                        with_payload: k % 3 == 0,
                        shard,
                        vector,
                        k,
                        nprobe,
                        refine,
                        exact,
                        filter,
                    }
                },
            )
    };
    f.rpc("Replica/Search", shard_search(), |r| {
        let mut s = ReplicaClient::new(internal.clone());
        async move { s.search(req(r)).await }
    });
    // A batch's part (issue 22): any searches, past searches_per_batch, of one shard
    // or several.
    f.rpc(
        "Replica/SearchMany",
        prop::collection::vec(shard_search(), 0..70)
            .prop_map(|searches| rpb::ShardSearchBatch { searches }),
        |r| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.search_many(req(r)).await }
        },
    );
    f.rpc(
        "Replica/Get",
        (shard_ref(), hostile_string()).prop_map(|(shard, id)| rpb::ShardGetRequest {
            shard_count: (id.len() % 3) as u32,
            shard,
            id,
        }),
        |r| {
            let mut s = ReplicaClient::new(internal.clone());
            async move { s.get(req(r)).await }
        },
    );
    f.rpc("Replica/Build", shard_ref(), |shard| {
        let mut s = ReplicaClient::new(internal.clone());
        async move { s.build(req(rpb::BuildRequest { shard })).await }
    });

    // ---- shoal.coordinator.v1.Admin and ClusterMap (the lone coordinator) ----
    f.rpc(
        "Admin/CreateCollection",
        (
            hostile_string(),
            hostile_u32(),
            hostile_u32(),
            (hostile_u32(), hostile_u32(), hostile_u32(), hostile_u32()),
            (hostile_u32(), hostile_u32(), hostile_u64(), hostile_u32()),
            (hostile_string(), hostile_string()),
        )
            .prop_map(
                |(
                    name,
                    dimension,
                    metric,
                    (nlist, pq_m, pq_nbits, nprobe),
                    (shard_count, rf, mem, wq),
                    (model_id, content_hash),
                )| {
                    cpb::CreateCollectionRequest {
                        name,
                        dimension,
                        metric: metric as i32,
                        encoder: Some(cpb::EncoderRef {
                            model_id,
                            content_hash,
                        }),
                        index: Some(cpb::IndexParams {
                            nlist,
                            pq_m,
                            pq_nbits,
                            nprobe,
                            refine: nprobe,
                            // Any value: unknown precisions are refused by name.
                            rerank: pq_m as i32,
                        }),
                        shard_count,
                        replication_factor: rf,
                        replica_memory_bytes: mem,
                        write_quorum: wq,
                        payload_fields: Vec::new(),
                    }
                },
            ),
        |r| {
            let mut s = AdminClient::new(admin.clone());
            async move { s.create_collection(req(r)).await }
        },
    );
    f.rpc("Admin/DropCollection", hostile_string(), |name| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.drop_collection(req(cpb::DropCollectionRequest { name }))
                .await
        }
    });
    f.rpc("Admin/DescribeCollection", hostile_string(), |name| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.describe_collection(req(cpb::DescribeCollectionRequest { name }))
                .await
        }
    });
    f.rpc("Admin/ListCollections", Just(()), |_| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.list_collections(req(cpb::ListCollectionsRequest {}))
                .await
        }
    });
    f.rpc("Admin/ListNodes", Just(()), |_| {
        let mut s = AdminClient::new(admin.clone());
        async move { s.list_nodes(req(cpb::ListNodesRequest {})).await }
    });
    f.rpc("Admin/ListShards", hostile_string(), |collection| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.list_shards(req(cpb::ListShardsRequest { collection }))
                .await
        }
    });
    f.rpc("Admin/ClusterStatus", Just(()), |_| {
        let mut s = AdminClient::new(admin.clone());
        async move { s.cluster_status(req(cpb::ClusterStatusRequest {})).await }
    });
    let coll_name = || prop_oneof![Just("fuzz".to_string()), hostile_string()];
    f.rpc(
        "Admin/SetCollectionPolicy",
        (coll_name(), proptest::option::of(hostile_u64())),
        |(name, auto_rebuild_rows)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.set_collection_policy(req(cpb::SetCollectionPolicyRequest {
                    name,
                    auto_rebuild_rows,
                    payload_fields: Vec::new(),
                }))
                .await
            }
        },
    );
    f.rpc(
        "Admin/StartIndexBuild",
        (coll_name(), hostile_u32(), hostile_u64(), hostile_u32()),
        |(collection, nlist, train_sample, rerank)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.start_index_build(req(cpb::StartIndexBuildRequest {
                    collection,
                    nlist,
                    train_sample,
                    rerank: rerank as i32,
                }))
                .await
            }
        },
    );
    f.rpc("Admin/StartCompaction", coll_name(), |collection| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.start_compaction(req(cpb::StartCompactionRequest { collection }))
                .await
        }
    });
    // Never the test's own collection: a split of it is the cluster tests' subject.
    f.rpc("Admin/StartSplit", hostile_string(), |collection| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.start_split(req(cpb::StartSplitRequest { collection }))
                .await
        }
    });
    f.rpc(
        "Admin/StartBackup",
        (hostile_string(), hostile_string(), hostile_string()),
        |(collection, url, backup)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.start_backup(req(cpb::StartBackupRequest {
                    collection,
                    url,
                    backup,
                }))
                .await
            }
        },
    );
    // Never the test's own collection: a rebuild of it is the cluster tests' subject.
    f.rpc(
        "Admin/StartRebuild",
        (
            hostile_string(),
            hostile_u32(),
            hostile_u32(),
            hostile_u32(),
        ),
        |(collection, nlist, pq_m, nprobe)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.start_rebuild(req(cpb::StartRebuildRequest {
                    collection,
                    nlist,
                    pq_m,
                    nprobe,
                    refine: nlist,
                    margin: Some(f64::from(pq_m) - 1e9),
                    ..Default::default()
                }))
                .await
            }
        },
    );
    f.rpc(
        "Admin/RollbackRebuild",
        (hostile_string(), hostile_u64()),
        |(collection, operation)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.rollback_rebuild(req(cpb::EndRebuildRequest {
                    collection,
                    operation,
                }))
                .await
            }
        },
    );
    f.rpc(
        "Admin/SetAlias",
        (hostile_string(), hostile_string()),
        |(alias, collection)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.set_alias(req(cpb::SetAliasRequest { alias, collection }))
                    .await
            }
        },
    );
    // A restore names a repository that does not exist: created, its shards fail.
    f.rpc(
        "Admin/RestoreCollection",
        (
            hostile_string(),
            hostile_u32(),
            hostile_string(),
            hostile_u64(),
        ),
        |(name, shard_count, backup, epoch)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.restore_collection(req(cpb::RestoreCollectionRequest {
                    collection: Some(cpb::CreateCollectionRequest {
                        name,
                        dimension: 8,
                        shard_count,
                        replication_factor: 1,
                        ..Default::default()
                    }),
                    url: "/nonexistent/shoal-fuzz-repository".into(),
                    backup,
                    epochs: vec![epoch; (shard_count % 4) as usize],
                }))
                .await
            }
        },
    );
    // Never the test's own collection: a hostile name, or shards out of range.
    f.rpc(
        "Admin/RestoreShards",
        (
            hostile_string(),
            hostile_u32(),
            hostile_u64(),
            any::<bool>(),
        ),
        |(collection, shard, epoch, accept_data_loss)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.restore_shards(req(cpb::RestoreShardsRequest {
                    collection,
                    shards: vec![shard],
                    epochs: vec![epoch],
                    url: "/nonexistent/shoal-fuzz-repository".into(),
                    backup: "b".into(),
                    accept_data_loss,
                }))
                .await
            }
        },
    );
    f.rpc(
        "Admin/ImportMap",
        (prop::collection::vec(any::<u8>(), 0..64), hostile_u32()),
        |(map, format)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.import_map(req(cpb::ImportMapRequest { map, format }))
                    .await
            }
        },
    );
    f.rpc("Admin/ListOperations", hostile_string(), |collection| {
        let mut s = AdminClient::new(admin.clone());
        async move {
            s.list_operations(req(cpb::ListOperationsRequest { collection }))
                .await
        }
    });
    f.rpc(
        "Admin/CancelOperation",
        (hostile_u64(), hostile_string()),
        |(id, reason)| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                s.cancel_operation(req(cpb::CancelOperationRequest { id, reason }))
                    .await
            }
        },
    );
    f.rpc(
        "Admin/AddLearner",
        // Never its own id (1), whose membership a learner entry would rewrite.
        (
            prop_oneof![Just(0u64), 2u64..u64::MAX],
            hostile_string(),
            hostile_string(),
        )
            .prop_map(|(id, raft_addr, api_addr)| cpb::AddLearnerRequest {
                id,
                raft_addr,
                api_addr,
            }),
        |r| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                let mut q = req(r);
                // Adding a learner waits for it to catch up; these never will.
                q.set_timeout(Duration::from_secs(2));
                s.add_learner(q).await
            }
        },
    );
    f.rpc(
        "Admin/ChangeMembership",
        prop::collection::vec(2u64..u64::MAX, 0..4),
        |voters| {
            let mut s = AdminClient::new(admin.clone());
            async move {
                let mut q = req(cpb::ChangeMembershipRequest { voters });
                q.set_timeout(Duration::from_secs(2));
                s.change_membership(q).await
            }
        },
    );
    f.rpc(
        "Admin/DrainNode",
        (hostile_string(), any::<bool>()).prop_map(|(id, undo)| cpb::DrainNodeRequest { id, undo }),
        |r| {
            let mut s = AdminClient::new(admin.clone());
            async move { s.drain_node(req(r)).await }
        },
    );
    f.rpc(
        "Admin/PromoteReplica",
        (
            hostile_string(),
            hostile_u32(),
            hostile_string(),
            any::<bool>(),
        )
            .prop_map(|(collection, shard, node_id, accept_data_loss)| {
                cpb::PromoteReplicaRequest {
                    collection,
                    shard,
                    node_id,
                    accept_data_loss,
                }
            }),
        |r| {
            let mut s = AdminClient::new(admin.clone());
            async move { s.promote_replica(req(r)).await }
        },
    );
    f.rpc(
        "ClusterMap/RegisterNode",
        (
            hostile_string(),
            hostile_string(),
            hostile_u64(),
            hostile_string(),
            (hostile_string(), hostile_string()),
        )
            .prop_map(|(id, addr, memory_bytes, zone, (volume_id, cluster_id))| {
                cpb::RegisterNodeRequest {
                    id,
                    addr,
                    capacity: Some(cpb::Capacity {
                        memory_bytes,
                        gpu: false,
                        zone,
                    }),
                    volume_id,
                    cluster_id,
                }
            }),
        |r| {
            let mut s = ClusterMapClient::new(admin.clone());
            async move { s.register_node(req(r)).await }
        },
    );
    let shard_id = || {
        (hostile_string(), hostile_u64(), hostile_u64()).prop_map(
            |(collection, collection_id, index)| cpb::ShardId {
                collection,
                collection_id,
                index: index as u32,
            },
        )
    };
    let report = (shard_id(), hostile_u64(), hostile_u64()).prop_map(
        |(shard, applied_seq, serving_generation)| cpb::ReplicaReport {
            ahead: shard.collection.clone(),
            failed: shard.collection.clone(),
            build_error: shard.collection.clone(),
            gate: shard.collection.clone(),
            lagging: vec![shard.collection.clone(); (applied_seq % 5) as usize],
            in_sync: vec![shard.collection.clone(); (serving_generation % 5) as usize],
            shard: Some(shard),
            applied_seq,
            last_epoch: applied_seq,
            serving_generation,
            building_generation: applied_seq,
            live_docs: applied_seq,
            caught_up: true,
            epoch: serving_generation,
            build_operation: serving_generation,
            build_queued: applied_seq % 2 == 0,
            compacted_operation: serving_generation,
            layout: applied_seq,
            sealed: applied_seq % 3 == 0,
            finished_operation: serving_generation,
            failed_operation: applied_seq,
            operation_error: String::new(),
            staged_operation: serving_generation,
            staged_generation: applied_seq,
        },
    );
    f.rpc(
        "Admin/AllocateEmptyShard",
        (
            hostile_string(),
            hostile_u32(),
            hostile_string(),
            any::<bool>(),
        )
            .prop_map(|(collection, shard, node_id, accept_data_loss)| {
                cpb::AllocateEmptyShardRequest {
                    collection,
                    shard,
                    node_id,
                    accept_data_loss,
                }
            }),
        |r| {
            let mut s = AdminClient::new(admin.clone());
            async move { s.allocate_empty_shard(req(r)).await }
        },
    );
    f.rpc(
        "ClusterMap/HandOver",
        (
            (hostile_string(), hostile_string()),
            shard_id(),
            hostile_u64(),
            hostile_string(),
            (hostile_u64(), hostile_u64()),
        )
            .prop_map(
                |((node_id, cluster_id), shard, epoch, to, (last_seq, last_epoch))| {
                    cpb::HandOverRequest {
                        node_id,
                        cluster_id,
                        shard: Some(shard),
                        epoch,
                        to,
                        last_seq,
                        last_epoch,
                    }
                },
            ),
        |r| {
            let mut s = ClusterMapClient::new(admin.clone());
            async move { s.hand_over(req(r)).await }
        },
    );
    f.rpc(
        "ClusterMap/Heartbeat",
        (
            hostile_string(),
            prop::collection::vec(report, 0..4),
            prop_oneof![3 => Just(String::new()), 1 => hostile_string()],
        )
            .prop_map(|(id, replicas, cluster_id)| cpb::HeartbeatRequest {
                disk_free_bytes: replicas.len() as u64,
                disk_total_bytes: u64::MAX,
                disk_trash_bytes: u64::MAX,
                id,
                replicas,
                cluster_id,
            }),
        |r| {
            let mut s = ClusterMapClient::new(admin.clone());
            async move { s.heartbeat(req(r)).await }
        },
    );
    let watch = (
        hostile_u64(),
        prop_oneof![3 => Just(String::new()), 1 => hostile_string()],
    );
    f.rpc("ClusterMap/Watch", watch, |(from_version, cluster_id)| {
        let mut s = ClusterMapClient::new(admin.clone());
        async move {
            let mut stream = s
                .watch(req(cpb::WatchRequest {
                    from_version,
                    cluster_id,
                }))
                .await?
                .into_inner();
            // The first event (the whole map) or the stream's error.
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Ok(()),
            }
        }
    });

    // ---- shoal.raft.v1.Raft (member to member, the lone coordinator) ----
    // The message that aborted a coordinator: a Forward whose bincode names a string of
    // 2^62 bytes, 13 bytes on the wire.
    let mut forward = vec![0u8, 0xfd];
    forward.extend_from_slice(&(1u64 << 62).to_le_bytes());
    forward.push(b'x');
    let regression = raftpb::Payload {
        data: forward.clone(),
        format: shoal_proto::wire::FORMAT,
    };
    assert_eq!(
        prost::Message::encoded_len(&raftpb::Payload {
            data: forward.clone(),
            format: 0,
        }),
        13
    );
    let r =
        f.rt.block_on(async { RaftClient::new(raft.clone()).forward(req(regression)).await });
    let s = r.expect_err("the 13-byte Forward is refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    let r = f.rt.block_on(async {
        RaftClient::new(raft.clone())
            .forward(req(raftpb::Payload {
                data: forward.clone(),
                format: 0,
            }))
            .await
    });
    assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);

    let raft_valid: Vec<Vec<u8>> = vec![
        forward,
        shoal_proto::wire::encode(&(7u64, "node".to_string(), vec![1u64, 2, 3])),
        shoal_proto::wire::encode(&vec!["a".repeat(40); 4]),
        shoal_proto::wire::encode(&Some((u64::MAX, 3u64))),
    ];
    let payload = move || {
        (
            hostile_bincode(raft_valid.clone()),
            prop_oneof![3 => Just(shoal_proto::wire::FORMAT), 1 => hostile_u32()],
        )
            .prop_map(|(data, format)| raftpb::Payload { data, format })
    };
    for (name, which) in [
        ("Raft/AppendEntries", 0),
        ("Raft/Vote", 1),
        ("Raft/InstallSnapshot", 2),
        ("Raft/Forward", 3),
        ("Raft/ReadIndex", 4),
    ] {
        f.rpc(name, payload(), |p| {
            let mut s = RaftClient::new(raft.clone());
            async move {
                match which {
                    0 => s.append_entries(req(p)).await,
                    1 => s.vote(req(p)).await,
                    2 => s.install_snapshot(req(p)).await,
                    3 => s.forward(req(p)).await,
                    _ => s.read_index(req(p)).await,
                }
            }
        });
    }

    // ---- afterwards: nothing lost, every process serving, memory bounded ----
    let grown = peak_rss().saturating_sub(baseline);
    eprintln!("peak RSS grew by {} MiB during the fuzz", grown >> 20);
    for (rpc, codes) in f.tally.lock().unwrap().iter() {
        eprintln!("  {rpc:<28} {codes:?}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a handler panicked");
    assert!(
        grown < MEMORY_BOUND,
        "peak memory grew by {grown} bytes (bound {MEMORY_BOUND})"
    );
    f.rt.block_on(async {
        let mut s = ShoalClient::new(public.clone());
        for (id, v) in &kept {
            let r = s
                .search(pb::SearchRequest {
                    collection: "kept".into(),
                    vector: v.clone(),
                    k: 1,
                    exact: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!r.partial, "{r:?}");
            assert_eq!(r.hits[0].id, *id);
            let g = s
                .get(pb::GetRequest {
                    collection: "kept".into(),
                    id: id.clone(),
                    with_vector: true,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(g.document.unwrap().vector, *v, "{id}");
        }
        // Both coordinators answer, and the fuzzed one's Raft core still runs.
        let mut a = Client::new(c.addrs.clone());
        a.admin(|mut x| async move { x.cluster_status(cpb::ClusterStatusRequest {}).await })
            .await
            .unwrap();
        AdminClient::new(admin.clone())
            .cluster_status(req(cpb::ClusterStatusRequest {}))
            .await
            .unwrap();
        assert!(
            c.lone
                .coordinator
                .raft
                .metrics()
                .borrow()
                .running_state
                .is_ok(),
            "the fuzzed member's raft core stopped"
        );
        c.node.shutdown().await;
        c.lone.shutdown().await;
        for h in c.coords {
            h.shutdown().await;
        }
    });
}

/// The status must name the limit and its value.
fn refused(r: Result<impl std::fmt::Debug, Status>, code: Code, limit: &str) {
    let s = r.expect_err(limit);
    assert_eq!(s.code(), code, "{limit}: {}", s.message());
    assert!(
        s.message().contains(limit),
        "the status does not name {limit:?}: {}",
        s.message()
    );
}

/// Each limit a client can hit at a node or a coordinator, set small: refused with its
/// name and value, and nothing of the refused request applied.
#[test]
fn every_limit_is_refused_by_name_and_nothing_is_half_applied() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let small = [
            "docs_per_request=5",
            "id_bytes=16",
            "request_id_bytes=8",
            "text_bytes=100",
            "query_text_bytes=50",
            "metadata_bytes=40",
            "ids_per_delete=3",
            "k=10",
            "refine=20",
            "candidates=100",
            "exact_rows=30",
            "filter_terms=4",
            "payload_fields=2",
            "name_bytes=64",
            "node_id_bytes=12",
            "addr_bytes=24",
            "zone_bytes=4",
            "nodes=3",
            "reports_per_heartbeat=2",
            "replication_factor=3",
            "coordinator_members=2",
        ];
        let limits = shoal_proto::limits::Limits::from_pairs(&small).unwrap();
        let peer = shoal_coordinator::Peer {
            id: 1,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            api_addr: format!("127.0.0.1:{}", free_port()),
        };
        let coord = shoal_coordinator::start(shoal_coordinator::Config {
            id: 1,
            listen: peer.api_addr.clone(),
            raft_listen: peer.raft_addr.clone(),
            data_dir: dir.path().join("c1"),
            peers: vec![peer.clone()],
            limits: small.iter().map(|s| s.to_string()).collect(),
            ..shoal_coordinator::testing::member_config()
        })
        .await
        .unwrap();
        let node = cluster::start(NodeConfig {
            id: "limits-node".into(),
            listen: format!("127.0.0.1:{}", free_port()),
            internal_listen: format!("127.0.0.1:{}", free_port()),
            coordinators: vec![peer.api_addr.clone()],
            data_dir: dir.path().join("limits-node"),
            model_dir: Some(model_dir()),
            heartbeat: Duration::from_millis(200),
            limits: limits.clone(),
            // Smaller than the 5-document ingest below: it must go in parts.
            encoder_queue: 2,
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let mut admin = Client::new([peer.api_addr.clone()]);
        let t = Instant::now();
        while !admin
            .admin(|mut c| async move { c.list_nodes(cpb::ListNodesRequest {}).await })
            .await
            .map(|r| {
                r.into_inner()
                    .nodes
                    .iter()
                    .any(|n| n.state == cpb::NodeState::Up as i32)
            })
            .unwrap_or(false)
        {
            assert!(t.elapsed() < Duration::from_secs(30), "node not up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        create(&mut admin, "kept").await;
        let t = Instant::now();
        while node.registry.read().len() < 2 {
            assert!(t.elapsed() < Duration::from_secs(30), "replicas not opened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut s = ShoalClient::new(channel(node.public_addr).await);
        let doc = |id: &str, text: &str| pb::Document {
            id: id.into(),
            text: text.into(),
            ..Default::default()
        };
        let ingest = |docs: Vec<pb::Document>, rid: &str| pb::IngestRequest {
            collection: "kept".into(),
            documents: docs,
            request_id: rid.into(),
        };
        // Text-only, more documents than the encoder queue holds: encoded in parts.
        let five: Vec<_> = (0..5)
            .map(|i| doc(&format!("d{i}"), &format!("text number {i}")))
            .collect();
        let r = s
            .ingest(ingest(five.clone(), "r1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ingested, 5);

        let mut six = five.clone();
        six.push(doc("d5", "one too many"));
        refused(
            s.ingest(ingest(six, "")).await,
            Code::InvalidArgument,
            "docs_per_request = 5",
        );
        let mut bad = vec![doc("n0", "fine"), doc(&"x".repeat(17), "id too long")];
        refused(
            s.ingest(ingest(bad.clone(), "")).await,
            Code::InvalidArgument,
            "id_bytes = 16",
        );
        bad[1] = doc("n1", &"y".repeat(101));
        refused(
            s.ingest(ingest(bad.clone(), "")).await,
            Code::InvalidArgument,
            "text_bytes = 100",
        );
        bad[1] = pb::Document {
            metadata_json: format!("{{\"k\":\"{}\"}}", "z".repeat(40)),
            ..doc("n1", "fine")
        };
        refused(
            s.ingest(ingest(bad.clone(), "")).await,
            Code::InvalidArgument,
            "metadata_bytes = 40",
        );
        refused(
            s.ingest(ingest(vec![doc("n0", "fine")], "123456789")).await,
            Code::InvalidArgument,
            "request_id_bytes = 8",
        );
        let v = vec![1e19f32; DIM];
        let e = s
            .ingest(ingest(
                vec![pb::Document {
                    vector: v,
                    ..doc("n0", "")
                }],
                "",
            ))
            .await
            .unwrap_err();
        assert!(e.message().contains("norm"), "{}", e.message());
        // Nothing of a refused request is there.
        let got = s
            .get(pb::GetRequest {
                collection: "kept".into(),
                id: "n0".into(),
                with_vector: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!got.found, "a refused ingest left a document behind");

        refused(
            s.delete(pb::DeleteRequest {
                collection: "kept".into(),
                ids: vec!["d0".into(), "d1".into(), "d2".into(), "d3".into()],
                request_id: String::new(),
            })
            .await,
            Code::InvalidArgument,
            "ids_per_delete = 3",
        );
        let got = s
            .get(pb::GetRequest {
                collection: "kept".into(),
                id: "d0".into(),
                with_vector: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.found, "a refused delete removed a document");

        let q = |k: u32, refine: u32, text: &str, exact: bool| pb::SearchRequest {
            collection: "kept".into(),
            text: text.into(),
            k,
            refine,
            exact,
            ..Default::default()
        };
        refused(
            s.search(q(11, 0, "q", false)).await,
            Code::InvalidArgument,
            "k = 10",
        );
        refused(
            s.search(q(1, 21, "q", false)).await,
            Code::InvalidArgument,
            "refine = 20",
        );
        refused(
            s.search(q(10, 11, "q", false)).await,
            Code::InvalidArgument,
            "candidates = 100",
        );
        refused(
            s.search(q(1, 1, &"w ".repeat(26), false)).await,
            Code::InvalidArgument,
            "query_text_bytes = 50",
        );
        refused(
            s.search(pb::SearchRequest {
                collection: "c".repeat(65),
                ..q(1, 1, "q", false)
            })
            .await,
            Code::InvalidArgument,
            "name_bytes = 64",
        );
        // Within the limits: answered, with every shard.
        let r = s
            .search(q(5, 10, "text number 3", true))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.partial && r.hits[0].id == "d3", "{r:?}");
        // An exact search is limited by what it scans: with 70 documents over two
        // shards, one holds more than 30 rows.
        for b in 0..13u64 {
            s.ingest(ingest(
                (0..5)
                    .map(|i| pb::Document {
                        id: format!("v{b}-{i}"),
                        vector: unit_vector(b * 10 + i),
                        ..Default::default()
                    })
                    .collect(),
                "",
            ))
            .await
            .unwrap();
        }
        refused(
            s.search(q(5, 1, "text number 3", true)).await,
            Code::ResourceExhausted,
            "exact_rows = 30",
        );
        // Filters (issue 22): the fields one collection indexes, the terms one filter
        // holds (a condition and each value it lists).
        let three: Vec<cpb::PayloadField> = ["n:number", "k:keyword", "x:number"]
            .iter()
            .map(|f| shoal_proto::filter::PayloadField::parse(f).unwrap().wire())
            .collect();
        refused(
            admin
                .set_collection_policy(cpb::SetCollectionPolicyRequest {
                    name: "kept".into(),
                    auto_rebuild_rows: None,
                    payload_fields: three,
                })
                .await,
            Code::InvalidArgument,
            "payload_fields = 2",
        );
        let five_terms = shoal_proto::filter::Filter::from_json(
            r#"{"must": [{"key": "n", "in": [1, 2, 3, 4]}]}"#,
        )
        .unwrap();
        refused(
            s.search(pb::SearchRequest {
                filter: Some(five_terms.wire()),
                ..q(1, 1, "text number 1", false)
            })
            .await,
            Code::InvalidArgument,
            "filter_terms = 4",
        );
        // A grpc-timeout of 8 digits of hours (the spec's largest) is cut, not a panic.
        let mut rq = tonic::Request::new(q(1, 1, "text number 1", false));
        rq.metadata_mut()
            .insert("grpc-timeout", "99999999H".parse().unwrap());
        s.search(rq).await.unwrap();

        // The coordinator's limits.
        let mut cm = ClusterMapClient::new(channel(&peer.api_addr).await);
        let reg = |id: &str, addr: &str, zone: &str| cpb::RegisterNodeRequest {
            id: id.into(),
            addr: addr.into(),
            capacity: Some(cpb::Capacity {
                zone: zone.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        refused(
            cm.register_node(reg(&"i".repeat(13), "a:1", "")).await,
            Code::InvalidArgument,
            "node_id_bytes = 12",
        );
        refused(
            cm.register_node(reg("x", &"a".repeat(25), "")).await,
            Code::InvalidArgument,
            "addr_bytes = 24",
        );
        refused(
            cm.register_node(reg("x", "a:1", "zzzzz")).await,
            Code::InvalidArgument,
            "zone_bytes = 4",
        );
        cm.register_node(reg("x2", "a:1", "")).await.unwrap();
        cm.register_node(reg("x3", "a:1", "")).await.unwrap();
        refused(
            cm.register_node(reg("x4", "a:1", "")).await,
            Code::ResourceExhausted,
            "nodes = 3",
        );
        cm.register_node(reg("x3", "a:2", "")).await.unwrap(); // a known node re-registers
        let report = cpb::ReplicaReport {
            shard: Some(cpb::ShardId {
                collection: "kept".into(),
                collection_id: 1,
                index: 0,
            }),
            ..Default::default()
        };
        refused(
            cm.heartbeat(cpb::HeartbeatRequest {
                id: "x2".into(),
                replicas: vec![report.clone(), report.clone(), report],
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "reports_per_heartbeat = 2",
        );
        let e = cm
            .heartbeat(cpb::HeartbeatRequest {
                id: "never-registered".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let mut ad = AdminClient::new(channel(&peer.api_addr).await);
        refused(
            ad.create_collection(cpb::CreateCollectionRequest {
                name: "rf".into(),
                dimension: 8,
                shard_count: 1,
                replication_factor: 4,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "replication_factor = 3",
        );
        let lists = ad
            .list_collections(cpb::ListCollectionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(lists.collections.iter().all(|c| c.name != "rf"));
        let learner = |id: u64| cpb::AddLearnerRequest {
            id,
            raft_addr: "127.0.0.1:1".into(),
            api_addr: "127.0.0.1:2".into(),
        };
        let mut q1 = tonic::Request::new(learner(2));
        q1.set_timeout(Duration::from_secs(2));
        let _ = ad.add_learner(q1).await; // the second member: within the limit
        refused(
            ad.add_learner(learner(3)).await,
            Code::ResourceExhausted,
            "coordinator_members = 2",
        );

        node.shutdown().await;
        coord.shutdown().await;
    });
}
