//! Change sets: each publish's rows added, changed and removed since the
//! state's previous published snapshot, read back from the bucket with
//! DuckDB as a consumer would.

use std::collections::BTreeMap;

use crate::common::*;

/// `(key, change, changed_columns)` of a change file in the bucket.
type Rows = Vec<(String, String, Option<String>)>;

/// WV's change files, by entity, with their rows and metadata.
fn change_sets(
    w: &World,
    key_of: &dyn Fn(&str) -> &'static str,
) -> BTreeMap<String, (Rows, BTreeMap<String, String>)> {
    state_change_sets(w, "wv", key_of)
}

/// The change files the manifest of `state` lists.
fn state_change_sets(
    w: &World,
    state: &str,
    key_of: &dyn Fn(&str) -> &'static str,
) -> BTreeMap<String, (Rows, BTreeMap<String, String>)> {
    let manifest_key = format!("outreach/{state}/_manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&get(&w.bucket, &manifest_key)).unwrap();
    let duck = duckdb::Connection::open_in_memory().unwrap();
    let mut out = BTreeMap::new();
    for c in manifest["changes"].as_array().cloned().unwrap_or_default() {
        let entity = c["entity"].as_str().unwrap().to_string();
        let path = w
            .dir
            .path()
            .join(format!("{state}-{entity}-changes.parquet"));
        std::fs::write(&path, get(&w.bucket, c["key"].as_str().unwrap())).unwrap();
        let file = path.display().to_string();
        let key = key_of(&entity);
        let mut stmt = duck
            .prepare(&format!(
                "SELECT {key}, change, array_to_string(changed_columns, ',') FROM read_parquet('{file}')"
            ))
            .unwrap();
        let rows: Rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut stmt = duck
            .prepare(&format!(
                "SELECT decode(key), decode(value) FROM parquet_kv_metadata('{file}')"
            ))
            .unwrap();
        let meta: BTreeMap<String, String> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        out.insert(entity, (rows, meta));
    }
    out
}

fn row(key: &str, change: &str, columns: Option<&str>) -> (String, String, Option<String>) {
    (key.into(), change.into(), columns.map(String::from))
}

fn change_keys(w: &World) -> Vec<String> {
    list_keys(&w.bucket)
        .into_iter()
        .filter(|k| k.starts_with("outreach/wv/changes/"))
        .collect()
}

#[test]
fn a_change_set_holds_exactly_what_changed_since_the_last_publish() {
    needs_services!();
    let w = World::new("changes");
    let key_of = |entity: &str| match entity {
        "companies" => "company_unique_id",
        _ => "unique_id",
    };
    {
        let mut pg = w.pg();
        for (id, name) in [
            ("c1", Some("A")),
            ("c2", Some("B")),
            ("c3", Some("C")),
            ("c4", None),
        ] {
            add_company(&mut pg, id, name, Some("a.example"), "WV");
        }
        add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("CEO"));
        add_person(&mut pg, "p2", "c2", Some("y@a.example"), Some("CTO"));
        add_person(&mut pg, "p3", "c3", Some("no-email"), Some("CFO"));
    }
    // The first publish is the baseline: no change file.
    let first = w.run("WV");
    assert!(first.succeeded(), "{}", first.summary());
    assert_eq!(
        first.changes_baseline.as_deref(),
        Some("the state's first publish")
    );
    assert!(change_keys(&w).is_empty());
    let manifest: serde_json::Value =
        serde_json::from_slice(&get(&w.bucket, "outreach/wv/_manifest.json")).unwrap();
    assert_eq!(manifest["format"], 2);
    assert_eq!(manifest["baseline"], "the state's first publish");

    // Added, changed, removed (with its people), a good person turned bad,
    // a bad company fixed.
    w.pg()
        .batch_execute(
            "UPDATE marketing.company_master SET website_url = 'b.example' WHERE company_unique_id = 'c2';
             DELETE FROM marketing.people_master WHERE company_unique_id = 'c1';
             DELETE FROM marketing.company_master WHERE company_unique_id = 'c1';
             UPDATE marketing.people_master SET email = 'broken' WHERE unique_id = 'p2';
             UPDATE marketing.company_master SET company_name = 'D' WHERE company_unique_id = 'c4';",
        )
        .unwrap();
    add_company(&mut w.pg(), "c5", Some("E"), Some("e.example"), "WV");
    add_person(&mut w.pg(), "p5", "c5", Some("z@e.example"), Some("COO"));
    let second = w.run("WV");
    assert!(second.succeeded(), "{}", second.summary());
    assert!(
        second
            .summary()
            .contains("changes companies 2 added, 1 changed, 1 removed"),
        "{}",
        second.summary()
    );
    let sets = change_sets(&w, &key_of);
    let (companies, meta) = &sets["companies"];
    assert_eq!(
        companies,
        &vec![
            row("c1", "removed", None),
            row("c2", "changed", Some("website_url")),
            row("c4", "added", None),
            row("c5", "added", None),
        ]
    );
    assert_eq!(meta["run_id"], second.run_id);
    assert_eq!(meta["base_run_id"], first.run_id);
    let (people, _) = &sets["people"];
    assert_eq!(
        people,
        &vec![
            row("p1", "removed", None),
            row("p2", "removed", None),
            row("p5", "added", None),
        ]
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&get(&w.bucket, "outreach/wv/_manifest.json")).unwrap();
    assert_eq!(manifest["base_run_id"], first.run_id.as_str());
    assert_eq!(manifest["changes"][0]["added"], 2);
    assert_eq!(change_keys(&w).len(), 2);
    let audit = audit_details(&w, second.audit_id.unwrap());
    assert_eq!(audit["changes"][0]["removed"], 1, "{audit:#}");

    // A dry run counts its changes against this host's last publish.
    w.pg()
        .batch_execute("UPDATE marketing.company_master SET website_url = 'z.example' WHERE company_unique_id = 'c5'")
        .unwrap();
    let dry = w.run_with(
        "WV",
        &outreach_workbench::pipeline::RunOptions {
            dry_run: true,
            ..Default::default()
        },
    );
    assert!(dry.succeeded(), "{}", dry.summary());
    assert_eq!(dry.changes.len(), 1, "{}", dry.summary());
    assert_eq!((dry.changes[0].added, dry.changes[0].changed), (0, 1));
    assert_eq!(
        dry.changes_base_run_id.as_deref(),
        Some(second.run_id.as_str())
    );
    assert_eq!(change_keys(&w).len(), 2, "a dry run uploads none");
    w.pg()
        .batch_execute("UPDATE marketing.company_master SET website_url = 'e.example' WHERE company_unique_id = 'c5'")
        .unwrap();

    // Nothing changed: no change file, the manifest as it was.
    let third = w.run("WV");
    assert!(
        third.succeeded() && third.changes.is_empty(),
        "{}",
        third.summary()
    );
    assert_eq!(change_keys(&w).len(), 2);

    // The workbench lost: the previous snapshot comes from the bucket.
    // With keep_days = 0, the second run's change files go once the
    // fourth's are listed.
    let mut w = w;
    w.config.changes.keep_days = 0;
    let second_keys = change_keys(&w);
    std::fs::remove_dir_all(w.dir.path().join("published")).unwrap();
    w.pg()
        .batch_execute("UPDATE marketing.company_master SET company_name = 'CC' WHERE company_unique_id = 'c3'")
        .unwrap();
    let fourth = w.run("WV");
    assert!(fourth.succeeded(), "{}", fourth.summary());
    let sets = change_sets(&w, &key_of);
    assert_eq!(
        sets["companies"].0,
        vec![row("c3", "changed", Some("company_name"))]
    );
    assert!(!sets.contains_key("people"), "{sets:?}");
    assert_eq!(sets["companies"].1["base_run_id"], second.run_id);
    let now = change_keys(&w);
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(second_keys.iter().all(|k| !now.contains(k)), "{now:?}");
    assert!(now[0].contains(&fourth.run_id), "{now:?}");

    // A new column starts a new baseline rather than marking every row
    // (and, kept 90 days, the change files before it stay).
    w.config.changes.keep_days = 90;
    w.pg()
        .batch_execute("ALTER TABLE marketing.company_master ADD COLUMN extra TEXT")
        .unwrap();
    let before = change_keys(&w).len();
    // A change set whose run died before its manifest: the next publish
    // deletes it; those the manifest lists (its kept ones) stay.
    let orphan = format!(
        "outreach/wv/changes/companies/{}_dead.parquet",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    let s = services();
    rt().block_on(s3_bucket(&s, &w.bucket).put_object(&orphan, b"PAR1"))
        .unwrap();
    let fifth = w.run("WV");
    assert!(fifth.succeeded(), "{}", fifth.summary());
    assert!(
        fifth
            .changes_baseline
            .as_deref()
            .is_some_and(|b| b.contains("columns")),
        "{}",
        fifth.summary()
    );
    assert_eq!(change_keys(&w).len(), before);
    assert!(!change_keys(&w).contains(&orphan));
    let manifest: serde_json::Value =
        serde_json::from_slice(&get(&w.bucket, "outreach/wv/_manifest.json")).unwrap();
    assert!(manifest["changes"].is_null(), "{manifest:#}");
    assert_eq!(
        manifest["retained_changes"][0]["run_id"],
        fourth.run_id.as_str()
    );
    assert!(manifest["baseline"].as_str().is_some(), "{manifest:#}");
}

#[test]
fn an_all_states_run_gives_each_state_its_change_set() {
    needs_services!();
    let w = World::new("changesall");
    let key_of = |entity: &str| match entity {
        "companies" => "company_unique_id",
        _ => "unique_id",
    };
    {
        let mut pg = w.pg();
        for (id, state) in [("w1", "WV"), ("w2", "WV"), ("o1", "OH"), ("o2", "OH")] {
            add_company(&mut pg, id, Some("A"), Some("a.example"), state);
        }
    }
    let all = || {
        let opts = outreach_workbench::pipeline::RunOptions::for_all_states(&w.config);
        let never = tokio_util::sync::CancellationToken::new();
        outreach_workbench::pipeline::all_states::run_all_states(
            &w.config,
            &never,
            &opts,
            &mut |_, _| {},
        )
    };
    let first = all();
    assert!(first.succeeded(), "{}", first.summary());
    w.pg()
        .batch_execute(
            "UPDATE marketing.company_master SET website_url = 'w.example' WHERE company_unique_id = 'w2';
             DELETE FROM marketing.company_master WHERE company_unique_id = 'o1';",
        )
        .unwrap();
    let second = all();
    assert!(second.succeeded(), "{}", second.summary());
    let wv = state_change_sets(&w, "wv", &key_of);
    assert_eq!(
        wv["companies"].0,
        vec![row("w2", "changed", Some("website_url"))]
    );
    let oh = state_change_sets(&w, "oh", &key_of);
    assert_eq!(oh["companies"].0, vec![row("o1", "removed", None)]);
    assert!(!wv.contains_key("people") && !oh.contains_key("people"));
}
