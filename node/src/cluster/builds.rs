//! Index builds as the cluster's operations ask for them (issue 18). The map holds each
//! build operation (parameters chosen once for the collection, a step per shard); this
//! node, on every map it reconciles, queues a build for each replica it hosts whose
//! shard's step is pending, and runs them under admission control: at most
//! `build_slots` at once, and only while the memory they are estimated to need
//! ([`shoal_engine::build_memory`]) fits the node's `build_memory_bytes` with the
//! builds already running. A build that does not fit waits, and its replica's heartbeat
//! report says so (`build_queued`: `shoal operations` shows the step queued); one that
//! could never fit fails its step with the figures. Nothing here waits on an RPC: the
//! step ends when the primary's heartbeat reports the new serving generation (the
//! leader commits it), or fails on its report of the error.
//!
//! The primary trains once: a backup does not build for a step but waits for it to
//! end, then fetches the primary's new generation (`FetchGeneration`, in pieces, to a
//! temp file in its directory) and takes it as built (`Shard::install_generation`,
//! which checks that their histories agree up to the last batch it covers). A fetch
//! that fails or is refused (the primary moved on, another history) falls back to a
//! local build under the same admission control. A restarted node finds the steps
//! still pending in the map and queues them again.
//!
//! Compactions (issue 19) run under the same admission control: a replica whose log
//! holds a compaction not yet done (`Shard::compaction_pending`, on every replica,
//! backups included) queues one, which takes a slot and its estimated memory
//! ([`shoal_engine::compaction_memory`]) like a build; a failed one is tried again after
//! [`COMPACT_RETRY`], counted in `shoal_compaction_failures_total`. The engine's own
//! compaction thread is off on a node's replicas (`replicas.rs` opens them manual).

use std::collections::HashMap;
use std::sync::Arc;

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use shoal_engine::{IvfPqParams, Shard};
use shoal_proto::coordinator as cpb;
use shoal_proto::replica as rpb;

use super::ids::ReplicaKey;
use super::mapview::MapView;
use super::rebuilds::{self, Action};
use super::reembeds::Reembeds;
use super::replicas::Registry;
use super::transport::{ReplicaApi, Transports};

/// One FetchGeneration call's deadline (a piece of at most 4 MiB).
const FETCH_CALL: Duration = Duration::from_secs(60);
/// How long a fetched generation waits for this backup to hold the batches it covers.
const FETCH_CATCH_UP: Duration = Duration::from_secs(60);
/// A failed compaction waits this long before the next attempt (a full disk must not
/// turn every reconcile into a rewrite).
const COMPACT_RETRY: Duration = Duration::from_secs(60);
/// A compaction that found the shard's build claim taken (a build the engine started
/// on its own) is asked again this soon.
const COMPACT_BUSY_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Queued,
    Running,
    Done,
    Failed(String),
}

/// A primary (or a replica whose fetch failed) builds; a backup fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Build,
    Fetch,
}

#[derive(Clone, Debug)]
struct Job {
    /// The build operation; 0 for a catch-up fetch (a backup holding no index while
    /// its primary serves one: a copy filled from the recent log, which ships none).
    op: u64,
    /// A catch-up fetch's generation: the one its primary reported serving.
    catch_up: u64,
    kind: Kind,
    params: IvfPqParams,
    sample: usize,
    /// Bytes reserved while it runs.
    memory: u64,
    phase: Phase,
    /// A rebuild's job (issue 21): the generation is staged beside the serving one,
    /// tagged with the operation; a primary's is gated with this configuration.
    stage: bool,
    gate: Option<shoal_engine::GateConfig>,
    /// The gate's figures once it let the generation through.
    gate_report: String,
}

/// What a replica's heartbeat says of its build (issue 18).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    pub operation: u64,
    pub queued: bool,
    pub error: String,
    /// A rebuild's primary: the gate's figures, once it let the generation through.
    pub gate: String,
}

/// A compaction a replica's log asked for, waiting for or holding a slot.
#[derive(Clone, Debug)]
struct CompactJob {
    memory: u64,
    running: bool,
    /// After a failure (or a busy shard): not started before this.
    not_before: Option<Instant>,
}

#[derive(Default)]
struct State {
    /// Replicas whose rebuild switch, commit or rollback is being written.
    transitions: std::collections::HashSet<ReplicaKey>,
    running: usize,
    reserved: u64,
    jobs: HashMap<ReplicaKey, Job>,
    compactions: HashMap<ReplicaKey, CompactJob>,
}

