//! Retention and replay against real Postgres and a real Kafka-protocol broker: delivered events
//! kept in `outbox_delivered` (moved, never left in the hot table), purged by age in batches;
//! `outbox-relay replay` re-publishing exactly a range, in order, with the original event ids;
//! the least-privilege role in keep mode.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz};
use outbox_relay::retention;
use outbox_tests::check::{read_topic, Seen};
use outbox_tests::relay::{backlog, wait_until};
use outbox_tests::{
    create_topic, relay_config, unique_name, InProcessRelay, RelayProcess, Tansu, TestDb,
};

const BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");

fn cli(args: &[&str], url: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("KAFKA_BROKERS")
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

fn kept(conn: &mut PgConnection) -> i64 {
    count(conn, "SELECT count(*) AS n FROM outbox_delivered")
}

/// `(id, event_id)` of kept rows, in id order.
fn kept_rows(conn: &mut PgConnection) -> Vec<(i64, String)> {
    #[derive(QueryableByName)]
    struct R {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        event_id: String,
    }
    diesel::sql_query("SELECT id, event_id::text AS event_id FROM outbox_delivered ORDER BY id")
        .load::<R>(conn)
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.event_id))
        .collect()
}

fn db_now(conn: &mut PgConnection) -> DateTime<Utc> {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = Timestamptz)]
        t: DateTime<Utc>,
    }
    diesel::sql_query("SELECT clock_timestamp() AS t")
        .get_result::<T>(conn)
        .unwrap()
        .t
}

/// Enqueues `n` events on keys `k0..k3` in one transaction; returns their event ids in id order.
fn enqueue(conn: &mut PgConnection, topic: &str, first: usize, n: usize) -> Vec<String> {
    let events: Vec<outbox::Event> = (first..first + n)
        .map(|i| outbox::Event::json(topic, format!("k{}", i % 4), "T", &i).unwrap())
        .collect();
    conn.transaction(|c| outbox::Outbox::new().enqueue_batch(c, &events))
        .unwrap();
    events.iter().map(|e| e.event_id().to_string()).collect()
}

/// The topic's log per partition, as event ids in offset order.
fn log_by_partition(seen: &[Seen]) -> BTreeMap<i32, Vec<String>> {
    let mut sorted: Vec<&Seen> = seen.iter().collect();
    sorted.sort_by_key(|s| (s.partition, s.offset));
    let mut out: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for s in sorted {
        out.entry(s.partition).or_default().push(s.event_id.clone());
    }
    out
}

