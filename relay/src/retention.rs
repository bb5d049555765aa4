//! Retention: the leader purges delivered events kept for replay (`keep_delivered_hours`) and old
//! dead letters (`dead_letters_keep_days`) in small batches, each its own short transaction, by
//! the age index, so no purge holds locks or a snapshot for long.
//!
//! Inbox rows are purged by the consumer runner (`outbox::ConsumerConfig::retention`), not here:
//! the relay does not know consumers' redelivery windows.

use std::time::Duration;

use diesel::sql_types::{BigInt, Double};
use diesel::{PgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use outbox::contract::Table;

use crate::config::RelayConfig;
use crate::error::Result;
use crate::store;

const TARGET: &str = "outbox::relay::retention";

/// Rows per purge statement: a few tens of milliseconds of work, so row locks and the
/// statement's snapshot are short-lived, and each batch's dead tuples are few.
pub const PURGE_BATCH: i64 = 10_000;

/// What one purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Rows deleted.
    pub rows: u64,
    /// Statements (batches) run, including the last one that found fewer than a batch.
    pub batches: u64,
}

/// The batched purge of `table` by its `column` age: deletes at most `$2` rows older than `$1`
/// seconds, oldest first, found through the index on `column`.
#[must_use]
pub fn purge_sql(tables: &outbox::TableRef, table: Table, column: &str) -> String {
    let t = tables.qualify(table);
    format!(
        "DELETE FROM {t} WHERE id = ANY(ARRAY(\
         SELECT id FROM {t} WHERE {column} < now() - $1 * interval '1 second' \
         ORDER BY {column} LIMIT $2))"
    )
}

/// Runs `sql` (as built by [`purge_sql`]) until a batch deletes fewer than `batch` rows. Each
/// statement is its own transaction.
///
/// # Errors
/// [`crate::Error::Database`]; rows deleted by earlier batches stay deleted.
pub fn run_batches(
    conn: &mut PgConnection,
    sql: &str,
    older_than: Duration,
    batch: i64,
) -> Result<Purged> {
    batches_until(conn, sql, older_than, batch, &CancellationToken::new())
}

/// [`run_batches`], stopping early (between batches) when `stop` is cancelled.
fn batches_until(
    conn: &mut PgConnection,
    sql: &str,
    older_than: Duration,
    batch: i64,
    stop: &CancellationToken,
) -> Result<Purged> {
    let mut purged = Purged::default();
    loop {
        let n = diesel::sql_query(sql)
            .bind::<Double, _>(older_than.as_secs_f64())
            .bind::<BigInt, _>(batch)
            .execute(conn)?;
        purged.batches += 1;
        purged.rows += n as u64;
        if i64::try_from(n).unwrap_or(i64::MAX) < batch || stop.is_cancelled() {
            return Ok(purged);
        }
    }
}

/// Deletes kept delivered events older than `older_than`, `batch` rows per statement.
///
/// # Errors
/// [`crate::Error::Database`].
pub fn purge_delivered(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    older_than: Duration,
    batch: i64,
) -> Result<Purged> {
    let sql = purge_sql(tables, Table::Delivered, "delivered_at");
    run_batches(conn, &sql, older_than, batch)
}

/// Deletes dead letters older than `older_than`, `batch` rows per statement.
///
/// # Errors
/// [`crate::Error::Database`].
pub fn purge_dead_letters(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    older_than: Duration,
    batch: i64,
) -> Result<Purged> {
    let sql = purge_sql(tables, Table::DeadLetters, "dead_lettered_at");
    run_batches(conn, &sql, older_than, batch)
}

/// One purge pass as `cfg` asks, on its own short-lived connection (none is held between
/// passes). Returns `(delivered, dead letters)` purged.
fn purge_once(
    cfg: &RelayConfig,
    application_name: &str,
    stop: &CancellationToken,
) -> Result<(Purged, Purged)> {
    let tables = cfg.tables()?;
    let mut conn = store::connect_as(cfg.database_url(), Some(application_name))?;
    let mut delivered = Purged::default();
    let mut dead = Purged::default();
    if cfg.keep_delivered_hours > 0 {
        let age = Duration::from_secs(cfg.keep_delivered_hours * 3600);
        let sql = purge_sql(&tables, Table::Delivered, "delivered_at");
        delivered = batches_until(&mut conn, &sql, age, PURGE_BATCH, stop)?;
    }
    if cfg.dead_letters_keep_days > 0 {
        let age = Duration::from_secs(cfg.dead_letters_keep_days * 86_400);
        let sql = purge_sql(&tables, Table::DeadLetters, "dead_lettered_at");
        dead = batches_until(&mut conn, &sql, age, PURGE_BATCH, stop)?;
    }
    Ok((delivered, dead))
}

/// The leader's purge task: a pass at once, then every `purge_interval_ms`, until `stop` is
/// cancelled (the end of the leadership term; a pass in progress ends after its current batch).
/// Errors are logged and retried at the next pass.
/// Does nothing when `cfg` keeps nothing for a limited time.
pub(crate) fn spawn(
    cfg: &RelayConfig,
    application_name: String,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    if !cfg.purges() {
        return;
    }
    let cfg = cfg.clone();
    let interval = cfg.purge_interval.0;
    tasks.spawn(async move {
        loop {
            let (c, name, token) = (cfg.clone(), application_name.clone(), stop.clone());
            let started = std::time::Instant::now();
            match outbox::blocking::run(move || purge_once(&c, &name, &token)).await {
                Ok(Ok((delivered, dead))) => {
                    if delivered.rows > 0 || dead.rows > 0 {
                        tracing::info!(
                            target: TARGET,
                            delivered = delivered.rows,
                            dead_letters = dead.rows,
                            batches = delivered.batches + dead.batches,
                            elapsed_secs = started.elapsed().as_secs_f64(),
                            "purged expired rows"
                        );
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(target: TARGET, error = %e, "purge failed; trying again at the next interval");
                }
                Err(e) => tracing::warn!(target: TARGET, error = %e, "purge task failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
        }
    });
}
