//! A rebuild's generations (issue 21): one built beside the serving generation
//! ("staged"), checked by a shadow gate against the serving one and exact search,
//! switched to when the cluster says so, the one it replaced kept ("previous") until
//! the rebuild is committed, so a rollback serves it again at once.
//!
//! Every step is one manifest write under the writer's lock, then the in-memory swap
//! (as `swap_in`): after a crash the manifest names complete, checksummed files, and
//! readers see the old or the new serving generation, never a mix. A generation is
//! named by its tag, the cluster operation that built it, so the node's side needs no
//! generation ids (replicas number their own automatic rebuilds).
//!
//! The gate replays the shard's recent real queries (a ring of [`RECENT_QUERIES`]) and
//! stored vectors as queries (their own row left out of both answers), paired: each
//! query's recall@k against an exact scan, under the staged generation with its search
//! parameters and under the serving one with its own. It asks queries in rounds until
//! the paired difference's 95% interval is within half the margin or clear of it (at
//! least [`GateConfig::min_queries`], at most `max_queries`).

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::error::{Result, ShardError};
use super::manifest::{GenerationMeta, Manifest};
use super::{load_generation, Generation, GenerationInfo, SearchMode, SearchParams, Shard, State};
use super::{IvfPqParams, Work};

/// Query vectors a shard remembers for a rebuild's gate.
pub const RECENT_QUERIES: usize = 256;

/// What a rebuild's gate compares (issue 21).
#[derive(Clone, Debug)]
pub struct GateConfig {
    pub k: usize,
    /// The staged generation may lose at most this much recall@k.
    pub margin: f64,
    /// Search parameters under the serving generation and under the staged one.
    pub serving: (Option<usize>, Option<usize>),
    pub staged: (Option<usize>, Option<usize>),
    pub min_queries: usize,
    pub max_queries: usize,
    pub seed: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            k: 10,
            margin: 0.01,
            serving: (None, None),
            staged: (None, None),
            min_queries: 200,
            max_queries: 2000,
            seed: 0x5eed,
        }
    }
}

/// What the gate measured, and its decision.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GateReport {
    pub k: usize,
    pub queries: usize,
    /// Of which real queries from the ring (the rest stored vectors).
    pub recent_queries: usize,
    pub recall_serving: f64,
    pub recall_staged: f64,
    /// Mean of staged minus serving, per query, and its standard error.
    pub difference: f64,
    pub stderr: f64,
    pub margin: f64,
    pub passed: bool,
}

impl std::fmt::Display for GateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recall@{} {:.4} -> {:.4} (difference {:+.4} ± {:.4} s.e., margin {}, {} queries of which {} recent)",
            self.k,
            self.recall_serving,
            self.recall_staged,
            self.difference,
            self.stderr,
            self.margin,
            self.queries,
            self.recent_queries
        )
    }
}

/// Pure: whether the paired differences so far settle the gate (enough queries, and
/// the interval either tight or clear of the margin).
pub fn gate_settled(diffs: &[f64], margin: f64, min: usize, max: usize) -> bool {
    let n = diffs.len();
    if n >= max {
        return true;
    }
    if n < min {
        return false;
    }
    let (mean, se) = mean_se(diffs);
    1.96 * se <= margin / 2.0 || (mean + margin).abs() > 1.96 * se
}

fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Loads a manifest's staged and kept generations into `state`; one that does not
/// load is dropped from the manifest (written at the next checkpoint) with a warning.
pub(crate) fn load_kept(dir: &Path, manifest: &mut Manifest, state: &mut State) {
    for (meta, held) in [
        (&mut manifest.staged, &mut state.staged),
        (&mut manifest.previous, &mut state.previous),
    ] {
        if let Some(m) = meta.clone() {
            match load_generation(dir, &m) {
                Ok(g) => *held = Some(Arc::new(g)),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), generation = m.id, error = %e, "a rebuild's kept generation does not load; dropped");
                    *meta = None;
                }
            }
        }
    }
}

