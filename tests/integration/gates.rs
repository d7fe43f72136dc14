//! Quality gates, configurable rules and `history`, against the real
//! servers: a tripped gate publishes nothing and is audited as `gated`.

use crate::common::*;
use outreach_workbench::pipeline::{RunOptions, RunStatus};
use outreach_workbench::quality::gates::GatesConfig;

fn gates(g: GatesConfig) -> RunOptions {
    RunOptions {
        gates: g,
        ..Default::default()
    }
}

fn bad_ratio(limit: f64) -> GatesConfig {
    GatesConfig {
        max_bad_ratio: Some(limit),
        ..Default::default()
    }
}

/// A good WV company with one good person.
fn good_pair(pg: &mut postgres::Client, company: &str, person: &str) {
    add_company(pg, company, Some("Co"), Some("co.example"), "WV");
    add_person(pg, person, company, Some("a@co.example"), Some("CEO"));
}

const COMPANIES_BAD_KEY: &str = "outreach/wv/companies/bad/companies_bad.parquet";

#[test]
fn bad_ratio_gate_trips_keeps_the_bucket_and_can_be_forced() {
    needs_services!();
    let w = World::new("gate-ratio");
    let mut pg = w.pg();
    for i in 1..=4 {
        good_pair(&mut pg, &format!("c{i}"), &format!("p{i}"));
    }
    let first = w.run("WV");
    assert!(first.succeeded(), "{}", first.summary());
    assert!(first.gates.is_empty(), "no gate unless configured");
    let published_sha = head(&w.bucket, COMPANIES_BAD_KEY).unwrap()["sha256"].clone();

    // Two nameless companies: 2 of 6 companies bad (33 %).
    add_company(&mut pg, "c5", None, Some("co.example"), "WV");
    add_company(&mut pg, "c6", None, Some("co.example"), "WV");
    let gated = w.run_with("WV", &gates(bad_ratio(0.15)));
    assert_eq!(gated.status, RunStatus::Gated, "{}", gated.summary());
    assert!(!gated.succeeded());
    let err = gated.error.clone().unwrap();
    assert!(
        err.contains("max_bad_ratio.companies: 0.3333 > 0.15 (2 of 6 rows bad)"),
        "{err}"
    );
    assert!(gated.summary().contains("TRIPPED"), "{}", gated.summary());
    // Nothing published: the bucket keeps the last good files...
    assert!(gated.objects.is_empty());
    assert_eq!(
        head(&w.bucket, COMPANIES_BAD_KEY).unwrap()["sha256"],
        published_sha
    );
    // ... while the local export has the new data for whoever looks.
    assert_eq!(count_rows(&w.export_path("wv", "companies", "bad")), 2);
    // People passed their gate; both verdicts are recorded.
    let people_gate = gated
        .gates
        .iter()
        .find(|g| g.gate == "max_bad_ratio.people")
        .unwrap();
    assert!(!people_gate.tripped);
    let d = audit_details(&w, gated.audit_id.expect("a gated run is audited"));
    assert_eq!(d["status"], "gated");
    assert_eq!(d["forced"], false);
    assert!(d["error"]
        .as_str()
        .unwrap()
        .contains("quality gate tripped"));
    let g = d["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gate"] == "max_bad_ratio.companies")
        .unwrap();
    assert_eq!(
        (g["tripped"].as_bool(), g["limit"].as_f64()),
        (Some(true), Some(0.15))
    );

    // --force publishes anyway, and the audit says so.
    let forced = w.run_with(
        "WV",
        &RunOptions {
            force: true,
            ..gates(bad_ratio(0.15))
        },
    );
    assert_eq!(forced.status, RunStatus::Success, "{}", forced.summary());
    assert!(forced.summary().contains("published anyway (--force)"));
    assert_eq!(
        (forced.uploaded, forced.skipped),
        (1, 3),
        "only companies_bad changed: {}",
        forced.summary()
    );
    assert_ne!(
        head(&w.bucket, COMPANIES_BAD_KEY).unwrap()["sha256"],
        published_sha
    );
    let d = audit_details(&w, forced.audit_id.unwrap());
    assert_eq!(
        (d["status"].as_str(), d["forced"].as_bool()),
        (Some("success"), Some(true))
    );

    // A limit above the ratio passes.
    let ok = w.run_with("WV", &gates(bad_ratio(0.5)));
    assert_eq!(ok.status, RunStatus::Success, "{}", ok.summary());
    assert!(ok.gates.iter().all(|g| !g.tripped) && ok.gates.len() == 2);
}

