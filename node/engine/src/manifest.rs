//! `manifest.json`: the shard's root of truth, replaced atomically. It names the
//! checkpointed prefix of the segment files, the last log sequence folded into them,
//! and the serving index generation with its file checksum.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{CollectionConfig, IvfPqParams};
use super::error::{Result, ShardError};
use super::rerank::Precision;
use super::storage::write_atomic;

const FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationMeta {
    pub id: u64,
    /// Rows `< covered_rows` were considered by this generation; later rows are the
    /// fresh tail, searched exactly.
    pub covered_rows: u64,
    pub indexed_vectors: u64,
    pub file: String,
    pub crc32: u32,
    pub bytes: u64,
    pub params: IvfPqParams,
    pub build_seconds: f64,
    /// The last log sequence number whose rows are below `covered_rows`: a replica
    /// whose history agrees up to it holds the same rows, so it can take this
    /// generation as built (issue 18: the primary trains once). 0: unknown (built
    /// before it was recorded), never shipped.
    #[serde(default)]
    pub covered_seq: u64,
    /// The layout its labels number rows in (the manifest's `layout` when it was
    /// built); `remaps` carry them to the manifest's current layout.
    #[serde(default)]
    pub layout: u64,
    /// One file per compaction since it was built, oldest first (`compact::RowMap`).
    #[serde(default)]
    pub remaps: Vec<RemapMeta>,
    /// Its reduced-precision re-ranking copy (`rerank.rs`), if it was built with one.
    #[serde(default)]
    pub rerank: Option<RerankMeta>,
    /// The cluster operation that built it (issue 21: a rebuild's generation is staged,
    /// switched to, rolled back by its operation's id); 0: none.
    #[serde(default)]
    pub tag: u64,
}

/// A generation's re-ranking copy: its precision and file. The file is this
/// replica's own encoding of its vectors (a generation taken from another replica
/// gets its copy encoded here), so its checksum is never compared across replicas.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RerankMeta {
    pub precision: Precision,
    pub file: String,
    pub crc32: u32,
    pub bytes: u64,
}

impl GenerationMeta {
    /// Every file of the generation: its index, its re-ranking copy, its row maps.
    pub fn files(&self) -> impl Iterator<Item = (&String, u64)> {
        std::iter::once((&self.file, self.bytes))
            .chain(self.rerank.iter().map(|r| (&r.file, r.bytes)))
            .chain(self.remaps.iter().map(|r| (&r.file, r.bytes)))
    }
}

/// A compaction's row map, kept while a generation built before it serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemapMeta {
    pub file: String,
    pub crc32: u32,
    pub bytes: u64,
}

/// Where a compaction drops dead rows: the state after batch `seq`, which every
/// replica of the shard reaches with the same rows and liveness; `rows` and
/// `docs_len` locate it in this replica's segment files.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CompactionPoint {
    pub seq: u64,
    pub rows: u64,
    pub docs_len: u64,
}

/// The segment files of a layout: the originals until the first compaction, then
/// named by the batch the compaction happened at.
pub fn segment_files(layout: u64) -> (String, String) {
    if layout == 0 {
        ("docs.dat".into(), "vectors.f32".into())
    } else {
        (
            format!("docs-{layout:020}.dat"),
            format!("vectors-{layout:020}.f32"),
        )
    }
}

/// A compaction's row map file.
pub fn remap_file(layout: u64) -> String {
    format!("remap-{layout:020}.bits")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub config: CollectionConfig,
    pub applied_seq: u64,
    pub docs_len: u64,
    pub rows: u64,
    pub serving: Option<GenerationMeta>,
    pub next_generation: u64,
    /// (epoch, first sequence number written in it), oldest first: the history a
    /// replica compares with its primary's to find where they diverge.
    #[serde(default)]
    pub epochs: Vec<(u64, u64)>,
    /// The newest client request ids with (seq, upserted, deleted), so retries stay
    /// idempotent across a clean restart (the log holds the rest until checkpointed).
    #[serde(default)]
    pub requests: Vec<(String, u64, usize, usize)>,
    /// The batch the segments were last compacted at (0: never): rows are numbered by
    /// it, the same on every replica that compacted there (`compact`).
    #[serde(default)]
    pub layout: u64,
    /// A compaction logged and not yet done.
    #[serde(default)]
    pub compacting: Option<CompactionPoint>,
    /// A rebuild's generation (issue 21), built beside the serving one and not yet
    /// switched to: searched only by the gate.
    #[serde(default)]
    pub staged: Option<GenerationMeta>,
    /// The generation a rebuild's switch replaced, kept until the operation is committed
    /// (a rollback serves it again at once).
    #[serde(default)]
    pub previous: Option<GenerationMeta>,
    /// A re-embed's second vector set (issue 21, `vector_set.rs`), row-aligned with
    /// the segments' rows, filled until every live row has one.
    #[serde(default)]
    pub vector_set: Option<VectorSetMeta>,
    /// The content hash of the model the stored vectors come from, once known (a
    /// re-embed names it; empty: never said). Queries naming another are refused.
    #[serde(default)]
    pub model: String,
    /// Rows below this have their vectors' checksums in the layout's checksum table
    /// (`<vectors file>.crc`), not in their records: a re-embed's commit made their
    /// vectors; a compaction writes them into the records again. 0: none.
    #[serde(default)]
    pub vector_crcs: u64,
}

