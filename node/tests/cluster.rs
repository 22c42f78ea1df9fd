//! A cluster in-process over loopback gRPC: three coordinators, two nodes (one with the
//! real encoder). Ingest by vector and by text through one node, search through the
//! other (scatter-gather over three shards), get, delete, bad input, and a replica
//! actor crash that its supervisor recovers from disk while the node keeps serving.

use shoal_coordinator::testing::free_port;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_node::cluster::{self, NodeConfig, NodeHandle};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;
use tonic::Code;

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends and receives raw bytes, to put malformed messages on the wire.
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// An OTLP trace collector: the real gRPC service, keeping what it receives.
#[derive(Clone, Default)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<otlp::trace::v1::Span>>>);

use opentelemetry_proto::tonic as otlp;
use otlp::collector::trace::v1 as otlp_trace;

#[tonic::async_trait]
impl otlp_trace::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<otlp_trace::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp_trace::ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(
            otlp_trace::ExportTraceServiceResponse::default(),
        ))
    }
}

async fn start_collector() -> (Collector, std::net::SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = Collector::default();
    let svc = otlp_trace::trace_service_server::TraceServiceServer::new(c.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (c, addr)
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2")
}

fn vector(seed: u64, d: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..d)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

async fn node(dir: &std::path::Path, id: &str, coords: &[String], model: bool) -> NodeHandle {
    cluster::start(NodeConfig {
        // Small enough that the test can send an oversized request cheaply.
        limits: shoal_proto::limits::Limits {
            message_bytes: 1 << 20,
            ..Default::default()
        },
        id: id.into(),
        listen: format!("127.0.0.1:{}", free_port()),
        internal_listen: format!("127.0.0.1:{}", free_port()),
        coordinators: coords.to_vec(),
        data_dir: dir.join(id),
        model_dir: model.then(model_dir),
        heartbeat: Duration::from_millis(200),
        ..NodeConfig::default()
    })
    .await
    .expect("node starts")
}

async fn wait_open(n: &NodeHandle, collection: &str, count: usize) {
    let t = Instant::now();
    while n
        .registry
        .read()
        .keys()
        .filter(|k| k.collection == collection)
        .count()
        < count
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "replicas of {collection} not opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_search_get_delete_errors_and_replica_crash() {
    // Traces go to a collector in this process; the trace context must cross gRPC.
    let (collector, otlp_addr) = start_collector().await;
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let telemetry =
        shoal_node::telemetry::init("shoal-test", Some(&format!("http://{otlp_addr}"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let peers: Vec<shoal_coordinator::Peer> = (1..=3)
        .map(|id| shoal_coordinator::Peer {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            api_addr: format!("127.0.0.1:{}", free_port()),
        })
        .collect();
    let mut coords = Vec::new();
    for p in &peers {
        coords.push(
            shoal_coordinator::start(shoal_coordinator::Config {
                id: p.id,
                listen: p.api_addr.clone(),
                raft_listen: p.raft_addr.clone(),
                data_dir: dir.path().join(format!("c{}", p.id)),
                peers: peers.clone(),
                ..Default::default()
            })
            .await
            .unwrap(),
        );
    }
    let addrs: Vec<String> = peers.iter().map(|p| p.api_addr.clone()).collect();
    let a = node(dir.path(), "a", &addrs, true).await;
    let b = node(dir.path(), "b", &addrs, false).await;
    let mut admin = Client::new(addrs.clone());
    // Both nodes must be up before a collection can be placed on both.
    let t = Instant::now();
    loop {
        let nodes = admin
            .admin(|mut c| async move { c.list_nodes(cpb::ListNodesRequest {}).await })
            .await
            .unwrap()
            .into_inner();
        if nodes
            .nodes
            .iter()
            .filter(|n| n.state == cpb::NodeState::Up as i32)
            .count()
            == 2
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, dim) in [("vecs", 16u32), ("texts", 384)] {
        admin
            .admin(|mut c| async move {
                c.create_collection(cpb::CreateCollectionRequest {
                    name: name.into(),
                    dimension: dim,
                    metric: cpb::Metric::InnerProduct as i32,
                    shard_count: 3,
                    replication_factor: 1,
                    // 4-bit PQ: a ~100-vector shard can train it.
                    index: Some(cpb::IndexParams {
                        nlist: 4,
                        pq_nbits: 4,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
            })
            .await
            .unwrap();
    }
    let placed = |n: &NodeHandle, c: &str| {
        n.view
            .read()
            .shards_of(c)
            .filter(|s| s.primary == *"a" || s.primary == *"b")
            .count()
    };
    let t = Instant::now();
    while placed(&a, "vecs") < 3 || placed(&b, "texts") < 3 {
        assert!(t.elapsed() < Duration::from_secs(20), "map not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_a = a
        .view
        .read()
        .shards_of("vecs")
        .filter(|s| s.primary == "a")
        .count();
    wait_open(&a, "vecs", on_a).await;
    wait_open(&b, "vecs", 3 - on_a).await;

    let mut ga = ShoalClient::connect(format!("http://{}", a.public_addr))
        .await
        .unwrap();
    let mut gb = ShoalClient::connect(format!("http://{}", b.public_addr))
        .await
        .unwrap();

    // 300 vectors through node a.
    let docs: Vec<pb::Document> = (0..300)
        .map(|i| pb::Document {
            id: format!("v{i}"),
            text: format!("doc {i}"),
            metadata_json: format!("{{\"i\":{i}}}"),
            vector: vector(i, 16),
        })
        .collect();
    let r = ga
        .ingest(pb::IngestRequest {
            collection: "vecs".into(),
            documents: docs,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.ingested, 300);

    // Searched through node b: every shard answers; a stored vector finds itself first.
    for i in [0u64, 17, 299] {
        let r = gb
            .search(pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(i, 16),
                k: 5,
                with_text: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.shards_answered, r.shards_total, r.partial),
            (3, 3, false)
        );
        // Inner product: the self-match is not always the max; check it is present.
        assert!(
            r.hits.iter().any(|h| h.id == format!("v{i}")),
            "{:?}",
            r.hits
        );
        assert!(r.hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(r.hits.iter().all(|h| h.text.starts_with("doc ")));
    }
    let got = gb
        .get(pb::GetRequest {
            collection: "vecs".into(),
            id: "v42".into(),
            with_vector: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    let d = got.document.unwrap();
    assert_eq!(d.vector, vector(42, 16));
    assert_eq!(d.metadata_json, "{\"i\":42}");

    // Delete: gone from get and search at once.
    let del = gb
        .delete(pb::DeleteRequest {
            collection: "vecs".into(),
            ids: vec!["v42".into(), "nope".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.deleted, 1);
    let r = ga
        .search(pb::SearchRequest {
            collection: "vecs".into(),
            vector: vector(42, 16),
            k: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits.len(), 299);
    assert!(r.hits.iter().all(|h| h.id != "v42"));

    // Bad input: a clear status, nothing written.
    let bad: Vec<(pb::SearchRequest, Code, &str)> = vec![
        (
            pb::SearchRequest {
                collection: "nope".into(),
                vector: vector(1, 16),
                k: 5,
                ..Default::default()
            },
            Code::NotFound,
            "nope",
        ),
        (
            pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(1, 15),
                k: 5,
                ..Default::default()
            },
            Code::InvalidArgument,
            "dimension 15",
        ),
        (
            pb::SearchRequest {
                collection: "vecs".into(),
                vector: vec![f32::NAN; 16],
                k: 5,
                ..Default::default()
            },
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(1, 16),
                k: 0,
                ..Default::default()
            },
            Code::InvalidArgument,
            "k = 0",
        ),
        (
            pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(1, 16),
                k: 5000,
                ..Default::default()
            },
            Code::InvalidArgument,
            "k is 5000, over the limit k = 1000",
        ),
        (
            pb::SearchRequest {
                collection: "vecs".into(),
                k: 5,
                ..Default::default()
            },
            Code::InvalidArgument,
            "empty",
        ),
        (
            pb::SearchRequest {
                collection: "vecs".into(),
                text: "hi".into(),
                k: 5,
                ..Default::default()
            },
            Code::FailedPrecondition,
            "no encoder",
        ),
    ];
    for (req, code, msg) in bad {
        let e = gb.search(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(msg), "{:?} lacks {msg:?}", e.message());
    }
    let e = ga
        .ingest(pb::IngestRequest {
            collection: "vecs".into(),
            documents: vec![
                pb::Document {
                    id: "ok".into(),
                    vector: vector(1, 16),
                    ..Default::default()
                },
                pb::Document {
                    id: "bad".into(),
                    vector: vector(1, 8),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let g = ga
        .get(pb::GetRequest {
            collection: "vecs".into(),
            id: "ok".into(),
            with_vector: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!g.found, "a refused batch wrote a document");

    // An oversized request is refused by the server with a clear status.
    let huge = pb::IngestRequest {
        collection: "vecs".into(),
        documents: (0..20_000)
            .map(|i| pb::Document {
                id: format!("h{i}"),
                vector: vector(i, 16),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let e = gb.ingest(huge).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    assert!(e.message().contains("too large"), "{}", e.message());

    // A request whose bytes are not a valid protobuf message: INVALID_ARGUMENT naming
    // the decode error, and the node goes on serving.
    for (method, body) in [
        ("/shoal.v1.Shoal/Search", vec![0x0a, 0x05, b'v']), // field 1: 5 bytes promised, 1 sent
        ("/shoal.v1.Shoal/Ingest", vec![0xff, 0xff, 0xff]), // not a valid tag
    ] {
        let mut raw = tonic::client::Grpc::new(channel(b.public_addr).await);
        raw.ready().await.unwrap();
        let e = raw
            .unary(
                tonic::Request::new(body),
                tonic::codegen::http::uri::PathAndQuery::from_static(method),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{method}: {e:?}");
        assert!(
            e.message().contains("malformed protobuf"),
            "{}",
            e.message()
        );
    }
    assert!(gb
        .get(pb::GetRequest {
            collection: "vecs".into(),
            id: "ok".into(),
            with_vector: false,
        })
        .await
        .is_ok());

    // The standard health service says SERVING, and reflection lists the public API.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(b.public_addr).await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shoal.v1.Shoal".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    {
        use tonic_reflection::pb::v1 as refl;
        let mut rc = refl::server_reflection_client::ServerReflectionClient::new(
            channel(b.public_addr).await,
        );
        let req = refl::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                refl::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut replies = rc
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().unwrap();
        let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
            reply.message_response
        else {
            panic!("unexpected reflection reply {reply:?}");
        };
        assert!(
            l.service.iter().any(|s| s.name == "shoal.v1.Shoal"),
            "{l:?}"
        );
    }

    // An IVF-PQ generation on every shard, built beside the serving state; searches
    // then name the generation that answered, and still find every document.
    let built = gb
        .build_index(pb::BuildIndexRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(built.shards.len(), 3);
    assert!(
        built
            .shards
            .iter()
            .all(|s| s.error.is_empty() && s.generation >= 1),
        "{built:?}"
    );
    // The primaries report their new generations; the map records them.
    let t = Instant::now();
    loop {
        let shards = admin
            .admin(|mut c| async move {
                c.list_shards(cpb::ListShardsRequest {
                    collection: "vecs".into(),
                })
                .await
            })
            .await
            .unwrap()
            .into_inner()
            .shards;
        if shards.iter().all(|s| s.serving_generation >= 1) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "generations not in the map: {shards:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = gb
        .search(pb::SearchRequest {
            collection: "vecs".into(),
            vector: vector(17, 16),
            k: 299,
            refine: 100,
            nprobe: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.shards.iter().all(|s| s.generation >= 1), "{:?}", r.shards);
    assert_eq!(r.hits.len(), 299);

    // Text: encoded once by node a's encoder, searched through node a.
    let texts = [
        ("t1", "The mitochondria is the powerhouse of the cell."),
        (
            "t2",
            "Stock markets fell sharply after the interest rate decision.",
        ),
        ("t3", "A recipe for sourdough bread with a crisp crust."),
    ];
    ga.ingest(pb::IngestRequest {
        collection: "texts".into(),
        documents: texts
            .iter()
            .map(|(id, t)| pb::Document {
                id: (*id).into(),
                text: (*t).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = ga
        .search(pb::SearchRequest {
            collection: "texts".into(),
            text: "how do cells make energy?".into(),
            k: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits[0].id, "t1", "{:?}", r.hits);

    // That query is one trace: the gateway's span, its per-shard calls, and each
    // replica's span as a child of the call that reached it (on the other side of gRPC,
    // or in process for the gateway's own node's replicas).
    telemetry.flush();
    let spans = collector.0.lock().unwrap().clone();
    let query = spans
        .iter()
        .filter(|s| s.name == "shoal.search")
        .find(|s| {
            s.attributes
                .iter()
                .any(|a| a.key == "collection" && format!("{:?}", a.value).contains("texts"))
        })
        .expect("no shoal.search span exported");
    let in_trace: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == query.trace_id)
        .collect();
    let calls: Vec<_> = in_trace
        .iter()
        .filter(|s| s.name == "shard.search")
        .collect();
    let replicas: Vec<_> = in_trace
        .iter()
        .filter(|s| s.name == "replica.search")
        .collect();
    assert_eq!(
        calls.len(),
        3,
        "{:?}",
        in_trace.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(
        replicas.len(),
        3,
        "replica spans not joined to the query's trace"
    );
    for r in &replicas {
        assert!(
            calls.iter().any(|c| c.span_id == r.parent_span_id),
            "a replica span's parent is not a shard call"
        );
    }
    assert!(in_trace.iter().any(|s| s.name == "encode"));

    // A replica actor panics: its supervisor reopens it from disk; data intact.
    let (victim, idx) = {
        let reg = a.registry.read();
        let k = reg.keys().find(|k| k.collection == "vecs").unwrap().clone();
        ("a", k.index)
    };
    assert!(a.crash_replica("vecs", idx), "no replica on {victim}");
    let t = Instant::now();
    while a.restarts.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let r = loop {
        let r = gb
            .search(pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(7, 16),
                k: 300,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if !r.partial || t.elapsed() > Duration::from_secs(10) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!r.partial);
    assert_eq!(
        r.hits.len(),
        299,
        "documents lost across the replica restart"
    );

    a.shutdown().await;
    b.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

/// A node that listens on every interface must say which address other nodes dial;
/// it is refused before it binds or registers anything.
#[tokio::test]
async fn a_wildcard_internal_address_needs_an_advertised_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = cluster::start(NodeConfig {
        internal_listen: "0.0.0.0:7301".into(),
        data_dir: dir.path().join("n"),
        ..NodeConfig::default()
    })
    .await
    .err()
    .expect("a wildcard internal address without --advertise-addr is refused");
    assert!(err.to_string().contains("--advertise-addr"), "{err}");
}
