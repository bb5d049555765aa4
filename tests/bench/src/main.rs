//! `outbox-bench`: the outbox, the relay and the inbox measured against the physical limits of
//! the same machine, in ONE run, with 200-byte payloads and the same broker (docs/BENCHMARKS.md,
//! targets in the product brief, section 5).
//!
//! Baselines: K (raw produce rate with the relay's producer settings), `P_ins` (batched INSERT
//! into the outbox), `P_del` (batched DELETE), A (application transactions/s without the outbox).
//! Scenarios: S1 backlog drain, S2 maximum sustainable throughput (1 and 10 events per
//! transaction), S3 application cost, S4 commit-to-ack latency at 25/50/75% of S2, S5 a
//! transaction held open for minutes, each in three capture modes (`--modes`): `polling`,
//! `streamed` (streaming capture of the table's INSERTs) and `tableless` (streaming capture of
//! `outbox_emit` messages); then S6 the inbox consumer, and a naive relay for contrast.
//!
//! ```text
//! cargo run --release -p outbox-bench                      # full run, all three modes
//! cargo run --release -p outbox-bench -- --modes tableless --synchronous-commit off
//! cargo run -p outbox-bench -- --smoke                     # CI: small, no thresholds
//! ```

mod cdc;
mod cpu;
mod inbox;
mod load;
mod mode;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Array, BigInt, Bytea, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use indicatif::{ProgressBar, ProgressStyle};
use outbox_relay::RelayConfig;
use outbox_tests::{create_topic, unique_name, Tansu, TestDb};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::load::Latencies;
use crate::mode::Mode;
use crate::report::{Report, Row};
use crate::scenarios::{Baselines, Ctx};

/// Payload size of every event in every scenario.
pub const PAYLOAD: usize = 200;
/// Distinct keys (and so ordering lanes) in every scenario.
pub const KEYS: usize = 1000;

/// Benchmarks of the outbox, relay and inbox against this machine's limits.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", version, about)]
struct Args {
    /// Small sizes and short windows, no pass/fail (CI).
    #[arg(long)]
    smoke: bool,
    /// Backlog size for S1 (and rows for the P_ins / P_del baselines).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Length of each measuring window (A, S3, S2, S4), seconds.
    #[arg(long, default_value_t = 15)]
    window: u64,
    /// How long S5 keeps its transaction open, seconds.
    #[arg(long, default_value_t = 180)]
    long_tx: u64,
    /// Events for the naive relay's contrast run.
    #[arg(long, default_value_t = 20_000)]
    naive_events: usize,
    /// Messages for S6 (the inbox consumer).
    #[arg(long, default_value_t = 100_000)]
    inbox_messages: usize,
    /// Concurrent application connections for A, S2, S3, S4.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// `synchronous_commit` of the benchmark database (on = the primary report).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    synchronous_commit: String,
    /// A librdkafka option for the relay's producer (and K), `key=value`; repeatable.
    #[arg(long = "relay-kafka", value_name = "KEY=VALUE")]
    relay_kafka: Vec<String>,
    /// Capture modes S1-S5 run in, in this order: `polling`, `streamed` (streaming capture of
    /// the outbox table's INSERTs) and `tableless` (streaming capture of `outbox_emit`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "polling,streamed,tableless"
    )]
    modes: Vec<Mode>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
}

fn spinner(msg: &str) -> ProgressBar {
    // The bars are drawn only on a terminal; the phase line is always printed.
    eprintln!("> {msg}");
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message(msg.to_owned());
    pb
}

fn bar(msg: &str, len: u64) -> ProgressBar {
    eprintln!("> {msg}");
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {msg} {wide_bar} {pos}/{len} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message(msg.to_owned());
    pb
}

#[allow(clippy::cast_precision_loss)]
fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn payload() -> Vec<u8> {
    vec![b'x'; PAYLOAD]
}

/// Rows waiting in the outbox, from the ends of the id index (`max(id) - min(id) + 1`): exact for
/// a backlog of consecutive ids, an upper bound with holes. Not `count(*)`: polled every 250 ms
/// during S1, a count of a million-row table took a third of the machine from the relay. S1
/// does not poll the database at all now (`min(id)` too walks the index entries of every row
/// removed since the last VACUUM); it counts the relay's acknowledgements.
fn backlog(conn: &mut PgConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    Ok(
        diesel::sql_query("SELECT coalesce(max(id) - min(id) + 1, 0) AS n FROM outbox")
            .get_result::<N>(conn)?
            .n,
    )
}

/// The server's WAL position, bytes from `0/0`.
pub fn wal_position(conn: &mut PgConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct L {
        #[diesel(sql_type = BigInt)]
        l: i64,
    }
    Ok(
        diesel::sql_query("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS l")
            .get_result::<L>(conn)?
            .l,
    )
}

