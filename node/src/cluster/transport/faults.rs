//! Faults on the in-process network, for tests of the replication protocol (issue 16):
//! links cut one way or both, calls lost before they reach the callee or after it
//! acted (the ambiguous failure), random delays (which reorder concurrent calls) and
//! snapshot streams reset partway,
//! drawn from a seeded generator so a failing schedule can be replayed by its seed.
//! Every call between nodes of an [`super::InProcessNet`] passes through [`Faulty`].

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_proto::replica as rpb;

use super::{LocalReplicas, ReplicaApi, SnapshotStream};
use crate::cluster::error::ReplicaError;

/// The network's faults now. Default: none.
pub struct Faults {
    /// (from, to) addresses whose messages are lost.
    cut: HashSet<(String, String)>,
    /// Chance that a call is lost on its way, or its reply on the way back.
    pub lose_request: f64,
    pub lose_reply: f64,
    /// Each message waits up to this long (uniformly) before it is delivered.
    pub max_delay: Duration,
    /// Snapshot streams break (the connection resets) after this many chunks.
    pub snapshot_breaks_after: Option<usize>,
    /// File bytes carried by snapshot streams so far (a count, not a fault).
    pub snapshot_bytes: Arc<std::sync::atomic::AtomicU64>,
    rng: StdRng,
}

impl Default for Faults {
    fn default() -> Self {
        Self::seeded(0)
    }
}

impl Faults {
    pub fn seeded(seed: u64) -> Self {
        Self {
            cut: HashSet::new(),
            lose_request: 0.0,
            lose_reply: 0.0,
            max_delay: Duration::ZERO,
            snapshot_breaks_after: None,
            snapshot_bytes: Arc::default(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Loses every message `from` sends to `to` (one direction).
    pub fn cut_one_way(&mut self, from: &str, to: &str) {
        self.cut.insert((from.to_string(), to.to_string()));
    }

    pub fn heal_one_way(&mut self, from: &str, to: &str) {
        self.cut.remove(&(from.to_string(), to.to_string()));
    }

    pub fn heal_all(&mut self) {
        self.cut.clear();
    }

    /// Whether a message from `from` to `to` is lost, and how long it waits first.
    fn roll(&mut self, from: &str, to: &str, chance: f64) -> (bool, Duration) {
        let cut = self.cut.contains(&(from.to_string(), to.to_string()));
        let lost = cut || (chance > 0.0 && self.rng.random_bool(chance.min(1.0)));
        let delay = if self.max_delay.is_zero() {
            Duration::ZERO
        } else {
            self.max_delay.mul_f64(self.rng.random::<f64>())
        };
        (lost, delay)
    }
}

/// A call from node address `from` to the replicas at `to`, through the faults.
pub struct Faulty {
    pub(super) inner: Arc<LocalReplicas>,
    pub(super) faults: Arc<Mutex<Faults>>,
    pub(super) from: String,
    pub(super) to: String,
}

impl Faulty {
    async fn call<T>(
        &self,
        f: impl Future<Output = Result<T, ReplicaError>>,
    ) -> Result<T, ReplicaError> {
        let (lost, delay) = {
            let mut f = self.faults.lock();
            let p = f.lose_request;
            f.roll(&self.from, &self.to, p)
        };
        tokio::time::sleep(delay).await;
        if lost {
            return Err(ReplicaError::Unavailable(format!(
                "{} -> {}: request lost",
                self.from, self.to
            )));
        }
        let r = f.await;
        let (lost, delay) = {
            let mut f = self.faults.lock();
            let p = f.lose_reply;
            f.roll(&self.to, &self.from, p)
        };
        tokio::time::sleep(delay).await;
        if lost {
            return Err(ReplicaError::Unavailable(format!(
                "{} -> {}: reply lost",
                self.to, self.from
            )));
        }
        r
    }
}

#[tonic::async_trait]
impl ReplicaApi for Faulty {
    async fn write(
        &self,
        req: rpb::WriteRequest,
        timeout: Duration,
    ) -> Result<rpb::WriteResponse, ReplicaError> {
        self.call(self.inner.write(req, timeout)).await
    }
    async fn append(
        &self,
        req: rpb::AppendRequest,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        self.call(self.inner.append(req, timeout)).await
    }
    async fn install_snapshot(
        &self,
        chunks: SnapshotStream,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        let (breaks_after, carried) = {
            let f = self.faults.lock();
            (f.snapshot_breaks_after, f.snapshot_bytes.clone())
        };
        let chunks = futures::StreamExt::boxed(futures::StreamExt::inspect(chunks, move |c| {
            if let Ok(c) = c {
                carried.fetch_add(c.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }));
        let chunks = match breaks_after {
            Some(n) => {
                use futures::StreamExt;
                let broken = format!("{} -> {}: snapshot stream reset", self.from, self.to);
                chunks
                    .take(n)
                    .chain(futures::stream::once(async move {
                        Err(ReplicaError::Unavailable(broken))
                    }))
                    .boxed()
            }
            None => chunks,
        };
        self.call(self.inner.install_snapshot(chunks, timeout))
            .await
    }
    async fn snapshot_staged(
        &self,
        req: rpb::SnapshotStagedRequest,
        timeout: Duration,
    ) -> Result<rpb::SnapshotStagedResponse, ReplicaError> {
        self.call(self.inner.snapshot_staged(req, timeout)).await
    }
    async fn search(
        &self,
        req: rpb::ShardSearchRequest,
        timeout: Duration,
    ) -> Result<rpb::ShardSearchResponse, ReplicaError> {
        self.call(self.inner.search(req, timeout)).await
    }
    async fn search_many(
        &self,
        req: rpb::ShardSearchBatch,
        timeout: Duration,
    ) -> Result<rpb::ShardSearchBatchResponse, ReplicaError> {
        self.call(self.inner.search_many(req, timeout)).await
    }
    async fn get(
        &self,
        req: rpb::ShardGetRequest,
        timeout: Duration,
    ) -> Result<rpb::ShardGetResponse, ReplicaError> {
        self.call(self.inner.get(req, timeout)).await
    }
    async fn build(
        &self,
        req: rpb::BuildRequest,
        timeout: Duration,
    ) -> Result<rpb::BuildResponse, ReplicaError> {
        self.call(self.inner.build(req, timeout)).await
    }
    async fn fetch_generation(
        &self,
        req: rpb::FetchGenerationRequest,
        timeout: Duration,
    ) -> Result<rpb::FetchGenerationResponse, ReplicaError> {
        self.call(self.inner.fetch_generation(req, timeout)).await
    }
}
