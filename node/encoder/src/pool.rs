//! The encoder pool: callers send texts to a batcher actor, which forms batches
//! dynamically (up to `max_batch` texts, or whatever waited `max_wait`, whichever comes
//! first, and only when a worker is free, so batches grow under load), orders each batch
//! by length to cut padding, and hands it to a worker thread that owns a model. Workers
//! run outside the async runtime. A full queue answers `Overloaded` at once.
//!
//! A worker that panics on a batch fails that batch's requests (`WorkerFailed`) and
//! takes the next batch: the panic is caught, the model kept (`encode` takes `&self`),
//! and the batcher told the worker is free again, so nothing queued behind it waits
//! forever. Every request also has a deadline (`request_timeout`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::encoder::{Encoded, Encoder};
use crate::error::{EncoderError, Result};

/// What a pool worker runs: a model that turns a batch of texts into vectors. The
/// Burn [`Encoder`] is the one implementation shoal serves with.
pub trait BatchEncode: Send + 'static {
    fn dimension(&self) -> usize;
    fn encode_batch(&self, texts: &[&str]) -> Result<Encoded>;
}

impl<B: Backend> BatchEncode for Encoder<B>
where
    Encoder<B>: Send + 'static,
{
    fn dimension(&self) -> usize {
        Encoder::dimension(self)
    }
    fn encode_batch(&self, texts: &[&str]) -> Result<Encoded> {
        self.encode(texts)
    }
}

/// A model loaded on a device chosen at run time ([`crate::load_on`]).
impl BatchEncode for Box<dyn BatchEncode> {
    fn dimension(&self) -> usize {
        (**self).dimension()
    }
    fn encode_batch(&self, texts: &[&str]) -> Result<Encoded> {
        (**self).encode_batch(texts)
    }
}

/// A lock whose holder may have panicked: the data is still what it was.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Texts waiting or being encoded before callers are turned away.
    pub max_queue: usize,
    pub workers: usize,
    /// Longest a request waits for its vectors before failing with `TimedOut`.
    pub request_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(2),
            max_queue: 4096,
            // One model instance: Burn's CPU kernels already use every core.
            workers: 1,
            request_timeout: Duration::from_secs(900),
        }
    }
}

/// Counters a node exports as metrics.
#[derive(Default, Debug)]
pub struct PoolStats {
    pub texts: AtomicU64,
    pub batches: AtomicU64,
    pub truncated: AtomicU64,
    pub rejected: AtomicU64,
    /// Batches a worker panicked on (the worker went on with the next one).
    pub worker_panics: AtomicU64,
}

/// One request's vectors, in its order, and how many of its texts were truncated.
#[derive(Debug, Clone)]
pub struct PoolEncoded {
    pub vectors: Vec<Vec<f32>>,
    pub truncated: usize,
}

type Reply = RpcReplyPort<Result<PoolEncoded>>;

/// One request's texts and the slots its vectors land in.
struct Request {
    results: Mutex<Vec<Option<Vec<f32>>>>,
    remaining: AtomicUsize,
    /// Its texts cut at the model's limit (a request's batches may be several).
    truncated: AtomicUsize,
    reply: Mutex<Option<Reply>>,
}

impl Request {
    fn fail(&self, e: EncoderError) {
        if let Some(r) = lock(&self.reply).take() {
            let _ = r.send(Err(e));
        }
    }
}

struct Item {
    req: Arc<Request>,
    index: usize,
    text: String,
    queued_at: Instant,
}

pub enum PoolMsg {
    Encode {
        texts: Vec<String>,
        reply: Reply,
    },
    /// The oldest queued text may have waited `max_wait`.
    Tick,
    /// A worker finished a batch of `n` texts.
    Done {
        n: usize,
    },
}

struct Batcher;

pub struct BatcherState {
    cfg: PoolConfig,
    queue: VecDeque<Item>,
    in_flight: usize,
    idle_workers: usize,
    to_workers: mpsc::Sender<Vec<Item>>,
    tick_armed: bool,
}

