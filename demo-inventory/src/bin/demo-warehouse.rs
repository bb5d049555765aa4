//! `demo-warehouse`: a warehouse system (WMS) of the demo, with its own database. It records
//! inbound goods, shipments and stocktakes, and the inventory centre follows by the sync path
//! given with `--sync`: `push` (the outbox, in the movement's transaction), `capture` (no event
//! at all: the relay captures `wh_movements`), `pull` (the centre asks `GET /movements`), or
//! `dual` (the contrast: sent to Kafka after the commit, no outbox).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::{Parser, Subcommand};
use demo_inventory::warehouse::{self, Cursor, Outcome, Request, Sync};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, PgConnection};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

/// A warehouse system: stock on hand and its movements, synced to the inventory centre.
#[derive(Debug, Parser)]
#[command(name = "demo-warehouse", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the warehouse's migrations.
    Migrate {
        /// The warehouse database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Receive `units` of each product `<prefix>0..<products>` (inbound movements, synced like
    /// any other: the centre learns the initial stock by the warehouse's path).
    Seed {
        /// The warehouse database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// This warehouse's name.
        #[arg(long)]
        warehouse: String,
        /// The sync path (`push` writes the events through the outbox).
        #[arg(long)]
        sync: String,
        /// Product name prefix.
        #[arg(long, default_value = "p-")]
        prefix: String,
        /// How many products.
        #[arg(long, default_value_t = 10)]
        products: u32,
        /// Units of each.
        #[arg(long, default_value_t = 10)]
        units: i32,
        /// Kafka bootstrap servers (the dual path sends each movement there after its commit).
        #[arg(long, env = "KAFKA_BROKERS", default_value = "")]
        brokers: String,
    },
    /// Serve the warehouse's API until SIGINT/SIGTERM: POST /inbound, /shipments, /stocktake;
    /// GET /movements?after=TX:ID&limit=N (the pull path), /stock/{product}, /stats, /healthz.
    Serve {
        /// The warehouse database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// This warehouse's name.
        #[arg(long)]
        warehouse: String,
        /// The sync path: push, capture, pull or dual.
        #[arg(long)]
        sync: String,
        /// Kafka bootstrap servers (the dual path sends there).
        #[arg(long, env = "KAFKA_BROKERS", default_value = "")]
        brokers: String,
        /// HTTP address.
        #[arg(long, default_value = "127.0.0.1:8083")]
        listen: SocketAddr,
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
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Migrate { database_url } => {
            warehouse::migrate(&mut PgConnection::establish(&database_url).context("connect")?)?;
        }
        Command::Seed {
            database_url,
            warehouse: name,
            sync,
            prefix,
            products,
            units,
            brokers,
        } => {
            let sync: Sync = sync.parse()?;
            let mut conn = PgConnection::establish(&database_url).context("connect")?;
            warehouse::migrate(&mut conn)?;
            let rt = tokio::runtime::Runtime::new()?;
            let _guard = rt.enter();
            let (producer, stats) = (dual_producer(sync, &brokers)?, Arc::new(Stats::default()));
            for i in 0..products {
                let request = Request::Inbound {
                    product: format!("{prefix}{i}"),
                    quantity: units,
                };
                if let (Outcome::Moved(m), Some(p)) = (
                    warehouse::record(&mut conn, &name, sync, &request)?,
                    &producer,
                ) {
                    send_after_commit(p, &stats, &m);
                }
            }
            if let Some(p) = producer {
                p.flush(std::time::Duration::from_secs(30))
                    .context("the dual write's sends did not complete")?;
            }
            println!("{name}: received {units} units of {products} products {prefix}*");
        }
        Command::Serve {
            database_url,
            warehouse: name,
            sync,
            brokers,
            listen,
        } => {
            let sync: Sync = sync.parse()?;
            if sync == Sync::Dual && brokers.is_empty() {
                anyhow::bail!("--sync dual sends to Kafka: give --brokers");
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(database_url, name, sync, brokers, listen))?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    moved: AtomicU64,
    short: AtomicU64,
    repeated: AtomicU64,
    dual_sent: AtomicU64,
    dual_failed: AtomicU64,
}

#[derive(Clone)]
struct App {
    pool: Pool<ConnectionManager<PgConnection>>,
    name: Arc<str>,
    sync: Sync,
    producer: Option<FutureProducer>,
    stats: Arc<Stats>,
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Inbound {
    product: String,
    quantity: i32,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Shipment {
    order_id: String,
    product: String,
    quantity: i32,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Stocktake {
    product: String,
    counted: i32,
}

async fn move_stock(app: App, request: Request) -> Response {
    let (pool, name, sync) = (app.pool.clone(), app.name.clone(), app.sync);
    let r = outbox::blocking::run(move || -> Result<Outcome> {
        let mut conn = pool.get()?;
        Ok(warehouse::record(&mut conn, &name, sync, &request)?)
    })
    .await;
    let outcome = match r {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return match e.downcast_ref::<demo_inventory::Error>() {
                Some(demo_inventory::Error::Invalid(m)) => {
                    json_error(StatusCode::UNPROCESSABLE_ENTITY, m.clone())
                }
                _ => json_error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
            }
        }
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match outcome {
        Outcome::Moved(m) => {
            app.stats.moved.fetch_add(1, Ordering::Relaxed);
            if let Some(producer) = &app.producer {
                // The dual write: the commit is done; the event is sent now, and lost if the
                // process dies before librdkafka has it acknowledged.
                send_after_commit(producer, &app.stats, &m);
            }
            (StatusCode::CREATED, Json(m)).into_response()
        }
        Outcome::AlreadyShipped => {
            app.stats.repeated.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::OK,
                Json(serde_json::json!({"already_shipped": true})),
            )
                .into_response()
        }
        Outcome::Short { on_hand } => {
            app.stats.short.fetch_add(1, Ordering::Relaxed);
            json_error(
                StatusCode::CONFLICT,
                format!("not enough on hand to ship: {on_hand}"),
            )
        }
    }
}

/// The dual path's producer (none on the other paths).
fn dual_producer(sync: Sync, brokers: &str) -> Result<Option<FutureProducer>> {
    if sync != Sync::Dual {
        return Ok(None);
    }
    if brokers.is_empty() {
        anyhow::bail!("--sync dual sends to Kafka: give --brokers");
    }
    let p: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .context("create the dual-write producer")?;
    Ok(Some(p))
}

fn send_after_commit(producer: &FutureProducer, stats: &Arc<Stats>, m: &demo_inventory::Movement) {
    let Ok(payload) = serde_json::to_vec(m) else {
        return;
    };
    let key = format!("{}/{}", m.warehouse, m.product);
    let id = m.movement_id.to_string();
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: "ce_id",
            value: Some(id.as_bytes()),
        })
        .insert(rdkafka::message::Header {
            key: "ce_type",
            value: Some("StockMoved"),
        });
    let record = FutureRecord::to(demo_inventory::DUAL_TOPIC)
        .key(&key)
        .payload(&payload)
        .headers(headers);
    match producer.send_result(record) {
        Ok(delivery) => {
            let stats = Arc::clone(stats);
            tokio::spawn(async move {
                match delivery.await {
                    Ok(Ok(_)) => stats.dual_sent.fetch_add(1, Ordering::Relaxed),
                    _ => stats.dual_failed.fetch_add(1, Ordering::Relaxed),
                };
            });
        }
        Err(_) => {
            stats.dual_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `after=TX:ID&limit=N` (both optional).
fn after_and_limit(query: Option<&str>) -> Result<(Cursor, i64), String> {
    let (mut cursor, mut limit) = (Cursor::default(), 500);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("after", v)) => {
                cursor = v
                    .replace("%3A", ":")
                    .replace("%3a", ":")
                    .parse()
                    .map_err(|e: demo_inventory::Error| e.to_string())?
            }
            Some(("limit", v)) => {
                limit = v
                    .parse()
                    .map_err(|_| format!("limit {v:?} is not a number"))?;
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?} (after=TX:ID, limit=N)"
                ))
            }
        }
    }
    Ok((cursor, limit))
}

