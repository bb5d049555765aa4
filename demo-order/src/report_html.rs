//! A self-contained HTML report of a demo run: the verdict, the summary table and two SVG charts
//! (sync delay p99 per path with the order confirmation p99, and backlog per path), with the
//! chaos kills and reconciliations marked on both.
//!
//! The file has no network dependency: the data is embedded as JSON in
//! `<script type="application/json" id="data">`, and a small inline script (plain JS) draws the
//! charts. Once drawn, it sets `data-rendered="yes"` and `data-points="<points drawn>"` on
//! `<body>`, so a headless browser's dumped DOM tells whether the page really drew.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One sample of the run's timeline (taken every ~500 ms by the driver).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// Per sync path ("push", "capture", "pull", "dual"): p99 of warehouse-commit ->
    /// centre-applied delay (ms) of the movements applied since the previous sample; None when
    /// none were applied.
    pub sync_p99_ms: BTreeMap<String, Option<f64>>,
    /// Per sync path: movements committed in the warehouse and not yet applied in the centre.
    pub backlog: BTreeMap<String, i64>,
    /// p99 of order created -> confirmed (ms) of orders confirmed since the previous sample.
    pub confirm_p99_ms: Option<f64>,
}

/// A marked moment (a chaos kill, a reconciliation).
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    /// Seconds since the load started.
    pub t: f64,
    /// What happened (shown next to the line).
    pub label: String,
}

/// Everything the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Page title (also the `<h1>`).
    pub title: String,
    /// The summary table, already formatted: (row label, one cell per column).
    pub columns: Vec<String>,
    /// The summary table's rows: (row label, one cell per column).
    pub rows: Vec<(String, Vec<String>)>,
    /// The run's timeline.
    pub samples: Vec<Sample>,
    /// Marked moments, drawn on both charts.
    pub marks: Vec<Mark>,
    /// The verdict line shown on top (e.g. "CONSISTENT: ...").
    pub verdict: String,
}

/// Writes the page as ONE self-contained HTML file (no network, no external scripts/fonts/CSS).
pub fn write(path: &Path, page: &Page) -> std::io::Result<()> {
    std::fs::write(path, render(page))
}

/// The HTML text (write() uses it).
pub fn render(page: &Page) -> String {
    let mut html = String::with_capacity(16 * 1024 + page.samples.len() * 256);
    let title = escape(&page.title);
    let verdict_class = verdict_class(&page.verdict);
    // Writing into a String cannot fail; the results are ignored on purpose.
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n\
         <body data-rendered=\"no\" data-points=\"0\">\n<main>\n<h1>{title}</h1>\n\
         <p id=\"verdict\" class=\"{verdict_class}\">{}</p>\n",
        escape(&page.verdict)
    );
    html.push_str(
        "<section class=\"chart\">\n<h2>sync delay p99 (ms) per path</h2>\n\
         <svg id=\"chart-sync\" role=\"img\" aria-label=\"sync delay p99 (ms) per path\"></svg>\n\
         </section>\n<section class=\"chart\">\n<h2>backlog per path</h2>\n\
         <svg id=\"chart-backlog\" role=\"img\" aria-label=\"backlog per path\"></svg>\n\
         </section>\n",
    );
    summary_table(&mut html, page);
    html.push_str("</main>\n<script type=\"application/json\" id=\"data\">");
    html.push_str(&json_for_script(page));
    html.push_str("</script>\n<script id=\"draw\">");
    html.push_str(SCRIPT);
    html.push_str("</script>\n</body>\n</html>\n");
    html
}

/// `consistent` / `inconsistent` / `neutral`, to colour the verdict line.
fn verdict_class(verdict: &str) -> &'static str {
    let head = verdict.trim_start().to_ascii_uppercase();
    if head.starts_with("CONSISTENT") || head.starts_with("PASS") || head.starts_with("OK") {
        "consistent"
    } else if head.starts_with("INCONSISTENT")
        || head.starts_with("FAIL")
        || head.starts_with("LOST")
    {
        "inconsistent"
    } else {
        "neutral"
    }
}

