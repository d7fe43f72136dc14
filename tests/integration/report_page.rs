//! The report page, opened in a real headless Chromium (Debian's, driven
//! by playwright-core through tests/browser/check_page.cjs): no console
//! error, no request beyond the page, the figures shown equal the run's
//! report, the charts carry the runs of `history`, readable without
//! JavaScript; published beside the manifest only by a run that publishes;
//! rendered again from the workbench by `report`.

use std::path::{Path, PathBuf};

use outreach_workbench::config::{Rule, Severity};
use outreach_workbench::names::Entity;
use outreach_workbench::pipeline::all_states::run_all_states;
use outreach_workbench::pipeline::{RunOptions, RunReport, RunStatus};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// `node check_page.cjs PAGE …` when the machine has what it needs
/// (Chromium, Node.js, playwright-core at $OW_PLAYWRIGHT); else `None`,
/// having said why.
fn browser(test: &str) -> Option<PathBuf> {
    let playwright = std::env::var_os("OW_PLAYWRIGHT").map(PathBuf::from);
    let missing = match &playwright {
        _ if !have("chromium") => "chromium (Debian's package)",
        _ if !have("node") => "node",
        Some(p) if p.join("package.json").exists() => return playwright,
        _ => "playwright-core at $OW_PLAYWRIGHT (scripts/test.sh installs it)",
    };
    eprintln!("SKIP {test}: needs {missing}");
    None
}

/// What a person sees on `page` (see tests/browser/check_page.cjs).
fn open(playwright: &Path, page: &Path, screenshot: Option<&Path>, sort: Option<u32>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/check_page.cjs");
    let mut cmd = std::process::Command::new("node");
    cmd.arg(script).arg(page).env("OW_PLAYWRIGHT", playwright);
    cmd.arg(screenshot.unwrap_or(Path::new("")));
    if let Some(column) = sort {
        cmd.arg(column.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "check_page.cjs: {}", text(&out));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The page stands alone: nothing fetched, nothing failed.
    for list in ["console_errors", "page_errors", "requests"] {
        assert_eq!(
            seen[list],
            serde_json::json!([]),
            "{list} on {}",
            page.display()
        );
    }
    seen
}

/// The figures the page must show for `r`: rows and each rule's count.
fn expected_metrics(r: &RunReport) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for e in Entity::ALL {
        let Some(c) = r.counts(e) else { continue };
        m.insert(format!("{e}.pulled"), c.raw.into());
        m.insert(format!("{e}.good"), c.good.into());
        m.insert(format!("{e}.bad"), c.bad.into());
        m.insert(format!("{e}.null_keys"), c.null_keys.into());
        for (code, n) in c.errors.iter().chain(&c.warnings) {
            m.insert(format!("{e}.rule.{code}"), (*n).into());
        }
    }
    for c in &r.changes {
        let e = c.entity;
        m.insert(format!("changes.{e}.added"), c.added.into());
        m.insert(format!("changes.{e}.changed"), c.changed.into());
        m.insert(format!("changes.{e}.removed"), c.removed.into());
    }
    m
}

