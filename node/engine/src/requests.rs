//! The request ids a shard remembers for idempotent retries, bounded in bytes
//! (issue 19: it was 100,000 ids of up to 1 KiB each, held twice, in a map and a
//! queue: up to 200 MB per replica for a client that sends long ids).
//!
//! Each id is held once (an `Arc<str>` shared by the map and the arrival queue) and
//! charged its length plus [`ENTRY_OVERHEAD`]; the oldest are forgotten past the
//! budget. A retry older than what is remembered is applied again: for upserts that
//! is the same document and vector (a new row, the old one retired), for deletes a
//! no-op; what it loses is the first attempt's ack.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::WriteAck;

/// Bytes charged per remembered id beside its length: the map's slot (key, ack,
/// control byte), the queue's pointer, the allocation's header.
pub const ENTRY_OVERHEAD: usize = 96;

pub struct RecentRequests {
    acks: HashMap<Arc<str>, WriteAck>,
    order: VecDeque<Arc<str>>,
    bytes: usize,
    budget: usize,
}

impl RecentRequests {
    /// Remembers ids until their charge passes `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            acks: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    pub fn get(&self, id: &str) -> Option<WriteAck> {
        self.acks.get(id).copied()
    }

    /// Remembers `id`'s ack unless it is empty or already known, forgetting the
    /// oldest past the budget.
    pub fn insert(&mut self, id: &str, ack: WriteAck) {
        if id.is_empty() || self.acks.contains_key(id) {
            return;
        }
        let id: Arc<str> = Arc::from(id);
        self.bytes += charge(&id);
        self.acks.insert(id.clone(), ack);
        self.order.push_back(id);
        while self.bytes > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.bytes -= charge(&old);
            self.acks.remove(&old);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Bytes charged for what is remembered (at most the budget).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The newest ids whose charge fits `budget` bytes, oldest first: what a
    /// checkpoint keeps in the manifest.
    pub fn newest(&self, budget: usize) -> Vec<(String, WriteAck)> {
        let mut used = 0;
        let mut out: Vec<(String, WriteAck)> = self
            .order
            .iter()
            .rev()
            .take_while(|id| {
                used += charge(id);
                used <= budget
            })
            .map(|id| (id.to_string(), self.acks[id]))
            .collect();
        out.reverse();
        out
    }
}

fn charge(id: &str) -> usize {
    id.len() + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u64) -> WriteAck {
        WriteAck {
            seq,
            upserted: 1,
            deleted: 0,
            duplicate: false,
        }
    }

    #[test]
    fn the_oldest_ids_are_forgotten_past_the_byte_budget() {
        let budget = 10 * (ENTRY_OVERHEAD + 1000);
        let mut r = RecentRequests::new(budget);
        for i in 0..100u64 {
            // Long ids: ten fit.
            r.insert(&format!("{i:01000}"), ack(i));
            assert!(r.bytes() <= budget);
        }
        assert_eq!(r.len(), 10);
        assert_eq!(r.get(&format!("{:01000}", 99)), Some(ack(99)));
        assert_eq!(r.get(&format!("{:01000}", 90)), Some(ack(90)));
        assert_eq!(r.get(&format!("{:01000}", 89)), None);
        // Short ids: many more fit in the same bytes.
        for i in 0..1000u64 {
            r.insert(&format!("s{i}"), ack(i));
        }
        assert!(r.len() > 90, "{}", r.len());
        // A repeat keeps its first ack; an empty id is never remembered.
        r.insert("s999", ack(5));
        assert_eq!(r.get("s999"), Some(ack(999)));
        r.insert("", ack(1));
        assert_eq!(r.get(""), None);
        let newest = r.newest(3 * (ENTRY_OVERHEAD + 4));
        let ids: Vec<&str> = newest.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["s997", "s998", "s999"]);
    }
}
