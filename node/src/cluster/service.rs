//! The node's gRPC services: public `Shoal` (through the gateway) and internal
//! `Replica` (one shard replica's operations, through its actor).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ractor::rpc::CallResult;
use shoal_proto::replica as rpb;
use shoal_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::gateway::Gateway;
use super::replicas::{Registry, ReplicaKey, ReplicaMsg};
use super::replication::{shard_status, Replication};
use super::Replications;
use crate::shard::{Document, SearchMode, SearchParams, ShardError, WriteOp};
use crate::telemetry;
use shoal_proto::limits::Limits;
use shoal_proto::within;

/// A server span for `req`, continuing the caller's trace if it sent one.
fn span_for<T>(span: tracing::Span, req: &Request<T>) -> tracing::Span {
    telemetry::adopt(&span, req);
    span
}

pub struct ShoalService(pub Arc<Gateway>);

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
        let t = std::time::Instant::now();
        let span = span_for(
            tracing::info_span!("shoal.ingest", collection = %req.get_ref().collection, documents = req.get_ref().documents.len()),
            &req,
        );
        let (ingested, truncated) = self.0.ingest(req.into_inner()).instrument(span).await?;
        metrics::counter!("shoal_gateway_ingested_documents_total").increment(ingested);
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
        let mut stream = req.into_inner();
        let mut total = pb::IngestResponse::default();
        while let Some(batch) = stream.next().await {
            let (n, t) = self.0.ingest(batch?).await.map_err(|s| {
                Status::new(
                    s.code(),
                    format!(
                        "after {} documents acknowledged: {}",
                        total.ingested,
                        s.message()
                    ),
                )
            })?;
            total.ingested += n;
            total.truncated += t;
        }
        Ok(Response::new(total))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let span = span_for(
            tracing::info_span!("shoal.delete", collection = %req.get_ref().collection),
            &req,
        );
        let deleted = self.0.delete(req.into_inner()).instrument(span).await?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let span = span_for(
            tracing::info_span!("shoal.get", collection = %req.get_ref().collection),
            &req,
        );
        Ok(Response::new(
            self.0.get(req.into_inner()).instrument(span).await?,
        ))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
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
        Ok(Response::new(r?))
    }

    async fn build_index(
        &self,
        req: Request<pb::BuildIndexRequest>,
    ) -> Result<Response<pb::BuildIndexResponse>, Status> {
        Ok(Response::new(self.0.build_index(req.into_inner()).await?))
    }
}

pub struct ReplicaService {
    pub registry: Registry,
    pub replications: Replications,
    pub limits: Limits,
}

fn replica_key(r: Option<&rpb::ShardRef>) -> Result<ReplicaKey, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("shard reference missing"))?;
    // Checked against the default: the name is echoed in errors and no collection's
    // name is longer (the map refuses more than 128 bytes).
    within!(
        Limits::default(),
        name_bytes,
        r.collection.len(),
        "the collection name's length"
    )?;
    Ok(ReplicaKey {
        collection: r.collection.clone(),
        collection_id: r.collection_id,
        index: r.index,
    })
}

impl ReplicaService {
    fn actor(&self, r: Option<rpb::ShardRef>) -> Result<ractor::ActorRef<ReplicaMsg>, Status> {
        let key = replica_key(r.as_ref())?;
        self.registry
            .read()
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::unavailable(format!("replica {key} is not open on this node")))
    }

    fn replication(&self, r: Option<&rpb::ShardRef>) -> Result<Arc<Replication>, Status> {
        let key = replica_key(r)?;
        self.replications
            .read()
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::unavailable(format!("replica {key} is not open on this node")))
    }

    /// Reads go to replicas that hold every acknowledged write.
    fn readable(&self, r: Option<&rpb::ShardRef>) -> Result<(), Status> {
        self.replication(r)?.check_readable()
    }

    async fn call<T>(
        actor: ractor::ActorRef<ReplicaMsg>,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<T, ShardError>>) -> ReplicaMsg,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
    {
        match actor.call(msg, Some(Duration::from_secs(60))).await {
            Ok(CallResult::Success(r)) => r.map_err(shard_status),
            Ok(CallResult::Timeout) => Err(Status::deadline_exceeded("replica timed out")),
            Ok(CallResult::SenderError) | Err(_) => Err(Status::unavailable(
                "replica restarted during the call; retry",
            )),
        }
    }
}

