//! API keys with roles (issue 17): who a client is, and what it may do. One vocabulary
//! for the coordinators' Admin service and the nodes' public API.
//!
//! A key is `shoal_<id>_<secret>`: the id names its record in the cluster map, the
//! secret (32 random bytes, hex) is shown once when the key is made and stored only as
//! its SHA-256 (a random 256-bit secret needs no slow hash: nothing to guess). A record
//! has a role — read < write < admin — and optionally the collections it is limited
//! to. The root key (`shoal_root_<secret>`, from a file every process of the cluster
//! is given) is an admin key that needs no map: it makes the first keys.
//!
//! Decisions are one pure function, [`authorize`]; services map its [`Denied`] to
//! UNAUTHENTICATED (no key, an unknown, wrong or revoked one) or PERMISSION_DENIED (a
//! known key without the role or the collection) at their boundary.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The request header a key travels in: `authorization: Bearer shoal_...`.
pub const HEADER: &str = "authorization";
/// The id of the root key (no record in the map has it).
pub const ROOT_ID: &str = "root";
/// A key's name and each collection it names, at most this long; at most
/// [`MAX_KEY_COLLECTIONS`] collections per key.
pub const MAX_KEY_NAME: usize = 128;
pub const MAX_KEY_COLLECTIONS: usize = 64;
/// A presented key longer than this is refused before it is parsed or hashed.
const MAX_PRESENTED: usize = 256;

/// What a key may do; each role includes the ones below it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Search, get, describe and list.
    Read,
    /// Read, and ingest and delete documents.
    Write,
    /// Everything: collections, index builds, membership, drains, promotions, keys.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// As the proto carries it (`ApiKeyRole`: 0 unset).
    pub fn wire(self) -> i32 {
        self as i32 + 1
    }

    pub fn from_wire(v: i32) -> Option<Role> {
        match v {
            1 => Some(Role::Read),
            2 => Some(Role::Write),
            3 => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A key as the map holds it: never the secret, only its SHA-256 (hex).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Empty: every collection.
    pub collections: Vec<String>,
    pub sha256: String,
    pub created_ms: u64,
}

impl KeyRecord {
    /// A record's fields within their bounds (the map checks it before applying).
    pub fn problem(&self) -> Option<String> {
        if self.id.len() != 16 || !self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(format!("key id {:?} is not 16 hex digits", clip(&self.id)));
        }
        if self.name.is_empty() || self.name.len() > MAX_KEY_NAME {
            return Some(format!(
                "a key's name must be 1 to {MAX_KEY_NAME} bytes, not {}",
                self.name.len()
            ));
        }
        if self.collections.len() > MAX_KEY_COLLECTIONS {
            return Some(format!(
                "a key names {} collections, over the limit of {MAX_KEY_COLLECTIONS}",
                self.collections.len()
            ));
        }
        if let Some(c) = self
            .collections
            .iter()
            .find(|c| c.is_empty() || c.len() > MAX_KEY_NAME)
        {
            return Some(format!(
                "a key's collection name must be 1 to {MAX_KEY_NAME} bytes, not {}",
                c.len()
            ));
        }
        if self.sha256.len() != 64 {
            return Some("a key's sha256 must be 64 hex digits".into());
        }
        None
    }
}

impl KeyRecord {
    /// As the map's watchers get it (`with_hash`: nodes check keys; a listing does not
    /// show hashes).
    pub fn to_pb(&self, with_hash: bool) -> crate::coordinator::ApiKey {
        crate::coordinator::ApiKey {
            id: self.id.clone(),
            name: self.name.clone(),
            role: self.role.wire(),
            collections: self.collections.clone(),
            sha256: if with_hash {
                self.sha256.clone()
            } else {
                String::new()
            },
            created_ms: self.created_ms,
        }
    }

