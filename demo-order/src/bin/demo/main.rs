//! `demo`: the whole system on one machine, in one command.
//!
//! Creates the databases (orders, the inventory centre, one warehouse per sync path), starts a
//! Kafka broker (librdkafka's embedded mock cluster unless `--brokers` names a real one), seeds
//! the warehouses (the centre learns its stock by each warehouse's path), starts
//! `demo-order serve`, `demo-inventory serve`, one `demo-warehouse serve` per path (push,
//! capture, pull, dual) and two `outbox-relay run` per database that needs one, as separate
//! processes; drives concurrent clients at a stated rate (duplicate submissions with the same
//! Idempotency-Key, cancellations) and warehouse operators (inbound, stocktakes, shipments of
//! confirmed orders, cancellations of shipped ones that must be refused), can kill -9 and
//! restart relays, consumers and warehouses (`--chaos`), waits until everything settled, and
//! prints a report per sync path and an HTML report. Exits 1 on any inconsistency.
//!
//! One module per step: [`scratch`] (databases and logs), [`broker`], [`process`] (the child
//! processes), [`load`] (the clients), [`warehouses`] (operators and the sampler), [`chaos`],
//! [`report`]; [`run`] strings them together.

mod broker;
mod chaos;
mod load;
mod process;
mod report;
mod scratch;
mod warehouses;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use diesel::sql_types::BigInt;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use broker::Broker;
use chaos::Chaos;
use load::{Clients, Counters, Plan, Progress};
use process::{free_port, Proc};
use report::{Figures, Settled};
use scratch::{Conns, Scratch};

#[derive(Debug, Parser)]
#[command(
    name = "demo",
    about = "Run the order/inventory demo end to end and report consistency"
)]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 2_400)]
    orders: usize,
    /// Orders per second (paced: the default is well below what this machine sustains, so the
    /// latencies are the product's, not queueing).
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Concurrent HTTP clients (at most this many orders in flight).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Inbound deliveries and stocktakes per second, over all warehouses.
    #[arg(long, default_value_t = 8.0)]
    warehouse_rate: f64,
    /// Share of confirmed orders the warehouses ship.
    #[arg(long, default_value_t = 0.6)]
    ship_rate: f64,
    /// The warehouses' sync paths, one warehouse each: push, capture, pull, dual.
    #[arg(long, value_delimiter = ',', default_value = "push,capture,pull,dual")]
    paths: Vec<String>,
    /// Seconds between the centre's scheduled reconciliations (which repair what they find).
    #[arg(long, default_value_t = 5)]
    reconcile_every_secs: u64,
    /// Where to write the HTML report.
    #[arg(long, default_value = "demo-report.html")]
    html: PathBuf,
    /// Products with little stock (20 units each): most of their orders are rejected.
    #[arg(long, default_value_t = 100)]
    scarce_products: u32,
    /// Products with plenty of stock (100000 units each).
    #[arg(long, default_value_t = 200)]
    ample_products: u32,
    /// Share of orders submitted twice with the same Idempotency-Key.
    #[arg(long, default_value_t = 0.1)]
    duplicate_rate: f64,
    /// Share of orders cancelled right after they were placed.
    #[arg(long, default_value_t = 0.1)]
    cancel_rate: f64,
    /// kill -9 and restart a relay and the inventory consumer during the run.
    #[arg(long)]
    chaos: bool,
    /// Use this Kafka cluster instead of the embedded one.
    #[arg(long)]
    brokers: Option<String>,
    /// Postgres maintenance database: the demo creates (and drops) two databases there.
    #[arg(
        long,
        env = "DEMO_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Keep the databases and logs afterwards.
    #[arg(long)]
    keep: bool,
    /// Seconds to wait for everything to settle after the load.
    #[arg(long, default_value_t = 180)]
    settle_timeout_secs: u64,
    /// Find the sustainable order rate: steps of `--max-step-secs` from `--rate`, doubling,
    /// until the clients fall behind (achieved < 90% of the stated rate, or over 5% of orders
    /// placed late) or created -> confirmed p99 passes 1 s; then the usual report over all
    /// steps. `--orders` is ignored.
    #[arg(long)]
    max: bool,
    /// Seconds per step of `--max`.
    #[arg(long, default_value_t = 10)]
    max_step_secs: u64,
}