impl BatcherState {
    fn dispatch(&mut self, myself: &ActorRef<PoolMsg>) {
        while self.idle_workers > 0 && !self.queue.is_empty() {
            let oldest = self.queue.front().expect("non-empty").queued_at;
            if self.queue.len() < self.cfg.max_batch && oldest.elapsed() < self.cfg.max_wait {
                break;
            }
            let n = self.queue.len().min(self.cfg.max_batch);
            let batch: Vec<Item> = self.queue.drain(..n).collect();
            self.in_flight += n;
            self.idle_workers -= 1;
            if self.to_workers.send(batch).is_err() {
                return;
            }
        }
        if !self.queue.is_empty() && !self.tick_armed {
            let wait = self
                .cfg
                .max_wait
                .saturating_sub(self.queue.front().expect("non-empty").queued_at.elapsed());
            self.tick_armed = true;
            myself.send_after(wait.max(Duration::from_micros(100)), || PoolMsg::Tick);
        }
    }
}

impl Actor for Batcher {
    type Msg = PoolMsg;
    type State = BatcherState;
    type Arguments = (PoolConfig, mpsc::Sender<Vec<Item>>);

    async fn pre_start(
        &self,
        _myself: ActorRef<PoolMsg>,
        (cfg, to_workers): Self::Arguments,
    ) -> Result<BatcherState, ActorProcessingErr> {
        Ok(BatcherState {
            idle_workers: cfg.workers,
            cfg,
            queue: VecDeque::new(),
            in_flight: 0,
            to_workers,
            tick_armed: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<PoolMsg>,
        msg: PoolMsg,
        st: &mut BatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMsg::Encode { texts, reply } => {
                if let Some(index) = texts.iter().position(|t| t.trim().is_empty()) {
                    let _ = reply.send(Err(EncoderError::EmptyText { index }));
                    return Ok(());
                }
                let queued = st.queue.len() + st.in_flight;
                if queued + texts.len() > st.cfg.max_queue {
                    let _ = reply.send(Err(EncoderError::Overloaded {
                        queued,
                        limit: st.cfg.max_queue,
                    }));
                    return Ok(());
                }
                if texts.is_empty() {
                    let _ = reply.send(Ok(PoolEncoded {
                        vectors: Vec::new(),
                        truncated: 0,
                    }));
                    return Ok(());
                }
                let req = Arc::new(Request {
                    results: Mutex::new(vec![None; texts.len()]),
                    remaining: AtomicUsize::new(texts.len()),
                    truncated: AtomicUsize::new(0),
                    reply: Mutex::new(Some(reply)),
                });
                let now = Instant::now();
                st.queue
                    .extend(texts.into_iter().enumerate().map(|(index, text)| Item {
                        req: req.clone(),
                        index,
                        text,
                        queued_at: now,
                    }));
            }
            PoolMsg::Tick => st.tick_armed = false,
            PoolMsg::Done { n } => {
                st.in_flight -= n;
                st.idle_workers += 1;
            }
        }
        st.dispatch(&myself);
        Ok(())
    }
}

fn worker_loop<E: BatchEncode>(
    encoder: E,
    batches: Arc<Mutex<mpsc::Receiver<Vec<Item>>>>,
    batcher: ActorRef<PoolMsg>,
    stats: Arc<PoolStats>,
) {
    loop {
        let next = lock(&batches).recv();
        let Ok(mut batch) = next else { return };
        let n = batch.len();
        // Similar lengths side by side: the batch pads to its longest text.
        batch.sort_by_key(|i| i.text.len());
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let texts: Vec<&str> = batch.iter().map(|i| i.text.as_str()).collect();
            encoder.encode_batch(&texts)
        }));
        // The batcher hears the worker is free before any caller hears its answer, so
        // a caller's next request (the next part of a large ingest) finds the queue
        // already emptied of this batch.
        let stop = batcher.cast(PoolMsg::Done { n }).is_err();
        match run {
            Ok(Ok(out)) => deliver(&batch, out, &stats),
            Ok(Err(e)) => {
                let msg = e.to_string();
                for item in &batch {
                    item.req.fail(EncoderError::Tokenizer(msg.clone()));
                }
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".into());
                stats.worker_panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(texts = n, error = %why, "encoder worker panicked; failing its batch and going on");
                for item in &batch {
                    item.req
                        .fail(EncoderError::WorkerFailed(format!("panicked: {why}")));
                }
            }
        }
        if stop {
            return;
        }
    }
}

