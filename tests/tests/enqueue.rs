//! The outbox library against real Postgres: atomicity with the business change, batches, the
//! plain-SQL contract, bad input, schemas, trace context and envelope round-trips.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use outbox::{Error, Event, Outbox, StoredEvent};
use outbox_tests::TestDb;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

fn business_table(conn: &mut PgConnection) {
    diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, total bigint NOT NULL)")
        .execute(conn)
        .unwrap();
}

fn order_event(id: i64) -> Event {
    Event::json(
        "orders",
        format!("order-{id}"),
        "OrderCreated",
        &serde_json::json!({"order_id": id}),
    )
    .unwrap()
}

/// A writer creates an order and its event; `Ok` means it wants to commit.
type Writer = fn(&mut PgConnection, &str, i64, bool) -> Result<(), Error>;

/// The correct writer: both in one transaction on one connection.
fn atomic_writer(conn: &mut PgConnection, _url: &str, id: i64, fail: bool) -> Result<(), Error> {
    conn.transaction(|conn| {
        diesel::sql_query("INSERT INTO orders VALUES ($1, 100)")
            .bind::<BigInt, _>(id)
            .execute(conn)?;
        outbox::Outbox::new().enqueue(conn, &order_event(id))?;
        if fail {
            return Err(Error::InvalidConfig("business rule failed".into()));
        }
        Ok(())
    })
}

/// Broken on purpose: the event goes out on its own connection (the "dual write" of the classic
/// articles), so it commits even when the business transaction rolls back.
fn dual_writer(conn: &mut PgConnection, url: &str, id: i64, fail: bool) -> Result<(), Error> {
    let mut other = PgConnection::establish(url).unwrap();
    other.transaction(|c| outbox::Outbox::new().enqueue(c, &order_event(id)))?;
    conn.transaction(|conn| {
        diesel::sql_query("INSERT INTO orders VALUES ($1, 100)")
            .bind::<BigInt, _>(id)
            .execute(conn)?;
        if fail {
            return Err(Error::InvalidConfig("business rule failed".into()));
        }
        Ok(())
    })
}

/// Runs a committed and a rolled-back write and checks that orders and events agree.
fn check_atomicity(writer: Writer) -> Result<(), String> {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    business_table(&mut conn);
    writer(&mut conn, db.url(), 1, false).map_err(|e| e.to_string())?;
    assert!(writer(&mut conn, db.url(), 2, true).is_err());
    let orders = count(&mut conn, "SELECT count(*) AS n FROM orders");
    let events = count(&mut conn, "SELECT count(*) AS n FROM outbox");
    let matched = count(
        &mut conn,
        "SELECT count(*) AS n FROM outbox o JOIN orders r ON o.partition_key = 'order-' || r.id",
    );
    if orders == 1 && events == 1 && matched == 1 {
        Ok(())
    } else {
        Err(format!("orders={orders} events={events} matched={matched}"))
    }
}

#[test]
fn commit_keeps_row_and_event_rollback_keeps_neither() {
    check_atomicity(atomic_writer).unwrap();
}

#[test]
fn the_atomicity_check_catches_a_dual_write() {
    let err = check_atomicity(dual_writer).unwrap_err();
    assert_eq!(err, "orders=1 events=2 matched=1");
}

#[test]
fn enqueue_outside_a_transaction_is_refused_and_writes_nothing() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let err = outbox::Outbox::new()
        .enqueue(&mut conn, &order_event(1))
        .unwrap_err();
    assert!(matches!(err, Error::NotInTransaction), "{err}");
    assert!(err.to_string().contains("conn.transaction"));
    let err = outbox::Outbox::new()
        .enqueue_batch(&mut conn, &[order_event(1)])
        .unwrap_err();
    assert!(matches!(err, Error::NotInTransaction), "{err}");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 0);
}

#[test]
fn batch_is_one_multi_row_insert_in_order() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let events: Vec<Event> = (0..5000).map(order_event).collect();
    let enqueued = conn
        .transaction(|c| outbox::Outbox::new().enqueue_batch(c, &events))
        .unwrap();
    assert_eq!(enqueued.len(), 5000);
    // ids follow the batch order, also across the statement split at 4096 rows
    assert!(enqueued.windows(2).all(|w| w[0].id < w[1].id));
    let stored = Outbox::new().pending(&mut conn, 10_000).unwrap();
    assert_eq!(stored.len(), 5000);
    for ((s, e), q) in stored.iter().zip(&events).zip(&enqueued) {
        assert_eq!((s.id, s.event_id), (q.id, e.event_id()));
    }
    // one transaction: every row carries the same writing transaction id
    assert!(stored.iter().all(|s| s.tx_id == stored[0].tx_id));
}

#[test]
fn batch_is_all_or_nothing_and_names_the_duplicate() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let existing = order_event(1);
    conn.transaction(|c| outbox::Outbox::new().enqueue(c, &existing))
        .unwrap();

    // repeated inside the batch
    let fresh = order_event(2);
    let err = conn
        .transaction(|c| outbox::Outbox::new().enqueue_batch(c, &[fresh.clone(), fresh.clone()]))
        .unwrap_err();
    assert!(
        matches!(err, Error::DuplicateEventId(id) if id == fresh.event_id()),
        "{err}"
    );

    // already pending in the table: nothing of the batch is written and the caller's
    // transaction stays usable (the batch ran in a savepoint)
    let batch = vec![order_event(3), existing.clone(), order_event(4)];
    let result: Result<i64, Error> = conn.transaction(|c| {
        let err = outbox::Outbox::new().enqueue_batch(c, &batch).unwrap_err();
        assert!(
            matches!(err, Error::DuplicateEventId(id) if id == existing.event_id()),
            "{err}"
        );
        assert!(!err.is_retriable());
        Ok(count(c, "SELECT count(*) AS n FROM outbox"))
    });
    assert_eq!(result.unwrap(), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 1);
}

