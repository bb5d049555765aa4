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
    // 000001-000007: outbox, inbox, tx_id guard, outbox_delivered, tx_id index, dead-letter
    // key hash index, dead letters keyed by (id, event_id).
    assert_eq!(applied.len(), 7, "{applied:?}");
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
