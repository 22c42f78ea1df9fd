//! A replica's role in its replica set as the map has it, the write quorum under the
//! in-sync rule, the lag that takes a backup out of it, and the pure decisions of whose
//! copy overwrites whose (issues 14 and 16). No I/O here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_engine::epoch_at;

/// Another replica of the shard, as the map has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub addr: String,
    /// Serving: in the shard's in-sync set, and promotable.
    pub serving: bool,
    /// Leaving: the source of a move, still in the in-sync set (it holds every write
    /// until the copy replacing it joins), not promotable.
    pub leaving: bool,
    /// Its node is up (or draining): a handover may go to it.
    pub live: bool,
}

impl Peer {
    /// In the in-sync set: every write waits for it.
    pub fn in_sync(&self) -> bool {
        self.serving || self.leaving
    }

    /// A copy being filled (a move's target, or a replica out of the in-sync set).
    pub fn is_copy(&self) -> bool {
        !self.in_sync()
    }
}

/// This replica's place in its replica set, from the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub epoch: u64,
    pub primary: String,
    pub is_primary: bool,
    pub peers: Vec<Peer>,
    pub replication_factor: u32,
    /// The collection's write quorum: the fewest in-sync replicas (the primary
    /// included) writes need; 0 = 2 at RF >= 2, else 1.
    pub write_quorum: u32,
    /// An operator started this epoch accepting data loss: the primary's copy is the
    /// shard, replacing replicas that hold more.
    pub forced: bool,
    /// This replica is leaving its shard (the source of a move: a drain, an even-out):
    /// as primary, it hands its role to the copy that joins the in-sync set.
    pub leaving: bool,
    /// A split seals the shard (issue 19): as primary it takes no writes until the
    /// cut-over, so every replica can fork it at one position.
    pub sealed: bool,
}

/// Who a write waits for (issue 16, the in-sync rule): every backup of the in-sync set
/// (serving in the map, whatever its node's liveness, since it leaves the set only
/// through a committed map change) and every copy this primary admitted (caught up,
/// and about to join the set); and how many in-sync replicas writes need at least.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quorum {
    pub members: Vec<String>,
    pub min_copies: usize,
}

impl Quorum {
    /// Too few in-sync replicas to take writes.
    pub fn short(&self) -> bool {
        1 + self.members.len() < self.min_copies
    }
}

impl Role {
    /// The fewest in-sync replicas (the primary included) writes need.
    pub fn min_copies(&self) -> usize {
        match self.write_quorum {
            0 => self.replication_factor.min(2) as usize,
            q => q as usize,
        }
    }

    /// The write quorum: the in-sync backups (serving or leaving) and the `admitted`
    /// copies, each of which must hold a write before it is acknowledged. Why every
    /// one: a promotion picks any serving replica on a live node, so each must hold
    /// every acknowledged write; a leaving one counts until its copy replaces it, so a
    /// backup's move at RF 2 does not stop writes while the copy fills.
    pub fn quorum(&self, admitted: &[String]) -> Quorum {
        let members = self
            .peers
            .iter()
            .filter(|p| p.in_sync() || admitted.contains(&p.node))
            .map(|p| p.node.clone())
            .collect();
        Quorum {
            members,
            min_copies: self.min_copies(),
        }
    }

    /// Pure: whether this primary (at `epoch`) may overwrite what backup `node` holds
    /// past it: only on an operator's forced epoch, or when that backup is a copy
    /// outside the in-sync set (a replica that failed or lagged and left it, or a
    /// move's target), whose extra batches were never acknowledged. A serving backup
    /// ahead, never.
    pub fn overwrites_ahead(&self, epoch: u64, node: &str) -> bool {
        self.epoch == epoch
            && (self.forced || self.peers.iter().any(|p| p.node == node && p.is_copy()))
    }
}

/// Which backups lag their primary (Kafka's replica.lag.time.max): a backup is behind
/// from the first moment it is seen short of the primary's last batch until it holds
/// that batch; one behind the same target longer than the lag timeout lags, and leaves
/// the in-sync set (so a slow, cut off or snapshot-receiving backup stops holding
/// every write up). A backup that keeps up under a steady stream of writes reaches each
/// target and is never lagging.
#[derive(Clone, Debug, Default)]
pub struct Lag {
    behind: HashMap<String, (u64, Instant)>,
}