/// Inserts `n` outbox rows for `topic` with multi-row INSERTs of 1000 (one transaction each),
/// as fast as one connection can: the `P_ins` baseline.
fn batched_insert(conn: &mut PgConnection, topic: &str, n: usize, pb: &ProgressBar) -> Result<()> {
    let body = payload();
    let mut done = 0;
    while done < n {
        let m = (n - done).min(1000);
        let keys: Vec<String> = (done..done + m)
            .map(|i| format!("k-{}", i % KEYS))
            .collect();
        let bodies: Vec<&[u8]> = vec![body.as_slice(); m];
        conn.transaction(|c| {
            diesel::sql_query(
                "INSERT INTO outbox (topic, partition_key, event_type, payload) \
                 SELECT $1, k, 'BenchEvent', p FROM unnest($2::text[], $3::bytea[]) AS u(k, p)",
            )
            .bind::<Text, _>(topic)
            .bind::<Array<Text>, _>(&keys)
            .bind::<Array<Bytea>, _>(&bodies)
            .execute(c)
        })?;
        done += m;
        pb.set_position(done as u64);
    }
    Ok(())
}

/// Waits until the outbox is empty; returns how long that took.
async fn wait_drained(
    url: &str,
    pb: &ProgressBar,
    total: usize,
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut conn = PgConnection::establish(url)?;
    loop {
        let left = usize::try_from(backlog(&mut conn)?)?;
        pb.set_position(total.saturating_sub(left) as u64);
        if left == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{left} events still waiting after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// K: produce `n` messages like the relay's (200-byte payload, CloudEvents-sized headers) with
/// the relay's producer configuration, all in flight, until every one is acknowledged.
async fn raw_produce(cfg: &RelayConfig, topic: &str, n: usize) -> Result<Duration> {
    let producer: FutureProducer = outbox_relay::producer::client_config(cfg).create()?;
    let body = payload();
    let pb = bar("K: raw produce", n as u64);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n.min(100_000));
    for i in 0..n {
        let key = format!("k-{}", i % KEYS);
        let id = uuid::Uuid::now_v7().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(&id),
            })
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("BenchEvent"),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("/outbox/bench"),
            })
            .insert(Header {
                key: "ce_time",
                value: Some("2026-11-23T12:00:00.000000Z"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/octet-stream"),
            });
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&body)
            .headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() == 100_000 {
            for p in pending.drain(..) {
                p.await?.map_err(|(e, _)| e)?;
            }
            pb.set_position(i as u64 + 1);
        }
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    pb.finish_and_clear();
    Ok(started.elapsed())
}

/// P_del: batched removal by id (1000 per statement, the relay's page), of `n` fresh rows.
fn batched_delete(conn: &mut PgConnection, topic: &str, n: usize) -> Result<Duration> {
    #[derive(QueryableByName)]
    struct Lo {
        #[diesel(sql_type = BigInt)]
        lo: i64,
    }
    conn.batch_execute("VACUUM ANALYZE outbox")?;
    let rows = i64::try_from(n)?;
    let lo: Lo = conn.transaction(|c| {
        diesel::sql_query(
            "WITH i AS (INSERT INTO outbox (topic, partition_key, event_type, payload) \
             SELECT $1, 'k-' || (g % 1000), 'BenchEvent', convert_to(repeat('x', 200), 'UTF8') \
             FROM generate_series(1, $2) g RETURNING id) SELECT min(id) AS lo FROM i",
        )
        .bind::<Text, _>(topic)
        .bind::<BigInt, _>(rows)
        .get_result(c)
    })?;
    conn.batch_execute("VACUUM ANALYZE outbox")?;
    let pb = bar("P_del: batched DELETE", n as u64);
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let m = (n - done).min(1000);
        let ids: Vec<i64> = (0..m)
            .map(|i| lo.lo + i64::try_from(done + i).unwrap_or(0))
            .collect();
        conn.transaction(|c| {
            diesel::sql_query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind::<Array<BigInt>, _>(&ids)
                .execute(c)
        })?;
        done += m;
        pb.set_position(done as u64);
    }
    pb.finish_and_clear();
    Ok(started.elapsed())
}

