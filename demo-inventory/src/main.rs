//! `demo-inventory`: the inventory service of the demo.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use clap::{Parser, Subcommand};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, PgConnection};
use outbox::consumer::{
    ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage, RunnerStats,
};
use outbox::shutdown::TaskTracker;
use tokio_util::sync::CancellationToken;

/// The inventory centre: stock per product and warehouse (on hand, reserved, available),
/// reserved once per order, released once per cancellation before shipment, following each
/// warehouse's movements by its sync path; replies through its own outbox.
#[derive(Debug, Parser)]
#[command(name = "demo-inventory", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve GET /stock/{product}, consume order events and the warehouses' movements (push,
    /// capture and dual topics), pull the `--pull` warehouses, and reconcile the
    /// `--warehouse-db` ones every `--reconcile-every-secs`, until SIGINT/SIGTERM.
    Serve {
        /// The inventory database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS")]
        brokers: String,
        /// HTTP address.
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: SocketAddr,
        /// A warehouse to pull movements from: NAME=URL of its demo-warehouse (repeatable).
        #[arg(long = "pull", value_name = "NAME=URL")]
        pull: Vec<String>,
        /// How often to pull (ms).
        #[arg(long, default_value_t = 50)]
        pull_every_ms: u64,
        /// A warehouse database to reconcile against: NAME=DATABASE_URL (repeatable).
        #[arg(long = "warehouse-db", value_name = "NAME=DATABASE_URL")]
        warehouse_db: Vec<String>,
        /// Seconds between scheduled reconciliations (0: none; "nightly" in production).
        #[arg(long, default_value_t = 0)]
        reconcile_every_secs: u64,
        /// Movements younger than this are in flight, not drift.
        #[arg(long, default_value_t = 5)]
        reconcile_settle_secs: u64,
        /// Scheduled reconciliations apply the missing movements they find.
        #[arg(long)]
        repair: bool,
    },
    /// Apply the centre's migrations.
    Migrate {
        /// The inventory database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Compare orders, reservations and stock across the order and inventory databases, and
    /// (with --warehouse-db) each warehouse's movements and on hand with the centre's; exit 1 on
    /// drift.
    Reconcile {
        /// The order service's database.
        #[arg(long)]
        orders_db: String,
        /// The inventory database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        inventory_db: String,
        /// A warehouse database: NAME=DATABASE_URL (repeatable).
        #[arg(long = "warehouse-db", value_name = "NAME=DATABASE_URL")]
        warehouse_db: Vec<String>,
        /// Movements younger than this are in flight, not drift.
        #[arg(long, default_value_t = 0)]
        settle_secs: u64,
        /// Apply missing movements and recompute stock rows from reservations and movements.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `NAME=VALUE` pairs of a repeatable flag.
fn pairs(flag: &str, values: &[String]) -> Result<Vec<(String, String)>> {
    values
        .iter()
        .map(|v| {
            v.split_once('=')
                .filter(|(n, u)| !n.is_empty() && !u.is_empty())
                .map(|(n, u)| (n.to_owned(), u.to_owned()))
                .with_context(|| format!("--{flag} {v:?}: expected NAME=VALUE"))
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<std::process::ExitCode> {
    match cli.command {
        Command::Migrate { database_url } => {
            let mut conn = PgConnection::establish(&database_url).context("connect")?;
            demo_inventory::migrate(&mut conn)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Reconcile {
            orders_db,
            inventory_db,
            warehouse_db,
            settle_secs,
            repair,
            json,
        } => {
            let warehouses = pairs("warehouse-db", &warehouse_db)?;
            let mut orders =
                PgConnection::establish(&orders_db).context("connect to the orders database")?;
            let mut inventory = PgConnection::establish(&inventory_db)
                .context("connect to the inventory database")?;
            let mut found = Vec::new();
            for (name, url) in &warehouses {
                let mut wh = PgConnection::establish(url)
                    .with_context(|| format!("connect to warehouse {name}'s database"))?;
                found.push(demo_inventory::reconcile::warehouse(
                    &mut inventory,
                    &mut wh,
                    name,
                    std::time::Duration::from_secs(settle_secs),
                    repair,
                )?);
            }
            let report = demo_inventory::reconcile::run(&mut orders, &mut inventory, repair)?;
            let wh_drift: usize = found
                .iter()
                .map(|w| w.missing.len() - w.repaired.min(w.missing.len()) + w.on_hand_off.len())
                .sum();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "orders": report, "warehouses": found,
                    }))?
                );
            } else {
                print_report(&report);
                for w in &found {
                    println!(
                        "warehouse {:<12} missing movements {:>5} (repaired {}), on hand differing {:>4}  {}",
                        w.warehouse,
                        w.missing.len(),
                        w.repaired,
                        w.on_hand_off.len(),
                        w.on_hand_off.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
            Ok(if (report.drift() == 0 && wh_drift == 0) || repair {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Serve {
            database_url,
            brokers,
            listen,
            pull,
            pull_every_ms,
            warehouse_db,
            reconcile_every_secs,
            reconcile_settle_secs,
            repair,
        } => {
            let opts = ServeOptions {
                pull: pairs("pull", &pull)?,
                pull_every: std::time::Duration::from_millis(pull_every_ms.max(1)),
                warehouses: pairs("warehouse-db", &warehouse_db)?,
                reconcile_every: std::time::Duration::from_secs(reconcile_every_secs),
                settle: std::time::Duration::from_secs(reconcile_settle_secs),
                repair,
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(database_url, brokers, listen, opts))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn print_report(r: &demo_inventory::reconcile::Report) {
    println!("orders by status: {:?}", r.orders_by_status);
    for (what, items) in [
        (
            "confirmed orders without a reservation",
            &r.confirmed_without_reservation,
        ),
        (
            "shipped orders without a shipment",
            &r.shipped_without_shipment,
        ),
        (
            "rejected/cancelled orders holding stock",
            &r.holding_without_order,
        ),
        ("reservations without an order", &r.orphan_reservations),
        (
            "cancelled orders whose stock shipped",
            &r.cancelled_but_shipped,
        ),
        (
            "orders not told of their shipment",
            &r.order_behind_shipment,
        ),
        ("stock rows off their reservations/movements", &r.stock_off),
        ("stock rows with less on hand than reserved", &r.oversold),
    ] {
        println!(
            "{what:<44} {:>6}  {}",
            items.len(),
            items.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    println!(
        "{:<44} {:>6}",
        "shipments of unreserved orders (returns)", r.unreserved_shipments
    );
    for line in &r.repaired {
        println!("repaired: {line}");
    }
    println!(
        "{}",
        if r.drift() == 0 {
            "no drift"
        } else {
            "DRIFT FOUND"
        }
    );
}

#[derive(Clone)]
struct App {
    pool: Pool<ConnectionManager<PgConnection>>,
    stats: Arc<RunnerStats>,
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn stock(State(app): State<App>, Path(product): Path<String>) -> Response {
    let r = outbox::blocking::run(move || -> Result<Option<i32>> {
        let mut conn = app.pool.get()?;
        Ok(demo_inventory::available(&mut conn, &product)?)
    })
    .await;
    match r {
        Ok(Ok(Some(a))) => Json(serde_json::json!({ "available": a })).into_response(),
        Ok(Ok(None)) => json_error(StatusCode::NOT_FOUND, "unknown product"),
        Ok(Err(e)) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn to_handler_error(e: demo_inventory::Error) -> HandlerError {
    match e {
        demo_inventory::Error::Database(e) => e.into(),
        demo_inventory::Error::Outbox(e) => e.into(),
        other => HandlerError::Permanent(other.to_string()),
    }
}

fn handle(conn: &mut PgConnection, m: &IncomingMessage) -> Result<(), HandlerError> {
    match (m.topic.as_str(), m.event_type()) {
        (demo_inventory::ORDER_TOPIC, Some("OrderCreated")) => {
            demo_inventory::reserve(conn, &m.json()?).map_err(to_handler_error)?;
        }
        (demo_inventory::ORDER_TOPIC, Some("OrderCancelled")) => {
            let r = demo_inventory::release(conn, &m.json()?).map_err(to_handler_error)?;
            if r == demo_inventory::Release::AlreadyShipped {
                tracing::warn!(message = %m.message_id, "a cancellation of a shipped order: nothing released (a return)");
            }
        }
        (demo_inventory::PUSH_TOPIC, _) => {
            demo_inventory::apply_movement(conn, &m.json()?, "push").map_err(to_handler_error)?;
        }
        (demo_inventory::DUAL_TOPIC, _) => {
            demo_inventory::apply_movement(conn, &m.json()?, "dual").map_err(to_handler_error)?;
        }
        (demo_inventory::CAPTURE_TOPIC, _) => {
            let change: serde_json::Value = m.json()?;
            if let Some(mv) =
                demo_inventory::movement_from_change(&change).map_err(to_handler_error)?
            {
                demo_inventory::apply_movement(conn, &mv, "capture").map_err(to_handler_error)?;
            }
        }
        (topic, other) => {
            return Err(HandlerError::Permanent(format!(
                "unexpected event type {other:?} on {topic}"
            )))
        }
    }
    Ok(())
}

/// What `serve` does besides consuming.
struct ServeOptions {
    pull: Vec<(String, String)>,
    pull_every: std::time::Duration,
    warehouses: Vec<(String, String)>,
    reconcile_every: std::time::Duration,
    settle: std::time::Duration,
    repair: bool,
}

/// The pull path: asks `api` for the movements after the stored cursor, applies them and the new
/// cursor in ONE transaction (each movement once by its id), every `every`, until `stop`.
async fn pull_loop(
    pool: Pool<ConnectionManager<PgConnection>>,
    name: String,
    api: String,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    while !stop.is_cancelled() {
        let (pool, wh, api, agent) = (pool.clone(), name.clone(), api.clone(), agent.clone());
        let r = outbox::blocking::run(move || -> Result<usize> {
            let name = wh;
            let mut conn = pool.get()?;
            let cursor = demo_inventory::pull_cursor(&mut conn, &name)?;
            let page: serde_json::Value = agent
                .get(&format!("{api}/movements"))
                .query("after", &cursor)
                .query("limit", "1000")
                .call()?
                .into_json()?;
            let moves: Vec<demo_inventory::Movement> =
                serde_json::from_value(page["movements"].clone())?;
            let next = page["next"]
                .as_str()
                .context("pull answer without next")?
                .to_owned();
            conn.transaction(|c| -> Result<()> {
                for m in &moves {
                    demo_inventory::apply_movement(c, m, "pull")?;
                }
                demo_inventory::save_pull_cursor(c, &name, &next)?;
                Ok(())
            })?;
            Ok(moves.len())
        })
        .await;
        match r {
            Ok(Ok(n)) if n >= 1000 => continue,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(warehouse = %name, error = %e, "pull failed; trying again")
            }
            Err(e) => tracing::warn!(warehouse = %name, error = %e, "pull failed; trying again"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// The scheduled reconciliation of every warehouse database (each on its own connection).
async fn reconcile_loop(
    pool: Pool<ConnectionManager<PgConnection>>,
    warehouses: Vec<(String, String)>,
    every: std::time::Duration,
    settle: std::time::Duration,
    repair: bool,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let (pool, warehouses) = (pool.clone(), warehouses.clone());
        let r = outbox::blocking::run(move || -> Result<()> {
            let mut conn = pool.get()?;
            for (name, url) in &warehouses {
                let mut wh = PgConnection::establish(url)?;
                let w = demo_inventory::reconcile::warehouse(&mut conn, &mut wh, name, settle, repair)?;
                if !w.missing.is_empty() {
                    tracing::warn!(warehouse = %name, missing = w.missing.len(), repaired = w.repaired, "reconciliation found movements the centre never applied");
                }
            }
            Ok(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = r.map_err(anyhow::Error::from) {
            tracing::warn!(error = %e, "reconciliation failed; next round as scheduled");
        }
    }
}

async fn serve(
    database_url: String,
    brokers: String,
    listen: SocketAddr,
    opts: ServeOptions,
) -> Result<()> {
    {
        let url = database_url.clone();
        outbox::blocking::run(move || -> Result<()> {
            demo_inventory::migrate(&mut PgConnection::establish(&url)?)?;
            Ok(())
        })
        .await??;
    }
    let pool = Pool::builder()
        .max_size(6)
        .min_idle(Some(1))
        .build(ConnectionManager::<PgConnection>::new(&database_url))?;
    let cfg = ConsumerConfig::new(
        &brokers,
        "demo-inventory",
        &[
            demo_inventory::ORDER_TOPIC,
            demo_inventory::PUSH_TOPIC,
            demo_inventory::CAPTURE_TOPIC,
            demo_inventory::DUAL_TOPIC,
        ],
        &database_url,
    )
    .kafka_option("session.timeout.ms", "6000")
    .kafka_option("heartbeat.interval.ms", "1000")
    // Low end-to-end latency: do not let an empty fetch wait 500 ms.
    .kafka_option("fetch.wait.max.ms", "10");
    let runner = ConsumerRunner::new(cfg, handle)?;
    let app = App {
        pool: pool.clone(),
        stats: runner.stats(),
    };
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    outbox::shutdown::cancel_on_signals(&shutdown, &tasks)?;
    for (name, api) in opts.pull {
        tasks.spawn(pull_loop(
            pool.clone(),
            name,
            api,
            opts.pull_every,
            shutdown.clone(),
        ));
    }
    if !opts.reconcile_every.is_zero() && !opts.warehouses.is_empty() {
        tasks.spawn(reconcile_loop(
            pool.clone(),
            opts.warehouses,
            opts.reconcile_every,
            opts.settle,
            opts.repair,
            shutdown.clone(),
        ));
    }
    let router = Router::new()
        .route("/stock/{product}", get(stock))
        .route(
            "/stats",
            get(|State(app): State<App>| async move {
                Json(serde_json::json!({
                    "applied": app.stats.applied(),
                    "duplicates": app.stats.duplicates(),
                    "dead_lettered": app.stats.dead_lettered(),
                }))
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "demo-inventory serving");
    let token = shutdown.clone();
    let http = tasks.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
    });
    let result = runner.run(shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    result?;
    http.await??;
    Ok(())
}
