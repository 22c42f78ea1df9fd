//! A re-embed's second vector set (issue 21; docs/adr/0004-re-embedding.md, option 2):
//! another model's vectors of the shard's rows, in a file row-aligned with the
//! segments (`vectors-set-<tag>.f32`), filled while the shard serves and takes writes,
//! then either made the stored vectors (a commit) or dropped (a rollback).
//!
//! Everything that changes the set is a logged operation (`WalOp::Set*`), so every
//! replica holds the same set at the same log position, backups receive its vectors
//! by replication (each document is encoded once, by its primary) and a restart
//! resumes from the log:
//! - `SetBegin` creates it; from then on every upsert must carry the set's vector too
//!   (`SetVector` with version 0 right after it: the gateway encodes new writes with
//!   both models), so only rows older than the set ever lack one.
//! - `SetVector { id, version }` is the primary's re-encoding of a row it read: it
//!   applies only if `id`'s live row is still the one batch `version` wrote, checked
//!   where the batch is applied, so a re-encoding that raced an update or a delete is
//!   dropped on every replica alike (the race that decides the design, ADR 0004).
//! - `SetCommit` (refused while a live row lacks its vector) makes the set the layout's
//!   vectors file under a new layout named by its batch, with the staged generation
//!   built over it serving; `SetDrop` deletes it.
//!
//! Compactions wait while a set exists (rows keep their numbers); the set's rows
//! lacking a vector are found again at open by reading the file (zero rows: a set's
//! vectors are never all zeros). Queries name the model they were encoded with and are
//! answered from the matching vectors ([`Shard::set_for_model`]).

use std::sync::Arc;

use serde::Serialize;

use super::error::{Result, ShardError};
use super::manifest::{vector_set_file, Manifest, VectorSetMeta};
use super::rows::Rows;
use super::storage::{DocsReader, SegmentEntry, SetStore, VectorView};
use super::wal::{WalBatch, WalOp};
use super::{Shard, State, Writer};

/// The set as the writer keeps it: its file and which rows have their vector.
pub(crate) struct SetWriter {
    pub meta: VectorSetMeta,
    /// `meta.model`, shared with every view published.
    model: Arc<str>,
    pub store: SetStore,
    /// A bit per row: written.
    have: Vec<u64>,
    /// Live rows without their vector.
    pub missing: u64,
}

impl SetWriter {
    pub fn has(&self, row: u64) -> bool {
        self.have
            .get((row / 64) as usize)
            .is_some_and(|w| w & (1 << (row % 64)) != 0)
    }

    fn mark(&mut self, row: u64) {
        let i = (row / 64) as usize;
        if self.have.len() <= i {
            self.have.resize(i + 1, 0);
        }
        self.have[i] |= 1 << (row % 64);
    }

    /// What readers see of it.
    pub fn view(&self, rows: u64) -> SetView {
        SetView {
            tag: self.meta.tag,
            model: self.model.clone(),
            dim: self.meta.dimension,
            vectors: self.store.view(rows),
            missing: self.missing,
        }
    }
}

/// The set as readers see it.
#[derive(Clone)]
pub(crate) struct SetView {
    pub tag: u64,
    pub model: Arc<str>,
    pub dim: usize,
    pub vectors: VectorView,
    pub missing: u64,
}

impl SetView {
    pub fn info(&self) -> VectorSetInfo {
        VectorSetInfo {
            tag: self.tag,
            model: self.model.to_string(),
            dimension: self.dim,
            missing: self.missing,
        }
    }
}

/// A shard's vector set, as reported (`ShardStats::vector_set`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VectorSetInfo {
    pub tag: u64,
    pub model: String,
    pub dimension: usize,
    /// Live rows still without the set's vector (0: complete).
    pub missing: u64,
}

/// A live row still without the set's vector, as the re-encoder reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingRow {
    pub id: String,
    /// The batch that wrote the row (`WalOp::SetVector::version`).
    pub version: u64,
    pub text: Option<String>,
}

/// Opens the manifest's set: which rows have a vector is read back from the file.
pub(crate) fn open(dir: &std::path::Path, m: &Manifest, rows: &Rows) -> Result<Option<SetWriter>> {
    let Some(meta) = m.vector_set.clone() else {
        return Ok(None);
    };
    let store = SetStore::open(dir.join(&meta.file), meta.dimension, m.rows, false)?;
    let mut set = SetWriter {
        model: Arc::from(meta.model.as_str()),
        meta,
        store,
        have: Vec::new(),
        missing: 0,
    };
    let view = set.store.view(m.rows);
    for row in 0..view.rows() {
        if view.get(row).iter().any(|&x| x != 0.0) {
            set.mark(row);
        } else if rows.is_live(row) {
            set.missing += 1;
        }
    }
    Ok(Some(set))
}

