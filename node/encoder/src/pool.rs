//! The encoder pool: callers send texts to a batcher actor, which forms batches
//! dynamically (up to `max_batch` texts, or whatever waited `max_wait`, whichever comes
//! first, and only when a worker is free, so batches grow under load), orders each batch
//! by length to cut padding, and hands it to a worker thread that owns a model. Workers
//! run outside the async runtime. A full queue answers `Overloaded` at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::encoder::Encoder;
use crate::error::{EncoderError, Result};

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Texts waiting or being encoded before callers are turned away.
    pub max_queue: usize,
    pub workers: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(2),
            max_queue: 4096,
            // One model instance: Burn's CPU kernels already use every core.
            workers: 1,
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
        if let Some(r) = self.reply.lock().expect("reply lock").take() {
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

fn worker_loop<B: Backend>(
    encoder: Encoder<B>,
    batches: Arc<Mutex<mpsc::Receiver<Vec<Item>>>>,
    batcher: ActorRef<PoolMsg>,
    stats: Arc<PoolStats>,
) {
    loop {
        let next = batches.lock().expect("batch receiver").recv();
        let Ok(mut batch) = next else { return };
        let n = batch.len();
        // Similar lengths side by side: the batch pads to its longest text.
        batch.sort_by_key(|i| i.text.len());
        let texts: Vec<&str> = batch.iter().map(|i| i.text.as_str()).collect();
        match encoder.encode(&texts) {
            Ok(out) => {
                stats.texts.fetch_add(n as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .truncated
                    .fetch_add(out.truncated as u64, Ordering::Relaxed);
                for ((item, v), cut) in batch.iter().zip(out.vectors).zip(out.was_truncated) {
                    item.req.results.lock().expect("results")[item.index] = Some(v);
                    if cut {
                        item.req.truncated.fetch_add(1, Ordering::Relaxed);
                    }
                    if item.req.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let results =
                            std::mem::take(&mut *item.req.results.lock().expect("results"));
                        if let Some(r) = item.req.reply.lock().expect("reply").take() {
                            let _ = r.send(Ok(PoolEncoded {
                                vectors: results
                                    .into_iter()
                                    .map(|v| v.expect("every slot filled"))
                                    .collect(),
                                truncated: item.req.truncated.load(Ordering::Relaxed),
                            }));
                        }
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for item in &batch {
                    item.req.fail(EncoderError::Tokenizer(msg.clone()));
                }
            }
        }
        if batcher.cast(PoolMsg::Done { n }).is_err() {
            return;
        }
    }
}

/// A handle to a running pool; clones share it.
#[derive(Clone)]
pub struct EncoderPool {
    batcher: ActorRef<PoolMsg>,
    dimension: usize,
    stats: Arc<PoolStats>,
}

impl EncoderPool {
    /// Starts the batcher actor and one worker thread per encoder (must be called
    /// inside a tokio runtime).
    pub async fn start<B: Backend>(encoders: Vec<Encoder<B>>, mut cfg: PoolConfig) -> Result<Self>
    where
        Encoder<B>: Send + 'static,
    {
        let dimension = encoders
            .first()
            .map(Encoder::dimension)
            .ok_or(EncoderError::ShutDown)?;
        cfg.workers = encoders.len();
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
        })
    }

    pub fn dimension(&self) -> usize {
        self.dimension
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
            .call(|reply| PoolMsg::Encode { texts, reply }, None)
            .await
            .map_err(|_| EncoderError::ShutDown)?;
        match res {
            ractor::rpc::CallResult::Success(r) => {
                if let Err(EncoderError::Overloaded { .. }) = &r {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
            _ => Err(EncoderError::ShutDown),
        }
    }

    /// Stops the batcher; workers exit once their queue drains.
    pub fn shutdown(&self) {
        self.batcher.stop(None);
    }
}
