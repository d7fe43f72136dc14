//! The daemon binary against real services, with 6-field cron expressions
//! firing every few seconds.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outreach_workbench::pipeline::RunStatus;

use crate::common::*;

/// Reads companies through the slow view (see `add_slow_view`).
const SLOW: (&str, &str) = (
    "OUTREACH_SOURCE__COMPANIES_TABLE",
    "marketing.slow_companies",
);

/// `n` good WV companies behind a view that takes `secs` per row.
fn slow_wv_companies(w: &World, n: usize, secs: f64) {
    add_slow_view(w, secs);
    let mut pg = w.pg();
    for i in 0..n {
        add_company(
            &mut pg,
            &format!("c{i:02}"),
            Some("A"),
            Some("a.example"),
            "WV",
        );
    }
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(w: &World, config: &PathBuf, name: &str, env: &[(&str, &str)]) -> Daemon {
        let log = w.dir.path().join(format!("{name}.out"));
        let out = File::create(&log).unwrap();
        let mut cmd = bin_with_secrets();
        cmd.args(["daemon", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn wait_for_log(&self, needle: &str, limit: Duration) {
        wait_until(
            &format!("`{needle}` in the output"),
            limit,
            || self.output(),
            || self.output().contains(needle).then_some(()),
        )
    }

    /// Sends SIGTERM and waits for the exit; returns (exit code, seconds).
    fn stop(mut self) -> (Option<i32>, f64) {
        let start = Instant::now();
        self.signal("TERM");
        let output = self.log.clone();
        let child = &mut self.child;
        let status = wait_until(
            "the daemon to stop after SIGTERM",
            Duration::from_secs(90),
            || std::fs::read_to_string(&output).unwrap_or_default(),
            || child.try_wait().unwrap(),
        );
        (status.code(), start.elapsed().as_secs_f64())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_with(w: &World, extra: &str) -> PathBuf {
    let path = w.write_config_file();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(extra);
    std::fs::write(&path, text).unwrap();
    path
}

/// Audit rows: (status, started_at, finished_at) of runs of `state`.
fn audits(w: &World, state: &str) -> Vec<(String, String, String)> {
    let mut pg = w.pg();
    match pg.query(
        "SELECT details->>'status', details->>'started_at', details->>'finished_at'
         FROM shq.audit_log WHERE details->>'state' = $1 ORDER BY id",
        &[&state],
    ) {
        Ok(rows) => rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        Err(_) => Vec::new(), // table not created yet
    }
}

/// No two audited runs of WV held the lease at once: each took it after the
/// one before had finished. (A run's checks before the lease take none and
/// may overlap another run's tail.)
fn assert_leases_never_overlap(w: &World) {
    let t = |s: String| chrono::DateTime::parse_from_rfc3339(&s).unwrap();
    let mut spans: Vec<_> = w
        .pg()
        .query(
            "SELECT details->>'lease_acquired_at', details->>'finished_at'
             FROM shq.audit_log WHERE details->>'state' = 'WV'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (t(r.get(0)), t(r.get(1))))
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "overlapping runs: {pair:?}");
    }
}

/// No two audited runs of WV were for the same fire time.
fn assert_fires_distinct(w: &World) {
    let fires: Vec<Option<String>> = w
        .pg()
        .query(
            "SELECT details->>'fire_time' FROM shq.audit_log WHERE details->>'state' = 'WV'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for f in fires.iter().flatten() {
        assert!(seen.insert(f.clone()), "fire time {f} ran twice: {fires:?}");
    }
    assert!(
        fires.iter().all(|f| f.is_some()),
        "scheduled runs carry their fire time: {fires:?}"
    );
}

/// Waits until a run pulls through the slow view (its query is active in
/// PostgreSQL): it is past its lease and recorded as running. Only the
/// pull's own SELECT counts, after the daemon logged the run's start: the
/// source check the daemon makes before arming its schedules also names
/// the view, in a SELECT on pg_attribute that ends in ORDER BY, and
/// matching it made the test stop an idle daemon (once in a CI run).
fn wait_for_slow_pull(w: &World, d: &Daemon, limit: Duration) {
    wait_until(
        "a pull through the slow view",
        limit,
        || d.output(),
        || (d.output().contains("run started") && slow_pull_running(w)).then_some(()),
    )
}

fn wait_for_audits(
    w: &World,
    state: &str,
    n: usize,
    limit: Duration,
) -> Vec<(String, String, String)> {
    wait_until(
        &format!("{n} audit rows of {state}"),
        limit,
        || format!("audit rows now: {:?}", audits(w, state)),
        || Some(audits(w, state)).filter(|a| a.len() >= n),
    )
}

#[test]
fn runs_fire_on_schedule_and_stop_cleanly() {
    needs_services!();
    let w = World::new("dsched");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", Some("B"), Some("b.example"), "PA");
    let cfg = config_with(
        &w,
        "\n[daemon]\nmax_concurrent_runs = 2\n\n[[schedule]]\nstates = [\"WV\", \"PA\"]\ncron = \"*/2 * * * * *\"\n",
    );
    let d = Daemon::start(&w, &cfg, "d", &[]);
    let wv = wait_for_audits(&w, "WV", 2, Duration::from_secs(60));
    let pa = wait_for_audits(&w, "PA", 2, Duration::from_secs(60));
    assert!(
        wv.iter().chain(&pa).all(|a| a.0 == "success"),
        "{wv:?} {pa:?}"
    );
    let out = d.output();
    assert!(out.contains("state=WV") && out.contains("run_id="), "{out}");
    // Daily log file beside the workbench.
    let logs: Vec<_> = std::fs::read_dir(w.dir.path().join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        logs.iter()
            .any(|n| n.starts_with("outreach-workbench") && n.ends_with(".log")),
        "{logs:?}"
    );
    let (code, _) = d.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn an_overlapping_trigger_is_skipped() {
    needs_services!();
    let w = World::new("doverlap");
    slow_wv_companies(&w, 3, 1.0);
    let cfg = config_with(
        &w,
        "\n[[schedule]]\nstates = [\"WV\"]\ncron = \"* * * * * *\"\n",
    );
    let d = Daemon::start(&w, &cfg, "d", &[SLOW]);
    d.wait_for_log(
        "previous run of this state is still going",
        Duration::from_secs(30),
    );
    let a = wait_for_audits(&w, "WV", 1, Duration::from_secs(30));
    assert_eq!(a[0].0, "success");
    d.stop();
}

#[test]
fn sigterm_during_a_run_cancels_after_the_grace_period_and_publishes_nothing() {
    needs_services!();
    let w = World::new("dterm");
    slow_wv_companies(&w, 30, 1.0);
    let cfg = config_with(
        &w,
        "\n[daemon]\nshutdown_grace_secs = 2\n\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    let d = Daemon::start(&w, &cfg, "d", &[SLOW, ("OUTREACH_SOURCE__BATCH_ROWS", "1")]);
    wait_for_slow_pull(&w, &d, Duration::from_secs(30));
    let log = d.log.clone();
    let (code, secs) = d.stop();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "{output}");
    assert!(
        secs < 2.0 + 15.0,
        "stopped within the grace period plus a cancel check: {secs}s"
    );
    let a = audits(&w, "WV");
    assert_eq!(
        a.len(),
        1,
        "the cancelled run is audited before the exit:\n{output}"
    );
    assert_eq!(a[0].0, "cancelled", "{a:?}");
    // A planned stop pages nobody: no line at ERROR priority.
    assert!(!output.lines().any(|l| l.contains(" ERROR ")), "{output}");
    assert!(head(
        &w.bucket,
        "outreach/wv/companies/good/companies_good.parquet"
    )
    .is_none());
    assert!(
        leases(&w).is_empty(),
        "no lease left after SIGTERM: {:?}",
        leases(&w)
    );
}

#[test]
fn two_daemons_on_one_database_never_run_a_state_at_once() {
    needs_services!();
    let w = World::new("dtwo");
    slow_wv_companies(&w, 4, 0.5);
    let cfg = config_with(
        &w,
        "\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/3 * * * * *\"\n",
    );
    // The second daemon has its own workbench, as on another host.
    let other_dir = w.dir.path().join("host2");
    let env = [SLOW];
    let d1 = Daemon::start(&w, &cfg, "d1", &env);
    let mut env2 = env.to_vec();
    let dir2 = other_dir.to_string_lossy().to_string();
    env2.push(("OUTREACH_WORKBENCH__DIR", &dir2));
    let d2 = Daemon::start(&w, &cfg, "d2", &env2);
    wait_for_audits(&w, "WV", 4, Duration::from_secs(90));
    let out = format!("{}{}", d1.output(), d2.output());
    assert!(out.contains("run skipped"), "one of them skipped: {out}");
    assert_fires_distinct(&w);
    assert_leases_never_overlap(&w);
    d1.stop();
    d2.stop();
}

/// Two daemons with `states = "all"` on one database: each state runs
/// once per fire time across both, every run in an all-states batch.
#[test]
fn two_daemons_with_all_states_run_each_state_once_per_fire() {
    needs_services!();
    let w = World::new("dall2");
    let mut pg = w.pg();
    for (c, state) in [("w1", "WV"), ("w2", "WV"), ("p1", "PA"), ("x1", "wv")] {
        add_company(&mut pg, c, Some("A"), Some("a.example"), state);
    }
    let textfile = w.dir.path().join("metrics").join("outreach.prom");
    std::fs::create_dir_all(textfile.parent().unwrap()).unwrap();
    let cfg = config_with(
        &w,
        &format!(
            "\n[metrics]\ntextfile = \"{}\"\n\n[[schedule]]\nstates = \"all\"\ncron = \"*/2 * * * * *\"\n",
            textfile.display()
        ),
    );
    let dir2 = w.dir.path().join("host2").to_string_lossy().to_string();
    let d1 = Daemon::start(&w, &cfg, "d1", &[]);
    let d2 = Daemon::start(&w, &cfg, "d2", &[("OUTREACH_WORKBENCH__DIR", &dir2)]);
    wait_for_audits(&w, "WV", 3, Duration::from_secs(90));
    wait_for_audits(&w, "PA", 3, Duration::from_secs(90));
    let (c1, _) = d1.stop();
    let (c2, _) = d2.stop();
    assert_eq!((c1, c2), (Some(0), Some(0)));
    // The metrics count the row of no state ('wv').
    let metrics = std::fs::read_to_string(&textfile).unwrap();
    assert!(
        metrics.contains("outreach_workbench_rows_without_state{entity=\"companies\"} 1"),
        "{metrics}"
    );
    let rows: Vec<(String, Option<String>, Option<String>, String)> = w
        .pg()
        .query(
            "SELECT details->>'state', details->>'fire_time', details->>'batch_id',
                    details->>'status'
             FROM shq.audit_log WHERE event_type = 'outreach_validation_run' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (state, fire, batch, status) in &rows {
        assert!(fire.is_some() && batch.is_some(), "{rows:?}");
        assert!(
            seen.insert((state, fire)),
            "{state} ran twice for {fire:?}: {rows:?}"
        );
        assert_eq!(status, "success", "{rows:?}");
    }
}

/// SIGTERM in the middle of an all-states run: every state's objects are
/// either whole (its manifest, written last, names exactly what is there)
/// or untouched; the daemon exits 0 and logs nothing at ERROR.
#[test]
fn sigterm_during_an_all_states_run_leaves_each_state_whole_or_untouched() {
    needs_services!();
    let w = World::new("dallterm");
    let mut pg = w.pg();
    let states = ["AK", "AL", "AR", "AZ", "CA", "CO"];
    for (i, state) in states.iter().enumerate() {
        add_company(
            &mut pg,
            &format!("c{i}"),
            Some("A"),
            Some("a.example"),
            state,
        );
        add_person(
            &mut pg,
            &format!("p{i}"),
            &format!("c{i}"),
            Some("x@a.example"),
            Some("CEO"),
        );
    }
    // Every S3 request waits (the fault proxy takes one request per
    // connection, the slow proxy holds each new connection): each state
    // takes seconds to publish.
    let proxy = crate::s3proxy::FaultProxy::start();
    let slow = format!(
        "http://127.0.0.1:{}",
        slow_proxy(
            proxy.endpoint.trim_start_matches("http://").to_string(),
            Duration::from_millis(300)
        )
    );
    let cfg = config_with(
        &w,
        "\n[daemon]\nshutdown_grace_secs = 1\n\n[[schedule]]\nstates = \"all\"\ncron = \"*/2 * * * * *\"\n",
    );
    let d = Daemon::start(
        &w,
        &cfg,
        "d",
        &[
            ("OUTREACH_STORAGE__ENDPOINT", &slow),
            ("OUTREACH_STORAGE__MAX_CONCURRENT_UPLOADS", "1"),
        ],
    );
    wait_until(
        "the first state's manifest",
        Duration::from_secs(60),
        || d.output(),
        || head(&w.bucket, "outreach/ak/_manifest.json"),
    );
    let log = d.log.clone();
    let (code, _) = d.stop();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.lines().any(|l| l.contains(" ERROR ")), "{output}");
    let keys = list_keys(&w.bucket);
    let (mut whole, mut untouched) = (0, 0);
    for state in states {
        let prefix = format!("outreach/{}/", state.to_lowercase());
        // The report page follows the manifest, and is not data: a stop
        // may come before it.
        let page = format!("{prefix}_report.html");
        let mut objects: Vec<&String> = keys
            .iter()
            .filter(|k| k.starts_with(&prefix) && **k != page)
            .collect();
        if objects.is_empty() {
            untouched += 1;
            continue;
        }
        let manifest_key = format!("{prefix}_manifest.json");
        assert!(
            objects.contains(&&manifest_key),
            "{state}: files without a manifest: {objects:?}"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&get(&w.bucket, &manifest_key)).unwrap();
        let mut named: Vec<String> = manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let key = f["key"].as_str().unwrap().to_string();
                let meta = head(&w.bucket, &key).unwrap_or_default();
                assert_eq!(
                    meta.get("sha256").map(String::as_str),
                    f["sha256"].as_str(),
                    "{key}"
                );
                key
            })
            .collect();
        named.push(manifest_key);
        named.sort();
        objects.sort();
        assert_eq!(objects, named.iter().collect::<Vec<_>>(), "{state}");
        whole += 1;
    }
    assert!(
        whole >= 1 && untouched >= 1,
        "whole {whole}, untouched {untouched}: {output}"
    );
}

#[test]
fn a_run_killed_mid_way_is_audited_as_abandoned_at_the_next_start() {
    needs_services!();
    let w = World::new("dkill");
    slow_wv_companies(&w, 20, 1.0);
    let cfg = config_with(
        &w,
        "\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    let d = Daemon::start(&w, &cfg, "d1", &[SLOW]);
    wait_for_slow_pull(&w, &d, Duration::from_secs(30));
    d.signal("KILL");
    let killed = d.log.clone();
    drop(d);

    // Restart on fast data: the killed run is audited, the next one works.
    let d = Daemon::start(&w, &cfg, "d2", &[]);
    wait_until(
        "the killed run found abandoned",
        Duration::from_secs(30),
        || {
            let before = std::fs::read_to_string(&killed).unwrap_or_default();
            format!("killed daemon:\n{before}\nrestarted:\n{}", d.output())
        },
        || {
            d.output()
                .contains("run abandoned by a previous process")
                .then_some(())
        },
    );
    d.wait_for_log("run succeeded", Duration::from_secs(40));
    let a = audits(&w, "WV");
    assert_eq!(a[0].0, "abandoned", "{a:?}\n{}", d.output());
    assert!(a[1..].iter().any(|r| r.0 == "success"), "{a:?}");
    let (code, _) = d.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn a_database_down_at_a_fire_time_fails_that_run_only() {
    needs_services!();
    let w = World::new("ddown");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let cfg = config_with(
        &w,
        "\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    // The daemon reaches PostgreSQL through a port that is down at first.
    let port = free_port();
    let port_s = port.to_string();
    let d = Daemon::start(&w, &cfg, "d", &[("OUTREACH_SOURCE__PORT", &port_s)]);
    d.wait_for_log("run did not succeed", Duration::from_secs(30));
    assert!(d.output().contains("Connection refused"), "{}", d.output());
    pg_comes_back_on(port, Duration::ZERO);
    d.wait_for_log("run succeeded", Duration::from_secs(30));
    let a = audits(&w, "WV");
    assert!(a.iter().any(|r| r.0 == "success"), "{a:?}");
    let (code, _) = d.stop();
    assert_eq!(code, Some(0), "the daemon stayed up");
}

#[test]
fn a_run_over_its_timeout_is_cancelled_and_logs_are_journald_friendly() {
    needs_services!();
    let w = World::new("dtimeout");
    slow_wv_companies(&w, 30, 1.0);
    let cfg = config_with(
        &w,
        "\n[daemon]\nrun_timeout_secs = 2\n\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    let d = Daemon::start(&w, &cfg, "d", &[SLOW, ("JOURNAL_STREAM", "8:12345")]);
    d.wait_for_log("run timed out; cancelling it", Duration::from_secs(30));
    // A cancelled run is a warning, not an error (issue 14).
    d.wait_for_log("run cancelled", Duration::from_secs(20));
    let a = audits(&w, "WV");
    assert_eq!(a[0].0, "cancelled", "{a:?}");
    // Under journald: a syslog priority first, no timestamp of our own.
    let out = d.output();
    let err_line = out.lines().find(|l| l.contains("run timed out")).unwrap();
    assert!(err_line.starts_with("<3>"), "{err_line}");
    let info_line = out.lines().find(|l| l.contains("daemon started")).unwrap();
    assert!(info_line.starts_with("<6>"), "{info_line}");
    assert!(!info_line.contains("Z "), "no timestamp: {info_line}");
    d.stop();
}

#[test]
fn a_rule_naming_an_unknown_column_stops_the_daemon_at_start() {
    needs_services!();
    let w = World::new("drule");
    let cfg = config_with(
        &w,
        "
[[rules.companies]]
code = \"no_revenue\"
condition = \"annual_revenue IS NULL\"

[[schedule]]
states = [\"WV\"]
cadence = \"daily\"
",
    );
    let mut d = Daemon::start(&w, &cfg, "d", &[]);
    let output = d.log.clone();
    let status = wait_until(
        "the daemon to exit",
        Duration::from_secs(30),
        || std::fs::read_to_string(&output).unwrap_or_default(),
        || d.child.try_wait().unwrap(),
    );
    let out = d.output();
    // 2: the unit's RestartPreventExitStatus, no restart loop (issue 14).
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("rules.companies[0] (code `no_revenue`): unknown column \"annual_revenue\""),
        "{out}"
    );
    assert!(!out.contains("daemon started"), "{out}");

    // With the database unreachable the daemon starts anyway: each run
    // checks the rules before it pulls.
    let d = Daemon::start(
        &w,
        &cfg,
        "d2",
        &[("OUTREACH_SOURCE__PORT", &free_port().to_string())],
    );
    d.wait_for_log("could not check the rules", Duration::from_secs(30));
    d.wait_for_log("daemon started", Duration::from_secs(30));
    assert_eq!(d.stop().0, Some(0));
}

#[test]
fn two_daemons_through_the_pooler_run_each_fire_once_even_with_a_slow_s3() {
    needs_services!();
    let Some(pgb) =
        pooler_or_skip("two_daemons_through_the_pooler_run_each_fire_once_even_with_a_slow_s3")
    else {
        return;
    };
    let w = World::new("dpool2");
    slow_wv_companies(&w, 3, 0.3);
    let cfg = config_with(
        &w,
        "\n[lease]\nttl_secs = 5\n\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    // The second host reaches S3 through a slow network: it gets to every
    // fire time late, after the first host may have finished it.
    let s3 = services()
        .s3_endpoint
        .trim_start_matches("http://")
        .to_string();
    let slow = format!(
        "http://127.0.0.1:{}",
        slow_proxy(s3, Duration::from_millis(1500))
    );
    let port = pgb.to_string();
    let dir2 = w.dir.path().join("host2").to_string_lossy().to_string();
    let d1 = Daemon::start(&w, &cfg, "d1", &[SLOW, ("OUTREACH_SOURCE__PORT", &port)]);
    let d2 = Daemon::start(
        &w,
        &cfg,
        "d2",
        &[
            SLOW,
            ("OUTREACH_SOURCE__PORT", &port),
            ("OUTREACH_WORKBENCH__DIR", &dir2),
            ("OUTREACH_STORAGE__ENDPOINT", &slow),
        ],
    );
    let a = wait_for_audits(&w, "WV", 5, Duration::from_secs(120));
    d2.wait_for_log("already claimed", Duration::from_secs(60));
    d1.stop();
    d2.stop();
    assert!(a.iter().all(|r| r.0 == "success"), "{a:?}");
    assert_fires_distinct(&w);
    assert_leases_never_overlap(&w);
    assert!(leases(&w).is_empty(), "{:?}", leases(&w));
    assert_eq!(advisory_locks(&w), 0);
}

#[test]
fn a_lease_left_by_kill_9_is_taken_over_past_its_ttl() {
    needs_services!();
    let Some(pgb) = pooler_or_skip("a_lease_left_by_kill_9_is_taken_over_past_its_ttl") else {
        return;
    };
    let mut w = World::new("dpoolkill");
    slow_wv_companies(&w, 20, 1.0);
    let cfg = config_with(
        &w,
        "\n[lease]\nttl_secs = 6\n\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    let port = pgb.to_string();
    let d = Daemon::start(&w, &cfg, "d1", &[SLOW, ("OUTREACH_SOURCE__PORT", &port)]);
    d.wait_for_log("run started", Duration::from_secs(30));
    wait_until(
        "a lease taken",
        Duration::from_secs(30),
        || d.output(),
        || (!leases(&w).is_empty()).then_some(()),
    );
    // Operators see who holds it.
    let check = bin_with_secrets()
        .args(["--config"])
        .arg(&cfg)
        .arg("check")
        .env("OUTREACH_SOURCE__PORT", &port)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(shown.contains("lease: WV held by"), "{}", text(&check));
    d.signal("KILL");
    drop(d);
    let (_, dead_run) = leases(&w)[0].clone();
    // As if the killed daemon ran on another machine, whose processes this
    // one cannot look at: a dead holder of this host is taken over at once
    // instead (pipeline::a_lease_of_a_dead_process_of_this_host_...).
    w.pg()
        .execute(
            "UPDATE shq.outreach_leases SET process = replace(process, 'boot=', 'boot=elsewhere-')",
            &[],
        )
        .unwrap();

    // Another host, while the dead run's lease is still fresh: skipped.
    w.config.source.port = pgb;
    w.config.workbench.dir = w.dir.path().join("host2");
    let left: f64 = w
        .pg()
        .query_one(
            "SELECT extract(epoch FROM expires_at - now())::float8 FROM shq.outreach_leases",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(left > 1.0, "the lease is fresh ({left} s left)");
    let busy = w.run("WV");
    assert_eq!(busy.status, RunStatus::Skipped, "{:?}", busy.error);
    assert!(
        busy.error.as_deref().unwrap().contains(&dead_run),
        "{:?}",
        busy.error
    );
    // Past the TTL it is taken over.
    wait_until(
        "the lease to expire",
        Duration::from_secs(20),
        String::new,
        || {
            let expired: bool = w
                .pg()
                .query_one(
                    "SELECT coalesce(bool_and(expires_at < now()), true) FROM shq.outreach_leases",
                    &[],
                )
                .unwrap()
                .get(0);
            expired.then_some(())
        },
    );
    let taken = w.run("WV");
    assert_eq!(taken.status, RunStatus::Success, "{:?}", taken.error);
    assert!(leases(&w).is_empty(), "{:?}", leases(&w));
}

/// A `NOTIFY_SOCKET` of the test's own: what the daemon tells systemd.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(w: &World) -> NotifySocket {
        let path = w.dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next message that contains `needle`, within `limit`.
    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            let left = limit.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "no `{needle}` from the daemon within {limit:?}"
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if msg.contains(needle) {
                    return msg;
                }
            }
        }
    }
}

/// An all-states fire tells systemd where it is: reading the source, then
/// the states done of all of them, with the rows per second.
#[test]
fn an_all_states_run_tells_systemd_its_states_done_of_all() {
    needs_services!();
    let w = World::new("dallstatus");
    let mut pg = w.pg();
    for (i, state) in ["AK", "AL", "AR"].iter().enumerate() {
        add_company(
            &mut pg,
            &format!("c{i}"),
            Some("A"),
            Some("a.example"),
            state,
        );
    }
    let cfg = config_with(
        &w,
        "\n[[schedule]]\nstates = \"all\"\ncron = \"*/2 * * * * *\"\n",
    );
    let sock = NotifySocket::bind(&w);
    let path = sock.path.to_string_lossy().to_string();
    let d = Daemon::start(&w, &cfg, "d", &[("NOTIFY_SOCKET", &path)]);
    sock.wait_for(
        "STATUS=all states: reading the source",
        Duration::from_secs(30),
    );
    sock.wait_for("STATUS=all states: 1/3 done, ", Duration::from_secs(30));
    let last = sock.wait_for("STATUS=all states: 3/3 done, ", Duration::from_secs(30));
    assert!(last.contains(" rows/s"), "{last}");
    let log = d.log.clone();
    let (code, _) = d.stop();
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn the_daemon_tells_systemd_ready_status_reloading_watchdog_and_stopping() {
    needs_services!();
    let w = World::new("dnotify");
    add_company(&mut w.pg(), "c1", Some("A"), Some("a.example"), "WV");
    let cfg = config_with(
        &w,
        "\n[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n",
    );
    let sock = NotifySocket::bind(&w);
    let path = sock.path.to_string_lossy().to_string();
    let d = Daemon::start(
        &w,
        &cfg,
        "d",
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1000000")],
    );
    let ready = sock.wait_for("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=next WV "), "{ready}");
    sock.wait_for("WATCHDOG=1", Duration::from_secs(5));
    let status = sock.wait_for("last WV success", Duration::from_secs(30));
    assert!(status.contains("uploaded)"), "{status}");

    // `reload` checks the config first: a broken one fails and is not sent.
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, original.replace("*/2 * * * * *", "not a cron")).unwrap();
    let pid = d.child.id().to_string();
    let refused = bin_with_secrets()
        .args(["--config"])
        .arg(&cfg)
        .args(["reload", "--pid", &pid])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("schedule[0].cron"));
    std::fs::write(&cfg, &original).unwrap();
    let ok = bin_with_secrets()
        .args(["--config"])
        .arg(&cfg)
        .arg("reload")
        .env("MAINPID", &pid)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok));
    let reloading = sock.wait_for("RELOADING=1", Duration::from_secs(10));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    sock.wait_for("READY=1", Duration::from_secs(10));
    d.wait_for_log("configuration reloaded", Duration::from_secs(10));

    let (code, _) = d.stop();
    assert_eq!(code, Some(0));
    // Sent before it exited; the socket kept it.
    sock.wait_for("STOPPING=1", Duration::from_secs(5));
}

/// `GET path` on loopback: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let (head, body) = http_get_accept(port, path, "*/*");
    (head.lines().next().unwrap().to_string(), body)
}

