//! Timing and quality helpers shared by the harnesses.

use std::time::Instant;

/// Runs `f` once per query, spread over `threads` threads (query `i` goes to thread
/// `i % threads`), and returns the results in query order with the queries per second.
pub fn run_queries<R: Send>(
    nq: usize,
    threads: usize,
    f: impl Fn(usize) -> R + Sync,
) -> (Vec<R>, f64) {
    let started = Instant::now();
    let mut parts: Vec<Vec<(usize, R)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    (t..nq)
                        .step_by(threads)
                        .map(|i| (i, f(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut all: Vec<(usize, R)> = parts.drain(..).flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    (all.into_iter().map(|(_, r)| r).collect(), nq as f64 / secs)
}

/// Mean recall@k of `got` (ids per query) against `truth` (the exact top k).
pub fn recall_at(k: usize, got: &[Vec<i64>], truth: &[Vec<i64>]) -> f64 {
    let hits: usize = got
        .iter()
        .zip(truth)
        .map(|(g, t)| {
            g.iter()
                .take(k)
                .filter(|id| t[..k.min(t.len())].contains(id))
                .count()
        })
        .sum();
    hits as f64 / (k * truth.len()) as f64
}

/// Resident anonymous and file-backed bytes of this process, from /proc.
pub fn rss() -> (u64, u64) {
    rss_of(std::path::Path::new("/proc/self"))
}

/// Resident anonymous and file-backed bytes of the process at `/proc/PID`.
pub fn rss_of(proc_dir: &std::path::Path) -> (u64, u64) {
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}