/// Puts a batch's vectors in their requests' slots and answers each request whose
/// last slot this filled.
fn deliver(batch: &[Item], out: Encoded, stats: &PoolStats) {
    let n = batch.len();
    stats.texts.fetch_add(n as u64, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats
        .truncated
        .fetch_add(out.truncated as u64, Ordering::Relaxed);
    for ((item, v), cut) in batch.iter().zip(out.vectors).zip(out.was_truncated) {
        lock(&item.req.results)[item.index] = Some(v);
        if cut {
            item.req.truncated.fetch_add(1, Ordering::Relaxed);
        }
        if item.req.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let results = std::mem::take(&mut *lock(&item.req.results));
            if let Some(r) = lock(&item.req.reply).take() {
                let vectors: Option<Vec<Vec<f32>>> = results.into_iter().collect();
                let _ = r.send(match vectors {
                    Some(vectors) => Ok(PoolEncoded {
                        vectors,
                        truncated: item.req.truncated.load(Ordering::Relaxed),
                    }),
                    None => Err(EncoderError::Backend(
                        "the model returned fewer vectors than texts".into(),
                    )),
                });
            }
        }
    }
}

/// A handle to a running pool; clones share it.
#[derive(Clone)]
pub struct EncoderPool {
    batcher: ActorRef<PoolMsg>,
    dimension: usize,
    stats: Arc<PoolStats>,
    max_queue: usize,
    request_timeout: Duration,
}

impl EncoderPool {
    /// Starts the batcher actor and one worker thread per encoder (must be called
    /// inside a tokio runtime).
    pub async fn start<E: BatchEncode>(encoders: Vec<E>, mut cfg: PoolConfig) -> Result<Self> {
        let dimension = encoders
            .first()
            .map(BatchEncode::dimension)
            .ok_or(EncoderError::ShutDown)?;
        cfg.workers = encoders.len();
        let (max_queue, request_timeout) = (cfg.max_queue, cfg.request_timeout);
        let (tx, rx) = mpsc::channel();
        let (batcher, _) = Actor::spawn(None, Batcher, (cfg, tx))
            .await
            .map_err(|_| EncoderError::ShutDown)?;
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(PoolStats::default());
        for (i, enc) in encoders.into_iter().enumerate() {
            let (rx, batcher, stats) = (rx.clone(), batcher.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("shoal-encoder-{i}"))
                .spawn(move || worker_loop(enc, rx, batcher, stats))
                .map_err(|_| EncoderError::ShutDown)?;
        }
        Ok(Self {
            batcher,
            dimension,
            stats,
            max_queue,
            request_timeout,
        })
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Texts the pool queues at most: a larger request must come in parts.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// Encodes `texts`, in order. Batched with whatever else is queued.
    /// Vectors for `texts`, in order.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        Ok(self.encode_counted(texts).await?.vectors)
    }

    /// Vectors for `texts`, in order, with how many of them were truncated.
    pub async fn encode_counted(&self, texts: Vec<String>) -> Result<PoolEncoded> {
        let res = self
            .batcher
            .call(
                |reply| PoolMsg::Encode { texts, reply },
                Some(self.request_timeout),
            )
            .await
            .map_err(|_| EncoderError::ShutDown)?;
        match res {
            ractor::rpc::CallResult::Success(r) => {
                if let Err(EncoderError::Overloaded { .. }) = &r {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
            ractor::rpc::CallResult::Timeout => Err(EncoderError::TimedOut {
                secs: self.request_timeout.as_secs(),
            }),
            ractor::rpc::CallResult::SenderError => {
                Err(EncoderError::WorkerFailed("its batch was dropped".into()))
            }
        }
    }

    /// Stops the batcher; workers exit once their queue drains.
    pub fn shutdown(&self) {
        self.batcher.stop(None);
    }
}
