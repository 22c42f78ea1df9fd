//! `shoal import` (issue 18): precomputed vectors from a file into a collection through
//! the cluster's gateways. Streamed: a blocking reader thread hands chunks of `--batch`
//! rows through a channel of `--concurrency` slots, and at most `--concurrency` requests
//! are in flight (spread over `--gateways` in turn), so memory is bounded by
//! 2 × concurrency × batch rows whatever the file's size. Resumable: chunk `i` is always
//! rows `[i × batch, (i+1) × batch)` and carries the request id `imp-<identity>-<i>`,
//! where the identity names the file (path, size, modification time, the ids sidecar's
//! too), the collection (name and id: a dropped and re-created one is another) and the
//! batch; the progress file beside the input records the identity and the rows below
//! which every chunk was acknowledged. A rerun of the same command skips those rows and
//! re-sends the chunks after them that might have landed, under the same request ids, so
//! the shards apply each at most once (and an upsert by id cannot duplicate anyway):
//! nothing is skipped, nothing duplicated. A different identity (a changed file, another
//! collection) starts from row 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use shoal_cli::vectors::{Format, Reader, Row};
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;
use shoal_proto::v1 as pb;

use crate::cluster::{connect, NodeTarget};
use crate::coordinator::Target;

#[derive(Args)]
pub struct ImportArgs {
    /// A `.npy` (float32), `.fvecs`, `.bvecs` or `.jsonl` file of vectors.
    path: PathBuf,
    #[arg(long)]
    collection: String,
    /// Ids, one a line, for the rows of a `.npy` / `.fvecs` / `.bvecs` file (default:
    /// the 0-based row number).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Rows per request.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Nodes' public addresses to send to in turn, comma-separated (default: `--node`).
    #[arg(long, value_delimiter = ',')]
    gateways: Vec<String>,
    /// Where progress is kept (default: beside the input, `<file>.shoal-import`).
    #[arg(long)]
    progress_file: Option<PathBuf>,
    /// Start from the first row whatever the progress file says.
    #[arg(long)]
    restart: bool,
    /// Import only the file's first ROWS rows.
    #[arg(long)]
    limit: Option<u64>,
    /// How long one request is retried while the cluster answers UNAVAILABLE (a node
    /// restarting, a primary moving), with the same request id.
    #[arg(long, default_value_t = 120)]
    patience_secs: u64,
    /// When the collection does not exist yet: its shard count.
    #[arg(long, default_value_t = 3)]
    shards: u32,
    /// When the collection does not exist yet: copies of every shard.
    #[arg(long, default_value_t = 1)]
    replication_factor: u32,
    /// When the collection does not exist yet: ip (inner product) or l2.
    #[arg(long, default_value = "ip")]
    metric: String,
}

/// What identifies one import: a progress file for another is ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Identity {
    path: PathBuf,
    bytes: u64,
    modified_ns: u128,
    ids: Option<(PathBuf, u64, u128)>,
    collection: String,
    collection_id: u64,
    batch: usize,
    limit: Option<u64>,
}