#[test]
fn row_delta_gate_first_run_then_shrink() {
    needs_services!();
    let w = World::new("gate-delta");
    let mut pg = w.pg();
    for i in 0..10 {
        good_pair(&mut pg, &format!("c{i}"), &format!("p{i}"));
    }
    let delta = gates(GatesConfig {
        max_row_delta: Some(0.30),
        ..Default::default()
    });
    // The first run of a state has nothing to compare with and passes.
    let first = w.run_with("WV", &delta);
    assert_eq!(first.status, RunStatus::Success, "{}", first.summary());
    assert!(first.gates[0].detail.contains("no previous successful run"));

    // The reference is the audit record: it survives a deleted workbench.
    std::fs::remove_dir_all(w.dir.path().join("duck")).unwrap();
    // A dry run does not become the reference.
    pg.batch_execute(
        "DELETE FROM marketing.people_master WHERE company_unique_id IN ('c0','c1','c2','c3','c4');
         DELETE FROM marketing.company_master WHERE company_unique_id IN ('c0','c1','c2','c3','c4');",
    )
    .unwrap();
    let dry = w.run_with(
        "WV",
        &RunOptions {
            dry_run: true,
            ..delta.clone()
        },
    );
    assert_eq!(
        dry.status,
        RunStatus::Gated,
        "a dry run shows the verdict too"
    );

    // Half the rows gone: 10 against 20.
    let shrunk = w.run_with("WV", &delta);
    assert_eq!(shrunk.status, RunStatus::Gated, "{}", shrunk.summary());
    let g = &shrunk.gates[0];
    assert_eq!((g.value, g.tripped), (0.5, true));
    assert!(
        g.detail.contains(&format!(
            "10 rows against 20 in previous successful run {}",
            first.run_id
        )),
        "{}",
        g.detail
    );
    // The gated run is not the reference either: 16 rows are 20 % off the
    // last success (20) but 60 % off the gated run (10).
    for i in 0..3 {
        good_pair(&mut pg, &format!("n{i}"), &format!("q{i}"));
    }
    let back = w.run_with("WV", &delta);
    assert_eq!(
        back.status,
        RunStatus::Success,
        "16 against 20: {}",
        back.summary()
    );
}

#[test]
fn null_id_gate() {
    needs_services!();
    let mut w = World::new("gate-null");
    let mut pg = w.pg();
    // The production tables cannot hold a NULL key; a copy without the
    // constraint (as a view or a careless ETL table would be) can.
    pg.batch_execute(
        "CREATE SCHEMA fx;
         CREATE TABLE fx.companies AS SELECT * FROM marketing.company_master WITH NO DATA;
         INSERT INTO fx.companies (company_unique_id, company_name, website_url, address_state)
         VALUES ('c1', 'A', 'a.example', 'WV'), (NULL, 'B', 'b.example', 'WV');",
    )
    .unwrap();
    w.config.source.companies_table = "fx.companies".parse().unwrap();
    let on = gates(GatesConfig {
        no_null_ids: Some(true),
        ..Default::default()
    });
    let r = w.run_with("WV", &on);
    assert_eq!(r.status, RunStatus::Gated, "{}", r.summary());
    assert!(r
        .error
        .unwrap()
        .contains("no_null_ids: 1 > 0 (1 companies and 0 people without a primary key)"));
    assert_eq!(r.companies.unwrap().null_keys, 1);

    pg.batch_execute("DELETE FROM fx.companies WHERE company_unique_id IS NULL")
        .unwrap();
    let r = w.run_with("WV", &on);
    assert_eq!(r.status, RunStatus::Success, "{}", r.summary());
    assert!(!r.gates[0].tripped);
}