impl Shard {
    /// Builds a generation with `params` beside the serving one, for the cluster
    /// operation `tag` (replacing a staged one of an earlier operation).
    pub fn build_staged(
        &self,
        params: IvfPqParams,
        sample: usize,
        tag: u64,
    ) -> Result<GenerationInfo> {
        self.build(params, sample.max(1), Some(tag))
    }

    /// Makes a built generation (its files in the directory, fsynced) the staged one.
    pub(crate) fn stage_in(&self, meta: GenerationMeta, generation: Generation) -> Result<()> {
        let gone = {
            let mut w = self.inner.writer.lock();
            self.check_writable()?;
            w.manifest.next_generation = w.manifest.next_generation.max(meta.id + 1);
            let old = w.manifest.staged.replace(meta);
            w.manifest.store(&self.inner.dir)?;
            self.inner.state.write().staged = Some(Arc::new(generation));
            old.map(|o| w.manifest.unshared_files(&o))
        };
        self.remove_files(gone.unwrap_or_default())
    }

    /// The staged generation of operation `tag` serves; the serving one is kept as
    /// the previous (the one kept before is deleted). Already switched: nothing to do.
    /// Refused when no generation of `tag` is staged here.
    pub fn switch_staged(&self, tag: u64) -> Result<()> {
        let _claim = self.claim()?;
        let gone = {
            let mut w = self.inner.writer.lock();
            self.check_writable()?;
            if w.manifest.serving.as_ref().is_some_and(|g| g.tag == tag) {
                return Ok(());
            }
            if w.manifest.staged.as_ref().is_none_or(|g| g.tag != tag) {
                return Err(ShardError::GenerationRefused(format!(
                    "no generation of operation {tag} is staged here"
                )));
            }
            let m = &mut w.manifest;
            let dropped = m.previous.take();
            m.previous = m.serving.take();
            m.serving = m.staged.take();
            m.store(&self.inner.dir)?;
            let mut st = self.inner.state.write();
            let st = &mut *st;
            st.previous = st.serving.take();
            st.serving = st.staged.take();
            dropped.map(|o| w.manifest.unshared_files(&o))
        };
        tracing::info!(dir = %self.inner.dir.display(), tag, "switched to the rebuild's generation");
        self.remove_files(gone.unwrap_or_default())
    }

    /// Undoes operation `tag` here: a switched generation gives way to the kept one (and
    /// is deleted), a staged one is deleted. Nothing of `tag` held: nothing to do.
    /// Refused when `tag`'s generation serves and none was kept.
    pub fn roll_back(&self, tag: u64) -> Result<()> {
        let dropped = self.drop_generations(|m, st| {
            let mut gone = Vec::new();
            if m.staged.as_ref().is_some_and(|g| g.tag == tag) {
                gone.extend(m.staged.take());
                st.staged = None;
            }
            if m.serving.as_ref().is_some_and(|g| g.tag == tag) {
                if m.previous.is_none() {
                    return Err(ShardError::GenerationRefused(format!(
                        "operation {tag}'s generation serves here and none was kept to roll back to"
                    )));
                }
                gone.extend(m.serving.take());
                m.serving = m.previous.take();
                st.serving = st.previous.take();
            }
            Ok(gone)
        })?;
        if dropped {
            tracing::info!(dir = %self.inner.dir.display(), tag, "rolled back the rebuild's generation");
        }
        Ok(())
    }

    /// Ends operation `tag` here for good: the generation its switch replaced is deleted
    /// (a staged one of `tag` too, had it never switched).
    pub fn commit(&self, tag: u64) -> Result<()> {
        self.drop_generations(|m, st| {
            let mut gone = Vec::new();
            if m.serving.as_ref().is_some_and(|g| g.tag == tag) {
                gone.extend(m.previous.take());
                st.previous = None;
            }
            if m.staged.as_ref().is_some_and(|g| g.tag == tag) {
                gone.extend(m.staged.take());
                st.staged = None;
            }
            Ok(gone)
        })
        .map(drop)
    }

