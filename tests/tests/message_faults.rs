//! Message-level faults (docs/GUARANTEES.md "Message-level faults"): one produce request failing
//! asynchronously, rows at the edges of what the outbox table accepts, dead-letter retries
//! under `hold-key`. Each guarantee has a broken variant the same checker catches.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use outbox::StoredEvent;
use outbox_tests::check::{check, Report, Seen};
use outbox_tests::relay::{backlog, wait_until};
use outbox_tests::workload::Expected;
use outbox_tests::{relay_config, unique_name, InProcessRelay, TestDb};
use rdkafka::producer::FutureRecord;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    event_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    partition_key: String,
    #[diesel(sql_type = BigInt)]
    seq: i64,
}

/// `per_key` events for each of `keys` keys, interleaved, in one transaction (so id order is
/// commit order). Returns event id -> (key, sequence).
fn insert_sequence(conn: &mut PgConnection, topic: &str, keys: i64, per_key: i64) -> Expected {
    let rows: Vec<Inserted> = diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         SELECT $1, 'key-' || (g % $2), 'Test', convert_to((g / $2)::text, 'UTF8') \
         FROM generate_series(0, $2 * $3 - 1) g ORDER BY g \
         RETURNING event_id, partition_key, convert_from(payload, 'UTF8')::bigint AS seq",
    )
    .bind::<Text, _>(topic)
    .bind::<BigInt, _>(keys)
    .bind::<BigInt, _>(per_key)
    .load(conn)
    .unwrap();
    rows.into_iter()
        .map(|r| {
            (
                r.event_id.to_string(),
                (r.partition_key, u64::try_from(r.seq).unwrap()),
            )
        })
        .collect()
}

