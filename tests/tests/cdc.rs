//! Change capture of existing tables (docs/CDC.md) against real Postgres (wal_level = logical)
//! and tansu: a consumer that rebuilds the table from its change events must end equal to the
//! source table, row by row, across concurrent writers and kill -9 of the relay; the types of
//! the envelope; TOAST values an UPDATE left unchanged; a column added mid-stream; a table
//! without a key. Each guarantee has a broken variant the same checker catches.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use outbox_relay::{CaptureMode, RelayConfig};
use outbox_tests::check::{read_topic, Seen};
use outbox_tests::relay::{leader, wait_until};
use outbox_tests::{
    create_topic, relay_config, unique_name, InProcessRelay, RelayProcess, Tansu, TestDb,
};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");

const STOCK: &str = "CREATE TABLE stock (sku text PRIMARY KEY, qty integer NOT NULL, note text)";

/// A migrated database streaming the outbox, with `ddl` applied and `tables` in the table
/// publication (what `outbox-relay migrate --capture streaming --capture-tables ...` does).
fn cdc_db(ddl: &str, tables: &str) -> TestDb {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    conn.batch_execute(ddl).unwrap();
    let cfg = RelayConfig::default();
    let captured = outbox_relay::cdc::parse_tables(tables).unwrap();
    outbox_relay::store::stream::ensure_table_publication(
        &mut conn,
        &captured,
        &cfg.capture_publication_name(),
    )
    .unwrap();
    outbox_relay::store::stream::ensure_streaming(
        &mut conn,
        &outbox::TableRef::default(),
        db.name(),
        &cfg.publication_name(),
    )
    .unwrap();
    db
}

fn cdc_config(db: &TestDb, bootstrap: &str, tables: &str, topic: &str) -> RelayConfig {
    relay_config(db.url(), bootstrap)
        .capture(CaptureMode::Streaming)
        .slot(db.name())
        .capture_tables(tables)
        .capture_topic(topic)
}

async fn read_all(bootstrap: &str, topic: &str, min: usize) -> Vec<Seen> {
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        read_topic(
            &b,
            &t,
            min,
            Duration::from_secs(3),
            Duration::from_secs(120),
        )
    })
    .await
    .unwrap()
    .unwrap()
}

#[derive(QueryableByName, Debug, Clone, PartialEq, Eq)]
struct StockRow {
    #[diesel(sql_type = Text)]
    sku: String,
    #[diesel(sql_type = Integer)]
    qty: i32,
    #[diesel(sql_type = Nullable<Text>)]
    note: Option<String>,
}

fn source_rows(conn: &mut PgConnection) -> BTreeMap<String, StockRow> {
    diesel::sql_query("SELECT sku, qty, note FROM stock")
        .load::<StockRow>(conn)
        .unwrap()
        .into_iter()
        .map(|r| (r.sku.clone(), r))
        .collect()
}

/// How the rebuilding consumer treats the envelope.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rebuild {
    /// As docs/CDC.md says: per key, skip what is not newer than what was applied (by
    /// `(commit_lsn, seq)`); a column listed in `unavailable` keeps its value.
    AsDocumented,
    /// Broken: an unavailable column is taken as NULL.
    UnavailableAsNull,
}

