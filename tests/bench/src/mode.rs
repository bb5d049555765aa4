//! The capture modes the scenarios run in: what the writers call, how the relay captures, and
//! the replication slot a streaming mode needs for the length of one scenario.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, RunQueryDsl};
use indicatif::ProgressBar;
use outbox_relay::{CaptureMode, RelayConfig};

/// The one publication of the benchmark database (every streaming scenario's slot reads it).
const PUBLICATION: &str = "outbox_bench";

/// A capture mode, as `--modes` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The polling relay; writers INSERT into the outbox table.
    Polling,
    /// Streaming capture of the outbox table's INSERTs (writers unchanged, rows removed after
    /// the acknowledgement).
    Streamed,
    /// Streaming capture of tableless events (writers call `outbox_emit`, no row).
    Tableless,
}

impl Mode {
    /// The column name in the report.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::Streamed => "streamed table",
            Self::Tableless => "tableless",
        }
    }

    /// Short form for topic and slot names.
    fn tag(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::Streamed => "streamed",
            Self::Tableless => "tableless",
        }
    }

    /// The relay reads the WAL.
    #[must_use]
    pub fn streaming(self) -> bool {
        self != Self::Polling
    }

    /// What the writers enqueue through.
    #[must_use]
    pub fn outbox(self) -> outbox::Outbox {
        match self {
            Self::Tableless => outbox::Outbox::new().tableless(),
            Self::Polling | Self::Streamed => outbox::Outbox::new(),
        }
    }

    /// A topic name for `scenario` in this mode.
    #[must_use]
    pub fn topic(self, scenario: &str) -> String {
        outbox_tests::unique_name(&format!("bench-{scenario}-{}", self.tag()))
    }
}

/// A relay configuration for `mode`, and for a streaming mode the slot (and publication) it
/// reads, created now: everything committed from here on is in its stream. Drop the slot with
/// [`Slot::drop_now`] once the relay has stopped.
pub fn prepare(
    url: &str,
    base: &RelayConfig,
    mode: Mode,
    scenario: &str,
) -> Result<(RelayConfig, Option<Slot>)> {
    if !mode.streaming() {
        return Ok((base.clone(), None));
    }
    // Slots are per server, not per database: the name carries the process id.
    let name = format!("bench_{}_{scenario}_{}", std::process::id(), mode.tag());
    // Creating a logical slot waits for the transactions running on the whole server; a
    // concurrent relay's fencing may end this connection meanwhile (see docs/BENCHMARKS.md):
    // try again on a new connection.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut conn = PgConnection::establish(url)?;
        match outbox_relay::store::stream::ensure_streaming(
            &mut conn,
            &outbox::TableRef::default(),
            &name,
            PUBLICATION,
        ) {
            Ok(_) => break,
            Err(e) if attempt < 5 => {
                eprintln!("  (creating the replication slot {name} failed: {e}; retrying)");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e).with_context(|| format!("create the replication slot {name}")),
        }
    }
    let cfg = base
        .clone()
        .capture(CaptureMode::Streaming)
        .slot(&name)
        .publication(PUBLICATION);
    Ok((
        cfg,
        Some(Slot {
            url: url.to_owned(),
            name,
        }),
    ))
}

/// A replication slot one scenario streams from.
#[derive(Debug)]
pub struct Slot {
    url: String,
    pub name: String,
}

impl Slot {
    /// WAL the server keeps for the slot now, bytes (`pg_current_wal_lsn() - restart_lsn`).
    pub fn retained_bytes(&self) -> Result<i64> {
        let mut conn = PgConnection::establish(&self.url)?;
        Ok(
            outbox_relay::store::stream::slot_info(&mut conn, &self.name)?
                .and_then(|s| s.retained_bytes)
                .unwrap_or(0),
        )
    }

    /// Drops the slot (after the relay stopped: its walsender may take a moment to let go).
    pub fn drop_now(self) -> Result<()> {
        let mut conn = PgConnection::establish(&self.url)?;
        let started = Instant::now();
        loop {
            match diesel::sql_query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
            )
            .bind::<Text, _>(&self.name)
            .execute(&mut conn)
            {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() < Duration::from_secs(15) => {
                    eprintln!("  (slot {} not dropped yet: {e}; retrying)", self.name);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e).context(format!("drop the slot {}", self.name)),
            }
        }
    }
}

/// Writes `n` tableless events for `topic` through `Outbox::tableless().enqueue_batch`, 1000
/// per transaction, as fast as one connection can (the tableless twin of `P_ins`).
pub fn batched_emit(
    conn: &mut PgConnection,
    topic: &str,
    n: usize,
    pb: &ProgressBar,
) -> Result<()> {
    let outbox = Mode::Tableless.outbox();
    let mut done = 0;
    while done < n {
        let m = (n - done).min(1000);
        let events = (done..done + m)
            .map(|i| {
                outbox::Event::builder(topic, format!("k-{}", i % crate::KEYS), "BenchEvent")
                    .bytes(crate::payload(), "application/octet-stream")
                    .build()
            })
            .collect::<outbox::Result<Vec<_>>>()?;
        conn.transaction::<_, anyhow::Error, _>(|c| {
            outbox.enqueue_batch(c, &events)?;
            Ok(())
        })?;
        done += m;
        pb.set_position(done as u64);
    }
    Ok(())
}
