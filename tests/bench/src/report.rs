//! The results table (printed as Markdown) and its JSON form.

use std::path::Path;

use anyhow::Result;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use crate::cpu::Per10k;
use crate::load::Latencies;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub measured: f64,
    pub unit: String,
    pub baseline: Option<f64>,
    pub baseline_name: String,
    pub ratio: Option<f64>,
    pub target: String,
    pub pass: Option<bool>,
    pub cpu_per_10k_events: Option<Per10k>,
    pub latency: Option<Latencies>,
    pub note: String,
}

impl Row {
    fn new(scenario: &str, measured: f64, unit: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            measured,
            unit: unit.to_owned(),
            baseline: None,
            baseline_name: String::new(),
            ratio: None,
            target: String::new(),
            pass: None,
            cpu_per_10k_events: None,
            latency: None,
            note: String::new(),
        }
    }

    /// A physical limit measured in this run.
    #[must_use]
    pub fn baseline(scenario: &str, measured: f64, unit: &str) -> Self {
        Self::new(scenario, measured, unit)
    }

    /// A scenario with a ratio target against a baseline.
    #[must_use]
    pub fn ratio(
        scenario: &str,
        measured: f64,
        unit: &str,
        baseline: f64,
        baseline_name: &str,
        min_ratio: f64,
    ) -> Self {
        let ratio = measured / baseline.max(1e-9);
        Self {
            baseline: Some(baseline),
            baseline_name: baseline_name.to_owned(),
            ratio: Some(ratio),
            target: format!(">= {min_ratio}"),
            pass: Some(ratio >= min_ratio),
            ..Self::new(scenario, measured, unit)
        }
    }

    /// A measurement without a target of its own.
    #[must_use]
    pub fn info(scenario: &str, measured: f64, unit: &str, note: &str) -> Self {
        Self {
            note: note.to_owned(),
            ..Self::new(scenario, measured, unit)
        }
    }

    /// A latency distribution: `measured` is the commit-to-ack p50 when known, else the
    /// commit-to-consume p50.
    #[must_use]
    pub fn latency(scenario: &str, lat: &Latencies) -> Self {
        let consume = format!(
            "to an independent consumer: p50 {:.1} / p99 {:.1} / p99.9 {:.1} / max {:.1} ms over {} events",
            lat.p50_ms, lat.p99_ms, lat.p999_ms, lat.max_ms, lat.count
        );
        match &lat.ack {
            Some(a) => Self {
                latency: Some(lat.clone()),
                note: format!(
                    "ack p99 {:.1} / p99.9 {:.1} ms, {:.0}% / {:.0}% / {:.0}% / {:.0}% within 2 / 5 / 10 / 25 ms; {}{consume}",
                    a.p99_ms,
                    a.p999_ms,
                    a.within_2ms * 100.0,
                    a.within_5ms * 100.0,
                    a.within_10ms * 100.0,
                    a.within_25ms * 100.0,
                    a.stages.as_ref().map_or(String::new(), |s| format!(
                        "commit to fetched p50 {:.1} / p99 {:.1} ms (opening the batch and fetching p50 {:.1} ms), fetched to ack p50 {:.1} / p99 {:.1} ms; ",
                        s.capture_p50_ms, s.capture_p99_ms, s.open_fetch_p50_ms, s.send_ack_p50_ms, s.send_ack_p99_ms
                    )),
                ),
                ..Self::new(scenario, a.p50_ms, "ms p50 to ack")
            },
            None => Self {
                latency: Some(lat.clone()),
                note: consume,
                ..Self::new(scenario, lat.p50_ms, "ms p50 to consumer")
            },
        }
    }

    /// Sets a pass/fail target.
    #[must_use]
    pub fn pass_if(mut self, ok: bool, target: &str) -> Self {
        self.pass = Some(ok);
        target.clone_into(&mut self.target);
        self
    }

    /// Adds CPU per 10k events.
    #[must_use]
    pub fn cpu(mut self, cpu: Per10k) -> Self {
        self.cpu_per_10k_events = Some(cpu);
        self
    }

    /// Appends a note.
    #[must_use]
    pub fn note(mut self, note: &str) -> Self {
        if !self.note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(note);
        self
    }
}

/// A rate in a few digits (12.3k).
fn short(x: f64) -> String {
    if x.abs() >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub postgres: String,
    pub synchronous_commit: String,
    pub smoke: bool,
    pub payload_bytes: usize,
    pub rows: Vec<Row>,
    /// The capture modes run, in order (the columns of the side-by-side table).
    pub modes: Vec<String>,
    /// The side-by-side table: a scenario, then one cell per mode (`None`: not measured).
    pub side_by_side: Vec<(String, Vec<Option<String>>)>,
}

