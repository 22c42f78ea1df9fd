//! The fault-test harness. `Cluster::start` runs three `shoal coordinator`s and N
//! `shoal node`s as processes on loopback; faults are signals to those processes
//! (SIGKILL, SIGSTOP/SIGCONT; later kinds plug in beside them). A `Workload` ingests
//! while recording every request's outcome (acknowledged, failed, unknown); a
//! `QueryLoop` searches meanwhile and records every answer. Tests then check the
//! cluster's final state against the record.
//!
//! The `shoal` binary is found beside the test executable's directory (cargo builds
//! it for the workspace's tests), or at `$SHOAL_BIN`.

pub mod netns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_cli::layout::{Layout, MEMBERS};
use shoal_proto::auth::Authed;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_client::ShoalClient;

pub const DIM: usize = 8;

/// Long runs (`SHOAL_CHAOS_SOAK=1`): more faults, more data.
pub fn soak() -> bool {
    std::env::var_os("SHOAL_CHAOS_SOAK").is_some_and(|v| v != "0")
}

pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/shoal
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("shoal"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p shoal) or set SHOAL_BIN",
        bin.display()
    );
    bin
}

pub use shoal_coordinator::testing::{eventually, free_port};

/// A deterministic, distinct vector per document number.
pub fn vector(i: u64) -> Vec<f32> {
    (0..DIM as u64)
        .map(|j| {
            let x = (i.wrapping_mul(2654435761).wrapping_add(j * 40503)) % 10007;
            x as f32 / 10007.0 - 0.5
        })
        .collect()
}

pub fn doc_id(i: u64) -> String {
    format!("doc-{i:06}")
}

pub struct Proc {
    pub id: String,
    /// Runs the binary through this (`ip netns exec NS`), when set.
    prefix: Vec<String>,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    pub public: String,
    /// The process's Prometheus endpoint.
    pub metrics: String,
}

impl Proc {
    fn start(
        bin: &Path,
        id: &str,
        prefix: Vec<String>,
        args: Vec<String>,
        log: PathBuf,
        public: &str,
        metrics: &str,
    ) -> Proc {
        let mut p = Proc::new(id, prefix, args, log, public, metrics);
        p.spawn(bin);
        p
    }

    /// A process not yet started.
    fn new(
        id: &str,
        prefix: Vec<String>,
        args: Vec<String>,
        log: PathBuf,
        public: &str,
        metrics: &str,
    ) -> Proc {
        Proc {
            id: id.to_string(),
            prefix,
            args,
            log,
            child: None,
            public: public.to_string(),
            metrics: metrics.to_string(),
        }
    }

    fn spawn(&mut self, bin: &Path) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        self.child = Some(
            cmd.args(&self.args)
                .env("RUST_LOG", "info,openraft=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(f)
                .spawn()
                .expect("spawning shoal"),
        );
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The running process's pid (for a signal sent from a watcher thread).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    /// The processes' names, addresses and flags (the layout `shoal dev` uses too).
    pub layout: Layout,
    pub coordinators: Vec<String>,
    coords: Vec<Proc>,
    pub nodes: Vec<Proc>,
    /// Whether the processes run with TLS and with API keys ([`Spec`]).
    tls: bool,
    keys: bool,
    /// The network namespaces, when the spec asked for them. Declared last: dropped
    /// after the processes are killed.
    pub net: Option<netns::Net>,
}

/// Liveness timeouts of the test cluster (the coordinators' flags).
pub const SUSPECT_MS: u64 = 1_500;
pub const DOWN_MS: u64 = 3_000;

/// What [`Cluster::start_spec`] starts.
#[derive(Clone, Debug)]
pub struct Spec {
    pub nodes: usize,
    pub suspect_ms: u64,
    pub down_ms: u64,
    /// Extra flags for every coordinator member.
    pub coordinator_flags: Vec<String>,
    /// Wait for every node to be up before returning.
    pub wait_up: bool,
    /// Each process in its own network namespace ([`netns::Net`]: hosts 0-2 the
    /// coordinator members, then the nodes), so tests can cut links.
    pub netns: bool,
    /// The last this many nodes are laid out but not started ([`Cluster::restart`]
    /// starts one: a node added to a running cluster).
    pub held_back: usize,
    /// Every process with TLS (the test process's CA, [`test_security`]; mutual TLS
    /// on the internal ports), and this test process's connections too (the default:
    /// a test binary's clusters all run with TLS, or all without).
    pub tls: bool,
    /// API keys on: every process takes the test process's root key, which this
    /// process's clients carry (the default).
    pub keys: bool,
}

/// The test process's CA and root key: its clients' TLS and key are set once per
/// process, so every cluster it starts shares them. Made on first use, when this
/// process's clients start using them.
pub fn test_security() -> &'static (shoal_proto::tls::dev::Ca, String) {
    static SECURITY: std::sync::OnceLock<(shoal_proto::tls::dev::Ca, String)> =
        std::sync::OnceLock::new();
    SECURITY.get_or_init(|| {
        let ca = shoal_proto::tls::dev::Ca::new("shoal test CA").expect("making the test CA");
        let root = shoal_proto::auth::generate_root();
        let dir = client_dir();
        ca.write(&dir, &["client"])
            .expect("writing the test client's certificate");
        let f = shoal_proto::tls::TlsFiles::in_dir(&dir, "client");
        shoal_proto::tls::use_for_clients(
            shoal_proto::tls::client_config(&f.ca, Some((&f.cert, &f.key)), None)
                .expect("the test's client certificate"),
        );
        shoal_proto::auth::use_key(root.clone());
        (ca, root)
    })
}

