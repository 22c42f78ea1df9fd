//! A re-embed's work on a shard's primary (issue 21; docs/adr/0004-re-embedding.md):
//! begin the shard's vector set, re-encode its stored texts with the new model into
//! it, and at the end log its commit or drop. Everything goes through the primary's
//! replicated log (`WriteOp::Set*`), so each document is encoded once per shard and
//! its backups receive the vectors by replication; the engine drops a re-encoding that
//! raced a client's update or delete, on every replica alike.
//!
//! The fill reads the shard's rows still without a vector in row order, encodes a
//! batch at a time and rests after each so the node's queries keep their latency: it
//! runs at most `duty` of the time (a batch that took t to encode is followed by
//! t·(1/duty − 1) of rest). It keeps no state of its own: after a restart or a primary
//! change the next primary reads which rows still lack a vector from its shard and
//! goes on; the step's build starts once none does (`rebuilds::action`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use shoal_encoder::pool::EncoderPool;
use shoal_engine::WriteOp;
use shoal_proto::coordinator as cpb;

use super::ids::ReplicaKey;
use super::replicas::Registry;
use crate::model::ModelIdentity;

/// Rows re-encoded per batch (one encoder call, one logged batch).
const BATCH_ROWS: usize = 64;

pub struct Reembeds {
    registry: Registry,
    encoders: Vec<(Arc<EncoderPool>, ModelIdentity)>,
    /// Share of the time a fill encodes (the rest it rests), 0 < duty ≤ 1.
    duty: f64,
    /// Replicas whose fill (or end) is running, by operation.
    running: Mutex<HashMap<ReplicaKey, u64>>,
    /// Why a replica's fill cannot go on (reported as its step's error).
    failed: Mutex<HashMap<ReplicaKey, (u64, String)>>,
}

