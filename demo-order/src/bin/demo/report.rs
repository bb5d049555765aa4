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
    /// The stated order rate.
    pub(crate) rate: f64,
    /// The timeline the sampler took.
    pub(crate) samples: Vec<demo_order::report_html::Sample>,
    pub(crate) started: std::time::Instant,
    /// The database's clock when the load began (the seed's movements are left out).
    pub(crate) load_start: &'a str,
    /// Where the HTML report goes.
    pub(crate) html: &'a std::path::Path,
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

#[derive(QueryableByName)]
struct PathRow {
    #[diesel(sql_type = BigInt)]
    applied: i64,
    #[diesel(sql_type = BigInt)]
    repaired: i64,
    #[diesel(sql_type = Nullable<Double>)]
    p50: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    p99: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    max: Option<f64>,
}

/// One sync path's figures.
struct PathFigures {
    path: String,
    row: PathRow,
    /// Movements the path lost: found missing by a reconciliation, repaired, and never
    /// delivered by the path afterwards.
    drift_found: i64,
    /// Movements a reconciliation applied before the path delivered them (its settle window
    /// shorter than an outage); the path's copy was then skipped (applied once).
    ahead: i64,
    /// Products whose on hand differs between warehouse and centre at the end.
    on_hand_off: usize,
}

fn path_figures(
    conns: &mut Conns,
    reconcile: &serde_json::Value,
    load_start: &str,
) -> Result<Vec<PathFigures>> {
    let mut out = Vec::new();
    let paths: Vec<String> = conns.warehouses.iter().map(|(p, _)| p.clone()).collect();
    for path in paths {
        let name = format!("wh-{path}");
        let row: PathRow = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE path <> 'repair') AS applied, \
                    count(*) FILTER (WHERE path = 'repair') AS repaired, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE path <> 'repair') AS p50, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY d) FILTER (WHERE path <> 'repair') AS p99, \
                    max(d) FILTER (WHERE path <> 'repair') AS max \
             FROM (SELECT CASE WHEN arrived_by IS NULL THEN path ELSE arrived_by END AS path, \
                          extract(epoch FROM coalesce(arrived_at, applied_at) - created_at)::float8 * 1000 AS d \
                   FROM movements WHERE warehouse = $1 AND created_at >= $2::timestamptz) m",
        )
        .bind::<Text, _>(&name)
        .bind::<Text, _>(load_start)
        .get_result(&mut conns.inventory)?;
        let drift_found = count(
            &mut conns.inventory,
            &format!("SELECT count(*) AS n FROM movements WHERE warehouse = '{name}' AND path = 'repair' AND arrived_by IS NULL AND created_at >= '{load_start}'::timestamptz"),
        )?;
        let ahead = count(
            &mut conns.inventory,
            &format!("SELECT count(*) AS n FROM movements WHERE warehouse = '{name}' AND path = 'repair' AND arrived_by IS NOT NULL AND created_at >= '{load_start}'::timestamptz"),
        )?;
        let on_hand_off = reconcile["warehouses"]
            .as_array()
            .and_then(|a| a.iter().find(|w| w["warehouse"] == name.as_str()))
            .map_or(0, |w| w["on_hand_off"].as_array().map_or(0, Vec::len));
        out.push(PathFigures {
            path,
            row,
            drift_found,
            ahead,
            on_hand_off,
        });
    }
    Ok(out)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

