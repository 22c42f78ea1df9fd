//! shoal's coordinator: a Raft group (openraft) whose replicated state machine is the
//! cluster map: collections, worker nodes and their liveness, and shard placement.
//!
//! Pure logic lives in [`map`] (the data model and its commands) and [`placement`]
//! (assignments and moves); [`store`] and [`network`] are openraft's storage and
//! transport; [`member`] is one member's behaviour; [`service`] the gRPC surface.
//! [`start`] boots a member in-process (the `shoal coordinator` binary is a thin wrapper),
//! so tests run whole groups over real loopback gRPC.

pub mod config;
pub mod error;
pub mod index;
pub mod map;
pub mod member;
pub mod metrics;
pub mod network;
pub mod operations;
pub mod placement;
pub mod raft;
pub mod rebuild;
pub mod service;
pub mod split;
pub mod store;
#[cfg(feature = "testsuite")]
pub mod testing;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_proto::coordinator::{admin_server::AdminServer, cluster_map_server::ClusterMapServer};
use shoal_proto::raft::raft_server::RaftServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{Config, Peer};
pub use error::CoordinatorError;
pub use member::Coordinator;

use crate::network::Network;
use crate::store::{LogStore, StateMachine};

/// Largest message either gRPC server accepts (snapshots travel in chunks below this).
const MAX_MESSAGE: usize = 16 << 20;

/// Keeps grpc.health SERVING while the Raft core runs, and turns it NOT_SERVING for
/// good once the core has stopped (a storage failure is fatal to openraft): the member
/// cannot take part in the group any more, and a probe should restart it.
async fn watch_raft_health(
    raft: raft::Raft,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut m = raft.metrics();
    loop {
        let failed = m
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|e| e.to_string());
        if let Some(e) = failed {
            tracing::error!(error = %e, "the raft core stopped: reporting NOT_SERVING");
            break;
        }
        tokio::select! {
            r = m.changed() => if r.is_err() {
                if *stop.borrow() { return; }
                tracing::error!("the raft core is gone: reporting NOT_SERVING");
                break;
            },
            _ = stop.changed() => return,
        }
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<AdminServer<service::AdminService>>()
        .await;
}

/// A running member. Dropping it does not stop it: call [`Handle::shutdown`].
pub struct Handle {
    pub coordinator: Arc<Coordinator>,
    pub api_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log: std::sync::Weak<redb::Database>,
}

impl Handle {
    /// Stops serving, stops Raft, and waits for the servers to close their ports.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.coordinator.stopping.send_replace(true);
        let _ = self.coordinator.raft.shutdown().await;
        for t in self.tasks {
            let _ = t.await;
        }
        // The raft log's file lock goes with its last clone; a member restarted in the same
        // process (tests, an operator's in-process restart) must find it released.
        drop(self.coordinator);
        let deadline = tokio::time::Instant::now() + LOG_RELEASE;
        while self.log.strong_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.log.strong_count() > 0 {
            tracing::warn!("the raft log is still open {LOG_RELEASE:?} after shutdown");
        }
    }
}

/// How long [`Handle::shutdown`] waits for the raft log's last holder to let it go.
const LOG_RELEASE: Duration = Duration::from_secs(10);