/// Checks a batch against the shard's set before anything is logged (a refusal
/// writes nothing and poisons nothing); the same on a primary and a backup at the
/// same log position.
pub(crate) fn check(w: &Writer, dim: usize, batch: &WalBatch) -> Result<()> {
    let refuse = |why: String| Err(ShardError::VectorSet(why));
    let set = w.set.as_ref();
    for (i, op) in batch.ops.iter().enumerate() {
        match op {
            WalOp::Upsert { id, vector, .. } => {
                if vector.len() != dim {
                    return Err(ShardError::invalid_doc(
                        id,
                        format!(
                            "vector has dimension {}, the collection's is {dim}",
                            vector.len()
                        ),
                    ));
                }
                if let Some(s) = set {
                    let paired = matches!(batch.ops.get(i + 1),
                        Some(WalOp::SetVector { tag, id: next, version: 0, .. })
                            if *tag == s.meta.tag && next == id);
                    if !paired {
                        return refuse(format!(
                            "the collection is being re-embedded (operation {}): every upsert \
                             must carry the new model's vector too; retry",
                            s.meta.tag
                        ));
                    }
                }
            }
            WalOp::SetBegin { tag, .. } => {
                if let Some(s) = set.filter(|s| s.meta.tag != *tag) {
                    return refuse(format!(
                        "operation {}'s vector set exists; one re-embed at a time",
                        s.meta.tag
                    ));
                }
            }
            WalOp::SetVector {
                tag, id, vector, ..
            } => match set {
                Some(s) if s.meta.tag == *tag => {
                    if vector.len() != s.meta.dimension {
                        return Err(ShardError::invalid_doc(
                            id,
                            format!(
                                "the vector set's vector has dimension {}, the set's is {}",
                                vector.len(),
                                s.meta.dimension
                            ),
                        ));
                    }
                }
                _ => {
                    return refuse(format!(
                        "no vector set of operation {tag} here (the re-embed ended); retry"
                    ))
                }
            },
            WalOp::SetCommit { tag } => match set {
                Some(s) if s.meta.tag == *tag && s.missing == 0 => {}
                Some(s) if s.meta.tag == *tag => {
                    return refuse(format!(
                        "{} live documents still lack the new model's vector",
                        s.missing
                    ))
                }
                _ => return refuse(format!("no vector set of operation {tag} to commit")),
            },
            WalOp::Delete { .. }
            | WalOp::Compact
            | WalOp::Retain { .. }
            | WalOp::SetDrop { .. } => {}
        }
    }
    Ok(())
}

/// The rows a batch's re-encodings (`SetVector` with a version) write, resolved
/// before the batch is staged: `id`'s live row if batch `version` wrote it and it has
/// no vector yet. One entry per op (`None` for every other op).
pub(crate) fn targets(w: &Writer, st: &State, batch: &WalBatch) -> Result<Vec<Option<u64>>> {
    let mut out = Vec::with_capacity(batch.ops.len());
    for op in &batch.ops {
        let target = match (op, &w.set) {
            (
                WalOp::SetVector {
                    tag, id, version, ..
                },
                Some(s),
            ) if *version != 0 && s.meta.tag == *tag => match st.rows.get(id) {
                Some(row) if !s.has(row) && written_by(&st.docs, &st.rows, row)? == *version => {
                    Some(row)
                }
                _ => None,
            },
            _ => None,
        };
        out.push(target);
    }
    Ok(out)
}

pub(crate) fn written_by(docs: &DocsReader, rows: &Rows, row: u64) -> Result<u64> {
    match docs.read_at(rows.doc_offset(row))? {
        SegmentEntry::Put { seq, .. } => Ok(seq),
        SegmentEntry::Delete { .. } => Err(ShardError::Corrupt {
            file: docs.path().to_owned(),
            offset: rows.doc_offset(row),
            reason: format!("row {row} points at a delete record"),
        }),
    }
}

/// Starts the set (`SetBegin`): an empty file for the shard's rows; every live row
/// lacks its vector. The same tag again (a replay) starts it over.
pub(crate) fn begin(
    dir: &std::path::Path,
    w: &mut Writer,
    live: usize,
    tag: u64,
    model: &str,
    dimension: usize,
) -> Result<()> {
    if w.set.as_ref().is_some_and(|s| s.meta.tag == tag) {
        return Ok(());
    }
    let meta = VectorSetMeta {
        tag,
        model: model.to_owned(),
        dimension,
        file: vector_set_file(tag),
    };
    let rows = w.vectors.view().rows();
    let store = SetStore::open(dir.join(&meta.file), dimension, rows, true)?;
    w.set = Some(SetWriter {
        model: Arc::from(model),
        meta,
        store,
        have: Vec::new(),
        missing: live as u64,
    });
    Ok(())
}

