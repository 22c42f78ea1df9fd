//! The HTTP/JSON API (issue 23): the public `Shoal` operations as JSON over HTTP, on
//! the node's public port beside gRPC (the same listener, so the same TLS, and the same
//! API keys in the same `authorization` header). One handler layer over the gRPC
//! service itself ([`ShoalService`]) through [`shoal_web::call`]: there is no second
//! implementation of any logic. Beside them: the cluster-administration routes
//! (`/v1/admin/...`), forwarded to the coordinators with the caller's key
//! ([`shoal_web::admin::RemoteAdmin`]), the web console, and this node's counts for
//! its charts.
//!
//! [`ROUTES`] is this node's table: the router is built from it and so is the OpenAPI
//! document served at [`OPENAPI_PATH`] (with the admin table), so the document cannot
//! name a route or a field the handlers do not take.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Value};
use shoal_proto::v1 as pb;
use shoal_proto::v1::shoal_server::Shoal;
use shoal_web::admin::{RemoteAdmin, ADMIN_ROUTES};
pub use shoal_web::OPENAPI_PATH;
use shoal_web::{call, console, from_status, Route};
use tonic::Status;

use super::service::ShoalService;

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

/// The state every handler shares: the gRPC service, the body limit, and the
/// coordinators' `Admin` service as this node reaches it.
#[derive(Clone)]
struct Api {
    svc: Arc<ShoalService>,
    max_body: usize,
    admin: Arc<RemoteAdmin>,
}

/// The path's collection put into the request (a body naming another is refused).
fn with_collection<T: Collection>(
    mut req: tonic::Request<T>,
    path: String,
) -> Result<tonic::Request<T>, Status> {
    let c = req.get_mut().collection();
    if !c.is_empty() && *c != path {
        return Err(Status::invalid_argument(format!(
            "the path names collection {path:?}, the body {c:?}"
        )));
    }
    *c = path;
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
                api.max_body,
                &headers,
                body,
                stringify!($req),
                async move |r| svc.$method(with_collection(r, collection)?).await,
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
        api.max_body,
        &headers,
        body,
        "SearchBatchRequest",
        async move |r| svc.search_batch(r).await,
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
    let m = shoal_web::metadata(headers)?;
    api.svc
        .allow_cluster(&m, action, shoal_proto::auth::Role::Read)?;
    Ok(m)
}

/// The cluster for the console: from the coordinators with the caller's key (their
/// replicas' reports included), else from this node's copy of the map (no reports,
/// and the group's error shown). The key is checked here first, so the fallback shows
/// nothing a key could not read.
async fn cluster_view(State(api): State<Api>, headers: HeaderMap) -> Response {
    let meta = match authorized(&api, &headers, "ClusterView") {
        Ok(m) => m,
        Err(s) => return from_status(s),
    };
    let gateway = &api.svc.0;
    let parts = match console::gather(&*api.admin, &meta).await {
        Ok(p) => p,
        Err(s) => {
            let v = gateway.view.read();
            console::Parts {
                coordinators: Err(s.message().to_string()),
                map_version: v.version,
                cluster_id: v.cluster_id.clone(),
                nodes: v.nodes.values().cloned().collect(),
                collections: v.collections.values().cloned().collect(),
                shards: v.shards.values().cloned().collect(),
                operations: v.operations.values().cloned().collect(),
            }
        }
    };
    Json(console::view(parts, json!({"node": gateway.node_id}))).into_response()
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

/// The OpenAPI document of a node's routes: its own and the admin routes.
pub fn openapi() -> Value {
    shoal_web::openapi(
        "A node's routes: documents and search (proto3 JSON mapping of shoal.v1), and the \
         cluster's administration (shoal.coordinator.v1), forwarded to the coordinators.",
        &[ROUTES, ADMIN_ROUTES],
    )
}

/// The JSON routes over `svc`, bodies up to `max_body` bytes, the admin routes
/// forwarded through `coordinators`, the OpenAPI document, the console and its data,
/// and JSON answers for unknown paths.
pub(crate) fn router(
    svc: Arc<ShoalService>,
    coordinators: shoal_proto::client::Client,
    max_body: usize,
) -> axum::Router {
    let admin = Arc::new(RemoteAdmin::new(coordinators));
    let api = Api {
        svc,
        max_body,
        admin: admin.clone(),
    };
    let doc = Arc::new(openapi());
    let mut r = axum::Router::new()
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/stats", get(stats));
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
    let r = r
        .route(
            OPENAPI_PATH,
            get(move || async move { Json((*doc).clone()) }),
        )
        .with_state(api)
        .merge(console::files())
        .merge(shoal_web::admin::routes(admin, max_body));
    shoal_web::fallbacks(r).layer(axum::extract::DefaultBodyLimit::max(max_body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_resolves_every_reference() {
        let doc = openapi();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len() + ADMIN_ROUTES.len());
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
}
