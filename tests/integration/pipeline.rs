//! End-to-end runs of the pipeline against real PostgreSQL and S3 servers.

use std::process::Command;

use crate::common::*;
use outreach_workbench::pipeline::{RunOptions, RunStatus};

fn dry() -> RunOptions {
    RunOptions {
        dry_run: true,
        ..Default::default()
    }
}

#[test]
fn every_rule_and_error_code() {
    needs_services!();
    let w = World::new("rules");
    let mut pg = w.pg();
    add_company(
        &mut pg,
        "c1",
        Some("Good Co"),
        Some("https://good.example"),
        "WV",
    );
    add_company(&mut pg, "c2", None, Some("https://noname.example"), "WV");
    add_company(&mut pg, "c3", Some("No URL"), None, "WV");
    add_company(&mut pg, "c4", Some("Bad URL"), Some("nodot"), "WV");
    add_company(&mut pg, "c5", None, Some("nodot"), "WV");
    add_company(&mut pg, "c6", None, None, "WV");
    // people, all at the good company c1
    let people = [
        ("p01", Some("ana@example.com"), Some("CEO")),  // good
        ("p02", None, Some("CEO")),                     // email null
        ("p03", Some("ana.example.com"), Some("CEO")),  // no @
        ("p04", Some("ana@localhost"), Some("CEO")),    // no dot after @
        ("p05", Some("@example.com"), Some("CEO")),     // nothing before @
        ("p06", Some("ana@@example.com"), Some("CEO")), // second @
        ("p07", Some("a@b.c trailing @ junk"), Some("CEO")), // partial match: good
        ("p08", Some("ana@example.com"), None),         // title missing
        ("p09", None, None),                            // both
        ("p10", Some(r"ana@example\com"), Some("CEO")), // backslash is not a dot
    ];
    for (id, email, title) in people {
        add_person(&mut pg, id, "c1", email, title);
    }

    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let c = r.companies.as_ref().unwrap();
    assert_eq!((c.raw, c.good, c.bad), (6, 1, 5));
    assert_eq!(c.errors["company_name_missing"], 3);
    assert_eq!(c.errors["website_url_missing"], 2);
    assert_eq!(c.errors["website_url_invalid"], 2);
    let p = r.people.as_ref().unwrap();
    assert_eq!((p.raw, p.good, p.bad), (10, 2, 8));
    assert_eq!(p.errors["email_invalid"], 7);
    assert_eq!(p.errors["title_missing"], 2);

    let bad = parquet_rows(
        &w.export_path("wv", "companies", "bad"),
        "company_unique_id, validation_errors",
    );
    assert_eq!(
        bad,
        vec![
            "c2|[company_name_missing]",
            "c3|[website_url_missing]",
            "c4|[website_url_invalid]",
            "c5|[company_name_missing, website_url_invalid]",
            "c6|[company_name_missing, website_url_missing]",
        ]
    );
    let good = parquet_rows(&w.export_path("wv", "people", "good"), "unique_id");
    assert_eq!(good, vec!["p01", "p07"]);
    let bad = parquet_rows(
        &w.export_path("wv", "people", "bad"),
        "unique_id, validation_errors",
    );
    assert_eq!(
        bad,
        vec![
            "p02|[email_invalid]",
            "p03|[email_invalid]",
            "p04|[email_invalid]",
            "p05|[email_invalid]",
            "p06|[email_invalid]",
            "p08|[title_missing]",
            "p09|[email_invalid, title_missing]",
            "p10|[email_invalid]",
        ]
    );
    // Good files have no validation_errors column; bad files add exactly one.
    let good_cols = parquet_types(&w.export_path("wv", "companies", "good"));
    let bad_cols = parquet_types(&w.export_path("wv", "companies", "bad"));
    assert_eq!(bad_cols.len(), good_cols.len() + 1);
    assert_eq!(
        bad_cols.last().unwrap(),
        &("validation_errors".to_string(), "VARCHAR[]".to_string())
    );
}