    /// From the map's watch stream; `None` for one without a known role.
    pub fn from_pb(k: crate::coordinator::ApiKey) -> Option<Self> {
        Some(Self {
            role: Role::from_wire(k.role)?,
            id: k.id,
            name: k.name,
            collections: k.collections,
            sha256: k.sha256,
            created_ms: k.created_ms,
        })
    }
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    // Every checked call hashes its key: one allocation, not one per byte.
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The SHA-256 of a key's secret, hex.
pub fn sha256(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    hex(&b)
}

/// A key just made: the whole key, shown to its maker once, and its record.
pub struct NewKey {
    pub key: String,
    pub record: KeyRecord,
}

/// Makes a key: a random id and secret, the record holding the secret's hash.
pub fn generate(name: &str, role: Role, collections: Vec<String>, now_ms: u64) -> NewKey {
    let (id, secret) = (random_hex(8), random_hex(32));
    NewKey {
        key: format!("shoal_{id}_{secret}"),
        record: KeyRecord {
            id,
            name: name.to_string(),
            role,
            collections,
            sha256: sha256(&secret),
            created_ms: now_ms,
        },
    }
}

/// A root key (`shoal_root_<secret>`), for a file every process is given.
pub fn generate_root() -> String {
    format!("shoal_{ROOT_ID}_{}", random_hex(32))
}

/// A key's id and secret, if it has the shape of one.
pub fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("shoal_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && secret.len() == 64).then_some((id, secret))
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// What a call needs.
#[derive(Clone, Copy, Debug)]
pub struct Need<'a> {
    pub role: Role,
    /// The collection it touches, when it touches one.
    pub collection: Option<&'a str>,
}

impl<'a> Need<'a> {
    pub fn role(role: Role) -> Self {
        Self {
            role,
            collection: None,
        }
    }

    pub fn on(role: Role, collection: &'a str) -> Self {
        Self {
            role,
            collection: Some(collection),
        }
    }
}

/// Who made a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The key's id (`root` for the root key, `anonymous` with keys off).
    pub id: String,
    pub name: String,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Denied::PermissionDenied(m) => tonic::Status::permission_denied(m),
        }
    }
}

/// The decision: the key `presented` (the header's value, without "Bearer ") against
/// the records `lookup` finds and the root key's hash, for `need`.
pub fn authorize(
    lookup: impl Fn(&str) -> Option<KeyRecord>,
    root_sha256: Option<&str>,
    presented: Option<&str>,
    need: Need,
) -> Result<Principal, Denied> {
    let Some(key) = presented else {
        return Err(Denied::Unauthenticated(format!(
            "this call needs an API key with the {} role (header {HEADER}: Bearer <key>; the CLI's --api-key)",
            need.role.name()
        )));
    };
    if key.len() > MAX_PRESENTED {
        return Err(Denied::Unauthenticated(format!(
            "the API key is {} bytes, over the limit of {MAX_PRESENTED}",
            key.len()
        )));
    }
    let Some((id, secret)) = parse(key) else {
        return Err(Denied::Unauthenticated(
            "the API key is malformed (expected shoal_<id>_<64 hex digits>)".into(),
        ));
    };
    let hash = sha256(secret);
    if id == ROOT_ID {
        return match root_sha256 {
            Some(r) if same(r, &hash) => Ok(Principal {
                id: ROOT_ID.into(),
                name: ROOT_ID.into(),
                role: Role::Admin,
            }),
            _ => Err(Denied::Unauthenticated(
                "the root key is not this cluster's".into(),
            )),
        };
    }
    let Some(rec) = lookup(id).filter(|r| same(&r.sha256, &hash)) else {
        return Err(Denied::Unauthenticated(format!(
            "API key {id} is unknown, revoked or wrong"
        )));
    };
    if rec.role < need.role {
        return Err(Denied::PermissionDenied(format!(
            "API key {id} ({}) has the {} role; this call needs {}",
            rec.name,
            rec.role.name(),
            need.role.name()
        )));
    }
    if !rec.collections.is_empty() {
        match need.collection {
            Some(c) if rec.collections.iter().any(|k| k == c) => {}
            Some(c) => {
                return Err(Denied::PermissionDenied(format!(
                    "API key {id} ({}) is limited to collections {:?}, not {c:?}",
                    rec.name, rec.collections
                )))
            }
            // A call over every collection (listing the cluster, making one).
            None => {
                return Err(Denied::PermissionDenied(format!(
                    "API key {id} ({}) is limited to collections {:?}; this call is not about one",
                    rec.name, rec.collections
                )))
            }
        }
    }
    Ok(Principal {
        id: rec.id,
        name: rec.name,
        role: rec.role,
    })
}