#[test]
fn custom_rule_replaces_the_defaults() {
    needs_services!();
    let mut w = World::new("rule-custom");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", None, Some("nodot"), "WV");
    pg.execute(
        "UPDATE marketing.company_master SET employee_count = 12 WHERE company_unique_id = 'c1'",
        &[],
    )
    .unwrap();
    w.set_config_extra(
        r#"
[[rules.companies]]
code = "name_missing"
condition = "company_name IS NULL"

[[rules.companies]]
code = "too_small"
condition = "coalesce(employee_count, 0) < 10"
"#,
    );
    let r = w.run_with(
        "WV",
        &RunOptions {
            dry_run: true,
            ..Default::default()
        },
    );
    assert_eq!(r.status, RunStatus::Success, "{}", r.summary());
    let c = r.companies.unwrap();
    assert_eq!((c.good, c.bad), (1, 1));
    assert_eq!(c.errors["name_missing"], 1);
    assert_eq!(c.errors["too_small"], 1);
    assert!(
        !c.errors.contains_key("website_url_invalid"),
        "defaults replaced"
    );
    // People kept the production rules.
    assert!(r.people.unwrap().errors.contains_key("email_invalid"));
    assert_eq!(
        parquet_rows(
            &w.export_path("wv", "companies", "bad"),
            "company_unique_id, validation_errors"
        ),
        vec!["c2|[name_missing, too_small]"]
    );
}

