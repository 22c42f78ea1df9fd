//! The gateway: any node takes a client's request, encodes text once, routes documents
//! by a hash of their id to their shard, fans a query out to every shard within the
//! deadline, and merges one top k by exact score. Pure helpers (routing, validation,
//! merge) sit above the I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::{Mutex, RwLock};
use shoal_encoder::pool::{EncoderPool, PoolEncoded};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::filter::{Filter, PayloadField};
use shoal_proto::limits::{vector_problem, Limits};
use shoal_proto::metric::Metric;
use shoal_proto::replica as rpb;
use shoal_proto::v1 as pb;
use shoal_proto::within;
use std::collections::VecDeque;
use tonic::Status;
use tracing::Instrument;

use super::error::ReplicaError;
use super::fusion;
use super::mapview::MapView;
use super::transport::{ReplicaApi, Transports};
use super::writes;

/// Shard-call latencies kept for the hedging threshold.
const LATENCY_WINDOW: usize = 512;
/// How long a shard's primary may take to acknowledge a write (its quorum included).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The shard a document id belongs to (the one routing rule, `shoal_proto::routing`).
pub use shoal_proto::routing::shard_of;

/// The shards' hits merged into the global top k, best first by the collection's
/// metric; ties broken by id so the order is deterministic.
pub fn merge(mut hits: Vec<pb::Hit>, k: usize, metric: Metric) -> Vec<pb::Hit> {
    hits.sort_by(|a, b| metric.rank(a.score, b.score).then_with(|| a.id.cmp(&b.id)));
    hits.truncate(k);
    hits
}

/// A client's request id, made unique per shard (one request writes several).
/// Within [`writes::SHARD_SUFFIX_BYTES`] of the client's id.
fn shard_request(request_id: &str, index: u32) -> String {
    if request_id.is_empty() {
        String::new()
    } else {
        format!("{request_id}#{index}")
    }
}

/// Refuses a vector of the wrong length, with a NaN or infinity, or with a norm whose
/// scores would overflow (`limits::vector_problem`).
pub fn check_vector(v: &[f32], dimension: u32, what: &str) -> Result<(), Status> {
    match vector_problem(v, dimension as usize) {
        Some(p) => Err(Status::invalid_argument(format!("{what} {p}"))),
        None => Ok(()),
    }
}

pub struct Gateway {
    pub node_id: String,
    pub view: Arc<RwLock<MapView>>,
    /// Every model this node encodes with (issue 21: a collection names its own), and
    /// each one's identity, in the same order.
    pub encoders: Vec<Arc<EncoderPool>>,
    models: Vec<crate::model::ModelIdentity>,
    /// How shard calls reach a node's replicas (its own node's directly).
    transports: Arc<Transports>,
    pub default_deadline: Duration,
    /// Shard calls in flight per node: reads go to the least loaded replica.
    inflight: Mutex<HashMap<String, usize>>,
    /// Recent shard search latencies: a call slower than their 95th percentile is
    /// hedged to another replica.
    latencies: Mutex<Latencies>,
    /// What this gateway served (the console's live charts, issue 23).
    pub stats: GatewayStats,
    /// Each collection's route (its record and shards) as of a map version, shared by
    /// the queries until the map moves (issue 18: not cloned per query).
    routes: Mutex<HashMap<String, Arc<Route>>>,
    pub limits: Limits,
    /// The coordinators: cluster operations (index builds) start there.
    coordinators: Client,
}

/// A collection and its shards as of one map version.
pub struct Route {
    version: u64,
    coll: cpb::Collection,
    shards: Vec<cpb::Shard>,
}

/// Searches' latencies kept for [`GatewayStats::snapshot`].
const STATS_WINDOW: usize = 1024;

/// What a gateway served since it started, and its recent searches' latencies: read by
/// the console (`http.rs`, `/v1/stats`), which charts rates from successive counts.
/// The Prometheus metrics say the same for dashboards; these need no exporter.
#[derive(Default)]
pub struct GatewayStats {
    searches: std::sync::atomic::AtomicU64,
    partial: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    ingested: std::sync::atomic::AtomicU64,
    recent_ms: Mutex<VecDeque<f64>>,
}

impl GatewayStats {
    pub fn record_search(&self, ms: f64, partial: bool, failed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.searches.fetch_add(1, Relaxed);
        self.partial.fetch_add(u64::from(partial), Relaxed);
        self.failed.fetch_add(u64::from(failed), Relaxed);
        let mut r = self.recent_ms.lock();
        if r.len() == STATS_WINDOW {
            r.pop_front();
        }
        r.push_back(ms);
    }

    pub fn record_ingest(&self, documents: u64) {
        self.ingested
            .fetch_add(documents, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts and the recent searches' p50 / p99 (ms).
    pub fn snapshot(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let mut recent: Vec<f64> = self.recent_ms.lock().iter().copied().collect();
        recent.sort_by(f64::total_cmp);
        let at = |q: f64| {
            (!recent.is_empty()).then(|| recent[((recent.len() - 1) as f64 * q).round() as usize])
        };
        serde_json::json!({
            "searches": self.searches.load(Relaxed),
            "partial_searches": self.partial.load(Relaxed),
            "failed_searches": self.failed.load(Relaxed),
            "ingested_documents": self.ingested.load(Relaxed),
            "recent_searches": recent.len(),
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
        })
    }
}

/// The recent shard-call latencies and their 95th percentile, recomputed every
/// [`LATENCY_RECOMPUTE`] calls rather than sorted on every call (issue 18).
#[derive(Default)]
struct Latencies {
    window: VecDeque<f64>,
    since: usize,
    p95: Option<f64>,
}

/// Calls between two recomputations of the hedging percentile.
const LATENCY_RECOMPUTE: usize = 32;

impl Latencies {
    fn record(&mut self, secs: f64) {
        if self.window.len() == LATENCY_WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(secs);
        self.since += 1;
        if self.window.len() >= 32 && (self.since >= LATENCY_RECOMPUTE || self.p95.is_none()) {
            self.since = 0;
            let mut v: Vec<f64> = self.window.iter().copied().collect();
            let at = (v.len() * 95) / 100;
            v.select_nth_unstable_by(at, f64::total_cmp);
            self.p95 = Some(v[at]);
        }
    }
}

/// Decrements a node's in-flight count when a call ends, however it ends.
struct InFlight<'a>(&'a Mutex<HashMap<String, usize>>, String);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0.lock().get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

/// An upsert on its way to its shard: where its main vector came from, and the
/// re-embed whose set vector it carries (0: none).
struct Upsert {
    doc: rpb::StoredDoc,
    main: Main,
    set_tag: u64,
    /// Written only over this version of the document (issue 22: set-payload).
    expect: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
enum Main {
    /// The client's own vector.
    Client,
    /// Text not encoded yet.
    Pending,
    /// Encoded by the model of this content hash ("": a collection naming none).
    By(String),
}

/// A re-embed in progress on a collection (issue 21): until it is committed or rolled
/// back, every upsert carries the stored vectors' model's vector (`main`) and the new
/// model's (`encoder`, into the shards' vector set `tag`).
#[derive(Clone, Debug, PartialEq)]
pub struct DualWrite {
    pub tag: u64,
    pub main: Option<cpb::EncoderRef>,
    pub main_dimension: u32,
    pub encoder: cpb::EncoderRef,
    pub dimension: u32,
}

/// Pure: the collection's re-embed that new writes must feed, if any: its newest
/// rebuild, running, with a model change, building or switched.
pub fn dual_write(view: &MapView, coll: &cpb::Collection) -> Option<DualWrite> {
    let op =
        view.operations.values().rev().find(|o| {
            o.kind == "rebuild" && o.collection == coll.name && o.collection_id == coll.id
        })?;
    let r = op.rebuild.as_ref()?;
    let m = r.model.as_ref()?;
    (op.state == "running" && (r.phase == "building" || r.phase == "switched")).then(|| DualWrite {
        tag: op.id,
        main: m.previous.clone(),
        main_dimension: m.previous_dimension,
        encoder: m.encoder.clone().unwrap_or_default(),
        dimension: m.dimension,
    })
}

fn collection<'a>(view: &'a MapView, name: &str) -> Result<&'a cpb::Collection, Status> {
    view.collections
        .get(name)
        .ok_or_else(|| Status::not_found(format!("collection {name:?} not found")))
}

impl Gateway {
    pub fn new(
        node_id: String,
        view: Arc<RwLock<MapView>>,
        encoders: Vec<(Arc<EncoderPool>, crate::model::ModelIdentity)>,
        default_deadline: Duration,
        transports: Arc<Transports>,
        limits: Limits,
        coordinators: Client,
    ) -> Self {
        Self {
            coordinators,
            limits,
            node_id,
            view,
            models: encoders.iter().map(|(_, m)| m.clone()).collect(),
            encoders: encoders.into_iter().map(|(e, _)| e).collect(),
            transports,
            default_deadline,
            inflight: Mutex::default(),
            latencies: Mutex::default(),
            stats: GatewayStats::default(),
            routes: Mutex::default(),
        }
    }