/// `GET path` with an Accept header: (the head in lower case, body).
fn http_get_accept(port: u16, path: &str, accept: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_string())
}

/// Prometheus' own linter accepts `text` (it reads the text format).
fn promtool_check(text: &str, what: &str) {
    use std::io::Write;
    if !have("promtool") {
        eprintln!(
            "skipped promtool check of {what}: promtool is not installed (Debian: prometheus)"
        );
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && said.trim().is_empty(),
        "promtool on {what}: {said}\n{text}"
    );
}

/// node_exporter's textfile collector, pointed at the textfile's folder,
/// serves our runs counter as a counter with our help text.
fn node_exporter_reads_counter(textfile: &std::path::Path) {
    let Some(exe) = ["prometheus-node-exporter", "node_exporter"]
        .into_iter()
        .find(|t| have(t))
    else {
        eprintln!(
            "skipped the node_exporter check: not installed (Debian: prometheus-node-exporter)"
        );
        return;
    };
    let port = free_port();
    let mut child = Command::new(exe)
        .arg("--collector.disable-defaults")
        .arg("--collector.textfile")
        .arg(format!(
            "--collector.textfile.directory={}",
            textfile.parent().unwrap().display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let body = wait_until(
        "node_exporter to listen",
        Duration::from_secs(20),
        String::new,
        || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            write!(
                c,
                "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            Some(out)
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        body.contains("# TYPE outreach_workbench_runs_total counter"),
        "{body}"
    );
    assert!(
        body.contains("# HELP outreach_workbench_runs_total Runs by outcome"),
        "{body}"
    );
    assert!(
        body.contains("node_textfile_scrape_error 0"),
        "node_exporter could not read the textfile:\n{body}"
    );
}

#[test]
fn metrics_are_served_and_written_after_runs_that_succeed_and_gate() {
    needs_services!();
    let w = World::new("dmetrics");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", None, Some("b.example"), "PA");
    let port = free_port();
    let textfile = w.dir.path().join("outreach.prom");
    let cfg = config_with(
        &w,
        &format!(
            "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\ntextfile = \"{}\"\n
[[schedule]]\nstates = [\"WV\"]\ncron = \"*/2 * * * * *\"\n
[[schedule]]\nstates = [\"PA\"]\ncron = \"*/2 * * * * *\"\n[schedule.gates]\nmax_bad_ratio = 0.0\n",
            textfile.display()
        ),
    );
    let d = Daemon::start(&w, &cfg, "d", &[]);
    wait_for_audits(&w, "WV", 1, Duration::from_secs(60));
    let pa = wait_for_audits(&w, "PA", 1, Duration::from_secs(60));
    assert_eq!(pa[0].0, "gated");
    d.wait_for_log("run did not succeed", Duration::from_secs(10));
    // A run is recorded in the metrics (and the textfile) after its audit
    // row is written: wait for both runs there, not only in the audit.
    let wv_success = "outreach_workbench_runs_total{state=\"WV\",status=\"success\"}";
    let pa_gated = "outreach_workbench_runs_total{state=\"PA\",status=\"gated\"}";
    let both = |text: &str| text.contains(wv_success) && text.contains(pa_gated);
    let (status, body) = wait_until(
        "both runs in /metrics",
        Duration::from_secs(10),
        || http_get(port, "/metrics").1,
        || Some(http_get(port, "/metrics")).filter(|(_, b)| both(b)),
    );
    wait_until(
        "both runs in the textfile",
        Duration::from_secs(10),
        || std::fs::read_to_string(&textfile).unwrap_or_default(),
        || both(&std::fs::read_to_string(&textfile).unwrap_or_default()).then_some(()),
    );
    assert!(status.contains("200"), "{status}");
    for needle in [
        "outreach_workbench_runs_total{state=\"WV\",status=\"success\"}",
        "outreach_workbench_runs_total{state=\"PA\",status=\"gated\"}",
        "outreach_workbench_last_success_timestamp_seconds{state=\"WV\"}",
        "outreach_workbench_last_run_timestamp_seconds{state=\"PA\"}",
        "outreach_workbench_rows{state=\"PA\",entity=\"companies\",kind=\"bad\"} 1",
        "outreach_workbench_objects_total{state=\"WV\",action=\"uploaded\"}",
        "outreach_workbench_uploaded_bytes_total{state=\"WV\"}",
        "outreach_workbench_run_duration_seconds{state=\"WV\",stage=\"pull\"}",
        "outreach_workbench_next_fire_timestamp_seconds{state=\"PA\"}",
    ] {
        assert!(body.contains(needle), "no {needle} in:\n{body}");
    }
    assert!(
        !body.contains("last_success_timestamp_seconds{state=\"PA\"}"),
        "a gated run is no success:\n{body}"
    );
    let (health, _) = http_get(port, "/healthz");
    assert!(health.contains("200"), "{health}");
    let (missing, _) = http_get(port, "/nope");
    assert!(missing.contains("404"), "{missing}");
    let file = std::fs::read_to_string(&textfile).unwrap();
    assert!(
        file.contains("outreach_workbench_runs_total{state=\"PA\",status=\"gated\"}"),
        "{file}"
    );
    // Prometheus text: no OpenMetrics `# EOF`; written whole, its last
    // family complete.
    assert!(!file.contains("# EOF") && file.ends_with('\n'), "{file}");
    assert!(
        file.contains("# TYPE outreach_workbench_runs_total counter"),
        "{file}"
    );
    promtool_check(&body, "/metrics");
    promtool_check(&file, "the textfile");
    node_exporter_reads_counter(&textfile);
    // A scraper that asks for OpenMetrics gets it.
    let (head, om) = http_get_accept(
        port,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    );
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE outreach_workbench_runs counter"),
        "{om}"
    );
    d.stop();

    // Restarted, before any run: the last success comes from the history.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("*/2 * * * * *", "0 0 1 1 *");
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(&w, &cfg, "d2", &[]);
    d.wait_for_log("daemon started", Duration::from_secs(30));
    let (_, body) = http_get(port, "/metrics");
    assert!(
        body.contains("outreach_workbench_last_success_timestamp_seconds{state=\"WV\"}"),
        "{body}"
    );
    assert!(
        !body.contains("last_success_timestamp_seconds{state=\"PA\"}"),
        "{body}"
    );
    d.stop();
}

/// (path, body) of each request a webhook receiver got, in order.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A webhook receiver on loopback: records (path, body) of every POST and
/// answers 500 to the first request of each path in `fail_first`.
fn webhook_receiver(fail_first: &[&str]) -> (u16, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let (seen, failing) = (
        got.clone(),
        fail_first.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut seen = seen.lock().unwrap();
            let earlier = seen.iter().filter(|(p, _)| *p == path).count();
            seen.push((path.clone(), String::from_utf8_lossy(&body).to_string()));
            let status = if earlier == 0 && failing.iter().any(|f| path.contains(f.as_str())) {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let mut conn = conn;
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, got)
}

#[test]
fn notifications_reach_their_webhooks_in_both_formats_with_a_retry_and_no_secret_logged() {
    needs_services!();
    let w = World::new("dnotifyhook");
    add_company(&mut w.pg(), "c2", None, Some("b.example"), "PA");
    let (port, got) = webhook_receiver(&["json"]);
    let json_url = format!("http://127.0.0.1:{port}/hook/json-secret-token-1");
    let slack_url = format!("http://127.0.0.1:{port}/hook/slack-secret-token-2");
    let cfg = config_with(
        &w,
        "
[[notify]]
url_env = \"OW_HOOK_JSON\"
on = [\"gated\", \"failed\"]
format = \"json\"

[[notify]]
url_env = \"OW_HOOK_SLACK\"
on = [\"gated\"]
format = \"slack\"

[[schedule]]
states = [\"PA\"]
cron = \"*/2 * * * * *\"
[schedule.gates]
max_bad_ratio = 0.0
",
    );
    let d = Daemon::start(
        &w,
        &cfg,
        "d",
        &[("OW_HOOK_JSON", &json_url), ("OW_HOOK_SLACK", &slack_url)],
    );
    let context = || format!("webhooks got {:?}\n{}", got.lock().unwrap(), d.output());
    // The first JSON post gets a 500 and is sent again, the same report;
    // the next fire's run may post in between.
    let (report, text) = wait_until(
        "the first JSON post again, and the same run's Slack one",
        Duration::from_secs(60),
        context,
        || {
            let seen = got.lock().unwrap().clone();
            let of = |kind: &str| -> Vec<String> {
                seen.iter()
                    .filter(|(p, _)| p.contains(kind))
                    .map(|(_, body)| body.clone())
                    .collect()
            };
            let (json, slack) = (of("json"), of("slack"));
            let first = json.first()?;
            json[1..].contains(first).then_some(())?;
            let report: serde_json::Value = serde_json::from_str(first).unwrap();
            let id = report["audit_id"].as_i64()?;
            let text = slack.iter().find_map(|body| {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                let text = v["text"].as_str()?.to_string();
                text.contains(&format!("audit id {id}")).then_some(text)
            })?;
            Some((report, text))
        },
    );
    d.wait_for_log("notification sent", Duration::from_secs(10));
    d.stop();
    assert_eq!(report["event"], "gated");
    assert_eq!(report["state"], "PA");
    assert_eq!(report["status"], "gated");
    assert!(
        text.contains("PA gated") && text.contains("audit id"),
        "{text}"
    );
    assert!(text.contains("max_bad_ratio"), "the reason: {text}");
    // A gated run's page is only on this host: both say where.
    let page = report["page"].as_str().expect("the page's path");
    assert!(std::path::Path::new(page).exists(), "{page}");
    assert!(text.contains(&format!("report page {page}")), "{text}");
    let out = d_output_of(&w, "d");
    assert!(out.contains(&format!("page=\"{page}\"")), "{out}");
    assert!(out.contains("notification failed; retrying"), "{out}");
    assert!(
        !out.contains("secret-token"),
        "a webhook URL was logged:\n{out}"
    );
}

fn d_output_of(w: &World, name: &str) -> String {
    std::fs::read_to_string(w.dir.path().join(format!("{name}.out"))).unwrap_or_default()
}

/// A one-shot run killed with -9 on the daemon's workbench while the
/// daemon runs is found by the daemon's next run (not only at a start),
/// audited as abandoned once and told to the webhooks.
#[test]
fn a_killed_one_shot_run_found_by_the_daemon_is_told_as_abandoned() {
    needs_services!();
    let w = World::new("dabandonedhook");
    add_company(&mut w.pg(), "w1", Some("A"), Some("a.example"), "WV");
    // The one-shot run's state, behind the slow view: 1 s a row.
    add_slow_view(&w, 1.0);
    for i in 0..10 {
        add_company(
            &mut w.pg(),
            &format!("oh{i}"),
            Some("A"),
            Some("a.example"),
            "OH",
        );
    }
    let (port, got) = webhook_receiver(&[]);
    let url = format!("http://127.0.0.1:{port}/hook/abandoned");
    let cfg = config_with(
        &w,
        "
[[notify]]
url_env = \"OW_HOOK\"
on = [\"abandoned\"]
format = \"json\"

[[schedule]]
states = [\"WV\"]
cron = \"*/2 * * * * *\"
",
    );
    let d = Daemon::start(&w, &cfg, "d", &[("OW_HOOK", &url)]);
    d.wait_for_log("run succeeded", Duration::from_secs(30));
    let err = w.dir.path().join("oneshot.err");
    let mut oneshot = bin_with_secrets()
        .args(["run", "--state", "OH", "--config"])
        .arg(&cfg)
        .env(SLOW.0, SLOW.1)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    wait_until(
        "the one-shot run's pull",
        Duration::from_secs(30),
        || std::fs::read_to_string(&err).unwrap_or_default(),
        || slow_pull_running(&w).then_some(()),
    );
    oneshot.kill().unwrap();
    oneshot.wait().unwrap();
    let posted = wait_until(
        "the abandoned run told",
        Duration::from_secs(30),
        || format!("{:?}\n{}", got.lock().unwrap(), d.output()),
        || got.lock().unwrap().first().map(|(_, body)| body.clone()),
    );
    d.stop();
    let details: serde_json::Value = serde_json::from_str(&posted).unwrap();
    assert_eq!(details["event"], "abandoned", "{details}");
    assert_eq!(details["state"], "OH", "{details}");
    let oh = audits(&w, "OH");
    assert_eq!(oh.len(), 1, "{oh:?}");
    assert_eq!(oh[0].0, "abandoned");
}