pub struct Builds {
    slots: usize,
    memory_bytes: u64,
    registry: Registry,
    transports: Arc<Transports>,
    /// A re-embed's fills and ends (issue 21), which a rebuild step may call for.
    reembeds: Arc<Reembeds>,
    state: Mutex<State>,
}

/// `key`'s replica here, while it is open.
fn hosted_shard(registry: &Registry, key: &ReplicaKey) -> Option<Shard> {
    registry.read().get(key).and_then(|h| h.repl.shard().ok())
}

/// Whether `key`'s replica here is a backup, and its primary (node, address).
fn primary_of(registry: &Registry, key: &ReplicaKey) -> Option<(String, String)> {
    let role = registry.read().get(key)?.repl.role()?;
    if role.is_primary {
        return None;
    }
    let addr = role
        .peers
        .iter()
        .find(|p| p.node == role.primary)?
        .addr
        .clone();
    Some((role.primary, addr))
}

/// The generation `key`'s primary serves, as the map records it (the leader commits
/// what the primary's heartbeats report; 0: none).
fn primary_generation(view: &MapView, key: &ReplicaKey) -> u64 {
    view.shards
        .get(&(key.collection.clone(), key.index))
        .map_or(0, |s| s.serving_generation)
}

/// A running build operation's parameters for `key`'s collection incarnation, and
/// whether its step for `key`'s shard is pending.
fn build_op<'a>(view: &'a MapView, key: &ReplicaKey) -> Option<(&'a cpb::Operation, bool)> {
    view.operations
        .values()
        .rev()
        .filter(|o| {
            o.kind == "build_index"
                && o.collection == key.collection
                && o.collection_id == key.collection_id
                && o.state != "cancelled"
        })
        .find(|o| o.build.is_some())
        .map(|o| {
            let pending = o.state == "running"
                && o.steps
                    .iter()
                    .any(|s| s.shard == key.index && s.state == "pending");
            (o, pending)
        })
}

#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Start,
    Wait,
    /// It could never fit this node's budget.
    Never(String),
}

/// Pure: whether a build needing `memory` starts now, with `running` builds holding
/// `reserved` bytes, `slots` at once and `budget` bytes (0: no memory limit).
fn admit_one(memory: u64, running: usize, reserved: u64, slots: usize, budget: u64) -> Admit {
    if budget > 0 && memory > budget {
        return Admit::Never(format!(
            "the build needs about {memory} bytes of memory; this node's build budget \
             (--build-memory-bytes) is {budget}"
        ));
    }
    if running >= slots || (budget > 0 && reserved + memory > budget) {
        return Admit::Wait;
    }
    Admit::Start
}

