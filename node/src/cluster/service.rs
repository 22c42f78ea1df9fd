//! The node's gRPC services: public `Shoal` (through the gateway) and internal
//! `Replica` (an adapter over this node's `transport::LocalReplicas`). The service
//! boundary: a [`ReplicaError`] becomes a gRPC status here (`?` through its `From`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shoal_proto::auth::{Keys, Need, Principal, Role};
use shoal_proto::replica as rpb;
use shoal_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::error::ReplicaError;
use super::gateway::Gateway;
use super::transport::LocalReplicas;
use crate::telemetry;

/// A server span for `req`, continuing the caller's trace if it sent one.
fn span_for<T>(span: tracing::Span, req: &Request<T>) -> tracing::Span {
    telemetry::adopt(&span, req);
    span
}

/// The public API: the gateway, behind the caller's API key ([`shoal_proto::auth`]).
pub struct ShoalService(pub Arc<Gateway>, pub Keys);

impl ShoalService {
    /// The caller's key against `role` for an action on no one collection (the
    /// console's cluster view and stats), checked with this node's map.
    pub(super) fn allow_cluster(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        action: &str,
        role: Role,
    ) -> Result<Principal, Status> {
        let view = &self.0.view;
        let lookup = |id: &str| view.read().keys.get(id).cloned();
        self.1.allow(metadata, lookup, action, "", Need::role(role))
    }

    /// The caller's key against what `action` on `collection` needs, checked with
    /// this node's map; a refusal is audited.
    fn allow(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        action: &str,
        collection: &str,
        role: Role,
    ) -> Result<Principal, Status> {
        let view = &self.0.view;
        // A key's collections are collections: an alias is checked as the one it
        // names now (issue 21).
        let resolved = view.read().resolve(collection).to_string();
        let lookup = |id: &str| view.read().keys.get(id).cloned();
        self.1.allow(
            metadata,
            lookup,
            action,
            collection,
            Need::on(role, &resolved),
        )
    }
}

/// Batches of one `IngestStream` written at once.
const STREAM_PIPELINE: usize = 4;

/// An id's hash: which ids a stream has in flight (a collision only serializes).
fn id_hash(id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id)
}

/// Counts a stream's finished batch and frees its ids.
fn settle(
    total: &mut pb::IngestResponse,
    busy: &mut std::collections::HashSet<u64>,
    r: Result<(u64, u64), Status>,
    ids: Vec<u64>,
) -> Result<(), Status> {
    for h in ids {
        busy.remove(&h);
    }
    let (n, t) = r?;
    total.ingested += n;
    total.truncated += t;
    Ok(())
}

/// The caller's deadline (the `grpc-timeout` header), if any, cut to `max`.
fn deadline<T>(req: &Request<T>, max: Duration) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    shoal_proto::limits::parse_grpc_timeout(v, max)
}

#[tonic::async_trait]
impl pb::shoal_server::Shoal for ShoalService {
    async fn ingest(
        &self,
        req: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        self.allow(
            req.metadata(),
            "Ingest",
            &req.get_ref().collection,
            Role::Write,
        )?;
        let t = std::time::Instant::now();
        let span = span_for(
            tracing::info_span!("shoal.ingest", collection = %req.get_ref().collection, documents = req.get_ref().documents.len()),
            &req,
        );
        let (ingested, truncated) = self.0.ingest(req.into_inner()).instrument(span).await?;
        metrics::counter!("shoal_gateway_ingested_documents_total").increment(ingested);
        self.0.stats.record_ingest(ingested);
        metrics::histogram!("shoal_gateway_ingest_duration_seconds")
            .record(t.elapsed().as_secs_f64());
        Ok(Response::new(pb::IngestResponse {
            ingested,
            truncated,
        }))
    }