#[test]
fn broken_rules_are_named_by_run_and_check() {
    needs_services!();
    let w = World::new("rule-broken");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let run = |args: &[&str], cfg: &std::path::Path| {
        let o = bin_with_secrets()
            .args(args)
            .arg("--config")
            .arg(cfg)
            .output()
            .unwrap();
        (o.status.code(), text(&o))
    };

    // An unknown column: parses, so only the database can tell.
    let cfg = w.write_config_file_with(
        r#"
[rules]
people = [
  { code = "title_missing", condition = "title IS NULL" },
  { code = "no_mobile", condition = "mobile_phone IS NULL" },
]
"#,
    );
    let (code, out) = run(&["check"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("rules.people[1] (code `no_mobile`): unknown column \"mobile_phone\""),
        "{out}"
    );
    let (code, out) = run(&["run", "--state", "WV"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("rules.people[1] (code `no_mobile`)"), "{out}");
    assert!(!out.contains(" pulled "), "refused before pulling: {out}");

    // Bad SQL: refused when the config loads, by every command.
    let cfg = w.write_config_file_with(
        r#"
[rules]
companies = [{ code = "odd", condition = "company_name IS NOT NULL AND AND" }]
"#,
    );
    let (code, out) = run(&["check", "--offline"], &cfg);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("rules.companies[0] (code `odd`)"), "{out}");
    assert!(out.contains("syntax error"), "{out}");
}

#[test]
fn cli_exit_code_schedule_gates_and_history() {
    needs_services!();
    let w = World::new("gate-cli");
    let mut pg = w.pg();
    for st in ["WV", "OH"] {
        add_company(&mut pg, &format!("{st}1"), Some("A"), Some("a.example"), st);
        add_company(&mut pg, &format!("{st}2"), None, Some("a.example"), st);
    }
    // Strict by default; OH's schedule relaxes it.
    let cfg = w.write_config_file_with(
        r#"
[gates]
max_bad_ratio = 0.15

[[schedule]]
states = ["OH"]
cadence = "daily"
[schedule.gates]
max_bad_ratio = 0.9
"#,
    );
    let run = |args: &[&str]| {
        bin_with_secrets()
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let o = run(&["run", "--state", "WV"]);
    let out = text(&o);
    assert_eq!(
        o.status.code(),
        Some(3),
        "gated has its own exit code: {out}"
    );
    assert!(out.contains("state WV: gated"), "{out}");
    assert!(out.contains("nothing published"), "{out}");
    let o = run(&["run", "--state", "OH"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the schedule's gates apply: {}",
        text(&o)
    );
    let o = run(&["run", "--state", "WV", "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let o = run(&["history"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("STARTED (UTC)"), "{out}");
    // Newest first: the forced WV run, OH, the gated WV run (with its reason).
    assert!(
        lines[1].contains("WV") && lines[1].contains("success"),
        "{out}"
    );
    assert!(
        lines[1].contains("forced past max_bad_ratio.companies"),
        "{out}"
    );
    assert!(
        lines[2].contains("OH") && lines[2].contains("success") && lines[2].contains("ok"),
        "{out}"
    );
    assert!(
        lines[3].contains("WV") && lines[3].contains("gated") && lines[3].contains("1/1"),
        "{out}"
    );
    // The gated run's reason, with its figures, in the GATES column.
    assert!(
        lines[3].contains("max_bad_ratio.companies: 0.5 > 0.15 (1 of 2 rows bad)"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");

    let o = run(&["history", "--state", "WV", "--limit", "1", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = j.as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!(r["state"], "WV");
    assert_eq!(r["status"], "success");
    assert_eq!(r["forced"], true);
    assert_eq!(r["uploaded"], 4);
    assert_eq!(r["companies"]["bad"], 1);
    assert_eq!(r["gates"][0]["gate"], "max_bad_ratio.companies");
    assert_eq!(r["gates"][0]["tripped"], true);
    assert!(r["duration_secs"].as_f64().unwrap() > 0.0);
}

#[test]
fn history_without_a_workbench() {
    needs_services!();
    let w = World::new("history-empty");
    let cfg = w.write_config_file();
    let o = bin()
        .args(["history", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no runs recorded"));
}

#[test]
fn a_run_that_lost_its_lease_before_the_audit_records_no_gate() {
    needs_services!();
    // A gated run uploads nothing, so the fence before its audit is the one
    // that finds the lease gone: another host took the state meanwhile.
    let mut w = World::new("gatelease");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", None, Some("b.example"), "WV");
    add_slow_view(&w, 0.5);
    w.config.source.companies_table =
        outreach_workbench::config::QualifiedName::new("marketing", "slow_companies");
    let run = {
        let config = w.config.clone();
        std::thread::spawn(move || {
            outreach_workbench::pipeline::run(
                &config,
                &outreach_workbench::state::StateCode::parse("WV").unwrap(),
                &tokio_util::sync::CancellationToken::new(),
                &gates(bad_ratio(0.1)),
            )
        })
    };
    // Once the run holds the lease, it passes to another host's run.
    wait_until(
        "the run's lease",
        std::time::Duration::from_secs(30),
        String::new,
        || {
            let taken = pg
                .execute(
                    "UPDATE shq.outreach_leases SET run_id = 'other-host-run', host = 'other'
                 WHERE state = 'WV'",
                    &[],
                )
                .unwrap_or(0);
            (taken == 1).then_some(())
        },
    );
    let r = run.join().unwrap();
    assert_eq!(r.status, RunStatus::Failed, "{:?}", r.error);
    let error = r.error.clone().unwrap();
    assert!(
        error.contains("no longer holds the lease of state WV")
            && error.contains("writing the audit"),
        "{error}"
    );
    let d = audit_details(&w, r.audit_id.expect("audited"));
    assert_eq!(d["status"], "failed");
    assert_eq!(
        leases(&w),
        [("WV".to_string(), "other-host-run".to_string())],
        "the other host's lease is left alone"
    );
}
