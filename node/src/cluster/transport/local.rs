//! This process's replicas answering the replica protocol: the checks every caller
//! gets (limits, shard references, readability, positions before a snapshot) and the
//! calls into the replica actors and their replication. The tonic service
//! (`service::ReplicaService`) is a thin adapter over these handlers; the gateway calls
//! them directly for its own node's replicas.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ractor::rpc::CallResult;
use shoal_engine::{Document, Filter, SearchMode, SearchParams, ShardError, WriteOp};
use shoal_proto::coordinator as cpb;
use shoal_proto::limits::Limits;
use shoal_proto::replica as rpb;
use shoal_proto::within;
use tracing::Instrument;

use super::{ReplicaApi, SnapshotStream};
use crate::cluster::error::ReplicaError;
use crate::cluster::replicas::{HostedReplica, Registry, ReplicaKey, ReplicaMsg};
use crate::cluster::replication::Replication;
use crate::cluster::writes;

/// How long a replica actor may take to answer one call.
const ACTOR_CALL: Duration = Duration::from_secs(60);
/// Bytes of an index generation one FetchGeneration answer carries at most.
pub const GENERATION_CHUNK_BYTES: usize = 4 << 20;

/// One node's hosted replicas (actor and replication, by key) and the limits its
/// handlers check.
pub struct LocalReplicas {
    pub registry: Registry,
    pub limits: Limits,
    /// The replicas the map places here (the reconciler's last pass): one of them not
    /// open yet is opening (a split's sibling just cut over, a restart), and a call
    /// to it is answered [`ReplicaError::Moving`] (retried by gateways), not plain
    /// UNAVAILABLE.
    pub placed: parking_lot::RwLock<std::collections::HashSet<ReplicaKey>>,
    /// Search calls answered here (`Search` and `SearchMany` one each).
    pub search_calls: Arc<std::sync::atomic::AtomicU64>,
}

/// `fut` within `timeout`, or DEADLINE_EXCEEDED (what a gRPC caller would hear).
async fn within_deadline<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, ReplicaError>>,
) -> Result<T, ReplicaError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(ReplicaError::Deadline(
                "the call missed its deadline".into(),
            ))
        })
}

