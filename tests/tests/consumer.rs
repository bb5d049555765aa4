//! The consumer runner against real Postgres and tansu: redelivery applied once, retries and
//! the dead-letter topic, a crash between the DB commit and the offset commit (and a consumer
//! without the inbox that applies twice), rebalances while processing.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use outbox::consumer::{
    batch_handler, ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage,
};
use outbox_tests::check::header;
use outbox_tests::relay::wait_until;
use outbox_tests::{create_topic, effects, unique_name, Tansu, TestDb};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_consumer-under-test");

async fn produce(bootstrap: &str, topic: &str, msgs: &[(String, String, String)]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let futures: Vec<_> = msgs
        .iter()
        .map(|(id, key, payload)| {
            let h = OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            });
            p.send(
                FutureRecord::to(topic).key(key).payload(payload).headers(h),
                Duration::from_secs(30),
            )
        })
        .collect();
    for f in futures {
        f.await.map_err(|(e, _)| e).unwrap();
    }
}

fn messages(n: usize, keys: usize) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("m-{i}"),
                format!("k-{}", i % keys),
                format!("{{\"i\":{i}}}"),
            )
        })
        .collect()
}

struct Env {
    db: TestDb,
    broker: Tansu,
    topic: String,
    group: String,
}

async fn env(partitions: i32) -> Env {
    let db = TestDb::migrated().unwrap();
    effects::create(&mut db.conn().unwrap()).unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("consume");
    create_topic(&broker.bootstrap(), &topic, partitions)
        .await
        .unwrap();
    Env {
        db,
        broker,
        topic,
        group: unique_name("group"),
    }
}

fn effect_handler(conn: &mut PgConnection, m: &IncomingMessage) -> Result<(), HandlerError> {
    effects::apply(conn, &m.message_id, m.key_str().unwrap_or_default())?;
    Ok(())
}

fn start(
    cfg: ConsumerConfig,
    handler: impl outbox::consumer::Handler,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), outbox::Error>>,
) {
    let runner = ConsumerRunner::new(cfg, handler).unwrap();
    let token = CancellationToken::new();
    let t = token.clone();
    (token, tokio::spawn(async move { runner.run(t).await }))
}

