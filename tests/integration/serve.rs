//! The daemon in-process: `daemon::serve` with a control channel instead of
//! signals and tokio's paused time instead of the wall clock. Time stands
//! still while a run works (a blocking task holds it) and jumps to the next
//! timer when everything waits, so a daily schedule fires day after day in
//! a fraction of a second, at exactly its fire times.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outreach_workbench::daemon::{self, Clock, Control, Event, Service};
use outreach_workbench::pipeline::{RunReport, RunStatus};
use tokio::sync::mpsc;

use crate::common::*;

/// A clock that starts at `start` and moves with tokio's time.
struct PausedClock {
    start: DateTime<Utc>,
    at: tokio::time::Instant,
}

impl Clock for PausedClock {
    fn now(&self) -> DateTime<Utc> {
        self.start + chrono::Duration::from_std(self.at.elapsed()).unwrap()
    }
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The config file with `extra` appended and the secrets in the file
/// itself: a reload reads the file and the environment, and a test must
/// not set process-wide variables.
fn config_file(w: &World, extra: &str) -> PathBuf {
    let s = services();
    let toml = toml_for(&s, &w.db, &w.bucket, w.dir.path())
        .replace(
            "[source]\n",
            &format!("[source]\npassword = \"{}\"\n", s.pg_password),
        )
        .replace(
            "[storage]\n",
            &format!(
                "[storage]\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                s.s3_key, s.s3_secret
            ),
        );
    let path = w.dir.path().join("config.toml");
    std::fs::write(&path, format!("{toml}\n{extra}\n")).unwrap();
    path
}

/// A daemon served on the test's paused runtime.
struct InProcess {
    controls: mpsc::UnboundedSender<Control>,
    events: mpsc::UnboundedReceiver<Event>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts serving `path` with the clock at `start`; returns once the
    /// daemon says it has started.
    async fn start(path: &Path, start: DateTime<Utc>) -> InProcess {
        let config = outreach_workbench::quality::rules::load_config(path).unwrap();
        let (controls, rx) = mpsc::unbounded_channel();
        let (tx, events) = mpsc::unbounded_channel();
        let service = Service {
            config_path: path.to_path_buf(),
            config,
            clock: Arc::new(PausedClock {
                start,
                at: tokio::time::Instant::now(),
            }),
            events: Some(tx),
        };
        let mut d = InProcess {
            controls,
            events,
            served: tokio::spawn(daemon::serve(service, rx)),
        };
        assert!(matches!(d.next().await, Event::Started));
        d
    }

    /// The next event; fails the test if none comes within a (paused)
    /// year, which in real time is at once.
    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(366 * 86400), self.events.recv())
            .await
            .expect("no event from the daemon within a year")
            .expect("the daemon stopped")
    }

    /// The next finished run's report.
    async fn next_run(&mut self) -> RunReport {
        match self.next().await {
            Event::RunFinished(report) => *report,
            other => panic!("expected a finished run, got {other:?}"),
        }
    }

    async fn stop(self) {
        self.controls.send(Control::Stop).unwrap();
        self.served.await.unwrap().unwrap();
    }
}

/// One good company in WV and one in PA.
fn good_company_in_wv_and_pa(w: &World) {
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", Some("B"), Some("b.example"), "PA");
}

/// A workbench whose history holds the runs `values` (rows of
/// `main.runs` as SQL): the daemon finds them at its start.
fn past_runs(w: &World, values: &str) {
    std::fs::create_dir_all(w.dir.path().join("duck")).unwrap();
    let duck =
        duckdb::Connection::open(w.dir.path().join("duck/outreach_workbench.duckdb")).unwrap();
    duck.execute_batch(&format!(
        "CREATE TABLE main.runs (run_id VARCHAR PRIMARY KEY, state VARCHAR NOT NULL, status VARCHAR NOT NULL,
             dry_run BOOLEAN NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP, audit_id BIGINT,
             error VARCHAR, report VARCHAR);
         INSERT INTO main.runs VALUES {values};"
    ))
    .unwrap();
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// (state, fire time, status) of each report, sorted.
fn fired(reports: &[RunReport]) -> Vec<(String, String, RunStatus)> {
    let mut v: Vec<_> = reports
        .iter()
        .map(|r| {
            let fire = r.fire_time.map(|t| t.to_rfc3339()).unwrap_or_default();
            (r.state.to_string(), fire, r.status)
        })
        .collect();
    v.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    v
}

