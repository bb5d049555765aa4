//! The demo services' domain rules against real Postgres: idempotency keys, guarded order
//! transitions, stock in three numbers never oversold under concurrency, reserve / release /
//! ship exactly once, a movement applied once whatever path brings it, the pull cursor that
//! never skips a late commit (and the cursors that do), reconciliation that finds and repairs.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};

use demo_inventory::warehouse::{self, Cursor, Outcome, Request, Sync};
use demo_inventory::{Movement, OrderCancelled, OrderCreated, Release, Reply};
use demo_order::{Error, NewOrder};
use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::prelude::*;
use outbox::{Inbox, MessageRef, Outbox};
use outbox_tests::TestDb;

fn order_db() -> TestDb {
    let db = TestDb::new().unwrap();
    demo_order::migrate(&mut db.conn().unwrap()).unwrap();
    db
}

/// A centre database whose warehouse `wh-a` holds `stock` units of p1 (learnt by an inbound
/// movement, as the sync paths bring it).
fn inventory_db(stock: i32) -> TestDb {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn().unwrap();
    demo_inventory::migrate(&mut conn).unwrap();
    apply(&mut conn, &movement("wh-a", "inbound", stock, None), "push");
    db
}

fn movement(warehouse: &str, kind: &str, delta: i32, order: Option<&str>) -> Movement {
    Movement {
        movement_id: uuid::Uuid::now_v7(),
        warehouse: warehouse.into(),
        product: "p1".into(),
        kind: kind.into(),
        delta,
        order_id: order.map(str::to_owned),
        created_at: "2026-12-01T00:00:00Z".into(),
    }
}

fn apply(conn: &mut PgConnection, m: &Movement, path: &str) -> bool {
    conn.transaction::<_, demo_inventory::Error, _>(|c| demo_inventory::apply_movement(c, m, path))
        .unwrap()
}

#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct Stock {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    on_hand: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    reserved: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    available: i32,
}

fn stock(conn: &mut PgConnection, warehouse: &str) -> Stock {
    diesel::sql_query(
        "SELECT on_hand, reserved, available FROM stock WHERE product = 'p1' AND warehouse = $1",
    )
    .bind::<diesel::sql_types::Text, _>(warehouse)
    .get_result(conn)
    .unwrap()
}

fn three(on_hand: i32, reserved: i32) -> Stock {
    Stock {
        on_hand,
        reserved,
        available: on_hand - reserved,
    }
}

fn new_order(qty: i32) -> NewOrder {
    NewOrder {
        user: "u1".into(),
        product: "p1".into(),
        quantity: qty,
        amount_cents: 999,
    }
}

#[test]
fn an_idempotency_key_returns_the_same_order_and_writes_one_event() {
    let db = order_db();
    let mut conn = db.conn().unwrap();
    let (first, created) = demo_order::create(&mut conn, Some("key-1"), &new_order(2)).unwrap();
    assert!(created);
    let (again, created) = demo_order::create(&mut conn, Some("key-1"), &new_order(2)).unwrap();
    assert!(!created);
    assert_eq!(first, again);
    assert_eq!(Outbox::new().pending(&mut conn, 10).unwrap().len(), 1);
    let err = demo_order::create(&mut conn, Some("key-1"), &new_order(3)).unwrap_err();
    assert!(matches!(err, Error::KeyReused(_)), "{err}");
    assert_eq!(Outbox::new().pending(&mut conn, 10).unwrap().len(), 1);
}

