//! The errors of a run, and what every layer needs to make and read them:
//! the PostgreSQL server's own words, whether a failure may pass by itself,
//! a worker thread's panic as an error. A leaf: it imports nothing of the
//! crate but the workbench's error type, so the source, the bucket, the
//! ledger and the run all build on it.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::workbench::WorkbenchError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {target}: {}{}", pg_message(.source), tls_hint(.source))]
    Connect {
        target: String,
        #[source]
        source: postgres::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("PostgreSQL error while {what}: {}", pg_message(.source))]
    Source {
        what: String,
        #[source]
        source: postgres::Error,
    },
    #[error("cannot decode {table}.{column}: {message}")]
    Decode {
        table: String,
        column: String,
        message: String,
    },
    #[error(transparent)]
    WorkbenchOpen(#[from] WorkbenchError),
    #[error("workbench: {0}")]
    Workbench(String),
    #[error("validation failed: {0}")]
    Validate(String),
    #[error("export to {path} failed: {message}")]
    Export { path: PathBuf, message: String },
    #[error("bucket {target} is not usable: {message}")]
    Bucket {
        target: String,
        message: String,
        transient: bool,
        retry_after: Option<std::time::Duration>,
    },
    #[error("upload of {key} failed: {message}")]
    Publish {
        key: String,
        message: String,
        transient: bool,
        /// The server's `Retry-After` (B2's 503 SlowDown).
        retry_after: Option<std::time::Duration>,
    },
    #[error("audit table {table}: {}", pg_message(.source))]
    Audit {
        table: String,
        #[source]
        source: postgres::Error,
    },
    #[error("audit table {table} exists with another layout ({problems}); set [audit] table (or OUTREACH_AUDIT__TABLE) to another schema.table and it will be created with the right layout")]
    AuditLayout { table: String, problems: String },
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("{0}; nothing published, the local exports are kept")]
    Gated(String),
    #[error("run cancelled")]
    Cancelled,
    /// Another run holds the state's lease (see [`crate::ledger::claim`]).
    #[error("{0}")]
    StateBusy(String),
    /// Another host has claimed this fire time of the schedule.
    #[error("{0}")]
    FireClaimed(String),
    #[error("{0}")]
    LeaseLost(String),
    #[error("the run panicked: {0}")]
    Panicked(String),
}

impl PipelineError {
    /// A failure that may pass by itself: worth retrying with backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Connect { source, .. }
            | PipelineError::Source { source, .. }
            | PipelineError::Audit { source, .. } => pg_is_transient(source),
            PipelineError::Bucket { transient, .. } | PipelineError::Publish { transient, .. } => {
                *transient
            }
            _ => false,
        }
    }

    /// How long the server asked us to wait before the next try.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            PipelineError::Bucket { retry_after, .. }
            | PipelineError::Publish { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A rule that cannot be used, with the config key that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rules.{entity}[{index}] (code `{code}`): {message}")]
pub struct RuleError {
    pub entity: String,
    pub index: usize,
    pub code: String,
    pub message: String,
}

/// The server's own words for a database error (`FATAL: password
/// authentication failed for user "x"`), which `postgres::Error`'s Display
/// reduces to "db error"; the error chain for everything else.
pub fn pg_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            m.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            m.push_str(&format!("; hint: {h}"));
        }
        return m;
    }
    with_causes(e.to_string(), e)
}

/// What to do about a certificate the host does not trust: make it
/// trusted, never check less.
fn tls_hint(e: &postgres::Error) -> &'static str {
    match with_causes(e.to_string(), e).contains("certificate verify failed") {
        true => " (this host does not trust the server's certificate, or it names another host: install Debian's ca-certificates package, which trusts Neon's; for a private CA, put its certificate in /usr/local/share/ca-certificates/ and run update-ca-certificates; and give source.host as the certificate names it)",
        false => "",
    }
}

/// A failure that is about the connection, not about what was asked:
/// refused, reset, timed out, closed, the server shutting the session down
/// (`57P01 terminating connection due to administrator command`, which is
/// how Neon ends idle sessions and suspends computes), starting up, or out of
/// connection slots. Authentication, TLS verification and SQL errors are not.
pub fn pg_is_transient(e: &postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // PgBouncer says everything with 08P01, a wrong password too: only
        // its messages of a server it cannot reach (yet) are retried. After
        // a failed server login it turns clients away for
        // `server_login_retry` (15 s) with "server login has been failing"
        // (seen in scripts/soak.sh after each PostgreSQL restart).
        if code == "08P01" {
            let m = db.message();
            return [
                "server login has been failing",
                "pgbouncer cannot connect to server",
                "query_wait_timeout",
                "no more connections allowed",
                "server conn crashed",
            ]
            .iter()
            .any(|t| m.contains(t));
        }
        return matches!(
            code,
            "08000" | "08001" | "08003" | "08006" | "57P01" | "57P02" | "57P03" | "53300"
        );
    }
    if e.is_closed() || e.to_string().contains("timeout") {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | BrokenPipe
                    | UnexpectedEof
                    | NotConnected
            );
        }
        cause = c.source();
    }
    false
}

/// `head` followed by each cause of `e` that it does not already say:
/// libraries' own messages often stop short of the reason ("error sending
/// request", "error connecting"), which is further down the chain.
pub fn with_causes(mut head: String, e: &dyn std::error::Error) -> String {
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !head.contains(&text) {
            head.push_str(": ");
            head.push_str(&text);
        }
        cause = c.source();
    }
    head
}

/// A panic's message, as `std` prints it.
pub fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A worker thread's outcome, its panic turned into the run's error (the
/// run then fails and is audited like any other failure).
pub fn joined<T>(
    what: &str,
    outcome: std::thread::Result<Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    outcome.unwrap_or_else(|p| {
        Err(PipelineError::Panicked(format!(
            "{what}: {}",
            panic_text(&p)
        )))
    })
}

pub fn check_cancel(cancel: &CancellationToken) -> Result<(), PipelineError> {
    if cancel.is_cancelled() {
        Err(PipelineError::Cancelled)
    } else {
        Ok(())
    }
}