/// Where [`test_security`] writes this test process's client certificate.
fn client_dir() -> PathBuf {
    std::env::temp_dir().join(format!("shoal-test-client-{}", std::process::id()))
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            nodes: 3,
            suspect_ms: SUSPECT_MS,
            down_ms: DOWN_MS,
            coordinator_flags: Vec::new(),
            wait_up: true,
            netns: false,
            held_back: 0,
            tls: true,
            keys: true,
        }
    }
}

impl Cluster {
    /// Three coordinators and `nodes` nodes (vectors only, no encoder).
    pub async fn start(nodes: usize) -> Cluster {
        Self::start_with(nodes, DOWN_MS).await
    }

    /// As [`Cluster::start`], declaring a silent node down after `down_ms`.
    pub async fn start_with(nodes: usize, down_ms: u64) -> Cluster {
        Self::start_full(nodes, down_ms, &[]).await
    }

    /// As [`Cluster::start_with`], with extra flags for every coordinator member.
    pub async fn start_full(nodes: usize, down_ms: u64, coordinator_args: &[&str]) -> Cluster {
        Self::start_spec(Spec {
            nodes,
            down_ms,
            coordinator_flags: coordinator_args.iter().map(|s| s.to_string()).collect(),
            ..Spec::default()
        })
        .await
    }