    /// How long a shard search may take before it is hedged to another replica: the
    /// 95th percentile of recent calls (50 ms until there are enough), 5 ms to 1 s.
    fn hedge_delay(&self) -> Duration {
        let p95 = self.latencies.lock().p95;
        Duration::from_secs_f64(p95.unwrap_or(0.05).clamp(0.005, 1.0))
    }

    fn record_latency(&self, secs: f64) {
        self.latencies.lock().record(secs);
    }

    /// Replicas that may serve a shard's reads, least loaded first: the primary and
    /// serving backups, on up nodes.
    fn readers(&self, shard: &cpb::Shard) -> Vec<(String, String)> {
        let v = self.view.read();
        let load = self.inflight.lock();
        let mut out: Vec<(usize, bool, String, String)> = shard
            .replicas
            .iter()
            .filter(|r| r.state == cpb::ReplicaState::Serving as i32 || r.node_id == shard.primary)
            .filter_map(|r| {
                let n = v.nodes.get(&r.node_id)?;
                cpb::NodeState::is_live_value(n.state).then(|| {
                    (
                        load.get(&n.id).copied().unwrap_or(0),
                        n.id != shard.primary,
                        n.id.clone(),
                        n.addr.clone(),
                    )
                })
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, _, id, addr)| (id, addr)).collect()
    }

