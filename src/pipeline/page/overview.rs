//! The all-states run's page: every state with its counts, bad ratios and
//! status, linking to each state's own page. Sorted by state; a click on a
//! column's head sorts by it (a few lines of inline script: without
//! JavaScript the table is all there, in state order).

use std::fmt::Write as _;

use super::html::{document, esc, int, num_cell, share, status_badge};
use crate::names::Entity;
use crate::pipeline::report::RunReport;

/// What the overview shows of the batch.
pub struct Overview<'a> {
    pub batch_id: &'a str,
    pub dry_run: bool,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub error: Option<&'a str>,
    pub runs: &'a [RunReport],
    /// Rows whose state value names no state: (value, companies, people).
    pub invalid: Vec<(String, u64, u64)>,
    pub not_run: Vec<String>,
    /// Each run's page, as a link relative to the overview (by run id).
    pub link: &'a dyn Fn(&RunReport) -> Option<String>,
}

const SORT: &str = r#"
document.querySelectorAll('th[data-sort]').forEach(function (th) {
  th.addEventListener('click', function () {
    var col = th.cellIndex;
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var down = th.getAttribute('aria-sort') !== 'descending';
    var key = function (r) { var c = r.cells[col]; var v = c.getAttribute('data-value');
      return v === null ? c.textContent : parseFloat(v); };
    rows.sort(function (a, b) { var x = key(a), y = key(b);
      var o = typeof x === 'number' ? x - y : String(x).localeCompare(String(y));
      return down ? -o : o; });
    th.parentNode.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', down ? 'descending' : 'ascending');
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"#;

impl Overview<'_> {
    pub fn render(&self) -> String {
        let mut body = String::new();
        let mut by_status = std::collections::BTreeMap::<&str, usize>::new();
        for r in self.runs {
            *by_status.entry(r.status.as_str()).or_default() += 1;
        }
        let statuses = by_status
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            body,
            "<header><h1>All states{}</h1>\n<p class=\"meta\">Run <code>{}</code>, started {} UTC: \
             <span data-metric=\"states\" data-value=\"{}\">{} states</span>{}.</p>",
            if self.dry_run { " <span class=\"status\">dry run</span>" } else { "" },
            esc(self.batch_id),
            self.started_at.format("%Y-%m-%d %H:%M:%S"),
            self.runs.len(),
            self.runs.len(),
            if statuses.is_empty() { String::new() } else { format!(" ({statuses})") },
        );
        if let Some(e) = self.error {
            let _ = writeln!(body, "<p class=\"tripped\">{}</p>", esc(e));
        }
        if !self.not_run.is_empty() {
            let _ = writeln!(
                body,
                "<p class=\"tripped\">Not run (the run was stopped first): {}</p>",
                esc(&self.not_run.join(", "))
            );
        }
        body.push_str("</header>\n");
        self.table(&mut body);
        self.invalid(&mut body);
        document("All states · outreach-workbench", &body, Some(SORT))
    }

    fn table(&self, out: &mut String) {
        out.push_str("<section id=\"states\"><h2>States</h2>\n<table><thead><tr>");
        let heads = [
            ("State", false),
            ("Status", false),
            ("Companies", true),
            ("Bad", true),
            ("Bad share", true),
            ("People", true),
            ("Bad", true),
            ("Bad share", true),
            ("Gates tripped", false),
        ];
        for (h, num) in heads {
            let _ = write!(
                out,
                "<th data-sort{}>{h}</th>",
                if num { " class=\"num\"" } else { "" }
            );
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for r in self.runs {
            let state = match (self.link)(r) {
                Some(href) => format!("<a href=\"{}\">{}</a>", esc(&href), esc(&r.state)),
                None => esc(&r.state),
            };
            let _ = write!(
                out,
                "<tr data-state=\"{s}\"><td>{state}</td><td>{}</td>",
                status_badge(r.status.as_str()),
                s = esc(&r.state)
            );
            for e in Entity::ALL {
                match r.counts(e) {
                    Some(c) => {
                        let ratio = if c.raw == 0 { 0.0 } else { c.bad as f64 / c.raw as f64 };
                        let _ = write!(
                            out,
                            "{}{}<td class=\"num\" data-value=\"{ratio:.6}\">{}</td>",
                            num_cell(&format!("{}.{e}.pulled", r.state), c.raw),
                            num_cell(&format!("{}.{e}.bad", r.state), c.bad),
                            share(c.bad, c.raw)
                        );
                    }
                    None => out.push_str(
                        "<td class=\"num\" data-value=\"-1\">-</td><td class=\"num\" data-value=\"-1\">-</td>\
                         <td class=\"num\" data-value=\"-1\">-</td>",
                    ),
                }
            }
            let tripped: Vec<&str> = r
                .gates
                .iter()
                .filter(|g| g.tripped)
                .map(|g| g.gate.as_str())
                .collect();
            let _ = writeln!(out, "<td>{}</td></tr>", esc(&tripped.join(", ")));
        }
        out.push_str("</tbody></table></section>\n");
    }

    fn invalid(&self, out: &mut String) {
        out.push_str("<section id=\"invalid\"><h2>Rows of no state</h2>\n");
        if self.invalid.is_empty() {
            out.push_str(
                "<p class=\"note\">Every row's state value names a state.</p></section>\n",
            );
            return;
        }
        out.push_str(
            "<p class=\"note\">Counted, published nowhere.</p>\n<table><tr><th>State value</th>\
             <th class=\"num\">Companies</th><th class=\"num\">People</th></tr>\n",
        );
        for (value, companies, people) in &self.invalid {
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(value),
                int(*companies),
                int(*people)
            );
        }
        out.push_str("</table></section>\n");
    }
}
