//! Every limit a client or a peer can hit, in one place: each a named setting with a
//! documented default (`shoal limits` prints them; `--limit NAME=VALUE` on `shoal node`
//! and `shoal coordinator` sets one), and each refusal an error naming the limit and
//! its value, mapped to a gRPC status at the service boundary.
//!
//! What is bounded and why (issue 13): anything a request makes a process keep, scan or
//! allocate — ids kept in maps and manifests, text tokenised, candidates gathered per
//! shard, rows scanned by an exact search, fan-out, streams per connection, time — so
//! no input can crash a process or make it allocate without bound.

use std::time::Duration;

macro_rules! limits {
    ($( $(#[doc = $doc:literal])+ $field:ident : $ty:ty = $default:expr; )*) => {
        /// The settings; `Limits::default()` is what a process runs with unless told.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct Limits {
            $( $(#[doc = $doc])+ pub $field: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl Limits {
            /// Every limit's name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Sets the limit `name` from its decimal `value`.
            pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
                match name {
                    $( stringify!($field) => {
                        let v: $ty = value
                            .parse()
                            .map_err(|e| format!("limit {name}: {value:?}: {e}"))?;
                        if v == 0 {
                            return Err(format!("limit {name} must be positive"));
                        }
                        self.$field = v;
                    } )*
                    _ => {
                        return Err(format!(
                            "unknown limit {name:?}; the limits are: {}",
                            Self::NAMES.join(", ")
                        ))
                    }
                }
                Ok(())
            }

            /// (name, value, what it bounds) for every limit.
            pub fn describe(&self) -> Vec<(&'static str, u64, String)> {
                vec![$( (
                    stringify!($field),
                    self.$field as u64,
                    [$($doc.trim()),+].join(" "),
                ) ),*]
            }
        }
    };
}

limits! {
    /// Bytes in a collection name, or any other name a request refers to (checked
    /// before the name is looked up or echoed in an error).
    name_bytes: usize = 256;
    /// Bytes in a document id.
    id_bytes: usize = 512;
    /// Bytes in a client's request id (kept per shard to make retries idempotent).
    request_id_bytes: usize = 128;
    /// Bytes of one document's text, checked before tokenisation.
    text_bytes: usize = 256 << 10;
    /// Bytes of a query's text, checked before tokenisation.
    query_text_bytes: usize = 16 << 10;
    /// Bytes of one document's metadata JSON.
    metadata_bytes: usize = 64 << 10;
    /// Documents in one ingest request (text-only ones are encoded in parts the
    /// encoder queue takes).
    docs_per_request: usize = 10_000;
    /// Ids in one delete request.
    ids_per_delete: usize = 10_000;
    /// Hits a search returns (k).
    k: usize = 1_000;
    /// Refine factor of a search (IVF-PQ candidates per hit).
    refine: usize = 1_000;
    /// k × refine: candidates one shard gathers and re-scores for one search.
    candidates: usize = 100_000;
    /// Rows one shard scans for one exact search (its cost limit).
    exact_rows: usize = 10_000_000;
    /// Bytes of texts and metadata one search returns with its hits (`with_text`,
    /// `with_payload`; issue 22): each shard's part, and the merged answer.
    payload_bytes: usize = 16 << 20;
    /// Conditions and listed values in one search filter (issue 22), nested ones
    /// included.
    filter_terms: usize = 1_024;
    /// Metadata fields one collection indexes for filters (issue 22).
    payload_fields: usize = 64;
    /// Searches in one SearchBatch request (issue 22).
    searches_per_batch: usize = 64;
    /// Largest gRPC message a public server decodes (bytes).
    message_bytes: usize = 32 << 20;
    /// Largest gRPC message an internal server decodes (bytes): replica traffic.
    internal_message_bytes: usize = 256 << 20;
    /// Concurrent HTTP/2 streams per connection.
    streams_per_connection: u32 = 256;
    /// Requests served concurrently per connection (more wait).
    requests_per_connection: usize = 256;
    /// Server-side deadline of a node's calls (ms); a client's shorter grpc-timeout wins.
    node_request_timeout_ms: u64 = 3_600_000;
    /// Server-side deadline of a coordinator's calls (ms).
    coordinator_request_timeout_ms: u64 = 60_000;
    /// Longest client deadline (grpc-timeout) honoured (ms); longer ones are cut to it.
    max_deadline_ms: u64 = 3_600_000;
    /// HTTP/2 keepalive ping interval (ms); a peer silent for as long again is dropped.
    keepalive_ms: u64 = 20_000;
    /// Bytes in a worker node's id.
    node_id_bytes: usize = 128;
    /// Bytes in an address (host:port) a node or member registers.
    addr_bytes: usize = 256;
    /// Bytes in a zone name.
    zone_bytes: usize = 64;
    /// Members (voters and learners) of the coordinator group.
    coordinator_members: usize = 16;
    /// Worker nodes a cluster map holds.
    nodes: usize = 10_000;
    /// Replica reports in one heartbeat.
    reports_per_heartbeat: usize = 100_000;
    /// Files in one shard snapshot a backup receives.
    snapshot_files: usize = 1_024;
    /// Replicas of one shard (a collection's replication factor).
    replication_factor: u32 = 16;
}

/// The defaults of (id_bytes, request_id_bytes, candidates), for the shard engine's
/// compile-time check that its own ceilings are no lower.
pub const DEFAULT_CEILINGS: (usize, usize, usize) = (512, 128, 100_000);

impl Limits {
    pub fn node_request_timeout(&self) -> Duration {
        Duration::from_millis(self.node_request_timeout_ms)
    }
    pub fn coordinator_request_timeout(&self) -> Duration {
        Duration::from_millis(self.coordinator_request_timeout_ms)
    }
    pub fn max_deadline(&self) -> Duration {
        Duration::from_millis(self.max_deadline_ms)
    }

    /// Parses `NAME=VALUE` pairs (the `--limit` flags) over the defaults.
    pub fn from_pairs<S: AsRef<str>>(pairs: &[S]) -> Result<Self, String> {
        let mut l = Self::default();
        l.apply_pairs(pairs)?;
        Ok(l)
    }

    /// Sets the limits `NAME=VALUE` pairs name, over the current values.
    pub fn apply_pairs<S: AsRef<str>>(&mut self, pairs: &[S]) -> Result<(), String> {
        for p in pairs {
            let p = p.as_ref();
            let (name, value) = p
                .split_once('=')
                .ok_or_else(|| format!("--limit {p:?}: expected NAME=VALUE"))?;
            self.set(name.trim(), value.trim())?;
        }
        Ok(())
    }

    /// A gRPC server with the connection limits: concurrent streams and requests per
    /// connection, HTTP/2 keepalive, the given server-side deadline, and status
    /// messages clipped to a size every client accepts (`clip`).
    pub fn server(
        &self,
        timeout: Duration,
    ) -> tonic::transport::Server<
        tower_layer::Stack<crate::clip::ClipStatusLayer, tower_layer::Identity>,
    > {
        let ka = Duration::from_millis(self.keepalive_ms);
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.streams_per_connection))
            .concurrency_limit_per_connection(self.requests_per_connection)
            .http2_keepalive_interval(Some(ka))
            .http2_keepalive_timeout(Some(ka))
            .http2_max_pending_accept_reset_streams(Some(64))
            .timeout(timeout)
            .layer(crate::clip::ClipStatusLayer)
    }
}

