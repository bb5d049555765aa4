//! The HTML report, rendered by a real browser: headless Chromium loads the written file, and
//! the checks read what its script drew (the dumped DOM) and what it looks like (a screenshot).
//!
//! Needs Debian's `chromium` (scripts/setup installs it); a missing browser fails the tests.
//! Set `REPORT_HTML_SCREENSHOT=/some/path.png` to keep a copy of the screenshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use demo_order::report_html::{self, Mark, Page, Sample};

const PATHS: [&str; 4] = ["push", "capture", "pull", "dual"];
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);
const KILL_RELAY: &str = "kill -9 relay-orders-a";
const KILL_DUAL: &str = "kill -9 warehouse-dual";

/// A fresh directory under the system temp dir, removed on drop (also when a check fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "demo-order-report-html-{tag}-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chromium() -> PathBuf {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.is_file() {
        return fixed.to_path_buf();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "chromium not found (neither /usr/bin/chromium nor `chromium` on PATH): \
             run scripts/setup, which installs Debian's chromium package"
        )
    })
}

/// Runs headless Chromium on `html` with `extra` arguments (before the URL), in a fresh profile
/// under `dir`; kills it after BROWSER_TIMEOUT. Returns its stdout.
fn run_chromium(dir: &Path, run: &str, html: &Path, extra: &[String]) -> String {
    let profile = dir.join(format!("profile-{run}"));
    std::fs::create_dir_all(&profile).expect("create the profile dir");
    let out_path = dir.join(format!("{run}.stdout"));
    let err_path = dir.join(format!("{run}.stderr"));
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg("--virtual-time-budget=5000")
    .args(extra)
    .arg(format!("file://{}", html.display()))
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start chromium");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("chromium ({run}) did not finish within {BROWSER_TIMEOUT:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).expect("read chromium's stdout");
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "chromium ({run}) exited with {status}; stderr:\n{stderr}"
    );
    println!(
        "chromium {run}: {status} in {:.1} s, {} bytes of stdout",
        started.elapsed().as_secs_f64(),
        stdout.len()
    );
    stdout
}

fn dump_dom(dir: &Path, run: &str, html: &Path) -> String {
    let dom = run_chromium(dir, run, html, &["--dump-dom".to_owned()]);
    assert!(
        dom.contains("<body"),
        "chromium printed no DOM for {run}:\n{dom}"
    );
    dom
}

/// Every start tag `<name ...>` in `html`, as its attributes (name -> value).
fn tags(html: &str, name: &str) -> Vec<BTreeMap<String, String>> {
    let open = format!("<{name}");
    let mut found = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(&open) {
        let after = &rest[at + open.len()..];
        rest = after;
        if !after.starts_with([' ', '>', '/', '\n']) {
            continue;
        }
        let end = after.find('>').unwrap_or(after.len());
        found.push(attributes(&after[..end]));
    }
    found
}

/// `a="x" b="y"` -> {a: x, b: y} (values as serialized, still HTML-escaped).
fn attributes(mut s: &str) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', '\n', '/']);
        let Some(eq) = s.find('=') else { break };
        let key = s[..eq].trim().to_owned();
        let after = &s[eq + 1..];
        let Some(body) = after.strip_prefix('"') else {
            break;
        };
        let Some(close) = body.find('"') else { break };
        attrs.insert(key, body[..close].to_owned());
        s = &body[close + 1..];
    }
    attrs
}

fn body_attr(dom: &str, key: &str) -> Option<String> {
    tags(dom, "body").first().and_then(|a| a.get(key).cloned())
}

