//! What an operator meets on a packaged host: where secrets come from, a
//! secret missing or in the wrong place, commands typed as root.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// `check` against the real bucket with the storage key in several places
/// at once, the right value only in the one that must win.
#[test]
fn each_secret_comes_from_a_credential_then_a_file_then_the_environment() {
    needs_services!();
    let w = World::new("secrets");
    let s = services();
    let cfg = w.write_config_file();
    let dir = w.dir.path();
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    let wrong_file = dir.join("wrong");
    std::fs::write(&wrong_file, "wrong-from-file\n").unwrap();
    let right_file = dir.join("right");
    std::fs::write(&right_file, format!("{}\n", s.s3_secret)).unwrap();
    // The unit loads its folder as ow_<NAME>; a credential loaded by hand
    // (LoadCredentialEncrypted=NAME:…) has the bare name.
    std::fs::write(
        creds.join("ow_B2_APPLICATION_KEY"),
        format!("{}\n", s.s3_secret),
    )
    .unwrap();
    std::fs::write(creds.join("B2_KEY_ID"), &s.s3_key).unwrap();
    std::fs::write(creds.join("ow_NEON_PASSWORD"), &s.pg_password).unwrap();

    let check = |set: &dyn Fn(&mut std::process::Command)| {
        let mut c = bin();
        c.args(["check", "--config"])
            .arg(&cfg)
            .env("B2_BUCKET", &w.bucket);
        set(&mut c);
        c.output().unwrap()
    };
    let says_ok = |o: &std::process::Output, origin: &str| {
        let out = text(o);
        assert_eq!(o.status.code(), Some(0), "{out}");
        assert!(
            out.contains(&format!("secret: B2_APPLICATION_KEY from {origin}")),
            "{out}"
        );
        assert!(
            !out.contains(&s.s3_secret) && !out.contains("wrong-from"),
            "{out}"
        );
    };

    let o = check(&|c| {
        c.env("CREDENTIALS_DIRECTORY", &creds)
            .env("B2_APPLICATION_KEY_FILE", &wrong_file)
            .env("B2_APPLICATION_KEY", "wrong-from-env");
    });
    says_ok(
        &o,
        &format!(
            "systemd credential {}",
            creds.join("ow_B2_APPLICATION_KEY").display()
        ),
    );
    let out = text(&o);
    assert!(
        out.contains("secret: B2_KEY_ID from systemd credential"),
        "{out}"
    );
    assert!(
        out.contains("secret: NEON_PASSWORD from systemd credential"),
        "{out}"
    );

    let o = check(&|c| {
        c.env("NEON_PASSWORD", &s.pg_password)
            .env("B2_KEY_ID", &s.s3_key)
            .env("B2_APPLICATION_KEY_FILE", &right_file)
            .env("B2_APPLICATION_KEY", "wrong-from-env");
    });
    says_ok(&o, &format!("file {}", right_file.display()));

    let o = check(&|c| {
        c.env("NEON_PASSWORD", &s.pg_password)
            .env("B2_KEY_ID", &s.s3_key)
            .env("B2_APPLICATION_KEY", &s.s3_secret);
    });
    says_ok(&o, "environment variable B2_APPLICATION_KEY");

    // The winning place with the wrong value: the bucket refuses it, so
    // the value really came from there.
    let o = check(&|c| {
        c.env("NEON_PASSWORD", &s.pg_password)
            .env("B2_KEY_ID", &s.s3_key)
            .env("B2_APPLICATION_KEY_FILE", &wrong_file)
            .env("B2_APPLICATION_KEY", &s.s3_secret);
    });
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // A file named but missing: refused, naming the variable and the file.
    let o = check(&|c| {
        c.env("B2_APPLICATION_KEY_FILE", dir.join("nowhere"));
    });
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("B2_APPLICATION_KEY_FILE") && out.contains("nowhere"),
        "{out}"
    );
}

