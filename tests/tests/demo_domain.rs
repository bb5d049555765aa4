//! The demo services' domain rules against real Postgres: idempotency keys, guarded order
//! transitions, stock never below zero under concurrency, restore exactly once.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};

use demo_inventory::{OrderCancelled, OrderCreated, Reply};
use demo_order::{Error, NewOrder};
use diesel::prelude::*;
use outbox::{Inbox, MessageRef, Outbox};
use outbox_tests::TestDb;

fn order_db() -> TestDb {
    let db = TestDb::new().unwrap();
    demo_order::migrate(&mut db.conn().unwrap()).unwrap();
    db
}

fn inventory_db(stock: i32) -> TestDb {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn().unwrap();
    demo_inventory::migrate(&mut conn).unwrap();
    demo_inventory::set_stock(&mut conn, "p1", stock).unwrap();
    db
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
    assert!(demo_order::apply_reply(&mut conn, "InventoryReserved", o.id, None).unwrap());
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
    assert!(!demo_order::apply_reply(&mut conn, "InventoryReserved", o.id, None).unwrap());
    let err = demo_order::cancel(&mut conn, o.id).unwrap_err();
    assert!(
        err.to_string().contains("is CANCELLED: cannot cancel"),
        "{err}"
    );
    // A rejected order cannot be cancelled or confirmed.
    let (r, _) = demo_order::create(&mut conn, None, &new_order(1)).unwrap();
    assert!(
        demo_order::apply_reply(&mut conn, "InventoryRejected", r.id, Some("no stock")).unwrap()
    );
    assert_eq!(
        demo_order::get(&mut conn, r.id).unwrap().reason.as_deref(),
        Some("no stock")
    );
    assert!(!demo_order::apply_reply(&mut conn, "InventoryReserved", r.id, None).unwrap());
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
        .filter(|r| matches!(r, Reply::InventoryReserved { .. }))
        .count();
    assert_eq!(
        reserved, 10,
        "exactly the stock, no retry storm, no oversell"
    );
    let mut conn = db.conn().unwrap();
    assert_eq!(demo_inventory::available(&mut conn, "p1").unwrap(), Some(0));
    assert_eq!(
        Outbox::new().pending(&mut conn, 100).unwrap().len(),
        25,
        "one reply per order"
    );
    let rejected = replies.iter().find_map(|r| match r {
        Reply::InventoryRejected { reason, .. } => Some(reason.clone()),
        Reply::InventoryReserved { .. } => None,
    });
    assert_eq!(
        rejected.as_deref(),
        Some("insufficient stock: 0 available, 1 requested")
    );
}

#[test]
fn each_order_deducts_once_and_restores_once_through_the_inbox() {
    let db = inventory_db(10);
    let mut conn = db.conn().unwrap();
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
    assert_eq!(demo_inventory::available(&mut conn, "p1").unwrap(), Some(7));
    let cancelled = OrderCancelled {
        order_id: "o-1".into(),
    };
    // The same cancellation delivered twice, and even processed under two message ids.
    for id in ["evt-cancel-1", "evt-cancel-1", "evt-cancel-other"] {
        inbox
            .process::<_, demo_inventory::Error, _>(&mut conn, &MessageRef::id(id), |c| {
                demo_inventory::restore(c, &cancelled)
            })
            .unwrap();
    }
    assert_eq!(
        demo_inventory::available(&mut conn, "p1").unwrap(),
        Some(10),
        "restored once"
    );
    // Cancelling an order that never reserved restores nothing.
    let none = conn
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::restore(
                c,
                &OrderCancelled {
                    order_id: "never".into(),
                },
            )
        })
        .unwrap();
    assert_eq!(none, 0);
    let unknown = conn
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::reserve(
                c,
                &OrderCreated {
                    order_id: "o-2".into(),
                    product: "nope".into(),
                    quantity: 1,
                },
            )
        })
        .unwrap();
    assert!(
        matches!(unknown, Reply::InventoryRejected { ref reason, .. } if reason == "unknown product nope")
    );
}

#[test]
fn reconcile_finds_injected_drift_and_repair_fixes_it() {
    let orders_db = order_db();
    let inventory_db = inventory_db(10);
    let (mut orders, mut inventory) = (orders_db.conn().unwrap(), inventory_db.conn().unwrap());
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
    // A consistent history: one confirmed order, one cancelled and restored.
    let (kept, _) = demo_order::create(&mut orders, None, &new_order(2)).unwrap();
    reserve(&mut inventory, &kept);
    demo_order::apply_reply(&mut orders, "InventoryReserved", kept.id, None).unwrap();
    let (gone, _) = demo_order::create(&mut orders, None, &new_order(3)).unwrap();
    reserve(&mut inventory, &gone);
    demo_order::apply_reply(&mut orders, "InventoryReserved", gone.id, None).unwrap();
    demo_order::cancel(&mut orders, gone.id).unwrap();
    inventory
        .transaction::<_, demo_inventory::Error, _>(|c| {
            demo_inventory::restore(
                c,
                &OrderCancelled {
                    order_id: gone.id.to_string(),
                },
            )
        })
        .unwrap();
    let clean = demo_inventory::reconcile::run(&mut orders, &mut inventory, false).unwrap();
    assert_eq!(clean.drift(), 0, "{clean:?}");

    // Broken: a cancellation whose message was lost (the dual-write bug), and a stock row
    // changed behind the ledger's back.
    let (lost, _) = demo_order::create(&mut orders, None, &new_order(1)).unwrap();
    reserve(&mut inventory, &lost);
    demo_order::apply_reply(&mut orders, "InventoryReserved", lost.id, None).unwrap();
    demo_order::cancel(&mut orders, lost.id).unwrap(); // OrderCancelled never consumed
    diesel::sql_query("UPDATE stock SET available = available + 7")
        .execute(&mut inventory)
        .unwrap();
    let found = demo_inventory::reconcile::run(&mut orders, &mut inventory, false).unwrap();
    assert_eq!(found.cancelled_not_restored, vec![lost.id.to_string()]);
    assert_eq!(found.stock_vs_ledger.len(), 1, "{found:?}");
    assert!(found.drift() >= 2);

    let repaired = demo_inventory::reconcile::run(&mut orders, &mut inventory, true).unwrap();
    assert_eq!(repaired.repaired.len(), 2, "{:?}", repaired.repaired);
    let after = demo_inventory::reconcile::run(&mut orders, &mut inventory, false).unwrap();
    assert_eq!(after.drift(), 0, "{after:?}");
    assert_eq!(
        demo_inventory::available(&mut inventory, "p1").unwrap(),
        Some(8),
        "10 - 2 confirmed"
    );
}