impl LocalReplicas {
    pub fn new(registry: Registry, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            registry,
            limits,
            placed: Default::default(),
            search_calls: Arc::default(),
        })
    }

    fn hosted(&self, r: Option<&cpb::ShardId>) -> Result<HostedReplica, ReplicaError> {
        let key = ReplicaKey::from_wire(r)?;
        if let Some(h) = self.registry.read().get(&key).cloned() {
            return Ok(h);
        }
        if self.placed.read().contains(&key) {
            return Err(ReplicaError::Moving(format!(
                "replica {key} is opening on this node; retry"
            )));
        }
        Err(ReplicaError::Unavailable(format!(
            "replica {key} is not open on this node"
        )))
    }

    async fn call<T>(
        actor: ractor::ActorRef<ReplicaMsg>,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<T, ShardError>>) -> ReplicaMsg,
    ) -> Result<T, ReplicaError>
    where
        T: Send + 'static,
    {
        match actor.call(msg, Some(ACTOR_CALL)).await {
            Ok(CallResult::Success(r)) => r.map_err(ReplicaError::from),
            Ok(CallResult::Timeout) => Err(ReplicaError::Deadline("replica timed out".into())),
            Ok(CallResult::SenderError) | Err(_) => Err(ReplicaError::Unavailable(
                "replica restarted during the call; retry".into(),
            )),
        }
    }

    /// A write on this node's primary replica: limits checked, documents validated,
    /// then ordered, logged and replicated to the quorum.
    pub async fn write_now(
        &self,
        r: rpb::WriteRequest,
    ) -> Result<rpb::WriteResponse, ReplicaError> {
        let l = &self.limits;
        writes::check_batch(
            l,
            r.upserts.len(),
            r.deletes.len(),
            &r.request_id,
            writes::SHARD_SUFFIX_BYTES,
        )?;
        writes::check_ids(l, &r.deletes)?;
        // A conditional write's expectations: at most one per document it writes.
        if r.expect.len() > r.upserts.len() + r.deletes.len() {
            return Err(ReplicaError::Invalid(format!(
                "{} expectations for a write of {} documents: at most one each",
                r.expect.len(),
                r.upserts.len() + r.deletes.len()
            )));
        }
        let expect: Vec<shoal_engine::Expect> = r
            .expect
            .into_iter()
            .map(|e| shoal_engine::Expect {
                id: e.id,
                version: e.version,
            })
            .collect();
        writes::check_ids(l, &expect.iter().map(|e| e.id.clone()).collect::<Vec<_>>())?;
        let repl = self.hosted(r.shard.as_ref())?.repl;
        // Checked early for a clear refusal; `write` checks again after the seal.
        repl.check_routing(r.shard_count)?;
        let mut ops = Vec::with_capacity(r.upserts.len() + r.deletes.len());
        for (i, d) in r.upserts.into_iter().enumerate() {
            let metadata = writes::check_document(
                l,
                &format!("document {i}"),
                &d.id,
                &d.text,
                d.metadata_json,
            )?;
            // During a re-embed (issue 21) the new model's vector follows its upsert.
            let set = (r.set_tag != 0 && !d.set_vector.is_empty()).then(|| WriteOp::SetVector {
                tag: r.set_tag,
                id: d.id.clone(),
                version: 0,
                vector: d.set_vector,
            });
            ops.push(WriteOp::Upsert(Document {
                id: d.id,
                text: (!d.text.is_empty()).then_some(d.text),
                metadata,
                vector: d.vector,
            }));
            ops.extend(set);
        }
        ops.extend(r.deletes.into_iter().map(WriteOp::Delete));
        let (ack, replicas) = repl
            .write_if(ops, r.request_id, r.shard_count, expect)
            .await?;
        Ok(rpb::WriteResponse {
            seq: ack.seq,
            upserted: ack.upserted as u64,
            deleted: ack.deleted as u64,
            duplicate: ack.duplicate,
            replicas,
        })
    }

    /// A backup's side of Append (fencing and history checks in `Replication`).
    pub async fn append_now(
        &self,
        r: rpb::AppendRequest,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        within!(
            self.limits,
            node_id_bytes,
            r.primary.len(),
            "the primary's id length"
        )?;
        let repl = self.hosted(r.shard.as_ref())?.repl;
        repl.append(r).await
    }

    /// A backup's side of InstallSnapshot: fenced by epoch, refused when this replica
    /// is ahead (unless the sender's probe decided it may be overwritten), received
    /// into staging, swapped in by the replica's actor.
    pub async fn install_snapshot_now(
        &self,
        mut stream: SnapshotStream,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        let first = stream
            .next()
            .await
            .ok_or_else(|| ReplicaError::Invalid("empty snapshot stream".into()))??;
        within!(
            self.limits,
            node_id_bytes,
            first.primary.len(),
            "the primary's id length"
        )?;
        let HostedReplica { actor, repl } = self.hosted(first.shard.as_ref())?;
        let _g = repl.lock_apply().await;
        repl.accept_epoch(first.epoch, &first.primary)?;
        // Never moved backwards: a replica ahead of the snapshot may hold acknowledged
        // writes its sender lost, unless the sender's probe found that what it holds
        // past the snapshot was never acknowledged (`Role::overwrites_ahead`: an
        // operator's forced epoch, or this replica is a copy outside the quorum).
        let (snap_seq, snap_epoch) = shoal_engine::Shard::manifest_position(&first.manifest)
            .map_err(|e| ReplicaError::Invalid(e.to_string()))?;
        let (own_seq, own_epoch) = repl.shard()?.last();
        if (own_epoch, own_seq) > (snap_epoch, snap_seq) && !first.forced {
            return Err(ReplicaError::Refused(format!(
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
        Ok(rpb::AppendResponse {
            ok: true,
            last_seq,
            last_epoch,
        })
    }

    /// What this backup holds of an unfinished snapshot from `req.primary` (fenced by
    /// epoch like the snapshot itself).
    pub async fn snapshot_staged_now(
        &self,
        req: rpb::SnapshotStagedRequest,
    ) -> Result<rpb::SnapshotStagedResponse, ReplicaError> {
        within!(
            self.limits,
            node_id_bytes,
            req.primary.len(),
            "the primary's id length"
        )?;
        let HostedReplica { repl, .. } = self.hosted(req.shard.as_ref())?;
        let _g = repl.lock_apply().await;
        repl.accept_epoch(req.epoch, &req.primary)?;
        Ok(rpb::SnapshotStagedResponse {
            files: repl.staged_snapshot(self.limits.snapshot_files).await?,
        })
    }

    /// One shard's generate-rank search, on a replica that holds every acknowledged
    /// write; its cost bounded before it runs.
    pub async fn search_now(
        &self,
        r: rpb::ShardSearchRequest,
    ) -> Result<rpb::ShardSearchResponse, ReplicaError> {
        self.count_search_call("one");
        self.search_one(r).await
    }

    fn count_search_call(&self, kind: &'static str) {
        self.search_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("shoal_replica_search_calls_total", "kind" => kind).increment(1);
    }

    async fn search_one(
        &self,
        mut r: rpb::ShardSearchRequest,
    ) -> Result<rpb::ShardSearchResponse, ReplicaError> {
        let HostedReplica { actor, repl } = self.hosted(r.shard.as_ref())?;
        repl.check_readable()?;
        repl.check_routing(r.shard_count)?;
        let l = &self.limits;
        if r.k == 0 {
            return Err(ReplicaError::Invalid("k = 0: k must be at least 1".into()));
        }
        within!(l, k, r.k, "k")?;
        within!(l, refine, r.refine, "refine")?;
        let shard = repl.shard()?;
        let lexical = r.lexical.take();
        if let Some(q) = &lexical {
            // The terms come from a query text the gateway bounded; a peer's are
            // bounded the same way.
            let bytes: usize = q.terms.iter().map(String::len).sum();
            within!(l, query_text_bytes, bytes, "bytes of the query's terms")?;
        } else if r.exact {
            // An exact search reads every row: its cost, bounded by the row count.
            within!(
                l,
                exact_rows,
                shard.rows(),
                format!("rows an exact search of shard {} would scan", repl.key)
            )
            .map_err(|e| ReplicaError::TooCostly(e.to_string()))?;
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
        // Answered from the vectors of the query's model (issue 21: a re-embed's set, or
        // the stored ones), or refused: never a query of one model against another's.
        let set = shard.set_for_model(&r.model)?;
        // The filter (issue 22), checked by the gateway against the map's indexed
        // fields: a replica that has not indexed one yet (the map's change reaches it
        // after the gateway's) cannot answer it, and says so; another may.
        let filter = match &r.filter {
            None => None,
            Some(f) => {
                let f = Filter::from_wire(f).map_err(ReplicaError::Invalid)?;
                f.check(&shard.payload_fields(), l)
                    .map_err(|e| ReplicaError::Unavailable(format!("shard {}: {e}", repl.key)))?;
                Some(Arc::new(f))
            }
        };
        if r.count_only {
            let n = shoal_engine::run_blocking(move || shard.count(filter.as_deref())).await?;
            repl.check_routing(r.shard_count)?;
            return Ok(rpb::ShardSearchResponse {
                count: n,
                ..Default::default()
            });
        }
        if let Some(q) = r.scroll.take() {
            let limit = r.k as usize;
            let page = shoal_engine::run_blocking(move || {
                shard.scroll(q.layout, q.from_row, limit, filter.as_deref())
            })
            .await?;
            repl.check_routing(r.shard_count)?;
            let res = shoal_engine::SearchResult {
                hits: page
                    .ids
                    .into_iter()
                    .map(|id| shoal_engine::Hit { id, score: 0.0 })
                    .collect(),
                generation: None,
                fresh_rows: 0,
                plan: None,
            };
            let mut out = self.answer(&repl, &r, res, set).await?;
            out.layout = page.layout;
            out.next_row = page.next_row.unwrap_or(0);
            out.done = page.next_row.is_none();
            return Ok(out);
        }
        if let Some(q) = lexical {
            let res = if q.stats_only {
                let s =
                    shoal_engine::run_blocking(move || Ok(shard.lexical_stats(&q.terms))).await?;
                return Ok(rpb::ShardSearchResponse {
                    stats: Some(rpb::LexicalStats {
                        docs: s.docs,
                        total_len: s.total_len,
                        df: s.df,
                    }),
                    ..Default::default()
                });
            } else {
                let k = r.k as usize;
                shoal_engine::run_blocking(move || {
                    let bm25 = shoal_engine::Bm25 { k1: q.k1, b: q.b };
                    shard.lexical_search(&q.terms, &q.idf, q.avg_len, bm25, k, filter.as_deref())
                })
                .await?
            };
            repl.check_routing(r.shard_count)?;
            return self.answer(&repl, &r, res, set).await;
        }
        drop(shard);
        let p = SearchParams {
            filter,
            set,
            k: r.k as usize,
            nprobe: (r.nprobe > 0).then_some(r.nprobe as usize),
            refine_factor: (r.refine > 0).then_some(r.refine as usize),
            mode: if r.exact {
                SearchMode::Exact
            } else {
                SearchMode::Rerank
            },
            plan: None,
        };
        let vector = std::mem::take(&mut r.vector);
        let res = Self::call(actor, |reply| ReplicaMsg::Search(vector, p, reply)).await?;
        // Routing changed during the search (a split's cut-over reached this node):
        // the engine may have filtered or retained by the new one. Asked again.
        repl.check_routing(r.shard_count)?;
        self.answer(&repl, &r, res, set).await
    }

    /// Several searches of one shard (a batch search's part, issue 22): each as
    /// [`Self::search_now`] answers it, run at once; the first to fail fails the call,
    /// named by its place in the batch. The texts and metadata of the whole answer are
    /// bounded by `payload_bytes`, as one search's are.
    pub async fn search_many_now(
        &self,
        b: rpb::ShardSearchBatch,
    ) -> Result<rpb::ShardSearchBatchResponse, ReplicaError> {
        let l = &self.limits;
        within!(
            l,
            searches_per_batch,
            b.searches.len(),
            "searches in one batch"
        )?;
        if let Some(first) = b.searches.first() {
            if b.searches.iter().any(|s| s.shard != first.shard) {
                return Err(ReplicaError::Invalid(
                    "a batch's searches must all name one shard".into(),
                ));
            }
        }
        self.count_search_call("many");
        let n = b.searches.len();
        let all = b.searches.into_iter().map(|r| self.search_one(r));
        let mut results = Vec::with_capacity(n);
        let mut bytes = 0usize;
        for (i, r) in futures::future::join_all(all).await.into_iter().enumerate() {
            let r = r.map_err(|e| e.context(format_args!("search {i} of {n}")))?;
            bytes += r
                .hits
                .iter()
                .map(|h| h.text.len() + h.metadata_json.len() + 4 * h.vector.len())
                .sum::<usize>();
            results.push(r);
        }
        within!(
            l,
            payload_bytes,
            bytes,
            format!("bytes of the hits' texts, metadata and vectors of {n} searches")
        )
        .map_err(|e| ReplicaError::TooCostly(e.to_string()))?;
        Ok(rpb::ShardSearchBatchResponse { results })
    }

    /// A shard search's hits as they travel: with their texts, metadata and vectors
    /// when asked, read here in the same round trip (issue 22), within `payload_bytes`.
    async fn answer(
        &self,
        repl: &Arc<Replication>,
        r: &rpb::ShardSearchRequest,
        res: shoal_engine::SearchResult,
        set: Option<u64>,
    ) -> Result<rpb::ShardSearchResponse, ReplicaError> {
        let mut hits: Vec<rpb::ShardHit> = res
            .hits
            .iter()
            .map(|h| rpb::ShardHit {
                id: h.id.to_string(),
                score: h.score,
                ..Default::default()
            })
            .collect();
        if r.with_text || r.with_payload {
            // The hits' documents, read here in the same round trip (issue 22).
            let shard = repl.shard()?;
            let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
            let docs = shoal_engine::run_blocking(move || {
                shard.payloads(&ids.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .await?;
            let mut bytes = 0usize;
            for (h, d) in hits.iter_mut().zip(docs) {
                let Some(d) = d else { continue };
                if r.with_text {
                    h.text = d.text.unwrap_or_default();
                }
                if r.with_payload {
                    h.metadata_json = d.metadata;
                }
                bytes += h.text.len() + h.metadata_json.len();
            }
            within!(
                self.limits,
                payload_bytes,
                bytes,
                format!("bytes of the {} hits' texts and metadata", hits.len())
            )
            .map_err(|e| ReplicaError::TooCostly(e.to_string()))?;
        }
        if r.with_vectors {
            // The vectors of the model the query was searched with (issue 22: a
            // re-embed's set while one serves the query's model).
            let shard = repl.shard()?;
            let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
            let vectors = shoal_engine::run_blocking(move || {
                shard.vectors_of(&ids.iter().map(String::as_str).collect::<Vec<_>>(), set)
            })
            .await?;
            for (h, v) in hits.iter_mut().zip(vectors) {
                h.vector = v.unwrap_or_default();
            }
        }
        Ok(rpb::ShardSearchResponse {
            hits,
            generation: res.generation.unwrap_or(0),
            plan: res.plan.map(|p| p.name().to_string()).unwrap_or_default(),
            ..Default::default()
        })
    }

    /// A new index generation on this replica.
    pub async fn build_now(
        &self,
        r: rpb::BuildRequest,
    ) -> Result<rpb::BuildResponse, ReplicaError> {
        let actor = self.hosted(r.shard.as_ref())?.actor;
        let g = Self::call(actor, ReplicaMsg::Build).await?;
        Ok(rpb::BuildResponse {
            generation: g.id,
            indexed_vectors: g.indexed_vectors,
            build_seconds: g.build_seconds,
        })
    }

    /// A piece of this replica's serving generation `r.generation`: at most
    /// [`GENERATION_CHUNK_BYTES`] from `r.offset`, read on the blocking pool.
    pub async fn fetch_generation_now(
        &self,
        r: rpb::FetchGenerationRequest,
    ) -> Result<rpb::FetchGenerationResponse, ReplicaError> {
        let shard = self.hosted(r.shard.as_ref())?.repl.shard()?;
        let max = match r.max_bytes as usize {
            0 => GENERATION_CHUNK_BYTES,
            n => n.min(GENERATION_CHUNK_BYTES),
        };
        let c =
            shoal_engine::run_blocking(move || shard.generation_chunk(r.generation, r.offset, max))
                .await?;
        Ok(rpb::FetchGenerationResponse {
            meta: c.meta,
            data: c.data,
            total: c.total,
        })
    }

    /// One document by id, from a replica that holds every acknowledged write.
    pub async fn get_now(
        &self,
        r: rpb::ShardGetRequest,
    ) -> Result<rpb::ShardGetResponse, ReplicaError> {
        let HostedReplica { actor, repl } = self.hosted(r.shard.as_ref())?;
        repl.check_readable()?;
        repl.check_routing(r.shard_count)?;
        let doc = Self::call(actor, |reply| ReplicaMsg::Get(r.id, reply)).await?;
        repl.check_routing(r.shard_count)?;
        Ok(rpb::ShardGetResponse {
            found: doc.is_some(),
            version: doc.as_ref().map_or(0, |d| d.seq),
            doc: doc.map(|d| rpb::StoredDoc {
                id: d.id,
                text: d.text.unwrap_or_default(),
                metadata_json: d.metadata.into_string(),
                vector: d.vector,
                set_vector: Vec::new(),
            }),
        })
    }
}

/// Called in process: each call gets the span the tonic service would open for it (a
/// child of the caller's), so a trace reads the same whichever way the call went.
#[tonic::async_trait]
impl ReplicaApi for LocalReplicas {
    async fn write(
        &self,
        req: rpb::WriteRequest,
        timeout: Duration,
    ) -> Result<rpb::WriteResponse, ReplicaError> {
        within_deadline(timeout, self.write_now(req))
            .instrument(tracing::info_span!("replica.write"))
            .await
    }

    async fn append(
        &self,
        req: rpb::AppendRequest,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        within_deadline(timeout, self.append_now(req)).await
    }

    async fn install_snapshot(
        &self,
        chunks: SnapshotStream,
        timeout: Duration,
    ) -> Result<rpb::AppendResponse, ReplicaError> {
        within_deadline(timeout, self.install_snapshot_now(chunks)).await
    }

    async fn snapshot_staged(
        &self,
        req: rpb::SnapshotStagedRequest,
        timeout: Duration,
    ) -> Result<rpb::SnapshotStagedResponse, ReplicaError> {
        within_deadline(timeout, self.snapshot_staged_now(req)).await
    }

    async fn search(
        &self,
        req: rpb::ShardSearchRequest,
        timeout: Duration,
    ) -> Result<rpb::ShardSearchResponse, ReplicaError> {
        let span = tracing::info_span!(
            "replica.search",
            shard = req.shard.as_ref().map(|s| s.index)
        );
        within_deadline(timeout, self.search_now(req))
            .instrument(span)
            .await
    }

    async fn search_many(
        &self,
        req: rpb::ShardSearchBatch,
        timeout: Duration,
    ) -> Result<rpb::ShardSearchBatchResponse, ReplicaError> {
        let span = tracing::info_span!(
            "replica.search_many",
            searches = req.searches.len(),
            shard = req
                .searches
                .first()
                .and_then(|r| r.shard.as_ref())
                .map(|s| s.index)
        );
        within_deadline(timeout, self.search_many_now(req))
            .instrument(span)
            .await
    }

    async fn get(
        &self,
        req: rpb::ShardGetRequest,
        timeout: Duration,
    ) -> Result<rpb::ShardGetResponse, ReplicaError> {
        within_deadline(timeout, self.get_now(req))
            .instrument(tracing::info_span!("replica.get"))
            .await
    }

    async fn build(
        &self,
        req: rpb::BuildRequest,
        timeout: Duration,
    ) -> Result<rpb::BuildResponse, ReplicaError> {
        within_deadline(timeout, self.build_now(req))
            .instrument(tracing::info_span!("replica.build"))
            .await
    }

    async fn fetch_generation(
        &self,
        req: rpb::FetchGenerationRequest,
        timeout: Duration,
    ) -> Result<rpb::FetchGenerationResponse, ReplicaError> {
        within_deadline(timeout, self.fetch_generation_now(req)).await
    }
}
