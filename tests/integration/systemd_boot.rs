//! The package under a real systemd 252: Debian 12 booted in systemd-nspawn
//! (a throw-away copy of the root `scripts/test.sh` builds once per
//! machine), the `.deb` installed, the service driven with systemctl
//! through nsenter. The container shares the host's network, so the
//! daemon reaches the suite's PostgreSQL and S3 server on loopback.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const UNIT: &str = "outreach-workbench";

/// An address the shipped `email_invalid` rule catches (no dot after @).
const BAD_EMAIL: &str = "jane.doe@nodot";

/// A booted container; powered off (and its copy removed) on drop.
struct Container {
    nspawn: Child,
    pid1: u32,
}

impl Container {
    fn boot(root: &str, share: &Path) -> Container {
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--ephemeral", "--keep-unit", "--register=no"])
            .arg("--directory")
            .arg(root)
            .arg(format!("--bind-ro={}:/mnt/ow", share.display()))
            .args(["--boot", "--console=pipe"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn starts");
        let pid1 = wait_until(
            "systemd in the container",
            Duration::from_secs(60),
            String::new,
            || systemd_child(nspawn.id()),
        );
        let c = Container { nspawn, pid1 };
        // `--wait` blocks until start-up is done ("running" or
        // "degraded"), once systemd's socket is there to ask.
        let booted = || {
            let o = c.sh("systemctl is-system-running --wait");
            let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            (state == "running" || state == "degraded").then_some(())
        };
        let said = || text(&c.sh("systemctl is-system-running"));
        wait_until(
            "the container to finish booting",
            Duration::from_secs(120),
            said,
            booted,
        );
        c
    }

    /// `sh -c cmd` inside the container.
    fn sh(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a", "sh", "-c", cmd])
            .output()
            .unwrap()
    }

    /// Like `sh`, and the command must succeed.
    fn ok(&self, cmd: &str) -> String {
        let o = self.sh(cmd);
        assert!(o.status.success(), "`{cmd}` failed:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn show(&self, property: &str) -> String {
        self.ok(&format!("systemctl show {UNIT} --value -p {property}"))
    }

    /// Waits up to `secs` for `property` to read `want`.
    fn wait_for(&self, property: &str, want: &str, secs: u64) {
        let context = || format!("{property} is {}\n{}", self.show(property), self.journal());
        wait_until(
            &format!("{property}={want}"),
            Duration::from_secs(secs),
            context,
            || (self.show(property) == want).then_some(()),
        )
    }

    fn journal(&self) -> String {
        self.ok(&format!(
            "journalctl -u {UNIT} --no-pager -o cat | tail -40"
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The container's PID 1 as the host sees it: the child of systemd-nspawn
/// that runs systemd (a short-lived helper comes first).
fn systemd_child(nspawn: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "systemd").then(|| pid.parse().ok())?
    })
}

/// Successful runs audited so far.
fn successes(w: &World) -> i64 {
    w.pg()
        .query_one(
            "SELECT count(*) FROM shq.audit_log WHERE details->>'status' = 'success'",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(0) // before the first run creates the table
}

fn wait_for_success(w: &World, more_than: i64, c: &Container) {
    wait_until(
        "a successful run",
        Duration::from_secs(60),
        || c.journal(),
        || (successes(w) > more_than).then_some(()),
    );
}

#[test]
fn the_package_under_systemd_starts_reloads_stops_restarts_and_upgrades() {
    needs_services!();
    let Ok(root) = std::env::var("OW_NSPAWN_ROOT") else {
        eprintln!("skipped: OW_NSPAWN_ROOT is not set (scripts/test.sh builds the Debian root when it can; it says why not)");
        return;
    };
    let s = services();
    let w = World::new("boot");
    {
        let mut pg = w.pg();
        for i in 0..5 {
            let id = format!("c{i}");
            add_company(&mut pg, &id, Some("A"), Some("a.example"), "WV");
            add_person(
                &mut pg,
                &format!("p{i}"),
                &id,
                Some("a@b.example"),
                Some("CEO"),
            );
        }
        // One address the shipped rules find invalid: the host's page
        // shows it as a sample, the bucket's page must not.
        add_person(&mut pg, "p-bad", "c0", Some(BAD_EMAIL), Some("CEO"));
    }

    // What the container sees at /mnt/ow: the package and the admin's files.
    let share = tempfile::tempdir().unwrap();
    let deb = crate::packaging::build_deb(share.path());
    std::fs::rename(&deb, share.path().join("ow.deb")).unwrap();
    let config = toml_for(
        &s,
        &w.db,
        &w.bucket,
        Path::new("/var/lib/outreach-workbench"),
    );
    // Every 5 seconds: runs happen while the service is reloaded and killed.
    let schedule = "[[schedule]]\nstates = [\"WV\"]\ncron = \"*/5 * * * * *\"\n";
    let write = |name: &str, body: &str| std::fs::write(share.path().join(name), body).unwrap();
    write("config.toml", &format!("{config}\n{schedule}"));
    // A key given twice: not TOML.
    write(
        "broken.toml",
        &format!("{config}\n{schedule}cron = \"again\"\n"),
    );
    write(
        "broken-rule.toml",
        &format!("{config}\n{schedule}\n[rules]\ncompanies = [{{ code = \"x\", condition = \"no_such_column IS NULL\" }}]\n"),
    );
    // The shipped config, with this suite's servers and a schedule of
    // its own: its gates and report settings as they ship.
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .unwrap()
        .replace("host = \"localhost\"", &format!("host = \"{}\"", s.pg_host))
        .replace("port = 5432", &format!("port = {}", s.source_port))
        .replace(
            "database = \"marketing\"",
            &format!("database = \"{}\"", w.db),
        )
        .replace("user = \"outreach\"", &format!("user = \"{}\"", s.pg_user))
        .replace("sslmode = \"verify-full\"", "sslmode = \"disable\"")
        .replace("https://s3.us-east-003.backblazeb2.com", &s.s3_endpoint)
        .replace(
            "bucket = \"CHANGE-ME\"",
            &format!("bucket = \"{}\"", w.bucket),
        )
        .replace("path_style = false", "path_style = true")
        .replace("cron = \"0 6 * * *\"", "cron = \"0 0 1 1 *\"");
    write("shipped.toml", &shipped);
    for (name, value) in [
        ("NEON_PASSWORD", &s.pg_password),
        ("B2_KEY_ID", &s.s3_key),
        ("B2_APPLICATION_KEY", &s.s3_secret),
    ] {
        write(name, &format!("{value}\n"));
    }

    let c = Container::boot(&root, share.path());
    assert!(c.ok("systemctl --version").starts_with("systemd 252"));

    // Install: enabled, no warning, one log folder.
    let installed = c.ok("dpkg -i /mnt/ow/ow.deb 2>&1");
    assert!(!installed.contains("arning"), "{installed}");
    assert_eq!(c.ok(&format!("systemctl is-enabled {UNIT}")), "enabled");
    assert_eq!(
        c.ok("readlink /var/lib/outreach-workbench/logs"),
        "/var/log/outreach-workbench"
    );
    // Secrets go where the shipped unit loads them; the config first
    // names no secret, and a secret not there yet stops the service with
    // one clear line, not a restart loop.
    c.ok("cp /mnt/ow/config.toml /etc/outreach-workbench/");
    let start = c.sh(&format!("systemctl start {UNIT}"));
    assert!(!start.status.success(), "{}", text(&start));
    c.wait_for("ActiveState", "failed", 30);
    assert_eq!(c.show("SubState"), "failed");
    assert_eq!(c.show("ExecMainStatus"), "4");
    assert!(
        c.journal().contains("B2_KEY_ID and B2_APPLICATION_KEY"),
        "{}",
        c.journal()
    );
    c.ok(&format!("systemctl reset-failed {UNIT}"));
    c.ok("for n in NEON_PASSWORD B2_KEY_ID B2_APPLICATION_KEY; do install -m 0600 /mnt/ow/$n /etc/outreach-workbench/credentials/; done");

    // Start returns once the daemon said READY=1 (Type=notify): the
    // status line it sends with READY is already there.
    c.ok(&format!("systemctl start {UNIT}"));
    assert_eq!(c.show("ActiveState"), "active");
    assert!(
        c.show("StatusText").starts_with("next WV"),
        "{}",
        c.show("StatusText")
    );
    let exposure = c.ok(&format!(
        "systemd-analyze security {UNIT} --no-pager | tail -n 1"
    ));
    let score: f64 = exposure
        .split(':')
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {exposure}"));
    assert!(score <= 2.0, "{exposure}");
    // Secrets are credentials: not in the unit's environment, nor the
    // daemon's.
    let environ = c.ok(&format!(
        "tr '\\0' '\\n' < /proc/{}/environ",
        c.show("MainPID")
    ));
    let environment = c.show("Environment");
    for secret in [&s.pg_password, &s.s3_secret, &s.s3_key] {
        assert!(!environ.contains(secret.as_str()), "{environ}");
        assert!(!environment.contains(secret.as_str()), "{environment}");
    }
    assert!(environ.contains("CREDENTIALS_DIRECTORY="), "{environ}");

    // A run under the sandbox uploads and is audited.
    wait_for_success(&w, 0, &c);
    // The service names its host in the ledger, though /proc/sys is hidden
    // from it (ProcSubset=pid).
    let hosts: Vec<String> = w
        .pg()
        .query("SELECT DISTINCT host FROM shq.outreach_fire_claims", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hosts, ["ow-boot"]);
    assert!(head(&w.bucket, "outreach/wv/_manifest.json").is_some());
    // The status line is set when the run has ended, which is after its
    // audit row (the run's page, history and catalog come between).
    wait_until(
        "the status line naming the success",
        Duration::from_secs(30),
        || format!("{}\n{}", c.show("StatusText"), c.journal()),
        || {
            c.show("StatusText")
                .contains("last WV success")
                .then_some(())
        },
    );
    assert!(
        !c.ok("ls /var/log/outreach-workbench/").is_empty(),
        "the daemon's log file is in the one log folder"
    );

    // Reload: a good config is taken, a broken one fails the reload and the
    // running daemon goes on with the old one. procps is not installed.
    assert!(!c
        .sh("test -x /bin/kill || test -x /usr/bin/kill")
        .status
        .success());
    let pid = c.show("MainPID");
    c.ok(&format!("systemctl reload {UNIT}"));
    c.ok("cp /mnt/ow/broken.toml /etc/outreach-workbench/config.toml");
    let refused = c.sh(&format!("systemctl reload {UNIT}"));
    assert!(
        !refused.status.success(),
        "a broken config reloads: {}",
        text(&refused)
    );
    assert_eq!(c.show("ActiveState"), "active");
    assert_eq!(c.show("MainPID"), pid);
    c.ok("cp /mnt/ow/config.toml /etc/outreach-workbench/config.toml");

    // kill -9: systemd starts it again (RestartSec=10s).
    c.ok(&format!("systemctl kill -s KILL {UNIT}"));
    c.wait_for("NRestarts", "1", 30);
    c.wait_for("ActiveState", "active", 30);
    let before = successes(&w);
    wait_for_success(&w, before, &c);

    // Stop: SIGTERM, and out well within TimeoutStopSec.
    let started = Instant::now();
    c.ok(&format!("systemctl stop {UNIT}"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(c.show("Result"), "success");
    assert_eq!(c.show("ActiveState"), "inactive");

    // A rule naming a missing column: exit 2, failed, no restart loop.
    c.ok("cp /mnt/ow/broken-rule.toml /etc/outreach-workbench/config.toml");
    c.ok(&format!("systemctl reset-failed {UNIT} || true"));
    let start = c.sh(&format!("systemctl start {UNIT}"));
    assert!(!start.status.success(), "{}", text(&start));
    c.wait_for("ActiveState", "failed", 30);
    // `auto-restart` would mean another try is scheduled.
    assert_eq!(c.show("SubState"), "failed");
    assert_eq!(c.show("ExecMainStatus"), "2");
    assert!(c.journal().contains("no_such_column"), "{}", c.journal());

    // The operator's day, with the shipped config: a one-off run as the
    // service, audited; a run typed as root leaves no file of root's;
    // every host's status says the same.
    c.ok("cp /mnt/ow/shipped.toml /etc/outreach-workbench/config.toml");
    c.ok(&format!("systemctl reset-failed {UNIT} || true"));
    c.ok(&format!("systemctl start {UNIT}"));
    let before = successes(&w);
    c.ok("systemctl start outreach-workbench-run@WV");
    assert_eq!(successes(&w), before + 1);
    let one_off = c.ok("journalctl -u outreach-workbench-run@WV --no-pager -o cat");
    assert!(one_off.contains("state WV: success"), "{one_off}");
    let page = get(&w.bucket, "outreach/wv/_report.html");
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains("email_invalid"), "the page names the rule");
    assert!(!page.contains(BAD_EMAIL), "an address in the bucket's page");
    let host_page = c.ok("cat /var/lib/outreach-workbench/reports/WV/latest.html");
    assert!(
        host_page.contains(BAD_EMAIL),
        "the host's page keeps its samples"
    );
    let as_root = c.ok("outreach-workbench run --state WV 2>&1");
    assert!(
        as_root.contains("running as outreach-workbench"),
        "{as_root}"
    );
    assert_eq!(
        c.ok("find /var/lib/outreach-workbench /var/log/outreach-workbench -user root"),
        ""
    );
    let status: serde_json::Value =
        serde_json::from_str(&c.ok("outreach-workbench status --json")).unwrap();
    assert_eq!(status["daemon_running"], true, "{status:#}");
    let here = bin_with_secrets()
        .args(["status", "--json", "--config"])
        .arg(share.path().join("shipped.toml"))
        .env("OUTREACH_WORKBENCH__DIR", share.path().join("host-bench"))
        .output()
        .unwrap();
    let here: serde_json::Value = serde_json::from_slice(&here.stdout).unwrap();
    assert_eq!(here["states"], status["states"]);
    assert_eq!(
        status["states"][0]["last_run"]["host"], "ow-boot",
        "{status:#}"
    );

    // The shipped gates stop an emptied source: the one-off unit fails
    // (exit 3), the bucket keeps the last good files.
    let manifest = get(&w.bucket, "outreach/wv/_manifest.json");
    w.pg()
        .batch_execute("DELETE FROM marketing.people_master; DELETE FROM marketing.company_master")
        .unwrap();
    let gated = c.sh("systemctl start outreach-workbench-run@WV");
    assert!(!gated.status.success(), "{}", text(&gated));
    assert_eq!(
        c.ok("systemctl show outreach-workbench-run@WV --value -p ExecMainStatus"),
        "3"
    );
    assert_eq!(get(&w.bucket, "outreach/wv/_manifest.json"), manifest);
    let forced = c.sh("systemctl start outreach-workbench-run@WV:force");
    assert!(forced.status.success(), "{}", text(&forced));
    assert_ne!(get(&w.bucket, "outreach/wv/_manifest.json"), manifest);
    c.ok(&format!("systemctl stop {UNIT}"));

    // An upgrade keeps the admin's "disabled", and a mode the admin set
    // with dpkg-statoverride.
    c.ok(&format!("systemctl disable {UNIT} 2>&1"));
    c.ok("dpkg-statoverride --update --add root outreach-workbench 0644 /etc/outreach-workbench/config.toml");
    c.ok("dpkg -i /mnt/ow/ow.deb");
    assert_eq!(
        c.ok("stat -c %a /etc/outreach-workbench/config.toml"),
        "644"
    );
    assert_eq!(
        String::from_utf8_lossy(&c.sh(&format!("systemctl is-enabled {UNIT}")).stdout).trim(),
        "disabled"
    );

    // The man page and completions are where man and the shells look.
    c.ok("test -f /usr/share/man/man1/outreach-workbench.1.gz");
    c.ok("test -f /usr/share/man/man1/outreach-workbench-run.1.gz");
    c.ok("test -f /usr/share/man/man5/outreach-workbench.toml.5.gz");
    c.ok("test -f /usr/share/doc/outreach-workbench/NEWS.Debian.gz");
    c.ok("test -f /lib/systemd/system/outreach-workbench-run@.service");
    c.ok("test -f /usr/share/bash-completion/completions/outreach-workbench");
    c.ok("test -f /usr/share/zsh/vendor-completions/_outreach-workbench");
    c.ok("test -f /usr/share/fish/vendor_completions.d/outreach-workbench.fish");

    // Remove stops a running service and systemd forgets the unit; the
    // admin's config stays until purge, which takes the rest.
    c.ok("cp /mnt/ow/config.toml /etc/outreach-workbench/config.toml");
    c.ok(&format!("systemctl reset-failed {UNIT} || true"));
    c.ok(&format!("systemctl start {UNIT}"));
    assert_eq!(c.show("ActiveState"), "active");
    c.ok("dpkg -r outreach-workbench");
    assert_eq!(c.show("ActiveState"), "inactive");
    assert_eq!(c.show("LoadState"), "not-found");
    c.ok("test -f /etc/outreach-workbench/config.toml");
    c.ok("dpkg --purge outreach-workbench");
    c.ok("! test -e /etc/outreach-workbench && ! test -e /var/lib/outreach-workbench");
    c.ok("! getent passwd outreach-workbench");
}