async fn movements(State(app): State<App>, RawQuery(query): RawQuery) -> Response {
    let (cursor, limit) = match after_and_limit(query.as_deref()) {
        Ok(c) => c,
        Err(e) => return json_error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let pool = app.pool.clone();
    let r = outbox::blocking::run(move || -> Result<_> {
        let mut conn = pool.get()?;
        Ok(warehouse::movements_after(&mut conn, cursor, limit)?)
    })
    .await;
    match r {
        Ok(Ok((moves, next))) => Json(serde_json::json!({
            "movements": moves, "next": next.to_string(),
        }))
        .into_response(),
        Ok(Err(e)) => json_error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn stock(State(app): State<App>, Path(product): Path<String>) -> Response {
    #[derive(diesel::QueryableByName)]
    struct H {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        on_hand: i32,
    }
    let (pool, name) = (app.pool.clone(), app.name.clone());
    let r = outbox::blocking::run(move || -> Result<Option<i32>> {
        use diesel::RunQueryDsl;
        let mut conn = pool.get()?;
        Ok(
            diesel::sql_query("SELECT on_hand FROM wh_stock WHERE product = $1 AND warehouse = $2")
                .bind::<diesel::sql_types::Text, _>(&product)
                .bind::<diesel::sql_types::Text, _>(&*name)
                .load::<H>(&mut conn)?
                .pop()
                .map(|h| h.on_hand),
        )
    })
    .await;
    match r {
        Ok(Ok(Some(n))) => Json(serde_json::json!({ "on_hand": n })).into_response(),
        Ok(Ok(None)) => json_error(StatusCode::NOT_FOUND, "unknown product"),
        Ok(Err(e)) => json_error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

impl From<Inbound> for Request {
    fn from(i: Inbound) -> Self {
        Request::Inbound {
            product: i.product,
            quantity: i.quantity,
        }
    }
}

impl From<Shipment> for Request {
    fn from(s: Shipment) -> Self {
        Request::Shipment {
            order_id: s.order_id,
            product: s.product,
            quantity: s.quantity,
        }
    }
}

impl From<Stocktake> for Request {
    fn from(s: Stocktake) -> Self {
        Request::Stocktake {
            product: s.product,
            counted: s.counted,
        }
    }
}

/// POST of one movement request: the body read as `T` (a 422 naming what is wrong), then
/// recorded.
async fn post_request<T: serde::de::DeserializeOwned + Into<Request>>(
    State(app): State<App>,
    b: axum::body::Bytes,
) -> Response {
    match body::<T>(&b) {
        Ok(r) => move_stock(app, r.into()).await,
        Err(r) => *r,
    }
}

/// The body as `T`, or a 422 naming what is wrong.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid body: {e}"),
        ))
    })
}