#[test]
fn a_daily_schedule_fires_at_local_midnight_each_day_across_a_dst_change() {
    needs_services!();
    let w = World::new("sdaily");
    good_company_in_wv_and_pa(&w);
    let path = config_file(
        &w,
        "[daemon]\nmax_concurrent_runs = 2\n\n[[schedule]]\nstates = [\"WV\", \"PA\"]\ncadence = \"daily\"\ntimezone = \"America/New_York\"\n",
    );
    paused_runtime().block_on(async {
        // The day before the 2026 spring-forward in New York.
        let mut d = InProcess::start(&path, utc("2026-03-07T12:00:00Z")).await;
        let mut reports = Vec::new();
        for _ in 0..4 {
            reports.push(d.next_run().await);
        }
        d.stop().await;
        let ok = RunStatus::Success;
        let (est, edt) = ("2026-03-08T05:00:00+00:00", "2026-03-09T04:00:00+00:00");
        assert_eq!(
            fired(&reports),
            [
                ("PA".into(), est.into(), ok),
                ("WV".into(), est.into(), ok),
                ("PA".into(), edt.into(), ok),
                ("WV".into(), edt.into(), ok),
            ],
            "{:?}",
            reports.iter().map(|r| &r.error).collect::<Vec<_>>()
        );
    });
    let audited: i64 = w
        .pg()
        .query_one("SELECT count(*) FROM shq.audit_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(audited, 4);
}

#[test]
fn a_reload_takes_a_good_config_and_refuses_a_broken_one() {
    needs_services!();
    let w = World::new("sreload");
    good_company_in_wv_and_pa(&w);
    let yearly = "[[schedule]]\nstates = [\"WV\"]\ncron = \"0 0 1 1 *\"\n";
    let path = config_file(&w, yearly);
    paused_runtime().block_on(async {
        let mut d = InProcess::start(&path, utc("2026-06-01T10:00:00Z")).await;
        config_file(&w, "[[schedule]]\nstates = [\"PA\"]\ncadence = \"daily\"\n");
        d.controls.send(Control::Reload).unwrap();
        assert!(matches!(d.next().await, Event::Reloaded(Ok(()))));
        let pa = d.next_run().await;
        assert_eq!(
            (pa.state.as_str(), pa.status, pa.fire_time),
            ("PA", RunStatus::Success, Some(utc("2026-06-02T00:00:00Z"))),
            "{:?}",
            pa.error
        );

        config_file(
            &w,
            "[[schedule]]\nstates = [\"WV\"]\ncron = \"not a cron\"\n",
        );
        d.controls.send(Control::Reload).unwrap();
        match d.next().await {
            Event::Reloaded(Err(e)) => assert!(e.contains("schedule[0].cron"), "{e}"),
            other => panic!("expected a refused reload, got {other:?}"),
        }
        // The PA schedule in force keeps firing; WV's never came back.
        let pa = d.next_run().await;
        assert_eq!(
            (pa.state.as_str(), pa.fire_time),
            ("PA", Some(utc("2026-06-03T00:00:00Z")))
        );
        d.stop().await;
    });
}

#[test]
fn catch_up_runs_the_first_missed_fire_time_once_and_only_where_asked() {
    needs_services!();
    let w = World::new("scatch");
    good_company_in_wv_and_pa(&w);
    // History: both states last ran at noon on 2026-05-29; the daily 00:00
    // UTC fire times since were missed. Only the catch_up schedule runs at
    // start, for the first fire time it missed.
    past_runs(
        &w,
        "('old-wv', 'WV', 'success', false, TIMESTAMP '2026-05-29 12:00:00', NULL, NULL, NULL, NULL),
                 ('old-pa', 'PA', 'success', false, TIMESTAMP '2026-05-29 12:00:00', NULL, NULL, NULL, NULL)",
    );
    let path = config_file(
        &w,
        "[[schedule]]\nstates = [\"WV\"]\ncadence = \"daily\"\ncatch_up = true\n\n[[schedule]]\nstates = [\"PA\"]\ncadence = \"daily\"\n",
    );
    paused_runtime().block_on(async {
        let mut d = InProcess::start(&path, utc("2026-06-01T10:00:00Z")).await;
        // Everything up to and including the next scheduled fire.
        let mut reports = Vec::new();
        while reports.len() < 3 {
            reports.push(d.next_run().await);
        }
        d.stop().await;
        let ok = RunStatus::Success;
        let next = "2026-06-02T00:00:00+00:00";
        assert_eq!(
            fired(&reports),
            [
                ("WV".into(), "2026-05-30T00:00:00+00:00".into(), ok),
                ("PA".into(), next.into(), ok),
                ("WV".into(), next.into(), ok),
            ],
            "{:?}",
            reports.iter().map(|r| &r.error).collect::<Vec<_>>()
        );
        assert_eq!(
            reports[0].fire_time,
            Some(utc("2026-05-30T00:00:00Z")),
            "the catch-up ran first, before any scheduled fire"
        );
    });
}

/// An all-states schedule with `catch_up` runs every state once at start
/// for the first fire time it missed, judged by its last all-states run.
#[test]
fn catch_up_of_an_all_states_schedule_runs_every_state_once() {
    needs_services!();
    let w = World::new("scatchall");
    good_company_in_wv_and_pa(&w);
    past_runs(
        &w,
        "('old-wv', 'WV', 'success', false, TIMESTAMP '2026-05-29 12:00:00', NULL, NULL, NULL,
                  '{\"batch_id\":\"b1\",\"state\":\"WV\"}')",
    );
    let path = config_file(
        &w,
        "[[schedule]]\nstates = \"all\"\ncadence = \"daily\"\ncatch_up = true\n",
    );
    paused_runtime().block_on(async {
        let mut d = InProcess::start(&path, utc("2026-06-01T10:00:00Z")).await;
        let mut reports = Vec::new();
        while reports.len() < 2 {
            reports.push(d.next_run().await);
        }
        d.stop().await;
        let ok = RunStatus::Success;
        let missed = "2026-05-30T00:00:00+00:00";
        assert_eq!(
            fired(&reports),
            [
                ("PA".into(), missed.into(), ok),
                ("WV".into(), missed.into(), ok),
            ],
            "{:?}",
            reports.iter().map(|r| &r.error).collect::<Vec<_>>()
        );
        assert!(reports.iter().all(|r| r.batch_id.is_some()));
    });
}
