//! shoal's HTTP side (issue 23), shared by the node and the coordinator: JSON over the
//! gRPC services on the same port (so the same TLS and the same API keys, in the same
//! `authorization` header). A route decodes its body into the RPC's request message
//! (proto3's JSON mapping: camelCase names, enums by name, 64-bit integers as strings),
//! calls the service's own method, and encodes its answer; there is no second
//! implementation of any logic. Errors are JSON, `{"code": "INVALID_ARGUMENT",
//! "message": ...}`, with the HTTP status gRPC-gateway gives each code.
//!
//! - this file: the call machinery ([`call`]), errors, [`Route`] and the OpenAPI document
//!   built from route tables ([`openapi`]), so a document cannot name a route or a field
//!   the handlers do not take;
//! - [`admin`]: the cluster-administration routes over the coordinators' `Admin`
//!   service, one table and one router generic over the service: a coordinator serves
//!   them from its own service in process, a node forwards them with the caller's key
//!   ([`admin::RemoteAdmin`]), the seam the tests use;
//! - [`console`]: the web console's files (built into the binaries) and the cluster
//!   view it draws, gathered through the same `Admin` trait.

pub mod admin;
pub mod console;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

/// One JSON route: `POST path`, the body the RPC's request, the answer its response
/// (messages by their full protobuf names). A `{collection}` in the path fills the
/// request's `collection`.
pub struct Route {
    pub path: &'static str,
    pub rpc: &'static str,
    pub request: &'static str,
    pub response: &'static str,
    pub summary: &'static str,
}

/// The HTTP status gRPC-gateway gives a code.
pub fn http_status(code: Code) -> StatusCode {
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
pub fn code_name(code: Code) -> String {
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
pub fn error(code: Code, message: impl Into<String>) -> Response {
    (
        http_status(code),
        Json(json!({"code": code_name(code), "message": message.into()})),
    )
        .into_response()
}

pub fn from_status(s: Status) -> Response {
    error(s.code(), s.message())
}

/// The caller's key (the `authorization` header) as gRPC metadata, for a call into a
/// service, which checks it as it checks a gRPC caller's.
pub fn metadata(headers: &HeaderMap) -> Result<MetadataMap, Status> {
    let mut m = MetadataMap::new();
    if let Some(v) = headers.get("authorization") {
        let v = MetadataValue::try_from(v.as_bytes())
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        m.insert("authorization", v);
    }
    Ok(m)
}

/// Decodes `body` as `T` (proto3 JSON; an empty body is the default message), calls
/// `rpc` with the caller's key, and encodes the answer. `max_body` is named in the
/// error for a body over the limit (the router's body limit enforces it).
pub async fn call<T, R, F>(
    max_body: usize,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    name: &str,
    rpc: F,
) -> Response
where
    T: DeserializeOwned + Default,
    R: Serialize,
    F: AsyncFnOnce(tonic::Request<T>) -> Result<tonic::Response<R>, Status>,
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
                    "the body could not be read ({}); the limit message_bytes = {max_body}",
                    r.body_text()
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
    let meta = match metadata(headers) {
        Ok(m) => m,
        Err(s) => return from_status(s),
    };
    let req = tonic::Request::from_parts(meta, Default::default(), msg);
    match rpc(req).await {
        Ok(r) => (StatusCode::OK, Json(r.into_inner())).into_response(),
        Err(s) => from_status(s),
    }
}

/// The answer for a path no route takes, and for a method other than POST.
pub fn fallbacks<S: Clone + Send + Sync + 'static>(r: axum::Router<S>) -> axum::Router<S> {
    r.fallback(|| async {
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
}

/// The OpenAPI 3.0 document of `tables` (every route of each), its schemas made from
/// the messages' descriptors as proto3's JSON mapping writes them.
pub fn openapi(description: &str, tables: &[&[Route]]) -> Value {
    let fds: FileDescriptorSet =
        prost::Message::decode(shoal_proto::FILE_DESCRIPTOR_SET).expect("the build's descriptors");
    let mut messages = BTreeMap::new();
    let mut enums = BTreeMap::new();
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
    let routes = || tables.iter().flat_map(|t| t.iter());
    // Only what the routes reach.
    let mut schemas = Map::new();
    let mut todo: Vec<String> = routes()
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
    for r in routes() {
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
            "description": format!("{description} Authenticate with `authorization: Bearer <key>` as over gRPC."),
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
    messages: &mut BTreeMap<String, DescriptorProto>,
    enums: &mut BTreeMap<String, Vec<String>>,
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
    fn the_admin_document_names_every_route_and_resolves_every_reference() {
        let doc = openapi("test", &[admin::ADMIN_ROUTES]);
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), admin::ADMIN_ROUTES.len());
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referred to but not defined"
            );
        }
        let create = &schemas["shoal.coordinator.v1.CreateCollectionRequest"]["properties"];
        assert_eq!(create["dimension"]["type"], "integer");
        assert_eq!(create["replicationFactor"]["type"], "integer");
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
