//! Log output with `tracing`.
//!
//! - Commands (`run`, `check`, ...) log to stderr, keeping stdout for their
//!   own output.
//! - The daemon logs to stdout for journald and to daily files in
//!   `<workbench>/logs/`, keeping `log_retention_days` of them.
//!
//! Under systemd (`JOURNAL_STREAM` is set) journald stamps every line
//! itself, so ours carry no timestamp, and each line starts with a syslog
//! priority (`<3>` for errors) that journald turns into the entry's level:
//! `journalctl -p err` then finds our errors. `RUST_LOG` filters as usual;
//! the default is `info`.

use std::io::IsTerminal;
use std::path::Path;

use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Prefixes each line with its syslog priority, for journald.
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// For one-shot commands: log lines go to stderr.
pub fn init_stderr() {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let layer = if under_journald() {
        layer.without_time().with_ansi(false).boxed()
    } else {
        layer.boxed()
    };
    // A second init (as in tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter()))
        .try_init();
}

/// Keeps the file writer's background thread alive; drop it last.
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

/// For the daemon: stdout (journald-friendly) plus rotated files.
pub fn init_daemon(log_dir: &Path, retention_days: usize) -> anyhow::Result<LogGuard> {
    std::fs::create_dir_all(log_dir)?;
    let files = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix("outreach-workbench")
        .filename_suffix("log")
        .max_log_files(retention_days.max(1))
        .build(log_dir)
        .map_err(|e| anyhow::anyhow!("log directory {}: {e}", log_dir.display()))?;
    let (writer, guard) = tracing_appender::non_blocking(files);
    let file_layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_target(false);
    let stdout_layer = if under_journald() {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .with_ansi(false)
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false)
                    .with_ansi(false),
            ))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .with_ansi(std::io::stdout().is_terminal())
            .with_target(false)
            .boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(stdout_layer.with_filter(filter()))
        .with(file_layer.with_filter(filter()))
        .try_init();
    Ok(LogGuard(Some(guard)))
}
