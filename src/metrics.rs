//! The daemon's metrics in Prometheus text format: written as a
//! node_exporter textfile after every run (`[metrics] textfile`), and served
//! over HTTP at `/metrics`, with `/healthz`, when `[metrics] listen` is set.
//!
//! Per state: the last success and the last run (Unix seconds), runs by
//! status, the last run's good/bad rows, bytes uploaded and objects by
//! action, the last run's seconds per stage, and the next fire time. The
//! operator's guide (docs/metrics.md) shows two alert rules built on them.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::names::{Entity, FileKind};
use crate::pipeline::{RunReport, RunStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateStatus {
    state: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rows {
    state: String,
    entity: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Action {
    state: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EntityLabel {
    entity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    state: String,
    stage: String,
}

type Seconds = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    last_success: Family<State, Seconds>,
    last_run: Family<State, Seconds>,
    runs: Family<StateStatus, Counter>,
    rows: Family<Rows, Gauge>,
    /// The last publish's change sets: `kind` is added, changed, removed.
    changes: Family<Rows, Gauge>,
    uploaded_bytes: Family<State, Counter>,
    objects: Family<Action, Counter>,
    duration: Family<Stage, Seconds>,
    next_fire: Family<State, Seconds>,
    without_state: Family<EntityLabel, Gauge>,
    /// When the scheduler loop last turned (Unix seconds), for `/healthz`.
    alive: AtomicI64,
    /// Held for writing while a run's figures are set, for reading while
    /// they are rendered: a scrape sees all of a run's update or none of it
    /// (it saw a run counted before its last success time, on a loaded
    /// machine).
    update: std::sync::RwLock<()>,
    /// Where a test holds a run's update half-way.
    #[cfg(test)]
    halfway: std::sync::Mutex<Option<std::sync::Arc<std::sync::Barrier>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("outreach_workbench");
        let m = Metrics {
            last_success: Family::default(),
            last_run: Family::default(),
            runs: Family::default(),
            rows: Family::default(),
            changes: Family::default(),
            uploaded_bytes: Family::default(),
            objects: Family::default(),
            duration: Family::default(),
            next_fire: Family::default(),
            without_state: Family::default(),
            alive: AtomicI64::new(now()),
            update: std::sync::RwLock::new(()),
            #[cfg(test)]
            halfway: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        let r = &mut registry;
        r.register(
            "last_success_timestamp_seconds",
            "When the state's last successful run finished",
            m.last_success.clone(),
        );
        r.register(
            "last_run_timestamp_seconds",
            "When the state's last run finished, whatever its outcome",
            m.last_run.clone(),
        );
        r.register("runs", "Runs by outcome", m.runs.clone());
        r.register(
            "rows",
            "Good and bad rows of the state's last run that got that far",
            m.rows.clone(),
        );
        r.register(
            "changes",
            "Rows added, changed and removed by the state's last publish (its change sets; 0 on a new baseline)",
            m.changes.clone(),
        );
        r.register(
            "uploaded_bytes",
            "Bytes uploaded to the bucket",
            m.uploaded_bytes.clone(),
        );
        r.register(
            "objects",
            "Files uploaded or skipped as unchanged",
            m.objects.clone(),
        );
        r.register(
            "run_duration_seconds",
            "Seconds of the state's last run, per stage and in all",
            m.duration.clone(),
        );
        r.register(
            "next_fire_timestamp_seconds",
            "The state's next scheduled fire time",
            m.next_fire.clone(),
        );
        r.register(
            "rows_without_state",
            "Rows the last all-states run read whose state value names no state (not published)",
            m.without_state.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A finished all-states run: its rows of no state. (Each state's run
    /// is recorded on its own.)
    pub fn record_all_states(&self, companies: u64, people: u64) {
        let _whole = self.update.write().unwrap_or_else(|p| p.into_inner());
        for (entity, n) in [(Entity::Companies, companies), (Entity::People, people)] {
            self.without_state
                .get_or_create(&EntityLabel {
                    entity: entity.to_string(),
                })
                .set(n as i64);
        }
    }

    /// A finished run (not a skipped one: another host did the work).
    pub fn record(&self, r: &RunReport) {
        if r.status == RunStatus::Skipped {
            return;
        }
        let _whole = self.update.write().unwrap_or_else(|p| p.into_inner());
        let state = || State {
            state: r.state.clone(),
        };
        let finished = r
            .finished_at
            .map(|t| t.timestamp_millis() as f64 / 1000.0)
            .unwrap_or_default();
        let status = if r.status == RunStatus::Success && r.audit_error.is_some() {
            "unaudited"
        } else {
            r.status.as_str()
        };
        self.runs
            .get_or_create(&StateStatus {
                state: r.state.clone(),
                status: status.into(),
            })
            .inc();
        #[cfg(test)]
        if let Some(b) = self.halfway.lock().unwrap().clone() {
            b.wait();
            b.wait();
        }
        self.last_run.get_or_create(&state()).set(finished);
        if r.succeeded() {
            self.last_success.get_or_create(&state()).set(finished);
        }
        for entity in Entity::ALL {
            let Some(c) = r.counts(entity) else { continue };
            for (kind, n) in [(FileKind::Good, c.good), (FileKind::Bad, c.bad)] {
                self.rows
                    .get_or_create(&Rows {
                        state: r.state.clone(),
                        entity: entity.to_string(),
                        kind: kind.to_string(),
                    })
                    .set(n as i64);
            }
        }
        if r.succeeded() && !r.dry_run {
            for entity in Entity::ALL {
                let set = r.changes.iter().find(|c| c.entity == entity);
                for (kind, n) in [
                    ("added", set.map_or(0, |c| c.added)),
                    ("changed", set.map_or(0, |c| c.changed)),
                    ("removed", set.map_or(0, |c| c.removed)),
                ] {
                    self.changes
                        .get_or_create(&Rows {
                            state: r.state.clone(),
                            entity: entity.to_string(),
                            kind: kind.into(),
                        })
                        .set(n as i64);
                }
            }
        }
        for o in &r.objects {
            self.objects
                .get_or_create(&Action {
                    state: r.state.clone(),
                    action: o.action.to_string(),
                })
                .inc();
            if o.action == crate::names::PublishAction::Uploaded {
                self.uploaded_bytes.get_or_create(&state()).inc_by(o.bytes);
            }
        }
        let s = &r.stages;
        for (stage, secs) in [
            ("pull", s.pull),
            ("validate", s.validate),
            ("export", s.export),
            ("publish", s.publish),
            ("audit", s.audit),
            ("total", r.duration_secs),
        ] {
            let g = self.duration.get_or_create(&Stage {
                state: r.state.clone(),
                stage: stage.into(),
            });
            g.set(secs.unwrap_or(0.0));
        }
    }

    /// The last run and success from before this process (the workbench's
    /// history), in Unix seconds.
    pub fn seed(&self, state: &str, last_run: Option<f64>, last_success: Option<f64>) {
        let _whole = self.update.write().unwrap_or_else(|p| p.into_inner());
        let key = State {
            state: state.into(),
        };
        if let Some(t) = last_run {
            self.last_run.get_or_create(&key).set(t);
        }
        if let Some(t) = last_success {
            self.last_success.get_or_create(&key).set(t);
        }
    }

    pub fn next_fire(&self, state: &str, at: chrono::DateTime<chrono::Utc>) {
        self.next_fire
            .get_or_create(&State {
                state: state.into(),
            })
            .set(at.timestamp() as f64);
    }

    /// The scheduler loop is turning.
    pub fn beat(&self) {
        self.alive.store(now(), Ordering::Relaxed);
    }

    /// Whether the scheduler loop turned within `limit`.
    pub fn alive_within(&self, limit: Duration) -> bool {
        now() - self.alive.load(Ordering::Relaxed) <= limit.as_secs() as i64
    }

    /// The metrics in OpenMetrics text (what prometheus-client writes), for
    /// a scraper that asks for it.
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::new();
        let _whole = self.update.read().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// The metrics in Prometheus' text format 0.0.4: what node_exporter's
    /// textfile collector reads, and what `/metrics` serves by default.
    pub fn render(&self) -> String {
        to_prometheus_text(&self.render_openmetrics())
    }

    /// Replaces `path` with the metrics as a whole: written beside it, synced,
    /// then renamed over it, so node_exporter never reads half a file.
    pub fn write_textfile(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("prom.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// OpenMetrics text to Prometheus text 0.0.4. The two differ, for what we
/// write, in three places: a counter's family is named without `_total` in
/// OpenMetrics and with it in Prometheus (whose parsers otherwise see the
/// `_total` samples as a metric without a type), `# UNIT` lines do not exist
/// in Prometheus, and neither does the closing `# EOF`.
fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes a family's HELP (and UNIT) before its TYPE, so
    // they are held until the TYPE says whether the name changes.
    let mut held: Vec<&str> = Vec::new();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            held.push(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let rename = kind == "counter" && !name.ends_with("_total");
            for h in held.drain(..) {
                match h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
                    Some((n, help)) if rename && n == name => {
                        out.push_str(&format!("# HELP {name}_total {help}\n"))
                    }
                    _ => {
                        out.push_str(h);
                        out.push('\n');
                    }
                }
            }
            if rename {
                out.push_str(&format!("# TYPE {name}_total counter\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    for h in held {
        out.push_str(h);
        out.push('\n');
    }
    out
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
/// `/healthz` answers 200 while the scheduler loop turned in the last 30 s.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // The request line and headers; a body is never expected.
            while len < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[len..])).await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        len += n;
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, kind, body) = match path {
                "/metrics" if accepts_openmetrics(&head) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render_openmetrics(),
                ),
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.render(),
                ),
                "/healthz" if metrics.alive_within(Duration::from_secs(30)) => {
                    ("200 OK", "text/plain", "ok\n".to_string())
                }
                "/healthz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "the scheduler loop has stopped turning\n".to_string(),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

/// Whether the request's Accept header names OpenMetrics (Prometheus asks
/// for it first and takes text/plain as its fallback); text/plain otherwise.
fn accepts_openmetrics(head: &str) -> bool {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .any(|(_, value)| {
            value.split(',').any(|media| {
                let mut parts = media.split(';').map(str::trim);
                let is_om = parts.next() == Some("application/openmetrics-text");
                // `q=0` means "not this one".
                is_om && !parts.any(|p| p.replace(' ', "") == "q=0")
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape never sees part of a run's update: held half-way (its
    /// count set, its times not yet), the figures cannot be rendered; once
    /// it ends they show all of it.
    #[test]
    fn a_scrape_sees_all_of_a_runs_update_or_none() {
        let m = std::sync::Arc::new(Metrics::new());
        let b = std::sync::Arc::new(std::sync::Barrier::new(2));
        *m.halfway.lock().unwrap() = Some(b.clone());
        let recording = {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut r = RunReport::new(&crate::state::StateCode::parse("WV").unwrap(), false);
                r.finish(None);
                m.record(&r);
            })
        };
        b.wait();
        // Half-way: the count is set, the last success not yet.
        assert!(
            m.update.try_read().is_err(),
            "a render would see half a run"
        );
        b.wait();
        recording.join().unwrap();
        let text = m.render();
        assert!(text.contains("runs_total{state=\"WV\",status=\"success\"} 1"));
        assert!(text.contains("last_success_timestamp_seconds{state=\"WV\"}"));
    }

    #[test]
    fn a_run_shows_in_the_text_format() {
        let m = Metrics::new();
        let mut r = RunReport::new(&crate::state::StateCode::parse("WV").unwrap(), false);
        r.finish(None);
        m.record(&r);
        m.next_fire("WV", chrono::Utc::now());
        let text = m.render();
        assert!(
            text.contains("outreach_workbench_runs_total{state=\"WV\",status=\"success\"} 1"),
            "{text}"
        );
        assert!(text.contains("outreach_workbench_last_success_timestamp_seconds{state=\"WV\"}"));
        assert!(text.contains("outreach_workbench_next_fire_timestamp_seconds{state=\"WV\"}"));
        assert!(
            text.contains("# TYPE outreach_workbench_runs_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP outreach_workbench_runs_total Runs by outcome"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let om = m.render_openmetrics();
        assert!(
            om.contains("# TYPE outreach_workbench_runs counter\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn a_publishs_change_sets_show_per_entity_and_kind() {
        let m = Metrics::new();
        let mut r = RunReport::new(&crate::state::StateCode::parse("WV").unwrap(), false);
        r.changes.push(crate::files::changes::ChangeFile {
            entity: Entity::Companies,
            path: "x".into(),
            bytes: 1,
            sha256: "s".into(),
            added: 2,
            changed: 1,
            removed: 3,
            examples: Default::default(),
        });
        r.finish(None);
        m.record(&r);
        let text = m.render();
        for (entity, kind, n) in [
            ("companies", "added", 2),
            ("companies", "changed", 1),
            ("companies", "removed", 3),
            ("people", "added", 0),
        ] {
            let line = format!(
                "outreach_workbench_changes{{state=\"WV\",entity=\"{entity}\",kind=\"{kind}\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let req =
            |accept: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n");
        assert!(accepts_openmetrics(&req(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!accepts_openmetrics(&req("text/plain;version=0.0.4")));
        assert!(!accepts_openmetrics(&req(
            "application/openmetrics-text;q=0, text/plain"
        )));
        assert!(!accepts_openmetrics("GET /metrics HTTP/1.1\r\n\r\n"));
    }
}
