//! The workbench's two files: the service's state file, survived when it
//! is corrupt or lost, and the analysts' catalog, which an open session
//! never holds against a run.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};

use crate::common::*;

/// The state file's neighbours that a corrupt file was set aside as.
fn set_aside(w: &World) -> Vec<String> {
    std::fs::read_dir(w.dir.path().join("state"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("outreach_state.duckdb.corrupt-") && !n.ends_with(".wal"))
        .collect()
}

fn history_ids(w: &World) -> Vec<String> {
    outreach_workbench::pipeline::history::read(&w.config, None, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.report.run_id)
        .collect()
}

/// A state file damaged between two runs (a torn block, cut short, not a
/// DuckDB file at all, or deleted) does not stop the next run: it succeeds,
/// the damaged file is kept aside for inspection, and a new one holds the
/// new run. Before, a torn block was taken for a busy file ("in block at
/// location" holds "lock") and every later run failed.
#[test]
fn a_damaged_or_lost_state_file_is_set_aside_and_the_next_run_succeeds() {
    needs_services!();
    type Damage = fn(&std::path::Path);
    let cases: [(&str, Damage, bool); 4] = [
        ("torn", |p| overwrite(p, 4096), true),
        (
            "cut",
            |p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len / 2).unwrap();
            },
            true,
        ),
        ("notduck", |p| overwrite(p, 0), true),
        ("deleted", |p| std::fs::remove_file(p).unwrap(), false),
    ];
    for (name, damage, kept_aside) in cases {
        let w = World::new(&format!("wb{name}"));
        let mut pg = w.pg();
        add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
        let first = w.run("WV");
        assert!(first.succeeded(), "{name}: {}", first.summary());
        damage(&state_file(&w));

        let second = w.run("WV");
        assert!(second.succeeded(), "{name}: {:?}", second.error);
        assert_eq!(set_aside(&w).len(), usize::from(kept_aside), "{name}");
        // Handed to the caller, which tells the webhooks (a daemon does).
        assert_eq!(second.state_file_set_aside.is_some(), kept_aside, "{name}");
        // The new state file holds the new run, and its history is seeded
        // from the audit with the run before.
        assert!(state_file(&w).exists(), "{name}");
        let ids = history_ids(&w);
        assert!(ids.contains(&second.run_id), "{name}: {ids:?}");
        assert!(ids.contains(&first.run_id), "{name}: seeded, {ids:?}");
        let third = w.run("WV");
        assert!(third.succeeded(), "{name}: {:?}", third.error);
        assert_eq!(set_aside(&w).len(), usize::from(kept_aside), "{name}");
    }
}

/// 4 KiB of noise at `at`, as a torn write leaves a block.
fn overwrite(path: &std::path::Path, at: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    f.write_all(&noise).unwrap();
    f.sync_all().unwrap();
}

