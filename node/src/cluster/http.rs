//! The HTTP/JSON API (issue 23): the public `Shoal` operations as JSON over HTTP, on
//! the node's public port beside gRPC (the same listener, so the same TLS, and the same
//! API keys in the same `authorization` header). One handler layer over the gRPC
//! service itself ([`ShoalService`]): a route decodes its body into the RPC's request
//! message (proto3's JSON mapping: camelCase names, enums by name, 64-bit integers as
//! strings), calls the same method, and encodes its answer; there is no second
//! implementation of any logic. Errors are JSON, `{"code": "INVALID_ARGUMENT",
//! "message": ...}`, with the HTTP status gRPC-gateway gives each code.
//!
//! [`ROUTES`] is the one table: the router is built from it and so is the OpenAPI
//! document served at [`OPENAPI_PATH`] (its schemas from the messages' descriptors), so
//! the document cannot name a route or a field the handlers do not take.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_server::Shoal;
use tonic::{Code, Status};

use super::service::ShoalService;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

/// One JSON route: `POST path`, the body the RPC's request (the path's `{collection}`
/// fills the request's `collection`), the answer its response.
pub struct Route {
    pub path: &'static str,
    pub rpc: &'static str,
    pub request: &'static str,
    pub response: &'static str,
    pub summary: &'static str,
}

macro_rules! route {
    ($path:literal, $rpc:literal, $req:literal, $resp:literal, $summary:literal) => {
        Route {
            path: $path,
            rpc: $rpc,
            request: concat!("shoal.v1.", $req),
            response: concat!("shoal.v1.", $resp),
            summary: $summary,
        }
    };
}

/// Every JSON route, in the order the document lists them.
pub const ROUTES: &[Route] = &[
    route!(
        "/v1/collections/{collection}/ingest",
        "Ingest",
        "IngestRequest",
        "IngestResponse",
        "Ingest documents (text is encoded by the node; a vector is taken as given)"
    ),
    route!(
        "/v1/collections/{collection}/delete",
        "Delete",
        "DeleteRequest",
        "DeleteResponse",
        "Delete documents by id"
    ),
    route!(
        "/v1/collections/{collection}/get",
        "Get",
        "GetRequest",
        "GetResponse",
        "Read one document (with its vector on request)"
    ),
    route!(
        "/v1/collections/{collection}/search",
        "Search",
        "SearchRequest",
        "SearchResponse",
        "Search by text, vector or a stored document (filters, modes, fusion, PRF)"
    ),
    route!(
        "/v1/collections/{collection}/count",
        "Count",
        "CountRequest",
        "CountResponse",
        "Count the documents a filter admits"
    ),
    route!(
        "/v1/collections/{collection}/scroll",
        "Scroll",
        "ScrollRequest",
        "ScrollResponse",
        "Page through the documents (a filter, a cursor)"
    ),
    route!(
        "/v1/collections/{collection}/delete-by-filter",
        "DeleteByFilter",
        "DeleteByFilterRequest",
        "DeleteResponse",
        "Delete the documents a filter admits"
    ),
    route!(
        "/v1/collections/{collection}/set-payload",
        "SetPayload",
        "SetPayloadRequest",
        "IngestResponse",
        "Replace or merge a document's metadata without its vector"
    ),
    route!(
        "/v1/collections/{collection}/build-index",
        "BuildIndex",
        "BuildIndexRequest",
        "BuildIndexResponse",
        "Build a new IVF-PQ generation on every shard"
    ),
    route!(
        "/v1/search-batch",
        "SearchBatch",
        "SearchBatchRequest",
        "SearchBatchResponse",
        "Many searches in one call (each names its collection)"
    ),
];

/// A request that names its collection.
trait Collection {
    fn collection(&mut self) -> &mut String;
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Collection for $t {
            fn collection(&mut self) -> &mut String {
                &mut self.collection
            }
        }
    )*};
}

named!(
    pb::IngestRequest,
    pb::DeleteRequest,
    pb::GetRequest,
    pb::SearchRequest,
    pb::CountRequest,
    pb::ScrollRequest,
    pb::DeleteByFilterRequest,
    pb::SetPayloadRequest,
    pb::BuildIndexRequest
);

/// The HTTP status gRPC-gateway gives a code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a status"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON name of a code: `INVALID_ARGUMENT`, as gRPC spells it.
fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// An error as the API answers it.
fn error(code: Code, message: impl Into<String>) -> Response {
    (
        http_status(code),
        Json(json!({"code": code_name(code), "message": message.into()})),
    )
        .into_response()
}

fn from_status(s: Status) -> Response {
    error(s.code(), s.message())
}

/// The state every handler shares: the gRPC service and the body limit.
#[derive(Clone)]
struct Api {
    svc: Arc<ShoalService>,
    max_body: usize,
}

