//! The relay against real Postgres and a real Kafka-protocol broker (tansu): commit-safe
//! capture, per-key order under concurrency, long transactions, poison events, graceful
//! shutdown. Each guarantee has a broken variant the same checker catches.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use outbox_relay::PoisonPolicy;
use outbox_tests::check::{check, read_topic, Report};
use outbox_tests::naive::{producer, NaiveRelay};
use outbox_tests::relay::{backlog, leader, wait_until};
use outbox_tests::{
    create_topic, relay_config, unique_name, workload, InProcessRelay, Tansu, TestDb,
};

struct Setup {
    db: TestDb,
    broker: Tansu,
    topic: String,
}

async fn setup(partitions: i32) -> Setup {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("relay");
    create_topic(&broker.bootstrap(), &topic, partitions)
        .await
        .unwrap();
    Setup { db, broker, topic }
}

async fn read(s: &Setup, min: usize) -> Vec<outbox_tests::check::Seen> {
    let (b, t) = (s.broker.bootstrap(), s.topic.clone());
    tokio::task::spawn_blocking(move || {
        read_topic(
            &b,
            &t,
            min,
            Duration::from_secs(2),
            Duration::from_secs(120),
        )
    })
    .await
    .unwrap()
    .unwrap()
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    event_id: uuid::Uuid,
}

fn insert_sql(conn: &mut PgConnection, topic: &str, key: &str, seq: u64) -> String {
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         VALUES ($1, $2, 'Test', convert_to($3, 'UTF8')) RETURNING event_id",
    )
    .bind::<Text, _>(topic)
    .bind::<Text, _>(key)
    .bind::<Text, _>(format!("{{\"seq\":{seq}}}"))
    .get_result::<Id>(conn)
    .unwrap()
    .event_id
    .to_string()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    Relay,
    NaiveIdCursor,
}