#[test]
fn duplicate_single_enqueue_names_the_id_and_aborts() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let e = order_event(1);
    conn.transaction(|c| outbox::Outbox::new().enqueue(c, &e))
        .unwrap();
    let err = conn
        .transaction(|c| outbox::Outbox::new().enqueue(c, &e))
        .unwrap_err();
    assert!(
        matches!(err, Error::DuplicateEventId(id) if id == e.event_id()),
        "{err}"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 1);
}

#[test]
fn plain_sql_insert_with_four_columns_reads_back_like_a_library_event() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) \
         VALUES ('orders', 'order-7', 'OrderCreated', convert_to('{\"order_id\":7}', 'UTF8'))",
    )
    .execute(&mut conn)
    .unwrap();
    let lib = Event::builder("orders", "order-7", "OrderCreated")
        .json(&serde_json::json!({"order_id": 7}))
        .without_trace()
        .build()
        .unwrap();
    conn.transaction(|c| outbox::Outbox::new().enqueue(c, &lib))
        .unwrap();

    let rows = Outbox::new().pending(&mut conn, 10).unwrap();
    let [sql, ours] = rows.as_slice() else {
        panic!("expected 2 rows, got {rows:?}")
    };
    let comparable = |s: &StoredEvent| {
        (
            s.topic.clone(),
            s.partition_key.clone(),
            s.event_type.clone(),
            s.payload.clone(),
            s.headers.clone(),
            s.content_type.clone(),
            s.traceparent.clone(),
        )
    };
    assert_eq!(comparable(sql), comparable(ours));
    assert_eq!(sql.content_type, "application/json");
    assert!(sql.headers.is_empty());
    // defaults filled in: a v4 event id from gen_random_uuid(), the writing transaction, a time
    assert_eq!(sql.event_id.get_version_num(), 4);
    assert_ne!(sql.event_id, ours.event_id);
    assert!(sql.tx_id > 0 && sql.tx_id < ours.tx_id);
    assert!(sql.created_at <= ours.created_at);
}

#[test]
fn the_table_rejects_what_the_relay_could_not_deliver() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    for (values, constraint) in [
        ("('', 'k', 't', 'x')", "outbox_topic_valid"),
        ("('..', 'k', 't', 'x')", "outbox_topic_valid"),
        ("('a b', 'k', 't', 'x')", "outbox_topic_valid"),
        ("('orders', '', 't', 'x')", "outbox_partition_key_not_empty"),
        ("('orders', 'k', '', 'x')", "outbox_event_type_not_empty"),
        ("('orders', 'k', 't', 'x', '1')", "outbox_tx_id_is_writer"),
    ] {
        let columns = if values.matches(',').count() == 4 {
            "topic, partition_key, event_type, payload, tx_id"
        } else {
            "topic, partition_key, event_type, payload"
        };
        let err = diesel::sql_query(format!("INSERT INTO outbox ({columns}) VALUES {values}"))
            .execute(&mut conn)
            .unwrap_err();
        let diesel::result::Error::DatabaseError(kind, info) = &err else {
            panic!("{err}")
        };
        assert!(
            matches!(kind, diesel::result::DatabaseErrorKind::CheckViolation),
            "{values}: {err}"
        );
        assert_eq!(info.constraint_name(), Some(constraint), "{values}");
    }
    for (headers, traceparent) in [("'[]'", "NULL"), ("'{\"a\":1}'", "NULL"), ("'{}'", "'bad'")] {
        let err = diesel::sql_query(format!(
            "INSERT INTO outbox (topic, partition_key, event_type, payload, headers, traceparent) \
             VALUES ('orders', 'k', 't', 'x', {headers}, {traceparent})"
        ))
        .execute(&mut conn)
        .unwrap_err();
        assert!(err.to_string().contains("check constraint"), "{err}");
    }
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 0);
}

#[test]
fn every_bad_input_gets_its_own_clear_error_and_writes_nothing() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let b = || Event::builder("orders", "k", "OrderCreated");
    let cases: Vec<(&str, Result<Event, Error>, &str)> = vec![
        (
            "empty topic",
            Event::json("", "k", "t", &1),
            "invalid topic \"\": must not be empty",
        ),
        (
            "dot topic",
            Event::json(".", "k", "t", &1),
            "'.' and '..' are not allowed",
        ),
        (
            "dotdot topic",
            Event::json("..", "k", "t", &1),
            "'.' and '..' are not allowed",
        ),
        (
            "long topic",
            Event::json("x".repeat(250), "k", "t", &1),
            "longer than 249",
        ),
        (
            "bad topic chars",
            Event::json("or/ders", "k", "t", &1),
            "only ASCII letters",
        ),
        (
            "empty key",
            Event::json("orders", "", "t", &1),
            "invalid partition key: must not be empty",
        ),
        (
            "NUL in key",
            Event::json("orders", "a\0b", "t", &1),
            "must not contain NUL",
        ),
        (
            "empty event type",
            Event::json("orders", "k", "", &1),
            "invalid event type \"\"",
        ),
        (
            "invalid JSON",
            b().bytes("{\"a\":", "application/json").build(),
            "invalid JSON payload",
        ),
        (
            "bad content type",
            b().bytes("x", "text").build(),
            "invalid content type",
        ),
        (
            "empty header name",
            b().json(&1).header("", "v").build(),
            "name must not be empty",
        ),
        (
            "reserved header",
            b().json(&1).header("ce_id", "v").build(),
            "name is reserved",
        ),
        (
            "NUL header value",
            b().json(&1).header("x", "\0").build(),
            "value must not contain NUL",
        ),
        (
            "bad traceparent",
            b().json(&1).traceparent("00-xyz").build(),
            "invalid traceparent",
        ),
        ("no payload", b().build(), "missing payload"),
    ];
    for (what, result, message) in cases {
        let err = result.expect_err(what);
        assert!(
            err.to_string().contains(message),
            "{what}: got {err:?} / {err}"
        );
        assert!(!err.is_retriable(), "{what}");
    }

    // Checks at enqueue time, with nothing written.
    let small = Outbox::new().max_payload_bytes(16).unwrap();
    let err = conn
        .transaction(|c| small.enqueue(c, &Event::json("orders", "k", "t", &"x".repeat(20))?))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::PayloadTooLarge {
                size: 22,
                limit: 16
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "payload too large: 22 bytes exceeds the limit of 16 bytes"
    );
    let big = vec![b'x'; outbox::DEFAULT_MAX_PAYLOAD_BYTES + 1];
    let err = conn
        .transaction(|c| {
            outbox::Outbox::new().enqueue(c, &b().bytes(big, "application/octet-stream").build()?)
        })
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    assert!(matches!(
        Outbox::new().max_payload_bytes(0),
        Err(Error::InvalidConfig(m)) if m.contains("max_payload_bytes")
    ));
    for bad in ["", "Public", "a-b", "x;drop table outbox", &"s".repeat(64)] {
        let err = Outbox::new().schema(bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidIdentifier { .. }),
            "{bad:?}: {err}"
        );
        assert!(err.to_string().starts_with("invalid identifier"), "{err}");
    }
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 0);
}