    /// Under the build claim and the writer: `take` moves generations out of the
    /// manifest and the state (returning the ones it dropped); the manifest is stored,
    /// then the dropped generations' files no other generation names are deleted.
    /// Returns whether anything was dropped.
    fn drop_generations(
        &self,
        take: impl FnOnce(&mut Manifest, &mut State) -> Result<Vec<GenerationMeta>>,
    ) -> Result<bool> {
        let _claim = self.claim()?;
        let files = {
            let mut w = self.inner.writer.lock();
            self.check_writable()?;
            let gone = take(&mut w.manifest, &mut self.inner.state.write())?;
            if gone.is_empty() {
                return Ok(false);
            }
            w.manifest.store(&self.inner.dir)?;
            gone.iter()
                .flat_map(|o| w.manifest.unshared_files(o))
                .collect::<Vec<_>>()
        };
        self.remove_files(files)?;
        Ok(true)
    }

    /// The shard's build claim for a generation step (a build or a compaction holds
    /// it: the step waits for them, as they would for it).
    fn claim(&self) -> Result<impl Drop + '_> {
        struct Claim<'a>(&'a Shard);
        impl Drop for Claim<'_> {
            fn drop(&mut self) {
                *self.0.inner.building.lock() = None;
            }
        }
        let mut b = self.inner.building.lock();
        if let Some(work) = *b {
            return Err(work.busy());
        }
        *b = Some(Work::Build(0));
        Ok(Claim(self))
    }

    pub(crate) fn remember_query(&self, query: &[f32]) {
        let mut r = self.inner.recent.lock();
        // A full ring reuses its oldest buffer: no allocation per search once warm.
        let mut v = if r.len() >= RECENT_QUERIES {
            r.pop_front().unwrap_or_default()
        } else {
            Vec::new()
        };
        v.clear();
        v.extend_from_slice(query);
        r.push_back(v);
    }

    /// The shadow gate for operation `tag`'s staged generation (see the module's
    /// comment). Refused when none is staged.
    pub fn gate(&self, tag: u64, c: &GateConfig) -> Result<GateReport> {
        let staged = self.inner.state.read().staged.clone();
        let Some(staged) = staged.filter(|g| g.info.tag == tag) else {
            return Err(ShardError::GenerationRefused(format!(
                "no generation of operation {tag} is staged here"
            )));
        };
        // A re-embed's generation indexes its vector set: each stored row asks with its
        // vector of each model, and the ring's queries (the old model's) are not used.
        let over_set = self
            .inner
            .state
            .read()
            .set
            .as_ref()
            .is_some_and(|s| s.tag == tag);
        let recent: Vec<Vec<f32>> = if over_set {
            Vec::new()
        } else {
            let r = self.inner.recent.lock();
            r.iter().rev().take(c.max_queries / 2).cloned().collect()
        };
        let recent_n = recent.len();
        // Stored vectors as queries: live rows in a seeded order.
        let rows = self.inner.state.read().rows.len();
        let mut picks = Vec::new();
        if rows > 0 {
            let mut x = c.seed | 1;
            let want = c.max_queries.saturating_sub(recent_n).min(rows as usize);
            let mut tries = 0;
            while picks.len() < want && tries < 4 * want + 16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                picks.push(x % rows);
                tries += 1;
            }
            picks.sort_unstable();
            picks.dedup();
            // Back into a seeded order (sorted only to drop repeats).
            let n = picks.len();
            for i in (1..n).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                picks.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        let mut diffs = Vec::new();
        let (mut sum_old, mut sum_new) = (0.0, 0.0);
        let mut stored = picks.into_iter();
        let mut recent = recent.into_iter();
        while !gate_settled(&diffs, c.margin, c.min_queries, c.max_queries) {
            let (query, query_set, own) = match recent.next() {
                Some(q) => (q, None, None),
                None => {
                    let Some(row) = stored.next() else { break };
                    let st = self.inner.state.read();
                    if row >= st.rows.len() || !st.rows.is_live(row) {
                        continue;
                    }
                    let in_set = match &st.set {
                        Some(s) if over_set && row < s.vectors.rows() => {
                            Some(s.vectors.get(row).to_vec())
                        }
                        _ => None,
                    };
                    if over_set && in_set.is_none() {
                        continue;
                    }
                    (
                        st.vectors.get(row).to_vec(),
                        in_set,
                        Some(st.rows.id(row).to_owned()),
                    )
                }
            };
            let set = (over_set, query_set.as_deref());
            let Some((old, new)) = self.gate_one(&query, set, own.as_deref(), &staged, c)? else {
                continue;
            };
            sum_old += old;
            sum_new += new;
            diffs.push(new - old);
        }
        let n = diffs.len();
        let (difference, stderr) = mean_se(&diffs);
        let nf = n.max(1) as f64;
        Ok(GateReport {
            k: c.k,
            queries: n,
            recent_queries: recent_n.min(n),
            recall_serving: if n == 0 { 1.0 } else { sum_old / nf },
            recall_staged: if n == 0 { 1.0 } else { sum_new / nf },
            difference,
            stderr,
            margin: c.margin,
            passed: difference >= -c.margin,
        })
    }

    /// One query's recall@k under the serving and the staged generation, against an
    /// exact scan; `own` (a stored vector's id) is left out of all three. `None`: the
    /// shard has no other live row.
    /// `set`: whether the staged generation indexes the re-embed's vector set, and the
    /// query's vector in it (the staged generation and its exact answer use it).
    fn gate_one(
        &self,
        query: &[f32],
        (over_set, query_set): (bool, Option<&[f32]>),
        own: Option<&str>,
        staged: &Arc<Generation>,
        c: &GateConfig,
    ) -> Result<Option<(f64, f64)>> {
        let k = c.k + usize::from(own.is_some());
        let tag = staged.info.tag;
        let run = |query: &[f32],
                   g: Option<Arc<Generation>>,
                   mode: SearchMode,
                   (nprobe, refine): (Option<usize>, Option<usize>),
                   set: Option<u64>|
         -> Result<Vec<Arc<str>>> {
            let p = SearchParams {
                k,
                nprobe,
                refine_factor: refine,
                mode,
                set,
                filter: None,
                plan: None,
            };
            loop {
                let layout = self.inner.state.read().layout;
                if let Some(r) = self.search_in(query, &p, g.clone(), layout)? {
                    let mut ids: Vec<Arc<str>> = r.hits.into_iter().map(|h| h.id).collect();
                    ids.retain(|id| Some(&**id) != own);
                    ids.truncate(c.k);
                    return Ok(ids);
                }
            }
        };
        let exact = run(query, None, SearchMode::Exact, (None, None), None)?;
        if exact.is_empty() {
            return Ok(None);
        }
        let serving = self.inner.state.read().serving.clone();
        let old = run(query, serving, SearchMode::Rerank, c.serving, None)?;
        let (new, exact_new) = match (over_set, query_set) {
            (true, Some(q)) => (
                run(
                    q,
                    Some(staged.clone()),
                    SearchMode::Rerank,
                    c.staged,
                    Some(tag),
                )?,
                run(q, None, SearchMode::Exact, (None, None), Some(tag))?,
            ),
            (true, None) => return Ok(None),
            (false, _) => (
                run(
                    query,
                    Some(staged.clone()),
                    SearchMode::Rerank,
                    c.staged,
                    None,
                )?,
                exact.clone(),
            ),
        };
        if exact_new.is_empty() {
            return Ok(None);
        }
        let recall = |got: &[Arc<str>], exact: &[Arc<str>]| {
            got.iter().filter(|id| exact.contains(id)).count() as f64 / exact.len() as f64
        };
        Ok(Some((recall(&old, &exact), recall(&new, &exact_new))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_settles_when_the_interval_is_tight_or_clear_of_the_margin() {
        assert!(!gate_settled(&[0.0; 10], 0.01, 200, 2000), "too few");
        assert!(gate_settled(&[0.0; 200], 0.01, 200, 2000), "no difference");
        // A clear loss: every query loses 0.3.
        assert!(gate_settled(&[-0.3; 200], 0.01, 200, 2000));
        // Noisy, centred on the margin: goes on until the cap.
        let noisy: Vec<f64> = (0..400)
            .map(|i| if i % 2 == 0 { 0.19 } else { -0.21 })
            .collect();
        assert!(!gate_settled(&noisy, 0.01, 200, 2000));
        assert!(gate_settled(&noisy, 0.01, 200, 400), "the cap ends it");
    }
}