/// A request over one of the limits: which, its value, and what exceeded it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {got}, over the limit {name} = {limit}")]
pub struct Exceeded {
    pub name: &'static str,
    pub limit: u64,
    pub got: u64,
    pub what: String,
}

impl From<Exceeded> for tonic::Status {
    fn from(e: Exceeded) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// `Ok` when `got` is within `limits.$field`, else `Exceeded` naming the field.
#[macro_export]
macro_rules! within {
    ($limits:expr, $field:ident, $got:expr, $what:expr) => {{
        let (limit, got) = ($limits.$field as u64, $got as u64);
        if got > limit {
            Err($crate::limits::Exceeded {
                name: stringify!($field),
                limit,
                got,
                what: $what.to_string(),
            })
        } else {
            Ok(())
        }
    }};
}

/// The largest squared L2 norm a stored or query vector may have: with both norms
/// under it, inner products (≤ |q||v|) and squared L2 distances (≤ (|q|+|v|)²) stay
/// finite in f32, in scores and in FAISS's training alike.
pub const MAX_SQUARED_NORM: f64 = (f32::MAX as f64) / 4.0;

/// Why `v` cannot be stored or searched with in a `dimension`-d collection, if it
/// cannot: a wrong length, a NaN or infinity, or a norm whose scores would overflow.
pub fn vector_problem(v: &[f32], dimension: usize) -> Option<String> {
    if v.len() != dimension {
        return Some(format!(
            "has dimension {}, the collection's is {dimension}",
            v.len()
        ));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Some(format!("has a non-finite value at position {i} ({})", v[i]));
    }
    let sq: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if sq > MAX_SQUARED_NORM {
        return Some(format!(
            "has a squared norm of {sq:e}, over the {MAX_SQUARED_NORM:e} at which scores \
             would overflow"
        ));
    }
    None
}

/// A `grpc-timeout` header's value as a duration, capped at `max` (the header allows
/// 8 digits of hours, past what an `Instant` can add). None when malformed.
pub fn parse_grpc_timeout(v: &str, max: Duration) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    if !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_match_the_defaults() {
        let l = Limits::default();
        assert_eq!(
            DEFAULT_CEILINGS,
            (l.id_bytes, l.request_id_bytes, l.candidates)
        );
    }

