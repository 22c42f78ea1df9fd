//! Parquet files of vectors for `shoal import` (issue 18), the only module that touches
//! the `parquet` / `arrow` crates. Columns by name: `vector` (or `embedding`: a list,
//! large list or fixed-size list of float32 or float64), optional `id` (or `_id`:
//! string or integer; else the 0-based row number), `text` and `title` (strings), and
//! `metadata` (a string holding a JSON object). Only those columns are decoded
//! (a projection), a record batch at a time; a resumed import starts the reader at its
//! row (`with_offset`), so nothing before it is decoded. [`write_parquet`] is the
//! writer the tests and the benchmark use.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, ListBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};

use crate::vectors::{Row, MAX_DIMENSION};

/// Rows decoded at a time.
const BATCH_ROWS: usize = 4096;

/// The columns an import reads, by name.
#[derive(Clone, Debug, Default)]
struct Columns {
    vector: String,
    id: Option<String>,
    text: Option<String>,
    title: Option<String>,
    metadata: Option<String>,
}

/// A Parquet file read a record batch at a time.
pub struct ParquetRows {
    path: PathBuf,
    columns: Columns,
    rows: u64,
    /// Fixed-size lists name it in the schema; lists by their first row.
    dim: Option<usize>,
    batches: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    /// The next row of `batch`.
    at: usize,
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float32 | DataType::Float64)
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

impl ParquetRows {
    /// Opens `path` and checks its columns; the first row read is `offset`.
    pub fn open(path: &Path, offset: u64) -> Result<ParquetRows> {
        let (batches, columns, rows, dim) = Self::reader(path, offset)?;
        Ok(ParquetRows {
            path: path.to_path_buf(),
            columns,
            rows,
            dim,
            batches,
            batch: None,
            at: 0,
        })
    }

    fn reader(
        path: &Path,
        offset: u64,
    ) -> Result<(ParquetRecordBatchReader, Columns, u64, Option<usize>)> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
        let rows = b.metadata().file_metadata().num_rows().max(0) as u64;
        let schema = b.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let find = |want: &[&str]| -> Option<usize> {
            want.iter().find_map(|w| names.iter().position(|n| n == w))
        };
        let Some(v) = find(&["vector", "embedding"]) else {
            bail!(
                "{}: no `vector` (or `embedding`) column; its columns are {names:?}",
                path.display()
            );
        };
        let vector = schema.field(v);
        let (item, dim) = match vector.data_type() {
            DataType::List(f) | DataType::LargeList(f) => (f.data_type().clone(), None),
            DataType::FixedSizeList(f, n) => (f.data_type().clone(), Some(*n as usize)),
            other => bail!(
                "{}: column `{}` is {other}; a vector column is a list of float32 or float64",
                path.display(),
                vector.name()
            ),
        };
        if !is_float(&item) {
            bail!(
                "{}: column `{}` holds {item}, not float32 or float64",
                path.display(),
                vector.name()
            );
        }
        if let Some(d) = dim.filter(|&d| d == 0 || d > MAX_DIMENSION) {
            bail!(
                "{}: column `{}` declares dimension {d} (1 to {MAX_DIMENSION})",
                path.display(),
                vector.name()
            );
        }
        let mut columns = Columns {
            vector: vector.name().clone(),
            ..Columns::default()
        };
        let mut roots = vec![v];
        let mut optional = |want: &[&str], ok: fn(&DataType) -> bool, what: &str| {
            let i = find(want)?;
            roots.push(i);
            let f = schema.field(i);
            Some(if ok(f.data_type()) {
                Ok(f.name().clone())
            } else {
                Err(anyhow!(
                    "{}: column `{}` is {}; it must be {what}",
                    path.display(),
                    f.name(),
                    f.data_type()
                ))
            })
        };
        let id_type = |t: &DataType| {
            is_string(t)
                || matches!(
                    t,
                    DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64
                )
        };
        columns.id = optional(&["id", "_id"], id_type, "a string or an integer").transpose()?;
        columns.text = optional(&["text"], is_string, "a string").transpose()?;
        columns.title = optional(&["title"], is_string, "a string").transpose()?;
        columns.metadata =
            optional(&["metadata"], is_string, "a string holding a JSON object").transpose()?;
        let mask = ProjectionMask::roots(b.parquet_schema(), roots);
        let batches = b
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .with_offset(offset as usize)
            .build()
            .with_context(|| format!("{}: reading", path.display()))?;
        Ok((batches, columns, rows, dim))
    }

    /// Rows in the file (its footer says).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn dimension(&self) -> Option<usize> {
        self.dim
    }

    /// Starts over at row `offset` (a resumed import skipping what landed).
    pub fn seek(&mut self, offset: u64) -> Result<()> {
        if offset > self.rows {
            bail!(
                "{}: cannot skip to row {offset}: the file has {} rows",
                self.path.display(),
                self.rows
            );
        }
        (self.batches, self.columns, self.rows, self.dim) = Self::reader(&self.path, offset)?;
        self.batch = None;
        self.at = 0;
        Ok(())
    }

    /// The next row (`row` is its 0-based index in the file, for errors and ids).
    pub fn next(&mut self, row: u64) -> Result<Option<Row>> {
        loop {
            if let Some(b) = &self.batch {
                if self.at < b.num_rows() {
                    break;
                }
            }
            match self.batches.next() {
                None => return Ok(None),
                Some(b) => {
                    self.batch = Some(b.with_context(|| {
                        format!("{}: decoding the rows from {row}", self.path.display())
                    })?);
                    self.at = 0;
                }
            }
        }
        let b = self.batch.as_ref().expect("a batch");
        let i = self.at;
        self.at += 1;
        let at = || format!("{}: row {row}", self.path.display());
        let col = |name: &str| b.column_by_name(name).expect("a projected column");
        let v = col(&self.columns.vector);
        if v.is_null(i) {
            bail!("{}: `{}` is null", at(), self.columns.vector);
        }
        let values: ArrayRef = match v.data_type() {
            DataType::List(_) => v.as_list::<i32>().value(i),
            DataType::LargeList(_) => v.as_list::<i64>().value(i),
            _ => v.as_fixed_size_list().value(i),
        };
        if values.null_count() > 0 {
            bail!("{}: `{}` has null values", at(), self.columns.vector);
        }
        let vector: Vec<f32> = match values.data_type() {
            DataType::Float32 => values.as_primitive::<Float32Type>().values().to_vec(),
            _ => values
                .as_primitive::<Float64Type>()
                .values()
                .iter()
                .map(|&x| x as f32)
                .collect(),
        };
        if vector.is_empty() || vector.len() > MAX_DIMENSION {
            bail!(
                "{}: `{}` has {} values (1 to {MAX_DIMENSION})",
                at(),
                self.columns.vector,
                vector.len()
            );
        }
        match self.dim {
            None => self.dim = Some(vector.len()),
            Some(d) if d != vector.len() => bail!(
                "{}: `{}` has {} values, the file's first row {d}",
                at(),
                self.columns.vector,
                vector.len()
            ),
            Some(_) => {}
        }
        if let Some(k) = vector.iter().position(|x| !x.is_finite()) {
            bail!("{}: value {k} of the vector is not a finite float32", at());
        }
        let id = match &self.columns.id {
            None => row.to_string(),
            Some(name) => {
                let c = col(name);
                if c.is_null(i) {
                    bail!("{}: `{name}` is null", at());
                }
                let id = match c.data_type() {
                    DataType::Int32 => c.as_primitive::<Int32Type>().value(i).to_string(),
                    DataType::Int64 => c.as_primitive::<Int64Type>().value(i).to_string(),
                    DataType::UInt32 => c.as_primitive::<UInt32Type>().value(i).to_string(),
                    DataType::UInt64 => c.as_primitive::<UInt64Type>().value(i).to_string(),
                    _ => string_at(c, i).to_string(),
                };
                if id.is_empty() {
                    bail!("{}: `{name}` is empty", at());
                }
                id
            }
        };
        let text_of = |name: &Option<String>| -> String {
            name.as_ref()
                .map(|n| col(n))
                .filter(|c| !c.is_null(i))
                .map_or_else(String::new, |c| string_at(c, i).to_string())
        };
        let (title, body) = (text_of(&self.columns.title), text_of(&self.columns.text));
        let text = match (title.is_empty(), body.is_empty()) {
            (false, false) => format!("{title} {body}"),
            (false, true) => title,
            _ => body,
        };
        let metadata_json = text_of(&self.columns.metadata);
        if !metadata_json.is_empty() {
            match serde_json::from_str::<serde_json::Value>(&metadata_json) {
                Ok(serde_json::Value::Object(_)) => {}
                Ok(other) => bail!("{}: `metadata` must be a JSON object, not {other}", at()),
                Err(e) => bail!("{}: `metadata` is not JSON: {e}", at()),
            }
        }
        Ok(Some(Row {
            id,
            vector,
            text,
            metadata_json,
        }))
    }
}

