//! Step 5: the load. Concurrent HTTP clients place orders at a stated rate (some submitted twice
//! with the same Idempotency-Key, some cancelled), count what they saw and advance the `placed`
//! bar.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::Rng;

/// What the clients saw.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) created: AtomicU64,
    pub(crate) idempotent_repeats: AtomicU64,
    pub(crate) cancels: AtomicU64,
    pub(crate) cancel_refused: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Orders shipped by a warehouse (HTTP 201).
    pub(crate) shipped: AtomicU64,
    /// Shipments a warehouse refused for lack of stock (an oversell reaching the warehouse).
    pub(crate) ship_short: AtomicU64,
    /// Cancellations of shipped orders: refused (409) as they must be, or accepted (a defect).
    pub(crate) cancel_after_ship_refused: AtomicU64,
    pub(crate) cancel_after_ship_accepted: AtomicU64,
    /// Inbound goods and stocktakes recorded by the warehouses.
    pub(crate) warehouse_moves: AtomicU64,
    /// Orders the clients placed later than their slot by more than 100 ms (the rate was not
    /// kept: the machine or the services could not keep up).
    pub(crate) late: AtomicU64,
}

/// The two progress bars: orders placed, orders settled.
pub(crate) struct Progress {
    _bars: MultiProgress,
    pub(crate) placed: ProgressBar,
    pub(crate) settled: ProgressBar,
}

impl Progress {
    pub(crate) fn new(orders: usize) -> Result<Self> {
        let bars = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")?
            .progress_chars("=> ");
        let placed = bars.add(
            ProgressBar::new(orders as u64)
                .with_style(style.clone())
                .with_prefix("placed"),
        );
        let settled = bars.add(
            ProgressBar::new(orders as u64)
                .with_style(style)
                .with_prefix("settled"),
        );
        Ok(Self {
            _bars: bars,
            placed,
            settled,
        })
    }
}

/// The shape of the load (from the command line).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) orders: usize,
    pub(crate) duplicate_rate: f64,
    pub(crate) cancel_rate: f64,
    pub(crate) scarce_products: u32,
    pub(crate) ample_products: u32,
    /// Orders per second, over all clients.
    pub(crate) rate: f64,
}

/// What every client shares: the next order number, the counters, the API, the `placed` bar.
#[derive(Clone)]
pub(crate) struct Clients {
    pub(crate) plan: Plan,
    pub(crate) next: Arc<AtomicUsize>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) agent: ureq::Agent,
    pub(crate) api: String,
    pub(crate) bar: ProgressBar,
    /// When order 0 is due.
    pub(crate) started: Instant,
    /// Orders a client cancels (the warehouses never ship them).
    pub(crate) cancelled: Arc<Mutex<HashSet<String>>>,
}

impl Clients {
    /// Starts `n` client threads; each places orders until `plan.orders` are taken.
    pub(crate) fn spawn(&self, n: usize) -> Vec<JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let client = self.clone();
                std::thread::spawn(move || client.run())
            })
            .collect()
    }

    /// Orders placed so far.
    pub(crate) fn placed(&self) -> usize {
        self.next.load(Ordering::Relaxed).min(self.plan.orders)
    }

    fn run(&self) {
        let mut rng = rand::thread_rng();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.plan.orders {
                return;
            }
            // Paced: order i is due at i / rate seconds (the clients are the concurrency, the
            // rate is the load).
            #[allow(clippy::cast_precision_loss)]
            let due = self.started + Duration::from_secs_f64(i as f64 / self.plan.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else if now - due > Duration::from_millis(100) {
                self.counters.late.fetch_add(1, Ordering::Relaxed);
            }
            let body = self.random_order(&mut rng, i);
            let key = uuid::Uuid::new_v4().to_string();
            let Some(id) = self.submit(&key, &body, true) else {
                continue;
            };
            if rng.gen_bool(self.plan.duplicate_rate) {
                if let Some(again) = self.submit(&key, &body, false) {
                    if again != id {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("idempotency violated: {id} then {again}");
                    }
                }
            }
            if rng.gen_bool(self.plan.cancel_rate) {
                self.cancelled
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id.clone());
                self.cancel(&id);
            }
            self.bar.inc(1);
        }
    }

    /// Order number `i`: a scarce or an ample product (half and half when there are both).
    fn random_order(&self, rng: &mut impl Rng, i: usize) -> serde_json::Value {
        let (scarce, ample) = (self.plan.scarce_products, self.plan.ample_products);
        let product = if scarce > 0 && (ample == 0 || rng.gen_bool(0.5)) {
            format!("scarce-{}", rng.gen_range(0..scarce))
        } else {
            format!("ample-{}", rng.gen_range(0..ample))
        };
        serde_json::json!({
            "user": format!("user-{}", i % 500), "product": product,
            "quantity": rng.gen_range(1..=3), "amount_cents": rng.gen_range(100..10_000),
        })
    }

    /// POST /orders with `key`, retried with the same key after transport errors and 5xx.
    /// Returns the order id.
    fn submit(&self, key: &str, body: &serde_json::Value, expect_new: bool) -> Option<String> {
        let c = &self.counters;
        for attempt in 0..20 {
            match self
                .agent
                .post(&format!("{}/orders", self.api))
                .set("Idempotency-Key", key)
                .send_json(body.clone())
            {
                Ok(resp) => {
                    let status = resp.status();
                    let order: serde_json::Value = resp.into_json().ok()?;
                    if status == 201 || (attempt > 0 && status == 200) {
                        c.created
                            .fetch_add(u64::from(expect_new || status == 201), Ordering::Relaxed);
                    } else if status == 200 {
                        c.idempotent_repeats.fetch_add(1, Ordering::Relaxed);
                    }
                    return order["id"].as_str().map(str::to_owned);
                }
                Err(ureq::Error::Status(code, r)) if code < 500 => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "order refused ({code}): {}",
                        r.into_string().unwrap_or_default()
                    );
                    return None;
                }
                Err(_) => {
                    // Transport error or 5xx: retry with the SAME key.
                    c.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
                }
            }
        }
        c.errors.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn cancel(&self, id: &str) {
        let c = &self.counters;
        match self
            .agent
            .post(&format!("{}/orders/{id}/cancel", self.api))
            .call()
        {
            Ok(_) => c.cancels.fetch_add(1, Ordering::Relaxed),
            Err(ureq::Error::Status(409, _)) => c.cancel_refused.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}