fn lsn(v: &Value) -> u64 {
    let s = v.as_str().unwrap();
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The table as a consumer of its change events rebuilds it (partition order; one partition
/// per key), and how many events it skipped as already applied.
fn rebuild(seen: &[Seen], how: Rebuild) -> (BTreeMap<String, StockRow>, usize) {
    let mut ordered: Vec<&Seen> = seen.iter().collect();
    ordered.sort_by_key(|m| (m.partition, m.offset));
    let mut rows: BTreeMap<String, StockRow> = BTreeMap::new();
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    let mut skipped = 0;
    for m in ordered {
        let e: Value = serde_json::from_str(&m.payload).unwrap();
        let at = (
            lsn(&e["source"]["commit_lsn"]),
            e["source"]["seq"].as_u64().unwrap(),
        );
        if e["op"] == "truncate" {
            rows.clear();
            continue;
        }
        let key = e["key"]["sku"].as_str().unwrap().to_owned();
        assert_eq!(m.key, key, "the message key is the primary key");
        if last.get(&key).is_some_and(|l| *l >= at) {
            skipped += 1;
            continue;
        }
        last.insert(key.clone(), at);
        match e["op"].as_str().unwrap() {
            "insert" | "update" | "read" => {
                let after = &e["after"];
                let unavailable: Vec<&str> = e["unavailable"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let prev_note = rows.get(&key).and_then(|r| r.note.clone());
                let note = if unavailable.contains(&"note") && how == Rebuild::AsDocumented {
                    prev_note
                } else {
                    after["note"].as_str().map(str::to_owned)
                };
                rows.insert(
                    key.clone(),
                    StockRow {
                        sku: key,
                        qty: i32::try_from(after["qty"].as_i64().unwrap()).unwrap(),
                        note,
                    },
                );
            }
            "delete" => {
                rows.remove(&key);
            }
            other => panic!("unknown op {other}"),
        }
    }
    (rows, skipped)
}

fn differences(a: &BTreeMap<String, StockRow>, b: &BTreeMap<String, StockRow>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, r) in a {
        match b.get(k) {
            None => out.push(format!("{k}: only in the source")),
            Some(x) if x != r => out.push(format!(
                "{k}: source qty {} note {:?}, rebuilt qty {} note {:?}",
                r.qty,
                r.note.as_ref().map(String::len),
                x.qty,
                x.note.as_ref().map(String::len)
            )),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("{k}: only in the rebuild"));
    }
    out
}

/// Writers insert, update (quantity only, so a TOASTed note is left unchanged; or the note,
/// sometimes a 20 kB one that is TOASTed), delete and re-insert rows of `keys` skus, each in
/// its own transaction, `ops` times each. Returns the number of committed transactions.
fn run_stock_writers(url: &str, writers: usize, ops: usize, keys: usize, seed: u64) -> usize {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + w as u64);
                let mut done = 0;
                for _ in 0..ops {
                    let sku = format!("sku-{}", rng.gen_range(0..keys));
                    let sql = match rng.gen_range(0..10) {
                        0..=3 => format!(
                            "INSERT INTO stock (sku, qty, note) VALUES ('{sku}', 1, 'new') \
                             ON CONFLICT (sku) DO UPDATE SET qty = stock.qty + 1"
                        ),
                        4..=5 => format!("UPDATE stock SET qty = qty - 1 WHERE sku = '{sku}'"),
                        6 => format!(
                            "UPDATE stock SET note = (SELECT string_agg(md5(random()::text), '') \
                             FROM generate_series(1, 700)) WHERE sku = '{sku}'"
                        ),
                        7 => format!("UPDATE stock SET note = 'short' WHERE sku = '{sku}'"),
                        _ => format!("DELETE FROM stock WHERE sku = '{sku}'"),
                    };
                    // Deadlocks and serialization failures are not expected (one row per
                    // transaction); any error fails the test.
                    conn.batch_execute(&sql).unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

/// What [`hit_leader`] does to the leading relay process.
#[derive(Clone, Copy)]
enum Fault {
    /// kill -9, and a fresh process in its place.
    Kill9,
    /// SIGSTOP (the caller sends SIGCONT).
    Stop,
}

/// After 1.5 s of load, hits the leading relay with `fault` and waits for a standby to take
/// over. Returns the index of the process hit, `None` when no leader was found to hit.
async fn hit_leader(
    conn: &mut PgConnection,
    relays: &mut [RelayProcess; 2],
    spawn: &dyn Fn() -> RelayProcess,
    fault: Fault,
) -> Option<usize> {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (first, epoch) = leader(conn).unwrap()?;
    let pid: u32 = first.rsplit('-').nth(1).unwrap().parse().unwrap();
    let victim = relays.iter().position(|r| r.pid() == pid)?;
    match fault {
        Fault::Kill9 => {
            relays[victim].kill9().unwrap();
            relays[victim] = spawn();
        }
        Fault::Stop => relays[victim].stop().unwrap(),
    }
    wait_until(Duration::from_secs(20), "takeover", || {
        Ok(leader(conn)?.is_some_and(|(id, e)| id != first && e > epoch))
    })
    .await
    .unwrap();
    Some(victim)
}

/// The rebuild-equals-source guarantee under concurrent writers, kill -9 of the streaming
/// leader three times and a SIGSTOP of it past its lease (two relay processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_rebuilding_the_table_from_its_changes_equals_the_source_after_kill_9_and_sigstop(
) {
    let db = cdc_db(STOCK, "public.stock");
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdc");
    create_topic(&broker.bootstrap(), &topic, 4).await.unwrap();
    let mut conn = db.conn().unwrap();
    let args = [
        "--capture",
        "streaming",
        "--slot",
        db.name(),
        "--capture-tables",
        "public.stock",
        "--capture-topic",
        &topic,
    ];
    let spawn = || RelayProcess::spawn(RELAY_BIN, db.url(), &broker.bootstrap(), &args).unwrap();
    let mut relays = [spawn(), spawn()];
    if let Err(e) = wait_until(Duration::from_secs(30), "a leader", || {
        Ok(leader(&mut conn)?.is_some())
    })
    .await
    {
        let logs: String = relays.iter().map(RelayProcess::log).collect();
        panic!("{e}\n{logs}");
    }
    let url = db.url().to_owned();
    let writers = tokio::task::spawn_blocking(move || run_stock_writers(&url, 4, 900, 60, 7));
    let (mut kills, mut stops) = (0, 0);
    // Three kill -9 of the leader, then a SIGSTOP past its lease and a SIGCONT (the zombie
    // wakes up after a standby took the slot).
    for round in 0..4 {
        let fault = if round < 3 { Fault::Kill9 } else { Fault::Stop };
        let Some(victim) = hit_leader(&mut conn, &mut relays, &spawn, fault).await else {
            continue;
        };
        if round < 3 {
            kills += 1;
        } else {
            stops += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
            relays[victim].cont().unwrap();
        }
    }
    let committed = writers.await.unwrap();
    let source = source_rows(&mut conn);
    // Every committed transaction made one change at most (an UPDATE or DELETE of a missing
    // row makes none): read until the rebuild matches or the topic stays quiet.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (seen, rebuilt, skipped) = loop {
        let seen = read_all(&broker.bootstrap(), &topic, 1).await;
        let (rebuilt, skipped) = rebuild(&seen, Rebuild::AsDocumented);
        if rebuilt == source || Instant::now() > deadline {
            break (seen, rebuilt, skipped);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let logs: String = relays.iter().map(RelayProcess::log).collect();
    let diff = differences(&source, &rebuilt);
    assert!(
        diff.is_empty(),
        "{} differences after {committed} transactions, {} events: {:?}\n{logs}",
        diff.len(),
        seen.len(),
        &diff[..diff.len().min(10)]
    );
    // The broken rebuild (a TOASTed note an UPDATE left alone taken as NULL) is caught.
    let unavailable = seen
        .iter()
        .filter(|m| m.payload.contains("\"unavailable\""))
        .count();
    assert!(unavailable > 0, "no UPDATE left a TOASTed note unchanged");
    let (broken, _) = rebuild(&seen, Rebuild::UnavailableAsNull);
    let broken_diff = differences(&source, &broken).len();
    assert!(
        broken_diff > 0,
        "the broken rebuild (unavailable columns as NULL) was not caught"
    );
    assert!(
        kills >= 2 && stops == 1,
        "only {kills} kills and {stops} SIGSTOP"
    );
    eprintln!(
        "cdc kill -9 x{kills}, SIGSTOP x{stops}: {committed} transactions, {} rows, {} events read, {skipped} duplicates skipped, rebuild = source; {unavailable} events with an unchanged TOASTed note; the broken rebuild differs in {broken_diff} rows",
        source.len(),
        seen.len()
    );
}

/// The broken variant of the position guarantee: a reader that confirms the slot as it reads,
/// before anything reached Kafka, loses the changes; the rebuild differs from the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_confirming_before_delivery_loses_changes_the_rebuild_differs() {
    let db = cdc_db(STOCK, "public.stock");
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdcb");
    create_topic(&broker.bootstrap(), &topic, 2).await.unwrap();
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || run_stock_writers(&url, 2, 100, 20, 3))
        .await
        .unwrap();
    let publications = format!(
        "{}\",\"{}",
        RelayConfig::default().publication_name(),
        RelayConfig::default().capture_publication_name()
    );
    let confirmed = outbox_tests::naive::confirm_on_read(db.url(), db.name(), &publications)
        .await
        .unwrap();
    assert!(confirmed > 0);
    let relay = InProcessRelay::start(cdc_config(&db, &broker.bootstrap(), "public.stock", &topic))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let seen = read_all(&broker.bootstrap(), &topic, 0).await;
    relay.stop().await.unwrap();
    let source = source_rows(&mut db.conn().unwrap());
    let (rebuilt, _) = rebuild(&seen, Rebuild::AsDocumented);
    let diff = differences(&source, &rebuilt);
    assert!(!diff.is_empty(), "the checker did not catch the loss");
    eprintln!(
        "confirm-before-delivery: {} of {} rows differ",
        diff.len(),
        source.len()
    );
}

const TYPES: &str = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE typed (
    id bigint PRIMARY KEY,
    small smallint, big bigint, flag boolean, real4 real, real8 double precision,
    amount numeric(12, 4), huge numeric, label text, code varchar(8), fixed char(3),
    raw bytea, uid uuid, doc jsonb, plain json, day date, at timestamptz, local timestamp,
    clock time, feeling mood, count positive, ints integer[], words text[], grid integer[][],
    nothing text, long_text text
)";

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Every mapped type round trips into the envelope as docs/CDC.md says; an UPDATE that leaves
/// a TOASTed value alone lists it as unavailable (never null); a column added while the relay
/// runs appears from the next change on; a DELETE carries the key; a TRUNCATE is its own event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_toast_schema_change_delete_and_truncate_in_the_envelope() {
    let db = cdc_db(TYPES, "public.typed");
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdct");
    create_topic(&broker.bootstrap(), &topic, 1).await.unwrap();
    let relay = InProcessRelay::start(cdc_config(&db, &broker.bootstrap(), "public.typed", &topic))
        .unwrap();
    let mut conn = db.conn().unwrap();
    conn.batch_execute(
        "INSERT INTO typed VALUES (1, -32768, 9223372036854775807, true, 1.5, -2.25, \
           '-12345678.1234', '123456789012345678901234567890.000000001', 'é ☃ \"q\"', 'abc', 'x', \
           '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2.5, null]}', '{\"k\": 1}', \
           '2026-12-01', '2026-12-01 19:22:47.123456+01', '1999-12-31 23:59:59.5', '13:14:15.000016', \
           'happy', 7, '{1,NULL,3}', '{\"x,y\",z}', '{{1,2},{3,4}}', NULL, \
           (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 625) i));
         UPDATE typed SET small = 1 WHERE id = 1;
         ALTER TABLE typed ADD COLUMN added integer DEFAULT 5;
         INSERT INTO typed (id, added) VALUES (2, 6);
         UPDATE typed SET id = 3 WHERE id = 2;
         DELETE FROM typed WHERE id = 1;
         TRUNCATE typed;",
    )
    .unwrap();
    let seen = read_all(&broker.bootstrap(), &topic, 7).await;
    relay.stop().await.unwrap();
    let events: Vec<Value> = seen
        .iter()
        .map(|m| serde_json::from_str(&m.payload).unwrap())
        .collect();
    let ops: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        ["insert", "update", "insert", "delete", "insert", "delete", "truncate"],
        "{events:#?}"
    );
    let after = &events[0]["after"];
    let expect = serde_json::json!({
        "id": 1, "small": -32768, "big": 9_223_372_036_854_775_807_i64, "flag": true,
        "real4": 1.5, "real8": -2.25, "amount": "-12345678.1234",
        "huge": "123456789012345678901234567890.000000001", "label": "é ☃ \"q\"",
        "code": "abc", "fixed": "x  ", "raw": "AP8Q",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "doc": {"a": [1, 2.5, null]},
        "plain": {"k": 1}, "day": "2026-12-01", "at": "2026-12-01T18:22:47.123456Z",
        "local": "1999-12-31T23:59:59.500000", "clock": "13:14:15.000016", "feeling": "happy",
        "count": 7, "ints": [1, null, 3], "words": ["x,y", "z"], "grid": [[1, 2], [3, 4]],
        "nothing": null,
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}: {after:#}");
    }
    assert_eq!(
        after["long_text"].as_str().unwrap().len(),
        20_000,
        "a TOASTed value whole"
    );
    assert_eq!(events[0]["key"], serde_json::json!({"id": 1}));
    assert_eq!(seen[0].key, "1");
    assert_eq!(
        events[0]["table"],
        serde_json::json!({"schema": "public", "name": "typed"})
    );
    // The UPDATE left the TOASTed text alone: unavailable, not null, and not in `after`.
    assert_eq!(events[1]["unavailable"], serde_json::json!(["long_text"]));
    assert!(events[1]["after"].get("long_text").is_none());
    assert_eq!(events[1]["after"]["small"], 1);
    // The column added mid-stream is in the next change's row.
    assert_eq!(events[2]["after"]["added"], 6);
    // A key change: a delete under the old key, an insert under the new one.
    assert_eq!(events[3]["key"], serde_json::json!({"id": 2}));
    assert_eq!(events[4]["after"]["id"], 3);
    assert_eq!(seen[3].key, "2");
    assert_eq!(seen[4].key, "3");
    // DELETE with the default replica identity carries the key.
    assert_eq!(events[5]["before"]["id"], 1);
    assert!(events[5]["after"].is_null());
    for e in &events {
        assert!(e["source"]["commit_time"].as_str().unwrap().ends_with('Z'));
        assert!(e["source"]["tx"].as_u64().unwrap() > 0);
    }
    // Nothing left undelivered or dead-lettered.
    let n = diesel::sql_query("SELECT count(*) AS n FROM outbox_dead_letters")
        .get_result::<Count>(&mut conn)
        .unwrap()
        .n;
    assert_eq!(n, 0);
}