/// The key a request carries, if any (`Bearer ` stripped).
pub fn presented(metadata: &MetadataMap) -> Option<&str> {
    let v = metadata.get(HEADER)?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim())
}

/// Whether a request came with a client certificate (the public port verifies any it
/// is shown against the cluster's CA: holding one means being part of the cluster).
pub fn has_cluster_certificate<T>(req: &tonic::Request<T>) -> bool {
    req.peer_certs().is_some_and(|c| !c.is_empty())
}

/// A process's side of keys: whether they are on, and the root key's hash.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    root_sha256: Option<String>,
}

impl Keys {
    /// Keys off: every call is allowed (a process started with `--insecure`).
    pub fn off() -> Self {
        Self { root_sha256: None }
    }

    /// Keys on, with the root key read from `file`.
    pub fn from_root_file(file: &Path) -> Result<Self, String> {
        let key = read_key_file(file)?;
        match parse(&key) {
            Some((ROOT_ID, secret)) => Ok(Self {
                root_sha256: Some(sha256(secret)),
            }),
            _ => Err(format!(
                "{} does not hold a root key (shoal_root_<64 hex digits>)",
                file.display()
            )),
        }
    }

    /// A process's keys from its root key file (off, with a warning, without one),
    /// with its audit log opened when it names one.
    pub fn start(
        root_key_file: Option<&Path>,
        audit_log: Option<&Path>,
        what: &str,
    ) -> Result<Self, String> {
        if let Some(a) = audit_log {
            crate::audit::open(a)
                .map_err(|e| format!("opening the audit log {}: {e}", a.display()))?;
        }
        match root_key_file {
            Some(f) => Self::from_root_file(f),
            None => {
                tracing::warn!(
                    "API keys are off: this {what} takes every call from anyone who reaches it"
                );
                Ok(Self::off())
            }
        }
    }

    pub fn on(&self) -> bool {
        self.root_sha256.is_some()
    }

    /// [`authorize`] for a call's metadata (with keys off, an anonymous admin); a
    /// refusal is audited ([`crate::audit::refused`]) and becomes its gRPC status.
    /// `action` names the RPC, `target` what it is about, for the audit record.
    pub fn allow(
        &self,
        metadata: &MetadataMap,
        lookup: impl Fn(&str) -> Option<KeyRecord>,
        action: &str,
        target: &str,
        need: Need,
    ) -> Result<Principal, tonic::Status> {
        let Some(root) = &self.root_sha256 else {
            return Ok(Principal {
                id: "anonymous".into(),
                name: "anonymous".into(),
                role: Role::Admin,
            });
        };
        let key = presented(metadata);
        authorize(lookup, Some(root), key, need).map_err(|d| {
            crate::audit::refused(key, action, target, &d);
            d.into()
        })
    }
}

/// A key from a file (its first line, trimmed), refusing an empty or oversized one.
pub fn read_key_file(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("reading the key file {}: {e}", file.display()))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() || key.len() > MAX_PRESENTED {
        return Err(format!(
            "{} holds no key (or one over {MAX_PRESENTED} bytes)",
            file.display()
        ));
    }
    Ok(key)
}

// ---- the client side ---------------------------------------------------------------

static CLIENT_KEY: OnceLock<Arc<str>> = OnceLock::new();

/// Every client this process makes from now on sends `key` (set once, at start).
pub fn use_key(key: String) {
    let _ = CLIENT_KEY.set(key.into());
}

/// The key this process's clients send, if one was set.
pub fn process_key() -> Option<Arc<str>> {
    CLIENT_KEY.get().cloned()
}

/// Adds a key to every request of a client.
#[derive(Clone, Default)]
pub struct Attach(Option<Arc<str>>);

impl Attach {
    pub fn key(key: Option<Arc<str>>) -> Self {
        Self(key)
    }