impl Lag {
    /// `node` holds up to `matched`; the primary's last batch is `last`.
    pub fn observe(&mut self, node: &str, matched: u64, last: u64, now: Instant) {
        match self.behind.get(node) {
            Some(&(target, _)) if matched < target => {}
            _ if matched >= last => {
                self.behind.remove(node);
            }
            _ => {
                self.behind.insert(node.to_string(), (last, now));
            }
        }
    }

    /// The backups behind one target for longer than `timeout`.
    pub fn lagging(&self, now: Instant, timeout: Duration) -> Vec<String> {
        let mut out: Vec<String> = self
            .behind
            .iter()
            .filter(|(_, &(_, since))| now.saturating_duration_since(since) > timeout)
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Forgets every backup but `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.behind.retain(|n, _| keep(n));
    }
}

/// Where a backup stands against its primary, from the primary's probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its history is a prefix of the primary's: ship what follows.
    Prefix,
    /// It holds batches of an older epoch the primary never had (a deposed primary's,
    /// never acknowledged): replaced by a snapshot.
    Diverged,
    /// Its position is past the primary's: it may hold acknowledged writes the primary
    /// lost (an emptied or older volume). Never overwritten.
    Ahead,
}

/// Pure: compares a backup's (last sequence, epoch of that batch) with the primary's
/// history. `forced`: what the backup holds past the primary may be overwritten (the
/// primary's epoch was forced by an operator, or the backup is a copy outside the
/// quorum), so a backup ahead is replaced like a diverged one.
pub fn standing(
    epochs: &[(u64, u64)],
    last: u64,
    backup_seq: u64,
    backup_epoch: u64,
    forced: bool,
) -> Standing {
    let own = (epoch_at(epochs, last), last);
    if backup_seq <= last && epoch_at(epochs, backup_seq) == backup_epoch {
        Standing::Prefix
    } else if (backup_epoch, backup_seq) > own && !forced {
        Standing::Ahead
    } else {
        Standing::Diverged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(rf: u32, write_quorum: u32, peers: &[(bool, bool)]) -> Role {
        Role {
            sealed: false,
            epoch: 1,
            primary: "p".into(),
            is_primary: true,
            peers: peers
                .iter()
                .enumerate()
                .map(|(i, &(serving, live))| Peer {
                    node: format!("b{i}"),
                    addr: String::new(),
                    serving,
                    leaving: false,
                    live,
                })
                .collect(),
            replication_factor: rf,
            write_quorum,
            forced: false,
            leaving: false,
        }
    }

    /// Issue 14: a backup past the primary is never overwritten; one holding an older
    /// epoch's batches the primary never had is; an operator's forced epoch overrides.
    #[test]
    fn positions_decide_who_is_overwritten() {
        // The primary wrote 1..=10 at epoch 2, then 11..=15 at epoch 4.
        let epochs = [(2, 1), (4, 11)];
        assert_eq!(standing(&epochs, 15, 12, 4, false), Standing::Prefix);
        assert_eq!(standing(&epochs, 15, 0, 0, false), Standing::Prefix);
        // A deposed epoch-3 primary's unacknowledged 11..=20: replaced.
        assert_eq!(standing(&epochs, 15, 20, 3, false), Standing::Diverged);
        // More of epoch 4 than the primary holds, or a newer epoch: ahead.
        assert_eq!(standing(&epochs, 15, 16, 4, false), Standing::Ahead);
        assert_eq!(standing(&epochs, 15, 3, 5, false), Standing::Ahead);
        // A primary that opened empty never overwrites a backup that has anything.
        assert_eq!(standing(&[], 0, 1, 1, false), Standing::Ahead);
        // ... unless an operator forced its epoch, accepting the loss.
        assert_eq!(standing(&[], 0, 1, 1, true), Standing::Diverged);
        // Who may be overwritten when ahead: a copy outside the quorum (b1), never a
        // serving backup (b0), and only under the role's own epoch.
        let r = role(3, 0, &[(true, true), (false, true)]);
        assert!(!r.overwrites_ahead(1, "b0"));
        assert!(r.overwrites_ahead(1, "b1"));
        assert!(!r.overwrites_ahead(2, "b1"));
        let forced = Role { forced: true, ..r };
        assert!(forced.overwrites_ahead(1, "b0"));
    }

    fn names(q: &Quorum) -> Vec<&str> {
        q.members.iter().map(String::as_str).collect()
    }

    /// Issue 16: a write waits for every in-sync backup, live or not (only a committed
    /// map change takes one out), and for the copies the primary admitted; writes need
    /// at least two in-sync replicas at RF >= 2, or the explicit quorum.
    #[test]
    fn the_quorum_is_every_in_sync_replica() {
        // RF 3, both backups in sync: both.
        let q = role(3, 0, &[(true, true), (true, true)]).quorum(&[]);
        assert_eq!((names(&q), q.short()), (vec!["b0", "b1"], false));
        // A backup on a suspect node still counts until the map takes it out; a copy
        // does not, unless admitted.
        let r = role(3, 0, &[(true, false), (false, true)]);
        assert_eq!(names(&r.quorum(&[])), vec!["b0"]);
        assert_eq!(names(&r.quorum(&["b1".into()])), vec!["b0", "b1"]);
        // No in-sync backup at RF 3: short of the two copies writes need.
        let r = role(3, 0, &[(false, true), (false, true)]);
        assert!(r.quorum(&[]).short());
        assert!(!r.quorum(&["b0".into()]).short());
        // RF 1: the primary alone.
        let q = role(1, 0, &[]).quorum(&[]);
        assert_eq!((q.members.len(), q.short()), (0, false));
        // An explicit quorum bounds the set from below, and never lets a write skip an
        // in-sync backup: 1 of 3 writes alone once both backups left the set...
        assert!(!role(3, 1, &[(false, true), (false, true)])
            .quorum(&[])
            .short());
        // ...and 3 of 3 needs both backups in sync.
        assert!(role(3, 3, &[(true, true), (false, true)])
            .quorum(&[])
            .short());
        let q = role(3, 2, &[(true, true), (true, true)]).quorum(&[]);
        assert_eq!(q.members.len(), 2, "every in-sync backup, not any one");
    }

    #[test]
    fn a_backup_lags_when_it_misses_one_target_for_the_timeout() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let timeout = Duration::from_millis(1000);
        let mut lag = Lag::default();
        // Caught up: never behind.
        lag.observe("a", 10, 10, s(0));
        // Behind target 20 from 0 ms; still short of it at 900 and 1500 ms.
        lag.observe("b", 10, 20, s(0));
        lag.observe("b", 15, 30, s(900));
        assert!(lag.lagging(s(900), timeout).is_empty());
        lag.observe("b", 19, 40, s(1500));
        assert_eq!(lag.lagging(s(1500), timeout), vec!["b"]);
        // Keeping up under a stream of writes: it reaches each target, new one each
        // time, and never lags.
        let mut lag = Lag::default();
        for i in 0..10u64 {
            lag.observe("c", 10 * i, 10 * i + 5, s(500 * i));
            assert!(lag.lagging(s(500 * i), timeout).is_empty(), "step {i}");
        }
        // Reaching the target clears it; retain forgets replicas gone from the set.
        let mut lag = Lag::default();
        lag.observe("d", 0, 5, s(0));
        lag.observe("e", 0, 5, s(0));
        lag.observe("d", 5, 5, s(2000));
        lag.retain(|n| n != "e");
        assert!(lag.lagging(s(3000), timeout).is_empty());
    }

    /// A leaving backup (a move's source) is waited for until its copy replaces it, so
    /// at RF 2 the quorum of two holds while the copy fills; the copy, admitted, joins.
    #[test]
    fn a_leaving_backup_stays_in_the_write_quorum() {
        let mut r = role(2, 0, &[(false, true), (false, true)]);
        r.peers[0].leaving = true;
        let q = r.quorum(&[]);
        assert_eq!(q.members, vec!["b0".to_string()]);
        assert!(!q.short());
        assert!(r.peers[0].in_sync() && r.peers[1].is_copy());
        assert_eq!(r.quorum(&["b1".into()]).members.len(), 2);
        // Never overwritten past the primary as a copy would be.
        assert!(!r.overwrites_ahead(1, "b0") && r.overwrites_ahead(1, "b1"));
    }
}