    pub async fn start_spec(spec: Spec) -> Cluster {
        let bin = shoal_bin();
        let mut dir = tempfile::tempdir().unwrap();
        // SHOAL_CHAOS_KEEP=1 keeps the cluster's directory (logs, data) for a post-mortem.
        if std::env::var_os("SHOAL_CHAOS_KEEP").is_some_and(|v| v != "0") {
            dir.disable_cleanup(true);
            eprintln!("cluster dir kept: {}", dir.path().display());
        }
        let net = spec.netns.then(|| {
            netns::Net::new(MEMBERS + spec.nodes)
                .unwrap_or_else(|e| panic!("making the test's network namespaces: {e}"))
        });
        let mut layout = match &net {
            Some(n) => {
                let hosts: Vec<String> = (0..MEMBERS + spec.nodes).map(|i| n.host(i)).collect();
                Layout::on_hosts(dir.path(), &hosts[..MEMBERS], &hosts[MEMBERS..])
            }
            None => Layout::on_ports(dir.path(), spec.nodes, free_port),
        };
        let prefix = |i: usize| net.as_ref().map(|n| n.exec_prefix(i)).unwrap_or_default();
        layout.coordinator_flags = [
            "--suspect-after-ms".to_string(),
            spec.suspect_ms.to_string(),
            "--down-after-ms".into(),
            spec.down_ms.to_string(),
            // Placement must not depend on how full the host running the tests is
            // (`shoal_coordinator::testing::member_config`): a node's own small volume
            // (the full-disk tests' tmpfs) is what the reserve tests use.
            "--disk-low-watermark".into(),
            "0.98".into(),
            "--disk-high-watermark".into(),
            "0.99".into(),
        ]
        .into_iter()
        .chain(spec.coordinator_flags.iter().cloned())
        .collect();
        if spec.tls || spec.keys {
            let (ca, root) = test_security();
            if spec.tls {
                layout
                    .make_tls_with(ca)
                    .expect("making the test's certificates");
            }
            if spec.keys {
                layout.make_keys_with(root).expect("writing the root key");
            }
        }
        layout.insecure = !(spec.tls && spec.keys);
        // A backup that lags its primary 1 s leaves the in-sync set (3 s by default).
        layout.node_flags = ["--heartbeat-ms", "250", "--in-sync-lag-ms", "1000"]
            .map(String::from)
            .to_vec();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let coords = (0..layout.coordinators.len())
            .map(|k| {
                let c = &layout.coordinators[k];
                Proc::start(
                    &bin,
                    &c.name,
                    prefix(k),
                    layout.coordinator_args(k),
                    layout.log(&c.name),
                    &c.api,
                    &c.metrics,
                )
            })
            .collect();
        let started = spec.nodes - spec.held_back;
        let nodes = (0..layout.nodes.len())
            .map(|j| {
                let n = &layout.nodes[j];
                let mut p = Proc::new(
                    &n.id,
                    prefix(MEMBERS + j),
                    layout.node_args(j),
                    layout.log(&n.id),
                    &n.public,
                    &n.metrics,
                );
                if j < started {
                    p.spawn(&bin);
                }
                p
            })
            .collect();
        let c = Cluster {
            dir,
            bin,
            coordinators: layout.coordinator_addrs(),
            layout,
            coords,
            nodes,
            tls: spec.tls,
            keys: spec.keys,
            net,
        };
        if spec.wait_up {
            c.wait_up(started, Duration::from_secs(60)).await;
        }
        c
    }

