//! The inbox against real Postgres: redelivery, racing consumers (and the SELECT-then-INSERT
//! variant that applies twice), rollback with the handler, consume-and-publish, retention.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use outbox::{Error, Event, Inbox, MessageRef, Outbox, Processed};
use outbox_tests::TestDb;

#[derive(QueryableByName)]
struct Available {
    #[diesel(sql_type = Integer)]
    available: i32,
}

fn stock_db() -> TestDb {
    let db = TestDb::migrated().unwrap();
    db.conn()
        .unwrap()
        .batch_execute(
            "CREATE TABLE stock (product text PRIMARY KEY, available int NOT NULL CHECK (available >= 0));
             INSERT INTO stock VALUES ('p1', 100);",
        )
        .unwrap();
    db
}

fn available(conn: &mut PgConnection) -> i32 {
    diesel::sql_query("SELECT available FROM stock WHERE product = 'p1'")
        .get_result::<Available>(conn)
        .unwrap()
        .available
}

fn deduct(conn: &mut PgConnection, qty: i32) -> Result<(), Error> {
    diesel::sql_query("UPDATE stock SET available = available - $1 WHERE product = 'p1'")
        .bind::<Integer, _>(qty)
        .execute(conn)?;
    Ok(())
}

#[test]
fn the_same_message_three_times_changes_the_state_once() {
    let db = stock_db();
    let mut conn = db.conn().unwrap();
    let inbox = Inbox::new("inventory").unwrap();
    let outcomes: Vec<Processed<()>> = (0..3)
        .map(|_| {
            inbox
                .process::<_, Error, _>(&mut conn, &MessageRef::id("order-1"), |c| deduct(c, 2))
                .unwrap()
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            Processed::Applied(()),
            Processed::Duplicate,
            Processed::Duplicate
        ]
    );
    assert_eq!(available(&mut conn), 98);
    // Another consumer has its own inbox: the same id is new to it.
    let billing = Inbox::new("billing").unwrap();
    assert!(billing
        .process::<_, Error, _>(&mut conn, &MessageRef::id("order-1"), |_| Ok(()))
        .unwrap()
        .is_applied());
}

/// Two consumers get the same message at the same moment.
fn race(naive: bool) -> (i32, Vec<bool>) {
    let db = stock_db();
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (url, barrier) = (db.url().to_owned(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                if naive {
                    naive_process(&mut conn, "order-7", &barrier)
                } else {
                    barrier.wait();
                    Inbox::new("inventory")
                        .unwrap()
                        .process::<_, Error, _>(&mut conn, &MessageRef::id("order-7"), |c| {
                            std::thread::sleep(Duration::from_millis(200));
                            deduct(c, 5)
                        })
                        .unwrap()
                        .is_applied()
                }
            })
        })
        .collect();
    let applied: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    (available(&mut db.conn().unwrap()), applied)
}