/// One chart series as (run id, value) pairs.
fn series(seen: &Value, chart: &str, name: &str) -> Vec<(String, u64)> {
    seen["charts"][chart][name]
        .as_array()
        .unwrap_or_else(|| panic!("no series {name} in chart {chart}: {}", seen["charts"]))
        .iter()
        .map(|p| {
            (
                p["run"].as_str().unwrap().to_string(),
                p["value"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The first column (the key) of a sample table.
fn sample_keys(seen: &Value, table: &str) -> Vec<String> {
    seen["samples"][table]
        .as_array()
        .unwrap_or_else(|| panic!("no sample table {table}: {}", seen["samples"]))
        .iter()
        .map(|row| row[0].as_str().unwrap().to_string())
        .collect()
}

fn warn_rule(code: &str, condition: &str) -> Rule {
    Rule {
        code: code.into(),
        condition: condition.into(),
        description: None,
        fix: None,
        severity: Severity::Warn,
    }
}

fn a_state_with_failures(name: &str) -> World {
    let mut w = World::new(name);
    w.config
        .rules
        .companies
        .push(warn_rule("name_short", "length(company_name) < 3"));
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV"); // good, warned
    add_company(&mut pg, "c2", Some("Bcde"), Some("b.example"), "WV"); // good
    add_company(&mut pg, "c3", None, Some("c.example"), "WV"); // bad
    add_company(&mut pg, "c4", Some("AB"), None, "WV"); // bad, warned
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("CEO"));
    add_person(&mut pg, "p2", "c2", Some("not-an-email"), Some("CTO"));
    w
}

#[test]
fn a_run_page_shows_its_report_in_a_browser() {
    needs_services!();
    let Some(playwright) = browser("a_run_page_shows_its_report_in_a_browser") else {
        return;
    };
    let w = a_state_with_failures("page");
    let first = w.run("WV");
    assert!(first.succeeded(), "{}", first.summary());
    // Warned, with markup in the value the sample shows.
    add_company(&mut w.pg(), "c5", Some("<>"), Some("e.example"), "WV");
    let r = w.run("WV");
    assert!(r.succeeded(), "{}", r.summary());

    let page = PathBuf::from(r.page.as_deref().expect("the run wrote its page"));
    assert!(r
        .summary()
        .contains(&format!("report page {}", page.display())));
    let html = std::fs::read(&page).unwrap();
    let latest = page.with_file_name("latest.html");
    assert_eq!(std::fs::read(&latest).unwrap(), html, "latest.html");
    // Published after the manifest: the same page without the failing
    // rows (personal data); a run that finds nothing changed sends
    // nothing, its page included.
    let public = get(&w.bucket, "outreach/wv/_report.html");
    assert_ne!(public, html);
    let unchanged = w.run("WV");
    assert!(unchanged.succeeded() && unchanged.uploaded == 0);
    assert!(unchanged.page.is_some());
    assert_eq!(get(&w.bucket, "outreach/wv/_report.html"), public);
    let public_page = w.dir.path().join("bucket.html");
    std::fs::write(&public_page, &public).unwrap();
    let seen_public = open(&playwright, &public_page, None, None);

    let shot = w.dir.path().join("page.png");
    let seen = open(&playwright, &page, Some(&shot), None);
    assert!(
        std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"),
        "a screenshot"
    );
    assert_eq!(seen["status"], "success");
    let shown = seen["metrics"].as_object().unwrap();
    for (k, v) in expected_metrics(&r) {
        assert_eq!(shown.get(&k), Some(&v), "{k} on the page: {shown:?}");
    }
    // Each rule in words, against the last run, worse ones first, with a
    // query for all its rows.
    let text = seen["text"].as_str().unwrap();
    assert!(text.contains("The company has no name."), "{text}");
    assert!(
        text.contains("Fix: Fill company_name at the source."),
        "{text}"
    );
    assert_eq!(shown.get("companies.rule.name_short.last"), Some(&2.into()));
    assert_eq!(
        shown.get("companies.rule.name_short.difference"),
        Some(&1.into())
    );
    assert_eq!(
        shown.get("companies.rule.company_name_missing.difference"),
        Some(&0.into())
    );
    assert!(text.contains("Worse than the last run:"), "{text}");
    assert!(
        text.contains("name_short (companies): 2 → 3 rows (+1)"),
        "{text}"
    );
    assert!(
        text.contains("All its rows: SELECT * FROM read_parquet('s3://"),
        "{text}"
    );
    assert!(
        text.contains("WHERE list_contains(validation_errors, 'company_name_missing')"),
        "{text}"
    );
    // The change set: c5 added, shown by count and by key.
    assert_eq!(r.changes.len(), 1, "{}", r.summary());
    assert_eq!(shown.get("changes.companies.added"), Some(&1.into()));
    let text = seen["text"].as_str().unwrap();
    assert!(text.contains("Changes since the last publish"), "{text}");
    assert!(text.contains("companies\tadded\t1\tc5"), "{text}");
    // The charts: both runs, oldest first, with their own figures.
    let c = |r: &RunReport| r.companies.clone().unwrap();
    assert_eq!(
        series(&seen, "companies-rows", "good"),
        [
            (first.run_id.clone(), c(&first).good),
            (r.run_id.clone(), c(&r).good)
        ]
    );
    assert_eq!(
        series(&seen, "companies-rules", "name_short"),
        [(first.run_id.clone(), 2), (r.run_id.clone(), 3)]
    );
    // The failing rows, by key, with the columns the rule reads; the
    // markup of a value is shown as text.
    assert_eq!(sample_keys(&seen, "companies.company_name_missing"), ["c3"]);
    assert_eq!(
        sample_keys(&seen, "companies.name_short"),
        ["c1", "c4", "c5"]
    );
    assert_eq!(
        seen["samples"]["companies.name_short"][2],
        serde_json::json!(["c5", "<>"])
    );
    assert_eq!(sample_keys(&seen, "people.email_invalid"), ["p2"]);
    // The same page without JavaScript.
    assert_eq!(seen["without_js"]["metrics"], seen["metrics"]);
    assert_eq!(seen["without_js"]["samples"], seen["samples"]);

    // The bucket's page: every figure, no row, and where the rows are.
    assert_eq!(seen_public["metrics"], seen["metrics"]);
    assert_eq!(
        seen_public["samples"],
        serde_json::json!({}),
        "{seen_public:#}"
    );
    let text = seen_public["text"].as_str().unwrap();
    assert!(text.contains("publish_samples = false"), "{text}");
    assert!(!text.contains("not-an-email"), "{text}");

    // publish_samples = true: the bucket gets the host's page.
    let mut w = w;
    w.config.report.publish_samples = true;
    add_company(&mut w.pg(), "c6", Some("Six"), Some("f.example"), "WV");
    let r = w.run("WV");
    let html = std::fs::read(r.page.as_deref().unwrap()).unwrap();
    assert_eq!(get(&w.bucket, "outreach/wv/_report.html"), html);
}

#[test]
fn a_gated_run_keeps_its_page_local_and_says_where() {
    needs_services!();
    let Some(playwright) = browser("a_gated_run_keeps_its_page_local_and_says_where") else {
        return;
    };
    let w = a_state_with_failures("pagegated");
    let mut opts = RunOptions::default();
    opts.gates.max_bad_ratio = Some(0.1);
    let r = w.run_with("WV", &opts);
    assert_eq!(r.status, RunStatus::Gated, "{}", r.summary());
    let page = PathBuf::from(r.page.as_deref().expect("a gated run writes its page"));
    assert!(r.summary().contains(&page.display().to_string()));
    assert!(
        !list_keys(&w.bucket)
            .iter()
            .any(|k| k.ends_with("_report.html")),
        "a gated run publishes no page: {:?}",
        list_keys(&w.bucket)
    );
    let seen = open(&playwright, &page, None, None);
    assert_eq!(seen["status"], "gated");
    let text = seen["text"].as_str().unwrap();
    assert!(text.contains("max_bad_ratio.companies"), "{text}");
    assert!(text.contains("tripped"), "{text}");
}

#[test]
fn report_renders_any_run_from_the_workbench_alone() {
    needs_services!();
    let w = a_state_with_failures("pagecmd");
    let first = w.run("WV");
    add_company(&mut w.pg(), "c5", Some("Five"), Some("e.example"), "WV");
    let second = w.run("WV");
    assert!(
        first.succeeded() && second.succeeded(),
        "{}",
        second.summary()
    );
    // No database: the config points PostgreSQL at a closed port.
    let config = w.write_config_file_with("");
    let toml = std::fs::read_to_string(&config).unwrap();
    let port = format!("port = {}", services().source_port);
    std::fs::write(
        &config,
        toml.replace(&port, &format!("port = {}", free_port())),
    )
    .unwrap();
    let render = |run: Option<&str>| {
        let out_file = w.dir.path().join("rendered.html");
        let mut cmd = bin();
        cmd.args(["report", "--state", "WV", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out_file);
        if let Some(id) = run {
            cmd.args(["--run", id]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        std::fs::read_to_string(out_file).unwrap()
    };
    for (page, r) in [
        (render(Some(&first.run_id)), &first),
        (render(None), &second),
    ] {
        assert!(page.contains(&format!("data-metric=\"run_id\">{}<", r.run_id)));
        let good = r.companies.as_ref().unwrap().good;
        assert!(
            page.contains(&format!(
                "data-metric=\"companies.good\" data-value=\"{good}\""
            )),
            "{page}"
        );
        // The samples the run kept.
        assert!(
            page.contains("table data-sample=\"companies.name_short\""),
            "{page}"
        );
    }
    let out = bin()
        .args(["report", "--state", "WV", "--run", "nope", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("no run nope of WV"), "{}", text(&out));
}

#[test]
fn sample_rows_zero_keeps_no_row() {
    needs_services!();
    let mut w = a_state_with_failures("pagenosamples");
    w.config.report.sample_rows = 0;
    let r = w.run("WV");
    assert!(r.succeeded(), "{}", r.summary());
    let html = std::fs::read_to_string(r.page.as_deref().unwrap()).unwrap();
    assert!(html.contains("Samples are off"), "{html}");
    assert!(!html.contains("data-sample"), "{html}");
    assert!(!html.contains("c3</td>"), "no key of a failing row: {html}");
    w.config.report.enabled = false;
    let r = w.run("WV");
    assert!(r.page.is_none() && r.succeeded(), "{}", r.summary());
}

#[test]
fn the_all_states_overview_links_every_state_and_sorts() {
    needs_services!();
    let Some(playwright) = browser("the_all_states_overview_links_every_state_and_sorts") else {
        return;
    };
    let w = World::new("overview");
    let mut pg = w.pg();
    for (i, state) in ["OH", "WV", "VA"].iter().enumerate() {
        for n in 0..=i * 2 {
            add_company(
                &mut pg,
                &format!("{state}{n}"),
                Some("Name"),
                Some("x.example"),
                state,
            );
        }
    }
    add_company(&mut pg, "nowhere", Some("Name"), Some("x.example"), "zz");
    let opts = RunOptions {
        dry_run: true,
        ..Default::default()
    };
    let b = run_all_states(&w.config, &CancellationToken::new(), &opts, &mut |_, _| {});
    assert!(b.succeeded(), "{}", b.summary());
    let page = PathBuf::from(b.page.as_deref().expect("an overview page"));
    assert!(b.summary().contains("overview page"), "{}", b.summary());
    // Column 3 is the companies pulled: a click sorts by it, most first.
    let seen = open(&playwright, &page, None, Some(3));
    assert_eq!(seen["states"], serde_json::json!(["OH", "VA", "WV"]));
    assert_eq!(seen["sorted_states"], serde_json::json!(["VA", "WV", "OH"]));
    assert_eq!(seen["without_js"]["states"], seen["states"]);
    for r in &b.runs {
        let key = format!("{}.companies.pulled", r.state);
        assert_eq!(
            seen["metrics"][&key],
            r.companies.as_ref().unwrap().raw,
            "{key}"
        );
    }
    assert!(seen["text"].as_str().unwrap().contains("\"zz\""));
    // Each state's link opens that state's page.
    for link in seen["links"].as_array().unwrap() {
        let path = link.as_str().unwrap().trim_start_matches("file://");
        assert!(Path::new(path).exists(), "{path}");
    }
    assert_eq!(seen["links"].as_array().unwrap().len(), 3);
}

/// A run that failed before it compared anything says so, and draws no
/// empty chart, instead of claiming nothing changed.
#[test]
fn a_failed_runs_page_says_what_was_not_compared() {
    needs_services!();
    let mut w = a_state_with_failures("pagefailed");
    w.config.storage.bucket = "no-such-bucket".into();
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed, "{}", r.summary());
    let page =
        std::fs::read_to_string(r.page.as_deref().expect("a failed run writes its page")).unwrap();
    assert!(
        page.contains("Not compared: the run ended before it read the bucket"),
        "{page}"
    );
    assert!(!page.contains("No column added"), "{page}");
    assert!(page.contains("nothing to chart"), "{page}");
    assert!(!page.contains("<figure"), "{page}");
    assert!(
        page.contains("Not compared: only a run that publishes"),
        "{page}"
    );
}
