//! The shard engine: one replica's durable documents, vectors and index generations.
//!
//! Write path: validate the whole batch → one WAL frame + fsync → append to the
//! segment files → publish to readers under a short lock. Search path: IVF-PQ on the
//! serving generation (`k × refine` candidates) → exact re-score from the memory-mapped
//! vectors → exact scan of the fresh tail (rows newer than the generation) → top k.
//! Rebuilds train generation N+1 on a background thread from the stored vectors while N
//! serves; the swap is one pointer store, and N is freed when its last reader drops it.

mod ann;
mod compact;
mod config;
mod error;
mod generations;
mod lexical;
mod manifest;
mod metadata;
mod payload_index;
mod record;
mod requests;
mod rerank;
mod rows;
mod storage;
mod topk;
mod vector_set;
mod wal;

pub use compact::CompactionReport;
use compact::RowMap;
pub use generations::{gate_settled, GateConfig, GateReport, RECENT_QUERIES};
use manifest::{segment_files, CompactionPoint};
use requests::RecentRequests;
use rows::Rows;
/// The row table and id index, public for the footprint benchmark.
pub use rows::{Rows as RowTable, MAX_DOC_OFFSET, MAX_ROWS};

use shoal_proto::routing::Routing;
use std::borrow::Borrow;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub use ann::{search_shared, set_thread_omp_threads};
pub use config::{
    CollectionConfig, IvfPqParams, Metric, Scoring, MAX_CANDIDATES, MAX_DOC_BYTES, MAX_ID_BYTES,
    MAX_REQUEST_ID_BYTES, MAX_TOP_K,
};
pub use error::{Result, ShardError};
pub use lexical::{idf as bm25_idf, tokenize, Bm25, LexicalStats};
use lexical::{LexicalIndex, RowTerms};
pub use metadata::Metadata;
use payload_index::{PayloadIndex, RowValues};
pub use rerank::Precision;
pub use shoal_proto::filter::{Filter, PayloadField};
pub use storage::{sync_dir, write_atomic};
pub use vector_set::{PendingRow, VectorSetInfo};
pub use wal::{WalBatch, WalOp};

use ann::AnnIndex;
use manifest::{GenerationMeta, Manifest, RerankMeta};
use rerank::{Codec, RerankCopy};
use storage::{DocsFile, DocsReader, SegmentEntry, VectorStore, VectorView};
use topk::TopK;
use wal::Wal;

/// The log is checkpointed into the segments and restarted past this size.
const WAL_CHECKPOINT_BYTES: u64 = 64 << 20;
/// Vectors handed to FAISS per `add` call during a build.
const BUILD_CHUNK_ROWS: usize = 65_536;
/// Largest refine factor a query may ask for.
pub const MAX_REFINE_FACTOR: usize = 1_000;

/// A document as clients write it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    pub text: Option<String>,
    pub metadata: Metadata,
    pub vector: Vec<f32>,
}

/// A write to apply, in order, as part of one atomic batch.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Upsert(Document),
    Delete(String),
    /// Drop the rows dead after this batch ([`compact`]); alone in its batch.
    Compact,
    /// Delete every live document this routing sends elsewhere (issue 19: both halves
    /// of a split shard log one, so each keeps only its own ids); alone in its batch.
    /// What it deletes is decided by the rows it finds, which every replica at the
    /// same log position holds alike.
    Retain(Routing),
    /// A re-embed's vector set (issue 21, [`vector_set`]): begin it, give a row its
    /// vector (`version` 0: the upsert just before), drop it, commit it.
    SetBegin {
        tag: u64,
        model: String,
        from_model: String,
        dimension: usize,
    },
    SetVector {
        tag: u64,
        id: String,
        version: u64,
        vector: Vec<f32>,
    },
    SetDrop(u64),
    SetCommit(u64),
}

/// A conditional write's expectation (optimistic concurrency, issue 22): document
/// `id`'s live version is `version` — the sequence number of the batch that wrote it
/// ([`StoredDocument::seq`]), 0 for a document that must not exist. Checked under the
/// writer lock, before the batch is numbered: a batch whose expectations fail is not
/// written ([`ShardError::Conflict`]). Only the primary checks; the batch it logs is
/// an ordinary one, so backups apply it as ordered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub id: String,
    pub version: u64,
}

/// What a durable write reports back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteAck {
    /// Sequence number of the batch in this shard's log.
    pub seq: u64,
    pub upserted: usize,
    /// Deletes that removed a live document.
    pub deleted: usize,
    /// The request id was seen before: this is the first attempt's ack, nothing new
    /// was written.
    pub duplicate: bool,
}

/// Bytes of request ids remembered per shard for idempotent retries (the oldest are
/// forgotten; [`requests`]): ~31,000 36-byte UUIDs, 6 minutes of batches at the bulk
/// import's 90,000 vectors/s in batches of 1,000 on one shard (issue 18's measurement).
const REMEMBERED_REQUEST_BYTES: usize = 4 << 20;
/// Of those, the newest kept in the manifest across checkpoints (~3,900 UUIDs).
const CHECKPOINTED_REQUEST_BYTES: usize = 512 << 10;

/// A snapshot's files: the documents segment and the vectors, each up to its length,
/// and the serving index generation's file whole (issue 18: a restored copy answers by
/// IVF-PQ at once instead of scanning every row until something rebuilds it).
fn snapshot_files(m: &Manifest) -> Vec<(String, u64)> {
    let (docs, vectors) = m.segments();
    let mut files = vec![
        (docs, m.docs_len),
        (vectors, m.rows * m.config.dimension as u64 * 4),
    ];
    if let Some(g) = &m.serving {
        files.extend(g.files().map(|(f, n)| (f.clone(), n)));
    }
    // A re-embed's vector set travels with the rows it is aligned with (issue 21): a
    // copy made mid-re-embed goes on filling it from the log.
    if let Some(s) = &m.vector_set {
        files.push((s.file.clone(), m.rows * s.dimension as u64 * 4));
        files.push((format!("{}.crc", s.file), m.rows * 4));
    }
    if m.vector_crcs > 0 {
        files.push((format!("{}.crc", m.segments().1), m.vector_crcs * 4));
    }
    files
}

/// A consistent copy of a shard's checkpointed state: its manifest, the prefixes of
/// the segment files it names and its serving index generation. The segments are
/// append-only, so the prefixes stay valid while writes go on; an index file is
/// immutable but removed when a rebuild swaps in its successor, so every file is
/// opened while the manifest still names it and read through that handle (an open
/// file outlives its name).
/// A piece of a served generation's file, as another replica fetches it.
#[derive(Clone, Debug)]
pub struct GenerationChunk {
    /// Opaque to the caller: handed back to [`Shard::install_generation`].
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
    /// The file's whole length.
    pub total: u64,
}

/// What travels with a generation's file: its manifest entry and the epoch of the
/// last batch it covers (with `covered_seq`, the point where histories must agree).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GenerationExport {
    meta: GenerationMeta,
    covered_epoch: u64,
    /// The trained codec of its re-ranking copy: the receiver encodes its own copy
    /// from its own vectors (which equal the builder's up to `covered_seq`).
    #[serde(default)]
    codec: Option<Codec>,
}

#[derive(Clone, Debug)]
pub struct SnapshotSource {
    pub manifest: Vec<u8>,
    /// (file name in the shard dir, bytes to copy, the file opened)
    pub files: Vec<(String, u64, Arc<fs::File>)>,
    pub last_seq: u64,
    /// Live documents at `last_seq` (a backup's record counts them, issue 20).
    pub live_docs: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SearchMode {
    /// IVF-PQ candidates re-scored exactly with the stored vectors (generate-rank).
    #[default]
    Rerank,
    /// IVF-PQ only: approximate PQ scores, no re-scoring.
    Approximate,
    /// Exact scan of every live vector: the reference.
    Exact,
}

#[derive(Clone, Debug, Default)]
pub struct SearchParams {
    pub k: usize,
    pub nprobe: Option<usize>,
    pub refine_factor: Option<usize>,
    pub mode: SearchMode,
    /// A re-embed's vector set to search instead of the stored vectors
    /// ([`Shard::set_for_model`]).
    pub set: Option<u64>,
    /// Only rows whose metadata passes (issue 22), checked against the collection's
    /// indexed fields by the caller; the plan is chosen per search ([`FilterPlan`]).
    pub filter: Option<Arc<Filter>>,
    /// Forces a filtered search's plan (benchmarks compare them; `None`: chosen by
    /// [`plan_filter`]). IVF-filtered on a generation a compaction renumbered is not
    /// possible and falls back to the chosen plan.
    pub plan: Option<FilterPlan>,
}

/// How a filtered search ran, chosen from how many rows the filter admits
/// ([`plan_filter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterPlan {
    /// Every admitted row scored exactly (few admitted, or an exact search).
    Exact,
    /// IVF-PQ restricted to the admitted rows (FAISS `IDSelectorBitmap`), with more
    /// lists probed the fewer rows are admitted, then re-scored.
    IvfFiltered,
    /// IVF-PQ over every row asked for more candidates, the unadmitted dropped (a
    /// tenth of the rows admitted or more).
    PostFiltered,
}

impl FilterPlan {
    pub fn name(self) -> &'static str {
        match self {
            FilterPlan::Exact => "exact",
            FilterPlan::IvfFiltered => "ivf-filtered",
            FilterPlan::PostFiltered => "post-filtered",
        }
    }
}

/// Admitted rows at or below which a filtered search scores them all exactly by
/// default (`CollectionConfig::exact_filter_rows`): 10,000
/// rows of 384 floats are ~4 M multiply-adds, about what IVF-PQ spends probing its
/// lists (docs/benchmarks.md, "Filtered search").
pub const EXACT_FILTER_ROWS: u64 = 10_000;
/// Admitted fraction of the rows at or above which a filtered search post-filters:
/// on a million rows post-filtering answered 10% and 50% filters faster than the
/// restricted index (376 vs 308 and 192 vs 150 queries/s, keyword 10%: 911 vs 642),
/// at recall@10 0.9985-1.0 (docs/benchmarks.md, "Filtered search").
pub const POST_FILTER_FRACTION: f64 = 0.1;

/// The plan for a filter admitting `admitted` of `rows` rows on an index whose labels
/// are still row numbers (`renumbered` false), exact at or below `exact_rows`, and the factor by which it widens the
/// candidates and lists probed (1 / the admitted fraction, for the plans that use the
/// index). A pure decision: tested alone, and reported with each answer.
pub fn plan_filter(
    admitted: u64,
    rows: u64,
    renumbered: bool,
    exact_rows: u64,
) -> (FilterPlan, f64) {
    let fraction = admitted as f64 / rows.max(1) as f64;
    if admitted <= exact_rows || fraction == 0.0 {
        (FilterPlan::Exact, 1.0)
    } else if fraction >= POST_FILTER_FRACTION {
        (FilterPlan::PostFiltered, 1.0 / fraction)
    } else if !renumbered {
        (FilterPlan::IvfFiltered, 1.0 / fraction)
    } else {
        (FilterPlan::Exact, 1.0)
    }
}

