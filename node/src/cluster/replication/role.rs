//! A replica's role in its replica set as the map has it, the write quorum, and the
//! pure decisions of whose copy overwrites whose (issue 14). No I/O here.

use shoal_engine::epoch_at;

/// Another replica of the shard, as the map has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub addr: String,
    /// Serving (not a copy in progress, not leaving): counts towards the quorum.
    pub serving: bool,
    /// Its node is up (or draining): the quorum waits for it.
    pub live: bool,
}

/// This replica's place in its replica set, from the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub epoch: u64,
    pub primary: String,
    pub is_primary: bool,
    pub peers: Vec<Peer>,
    pub replication_factor: u32,
    /// The collection's write quorum (replicas, the primary included); 0 = default.
    pub write_quorum: u32,
    /// An operator started this epoch accepting data loss: the primary's copy is the
    /// shard, replacing replicas that hold more.
    pub forced: bool,
}

impl Role {
    /// The backups that count towards a write's quorum (live and serving) and how
    /// many of them must hold it: by default all of them, and at least one when the
    /// replication factor is 2 or more; with an explicit quorum `q`, any `q - 1`.
    pub fn quorum(&self) -> (Vec<String>, usize) {
        let peers: Vec<String> = self
            .peers
            .iter()
            .filter(|p| p.serving && p.live)
            .map(|p| p.node.clone())
            .collect();
        let needed = match self.write_quorum {
            0 => peers.len().max(usize::from(self.replication_factor >= 2)),
            q => q as usize - 1,
        };
        (peers, needed)
    }

    /// Pure: whether this primary (at `epoch`) may overwrite what backup `node` holds
    /// past it: only on an operator's forced epoch, or when that backup is a copy
    /// outside the quorum (a replica that failed and left it, or a move's target),
    /// whose extra batches were never acknowledged. A serving backup ahead, never.
    pub fn overwrites_ahead(&self, epoch: u64, node: &str) -> bool {
        self.epoch == epoch
            && (self.forced || self.peers.iter().any(|p| p.node == node && !p.serving))
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
                    live,
                })
                .collect(),
            replication_factor: rf,
            write_quorum,
            forced: false,
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

    #[test]
    fn default_quorum_is_every_live_serving_replica_and_at_least_two() {
        // RF 3, all up: both backups.
        let (peers, needed) = role(3, 0, &[(true, true), (true, true)]).quorum();
        assert_eq!((peers.len(), needed), (2, 2));
        // A backup on a suspect node and a copy in progress do not count.
        let (peers, needed) = role(3, 0, &[(true, false), (false, true)]).quorum();
        assert_eq!((peers.len(), needed), (0, 1), "still needs a second copy");
        // RF 1: the primary alone.
        assert_eq!(role(1, 0, &[]).quorum(), (vec![], 0));
    }

    #[test]
    fn explicit_quorum_counts_the_primary() {
        let r = role(3, 2, &[(true, true), (true, true)]);
        assert_eq!(r.quorum().1, 1, "any one backup");
        assert_eq!(role(2, 1, &[(true, false)]).quorum().1, 0, "primary alone");
        let (peers, needed) = role(3, 3, &[(true, true), (true, false)]).quorum();
        assert!(peers.len() < needed, "3 of 3 with one down cannot be met");
    }
}
