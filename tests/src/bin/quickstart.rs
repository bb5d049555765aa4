//! `scripts/demo`: the outbox end to end on this machine, with nothing to install but Postgres.
//!
//! 1. creates a fresh database on the local Postgres and applies the migrations;
//! 2. starts an embedded Kafka broker (librdkafka's mock cluster, 3 brokers);
//! 3. runs `--writers` concurrent writers that commit business rows and events together
//!    (a per-key sequence under a row lock, so the key's commit order is known);
//! 4. runs the relay in-process, then reads the topic from offset 0 with an independent
//!    consumer and checks: every committed event once, per-key commit order, one partition per
//!    key. Exits non-zero on any inconsistency.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use outbox_tests::check::{check, read_topic};
use outbox_tests::relay::backlog;
use outbox_tests::workload::{create_keys, run_writers};
use outbox_tests::{relay_config, InProcessRelay, TestDb};

struct Args {
    writers: usize,
    txs: usize,
    keys: usize,
    per_tx: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        writers: 8,
        txs: 250,
        keys: 200,
        per_tx: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize> {
            let v = it.next().with_context(|| format!("{flag} needs a value"))?;
            let n: usize = v
                .parse()
                .with_context(|| format!("{flag}: {v:?} is not a number"))?;
            if n == 0 {
                bail!("{flag} must be positive");
            }
            Ok(n)
        };
        match flag.as_str() {
            "--writers" => a.writers = value()?,
            "--transactions" => a.txs = value()?,
            "--keys" => a.keys = value()?,
            "--events-per-transaction" => a.per_tx = value()?,
            "--help" | "-h" => {
                println!(
                    "usage: quickstart [--writers N] [--transactions N per writer] [--keys N] \
                     [--events-per-transaction N]\nenv: OUTBOX_TEST_DATABASE_URL (default \
                     postgres://postgres@127.0.0.1:5432/postgres)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(a)
}

fn row(label: &str, value: impl std::fmt::Display) {
    println!("| {label:<36} | {value:>14} |");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let total = args.writers * args.txs * args.per_tx;
    println!(
        "outbox quickstart: {} writers x {} transactions x up to {} events over {} keys",
        args.writers, args.txs, args.per_tx, args.keys
    );

    let db = TestDb::migrated()
        .context("create the demo database (is Postgres running? scripts/setup starts it)")?;
    println!("  database   {} (dropped at exit)", db.name());
    let cluster = outbox_tests::mock_cluster(3)?;
    let topic = "quickstart.events";
    cluster.create_topic(topic, 6, 3)?;
    let bootstrap = cluster.bootstrap_servers();
    println!("  broker     embedded mock cluster at {bootstrap} (6 partitions)");
    let mut conn = db.conn()?;
    create_keys(&mut conn, args.keys)?;

    let started = Instant::now();
    let relay = InProcessRelay::start(relay_config(db.url(), &bootstrap))?;
    let (url, t, a) = (
        db.url().to_owned(),
        topic.to_owned(),
        (args.writers, args.txs, args.keys, args.per_tx),
    );
    let writers = tokio::task::spawn_blocking(move || run_writers(&url, &t, a.0, a.1, a.2, a.3));
    let mut last = String::new();
    while !writers.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let line = format!(
            "  writing... backlog {:>6} (events committed, not yet in Kafka)",
            backlog(&mut conn)?
        );
        if line != last {
            print!("\r{line}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            last = line;
        }
    }
    let expected = writers.await??;
    let written_in = started.elapsed();
    let drain = Instant::now();
    while backlog(&mut conn)? > 0 {
        if drain.elapsed() > Duration::from_secs(120) {
            bail!("the relay did not drain the backlog within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_in = started.elapsed();
    println!(
        "\r  done: {} events committed in {:.1}s, all in Kafka after {:.1}s{:20}",
        expected.len(),
        written_in.as_secs_f64(),
        delivered_in.as_secs_f64(),
        ""
    );
    relay.stop().await?;

    let min = expected.len();
    let seen = tokio::task::spawn_blocking(move || {
        read_topic(
            &bootstrap,
            topic,
            min,
            Duration::from_secs(2),
            Duration::from_secs(120),
        )
    })
    .await??;
    let report = check(&seen, &expected);
    #[allow(clippy::cast_precision_loss)]
    let rate = expected.len() as f64 / delivered_in.as_secs_f64();
    println!();
    println!("| {:<36} | {:>14} |", "check", "result");
    println!("|{}|{}|", "-".repeat(38), "-".repeat(16));
    row("events committed", expected.len());
    row("upper bound (writers x tx x events)", total);
    row("messages read back from offset 0", report.read);
    row("missing (committed, not in Kafka)", report.missing.len());
    row("unexpected (not committed)", report.unexpected.len());
    row("duplicates", report.duplicates);
    row("per-key order violations", report.order_violations.len());
    row("keys split over partitions", report.split_keys.len());
    row("end-to-end rate (events/s)", format!("{rate:.0}"));
    println!();
    if report.is_consistent() {
        println!("CONSISTENT: every committed event reached Kafka once, in commit order per key.");
        Ok(())
    } else {
        bail!("INCONSISTENT: {report:?}")
    }
}