impl Builds {
    pub fn new(
        slots: usize,
        memory_bytes: u64,
        registry: Registry,
        transports: Arc<Transports>,
        reembeds: Arc<Reembeds>,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: slots.max(1),
            memory_bytes,
            registry,
            transports,
            reembeds,
            state: Mutex::default(),
        })
    }

    pub fn report(&self, key: &ReplicaKey) -> BuildReport {
        // A re-embed's fill that cannot go on fails its step (issue 21).
        let fill = self.reembeds.failed_op(key);
        let st = self.state.lock();
        if let Some((op, error)) =
            fill.filter(|(op, _)| st.jobs.get(key).is_none_or(|j| j.op < *op))
        {
            return BuildReport {
                operation: op,
                error,
                ..BuildReport::default()
            };
        }
        match st.jobs.get(key) {
            None => BuildReport::default(),
            Some(j) if j.op == 0 => BuildReport::default(),
            Some(j) => BuildReport {
                operation: j.op,
                queued: j.phase == Phase::Queued,
                error: match &j.phase {
                    Phase::Failed(e) => e.clone(),
                    _ => String::new(),
                },
                gate: match j.phase {
                    Phase::Done => j.gate_report.clone(),
                    _ => String::new(),
                },
            },
        }
    }

    /// Brings the replicas' build parameters and the queue in line with `view`, then
    /// starts what fits.
    pub fn sync(self: &Arc<Self>, view: &MapView) {
        let hosted: Vec<(ReplicaKey, shoal_engine::Shard)> = self
            .registry
            .read()
            .iter()
            .filter_map(|(k, h)| Some((k.clone(), h.repl.shard().ok()?)))
            .collect();
        {
            let mut st = self.state.lock();
            for (key, shard) in &hosted {
                let Some(c) = view.collections.get(&key.collection) else {
                    continue;
                };
                let op = build_op(view, key);
                // A rebuild that switched the collection (issue 21) chose its
                // parameters, unless a build came after it.
                let rebuilt = rebuilds::rebuild_op(view, key)
                    .filter(|r| {
                        r.rebuild
                            .as_ref()
                            .is_some_and(|x| x.phase == "switched" || x.phase == "committed")
                    })
                    .filter(|r| op.is_none_or(|(b, _)| r.id > b.id))
                    .and_then(|r| r.build.as_ref());
                // The collection's chosen parameters for every build that names none
                // (automatic rebuilds too); before any cluster build, a collection
                // that leaves nlist to shoal sizes each shard by its own rows.
                let chosen = match rebuilt.or(op.and_then(|(o, _)| o.build.as_ref())) {
                    Some(b) => Some(rebuilds::build_params(b)),
                    None => c.index.as_ref().filter(|ix| ix.nlist == 0).map(|ix| {
                        let (nlist, sample) =
                            shoal_proto::sizing::size_index(shard.len() as u64, 65_536);
                        (
                            IvfPqParams {
                                nlist: nlist as usize,
                                m: ix.pq_m as usize,
                                nbits: ix.pq_nbits as usize,
                            },
                            sample as usize,
                        )
                    }),
                };
                if let Some(p) = chosen.filter(|&p| shard.build_params() != p) {
                    shard.set_build_params(Some(p));
                }
                // The re-ranking precision likewise: the last build's, else the
                // collection's (issue 19).
                let rerank = op
                    .and_then(|(o, _)| o.build.as_ref())
                    .map(|b| b.rerank)
                    .or_else(|| c.index.as_ref().map(|ix| ix.rerank))
                    .and_then(shoal_engine::Precision::from_wire)
                    .unwrap_or_default();
                if shard.rerank() != rerank {
                    shard.set_rerank(rerank);
                }
                self.rebuild_step(&mut st, view, key, shard, c);
                let Some((o, true)) = op else {
                    continue;
                };
                let kind = match primary_of(&self.registry, key) {
                    Some(_) => Kind::Fetch,
                    None => Kind::Build,
                };
                if let Some(j) = st.jobs.get_mut(key).filter(|j| j.op >= o.id) {
                    // A replica whose role changed while its job waited: the new
                    // primary builds, a new backup fetches.
                    if j.phase == Phase::Queued {
                        j.kind = kind;
                    }
                    continue;
                }
                let (params, sample) = rebuilds::build_params(o.build.as_ref().expect("a build"));
                let memory = shoal_engine::build_memory(
                    shard.len() as u64,
                    c.dimension as usize,
                    params,
                    sample,
                );
                st.jobs.insert(
                    key.clone(),
                    Job {
                        op: o.id,
                        catch_up: 0,
                        kind,
                        params,
                        sample,
                        memory,
                        phase: Phase::Queued,
                        stage: false,
                        gate: None,
                        gate_report: String::new(),
                    },
                );
            }
            // Jobs of replicas gone, or of operations cancelled, are forgotten (a
            // running one finishes first); a queued one outlives its operation's end
            // (a backup still builds once its primary's step ended the operation), and
            // finished ones are kept while their operation runs (so none runs twice).
            for (key, shard) in &hosted {
                if st.jobs.contains_key(key) {
                    continue;
                }
                if let Some(generation) = self.catch_up_wanted(view, key, shard) {
                    tracing::info!(replica = %key, generation, "this backup serves no index while its primary does: fetching the primary's");
                    st.jobs.insert(
                        key.clone(),
                        Job {
                            op: 0,
                            catch_up: generation,
                            kind: Kind::Fetch,
                            params: shard.build_params().0,
                            sample: 0,
                            memory: 0,
                            phase: Phase::Queued,
                            stage: false,
                            gate: None,
                            gate_report: String::new(),
                        },
                    );
                }
            }
            // Compactions the replicas' logs hold and no job runs yet; jobs of replicas
            // gone are forgotten (a running one finishes first).
            for (key, shard) in &hosted {
                if shard.compaction_pending().is_some() && !st.compactions.contains_key(key) {
                    st.compactions.insert(
                        key.clone(),
                        CompactJob {
                            memory: shoal_engine::compaction_memory(shard.rows() as u64),
                            running: false,
                            not_before: None,
                        },
                    );
                }
            }
            st.compactions
                .retain(|k, j| j.running || hosted.iter().any(|(h, _)| h == k));
            // A catch-up fetch is kept until it is done, and a failed one while its
            // primary still serves that generation (tried again when it moves on).
            let primary_serving = |k: &ReplicaKey| primary_generation(view, k);
            st.jobs.retain(|k, j| {
                if j.op == 0 {
                    return j.phase == Phase::Running
                        || (hosted.iter().any(|(h, _)| h == k)
                            && match &j.phase {
                                Phase::Done => false,
                                Phase::Failed(_) => primary_serving(k) == j.catch_up,
                                _ => true,
                            });
                }
                j.phase == Phase::Running
                    || (hosted.iter().any(|(h, _)| h == k)
                        && view.operations.get(&j.op).is_some_and(|o| {
                            o.state == "running"
                                || (o.state != "cancelled" && j.phase == Phase::Queued)
                        }))
            });
        }
        self.start_fetches(view);
        self.admit();
    }

    /// Follows `key`'s collection's newest rebuild (issue 21, `rebuilds::action`):
    /// queues its staged build or fetch, or writes its switch, commit or rollback.
    fn rebuild_step(
        self: &Arc<Self>,
        st: &mut State,
        view: &MapView,
        key: &ReplicaKey,
        shard: &Shard,
        c: &cpb::Collection,
    ) {
        let Some(role) = self.registry.read().get(key).and_then(|h| h.repl.role()) else {
            return;
        };
        let op = rebuilds::rebuild_op(view, key);
        // A re-embed's vector set whose operation the view no longer shows: the
        // collection's model says how it ended (issue 21).
        if let Some(set) = shard.vector_set() {
            if role.is_primary && op.is_none_or(|o| o.id != set.tag) {
                let commit = rebuilds::orphan_set_action(&set.model, c) == Action::CommitSet;
                self.reembeds.end(key, set.tag, commit);
                return;
            }
        }
        let Some(op) = op else {
            return;
        };
        let action = rebuilds::action(op, key.index, role.is_primary, rebuilds::Held::of(shard));
        match action {
            Action::None => {}
            Action::Fill => self.reembeds.fill(key, op),
            Action::CommitSet | Action::DropSet => {
                self.reembeds.end(key, op.id, action == Action::CommitSet)
            }
            Action::Stage | Action::Fetch { .. } => {
                if st.jobs.get(key).is_some_and(|j| j.op >= op.id) {
                    return;
                }
                let (Some(b), Some(r)) = (op.build.as_ref(), op.rebuild.as_ref()) else {
                    return;
                };
                let (params, sample) = rebuilds::build_params(b);
                let stage = action == Action::Stage;
                let memory = if stage {
                    shoal_engine::build_memory(
                        shard.len() as u64,
                        c.dimension as usize,
                        params,
                        sample,
                    )
                } else {
                    0
                };
                let previous = r.previous.unwrap_or_default();
                st.jobs.insert(
                    key.clone(),
                    Job {
                        op: op.id,
                        catch_up: 0,
                        kind: if stage { Kind::Build } else { Kind::Fetch },
                        params,
                        sample,
                        memory,
                        phase: Phase::Queued,
                        stage: true,
                        gate: stage.then(|| rebuilds::gate_config(op, &previous)),
                        gate_report: String::new(),
                    },
                );
            }
            Action::Switch | Action::Commit | Action::RollBack => {
                if !st.transitions.insert(key.clone()) {
                    return;
                }
                let (me, key, shard, id) = (self.clone(), key.clone(), shard.clone(), op.id);
                tokio::task::spawn_blocking(move || {
                    let r = match action {
                        Action::Switch => shard.switch_staged(id),
                        Action::Commit => shard.commit(id),
                        _ => shard.roll_back(id),
                    };
                    match r {
                        Ok(()) => {
                            metrics::counter!("shoal_rebuild_transitions_total", "action" => format!("{action:?}").to_lowercase()).increment(1);
                            tracing::info!(replica = %key, operation = id, ?action, "rebuild step written");
                        }
                        // Tried again at the next reconcile (a build holding the claim).
                        Err(e) => {
                            tracing::warn!(replica = %key, operation = id, ?action, error = %e, "rebuild step not written")
                        }
                    }
                    me.state.lock().transitions.remove(&key);
                });
            }
        }
    }

    /// Pure but for reading the replica: the generation a backup that serves no index
    /// should fetch from its primary (which reports serving it), when it is caught up
    /// and no build operation is pending for its shard. Only a replica with no index
    /// at all: replicas number their own automatic rebuilds, so generation ids of two
    /// replicas that built apart do not compare.
    fn catch_up_wanted(&self, view: &MapView, key: &ReplicaKey, shard: &Shard) -> Option<u64> {
        if shard.stats().serving.is_some() {
            return None;
        }
        let caught_up = self
            .registry
            .read()
            .get(key)
            .is_some_and(|h| h.repl.caught_up());
        primary_of(&self.registry, key)?;
        if !caught_up || build_op(view, key).is_some_and(|(_, pending)| pending) {
            return None;
        }
        Some(primary_generation(view, key)).filter(|&g| g > 0)
    }

    /// Starts the fetch of each backup's job whose step ended with its primary's new
    /// generation (or, for a catch-up, the one its primary serves); forgets one whose
    /// step failed.
    fn start_fetches(self: &Arc<Self>, view: &MapView) {
        let mut st = self.state.lock();
        let waiting: Vec<(ReplicaKey, u64)> = st
            .jobs
            .iter()
            .filter(|(_, j)| j.kind == Kind::Fetch && j.phase == Phase::Queued)
            .map(|(k, j)| (k.clone(), j.op))
            .collect();
        for (key, op) in waiting {
            let step = view
                .operations
                .get(&op)
                .and_then(|o| o.steps.iter().find(|s| s.shard == key.index));
            let generation = match step {
                _ if op == 0 => st.jobs[&key].catch_up,
                Some(s) if (s.state == "done" || s.state == "staged") && s.generation > 0 => {
                    s.generation
                }
                Some(s) if s.state == "failed" => {
                    st.jobs.remove(&key);
                    continue;
                }
                _ => continue,
            };
            let (Some((node, addr)), Some(shard)) = (
                primary_of(&self.registry, &key),
                hosted_shard(&self.registry, &key),
            ) else {
                continue;
            };
            let stage = st.jobs[&key].stage;
            let held = shard.stats();
            let done = if stage {
                held.staged.is_some_and(|g| g.tag == op)
                    || held.serving.is_some_and(|g| g.tag == op)
            } else {
                held.serving.is_some_and(|g| g.id >= generation)
            };
            if done {
                st.jobs.get_mut(&key).expect("listed").phase = Phase::Done;
                continue;
            }
            let from = match self.transports.to(&node, &addr) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(replica = %key, error = %e, "primary unreachable; fetch waits");
                    continue;
                }
            };
            st.jobs.get_mut(&key).expect("listed").phase = Phase::Running;
            tracing::info!(replica = %key, operation = op, generation, primary = %node, "fetching the primary's index generation");
            let me = self.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let r = fetch_generation(&*from, &key, &shard, generation, stage).await;
                let mut st = me.state.lock();
                let Some(job) = st.jobs.get_mut(&key).filter(|j| j.op == op) else {
                    return;
                };
                match r {
                    Ok(bytes) => {
                        metrics::counter!("shoal_index_generations_fetched_total").increment(1);
                        tracing::info!(replica = %key, operation = op, generation, bytes, took_ms = t.elapsed().as_millis() as u64, "index generation taken from the primary");
                        job.phase = Phase::Done;
                    }
                    Err(e) if op == 0 => {
                        // Serves by exact scan meanwhile; tried again once the primary
                        // serves another generation.
                        tracing::warn!(replica = %key, generation, error = %e, "fetching the primary's index failed");
                        job.phase = Phase::Failed(e.to_string());
                    }
                    Err(e) => {
                        // Built here instead, under admission control.
                        tracing::warn!(replica = %key, operation = op, generation, error = %e, "fetching the primary's index failed; building here");
                        job.kind = Kind::Build;
                        job.phase = Phase::Queued;
                        drop(st);
                        me.admit();
                    }
                }
            });
        }
    }

    /// Starts queued builds while a slot is free and their memory fits.
    fn admit(self: &Arc<Self>) {
        let mut st = self.state.lock();
        let mut queued: Vec<(u64, ReplicaKey)> = st
            .jobs
            .iter()
            .filter(|(_, j)| j.kind == Kind::Build && j.phase == Phase::Queued)
            .map(|(k, j)| (j.op, k.clone()))
            .collect();
        queued.sort();
        let mut build_waits = false;
        for (_, key) in queued {
            let j = st.jobs.get(&key).expect("listed").clone();
            match admit_one(
                j.memory,
                st.running,
                st.reserved,
                self.slots,
                self.memory_bytes,
            ) {
                Admit::Start => {}
                // Waits for a running build to give its slot or memory back (in order:
                // a later, smaller one does not overtake it, nor does a compaction).
                Admit::Wait => {
                    build_waits = true;
                    break;
                }
                Admit::Never(e) => {
                    tracing::warn!(replica = %key, operation = j.op, "{e}");
                    st.jobs.get_mut(&key).expect("listed").phase = Phase::Failed(e);
                    continue;
                }
            }
            let Some(shard) = hosted_shard(&self.registry, &key) else {
                continue;
            };
            st.running += 1;
            st.reserved += j.memory;
            st.jobs.get_mut(&key).expect("listed").phase = Phase::Running;
            tracing::info!(replica = %key, operation = j.op, nlist = j.params.nlist, train_sample = j.sample, memory = j.memory, "index build started");
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                let build = || {
                    if j.stage {
                        // A rebuild's (issue 21): beside the serving generation; one
                        // staged before a restart is gated again, not rebuilt.
                        match shard.stats().staged.filter(|g| g.tag == j.op) {
                            Some(g) => Ok(g),
                            None => shard.build_staged(j.params, j.sample, j.op),
                        }
                    } else {
                        shard.set_build_params(Some((j.params, j.sample)));
                        shard.rebuild(None)
                    }
                };
                let mut r = build();
                // A compaction holds the shard's build claim: the build follows it
                // (the slot stays taken meanwhile).
                while let Err(shoal_engine::ShardError::CompactionInProgress(_)) = r {
                    std::thread::sleep(Duration::from_millis(500));
                    r = build();
                }
                let mut gate_report = String::new();
                if let (Ok(g), Some(gate)) = (&r, &j.gate) {
                    let t = Instant::now();
                    match shard.gate(j.op, gate) {
                        Ok(report) => {
                            metrics::histogram!("shoal_rebuild_gate_seconds")
                                .record(t.elapsed().as_secs_f64());
                            tracing::info!(replica = %key, operation = j.op, generation = g.id, passed = report.passed, "rebuild gate: {report}");
                            if report.passed {
                                gate_report = report.to_string();
                            } else {
                                r = Err(shoal_engine::ShardError::GenerationRefused(format!(
                                    "the gate refused the new generation: {report}"
                                )));
                            }
                        }
                        Err(e) => r = Err(e),
                    }
                }
                let phase = match r {
                    Ok(g) => {
                        tracing::info!(replica = %key, operation = j.op, generation = g.id, staged = j.stage, "index build done");
                        Phase::Done
                    }
                    // A build already running (an automatic one, with these parameters)
                    // serves the step when its generation is served.
                    Err(shoal_engine::ShardError::BuildInProgress(_)) => Phase::Done,
                    Err(e) => Phase::Failed(e.to_string()),
                };
                {
                    let mut st = me.state.lock();
                    st.running -= 1;
                    st.reserved -= j.memory;
                    if let Some(job) = st.jobs.get_mut(&key).filter(|x| x.op == j.op) {
                        job.phase = phase;
                        job.gate_report = gate_report;
                    }
                }
                me.admit();
            });
        }
        // Builds first, in operation order; then compactions, in the slots left.
        if !build_waits {
            self.admit_compactions(&mut st);
        }
    }

    fn admit_compactions(self: &Arc<Self>, st: &mut State) {
        let now = Instant::now();
        let ready: Vec<ReplicaKey> = st
            .compactions
            .iter()
            .filter(|(_, j)| !j.running && j.not_before.is_none_or(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in ready {
            let memory = st.compactions[&key].memory;
            match admit_one(
                memory,
                st.running,
                st.reserved,
                self.slots,
                self.memory_bytes,
            ) {
                Admit::Start => {}
                Admit::Wait => break,
                // Dead rows only grow: a shard too big for the budget compacts alone.
                Admit::Never(_) if st.running == 0 => {}
                Admit::Never(_) => break,
            }
            let Some(shard) = hosted_shard(&self.registry, &key) else {
                st.compactions.remove(&key);
                continue;
            };
            st.running += 1;
            st.reserved += memory;
            st.compactions.get_mut(&key).expect("listed").running = true;
            tracing::info!(replica = %key, memory, "compaction started");
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                let r = shard.compact_pending();
                {
                    let mut st = me.state.lock();
                    st.running -= 1;
                    st.reserved -= memory;
                    let retry = match &r {
                        Ok(done) => {
                            if let Some(c) = done {
                                tracing::info!(replica = %key, seq = c.seq, rows_before = c.rows_before, rows_after = c.rows_after, seconds = c.seconds, "compaction done");
                            }
                            None
                        }
                        Err(
                            shoal_engine::ShardError::BuildInProgress(_)
                            | shoal_engine::ShardError::CompactionInProgress(_),
                        ) => Some(COMPACT_BUSY_RETRY),
                        Err(e) => {
                            metrics::counter!("shoal_compaction_failures_total").increment(1);
                            tracing::warn!(replica = %key, error = %e, "compaction failed; tried again later");
                            Some(COMPACT_RETRY)
                        }
                    };
                    match retry {
                        None => {
                            st.compactions.remove(&key);
                        }
                        Some(after) => {
                            if let Some(j) = st.compactions.get_mut(&key) {
                                j.running = false;
                                j.not_before = Some(Instant::now() + after);
                            }
                        }
                    }
                }
                me.admit();
            });
        }
    }
}

