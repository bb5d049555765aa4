//! The fault soak: random faults under continuous load, then the invariants checked from
//! outside (docs/GUARANTEES.md).
//!
//! A private Postgres cluster, a durable tansu broker (or, with `--mock-broker`, librdkafka's mock
//! cluster), two `outbox-relay` processes, resilient
//! writers (each transaction records its events in `written`, the source of truth after a
//! crash), and a consumer runner applying every event to `effects` through the inbox. Every few
//! seconds one fault: kill -9 of the leading relay, SIGSTOP of it past its lease (then SIGCONT),
//! kill -9 of the broker, an immediate stop of Postgres, a transaction that writes an event and
//! stays open (`--long-tx-seconds`, minutes in release soaks) while the others keep writing; and
//! message-level faults: rows at the edges of what the outbox accepts (a `created_at` of
//! `infinity`, a payload over `message.max.bytes`), which must be dead-lettered without stalling
//! anything, and a consumer handler failing and slow, its runner restarted in the middle of the
//! retries; with `--mock-broker`, produce requests failing (one for good) and one partition's
//! leader down replace the broker kill. Each is healed a few seconds later.
//! Afterwards: I1 every committed event in Kafka, I2 nothing uncommitted, I3 per-key order,
//! I4 duplicates only from in-flight work, I5 every effect once, I6 lag back to zero after each
//! heal within a bound, and the others' lag stays bounded while a transaction is held open.
//! Exits 1 on any violation.
//!
//! `soak --seconds 600 --long-tx-seconds 120` for release checks; `--broken-consumer` deduplicates on Kafka offsets
//! instead of event ids, which the I5 check must catch. `--reader-fetch-max-bytes N` sets the cap
//! of the checker's fetches (0: librdkafka's default, with which the checker reads nothing back
//! from tansu once the topic outgrows what one fetch can serve within the client's timeout). A
//! checker that reads nothing is reported as a READER failure (I1-I4 not checked), which also
//! fails the soak.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diesel::sql_types::{Double, Nullable};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use outbox::consumer::{ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage, MessageId};
use outbox_tests::check::{check, read_topic_with, ReadOptions, STALL};
use outbox_tests::kafka::high_watermarks;
use outbox_tests::relay::{backlog, leader};
use outbox_tests::workload::{committed, create_keys, run_resilient_writers_until};
use outbox_tests::{create_topic, effects, unique_name, PgCluster, RelayProcess, Tansu};
use rand::{Rng, SeedableRng};

const IN_FLIGHT_BOUND: usize = 4 * 1000;
/// On the mock cluster, events unacknowledged for 2 s are set aside (a partition's leader is down
/// longer), so the soak exercises that path too; on tansu the relays run with the defaults.
const MOCK_RELAY_ARGS: &[&str] = &["--ack-overdue-ms", "2000"];
const LAG_BOUND: Duration = Duration::from_secs(30);
/// Most the other writers' events may wait while one transaction is held open.
const HELD_LAG_BOUND: Duration = Duration::from_secs(10);
/// Cap of each fetch of the checker's reader (keys and values, see
/// `outbox_tests::kafka::reader_at`): about 200 of the soak's messages (a key and `{"seq":N}`).
/// tansu 0.6.0 scans every stored header for each record it serves, so past about 12,000
/// messages (fewer on a loaded machine) one uncapped fetch from offset 0 (the whole topic in one
/// answer) outlasts the client's 60 s request timeout, the client sends it again, and the reader
/// reads nothing; capped, each fetch takes a second or two, well under [`STALL`]. Larger than
/// any key plus value the soak sends (the oversized edge row must never reach Kafka: if it did,
/// the read would stop short at it and the soak fail).
const READER_FETCH_MAX_BYTES: usize = 4096;

struct Args {
    seconds: u64,
    seed: u64,
    rate: u64,
    long_tx: Duration,
    broken_consumer: bool,
    mock_broker: bool,
    reader_fetch_max_bytes: Option<usize>,
    /// The relays stream the WAL (`--capture streaming`) instead of polling.
    streaming: bool,
}