fn per_key_order_kept(conn: &mut PgConnection) -> bool {
    #[derive(QueryableByName)]
    struct Bad {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    // message ids are m-<i>, produced in increasing i per key: application order must follow.
    diesel::sql_query(
        "SELECT count(*) AS n FROM (SELECT key, substr(message_id, 3)::int AS i, \
         lag(substr(message_id, 3)::int) OVER (PARTITION BY key ORDER BY applied_order) AS prev \
         FROM effects) t WHERE prev > i",
    )
    .get_result::<Bad>(conn)
    .unwrap()
    .n == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_messages_change_the_state_once_in_partition_order() {
    let e = env(3).await;
    let msgs = messages(300, 20);
    // every message three times, as after producer retries and consumer crashes
    produce(&e.broker.bootstrap(), &e.topic, &msgs).await;
    produce(&e.broker.bootstrap(), &e.topic, &msgs).await;
    produce(&e.broker.bootstrap(), &e.topic, &msgs).await;
    let cfg = ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url());
    let (stop, handle) = start(cfg, effect_handler);
    let mut conn = e.db.conn().unwrap();
    wait_until(Duration::from_secs(60), "300 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 300)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // let the copies arrive too
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(effects::summary(&mut conn).unwrap(), (300, 0, 300));
    assert!(per_key_order_kept(&mut conn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_poison_goes_to_the_dead_letter_topic() {
    let e = env(1).await;
    let msgs: Vec<(String, String, String)> = [
        ("m-0", "ok"),
        ("m-1", "flaky"),
        ("m-2", "poison"),
        ("m-3", "always-transient"),
        ("m-4", "ok"),
    ]
    .iter()
    .map(|(id, p)| ((*id).to_owned(), "k".to_owned(), (*p).to_owned()))
    .collect();
    produce(&e.broker.bootstrap(), &e.topic, &msgs).await;
    let tries: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let t = Arc::clone(&tries);
    let handler = move |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        let n = {
            let mut tries = t.lock().unwrap();
            let n = tries.entry(m.message_id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        match m.payload.as_deref() {
            Some(b"flaky") if n < 3 => Err(HandlerError::Transient(format!("lock timeout #{n}"))),
            Some(b"poison") => Err(HandlerError::Permanent(
                "order references unknown product".into(),
            )),
            Some(b"always-transient") => Err(HandlerError::Transient("still down".into())),
            _ => effect_handler(conn, m),
        }
    };
    let dlq = unique_name("dlq");
    create_topic(&e.broker.bootstrap(), &dlq, 1).await.unwrap();
    let cfg = ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url())
        .dead_letter_topic(&dlq)
        .max_attempts(4)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50));
    let (stop, handle) = start(cfg, handler);
    let mut conn = e.db.conn().unwrap();
    wait_until(Duration::from_secs(60), "3 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 3)
    })
    .await
    .unwrap();
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(
        effects::summary(&mut conn).unwrap(),
        (3, 0, 3),
        "ok, flaky and the later ok applied once"
    );
    assert!(per_key_order_kept(&mut conn), "m-4 after m-1");
    assert_eq!(tries.lock().unwrap()["m-1"], 3);
    assert_eq!(
        tries.lock().unwrap()["m-2"],
        1,
        "permanent errors are not retried"
    );
    assert_eq!(
        tries.lock().unwrap()["m-3"],
        4,
        "transient errors: max_attempts"
    );
    let bootstrap = e.broker.bootstrap();
    let dead = tokio::task::spawn_blocking(move || {
        let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique_name("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        rdkafka::consumer::Consumer::subscribe(&c, &[dlq.as_str()]).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while out.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(m) = c.poll(Duration::from_millis(200)) {
                out.push(m.unwrap().detach());
            }
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(header(&dead[0], "ce_id").as_deref(), Some("m-2"));
    assert_eq!(
        header(&dead[0], "dlq_error_kind").as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header(&dead[0], "dlq_reason").as_deref(),
        Some("order references unknown product")
    );
    assert_eq!(
        header(&dead[0], "dlq_original_topic").as_deref(),
        Some(e.topic.as_str())
    );
    assert_eq!(header(&dead[1], "ce_id").as_deref(), Some("m-3"));
    assert_eq!(
        header(&dead[1], "dlq_error_kind").as_deref(),
        Some("transient")
    );
    assert_eq!(header(&dead[1], "dlq_attempts").as_deref(), Some("4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_gets_whole_batches_and_a_poison_message_falls_back_to_one_by_one() {
    let e = env(2).await;
    let mut msgs = messages(600, 20);
    msgs[250].2 = "poison".into();
    // every message twice: the duplicates never reach the handler
    produce(&e.broker.bootstrap(), &e.topic, &msgs).await;
    produce(&e.broker.bootstrap(), &e.topic, &msgs).await;
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let s = Arc::clone(&sizes);
    let handler = batch_handler(
        move |conn: &mut PgConnection, ms: &[&IncomingMessage]| -> Result<(), HandlerError> {
            s.lock().unwrap().push(ms.len());
            if ms.iter().any(|m| m.payload.as_deref() == Some(b"poison")) {
                return Err(HandlerError::Permanent("poison in the batch".into()));
            }
            let ids: Vec<&str> = ms.iter().map(|m| m.message_id.as_str()).collect();
            let keys: Vec<&str> = ms.iter().map(|m| m.key_str().unwrap_or_default()).collect();
            effects::apply_batch(conn, &ids, &keys)?;
            Ok(())
        },
    );
    let dlq = unique_name("dlq");
    create_topic(&e.broker.bootstrap(), &dlq, 1).await.unwrap();
    let cfg = ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url())
        .dead_letter_topic(&dlq);
    let (stop, handle) = start(cfg, handler);
    let mut conn = e.db.conn().unwrap();
    wait_until(Duration::from_secs(60), "599 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 599)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // let the copies arrive too
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(
        effects::summary(&mut conn).unwrap(),
        (599, 0, 599),
        "every message but the poison applied once"
    );
    assert!(per_key_order_kept(&mut conn));
    let sizes = sizes.lock().unwrap().clone();
    assert!(
        sizes.iter().any(|&n| n > 1),
        "a backlog reaches the handler in batches: {sizes:?}"
    );
    // the poison message's batch failed once and was applied one message at a time
    assert!(sizes.iter().filter(|&&n| n == 1).count() >= 2, "{sizes:?}");
    let poison: i64 =
        diesel::sql_query("SELECT count(*) AS n FROM inbox WHERE message_id = 'm-250'")
            .get_result::<Count>(&mut conn)
            .unwrap()
            .n;
    assert_eq!(
        poison, 0,
        "the poison message has no inbox row: nothing of it applied"
    );
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn spawn_consumer(mode: &str, e: &Env, log: &std::path::Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args([mode, &e.broker.bootstrap(), &e.group, &e.topic, e.db.url()])
        .env("RUST_LOG", "outbox::consumer=debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

/// Kill -9 the consumer after part of the stream, restart it, let it finish.
/// Returns (effects summary, the restarted consumer's log).
async fn crash_and_restart(mode: &str) -> ((i64, i64, i64), String) {
    let e = env(3).await;
    produce(&e.broker.bootstrap(), &e.topic, &messages(2000, 50)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = e.db.conn().unwrap();
    let mut first = spawn_consumer(mode, &e, &dir.path().join("first.log"));
    wait_until(Duration::from_secs(60), "some effects", || {
        Ok(effects::summary(&mut conn)?.0 >= 500)
    })
    .await
    .unwrap();
    first.kill().unwrap(); // SIGKILL: DB commits done, offsets never committed
    first.wait().unwrap();
    let second_log = dir.path().join("second.log");
    let mut second = spawn_consumer(mode, &e, &second_log);
    wait_until(Duration::from_secs(120), "all effects", || {
        Ok(effects::summary(&mut conn)?.0 == 2000)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.kill().unwrap();
    second.wait().unwrap();
    (
        effects::summary(&mut conn).unwrap(),
        std::fs::read_to_string(second_log).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_db_commit_and_before_the_offset_commit_causes_no_second_effect() {
    let ((distinct, twice, total), log) = crash_and_restart("runner").await;
    assert_eq!((distinct, twice, total), (2000, 0, 2000));
    let absorbed = log.matches("duplicate skipped").count();
    assert!(
        absorbed > 0,
        "the restart must have seen redeliveries (the inbox absorbed them)"
    );
    eprintln!("crash: 2000 messages, {absorbed} redeliveries absorbed by the inbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_consumer_without_the_inbox_applies_twice_after_a_crash() {
    let ((distinct, twice, total), _) = crash_and_restart("naive").await;
    assert_eq!(distinct, 2000, "none lost");
    assert!(
        twice > 0 && total > 2000,
        "the test must catch double effects: twice={twice} total={total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_while_processing_skip_nothing_and_apply_nothing_twice() {
    let e = env(6).await;
    let msgs = messages(3000, 60);
    let (b, t) = (e.broker.bootstrap(), e.topic.clone());
    let producer = tokio::spawn(async move {
        for chunk in msgs.chunks(100) {
            produce(&b, &t, chunk).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    let cfg = || ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url());
    let slow = |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        std::thread::sleep(Duration::from_millis(1));
        effect_handler(conn, m)
    };
    let mut conn = e.db.conn().unwrap();
    let (stop_a, a) = start(cfg(), slow);
    wait_until(Duration::from_secs(60), "1000 effects", || {
        Ok(effects::summary(&mut conn)?.0 >= 1000)
    })
    .await
    .unwrap();
    let (stop_b, b) = start(cfg(), slow); // joins: partitions move while A is busy
    wait_until(Duration::from_secs(60), "2000 effects", || {
        Ok(effects::summary(&mut conn)?.0 >= 2000)
    })
    .await
    .unwrap();
    stop_a.cancel(); // leaves: its partitions are revoked and move to B
    a.await.unwrap().unwrap();
    let (stop_c, c) = start(cfg(), slow); // and another joins
    producer.await.unwrap();
    wait_until(Duration::from_secs(120), "3000 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 3000)
    })
    .await
    .unwrap();
    stop_b.cancel();
    stop_c.cancel();
    b.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
    assert_eq!(effects::summary(&mut conn).unwrap(), (3000, 0, 3000));
    assert!(per_key_order_kept(&mut conn));
}

#[test]
fn unsafe_consumer_settings_are_refused() {
    let base = || ConsumerConfig::new("127.0.0.1:1", "g", &["t"], "postgres://x");
    for (k, v, why) in [
        (
            "enable.auto.offset.store",
            "true",
            "after the database commit",
        ),
        (
            "isolation.level",
            "read_uncommitted",
            "aborted transactions",
        ),
        ("group.id", "other", "typed configuration"),
    ] {
        let err = base()
            .kafka_option(k, v)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains(k) && err.contains(why), "{k}: {err}");
    }
    assert!(ConsumerConfig::new("b", "g", &[], "u").validate().is_err());
    assert!(ConsumerConfig::new("b", "g", &[".."], "u")
        .validate()
        .is_err());
    assert!(base().max_attempts(0).validate().is_err());
    assert!(base()
        .retention(Duration::ZERO, Duration::from_secs(1))
        .validate()
        .is_err());
    base().validate().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_purges_old_inbox_rows_on_schedule() {
    let e = env(1).await;
    let mut conn = e.db.conn().unwrap();
    diesel::sql_query(
        "INSERT INTO inbox (consumer, message_id, processed_at) \
         SELECT $1, 'old-' || g, now() - interval '20 days' FROM generate_series(1, 50) g",
    )
    .bind::<diesel::sql_types::Text, _>(&e.group)
    .execute(&mut conn)
    .unwrap();
    produce(&e.broker.bootstrap(), &e.topic, &messages(5, 1)).await;
    let cfg = ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url())
        .retention(
            Duration::from_secs(7 * 24 * 3600),
            Duration::from_millis(200),
        );
    let (stop, handle) = start(cfg, effect_handler);
    let inbox = outbox::Inbox::new(e.group.clone()).unwrap();
    wait_until(Duration::from_secs(30), "old rows purged, new kept", || {
        Ok(!inbox.contains(&mut conn, "old-1")? && inbox.contains(&mut conn, "m-4")?)
    })
    .await
    .unwrap();
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_runs_in_the_writers_trace() {
    use tracing_subscriber::prelude::*;
    // Global: handlers run on blocking threads. Harmless for the other tests of this binary.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(outbox::TraceContextLayer::new()),
    );
    let e = env(1).await;
    let writer = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", e.broker.bootstrap())
        .create()
        .unwrap();
    let h = OwnedHeaders::new()
        .insert(Header {
            key: "ce_id",
            value: Some("traced"),
        })
        .insert(Header {
            key: "traceparent",
            value: Some(writer),
        });
    p.send(
        FutureRecord::to(&e.topic).key("k").payload("{}").headers(h),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    let seen: Arc<Mutex<Option<outbox::Traceparent>>> = Arc::default();
    let s = Arc::clone(&seen);
    let handler = move |_: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        assert_eq!(
            m.traceparent().map(|t| t.to_string()).as_deref(),
            Some(writer)
        );
        *s.lock().unwrap() = outbox::current_traceparent();
        Ok(())
    };
    let cfg = ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url());
    let (stop, handle) = start(cfg, handler);
    wait_until(Duration::from_secs(30), "handled", || {
        Ok(seen.lock().unwrap().is_some())
    })
    .await
    .unwrap();
    stop.cancel();
    handle.await.unwrap().unwrap();
    let ctx = seen.lock().unwrap().unwrap();
    assert_eq!(
        ctx.trace_id(),
        0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
        "same trace as the writer"
    );
    assert_ne!(ctx.parent_id(), 0x00f0_67aa_0ba9_02b7, "a new span in it");
}

/// End to end: the writer enqueues inside a traced span, the relay sends its `traceparent`, and
/// the runner's handler runs in a span of the same trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_trace_reaches_the_handler_through_the_relay() {
    use tracing_subscriber::prelude::*;
    // Global, as above: the writer, the in-process relay and the handler threads all see it.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(outbox::TraceContextLayer::new()),
    );
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("traced");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();

    let mut conn = db.conn().unwrap();
    let writer = {
        let span = tracing::info_span!("create_order");
        let _g = span.enter();
        let writer = outbox::current_traceparent().unwrap();
        let e = outbox::Event::json(&topic, "order-1", "OrderCreated", &1).unwrap();
        conn.transaction(|c| outbox::Outbox::new().enqueue(c, &e))
            .unwrap();
        writer
    };
    let relay =
        outbox_tests::InProcessRelay::start(outbox_tests::relay_config(db.url(), &bootstrap))
            .unwrap();

    type Seen = Option<(Option<String>, Option<outbox::Traceparent>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = Arc::clone(&seen);
    let handler = move |_: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        *s.lock().unwrap() = Some((
            m.traceparent().map(|t| t.to_string()),
            outbox::current_traceparent(),
        ));
        Ok(())
    };
    let group = unique_name("traced-group");
    let cfg = ConsumerConfig::new(&bootstrap, &group, &[&topic], db.url());
    let (stop, handle) = start(cfg, handler);
    wait_until(Duration::from_secs(60), "handled", || {
        Ok(seen.lock().unwrap().is_some())
    })
    .await
    .unwrap();
    stop.cancel();
    handle.await.unwrap().unwrap();
    relay.stop().await.unwrap();

    let (header, handler_ctx) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(
        header.as_deref(),
        Some(writer.to_string().as_str()),
        "the relay sent the writer's traceparent"
    );
    let handler_ctx = handler_ctx.expect("the handler runs in a traced span");
    assert_eq!(
        handler_ctx.trace_id(),
        writer.trace_id(),
        "the handler's span is in the writer's trace"
    );
    assert_ne!(
        handler_ctx.parent_id(),
        writer.parent_id(),
        "in a span of its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_stuck_past_max_poll_interval_skips_nothing_and_applies_nothing_twice() {
    let e = env(1).await;
    produce(&e.broker.bootstrap(), &e.topic, &messages(400, 4)).await;
    let stuck_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = Arc::clone(&stuck_once);
    // Runner A hangs on message m-10 for longer than max.poll.interval.ms. Its queue fills and
    // the rest is buffered, and A keeps polling (until the buffer is full), so whether the group
    // keeps A (it finishes the partition) or evicts it (B takes over from the committed
    // offset), nothing may be skipped or applied twice.
    let slow = move |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        if m.message_id == "m-10" && !s.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(12));
        }
        effect_handler(conn, m)
    };
    let cfg = || {
        ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url())
            .kafka_option("session.timeout.ms", "6000")
            .kafka_option("heartbeat.interval.ms", "1000")
            .kafka_option("max.poll.interval.ms", "7000")
    };
    let mut conn = e.db.conn().unwrap();
    let (stop_a, a) = start(cfg(), slow);
    wait_until(Duration::from_secs(30), "A stuck", || {
        Ok(stuck_once.load(std::sync::atomic::Ordering::SeqCst))
    })
    .await
    .unwrap();
    let (stop_b, b) = start(cfg(), effect_handler);
    wait_until(Duration::from_secs(120), "all 400 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 400)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_a.cancel();
    stop_b.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(
        effects::summary(&mut conn).unwrap(),
        (400, 0, 400),
        "none skipped, none twice"
    );
}

/// C3: shutdown comes while a message is being retried (a transient failure). The message is
/// neither applied nor dead-lettered, so no later message of its partition may be applied or
/// have its offset stored: after a restart it is delivered again and applied, and the
/// messages after it too. Run `broken` (a consumer that stores each offset as it reads the
/// message, the classic "offsets before the effect"): the checker sees the message lost.
async fn shutdown_during_retries(broken: bool) -> (i64, i64, i64) {
    let e = env(1).await;
    produce(&e.broker.bootstrap(), &e.topic, &messages(3, 1)).await;
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (f, t) = (Arc::clone(&failing), Arc::clone(&tries));
    let handler = move |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        if m.message_id == "m-1" && f.load(std::sync::atomic::Ordering::SeqCst) {
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(HandlerError::Transient("database busy".into()));
        }
        effect_handler(conn, m)
    };
    let cfg = || {
        ConsumerConfig::new(e.broker.bootstrap(), &e.group, &[&e.topic], e.db.url())
            .max_attempts(1000)
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(50))
    };
    let mut conn = e.db.conn().unwrap();
    if broken {
        // Reads all three, stores each offset at once, applies what it can, stops.
        let (b, topic, group, url) = (
            e.broker.bootstrap(),
            e.topic.clone(),
            e.group.clone(),
            e.db.url().to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
            use rdkafka::Message;
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("group.id", &group)
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            c.subscribe(&[topic.as_str()]).unwrap();
            let mut conn = PgConnection::establish(&url).unwrap();
            let mut read = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while read < 3 && std::time::Instant::now() < deadline {
                let Some(m) = c.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let m = m.unwrap();
                read += 1;
                let id = header(&m.detach(), "ce_id").unwrap();
                if id != "m-1" {
                    effects::apply(&mut conn, &id, "k-0").unwrap();
                }
                let mut tpl = rdkafka::TopicPartitionList::new();
                tpl.add_partition_offset(
                    m.topic(),
                    m.partition(),
                    rdkafka::Offset::Offset(m.offset() + 1),
                )
                .unwrap();
                c.commit(&tpl, CommitMode::Sync).unwrap();
            }
        })
        .await
        .unwrap();
    } else {
        let (stop, handle) = start(cfg(), handler.clone());
        wait_until(Duration::from_secs(60), "m-1 retried", || {
            Ok(tries.load(std::sync::atomic::Ordering::SeqCst) >= 3)
        })
        .await
        .unwrap();
        stop.cancel();
        handle.await.unwrap().unwrap();
    }
    // The cause is gone; a new runner in the same group picks up from the committed offset.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (stop, handle) = start(cfg(), handler);
    let _ = wait_until(Duration::from_secs(20), "3 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 3)
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    effects::summary(&mut conn).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_messages_retries_skips_nothing() {
    assert_eq!(
        shutdown_during_retries(false).await,
        (3, 0, 3),
        "m-0, m-1 and m-2 each applied once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_offsets_stored_before_the_effect_lose_the_message_in_retry() {
    let (distinct, _, _) = shutdown_during_retries(true).await;
    assert_eq!(distinct, 2, "the checker must see m-1 lost");
}

/// Produces `n` messages `<prefix>-<i>` to one partition.
async fn produce_to(bootstrap: &str, topic: &str, partition: i32, prefix: &str, n: usize) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let futures: Vec<_> = (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let h = OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            });
            p.send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(prefix)
                    .payload("{}")
                    .headers(h),
                Duration::from_secs(30),
            )
        })
        .collect();
    for f in futures {
        f.await.map_err(|(e, _)| e).unwrap();
    }
}

const SLOW_FOR: Duration = Duration::from_secs(20);

/// C4: partition 0's handler waits 20 s on one message (a lock, a slow dependency) with 2,000
/// more messages of partition 0 behind it (more than its queue of 1,024 holds); then 300
/// messages arrive on partition 1. Partition
/// 1 must not wait for partition 0. Returns how many of partition 1's messages were applied
/// while partition 0 was stuck. `broken`: the old dispatch (one loop awaiting each
/// partition's full queue).
async fn one_slow_partition(broken: bool) -> i64 {
    let e = env(2).await;
    let b = e.broker.bootstrap();
    produce_to(&b, &e.topic, 0, "p0", 2000).await;
    let stuck = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = Arc::clone(&stuck);
    let handler = move |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        if m.message_id == "p0-1" && !s.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(SLOW_FOR);
        }
        effect_handler(conn, m)
    };
    let mut conn = e.db.conn().unwrap();
    let p1_applied = |conn: &mut PgConnection| -> i64 {
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "(SELECT count(*) FROM effects WHERE key = 'p1')",
        ))
        .get_result(conn)
        .unwrap()
    };
    let stop = CancellationToken::new();
    let task = if broken {
        tokio::spawn(old_dispatch(
            b.clone(),
            e.group.clone(),
            e.topic.clone(),
            e.db.url().to_owned(),
            handler,
            stop.clone(),
        ))
    } else {
        let cfg = ConsumerConfig::new(b.clone(), &e.group, &[&e.topic], e.db.url());
        let runner = ConsumerRunner::new(cfg, handler).unwrap();
        let t = stop.clone();
        tokio::spawn(async move { runner.run(t).await.unwrap() })
    };
    wait_until(Duration::from_secs(60), "partition 0 stuck", || {
        Ok(stuck.load(std::sync::atomic::Ordering::SeqCst))
    })
    .await
    .unwrap();
    let stuck_at = std::time::Instant::now();
    // Partition 0's queue (1,024) is full by now: 2,000 messages were waiting behind the stuck
    // one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce_to(&b, &e.topic, 1, "p1", 300).await;
    let _ = wait_until(Duration::from_secs(8), "partition 1 done", || {
        Ok(p1_applied(&mut conn) == 300)
    })
    .await;
    let during = p1_applied(&mut conn);
    assert!(
        stuck_at.elapsed() < SLOW_FOR,
        "measured while partition 0 was stuck"
    );
    wait_until(Duration::from_secs(120), "all 2,300 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 2300)
    })
    .await
    .unwrap();
    stop.cancel();
    task.await.unwrap();
    assert_eq!(effects::summary(&mut conn).unwrap(), (2300, 0, 2300));
    during
}

