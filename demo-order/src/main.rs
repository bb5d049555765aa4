//! `demo-order`: the order service of the demo.

// Handlers return `Result<_, Response>`: the error is the HTTP answer (the axum idiom).
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::{Parser, Subcommand};
use demo_order::{Error, NewOrder};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, PgConnection};
use outbox::consumer::{
    ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage, RunnerStats,
};
use outbox::shutdown::TaskTracker;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The order service: orders and their events in one transaction, confirmed or rejected by the
/// inventory's replies.
#[derive(Debug, Parser)]
#[command(name = "demo-order", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API and consume inventory replies until SIGINT/SIGTERM.
    Serve {
        /// The order database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS")]
        brokers: String,
        /// HTTP address.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Apply the migrations (outbox, inbox, orders).
    Migrate {
        /// The order database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
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
    let result = match Cli::parse().command {
        Command::Migrate { database_url } => PgConnection::establish(&database_url)
            .context("connect")
            .and_then(|mut c| Ok(demo_order::migrate(&mut c)?)),
        Command::Serve {
            database_url,
            brokers,
            listen,
        } => tokio::runtime::Runtime::new()
            .context("runtime")
            .and_then(|rt| rt.block_on(serve(database_url, brokers, listen))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Clone)]
struct App {
    pool: Pool<ConnectionManager<PgConnection>>,
    stats: Arc<RunnerStats>,
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn error_response(e: &Error) -> Response {
    let status = match e {
        Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::KeyReused(_) | Error::InvalidTransition { .. } => StatusCode::CONFLICT,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_error(status, e.to_string())
}

async fn blocking<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&mut PgConnection) -> Result<T, Error> + Send + 'static,
) -> Result<T, Response> {
    let pool = app.pool.clone();
    match outbox::blocking::run(move || {
        let mut conn = pool
            .get()
            .map_err(|e| json_error(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}")))?;
        f(&mut conn).map_err(|e| error_response(&e))
    })
    .await
    {
        Ok(r) => r,
        Err(e) => Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn create_order(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let new: NewOrder = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return json_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("invalid body: {e}"),
            )
        }
    };
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k.to_owned()),
        Some(Err(_)) => {
            return json_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key must be visible ASCII",
            )
        }
    };
    match blocking(&app, move |c| demo_order::create(c, key.as_deref(), &new)).await {
        Ok((order, true)) => (StatusCode::CREATED, Json(order)).into_response(),
        Ok((order, false)) => (StatusCode::OK, Json(order)).into_response(),
        Err(r) => r,
    }
}

fn parse_id(id: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(id).map_err(|_| {
        json_error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an order id"),
        )
    })
}

async fn get_order(State(app): State<App>, Path(id): Path<String>) -> Response {
    order_by_id(&app, &id, demo_order::get).await
}

async fn cancel_order(State(app): State<App>, Path(id): Path<String>) -> Response {
    order_by_id(&app, &id, demo_order::cancel).await
}

/// POST /orders/{id}/fulfil: a CONFIRMED order is handed to its warehouse to ship (SHIPPING);
/// from then on a cancellation is refused. The one place that decides cancel against ship.
async fn fulfil_order(State(app): State<App>, Path(id): Path<String>) -> Response {
    order_by_id(&app, &id, demo_order::fulfil).await
}

/// The routes on one order: parse the id, run `f` on it, answer with the order.
async fn order_by_id(
    app: &App,
    id: &str,
    f: fn(&mut PgConnection, Uuid) -> Result<demo_order::Order, Error>,
) -> Response {
    let id = match parse_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match blocking(app, move |c| f(c, id)).await {
        Ok(order) => Json(order).into_response(),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct Reply {
    order_id: Uuid,
    reason: Option<String>,
    warehouse: Option<String>,
}

fn handle(conn: &mut PgConnection, m: &IncomingMessage) -> Result<(), HandlerError> {
    let reply: Reply = m.json()?;
    let kind = m.event_type().unwrap_or_default();
    demo_order::apply_reply(
        conn,
        kind,
        reply.order_id,
        reply.reason.as_deref(),
        reply.warehouse.as_deref(),
    )
    .map_err(|e| match e {
        Error::Database(e) => e.into(),
        other => HandlerError::Permanent(other.to_string()),
    })?;
    Ok(())
}

async fn serve(database_url: String, brokers: String, listen: SocketAddr) -> Result<()> {
    {
        let url = database_url.clone();
        outbox::blocking::run(move || -> Result<()> {
            demo_order::migrate(&mut PgConnection::establish(&url)?)?;
            Ok(())
        })
        .await??;
    }
    let pool = Pool::builder()
        .max_size(8)
        .min_idle(Some(1))
        .build(ConnectionManager::<PgConnection>::new(&database_url))?;
    let cfg = ConsumerConfig::new(&brokers, "demo-order", &["inventory.events"], &database_url)
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
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/orders/{id}/fulfil", post(fulfil_order))
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
    tracing::info!(%listen, "demo-order serving");
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
