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
//! Every replica builds (the backups too, so reads they serve use the index); a
//! restarted node finds the steps still pending in the map and queues them again.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use shoal_engine::IvfPqParams;
use shoal_proto::coordinator as cpb;

use super::ids::ReplicaKey;
use super::mapview::MapView;
use super::replicas::Registry;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Queued,
    Running,
    Done,
    Failed(String),
}

#[derive(Clone, Debug)]
struct Job {
    op: u64,
    params: IvfPqParams,
    sample: usize,
    /// Bytes reserved while it runs.
    memory: u64,
    phase: Phase,
}

/// What a replica's heartbeat says of its build (issue 18).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    pub operation: u64,
    pub queued: bool,
    pub error: String,
}

#[derive(Default)]
struct State {
    running: usize,
    reserved: u64,
    jobs: HashMap<ReplicaKey, Job>,
}

pub struct Builds {
    slots: usize,
    memory_bytes: u64,
    registry: Registry,
    state: Mutex<State>,
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

/// The parameters a build operation chose, as the engine takes them. The training
/// sample is at least what FAISS needs for them (39 a list, and 2^nbits for each PQ
/// codebook), whatever the sizing saw.
fn params_of(b: &cpb::IndexBuild) -> (IvfPqParams, usize) {
    let floor = (39 * b.nlist as u64).max(1 << b.pq_nbits.min(16));
    (
        IvfPqParams {
            nlist: b.nlist as usize,
            m: b.pq_m as usize,
            nbits: b.pq_nbits as usize,
        },
        b.train_sample.max(floor) as usize,
    )
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
    pub fn new(slots: usize, memory_bytes: u64, registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            slots: slots.max(1),
            memory_bytes,
            registry,
            state: Mutex::default(),
        })
    }

    pub fn report(&self, key: &ReplicaKey) -> BuildReport {
        match self.state.lock().jobs.get(key) {
            None => BuildReport::default(),
            Some(j) => BuildReport {
                operation: j.op,
                queued: j.phase == Phase::Queued,
                error: match &j.phase {
                    Phase::Failed(e) => e.clone(),
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
                // The collection's chosen parameters for every build that names none
                // (automatic rebuilds too); before any cluster build, a collection
                // that leaves nlist to shoal sizes each shard by its own rows.
                let chosen = match op.and_then(|(o, _)| o.build.as_ref()) {
                    Some(b) => Some(params_of(b)),
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
                let Some((o, true)) = op else {
                    continue;
                };
                if st.jobs.get(key).is_some_and(|j| j.op >= o.id) {
                    continue;
                }
                let (params, sample) = params_of(o.build.as_ref().expect("a build"));
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
                        params,
                        sample,
                        memory,
                        phase: Phase::Queued,
                    },
                );
            }
            // Jobs of replicas gone, or of operations cancelled, are forgotten (a
            // running one finishes first); a queued one outlives its operation's end
            // (a backup still builds once its primary's step ended the operation), and
            // finished ones are kept while their operation runs (so none runs twice).
            st.jobs.retain(|k, j| {
                j.phase == Phase::Running
                    || (hosted.iter().any(|(h, _)| h == k)
                        && view.operations.get(&j.op).is_some_and(|o| {
                            o.state == "running"
                                || (o.state != "cancelled" && j.phase == Phase::Queued)
                        }))
            });
        }
        self.admit();
    }

    /// Starts queued builds while a slot is free and their memory fits.
    fn admit(self: &Arc<Self>) {
        let mut st = self.state.lock();
        let mut queued: Vec<(u64, ReplicaKey)> = st
            .jobs
            .iter()
            .filter(|(_, j)| j.phase == Phase::Queued)
            .map(|(k, j)| (j.op, k.clone()))
            .collect();
        queued.sort();
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
                // a later, smaller one does not overtake it).
                Admit::Wait => break,
                Admit::Never(e) => {
                    tracing::warn!(replica = %key, operation = j.op, "{e}");
                    st.jobs.get_mut(&key).expect("listed").phase = Phase::Failed(e);
                    continue;
                }
            }
            let Some(shard) = self
                .registry
                .read()
                .get(&key)
                .and_then(|h| h.repl.shard().ok())
            else {
                continue;
            };
            st.running += 1;
            st.reserved += j.memory;
            st.jobs.get_mut(&key).expect("listed").phase = Phase::Running;
            tracing::info!(replica = %key, operation = j.op, nlist = j.params.nlist, train_sample = j.sample, memory = j.memory, "index build started");
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                shard.set_build_params(Some((j.params, j.sample)));
                let r = shard.rebuild(None);
                let phase = match r {
                    Ok(g) => {
                        tracing::info!(replica = %key, operation = j.op, generation = g.id, "index build done");
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
                    }
                }
                me.admit();
            });
        }
    }
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