/// The dispatch loop of the old releases: one loop hands each message to its partition's
/// bounded queue and waits when that queue is full.
async fn old_dispatch(
    bootstrap: String,
    group: String,
    topic: String,
    url: String,
    handler: impl Fn(&mut PgConnection, &IncomingMessage) -> Result<(), HandlerError>
        + Send
        + Sync
        + Clone
        + 'static,
    stop: CancellationToken,
) {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic.as_str()]).unwrap();
    let mut queues: HashMap<i32, tokio::sync::mpsc::Sender<IncomingMessage>> = HashMap::new();
    loop {
        let m = tokio::select! {
            () = stop.cancelled() => break,
            m = consumer.recv() => m.unwrap(),
        };
        let incoming = IncomingMessage {
            message_id: header(&m.detach(), "ce_id").unwrap(),
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: Vec::new(),
        };
        let tx = queues.entry(m.partition()).or_insert_with(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<IncomingMessage>(1024);
            let (url, handler) = (url.clone(), handler.clone());
            tokio::spawn(async move {
                let mut conn = PgConnection::establish(&url).unwrap();
                while let Some(m) = rx.recv().await {
                    let h = handler.clone();
                    conn = tokio::task::spawn_blocking(move || {
                        conn.transaction::<_, HandlerError, _>(|c| h(c, &m))
                            .unwrap();
                        conn
                    })
                    .await
                    .unwrap();
                }
            });
            tx
        });
        let _ = tx.send(incoming).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_partition_does_not_hold_up_the_others() {
    let during = one_slow_partition(false).await;
    assert_eq!(during, 300, "partition 1 flowed while partition 0 waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_dispatch_that_waits_on_a_full_queue_stalls_every_partition() {
    let during = one_slow_partition(true).await;
    assert!(
        during < 300,
        "the checker must see partition 1 wait: {during} applied"
    );
}

/// A backlog far larger than the partition queue and its buffer: every message must be applied.
/// (A version that paused the partition in the client when its queue was full skipped the
/// messages the pause dropped: the S6 benchmark stopped at 15,813 of 50,000 messages, and this
/// test at fewer than 6,000.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_fills_the_partition_queue_again_and_again_is_consumed_to_the_end() {
    let e = env(2).await;
    let b = e.broker.bootstrap();
    produce_to(&b, &e.topic, 0, "q0", 3000).await;
    produce_to(&b, &e.topic, 1, "q1", 3000).await;
    let cfg =
        ConsumerConfig::new(b.clone(), &e.group, &[&e.topic], e.db.url()).queue_per_partition(4);
    let (stop, handle) = start(cfg, effect_handler);
    let mut conn = e.db.conn().unwrap();
    let r = wait_until(Duration::from_secs(120), "6,000 effects", || {
        Ok(effects::summary(&mut conn)?.0 == 6000)
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    r.unwrap();
    assert_eq!(effects::summary(&mut conn).unwrap(), (6000, 0, 6000));
}
