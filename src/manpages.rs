//! The package's man pages, written from the command line's own clap
//! definitions (a page for the program and one per subcommand) and from
//! the shipped `config.toml` (the config file's page), so that none can
//! drift from what the program accepts.

use std::path::Path;

const PROGRAM: &str = "outreach-workbench";

/// The shipped, commented config, shown whole in the config file's page.
const SHIPPED_CONFIG: &str = include_str!("../config.toml");

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
.B 0
Done: the run succeeded, the check found nothing, the daemon stopped when told.
.TP
.B 1
A run failed (its error is printed and audited), another host or process runs the state now, or \fBcheck\fR found a problem (a line each).
.TP
.B 2
The config file or a rule is invalid; the message names the key. The unit does not restart the daemon for it.
.TP
.B 3
A quality gate stopped the run: nothing was published, the bucket keeps the last good files. \fB\-\-force\fR publishes anyway.
.TP
.B 4
The daemon lacks a secret every run needs. The unit does not restart it.
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
.B OUTREACH_CONFIG
The config file when \fB\-\-config\fR is not given.
.TP
.BI OUTREACH_ SECTION __ KEY
Overrides one key of the config file, e.g. \fBOUTREACH_SOURCE__PORT=5433\fR.
.TP
.B NEON_HOST, NEON_DATABASE, NEON_USER, B2_BUCKET
The original script's names for \fBsource.host\fR, \fBsource.database\fR, \fBsource.user\fR and \fBstorage.bucket\fR.
.TP
.B NEON_PASSWORD, B2_KEY_ID, B2_APPLICATION_KEY
The secrets, each looked up in this order: the systemd credential \fB$CREDENTIALS_DIRECTORY/\fR\fINAME\fR (or \fBow_\fR\fINAME\fR, as the unit loads them), the file named by \fINAME\fR\fB_FILE\fR, the variable itself, and, for root's shell, the file \fB/etc/outreach-workbench/credentials/\fR\fINAME\fR. A webhook's URL is looked up the same way under its \fBurl_env\fR name. \fBcheck\fR prints where each came from, never its value.
.TP
.B RUST_LOG
Log filter, \fBinfo\fR by default.
"#;

const FILES: &str = r#".SH FILES
.TP
.B /etc/outreach-workbench/config.toml
The configuration, \fBoutreach-workbench.toml\fR(5).
.TP
.B /etc/outreach-workbench/credentials/
One file per secret, root's (mode 0600), loaded by the units as systemd credentials.
.TP
.B /var/lib/outreach-workbench/
The workbench: the DuckDB files (\fBstate/\fR, \fBcatalog.duckdb\fR for analysts), the exported Parquet files, the report pages, the audit records not yet written.
.TP
.B /var/log/outreach-workbench/
The daemon's daily log files, beside the journal.
.TP
.B /lib/systemd/system/outreach-workbench.service, outreach-workbench-run@.service
The daemon, and a one-off run as the service: \fBsystemctl start outreach-workbench-run@WV\fR.
"#;

/// Writes `outreach-workbench.1`, a page per visible subcommand, and
/// `outreach-workbench.toml.5` into `out`.
pub fn write(cmd: clap::Command, out: &Path) -> std::io::Result<()> {
    let mut see_also = vec![format!("{PROGRAM}.toml (5)")];
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    for sub in &subcommands {
        see_also.push(format!("{PROGRAM}-{} (1)", sub.get_name()));
    }
    let mut pages = vec![(PROGRAM.to_string(), cmd.clone())];
    for sub in subcommands {
        let name = format!("{PROGRAM}-{}", sub.get_name());
        let typed = format!("{PROGRAM} {}", sub.get_name());
        pages.push((name.clone(), sub.name(name).bin_name(typed)));
    }
    for (name, page) in pages {
        let mut text = Vec::new();
        clap_mangen::Man::new(page).render(&mut text)?;
        let mut text = String::from_utf8_lossy(&text).into_owned();
        text.push_str(EXIT_STATUS);
        text.push_str(ENVIRONMENT);
        text.push_str(FILES);
        let others: Vec<String> = see_also
            .iter()
            .filter(|s| !s.starts_with(&format!("{name} (")))
            .map(|s| {
                let (page, section) = s.split_once(' ').expect("name (n)");
                format!(".BR {page} {section}")
            })
            .collect();
        text.push_str(&format!(".SH \"SEE ALSO\"\n{}\n", others.join(",\n")));
        std::fs::write(out.join(format!("{name}.1")), text)?;
    }
    std::fs::write(out.join(format!("{PROGRAM}.toml.5")), config_page())
}

/// The config file's page: what it is, then the shipped file as it is.
fn config_page() -> String {
    let mut page = format!(
        r#".TH {upper}.TOML 5 "" "{PROGRAM} {version}"
.SH NAME
{PROGRAM}.toml \- configuration of {PROGRAM}
.SH SYNOPSIS
.B /etc/outreach-workbench/config.toml
.SH DESCRIPTION
One TOML file configures the daemon and every command. Unknown keys are refused, so a typo cannot fall back to a default silently. Each key can be overridden from the environment as \fBOUTREACH_\fR\fISECTION\fR\fB__\fR\fIKEY\fR. Secrets never belong here: \fBcheck\fR refuses a password in this file; see \fBENVIRONMENT\fR in \fB{PROGRAM}\fR(1). After an edit, \fBsystemctl reload outreach-workbench\fR checks the file first and keeps the running config when it is refused.
.PP
The shipped file, every key with its default and what it does:
.PP
.nf
.ft CR
"#,
        upper = PROGRAM.to_uppercase(),
        version = env!("CARGO_PKG_VERSION"),
    );
    for line in SHIPPED_CONFIG.lines() {
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            page.push_str("\\&");
        }
        page.push_str(&line);
        page.push('\n');
    }
    page.push_str(".ft\n.fi\n");
    page.push_str(FILES);
    page.push_str(&format!(".SH \"SEE ALSO\"\n.BR {PROGRAM} (1)\n"));
    page
}