/// Decodes `body` as `T` (proto3 JSON), fills in the path's collection, calls `rpc` with
/// the caller's key, and encodes the answer.
async fn call<T, R, F>(
    api: &Api,
    headers: &HeaderMap,
    collection: Option<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    name: &str,
    rpc: F,
) -> Response
where
    T: DeserializeOwned + Default,
    R: Serialize,
    F: AsyncFnOnce(tonic::Request<T>, Option<String>) -> Result<tonic::Response<R>, Status>,
{
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Code::ResourceExhausted
            } else {
                Code::InvalidArgument
            };
            return error(
                code,
                format!(
                    "the body could not be read ({}); the limit message_bytes = {}",
                    r.body_text(),
                    api.max_body
                ),
            );
        }
    };
    let msg: T = if body.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(m) => m,
            Err(e) => {
                return error(
                    Code::InvalidArgument,
                    format!("the body is not a {name} in JSON: {e}"),
                )
            }
        }
    };
    let mut req = tonic::Request::new(msg);
    if let Some(v) = headers.get("authorization") {
        match tonic::metadata::MetadataValue::try_from(v.as_bytes()) {
            Ok(v) => {
                req.metadata_mut().insert("authorization", v);
            }
            Err(_) => {
                return error(
                    Code::Unauthenticated,
                    "the authorization header is not text",
                )
            }
        }
    }
    match rpc(req, collection).await {
        Ok(r) => (StatusCode::OK, Json(r.into_inner())).into_response(),
        Err(s) => from_status(s),
    }
}

/// The path's collection put into the request (a body naming another is refused).
fn with_collection<T: Collection>(
    mut req: tonic::Request<T>,
    path: Option<String>,
) -> Result<tonic::Request<T>, Status> {
    if let Some(p) = path {
        let c = req.get_mut().collection();
        if !c.is_empty() && *c != p {
            return Err(Status::invalid_argument(format!(
                "the path names collection {p:?}, the body {c:?}"
            )));
        }
        *c = p;
    }
    Ok(req)
}

macro_rules! handler {
    ($fn:ident, $method:ident, $req:ty) => {
        async fn $fn(
            State(api): State<Api>,
            Path(collection): Path<String>,
            headers: HeaderMap,
            body: Result<Bytes, axum::extract::rejection::BytesRejection>,
        ) -> Response {
            let svc = api.svc.clone();
            call::<$req, _, _>(
                &api,
                &headers,
                Some(collection),
                body,
                stringify!($req),
                async move |r, c| svc.$method(with_collection(r, c)?).await,
            )
            .await
        }
    };
}

handler!(ingest, ingest, pb::IngestRequest);
handler!(delete, delete, pb::DeleteRequest);
handler!(get_doc, get, pb::GetRequest);
handler!(search, search, pb::SearchRequest);
handler!(count, count, pb::CountRequest);
handler!(scroll, scroll, pb::ScrollRequest);
handler!(
    delete_by_filter,
    delete_by_filter,
    pb::DeleteByFilterRequest
);
handler!(set_payload, set_payload, pb::SetPayloadRequest);
handler!(build_index, build_index, pb::BuildIndexRequest);

async fn search_batch(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let svc = api.svc.clone();
    call::<pb::SearchBatchRequest, _, _>(
        &api,
        &headers,
        None,
        body,
        "SearchBatchRequest",
        async move |r, _| svc.search_batch(r).await,
    )
    .await
}

/// The caller's key from the headers, as gRPC metadata, checked for the read role on
/// the cluster (`action` names the call in the audit log).
fn authorized(
    api: &Api,
    headers: &HeaderMap,
    action: &str,
) -> Result<tonic::metadata::MetadataMap, Status> {
    let mut m = tonic::metadata::MetadataMap::new();
    if let Some(v) = headers.get("authorization") {
        let v = tonic::metadata::MetadataValue::try_from(v.as_bytes())
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        m.insert("authorization", v);
    }
    api.svc
        .allow_cluster(&m, action, shoal_proto::auth::Role::Read)?;
    Ok(m)
}