impl Reembeds {
    pub fn new(
        registry: Registry,
        encoders: Vec<(Arc<EncoderPool>, ModelIdentity)>,
        duty: f64,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            encoders,
            duty: duty.clamp(0.01, 1.0),
            running: Mutex::default(),
            failed: Mutex::default(),
        })
    }

    /// The operation and error of `key`'s fill that stopped for good, if any.
    pub fn failed_op(&self, key: &ReplicaKey) -> Option<(u64, String)> {
        self.failed.lock().get(key).cloned()
    }

    fn claim(&self, key: &ReplicaKey, op: u64) -> bool {
        let mut r = self.running.lock();
        if r.contains_key(key) {
            return false;
        }
        r.insert(key.clone(), op);
        true
    }

    /// Starts filling `key`'s vector set for re-embed `op` unless it runs already.
    pub fn fill(self: &Arc<Self>, key: &ReplicaKey, op: &cpb::Operation) {
        if self.failed_op(key).is_some_and(|(o, _)| o == op.id) || !self.claim(key, op.id) {
            return;
        }
        // An earlier operation's refusal is not this one's.
        self.failed.lock().remove(key);
        let Some(model) = op.rebuild.as_ref().and_then(|r| r.model.clone()) else {
            self.running.lock().remove(key);
            return;
        };
        let (me, key, id) = (self.clone(), key.clone(), op.id);
        tokio::spawn(async move {
            let r = me.run_fill(&key, id, &model).await;
            me.running.lock().remove(&key);
            match r {
                Ok(rows) => {
                    tracing::info!(replica = %key, operation = id, rows, "re-embed: every stored document has the new model's vector")
                }
                Err(Stop::Failed(e)) => {
                    tracing::warn!(replica = %key, operation = id, error = %e, "re-embed refused");
                    me.failed.lock().insert(key, (id, e));
                }
                // Tried again at the next reconcile (a role change, a write refused).
                Err(Stop::Later(e)) => {
                    tracing::info!(replica = %key, operation = id, reason = %e, "re-embed fill paused")
                }
            }
        });
    }

    async fn run_fill(&self, key: &ReplicaKey, id: u64, m: &cpb::ModelChange) -> Result<u64, Stop> {
        let repl = self
            .registry
            .read()
            .get(key)
            .map(|h| h.repl.clone())
            .ok_or_else(|| Stop::Later("the replica closed".into()))?;
        let shard = repl.shard().map_err(|e| Stop::Later(e.to_string()))?;
        let want = m.encoder.clone().unwrap_or_default();
        let models: Vec<ModelIdentity> = self.encoders.iter().map(|(_, i)| i.clone()).collect();
        let i = crate::model::pick(
            &models,
            Some((&want.model_id, &want.content_hash)),
            m.dimension as usize,
        )
        .map_err(Stop::Failed)?;
        let encoder = self.encoders[i].0.clone();
        let write = |ops: Vec<WriteOp>| {
            let repl = repl.clone();
            async move {
                repl.write(ops, String::new(), 0)
                    .await
                    .map_err(|e| Stop::Later(e.to_string()))
            }
        };
        if shard.vector_set().is_none_or(|s| s.tag != id) {
            // Refused up front, before anything is written: a document without text
            // cannot be re-encoded.
            let s = shard.clone();
            let textless = shoal_engine::run_blocking(move || s.live_without_text())
                .await
                .map_err(|e| Stop::Later(e.to_string()))?;
            if textless > 0 {
                return Err(Stop::Failed(format!(
                    "{textless} documents of shard {key} were stored without text: a re-embed \
                     encodes stored texts (re-ingest them with text, or delete them)"
                )));
            }
            let from_model = m
                .previous
                .as_ref()
                .map_or_else(String::new, |e| e.content_hash.clone());
            write(vec![WriteOp::SetBegin {
                tag: id,
                model: want.content_hash.clone(),
                from_model,
                dimension: m.dimension as usize,
            }])
            .await?;
            tracing::info!(replica = %key, operation = id, model = %want.content_hash, "re-embed: vector set begun");
        }
        let mut from = 0;
        let mut encoded = 0u64;
        loop {
            let s = shard.clone();
            let (rows, next) =
                shoal_engine::run_blocking(move || s.set_pending(id, from, BATCH_ROWS))
                    .await
                    .map_err(|e| Stop::Later(e.to_string()))?;
            if rows.is_empty() {
                return Ok(encoded);
            }
            let t = Instant::now();
            let mut texts = Vec::with_capacity(rows.len());
            for r in &rows {
                match &r.text {
                    Some(t) if !t.trim().is_empty() => texts.push(t.clone()),
                    _ => {
                        return Err(Stop::Failed(format!(
                            "document {:?} of shard {key} has no text to re-encode",
                            r.id
                        )))
                    }
                }
            }
            let out = encoder
                .encode_counted(texts)
                .await
                .map_err(|e| Stop::Later(e.to_string()))?;
            let ops = rows
                .into_iter()
                .zip(out.vectors)
                .map(|(r, vector)| WriteOp::SetVector {
                    tag: id,
                    id: r.id,
                    version: r.version,
                    vector,
                })
                .collect::<Vec<_>>();
            let n = ops.len() as u64;
            write(ops).await?;
            encoded += n;
            metrics::counter!("shoal_reembed_rows_total").increment(n);
            if let Some(s) = shard.vector_set() {
                metrics::gauge!("shoal_reembed_rows_missing", "replica" => key.to_string())
                    .set(s.missing as f64);
            }
            from = next;
            let rest = t.elapsed().as_secs_f64() * (1.0 / self.duty - 1.0);
            if rest > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(rest.min(10.0))).await;
            }
        }
    }

    /// Logs the end of re-embed `op` on `key`'s primary: the set's commit, or its drop.
    pub fn end(self: &Arc<Self>, key: &ReplicaKey, op: u64, commit: bool) {
        if !self.claim(key, op) {
            return;
        }
        let (me, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            let repl = me.registry.read().get(&key).map(|h| h.repl.clone());
            let r = match repl {
                Some(repl) => {
                    let w = if commit {
                        WriteOp::SetCommit(op)
                    } else {
                        WriteOp::SetDrop(op)
                    };
                    repl.write(vec![w], String::new(), 0).await.map(drop)
                }
                None => Ok(()),
            };
            me.running.lock().remove(&key);
            match r {
                Ok(()) => {
                    metrics::counter!("shoal_rebuild_transitions_total", "action" => if commit { "commit_set" } else { "drop_set" }).increment(1);
                    tracing::info!(replica = %key, operation = op, commit, "re-embed's vector set ended");
                }
                Err(e) => {
                    tracing::warn!(replica = %key, operation = op, commit, error = %e, "re-embed's end not written; tried again")
                }
            }
        });
    }
}

enum Stop {
    /// The operation cannot go on here (the step fails, saying why).
    Failed(String),
    /// Not now: the next reconcile starts it again.
    Later(String),
}
