//! TLS on a real tonic server over loopback (issue 17, first part): mutual TLS refuses
//! plaintext, a client without a certificate, and one whose certificate another CA
//! signed; the public mode lets a client without one in; certificates rotate without a
//! restart, and a half-written rotation leaves the ones in use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::tls::{self, dev, ClientAuth, ServerTls, TlsFiles};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A health service behind `tls` on a loopback port; its address.
async fn serve(tls: Arc<ServerTls>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tls::incoming(listener, tls)),
    );
    addr
}

/// Whether a health check through `channel` succeeds.
async fn check(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    let mut c = HealthClient::new(channel);
    c.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .map(|_| ())
}

fn client(dir: &Path, name: Option<&str>) -> tonic::transport::ClientTlsConfig {
    let f = TlsFiles::in_dir(dir, name.unwrap_or("none"));
    let identity = name.map(|_| (f.cert.as_path(), f.key.as_path()));
    tls::client_config(&f.ca, identity, Some("localhost")).unwrap()
}

fn channel(addr: &str, tls: tonic::transport::ClientTlsConfig) -> tonic::transport::Channel {
    tls::channel(addr, Some(Duration::from_secs(5)), tls).unwrap()
}

#[tokio::test]
async fn mutual_tls_admits_only_the_clusters_certificates() {
    let cluster = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    dev::Ca::new("cluster")
        .unwrap()
        .write(cluster.path(), &["server", "node"])
        .unwrap();
    dev::Ca::new("stranger")
        .unwrap()
        .write(other.path(), &["node"])
        .unwrap();
    let server = ServerTls::load(
        TlsFiles::in_dir(cluster.path(), "server"),
        ClientAuth::Required,
    )
    .unwrap();
    let addr = serve(server).await;

    check(channel(&addr, client(cluster.path(), Some("node"))))
        .await
        .expect("a certificate from the cluster's CA");
    let plain = shoal_proto::channel(&addr, Some(Duration::from_secs(5))).unwrap();
    assert!(check(plain).await.is_err(), "plaintext was served");
    assert!(
        check(channel(&addr, client(cluster.path(), None)))
            .await
            .is_err(),
        "a client without a certificate was served"
    );
    // Another CA's client certificate, trusting the server's CA.
    let stranger = TlsFiles::in_dir(other.path(), "node");
    let cfg = tls::client_config(
        &TlsFiles::in_dir(cluster.path(), "node").ca,
        Some((&stranger.cert, &stranger.key)),
        Some("localhost"),
    )
    .unwrap();
    assert!(
        check(channel(&addr, cfg)).await.is_err(),
        "another CA's certificate was served"
    );
    // A client that does not trust the server's CA refuses it.
    assert!(check(channel(&addr, client(other.path(), Some("node"))))
        .await
        .is_err());
}

#[tokio::test]
async fn the_public_mode_admits_clients_without_certificates() {
    let dir = tempfile::tempdir().unwrap();
    dev::Ca::new("cluster")
        .unwrap()
        .write(dir.path(), &["server"])
        .unwrap();
    let server =
        ServerTls::load(TlsFiles::in_dir(dir.path(), "server"), ClientAuth::Optional).unwrap();
    let addr = serve(server).await;
    check(channel(&addr, client(dir.path(), None)))
        .await
        .expect("TLS without a client certificate");
    let plain = shoal_proto::channel(&addr, Some(Duration::from_secs(5))).unwrap();
    assert!(check(plain).await.is_err(), "plaintext was served");
}

#[tokio::test]
async fn certificates_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (dev::Ca::new("old").unwrap(), dev::Ca::new("new").unwrap());
    old_ca.write(dir.path(), &["server", "node"]).unwrap();
    let old_client = client(dir.path(), Some("node"));
    let server =
        ServerTls::load(TlsFiles::in_dir(dir.path(), "server"), ClientAuth::Required).unwrap();
    let addr = serve(server.clone()).await;
    check(channel(&addr, old_client.clone())).await.unwrap();
    assert!(
        !server.reload().unwrap(),
        "nothing changed, nothing reloaded"
    );

    // A rotation half-written (a certificate that does not parse): refused, and the
    // configuration in use stays.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    let err = server.reload().unwrap_err();
    assert!(err.to_string().contains("server.pem"), "{err}");
    check(channel(&addr, old_client.clone())).await.unwrap();

    // The whole rotation, to a new CA: new connections need the new certificates.
    std::thread::sleep(Duration::from_millis(20));
    new_ca.write(dir.path(), &["server", "node"]).unwrap();
    assert!(server.reload().unwrap());
    check(channel(&addr, client(dir.path(), Some("node"))))
        .await
        .expect("the new certificates");
    assert!(
        check(channel(&addr, old_client)).await.is_err(),
        "the old CA's client was served after the rotation"
    );
}