    async fn ingest_stream(
        &self,
        req: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let metadata = req.metadata().clone();
        let mut stream = req.into_inner();
        let mut total = pb::IngestResponse::default();
        // Pipelined (issue 18): up to STREAM_PIPELINE batches are encoded and written at
        // once, so a client streaming a bulk load is not held to one round trip per
        // batch. A batch naming an id a batch in flight also names waits for the
        // pipeline to empty: a stream's writes of one id apply in the stream's order.
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut busy = std::collections::HashSet::<u64>::new();
        let failed = |total: &pb::IngestResponse, s: Status| {
            Status::new(
                s.code(),
                format!(
                    "after {} documents acknowledged: {}",
                    total.ingested,
                    s.message()
                ),
            )
        };
        let mut ended = false;
        loop {
            tokio::select! {
                batch = stream.next(), if !ended && in_flight.len() < STREAM_PIPELINE => {
                    let Some(batch) = batch else {
                        ended = true;
                        continue;
                    };
                    let batch = batch?;
                    // Each batch names its collection: the key is checked for each.
                    self.allow(&metadata, "IngestStream", &batch.collection, Role::Write)?;
                    let ids: Vec<u64> = batch.documents.iter().map(|d| id_hash(&d.id)).collect();
                    if ids.iter().any(|h| busy.contains(h)) {
                        while let Some((r, done)) = in_flight.next().await {
                            settle(&mut total, &mut busy, r, done).map_err(|s| failed(&total, s))?;
                        }
                    }
                    busy.extend(ids.iter().copied());
                    let gateway = &self.0;
                    in_flight.push(async move { (gateway.ingest(batch).await, ids) });
                }
                Some((r, done)) = in_flight.next(), if !in_flight.is_empty() => {
                    settle(&mut total, &mut busy, r, done).map_err(|s| failed(&total, s))?;
                }
                else => break,
            }
        }
        Ok(Response::new(total))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.allow(
            req.metadata(),
            "Delete",
            &req.get_ref().collection,
            Role::Write,
        )?;
        let span = span_for(
            tracing::info_span!("shoal.delete", collection = %req.get_ref().collection),
            &req,
        );
        let deleted = self.0.delete(req.into_inner()).instrument(span).await?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.allow(req.metadata(), "Get", &req.get_ref().collection, Role::Read)?;
        let span = span_for(
            tracing::info_span!("shoal.get", collection = %req.get_ref().collection),
            &req,
        );
        Ok(Response::new(
            self.0.get(req.into_inner()).instrument(span).await?,
        ))
    }

    async fn search_batch(
        &self,
        req: Request<pb::SearchBatchRequest>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        // Every search's collection, each with the caller's key (an empty batch is
        // still the key's to make).
        if req.get_ref().searches.is_empty() {
            self.allow(req.metadata(), "SearchBatch", "", Role::Read)?;
            return Err(Status::invalid_argument(
                "a batch needs at least one search",
            ));
        }
        for s in &req.get_ref().searches {
            self.allow(req.metadata(), "SearchBatch", &s.collection, Role::Read)?;
        }
        let d = deadline(&req, self.0.limits.max_deadline());
        let span = span_for(
            tracing::info_span!(
                "shoal.search_batch",
                searches = req.get_ref().searches.len()
            ),
            &req,
        );
        Ok(Response::new(
            self.0
                .search_batch(req.into_inner(), d)
                .instrument(span)
                .await?,
        ))
    }