/// The broker under the soak: durable tansu (killed and restarted as a fault), or librdkafka's
/// mock cluster (per-request produce errors and a partition without a leader as faults).
enum Broker {
    Tansu(Tansu),
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Broker {
    fn bootstrap(&self) -> String {
        match self {
            Broker::Tansu(t) => t.bootstrap(),
            Broker::Mock(m) => m.bootstrap_servers(),
        }
    }
}

fn args() -> Result<Args> {
    let mut a = Args {
        seconds: 60,
        seed: rand::random(),
        rate: 150,
        long_tx: Duration::from_secs(8),
        broken_consumer: false,
        mock_broker: false,
        reader_fetch_max_bytes: Some(READER_FETCH_MAX_BYTES),
        streaming: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--seed" => a.seed = it.next().context("--seed N")?.parse()?,
            "--rate" => a.rate = it.next().context("--rate N")?.parse()?,
            "--long-tx-seconds" => {
                a.long_tx = Duration::from_secs(it.next().context("--long-tx-seconds N")?.parse()?);
            }
            "--broken-consumer" => a.broken_consumer = true,
            "--mock-broker" => a.mock_broker = true,
            "--capture" => {
                a.streaming = match it.next().as_deref() {
                    Some("streaming") => true,
                    Some("polling") => false,
                    other => anyhow::bail!("--capture polling|streaming, not {other:?}"),
                };
            }
            "--reader-fetch-max-bytes" => {
                let n: usize = it.next().context("--reader-fetch-max-bytes N")?.parse()?;
                a.reader_fetch_max_bytes = (n > 0).then_some(n);
            }
            other => anyhow::bail!("unknown argument {other:?}: soak [--seconds N] [--seed N] [--rate EVENTS_PER_S] [--long-tx-seconds N] [--broken-consumer] [--mock-broker] [--capture polling|streaming] [--reader-fetch-max-bytes N (0: librdkafka's default)]"),
        }
    }
    Ok(a)
}

#[derive(QueryableByName)]
struct Age {
    #[diesel(sql_type = Nullable<Double>)]
    age: Option<f64>,
}

/// Age in seconds of the oldest undelivered event (None: empty, or the database is down).
fn oldest_age(url: &str) -> Option<f64> {
    let mut c = PgConnection::establish(url).ok()?;
    diesel::sql_query(
        "SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 AS age FROM outbox",
    )
    .get_result::<Age>(&mut c)
    .ok()?
    .age
    .or(Some(0.0))
}

#[derive(QueryableByName)]
struct Stuck {
    #[diesel(sql_type = diesel::sql_types::Text)]
    line: String,
}

/// The oldest rows still in the outbox and the slot's position (diagnostics of a lag that did
/// not recover).
fn stuck_rows(url: &str) -> String {
    let Ok(mut c) = PgConnection::establish(url) else {
        return "  (database unreachable)".into();
    };
    let q =
        "SELECT format('  row id=%s type=%s key=%s created_at=%s tx_id=%s visible=%s bytes=%s', \
             id, event_type, left(partition_key, 20), created_at, tx_id, \
             pg_visible_in_snapshot(tx_id, pg_current_snapshot()), octet_length(payload)) AS line \
             FROM outbox ORDER BY id LIMIT 10";
    let mut out: Vec<String> = diesel::sql_query(q)
        .load::<Stuck>(&mut c)
        .map(|v| v.into_iter().map(|s| s.line).collect())
        .unwrap_or_else(|e| vec![format!("  (rows: {e})")]);
    let q = "SELECT format('  outbox rows=%s; slots: %s; dead letters=%s', \
             (SELECT count(*) FROM outbox), \
             (SELECT string_agg(format('%s active=%s restart=%s confirmed=%s', slot_name, active, restart_lsn, confirmed_flush_lsn), ', ') FROM pg_replication_slots), \
             (SELECT count(*) FROM outbox_dead_letters)) AS line";
    out.extend(
        diesel::sql_query(q)
            .load::<Stuck>(&mut c)
            .map(|v| v.into_iter().map(|s| s.line).collect::<Vec<_>>())
            .unwrap_or_else(|e| vec![format!("  (slots: {e})")]),
    );
    out.join("\n")
}

