//! Filters over document metadata (issue 22), the one vocabulary for them: the
//! fields a collection indexes (`PayloadField`: a dotted path and a kind; kept in
//! the map's collection policy, bincode: variant order is the Raft log's format),
//! the filter a search carries (`Filter`: must / should / must_not over conditions),
//! its checks against the indexed fields and the limits (`Filter::check`, answered as
//! INVALID_ARGUMENT by the gateway), its wire and JSON forms (converted here and
//! nowhere else), and its meaning over one document's metadata (`Filter::matches`):
//! the reference every shard's payload index (`shoal-engine`'s `payload_index.rs`)
//! is tested against.
//!
//! Paths: `a.b.c` walks objects; an array met on the way (or at the end) stands for
//! each of its elements, so `tags` matches a document whose `tags` holds the value
//! and `authors.name` one with any author of that name. A value of another kind than
//! the field's (a string under a number field) is not indexed: no condition on that
//! field sees it.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::coordinator as cpb;
use crate::limits::Limits;

/// How an indexed field's values are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    /// Strings, and booleans as `"true"` / `"false"`: equality and `in`.
    Keyword,
    /// Numbers (as f64): equality, `in` and ranges.
    Number,
}

impl FieldKind {
    pub fn name(self) -> &'static str {
        match self {
            FieldKind::Keyword => "keyword",
            FieldKind::Number => "number",
        }
    }
}

/// A metadata field a collection indexes for filters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PayloadField {
    pub path: String,
    pub kind: FieldKind,
}

/// Nesting depth of a filter (a condition holding a filter is one level down).
pub const MAX_FILTER_DEPTH: usize = 8;
/// Segments of a field's dotted path.
pub const MAX_PATH_SEGMENTS: usize = 8;

impl PayloadField {
    /// `path:kind` as operators write it (`year:number`, `lang:keyword`).
    pub fn parse(s: &str) -> Result<PayloadField, String> {
        let (path, kind) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("index field {s:?}: write PATH:keyword or PATH:number"))?;
        let kind = match kind {
            "keyword" | "string" | "bool" => FieldKind::Keyword,
            "number" | "float" | "int" | "integer" => FieldKind::Number,
            other => {
                return Err(format!(
                    "index field {s:?}: kind {other:?} is neither keyword nor number"
                ))
            }
        };
        Ok(PayloadField {
            path: path.to_string(),
            kind,
        })
    }

    /// A collection's whole list as a client sends it: within the limits, and
    /// [`PayloadField::check_paths`].
    pub fn check_all(fields: &[PayloadField], limits: &Limits) -> Result<(), String> {
        crate::within!(limits, payload_fields, fields.len(), "indexed fields")
            .map_err(|e| e.to_string())?;
        for f in fields {
            crate::within!(limits, name_bytes, f.path.len(), "bytes in a field path")
                .map_err(|e| e.to_string())?;
        }
        PayloadField::check_paths(fields)
    }

    /// Each path well formed, none twice: what the cluster map checks on apply (no
    /// process's limits there, so every member decides alike).
    pub fn check_paths(fields: &[PayloadField]) -> Result<(), String> {
        for (i, f) in fields.iter().enumerate() {
            check_path(&f.path)?;
            if fields[..i].iter().any(|g| g.path == f.path) {
                return Err(format!("field {:?} is indexed twice", f.path));
            }
        }
        Ok(())
    }

    pub fn from_wire(f: &cpb::PayloadField) -> Result<PayloadField, String> {
        let kind = match cpb::FieldKind::try_from(f.kind) {
            Ok(cpb::FieldKind::Keyword) => FieldKind::Keyword,
            Ok(cpb::FieldKind::Number) => FieldKind::Number,
            _ => {
                return Err(format!(
                    "field {:?}: kind must be keyword or number (got {})",
                    f.path, f.kind
                ))
            }
        };
        Ok(PayloadField {
            path: f.path.clone(),
            kind,
        })
    }

    pub fn wire(&self) -> cpb::PayloadField {
        cpb::PayloadField {
            path: self.path.clone(),
            kind: match self.kind {
                FieldKind::Keyword => cpb::FieldKind::Keyword,
                FieldKind::Number => cpb::FieldKind::Number,
            } as i32,
        }
    }
}

impl fmt::Display for PayloadField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path, self.kind.name())
    }
}

