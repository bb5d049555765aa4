//! `demo`: the whole system on one machine, in one command.
//!
//! Creates two databases, starts a Kafka broker (librdkafka's embedded mock cluster unless
//! `--brokers` names a real one), seeds the inventory, starts `demo-order serve`,
//! `demo-inventory serve` and two `outbox-relay run` per database as separate processes, drives
//! concurrent clients (duplicate submissions with the same Idempotency-Key, cancellations), can
//! kill -9 and restart a relay and a consumer (`--chaos`), waits until everything settled, and
//! prints a report. Exits 1 on any inconsistency.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::Rng;

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

struct Proc {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn start(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(String, String)],
        logs: &Path,
    ) -> Result<Self> {
        let mut p = Self {
            name: name.to_owned(),
            args: std::iter::once(bin.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
            env: env.to_vec(),
            child: None,
            log: logs.join(format!("{name}.log")),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.args[0]);
        cmd.args(&self.args[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {}", self.name))?,
        );
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn with_db(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    query.map_or_else(|| format!("{base}/{db}"), |q| format!("{base}/{db}?{q}"))
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<N>(conn)?.n)
}

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    idempotent_repeats: AtomicU64,
    cancels: AtomicU64,
    cancel_refused: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
}

/// Chaos: SIGKILL a process, restart it a second later, and log it.
fn kill_and_restart(p: &mut Proc, when: &str, log: &Mutex<Vec<String>>) -> Result<()> {
    p.kill9();
    log.lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .push(format!("kill -9 {} {when}, restarted 1 s later", p.name));
    std::thread::sleep(Duration::from_secs(1));
    p.spawn()
}

/// Adds the inventory service's counters to `banked` before chaos kills it.
fn bank_stats(agent: &ureq::Agent, api: &str, name: &str, banked: &Mutex<(u64, u64)>) {
    if name != "inventory-service" {
        return;
    }
    let stats: serde_json::Value = agent
        .get(&format!("{api}/stats"))
        .call()
        .ok()
        .and_then(|r| r.into_json().ok())
        .unwrap_or_default();
    if let Ok(mut b) = banked.lock() {
        b.0 += stats["duplicates"].as_u64().unwrap_or(0);
        b.1 += stats["dead_lettered"].as_u64().unwrap_or(0);
    }
}

/// Creates the demo's topics on an external cluster (existing ones are fine).
fn create_topics(brokers: &str) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics = [
        NewTopic::new("orders.events", 6, TopicReplication::Fixed(1)),
        NewTopic::new("inventory.events", 6, TopicReplication::Fixed(1)),
        NewTopic::new("demo-order.dlq", 1, TopicReplication::Fixed(1)),
        NewTopic::new("demo-inventory.dlq", 1, TopicReplication::Fixed(1)),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(admin.create_topics(
        &topics,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for r in results {
        if let Err((name, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("create topic {name}: {code}");
            }
        }
    }
    Ok(())
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

#[allow(clippy::too_many_lines)]
fn run(args: Args) -> Result<bool> {
    if args.orders == 0 || args.clients == 0 || args.scarce_products + args.ample_products == 0 {
        bail!("--orders, --clients and the number of products must be positive");
    }
    if !(0.0..=1.0).contains(&args.duplicate_rate) || !(0.0..=1.0).contains(&args.cancel_rate) {
        bail!("--duplicate-rate and --cancel-rate must be between 0 and 1");
    }
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
    let (order_bin, inventory_bin, relay_bin) = (
        bin("demo-order")?,
        bin("demo-inventory")?,
        bin("outbox-relay")?,
    );

    // 1. Databases.
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (orders_db, inventory_db) = (
        format!("demo_orders_{suffix}"),
        format!("demo_inventory_{suffix}"),
    );
    let mut admin = PgConnection::establish(&args.database_url)
        .with_context(|| "connect to Postgres (scripts/setup starts it)".to_string())?;
    for db in [&orders_db, &inventory_db] {
        diesel::sql_query(format!("CREATE DATABASE \"{db}\"")).execute(&mut admin)?;
    }
    let (orders_url, inventory_url) = (
        with_db(&args.database_url, &orders_db),
        with_db(&args.database_url, &inventory_db),
    );
    let logs = std::env::temp_dir().join(format!("outbox-demo-{suffix}"));
    std::fs::create_dir_all(&logs)?;
    println!("databases  {orders_db}, {inventory_db}");
    println!("logs       {}", logs.display());

    // 2. Broker.
    let cluster;
    let brokers = if let Some(b) = &args.brokers {
        create_topics(b)?;
        b.clone()
    } else {
        cluster = rdkafka::mocking::MockCluster::new(3)?;
        for t in ["orders.events", "inventory.events"] {
            cluster.create_topic(t, 6, 3)?;
        }
        for t in ["demo-order.dlq", "demo-inventory.dlq"] {
            cluster.create_topic(t, 1, 3)?;
        }
        cluster.bootstrap_servers()
    };
    println!(
        "broker     {brokers}{}",
        if args.brokers.is_some() {
            ""
        } else {
            " (embedded mock cluster)"
        }
    );

    // 3. Schema and stock.
    let seed = |prefix: &str, products: u32, stock: i32| -> Result<()> {
        let out = Command::new(&inventory_bin)
            .args(["seed", "--database-url", &inventory_url, "--prefix", prefix])
            .args([
                "--products",
                &products.to_string(),
                "--stock",
                &stock.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!("seed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    seed("scarce-", args.scarce_products, 20)?;
    seed("ample-", args.ample_products, 100_000)?;
    let out = Command::new(&order_bin)
        .args(["migrate", "--database-url", &orders_url])
        .output()?;
    if !out.status.success() {
        bail!("migrate orders: {}", String::from_utf8_lossy(&out.stderr));
    }

    // 4. Processes.
    let (order_port, inventory_port) = (free_port()?, free_port()?);
    let env = vec![("RUST_LOG".to_owned(), "info".to_owned())];
    let mut procs: BTreeMap<&str, Proc> = BTreeMap::new();
    for (name, url) in [
        ("relay-orders-a", &orders_url),
        ("relay-orders-b", &orders_url),
        ("relay-inventory-a", &inventory_url),
        ("relay-inventory-b", &inventory_url),
    ] {
        let a = vec![
            "run".into(),
            "--database-url".into(),
            url.clone(),
            "--brokers".into(),
            brokers.clone(),
            "--allow-superuser".into(),
            "--lease-ms".into(),
            "2000".into(),
            "--standby-poll-ms".into(),
            "200".into(),
            "--idle-poll-max-ms".into(),
            "20".into(),
        ];
        procs.insert(name, Proc::start(&relay_bin, name, &a, &env, &logs)?);
    }
    let serve = |url: &str, port: u16| -> Vec<String> {
        vec![
            "serve".into(),
            "--database-url".into(),
            url.into(),
            "--brokers".into(),
            brokers.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ]
    };
    procs.insert(
        "order-service",
        Proc::start(
            &order_bin,
            "order-service",
            &serve(&orders_url, order_port),
            &env,
            &logs,
        )?,
    );
    procs.insert(
        "inventory-service",
        Proc::start(
            &inventory_bin,
            "inventory-service",
            &serve(&inventory_url, inventory_port),
            &env,
            &logs,
        )?,
    );
    let order_api = format!("http://127.0.0.1:{order_port}");
    let inventory_api = format!("http://127.0.0.1:{inventory_port}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    for api in [&order_api, &inventory_api] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.get(&format!("{api}/healthz")).call().is_err() {
            if Instant::now() > deadline {
                bail!("{api} did not come up (see {})", logs.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Warm-up: one order through the whole loop, so consumer groups have their partitions
    // before the clock starts. It is excluded from the latency figures.
    seed("warmup-", 1, 10)?;
    let warm: serde_json::Value = agent
        .post(&format!("{order_api}/orders"))
        .send_json(serde_json::json!({"user": "warmup", "product": "warmup-0", "quantity": 1, "amount_cents": 1}))?
        .into_json()?;
    let warm_id = warm["id"].as_str().context("warm-up order id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let o: serde_json::Value = agent
            .get(&format!("{order_api}/orders/{warm_id}"))
            .call()?
            .into_json()?;
        if o["status"] == "CONFIRMED" {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the warm-up order was not confirmed within 90 s (see {})",
                logs.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // 5. Load.
    println!(
        "load       {} orders from {} clients ({:.0}% submitted twice, {:.0}% cancelled){}",
        args.orders,
        args.clients,
        args.duplicate_rate * 100.0,
        args.cancel_rate * 100.0,
        if args.chaos { ", with chaos" } else { "" }
    );
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")?
        .progress_chars("=> ");
    let sent_bar = bars.add(
        ProgressBar::new(args.orders as u64)
            .with_style(style.clone())
            .with_prefix("placed"),
    );
    let settled_bar = bars.add(
        ProgressBar::new(args.orders as u64)
            .with_style(style)
            .with_prefix("settled"),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let counters = Arc::new(Counters::default());
    let chaos_log: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let (next, counters, agent, api) = (Arc::clone(&next), Arc::clone(&counters), agent.clone(), order_api.clone());
            let (bar, total, dup, cancel) = (sent_bar.clone(), args.orders, args.duplicate_rate, args.cancel_rate);
            let (scarce, ample) = (args.scarce_products, args.ample_products);
            std::thread::spawn(move || {
                let mut rng = rand::thread_rng();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let product = if scarce > 0 && (ample == 0 || rng.gen_bool(0.5)) {
                        format!("scarce-{}", rng.gen_range(0..scarce))
                    } else {
                        format!("ample-{}", rng.gen_range(0..ample))
                    };
                    let body = serde_json::json!({
                        "user": format!("user-{}", i % 500), "product": product,
                        "quantity": rng.gen_range(1..=3), "amount_cents": rng.gen_range(100..10_000),
                    });
                    let key = uuid::Uuid::new_v4().to_string();
                    let submit = |expect_new: bool| -> Option<String> {
                        for attempt in 0..20 {
                            match agent.post(&format!("{api}/orders")).set("Idempotency-Key", &key).send_json(body.clone()) {
                                Ok(resp) => {
                                    let status = resp.status();
                                    let order: serde_json::Value = resp.into_json().ok()?;
                                    if status == 201 || (attempt > 0 && status == 200) {
                                        counters.created.fetch_add(u64::from(expect_new || status == 201), Ordering::Relaxed);
                                    } else if status == 200 {
                                        counters.idempotent_repeats.fetch_add(1, Ordering::Relaxed);
                                    }
                                    return order["id"].as_str().map(str::to_owned);
                                }
                                Err(ureq::Error::Status(code, r)) if code < 500 => {
                                    counters.errors.fetch_add(1, Ordering::Relaxed);
                                    eprintln!("order refused ({code}): {}", r.into_string().unwrap_or_default());
                                    return None;
                                }
                                Err(_) => {
                                    // Transport error or 5xx: retry with the SAME key.
                                    counters.retries.fetch_add(1, Ordering::Relaxed);
                                    std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
                                }
                            }
                        }
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        None
                    };
                    let Some(id) = submit(true) else { continue };
                    if rng.gen_bool(dup) {
                        if let Some(again) = submit(false) {
                            if again != id {
                                counters.errors.fetch_add(1, Ordering::Relaxed);
                                eprintln!("idempotency violated: {id} then {again}");
                            }
                        }
                    }
                    if rng.gen_bool(cancel) {
                        match agent.post(&format!("{api}/orders/{id}/cancel")).call() {
                            Ok(_) => counters.cancels.fetch_add(1, Ordering::Relaxed),
                            Err(ureq::Error::Status(409, _)) => counters.cancel_refused.fetch_add(1, Ordering::Relaxed),
                            Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    bar.inc(1);
                }
            })
        })
        .collect();

    let mut orders_conn = PgConnection::establish(&orders_url)?;
    let mut inventory_conn = PgConnection::establish(&inventory_url)?;
    let mut chaos_done = 0;
    // Counters of inventory-service processes killed by chaos (a restart starts from zero).
    let banked: Mutex<(u64, u64)> = Mutex::new((0, 0));
    while clients.iter().any(|c| !c.is_finished()) {
        let placed = next.load(Ordering::Relaxed).min(args.orders);
        if args.chaos {
            let steps: [(usize, &str); 3] = [
                (4, "relay-orders-a"),
                (2, "inventory-service"),
                (4, "relay-inventory-a"),
            ];
            if let Some((divisor, name)) = steps.get(chaos_done) {
                let at = match chaos_done {
                    0 => args.orders / *divisor,
                    1 => args.orders / 2,
                    _ => args.orders * 3 / *divisor,
                };
                if placed >= at {
                    bank_stats(&agent, &inventory_api, name, &banked);
                    let p = procs.get_mut(name).context("process")?;
                    kill_and_restart(p, &format!("at {placed} orders"), &chaos_log)?;
                    chaos_done += 1;
                }
            }
        }
        let settled = count(
            &mut orders_conn,
            "SELECT count(*) AS n FROM orders WHERE status <> 'PENDING'",
        )?;
        settled_bar.set_position(u64::try_from(settled)?);
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in clients {
        let _ = c.join();
    }
    sent_bar.finish();
    // Chaos steps the (short) load did not reach happen now, while messages are still in flight.
    let chaos_steps = ["relay-orders-a", "inventory-service", "relay-inventory-a"];
    while args.chaos && chaos_done < chaos_steps.len() {
        let name = chaos_steps[chaos_done];
        bank_stats(&agent, &inventory_api, name, &banked);
        let p = procs.get_mut(name).context("process")?;
        kill_and_restart(p, "after the load", &chaos_log)?;
        chaos_done += 1;
    }
    let load_secs = started.elapsed().as_secs_f64();

    // 6. Settle: every order decided, both outboxes drained, no drift.
    let deadline = Instant::now() + Duration::from_secs(args.settle_timeout_secs);
    let mut report_json = serde_json::Value::Null;
    let settled_ok = loop {
        let pending = count(
            &mut orders_conn,
            "SELECT count(*) AS n FROM orders WHERE status = 'PENDING'",
        )?;
        let total = count(&mut orders_conn, "SELECT count(*) AS n FROM orders")?;
        settled_bar.set_length(u64::try_from(total)?);
        settled_bar.set_position(u64::try_from(total - pending)?);
        let backlog = count(&mut orders_conn, "SELECT count(*) AS n FROM outbox")?
            + count(&mut inventory_conn, "SELECT count(*) AS n FROM outbox")?;
        settled_bar.set_message(format!("pending {pending}, outbox backlog {backlog}"));
        if pending == 0 && backlog == 0 {
            let out = Command::new(&inventory_bin)
                .args([
                    "reconcile",
                    "--orders-db",
                    &orders_url,
                    "--inventory-db",
                    &inventory_url,
                    "--json",
                ])
                .output()?;
            report_json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if out.status.success() {
                break true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    settled_bar.finish();
    let settle_secs = started.elapsed().as_secs_f64() - load_secs;

    // 7. Report.
    let stats = |api: &str| -> serde_json::Value {
        agent
            .get(&format!("{api}/stats"))
            .call()
            .ok()
            .and_then(|r| r.into_json().ok())
            .unwrap_or_default()
    };
    let (order_stats, inventory_stats) = (stats(&order_api), stats(&inventory_api));
    #[derive(QueryableByName)]
    struct Status {
        #[diesel(sql_type = Text)]
        status: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let statuses: Vec<Status> = diesel::sql_query(
        "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status",
    )
    .load(&mut orders_conn)?;
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
    let lat: Latency = diesel::sql_query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50, percentile_cont(0.9) WITHIN GROUP (ORDER BY s) AS p90, \
         percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99, max(s) AS max FROM \
         (SELECT extract(epoch FROM confirmed_at - created_at)::float8 * 1000 AS s FROM orders \
         WHERE confirmed_at IS NOT NULL AND user_id <> 'warmup') t",
    )
    .get_result(&mut orders_conn)?;
    let min_stock = count(
        &mut inventory_conn,
        "SELECT coalesce(min(available), 0)::bigint AS n FROM stock",
    )?;
    let c = &counters;
    let line = |k: &str, v: String| println!("| {k:<46} | {v:>22} |");
    let rule = || println!("|{}|{}|", "-".repeat(48), "-".repeat(24));
    println!();
    println!("| {:<46} | {:>22} |", "", "");
    rule();
    for s in &statuses {
        line(&format!("orders {}", s.status), s.n.to_string());
    }
    line(
        "orders placed (HTTP 201, warm-up not counted)",
        c.created.load(Ordering::Relaxed).to_string(),
    );
    let mut class_ok = true;
    for class in ["scarce-", "ample-"] {
        let products: Vec<&serde_json::Value> = report_json["products"]
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
    line(
        "lowest stock of any product (never < 0)",
        min_stock.to_string(),
    );
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
    let (banked_dups, banked_dead) = *banked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    line(
        "inbox redeliveries absorbed (order, inventory)",
        format!(
            "{} / {}",
            n(&order_stats["duplicates"]),
            n(&inventory_stats["duplicates"]) + banked_dups
        ),
    );
    line(
        "dead-lettered messages (order, inventory)",
        format!(
            "{} / {}",
            n(&order_stats["dead_lettered"]),
            n(&inventory_stats["dead_lettered"]) + banked_dead
        ),
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"));
    line(
        "created -> confirmed p50 / p90",
        format!("{} / {}", ms(lat.p50), ms(lat.p90)),
    );
    line(
        "created -> confirmed p99 / max",
        format!("{} / {}", ms(lat.p99), ms(lat.max)),
    );
    let drift = [
        "stock_vs_ledger",
        "confirmed_without_reservation",
        "rejected_with_reservation",
        "cancelled_not_restored",
        "orphan_reservations",
    ]
    .iter()
    .map(|k| report_json[k].as_array().map_or(0, Vec::len))
    .sum::<usize>();
    line(
        "reconcile drift (orders vs ledger vs stock)",
        if report_json.is_null() {
            "not run".into()
        } else {
            drift.to_string()
        },
    );
    line(
        "client errors",
        c.errors.load(Ordering::Relaxed).to_string(),
    );
    line(
        "load / settle time",
        format!("{load_secs:.1} s / {settle_secs:.1} s"),
    );
    for e in chaos_log
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        println!("chaos: {e}");
    }
    let ok = settled_ok
        && drift == 0
        && class_ok
        && min_stock >= 0
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

    // 8. Stop and clean up.
    for p in procs.values_mut() {
        p.terminate();
    }
    drop(orders_conn);
    drop(inventory_conn);
    if args.keep {
        println!("kept: {orders_url} {inventory_url} {}", logs.display());
    } else {
        for db in [&orders_db, &inventory_db] {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .execute(&mut admin);
        }
        if ok {
            let _ = std::fs::remove_dir_all(&logs);
        }
    }
    Ok(ok)
}
