//! Prometheus metrics and the `/metrics` + `/healthz` endpoint.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `outbox_relay_delivered_total` | counter | events acknowledged by Kafka and removed |
//! | `outbox_relay_failed_total{kind}` | counter | failed deliveries (`permanent`/`transient`/`client`) |
//! | `outbox_relay_dead_lettered_total` | counter | events moved to `outbox_dead_letters` |
//! | `outbox_relay_backlog` | gauge | events waiting in the outbox |
//! | `outbox_relay_oldest_event_age_seconds` | gauge | age of the oldest waiting event |
//! | `outbox_relay_dead_letters` | gauge | rows in `outbox_dead_letters` |
//! | `outbox_relay_commit_to_ack_seconds` | histogram | writer transaction start to Kafka acknowledgement |
//! | `outbox_relay_oldest_transaction_age_seconds` | gauge | age of the oldest open transaction holding an xid (0 when none) |
//! | `outbox_relay_leader` | gauge | 1 while this process is the active relay |
//! | `outbox_relay_waiting_keys` | gauge | keys whose events wait behind an overdue acknowledgement (an unavailable partition) |
//! | `outbox_relay_overdue_events` | gauge | events sent but not acknowledged within `ack_overdue_ms` |
//! | `outbox_relay_slot_retained_wal_bytes` | gauge | streaming: WAL the server keeps for the slot (from its `restart_lsn`) |
//! | `outbox_relay_slot_lag_bytes` | gauge | streaming: WAL written since the slot's confirmed position |
//! | `outbox_relay_slot_safe_wal_bytes` | gauge | streaming: WAL that can still be written before the slot is invalidated (-1: unbounded, `max_slot_wal_keep_size = -1`) |
//! | `outbox_relay_slot_active` | gauge | streaming: 1 while a walsender streams the slot |
//! | `outbox_relay_slot_confirmed_lsn` | gauge | streaming: the position this process last confirmed (as a number) |
//!
//! The counters, `outbox_relay_leader`, the waiting gauges and the histogram are registered at
//! zero when the
//! recorder is installed, so every name exists from the first scrape (alerts and `rate()` need
//! that). The dashboard and alerts in `docs/ops/` use these names; `tests/tests/ops.rs` checks
//! them against a running relay's `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use diesel::sql_types::{BigInt, Double};
use diesel::{QueryableByName, RunQueryDsl};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use outbox::contract::Table;

use crate::error::{Error, Result};

static LEADER: AtomicBool = AtomicBool::new(false);

pub(crate) fn leader(is: bool) {
    LEADER.store(is, Ordering::Relaxed);
    metrics::gauge!("outbox_relay_leader").set(if is { 1.0 } else { 0.0 });
}

pub(crate) fn delivered(commit_to_ack: Duration) {
    metrics::counter!("outbox_relay_delivered_total").increment(1);
    metrics::histogram!("outbox_relay_commit_to_ack_seconds").record(commit_to_ack.as_secs_f64());
}

pub(crate) fn failed(kind: &'static str) {
    metrics::counter!("outbox_relay_failed_total", "kind" => kind).increment(1);
}

/// Keys whose later events wait behind an overdue acknowledgement, and the overdue events.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn waiting(keys: usize, overdue: usize) {
    metrics::gauge!("outbox_relay_waiting_keys").set(keys as f64);
    metrics::gauge!("outbox_relay_overdue_events").set(overdue as f64);
}

/// The position streaming capture just confirmed.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn stream_confirmed(lsn: u64) {
    metrics::gauge!("outbox_relay_slot_confirmed_lsn").set(lsn as f64);
}

pub(crate) fn dead_lettered(n: usize) {
    metrics::counter!("outbox_relay_dead_lettered_total").increment(n as u64);
}

/// Whether this process currently leads.
#[must_use]
pub fn is_leader() -> bool {
    LEADER.load(Ordering::Relaxed)
}