impl Args {
    fn validate(&self) -> Result<()> {
        if self.orders == 0 || self.clients == 0 || self.scarce_products + self.ample_products == 0
        {
            bail!("--orders, --clients and the number of products must be positive");
        }
        if !(0.0..=1.0).contains(&self.duplicate_rate)
            || !(0.0..=1.0).contains(&self.cancel_rate)
            || !(0.0..=1.0).contains(&self.ship_rate)
        {
            bail!("--duplicate-rate, --cancel-rate and --ship-rate must be between 0 and 1");
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) || self.warehouse_rate < 0.0 {
            bail!("--rate must be > 0 and --warehouse-rate >= 0");
        }
        if self.max && self.chaos {
            bail!("--max measures the sustainable rate without faults: run --chaos on its own");
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.paths {
            if !matches!(p.as_str(), "push" | "capture" | "pull" | "dual") || !seen.insert(p) {
                bail!("--paths {p:?}: each of push, capture, pull, dual at most once");
            }
        }
        Ok(())
    }

    fn plan(&self) -> Plan {
        Plan {
            orders: self.orders,
            duplicate_rate: self.duplicate_rate,
            cancel_rate: self.cancel_rate,
            scarce_products: self.scarce_products,
            ample_products: self.ample_products,
            rate: self.rate,
        }
    }
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The demo, step by step; `Ok(false)` when the report found an inconsistency. On an error the
/// processes are killed (their `Drop`) and the databases and logs are left for a look.
fn run(args: Args) -> Result<bool> {
    args.validate()?;
    let bins = Binaries::locate()?;
    if args.paths.iter().any(|p| p == "capture") {
        check_logical(&args.database_url)?;
    }
    let scratch = Scratch::create(&args.database_url, &args.paths)?;
    let broker = Broker::start(args.brokers.as_deref())?;
    let demo = Demo {
        args,
        bins,
        scratch,
        broker,
    };
    demo.seed_and_migrate()?;
    let mut services = demo.start_services()?;
    demo.warm_up(&services)?;
    let mut load = demo.drive_load(&mut services)?;
    let settled = demo.wait_settled(&mut load)?;
    let ok = report::print(
        &services,
        &mut load.conns,
        &Figures {
            counters: &load.counters,
            chaos: &load.chaos,
            settled: &settled,
            load_secs: load.secs,
            rate: demo.args.rate,
            samples: std::mem::take(&mut load.samples),
            started: load.started,
            load_start: &load.load_start,
            html: &demo.args.html,
        },
    )?;
    // Stop and clean up.
    services.terminate();
    drop(load);
    demo.scratch.clean_up(demo.args.keep, ok);
    Ok(ok)
}

/// The relays' flags after `--database-url` and `--brokers`: short leases and polls, so a killed
/// relay's standby takes over within seconds.
const RELAY_FLAGS: [&str; 7] = [
    "--allow-superuser",
    "--lease-ms",
    "2000",
    "--standby-poll-ms",
    "200",
    "--idle-poll-max-ms",
    "20",
];

/// Change capture needs `wal_level = logical` on the server: a clear error before anything is
/// created.
fn check_logical(url: &str) -> Result<()> {
    #[derive(QueryableByName)]
    struct W {
        #[diesel(sql_type = diesel::sql_types::Text)]
        w: String,
    }
    use diesel::Connection;
    let mut c =
        PgConnection::establish(url).context("connect to Postgres (scripts/setup starts it)")?;
    let w =
        diesel::sql_query("SELECT current_setting('wal_level') AS w").get_result::<W>(&mut c)?;
    if w.w != "logical" {
        bail!(
            "the capture path needs wal_level = logical (it is {}): run scripts/setup, which sets it, \
             or leave capture out (--paths push,pull,dual)",
            w.w
        );
    }
    Ok(())
}

/// The sibling binaries the demo starts.
struct Binaries {
    order: PathBuf,
    inventory: PathBuf,
    warehouse: PathBuf,
    relay: PathBuf,
}

impl Binaries {
    fn locate() -> Result<Self> {
        let bin_dir = std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf();
        let bin = |name: &str| -> Result<PathBuf> {
            let p = bin_dir.join(name);
            if !p.exists() {
                bail!("{} is missing: build it first (cargo build -p demo-order -p demo-inventory -p outbox-relay)", p.display());
            }
            Ok(p)
        };
        Ok(Self {
            order: bin("demo-order")?,
            inventory: bin("demo-inventory")?,
            warehouse: bin("demo-warehouse")?,
            relay: bin("outbox-relay")?,
        })
    }
}

/// What the run set up before any process started.
struct Demo {
    args: Args,
    bins: Binaries,
    scratch: Scratch,
    broker: Broker,
}

/// The running processes (two relays per database that has an outbox, the services, the
/// warehouses) and the way to their APIs.
struct Services {
    procs: BTreeMap<&'static str, Proc>,
    order_api: String,
    inventory_api: String,
    /// (warehouse name, API), one per sync path.
    warehouse_apis: Vec<(String, String)>,
    agent: ureq::Agent,
}

impl Services {
    /// GET {api}/stats (empty when the service does not answer).
    fn stats(&self, api: &str) -> serde_json::Value {
        self.agent
            .get(&format!("{api}/stats"))
            .call()
            .ok()
            .and_then(|r| r.into_json().ok())
            .unwrap_or_default()
    }

    /// Waits (up to 60 s each) until every service answers GET /healthz.
    fn wait_healthy(&self, logs: &Path) -> Result<()> {
        for api in [&self.order_api, &self.inventory_api]
            .into_iter()
            .chain(self.warehouse_apis.iter().map(|(_, a)| a))
        {
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.agent.get(&format!("{api}/healthz")).call().is_err() {
                if Instant::now() > deadline {
                    bail!("{api} did not come up (see {})", logs.display());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Fails, naming the process and the end of its log, when one exited on its own (a relay
    /// that refused its configuration, a service that could not start).
    fn check_alive(&mut self, logs: &Path) -> Result<()> {
        for p in self.procs.values_mut() {
            if let Some(status) = p.exited() {
                let log = std::fs::read_to_string(logs.join(format!("{}.log", p.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "{} exited by itself ({status}); the end of its log:\n{}",
                    p.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }

    /// SIGTERM every process (SIGKILL after 15 s).
    fn terminate(&mut self) {
        for p in self.procs.values_mut() {
            p.terminate();
        }
    }
}

/// The load while it settles: the clients' counters, what chaos did, the progress bars.
struct Load {
    progress: Progress,
    counters: Arc<Counters>,
    chaos: Chaos,
    conns: Conns,
    started: Instant,
    /// Seconds the load (and the chaos after it) took.
    secs: f64,
    /// The sampler (stopped once everything settled) and what it gathered.
    sampler: Option<(
        Arc<AtomicBool>,
        std::thread::JoinHandle<Vec<demo_order::report_html::Sample>>,
    )>,
    samples: Vec<demo_order::report_html::Sample>,
    /// The database's clock when the load began.
    load_start: String,
}

/// Runs a one-shot subcommand of a sibling binary; fails with `what` and its stderr unless it
/// exits 0.
fn run_tool(bin: &Path, args: &[&str], what: &str) -> Result<()> {
    let out = Command::new(bin).args(args).output()?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// p99 of created -> confirmed (ms) of the orders created since `since`, and how many of them
/// are still PENDING.
fn phase_p99(conn: &mut PgConnection, since: &str) -> Result<(Option<f64>, i64)> {
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        p99: Option<f64>,
        #[diesel(sql_type = BigInt)]
        pending: i64,
    }
    let p: P = diesel::sql_query(
        "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY \
         extract(epoch FROM confirmed_at - created_at) * 1000) \
           FILTER (WHERE confirmed_at IS NOT NULL)::float8 AS p99, \
         count(*) FILTER (WHERE status = 'PENDING') AS pending \
         FROM orders WHERE created_at >= $1::timestamptz",
    )
    .bind::<diesel::sql_types::Text, _>(since)
    .get_result(conn)?;
    Ok((p.p99, p.pending))
}

/// `clock_timestamp()` of the server, as text.
fn db_now(conn: &mut PgConnection) -> Result<String> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Text)]
        now: String,
    }
    Ok(diesel::sql_query("SELECT clock_timestamp()::text AS now")
        .get_result::<Now>(conn)?
        .now)
}

fn count(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<N>(conn)?.n)
}

/// The capture relays' extra flags: stream the WAL, capture `wh_movements` keyed by warehouse
/// and product (so each product's movements keep their order) onto the capture topic.
fn capture_flags(slot: &str) -> Vec<String> {
    [
        "--capture",
        "streaming",
        "--slot",
        slot,
        "--capture-tables",
        "public.wh_movements",
        "--capture-topic",
        demo_inventory_topics::CAPTURE,
        "--capture-key-columns",
        "public.wh_movements.warehouse,public.wh_movements.product",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect()
}

/// The topic names the demo shares with the services (demo-inventory is not a dependency).
mod demo_inventory_topics {
    pub(crate) const CAPTURE: &str = "warehouse.capture";
}

impl Demo {
    /// Which warehouses have a relay: push (its outbox) and capture (its table, from the WAL).
    fn relayed(&self) -> impl Iterator<Item = &scratch::WarehouseDb> {
        self.scratch
            .warehouses
            .iter()
            .filter(|w| w.path == "push" || w.path == "capture")
    }

    fn slot(&self) -> String {
        format!("demo_wh_capture_{}", self.scratch.suffix)
    }

    /// Step 3: schemas, then each warehouse's stock received as inbound movements (the centre
    /// learns its initial stock by the warehouse's own path).
    fn seed_and_migrate(&self) -> Result<()> {
        let s = &self.scratch;
        run_tool(
            &self.bins.order,
            &["migrate", "--database-url", &s.orders_url],
            "migrate orders",
        )?;
        run_tool(
            &self.bins.inventory,
            &["migrate", "--database-url", &s.inventory_url],
            "migrate the inventory centre",
        )?;
        for w in &s.warehouses {
            run_tool(
                &self.bins.warehouse,
                &["migrate", "--database-url", &w.url],
                "migrate a warehouse",
            )?;
            if w.path == "capture" {
                let mut a = vec![
                    "migrate".to_owned(),
                    "--database-url".to_owned(),
                    w.url.clone(),
                ];
                a.extend(capture_flags(&self.slot()));
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                run_tool(&self.bins.relay, &a, "create the capture slot")?;
            }
        }
        let n = u32::try_from(s.warehouses.len().max(1))?;
        let n_i32 = i32::try_from(n)?;
        self.seed("scarce-", self.args.scarce_products, 20 / n_i32)?;
        self.seed("ample-", self.args.ample_products, 100_000 / n_i32)?;
        Ok(())
    }

    /// `demo-warehouse seed` in every warehouse: products `<prefix>0..<products>`, `units` each.
    fn seed(&self, prefix: &str, products: u32, units: i32) -> Result<()> {
        let (products, units) = (products.to_string(), units.max(1).to_string());
        for w in &self.scratch.warehouses {
            run_tool(
                &self.bins.warehouse,
                &[
                    "seed",
                    "--database-url",
                    &w.url,
                    "--warehouse",
                    &w.name,
                    "--sync",
                    &w.path,
                    "--prefix",
                    prefix,
                    "--products",
                    &products,
                    "--units",
                    &units,
                    "--brokers",
                    &self.broker.bootstrap,
                ],
                "seed a warehouse",
            )?;
        }
        Ok(())
    }

    /// Step 4: the processes, each with its log; returns once every service answers.
    fn start_services(&self) -> Result<Services> {
        let (order_port, inventory_port) = (free_port()?, free_port()?);
        let env = vec![("RUST_LOG".to_owned(), "info".to_owned())];
        let (logs, s) = (&self.scratch.logs, &self.scratch);
        let mut procs: BTreeMap<&'static str, Proc> = BTreeMap::new();
        for (name, url) in [
            ("relay-orders-a", &s.orders_url),
            ("relay-orders-b", &s.orders_url),
            ("relay-inventory-a", &s.inventory_url),
            ("relay-inventory-b", &s.inventory_url),
        ] {
            let a = self.command_line("run", url, &RELAY_FLAGS);
            procs.insert(name, Proc::start(&self.bins.relay, name, &a, &env, logs)?);
        }
        for w in self.relayed() {
            let mut flags: Vec<String> = RELAY_FLAGS.iter().map(|f| (*f).to_owned()).collect();
            if w.path == "capture" {
                flags.extend(capture_flags(&self.slot()));
            }
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            for side in ["a", "b"] {
                let name: &'static str =
                    Box::leak(format!("relay-wh-{}-{side}", w.path).into_boxed_str());
                let a = self.command_line("run", &w.url, &flags);
                procs.insert(name, Proc::start(&self.bins.relay, name, &a, &env, logs)?);
            }
        }
        let mut warehouse_apis = Vec::new();
        for w in &s.warehouses {
            let port = free_port()?;
            let name: &'static str = Box::leak(w.name.clone().into_boxed_str());
            let a = self.command_line(
                "serve",
                &w.url,
                &[
                    "--warehouse",
                    &w.name,
                    "--sync",
                    &w.path,
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                ],
            );
            procs.insert(
                name,
                Proc::start(&self.bins.warehouse, name, &a, &env, logs)?,
            );
            warehouse_apis.push((w.name.clone(), format!("http://127.0.0.1:{port}")));
        }
        let order_args = self.command_line(
            "serve",
            &s.orders_url,
            &["--listen", &format!("127.0.0.1:{order_port}")],
        );
        procs.insert(
            "order-service",
            Proc::start(&self.bins.order, "order-service", &order_args, &env, logs)?,
        );
        let every = self.args.reconcile_every_secs.to_string();
        let mut centre: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{inventory_port}"),
            "--reconcile-every-secs".into(),
            every,
            // Longer than an outage chaos causes (a consumer's session timing out, a relay's
            // lease): a movement younger than this is in flight, not drift.
            "--reconcile-settle-secs".into(),
            "15".into(),
            "--repair".into(),
        ];
        for w in &s.warehouses {
            centre.extend(["--warehouse-db".into(), format!("{}={}", w.name, w.url)]);
            if w.path == "pull" {
                let api = &warehouse_apis
                    .iter()
                    .find(|(n, _)| *n == w.name)
                    .context("pull api")?
                    .1;
                centre.extend(["--pull".into(), format!("{}={api}", w.name)]);
            }
        }
        let centre: Vec<&str> = centre.iter().map(String::as_str).collect();
        let a = self.command_line("serve", &s.inventory_url, &centre);
        procs.insert(
            "inventory-service",
            Proc::start(&self.bins.inventory, "inventory-service", &a, &env, logs)?,
        );
        let services = Services {
            procs,
            order_api: format!("http://127.0.0.1:{order_port}"),
            inventory_api: format!("http://127.0.0.1:{inventory_port}"),
            warehouse_apis,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
        };
        services.wait_healthy(logs)?;
        Ok(services)
    }

    /// `<subcommand> --database-url <url> --brokers <bootstrap> <rest>`: a relay's or a
    /// service's command line.
    fn command_line(&self, subcommand: &str, url: &str, rest: &[&str]) -> Vec<String> {
        [
            subcommand,
            "--database-url",
            url,
            "--brokers",
            &self.broker.bootstrap,
        ]
        .iter()
        .chain(rest)
        .map(|a| (*a).to_owned())
        .collect()
    }

    /// Movements of each warehouse not yet applied in the centre (by warehouse name).
    fn unsynced(&self, conns: &mut Conns) -> Result<Vec<(String, i64)>> {
        let mut out = Vec::new();
        for ((path, wh), w) in conns.warehouses.iter_mut().zip(&self.scratch.warehouses) {
            debug_assert_eq!(*path, w.path);
            let theirs = count(wh, "SELECT count(*) AS n FROM wh_movements")?;
            // A lossless path is waited for until it delivered every movement itself (one the
            // reconciliation applied first counts once the path's copy arrived); the dual
            // write's losses are the reconciliation's to repair.
            let delivered = if w.path == "dual" {
                "TRUE"
            } else {
                "(path <> 'repair' OR arrived_by IS NOT NULL)"
            };
            let ours = count(
                &mut conns.inventory,
                &format!(
                    "SELECT count(*) AS n FROM movements WHERE warehouse = '{}' AND {delivered}",
                    w.name
                ),
            )?;
            out.push((w.name.clone(), theirs - ours));
        }
        Ok(out)
    }

    /// Warm-up: every warehouse's initial stock synced to the centre, then one order through
    /// the whole loop, so consumer groups have their partitions before the clock starts. It is
    /// excluded from the figures.
    fn warm_up(&self, services: &Services) -> Result<()> {
        let mut conns = self.scratch.connect()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = self.unsynced(&mut conns)?;
            if left.iter().all(|(_, n)| *n == 0) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the warehouses' initial stock did not reach the centre within 120 s ({left:?}; see {})",
                    self.scratch.logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let (agent, api) = (&services.agent, &services.order_api);
        let warm: serde_json::Value = agent
            .post(&format!("{api}/orders"))
            .send_json(serde_json::json!({"user": "warmup", "product": "ample-0", "quantity": 1, "amount_cents": 1}))?
            .into_json()?;
        let warm_id = warm["id"].as_str().context("warm-up order id")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let o: serde_json::Value = agent
                .get(&format!("{api}/orders/{warm_id}"))
                .call()?
                .into_json()?;
            if o["status"] == "CONFIRMED" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the warm-up order was not confirmed within 90 s (see {})",
                    self.scratch.logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Step 5: the clients place the orders at the stated rate and the warehouse operators
    /// work; the settled bar and (with `--chaos`) the kills follow them.
    fn drive_load(&self, services: &mut Services) -> Result<Load> {
        let args = &self.args;
        println!(
            "load       {} orders at {} /s from {} clients ({:.0}% submitted twice, {:.0}% cancelled), \
             warehouses {} ({} inbound/stocktakes /s, {:.0}% of confirmed orders shipped){}",
            args.orders,
            args.rate,
            args.clients,
            args.duplicate_rate * 100.0,
            args.cancel_rate * 100.0,
            args.paths.join(", "),
            args.warehouse_rate,
            args.ship_rate * 100.0,
            if args.chaos { ", with chaos" } else { "" }
        );
        // The phases: one at --rate, or --max's doubling steps.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let phases: Vec<(f64, usize)> = if args.max {
            (0..7)
                .map(|k| {
                    let rate = args.rate * f64::from(1_u32 << k);
                    (rate, (rate * args.max_step_secs as f64).ceil() as usize)
                })
                .collect()
        } else {
            vec![(args.rate, args.orders)]
        };
        let total: usize = phases.iter().map(|(_, n)| n).sum();
        let progress = Progress::new(total)?;
        let mut conns = self.scratch.connect()?;
        // The database's clock at the start: the seed's movements are not the load's.
        let load_start = db_now(&mut conns.inventory)?;
        let started = Instant::now();
        let cancelled = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let counters = Arc::new(Counters::default());
        let stop_operators = Arc::new(AtomicBool::new(false));
        let operators = warehouses::Operators {
            agent: services.agent.clone(),
            apis: services.warehouse_apis.clone(),
            order_api: services.order_api.clone(),
            orders_url: self.scratch.orders_url.clone(),
            rate: args.warehouse_rate,
            ship_rate: args.ship_rate,
            scarce: args.scarce_products,
            ample: args.ample_products,
            counters: Arc::clone(&counters),
            cancelled: Arc::clone(&cancelled),
            stop: Arc::clone(&stop_operators),
        }
        .spawn();
        let stop_sampler = Arc::new(AtomicBool::new(false));
        let sampler = warehouses::Sampler {
            inventory_url: self.scratch.inventory_url.clone(),
            orders_url: self.scratch.orders_url.clone(),
            warehouses: self
                .scratch
                .warehouses
                .iter()
                .map(|w| (w.path.clone(), w.name.clone(), w.url.clone()))
                .collect(),
            started,
            stop: Arc::clone(&stop_sampler),
        }
        .spawn();
        let mut chaos = Chaos::new(services);
        let mut sustainable: Option<f64> = None;
        for (rate, orders) in phases {
            let phase_start = db_now(&mut conns.orders)?;
            let (late_before, created_before) = (
                counters.late.load(Ordering::Relaxed),
                counters.created.load(Ordering::Relaxed),
            );
            let began = Instant::now();
            let clients = Clients {
                plan: load::Plan {
                    orders,
                    rate,
                    ..args.plan()
                },
                next: Arc::new(AtomicUsize::new(0)),
                counters: Arc::clone(&counters),
                agent: services.agent.clone(),
                api: services.order_api.clone(),
                bar: progress.placed.clone(),
                started: Instant::now(),
                cancelled: Arc::clone(&cancelled),
            };
            let threads = clients.spawn(args.clients);
            while threads.iter().any(|c| !c.is_finished()) {
                services.check_alive(&self.scratch.logs)?;
                if args.chaos {
                    chaos.during_load(services, clients.placed(), orders)?;
                }
                let settled = count(
                    &mut conns.orders,
                    "SELECT count(*) AS n FROM orders WHERE status <> 'PENDING'",
                )?;
                progress.settled.set_position(u64::try_from(settled)?);
                std::thread::sleep(Duration::from_millis(200));
            }
            for c in threads {
                let _ = c.join();
            }
            if !args.max {
                break;
            }
            #[allow(clippy::cast_precision_loss)]
            let achieved = (counters.created.load(Ordering::Relaxed) - created_before) as f64
                / began.elapsed().as_secs_f64().max(0.001);
            // Let the step's orders be decided before measuring their latency.
            std::thread::sleep(Duration::from_secs(2));
            let late = counters.late.load(Ordering::Relaxed) - late_before;
            let (p99, pending) = phase_p99(&mut conns.orders, &phase_start)?;
            #[allow(clippy::cast_precision_loss)]
            let kept = achieved >= rate * 0.9
                && (late as f64) <= orders as f64 * 0.05
                && (pending as f64) <= orders as f64 * 0.05
                && p99.is_some_and(|p| p < 1000.0);
            // Printed as a line (a progress bar's println is dropped when stdout is no terminal).
            println!("{}", format_args!(
                "max: step {rate:>6.0} orders/s: achieved {achieved:.1}/s, {late} placed late, {pending} undecided 2 s after, created -> confirmed p99 {} -> {}",
                p99.map_or_else(|| "-".into(), |p| format!("{p:.1} ms")),
                if kept { "sustained" } else { "NOT sustained: stop" }
            ));
            if !kept {
                break;
            }
            sustainable = Some(rate);
        }
        progress.placed.finish();
        if args.max {
            println!(
                "max: sustainable order rate on this machine: {}",
                sustainable.map_or_else(
                    || format!("below {} orders/s (the first step was not sustained)", args.rate),
                    |r| format!("{r:.0} orders/s (the next step doubled it and was not sustained, or was the last)")
                )
            );
        }
        if args.chaos {
            chaos.after_load(services)?;
        }
        // The last shipments of confirmed orders, then the operators stop.
        std::thread::sleep(Duration::from_secs(2));
        stop_operators.store(true, Ordering::Relaxed);
        let _ = operators.join();
        Ok(Load {
            progress,
            counters,
            chaos,
            conns,
            started,
            secs: started.elapsed().as_secs_f64(),
            sampler: Some((stop_sampler, sampler)),
            samples: Vec::new(),
            load_start,
        })
    }

    /// Step 6: waits until every order is decided, the outboxes are drained, every warehouse
    /// movement reached the centre (the dual path's lost ones by the scheduled reconciliation's
    /// repair) and `reconcile` finds no drift, or the settle timeout.
    fn wait_settled(&self, load: &mut Load) -> Result<Settled> {
        let deadline = Instant::now() + Duration::from_secs(self.args.settle_timeout_secs);
        let mut reconcile = serde_json::Value::Null;
        let ok = loop {
            let (conns, bar) = (&mut load.conns, &load.progress.settled);
            let pending = count(
                &mut conns.orders,
                "SELECT count(*) AS n FROM orders WHERE status = 'PENDING'",
            )?;
            let total = count(&mut conns.orders, "SELECT count(*) AS n FROM orders")?;
            bar.set_length(u64::try_from(total)?);
            bar.set_position(u64::try_from(total - pending)?);
            let mut backlog = count(&mut conns.orders, "SELECT count(*) AS n FROM outbox")?
                + count(&mut conns.inventory, "SELECT count(*) AS n FROM outbox")?;
            for (path, wh) in &mut conns.warehouses {
                if path == "push" {
                    backlog += count(wh, "SELECT count(*) AS n FROM outbox")?;
                }
            }
            let unsynced: i64 = self
                .unsynced(&mut load.conns)?
                .iter()
                .map(|(_, n)| *n)
                .sum();
            load.progress.settled.set_message(format!(
                "pending {pending}, outbox backlog {backlog}, movements not yet in the centre {unsynced}"
            ));
            if pending == 0 && backlog == 0 && unsynced == 0 {
                let (report, success) = self.reconcile()?;
                reconcile = report;
                if success {
                    break true;
                }
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        load.progress.settled.finish();
        if let Some((stop, h)) = load.sampler.take() {
            stop.store(true, Ordering::Relaxed);
            load.samples = h.join().unwrap_or_default();
        }
        Ok(Settled {
            ok,
            reconcile,
            secs: load.started.elapsed().as_secs_f64() - load.secs,
        })
    }

    /// `demo-inventory reconcile --json` (orders, reservations, stock, and every warehouse's
    /// movements and on hand): its report (null when unreadable) and whether it exited 0.
    fn reconcile(&self) -> Result<(serde_json::Value, bool)> {
        let mut args: Vec<String> = [
            "reconcile",
            "--orders-db",
            &self.scratch.orders_url,
            "--inventory-db",
            &self.scratch.inventory_url,
            "--json",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        for w in &self.scratch.warehouses {
            args.extend(["--warehouse-db".into(), format!("{}={}", w.name, w.url)]);
        }
        let out = Command::new(&self.bins.inventory).args(&args).output()?;
        let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        Ok((report, out.status.success()))
    }
}
