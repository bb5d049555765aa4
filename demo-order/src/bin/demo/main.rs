//! `demo`: the whole system on one machine, in one command.
//!
//! Creates two databases, starts a Kafka broker (librdkafka's embedded mock cluster unless
//! `--brokers` names a real one), seeds the inventory, starts `demo-order serve`,
//! `demo-inventory serve` and two `outbox-relay run` per database as separate processes, drives
//! concurrent clients (duplicate submissions with the same Idempotency-Key, cancellations), can
//! kill -9 and restart a relay and a consumer (`--chaos`), waits until everything settled, and
//! prints a report. Exits 1 on any inconsistency.
//!
//! One module per step: [`scratch`] (databases and logs), [`broker`], [`process`] (the child
//! processes), [`load`] (the clients), [`chaos`], [`report`]; [`run`] strings them together.

mod broker;
mod chaos;
mod load;
mod process;
mod report;
mod scratch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
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
    #[arg(long, default_value_t = 10_000)]
    orders: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
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
}

impl Args {
    fn validate(&self) -> Result<()> {
        if self.orders == 0 || self.clients == 0 || self.scarce_products + self.ample_products == 0
        {
            bail!("--orders, --clients and the number of products must be positive");
        }
        if !(0.0..=1.0).contains(&self.duplicate_rate) || !(0.0..=1.0).contains(&self.cancel_rate) {
            bail!("--duplicate-rate and --cancel-rate must be between 0 and 1");
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
    let scratch = Scratch::create(&args.database_url)?;
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

/// The sibling binaries the demo starts.
struct Binaries {
    order: PathBuf,
    inventory: PathBuf,
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

/// The running processes (two relays per database, both services) and the way to their APIs.
struct Services {
    procs: BTreeMap<&'static str, Proc>,
    order_api: String,
    inventory_api: String,
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

    /// Waits (up to 60 s each) until both services answer GET /healthz.
    fn wait_healthy(&self, logs: &Path) -> Result<()> {
        for api in [&self.order_api, &self.inventory_api] {
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

fn count(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<N>(conn)?.n)
}

impl Demo {
    /// Step 3: schema and stock.
    fn seed_and_migrate(&self) -> Result<()> {
        self.seed("scarce-", self.args.scarce_products, 20)?;
        self.seed("ample-", self.args.ample_products, 100_000)?;
        let orders_url = &self.scratch.orders_url;
        run_tool(
            &self.bins.order,
            &["migrate", "--database-url", orders_url],
            "migrate orders",
        )
    }

    /// `demo-inventory seed`: products `<prefix>0..<products>` with `stock` units each.
    fn seed(&self, prefix: &str, products: u32, stock: i32) -> Result<()> {
        let (products, stock) = (products.to_string(), stock.to_string());
        let inventory_url = &self.scratch.inventory_url;
        run_tool(
            &self.bins.inventory,
            &[
                "seed",
                "--database-url",
                inventory_url,
                "--prefix",
                prefix,
                "--products",
                &products,
                "--stock",
                &stock,
            ],
            "seed",
        )
    }

    /// Step 4: the processes, each with its log; returns once both services answer.
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
        for (name, bin, url, port) in [
            ("order-service", &self.bins.order, &s.orders_url, order_port),
            (
                "inventory-service",
                &self.bins.inventory,
                &s.inventory_url,
                inventory_port,
            ),
        ] {
            let a = self.command_line("serve", url, &["--listen", &format!("127.0.0.1:{port}")]);
            procs.insert(name, Proc::start(bin, name, &a, &env, logs)?);
        }
        let services = Services {
            procs,
            order_api: format!("http://127.0.0.1:{order_port}"),
            inventory_api: format!("http://127.0.0.1:{inventory_port}"),
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

    /// Warm-up: one order through the whole loop, so consumer groups have their partitions
    /// before the clock starts. It is excluded from the latency figures.
    fn warm_up(&self, services: &Services) -> Result<()> {
        self.seed("warmup-", 1, 10)?;
        let (agent, api) = (&services.agent, &services.order_api);
        let warm: serde_json::Value = agent
            .post(&format!("{api}/orders"))
            .send_json(serde_json::json!({"user": "warmup", "product": "warmup-0", "quantity": 1, "amount_cents": 1}))?
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

    /// Step 5: the clients place the orders; the settled bar and (with `--chaos`) the kills
    /// follow them.
    fn drive_load(&self, services: &mut Services) -> Result<Load> {
        let args = &self.args;
        println!(
            "load       {} orders from {} clients ({:.0}% submitted twice, {:.0}% cancelled){}",
            args.orders,
            args.clients,
            args.duplicate_rate * 100.0,
            args.cancel_rate * 100.0,
            if args.chaos { ", with chaos" } else { "" }
        );
        let progress = Progress::new(args.orders)?;
        let clients = Clients {
            plan: args.plan(),
            next: Arc::new(AtomicUsize::new(0)),
            counters: Arc::new(Counters::default()),
            agent: services.agent.clone(),
            api: services.order_api.clone(),
            bar: progress.placed.clone(),
        };
        let mut chaos = Chaos::default();
        let started = Instant::now();
        let threads = clients.spawn(args.clients);
        let mut conns = self.scratch.connect()?;
        while threads.iter().any(|c| !c.is_finished()) {
            if args.chaos {
                chaos.during_load(services, clients.placed(), args.orders)?;
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
        progress.placed.finish();
        if args.chaos {
            chaos.after_load(services)?;
        }
        Ok(Load {
            progress,
            counters: clients.counters,
            chaos,
            conns,
            started,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    /// Step 6: waits until every order is decided, both outboxes are drained and `reconcile`
    /// finds no drift, or the settle timeout.
    fn wait_settled(&self, load: &mut Load) -> Result<Settled> {
        let deadline = Instant::now() + Duration::from_secs(self.args.settle_timeout_secs);
        let (conns, bar) = (&mut load.conns, &load.progress.settled);
        let mut reconcile = serde_json::Value::Null;
        let ok = loop {
            let pending = count(
                &mut conns.orders,
                "SELECT count(*) AS n FROM orders WHERE status = 'PENDING'",
            )?;
            let total = count(&mut conns.orders, "SELECT count(*) AS n FROM orders")?;
            bar.set_length(u64::try_from(total)?);
            bar.set_position(u64::try_from(total - pending)?);
            let backlog = count(&mut conns.orders, "SELECT count(*) AS n FROM outbox")?
                + count(&mut conns.inventory, "SELECT count(*) AS n FROM outbox")?;
            bar.set_message(format!("pending {pending}, outbox backlog {backlog}"));
            if pending == 0 && backlog == 0 {
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
        bar.finish();
        Ok(Settled {
            ok,
            reconcile,
            secs: load.started.elapsed().as_secs_f64() - load.secs,
        })
    }

    /// `demo-inventory reconcile --json`: its report (null when unreadable) and whether it
    /// exited 0.
    fn reconcile(&self) -> Result<(serde_json::Value, bool)> {
        let out = Command::new(&self.bins.inventory)
            .args([
                "reconcile",
                "--orders-db",
                &self.scratch.orders_url,
                "--inventory-db",
                &self.scratch.inventory_url,
                "--json",
            ])
            .output()?;
        let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        Ok((report, out.status.success()))
    }
}