#[tonic::async_trait]
impl rpb::replica_server::Replica for ReplicaService {
    async fn write(
        &self,
        req: Request<rpb::WriteRequest>,
    ) -> Result<Response<rpb::WriteResponse>, Status> {
        let span = span_for(tracing::info_span!("replica.write"), &req);
        let _g = span.enter();
        let r = req.into_inner();
        let l = &self.limits;
        within!(
            l,
            docs_per_request,
            r.upserts.len(),
            "documents in the write"
        )?;
        within!(l, ids_per_delete, r.deletes.len(), "ids in the write")?;
        // The gateway appends "#<shard>" (at most 11 bytes) to a client's request id.
        if r.request_id.len() > l.request_id_bytes + 11 {
            return Err(Status::invalid_argument(format!(
                "the request id is {} bytes, over the limit request_id_bytes = {} (+11 for \
                 the shard suffix)",
                r.request_id.len(),
                l.request_id_bytes
            )));
        }
        let repl = self.replication(r.shard.as_ref())?;
        let mut ops = Vec::with_capacity(r.upserts.len() + r.deletes.len());
        for d in r.upserts {
            within!(l, id_bytes, d.id.len(), "a document id's length")?;
            let metadata = if d.metadata_json.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&d.metadata_json).map_err(|e| {
                    Status::invalid_argument(format!("document {:?}: metadata: {e}", d.id))
                })?
            };
            ops.push(WriteOp::Upsert(Document {
                id: d.id,
                text: (!d.text.is_empty()).then_some(d.text),
                metadata,
                vector: d.vector,
            }));
        }
        ops.extend(r.deletes.into_iter().map(WriteOp::Delete));
        drop(_g);
        let (ack, replicas) = repl.write(ops, r.request_id).instrument(span).await?;
        Ok(Response::new(rpb::WriteResponse {
            seq: ack.seq,
            upserted: ack.upserted as u64,
            deleted: ack.deleted as u64,
            duplicate: ack.duplicate,
            replicas,
        }))
    }

    async fn append(
        &self,
        req: Request<rpb::AppendRequest>,
    ) -> Result<Response<rpb::AppendResponse>, Status> {
        let r = req.into_inner();
        within!(
            self.limits,
            node_id_bytes,
            r.primary.len(),
            "the primary's id length"
        )?;
        let repl = self.replication(r.shard.as_ref())?;
        Ok(Response::new(repl.append(r).await?))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<rpb::SnapshotChunk>>,
    ) -> Result<Response<rpb::AppendResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        within!(
            self.limits,
            node_id_bytes,
            first.primary.len(),
            "the primary's id length"
        )?;
        let repl = self.replication(first.shard.as_ref())?;
        let actor = self.actor(first.shard.clone())?;
        let _g = repl.lock_apply().await;
        repl.accept_epoch(first.epoch, &first.primary)?;
        // Never moved backwards: a replica ahead of the snapshot may hold acknowledged
        // writes its sender lost, unless the sender's probe found that what it holds
        // past the snapshot was never acknowledged (`Role::overwrites_ahead`: an
        // operator's forced epoch, or this replica is a copy outside the quorum).
        let (snap_seq, snap_epoch) = crate::shard::Shard::manifest_position(&first.manifest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (own_seq, own_epoch) = repl.shard()?.last();
        if (own_epoch, own_seq) > (snap_epoch, snap_seq) && !first.forced {
            return Err(Status::failed_precondition(format!(
                "replica {} is ahead of the snapshot from {} (epoch {own_epoch} seq {own_seq} \
                 > epoch {snap_epoch} seq {snap_seq}); not overwriting it",
                repl.key, first.primary
            )));
        }
        repl.mark_behind();
        let (staging, bytes) = repl
            .receive_snapshot(&first, &mut stream, self.limits.snapshot_files)
            .await?;
        Self::call(actor, |reply| ReplicaMsg::Install(staging, reply)).await?;
        let (last_seq, last_epoch) = repl.shard()?.last();
        tracing::info!(replica = %repl.key, seq = last_seq, bytes, from = %first.primary, "snapshot installed");
        Ok(Response::new(rpb::AppendResponse {
            ok: true,
            last_seq,
            last_epoch,
        }))
    }

    async fn search(
        &self,
        req: Request<rpb::ShardSearchRequest>,
    ) -> Result<Response<rpb::ShardSearchResponse>, Status> {
        let span = span_for(
            tracing::info_span!("replica.search", shard = tracing::field::Empty),
            &req,
        );
        let r = req.into_inner();
        if let Some(s) = &r.shard {
            span.record("shard", s.index);
        }
        let repl = self.replication(r.shard.as_ref())?;
        repl.check_readable()?;
        let l = &self.limits;
        if r.k == 0 {
            return Err(Status::invalid_argument("k = 0: k must be at least 1"));
        }
        within!(l, k, r.k, "k")?;
        within!(l, refine, r.refine, "refine")?;
        let shard = repl.shard()?;
        if r.exact {
            // An exact search reads every row: its cost, bounded by the row count.
            within!(
                l,
                exact_rows,
                shard.rows(),
                format!("rows an exact search of shard {} would scan", repl.key)
            )
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        } else {
            let refine = if r.refine == 0 {
                shard.config().refine_factor
            } else {
                r.refine as usize
            };
            within!(
                l,
                candidates,
                r.k as u64 * refine as u64,
                format!("k × refine ({} × {refine})", r.k)
            )?;
        }
        drop(shard);
        let actor = self.actor(r.shard)?;
        let p = SearchParams {
            k: r.k as usize,
            nprobe: (r.nprobe > 0).then_some(r.nprobe as usize),
            refine_factor: (r.refine > 0).then_some(r.refine as usize),
            mode: if r.exact {
                SearchMode::Exact
            } else {
                SearchMode::Rerank
            },
        };
        let res = Self::call(actor, |reply| ReplicaMsg::Search(r.vector, p, reply))
            .instrument(span)
            .await?;
        Ok(Response::new(rpb::ShardSearchResponse {
            hits: res
                .hits
                .into_iter()
                .map(|h| rpb::ShardHit {
                    id: h.id.to_string(),
                    score: h.score,
                })
                .collect(),
            generation: res.generation.unwrap_or(0),
        }))
    }

    async fn build(
        &self,
        req: Request<rpb::BuildRequest>,
    ) -> Result<Response<rpb::BuildResponse>, Status> {
        let span = span_for(tracing::info_span!("replica.build"), &req);
        let actor = self.actor(req.into_inner().shard)?;
        let g = Self::call(actor, ReplicaMsg::Build)
            .instrument(span)
            .await?;
        Ok(Response::new(rpb::BuildResponse {
            generation: g.id,
            indexed_vectors: g.indexed_vectors,
            build_seconds: g.build_seconds,
        }))
    }

    async fn get(
        &self,
        req: Request<rpb::ShardGetRequest>,
    ) -> Result<Response<rpb::ShardGetResponse>, Status> {
        let span = span_for(tracing::info_span!("replica.get"), &req);
        let r = req.into_inner();
        self.readable(r.shard.as_ref())?;
        let actor = self.actor(r.shard)?;
        let doc = Self::call(actor, |reply| ReplicaMsg::Get(r.id, reply))
            .instrument(span)
            .await?;
        Ok(Response::new(rpb::ShardGetResponse {
            found: doc.is_some(),
            doc: doc.map(|d| rpb::StoredDoc {
                id: d.id,
                text: d.text.unwrap_or_default(),
                metadata_json: if d.metadata.is_null() {
                    String::new()
                } else {
                    d.metadata.to_string()
                },
                vector: d.vector,
            }),
        }))
    }
}
