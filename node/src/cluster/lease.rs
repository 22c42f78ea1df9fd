//! The primary lease: a node's primaries acknowledge writes only while the coordinators
//! have recently answered one of its heartbeats. The coordinators replace a silent
//! node's primaries only once it has been silent for their down timeout; each answered
//! heartbeat grants `lease_ms` (their suspect timeout, below the down timeout), counted
//! from before the heartbeat was sent, so a primary cut off from the coordinators (but
//! maybe not from its backups) stops acknowledging before a successor can be promoted.
//! An isolated coordinator leader answers no heartbeats (its own lease, in
//! `shoal-coordinator`), so it cannot renew this one.
//!
//! A grant takes effect only once this node has applied the map version the leader
//! answered with (`renew_at`, then `applied` from the map watch): a node back from
//! being declared down, whose map still shows it leading a shard that was promoted
//! away meanwhile, acknowledges nothing as that shard's primary (issue 16: no primary
//! of epoch e acknowledges after a newer epoch was committed, found by the seeded
//! schedules in `node/tests/replication.rs`).
//!
//! Clock assumption: the node's and the coordinator leader's monotonic clocks advance
//! at rates that differ by less than (down - suspect) / down (83% with the defaults of
//! 5 s and 30 s, 50% with the tests' 1.5 s and 3 s); wall-clock time is not used.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::cluster::error::ReplicaError;

#[derive(Debug, Default)]
pub struct Lease {
    /// Writes may be acknowledged until then; none until the first answered heartbeat.
    until: Mutex<Option<Instant>>,
    /// Grants waiting for this node to apply a map version: (version, until).
    pending: Mutex<Vec<(u64, Instant)>>,
    /// The newest map version whose roles this node has applied.
    applied: AtomicU64,
}

/// Grants kept waiting for the map at most (the newest ones).
const PENDING: usize = 16;

impl Lease {
    /// An answered heartbeat sent at `sent` granted `lease` (zero grants nothing).
    pub fn renew(&self, sent: Instant, lease: Duration) {
        if lease.is_zero() {
            return;
        }
        let mut u = self.until.lock();
        *u = Some(later(*u, sent + lease));
    }

    /// A heartbeat sent at `sent` was answered with a lease of `lease` by a leader at
    /// map `version`: granted once this node has applied that version.
    pub fn renew_at(&self, sent: Instant, lease: Duration, version: u64) {
        if lease.is_zero() {
            return;
        }
        let mut p = self.pending.lock();
        if self.applied.load(Ordering::Acquire) >= version {
            drop(p);
            self.renew(sent, lease);
        } else {
            p.push((version, sent + lease));
            if p.len() > PENDING {
                p.remove(0);
            }
        }
    }

    /// This node has applied map `version` (its replicas have their roles from it):
    /// the grants waiting for it take effect.
    pub fn applied(&self, version: u64) {
        self.applied.fetch_max(version, Ordering::AcqRel);
        let granted = {
            let mut p = self.pending.lock();
            let granted = p
                .iter()
                .filter(|(v, _)| *v <= version)
                .map(|(_, u)| *u)
                .max();
            p.retain(|(v, _)| *v > version);
            granted
        };
        if let Some(g) = granted {
            let mut u = self.until.lock();
            *u = Some(later(*u, g));
        }
    }

    /// The coordinators declared this node down: its primaries stop at once.
    pub fn revoke(&self) {
        self.pending.lock().clear();
        *self.until.lock() = None;
    }

    /// How long the lease still holds (zero when it has lapsed or was never granted).
    pub fn remaining(&self) -> Duration {
        self.until.lock().map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(Instant::now())
        })
    }

    /// `Ok` while the lease holds; else the write is refused as unavailable (`what`
    /// names the shard in the message).
    pub fn check(&self, what: &dyn std::fmt::Display) -> Result<(), ReplicaError> {
        if holds(*self.until.lock(), Instant::now()) {
            return Ok(());
        }
        Err(ReplicaError::Unavailable(format!(
            "the primary of shard {what} holds no lease: the coordinators have not answered \
             this node's heartbeats lately, and may be replacing its primaries; retry \
             (with the same request id, the write is applied at most once)"
        )))
    }
}

/// Pure: a lease until `until` holds at `now`.
fn holds(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|u| now < u)
}

/// Pure: a renewal never shortens the lease (answers may arrive out of order).
fn later(current: Option<Instant>, granted: Instant) -> Instant {
    current.map_or(granted, |c| c.max(granted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_from_the_send_time_and_only_grows() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        // (until, now, holds)
        for (until, now, want) in [
            (None, t, false),
            (Some(t + s), t, true),
            (Some(t + s), t + s, false),
            (Some(t), t + s, false),
        ] {
            assert_eq!(holds(until, now), want, "{until:?} at {now:?}");
        }
        assert_eq!(later(Some(t + s * 5), t + s), t + s * 5);
        assert_eq!(later(Some(t), t + s), t + s);
        assert_eq!(later(None, t), t);

        let l = Lease::default();
        assert!(
            l.check(&"c/0").is_err(),
            "no lease before the first heartbeat"
        );
        l.renew(Instant::now(), Duration::ZERO);
        assert!(l.check(&"c/0").is_err(), "zero grants nothing");
        l.renew(Instant::now(), Duration::from_secs(60));
        assert!(l.check(&"c/0").is_ok());
        assert!(l.remaining() > Duration::from_secs(59));
        // A slow answer to an older heartbeat does not shorten it.
        l.renew(
            Instant::now() - Duration::from_secs(30),
            Duration::from_secs(1),
        );
        assert!(l.check(&"c/0").is_ok());
        l.revoke();
        let e = l.check(&"c/0").unwrap_err();
        assert!(matches!(e, ReplicaError::Unavailable(ref m) if m.contains("holds no lease")));
    }

    #[test]
    fn a_grant_waits_for_the_map_version_it_was_answered_with() {
        let l = Lease::default();
        l.applied(4);
        l.renew_at(Instant::now(), Duration::from_secs(60), 5);
        assert!(l.check(&"c/0").is_err(), "map 5 not applied yet");
        l.applied(5);
        assert!(l.check(&"c/0").is_ok());
        // Applied already: at once.
        l.revoke();
        l.renew_at(Instant::now(), Duration::from_secs(60), 5);
        assert!(l.check(&"c/0").is_ok());
        // A revocation drops the grants still waiting.
        l.revoke();
        l.renew_at(Instant::now(), Duration::from_secs(60), 9);
        l.revoke();
        l.applied(9);
        assert!(l.check(&"c/0").is_err());
    }
}