impl Identity {
    /// A stable 64-bit name (FNV-1a of its JSON), the request ids' stem.
    fn tag(&self) -> String {
        let json = serde_json::to_string(self).expect("identity serializes");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct Progress {
    version: u32,
    identity: Identity,
    /// Every chunk below this row was acknowledged.
    rows_done: u64,
    complete: bool,
}

fn file_identity(p: &Path) -> Result<(PathBuf, u64, u128)> {
    let path = std::fs::canonicalize(p).with_context(|| format!("opening {}", p.display()))?;
    let m = std::fs::metadata(&path).with_context(|| format!("reading {}", p.display()))?;
    let modified = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((path, m.len(), modified))
}

fn progress_path(a: &ImportArgs) -> PathBuf {
    a.progress_file.clone().unwrap_or_else(|| {
        let mut s = a.path.clone().into_os_string();
        s.push(".shoal-import");
        PathBuf::from(s)
    })
}

/// Writes the progress file whole (temp file, fsync, rename): a kill leaves the old one
/// or the new one, never half of either.
fn save(path: &Path, p: &Progress) -> Result<()> {
    let tmp = path.with_extension("shoal-import.tmp");
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("writing the progress file {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, serde_json::to_string_pretty(p)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("writing the progress file {}", path.display()))?;
    Ok(())
}

/// Rows already imported by an earlier run of this identity (0 when none, or another).
fn resume_from(path: &Path, identity: &Identity) -> Result<(u64, bool)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok((0, false));
    };
    match serde_json::from_str::<Progress>(&text) {
        Ok(p) if p.version == 1 && p.identity == *identity => Ok((p.rows_done, p.complete)),
        Ok(_) => {
            eprintln!(
                "{} is from another import (another file, collection or batch size): \
                 starting from row 0",
                path.display()
            );
            Ok((0, false))
        }
        Err(e) => bail!(
            "the progress file {} is unreadable ({e}): remove it or pass --restart",
            path.display()
        ),
    }
}

/// The collection's id and dimension, creating it (with the file's dimension) when
/// missing.
async fn collection(target: &Target, a: &ImportArgs, dim: usize) -> Result<(u64, u32)> {
    let mut c = Client::new(target.coordinators.clone());
    let found = c
        .describe_collection(cpb::DescribeCollectionRequest {
            name: a.collection.clone(),
        })
        .await;
    let info = match found {
        Ok(info) => info,
        Err(s) if s.code() == tonic::Code::NotFound => {
            let metric = match a.metric.as_str() {
                "ip" => cpb::Metric::InnerProduct,
                "l2" => cpb::Metric::L2,
                m => bail!("--metric {m:?}: expected ip or l2"),
            };
            eprintln!(
                "creating collection {} ({dim}-d, {}, {} shards, RF {})",
                a.collection, a.metric, a.shards, a.replication_factor
            );
            c.create_collection(cpb::CreateCollectionRequest {
                name: a.collection.clone(),
                dimension: dim as u32,
                metric: metric as i32,
                shard_count: a.shards,
                replication_factor: a.replication_factor,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating collection {}", a.collection))?
        }
        Err(s) => return Err(anyhow::Error::new(s).context(format!("describing {}", a.collection))),
    };
    let coll = info
        .collection
        .context("the coordinator described no collection")?;
    if coll.dimension as usize != dim {
        bail!(
            "{} holds {dim}-d vectors but collection {} is {}-d",
            a.path.display(),
            a.collection,
            coll.dimension
        );
    }
    Ok((coll.id, coll.dimension))
}

/// Worth retrying with the same request id: the cluster may not have applied it, and
/// will apply it at most once. NOT_FOUND too: the coordinators hold the collection
/// (checked before the first chunk), so a node answering it has not yet received the
/// map that made it.
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::NotFound
    )
}

struct Chunk {
    index: u64,
    first_row: u64,
    rows: Vec<Row>,
}

/// Sends one chunk, retrying while the cluster is unavailable.
async fn send(
    mut client: shoal_proto::v1::shoal_client::ShoalClient<shoal_proto::auth::Authed>,
    collection: String,
    request_id: String,
    chunk: Chunk,
    patience: Duration,
    path: &Path,
) -> Result<(u64, usize)> {
    let n = chunk.rows.len();
    let last = chunk.first_row + n as u64 - 1;
    let req = pb::IngestRequest {
        collection,
        documents: chunk
            .rows
            .into_iter()
            .map(|r| pb::Document {
                id: r.id,
                text: r.text,
                metadata_json: r.metadata_json,
                vector: r.vector,
            })
            .collect(),
        request_id,
    };
    let deadline = Instant::now() + patience;
    let mut wait = Duration::from_millis(100);
    loop {
        match client.ingest(req.clone()).await {
            Ok(_) => return Ok((chunk.index, n)),
            Err(s) if retryable(s.code()) && Instant::now() + wait < deadline => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(s) => {
                return Err(anyhow::Error::new(s).context(format!(
                    "rows {}..={last} of {} (request {})",
                    chunk.first_row,
                    path.display(),
                    req.request_id
                )))
            }
        }
    }
}

pub async fn import(target: Target, node: NodeTarget, a: ImportArgs) -> Result<()> {
    if a.batch == 0 || a.concurrency == 0 {
        bail!("--batch and --concurrency must be at least 1");
    }
    let format = Format::of(&a.path)?;
    let mut reader = Reader::open(&a.path, a.ids.as_deref())?;
    let dim = match reader.dimension() {
        Some(d) => d,
        // JSONL: the first row says.
        None => {
            let mut peek = Reader::open(&a.path, None)?;
            let first = peek.next_chunk(1)?;
            first
                .first()
                .map(|r| r.vector.len())
                .with_context(|| format!("{} has no rows", a.path.display()))?
        }
    };
    let (collection_id, _) = collection(&target, &a, dim).await?;
    let (path, bytes, modified_ns) = file_identity(&a.path)?;
    let identity = Identity {
        path,
        bytes,
        modified_ns,
        ids: a.ids.as_deref().map(file_identity).transpose()?,
        collection: a.collection.clone(),
        collection_id,
        batch: a.batch,
        limit: a.limit,
    };
    let tag = identity.tag();
    let progress_file = progress_path(&a);
    let (done, complete) = if a.restart {
        (0, false)
    } else {
        resume_from(&progress_file, &identity)?
    };
    let total = match (reader.rows(), a.limit) {
        (Some(r), Some(l)) => Some(r.min(l)),
        (r, _) => r,
    };
    if complete {
        eprintln!(
            "{} was imported into {} already ({done} rows; {}): nothing to do (--restart \
             imports it again)",
            a.path.display(),
            a.collection,
            progress_file.display()
        );
    }
    // `done` is a whole number of chunks, except at the end of the file.
    let first_chunk = done / a.batch as u64;
    let resumed = first_chunk * a.batch as u64;
    if resumed > 0 && !complete {
        eprintln!(
            "resuming {} at row {resumed} ({})",
            a.path.display(),
            progress_file.display()
        );
    }
    let gateways = if a.gateways.is_empty() {
        vec![node.node.clone()]
    } else {
        a.gateways.clone()
    };
    let clients = gateways
        .iter()
        .map(|g| connect(g))
        .collect::<Result<Vec<_>>>()?;

    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(if total.is_some() {
            "{spinner} import {pos}/{len} vectors [{elapsed_precise}] {bar:30} {per_sec} eta {eta}"
        } else {
            "{spinner} import {pos} vectors [{elapsed_precise}] {per_sec}"
        })
        .expect("template"),
    );
    bar.set_position(resumed);
    bar.reset_eta();

