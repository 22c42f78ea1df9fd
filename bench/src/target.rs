//! The running cluster a harness drives (`load`, `ingest`): its nodes and coordinators
//! (by default `shoal dev`'s), and one way to connect to a node.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;
use tonic::transport::Channel;

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
}

impl ClusterTarget {
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
pub async fn ingest_when_ready(c: &mut ShoalClient<Channel>, req: pb::IngestRequest) -> Result<()> {
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

/// A node's public API, TCP_NODELAY on, messages up to 64 MiB both ways.
pub async fn connect(addr: &str) -> Result<ShoalClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(ShoalClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}
