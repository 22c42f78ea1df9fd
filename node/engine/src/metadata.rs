//! A document's metadata as it is kept: the text of one JSON object, checked once where
//! it enters (`Metadata::parse`: a single pass over the text that builds nothing) and
//! from there on carried, logged, stored, replicated and returned as those bytes,
//! never parsed into a tree and printed again. Empty means none.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(String);

impl Metadata {
    /// No metadata.
    pub fn none() -> Metadata {
        Metadata(String::new())
    }

    /// `text` if it is one JSON object (or empty: none); else why not.
    pub fn parse(text: String) -> Result<Metadata, String> {
        Metadata::check(&text)?;
        Ok(Metadata(text))
    }

    /// Whether `text` is one JSON object (or empty), without keeping it.
    pub fn check(text: &str) -> Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        let mut de = serde_json::Deserializer::from_str(text);
        de.deserialize_map(ObjectOnly)
            .and_then(|()| de.end())
            .map_err(|e| format!("metadata must be a JSON object: {e}"))
    }

    /// An object (or null: none) as metadata. For callers that build metadata in code.
    pub fn from_value(v: &serde_json::Value) -> Result<Metadata, String> {
        match v {
            serde_json::Value::Null => Ok(Metadata::none()),
            serde_json::Value::Object(_) => Ok(Metadata(v.to_string())),
            other => Err(format!("metadata must be a JSON object, not {other}")),
        }
    }

    /// Text read back from this shard's own files (checked when it was written; the
    /// records' checksums cover it since). Records written before metadata was kept as
    /// bytes hold `null` for none.
    pub(crate) fn stored(text: String) -> Metadata {
        if text == "null" {
            Metadata::none()
        } else {
            Metadata(text)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// Parsed, for display and tests (null when none).
    pub fn to_value(&self) -> serde_json::Value {
        if self.0.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
        }
    }
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Accepts a JSON object and nothing else, ignoring its contents (no allocation).
struct ObjectOnly;

impl<'de> Visitor<'de> for ObjectOnly {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_json_object_is_metadata() {
        for ok in ["", "{}", "{\"a\":[1,{\"b\":null}],\"c\":\"x\"}", " { } "] {
            assert_eq!(Metadata::parse(ok.into()).unwrap().as_str(), ok);
        }
        for bad in [
            "null", "[]", "1", "\"s\"", "{", "{}{}", "{} x", "{\"a\":}", "{1:2}",
        ] {
            assert!(Metadata::parse(bad.into()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn stored_null_reads_as_none() {
        assert!(Metadata::stored("null".into()).is_empty());
        assert_eq!(Metadata::stored("{\"a\":1}".into()).as_str(), "{\"a\":1}");
        assert_eq!(
            Metadata::from_value(&serde_json::json!({"a": 1}))
                .unwrap()
                .to_value(),
            serde_json::json!({"a": 1})
        );
        assert!(Metadata::from_value(&serde_json::json!([1])).is_err());
    }
}
