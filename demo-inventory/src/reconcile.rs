//! The "nightly check" of classic designs: compare orders (order database), the stock ledger and
//! the stock (inventory database), report drift and optionally repair it. With the outbox and the
//! inbox in place it should find none.

use std::collections::HashMap;

use diesel::sql_types::{Integer, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use crate::Error;

#[derive(QueryableByName)]
struct OrderRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    product: String,
    #[diesel(sql_type = Integer)]
    quantity: i32,
    #[diesel(sql_type = Text)]
    status: String,
}

#[derive(QueryableByName)]
struct LedgerRow {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    product: String,
    #[diesel(sql_type = Integer)]
    delta: i32,
    #[diesel(sql_type = Text)]
    kind: String,
}

#[derive(QueryableByName)]
struct StockRow {
    #[diesel(sql_type = Text)]
    product: String,
    #[diesel(sql_type = Integer)]
    available: i32,
}

/// Expected and actual stock of one product.
#[derive(Debug, Clone, Serialize)]
pub struct ProductStock {
    /// Product.
    pub product: String,
    /// Initial stock.
    pub initial: i64,
    /// initial - units of CONFIRMED orders.
    pub expected: i64,
    /// `stock.available`.
    pub actual: i64,
}

/// What the check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Orders per status.
    pub orders_by_status: HashMap<String, i64>,
    /// Products whose stock differs from the sum of their ledger.
    pub stock_vs_ledger: Vec<String>,
    /// Confirmed orders without a reservation, or with a restore.
    pub confirmed_without_reservation: Vec<String>,
    /// Rejected orders that hold a reservation.
    pub rejected_with_reservation: Vec<String>,
    /// Cancelled orders whose reservation was not restored.
    pub cancelled_not_restored: Vec<String>,
    /// Reservations whose order does not exist.
    pub orphan_reservations: Vec<String>,
    /// Per product: expected vs actual.
    pub products: Vec<ProductStock>,
    /// What `--repair` changed.
    pub repaired: Vec<String>,
}

impl Report {
    /// Number of drift findings.
    #[must_use]
    pub fn drift(&self) -> usize {
        self.stock_vs_ledger.len()
            + self.confirmed_without_reservation.len()
            + self.rejected_with_reservation.len()
            + self.cancelled_not_restored.len()
            + self.orphan_reservations.len()
            + self
                .products
                .iter()
                .filter(|p| p.expected != p.actual)
                .count()
    }
}

/// Runs the check; with `repair`, fixes what can be fixed from the ledger (stock rows, missing
/// restores of cancelled or rejected orders) in one transaction.
///
/// # Errors
/// [`Error::Database`].
pub fn run(
    orders: &mut PgConnection,
    inventory: &mut PgConnection,
    repair: bool,
) -> Result<Report, Error> {
    let order_rows: Vec<OrderRow> =
        diesel::sql_query("SELECT id::text AS id, product, quantity, status FROM orders")
            .load(orders)?;
    let ledger: Vec<LedgerRow> =
        diesel::sql_query("SELECT order_id, product, delta, kind FROM stock_ledger")
            .load(inventory)?;
    let stock: Vec<StockRow> =
        diesel::sql_query("SELECT product, available FROM stock").load(inventory)?;

    let mut report = Report::default();
    let ledger = Ledger::index(&ledger);
    let confirmed_units = check_orders(&mut report, &order_rows, &ledger);
    check_orphans(&mut report, &order_rows, &ledger);
    check_stock(&mut report, &stock, &ledger, &confirmed_units);
    if repair {
        repair_from_ledger(inventory, &mut report)?;
    }
    Ok(report)
}

/// The stock ledger by order and by product.
struct Ledger<'a> {
    /// Reservations by order id.
    reserved: HashMap<&'a str, &'a LedgerRow>,
    /// Restores by order id.
    restored: HashMap<&'a str, &'a LedgerRow>,
    /// Sum of all deltas by product.
    sum: HashMap<&'a str, i64>,
    /// Initial stock by product.
    initial: HashMap<&'a str, i64>,
}

