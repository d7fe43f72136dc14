//! Publishing as the bucket sees it, through the suite's fault proxy: the
//! manifest written last, uploads read back, retries only for what may pass,
//! schema drift.

use outreach_workbench::pipeline::{RunOptions, RunStatus};

use crate::common::*;
use crate::s3proxy::FaultProxy;

const MANIFEST: &str = "outreach/wv/_manifest.json";
const PEOPLE_GOOD: &str = "outreach/wv/people/good/people_good.parquet";

fn world_behind_proxy(name: &str) -> (World, FaultProxy) {
    let mut w = World::new(name);
    let proxy = FaultProxy::start();
    w.config.storage.endpoint = proxy.endpoint.clone();
    w.config.retry.initial_backoff = std::time::Duration::from_millis(50);
    w.config.retry.max_backoff = std::time::Duration::from_millis(100);
    let mut pg = w.pg();
    for i in 0..5 {
        add_company(
            &mut pg,
            &format!("c{i}"),
            Some("A"),
            Some("a.example"),
            "WV",
        );
        add_person(
            &mut pg,
            &format!("p{i}"),
            &format!("c{i}"),
            Some("a@b.example"),
            Some("CEO"),
        );
    }
    (w, proxy)
}

fn manifest(w: &World) -> serde_json::Value {
    serde_json::from_slice(&get(&w.bucket, MANIFEST)).unwrap()
}

#[test]
fn the_manifest_names_this_runs_files_is_written_last_and_left_alone_when_unchanged() {
    needs_services!();
    let (w, proxy) = world_behind_proxy("manifest");
    let first = w.run("WV");
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    let m = manifest(&w);
    assert_eq!(m["run_id"], first.run_id.as_str());
    // Checked like every file: its `sha256` metadata is its body's.
    use sha2::Digest;
    let body_sha = hex::encode(sha2::Sha256::digest(get(&w.bucket, MANIFEST)));
    assert_eq!(head(&w.bucket, MANIFEST).unwrap()["sha256"], body_sha);
    let files = m["files"].as_array().unwrap();
    assert_eq!(files.len(), 4);
    for f in files {
        let key = f["key"].as_str().unwrap();
        let meta = head(&w.bucket, key).expect("the file is there");
        assert_eq!(meta["sha256"], f["sha256"].as_str().unwrap(), "{key}");
        assert!(f["schema_fingerprint"].as_str().unwrap().len() == 64);
        assert!(!f["columns"].as_array().unwrap().is_empty());
    }
    // Written after every file, each upload read back before it.
    let log = proxy.requests();
    let put = |key: &str| {
        log.iter()
            .rposition(|(m, t, _)| m == "PUT" && t.contains(key))
            .unwrap_or_else(|| panic!("no PUT of {key}: {log:?}"))
    };
    let manifest_put = put("_manifest.json");
    for f in files {
        let key = f["key"].as_str().unwrap();
        let at = put(key);
        assert!(at < manifest_put, "{key} after the manifest: {log:?}");
        assert!(
            log[at + 1].0 == "HEAD" && log[at + 1].1.contains(key),
            "the upload of {key} is read back: {log:?}"
        );
    }
    assert!(first.manifest.as_deref().unwrap().starts_with("written"));

    proxy.clear_log();
    let again = w.run("WV");
    assert_eq!(again.status, RunStatus::Success, "{:?}", again.error);
    assert_eq!(again.uploaded, 0);
    assert!(again.manifest.as_deref().unwrap().starts_with("unchanged"));
    assert_eq!(manifest(&w)["run_id"], first.run_id.as_str(), "untouched");
    assert!(
        !proxy.requests().iter().any(|(m, _, _)| m == "PUT"),
        "{:?}",
        proxy.requests()
    );
}

