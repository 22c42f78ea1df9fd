//! Helpers for the tests that boot whole clusters (in-process or as processes).

use std::fmt::Display;
use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A member's configuration for tests that boot clusters on the host's disk: the disk
/// watermarks near full, so placement does not depend on how full the machine running
/// the tests is (a build directory on the same volume pushed it past the default 85%
/// and a test's collection found no node with room). Tests of the watermarks set
/// their own, on volumes of their own size.
pub fn member_config() -> crate::Config {
    crate::Config {
        disk_low_watermark: 0.98,
        disk_high_watermark: 0.99,
        ..crate::Config::default()
    }
}

/// A loopback port free right now, taken from below Linux's ephemeral range (32768
/// and up): a port the kernel handed out by binding port 0 can be taken again by an
/// outgoing connection's source port before the test binds it, which made member
/// starts fail now and then. Processes start at different offsets.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN);
}

/// Polls `probe` every 50 ms until it gives `Some`, and returns that; panics naming
/// `what` (and how long it waited) after `within`. The one wait-until loop of the
/// workspace's tests.
pub async fn eventually<T, F, Fut>(within: Duration, what: impl Display, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let t = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