    let started = Instant::now();
    let mut sent = 0u64;
    // A finished import's rows end with its (possibly short) last chunk.
    let mut rows_done = if complete { done } else { resumed };
    if !complete {
        if resumed > 0 {
            reader.skip(resumed)?;
        }
        // The reader runs on a blocking thread, `concurrency` chunks ahead at most.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Chunk>>(a.concurrency);
        let batch = a.batch;
        let limit = a.limit.unwrap_or(u64::MAX);
        let producer = tokio::task::spawn_blocking(move || {
            let mut index = first_chunk;
            loop {
                let first_row = reader.position();
                let want = batch.min(limit.saturating_sub(first_row) as usize);
                let r = if want == 0 {
                    Ok(Vec::new())
                } else {
                    reader.next_chunk(want)
                };
                let last = matches!(&r, Ok(rows) if rows.is_empty()) || r.is_err();
                let item = r.map(|rows| Chunk {
                    index,
                    first_row,
                    rows,
                });
                if last {
                    if let Err(e) = item {
                        let _ = tx.blocking_send(Err(e));
                    }
                    return;
                }
                if tx.blocking_send(item).is_err() {
                    return;
                }
                index += 1;
            }
        });
        let patience = Duration::from_secs(a.patience_secs);
        let mut in_flight = FuturesUnordered::new();
        // Chunks acknowledged above the watermark; the watermark is the first chunk not
        // yet acknowledged, and `rows_done` the rows below it.
        let mut acked: BTreeMap<u64, usize> = BTreeMap::new();
        let mut watermark = first_chunk;
        let mut last_save = Instant::now();
        let mut reading = true;
        let save_at = |rows_done: u64, complete: bool| -> Result<()> {
            save(
                &progress_file,
                &Progress {
                    version: 1,
                    identity: identity.clone(),
                    rows_done,
                    complete,
                },
            )
        };
        let outcome: Result<()> = loop {
            if reading && in_flight.len() < a.concurrency {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(Ok(chunk)) => {
                            let client = clients[(chunk.index as usize) % clients.len()].clone();
                            let rid = format!("imp-{tag}-{}", chunk.index);
                            in_flight.push(send(
                                client,
                                a.collection.clone(),
                                rid,
                                chunk,
                                patience,
                                &a.path,
                            ));
                            continue;
                        }
                        Some(Err(e)) => break Err(e),
                        None => reading = false,
                    },
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => {
                        if let Err(e) = done_chunk(r, &mut acked, &mut watermark, &mut rows_done, &mut sent, &bar) {
                            break Err(e);
                        }
                    }
                }
            } else {
                match in_flight.next().await {
                    Some(r) => {
                        if let Err(e) = done_chunk(
                            r,
                            &mut acked,
                            &mut watermark,
                            &mut rows_done,
                            &mut sent,
                            &bar,
                        ) {
                            break Err(e);
                        }
                    }
                    None if !reading => break Ok(()),
                    None => {}
                }
            }
            if last_save.elapsed() >= Duration::from_millis(250) {
                save_at(rows_done, false)?;
                last_save = Instant::now();
            }
        };
        drop(rx);
        let _ = producer.await;
        if let Err(e) = outcome {
            save_at(rows_done, false)?;
            bar.abandon();
            return Err(e.context(format!(
                "import stopped; {rows_done} rows are acknowledged and a rerun of the same \
                 command resumes there ({})",
                progress_file.display()
            )));
        }
        save_at(rows_done, true)?;
    }
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "collection": a.collection,
            "file": a.path.display().to_string(),
            "format": format.name(),
            "dimension": dim,
            "rows": rows_done,
            "resumed_from": resumed,
            "sent": sent,
            "seconds": secs,
            "vectors_per_s": sent as f64 / secs.max(1e-9),
            "gateways": gateways.len(),
            "concurrency": a.concurrency,
            "batch": a.batch,
        })
    );
    Ok(())
}

/// Records an acknowledged chunk and moves the watermark past every contiguous one.
fn done_chunk(
    r: Result<(u64, usize)>,
    acked: &mut BTreeMap<u64, usize>,
    watermark: &mut u64,
    rows_done: &mut u64,
    sent: &mut u64,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let (index, n) = r?;
    *sent += n as u64;
    bar.inc(n as u64);
    acked.insert(index, n);
    while let Some(n) = acked.remove(watermark) {
        *rows_done += n as u64;
        *watermark += 1;
    }
    Ok(())
}