impl SearchParams {
    pub fn top(k: usize) -> Self {
        Self {
            k,
            ..Self::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: Arc<str>,
    /// Squared L2 distance (smaller is closer) or inner product (larger is closer).
    pub score: f32,
}

#[derive(Clone, Debug)]
pub struct SearchResult {
    pub hits: Vec<Hit>,
    /// Serving generation that answered, if any.
    pub generation: Option<u64>,
    /// Rows newer than that generation, scanned exactly.
    pub fresh_rows: u64,
    /// How a filtered search ran (None: no filter).
    pub plan: Option<FilterPlan>,
}

/// One page of [`Shard::scroll`].
#[derive(Clone, Debug)]
pub struct ScrollPage {
    pub ids: Vec<Arc<str>>,
    /// The layout the rows are numbered in.
    pub layout: u64,
    /// Where the next page begins; None: this was the last.
    pub next_row: Option<u64>,
}

/// A document's text and metadata (JSON), as a search's hit carries them (issue 22).
#[derive(Clone, Debug, PartialEq)]
pub struct Payload {
    pub text: Option<String>,
    pub metadata: String,
}

/// A stored document read back.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDocument {
    pub id: String,
    pub text: Option<String>,
    pub metadata: Metadata,
    pub vector: Vec<f32>,
    pub seq: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerationInfo {
    pub id: u64,
    pub covered_rows: u64,
    pub indexed_vectors: u64,
    pub params: IvfPqParams,
    pub index_file_bytes: u64,
    pub build_seconds: f64,
    /// What re-ranking reads for its candidates (`rerank.rs`).
    pub rerank: Precision,
    /// The cluster operation that built it (0: none; issue 21).
    pub tag: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShardStats {
    pub live_docs: usize,
    pub rows: u64,
    pub last_seq: u64,
    pub serving: Option<GenerationInfo>,
    pub fresh_rows: u64,
    pub building: Option<u64>,
    /// A rebuild's generation built beside the serving one, and the one a switch
    /// replaced, kept until the rebuild is committed (issue 21).
    pub staged: Option<GenerationInfo>,
    pub previous: Option<GenerationInfo>,
    /// A re-embed's vector set and how far it is filled (issue 21).
    pub vector_set: Option<VectorSetInfo>,
}

/// The serving index of one generation; rows `>= covered_rows` are the fresh tail.
struct Generation {
    info: GenerationInfo,
    index: Arc<AnnIndex>,
    /// The reduced-precision copy re-ranking reads, indexed by label.
    rerank: Option<Arc<RerankCopy>>,
    /// Row maps of the compactions since it was built, oldest first: its labels are
    /// the row numbers of its build's layout.
    remaps: Vec<Arc<RowMap>>,
}

/// What holds a shard's build claim: one index build or one compaction at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    Build(u64),
    Compact(u64),
}

impl Work {
    fn busy(self) -> ShardError {
        match self {
            Work::Build(g) => ShardError::BuildInProgress(g),
            Work::Compact(seq) => ShardError::CompactionInProgress(seq),
        }
    }
}

struct State {
    /// Ids, record offsets and liveness of every row, and the live ids' index.
    rows: Rows,
    vectors: VectorView,
    /// The documents file the row table's offsets point into.
    docs: DocsReader,
    /// The manifest's `layout`: a compaction's swap changes every row number at once.
    layout: u64,
    serving: Option<Arc<Generation>>,
    /// A rebuild's generation not yet switched to, and the one its switch replaced
    /// (issue 21, `generations.rs`): the manifest's `staged` and `previous`, loaded.
    staged: Option<Arc<Generation>>,
    previous: Option<Arc<Generation>>,
    /// The stored vectors' dimension and model (a re-embed's commit changes both).
    dim: usize,
    model: Arc<str>,
    /// A re-embed's vector set (`vector_set.rs`).
    set: Option<vector_set::SetView>,
    /// The layout's checksum table, after a re-embed's commit (rows below its length).
    crcs: Option<Arc<Vec<u32>>>,
    /// The indexed metadata fields' values by row (issue 22, `payload_index.rs`).
    payload: PayloadIndex,
    /// The stored texts' terms by row, for BM25 (issue 22, `lexical.rs`).
    lexical: LexicalIndex,
}

/// The checksum row `row`'s vector must have: the layout's table's (a re-embed's
/// commit), else its record's.
fn expected_crc(crcs: Option<&Vec<u32>>, row: u64, record: u32) -> u32 {
    crcs.and_then(|t| t.get(row as usize).copied())
        .unwrap_or(record)
}

struct Writer {
    /// `None` only while the shard is being opened (the old log is replayed first).
    wal: Option<Wal>,
    docs: DocsFile,
    vectors: VectorStore,
    last_seq: u64,
    manifest: Manifest,
    /// Recent request ids and their acks.
    requests: RecentRequests,
    set: Option<vector_set::SetWriter>,
}

impl Writer {
    /// Records `batch` as applied (after staging and publishing it): the last
    /// sequence number, its epoch in the history, its request id.
    fn finish(&mut self, batch: &WalBatch, upserted: usize, deleted: usize) -> WriteAck {
        self.last_seq = batch.seq;
        if matches!(batch.ops.as_slice(), [WalOp::Compact]) {
            // The latest point supersedes an earlier one not yet done (`compact`).
            self.manifest.compacting = Some(CompactionPoint {
                seq: batch.seq,
                rows: self.vectors.view().rows(),
                docs_len: self.docs.len(),
            });
        }
        let ack = WriteAck {
            seq: batch.seq,
            upserted,
            deleted,
            duplicate: false,
        };
        self.note(batch.epoch, &batch.request_id, ack);
        ack
    }

    fn note(&mut self, epoch: u64, request_id: &str, ack: WriteAck) {
        if self.manifest.epochs.last().is_none_or(|&(e, _)| e != epoch) {
            self.manifest.epochs.push((epoch, ack.seq));
        }
        self.requests.insert(request_id, ack);
    }

    fn last_epoch(&self) -> u64 {
        self.manifest.epochs.last().map_or(0, |&(e, _)| e)
    }
}

/// The epoch batch `seq` was written in, from a history of (epoch, first seq).
pub fn epoch_at(epochs: &[(u64, u64)], seq: u64) -> u64 {
    if seq == 0 {
        return 0;
    }
    epochs
        .iter()
        .rev()
        .find(|&&(_, first)| first <= seq)
        .map_or(0, |&(e, _)| e)
}

/// Lock order, never reversed: `building`, then `writer`, then `state`.
struct Inner {
    dir: PathBuf,
    config: CollectionConfig,
    writer: Mutex<Writer>,
    state: RwLock<State>,
    building: Mutex<Option<Work>>,
    /// Whether a logged compaction starts its own thread (tests run it by hand).
    auto_compact: AtomicBool,
    /// When a compaction last failed: the automatic ones wait `COMPACT_RETRY` (a full
    /// disk must not turn every write into a rewrite attempt).
    compact_failed: Mutex<Option<Instant>>,
    /// Fresh rows that start a rebuild (0 = never): the manifest's value at open, then
    /// whatever the collection's policy in the cluster map says
    /// ([`Shard::set_auto_rebuild_tail`]; issue 18: off during a bulk load).
    auto_rebuild_tail: AtomicUsize,
    /// Build parameters and training sample chosen for the whole collection (issue 18:
    /// the cluster's index build operation sizes them from the shards), used in place
    /// of the manifest's by every build that names none. Not persisted.
    build_params: Mutex<Option<(IvfPqParams, usize)>>,
    /// The re-ranking precision the next build gives its generation: the manifest's
    /// at open, then the collection's in the cluster map ([`Shard::set_rerank`]).
    rerank: Mutex<Precision>,
    /// The ids this replica answers for (issue 19): after a split, until its retain
    /// batch deletes the other half, reads skip rows routed to the sibling. Set from
    /// the cluster map ([`Shard::set_routing`]); not persisted.
    routing: Mutex<Option<Routing>>,
    poisoned: AtomicBool,
    /// Why a write poisoned this handle (not set by [`Shard::retire`]): reported to
    /// the coordinators so the replica leaves its shard's quorum until it is reopened.
    failure: Mutex<Option<String>>,
    /// The batches the log replayed at open, until replication takes them.
    replayed: Mutex<Vec<Arc<WalBatch>>>,
    /// The newest query vectors searched here (issue 21: a rebuild's gate replays them).
    recent: Mutex<std::collections::VecDeque<Vec<f32>>>,
}

impl Drop for Inner {
    /// A clean close folds the log into the segments, so the next open replays nothing.
    fn drop(&mut self) {
        if self.poisoned.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = checkpoint(&self.dir, self.writer.get_mut()) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "checkpoint on close failed; the log will be replayed");
        }
    }
}

/// A handle to an open shard; clones share it.
#[derive(Clone)]
pub struct Shard {
    inner: Arc<Inner>,
}

/// Written by [`Shard::mark_corrupt`]: the next open checks every vector first.
const CORRUPT_MARKER: &str = "CORRUPT";

impl Shard {
    /// Creates an empty shard in `dir` (which must not hold one already).
    pub fn create(dir: &Path, config: CollectionConfig) -> Result<Self> {
        config.validate()?;
        fs::create_dir_all(dir).map_err(ShardError::io(dir))?;
        if Manifest::path(dir).exists() {
            return Err(ShardError::InvalidConfig(format!(
                "a shard already exists at {}",
                dir.display()
            )));
        }
        Manifest::new(config).store(dir)?;
        Self::open(dir)
    }

    /// Whether `dir` holds a shard (its manifest).
    pub fn exists(dir: &Path) -> bool {
        Manifest::path(dir).exists()
    }

    /// Opens the shard in `dir`, creating it with `config` if there is none.
    pub fn open_or_create(dir: &Path, config: CollectionConfig) -> Result<Self> {
        if Manifest::path(dir).exists() {
            Self::open(dir)
        } else {
            Self::create(dir, config)
        }
    }

