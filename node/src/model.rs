//! A model's identity (issue 21): the SHA-256 of its directory's files, so a collection
//! names the exact weights its vectors came from (`EncoderRef.content_hash`), and a
//! node encoding text for it proves it holds those weights, not merely a model of the
//! same dimension. Every regular file under the directory counts (hidden ones, an
//! installer's markers, do not), in path order, each as its relative path, its length
//! and its bytes.

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
        // Hidden files are an installer's (fetch-model.sh's `.complete`), not the model's.
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let t = e.file_type()?;
        if t.is_dir() {
            collect(root, &e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path().strip_prefix(root).expect("under root").to_owned());
        }
    }
    Ok(())
}

/// A model a node encodes with: its hash, where it was loaded from, its dimension.
#[derive(Clone, Debug)]
pub struct ModelIdentity {
    pub content_hash: String,
    pub dir: PathBuf,
    pub dimension: usize,
}

/// Pure: which of a node's `models` encodes text for a collection of `dimension` that
/// names `want` (model id, content hash). A named hash must be held exactly; a
/// collection without one (made before models had hashes) takes the first model of
/// its dimension. The refusal says what was wanted and what this node holds, where.
pub fn pick(
    models: &[ModelIdentity],
    want: Option<(&str, &str)>,
    dimension: usize,
) -> Result<usize, String> {
    let held = || {
        if models.is_empty() {
            "none (started without --model-dir)".to_string()
        } else {
            models
                .iter()
                .map(|m| {
                    format!(
                        "{} ({}-d, {})",
                        m.content_hash,
                        m.dimension,
                        m.dir.display()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    if models.is_empty() {
        return Err("this node has no encoder (started without a model dir): send vectors".into());
    }
    match want.filter(|(_, hash)| !hash.is_empty()) {
        Some((id, hash)) => models
            .iter()
            .position(|m| m.content_hash == hash)
            .ok_or_else(|| {
                format!(
                    "the collection's vectors come from model {id} ({hash}); this node holds {}: \
                     start it with that model's --model-dir (or --extra-model-dir), or send vectors",
                    held()
                )
            }),
        None => models
            .iter()
            .position(|m| m.dimension == dimension)
            .ok_or_else(|| {
                format!(
                    "the collection holds {dimension}-d vectors and this node has no model \
                     making them (models here: {}): send vectors",
                    held()
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collection_is_encoded_only_by_the_model_it_names() {
        let m = |hash: &str, dimension| ModelIdentity {
            content_hash: hash.into(),
            dir: PathBuf::from(format!("/models/{hash}")),
            dimension,
        };
        let models = [m("sha256:aa", 384), m("sha256:bb", 768)];
        assert_eq!(pick(&models, Some(("mpnet", "sha256:bb")), 768), Ok(1));
        assert_eq!(pick(&models, Some(("minilm", "sha256:aa")), 384), Ok(0));
        let e = pick(&models, Some(("minilm", "sha256:cc")), 384).unwrap_err();
        assert!(
            e.contains("sha256:cc") && e.contains("/models/sha256:aa") && e.contains("sha256:bb"),
            "{e}"
        );
        // No hash named (a collection from before): the first of its dimension.
        assert_eq!(pick(&models, Some(("minilm", "")), 768), Ok(1));
        assert_eq!(pick(&models, None, 384), Ok(0));
        assert!(pick(&models, None, 512).unwrap_err().contains("512-d"));
        assert!(pick(&[], None, 384).unwrap_err().contains("no encoder"));
    }

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
        let changed = content_hash(d.path()).unwrap();
        assert_ne!(changed, h, "one byte changes it");
        std::fs::write(d.path().join(".complete"), b"").unwrap();
        assert_eq!(
            content_hash(d.path()).unwrap(),
            changed,
            "hidden files do not count"
        );
    }
}
