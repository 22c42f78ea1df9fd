//! openraft's type configuration for the coordinator group, and the bincode codec used
//! for everything Raft puts on disk or on the wire (`shoal_proto::wire`: bounded
//! decodes, a format version on every payload between members).

use std::fmt;
use std::io::Cursor;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use shoal_proto::raft::Payload;
use shoal_proto::wire::{self, WireError};

use crate::map::{Command, MapError};

/// A coordinator member as Raft knows it: where peers reach its Raft service, and where
/// clients reach its public API (so a follower can name the leader to a client).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub raft_addr: String,
    pub api_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.command)
    }
}

/// The outcome of applying one command: the map version it produced, or why the map
/// refused it (a refused command is still a committed log entry, and changes nothing).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Response {
    pub version: u64,
    pub error: Option<MapError>,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type StorageError = openraft::StorageError<u64>;

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    wire::encode(v)
}

/// Decodes bytes this member stored (bounded like everything else: a damaged length
/// prefix is an error, not an allocation).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    wire::decode(bytes).map_err(|e| e.to_string())
}

/// `v` as a payload for another member, stamped with this build's format.
pub fn payload<T: Serialize>(v: &T) -> Payload {
    Payload {
        data: wire::encode(v),
        format: wire::FORMAT,
    }
}

/// A payload from another member: its format checked, then decoded within bounds.
pub fn open<T: DeserializeOwned>(p: &Payload) -> Result<T, WireError> {
    wire::check_format(p.format)?;
    wire::decode(&p.data)
}
