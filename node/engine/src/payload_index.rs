//! A shard's payload index (issue 22): for each metadata field the collection indexes
//! (`shoal_proto::filter::PayloadField`), which rows hold which values, so a filter
//! becomes the exact set of rows it admits (`PayloadIndex::eval`) without reading a
//! document.
//!
//! Rows never change once written (an update is a new row, a delete only clears the
//! row's liveness bit), so the index only grows by appending the new rows' values and
//! never removes any: liveness is checked where rows are searched, as for the vector
//! index. It is derived from the documents file, not stored beside it: `open` builds it
//! in the same scan of the records that builds the row table, a replayed or applied
//! batch adds its rows as it publishes them (the values are read from the metadata
//! before the state lock is taken), a compaction renumbers it with the row map it
//! renumbers everything else with, and a snapshot or a backup is opened like any
//! shard. Changing the indexed fields re-reads every live row's metadata
//! (`Shard::set_payload_fields`).
//!
//! Per field:
//! - keyword: a roaring bitmap of rows per distinct value;
//! - number: a column of each row's first value (NaN: none), the further values of
//!   rows holding arrays beside it, scanned for a range (a sorted index would answer
//!   narrow ranges without the scan: not built yet);
//! - both: a bitmap of the rows holding a value (`exists`).

use std::collections::HashMap;

use roaring::RoaringBitmap;
use shoal_proto::filter::{field_values, Condition, FieldKind, Filter, Leaf, PayloadField, Range};

use crate::compact::RowMap;

/// The values of every indexed field in one row's metadata (read outside the lock).
#[derive(Debug, Default)]
pub struct RowValues(Vec<Vec<Owned>>);

#[derive(Debug)]
enum Owned {
    Keyword(Box<str>),
    Number(f64),
}

enum Column {
    Keyword(HashMap<Box<str>, RoaringBitmap>),
    Number {
        first: Vec<f64>,
        extra: Vec<(u32, f64)>,
    },
}

pub struct PayloadIndex {
    fields: Vec<PayloadField>,
    columns: Vec<Column>,
    present: Vec<RoaringBitmap>,
    /// Rows indexed: the row table's length.
    rows: u32,
}

impl PayloadIndex {
    pub fn new(fields: &[PayloadField]) -> PayloadIndex {
        PayloadIndex {
            fields: fields.to_vec(),
            columns: fields
                .iter()
                .map(|f| match f.kind {
                    FieldKind::Keyword => Column::Keyword(HashMap::new()),
                    FieldKind::Number => Column::Number {
                        first: Vec::new(),
                        extra: Vec::new(),
                    },
                })
                .collect(),
            present: vec![RoaringBitmap::new(); fields.len()],
            rows: 0,
        }
    }

    pub fn fields(&self) -> &[PayloadField] {
        &self.fields
    }