/// A table whose changes cannot carry a key stops the relay with an error naming the table and
/// the fix; nothing is streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_is_refused_with_the_fix() {
    let db = cdc_db("CREATE TABLE loose (a integer, b text)", "public.loose");
    let broker = Tansu::start().unwrap();
    let relay = outbox_relay::Relay::new(cdc_config(
        &db,
        &broker.bootstrap(),
        "public.loose",
        "loose",
    ))
    .unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        relay.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the relay stops")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("public.loose")
            && err.contains("primary key")
            && err.contains("REPLICA IDENTITY"),
        "{err}"
    );
    // The settings refuse capture without streaming, and a name that is not schema.table.
    let e = relay_config(db.url(), &broker.bootstrap())
        .capture_tables("public.loose")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("capture = \"streaming\""), "{e}");
    let e = relay_config(db.url(), &broker.bootstrap())
        .capture(CaptureMode::Streaming)
        .capture_tables("public.\"odd name\"")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("capture_tables"), "{e}");
}

#[derive(QueryableByName)]
struct Done {
    #[diesel(sql_type = Nullable<Text>)]
    finished: Option<String>,
    #[diesel(sql_type = BigInt)]
    rows_read: i64,
}

/// The snapshot guarantee: a table's existing rows are published by a snapshot in chunks while
/// writers change the same rows and the leader is killed twice; the rebuilt table equals the
/// source (no row missing, no chunk row applied over a newer change), and the snapshot resumes
/// after the last delivered chunk. Broken variant caught by the same rebuild: the same rows
/// published without the watermark dedupe (a read of the table taken before changes that the
/// stream already delivered, published after them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_under_concurrent_writes_and_kill_9_rebuilds_the_source() {
    let db = cdc_db(STOCK, "public.stock");
    let mut conn = db.conn().unwrap();
    conn.batch_execute(
        "INSERT INTO stock (sku, qty, note) \
         SELECT 'sku-' || i, i, 'before' FROM generate_series(0, 2999) i",
    )
    .unwrap();
    let captured = outbox_relay::cdc::parse_tables("public.stock").unwrap();
    outbox_relay::store::stream::request_snapshot(
        &mut conn,
        "outbox_cdc_snapshots",
        &captured[0],
        150,
    )
    .unwrap();
    // What a snapshot without watermarks would publish: the table as read now.
    let naive = source_rows(&mut conn);
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdcs");
    create_topic(&broker.bootstrap(), &topic, 4).await.unwrap();
    let args = [
        "--capture",
        "streaming",
        "--slot",
        db.name(),
        "--capture-tables",
        "public.stock",
        "--capture-topic",
        &topic,
    ];
    let spawn = || RelayProcess::spawn(RELAY_BIN, db.url(), &broker.bootstrap(), &args).unwrap();
    let mut relays = [spawn(), spawn()];
    let url = db.url().to_owned();
    let writers = tokio::task::spawn_blocking(move || run_stock_writers(&url, 3, 700, 3000, 11));
    let mut kills = 0;
    for _ in 0..2 {
        if hit_leader(&mut conn, &mut relays, &spawn, Fault::Kill9)
            .await
            .is_some()
        {
            kills += 1;
        }
    }
    let committed = writers.await.unwrap();
    let logs = |relays: &[RelayProcess]| relays.iter().map(RelayProcess::log).collect::<String>();
    if let Err(e) = wait_until(Duration::from_secs(90), "the snapshot finished", || {
        let d: Done = diesel::sql_query(
            "SELECT finished_at::text AS finished, rows_read FROM outbox_cdc_snapshots",
        )
        .get_result(&mut conn)?;
        Ok(d.finished.is_some())
    })
    .await
    {
        panic!("{e}\n{}", logs(&relays));
    }
    let done: Done = diesel::sql_query(
        "SELECT finished_at::text AS finished, rows_read FROM outbox_cdc_snapshots",
    )
    .get_result(&mut conn)
    .unwrap();
    // `status` shows it.
    let status = outbox_relay::status::read(&mut conn, &outbox::TableRef::default()).unwrap();
    assert_eq!(status.snapshots.len(), 1);
    assert_eq!(status.snapshots[0].table_name, "public.stock");
    assert!(status.snapshots[0].finished_at.is_some());
    assert_eq!(status.snapshots[0].rows_read, done.rows_read);
    let source = source_rows(&mut conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (seen, rebuilt) = loop {
        let seen = read_all(&broker.bootstrap(), &topic, 1).await;
        let (rebuilt, _) = rebuild(&seen, Rebuild::AsDocumented);
        if rebuilt == source || Instant::now() > deadline {
            break (seen, rebuilt);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let diff = differences(&source, &rebuilt);
    assert!(
        diff.is_empty(),
        "{} differences after {committed} transactions: {:?}\n{}",
        diff.len(),
        &diff[..diff.len().min(10)],
        logs(&relays)
    );
    let reads = seen
        .iter()
        .filter(|m| m.payload.contains("\"op\":\"read\""))
        .count();
    assert!(reads >= 2000, "only {reads} read events");
    // The broken variant: the rows as read before the writers ran, published after the
    // stream's changes (no watermarks, no dedupe).
    let max_offset = seen.iter().map(|m| m.offset).max().unwrap_or(0);
    let mut broken = seen.clone();
    for (i, r) in naive.values().enumerate() {
        let body = serde_json::json!({
            "v": 1, "op": "read", "table": {"schema": "public", "name": "stock"},
            "key": {"sku": r.sku}, "before": null,
            "after": {"sku": r.sku, "qty": r.qty, "note": r.note},
            "source": {"lsn": "FFFF/0", "commit_lsn": "FFFF/0", "seq": i, "tx": 0, "commit_time": "2026-12-01T00:00:00Z"}
        });
        let partition = seen
            .iter()
            .find(|m| m.key == r.sku)
            .map_or(0, |m| m.partition);
        broken.push(Seen {
            event_id: format!("naive-{i}"),
            key: r.sku.clone(),
            partition,
            offset: max_offset + 1 + i64::try_from(i).unwrap(),
            payload: body.to_string(),
        });
    }
    let (broken_rebuilt, _) = rebuild(&broken, Rebuild::AsDocumented);
    let broken_diff = differences(&source, &broken_rebuilt).len();
    assert!(broken_diff > 0, "the naive snapshot was not caught");
    eprintln!(
        "cdc snapshot: 3000 rows, {committed} concurrent transactions, kill -9 x{kills}: {} events ({reads} read), rows_read {}, rebuild = source; without watermarks {broken_diff} rows differ",
        seen.len(),
        done.rows_read
    );
}

/// A dropped column leaves the envelope from the next change on, without a restart; a
/// captured table renamed while the relay streams stops it with an error naming both names
/// (its changes are not published silently under a name nobody captures, nor lost: the slot is
/// not confirmed past them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_leaves_the_envelope_and_a_rename_stops_the_relay_clearly() {
    let db = cdc_db(STOCK, "public.stock");
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdcr");
    create_topic(&broker.bootstrap(), &topic, 1).await.unwrap();
    let relay =
        outbox_relay::Relay::new(cdc_config(&db, &broker.bootstrap(), "public.stock", &topic))
            .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let s = shutdown.clone();
        async move { relay.run(s).await }
    });
    let mut conn = db.conn().unwrap();
    conn.batch_execute(
        "INSERT INTO stock VALUES ('a', 1, 'x'); \
         ALTER TABLE stock DROP COLUMN note; \
         INSERT INTO stock VALUES ('b', 2);",
    )
    .unwrap();
    let seen = read_all(&broker.bootstrap(), &topic, 2).await;
    let events: Vec<Value> = seen
        .iter()
        .map(|m| serde_json::from_str(&m.payload).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["after"]["note"], "x");
    assert!(events[1]["after"].get("note").is_none(), "{}", events[1]);
    assert_eq!(events[1]["after"]["qty"], 2);
    conn.batch_execute(
        "ALTER TABLE stock RENAME TO stock_old; INSERT INTO stock_old VALUES ('c', 3);",
    )
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the relay stops")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("public.stock was renamed to public.stock_old")
            && err.contains("capture_tables"),
        "{err}"
    );
    shutdown.cancel();
}

