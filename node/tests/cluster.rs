//! A cluster in-process over loopback gRPC: three coordinators and two nodes, started
//! per test by one fixture (`Fixture::start`; node a loads the real encoder when a test
//! needs text). Each test names what it shows: writes through one node read through
//! the other (scatter-gather over three shards), bad input refused whole, the health
//! and reflection services, an index build recorded in the map, a text query traced
//! across gRPC, and a replica actor crash recovered from disk while the node serves.

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
    let models = if model { vec![model_dir()] } else { Vec::new() };
    node_models(dir, id, coords, models).await
}

/// A node encoding with `models` (the first its main one; issue 21: several).
async fn node_models(
    dir: &std::path::Path,
    id: &str,
    coords: &[String],
    models: Vec<PathBuf>,
) -> NodeHandle {
    let mut models = models.into_iter();
    cluster::start(NodeConfig {
        model_dir: models.next(),
        extra_model_dirs: models.collect(),
        // A re-embed's fill runs flat out here: the tests time nothing.
        reembed_duty: 1.0,
        // Small enough that the test can send an oversized request cheaply.
        limits: shoal_proto::limits::Limits {
            message_bytes: 1 << 20,
            payload_bytes: 256 << 10,
            ..Default::default()
        },
        id: id.into(),
        listen: format!("127.0.0.1:{}", free_port()),
        internal_listen: format!("127.0.0.1:{}", free_port()),
        coordinators: coords.to_vec(),
        data_dir: dir.join(id),
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

/// An inner-product collection with an index small shards can train (4 lists, 4-bit
/// PQ: a ~100-vector shard trains it).
async fn small_collection(admin: &mut Client, name: &str, dim: u32, shards: u32, rf: u32) {
    admin
        .create_collection(cpb::CreateCollectionRequest {
            name: name.into(),
            dimension: dim,
            metric: cpb::Metric::InnerProduct as i32,
            shard_count: shards,
            replication_factor: rf,
            index: Some(cpb::IndexParams {
                nlist: 4,
                pq_nbits: 4,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Three coordinators, nodes a and b, collection `vecs` (16-d, three shards, RF 1)
/// placed and open, and, with `text`, collection `texts` (384-d) with node a encoding.
struct Fixture {
    _dir: tempfile::TempDir,
    addrs: Vec<String>,
    coords: Vec<shoal_coordinator::Handle>,
    a: NodeHandle,
    b: NodeHandle,
    admin: Client,
    ga: ShoalClient<tonic::transport::Channel>,
    gb: ShoalClient<tonic::transport::Channel>,
}

impl Fixture {
    async fn start(text: bool) -> Fixture {
        Self::start_with(text, None).await
    }

    /// With `both`: nodes a and b both encode, with the fixture's model and this one.
    async fn start_with(text: bool, both: Option<PathBuf>) -> Fixture {
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
                    ..shoal_coordinator::testing::member_config()
                })
                .await
                .unwrap(),
            );
        }
        let addrs: Vec<String> = peers.iter().map(|p| p.api_addr.clone()).collect();
        let (a, b) = match &both {
            Some(extra) => {
                let models = vec![model_dir(), extra.clone()];
                (
                    node_models(dir.path(), "a", &addrs, models.clone()).await,
                    node_models(dir.path(), "b", &addrs, models).await,
                )
            }
            None => (
                node(dir.path(), "a", &addrs, text).await,
                node(dir.path(), "b", &addrs, false).await,
            ),
        };
        let mut admin = Client::new(addrs.clone());
        // Both nodes must be up before a collection can be placed on both.
        let t = Instant::now();
        loop {
            let nodes = admin.list_nodes(cpb::ListNodesRequest {}).await.unwrap();
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
        let collections: &[(&str, u32)] = if text {
            &[("vecs", 16), ("texts", 384)]
        } else {
            &[("vecs", 16)]
        };
        for &(name, dim) in collections {
            small_collection(&mut admin, name, dim, 3, 1).await;
        }
        let placed = |n: &NodeHandle, c: &str| {
            n.view
                .read()
                .shards_of(c)
                .filter(|s| s.primary == *"a" || s.primary == *"b")
                .count()
        };
        let t = Instant::now();
        while collections
            .iter()
            .any(|(c, _)| placed(&a, c) < 3 || placed(&b, c) < 3)
        {
            assert!(t.elapsed() < Duration::from_secs(20), "map not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for &(c, _) in collections {
            let on_a = a
                .view
                .read()
                .shards_of(c)
                .filter(|s| s.primary == "a")
                .count();
            wait_open(&a, c, on_a).await;
            wait_open(&b, c, 3 - on_a).await;
        }
        let ga = ShoalClient::connect(format!("http://{}", a.public_addr))
            .await
            .unwrap();
        let gb = ShoalClient::connect(format!("http://{}", b.public_addr))
            .await
            .unwrap();
        Fixture {
            _dir: dir,
            addrs,
            coords,
            a,
            b,
            admin,
            ga,
            gb,
        }
    }

    /// `n` vectors `v0..` into `vecs` through node a (text "doc i", metadata {"i": i}).
    async fn ingest_vectors(&mut self, n: u64) {
        let docs: Vec<pb::Document> = (0..n)
            .map(|i| pb::Document {
                id: format!("v{i}"),
                text: format!("doc {i}"),
                metadata_json: format!("{{\"i\":{i}}}"),
                vector: vector(i, 16),
            })
            .collect();
        let r = self
            .ga
            .ingest(pb::IngestRequest {
                collection: "vecs".into(),
                documents: docs,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ingested, n);
    }

    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
        for c in self.coords {
            c.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_one_node_are_searched_got_and_deleted_through_the_other() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    // Searched through node b: every shard answers; a stored vector finds itself.
    for i in [0u64, 17, 299] {
        let r =
            f.gb.search(pb::SearchRequest {
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
        assert!(
            r.hits.iter().all(|h| h.metadata_json.is_empty()),
            "not asked"
        );
    }
    // Payloads (issue 22): each hit's text and metadata from the shard that found it,
    // in the same answer; nothing of them unasked.
    let search = |with_text: bool, with_payload: bool| pb::SearchRequest {
        collection: "vecs".into(),
        vector: vector(7, 16),
        k: 10,
        with_text,
        with_payload,
        ..Default::default()
    };
    let r = f.ga.search(search(true, true)).await.unwrap().into_inner();
    assert_eq!(r.hits.len(), 10);
    for h in &r.hits {
        let i: u64 = h.id[1..].parse().unwrap();
        assert_eq!(h.text, format!("doc {i}"));
        assert_eq!(h.metadata_json, format!("{{\"i\":{i}}}"));
    }
    let r = f.ga.search(search(false, true)).await.unwrap().into_inner();
    assert!(r
        .hits
        .iter()
        .all(|h| h.text.is_empty() && h.metadata_json.starts_with("{\"i\":")));
    let r =
        f.ga.search(search(false, false))
            .await
            .unwrap()
            .into_inner();
    assert!(r
        .hits
        .iter()
        .all(|h| h.text.is_empty() && h.metadata_json.is_empty()));
    // Over the payload limit (256 KiB here): refused whole, naming the limit.
    for id in ["big1", "big2"] {
        f.ga.ingest(pb::IngestRequest {
            collection: "vecs".into(),
            documents: vec![pb::Document {
                id: id.into(),
                text: "x".repeat(200_000),
                vector: vector(9_999, 16),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let big = |with_text| pb::SearchRequest {
        collection: "vecs".into(),
        vector: vector(9_999, 16),
        k: 2,
        with_text,
        exact: true,
        ..Default::default()
    };
    let e = f.ga.search(big(true)).await.unwrap_err();
    assert!(e.message().contains("payload_bytes"), "{e}");
    let r = f.ga.search(big(false)).await.unwrap().into_inner();
    assert_eq!(r.hits.len(), 2);
    f.ga.delete(pb::DeleteRequest {
        collection: "vecs".into(),
        ids: vec!["big1".into(), "big2".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let got =
        f.gb.get(pb::GetRequest {
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
    let del =
        f.gb.delete(pb::DeleteRequest {
            collection: "vecs".into(),
            ids: vec!["v42".into(), "nope".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.deleted, 1);
    let r =
        f.ga.search(pb::SearchRequest {
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
    f.stop().await;
}

/// The indexed fields of every replica of `vecs` on both nodes.
fn vecs_fields(f: &Fixture) -> Vec<Vec<shoal_engine::PayloadField>> {
    [&f.a, &f.b]
        .iter()
        .flat_map(|n| {
            n.registry
                .read()
                .iter()
                .filter(|(k, _)| k.collection == "vecs")
                .map(|(_, h)| h.repl.shard().unwrap().payload_fields())
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn set_fields(f: &mut Fixture, fields: &[&str]) {
    let want: Vec<shoal_engine::PayloadField> = fields
        .iter()
        .map(|s| shoal_engine::PayloadField::parse(s).unwrap())
        .collect();
    let info = f
        .admin
        .set_collection_policy(cpb::SetCollectionPolicyRequest {
            name: "vecs".into(),
            auto_rebuild_rows: None,
            payload_fields: want.iter().map(|f| f.wire()).collect(),
        })
        .await
        .unwrap();
    assert_eq!(info.collection.unwrap().payload_fields.len(), want.len());
    let t = Instant::now();
    while !vecs_fields(f).iter().all(|got| *got == want) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "fields {fields:?} not indexed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filtered_search_answers_from_every_shard_exactly_what_the_filter_admits() {
    let mut f = Fixture::start(false).await;
    let meta = |i: u64| {
        serde_json::json!({"i": i, "half": if i < 600 { "lo" } else { "hi" },
                           "tags": [format!("t{}", i % 3), "all"]})
    };
    let docs: Vec<pb::Document> = (0..1200)
        .map(|i| pb::Document {
            id: format!("v{i}"),
            metadata_json: meta(i).to_string(),
            vector: vector(i, 16),
            ..Default::default()
        })
        .collect();
    f.ga.ingest(pb::IngestRequest {
        collection: "vecs".into(),
        documents: docs,
        ..Default::default()
    })
    .await
    .unwrap();
    // Not indexed yet: refused by name, before any shard is asked.
    let filtered = |json: &str, exact: bool| pb::SearchRequest {
        collection: "vecs".into(),
        vector: vector(5_000, 16),
        k: 10,
        exact,
        filter: Some(shoal_engine::Filter::from_json(json).unwrap().wire()),
        ..Default::default()
    };
    let e =
        f.ga.search(filtered(
            r#"{"must": [{"key": "i", "range": {"lt": 100}}]}"#,
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("indexes no fields"), "{e}");
    // Indexed at run time: every replica reads its documents' metadata again.
    set_fields(&mut f, &["i:number", "half:keyword"]).await;
    let fields = vecs_fields(&f)[0].clone();
    let ip = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let q = vector(5_000, 16);
    let cases = [
        r#"{"must": [{"key": "i", "range": {"lt": 100}}]}"#,
        r#"{"must": [{"key": "half", "match": "hi"}], "must_not": [{"key": "i", "in": [700, 701, 702]}]}"#,
        r#"{"should": [{"key": "i", "range": {"gte": 1190}}, {"key": "i", "match": 3}]}"#,
    ];
    for json in cases {
        let filter = shoal_engine::Filter::from_json(json).unwrap();
        let mut truth: Vec<(f32, String)> = (0..1200u64)
            .filter(|&i| filter.matches(&fields, &meta(i)))
            .map(|i| (ip(&q, &vector(i, 16)), format!("v{i}")))
            .collect();
        truth.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want: std::collections::BTreeSet<String> =
            truth.iter().take(10).map(|t| t.1.clone()).collect();
        for exact in [true, false] {
            let r =
                f.gb.search(filtered(json, exact))
                    .await
                    .unwrap()
                    .into_inner();
            assert_eq!((r.shards_answered, r.partial), (3, false), "{json}");
            assert!(r.shards.iter().all(|s| s.plan == "exact"), "{:?}", r.shards);
            for h in &r.hits {
                let i: u64 = h.id[1..].parse().unwrap();
                assert!(filter.matches(&fields, &meta(i)), "{json}: {} passed", h.id);
            }
            let got: std::collections::BTreeSet<String> =
                r.hits.iter().map(|h| h.id.clone()).collect();
            assert_eq!(got, want, "{json} (exact {exact})");
        }
    }
    // Count and scroll (issue 22): every shard's part.
    let count = |json: Option<&str>| pb::CountRequest {
        collection: "vecs".into(),
        filter: json.map(|j| shoal_engine::Filter::from_json(j).unwrap().wire()),
    };
    assert_eq!(
        f.ga.count(count(None)).await.unwrap().into_inner().count,
        1200
    );
    let c =
        f.gb.count(count(Some(
            r#"{"must": [{"key": "i", "range": {"lt": 100}}]}"#,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.count, c.partial), (100, false));
    let hi =
        shoal_engine::Filter::from_json(r#"{"must": [{"key": "half", "match": "hi"}]}"#).unwrap();
    let (mut seen, mut cursor, mut pages) = (std::collections::BTreeSet::new(), String::new(), 0);
    loop {
        let page =
            f.ga.scroll(pb::ScrollRequest {
                collection: "vecs".into(),
                filter: Some(hi.wire()),
                limit: 70,
                cursor: cursor.clone(),
                with_payload: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.documents.len() <= 70);
        for d in &page.documents {
            let i: u64 = d.id[1..].parse().unwrap();
            assert!(i >= 600, "{} passed the filter", d.id);
            assert_eq!(d.metadata_json, meta(i).to_string());
            assert!(seen.insert(d.id.clone()), "{} twice", d.id);
        }
        if page.cursor.is_empty() {
            break;
        }
        cursor = page.cursor;
    }
    assert_eq!((seen.len(), pages), (600, 9));
    let e =
        f.ga.scroll(pb::ScrollRequest {
            collection: "vecs".into(),
            cursor: "scroll:7:0:0:0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    // Payload updates without the vector: merged, the vector and the rest kept.
    f.gb.set_payload(pb::SetPayloadRequest {
        collection: "vecs".into(),
        id: "v5".into(),
        metadata_json: r#"{"half": "mid"}"#.into(),
        merge: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let got =
        f.ga.get(pb::GetRequest {
            collection: "vecs".into(),
            id: "v5".into(),
            with_vector: true,
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(got.vector, vector(5, 16));
    let m: serde_json::Value = serde_json::from_str(&got.metadata_json).unwrap();
    assert_eq!(
        (m["i"].as_u64(), m["half"].as_str()),
        (Some(5), Some("mid"))
    );
    // Concurrent merges into one document: each is written over the version it read
    // (a conflict reads and merges again), so none is lost.
    let merges = (0..8).map(|i| {
        let mut g = if i % 2 == 0 {
            f.ga.clone()
        } else {
            f.gb.clone()
        };
        async move {
            g.set_payload(pb::SetPayloadRequest {
                collection: "vecs".into(),
                id: "v6".into(),
                metadata_json: format!(r#"{{"k{i}": {i}}}"#),
                merge: true,
                ..Default::default()
            })
            .await
        }
    });
    for r in futures::future::join_all(merges).await {
        r.unwrap();
    }
    let got =
        f.ga.get(pb::GetRequest {
            collection: "vecs".into(),
            id: "v6".into(),
            with_vector: true,
        })
        .await
        .unwrap()
        .into_inner();
    let m: serde_json::Value =
        serde_json::from_str(&got.document.as_ref().unwrap().metadata_json).unwrap();
    for i in 0..8u64 {
        assert_eq!(m[format!("k{i}")].as_u64(), Some(i), "{m}");
    }
    assert_eq!(m["i"].as_u64(), Some(6));
    assert_eq!(got.document.unwrap().vector, vector(6, 16));
    // A client's own version check: the version it read passes once, then is stale.
    let at = |v: u64| pb::SetPayloadRequest {
        collection: "vecs".into(),
        id: "v6".into(),
        metadata_json: r#"{"checked": true}"#.into(),
        merge: true,
        if_version: v,
    };
    f.gb.set_payload(at(got.version)).await.unwrap();
    let e = f.gb.set_payload(at(got.version)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e}");
    assert!(e.message().contains("if_version"), "{e}");
    let mid = r#"{"must": [{"key": "half", "match": "mid"}]}"#;
    assert_eq!(
        f.ga.count(count(Some(mid)))
            .await
            .unwrap()
            .into_inner()
            .count,
        1
    );
    // Batch search: each answer as the search alone gives it; a bad one is named.
    let one = |i: u64| pb::SearchRequest {
        collection: "vecs".into(),
        vector: vector(i, 16),
        k: 5,
        exact: true,
        ..Default::default()
    };
    let batch =
        f.ga.search_batch(pb::SearchBatchRequest {
            searches: vec![one(1), one(2), one(3)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 3);
    for (i, r) in batch.results.iter().enumerate() {
        let alone = f.ga.search(one(i as u64 + 1)).await.unwrap().into_inner();
        let ids = |r: &pb::SearchResponse| r.hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(r), ids(&alone));
    }
    // One fan-out: each shard is asked the batch's searches in one call.
    let calls = || {
        [&f.a, &f.b]
            .iter()
            .map(|n| n.search_calls.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    let before = calls();
    let many =
        f.ga.search_batch(pb::SearchBatchRequest {
            searches: (0..8).map(one).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(many.results.len(), 8);
    assert!(many.results.iter().all(|r| !r.partial && r.hits.len() == 5));
    assert_eq!(calls() - before, 3, "one call per shard for a batch of 8");
    let mut bad = one(2);
    bad.k = 0;
    let e =
        f.ga.search_batch(pb::SearchBatchRequest {
            searches: vec![one(1), bad],
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("search 1:"), "{e}");
    // Delete by filter: what it admits goes, the rest stays.
    let d =
        f.gb.delete_by_filter(pb::DeleteByFilterRequest {
            collection: "vecs".into(),
            filter: Some(
                shoal_engine::Filter::from_json(r#"{"must": [{"key": "i", "range": {"lt": 50}}]}"#)
                    .unwrap()
                    .wire(),
            ),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 50);
    assert_eq!(
        f.ga.count(count(None)).await.unwrap().into_inner().count,
        1150
    );
    assert_eq!(
        f.ga.count(count(Some(mid)))
            .await
            .unwrap()
            .into_inner()
            .count,
        0
    );
    let e =
        f.gb.delete_by_filter(pb::DeleteByFilterRequest {
            collection: "vecs".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Bad filters: the field's name, the kind's rule, the limit.
    for (json, says) in [
        (
            r#"{"must": [{"key": "tags", "match": "t1"}]}"#,
            "not indexed",
        ),
        (
            r#"{"must": [{"key": "half", "range": {"gt": 1}}]}"#,
            "keyword",
        ),
        (r#"{"must": [{"key": "i", "match": "x"}]}"#, "number"),
    ] {
        let e = f.ga.search(filtered(json, false)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{json}");
        assert!(e.message().contains(says), "{json}: {e}");
    }
    let many: Vec<String> = (0..2_000).map(|i| i.to_string()).collect();
    let e =
        f.ga.search(filtered(
            &format!(
                r#"{{"must": [{{"key": "i", "in": [{}]}}]}}"#,
                many.join(",")
            ),
            false,
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("filter_terms"), "{e}");
    // A field added later (arrays: any element matches); writes after it indexed too.
    set_fields(&mut f, &["i:number", "half:keyword", "tags:keyword"]).await;
    f.ga.ingest(pb::IngestRequest {
        collection: "vecs".into(),
        documents: vec![pb::Document {
            id: "late".into(),
            metadata_json: r#"{"tags": ["late"]}"#.into(),
            vector: vector(5_000, 16),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let r =
        f.ga.search(filtered(
            r#"{"must": [{"key": "tags", "in": ["t1", "late"]}]}"#,
            false,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits[0].id, "late");
    assert!(r.hits[1..]
        .iter()
        .all(|h| h.id[1..].parse::<u64>().unwrap() % 3 == 1));
    f.stop().await;
}

/// BM25 computed over the whole corpus in one place: what every shard must score when
/// the gateway sums the shards' statistics (issue 22).
fn bm25_whole(corpus: &[(&str, &str)], query: &str) -> Vec<(String, f32)> {
    use shoal_engine::{bm25_idf, tokenize, Bm25};
    let docs: Vec<(String, Vec<String>)> = corpus
        .iter()
        .map(|(id, t)| (id.to_string(), tokenize(t)))
        .collect();
    let n = docs.len() as u64;
    let avg = docs.iter().map(|d| d.1.len()).sum::<usize>() as f32 / n as f32;
    let q = tokenize(query);
    let bm = Bm25::default();
    let mut out: Vec<(String, f32)> = docs
        .iter()
        .map(|(id, toks)| {
            let len = toks.len() as f32;
            let s: f32 = q
                .iter()
                .map(|t| {
                    let df = docs.iter().filter(|d| d.1.contains(t)).count() as u64;
                    let tf = toks.iter().filter(|x| *x == t).count() as f32;
                    if tf == 0.0 {
                        0.0
                    } else {
                        bm25_idf(n, df) * tf / (tf + bm.k1 * (1.0 - bm.b + bm.b * len / avg))
                    }
                })
                .sum();
            (id.clone(), s)
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lexical_hybrid_and_feedback_searches_score_as_one_collection_across_shards() {
    let mut f = Fixture::start(true).await;
    let corpus: Vec<(&str, &str)> = vec![
        (
            "d1",
            "The mitochondria is the powerhouse of the cell and makes energy.",
        ),
        (
            "d2",
            "Stock markets fell sharply after the interest rate decision.",
        ),
        (
            "d3",
            "A recipe for sourdough bread with a crisp crust and an open crumb.",
        ),
        (
            "d4",
            "Cells divide by mitosis; mitochondria divide on their own.",
        ),
        (
            "d5",
            "Interest rates rose again, and bond markets sold off.",
        ),
        (
            "d6",
            "Bread, butter and jam: a breakfast of crumbs and crusts.",
        ),
        (
            "d7",
            "Photosynthesis makes energy for plant cells from light.",
        ),
        (
            "d8",
            "The central bank kept rates on hold for the third meeting.",
        ),
        ("d9", "Baking rye bread needs a sour starter and patience."),
        (
            "d10",
            "Energy markets: oil prices and the interest of traders.",
        ),
    ];
    f.ga.ingest(pb::IngestRequest {
        collection: "texts".into(),
        documents: corpus
            .iter()
            .map(|(id, t)| pb::Document {
                id: (*id).into(),
                text: (*t).into(),
                // Odd documents are "a", even ones "b" (the filtered checks below).
                metadata_json: format!(
                    r#"{{"part": "{}"}}"#,
                    if id[1..].parse::<u32>().unwrap() % 2 == 1 {
                        "a"
                    } else {
                        "b"
                    }
                ),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ask = |text: &str, mode: pb::RetrievalMode| pb::SearchRequest {
        collection: "texts".into(),
        text: text.into(),
        k: 10,
        mode: mode as i32,
        ..Default::default()
    };
    // Lexical: every shard scores with the collection's statistics, so the merged
    // answer is BM25 over the whole corpus (three shards here).
    for q in [
        "interest rates markets",
        "bread crust",
        "mitochondria energy cells",
    ] {
        let r =
            f.gb.search(ask(q, pb::RetrievalMode::Lexical))
                .await
                .unwrap()
                .into_inner();
        assert_eq!((r.shards_answered, r.partial), (3, false));
        let want = bm25_whole(&corpus, q);
        assert_eq!(r.hits.len(), want.len(), "{q}");
        for (h, (id, s)) in r.hits.iter().zip(&want) {
            assert_eq!(&h.id, id, "{q}");
            assert!(
                (h.score - s).abs() < 1e-4,
                "{q}: {} {} vs {s}",
                h.id,
                h.score
            );
        }
    }
    // Hybrid (RRF): the fusion of the dense and lexical lists asked alone.
    let q = "bread crust";
    let mut dense = ask(q, pb::RetrievalMode::Dense);
    dense.k = 100;
    let d = f.ga.search(dense).await.unwrap().into_inner().hits;
    let mut lex = ask(q, pb::RetrievalMode::Lexical);
    lex.k = 100;
    let l = f.ga.search(lex).await.unwrap().into_inner().hits;
    let h =
        f.ga.search(ask(q, pb::RetrievalMode::Hybrid))
            .await
            .unwrap()
            .into_inner();
    assert!(!h.partial);
    let rank = |list: &[pb::Hit], id: &str| list.iter().position(|x| x.id == id);
    for hit in &h.hits {
        let want: f32 = [rank(&d, &hit.id), rank(&l, &hit.id)]
            .iter()
            .flatten()
            .map(|r| 1.0 / (60.0 + *r as f32 + 1.0))
            .sum();
        assert!(
            (hit.score - want).abs() < 1e-6,
            "{}: {} vs {want}",
            hit.id,
            hit.score
        );
    }
    assert!(h.hits.windows(2).all(|w| w[0].score >= w[1].score));
    // A batch of dense, lexical and hybrid searches: each answers as alone.
    let asks = [
        ask(q, pb::RetrievalMode::Dense),
        ask("bread crust", pb::RetrievalMode::Dense),
        ask(q, pb::RetrievalMode::Hybrid),
        ask("bread crust", pb::RetrievalMode::Lexical),
    ];
    let batch =
        f.ga.search_batch(pb::SearchBatchRequest {
            searches: asks.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    for (r, a) in batch.results.iter().zip(asks) {
        let alone = f.ga.search(a).await.unwrap().into_inner();
        let ids = |r: &pb::SearchResponse| r.hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(r), ids(&alone));
        for (x, y) in r.hits.iter().zip(&alone.hits) {
            assert!((x.score - y.score).abs() < 1e-5, "{} {}", x.score, y.score);
        }
    }
    // The default (AUTO) for a text query is this hybrid search.
    let auto =
        f.ga.search(ask(q, pb::RetrievalMode::Auto))
            .await
            .unwrap()
            .into_inner();
    let scored = |r: &[pb::Hit]| {
        r.iter()
            .map(|h| (h.id.clone(), h.score))
            .collect::<Vec<_>>()
    };
    assert_eq!(scored(&auto.hits), scored(&h.hits));
    // Linear, all weight on the dense side: the dense order.
    let mut linear = ask(q, pb::RetrievalMode::Hybrid);
    linear.fusion = pb::Fusion::Linear as i32;
    linear.dense_weight = Some(1.0);
    linear.k = 5;
    let only_dense: Vec<String> =
        f.ga.search(linear)
            .await
            .unwrap()
            .into_inner()
            .hits
            .into_iter()
            .map(|h| h.id)
            .collect();
    let first: Vec<String> = d.iter().take(5).map(|h| h.id.clone()).collect();
    assert_eq!(only_dense, first);
    // Pseudo-relevance feedback: alpha 1, beta 0 is the query itself; the defaults
    // move it (the answer is whole either way).
    let prf = |alpha: Option<f32>, beta: Option<f32>| {
        let mut r = ask("how do cells make energy?", pb::RetrievalMode::Dense);
        r.prf = Some(pb::Prf {
            enabled: true,
            depth: 0,
            alpha,
            beta,
        });
        r
    };
    let plain: Vec<String> =
        f.ga.search(ask("how do cells make energy?", pb::RetrievalMode::Dense))
            .await
            .unwrap()
            .into_inner()
            .hits
            .into_iter()
            .map(|h| h.id)
            .collect();
    let same =
        f.ga.search(prf(Some(1.0), Some(0.0)))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        same.hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>(),
        plain
    );
    let moved = f.ga.search(prf(None, None)).await.unwrap().into_inner();
    assert_eq!((moved.hits.len(), moved.partial), (10, false));
    // Filtered lexical and hybrid search: only what the filter admits, the lexical
    // scores still the whole collection's (the filter chooses, it does not re-weigh).
    f.admin
        .set_collection_policy(cpb::SetCollectionPolicyRequest {
            name: "texts".into(),
            auto_rebuild_rows: None,
            payload_fields: vec![shoal_engine::PayloadField::parse("part:keyword")
                .unwrap()
                .wire()],
        })
        .await
        .unwrap();
    let part_a =
        shoal_engine::Filter::from_json(r#"{"must": [{"key": "part", "match": "a"}]}"#).unwrap();
    let t = Instant::now();
    loop {
        let mut r = ask("bread crust markets", pb::RetrievalMode::Lexical);
        r.filter = Some(part_a.wire());
        match f.ga.search(r).await {
            Ok(r) if !r.get_ref().partial => {
                let r = r.into_inner();
                let want: Vec<(String, f32)> = bm25_whole(&corpus, "bread crust markets")
                    .into_iter()
                    .filter(|(id, _)| id[1..].parse::<u32>().unwrap() % 2 == 1)
                    .collect();
                assert_eq!(r.hits.len(), want.len());
                for (h, (id, s)) in r.hits.iter().zip(&want) {
                    assert_eq!(&h.id, id);
                    assert!((h.score - s).abs() < 1e-4, "{} {} vs {s}", h.id, h.score);
                }
                break;
            }
            // The policy reaches the gateway's map, then each replica's index (a
            // replica without it yet answers UNAVAILABLE: a partial answer).
            Ok(r) => assert!(
                t.elapsed() < Duration::from_secs(10),
                "{:?}",
                r.get_ref().shards
            ),
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut r = ask("bread crust", pb::RetrievalMode::Hybrid);
    r.filter = Some(part_a.wire());
    let r = f.ga.search(r).await.unwrap().into_inner();
    assert!(!r.hits.is_empty() && !r.partial);
    assert!(
        r.hits
            .iter()
            .all(|h| h.id[1..].parse::<u32>().unwrap() % 2 == 1),
        "{:?}",
        r.hits
    );
    // More like this: a stored document is the query, and is not among the hits.
    for mode in [
        pb::RetrievalMode::Dense,
        pb::RetrievalMode::Lexical,
        pb::RetrievalMode::Hybrid,
    ] {
        let r =
            f.gb.search(pb::SearchRequest {
                collection: "texts".into(),
                like_id: "d3".into(),
                k: 3,
                mode: mode as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.hits.len(), 3, "{mode:?}");
        assert!(r.hits.iter().all(|h| h.id != "d3"), "{mode:?}");
        assert!(
            ["d6", "d9"].contains(&r.hits[0].id.as_str()),
            "{mode:?}: {:?}",
            r.hits
        );
    }
    let e =
        f.ga.search(pb::SearchRequest {
            collection: "texts".into(),
            like_id: "nope".into(),
            k: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // Bad combinations: named.
    let mut bad = ask("x", pb::RetrievalMode::Lexical);
    bad.prf = Some(pb::Prf {
        enabled: true,
        ..Default::default()
    });
    let e = f.ga.search(bad).await.unwrap_err();
    assert!(e.message().contains("feedback"), "{e}");
    let mut bad = ask("x", pb::RetrievalMode::Hybrid);
    bad.fusion = pb::Fusion::Linear as i32;
    bad.dense_weight = Some(2.0);
    let e = f.ga.search(bad).await.unwrap_err();
    assert!(e.message().contains("dense_weight"), "{e}");
    let e =
        f.ga.search(pb::SearchRequest {
            collection: "texts".into(),
            vector: vec![0.1; 384],
            k: 3,
            mode: pb::RetrievalMode::Lexical as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    f.stop().await;
}

/// Every replica of `vecs` on both nodes: (automatic rebuild rows, serving generation).
fn vecs_replicas(f: &Fixture) -> Vec<(usize, Option<u64>)> {
    [&f.a, &f.b]
        .iter()
        .flat_map(|n| {
            n.registry
                .read()
                .iter()
                .filter(|(k, _)| k.collection == "vecs")
                .map(|(_, h)| {
                    let s = h.repl.shard().unwrap();
                    (s.auto_rebuild_tail(), s.stats().serving.map(|g| g.id))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn set_auto_rebuild(f: &mut Fixture, rows: Option<u64>, want: usize) {
    let info = f
        .admin
        .set_collection_policy(cpb::SetCollectionPolicyRequest {
            name: "vecs".into(),
            auto_rebuild_rows: rows,
            payload_fields: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(info.collection.unwrap().auto_rebuild_rows, rows);
    let t = Instant::now();
    while !vecs_replicas(f).iter().all(|&(tail, _)| tail == want) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "policy {rows:?} not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collections_auto_rebuild_policy_changes_at_run_time_on_every_replica() {
    let mut f = Fixture::start(false).await;
    assert!(vecs_replicas(&f)
        .iter()
        .all(|&(tail, g)| tail == 50_000 && g.is_none()));
    // Every 100 new rows: 600 rows (about 200 a shard) build every shard's index.
    set_auto_rebuild(&mut f, Some(100), 100).await;
    f.ingest_vectors(600).await;
    let t = Instant::now();
    while !vecs_replicas(&f).iter().all(|&(_, g)| g.is_some()) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            vecs_replicas(&f)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Off (a bulk load): 600 more rows build nothing.
    set_auto_rebuild(&mut f, Some(0), 0).await;
    let built = vecs_replicas(&f);
    let more: Vec<pb::Document> = (1_000..1_600)
        .map(|i| pb::Document {
            id: format!("v{i}"),
            vector: vector(i, 16),
            ..Default::default()
        })
        .collect();
    f.ga.ingest(pb::IngestRequest {
        collection: "vecs".into(),
        documents: more,
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        vecs_replicas(&f),
        built,
        "a build ran with automatic rebuilds off"
    );
    // Back to the nodes' default.
    set_auto_rebuild(&mut f, None, 50_000).await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipelined_stream_lands_every_batch_and_applies_one_ids_writes_in_order() {
    let mut f = Fixture::start(false).await;
    // 40 batches of 25; every fifth batch also rewrites "dup", each time with the
    // next vector, so only stream order leaves the last one standing.
    let batches: Vec<pb::IngestRequest> = (0..40u64)
        .map(|b| {
            let mut documents: Vec<pb::Document> = (0..25)
                .map(|j| {
                    let i = b * 25 + j;
                    pb::Document {
                        id: format!("s{i}"),
                        vector: vector(i, 16),
                        ..Default::default()
                    }
                })
                .collect();
            if b % 5 == 0 {
                documents.push(pb::Document {
                    id: "dup".into(),
                    vector: vector(10_000 + b, 16),
                    ..Default::default()
                });
            }
            pb::IngestRequest {
                collection: "vecs".into(),
                documents,
                ..Default::default()
            }
        })
        .collect();
    let r =
        f.ga.ingest_stream(tokio_stream::iter(batches))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.ingested, 1_000 + 8);
    for id in ["s0", "s517", "s999"] {
        let got =
            f.gb.get(pb::GetRequest {
                collection: "vecs".into(),
                id: id.into(),
                with_vector: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.found, "{id}");
    }
    let dup =
        f.gb.get(pb::GetRequest {
            collection: "vecs".into(),
            id: "dup".into(),
            with_vector: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dup.document.unwrap().vector, vector(10_035, 16));
    // A bad batch mid-stream fails the stream, saying how many were acknowledged.
    let bad = (0..6u64).map(|b| pb::IngestRequest {
        collection: "vecs".into(),
        documents: vec![pb::Document {
            id: format!("t{b}"),
            vector: if b == 3 { vec![1.0; 3] } else { vector(b, 16) },
            ..Default::default()
        }],
        ..Default::default()
    });
    let e =
        f.ga.ingest_stream(tokio_stream::iter(bad))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("documents acknowledged") && e.message().contains("t3"),
        "{}",
        e.message()
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_a_clear_status_and_write_nothing() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(10).await;
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
        let e = f.gb.search(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(msg), "{:?} lacks {msg:?}", e.message());
    }
    // A batch with one bad document is refused whole.
    let e =
        f.ga.ingest(pb::IngestRequest {
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
    let ok = pb::GetRequest {
        collection: "vecs".into(),
        id: "ok".into(),
        with_vector: false,
    };
    let g = f.ga.get(ok.clone()).await.unwrap().into_inner();
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
    let e = f.gb.ingest(huge).await.unwrap_err();
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
        let mut raw = tonic::client::Grpc::new(channel(f.b.public_addr).await);
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
    assert!(f.gb.get(ok).await.is_ok());
    let got =
        f.gb.get(pb::GetRequest {
            collection: "vecs".into(),
            id: "v3".into(),
            with_vector: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        got.found,
        "what was acknowledged before the bad input is gone"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_says_serving_and_reflection_lists_the_public_api() {
    let f = Fixture::start(false).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(f.b.public_addr).await);
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
    use tonic_reflection::pb::v1 as refl;
    let mut rc =
        refl::server_reflection_client::ServerReflectionClient::new(channel(f.b.public_addr).await);
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
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_build_serves_every_shard_and_the_map_records_it() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    // An IVF-PQ generation on every shard, built beside the serving state; searches
    // then name the generation that answered, and still find every document.
    let built =
        f.gb.build_index(pb::BuildIndexRequest {
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
    // It ran as a cluster operation, with the collection's parameters on every shard.
    assert_eq!(
        (built.state.as_str(), built.nlist),
        ("succeeded", 4),
        "{built:?}"
    );
    let ops = f
        .admin
        .list_operations(cpb::ListOperationsRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap()
        .operations;
    assert!(
        ops.iter().any(|o| o.id == built.operation
            && o.state == "succeeded"
            && o.steps.iter().all(|s| s.state == "done")),
        "{ops:?}"
    );
    // The primaries report their new generations; the map records them.
    let t = Instant::now();
    loop {
        let shards = f
            .admin
            .list_shards(cpb::ListShardsRequest {
                collection: "vecs".into(),
            })
            .await
            .unwrap()
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
    let r =
        f.gb.search(pb::SearchRequest {
            collection: "vecs".into(),
            vector: vector(17, 16),
            k: 300,
            refine: 100,
            nprobe: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.shards.iter().all(|s| s.generation >= 1), "{:?}", r.shards);
    assert_eq!(r.hits.len(), 300);
    f.stop().await;
}

/// Each hosted replica of `collection` on `n`: its shard, and the generation it serves
/// (id, rows covered, build time's bits: the same only for the same build).
type Served = Vec<(u32, Option<(u64, u64, u64)>)>;

fn served(n: &NodeHandle, collection: &str) -> Served {
    let mut v: Vec<_> = n
        .registry
        .read()
        .iter()
        .filter(|(k, _)| k.collection == collection)
        .map(|(k, h)| {
            let g = h.repl.shard().ok().and_then(|s| s.stats().serving);
            (
                k.index,
                g.map(|g| (g.id, g.covered_rows, g.build_seconds.to_bits())),
            )
        })
        .collect();
    v.sort();
    v
}

/// Ingests `n` 16-d documents `{prefix}{i}` into `collection` through `g`, retried
/// until every shard has its write quorum.
async fn ingest_until_accepted(
    g: &mut ShoalClient<tonic::transport::Channel>,
    collection: &str,
    prefix: &str,
    n: u64,
) {
    let docs: Vec<pb::Document> = (0..n)
        .map(|i| pb::Document {
            id: format!("{prefix}{i}"),
            vector: vector(i, 16),
            ..Default::default()
        })
        .collect();
    let t = Instant::now();
    while let Err(e) = g
        .ingest(pb::IngestRequest {
            collection: collection.into(),
            documents: docs.clone(),
            request_id: format!("{collection}-1"),
        })
        .await
    {
        assert!(t.elapsed() < Duration::from_secs(30), "{e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A backup with no index while its primary serves one (here: node b back with an
/// empty volume, its copy refilled from the primary's recent log, which ships no
/// index) fetches the primary's generation instead of answering by exact scan until
/// some later build.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_filled_from_the_log_fetches_its_primarys_index() {
    let mut f = Fixture::start(false).await;
    small_collection(&mut f.admin, "cp", 16, 1, 2).await;
    wait_open(&f.a, "cp", 1).await;
    wait_open(&f.b, "cp", 1).await;
    ingest_until_accepted(&mut f.ga, "cp", "c", 300).await;
    let built =
        f.ga.build_index(pb::BuildIndexRequest {
            collection: "cp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(built.state, "succeeded", "{built:?}");
    let t = Instant::now();
    let want = loop {
        let (ga, gb) = (served(&f.a, "cp"), served(&f.b, "cp"));
        if ga == gb && ga[0].1.is_some() {
            break ga;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "a {ga:?}, b {gb:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Fixture {
        _dir: dir,
        addrs,
        coords,
        a,
        b,
        mut ga,
        ..
    } = f;
    b.shutdown().await;
    // (Retried: a task of the stopped node may still be ending a file write.)
    let t = Instant::now();
    while let Err(e) = std::fs::remove_dir_all(dir.path().join("b")) {
        assert!(t.elapsed() < Duration::from_secs(10), "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = node(dir.path(), "b", &addrs, false).await;
    let t = Instant::now();
    loop {
        let gb = served(&b, "cp");
        if gb == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the refilled copy did not take the primary's index: {gb:?}, primary {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it holds every document.
    let stats = b
        .registry
        .read()
        .iter()
        .find(|(k, _)| k.collection == "cp")
        .map(|(_, h)| h.repl.shard().unwrap().stats())
        .unwrap();
    assert_eq!(stats.live_docs, 300);
    let r = ga
        .search(pb::SearchRequest {
            collection: "cp".into(),
            vector: vector(7, 16),
            k: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits[0].id, "c7");
    a.shutdown().await;
    b.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_takes_its_primarys_index_instead_of_training_its_own() {
    let mut f = Fixture::start(false).await;
    small_collection(&mut f.admin, "rep", 16, 2, 2).await;
    wait_open(&f.a, "rep", 2).await;
    wait_open(&f.b, "rep", 2).await;
    ingest_until_accepted(&mut f.ga, "rep", "r", 400).await;
    let built =
        f.gb.build_index(pb::BuildIndexRequest {
            collection: "rep".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(built.state, "succeeded", "{built:?}");
    // Each shard's two replicas serve one generation: the backup's is the primary's,
    // down to its recorded build time (a backup training its own would differ).
    let t = Instant::now();
    loop {
        let (ga, gb) = (served(&f.a, "rep"), served(&f.b, "rep"));
        if ga == gb && ga.len() == 2 && ga.iter().all(|(_, g)| g.is_some()) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the backups did not take their primaries' generations: a {ga:?}, b {gb:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Searched on either node, through either copy, the index answers.
    for g in [&mut f.ga, &mut f.gb] {
        let r = g
            .search(pb::SearchRequest {
                collection: "rep".into(),
                vector: vector(7, 16),
                k: 5,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.shards.iter().all(|s| s.generation >= 1), "{:?}", r.shards);
        assert_eq!(r.hits[0].id, "r7");
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scrubber_takes_a_replica_with_a_damaged_vector_out_of_service() {
    use std::os::unix::fs::FileExt;
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    // One of node a's replicas: a byte of its first stored vector damaged on disk
    // (open never reads the vectors; the scrubber does).
    let (key, dir) = {
        let reg = f.a.registry.read();
        let (k, h) = reg
            .iter()
            .find(|(k, h)| k.collection == "vecs" && h.repl.shard().is_ok_and(|s| s.rows() > 0))
            .expect("a replica with rows on a");
        (k.clone(), h.repl.shard().unwrap().dir().to_path_buf())
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("vectors.f32"))
        .unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, 2).unwrap();
    file.write_all_at(&[b[0] ^ 0x5a], 2).unwrap();
    let t = Instant::now();
    let why = loop {
        let failure = f.a.registry.read().get(&key).and_then(|h| h.repl.failure());
        if let Some(w) = failure {
            break w;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the scrubber did not find the damaged vector"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        why.contains("vector of row 0") && why.contains("vectors.f32"),
        "{why}"
    );
    // Not served again by a reopen: the replica stays out, its damage named.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = f.a.registry.read().get(&key).and_then(|h| h.repl.failure());
    assert!(still.is_some_and(|w| w.contains("vector of row 0")));
    assert!(dir.join("CORRUPT").exists());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_operation_survives_a_leader_change_and_a_node_restart() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    let Fixture {
        _dir: dir,
        addrs,
        mut coords,
        a,
        b,
        mut admin,
        ..
    } = f;
    // Node b is away when the build is asked for: its shards' steps stay pending.
    b.shutdown().await;
    let op = admin
        .start_index_build(cpb::StartIndexBuildRequest {
            collection: "vecs".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(op.state, "running");
    let on_b = op.steps.iter().filter(|s| s.node == "b").count();
    assert!(on_b > 0, "{op:?}");
    // A second build of the collection is refused while this one runs.
    let e = admin
        .start_index_build(cpb::StartIndexBuildRequest {
            collection: "vecs".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    // The leader goes; node b comes back; the operation, in the map, completes.
    let leader = loop {
        let l = coords[0].coordinator.raft.metrics().borrow().current_leader;
        if let Some(l) = l {
            break (l - 1) as usize;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    coords.remove(leader).shutdown().await;
    let b = node(dir.path(), "b", &addrs, false).await;
    let done = finished_operation(&mut admin, op.id, "the build").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert!(
        done.steps
            .iter()
            .all(|s| s.state == "done" && s.generation >= 1),
        "{done:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

/// Operation `id` on `vecs` once it has ended (within 30 s; answers lost to a leader
/// change are asked again).
async fn finished_operation(admin: &mut Client, id: u64, what: &str) -> cpb::Operation {
    finished_operation_of(admin, "vecs", id, what).await
}

/// [`finished_operation`] on `collection`.
async fn finished_operation_of(
    admin: &mut Client,
    collection: &str,
    id: u64,
    what: &str,
) -> cpb::Operation {
    let t = Instant::now();
    loop {
        let ops = admin
            .list_operations(cpb::ListOperationsRequest {
                collection: collection.into(),
            })
            .await
            .map(|r| r.operations)
            .unwrap_or_default();
        if let Some(o) = ops.into_iter().find(|o| o.id == id && o.state != "running") {
            return o;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rows and live documents of every replica of `collection` on `n`.
fn replica_rows(n: &NodeHandle, collection: &str) -> Vec<(u64, usize)> {
    n.registry
        .read()
        .iter()
        .filter(|(k, _)| k.collection == collection)
        .filter_map(|(_, h)| h.repl.shard().ok())
        .map(|s| (s.rows() as u64, s.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compaction_operation_compacts_every_shard_and_loses_nothing() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    // Half replaced (other vectors), a quarter deleted.
    let replaced: Vec<pb::Document> = (0..150u64)
        .map(|i| pb::Document {
            id: format!("v{i}"),
            text: format!("doc {i} v2"),
            vector: vector(i + 1000, 16),
            ..Default::default()
        })
        .collect();
    f.ga.ingest(pb::IngestRequest {
        collection: "vecs".into(),
        documents: replaced,
        ..Default::default()
    })
    .await
    .unwrap();
    f.gb.delete(pb::DeleteRequest {
        collection: "vecs".into(),
        ids: (150..225).map(|i| format!("v{i}")).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rows = |f: &Fixture| {
        let mut all = replica_rows(&f.a, "vecs");
        all.extend(replica_rows(&f.b, "vecs"));
        all.iter()
            .fold((0, 0), |(r, l), (rows, live)| (r + rows, l + live))
    };
    assert_eq!(rows(&f), (450, 225));

    let op = f
        .admin
        .start_compaction(cpb::StartCompactionRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap();
    assert_eq!((op.kind.as_str(), op.steps.len()), ("compact", 3), "{op:?}");
    let done = finished_operation(&mut f.admin, op.id, "the compaction").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    // Each step names the batch its shard was compacted at.
    assert!(
        done.steps
            .iter()
            .all(|s| s.state == "done" && s.generation > 0),
        "{done:?}"
    );
    assert_eq!(rows(&f), (225, 225));
    for i in 0..300u64 {
        let got =
            f.gb.get(pb::GetRequest {
                collection: "vecs".into(),
                id: format!("v{i}"),
                with_vector: true,
            })
            .await
            .unwrap()
            .into_inner();
        match i {
            0..150 => assert_eq!(got.document.unwrap().vector, vector(i + 1000, 16)),
            150..225 => assert!(!got.found, "v{i} deleted"),
            _ => assert_eq!(got.document.unwrap().vector, vector(i, 16)),
        }
    }
    for i in [3u64, 260] {
        let want = if i < 150 { i + 1000 } else { i };
        let r =
            f.ga.search(pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(want, 16),
                k: 5,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.partial);
        assert!(
            r.hits.iter().any(|h| h.id == format!("v{i}")),
            "{:?}",
            r.hits
        );
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_text_query_is_encoded_once_and_traced_across_the_nodes() {
    // Traces go to a collector in this process; the trace context must cross gRPC.
    // (The only test here that installs the process's subscriber.)
    let (collector, otlp_addr) = start_collector().await;
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let telemetry =
        shoal_node::telemetry::init("shoal-test", Some(&format!("http://{otlp_addr}"))).unwrap();
    let mut f = Fixture::start(true).await;
    let texts = [
        ("t1", "The mitochondria is the powerhouse of the cell."),
        (
            "t2",
            "Stock markets fell sharply after the interest rate decision.",
        ),
        ("t3", "A recipe for sourdough bread with a crisp crust."),
    ];
    f.ga.ingest(pb::IngestRequest {
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
    let r =
        f.ga.search(pb::SearchRequest {
            collection: "texts".into(),
            text: "how do cells make energy?".into(),
            k: 3,
            mode: pb::RetrievalMode::Dense as i32,
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
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_replica_is_reopened_from_disk_with_its_data() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    // A replica actor panics: its supervisor reopens it from disk; data intact.
    let idx = {
        let reg = f.a.registry.read();
        reg.keys().find(|k| k.collection == "vecs").unwrap().index
    };
    assert!(f.a.crash_replica("vecs", idx), "no replica on a");
    let t = Instant::now();
    while f.a.restarts.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let r = loop {
        let r =
            f.gb.search(pb::SearchRequest {
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
        300,
        "documents lost across the replica restart"
    );
    f.stop().await;
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

/// The serving generation's re-ranking precision of every replica of `collection` on
/// `n` (`None` for a replica serving no index).
fn replica_rerank(n: &NodeHandle, collection: &str) -> Vec<Option<shoal_engine::Precision>> {
    n.registry
        .read()
        .iter()
        .filter(|(k, _)| k.collection == collection)
        .filter_map(|(_, h)| h.repl.shard().ok())
        .map(|s| s.stats().serving.map(|g| g.rerank))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_gives_every_replica_its_reduced_precision_rerank_copy() {
    let mut f = Fixture::start(false).await;
    // Two shards, a copy of each on both nodes, re-ranking from fp16 copies.
    f.admin
        .create_collection(cpb::CreateCollectionRequest {
            name: "rr".into(),
            dimension: 16,
            metric: cpb::Metric::InnerProduct as i32,
            shard_count: 2,
            replication_factor: 2,
            index: Some(cpb::IndexParams {
                nlist: 4,
                pq_nbits: 4,
                rerank: cpb::Rerank::Float16 as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // An unknown precision is refused by name.
    let e = f
        .admin
        .create_collection(cpb::CreateCollectionRequest {
            name: "bad".into(),
            dimension: 16,
            index: Some(cpb::IndexParams {
                rerank: 9,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("re-ranking precision 9"),
        "{e}"
    );
    let docs: Vec<pb::Document> = (0..400u64)
        .map(|i| pb::Document {
            id: format!("r{i}"),
            vector: vector(i, 16),
            ..Default::default()
        })
        .collect();
    let t = Instant::now();
    loop {
        let r =
            f.ga.ingest(pb::IngestRequest {
                collection: "rr".into(),
                documents: docs.clone(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => {
                assert_eq!(r.into_inner().ingested, 400);
                break;
            }
            Err(e) => assert!(t.elapsed() < Duration::from_secs(30), "ingest: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let build = |rerank: Option<cpb::Rerank>| cpb::StartIndexBuildRequest {
        collection: "rr".into(),
        rerank: rerank.map_or(0, |r| r as i32),
        ..Default::default()
    };
    let every = |f: &Fixture| {
        let mut all = replica_rerank(&f.a, "rr");
        all.extend(replica_rerank(&f.b, "rr"));
        all
    };
    // The collection's precision, then another chosen by a rebuild, which later
    // builds keep.
    for (ask, want) in [
        (None, shoal_engine::Precision::F16),
        (Some(cpb::Rerank::Sq8), shoal_engine::Precision::Sq8),
        (None, shoal_engine::Precision::Sq8),
    ] {
        let op = f.admin.start_index_build(build(ask)).await.unwrap();
        assert_eq!(op.build.as_ref().map(|b| b.rerank), Some(want.wire()));
        let done = finished_operation_of(&mut f.admin, "rr", op.id, "the build").await;
        assert_eq!(done.state, "succeeded", "{done:?}");
        // The operation ends on the primaries' generations; backups fetch theirs.
        let t = Instant::now();
        while every(&f) != vec![Some(want); 4] {
            assert!(t.elapsed() < Duration::from_secs(30), "{:?}", every(&f));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in [5u64, 77, 391] {
            let r =
                f.gb.search(pb::SearchRequest {
                    collection: "rr".into(),
                    vector: vector(i, 16),
                    k: 3,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!r.partial);
            assert_eq!(r.hits[0].id, format!("r{i}"), "{want:?}: {:?}", r.hits);
        }
    }
    f.stop().await;
}

/// Live documents of `collection` over both nodes' replicas, and each replica's
/// (index, live) for messages.
fn live_docs(nodes: &[&NodeHandle], collection: &str) -> (usize, Vec<(u32, usize, usize)>) {
    let mut per = Vec::new();
    for n in nodes {
        for (k, h) in n.registry.read().iter() {
            if k.collection == collection {
                if let Ok(s) = h.repl.shard() {
                    let foreign = h.repl.routing().map_or(0, |r| s.foreign_live(r));
                    per.push((k.index, s.len(), foreign));
                }
            }
        }
    }
    per.sort();
    (per.iter().map(|p| p.1).sum(), per)
}

/// Writers through both gateways, until `stop`: each writes batches of 5 documents
/// with small vectors (they never enter an original document's top 10) and deletes
/// every fourth batch's first document again; returns (ids acknowledged live, ids
/// acknowledged deleted, when each failed write failed, and why).
#[allow(clippy::type_complexity)]
fn writers(
    f: &Fixture,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(Vec<String>, Vec<String>, Vec<(Instant, String)>)>> {
    (0..n)
        .map(|t| {
            let mut g = if t % 2 == 0 {
                f.ga.clone()
            } else {
                f.gb.clone()
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut live, mut deleted, mut errors) = (Vec::new(), Vec::new(), Vec::new());
                let mut batch = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<String> = (0..5).map(|j| format!("w{t}-{batch}-{j}")).collect();
                    let docs = ids
                        .iter()
                        .enumerate()
                        .map(|(j, id)| pb::Document {
                            id: id.clone(),
                            vector: vector(
                                10_000 + batch * 5 + j as u64 + t as u64 * 1_000_000,
                                16,
                            )
                            .into_iter()
                            .map(|x| x * 0.01)
                            .collect(),
                            ..Default::default()
                        })
                        .collect();
                    match g
                        .ingest(pb::IngestRequest {
                            collection: "vecs".into(),
                            documents: docs,
                            request_id: format!("w{t}-{batch}"),
                        })
                        .await
                    {
                        Ok(_) => live.extend(ids.iter().cloned()),
                        Err(e) => {
                            errors.push((Instant::now(), format!("writer {t}: {e}")));
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            batch += 1;
                            continue; // its outcome is unknown: no delete of it
                        }
                    }
                    if batch % 4 == 3 {
                        let id = ids[0].clone();
                        match g
                            .delete(pb::DeleteRequest {
                                collection: "vecs".into(),
                                ids: vec![id.clone()],
                                request_id: format!("w{t}-{batch}-del"),
                            })
                            .await
                        {
                            Ok(_) => {
                                live.retain(|x| *x != id);
                                deleted.push(id);
                            }
                            Err(e) => {
                                // Its outcome is unknown: neither live nor deleted.
                                live.retain(|x| *x != id);
                                errors.push((Instant::now(), format!("writer {t} delete: {e}")));
                            }
                        }
                    }
                    batch += 1;
                }
                (live, deleted, errors)
            })
        })
        .collect()
}

/// Every acknowledged document of `vecs` found by id, every acknowledged delete not.
async fn check_writes(
    g: &mut ShoalClient<tonic::transport::Channel>,
    live: &[String],
    deleted: &[String],
) {
    for (id, want) in live
        .iter()
        .map(|i| (i, true))
        .chain(deleted.iter().map(|i| (i, false)))
    {
        let got = g
            .get(pb::GetRequest {
                collection: "vecs".into(),
                id: id.clone(),
                with_vector: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.found,
            want,
            "{id}: acknowledged {}",
            if want { "live" } else { "deleted" }
        );
    }
}

/// The exact top 10 of `vecs` for original document `i`'s vector, as ids.
async fn exact_top(g: &mut ShoalClient<tonic::transport::Channel>, i: u64) -> Option<Vec<String>> {
    let r = g
        .search(pb::SearchRequest {
            collection: "vecs".into(),
            vector: vector(i, 16),
            k: 10,
            exact: true,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let ids: Vec<String> = r.hits.into_iter().map(|h| h.id).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "a hit twice: {ids:?}");
    (!r.partial).then_some(ids)
}

/// Waits until `vecs` has `shards` shards in both nodes' maps, one replica each
/// (placement's moves done), none holding a document routed elsewhere (the retains
/// done), and `live` documents in all (a range: a write that failed may have landed
/// on some of its shards).
async fn settled_split(
    nodes: [&NodeHandle; 2],
    shards: u32,
    live: std::ops::RangeInclusive<usize>,
) {
    let t = Instant::now();
    loop {
        let counts = nodes.map(|n| n.view.read().collections.get("vecs").map(|c| c.shard_count));
        let (total, per) = live_docs(&nodes, "vecs");
        if counts == [Some(shards); 2]
            && live.contains(&total)
            && per.len() == shards as usize
            && per.iter().all(|p| p.2 == 0)
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "split not settled: counts {counts:?}, live {total} of {live:?}, replicas (index, live, routed elsewhere) {per:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_under_concurrent_writers_loses_nothing_and_answers_whole() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    let queries: Vec<u64> = (0..300).step_by(37).collect();
    let mut want = Vec::new();
    for &q in &queries {
        want.push(
            exact_top(&mut f.ga, q)
                .await
                .expect("complete before the split"),
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ws = writers(&f, 3, stop.clone());
    // Searches all along: every complete answer is the whole answer.
    let searching =
        {
            let (mut g, stop, queries, want) =
                (f.gb.clone(), stop.clone(), queries.clone(), want.clone());
            let dbg = [
                (f.a.view.clone(), f.a.registry.clone()),
                (f.b.view.clone(), f.b.registry.clone()),
            ];
            tokio::spawn(async move {
                let (mut complete, mut partial) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for (q, w) in queries.iter().zip(&want) {
                        match exact_top(&mut g, *q).await {
                            Some(ids) => {
                                if &ids != w {
                                    for (v, r) in &dbg {
                                        let v = v.read();
                                        eprintln!(
                                            "view {} count {:?}",
                                            v.version,
                                            v.collections.get("vecs").map(|c| c.shard_count)
                                        );
                                        for (k, h) in r.read().iter() {
                                            eprintln!(
                                            "  {k}: routing {:?} engine {:?} live {:?} role {:?}",
                                            h.repl.routing(),
                                            h.repl.shard().ok().and_then(|s| s.routing()),
                                            h.repl.shard().ok().map(|s| s.len()),
                                            h.repl.role().map(|r| (r.epoch, r.is_primary, r.sealed))
                                        );
                                        }
                                    }
                                }
                                assert_eq!(&ids, w, "query {q}: a complete answer differs");
                                complete += 1;
                            }
                            None => partial += 1,
                        }
                    }
                }
                (complete, partial)
            })
        };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let op = f
        .admin
        .start_split(cpb::StartSplitRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap();
    assert_eq!((op.kind.as_str(), op.steps.len()), ("split", 3), "{op:?}");
    // A second split waits for this one.
    let e = f
        .admin
        .start_split(cpb::StartSplitRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let t = Instant::now();
    let done = finished_operation(&mut f.admin, op.id, "the split").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    let ended = Instant::now();
    eprintln!("split took {:.2}s", t.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut live, mut deleted, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for w in ws {
        let (l, d, e) = w.await.unwrap();
        live.extend(l);
        deleted.extend(d);
        errors.extend(e);
    }
    let (complete, partial) = searching.await.unwrap();
    eprintln!(
        "writes: {} live, {} deleted, {} failed; searches: {complete} complete, {partial} partial",
        live.len(),
        deleted.len(),
        errors.len()
    );
    // The gateways ride out the seal and the cut-over. (After it, placement moves
    // new shards to even the nodes out, and a leaving primary refuses writes while
    // its copy takes over, as any move does.)
    let during: Vec<&String> = errors
        .iter()
        .filter(|(t, _)| *t >= started && *t <= ended)
        .map(|(_, e)| e)
        .collect();
    assert!(
        during.is_empty(),
        "writes failed during the split: {during:?}"
    );
    for (_, e) in &errors {
        eprintln!("after: {e}");
    }
    assert!(complete > 0);
    // Every acknowledged write there once, every acknowledged delete gone.
    // A failed write may have landed on some of its shards (at most its 5 documents),
    // a failed delete may have left its document.
    let unknown = errors
        .iter()
        .map(|(_, e)| if e.contains("delete") { 1 } else { 5 })
        .sum::<usize>();
    settled_split(
        [&f.a, &f.b],
        6,
        300 + live.len()..=300 + live.len() + unknown,
    )
    .await;
    check_writes(&mut f.ga, &live, &deleted).await;
    for (q, w) in queries.iter().zip(&want) {
        assert_eq!(exact_top(&mut f.ga, *q).await.as_ref(), Some(w));
    }
    // Each new shard has its source's replica set; writes route by six shards.
    let view = f.a.view.read().clone();
    assert_eq!(view.shards_of("vecs").count(), 6);
    for s in view.shards_of("vecs") {
        assert!(s.sealed_by == 0 && s.forking_from.is_none(), "{s:?}");
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_survives_a_node_restart_and_a_leader_change() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ws = writers(&f, 2, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Fixture {
        _dir: dir,
        addrs,
        mut coords,
        a,
        b,
        mut admin,
        mut ga,
        ..
    } = f;
    // Node b stops: its shards can neither seal nor fork until it is back.
    b.shutdown().await;
    let op = admin
        .start_split(cpb::StartSplitRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The leader goes while the split waits for b.
    let leader = loop {
        let l = coords[0].coordinator.raft.metrics().borrow().current_leader;
        if let Some(l) = l {
            break (l - 1) as usize;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    coords.remove(leader).shutdown().await;
    let still = finished_or_running(&mut admin, op.id).await;
    assert_eq!(still.state, "running", "waits for b: {still:?}");
    // b comes back: it seals, forks, and the new leader cuts over.
    let b = node(dir.path(), "b", &addrs, false).await;
    let done = finished_operation(&mut admin, op.id, "the split").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut live, mut deleted, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for w in ws {
        let (l, d, e) = w.await.unwrap();
        live.extend(l);
        deleted.extend(d);
        errors.extend(e);
    }
    eprintln!(
        "writes: {} live, {} deleted, {} failed (b away)",
        live.len(),
        deleted.len(),
        errors.len()
    );
    let unknown = errors
        .iter()
        .map(|(_, e)| if e.contains("delete") { 1 } else { 5 })
        .sum::<usize>();
    settled_split([&a, &b], 6, 300 + live.len()..=300 + live.len() + unknown).await;
    let originals: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
    let acknowledged: Vec<String> = live.into_iter().chain(originals).collect();
    check_writes(&mut ga, &acknowledged, &deleted).await;
    a.shutdown().await;
    b.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

/// Operation `id` on `vecs` as the map shows it now (answers lost to a leader change
/// asked again).
async fn finished_or_running(admin: &mut Client, id: u64) -> cpb::Operation {
    loop {
        if let Ok(r) = admin
            .list_operations(cpb::ListOperationsRequest {
                collection: "vecs".into(),
            })
            .await
        {
            if let Some(o) = r.operations.into_iter().find(|o| o.id == id) {
                return o;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Backups (issue 20): the repository a test writes to, and restores from.
fn repo_url(dir: &tempfile::TempDir) -> String {
    dir.path().join("repo").display().to_string()
}

/// The top 10 of `collection` for original document `i`'s vector, IVF-PQ and re-ranked
/// (or exact), as (id, score bits) so two answers compare exactly.
async fn top_of(
    g: &mut ShoalClient<tonic::transport::Channel>,
    collection: &str,
    i: u64,
    exact: bool,
) -> Vec<(String, u32)> {
    let r = g
        .search(pb::SearchRequest {
            collection: collection.into(),
            vector: vector(i, 16),
            k: 10,
            exact,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.partial, "{collection}: partial answer {r:?}");
    r.hits
        .into_iter()
        .map(|h| (h.id, h.score.to_bits()))
        .collect()
}

/// Restores backup `backup` from `url` into the cluster `admin` reaches, as `name`,
/// and waits for the operation to end.
async fn restore(admin: &mut Client, url: &str, backup: &str, name: &str) -> cpb::Operation {
    restore_rf(admin, url, backup, name, None).await
}

/// [`restore`] with `rf` replicas a shard (default: the backup's).
async fn restore_rf(
    admin: &mut Client,
    url: &str,
    backup: &str,
    name: &str,
    rf: Option<u32>,
) -> cpb::Operation {
    let repo = shoal_node::backup::Repository::open(url).unwrap();
    let (c, shards) = repo.records(backup, None).await.unwrap();
    let op = admin
        .restore_collection(cpb::RestoreCollectionRequest {
            collection: Some(c.create_request(name, rf)),
            url: url.into(),
            backup: backup.into(),
            epochs: shards.iter().map(|s| s.epoch.max(1)).collect(),
        })
        .await
        .unwrap();
    assert_eq!((op.kind.as_str(), op.steps.len()), ("restore", 3), "{op:?}");
    finished_operation_of(admin, name, op.id, "the restore").await
}

/// Every document of `vecs` in `from` with its exact vector, text and metadata in
/// `name` in `to`, and nothing else there (checked by count).
async fn same_documents(
    from: &mut ShoalClient<tonic::transport::Channel>,
    to: &mut ShoalClient<tonic::transport::Channel>,
    name: &str,
    ids: &[String],
) {
    for id in ids {
        let get = |c: &str| pb::GetRequest {
            collection: c.into(),
            id: id.clone(),
            with_vector: true,
        };
        let a = from.get(get("vecs")).await.unwrap().into_inner();
        let b = to.get(get(name)).await.unwrap().into_inner();
        assert!(a.found && b.found, "{id}: found {} / {}", a.found, b.found);
        let (a, b) = (a.document.unwrap(), b.document.unwrap());
        assert_eq!(
            (
                a.text,
                a.metadata_json,
                a.vector.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            ),
            (
                b.text,
                b.metadata_json,
                b.vector.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            ),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_writes_restores_into_another_cluster_with_the_same_answers() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    // An index generation, so the backup carries one and the restore serves it.
    f.gb.build_index(pb::BuildIndexRequest {
        collection: "vecs".into(),
    })
    .await
    .unwrap();
    let repo_dir = tempfile::tempdir().unwrap();
    let url = repo_url(&repo_dir);
    // Chunks of 16 KiB (16 MiB by default): the test's files span several, so a second
    // backup shares the ones before each file's growing end.
    let settings = shoal_node::backup::Repository::create(&url)
        .unwrap()
        .init(16 << 10)
        .await
        .unwrap();
    assert_eq!(settings.chunk_bytes, 16 << 10);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ws = writers(&f, 2, stop.clone());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let op = f
        .admin
        .start_backup(cpb::StartBackupRequest {
            collection: "vecs".into(),
            url: url.clone(),
            backup: "b1".into(),
        })
        .await
        .unwrap();
    assert_eq!((op.kind.as_str(), op.steps.len()), ("backup", 3), "{op:?}");
    let done = finished_operation(&mut f.admin, op.id, "the backup").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut live = Vec::new();
    for w in ws {
        live.extend(w.await.unwrap().0);
    }
    assert!(!live.is_empty());
    // The same id again is refused by the map while it runs, and by the nodes after.
    let repo = shoal_node::backup::Repository::open(&url).unwrap();
    let list = repo.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].complete, "{list:?}");
    let (_, records) = repo.records("b1", None).await.unwrap();

    // A second cluster takes it.
    let mut g = Fixture::start(false).await;
    let restored = restore(&mut g.admin, &url, "b1", "restored").await;
    assert_eq!(restored.state, "succeeded", "{restored:?}");
    // Each shard holds exactly its recorded position: the documents the backup
    // counted, the originals among them with their exact vectors, text and metadata.
    let t = Instant::now();
    loop {
        let (total, per) = live_docs(&[&g.a, &g.b], "restored");
        let want: Vec<usize> = records.iter().map(|r| r.live_docs as usize).collect();
        if per.iter().map(|p| p.1).collect::<Vec<_>>() == want {
            assert_eq!(
                total as u64,
                records.iter().map(|r| r.live_docs).sum::<u64>()
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "restored {per:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let originals: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
    same_documents(&mut f.ga, &mut g.ga, "restored", &originals).await;
    // The same answers, exact and through the restored index generation.
    for q in (0..300).step_by(29) {
        for exact in [true, false] {
            assert_eq!(
                top_of(&mut f.ga, "vecs", q, exact).await,
                top_of(&mut g.gb, "restored", q, exact).await,
                "query {q} (exact {exact})"
            );
        }
    }
    let served: Vec<u64> =
        g.a.view
            .read()
            .shards_of("restored")
            .map(|s| s.serving_generation)
            .collect();
    let t = Instant::now();
    while g
        .a
        .view
        .read()
        .shards_of("restored")
        .any(|s| s.serving_generation == 0)
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "generations {served:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The restored collection takes writes and serves them.
    g.ga.ingest(pb::IngestRequest {
        collection: "restored".into(),
        documents: vec![pb::Document {
            id: "after".into(),
            vector: vector(99_999, 16),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        g.gb.get(pb::GetRequest {
            collection: "restored".into(),
            id: "after".into(),
            with_vector: false,
        })
        .await
        .unwrap()
        .into_inner()
        .found
    );

    // A second backup after more writes stores only the chunks that changed.
    let before = repo.blobs().await.unwrap();
    f.ingest_vectors(20).await; // v0..v19 again: replaced rows
    let op = f
        .admin
        .start_backup(cpb::StartBackupRequest {
            collection: "vecs".into(),
            url: url.clone(),
            backup: "b2".into(),
        })
        .await
        .unwrap();
    let done = finished_operation(&mut f.admin, op.id, "the second backup").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    let after = repo.blobs().await.unwrap();
    let (_, second) = repo.records("b2", None).await.unwrap();
    let new_bytes: u64 = after
        .iter()
        .filter(|(h, _)| !before.contains_key(*h))
        .map(|(_, n)| n)
        .sum();
    let uploaded: u64 = second.iter().map(|r| r.uploaded_bytes).sum();
    let total: u64 = second.iter().map(|r| r.bytes).sum();
    eprintln!(
        "second backup: {total} bytes, {uploaded} uploaded, {new_bytes} new in the repository"
    );
    assert_eq!(
        uploaded, new_bytes,
        "uploaded is what the repository gained"
    );
    // Segment files only grow: every whole chunk of the first backup's length is
    // shared, not sent again; the generation file is shared whole.
    let mut shared = 0;
    for (r1, r2) in records.iter().zip(&second) {
        for f2 in &r2.files {
            let Some(f1) = r1.files.iter().find(|f| f.name == f2.name) else {
                continue;
            };
            let whole = (f1.len / (16 << 10)) as usize;
            assert_eq!(
                f2.chunks[..whole],
                f1.chunks[..whole],
                "shard {} {}",
                r2.shard,
                f2.name
            );
            assert!(f2.chunks[..whole]
                .iter()
                .all(|c| before.contains_key(&c.sha256)));
            shared += whole;
        }
    }
    assert!(shared > 0, "no chunk shared with the first backup");
    assert!(uploaded < total, "{uploaded} of {total}");
    assert!(repo.verify(None).await.unwrap().problems.is_empty());

    // A corrupted chunk: verify names it, and a restore from it fails naming it.
    let victim = second[1]
        .files
        .iter()
        .find(|f| f.name.starts_with("vectors"))
        .unwrap()
        .chunks[0]
        .sha256
        .clone();
    let path = repo_dir.path().join("repo/blobs").join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let report = repo.verify(Some("b2")).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert!(
        report.problems[0].contains(&victim) && report.problems[0].contains("shard 1"),
        "{report:?}"
    );
    let failed = restore(&mut g.admin, &url, "b2", "broken").await;
    assert_eq!(failed.state, "failed", "{failed:?}");
    assert!(failed.reason.contains(&victim), "{failed:?}");
    // Nothing created empty in its place: shard 1 of `broken` has no replica open.
    assert!(!g
        .a
        .registry
        .read()
        .keys()
        .chain(g.b.registry.read().keys())
        .any(|k| k.collection == "broken" && k.index == 1));

    // Retention: keeping the newest drops b1 and the chunks only it named.
    let pruned = repo.prune(1, Duration::ZERO).await.unwrap();
    assert_eq!(pruned.deleted_backups, vec!["b1".to_string()], "{pruned:?}");
    assert!(pruned.deleted_blobs > 0, "{pruned:?}");
    let left = repo.list().await.unwrap();
    assert_eq!(
        left.iter().map(|b| b.backup.as_str()).collect::<Vec<_>>(),
        ["b2"]
    );
    // b2 still whole (but for the chunk corrupted above).
    assert_eq!(repo.verify(Some("b2")).await.unwrap().problems.len(), 1);
    f.stop().await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_waits_out_a_node_restart_and_a_leader_change() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    let repo_dir = tempfile::tempdir().unwrap();
    let url = repo_url(&repo_dir);
    let Fixture {
        _dir: dir,
        addrs,
        mut coords,
        a,
        b,
        mut admin,
        mut ga,
        ..
    } = f;
    // Node b stops: the shards it leads cannot be stored until it is back.
    b.shutdown().await;
    let op = admin
        .start_backup(cpb::StartBackupRequest {
            collection: "vecs".into(),
            url: url.clone(),
            backup: "b".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = loop {
        let l = coords[0].coordinator.raft.metrics().borrow().current_leader;
        if let Some(l) = l {
            break (l - 1) as usize;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    coords.remove(leader).shutdown().await;
    let still = finished_or_running(&mut admin, op.id).await;
    assert_eq!(still.state, "running", "waits for b: {still:?}");
    assert!(
        still.steps.iter().any(|s| s.state == "done"),
        "a's shards stored meanwhile: {still:?}"
    );
    let b = node(dir.path(), "b", &addrs, false).await;
    let done = finished_operation(&mut admin, op.id, "the backup").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    let repo = shoal_node::backup::Repository::open(&url).unwrap();
    let (_, records) = repo.records("b", None).await.unwrap();
    assert_eq!(records.iter().map(|r| r.live_docs).sum::<u64>(), 300);
    assert!(repo.verify(Some("b")).await.unwrap().problems.is_empty());
    // Restored into the same cluster under another name, with two replicas a shard
    // (the backup's collection had one): each primary restores its shard, and its
    // backup is filled from it, then serves in sync.
    let restored = restore_rf(&mut admin, &url, "b", "copy", Some(2)).await;
    assert_eq!(restored.state, "succeeded", "{restored:?}");
    let originals: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
    let mut ga2 = ga.clone();
    same_documents(&mut ga, &mut ga2, "copy", &originals).await;
    let t = Instant::now();
    loop {
        let (_, per) = live_docs(&[&a, &b], "copy");
        let serving = a.view.read().shards_of("copy").all(|s| {
            s.replicas.len() == 2
                && s.replicas
                    .iter()
                    .all(|r| r.state == cpb::ReplicaState::Serving as i32)
        });
        if serving && per.len() == 6 && per.iter().map(|p| p.1).sum::<usize>() == 600 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "copies not filled: {per:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_group_rebuilt_from_its_map_backup_takes_its_nodes_back() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    let exported = f.admin.export_map(cpb::ExportMapRequest {}).await.unwrap();
    assert!(!exported.cluster_id.is_empty() && !exported.map.is_empty());
    // Writes after the export: the map backup is older than what the nodes saw.
    let op = f
        .admin
        .start_compaction(cpb::StartCompactionRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap();
    finished_operation(&mut f.admin, op.id, "the compaction").await;
    let Fixture {
        _dir: dir,
        addrs,
        coords,
        a,
        b,
        mut ga,
        ..
    } = f;
    // The whole group is lost: every member stopped, its volume gone.
    let peers: Vec<shoal_coordinator::Peer> = coords
        .iter()
        .enumerate()
        .map(|(i, c)| shoal_coordinator::Peer {
            id: i as u64 + 1,
            raft_addr: c.raft_addr.to_string(),
            api_addr: c.api_addr.to_string(),
        })
        .collect();
    for c in coords {
        c.shutdown().await;
    }
    for i in 1..=3 {
        std::fs::remove_dir_all(dir.path().join(format!("c{i}"))).unwrap();
    }
    let mut coords = Vec::new();
    for p in &peers {
        coords.push(
            shoal_coordinator::start(shoal_coordinator::Config {
                id: p.id,
                listen: p.api_addr.clone(),
                raft_listen: p.raft_addr.clone(),
                data_dir: dir.path().join(format!("c{}", p.id)),
                peers: peers.clone(),
                ..shoal_coordinator::testing::member_config()
            })
            .await
            .unwrap(),
        );
    }
    let mut admin = Client::new(addrs.clone());
    // The fresh group names a new cluster: the nodes refuse it and keep their data.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nodes = admin.list_nodes(cpb::ListNodesRequest {}).await.unwrap();
    assert!(nodes.nodes.is_empty(), "{nodes:?}");
    assert_eq!(live_docs(&[&a, &b], "vecs").0, 300);
    // The map backup brings the cluster back.
    let r = admin
        .import_map(cpb::ImportMapRequest {
            map: exported.map.clone(),
            format: exported.format,
        })
        .await
        .unwrap();
    assert_eq!(r.cluster_id, exported.cluster_id);
    assert!(
        r.map_version > exported.map_version + (1 << 32) - 1,
        "{r:?}"
    );
    let t = Instant::now();
    loop {
        let nodes = admin.list_nodes(cpb::ListNodesRequest {}).await.unwrap();
        let up = nodes
            .nodes
            .iter()
            .filter(|n| n.state == cpb::NodeState::Up as i32)
            .count();
        let done = exact_top(&mut ga, 7).await.is_some()
            && ga
                .ingest(pb::IngestRequest {
                    collection: "vecs".into(),
                    documents: vec![pb::Document {
                        id: "after".into(),
                        vector: vector(77_777, 16),
                        ..Default::default()
                    }],
                    request_id: "after-import".into(),
                })
                .await
                .is_ok();
        if up == 2 && done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "nodes not back: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let originals: Vec<String> = (0..300)
        .map(|i| format!("v{i}"))
        .chain(["after".to_string()])
        .collect();
    check_writes(&mut ga, &originals, &[]).await;
    // A group that holds a cluster takes no other map.
    let e = admin
        .import_map(cpb::ImportMapRequest {
            map: exported.map,
            format: exported.format,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    a.shutdown().await;
    b.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_whose_every_copy_is_lost_is_restored_into_its_collection() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    let repo_dir = tempfile::tempdir().unwrap();
    let url = repo_url(&repo_dir);
    let op = f
        .admin
        .start_backup(cpb::StartBackupRequest {
            collection: "vecs".into(),
            url: url.clone(),
            backup: "b".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        finished_operation(&mut f.admin, op.id, "the backup")
            .await
            .state,
        "succeeded"
    );
    // Writes after the backup.
    let late: Vec<String> = (0..60).map(|i| format!("late{i}")).collect();
    f.ga.ingest(pb::IngestRequest {
        collection: "vecs".into(),
        documents: late
            .iter()
            .enumerate()
            .map(|(i, id)| pb::Document {
                id: id.clone(),
                vector: vector(50_000 + i as u64, 16),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let Fixture {
        _dir,
        coords,
        a,
        b,
        mut admin,
        mut ga,
        ..
    } = f;
    // Node b and its volume are gone: the shards it held (RF 1) have no copy left.
    let lost: Vec<u32> = a
        .view
        .read()
        .shards_of("vecs")
        .filter(|s| s.primary == "b")
        .map(|s| s.index)
        .collect();
    assert!(!lost.is_empty());
    b.shutdown().await;
    let t = Instant::now();
    while admin
        .list_nodes(cpb::ListNodesRequest {})
        .await
        .unwrap()
        .nodes
        .iter()
        .any(|n| n.id == "b" && n.state == cpb::NodeState::Up as i32)
    {
        assert!(t.elapsed() < Duration::from_secs(30), "b still up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let repo = shoal_node::backup::Repository::open(&url).unwrap();
    let (_, records) = repo.records("b", Some(&lost)).await.unwrap();
    let request = |accept_data_loss| cpb::RestoreShardsRequest {
        collection: "vecs".into(),
        shards: lost.clone(),
        epochs: records.iter().map(|r| r.epoch).collect(),
        url: url.clone(),
        backup: "b".into(),
        accept_data_loss,
    };
    // Only on the operator's word that the later writes are given up.
    let e = admin.restore_shards(request(false)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let op = admin.restore_shards(request(true)).await.unwrap();
    assert_eq!(op.steps.len(), lost.len(), "{op:?}");
    let done = finished_operation(&mut admin, op.id, "the shard restore").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    // Complete answers again; every document of the backup there, and the later writes
    // on the surviving shard; those on the lost shards gone (the loss accepted).
    let t = Instant::now();
    while exact_top(&mut ga, 3).await.is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "still partial");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let originals: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
    let (kept, given_up): (Vec<String>, Vec<String>) = late
        .into_iter()
        .partition(|id| !lost.contains(&shoal_proto::routing::shard_of(id, 3)));
    assert!(!given_up.is_empty());
    let live: Vec<String> = originals.into_iter().chain(kept).collect();
    check_writes(&mut ga, &live, &given_up).await;
    // Its new primary takes writes.
    ga.ingest(pb::IngestRequest {
        collection: "vecs".into(),
        documents: given_up
            .iter()
            .map(|id| pb::Document {
                id: id.clone(),
                vector: vector(7, 16),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    a.shutdown().await;
    for c in coords {
        c.shutdown().await;
    }
}

/// The rebuild tag of each replica of `collection` on `n` (serving, staged, kept).
fn rebuild_tags(n: &NodeHandle, collection: &str) -> Vec<(u32, u64, u64, bool)> {
    let mut v: Vec<_> = n
        .registry
        .read()
        .iter()
        .filter(|(k, _)| k.collection == collection)
        .filter_map(|(k, h)| {
            let s = h.repl.shard().ok()?.stats();
            Some((
                k.index,
                s.serving.map_or(0, |g| g.tag),
                s.staged.map_or(0, |g| g.tag),
                s.previous.is_some(),
            ))
        })
        .collect();
    v.sort();
    v
}

/// Waits until every replica of `vecs` on both nodes satisfies `ok` (within 60 s).
async fn wait_tags(f: &Fixture, what: &str, ok: impl Fn(&(u32, u64, u64, bool)) -> bool) {
    let t = Instant::now();
    loop {
        let (a, b) = (rebuild_tags(&f.a, "vecs"), rebuild_tags(&f.b, "vecs"));
        if a.len() + b.len() == 4 && a.iter().chain(&b).all(&ok) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: a {a:?} b {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Searches `vecs` for original documents 0..20 through `g`: each answer's hits and
/// the generation each shard answered from.
async fn answers_of(
    g: &mut ShoalClient<tonic::transport::Channel>,
) -> Vec<(Vec<String>, Vec<(u32, u64)>)> {
    let mut out = Vec::new();
    for i in 0..20 {
        let r = g
            .search(pb::SearchRequest {
                collection: "vecs".into(),
                vector: vector(i, 16),
                k: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.partial, "{r:?}");
        let mut gens: Vec<(u32, u64)> = r.shards.iter().map(|s| (s.shard, s.generation)).collect();
        gens.sort();
        out.push((r.hits.into_iter().map(|h| h.id).collect(), gens));
    }
    out
}

/// Closed-loop searches through both nodes until `stop`: (queries, failed, partial).
fn searchers(
    f: &Fixture,
    collection: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>, u64)>> {
    [f.ga.clone(), f.gb.clone()]
        .into_iter()
        .enumerate()
        .map(|(t, mut g)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut n, mut failed, mut partial) = (0u64, Vec::new(), 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = g
                        .search(pb::SearchRequest {
                            collection: collection.into(),
                            vector: vector(n * 2 + t as u64, 16),
                            k: 10,
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(r) if r.get_ref().partial => partial += 1,
                        Ok(_) => {}
                        Err(e) => failed.push(e.to_string()),
                    }
                    n += 1;
                }
                (n, failed, partial)
            })
        })
        .collect()
}

/// `vecs` again as two shards at RF 2 (each node holds every shard: primaries build
/// and gate, backups take the staged generation), `n` documents, one index build.
async fn replicated_vecs(f: &mut Fixture, n: u64) {
    f.admin
        .drop_collection(cpb::DropCollectionRequest {
            name: "vecs".into(),
        })
        .await
        .unwrap();
    small_collection(&mut f.admin, "vecs", 16, 2, 2).await;
    let t = Instant::now();
    while f
        .a
        .view
        .read()
        .collections
        .get("vecs")
        .is_none_or(|c| c.replication_factor != 2)
    {
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_open(&f.a, "vecs", 2).await;
    wait_open(&f.b, "vecs", 2).await;
    ingest_until_accepted(&mut f.ga, "vecs", "v", n).await;
    let op = f
        .admin
        .start_index_build(cpb::StartIndexBuildRequest {
            collection: "vecs".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let done = finished_operation(&mut f.admin, op.id, "the build").await;
    assert_eq!(done.state, "succeeded", "{done:?}");
}

/// Issue 21: a rebuild to new parameters under queries and writes, through a leader
/// change and a node restart while it builds: staged beside the serving generations,
/// gated, switched for the whole collection at once; rolled back to the exact previous
/// answers; a second one committed, after which a rollback is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_switches_under_load_rolls_back_exactly_and_commits() {
    let mut f = Fixture::start(false).await;
    replicated_vecs(&mut f, 2000).await;
    let before = answers_of(&mut f.ga).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers = searchers(&f, "vecs", stop.clone());
    let writes = writers(&f, 2, stop.clone());
    let rebuild = |nlist: u32| cpb::StartRebuildRequest {
        collection: "vecs".into(),
        nlist,
        nprobe: 8,
        margin: Some(0.05),
        ..Default::default()
    };
    // Node b (leading a shard) is away when the rebuild is asked for: that shard's
    // step waits for it, so the leader change and b's return come mid-operation.
    let Fixture {
        _dir,
        addrs,
        mut coords,
        a,
        b,
        mut admin,
        ga,
        ..
    } = f;
    b.shutdown().await;
    let op = admin.start_rebuild(rebuild(16)).await.unwrap();
    assert_eq!(op.rebuild.as_ref().unwrap().phase, "building");
    // A build of the collection waits for it.
    let e = admin
        .start_index_build(cpb::StartIndexBuildRequest {
            collection: "vecs".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let leader = loop {
        let l = coords[0].coordinator.raft.metrics().borrow().current_leader;
        if let Some(l) = l {
            break (l - 1) as usize;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    coords.remove(leader).shutdown().await;
    let o = finished_or_running(&mut admin, op.id).await;
    assert_eq!(o.rebuild.as_ref().unwrap().phase, "building", "{o:?}");
    assert!(o.steps.iter().any(|s| s.state != "staged"), "{o:?}");
    let b = node(_dir.path(), "b", &addrs, false).await;
    let gb = ShoalClient::connect(format!("http://{}", b.public_addr))
        .await
        .unwrap();
    let mut f = Fixture {
        _dir,
        addrs,
        coords,
        a,
        b,
        admin,
        ga,
        gb,
    };
    // Queries from here on (node b back, its map and replicas open), across the
    // switch: every one whole.
    wait_open(&f.b, "vecs", 2).await;
    let switch_readers = searchers(&f, "vecs", stop.clone());
    // Every replica switches to the rebuild's generation, the previous one kept.
    wait_tags(&f, "switched", |&(_, serving, staged, kept)| {
        serving == op.id && staged == 0 && kept
    })
    .await;
    let ops = f
        .admin
        .list_operations(cpb::ListOperationsRequest {
            collection: "vecs".into(),
        })
        .await
        .unwrap();
    let o = ops.operations.iter().find(|o| o.id == op.id).unwrap();
    assert_eq!(o.rebuild.as_ref().unwrap().phase, "switched", "{o:?}");
    assert!(
        o.steps
            .iter()
            .all(|s| s.state == "staged" && s.gate.contains("recall@10")),
        "{o:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut live, mut deleted) = (Vec::new(), Vec::new());
    for w in writes {
        let (l, d, errors) = w.await.unwrap();
        // Writes during the restart may fail (UNAVAILABLE); acknowledged ones count.
        let _ = errors;
        live.extend(l);
        deleted.extend(d);
    }
    for r in readers {
        // Across node b's restart: queries through it fail while it is away.
        assert!(r.await.unwrap().0 > 0);
    }
    for r in switch_readers {
        let (n, failed, partial) = r.await.unwrap();
        assert!(n > 0);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(partial, 0);
    }
    check_writes(&mut f.ga, &live, &deleted).await;
    let collection = f
        .admin
        .describe_collection(cpb::DescribeCollectionRequest {
            name: "vecs".into(),
        })
        .await
        .unwrap()
        .collection
        .unwrap();
    assert_eq!(collection.index.unwrap().nlist, 16);
    assert_eq!(collection.index.unwrap().nprobe, 8);
    // Writes stopped: the answers now, then after a rollback exactly those before
    // the rebuild's switch save the documents written since (fresh in both).
    let switched = answers_of(&mut f.ga).await;
    f.admin
        .rollback_rebuild(cpb::EndRebuildRequest {
            collection: "vecs".into(),
            operation: 0,
        })
        .await
        .unwrap();
    wait_tags(&f, "rolled back", |&(_, serving, staged, kept)| {
        serving != op.id && staged == 0 && !kept
    })
    .await;
    let back = answers_of(&mut f.ga).await;
    for (b, s) in back.iter().zip(&switched) {
        assert_ne!(b.1, s.1, "the previous generations answer again");
    }
    for (b, o) in back.iter().zip(&before) {
        assert_eq!(b.1, o.1, "the generations that answered before the rebuild");
        // The writers' documents are small vectors: never in an original's top 10.
        assert_eq!(b.0, o.0, "the exact previous answers");
    }
    let collection = f
        .admin
        .describe_collection(cpb::DescribeCollectionRequest {
            name: "vecs".into(),
        })
        .await
        .unwrap()
        .collection
        .unwrap();
    assert_eq!(
        collection.index.unwrap().nlist,
        4,
        "previous parameters back"
    );
    // Another, committed: the previous generations deleted, a rollback refused.
    let op = f.admin.start_rebuild(rebuild(32)).await.unwrap();
    wait_tags(&f, "switched again", |&(_, serving, _, kept)| {
        serving == op.id && kept
    })
    .await;
    f.admin
        .commit_rebuild(cpb::EndRebuildRequest {
            collection: "vecs".into(),
            operation: 0,
        })
        .await
        .unwrap();
    wait_tags(&f, "committed", |&(_, serving, _, kept)| {
        serving == op.id && !kept
    })
    .await;
    let e = f
        .admin
        .rollback_rebuild(cpb::EndRebuildRequest {
            collection: "vecs".into(),
            operation: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("committed"), "{e}");
    f.stop().await;
}

/// Issue 21: a generation that builds fine but answers badly (PQ with 2 sub-quantizers
/// of 2 bits, one list probed, no re-ranking depth) is refused by the gate, shard by
/// shard, and the serving generations stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gate_refuses_a_generation_that_answers_badly_and_the_serving_one_stays() {
    let mut f = Fixture::start(false).await;
    replicated_vecs(&mut f, 2000).await;
    let before = answers_of(&mut f.ga).await;
    let op = f
        .admin
        .start_rebuild(cpb::StartRebuildRequest {
            collection: "vecs".into(),
            nlist: 64,
            pq_m: 2,
            pq_nbits: 2,
            nprobe: 1,
            refine: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let done = finished_operation(&mut f.admin, op.id, "the rebuild").await;
    assert_eq!(done.state, "failed", "{done:?}");
    assert!(done.reason.contains("the gate refused"), "{}", done.reason);
    assert!(
        done.reason.contains("shard 0") && done.reason.contains("shard 1"),
        "{}",
        done.reason
    );
    // Nothing of it stays; the same generations answer as before.
    wait_tags(&f, "dropped", |&(_, serving, staged, kept)| {
        serving != op.id && staged == 0 && !kept
    })
    .await;
    assert_eq!(answers_of(&mut f.ga).await, before);
    f.stop().await;
}

/// Issue 21: an alias switched between two collections under a query load: every query
/// through it answers whole, from one collection or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alias_switched_under_load_answers_every_query() {
    let mut f = Fixture::start(false).await;
    f.ingest_vectors(300).await;
    small_collection(&mut f.admin, "vecs2", 16, 2, 1).await;
    let t = Instant::now();
    while f.a.view.read().shards_of("vecs2").count() < 2
        || f.b.view.read().shards_of("vecs2").count() < 2
    {
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ingest_until_accepted(&mut f.ga, "vecs2", "x", 100).await;
    let set = |c: &str| cpb::SetAliasRequest {
        alias: "live".into(),
        collection: c.into(),
    };
    f.admin.set_alias(set("vecs")).await.unwrap();
    let t = Instant::now();
    while !f.b.view.read().aliases.contains_key("live")
        || !f.a.view.read().aliases.contains_key("live")
    {
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers = searchers(&f, "live", stop.clone());
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        f.admin
            .set_alias(set(if i % 2 == 0 { "vecs2" } else { "vecs" }))
            .await
            .unwrap();
    }
    // A write through the alias lands in the collection it names now (vecs).
    f.ga.ingest(pb::IngestRequest {
        collection: "live".into(),
        documents: vec![pb::Document {
            id: "through-alias".into(),
            vector: vector(1, 16),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let (n, failed, partial) = r.await.unwrap();
        assert!(n > 10, "{n}");
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(partial, 0);
    }
    let got =
        f.ga.get(pb::GetRequest {
            collection: "vecs".into(),
            id: "through-alias".into(),
            with_vector: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found, "the alias named vecs last");
    // An alias cannot hide a collection; dropping a collection drops its aliases.
    let e = f
        .admin
        .set_alias(cpb::SetAliasRequest {
            alias: "vecs2".into(),
            collection: "vecs".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    f.admin
        .drop_collection(cpb::DropCollectionRequest {
            name: "vecs".into(),
        })
        .await
        .unwrap();
    let aliases = f
        .admin
        .list_aliases(cpb::ListAliasesRequest {})
        .await
        .unwrap();
    assert!(aliases.aliases.is_empty(), "{aliases:?}");
    f.stop().await;
}

/// Issue 21: a collection names its model by content hash. A node encodes a
/// collection's text only with exactly that model: one holding several (`--model-dir`
/// and `--extra-model-dir`) picks the one the collection names; a model of the same
/// dimension and other bytes is refused, naming the hash wanted and what the node holds
/// where.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_encodes_each_collection_with_the_model_it_names_and_refuses_another() {
    let mut f = Fixture::start(true).await;
    // A second model dir: the same weights with another README, so another hash.
    let other = f._dir.path().join("other-model");
    let copy = std::process::Command::new("cp")
        .args(["-r"])
        .arg(model_dir())
        .arg(&other)
        .status()
        .unwrap();
    assert!(copy.success());
    std::fs::write(other.join("README.md"), "another model").unwrap();
    let ours = shoal_node::model::content_hash(&model_dir()).unwrap();
    let theirs = shoal_node::model::content_hash(&other).unwrap();
    assert_ne!(ours, theirs);
    // Node m holds both; node a (the fixture's) only the first.
    let m = cluster::start(NodeConfig {
        id: "m".into(),
        listen: format!("127.0.0.1:{}", free_port()),
        internal_listen: format!("127.0.0.1:{}", free_port()),
        coordinators: f.addrs.clone(),
        data_dir: f._dir.path().join("m"),
        model_dir: Some(model_dir()),
        extra_model_dirs: vec![other.clone()],
        heartbeat: Duration::from_millis(200),
        ..NodeConfig::default()
    })
    .await
    .expect("node m starts");
    let mut gm = ShoalClient::connect(format!("http://{}", m.public_addr))
        .await
        .unwrap();
    for (name, hash) in [
        ("unknown-model", "sha256:00ff"),
        ("first-model", ours.as_str()),
        ("second-model", theirs.as_str()),
    ] {
        f.admin
            .create_collection(cpb::CreateCollectionRequest {
                name: name.into(),
                dimension: 384,
                metric: cpb::Metric::InnerProduct as i32,
                encoder: Some(cpb::EncoderRef {
                    model_id: "all-MiniLM-L6-v2".into(),
                    content_hash: hash.into(),
                }),
                shard_count: 1,
                replication_factor: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let search = |name: &str| pb::SearchRequest {
        collection: name.into(),
        text: "a query".into(),
        k: 3,
        mode: pb::RetrievalMode::Dense as i32,
        ..Default::default()
    };
    let refused = |g: &mut ShoalClient<tonic::transport::Channel>, name: &'static str| {
        let mut g = g.clone();
        async move {
            let t = Instant::now();
            loop {
                match g.search(search(name)).await {
                    Err(e) if e.code() == tonic::Code::FailedPrecondition => return e,
                    r => {
                        assert!(t.elapsed() < Duration::from_secs(20), "{r:?}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    let e = refused(&mut gm, "unknown-model").await;
    for part in [
        "sha256:00ff",
        ours.as_str(),
        theirs.as_str(),
        "all-MiniLM-L6-v2",
    ] {
        assert!(e.message().contains(part), "{part}: {e}");
    }
    assert!(e.message().contains(&*other.to_string_lossy()), "{e}");
    // Node a holds only the first model: the second's collection is refused there.
    let e = refused(&mut f.ga, "second-model").await;
    assert!(
        e.message().contains(&theirs) && e.message().contains(&ours),
        "{e}"
    );
    let e =
        f.ga.ingest(pb::IngestRequest {
            collection: "second-model".into(),
            documents: vec![pb::Document {
                id: "d".into(),
                text: "some text".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    // Node m encodes each of the two with its own model.
    for name in ["first-model", "second-model"] {
        let t = Instant::now();
        while let Err(e) = gm.search(search(name)).await {
            assert!(t.elapsed() < Duration::from_secs(20), "{name}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    m.shutdown().await;
    f.stop().await;
}

/// A second real model for re-embedding (issue 21): the fixture's MiniLM weights with
/// CLS pooling instead of mean pooling: other vectors, another content hash, the same
/// cost (MPNet, the benchmark's, is 8x MiniLM's: kept out of CI).
fn cls_model(dir: &std::path::Path) -> PathBuf {
    let cls = dir.join("minilm-cls");
    let copy = std::process::Command::new("cp")
        .arg("-r")
        .arg(model_dir())
        .arg(&cls)
        .status()
        .unwrap();
    assert!(copy.success());
    std::fs::write(
        cls.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    cls
}

fn sentence(i: u64) -> String {
    const WORDS: &[&str] = &[
        "protein",
        "folding",
        "river",
        "delta",
        "sediment",
        "neural",
        "network",
        "vaccine",
        "trial",
        "galaxy",
        "cluster",
        "enzyme",
        "kinetics",
        "glacier",
        "melt",
        "market",
        "volatility",
        "soil",
        "nitrogen",
        "compiler",
        "cache",
        "orbit",
        "comet",
        "coral",
    ];
    let w = |k: u64| WORDS[((i * 7 + k * 13) ^ (i >> 2)) as usize % WORDS.len()];
    format!("{} {} and {} {} in study {i}", w(0), w(1), w(2), w(3))
}

/// Searches `docs` by text through `g`: (hit ids, scores) of each of 12 queries.
async fn text_answers(
    g: &mut ShoalClient<tonic::transport::Channel>,
) -> Vec<(Vec<String>, Vec<f32>)> {
    let mut out = Vec::new();
    for i in 0..12 {
        let r = g
            .search(pb::SearchRequest {
                collection: "docs".into(),
                text: sentence(i * 17),
                k: 5,
                exact: true,
                mode: pb::RetrievalMode::Dense as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.partial, "{r:?}");
        out.push((
            r.hits.iter().map(|h| h.id.clone()).collect(),
            r.hits.iter().map(|h| h.score).collect(),
        ));
    }
    out
}

/// Every answer's scores are `model`'s: the query's and each hit's stored text encoded
/// by it, in this process, give the score the cluster returned.
fn scored_by(
    model: &shoal_encoder::Encoder<shoal_encoder::CpuBackend>,
    answers: &[(Vec<String>, Vec<f32>)],
    texts: &std::collections::HashMap<String, String>,
) {
    for (i, (ids, scores)) in answers.iter().enumerate() {
        let q = sentence(i as u64 * 17);
        let mut all = vec![q.as_str()];
        all.extend(ids.iter().map(|id| texts[id].as_str()));
        let v = model.encode(&all).unwrap().vectors;
        for (j, s) in scores.iter().enumerate() {
            let dot: f32 = v[0].iter().zip(&v[j + 1]).map(|(a, b)| a * b).sum();
            assert!(
                (dot - s).abs() < 2e-3,
                "query {i} hit {}: score {s}, this model's {dot}",
                ids[j]
            );
        }
    }
}

/// Issue 21, re-embedding: every document encoded again by another model while the
/// collection takes text queries and writes, through a coordinator leader's failover
/// and a node's restart; the whole collection switches to the new model at once (every
/// answer's scores are one model's, before and after); a rollback goes back to the
/// old model's answers exactly; a second re-embed is committed (the stored vectors are
/// the new model's) and cannot be rolled back. A model no node holds, and documents
/// stored without text, are refused with the reason, nothing switched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_re_embed_under_load_switches_models_rolls_back_exactly_and_commits() {
    let models_dir = tempfile::tempdir().unwrap();
    let cls = cls_model(models_dir.path());
    let mean_hash = shoal_node::model::content_hash(&model_dir()).unwrap();
    let cls_hash = shoal_node::model::content_hash(&cls).unwrap();
    let mean_model = shoal_encoder::load_cpu(&model_dir()).unwrap();
    let cls_model_enc = shoal_encoder::load_cpu(&cls).unwrap();
    let f = Fixture::start_with(false, Some(cls.clone())).await;
    let Fixture {
        _dir,
        addrs,
        mut coords,
        a,
        b,
        mut admin,
        mut ga,
        gb,
    } = f;
    for (name, rf) in [("docs", 2), ("bare", 1)] {
        admin
            .create_collection(cpb::CreateCollectionRequest {
                name: name.into(),
                dimension: 384,
                metric: cpb::Metric::InnerProduct as i32,
                encoder: Some(cpb::EncoderRef {
                    model_id: "all-MiniLM-L6-v2".into(),
                    content_hash: mean_hash.clone(),
                }),
                shard_count: 2,
                replication_factor: rf,
                index: Some(cpb::IndexParams {
                    nlist: 4,
                    pq_m: 8,
                    pq_nbits: 4,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    wait_open(&a, "docs", 2).await;
    wait_open(&b, "docs", 2).await;
    let mut texts = std::collections::HashMap::new();
    for chunk in (0..240u64).collect::<Vec<_>>().chunks(40) {
        let docs: Vec<pb::Document> = chunk
            .iter()
            .map(|&i| {
                texts.insert(format!("d{i}"), sentence(i));
                pb::Document {
                    id: format!("d{i}"),
                    text: sentence(i),
                    ..Default::default()
                }
            })
            .collect();
        ga.ingest(pb::IngestRequest {
            collection: "docs".into(),
            documents: docs,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Refused, nothing begun: a model no node holds; a document stored without text.
    let reembed = |collection: &str, hash: &str| cpb::StartRebuildRequest {
        collection: collection.into(),
        nlist: 4,
        nprobe: 4,
        margin: Some(0.3),
        encoder: Some(cpb::EncoderRef {
            model_id: "minilm-cls".into(),
            content_hash: hash.into(),
        }),
        dimension: 384,
        ..Default::default()
    };
    let ended = |admin: &mut Client, collection: &'static str, id: u64| {
        let mut admin = admin.clone();
        async move {
            let t = Instant::now();
            loop {
                let r = admin
                    .list_operations(cpb::ListOperationsRequest {
                        collection: collection.into(),
                    })
                    .await;
                if let Some(o) = r
                    .ok()
                    .and_then(|r| r.operations.into_iter().find(|o| o.id == id))
                {
                    if o.state != "running" {
                        return o;
                    }
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "operation {id} did not end"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let op = admin
        .start_rebuild(reembed("docs", "sha256:00ff"))
        .await
        .unwrap();
    let o = ended(&mut admin, "docs", op.id).await;
    assert_eq!(o.state, "failed", "{o:?}");
    let why = format!("{o:?}");
    assert!(
        why.contains("sha256:00ff") && why.contains(&mean_hash),
        "{why}"
    );
    ga.ingest(pb::IngestRequest {
        collection: "bare".into(),
        documents: vec![
            pb::Document {
                id: "t".into(),
                text: "with text".into(),
                ..Default::default()
            },
            pb::Document {
                id: "v".into(),
                vector: mean_model.encode(&["no text"]).unwrap().vectors.remove(0),
                ..Default::default()
            },
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let op = admin
        .start_rebuild(reembed("bare", &cls_hash))
        .await
        .unwrap();
    let o = ended(&mut admin, "bare", op.id).await;
    assert_eq!(o.state, "failed", "{o:?}");
    assert!(format!("{o:?}").contains("without text"), "{o:?}");

    let before = text_answers(&mut ga).await;
    scored_by(&mean_model, &before, &texts);
    // Writers: text documents through both nodes, and deletes, all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // (acknowledged writes, acknowledged deletes, every write tried: an unanswered
    // one may have landed, and its text scores it).
    type Written = (Vec<(String, String)>, Vec<String>, Vec<(String, String)>);
    let written = std::sync::Arc::new(parking_lot::Mutex::new(Written::default()));
    let mut writers = Vec::new();
    for (t, g) in [ga.clone(), gb.clone()].into_iter().enumerate() {
        let (stop, written) = (stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut g = g;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("w{t}-{n}");
                let text = sentence(1000 + n * 2 + t as u64);
                written.lock().2.push((id.clone(), text.clone()));
                let r = g
                    .ingest(pb::IngestRequest {
                        collection: "docs".into(),
                        documents: vec![pb::Document {
                            id: id.clone(),
                            text: text.clone(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .await;
                if r.is_ok() {
                    written.lock().0.push((id, text));
                }
                if n % 5 == 4 {
                    let gone = format!("d{}", (n / 5) * 3 + t as u64 * 100);
                    if g.delete(pb::DeleteRequest {
                        collection: "docs".into(),
                        ids: vec![gone.clone()],
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                    {
                        written.lock().1.push(gone);
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // The re-embed; node b away meanwhile and the coordinators' leader stopped.
    let op = admin
        .start_rebuild(reembed("docs", &cls_hash))
        .await
        .unwrap();
    assert!(op.rebuild.as_ref().unwrap().model.is_some(), "{op:?}");
    b.shutdown().await;
    let leader = loop {
        let l = coords[0].coordinator.raft.metrics().borrow().current_leader;
        if let Some(l) = l {
            break (l - 1) as usize;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    coords.remove(leader).shutdown().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = node_models(_dir.path(), "b", &addrs, vec![model_dir(), cls.clone()]).await;
    let gb = ShoalClient::connect(format!("http://{}", b.public_addr))
        .await
        .unwrap();
    wait_open(&b, "docs", 2).await;
    // From here on (b back), queries through both nodes across the switch: every one
    // whole and encoded by one model.
    let readers: Vec<_> = [ga.clone(), gb.clone()]
        .into_iter()
        .map(|mut g| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut n, mut failed, mut partial) = (0u64, Vec::new(), 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match g
                        .search(pb::SearchRequest {
                            collection: "docs".into(),
                            text: sentence(n % 97),
                            k: 5,
                            mode: pb::RetrievalMode::Dense as i32,
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) if r.get_ref().partial => partial += 1,
                        Ok(_) => {}
                        Err(e) => failed.push(e.to_string()),
                    }
                    n += 1;
                }
                (n, failed, partial)
            })
        })
        .collect();
    let switched = |admin: &mut Client, id: u64| {
        let mut admin = admin.clone();
        async move {
            let t = Instant::now();
            loop {
                let r = admin
                    .list_operations(cpb::ListOperationsRequest {
                        collection: "docs".into(),
                    })
                    .await;
                if let Some(o) = r
                    .ok()
                    .and_then(|r| r.operations.into_iter().find(|o| o.id == id))
                {
                    assert_eq!(o.state, "running", "{o:?}");
                    if o.rebuild.as_ref().unwrap().phase == "switched" {
                        return o;
                    }
                }
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "re-embed {id} did not switch"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let o = switched(&mut admin, op.id).await;
    assert!(
        o.steps.iter().all(|s| s.gate.contains("recall@10")),
        "{o:?}"
    );
    // Writes go on past the switch, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    for r in readers {
        let (n, failed, partial) = r.await.unwrap();
        assert!(n > 0);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(partial, 0);
    }
    let (live, deleted, tried) = written.lock().clone();
    for (id, text) in &tried {
        texts.insert(id.clone(), text.clone());
    }
    for id in &deleted {
        texts.remove(id);
    }
    let coll = admin
        .describe_collection(cpb::DescribeCollectionRequest {
            name: "docs".into(),
        })
        .await
        .unwrap()
        .collection
        .unwrap();
    assert_eq!(coll.encoder.unwrap().content_hash, cls_hash);
    // Switched: the new model's answers, over every document (re-encoded or written
    // during the operation, none deleted).
    let new = text_answers(&mut ga).await;
    scored_by(&cls_model_enc, &new, &texts);
    for (ids, _) in &new {
        assert!(ids.iter().all(|id| !deleted.contains(id)), "{ids:?}");
    }
    assert_eq!(
        text_answers(&mut gb.clone()).await,
        new,
        "both gateways alike"
    );
    // Rolled back: the old model's exact answers (the writers' documents aside).
    admin
        .rollback_rebuild(cpb::EndRebuildRequest {
            collection: "docs".into(),
            operation: 0,
        })
        .await
        .unwrap();
    let t = Instant::now();
    let back = loop {
        let r = text_answers(&mut ga).await;
        if r.iter().zip(&new).all(|(x, y)| x != y) || t.elapsed() > Duration::from_secs(20) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    scored_by(&mean_model, &back, &texts);
    // Every replica dropped its set.
    let t = Instant::now();
    while [&a, &b].iter().any(|n| {
        n.registry
            .read()
            .values()
            .filter_map(|h| h.repl.shard().ok())
            .any(|s| s.vector_set().is_some())
    }) {
        assert!(t.elapsed() < Duration::from_secs(20), "sets not dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another re-embed, committed: the stored vectors are the new model's.
    let op = admin
        .start_rebuild(reembed("docs", &cls_hash))
        .await
        .unwrap();
    switched(&mut admin, op.id).await;
    admin
        .commit_rebuild(cpb::EndRebuildRequest {
            collection: "docs".into(),
            operation: 0,
        })
        .await
        .unwrap();
    let e = admin
        .rollback_rebuild(cpb::EndRebuildRequest {
            collection: "docs".into(),
            operation: op.id,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let t = Instant::now();
    loop {
        let committed = [&a, &b].iter().all(|n| {
            n.registry
                .read()
                .iter()
                .filter(|(k, _)| k.collection == "docs")
                .filter_map(|(_, h)| h.repl.shard().ok())
                .all(|s| s.vector_set().is_none() && s.model() == cls_hash)
        });
        if committed {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not committed on every replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (id, text) = live.first().cloned().unwrap_or(("d1".into(), sentence(1)));
    let got = ga
        .get(pb::GetRequest {
            collection: "docs".into(),
            id: id.clone(),
            with_vector: true,
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    let want = cls_model_enc
        .encode(&[text.as_str()])
        .unwrap()
        .vectors
        .remove(0);
    let diff: f32 = got
        .vector
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        diff < 1e-3,
        "{id}'s stored vector is the new model's (max diff {diff})"
    );
    // Writes after the commit: one model again.
    ga.ingest(pb::IngestRequest {
        collection: "docs".into(),
        documents: vec![pb::Document {
            id: "after".into(),
            text: sentence(5000),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    texts.insert("after".into(), sentence(5000));
    scored_by(&cls_model_enc, &text_answers(&mut ga).await, &texts);
    for (id, want) in live
        .iter()
        .map(|(i, _)| (i, true))
        .chain(deleted.iter().map(|i| (i, false)))
    {
        let got = ga
            .get(pb::GetRequest {
                collection: "docs".into(),
                id: id.clone(),
                with_vector: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.found, want, "{id}");
    }
}

/// One HTTP/1.1 exchange over a fresh connection: the status and the JSON body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: shoal\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A server may answer (413) before it reads a long body: the rest may not be taken.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let (headers, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Chunked (no Content-Length): the chunk sizes are lines of hex around the JSON.
    let payload = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload
            .split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, p)| p)
            .collect::<String>()
    } else {
        payload.to_string()
    };
    let json = serde_json::from_str(&payload)
        .unwrap_or_else(|e| panic!("{method} {path}: {status}, body not JSON ({e}): {payload:?}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_json_api_answers_every_route_over_the_grpc_service() {
    let f = Fixture::start(false).await;
    let addr = f.b.public_addr;
    let v = |i: u64| serde_json::json!(vector(i, 16));
    let post = |path: String, body: serde_json::Value| async move {
        http(addr, "POST", &path, body.to_string().as_bytes()).await
    };
    let c = |op: &str| format!("/v1/collections/vecs/{op}");
    // Every route of the table answers (the document lists exactly these).
    let (s, doc) = http(addr, "GET", shoal_node::cluster::http::OPENAPI_PATH, b"").await;
    assert_eq!(s, 200);
    let paths = doc["paths"].as_object().unwrap();
    let routes = shoal_node::cluster::http::ROUTES;
    assert_eq!(
        paths.len(),
        routes.len() + shoal_web::admin::ADMIN_ROUTES.len()
    );
    let docs: Vec<serde_json::Value> = (0..40)
        .map(|i| serde_json::json!({"id": format!("h{i}"), "vector": v(i), "metadataJson": format!("{{\"i\": {i}}}")}))
        .collect();
    let (s, r) = post(
        c("ingest"),
        serde_json::json!({"documents": docs, "requestId": "http-1"}),
    )
    .await;
    assert_eq!((s, &r["ingested"]), (200, &serde_json::json!("40")), "{r}");
    let (s, r) = post(
        c("search"),
        serde_json::json!({"vector": v(7), "k": 3, "exact": true, "withPayload": true}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["hits"][0]["id"], "h7");
    let meta: serde_json::Value =
        serde_json::from_str(r["hits"][0]["metadataJson"].as_str().unwrap()).unwrap();
    assert_eq!(meta, serde_json::json!({"i": 7}));
    assert_eq!(
        r["partial"],
        serde_json::Value::Null,
        "false is left out: {r}"
    );
    let (s, r) = post(
        c("get"),
        serde_json::json!({"id": "h3", "withVector": true}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        (
            r["found"].as_bool(),
            r["document"]["vector"].as_array().map(Vec::len)
        ),
        (Some(true), Some(16))
    );
    let (s, r) = post(c("count"), serde_json::json!({})).await;
    assert_eq!((s, &r["count"]), (200, &serde_json::json!("40")), "{r}");
    let (s, r) = post(c("scroll"), serde_json::json!({"limit": 5})).await;
    assert_eq!(s, 200);
    assert_eq!(r["documents"].as_array().unwrap().len(), 5);
    assert!(r["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    let (s, r) = post(
        c("set-payload"),
        serde_json::json!({"id": "h3", "metadataJson": "{\"tag\": \"x\"}", "merge": true}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = post(
        "/v1/search-batch".into(),
        serde_json::json!({"searches": [
            {"collection": "vecs", "vector": v(1), "k": 1, "exact": true},
            {"collection": "vecs", "vector": v(2), "k": 1, "exact": true}]}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (
            r["results"][0]["hits"][0]["id"].as_str(),
            r["results"][1]["hits"][0]["id"].as_str()
        ),
        (Some("h1"), Some("h2"))
    );
    let (s, r) = post(
        c("delete"),
        serde_json::json!({"ids": ["h1", "h2", "nope"]}),
    )
    .await;
    assert_eq!((s, &r["deleted"]), (200, &serde_json::json!("2")), "{r}");
    // The service's own refusals, as JSON with the code's name and the gRPC-gateway status.
    let (s, r) = post(c("delete-by-filter"), serde_json::json!({})).await;
    assert_eq!(
        (s, r["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{r}"
    );
    assert!(
        r["message"].as_str().unwrap().contains("needs a filter"),
        "{r}"
    );
    let (s, r) = post(
        "/v1/collections/absent/build-index".into(),
        serde_json::json!({}),
    )
    .await;
    assert_eq!((s, r["code"].as_str()), (404, Some("NOT_FOUND")), "{r}");
    let (s, r) = post(c("search"), serde_json::json!({"vector": v(1), "k": 0})).await;
    assert_eq!(
        (s, r["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{r}"
    );
    assert!(r["message"].as_str().unwrap().contains("k = 0"), "{r}");
    let (s, r) = post(
        c("search"),
        serde_json::json!({"collection": "other", "vector": v(1), "k": 1}),
    )
    .await;
    assert_eq!(s, 400, "{r}");
    assert!(r["message"].as_str().unwrap().contains("\"other\""), "{r}");
    // Bad JSON, wrong types, an unknown enum: the body named, nothing done.
    let (s, r) = http(addr, "POST", &c("search"), b"{\"k\": ").await;
    assert_eq!(
        (s, r["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{r}"
    );
    assert!(
        r["message"].as_str().unwrap().contains("SearchRequest"),
        "{r}"
    );
    let (s, r) = post(c("search"), serde_json::json!({"k": "ten"})).await;
    assert_eq!(s, 400, "{r}");
    let (s, r) = post(
        c("search"),
        serde_json::json!({"vector": v(1), "mode": "RETRIEVAL_MODE_SIDEWAYS"}),
    )
    .await;
    assert_eq!(s, 400, "{r}");
    let (s, r) = post(c("ingest"), serde_json::json!({"documents": "many"})).await;
    assert_eq!(s, 400, "{r}");
    // A body over the message limit: refused by name before it is decoded.
    let big = vec![b' '; 33 << 20];
    let (s, r) = http(addr, "POST", &c("ingest"), &big).await;
    assert_eq!(
        (s, r["code"].as_str()),
        (429, Some("RESOURCE_EXHAUSTED")),
        "{r}"
    );
    assert!(
        r["message"].as_str().unwrap().contains("message_bytes"),
        "{r}"
    );
    // Unknown routes and methods answer JSON too.
    let (s, r) = http(addr, "POST", "/v1/nothing", b"{}").await;
    assert_eq!((s, r["code"].as_str()), (404, Some("NOT_FOUND")), "{r}");
    let (s, r) = http(addr, "GET", &c("search"), b"").await;
    assert_eq!(s, 405, "{r}");
    // The admin routes through the node, forwarded to the coordinators: a collection
    // made, described, listed and dropped as JSON; a coordinator's own refusal as JSON.
    let (s, r) = post(
        "/v1/admin/create-collection".into(),
        serde_json::json!({"name": "by-http", "dimension": 8, "shardCount": 2, "replicationFactor": 1}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["collection"]["shardCount"], 2, "{r}");
    let (s, r) = post("/v1/admin/list-collections".into(), serde_json::json!({})).await;
    assert_eq!(s, 200, "{r}");
    let names: Vec<&str> = r["collections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(names.contains(&"by-http") && names.contains(&"vecs"), "{r}");
    let (s, r) = post(
        "/v1/admin/list-shards".into(),
        serde_json::json!({"collection": "vecs"}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert!(!r["shards"].as_array().unwrap().is_empty(), "{r}");
    let (s, r) = post(
        "/v1/admin/drain-node".into(),
        serde_json::json!({"id": "no-such-node"}),
    )
    .await;
    assert_eq!((s, r["code"].as_str()), (404, Some("NOT_FOUND")), "{r}");
    let (s, r) = post(
        "/v1/admin/drop-collection".into(),
        serde_json::json!({"name": "by-http"}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = post(
        "/v1/admin/describe-collection".into(),
        serde_json::json!({"name": "by-http"}),
    )
    .await;
    assert_eq!((s, r["code"].as_str()), (404, Some("NOT_FOUND")), "{r}");
    // Every admin route is wired to its RPC: an empty request reaches the coordinators,
    // which answer it or refuse it by name (never "no such route", never INTERNAL).
    for route in shoal_web::admin::ADMIN_ROUTES {
        let (s, r) = http(addr, "POST", route.path, b"{}").await;
        let code = r["code"].as_str().unwrap_or("OK");
        assert!(
            !matches!(code, "INTERNAL" | "UNKNOWN" | "UNIMPLEMENTED")
                && !r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no such route")),
            "{} {}: {s} {r}",
            route.path,
            route.rpc
        );
    }
    // The console's view from the node: the coordinators' (with the replicas' reports).
    let (s, r) = http(addr, "GET", "/v1/cluster", b"").await;
    assert_eq!(s, 200, "{r}");
    assert!(r["node"].as_str().is_some(), "{r}");
    assert!(r["coordinators"]["leader"].as_u64().unwrap() > 0, "{r}");
    // A coordinator serves the console's view and the admin routes itself, a follower
    // included (the leader answers what needs its reports).
    let mut admin = f.admin.clone();
    let leader = admin
        .cluster_status(Default::default())
        .await
        .unwrap()
        .leader_api_addr;
    let follower: std::net::SocketAddr = f
        .addrs
        .iter()
        .find(|a| **a != leader)
        .unwrap()
        .parse()
        .unwrap();
    let (s, r) = http(follower, "GET", "/v1/cluster", b"").await;
    assert_eq!(s, 200, "{r}");
    assert!(r["coordinator"].as_u64().is_some(), "{r}");
    let vecs = r["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "vecs")
        .unwrap_or_else(|| panic!("{r}"));
    assert!(!vecs["shards"].as_array().unwrap().is_empty(), "{r}");
    let (s, r) = http(
        follower,
        "POST",
        "/v1/admin/list-operations",
        b"{\"collection\": \"vecs\"}",
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (s, doc) = http(
        follower,
        "GET",
        shoal_node::cluster::http::OPENAPI_PATH,
        b"",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        doc["paths"].as_object().unwrap().len(),
        shoal_web::admin::ADMIN_ROUTES.len()
    );
    let (s, r) = http(follower, "POST", "/v1/admin/list-nodes", b"{\"x\": ").await;
    assert_eq!(
        (s, r["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{r}"
    );
    // gRPC on the same port still answers.
    let mut g = f.gb.clone();
    let n = g
        .count(pb::CountRequest {
            collection: "vecs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(n, 38);
}
