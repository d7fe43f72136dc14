//! Through PgBouncer in transaction mode (Debian's 1.18, no prepared
//! statement support, 3 server connections per database), as production
//! reaches Neon's pooled endpoint. The whole one-shot suite also runs
//! through it in `scripts/test.sh`'s pooled pass; these tests are about
//! what only a pooler breaks. Each skips, saying so, without PgBouncer.

use std::process::Command;
use std::time::Duration;

use outreach_workbench::pipeline::{RunOptions, RunStatus};

use crate::common::*;

fn pooled_world(name: &str, pgb: u16) -> World {
    let mut w = World::new(name);
    w.config.source.port = pgb;
    w
}

fn wv_companies(w: &World, n: usize) {
    let mut pg = w.pg();
    for i in 0..n {
        add_company(
            &mut pg,
            &format!("c{i:03}"),
            Some("A"),
            Some("a.example"),
            "WV",
        );
        add_person(
            &mut pg,
            &format!("p{i:03}"),
            &format!("c{i:03}"),
            Some("a@b.example"),
            Some("CEO"),
        );
    }
}

#[test]
fn ten_runs_in_a_row_each_its_own_process() {
    needs_services!();
    let Some(pgb) = pooler_or_skip("ten_runs_in_a_row_each_its_own_process") else {
        return;
    };
    let w = World::new("pool10");
    wv_companies(&w, 30);
    // An enum column: the driver would look its type up with a prepared
    // statement of its own and leave it on the server connection.
    w.pg()
        .batch_execute(
            "CREATE TYPE marketing.tier AS ENUM ('gold', 'silver');
             ALTER TABLE marketing.company_master ADD COLUMN tier marketing.tier DEFAULT 'gold';",
        )
        .unwrap();
    let config = w.write_config_file();
    // Each process names its statements from s0 again: what collided on
    // the pooler's shared server connections.
    for i in 0..10 {
        let out = bin_with_secrets()
            .args(["--config"])
            .arg(&config)
            .args(["run", "--state", "WV"])
            .env("OUTREACH_SOURCE__PORT", pgb.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "run {i}:\n{}", text(&out));
    }
    let audited: i64 = w
        .pg()
        .query_one(
            "SELECT count(*) FROM shq.audit_log WHERE details->>'status' = 'success'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, 10, "every run audited once");
    assert!(leases(&w).is_empty(), "no lease left: {:?}", leases(&w));
    assert_eq!(
        advisory_locks(&w),
        0,
        "no advisory lock left on a server connection"
    );
}

#[test]
fn a_fire_time_runs_once_and_a_held_state_is_skipped() {
    needs_services!();
    let Some(pgb) = pooler_or_skip("a_fire_time_runs_once_and_a_held_state_is_skipped") else {
        return;
    };
    let w = pooled_world("poolfire", pgb);
    wv_companies(&w, 3);
    let fire = chrono::DateTime::parse_from_rfc3339("2026-12-02T11:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let opts = RunOptions {
        fire_time: Some(fire),
        ..Default::default()
    };
    let first = w.run_with("WV", &opts);
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    let again = w.run_with("WV", &opts);
    assert_eq!(again.status, RunStatus::Skipped);
    let why = again.error.unwrap();
    assert!(
        why.contains("already claimed") && why.contains(&first.run_id),
        "{why}"
    );
    assert!(again.audit_id.is_none(), "a skipped fire is not a run");

    // A lease held by a live run elsewhere (its row, unexpired) skips the
    // state, naming the holder; the holder's row is left alone.
    w.pg()
        .batch_execute(
            "INSERT INTO shq.outreach_leases (state, run_id, host, pid, expires_at)
             VALUES ('WV', 'other-run', 'host-b', 4242, now() + interval '1 hour')",
        )
        .unwrap();
    let busy = w.run("WV");
    assert_eq!(busy.status, RunStatus::Skipped);
    let why = busy.error.unwrap();
    assert!(
        why.contains("host-b pid 4242") && why.contains("other-run"),
        "{why}"
    );
    assert_eq!(leases(&w), [("WV".to_string(), "other-run".to_string())]);

    // Once it has expired, it is taken over, and released after the run.
    w.pg()
        .batch_execute("UPDATE shq.outreach_leases SET expires_at = now() - interval '1 second'")
        .unwrap();
    let taken = w.run("WV");
    assert_eq!(taken.status, RunStatus::Success, "{:?}", taken.error);
    assert!(leases(&w).is_empty(), "{:?}", leases(&w));
}

#[test]
fn a_run_while_postgres_is_down_is_audited_once_when_it_is_back() {
    needs_services!();
    let Some(pgb) = pooler_or_skip("a_run_while_postgres_is_down_is_audited_once_when_it_is_back")
    else {
        return;
    };
    let mut w = pooled_world("pooldown", pgb);
    wv_companies(&w, 3);
    // Nothing listens there: PostgreSQL is down.
    w.config.source.port = free_port();
    let down = w.run("WV");
    assert_eq!(down.status, RunStatus::Failed);
    assert!(!down.succeeded());
    assert!(down.audit_id.is_none());
    assert!(down
        .audit_error
        .as_deref()
        .unwrap()
        .contains("kept in the workbench"));

    let history = outreach_workbench::pipeline::history::read(&w.config, None, 10).unwrap();
    let entry = history
        .iter()
        .find(|e| e.report.run_id == down.run_id)
        .expect("in history");
    assert_eq!(entry.report.status, RunStatus::Failed);
    assert!(entry.audit_pending);
    // The `history` command reads the workbench alone.
    let o = bin()
        .args(["history", "--config"])
        .arg(w.write_config_file())
        .output()
        .unwrap();
    assert!(
        text(&o).contains("audit record not written yet"),
        "{}",
        text(&o)
    );

    // Back: the next run writes its own record and the pending one.
    w.config.source.port = pgb;
    let up = w.run("WV");
    assert_eq!(up.status, RunStatus::Success, "{:?}", up.error);
    let again = w.run("WV");
    assert_eq!(again.status, RunStatus::Success, "{:?}", again.error);
    let count = |run_id: &str| -> i64 {
        w.pg()
            .query_one(
                "SELECT count(*) FROM shq.audit_log WHERE details->>'run_id' = $1",
                &[&run_id],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(count(&down.run_id), 1, "the down run, exactly once");
    assert_eq!(count(&up.run_id), 1);
    let d: serde_json::Value = w
        .pg()
        .query_one(
            "SELECT details FROM shq.audit_log WHERE details->>'run_id' = $1",
            &[&down.run_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(d["status"], "failed");
    assert!(
        d["error"].as_str().unwrap().contains("cannot connect"),
        "{d}"
    );
    let history = outreach_workbench::pipeline::history::read(&w.config, None, 10).unwrap();
    let entry = history
        .iter()
        .find(|e| e.report.run_id == down.run_id)
        .unwrap();
    assert!(!entry.audit_pending);
    assert!(entry.audit_id.is_some());
}

#[test]
fn an_audit_error_shows_the_servers_message() {
    needs_services!();
    let Some(pgb) = pooler_or_skip("an_audit_error_shows_the_servers_message") else {
        return;
    };
    let mut w = pooled_world("poolauditmsg", pgb);
    wv_companies(&w, 2);
    let first = w.run("WV");
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    // The audit table refuses writes from now on.
    w.pg()
        .batch_execute(
            "CREATE FUNCTION shq.refuse() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'audit writes are frozen'; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON shq.audit_log
             FOR EACH ROW EXECUTE FUNCTION shq.refuse();",
        )
        .unwrap();
    w.config.retry.attempts = 1;
    let r = w.run("WV");
    assert!(
        !r.succeeded(),
        "a run whose audit was not written did not succeed"
    );
    let e = r.audit_error.unwrap();
    assert!(e.contains("audit writes are frozen"), "{e}");
    assert!(!e.contains("db error"), "{e}");
}

#[test]
fn a_session_ended_by_the_server_is_made_again() {
    needs_services!();
    // Direct: the session's own backend is ended, as Neon ends idle ones
    // (`terminating connection due to administrator command`).
    let w = World::new("poolterm");
    let mut cfg = w.config.source.clone();
    cfg.port = services().pg_port;
    let never = tokio_util::sync::CancellationToken::new();
    let mut session =
        outreach_workbench::source::connect::Session::open(&cfg, &w.config.retry, &never).unwrap();
    let pid = |s: &mut outreach_workbench::source::connect::Session| -> i32 {
        s.run("asking the backend", &never, |c| {
            c.query_typed_one("SELECT pg_backend_pid()", &[])
                .map(|r| r.get(0))
                .map_err(|e| outreach_workbench::error::PipelineError::Source {
                    what: "asking".into(),
                    source: e,
                })
        })
        .unwrap()
    };
    let first = pid(&mut session);
    let ended: bool = w
        .pg()
        .query_one("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap()
        .get(0);
    assert!(ended);
    let second = pid(&mut session);
    assert_ne!(first, second, "a new connection, not an error");
}

/// A PgBouncer of the test's own, as postgres (it refuses root), with its
/// one database at `db_port`; stopped when dropped.
struct OwnPgBouncer {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnPgBouncer {
    /// `databases` is the `[databases]` section's body.
    fn start(databases: &str, server_login_retry: u32) -> OwnPgBouncer {
        let s = services();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("userlist.txt"),
            format!("\"{}\" \"{}\"\n", s.pg_user, s.pg_password),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\n{databases}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = scram-sha-256\n\
                 auth_file = {d}/userlist.txt\npool_mode = transaction\n\
                 server_login_retry = {server_login_retry}\nquery_wait_timeout = 20\n\
                 logfile = {d}/pgbouncer.log\n"
            ),
        )
        .unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", "/usr/sbin/pgbouncer"])
            .arg(dir.path().join("pgbouncer.ini"))
            .spawn()
            .unwrap();
        wait_until(
            "our PgBouncer to listen",
            Duration::from_secs(10),
            String::new,
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        );
        OwnPgBouncer { child, port, dir }
    }
}

impl Drop for OwnPgBouncer {
    fn drop(&mut self) {
        // runuser passes the signal on to PgBouncer.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// After a failed server login (a database starting up, as after each
/// PostgreSQL restart), PgBouncer turns new clients away at their first
/// query, for `server_login_retry`, with "server login has been failing"
/// (08P01, the code it gives a wrong password too); a run retries that as
/// it does a refused connection, and goes through once the server lets it
/// in. Before, it failed at that first answer (found by scripts/soak.sh:
/// most of its failed runs came after a PostgreSQL restart).
#[test]
fn pgbouncers_server_login_has_been_failing_is_retried() {
    needs_services!();
    if !std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        eprintln!(
            "SKIPPED pgbouncers_server_login_has_been_failing_is_retried: no /usr/sbin/pgbouncer"
        );
        return;
    }
    let mut w = World::new("loginfailing");
    add_company(&mut w.pg(), "c1", Some("A"), Some("a.example"), "WV");
    let s = services();
    let pgb = OwnPgBouncer::start(
        &format!("pooled = host=127.0.0.1 port={} dbname={}", s.pg_port, w.db),
        2,
    );
    let url = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=pooled",
        pgb.port, s.pg_user, s.pg_password
    );
    let query = || {
        postgres::Client::connect(&url, postgres::NoTls)
            .and_then(|mut c| c.simple_query("SELECT 1"))
    };
    // The pool works; then the database refuses logins and its server
    // connections end, so PgBouncer's next server login fails.
    query().unwrap();
    let mut admin = pg_client(&s, "postgres");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'",
            db = w.db
        ))
        .unwrap();
    // A client's query makes PgBouncer log in again (the client waits).
    let waiting = std::thread::spawn({
        let url = url.clone();
        move || {
            postgres::Client::connect(&url, postgres::NoTls)
                .and_then(|mut c| c.simple_query("SELECT 1"))
        }
    });
    let log = pgb.dir.path().join("pgbouncer.log");
    wait_until(
        "a failed server login",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).unwrap_or_default(),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("login failed")
                .then_some(())
        },
    );
    // Logins are let in again a moment later.
    let db = w.db.clone();
    let allowed = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        pg_client(&services(), "postgres")
            .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
    });
    w.config.source.port = pgb.port;
    w.config.source.database = "pooled".into();
    w.config.retry.attempts = 10;
    w.config.retry.initial_backoff = Duration::from_millis(500);
    w.config.retry.max_backoff = Duration::from_secs(1);
    let r = w.run("WV");
    allowed.join().unwrap().unwrap();
    let _ = waiting.join();
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log.contains("server login has been failing"),
        "PgBouncer turned the run away first: {log}"
    );
}