/// Broken on purpose: check with SELECT, apply, then record (ignoring the insert count).
fn naive_process(conn: &mut PgConnection, id: &str, barrier: &Barrier) -> bool {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    conn.transaction::<_, Error, _>(|c| {
        let seen = diesel::sql_query(
            "SELECT count(*) AS n FROM inbox WHERE consumer = 'inventory' AND message_id = $1",
        )
        .bind::<Text, _>(id)
        .get_result::<N>(c)?
        .n;
        barrier.wait(); // both have looked before either records
        if seen > 0 {
            return Ok(false);
        }
        deduct(c, 5)?;
        diesel::sql_query(
            "INSERT INTO inbox (consumer, message_id) VALUES ('inventory', $1) ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(id)
        .execute(c)?;
        Ok(true)
    })
    .unwrap()
}

#[test]
fn two_consumers_racing_on_one_message_apply_it_once() {
    let (left, mut applied) = race(false);
    applied.sort_unstable();
    assert_eq!(left, 95, "one deduction");
    assert_eq!(applied, [false, true]);
}

#[test]
fn broken_variant_select_then_insert_applies_twice() {
    let (left, applied) = race(true);
    assert_eq!(left, 90, "the race the inbox exists to prevent");
    assert_eq!(applied, [true, true]);
}

#[test]
fn a_failing_handler_rolls_back_the_inbox_row_so_the_retry_applies() {
    let db = stock_db();
    let mut conn = db.conn().unwrap();
    let inbox = Inbox::new("inventory").unwrap();
    let err = inbox
        .process::<(), Error, _>(&mut conn, &MessageRef::id("m"), |c| {
            deduct(c, 1)?;
            Err(Error::InvalidConfig("downstream check failed".into()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("downstream check failed"));
    assert!(!inbox.contains(&mut conn, "m").unwrap());
    assert_eq!(available(&mut conn), 100);
    // A business rule enforced by the database (stock never below zero) is also all-or-nothing.
    let err = inbox
        .process::<(), Error, _>(&mut conn, &MessageRef::id("too-much"), |c| deduct(c, 1000))
        .unwrap_err();
    assert!(matches!(err, Error::Database(_)), "{err}");
    assert!(!inbox.contains(&mut conn, "too-much").unwrap());
    assert!(inbox
        .process::<_, Error, _>(&mut conn, &MessageRef::id("m"), |c| deduct(c, 1))
        .unwrap()
        .is_applied());
    assert_eq!(available(&mut conn), 99);
}

#[test]
fn consume_and_publish_commit_together() {
    let db = stock_db();
    let mut conn = db.conn().unwrap();
    let inbox = Inbox::new("inventory").unwrap();
    let reply = |c: &mut PgConnection, fail: bool| -> Result<(), Error> {
        deduct(c, 3)?;
        outbox::Outbox::new().enqueue(
            c,
            &Event::json("inventory", "order-9", "InventoryReserved", &3)?,
        )?;
        if fail {
            return Err(Error::InvalidConfig("crash before commit".into()));
        }
        Ok(())
    };
    assert!(inbox
        .process(
            &mut conn,
            &MessageRef::id("order-9").at("orders", 2, 41),
            |c| reply(c, true)
        )
        .is_err());
    assert!(
        Outbox::new().pending(&mut conn, 10).unwrap().is_empty(),
        "no reply without the effect"
    );
    assert!(inbox
        .process(
            &mut conn,
            &MessageRef::id("order-9").at("orders", 2, 41),
            |c| reply(c, false)
        )
        .unwrap()
        .is_applied());
    assert_eq!(Outbox::new().pending(&mut conn, 10).unwrap().len(), 1);
    assert_eq!(available(&mut conn), 97);
}

#[test]
fn bad_input_and_misuse_get_clear_errors() {
    let db = stock_db();
    let mut conn = db.conn().unwrap();
    assert!(Inbox::new("")
        .unwrap_err()
        .to_string()
        .contains("consumer must not be empty"));
    let inbox = Inbox::new("inventory").unwrap();
    let err = inbox
        .process::<(), Error, _>(&mut conn, &MessageRef::id(""), |_| Ok(()))
        .unwrap_err();
    assert!(
        err.to_string().contains("message id must not be empty"),
        "{err}"
    );
    let long = "x".repeat(600);
    assert!(inbox
        .process::<(), Error, _>(&mut conn, &MessageRef::id(&long), |_| Ok(()))
        .is_err());
    assert!(matches!(
        inbox.record(&mut conn, &MessageRef::id("m")),
        Err(Error::NotInTransaction)
    ));
    assert!(Inbox::new("x").unwrap().schema("Bad Schema").is_err());
}

#[test]
fn retention_purges_old_rows_in_batches_and_keeps_recent_ones() {
    let db = stock_db();
    let mut conn = db.conn().unwrap();
    let inbox = Inbox::new("inventory").unwrap();
    for i in 0..25 {
        inbox
            .process::<_, Error, _>(&mut conn, &MessageRef::id(&format!("old-{i}")), |_| Ok(()))
            .unwrap();
    }
    diesel::sql_query("UPDATE inbox SET processed_at = now() - interval '30 days'")
        .execute(&mut conn)
        .unwrap();
    inbox
        .process::<_, Error, _>(&mut conn, &MessageRef::id("new"), |_| Ok(()))
        .unwrap();
    let purged = inbox
        .purge(&mut conn, Duration::from_secs(14 * 24 * 3600), 10)
        .unwrap();
    assert_eq!(purged, 25);
    assert!(inbox.contains(&mut conn, "new").unwrap());
    assert!(inbox.purge(&mut conn, Duration::from_secs(1), 0).is_err());
}

#[test]
fn a_batch_records_every_id_once_and_says_which_to_apply() {
    let db = stock_db();
    let mut conn = db.conn().unwrap();
    let inbox = Inbox::new("inventory").unwrap();
    conn.transaction(|c| inbox.record(c, &MessageRef::id("old")).map(|_| ()))
        .unwrap();
    let refs = [
        MessageRef::id("a").at("orders", 0, 10),
        MessageRef::id("old").at("orders", 0, 11),
        MessageRef::id("b").at("orders", 0, 12),
        MessageRef::id("a").at("orders", 0, 13), // a redelivered copy inside the batch
    ];
    let apply = conn.transaction(|c| inbox.record_batch(c, &refs)).unwrap();
    assert_eq!(apply, vec![true, false, true, false]);
    for id in ["a", "b", "old"] {
        assert!(inbox.contains(&mut conn, id).unwrap(), "{id}");
    }
    // Outside a transaction and with a bad id it refuses, writing nothing.
    assert!(matches!(
        inbox.record_batch(&mut conn, &refs),
        Err(Error::NotInTransaction)
    ));
    let bad = [MessageRef::id("c"), MessageRef::id("")];
    assert!(matches!(
        conn.transaction(|c| inbox.record_batch(c, &bad)),
        Err(Error::InvalidConfig(_))
    ));
    assert!(!inbox.contains(&mut conn, "c").unwrap());
}

#[test]
fn a_deadlock_is_classified_as_retriable() {
    let db = stock_db();
    let mut a = db.conn().unwrap();
    let mut b = db.conn().unwrap();
    a.batch_execute(
        "CREATE TABLE two (id int PRIMARY KEY, v int); INSERT INTO two VALUES (1, 0), (2, 0)",
    )
    .unwrap();
    a.batch_execute("BEGIN; UPDATE two SET v = 1 WHERE id = 1")
        .unwrap();
    b.batch_execute("BEGIN; UPDATE two SET v = 1 WHERE id = 2")
        .unwrap();
    let t = std::thread::spawn(move || {
        let r = b.batch_execute("UPDATE two SET v = 2 WHERE id = 1");
        let _ = b.batch_execute("ROLLBACK");
        r
    });
    std::thread::sleep(Duration::from_millis(300));
    let ra = a.batch_execute("UPDATE two SET v = 2 WHERE id = 2");
    let _ = a.batch_execute("ROLLBACK");
    let rb = t.join().unwrap();
    let err = ra
        .err()
        .or(rb.err())
        .expect("one of them is the deadlock victim");
    assert!(err.to_string().contains("deadlock"), "{err}");
    let err = outbox::Error::from(err);
    assert!(err.is_retriable(), "{err}");
}

/// S4: a statement timeout, a read-only server (a standby during a switchover) and a cancel
/// may go away when the transaction runs again: retriable, so the consumer retries them
/// (bounded) instead of dead-lettering at once. A constraint violation is not.
#[test]
fn timeouts_cancels_and_a_read_only_server_are_retriable() {
    let db = stock_db();
    let mut c = db.conn().unwrap();
    let timeout = c
        .batch_execute("SET statement_timeout = 10; SELECT pg_sleep(1)")
        .unwrap_err();
    c.batch_execute("RESET statement_timeout").unwrap();
    assert!(
        timeout.to_string().contains("statement timeout"),
        "{timeout}"
    );
    let timeout = outbox::Error::from(timeout);
    assert!(timeout.is_retriable(), "{timeout}");
    let read_only = c
        .batch_execute("BEGIN READ ONLY; CREATE TABLE ro (id int)")
        .unwrap_err();
    c.batch_execute("ROLLBACK").unwrap();
    let read_only = outbox::Error::from(read_only);
    assert!(read_only.is_retriable(), "{read_only}");
    let mut other = db.conn().unwrap();
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(&mut other)
        .unwrap()
        .pid;
    let t = std::thread::spawn(move || other.batch_execute("SELECT pg_sleep(5)"));
    std::thread::sleep(Duration::from_millis(300));
    diesel::sql_query(format!("SELECT pg_cancel_backend({pid})"))
        .execute(&mut c)
        .unwrap();
    let cancelled = t.join().unwrap().unwrap_err();
    let cancelled = outbox::Error::from(cancelled);
    assert!(cancelled.is_retriable(), "{cancelled}");
    c.batch_execute("CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1)")
        .unwrap();
    let dup = c.batch_execute("INSERT INTO u VALUES (1)").unwrap_err();
    let dup = outbox::Error::from(dup);
    assert!(!dup.is_retriable(), "{dup}");
}
