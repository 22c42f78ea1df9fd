//! The cluster as processes: three `shoal coordinator`s and two `shoal node`s on
//! loopback. Ingest through one node, search and get through the other, delete, then
//! SIGKILL a node and restart it: every acknowledged document is still found.

mod support;

use shoal_coordinator::testing::free_port;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::Procs;

use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;

const BIN: &str = env!("CARGO_BIN_EXE_shoal");

fn spawn(args: &[String], log: &Path) -> Child {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap()
}

fn vector(i: u64) -> Vec<f32> {
    (0..8)
        .map(|j| (((i * 31 + j * 17) % 97) as f32 / 97.0) - 0.5 + (i % 7) as f32 * 0.01)
        .collect()
}

/// GET /metrics over a plain TCP connection (HTTP/1.0: the server closes when done).
fn scrape(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

struct NodeProc {
    args: Vec<String>,
    public: String,
    child: Child,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_search_delete_and_node_restart_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coords: Vec<(String, String)> = (0..3)
        .map(|_| {
            (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect();
    let peers = coords
        .iter()
        .enumerate()
        .map(|(i, (api, raft))| format!("{}={raft}/{api}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let procs = Procs(
        coords
            .iter()
            .enumerate()
            .map(|(i, (api, raft))| {
                let args: Vec<String> = [
                    "coordinator",
                    "--id",
                    &(i + 1).to_string(),
                    "--listen",
                    api,
                    "--raft-listen",
                    raft,
                    "--peers",
                    &peers,
                ]
                .iter()
                .map(|s| s.to_string())
                .chain([
                    "--data-dir".into(),
                    d.join(format!("c{i}")).display().to_string(),
                ])
                .collect();
                spawn(&args, &d.join(format!("c{i}.log")))
            })
            .collect(),
    );
    let caddrs: Vec<String> = coords.iter().map(|(a, _)| a.clone()).collect();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut nodes: Vec<NodeProc> = (1..=2)
        .map(|j| {
            let public = format!("127.0.0.1:{}", free_port());
            let mut args: Vec<String> = vec![
                "node".into(),
                "--id".into(),
                format!("n{j}"),
                "--listen".into(),
                public.clone(),
                "--internal-listen".into(),
                format!("127.0.0.1:{}", free_port()),
                "--coordinators".into(),
                caddrs.join(","),
                "--data-dir".into(),
                d.join(format!("n{j}")).display().to_string(),
            ];
            if j == 2 {
                args.extend(["--metrics-listen".into(), metrics_addr.clone()]);
            }
            let child = spawn(&args, &d.join(format!("n{j}.log")));
            NodeProc {
                args,
                public,
                child,
            }
        })
        .collect();

    let mut admin = Client::new(caddrs.clone());
    admin.patience = Duration::from_secs(30);
    let t = Instant::now();
    loop {
        let up = admin
            .admin(|mut c| async move { c.list_nodes(cpb::ListNodesRequest {}).await })
            .await
            .map(|r| {
                r.into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state == cpb::NodeState::Up as i32)
                    .count()
            })
            .unwrap_or(0);
        if up == 2 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "nodes not up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    admin
        .admin(|mut c| async move {
            c.create_collection(cpb::CreateCollectionRequest {
                name: "docs".into(),
                dimension: 8,
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

    let connect = |addr: String| async move {
        let t = Instant::now();
        loop {
            if let Ok(c) = ShoalClient::connect(format!("http://{addr}")).await {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "cannot reach {addr}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut g1 = connect(nodes[0].public.clone()).await;
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
        let t = Instant::now();
        loop {
            let r = g1
                .ingest(pb::IngestRequest {
                    collection: "docs".into(),
                    documents: docs.clone(),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => break,
                // Shards of the new collection may still be opening.
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && t.elapsed() < Duration::from_secs(30) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(s) => panic!("ingest: {s:?}"),
            }
        }
        acked.extend(ids);
    }
    let mut g2 = connect(nodes[1].public.clone()).await;
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
    nodes[0].child.kill().unwrap();
    nodes[0].child.wait().unwrap();
    nodes[0].child = spawn(&nodes[0].args, &d.join("n1.log"));

    let t = Instant::now();
    let found: BTreeSet<String> = loop {
        let r = g2
            .search(pb::SearchRequest {
                collection: "docs".into(),
                vector: vector(3),
                k: 1000,
                ..Default::default()
            })
            .await;
        if let Ok(r) = r {
            let r = r.into_inner();
            if !r.partial {
                assert_eq!(r.shards_total, 4);
                break r.hits.into_iter().map(|h| h.id).collect();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "node 1 did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
    let t = Instant::now();
    let body = loop {
        let body = scrape(&metrics_addr).unwrap_or_default();
        if body.contains("shoal_shard_live_documents") || t.elapsed() > Duration::from_secs(10) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for name in [
        "shoal_gateway_searches_total{outcome=\"ok\"}",
        "shoal_gateway_search_duration_seconds",
        "shoal_node_replicas",
        "shoal_shard_live_documents{collection=\"docs\"",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    drop(nodes);
    drop(procs);
}
