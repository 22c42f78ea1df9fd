//! The process layout of a local cluster: three coordinator members and N nodes on
//! loopback, every process's name, addresses, directories and flags. One description
//! serves `shoal dev` (fixed, documented ports) and the multi-process test harness
//! (`shoal-chaos-tests`: free ports, names resolved as pods resolve theirs), so the two
//! cannot drift apart. Pure: it builds argument lists and paths; starting, signalling
//! and stopping the processes is the caller's.

use std::path::{Path, PathBuf};

/// One coordinator member's addresses.
#[derive(Clone, Debug)]
pub struct CoordinatorSlot {
    /// The Raft member id (1-based).
    pub id: u64,
    /// Its process name, data dir and log name under the layout's dir.
    pub name: String,
    pub api: String,
    pub raft: String,
    pub metrics: String,
}

/// One node's addresses.
#[derive(Clone, Debug)]
pub struct NodeSlot {
    /// The node id, also its process name, data dir and log name.
    pub id: String,
    pub public: String,
    pub internal: String,
    pub metrics: String,
}

#[derive(Clone, Debug)]
pub struct Layout {
    /// Everything (data dirs, logs) goes under here.
    pub dir: PathBuf,
    pub coordinators: Vec<CoordinatorSlot>,
    pub nodes: Vec<NodeSlot>,
    /// Processes name each other `localhost:PORT` (as pods do by DNS name) while
    /// listening on 127.0.0.1, so that name resolution is on the tested path.
    pub by_name: bool,
    /// Flags appended to every coordinator's (liveness timeouts, ...).
    pub coordinator_flags: Vec<String>,
    /// Flags appended to every node's (heartbeat period, model dir, ...).
    pub node_flags: Vec<String>,
    /// TLS (issue 17): a dir of certificates from [`Layout::make_tls`]; every process
    /// is given the CA and its own certificate.
    pub tls: Option<PathBuf>,
    /// API keys (issue 17): the root key's file from [`Layout::make_keys`]; every
    /// process is given it, and writes an audit log next to its log.
    pub root_key: Option<PathBuf>,
    /// Processes without TLS or keys are started with `--insecure`: set to say so
    /// (otherwise they refuse to start).
    pub insecure: bool,
}

/// The coordinator group's size: the layout is for the three-member group every
/// deployment runs.
pub const MEMBERS: usize = 3;

impl Layout {
    /// `shoal dev`'s layout: coordinators on 127.0.0.1:7001-7003 (Raft 7101-7103,
    /// metrics 9101-9103), nodes on 7201.. (internal 7301.., metrics 9201..).
    pub fn fixed(dir: &Path, nodes: usize) -> Layout {
        let local = vec!["127.0.0.1".to_string(); MEMBERS + nodes];
        Layout::on_hosts(dir, &local[..MEMBERS], &local[MEMBERS..])
    }

    /// `shoal dev`'s ports, each process on its own host address (the fault tests'
    /// network namespaces): coordinator `k` on `coordinators[k]`, node `j` on
    /// `nodes[j]`.
    pub fn on_hosts(dir: &Path, coordinators: &[String], nodes: &[String]) -> Layout {
        assert_eq!(coordinators.len(), MEMBERS, "a group of {MEMBERS} members");
        Layout::new(
            dir,
            coordinators
                .iter()
                .zip(1..)
                .map(|(h, k)| {
                    (
                        format!("{h}:{}", 7000 + k),
                        format!("{h}:{}", 7100 + k),
                        format!("{h}:{}", 9100 + k),
                    )
                })
                .collect(),
            nodes
                .iter()
                .zip(1..)
                .map(|(h, j)| {
                    (
                        format!("{h}:{}", 7200 + j),
                        format!("{h}:{}", 7300 + j),
                        format!("{h}:{}", 9200 + j),
                    )
                })
                .collect(),
            false,
        )
    }