    async fn delete_by_filter(
        &self,
        req: Request<pb::DeleteByFilterRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.allow(
            req.metadata(),
            "DeleteByFilter",
            &req.get_ref().collection,
            Role::Write,
        )?;
        let span = span_for(
            tracing::info_span!("shoal.delete_by_filter", collection = %req.get_ref().collection),
            &req,
        );
        let deleted = self
            .0
            .delete_by_filter(req.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn set_payload(
        &self,
        req: Request<pb::SetPayloadRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        self.allow(
            req.metadata(),
            "SetPayload",
            &req.get_ref().collection,
            Role::Write,
        )?;
        let span = span_for(
            tracing::info_span!("shoal.set_payload", collection = %req.get_ref().collection),
            &req,
        );
        let (ingested, truncated) = self
            .0
            .set_payload(req.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(pb::IngestResponse {
            ingested,
            truncated,
        }))
    }

    async fn count(
        &self,
        req: Request<pb::CountRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        self.allow(
            req.metadata(),
            "Count",
            &req.get_ref().collection,
            Role::Read,
        )?;
        let span = span_for(
            tracing::info_span!("shoal.count", collection = %req.get_ref().collection),
            &req,
        );
        Ok(Response::new(
            self.0.count(req.into_inner()).instrument(span).await?,
        ))
    }

    async fn scroll(
        &self,
        req: Request<pb::ScrollRequest>,
    ) -> Result<Response<pb::ScrollResponse>, Status> {
        self.allow(
            req.metadata(),
            "Scroll",
            &req.get_ref().collection,
            Role::Read,
        )?;
        let span = span_for(
            tracing::info_span!("shoal.scroll", collection = %req.get_ref().collection),
            &req,
        );
        Ok(Response::new(
            self.0.scroll(req.into_inner()).instrument(span).await?,
        ))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        self.allow(
            req.metadata(),
            "Search",
            &req.get_ref().collection,
            Role::Read,
        )?;
        let d = deadline(&req, self.0.limits.max_deadline());
        let t = std::time::Instant::now();
        let span = span_for(
            tracing::info_span!("shoal.search", collection = %req.get_ref().collection, k = req.get_ref().k),
            &req,
        );
        let r = self.0.search(req.into_inner(), d).instrument(span).await;
        let outcome = match &r {
            Ok(r) if r.partial => "partial",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::counter!("shoal_gateway_searches_total", "outcome" => outcome).increment(1);
        metrics::histogram!("shoal_gateway_search_duration_seconds")
            .record(t.elapsed().as_secs_f64());
        self.0.stats.record_search(
            t.elapsed().as_secs_f64() * 1e3,
            outcome == "partial",
            outcome == "error",
        );
        Ok(Response::new(r?))
    }

    async fn build_index(
        &self,
        req: Request<pb::BuildIndexRequest>,
    ) -> Result<Response<pb::BuildIndexResponse>, Status> {
        let target = req.get_ref().collection.clone();
        let who = self.allow(req.metadata(), "BuildIndex", &target, Role::Admin)?;
        // The caller's key starts the operation at the coordinators (its role checked
        // there too); the call follows it until its deadline at most.
        let key = shoal_proto::auth::presented(req.metadata()).map(str::to_string);
        let max = self.0.limits.node_request_timeout();
        let wait = deadline(&req, max)
            .unwrap_or(max)
            .saturating_sub(Duration::from_secs(1));
        let out = self
            .0
            .build_index(req.into_inner(), key.as_deref(), wait)
            .await
            .map(Response::new);
        shoal_proto::audit::admin(&who, "BuildIndex", &target, &out);
        out
    }
}

/// The internal `Replica` service: a thin adapter from tonic to this node's
/// [`LocalReplicas`] (a server span per call, continuing the caller's trace).
pub struct ReplicaService(pub Arc<LocalReplicas>);

#[tonic::async_trait]
impl rpb::replica_server::Replica for ReplicaService {
    async fn write(
        &self,
        req: Request<rpb::WriteRequest>,
    ) -> Result<Response<rpb::WriteResponse>, Status> {
        let span = span_for(tracing::info_span!("replica.write"), &req);
        let r = self.0.write_now(req.into_inner()).instrument(span).await?;
        Ok(Response::new(r))
    }

    async fn append(
        &self,
        req: Request<rpb::AppendRequest>,
    ) -> Result<Response<rpb::AppendResponse>, Status> {
        Ok(Response::new(self.0.append_now(req.into_inner()).await?))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<rpb::SnapshotChunk>>,
    ) -> Result<Response<rpb::AppendResponse>, Status> {
        let stream = req
            .into_inner()
            .map(|c| c.map_err(ReplicaError::from))
            .boxed();
        Ok(Response::new(self.0.install_snapshot_now(stream).await?))
    }

    async fn snapshot_staged(
        &self,
        req: Request<rpb::SnapshotStagedRequest>,
    ) -> Result<Response<rpb::SnapshotStagedResponse>, Status> {
        Ok(Response::new(
            self.0.snapshot_staged_now(req.into_inner()).await?,
        ))
    }

    async fn fetch_generation(
        &self,
        req: Request<rpb::FetchGenerationRequest>,
    ) -> Result<Response<rpb::FetchGenerationResponse>, Status> {
        Ok(Response::new(
            self.0.fetch_generation_now(req.into_inner()).await?,
        ))
    }

    async fn search(
        &self,
        req: Request<rpb::ShardSearchRequest>,
    ) -> Result<Response<rpb::ShardSearchResponse>, Status> {
        let span = span_for(
            tracing::info_span!("replica.search", shard = tracing::field::Empty),
            &req,
        );
        if let Some(s) = &req.get_ref().shard {
            span.record("shard", s.index);
        }
        let r = self.0.search_now(req.into_inner()).instrument(span).await?;
        Ok(Response::new(r))
    }

    async fn search_many(
        &self,
        req: Request<rpb::ShardSearchBatch>,
    ) -> Result<Response<rpb::ShardSearchBatchResponse>, Status> {
        let span = span_for(
            tracing::info_span!(
                "replica.search_many",
                searches = req.get_ref().searches.len()
            ),
            &req,
        );
        let r = self
            .0
            .search_many_now(req.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(r))
    }

    async fn build(
        &self,
        req: Request<rpb::BuildRequest>,
    ) -> Result<Response<rpb::BuildResponse>, Status> {
        let span = span_for(tracing::info_span!("replica.build"), &req);
        let r = self.0.build_now(req.into_inner()).instrument(span).await?;
        Ok(Response::new(r))
    }

    async fn get(
        &self,
        req: Request<rpb::ShardGetRequest>,
    ) -> Result<Response<rpb::ShardGetResponse>, Status> {
        let span = span_for(tracing::info_span!("replica.get"), &req);
        let r = self.0.get_now(req.into_inner()).instrument(span).await?;
        Ok(Response::new(r))
    }
}
