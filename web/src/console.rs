//! The web console (issue 23): its static files, built into the binaries (no CDN, no
//! chart library: `app.js` draws on canvases), and the cluster view it polls at
//! `GET /v1/cluster`: the coordinator group, nodes, collections with their shards
//! (primary, replicas with state, lag, generation, documents) and operations. The view
//! is gathered through the `Admin` trait ([`gather`]) by whoever serves the console (a
//! coordinator from its own service, a node through the group) and drawn into JSON by
//! one pure function ([`view`]); a node whose coordinators do not answer draws it from
//! its own copy of the map instead.

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use serde_json::{json, Value};
use shoal_proto::coordinator as cpb;
use shoal_proto::coordinator::admin_server::Admin;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::{admin, fallbacks, from_status, metadata, openapi, OPENAPI_PATH};

const HTML: &str = include_str!("../console/index.html");
const JS: &str = include_str!("../console/app.js");
const CSS: &str = include_str!("../console/app.css");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, kind),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The console's files at `/console`, `/console/app.js`, `/console/app.css`.
pub fn files() -> axum::Router {
    axum::Router::new()
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", HTML) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
}

/// What the view is drawn from.
pub struct Parts {
    /// The group's status, or why it could not be had.
    pub coordinators: Result<cpb::ClusterStatusResponse, String>,
    pub map_version: u64,
    pub cluster_id: String,
    pub nodes: Vec<cpb::NodeInfo>,
    pub collections: Vec<cpb::Collection>,
    /// Every shard, with its replicas' last reports where the source has them.
    pub shards: Vec<cpb::Shard>,
    pub operations: Vec<cpb::Operation>,
}

fn request<T>(meta: &MetadataMap, msg: T) -> Request<T> {
    Request::from_parts(meta.clone(), Default::default(), msg)
}

/// The parts from `admin` with the caller's key (`meta`): each call checks it.
pub async fn gather<A: Admin>(admin: &A, meta: &MetadataMap) -> Result<Parts, Status> {
    let status = admin
        .cluster_status(request(meta, cpb::ClusterStatusRequest {}))
        .await?
        .into_inner();
    let nodes = admin
        .list_nodes(request(meta, cpb::ListNodesRequest {}))
        .await?
        .into_inner();
    let collections = admin
        .list_collections(request(meta, cpb::ListCollectionsRequest {}))
        .await?
        .into_inner();
    let shards = admin
        .list_shards(request(meta, cpb::ListShardsRequest::default()))
        .await?
        .into_inner();
    let operations = admin
        .list_operations(request(meta, cpb::ListOperationsRequest::default()))
        .await?
        .into_inner();
    Ok(Parts {
        map_version: collections.map_version.max(shards.map_version),
        cluster_id: status.cluster_id.clone(),
        coordinators: Ok(status),
        nodes: nodes.nodes,
        collections: collections.collections,
        shards: shards.shards,
        operations: operations.operations,
    })
}

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

/// The view as JSON. `served_by`: who answers (`{"node": id}` or `{"coordinator": id}`):
/// the console shows this node's charts and search box only where a node serves it.
pub fn view(parts: Parts, served_by: Value) -> Value {
    let node_state = |s: i32| {
        cpb::NodeState::try_from(s)
            .map(|s| lower(s.as_str_name(), "NODE_STATE_"))
            .unwrap_or_default()
    };
    let replica_state = |s: i32| {
        cpb::ReplicaState::try_from(s)
            .map(|s| lower(s.as_str_name(), "REPLICA_STATE_"))
            .unwrap_or_default()
    };
    let coordinators = match &parts.coordinators {
        Ok(c) => json!({
            "leader": c.leader,
            "leader_addr": c.leader_api_addr,
            "term": c.term,
            "members": c.members.iter().map(|m| json!({"id": m.id, "api_addr": m.api_addr, "voter": m.voter})).collect::<Vec<_>>(),
        }),
        Err(e) => json!({"error": e}),
    };
    let collections: Vec<Value> = parts
        .collections
        .iter()
        .map(|c| {
            let mut shards: Vec<&cpb::Shard> = parts
                .shards
                .iter()
                .filter(|s| s.collection == c.name)
                .collect();
            shards.sort_by_key(|s| s.index);
            let shards: Vec<Value> = shards
                .into_iter()
                .map(|s| {
                    json!({
                        "index": s.index,
                        "primary": s.primary,
                        "epoch": s.epoch,
                        "serving_generation": s.serving_generation,
                        "building_generation": s.building_generation,
                        "replicas": s.replicas.iter().map(|r| json!({
                            "node": r.node_id,
                            "state": replica_state(r.state),
                            "lag": r.lag,
                            "applied_seq": r.applied_seq,
                            "serving_generation": r.serving_generation,
                            "live_docs": r.live_docs,
                            "caught_up": r.caught_up,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "name": c.name,
                "dimension": c.dimension,
                "shard_count": c.shard_count,
                "replication_factor": c.replication_factor,
                "model": c.encoder.as_ref().map(|e| e.model_id.clone()),
                "shards": shards,
            })
        })
        .collect();
    let mut out = json!({
        "map_version": parts.map_version,
        "cluster_id": parts.cluster_id,
        "coordinators": coordinators,
        "nodes": parts.nodes.iter().map(|n| json!({
            "id": n.id, "addr": n.addr, "state": node_state(n.state), "replicas": n.replicas,
        })).collect::<Vec<_>>(),
        "collections": collections,
        "operations": parts.operations.iter().rev().take(50).map(|o| json!({
            "id": o.id, "kind": o.kind, "collection": o.collection, "state": o.state,
            "reason": o.reason,
            "steps": o.steps.iter().map(|s| json!({"shard": s.shard, "state": s.state, "node": s.node})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if let (Value::Object(o), Value::Object(who)) = (&mut out, served_by) {
        o.extend(who);
    }
    out
}

/// What a coordinator serves on its public port beside gRPC: the console, its cluster
/// view, the admin routes over its own `Admin` service (the leader's where a follower
/// cannot answer: [`admin::LeaderFirst`]) and their OpenAPI document.
pub fn coordinator_router<A: Admin>(local: Arc<A>, id: u64, max_body: usize) -> axum::Router {
    let service = Arc::new(admin::LeaderFirst::new(local));
    let doc = Arc::new(openapi(
        "A coordinator's routes: the cluster's administration (proto3 JSON mapping of \
         shoal.coordinator.v1). The search and document routes are the nodes'.",
        &[admin::ADMIN_ROUTES],
    ));
    let a = service.clone();
    let r = files()
        .route(
            "/v1/cluster",
            get(move |headers: HeaderMap| async move {
                let meta = match metadata(&headers) {
                    Ok(m) => m,
                    Err(s) => return from_status(s),
                };
                match gather(&*a, &meta).await {
                    Ok(p) => Json(view(p, json!({"coordinator": id}))).into_response(),
                    Err(s) => from_status(s),
                }
            }),
        )
        .route(
            OPENAPI_PATH,
            get(move || async move { Json((*doc).clone()) }),
        )
        .merge(admin::routes(service, max_body));
    fallbacks(r).layer(axum::extract::DefaultBodyLimit::max(max_body))
}
