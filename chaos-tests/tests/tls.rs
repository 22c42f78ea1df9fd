//! Issue 17: a cluster of processes (three coordinators, two nodes) with
//! TLS on every port and mutual TLS on the internal ones, from a local CA the harness
//! makes. Writes through both gateways replicate and read back; plaintext is refused
//! on every port; an internal port refuses a client without a certificate and one whose
//! certificate another CA signed, and answers one of the cluster's; the public port
//! takes TLS clients without a certificate.

use std::time::Duration;

use shoal_chaos_tests::*;
use shoal_proto::auth::{Attach, Role};
use shoal_proto::coordinator as cpb;
use shoal_proto::replica as rpb;
use shoal_proto::replica::replica_client::ReplicaClient;
use shoal_proto::tls::{self, dev, TlsFiles};
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// A Replica call on `ch`: the port's answer (a NOT_FOUND for the unknown shard
/// means TLS let the call through).
async fn replica_get(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    ReplicaClient::new(ch)
        .get(rpb::ShardGetRequest {
            shard_count: 0,
            shard: None,
            id: "x".into(),
        })
        .await
        .map(|_| ())
}

fn plaintext(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_on_tls_serves_its_own_and_refuses_plaintext_and_strangers() {
    let c = Cluster::start_spec(Spec {
        nodes: 2,
        tls: true,
        ..Spec::default()
    })
    .await;
    c.create_collection("t", 2, 2).await;
    c.wait_replicated("t", 2, Duration::from_secs(60)).await;
    let writers = Writers::start(
        c.nodes.iter().map(|n| n.public.clone()).collect(),
        "t",
        2,
        5,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = writers.finish().await;
    assert!(written.batches > 0, "nothing was written over TLS");
    assert_eq!(written.not_acknowledged, 0);
    check_acknowledged(&c.nodes[1].public, "t", &written.docs).await;
    check_acknowledged(&c.nodes[0].public, "t", &written.docs).await;

    let dir = c.layout.tls.clone().unwrap();
    let ca = TlsFiles::in_dir(&dir, "client").ca;
    let (coord, node) = (&c.layout.coordinators[0], &c.layout.nodes[0]);
    // Plaintext, on every port.
    for addr in [&coord.api, &node.public] {
        let e = health(plaintext(addr)).await.unwrap_err();
        eprintln!("plaintext to {addr}: {e}");
    }
    assert!(replica_get(plaintext(&node.internal)).await.is_err());
    let raft = shoal_proto::raft::raft_client::RaftClient::new(plaintext(&coord.raft))
        .read_index(shoal_proto::raft::Payload::default())
        .await;
    assert!(raft.is_err(), "the Raft port answered plaintext");

    // The public ports: TLS without a client certificate is served.
    let anonymous = tls::client_config(&ca, None, None).unwrap();
    for addr in [&coord.api, &node.public] {
        health(tls::channel(addr, Some(Duration::from_secs(5)), anonymous.clone()).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{addr} refused a TLS client without a certificate: {e}"));
    }
    // The internal port: the cluster's certificate gets an answer from the service
    // (the shard is unknown); none, or another CA's, gets no answer at all.
    let client = TlsFiles::in_dir(&dir, "client");
    let member = tls::client_config(&ca, Some((&client.cert, &client.key)), None).unwrap();
    let e = replica_get(tls::channel(&node.internal, None, member).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = replica_get(tls::channel(&node.internal, None, anonymous).unwrap())
        .await
        .unwrap_err();
    // Refused by TLS, never answered by the service: an error of the transport (a
    // certificate-required alert, or the connection closed after the server rejected
    // the certificate; tonic says UNKNOWN or CANCELLED), not a status from the server.
    let refused = |e: &tonic::Status| {
        e.code() != tonic::Code::InvalidArgument && std::error::Error::source(e).is_some()
    };
    assert!(refused(&e), "no certificate: {e:?}");
    eprintln!("no certificate: {e}");
    let other = tempfile::tempdir().unwrap();
    dev::Ca::new("stranger")
        .unwrap()
        .write(other.path(), &["client"])
        .unwrap();
    let stranger = TlsFiles::in_dir(other.path(), "client");
    let cfg = tls::client_config(&ca, Some((&stranger.cert, &stranger.key)), None).unwrap();
    let e = replica_get(tls::channel(&node.internal, None, cfg).unwrap())
        .await
        .unwrap_err();
    assert!(refused(&e), "another CA: {e:?}");
    eprintln!("another CA's certificate: {e:?}");
}

/// A node client carrying `key` (or none).
async fn node_as(addr: &str, key: Option<&str>) -> ShoalClient<shoal_proto::auth::Authed> {
    let ch = shoal_proto::endpoint(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    ShoalClient::with_interceptor(ch, Attach::key(key.map(Into::into)))
}

fn one_doc(collection: &str, i: u64) -> pb::IngestRequest {
    pb::IngestRequest {
        collection: collection.into(),
        documents: vec![pb::Document {
            id: doc_id(i),
            vector: vector(i),
            ..Default::default()
        }],
        request_id: String::new(),
    }
}

fn search(collection: &str) -> pb::SearchRequest {
    pb::SearchRequest {
        collection: collection.into(),
        vector: vector(1),
        k: 3,
        ..Default::default()
    }
}

/// Issue 17, second part: API keys with roles on a cluster of processes (TLS and keys
/// are the harness's default). A key made through the CLI's RPC works at every node
/// once the map reaches it; no key, a malformed one or a wrong secret is
/// UNAUTHENTICATED; a read key writing, a write key on a collection it is not limited
/// to, and a write key building an index are PERMISSION_DENIED; a revoked key is
/// refused by the nodes within the map's propagation; the audit logs hold the admin
/// actions and the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_decide_by_role_and_collection_and_revocation_reaches_the_nodes() {
    let c = Cluster::start_spec(Spec {
        nodes: 2,
        ..Spec::default()
    })
    .await;
    c.create_collection("a", 1, 2).await;
    c.create_collection("b", 1, 2).await;
    c.wait_replicated("a", 2, Duration::from_secs(60)).await;
    c.wait_replicated("b", 2, Duration::from_secs(60)).await;
    // The harness's clients carry the root key: make the others with it.
    let mut admin = c.admin();
    let make = |name: &str, role: Role, collections: &[&str]| {
        let req = cpb::CreateKeyRequest {
            name: name.into(),
            role: role.wire(),
            collections: collections.iter().map(|s| s.to_string()).collect(),
        };
        let mut admin = admin.clone();
        async move { admin.create_key(req).await.unwrap().key }
    };
    let reader = make("reader", Role::Read, &[]).await;
    let writer_a = make("writer-a", Role::Write, &["a"]).await;
    let writer = make("writer", Role::Write, &[]).await;
    let listed = admin.list_keys(cpb::ListKeysRequest {}).await.unwrap().keys;
    assert_eq!(listed.len(), 3);
    assert!(
        listed.iter().all(|k| k.sha256.is_empty()),
        "a listing shows no hashes"
    );

    let node = &c.nodes[0].public;
    // The map reaches the node a moment after the key is made: the writer's first
    // write is retried while the node does not know the key yet.
    let t = std::time::Instant::now();
    loop {
        match node_as(node, Some(&writer_a))
            .await
            .ingest(one_doc("a", 1))
            .await
        {
            Ok(_) => break,
            Err(e)
                if e.code() == Code::Unauthenticated && t.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the write key on its collection: {e}"),
        }
    }
    eprintln!("a new key worked at a node after {:?}", t.elapsed());
    let code = |r: Result<tonic::Response<pb::IngestResponse>, tonic::Status>| {
        r.map(|_| ()).map_err(|e| e.code())
    };
    // Who: none, malformed, a wrong secret, another cluster's root key.
    let (id, _) = shoal_proto::auth::parse(&reader).unwrap();
    let wrong = format!("shoal_{id}_{}", "0".repeat(64));
    for k in [
        None,
        Some("hello"),
        Some(wrong.as_str()),
        Some(&shoal_proto::auth::generate_root()[..]),
    ] {
        let e = node_as(node, k)
            .await
            .search(search("a"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{k:?}: {e}");
    }
    // What: roles and collections.
    assert!(node_as(node, Some(&reader))
        .await
        .search(search("a"))
        .await
        .is_ok());
    assert_eq!(
        code(
            node_as(node, Some(&reader))
                .await
                .ingest(one_doc("a", 2))
                .await
        ),
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        code(
            node_as(node, Some(&writer_a))
                .await
                .ingest(one_doc("b", 3))
                .await
        ),
        Err(Code::PermissionDenied)
    );
    let e = node_as(node, Some(&writer))
        .await
        .build_index(pb::BuildIndexRequest {
            collection: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = admin
        .clone()
        .with_key(Some(&writer))
        .drop_collection(cpb::DropCollectionRequest { name: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // Revoked: refused by every node once the map reaches it.
    let (wid, _) = shoal_proto::auth::parse(&writer_a).unwrap();
    admin
        .revoke_key(cpb::RevokeKeyRequest { id: wid.into() })
        .await
        .unwrap();
    for n in &c.nodes {
        let t = std::time::Instant::now();
        loop {
            match code(
                node_as(&n.public, Some(&writer_a))
                    .await
                    .ingest(one_doc("a", 4))
                    .await,
            ) {
                Err(Code::Unauthenticated) => break,
                r if t.elapsed() > Duration::from_secs(10) => {
                    panic!("{}: a revoked key still gets {r:?} after 10 s", n.public)
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        eprintln!(
            "{}: the revoked key refused after {:?}",
            n.public,
            t.elapsed()
        );
    }

    // Audit: the node recorded the refusals, a member the key's creation.
    let audit = |name: &str| std::fs::read_to_string(c.layout.audit_log(name)).unwrap_or_default();
    let records = |text: String| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let node_records = records(audit("node-1"));
    let refused = |action: &str, outcome: &str| {
        node_records
            .iter()
            .any(|r| r["kind"] == "refused" && r["action"] == action && r["outcome"] == outcome)
    };
    assert!(refused("Ingest", "PermissionDenied"), "{node_records:?}");
    assert!(refused("Search", "Unauthenticated"), "{node_records:?}");
    assert!(
        refused("BuildIndex", "PermissionDenied"),
        "{node_records:?}"
    );
    let members: Vec<serde_json::Value> = c
        .layout
        .coordinators
        .iter()
        .flat_map(|m| records(audit(&m.name)))
        .collect();
    let made = members
        .iter()
        .filter(|r| r["kind"] == "admin" && r["action"] == "CreateKey" && r["outcome"] == "ok")
        .count();
    assert_eq!(made, 3, "{members:?}");
    assert!(members.iter().any(|r| r["kind"] == "admin"
        && r["action"] == "RevokeKey"
        && r["target"] == wid
        && r["key"] == "root"));
    assert!(members.iter().any(|r| r["kind"] == "refused"
        && r["action"] == "DropCollection"
        && r["outcome"] == "PermissionDenied"));
    let n = c.metric(0, "shoal_audit_records_total").await;
    assert!(n >= 4.0, "shoal_audit_records_total at node-1: {n}");
}

/// Issue 17: certificates renewed under writes (same CA, new keys, as cert-manager
/// renews them). Every process's files are replaced while writers write through both
/// gateways; every process then serves its new certificate (checked by handshake on
/// the public ports; both servers of each process say so in its log) within two reload
/// periods, no write fails, and new connections work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_renewed_under_writes_are_taken_up_without_a_failed_write() {
    let c = Cluster::start_spec(Spec {
        nodes: 2,
        ..Spec::default()
    })
    .await;
    c.create_collection("r", 2, 2).await;
    c.wait_replicated("r", 2, Duration::from_secs(60)).await;
    let dir = c.layout.tls.clone().unwrap();
    let ca = TlsFiles::in_dir(&dir, "client").ca;
    let publics: Vec<(String, String)> = c
        .layout
        .coordinators
        .iter()
        .map(|m| (m.name.clone(), m.api.clone()))
        .chain(
            c.layout
                .nodes
                .iter()
                .map(|n| (n.id.clone(), n.public.clone())),
        )
        .collect();
    let mut before = Vec::new();
    for (_, addr) in &publics {
        before.push(tls::served_certificate(addr, &ca).await.unwrap());
    }
    let writers = Writers::start(
        c.nodes.iter().map(|n| n.public.clone()).collect(),
        "r",
        2,
        5,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = std::time::Instant::now();
    c.layout
        .clone()
        .make_tls_with(&test_security().0)
        .expect("renewing every certificate");
    for ((name, addr), old) in publics.iter().zip(&before) {
        let want = tls::certificate_in(&TlsFiles::in_dir(&dir, name).cert).unwrap();
        assert_ne!(&want, old, "{name}: the renewal made a new certificate");
        loop {
            if tls::served_certificate(addr, &ca).await.unwrap() == want {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{name} still serves its old certificate 30 s after the renewal"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!(
        "every process serves its renewed certificate {:?} after the files changed",
        t.elapsed()
    );
    // Each process's internal server reloads as its public one does.
    let reloaded = |log: String| log.matches("TLS certificates reloaded").count();
    for k in 0..c.layout.coordinators.len() {
        eventually(
            Duration::from_secs(15),
            format!("coordinator {k} reloads both servers"),
            || async { (reloaded(c.coordinator_log(k)) >= 2).then_some(()) },
        )
        .await;
    }
    for i in 0..c.nodes.len() {
        eventually(
            Duration::from_secs(15),
            format!("node {i} reloads both servers"),
            || async { (reloaded(c.node_log(i)) >= 2).then_some(()) },
        )
        .await;
    }
    // Writes go on over new connections too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = writers.finish().await;
    assert!(written.batches > 0, "nothing was written");
    assert_eq!(
        written.not_acknowledged, 0,
        "writes failed during the renewal"
    );
    eprintln!("{} batches written across the renewal", written.batches);
    for n in &c.nodes {
        check_acknowledged(&n.public, "r", &written.docs).await;
    }
}
