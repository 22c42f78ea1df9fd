//! A primary handing its role to another replica (issue 16): writes stop, the
//! successor comes to hold every write logged, the leader commits the promotion
//! (`HandOver`), and the new primary takes writes. Before a clean shutdown the node
//! hands over every primary role it holds ([`super::NodeHandle::hand_over`]); a planned
//! move (an operator's promote, evening out primaries) is asked by the leader in a
//! heartbeat answer ([`asked`]). A leaving primary (drain, move) hands over through its
//! in-sync report instead (`Replication::in_sync_report`).

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;

use super::ids::ReplicaKey;
use super::replicas::Registry;
use super::replication::Replication;

/// How long a primary asked for a planned move stops its writes at most: the
/// successor holds the writes in flight within milliseconds when it keeps up.
pub const ASKED_WITHIN: Duration = Duration::from_secs(5);

/// Who is handing over, for the `HandOver` request.
#[derive(Clone)]
pub struct From {
    pub node_id: String,
    pub cluster_id: String,
}

/// Hands `r`'s primary role to `to` (any live in-sync backup when `None`) within
/// `within`: stops its writes, waits until the successor holds every write logged, and
/// asks the leader to promote it (retried while the successor's report is a heartbeat
/// behind). Takes writes again when it did not happen. Returns whether it did.
pub async fn hand_over(
    client: &mut Client,
    from: &From,
    r: &Replication,
    to: Option<&str>,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let Some(h) = r.prepare_handover(within, to).await else {
        r.cancel_handover();
        tracing::warn!(shard = %r.key, to = ?to, "no in-sync backup came to hold every write; keeping the primary role");
        return false;
    };
    let req = cpb::HandOverRequest {
        node_id: from.node_id.clone(),
        cluster_id: from.cluster_id.clone(),
        shard: Some(r.key.shard_id()),
        epoch: h.epoch,
        to: h.to.clone(),
        last_seq: h.last_seq,
        last_epoch: h.last_epoch,
    };
    // The leader checks the successor's report, which may be a heartbeat behind.
    loop {
        match client.hand_over(req.clone()).await {
            Ok(_) => {
                tracing::info!(shard = %r.key, to = %h.to, "primary role handed over");
                return true;
            }
            Err(e)
                if e.code() == tonic::Code::FailedPrecondition
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                r.cancel_handover();
                tracing::warn!(shard = %r.key, to = %h.to, error = %e.message(), "primary role not handed over");
                return false;
            }
        }
    }
}

/// The leader's asks from a heartbeat answer: each primary named, at the epoch it
/// leads in and not already handing over, hands its role over in a task of its own.
pub fn asked(registry: &Registry, client: &Client, from: &From, asks: Vec<cpb::HandOverAsk>) {
    for ask in asks {
        let Some(id) = ask.shard else { continue };
        let key = ReplicaKey {
            collection: id.collection,
            collection_id: id.collection_id,
            index: id.index,
        };
        let Some(r): Option<Arc<Replication>> = registry.read().get(&key).map(|h| h.repl.clone())
        else {
            continue;
        };
        let leads = r
            .role()
            .is_some_and(|role| role.is_primary && role.epoch == ask.epoch);
        if !leads || r.handing_over() {
            continue;
        }
        tracing::info!(shard = %r.key, to = %ask.to, "the leader asks this primary to hand its role over");
        let (mut client, from) = (client.clone(), from.clone());
        tokio::spawn(async move {
            hand_over(&mut client, &from, &r, Some(&ask.to), ASKED_WITHIN).await;
        });
    }
}