/// Checks that each partition's log is `before` (the log before the replay) followed by the
/// replayed events, which are exactly `replayed`, in the order their originals appear in
/// `before`.
fn assert_replayed_in_order(
    before: &BTreeMap<i32, Vec<String>>,
    after: &BTreeMap<i32, Vec<String>>,
    replayed: &HashSet<String>,
) {
    let mut seen_again = HashSet::new();
    for (p, log) in after {
        let old = before.get(p).cloned().unwrap_or_default();
        assert!(log.starts_with(&old), "partition {p}: the old log changed");
        let expected: Vec<&String> = old.iter().filter(|id| replayed.contains(*id)).collect();
        // An event replayed before may appear twice in `old`; it is re-sent once.
        let mut dedup = HashSet::new();
        let expected: Vec<&String> = expected
            .into_iter()
            .filter(|id| dedup.insert(*id))
            .collect();
        let new: Vec<&String> = log[old.len()..].iter().collect();
        assert_eq!(
            new, expected,
            "partition {p}: replayed events, in original order"
        );
        seen_again.extend(new.into_iter().cloned());
    }
    assert_eq!(&seen_again, replayed, "exactly the replayed range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_mode_moves_delivered_rows_and_delete_mode_keeps_nothing() {
    let broker = Tansu::start().unwrap();
    for keep in [true, false] {
        let db = TestDb::migrated().unwrap();
        let mut conn = db.conn().unwrap();
        let topic = unique_name("keep");
        create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
        let ids = enqueue(&mut conn, &topic, 0, 200);
        let mut cfg = relay_config(db.url(), &broker.bootstrap()).page_size(50);
        if keep {
            cfg = cfg.keep_delivered_hours(24);
        }
        let relay = InProcessRelay::start(cfg).unwrap();
        wait_until(Duration::from_secs(30), "delivery", || {
            Ok(backlog(&mut conn)? == 0)
        })
        .await
        .unwrap();
        relay.stop().await.unwrap();
        let seen = read_topic(
            &broker.bootstrap(),
            &topic,
            200,
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(seen.len(), 200);
        assert_eq!(backlog(&mut conn).unwrap(), 0, "nothing stays in outbox");
        if keep {
            let rows = kept_rows(&mut conn);
            let kept_ids: Vec<String> = rows.into_iter().map(|(_, e)| e).collect();
            assert_eq!(kept_ids, ids, "every delivered event is kept, ids and all");
            assert_eq!(
                count(
                    &mut conn,
                    "SELECT count(*) AS n FROM outbox_delivered \
                     WHERE delivered_at < created_at OR delivered_at > now()"
                ),
                0
            );
        } else {
            assert_eq!(kept(&mut conn), 0, "delete mode keeps nothing");
        }
    }
}

/// What a correct purge of `outbox_delivered` with a 2 h age leaves: every fresh row, no old one.
fn purge_left_only_fresh_rows(conn: &mut PgConnection, fresh: i64) -> Result<(), String> {
    let old = count(
        conn,
        "SELECT count(*) AS n FROM outbox_delivered WHERE delivered_at < now() - interval '2 hours'",
    );
    let left = kept(conn);
    if old != 0 {
        return Err(format!("{old} expired rows left"));
    }
    if left != fresh {
        return Err(format!("{left} rows left, expected the {fresh} fresh ones"));
    }
    Ok(())
}

fn fill_kept(conn: &mut PgConnection, old: i64, fresh: i64) {
    conn.batch_execute(&format!(
        "TRUNCATE outbox_delivered; \
         INSERT INTO outbox_delivered (id, event_id, topic, partition_key, event_type, payload, \
           headers, content_type, tx_id, created_at, delivered_at) \
         SELECT g, gen_random_uuid(), 't', 'k', 'T', '\\x00'::bytea, '{{}}', 'application/json', \
           pg_current_xact_id(), now(), now() - CASE WHEN g <= {old} THEN interval '3 hours' \
           ELSE interval '1 hour' END \
         FROM generate_series(1, {}) g",
        old + fresh
    ))
    .unwrap();
}

#[test]
fn the_purge_removes_only_expired_rows_in_batches_and_catches_a_purge_without_the_age_filter() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let tables = outbox::TableRef::default();
    fill_kept(&mut conn, 2500, 700);
    let purged =
        retention::purge_delivered(&mut conn, &tables, Duration::from_secs(7200), 1000).unwrap();
    assert_eq!(purged.rows, 2500);
    assert_eq!(purged.batches, 3, "1000 + 1000 + 500 rows");
    purge_left_only_fresh_rows(&mut conn, 700).unwrap();

    // Broken variant: the same batches without the age filter. The same check must fail.
    fill_kept(&mut conn, 2500, 700);
    let broken = "DELETE FROM outbox_delivered WHERE $1::float8 >= 0 AND id = ANY(ARRAY(\
                  SELECT id FROM outbox_delivered ORDER BY delivered_at LIMIT $2))";
    retention::run_batches(&mut conn, broken, Duration::from_secs(7200), 1000).unwrap();
    let err = purge_left_only_fresh_rows(&mut conn, 700).unwrap_err();
    assert!(err.contains("0 rows left"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_purges_expired_delivered_events_and_dead_letters() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let mut conn = db.conn().unwrap();
    let topic = unique_name("purge");
    create_topic(&broker.bootstrap(), &topic, 2).await.unwrap();
    let ids = enqueue(&mut conn, &topic, 0, 40);
    let cfg = relay_config(db.url(), &broker.bootstrap())
        .keep_delivered_hours(2)
        .dead_letters_keep_days(1)
        .purge_interval(Duration::from_secs(1));
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(30), "delivery", || {
        Ok(backlog(&mut conn)? == 0 && kept(&mut conn) == 40)
    })
    .await
    .unwrap();
    // Half of them delivered "3 hours ago"; two dead letters, one 2 days old.
    conn.batch_execute(
        "UPDATE outbox_delivered SET delivered_at = now() - interval '3 hours' \
         WHERE id IN (SELECT id FROM outbox_delivered ORDER BY id LIMIT 20); \
         INSERT INTO outbox_dead_letters (id, event_id, topic, partition_key, event_type, \
           payload, headers, content_type, tx_id, created_at, attempts, last_error, \
           dead_lettered_at) VALUES \
         (-1, gen_random_uuid(), 't', 'k', 'T', '\\x00', '{}', 'x', pg_current_xact_id(), now(), \
          1, 'old', now() - interval '2 days'), \
         (-2, gen_random_uuid(), 't', 'k', 'T', '\\x00', '{}', 'x', pg_current_xact_id(), now(), \
          1, 'recent', now() - interval '2 hours')",
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "the leader's purge", || {
        Ok(kept(&mut conn) == 20
            && count(&mut conn, "SELECT count(*) AS n FROM outbox_dead_letters") == 1)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let left: Vec<String> = kept_rows(&mut conn).into_iter().map(|(_, e)| e).collect();
    assert_eq!(left, ids[20..], "only the expired rows went");
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_dead_letters WHERE last_error = 'recent'"
        ),
        1
    );
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_time_range_and_by_id_range_re_sends_exactly_those_events_in_order() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let bootstrap = broker.bootstrap();
    let mut conn = db.conn().unwrap();
    let topic = unique_name("replay");
    create_topic(&bootstrap, &topic, 3).await.unwrap();
    let cfg = relay_config(db.url(), &bootstrap)
        .keep_delivered_hours(24)
        .page_size(7);
    let relay = InProcessRelay::start(cfg).unwrap();
    let read = |n: usize| {
        read_topic(
            &bootstrap,
            &topic,
            n,
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .unwrap()
    };

    // Group A, then B, delivered at different times.
    let a = enqueue(&mut conn, &topic, 0, 30);
    wait_until(Duration::from_secs(30), "A kept", || {
        Ok(kept(&mut conn) == 30)
    })
    .await
    .unwrap();
    let t1 = db_now(&mut conn);
    let b = enqueue(&mut conn, &topic, 30, 12);
    wait_until(Duration::from_secs(30), "B kept", || {
        Ok(kept(&mut conn) == 42)
    })
    .await
    .unwrap();
    let t2 = db_now(&mut conn);
    let before = log_by_partition(&read(42));
    assert_eq!(before.values().map(Vec::len).sum::<usize>(), 42);

    // By time: exactly B.
    let out = cli(
        &["replay", "--since", &at(t1), "--until", &at(t2), "--yes"],
        db.url(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("12 events queued") && text(&out).contains("replayed"),
        "the action is printed and logged: {}",
        text(&out)
    );
    wait_until(Duration::from_secs(30), "B re-sent", || {
        Ok(backlog(&mut conn)? == 0 && kept(&mut conn) == 54)
    })
    .await
    .unwrap();
    let after_time = log_by_partition(&read(54));
    assert_replayed_in_order(&before, &after_time, &b.iter().cloned().collect());

    // By id: A[5..=14] (their original ids).
    let rows = kept_rows(&mut conn);
    let (from, to) = (rows[5].0, rows[14].0);
    assert_eq!(rows[5].1, a[5]);
    let out = cli(
        &[
            "replay",
            "--from-id",
            &from.to_string(),
            "--to-id",
            &to.to_string(),
            "--yes",
        ],
        db.url(),
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_until(Duration::from_secs(30), "A[5..15] re-sent", || {
        Ok(backlog(&mut conn)? == 0 && kept(&mut conn) == 64)
    })
    .await
    .unwrap();
    let after_id = log_by_partition(&read(64));
    assert_eq!(after_id.values().map(Vec::len).sum::<usize>(), 64);
    assert_replayed_in_order(&after_time, &after_id, &a[5..15].iter().cloned().collect());
    relay.stop().await.unwrap();
}

#[test]
fn replay_dry_run_changes_nothing_and_unconfirmed_or_unkept_replays_are_refused() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let url = db.url();

    // Nothing kept: the message says why.
    let out = cli(&["replay", "--all", "--yes"], url);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("keep_delivered_hours") && text(&out).contains("empty"),
        "{}",
        text(&out)
    );

    conn.batch_execute(
        "INSERT INTO outbox_delivered (id, event_id, topic, partition_key, event_type, payload, \
           headers, content_type, tx_id, created_at) \
         SELECT g, gen_random_uuid(), CASE WHEN g % 2 = 0 THEN 'even' ELSE 'odd' END, 'k', 'T', \
           '\\x00'::bytea, '{}', 'application/json', pg_current_xact_id(), now() \
         FROM generate_series(1, 10) g",
    )
    .unwrap();
    let out = cli(&["replay"], url);
    assert!(
        !out.status.success() && text(&out).contains("no range given"),
        "{}",
        text(&out)
    );
    let out = cli(&["replay", "--since", "yesterday"], url);
    assert!(
        !out.status.success() && text(&out).contains("RFC 3339"),
        "{}",
        text(&out)
    );
    let out = cli(
        &["replay", "--from-id", "3", "--to-id", "7", "--dry-run"],
        url,
    );
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("dry run: 5 events would be re-published")
            && s.lines().any(|l| l.starts_with("even") && l.contains('2'))
            && s.lines().any(|l| l.starts_with("odd") && l.contains('3')),
        "{s}"
    );
    assert_eq!(backlog(&mut conn).unwrap(), 0, "dry run changes nothing");
    // No terminal, no --yes: refused.
    let out = cli(&["replay", "--from-id", "3", "--to-id", "7"], url);
    assert!(
        !out.status.success() && text(&out).contains("not confirmed"),
        "{}",
        text(&out)
    );
    assert_eq!(backlog(&mut conn).unwrap(), 0);
    let out = cli(&["replay", "--from-id", "3", "--to-id", "7", "--yes"], url);
    assert!(out.status.success(), "{}", text(&out));
    let pending = outbox::Outbox::new().pending(&mut conn, 100).unwrap();
    let got: Vec<String> = pending.iter().map(|p| p.event_id.to_string()).collect();
    let want: Vec<String> = kept_rows(&mut conn)[2..7]
        .iter()
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(got, want, "original event ids, original order");
    // Still pending: not queued twice.
    let out = cli(&["replay", "--from-id", "3", "--to-id", "7", "--yes"], url);
    assert!(
        text(&out).contains("0 events queued") && text(&out).contains("5 still pending"),
        "{}",
        text(&out)
    );
    let out = cli(&["replay", "--from-id", "100", "--yes"], url);
    assert!(
        !out.status.success() && text(&out).contains("no kept event matches"),
        "{}",
        text(&out)
    );
}

/// A login role for one test, a member of `outbox_relay`; dropped afterwards.
struct LoginRole(String);

impl Drop for LoginRole {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&outbox_tests::pg::admin_url()) {
            let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {}", self.0));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_role_runs_keep_mode_and_a_missing_grant_is_named() {
    let db = TestDb::migrated().unwrap();
    let mut admin = db.conn().unwrap();
    let sql = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ops/relay-role.sql"),
    )
    .unwrap();
    admin.batch_execute(&sql).unwrap();
    let role = LoginRole(unique_name("relay").replace('-', "_"));
    admin
        .batch_execute(&format!(
            "CREATE ROLE {} LOGIN IN ROLE outbox_relay",
            role.0
        ))
        .unwrap();
    let url = db.url().replacen(
        "postgres://postgres@",
        &format!("postgres://{}@", role.0),
        1,
    );
    assert_ne!(url, db.url());
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("least-privilege-keep");
    cluster.create_topic(&topic, 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    enqueue(&mut admin, &topic, 0, 20);
    let keep = ["--keep-delivered-hours", "1"];
    let mut relay = RelayProcess::spawn(BIN, &url, &bootstrap, &keep).unwrap();
    wait_until(
        Duration::from_secs(60),
        "keep mode as the relay role",
        || Ok(backlog(&mut admin)? == 0 && kept(&mut admin) == 20),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert!(relay.terminate(Duration::from_secs(20)).unwrap());
    // The operator role replays (SELECT on outbox_delivered, INSERT on outbox).
    admin
        .batch_execute(&format!("GRANT outbox_relay_operator TO {}", role.0))
        .unwrap();
    let out = cli(&["replay", "--all", "--dry-run"], &url);
    assert!(
        text(&out).contains("20 events would be re-published"),
        "{}",
        text(&out)
    );

    // Without INSERT on outbox_delivered, keep mode stops at start-up and names it; the purge
    // of dead letters needs DELETE, which relay-role.sql leaves to a deliberate grant.
    admin
        .batch_execute(&format!(
            "REVOKE outbox_relay_operator FROM {}; \
             REVOKE INSERT ON outbox_delivered FROM outbox_relay",
            role.0
        ))
        .unwrap();
    let mut relay = RelayProcess::spawn(
        BIN,
        &url,
        &bootstrap,
        &[
            "--keep-delivered-hours",
            "1",
            "--dead-letters-keep-days",
            "30",
        ],
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "the relay exits", || {
        Ok(!relay.is_running())
    })
    .await
    .unwrap();
    let log = relay.log();
    assert!(
        log.contains(&format!(
            "\"{}\" lacks INSERT on outbox_delivered, DELETE on outbox_dead_letters",
            role.0
        )),
        "{log}"
    );
}

#[test]
fn a_fenced_out_leader_cannot_move_rows_and_the_move_returns_the_delete_counts() {
    use outbox_relay::store::{self, Sql};
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    enqueue(&mut conn, "t", 0, 3);
    let sql = Sql::new(&outbox::TableRef::default()).keep_delivered(true);
    let old = store::try_acquire(&mut conn, &sql, "old", 60_000)
        .unwrap()
        .unwrap();
    let batch = store::open_batch(&mut conn, &sql, &old).unwrap();
    let ids: Vec<i64> = store::fetch(&mut conn, &sql, &old, &batch, 0, 10)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(store::delete(&mut conn, &sql, &old, &ids[..1]).unwrap(), 1);
    assert_eq!((backlog(&mut conn).unwrap(), kept(&mut conn)), (2, 1));
    diesel::sql_query(
        "UPDATE outbox_relay_state SET lease_expires_at = clock_timestamp() - interval '1 second'",
    )
    .execute(&mut conn)
    .unwrap();
    let new = store::try_acquire(&mut conn, &sql, "new", 60_000)
        .unwrap()
        .unwrap();
    assert!(matches!(
        store::delete(&mut conn, &sql, &old, &ids),
        Err(outbox_relay::Error::LostLeadership(_))
    ));
    assert_eq!(
        (backlog(&mut conn).unwrap(), kept(&mut conn)),
        (2, 1),
        "the fenced-out leader neither removed nor kept anything"
    );
    // Already-moved ids count as nothing, like the delete.
    assert_eq!(store::delete(&mut conn, &sql, &new, &ids).unwrap(), 2);
    assert_eq!((backlog(&mut conn).unwrap(), kept(&mut conn)), (0, 3));
}