#[test]
fn schema_mismatch_is_reported_with_what_is_wrong() {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn().unwrap();
    let err = Outbox::new().verify_schema(&mut conn).unwrap_err();
    assert!(matches!(err, Error::SchemaMismatch(_)), "{err}");
    assert!(
        err.to_string().contains("no migrations were ever applied"),
        "{err}"
    );
    assert!(
        err.to_string().contains("table outbox does not exist"),
        "{err}"
    );

    let applied = Outbox::new().migrate(&mut conn).unwrap();
    // 000001-000009: outbox, inbox, tx_id guard, outbox_delivered, tx_id index, dead-letter
    // key hash index, dead letters keyed by (id, event_id), the tableless outbox functions,
    // the snapshots of captured tables.
    assert_eq!(applied.len(), 9, "{applied:?}");
    assert!(
        Outbox::new().migrate(&mut conn).unwrap().is_empty(),
        "idempotent"
    );
    Outbox::new().verify_schema(&mut conn).unwrap();

    diesel::sql_query("ALTER TABLE outbox DROP COLUMN traceparent")
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query("ALTER TABLE outbox ALTER COLUMN topic TYPE varchar(300)")
        .execute(&mut conn)
        .unwrap();
    let err = Outbox::new()
        .verify_schema(&mut conn)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outbox.traceparent is missing"), "{err}");
    assert!(
        err.contains("outbox.topic has type varchar, expected text"),
        "{err}"
    );

    diesel::sql_query("DROP FUNCTION outbox_message_prefix()")
        .execute(&mut conn)
        .unwrap();
    let err = Outbox::new()
        .verify_schema(&mut conn)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("function outbox_message_prefix does not exist"),
        "{err}"
    );
    assert!(!err.contains("function outbox_emit"), "{err}");
}

/// The table contract (`outbox::contract`) is what the migrations create: every table, every
/// column in order, every type; a column added by a migration and not to the contract (or the
/// other way round) fails here.
#[test]
fn the_contract_matches_what_the_migrations_create() {
    use outbox::contract::Table;
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Col {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        udt: String,
    }
    let db = TestDb::new().unwrap();
    let mut conn = db.conn().unwrap();
    Outbox::new().migrate(&mut conn).unwrap();
    for table in Table::ALL {
        let found: Vec<Col> = diesel::sql_query(
            "SELECT column_name::text AS name, udt_name::text AS udt \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind::<diesel::sql_types::Text, _>(table.name())
        .load(&mut conn)
        .unwrap();
        let expected: Vec<Col> = table
            .columns()
            .iter()
            .map(|c| Col {
                name: c.name.to_owned(),
                udt: c.udt.to_owned(),
            })
            .collect();
        assert_eq!(found, expected, "{table}");
    }
    // The contract names every table the migrations create (and nothing else).
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let mut created: Vec<String> = diesel::sql_query(
        "SELECT tablename::text AS name FROM pg_catalog.pg_tables \
         WHERE schemaname = current_schema() ORDER BY 1",
    )
    .load::<Name>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|n| n.name)
    .collect();
    let mut named: Vec<String> = Table::ALL.iter().map(|t| t.name().to_owned()).collect();
    created.sort();
    named.sort();
    assert_eq!(created, named);
    // ... and every function.
    let mut created: Vec<String> = diesel::sql_query(
        "SELECT p.proname::text AS name FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = current_schema()",
    )
    .load::<Name>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|n| n.name)
    .collect();
    let mut named: Vec<String> = outbox::contract::Function::ALL
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    created.sort();
    named.sort();
    assert_eq!(created, named);
}

