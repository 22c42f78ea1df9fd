//! A client of the coordinator group for nodes, the CLI and tests: it tries the given
//! addresses in turn and follows not-leader hints, so callers need not know the leader.

use std::future::Future;
use std::time::{Duration, Instant};

use shoal_proto::coordinator::admin_client::AdminClient;
use shoal_proto::coordinator::cluster_map_client::ClusterMapClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::LEADER_HEADER;

#[derive(Clone)]
pub struct Client {
    addrs: Vec<String>,
    /// Index into `addrs` of the member that last answered.
    current: usize,
    /// How long one call keeps retrying through elections.
    pub patience: Duration,
}

impl Client {
    pub fn new(addrs: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            addrs: addrs.into_iter().map(Into::into).collect(),
            current: 0,
            patience: Duration::from_secs(15),
        }
    }

    fn channel(addr: &str) -> Result<Channel, Status> {
        shoal_proto::channel(addr, Some(Duration::from_secs(12)))
            .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))
    }

    /// Runs `f` against a member, moving to the hinted leader or the next address on
    /// UNAVAILABLE, until it succeeds, fails for another reason, or patience runs out.
    /// Only UNAVAILABLE is retried: the request was not applied.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        if self.addrs.is_empty() {
            return Err(Status::invalid_argument("no coordinator address given"));
        }
        let deadline = Instant::now() + self.patience;
        loop {
            let addr = self.addrs[self.current % self.addrs.len()].clone();
            let err = match f(Self::channel(&addr)?).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == Code::Unavailable => s,
                Err(s) => return Err(s),
            };
            let hint = err
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match hint.and_then(|h| {
                self.addrs.iter().position(|a| *a == h).or_else(|| {
                    self.addrs.push(h);
                    Some(self.addrs.len() - 1)
                })
            }) {
                Some(i) if i != self.current => self.current = i,
                _ => {
                    self.current = (self.current + 1) % self.addrs.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if Instant::now() > deadline {
                return Err(err);
            }
        }
    }

    pub async fn admin<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call(|ch| f(AdminClient::new(ch))).await
    }

    pub async fn cluster<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(ClusterMapClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call(|ch| f(ClusterMapClient::new(ch))).await
    }
}
