//! Issue 17, first part: a cluster of processes (three coordinators, two nodes) with
//! TLS on every port and mutual TLS on the internal ones, from a local CA the harness
//! makes. Writes through both gateways replicate and read back; plaintext is refused
//! on every port; an internal port refuses a client without a certificate and one whose
//! certificate another CA signed, and answers one of the cluster's; the public port
//! takes TLS clients without a certificate.

use std::time::Duration;

use shoal_chaos_tests::*;
use shoal_proto::replica as rpb;
use shoal_proto::replica::replica_client::ReplicaClient;
use shoal_proto::tls::{self, dev, TlsFiles};
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
