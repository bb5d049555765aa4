//! The warehouses' side of the run: operators recording inbound goods and stocktakes at a
//! stated rate, shipping confirmed orders (never one a client cancelled) and trying to cancel
//! some shipped ones (which must be refused); and the sampler behind the HTML report's timeline.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use demo_order::report_html::Sample;
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use rand::Rng;

use crate::load::Counters;

/// What the operators need.
pub(crate) struct Operators {
    pub(crate) agent: ureq::Agent,
    /// (warehouse name, API) per warehouse.
    pub(crate) apis: Vec<(String, String)>,
    pub(crate) order_api: String,
    pub(crate) orders_url: String,
    /// Inbound goods and stocktakes per second, over all warehouses.
    pub(crate) rate: f64,
    /// Share of confirmed orders shipped.
    pub(crate) ship_rate: f64,
    pub(crate) scarce: u32,
    pub(crate) ample: u32,
    pub(crate) counters: Arc<Counters>,
    pub(crate) cancelled: Arc<Mutex<HashSet<String>>>,
    pub(crate) stop: Arc<AtomicBool>,
}

#[derive(QueryableByName)]
struct Confirmed {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    product: String,
    #[diesel(sql_type = Integer)]
    quantity: i32,
    #[diesel(sql_type = Nullable<Text>)]
    warehouse: Option<String>,
    #[diesel(sql_type = Text)]
    status: String,
}

impl Operators {
    pub(crate) fn spawn(self) -> JoinHandle<()> {
        std::thread::spawn(move || {
            if let Err(e) = self.run() {
                eprintln!("warehouse operators stopped: {e:#}");
            }
        })
    }