    /// Opens an existing shard and recovers it to exactly its acknowledged state; a
    /// compaction it had logged and not done goes on in the background.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// [`Shard::open`] leaving a pending compaction to the caller
    /// ([`Shard::compact_pending`], or [`Shard::set_auto_compact`]): for tools and
    /// tests that look at a shard as a crash left it.
    pub fn open_manual(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    fn open_with(dir: &Path, auto_compact: bool) -> Result<Self> {
        let started = Instant::now();
        let manifest = Manifest::load(dir)?;
        let config = manifest.config.clone();
        manifest.remove_unreferenced_files(dir)?;

        let (docs_name, vectors_name) = manifest.segments();
        let docs = DocsFile::open(dir.join(docs_name), manifest.docs_len)?;
        let vectors = VectorStore::open(dir.join(&vectors_name), config.dimension, manifest.rows)?;
        let mut state = State {
            rows: Rows::with_capacity(manifest.rows as usize),
            vectors: vectors.view(),
            docs: docs.reader()?,
            layout: manifest.layout,
            serving: None,
            staged: None,
            previous: None,
            dim: config.dimension,
            model: Arc::from(manifest.model.as_str()),
            set: None,
            crcs: match manifest.vector_crcs {
                0 => None,
                n => Some(Arc::new(storage::read_crcs(
                    &storage::crc_file(&dir.join(&vectors_name)),
                    n,
                )?)),
            },
            payload: PayloadIndex::new(&config.payload_fields),
            lexical: LexicalIndex::default(),
        };
        load_segment(&docs.path, &vectors, &mut state)?;
        if state.rows.len() != manifest.rows {
            return Err(ShardError::Corrupt {
                file: docs.path.clone(),
                offset: manifest.docs_len,
                reason: format!(
                    "segment holds {} rows, manifest says {}",
                    state.rows.len(),
                    manifest.rows
                ),
            });
        }

        let set = vector_set::open(dir, &manifest, &state.rows)?;
        state.set = set.as_ref().map(|s| s.view(manifest.rows));
        let mut writer = Writer {
            wal: None,
            docs,
            vectors,
            last_seq: manifest.applied_seq,
            manifest,
            requests: RecentRequests::new(REMEMBERED_REQUEST_BYTES),
            set,
        };
        for (id, seq, upserted, deleted) in writer.manifest.requests.clone() {
            let ack = WriteAck {
                seq,
                upserted,
                deleted,
                duplicate: false,
            };
            writer.requests.insert(&id, ack);
        }
        let mut replayed = Vec::new();
        wal::replay(dir, writer.manifest.applied_seq, |batch| {
            apply(dir, &mut writer, &mut state, &batch)?;
            replayed.push(Arc::new(batch));
            Ok(())
        })?;

        if let Some(meta) = writer.manifest.serving.clone() {
            state.serving = Some(Arc::new(load_generation(dir, &meta)?));
        }
        // A rebuild's staged or kept generation that does not load is dropped, not the
        // replica: the serving one is what answers (issue 21).
        generations::load_kept(dir, &mut writer.manifest, &mut state);
        // Marked corrupt by the scrubber: every vector checked before it serves again
        // (a repaired file lifts the mark; a damaged one keeps the replica closed).
        let marker = dir.join(CORRUPT_MARKER);
        if marker.exists() {
            let offsets: Vec<u64> = (0..state.rows.len())
                .map(|r| state.rows.doc_offset(r))
                .collect();
            SegmentsRead::of(&state, dir).check_vectors(0, &offsets)?;
            tracing::warn!(dir = %dir.display(), "every vector of a replica marked corrupt checks out; the mark is lifted");
            fs::remove_file(&marker).map_err(ShardError::io(&marker))?;
        }
        // Open needs no free space (issue 14: a full disk must not stop a node's
        // replicas from reopening): with nothing replayed the log is reopened as it is;
        // after a replay a checkpoint folds it in, and if that fails the log, which
        // still holds every replayed batch, is appended to instead.
        if replayed.is_empty() {
            writer.wal = Some(Wal::resume(dir, writer.manifest.applied_seq + 1)?);
        } else if let Err(e) = checkpoint(dir, &mut writer) {
            tracing::warn!(dir = %dir.display(), error = %e, "checkpoint at open failed; appending to the replayed log");
            writer.wal = Some(Wal::resume(dir, writer.manifest.applied_seq + 1)?);
        }
        // Recovery decoded the log batch by batch; hand those buffers back to the OS so
        // a node's resident memory is its steady state, not its recovery peak.
        // SAFETY: glibc's malloc_trim only releases free heap memory.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::info!(
            dir = %dir.display(),
            rows = state.rows.len(),
            live = state.rows.live_len(),
            replayed_batches = replayed.len(),
            generation = writer.manifest.serving.as_ref().map(|g| g.id),
            took_ms = started.elapsed().as_millis() as u64,
            "shard opened"
        );
        let shard = Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                auto_rebuild_tail: AtomicUsize::new(config.auto_rebuild_tail),
                build_params: Mutex::new(None),
                rerank: Mutex::new(config.rerank),
                routing: Mutex::new(None),
                config,
                writer: Mutex::new(writer),
                state: RwLock::new(state),
                building: Mutex::new(None),
                auto_compact: AtomicBool::new(auto_compact),
                compact_failed: Mutex::new(None),
                poisoned: AtomicBool::new(false),
                failure: Mutex::new(None),
                replayed: Mutex::new(replayed),
                recent: Mutex::default(),
            }),
        };
        // A compaction logged before a crash or carried by a snapshot goes on.
        shard.maybe_compact();
        Ok(shard)
    }

    /// Whether a logged compaction starts its own thread (on by default; off, the
    /// caller runs [`Shard::compact_pending`]).
    pub fn set_auto_compact(&self, on: bool) {
        self.inner.auto_compact.store(on, Ordering::Relaxed);
        if on {
            self.maybe_compact();
        }
    }

    pub fn config(&self) -> &CollectionConfig {
        &self.inner.config
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Inserts or replaces documents; durable when this returns.
    pub fn upsert(&self, docs: Vec<Document>) -> Result<WriteAck> {
        self.write(docs.into_iter().map(WriteOp::Upsert).collect())
    }

    pub fn delete(&self, ids: Vec<String>) -> Result<WriteAck> {
        self.write(ids.into_iter().map(WriteOp::Delete).collect())
    }

    /// Applies a batch atomically: every op is validated first, then the batch is
    /// logged with one fsync and made visible to readers at once.
    pub fn write(&self, ops: Vec<WriteOp>) -> Result<WriteAck> {
        self.write_as(ops, 0, "").map(|(ack, _)| ack)
    }

    /// `write` as a primary: the batch is stamped with `epoch` and `request_id`, and
    /// returned for shipping to the backups. A request id seen before returns the first
    /// attempt's ack (marked duplicate) and writes nothing.
    pub fn write_as(
        &self,
        ops: Vec<WriteOp>,
        epoch: u64,
        request_id: &str,
    ) -> Result<(WriteAck, Option<Arc<WalBatch>>)> {
        self.write_if(ops, epoch, request_id, &[])
    }

    /// [`Shard::write_as`] if every [`Expect`] holds when the batch would be numbered;
    /// else [`ShardError::Conflict`] naming the first that does not, and nothing written.
    /// A retry of a request id already applied answers its ack (duplicate) whatever the
    /// expectations say now.
    pub fn write_if(
        &self,
        ops: Vec<WriteOp>,
        epoch: u64,
        request_id: &str,
        expect: &[Expect],
    ) -> Result<(WriteAck, Option<Arc<WalBatch>>)> {
        validate_request_id(request_id)?;
        for e in expect {
            validate_id(&e.id)?;
        }
        let mut logged = Vec::with_capacity(ops.len());
        for op in ops {
            let op = match op {
                WriteOp::Upsert(d) => WalOp::Upsert {
                    metadata: d.metadata.into_string(),
                    id: d.id,
                    text: d.text,
                    vector: d.vector,
                },
                WriteOp::Delete(id) => WalOp::Delete { id },
                WriteOp::Compact => WalOp::Compact,
                WriteOp::Retain(r) => WalOp::Retain {
                    modulus: r.modulus,
                    residue: r.residue,
                },
                WriteOp::SetBegin {
                    tag,
                    model,
                    from_model,
                    dimension,
                } => WalOp::SetBegin {
                    tag,
                    model,
                    from_model,
                    dimension: dimension as u32,
                },
                WriteOp::SetVector {
                    tag,
                    id,
                    version,
                    vector,
                } => WalOp::SetVector {
                    tag,
                    id,
                    version,
                    vector,
                },
                WriteOp::SetDrop(tag) => WalOp::SetDrop { tag },
                WriteOp::SetCommit(tag) => WalOp::SetCommit { tag },
            };
            // The one rule for a client's write and a replicated one.
            validate_op(&op)?;
            logged.push(op);
        }
        validate_batch_shape(&logged)?;
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(ShardError::Poisoned(self.inner.dir.clone()));
        }
        let mut w = self.inner.writer.lock();
        // Checked under the writer lock, so two concurrent retries apply once.
        if let Some(ack) = w
            .requests
            .get(request_id)
            .filter(|_| !request_id.is_empty())
        {
            return Ok((
                WriteAck {
                    duplicate: true,
                    ..ack
                },
                None,
            ));
        }
        if !expect.is_empty() {
            // The writer lock orders batches; the state read here is what every batch
            // before this one made visible.
            let st = self.inner.state.read();
            for e in expect {
                let now = match st.rows.get(&e.id) {
                    Some(row) => vector_set::written_by(&st.docs, &st.rows, row)?,
                    None => 0,
                };
                if now != e.version {
                    return Err(ShardError::Conflict(format!(
                        "document {:?} is at version {now}, not {} as the write expects \
                         (0: absent); read it again",
                        e.id, e.version
                    )));
                }
            }
        }
        let batch = WalBatch {
            seq: w.last_seq + 1,
            epoch: if epoch == 0 { w.last_epoch() } else { epoch },
            request_id: request_id.to_string(),
            ops: logged,
        };
        let ack = self.log_and_apply(&mut w, &batch)?;
        drop(w);
        self.maybe_auto_rebuild();
        self.maybe_compact();
        Ok((ack, Some(Arc::new(batch))))
    }

    /// Logs and applies batches a primary ordered, as a backup: each must follow this
    /// replica's last one exactly. Returns the last sequence number applied.
    pub fn append_replicated<B: Borrow<WalBatch>>(&self, batches: &[B]) -> Result<u64> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(ShardError::Poisoned(self.inner.dir.clone()));
        }
        // Every batch checked as a primary's write is, before any is logged: a peer's
        // bytes are input like a client's, and a batch is applied whole or not at all.
        for batch in batches.iter().map(Borrow::borrow) {
            validate_request_id(&batch.request_id)?;
            validate_batch_shape(&batch.ops)?;
            for op in &batch.ops {
                validate_op(op)?;
                // A primary's own writes carry `Metadata`, checked where they entered;
                // a peer's are checked here (`null`: none, from builds before it).
                if let WalOp::Upsert { id, metadata, .. } = op {
                    if metadata != "null" {
                        Metadata::check(metadata).map_err(|r| ShardError::invalid_doc(id, r))?;
                    }
                }
            }
        }
        let mut w = self.inner.writer.lock();
        for batch in batches.iter().map(Borrow::borrow) {
            if batch.seq != w.last_seq + 1 {
                return Err(ShardError::InvalidConfig(format!(
                    "replicated batch {} does not follow {}",
                    batch.seq, w.last_seq
                )));
            }
            self.log_and_apply(&mut w, batch)?;
        }
        let last = w.last_seq;
        drop(w);
        self.maybe_auto_rebuild();
        self.maybe_compact();
        Ok(last)
    }

    /// The one write path: log the batch (one fsync), write it into the segments,
    /// make it visible to readers at once, checkpoint when the log is big. A failure
    /// poisons the shard: the log may hold a half-written frame or the segments a
    /// half-applied batch, so writes are refused until a reopen replays the log.
    fn log_and_apply(&self, w: &mut Writer, batch: &WalBatch) -> Result<WriteAck> {
        // Refused before anything is written (and without poisoning): the row table's
        // bounds (`rows::MAX_ROWS`, 48-bit record offsets).
        let upserts = batch
            .ops
            .iter()
            .filter(|op| matches!(op, WalOp::Upsert { .. }))
            .count() as u64;
        let rows = w.vectors.view().rows();
        if rows + upserts > MAX_ROWS {
            return Err(ShardError::Full(format!(
                "the shard holds {rows} rows and the batch adds {upserts}: a shard holds at most {MAX_ROWS}"
            )));
        }
        if w.docs.len() > MAX_DOC_OFFSET - (1 << 40) {
            return Err(ShardError::Full(format!(
                "the shard's document file is {} bytes, within 1 TiB of its {MAX_DOC_OFFSET}-byte limit",
                w.docs.len()
            )));
        }
        // The re-embed's rules (vector dimensions, paired upserts, one set at a time).
        vector_set::check(w, w.manifest.config.dimension, batch)?;
        let result: Result<WriteAck> = (|| {
            w.wal
                .as_mut()
                .expect("open shard has a log")
                .append(batch)?;
            let dir = &self.inner.dir;
            let mut staged = Staged::default();
            // The writer lock is held: no other batch changes the rows meanwhile.
            {
                let st = self.inner.state.read();
                let away = retained_away(batch, &st.rows);
                let targets = vector_set::targets(w, &st, batch)?;
                let live = st.rows.live_len();
                drop(st);
                stage(dir, w, batch, away, &targets, live, &mut staged)?;
            }
            let (upserted, deleted) = publish(&mut self.inner.state.write(), w, staged);
            let ack = w.finish(batch, upserted, deleted);
            if let Some(gone) = finish_set_op(dir, w, &mut self.inner.state.write(), batch)? {
                self.remove_files(gone)?;
            } else if w
                .wal
                .as_ref()
                .is_some_and(|l| l.bytes() > WAL_CHECKPOINT_BYTES)
            {
                checkpoint(dir, w)?;
            }
            Ok(ack)
        })();
        if let Err(e) = &result {
            tracing::error!(dir = %self.inner.dir.display(), seq = batch.seq, "write failed");
            self.poison(e);
        }
        result
    }

    /// Refuses every later write until a reopen replays the log: `e` left the files
    /// or the log in a state only recovery may read.
    fn poison(&self, e: &ShardError) {
        tracing::error!(dir = %self.inner.dir.display(), error = %e, "shard poisoned");
        *self.inner.failure.lock() = Some(e.to_string());
        self.inner.poisoned.store(true, Ordering::Release);
    }

    /// Stops this handle from writing or checkpointing (its directory is about to be
    /// replaced by a snapshot); reads keep working until the last clone goes.
    pub fn retire(&self) {
        // Under the writer: whatever checked the handle writable under it (a
        // generation's or a compaction's swap) has finished, and nothing checks it so
        // afterwards.
        let _w = self.inner.writer.lock();
        self.inner.poisoned.store(true, Ordering::Release);
    }

    /// Why a write failed and poisoned this handle; `None` while it is healthy (or
    /// merely retired). A poisoned replica is reopened from disk, which replays its log.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.lock().clone()
    }

    fn check_writable(&self) -> Result<()> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(ShardError::Poisoned(self.inner.dir.clone()));
        }
        Ok(())
    }

    /// The batches the log replayed when this handle opened, oldest first; taken once
    /// (replication keeps them so a backup that is behind gets them, not a snapshot).
    pub fn take_replayed(&self) -> Vec<Arc<WalBatch>> {
        std::mem::take(&mut *self.inner.replayed.lock())
    }

    /// (last sequence number applied, the epoch it was written in).
    pub fn last(&self) -> (u64, u64) {
        let w = self.inner.writer.lock();
        (w.last_seq, w.last_epoch())
    }

    /// The epoch history: (epoch, first sequence number written in it).
    pub fn epochs(&self) -> Vec<(u64, u64)> {
        self.inner.writer.lock().manifest.epochs.clone()
    }

    /// Checkpoints, then describes a consistent copy of the shard (see
    /// [`SnapshotSource`]).
    pub fn snapshot(&self) -> Result<SnapshotSource> {
        let mut w = self.inner.writer.lock();
        self.check_writable()?;
        checkpoint(&self.inner.dir, &mut w)?;
        let mut m = w.manifest.clone();
        // A copy takes the serving generation only: a rebuild's staged and kept ones
        // are this replica's (issue 21).
        m.staged = None;
        m.previous = None;
        let files = snapshot_files(&m)
            .into_iter()
            .map(|(name, len)| {
                let path = self.inner.dir.join(&name);
                let f = fs::File::open(&path).map_err(ShardError::io(&path))?;
                Ok((name, len, Arc::new(f)))
            })
            .collect::<Result<Vec<_>>>()?;
        let manifest =
            serde_json::to_vec(&m).map_err(|e| ShardError::InvalidConfig(e.to_string()))?;
        // Under the writer's lock: the rows are the ones at `applied_seq`.
        let live_docs = self.inner.state.read().rows.live_len() as u64;
        Ok(SnapshotSource {
            files,
            manifest,
            last_seq: m.applied_seq,
            live_docs,
        })
    }

    /// Copies this shard as it stands into `dest`, a directory that must not exist yet
    /// (issue 19: an online split forks each shard on every node that holds it, at one
    /// log position, instead of moving it over the network). The copy is a snapshot
    /// (checkpointed segments up to their lengths, the serving generation) written
    /// into `dest.partial`, synced, then renamed: `dest` either holds a whole shard or
    /// does not exist. Returns the copy's position (last sequence number, its epoch).
    /// Its request ids, epochs and generation are the source's: the two histories are
    /// one up to that position.
    pub fn clone_into(&self, dest: &Path) -> Result<(u64, u64)> {
        if dest.exists() {
            return Err(ShardError::InvalidConfig(format!(
                "cannot clone a shard into {}: it exists",
                dest.display()
            )));
        }
        let name = dest.file_name().ok_or_else(|| {
            ShardError::InvalidConfig(format!("bad clone target {}", dest.display()))
        })?;
        let parent = dest.parent().unwrap_or(Path::new("."));
        let partial = parent.join(format!("{}.partial", name.to_string_lossy()));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(ShardError::io(&partial))?;
        }
        fs::create_dir_all(&partial).map_err(ShardError::io(&partial))?;
        let src = self.snapshot()?;
        for (file, len, handle) in &src.files {
            let path = partial.join(file);
            let mut out = fs::File::create(&path).map_err(ShardError::io(&path))?;
            // `copy_file_range` underneath (a reflink where the file system has them).
            let copied = std::io::copy(&mut std::io::Read::take(&**handle, *len), &mut out)
                .map_err(ShardError::io(&path))?;
            if copied != *len {
                return Err(ShardError::Corrupt {
                    file: self.inner.dir.join(file),
                    offset: copied,
                    reason: format!("{copied} bytes where the snapshot names {len}"),
                });
            }
            out.sync_all().map_err(ShardError::io(&path))?;
        }
        Self::install_manifest(&partial, &src.manifest)?;
        sync_dir(&partial)?;
        fs::rename(&partial, dest).map_err(ShardError::io(dest))?;
        sync_dir(parent)?;
        Self::manifest_position(&src.manifest)
    }

    /// The position a closed shard's manifest records (last sequence number, its
    /// epoch): a clone's ([`Shard::clone_into`] leaves no log past it).
    pub fn stored_position(dir: &Path) -> Result<(u64, u64)> {
        let path = Manifest::path(dir);
        let bytes = fs::read(&path).map_err(ShardError::io(&path))?;
        Self::manifest_position(&bytes)
    }

    /// Live documents this routing sends elsewhere: what a [`WriteOp::Retain`] of it
    /// would delete (0 once one has, or when nothing ever split).
    pub fn foreign_live(&self, routing: Routing) -> usize {
        let st = self.inner.state.read();
        (0..st.rows.len())
            .filter(|&r| st.rows.is_live(r) && !routing.holds(st.rows.id(r)))
            .count()
    }

    /// The files a snapshot with this manifest carries, with their lengths: what a
    /// receiver must hold before it installs it (a transfer cut short is not a
    /// snapshot). Both are append-only, so a longer snapshot of the same shard starts
    /// with the bytes of a shorter one (a transfer resumes from what arrived).
    pub fn snapshot_files_of(manifest: &[u8]) -> Result<Vec<(String, u64)>> {
        let m: Manifest = serde_json::from_slice(manifest)
            .map_err(|e| ShardError::InvalidConfig(format!("snapshot manifest: {e}")))?;
        Ok(snapshot_files(&m))
    }

    /// A snapshot manifest's position: (last sequence number, epoch of that batch).
    pub fn manifest_position(manifest: &[u8]) -> Result<(u64, u64)> {
        let m: Manifest = serde_json::from_slice(manifest)
            .map_err(|e| ShardError::InvalidConfig(format!("snapshot manifest: {e}")))?;
        Ok((m.applied_seq, epoch_at(&m.epochs, m.applied_seq)))
    }

    /// Writes a snapshot's manifest into `dir` (which holds its copied files).
    pub fn install_manifest(dir: &Path, manifest: &[u8]) -> Result<()> {
        let m: Manifest = serde_json::from_slice(manifest)
            .map_err(|e| ShardError::InvalidConfig(format!("snapshot manifest: {e}")))?;
        m.store(dir)
    }

    /// Reads one live document back from the segment.
    /// The text and metadata (JSON) of each id's live document, in order (`None`: not
    /// live here): a search's hits read where they were found (issue 22), one record
    /// each, no vector.
    pub fn payloads(&self, ids: &[&str]) -> Result<Vec<Option<Payload>>> {
        let routing = self.routing();
        let (offsets, docs) = {
            let st = self.inner.state.read();
            let offsets: Vec<Option<u64>> = ids
                .iter()
                .map(|id| {
                    st.rows
                        .get(id)
                        .filter(|_| routing.is_none_or(|r| r.holds(id)))
                        .map(|row| st.rows.doc_offset(row))
                })
                .collect();
            (offsets, st.docs.clone())
        };
        offsets
            .into_iter()
            .map(|o| match o {
                None => Ok(None),
                Some(offset) => match docs.read_at(offset)? {
                    SegmentEntry::Put { text, metadata, .. } => {
                        Ok(Some(Payload { text, metadata }))
                    }
                    SegmentEntry::Delete { .. } => Err(ShardError::Corrupt {
                        file: docs.path().to_owned(),
                        offset,
                        reason: "a live row points at a delete record".into(),
                    }),
                },
            })
            .collect()
    }

    /// The vectors of `ids` (None: not here) from the stored vectors or a re-embed's
    /// complete set `set` (issue 22: a search's pseudo-relevance feedback reads its top
    /// documents' vectors of the query's model).
    pub fn vectors_of(&self, ids: &[&str], set: Option<u64>) -> Result<Vec<Option<Vec<f32>>>> {
        let routing = self.routing();
        let st = self.inner.state.read();
        let view = match set {
            None => st.vectors.clone(),
            Some(tag) => match &st.set {
                Some(s) if s.tag == tag && s.missing == 0 => s.vectors.clone(),
                _ => {
                    return Err(ShardError::VectorSet(format!(
                        "no complete vector set of operation {tag} here"
                    )))
                }
            },
        };
        Ok(ids
            .iter()
            .map(|id| {
                st.rows
                    .get(id)
                    .filter(|_| routing.is_none_or(|r| r.holds(id)))
                    .map(|row| view.get(row).to_vec())
            })
            .collect())
    }

    /// Live rows (this replica's to answer for) whose metadata passes `filter` (all
    /// live rows without one): a collection's `Count` (issue 22).
    pub fn count(&self, filter: Option<&Filter>) -> Result<u64> {
        let routing = self.routing();
        let st = self.inner.state.read();
        let ours = |r: u64| st.rows.is_live(r) && routing.is_none_or(|x| x.holds(st.rows.id(r)));
        Ok(match filter {
            None if routing.is_none() => st.rows.live_len() as u64,
            None => (0..st.rows.len()).filter(|&r| ours(r)).count() as u64,
            Some(f) => {
                let admitted = st.payload.eval(f).map_err(ShardError::InvalidQuery)?;
                admitted.iter().filter(|&r| ours(u64::from(r))).count() as u64
            }
        })
    }

    /// A page of a scroll through the live rows (issue 22: export and re-processing):
    /// the ids of at most `limit` rows passing `filter`, in row order from `from_row`,
    /// and the row to go on from (None: no more). Row numbers hold within a layout:
    /// `layout` is the one the scroll began in (None: the current one); after a
    /// compaction since then it is refused ([`ShardError::ScrollStale`]: begin again).
    pub fn scroll(
        &self,
        layout: Option<u64>,
        from_row: u64,
        limit: usize,
        filter: Option<&Filter>,
    ) -> Result<ScrollPage> {
        let routing = self.routing();
        let st = self.inner.state.read();
        if layout.is_some_and(|l| l != st.layout) {
            return Err(ShardError::ScrollStale(format!(
                "the shard was compacted since the scroll began (layout {} now, {} then): begin it again",
                st.layout,
                layout.unwrap_or_default()
            )));
        }
        let admitted = filter
            .map(|f| st.payload.eval(f))
            .transpose()
            .map_err(ShardError::InvalidQuery)?;
        let total = st.rows.len();
        let mut ids = Vec::new();
        let mut row = from_row;
        while row < total && ids.len() < limit {
            if st.rows.is_live(row)
                && routing.is_none_or(|x| x.holds(st.rows.id(row)))
                && admitted
                    .as_ref()
                    .is_none_or(|a| u32::try_from(row).is_ok_and(|r| a.contains(r)))
            {
                ids.push(Arc::from(st.rows.id(row)));
            }
            row += 1;
        }
        Ok(ScrollPage {
            ids,
            layout: st.layout,
            next_row: (row < total).then_some(row),
        })
    }

    /// This replica's part of the collection's BM25 statistics for `terms` (issue 22):
    /// its live rows with text, their total length, and each term's document count.
    pub fn lexical_stats(&self, terms: &[String]) -> LexicalStats {
        let routing = self.routing();
        let st = self.inner.state.read();
        st.lexical.stats(terms, |r| {
            st.rows.is_live(r) && routing.is_none_or(|x| x.holds(st.rows.id(r)))
        })
    }

    /// The top `k` live rows by BM25 for `terms` (issue 22), each weighted by the
    /// collection's `idf` and lengths normalised by its mean `avg_len` (the sums of
    /// every shard's [`Shard::lexical_stats`]), among the rows `filter` admits.
    pub fn lexical_search(
        &self,
        terms: &[String],
        idf: &[f32],
        avg_len: f32,
        bm25: Bm25,
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<SearchResult> {
        if k == 0 || k > MAX_TOP_K {
            return Err(ShardError::InvalidQuery(format!(
                "top_k {k} must be between 1 and {MAX_TOP_K}"
            )));
        }
        if idf.len() != terms.len() || idf.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(ShardError::InvalidQuery(format!(
                "{} terms need as many finite, non-negative idf weights (got {})",
                terms.len(),
                idf.len()
            )));
        }
        let ok = |x: f32, lo: f32, hi: f32| x.is_finite() && (lo..=hi).contains(&x);
        if !ok(avg_len, 0.0, 1e9) || !ok(bm25.k1, 0.0, 100.0) || !ok(bm25.b, 0.0, 1.0) {
            return Err(ShardError::InvalidQuery(format!(
                "BM25 needs a finite mean length and 0 <= k1 <= 100, 0 <= b <= 1 (got {avg_len}, {}, {})",
                bm25.k1, bm25.b
            )));
        }
        let routing = self.routing();
        let st = self.inner.state.read();
        let admitted = filter
            .map(|f| st.payload.eval(f))
            .transpose()
            .map_err(ShardError::InvalidQuery)?;
        let top = st.lexical.search(terms, idf, avg_len, bm25, k, |r| {
            st.rows.is_live(r)
                && routing.is_none_or(|x| x.holds(st.rows.id(r)))
                && admitted
                    .as_ref()
                    .is_none_or(|a| u32::try_from(r).is_ok_and(|r| a.contains(r)))
        });
        Ok(SearchResult {
            hits: top
                .into_iter()
                .map(|(row, score)| Hit {
                    id: Arc::from(st.rows.id(row)),
                    score,
                })
                .collect(),
            generation: None,
            fresh_rows: 0,
            plan: filter.map(|_| FilterPlan::Exact),
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<StoredDocument>> {
        if self.routing().is_some_and(|r| !r.holds(id)) {
            return Ok(None);
        }
        let (offset, row, view, docs, layout, crcs) = {
            let st = self.inner.state.read();
            let Some(row) = st.rows.get(id) else {
                return Ok(None);
            };
            let docs = st.docs.clone();
            (
                st.rows.doc_offset(row),
                row,
                st.vectors.clone(),
                docs,
                st.layout,
                st.crcs.clone(),
            )
        };
        match docs.read_at(offset)? {
            SegmentEntry::Put {
                id,
                text,
                metadata,
                seq,
                vector_crc,
                ..
            } => {
                let vector = view.get(row);
                if storage::vector_crc(vector) != expected_crc(crcs.as_deref(), row, vector_crc) {
                    return Err(bad_vector(
                        &self.inner.dir.join(segment_files(layout).1),
                        row,
                        vector.len(),
                        &id,
                    ));
                }
                Ok(Some(StoredDocument {
                    id,
                    text,
                    metadata: Metadata::stored(metadata),
                    vector: vector.to_vec(),
                    seq,
                }))
            }
            SegmentEntry::Delete { .. } => Err(ShardError::Corrupt {
                file: docs.path().to_owned(),
                offset,
                reason: "row points at a delete record".into(),
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.state.read().rows.live_len()
    }

    /// Takes this replica out of service for damaged data the scrubber found: writes
    /// fail from now on, [`Shard::failure`] says why (its node reports it, and the
    /// coordinators take the replica out of its shard's quorum), and a marker in the
    /// directory makes every later open check every vector first, so neither a reopen
    /// nor a restart serves the damage again. Nothing is deleted.
    pub fn mark_corrupt(&self, why: &ShardError) -> Result<()> {
        let reason = format!("corrupt data: {why}");
        tracing::error!(dir = %self.inner.dir.display(), %reason, "replica taken out of service");
        write_atomic(&self.inner.dir.join(CORRUPT_MARKER), reason.as_bytes())?;
        *self.inner.failure.lock() = Some(reason);
        self.inner.poisoned.store(true, Ordering::Release);
        Ok(())
    }

    /// Checks the stored vectors of rows `from..` (at most `max_rows` of them, dead rows
    /// too) against the checksums their records hold: the scrubber's step (issue 18:
    /// open does not read every vector). Returns the next row to check (`from` when
    /// there is none: the caller starts over at 0) and the bytes of vectors read; a
    /// vector that fails is a [`ShardError::Corrupt`] naming the vectors file, the
    /// row's offset in it, the row and its id.
    pub fn scrub(&self, from: u64, max_rows: u64) -> Result<(u64, u64)> {
        let (offsets, files) = {
            let st = self.inner.state.read();
            let end = (from.saturating_add(max_rows)).min(st.rows.len());
            let offsets: Vec<u64> = (from.min(end)..end)
                .map(|r| st.rows.doc_offset(r))
                .collect();
            (offsets, SegmentsRead::of(&st, &self.inner.dir))
        };
        if offsets.is_empty() {
            return Ok((from, 0));
        }
        let bytes = files.check_vectors(from, &offsets)?;
        Ok((from + offsets.len() as u64, bytes))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the vector file, dead ones included: what an exact search scans.
    pub fn rows(&self) -> usize {
        self.inner.state.read().rows.len() as usize
    }

    /// Searches the shard; see [`SearchMode`].
    pub fn search(&self, query: &[f32], p: SearchParams) -> Result<SearchResult> {
        let cfg = &self.inner.config;
        // The vector's length is checked against what it searches (`search_in`).
        validate_vector(query.len(), query).map_err(ShardError::InvalidQuery)?;
        if p.k == 0 || p.k > MAX_TOP_K {
            return Err(ShardError::InvalidQuery(format!(
                "top_k {} must be between 1 and {MAX_TOP_K}",
                p.k
            )));
        }
        let refine = p.refine_factor.unwrap_or(cfg.refine_factor);
        if refine == 0 || refine > MAX_REFINE_FACTOR {
            return Err(ShardError::InvalidQuery(format!(
                "refine_factor {refine} must be between 1 and {MAX_REFINE_FACTOR}"
            )));
        }
        if p.k * refine > MAX_CANDIDATES {
            return Err(ShardError::InvalidQuery(format!(
                "k × refine_factor = {} exceeds {MAX_CANDIDATES} candidates",
                p.k * refine
            )));
        }
        if p.mode != SearchMode::Exact && p.set.is_none() && p.filter.is_none() {
            self.remember_query(query);
        }
        loop {
            let (serving, layout) = {
                let st = self.inner.state.read();
                // A set is searched through the generation staged over it, if any.
                let g = match p.set {
                    None => st.serving.clone(),
                    Some(tag) => st.staged.clone().filter(|g| g.info.tag == tag),
                };
                (g, st.layout)
            };
            if let Some(r) = self.search_in(query, &p, serving, layout)? {
                return Ok(r);
            }
            // A compaction renumbered the rows between the index search and the
            // re-scoring: asked again in the new numbering.
        }
    }

    /// One search over the rows as numbered in `layout`; `None` if a compaction
    /// changed that before the candidates were read.
    fn search_in(
        &self,
        query: &[f32],
        p: &SearchParams,
        serving: Option<Arc<Generation>>,
        layout: u64,
    ) -> Result<Option<SearchResult>> {
        let cfg = &self.inner.config;
        let refine = p.refine_factor.unwrap_or(cfg.refine_factor);
        let nlist = serving
            .as_ref()
            .map_or(cfg.index.nlist, |g| g.info.params.nlist);
        if p.nprobe == Some(0) {
            return Err(ShardError::InvalidQuery(
                "nprobe 0: probe at least 1 list".into(),
            ));
        }
        // More lists than the generation has probes them all, as FAISS does (a
        // collection that leaves nlist to shoal has shards sized apart until a cluster
        // build; the gateway refuses nprobe over an nlist the collection names).
        let nprobe = p.nprobe.unwrap_or(cfg.nprobe).min(nlist);
        let metric = cfg.metric;
        let mut top = TopK::new(p.k, metric);
        let routing = self.routing();
        // Live, and this replica's to answer for (`set_routing`).
        let ours = |st: &State, row: u64| {
            st.rows.is_live(row) && routing.is_none_or(|r| r.holds(st.rows.id(row)))
        };
        // The vectors searched: the stored ones, or a re-embed's complete set.
        let vectors = |st: &State| -> Result<VectorView> {
            let (v, dim) = match p.set {
                None => (st.vectors.clone(), st.dim),
                Some(tag) => match &st.set {
                    Some(s) if s.tag == tag && s.missing == 0 => (s.vectors.clone(), s.dim),
                    Some(s) if s.tag == tag => {
                        return Err(ShardError::VectorSet(format!(
                            "{} live documents still lack the new model's vector",
                            s.missing
                        )))
                    }
                    _ => {
                        return Err(ShardError::VectorSet(format!(
                            "no vector set of operation {tag} here"
                        )))
                    }
                },
            };
            if query.len() != dim {
                return Err(ShardError::InvalidQuery(format!(
                    "vector has dimension {}, the collection's is {dim}",
                    query.len()
                )));
            }
            Ok(v)
        };
        // The rows the filter admits, in this layout's numbering, and the plan.
        let (admitted, plan, widen) = {
            let st = self.inner.state.read();
            if st.layout != layout {
                return Ok(None);
            }
            vectors(&st)?;
            match &p.filter {
                None => (None, None, 1.0),
                Some(f) => {
                    let admitted = st.payload.eval(f).map_err(ShardError::InvalidQuery)?;
                    let renumbered = serving.as_ref().is_some_and(|g| !g.remaps.is_empty());
                    let (plan, widen) = match (&serving, p.mode) {
                        (Some(_), SearchMode::Rerank | SearchMode::Approximate) => {
                            let chosen = plan_filter(
                                admitted.len(),
                                st.rows.len(),
                                renumbered,
                                cfg.exact_filter_rows,
                            );
                            match p.plan {
                                None => chosen,
                                Some(FilterPlan::IvfFiltered) if renumbered => chosen,
                                Some(FilterPlan::Exact) => (FilterPlan::Exact, 1.0),
                                Some(forced) => {
                                    (forced, st.rows.len() as f64 / admitted.len().max(1) as f64)
                                }
                            }
                        }
                        _ => (FilterPlan::Exact, 1.0),
                    };
                    (Some(admitted), Some(plan), widen)
                }
            }
        };
        let passes = |row: u64| {
            admitted
                .as_ref()
                .is_none_or(|a| u32::try_from(row).is_ok_and(|r| a.contains(r)))
        };

        let (generation, covered) = match (&serving, p.mode, plan) {
            (_, _, Some(FilterPlan::Exact)) => (serving.as_ref().map(|g| g.info.id), 0),
            (Some(g), SearchMode::Rerank | SearchMode::Approximate, _) => {
                let want = if p.mode == SearchMode::Rerank {
                    p.k * refine
                } else {
                    p.k
                };
                // A filter widens the candidates by 1 / the admitted fraction (about
                // as many admitted candidates come back as an unfiltered search
                // finds) and the lists probed by its square root: the admitted top k
                // lie about as deep as the unfiltered top k / fraction, in lists
                // nearer the query than that count suggests. Probing 1 / fraction
                // times the lists made the restricted index 4.4x slower at 1%
                // admitted on a million rows for 0.016 of recall (docs/benchmarks.md).
                // Never more than the rows there are (or, restricted, are admitted).
                let most = match (plan, &admitted) {
                    (Some(FilterPlan::IvfFiltered), Some(a)) => a.len(),
                    _ => g.info.covered_rows,
                };
                let want = ((want as f64 * widen).ceil() as usize)
                    .min(most.max(1) as usize)
                    .max(want);
                let nprobe =
                    ((nprobe as f64 * widen.sqrt()).ceil() as usize).clamp(nprobe, nlist.max(1));
                let selected = match (plan, &admitted) {
                    (Some(FilterPlan::IvfFiltered), Some(a)) => {
                        Some(payload_index::dense_bitmap(a, g.info.covered_rows))
                    }
                    _ => None,
                };
                let candidates =
                    g.index
                        .search_selected(query, want, nprobe, selected.as_deref())?;
                let mut decoded = vec![0f32; if g.rerank.is_some() { query.len() } else { 0 }];
                let st = self.inner.state.read();
                if st.layout != layout {
                    return Ok(None);
                }
                let vecs = vectors(&st)?;
                for (label, approx) in candidates {
                    let Some(row) = g.row(label).filter(|&r| ours(&st, r) && passes(r)) else {
                        continue;
                    };
                    let score = match (p.mode, &g.rerank) {
                        // From the generation's reduced-precision copy (by label), else
                        // the full vectors (by row); a label past the copy is never
                        // returned by its own index, and falls back all the same.
                        (SearchMode::Rerank, Some(copy)) => copy
                            .score(metric, query, label, &mut decoded)
                            .unwrap_or_else(|| metric.score(query, vecs.get(row))),
                        (SearchMode::Rerank, None) => metric.score(query, vecs.get(row)),
                        _ => approx,
                    };
                    top.push(row, score);
                }
                (Some(g.info.id), g.info.covered_rows)
            }
            _ => (None, 0),
        };
        let st = self.inner.state.read();
        if st.layout != layout {
            return Ok(None);
        }
        let vecs = vectors(&st)?;
        let total = st.rows.len();
        match &admitted {
            // The admitted rows past what the index answered for.
            Some(a) => {
                for r in a.range(u32::try_from(covered).unwrap_or(u32::MAX)..) {
                    let row = u64::from(r);
                    if row < total && ours(&st, row) {
                        top.push(row, metric.score(query, vecs.get(row)));
                    }
                }
            }
            None => {
                for row in covered..total {
                    if ours(&st, row) {
                        top.push(row, metric.score(query, vecs.get(row)));
                    }
                }
            }
        }
        let hits = top
            .into_sorted()
            .into_iter()
            .map(|(row, score)| Hit {
                id: Arc::from(st.rows.id(row)),
                score,
            })
            .collect();
        Ok(Some(SearchResult {
            hits,
            generation,
            fresh_rows: total - covered,
            plan,
        }))
    }

    pub fn stats(&self) -> ShardStats {
        // Lock order: building, then writer, then state (a build holds `building`
        // while taking the writer; a write holds the writer while taking the state).
        // `building` is read first and let go: holding the state while taking it
        // closed a cycle that could hang a replica and the heartbeat calling this.
        let building = match *self.inner.building.lock() {
            Some(Work::Build(g)) => Some(g),
            _ => None,
        };
        let last_seq = self.inner.writer.lock().last_seq;
        let st = self.inner.state.read();
        let serving = st.serving.as_ref().map(|g| g.info.clone());
        let rows = st.rows.len();
        ShardStats {
            live_docs: st.rows.live_len(),
            rows,
            last_seq,
            fresh_rows: rows - serving.as_ref().map_or(0, |g| g.covered_rows),
            serving,
            building,
            staged: st.staged.as_ref().map(|g| g.info.clone()),
            previous: st.previous.as_ref().map(|g| g.info.clone()),
            vector_set: st.set.as_ref().map(vector_set::SetView::info),
        }
    }

    /// Builds a new index generation from the stored vectors and swaps it in, blocking
    /// the calling thread (use [`Shard::spawn_rebuild`] to run it in the background).
    /// Reads and writes continue meanwhile; writes during the build are either added
    /// to the new index before the swap or searched exactly as its fresh tail.
    pub fn rebuild(&self, params: Option<IvfPqParams>) -> Result<GenerationInfo> {
        let (chosen, sample) = self.build_params();
        self.build(params.unwrap_or(chosen), sample, None)
    }

    /// Builds a generation with `params` and swaps it in (`tag` None) or stages it
    /// beside the serving one for the cluster operation `tag` (issue 21).
    fn build(
        &self,
        params: IvfPqParams,
        sample: usize,
        tag: Option<u64>,
    ) -> Result<GenerationInfo> {
        let gen_id = {
            let mut b = self.inner.building.lock();
            if let Some(work) = *b {
                return Err(work.busy());
            }
            let mut w = self.inner.writer.lock();
            let id = w.manifest.next_generation;
            w.manifest.next_generation += 1;
            *b = Some(Work::Build(id));
            id
        };
        let result = self.build_generation(gen_id, params, sample, tag);
        *self.inner.building.lock() = None;
        // A compaction logged during the build waited for it.
        self.maybe_compact();
        if let Err(e) = &result {
            tracing::warn!(generation = gen_id, error = %e, "index build failed");
        }
        result
    }

    /// Starts [`Shard::rebuild`] on its own thread.
    pub fn spawn_rebuild(
        &self,
        params: Option<IvfPqParams>,
    ) -> std::thread::JoinHandle<Result<GenerationInfo>> {
        let shard = self.clone();
        std::thread::Builder::new()
            .name("shoal-index-build".into())
            .spawn(move || shard.rebuild(params))
            .expect("spawn build thread")
    }

    /// Sets the parameters and training sample every build that names none uses (the
    /// collection's, chosen by the cluster); `None` goes back to the manifest's.
    pub fn set_build_params(&self, p: Option<(IvfPqParams, usize)>) {
        *self.inner.build_params.lock() = p;
    }

    /// The parameters and training sample a build that names none uses.
    pub fn build_params(&self) -> (IvfPqParams, usize) {
        self.inner
            .build_params
            .lock()
            .unwrap_or((self.inner.config.index, self.inner.config.train_sample))
    }

    /// The metadata fields the payload index keeps (issue 22).
    pub fn payload_fields(&self) -> Vec<PayloadField> {
        self.inner.state.read().payload.fields().to_vec()
    }

    /// Sets the metadata fields the payload index keeps (issue 22: the collection's
    /// policy, from the map). When they differ from the shard's, every live row's
    /// metadata is read again while writes wait (a million rows of small metadata in
    /// about a second), and the manifest records the list, so `open` indexes the same
    /// fields. Returns whether anything changed.
    pub fn set_payload_fields(&self, fields: &[PayloadField]) -> Result<bool> {
        let mut w = self.inner.writer.lock();
        if w.manifest.config.payload_fields == fields {
            return Ok(false);
        }
        self.check_writable()?;
        let (docs, slots) = {
            let st = self.inner.state.read();
            let slots: Vec<Option<u64>> = (0..st.rows.len())
                .map(|r| st.rows.is_live(r).then(|| st.rows.doc_offset(r)))
                .collect();
            (st.docs.clone(), slots)
        };
        let mut index = PayloadIndex::new(fields);
        for (row, slot) in slots.into_iter().enumerate() {
            let values = match slot {
                None => RowValues::default(),
                Some(offset) => match docs.read_at(offset)? {
                    SegmentEntry::Put { metadata, .. } => PayloadIndex::extract(fields, &metadata),
                    SegmentEntry::Delete { .. } => {
                        return Err(ShardError::Corrupt {
                            file: docs.path().to_owned(),
                            offset,
                            reason: "a live row points at a delete record".into(),
                        })
                    }
                },
            };
            index.push(row as u64, values);
        }
        w.manifest.config.payload_fields = fields.to_vec();
        checkpoint(&self.inner.dir, &mut w)?;
        self.inner.state.write().payload = index;
        Ok(true)
    }

    /// Sets the re-ranking precision of the generations built from now on (issue 19:
    /// chosen for the collection at its creation or by a rebuild). Not persisted: the
    /// cluster map holds the choice; the one the shard was created with is the default.
    pub fn set_rerank(&self, p: Precision) {
        *self.inner.rerank.lock() = p;
    }

    /// The precision the next build gives its generation.
    pub fn rerank(&self) -> Precision {
        *self.inner.rerank.lock()
    }

    /// Sets how many fresh rows (written since the serving generation) start a rebuild;
    /// 0 turns automatic rebuilds off. Not persisted: the cluster map holds the policy
    /// and the node applies it to every replica it opens.
    /// Reads answer only for ids this routing sends here (`None`: every id). A split's
    /// halves set it at the cut-over, so neither serves the other's documents while
    /// they are still rows of both.
    pub fn set_routing(&self, routing: Option<Routing>) {
        *self.inner.routing.lock() = routing;
    }

    pub fn routing(&self) -> Option<Routing> {
        *self.inner.routing.lock()
    }

    pub fn set_auto_rebuild_tail(&self, rows: usize) {
        self.inner.auto_rebuild_tail.store(rows, Ordering::Relaxed);
    }

    pub fn auto_rebuild_tail(&self) -> usize {
        self.inner.auto_rebuild_tail.load(Ordering::Relaxed)
    }

    fn maybe_auto_rebuild(&self) {
        let tail = self.auto_rebuild_tail();
        if tail == 0 || self.inner.building.lock().is_some() {
            return;
        }

        let (fresh, live) = {
            let st = self.inner.state.read();
            // A rebuild in progress (a staged or kept generation) holds them: its
            // operation decides what serves (issue 21).
            if st.staged.is_some() || st.previous.is_some() {
                return;
            }
            let covered = st.serving.as_ref().map_or(0, |g| g.info.covered_rows);
            (st.rows.len() - covered, st.rows.live_len())
        };
        if fresh as usize >= tail && live >= self.build_params().0.nlist {
            tracing::info!(
                fresh_rows = fresh,
                "fresh tail over threshold, rebuilding index"
            );
            drop(self.spawn_rebuild(None));
        }
    }

    fn build_generation(
        &self,
        gen_id: u64,
        params: IvfPqParams,
        train_sample: usize,
        tag: Option<u64>,
    ) -> Result<GenerationInfo> {
        let started = Instant::now();
        let cfg = &self.inner.config;
        set_thread_omp_threads(cfg.build_threads);
        // A re-embed's generation (its tag names the shard's vector set) indexes the
        // set's vectors: every live row has one (refused otherwise), and every row
        // written since has one too (`vector_set::check`).
        let vectors_of = |st: &State| -> Result<(VectorView, usize)> {
            match (&st.set, tag) {
                (Some(s), Some(t)) if s.tag == t => {
                    if s.missing > 0 {
                        return Err(ShardError::VectorSet(format!(
                            "{} live documents still lack the new model's vector",
                            s.missing
                        )));
                    }
                    Ok((s.vectors.clone(), s.dim))
                }
                _ => Ok((st.vectors.clone(), st.dim)),
            }
        };
        let dim = vectors_of(&self.inner.state.read())?.1;
        params.validate(dim)?;

        // Snapshot the live rows; rows are immutable, liveness only ever goes away.
        let (mut covered, live, picked, view) = {
            let st = self.inner.state.read();
            let live = st.rows.live_rows(0..st.rows.len());
            let id = |i: usize| st.rows.id(live[i]);
            let picked: Vec<u64> = training_sample(cfg.seed, gen_id, live.len(), id, train_sample)
                .into_iter()
                .map(|i| live[i])
                .collect();
            (st.rows.len(), live, picked, vectors_of(&st)?.0)
        };
        let sample = gather(&view, &picked);
        let mut index = AnnIndex::train(dim, cfg.metric, params, &sample)?;
        let codec = Codec::train(self.rerank(), dim, &sample);
        drop(sample);
        let trained_s = started.elapsed().as_secs_f64();
        for chunk in live.chunks(BUILD_CHUNK_ROWS) {
            index.add(&gather(&view, chunk), chunk)?;
        }
        // Catch up with writes that landed during the build, so the new generation
        // starts with a small fresh tail.
        let mut covered_seq = 0;
        let mut view = view;
        for _ in 0..4 {
            let (rows, latest) = {
                // Under the writer: the rows published are exactly those of the
                // batches up to `last_seq`.
                let w = self.inner.writer.lock();
                let st = self.inner.state.read();
                let end = st.rows.len();
                let rows = st.rows.live_rows(covered..end);
                covered = end;
                covered_seq = w.last_seq;
                (rows, vectors_of(&st)?.0)
            };
            view = latest;
            if rows.is_empty() {
                break;
            }
            for chunk in rows.chunks(BUILD_CHUNK_ROWS) {
                index.add(&gather(&view, chunk), chunk)?;
            }
        }
        let rerank = match &codec {
            Some(codec) => Some(self.write_rerank(gen_id, codec, &view, covered, dim)?),
            None => None,
        };

        let file = format!("gen-{gen_id:08}.faiss");
        let partial = self.inner.dir.join(format!("{file}.partial"));
        index.write(&partial)?;
        fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(ShardError::io(&partial))?;
        let (crc32, bytes) = storage::file_crc(&partial)?;
        let final_path = self.inner.dir.join(&file);
        fs::rename(&partial, &final_path).map_err(ShardError::io(&final_path))?;
        storage::sync_dir(&self.inner.dir)?;

        let info = GenerationInfo {
            id: gen_id,
            covered_rows: covered,
            indexed_vectors: index.len(),
            params,
            index_file_bytes: bytes,
            build_seconds: started.elapsed().as_secs_f64(),
            rerank: codec.as_ref().map_or(Precision::F32, |c| c.precision),
            tag: tag.unwrap_or(0),
        };
        let meta = GenerationMeta {
            id: gen_id,
            covered_rows: covered,
            file,
            crc32,
            bytes,
            params,
            build_seconds: info.build_seconds,
            indexed_vectors: info.indexed_vectors,
            covered_seq,
            layout: self.inner.state.read().layout,
            remaps: Vec::new(),
            rerank: rerank.as_ref().map(|(m, _)| m.clone()),
            tag: tag.unwrap_or(0),
        };
        let generation = Generation {
            info: info.clone(),
            index: Arc::new(index),
            rerank: rerank.map(|(_, c)| Arc::new(c)),
            remaps: Vec::new(),
        };
        if tag.is_some() {
            self.stage_in(meta, generation)?;
            tracing::info!(
                generation = gen_id,
                vectors = info.indexed_vectors,
                tag = info.tag,
                total_s = info.build_seconds,
                "index generation staged beside the serving one"
            );
            return Ok(info);
        }
        self.swap_in(meta, generation)?;
        tracing::info!(
            generation = gen_id,
            vectors = info.indexed_vectors,
            covered_rows = covered,
            train_s = trained_s,
            total_s = info.build_seconds,
            index_bytes = bytes,
            "index generation swapped in"
        );
        Ok(info)
    }

    /// Writes generation `gen_id`'s re-ranking copy of rows `0..rows` (the labels it
    /// may return) and opens it.
    fn write_rerank(
        &self,
        gen_id: u64,
        codec: &Codec,
        view: &VectorView,
        rows: u64,
        dim: usize,
    ) -> Result<(RerankMeta, RerankCopy)> {
        let file = rerank::file_name(gen_id);
        let partial = self.inner.dir.join(format!("{file}.partial"));
        let written = rerank::write(&partial, codec, view, rows);
        let (crc32, bytes) = match written {
            Ok(w) => w,
            Err(e) => {
                rerank::remove(&partial);
                return Err(e);
            }
        };
        let path = self.inner.dir.join(&file);
        fs::rename(&partial, &path).map_err(ShardError::io(&path))?;
        storage::sync_dir(&self.inner.dir)?;
        let copy = RerankCopy::load(&path, crc32, bytes, dim)?;
        let meta = RerankMeta {
            precision: codec.precision,
            file,
            crc32,
            bytes,
        };
        Ok((meta, copy))
    }

    /// Makes `generation` (its file already in the shard's directory, fsynced) the
    /// serving one. Manifest first, then the in-memory swap: after a crash the
    /// manifest names a complete, checksummed file; readers see either N or N+1, never
    /// a mix. The caller holds the `building` claim.
    fn swap_in(&self, meta: GenerationMeta, generation: Generation) -> Result<()> {
        let gone = {
            let mut w = self.inner.writer.lock();
            // A retired handle (its directory replaced by a snapshot) never writes a
            // manifest: the directory now belongs to another handle.
            self.check_writable()?;
            w.manifest.next_generation = w.manifest.next_generation.max(meta.id + 1);
            let old = w.manifest.serving.replace(meta);
            w.manifest.store(&self.inner.dir)?;
            let mut st = self.inner.state.write();
            st.serving = Some(Arc::new(generation));
            old.map(|o| w.manifest.unshared_files(&o))
        };
        self.remove_files(gone.unwrap_or_default())
    }

    /// Deletes files of a generation the manifest no longer names (after it was stored).
    fn remove_files(&self, files: Vec<String>) -> Result<()> {
        for file in files {
            let path = self.inner.dir.join(file);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(ShardError::io(&path)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Up to `max` bytes of the serving generation `id`'s file from `offset`, with
    /// what another replica of the shard needs to take it as built
    /// ([`Shard::install_generation`]; issue 18: the primary trains once). Refused
    /// once `id` is no longer served, and for a generation whose log position was not
    /// recorded.
    pub fn generation_chunk(&self, id: u64, offset: u64, max: usize) -> Result<GenerationChunk> {
        let (export, f) = {
            let w = self.inner.writer.lock();
            let serving = w.manifest.serving.as_ref().map(|g| g.id);
            // The serving generation, or a rebuild's staged one (issue 21).
            let staged = w.manifest.staged.clone().filter(|g| g.id == id);
            let is_staged = staged.is_some();
            let Some(g) = w.manifest.serving.clone().filter(|g| g.id == id).or(staged) else {
                return Err(ShardError::GenerationRefused(format!(
                    "generation {id} is not served here (serving {serving:?})"
                )));
            };
            if g.covered_seq == 0 && g.covered_rows > 0 {
                return Err(ShardError::GenerationRefused(format!(
                    "generation {id} was built before its log position was recorded"
                )));
            }
            if !g.remaps.is_empty() {
                return Err(ShardError::GenerationRefused(format!(
                    "generation {id} numbers rows as before the compaction at batch {}",
                    w.manifest.layout
                )));
            }
            let covered_epoch = epoch_at(&w.manifest.epochs, g.covered_seq);
            // Opened while the manifest names it: a later swap cannot pull it away.
            let path = self.inner.dir.join(&g.file);
            let f = fs::File::open(&path).map_err(ShardError::io(&path))?;
            // The serving generation in memory is the manifest's (both swap under
            // the writer).
            let codec = {
                let st = self.inner.state.read();
                let held = if is_staged { &st.staged } else { &st.serving };
                held.as_ref()
                    .and_then(|s| s.rerank.as_ref().map(|c| c.codec().clone()))
            };
            (
                GenerationExport {
                    meta: g,
                    covered_epoch,
                    codec,
                },
                f,
            )
        };
        let total = export.meta.bytes;
        if offset > total {
            return Err(ShardError::InvalidQuery(format!(
                "offset {offset} past the {total} bytes of generation {id}"
            )));
        }
        let n = ((total - offset) as usize).min(max);
        let mut data = vec![0u8; n];
        {
            use std::os::unix::fs::FileExt;
            let path = self.inner.dir.join(&export.meta.file);
            f.read_exact_at(&mut data, offset)
                .map_err(ShardError::io(&path))?;
        }
        Ok(GenerationChunk {
            meta: serde_json::to_vec(&export).expect("generation meta serialises"),
            data,
            total,
        })
    }

    /// The last batch a fetched generation covers: a backup holds it before it
    /// installs the generation.
    pub fn generation_covered_seq(meta: &[u8]) -> Result<u64> {
        let export: GenerationExport = serde_json::from_slice(meta)
            .map_err(|e| ShardError::GenerationRefused(format!("unreadable generation: {e}")))?;
        Ok(export.meta.covered_seq)
    }

    /// Takes a generation another replica of this shard built (`meta` from its
    /// [`Shard::generation_chunk`], its file whole at `file`, moved into the shard's
    /// directory) as this replica's serving one, checked first: the histories agree up
    /// to the last batch it covers (so the rows it names are this replica's rows), the
    /// rows are here, the file's checksum and size are the builder's, and it is newer
    /// than what is served. Refused with the reason otherwise, nothing changed.
    pub fn install_generation(&self, meta: &[u8], file: &Path) -> Result<GenerationInfo> {
        self.install(meta, file, false)
    }

    /// [`Shard::install_generation`], staged beside the serving generation instead of
    /// served (issue 21: a backup takes its primary's rebuild before the switch).
    pub fn install_staged(&self, meta: &[u8], file: &Path) -> Result<GenerationInfo> {
        self.install(meta, file, true)
    }

    fn install(&self, meta: &[u8], file: &Path, stage: bool) -> Result<GenerationInfo> {
        let export: GenerationExport = serde_json::from_slice(meta)
            .map_err(|e| ShardError::GenerationRefused(format!("unreadable generation: {e}")))?;
        let id = export.meta.id;
        {
            let mut b = self.inner.building.lock();
            if let Some(work) = *b {
                return Err(work.busy());
            }
            *b = Some(Work::Build(id));
        }
        let result = self.install_checked(export, file, stage);
        *self.inner.building.lock() = None;
        self.maybe_compact();
        result
    }

    fn install_checked(
        &self,
        export: GenerationExport,
        file: &Path,
        stage: bool,
    ) -> Result<GenerationInfo> {
        let g = export.meta;
        let refused = |why: String| {
            Err(ShardError::GenerationRefused(format!(
                "generation {}: {why}",
                g.id
            )))
        };
        if g.file != format!("gen-{:08}.faiss", g.id) {
            return refused(format!("file name {:?} is not the generation's", g.file));
        }
        // A re-embed's generation indexes this replica's vector set of its tag.
        let gen_tag = g.tag;
        let vectors_of = |st: &State| match &st.set {
            Some(s) if stage && s.tag == gen_tag => (s.vectors.clone(), s.dim),
            _ => (st.vectors.clone(), st.dim),
        };
        let dim = vectors_of(&self.inner.state.read()).1;
        g.params.validate(dim)?;
        if let Some(codec) = &export.codec {
            if let Err(why) = codec.check(dim) {
                return refused(format!("its re-ranking codec: {why}"));
            }
        }
        if export.codec.as_ref().map(|c| c.precision) != g.rerank.as_ref().map(|r| r.precision) {
            return refused("its re-ranking copy and codec disagree".into());
        }
        {
            let w = self.inner.writer.lock();
            let st = self.inner.state.read();
            let serving = w.manifest.serving.as_ref().map_or(0, |s| s.id);
            if !stage && serving >= g.id {
                return refused(format!("generation {serving} is already served"));
            }
            // Its file name must be free here (replicas number their own automatic
            // rebuilds, so a backup may hold a generation of that id).
            if stage && w.manifest.generations().any(|x| x.id == g.id) {
                return refused(format!("a generation {} is already held here", g.id));
            }
            if w.last_seq < g.covered_seq {
                return refused(format!(
                    "it covers batches up to {}, this replica holds up to {}",
                    g.covered_seq, w.last_seq
                ));
            }
            // Row numbers agree only within one layout (`compact`).
            if g.layout != w.manifest.layout || !g.remaps.is_empty() {
                return refused(format!(
                    "its rows are numbered as compacted at batch {}, this replica's at batch {}",
                    g.layout, w.manifest.layout
                ));
            }
            let mine = epoch_at(&w.manifest.epochs, g.covered_seq);
            if mine != export.covered_epoch {
                return refused(format!(
                    "histories differ at batch {} (epoch {} there, {mine} here)",
                    g.covered_seq, export.covered_epoch
                ));
            }
            if st.rows.len() < g.covered_rows {
                return refused(format!(
                    "it covers {} rows, this replica has {}",
                    g.covered_rows,
                    st.rows.len()
                ));
            }
        }
        let (crc, bytes) = storage::file_crc(file)?;
        if crc != g.crc32 || bytes != g.bytes {
            return refused(format!(
                "file checksum {crc:08x} ({bytes} bytes) is not the builder's {:08x} ({} bytes)",
                g.crc32, g.bytes
            ));
        }
        fs::File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(ShardError::io(file))?;
        let final_path = self.inner.dir.join(&g.file);
        fs::rename(file, &final_path).map_err(ShardError::io(&final_path))?;
        storage::sync_dir(&self.inner.dir)?;
        let index = AnnIndex::read_verified(&final_path)?;
        if index.dim() != dim || index.len() != g.indexed_vectors {
            let _ = fs::remove_file(&final_path);
            return refused(format!(
                "the index holds {} vectors of {} dimensions, its manifest says {} of {}",
                index.len(),
                index.dim(),
                g.indexed_vectors,
                dim
            ));
        }
        // The re-ranking copy is encoded here from this replica's own rows, which are
        // the builder's up to `covered_rows` (the histories agree up to `covered_seq`).
        let mut g = g;
        let rerank = match &export.codec {
            Some(codec) => {
                let view = vectors_of(&self.inner.state.read()).0;
                let (meta, copy) = self.write_rerank(g.id, codec, &view, g.covered_rows, dim)?;
                g.rerank = Some(meta);
                Some(Arc::new(copy))
            }
            None => None,
        };
        let info = GenerationInfo {
            id: g.id,
            covered_rows: g.covered_rows,
            indexed_vectors: g.indexed_vectors,
            params: g.params,
            index_file_bytes: g.bytes,
            build_seconds: g.build_seconds,
            rerank: g.rerank.as_ref().map_or(Precision::F32, |r| r.precision),
            tag: g.tag,
        };
        let generation = Generation {
            info: info.clone(),
            index: Arc::new(index),
            rerank,
            remaps: Vec::new(),
        };
        if stage {
            self.stage_in(g, generation)?;
            tracing::info!(
                generation = info.id,
                tag = info.tag,
                "index generation staged as built by another replica"
            );
            return Ok(info);
        }
        tracing::info!(
            generation = g.id,
            vectors = g.indexed_vectors,
            covered_rows = g.covered_rows,
            covered_seq = g.covered_seq,
            index_bytes = g.bytes,
            "index generation installed as built by another replica"
        );
        self.swap_in(g, generation)?;
        Ok(info)
    }

    /// Async wrappers: every call that may touch FAISS or the disk runs on tokio's
    /// blocking pool, never on the async workers.
    pub async fn search_async(&self, query: Vec<f32>, p: SearchParams) -> Result<SearchResult> {
        let s = self.clone();
        run_blocking(move || s.search(&query, p)).await
    }

    pub async fn rebuild_async(&self, params: Option<IvfPqParams>) -> Result<GenerationInfo> {
        let s = self.clone();
        run_blocking(move || s.rebuild(params)).await
    }
}

pub async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Bytes a build of `rows` vectors of `dim` with `params` and a training sample of
/// `sample` is estimated to hold beyond the shard's resident data (issue 18's admission
/// control): the sample twice (gathered, and FAISS's residuals while training PQ), the
/// coarse centroids, two add chunks, and the new generation's codes and ids with a
/// quarter more for the inverted lists' slack.
pub fn build_memory(rows: u64, dim: usize, params: IvfPqParams, sample: usize) -> u64 {
    let dim = dim as u64;
    let sample = (sample as u64).min(rows.max(params.nlist as u64));
    let code = (params.m * params.nbits).div_ceil(8) as u64;
    2 * sample * dim * 4
        + params.nlist as u64 * dim * 4
        + 2 * BUILD_CHUNK_ROWS as u64 * dim * 4
        + rows * (code + 8) * 5 / 4
}

/// Bytes a compaction of a shard of `rows` rows is estimated to need beside the shard
/// (for a node's admission control, issue 19): the scratch row table of what was live at
/// the compaction's batch (ids and the index: ~41 B a row at 24-byte ids, measured, so
/// 64 with longer ids), the row map (a bit a row), and the copy's buffers.
pub fn compaction_memory(rows: u64) -> u64 {
    rows * 64 + rows / 8 + (32 << 20)
}

/// The vectors that train generation `generation` of a shard with `live` live rows,
/// `id(i)` naming the document of the i-th: positions (into that list) of the `sample`
/// ids that hash lowest under a key of `seed` and `generation`, in that hash order.
/// A function of the shard's live ids, not of the order their rows arrived in: two
/// replicas of a shard, or a benchmark's raw-FAISS peer holding the same documents in
/// file order, train on the same vectors in the same order, so FAISS's k-means starts
/// and ends the same. (Sampling row positions made the quantizers depend on arrival
/// order, which moved recall@10 by up to 0.035 between otherwise equal indexes:
/// docs/benchmarks.md, the scale section.) Costs one hash per live id and a partial
/// sort, done by the build under the state's read lock (not timed separately).
pub fn training_sample<'a>(
    seed: u64,
    generation: u64,
    live: usize,
    id: impl Fn(usize) -> &'a str,
    sample: usize,
) -> Vec<usize> {
    let key = mix64(seed ^ mix64(generation));
    let mut keyed: Vec<(u64, usize)> = (0..live).map(|i| (id_hash(key, id(i)), i)).collect();
    // Ties (a 64-bit collision) fall back to the ids themselves: still order-free.
    let order =
        |a: &(u64, usize), b: &(u64, usize)| a.0.cmp(&b.0).then_with(|| id(a.1).cmp(id(b.1)));
    let sample = sample.min(live);
    if sample == 0 {
        return Vec::new();
    }
    if sample < keyed.len() {
        keyed.select_nth_unstable_by(sample - 1, order);
        keyed.truncate(sample);
    }
    keyed.sort_unstable_by(order);
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// FNV-1a over the id's bytes from a keyed start, then a 64-bit finaliser: stable
/// across builds and platforms (std's hasher promises neither).
fn id_hash(key: u64, id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ key;
    for &b in id.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// splitmix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn gather(view: &VectorView, rows: &[u64]) -> Vec<f32> {
    // An empty shard trains on nothing, and training says how many vectors it needs.
    let Some(&first) = rows.first() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(rows.len() * view.get(first).len());
    for &r in rows {
        out.extend_from_slice(view.get(r));
    }
    out
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(ShardError::invalid_doc(id, "id is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ShardError::invalid_doc(
            &id[..id.floor_char_boundary(32)],
            format!("id is {} bytes, the limit is {MAX_ID_BYTES}", id.len()),
        ));
    }
    Ok(())
}

fn validate_request_id(request_id: &str) -> Result<()> {
    if request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(ShardError::InvalidConfig(format!(
            "request id is {} bytes, the limit is {MAX_REQUEST_ID_BYTES}",
            request_id.len()
        )));
    }
    Ok(())
}

/// The shared vector rule (`shoal_proto::limits::vector_problem`): right length,
/// finite, and a norm whose scores cannot overflow.
fn validate_vector(dim: usize, v: &[f32]) -> std::result::Result<(), String> {
    match shoal_proto::limits::vector_problem(v, dim) {
        Some(p) => Err(format!("vector {p}")),
        None => Ok(()),
    }
}

/// Most bytes of a model's name (a content hash) in a logged operation.
const MAX_MODEL_BYTES: usize = 256;

/// One logged operation, checked before anything is logged: id, vector, size. Used for
/// a primary's writes and for the batches a backup is sent alike. A vector's length
/// is checked against the shard's dimension under the writer (`vector_set::check`):
/// a re-embed's commit changes it.
fn validate_op(op: &WalOp) -> Result<()> {
    match op {
        WalOp::Upsert {
            id,
            text,
            metadata,
            vector,
        } => {
            validate_id(id)?;
            validate_vector(vector.len(), vector).map_err(|r| ShardError::invalid_doc(id, r))?;
            let size = text.as_ref().map_or(0, |t| t.len()) + metadata.len();
            if size > MAX_DOC_BYTES {
                return Err(ShardError::invalid_doc(
                    id,
                    format!("text and metadata are {size} bytes, the limit is {MAX_DOC_BYTES}"),
                ));
            }
            Ok(())
        }
        WalOp::Delete { id } => validate_id(id),
        WalOp::Compact | WalOp::SetDrop { .. } | WalOp::SetCommit { .. } => Ok(()),
        WalOp::Retain { modulus, residue } => Routing {
            modulus: *modulus,
            residue: *residue,
        }
        .check()
        .map_err(ShardError::InvalidConfig),
        WalOp::SetBegin {
            model,
            from_model,
            dimension,
            ..
        } => {
            if *dimension == 0 || *dimension > 65_536 {
                return Err(ShardError::InvalidConfig(format!(
                    "vector set dimension {dimension} must be between 1 and 65536"
                )));
            }
            if model.is_empty()
                || model.len() > MAX_MODEL_BYTES
                || from_model.len() > MAX_MODEL_BYTES
            {
                return Err(ShardError::InvalidConfig(format!(
                    "a vector set's model names are 1 to {MAX_MODEL_BYTES} bytes"
                )));
            }
            Ok(())
        }
        WalOp::SetVector { id, vector, .. } => {
            validate_id(id)?;
            validate_vector(vector.len(), vector).map_err(|r| ShardError::invalid_doc(id, r))?;
            if vector.is_empty() || vector.len() > 65_536 || vector.iter().all(|&x| x == 0.0) {
                return Err(ShardError::invalid_doc(
                    id,
                    "a vector set's vector has 1 to 65536 values, not all zero",
                ));
            }
            Ok(())
        }
    }
}

/// A compaction travels alone in its batch (its point is the state after the batch),
/// and so does a retain (what it deletes is the state before it).
fn validate_batch_shape(ops: &[WalOp]) -> Result<()> {
    if ops.len() > 1
        && ops.iter().any(|op| {
            matches!(
                op,
                WalOp::Compact
                    | WalOp::Retain { .. }
                    | WalOp::SetBegin { .. }
                    | WalOp::SetDrop { .. }
                    | WalOp::SetCommit { .. }
            )
        })
    {
        return Err(ShardError::InvalidConfig(
            "a compaction, a retain or a vector set's begin, drop or commit must be the only \
             operation of its batch"
                .into(),
        ));
    }
    // A new write's set vector (version 0) belongs to the upsert right before it.
    for (i, op) in ops.iter().enumerate() {
        if let WalOp::SetVector { id, version: 0, .. } = op {
            let follows = i > 0 && matches!(&ops[i - 1], WalOp::Upsert { id: up, .. } if up == id);
            if !follows {
                return Err(ShardError::invalid_doc(
                    id,
                    "a new write's set vector must follow the upsert of the same id",
                ));
            }
        }
    }
    Ok(())
}

/// The live ids a retain batch deletes (none for any other batch), in row order.
fn retained_away(batch: &WalBatch, rows: &Rows) -> Vec<String> {
    let [WalOp::Retain { modulus, residue }] = batch.ops.as_slice() else {
        return Vec::new();
    };
    let keep = Routing {
        modulus: *modulus,
        residue: *residue,
    };
    (0..rows.len())
        .filter(|&r| rows.is_live(r) && !keep.holds(rows.id(r)))
        .map(|r| rows.id(r).to_owned())
        .collect()
}

/// Segment positions of a batch, written but not yet visible to readers.
#[derive(Default)]
struct Staged {
    ops: Vec<StagedOp>,
}

enum StagedOp {
    Put {
        id: String,
        row: u64,
        offset: u64,
        values: RowValues,
        terms: RowTerms,
    },
    Delete(String),
    /// A vector set's vector written to this row.
    SetVector(u64),
}

/// Writes a batch's records; `away` are the ids a retain deletes ([`retained_away`]),
/// `targets` the rows its re-encodings write ([`vector_set::targets`]), `live` the
/// live rows before it (a set begun here lacks all of them).
fn stage(
    dir: &Path,
    w: &mut Writer,
    batch: &WalBatch,
    away: Vec<String>,
    targets: &[Option<u64>],
    live: usize,
    staged: &mut Staged,
) -> Result<()> {
    for id in away {
        w.docs.append(&SegmentEntry::Delete {
            seq: batch.seq,
            id: id.clone(),
        })?;
        staged.ops.push(StagedOp::Delete(id));
    }
    let mut last_put = None;
    for (i, op) in batch.ops.iter().enumerate() {
        match op {
            WalOp::Upsert {
                id,
                text,
                metadata,
                vector,
            } => {
                let row = w.vectors.append(vector)?;
                if let Some(s) = w.set.as_mut() {
                    s.store.ensure(row + 1)?;
                }
                let offset = w.docs.append(&SegmentEntry::Put {
                    seq: batch.seq,
                    row,
                    id: id.clone(),
                    text: text.clone(),
                    metadata: metadata.clone(),
                    vector_crc: storage::vector_crc(vector),
                })?;
                staged.ops.push(StagedOp::Put {
                    id: id.clone(),
                    row,
                    offset,
                    values: PayloadIndex::extract(
                        &w.manifest.config.payload_fields,
                        metadata.as_str(),
                    ),
                    terms: RowTerms::of(text.as_deref()),
                });
                last_put = Some(row);
            }
            WalOp::Delete { id } => {
                w.docs.append(&SegmentEntry::Delete {
                    seq: batch.seq,
                    id: id.clone(),
                })?;
                staged.ops.push(StagedOp::Delete(id.clone()));
            }
            // Recorded by `Writer::finish`; the files change later (`compact`).
            WalOp::Compact => {}
            // Its deletes were written first (`away`).
            WalOp::Retain { .. } => {}
            WalOp::SetBegin {
                tag,
                model,
                from_model,
                dimension,
            } => {
                vector_set::begin(dir, w, live, *tag, model, *dimension as usize)?;
                if w.manifest.model.is_empty() {
                    w.manifest.model = from_model.clone();
                }
            }
            WalOp::SetVector {
                tag,
                version,
                vector,
                ..
            } => {
                let row = if *version == 0 { last_put } else { targets[i] };
                if let (Some(row), Some(s)) = (row, w.set.as_mut()) {
                    if s.meta.tag == *tag {
                        s.store.write(row, vector)?;
                        staged.ops.push(StagedOp::SetVector(row));
                    }
                }
            }
            WalOp::SetDrop { tag } => {
                if w.set.as_ref().is_some_and(|s| s.meta.tag == *tag) {
                    w.set = None;
                }
            }
            // Done once the batch is published (`finish_set_op`).
            WalOp::SetCommit { .. } => {}
        }
    }
    Ok(())
}

/// Makes a staged batch visible; returns (upserted, deleted).
fn publish(st: &mut State, w: &mut Writer, staged: Staged) -> (usize, usize) {
    let (mut up, mut del) = (0, 0);
    for op in staged.ops {
        match op {
            StagedOp::Put {
                id,
                row,
                offset,
                values,
                terms,
            } => {
                let old = st.rows.get(&id);
                let placed = st.rows.put(&id, offset);
                debug_assert_eq!(placed, row);
                st.payload.push(placed, values);
                st.lexical.push(placed, terms);
                vector_set::on_put(w, old, placed);
                up += 1;
            }
            StagedOp::Delete(id) => {
                let old = st.rows.get(&id);
                if st.rows.remove(&id) {
                    del += 1;
                    if let Some(row) = old {
                        vector_set::on_delete(w, row);
                    }
                }
            }
            StagedOp::SetVector(row) => vector_set::on_vector(w, row),
        }
    }
    st.vectors = w.vectors.view();
    let rows = st.vectors.rows();
    // Changed only by a vector set's begin or commit: no allocation per batch.
    if *st.model != *w.manifest.model {
        st.model = Arc::from(w.manifest.model.as_str());
    }
    st.set = w.set.as_ref().map(|s| s.view(rows));
    (up, del)
}

fn apply(dir: &Path, w: &mut Writer, st: &mut State, batch: &WalBatch) -> Result<()> {
    let mut staged = Staged::default();
    let targets = vector_set::targets(w, st, batch)?;
    let live = st.rows.live_len();
    stage(
        dir,
        w,
        batch,
        retained_away(batch, &st.rows),
        &targets,
        live,
        &mut staged,
    )?;
    let (upserted, deleted) = publish(st, w, staged);
    w.finish(batch, upserted, deleted);
    if let Some(gone) = finish_set_op(dir, w, st, batch)? {
        for f in gone {
            let _ = fs::remove_file(dir.join(f));
        }
    }
    Ok(())
}

/// After a vector set's begin, drop or commit: a checkpoint, so the manifest names
/// exactly the set the log has made (its file is created, deleted or renamed here).
/// Returns the files no longer named, to delete; `None` for any other batch.
fn finish_set_op(
    dir: &Path,
    w: &mut Writer,
    st: &mut State,
    batch: &WalBatch,
) -> Result<Option<Vec<String>>> {
    match batch.ops.as_slice() {
        [WalOp::SetBegin { .. }] => {
            checkpoint(dir, w)?;
            Ok(Some(Vec::new()))
        }
        [WalOp::SetDrop { tag }] => {
            let gone = w
                .manifest
                .vector_set
                .as_ref()
                .filter(|s| s.tag == *tag)
                .map(|s| s.file.clone());
            checkpoint(dir, w)?;
            Ok(Some(
                gone.into_iter()
                    .flat_map(|f| [format!("{f}.crc"), f])
                    .collect(),
            ))
        }
        [WalOp::SetCommit { tag }] => commit_set(dir, w, st, *tag, batch.seq).map(Some),
        _ => Ok(None),
    }
}

/// `SetCommit`: the set's file becomes the vectors of a new layout named by the
/// commit's batch (the documents file linked under its name: same records, same row
/// numbers), the dimension and model become the set's, a generation staged over the
/// set serves; the old vectors and generations are deleted. Every replica does the
/// same at the same log position.
fn commit_set(
    dir: &Path,
    w: &mut Writer,
    st: &mut State,
    tag: u64,
    seq: u64,
) -> Result<Vec<String>> {
    let Some(mut set) = w.set.take().filter(|s| s.meta.tag == tag) else {
        return Ok(Vec::new());
    };
    let rows = w.vectors.view().rows();
    // Dead rows that never got a vector read as zeros: the table says so.
    let zeros = storage::vector_crc(&vec![0.0; set.meta.dimension]);
    for row in 0..rows {
        if !set.has(row) {
            set.store.write_crc(row, zeros)?;
        }
    }
    set.store.finish(rows)?;
    w.docs.sync()?;
    let (old_docs, old_vectors) = w.manifest.segments();
    let (docs_name, vectors_name) = segment_files(seq);
    let (docs_path, vectors_path) = (dir.join(&docs_name), dir.join(&vectors_name));
    // Links, not renames: until the checkpoint below stores the manifest naming them,
    // the old names stay what a crash recovers from (the replayed commit links again).
    let crcs_path = storage::crc_file(&vectors_path);
    for (from, to) in [
        (dir.join(&old_docs), &docs_path),
        (set.store.path.clone(), &vectors_path),
        (storage::crc_file(&set.store.path), &crcs_path),
    ] {
        if !to.exists() {
            fs::hard_link(&from, to).map_err(ShardError::io(to))?;
        }
    }
    storage::sync_dir(dir)?;
    let set_file = set.meta.file.clone();
    let docs_len = w.docs.len();
    w.docs = DocsFile::open(docs_path, docs_len)?;
    w.vectors = VectorStore::open(vectors_path, set.meta.dimension, rows)?;
    let m = &mut w.manifest;
    let mut gone: Vec<manifest::GenerationMeta> = Vec::new();
    gone.extend(m.serving.take());
    gone.extend(m.previous.take());
    let over_set = m.staged.take_if(|g| g.tag == tag);
    gone.extend(m.staged.take());
    m.serving = over_set.map(|mut g| {
        g.layout = seq;
        g
    });
    m.config.dimension = set.meta.dimension;
    m.model = set.meta.model.clone();
    m.layout = seq;
    m.vector_set = None;
    // The records hold the old vectors' checksums: the set's table holds the new ones'.
    m.vector_crcs = rows;
    let crcs = storage::read_crcs(&crcs_path, rows)?;
    checkpoint(dir, w)?;
    let mut files: Vec<String> = gone
        .iter()
        .flat_map(|g| w.manifest.unshared_files(g))
        .collect();
    let old_crcs = format!("{old_vectors}.crc");
    files.extend([
        old_docs,
        old_vectors,
        old_crcs,
        format!("{set_file}.crc"),
        set_file,
    ]);
    st.crcs = Some(Arc::new(crcs));
    st.serving = st.staged.take().filter(|g| g.info.tag == tag);
    st.previous = None;
    st.staged = None;
    st.vectors = w.vectors.view();
    st.docs = w.docs.reader()?;
    st.layout = seq;
    st.dim = set.meta.dimension;
    st.model = Arc::from(set.meta.model.as_str());
    st.set = None;
    tracing::info!(dir = %dir.display(), tag, seq, dimension = st.dim, "re-embed committed: the vector set is the stored vectors");
    Ok(files)
}

/// Makes the segments durable, records them in the manifest, restarts the log.
fn checkpoint(dir: &Path, w: &mut Writer) -> Result<()> {
    w.docs.sync()?;
    w.vectors.sync()?;
    if let Some(s) = &w.set {
        s.store.sync()?;
    }
    w.manifest.vector_set = w.set.as_ref().map(|s| s.meta.clone());
    w.manifest.applied_seq = w.last_seq;
    w.manifest.docs_len = w.docs.len();
    w.manifest.rows = w.vectors.view().rows();
    w.manifest.requests = w
        .requests
        .newest(CHECKPOINTED_REQUEST_BYTES)
        .into_iter()
        .map(|(id, a)| (id, a.seq, a.upserted, a.deleted))
        .collect();
    w.manifest.store(dir)?;
    w.wal = Some(Wal::start(dir, w.last_seq + 1)?);
    Ok(())
}

/// Rebuilds the id map from the checkpointed segment, verifying every record and
/// every vector's checksum.
/// The error for a vector that fails its checksum: the vectors file and the row's
/// offset in it.
fn bad_vector(path: &Path, row: u64, dim: usize, id: &str) -> ShardError {
    ShardError::Corrupt {
        file: path.to_owned(),
        offset: row * dim as u64 * 4,
        reason: format!("vector of row {row} ({id:?}) fails its checksum"),
    }
}

/// The segment files as of one layout, taken with row offsets into them (a
/// compaction may swap new files in meanwhile; these stay readable).
struct SegmentsRead {
    docs: DocsReader,
    vectors: VectorView,
    vectors_path: PathBuf,
    crcs: Option<Arc<Vec<u32>>>,
}

impl SegmentsRead {
    fn of(st: &State, dir: &Path) -> Self {
        Self {
            docs: st.docs.clone(),
            vectors: st.vectors.clone(),
            vectors_path: dir.join(segment_files(st.layout).1),
            crcs: st.crcs.clone(),
        }
    }

    /// Checks rows `from..` (`offsets[i]`: row `from + i`'s record in the documents
    /// file) against the checksums their records hold; returns the bytes of vectors
    /// read. A damaged record or vector is `Corrupt`, naming its file and offset.
    fn check_vectors(&self, from: u64, offsets: &[u64]) -> Result<u64> {
        check_vectors(self, from, offsets)
    }
}

fn check_vectors(files: &SegmentsRead, from: u64, offsets: &[u64]) -> Result<u64> {
    let docs = files.docs.path().to_owned();
    let view = &files.vectors;
    let map = files.docs.map()?;
    let data: &[u8] = map.as_deref().unwrap_or_default();
    let mut bytes = 0;
    for (i, &offset) in offsets.iter().enumerate() {
        let row = from + i as u64;
        let corrupt = |reason: String| ShardError::Corrupt {
            file: docs.clone(),
            offset,
            reason,
        };
        let mut at = data
            .get(offset as usize..)
            .ok_or_else(|| corrupt(format!("row {row}'s record is past the file's end")))?;
        let payload = record::read_one(&mut at).map_err(corrupt)?;
        let SegmentEntry::Put { id, vector_crc, .. } =
            storage::decode::<SegmentEntry>(&payload).map_err(corrupt)?
        else {
            return Err(corrupt(format!("row {row} points at a delete record")));
        };
        let v = view.get(row);
        bytes += v.len() as u64 * 4;
        if storage::vector_crc(v) != expected_crc(files.crcs.as_deref(), row, vector_crc) {
            return Err(bad_vector(&files.vectors_path, row, v.len(), &id));
        }
    }
    Ok(bytes)
}

fn load_segment(path: &Path, vectors: &VectorStore, st: &mut State) -> Result<()> {
    let map = storage::map_file(path)?;
    let data: &[u8] = map.as_deref().unwrap_or_default();
    let view = vectors.view();
    let corrupt = |offset, reason| ShardError::Corrupt {
        file: path.to_owned(),
        offset,
        reason,
    };
    let end = record::scan(data, |offset, payload| {
        match storage::decode::<SegmentEntry>(payload)? {
            SegmentEntry::Put {
                row,
                id,
                metadata,
                text,
                ..
            } => {
                if row != st.rows.len() || row >= view.rows() {
                    return Err(format!(
                        "row {row} out of order (expected {})",
                        st.rows.len()
                    ));
                }
                // The row table packs ids of at most MAX_ID_BYTES (the writer's limit).
                if id.len() > MAX_ID_BYTES || offset > MAX_DOC_OFFSET {
                    return Err(format!(
                        "row {row}: id of {} bytes (limit {MAX_ID_BYTES}) at offset {offset}",
                        id.len()
                    ));
                }
                // The vector's checksum is not read here (issue 18: open time grew
                // with the vectors, 1.55 GB read for a 1M-row shard); the scrubber
                // and every read of the row check it.
                st.rows.put(&id, offset);
                let values = PayloadIndex::extract(st.payload.fields(), &metadata);
                st.payload.push(row, values);
                st.lexical.push(row, RowTerms::of(text.as_deref()));
            }
            SegmentEntry::Delete { id, .. } => {
                st.rows.remove(&id);
            }
        }
        Ok(())
    })
    .map_err(|(off, reason)| corrupt(off, reason))?;
    match end {
        record::ScanEnd::Clean => Ok(()),
        // The checkpointed prefix was fsynced before the manifest named it: any damage
        // there is corruption, not a torn write.
        record::ScanEnd::TornTail { offset } => Err(corrupt(offset, "damaged record".into())),
        record::ScanEnd::Corrupt { offset, reason } => Err(corrupt(offset, reason)),
    }
}

fn load_generation(dir: &Path, meta: &GenerationMeta) -> Result<Generation> {
    let path = dir.join(&meta.file);
    let (crc, bytes) = storage::file_crc(&path)?;
    if crc != meta.crc32 || bytes != meta.bytes {
        return Err(ShardError::Corrupt {
            file: path,
            offset: 0,
            reason: format!(
                "index file checksum {crc:08x} ({bytes} bytes) does not match the manifest's {:08x} ({} bytes); refusing to load it",
                meta.crc32, meta.bytes
            ),
        });
    }
    let index = Arc::new(AnnIndex::read_verified(&path)?);
    let remaps = meta
        .remaps
        .iter()
        .map(|r| compact::load_remap(dir, r).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let rerank = match &meta.rerank {
        Some(r) => Some(Arc::new(RerankCopy::load(
            &dir.join(&r.file),
            r.crc32,
            r.bytes,
            index.dim(),
        )?)),
        None => None,
    };
    Ok(Generation {
        info: GenerationInfo {
            id: meta.id,
            covered_rows: meta.covered_rows,
            indexed_vectors: index.len(),
            params: meta.params,
            index_file_bytes: meta.bytes,
            build_seconds: meta.build_seconds,
            rerank: meta.rerank.as_ref().map_or(Precision::F32, |r| r.precision),
            tag: meta.tag,
        },
        index,
        rerank,
        remaps,
    })
}