fn check_path(path: &str) -> Result<(), String> {
    let segments = path.split('.').count();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(format!(
            "field path {path:?} must be names joined by dots (a.b.c)"
        ));
    }
    if segments > MAX_PATH_SEGMENTS {
        return Err(format!(
            "field path {path:?} has {segments} segments (at most {MAX_PATH_SEGMENTS})"
        ));
    }
    Ok(())
}

/// A value a condition compares with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Keyword(String),
    Number(f64),
    Bool(bool),
}

impl Value {
    /// The kind of field this value can be compared with.
    pub fn kind(&self) -> FieldKind {
        match self {
            Value::Number(_) => FieldKind::Number,
            Value::Keyword(_) | Value::Bool(_) => FieldKind::Keyword,
        }
    }

    /// As a keyword field holds it (booleans as their names).
    pub fn keyword(&self) -> Option<&str> {
        match self {
            Value::Keyword(s) => Some(s),
            Value::Bool(true) => Some("true"),
            Value::Bool(false) => Some("false"),
            Value::Number(_) => None,
        }
    }
}

/// Bounds on a number; unset ones are open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
}

impl Range {
    pub fn contains(&self, x: f64) -> bool {
        self.gt.is_none_or(|b| x > b)
            && self.gte.is_none_or(|b| x >= b)
            && self.lt.is_none_or(|b| x < b)
            && self.lte.is_none_or(|b| x <= b)
    }

    /// The range of exactly `x`.
    pub fn point(x: f64) -> Range {
        Range {
            gte: Some(x),
            lte: Some(x),
            ..Range::default()
        }
    }

    fn bounds(&self) -> impl Iterator<Item = f64> {
        [self.gt, self.gte, self.lt, self.lte].into_iter().flatten()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    Match {
        key: String,
        value: Value,
    },
    In {
        key: String,
        values: Vec<Value>,
    },
    Range {
        key: String,
        range: Range,
    },
    /// `exists: true`: the field has a value of its kind; false: none.
    Exists {
        key: String,
        exists: bool,
    },
    Nested(Filter),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    pub must: Vec<Condition>,
    pub should: Vec<Condition>,
    pub must_not: Vec<Condition>,
}

impl Filter {
    /// Matches every document.
    pub fn is_empty(&self) -> bool {
        self.must.is_empty() && self.should.is_empty() && self.must_not.is_empty()
    }

    fn conditions(&self) -> impl Iterator<Item = &Condition> {
        self.must.iter().chain(&self.should).chain(&self.must_not)
    }

    /// Every condition names an indexed field with a test its kind allows; values
    /// finite; a range bounded; within the nesting depth and the `filter_terms` limit.
    pub fn check(&self, fields: &[PayloadField], limits: &Limits) -> Result<(), String> {
        let mut terms = 0usize;
        self.check_at(fields, limits, 1, &mut terms)?;
        crate::within!(
            limits,
            filter_terms,
            terms,
            "conditions and values in a filter"
        )
        .map_err(|e| e.to_string())
    }