/// Opens the member's storage under `config.data_dir`, binds both ports, starts Raft,
/// and initialises a fresh group if this is its lowest-id initial member.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    config.validate()?;
    let limits = config.limits()?;
    let config = Arc::new(config);
    // Before any connection is opened: every client of this process uses it.
    let tls = shoal_proto::tls::start_or_plaintext(config.tls.as_ref(), "member")
        .context("loading TLS")?;
    let tls_public = tls.as_ref().map(|t| t.public.clone());
    let tls_raft = tls.as_ref().map(|t| t.internal.clone());
    let keys = shoal_proto::auth::Keys::start(
        config.root_key_file.as_deref(),
        config.audit_log.as_deref(),
        "member",
    )
    .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let log = LogStore::open(&config.data_dir.join("raft-log.redb"))
        .with_context(|| format!("opening the raft log in {}", config.data_dir.display()))?;
    let log_closed = log.closed();
    let sm = StateMachine::open(&config.data_dir.join("snapshot"))?;

    let api = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding the public address {}", config.listen))?;
    let raft_l = TcpListener::bind(&config.raft_listen)
        .await
        .with_context(|| format!("binding the raft address {}", config.raft_listen))?;
    let (api_addr, raft_addr) = (api.local_addr()?, raft_l.local_addr()?);

    let raft_config = Arc::new(config.raft_config().validate()?);
    let raft = raft::Raft::new(config.id, raft_config, Network, log, sm.clone()).await?;
    let coordinator = Arc::new(
        Coordinator::new(config.id, raft.clone(), sm, config.clone(), limits.clone())
            .with_keys(keys),
    );

    let (stop, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let c = coordinator.clone();
    let rx = stop_rx.clone();
    let l = limits.clone();
    tasks.push(tokio::spawn(async move {
        let r = l.server(l.coordinator_request_timeout()).add_service(
            RaftServer::new(service::RaftService(c)).max_decoding_message_size(MAX_MESSAGE),
        );
        let r = shoal_proto::serve!(r, raft_l, tls_raft, stopped(rx));
        if let Err(e) = r {
            tracing::error!(error = %e, "raft server failed");
        }
    }));
    let c = coordinator.clone();
    let rx = stop_rx.clone();
    // The standard health service, for probes and load balancers: SERVING while the
    // process serves and its Raft core runs (whether the group has a leader is the
    // Admin API's to say).
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AdminServer<service::AdminService>>()
        .await;
    tasks.push(tokio::spawn(watch_raft_health(
        raft.clone(),
        health,
        stop_rx.clone(),
    )));
    if let Some(addr) = config.health_listen {
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
    let l = limits.clone();
    let id = config.id;
    tasks.push(tokio::spawn(async move {
        // The console and the admin routes as JSON on the same port (issue 23): the
        // same TLS, the same keys, the same service; HTTP/1.1 accepted for them.
        let json = shoal_web::console::coordinator_router(
            Arc::new(service::AdminService(c.clone())),
            id,
            MAX_MESSAGE,
        );
        let r = l
            .server(l.coordinator_request_timeout())
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(json))
            .add_service(health_service)
            .add_service(
                AdminServer::new(service::AdminService(c.clone()))
                    .max_decoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                ClusterMapServer::new(service::ClusterMapService(c))
                    .max_decoding_message_size(MAX_MESSAGE),
            );
        let r = shoal_proto::serve!(r, api, tls_public, stopped(rx));
        if let Err(e) = r {
            tracing::error!(error = %e, "api server failed");
        }
    }));
    if let Some(addr) = config.metrics_listen {
        metrics::install(addr)?;
        tasks.push(tokio::spawn(metrics::refresh(
            coordinator.clone(),
            std::time::Duration::from_secs(1),
            stop_rx.clone(),
        )));
    }
    // The leader's lease, renewed every Raft heartbeat (`Coordinator::leadership`).
    let c = coordinator.clone();
    let mut rx = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let every = std::time::Duration::from_millis(c.config.heartbeat_ms);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => c.confirm_leadership().await,
                _ = rx.changed() => return,
            }
        }
    }));
    let c = coordinator.clone();
    let mut rx = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(c.config.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => c.tick().await,
                _ = rx.changed() => return,
            }
        }
    }));

    let lowest = config.peers.iter().map(|p| p.id).min();
    if lowest == Some(config.id) && !raft.is_initialized().await? {
        let members: BTreeMap<u64, raft::Member> =
            config.peers.iter().map(|p| (p.id, p.member())).collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(id = config.id, "initialised a new coordinator group"),
            // Another member got there first, or the log already holds a membership.
            Err(e) => tracing::info!(id = config.id, error = %e, "group already initialised"),
        }
    }
    tracing::info!(id = config.id, api = %api_addr, raft = %raft_addr, data_dir = %config.data_dir.display(), "coordinator started");
    Ok(Handle {
        coordinator,
        api_addr,
        raft_addr,
        stop,
        tasks,
        log: log_closed,
    })
}