/// Column choices: an excluded column never appears (not in `after`, `before`, `unavailable`),
/// a configured key is the message key; a key a DELETE would not carry is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_columns_never_appear_and_a_configured_key_is_the_message_key() {
    let db = cdc_db(
        "CREATE TABLE users (id integer PRIMARY KEY, email text UNIQUE NOT NULL, password text, name text)",
        "public.users",
    );
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdcc");
    create_topic(&broker.bootstrap(), &topic, 2).await.unwrap();
    let cfg = cdc_config(&db, &broker.bootstrap(), "public.users", &topic)
        .capture_exclude_columns("public.users.password")
        .capture_key_columns("public.users.email");
    // email is not in the replica identity (the primary key): a DELETE would not carry it.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        outbox_relay::Relay::new(cfg.clone())
            .unwrap()
            .run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the relay stops")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("public.users.email is not in its replica identity")
            && err.contains("REPLICA IDENTITY FULL"),
        "{err}"
    );
    let mut conn = db.conn().unwrap();
    conn.batch_execute("ALTER TABLE users REPLICA IDENTITY FULL")
        .unwrap();
    let relay = InProcessRelay::start(cfg).unwrap();
    conn.batch_execute(
        "INSERT INTO users VALUES (1, 'a@x', 'secret', 'Ann'); \
         UPDATE users SET name = 'Anna', password = 'secret2' WHERE id = 1; \
         DELETE FROM users WHERE id = 1;",
    )
    .unwrap();
    let seen = read_all(&broker.bootstrap(), &topic, 3).await;
    relay.stop().await.unwrap();
    assert_eq!(seen.len(), 3);
    for m in &seen {
        assert_eq!(m.key, "a@x", "the configured key");
        assert!(
            !m.payload.contains("password") && !m.payload.contains("secret"),
            "{}",
            m.payload
        );
    }
    let last: Value = serde_json::from_str(&seen[2].payload).unwrap();
    assert_eq!(last["op"], "delete");
    assert_eq!(
        last["before"]["name"], "Anna",
        "REPLICA IDENTITY FULL: the whole old row"
    );
    // Bad choices are refused by name.
    let e = relay_config(db.url(), &broker.bootstrap())
        .capture(CaptureMode::Streaming)
        .capture_tables("public.users")
        .capture_exclude_columns("public.orders.x")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("public.orders is not in capture_tables"), "{e}");
}