    fn check_at(
        &self,
        fields: &[PayloadField],
        limits: &Limits,
        depth: usize,
        terms: &mut usize,
    ) -> Result<(), String> {
        if depth > MAX_FILTER_DEPTH {
            return Err(format!(
                "filter nested deeper than {MAX_FILTER_DEPTH} levels"
            ));
        }
        for c in self.conditions() {
            *terms += 1;
            if *terms > limits.filter_terms {
                // Counted to the end by the caller's check; stop walking here.
                return Ok(());
            }
            let (key, kinds_ok) = match c {
                Condition::Nested(f) => {
                    f.check_at(fields, limits, depth + 1, terms)?;
                    continue;
                }
                Condition::Match { key, value } => (key, vec![value.clone()]),
                Condition::In { key, values } => {
                    if values.is_empty() {
                        return Err(format!("field {key:?}: `in` lists no values"));
                    }
                    *terms += values.len();
                    (key, values.clone())
                }
                Condition::Range { key, range } => {
                    if range.bounds().next().is_none() {
                        return Err(format!("field {key:?}: a range needs a bound"));
                    }
                    if range.bounds().any(|b| !b.is_finite()) {
                        return Err(format!("field {key:?}: range bounds must be finite"));
                    }
                    let f = field(fields, key)?;
                    if f.kind != FieldKind::Number {
                        return Err(format!(
                            "field {key:?} is indexed as {}: a range needs a number field",
                            f.kind.name()
                        ));
                    }
                    continue;
                }
                Condition::Exists { key, .. } => {
                    field(fields, key)?;
                    continue;
                }
            };
            let f = field(fields, key)?;
            for v in &kinds_ok {
                if let Value::Number(x) = v {
                    if !x.is_finite() {
                        return Err(format!("field {key:?}: {x} is not a finite number"));
                    }
                }
                if v.kind() != f.kind {
                    return Err(format!(
                        "field {key:?} is indexed as {}: it cannot equal {}",
                        f.kind.name(),
                        describe(v)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether a document with `metadata` passes (the reference meaning).
    pub fn matches(&self, fields: &[PayloadField], metadata: &Json) -> bool {
        self.must.iter().all(|c| c.matches(fields, metadata))
            && (self.should.is_empty() || self.should.iter().any(|c| c.matches(fields, metadata)))
            && !self.must_not.iter().any(|c| c.matches(fields, metadata))
    }

    pub fn from_wire(f: &cpb::Filter) -> Result<Filter, String> {
        let list = |cs: &[cpb::Condition]| -> Result<Vec<Condition>, String> {
            cs.iter().map(Condition::from_wire).collect()
        };
        Ok(Filter {
            must: list(&f.must)?,
            should: list(&f.should)?,
            must_not: list(&f.must_not)?,
        })
    }

    pub fn wire(&self) -> cpb::Filter {
        let list = |cs: &[Condition]| cs.iter().map(Condition::wire).collect();
        cpb::Filter {
            must: list(&self.must),
            should: list(&self.should),
            must_not: list(&self.must_not),
        }
    }

    /// The JSON form (the CLI's `--filter`): `{"must": [{"key": "year", "range":
    /// {"gte": 2000}}, {"key": "lang", "match": "en"}, {"key": "tags", "in": ["a",
    /// "b"]}, {"key": "x", "exists": true}, {"filter": {...}}], "should": [...],
    /// "must_not": [...]}`.
    pub fn from_json(text: &str) -> Result<Filter, String> {
        let v: Json = serde_json::from_str(text).map_err(|e| format!("filter: {e}"))?;
        Filter::from_json_value(&v, 1)
    }

    fn from_json_value(v: &Json, depth: usize) -> Result<Filter, String> {
        if depth > MAX_FILTER_DEPTH {
            return Err(format!(
                "filter nested deeper than {MAX_FILTER_DEPTH} levels"
            ));
        }
        let obj = v
            .as_object()
            .ok_or_else(|| format!("a filter is a JSON object, not {v}"))?;
        let mut f = Filter::default();
        for (k, list) in obj {
            let target = match k.as_str() {
                "must" => &mut f.must,
                "should" => &mut f.should,
                "must_not" => &mut f.must_not,
                other => {
                    return Err(format!(
                        "filter: unknown clause {other:?} (must, should, must_not)"
                    ))
                }
            };
            let items = list
                .as_array()
                .ok_or_else(|| format!("filter: {k} is a list of conditions"))?;
            for c in items {
                target.push(Condition::from_json_value(c, depth)?);
            }
        }
        Ok(f)
    }
}

fn field<'a>(fields: &'a [PayloadField], key: &str) -> Result<&'a PayloadField, String> {
    fields.iter().find(|f| f.path == key).ok_or_else(|| {
        if fields.is_empty() {
            format!("filter names field {key:?}, but the collection indexes no fields (declare them with --index-field PATH:KIND)")
        } else {
            let names: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            format!(
                "filter names field {key:?}, which is not indexed; indexed fields: {}",
                names.join(", ")
            )
        }
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Keyword(s) => format!("the string {s:?}"),
        Value::Number(x) => format!("the number {x}"),
        Value::Bool(b) => format!("the boolean {b}"),
    }
}

impl Condition {
    fn matches(&self, fields: &[PayloadField], metadata: &Json) -> bool {
        let kind = |key: &str| fields.iter().find(|f| f.path == key).map(|f| f.kind);
        match self {
            Condition::Nested(f) => f.matches(fields, metadata),
            Condition::Match { key, value } => {
                field_values(metadata, key, kind(key)).any(|x| x.equals(value))
            }
            Condition::In { key, values } => {
                field_values(metadata, key, kind(key)).any(|x| values.iter().any(|v| x.equals(v)))
            }
            Condition::Range { key, range } => {
                field_values(metadata, key, kind(key)).any(|x| match x {
                    Leaf::Number(n) => range.contains(n),
                    Leaf::Keyword(_) => false,
                })
            }
            Condition::Exists { key, exists } => {
                field_values(metadata, key, kind(key)).next().is_some() == *exists
            }
        }
    }

    fn from_wire(c: &cpb::Condition) -> Result<Condition, String> {
        use cpb::condition::Test;
        let key = c.key.clone();
        let test = c
            .test
            .as_ref()
            .ok_or_else(|| format!("filter condition on {key:?} has no test"))?;
        if matches!(test, Test::Filter(_)) != key.is_empty() {
            return Err(if key.is_empty() {
                "a filter condition names no field".into()
            } else {
                format!("a nested filter takes no key (got {key:?})")
            });
        }
        Ok(match test {
            Test::Match(v) => Condition::Match {
                value: value_from_wire(v, &key)?,
                key,
            },
            Test::Any(list) => Condition::In {
                values: list
                    .values
                    .iter()
                    .map(|v| value_from_wire(v, &key))
                    .collect::<Result<_, _>>()?,
                key,
            },
            Test::Range(r) => Condition::Range {
                key,
                range: Range {
                    gt: r.gt,
                    gte: r.gte,
                    lt: r.lt,
                    lte: r.lte,
                },
            },
            Test::Exists(e) => Condition::Exists { key, exists: *e },
            Test::Filter(f) => Condition::Nested(Filter::from_wire(f)?),
        })
    }

    fn wire(&self) -> cpb::Condition {
        use cpb::condition::Test;
        let (key, test) = match self {
            Condition::Match { key, value } => (key.clone(), Test::Match(value_wire(value))),
            Condition::In { key, values } => (
                key.clone(),
                Test::Any(cpb::ValueList {
                    values: values.iter().map(value_wire).collect(),
                }),
            ),
            Condition::Range { key, range } => (
                key.clone(),
                Test::Range(cpb::Range {
                    gt: range.gt,
                    gte: range.gte,
                    lt: range.lt,
                    lte: range.lte,
                }),
            ),
            Condition::Exists { key, exists } => (key.clone(), Test::Exists(*exists)),
            Condition::Nested(f) => (String::new(), Test::Filter(f.wire())),
        };
        cpb::Condition {
            key,
            test: Some(test),
        }
    }

    fn from_json_value(v: &Json, depth: usize) -> Result<Condition, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("a filter condition is a JSON object, not {v}"))?;
        if let Some(inner) = obj.get("filter") {
            if obj.len() != 1 {
                return Err("a nested {\"filter\": ...} condition takes nothing else".into());
            }
            return Ok(Condition::Nested(Filter::from_json_value(
                inner,
                depth + 1,
            )?));
        }
        let key = obj
            .get("key")
            .and_then(Json::as_str)
            .ok_or_else(|| format!("filter condition {v} names no \"key\""))?
            .to_string();
        let tests: Vec<&String> = obj.keys().filter(|k| *k != "key").collect();
        let [test] = tests.as_slice() else {
            return Err(format!(
                "filter condition on {key:?} needs exactly one of match, in, range, exists"
            ));
        };
        let arg = &obj[test.as_str()];
        Ok(match test.as_str() {
            "match" => Condition::Match {
                value: value_from_json(arg, &key)?,
                key,
            },
            "in" => Condition::In {
                values: arg
                    .as_array()
                    .ok_or_else(|| format!("field {key:?}: `in` takes a list"))?
                    .iter()
                    .map(|x| value_from_json(x, &key))
                    .collect::<Result<_, _>>()?,
                key,
            },
            "range" => {
                let r = arg.as_object().ok_or_else(|| {
                    format!("field {key:?}: a range is an object of gt/gte/lt/lte")
                })?;
                let mut range = Range::default();
                for (b, x) in r {
                    let x = x.as_f64().ok_or_else(|| {
                        format!("field {key:?}: range bound {b} must be a number")
                    })?;
                    match b.as_str() {
                        "gt" => range.gt = Some(x),
                        "gte" => range.gte = Some(x),
                        "lt" => range.lt = Some(x),
                        "lte" => range.lte = Some(x),
                        other => {
                            return Err(format!(
                                "field {key:?}: unknown range bound {other:?} (gt, gte, lt, lte)"
                            ))
                        }
                    }
                }
                Condition::Range { key, range }
            }
            "exists" => Condition::Exists {
                exists: arg
                    .as_bool()
                    .ok_or_else(|| format!("field {key:?}: exists takes true or false"))?,
                key,
            },
            other => {
                return Err(format!(
                    "filter condition on {key:?}: unknown test {other:?} (match, in, range, exists)"
                ))
            }
        })
    }
}

fn value_from_wire(v: &cpb::FieldValue, key: &str) -> Result<Value, String> {
    use cpb::field_value::Value as V;
    match &v.value {
        Some(V::Keyword(s)) => Ok(Value::Keyword(s.clone())),
        Some(V::Number(x)) => Ok(Value::Number(*x)),
        Some(V::Flag(b)) => Ok(Value::Bool(*b)),
        None => Err(format!("field {key:?}: a value is unset")),
    }
}

fn value_wire(v: &Value) -> cpb::FieldValue {
    use cpb::field_value::Value as V;
    cpb::FieldValue {
        value: Some(match v {
            Value::Keyword(s) => V::Keyword(s.clone()),
            Value::Number(x) => V::Number(*x),
            Value::Bool(b) => V::Flag(*b),
        }),
    }
}

fn value_from_json(v: &Json, key: &str) -> Result<Value, String> {
    match v {
        Json::String(s) => Ok(Value::Keyword(s.clone())),
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::Number(n) => n
            .as_f64()
            .map(Value::Number)
            .ok_or_else(|| format!("field {key:?}: {n} is not a number shoal can compare")),
        other => Err(format!(
            "field {key:?}: compare with a string, number or boolean, not {other}"
        )),
    }
}

/// One indexable value of a field in a document.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Leaf<'a> {
    Keyword(&'a str),
    Number(f64),
}

impl Leaf<'_> {
    fn equals(self, v: &Value) -> bool {
        match (self, v) {
            (Leaf::Number(a), Value::Number(b)) => a == *b,
            (Leaf::Keyword(a), v) => v.keyword() == Some(a),
            _ => false,
        }
    }
}

/// The values of the field at `path` of kind `kind` in `metadata` (none if the field
/// is not indexed): arrays on the way stand for each element; values of another kind
/// are skipped. What a shard's payload index records for the row.
pub fn field_values<'a>(
    metadata: &'a Json,
    path: &'a str,
    kind: Option<FieldKind>,
) -> impl Iterator<Item = Leaf<'a>> + 'a {
    let mut out = Vec::new();
    if let Some(kind) = kind {
        collect(metadata, path.split('.'), kind, &mut out, 0);
    }
    out.into_iter()
}

fn collect<'a>(
    v: &'a Json,
    mut rest: std::str::Split<'a, char>,
    kind: FieldKind,
    out: &mut Vec<Leaf<'a>>,
    arrays: usize,
) {
    match v {
        // Arrays of arrays are walked a bounded number of levels (metadata is bounded
        // in bytes; this bounds the work per byte too).
        Json::Array(items) if arrays < MAX_PATH_SEGMENTS => {
            for item in items {
                collect(item, rest.clone(), kind, out, arrays + 1);
            }
        }
        Json::Object(map) => {
            if let Some(seg) = rest.next() {
                if let Some(child) = map.get(seg) {
                    collect(child, rest, kind, out, arrays);
                }
            }
        }
        leaf => {
            if rest.next().is_some() {
                return;
            }
            match (leaf, kind) {
                (Json::String(s), FieldKind::Keyword) => out.push(Leaf::Keyword(s)),
                (Json::Bool(true), FieldKind::Keyword) => out.push(Leaf::Keyword("true")),
                (Json::Bool(false), FieldKind::Keyword) => out.push(Leaf::Keyword("false")),
                (Json::Number(n), FieldKind::Number) => {
                    if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                        out.push(Leaf::Number(x));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> Vec<PayloadField> {
        [
            "year:number",
            "lang:keyword",
            "tags:keyword",
            "a.b:number",
            "ok:keyword",
        ]
        .iter()
        .map(|s| PayloadField::parse(s).unwrap())
        .collect()
    }

    #[test]
    fn paths_walk_objects_and_arrays() {
        let m = json!({"a": [{"b": 1}, {"b": [2, "x"]}, {"c": 3}], "tags": ["p", "q", true]});
        let nums: Vec<Leaf> = field_values(&m, "a.b", Some(FieldKind::Number)).collect();
        assert_eq!(nums, [Leaf::Number(1.0), Leaf::Number(2.0)]);
        let kws: Vec<Leaf> = field_values(&m, "tags", Some(FieldKind::Keyword)).collect();
        assert_eq!(
            kws,
            [
                Leaf::Keyword("p"),
                Leaf::Keyword("q"),
                Leaf::Keyword("true")
            ]
        );
        assert_eq!(field_values(&m, "a", Some(FieldKind::Number)).count(), 0);
        assert_eq!(field_values(&m, "a.b", None).count(), 0);
    }

    #[test]
    fn json_form_round_trips_through_the_wire_and_means_what_it_says() {
        let f = Filter::from_json(
            r#"{"must": [{"key": "year", "range": {"gte": 2000, "lt": 2010}},
                         {"filter": {"should": [{"key": "lang", "match": "en"},
                                                {"key": "tags", "in": ["x", true]}]}}],
                "must_not": [{"key": "a.b", "exists": true}]}"#,
        )
        .unwrap();
        f.check(&fields(), &Limits::default()).unwrap();
        assert_eq!(Filter::from_wire(&f.wire()).unwrap(), f);
        let fs = fields();
        assert!(f.matches(&fs, &json!({"year": 2005, "lang": "en"})));
        assert!(f.matches(&fs, &json!({"year": [1990, 2001], "tags": [true]})));
        assert!(!f.matches(&fs, &json!({"year": 2010, "lang": "en"})));
        assert!(!f.matches(&fs, &json!({"year": 2005, "lang": "de"})));
        assert!(!f.matches(&fs, &json!({"year": 2005, "lang": "en", "a": {"b": 0}})));
        assert!(f.matches(&fs, &json!({"year": 2005, "lang": "en", "a": {"b": "s"}})));
        assert!(Filter::default().matches(&fs, &json!(null)));
    }

    #[test]
    fn bad_filters_are_refused_by_name() {
        let l = Limits::default();
        let fs = fields();
        let bad = |j: &str| -> String {
            match Filter::from_json(j) {
                Err(e) => e,
                Ok(f) => f.check(&fs, &l).expect_err(j),
            }
        };
        assert!(bad(r#"{"must": [{"key": "nope", "match": 1}]}"#).contains("not indexed"));
        assert!(bad(r#"{"must": [{"key": "lang", "range": {"gt": 1}}]}"#).contains("keyword"));
        assert!(bad(r#"{"must": [{"key": "year", "match": "x"}]}"#).contains("number"));
        assert!(bad(r#"{"must": [{"key": "year", "range": {}}]}"#).contains("bound"));
        assert!(bad(r#"{"must": [{"key": "year", "in": []}]}"#).contains("no values"));
        assert!(
            bad(r#"{"must": [{"key": "year", "match": 1, "exists": true}]}"#)
                .contains("exactly one")
        );
        assert!(bad(r#"{"may": []}"#).contains("unknown clause"));
        assert!(bad(r#"{"must": [{"key": "year", "between": 1}]}"#).contains("unknown test"));
        let mut deep = r#"{"key": "year", "match": 1}"#.to_string();
        for _ in 0..MAX_FILTER_DEPTH + 1 {
            deep = format!(r#"{{"filter": {{"must": [{deep}]}}}}"#);
        }
        assert!(bad(&format!(r#"{{"must": [{deep}]}}"#)).contains("deeper"));
        let many: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
        let e = bad(&format!(
            r#"{{"must": [{{"key": "year", "in": [{}]}}]}}"#,
            many.join(",")
        ));
        assert!(e.contains("filter_terms"), "{e}");
        // The wire form's own mistakes.
        let no_test = cpb::Filter {
            must: vec![cpb::Condition {
                key: "year".into(),
                test: None,
            }],
            ..Default::default()
        };
        assert!(Filter::from_wire(&no_test).unwrap_err().contains("no test"));
        assert!(PayloadField::parse("year:date").is_err());
        assert!(
            PayloadField::check_all(&[PayloadField::parse("a..b:number").unwrap()], &l).is_err()
        );
        assert!(PayloadField::check_all(&[fields(), fields()].concat(), &l)
            .unwrap_err()
            .contains("twice"));
    }
}
