//! The checks a write passes where it enters a node, written once for both entries:
//! the public port (the gateway checks a whole request before any shard is written, so
//! that one bad document refuses the request and nothing is half-applied) and the
//! internal port (a primary's write handler: a peer's request is input like a
//! client's). A write that comes in through the gateway and lands on this node's own
//! primary is checked by both: each check is one pass over the request that builds
//! nothing (metadata included: `Metadata::check`).

use shoal_engine::Metadata;
use shoal_proto::limits::{Exceeded, Limits};
use shoal_proto::within;
use tonic::Status;

use crate::cluster::error::ReplicaError;

/// A write refused for what it holds; the message names the document and the limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadWrite(pub String);

impl From<Exceeded> for BadWrite {
    fn from(e: Exceeded) -> Self {
        BadWrite(e.to_string())
    }
}

impl From<BadWrite> for Status {
    fn from(e: BadWrite) -> Status {
        Status::invalid_argument(e.0)
    }
}

impl From<BadWrite> for ReplicaError {
    fn from(e: BadWrite) -> ReplicaError {
        ReplicaError::Invalid(e.0)
    }
}

/// Bytes the gateway appends to a client's request id per shard (`#` and the shard
/// index), allowed on the internal port on top of `request_id_bytes`.
pub const SHARD_SUFFIX_BYTES: usize = 11;

/// A batch's shape: how many documents and deletes, and its request id's length
/// (`id_slack`: bytes allowed over `request_id_bytes`).
pub fn check_batch(
    l: &Limits,
    upserts: usize,
    deletes: usize,
    request_id: &str,
    id_slack: usize,
) -> Result<(), BadWrite> {
    within!(l, docs_per_request, upserts, "documents in the request")?;
    within!(l, ids_per_delete, deletes, "ids in the request")?;
    if request_id.len() > l.request_id_bytes + id_slack {
        return Err(BadWrite(format!(
            "the request id's length is {}, over the limit request_id_bytes = {}{}",
            request_id.len(),
            l.request_id_bytes,
            if id_slack > 0 {
                format!(" (+{id_slack} for the shard suffix)")
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

/// One document (`label` names it in errors, e.g. "document 3"): a non-empty id, id,
/// text and metadata within their limits, metadata one JSON object. Returns the
/// metadata as it is kept from here on.
pub fn check_document(
    l: &Limits,
    label: &str,
    id: &str,
    text: &str,
    metadata_json: String,
) -> Result<Metadata, BadWrite> {
    if id.is_empty() {
        return Err(BadWrite(format!("{label}: the id is empty")));
    }
    within!(l, id_bytes, id.len(), format!("{label}'s id length"))?;
    within!(l, text_bytes, text.len(), format!("{label}'s text length"))?;
    within!(
        l,
        metadata_bytes,
        metadata_json.len(),
        format!("{label}'s metadata length")
    )?;
    Metadata::parse(metadata_json).map_err(|e| BadWrite(format!("{label} ({id:?}): {e}")))
}

/// Ids to delete: each non-empty and within `id_bytes`.
pub fn check_ids(l: &Limits, ids: &[String]) -> Result<(), BadWrite> {
    for (i, id) in ids.iter().enumerate() {
        if id.is_empty() {
            return Err(BadWrite(format!("id {i} is empty")));
        }
        within!(l, id_bytes, id.len(), format!("id {i}'s length"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_names_what_and_the_limit() {
        let l = Limits::from_pairs(&["docs_per_request=2", "metadata_bytes=10"]).unwrap();
        let e = check_batch(&l, 3, 0, "", 0).unwrap_err();
        assert!(e.0.contains("docs_per_request = 2"), "{e}");
        let e = check_batch(&l, 1, 0, &"r".repeat(l.request_id_bytes + 12), 11).unwrap_err();
        assert!(
            e.0.contains("request_id_bytes") && e.0.contains("+11"),
            "{e}"
        );
        assert!(check_batch(&l, 1, 0, &"r".repeat(l.request_id_bytes + 11), 11).is_ok());
        let e = check_document(&l, "document 0", "", "", String::new()).unwrap_err();
        assert_eq!(e.0, "document 0: the id is empty");
        let e = check_document(&l, "document 1", "a", "", "{\"k\":\"0123456\"}".into());
        assert!(e.unwrap_err().0.contains("metadata_bytes = 10"));
        let e = check_document(&l, "document 2", "a", "", "[1]".into()).unwrap_err();
        assert!(
            e.0.starts_with("document 2 (\"a\"): metadata must be a JSON object"),
            "{e}"
        );
        let m = check_document(&l, "document 3", "a", "", "{\"k\":1}".into()).unwrap();
        assert_eq!(m.as_str(), "{\"k\":1}");
        assert!(check_ids(&l, &["a".into(), String::new()]).is_err());
    }
}
