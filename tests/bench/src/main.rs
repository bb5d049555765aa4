//! `outbox-bench`: the outbox, the relay and the inbox measured against the physical limits of
//! the same machine, in ONE run, with 200-byte payloads and the same broker (docs/BENCHMARKS.md,
//! targets in the product brief, section 5).
//!
//! Baselines: K (raw produce rate with the relay's producer settings), `P_ins` (batched INSERT
//! into the outbox), `P_del` (batched DELETE), A (application transactions/s without the outbox).
//! Scenarios: S1 backlog drain, S2 maximum sustainable throughput (1 and 10 events per
//! transaction), S3 application cost, S4 commit-to-consume latency at 25/50/75% of S2, S5 a
//! transaction held open for minutes, S6 the inbox consumer, and a naive relay for contrast.
//!
//! ```text
//! cargo run --release -p outbox-bench                      # full run (~10 min)
//! cargo run --release -p outbox-bench -- --synchronous-commit off
//! cargo run -p outbox-bench -- --smoke                     # CI: small, no thresholds
//! ```

mod cpu;
mod inbox;
mod load;
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Array, BigInt, Bytea, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use indicatif::{ProgressBar, ProgressStyle};
use outbox_relay::RelayConfig;
use outbox_tests::{create_topic, unique_name, InProcessRelay, Tansu, TestDb};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::cpu::Cpu;
use crate::load::{Latencies, Load};
use crate::report::{Report, Row};

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
    /// Where to write the JSON results.
    /// A librdkafka option for the relay's producer (and K), `key=value`; repeatable.
    #[arg(long = "relay-kafka", value_name = "KEY=VALUE")]
    relay_kafka: Vec<String>,
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

