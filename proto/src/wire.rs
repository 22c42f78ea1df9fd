//! Bincode for everything shoal's processes exchange or keep as serde values (Raft
//! messages and log entries, forwarded writes, replicated WAL batches, shard records),
//! decoded with a bound before anything is allocated.
//!
//! bincode trusts length prefixes: a 13-byte message claiming a 2^62-byte string made
//! an unbounded decode allocate 4 EiB and abort the coordinator (issue 13). Here every
//! decode runs under bincode's claim limit, sized from the input itself: no container
//! can need more than `CLAIM_FACTOR` times the bytes it arrived in (a varint u64 claims
//! 8 in-memory bytes for 1 wire byte; strings and bytes claim exactly their length), so
//! a decode allocates at most that, and a prefix claiming more is refused before it
//! allocates. Trailing bytes are refused too: both ends are shoal, a payload that does
//! not end where its value does was misread.
//!
//! `FORMAT` travels next to every internal payload (`Payload.format`,
//! `AppendRequest.format`) so a peer running another encoding is refused by name
//! instead of being misread.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The encoding of internal payloads. Bump it with any change to a type that crosses
/// the network as bincode.
pub const FORMAT: u32 = 9;

/// In-memory bytes a decode may claim per input byte (see the module comment).
pub const CLAIM_FACTOR: usize = 16;

/// Largest input any decode accepts (on disk or from the network).
pub const MAX_INPUT_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("payload format {got} is not this build's format {want} (a peer of another version?)")]
    Format { got: u32, want: u32 },
    #[error("payload of {bytes} bytes exceeds the decode limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("payload does not decode: {0}")]
    Decode(String),
}

/// Refuses a payload whose declared format is not [`FORMAT`].
pub fn check_format(got: u32) -> Result<(), WireError> {
    if got == FORMAT {
        Ok(())
    } else {
        Err(WireError::Format { got, want: FORMAT })
    }
}

pub fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .expect("in-memory bincode encoding cannot fail")
}

fn decode_limited<T: DeserializeOwned, const N: usize>(bytes: &[u8]) -> Result<T, WireError> {
    let cfg = bincode::config::standard().with_limit::<N>();
    let (v, used) = bincode::serde::decode_from_slice(bytes, cfg).map_err(|e| match e {
        bincode::error::DecodeError::LimitExceeded => WireError::Decode(format!(
            "a length prefix claims more than the {N}-byte limit for a {}-byte payload",
            bytes.len()
        )),
        e => WireError::Decode(e.to_string()),
    })?;
    if used != bytes.len() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(v)
}

/// Decodes `bytes`, allocating at most `CLAIM_FACTOR` × their length (rounded up to a
/// power of four, at least 64 KiB).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(WireError::TooLarge {
            bytes: bytes.len(),
            limit: MAX_INPUT_BYTES,
        });
    }
    let need = bytes.len().saturating_mul(CLAIM_FACTOR);
    macro_rules! classes {
        ($($n:expr),*) => {
            $( if need <= $n { return decode_limited::<T, { $n }>(bytes); } )*
        };
    }
    classes!(
        1 << 16,
        1 << 18,
        1 << 20,
        1 << 22,
        1 << 24,
        1 << 26,
        1 << 28,
        1 << 30,
        1 << 32,
        1 << 34
    );
    unreachable!("MAX_INPUT_BYTES × CLAIM_FACTOR fits the largest class")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Doc {
        id: String,
        vector: Vec<f32>,
        seq: u64,
    }

    #[test]
    fn values_round_trip() {
        let d = Doc {
            id: "a".repeat(1000),
            vector: vec![1.5; 384],
            seq: u64::MAX,
        };
        assert_eq!(decode::<Doc>(&encode(&d)).unwrap(), d);
        let many: Vec<u64> = (0..100_000).collect();
        assert_eq!(decode::<Vec<u64>>(&encode(&many)).unwrap(), many);
    }

    #[test]
    fn a_huge_length_prefix_is_refused_before_allocating() {
        // The 13-byte shape from issue 13: a varint length claiming 2^62 bytes.
        let mut b = vec![0xfd];
        b.extend_from_slice(&(1u64 << 62).to_le_bytes());
        b.extend_from_slice(b"abcd");
        let e = decode::<String>(&b).unwrap_err();
        assert!(matches!(e, WireError::Decode(_)), "{e}");
        let e = decode::<Vec<Vec<u8>>>(&b).unwrap_err();
        assert!(matches!(e, WireError::Decode(_)), "{e}");
    }

    #[test]
    fn trailing_bytes_and_truncation_are_refused() {
        let mut b = encode(&7u64);
        b.push(0);
        assert!(decode::<u64>(&b).is_err());
        let b = encode(&"hello".to_string());
        assert!(decode::<String>(&b[..3]).is_err());
    }

    #[test]
    fn formats_are_checked() {
        assert!(check_format(FORMAT).is_ok());
        assert_eq!(
            check_format(0),
            Err(WireError::Format {
                got: 0,
                want: FORMAT
            })
        );
    }
}
