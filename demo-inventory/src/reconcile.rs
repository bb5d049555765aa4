//! The "nightly check" of classic designs, in two parts:
//!
//! - [`run`]: orders (order database) against reservations and stock (inventory centre): every
//!   confirmed order holds a reservation, a shipped one a shipped reservation, a cancelled or
//!   rejected one none; each product's reserved units are its open reservations, its on hand the
//!   sum of its applied movements;
//! - [`warehouses`]: each warehouse's movements against those the centre applied: a movement
//!   older than the settle window and missing in the centre is drift (the dual write loses them);
//!   `repair` applies it (once, by its id), and on hand per product is compared.
//!
//! With the outbox, change capture or the commit-safe pull it should find nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use crate::Error;

#[derive(QueryableByName)]
struct OrderRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    status: String,
}

#[derive(QueryableByName)]
struct ReservationRow {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    state: String,
}

#[derive(QueryableByName)]
struct StockOff {
    #[diesel(sql_type = Text)]
    what: String,
}

/// What the orders-vs-centre check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Orders per status.
    pub orders_by_status: HashMap<String, i64>,
    /// Confirmed orders without an open reservation.
    pub confirmed_without_reservation: Vec<String>,
    /// Shipped orders whose reservation is not shipped.
    pub shipped_without_shipment: Vec<String>,
    /// Rejected or cancelled orders that still hold a reservation.
    pub holding_without_order: Vec<String>,
    /// Reservations whose order does not exist.
    pub orphan_reservations: Vec<String>,
    /// Cancelled orders whose reservation shipped (a cancellation accepted too late).
    pub cancelled_but_shipped: Vec<String>,
    /// Orders still CONFIRMED or SHIPPING whose reservation shipped (the order service never
    /// heard of the shipment: a lost or dead-lettered OrderShipped; drift once nothing is in
    /// flight).
    pub order_behind_shipment: Vec<String>,
    /// Shipments of orders that held no reservation (cancelled while shipping: a return case).
    pub unreserved_shipments: i64,
    /// Stock rows whose reserved or on hand differ from the reservations and movements.
    pub stock_off: Vec<String>,
    /// Stock rows with less on hand than reserved (promised more than the warehouse holds).
    pub oversold: Vec<String>,
    /// What `repair` changed.
    pub repaired: Vec<String>,
}

impl Report {
    /// Number of drift findings.
    #[must_use]
    pub fn drift(&self) -> usize {
        self.confirmed_without_reservation.len()
            + self.shipped_without_shipment.len()
            + self.holding_without_order.len()
            + self.orphan_reservations.len()
            + self.cancelled_but_shipped.len()
            + self.order_behind_shipment.len()
            + usize::try_from(self.unreserved_shipments).unwrap_or(usize::MAX)
            + self.stock_off.len()
            + self.oversold.len()
    }
}

/// Runs the orders-vs-centre check; with `repair`, releases the reservations of cancelled and
/// rejected orders, then recomputes each stock row's reserved and on hand from the reservations
/// and movements (one transaction).
///
/// # Errors
/// [`Error::Database`].
pub fn run(
    orders: &mut PgConnection,
    inventory: &mut PgConnection,
    repair: bool,
) -> Result<Report, Error> {
    let order_rows: Vec<OrderRow> =
        diesel::sql_query("SELECT id::text AS id, status FROM orders").load(orders)?;
    let reservations: Vec<ReservationRow> =
        diesel::sql_query("SELECT order_id, state FROM reservations").load(inventory)?;
    let mut report = Report::default();
    let by_order: HashMap<&str, &str> = reservations
        .iter()
        .map(|r| (r.order_id.as_str(), r.state.as_str()))
        .collect();
    let known: HashSet<&str> = order_rows.iter().map(|o| o.id.as_str()).collect();
    for o in &order_rows {
        *report.orders_by_status.entry(o.status.clone()).or_default() += 1;
        let state = by_order.get(o.id.as_str()).copied();
        match (o.status.as_str(), state) {
            ("CONFIRMED" | "SHIPPING", Some("RESERVED")) | ("SHIPPED", Some("SHIPPED")) => {}
            ("CONFIRMED" | "SHIPPING", Some("SHIPPED")) => {
                report.order_behind_shipment.push(o.id.clone());
            }
            ("CANCELLED", Some("SHIPPED")) => report.cancelled_but_shipped.push(o.id.clone()),
            ("CONFIRMED" | "SHIPPING", _) => {
                report.confirmed_without_reservation.push(o.id.clone());
            }
            ("SHIPPED", _) => report.shipped_without_shipment.push(o.id.clone()),
            ("REJECTED" | "CANCELLED", Some("RESERVED")) => {
                report.holding_without_order.push(o.id.clone());
            }
            _ => {}
        }
    }
    for r in &reservations {
        if !known.contains(r.order_id.as_str()) {
            report.orphan_reservations.push(r.order_id.clone());
        }
    }
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    report.unreserved_shipments =
        diesel::sql_query("SELECT count(*) AS n FROM movements WHERE unreserved")
            .get_result::<N>(inventory)?
            .n;
    const EXPECTED: &str = "SELECT s.product, s.warehouse, s.on_hand, s.reserved, \
            coalesce((SELECT sum(quantity) FROM reservations r WHERE r.product = s.product \
                      AND r.warehouse = s.warehouse AND r.state = 'RESERVED'), 0)::int AS want_reserved, \
            coalesce((SELECT sum(delta) FROM movements m WHERE m.product = s.product \
                      AND m.warehouse = s.warehouse), 0)::int AS want_on_hand \
         FROM stock s";
    report.stock_off = diesel::sql_query(format!(
        "SELECT format('%s@%s reserved %s (reservations say %s), on hand %s (movements say %s)', \
                product, warehouse, reserved, want_reserved, on_hand, want_on_hand) AS what \
         FROM ({EXPECTED}) e WHERE reserved <> want_reserved OR on_hand <> want_on_hand"
    ))
    .load::<StockOff>(inventory)?
    .into_iter()
    .map(|s| s.what)
    .collect();
    report.oversold = diesel::sql_query(
        "SELECT format('%s@%s on hand %s, reserved %s', product, warehouse, on_hand, reserved) AS what \
         FROM stock WHERE available < 0",
    )
    .load::<StockOff>(inventory)?
    .into_iter()
    .map(|s| s.what)
    .collect();
    if repair {
        // A cancellation or rejection whose release never happened (its message lost): the
        // reservation is released now, through the same once-only transition.
        for id in &report.holding_without_order {
            let r = inventory.transaction(|c| {
                crate::release(
                    c,
                    &crate::OrderCancelled {
                        order_id: id.clone(),
                    },
                )
            })?;
            report
                .repaired
                .push(format!("released the reservation of order {id} ({r:?})"));
        }
    }
    if repair && !report.stock_off.is_empty() {
        let n = inventory.transaction(|c| {
            diesel::sql_query(format!(
                "UPDATE stock s SET reserved = e.want_reserved, on_hand = e.want_on_hand \
                 FROM ({EXPECTED}) e WHERE s.product = e.product AND s.warehouse = e.warehouse \
                 AND (s.reserved <> e.want_reserved OR s.on_hand <> e.want_on_hand)"
            ))
            .execute(c)
        })?;
        report.repaired.push(format!(
            "recomputed {n} stock rows from reservations and movements"
        ));
    }
    Ok(report)
}