    /// The process's key ([`use_key`]).
    pub fn process() -> Self {
        Self(process_key())
    }
}

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(k) = &self.0 {
            let v = format!("Bearer {k}").parse().map_err(|_| {
                tonic::Status::invalid_argument("the API key is not a valid header")
            })?;
            req.metadata_mut().insert(HEADER, v);
        }
        Ok(req)
    }
}

/// A channel whose requests carry a key.
pub type Authed = InterceptedService<Channel, Attach>;

/// A node's public client carrying the process's key.
pub fn shoal_client(channel: Channel) -> crate::v1::shoal_client::ShoalClient<Authed> {
    crate::v1::shoal_client::ShoalClient::with_interceptor(channel, Attach::process())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(recs: &[KeyRecord]) -> impl Fn(&str) -> Option<KeyRecord> + '_ {
        move |id| recs.iter().find(|r| r.id == id).cloned()
    }

    #[test]
    fn keys_roles_and_collections_decide() {
        let read = generate("reader", Role::Read, vec![], 1);
        let write = generate("writer", Role::Write, vec!["a".into()], 1);
        let admin = generate("ops", Role::Admin, vec![], 1);
        let recs = [
            read.record.clone(),
            write.record.clone(),
            admin.record.clone(),
        ];
        let root = generate_root();
        let root_hash = sha256(parse(&root).unwrap().1);
        let auth = |k: Option<&str>, n| authorize(ring(&recs), Some(&root_hash), k, n);

        let unauth = |r: Result<Principal, Denied>| matches!(r, Err(Denied::Unauthenticated(_)));
        let denied = |r: Result<Principal, Denied>| matches!(r, Err(Denied::PermissionDenied(_)));
        // Missing, malformed, wrong secret, unknown id, another cluster's root.
        assert!(unauth(auth(None, Need::role(Role::Read))));
        assert!(unauth(auth(Some("hello"), Need::role(Role::Read))));
        let (id, _) = parse(&read.key).unwrap();
        let wrong = format!("shoal_{id}_{}", "0".repeat(64));
        assert!(unauth(auth(Some(&wrong), Need::role(Role::Read))));
        assert!(unauth(auth(
            Some(&generate("x", Role::Admin, vec![], 1).key),
            Need::role(Role::Read)
        )));
        assert!(unauth(auth(Some(&generate_root()), Need::role(Role::Read))));
        assert!(unauth(auth(Some(&"x".repeat(300)), Need::role(Role::Read))));
        // Roles.
        assert!(auth(Some(&read.key), Need::on(Role::Read, "a")).is_ok());
        assert!(denied(auth(Some(&read.key), Need::on(Role::Write, "a"))));
        assert!(auth(Some(&write.key), Need::on(Role::Write, "a")).is_ok());
        assert!(denied(auth(Some(&write.key), Need::role(Role::Admin))));
        assert!(auth(Some(&admin.key), Need::role(Role::Admin)).is_ok());
        assert_eq!(
            auth(Some(&root), Need::role(Role::Admin)).unwrap().id,
            ROOT_ID
        );
        // A key limited to a collection: refused on another, and on calls over all.
        assert!(denied(auth(Some(&write.key), Need::on(Role::Write, "b"))));
        assert!(denied(auth(Some(&write.key), Need::role(Role::Read))));
        // Revoked: gone from the map.
        let fewer = [read.record.clone()];
        assert!(unauth(authorize(
            ring(&fewer),
            Some(&root_hash),
            Some(&admin.key),
            Need::role(Role::Read)
        )));
    }

    #[test]
    fn records_are_bounded() {
        let mut r = generate("k", Role::Read, vec![], 1).record;
        assert!(r.problem().is_none());
        r.name = "n".repeat(MAX_KEY_NAME + 1);
        assert!(r.problem().unwrap().contains("name"));
        r.name = "k".into();
        r.collections = vec!["c".into(); MAX_KEY_COLLECTIONS + 1];
        assert!(r.problem().unwrap().contains("limit"));
        r.collections.clear();
        r.id = "../x".into();
        assert!(r.problem().unwrap().contains("hex"));
    }
}