/// A plausible 30 s run: 60 samples, the four sync paths, a relay kill at 9.5 s (order
/// confirmation stalls, then catches up) and a dual-write warehouse kill at 19.5 s (the dual path
/// applies nothing for 3 s while its backlog grows, then drains).
fn sample_page() -> Page {
    let mut samples = Vec::new();
    for i in 0..60 {
        let t = 0.5 * f64::from(i + 1);
        let wobble = |k: f64| (t * k).sin() * 0.5 + 0.5;
        let mut sync = BTreeMap::new();
        let mut backlog = BTreeMap::new();
        let dual_down = (19.5..23.0).contains(&t);
        sync.insert("push".to_owned(), Some(35.0 + 25.0 * wobble(1.7)));
        sync.insert("capture".to_owned(), Some(120.0 + 60.0 * wobble(0.9)));
        sync.insert("pull".to_owned(), Some(520.0 + 380.0 * wobble(2.3)));
        let dual = if dual_down {
            None
        } else if (23.0..25.0).contains(&t) {
            Some(3200.0 - (t - 23.0) * 1400.0)
        } else {
            Some(18.0 + 12.0 * wobble(1.1))
        };
        sync.insert("dual".to_owned(), dual);
        backlog.insert("push".to_owned(), (4.0 + 6.0 * wobble(1.3)).round() as i64);
        backlog.insert(
            "capture".to_owned(),
            (10.0 + 14.0 * wobble(0.7)).round() as i64,
        );
        backlog.insert(
            "pull".to_owned(),
            (40.0 + 35.0 * wobble(2.3)).round() as i64,
        );
        let dual_backlog = if dual_down {
            (t - 19.5) * 60.0 + 3.0
        } else if (23.0..25.0).contains(&t) {
            (25.0 - t) * 100.0
        } else {
            2.0 + 3.0 * wobble(1.9)
        };
        backlog.insert("dual".to_owned(), dual_backlog.round() as i64);
        let confirm = if (9.5..11.0).contains(&t) {
            None
        } else if (11.0..13.0).contains(&t) {
            Some(2600.0 - (t - 11.0) * 1100.0)
        } else {
            Some(180.0 + 90.0 * wobble(0.6))
        };
        samples.push(Sample {
            t,
            sync_p99_ms: sync,
            backlog,
            confirm_p99_ms: confirm,
        });
    }
    let columns = PATHS.iter().map(|p| (*p).to_owned()).collect();
    let row = |label: &str, cells: [&str; 4]| {
        (
            label.to_owned(),
            cells.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>(),
        )
    };
    Page {
        title: "demo run: 4 sync paths, 2 kills".to_owned(),
        columns,
        rows: vec![
            row(
                "movements applied",
                ["12 480", "12 480", "12 480", "12 480"],
            ),
            row("sync p99 (ms)", ["58", "176", "893", "3 204"]),
            row("max backlog", ["10", "24", "75", "213"]),
            row("lost / duplicated", ["0 / 0", "0 / 0", "0 / 0", "0 / 0"]),
            row("first p99 < 1 s after kill", ["-", "-", "-", "5.5 s"]),
        ],
        samples,
        marks: vec![
            Mark {
                t: 9.5,
                label: KILL_RELAY.to_owned(),
            },
            Mark {
                t: 19.5,
                label: KILL_DUAL.to_owned(),
            },
        ],
        verdict: "CONSISTENT: centre stock == sum of warehouses on all 4 paths; \
                  0 lost, 0 duplicated (<= 2 reconciliations)"
            .to_owned(),
    }
}

#[test]
fn chromium_draws_the_report() {
    let dir = TempDir::new("draws");
    let page = sample_page();
    let html_path = dir.0.join("report.html");
    report_html::write(&html_path, &page).expect("write the report");
    let static_html = std::fs::read_to_string(&html_path).expect("read the report back");
    // What is checked below is drawn by the browser: none of it is in the file as written.
    assert!(!static_html.contains("data-rendered=\"yes\""));
    assert!(tags(&static_html, "path").is_empty());
    // Self-contained: the only URL is the SVG namespace; nothing is loaded from anywhere.
    let stripped = static_html.replace("\"http://www.w3.org/2000/svg\"", "");
    for external in [
        "http:", "https:", "file:", " src=", "<link", "@import", "url(",
    ] {
        assert!(
            !stripped.contains(external),
            "the report refers to {external}"
        );
    }

    let dom = dump_dom(&dir.0, "dom", &html_path);
    assert_eq!(
        body_attr(&dom, "data-rendered").as_deref(),
        Some("yes"),
        "the page's script did not finish drawing (data-error: {:?})",
        body_attr(&dom, "data-error")
    );
    let total: usize = body_attr(&dom, "data-points")
        .and_then(|p| p.parse().ok())
        .expect("a numeric data-points on <body>");
    assert!(total > 0, "no points drawn");

    // The first chart: a path per sync path plus "confirm"; the second: a path per sync path.
    let paths = tags(&dom, "path");
    let series_of = |class: &str| -> Vec<(String, usize)> {
        paths
            .iter()
            .filter(|a| a.get("class").map(String::as_str) == Some(class))
            .map(|a| {
                let name = a.get("data-series").cloned().unwrap_or_default();
                let n = a
                    .get("data-points")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                (name, n)
            })
            .collect()
    };
    let sync = series_of("series");
    let backlog = series_of("series backlog");
    println!("sync chart series: {sync:?}");
    println!("backlog chart series: {backlog:?}");
    println!("total points drawn: {total}");
    let names = |series: &[(String, usize)]| -> Vec<String> {
        series.iter().map(|(name, _)| name.clone()).collect()
    };
    // Exactly one path per series (in legend order), each with points.
    assert_eq!(names(&sync), ["push", "capture", "pull", "dual", "confirm"]);
    assert_eq!(names(&backlog), PATHS);
    for (name, n) in sync.iter().chain(&backlog) {
        assert!(*n > 0, "series {name} drew no points");
    }
    // Nulls are gaps, not zeros: the dual path applied nothing for 3 s, confirmation for 1.5 s.
    let points = |series: &[(String, usize)], name: &str| {
        series
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, points)| *points)
    };
    let nulls = |f: &dyn Fn(&Sample) -> bool| page.samples.iter().filter(|s| f(s)).count();
    let dual_nulls = nulls(&|s| s.sync_p99_ms.get("dual").is_some_and(Option::is_none));
    let confirm_nulls = nulls(&|s| s.confirm_p99_ms.is_none());
    assert!(dual_nulls > 0 && confirm_nulls > 0);
    let all = page.samples.len();
    assert_eq!(points(&sync, "push"), all);
    assert_eq!(points(&sync, "dual"), all - dual_nulls);
    assert_eq!(points(&sync, "confirm"), all - confirm_nulls);
    assert_eq!(points(&backlog, "dual"), all);
    let sum: usize = sync.iter().chain(&backlog).map(|(_, n)| n).sum();
    assert_eq!(total, sum, "data-points is the sum over the series");

    // Marks: a dashed line per mark on each chart, and their labels.
    let marks: Vec<_> = tags(&dom, "line")
        .into_iter()
        .filter(|a| a.get("class").map(String::as_str) == Some("mark"))
        .collect();
    assert_eq!(marks.len(), 2 * page.marks.len(), "mark lines: {marks:?}");
    for label in [KILL_RELAY, KILL_DUAL] {
        let shown = dom.matches(&format!(">{label}</text>")).count();
        assert_eq!(shown, 2, "label {label:?} on both charts");
    }
    // Axes with tick labels, and a legend.
    assert!(
        tags(&dom, "text")
            .iter()
            .filter(|a| a.get("class").map(String::as_str) == Some("tick"))
            .count()
            >= 10
    );
    assert!(
        dom.contains(">order created -&gt; confirmed p99</text>"),
        "legend"
    );

    // The summary table and the verdict (HTML-escaped).
    let table_at = dom
        .find("<table id=\"summary\">")
        .expect("the summary table");
    let table = &dom[table_at..];
    for cell in [
        "<th scope=\"col\">capture</th>",
        "<th scope=\"row\">sync p99 (ms)</th>",
        "<td>3 204</td>",
        "<td>0 / 0</td>",
        "<th scope=\"row\">first p99 &lt; 1 s after kill</th>",
        "<td>5.5 s</td>",
    ] {
        assert!(table.contains(cell), "summary table lacks {cell}");
    }
    assert!(dom.contains("(&lt;= 2 reconciliations)</p>"), "verdict");

    // What a person sees.
    let png = dir.0.join("report.png");
    run_chromium(
        &dir.0,
        "screenshot",
        &html_path,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1000".to_owned(),
        ],
    );
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 20_000,
        "screenshot is only {} bytes",
        bytes.len()
    );
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());
    if let Some(keep) = std::env::var_os("REPORT_HTML_SCREENSHOT") {
        std::fs::copy(&png, &keep).expect("copy the screenshot");
        println!("screenshot kept at {}", Path::new(&keep).display());
    }
}

