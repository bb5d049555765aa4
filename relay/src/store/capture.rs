//! Capture SQL: PgQ-style batches (snapshot pairs of the state row: open, advance, save) and
//! the page fetch, every statement under the lease guard.

use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};

use super::lease::lost;
use super::prepared::{Prepared, Value};
use super::{Batch, Epoch, Fetched, Fragments, Lease, Sql};
use crate::error::Result;

impl Sql {
    /// The capture statements: the batch snapshots (open, advance, save) and the page fetch.
    pub(super) fn capture_statements(&mut self, f: &Fragments) {
        let Fragments {
            t,
            s,
            d,
            lease_cond,
            guard,
            server,
            start_after,
            ..
        } = f;
        self.open_batch = format!(
            "UPDATE {s} SET cur_snapshot = coalesce(cur_snapshot, pg_current_snapshot()), \
             updated_at = clock_timestamp() WHERE {lease_cond} \
             RETURNING prev_snapshot::text AS prev, cur_snapshot::text AS cur, {start_after}, \
             {server} AS server"
        );
        // The same, but the batch's upper snapshot is taken now even when a saved one is
        // open (a superset of it: nothing is skipped), so that what was read just before
        // (`hold-key`'s held keys) is older than the batch.
        self.open_fresh_batch = format!(
            "UPDATE {s} SET cur_snapshot = pg_current_snapshot(), \
             updated_at = clock_timestamp() WHERE {lease_cond} \
             RETURNING prev_snapshot::text AS prev, cur_snapshot::text AS cur, {start_after}, \
             {server} AS server"
        );
        self.close_batch = format!(
            "UPDATE {s} SET prev_snapshot = cur_snapshot, cur_snapshot = NULL, \
             updated_at = clock_timestamp() WHERE {lease_cond} RETURNING leader_epoch"
        );
        self.advance_batch = format!(
            "UPDATE {s} SET prev_snapshot = $4::pg_snapshot, \
             cur_snapshot = pg_current_snapshot(), updated_at = clock_timestamp() \
             WHERE {lease_cond} AND {server} = $5 \
             AND pg_snapshot_xmax(pg_current_snapshot()) >= pg_snapshot_xmax($4::pg_snapshot) \
             RETURNING prev_snapshot::text AS prev, cur_snapshot::text AS cur, {start_after}, \
             {server} AS server"
        );
        // The same next batch without writing the state row (see `advance_batch`).
        self.advance_in_memory = format!(
            "SELECT prev_snapshot::text AS prev, cur_snapshot::text AS cur, {start_after}, \
             {server} AS server \
             FROM (SELECT $4::pg_snapshot AS prev_snapshot, \
                   pg_current_snapshot() AS cur_snapshot) b0 \
             WHERE {guard} AND {server} = $5 \
             AND pg_snapshot_xmax(cur_snapshot) >= pg_snapshot_xmax(prev_snapshot)"
        );
        self.save_batch = format!(
            "UPDATE {s} SET prev_snapshot = $4::pg_snapshot, cur_snapshot = $5::pg_snapshot, \
             updated_at = clock_timestamp() WHERE {lease_cond} AND {server} = $6 \
             RETURNING leader_epoch"
        );
        // Every row the table accepts comes back readable: a `created_at` no Kafka
        // timestamp can carry, or an event over `message.max.bytes` ($8), is returned as a
        // small stand-in with its defect named (it is dead-lettered in SQL, by id, so its
        // payload never enters the relay). Rows past the page's byte budget ($9) come back
        // without their payload, marked, and are fetched again by the next page.
        self.fetch = format!(
            "SELECT id, event_id, topic, \
               CASE WHEN fits THEN partition_key ELSE left(partition_key, 200) END AS partition_key, \
               CASE WHEN fits THEN event_type ELSE left(event_type, 200) END AS event_type, \
               CASE WHEN fits AND NOT over_budget THEN payload ELSE ''::bytea END AS payload, \
               CASE WHEN fits THEN headers ELSE '{{}}'::jsonb END AS headers, \
               CASE WHEN fits THEN content_type ELSE left(content_type, 200) END AS content_type, \
               traceparent, tx_id, \
               CASE WHEN time_ok THEN created_at ELSE 'epoch'::timestamptz END AS created_at, \
               CASE WHEN NOT time_ok THEN 'created_at ' || created_at::text \
                      || ' is outside what a Kafka timestamp and ce_time carry (1970 to 9999)' \
                    WHEN NOT fits THEN 'the event is too large: ' || size::text \
                      || ' bytes, over message.max.bytes (' || $8::text || ')' END AS defect, \
               over_budget \
             FROM (SELECT *, fits AND loaded - size >= $9 AS over_budget \
                   FROM (SELECT *, sum(CASE WHEN fits THEN size ELSE 0 END) \
                           OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS loaded \
                         FROM (SELECT *, size <= $8 AS fits FROM \
                               (SELECT o.*, octet_length(payload)::bigint \
                                   + octet_length(partition_key) + octet_length(event_type) \
                                   + octet_length(content_type) + pg_column_size(headers) AS size, \
                                 (isfinite(created_at) AND created_at >= 'epoch' \
                                  AND created_at < '10000-01-01') AS time_ok \
                                FROM {t} o \
                                WHERE id > $4 AND pg_visible_in_snapshot(tx_id, $5::pg_snapshot) \
                                AND ($6::text IS NULL OR NOT pg_visible_in_snapshot(tx_id, $6::pg_snapshot)) \
                                AND {guard} ORDER BY id LIMIT $7) s0) s1) s2) s3 \
             ORDER BY id"
        );
        self.held_keys = format!("SELECT DISTINCT topic, partition_key FROM {d}");
    }
}

