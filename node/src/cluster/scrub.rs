//! The scrubber (issue 18): a replica opens without reading its vectors (open time
//! grows with the index, not the data), so this task reads them in the background,
//! rate-limited (`--scrub-bytes-per-sec`), checking every stored vector against the
//! checksum its record holds ([`shoal_engine::Shard::scrub`]); a read of a row checks
//! its own. A replica with a damaged vector is taken out of service
//! ([`shoal_engine::Shard::mark_corrupt`]: its report carries the failure, the
//! coordinators take it out of its shard's quorum, and every later open checks it
//! whole), named in the log with the file and offset, and counted in
//! `shoal_scrub_corrupt_total`. Nothing is deleted.
//!
//! One pass walks every hosted replica in turn, a step of about a quarter second's
//! budget at a time; each replica's place is kept across passes.

use std::collections::HashMap;
use std::time::Duration;

use super::ids::ReplicaKey;
use super::replicas::Registry;

/// Rows checked per step: about a quarter second's worth of the budget, at least one.
fn rows_per_step(bytes_per_sec: u64, dim: usize) -> u64 {
    (bytes_per_sec / 4 / (dim as u64 * 4).max(1)).max(1)
}

/// How long a step that read `bytes` must take to stay within the budget.
fn pace(bytes: u64, bytes_per_sec: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / bytes_per_sec.max(1) as f64)
}

/// Runs until `stop` changes; `bytes_per_sec` 0 turns it off.
pub async fn run(
    registry: Registry,
    bytes_per_sec: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if bytes_per_sec == 0 {
        return;
    }
    let mut next: HashMap<ReplicaKey, u64> = HashMap::new();
    loop {
        let hosted: Vec<(ReplicaKey, shoal_engine::Shard)> = registry
            .read()
            .iter()
            .filter_map(|(k, h)| Some((k.clone(), h.repl.shard().ok()?)))
            .filter(|(_, s)| s.failure().is_none())
            .collect();
        next.retain(|k, _| hosted.iter().any(|(h, _)| h == k));
        let mut idle = true;
        for (key, shard) in hosted {
            let from = next.get(&key).copied().unwrap_or(0);
            let rows = rows_per_step(bytes_per_sec, shard.config().dimension);
            let t = std::time::Instant::now();
            let s = shard.clone();
            let r = shoal_engine::run_blocking(move || s.scrub(from, rows)).await;
            match r {
                Ok((to, bytes)) => {
                    // At the end: the next pass starts over.
                    next.insert(key, if to == from { 0 } else { to });
                    if bytes > 0 {
                        idle = false;
                        metrics::counter!("shoal_scrub_bytes_total").increment(bytes);
                    }
                    let wait = pace(bytes, bytes_per_sec).saturating_sub(t.elapsed());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return,
                    }
                }
                Err(e @ shoal_engine::ShardError::Corrupt { .. }) => {
                    metrics::counter!("shoal_scrub_corrupt_total").increment(1);
                    tracing::error!(replica = %key, error = %e, "the scrubber found damaged data");
                    if let Err(m) = shard.mark_corrupt(&e) {
                        tracing::error!(replica = %key, error = %m, "marking the replica corrupt failed");
                    }
                    next.remove(&key);
                }
                // Closed or replaced meanwhile: checked again from where it was.
                Err(e) => tracing::debug!(replica = %key, error = %e, "scrub step skipped"),
            }
        }
        if idle {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_a_quarter_second_of_the_budget() {
        // 64 MiB/s over 384-d rows (1,536 B): 10,922 rows a step, a quarter second.
        let rows = rows_per_step(64 << 20, 384);
        assert_eq!(rows, 10_922);
        let t = pace(rows * 1536, 64 << 20);
        assert!((t.as_secs_f64() - 0.25).abs() < 0.001, "{t:?}");
        assert_eq!(rows_per_step(1, 384), 1, "at least one row");
    }
}
