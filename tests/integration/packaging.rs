//! The systemd unit and the Debian package, checked with the system's own
//! tools.

use std::path::Path;
use std::process::Command;

use crate::common::have;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_outreach-workbench");

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        eprintln!("skipped: systemd-analyze is not installed on this machine");
        return;
    }
    // verify checks that ExecStart's binary exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    for (file, name) in [
        ("outreach-workbench.service", "outreach-workbench.service"),
        (
            "outreach-workbench-run@.service",
            "outreach-workbench-run@WV.service",
        ),
    ] {
        let unit = std::fs::read_to_string(Path::new(ROOT).join("systemd").join(file))
            .unwrap()
            .replace("/usr/bin/outreach-workbench", BIN);
        std::fs::write(dir.path().join(file), unit).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {stderr}");
        // Unknown keys are only warnings, with exit code 0: none allowed.
        assert!(
            !stderr.contains("outreach-workbench"),
            "{name} warnings: {stderr}"
        );
    }
}

/// A one-off run is the daemon's run: the same user, sandbox, credentials
/// and config, line for line.
#[test]
fn the_one_off_unit_has_the_daemons_sandbox_and_credentials() {
    let read = |f: &str| std::fs::read_to_string(Path::new(ROOT).join("systemd").join(f)).unwrap();
    let settings = |unit: &str| -> Vec<String> {
        let service = unit.split("[Service]").nth(1).unwrap();
        let service = service.split("[Install]").next().unwrap();
        service
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| {
                let key = l.split('=').next().unwrap();
                !matches!(
                    key,
                    "Type"
                        | "NotifyAccess"
                        | "WatchdogSec"
                        | "ExecStart"
                        | "ExecReload"
                        | "Restart"
                        | "RestartSec"
                        | "RestartPreventExitStatus"
                        | "TimeoutStopSec"
                        | "TimeoutStartSec"
                )
            })
            .map(String::from)
            .collect()
    };
    let daemon = settings(&read("outreach-workbench.service"));
    let one_off = settings(&read("outreach-workbench-run@.service"));
    assert_eq!(daemon, one_off);
    assert!(daemon.iter().any(|l| l.starts_with("LoadCredential=")));
}

/// Builds the package of this build's binary into `dir`; its path.
pub fn build_deb(dir: &Path) -> String {
    let o = Command::new("bash")
        .arg(Path::new(ROOT).join("packaging/build-deb.sh"))
        .arg(dir)
        .env("OW_BIN", BIN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deb = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(deb.ends_with(".deb"), "{deb}");
    deb
}

#[test]
fn deb_package_holds_every_file_with_the_right_modes() {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is not installed on this machine");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let deb = build_deb(out.path());

    let listing = Command::new("dpkg-deb")
        .args(["-c", &deb])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/outreach-workbench"),
        (
            "-rw-r--r--",
            "./lib/systemd/system/outreach-workbench.service",
        ),
        ("-rw-r-----", "./etc/outreach-workbench/config.toml"),
        ("-rw-------", "./etc/outreach-workbench/env"),
        ("-rw-r--r--", "./usr/share/doc/outreach-workbench/README.md"),
        ("-rw-r--r--", "./usr/lib/outreach-workbench/libduckdb.so"),
        ("-rw-r--r--", "./usr/share/man/man1/outreach-workbench.1.gz"),
        (
            "-rw-r--r--",
            "./usr/share/bash-completion/completions/outreach-workbench",
        ),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path) && l.contains("root/root")),
            "{mode} root/root {path} missing from:\n{listing}"
        );
    }

    let info = Command::new("dpkg-deb")
        .args(["-I", &deb])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    for needle in [
        "postinst",
        "prerm",
        "postrm",
        "conffiles",
        "Package: outreach-workbench",
    ] {
        assert!(info.contains(needle), "{needle} missing from:\n{info}");
    }
    let ctrl = tempfile::tempdir().unwrap();
    assert!(Command::new("dpkg-deb")
        .args(["-e", &deb])
        .arg(ctrl.path())
        .status()
        .unwrap()
        .success());
    let conf = std::fs::read_to_string(ctrl.path().join("conffiles")).unwrap();
    assert!(conf.contains("/etc/outreach-workbench/config.toml"));
    assert!(conf.contains("/etc/outreach-workbench/env"));
    let postinst = std::fs::read_to_string(ctrl.path().join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"));
    let postrm = std::fs::read_to_string(ctrl.path().join("postrm")).unwrap();
    assert!(postrm.contains("purge") && postrm.contains("/var/lib/outreach-workbench"));

    // Unpacked into a scratch root, the binary finds the package's
    // libduckdb.so ($ORIGIN) and accepts the shipped config as it is.
    let root = tempfile::tempdir().unwrap();
    assert!(Command::new("dpkg-deb")
        .args(["-x", &deb])
        .arg(root.path())
        .status()
        .unwrap()
        .success());
    let check = Command::new(root.path().join("usr/bin/outreach-workbench"))
        .args(["check", "--offline", "--config"])
        .arg(root.path().join("etc/outreach-workbench/config.toml"))
        .env("B2_KEY_ID", "k")
        .env("B2_APPLICATION_KEY", "s")
        .env("B2_BUCKET", "b")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Each subcommand's page and the config file's open in man, with the
    // sections an operator looks for.
    if have("man") {
        for page in [
            "usr/share/man/man1/outreach-workbench-run.1.gz",
            "usr/share/man/man1/outreach-workbench-status.1.gz",
            "usr/share/man/man5/outreach-workbench.toml.5.gz",
        ] {
            let o = Command::new("man")
                .arg("-l")
                .arg(root.path().join(page))
                .env("MANWIDTH", "100")
                .output()
                .unwrap();
            let shown = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{page}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            for section in ["NAME", "FILES", "SEE ALSO"] {
                assert!(shown.contains(section), "{page} lacks {section}:\n{shown}");
            }
            if page.contains("man1") {
                assert!(
                    shown.contains("EXIT STATUS") && shown.contains("ENVIRONMENT"),
                    "{shown}"
                );
            }
        }
    } else {
        eprintln!("man is not installed: the pages are not opened");
    }
}

#[test]
fn lintian_finds_no_error_and_no_warning_in_the_package() {
    if !have("lintian") || !have("dpkg-buildpackage") {
        eprintln!("skipped: lintian or dpkg-buildpackage is not installed on this machine");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let deb = build_deb(out.path());
    // Overrides (packaging/debian/*.lintian-overrides) say which findings
    // are our choice and why; anything else at warning or above fails.
    let o = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
        .arg(&deb)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "lintian:\n{said}");
    assert!(
        !said
            .lines()
            .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian:\n{said}"
    );
}
