//! The recent log: the newest batches a replica wrote or applied, kept in memory so a
//! backup that is behind catches up batch by batch, and the pure choice of what a
//! primary sends a backup next.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_engine::WalBatch;

/// Recent batches by sequence number, each with its size (counted once, on insert):
/// always a contiguous run of the local shard's own history. Kept on backups too, so a
/// backup promoted after a failover can catch the others up batch by batch.
pub(super) struct Recent {
    pub(super) batches: BTreeMap<u64, (Arc<WalBatch>, usize)>,
    pub(super) bytes: usize,
    pub(super) cap: usize,
    /// The shard's last sequence number when the log was (re)started: every later
    /// batch is remembered once it is written (or applied, on a backup).
    pub(super) floor: u64,
}

/// Whether the recent log can ship a batch.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hold {
    Held,
    /// Written to the shard but not remembered yet (the writer is between the two):
    /// held in a moment.
    Pending,
    /// Older than anything held: only a snapshot catches up from there.
    Gone,
}

impl Recent {
    pub(super) fn new(cap: usize, floor: u64) -> Self {
        Self {
            batches: BTreeMap::new(),
            bytes: 0,
            cap,
            floor,
        }
    }

    pub(super) fn hold(&self, seq: u64) -> Hold {
        let newest = self.batches.last_key_value().map_or(0, |(&s, _)| s);
        if self.batches.contains_key(&seq) {
            Hold::Held
        } else if seq > newest.max(self.floor) {
            Hold::Pending
        } else {
            Hold::Gone
        }
    }

    pub(super) fn remember(&mut self, batches: impl IntoIterator<Item = Arc<WalBatch>>) {
        for b in batches {
            let size = b.approx_bytes();
            if let Some((_, old)) = self.batches.insert(b.seq, (b, size)) {
                self.bytes -= old;
            }
            self.bytes += size;
        }
        while self.bytes > self.cap && self.batches.len() > 1 {
            if let Some((_, (_, old))) = self.batches.pop_first() {
                self.bytes -= old;
            }
        }
    }
}

/// What a primary sends a backup whose next batch is `from`, its own last being `last`.
#[derive(Debug)]
pub(super) enum Next {
    /// The backup holds everything: a keep-alive.
    UpToDate,
    /// The batches from `from` on, contiguous, up to the byte budget (at least one).
    Ship(Vec<Arc<WalBatch>>),
    /// `from` is older than anything held: only a snapshot catches it up.
    Snapshot,
    /// `from` is being written: held in a moment.
    Wait,
}

impl Recent {
    /// Pure: the next step towards a backup that needs `from` onwards.
    pub(super) fn next(&self, from: u64, last: u64, max_bytes: usize) -> Next {
        if from > last {
            return Next::UpToDate;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for (&seq, (b, size)) in self.batches.range(from..) {
            if seq != from + out.len() as u64 || (bytes > max_bytes && !out.is_empty()) {
                break;
            }
            bytes += size;
            out.push(b.clone());
        }
        if !out.is_empty() {
            return Next::Ship(out);
        }
        match self.hold(from) {
            Hold::Gone => Next::Snapshot,
            Hold::Held | Hold::Pending => Next::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_engine::WalOp;

    fn batch(seq: u64, floats: usize) -> Arc<WalBatch> {
        Arc::new(WalBatch {
            seq,
            epoch: 1,
            request_id: String::new(),
            ops: vec![WalOp::Upsert {
                id: format!("d{seq}"),
                text: None,
                metadata: String::new(),
                vector: vec![0.0; floats],
            }],
        })
    }

    #[test]
    fn recent_log_keeps_the_newest_batches_within_its_cap() {
        let size = batch(1, 1000).approx_bytes();
        let mut r = Recent::new(3 * size, 0);
        r.remember((1..=5).map(|s| batch(s, 1000)));
        assert_eq!(r.batches.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(r.bytes, 3 * size);
        // The same batch again (a re-sent Append) is not counted twice.
        r.remember([batch(5, 1000)]);
        assert_eq!(r.bytes, 3 * size);
        // One batch over the cap is still kept: the newest is always there to ship.
        let mut r = Recent::new(10, 0);
        r.remember([batch(7, 1000)]);
        assert_eq!(r.batches.len(), 1);
    }

    #[test]
    fn a_batch_not_yet_remembered_is_pending_not_gone() {
        // Opened at seq 10 (nothing replayed): 11 is being written, 10 and before are
        // only in the segments.
        let mut r = Recent::new(1 << 20, 10);
        assert_eq!(r.hold(11), Hold::Pending);
        assert_eq!(r.hold(10), Hold::Gone);
        r.remember([batch(11, 8), batch(12, 8)]);
        assert_eq!(r.hold(11), Hold::Held);
        assert_eq!(r.hold(13), Hold::Pending);
        assert_eq!(r.hold(9), Hold::Gone);
        // Evicted batches are gone for good.
        let size = batch(1, 1000).approx_bytes();
        let mut r = Recent::new(2 * size, 0);
        r.remember((1..=4).map(|s| batch(s, 1000)));
        assert_eq!(
            (r.hold(2), r.hold(3), r.hold(5)),
            (Hold::Gone, Hold::Held, Hold::Pending)
        );
    }

    /// The primary's next step per backup, as a table: caught up, behind within the
    /// recent log (contiguous batches within the budget), behind past it, and ahead of
    /// what the log remembered yet.
    #[test]
    fn the_next_step_towards_a_backup() {
        let size = batch(1, 100).approx_bytes();
        let mut r = Recent::new(1 << 20, 2);
        r.remember((3..=8).map(|s| batch(s, 100)));
        let seqs = |n: Next| match n {
            Next::Ship(b) => b.iter().map(|b| b.seq).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(r.next(9, 8, size * 10), Next::UpToDate));
        assert_eq!(seqs(r.next(5, 8, size * 10)), vec![5, 6, 7, 8]);
        // The budget cuts a shipment (it is passed by the batch that crosses it).
        assert_eq!(seqs(r.next(3, 8, size)), vec![3, 4]);
        assert_eq!(seqs(r.next(3, 8, 0)), vec![3]);
        // Older than the log: a snapshot; logged but not yet remembered: wait.
        assert!(matches!(r.next(2, 8, size), Next::Snapshot));
        assert!(matches!(r.next(9, 9, size), Next::Wait));
    }
}
