//! `shoal coordinator` settings: flags, `SHOAL_*` environment variables, or a TOML file
//! (flags and environment win over the file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::raft::Member;

/// One member of the group: `ID=RAFT_ADDR/API_ADDR`, e.g. `1=127.0.0.1:7101/127.0.0.1:7001`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Peer {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
}

impl std::str::FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("peer {s:?} must look like ID=RAFT_ADDR/API_ADDR");
        let (id, rest) = s.split_once('=').ok_or_else(bad)?;
        let (raft, api) = rest.split_once('/').ok_or_else(bad)?;
        Ok(Peer {
            id: id.trim().parse().map_err(|_| bad())?,
            raft_addr: raft.trim().to_string(),
            api_addr: api.trim().to_string(),
        })
    }
}

impl Peer {
    pub fn member(&self) -> Member {
        Member {
            raft_addr: self.raft_addr.clone(),
            api_addr: self.api_addr.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This member's Raft id (non-zero).
    pub id: u64,
    /// Public gRPC address (admin and cluster-map services).
    pub listen: String,
    /// Internal Raft address, for the other members only.
    pub raft_listen: String,
    pub data_dir: PathBuf,
    /// The initial voters, this member included. A fresh group is initialised by its
    /// lowest-id member; on restart the log on disk wins and this list is ignored.
    pub peers: Vec<Peer>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Log entries between snapshots; older entries are purged after a snapshot.
    pub snapshot_every: u64,
    /// A node silent this long turns suspect, and down after `down_after_ms`.
    pub suspect_after_ms: u64,
    pub down_after_ms: u64,
    /// How often the leader checks liveness and runs placement.
    pub tick_ms: u64,
    pub max_moves_per_step: usize,
    pub max_copies_in_flight: usize,
    /// How long the cluster must stay settled (every node up or down, no copies in
    /// flight) with primaries uneven before the leader hands one primary over; then
    /// the clock restarts, so at most one handover per period. Longer than the
    /// suspect timeout: a node that is shutting down goes suspect first.
    pub rebalance_settle_ms: u64,
    /// How long a split's sources may stay sealed (their writes waiting) before the
    /// leader cancels the split (issue 19): a replica that cannot make its fork in that
    /// time (its node stopped, its disk full) must not keep a collection unwritable.
    pub split_seal_timeout_ms: u64,
    /// Disk watermarks, as used fractions of a node's data volume (its trash counted
    /// as free): over `disk_low_watermark` a node takes no new replica; over
    /// `disk_high_watermark` its replicas move elsewhere. The flood stage, where a node
    /// refuses writes, is the node's own `--disk-reserve-bytes`.
    pub disk_low_watermark: f64,
    pub disk_high_watermark: f64,
    /// false: placement ignores disk usage (Elasticsearch's
    /// `cluster.routing.allocation.disk.threshold_enabled`); nodes still refuse writes
    /// under their reserve.
    pub disk_threshold_enabled: bool,
    /// Plaintext grpc.health only (for probes that speak no TLS); None: none.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Prometheus `/metrics` address; None: no endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS on both ports and every connection this member opens (issue 17): the Raft
    /// port requires a peer certificate from the cluster's CA. None: plaintext.
    pub tls: Option<shoal_proto::tls::TlsFiles>,
    /// API keys (issue 17): the file holding the cluster's root key. With it, every
    /// Admin call needs a key with the role it names; without it, keys are off.
    pub root_key_file: Option<PathBuf>,
    /// The audit log's file (JSON lines); without it, records go to the log only.
    pub audit_log: Option<PathBuf>,
    /// Limits over their defaults, as `NAME=VALUE` (`shoal limits` lists them).
    pub limits: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "127.0.0.1:7001".into(),
            raft_listen: "127.0.0.1:7101".into(),
            data_dir: PathBuf::from("data/coordinator-1"),
            peers: Vec::new(),
            // Election timeouts sized for a loaded 2-core machine: long enough that a
            // busy member's heartbeat is not mistaken for a failure, short enough that a
            // new leader commits within 3 s of the old one stopping.
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every: 1000,
            suspect_after_ms: 5_000,
            down_after_ms: 30_000,
            tick_ms: 250,
            max_moves_per_step: 16,
            max_copies_in_flight: 8,
            rebalance_settle_ms: 30_000,
            split_seal_timeout_ms: 120_000,
            // Elasticsearch's defaults.
            disk_low_watermark: 0.85,
            disk_high_watermark: 0.90,
            disk_threshold_enabled: true,
            metrics_listen: None,
            health_listen: None,
            tls: None,
            root_key_file: None,
            audit_log: None,
            limits: Vec::new(),
        }
    }
}

impl Config {
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.id != 0, "id must be non-zero");
        anyhow::ensure!(
            self.peers.is_empty() || self.peers.iter().any(|p| p.id == self.id),
            "peers must include this member (id {})",
            self.id
        );
        anyhow::ensure!(
            self.heartbeat_ms * 3 <= self.election_timeout_min_ms
                && self.election_timeout_min_ms < self.election_timeout_max_ms,
            "need heartbeat_ms * 3 <= election_timeout_min_ms < election_timeout_max_ms"
        );
        anyhow::ensure!(
            self.suspect_after_ms < self.down_after_ms,
            "suspect_after_ms must be below down_after_ms"
        );
        anyhow::ensure!(
            0.0 < self.disk_low_watermark
                && self.disk_low_watermark < self.disk_high_watermark
                && self.disk_high_watermark <= 1.0,
            "need 0 < disk_low_watermark < disk_high_watermark <= 1"
        );
        self.limits()?;
        Ok(())
    }

    /// The limits this member enforces: the defaults with `limits` applied.
    pub fn limits(&self) -> anyhow::Result<shoal_proto::limits::Limits> {
        shoal_proto::limits::Limits::from_pairs(&self.limits).map_err(anyhow::Error::msg)
    }

    pub fn raft_config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "shoal-coordinator".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            install_snapshot_timeout: 2_000,
            ..Default::default()
        }
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }
}