fn summary_table(html: &mut String, page: &Page) {
    html.push_str("<section>\n<h2>summary</h2>\n<table id=\"summary\">\n<thead><tr><th></th>");
    for column in &page.columns {
        let _ = write!(html, "<th scope=\"col\">{}</th>", escape(column));
    }
    html.push_str("</tr></thead>\n<tbody>\n");
    for (label, cells) in &page.rows {
        let _ = write!(html, "<tr><th scope=\"row\">{}</th>", escape(label));
        for cell in cells {
            let _ = write!(html, "<td>{}</td>", escape(cell));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>\n</section>\n");
}

/// The page as JSON that is safe inside a `<script>` element: `<`, `>` and `&` are written as
/// `\u003c`, `\u003e`, `\u0026` (still the same JSON), so no string can close the element.
fn json_for_script(page: &Page) -> String {
    // Serializing these plain structs cannot fail (string keys, NaN becomes null); should it
    // ever, the script draws an empty page and says so.
    let json = serde_json::to_string(page).unwrap_or_else(|_| "null".to_owned());
    let mut out = String::with_capacity(json.len() + 64);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// HTML-escapes text for element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

const STYLE: &str = r#"
:root { color-scheme: light; }
body { margin: 0; background: #f6f7f9; color: #1d232b;
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 12px 20px 28px; }
h1 { font-size: 20px; margin: 4px 0 6px; }
h2 { font-size: 15px; margin: 0 0 4px; font-weight: 600; }
#verdict { margin: 0 0 12px; padding: 7px 12px; border-radius: 4px; font-weight: 600;
  background: #e8ebef; border-left: 5px solid #7a8594; }
#verdict.consistent { background: #e3f4e8; border-left-color: #23a55a; }
#verdict.inconsistent { background: #fbe4e4; border-left-color: #d43d3d; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 12px;
  margin: 0 0 12px; }
svg { display: block; width: 100%; height: auto; }
svg text { font-size: 11px; fill: #4a5360; }
svg .axis line, svg .axis path { stroke: #8a939f; stroke-width: 1; }
svg .axis line.grid { stroke: #e9ecef; stroke-width: 1; }
svg .series { fill: none; stroke-width: 1.8; stroke-linejoin: round; stroke-linecap: round; }
svg .series[data-series="confirm"] { stroke-dasharray: 6 3; stroke-width: 2.2; }
svg .mark { stroke: #c0392b; stroke-width: 1.3; stroke-dasharray: 5 4; }
svg text.mark-label { fill: #c0392b; font-weight: 600; }
svg .legend text { font-size: 12px; fill: #1d232b; }
svg text.axis-title { font-size: 11px; fill: #6b7480; }
svg text.empty { font-size: 14px; fill: #8a939f; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e6e9ed; text-align: right; }
thead th { border-bottom: 2px solid #c9ced5; }
tbody th { text-align: left; font-weight: 500; color: #3a424d; }
"#;

/// Draws both charts from the embedded JSON, then marks `<body>` as rendered.
const SCRIPT: &str = r##"
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 1180, H = 320, M = { top: 34, right: 18, bottom: 40, left: 64 };
  var ORDER = ["push", "capture", "pull", "dual"];
  var COLORS = { push: "#1f77b4", capture: "#2ca02c", pull: "#ff7f0e", dual: "#9467bd",
    confirm: "#d62728" };
  var EXTRA = ["#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, String(attrs[k])); }
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, attrs) {
    var a = attrs || {};
    a.x = x; a.y = y;
    var t = el("text", a, parent);
    t.textContent = s;
    return t;
  }
  function num(v) { return typeof v === "number" && isFinite(v); }
  function colorOf(name, i) { return COLORS[name] || EXTRA[i % EXTRA.length]; }
  function niceStep(range, count) {
    if (!(range > 0)) return 1;
    var raw = range / count, p = Math.pow(10, Math.floor(Math.log(raw) / Math.LN10)), f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
  }
  function fmt(v, step) {
    var d = step >= 1 ? 0 : Math.min(6, Math.ceil(-Math.log(step) / Math.LN10));
    var s = v.toFixed(d);
    return Math.abs(v) >= 10000 ? Number(s).toLocaleString("en-US") : s;
  }
  function pathNames(samples, field) {
    var seen = {};
    samples.forEach(function (s) { Object.keys(s[field] || {}).forEach(function (k) { seen[k] = true; }); });
    var known = ORDER.filter(function (k) { return seen[k]; });
    var rest = Object.keys(seen).filter(function (k) { return ORDER.indexOf(k) < 0; }).sort();
    return known.concat(rest);
  }

  // series: [{ name, cls, points: [[t, v or null], ...] }]; returns the points drawn.
  function chart(svg, series, marks, yTitle) {
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    var pw = W - M.left - M.right, ph = H - M.top - M.bottom;
    var tMin = Infinity, tMax = -Infinity, yMax = 0, drawn = 0;
    series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (num(p[0])) { tMin = Math.min(tMin, p[0]); tMax = Math.max(tMax, p[0]); }
        if (num(p[1])) yMax = Math.max(yMax, p[1]);
      });
    });
    marks.forEach(function (m) { if (num(m.t)) { tMin = Math.min(tMin, m.t); tMax = Math.max(tMax, m.t); } });
    if (!isFinite(tMin)) { tMin = 0; tMax = 1; }
    tMin = Math.min(0, tMin);
    if (!(tMax > tMin)) tMax = tMin + 1;
    var yTop = yMax > 0 ? yMax * 1.1 : 1;
    function X(t) { return M.left + (t - tMin) / (tMax - tMin) * pw; }
    function Y(v) { return M.top + ph - v / yTop * ph; }

    // Grid, axes, ticks.
    var axes = el("g", { "class": "axis" }, svg);
    var yStep = niceStep(yTop, 5);
    for (var yv = 0; yv <= yTop + 1e-9; yv += yStep) {
      el("line", { "class": "grid", x1: M.left, x2: M.left + pw, y1: Y(yv), y2: Y(yv) }, axes);
      el("line", { x1: M.left - 5, x2: M.left, y1: Y(yv), y2: Y(yv) }, axes);
      text(axes, M.left - 8, Y(yv) + 4, fmt(yv, yStep), { "class": "tick", "text-anchor": "end" });
    }
    var xStep = niceStep(tMax - tMin, 10);
    for (var xv = Math.ceil(tMin / xStep) * xStep; xv <= tMax + 1e-9; xv += xStep) {
      el("line", { x1: X(xv), x2: X(xv), y1: M.top + ph, y2: M.top + ph + 5 }, axes);
      text(axes, X(xv), M.top + ph + 18, fmt(xv, xStep), { "class": "tick", "text-anchor": "middle" });
    }
    el("line", { x1: M.left, x2: M.left, y1: M.top, y2: M.top + ph }, axes);
    el("line", { x1: M.left, x2: M.left + pw, y1: M.top + ph, y2: M.top + ph }, axes);
    text(axes, M.left + pw, H - 4, "seconds since the load started", { "class": "axis-title", "text-anchor": "end" });
    text(axes, 6, M.top - 14, yTitle, { "class": "axis-title" });

    // Series: a gap where a sample has no value; a dot where a point has no neighbour.
    series.forEach(function (s, i) {
      var color = colorOf(s.name, i), d = "", n = 0, prev = false;
      var pts = s.points;
      var g = el("g", { "class": "series-group" }, svg);
      pts.forEach(function (p, j) {
        if (!num(p[0]) || !num(p[1])) { prev = false; return; }
        var x = X(p[0]).toFixed(1), y = Y(p[1]).toFixed(1);
        d += (prev ? " L" : (d ? " M" : "M")) + x + " " + y;
        var nextOk = j + 1 < pts.length && num(pts[j + 1][1]) && num(pts[j + 1][0]);
        if (!prev && !nextOk) el("circle", { "class": "dot", cx: x, cy: y, r: 2.5, fill: color }, g);
        prev = true; n += 1;
      });
      el("path", { "class": s.cls, "data-series": s.name, "data-points": n, d: d, stroke: color }, g);
      drawn += n;
    });

    // Marks: a dashed vertical line with its label, labels staggered so neighbours stay legible.
    var mg = el("g", { "class": "marks" }, svg);
    marks.forEach(function (m, i) {
      if (!num(m.t)) return;
      var x = X(m.t);
      el("line", { "class": "mark", x1: x, x2: x, y1: M.top, y2: M.top + ph, "data-t": m.t }, mg);
      var right = x > M.left + pw * 0.8;
      text(mg, right ? x - 4 : x + 4, M.top + 12 + (i % 3) * 14, String(m.label),
        { "class": "mark-label", "text-anchor": right ? "end" : "start" });
    });

    // Legend, in the top margin, right-aligned.
    var lg = el("g", { "class": "legend" }, svg), lx = M.left + pw;
    for (var k = series.length - 1; k >= 0; k--) {
      var label = series[k].label || series[k].name;
      var w = 30 + label.length * 7;
      lx -= w;
      var item = el("g", { "class": "legend-item", "data-series": series[k].name }, lg);
      el("line", { x1: lx, x2: lx + 20, y1: 14, y2: 14, stroke: colorOf(series[k].name, k),
        "stroke-width": 3, "stroke-dasharray": series[k].name === "confirm" ? "6 3" : "none" }, item);
      text(item, lx + 25, 18, label);
    }
    if (drawn === 0) text(svg, M.left + pw / 2, M.top + ph / 2, "no data", { "class": "empty", "text-anchor": "middle" });
    return drawn;
  }

  var body = document.body;
  try {
    var data = JSON.parse(document.getElementById("data").textContent) || {};
    var samples = data.samples || [], marks = data.marks || [];
    var sync = pathNames(samples, "sync_p99_ms").map(function (name) {
      return { name: name, cls: "series", points: samples.map(function (s) {
        var v = (s.sync_p99_ms || {})[name]; return [s.t, num(v) ? v : null]; }) };
    });
    sync.push({ name: "confirm", label: "order created -> confirmed p99", cls: "series",
      points: samples.map(function (s) { return [s.t, num(s.confirm_p99_ms) ? s.confirm_p99_ms : null]; }) });
    var backlog = pathNames(samples, "backlog").map(function (name) {
      return { name: name, cls: "series backlog", points: samples.map(function (s) {
        var v = (s.backlog || {})[name]; return [s.t, num(v) ? v : null]; }) };
    });
    var total = chart(document.getElementById("chart-sync"), sync, marks, "p99 delay (ms)");
    total += chart(document.getElementById("chart-backlog"), backlog, marks, "movements not yet applied");
    body.dataset.points = String(total);
    body.dataset.rendered = "yes";
  } catch (e) {
    body.dataset.rendered = "error";
    body.dataset.error = String(e && e.message || e);
  }
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;

    fn page(label: &str) -> Page {
        Page {
            title: "run <1> & co".to_owned(),
            columns: vec!["push".to_owned()],
            rows: vec![("lost".to_owned(), vec!["<0>".to_owned()])],
            samples: vec![Sample {
                t: 0.5,
                sync_p99_ms: BTreeMap::from([("push".to_owned(), Some(12.0))]),
                backlog: BTreeMap::from([("push".to_owned(), 3)]),
                confirm_p99_ms: None,
            }],
            marks: vec![Mark {
                t: 0.5,
                label: label.to_owned(),
            }],
            verdict: "CONSISTENT: \"all\" <ok>".to_owned(),
        }
    }

    #[test]
    fn labels_cannot_close_the_data_script() {
        let html = render(&page("</script><script>alert(1)</script>"));
        // Only the two real script elements are closed.
        assert_eq!(html.matches("</script>").count(), 2, "{html}");
        assert!(html.contains("\\u003c/script\\u003e"));
        let start = html.find("id=\"data\">").map(|i| i + "id=\"data\">".len());
        let start = start.expect("data script");
        let end = start + html[start..].find("</script>").expect("end of data script");
        let parsed: serde_json::Value = serde_json::from_str(&html[start..end]).expect("json");
        assert_eq!(
            parsed["marks"][0]["label"],
            "</script><script>alert(1)</script>"
        );
    }

    #[test]
    fn rust_side_text_is_escaped() {
        let html = render(&page("kill"));
        assert!(html.contains("<h1>run &lt;1&gt; &amp; co</h1>"));
        assert!(html.contains("<td>&lt;0&gt;</td>"));
        assert!(html.contains(
            "<p id=\"verdict\" class=\"consistent\">CONSISTENT: &quot;all&quot; &lt;ok&gt;</p>"
        ));
        assert!(!html.contains("data-rendered=\"yes\""));
    }
}