impl Report {
    #[must_use]
    pub fn new(synchronous_commit: &str, smoke: bool, machine: String) -> Self {
        Self {
            machine,
            postgres: String::new(),
            synchronous_commit: synchronous_commit.to_owned(),
            smoke,
            payload_bytes: crate::PAYLOAD,
            rows: Vec::new(),
            modes: Vec::new(),
            side_by_side: Vec::new(),
        }
    }

    /// Sets the modes (columns of the side-by-side table).
    pub fn set_modes(&mut self, modes: &[&str]) {
        self.modes = modes.iter().map(|m| (*m).to_owned()).collect();
    }

    /// Pushes a row measured in capture mode `mode` (its name prefixed with the mode) and puts
    /// its short form in the side-by-side table under `scenario`.
    pub fn push_mode(&mut self, mode: &str, scenario: &str, mut row: Row) {
        row.scenario = format!("[{mode}] {}", row.scenario);
        if self.smoke {
            row.pass = None;
        }
        let mut cell = match row.latency.as_ref().and_then(|l| l.ack.as_ref()) {
            Some(a) => format!("p50 {:.1} / p99 {:.1} ms", a.p50_ms, a.p99_ms),
            None => format!("{} {}", short(row.measured), row.unit),
        };
        if let Some(r) = row.ratio {
            cell.push_str(&format!(" ({r:.2} x {})", row.baseline_name));
        }
        match row.pass {
            Some(true) => cell.push_str(" yes"),
            Some(false) => cell.push_str(" NO"),
            None => {}
        }
        self.cell(mode, scenario, cell);
        self.push(row);
    }

    /// Puts `text` into the side-by-side table.
    pub fn cell(&mut self, mode: &str, scenario: &str, text: String) {
        let Some(col) = self.modes.iter().position(|m| m == mode) else {
            return;
        };
        let n = self.modes.len();
        let line = match self.side_by_side.iter().position(|(s, _)| s == scenario) {
            Some(i) => &mut self.side_by_side[i].1,
            None => {
                self.side_by_side.push((scenario.to_owned(), vec![None; n]));
                &mut self.side_by_side.last_mut().expect("just pushed").1
            }
        };
        line[col] = Some(text);
    }

    /// Records the server version.
    pub fn note_versions(&mut self, conn: &mut PgConnection) {
        #[derive(QueryableByName)]
        struct V {
            #[diesel(sql_type = diesel::sql_types::Text)]
            v: String,
        }
        if let Ok(v) =
            diesel::sql_query("SELECT current_setting('server_version') AS v").get_result::<V>(conn)
        {
            self.postgres = v.v;
        }
    }

    pub fn push(&mut self, mut row: Row) {
        if self.smoke {
            row.pass = None;
        }
        eprintln!("  {:<58} {:>12.1} {}", row.scenario, row.measured, row.unit);
        self.rows.push(row);
    }

    /// Prints the side-by-side table of the capture modes.
    pub fn print_side_by_side(&self) {
        if self.modes.is_empty() {
            return;
        }
        println!();
        println!("| scenario | {} |", self.modes.join(" | "));
        println!("|---|{}", "---|".repeat(self.modes.len()));
        for (scenario, cells) in &self.side_by_side {
            let cells: Vec<&str> = cells.iter().map(|c| c.as_deref().unwrap_or("-")).collect();
            println!("| {scenario} | {} |", cells.join(" | "));
        }
    }

    /// Prints the Markdown table.
    pub fn print(&self) {
        println!();
        println!(
            "{}; Postgres {}, synchronous_commit={}; payload {} bytes{}",
            self.machine,
            self.postgres,
            self.synchronous_commit,
            self.payload_bytes,
            if self.smoke {
                "; SMOKE run (small, no thresholds)"
            } else {
                ""
            }
        );
        println!();
        println!("| scenario | measured | baseline | ratio | target | pass | CPU s / 10k events (bench+relay, postgres, broker) | notes |");
        println!("|---|---:|---:|---:|---|---|---|---|");
        for r in &self.rows {
            let baseline = r
                .baseline
                .map_or_else(String::new, |b| format!("{b:.0} ({})", r.baseline_name));
            let ratio = r.ratio.map_or_else(String::new, |x| format!("{x:.2}"));
            let pass = match r.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            let cpu = r.cpu_per_10k_events.map_or_else(String::new, |c| {
                format!("{:.2}, {:.2}, {:.2}", c.bench_s, c.postgres_s, c.broker_s)
            });
            println!(
                "| {} | {:.1} {} | {baseline} | {ratio} | {} | {pass} | {cpu} | {} |",
                r.scenario, r.measured, r.unit, r.target, r.note
            );
        }
    }

    /// Writes the JSON form.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}