    /// The values of `fields` in `metadata` (a JSON object's text, or empty).
    pub fn extract(fields: &[PayloadField], metadata: &str) -> RowValues {
        if fields.is_empty() || metadata.is_empty() {
            return RowValues::default();
        }
        // Checked where it entered (`Metadata::parse`): this parse does not fail.
        let Ok(json) = serde_json::from_str::<serde_json::Value>(metadata) else {
            return RowValues::default();
        };
        RowValues(
            fields
                .iter()
                .map(|f| {
                    field_values(&json, &f.path, Some(f.kind))
                        .map(|l| match l {
                            Leaf::Keyword(s) => Owned::Keyword(s.into()),
                            Leaf::Number(x) => Owned::Number(x),
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// Appends row `row` (the next one: rows are indexed in order) with its values.
    pub fn push(&mut self, row: u64, values: RowValues) {
        debug_assert_eq!(row, u64::from(self.rows), "payload rows out of order");
        let r = self.rows;
        self.rows += 1;
        let mut values = values.0.into_iter();
        for (i, col) in self.columns.iter_mut().enumerate() {
            let vals = values.next().unwrap_or_default();
            if !vals.is_empty() {
                self.present[i].insert(r);
            }
            match col {
                Column::Keyword(map) => {
                    for v in vals {
                        if let Owned::Keyword(k) = v {
                            map.entry(k).or_default().insert(r);
                        }
                    }
                }
                Column::Number { first, extra } => {
                    let mut nums = vals.into_iter().filter_map(|v| match v {
                        Owned::Number(x) => Some(x),
                        Owned::Keyword(_) => None,
                    });
                    first.push(nums.next().unwrap_or(f64::NAN));
                    extra.extend(nums.map(|x| (r, x)));
                }
            }
        }
    }

    /// This index in a compaction's new numbering (`rows` rows after it).
    pub fn remapped(&self, map: &RowMap, rows: u64) -> PayloadIndex {
        let mut out = PayloadIndex::new(&self.fields);
        out.rows = rows as u32;
        let remap = |b: &RoaringBitmap| -> RoaringBitmap {
            b.iter()
                .filter_map(|r| map.map(u64::from(r)).map(|n| n as u32))
                .collect()
        };
        for (i, col) in self.columns.iter().enumerate() {
            out.present[i] = remap(&self.present[i]);
            out.columns[i] = match col {
                Column::Keyword(m) => {
                    Column::Keyword(m.iter().map(|(k, b)| (k.clone(), remap(b))).collect())
                }
                Column::Number { first, extra } => {
                    let mut nf = vec![f64::NAN; rows as usize];
                    for (r, &x) in first.iter().enumerate() {
                        if let Some(n) = map.map(r as u64).filter(|&n| n < rows) {
                            nf[n as usize] = x;
                        }
                    }
                    let ne = extra
                        .iter()
                        .filter_map(|&(r, x)| map.map(u64::from(r)).map(|n| (n as u32, x)))
                        .collect();
                    Column::Number {
                        first: nf,
                        extra: ne,
                    }
                }
            };
        }
        out
    }

    /// The rows (live or not) whose metadata passes `f`; an error names a field this
    /// replica does not index (yet: the map's fields reach it after the gateway's).
    pub fn eval(&self, f: &Filter) -> Result<RoaringBitmap, String> {
        let mut acc: Option<RoaringBitmap> = None;
        for c in &f.must {
            let b = self.condition(c)?;
            acc = Some(match acc {
                None => b,
                Some(a) => a & b,
            });
        }
        if !f.should.is_empty() {
            let mut any = RoaringBitmap::new();
            for c in &f.should {
                any |= self.condition(c)?;
            }
            acc = Some(match acc {
                None => any,
                Some(a) => a & any,
            });
        }
        let mut acc = acc.unwrap_or_else(|| self.all());
        for c in &f.must_not {
            acc -= self.condition(c)?;
        }
        Ok(acc)
    }

    fn all(&self) -> RoaringBitmap {
        let mut b = RoaringBitmap::new();
        b.insert_range(0..self.rows);
        b
    }

    fn column(&self, key: &str) -> Result<usize, String> {
        self.fields
            .iter()
            .position(|f| f.path == key)
            .ok_or_else(|| format!("field {key:?} is not indexed on this replica"))
    }

    fn condition(&self, c: &Condition) -> Result<RoaringBitmap, String> {
        Ok(match c {
            Condition::Nested(f) => self.eval(f)?,
            Condition::Match { key, value } => self.equal(self.column(key)?, value),
            Condition::In { key, values } => {
                let i = self.column(key)?;
                let mut b = RoaringBitmap::new();
                for v in values {
                    b |= self.equal(i, v);
                }
                b
            }
            Condition::Range { key, range } => self.range(self.column(key)?, range),
            Condition::Exists { key, exists } => {
                let present = &self.present[self.column(key)?];
                if *exists {
                    present.clone()
                } else {
                    self.all() - present
                }
            }
        })
    }

    fn equal(&self, i: usize, v: &shoal_proto::filter::Value) -> RoaringBitmap {
        match (&self.columns[i], v) {
            (Column::Number { .. }, shoal_proto::filter::Value::Number(x)) => {
                self.range(i, &Range::point(*x))
            }
            (Column::Keyword(map), v) => v
                .keyword()
                .and_then(|k| map.get(k))
                .cloned()
                .unwrap_or_default(),
            _ => RoaringBitmap::new(),
        }
    }

    fn range(&self, i: usize, range: &Range) -> RoaringBitmap {
        let Column::Number { first, extra } = &self.columns[i] else {
            return RoaringBitmap::new();
        };
        // A dense bitset first, then one conversion: inserting a million rows one by
        // one into the roaring bitmap took ~5 ms of a 50% range's ~7 ms per query
        // (docs/benchmarks.md, "Filtered search"). NaN (no value) is in no range.
        let mut bits = vec![0u8; first.len().div_ceil(8)];
        for (r, &x) in first.iter().enumerate() {
            if !x.is_nan() && range.contains(x) {
                bits[r / 8] |= 1 << (r % 8);
            }
        }
        let mut b = RoaringBitmap::from_lsb0_bytes(0, &bits);
        for &(r, x) in extra {
            if range.contains(x) {
                b.insert(r);
            }
        }
        b
    }
}

/// A dense bitmap of `set` over `n` ids (bit `i` of byte `i / 8`), as FAISS's
/// `IDSelectorBitmap` reads it.
pub fn dense_bitmap(set: &RoaringBitmap, n: u64) -> Vec<u8> {
    let mut out = vec![0u8; n.div_ceil(8) as usize];
    for r in set.iter().take_while(|&r| u64::from(r) < n) {
        out[(r / 8) as usize] |= 1 << (r % 8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use shoal_proto::filter::Value;

    fn fields() -> Vec<PayloadField> {
        ["n:number", "k:keyword", "t:keyword", "o.x:number"]
            .iter()
            .map(|s| PayloadField::parse(s).unwrap())
            .collect()
    }

    fn metadata() -> impl Strategy<Value = serde_json::Value> {
        let num = prop_oneof![
            (0i64..10).prop_map(|x| json!(x)),
            Just(json!(2.5)),
            Just(json!("7"))
        ];
        let kw = prop_oneof![
            Just(json!("a")),
            Just(json!("b")),
            Just(json!("c")),
            Just(json!(true)),
            Just(json!(3))
        ];
        (
            proptest::option::of(prop_oneof![
                num.clone(),
                prop::collection::vec(num.clone(), 0..3).prop_map(|v| json!(v))
            ]),
            proptest::option::of(kw.clone()),
            proptest::option::of(prop::collection::vec(kw, 0..4)),
            proptest::option::of(num),
        )
            .prop_map(|(n, k, t, x)| {
                let mut m = serde_json::Map::new();
                if let Some(n) = n {
                    m.insert("n".into(), n);
                }
                if let Some(k) = k {
                    m.insert("k".into(), k);
                }
                if let Some(t) = t {
                    m.insert("t".into(), json!(t));
                }
                if let Some(x) = x {
                    m.insert("o".into(), json!([{ "x": x }, {"y": 1}]));
                }
                serde_json::Value::Object(m)
            })
    }

    fn condition() -> impl Strategy<Value = Condition> {
        let kwv = prop_oneof![
            Just(Value::Keyword("a".into())),
            Just(Value::Keyword("b".into())),
            Just(Value::Keyword("z".into())),
            Just(Value::Bool(true)),
        ];
        let key_kw = prop_oneof![Just("k".to_string()), Just("t".to_string())];
        let key_n = prop_oneof![Just("n".to_string()), Just("o.x".to_string())];
        let bound = proptest::option::of((0i64..10).prop_map(|x| x as f64));
        let leaf = prop_oneof![
            (key_kw.clone(), kwv.clone()).prop_map(|(key, value)| Condition::Match { key, value }),
            (key_n.clone(), 0i64..10).prop_map(|(key, x)| Condition::Match {
                key,
                value: Value::Number(x as f64)
            }),
            (key_kw.clone(), prop::collection::vec(kwv, 1..3))
                .prop_map(|(key, values)| Condition::In { key, values }),
            (
                key_n.clone(),
                bound.clone(),
                bound.clone(),
                bound.clone(),
                bound
            )
                .prop_map(|(key, gt, gte, lt, lte)| Condition::Range {
                    key,
                    range: Range { gt, gte, lt, lte }
                }),
            (prop_oneof![key_kw, key_n], any::<bool>())
                .prop_map(|(key, exists)| Condition::Exists { key, exists }),
        ];
        leaf.prop_recursive(2, 12, 3, |inner| {
            (
                prop::collection::vec(inner.clone(), 0..3),
                prop::collection::vec(inner.clone(), 0..2),
                prop::collection::vec(inner, 0..2),
            )
                .prop_map(|(must, should, must_not)| {
                    Condition::Nested(Filter {
                        must,
                        should,
                        must_not,
                    })
                })
        })
    }

    fn filter() -> impl Strategy<Value = Filter> {
        (
            prop::collection::vec(condition(), 0..3),
            prop::collection::vec(condition(), 0..3),
            prop::collection::vec(condition(), 0..2),
        )
            .prop_map(|(must, should, must_not)| Filter {
                must,
                should,
                must_not,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The index admits exactly the rows the reference meaning admits, before and
        /// after a compaction's renumbering.
        #[test]
        fn index_agrees_with_the_reference(
            docs in prop::collection::vec(metadata(), 1..60),
            f in filter(),
            dropped in prop::collection::vec(any::<bool>(), 60),
        ) {
            let fs = fields();
            let mut ix = PayloadIndex::new(&fs);
            for (r, m) in docs.iter().enumerate() {
                ix.push(r as u64, PayloadIndex::extract(&fs, &m.to_string()));
            }
            let want: RoaringBitmap = docs
                .iter()
                .enumerate()
                .filter(|(_, m)| f.matches(&fs, m))
                .map(|(r, _)| r as u32)
                .collect();
            prop_assert_eq!(ix.eval(&f).unwrap(), want.clone());

            // Compaction: the kept rows renumbered in order.
            let n = docs.len();
            let mut kept = vec![0u64; n.div_ceil(64)];
            for r in 0..n {
                if !dropped[r] {
                    kept[r / 64] |= 1 << (r % 64);
                }
            }
            let map = RowMap::new(kept, n as u64);
            let after = ix.remapped(&map, map.map_end(n as u64));
            let want_after: RoaringBitmap = want
                .iter()
                .filter_map(|r| map.map(u64::from(r)).map(|x| x as u32))
                .collect();
            prop_assert_eq!(after.eval(&f).unwrap(), want_after);
        }
    }

    #[test]
    fn unknown_fields_are_named_and_dense_bitmaps_read_as_faiss_does() {
        let ix = PayloadIndex::new(&fields());
        let f = Filter {
            must: vec![Condition::Exists {
                key: "zz".into(),
                exists: true,
            }],
            ..Filter::default()
        };
        assert!(ix.eval(&f).unwrap_err().contains("zz"));
        let set: RoaringBitmap = [0u32, 9, 15, 16].into_iter().collect();
        assert_eq!(
            dense_bitmap(&set, 17),
            [0b0000_0001, 0b1000_0010, 0b0000_0001]
        );
        assert_eq!(dense_bitmap(&set, 16), [0b0000_0001, 0b1000_0010]);
    }
}