    #[test]
    fn limits_are_named_and_settable() {
        let mut l = Limits::default();
        l.set("k", "50").unwrap();
        assert_eq!(l.k, 50);
        assert!(l.set("k", "0").unwrap_err().contains("positive"));
        assert!(l.set("nope", "1").unwrap_err().contains("unknown limit"));
        assert!(l.set("k", "x").unwrap_err().contains("limit k"));
        let d = l.describe();
        assert_eq!(d.len(), Limits::NAMES.len());
        assert!(d.iter().all(|(_, v, doc)| *v > 0 && !doc.is_empty()));
        let l = Limits::from_pairs(&["id_bytes=16", " k = 7"]).unwrap();
        assert_eq!((l.id_bytes, l.k), (16, 7));
        assert!(Limits::from_pairs(&["id_bytes"]).is_err());
    }

    #[test]
    fn exceeded_names_the_limit_and_its_value() {
        let l = Limits::default();
        assert!(within!(l, k, 1000, "k").is_ok());
        let e = within!(l, k, 1001, "k").unwrap_err();
        assert_eq!(e.name, "k");
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("limit k = 1000"), "{}", s.message());
    }

    #[test]
    fn vectors_must_be_finite_and_not_overflow() {
        assert!(vector_problem(&[1.0, 2.0], 2).is_none());
        assert!(vector_problem(&[1.0], 2).unwrap().contains("dimension 1"));
        assert!(vector_problem(&[1.0, f32::NAN], 2)
            .unwrap()
            .contains("position 1"));
        assert!(vector_problem(&[f32::INFINITY, 0.0], 2).is_some());
        // Finite, but its square overflows f32: scores would be inf.
        assert!(vector_problem(&[3e19, 0.0], 2).unwrap().contains("norm"));
        assert!(vector_problem(&[1e18, 1e18], 2).is_none());
    }

    #[test]
    fn grpc_timeouts_are_parsed_and_capped() {
        let max = Duration::from_secs(3600);
        assert_eq!(
            parse_grpc_timeout("250m", max),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout("99999999H", max), Some(max));
        assert_eq!(parse_grpc_timeout("999999999999H", max), None);
        assert_eq!(parse_grpc_timeout("H", max), None);
        assert_eq!(parse_grpc_timeout("-1S", max), None);
        assert_eq!(parse_grpc_timeout("5x", max), None);
    }
}