/// Fetches `generation` from the primary `from` into a temp file in the replica's
/// directory (removed at open if a crash leaves it), waits for this backup to hold the
/// batches it covers, and installs it. Returns the bytes fetched.
async fn fetch_generation(
    from: &dyn ReplicaApi,
    key: &ReplicaKey,
    shard: &Shard,
    generation: u64,
    stage: bool,
) -> Result<u64, String> {
    use tokio::io::AsyncWriteExt;
    let path = shard.dir().join(format!("fetch-gen-{generation:08}.tmp"));
    let result = async {
        let mut f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut offset = 0u64;
        let meta = loop {
            let r = from
                .fetch_generation(
                    rpb::FetchGenerationRequest {
                        shard: Some(key.shard_id()),
                        generation,
                        offset,
                        max_bytes: 0,
                    },
                    FETCH_CALL,
                )
                .await
                .map_err(|e| e.to_string())?;
            if offset + r.data.len() as u64 > r.total || (r.data.is_empty() && offset < r.total) {
                return Err(format!(
                    "a piece of {} bytes at {offset} of a {}-byte generation",
                    r.data.len(),
                    r.total
                ));
            }
            f.write_all(&r.data).await.map_err(|e| e.to_string())?;
            offset += r.data.len() as u64;
            if offset == r.total {
                break r.meta;
            }
        };
        f.sync_all().await.map_err(|e| e.to_string())?;
        drop(f);
        let covered = Shard::generation_covered_seq(&meta).map_err(|e| e.to_string())?;
        let t = std::time::Instant::now();
        while shard.last().0 < covered {
            if t.elapsed() > FETCH_CATCH_UP {
                return Err(format!(
                    "this backup holds batches up to {}, the generation covers up to {covered}",
                    shard.last().0
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, p) = (shard.clone(), path.clone());
        shoal_engine::run_blocking(move || {
            if stage {
                s.install_staged(&meta, &p)
            } else {
                s.install_generation(&meta, &p)
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(offset)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&path).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_starts_only_with_a_free_slot_and_the_memory_it_needs() {
        // (memory, running, reserved, slots, budget) -> decision
        assert_eq!(admit_one(10, 0, 0, 1, 100), Admit::Start);
        assert_eq!(admit_one(10, 1, 10, 1, 100), Admit::Wait, "no slot");
        assert_eq!(admit_one(60, 1, 50, 2, 100), Admit::Wait, "no memory");
        assert_eq!(admit_one(50, 1, 50, 2, 100), Admit::Start);
        assert_eq!(
            admit_one(1 << 40, 3, 0, 4, 0),
            Admit::Start,
            "no memory limit"
        );
        assert!(
            matches!(admit_one(101, 0, 0, 1, 100), Admit::Never(e) if e.contains("101") && e.contains("100"))
        );
    }
}
