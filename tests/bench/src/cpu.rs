//! CPU time of the benchmark process (which runs the relay in-process), of Postgres (every
//! `postgres` process, including exited backends through the postmaster's children times) and
//! of the broker (`tansu`), from `/proc` (Linux; clock ticks of 1/100 s).

use serde::Serialize;

const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds consumed so far, per party.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    bench: f64,
    postgres: f64,
    broker: f64,
}

/// CPU seconds per 10,000 events, per party.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Per10k {
    /// The benchmark process: relay (capture, producer) and the load generators.
    pub bench_s: f64,
    /// All Postgres processes.
    pub postgres_s: f64,
    /// The broker.
    pub broker_s: f64,
}

/// `(comm, utime + stime + cutime + cstime in seconds)` of one `/proc/<pid>/stat`.
fn read_stat(path: &std::path::Path) -> Option<(String, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_owned();
    let fields: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // After "pid (comm) ": state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    Some((comm, ticks / TICKS_PER_SECOND))
}

impl Cpu {
    /// Reads the counters now.
    #[must_use]
    pub fn now() -> Self {
        let mut cpu = Self {
            bench: read_stat(std::path::Path::new("/proc/self/stat")).map_or(0.0, |(_, t)| t),
            ..Self::default()
        };
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if !entry
                    .file_name()
                    .to_string_lossy()
                    .chars()
                    .all(|c| c.is_ascii_digit())
                {
                    continue;
                }
                if let Some((comm, t)) = read_stat(&entry.path().join("stat")) {
                    if comm == "postgres" || comm.starts_with("postgres:") {
                        cpu.postgres += t;
                    } else if comm == "tansu" {
                        cpu.broker += t;
                    }
                }
            }
        }
        cpu
    }

    /// The CPU used since `before`.
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        Self {
            bench: (self.bench - before.bench).max(0.0),
            postgres: (self.postgres - before.postgres).max(0.0),
            broker: (self.broker - before.broker).max(0.0),
        }
    }

    /// CPU seconds of all parties together.
    #[must_use]
    pub fn total(&self) -> f64 {
        self.bench + self.postgres + self.broker
    }

    /// Per 10,000 of `events`.
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn per_10k(&self, events: usize) -> Per10k {
        let k = (events.max(1) as f64) / 10_000.0;
        Per10k {
            bench_s: self.bench / k,
            postgres_s: self.postgres / k,
            broker_s: self.broker / k,
        }
    }
}