#[test]
fn people_follow_their_company_and_the_link_rule() {
    needs_services!();
    let w = World::new("link");
    let mut pg = w.pg();
    add_company(&mut pg, "wv-good", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "wv-bad", None, Some("b.example"), "WV");
    add_company(&mut pg, "pa-good", Some("C"), Some("c.example"), "PA");
    add_person(&mut pg, "p1", "wv-good", Some("x@a.example"), Some("CEO"));
    add_person(&mut pg, "p2", "wv-bad", Some("y@b.example"), Some("CEO"));
    add_person(&mut pg, "p3", "pa-good", Some("z@c.example"), Some("CEO"));

    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert_eq!(
        r.people.as_ref().unwrap().raw,
        2,
        "PA's person must not be pulled"
    );
    assert_eq!(
        parquet_rows(&w.export_path("wv", "people", "good"), "unique_id"),
        vec!["p1", "p2"]
    );

    let r = w.run_with(
        "WV",
        &RunOptions {
            dry_run: true,
            link_rule: true,
            ..Default::default()
        },
    );
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert_eq!(
        parquet_rows(
            &w.export_path("wv", "people", "bad"),
            "unique_id, validation_errors"
        ),
        vec!["p2|[company_not_valid]"]
    );

    // PA in the same workbench does not touch WV's tables.
    let r = w.run_with("PA", &dry());
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let duck = catalog(&w);
    let n: i64 = duck
        .query_row("SELECT count(*) FROM wv.people_raw", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    let n: i64 = duck
        .query_row("SELECT count(*) FROM pa.people_raw", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_state_with_no_rows_gives_four_empty_valid_files() {
    needs_services!();
    let w = World::new("empty");
    let mut pg = w.pg();
    add_company(&mut pg, "pa1", Some("A"), Some("a.example"), "PA");
    let r = w.run("WV");
    assert!(r.succeeded(), "{}", r.summary());
    assert_eq!(r.files.len(), 4);
    assert_eq!(r.uploaded, 4);
    for (entity, kind) in [
        ("companies", "good"),
        ("companies", "bad"),
        ("people", "good"),
        ("people", "bad"),
    ] {
        let path = w.export_path("wv", entity, kind);
        assert_eq!(count_rows(&path), 0, "{}", path.display());
        let cols = parquet_types(&path);
        assert!(
            cols.len() > 20,
            "{entity}_{kind} kept its columns: {cols:?}"
        );
    }
}

#[test]
fn dedup_skips_unchanged_files_even_without_the_workbench() {
    needs_services!();
    let w = World::new("dedup");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", None, Some("b.example"), "WV");
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("CEO"));
    add_person(&mut pg, "p2", "c1", Some("bad"), Some("CEO"));

    let r1 = w.run("WV");
    assert!(r1.succeeded(), "{}", r1.summary());
    assert_eq!((r1.uploaded, r1.skipped), (4, 0));
    let key = "outreach/wv/companies/good/companies_good.parquet";
    let meta = head(&w.bucket, key).expect("object exists");
    assert_eq!(meta["sha256"], r1.files[0].sha256);
    assert_eq!(meta["table_name"], "companies_good");
    assert_eq!(meta["state"], "WV");
    assert_eq!(meta["pipeline"], "outreach-workbench");
    assert!(meta.contains_key("upload_timestamp"));
    assert_eq!(
        get(&w.bucket, key),
        std::fs::read(w.export_path("wv", "companies", "good")).unwrap()
    );

    let r2 = w.run("WV");
    assert!(r2.succeeded(), "{}", r2.summary());
    assert_eq!((r2.uploaded, r2.skipped), (0, 4), "same data, same bytes");

    // One good person changes: only people_good is uploaded again.
    pg.execute(
        "UPDATE marketing.people_master SET title = 'CFO' WHERE unique_id = 'p1'",
        &[],
    )
    .unwrap();
    let r3 = w.run("WV");
    assert!(r3.succeeded(), "{}", r3.summary());
    let uploaded: Vec<&str> = r3
        .objects
        .iter()
        .filter(|o| o.action == outreach_workbench::names::PublishAction::Uploaded)
        .map(|o| o.table_name.as_str())
        .collect();
    assert_eq!(uploaded, vec!["people_good"]);

    // Without the workbench the bucket's metadata still decides.
    std::fs::remove_dir_all(w.dir.path().join("duck")).unwrap();
    std::fs::remove_dir_all(w.dir.path().join("exports")).unwrap();
    let r4 = w.run("WV");
    assert!(r4.succeeded(), "{}", r4.summary());
    assert_eq!((r4.uploaded, r4.skipped), (0, 4));
}

/// Found by the gate tests: DuckDB's writer made a column REQUIRED when the
/// raw table happened to hold no NULL in it, so a new *bad* row with a NULL
/// name changed the *good* file's schema and bytes, and it was uploaded
/// again with the same rows. DuckDB 1.2 did (runs then disabled the
/// optimizer pass its proof came from); 1.4 writes every top-level column
/// OPTIONAL whatever the statistics say, and this keeps an upgrade honest.
#[test]
fn good_file_bytes_depend_on_good_rows_only() {
    needs_services!();
    let w = World::new("bytes");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let r1 = w.run("WV");
    assert!(r1.succeeded(), "{}", r1.summary());
    let good = w.export_path("wv", "companies", "good");
    let types = parquet_repetitions(&good);
    assert!(
        types.iter().all(|(_, r)| r == "OPTIONAL"),
        "every column OPTIONAL, as in the source: {types:?}"
    );

    add_company(&mut pg, "c2", None, None, "WV");
    let r2 = w.run("WV");
    assert!(r2.succeeded(), "{}", r2.summary());
    assert_eq!(r2.files[0].table_name, "companies_good");
    assert_eq!(r2.files[0].sha256, r1.files[0].sha256);
    let uploaded: Vec<&str> = r2
        .objects
        .iter()
        .filter(|o| o.action == outreach_workbench::names::PublishAction::Uploaded)
        .map(|o| o.table_name.as_str())
        .collect();
    assert_eq!(uploaded, vec!["companies_bad"]);
}

/// The files are in key order, byte by byte as DuckDB compares text,
/// whatever order the source stores the rows in, and the bytes do not
/// change when only the physical order does (an UPDATE moves a row to the
/// end of the heap) or with the number of export lanes.
#[test]
fn files_are_in_key_order_whatever_the_physical_order() {
    needs_services!();
    let mut w = World::new("order");
    w.config.source.batch_rows = 2; // several batches per table
    let mut pg = w.pg();
    // Inserted out of order; a locale collation would put "a" before "B".
    for id in ["c2", "a", "Z", "c10", "_x", "B"] {
        add_company(&mut pg, id, Some("Co"), Some("co.example"), "WV");
    }
    for (id, company) in [("p3", "a"), ("p1", "Z"), ("P2", "c2"), ("p10", "B")] {
        add_person(&mut pg, id, company, Some("x@y.example"), Some("CEO"));
    }
    let r1 = w.run_with("WV", &dry());
    assert!(r1.succeeded(), "{}", r1.summary());
    let companies = parquet_rows(
        &w.export_path("wv", "companies", "good"),
        "company_unique_id",
    );
    assert_eq!(companies, vec!["B", "Z", "_x", "a", "c10", "c2"]);
    let people = parquet_rows(&w.export_path("wv", "people", "good"), "unique_id");
    assert_eq!(people, vec!["P2", "p1", "p10", "p3"]);

    pg.batch_execute(
        "UPDATE marketing.company_master SET company_name = company_name WHERE company_unique_id = 'B';
         UPDATE marketing.people_master SET title = title WHERE unique_id = 'P2';",
    )
    .unwrap();
    w.config.workbench.threads = 1;
    let r2 = w.run_with("WV", &dry());
    assert!(r2.succeeded(), "{}", r2.summary());
    let hashes = |r: &outreach_workbench::pipeline::RunReport| {
        r.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>()
    };
    assert_eq!(hashes(&r2), hashes(&r1));

    // Compressed tables hold the same rows in the same order.
    w.config.workbench.compress_tables = true;
    let r3 = w.run_with("WV", &dry());
    assert!(r3.succeeded(), "{}", r3.summary());
    assert_eq!(hashes(&r3), hashes(&r1));
}

/// A run writes its files while the rows load; a run with the link rule
/// writes them after the commit from the workbench's views. Both give the
/// same bytes, so the link rule re-uploads only what it changes.
#[test]
fn files_written_while_loading_are_the_views_files() {
    needs_services!();
    let mut w = World::new("streamed");
    w.config.source.batch_rows = 3; // several batches per table
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", Some("B"), Some("b.example"), "WV");
    add_company(&mut pg, "c3", None, Some("c.example"), "WV"); // bad, nobody works there
    let people = [
        ("p1", "c1", Some("x@a.example"), Some("CEO")),
        ("p2", "c1", Some("bad"), Some("CEO")),
        ("p3", "c2", Some("y@b.example"), None),
        ("p4", "c2", Some("z@b.example"), Some("CTO")),
        ("p5", "c2", None, None),
        ("p6", "c1", Some("w@a.example"), Some("CFO")),
        ("p7", "c2", Some("v@b.example"), Some("COO")),
    ];
    for (id, company, email, title) in people {
        add_person(&mut pg, id, company, email, title);
    }
    let streamed = w.run_with("WV", &dry());
    assert!(streamed.succeeded(), "{}", streamed.summary());
    let from_views = w.run_with(
        "WV",
        &RunOptions {
            dry_run: true,
            link_rule: true,
            ..Default::default()
        },
    );
    assert!(from_views.succeeded(), "{}", from_views.summary());
    let files = |r: &outreach_workbench::pipeline::RunReport| {
        r.files
            .iter()
            .map(|f| (f.table_name.clone(), f.rows, f.sha256.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(files(&streamed), files(&from_views));
    assert_eq!(
        files(&streamed)
            .iter()
            .map(|(t, rows, _)| format!("{t}={rows}"))
            .collect::<Vec<_>>(),
        [
            "companies_good=2",
            "companies_bad=1",
            "people_good=4",
            "people_bad=3"
        ]
    );
    assert_eq!(streamed.people.as_ref().unwrap().errors["email_invalid"], 2);
    // The link rule changes nothing but its own count (no person works for
    // the bad company).
    let counts = |r: &outreach_workbench::pipeline::RunReport| {
        let mut people = serde_json::to_value(r.people.as_ref().unwrap()).unwrap();
        people["errors"]
            .as_object_mut()
            .unwrap()
            .remove("company_not_valid");
        (
            serde_json::to_value(r.companies.as_ref().unwrap()).unwrap(),
            people,
        )
    };
    assert_eq!(counts(&streamed), counts(&from_views));
    assert_eq!(
        from_views.people.as_ref().unwrap().errors["company_not_valid"],
        0
    );
}

/// A rule that fails on a value (a cast) fails the run before its commit:
/// the previous run's tables and files stay as they were, and no
/// temporary file is left behind.
#[test]
fn a_rule_failing_at_run_time_leaves_the_last_run_in_place() {
    needs_services!();
    let mut w = World::new("runtime-rule");
    w.set_config_extra(
        r#"
[rules]
people = [{ code = "title_negative", condition = "CAST(title AS INTEGER) < 0" }]
"#,
    );
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("42"));
    add_person(&mut pg, "p2", "c1", Some("y@a.example"), Some("-1"));
    let first = w.run_with("WV", &dry());
    assert!(first.succeeded(), "{}", first.summary());
    assert_eq!(first.people.as_ref().unwrap().errors["title_negative"], 1);

    add_person(&mut pg, "p3", "c1", Some("z@a.example"), Some("CEO"));
    let failed = w.run_with("WV", &dry());
    assert_eq!(failed.status, RunStatus::Failed);
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("people_") && error.contains("CEO"),
        "names the file and the value: {error}"
    );
    for f in &first.files {
        let (_, sha256) = outreach_workbench::files::hash_file(&f.path).unwrap();
        assert_eq!(sha256, f.sha256, "{} was replaced", f.path.display());
    }
    let leftovers: Vec<_> = walk(&w.dir.path().join("exports"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let duck = catalog(&w);
    let n: i64 = duck
        .query_row("SELECT count(*) FROM wv.people_raw", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2, "the failed run's rows were rolled back");
}

/// An empty rule list validates nothing (config.toml says so): every row
/// is good and the bad files are empty. The bad rows' `COPY` is then
/// `WHERE false`, which ends without reading its rows; the pull used to
/// take that for a failed writer and fail every run ("the workbench
/// stopped taking rows"). Enough rows that the reader is still sending when
/// that statement has ended.
#[test]
fn empty_rule_lists_make_every_row_good() {
    needs_services!();
    let mut w = World::new("norules");
    w.set_config_extra("\n[rules]\ncompanies = []\npeople = []\n");
    let mut pg = w.pg();
    pg.batch_execute(
        "INSERT INTO marketing.company_master
            (company_unique_id, company_name, website_url, address_state, source_system, promoted_from_intake_at)
         SELECT 'c' || i, CASE WHEN i % 3 = 0 THEN NULL ELSE 'Co ' || i END, NULL, 'WV', 'test',
                '2025-01-01 00:00:00+00'
         FROM generate_series(1, 30000) i;
         INSERT INTO marketing.people_master
            (unique_id, company_unique_id, company_slot_unique_id, first_name, last_name, email, title,
             source_system, promoted_from_intake_at)
         SELECT 'p' || i, 'c' || (i % 30000 + 1), 'slot', 'Ana', 'Smith', NULL, NULL, 'test',
                '2025-01-01 00:00:00+00'
         FROM generate_series(1, 60000) i;",
    )
    .unwrap();
    let r = w.run_with("WV", &dry());
    assert!(r.succeeded(), "{}", r.summary());
    let companies = r.companies.as_ref().unwrap();
    let people = r.people.as_ref().unwrap();
    assert_eq!(
        (companies.raw, companies.good, companies.bad),
        (30000, 30000, 0)
    );
    assert_eq!((people.raw, people.good, people.bad), (60000, 60000, 0));
    for entity in ["companies", "people"] {
        let bad = w.export_path("wv", entity, "bad");
        assert_eq!(count_rows(&bad), 0, "{}", bad.display());
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_key_setting_naming_no_column_is_refused_before_any_work() {
    needs_services!();
    let mut w = World::new("nokey");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("Co"), Some("co.example"), "WV");
    w.config.source.person_key = "person_id".into();
    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(
        e.contains("source.person_key") && e.contains("person_id"),
        "{e}"
    );
    assert!(r.companies.is_none(), "nothing was pulled");
}

#[test]
fn audit_row_holds_the_run() {
    needs_services!();
    let w = World::new("audit");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", Some("B"), None, "WV");
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), None);
    let r = w.run("WV");
    assert!(r.succeeded(), "{}", r.summary());
    let id = r.audit_id.expect("audit id");
    let row = pg
        .query_one(
            "SELECT event_type, event_source, details, created_at IS NOT NULL FROM shq.audit_log WHERE id = $1",
            &[&(id as i32)],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "outreach_validation_run");
    assert_eq!(row.get::<_, String>(1), "outreach-workbench");
    assert!(row.get::<_, bool>(3));
    let d: serde_json::Value = row.get(2);
    assert_eq!(d["state"], "WV");
    assert_eq!(d["run_id"], r.run_id.as_str());
    assert_eq!(d["status"], "success");
    assert_eq!(d["companies"]["good"], 1);
    assert_eq!(d["companies"]["bad"], 1);
    assert_eq!(d["companies"]["errors"]["website_url_missing"], 1);
    assert_eq!(d["people"]["bad"], 1);
    assert_eq!(d["people"]["errors"]["title_missing"], 1);
    assert_eq!(d["files"].as_array().unwrap().len(), 4);
    assert_eq!(d["files"][0]["sha256"].as_str().unwrap().len(), 64);
    assert!(d["files"][0]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(d["uploaded"], 4);
    assert_eq!(d["skipped"], 0);
    assert_eq!(
        d["objects"][0]["url"],
        format!(
            "s3://{}/outreach/wv/companies/good/companies_good.parquet",
            w.bucket
        )
    );
    assert!(d["started_at"].is_string() && d["finished_at"].is_string());
    assert!(d["stages"]["pull"].is_number() && d["stages"]["publish"].is_number());
    assert!(d["error"].is_null());
    // Secrets never reach the audit.
    let text = d.to_string();
    assert!(!text.contains(&services().pg_password));
    assert!(!text.contains(&services().s3_secret));
}

#[test]
fn audit_table_of_another_layout_is_refused_before_any_work() {
    needs_services!();
    let w = World::new("auditlayout");
    let mut pg = w.pg();
    pg.batch_execute(
        "CREATE SCHEMA shq; CREATE TABLE shq.audit_log (id SERIAL PRIMARY KEY, message TEXT, details TEXT)",
    )
    .unwrap();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(
        e.contains("event_type") && e.contains("event_source"),
        "{e}"
    );
    assert!(e.contains("details` is text"), "{e}");
    assert!(e.contains("[audit] table"), "{e}");
    assert!(r.files.is_empty(), "no work done");
    assert!(!w.export_path("wv", "companies", "good").exists());
    assert!(head(
        &w.bucket,
        "outreach/wv/companies/good/companies_good.parquet"
    )
    .is_none());
}

#[test]
fn bad_password_fails_clearly_and_audits_no_success() {
    needs_services!();
    let mut w = World::new("badpw");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    w.config.source.password = Some(outreach_workbench::config::Secret::new("wrong-password"));
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.clone().unwrap();
    // PostgreSQL says "password authentication failed", PgBouncer (in the
    // pooled pass) "SASL authentication failed": the server's own words.
    assert!(
        e.contains("FATAL: password authentication failed")
            || e.contains("FATAL: SASL authentication failed"),
        "{e}"
    );
    assert!(!e.contains("wrong-password"), "no secret in errors: {e}");
    assert!(r.audit_id.is_none());
    assert!(!r.succeeded());
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'shq'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing audited");
}

#[test]
fn missing_bucket_fails_with_the_servers_error_and_is_audited_as_failed() {
    needs_services!();
    let mut w = World::new("nobucket");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    w.config.storage.bucket = "no-such-bucket-here".into();
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.clone().unwrap();
    assert!(e.contains("NoSuchBucket"), "{e}");
    assert!(e.contains("no-such-bucket-here"), "names the bucket: {e}");
    assert!(r.files.is_empty(), "refused before any work");
    let id = r.audit_id.expect("failed runs are audited");
    let d: serde_json::Value = pg
        .query_one(
            "SELECT details FROM shq.audit_log WHERE id = $1",
            &[&(id as i32)],
        )
        .unwrap()
        .get(0);
    assert_eq!(d["status"], "failed");
    assert!(d["error"].as_str().unwrap().contains("NoSuchBucket"));
}

#[test]
fn tls_require_works_and_verify_full_checks_the_certificate() {
    needs_services!();
    let mut w = World::new("tls");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    // TLS to PostgreSQL itself (the test pooler speaks plain text).
    w.config.source.port = services().pg_port;
    w.config.source.sslmode = outreach_workbench::config::SslMode::Require;
    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let mut c = outreach_workbench::source::connect::connect(&w.config.source).unwrap();
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ssl, "sslmode=require must encrypt");
    // Debian's snakeoil certificate is self-signed: verify-full must refuse it.
    w.config.source.sslmode = outreach_workbench::config::SslMode::VerifyFull;
    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Failed);
    assert!(r.error.unwrap().contains("sslmode verify-full"));
}

#[test]
fn a_database_back_within_the_retries_does_not_fail_the_run() {
    needs_services!();
    let mut w = World::new("retry");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let port = free_port();
    w.config.source.port = port;
    w.config.retry = outreach_workbench::config::RetryConfig {
        attempts: 6,
        initial_backoff: std::time::Duration::from_millis(500),
        max_backoff: std::time::Duration::from_secs(1),
    };
    pg_comes_back_on(port, std::time::Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert!(
        started.elapsed().as_secs_f64() >= 1.4,
        "it did wait for the database"
    );

    // Authentication failures are not retried: they fail at once. Timed
    // to the run's outcome (its duration), not the bookkeeping after it
    // (history, page, catalog), which a loaded machine slows too. The five
    // retries' waits alone would add at least 3.75 s.
    w.config.source.port = services().source_port;
    w.config.source.password = Some(outreach_workbench::config::Secret::new("wrong"));
    let r = w.run_with("WV", &dry());
    assert_eq!(r.status, RunStatus::Failed);
    let took = r.duration_secs.unwrap();
    assert!(took < 1.0, "no retry for a bad password: {took} s");
}

/// What an analyst sees in the workbench: (relation kind of `_raw`, rows
/// of raw/good/bad, the bad rows' codes, raw's columns).
fn workbench_view(w: &World, entity: &str) -> (String, [i64; 3], Vec<String>, Vec<String>) {
    let state = duckdb::Connection::open(state_file(w)).unwrap();
    let kind: String = state
        .query_row(
            &format!(
                "SELECT 'view' FROM duckdb_views() WHERE schema_name = 'wv' AND view_name = '{entity}_raw'
                 UNION ALL
                 SELECT 'table' FROM duckdb_tables() WHERE schema_name = 'wv' AND table_name = '{entity}_raw'"
            ),
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(state);
    // What an analyst reads: the catalog's views, over the files either way.
    let duck = catalog(w);
    let catalog_kind: String = duck
        .query_row(
            &format!(
                "SELECT 'view' FROM duckdb_views() WHERE schema_name = 'wv' AND view_name = '{entity}_raw'"
            ),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(catalog_kind, "view");
    let count = |t: &str| -> i64 {
        duck.query_row(&format!("SELECT count(*) FROM wv.{entity}_{t}"), [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let strings = |sql: &str| -> Vec<String> {
        let mut stmt = duck.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let codes = strings(&format!(
        "SELECT array_to_string(validation_errors, ',') FROM wv.{entity}_bad ORDER BY 1"
    ));
    let cols = strings(&format!(
        "SELECT column_name FROM (DESCRIBE SELECT * FROM wv.{entity}_raw)"
    ));
    (
        kind,
        [count("raw"), count("good"), count("bad")],
        codes,
        cols,
    )
}

#[test]
fn the_workbench_reads_the_files_and_keeps_the_link_rules_rows_in_tables() {
    needs_services!();
    let w = World::new("views");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_company(&mut pg, "c2", None, Some("b.example"), "WV");
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("CEO"));
    add_person(&mut pg, "p2", "c2", Some("y@b.example"), Some("CEO"));
    let link = RunOptions {
        dry_run: true,
        link_rule: true,
        ..Default::default()
    };
    // A link-rule run first, as a workbench of an earlier version has: raw
    // rows in tables. Then the views over the files replace them, and back.
    for (opts, kind, people_bad) in [
        (&link, "table", vec!["company_not_valid"]),
        (&dry(), "view", vec![]),
        (&link, "table", vec!["company_not_valid"]),
        (&dry(), "view", vec![]),
    ] {
        let r = w.run_with("WV", opts);
        assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
        let (k, counts, codes, cols) = workbench_view(&w, "companies");
        assert_eq!((k.as_str(), counts), (kind, [2, 1, 1]));
        assert_eq!(codes, ["company_name_missing"]);
        assert!(cols.contains(&"company_name".to_string()), "{cols:?}");
        assert!(!cols.contains(&"validation_errors".to_string()), "{cols:?}");
        let (k, counts, codes, _) = workbench_view(&w, "people");
        let bad = people_bad.len() as i64;
        assert_eq!((k.as_str(), counts), (kind, [2, 2 - bad, bad]));
        assert_eq!(codes, people_bad);
        let people = r.people.as_ref().unwrap();
        assert_eq!(
            (people.raw, people.good, people.bad),
            (2, 2 - bad as u64, bad as u64)
        );
    }
}

/// The previous release linked DuckDB 1.2: its workbench file opens with
/// the DuckDB we link now, keeps its history, and a run goes on in it.
#[test]
fn a_workbench_written_by_duckdb_1_2_opens_and_keeps_its_history() {
    needs_services!();
    let Ok(python) = std::env::var("OW_DUCKDB_1_2_PYTHON") else {
        eprintln!("skipped: OW_DUCKDB_1_2_PYTHON is not set (scripts/test.sh installs Python's duckdb 1.2.2 when it can; it says why not)");
        return;
    };
    let w = World::new("wbold");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    let duck = w.dir.path().join("duck");
    std::fs::create_dir_all(&duck).unwrap();
    // The tables the previous release made, one run in its history and a
    // state table of the kind it kept (now a view).
    let script = r#"
import sys, duckdb
assert duckdb.__version__.startswith("1.2."), duckdb.__version__
c = duckdb.connect(sys.argv[1])
c.execute("""
CREATE TABLE main.runs (run_id VARCHAR PRIMARY KEY, state VARCHAR NOT NULL, status VARCHAR NOT NULL,
  dry_run BOOLEAN NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP, audit_id BIGINT,
  error VARCHAR, report VARCHAR, audit_pending BOOLEAN DEFAULT false);
CREATE TABLE main.unfinished_uploads (upload_id VARCHAR PRIMARY KEY, object_key VARCHAR NOT NULL, left_at TIMESTAMP NOT NULL);
CREATE TABLE main.upload_manifest (object_key VARCHAR PRIMARY KEY, sha256 VARCHAR NOT NULL, bytes BIGINT NOT NULL,
  uploaded_at TIMESTAMP NOT NULL, run_id VARCHAR NOT NULL);
INSERT INTO main.runs VALUES ('run-from-duckdb-1.2', 'WV', 'success', false,
  TIMESTAMP '2026-12-01 06:00:00', TIMESTAMP '2026-12-01 06:00:02', 7, NULL, NULL, false);
CREATE SCHEMA wv;
CREATE TABLE wv.companies_good AS SELECT 'old' AS company_unique_id;
""")
c.close()
"#;
    let o = Command::new(&python)
        .args(["-c", script])
        .arg(duck.join("outreach_workbench.duckdb"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let r = w.run("WV");
    assert!(r.succeeded(), "{:?}", r.error);
    let history = outreach_workbench::pipeline::history::read(&w.config, None, 10).unwrap();
    let ids: Vec<&str> = history.iter().map(|e| e.report.run_id.as_str()).collect();
    assert!(ids.contains(&"run-from-duckdb-1.2"), "{ids:?}");
    assert!(ids.contains(&r.run_id.as_str()), "{ids:?}");
}

/// A full disk is named plainly, with the file being written, not as
/// DuckDB's raw JSON. Needs root (a 1 MiB tmpfs as the workbench).
#[test]
fn a_full_disk_is_reported_plainly_with_the_file() {
    needs_services!();
    let mut w = World::new("fulldisk");
    let mnt = w.dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot mount a tmpfs here (needs root): {mounted:?}");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    w.config.workbench.dir = mnt.clone();
    // About 3 MB of Parquet: more than the disk holds.
    w.pg()
        .batch_execute(
            "INSERT INTO marketing.company_master
                 (company_unique_id, company_name, website_url, address_state, source_system,
                  promoted_from_intake_at)
             SELECT 'c' || i, md5(i::text) || md5((i * 7)::text), 'w' || md5(i::text) || '.example',
                    'WV', 'test', '2025-01-01 00:00:00+00'
             FROM generate_series(1, 40000) i",
        )
        .unwrap();
    let r = w.run_with(
        "WV",
        &RunOptions {
            dry_run: true,
            ..Default::default()
        },
    );
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(e.contains("No space left on device"), "{e}");
    assert!(
        e.contains(&mnt.display().to_string()),
        "names the file: {e}"
    );
    assert!(!e.contains("exception_type"), "{e}");
}

/// A lease left by a process of this host that is gone (a one-shot run
/// killed with -9) is taken over at once, not after its TTL; a live local
/// holder, a holder on another machine, and a row of an older version
/// without the process described keep theirs.
#[test]
fn a_lease_of_a_dead_process_of_this_host_is_taken_over_at_once() {
    needs_services!();
    let w = World::new("deadlocal");
    add_company(&mut w.pg(), "c1", Some("A"), Some("a.example"), "WV");
    let first = w.run("WV");
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    let me = outreach_workbench::ledger::process::this_process().unwrap();
    let (host, _) = outreach_workbench::ledger::claim::holder();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id() as i32;
    child.wait().unwrap();
    let put = |run: &str, pid: i32, process: Option<&str>| {
        w.pg()
            .execute(
                "INSERT INTO shq.outreach_leases (state, run_id, host, pid, process, expires_at)
                 VALUES ('WV', $1, $2, $3, $4, now() + interval '10 minutes')
                 ON CONFLICT (state) DO UPDATE SET run_id = EXCLUDED.run_id,
                     host = EXCLUDED.host, pid = EXCLUDED.pid, process = EXCLUDED.process,
                     expires_at = EXCLUDED.expires_at",
                &[&run, &host, &pid, &process],
            )
            .unwrap();
    };
    let elsewhere = me.replacen("boot=", "boot=other", 1);
    for (run, pid, process) in [
        ("live-here", std::process::id() as i32, Some(me.as_str())),
        ("on-another-machine", dead, Some(elsewhere.as_str())),
        ("older-version", dead, None),
    ] {
        put(run, pid, process);
        let r = w.run("WV");
        assert_eq!(r.status, RunStatus::Skipped, "{run}: {:?}", r.error);
        assert!(r.error.unwrap().contains(run));
    }
    put("dead-here", dead, Some(&me));
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert!(leases(&w).is_empty(), "{:?}", leases(&w));
}

/// A one-shot run killed with -9 leaves its row `running` in the
/// workbench. The next process to open the file alone (here another
/// one-shot run; a daemon's next run does the same) marks it abandoned and
/// its record reaches the audit, once: before, only a daemon's start did,
/// and a workbench used by one-shot runs kept the row `running` for good
/// (found by scripts/soak.sh).
#[test]
fn a_one_shot_run_killed_with_9_is_audited_as_abandoned_by_the_next_run() {
    needs_services!();
    let w = World::new("oneshotkill");
    add_slow_view(&w, 1.0);
    for i in 0..20 {
        add_company(
            &mut w.pg(),
            &format!("c{i:02}"),
            Some("A"),
            Some("a.example"),
            "WV",
        );
    }
    let cfg = w.write_config_file();
    let log = w.dir.path().join("killed.log");
    let mut child = bin_with_secrets()
        .args(["run", "--state", "WV", "--config"])
        .arg(&cfg)
        .env(
            "OUTREACH_SOURCE__COMPANIES_TABLE",
            "marketing.slow_companies",
        )
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(w.dir.path().join("killed.err")).unwrap())
        .spawn()
        .unwrap();
    // Killed during its pull: the slow view's query is running.
    wait_until(
        "the one-shot run's pull",
        std::time::Duration::from_secs(30),
        || std::fs::read_to_string(w.dir.path().join("killed.err")).unwrap_or_default(),
        || slow_pull_running(&w).then_some(()),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let history = outreach_workbench::pipeline::history::read(&w.config, None, 10).unwrap();
    let killed = history[0].report.run_id.clone();
    assert_eq!(history[0].report.status, RunStatus::Running, "{history:?}");

    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let found: Vec<&str> = r
        .abandoned_found
        .iter()
        .map(|a| a.run_id.as_str())
        .collect();
    assert_eq!(
        found,
        [killed.as_str()],
        "handed to the caller (a daemon tells its webhooks)"
    );
    let history = outreach_workbench::pipeline::history::read(&w.config, None, 10).unwrap();
    let row = history.iter().find(|e| e.report.run_id == killed).unwrap();
    assert_eq!(row.report.status, RunStatus::Abandoned);
    assert!(!row.audit_pending, "its record was sent with the next run");
    let audited: Vec<String> = w
        .pg()
        .query(
            "SELECT details->>'status' FROM shq.audit_log WHERE details->>'run_id' = $1",
            &[&killed],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audited, ["abandoned"]);
}

/// A rule of `severity = "warn"` counts its rows and lists its code in
/// `validation_warnings`, good rows and bad alike, but leaves a good row
/// good: the same whether the files are written while the rows load or
/// from the workbench's tables (the link rule).
#[test]
fn a_warning_rule_leaves_good_rows_good() {
    needs_services!();
    let mut w = World::new("warn");
    w.config
        .rules
        .companies
        .push(outreach_workbench::config::Rule {
            code: "name_short".into(),
            condition: "length(company_name) < 3".into(),
            description: None,
            fix: None,
            severity: outreach_workbench::config::Severity::Warn,
        });
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV"); // good, warned
    add_company(&mut pg, "c2", Some("Bcde"), Some("b.example"), "WV"); // good
    add_company(&mut pg, "c3", None, Some("c.example"), "WV"); // bad, not warned
    add_company(&mut pg, "c4", Some("AB"), None, "WV"); // bad, warned
    for link_rule in [false, true] {
        let r = w.run_with(
            "WV",
            &RunOptions {
                dry_run: true,
                link_rule,
                ..Default::default()
            },
        );
        assert!(r.succeeded(), "{}", r.summary());
        let c = r.companies.as_ref().unwrap();
        assert_eq!(
            (c.good, c.bad),
            (2, 2),
            "link rule {link_rule}: {}",
            r.summary()
        );
        assert_eq!(c.warnings.get("name_short"), Some(&2), "{}", r.summary());
        assert!(!c.errors.contains_key("name_short"), "{:?}", c.errors);
        assert!(r.summary().contains("warn:name_short=2"), "{}", r.summary());
        let good = w.export_path("wv", "companies", "good");
        assert_eq!(
            parquet_rows(&good, "company_unique_id, validation_warnings"),
            ["c1|[name_short]", "c2|[]"]
        );
        let bad = w.export_path("wv", "companies", "bad");
        assert_eq!(
            parquet_rows(
                &bad,
                "company_unique_id, validation_errors, validation_warnings"
            ),
            [
                "c3|[company_name_missing]|[]",
                "c4|[website_url_missing]|[name_short]"
            ]
        );
    }
}

/// A rule with a window function judges each row against the whole state:
/// a duplicate email is found the same in one batch and in a batch per
/// row, written while the rows load or from the link rule's tables, and
/// the files stay in key order.
#[test]
fn a_duplicate_email_rule_reads_the_whole_state() {
    needs_services!();
    let mut w = World::new("dup");
    w.config
        .rules
        .people
        .push(outreach_workbench::config::Rule {
            code: "email_duplicate".into(),
            condition: "count(*) OVER (PARTITION BY lower(email)) > 1".into(),
            description: None,
            fix: None,
            severity: Default::default(),
        });
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    for (id, email) in [
        ("p4", "z@b.example"),
        ("p1", "x@a.example"),
        ("p3", "y@b.example"),
        ("p2", "X@A.example"),
    ] {
        add_person(&mut pg, id, "c1", Some(email), Some("CEO"));
    }
    let mut seen = Vec::new();
    for (batch_rows, link_rule) in [(16_384, false), (1, false), (1, true)] {
        w.config.source.batch_rows = batch_rows;
        let r = w.run_with(
            "WV",
            &RunOptions {
                dry_run: true,
                link_rule,
                ..Default::default()
            },
        );
        assert!(r.succeeded(), "{}", r.summary());
        let p = r.people.as_ref().unwrap();
        assert_eq!(p.errors.get("email_duplicate"), Some(&2), "{}", r.summary());
        let good = w.export_path("wv", "people", "good");
        let bad = w.export_path("wv", "people", "bad");
        assert_eq!(parquet_rows(&good, "unique_id"), ["p3", "p4"]);
        assert_eq!(
            parquet_rows(&bad, "unique_id, validation_errors"),
            ["p1|[email_duplicate]", "p2|[email_duplicate]"]
        );
        seen.push(r.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>());
    }
    assert_eq!(seen[0], seen[1], "one batch or many");
    assert_eq!(seen[0], seen[2], "streamed or from the tables");
}
