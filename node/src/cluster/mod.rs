//! The worker node runtime: `start(NodeConfig)` registers with the coordinators,
//! watches the cluster map, opens the shard replicas the map assigns here (one actor
//! each, under a supervisor), heartbeats, and serves the public `Shoal` API (as a
//! gateway to every shard) and the internal `Replica` API (its own replicas).

pub mod backups;
pub mod builds;
pub mod compactions;
pub mod config;
pub mod disk;
pub mod error;
pub mod forks;
pub mod fusion;
pub mod gateway;
pub mod handover;
pub mod heartbeat;
pub mod http;
pub mod identity;
pub mod ids;
pub mod lease;
pub mod mapview;
pub mod metrics;
pub mod rebuilds;
mod reconcile;
pub mod reembeds;
pub mod replicas;
pub mod replication;
mod scrub;
mod service;
pub mod transport;
pub mod writes;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::RwLock;
use ractor::{Actor, ActorRef};
use shoal_encoder::pool::{EncoderPool, PoolConfig};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use gateway::Gateway;
use identity::Identity;
use mapview::MapView;
use replicas::{Registry, ReplicaKey, ReplicaSupervisor, SupervisorMsg};
use replication::Replication;
use transport::{LocalReplicas, Transports};

pub use config::NodeConfig;

pub struct NodeHandle {
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub registry: Registry,
    /// Replica actors restarted by the supervisor after a crash.
    pub restarts: Arc<AtomicU64>,
    /// Search calls this node's replicas answered (`Search` and `SearchMany` one
    /// each): what gateways' fan-outs cost this node.
    pub search_calls: Arc<AtomicU64>,
    pub view: Arc<RwLock<MapView>>,
    supervisor: ActorRef<SupervisorMsg>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    coordinators: Vec<String>,
    node_id: String,
    identity: Arc<RwLock<Identity>>,
}

impl NodeHandle {
    /// Panics a replica's actor (fault injection for tests).
    #[cfg(feature = "testsuite")]
    pub fn crash_replica(&self, collection: &str, index: u32) -> bool {
        let actor = self
            .registry
            .read()
            .iter()
            .find(|(k, _)| k.collection == collection && k.index == index)
            .map(|(_, h)| h.actor.clone());
        actor.is_some_and(|a| a.send_message(replicas::ReplicaMsg::Crash).is_ok())
    }

    /// Before a clean shutdown: hands every primary role this node holds to a backup
    /// that holds all its writes, so writes move on at once rather than after the
    /// coordinators' down timeout. Writes to those shards are refused meanwhile
    /// (clients retry). Returns how many roles moved within `within`.
    pub async fn hand_over(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        let primaries: Vec<Arc<Replication>> = self
            .registry
            .read()
            .values()
            .filter(|h| h.repl.role().is_some_and(|r| r.is_primary))
            .map(|h| h.repl.clone())
            .collect();
        let mut client = Client::new(self.coordinators.clone());
        client.patience = Duration::from_secs(1);
        let from = handover::From {
            node_id: self.node_id.clone(),
            cluster_id: self.identity.read().cluster_id.clone(),
        };
        let mut moved = 0;
        for r in primaries {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if handover::hand_over(&mut client, &from, &r, None, left).await {
                moved += 1;
            }
        }
        moved
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let keys: Vec<ReplicaKey> = self.registry.read().keys().cloned().collect();
        for k in keys {
            let _ = self
                .supervisor
                .call(
                    |r| SupervisorMsg::Close(k, false, r),
                    Some(Duration::from_secs(30)),
                )
                .await;
        }
        self.supervisor.stop(None);
    }
}