#[test]
fn a_custom_schema_holds_its_own_tables() {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn().unwrap();
    let svc = Outbox::new().schema("billing").unwrap();
    svc.migrate(&mut conn).unwrap();
    svc.verify_schema(&mut conn).unwrap();
    // the default search_path was restored and has no outbox
    assert!(Outbox::new().verify_schema(&mut conn).is_err());
    conn.transaction(|c| svc.enqueue(c, &order_event(1)))
        .unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM billing.outbox"),
        1
    );
    assert_eq!(svc.pending(&mut conn, 10).unwrap().len(), 1);
    // One connection, two schemas: the cached one-row INSERT is keyed by its SQL, so each
    // outbox keeps its own statement.
    let default = Outbox::new();
    default.migrate(&mut conn).unwrap();
    for i in 2..6 {
        conn.transaction(|c| default.enqueue(c, &order_event(i)))
            .unwrap();
        conn.transaction(|c| svc.enqueue(c, &order_event(i + 10)))
            .unwrap();
    }
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM billing.outbox"),
        5
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM public.outbox"),
        4
    );
}

#[test]
fn the_writers_span_becomes_the_events_traceparent() {
    use tracing_subscriber::prelude::*;
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    let subscriber = tracing_subscriber::registry().with(outbox::TraceContextLayer::new());
    let (written, expected) = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("create_order");
        let _g = span.enter();
        let expected = outbox::current_traceparent().unwrap();
        let e = order_event(1);
        conn.transaction(|c| outbox::Outbox::new().enqueue(c, &e))
            .unwrap();
        (e, expected)
    });
    assert_eq!(written.traceparent(), Some(expected));
    let stored = Outbox::new().pending(&mut conn, 1).unwrap();
    assert_eq!(stored[0].traceparent, Some(expected.to_string()));
}

#[test]
fn retriable_classification_follows_the_error_kind() {
    use diesel::result::{DatabaseErrorKind, Error as D};
    let db = TestDb::migrated().unwrap();
    let mut a = db.conn().unwrap();
    let mut b = db.conn().unwrap();
    diesel::sql_query("CREATE TABLE t (id int PRIMARY KEY, v int)")
        .execute(&mut a)
        .unwrap();
    diesel::sql_query("INSERT INTO t VALUES (1, 0)")
        .execute(&mut a)
        .unwrap();
    // Provoke a real serialization failure (SQLSTATE 40001).
    let err = a
        .build_transaction()
        .serializable()
        .run(|a| {
            diesel::sql_query("SELECT v FROM t WHERE id = 1").execute(a)?;
            b.build_transaction()
                .serializable()
                .run(|b| diesel::sql_query("UPDATE t SET v = v + 1 WHERE id = 1").execute(b))?;
            diesel::sql_query("UPDATE t SET v = v + 10 WHERE id = 1").execute(a)
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            D::DatabaseError(DatabaseErrorKind::SerializationFailure, _)
        ),
        "{err}"
    );
    assert!(Error::Database(err).is_retriable());
    let not_found = Error::Database(D::NotFound);
    assert!(!not_found.is_retriable());
}

mod roundtrip {
    use super::*;
    use proptest::prelude::*;

    fn topic() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,40}".prop_filter("not . or ..", |t| t != "." && t != "..")
    }

    fn headers() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map("x-[a-z0-9_-]{1,12}", "[^\u{0}]{0,30}", 0..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn envelopes_round_trip(
            topic in topic(),
            key in "[^\u{0}]{1,40}",
            event_type in "[A-Za-z][A-Za-z0-9.]{0,30}",
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            headers in headers(),
            json in any::<bool>(),
        ) {
            let db = shared_db();
            let mut conn = db.conn().unwrap();
            let mut builder = Event::builder(&topic, &key, &event_type);
            builder = if json {
                builder.json(&serde_json::json!({"bytes": payload}))
            } else {
                builder.bytes(payload.clone(), "application/octet-stream")
            };
            for (k, v) in &headers {
                builder = builder.header(k, v);
            }
            let event = builder.build().unwrap();
            let (q, stored) = conn.test_transaction::<_, Error, _>(|c| {
                let q = outbox::Outbox::new().enqueue(c, &event)?;
                let stored = Outbox::new().pending(c, 1)?.pop().unwrap();
                Ok((q, stored))
            });
            prop_assert_eq!(stored.id, q.id);
            prop_assert_eq!(stored.event_id, event.event_id());
            prop_assert_eq!(&stored.topic, event.topic());
            prop_assert_eq!(&stored.partition_key, event.key());
            prop_assert_eq!(&stored.event_type, event.event_type());
            prop_assert_eq!(&stored.payload, event.payload());
            prop_assert_eq!(&stored.content_type, event.content_type());
            prop_assert_eq!(&stored.headers, &headers);
        }
    }

    fn shared_db() -> &'static TestDb {
        static DB: std::sync::OnceLock<TestDb> = std::sync::OnceLock::new();
        DB.get_or_init(|| TestDb::migrated().unwrap())
    }
}

/// The tableless write path (`Outbox::tableless`, `outbox_emit`): logical decoding messages
/// read back through a `pgoutput` slot on a private cluster with `wal_level = logical`.
mod tableless {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{Binary, Text};
    use outbox::Enqueued;
    use outbox_tests::PgCluster;

