//! `manifest.json`: the shard's root of truth, replaced atomically. It names the
//! checkpointed prefix of the segment files, the last log sequence folded into them,
//! and the serving index generation with its file checksum.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{CollectionConfig, IvfPqParams};
use super::error::{Result, ShardError};
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
        }
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

    /// Deletes leftovers of interrupted work: temp files and index files that the
    /// manifest does not name (a build that crashed before its swap).
    pub fn remove_unreferenced_files(&self, dir: &Path) -> Result<()> {
        let keep = self.serving.as_ref().map(|g| g.file.as_str());
        for entry in fs::read_dir(dir).map_err(ShardError::io(dir))? {
            let path = entry.map_err(ShardError::io(dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let stale_index = name.starts_with("gen-") && Some(name) != keep;
            if stale_index || name.ends_with(".tmp") {
                tracing::info!(file = %path.display(), "removing leftover of interrupted work");
                fs::remove_file(&path).map_err(ShardError::io(&path))?;
            }
        }
        Ok(())
    }
}