#[test]
fn a_first_run_into_an_empty_bucket_costs_one_head_per_key() {
    needs_services!();
    let (w, proxy) = world_behind_proxy("onehead");
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let log = proxy.requests();
    let before_put: Vec<_> = log
        .iter()
        .take_while(|(m, t, _)| !(m == "PUT" && t.contains(PEOPLE_GOOD)))
        .filter(|(m, t, _)| m == "HEAD" && t.contains(PEOPLE_GOOD))
        .collect();
    assert_eq!(
        before_put.len(),
        1,
        "one HEAD, answered 404, no retry: {log:?}"
    );
    assert_eq!(before_put[0].2, 404);
}

#[test]
fn a_403_fails_at_once_and_a_half_published_run_leaves_the_previous_manifest() {
    needs_services!();
    let (w, proxy) = world_behind_proxy("halfway");
    let first = w.run("WV");
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    // New data: every file changes; the people files are refused.
    add_company(&mut w.pg(), "c9", Some("Z"), Some("z.example"), "WV");
    add_person(&mut w.pg(), "p9", "c9", Some("z@b.example"), Some("CTO"));
    proxy.fail("PUT", "people/good", 10, 403, "AccessDenied");
    proxy.clear_log();
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(e.contains("HTTP 403 AccessDenied"), "{e}");
    let puts = proxy
        .requests()
        .iter()
        .filter(|(m, t, _)| m == "PUT" && t.contains("people/good"))
        .count();
    assert_eq!(puts, 1, "a 403 is not retried");
    assert!(r.uploaded >= 1, "some files went up before the failure");
    let m = manifest(&w);
    assert_eq!(
        m["run_id"],
        first.run_id.as_str(),
        "the previous manifest stays"
    );
    // ... so a reader sees that the bucket's files are not all of that run.
    let companies_good = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["table_name"] == "companies_good")
        .unwrap();
    let now = head(&w.bucket, companies_good["key"].as_str().unwrap()).unwrap();
    assert_ne!(now["sha256"], companies_good["sha256"].as_str().unwrap());
}

#[test]
fn transient_500s_are_retried_until_the_upload_goes_through() {
    needs_services!();
    let (mut w, proxy) = world_behind_proxy("retry500");
    w.config.retry.attempts = 4;
    proxy.fail("PUT", "people/good", 2, 500, "InternalError");
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let puts: Vec<u16> = proxy
        .requests()
        .iter()
        .filter(|(m, t, _)| m == "PUT" && t.contains("people/good"))
        .map(|r| r.2)
        .collect();
    assert_eq!(puts, [500, 500, 200], "two failures, then the upload");
    assert!(head(&w.bucket, PEOPLE_GOOD).is_some());
}

#[test]
fn a_503_slow_down_waits_as_long_as_retry_after_says() {
    needs_services!();
    let (mut w, proxy) = world_behind_proxy("slowdown");
    // Our own backoff would come back within 0.1 s; the server asks for 2.
    w.config.retry.attempts = 3;
    proxy.slow_down("PUT", "people/good", 1, 2);
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    let puts: Vec<_> = proxy
        .timed_requests()
        .into_iter()
        .filter(|(_, (m, t, _))| m == "PUT" && t.contains("people/good"))
        .collect();
    let statuses: Vec<u16> = puts.iter().map(|(_, r)| r.2).collect();
    assert_eq!(statuses, [503, 200], "one SlowDown, then the upload");
    let waited = puts[1].0 - puts[0].0;
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "the next try came {waited:?} after the SlowDown"
    );
    assert!(head(&w.bucket, PEOPLE_GOOD).is_some());
}

