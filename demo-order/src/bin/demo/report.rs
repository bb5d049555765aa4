//! Step 7: the report table and the verdict line.

use std::sync::atomic::Ordering;

use anyhow::Result;
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};

use crate::chaos::Chaos;
use crate::load::Counters;
use crate::scratch::Conns;
use crate::{count, Services};

/// How settling ended.
pub(crate) struct Settled {
    /// Every order decided, both outboxes empty and `reconcile` content, before the deadline.
    pub(crate) ok: bool,
    /// The last `reconcile --json` report (null when it never ran).
    pub(crate) reconcile: serde_json::Value,
    /// Seconds from the end of the load.
    pub(crate) secs: f64,
}

/// What the run gathered for the report (the rest it measures itself).
pub(crate) struct Figures<'a> {
    pub(crate) counters: &'a Counters,
    pub(crate) chaos: &'a Chaos,
    pub(crate) settled: &'a Settled,
    pub(crate) load_secs: f64,
}

#[derive(QueryableByName)]
struct Status {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Latency {
    #[diesel(sql_type = Nullable<Double>)]
    p50: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    p90: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    p99: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    max: Option<f64>,
}

/// What the services and the databases say at the end.
struct Measured {
    order_stats: serde_json::Value,
    inventory_stats: serde_json::Value,
    statuses: Vec<Status>,
    latency: Latency,
    min_stock: i64,
}

impl Measured {
    fn collect(services: &Services, conns: &mut Conns) -> Result<Self> {
        let order_stats = services.stats(&services.order_api);
        let inventory_stats = services.stats(&services.inventory_api);
        let statuses: Vec<Status> = diesel::sql_query(
            "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status",
        )
        .load(&mut conns.orders)?;
        let latency: Latency = diesel::sql_query(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50, percentile_cont(0.9) WITHIN GROUP (ORDER BY s) AS p90, \
             percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99, max(s) AS max FROM \
             (SELECT extract(epoch FROM confirmed_at - created_at)::float8 * 1000 AS s FROM orders \
             WHERE confirmed_at IS NOT NULL AND user_id <> 'warmup') t",
        )
        .get_result(&mut conns.orders)?;
        let min_stock = count(
            &mut conns.inventory,
            "SELECT coalesce(min(available), 0)::bigint AS n FROM stock",
        )?;
        Ok(Self {
            order_stats,
            inventory_stats,
            statuses,
            latency,
            min_stock,
        })
    }
}

fn line(k: &str, v: String) {
    println!("| {k:<46} | {v:>22} |");
}

fn rule() {
    println!("|{}|{}|", "-".repeat(48), "-".repeat(24));
}

/// Measures, prints the table, the chaos log and the verdict; returns whether the run was
/// consistent.
pub(crate) fn print(services: &Services, conns: &mut Conns, f: &Figures<'_>) -> Result<bool> {
    let m = Measured::collect(services, conns)?;
    let c = f.counters;
    println!();
    println!("| {:<46} | {:>22} |", "", "");
    rule();
    for s in &m.statuses {
        line(&format!("orders {}", s.status), s.n.to_string());
    }
    line(
        "orders placed (HTTP 201, warm-up not counted)",
        c.created.load(Ordering::Relaxed).to_string(),
    );
    let class_ok = print_stock_classes(&f.settled.reconcile);
    line(
        "lowest stock of any product (never < 0)",
        m.min_stock.to_string(),
    );
    print_client_figures(c);
    print_consumer_figures(&m, f.chaos);
    let drift = print_drift(&f.settled.reconcile);
    line(
        "client errors",
        c.errors.load(Ordering::Relaxed).to_string(),
    );
    line(
        "load / settle time",
        format!("{:.1} s / {:.1} s", f.load_secs, f.settled.secs),
    );
    for e in &f.chaos.log {
        println!("chaos: {e}");
    }
    let ok = f.settled.ok
        && drift == 0
        && class_ok
        && m.min_stock >= 0
        && c.errors.load(Ordering::Relaxed) == 0;
    println!();
    println!(
        "{}",
        if ok {
            "CONSISTENT: every order decided once, stock = initial - confirmed, no drift, nothing lost."
        } else {
            "INCONSISTENT: see the report above and the logs"
        }
    );
    Ok(ok)
}

/// Initial, expected and actual stock per product class; whether expected = actual for both.
fn print_stock_classes(reconcile: &serde_json::Value) -> bool {
    let mut class_ok = true;
    for class in ["scarce-", "ample-"] {
        let products: Vec<&serde_json::Value> = reconcile["products"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["product"].as_str().is_some_and(|n| n.starts_with(class)))
                    .collect()
            })
            .unwrap_or_default();
        let sum = |k: &str| products.iter().filter_map(|p| p[k].as_i64()).sum::<i64>();
        let (initial, expected, actual) = (sum("initial"), sum("expected"), sum("actual"));
        class_ok &= expected == actual;
        line(
            &format!(
                "stock {}* initial / expected / actual",
                class.trim_end_matches('-')
            ),
            format!("{initial} / {expected} / {actual}"),
        );
    }
    class_ok
}

fn print_client_figures(c: &Counters) {
    line(
        "repeat submissions answered by Idempotency-Key",
        c.idempotent_repeats.load(Ordering::Relaxed).to_string(),
    );
    line(
        "client retries after transport errors",
        c.retries.load(Ordering::Relaxed).to_string(),
    );
    line(
        "cancellations accepted / refused (409)",
        format!(
            "{} / {}",
            c.cancels.load(Ordering::Relaxed),
            c.cancel_refused.load(Ordering::Relaxed)
        ),
    );
}

/// The consumers' redeliveries and dead letters (with those of killed processes), and the
/// confirmation latency.
fn print_consumer_figures(m: &Measured, chaos: &Chaos) {
    let (banked_dups, banked_dead) = chaos.banked;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    for (what, key, banked) in [
        (
            "inbox redeliveries absorbed (order, inventory)",
            "duplicates",
            banked_dups,
        ),
        (
            "dead-lettered messages (order, inventory)",
            "dead_lettered",
            banked_dead,
        ),
    ] {
        line(
            what,
            format!(
                "{} / {}",
                n(&m.order_stats[key]),
                n(&m.inventory_stats[key]) + banked
            ),
        );
    }
    let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"));
    let lat = &m.latency;
    line(
        "created -> confirmed p50 / p90",
        format!("{} / {}", ms(lat.p50), ms(lat.p90)),
    );
    line(
        "created -> confirmed p99 / max",
        format!("{} / {}", ms(lat.p99), ms(lat.max)),
    );
}

/// The drift `reconcile` found (0 when it never ran, shown as "not run").
fn print_drift(reconcile: &serde_json::Value) -> usize {
    let drift = [
        "stock_vs_ledger",
        "confirmed_without_reservation",
        "rejected_with_reservation",
        "cancelled_not_restored",
        "orphan_reservations",
    ]
    .iter()
    .map(|k| reconcile[k].as_array().map_or(0, Vec::len))
    .sum::<usize>();
    line(
        "reconcile drift (orders vs ledger vs stock)",
        if reconcile.is_null() {
            "not run".into()
        } else {
            drift.to_string()
        },
    );
    drift
}