/// The naive relay of many hand-rolled outboxes (poll by id, send one message, await it, move
/// the cursor) over `n` events: events/s.
async fn naive_relay(url: &str, bootstrap: &str, topic: &str, n: usize) -> Result<f64> {
    let mut conn = PgConnection::establish(url)?;
    let pb = bar("naive relay (poll by id, send one, await)", n as u64);
    batched_insert(&mut conn, topic, n, &ProgressBar::hidden())?;
    #[derive(QueryableByName)]
    struct Lo {
        #[diesel(sql_type = BigInt)]
        lo: i64,
    }
    let lo: Lo = diesel::sql_query("SELECT coalesce(min(id), 1) - 1 AS lo FROM outbox")
        .get_result(&mut conn)?;
    let producer = outbox_tests::naive::producer(bootstrap)?;
    let mut naive = outbox_tests::naive::NaiveRelay { last_id: lo.lo };
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = naive.poll_once(&mut conn, &producer).await?;
        if k == 0 {
            bail!("naive relay found nothing after {sent} of {n}");
        }
        sent += k;
        pb.set_position(sent as u64);
    }
    let elapsed = started.elapsed();
    pb.finish_and_clear();
    diesel::sql_query("DELETE FROM outbox WHERE topic = $1")
        .bind::<Text, _>(topic)
        .execute(&mut conn)?;
    Ok(rate(n, elapsed))
}