/// Installs the Prometheus recorder (once per process) and registers every metric at zero.
///
/// # Errors
/// [`Error::Config`] when a recorder is already installed.
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("outbox_relay_commit_to_ack_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .map_err(|e| Error::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| Error::Metrics(e.to_string()))?;
    metrics::gauge!("outbox_relay_leader").set(if is_leader() { 1.0 } else { 0.0 });
    metrics::counter!("outbox_relay_delivered_total").increment(0);
    // Streaming only; 0 under polling (no slot).
    for g in [
        "outbox_relay_slot_retained_wal_bytes",
        "outbox_relay_slot_lag_bytes",
        "outbox_relay_slot_active",
    ] {
        metrics::gauge!(g).set(0.0);
    }
    for kind in ["permanent", "transient"] {
        metrics::counter!("outbox_relay_failed_total", "kind" => kind).increment(0);
    }
    metrics::counter!("outbox_relay_dead_lettered_total").increment(0);
    waiting(0, 0);
    let _ = metrics::histogram!("outbox_relay_commit_to_ack_seconds");
    Ok(handle)
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown` (a task on `tasks`).
///
/// # Errors
/// [`Error::Io`] when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(target: "outbox::relay", %addr, "serving /metrics and /healthz");
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route(
            "/healthz",
            get(|| async {
                format!(
                    "{{\"status\":\"ok\",\"leader\":{}}}\n",
                    if is_leader() { "true" } else { "false" }
                )
            }),
        );
    tasks.spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn slot_gauges(s: &crate::store::stream::SlotInfo) {
    metrics::gauge!("outbox_relay_slot_retained_wal_bytes")
        .set(s.retained_bytes.unwrap_or(0) as f64);
    metrics::gauge!("outbox_relay_slot_lag_bytes").set(s.lag_bytes.unwrap_or(0) as f64);
    metrics::gauge!("outbox_relay_slot_safe_wal_bytes")
        .set(s.safe_wal_size.map_or(-1.0, |b| b as f64));
    metrics::gauge!("outbox_relay_slot_active").set(if s.active_pid.is_some() { 1.0 } else { 0.0 });
}

/// Updates the backlog gauges (and, with `slot`, the slot's) every `every` from its own
/// connection (named `application_name`), until `shutdown` (a task on `tasks`).
pub fn spawn_backlog_poller(
    database_url: String,
    application_name: String,
    tables: outbox::TableRef,
    slot: Option<String>,
    every: Duration,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) {
    #[derive(QueryableByName)]
    struct Backlog {
        #[diesel(sql_type = BigInt)]
        backlog: i64,
        #[diesel(sql_type = Double)]
        oldest_secs: f64,
        #[diesel(sql_type = BigInt)]
        dead: i64,
        #[diesel(sql_type = Double)]
        oldest_tx_secs: f64,
    }
    // The oldest transaction is the one `status` shows: other roles' transactions are visible
    // to roles with pg_read_all_stats (docs/ops/relay-role.sql grants it).
    let sql = format!(
        "SELECT (SELECT count(*) FROM {t}) AS backlog, \
         coalesce(extract(epoch FROM clock_timestamp() - (SELECT min(created_at) FROM {t})), 0)::float8 AS oldest_secs, \
         (SELECT count(*) FROM {d}) AS dead, \
         coalesce(extract(epoch FROM clock_timestamp() - (SELECT min(xact_start) FROM pg_stat_activity \
           WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid())), 0)::float8 AS oldest_tx_secs",
        t = tables.qualify(Table::Outbox),
        d = tables.qualify(Table::DeadLetters)
    );
    tasks.spawn(async move {
        let mut conn = None;
        loop {
            let (sql, url, name, slot) = (
                sql.clone(),
                database_url.clone(),
                application_name.clone(),
                slot.clone(),
            );
            let c = conn.take();
            let r = outbox::blocking::run(move || {
                let mut c = match c {
                    Some(c) => c,
                    None => crate::store::connect_as(&url, Some(&name))?,
                };
                let b = diesel::sql_query(&sql).get_result::<Backlog>(&mut c)?;
                let s = match &slot {
                    Some(slot) => crate::store::stream::slot_info(&mut c, slot)?,
                    None => None,
                };
                Ok::<_, Error>((c, b, s))
            })
            .await;
            if let Ok(Ok((c, b, s))) = r {
                conn = Some(c);
                if let Some(s) = s {
                    slot_gauges(&s);
                }
                #[allow(clippy::cast_precision_loss)]
                {
                    metrics::gauge!("outbox_relay_backlog").set(b.backlog as f64);
                    metrics::gauge!("outbox_relay_dead_letters").set(b.dead as f64);
                }
                metrics::gauge!("outbox_relay_oldest_event_age_seconds").set(b.oldest_secs);
                metrics::gauge!("outbox_relay_oldest_transaction_age_seconds")
                    .set(b.oldest_tx_secs);
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
        }
    });
}