/// What an independent review found, each fixed: an outbox event and a captured change in one
/// transaction (their ids collided: the relay stopped for good); COPY of many rows (one WAL
/// record: all but one row were dropped); a table keyed by REPLICA IDENTITY USING INDEX (the
/// key must be the index's, in the stream as in a snapshot); REPLICA IDENTITY FULL with a
/// TOASTed column an UPDATE left alone (dead-lettered; now carried from the old row); a DELETE's
/// `before` holds the key only; JSON numbers exact; an array's lower bound kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_mixed_transactions_identity_index_full_and_exact_json() {
    let db = cdc_db(
        "CREATE TABLE c (id integer PRIMARY KEY, v text); \
         CREATE TABLE coded (id integer PRIMARY KEY, code text NOT NULL, n integer); \
         CREATE UNIQUE INDEX coded_code ON coded (code); \
         ALTER TABLE coded REPLICA IDENTITY USING INDEX coded_code; \
         CREATE TABLE wide (id integer PRIMARY KEY, big text, n integer, doc jsonb, a integer[]); \
         ALTER TABLE wide REPLICA IDENTITY FULL;",
        "public.c,public.coded,public.wide",
    );
    let broker = Tansu::start().unwrap();
    let topic = unique_name("cdcx");
    create_topic(&broker.bootstrap(), &topic, 1).await.unwrap();
    let outbox_topic = unique_name("cdcxo");
    create_topic(&broker.bootstrap(), &outbox_topic, 1)
        .await
        .unwrap();
    let relay = InProcessRelay::start(cdc_config(
        &db,
        &broker.bootstrap(),
        "public.c,public.coded,public.wide",
        &topic,
    ))
    .unwrap();
    let mut conn = db.conn().unwrap();
    conn.batch_execute(&format!(
        "BEGIN; SELECT * FROM outbox_emit('{outbox_topic}', 'k', 'E', '\\x7b7d'); \
           INSERT INTO c VALUES (0, 'after an outbox event'); COMMIT; \
         COPY c (id) FROM PROGRAM 'seq 1 50'; \
         INSERT INTO coded VALUES (1, 'c1', 1); UPDATE coded SET n = 2 WHERE id = 1; \
         DELETE FROM coded WHERE id = 1; \
         INSERT INTO wide VALUES (1, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 625) i), \
           1, '{{\"n\": 123456789012345678901234567890, \"pi\": 3.14159265358979323846264338327950288}}', \
           '[0:2]={{1,2,3}}'); \
         UPDATE wide SET n = 2 WHERE id = 1; \
         DELETE FROM c WHERE id = 0;"
    ))
    .unwrap();
    // 1 + 50 rows of c, 3 of coded, 2 of wide, 1 delete of c.
    let seen = read_all(&broker.bootstrap(), &topic, 57).await;
    let outbox_seen = read_all(&broker.bootstrap(), &outbox_topic, 1).await;
    relay.stop().await.unwrap();
    assert_eq!(outbox_seen.len(), 1, "the outbox event beside the change");
    let events: Vec<Value> = seen
        .iter()
        .map(|m| serde_json::from_str(&m.payload).unwrap())
        .collect();
    let of = |table: &str| -> Vec<(&Seen, &Value)> {
        seen.iter()
            .zip(&events)
            .filter(|(_, e)| e["table"]["name"] == table)
            .collect()
    };
    let c = of("c");
    assert_eq!(
        c.len(),
        52,
        "every copied row, the row after the outbox event, the delete"
    );
    let ids: std::collections::BTreeSet<i64> = c
        .iter()
        .map(|(_, e)| e["key"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 51);
    let ce_ids: std::collections::HashSet<&str> =
        seen.iter().map(|m| m.event_id.as_str()).collect();
    assert_eq!(ce_ids.len(), seen.len(), "every change has its own ce_id");
    // The delete's before: the key only, not the other columns as null.
    let del = c.iter().find(|(_, e)| e["op"] == "delete").unwrap().1;
    assert_eq!(del["before"], serde_json::json!({"id": 0}));
    // USING INDEX: the key is the index's column.
    let coded = of("coded");
    assert_eq!(coded.len(), 3);
    for (m, e) in &coded {
        assert_eq!(m.key, "c1", "{e}");
        assert_eq!(e["key"], serde_json::json!({"code": "c1"}));
    }
    // FULL: the update carries the TOASTed value from the old row, keyed by the primary key.
    let wide = of("wide");
    assert_eq!(wide.len(), 2);
    let (m, upd) = wide[1];
    assert_eq!(upd["op"], "update");
    assert_eq!(m.key, "1");
    assert_eq!(
        upd["after"]["big"].as_str().map(str::len),
        Some(20_000),
        "{upd}"
    );
    assert!(upd.get("unavailable").is_none());
    assert_eq!(upd["before"]["n"], 1, "FULL: the whole old row");
    // Exact JSON numbers and the array's lower bound.
    let raw = &wide[0].0.payload;
    assert!(raw.contains("123456789012345678901234567890"), "{raw}");
    assert!(
        raw.contains("3.14159265358979323846264338327950288"),
        "{raw}"
    );
    assert_eq!(
        wide[0].1["after"]["a"],
        serde_json::json!({"lower_bounds": [0], "elements": [1, 2, 3]})
    );
}
