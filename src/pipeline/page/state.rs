//! One run's page: what it pulled, what each rule caught (with a few of
//! the rows), the gates, schema changes, its files, and charts of the
//! state's recent runs. Every figure comes from the run's report, the same
//! value the audit record and `history` hold.

use std::fmt::Write as _;

use super::chart::{line_chart, RunMark, Series};
use super::html::{document, esc, int, num_cell, share, status_badge};
use crate::names::Entity;
use crate::pipeline::report::{EntityCounts, RunReport};
use crate::quality::samples::RuleSample;

/// What a state's page shows.
pub struct StatePage<'a> {
    pub report: &'a RunReport,
    /// The state's recent runs, oldest first, this one last.
    pub history: &'a [RunReport],
    pub samples: &'a [RuleSample],
    /// `[report] sample_rows` when the run was made: 0 says samples are off.
    pub sample_rows: usize,
    /// The page for the bucket, whose readers need not see personal data:
    /// the rows are left out, and it says where they are.
    pub withheld: bool,
}

impl StatePage<'_> {
    pub fn render(&self) -> String {
        let r = self.report;
        let mut body = String::new();
        self.header(&mut body);
        self.counts(&mut body);
        self.rules(&mut body);
        self.gates(&mut body);
        self.charts(&mut body);
        self.schema(&mut body);
        self.changes(&mut body);
        self.samples(&mut body);
        self.files(&mut body);
        let title = format!("{} · {} · outreach-workbench", r.state, r.status.as_str());
        document(&title, &body, None)
    }

    fn header(&self, out: &mut String) {
        let r = self.report;
        let _ = write!(
            out,
            "<header>\n<h1>{} {}{}</h1>\n<p class=\"meta\">Run <code data-metric=\"run_id\">{}</code>, started {} UTC",
            esc(&r.state),
            status_badge(r.status.as_str()),
            if r.dry_run { " <span class=\"status\">dry run</span>" } else { "" },
            esc(&r.run_id),
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
        );
        if let Some(d) = r.duration_secs {
            let _ = write!(out, ", took {d:.1} s");
        }
        if let Some(f) = r.fire_time {
            let _ = write!(
                out,
                ", for the fire time {} UTC",
                f.format("%Y-%m-%d %H:%M")
            );
        }
        if let Some(b) = &r.batch_id {
            let _ = write!(out, ", part of the all-states run <code>{}</code>", esc(b));
        }
        out.push_str(".</p>\n");
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "<p class=\"tripped\" data-metric=\"error\">{}</p>",
                esc(e)
            );
        }
        if let Some(e) = &r.audit_error {
            let _ = writeln!(out, "<p class=\"tripped\">Audit: {}</p>", esc(e));
        }
        out.push_str("</header>\n");
    }

    fn counts(&self, out: &mut String) {
        let r = self.report;
        out.push_str(
            "<section id=\"counts\"><h2>Rows</h2>\n<table><tr><th>Entity</th><th class=\"num\">Pulled</th>\
             <th class=\"num\">Good</th><th class=\"num\">Bad</th><th class=\"num\">Bad share</th>\
             <th class=\"num\">Without a key</th></tr>\n",
        );
        for e in Entity::ALL {
            match r.counts(e) {
                Some(c) => {
                    let _ = writeln!(
                        out,
                        "<tr><th>{e}</th>{}{}{}<td class=\"num\">{}</td>{}</tr>",
                        num_cell(&format!("{e}.pulled"), c.raw),
                        num_cell(&format!("{e}.good"), c.good),
                        num_cell(&format!("{e}.bad"), c.bad),
                        share(c.bad, c.raw),
                        num_cell(&format!("{e}.null_keys"), c.null_keys),
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "<tr><th>{e}</th><td colspan=\"5\" class=\"note\">not validated: the run ended before</td></tr>"
                    );
                }
            }
        }
        out.push_str("</table></section>\n");
    }

    fn rules(&self, out: &mut String) {
        out.push_str("<section id=\"rules\"><h2>Rules</h2>\n");
        let previous = self.previous_counts();
        let before = |e: Entity, code: &str| {
            previous.and_then(|p| p.counts(e)).map(|c| {
                c.errors
                    .get(code)
                    .or(c.warnings.get(code))
                    .copied()
                    .unwrap_or(0)
            })
        };
        // Worse since the last run that counted: said first.
        let mut worse = Vec::new();
        for (e, c) in self.validated() {
            for (code, n, _) in rule_counts(c) {
                if let Some(b) = before(e, code).filter(|b| n > *b) {
                    worse.push(format!(
                        "<li data-worse=\"{e}.{code}\"><code>{code}</code> ({e}): {} → {} rows (+{})</li>",
                        int(b),
                        int(n),
                        int(n - b),
                        code = esc(code)
                    ));
                }
            }
        }
        if !worse.is_empty() {
            let _ = writeln!(
                out,
                "<div class=\"worse\"><p><strong>Worse than the last run:</strong></p><ul>{}</ul></div>",
                worse.join("")
            );
        }
        out.push_str(
            "<table><tr><th>Entity</th><th>Rule</th><th>Severity</th>\
             <th class=\"num\">Rows</th><th class=\"num\">Share</th>\
             <th class=\"num\">Last run</th><th class=\"num\">Difference</th></tr>\n",
        );
        let mut any = false;
        for (e, c) in self.validated() {
            for (code, n, severity) in rule_counts(c) {
                any = true;
                let note = self
                    .report
                    .rules
                    .iter()
                    .find(|r| r.entity == e && &r.code == code);
                let description = note
                    .and_then(|r| r.description.as_deref())
                    .map(|d| format!("<div class=\"note\" data-description>{}</div>", esc(d)))
                    .unwrap_or_default();
                let (last, diff) = match before(e, code) {
                    Some(b) => (
                        format!(
                            "<td class=\"num\" data-metric=\"{e}.rule.{code}.last\" data-value=\"{b}\">{}</td>",
                            int(b),
                            code = esc(code)
                        ),
                        format!(
                            "<td class=\"num\" data-metric=\"{e}.rule.{code}.difference\" data-value=\"{d}\">{d:+}</td>",
                            d = n as i64 - b as i64,
                            code = esc(code)
                        ),
                    ),
                    None => ("<td class=\"num\">-</td>".into(), "<td class=\"num\">-</td>".into()),
                };
                let _ = writeln!(
                    out,
                    "<tr><td>{e}</td><td><code>{}</code>{description}</td><td>{severity}</td>{}<td class=\"num\">{}</td>{last}{diff}</tr>",
                    esc(code),
                    num_cell(&format!("{e}.rule.{code}"), n),
                    share(n, c.raw),
                );
                if let Some(r) = note {
                    let _ = writeln!(
                        out,
                        "<tr class=\"detail\"><td></td><td colspan=\"6\">When <code>{}</code>.{}{}</td></tr>",
                        esc(&r.condition),
                        r.fix
                            .as_deref()
                            .map(|f| format!(" <strong>Fix:</strong> <span data-fix>{}</span>", esc(f)))
                            .unwrap_or_default(),
                        self.query(e, code, severity, n),
                    );
                }
            }
        }
        if !any {
            out.push_str("<tr><td colspan=\"7\" class=\"note\">No rule was evaluated.</td></tr>\n");
        }
        out.push_str("</table></section>\n");
    }

    /// The last run before this one that counted its rows.
    fn previous_counts(&self) -> Option<&RunReport> {
        let r = self.report;
        self.history
            .iter()
            .rev()
            .filter(|h| h.run_id != r.run_id && h.started_at <= r.started_at)
            .find(|h| h.companies.is_some() || h.people.is_some())
    }

    /// A DuckDB query listing every row a rule caught: over the bad file in
    /// the bucket when the run published it, else the one on this host.
    fn query(&self, e: Entity, code: &str, severity: &str, n: u64) -> String {
        if n == 0 || severity != "error" {
            return String::new();
        }
        let table = e.table(crate::names::FileKind::Bad);
        let place = self
            .report
            .objects
            .iter()
            .find(|o| o.table_name == table)
            .map(|o| o.url.clone())
            .or_else(|| {
                self.report
                    .files
                    .iter()
                    .find(|f| f.table_name == table)
                    .map(|f| f.path.display().to_string())
            });
        let Some(place) = place else {
            return String::new();
        };
        format!(
            " All its rows: <code data-query>SELECT * FROM read_parquet('{}') WHERE list_contains(validation_errors, '{}')</code>",
            esc(&place.replace('\'', "''")),
            esc(&code.replace('\'', "''"))
        )
    }

    fn gates(&self, out: &mut String) {
        let r = self.report;
        out.push_str("<section id=\"gates\"><h2>Gates</h2>\n");
        if r.gates.is_empty() {
            out.push_str("<p class=\"note\">No gate applies to this state.</p></section>\n");
            return;
        }
        out.push_str(
            "<table><tr><th>Gate</th><th class=\"num\">Value</th><th class=\"num\">Limit</th>\
             <th>Verdict</th><th>Figures</th></tr>\n",
        );
        for g in &r.gates {
            let verdict = match (g.tripped, r.forced) {
                (false, _) => "<span class=\"ok\">passed</span>",
                (true, false) => "<span class=\"tripped\">tripped</span>",
                (true, true) => "<span class=\"tripped\">tripped, published by --force</span>",
            };
            let _ = writeln!(
                out,
                "<tr data-gate=\"{g_}\"><td><code>{g_}</code></td><td class=\"num\" data-value=\"{v}\">{v:.4}</td>\
                 <td class=\"num\" data-value=\"{l}\">{l}</td><td>{verdict}</td><td>{}</td></tr>",
                esc(&g.detail),
                g_ = esc(&g.gate),
                v = g.value,
                l = g.limit,
            );
        }
        out.push_str("</table></section>\n");
    }

    fn schema(&self, out: &mut String) {
        out.push_str("<section id=\"schema\"><h2>Schema changes</h2>\n");
        let r = self.report;
        match (r.schema_changes.as_slice(), r.manifest_compared.as_deref()) {
            ([], None) if r.dry_run => out.push_str(
                "<p class=\"note\">Not compared: a dry run does not read the bucket's manifest.</p>\n",
            ),
            ([], None) => out.push_str(
                "<p class=\"note\">Not compared: the run ended before it read the bucket's manifest.</p>\n",
            ),
            ([], Some("")) => out.push_str(
                "<p class=\"note\">The bucket has no manifest of this state yet: nothing to compare with.</p>\n",
            ),
            ([], Some(run)) => {
                let _ = writeln!(
                    out,
                    "<p class=\"note\">No column added, removed or retyped since the bucket's manifest (run <code>{}</code>).</p>",
                    esc(run)
                );
            }
            (changes, _) => {
                out.push_str("<ul>\n");
                for c in changes {
                    let _ = writeln!(out, "<li><code>{}</code></li>", esc(&c.describe()));
                }
                out.push_str("</ul>\n");
            }
        }
        out.push_str("</section>\n");
    }

    /// The change sets this publish sent, or why there are none.
    fn changes(&self, out: &mut String) {
        let r = self.report;
        out.push_str("<section id=\"changes\"><h2>Changes since the last publish</h2>\n");
        if let Some(why) = &r.changes_baseline {
            let _ = writeln!(
                out,
                "<p class=\"note\">No change set: this snapshot starts a new baseline ({}).</p>",
                esc(why)
            );
        } else if r.changes_base_run_id.is_none() {
            out.push_str("<p class=\"note\">Not compared: only a run that publishes compares its rows with the last published snapshot.</p>\n");
        } else if r.changes.is_empty() {
            out.push_str("<p class=\"note\">No good row added, changed or removed since the last publish.</p>\n");
        } else {
            let _ = writeln!(
                out,
                "<p class=\"note\">Against the snapshot of run <code>{}</code>; a row that turned bad is removed here, a bad row fixed is added.</p>",
                esc(r.changes_base_run_id.as_deref().unwrap_or_default())
            );
            out.push_str("<table><tr><th>Entity</th><th>Change</th><th class=\"num\">Rows</th><th>First keys</th></tr>\n");
            for c in &r.changes {
                for (kind, n) in [
                    ("added", c.added),
                    ("changed", c.changed),
                    ("removed", c.removed),
                ] {
                    let keys = c
                        .examples
                        .get(kind)
                        .map(|k| k.join(", "))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "<tr><th>{entity}</th><td>{kind}</td><td class=\"num\" data-metric=\"changes.{entity}.{kind}\" data-value=\"{n}\">{n}</td><td class=\"mono\">{}</td></tr>",
                        esc(&keys),
                        entity = c.entity.as_str(),
                    );
                }
            }
            out.push_str("</table>\n");
        }
        out.push_str("</section>\n");
    }

    fn samples(&self, out: &mut String) {
        out.push_str("<section id=\"samples\"><h2>Failing rows</h2>\n");
        if self.sample_rows == 0 {
            out.push_str("<p class=\"note\">Samples are off (<code>[report] sample_rows = 0</code>).</p></section>\n");
            return;
        }
        if self.samples.is_empty() {
            out.push_str("<p class=\"note\">No rule caught a row.</p></section>\n");
            return;
        }
        if self.withheld {
            out.push_str("<p class=\"note\">The failing rows may hold personal data: they are on the page the host keeps (<code>outreach-workbench report</code>), not in the bucket (<code>[report] publish_samples = false</code>).</p></section>\n");
            return;
        }
        let _ = writeln!(
            out,
            "<p class=\"note\">Up to {} rows per rule, by key: the key and the columns the rule reads.</p>",
            self.sample_rows
        );
        for s in self.samples {
            let total = self
                .report
                .counts(s.entity)
                .and_then(|c| c.errors.get(&s.code).or(c.warnings.get(&s.code)))
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "<h3>{} · <code>{}</code> <span class=\"note\">({} of {})</span></h3>",
                s.entity,
                esc(&s.code),
                s.rows.len(),
                int(total)
            );
            let _ = write!(
                out,
                "<table data-sample=\"{}.{}\"><tr>",
                s.entity,
                esc(&s.code)
            );
            for c in &s.columns {
                let _ = write!(out, "<th>{}</th>", esc(c));
            }
            out.push_str("</tr>\n");
            for row in &s.rows {
                out.push_str("<tr>");
                for v in row {
                    match v {
                        Some(v) => {
                            let _ = write!(out, "<td class=\"mono\">{}</td>", esc(v));
                        }
                        None => out.push_str("<td class=\"null\">NULL</td>"),
                    }
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n");
        }
        out.push_str("</section>\n");
    }

    fn charts(&self, out: &mut String) {
        // The runs that got as far as counting.
        let runs: Vec<&RunReport> = self
            .history
            .iter()
            .filter(|r| r.companies.is_some() || r.people.is_some())
            .collect();
        if runs.is_empty() {
            out.push_str("<section id=\"charts\"><h2>Recent runs</h2>\n<p class=\"note\">No run of this state has counted its rows yet: nothing to chart.</p></section>\n");
            return;
        }
        let _ = writeln!(
            out,
            "<section id=\"charts\"><h2>Recent runs</h2>\n<p class=\"note\">The state's last {} runs that counted their rows, oldest first.</p>\n<div class=\"charts\">",
            runs.len()
        );
        let marks: Vec<RunMark> = runs
            .iter()
            .map(|r| RunMark {
                run_id: r.run_id.clone(),
                label: format!(
                    "{}{}",
                    r.started_at.format("%Y-%m-%d %H:%M"),
                    if r.dry_run { " (dry)" } else { "" }
                ),
            })
            .collect();
        for e in Entity::ALL {
            let of = |f: fn(&EntityCounts) -> u64| -> Vec<Option<u64>> {
                runs.iter().map(|r| r.counts(e).map(f)).collect()
            };
            let series = vec![
                Series {
                    name: "pulled".into(),
                    values: of(|c| c.raw),
                },
                Series {
                    name: "good".into(),
                    values: of(|c| c.good),
                },
                Series {
                    name: "bad".into(),
                    values: of(|c| c.bad),
                },
            ];
            out.push_str(&line_chart(
                &format!("{e}-rows"),
                &format!("{e}: rows"),
                &marks,
                &series,
            ));
            // Every rule any of these runs counted.
            let mut codes: Vec<String> = runs
                .iter()
                .filter_map(|r| r.counts(e))
                .flat_map(|c| c.errors.keys().chain(c.warnings.keys()).cloned())
                .collect();
            codes.sort();
            codes.dedup();
            if codes.is_empty() {
                continue;
            }
            let series: Vec<Series> = codes
                .iter()
                .map(|code| Series {
                    name: code.clone(),
                    values: runs
                        .iter()
                        .map(|r| {
                            r.counts(e).map(|c| {
                                c.errors
                                    .get(code)
                                    .or(c.warnings.get(code))
                                    .copied()
                                    .unwrap_or(0)
                            })
                        })
                        .collect(),
                })
                .collect();
            out.push_str(&line_chart(
                &format!("{e}-rules"),
                &format!("{e}: rows caught by each rule"),
                &marks,
                &series,
            ));
        }
        out.push_str("</div></section>\n");
    }

    fn files(&self, out: &mut String) {
        let r = self.report;
        out.push_str("<section id=\"files\"><h2>Files</h2>\n");
        if r.files.is_empty() {
            out.push_str("<p class=\"note\">No file was written.</p></section>\n");
            return;
        }
        out.push_str(
            "<table><tr><th>File</th><th class=\"num\">Rows</th><th class=\"num\">Bytes</th>\
             <th>sha256</th><th>In the bucket</th></tr>\n",
        );
        for f in &r.files {
            let action = r
                .objects
                .iter()
                .find(|o| o.table_name == f.table_name)
                .map(|o| o.action.as_str())
                .unwrap_or(if r.dry_run { "dry run" } else { "-" });
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"mono\">{}…</td><td>{action}</td></tr>",
                esc(&f.table_name),
                int(f.rows),
                int(f.bytes),
                esc(&f.sha256[..f.sha256.len().min(12)]),
            );
        }
        out.push_str("</table>\n");
        if let Some(m) = &r.manifest {
            let _ = writeln!(out, "<p>Manifest: <code>{}</code></p>", esc(m));
        }
        out.push_str("</section>\n");
    }

    fn validated(&self) -> impl Iterator<Item = (Entity, &EntityCounts)> {
        Entity::ALL
            .into_iter()
            .filter_map(|e| self.report.counts(e).map(|c| (e, c)))
    }
}

/// Each rule's count with its severity: errors, then warnings.
fn rule_counts(c: &EntityCounts) -> impl Iterator<Item = (&String, u64, &'static str)> {
    c.errors
        .iter()
        .map(|(k, v)| (k, *v, "error"))
        .chain(c.warnings.iter().map(|(k, v)| (k, *v, "warn")))
}
