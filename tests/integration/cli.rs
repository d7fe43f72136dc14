//! The binary as a user runs it: config file plus the original environment
//! variable names, exit codes, and messages.

use crate::common::*;

#[test]
fn run_with_the_original_variable_names() {
    needs_services!();
    let w = World::new("cli");
    let s = services();
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("CEO"));
    let cfg = w.write_config_file();
    // The bucket comes from B2_BUCKET, overriding the file's.
    let o = bin_with_secrets()
        .args(["run", "--state", "wv", "--config"])
        .arg(&cfg)
        .env("B2_BUCKET", &w.bucket)
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("state WV: success"), "{out}");
    assert!(out.contains("uploaded 4, skipped 0"), "{out}");
    assert!(out.contains("audit id"), "{out}");
    assert!(
        !out.contains(&s.pg_password) && !out.contains(&s.s3_secret),
        "{out}"
    );

    // OUTREACH_<SECTION>__<KEY> overrides the file too.
    let o = bin()
        .args(["run", "--state", "WV", "--dry-run", "--config"])
        .arg(&cfg)
        .env("NEON_PASSWORD", &s.pg_password)
        .env("OUTREACH_SOURCE__PORT", "1")
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(":1/"), "names the port it tried: {out}");
}

#[test]
fn bad_input_is_refused_with_the_key_named() {
    needs_services!();
    let w = World::new("clibad");
    let cfg = w.write_config_file();
    let o = bin()
        .args(["run", "--state", "XX", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a US state"), "{}", text(&o));

    let bad = w.dir.path().join("bad.toml");
    let content = std::fs::read_to_string(&cfg).unwrap() + "\n[export]\ncompresion = \"zstd\"\n";
    std::fs::write(&bad, content).unwrap();
    let o = bin()
        .args(["run", "--state", "WV", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("compresion"), "{}", text(&o));

    let o = bin()
        .args([
            "run",
            "--state",
            "WV",
            "--config",
            "/nonexistent/config.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("/nonexistent/config.toml"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_busy_workbench_is_waited_for_then_reported() {
    needs_services!();
    let w = World::new("busy");
    let s = services();
    let cfg = w.write_config_file();
    // Another process holding the state file (here, this one): the run
    // waits for it. The analysts' catalog never makes a run wait.
    std::fs::create_dir_all(w.dir.path().join("state")).unwrap();
    let holder = duckdb::Connection::open(state_file(&w)).unwrap();
    let started = std::time::Instant::now();
    let o = bin()
        .args(["run", "--state", "WV", "--dry-run", "--config"])
        .arg(&cfg)
        .env("NEON_PASSWORD", &s.pg_password)
        .output()
        .unwrap();
    drop(holder);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("is busy"), "{out}");
    assert!(
        started.elapsed().as_secs_f64() >= 2.0,
        "waited lock_timeout_secs first"
    );
}

#[test]
fn shipped_config_toml_is_accepted_as_it_is() {
    needs_services!();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let o = bin()
        .args(["check", "--offline", "--config", path])
        .env("B2_KEY_ID", "k")
        .env("B2_APPLICATION_KEY", "s")
        .env("B2_BUCKET", "b")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Without the secrets, and with the shipped placeholder bucket, the
    // check says what is missing.
    let o = bin()
        .args(["check", "--offline", "--config", path])
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("B2_APPLICATION_KEY"), "{out}");
    assert!(
        out.contains("problem: storage.bucket is still the shipped placeholder"),
        "{out}"
    );
}

#[test]
fn check_reports_each_problem_on_its_own_line() {
    needs_services!();
    let w = World::new("check");
    let s = services();
    let cfg = w.write_config_file();
    let ok = bin_with_secrets()
        .args(["check", "--config"])
        .arg(&cfg)
        .env("B2_BUCKET", &w.bucket)
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));

    w.pg()
        .batch_execute("CREATE SCHEMA shq; CREATE TABLE shq.audit_log (id SERIAL, note TEXT)")
        .unwrap();
    let bad = bin()
        .args(["check", "--config"])
        .arg(&cfg)
        .env("NEON_PASSWORD", &s.pg_password)
        .env("B2_KEY_ID", &s.s3_key)
        .env("B2_APPLICATION_KEY", "wrong-secret")
        .env("B2_BUCKET", &w.bucket)
        .env("OUTREACH_SOURCE__STATE_COLUMN", "no_such_column")
        .output()
        .unwrap();
    let out = text(&bad);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("problem: ")).collect();
    assert_eq!(problems.len(), 3, "{out}");
    assert!(out.contains("no_such_column"), "{out}");
    assert!(
        out.contains("audit table shq.audit_log") && out.contains("event_type"),
        "{out}"
    );
    assert!(
        out.contains("SignatureDoesNotMatch") || out.contains("403"),
        "{out}"
    );
    assert!(!out.contains("wrong-secret"), "{out}");
}

#[test]
fn schedule_lists_the_next_five_fire_times_in_utc_and_local_time() {
    needs_services!();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let o = bin().args(["schedule", "--config", path]).output().unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("schedule[0] WV `0 6 * * *` (America/New_York)"),
        "{out}"
    );
    let times: Vec<&str> = out.lines().filter(|l| l.contains(" UTC  ")).collect();
    assert_eq!(times.len(), 5, "{out}");
    for t in times {
        // 06:00 local, whichever side of DST the date falls on.
        assert!(
            t.contains(" 06:00:00 ES") || t.contains(" 06:00:00 ED"),
            "{t}"
        );
    }
}

/// The ledger's tables made by a run (here the leases and fire claims,
/// in a schema that exists) leave no NOTICE of PostgreSQL's in the log:
/// "schema … already exists, skipping" was an INFO line per table.
#[test]
fn making_the_ledger_tables_logs_no_notice_of_the_server() {
    needs_services!();
    let w = World::new("notices");
    w.pg()
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS shq;
             DROP TABLE IF EXISTS shq.outreach_leases, shq.outreach_fire_claims",
        )
        .unwrap();
    let cfg = w.write_config_file();
    let o = bin_with_secrets()
        .args(["run", "--state", "WV", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let made: i64 = w
        .pg()
        .query_one(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = 'shq' AND table_name IN ('outreach_leases', 'outreach_fire_claims')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(made, 2, "the run made the tables again");
    assert!(
        !out.contains("skipping") && !out.contains("NOTICE"),
        "{out}"
    );
}