/// Transaction A takes a lower id and stays open; B takes a higher id and commits; B is
/// delivered; then A commits. Both must arrive.
async fn late_commit(s: &Setup, capture: Capture) -> Report {
    let mut a = s.db.conn().unwrap();
    let mut b = s.db.conn().unwrap();
    a.batch_execute("BEGIN").unwrap();
    let late = insert_sql(&mut a, &s.topic, "key-late", 0);
    let early = insert_sql(&mut b, &s.topic, "key-early", 0);
    let mut conn = s.db.conn().unwrap();
    let relay = match capture {
        Capture::Relay => {
            let r = InProcessRelay::start(relay_config(s.db.url(), &s.broker.bootstrap())).unwrap();
            // The open transaction's row is invisible here: 0 means the early event left.
            wait_until(Duration::from_secs(30), "early event delivered", || {
                Ok(backlog(&mut conn)? == 0)
            })
            .await
            .unwrap();
            Some(r)
        }
        Capture::NaiveIdCursor => {
            let p = producer(&s.broker.bootstrap()).unwrap();
            let mut naive = NaiveRelay::default();
            assert_eq!(naive.poll_once(&mut conn, &p).await.unwrap(), 1);
            a.batch_execute("COMMIT").unwrap();
            naive.poll_once(&mut conn, &p).await.unwrap();
            None
        }
    };
    if let Some(r) = relay {
        a.batch_execute("COMMIT").unwrap();
        wait_until(Duration::from_secs(30), "backlog drained", || {
            Ok(backlog(&mut conn)? == 0)
        })
        .await
        .unwrap();
        r.stop().await.unwrap();
    }
    let expected: HashMap<String, (String, u64)> = [
        (late, ("key-late".to_owned(), 0)),
        (early, ("key-early".to_owned(), 0)),
    ]
    .into();
    // Read until quiet: the broken variant delivers only one of the two.
    check(&read(s, 1).await, &expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_with_a_lower_id_is_delivered() {
    let s = setup(3).await;
    let report = late_commit(&s, Capture::Relay).await;
    assert!(report.is_consistent(), "{report:?}");
    assert_eq!((report.read, report.duplicates), (2, 0), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_an_id_cursor_loses_the_late_commit() {
    let s = setup(3).await;
    let report = late_commit(&s, Capture::NaiveIdCursor).await;
    assert_eq!(
        report.missing.len(),
        1,
        "the checker must catch the skipped event: {report:?}"
    );
    assert!(!report.is_consistent());
}

async fn concurrent_writers(
    s: &Setup,
    writers: usize,
    txs_per_writer: usize,
    keys: usize,
    events_per_tx: usize,
) -> HashMap<String, (String, u64)> {
    let mut conn = s.db.conn().unwrap();
    workload::create_keys(&mut conn, keys).unwrap();
    let (url, topic) = (s.db.url().to_owned(), s.topic.clone());
    tokio::task::spawn_blocking(move || {
        workload::run_writers(&url, &topic, writers, txs_per_writer, keys, events_per_tx)
    })
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_every_event_once_and_per_key_commit_order() {
    let s = setup(6).await;
    let relay = InProcessRelay::start(relay_config(s.db.url(), &s.broker.bootstrap())).unwrap();
    // 20 writers x 500 transactions x 5 events = 50,000 events over 500 keys
    let expected = concurrent_writers(&s, 20, 500, 500, 5).await;
    assert_eq!(expected.len(), 50_000);
    let mut conn = s.db.conn().unwrap();
    wait_until(Duration::from_secs(300), "backlog drained", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let report = check(&read(&s, expected.len()).await, &expected);
    assert!(report.is_consistent(), "{:?}", summary(&report));
    assert_eq!(report.duplicates, 0, "a clean run has no duplicates");
    assert_eq!(report.read, 50_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_the_order_check_catches_a_reordered_key() {
    // Feed the checker a key whose events arrive 2, 1: it must flag it.
    let seen = vec![
        outbox_tests::check::Seen {
            event_id: "b".into(),
            key: "k".into(),
            partition: 0,
            offset: 0,
            payload: String::new(),
        },
        outbox_tests::check::Seen {
            event_id: "a".into(),
            key: "k".into(),
            partition: 0,
            offset: 1,
            payload: String::new(),
        },
    ];
    let expected = [
        ("a".to_owned(), ("k".to_owned(), 1)),
        ("b".to_owned(), ("k".to_owned(), 2)),
    ]
    .into();
    let report = check(&seen, &expected);
    assert_eq!(report.order_violations, vec!["k: 1 after 2".to_owned()]);
}

fn summary(r: &Report) -> String {
    format!(
        "read={} missing={} (first {:?}) unexpected={} duplicates={} order_violations={} (first {:?}) split_keys={}",
        r.read,
        r.missing.len(),
        r.missing.first(),
        r.unexpected.len(),
        r.duplicates,
        r.order_violations.len(),
        r.order_violations.first(),
        r.split_keys.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_open_transaction_does_not_stall_other_writers() {
    let s = setup(3).await;
    let mut long = s.db.conn().unwrap();
    long.batch_execute("BEGIN").unwrap();
    let held = insert_sql(&mut long, &s.topic, "key-long", 0);
    let relay = InProcessRelay::start(relay_config(s.db.url(), &s.broker.bootstrap())).unwrap();
    let mut expected: HashMap<String, (String, u64)> = HashMap::new();
    let mut conn = s.db.conn().unwrap();
    for i in 0..200_u64 {
        let id = insert_sql(&mut conn, &s.topic, &format!("key-{}", i % 10), i);
        expected.insert(id, (format!("key-{}", i % 10), i));
    }
    // Everything but the open transaction's event (invisible here) leaves while it is open.
    wait_until(Duration::from_secs(30), "others delivered", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    let report = check(&read(&s, 200).await, &expected);
    assert!(
        report.is_consistent() && report.read == 200,
        "{}",
        summary(&report)
    );

    long.batch_execute("COMMIT").unwrap();
    wait_until(Duration::from_secs(30), "held event delivered", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    expected.insert(held, ("key-long".into(), 0));
    let report = check(&read(&s, 201).await, &expected);
    assert!(report.is_consistent(), "{}", summary(&report));
    assert_eq!(report.duplicates, 0);
}

#[derive(QueryableByName, Debug)]
struct DeadRow {
    #[diesel(sql_type = Text)]
    partition_key: String,
    #[diesel(sql_type = Text)]
    last_error: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
}

/// Key A gets [ok, poison (too large for `message.max.bytes` 20000), ok, ok]; key B gets 4 ok
/// events. Returns the ok events as the checker expects them.
fn insert_poison_mix(conn: &mut PgConnection, topic: &str) -> HashMap<String, (String, u64)> {
    let mut expected = HashMap::new();
    for i in 0..4_u64 {
        let id = insert_sql(conn, topic, "key-a", i);
        expected.insert(id, ("key-a".to_owned(), i));
        if i == 0 {
            let big = "x".repeat(50_000);
            diesel::sql_query(
                "INSERT INTO outbox (topic, partition_key, event_type, payload, content_type) \
                 VALUES ($1, 'key-a', 'TooBig', convert_to($2, 'UTF8'), 'text/plain')",
            )
            .bind::<Text, _>(topic)
            .bind::<Text, _>(&big)
            .execute(conn)
            .unwrap();
        }
        let id = insert_sql(conn, topic, "key-b", i);
        expected.insert(id, ("key-b".to_owned(), i));
    }
    expected
}

/// Runs the relay over [`insert_poison_mix`]. Returns what was read and the dead letters.
async fn poison_run(
    s: &Setup,
    policy: PoisonPolicy,
) -> (Vec<outbox_tests::check::Seen>, Vec<DeadRow>) {
    let mut conn = s.db.conn().unwrap();
    insert_poison_mix(&mut conn, &s.topic);
    let cfg = relay_config(s.db.url(), &s.broker.bootstrap())
        .kafka_option("message.max.bytes", "20000")
        .poison_policy(policy);
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(30), "outbox empty", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let dead: Vec<DeadRow> = diesel::sql_query(
        "SELECT partition_key, last_error, attempts FROM outbox_dead_letters ORDER BY id",
    )
    .load(&mut conn)
    .unwrap();
    let status = outbox_relay::status::read(&mut conn, &outbox::TableRef::default()).unwrap();
    assert_eq!(status.dead_letters.len(), 1);
    assert_eq!(
        status.dead_letters[0].events,
        i64::try_from(dead.len()).unwrap()
    );
    assert!(status.dead_letters.iter().any(|d| d.topic == s.topic));
    let seen = read(s, 1).await;
    (seen, dead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_other_events_flow() {
    let s = setup(3).await;
    let (seen, dead) = poison_run(&s, PoisonPolicy::Continue).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].partition_key, "key-a");
    assert!(
        dead[0].last_error.to_lowercase().contains("too large"),
        "{dead:?}"
    );
    assert_eq!(dead[0].attempts, 1, "permanent errors are not retried");
    let per_key = |k: &str| seen.iter().filter(|m| m.key == k).count();
    assert_eq!((per_key("key-a"), per_key("key-b")), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_key_policy_sets_later_events_of_the_key_aside() {
    let s = setup(3).await;
    let (seen, dead) = poison_run(&s, PoisonPolicy::HoldKey).await;
    let per_key = |k: &str| seen.iter().filter(|m| m.key == k).count();
    assert_eq!(per_key("key-b"), 4, "other keys are not blocked");
    assert_eq!(per_key("key-a"), 1, "only the event before the poison left");
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert!(dead.iter().all(|d| d.partition_key == "key-a"));
    assert!(
        dead[1..].iter().all(|d| d.last_error.starts_with("held")),
        "{dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_leaves_nothing_half_done() {
    let s = setup(3).await;
    let mut conn = s.db.conn().unwrap();
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         SELECT $1, 'key-' || (g % 50), 'Test', convert_to('{\"seq\":' || g || '}', 'UTF8') \
         FROM generate_series(1, 30000) g",
    )
    .bind::<Text, _>(&s.topic)
    .execute(&mut conn)
    .unwrap();
    #[derive(QueryableByName)]
    struct Ev {
        #[diesel(sql_type = Text)]
        id: String,
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let all: Vec<Ev> = diesel::sql_query(
        "SELECT event_id::text AS id, partition_key AS key, id AS seq FROM outbox",
    )
    .load(&mut conn)
    .unwrap();
    let relay = InProcessRelay::start(relay_config(s.db.url(), &s.broker.bootstrap())).unwrap();
    wait_until(Duration::from_secs(60), "some delivered", || {
        Ok(backlog(&mut conn)? < 25_000)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    assert_eq!(leader(&mut conn).unwrap(), None, "the lease was released");
    let remaining: Vec<Id> = diesel::sql_query("SELECT event_id FROM outbox")
        .load(&mut conn)
        .unwrap();
    let remaining: std::collections::HashSet<String> = remaining
        .into_iter()
        .map(|r| r.event_id.to_string())
        .collect();
    let seen = read(&s, 30_000 - remaining.len()).await;
    let expected: HashMap<String, (String, u64)> = all
        .into_iter()
        .filter(|e| !remaining.contains(&e.id))
        .map(|e| (e.id, (e.key, u64::try_from(e.seq).unwrap())))
        .collect();
    let report = check(&seen, &expected);
    // Everything delivered was removed, everything removed was delivered, once, in order.
    assert!(report.is_consistent(), "{}", summary(&report));
    assert_eq!(report.duplicates, 0);
    assert!(!remaining.is_empty(), "shutdown came mid-backlog");
}

#[test]
fn a_fenced_out_leader_can_neither_fetch_nor_delete() {
    use outbox_relay::store::{self, Sql};
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    insert_sql(&mut conn, "t", "k", 0);
    let sql = Sql::new(&outbox::TableRef::default());
    let old = store::try_acquire(&mut conn, &sql, "old", 60_000)
        .unwrap()
        .unwrap();
    assert_eq!(
        store::try_acquire(&mut conn, &sql, "new", 60_000).unwrap(),
        None,
        "lease held"
    );
    let batch = store::open_batch(&mut conn, &sql, &old).unwrap();
    let rows = store::fetch(&mut conn, &sql, &old, &batch, 0, 10).unwrap();
    assert_eq!(rows.len(), 1);
    // The old leader goes silent past its lease (as under SIGSTOP); a standby takes over.
    diesel::sql_query(
        "UPDATE outbox_relay_state SET lease_expires_at = clock_timestamp() - interval '1 second'",
    )
    .execute(&mut conn)
    .unwrap();
    let new = store::try_acquire(&mut conn, &sql, "new", 60_000)
        .unwrap()
        .unwrap();
    assert!(new.epoch > old.epoch);
    // The old leader wakes up with its rows in hand.
    assert!(store::fetch(&mut conn, &sql, &old, &batch, 0, 10)
        .unwrap()
        .is_empty());
    let ids = [rows[0].id];
    assert!(matches!(
        store::delete(&mut conn, &sql, &old, &ids),
        Err(outbox_relay::Error::LostLeadership(_))
    ));
    assert!(matches!(
        store::renew(&mut conn, &sql, &old, 1000),
        Err(outbox_relay::Error::LostLeadership(_))
    ));
    assert!(matches!(
        store::close_batch(&mut conn, &sql, &old),
        Err(outbox_relay::Error::LostLeadership(_))
    ));
    assert_eq!(
        backlog(&mut conn).unwrap(),
        1,
        "nothing was removed by the fenced-out leader"
    );
    // The new leader resumes the same batch and may remove the row.
    assert_eq!(store::open_batch(&mut conn, &sql, &new).unwrap(), batch);
    assert_eq!(store::delete(&mut conn, &sql, &new, &ids).unwrap(), 1);
}

/// One leader's capture cycle through the store API: fetch the batch's rows, optionally remove
/// them, then open the next batch (saving the position or not). Returns the rows' event ids.
fn capture_cycle(
    conn: &mut PgConnection,
    sql: &outbox_relay::store::Sql,
    lease: &outbox_relay::store::Lease,
    batch: &outbox_relay::store::Batch,
    remove: bool,
) -> Vec<String> {
    use outbox_relay::store;
    if batch.start_after == i64::MAX {
        return Vec::new();
    }
    let rows = store::fetch(conn, sql, lease, batch, batch.start_after, 1000).unwrap();
    if remove {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        if !ids.is_empty() {
            store::delete(conn, sql, lease, &ids).unwrap();
        }
    }
    rows.iter().map(|r| r.event_id.to_string()).collect()
}

/// The old leader delivers three batches with its position kept in memory (only the first is
/// saved); its second batch was acknowledged but not yet removed when it died. `save_early`: the
/// broken variant saves the position past that batch before removing its rows. Returns what the
/// new leader, resuming from the saved position, delivers, and the event ids written.
fn resume_after_unsaved_batches(save_early: bool) -> (Vec<String>, Vec<String>) {
    use outbox_relay::store::{self, Sql};
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let sql = Sql::new(&outbox::TableRef::default());
    let old = store::try_acquire(&mut conn, &sql, "old", 60_000)
        .unwrap()
        .unwrap();
    let r1 = insert_sql(&mut conn, "t", "k", 1);
    let b1 = store::open_batch(&mut conn, &sql, &old).unwrap();
    assert_eq!(
        capture_cycle(&mut conn, &sql, &old, &b1, true),
        std::slice::from_ref(&r1)
    );
    let r2 = insert_sql(&mut conn, "t", "k", 2);
    let b2 = store::advance_batch(&mut conn, &sql, &old, &b1, false).unwrap();
    // acknowledged, not removed: the process dies before the next call removes it
    assert_eq!(
        capture_cycle(&mut conn, &sql, &old, &b2, false),
        std::slice::from_ref(&r2)
    );
    let r3 = insert_sql(&mut conn, "t", "k", 3);
    let b3 = store::advance_batch(&mut conn, &sql, &old, &b2, save_early).unwrap();
    assert_eq!(
        capture_cycle(&mut conn, &sql, &old, &b3, true),
        std::slice::from_ref(&r3)
    );
    let r4 = insert_sql(&mut conn, "t", "k", 4);
    // The old leader stops past its lease; a new one takes over from the saved position.
    diesel::sql_query(
        "UPDATE outbox_relay_state SET lease_expires_at = clock_timestamp() - interval '1 second'",
    )
    .execute(&mut conn)
    .unwrap();
    let new = store::try_acquire(&mut conn, &sql, "new", 60_000)
        .unwrap()
        .unwrap();
    let mut delivered = Vec::new();
    let mut batch = store::open_batch(&mut conn, &sql, &new).unwrap();
    for _ in 0..3 {
        delivered.extend(capture_cycle(&mut conn, &sql, &new, &batch, true));
        batch = store::advance_batch(&mut conn, &sql, &new, &batch, true).unwrap();
    }
    (delivered, vec![r1, r2, r3, r4])
}

#[test]
fn a_new_leader_resuming_an_older_saved_batch_skips_nothing() {
    let (delivered, written) = resume_after_unsaved_batches(false);
    // r2 (acknowledged, never removed) is sent again, r4 (never captured) for the first time;
    // r1 and r3 were removed and are not.
    assert_eq!(delivered, [written[1].clone(), written[3].clone()]);
}

#[test]
fn broken_variant_saving_the_position_before_removing_a_batch_loses_its_rows() {
    let (delivered, written) = resume_after_unsaved_batches(true);
    assert!(
        !delivered.contains(&written[1]),
        "the same check catches it: r2 stays in the outbox, behind the saved position"
    );
    assert_eq!(delivered, [written[3].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_broker_outage_ends_within_the_timeout_and_removes_nothing() {
    let mut s = setup(3).await;
    let mut conn = s.db.conn().unwrap();
    let cfg =
        relay_config(s.db.url(), &s.broker.bootstrap()).shutdown_timeout(Duration::from_secs(2));
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(30), "leader", || {
        Ok(leader(&mut conn)?.is_some())
    })
    .await
    .unwrap();
    s.broker.kill().unwrap();
    for i in 0..100 {
        insert_sql(&mut conn, &s.topic, &format!("k{}", i % 5), i);
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // the relay is waiting for acknowledgements
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), relay.stop())
        .await
        .expect("shutdown hung while the broker was down")
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "shutdown took {took:?}");
    assert_eq!(
        backlog(&mut conn).unwrap(),
        100,
        "nothing removed without acknowledgement"
    );
    assert_eq!(leader(&mut conn).unwrap(), None, "the lease was released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_id_conflict_does_not_stall_delivery() {
    let s = setup(3).await;
    let mut conn = s.db.conn().unwrap();
    // A poison row whose id is already in the dead letters (an operator re-queued it by hand).
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         VALUES ($1, 'k', 'TooBig', convert_to(repeat('x', 50000), 'UTF8'))",
    )
    .bind::<Text, _>(&s.topic)
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query(
        "INSERT INTO outbox_dead_letters SELECT id, event_id, topic, partition_key, event_type, \
         payload, headers, content_type, traceparent, tx_id, created_at, 1, 'old', now() FROM outbox",
    )
    .execute(&mut conn)
    .unwrap();
    let ok = insert_sql(&mut conn, &s.topic, "other", 0);
    let cfg =
        relay_config(s.db.url(), &s.broker.bootstrap()).kafka_option("message.max.bytes", "20000");
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(30), "outbox empty", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let dead: Vec<DeadRow> =
        diesel::sql_query("SELECT partition_key, last_error, attempts FROM outbox_dead_letters")
            .load(&mut conn)
            .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].last_error.to_lowercase().contains("too large"),
        "{dead:?}"
    );
    let seen = read(&s, 1).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].event_id, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_relay_without_dead_letters_is_blocked_by_one_poison_event() {
    let s = setup(3).await;
    let mut conn = s.db.conn().unwrap();
    let expected = insert_poison_mix(&mut conn, &s.topic);
    let producer = outbox_tests::naive::producer_with(
        &s.broker.bootstrap(),
        &[("message.max.bytes", "20000")],
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, flag) = (s.db.url().to_owned(), std::sync::Arc::clone(&stop));
    let task = tokio::spawn(async move {
        outbox_tests::naive::run_broken(
            outbox_tests::naive::Broken::RetryForever,
            &url,
            &producer,
            &flag,
        )
        .await
    });
    // The real relay empties this outbox in well under a second.
    let drained = wait_until(Duration::from_secs(10), "outbox empty", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = task.await.unwrap();
    let report = check(&read(&s, 1).await, &expected);
    let missing_b = report
        .missing
        .iter()
        .filter(|id| expected[*id].0 == "key-b")
        .count();
    assert!(
        drained.is_err() && missing_b > 0,
        "one poison event must block the other key too: {}",
        summary(&report)
    );
    eprintln!(
        "retry-forever relay: {} of {} good events stuck behind the poison ({missing_b} of key-b)",
        report.missing.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_an_xmin_horizon_relay_stalls_behind_a_long_transaction() {
    let s = setup(3).await;
    let mut long = s.db.conn().unwrap();
    long.batch_execute("BEGIN").unwrap();
    insert_sql(&mut long, &s.topic, "key-long", 0);
    let producer = producer(&s.broker.bootstrap()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, flag) = (s.db.url().to_owned(), std::sync::Arc::clone(&stop));
    let task = tokio::spawn(async move {
        outbox_tests::naive::run_broken(
            outbox_tests::naive::Broken::Horizon,
            &url,
            &producer,
            &flag,
        )
        .await
    });
    let mut expected: HashMap<String, (String, u64)> = HashMap::new();
    let mut conn = s.db.conn().unwrap();
    for i in 0..200_u64 {
        let id = insert_sql(&mut conn, &s.topic, &format!("key-{}", i % 10), i);
        expected.insert(id, (format!("key-{}", i % 10), i));
    }
    // The same wait the real relay passes in `a_long_open_transaction_does_not_stall_other_writers`.
    let drained = wait_until(Duration::from_secs(30), "others delivered", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await;
    let report = check(&read(&s, 0).await, &expected);
    long.batch_execute("COMMIT").unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    task.await.unwrap().unwrap();
    assert!(
        drained.is_err() && report.missing.len() == 200,
        "the horizon relay must stall every other writer while the transaction is open: {}",
        summary(&report)
    );
}
