//! The pieces every page shares: escaping, number formats, the style, and
//! the document around a page's body. A page loads nothing from elsewhere:
//! its Content-Security-Policy lets it load nothing but what it carries, so
//! that it reads the same from `file://` and from the bucket, offline.

use std::fmt::Write as _;

/// `s` safe as HTML text or a quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567` as `1,234,567`.
pub fn int(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `part` of `whole` as a percentage with one decimal; `-` of nothing.
pub fn share(part: u64, whole: u64) -> String {
    match whole {
        0 => "-".into(),
        _ => format!("{:.1} %", part as f64 * 100.0 / whole as f64),
    }
}

/// A table cell holding a number: shown formatted, its value in
/// `data-value` (what the overview sorts by and the tests read).
pub fn num_cell(metric: &str, n: u64) -> String {
    format!(
        "<td class=\"num\" data-metric=\"{}\" data-value=\"{n}\">{}</td>",
        esc(metric),
        int(n)
    )
}

/// How a run ended, as a coloured word.
pub fn status_badge(status: &str) -> String {
    format!(
        "<span class=\"status status-{s}\" data-metric=\"status\">{s}</span>",
        s = esc(status)
    )
}

const STYLE: &str = "
:root { color-scheme: light; --ink: #1d2430; --muted: #5b6576; --line: #d9dee7; --bg: #f6f7fa; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: var(--ink);
       margin: 0 auto; padding: 24px; max-width: 1100px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.meta { color: var(--muted); margin: 0; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, td.mono { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 13px; }
td.null { color: var(--muted); font-style: italic; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px;
          font-weight: 600; background: #e4e7ec; }
.status-success { background: #d3f2dc; color: #135c2b; }
.status-gated { background: #fde8c4; color: #7a4b00; }
.status-failed, .status-abandoned { background: #fbd5d5; color: #8a1c1c; }
.tripped { color: #8a1c1c; font-weight: 600; } .ok { color: #135c2b; }
.note { color: var(--muted); }
.worse { border-left: 4px solid #8a1c1c; padding: 2px 12px; margin: 8px 0 12px; background: #fdf3f3; }
tr.detail td { border-bottom: 1px solid var(--line); color: var(--muted); font-size: 13px; padding-top: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; width: 500px; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 2px 14px; } .legend span { white-space: nowrap; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
th[data-sort] { cursor: pointer; }
footer { margin-top: 32px; color: var(--muted); font-size: 13px; }
";

/// The whole page: `title`, then `body`, then `script` (none for most).
pub fn document(title: &str, body: &str, script: Option<&str>) -> String {
    let mut page = String::with_capacity(body.len() + STYLE.len() + 1024);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}",
        esc(title)
    );
    if let Some(script) = script {
        let _ = writeln!(page, "<script>{script}</script>");
    }
    let _ = writeln!(
        page,
        "<footer>Written by outreach-workbench {}.</footer>\n</body>\n</html>",
        env!("CARGO_PKG_VERSION")
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_numbers_grouped() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1000), "1,000");
        assert_eq!(int(1234567), "1,234,567");
        assert_eq!(share(1, 3), "33.3 %");
        assert_eq!(share(1, 0), "-");
    }
}
