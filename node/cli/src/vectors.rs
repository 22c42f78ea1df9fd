//! Files of precomputed vectors, read a chunk at a time (issue 18's bulk import):
//! `.npy` (float32, C order, two dimensions), `.fvecs` / `.bvecs` (the TEXMEX / BIGANN
//! formats: each row a little-endian i32 dimension, then that many f32 or u8), JSONL
//! (one object a line: `vector`, optional `id` / `_id`, `text` / `title`, `metadata`)
//! and Parquet (the same columns; `parquet_rows.rs`).
//! Ids come from the rows (JSONL), else from a sidecar file of one id a line, else the
//! 0-based row number. Nothing is read whole: a [`Reader`] holds one buffered file (and
//! the sidecar's) and hands out chunks of rows; [`Reader::skip`] seeks past rows already
//! imported (fixed-size formats seek, JSONL reads past lines). Every error names the
//! file and the row. [`write_npy`] is the writer the benchmark and the tests use.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The largest dimension a file may declare (a header claiming more is refused before
/// anything is allocated for a row).
pub const MAX_DIMENSION: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Npy,
    Fvecs,
    Bvecs,
    Jsonl,
    Parquet,
}

impl Format {
    /// The format a file's extension names.
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        Ok(match ext.as_str() {
            "npy" => Format::Npy,
            "fvecs" => Format::Fvecs,
            "bvecs" => Format::Bvecs,
            "jsonl" | "ndjson" | "json" => Format::Jsonl,
            "parquet" | "pq" => Format::Parquet,
            _ => bail!(
                "{}: unknown vector file type {ext:?}: expected .npy, .fvecs, .bvecs, .jsonl \
                 or .parquet",
                path.display()
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Npy => "npy",
            Format::Fvecs => "fvecs",
            Format::Bvecs => "bvecs",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }
}

/// One row to import.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub id: String,
    pub vector: Vec<f32>,
    pub text: String,
    /// A JSON object as text; empty = none.
    pub metadata_json: String,
}

/// Fixed-size rows: where they start and how they are laid out.
#[derive(Clone, Copy, Debug)]
struct Fixed {
    /// Bytes before the first row.
    offset: u64,
    /// Bytes before each row's values (fvecs/bvecs: the i32 dimension).
    prefix: usize,
    /// Bytes per value (4: f32, 1: u8).
    width: usize,
    dim: usize,
    rows: u64,
}

impl Fixed {
    fn row_bytes(&self) -> usize {
        self.prefix + self.dim * self.width
    }
}

enum Body {
    Fixed {
        layout: Fixed,
        file: BufReader<File>,
        buf: Vec<u8>,
    },
    Jsonl {
        lines: BufReader<File>,
        line: String,
        /// 1-based line number of the last line read.
        line_no: u64,
        /// The first row's dimension, which every row must have.
        dim: Option<usize>,
    },
    Parquet(Box<crate::parquet_rows::ParquetRows>),
}

/// A sidecar of ids, one a line.
struct Ids {
    path: PathBuf,
    lines: BufReader<File>,
    line: String,
    line_no: u64,
}

impl Ids {
    fn next(&mut self, data: &Path, row: u64) -> Result<String> {
        self.line.clear();
        let n = self
            .lines
            .read_line(&mut self.line)
            .with_context(|| format!("reading {}", self.path.display()))?;
        self.line_no += 1;
        let id = self.line.trim_end_matches(['\n', '\r']);
        if n == 0 {
            bail!(
                "{}: ends at line {} but {} has more rows (row {row} has no id)",
                self.path.display(),
                self.line_no - 1,
                data.display()
            );
        }
        if id.is_empty() {
            bail!("{}: line {}: empty id", self.path.display(), self.line_no);
        }
        Ok(id.to_string())
    }