/// Registers with the coordinators, naming this node's volume and the cluster its
/// data belongs to; on the first registration, learns (and stores) the cluster's id.
async fn register(
    client: &mut Client,
    cfg: &NodeConfig,
    addr: &str,
    identity: &RwLock<Identity>,
) -> anyhow::Result<()> {
    let me = identity.read().clone();
    let req = cpb::RegisterNodeRequest {
        id: cfg.id.clone(),
        addr: addr.to_string(),
        capacity: Some(cpb::Capacity {
            memory_bytes: cfg.memory_bytes,
            gpu: cfg.model_dir.is_some() && cfg.encoder_device.is_gpu(),
            zone: cfg.zone.clone(),
        }),
        volume_id: me.volume_id.clone(),
        cluster_id: me.cluster_id.clone(),
    };
    let info = client
        .register_node(req)
        .await
        .context("registering with the coordinators")?;
    if me.cluster_id.is_empty() && !info.cluster_id.is_empty() {
        let mut id = identity.write();
        id.cluster_id = info.cluster_id.clone();
        id.store(&cfg.data_dir)?;
        tracing::info!(cluster = %info.cluster_id, "joined the cluster");
    }
    Ok(())
}

/// The machine's memory (MemTotal), for defaults sized by it; 8 GiB when unknown.
fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

