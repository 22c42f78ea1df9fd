//! The running cluster a harness drives (`load`, `ingest`): its nodes and coordinators
//! (by default `shoal dev`'s), and one way to connect to a node.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use shoal_proto::auth::Authed;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;

#[derive(Args, Clone)]
pub struct ClusterTarget {
    /// Nodes' public addresses; clients spread over them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:7201,127.0.0.1:7202"
    )]
    pub nodes: Vec<String>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    pub coordinators: Vec<String>,
    /// TLS (issue 17): the cluster's CA, and a client certificate (`shoal dev` prints
    /// them); plaintext without.
    #[arg(long, env = "SHOAL_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The API key's file the harness's calls carry (`shoal dev`'s root key).
    #[arg(long, env = "SHOAL_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
}

impl ClusterTarget {
    /// Makes every connection of this process use the target's TLS and key; returns
    /// whether TLS is on (for the report).
    pub fn secure(&self) -> Result<bool> {
        if let Some(f) = &self.api_key_file {
            shoal_proto::auth::use_key(
                shoal_proto::auth::read_key_file(f).map_err(anyhow::Error::msg)?,
            );
        }
        let Some(ca) = &self.tls_ca else {
            return Ok(false);
        };
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        shoal_proto::tls::use_for_clients(shoal_proto::tls::client_config(ca, identity, None)?);
        Ok(true)
    }

    /// Client `i`'s node (round robin).
    pub fn node(&self, i: usize) -> &str {
        &self.nodes[i % self.nodes.len()]
    }

    pub fn admin(&self) -> Client {
        Client::new(self.coordinators.clone())
    }

    /// Creates a scratch collection (the harness drops it with [`Self::drop`]).
    pub async fn create(&self, req: cpb::CreateCollectionRequest) -> Result<()> {
        self.admin()
            .admin(|mut c| {
                let r = req.clone();
                async move { c.create_collection(r).await }
            })
            .await
            .with_context(|| format!("creating the scratch collection {:?}", req.name))?;
        Ok(())
    }

    /// Drops a scratch collection; a failure is only reported.
    pub async fn drop(&self, name: &str) {
        let name = name.to_string();
        let r = self
            .admin()
            .admin(|mut c| {
                let name = name.clone();
                async move { c.drop_collection(cpb::DropCollectionRequest { name }).await }
            })
            .await;
        if let Err(e) = r {
            eprintln!("dropping the scratch collection: {e}");
        }
    }
}

/// Sends `req` until the node takes it (for 30 s at most): right after a create the
/// node may not have seen it yet (NOT_FOUND) and its shards may still be opening
/// (UNAVAILABLE).
pub async fn ingest_when_ready(c: &mut ShoalClient<Authed>, req: pb::IngestRequest) -> Result<()> {
    let t = Instant::now();
    loop {
        match c.ingest(req.clone()).await {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::NotFound)
                    && t.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e).context("ingesting the first batch"),
        }
    }
}

/// A node's public API (over TLS with the key when [`ClusterTarget::secure`] set
/// them), TCP_NODELAY on, messages up to 64 MiB both ways.
pub async fn connect(addr: &str) -> Result<ShoalClient<Authed>> {
    let ch = shoal_proto::endpoint(addr)?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(shoal_proto::auth::shoal_client(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}