    fn run(&self) -> Result<()> {
        let mut rng = rand::thread_rng();
        let mut orders = PgConnection::establish(&self.orders_url)?;
        let started = Instant::now();
        let mut moves = 0_u64;
        let mut decided: HashSet<String> = HashSet::new();
        let mut last_ship = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            #[allow(clippy::cast_precision_loss)]
            let due = (started.elapsed().as_secs_f64() * self.rate) as u64;
            while moves < due && !self.apis.is_empty() {
                moves += 1;
                self.warehouse_move(&mut rng);
            }
            if last_ship.elapsed() >= Duration::from_millis(200) {
                last_ship = Instant::now();
                self.ship_and_try_cancels(&mut orders, &mut decided, &mut rng)?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// One inbound delivery of a scarce product, or a stocktake of an ample one.
    fn warehouse_move(&self, rng: &mut impl Rng) {
        let (_, api) = &self.apis[rng.gen_range(0..self.apis.len())];
        let r = if self.scarce > 0 && (self.ample == 0 || rng.gen_bool(0.6)) {
            self.agent
                .post(&format!("{api}/inbound"))
                .send_json(serde_json::json!({
                    "product": format!("scarce-{}", rng.gen_range(0..self.scarce)),
                    "quantity": rng.gen_range(2..=6),
                }))
        } else {
            let product = format!("ample-{}", rng.gen_range(0..self.ample));
            let on_hand = self
                .agent
                .get(&format!("{api}/stock/{product}"))
                .call()
                .ok()
                .and_then(|r| r.into_json::<serde_json::Value>().ok())
                .and_then(|v| v["on_hand"].as_i64());
            let Some(on_hand) = on_hand else { return };
            // A count finds a few units more or less than the books (ample stock: never
            // below what is reserved).
            let counted = (on_hand + rng.gen_range(-2..=3)).max(0);
            self.agent
                .post(&format!("{api}/stocktake"))
                .send_json(serde_json::json!({ "product": product, "counted": counted }))
        };
        if r.is_ok() {
            self.counters
                .warehouse_moves
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ships the share of newly confirmed orders (not one a client cancelled) from the warehouse
    /// that reserved them, and tries to cancel a tenth of the newly shipped ones.
    fn ship_and_try_cancels(
        &self,
        orders: &mut PgConnection,
        decided: &mut HashSet<String>,
        rng: &mut impl Rng,
    ) -> Result<()> {
        let rows: Vec<Confirmed> = diesel::sql_query(
            "SELECT id::text AS id, product, quantity, warehouse, status FROM orders \
             WHERE status IN ('CONFIRMED', 'SHIPPED') AND user_id <> 'warmup'",
        )
        .load(orders)?;
        for o in rows {
            if decided.contains(&o.id) && o.status != "SHIPPED" {
                continue;
            }
            if o.status == "SHIPPED" {
                if decided.insert(format!("shipped:{}", o.id)) && rng.gen_bool(0.1) {
                    match self
                        .agent
                        .post(&format!("{}/orders/{}/cancel", self.order_api, o.id))
                        .call()
                    {
                        Err(ureq::Error::Status(409, _)) => {
                            self.counters
                                .cancel_after_ship_refused
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            self.counters
                                .cancel_after_ship_accepted
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
                decided.insert(o.id);
                continue;
            }
            let cancelled = self
                .cancelled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&o.id);
            decided.insert(o.id.clone());
            if cancelled || !rng.gen_bool(self.ship_rate) {
                continue;
            }
            let Some(api) = o
                .warehouse
                .as_ref()
                .and_then(|w| self.apis.iter().find(|(n, _)| n == w))
                .map(|(_, a)| a)
            else {
                continue;
            };
            // The order service decides cancel against ship: only an order it handed over
            // (CONFIRMED -> SHIPPING) is shipped; one cancelled meanwhile is refused here.
            match self
                .agent
                .post(&format!("{}/orders/{}/fulfil", self.order_api, o.id))
                .call()
            {
                Ok(_) => {}
                Err(ureq::Error::Status(409, _)) => continue,
                Err(_) => continue,
            }
            let body = serde_json::json!({
                "order_id": o.id, "product": o.product, "quantity": o.quantity,
            });
            // Retried with the same order id: the warehouse ships an order once.
            for attempt in 0..10 {
                match self
                    .agent
                    .post(&format!("{api}/shipments"))
                    .send_json(body.clone())
                {
                    Ok(_) => {
                        self.counters.shipped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(ureq::Error::Status(409, _)) => {
                        self.counters.ship_short.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100 * (attempt + 1))),
                }
            }
        }
        Ok(())
    }
}

/// Samples the run every 500 ms for the HTML report.
pub(crate) struct Sampler {
    pub(crate) inventory_url: String,
    pub(crate) orders_url: String,
    /// (path, warehouse name, warehouse database URL).
    pub(crate) warehouses: Vec<(String, String, String)>,
    pub(crate) started: Instant,
    pub(crate) stop: Arc<AtomicBool>,
}

#[derive(QueryableByName)]
struct P99 {
    #[diesel(sql_type = Nullable<Double>)]
    p99: Option<f64>,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

impl Sampler {
    pub(crate) fn spawn(self) -> JoinHandle<Vec<Sample>> {
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let _ = self.run(&mut samples);
            samples
        })
    }

    fn run(&self, samples: &mut Vec<Sample>) -> Result<()> {
        let mut inventory = PgConnection::establish(&self.inventory_url)?;
        let mut orders = PgConnection::establish(&self.orders_url)?;
        let mut whs: Vec<(String, String, PgConnection)> = self
            .warehouses
            .iter()
            .map(|(p, n, u)| Ok((p.clone(), n.clone(), PgConnection::establish(u)?)))
            .collect::<Result<_>>()?;
        let mut since: String = "-infinity".into();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500));
            #[derive(QueryableByName)]
            struct Now {
                #[diesel(sql_type = Text)]
                now: String,
            }
            let now = diesel::sql_query("SELECT clock_timestamp()::text AS now")
                .get_result::<Now>(&mut inventory)?
                .now;
            let mut sync_p99_ms = BTreeMap::new();
            let mut backlog = BTreeMap::new();
            for (path, name, wh) in &mut whs {
                let p = diesel::sql_query(
                    "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY \
                     extract(epoch FROM applied_at - created_at) * 1000)::float8 AS p99 \
                     FROM movements WHERE warehouse = $1 AND applied_at > $2::timestamptz \
                     AND applied_at <= $3::timestamptz AND path <> 'repair'",
                )
                .bind::<Text, _>(&*name)
                .bind::<Text, _>(&since)
                .bind::<Text, _>(&now)
                .get_result::<P99>(&mut inventory)?;
                sync_p99_ms.insert(path.clone(), p.p99);
                let theirs = diesel::sql_query("SELECT count(*) AS n FROM wh_movements")
                    .get_result::<N>(wh)?
                    .n;
                // Delivered by the path itself (a repair counts once the path's copy arrived).
                let ours = diesel::sql_query(
                    "SELECT count(*) AS n FROM movements WHERE warehouse = $1 \
                     AND (path <> 'repair' OR arrived_by IS NOT NULL)",
                )
                .bind::<Text, _>(&*name)
                .get_result::<N>(&mut inventory)?
                .n;
                backlog.insert(path.clone(), (theirs - ours).max(0));
            }
            let confirm = diesel::sql_query(
                "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY \
                 extract(epoch FROM confirmed_at - created_at) * 1000)::float8 AS p99 \
                 FROM orders WHERE confirmed_at > $1::timestamptz AND confirmed_at <= $2::timestamptz \
                 AND user_id <> 'warmup'",
            )
            .bind::<Text, _>(&since)
            .bind::<Text, _>(&now)
            .get_result::<P99>(&mut orders)?;
            samples.push(Sample {
                t: self.started.elapsed().as_secs_f64(),
                sync_p99_ms,
                backlog,
                confirm_p99_ms: confirm.p99,
            });
            since = now;
        }
        Ok(())
    }
}