async fn serve(
    database_url: String,
    name: String,
    sync: Sync,
    brokers: String,
    listen: SocketAddr,
) -> Result<()> {
    {
        let url = database_url.clone();
        outbox::blocking::run(move || -> Result<()> {
            warehouse::migrate(&mut PgConnection::establish(&url)?)?;
            Ok(())
        })
        .await??;
    }
    let pool = Pool::builder()
        .max_size(6)
        .min_idle(Some(1))
        .build(ConnectionManager::<PgConnection>::new(&database_url))?;
    let producer = dual_producer(sync, &brokers)?;
    let app = App {
        pool,
        name: name.clone().into(),
        sync,
        producer: producer.clone(),
        stats: Arc::new(Stats::default()),
    };
    let shutdown = CancellationToken::new();
    let tasks = outbox::shutdown::TaskTracker::new();
    outbox::shutdown::cancel_on_signals(&shutdown, &tasks)?;
    let router = Router::new()
        .route("/inbound", post(post_request::<Inbound>))
        .route("/shipments", post(post_request::<Shipment>))
        .route("/stocktake", post(post_request::<Stocktake>))
        .route("/movements", get(movements))
        .route("/stock/{product}", get(stock))
        .route(
            "/stats",
            get(|State(app): State<App>| async move {
                let s = &app.stats;
                Json(serde_json::json!({
                    "warehouse": &*app.name,
                    "sync": app.sync.name(),
                    "moved": s.moved.load(Ordering::Relaxed),
                    "short": s.short.load(Ordering::Relaxed),
                    "repeated": s.repeated.load(Ordering::Relaxed),
                    "dual_sent": s.dual_sent.load(Ordering::Relaxed),
                    "dual_failed": s.dual_failed.load(Ordering::Relaxed),
                }))
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, warehouse = %name, sync = sync.name(), "demo-warehouse serving");
    let token = shutdown.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    if let Some(p) = producer {
        let _ = p.flush(std::time::Duration::from_secs(5));
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}
