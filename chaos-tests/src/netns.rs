//! Real network partitions: each process of a test cluster in its own network
//! namespace, on a veth pair to one bridge in the test's namespace (the test's client
//! reaches every process through it). The addresses are the test's own (a /24 of
//! 10.213.0.0/16 picked by process id), inside namespaces it made; nothing else is
//! addressed. A link between two processes is cut by a blackhole route at each end
//! (packets dropped silently, as a failed switch port or a firewall does), one
//! direction or both; `heal` removes the routes. Everything made here is deleted when
//! the `Net` drops, also when the test fails; names carry the test's pid and a counter so runs and parallel tests do
//! not collide, and leftovers of a killed run with the same pid are removed first.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static PROBES: AtomicU32 = AtomicU32::new(0);

/// One partitionable network of `hosts` namespaces.
pub struct Net {
    tag: String,
    bridge: String,
    subnet: u32,
    /// Namespace names, by host index.
    pub namespaces: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Whether this process may make namespaces (root with iproute2).
    pub fn available() -> bool {
        let probe = format!(
            "shoal-probe-{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        );
        let ok = ip(&["netns", "add", &probe]).is_ok();
        let _ = ip(&["netns", "del", &probe]);
        ok
    }

    pub fn new(hosts: usize) -> Result<Net, String> {
        // Tests of one binary run in parallel: each Net its own names and subnet.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("s{}x{n}", pid % 100_000);
        let subnet = 20 + (pid.wrapping_mul(8).wrapping_add(n)) % 200;
        let mut net = Net {
            bridge: format!("{tag}br"),
            tag,
            subnet,
            namespaces: Vec::new(),
        };
        net.clear();
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        let gw = format!("{}/24", net.gateway());
        ip(&["addr", "add", &gw, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for i in 0..hosts {
            let ns = format!("shoal-{}-{i}", net.tag);
            let (outer, inner) = (format!("{}v{i}", net.tag), format!("{}p{i}", net.tag));
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &net.bridge])?;
            ip(&["link", "set", &outer, "up"])?;
            let addr = format!("{}/24", net.host(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        }
        Ok(net)
    }

    /// The test's own address on the bridge.
    pub fn gateway(&self) -> String {
        format!("10.213.{}.1", self.subnet)
    }

    /// Host `i`'s address.
    pub fn host(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, i + 2)
    }

    /// The command prefix that runs a program in host `i`'s namespace.
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.namespaces[i]]
            .map(String::from)
            .to_vec()
    }

    /// Drops everything host `from` sends to host `to` (one direction).
    pub fn cut_one_way(&self, from: usize, to: usize) {
        let dst = self.host(to);
        ip(&[
            "-n",
            &self.namespaces[from],
            "route",
            "add",
            "blackhole",
            &dst,
        ])
        .unwrap_or_else(|e| panic!("cutting {from} -> {to}: {e}"));
    }

    /// Cuts the link between hosts `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Restores every link of host `a` (both ways).
    pub fn heal(&self, a: usize) {
        for b in 0..self.namespaces.len() {
            for (x, y) in [(a, b), (b, a)] {
                let dst = self.host(y);
                let _ = ip(&["-n", &self.namespaces[x], "route", "del", "blackhole", &dst]);
            }
        }
    }

    /// Deletes this run's namespaces and bridge (the veths go with them).
    fn clear(&self) {
        let out = Command::new("ip").args(["netns", "list"]).output();
        let prefix = format!("shoal-{}-", self.tag);
        if let Ok(o) = out {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Some(ns) = line
                    .split_whitespace()
                    .next()
                    .filter(|n| n.starts_with(&prefix))
                {
                    let _ = ip(&["netns", "del", ns]);
                }
            }
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.clear();
    }
}
