//! `shoal embed`: stdin lines in, JSON vectors out, so a user can check an embedding
//! by hand or pipe text through the encoder.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

pub fn run(model_dir: &Path, batch: usize) -> Result<()> {
    let encoder = shoal_encoder::load_cpu(model_dir)?;
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut lines = Vec::with_capacity(batch);
    let mut first_line = 1usize;
    let mut truncated = 0usize;
    let mut flush = |lines: &mut Vec<String>, first: usize, out: &mut BufWriter<_>| -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
        let enc = encoder.encode(&texts).map_err(|e| match e {
            shoal_encoder::EncoderError::EmptyText { index } => {
                anyhow::anyhow!("line {} is empty: nothing to encode", first + index)
            }
            e => e.into(),
        })?;
        truncated += enc.truncated;
        for v in enc.vectors {
            serde_json::to_writer(&mut *out, &v)?;
            out.write_all(b"\n")?;
        }
        lines.clear();
        Ok(())
    };
    for (n, line) in stdin.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        if lines.is_empty() {
            first_line = n + 1;
        }
        lines.push(line);
        if lines.len() == batch.max(1) {
            flush(&mut lines, first_line, &mut out)?;
        }
    }
    flush(&mut lines, first_line, &mut out)?;
    out.flush()?;
    if truncated > 0 {
        eprintln!(
            "shoal embed: {truncated} texts were longer than the model's limit and truncated"
        );
    }
    Ok(())
}