#[test]
fn concurrent_requests_with_one_key_create_one_order() {
    let db = order_db();
    let barrier = Arc::new(Barrier::new(10));
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let (url, barrier) = (db.url().to_owned(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                barrier.wait();
                demo_order::create(&mut conn, Some("same"), &new_order(1)).unwrap()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
    assert!(results.iter().all(|(o, _)| o.id == results[0].0.id));
    assert_eq!(
        Outbox::new()
            .pending(&mut db.conn().unwrap(), 20)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn bad_orders_get_clear_errors_and_write_nothing() {
    let db = order_db();
    let mut conn = db.conn().unwrap();
    for (order, message) in [
        (
            NewOrder {
                quantity: 0,
                ..new_order(1)
            },
            "quantity must be > 0",
        ),
        (
            NewOrder {
                amount_cents: -5,
                ..new_order(1)
            },
            "amount_cents must be > 0",
        ),
        (
            NewOrder {
                user: " ".into(),
                ..new_order(1)
            },
            "user must not be empty",
        ),
        (
            NewOrder {
                product: String::new(),
                ..new_order(1)
            },
            "product must not be empty",
        ),
    ] {
        let err = demo_order::create(&mut conn, None, &order)
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{err}");
    }
    assert!(demo_order::create(&mut conn, Some(""), &new_order(1)).is_err());
    assert!(Outbox::new().pending(&mut conn, 10).unwrap().is_empty());
}

#[test]
fn status_transitions_are_guarded() {
    let db = order_db();
    let mut conn = db.conn().unwrap();
    let (o, _) = demo_order::create(&mut conn, None, &new_order(1)).unwrap();
    assert!(demo_order::apply_reply(&mut conn, "InventoryReserved", o.id, None, None).unwrap());
    assert_eq!(
        demo_order::get(&mut conn, o.id).unwrap().status,
        "CONFIRMED"
    );
    let cancelled = demo_order::cancel(&mut conn, o.id).unwrap();
    assert_eq!(cancelled.status, "CANCELLED");
    let types: Vec<String> = Outbox::new()
        .pending(&mut conn, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, ["OrderCreated", "OrderCancelled"]);
    // No CONFIRMED after CANCELLED, no second cancel.
    assert!(!demo_order::apply_reply(&mut conn, "InventoryReserved", o.id, None, None).unwrap());
    let err = demo_order::cancel(&mut conn, o.id).unwrap_err();
    assert!(
        err.to_string().contains("is CANCELLED: cannot cancel"),
        "{err}"
    );
    // A rejected order cannot be cancelled or confirmed.
    let (r, _) = demo_order::create(&mut conn, None, &new_order(1)).unwrap();
    assert!(
        demo_order::apply_reply(&mut conn, "InventoryRejected", r.id, Some("no stock"), None)
            .unwrap()
    );
    assert_eq!(
        demo_order::get(&mut conn, r.id).unwrap().reason.as_deref(),
        Some("no stock")
    );
    assert!(!demo_order::apply_reply(&mut conn, "InventoryReserved", r.id, None, None).unwrap());
    assert!(demo_order::cancel(&mut conn, r.id).is_err());
    assert!(matches!(
        demo_order::get(&mut conn, uuid::Uuid::nil()),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn concurrent_reservations_never_take_stock_below_zero() {
    let db = inventory_db(10);
    let barrier = Arc::new(Barrier::new(25));
    let handles: Vec<_> = (0..25)
        .map(|i| {
            let (url, barrier) = (db.url().to_owned(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                barrier.wait();
                let order = OrderCreated {
                    order_id: format!("o-{i}"),
                    product: "p1".into(),
                    quantity: 1,
                };
                conn.transaction::<_, demo_inventory::Error, _>(|c| {
                    demo_inventory::reserve(c, &order)
                })
                .unwrap()
            })
        })
        .collect();
    let replies: Vec<Reply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let reserved = replies
        .iter()
        .filter(|r| matches!(r, Reply::InventoryReserved { warehouse, .. } if warehouse == "wh-a"))
        .count();
    assert_eq!(
        reserved, 10,
        "exactly the stock, no retry storm, no oversell"
    );
    let mut conn = db.conn().unwrap();
    assert_eq!(stock(&mut conn, "wh-a"), three(10, 10));
    assert_eq!(demo_inventory::available(&mut conn, "p1").unwrap(), Some(0));
    assert_eq!(
        Outbox::new().pending(&mut conn, 100).unwrap().len(),
        25,
        "one reply per order"
    );
    let rejected = replies.iter().find_map(|r| match r {
        Reply::InventoryRejected { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(
        rejected.as_deref(),
        Some("insufficient stock: 0 available (in all warehouses), 1 requested from one")
    );
}

#[test]
fn an_order_reserves_once_releases_once_and_a_shipment_consumes_it_once() {
    let db = inventory_db(10);
    let mut conn = db.conn().unwrap();
    // A second warehouse with more: reservations go where the most is available.
    apply(&mut conn, &movement("wh-b", "inbound", 4, None), "pull");
    let inbox = Inbox::new("inventory").unwrap();
    let created = OrderCreated {
        order_id: "o-1".into(),
        product: "p1".into(),
        quantity: 3,
    };
    for _ in 0..3 {
        inbox
            .process::<_, demo_inventory::Error, _>(
                &mut conn,
                &MessageRef::id("evt-created-1"),
                |c| demo_inventory::reserve(c, &created),
            )
            .unwrap();
    }
    assert_eq!(stock(&mut conn, "wh-a"), three(10, 3));
    assert_eq!(stock(&mut conn, "wh-b"), three(4, 0));
    let cancelled = OrderCancelled {
        order_id: "o-1".into(),
    };
    // The same cancellation delivered twice, and even processed under two message ids.
    for id in ["evt-cancel-1", "evt-cancel-1", "evt-cancel-other"] {
        inbox
            .process::<_, demo_inventory::Error, _>(&mut conn, &MessageRef::id(id), |c| {
                demo_inventory::release(c, &cancelled)
            })
            .unwrap();
    }
    assert_eq!(stock(&mut conn, "wh-a"), three(10, 0), "released once");
    // Another order ships: the shipment deducts on hand AND consumes the reservation, once,
    // even when two paths (or a repair) bring the same movement.
    let o2 = OrderCreated {
        order_id: "o-2".into(),
        product: "p1".into(),
        quantity: 4,
    };
    let r = conn
        .transaction::<_, demo_inventory::Error, _>(|c| demo_inventory::reserve(c, &o2))
        .unwrap();
    assert!(
        matches!(r, Reply::InventoryReserved { ref warehouse, .. } if warehouse == "wh-a"),
        "{r:?}"
    );
    let shipped = movement("wh-a", "shipment", -4, Some("o-2"));
    assert!(apply(&mut conn, &shipped, "capture"));
    assert!(!apply(&mut conn, &shipped, "push"));
    assert!(!apply(&mut conn, &shipped, "repair"));
    assert_eq!(stock(&mut conn, "wh-a"), three(6, 0));
    let shipped_events = Outbox::new()
        .pending(&mut conn, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "OrderShipped")
        .count();
    assert_eq!(
        shipped_events, 1,
        "the order service hears of the shipment once"
    );
    // A shipment naming another product (or warehouse) for an order does not consume the
    // order's reservation: it is recorded as unreserved, which reconcile reports.
    let o4 = OrderCreated {
        order_id: "o-4".into(),
        product: "p1".into(),
        quantity: 1,
    };
    conn.transaction::<_, demo_inventory::Error, _>(|c| demo_inventory::reserve(c, &o4))
        .unwrap();
    let mut wrong = movement("wh-b", "shipment", -1, Some("o-4"));
    wrong.product = "p1".into();
    assert!(apply(&mut conn, &wrong, "push"));
    assert_eq!(
        stock(&mut conn, "wh-a").reserved,
        1,
        "o-4's reservation at wh-a is untouched"
    );
    assert_eq!(stock(&mut conn, "wh-b"), three(3, 0));
    // A cancellation after shipment releases nothing.
    let late = conn
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::release(
                c,
                &OrderCancelled {
                    order_id: "o-2".into(),
                },
            )
        })
        .unwrap();
    assert_eq!(late, Release::AlreadyShipped);
    assert_eq!(stock(&mut conn, "wh-a"), three(6, 1));
    // A rejected order releases nothing; unknown products and bad movements are named.
    let none = conn
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::release(
                c,
                &OrderCancelled {
                    order_id: "never".into(),
                },
            )
        })
        .unwrap();
    assert_eq!(none, Release::Nothing);
    let unknown = conn
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::reserve(
                c,
                &OrderCreated {
                    order_id: "o-3".into(),
                    product: "nope".into(),
                    quantity: 1,
                },
            )
        })
        .unwrap();
    assert!(
        matches!(unknown, Reply::InventoryRejected { ref reason, .. } if reason == "unknown product nope")
    );
    let mut bad = movement("wh-a", "teleport", 1, None);
    let err = conn
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::apply_movement(c, &bad, "push")
        })
        .unwrap_err();
    assert!(err.to_string().contains("kind \"teleport\""), "{err}");
    bad.kind = "inbound".into();
    bad.created_at = "yesterday-ish".into();
    assert!(conn
        .transaction::<_, demo_inventory::Error, _>(|c| demo_inventory::apply_movement(
            c, &bad, "push"
        ))
        .is_err());
    assert_eq!(stock(&mut conn, "wh-a"), three(6, 1), "nothing applied");
}

#[test]
fn the_order_service_follows_the_shipment_and_refuses_a_cancellation_after_it() {
    let db = order_db();
    let mut conn = db.conn().unwrap();
    let (o, _) = demo_order::create(&mut conn, None, &new_order(1)).unwrap();
    // Not confirmed yet: nothing to ship.
    assert!(demo_order::fulfil(&mut conn, o.id).is_err());
    assert!(
        demo_order::apply_reply(&mut conn, "InventoryReserved", o.id, None, Some("wh-a")).unwrap()
    );
    assert_eq!(
        demo_order::get(&mut conn, o.id)
            .unwrap()
            .warehouse
            .as_deref(),
        Some("wh-a")
    );
    // Handed to the warehouse: from here a cancellation is refused, whatever the warehouse
    // has done yet (the one place that decides cancel against ship).
    assert_eq!(
        demo_order::fulfil(&mut conn, o.id).unwrap().status,
        "SHIPPING"
    );
    let err = demo_order::cancel(&mut conn, o.id).unwrap_err();
    assert!(
        err.to_string().contains("is SHIPPING: cannot cancel"),
        "{err}"
    );
    assert!(demo_order::apply_reply(&mut conn, "OrderShipped", o.id, None, None).unwrap());
    assert!(!demo_order::apply_reply(&mut conn, "OrderShipped", o.id, None, None).unwrap());
    let err = demo_order::cancel(&mut conn, o.id).unwrap_err();
    assert!(
        err.to_string().contains("is SHIPPED: cannot cancel"),
        "{err}"
    );
    // And the other way round: a cancelled order is never handed over.
    let (c, _) = demo_order::create(&mut conn, None, &new_order(1)).unwrap();
    demo_order::apply_reply(&mut conn, "InventoryReserved", c.id, None, Some("wh-a")).unwrap();
    demo_order::cancel(&mut conn, c.id).unwrap();
    let err = demo_order::fulfil(&mut conn, c.id).unwrap_err();
    assert!(
        err.to_string().contains("is CANCELLED: cannot ship"),
        "{err}"
    );
}

fn warehouse_db() -> TestDb {
    let db = TestDb::new().unwrap();
    warehouse::migrate(&mut db.conn().unwrap()).unwrap();
    db
}

fn record(conn: &mut PgConnection, sync: Sync, r: &Request) -> Outcome {
    warehouse::record(conn, "wh-a", sync, r).unwrap()
}

#[test]
fn a_warehouse_refuses_to_ship_what_it_does_not_hold_ships_an_order_once_and_pushes_through_its_outbox(
) {
    let db = warehouse_db();
    let mut conn = db.conn().unwrap();
    let inbound = Request::Inbound {
        product: "p1".into(),
        quantity: 5,
    };
    assert!(matches!(
        record(&mut conn, Sync::Push, &inbound),
        Outcome::Moved(_)
    ));
    let ship = |q| Request::Shipment {
        order_id: "o-1".into(),
        product: "p1".into(),
        quantity: q,
    };
    assert_eq!(
        record(&mut conn, Sync::Push, &ship(6)),
        Outcome::Short { on_hand: 5 }
    );
    let Outcome::Moved(m) = record(&mut conn, Sync::Push, &ship(2)) else {
        panic!()
    };
    assert_eq!(
        (m.kind.as_str(), m.delta, m.order_id.as_deref()),
        ("shipment", -2, Some("o-1"))
    );
    assert_eq!(
        record(&mut conn, Sync::Push, &ship(2)),
        Outcome::AlreadyShipped
    );
    let Outcome::Moved(t) = record(
        &mut conn,
        Sync::Push,
        &Request::Stocktake {
            product: "p1".into(),
            counted: 7,
        },
    ) else {
        panic!()
    };
    assert_eq!(t.delta, 4, "counted 7 where the books said 3");
    // The push path: one event per movement, in the movement's transaction.
    let events = Outbox::new().pending(&mut conn, 10).unwrap();
    assert_eq!(events.len(), 3);
    assert!(events
        .iter()
        .all(|e| e.topic == demo_inventory::PUSH_TOPIC && e.partition_key == "wh-a/p1"));
    // Bad input is named and moves nothing.
    for bad in [
        Request::Inbound {
            product: "p1".into(),
            quantity: 0,
        },
        Request::Stocktake {
            product: "p1".into(),
            counted: -1,
        },
        Request::Stocktake {
            product: "unknown".into(),
            counted: 1,
        },
    ] {
        assert!(
            warehouse::record(&mut conn, "wh-a", Sync::Push, &bad).is_err(),
            "{bad:?}"
        );
    }
    // The capture and pull paths write no event at all.
    record(&mut conn, Sync::Capture, &inbound);
    record(&mut conn, Sync::Pull, &inbound);
    assert_eq!(Outbox::new().pending(&mut conn, 10).unwrap().len(), 3);
}

/// The pull path's cursor: a movement whose transaction took its id first but commits after a
/// later one was already served is still served. The cursors of the article's pull ("changed
/// since the last sync time") and an id cursor skip it: the broken variants.
#[test]
fn the_pull_cursor_never_skips_a_late_commit_and_time_or_id_cursors_do() {
    let db = warehouse_db();
    let mut setup = db.conn().unwrap();
    record(
        &mut setup,
        Sync::Pull,
        &Request::Inbound {
            product: "p1".into(),
            quantity: 10,
        },
    );
    let (first, cursor) = pull_at_least(&mut setup, Cursor::default(), 1);
    assert_eq!(first.len(), 1);
    // Early: takes its id and created_at first, commits last.
    let mut early = db.conn().unwrap();
    // Held open: the warehouse code runs as a savepoint inside it.
    AnsiTransactionManager::begin_transaction(&mut early).unwrap();
    let Outcome::Moved(late_one) = warehouse::record(
        &mut early,
        "wh-a",
        Sync::Pull,
        &Request::Inbound {
            product: "p2".into(),
            quantity: 1,
        },
    )
    .unwrap() else {
        panic!()
    };
    let Outcome::Moved(quick) = record(
        &mut setup,
        Sync::Pull,
        &Request::Inbound {
            product: "p3".into(),
            quantity: 1,
        },
    ) else {
        panic!()
    };
    // While early is open: the commit-safe cursor serves nothing past it (quick waits too).
    let (served, c1) = warehouse::movements_after(&mut setup, cursor, 100).unwrap();
    assert!(served.is_empty(), "{served:?}");
    // The naive cursors serve quick now and move past early.
    #[derive(QueryableByName)]
    struct Max {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        at: String,
    }
    let naive: Max =
        diesel::sql_query("SELECT max(id) AS id, max(created_at)::text AS at FROM wh_movements")
            .get_result(&mut setup)
            .unwrap();
    AnsiTransactionManager::commit_transaction(&mut early).unwrap();
    let by_id: i64 = diesel::sql_query("SELECT count(*) AS n FROM wh_movements WHERE id > $1")
        .bind::<diesel::sql_types::BigInt, _>(naive.id)
        .get_result::<N>(&mut setup)
        .unwrap()
        .n;
    let by_time: i64 = diesel::sql_query(
        "SELECT count(*) AS n FROM wh_movements WHERE created_at > $1::timestamptz",
    )
    .bind::<diesel::sql_types::Text, _>(&naive.at)
    .get_result::<N>(&mut setup)
    .unwrap()
    .n;
    assert_eq!(
        (by_id, by_time),
        (0, 0),
        "broken variants: the late commit is behind both naive cursors"
    );
    // The commit-safe cursor serves both, the late one included, once.
    let (served, c2) = pull_at_least(&mut setup, c1, 2);
    let ids: Vec<uuid::Uuid> = served.iter().map(|m| m.movement_id).collect();
    assert!(
        ids.contains(&late_one.movement_id) && ids.contains(&quick.movement_id),
        "{served:?}"
    );
    let (again, _) = warehouse::movements_after(&mut setup, c2, 100).unwrap();
    assert!(again.is_empty());
    assert!("12".parse::<Cursor>().is_err());
}

/// Pulls from `cursor` until at least `want` movements were served (bounded: 30 s). The cursor
/// waits for the oldest writing transaction of the whole server, and other tests of this binary
/// write beside this one: a pull can come back empty for a moment (docs/DEMO.md known limits).
fn pull_at_least(
    conn: &mut PgConnection,
    mut cursor: Cursor,
    want: usize,
) -> (Vec<Movement>, Cursor) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut served = Vec::new();
    while served.len() < want && std::time::Instant::now() < deadline {
        let (more, next) = warehouse::movements_after(conn, cursor, 100).unwrap();
        served.extend(more);
        cursor = next;
        if served.len() < want {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    (served, cursor)
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[test]
fn a_change_capture_event_becomes_the_same_movement() {
    let m = movement("wh-a", "shipment", -2, Some("o-9"));
    let change = serde_json::json!({
        "v": 1, "op": "insert", "key": {"warehouse": "wh-a", "product": "p1"},
        "after": {
            "id": 7, "movement_id": m.movement_id.to_string(), "warehouse": "wh-a", "product": "p1",
            "kind": "shipment", "delta": -2, "on_hand_after": 3, "order_id": "o-9",
            "tx_id": "123", "created_at": m.created_at,
        },
    });
    assert_eq!(
        demo_inventory::movement_from_change(&change).unwrap(),
        Some(m)
    );
    let delete = serde_json::json!({"v": 1, "op": "delete", "before": {}});
    assert_eq!(demo_inventory::movement_from_change(&delete).unwrap(), None);
    let err = demo_inventory::movement_from_change(&serde_json::json!({"v": 2})).unwrap_err();
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn reconciliation_finds_a_lost_movement_and_injected_drift_and_repair_fixes_them_once() {
    let orders_db = order_db();
    let inventory_db = inventory_db(10);
    let wh_db = warehouse_db();
    let (mut orders, mut inventory, mut wh) = (
        orders_db.conn().unwrap(),
        inventory_db.conn().unwrap(),
        wh_db.conn().unwrap(),
    );
    // The warehouse's history: its first receipt reached the centre (as inventory_db applied
    // one of 10 units at wh-a; here the warehouse's own copy), a second one was lost (the dual
    // write: committed, never sent).
    let Outcome::Moved(first) = warehouse::record(
        &mut wh,
        "wh-a",
        Sync::Dual,
        &Request::Inbound {
            product: "p1".into(),
            quantity: 10,
        },
    )
    .unwrap() else {
        panic!()
    };
    diesel::sql_query("DELETE FROM movements")
        .execute(&mut inventory)
        .unwrap();
    diesel::sql_query("UPDATE stock SET on_hand = 0")
        .execute(&mut inventory)
        .unwrap();
    apply(&mut inventory, &first, "dual");
    let Outcome::Moved(lost) = warehouse::record(
        &mut wh,
        "wh-a",
        Sync::Dual,
        &Request::Inbound {
            product: "p1".into(),
            quantity: 5,
        },
    )
    .unwrap() else {
        panic!()
    };
    let settle = std::time::Duration::ZERO;
    let found =
        demo_inventory::reconcile::warehouse(&mut inventory, &mut wh, "wh-a", settle, false)
            .unwrap();
    assert_eq!(found.missing, vec![lost.movement_id.to_string()]);
    assert_eq!(
        found.on_hand_off,
        vec!["p1@wh-a: warehouse 15, centre 10".to_owned()]
    );
    // A movement younger than the settle window is in flight, not drift.
    let young = demo_inventory::reconcile::warehouse(
        &mut inventory,
        &mut wh,
        "wh-a",
        std::time::Duration::from_secs(3600),
        false,
    )
    .unwrap();
    assert!(young.missing.is_empty());
    let repaired =
        demo_inventory::reconcile::warehouse(&mut inventory, &mut wh, "wh-a", settle, true)
            .unwrap();
    assert_eq!(repaired.repaired, 1);
    let after = demo_inventory::reconcile::warehouse(&mut inventory, &mut wh, "wh-a", settle, true)
        .unwrap();
    assert!(
        after.missing.is_empty() && after.on_hand_off.is_empty(),
        "{after:?}"
    );
    assert_eq!(stock(&mut inventory, "wh-a"), three(15, 0));
    // The lost event arriving late after all is skipped (applied once) and marked.
    assert!(!apply(&mut inventory, &lost, "dual"));

    // Orders vs reservations: a consistent history, then a lost cancellation and a stock row
    // changed behind the movements' back.
    let reserve = |inv: &mut PgConnection, o: &demo_order::Order| {
        inv.transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::reserve(
                c,
                &OrderCreated {
                    order_id: o.id.to_string(),
                    product: o.product.clone(),
                    quantity: o.quantity,
                },
            )
        })
        .unwrap()
    };
    let (kept, _) = demo_order::create(&mut orders, None, &new_order(2)).unwrap();
    reserve(&mut inventory, &kept);
    demo_order::apply_reply(
        &mut orders,
        "InventoryReserved",
        kept.id,
        None,
        Some("wh-a"),
    )
    .unwrap();
    let clean = demo_inventory::reconcile::run(&mut orders, &mut inventory, false).unwrap();
    assert_eq!(clean.drift(), 0, "{clean:?}");
    let (lost_cancel, _) = demo_order::create(&mut orders, None, &new_order(1)).unwrap();
    reserve(&mut inventory, &lost_cancel);
    demo_order::apply_reply(
        &mut orders,
        "InventoryReserved",
        lost_cancel.id,
        None,
        Some("wh-a"),
    )
    .unwrap();
    demo_order::cancel(&mut orders, lost_cancel.id).unwrap(); // OrderCancelled never consumed
    diesel::sql_query("UPDATE stock SET on_hand = on_hand + 7")
        .execute(&mut inventory)
        .unwrap();
    let found = demo_inventory::reconcile::run(&mut orders, &mut inventory, false).unwrap();
    assert_eq!(
        found.holding_without_order,
        vec![lost_cancel.id.to_string()]
    );
    assert_eq!(found.stock_off.len(), 1, "{found:?}");
    let repaired = demo_inventory::reconcile::run(&mut orders, &mut inventory, true).unwrap();
    assert_eq!(repaired.repaired.len(), 2, "{:?}", repaired.repaired);
    let after = demo_inventory::reconcile::run(&mut orders, &mut inventory, false).unwrap();
    assert_eq!(after.drift(), 0, "{after:?}");
    assert_eq!(
        stock(&mut inventory, "wh-a"),
        three(15, 2),
        "15 on hand, 2 reserved by the kept order"
    );
}