pub async fn start(cfg: NodeConfig) -> anyhow::Result<NodeHandle> {
    cfg.validate()?;
    let wildcard = cfg
        .internal_listen
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified());
    if wildcard && cfg.advertise_addr.is_none() {
        anyhow::bail!(
            "the internal address {} listens on every interface, which other nodes cannot \
             dial: set --advertise-addr to the address they reach this node at (HOST:PORT)",
            cfg.internal_listen
        );
    }
    // Before any connection is opened: every client of this process uses it.
    let tls =
        shoal_proto::tls::start_or_plaintext(cfg.tls.as_ref(), "node").context("loading TLS")?;
    let keys = shoal_proto::auth::Keys::start(
        cfg.root_key_file.as_deref(),
        cfg.audit_log.as_deref(),
        "node",
    )
    .map_err(anyhow::Error::msg)?;
    let tls_public = tls.as_ref().map(|t| t.public.clone());
    let tls_internal = tls.as_ref().map(|t| t.internal.clone());
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let mut me = Identity::load_or_create(&cfg.data_dir)?;
    if let Some(id) = cfg
        .accept_cluster_id
        .as_ref()
        .filter(|id| **id != me.cluster_id)
    {
        tracing::warn!(from = %me.cluster_id, to = %id, "this node's data now belongs to another cluster, on the operator's word (--accept-cluster-id)");
        me.cluster_id = id.clone();
        me.store(&cfg.data_dir)?;
    }
    let identity = Arc::new(RwLock::new(me));
    let public = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding the public address {}", cfg.listen))?;
    let internal = TcpListener::bind(&cfg.internal_listen)
        .await
        .with_context(|| format!("binding the internal address {}", cfg.internal_listen))?;
    let (public_addr, internal_addr) = (public.local_addr()?, internal.local_addr()?);
    let advertised = cfg
        .advertise_addr
        .clone()
        .unwrap_or_else(|| internal_addr.to_string());

    // Every model this node encodes with (issue 21): its main one and any extra, each
    // known by its content hash, which a collection's names.
    let mut encoders = Vec::new();
    for dir in cfg.model_dir.iter().chain(&cfg.extra_model_dirs) {
        let (d, device) = (dir.clone(), cfg.encoder_device);
        let (enc, content_hash) = tokio::task::spawn_blocking(move || {
            anyhow::Ok((
                shoal_encoder::load_on(&d, device)?,
                crate::model::content_hash(&d)?,
            ))
        })
        .await??;
        let dimension = enc.dimension();
        tracing::info!(%device, dir = %dir.display(), %content_hash, dimension, "encoder loaded");
        let pool = EncoderPool::start(
            vec![enc],
            PoolConfig {
                max_queue: cfg.encoder_queue.max(1),
                ..PoolConfig::default()
            },
        )
        .await?;
        encoders.push((
            Arc::new(pool),
            crate::model::ModelIdentity {
                content_hash,
                dir: dir.clone(),
                dimension,
            },
        ));
    }
    let encoder = encoders.first().map(|(e, _)| e.clone());

    let registry: Registry = Arc::default();
    // The replica protocol: this node's own replicas answered in process, others
    // over gRPC; the internal service below serves the same handlers to other nodes.
    let local = LocalReplicas::new(registry.clone(), cfg.limits.clone());
    let transports = Transports::grpc();
    transports.set_local(&cfg.id, &local);
    let restarts = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(tokio::sync::Notify::new());
    // Unnamed: ractor's registry is per process, and a process may hold several nodes
    // (in-process tests) or a node restarting while its predecessor shuts down.
    let (supervisor, _) = Actor::spawn(
        None,
        ReplicaSupervisor,
        (registry.clone(), restarts.clone(), opened.clone()),
    )
    .await
    .map_err(|e| anyhow::anyhow!("starting the replica supervisor: {e}"))?;

    let mut client = Client::new(cfg.coordinators.clone());
    client.patience = Duration::from_secs(60);
    register(&mut client, &cfg, &advertised, &identity).await?;

    let view: Arc<RwLock<MapView>> = Arc::default();
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let disk_guard = Arc::new(disk::DiskGuard {
        node: cfg.id.clone(),
        dir: cfg.data_dir.clone(),
        reserve: cfg.disk_reserve_bytes,
    });
    // Renewed by answered heartbeats; held by every primary before it acknowledges.
    let lease = Arc::new(lease::Lease::default());
    // Index builds the map's operations ask for, under this node's admission control.
    let build_memory = match cfg.build_memory_bytes {
        0 => machine_memory() / 4,
        b => b,
    };
    // A re-embed's fills encode on this node's models (issue 21).
    let reembeds = reembeds::Reembeds::new(registry.clone(), encoders.clone(), cfg.reembed_duty);
    let builds = builds::Builds::new(
        cfg.build_slots,
        build_memory,
        registry.clone(),
        transports.clone(),
        reembeds,
    );
    // Compactions the map's operations ask for, and those the dead rows call for.
    let compactions = compactions::Compactions::new(
        registry.clone(),
        compactions::CompactPolicy {
            dead_ratio: cfg.compact_dead_ratio,
            min_dead_rows: cfg.compact_min_dead_rows,
        },
    );
    // The map: whole, then changes; resume from the last version after a reconnect.
    let forks = forks::Forks::new(opened.clone());
    let backups = backups::Backups::new(registry.clone(), opened.clone(), cfg.backup_bytes_per_sec);
    let reconciler = reconcile::Reconciler {
        local: local.clone(),
        forks: forks.clone(),
        backups: backups.clone(),
        builds: builds.clone(),
        compactions: compactions.clone(),
        node_id: cfg.id.clone(),
        data_dir: cfg.data_dir.clone(),
        registry: registry.clone(),
        transports: transports.clone(),
        supervisor: supervisor.clone(),
        auto_rebuild_tail: cfg.auto_rebuild_tail,
        recent_log_bytes: cfg.recent_log_bytes,
        in_sync_lag: cfg.in_sync_lag,
        kept: Default::default(),
        disk: disk_guard.clone(),
        lease: lease.clone(),
        opened,
    };
    // The map version the leader answers heartbeats with: a watch that stays behind
    // it moves to another coordinator member.
    let leader_version = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tasks.push(tokio::spawn(reconcile::follow_map(
        reconciler,
        view.clone(),
        client.clone(),
        identity.clone(),
        leader_version.clone(),
        (cfg.heartbeat * 4).max(Duration::from_secs(3)),
        stop_rx.clone(),
    )));

    // The scrubber: every stored vector checked against its checksum, rate-limited.
    tasks.push(tokio::spawn(scrub::run(
        registry.clone(),
        cfg.scrub_bytes_per_sec,
        stop_rx.clone(),
    )));

    // The trash: replica dirs the map stopped assigning, removed after their grace.
    let (data_dir, grace, mut rx) = (cfg.data_dir.clone(), cfg.trash_grace, stop_rx.clone());
    tasks.push(tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(Duration::from_secs(60).min(grace.max(Duration::from_secs(1))));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = rx.changed() => return,
            }
            let (d, g) = (data_dir.clone(), grace);
            let _ = tokio::task::spawn_blocking(move || replicas::empty_trash(&d, g)).await;
        }
    }));

    // Heartbeats, with the replicas that finished copying; re-register if declared down.
    tasks.push(tokio::spawn(
        heartbeat::Heartbeat {
            cfg: cfg.clone(),
            advertised: advertised.clone(),
            registry: registry.clone(),
            identity: identity.clone(),
            disk: disk_guard.clone(),
            lease: lease.clone(),
            leader_version,
            client: client.clone(),
            builds,
            compactions,
            backups,
        }
        .run(stop_rx.clone()),
    ));

    if let Some(addr) = cfg.metrics_listen {
        metrics::install(addr)?;
        tasks.push(tokio::spawn(metrics::refresh(
            registry.clone(),
            restarts.clone(),
            encoder.clone(),
            Duration::from_secs(2),
            stop_rx.clone(),
        )));
    }
    let gateway = Arc::new(Gateway::new(
        cfg.id.clone(),
        view.clone(),
        encoders,
        cfg.search_deadline,
        transports.clone(),
        cfg.limits.clone(),
        client.clone(),
    ));
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let max = cfg.limits.message_bytes;
    let limits = cfg.limits.clone();
    let rx = stop_rx.clone();
    // The admin routes' and the console's calls to the coordinators: long enough to
    // ride out an election (1-3 s here), short enough that the console falls back to
    // this node's map soon when the group does not answer.
    let mut admin_client = client.clone();
    admin_client.patience = Duration::from_secs(5);
    // The standard health service (SERVING while up) and server reflection, so grpcurl
    // and load balancers work without the protos.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<shoal_proto::v1::shoal_server::ShoalServer<service::ShoalService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shoal_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    if let Some(addr) = cfg.health_listen {
        // Plaintext grpc.health alone, for probes that speak no TLS (Kubernetes').
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the health address {addr}"))?;
        let (h, rx) = (health_service.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(h)
                .serve_with_incoming_shutdown(shoal_proto::incoming(l), stopped(rx))
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "health server failed");
            }
        }));
    }
    tasks.push(tokio::spawn(async move {
        let shoal = Arc::new(service::ShoalService(gateway, keys));
        // The HTTP/JSON API on the same port (issue 23): the same TLS, the same keys,
        // the same service, the admin routes forwarded to the coordinators; HTTP/1.1
        // accepted beside HTTP/2 for it.
        let json = http::router(shoal.clone(), admin_client, limits.message_bytes);
        let r = limits
            .server(limits.node_request_timeout())
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(json))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                shoal_proto::v1::shoal_server::ShoalServer::from_arc(shoal)
                    .max_decoding_message_size(max),
            );
        let r = shoal_proto::serve!(r, public, tls_public, stopped(rx));
        if let Err(e) = r {
            tracing::error!(error = %e, "public server failed");
        }
    }));
    let rx = stop_rx.clone();
    let svc = service::ReplicaService(local.clone());
    let l = cfg.limits.clone();
    tasks.push(tokio::spawn(async move {
        let r = l.server(l.node_request_timeout()).add_service(
            shoal_proto::replica::replica_server::ReplicaServer::new(svc)
                .max_decoding_message_size(l.internal_message_bytes),
        );
        let r = shoal_proto::serve!(r, internal, tls_internal, stopped(rx));
        if let Err(e) = r {
            tracing::error!(error = %e, "internal server failed");
        }
    }));
    tracing::info!(id = %cfg.id, public = %public_addr, internal = %internal_addr, advertised = %advertised, "node started");
    Ok(NodeHandle {
        public_addr,
        internal_addr,
        registry,
        restarts,
        search_calls: local.search_calls.clone(),
        view,
        supervisor,
        stop,
        tasks,
        coordinators: cfg.coordinators.clone(),
        node_id: cfg.id.clone(),
        identity,
    })
}