/// The per-path table (one column per path); returns its rows for the HTML report.
fn print_paths(paths: &[PathFigures], load_secs: f64) -> (Vec<String>, Vec<(String, Vec<String>)>) {
    let columns: Vec<String> = paths.iter().map(|p| p.path.clone()).collect();
    #[allow(clippy::cast_precision_loss)]
    let rows: Vec<(String, Vec<String>)> = vec![
        (
            "movements applied by their path".into(),
            paths.iter().map(|p| p.row.applied.to_string()).collect(),
        ),
        (
            "sync delay p50 (warehouse write -> centre)".into(),
            paths.iter().map(|p| ms(p.row.p50)).collect(),
        ),
        (
            "sync delay p99".into(),
            paths.iter().map(|p| ms(p.row.p99)).collect(),
        ),
        (
            "sync delay max".into(),
            paths.iter().map(|p| ms(p.row.max)).collect(),
        ),
        (
            "lost by the path (drift reconciliation repaired)".into(),
            paths.iter().map(|p| p.drift_found.to_string()).collect(),
        ),
        (
            "repaired before the path caught up (not lost)".into(),
            paths.iter().map(|p| p.ahead.to_string()).collect(),
        ),
        (
            "accuracy (not lost by the path / all)".into(),
            paths
                .iter()
                .map(|p| {
                    let all = p.row.applied + p.row.repaired;
                    if all == 0 {
                        "-".into()
                    } else {
                        format!("{:.3}%", (all - p.drift_found) as f64 * 100.0 / all as f64)
                    }
                })
                .collect(),
        ),
        (
            "on hand off at the end (effect lost or twice)".into(),
            paths.iter().map(|p| p.on_hand_off.to_string()).collect(),
        ),
        (
            "throughput (movements/s over the load)".into(),
            paths
                .iter()
                .map(|p| format!("{:.1}", p.row.applied as f64 / load_secs.max(0.001)))
                .collect(),
        ),
    ];
    println!();
    let width = 12;
    print!("| {:<44} |", "sync path");
    for c in &columns {
        print!(" {c:>width$} |");
    }
    println!();
    print!("|{}|", "-".repeat(46));
    for _ in &columns {
        print!("{}|", "-".repeat(width + 2));
    }
    println!();
    for (k, cells) in &rows {
        print!("| {k:<44} |");
        for c in cells {
            print!(" {c:>width$} |");
        }
        println!();
    }
    (columns, rows)
}

/// Measures, prints the tables, the chaos log and the verdict, writes the HTML report; returns
/// whether the run was consistent.
pub(crate) fn print(services: &Services, conns: &mut Conns, f: &Figures<'_>) -> Result<bool> {
    let m = Measured::collect(services, conns)?;
    let c = f.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    println!();
    println!("| {:<46} | {:>22} |", "", "");
    rule();
    for s in &m.statuses {
        line(&format!("orders {}", s.status), s.n.to_string());
    }
    line(
        "orders placed (HTTP 201, warm-up not counted)",
        get(&c.created).to_string(),
    );
    #[allow(clippy::cast_precision_loss)]
    let achieved = get(&c.created) as f64 / f.load_secs.max(0.001);
    line(
        "rate stated / achieved (orders/s)",
        format!("{:.0} / {achieved:.1}", f.rate),
    );
    line(
        "orders placed > 100 ms late (rate not kept)",
        get(&c.late).to_string(),
    );
    print_stock(conns)?;
    line(
        "lowest available of any stock row (never < 0)",
        m.min_stock.to_string(),
    );
    line(
        "orders shipped by the warehouses",
        get(&c.shipped).to_string(),
    );
    line(
        "shipments refused for lack of stock (oversell)",
        get(&c.ship_short).to_string(),
    );
    line(
        "cancellations of shipped orders refused / let through",
        format!(
            "{} / {}",
            get(&c.cancel_after_ship_refused),
            get(&c.cancel_after_ship_accepted)
        ),
    );
    line(
        "inbound deliveries and stocktakes",
        get(&c.warehouse_moves).to_string(),
    );
    print_client_figures(c);
    print_consumer_figures(&m, f.chaos);
    let drift = print_drift(&f.settled.reconcile);
    line("client errors", get(&c.errors).to_string());
    line(
        "load / settle time",
        format!("{:.1} s / {:.1} s", f.load_secs, f.settled.secs),
    );
    let paths = path_figures(conns, &f.settled.reconcile, f.load_start)?;
    let (columns, mut rows) = print_paths(&paths, f.load_secs);
    for e in &f.chaos.log {
        println!("chaos: {e}");
    }
    // Push, capture and pull must lose nothing; the dual write is the contrast.
    let lossless_drift: i64 = paths
        .iter()
        .filter(|p| p.path != "dual")
        .map(|p| p.drift_found)
        .sum();
    let on_hand_off: usize = paths.iter().map(|p| p.on_hand_off).sum();
    let ok = f.settled.ok
        && drift == 0
        && lossless_drift == 0
        && on_hand_off == 0
        && m.min_stock >= 0
        && get(&c.ship_short) == 0
        && get(&c.cancel_after_ship_accepted) == 0
        && get(&c.errors) == 0
        && dead_letters(&m) == 0;
    let verdict = if ok {
        "CONSISTENT: every order decided once, never oversold, each effect once, push/capture/pull in step with their warehouses (no drift), nothing lost."
    } else {
        "INCONSISTENT: see the report above and the logs"
    };
    println!();
    println!("{verdict}");
    rows.insert(
        0,
        (
            "order created -> confirmed p50 / p99".into(),
            vec![format!("{} / {}", ms(m.latency.p50), ms(m.latency.p99))],
        ),
    );
    let page = demo_order::report_html::Page {
        title: format!(
            "outbox demo: {} orders at {}/s, paths {}{}; order created -> confirmed p50 {} / p99 {}",
            get(&c.created),
            f.rate,
            columns.join(", "),
            if f.chaos.log.is_empty() {
                ""
            } else {
                ", with chaos"
            },
            ms(m.latency.p50),
            ms(m.latency.p99)
        ),
        columns,
        rows,
        samples: f.samples.clone(),
        marks: f
            .chaos
            .marks
            .iter()
            .map(|(at, label)| demo_order::report_html::Mark {
                t: at.saturating_duration_since(f.started).as_secs_f64(),
                label: label.clone(),
            })
            .collect(),
        verdict: verdict.into(),
    };
    demo_order::report_html::write(f.html, &page)?;
    println!("html report: {}", f.html.display());
    Ok(ok)
}

