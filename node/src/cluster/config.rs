//! A node's settings: the one place their defaults live. `shoal node` reads them from
//! a TOML file (`--config`, the field names below; durations as `*_ms` / `*_secs`,
//! limits as `NAME=VALUE` pairs), then lets flags and `SHOAL_*` variables override
//! any of them; tests and embedders build a [`NodeConfig`] over its `Default`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use shoal_encoder::pool::PoolConfig;
use shoal_encoder::Device;
use shoal_proto::limits::Limits;

use super::{disk, replication};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Stable node id (survives restarts; the map's replicas name it).
    pub id: String,
    /// Public gRPC address (the `Shoal` API).
    pub listen: String,
    /// Internal gRPC address (replica traffic from other nodes' gateways).
    pub internal_listen: String,
    /// The internal address other nodes dial (registered in the map), e.g. a pod's DNS
    /// name; None: the bound internal address, which must then not be a wildcard.
    pub advertise_addr: Option<String>,
    pub coordinators: Vec<String>,
    pub data_dir: PathBuf,
    /// Sentence-transformers model dir; None: this node takes vectors only.
    pub model_dir: Option<PathBuf>,
    /// More models this node encodes with (issue 21): a collection names its model by
    /// content hash, and is encoded by the one of this node's models that matches.
    #[serde(default)]
    pub extra_model_dirs: Vec<PathBuf>,
    /// Where the encoder runs (`cpu`, `cuda`, `cuda:N`); a node encoding on a GPU
    /// registers `Capacity.gpu`.
    #[serde(deserialize_with = "from_str")]
    pub encoder_device: Device,
    pub zone: String,
    /// Placement's capacity for this node; 0 = unknown (unbounded).
    pub memory_bytes: u64,
    /// How often the node reports to the coordinators (liveness, replica state).
    #[serde(rename = "heartbeat_ms", deserialize_with = "millis")]
    pub heartbeat: Duration,
    /// Every limit a client or peer can hit (`shoal_proto::limits`); in TOML, the
    /// ones over their defaults as `NAME=VALUE` strings.
    #[serde(deserialize_with = "limit_pairs")]
    pub limits: Limits,
    /// Texts the encoder queues before it turns callers away; a larger ingest is
    /// encoded in parts of this size.
    pub encoder_queue: usize,
    /// How long a replica directory the map no longer assigns here waits in
    /// `<data_dir>/trash` before it is removed.
    #[serde(rename = "trash_grace_secs", deserialize_with = "secs")]
    pub trash_grace: Duration,
    /// Search deadline when the caller sets none.
    #[serde(rename = "search_deadline_ms", deserialize_with = "millis")]
    pub search_deadline: Duration,
    /// Fresh rows that trigger a background index build per shard.
    pub auto_rebuild_tail: usize,
    /// Index builds this node runs at once (issue 18's admission control).
    pub build_slots: usize,
    /// Share of the time a re-embed's fill encodes on this node (issue 21; the rest it
    /// rests, so queries keep their latency), 0 < duty <= 1.
    pub reembed_duty: f64,
    /// A primary compacts its shard on its own once dead rows (replaced or deleted
    /// versions) are at least this share of its rows (issue 19); 0 = only when asked.
    pub compact_dead_ratio: f64,
    /// ... and at least this many.
    pub compact_min_dead_rows: u64,
    /// Memory the builds running at once may hold (estimated before each starts); a
    /// build that does not fit waits. 0 = a quarter of the machine's memory.
    pub build_memory_bytes: u64,
    /// Bytes of stored vectors the scrubber checks per second (issue 18: open does
    /// not read them; this finds a damaged one); 0 = off.
    pub scrub_bytes_per_sec: u64,
    /// Bytes a second this node's backups and restores read and write, all shards
    /// together (issue 20: a backup hashes and copies every byte, and on a small node
    /// that takes cores from queries); 0 = as fast as the disk goes.
    pub backup_bytes_per_sec: u64,
    /// Plaintext grpc.health only (for probes that speak no TLS); None: none.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Prometheus `/metrics` address; None: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on every port and every connection this node opens (issue 17): its
    /// certificate and key, and the cluster's CA; internal ports require a peer
    /// certificate from that CA. None: plaintext (unsafe outside a test).
    pub tls: Option<shoal_proto::tls::TlsFiles>,
    /// API keys (issue 17): the cluster's root key file; with it, every call of the
    /// public API needs a key with the role it names (the keys are in the map).
    pub root_key_file: Option<PathBuf>,
    /// The audit log's file (JSON lines): refused calls and index builds.
    pub audit_log: Option<PathBuf>,
    /// Cap on each hosted replica's recent log, the batches a backup that fell behind
    /// catches up from (beyond it: a whole-shard snapshot).
    pub recent_log_bytes: usize,
    /// An operator's word that this node's data now belongs to the cluster with this
    /// id (its coordinator group was rebuilt or restored under a new id); None: the
    /// node joins only the cluster its data dir names.
    pub accept_cluster_id: Option<String>,
    /// Writes are refused (RESOURCE_EXHAUSTED) while the data volume has less free
    /// space than this; 0 = never.
    pub disk_reserve_bytes: u64,
    /// A serving backup that has not caught up with its primary for this long leaves
    /// its shard's in-sync set (the primary reports it), so writes stop waiting for it.
    #[serde(rename = "in_sync_lag_ms", deserialize_with = "millis")]
    pub in_sync_lag: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "node-1".into(),
            listen: "127.0.0.1:7201".into(),
            internal_listen: "127.0.0.1:7301".into(),
            advertise_addr: None,
            coordinators: vec![
                "127.0.0.1:7001".into(),
                "127.0.0.1:7002".into(),
                "127.0.0.1:7003".into(),
            ],
            data_dir: PathBuf::from("data/node-1"),
            model_dir: None,
            extra_model_dirs: Vec::new(),
            encoder_device: Device::Cpu,
            zone: String::new(),
            memory_bytes: 0,
            heartbeat: Duration::from_millis(1000),
            limits: Limits::default(),
            encoder_queue: PoolConfig::default().max_queue,
            trash_grace: Duration::from_secs(24 * 3600),
            search_deadline: Duration::from_secs(5),
            auto_rebuild_tail: 50_000,
            build_slots: 1,
            reembed_duty: 0.5,
            compact_dead_ratio: 0.5,
            compact_min_dead_rows: 100_000,
            build_memory_bytes: 0,
            scrub_bytes_per_sec: 32 << 20,
            backup_bytes_per_sec: 0,
            metrics_listen: None,
            health_listen: None,
            tls: None,
            root_key_file: None,
            audit_log: None,
            recent_log_bytes: replication::RECENT_LOG_BYTES,
            accept_cluster_id: None,
            disk_reserve_bytes: disk::DEFAULT_RESERVE_BYTES,
            in_sync_lag: replication::LAG_TIMEOUT,
        }
    }
}