    /// Refuses a sidecar with more ids than the data has rows (a mismatched pair).
    fn check_exhausted(&mut self, data: &Path, rows: u64) -> Result<()> {
        self.line.clear();
        let n = self
            .lines
            .read_line(&mut self.line)
            .with_context(|| format!("reading {}", self.path.display()))?;
        if n > 0 && !self.line.trim().is_empty() {
            bail!(
                "{}: has more ids than the {rows} rows of {}: line {} is {:?}",
                self.path.display(),
                data.display(),
                self.line_no + 1,
                self.line.trim_end()
            );
        }
        Ok(())
    }
}

/// Reads a vector file a chunk at a time.
pub struct Reader {
    path: PathBuf,
    format: Format,
    body: Body,
    ids: Option<Ids>,
    /// 0-based index of the next row.
    row: u64,
}

impl Reader {
    /// Opens `path` (its format from its extension), with ids from `ids` when given.
    pub fn open(path: &Path, ids: Option<&Path>) -> Result<Reader> {
        let format = Format::of(path)?;
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut file = BufReader::with_capacity(1 << 20, file);
        let body = match format {
            Format::Npy => {
                let layout =
                    npy_header(&mut file, len).with_context(|| path.display().to_string())?;
                Body::Fixed {
                    layout,
                    file,
                    buf: Vec::new(),
                }
            }
            Format::Fvecs | Format::Bvecs => {
                let width = if format == Format::Fvecs { 4 } else { 1 };
                let layout = vecs_layout(&mut file, len, width)
                    .with_context(|| path.display().to_string())?;
                Body::Fixed {
                    layout,
                    file,
                    buf: Vec::new(),
                }
            }
            Format::Jsonl => Body::Jsonl {
                lines: file,
                line: String::new(),
                line_no: 0,
                dim: None,
            },
            Format::Parquet => {
                Body::Parquet(Box::new(crate::parquet_rows::ParquetRows::open(path, 0)?))
            }
        };
        let ids = match ids {
            Some(p) => {
                if matches!(format, Format::Jsonl | Format::Parquet) {
                    bail!(
                        "{}: {} rows carry their ids (`id`); a sidecar ids file is for \
                         .npy, .fvecs and .bvecs",
                        path.display(),
                        format.name()
                    );
                }
                let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
                Some(Ids {
                    path: p.to_path_buf(),
                    lines: BufReader::with_capacity(1 << 20, f),
                    line: String::new(),
                    line_no: 0,
                })
            }
            None => None,
        };
        Ok(Reader {
            path: path.to_path_buf(),
            format,
            body,
            ids,
            row: 0,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Rows in the file, when its format says without reading it (not JSONL).
    pub fn rows(&self) -> Option<u64> {
        match &self.body {
            Body::Fixed { layout, .. } => Some(layout.rows),
            Body::Jsonl { .. } => None,
            Body::Parquet(p) => Some(p.rows()),
        }
    }

    /// The vectors' dimension, when known without reading rows (not JSONL).
    pub fn dimension(&self) -> Option<usize> {
        match &self.body {
            Body::Fixed { layout, .. } => Some(layout.dim),
            Body::Jsonl { dim, .. } => *dim,
            Body::Parquet(p) => p.dimension(),
        }
    }

    /// 0-based index of the next row [`Reader::next_chunk`] returns.
    pub fn position(&self) -> u64 {
        self.row
    }

    /// Moves past the next `n` rows without returning them (a resumed import).
    pub fn skip(&mut self, n: u64) -> Result<()> {
        let target = self.row + n;
        match &mut self.body {
            Body::Fixed { layout, file, .. } => {
                if target > layout.rows {
                    bail!(
                        "{}: cannot skip to row {target}: the file has {} rows",
                        self.path.display(),
                        layout.rows
                    );
                }
                let at = layout.offset + target * layout.row_bytes() as u64;
                file.seek(SeekFrom::Start(at))
                    .with_context(|| format!("seeking in {}", self.path.display()))?;
                if let Some(ids) = &mut self.ids {
                    for r in self.row..target {
                        ids.next(&self.path, r)?;
                    }
                }
                self.row = target;
            }
            Body::Parquet(p) => {
                p.seek(target)?;
                self.row = target;
            }
            Body::Jsonl { .. } => {
                while self.row < target {
                    if self.next_jsonl(false)?.is_none() {
                        bail!(
                            "{}: cannot skip to row {target}: the file has {} rows",
                            self.path.display(),
                            self.row
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Up to `max` next rows; empty at the end of the file.
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<Row>> {
        let mut out = Vec::with_capacity(max.min(4096));
        while out.len() < max {
            let row = match &mut self.body {
                Body::Fixed { .. } => self.next_fixed()?,
                Body::Jsonl { .. } => self.next_jsonl(true)?,
                Body::Parquet(p) => {
                    let r = p.next(self.row)?;
                    self.row += r.is_some() as u64;
                    r
                }
            };
            match row {
                Some(r) => out.push(r),
                None => {
                    let rows = self.row;
                    if let Some(ids) = &mut self.ids {
                        ids.check_exhausted(&self.path, rows)?;
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    fn id_for(&mut self, row: u64) -> Result<String> {
        match &mut self.ids {
            Some(ids) => ids.next(&self.path, row),
            None => Ok(row.to_string()),
        }
    }

    fn next_fixed(&mut self) -> Result<Option<Row>> {
        let row = self.row;
        let Body::Fixed { layout, file, buf } = &mut self.body else {
            unreachable!("a fixed-size body")
        };
        if row >= layout.rows {
            return Ok(None);
        }
        let layout = *layout;
        buf.resize(layout.row_bytes(), 0);
        file.read_exact(buf)
            .with_context(|| format!("{}: reading row {row}", self.path.display()))?;
        if layout.prefix == 4 {
            let d = i32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
            if d as i64 != layout.dim as i64 {
                bail!(
                    "{}: row {row} declares dimension {d}, the file's first row {}",
                    self.path.display(),
                    layout.dim
                );
            }
        }
        let values = &buf[layout.prefix..];
        let vector: Vec<f32> = if layout.width == 4 {
            values
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect()
        } else {
            values.iter().map(|&b| b as f32).collect()
        };
        if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: row {row}: value {i} is {} (vectors must be finite)",
                self.path.display(),
                vector[i]
            );
        }
        let id = self.id_for(row)?;
        self.row += 1;
        Ok(Some(Row {
            id,
            vector,
            text: String::new(),
            metadata_json: String::new(),
        }))
    }

    /// The next JSONL row (blank lines skipped); `parse` false only counts it.
    fn next_jsonl(&mut self, parse: bool) -> Result<Option<Row>> {
        let row = self.row;
        let Body::Jsonl {
            lines,
            line,
            line_no,
            dim,
        } = &mut self.body
        else {
            unreachable!("a JSONL body")
        };
        loop {
            line.clear();
            let n = lines.read_line(line).with_context(|| {
                format!("{}: reading line {}", self.path.display(), *line_no + 1)
            })?;
            if n == 0 {
                return Ok(None);
            }
            *line_no += 1;
            if !line.trim().is_empty() {
                break;
            }
        }
        self.row += 1;
        if !parse {
            return Ok(Some(Row {
                id: String::new(),
                vector: Vec::new(),
                text: String::new(),
                metadata_json: String::new(),
            }));
        }
        let at = || format!("{}: line {} (row {row})", self.path.display(), line_no);
        let v: JsonRow = serde_json::from_str(line).with_context(at)?;
        let id = match v.id.or(v.underscore_id) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(other) => bail!(
                "{}: `id` must be a non-empty string or a number, not {other}",
                at()
            ),
            None => row.to_string(),
        };
        let Some(vector) = v.vector else {
            bail!("{}: no `vector` field", at());
        };
        if vector.is_empty() {
            bail!("{}: `vector` is empty", at());
        }
        match *dim {
            None => *dim = Some(vector.len()),
            Some(d) if d != vector.len() => bail!(
                "{}: `vector` has {} values, the file's first row {d}",
                at(),
                vector.len()
            ),
            Some(_) => {}
        }
        let vector: Vec<f32> = vector.into_iter().map(|x| x as f32).collect();
        if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
            bail!("{}: value {i} of `vector` does not fit a float32", at());
        }
        let metadata_json = match v.metadata {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(m @ serde_json::Value::Object(_)) => m.to_string(),
            Some(other) => bail!("{}: `metadata` must be a JSON object, not {other}", at()),
        };
        let text = match (v.title, v.text) {
            (Some(t), Some(x)) if !t.is_empty() => format!("{t} {x}"),
            (_, Some(x)) => x,
            (Some(t), None) => t,
            (None, None) => String::new(),
        };
        Ok(Some(Row {
            id,
            vector,
            text,
            metadata_json,
        }))
    }
}

#[derive(serde::Deserialize)]
struct JsonRow {
    id: Option<serde_json::Value>,
    #[serde(rename = "_id")]
    underscore_id: Option<serde_json::Value>,
    vector: Option<Vec<f64>>,
    text: Option<String>,
    title: Option<String>,
    metadata: Option<serde_json::Value>,
}

/// Parses a `.npy` header (versions 1-3): float32 little-endian, C order, two
/// dimensions; checks the file holds exactly the rows the shape names.
fn npy_header(file: &mut impl Read, len: u64) -> Result<Fixed> {
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)
        .context("not a .npy file: shorter than its magic")?;
    if &magic[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (no \\x93NUMPY magic)");
    }
    let major = magic[6];
    let header_len = match major {
        1 => {
            let mut b = [0u8; 2];
            file.read_exact(&mut b).context("truncated .npy header")?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            file.read_exact(&mut b).context("truncated .npy header")?;
            u32::from_le_bytes(b) as usize
        }
        v => bail!(".npy format version {v} is not supported (1, 2 or 3)"),
    };
    if header_len > 1 << 16 {
        bail!(".npy header of {header_len} bytes is over the 65536 this reads");
    }
    let mut h = vec![0u8; header_len];
    file.read_exact(&mut h).context("truncated .npy header")?;
    let h = String::from_utf8_lossy(&h);
    let offset = (if major == 1 { 10 } else { 12 } + header_len) as u64;
    let field = |name: &str| -> Result<String> {
        let key = format!("'{name}':");
        let at = h
            .find(&key)
            .with_context(|| format!(".npy header has no {name}: {h}"))?;
        Ok(h[at + key.len()..].trim_start().to_string())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .with_context(|| format!(".npy header's descr is not a string: {h}"))?;
    if descr != "<f4" {
        bail!(".npy dtype {descr:?} is not supported: save the array as float32 ('<f4')");
    }
    if field("fortran_order")?.starts_with("True") {
        bail!(".npy array is in Fortran order: save it in C order (np.ascontiguousarray)");
    }
    let shape = field("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .with_context(|| format!(".npy header's shape is not a tuple: {h}"))?;
    let dims: Vec<u64> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!(".npy shape {inner:?} is not a list of integers"))?;
    let [rows, dim] = dims[..] else {
        bail!(".npy shape ({inner}) must have two dimensions (rows, dimension)");
    };
    if dim == 0 || dim as usize > MAX_DIMENSION {
        bail!(".npy dimension {dim} is not between 1 and {MAX_DIMENSION}");
    }
    let want = rows
        .checked_mul(dim * 4)
        .and_then(|b| b.checked_add(offset))
        .context(".npy shape overflows")?;
    if want != len {
        bail!(
            ".npy shape ({rows}, {dim}) needs {want} bytes but the file has {len} (truncated \
             or not what its header says)"
        );
    }
    Ok(Fixed {
        offset,
        prefix: 0,
        width: 4,
        dim: dim as usize,
        rows,
    })
}

/// `.fvecs` / `.bvecs`: the first row's dimension fixes every row's size.
fn vecs_layout(file: &mut (impl Read + Seek), len: u64, width: usize) -> Result<Fixed> {
    if len == 0 {
        return Ok(Fixed {
            offset: 0,
            prefix: 4,
            width,
            dim: 1,
            rows: 0,
        });
    }
    let mut b = [0u8; 4];
    file.read_exact(&mut b)
        .context("shorter than one row's dimension")?;
    let d = i32::from_le_bytes(b);
    if d <= 0 || d as usize > MAX_DIMENSION {
        bail!("row 0 declares dimension {d}: not between 1 and {MAX_DIMENSION}");
    }
    file.seek(SeekFrom::Start(0))?;
    let layout = Fixed {
        offset: 0,
        prefix: 4,
        width,
        dim: d as usize,
        rows: 0,
    };
    let row = layout.row_bytes() as u64;
    if !len.is_multiple_of(row) {
        bail!(
            "{len} bytes is not a whole number of {row}-byte rows (dimension {d}): truncated, \
             or rows of different dimensions"
        );
    }
    Ok(Fixed {
        rows: len / row,
        ..layout
    })
}

/// Writes `rows` vectors of `dim` float32 values as a `.npy` file (version 1), a row at
/// a time from `row(i)`.
pub fn write_npy(
    path: &Path,
    rows: u64,
    dim: usize,
    mut row: impl FnMut(u64, &mut Vec<f32>),
) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to 64 bytes.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut v = Vec::with_capacity(dim);
    let mut bytes = Vec::with_capacity(dim * 4);
    for i in 0..rows {
        v.clear();
        row(i, &mut v);
        assert_eq!(v.len(), dim, "row {i} has the wrong dimension");
        bytes.clear();
        for x in &v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        w.write_all(&bytes)?;
    }
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes `.fvecs` (or `.bvecs` when `bytes`, values cast to u8) rows.
pub fn write_vecs(path: &Path, vectors: &[Vec<f32>], bytes: bool) -> Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    for v in vectors {
        w.write_all(&(v.len() as i32).to_le_bytes())?;
        for x in v {
            if bytes {
                w.write_all(&[*x as u8])?;
            } else {
                w.write_all(&x.to_le_bytes())?;
            }
        }
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(n: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| (0..dim).map(|j| (i * dim + j) as f32).collect())
            .collect()
    }

    fn read_all(r: &mut Reader, chunk: usize) -> Vec<Row> {
        let mut out = Vec::new();
        loop {
            let c = r.next_chunk(chunk).unwrap();
            if c.is_empty() {
                return out;
            }
            out.extend(c);
        }
    }

    #[test]
    fn npy_with_and_without_an_ids_sidecar_reads_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.npy");
        let vs = vectors(10, 3);
        write_npy(&p, 10, 3, |i, v| v.extend(&vs[i as usize])).unwrap();
        let mut r = Reader::open(&p, None).unwrap();
        assert_eq!((r.rows(), r.dimension()), (Some(10), Some(3)));
        let rows = read_all(&mut r, 4);
        assert_eq!(rows.len(), 10);
        assert_eq!(rows[7].id, "7");
        assert_eq!(rows[7].vector, vs[7]);

        let ids = dir.path().join("v.ids");
        std::fs::write(
            &ids,
            (0..10).map(|i| format!("doc-{i}\n")).collect::<String>(),
        )
        .unwrap();
        let mut r = Reader::open(&p, Some(&ids)).unwrap();
        r.skip(6).unwrap();
        let rows = read_all(&mut r, 3);
        assert_eq!(rows.len(), 4);
        assert_eq!((rows[0].id.as_str(), &rows[0].vector), ("doc-6", &vs[6]));
    }

    #[test]
    fn fvecs_and_bvecs_read_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(5, 4);
        for (name, bytes) in [("v.fvecs", false), ("v.bvecs", true)] {
            let p = dir.path().join(name);
            write_vecs(&p, &vs, bytes).unwrap();
            let mut r = Reader::open(&p, None).unwrap();
            assert_eq!((r.rows(), r.dimension()), (Some(5), Some(4)));
            r.skip(2).unwrap();
            let rows = read_all(&mut r, 2);
            assert_eq!(rows.len(), 3);
            assert_eq!(rows[0].id, "2");
            assert_eq!(rows[0].vector, vs[2]);
        }
    }

    #[test]
    fn jsonl_rows_carry_ids_text_and_metadata_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"vector\":[1,2],\"text\":\"hello\",\"metadata\":{\"k\":1}}\n\n\
             {\"_id\":7,\"vector\":[3,4]}\n{\"vector\":[5,6],\"title\":\"t\"}\n",
        )
        .unwrap();
        let mut r = Reader::open(&p, None).unwrap();
        let rows = read_all(&mut r, 10);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].metadata_json, "{\"k\":1}");
        assert_eq!((rows[1].id.as_str(), rows[2].id.as_str()), ("7", "2"));
        assert_eq!(rows[2].text, "t");
        let mut r = Reader::open(&p, None).unwrap();
        r.skip(2).unwrap();
        assert_eq!(read_all(&mut r, 10)[0].vector, vec![5.0, 6.0]);
    }

    fn rows(n: usize, dim: usize) -> Vec<Row> {
        vectors(n, dim)
            .into_iter()
            .enumerate()
            .map(|(i, vector)| Row {
                id: format!("p-{i}"),
                vector,
                text: if i % 2 == 0 {
                    format!("text {i}")
                } else {
                    String::new()
                },
                metadata_json: if i % 3 == 0 {
                    format!("{{\"i\":{i}}}")
                } else {
                    String::new()
                },
            })
            .collect()
    }

    #[test]
    fn parquet_in_both_list_layouts_reads_every_column_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let want = rows(11, 3);
        for fixed in [true, false] {
            let p = dir.path().join(format!("v-{fixed}.parquet"));
            // Row groups of 4: a resume lands inside one.
            crate::write_parquet(&p, want.clone(), 3, fixed, 4).unwrap();
            let mut r = Reader::open(&p, None).unwrap();
            assert_eq!(r.rows(), Some(11));
            assert_eq!(r.dimension(), fixed.then_some(3));
            assert_eq!(read_all(&mut r, 4), want, "fixed {fixed}");
            let mut r = Reader::open(&p, None).unwrap();
            r.skip(6).unwrap();
            assert_eq!(r.position(), 6);
            assert_eq!(read_all(&mut r, 2), want[6..], "fixed {fixed}");
            assert!(r.skip(1).is_err(), "past the end");
        }
    }

    /// One record batch of the given columns as a Parquet file.
    fn parquet_of(path: &Path, columns: Vec<(&str, arrow_array::ArrayRef)>) {
        let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn bad_parquet_files_are_refused_naming_the_file_the_column_and_the_row() {
        use arrow_array::builder::{Float32Builder, ListBuilder};
        use arrow_array::{ArrayRef, Int32Array, StringArray};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let open_err = |p: &Path| format!("{:#}", Reader::open(p, None).err().expect("refused"));
        let read_err = |p: &Path| {
            let mut r = Reader::open(p, None).unwrap();
            loop {
                match r.next_chunk(2) {
                    Err(e) => break format!("{e:#}"),
                    Ok(c) if c.is_empty() => panic!("{} read without an error", p.display()),
                    Ok(_) => {}
                }
            }
        };
        let list = |rows: &[&[f32]]| -> ArrayRef {
            let mut b = ListBuilder::new(Float32Builder::new());
            for r in rows {
                b.values().append_slice(r);
                b.append(true);
            }
            Arc::new(b.finish())
        };
        // Not Parquet at all.
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, b"hello world").unwrap();
        assert!(
            open_err(&p).contains("x.parquet: not a readable Parquet file"),
            "{}",
            open_err(&p)
        );
        // No vector column; a vector column of integers.
        let p = dir.path().join("novec.parquet");
        parquet_of(
            &p,
            vec![("id", Arc::new(StringArray::from(vec!["a"])) as ArrayRef)],
        );
        let e = open_err(&p);
        assert!(e.contains("no `vector`") && e.contains("[\"id\"]"), "{e}");
        let p = dir.path().join("ints.parquet");
        parquet_of(
            &p,
            vec![("vector", Arc::new(Int32Array::from(vec![1])) as ArrayRef)],
        );
        assert!(
            open_err(&p).contains("a vector column is a list"),
            "{}",
            open_err(&p)
        );
        // A row whose dimension differs, named by row.
        let p = dir.path().join("dims.parquet");
        parquet_of(
            &p,
            vec![("vector", list(&[&[1.0, 2.0], &[1.0, 2.0], &[3.0]]))],
        );
        let e = read_err(&p);
        assert!(
            e.contains("dims.parquet: row 2") && e.contains("has 1 values, the file's first row 2"),
            "{e}"
        );
        // Metadata that is not a JSON object, named by row.
        let p = dir.path().join("meta.parquet");
        parquet_of(
            &p,
            vec![
                ("vector", list(&[&[1.0], &[2.0]])),
                (
                    "metadata",
                    Arc::new(StringArray::from(vec![Some("{}"), Some("[1]")])) as ArrayRef,
                ),
            ],
        );
        let e = read_err(&p);
        assert!(
            e.contains("meta.parquet: row 1") && e.contains("must be a JSON object"),
            "{e}"
        );
        // An id column of the wrong type; a sidecar with a Parquet file.
        let p = dir.path().join("idf.parquet");
        parquet_of(
            &p,
            vec![("vector", list(&[&[1.0]])), ("id", list(&[&[1.0]]))],
        );
        assert!(
            open_err(&p).contains("`id`") && open_err(&p).contains("a string or an integer"),
            "{}",
            open_err(&p)
        );
        let good = dir.path().join("good.parquet");
        crate::write_parquet(&good, rows(2, 2), 2, true, 10).unwrap();
        let ids = dir.path().join("x.ids");
        std::fs::write(&ids, "a\nb\n").unwrap();
        let e = format!("{:#}", Reader::open(&good, Some(&ids)).err().unwrap());
        assert!(e.contains("parquet rows carry their ids"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let err = |p: &Path, ids: Option<&Path>| -> String {
            match Reader::open(p, ids) {
                Err(e) => format!("{e:#}"),
                Ok(mut r) => loop {
                    match r.next_chunk(3) {
                        Err(e) => break format!("{e:#}"),
                        Ok(c) if c.is_empty() => panic!("{} read without an error", p.display()),
                        Ok(_) => {}
                    }
                },
            }
        };
        // A truncated .npy: the header promises more rows than the file holds.
        let p = dir.path().join("t.npy");
        write_npy(&p, 4, 2, |_, v| v.extend([1.0, 2.0])).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(f.metadata().unwrap().len() - 3).unwrap();
        let e = err(&p, None);
        assert!(e.contains("t.npy") && e.contains("truncated"), "{e}");
        // A float64 .npy.
        let p = dir.path().join("d.npy");
        let mut bytes = std::fs::read(dir.path().join("t.npy")).unwrap();
        let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        bytes[at..at + 3].copy_from_slice(b"<f8");
        std::fs::write(&p, bytes).unwrap();
        assert!(err(&p, None).contains("'<f4'"), "{}", err(&p, None));
        // Not a .npy at all.
        let p = dir.path().join("x.npy");
        std::fs::write(&p, b"hello world").unwrap();
        assert!(err(&p, None).contains("magic"));
        // An .fvecs row of another dimension.
        let p = dir.path().join("m.fvecs");
        write_vecs(&p, &[vec![1.0, 2.0], vec![1.0, 2.0], vec![3.0]], false).unwrap();
        let e = err(&p, None);
        assert!(e.contains("m.fvecs") && e.contains("whole number"), "{e}");
        let p = dir.path().join("m2.fvecs");
        let mut rows = vectors(3, 2);
        rows[1] = vec![1.0];
        rows[2] = vec![1.0, 2.0, 3.0];
        write_vecs(&p, &rows, false).unwrap();
        let e = err(&p, None);
        assert!(e.contains("row 1 declares dimension 1"), "{e}");
        // A NaN.
        let p = dir.path().join("n.fvecs");
        write_vecs(&p, &[vec![1.0, f32::NAN]], false).unwrap();
        assert!(err(&p, None).contains("row 0: value 1 is NaN"));
        // JSONL: bad JSON, a missing vector, a dimension change, bad metadata.
        for (body, want) in [
            ("{\"vector\":[1,2]}\n{oops\n", "line 2 (row 1)"),
            ("{\"id\":\"a\"}\n", "no `vector`"),
            (
                "{\"vector\":[1,2]}\n\n{\"vector\":[1]}\n",
                "line 3 (row 1): `vector` has 1 values",
            ),
            (
                "{\"vector\":[1],\"metadata\":[1]}\n",
                "must be a JSON object",
            ),
            ("{\"vector\":[1e300]}\n", "does not fit a float32"),
        ] {
            let p = dir.path().join("b.jsonl");
            std::fs::write(&p, body).unwrap();
            let e = err(&p, None);
            assert!(
                e.contains("b.jsonl") && e.contains(want),
                "{e} lacks {want}"
            );
        }
        // A sidecar with too few or too many ids.
        let p = dir.path().join("v.npy");
        write_npy(&p, 3, 1, |i, v| v.push(i as f32)).unwrap();
        let ids = dir.path().join("few.ids");
        std::fs::write(&ids, "a\nb\n").unwrap();
        let e = err(&p, Some(&ids));
        assert!(
            e.contains("few.ids") && e.contains("row 2 has no id"),
            "{e}"
        );
        std::fs::write(&ids, "a\nb\nc\nd\n").unwrap();
        let e = err(&p, Some(&ids));
        assert!(e.contains("more ids than the 3 rows"), "{e}");
        // An unknown extension.
        assert!(err(&dir.path().join("v.csv"), None).contains("unknown vector file type"));
    }
}