    /// One decoded `pgoutput` Message ('M').
    #[derive(Debug)]
    struct Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: String,
    }

    /// A migrated database on `cluster` with a publication `p` on `outbox` and a `pgoutput` slot
    /// named like the database.
    fn logical_db(cluster: &PgCluster, name: &str) -> PgConnection {
        let url = cluster.create_db(name).unwrap();
        let mut conn = PgConnection::establish(&url).unwrap();
        Outbox::new().migrate(&mut conn).unwrap();
        diesel::sql_query("CREATE PUBLICATION p FOR TABLE outbox WITH (publish = 'insert')")
            .execute(&mut conn)
            .unwrap();
        diesel::sql_query("SELECT 1 FROM pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind::<Text, _>(name)
            .execute(&mut conn)
            .unwrap();
        conn
    }

    /// Every message the slot would decode now (peek: nothing is consumed).
    fn messages(conn: &mut PgConnection, slot: &str) -> Vec<Message> {
        #[derive(QueryableByName)]
        struct Change {
            #[diesel(sql_type = Binary)]
            data: Vec<u8>,
        }
        let changes: Vec<Change> = diesel::sql_query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1::name, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'p', 'messages', 'true')",
        )
        .bind::<Text, _>(slot)
        .load(conn)
        .unwrap();
        changes
            .into_iter()
            .filter(|c| c.data.first() == Some(&b'M'))
            .map(|c| {
                // 'M', int8 flags, int64 LSN, cstring prefix, int32 length, content
                let d = &c.data;
                let lsn = u64::from_be_bytes(d[2..10].try_into().unwrap());
                let nul = 10 + d[10..].iter().position(|b| *b == 0).unwrap();
                let len = u32::from_be_bytes(d[nul + 1..nul + 5].try_into().unwrap()) as usize;
                let content = &d[nul + 5..];
                assert_eq!(content.len(), len);
                Message {
                    transactional: d[1] & 1 == 1,
                    lsn,
                    prefix: String::from_utf8(d[10..nul].to_vec()).unwrap(),
                    content: String::from_utf8(content.to_vec()).unwrap(),
                }
            })
            .collect()
    }

    /// Standard base64 with padding, written here independently of Postgres' `encode`.
    fn base64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// What the writing transaction was: `pg_current_xact_id()` and `now()` as format v1 has them.
    #[derive(QueryableByName, Debug)]
    struct TxFacts {
        #[diesel(sql_type = Text)]
        tx_id: String,
        #[diesel(sql_type = Text)]
        created_at: String,
    }

    fn tx_facts(conn: &mut PgConnection) -> TxFacts {
        diesel::sql_query(
            "SELECT pg_current_xact_id()::text AS tx_id, \
             to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at",
        )
        .get_result(conn)
        .unwrap()
    }

    /// The message format v1 of `docs/TABLES.md`, character for character.
    fn expected_content(e: &Event, tx: &TxFacts) -> String {
        let j = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let headers: Vec<String> = e
            .headers()
            .iter()
            .map(|(k, v)| format!("{}:{}", j(k), j(v)))
            .collect();
        format!(
            "{{\"v\":1,\"event_id\":\"{}\",\"topic\":{},\"partition_key\":{},\"event_type\":{},\
             \"payload\":\"{}\",\"headers\":{{{}}},\"content_type\":{},\"traceparent\":{},\
             \"tx_id\":\"{}\",\"created_at\":\"{}\"}}",
            e.event_id(),
            j(e.topic()),
            j(e.key()),
            j(e.event_type()),
            base64(e.payload()),
            headers.join(","),
            j(e.content_type()),
            e.traceparent()
                .map_or("null".to_owned(), |t| j(&t.to_string())),
            tx.tx_id,
            tx.created_at
        )
    }

    /// Checks one decoded message against the event and its transaction.
    fn check_message(m: &Message, e: &Event, tx: &TxFacts) -> Result<(), String> {
        let want = expected_content(e, tx);
        if m.content != want {
            return Err(format!("content\n got {}\nwant {want}", m.content));
        }
        let v: serde_json::Value = serde_json::from_str(&m.content).map_err(|x| x.to_string())?;
        let payload = v["payload"].as_str().ok_or("payload is not a string")?;
        if payload.contains('\n') {
            return Err("payload has line breaks".into());
        }
        let headers: BTreeMap<String, String> =
            serde_json::from_value(v["headers"].clone()).map_err(|x| x.to_string())?;
        if &headers != e.headers() {
            return Err(format!("headers {headers:?}"));
        }
        Ok(())
    }

    fn payload_back(conn: &mut PgConnection, m: &Message) -> Vec<u8> {
        #[derive(QueryableByName)]
        struct P {
            #[diesel(sql_type = Binary)]
            p: Vec<u8>,
        }
        diesel::sql_query("SELECT decode(($1::jsonb)->>'payload', 'base64') AS p")
            .bind::<Text, _>(&m.content)
            .get_result::<P>(conn)
            .unwrap()
            .p
    }

    #[test]
    fn enqueue_emits_one_documented_message_in_the_callers_transaction() {
        let cluster = PgCluster::start().unwrap();
        let mut conn = logical_db(&cluster, "one");
        business_table(&mut conn);
        let tableless = Outbox::new().tableless();
        // Every byte value, long enough that `encode(.., 'base64')` would break lines.
        let payload: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let event = Event::builder("orders.v1", "order-\"42\"\n", "OrderCreated")
            .bytes(payload.clone(), "application/octet-stream")
            .header("x-tenant", "acme \"quoted\" é")
            .header("a", "")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .build()
            .unwrap();
        let plain = order_event(2);
        let (enqueued, plain_enqueued, tx) = conn
            .transaction(|c| {
                diesel::sql_query("INSERT INTO orders VALUES (1, 100)").execute(c)?;
                let q = tableless.enqueue(c, &event)?;
                let p = tableless.enqueue(c, &plain)?;
                Ok::<_, Error>((q, p, tx_facts(c)))
            })
            .unwrap();
        // rolled back: nothing is emitted
        let rolled_back = order_event(3);
        let err = conn
            .transaction(|c| {
                tableless.enqueue(c, &rolled_back)?;
                Err::<(), _>(Error::InvalidConfig("business rule failed".into()))
            })
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)));
        // A committed write flushes the WAL (a rollback does not), so the slot would see a
        // message of the rolled-back transaction if one had been decoded.
        diesel::sql_query("INSERT INTO orders VALUES (2, 100)")
            .execute(&mut conn)
            .unwrap();

        let found = messages(&mut conn, "one");
        assert_eq!(found.len(), 2, "{found:?}");
        let [m, p] = found.as_slice() else {
            unreachable!()
        };
        check_message(m, &event, &tx).unwrap();
        check_message(p, &plain, &tx).unwrap();
        assert!(m.transactional && p.transactional);
        assert_eq!(m.prefix, "outbox:public");
        assert_eq!(payload_back(&mut conn, m), payload);
        assert_eq!(enqueued.event_id, event.event_id());
        // the id is the negated LSN the decoder reports for the message
        assert_eq!(enqueued.id, -i64::try_from(m.lsn).unwrap());
        assert_eq!(plain_enqueued.id, -i64::try_from(p.lsn).unwrap());
        assert!(enqueued.id < 0 && plain_enqueued.id < enqueued.id);
        assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 0);
        assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM orders"), 2);

        // The checks can fail: a misnamed field, other payload bytes, a message that survives
        // its rollback (non-transactional) are each caught.
        let misnamed = Message {
            content: m.content.replace("\"partition_key\"", "\"key\""),
            prefix: m.prefix.clone(),
            ..*m
        };
        assert!(check_message(&misnamed, &event, &tx).is_err());
        let other = Event::builder(event.topic(), event.key(), event.event_type())
            .bytes(payload[..699].to_vec(), "application/octet-stream")
            .header("x-tenant", "acme \"quoted\" é")
            .header("a", "")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .event_id(event.event_id())
            .build()
            .unwrap();
        assert!(check_message(m, &other, &tx).is_err());
        let _ = conn.transaction(|c| {
            diesel::sql_query("SELECT pg_logical_emit_message(false, 'outbox:public', 'x')")
                .execute(c)?;
            Err::<(), _>(diesel::result::Error::RollbackTransaction)
        });
        diesel::sql_query("INSERT INTO orders VALUES (3, 100)")
            .execute(&mut conn)
            .unwrap();
        assert_eq!(messages(&mut conn, "one").len(), 3);
    }

    #[test]
    fn batch_emits_every_event_in_input_order() {
        let cluster = PgCluster::start().unwrap();
        let mut conn = logical_db(&cluster, "batch");
        let events: Vec<Event> = (0..1000).map(order_event).collect();
        let tableless = Outbox::new().tableless();
        let (enqueued, tx) = conn
            .transaction(|c| Ok::<_, Error>((tableless.enqueue_batch(c, &events)?, tx_facts(c))))
            .unwrap();
        let found = messages(&mut conn, "batch");
        assert_eq!((enqueued.len(), found.len()), (1000, 1000));
        for ((e, q), m) in events.iter().zip(&enqueued).zip(&found) {
            check_message(m, e, &tx).unwrap();
            assert_eq!(
                (q.event_id, q.id),
                (e.event_id(), -i64::try_from(m.lsn).unwrap())
            );
        }
        assert!(enqueued[0].id < 0);
        assert!(enqueued.windows(2).all(|w| w[1].id < w[0].id));
        assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 0);

        // as for rows: a repeated event id is refused before anything is emitted
        let err = conn
            .transaction(|c| tableless.enqueue_batch(c, &[events[0].clone(), events[0].clone()]))
            .unwrap_err();
        assert!(
            matches!(err, Error::DuplicateEventId(id) if id == events[0].event_id()),
            "{err}"
        );
        assert_eq!(messages(&mut conn, "batch").len(), 1000);
    }

    #[test]
    fn each_schema_emits_under_its_own_prefix() {
        let cluster = PgCluster::start().unwrap();
        let mut conn = logical_db(&cluster, "prefix");
        let svc = Outbox::new().schema("svc").unwrap().tableless();
        svc.migrate(&mut conn).unwrap();
        svc.verify_schema(&mut conn).unwrap();
        #[derive(QueryableByName)]
        struct Prefixes {
            #[diesel(sql_type = Text)]
            public: String,
            #[diesel(sql_type = Text)]
            svc: String,
        }
        let p: Prefixes = diesel::sql_query(
            "SELECT public.outbox_message_prefix() AS public, svc.outbox_message_prefix() AS svc",
        )
        .get_result(&mut conn)
        .unwrap();
        assert_eq!(
            (p.public.as_str(), p.svc.as_str()),
            ("outbox:public", "outbox:svc")
        );
        // the connection's search_path is `public`: the schema's function still uses its own
        let (a, b) = (order_event(1), order_event(2));
        conn.transaction(|c| {
            svc.enqueue(c, &a)?;
            Outbox::new().tableless().enqueue(c, &b)
        })
        .unwrap();
        let found = messages(&mut conn, "prefix");
        let got: Vec<(&str, bool)> = found
            .iter()
            .map(|m| {
                (
                    m.prefix.as_str(),
                    m.content.contains(&a.event_id().to_string()),
                )
            })
            .collect();
        assert_eq!(got, [("outbox:svc", true), ("outbox:public", false)]);
    }

    /// `outbox_emit`'s first error for these arguments and an INSERT's for the same values:
    /// SQLSTATE, constraint, column, table, schema.
    fn both_errors(conn: &mut PgConnection, args: &str) -> (String, String) {
        #[derive(QueryableByName)]
        struct E {
            #[diesel(sql_type = Text)]
            e: String,
        }
        let mut run = |stmt: String| {
            diesel::sql_query("SELECT pg_temp.first_error($1) AS e")
                .bind::<Text, _>(stmt)
                .get_result::<E>(conn)
                .unwrap()
                .e
        };
        (
            run(format!("SELECT * FROM outbox_emit({args})")),
            run(format!(
                "INSERT INTO outbox (topic, partition_key, event_type, payload, headers, \
                 content_type, traceparent) VALUES ({args})"
            )),
        )
    }

    const CASES: &[(&str, &str)] = &[
        ("NULL, 'k', 't', 'x', '{}', 'a/b', NULL", "23502|column topic"),
        ("'o', NULL, 't', 'x', '{}', 'a/b', NULL", "23502|column partition_key"),
        ("'o', 'k', NULL, 'x', '{}', 'a/b', NULL", "23502|column event_type"),
        ("'o', 'k', 't', NULL, '{}', 'a/b', NULL", "23502|column payload"),
        ("'o', 'k', 't', 'x', NULL, 'a/b', NULL", "23502|column headers"),
        ("'o', 'k', 't', 'x', '{}', NULL, NULL", "23502|column content_type"),
        ("NULL, NULL, NULL, NULL, NULL, NULL, NULL", "23502|column topic"),
        ("'', 'k', 't', 'x', '{}', 'a/b', NULL", "23514|outbox_topic_valid"),
        ("'.', 'k', 't', 'x', '{}', 'a/b', NULL", "23514|outbox_topic_valid"),
        ("'..', 'k', 't', 'x', '{}', 'a/b', NULL", "23514|outbox_topic_valid"),
        ("'a b', 'k', 't', 'x', '{}', 'a/b', NULL", "23514|outbox_topic_valid"),
        ("repeat('x', 250), 'k', 't', 'x', '{}', 'a/b', NULL", "23514|outbox_topic_valid"),
        ("'o', '', 't', 'x', '{}', 'a/b', NULL", "23514|outbox_partition_key_not_empty"),
        ("'o', 'k', '', 'x', '{}', 'a/b', NULL", "23514|outbox_event_type_not_empty"),
        ("'o', 'k', 't', 'x', '{}', '', NULL", "23514|outbox_content_type_not_empty"),
        ("'o', 'k', 't', 'x', '[]', 'a/b', NULL", "23514|outbox_headers_string_map"),
        ("'o', 'k', 't', 'x', '\"s\"', 'a/b', NULL", "23514|outbox_headers_string_map"),
        ("'o', 'k', 't', 'x', '{\"a\":1}', 'a/b', NULL", "23514|outbox_headers_string_map"),
        ("'o', 'k', 't', 'x', '{\"a\":null}', 'a/b', NULL", "23514|outbox_headers_string_map"),
        ("'o', 'k', 't', 'x', '{}', 'a/b', 'bad'", "23514|outbox_traceparent_format"),
        (
            "'o', 'k', 't', 'x', '{}', 'a/b', '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01'",
            "23514|outbox_traceparent_format",
        ),
        // several problems: the first one an INSERT reports (CHECKs by constraint name)
        ("'', '', '', 'x', '[]', '', 'bad'", "23514|outbox_content_type_not_empty"),
        ("'..', '', 't', 'x', '[]', 'a/b', 'bad'", "23514|outbox_headers_string_map"),
    ];

    const FIRST_ERROR: &str = "CREATE FUNCTION pg_temp.first_error(stmt text) RETURNS text \
        LANGUAGE plpgsql AS $$ DECLARE s text; c text; col text; t text; sch text; \
        BEGIN EXECUTE stmt; RETURN 'no error'; \
        EXCEPTION WHEN OTHERS THEN GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, \
        c = CONSTRAINT_NAME, col = COLUMN_NAME, t = TABLE_NAME, sch = SCHEMA_NAME; \
        RETURN concat_ws('|', s, nullif(c, ''), 'column ' || nullif(col, ''), t, sch); END $$";

    #[test]
    fn emit_raises_what_an_insert_of_the_same_values_raises() {
        let db = TestDb::migrated().unwrap();
        let mut conn = db.conn().unwrap();
        diesel::sql_query(FIRST_ERROR).execute(&mut conn).unwrap();
        for (args, expected) in CASES {
            let (emit, insert) = both_errors(&mut conn, args);
            assert_eq!(emit, insert, "{args}");
            assert_eq!(emit, format!("{expected}|outbox|public"), "{args}");
        }
        // The comparison can fail: with the table's constraint gone, the two differ.
        let _ = conn.transaction(|c| {
            diesel::sql_query("ALTER TABLE outbox DROP CONSTRAINT outbox_topic_valid")
                .execute(c)?;
            let (emit, insert) = both_errors(c, "'a b', 'k', 't', 'x', '{}', 'a/b', NULL");
            assert_eq!(insert, "no error");
            assert_eq!(emit, "23514|outbox_topic_valid|outbox|public");
            Err::<(), _>(diesel::result::Error::RollbackTransaction)
        });
        // in another schema the errors name that schema, as the table's do
        Outbox::new()
            .schema("svc")
            .unwrap()
            .migrate(&mut conn)
            .unwrap();
        diesel::sql_query("SET search_path TO svc")
            .execute(&mut conn)
            .unwrap();
        let (emit, insert) = both_errors(&mut conn, "'o', 'k', '', 'x', '{}', 'a/b', NULL");
        assert_eq!(emit, insert);
        assert_eq!(emit, "23514|outbox_event_type_not_empty|outbox|svc");
        assert_eq!(
            count(&mut conn, "SELECT count(*) AS n FROM public.outbox"),
            0
        );
    }

    #[test]
    fn emit_refuses_to_run_below_wal_level_logical() {
        // The message would be written but never decoded: the event would be lost silently.
        let cluster = PgCluster::start().unwrap();
        let url = cluster.create_db("replica").unwrap();
        let mut conn = PgConnection::establish(&url).unwrap();
        Outbox::new().migrate(&mut conn).unwrap();
        // postgresql.auto.conf overrides the cluster's wal_level = logical
        diesel::sql_query("ALTER SYSTEM SET wal_level = replica")
            .execute(&mut conn)
            .unwrap();
        drop(conn);
        cluster.stop().unwrap();
        cluster.start_server().unwrap();
        let mut conn = PgConnection::establish(&url).unwrap();
        let err = conn
            .transaction(|c| Outbox::new().tableless().enqueue(c, &order_event(1)))
            .unwrap_err();
        let Error::Database(diesel::result::Error::DatabaseError(_, info)) = &err else {
            panic!("{err}")
        };
        assert!(
            info.message()
                .contains("outbox_emit needs wal_level = logical, the server has replica"),
            "{err}"
        );
        // the same event as a row is fine
        conn.transaction(|c| Outbox::new().enqueue(c, &order_event(1)))
            .unwrap();
    }

    /// The error each mode's `enqueue` and `enqueue_batch` return when the database rejects an
    /// event: the table's constraints for rows, `outbox_emit`'s checks for tableless. The event
    /// is valid (the library would refuse an invalid one itself), so a trigger on `outbox` and a
    /// wrapper of `outbox_emit` replace `column` by `bad` on the way in.
    fn database_errors(conn: &mut PgConnection, column: &str, bad: &str) -> [String; 4] {
        let args = [
            "topic",
            "partition_key",
            "event_type",
            "payload",
            "headers",
            "content_type",
            "traceparent",
            "new_event_id",
        ]
        .map(|a| {
            if a == column {
                bad.to_owned()
            } else {
                a.to_owned()
            }
        })
        .join(", ");
        conn.batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION spoil() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN NEW.{column} := {bad}; RETURN NEW; END $$; \
             CREATE OR REPLACE TRIGGER spoil BEFORE INSERT ON outbox \
             FOR EACH ROW EXECUTE FUNCTION spoil(); \
             CREATE OR REPLACE FUNCTION outbox_emit(topic text, partition_key text, \
             event_type text, payload bytea, headers jsonb, content_type text, \
             traceparent text, new_event_id uuid) RETURNS TABLE (id bigint, event_id uuid) \
             LANGUAGE sql AS $$ SELECT * FROM checked_emit({args}) $$"
        ))
        .unwrap();
        let describe = |r: Result<Vec<Enqueued>, Error>| match r {
            Err(Error::Database(diesel::result::Error::DatabaseError(kind, info))) => format!(
                "Database({kind:?}, constraint {:?}, column {:?}, table {:?})",
                info.constraint_name(),
                info.column_name(),
                info.table_name()
            ),
            other => format!("{other:?}"),
        };
        let e = order_event(1);
        let mut results = Vec::new();
        for outbox in [Outbox::new(), Outbox::new().tableless()] {
            results.push(describe(
                conn.transaction(|c| outbox.enqueue(c, &e).map(|q| vec![q])),
            ));
            // the batch fails in its savepoint: the caller's transaction goes on
            let batch = conn.transaction(|c| {
                let r = outbox.enqueue_batch(c, &[order_event(2), order_event(3)]);
                diesel::sql_query("SELECT 1").execute(c)?;
                Ok::<_, Error>(r)
            });
            results.push(describe(batch.unwrap()));
        }
        [
            results[0].clone(),
            results[2].clone(),
            results[1].clone(),
            results[3].clone(),
        ]
    }

    #[test]
    fn the_rust_api_maps_emit_errors_as_it_maps_the_tables() {
        let db = TestDb::migrated().unwrap();
        let mut conn = db.conn().unwrap();
        conn.batch_execute(
            "ALTER FUNCTION outbox_emit(text, text, text, bytea, jsonb, text, text, uuid) \
             RENAME TO checked_emit",
        )
        .unwrap();
        for (column, bad, expected) in [
            (
                "topic",
                "'a b'",
                "CheckViolation, constraint Some(\"outbox_topic_valid\")",
            ),
            (
                "partition_key",
                "''",
                "constraint Some(\"outbox_partition_key_not_empty\")",
            ),
            (
                "event_type",
                "''",
                "constraint Some(\"outbox_event_type_not_empty\")",
            ),
            (
                "content_type",
                "''",
                "constraint Some(\"outbox_content_type_not_empty\")",
            ),
            (
                "headers",
                "'[]'",
                "constraint Some(\"outbox_headers_string_map\")",
            ),
            (
                "traceparent",
                "'bad'",
                "constraint Some(\"outbox_traceparent_format\")",
            ),
            (
                "topic",
                "NULL",
                "NotNullViolation, constraint None, column Some(\"topic\")",
            ),
            ("payload", "NULL", "column Some(\"payload\")"),
            ("headers", "NULL", "column Some(\"headers\")"),
        ] {
            let [table_one, emit_one, table_batch, emit_batch] =
                database_errors(&mut conn, column, bad);
            assert!(table_one.contains(expected), "{column}: {table_one}");
            assert!(table_one.contains("table Some(\"outbox\")"), "{table_one}");
            assert_eq!(emit_one, table_one, "{column}");
            assert_eq!(emit_batch, table_batch, "{column}");
            assert_eq!(table_batch, table_one, "{column}");
        }
        assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox"), 0);

        // What the library refuses itself, it refuses the same way in both modes.
        let small = Outbox::new().max_payload_bytes(4).unwrap();
        for outbox in [small.clone(), small.tableless()] {
            let err = outbox.enqueue(&mut conn, &order_event(1)).unwrap_err();
            assert!(matches!(err, Error::NotInTransaction), "{err}");
            let err = conn
                .transaction(|c| outbox.enqueue(c, &order_event(1)))
                .unwrap_err();
            assert!(
                matches!(err, Error::PayloadTooLarge { limit: 4, .. }),
                "{err}"
            );
        }
    }
}