/// Time from `healed` until the oldest waiting event is younger than 1 s.
fn lag_recovery(url: &str, healed: Instant) -> Duration {
    loop {
        if oldest_age(url).is_some_and(|a| a < 1.0) || healed.elapsed() > LAG_BOUND * 4 {
            return healed.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens a transaction that writes one event (recorded in `written`, so it counts as committed)
/// and keeps it open for `hold` while the paced writers go on; returns the worst age of the
/// oldest event the relay could already see (the others' lag) during the hold.
async fn hold_transaction_open(
    url: &str,
    topic: &str,
    n: usize,
    hold: Duration,
) -> Result<Duration> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    let mut c = PgConnection::establish(url)?;
    AnsiTransactionManager::begin_transaction(&mut c)?;
    let key = format!("held-{n}");
    let e = outbox::Event::json(topic, &key, "Held", &serde_json::json!({ "seq": 0 }))?;
    diesel::sql_query("INSERT INTO written VALUES ($1, $2, 0)")
        .bind::<diesel::sql_types::Text, _>(e.event_id().to_string())
        .bind::<diesel::sql_types::Text, _>(&key)
        .execute(&mut c)?;
    outbox::Outbox::new().enqueue(&mut c, &e)?;
    let opened = Instant::now();
    let mut worst = 0.0_f64;
    while opened.elapsed() < hold {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let u = url.to_owned();
        if let Some(age) = tokio::task::spawn_blocking(move || oldest_age(&u)).await? {
            worst = worst.max(age);
        }
    }
    AnsiTransactionManager::commit_transaction(&mut c)?;
    Ok(Duration::from_secs_f64(worst))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn main() -> Result<()> {
    let args = args()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    println!(
        "soak: {} s, seed {}, {} events/s, transactions held open {} s{}",
        args.seconds,
        args.seed,
        args.rate,
        args.long_tx.as_secs(),
        if args.broken_consumer {
            ", BROKEN consumer (dedup on offsets)"
        } else {
            ""
        }
    );
    let relay_bin = std::env::current_exe()?.with_file_name("relay-under-test");
    let mut relay_args: Vec<&str> = if args.mock_broker {
        MOCK_RELAY_ARGS.to_vec()
    } else {
        Vec::new()
    };
    if args.streaming {
        relay_args.extend(["--capture", "streaming"]);
    }
    let relay_args = relay_args.as_slice();
    anyhow::ensure!(
        relay_bin.exists(),
        "{} missing: cargo build -p outbox-tests --bins",
        relay_bin.display()
    );

    let cluster = PgCluster::start()?;
    let url = cluster.create_db("app")?;
    let consumer_url = cluster.create_db("consumer")?;
    {
        let mut c = PgConnection::establish(&url)?;
        outbox::Outbox::new().migrate(&mut c)?;
        if args.streaming {
            let cfg = outbox_relay::RelayConfig::default();
            outbox_relay::store::stream::ensure_streaming(
                &mut c,
                &outbox::TableRef::default(),
                &cfg.slot_name(),
                &cfg.publication_name(),
            )?;
        }
        create_keys(&mut c, 200)?;
        let mut c = PgConnection::establish(&consumer_url)?;
        outbox::Outbox::new().migrate(&mut c)?;
        effects::create(&mut c)?;
    }
    let topic = unique_name("soak");
    let mut broker = if args.mock_broker {
        // Broker 1 leads every partition; the fault moves one to broker 2 and takes 2 down.
        let m = outbox_tests::mock_cluster(2)?;
        m.create_topic(&topic, 6, 1)?;
        for p in 0..6 {
            m.partition_leader(&topic, p, Some(1))?;
        }
        Broker::Mock(m)
    } else {
        let t = Tansu::start_durable()?;
        create_topic(&t.bootstrap(), &topic, 6).await?;
        Broker::Tansu(t)
    };
    let mut relays = vec![
        RelayProcess::spawn(
            relay_bin.to_str().context("path")?,
            &url,
            &broker.bootstrap(),
            relay_args,
        )?,
        RelayProcess::spawn(
            relay_bin.to_str().context("path")?,
            &url,
            &broker.bootstrap(),
            relay_args,
        )?,
    ];

    // The consumer: every event's effect through the inbox (or, broken, deduplicated on offsets).
    let mut cfg = ConsumerConfig::new(
        broker.bootstrap(),
        unique_name("soak-consumer"),
        &[&topic],
        &consumer_url,
    )
    .retry_backoff(Duration::from_millis(100), Duration::from_secs(2))
    .max_attempts(1000);
    if args.broken_consumer {
        cfg = cfg.message_id(MessageId::TopicPartitionOffset);
    }
    // While `failing` is set the handler fails every message (transiently) after a pause: a
    // slow, failing dependency.
    let failing = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failing);
    let handler = move |c: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        if f.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            return Err(HandlerError::Transient("dependency down (soak)".into()));
        }
        let id = m.header("ce_id").unwrap_or_default().to_owned();
        effects::apply(c, &id, m.key_str().unwrap_or_default())?;
        Ok(())
    };
    let start_consumer = || -> Result<_> {
        let runner = ConsumerRunner::new(cfg.clone(), handler.clone())?;
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        Ok((stop, tokio::spawn(async move { runner.run(token).await })))
    };
    let (mut consumer_stop, mut consumer) = start_consumer()?;
    let mut edge_rows = 0_i64;

    let stop = Arc::new(AtomicBool::new(false));
    let (u, t, s) = (url.clone(), topic.clone(), Arc::clone(&stop));
    // Paced: the soak is about faults, not throughput (a durable broker on 2 cores is slow).
    anyhow::ensure!(args.rate > 0, "--rate must be positive");
    let pause = Duration::from_secs_f64(4.0 / args.rate as f64);
    let writers = tokio::task::spawn_blocking(move || {
        run_resilient_writers_until(&u, &t, 4, usize::MAX, 200, pause, &s)
    });

    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut faults: Vec<(String, Duration)> = Vec::new();
    let mut kinds_left: Vec<u32> = Vec::new();
    let mut held_lag = Duration::ZERO;
    tokio::time::sleep(Duration::from_secs(3)).await;
    while Instant::now() + Duration::from_secs(8) < deadline {
        // Every kind of fault once per round, in a random order.
        if kinds_left.is_empty() {
            // The mock broker cannot be killed; it injects request and partition faults.
            kinds_left = if args.mock_broker {
                vec![0, 1, 3, 4, 5, 6, 7, 8]
            } else {
                vec![0, 1, 2, 3, 4, 5, 6]
            };
            rand::seq::SliceRandom::shuffle(kinds_left.as_mut_slice(), &mut rng);
        }
        let kind = kinds_left.pop().unwrap_or(0);
        let label = match kind {
            0 | 1 => {
                let Ok(Some((id, _))) = PgConnection::establish(&url)
                    .map_err(anyhow::Error::from)
                    .and_then(|mut c| leader(&mut c))
                else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let pid: u32 = id
                    .rsplit('-')
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                let Some(r) = relays.iter_mut().find(|r| r.pid() == pid) else {
                    continue;
                };
                if kind == 0 {
                    r.kill9()?;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3000))).await;
                    *r = RelayProcess::spawn(
                        relay_bin.to_str().context("path")?,
                        &url,
                        &broker.bootstrap(),
                        relay_args,
                    )?;
                    "kill -9 of the leading relay".to_owned()
                } else {
                    r.stop()?;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(2500..5000))).await;
                    r.cont()?;
                    "SIGSTOP of the leading relay past its lease".to_owned()
                }
            }
            2 => {
                let Broker::Tansu(t) = &mut broker else {
                    continue;
                };
                t.kill()?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..4000))).await;
                t.restart()?;
                "kill -9 of the broker".to_owned()
            }
            7 => {
                let Broker::Mock(m) = &broker else {
                    continue;
                };
                // One produce request refused for good (the gap-less producer stops, the relay
                // starts a new one), then retriable errors librdkafka absorbs.
                use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr as E};
                m.request_errors(
                    RDKafkaApiKey::Produce,
                    &[
                        E::RD_KAFKA_RESP_ERR_NO_ERROR,
                        E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
                        E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                        E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    ],
                );
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..3000))).await;
                "produce requests failing (one for good)".to_owned()
            }
            8 => {
                let Broker::Mock(m) = &broker else {
                    continue;
                };
                let p = rng.gen_range(0..6);
                m.partition_leader(&topic, p, Some(2))?;
                m.broker_down(2)?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(3000..6000))).await;
                m.broker_up(2)?;
                m.partition_leader(&topic, p, Some(1))?;
                "one partition's leader down".to_owned()
            }
            5 => {
                // Plain-SQL writers storing what the table accepts but Kafka cannot carry. They
                // are not in `written`: reaching Kafka would be I2; they must be dead-lettered.
                let mut c = PgConnection::establish(&url)?;
                for values in [
                    "'edge', 'EdgeInfiniteTime', '\\x00', 'infinity'",
                    "'edge', 'EdgeHugePayload', convert_to(repeat('x', 2000000), 'UTF8'), now()",
                ] {
                    diesel::sql_query(format!(
                        "INSERT INTO outbox (topic, partition_key, event_type, payload, created_at) \
                         VALUES ($1, {values})"
                    ))
                    .bind::<diesel::sql_types::Text, _>(&topic)
                    .execute(&mut c)?;
                    edge_rows += 1;
                }
                "rows at the edges of what the outbox accepts".to_owned()
            }
            6 => {
                failing.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..2500))).await;
                // Restarted in the middle of its retries: nothing may be skipped (C3).
                consumer_stop.cancel();
                consumer.await??;
                (consumer_stop, consumer) = start_consumer()?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
                failing.store(false, Ordering::Relaxed);
                "a failing, slow consumer handler, its runner restarted mid-retry".to_owned()
            }
            4 => {
                let worst = hold_transaction_open(&url, &topic, faults.len(), args.long_tx).await?;
                println!(
                    "  (others' oldest waiting event while the transaction was open: {:.1} s)",
                    worst.as_secs_f64()
                );
                held_lag = held_lag.max(worst);
                "a transaction held open while others write".to_owned()
            }
            _ => {
                cluster.stop_immediate()?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..3000))).await;
                cluster.start_server()?;
                "Postgres crash (immediate stop) and recovery".to_owned()
            }
        };
        let healed = Instant::now();
        let u = url.clone();
        let lag = tokio::task::spawn_blocking(move || lag_recovery(&u, healed)).await?;
        println!(
            "  fault: {label:<48} lag back under 1 s after {:.1} s",
            lag.as_secs_f64()
        );
        if lag >= LAG_BOUND / 6 {
            // What kept the lag up, for whoever reads a failed run.
            println!("{}", stuck_rows(&url));
            for (i, r) in relays.iter().enumerate() {
                let log = r.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                println!("  relay {i} (pid {}) log, last lines:", r.pid());
                for l in tail.into_iter().rev() {
                    println!("    {l}");
                }
            }
        }
        faults.push((label, lag));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..4000))).await;
    }
    stop.store(true, Ordering::Relaxed);
    let failed_txs = writers.await??;
    let mut conn = PgConnection::establish(&url)?;
    // Always end with a redelivery the consumers must absorb: ten delivered events sent again
    // with their ids, as after a relay crash between produce and removal.
    let resent = diesel::sql_query(
        "INSERT INTO outbox (event_id, topic, partition_key, event_type, payload) \
         SELECT event_id::uuid, $1, key, 'Bumped', convert_to('{\"seq\":' || seq || '}', 'UTF8') \
         FROM written WHERE event_id::uuid NOT IN (SELECT event_id FROM outbox) ORDER BY seq LIMIT 10",
    )
    .bind::<diesel::sql_types::Text, _>(&topic)
    .execute(&mut conn)?;
    faults.push((
        format!("re-send of {resent} delivered events (crash between produce and removal)"),
        Duration::ZERO,
    ));
    let drain = Instant::now();
    while backlog(&mut conn)? > 0 {
        anyhow::ensure!(
            drain.elapsed() < Duration::from_secs(180),
            "backlog not drained within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = committed(&mut conn)?;
    let mut consumer_conn = PgConnection::establish(&consumer_url)?;
    let settle = Instant::now();
    while usize::try_from(effects::summary(&mut consumer_conn)?.0)? < expected.len()
        && settle.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    consumer_stop.cancel();
    consumer.await??;
    // The independent reader, after the run: every partition from offset 0 (assigned, no
    // group), so it checks what Kafka holds at the end (a reader during the run would also count
    // messages a later broker crash lost, and would add its per-record header scans to tansu's
    // load while the run goes), until it has as many messages as the broker holds (at least one
    // per committed event) and nothing new came for 3 s. tansu serves a topic from the start in
    // time that grows with the square of its size (about 50 s for 11,000 messages, 110 s for
    // 16,000 on 2 cores), in fetches capped by `--reader-fetch-max-bytes`; a reader stuck for
    // `STALL` is replaced (see `read_topic_with`).
    let (b, t, n) = (broker.bootstrap(), topic.clone(), expected.len());
    let read_for = Duration::from_secs(180).max(Duration::from_secs(args.seconds));
    let options = ReadOptions {
        fetch_max_bytes: args.reader_fetch_max_bytes,
        stall: STALL,
    };
    let read = tokio::task::spawn_blocking(move || {
        // Everything the broker holds now (the backlog is drained), not only as many messages
        // as events were committed: with duplicates, that many come before the last of them.
        let target = high_watermarks(&b, &t, Duration::from_secs(10))
            .map(|ends| usize::try_from(ends.values().sum::<i64>()).unwrap_or_default())
            .unwrap_or_default()
            .max(n);
        // Past `read_for`, only as long as messages keep coming (up to three times as long).
        let (soft, hard) = (Instant::now() + read_for, Instant::now() + read_for * 3);
        read_topic_with(&b, &t, target, options, |read, since_new| {
            let now = Instant::now();
            (read >= target && since_new > Duration::from_secs(3))
                || now > hard
                || (now > soft && since_new > STALL)
        })
    })
    .await??;
    let seen = &read.seen;
    let report = check(seen, &expected);
    let (distinct, twice, _) = effects::summary(&mut consumer_conn)?;
    #[derive(QueryableByName)]
    struct Dead {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let edge_dead = diesel::sql_query(
        "SELECT count(*) AS n FROM outbox_dead_letters WHERE event_type LIKE 'Edge%'",
    )
    .get_result::<Dead>(&mut conn)?
    .n;
    let max_lag = faults.iter().map(|(_, l)| *l).max().unwrap_or_default();
    // A reader that got nothing of what the broker holds checked nothing: I1-I4 fail as not
    // checked, and the report says the reader failed, not that events are missing.
    let reader_failed = read.reader_failed();
    let not_checked = || (false, "not checked: nothing read".to_owned());
    let invariants = [
        (
            "I1 every committed event reached Kafka",
            if reader_failed {
                (false, format!("READER FAILED: read 0 of {n}"))
            } else if !report.missing.is_empty() && !read.complete() {
                (
                    false,
                    format!("{} missing, reader incomplete", report.missing.len()),
                )
            } else {
                (
                    report.missing.is_empty(),
                    format!("{} missing", report.missing.len()),
                )
            },
        ),
        (
            "I2 nothing uncommitted reached Kafka",
            if reader_failed {
                not_checked()
            } else if read.unread() > 0 {
                // What the reader did not get may be what should not be there.
                (
                    false,
                    format!(
                        "{} unexpected, {} offsets unread",
                        report.unexpected.len(),
                        read.unread()
                    ),
                )
            } else {
                (
                    report.unexpected.is_empty(),
                    format!("{} unexpected", report.unexpected.len()),
                )
            },
        ),
        (
            "I3 per-key order",
            if reader_failed {
                not_checked()
            } else {
                (
                    report.order_violations.is_empty() && report.split_keys.is_empty(),
                    format!("{} violations", report.order_violations.len()),
                )
            },
        ),
        (
            "I4 duplicates only from in-flight work",
            if reader_failed {
                not_checked()
            } else {
                (
                    report.duplicates <= faults.len().max(1) * IN_FLIGHT_BOUND,
                    format!("{} duplicates in Kafka", report.duplicates),
                )
            },
        ),
        (
            "I5 each effect once",
            (
                twice == 0 && usize::try_from(distinct)? == expected.len(),
                format!("{distinct} effects, {twice} applied twice"),
            ),
        ),
        (
            "edge rows dead-lettered, nothing stalled",
            (
                edge_dead == edge_rows,
                format!("{edge_dead} of {edge_rows} dead-lettered"),
            ),
        ),
        (
            "I6 others flow while a transaction is open",
            (
                held_lag < HELD_LAG_BOUND,
                format!(
                    "max {:.1} s (bound {} s)",
                    held_lag.as_secs_f64(),
                    HELD_LAG_BOUND.as_secs()
                ),
            ),
        ),
        (
            "I6 lag back to zero after each heal",
            (
                max_lag < LAG_BOUND,
                format!(
                    "max {:.1} s (bound {} s)",
                    max_lag.as_secs_f64(),
                    LAG_BOUND.as_secs()
                ),
            ),
        ),
    ];
    println!();
    println!("| {:<44} | {:>32} | {:<4} |", "invariant", "measured", "ok");
    println!("|{}|{}|{}|", "-".repeat(46), "-".repeat(34), "-".repeat(6));
    for (name, (ok, measured)) in &invariants {
        println!(
            "| {name:<44} | {measured:>32} | {:<4} |",
            if *ok { "yes" } else { "NO" }
        );
    }
    println!();
    println!("events committed {}, writer transactions failed by faults {failed_txs}, faults injected {}", expected.len(), faults.len());
    let mut kinds: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (label, _) in &faults {
        *kinds.entry(label.as_str()).or_default() += 1;
    }
    for (k, n) in kinds {
        println!("  {n} x {k}");
    }
    println!("duplicates: {} in Kafka (before the inbox), {twice} effects applied twice (after the inbox)", report.duplicates);
    if reader_failed {
        println!(
            "READER FAILED: the checker's reader got none of the messages the broker holds, so \
             I1-I4 were not checked (a harness failure, not evidence of missing events):\n{}",
            read.diagnosis()
        );
    } else if (!report.missing.is_empty() && !read.complete()) || read.unread() > 0 {
        println!(
            "reader incomplete: it did not read every offset up to the broker's end, so missing \
             events may be in Kafka unread, and unexpected ones may be among what it did not \
             read:\n{}",
            read.diagnosis()
        );
    } else {
        println!("checker's reader: {}", read.summary());
        if !report.missing.is_empty() {
            println!(
                "the reader read every offset up to the broker's end on every partition: the \
                 missing events are not in Kafka"
            );
        }
    }
    for r in &mut relays {
        let _ = r.terminate(Duration::from_secs(15));
    }
    if invariants.iter().all(|(_, (ok, _))| *ok) {
        println!("SOAK PASSED");
        Ok(())
    } else if reader_failed {
        anyhow::bail!("SOAK FAILED: the checker's reader read nothing, so I1-I4 were not checked")
    } else {
        anyhow::bail!("SOAK FAILED: an invariant was violated")
    }
}
