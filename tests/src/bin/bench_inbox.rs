//! Inbox consumer benchmark (brief section 5, S6), all measured in one run against the same
//! tansu broker and Postgres, 200-byte payloads:
//!
//! - raw consume: an rdkafka consumer reading every message, no processing;
//! - `P_ins`: batched multi-row INSERTs into the inbox table (the database's limit);
//! - runner: the consumer runner (inbox dedup + one business write per message, one transaction
//!   per message), from start until every effect is committed.
//!
//! `cargo run --release -p outbox-tests --bin bench-inbox -- [--messages N] [--partitions P]`

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diesel::sql_types::{Array, Text};
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::consumer::{ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage};
use outbox_tests::{create_topic, effects, unique_name, Tansu, TestDb};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?;
            let n: usize = v
                .parse()
                .with_context(|| format!("{name}: {v:?} is not a number"))?;
            if n == 0 {
                bail!("{name} must be positive");
            }
            Ok(n)
        }
        None => Ok(default),
    }
}

#[allow(clippy::cast_precision_loss)]
fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = arg("--messages", 20_000)?;
    let partitions = i32::try_from(arg("--partitions", 6)?)?;
    let broker = Tansu::start()?;
    let topic = unique_name("bench");
    create_topic(&broker.bootstrap(), &topic, partitions).await?;
    eprintln!("producing {n} messages of 200 bytes to {partitions} partitions...");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let payload = "x".repeat(200);
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("m-{i}");
        let key = format!("k-{}", i % 1000);
        let h = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(id.as_str()),
        });
        pending.push(
            producer
                .send_result(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .headers(h),
                )
                .map_err(|(e, _)| e)?,
        );
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }

    // Raw consumption.
    eprintln!("raw consume...");
    let (b, t) = (broker.bootstrap(), topic.clone());
    let raw = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", unique_name("raw"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        c.subscribe(&[t.as_str()])?;
        let mut got = 0;
        let mut started = None;
        while got < n {
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                m?;
                started.get_or_insert_with(Instant::now);
                got += 1;
            }
        }
        Ok(started.map(|s| s.elapsed()).unwrap_or_default())
    })
    .await??;

    // Batched inserts into the inbox (the database's limit for dedup rows).
    eprintln!("batched inbox inserts...");
    let db = TestDb::migrated()?;
    let mut conn = db.conn()?;
    let ids: Vec<String> = (0..n).map(|i| format!("p-{i}")).collect();
    let started = Instant::now();
    for chunk in ids.chunks(1000) {
        conn.transaction(|c| {
            diesel::sql_query(
                "INSERT INTO inbox (consumer, message_id) SELECT 'bench', unnest($1::text[])",
            )
            .bind::<Array<Text>, _>(chunk)
            .execute(c)
        })?;
    }
    let p_ins = started.elapsed();

    // The runner: dedup + business write, one transaction per message.
    eprintln!("consumer runner...");
    effects::create(&mut conn)?;
    let cfg = ConsumerConfig::new(
        broker.bootstrap(),
        unique_name("runner"),
        &[&topic],
        db.url(),
    );
    let handler = |c: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        effects::apply(c, &m.message_id, m.key_str().unwrap_or_default())?;
        Ok(())
    };
    let runner = ConsumerRunner::new(cfg, handler)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { runner.run(token).await });
    loop {
        let (done, _, _) = effects::summary(&mut conn)?;
        if usize::try_from(done)? >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runner_time = started.elapsed();
    stop.cancel();
    task.await??;
    let (distinct, twice, _) = effects::summary(&mut conn)?;

    let (raw_rate, ins_rate, run_rate) = (rate(n, raw), rate(n, p_ins), rate(n, runner_time));
    let baseline = raw_rate.min(ins_rate);
    println!("| scenario | msg/s | baseline msg/s | ratio | target |");
    println!("|---|---:|---:|---:|---|");
    println!("| raw consume (K_c) | {raw_rate:.0} | | | |");
    println!("| batched inbox INSERT (P_ins) | {ins_rate:.0} | | | |");
    println!(
        "| runner: dedup + business write | {run_rate:.0} | {baseline:.0} (min of K_c, P_ins) | {:.3} | >= 0.7 |",
        run_rate / baseline
    );
    println!("\n{n} messages, {partitions} partitions; effects: {distinct} distinct, {twice} applied twice");
    if twice != 0 || usize::try_from(distinct)? != n {
        bail!("inconsistent run");
    }
    Ok(())
}