/// What the warehouse-vs-centre check found for one warehouse.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WarehouseReport {
    /// The warehouse.
    pub warehouse: String,
    /// Movements the warehouse committed before the settle window that the centre never applied.
    pub missing: Vec<String>,
    /// Of those, applied by `repair`.
    pub repaired: usize,
    /// Products whose on hand differs between the warehouse and the centre (meaningful when no
    /// movement is in flight: at the end of a run).
    pub on_hand_off: Vec<String>,
}

/// Compares one warehouse's movements with the centre's: a movement older than `settle` that
/// the centre has not applied is drift; with `repair` it is applied (path `repair`, once by its
/// id). Records the run in `reconcile_runs`.
///
/// # Errors
/// [`Error::Database`], [`Error::Outbox`].
pub fn warehouse(
    inventory: &mut PgConnection,
    warehouse_db: &mut PgConnection,
    name: &str,
    settle: Duration,
    repair: bool,
) -> Result<WarehouseReport, Error> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = Text)]
        id: String,
    }
    let secs = settle.as_secs_f64();
    let theirs: Vec<Id> = diesel::sql_query(
        "SELECT movement_id::text AS id FROM wh_movements \
         WHERE warehouse = $1 AND created_at < clock_timestamp() - make_interval(secs => $2)",
    )
    .bind::<Text, _>(name)
    .bind::<diesel::sql_types::Double, _>(secs)
    .load(warehouse_db)?;
    let ours: HashSet<String> =
        diesel::sql_query("SELECT movement_id::text AS id FROM movements WHERE warehouse = $1")
            .bind::<Text, _>(name)
            .load::<Id>(inventory)?
            .into_iter()
            .map(|i| i.id)
            .collect();
    let mut report = WarehouseReport {
        warehouse: name.to_owned(),
        missing: theirs
            .into_iter()
            .map(|i| i.id)
            .filter(|id| !ours.contains(id))
            .collect(),
        ..WarehouseReport::default()
    };
    if repair && !report.missing.is_empty() {
        let (moves, _) = crate::warehouse::movements_by_id(warehouse_db, &report.missing)?;
        for m in &moves {
            if inventory.transaction(|c| crate::apply_movement(c, m, "repair"))? {
                report.repaired += 1;
            }
        }
    }
    #[derive(QueryableByName)]
    struct Hand {
        #[diesel(sql_type = Text)]
        product: String,
        #[diesel(sql_type = Integer)]
        on_hand: i32,
    }
    let load = |c: &mut PgConnection, table: &str| -> Result<HashMap<String, i32>, Error> {
        Ok(diesel::sql_query(format!(
            "SELECT product, on_hand FROM {table} WHERE warehouse = $1"
        ))
        .bind::<Text, _>(name)
        .load::<Hand>(c)?
        .into_iter()
        .map(|h| (h.product, h.on_hand))
        .collect())
    };
    let (wh, centre) = (load(warehouse_db, "wh_stock")?, load(inventory, "stock")?);
    let mut off: Vec<String> = wh
        .iter()
        .filter(|(p, n)| centre.get(*p) != Some(n))
        .map(|(p, n)| {
            format!(
                "{p}@{name}: warehouse {n}, centre {}",
                centre.get(p).map_or("none".into(), i32::to_string)
            )
        })
        .collect();
    off.sort();
    report.on_hand_off = off;
    diesel::sql_query(
        "INSERT INTO reconcile_runs (warehouse, missing, repaired, on_hand_off) VALUES ($1, $2, $3, $4)",
    )
    .bind::<Text, _>(name)
    .bind::<Integer, _>(i32::try_from(report.missing.len()).unwrap_or(i32::MAX))
    .bind::<Integer, _>(i32::try_from(report.repaired).unwrap_or(i32::MAX))
    .bind::<Integer, _>(i32::try_from(report.on_hand_off.len()).unwrap_or(i32::MAX))
    .execute(inventory)?;
    Ok(report)
}