/// Publishing a row put: `old` (the id's previous live row) died and `row` is new;
/// `set` (written in the same batch) marks it.
pub(crate) fn on_put(w: &mut Writer, old: Option<u64>, row: u64) {
    if let Some(s) = w.set.as_mut() {
        if old.is_some_and(|o| !s.has(o)) {
            s.missing -= 1;
        }
        if !s.has(row) {
            s.missing += 1;
        }
    }
}

/// Publishing a delete of live row `row`.
pub(crate) fn on_delete(w: &mut Writer, row: u64) {
    if let Some(s) = w.set.as_mut() {
        if !s.has(row) {
            s.missing -= 1;
        }
    }
}

/// Publishing a set vector written to live row `row`.
pub(crate) fn on_vector(w: &mut Writer, row: u64) {
    if let Some(s) = w.set.as_mut() {
        if !s.has(row) {
            s.mark(row);
            s.missing -= 1;
        }
    }
}

impl Shard {
    /// The shard's vector set, if a re-embed holds one.
    pub fn vector_set(&self) -> Option<VectorSetInfo> {
        self.inner.state.read().set.as_ref().map(SetView::info)
    }

    /// The model the stored vectors come from ("" until a re-embed names it).
    pub fn model(&self) -> String {
        self.inner.state.read().model.to_string()
    }

    /// Which vectors answer a query encoded by `model` (its content hash): `None` the
    /// stored ones, `Some(tag)` the re-embed's set. An empty hash (a client's own
    /// vector, or a node before issue 21) means the stored ones. Refused when neither
    /// holds that model's vectors: a query vector never meets another model's.
    pub fn set_for_model(&self, model: &str) -> Result<Option<u64>> {
        let st = self.inner.state.read();
        if model.is_empty() || *st.model == *model {
            return Ok(None);
        }
        match &st.set {
            Some(s) if *s.model == *model => Ok(Some(s.tag)),
            _ if st.model.is_empty() && st.set.is_none() => Ok(None),
            _ => Err(ShardError::VectorSet(format!(
                "this replica holds vectors of model {} {}, not of the query's model {model}",
                if st.model.is_empty() {
                    "(unnamed)"
                } else {
                    &st.model
                },
                st.set
                    .as_ref()
                    .map_or(String::new(), |s| format!("and {}", s.model)),
            ))),
        }
    }

    /// Up to `max` live rows from row `from` on that lack the set's vector, with where
    /// the scan stopped (the next call's `from`; the shard's row count when done).
    /// Rows written after the set began always have theirs, so one pass from row 0
    /// finds every row the re-encoder must encode.
    pub fn set_pending(&self, tag: u64, from: u64, max: usize) -> Result<(Vec<PendingRow>, u64)> {
        let (picked, docs, next) = {
            let w = self.inner.writer.lock();
            let Some(s) = w.set.as_ref().filter(|s| s.meta.tag == tag) else {
                return Err(ShardError::VectorSet(format!(
                    "no vector set of operation {tag} here"
                )));
            };
            let st = self.inner.state.read();
            let end = st.rows.len();
            let mut picked = Vec::new();
            let mut row = from.min(end);
            while row < end && picked.len() < max {
                if st.rows.is_live(row) && !s.has(row) {
                    picked.push((row, st.rows.doc_offset(row)));
                }
                row += 1;
            }
            (picked, st.docs.clone(), row)
        };
        let mut out = Vec::with_capacity(picked.len());
        for (_, offset) in picked {
            if let SegmentEntry::Put { id, seq, text, .. } = docs.read_at(offset)? {
                out.push(PendingRow {
                    id,
                    version: seq,
                    text,
                });
            }
        }
        Ok((out, next))
    }

    /// Live documents stored without text (a re-embed cannot encode them: it refuses
    /// up front, saying how many).
    pub fn live_without_text(&self) -> Result<u64> {
        let (offsets, docs) = {
            let st = self.inner.state.read();
            let offsets: Vec<u64> = (0..st.rows.len())
                .filter(|&r| st.rows.is_live(r))
                .map(|r| st.rows.doc_offset(r))
                .collect();
            (offsets, st.docs.clone())
        };
        let map = docs.map()?;
        let data: &[u8] = map.as_deref().unwrap_or_default();
        let mut n = 0;
        for offset in offsets {
            let mut at = data.get(offset as usize..).unwrap_or_default();
            let payload =
                super::record::read_one(&mut at).map_err(|reason| ShardError::Corrupt {
                    file: docs.path().to_owned(),
                    offset,
                    reason,
                })?;
            if let Ok(SegmentEntry::Put { text: None, .. }) =
                super::storage::decode::<SegmentEntry>(&payload)
            {
                n += 1;
            }
        }
        Ok(n)
    }
}
