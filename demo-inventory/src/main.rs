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

/// The inventory service: stock per product, reserved once per order, restored once per
/// cancellation, replies through its own outbox.
#[derive(Debug, Parser)]
#[command(name = "demo-inventory", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve GET /stock/{product} and consume order events until SIGINT/SIGTERM.
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
    },
    /// Apply migrations and create products `<prefix>0..<products>` with `stock` units each.
    Seed {
        /// The inventory database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Product name prefix (the product class).
        #[arg(long, default_value = "p-")]
        prefix: String,
        /// How many products.
        #[arg(long, default_value_t = 100)]
        products: u32,
        /// Units of each.
        #[arg(long, default_value_t = 10)]
        stock: i32,
    },
    /// Compare orders, ledger and stock across both databases; exit 1 on drift.
    Reconcile {
        /// The order service's database.
        #[arg(long)]
        orders_db: String,
        /// The inventory database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        inventory_db: String,
        /// Fix what can be fixed from the ledger.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
        Command::Seed {
            database_url,
            prefix,
            products,
            stock,
        } => {
            let mut conn = PgConnection::establish(&database_url).context("connect")?;
            demo_inventory::migrate(&mut conn)?;
            for i in 0..products {
                demo_inventory::set_stock(&mut conn, &format!("{prefix}{i}"), stock)?;
            }
            println!("seeded {products} products {prefix}* with {stock} units");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Reconcile {
            orders_db,
            inventory_db,
            repair,
            json,
        } => {
            let mut orders =
                PgConnection::establish(&orders_db).context("connect to the orders database")?;
            let mut inventory = PgConnection::establish(&inventory_db)
                .context("connect to the inventory database")?;
            let report = demo_inventory::reconcile::run(&mut orders, &mut inventory, repair)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            Ok(if report.drift() == 0 || repair {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Serve {
            database_url,
            brokers,
            listen,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(database_url, brokers, listen))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn print_report(r: &demo_inventory::reconcile::Report) {
    println!("orders by status: {:?}", r.orders_by_status);
    for (what, items) in [
        ("stock differs from its ledger", &r.stock_vs_ledger),
        (
            "confirmed orders without a reservation",
            &r.confirmed_without_reservation,
        ),
        (
            "rejected orders holding stock",
            &r.rejected_with_reservation,
        ),
        ("cancelled orders not restored", &r.cancelled_not_restored),
        ("reservations without an order", &r.orphan_reservations),
    ] {
        println!(
            "{what:<40} {:>6}  {}",
            items.len(),
            items.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let off: Vec<_> = r
        .products
        .iter()
        .filter(|p| p.expected != p.actual)
        .collect();
    println!("{:<40} {:>6}", "products with unexpected stock", off.len());
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
    match m.event_type() {
        Some("OrderCreated") => {
            demo_inventory::reserve(conn, &m.json()?).map_err(to_handler_error)?;
        }
        Some("OrderCancelled") => {
            demo_inventory::restore(conn, &m.json()?).map_err(to_handler_error)?;
        }
        other => {
            return Err(HandlerError::Permanent(format!(
                "unexpected event type {other:?}"
            )))
        }
    }
    Ok(())
}

async fn serve(database_url: String, brokers: String, listen: SocketAddr) -> Result<()> {
    {
        let url = database_url.clone();
        outbox::blocking::run(move || -> Result<()> {
            demo_inventory::migrate(&mut PgConnection::establish(&url)?)?;
            Ok(())
        })
        .await??;
    }
    let pool = Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<PgConnection>::new(&database_url))?;
    let cfg = ConsumerConfig::new(
        &brokers,
        "demo-inventory",
        &[demo_inventory::ORDER_TOPIC],
        &database_url,
    )
    .kafka_option("session.timeout.ms", "6000")
    .kafka_option("heartbeat.interval.ms", "1000")
    // Low end-to-end latency: do not let an empty fetch wait 500 ms.
    .kafka_option("fetch.wait.max.ms", "10");
    let runner = ConsumerRunner::new(cfg, handle)?;
    let app = App {
        pool,
        stats: runner.stats(),
    };
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    outbox::shutdown::cancel_on_signals(&shutdown, &tasks)?;
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
