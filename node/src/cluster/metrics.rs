//! Prometheus metrics on `/metrics` (names `shoal_<subsystem>_<name>_<unit>`): the
//! gateway's requests, the encoder pool, and per-replica shard state, refreshed by a
//! small task from the counters the components keep anyway.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use ractor::rpc::CallResult;
use shoal_encoder::pool::EncoderPool;

use super::replicas::{Registry, ReplicaMsg};

/// Bucket bounds (seconds) of the latency histograms: exported as Prometheus
/// histograms, not summaries, so dashboards can add them up across nodes. Searches
/// take milliseconds; an ingest request of 64 texts encodes for seconds on a CPU.
const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the process-wide exporter (once per process; a second node in the same
/// process shares the first one's endpoint).
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &LATENCY_BUCKETS,
        )?
        .install()
        .map_err(|e| anyhow::anyhow!("starting the metrics endpoint on {addr}: {e}"))?;
    describe_counter!(
        "shoal_gateway_searches_total",
        "searches by outcome (ok, partial, error)"
    );
    describe_histogram!(
        "shoal_gateway_search_duration_seconds",
        Unit::Seconds,
        "search latency at the gateway, encode and merge included"
    );
    describe_counter!(
        "shoal_gateway_hedged_requests_total",
        "shard reads sent to a second replica because the first was slow or failed"
    );
    describe_counter!(
        "shoal_gateway_write_conflicts_total",
        "conditional writes (set-payload) retried after a write in between"
    );
    describe_counter!(
        "shoal_replica_search_calls_total",
        "search calls answered by this node's replicas (kind: one search, or a batch's many)"
    );
    describe_counter!(
        "shoal_gateway_ingested_documents_total",
        "documents acknowledged"
    );
    describe_histogram!(
        "shoal_gateway_ingest_duration_seconds",
        Unit::Seconds,
        "ingest request latency at the gateway"
    );
    describe_counter!("shoal_encoder_texts_total", "texts encoded");
    describe_counter!("shoal_encoder_batches_total", "batches run by the model");
    describe_counter!(
        "shoal_encoder_truncated_total",
        "texts cut at the model's maximum length"
    );
    describe_counter!(
        "shoal_encoder_rejected_total",
        "requests refused because the queue was full"
    );
    describe_histogram!(
        "shoal_rebuild_gate_seconds",
        Unit::Seconds,
        "a rebuild's shadow gate on one primary (issue 21)"
    );
    describe_counter!(
        "shoal_rebuild_transitions_total",
        "rebuild steps written on this node's replicas, by action (switch, commit, rollback; a re-embed's commit_set, drop_set)"
    );
    describe_counter!(
        "shoal_reembed_rows_total",
        "documents a re-embed's fill re-encoded on this node's primaries (issue 21)"
    );
    describe_gauge!(
        "shoal_reembed_rows_missing",
        "live documents of a replica still without the re-embed's vector, by replica"
    );
    describe_gauge!("shoal_node_replicas", "shard replicas open on this node");
    describe_counter!(
        "shoal_node_replica_restarts_total",
        "replica actors reopened after a crash"
    );
    describe_counter!(
        "shoal_replication_batches_sent_total",
        "write batches a primary shipped to its backups"
    );
    describe_gauge!(
        "shoal_replication_recent_log_bytes",
        Unit::Bytes,
        "write batches this node's replicas hold for backups that fall behind"
    );
    describe_counter!(
        "shoal_replication_snapshots_sent_total",
        "whole-shard snapshots a primary sent to a backup, by reason (behind: its log \
         position is no longer held; diverged: it holds writes the primary never had)"
    );
    describe_gauge!("shoal_shard_live_documents", "live documents per replica");
    describe_gauge!(
        "shoal_shard_fresh_rows",
        "rows newer than the serving index (scanned exactly)"
    );
    describe_gauge!(
        "shoal_shard_serving_generation",
        "index generation serving queries (0 = none)"
    );
    Ok(())
}

/// Refreshes the gauges and absolute counters every `period` until `stop` fires.
pub async fn refresh(
    registry: Registry,
    restarts: Arc<AtomicU64>,
    encoder: Option<Arc<EncoderPool>>,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Some(e) = &encoder {
            let s = e.stats();
            counter!("shoal_encoder_texts_total").absolute(s.texts.load(Ordering::Relaxed));
            counter!("shoal_encoder_batches_total").absolute(s.batches.load(Ordering::Relaxed));
            counter!("shoal_encoder_truncated_total").absolute(s.truncated.load(Ordering::Relaxed));
            counter!("shoal_encoder_rejected_total").absolute(s.rejected.load(Ordering::Relaxed));
        }
        counter!("shoal_node_replica_restarts_total").absolute(restarts.load(Ordering::Relaxed));
        let replicas: Vec<_> = registry
            .read()
            .iter()
            .map(|(k, h)| (k.clone(), h.actor.clone()))
            .collect();
        gauge!("shoal_node_replicas").set(replicas.len() as f64);
        let recent: usize = registry
            .read()
            .values()
            .map(|h| h.repl.recent_log_bytes())
            .sum();
        gauge!("shoal_replication_recent_log_bytes").set(recent as f64);
        for (key, actor) in replicas {
            let Ok(CallResult::Success(st)) = actor
                .call(ReplicaMsg::Stats, Some(Duration::from_secs(2)))
                .await
            else {
                continue;
            };
            let labels = [
                ("collection", key.collection.clone()),
                ("shard", key.index.to_string()),
            ];
            gauge!("shoal_shard_live_documents", &labels).set(st.live_docs as f64);
            gauge!("shoal_shard_fresh_rows", &labels).set(st.fresh_rows as f64);
            gauge!("shoal_shard_serving_generation", &labels)
                .set(st.serving.as_ref().map_or(0, |g| g.id) as f64);
        }
    }
}