/// Runs a relay with `cfg` until the outbox is empty, then stops it.
async fn drain(cfg: outbox_relay::RelayConfig, conn: &mut PgConnection) {
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(60), "outbox empty", || {
        Ok(backlog(conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
}

async fn read(bootstrap: &str, topic: &str, min: usize) -> Vec<outbox_tests::check::Seen> {
    outbox_tests::check::read_topic_async(
        bootstrap,
        topic,
        min,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
}

fn summary(r: &Report) -> String {
    format!(
        "read {}, missing {}, unexpected {}, duplicates {}, order violations {:?}",
        r.read,
        r.missing.len(),
        r.unexpected.len(),
        r.duplicates,
        r.order_violations.iter().take(5).collect::<Vec<_>>()
    )
}

/// The broken variant of C1: what the relay did before the gap-less guarantee. It hands every
/// row to an idempotent producer without `enable.gapless.guarantee` (pipelined, as the relay
/// does), then sends what failed again, in id order.
async fn pipelined_resend_without_gapless(conn: &mut PgConnection, bootstrap: &str) {
    // Small requests sent at once, several in flight, as under load.
    let producer = outbox_tests::naive::producer_with(
        bootstrap,
        &[("linger.ms", "0"), ("batch.num.messages", "10")],
    )
    .unwrap();
    let rows: Vec<StoredEvent> = diesel::sql_query(format!(
        "SELECT {} FROM outbox ORDER BY id",
        outbox::contract::EventColumns::all()
    ))
    .load(conn)
    .unwrap();
    let futures: Vec<_> = rows
        .iter()
        .map(|r| {
            producer
                .send_result(
                    FutureRecord::to(&r.topic)
                        .key(r.partition_key.as_bytes())
                        .payload(r.payload.as_slice())
                        .headers(rdkafka::message::OwnedHeaders::new().insert(
                            rdkafka::message::Header {
                                key: "ce_id",
                                value: Some(&r.event_id.to_string()),
                            },
                        )),
                )
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    let mut failed = Vec::new();
    for (row, f) in rows.iter().zip(futures) {
        if !matches!(f.await, Ok(Ok(_))) {
            failed.push(row);
        }
    }
    assert!(!failed.is_empty(), "the injected error failed nothing");
    for row in failed {
        // The failed topic stays marked as failed until the next metadata refresh.
        let mut tries = 0;
        while let Err(e) = outbox_tests::naive::publish(&producer, row).await {
            tries += 1;
            assert!(tries < 60, "resend: {e}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// C1: one produce request fails for good, asynchronously (the mock broker answers it with
/// `err`), while the requests behind it hold later events of the same keys. Every event must
/// arrive once at least, and each key in order.
async fn one_failed_produce_request(err: RDKafkaRespErr, broken: bool) -> Report {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("c1");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    let expected = insert_sequence(&mut conn, &topic, 3, 100);
    // The second produce request fails; small requests (10 messages) keep several in flight
    // behind it, as under load.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR, err],
    );
    if broken {
        pipelined_resend_without_gapless(&mut conn, &bootstrap).await;
    } else {
        drain(
            relay_config(db.url(), &bootstrap)
                .page_size(50)
                .max_pages_in_flight(4)
                .kafka_option("batch.num.messages", "10"),
            &mut conn,
        )
        .await;
        let dead: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
            "(SELECT count(*) FROM outbox_dead_letters)",
        ))
        .get_result(&mut conn)
        .unwrap();
        assert_eq!(dead, 0, "one failed request must not dead-letter anything");
    }
    check(&read(&bootstrap, &topic, expected.len()).await, &expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_produce_request_failing_asynchronously_does_not_let_later_events_of_its_key_overtake()
{
    for err in [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN,
    ] {
        let report = one_failed_produce_request(err, false).await;
        assert!(report.is_consistent(), "{err:?}: {}", summary(&report));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_resending_a_failed_request_without_the_gapless_guarantee_reorders_its_key()
{
    let report = one_failed_produce_request(
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        true,
    )
    .await;
    assert!(report.missing.is_empty(), "{}", summary(&report));
    assert!(
        !report.order_violations.is_empty(),
        "the checker must see the reorder: {}",
        summary(&report)
    );
}

/// The dead-letter retry of the old releases: copies with new, higher ids.
fn retry_with_new_ids(conn: &mut PgConnection, key: &str) {
    diesel::sql_query(
        "WITH moved AS (DELETE FROM outbox_dead_letters WHERE partition_key = $1 RETURNING *) \
         INSERT INTO outbox (event_id, topic, partition_key, event_type, payload, headers, \
           content_type, traceparent, created_at) \
         SELECT event_id, topic, partition_key, event_type, payload, headers, content_type, \
           traceparent, created_at FROM moved ORDER BY id",
    )
    .bind::<Text, _>(key)
    .execute(conn)
    .unwrap();
}

fn insert_one(conn: &mut PgConnection, topic: &str, key: &str, payload: &str) -> String {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        event_id: uuid::Uuid,
    }
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         VALUES ($1, $2, 'Test', convert_to($3, 'UTF8')) RETURNING event_id",
    )
    .bind::<Text, _>(topic)
    .bind::<Text, _>(key)
    .bind::<Text, _>(payload)
    .get_result::<Id>(conn)
    .unwrap()
    .event_id
    .to_string()
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, table: &str) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(&format!(
        "(SELECT count(*) FROM {table})"
    )))
    .get_result(conn)
    .unwrap()
}

/// C2: under `hold-key`, K@0 is poison (too large for the first relay), K@1 and K@2 are held
/// behind it; the relay stops; K@3 is committed; an operator retries the key's dead letters and
/// a relay that can send K@0 starts. K must arrive as 0, 1, 2, 3.
async fn retry_under_hold_key(broken: bool) -> Report {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("c2");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    let mut expected = Expected::new();
    for seq in 0..3_u64 {
        let payload = if seq == 0 {
            "x".repeat(50_000)
        } else {
            seq.to_string()
        };
        let id = insert_one(&mut conn, &topic, "K", &payload);
        expected.insert(id, ("K".to_owned(), seq));
    }
    let hold =
        |cfg: outbox_relay::RelayConfig| cfg.poison_policy(outbox_relay::PoisonPolicy::HoldKey);
    let first = InProcessRelay::start(
        hold(relay_config(db.url(), &bootstrap)).kafka_option("message.max.bytes", "20000"),
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "three dead letters", || {
        Ok(backlog(&mut conn)? == 0 && count(&mut conn, "outbox_dead_letters") == 3)
    })
    .await
    .unwrap();
    first.stop().await.unwrap();
    let id = insert_one(&mut conn, &topic, "K", "3");
    expected.insert(id, ("K".to_owned(), 3));
    if broken {
        retry_with_new_ids(&mut conn, "K");
    } else {
        let filter = outbox_relay::dead_letters::Filter {
            key: Some("K".into()),
            ..Default::default()
        };
        let before: String = diesel::select(diesel::dsl::sql::<Text>("clock_timestamp()::text"))
            .get_result(&mut conn)
            .unwrap();
        let moved = outbox_relay::dead_letters::retry(
            &mut conn,
            &outbox::TableRef::default(),
            &filter,
            false,
        )
        .unwrap();
        assert_eq!(moved.len(), 3);
        // S5: the retried events carry the retry's time (a broker may refuse old timestamps).
        let fresh: i64 = diesel::sql_query(
            "SELECT count(*) AS n FROM outbox WHERE id = ANY($1) AND created_at >= $2::timestamptz",
        )
        .bind::<diesel::sql_types::Array<BigInt>, _>(&moved)
        .bind::<Text, _>(&before)
        .get_result::<N>(&mut conn)
        .unwrap()
        .n;
        assert_eq!(fresh, 3);
    }
    let second = InProcessRelay::start(hold(relay_config(db.url(), &bootstrap))).unwrap();
    wait_until(Duration::from_secs(30), "everything delivered", || {
        Ok(backlog(&mut conn)? == 0 && count(&mut conn, "outbox_dead_letters") == 0)
    })
    .await
    .unwrap();
    second.stop().await.unwrap();
    check(&read(&bootstrap, &topic, 4).await, &expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retry_under_hold_key_keeps_the_keys_commit_order() {
    let report = retry_under_hold_key(false).await;
    assert!(report.is_consistent(), "{}", summary(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_retry_with_new_ids_lets_a_later_event_of_the_key_go_first() {
    let report = retry_under_hold_key(true).await;
    assert!(
        !report.order_violations.is_empty(),
        "the checker must see K@3 before K@0: {}",
        summary(&report)
    );
}

#[derive(QueryableByName, Debug)]
struct DeadRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    last_error: String,
}

/// Rows at the edges of what the table accepts, each written by a plain-SQL writer between
/// good events of the same key: `(event_type, INSERT columns and values)`.
const EDGE_ROWS: &[(&str, &str)] = &[
    (
        "InfiniteTime",
        "created_at, payload) VALUES ($1, 'K', 'InfiniteTime', 'infinity', '\\x00'",
    ),
    (
        "MinusInfiniteTime",
        "created_at, payload) VALUES ($1, 'K', 'MinusInfiniteTime', '-infinity', '\\x00'",
    ),
    (
        "FarFuture",
        "created_at, payload) VALUES ($1, 'K', 'FarFuture', '294000-01-01', '\\x00'",
    ),
    (
        "BeforeEpoch",
        "created_at, payload) VALUES ($1, 'K', 'BeforeEpoch', '1960-01-01', '\\x00'",
    ),
    (
        "HugePayload",
        "payload) VALUES ($1, 'K', 'HugePayload', convert_to(repeat('x', 3000000), 'UTF8')",
    ),
    (
        "HugeKey",
        "payload) VALUES ($1, repeat('k', 2000000), 'HugeKey', '\\x00'",
    ),
];

/// C5: one unreadable or oversized row must not stop the outbox. Every edge row is
/// dead-lettered with an error naming its defect; every good event is delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_at_the_edges_of_what_the_table_accepts_are_dead_lettered_and_nothing_stalls() {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("c5");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    let mut expected = Expected::new();
    let mut seq = 0_u64;
    for (_, insert) in EDGE_ROWS {
        for key in ["K", "other"] {
            let id = insert_one(&mut conn, &topic, key, &seq.to_string());
            expected.insert(id, (key.to_owned(), seq));
        }
        seq += 1;
        diesel::sql_query(format!(
            "INSERT INTO outbox (topic, partition_key, event_type, {insert})"
        ))
        .bind::<Text, _>(&topic)
        .execute(&mut conn)
        .unwrap();
    }
    let id = insert_one(&mut conn, &topic, "K", &seq.to_string());
    expected.insert(id, ("K".to_owned(), seq));
    drain(relay_config(db.url(), &bootstrap), &mut conn).await;
    let dead: Vec<DeadRow> =
        diesel::sql_query("SELECT id, event_type, last_error FROM outbox_dead_letters ORDER BY id")
            .load(&mut conn)
            .unwrap();
    let types: Vec<&str> = dead.iter().map(|d| d.event_type.as_str()).collect();
    let want: Vec<&str> = EDGE_ROWS.iter().map(|(t, _)| *t).collect();
    assert_eq!(types, want, "{dead:?}");
    for d in &dead {
        let named = if d.event_type.ends_with("Time")
            || d.event_type == "FarFuture"
            || d.event_type == "BeforeEpoch"
        {
            "created_at"
        } else {
            "too large"
        };
        assert!(d.last_error.contains(named), "{d:?}");
        assert!(d.id > 0);
    }
    // The stand-in never replaced the stored row: the dead letter holds the real values.
    let huge: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
        "(SELECT octet_length(payload)::bigint FROM outbox_dead_letters WHERE event_type = 'HugePayload')",
    ))
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(huge, 3_000_000);
    let report = check(&read(&bootstrap, &topic, expected.len()).await, &expected);
    assert!(report.is_consistent(), "{}", summary(&report));
}

/// The broken variant of C5: the page fetch of the old releases (every column decoded as
/// stored) fails on the row with `created_at = 'infinity'`, every time: the relay retried the
/// same page forever and nothing behind it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_decoding_every_row_as_stored_fails_on_an_infinite_created_at() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    insert_one(&mut conn, "t", "K", "0");
    diesel::sql_query(format!(
        "INSERT INTO outbox (topic, partition_key, event_type, {})",
        EDGE_ROWS[0].1
    ))
    .bind::<Text, _>("t")
    .execute(&mut conn)
    .unwrap();
    for _ in 0..3 {
        let r: Result<Vec<StoredEvent>, _> = diesel::sql_query(format!(
            "SELECT {} FROM outbox ORDER BY id",
            outbox::contract::EventColumns::all()
        ))
        .load(&mut conn);
        assert!(r.is_err(), "the old fetch must fail on the row");
    }
}

/// A page holds at most its byte budget (and at least one row); the rows past it are marked
/// and fetched by the next page, so none is skipped.
#[test]
fn a_page_stops_at_its_byte_budget_and_the_next_page_starts_at_the_first_row_left_out() {
    use outbox_relay::store;
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    for i in 0..10 {
        diesel::sql_query(
            "INSERT INTO outbox (topic, partition_key, event_type, payload) \
             VALUES ('t', 'K', 'Big', convert_to(repeat('x', 400000), 'UTF8'))",
        )
        .execute(&mut conn)
        .unwrap();
        let _ = i;
    }
    let sql = store::Sql::new(&outbox::TableRef::default()).byte_limits(1_000_000, 1_000_000);
    let lease = store::try_acquire(&mut conn, &sql, "me", 60_000)
        .unwrap()
        .unwrap();
    let batch = store::open_batch(&mut conn, &sql, &lease).unwrap();
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let rows = store::fetch(&mut conn, &sql, &lease, &batch, after, 100).unwrap();
        let page: Vec<_> = rows.iter().take_while(|r| !r.over_budget).collect();
        if page.is_empty() {
            break;
        }
        assert!(page
            .iter()
            .all(|r| r.payload.len() == 400_000 && r.defect.is_none()));
        assert!(rows[page.len()..]
            .iter()
            .all(|r| r.over_budget && r.payload.is_empty()));
        after = page.last().unwrap().id;
        pages.push(page.len());
    }
    assert_eq!(pages, [3, 3, 3, 1], "400 kB rows under a 1 MB budget");
}

#[derive(QueryableByName)]
struct Pending {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    partition_key: String,
}

fn pending(conn: &mut PgConnection) -> Vec<(String, String)> {
    diesel::sql_query("SELECT topic, partition_key FROM outbox ORDER BY id")
        .load::<Pending>(conn)
        .unwrap()
        .into_iter()
        .map(|p| (p.topic, p.partition_key))
        .collect()
}

/// C6: partition 0 of topic A has no leader (offline) while events go to A's three
/// partitions and to topic B. Only the keys on A/0 may wait: everything else is delivered
/// during the outage. When the partition is back, everything arrives, each key in order.
/// Returns the events left in the outbox during the outage (topic, key), whether everything
/// else left within a few `ack_overdue` both times, the reports for A and B after it, and
/// what was read from A.
async fn one_partition_offline(
    ack_overdue: Duration,
) -> (Vec<(String, String)>, bool, Report, Report, Vec<Seen>) {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let (a, b) = (unique_name("c6a"), unique_name("c6b"));
    cluster.create_topic(&a, 3, 1).unwrap();
    cluster.create_topic(&b, 1, 1).unwrap();
    cluster.partition_leader(&a, 0, None).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    // Many distinct keys (one event each per round): every page holds new keys of the offline
    // partition, which must not each hold their page for `ack_overdue`.
    let mut expected_a = insert_sequence(&mut conn, &a, 600, 1);
    let mut expected_b = insert_sequence(&mut conn, &b, 4, 5);
    let on_offline = |conn: &mut PgConnection| {
        pending(conn)
            .iter()
            .filter(|(t, k)| t == &a && outbox_relay::producer::partition_for(k.as_bytes(), 3) == 0)
            .count()
    };
    let relay = InProcessRelay::start(
        relay_config(db.url(), &bootstrap)
            .page_size(20)
            .ack_overdue(ack_overdue),
    )
    .unwrap();
    // Everything not on A/0 leaves within a few `ack_overdue` (one set-aside, not one per page).
    let bound = ack_overdue.min(Duration::from_secs(2)) * 4 + Duration::from_secs(2);
    let first = wait_until(bound, "all but A/0 delivered", || {
        Ok(usize::try_from(backlog(&mut conn)?)? == on_offline(&mut conn))
    })
    .await;
    // More events while the partition is still offline: the other keys keep flowing.
    expected_a.extend(insert_sequence_from(&mut conn, &a, 600, 1, 1));
    expected_b.extend(insert_sequence_from(&mut conn, &b, 4, 5, 5));
    let second = wait_until(bound, "all but A/0 delivered again", || {
        Ok(usize::try_from(backlog(&mut conn)?)? == on_offline(&mut conn))
    })
    .await;
    let left = pending(&mut conn);
    let in_time = first.is_ok() && second.is_ok();
    cluster.partition_leader(&a, 0, Some(1)).unwrap();
    wait_until(Duration::from_secs(60), "outbox empty", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let seen_a = read(&bootstrap, &a, expected_a.len()).await;
    let seen_b = read(&bootstrap, &b, expected_b.len()).await;
    (
        left,
        in_time,
        check(&seen_a, &expected_a),
        check(&seen_b, &expected_b),
        seen_a,
    )
}

/// Like [`insert_sequence`], sequence numbers starting at `from`.
fn insert_sequence_from(
    conn: &mut PgConnection,
    topic: &str,
    keys: i64,
    per_key: i64,
    from: u64,
) -> Expected {
    insert_sequence(conn, topic, keys, per_key)
        .into_iter()
        .map(|(id, (k, seq))| (id, (k, seq + from)))
        .collect()
}

/// The keys of `topic` that landed on `partition`.
fn keys_on(seen: &[Seen], partition: i32) -> std::collections::HashSet<String> {
    seen.iter()
        .filter(|s| s.partition == partition)
        .map(|s| s.key.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partition_offline_holds_up_only_its_own_keys() {
    let (left, in_time, report_a, report_b, seen_a) =
        one_partition_offline(Duration::from_secs(2)).await;
    assert!(
        in_time,
        "the other keys must not wait a page at a time: {left:?}"
    );
    assert!(report_a.is_consistent(), "A: {}", summary(&report_a));
    assert!(report_b.is_consistent(), "B: {}", summary(&report_b));
    let offline = keys_on(&seen_a, 0);
    assert!(!offline.is_empty() && !left.is_empty());
    assert!(
        left.iter()
            .all(|(t, k)| t.starts_with("c6a") && offline.contains(k)),
        "only A/0's keys may wait: {left:?}"
    );
    // Every event of every key on A/0 waited (2 each), nothing else did; the partition the
    // relay computes for a key is the one the producer chose.
    assert_eq!(left.len(), offline.len() * 2, "{left:?}");
    assert!(offline
        .iter()
        .all(|k| outbox_relay::producer::partition_for(k.as_bytes(), 3) == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_waiting_in_line_for_every_acknowledgement_stalls_every_topic() {
    let (left, _, report_a, report_b, seen_a) =
        one_partition_offline(Duration::from_secs(3600)).await;
    assert!(report_a.is_consistent(), "A: {}", summary(&report_a));
    assert!(report_b.is_consistent(), "B: {}", summary(&report_b));
    let offline = keys_on(&seen_a, 0);
    assert!(
        left.iter()
            .any(|(t, k)| t.starts_with("c6b") || !offline.contains(k)),
        "the checker must see other keys wait too: {left:?}"
    );
}

/// S1: a snapshot held in memory is meaningful only on the server it came from. After a
/// failover that the relay's connection did not see (a transparent pooler), the promoted
/// standby may reuse transaction ids below the old snapshot's xmax: advancing or saving from
/// that snapshot would skip new rows. Those statements run only on the same server (system
/// identifier and timeline); elsewhere they end the term and write nothing.
#[test]
fn a_position_from_another_server_is_neither_advanced_nor_saved() {
    use outbox_relay::store;
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let sql = store::Sql::new(&outbox::TableRef::default());
    let lease = store::try_acquire(&mut conn, &sql, "me", 60_000)
        .unwrap()
        .unwrap();
    let batch = store::open_batch(&mut conn, &sql, &lease).unwrap();
    let (system, timeline) = batch.server.split_once('/').unwrap();
    assert!(
        system.parse::<u64>().is_ok() && timeline.len() == 8,
        "{}",
        batch.server
    );
    // Same server: advances.
    let next = store::advance_batch(&mut conn, &sql, &lease, &batch, true).unwrap();
    assert_eq!(next.server, batch.server);
    // The same snapshot as if it came from a promoted standby (next timeline).
    let elsewhere = store::Batch {
        server: format!(
            "{system}/{:08X}",
            u32::from_str_radix(timeline, 16).unwrap() + 1
        ),
        ..next.clone()
    };
    let state = |c: &mut PgConnection| -> String {
        diesel::select(diesel::dsl::sql::<Text>(
            "(SELECT coalesce(prev_snapshot::text, '') || '|' || coalesce(cur_snapshot::text, '') \
             FROM outbox_relay_state)",
        ))
        .get_result(c)
        .unwrap()
    };
    let before = state(&mut conn);
    for save in [true, false] {
        let e = store::advance_batch(&mut conn, &sql, &lease, &elsewhere, save).unwrap_err();
        assert!(matches!(e, outbox_relay::Error::LostLeadership(_)), "{e}");
    }
    for done in [true, false] {
        let e = store::save_batch(&mut conn, &sql, &lease, &elsewhere, done).unwrap_err();
        assert!(matches!(e, outbox_relay::Error::LostLeadership(_)), "{e}");
    }
    assert_eq!(
        state(&mut conn),
        before,
        "nothing written from the other server's snapshot"
    );
    // Removal by id runs only on the server the lease was taken on: a lagging standby's
    // identity may give the acknowledged ids to new events.
    insert_one(&mut conn, "t", "K", "0");
    let ids: Vec<i64> = vec![1];
    let foreign = store::Lease {
        server: elsewhere.server.clone(),
        ..lease.clone()
    };
    let e = store::delete(&mut conn, &sql, &foreign, &ids).unwrap_err();
    assert!(matches!(e, outbox_relay::Error::LostLeadership(_)), "{e}");
    let dead = [store::DeadLetter {
        id: 1,
        error: "x".into(),
        attempts: 1,
        event: None,
    }];
    let e = store::dead_letter(&mut conn, &sql, &foreign, &dead).unwrap_err();
    assert!(matches!(e, outbox_relay::Error::LostLeadership(_)), "{e}");
    assert_eq!(backlog(&mut conn).unwrap(), 1, "nothing removed");
    assert_eq!(store::delete(&mut conn, &sql, &lease, &ids).unwrap(), 1);
}

/// S3: topic A answers "not authorised" for a few seconds (an ACL or a topic being created).
/// Its events wait with a backoff that outlasts the delay (1 s, doubling, up to 60 s, five
/// attempts: about 15 s) instead of being dead-lettered within a second, and topic B is
/// delivered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_authorisation_failure_is_waited_out_and_other_topics_flow() {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let (a, b) = (unique_name("s3a"), unique_name("s3b"));
    cluster.create_topic(&a, 1, 1).unwrap();
    cluster.create_topic(&b, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    let expected_a = insert_sequence(&mut conn, &a, 3, 10);
    let expected_b = insert_sequence(&mut conn, &b, 3, 10);
    // Every produce request fails for a while: A's first, then (after the topic's failure
    // marks it) A's produce calls fail at once too.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
    );
    cluster
        .topic_error(
            &a,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let relay = InProcessRelay::start(relay_config(db.url(), &bootstrap)).unwrap();
    let b_done = wait_until(Duration::from_secs(20), "B delivered while A waits", || {
        Ok(pending(&mut conn).iter().all(|(t, _)| t == &a))
    })
    .await;
    let a_left = pending(&mut conn).len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster
        .topic_error(&a, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    wait_until(Duration::from_secs(60), "outbox empty", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    b_done.unwrap();
    assert!(a_left > 0, "A waited");
    assert_eq!(
        count(&mut conn, "outbox_dead_letters"),
        0,
        "nothing dead-lettered"
    );
    let ra = check(&read(&bootstrap, &a, expected_a.len()).await, &expected_a);
    let rb = check(&read(&bootstrap, &b, expected_b.len()).await, &expected_b);
    assert!(ra.is_consistent(), "A: {}", summary(&ra));
    assert!(rb.is_consistent(), "B: {}", summary(&rb));
}

/// S2: the broker refuses one produce request as too large (a batch over a topic's
/// `max.message.bytes`, while every event in it is small). librdkafka does not split the
/// batch, so every event in the request fails with "too large": each is sent again alone,
/// delivered, and nothing is dead-lettered. An event refused alone is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_as_too_large_dead_letters_no_valid_event() {
    // One refused request: its events go again alone and arrive. Two: the first event sent
    // alone is refused too, and only it is dead-lettered.
    for (refusals, dead) in [(1, 0), (2, 1)] {
        let db = TestDb::migrated().unwrap();
        let cluster = outbox_tests::mock_cluster(1).unwrap();
        let topic = unique_name("s2");
        cluster.create_topic(&topic, 1, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let mut conn = db.conn().unwrap();
        let mut expected = insert_sequence(&mut conn, &topic, 3, 40);
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; refusals],
        );
        drain(
            relay_config(db.url(), &bootstrap).kafka_option("batch.num.messages", "10"),
            &mut conn,
        )
        .await;
        let dead_rows: Vec<DeadRow> =
            diesel::sql_query("SELECT id, event_type, last_error FROM outbox_dead_letters")
                .load(&mut conn)
                .unwrap();
        assert_eq!(dead_rows.len(), dead, "{refusals} refusals: {dead_rows:?}");
        #[derive(QueryableByName)]
        struct Ev {
            #[diesel(sql_type = diesel::sql_types::Uuid)]
            event_id: uuid::Uuid,
        }
        for ev in diesel::sql_query("SELECT event_id FROM outbox_dead_letters")
            .load::<Ev>(&mut conn)
            .unwrap()
        {
            expected.remove(&ev.event_id.to_string());
        }
        let report = check(&read(&bootstrap, &topic, expected.len()).await, &expected);
        assert!(
            report.is_consistent(),
            "{refusals} refusals: {}",
            summary(&report)
        );
    }
}

/// S9: after a restore that reset the outbox identity, a new poison event takes an id a dead
/// letter already has. Both dead letters must be kept (keyed by id and event id); keyed by id
/// alone, the older one was overwritten and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_under_a_reused_id_keeps_the_older_one() {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("s9");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    // The older dead letter, id 1, from before the restore.
    diesel::sql_query(
        "INSERT INTO outbox_dead_letters (id, event_id, topic, partition_key, event_type, payload, \
         headers, content_type, tx_id, created_at, attempts, last_error) \
         VALUES (1, gen_random_uuid(), $1, 'old', 'Old', '\\x00', '{}', 'text/plain', \
         pg_current_xact_id(), now(), 5, 'unknown topic')",
    )
    .bind::<Text, _>(&topic)
    .execute(&mut conn)
    .unwrap();
    // After the restore the identity hands out 1 again: a poison event (too large) gets it.
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         VALUES ($1, 'new', 'TooBig', convert_to(repeat('x', 50000), 'UTF8'))",
    )
    .bind::<Text, _>(&topic)
    .execute(&mut conn)
    .unwrap();
    drain(
        relay_config(db.url(), &bootstrap).kafka_option("message.max.bytes", "20000"),
        &mut conn,
    )
    .await;
    let dead: Vec<DeadRow> = diesel::sql_query(
        "SELECT id, event_type, last_error FROM outbox_dead_letters ORDER BY event_type",
    )
    .load(&mut conn)
    .unwrap();
    let types: Vec<&str> = dead.iter().map(|d| d.event_type.as_str()).collect();
    assert_eq!(types, ["Old", "TooBig"], "{dead:?}");
    assert!(dead.iter().all(|d| d.id == 1));
}

/// S6: the leader cannot reach any broker (here: it was given an address where none listens),
/// while a standby can. Its events go overdue and nothing is acknowledged; once no broker
/// answers its metadata request either, it gives up the lease, the standby takes over and
/// delivers everything, in order. Returns whether everything was delivered within the wait,
/// and the report.
async fn leader_cut_off_from_the_brokers(ack_overdue: Duration) -> (bool, Report) {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("s6");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    let expected = insert_sequence(&mut conn, &topic, 5, 20);
    let nowhere = format!("127.0.0.1:{}", outbox_tests::free_port());
    let cut_off = InProcessRelay::start(
        relay_config(db.url(), &nowhere)
            .instance_id("cut-off")
            .ack_overdue(ack_overdue),
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "the cut-off relay leads", || {
        Ok(outbox_tests::relay::leader(&mut conn)?.is_some_and(|(id, _)| id == "cut-off"))
    })
    .await
    .unwrap();
    let standby = InProcessRelay::start(
        relay_config(db.url(), &bootstrap)
            .instance_id("connected")
            .ack_overdue(ack_overdue),
    )
    .unwrap();
    let delivered = wait_until(Duration::from_secs(30), "delivered by the standby", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .is_ok();
    cut_off.stop().await.unwrap();
    standby.stop().await.unwrap();
    if !delivered {
        return (false, Report::default());
    }
    (
        true,
        check(&read(&bootstrap, &topic, expected.len()).await, &expected),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_every_broker_steps_down_for_a_standby_that_reaches_them() {
    let (delivered, report) = leader_cut_off_from_the_brokers(Duration::from_millis(500)).await;
    assert!(delivered, "the standby must take over and deliver");
    assert!(report.is_consistent(), "{}", summary(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_leader_that_keeps_its_lease_while_cut_off_delivers_nothing() {
    // Never overdue, so never stepping down: the lease stays with the relay that cannot send.
    let (delivered, _) = leader_cut_off_from_the_brokers(Duration::from_secs(3600)).await;
    assert!(!delivered, "the checker must see nothing delivered");
}
