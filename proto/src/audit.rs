//! The audit log (issue 17): one structured record per admin action and per refused
//! call — who (the key's id and name), what (the RPC), its target, when, and the
//! outcome — as a JSON line in the process's audit file (`--audit-log`), as a tracing
//! event under the target `shoal::audit`, and counted in
//! `shoal_audit_records_total{kind, outcome}`.
//!
//! Refusals are recorded at most [`REFUSALS_PER_SECOND`] a second (a flood from
//! anyone who reaches a port must not fill the disk); the rest are counted.
//!
//! Records are written synchronously under a lock: admin actions and refusals are rare
//! next to the data path, and a record must be on its way before the answer is.

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::auth::{Denied, Principal};

/// One record, as a JSON line.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// "admin" (an admin action, allowed) or "refused" (a call refused by its key).
    pub kind: &'a str,
    /// The key's id (`root`, `anonymous` with keys off; `-` when none was shown).
    pub key: &'a str,
    /// The key's name, when known.
    pub name: &'a str,
    /// The RPC, e.g. "DropCollection".
    pub action: &'a str,
    /// What it was about (a collection, a node, a key id; empty for the cluster).
    pub target: &'a str,
    /// "ok", a gRPC code's name for a failed action, or the refusal's code.
    pub outcome: &'a str,
    /// The error's or refusal's message, empty on success.
    pub detail: &'a str,
}

static FILE: OnceLock<Mutex<std::fs::File>> = OnceLock::new();

/// Appends every record of this process to `path` from now on (once, at start).
pub fn open(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let _ = FILE.set(Mutex::new(f));
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A target as recorded: at most 256 bytes of it.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn emit(r: &Record) {
    let line = serde_json::to_string(r).expect("a record serializes");
    tracing::info!(target: "shoal::audit", "{line}");
    metrics::counter!("shoal_audit_records_total", "kind" => r.kind.to_string(), "outcome" => r.outcome.to_string())
        .increment(1);
    if let Some(f) = FILE.get() {
        let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{line}") {
            tracing::error!(error = %e, "the audit log cannot be written");
            metrics::counter!("shoal_audit_write_errors_total").increment(1);
        }
    }
}

/// An admin action's record, with its result.
pub fn admin<T>(who: &Principal, action: &str, target: &str, out: &Result<T, tonic::Status>) {
    let (outcome, detail) = match out {
        Ok(_) => ("ok".to_string(), String::new()),
        Err(s) => (format!("{:?}", s.code()), s.message().to_string()),
    };
    emit(&Record {
        at_ms: now_ms(),
        kind: "admin",
        key: &who.id,
        name: &who.name,
        action,
        target: clip(target),
        outcome: &outcome,
        detail: &detail,
    });
}

/// Refusals written per second at most: anyone who reaches a port can be refused, and
/// a flood of refusals must not fill the disk. Beyond it they are counted
/// (`shoal_audit_suppressed_total`), and the next record written says how many.
pub const REFUSALS_PER_SECOND: u64 = 100;

/// Refusals in the current second, and those suppressed since the last written one.
static REFUSALS: Mutex<(u64, u64, u64)> = Mutex::new((0, 0, 0));

/// Whether this refusal is written, and how many were suppressed before it (pure over
/// the (second, written this second, suppressed) state).
fn admit(state: &mut (u64, u64, u64), second: u64) -> Option<u64> {
    if state.0 != second {
        *state = (second, 0, state.2);
    }
    if state.1 >= REFUSALS_PER_SECOND {
        state.2 += 1;
        return None;
    }
    state.1 += 1;
    Some(std::mem::take(&mut state.2))
}

/// A refused call's record. `presented`: the key shown, of which only the id is kept.
pub fn refused(presented: Option<&str>, action: &str, target: &str, why: &Denied) {
    let admitted = {
        let mut st = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
        admit(&mut st, now_ms() / 1000)
    };
    let Some(suppressed) = admitted else {
        metrics::counter!("shoal_audit_suppressed_total").increment(1);
        return;
    };
    let detail = match suppressed {
        0 => why.to_string(),
        n => format!(
            "{why} ({n} refusals before this one were not recorded: over {REFUSALS_PER_SECOND}/s)"
        ),
    };
    let key = presented
        .and_then(crate::auth::parse)
        .map_or("-", |(id, _)| id);
    let key: String = key.chars().take(32).collect();
    let outcome = match why {
        Denied::Unauthenticated(_) => "Unauthenticated",
        Denied::PermissionDenied(_) => "PermissionDenied",
    };
    emit(&Record {
        at_ms: now_ms(),
        kind: "refused",
        key: &key,
        name: "",
        action,
        target: clip(target),
        outcome,
        detail: &detail,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_recorded_up_to_the_rate_and_the_rest_counted() {
        let mut st = (0, 0, 0);
        for _ in 0..REFUSALS_PER_SECOND {
            assert_eq!(admit(&mut st, 7), Some(0));
        }
        assert_eq!(admit(&mut st, 7), None);
        assert_eq!(admit(&mut st, 7), None);
        // The next second's first record carries the count.
        assert_eq!(admit(&mut st, 8), Some(2));
        assert_eq!(admit(&mut st, 8), Some(0));
    }
}