#[test]
fn a_dropped_column_is_reported_and_gated_with_schema_change() {
    needs_services!();
    let (mut w, _proxy) = world_behind_proxy("drift");
    let first = w.run("WV");
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    w.pg()
        .batch_execute("ALTER TABLE marketing.company_master DROP COLUMN company_phone")
        .unwrap();
    let reported = w.run("WV");
    assert_eq!(reported.status, RunStatus::Success, "{:?}", reported.error);
    let change = reported
        .schema_changes
        .iter()
        .find(|c| c.table_name == "companies_good")
        .expect("the change is reported");
    assert_eq!(change.removed, ["company_phone"]);
    assert!(reported
        .summary()
        .contains("schema changed: companies_good: removed company_phone"));
    let audit = audit_details(&w, reported.audit_id.unwrap());
    assert_eq!(audit["schema_changes"][0]["removed"][0], "company_phone");

    // With the gate on, the next change stops the run before publishing.
    w.set_config_extra("[gates]\nschema_change = true\n");
    w.config.storage.endpoint = _proxy.endpoint.clone();
    w.pg()
        .batch_execute("ALTER TABLE marketing.company_master ADD COLUMN rating INTEGER")
        .unwrap();
    let gated = w.run_with(
        "WV",
        &RunOptions {
            gates: w.config.gates,
            ..Default::default()
        },
    );
    assert_eq!(gated.status, RunStatus::Gated, "{:?}", gated.error);
    assert!(gated.error.unwrap().contains("schema_change"));
    assert_eq!(manifest(&w)["run_id"], reported.run_id.as_str());
}

/// People whose file is well over two 5 MiB parts: a 4 KB random bio each.
fn big_people(w: &World) {
    w.pg()
        .batch_execute(
            "INSERT INTO marketing.people_master (unique_id, company_unique_id, company_slot_unique_id,
                 first_name, last_name, email, title, bio, source_system, promoted_from_intake_at)
             SELECT 'big' || i, 'c0', 'slot', 'Ana', 'Smith', 'a' || i || '@b.example', 'CEO',
                    (SELECT string_agg(md5(random()::text || i || j), '') FROM generate_series(1, 128) j),
                    'test', '2025-01-01 00:00:00+00'
             FROM generate_series(1, 8000) i",
        )
        .unwrap();
}

/// Unfinished multipart uploads s3s-fs holds for `bucket` (it keeps one
/// metadata file per upload until it is completed or aborted).
fn unfinished_uploads(bucket: &str) -> Vec<String> {
    use base64::Engine;
    let root = std::env::var("OW_S3_ROOT").unwrap();
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bucket);
    std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!(".bucket-{b}.")) && n.contains(".upload-"))
        .collect()
}

#[test]
fn a_multipart_upload_cut_mid_way_is_aborted_and_the_bucket_keeps_the_last_run() {
    needs_services!();
    let (mut w, proxy) = world_behind_proxy("cutpart");
    w.config.storage.part_size_mib = 5;
    let first = w.run("WV");
    assert_eq!(first.status, RunStatus::Success, "{:?}", first.error);
    let before = head(&w.bucket, PEOPLE_GOOD).unwrap()["sha256"].clone();
    big_people(&w);
    // Every try of the second part loses its connection.
    proxy.fail("PUT", "partNumber=2", 100, 0, "");
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(
        e.contains("people_good.parquet") && e.contains("uploading part 2"),
        "{e}"
    );
    assert_eq!(head(&w.bucket, PEOPLE_GOOD).unwrap()["sha256"], before);
    assert_eq!(
        manifest(&w)["run_id"],
        first.run_id.as_str(),
        "manifest unchanged"
    );
    assert!(
        unfinished_uploads(&w.bucket).is_empty(),
        "aborted: {:?}",
        unfinished_uploads(&w.bucket)
    );
}

/// The cut that fails a part often lasts: the abort is tried again like
/// any transient request, not sent once and left for the next run.
#[test]
fn the_abort_of_a_cut_multipart_upload_is_tried_again() {
    needs_services!();
    let (mut w, proxy) = world_behind_proxy("abortretry");
    w.config.storage.part_size_mib = 5;
    big_people(&w);
    proxy.fail("PUT", "partNumber=2", 100, 0, "");
    // The first abort loses its connection too; the second goes through.
    proxy.fail("DELETE", "uploadId=", 1, 0, "");
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    let deletes = proxy
        .requests()
        .iter()
        .filter(|(m, t, _)| m == "DELETE" && t.contains("uploadId="))
        .count();
    assert!(deletes >= 2, "{:?}", proxy.requests());
    assert!(
        unfinished_uploads(&w.bucket).is_empty(),
        "left open: {:?}",
        unfinished_uploads(&w.bucket)
    );
}