/// The batch in progress, or a new one from the current snapshot.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership), [`Error::Database`](crate::Error::Database).
pub fn open_batch(conn: &mut PgConnection, sql: &Sql, lease: &Lease) -> Result<Batch> {
    batch_statement(conn, sql, &sql.open_batch, lease)
}

/// Like [`open_batch`], with the upper snapshot taken now even when a saved batch is open (the
/// batch is then a superset of the saved one).
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership), [`Error::Database`](crate::Error::Database).
pub fn open_fresh_batch(conn: &mut PgConnection, sql: &Sql, lease: &Lease) -> Result<Batch> {
    batch_statement(conn, sql, &sql.open_fresh_batch, lease)
}

/// Runs a fenced statement that returns the batch.
fn batch_statement(
    conn: &mut PgConnection,
    sql: &Sql,
    statement: &str,
    lease: &Lease,
) -> Result<Batch> {
    diesel::sql_query(statement)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .get_result::<Batch>(conn)
        .optional()?
        .ok_or_else(|| lost(sql))
}

/// Marks the batch done: its snapshot becomes the lower bound of the next one.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership), [`Error::Database`](crate::Error::Database).
pub fn close_batch(conn: &mut PgConnection, sql: &Sql, lease: &Lease) -> Result<()> {
    diesel::sql_query(&sql.close_batch)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .get_result::<Epoch>(conn)
        .optional()?
        .map(|_| ())
        .ok_or_else(|| lost(sql))
}

/// The batch after `done` (delivered in full): `done`'s snapshot becomes the lower bound, the
/// current snapshot the upper bound. With `save`, one statement also records it in the state
/// row (closing `done`); without, nothing is written.
///
/// Saving is what lets a new leader resume; the relay saves at most about once a second. A new
/// leader that resumes an older saved batch loses nothing: the batches finished since were
/// removed from the outbox, and whatever of them is left falls into the next batch. Writing the
/// state row once per batch instead would, while a long transaction holds the xmin horizon,
/// leave a chain of dead row versions that every lease check walks.
///
/// Runs only on the server `done` came from ([`Batch::server`]): on another one (a failover
/// behind a pooler that kept the connection) it returns [`Error::LostLeadership`](crate::Error::LostLeadership) and writes
/// nothing, so the next term starts from the state row of the server it now talks to.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership), [`Error::Database`](crate::Error::Database).
pub fn advance_batch(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    done: &Batch,
    save: bool,
) -> Result<Batch> {
    let statement = if save {
        &sql.hot.advance_batch
    } else {
        &sql.hot.advance_in_memory
    };
    let binds = [
        Value::Text(&sql.key),
        Value::Text(&lease.instance),
        Value::BigInt(lease.epoch),
        Value::Text(&done.cur),
        Value::Text(&done.server),
    ];
    Prepared::new(statement, &binds)
        .get_result::<Batch>(conn)
        .optional()?
        .ok_or_else(|| lost(sql))
}

/// Records the relay's position in the state row: `batch` still open, or (with `done`) closed,
/// so the next leader starts after it.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership), [`Error::Database`](crate::Error::Database).
pub fn save_batch(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    batch: &Batch,
    done: bool,
) -> Result<()> {
    let (prev, cur) = if done {
        (Some(batch.cur.as_str()), None)
    } else {
        (batch.prev.as_deref(), Some(batch.cur.as_str()))
    };
    diesel::sql_query(&sql.save_batch)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<Nullable<Text>, _>(prev)
        .bind::<Nullable<Text>, _>(cur)
        .bind::<Text, _>(&batch.server)
        .get_result::<Epoch>(conn)
        .optional()?
        .map(|_| ())
        .ok_or_else(|| lost(sql))
}

/// The next page of the batch after `after_id`, in id order: up to `limit` rows, the page
/// ending before the first row marked [`Fetched::over_budget`] (rows after it are marked too).
/// Empty when the lease is gone.
///
/// # Errors
/// [`Error::Database`](crate::Error::Database).
pub fn fetch(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    batch: &Batch,
    after_id: i64,
    limit: i64,
) -> Result<Vec<Fetched>> {
    let binds = [
        Value::Text(&sql.key),
        Value::Text(&lease.instance),
        Value::BigInt(lease.epoch),
        Value::BigInt(after_id),
        Value::Text(&batch.cur),
        Value::NullableText(batch.prev.as_deref()),
        Value::BigInt(limit),
        Value::BigInt(sql.max_event_bytes),
        Value::BigInt(sql.page_bytes),
    ];
    Ok(Prepared::new(&sql.hot.fetch, &binds).load(conn)?)
}

/// `(topic, key)` pairs that have dead letters (for [`crate::PoisonPolicy::HoldKey`]).
///
/// # Errors
/// [`Error::Database`](crate::Error::Database).
pub fn held_keys(conn: &mut PgConnection, sql: &Sql) -> Result<Vec<(String, String)>> {
    #[derive(QueryableByName)]
    struct Key {
        #[diesel(sql_type = Text)]
        topic: String,
        #[diesel(sql_type = Text)]
        partition_key: String,
    }
    Ok(diesel::sql_query(&sql.held_keys)
        .load::<Key>(conn)?
        .into_iter()
        .map(|k| (k.topic, k.partition_key))
        .collect())
}