impl NodeConfig {
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Settings no node can run with, named.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.id.is_empty(), "id must not be empty");
        anyhow::ensure!(
            !self.coordinators.is_empty(),
            "coordinators must name at least one address"
        );
        anyhow::ensure!(
            self.heartbeat >= Duration::from_millis(10),
            "heartbeat_ms must be at least 10"
        );
        anyhow::ensure!(self.encoder_queue > 0, "encoder_queue must be at least 1");
        anyhow::ensure!(
            self.model_dir.is_some() || !self.encoder_device.is_gpu(),
            "encoder_device {} needs a model_dir",
            self.encoder_device
        );
        Ok(())
    }
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn limit_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
    Limits::from_pairs(&Vec::<String>::deserialize(d)?).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_what_it_names_and_defaults_fill_the_rest() {
        let c = NodeConfig::from_toml(
            r#"
            id = "n7"
            data_dir = "/var/lib/shoal"
            coordinators = ["c1:7001"]
            heartbeat_ms = 250
            trash_grace_secs = 60
            encoder_device = "cpu"
            limits = ["k=100"]
            "#,
        )
        .unwrap();
        assert_eq!(c.id, "n7");
        assert_eq!(c.heartbeat, Duration::from_millis(250));
        assert_eq!(c.trash_grace, Duration::from_secs(60));
        assert_eq!(c.limits.k, 100);
        let d = NodeConfig::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.search_deadline, d.search_deadline);
        assert_eq!(c.disk_reserve_bytes, d.disk_reserve_bytes);
        c.validate().unwrap();
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        let e = NodeConfig::from_toml("heartbeat = 5").unwrap_err();
        assert!(e.to_string().contains("unknown field `heartbeat`"), "{e}");
        let e = NodeConfig::from_toml(r#"limits = ["nope=1"]"#).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = NodeConfig::from_toml(r#"encoder_device = "tpu""#).unwrap_err();
        assert!(e.to_string().contains("cpu, cuda or cuda:N"), "{e}");
        let c = NodeConfig::from_toml(r#"encoder_device = "cuda""#).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("needs a model_dir"), "{e}");
    }
}