/// The (p50, p99) a latency row is judged by: commit-to-ack when the relay measured it.
fn headline(l: &Latencies) -> (f64, f64) {
    l.ack
        .as_ref()
        .map_or((l.p50_ms, l.p99_ms), |a| (a.p50_ms, a.p99_ms))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(|| "?".into(), |kb| format!("{} GiB", kb / 1024 / 1024));
    format!("{cores} cores ({cpu}), {mem} RAM")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.events = args.events.min(10_000);
        args.window = args.window.min(2);
        args.long_tx = args.long_tx.min(3);
        args.naive_events = args.naive_events.min(1000);
        args.inbox_messages = args.inbox_messages.min(3000);
    }
    anyhow::ensure!(args.events >= 1000, "--events must be at least 1000");
    anyhow::ensure!(args.window >= 1, "--window must be at least 1 s");
    anyhow::ensure!(args.long_tx >= 3, "--long-tx must be at least 3 s");
    anyhow::ensure!(args.writers >= 1, "--writers must be at least 1");
    let mut modes: Vec<Mode> = Vec::new();
    for m in &args.modes {
        if !modes.contains(m) {
            modes.push(*m);
        }
    }
    anyhow::ensure!(!modes.is_empty(), "--modes names no mode");
    let run_started = Instant::now();
    let db = TestDb::migrated()
        .context("create the benchmark database (is Postgres running? scripts/setup)")?;
    let url = db.url().to_owned();
    {
        let mut c = db.conn()?;
        c.batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = {}",
            db.name(),
            args.synchronous_commit
        ))?;
        load::create_business_table(&mut c)?;
        if modes.iter().any(|m| m.streaming()) {
            let level = outbox_relay::store::stream::wal_level(&mut c)?;
            anyhow::ensure!(
                level == "logical",
                "--modes {} needs wal_level = logical (the server has {level}); run with --modes polling",
                modes.iter().map(|m| m.label()).collect::<Vec<_>>().join(",")
            );
        }
    }
    let broker = Tansu::start().context("start tansu (scripts/setup installs it)")?;
    let bootstrap = broker.bootstrap();
    let mut report = Report::new(&args.synchronous_commit, args.smoke, machine());
    report.set_modes(&modes.iter().map(|m| m.label()).collect::<Vec<_>>());
    {
        let mut c = db.conn()?;
        report.note_versions(&mut c);
    }
    eprintln!(
        "outbox-bench: modes {}; {} events, windows {} s, long transaction {} s, {} writers, synchronous_commit={}{}",
        modes.iter().map(|m| m.label()).collect::<Vec<_>>().join(", "),
        args.events,
        args.window,
        args.long_tx,
        args.writers,
        args.synchronous_commit,
        if args.smoke { " (smoke: no thresholds)" } else { "" }
    );
    let mut relay_cfg = RelayConfig::new(&url, &bootstrap).allow_superuser(true);
    for kv in &args.relay_kafka {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--relay-kafka {kv}: expected KEY=VALUE"))?;
        relay_cfg = relay_cfg.kafka_option(k, v);
    }
    let ctx = Ctx {
        url: url.clone(),
        bootstrap: bootstrap.clone(),
        relay_cfg: relay_cfg.clone(),
        writers: args.writers,
        partitions: args.partitions,
        window: Duration::from_secs(args.window),
        long_tx: Duration::from_secs(args.long_tx),
        events: args.events,
    };
    let t_k = unique_name("bench-k");
    let t_naive = unique_name("bench-naive");
    let s1_topics: Vec<String> = modes.iter().map(|m| m.topic("s1")).collect();
    for t in [&t_k, &t_naive].into_iter().chain(&s1_topics) {
        create_topic(&bootstrap, t, args.partitions).await?;
    }
    let mut b = Baselines::default();

    // Baseline K.
    let k_time = raw_produce(&relay_cfg, &t_k, args.events).await?;
    b.k = rate(args.events, k_time);
    report.push(Row::baseline(
        "K: raw produce, relay's producer settings",
        b.k,
        "msg/s",
    ));

    // Baseline P_ins: these rows are polling's S1 backlog.
    let polling_at = modes.iter().position(|m| *m == Mode::Polling);
    let p_ins_topic =
        polling_at.map_or_else(|| unique_name("bench-p-ins"), |i| s1_topics[i].clone());
    let pb = bar(
        "P_ins: batched INSERT (polling S1's backlog)",
        args.events as u64,
    );
    let (u, t, n) = (url.clone(), p_ins_topic, args.events);
    let pb2 = pb.clone();
    let p_ins_time = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let mut c = PgConnection::establish(&u)?;
        let started = Instant::now();
        batched_insert(&mut c, &t, n, &pb2)?;
        Ok(started.elapsed())
    })
    .await??;
    pb.finish_and_clear();
    report.push(Row::baseline(
        "P_ins: batched INSERT into the outbox (1000/stmt)",
        rate(args.events, p_ins_time),
        "rows/s",
    ));

    // S1 polling (on P_ins' rows), or those rows removed.
    let polling_s1 = match polling_at {
        Some(i) => Some(scenarios::drain(&ctx, Mode::Polling, &s1_topics[i]).await?),
        None => {
            let mut c = PgConnection::establish(&url)?;
            c.batch_execute("DELETE FROM outbox")?;
            c.batch_execute("VACUUM ANALYZE outbox")?;
            None
        }
    };

    // Baseline P_del (after S1, on fresh rows).
    let (u, t, n) = (url.clone(), unique_name("bench-p-del"), args.events);
    let p_del_time = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let mut c = PgConnection::establish(&u)?;
        batched_delete(&mut c, &t, n)
    })
    .await??;
    b.p_del = rate(args.events, p_del_time);
    report.push(Row::baseline(
        "P_del: batched DELETE by id (1000/stmt)",
        b.p_del,
        "rows/s",
    ));
    let mut drained = Vec::new();
    if let Some(d) = polling_s1 {
        scenarios::push_drain(&mut report, &ctx, &b, &d);
        drained.push(d);
    }
    // S1 in the streaming modes: each its own slot, created before its backlog is written.
    for (m, t) in modes.iter().zip(&s1_topics) {
        if m.streaming() {
            let d = scenarios::drain(&ctx, *m, t).await?;
            scenarios::push_drain(&mut report, &ctx, &b, &d);
            drained.push(d);
        }
    }

    // Baseline A and S3 (no relay, no slot).
    scenarios::app_cost(&ctx, &modes, &mut report).await?;

    // S2, S4, S5 per mode (one relay each); L0 at 50% of the first mode's S2.
    let mut l0: Option<Latencies> = None;
    for m in &modes {
        scenarios::live(&ctx, *m, &mut report, &mut l0, &t_k).await?;
    }

    // C: change capture of an existing table (streaming).
    if modes.iter().any(|m| m.streaming()) {
        cdc::run(&ctx, &b, &mut report).await?;
    }

    // S6: the inbox consumer (independent of the capture mode).
    let pb = spinner("S6: inbox consumer (dedup + business write) vs raw consumption");
    let inbox = inbox::run(&url, &bootstrap, args.inbox_messages, args.partitions).await?;
    pb.finish_and_clear();
    report.push(Row::baseline("raw consume", inbox.raw, "msg/s"));
    report.push(Row::baseline(
        "P_ins (inbox): batched INSERT into the inbox",
        inbox.p_ins,
        "rows/s",
    ));
    report.push(Row::ratio(
        "S6 inbox consumer: dedup + business write, batch handler",
        inbox.runner_batch,
        "msg/s",
        inbox.raw.min(inbox.p_ins),
        "min(raw consume, P_ins inbox)",
        0.7,
    ));
    report.push(Row::ratio(
        "S6 inbox consumer, per-message handler (a statement per message)",
        inbox.runner,
        "msg/s",
        inbox.raw.min(inbox.p_ins),
        "min(raw consume, P_ins inbox)",
        0.7,
    ));

    // The naive relay, for contrast.
    let naive = naive_relay(&url, &bootstrap, &t_naive, args.naive_events).await?;
    let fastest = drained
        .iter()
        .map(|d| format!("{} {:.0}x", d.mode.label(), d.rate / naive.max(1e-9)))
        .collect::<Vec<_>>()
        .join(", ");
    report.push(Row::info(
        "naive relay (poll by id, send one, await, mark)",
        naive,
        "events/s",
        &format!("the relay drains faster (S1): {fastest}"),
    ));

    report.print();
    report.print_side_by_side();
    report.write_json(&args.json)?;
    eprintln!(
        "results written to {}; the run took {:.0} s",
        args.json.display(),
        run_started.elapsed().as_secs_f64()
    );
    drop(broker);
    Ok(())
}
