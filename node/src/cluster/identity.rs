//! A node's identity on disk: `<data_dir>/node.json` names the data volume (made the
//! first time the data dir is used) and the cluster its data belongs to (learnt from
//! the coordinators on first registration). A node with a new volume tells the
//! coordinators, which stop counting its replicas as holding anything; a node whose
//! data belongs to another cluster is refused by, and refuses maps from, the
//! coordinators of any other cluster (issue 14).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Random, made when this data dir was first used.
    pub volume_id: String,
    /// "" until the node first registers.
    pub cluster_id: String,
}

impl Identity {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("node.json")
    }

    /// Reads `node.json`, or makes a new volume identity when the data dir has none (a
    /// first start, or a replaced volume). A file that cannot be read is an error, not
    /// a new volume: a node must not declare its data gone on a read failure.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading the node identity {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self {
                    volume_id: format!("{:032x}", rand::random::<u128>()),
                    cluster_id: String::new(),
                };
                id.store(data_dir)?;
                tracing::info!(volume = %id.volume_id, dir = %data_dir.display(), "new data volume");
                Ok(id)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes `node.json` atomically (temp file, fsync, rename, directory fsync).
    pub fn store(&self, data_dir: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        shoal_engine::write_atomic(&Self::path(data_dir), &bytes)
            .with_context(|| format!("writing the node identity in {}", data_dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_keeps_its_identity_and_a_new_one_gets_another() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.volume_id.len(), 32);
        let mut b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a, b);
        b.cluster_id = "c1".into();
        b.store(dir.path()).unwrap();
        assert_eq!(
            Identity::load_or_create(dir.path()).unwrap().cluster_id,
            "c1"
        );
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            Identity::load_or_create(other.path()).unwrap().volume_id,
            a.volume_id
        );
        // A damaged file is an error, never a silent new volume.
        std::fs::write(dir.path().join("node.json"), b"{").unwrap();
        assert!(Identity::load_or_create(dir.path()).is_err());
    }
}