#[test]
fn a_secret_in_the_config_file_is_refused_by_check_and_only_warned_by_the_daemon() {
    needs_services!();
    let w = World::new("tomlsecret");
    let s = services();
    let cfg = w.write_config_file_with("[[schedule]]\nstates = [\"WV\"]\ncron = \"0 0 1 1 *\"\n");
    let text_of = std::fs::read_to_string(&cfg).unwrap().replace(
        "sslmode = \"disable\"",
        &format!("sslmode = \"disable\"\npassword = \"{}\"", s.pg_password),
    );
    std::fs::write(&cfg, text_of).unwrap();

    let o = bin_with_secrets()
        .env_remove("NEON_PASSWORD")
        .args(["check", "--offline", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("problem: NEON_PASSWORD is written in the config file"),
        "{out}"
    );
    assert!(
        out.contains("secret: NEON_PASSWORD from the config file"),
        "{out}"
    );
    assert!(!out.contains(&s.pg_password), "{out}");

    // An existing install keeps running: the daemon starts, with a warning.
    let mut daemon = bin_with_secrets()
        .env_remove("NEON_PASSWORD")
        .args(["daemon", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(daemon.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let warned = loop {
        match lines.next() {
            Some(Ok(line)) => {
                let hit = line.contains("NEON_PASSWORD is written in");
                seen.push(line);
                if hit {
                    break true;
                }
            }
            _ => break false,
        }
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(warned, "{}", seen.join("\n"));
    assert!(!seen.join("\n").contains(&s.pg_password));
}

#[test]
fn a_daemon_without_its_storage_secrets_exits_4_saying_which() {
    needs_services!();
    let w = World::new("nosecret");
    let cfg = w.write_config_file();
    let mut daemon = bin()
        .args(["daemon", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the daemon to exit",
        Duration::from_secs(60),
        String::new,
        || daemon.try_wait().unwrap().map(|_| ()),
    );
    let o = daemon.wait_with_output().unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(4), "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(
        errors[0].contains("B2_KEY_ID and B2_APPLICATION_KEY"),
        "{out}"
    );
}

/// Root typing `run` on a host whose workbench is the service user's runs
/// as that user: no file in the workbench ends up root's.
#[test]
fn root_runs_a_state_as_the_owner_of_the_workbench() {
    needs_services!();
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: not root, so nothing to switch from");
        return;
    }
    let w = World::new("asowner");
    let mut pg = w.pg();
    add_company(&mut pg, "c1", Some("A"), Some("a.example"), "WV");
    add_person(&mut pg, "p1", "c1", Some("x@a.example"), Some("CEO"));
    // The test's own folder is 0700 root's: let `nobody` through to the
    // workbench inside it.
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bench = w.dir.path().join("bench");
    std::fs::create_dir(&bench).unwrap();
    let nobody = 65534;
    std::os::unix::fs::chown(&bench, Some(nobody), Some(nobody)).unwrap();
    let cfg = w.write_config_file();
    let o = bin_with_secrets()
        .args(["run", "--state", "WV", "--config"])
        .arg(&cfg)
        .env("B2_BUCKET", &w.bucket)
        .env("OUTREACH_WORKBENCH__DIR", &bench)
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("note: running as"), "{out}");
    let mut owned_by_others = Vec::new();
    let mut files = 0;
    walk(&bench, &mut |p| {
        files += 1;
        let uid = std::fs::symlink_metadata(p).unwrap().uid();
        if uid != nobody {
            owned_by_others.push(format!("{} uid {uid}", p.display()));
        }
    });
    assert!(files > 4, "the run wrote its files there");
    assert!(owned_by_others.is_empty(), "{owned_by_others:#?}");
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        f(&p);
        if p.is_dir() && !p.is_symlink() {
            walk(&p, f);
        }
    }
}

#[test]
fn the_one_off_units_instance_names_a_state_or_all_and_may_force() {
    needs_services!();
    let w = World::new("instance");
    let cfg = w.write_config_file();
    for (instance, says) in [("XX", "not a US state"), ("WV:now", "is not `force`")] {
        let o = bin()
            .args(["run", "--instance", instance, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(says), "{}", text(&o));
    }
    // `@all:force` (dry here): every state, from one read.
    add_company(&mut w.pg(), "c1", Some("A"), Some("a.example"), "WV");
    let o = bin_with_secrets()
        .args(["run", "--dry-run", "--instance", "all:force", "--config"])
        .arg(&cfg)
        .env("B2_BUCKET", &w.bucket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("all-states run"), "{}", text(&o));
    assert!(text(&o).contains("WV success"), "{}", text(&o));
}

/// `status` and `history` read every host's runs from PostgreSQL: a second
/// host (another workbench) prints the same; without PostgreSQL, this
/// host's own runs, saying so. The exit code follows the worst last run.
#[test]
fn status_shows_every_hosts_last_runs_and_exits_by_the_worst() {
    needs_services!();
    let w = World::new("status");
    let mut pg = w.pg();
    for (state, bad) in [("WV", false), ("OH", true), ("PA", false)] {
        let id = format!("c-{state}");
        let name = (!bad).then_some("A");
        add_company(&mut pg, &id, name, Some("a.example"), state);
        add_person(
            &mut pg,
            &format!("p-{state}"),
            &id,
            Some("x@a.example"),
            Some("CEO"),
        );
    }
    let cfg = w.write_config_file_with(
        "[gates]\nmax_bad_ratio = 0.5\n[[schedule]]\nstates = [\"WV\", \"OH\", \"PA\"]\ncron = \"0 6 * * *\"\n",
    );
    let other = w.dir.path().join("other-host");
    let cmd = |args: &[&str], bench: Option<&Path>| {
        let mut c = bin_with_secrets();
        c.args(args)
            .arg("--config")
            .arg(&cfg)
            .env("B2_BUCKET", &w.bucket);
        if let Some(b) = bench {
            c.env("OUTREACH_WORKBENCH__DIR", b);
        }
        c.output().unwrap()
    };
    let status_json = |bench: Option<&Path>| {
        let o = cmd(&["status", "--json"], bench);
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        (o.status.code(), v)
    };

    assert_eq!(cmd(&["run", "--state", "WV"], None).status.code(), Some(0));
    let (code, v) = status_json(None);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["source"], "postgresql", "{v:#}");
    let wv = &v["states"][2];
    assert_eq!(wv["state"], "WV", "{v:#}");
    assert_eq!(wv["last_run"]["status"], "success", "{v:#}");
    assert_eq!(wv["last_run"]["rows"], 2, "{v:#}");
    assert_eq!(wv["last_run"]["uploaded"], 4, "{v:#}");
    assert!(
        wv["last_run"]["host"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "{v:#}"
    );
    assert!(wv["next_fire"].as_str().is_some(), "{v:#}");
    assert_eq!(
        v["states"][0]["last_run"],
        serde_json::Value::Null,
        "OH never ran: {v:#}"
    );

    assert_eq!(cmd(&["run", "--state", "OH"], None).status.code(), Some(3));
    let (code, v) = status_json(None);
    assert_eq!(code, Some(3), "a gated last run: {v:#}");
    assert_eq!(v["states"][0]["last_run"]["status"], "gated", "{v:#}");

    // A bucket that does not exist: the run fails, and is audited.
    let o = bin_with_secrets()
        .args(["run", "--state", "PA", "--config"])
        .arg(&cfg)
        .env("B2_BUCKET", "no-such-bucket")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (code, here) = status_json(None);
    assert_eq!(code, Some(1), "a failed last run: {here:#}");
    assert_eq!(
        here["states"][1]["last_run"]["status"], "failed",
        "{here:#}"
    );

    // Another host: the same runs.
    let (code, there) = status_json(Some(&other));
    assert_eq!(code, Some(1));
    assert_eq!(here["states"], there["states"]);
    let o = cmd(&["history", "--status", "gated", "--json"], Some(&other));
    let runs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let states: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["OH"], "{}", text(&o));
    let host = here["host"].as_str().unwrap();
    let o = cmd(
        &["history", "--host", host, "--since", "2026-01-01", "--json"],
        Some(&other),
    );
    let runs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 3, "{}", text(&o));
    let o = cmd(
        &["history", "--host", "another-host", "--json"],
        Some(&other),
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "[]",
        "{}",
        text(&o)
    );

    // No PostgreSQL: this host's workbench, and it says so.
    let o = bin_with_secrets()
        .args(["status", "--json", "--config"])
        .arg(&cfg)
        .env("OUTREACH_SOURCE__PORT", "1")
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(v["source"], "workbench", "{v:#}");
    assert!(v["postgres_error"].as_str().is_some(), "{v:#}");
    assert_eq!(v["states"][2]["last_run"]["status"], "success", "{v:#}");
    let o = bin_with_secrets()
        .args(["history", "--config"])
        .arg(&cfg)
        .env("OUTREACH_SOURCE__PORT", "1")
        .output()
        .unwrap();
    assert!(
        text(&o).contains("this host's workbench only"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("WV"),
        "{}",
        text(&o)
    );
}
