//! The audit records that wait for PostgreSQL, kept beside the state file
//! in `state/audit-outbox.jsonl`, where a torn DuckDB block or a lost state
//! file cannot take them.
//!
//! One JSON object a line, appended and synced before anything else learns
//! of it: `{"run_id", "details"}` for a record to write, `{"sent",
//! "audit_id"}` once it is written. A line a crash cut short is skipped.
//! Once nothing waits, the file is emptied. Writing a record twice is
//! harmless: the audit keeps one per run id.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::PendingAudit;

/// Every read and write of an outbox in this process, one at a time
/// (other processes are kept out by the state file's lock).
static OUTBOX: Mutex<()> = Mutex::new(());

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Pending {
        run_id: String,
        details: serde_json::Value,
    },
    Sent {
        sent: String,
        audit_id: i64,
    },
}

pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join("state").join("audit-outbox.jsonl")
}

/// Appends lines and syncs them.
fn append(dir: &Path, lines: &[Line]) -> std::io::Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&serde_json::to_string(line).expect("plain data"));
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path(dir))?;
    // A line a crash cut short stays one line, not the start of this one.
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8];
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len - 1))?;
        std::io::Read::read_exact(&mut f, &mut last)?;
        if last[0] != b'\n' {
            text.insert(0, '\n');
        }
    }
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Keeps records to write, unless the outbox has them (or has sent them)
/// already.
pub(super) fn keep(dir: &Path, records: Vec<PendingAudit>) -> std::io::Result<()> {
    let _one = OUTBOX.lock().unwrap_or_else(|p| p.into_inner());
    let (pending, sent) = read(dir)?;
    let known: HashSet<&str> = pending
        .iter()
        .map(|p| p.run_id.as_str())
        .chain(sent.iter().map(String::as_str))
        .collect();
    let new: Vec<Line> = records
        .into_iter()
        .filter(|r| !known.contains(r.run_id.as_str()))
        .map(|r| Line::Pending {
            run_id: r.run_id,
            details: r.details,
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    append(dir, &new)
}

/// The record of `run_id` is written, as `audit_id`.
pub(super) fn sent(dir: &Path, run_id: &str, audit_id: i64) -> std::io::Result<()> {
    let _one = OUTBOX.lock().unwrap_or_else(|p| p.into_inner());
    append(
        dir,
        &[Line::Sent {
            sent: run_id.to_string(),
            audit_id,
        }],
    )
}

/// The records still to write, oldest first. An outbox with none left is
/// emptied.
pub(super) fn pending(dir: &Path) -> std::io::Result<Vec<PendingAudit>> {
    let _one = OUTBOX.lock().unwrap_or_else(|p| p.into_inner());
    let (pending, _) = read(dir)?;
    if pending.is_empty() && path(dir).metadata().is_ok_and(|m| m.len() > 0) {
        std::fs::File::create(path(dir))?.sync_all()?;
    }
    Ok(pending)
}

/// The records not sent, in the order they came, and the run ids sent.
fn read(dir: &Path) -> std::io::Result<(Vec<PendingAudit>, HashSet<String>)> {
    let text = match std::fs::read_to_string(path(dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut pending: Vec<PendingAudit> = Vec::new();
    let mut sent = HashSet::new();
    for line in text.lines() {
        match serde_json::from_str::<Line>(line) {
            Ok(Line::Pending { run_id, details }) => {
                if !pending.iter().any(|p| p.run_id == run_id) {
                    pending.push(PendingAudit { run_id, details });
                }
            }
            Ok(Line::Sent { sent: run_id, .. }) => {
                pending.retain(|p| p.run_id != run_id);
                sent.insert(run_id);
            }
            Err(_) => {
                tracing::warn!(file = %path(dir).display(), "a line of the audit outbox cut short by a crash is skipped")
            }
        }
    }
    Ok((pending, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> PendingAudit {
        PendingAudit {
            run_id: id.into(),
            details: serde_json::json!({"run_id": id}),
        }
    }

    #[test]
    fn records_wait_until_sent_once_each_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        keep(dir.path(), vec![record("a"), record("b")]).unwrap();
        keep(dir.path(), vec![record("a")]).unwrap();
        let ids = |d: &Path| -> Vec<String> {
            pending(d).unwrap().into_iter().map(|p| p.run_id).collect()
        };
        assert_eq!(ids(dir.path()), ["a", "b"]);
        sent(dir.path(), "a", 1).unwrap();
        // A record sent already is not kept again.
        keep(dir.path(), vec![record("a")]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(path(dir.path()))
            .unwrap()
            .write_all(b"{\"run_id\":\"c\",\"deta")
            .unwrap();
        assert_eq!(ids(dir.path()), ["b"]);
        sent(dir.path(), "b", 2).unwrap();
        assert!(ids(dir.path()).is_empty());
        assert_eq!(path(dir.path()).metadata().unwrap().len(), 0);
    }
}