/// The cluster as this node's map has it (the console, issue 23): the coordinator
/// group, nodes and their state, collections with their shards (primary, replicas,
/// epochs, lag, generations) and the operations in the map. Any valid key reads it.
async fn cluster_view(State(api): State<Api>, headers: HeaderMap) -> Response {
    let meta = match authorized(&api, &headers, "ClusterView") {
        Ok(m) => m,
        Err(s) => return from_status(s),
    };
    let gateway = &api.svc.0;
    let key = shoal_proto::auth::presented(&meta).map(str::to_string);
    let coordinators = match gateway.coordinator_status(key.as_deref()).await {
        Ok(c) => json!({
            "leader": c.leader,
            "leader_addr": c.leader_api_addr,
            "term": c.term,
            "members": c.members.iter().map(|m| json!({"id": m.id, "api_addr": m.api_addr, "voter": m.voter})).collect::<Vec<_>>(),
        }),
        Err(s) => json!({"error": s.message()}),
    };
    // The replicas' reports live in the leader's memory, not in the map's log: taken
    // from there when it answers, else this node's map (without them).
    let reported: std::collections::HashMap<(String, u32), shoal_proto::coordinator::Shard> =
        gateway
            .coordinator_shards(key.as_deref())
            .await
            .map(|v| {
                v.into_iter()
                    .map(|s| ((s.collection.clone(), s.index), s))
                    .collect()
            })
            .unwrap_or_default();
    let v = gateway.view.read();
    let state = |s: i32| {
        shoal_proto::coordinator::NodeState::try_from(s)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("NODE_STATE_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default()
    };
    let replica_state = |s: i32| {
        shoal_proto::coordinator::ReplicaState::try_from(s)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("REPLICA_STATE_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default()
    };
    let collections: Vec<Value> = v
        .collections
        .values()
        .map(|c| {
            let shards: Vec<Value> = v
                .shards_of(&c.name)
                .map(|s| reported.get(&(s.collection.clone(), s.index)).unwrap_or(s))
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
    let body = json!({
        "node": gateway.node_id,
        "map_version": v.version,
        "cluster_id": v.cluster_id,
        "coordinators": coordinators,
        "nodes": v.nodes.values().map(|n| json!({
            "id": n.id, "addr": n.addr, "state": state(n.state), "replicas": n.replicas,
        })).collect::<Vec<_>>(),
        "collections": collections,
        "operations": v.operations.values().rev().take(50).map(|o| json!({
            "id": o.id, "kind": o.kind, "collection": o.collection, "state": o.state,
            "reason": o.reason,
            "steps": o.steps.iter().map(|s| json!({"shard": s.shard, "state": s.state, "node": s.node})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    Json(body).into_response()
}

/// This node's gateway counts and recent search latencies (the console's charts).
async fn stats(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(s) = authorized(&api, &headers, "Stats") {
        return from_status(s);
    }
    let mut v = api.svc.0.stats.snapshot();
    v["node"] = json!(api.svc.0.node_id);
    Json(v).into_response()
}

/// The console's static files, built into the binary (no CDN, no chart library: the
/// charts are drawn on a canvas by `app.js`).
const CONSOLE_HTML: &str = include_str!("../../console/index.html");
const CONSOLE_JS: &str = include_str!("../../console/app.js");
const CONSOLE_CSS: &str = include_str!("../../console/app.css");

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

/// The JSON routes over `svc`, bodies up to `max_body` bytes, the OpenAPI document, the
/// console and its data, and JSON answers for unknown paths.
pub(crate) fn router(svc: Arc<ShoalService>, max_body: usize) -> axum::Router {
    let api = Api { svc, max_body };
    let doc = Arc::new(openapi());
    let mut r = axum::Router::new()
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/stats", get(stats))
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", CONSOLE_HTML) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        );
    for route in ROUTES {
        let h = match route.rpc {
            "Ingest" => post(ingest),
            "Delete" => post(delete),
            "Get" => post(get_doc),
            "Search" => post(search),
            "Count" => post(count),
            "Scroll" => post(scroll),
            "DeleteByFilter" => post(delete_by_filter),
            "SetPayload" => post(set_payload),
            "BuildIndex" => post(build_index),
            "SearchBatch" => post(search_batch),
            other => unreachable!("no handler for {other}"),
        };
        r = r.route(route.path, h);
    }
    r.route(OPENAPI_PATH, get(move || async move { Json((*doc).clone()) }))
        .fallback(|| async {
            error(
                Code::NotFound,
                format!("no such route; the API's routes are listed at {OPENAPI_PATH}"),
            )
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({"code": "UNIMPLEMENTED", "message": "every route takes POST with a JSON body (the document: GET /v1/openapi.json)"})),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(api)
}

/// The OpenAPI 3.0 document of [`ROUTES`], its schemas made from the messages'
/// descriptors as proto3's JSON mapping writes them.
pub fn openapi() -> Value {
    let fds: FileDescriptorSet =
        prost::Message::decode(shoal_proto::FILE_DESCRIPTOR_SET).expect("the build's descriptors");
    let mut messages = std::collections::BTreeMap::new();
    let mut enums = std::collections::BTreeMap::new();
    for f in &fds.file {
        let pkg = f.package();
        for m in &f.message_type {
            collect(pkg, m, &mut messages, &mut enums);
        }
        for e in &f.enum_type {
            enums.insert(
                format!("{pkg}.{}", e.name()),
                e.value
                    .iter()
                    .map(|v| v.name().to_string())
                    .collect::<Vec<_>>(),
            );
        }
    }
    // Only what the routes reach.
    let mut schemas = Map::new();
    let mut todo: Vec<String> = ROUTES
        .iter()
        .flat_map(|r| [r.request.to_string(), r.response.to_string()])
        .collect();
    while let Some(name) = todo.pop() {
        if schemas.contains_key(&name) {
            continue;
        }
        if let Some(values) = enums.get(&name) {
            schemas.insert(name, json!({"type": "string", "enum": values}));
            continue;
        }
        let Some(m) = messages.get(&name) else {
            continue;
        };
        let mut props = Map::new();
        for f in &m.field {
            let (schema, refers) = field_schema(f);
            if let Some(r) = refers {
                todo.push(r);
            }
            props.insert(f.json_name().to_string(), schema);
        }
        schemas.insert(
            name,
            json!({"type": "object", "properties": props, "additionalProperties": false}),
        );
    }
    let error = json!({
        "description": "An error: the gRPC code's name and the server's message",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "required": ["code", "message"],
               "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}),
    );
    let mut paths = Map::new();
    for r in ROUTES {
        let mut params = Vec::new();
        if r.path.contains("{collection}") {
            params.push(json!({"name": "collection", "in": "path", "required": true,
                               "schema": {"type": "string"},
                               "description": "The collection (or an alias); fills the body's `collection`"}));
        }
        paths.insert(
            r.path.to_string(),
            json!({"post": {
                "operationId": r.rpc,
                "summary": r.summary,
                "parameters": params,
                "requestBody": {"required": false, "content": {"application/json": {
                    "schema": {"$ref": format!("#/components/schemas/{}", r.request)}}}},
                "responses": {
                    "200": {"description": "The answer", "content": {"application/json": {
                        "schema": {"$ref": format!("#/components/schemas/{}", r.response)}}}},
                    "default": error,
                },
            }}),
        );
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shoal HTTP/JSON API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The node's public operations as JSON (proto3 JSON mapping of shoal.v1). \
                            Authenticate with `authorization: Bearer <key>` as over gRPC.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    })
}

fn collect(
    prefix: &str,
    m: &DescriptorProto,
    messages: &mut std::collections::BTreeMap<String, DescriptorProto>,
    enums: &mut std::collections::BTreeMap<String, Vec<String>>,
) {
    let name = format!("{prefix}.{}", m.name());
    for n in &m.nested_type {
        collect(&name, n, messages, enums);
    }
    for e in &m.enum_type {
        enums.insert(
            format!("{name}.{}", e.name()),
            e.value.iter().map(|v| v.name().to_string()).collect(),
        );
    }
    messages.insert(name, m.clone());
}

/// A field's schema (proto3 JSON) and the message or enum it refers to.
fn field_schema(f: &prost_types::FieldDescriptorProto) -> (Value, Option<String>) {
    let type_ref = f.type_name().trim_start_matches('.').to_string();
    let (one, refers) = match f.r#type() {
        Type::Double | Type::Float => (json!({"type": "number"}), None),
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
            (json!({"type": "string", "format": "int64"}), None)
        }
        Type::Uint64 | Type::Fixed64 => (json!({"type": "string", "format": "uint64"}), None),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => {
            (json!({"type": "integer", "format": "int32"}), None)
        }
        Type::Uint32 | Type::Fixed32 => (
            json!({"type": "integer", "format": "int64", "minimum": 0}),
            None,
        ),
        Type::Bool => (json!({"type": "boolean"}), None),
        Type::String => (json!({"type": "string"}), None),
        Type::Bytes => (json!({"type": "string", "format": "byte"}), None),
        Type::Enum | Type::Message | Type::Group => (
            json!({"$ref": format!("#/components/schemas/{type_ref}")}),
            Some(type_ref),
        ),
    };
    if f.label() == Label::Repeated {
        (json!({"type": "array", "items": one}), refers)
    } else {
        (one, refers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_resolves_every_reference() {
        let doc = openapi();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len());
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referred to but not defined"
            );
        }
        let search = &schemas["shoal.v1.SearchRequest"]["properties"];
        assert_eq!(search["k"]["type"], "integer");
        assert_eq!(search["likeId"]["type"], "string");
        assert_eq!(search["vector"]["type"], "array");
        assert_eq!(
            schemas["shoal.v1.RetrievalMode"]["enum"][0],
            "RETRIEVAL_MODE_AUTO"
        );
    }

    #[test]
    fn codes_map_to_the_statuses_grpc_gateway_uses() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
