//! A model's identity (issue 21): the SHA-256 of its directory's files, so a collection
//! names the exact weights its vectors came from (`EncoderRef.content_hash`), and a
//! node encoding text for it proves it holds those weights, not merely a model of the
//! same dimension. Every regular file under the directory counts, in path order, each
//! as its relative path, its length and its bytes.

use std::path::{Path, PathBuf};

/// `sha256:<hex>` of the model directory `dir`.
pub fn content_hash(dir: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for rel in files {
        let bytes = std::fs::read(dir.join(&rel))?;
        let name = rel.to_string_lossy();
        ctx.update(&(name.len() as u64).to_le_bytes());
        ctx.update(name.as_bytes());
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(&bytes);
    }
    let digest = ctx.finish();
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            collect(root, &e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path().strip_prefix(root).expect("under root").to_owned());
        }
    }
    Ok(())
}

/// The model a node encodes with: its hash and where it was loaded from.
#[derive(Clone, Debug)]
pub struct ModelIdentity {
    pub content_hash: String,
    pub dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_names_the_files_and_their_bytes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json"), b"{}").unwrap();
        std::fs::create_dir(d.path().join("1_Pooling")).unwrap();
        std::fs::write(d.path().join("1_Pooling/config.json"), b"x").unwrap();
        let h = content_hash(d.path()).unwrap();
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64, "{h}");
        assert_eq!(content_hash(d.path()).unwrap(), h, "deterministic");
        std::fs::write(d.path().join("1_Pooling/config.json"), b"y").unwrap();
        assert_ne!(content_hash(d.path()).unwrap(), h, "one byte changes it");
    }
}