/// A re-embed's vector set: the model it holds vectors of, their dimension, its file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VectorSetMeta {
    /// The re-embed operation's id.
    pub tag: u64,
    pub model: String,
    pub dimension: usize,
    pub file: String,
}

/// A vector set's file name.
pub fn vector_set_file(tag: u64) -> String {
    format!("vectors-set-{tag:020}.f32")
}

impl Manifest {
    pub fn new(config: CollectionConfig) -> Self {
        Self {
            format: FORMAT,
            config,
            applied_seq: 0,
            docs_len: 0,
            rows: 0,
            serving: None,
            next_generation: 1,
            epochs: Vec::new(),
            requests: Vec::new(),
            layout: 0,
            compacting: None,
            staged: None,
            previous: None,
            vector_set: None,
            model: String::new(),
            vector_crcs: 0,
        }
    }

    /// Every generation this manifest names: serving, staged, previous.
    pub fn generations(&self) -> impl Iterator<Item = &GenerationMeta> {
        self.serving
            .iter()
            .chain(self.staged.iter())
            .chain(self.previous.iter())
    }

    /// `old`'s files that no generation this manifest names still uses (a compaction's
    /// row map is shared by every generation built before it).
    pub fn unshared_files(&self, old: &GenerationMeta) -> Vec<String> {
        old.files()
            .map(|(f, _)| f.clone())
            .filter(|f| !self.generations().any(|g| g.files().any(|(x, _)| x == f)))
            .collect()
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("manifest.json")
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShardError::NotFound(dir.to_owned()))
            }
            Err(e) => return Err(ShardError::io(&path)(e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ShardError::Corrupt {
            file: path.clone(),
            offset: 0,
            reason: format!("unreadable manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(ShardError::Corrupt {
                file: path,
                offset: 0,
                reason: format!("manifest format {} is not the supported {FORMAT}", m.format),
            });
        }
        m.config.validate()?;
        Ok(m)
    }

    pub fn store(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("manifest serialises");
        write_atomic(&Self::path(dir), &json)
    }

    /// The segment files this manifest's layout reads.
    pub fn segments(&self) -> (String, String) {
        segment_files(self.layout)
    }

    /// Deletes leftovers of interrupted work: temp files, and index, row map and
    /// segment files that the manifest does not name (a build or a compaction that
    /// crashed before its swap, or after it and before removing what it replaced).
    pub fn remove_unreferenced_files(&self, dir: &Path) -> Result<()> {
        let (docs, vectors) = self.segments();
        let mut keep = vec![docs, vectors.clone()];
        keep.extend(
            self.vector_set
                .iter()
                .flat_map(|s| [s.file.clone(), format!("{}.crc", s.file)]),
        );
        if self.vector_crcs > 0 {
            keep.push(format!("{vectors}.crc"));
        }
        for g in self.generations() {
            keep.extend(g.files().map(|(f, _)| f.clone()));
        }
        for entry in fs::read_dir(dir).map_err(ShardError::io(dir))? {
            let path = entry.map_err(ShardError::io(dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let ours = ["gen-", "remap-", "docs", "vectors"]
                .iter()
                .any(|p| name.starts_with(p));
            if (ours && !keep.iter().any(|k| k == name)) || name.ends_with(".tmp") {
                tracing::info!(file = %path.display(), "removing leftover of interrupted work");
                fs::remove_file(&path).map_err(ShardError::io(&path))?;
            }
        }
        Ok(())
    }
}