/// Rows waiting in the outbox.
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
        args.events = args.events.min(20_000);
        args.window = args.window.min(2);
        args.long_tx = args.long_tx.min(4);
        args.naive_events = args.naive_events.min(1000);
        args.inbox_messages = args.inbox_messages.min(3000);
    }
    anyhow::ensure!(args.events >= 1000, "--events must be at least 1000");
    anyhow::ensure!(args.window >= 1, "--window must be at least 1 s");
    anyhow::ensure!(args.writers >= 1, "--writers must be at least 1");
    let window = Duration::from_secs(args.window);
    // Commit-to-ack per event: the relay's acknowledgements, matched to the writers' commits.
    let acks = load::AckLog::default();
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
    }
    let broker = Tansu::start().context("start tansu (scripts/setup installs it)")?;
    let bootstrap = broker.bootstrap();
    let mut report = Report::new(&args.synchronous_commit, args.smoke, machine());
    {
        let mut c = db.conn()?;
        report.note_versions(&mut c);
    }
    eprintln!(
        "outbox-bench: {} events, windows {} s, long transaction {} s, {} writers, synchronous_commit={}{}",
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
    let topic = |name: &str| unique_name(&format!("bench-{name}"));
    let topics: Vec<String> = ["k", "s1", "s2", "s4", "s5", "naive"]
        .iter()
        .map(|n| topic(n))
        .collect();
    for t in &topics {
        create_topic(&bootstrap, t, args.partitions).await?;
    }
    let [t_k, t_s1, t_s2, t_s4, t_s5, t_naive] = topics.as_slice() else {
        bail!("topics");
    };

    // Baseline K.
    let k_time = raw_produce(&relay_cfg, t_k, args.events).await?;
    let k = rate(args.events, k_time);
    report.push(Row::baseline(
        "K: raw produce, relay's producer settings",
        k,
        "msg/s",
    ));

    // Baseline P_ins: these rows are S1's backlog.
    let pb = bar("P_ins: batched INSERT (S1's backlog)", args.events as u64);
    let (u, t, n) = (url.clone(), t_s1.clone(), args.events);
    let pb2 = pb.clone();
    let p_ins_time = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let mut c = PgConnection::establish(&u)?;
        let started = Instant::now();
        batched_insert(&mut c, &t, n, &pb2)?;
        Ok(started.elapsed())
    })
    .await??;
    pb.finish_and_clear();
    let p_ins = rate(args.events, p_ins_time);
    report.push(Row::baseline(
        "P_ins: batched INSERT into the outbox (1000/stmt)",
        p_ins,
        "rows/s",
    ));

    // S1: drain the backlog.
    let before = Cpu::now();
    // Progress from the relay's acknowledgements (no query competing with the relay), then the
    // outbox checked empty.
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&acked);
    let relay = InProcessRelay::run(
        outbox_relay::Relay::new(relay_cfg.clone())?.on_acknowledged(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })),
    );
    let pb = bar("S1: relay drains the backlog", args.events as u64);
    let started = Instant::now();
    while acked.load(Ordering::Relaxed) < args.events {
        pb.set_position(acked.load(Ordering::Relaxed) as u64);
        if started.elapsed() > Duration::from_secs(1800) {
            bail!(
                "S1: {} of {} acknowledged after 30 min",
                acked.load(Ordering::Relaxed),
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Timed to the last acknowledgement; the removal of the last page follows within a cycle and
    // is checked (untimed: the check itself walks every removed row's index entry).
    let drain = started.elapsed();
    wait_drained(&url, &pb, args.events, Duration::from_secs(600)).await?;
    pb.finish_and_clear();
    relay.stop().await?;
    let s1_cpu = Cpu::now().since(&before);
    let s1 = rate(args.events, drain);

    // Baseline P_del (after S1, on fresh rows).
    let (u, t, n) = (url.clone(), t_s1.clone(), args.events);
    let p_del_time = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let mut c = PgConnection::establish(&u)?;
        batched_delete(&mut c, &t, n)
    })
    .await??;
    let p_del = rate(args.events, p_del_time);
    report.push(Row::baseline(
        "P_del: batched DELETE by id (1000/stmt)",
        p_del,
        "rows/s",
    ));
    report.push(
        Row::ratio(
            &format!("S1 backlog drain of {} events", args.events),
            s1,
            "events/s",
            k.min(p_del),
            "min(K, P_del)",
            0.7,
        )
        .cpu(s1_cpu.per_10k(args.events)),
    );

    // The same machine runs the relay, Postgres and the broker: what would 100% of its cores
    // drain at the CPU per event S1 measured?
    let per_event = s1_cpu.total() / args.events as f64;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let ceiling = cores as f64 / per_event.max(1e-12);
    report.push(Row::info(
        "S1 vs the CPU ceiling of this machine",
        s1,
        "events/s",
        &format!(
            "{:.0} events/s would take 100% of {cores} cores at S1's CPU per event ({:.1} us: relay, Postgres, broker); S1 reached {:.0}% of that",
            ceiling,
            per_event * 1e6,
            100.0 * s1 / ceiling
        ),
    ));

    // Baseline A and S3: application transactions without and with the outbox (no relay).
    let mut a_runs = Vec::new();
    let mut s3_runs = Vec::new();
    for round in 0..2 {
        let pb = spinner(&format!(
            "A and S3: application transactions, round {}",
            round + 1
        ));
        a_runs.push(
            Load::flat_out(&url, None, args.writers, 1, window)
                .await?
                .tx_rate(),
        );
        let s3 = Load::flat_out(&url, Some(t_s2), args.writers, 1, window).await?;
        s3_runs.push(s3.tx_rate());
        pb.finish_and_clear();
        let mut c = PgConnection::establish(&url)?;
        for stmt in [
            "DELETE FROM outbox",
            "VACUUM ANALYZE outbox",
            "VACUUM ANALYZE bench_orders",
        ] {
            c.batch_execute(stmt)?;
        }
    }
    let a = a_runs.iter().copied().fold(0.0, f64::max);
    let s3 = s3_runs.iter().copied().fold(0.0, f64::max);
    report.push(Row::baseline(
        &format!(
            "A: app transactions, no outbox ({} connections)",
            args.writers
        ),
        a,
        "tx/s",
    ));
    report.push(Row::ratio(
        "S3 app transactions with one outbox event",
        s3,
        "tx/s",
        a,
        "A",
        0.85,
    ));

    // S2: maximum sustainable throughput, relay running.
    let relay = InProcessRelay::run(
        outbox_relay::Relay::new(relay_cfg.clone())?.on_acknowledged(acks.listener()),
    );
    let mut s2_one = 0.0;
    for per_tx in [1, 10] {
        let pb = spinner(&format!(
            "S2: flat-out writers, {per_tx} events per transaction, relay running"
        ));
        let before = Cpu::now();
        let run = Load::flat_out(&url, Some(t_s2), args.writers, per_tx, window).await?;
        let left = {
            let mut c = PgConnection::establish(&url)?;
            usize::try_from(backlog(&mut c)?)?
        };
        let tail =
            wait_drained(&url, &ProgressBar::hidden(), left, Duration::from_secs(600)).await?;
        let cpu = Cpu::now().since(&before);
        pb.finish_and_clear();
        let bounded = run.backlog_bounded();
        let r = run.event_rate();
        if per_tx == 1 {
            s2_one = r;
        }
        report.push(
            Row::info(
                &format!("S2 max sustainable, {per_tx} event(s)/tx"),
                r,
                "events/s",
                &format!(
                    "backlog {} (max {}, end {}); {:.0} tx/s; rest drained in {:.1} s",
                    if bounded { "bounded" } else { "GREW" },
                    run.max_backlog,
                    run.end_backlog,
                    run.tx_rate(),
                    tail.as_secs_f64()
                ),
            )
            .pass_if(bounded, "backlog bounded")
            .cpu(cpu.per_10k(run.events)),
        );
    }

    // The latency floor: the broker alone, at 50% of S2's rate.
    let pb = spinner("latency floor: produce -> consume through the broker alone");
    let floor = load::broker_latency(&relay_cfg, &bootstrap, t_k, s2_one * 0.5, window).await?;
    pb.finish_and_clear();
    report.push(Row::latency(
        "L0 broker alone: send -> consume at 50% of S2 (no database)",
        &floor,
    ));

    // S4: latency at 25/50/75% of S2 (1 event per transaction).
    let mut at_half = Latencies::default();
    for frac in [0.25, 0.5, 0.75] {
        let target = s2_one * frac;
        let pb = spinner(&format!(
            "S4: commit-to-consume latency at {:.0}% of S2 ({target:.0} events/s)",
            frac * 100.0
        ));
        let lat = Load::paced_latency(&url, &bootstrap, t_s4, args.writers, target, window, &acks)
            .await?;
        pb.finish_and_clear();
        let name = format!(
            "S4 latency at {:.0}% of S2 ({:.0} ev/s)",
            frac * 100.0,
            lat.rate
        );
        let row = Row::latency(&name, &lat);
        report.push(if (frac - 0.5).abs() < f64::EPSILON {
            at_half = lat.clone();
            row.pass_if(
                lat.ack
                    .as_ref()
                    .is_some_and(|a| a.within_5ms >= 0.5 && a.within_25ms >= 0.99),
                "commit-to-ack p50 < 5 ms, p99 < 25 ms",
            )
        } else {
            row
        });
    }

    // S5: a transaction held open while everyone else writes flat out, then at 50% load.
    let pb = spinner(&format!(
        "S5: a transaction held open for {} s while others write",
        args.long_tx
    ));
    let held = load::hold_open(&url, t_s5, args.long_tx).await?;
    let hold = Duration::from_secs(args.long_tx);
    let flat = Load::flat_out(&url, Some(t_s5), args.writers, 1, hold * 2 / 3).await?;
    let lat = Load::paced_latency(
        &url,
        &bootstrap,
        t_s5,
        args.writers,
        s2_one * 0.5,
        hold / 3,
        &acks,
    )
    .await?;
    let held_for = held.commit().await?;
    pb.finish_and_clear();
    relay.stop().await?;
    report.push(
        Row::ratio(
            &format!(
                "S5 throughput, transaction open {:.0} s",
                held_for.as_secs_f64()
            ),
            flat.delivered_rate_last_third(),
            "events/s",
            s2_one,
            "S2 (1 event/tx)",
            0.8,
        )
        .note(&format!(
            "delivered in the last third of the flat-out part; backlog {} (max {})",
            if flat.backlog_bounded() {
                "bounded"
            } else {
                "GREW"
            },
            flat.max_backlog
        )),
    );
    report.push(
        Row::latency("S5 latency at 50% of S2, transaction open", &lat)
            .note(&format!(
                "without the open transaction (S4 at 50%): p50 {:.1} ms, p99 {:.1} ms",
                headline(&at_half).0,
                headline(&at_half).1
            ))
            .pass_if(
                headline(&lat).1 <= headline(&at_half).1.max(1.0) * 1.25 + 5.0,
                "p99 within 25% (+5 ms) of S4 at 50%",
            ),
    );

    // S6: the inbox consumer.
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
    let naive = naive_relay(&url, &bootstrap, t_naive, args.naive_events).await?;
    report.push(Row::info(
        "naive relay (poll by id, send one, await, mark)",
        naive,
        "events/s",
        &format!("the relay drains {:.0}x faster (S1)", s1 / naive.max(1e-9)),
    ));

    report.print();
    report.write_json(&args.json)?;
    eprintln!("results written to {}", args.json.display());
    drop(broker);
    Ok(())
}