impl<'a> Ledger<'a> {
    fn index(rows: &'a [LedgerRow]) -> Self {
        let mut ledger = Self {
            reserved: HashMap::new(),
            restored: HashMap::new(),
            sum: HashMap::new(),
            initial: HashMap::new(),
        };
        for l in rows {
            *ledger.sum.entry(&l.product).or_default() += i64::from(l.delta);
            match l.kind.as_str() {
                "reserve" => {
                    ledger.reserved.insert(&l.order_id, l);
                }
                "restore" => {
                    ledger.restored.insert(&l.order_id, l);
                }
                _ => {
                    ledger.initial.insert(&l.product, i64::from(l.delta));
                }
            }
        }
        ledger
    }
}

/// Counts orders per status and finds those whose reservation does not match their status;
/// returns the confirmed units per product.
fn check_orders<'a>(
    report: &mut Report,
    order_rows: &'a [OrderRow],
    ledger: &Ledger<'_>,
) -> HashMap<&'a str, i64> {
    let mut confirmed_units: HashMap<&str, i64> = HashMap::new();
    for o in order_rows {
        *report.orders_by_status.entry(o.status.clone()).or_default() += 1;
        let (res, rest) = (
            ledger.reserved.contains_key(o.id.as_str()),
            ledger.restored.contains_key(o.id.as_str()),
        );
        match o.status.as_str() {
            "CONFIRMED" => {
                *confirmed_units.entry(&o.product).or_default() += i64::from(o.quantity);
                if !res || rest {
                    report.confirmed_without_reservation.push(o.id.clone());
                }
            }
            "REJECTED" if res && !rest => report.rejected_with_reservation.push(o.id.clone()),
            "CANCELLED" if res && !rest => report.cancelled_not_restored.push(o.id.clone()),
            _ => {}
        }
    }
    confirmed_units
}

/// Reservations whose order does not exist.
fn check_orphans(report: &mut Report, order_rows: &[OrderRow], ledger: &Ledger<'_>) {
    let known: std::collections::HashSet<&str> = order_rows.iter().map(|o| o.id.as_str()).collect();
    for id in ledger.reserved.keys() {
        if !known.contains(id) {
            report.orphan_reservations.push((*id).to_owned());
        }
    }
}

/// Stock against its ledger, and expected against actual stock, per product.
fn check_stock(
    report: &mut Report,
    stock: &[StockRow],
    ledger: &Ledger<'_>,
    confirmed_units: &HashMap<&str, i64>,
) {
    for s in stock {
        let sum = ledger.sum.get(s.product.as_str()).copied().unwrap_or(0);
        if sum != i64::from(s.available) {
            report.stock_vs_ledger.push(format!(
                "{}: stock {} vs ledger {sum}",
                s.product, s.available
            ));
        }
        let init = ledger.initial.get(s.product.as_str()).copied().unwrap_or(0);
        report.products.push(ProductStock {
            product: s.product.clone(),
            initial: init,
            expected: init
                - confirmed_units
                    .get(s.product.as_str())
                    .copied()
                    .unwrap_or(0),
            actual: i64::from(s.available),
        });
    }
    report.products.sort_by(|a, b| a.product.cmp(&b.product));
}

/// In one transaction: restores the reservations of cancelled and rejected orders, and resets
/// stock rows to their ledger sum; records what it changed in `report.repaired`.
fn repair_from_ledger(inventory: &mut PgConnection, report: &mut Report) -> Result<(), Error> {
    let to_release: Vec<String> = report
        .cancelled_not_restored
        .iter()
        .chain(&report.rejected_with_reservation)
        .cloned()
        .collect();
    inventory.transaction::<_, Error, _>(|c| {
        for id in &to_release {
            crate::restore(
                c,
                &crate::OrderCancelled {
                    order_id: id.clone(),
                },
            )?;
            report
                .repaired
                .push(format!("restored the reservation of order {id}"));
        }
        let n = diesel::sql_query(
            "UPDATE stock s SET available = l.total FROM \
             (SELECT product, sum(delta)::int AS total FROM stock_ledger GROUP BY product) l \
             WHERE s.product = l.product AND s.available <> l.total",
        )
        .execute(c)?;
        if n > 0 {
            report
                .repaired
                .push(format!("reset {n} stock rows to their ledger sum"));
        }
        Ok(())
    })
}