/// An analyst's session, in a process of its own, holds the catalog open
/// read-only across two runs: neither waits for it (the lock timeout is
/// zero), the session still reads its views, and a new session sees the
/// second run in the history.
#[test]
fn an_analysts_open_session_never_holds_up_a_run() {
    needs_services!();
    let Ok(python) = std::env::var("OW_DUCKDB_1_2_PYTHON") else {
        eprintln!("skipped: OW_DUCKDB_1_2_PYTHON is not set (scripts/test.sh installs Python's duckdb 1.2.2 when it can; it says why not)");
        return;
    };
    let mut w = World::new("analyst");
    w.config.workbench.lock_timeout = std::time::Duration::ZERO;
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let first = w.run("WV");
    assert!(first.succeeded(), "{}", first.summary());

    // Counts WV's good companies each time it reads a line.
    let script = r#"
import sys, duckdb
c = duckdb.connect(sys.argv[1], read_only=True)
for _ in sys.stdin:
    print(c.execute("SELECT count(*) FROM wv.companies_good").fetchone()[0], flush=True)
"#;
    let mut analyst = Command::new(&python)
        .args(["-c", script])
        .arg(w.dir.path().join("duck/outreach_workbench.duckdb"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ask = analyst.stdin.take().unwrap();
    let mut answers = BufReader::new(analyst.stdout.take().unwrap()).lines();
    let mut count = || {
        writeln!(ask, "count").unwrap();
        answers.next().unwrap().unwrap()
    };
    assert_eq!(count(), "1");

    add_company(&mut pg, "c2", Some("B"), Some("b.example"), "WV");
    let second = w.run("WV");
    assert!(second.succeeded(), "{}", second.summary());
    let third = w.run("WV");
    assert!(third.succeeded(), "{}", third.summary());
    // Its views read the files by path: it sees the new file's rows.
    assert_eq!(count(), "2");
    let ids: Vec<String> = {
        let duck = catalog(&w);
        let mut stmt = duck.prepare("SELECT run_id FROM main.runs").unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert!(ids.contains(&third.run_id), "{ids:?}");
    analyst.kill().unwrap();
    analyst.wait().unwrap();
}

/// A run found the state file corrupt in its middle (DuckDB reads blocks
/// as it needs them): the next opening sets it aside. Driven through the
/// library's own entry, with the error as DuckDB words it.
#[test]
fn a_corruption_found_by_a_run_sets_the_file_aside_at_the_next_opening() {
    needs_services!();
    let w = World::new("wbmid");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let first = w.run("WV");
    assert!(first.succeeded(), "{}", first.summary());
    outreach_workbench::workbench::corrupt_found(&state_file(&w));
    let second = w.run("WV");
    assert!(second.succeeded(), "{}", second.summary());
    assert_eq!(set_aside(&w).len(), 1);
    assert!(history_ids(&w).contains(&second.run_id));
}

/// An audit record left pending while PostgreSQL was down is kept outside
/// the state file: after that file is torn, the next run that reaches
/// PostgreSQL still writes it, once.
#[test]
fn a_pending_audit_record_outlives_a_corrupt_state_file() {
    needs_services!();
    let mut w = World::new("wboutbox");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let port = w.config.source.port;
    // Nothing listens there: PostgreSQL is down.
    w.config.source.port = free_port();
    let down = w.run("WV");
    assert!(down.audit_id.is_none(), "{}", down.summary());
    assert!(down.audit_error.is_some(), "{}", down.summary());
    overwrite(&state_file(&w), 4096);

    w.config.source.port = port;
    let up = w.run("WV");
    assert!(up.succeeded(), "{}", up.summary());
    assert_eq!(set_aside(&w).len(), 1);
    let count: i64 = w
        .pg()
        .query_one(
            "SELECT count(*) FROM shq.audit_log WHERE details->>'run_id' = $1",
            &[&down.run_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "the down run's record, exactly once");
}

/// A disk of its own, `mib` MiB of tmpfs, unmounted when dropped: `None`,
/// with the reason printed, where this machine cannot mount one.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIP: cannot mount a tmpfs for a full disk ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run mount for a full disk ({e})");
                None
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes a file until the disk has no byte left.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let bytes = vec![0u8; chunk];
            while f.write_all(&bytes).is_ok() {}
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

/// DuckDB 1.4.5, when a commit fails for want of disk, takes back the
/// rows it appended but not their strings' bytes: the next row appended
/// to the table read them as part of its own value (the fault soak found
/// a run id that was two run ids run together). The failed commit spoils
/// that opening of the state file: the next write through it is refused,
/// a run that opens the file meanwhile waits for it to be let go, and
/// reads it afresh; no row is fused and no run's end is lost.
#[test]
fn a_failed_commit_spoils_no_later_row() {
    use outreach_workbench::config::WorkbenchConfig;
    use outreach_workbench::workbench::{FinishedRun, Workbench, WorkbenchError};
    let Some(disk) = SmallDisk::mount(16) else {
        return;
    };
    let cfg = WorkbenchConfig {
        dir: disk.path().join("wb"),
        lock_timeout: std::time::Duration::from_secs(60),
        ..WorkbenchConfig::default()
    };
    let id = |n: u32| format!("00000000-0000-4000-8000-{n:012}");
    let now = chrono::Utc::now();
    let ending = |n: u32, status: &str, report: &serde_json::Value| FinishedRun {
        run_id: id(n),
        state: "WV".into(),
        status: status.into(),
        dry_run: false,
        started_at: now,
        finished_at: Some(now),
        audit_id: Some(n.into()),
        error: None,
        report: report.clone(),
        audit_pending: false,
    };
    // What it takes, found by trying: rows in the file's blocks, and a row
    // appended and updated since it was opened.
    let wb = Workbench::open(&cfg).unwrap();
    wb.run_started(&id(0), "OH", false, now).unwrap();
    drop(wb);
    let wb = Workbench::open(&cfg).unwrap();
    wb.run_started(&id(1), "WV", false, now).unwrap();
    wb.run_finished(ending(1, "success", &serde_json::json!({})))
        .unwrap();

    // A start whose commit needs new pages of the log (its state is long).
    disk.fill();
    let full = wb.run_started(&id(2), &"X".repeat(3000), false, now);
    assert!(full.is_err(), "a commit on a full disk succeeded");
    disk.free();

    // Through the same opening: refused, where it came back as the ids of
    // runs 3 and 2 run together; an ending is kept for the next opening.
    match wb.run_started(&id(3), "PA", false, now) {
        Err(WorkbenchError::Spoiled { .. }) => {}
        other => panic!("a write after a failed commit was not refused: {other:?}"),
    }
    let seen: Vec<String> = wb
        .conn()
        .prepare("SELECT run_id FROM main.runs ORDER BY run_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        seen,
        [id(0), id(1)],
        "rows seen through the spoiled opening"
    );
    let report = serde_json::json!({ "run_id": id(4), "pad": "r".repeat(8192) });
    assert!(
        wb.run_finished(ending(4, "failed", &report)).is_err(),
        "an ending written through a spoiled opening"
    );

    // Another run opens the file now: it waits for this opening to be let
    // go, then reads the file as last committed.
    let other = std::thread::spawn({
        let cfg = cfg.clone();
        move || {
            let wb = Workbench::open(&cfg).unwrap();
            wb.run_started(&id(3), "PA", false, now).unwrap();
            wb
        }
    });
    drop(wb);
    let wb = other.join().unwrap();
    let rows: Vec<(String, String, Option<String>)> = wb
        .conn()
        .prepare("SELECT run_id, status, report FROM main.runs ORDER BY run_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(ids, [id(0), id(1), id(3), id(4)], "run ids after reopening");
    assert_eq!(rows[3].1, "failed", "the ending kept for the next opening");
    let kept: serde_json::Value = serde_json::from_str(rows[3].2.as_deref().unwrap()).unwrap();
    assert_eq!(kept, report, "the kept ending's report");
}

/// The names and types of a catalog view's columns.
fn view_columns(cat: &duckdb::Connection, view: &str) -> Vec<String> {
    cat.prepare(&format!(
        "SELECT column_name || ' ' || column_type FROM (DESCRIBE {view})"
    ))
    .unwrap()
    .query_map([], |r| r.get(0))
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn view_count(cat: &duckdb::Connection, view: &str) -> i64 {
    cat.query_row(&format!("SELECT count(*) FROM {view}"), [], |r| r.get(0))
        .unwrap()
}

/// The catalog is written from a copy of the last one, its views made
/// again only for the states whose files came or changed columns: a
/// state's new column shows in its views and in `all_states`, the other
/// states' views still read (a view DuckDB made over other columns would
/// fail), new rows show without a view made again, after one state's run
/// and after an all-states run alike; a deleted catalog is made whole.
#[test]
fn the_catalog_makes_again_only_the_views_whose_files_changed_columns() {
    needs_services!();
    use outreach_workbench::pipeline::all_states::run_all_states;
    use outreach_workbench::pipeline::RunOptions;
    use tokio_util::sync::CancellationToken;
    let w = World::new("wbcatalog");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", Some("B"), Some("b.example"), "OH");
    let all = || {
        let batch = run_all_states(
            &w.config,
            &CancellationToken::new(),
            &RunOptions::default(),
            &mut |_, _| {},
        );
        assert!(batch.runs.iter().all(|r| r.succeeded()), "{batch:?}");
    };
    all();
    let before = view_columns(&catalog(&w), "oh.companies_good");

    // WV alone runs with a new column: its views and all_states show it,
    // OH's views (over files without it) still read.
    pg.batch_execute("ALTER TABLE marketing.company_master ADD COLUMN rating INTEGER")
        .unwrap();
    assert!(w.run("WV").succeeded());
    let cat = catalog(&w);
    assert!(view_columns(&cat, "wv.companies_good").contains(&"rating INTEGER".to_string()));
    assert!(view_columns(&cat, "wv.companies_raw").contains(&"rating INTEGER".to_string()));
    assert_eq!(view_columns(&cat, "oh.companies_good"), before);
    assert_eq!(view_count(&cat, "oh.companies_good"), 1);
    assert!(view_columns(&cat, "all_states.companies_good").contains(&"rating INTEGER".to_string()));
    assert_eq!(view_count(&cat, "all_states.companies_good"), 2);
    drop(cat);

    // An all-states run: OH gets the column; a new row in WV shows
    // through views kept as they were.
    add_company(&mut pg, "c3", Some("C"), Some("c.example"), "WV");
    all();
    let cat = catalog(&w);
    assert!(view_columns(&cat, "oh.companies_good").contains(&"rating INTEGER".to_string()));
    assert_eq!(view_count(&cat, "wv.companies_good"), 2);
    assert_eq!(view_count(&cat, "all_states.companies_good"), 3);
    let states: i64 = cat
        .query_row("SELECT count(*) FROM main.view_sources", [], |r| r.get(0))
        .unwrap();
    assert_eq!(states, 2, "one row of sources a state");
    drop(cat);

    // Deleted, it is made whole by the next run.
    std::fs::remove_file(outreach_workbench::workbench::Workbench::catalog_path(
        &w.config.workbench.dir,
    ))
    .unwrap();
    assert!(w.run("OH").succeeded());
    let cat = catalog(&w);
    assert_eq!(view_count(&cat, "wv.companies_good"), 2);
    assert_eq!(view_count(&cat, "oh.companies_raw"), 1);
}