    fn begin(&self, node: &str) -> InFlight<'_> {
        *self.inflight.lock().entry(node.to_string()).or_insert(0) += 1;
        InFlight(&self.inflight, node.to_string())
    }

    /// A collection and its shards, as this node's map has them now (shared until
    /// the map moves).
    fn collection_shards(&self, name: &str) -> Result<Arc<Route>, Status> {
        within!(
            self.limits,
            name_bytes,
            name.len(),
            "the collection name's length"
        )?;
        let v = self.view.read();
        if v.version == 0 {
            // Just started: "not found" would be a lie until the map arrives.
            return Err(Status::unavailable(format!(
                "node {} has not received the cluster map yet; retry",
                self.node_id
            )));
        }
        let mut routes = self.routes.lock();
        if let Some(r) = routes.get(name).filter(|r| r.version == v.version) {
            return Ok(r.clone());
        }
        // An alias routes to its collection (issue 21), as of this map version.
        let real = v.resolve(name);
        let c = collection(&v, real)?;
        let route = Arc::new(Route {
            version: v.version,
            coll: c.clone(),
            // A split's siblings are routed to from its cut-over on (issue 19).
            shards: v
                .shards_of(real)
                .filter(|s| s.index < c.shard_count)
                .cloned()
                .collect(),
        });
        // Routes of dropped collections go when the map moves past them.
        routes.retain(|_, r| r.version == v.version);
        if routes.len() < 4096 {
            routes.insert(name.to_string(), route.clone());
        }
        Ok(route)
    }

    fn replicas(&self, node: &str, addr: &str) -> Result<Arc<dyn ReplicaApi>, ReplicaError> {
        self.transports.to(node, addr)
    }

    /// Vectors for `texts` from this node's encoder, and how many texts it truncated.
    async fn encode(
        &self,
        texts: Vec<String>,
        dimension: u32,
        encoder_ref: Option<&cpb::EncoderRef>,
    ) -> Result<PoolEncoded, Status> {
        // The collection's vectors came from one model: this node must hold exactly
        // it, not just a model of the same dimension (issue 21).
        let want = encoder_ref.map(|e| (e.model_id.as_str(), e.content_hash.as_str()));
        let i = crate::model::pick(&self.models, want, dimension as usize)
            .map_err(Status::failed_precondition)?;
        let enc = &self.encoders[i];
        let n = texts.len();
        // In parts the encoder's queue can take whole, one after another: a request
        // larger than the queue would otherwise be refused however often it is retried.
        let part = enc.max_queue().max(1);
        let mut out = PoolEncoded {
            vectors: Vec::with_capacity(n),
            truncated: 0,
        };
        let mut texts = texts.into_iter().peekable();
        while texts.peek().is_some() {
            let chunk: Vec<String> = texts.by_ref().take(part).collect();
            let offset = out.vectors.len();
            let r = enc
                .encode_counted(chunk)
                .instrument(tracing::info_span!("encode", texts = n))
                .await
                .map_err(|e| match e {
                    shoal_encoder::EncoderError::Overloaded { .. } => {
                        Status::resource_exhausted(e.to_string())
                    }
                    shoal_encoder::EncoderError::EmptyText { index } => {
                        Status::invalid_argument(format!("text {} is empty", offset + index))
                    }
                    shoal_encoder::EncoderError::WorkerFailed(_)
                    | shoal_encoder::EncoderError::TimedOut { .. } => {
                        Status::unavailable(e.to_string())
                    }
                    e => Status::internal(e.to_string()),
                })?;
            out.vectors.extend(r.vectors);
            out.truncated += r.truncated;
        }
        Ok(out)
    }

    /// Validates, encodes and routes a batch; returns (documents written, truncated).
    pub async fn ingest(&self, mut req: pb::IngestRequest) -> Result<(u64, u64), Status> {
        let route = self.collection_shards(&req.collection)?;
        let coll = &route.coll;
        if req.documents.is_empty() {
            return Err(Status::invalid_argument("no documents in the request"));
        }
        let l = &self.limits;
        writes::check_batch(l, req.documents.len(), 0, &req.request_id, 0)?;
        let mut docs = std::mem::take(&mut req.documents);
        for (i, d) in docs.iter_mut().enumerate() {
            let metadata = std::mem::take(&mut d.metadata_json);
            d.metadata_json =
                writes::check_document(l, &format!("document {i}"), &d.id, &d.text, metadata)?
                    .into_string();
            if d.vector.is_empty() {
                if d.text.trim().is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "document {:?} has neither text nor a vector",
                        d.id
                    )));
                }
            } else {
                check_vector(
                    &d.vector,
                    coll.dimension,
                    &format!("document {:?}'s vector", d.id),
                )?;
            }
        }
        let n = docs.len() as u64;
        // Texts are encoded where the write is routed (`prepare`): a re-embed changes
        // which models they need.
        let upserts = docs
            .into_iter()
            .map(|d| Upsert {
                main: if d.vector.is_empty() {
                    Main::Pending
                } else {
                    Main::Client
                },
                doc: rpb::StoredDoc {
                    id: d.id,
                    text: d.text,
                    metadata_json: d.metadata_json,
                    vector: d.vector,
                    set_vector: Vec::new(),
                },
                set_tag: 0,
                expect: None,
            })
            .collect();
        // Resolved once: a retry never follows an alias switched meanwhile (issue 21).
        let name = route.coll.name.clone();
        let (_, truncated) = self
            .write_all(&name, &req.request_id, upserts, Vec::new())
            .await?;
        Ok((n, truncated))
    }

    /// Encodes what the upserts need for the collection as the map has it now: the
    /// stored vectors' model, and during a re-embed (issue 21) the new model's too,
    /// into its vector set. A text encoded before by another model (the map moved
    /// between two attempts) is encoded again. Returns the texts truncated.
    async fn prepare(
        &self,
        coll: &cpb::Collection,
        dual: Option<&DualWrite>,
        upserts: &mut [Upsert],
    ) -> Result<u64, Status> {
        let (main, main_dim) = match dual {
            Some(d) => (d.main.as_ref(), d.main_dimension),
            None => (coll.encoder.as_ref(), coll.dimension),
        };
        let main_hash = Main::By(main.map_or_else(String::new, |e| e.content_hash.clone()));
        let mut want_main = Vec::new();
        let mut want_set = Vec::new();
        for (i, u) in upserts.iter_mut().enumerate() {
            match (&u.main, dual) {
                (Main::Client, Some(d)) => {
                    return Err(Status::failed_precondition(format!(
                        "collection {} is being re-embedded (operation {}): send text, not \
                         vectors, until it is committed or rolled back (document {:?})",
                        coll.name, d.tag, u.doc.id
                    )))
                }
                (Main::Client, None) => {}
                (by, _) if *by != main_hash => want_main.push(i),
                _ => {}
            }
            match dual {
                Some(d) if u.set_tag != d.tag => want_set.push(i),
                Some(_) => {}
                None => {
                    u.set_tag = 0;
                    u.doc.set_vector = Vec::new();
                }
            }
        }
        let mut truncated = 0;
        if !want_main.is_empty() {
            let texts = want_main
                .iter()
                .map(|&i| upserts[i].doc.text.clone())
                .collect();
            let out = self.encode(texts, main_dim, main).await?;
            truncated += out.truncated as u64;
            for (&i, v) in want_main.iter().zip(out.vectors) {
                upserts[i].doc.vector = v;
                upserts[i].main = main_hash.clone();
            }
        }
        if let (Some(d), false) = (dual, want_set.is_empty()) {
            let texts = want_set
                .iter()
                .map(|&i| upserts[i].doc.text.clone())
                .collect();
            let out = self.encode(texts, d.dimension, Some(&d.encoder)).await?;
            for (&i, v) in want_set.iter().zip(out.vectors) {
                upserts[i].doc.set_vector = v;
                upserts[i].set_tag = d.tag;
            }
        }
        Ok(truncated)
    }

    /// Routes a validated write to its shards' primaries. A shard that answers
    /// [`ReplicaError::Moving`] (sealed by a split, or routed by a shard count the
    /// split changed, or a re-embed's state moved under this node's map) has its part
    /// routed again by the map as it is then, encoded again if the models it needs
    /// changed ([`Gateway::prepare`]), and sent again, until `WRITE_TIMEOUT` passes:
    /// clients see a split or a re-embed as latency, not as errors. Each shard's part
    /// carries the request id with its shard index, so a part sent again to the same
    /// shard applies once. Returns the deletes applied and the texts truncated.
    async fn write_all(
        &self,
        collection: &str,
        request_id: &str,
        mut upserts: Vec<Upsert>,
        mut deletes: Vec<String>,
    ) -> Result<(u64, u64), Status> {
        let until = Instant::now() + WRITE_TIMEOUT;
        let mut pause = Duration::from_millis(20);
        let (mut deleted, mut truncated) = (0, 0);
        loop {
            let route = self.collection_shards(collection)?;
            let (coll, shards) = (&route.coll, &route.shards);
            let dual = dual_write(&self.view.read(), coll);
            truncated += self.prepare(coll, dual.as_ref(), &mut upserts).await?;
            let set_tag = dual.as_ref().map_or(0, |d| d.tag);
            let mut by_shard: HashMap<u32, (Vec<Upsert>, Vec<String>)> = HashMap::new();
            for u in upserts.drain(..) {
                by_shard
                    .entry(shard_of(&u.doc.id, coll.shard_count))
                    .or_default()
                    .0
                    .push(u);
            }
            for id in deletes.drain(..) {
                by_shard
                    .entry(shard_of(&id, coll.shard_count))
                    .or_default()
                    .1
                    .push(id);
            }
            let writes = by_shard.into_iter().map(|(index, (ups, dels))| async move {
                let expect = ups
                    .iter()
                    .filter_map(|u| {
                        u.expect.map(|version| rpb::Expect {
                            id: u.doc.id.clone(),
                            version,
                        })
                    })
                    .collect();
                let r = self
                    .write_shard(
                        coll,
                        shards,
                        index,
                        (ups.iter().map(|u| u.doc.clone()).collect(), set_tag),
                        (dels.clone(), expect),
                        shard_request(request_id, index),
                    )
                    .await;
                (r, ups, dels)
            });
            let mut failed = None;
            for (r, ups, dels) in futures::future::join_all(writes).await {
                match r {
                    Ok(w) => deleted += w.deleted,
                    Err(ReplicaError::Moving(m)) if Instant::now() < until => {
                        tracing::debug!(reason = %m, "write part routed again after a move");
                        upserts.extend(ups);
                        deletes.extend(dels);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                return Err(e.into());
            }
            if upserts.is_empty() && deletes.is_empty() {
                return Ok((deleted, truncated));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    pub async fn delete(&self, mut req: pb::DeleteRequest) -> Result<u64, Status> {
        let route = self.collection_shards(&req.collection)?;
        let (coll, shards) = (&route.coll, &route.shards);
        if req.ids.is_empty() {
            return Err(Status::invalid_argument("no ids to delete"));
        }
        let l = &self.limits;
        writes::check_batch(l, 0, req.ids.len(), &req.request_id, 0)?;
        writes::check_ids(l, &req.ids)?;
        let _ = shards;
        let ids = std::mem::take(&mut req.ids);
        let name = coll.name.clone();
        self.write_all(&name, &req.request_id, Vec::new(), ids)
            .await
            .map(|(deleted, _)| deleted)
    }

    fn shard_id(coll: &cpb::Collection, index: u32) -> cpb::ShardId {
        cpb::ShardId {
            collection: coll.name.clone(),
            collection_id: coll.id,
            index,
        }
    }

    fn shard(shards: &[cpb::Shard], index: u32) -> Result<&cpb::Shard, ReplicaError> {
        shards.iter().find(|s| s.index == index).ok_or_else(|| {
            ReplicaError::Unavailable(format!("shard {index} is not in the map yet"))
        })
    }

    /// The shard's primary (writes go there), unless its node is down.
    fn primary(&self, shards: &[cpb::Shard], index: u32) -> Result<(String, String), ReplicaError> {
        let shard = Self::shard(shards, index)?;
        let v = self.view.read();
        v.nodes
            .get(&shard.primary)
            .filter(|n| n.state != cpb::NodeState::Down as i32)
            .map(|n| (n.id.clone(), n.addr.clone()))
            .ok_or_else(|| {
                ReplicaError::Unavailable(format!(
                    "shard {}/{index} has no live primary (epoch {}); retry",
                    shard.collection, shard.epoch
                ))
            })
    }

    async fn write_shard(
        &self,
        coll: &cpb::Collection,
        shards: &[cpb::Shard],
        index: u32,
        (upserts, set_tag): (Vec<rpb::StoredDoc>, u64),
        (deletes, expect): (Vec<String>, Vec<rpb::Expect>),
        request_id: String,
    ) -> Result<rpb::WriteResponse, ReplicaError> {
        let (node, addr) = self.primary(shards, index)?;
        let span = tracing::info_span!("shard.write", shard = index, node = %node);
        let req = rpb::WriteRequest {
            shard: Some(Self::shard_id(coll, index)),
            upserts,
            deletes,
            request_id,
            shard_count: coll.shard_count,
            set_tag,
            expect,
        };
        let write = async { self.replicas(&node, &addr)?.write(req, WRITE_TIMEOUT).await };
        write
            .instrument(span)
            .await
            .map_err(|e| e.context(format_args!("shard {}/{index} on node {node}", coll.name)))
    }

    /// A new index generation on every shard: starts the collection's build operation
    /// through the coordinators with the caller's key (or joins the one running), then
    /// follows it in this node's map until it ends or `wait` runs out (the operation
    /// goes on either way).
    pub async fn build_index(
        &self,
        req: pb::BuildIndexRequest,
        key: Option<&str>,
        wait: Duration,
    ) -> Result<pb::BuildIndexResponse, Status> {
        let started = Instant::now();
        let mut client = self.coordinators.clone().with_key(key);
        let op = match client
            .start_index_build(cpb::StartIndexBuildRequest {
                collection: req.collection.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(op) => op,
            // One is running: this call follows it.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => client
                .list_operations(cpb::ListOperationsRequest {
                    collection: req.collection.clone(),
                })
                .await?
                .operations
                .into_iter()
                .rfind(|o| o.kind == "build_index" && o.state == "running")
                .ok_or(s)?,
            Err(s) => return Err(s),
        };
        let until = started + wait;
        let op = loop {
            let seen = self.view.read().operations.get(&op.id).cloned();
            match seen {
                Some(o) if o.state != "running" => break o,
                seen if Instant::now() >= until => break seen.unwrap_or(op),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let secs = started.elapsed().as_secs_f64();
        let b = op.build.unwrap_or_default();
        Ok(pb::BuildIndexResponse {
            shards: op
                .steps
                .iter()
                .map(|s| pb::ShardBuild {
                    shard: s.shard,
                    node: s.node.clone(),
                    generation: s.generation,
                    indexed_vectors: 0,
                    build_seconds: if s.state == "done" { secs } else { 0.0 },
                    error: s.reason.clone(),
                })
                .collect(),
            operation: op.id,
            state: op.state,
            reason: op.reason,
            nlist: b.nlist,
            train_sample: b.train_sample,
        })
    }

    pub async fn get(&self, req: pb::GetRequest) -> Result<pb::GetResponse, Status> {
        let route = self.collection_shards(&req.collection)?;
        let (coll, shards) = (&route.coll, &route.shards);
        if req.id.is_empty() {
            return Err(Status::invalid_argument("id must not be empty"));
        }
        within!(self.limits, id_bytes, req.id.len(), "the id's length")?;
        let index = shard_of(&req.id, coll.shard_count);
        let shard = Self::shard(shards, index)?;
        let mut last = ReplicaError::Unavailable(format!(
            "shard {}/{index} has no replica on an up node",
            coll.name
        ));
        let mut found = None;
        for (node, addr) in self.readers(shard) {
            let _f = self.begin(&node);
            let r = rpb::ShardGetRequest {
                shard: Some(Self::shard_id(coll, index)),
                id: req.id.clone(),
                shard_count: coll.shard_count,
            };
            let get = async {
                self.replicas(&node, &addr)?
                    .get(r, self.default_deadline)
                    .await
            };
            match get.await {
                Ok(r) => {
                    found = Some(r);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let r = found.ok_or(last)?;
        Ok(pb::GetResponse {
            found: r.found,
            version: r.version,
            document: r.doc.map(|d| pb::Document {
                id: d.id,
                text: d.text,
                metadata_json: d.metadata_json,
                vector: if req.with_vector {
                    d.vector
                } else {
                    Vec::new()
                },
            }),
        })
    }

    /// One shard's part of a query: the least loaded replica first; a call slower than
    /// the hedging threshold, or one that fails, is sent to the next replica too, and
    /// the first answer wins. An error only when no replica answered.
    async fn search_shard(
        &self,
        s: &cpb::Shard,
        req: rpb::ShardSearchRequest,
        budget: Duration,
    ) -> (u32, String, Result<rpb::ShardSearchResponse, ReplicaError>) {
        self.ask_shard(s, budget, |c: Arc<dyn ReplicaApi>| {
            let r = req.clone();
            async move { c.search(r, budget).await }
        })
        .await
    }

    /// A batch's part of one shard (`SearchMany`), asked as [`Self::search_shard`]
    /// asks one search: the answers in order.
    async fn search_shard_many(
        &self,
        s: &cpb::Shard,
        searches: Vec<rpb::ShardSearchRequest>,
        budget: Duration,
    ) -> (
        u32,
        String,
        Result<Vec<rpb::ShardSearchResponse>, ReplicaError>,
    ) {
        let n = searches.len();
        let batch = rpb::ShardSearchBatch { searches };
        let (index, node, res) = self
            .ask_shard(s, budget, |c: Arc<dyn ReplicaApi>| {
                let b = batch.clone();
                async move { c.search_many(b, budget).await }
            })
            .await;
        let res = res.and_then(|r| {
            if r.results.len() == n {
                Ok(r.results)
            } else {
                Err(ReplicaError::Internal(format!(
                    "{} answers to a batch of {n} searches",
                    r.results.len()
                )))
            }
        });
        (index, node, res)
    }

    /// `ask` of one shard's readable replicas, hedged (see [`Self::search_shard`]).
    async fn ask_shard<T, F, Fut>(
        &self,
        s: &cpb::Shard,
        budget: Duration,
        ask: F,
    ) -> (u32, String, Result<T, ReplicaError>)
    where
        F: Fn(Arc<dyn ReplicaApi>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ReplicaError>>,
    {
        let cands = self.readers(s);
        if cands.is_empty() {
            return (
                s.index,
                String::new(),
                Err(ReplicaError::Unavailable(format!(
                    "shard {}/{} has no replica on an up node",
                    s.collection, s.index
                ))),
            );
        }
        let deadline = tokio::time::Instant::now() + budget;
        let call = |(node, addr): (String, String)| {
            let ask = &ask;
            async move {
                let _f = self.begin(&node);
                let t = Instant::now();
                let res = match self.replicas(&node, &addr) {
                    Ok(c) => ask(c).await,
                    Err(e) => Err(e),
                };
                if res.is_ok() {
                    self.record_latency(t.elapsed().as_secs_f64());
                }
                (node, res)
            }
        };
        let mut next = cands.into_iter();
        let mut calls = FuturesUnordered::new();
        calls.push(call(next.next().expect("one candidate")));
        let hedge = tokio::time::sleep(self.hedge_delay());
        tokio::pin!(hedge);
        let mut hedged = false;
        let mut last = (
            String::new(),
            ReplicaError::Unavailable("no replica answered".into()),
        );
        loop {
            tokio::select! {
                Some((node, res)) = calls.next() => match res {
                    Ok(r) => return (s.index, node, Ok(r)),
                    Err(e) => {
                        last = (node, e);
                        match next.next() {
                            Some(c) => calls.push(call(c)),
                            None if calls.is_empty() => break,
                            None => {}
                        }
                    }
                },
                _ = &mut hedge, if !hedged => {
                    hedged = true;
                    if let Some(c) = next.next() {
                        metrics::counter!("shoal_gateway_hedged_requests_total").increment(1);
                        calls.push(call(c));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    last.1 = ReplicaError::Deadline("shard missed the deadline".into());
                    break;
                }
            }
        }
        (s.index, last.0, Err(last.1))
    }

    pub async fn search(
        &self,
        req: pb::SearchRequest,
        deadline: Option<Duration>,
    ) -> Result<pb::SearchResponse, Status> {
        // A shard that answers Moving (a split's cut-over between this node's map and
        // the replica's) is asked again, the whole query routed anew, a few times
        // within the deadline before the answer goes out partial (issue 19).
        let t = Instant::now();
        let budget = deadline.unwrap_or(self.default_deadline);
        let mut pause = Duration::from_millis(20);
        loop {
            let r = self.search_once(req.clone(), deadline).await?;
            let moving = r
                .shards
                .iter()
                .any(|a| !a.answered && a.error.starts_with("moving"));
            if !moving || t.elapsed() + pause * 2 >= budget / 2 {
                return Ok(r);
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    async fn search_once(
        &self,
        req: pb::SearchRequest,
        deadline: Option<Duration>,
    ) -> Result<pb::SearchResponse, Status> {
        let t = Instant::now();
        let route = self.collection_shards(&req.collection)?;
        let (coll, shards) = (&route.coll, &route.shards);
        let l = &self.limits;
        let refine = check_query(&req, coll, l)?;
        let filter = check_filter(req.filter.as_ref(), coll, l)?;
        let plan = RetrievalPlan::of(&req, l)?;
        let budget = deadline.unwrap_or(self.default_deadline);
        let metric = Metric::from_wire(coll.metric).unwrap_or(Metric::InnerProduct);
        // More like this (issue 22): a stored document's vector (dense) and text
        // (lexical) are the query; the document itself is left out of the answer.
        let like = match req.like_id.as_str() {
            "" => None,
            id => Some(self.like(coll, id, &req).await?),
        };
        let like_ref = like.as_ref();
        let dense = async {
            if plan.mode == pb::RetrievalMode::Lexical {
                return Ok(None);
            }
            let query = match (req.text.trim().is_empty(), req.vector.is_empty()) {
                _ if like_ref.is_some() => like_ref.map(|d| d.vector.clone()).unwrap_or_default(),
                (false, true) => self
                    .encode(
                        vec![req.text.clone()],
                        coll.dimension,
                        coll.encoder.as_ref(),
                    )
                    .await?
                    .vectors
                    .pop()
                    .expect("one vector per text"),
                (true, false) => {
                    check_vector(&req.vector, coll.dimension, "the query vector")?;
                    req.vector.clone()
                }
                (true, true) => {
                    return Err(Status::invalid_argument(
                        "the query is empty: give text or a vector",
                    ))
                }
                (false, false) => {
                    return Err(Status::invalid_argument("give text or a vector, not both"))
                }
            };
            let ask = |vector: Vec<f32>, k: u32, with_vectors: bool| {
                let q = DenseQuery {
                    req: &req,
                    refine,
                    filter: &filter,
                    vector,
                    k,
                    with_vectors,
                };
                move |s: &cpb::Shard| q.request(coll, s)
            };
            let mut rounds = Vec::new();
            let mut query = query;
            if let Some(prf) = plan.prf {
                // Pseudo-relevance feedback: the top documents' vectors of the
                // query's model, then the query moved toward them (`fusion::rocchio`).
                let first = self
                    .fan_out(coll, shards, budget, ask(query.clone(), prf.depth, true))
                    .await?;
                let top = merge(first.hits(), prf.depth as usize, metric);
                let vectors: HashMap<&str, &Vec<f32>> = first
                    .parts
                    .iter()
                    .flat_map(|(_, r)| r.hits.iter().map(|h| (h.id.as_str(), &h.vector)))
                    .collect();
                let feedback: Vec<Vec<f32>> = top
                    .iter()
                    .filter_map(|h| vectors.get(h.id.as_str()))
                    .filter(|v| v.len() == query.len())
                    .map(|v| (*v).clone())
                    .collect();
                query = fusion::rocchio(&query, &feedback, prf.alpha, prf.beta);
                rounds.push(first);
            }
            let last = self
                .fan_out(coll, shards, budget, ask(query, plan.depth, false))
                .await?;
            let hits = merge(last.hits(), plan.depth as usize, metric);
            rounds.push(last);
            Ok(Some((hits, rounds)))
        };
        let lexical = async {
            if plan.mode == pb::RetrievalMode::Dense {
                return Ok(None);
            }
            let text = match like_ref {
                Some(d) if d.text.is_empty() => {
                    return Err(Status::invalid_argument(format!(
                        "document {:?} has no text to search lexically by",
                        req.like_id
                    )))
                }
                Some(d) => d.text.as_str(),
                None if req.text.trim().is_empty() || !req.vector.is_empty() => {
                    return Err(Status::invalid_argument(
                        "lexical and hybrid search need the query's text (and no vector)",
                    ))
                }
                None => req.text.as_str(),
            };
            let terms = shoal_engine::tokenize(text);
            let ask = |q: rpb::LexicalQuery, k: u32| {
                let filter = filter.clone();
                move |s: &cpb::Shard| rpb::ShardSearchRequest {
                    shard: Some(Self::shard_id(coll, s.index)),
                    k,
                    shard_count: coll.shard_count,
                    with_text: req.with_text,
                    with_payload: req.with_payload,
                    filter: filter.clone(),
                    lexical: Some(q.clone()),
                    ..Default::default()
                }
            };
            // The collection's statistics: every shard's part, summed, so each
            // shard scores with the same weights.
            let stats_q = rpb::LexicalQuery {
                terms: terms.clone(),
                stats_only: true,
                ..Default::default()
            };
            let stats = self.fan_out(coll, shards, budget, ask(stats_q, 1)).await?;
            let (mut docs, mut total) = (0u64, 0u64);
            let mut df = vec![0u64; terms.len()];
            for (_, r) in &stats.parts {
                let s = r.stats.clone().unwrap_or_default();
                docs += s.docs;
                total += s.total_len;
                for (d, x) in df.iter_mut().zip(&s.df) {
                    *d += x;
                }
            }
            let bm25 = shoal_engine::Bm25::default();
            let q = rpb::LexicalQuery {
                idf: df
                    .iter()
                    .map(|&d| shoal_engine::bm25_idf(docs, d))
                    .collect(),
                avg_len: if docs == 0 {
                    1.0
                } else {
                    total as f32 / docs as f32
                },
                k1: bm25.k1,
                b: bm25.b,
                terms,
                stats_only: false,
            };
            let found = self
                .fan_out(coll, shards, budget, ask(q, plan.depth))
                .await?;
            let hits = merge(found.hits(), plan.depth as usize, Metric::InnerProduct);
            Ok(Some((hits, vec![stats, found])))
        };
        let (dense, lexical) = tokio::try_join!(dense, lexical)?;
        let mut rounds = Vec::new();
        let k = req.k as usize;
        let without = |mut hits: Vec<pb::Hit>| {
            if like.is_some() {
                hits.retain(|h| h.id != req.like_id);
            }
            hits
        };
        let (dense, lexical) = (
            dense.map(|(h, r)| (without(h), r)),
            lexical.map(|(h, r)| (without(h), r)),
        );
        let hits = match (dense, lexical) {
            (Some((d, r)), None) => {
                rounds.extend(r);
                merge(d, k, metric)
            }
            (None, Some((x, r))) => {
                rounds.extend(r);
                merge(x, k, Metric::InnerProduct)
            }
            (Some((d, rd)), Some((x, rx))) => {
                rounds.extend(rd);
                rounds.extend(rx);
                fusion::fuse(&d, &x, metric, plan.fusion, k)
            }
            (None, None) => unreachable!("a mode asks one side at least"),
        };
        self.respond(hits, rounds, shards.len(), t)
    }

    /// A search's answer from its merged hits and its rounds: a shard that missed any
    /// round is missing (partial); the last round's per-shard answers; the hits' texts
    /// and metadata within `payload_bytes`.
    fn respond(
        &self,
        hits: Vec<pb::Hit>,
        rounds: Vec<Round>,
        shards: usize,
        t: Instant,
    ) -> Result<pb::SearchResponse, Status> {
        let mut missing: Vec<u32> = rounds
            .iter()
            .flat_map(|r| r.missing.iter().copied())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let answers: Vec<pb::ShardAnswer> = rounds
            .into_iter()
            .last()
            .map(|r| r.answers)
            .unwrap_or_default();
        // Each shard's part is bounded by `payload_bytes`; so is the merged answer.
        within!(
            self.limits,
            payload_bytes,
            hit_bytes(&hits),
            format!("bytes of the {} hits' texts and metadata", hits.len())
        )?;
        Ok(pb::SearchResponse {
            hits,
            shards_answered: (shards - missing.len()) as u32,
            shards_total: shards as u32,
            partial: !missing.is_empty(),
            missing_shards: missing,
            shards: answers,
            took_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// How many documents pass a filter (issue 22): every shard's count, summed; a
    /// shard that does not answer is named, not guessed.
    pub async fn count(&self, req: pb::CountRequest) -> Result<pb::CountResponse, Status> {
        let route = self.collection_shards(&req.collection)?;
        let (coll, shards) = (&route.coll, &route.shards);
        let filter = check_filter(req.filter.as_ref(), coll, &self.limits)?;
        let round = self
            .fan_out(coll, shards, self.default_deadline, |s| {
                rpb::ShardSearchRequest {
                    shard: Some(Self::shard_id(coll, s.index)),
                    k: 1,
                    shard_count: coll.shard_count,
                    filter: filter.clone(),
                    count_only: true,
                    ..Default::default()
                }
            })
            .await?;
        Ok(pb::CountResponse {
            count: round.parts.iter().map(|(_, r)| r.count).sum(),
            partial: !round.missing.is_empty(),
            missing_shards: round.missing,
        })
    }

    /// A page of a scroll (issue 22): shard by shard in storage order, from the
    /// cursor's position (`scroll:SHARDS:SHARD:LAYOUT:ROW`). A shard that does not
    /// answer fails the page (a scroll never skips a shard); a split since the scroll
    /// began is refused, as a compaction is by the shard.
    pub async fn scroll(&self, req: pb::ScrollRequest) -> Result<pb::ScrollResponse, Status> {
        let route = self.collection_shards(&req.collection)?;
        let (coll, shards) = (&route.coll, &route.shards);
        let l = &self.limits;
        let filter = check_filter(req.filter.as_ref(), coll, l)?;
        let limit = if req.limit == 0 { 100 } else { req.limit };
        within!(l, k, limit, "a scroll page's limit")?;
        within!(l, name_bytes, req.cursor.len(), "the cursor's length")?;
        let (mut index, mut layout, mut row) = match req.cursor.as_str() {
            "" => (0u32, None, 0u64),
            c => {
                let bad =
                    || Status::invalid_argument(format!("cursor {c:?} is not one a scroll gave"));
                let parts: Vec<&str> = c.split(':').collect();
                let [tag, count, index, layout, row] = parts.as_slice() else {
                    return Err(bad());
                };
                let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
                if *tag != "scroll" {
                    return Err(bad());
                }
                if num(count)? != u64::from(coll.shard_count) {
                    return Err(Status::failed_precondition(format!(
                        "collection {:?} has {} shards now, {} when the scroll began: begin it again",
                        coll.name, coll.shard_count, count
                    )));
                }
                let index = u32::try_from(num(index)?).map_err(|_| bad())?;
                if index >= coll.shard_count {
                    return Err(bad());
                }
                (index, Some(num(layout)?), num(row)?)
            }
        };
        let mut documents = Vec::new();
        while documents.len() < limit as usize && index < coll.shard_count {
            let s = Self::shard(shards, index)?;
            let ask = rpb::ShardSearchRequest {
                shard: Some(Self::shard_id(coll, index)),
                k: limit - documents.len() as u32,
                shard_count: coll.shard_count,
                filter: filter.clone(),
                with_text: req.with_text,
                with_payload: req.with_payload,
                with_vectors: req.with_vector,
                scroll: Some(rpb::ScrollQuery {
                    layout,
                    from_row: row,
                }),
                ..Default::default()
            };
            let (_, _, res) = self.search_shard(s, ask, self.default_deadline).await;
            let page = res.map_err(|e| {
                Status::from(e.context(format_args!("shard {}/{index}", coll.name)))
            })?;
            documents.extend(page.hits.into_iter().map(|h| pb::Document {
                id: h.id,
                text: h.text,
                metadata_json: h.metadata_json,
                vector: h.vector,
            }));
            if page.done {
                (index, layout, row) = (index + 1, None, 0);
            } else {
                (layout, row) = (Some(page.layout), page.next_row);
            }
        }
        let cursor = if index >= coll.shard_count {
            String::new()
        } else {
            format!(
                "scroll:{}:{index}:{}:{row}",
                coll.shard_count,
                layout.unwrap_or_default()
            )
        };
        Ok(pb::ScrollResponse { documents, cursor })
    }

    /// Many searches, answered in order (issue 22), each as `search` alone answers it.
    /// Plain dense searches (no feedback, no like_id) of one collection are one
    /// fan-out: their texts encoded in one call, every shard asked all of them at once
    /// (`SearchMany`). The others (hybrid, lexical, feedback: several rounds each) run
    /// at once beside them. The first search that fails fails the batch, named by its
    /// place.
    pub async fn search_batch(
        &self,
        req: pb::SearchBatchRequest,
        deadline: Option<Duration>,
    ) -> Result<pb::SearchBatchResponse, Status> {
        let l = &self.limits;
        within!(
            l,
            searches_per_batch,
            req.searches.len(),
            "searches in one batch"
        )?;
        let searches = req.searches;
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut alone = Vec::new();
        for (i, s) in searches.iter().enumerate() {
            let plain = pb::RetrievalMode::try_from(s.mode)
                .is_ok_and(|m| resolve_mode(m, s) == pb::RetrievalMode::Dense)
                && s.prf.as_ref().is_none_or(|p| !p.enabled)
                && s.like_id.is_empty();
            if plain {
                groups.entry(s.collection.as_str()).or_default().push(i);
            } else {
                alone.push(i);
            }
        }
        let mut answers: Vec<Option<Result<pb::SearchResponse, Status>>> =
            (0..searches.len()).map(|_| None).collect();
        let grouped = groups.into_values().map(|ix| {
            let reqs: Vec<&pb::SearchRequest> = ix.iter().map(|&i| &searches[i]).collect();
            async move { (ix.clone(), self.search_group(&reqs, deadline).await) }
        });
        let single = alone.iter().map(|&i| {
            let r = searches[i].clone();
            async move { (vec![i], vec![self.search(r, deadline).await]) }
        });
        let (grouped, single) = futures::future::join(
            futures::future::join_all(grouped),
            futures::future::join_all(single),
        )
        .await;
        for (ix, rs) in grouped.into_iter().chain(single) {
            for (i, r) in ix.into_iter().zip(rs) {
                answers[i] = Some(r);
            }
        }
        let mut results = Vec::with_capacity(answers.len());
        for (i, r) in answers.into_iter().enumerate() {
            let r = match r.expect("every search answered") {
                // A shard mid-split answered Moving: asked again alone (`search`
                // retries those within the deadline).
                Ok(r)
                    if r.shards
                        .iter()
                        .any(|a| !a.answered && a.error.starts_with("moving")) =>
                {
                    self.search(searches[i].clone(), deadline).await
                }
                r => r,
            };
            results.push(
                r.map_err(|e| Status::new(e.code(), format!("search {i}: {}", e.message())))?,
            );
        }
        let bytes: usize = results.iter().map(|r| hit_bytes(&r.hits)).sum();
        within!(
            l,
            payload_bytes,
            bytes,
            format!(
                "bytes of the hits' texts and metadata of {} searches",
                results.len()
            )
        )?;
        Ok(pb::SearchBatchResponse { results })
    }

    /// Plain dense searches of one collection as one fan-out (`search_batch`): each
    /// checked as alone (one that fails is answered with its error, the others go
    /// on), their texts encoded in one call, each shard asked them all at once.
    async fn search_group(
        &self,
        reqs: &[&pb::SearchRequest],
        deadline: Option<Duration>,
    ) -> Vec<Result<pb::SearchResponse, Status>> {
        let t = Instant::now();
        let n = reqs.len();
        let copy = |e: &Status| Status::new(e.code(), e.message().to_string());
        let route = match self.collection_shards(&reqs[0].collection) {
            Ok(r) => r,
            Err(e) => return (0..n).map(|_| Err(copy(&e))).collect(),
        };
        let (coll, shards) = (&route.coll, &route.shards);
        let l = &self.limits;
        let mut out: Vec<Option<Result<pb::SearchResponse, Status>>> =
            (0..n).map(|_| None).collect();
        let mut checked = Vec::with_capacity(n);
        for (i, req) in reqs.iter().enumerate() {
            let c = check_query(req, coll, l).and_then(|refine| {
                let filter = check_filter(req.filter.as_ref(), coll, l)?;
                RetrievalPlan::of(req, l)?;
                match (req.text.trim().is_empty(), req.vector.is_empty()) {
                    (true, true) => Err(Status::invalid_argument(
                        "the query is empty: give text or a vector",
                    )),
                    (false, false) => {
                        Err(Status::invalid_argument("give text or a vector, not both"))
                    }
                    (true, false) => {
                        check_vector(&req.vector, coll.dimension, "the query vector")?;
                        Ok((refine, filter))
                    }
                    (false, true) => Ok((refine, filter)),
                }
            });
            match c {
                Ok(c) => checked.push((i, c)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        // The texts, encoded in one call.
        let texts: Vec<String> = checked
            .iter()
            .filter(|(i, _)| reqs[*i].vector.is_empty())
            .map(|(i, _)| reqs[*i].text.clone())
            .collect();
        let mut encoded = if texts.is_empty() {
            Vec::new()
        } else {
            match self
                .encode(texts, coll.dimension, coll.encoder.as_ref())
                .await
            {
                Ok(e) => e.vectors,
                Err(e) => {
                    for (i, _) in checked
                        .drain(..)
                        .filter(|(i, _)| reqs[*i].vector.is_empty())
                    {
                        out[i] = Some(Err(copy(&e)));
                    }
                    Vec::new()
                }
            }
        }
        .into_iter();
        let prepared: Vec<(usize, u32, Option<cpb::Filter>, Vec<f32>)> = checked
            .into_iter()
            .filter_map(|(i, (refine, filter))| {
                let vector = if reqs[i].vector.is_empty() {
                    encoded.next()?
                } else {
                    reqs[i].vector.clone()
                };
                Some((i, refine, filter, vector))
            })
            .collect();
        if !prepared.is_empty() {
            let queries: Vec<DenseQuery> = prepared
                .iter()
                .map(|(i, refine, filter, vector)| DenseQuery {
                    req: reqs[*i],
                    refine: *refine,
                    filter,
                    vector: vector.clone(),
                    k: reqs[*i].k,
                    with_vectors: false,
                })
                .collect();
            let budget = deadline.unwrap_or(self.default_deadline);
            let metric = Metric::from_wire(coll.metric).unwrap_or(Metric::InnerProduct);
            let rounds = self
                .fan_out_many(coll, shards, budget, queries.len(), |s| {
                    queries.iter().map(|q| q.request(coll, s)).collect()
                })
                .await;
            match rounds {
                Ok(rounds) => {
                    for ((i, ..), round) in prepared.iter().zip(rounds) {
                        let hits = merge(round.hits(), reqs[*i].k as usize, metric);
                        out[*i] = Some(self.respond(hits, vec![round], shards.len(), t));
                    }
                }
                Err(e) => {
                    for (i, ..) in &prepared {
                        out[*i] = Some(Err(copy(&e)));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Status::internal("a search of the batch was not run")))
            })
            .collect()
    }

    /// Deletes what a filter admits (issue 22), a scroll's page at a time; returns how
    /// many documents were deleted. A compaction during it restarts the scroll (what
    /// was deleted is gone, so nothing is counted twice).
    pub async fn delete_by_filter(&self, req: pb::DeleteByFilterRequest) -> Result<u64, Status> {
        let empty = req
            .filter
            .as_ref()
            .is_none_or(|f| f.must.is_empty() && f.should.is_empty() && f.must_not.is_empty());
        if empty {
            return Err(Status::invalid_argument(
                "delete by filter needs a filter; to delete every document, drop the collection",
            ));
        }
        let (mut deleted, mut cursor, mut restarts) = (0u64, String::new(), 0);
        loop {
            let page = self
                .scroll(pb::ScrollRequest {
                    collection: req.collection.clone(),
                    filter: req.filter.clone(),
                    limit: self.limits.ids_per_delete.min(self.limits.k) as u32,
                    cursor: cursor.clone(),
                    ..Default::default()
                })
                .await;
            let page = match page {
                Err(e) if e.code() == tonic::Code::FailedPrecondition && restarts < 3 => {
                    restarts += 1;
                    cursor.clear();
                    continue;
                }
                r => r?,
            };
            if !page.documents.is_empty() {
                deleted += self
                    .delete(pb::DeleteRequest {
                        collection: req.collection.clone(),
                        ids: page.documents.into_iter().map(|d| d.id).collect(),
                        request_id: String::new(),
                    })
                    .await?;
            }
            if page.cursor.is_empty() {
                return Ok(deleted);
            }
            cursor = page.cursor;
        }
    }

    /// A document's metadata replaced or merged into, its stored vector and text
    /// written back with it (issue 22): the client sends no vector. The write is
    /// conditional on the version read (`Shard::write_if`), so a write in between is
    /// never overwritten with stale text, vector or metadata: on a conflict the
    /// document is read and merged again (a few times), or, when the client named
    /// `if_version`, the client hears ABORTED. Refused during a re-embed (a write then
    /// needs both models' vectors).
    pub async fn set_payload(&self, req: pb::SetPayloadRequest) -> Result<(u64, u64), Status> {
        // Attempts before a conflict is the caller's: 8 writers merging into one
        // document at once all land within these (cluster test).
        const ATTEMPTS: usize = 24;
        let route = self.collection_shards(&req.collection)?;
        let coll = &route.coll;
        within!(
            self.limits,
            metadata_bytes,
            req.metadata_json.len(),
            "the metadata's length"
        )?;
        let given = shoal_engine::Metadata::parse(req.metadata_json.clone())
            .map_err(Status::invalid_argument)?;
        if dual_write(&self.view.read(), coll).is_some() {
            return Err(Status::failed_precondition(format!(
                "collection {:?} is being re-embedded: set the payload with an upsert of the text, or after the re-embed",
                coll.name
            )));
        }
        let name = coll.name.clone();
        let mut pause = Duration::from_millis(5);
        for attempt in 1.. {
            let got = self
                .get(pb::GetRequest {
                    collection: req.collection.clone(),
                    id: req.id.clone(),
                    with_vector: true,
                })
                .await?;
            let Some(doc) = got.document.filter(|_| got.found) else {
                return Err(Status::not_found(format!(
                    "document {:?} not found in collection {:?}",
                    req.id, name
                )));
            };
            if req.if_version != 0 && got.version != req.if_version {
                return Err(Status::aborted(format!(
                    "document {:?} is at version {}, not {} (if_version): read it again",
                    req.id, got.version, req.if_version
                )));
            }
            let metadata = if req.merge {
                merge_metadata(&doc.metadata_json, &given)
            } else {
                given.clone().into_string()
            };
            within!(
                self.limits,
                metadata_bytes,
                metadata.len(),
                "the merged metadata's length"
            )?;
            let upsert = Upsert {
                main: Main::Client,
                doc: rpb::StoredDoc {
                    id: doc.id,
                    text: doc.text,
                    metadata_json: metadata,
                    vector: doc.vector,
                    set_vector: Vec::new(),
                },
                set_tag: 0,
                expect: Some(got.version),
            };
            match self.write_all(&name, "", vec![upsert], Vec::new()).await {
                Ok(_) => return Ok((1, 0)),
                Err(e)
                    if e.code() == tonic::Code::Aborted
                        && req.if_version == 0
                        && attempt < ATTEMPTS =>
                {
                    metrics::counter!("shoal_gateway_write_conflicts_total").increment(1);
                    // Jittered, so writers that collided do not collide again in step.
                    let jitter = rand::random_range(0.5..1.5);
                    tokio::time::sleep(pause.mul_f64(jitter)).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// The document a more-like-this search starts from, with its vector and text.
    async fn like(
        &self,
        coll: &cpb::Collection,
        id: &str,
        req: &pb::SearchRequest,
    ) -> Result<pb::Document, Status> {
        if !req.text.is_empty() || !req.vector.is_empty() {
            return Err(Status::invalid_argument(
                "like_id is the query: give no text or vector with it",
            ));
        }
        // During a re-embed the stored vectors are the previous model's while queries
        // may be the next one's: refused rather than compared across models.
        if dual_write(&self.view.read(), coll).is_some() {
            return Err(Status::failed_precondition(format!(
                "collection {:?} is being re-embedded: more-like-this waits for it to commit or roll back",
                coll.name
            )));
        }
        let got = self
            .get(pb::GetRequest {
                collection: coll.name.clone(),
                id: id.to_string(),
                with_vector: true,
            })
            .await?;
        got.document.filter(|_| got.found).ok_or_else(|| {
            Status::not_found(format!(
                "document {id:?} not found in collection {:?}",
                coll.name
            ))
        })
    }

    /// One round of a search: every shard asked `make(shard)` within the budget (each
    /// through its least loaded readable replica, hedged). A request's own fault fails
    /// the whole search; a shard no replica answered is missing; none answering is
    /// UNAVAILABLE.
    async fn fan_out(
        &self,
        coll: &cpb::Collection,
        shards: &[cpb::Shard],
        budget: Duration,
        make: impl Fn(&cpb::Shard) -> rpb::ShardSearchRequest,
    ) -> Result<Round, Status> {
        let mut rounds = self
            .fan_out_many(coll, shards, budget, 1, |s| vec![make(s)])
            .await?;
        Ok(rounds.pop().expect("one round"))
    }

    /// `n` searches' rounds at once (issue 22: a batch search is one fan-out): each
    /// shard asked its `n` searches in one call (`SearchMany`; one search: `Search`).
    /// A shard that does not answer is missing from every round; a request fault
    /// fails them all; a round no shard answered is UNAVAILABLE.
    async fn fan_out_many(
        &self,
        coll: &cpb::Collection,
        shards: &[cpb::Shard],
        budget: Duration,
        n: usize,
        make: impl Fn(&cpb::Shard) -> Vec<rpb::ShardSearchRequest>,
    ) -> Result<Vec<Round>, Status> {
        let calls = shards.iter().map(|s| {
            let mut reqs = make(s);
            debug_assert_eq!(reqs.len(), n);
            let call = async move {
                if reqs.len() == 1 {
                    let (index, node, res) = self
                        .search_shard(s, reqs.pop().expect("one search"), budget)
                        .await;
                    (index, node, res.map(|r| vec![r]))
                } else {
                    self.search_shard_many(s, reqs, budget).await
                }
            };
            call.instrument(tracing::info_span!(
                "shard.search",
                shard = s.index,
                searches = n
            ))
        });
        let results = futures::future::join_all(calls).await;
        let mut rounds: Vec<Round> = (0..n).map(|_| Round::default()).collect();
        for (index, node, res) in results {
            match res {
                Ok(parts) => {
                    for (round, r) in rounds.iter_mut().zip(parts) {
                        round.answers.push(pb::ShardAnswer {
                            shard: index,
                            answered: true,
                            node: node.clone(),
                            generation: r.generation,
                            error: String::new(),
                            plan: r.plan.clone(),
                        });
                        round.parts.push((index, r));
                    }
                }
                // A limit or a bad argument is the request's fault, the same on every
                // replica: the caller hears it, not a partial answer.
                Err(e) if e.is_request_fault() => {
                    return Err(e
                        .context(format_args!("shard {}/{index}", coll.name))
                        .into());
                }
                Err(e) => {
                    tracing::warn!(collection = %coll.name, shard = index, node = %node, error = %e.message(), "shard did not answer");
                    for round in &mut rounds {
                        round.missing.push(index);
                        round.answers.push(pb::ShardAnswer {
                            shard: index,
                            answered: false,
                            node: node.clone(),
                            generation: 0,
                            error: format!("{}: {}", e.kind(), e.message()),
                            plan: String::new(),
                        });
                    }
                }
            }
        }
        if let Some(r) = rounds
            .iter()
            .find(|r| r.parts.is_empty() && !r.answers.is_empty())
        {
            return Err(Status::unavailable(format!(
                "no shard of {:?} answered: {}",
                coll.name, r.answers[0].error
            )));
        }
        Ok(rounds)
    }
}

/// The shards' answers to one round of a search.
#[derive(Default)]
struct Round {
    parts: Vec<(u32, rpb::ShardSearchResponse)>,
    answers: Vec<pb::ShardAnswer>,
    missing: Vec<u32>,
}

impl Round {
    /// Every shard's hits, named by shard (unmerged).
    fn hits(&self) -> Vec<pb::Hit> {
        self.parts
            .iter()
            .flat_map(|(index, r)| {
                r.hits.iter().map(move |h| pb::Hit {
                    id: h.id.clone(),
                    score: h.score,
                    shard: *index,
                    text: h.text.clone(),
                    metadata_json: h.metadata_json.clone(),
                })
            })
            .collect()
    }
}

/// What a search retrieves with and how (issue 22), checked: the mode, each side's
/// depth, the fusion and the pseudo-relevance feedback.
struct RetrievalPlan {
    mode: pb::RetrievalMode,
    /// Hits asked of each side (k alone, or the fusion depth).
    depth: u32,
    fusion: fusion::Fusion,
    prf: Option<Prf>,
}

#[derive(Clone, Copy)]
struct Prf {
    depth: u32,
    alpha: f32,
    beta: f32,
}

impl RetrievalPlan {
    fn of(req: &pb::SearchRequest, l: &Limits) -> Result<RetrievalPlan, Status> {
        let bad = |m: String| Err(Status::invalid_argument(m));
        let Ok(mode) = pb::RetrievalMode::try_from(req.mode) else {
            return bad(format!(
                "unknown retrieval mode {} (auto, dense, lexical, hybrid)",
                req.mode
            ));
        };
        let mode = resolve_mode(mode, req);
        let fusion = match pb::Fusion::try_from(req.fusion) {
            Ok(pb::Fusion::Rrf) => fusion::Fusion::Rrf {
                k: if req.rrf_k == 0 {
                    fusion::RRF_K
                } else {
                    req.rrf_k
                },
            },
            Ok(pb::Fusion::Linear) => {
                let w = req.dense_weight.unwrap_or(fusion::DENSE_WEIGHT);
                if !(0.0..=1.0).contains(&w) {
                    return bad(format!("dense_weight {w} must be between 0 and 1"));
                }
                fusion::Fusion::Linear { dense_weight: w }
            }
            Err(_) => return bad(format!("unknown fusion {} (rrf, linear)", req.fusion)),
        };
        if req.rrf_k > 100_000 {
            return bad(format!("rrf_k {} exceeds 100000", req.rrf_k));
        }
        // More like this asks one more: the document itself is dropped.
        let extra = u32::from(!req.like_id.is_empty());
        let depth = extra
            + if mode == pb::RetrievalMode::Hybrid {
                let d = if req.fusion_depth == 0 {
                    // The default depth, within the node's k limit (AUTO makes every
                    // text query hybrid, so a node with a small k limit still answers).
                    req.k.max(fusion::FUSION_DEPTH.min(l.k as u32))
                } else {
                    req.fusion_depth.max(req.k)
                };
                within!(
                    l,
                    k,
                    d,
                    "fusion_depth (hits each side of a hybrid search gathers)"
                )?;
                d
            } else {
                req.k
            };
        if extra > 0 {
            within!(l, id_bytes, req.like_id.len(), "like_id's length")?;
        }
        let prf = match &req.prf {
            Some(p) if p.enabled => {
                if mode == pb::RetrievalMode::Lexical {
                    return bad(
                        "pseudo-relevance feedback applies to dense and hybrid search".into(),
                    );
                }
                let depth = if p.depth == 0 {
                    fusion::PRF_DEPTH
                } else {
                    p.depth
                };
                within!(l, k, depth, "prf.depth")?;
                let (alpha, beta) = (
                    p.alpha.unwrap_or(fusion::PRF_ALPHA),
                    p.beta.unwrap_or(fusion::PRF_BETA),
                );
                if ![alpha, beta]
                    .iter()
                    .all(|x| x.is_finite() && (0.0..=10.0).contains(x))
                {
                    return bad(format!(
                        "prf alpha {alpha} and beta {beta} must be between 0 and 10"
                    ));
                }
                Some(Prf { depth, alpha, beta })
            }
            _ => None,
        };
        Ok(RetrievalPlan {
            mode,
            depth,
            fusion,
            prf,
        })
    }
}

/// A search's own checks against its collection and the limits (k, refine, the
/// candidates they make, the text's length, nprobe); returns the refine factor.
fn check_query(req: &pb::SearchRequest, coll: &cpb::Collection, l: &Limits) -> Result<u32, Status> {
    if req.k == 0 {
        return Err(Status::invalid_argument("k = 0: k must be at least 1"));
    }
    within!(l, k, req.k, "k")?;
    within!(l, refine, req.refine, "refine")?;
    let ix = coll.index.unwrap_or_default();
    let refine = if req.refine == 0 {
        ix.refine.max(1)
    } else {
        req.refine
    };
    within!(
        l,
        candidates,
        req.k as u64 * refine as u64,
        format!("k × refine ({} × {refine})", req.k)
    )?;
    within!(
        l,
        query_text_bytes,
        req.text.len(),
        "the query text's length"
    )?;
    if ix.nlist > 0 && req.nprobe > ix.nlist {
        return Err(Status::invalid_argument(format!(
            "nprobe {} exceeds the collection's nlist {}",
            req.nprobe, ix.nlist
        )));
    }
    Ok(refine)
}

/// Bytes of the hits' texts and metadata (what `payload_bytes` bounds).
fn hit_bytes(hits: &[pb::Hit]) -> usize {
    hits.iter()
        .map(|h| h.text.len() + h.metadata_json.len())
        .sum()
}

/// One dense round's question, as each shard is asked it.
struct DenseQuery<'a> {
    req: &'a pb::SearchRequest,
    refine: u32,
    filter: &'a Option<cpb::Filter>,
    vector: Vec<f32>,
    k: u32,
    with_vectors: bool,
}

impl DenseQuery<'_> {
    fn request(&self, coll: &cpb::Collection, s: &cpb::Shard) -> rpb::ShardSearchRequest {
        let (req, ix) = (self.req, coll.index.unwrap_or_default());
        rpb::ShardSearchRequest {
            shard: Some(Gateway::shard_id(coll, s.index)),
            vector: self.vector.clone(),
            k: self.k,
            // The collection's search parameters unless the query names its own (a
            // rebuild changes them with its generations, issue 21).
            nprobe: if req.nprobe == 0 {
                ix.nprobe
            } else {
                req.nprobe
            },
            refine: self.refine,
            exact: req.exact,
            shard_count: coll.shard_count,
            // The model the query was encoded with (a client's vector: the
            // collection's), so each replica answers from that model's vectors.
            model: coll
                .encoder
                .as_ref()
                .map_or_else(String::new, |e| e.content_hash.clone()),
            with_text: req.with_text && !self.with_vectors,
            with_payload: req.with_payload && !self.with_vectors,
            filter: self.filter.clone(),
            lexical: None,
            with_vectors: self.with_vectors,
            count_only: false,
            scroll: None,
        }
    }
}

/// Stored metadata with `given`'s top-level keys put over it (set-payload's merge);
/// stored metadata that is not an object is replaced.
fn merge_metadata(stored: &str, given: &shoal_engine::Metadata) -> String {
    let mut m = match serde_json::from_str::<serde_json::Value>(stored) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let serde_json::Value::Object(g) = given.to_value() {
        m.extend(g);
    }
    serde_json::Value::Object(m).to_string()
}

/// What AUTO means for this request (issue 22): hybrid (RRF) for a text query, dense
/// for a vector or a like_id. Hybrid RRF beat dense and BM25 alone on SciFact,
/// MEDLINE, CACM and Cranfield (significantly on three) at dense's p50 latency:
/// docs/benchmarks.md, "Retrieval modes".
fn resolve_mode(mode: pb::RetrievalMode, req: &pb::SearchRequest) -> pb::RetrievalMode {
    match mode {
        pb::RetrievalMode::Auto if !req.text.trim().is_empty() && req.like_id.is_empty() => {
            pb::RetrievalMode::Hybrid
        }
        pb::RetrievalMode::Auto => pb::RetrievalMode::Dense,
        m => m,
    }
}

/// A search's filter (issue 22), checked against the collection's indexed fields and
/// the limits: INVALID_ARGUMENT naming the problem. An empty filter is none.
fn check_filter(
    filter: Option<&cpb::Filter>,
    coll: &cpb::Collection,
    limits: &Limits,
) -> Result<Option<cpb::Filter>, Status> {
    let Some(wire) = filter else {
        return Ok(None);
    };
    let f =
        Filter::from_wire(wire).map_err(|e| Status::invalid_argument(format!("filter: {e}")))?;
    if f.is_empty() {
        return Ok(None);
    }
    let fields: Vec<PayloadField> = coll
        .payload_fields
        .iter()
        .filter_map(|f| PayloadField::from_wire(f).ok())
        .collect();
    f.check(&fields, limits).map_err(|e| {
        Status::invalid_argument(format!("filter on collection {:?}: {e}", coll.name))
    })?;
    Ok(Some(wire.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_hybrid_for_text_and_dense_otherwise() {
        use pb::RetrievalMode as M;
        let text = pb::SearchRequest {
            text: "a query".into(),
            ..Default::default()
        };
        let vector = pb::SearchRequest {
            vector: vec![0.5; 4],
            ..Default::default()
        };
        let like = pb::SearchRequest {
            like_id: "d1".into(),
            ..Default::default()
        };
        assert_eq!(resolve_mode(M::Auto, &text), M::Hybrid);
        assert_eq!(resolve_mode(M::Auto, &vector), M::Dense);
        assert_eq!(resolve_mode(M::Auto, &like), M::Dense);
        for m in [M::Dense, M::Lexical, M::Hybrid] {
            assert_eq!(resolve_mode(m, &text), m);
        }
    }

    fn hit(id: &str, score: f32) -> pb::Hit {
        pb::Hit {
            id: id.into(),
            score,
            shard: 0,
            text: String::new(),
            metadata_json: String::new(),
        }
    }

    #[test]
    fn merge_orders_by_metric_and_breaks_ties_by_id() {
        let hits = vec![hit("b", 0.5), hit("a", 0.5), hit("c", 0.9), hit("d", 0.1)];
        let ip: Vec<_> = merge(hits.clone(), 3, Metric::InnerProduct)
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(ip, ["c", "a", "b"]);
        let l2: Vec<_> = merge(hits, 2, Metric::L2)
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(l2, ["d", "a"]);
    }

    #[test]
    fn routing_is_stable_and_spreads() {
        assert_eq!(shard_of("doc-1", 3), shard_of("doc-1", 3));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard_of(&format!("doc-{i}"), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn vectors_are_checked() {
        assert!(check_vector(&[1.0, 2.0], 2, "v").is_ok());
        let e = check_vector(&[1.0], 2, "v").unwrap_err();
        assert!(e.message().contains("dimension 1"));
        let e = check_vector(&[1.0, f32::NAN], 2, "v").unwrap_err();
        assert!(e.message().contains("position 1"));
    }

    #[test]
    fn writes_feed_a_re_embed_only_while_it_builds_or_is_switched() {
        let coll = cpb::Collection {
            name: "c".into(),
            id: 3,
            ..Default::default()
        };
        let op = |id: u64, state: &str, phase: &str, model: bool| cpb::Operation {
            id,
            kind: "rebuild".into(),
            collection: "c".into(),
            collection_id: 3,
            state: state.into(),
            rebuild: Some(cpb::Rebuild {
                phase: phase.into(),
                model: model.then(|| cpb::ModelChange {
                    encoder: Some(cpb::EncoderRef {
                        content_hash: "sha256:new".into(),
                        ..Default::default()
                    }),
                    dimension: 768,
                    previous: Some(cpb::EncoderRef {
                        content_hash: "sha256:old".into(),
                        ..Default::default()
                    }),
                    previous_dimension: 384,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let view = |ops: Vec<cpb::Operation>| MapView {
            operations: ops.into_iter().map(|o| (o.id, o)).collect(),
            ..MapView::default()
        };
        let d = dual_write(&view(vec![op(5, "running", "building", true)]), &coll).unwrap();
        assert_eq!((d.tag, d.dimension, d.main_dimension), (5, 768, 384));
        assert_eq!(d.main.unwrap().content_hash, "sha256:old");
        assert!(dual_write(&view(vec![op(5, "running", "switched", true)]), &coll).is_some());
        assert!(dual_write(&view(vec![op(5, "succeeded", "committed", true)]), &coll).is_none());
        assert!(dual_write(&view(vec![op(5, "cancelled", "rolled_back", true)]), &coll).is_none());
        assert!(dual_write(&view(vec![op(5, "running", "building", false)]), &coll).is_none());
        // Only the collection's newest rebuild counts, and only this incarnation's.
        let newer = vec![
            op(5, "running", "building", true),
            op(6, "running", "building", false),
        ];
        assert!(dual_write(&view(newer), &coll).is_none());
        let other = cpb::Collection {
            id: 4,
            ..coll.clone()
        };
        assert!(dual_write(&view(vec![op(5, "running", "building", true)]), &other).is_none());
    }
}