/// Messages the consumers dead-lettered (an effect that never happened).
fn dead_letters(m: &Measured) -> u64 {
    m.order_stats["dead_lettered"].as_u64().unwrap_or(0)
        + m.inventory_stats["dead_lettered"].as_u64().unwrap_or(0)
}

/// On hand, reserved and available per product class in the centre, and on hand in the
/// warehouses.
fn print_stock(conns: &mut Conns) -> Result<()> {
    #[derive(QueryableByName)]
    struct Class {
        #[diesel(sql_type = Text)]
        class: String,
        #[diesel(sql_type = BigInt)]
        on_hand: i64,
        #[diesel(sql_type = BigInt)]
        reserved: i64,
        #[diesel(sql_type = BigInt)]
        available: i64,
    }
    let classes: Vec<Class> = diesel::sql_query(
        "SELECT split_part(product, '-', 1) AS class, sum(on_hand)::bigint AS on_hand, \
                sum(reserved)::bigint AS reserved, sum(available)::bigint AS available \
         FROM stock GROUP BY 1 ORDER BY 1",
    )
    .load(&mut conns.inventory)?;
    for k in classes {
        line(
            &format!("stock {}* on hand / reserved / available", k.class),
            format!("{} / {} / {}", k.on_hand, k.reserved, k.available),
        );
    }
    Ok(())
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

/// The drift `reconcile` found between orders, reservations and stock (0 when it never ran,
/// shown as "not run").
fn print_drift(reconcile: &serde_json::Value) -> usize {
    let orders = &reconcile["orders"];
    let drift = [
        "confirmed_without_reservation",
        "shipped_without_shipment",
        "holding_without_order",
        "orphan_reservations",
        "cancelled_but_shipped",
        "order_behind_shipment",
        "stock_off",
        "oversold",
    ]
    .iter()
    .map(|k| orders[k].as_array().map_or(0, Vec::len))
    .sum::<usize>()
        + usize::try_from(orders["unreserved_shipments"].as_i64().unwrap_or(0)).unwrap_or(0);
    line(
        "reconcile drift (orders vs reservations vs stock)",
        if reconcile.is_null() {
            "not run".into()
        } else {
            drift.to_string()
        },
    );
    drift
}
