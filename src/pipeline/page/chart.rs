//! Line charts of a state's recent runs, drawn as inline SVG: no script,
//! no library, readable in any browser and from the bucket. Every point
//! carries its run and value (`data-run`, `data-value`) and a tooltip.

use std::fmt::Write as _;

use super::html::{esc, int};

/// One run on the x axis.
pub struct RunMark {
    pub run_id: String,
    /// `2026-12-07 06:00`.
    pub label: String,
}

/// One line: a value per run, `None` where the run has none.
pub struct Series {
    pub name: String,
    pub values: Vec<Option<u64>>,
}

const COLOURS: [&str; 8] = [
    "#2f6fdf", "#1f9d55", "#d64545", "#c27c0e", "#7b4fd1", "#0f8f8f", "#b8467f", "#5b6576",
];
/// Each line's dash pattern as well as its colour, so that the lines and
/// the legend read without colour (printed in grey, or colour-blind).
const DASHES: [&str; 6] = ["", "7 4", "2 3", "9 3 2 3", "1 6", "12 6"];
const W: f64 = 500.0;
const H: f64 = 200.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 26.0;

/// A chart titled `caption` of `series` over `runs` (oldest first).
pub fn line_chart(id: &str, caption: &str, runs: &[RunMark], series: &[Series]) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let x = |i: usize| match runs.len() {
        0 | 1 => LEFT + (W - LEFT - RIGHT) / 2.0,
        n => LEFT + (W - LEFT - RIGHT) * i as f64 / (n - 1) as f64,
    };
    let y = |v: u64| TOP + (H - TOP - BOTTOM) * (1.0 - v as f64 / max as f64);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<figure id=\"{id}\" data-chart=\"{id}\"><figcaption>{cap}</figcaption>\n\
         <svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{cap}\">",
        id = esc(id),
        cap = esc(caption)
    );
    // The axis: 0, half and the top, with their values.
    for v in [0, max / 2, max] {
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e3e7ee\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            int(v),
            y = y(v)
        );
    }
    if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
        let _ = write!(
            svg,
            "<text x=\"{LEFT}\" y=\"{}\">{}</text>",
            H - 8.0,
            esc(&first.label)
        );
        if runs.len() > 1 {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                W - RIGHT,
                H - 8.0,
                esc(&last.label)
            );
        }
    }
    for (n, (s, colour)) in series.iter().zip(COLOURS.iter().cycle()).enumerate() {
        let points: Vec<(usize, u64)> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect();
        let line = points
            .iter()
            .map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            svg,
            "<g data-series=\"{name}\"><polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{line}\"/>",
            name = esc(&s.name),
            dash = DASHES[n % DASHES.len()],
        );
        for (i, v) in points {
            let run = &runs[i];
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\" data-run=\"{}\" data-value=\"{v}\">\
                 <title>{} · {}: {}</title></circle>",
                x(i),
                y(v),
                esc(&run.run_id),
                esc(&run.label),
                esc(&s.name),
                int(v)
            );
        }
        svg.push_str("</g>\n");
    }
    svg.push_str("</svg>\n<div class=\"legend\">");
    for (n, (s, colour)) in series.iter().zip(COLOURS.iter().cycle()).enumerate() {
        let _ = write!(
            svg,
            "<span><svg width=\"26\" height=\"8\" aria-hidden=\"true\"><line x1=\"0\" y1=\"4\" x2=\"26\" y2=\"4\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{}\"/></svg> {}</span>",
            DASHES[n % DASHES.len()],
            esc(&s.name)
        );
    }
    svg.push_str("</div></figure>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_point_carries_its_run_and_value() {
        let runs = vec![
            RunMark {
                run_id: "a".into(),
                label: "first".into(),
            },
            RunMark {
                run_id: "b".into(),
                label: "second".into(),
            },
        ];
        let series = vec![Series {
            name: "good".into(),
            values: vec![Some(10), None],
        }];
        let svg = line_chart("c", "Companies", &runs, &series);
        assert!(svg.contains("data-run=\"a\" data-value=\"10\""), "{svg}");
        assert!(!svg.contains("data-run=\"b\""), "{svg}");
        assert!(svg.contains("<title>first · good: 10</title>"), "{svg}");
        // A second line differs by its dashes too, on the chart and in
        // the legend.
        let two = [
            Series {
                name: "good".into(),
                values: vec![Some(1), Some(2)],
            },
            Series {
                name: "bad".into(),
                values: vec![Some(3), Some(4)],
            },
        ];
        let svg = line_chart("c", "Companies", &runs, &two);
        assert_eq!(svg.matches("stroke-dasharray=\"7 4\"").count(), 2, "{svg}");
    }
}