    /// Every address on a port from `port` (the tests' free ports); processes name
    /// each other by host name.
    pub fn on_ports(dir: &Path, nodes: usize, mut port: impl FnMut() -> u16) -> Layout {
        let mut at = || format!("127.0.0.1:{}", port());
        let coordinators = (0..MEMBERS).map(|_| (at(), at(), at())).collect();
        let nodes = (0..nodes).map(|_| (at(), at(), at())).collect();
        Layout::new(dir, coordinators, nodes, true)
    }

    fn new(
        dir: &Path,
        coordinators: Vec<(String, String, String)>,
        nodes: Vec<(String, String, String)>,
        by_name: bool,
    ) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            coordinators: coordinators
                .into_iter()
                .zip(1u64..)
                .map(|((api, raft, metrics), id)| CoordinatorSlot {
                    id,
                    name: format!("coordinator-{id}"),
                    api,
                    raft,
                    metrics,
                })
                .collect(),
            nodes: nodes
                .into_iter()
                .zip(1..)
                .map(|((public, internal, metrics), j)| NodeSlot {
                    id: format!("node-{j}"),
                    public,
                    internal,
                    metrics,
                })
                .collect(),
            by_name,
            coordinator_flags: Vec::new(),
            node_flags: Vec::new(),
            tls: None,
            root_key: None,
            insecure: false,
        }
    }

    /// Makes a local CA under `dir/tls` and a certificate per process (for its name,
    /// its host, "localhost" and 127.0.0.1) and one for clients (`client`); from now
    /// on every process is started with TLS.
    pub fn make_tls(&mut self) -> std::io::Result<PathBuf> {
        let ca = shoal_proto::tls::dev::Ca::new("shoal local CA").map_err(std::io::Error::other)?;
        self.make_tls_with(&ca)
    }

    /// [`Layout::make_tls`] with a given CA (a test process's clusters share one, as its
    /// clients' TLS is set once per process).
    pub fn make_tls_with(&mut self, ca: &shoal_proto::tls::dev::Ca) -> std::io::Result<PathBuf> {
        let dir = self.dir.join("tls");
        ca.write(&dir, &["client"])?;
        let host = |addr: &str| addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
        let mut procs: Vec<(String, String)> = self
            .coordinators
            .iter()
            .map(|c| (c.name.clone(), host(&c.api)))
            .collect();
        procs.extend(self.nodes.iter().map(|n| (n.id.clone(), host(&n.public))));
        for (name, h) in procs {
            let leaf = ca.issue(&[&name, &h]).map_err(std::io::Error::other)?;
            shoal_proto::tls::dev::write_leaf(&dir, &name, &leaf)?;
        }
        self.tls = Some(dir.clone());
        Ok(dir)
    }

    /// Makes a root key in `dir/keys/root.key` (readable by its owner only); from now
    /// on every process is started with keys on. Returns the file.
    pub fn make_keys(&mut self) -> std::io::Result<PathBuf> {
        self.make_keys_with(&shoal_proto::auth::generate_root())
    }

    /// [`Layout::make_keys`] with a given root key.
    pub fn make_keys_with(&mut self, root: &str) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.dir.join("keys");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("root.key");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&file)?;
        std::io::Write::write_all(&mut f, format!("{root}\n").as_bytes())?;
        self.root_key = Some(file.clone());
        Ok(file)
    }

    /// A process's audit log (JSON lines), next to its log.
    pub fn audit_log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.audit.jsonl"))
    }

    /// `--tls-*`, `--root-key-file` and `--audit-log` flags for process `name` (or
    /// `--insecure`, when the layout says so).
    fn security_args(&self, name: &str) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(dir) = &self.tls {
            let f = shoal_proto::tls::TlsFiles::in_dir(dir, name);
            args.extend([
                "--tls-ca".into(),
                f.ca.display().to_string(),
                "--tls-cert".into(),
                f.cert.display().to_string(),
                "--tls-key".into(),
                f.key.display().to_string(),
            ]);
        }
        if let Some(k) = &self.root_key {
            args.extend([
                "--root-key-file".into(),
                k.display().to_string(),
                "--audit-log".into(),
                self.audit_log(name).display().to_string(),
            ]);
        }
        if self.insecure {
            args.push("--insecure".into());
        }
        args
    }

    /// An address as the other processes dial it.
    fn named(&self, addr: &str) -> String {
        if self.by_name {
            addr.replace("127.0.0.1", "localhost")
        } else {
            addr.to_string()
        }
    }

    /// The members' client addresses (what clients and nodes are given).
    pub fn coordinator_addrs(&self) -> Vec<String> {
        self.coordinators.iter().map(|c| c.api.clone()).collect()
    }

    /// The `--peers` value: `ID=RAFT/API,...`.
    pub fn peers(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| format!("{}={}/{}", c.id, self.named(&c.raft), self.named(&c.api)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A process's data dir (`name` is a member's or node's name).
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A process's log file.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Member `k`'s (0-based) `shoal` arguments.
    pub fn coordinator_args(&self, k: usize) -> Vec<String> {
        let c = &self.coordinators[k];
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--id".into(),
            c.id.to_string(),
            "--listen".into(),
            c.api.clone(),
            "--raft-listen".into(),
            c.raft.clone(),
            "--data-dir".into(),
            self.data_dir(&c.name).display().to_string(),
            "--peers".into(),
            self.peers(),
            "--metrics-listen".into(),
            c.metrics.clone(),
        ];
        args.extend(self.security_args(&c.name));
        args.extend(self.coordinator_flags.iter().cloned());
        args
    }

    /// Node `j`'s (0-based) `shoal` arguments.
    pub fn node_args(&self, j: usize) -> Vec<String> {
        let n = &self.nodes[j];
        let mut args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            n.id.clone(),
            "--listen".into(),
            n.public.clone(),
            "--internal-listen".into(),
            n.internal.clone(),
            "--advertise-addr".into(),
            self.named(&n.internal),
            "--coordinators".into(),
            self.coordinator_addrs().join(","),
            "--data-dir".into(),
            self.data_dir(&n.id).display().to_string(),
            "--metrics-listen".into(),
            n.metrics.clone(),
        ];
        args.extend(self.security_args(&n.id));
        args.extend(self.node_flags.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_layout_keeps_its_documented_ports() {
        let l = Layout::fixed(Path::new("/d"), 2);
        assert_eq!(
            l.peers(),
            "1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7102/127.0.0.1:7002,3=127.0.0.1:7103/127.0.0.1:7003"
        );
        let n = l.node_args(1);
        let flag = |f: &str| n[n.iter().position(|a| a == f).unwrap() + 1].clone();
        assert_eq!(flag("--id"), "node-2");
        assert_eq!(flag("--listen"), "127.0.0.1:7202");
        assert_eq!(flag("--advertise-addr"), "127.0.0.1:7302");
        assert_eq!(
            flag("--coordinators"),
            "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
        );
        assert_eq!(flag("--data-dir"), "/d/node-2");
        assert_eq!(
            l.log("coordinator-1"),
            Path::new("/d/logs/coordinator-1.log")
        );
    }

    #[test]
    fn a_test_layout_names_processes_by_host_and_appends_flags() {
        let mut next = 20_000;
        let mut l = Layout::on_ports(Path::new("/t"), 1, || {
            next += 1;
            next
        });
        l.coordinator_flags = vec!["--down-after-ms".into(), "3000".into()];
        let c = l.coordinator_args(0);
        assert_eq!(c[c.len() - 2..], ["--down-after-ms", "3000"]);
        assert!(l.peers().starts_with("1=localhost:20002/localhost:20001,"));
        let n = l.node_args(0);
        let at = n.iter().position(|a| a == "--advertise-addr").unwrap();
        assert_eq!(n[at + 1], "localhost:20011");
        // Listening stays on the loopback address.
        let at = n.iter().position(|a| a == "--listen").unwrap();
        assert_eq!(n[at + 1], "127.0.0.1:20010");
    }
}