#[test]
fn an_upload_that_could_not_be_aborted_is_aborted_by_the_next_run() {
    needs_services!();
    let (mut w, proxy) = world_behind_proxy("leftover");
    w.config.storage.part_size_mib = 5;
    big_people(&w);
    proxy.fail("PUT", "partNumber=2", 100, 0, "");
    proxy.fail("DELETE", "uploadId=", 100, 0, "");
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(
        unfinished_uploads(&w.bucket).len(),
        w.config.retry.attempts as usize,
        "one upload a try, and each abort was cut too"
    );

    // The network is back: the next run aborts it before it uploads.
    let proxy2 = FaultProxy::start();
    w.config.storage.endpoint = proxy2.endpoint.clone();
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert!(
        unfinished_uploads(&w.bucket).is_empty(),
        "{:?}",
        unfinished_uploads(&w.bucket)
    );
    assert!(
        proxy2.requests()[0].0 == "DELETE"
            || proxy2
                .requests()
                .iter()
                .any(|(m, t, _)| m == "DELETE" && t.contains("uploadId="))
    );
    let got = head(&w.bucket, PEOPLE_GOOD).unwrap();
    assert_eq!(
        got["sha256"],
        manifest(&w)["files"][2]["sha256"].as_str().unwrap()
    );
}

/// s3s-fs cannot list multipart uploads, so the proxy answers the listing
/// with two real uploads begun on s3s-fs: one two days old, one an hour old.
#[test]
fn a_run_aborts_multipart_uploads_left_unfinished_for_over_a_day_and_says_so() {
    needs_services!();
    let (w, proxy) = world_behind_proxy("stale");
    let s = services();
    let direct = s3_bucket(&s, &w.bucket);
    let begin = |key: &str| {
        rt().block_on(direct.initiate_multipart_upload(key, "application/octet-stream"))
            .unwrap()
            .upload_id
    };
    let (old_key, new_key) = (
        "outreach/wv/people/good/old.parquet",
        "outreach/wv/people/good/new.parquet",
    );
    let (old_id, new_id) = (begin(old_key), begin(new_key));
    assert_eq!(unfinished_uploads(&w.bucket).len(), 2);
    let at = |hours: i64| {
        (chrono::Utc::now() - chrono::Duration::hours(hours))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let listing = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult><Bucket>{}</Bucket>\
         <Upload><Key>{old_key}</Key><UploadId>{old_id}</UploadId><Initiated>{}</Initiated></Upload>\
         <Upload><Key>{new_key}</Key><UploadId>{new_id}</UploadId><Initiated>{}</Initiated></Upload>\
         <IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        w.bucket,
        at(48),
        at(1)
    );
    proxy.answer("GET", "?uploads", 1, 200, &listing);
    let r = w.run("WV");
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert!(
        proxy.requests().iter().any(|(m, t, _)| m == "GET"
            && t.contains("uploads")
            && t.contains("prefix=outreach%2Fwv%2F")),
        "listed under the state's prefix: {:?}",
        proxy.requests()
    );
    assert_eq!(
        r.stale_uploads_aborted.len(),
        1,
        "{:?}",
        r.stale_uploads_aborted
    );
    assert!(
        r.stale_uploads_aborted[0].contains(old_key),
        "{:?}",
        r.stale_uploads_aborted
    );
    assert!(r.summary().contains(old_key), "{}", r.summary());
    let left = unfinished_uploads(&w.bucket);
    assert_eq!(left.len(), 1, "the hour-old upload is left alone: {left:?}");
}