    /// A `shoal` client command (`import`, `collection`, ...) aimed at this cluster:
    /// its coordinators, its first node as the gateway, and this test process's client
    /// certificate and root key when the cluster runs with them.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("SHOAL_COORDINATORS", self.coordinators.join(","))
            .env("SHOAL_NODE", &self.nodes[0].public);
        if self.tls {
            let f = shoal_proto::tls::TlsFiles::in_dir(&client_dir(), "client");
            c.env("SHOAL_TLS_CA", f.ca)
                .env("SHOAL_TLS_CERT", f.cert)
                .env("SHOAL_TLS_KEY", f.key);
        }
        if self.keys {
            c.env("SHOAL_API_KEY", &test_security().1);
        }
        c
    }

    pub fn admin(&self) -> Client {
        let mut c = Client::new(self.coordinators.clone());
        c.patience = Duration::from_secs(30);
        c
    }

    /// The nodes as the coordinators hold them.
    pub async fn list_nodes(&self) -> Result<Vec<cpb::NodeInfo>, tonic::Status> {
        self.admin()
            .admin(|mut a| async move { a.list_nodes(cpb::ListNodesRequest {}).await })
            .await
            .map(|r| r.into_inner().nodes)
    }

    /// Public addresses of every node but the `i`th.
    pub fn gateways_except(&self, i: usize) -> Vec<String> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n.public.clone())
            .collect()
    }

    pub async fn wait_up(&self, n: usize, within: Duration) {
        eventually(within, format!("{n} nodes up"), || async {
            let nodes = self.list_nodes().await.ok()?;
            let up = nodes
                .iter()
                .filter(|n| n.state == cpb::NodeState::Up as i32)
                .count();
            (up >= n).then_some(())
        })
        .await
    }

    pub async fn create_collection(&self, name: &str, shards: u32, rf: u32) {
        self.create_collection_with_quorum(name, shards, rf, 0)
            .await
    }

    /// A collection that writes with at least `write_quorum` in-sync replicas (0: the
    /// default, 2 at RF >= 2).
    pub async fn create_collection_with_quorum(
        &self,
        name: &str,
        shards: u32,
        rf: u32,
        write_quorum: u32,
    ) {
        // Retried while too few nodes are up: a node restarted a moment ago may still
        // be up in the map from before, then re-register (joining) as the create lands.
        let t = Instant::now();
        loop {
            match self
                .try_create_collection(name, shards, rf, write_quorum)
                .await
            {
                Ok(()) => return,
                Err(e)
                    if e.code() == tonic::Code::FailedPrecondition
                        && e.message().contains("node(s) up")
                        && t.elapsed() < Duration::from_secs(30) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("create collection: {e:?}"),
            }
        }
    }

    async fn try_create_collection(
        &self,
        name: &str,
        shards: u32,
        rf: u32,
        write_quorum: u32,
    ) -> Result<(), tonic::Status> {
        let mut admin = self.admin();
        let name = name.to_string();
        admin
            .admin(|mut c| {
                let name = name.clone();
                async move {
                    c.create_collection(cpb::CreateCollectionRequest {
                        name,
                        dimension: DIM as u32,
                        metric: cpb::Metric::L2 as i32,
                        shard_count: shards,
                        replication_factor: rf,
                        write_quorum,
                        index: Some(cpb::IndexParams {
                            nlist: 4,
                            pq_m: 4,
                            pq_nbits: 4,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                }
            })
            .await
            .map(|_| ())
    }

    /// The id the map gave `collection` (replica calls name it).
    pub async fn collection_id(&self, collection: &str) -> u64 {
        let name = collection.to_string();
        self.admin()
            .admin(|mut a| {
                let name = name.clone();
                async move {
                    a.describe_collection(cpb::DescribeCollectionRequest { name })
                        .await
                }
            })
            .await
            .expect("describe collection")
            .into_inner()
            .collection
            .expect("collection")
            .id
    }

    /// Each node's internal (replica service) address, by node id.
    pub async fn internal_addrs(&self) -> std::collections::HashMap<String, String> {
        self.list_nodes()
            .await
            .expect("list nodes")
            .into_iter()
            .map(|n| (n.id, n.addr))
            .collect()
    }

    /// The shards of `collection` with replica reports, from the leader.
    pub async fn shards(&self, collection: &str) -> Vec<cpb::Shard> {
        let mut admin = self.admin();
        let st = admin
            .admin(|mut c| async move { c.cluster_status(cpb::ClusterStatusRequest {}).await })
            .await
            .expect("status")
            .into_inner();
        let mut leader = Client::new(vec![st.leader_api_addr]);
        let name = collection.to_string();
        leader
            .admin(|mut c| {
                let collection = name.clone();
                async move { c.list_shards(cpb::ListShardsRequest { collection }).await }
            })
            .await
            .expect("list shards")
            .into_inner()
            .shards
    }

    /// One shard of `collection`, with replica reports.
    pub async fn shard(&self, collection: &str, index: u32) -> cpb::Shard {
        self.shards(collection)
            .await
            .into_iter()
            .find(|s| s.index == index)
            .unwrap_or_else(|| panic!("{collection} has no shard {index}"))
    }

    /// Waits until every shard has `rf` serving replicas on up nodes, all caught up.
    pub async fn wait_replicated(&self, collection: &str, rf: usize, within: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let nodes = self.list_nodes().await.unwrap_or_default();
            let up: Vec<&str> = nodes
                .iter()
                .filter(|n| n.state == cpb::NodeState::Up as i32)
                .map(|n| n.id.as_str())
                .collect();
            let shards = self.shards(collection).await;
            let ok = !shards.is_empty()
                && shards.iter().all(|s| {
                    s.replicas
                        .iter()
                        .filter(|r| {
                            r.state == cpb::ReplicaState::Serving as i32
                                && up.contains(&r.node_id.as_str())
                                && r.lag == 0
                        })
                        .count()
                        >= rf
                });
            if ok {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < within,
                "{collection} not back at {rf} replicas within {within:?}: {shards:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the coordinators hold node `id` in `state`.
    pub async fn wait_node_state(&self, id: &str, state: cpb::NodeState, within: Duration) {
        eventually(within, format!("node {id} {state:?}"), || async {
            let nodes = self.list_nodes().await.ok()?;
            nodes
                .iter()
                .any(|n| n.id == id && n.state == state as i32)
                .then_some(())
        })
        .await
    }

    pub fn node_index(&self, id: &str) -> usize {
        self.nodes.iter().position(|n| n.id == id).expect("node id")
    }

    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGTERM (a clean shutdown) and wait for the process to exit; returns when it
    /// did, or SIGKILLs it after `within`.
    pub async fn terminate(&mut self, i: usize, within: Duration) -> Duration {
        stop(&mut self.nodes[i], within).await
    }

    /// Coordinator `k`'s (0-based) data dir.
    pub fn coordinator_dir(&self, k: usize) -> PathBuf {
        self.layout.data_dir(&self.coords[k].id)
    }

    /// SIGTERMs coordinator `k` and waits for it to exit (SIGKILL after `within`).
    pub async fn stop_coordinator(&mut self, k: usize, within: Duration) -> Duration {
        stop(&mut self.coords[k], within).await
    }

    /// SIGKILLs coordinator `k` and reaps it.
    pub fn kill_coordinator(&mut self, k: usize) {
        self.coords[k].kill();
    }

    /// Whether coordinator `k`'s process has exited (it was started and is gone).
    pub fn coordinator_exited(&mut self, k: usize) -> bool {
        self.coords[k]
            .child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn start_coordinator(&mut self, k: usize) {
        assert!(!self.coords[k].running());
        let bin = self.bin.clone();
        self.coords[k].spawn(&bin);
    }

    /// Coordinator `k`'s own status (its map version and applied log index).
    pub async fn coordinator_status(&self, k: usize) -> Option<cpb::ClusterStatusResponse> {
        let ch = shoal_proto::endpoint(&self.coordinators[k])
            .ok()?
            .connect()
            .await
            .ok()?;
        shoal_proto::coordinator::admin_client::AdminClient::with_interceptor(
            ch,
            shoal_proto::auth::Attach::process(),
        )
        .cluster_status(cpb::ClusterStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
    }
}

/// SIGTERM a process and wait for it to exit; SIGKILL after `within`.
async fn stop(p: &mut Proc, within: Duration) -> Duration {
    {
        let t = Instant::now();
        p.signal(libc::SIGTERM);
        if let Some(mut c) = p.child.take() {
            while t.elapsed() < within {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return t.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        t.elapsed()
    }
}

impl Cluster {
    pub fn restart(&mut self, i: usize) {
        assert!(!self.nodes[i].running());
        let bin = self.bin.clone();
        self.nodes[i].spawn(&bin);
    }

    /// Node `i`'s data dir.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.layout.data_dir(&self.nodes[i].id)
    }

    /// Coordinator member `k`'s log so far.
    pub fn coordinator_log(&self, k: usize) -> String {
        std::fs::read_to_string(&self.coords[k].log).unwrap_or_default()
    }

    /// Node `i`'s log so far.
    pub fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// Points node `i` (when next started) at other coordinators, with extra flags.
    pub fn set_node_args(&mut self, i: usize, coordinators: &[String], extra: &[&str]) {
        let args = &mut self.nodes[i].args;
        let at = args.iter().position(|a| a == "--coordinators").unwrap() + 1;
        args[at] = coordinators.join(",");
        args.retain(|a| a != "--accept-cluster-id" && !a.starts_with("accept:"));
        args.extend(extra.iter().map(|s| s.to_string()));
    }

    /// Waits up to `within` for node `i`'s process to exit on its own; its status.
    pub async fn wait_exit(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.nodes[i].child = None;
                    return Some(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The sum of a counter or gauge over its label sets, scraped from node `i`'s
    /// Prometheus endpoint (0 when the node has not recorded it yet).
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        scrape(&self.nodes[i].metrics, name).await
    }

    /// As [`Cluster::metric`], from coordinator `i`.
    pub async fn coordinator_metric(&self, i: usize, name: &str) -> f64 {
        scrape(&self.coords[i].metrics, name).await
    }

    pub fn pause(&self, i: usize) {
        self.nodes[i].signal(libc::SIGSTOP);
    }

    pub fn resume(&self, i: usize) {
        self.nodes[i].signal(libc::SIGCONT);
    }

    /// Public addresses of the nodes whose processes run.
    pub fn running_nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| n.public.clone())
            .collect()
    }

    pub fn all_nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.public.clone()).collect()
    }
}

pub async fn connect(addr: &str) -> Option<ShoalClient<Authed>> {
    // TLS and the key when the cluster has them (`Spec::tls`, `Spec::keys`).
    let ch = shoal_proto::endpoint(addr)
        .ok()?
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .ok()?;
    Some(shoal_proto::auth::shoal_client(ch))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Acknowledged,
    /// Refused with a status saying nothing was written.
    Failed,
    /// Timed out or lost with the connection: may or may not have been applied.
    Unknown,
}

/// Every ingest request's outcome, by batch: (first doc number, count) -> outcome.
#[derive(Default)]
pub struct Record {
    pub batches: Vec<((u64, u64), Outcome)>,
    pub attempts: u64,
    pub retries: u64,
}

impl Record {
    pub fn acknowledged_docs(&self) -> Vec<u64> {
        self.batches
            .iter()
            .filter(|(_, o)| *o == Outcome::Acknowledged)
            .flat_map(|((first, n), _)| *first..first + n)
            .collect()
    }
}

/// Ingests batches of `per_batch` vector documents, each with its own request id,
/// through whichever node answers, until `batches` are done or `until` is set (after
/// `min_batches`); a batch is retried (same id) until acknowledged or `patience` runs
/// out.
pub async fn ingest(
    nodes: Arc<Mutex<Vec<String>>>,
    collection: String,
    first_batch: u64,
    batches: u64,
    per_batch: u64,
    patience: Duration,
    until: Arc<AtomicBool>,
) -> Record {
    let mut rec = Record::default();
    let mut turn = 0usize;
    for b in first_batch..first_batch.saturating_add(batches) {
        if until.load(Ordering::Relaxed) {
            break;
        }
        let first = b * per_batch;
        let req = pb::IngestRequest {
            collection: collection.to_string(),
            documents: (first..first + per_batch)
                .map(|i| pb::Document {
                    id: doc_id(i),
                    vector: vector(i),
                    ..Default::default()
                })
                .collect(),
            request_id: format!("batch-{b}"),
        };
        let t = Instant::now();
        let mut outcome = Outcome::Unknown;
        loop {
            let addrs = nodes.lock().unwrap().clone();
            turn += 1;
            let addr = &addrs[turn % addrs.len()];
            rec.attempts += 1;
            let r = match connect(addr).await {
                Some(mut c) => c.ingest(req.clone()).await.map(|_| ()),
                None => Err(tonic::Status::unavailable("connect failed")),
            };
            match r {
                Ok(()) => {
                    outcome = Outcome::Acknowledged;
                    break;
                }
                Err(e) if e.code() == tonic::Code::InvalidArgument => {
                    outcome = Outcome::Failed;
                    break;
                }
                Err(_) if t.elapsed() < patience => {
                    rec.retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => break,
            }
        }
        rec.batches.push(((first, per_batch), outcome));
    }
    rec
}

/// Concurrent writers, each ingesting batches of its own documents (writer `w` from
/// document `w * 1_000_000`) through whichever of `gateways` answers, every batch
/// retried with its request id for up to 30 s, until [`Writers::finish`].
pub struct Writers {
    until: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Record>>,
}

/// What the writers did: the documents acknowledged, batches sent, and batches never
/// acknowledged (failed or unknown).
pub struct Written {
    pub docs: Vec<u64>,
    pub batches: usize,
    pub not_acknowledged: usize,
}

impl Writers {
    pub fn start(gateways: Vec<String>, collection: &str, writers: u64, per_batch: u64) -> Self {
        let gateways = Arc::new(Mutex::new(gateways));
        let until = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|w| {
                tokio::spawn(ingest(
                    gateways.clone(),
                    collection.to_string(),
                    w * 1_000_000 / per_batch,
                    1_000_000 / per_batch,
                    per_batch,
                    Duration::from_secs(30),
                    until.clone(),
                ))
            })
            .collect();
        Self { until, tasks }
    }

    /// Stops the writers after the batch each has in flight, and tallies.
    pub async fn finish(self) -> Written {
        self.until.store(true, Ordering::Relaxed);
        let mut w = Written {
            docs: Vec::new(),
            batches: 0,
            not_acknowledged: 0,
        };
        for t in self.tasks {
            let rec = t.await.expect("writer");
            w.batches += rec.batches.len();
            w.not_acknowledged += rec
                .batches
                .iter()
                .filter(|(_, o)| *o != Outcome::Acknowledged)
                .count();
            w.docs.extend(rec.acknowledged_docs());
        }
        w
    }
}

/// Outcomes of a query loop.
#[derive(Default, Clone)]
pub struct QueryStats {
    pub ok: u64,
    pub partial: u64,
    pub failed: u64,
    pub latencies_ms: Vec<f64>,
    /// The first few errors, for the report.
    pub errors: Vec<String>,
}

impl QueryStats {
    pub fn total(&self) -> u64 {
        self.ok + self.partial + self.failed
    }

    /// Queries answered in full.
    pub fn success_rate(&self) -> f64 {
        self.ok as f64 / self.total().max(1) as f64
    }

    pub fn p99_ms(&self) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(f64::total_cmp);
        v.get(((v.len().max(1) - 1) as f64 * 0.99).round() as usize)
            .copied()
            .unwrap_or(0.0)
    }
}

/// Searches continuously (one client, a node at a time; a node that cannot be
/// reached is skipped, as a client with a list of nodes would), recording outcomes
/// into `stats` until `stop`.
pub async fn query_loop(
    nodes: Arc<Mutex<Vec<String>>>,
    collection: String,
    stats: Arc<Mutex<QueryStats>>,
    stop: Arc<AtomicBool>,
) {
    let mut turn = 0u64;
    let mut clients: HashMap<String, ShoalClient<Authed>> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let addrs = nodes.lock().unwrap().clone();
        let t = Instant::now();
        let mut result = None;
        let mut error = String::from("no node reachable");
        for k in 0..addrs.len() {
            let addr = &addrs[(turn as usize + k) % addrs.len()];
            if !clients.contains_key(addr) {
                match connect(addr).await {
                    Some(c) => {
                        clients.insert(addr.clone(), c);
                    }
                    None => continue,
                }
            }
            let c = clients.get_mut(addr).expect("client");
            let mut req = tonic::Request::new(pb::SearchRequest {
                collection: collection.clone(),
                vector: vector(turn % 5000),
                k: 10,
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(5));
            match c.search(req).await {
                Ok(r) => {
                    result = Some(r.into_inner().partial);
                    break;
                }
                // The gateway is gone (refused, or killed mid-request: hyper reports a
                // connection closed under an in-flight call as Cancelled): next node.
                Err(e)
                    if matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    error = format!("{addr}: {:?}: {}", e.code(), e.message());
                    clients.remove(addr);
                }
                Err(e) => {
                    error = format!("{addr}: {:?}: {}", e.code(), e.message());
                    result = None;
                    break;
                }
            }
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        {
            let mut s = stats.lock().unwrap();
            match result {
                Some(false) => s.ok += 1,
                Some(true) => s.partial += 1,
                None => {
                    s.failed += 1;
                    if s.errors.len() < 5 {
                        s.errors.push(error);
                    }
                }
            }
            s.latencies_ms.push(ms);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Outcomes of a verifying query loop.
#[derive(Default, Clone, Debug)]
pub struct VerifyStats {
    /// Complete answers that found the acknowledged document searched for.
    pub complete: u64,
    /// Answers that said they were partial (missing shards named).
    pub partial: u64,
    /// Refused or unreachable.
    pub failed: u64,
    /// Complete answers (partial = false) that missed an acknowledged document: the
    /// cluster served an incomplete answer silently. Must stay 0.
    pub silent_misses: Vec<String>,
}

/// Searches, exactly and continuously, for documents already acknowledged (from
/// `acked`), through the `nodes` in turn: an answer that claims completeness but does
/// not return the document is recorded as a silent miss.
pub async fn verify_loop(
    nodes: Arc<Mutex<Vec<String>>>,
    collection: String,
    acked: Arc<Mutex<Vec<u64>>>,
    stats: Arc<Mutex<VerifyStats>>,
    stop: Arc<AtomicBool>,
) {
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let doc = {
            let a = acked.lock().unwrap();
            if a.is_empty() {
                None
            } else {
                Some(a[(turn.wrapping_mul(2654435761) % a.len() as u64) as usize])
            }
        };
        let Some(doc) = doc else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let addrs = nodes.lock().unwrap().clone();
        let addr = addrs[turn as usize % addrs.len()].clone();
        let outcome = match connect(&addr).await {
            None => None,
            Some(mut c) => {
                let mut req = tonic::Request::new(pb::SearchRequest {
                    collection: collection.clone(),
                    vector: vector(doc),
                    k: 1,
                    exact: true,
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(5));
                c.search(req).await.ok().map(|r| r.into_inner())
            }
        };
        {
            let mut s = stats.lock().unwrap();
            match outcome {
                None => s.failed += 1,
                Some(r) if r.partial => s.partial += 1,
                // The document, or one with the same vector (vectors repeat with the
                // document number modulo 10007).
                Some(r)
                    if r.hits.first().is_some_and(|h| {
                        h.id == doc_id(doc)
                            || h.id
                                .strip_prefix("doc-")
                                .and_then(|n| n.parse::<u64>().ok())
                                .is_some_and(|n| vector(n) == vector(doc))
                    }) =>
                {
                    s.complete += 1
                }
                Some(r) => {
                    let got = r.hits.first().map(|h| h.id.clone()).unwrap_or_default();
                    s.silent_misses.push(format!(
                        "{addr}: {} answered complete with {got:?}",
                        doc_id(doc)
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks every acknowledged document through `node`: present, with its exact vector.
/// Returns the number checked.
pub async fn check_acknowledged(node: &str, collection: &str, docs: &[u64]) -> usize {
    let mut c = connect(node).await.expect("connect for the final check");
    for &i in docs {
        let r = c
            .get(pb::GetRequest {
                collection: collection.to_string(),
                id: doc_id(i),
                with_vector: true,
            })
            .await
            .unwrap_or_else(|e| panic!("get {}: {e:?}", doc_id(i)))
            .into_inner();
        assert!(r.found, "acknowledged document {} lost", doc_id(i));
        let d = r.document.expect("document");
        assert_eq!(
            d.vector,
            vector(i),
            "document {} has a wrong vector",
            doc_id(i)
        );
    }
    docs.len()
}

/// Live documents per shard, from the primaries' reports (each document once).
pub fn live_docs(shards: &[cpb::Shard]) -> u64 {
    shards
        .iter()
        .map(|s| {
            s.replicas
                .iter()
                .find(|r| r.node_id == s.primary)
                .map_or(0, |r| r.live_docs)
        })
        .sum()
}

/// Prints a fault test's figures as one JSON line, with the query loop's outcomes
/// before and during the fault.
pub fn report(mut v: serde_json::Value, before: &QueryStats, during: &QueryStats) {
    v["queries_before"] = before.total().into();
    v["p99_ms_before"] = before.p99_ms().into();
    v["queries_during"] = during.total().into();
    v["success_rate_during"] = during.success_rate().into();
    v["partial_during"] = during.partial.into();
    v["failed_during"] = during.failed.into();
    v["p99_ms_during"] = during.p99_ms().into();
    println!("{v}");
}

/// The sum of a metric over its label sets from the Prometheus endpoint at `addr`
/// (0 when the process has not recorded it yet). `name` may carry labels
/// (`name{label="value"}`) to pick one series.
pub async fn scrape(addr: &str, name: &str) -> f64 {
    scrape_text(addr)
        .await
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// A Prometheus endpoint's whole text (GET /metrics over HTTP/1.0).
pub async fn scrape_text(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("metrics endpoint {addr}: {e}"));
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}