#[test]
fn without_its_script_the_page_is_not_rendered() {
    let dir = TempDir::new("broken");
    let html = report_html::render(&sample_page());
    let open = "<script id=\"draw\">";
    let start = html.find(open).expect("the drawing script") + open.len();
    let end = start + html[start..].find("</script>").expect("its end");
    assert!(
        end - start > 1000,
        "the drawing script is suspiciously short"
    );
    let broken = format!("{}{}", &html[..start], &html[end..]);
    let html_path = dir.0.join("broken.html");
    std::fs::write(&html_path, broken).expect("write the broken page");

    let dom = dump_dom(&dir.0, "dom", &html_path);
    assert_eq!(body_attr(&dom, "data-rendered").as_deref(), Some("no"));
    assert!(!dom.contains("data-rendered=\"yes\""));
    assert_eq!(body_attr(&dom, "data-points").as_deref(), Some("0"));
    assert!(
        tags(&dom, "path").is_empty(),
        "no series without the script"
    );
    assert!(!dom.contains("class=\"mark\""));
    // The server-side parts are still there.
    assert!(dom.contains("<table id=\"summary\">") && dom.contains("<p id=\"verdict\""));
    println!("broken variant: data-rendered=no, no series drawn");
}

#[test]
fn a_label_cannot_inject_script() {
    let dir = TempDir::new("inject");
    let mut page = sample_page();
    page.samples.truncate(10);
    page.marks = vec![Mark {
        t: 2.0,
        label: "</script><script>document.body.dataset.injected='1'</script>".to_owned(),
    }];
    page.title = "<b>bold</b>".to_owned();
    let html_path = dir.0.join("inject.html");
    report_html::write(&html_path, &page).expect("write the report");

    let dom = dump_dom(&dir.0, "dom", &html_path);
    assert_eq!(body_attr(&dom, "data-rendered").as_deref(), Some("yes"));
    assert!(
        body_attr(&dom, "data-injected").is_none(),
        "a label ran as script"
    );
    assert!(!dom.contains("<b>bold</b>"));
    assert!(dom.contains("<h1>&lt;b&gt;bold&lt;/b&gt;</h1>"));
    // The label is shown as text on both charts.
    let label = "&lt;/script&gt;&lt;script&gt;document.body.dataset.injected='1'&lt;/script&gt;";
    assert_eq!(dom.matches(&format!(">{label}</text>")).count(), 2, "{dom}");
    println!("injection: label shown as text, not run");
}