/// Row `i` of a string column (checked a string type when the file was opened).
fn string_at(c: &ArrayRef, i: usize) -> &str {
    match c.data_type() {
        DataType::Utf8 => c.as_string::<i32>().value(i),
        DataType::LargeUtf8 => c.as_string::<i64>().value(i),
        _ => c.as_string_view().value(i),
    }
}

/// Writes `rows` (all of dimension `dim`) as Parquet: `id`, `vector` (a fixed-size
/// list when `fixed`, else a list, of float32), `text` and `metadata` (null where
/// empty), snappy-compressed, in row groups of `group` rows.
pub fn write_parquet(
    path: &Path,
    rows: impl IntoIterator<Item = Row>,
    dim: usize,
    fixed: bool,
    group: usize,
) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_size(group)
        .build();
    let mut writer: Option<ArrowWriter<File>> = None;
    let mut f = Some(f);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let (mut ids, mut texts, mut metas) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let mut fixed_list = FixedSizeListBuilder::new(Float32Builder::new(), dim as i32);
        let mut list = ListBuilder::new(Float32Builder::new());
        for r in rows.by_ref().take(BATCH_ROWS) {
            anyhow::ensure!(
                r.vector.len() == dim,
                "row {} has the wrong dimension",
                r.id
            );
            ids.append_value(&r.id);
            let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
            texts.append_option(opt(&r.text));
            metas.append_option(opt(&r.metadata_json));
            if fixed {
                fixed_list.values().append_slice(&r.vector);
                fixed_list.append(true);
            } else {
                list.values().append_slice(&r.vector);
                list.append(true);
            }
        }
        let vectors: ArrayRef = if fixed {
            Arc::new(fixed_list.finish())
        } else {
            Arc::new(list.finish())
        };
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(ids.finish()) as ArrayRef),
            ("vector", vectors),
            ("text", Arc::new(texts.finish()) as ArrayRef),
            ("metadata", Arc::new(metas.finish()) as ArrayRef),
        ])?;
        if writer.is_none() {
            writer = Some(ArrowWriter::try_new(
                f.take().expect("one file"),
                batch.schema(),
                Some(props.clone()),
            )?);
        }
        writer.as_mut().expect("a writer").write(&batch)?;
    }
    match writer {
        Some(w) => {
            w.close()?;
        }
        None => bail!("{}: no rows to write", path.display()),
    }
    Ok(())
}
