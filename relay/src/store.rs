//! The relay's SQL: leadership lease, PgQ-style capture batches, and fenced removal.
//!
//! Every statement that reads rows to send or removes rows carries the lease guard, evaluated
//! on the database server's clock: a leader whose lease expired (a paused process, a partition)
//! can neither fetch new rows nor delete anything. Removal takes `FOR SHARE` on the state row, so
//! it serialises against a takeover, which updates that row. Each operation is one autocommit
//! statement: a paused relay never holds a lock.

use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel::{Connection, OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};
use outbox::contract::{EventColumns, StoredEvent, Table, TableRef};

use crate::error::{scrub_text, scrub_url, Error, Result};

/// Proof of leadership: this instance under this epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The instance id.
    pub instance: String,
    /// The fencing epoch (incremented by every takeover).
    pub epoch: i64,
    /// The database server the lease was taken on (see [`Batch::server`]). Removals by id run
    /// only there: on a promoted standby that lagged, the identity may hand the same ids to
    /// new events, which a removal of what was acknowledged before would delete unsent.
    pub server: String,
}

/// The snapshot pair of the capture batch in progress (text form of `pg_snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, QueryableByName)]
pub struct Batch {
    /// Rows visible here were delivered by earlier batches (`None`: first batch ever).
    #[diesel(sql_type = Nullable<Text>)]
    pub prev: Option<String>,
    /// This batch: rows visible here and not in `prev`.
    #[diesel(sql_type = Text)]
    pub cur: String,
    /// Every row of the batch has an id above this (0 when unknown: scan from the start;
    /// `i64::MAX` when the batch is empty). Found through the `tx_id` index, so the id scan does
    /// not walk rows removed since a long transaction began.
    #[diesel(sql_type = BigInt)]
    pub start_after: i64,
    /// The database server the snapshots come from: system identifier and WAL timeline. A
    /// snapshot is meaningful only on its server: after a failover (a promoted standby that
    /// lagged reuses transaction ids below the old snapshot's xmax), rows of new transactions
    /// would look already captured. Statements that advance or save a position from a
    /// snapshot held in memory run only on the same server (see [`Sql::new`]).
    #[diesel(sql_type = Text)]
    pub server: String,
}

/// One row of a page, as [`fetch`] returns it.
#[derive(Debug, Clone, QueryableByName)]
pub struct Fetched {
    /// The row (a small stand-in when `defect` is set).
    #[diesel(embed)]
    pub event: StoredEvent,
    /// Why the row can never be sent (a `created_at` outside what a Kafka timestamp carries,
    /// larger than `message.max.bytes`): the relay dead-letters it at once.
    #[diesel(sql_type = Nullable<Text>)]
    pub defect: Option<String>,
    /// Past the page's byte budget: returned without its payload, not part of this page. The
    /// next page starts at it.
    #[diesel(sql_type = Bool)]
    pub over_budget: bool,
}

impl std::ops::Deref for Fetched {
    type Target = StoredEvent;
    fn deref(&self) -> &StoredEvent {
        &self.event
    }
}

/// Default largest event the relay loads (librdkafka's `message.max.bytes` default).
pub const DEFAULT_MAX_EVENT_BYTES: i64 = 1_000_000;
/// Default byte budget of one page: with the default pages in flight, at most 64 MiB of
/// payload is held by the relay at once, whatever the rows hold.
pub const DEFAULT_PAGE_BYTES: i64 = 16 << 20;

/// An event to move to the dead letters.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Outbox row id.
    pub id: i64,
    /// Why.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
}

#[derive(QueryableByName)]
struct Fenced {
    #[diesel(sql_type = BigInt)]
    leased: i64,
    #[diesel(sql_type = BigInt)]
    affected: i64,
}

#[derive(QueryableByName)]
struct Epoch {
    /// Only whether a row came back matters.
    #[allow(dead_code)]
    #[diesel(sql_type = BigInt)]
    leader_epoch: i64,
}

#[derive(QueryableByName)]
struct Acquired {
    #[diesel(sql_type = BigInt)]
    leader_epoch: i64,
    #[diesel(sql_type = Text)]
    server: String,
}

/// Pre-built SQL for one outbox table.
#[derive(Debug, Clone, Default)]
pub struct Sql {
    key: String,
    acquire: String,
    ensure_row: String,
    renew: String,
    release: String,
    open_batch: String,
    open_fresh_batch: String,
    close_batch: String,
    advance_batch: String,
    advance_in_memory: String,
    save_batch: String,
    fetch: String,
    delete: String,
    move_delivered: String,
    keep_delivered: bool,
    max_event_bytes: i64,
    page_bytes: i64,
    dead_letter: String,
    held_keys: String,
    /// The hot statements split at their placeholders, run as cached prepared statements.
    hot: Hot,
}

#[derive(Debug, Clone, Default)]
struct Hot {
    advance_batch: Vec<Segment>,
    advance_in_memory: Vec<Segment>,
    fetch: Vec<Segment>,
    delete: Vec<Segment>,
    move_delivered: Vec<Segment>,
}

/// The pieces the relay's statements are built from.
struct Fragments {
    /// The outbox, state, dead-letter and delivered tables, qualified.
    t: String,
    s: String,
    d: String,
    k: String,
    /// The event row's columns.
    all: &'static str,
    dead_letter_updates: String,
    lease_cond: &'static str,
    guard: String,
    server: &'static str,
    locked_lease: String,
    start_after: String,
}

impl Fragments {
    fn new(tables: &TableRef) -> (String, Self) {
        let t = tables.qualify(Table::Outbox);
        let s = tables.qualify(Table::RelayState);
        let d = tables.qualify(Table::DeadLetters);
        let k = tables.qualify(Table::Delivered);
        let all = EventColumns::all();
        // The dead-letter upsert: a row dead-lettered again (same id and event id) takes the new
        // content and counts.
        let dead_letter_updates = Table::DeadLetters
            .columns()
            .iter()
            .filter(|c| !matches!(c.name, "id" | "event_id" | "dead_lettered_at"))
            .map(|c| format!("{0} = EXCLUDED.{0}", c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let key = match tables.schema() {
            Some(schema) => format!("{schema}.{}", Table::Outbox),
            None => Table::Outbox.name().to_owned(),
        };
        let lease_cond = "outbox_table = $1 AND leader_id = $2 AND leader_epoch = $3 \
                          AND lease_expires_at > clock_timestamp()";
        let guard = format!("EXISTS (SELECT 1 FROM {s} WHERE {lease_cond})");
        // Which server this is (see `Batch::server`): a promoted standby keeps the system
        // identifier but starts a new timeline; a restored backup too.
        let server = "(SELECT system_identifier::text FROM pg_control_system()) || '/' || \
                      substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)";
        // Removals by id: under the lease, and on the server the lease was taken on ($5).
        let locked_lease =
            format!("SELECT 1 FROM {s} WHERE {lease_cond} AND {server} = $5 FOR SHARE");
        // The lowest id of the batch (minus one), found by transaction id as PgQ does: rows of
        // transactions that began after the previous snapshot, or were running at it. OFFSET 0
        // keeps the planner from answering min(id) by walking the id index.
        let start_after = format!(
            "CASE WHEN prev_snapshot IS NULL THEN 0 ELSE coalesce((\
             SELECT min(b.id) - 1 FROM (SELECT id, tx_id FROM {t} \
             WHERE (tx_id >= pg_snapshot_xmax(prev_snapshot) \
             OR tx_id = ANY(ARRAY(SELECT pg_snapshot_xip(prev_snapshot)))) \
             AND tx_id < pg_snapshot_xmax(cur_snapshot) OFFSET 0) b \
             WHERE pg_visible_in_snapshot(b.tx_id, cur_snapshot) \
             AND NOT pg_visible_in_snapshot(b.tx_id, prev_snapshot)), \
             9223372036854775807) END AS start_after"
        );
        (
            key,
            Self {
                t,
                s,
                d,
                k,
                all,
                dead_letter_updates,
                lease_cond,
                guard,
                server,
                locked_lease,
                start_after,
            },
        )
    }
}

impl Sql {
    /// SQL for the tables at `tables`.
    #[must_use]
    pub fn new(tables: &TableRef) -> Self {
        let (key, f) = Fragments::new(tables);
        let mut sql = Self {
            key,
            keep_delivered: false,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            page_bytes: DEFAULT_PAGE_BYTES,
            ..Self::default()
        };
        sql.lease_statements(&f);
        sql.capture_statements(&f);
        sql.removal_statements(&f);
        sql.hot = Hot {
            advance_batch: Segment::parse(&sql.advance_batch),
            advance_in_memory: Segment::parse(&sql.advance_in_memory),
            fetch: Segment::parse(&sql.fetch),
            delete: Segment::parse(&sql.delete),
            move_delivered: Segment::parse(&sql.move_delivered),
        };
        sql
    }

    /// The leadership statements: the state row, taking, renewing and giving up the lease.
    fn lease_statements(&mut self, f: &Fragments) {
        let Fragments {
            s,
            lease_cond,
            server,
            ..
        } = f;
        self.ensure_row =
            format!("INSERT INTO {s} (outbox_table) VALUES ($1) ON CONFLICT DO NOTHING");
        self.acquire = format!(
            "UPDATE {s} SET leader_id = $2, leader_epoch = leader_epoch + 1, \
             lease_expires_at = clock_timestamp() + $3 * interval '1 millisecond', \
             updated_at = clock_timestamp() \
             WHERE outbox_table = $1 AND (leader_id IS NULL \
             OR lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp()) \
             RETURNING leader_epoch, {server} AS server"
        );
        self.renew = format!(
            "UPDATE {s} SET lease_expires_at = clock_timestamp() + $4 * interval '1 millisecond', \
             updated_at = clock_timestamp() WHERE {lease_cond} RETURNING leader_epoch"
        );
        self.release = format!(
            "UPDATE {s} SET leader_id = NULL, lease_expires_at = NULL, \
             updated_at = clock_timestamp() \
             WHERE outbox_table = $1 AND leader_id = $2 AND leader_epoch = $3 \
             RETURNING leader_epoch"
        );
    }

    /// The capture statements: the batch snapshots (open, advance, save) and the page fetch.
    fn capture_statements(&mut self, f: &Fragments) {
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

    /// The fenced removals: delete, move to `outbox_delivered`, move to the dead letters.
    fn removal_statements(&mut self, f: &Fragments) {
        let Fragments {
            t,
            d,
            k,
            all,
            dead_letter_updates,
            locked_lease,
            ..
        } = f;
        self.delete = format!(
            "WITH lease AS ({locked_lease}), \
             del AS (DELETE FROM {t} WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease) \
             RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM del) AS affected"
        );
        // The same fenced removal, keeping the rows in `outbox_delivered` (one statement:
        // a row is either still pending or kept, never both, never neither). An id already
        // kept can only come from a reset identity (a restore); the old copy stays.
        self.move_delivered = format!(
            "WITH lease AS ({locked_lease}), \
             del AS (DELETE FROM {t} WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease) \
             RETURNING *), \
             ins AS (INSERT INTO {k} ({all}) SELECT {all} FROM del \
                     ON CONFLICT (id) DO NOTHING RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM del) AS affected"
        );
        self.dead_letter = format!(
            "WITH lease AS ({locked_lease}), \
             f AS (SELECT * FROM unnest($4::bigint[], $6::text[], $7::int[]) \
                   AS f(id, error, attempts)), \
             moved AS (DELETE FROM {t} o USING f \
                       WHERE o.id = f.id AND EXISTS (SELECT 1 FROM lease) \
                       RETURNING o.*, f.error AS dl_error, f.attempts AS dl_attempts), \
             ins AS (INSERT INTO {d} ({all}, attempts, last_error) \
                     SELECT {all}, dl_attempts, dl_error FROM moved \
                     ON CONFLICT (id, event_id) DO UPDATE SET \
                       {dead_letter_updates}, dead_lettered_at = now() \
                     RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM ins) AS affected"
        );
    }

    /// With `keep`, [`delete`] moves delivered rows to `outbox_delivered` instead of deleting
    /// them (same fencing, same counts). Defaults to deleting.
    #[must_use]
    pub fn keep_delivered(mut self, keep: bool) -> Self {
        self.keep_delivered = keep;
        self
    }

    /// Events larger than `max_event_bytes` (payload, key, type, content type and headers)
    /// are dead-lettered without being loaded; a page loads at most `page_bytes` (and at
    /// least one event). Default to [`DEFAULT_MAX_EVENT_BYTES`] and [`DEFAULT_PAGE_BYTES`].
    #[must_use]
    pub fn byte_limits(mut self, max_event_bytes: i64, page_bytes: i64) -> Self {
        self.max_event_bytes = max_event_bytes;
        self.page_bytes = page_bytes;
        self
    }

    /// The state row's key for this outbox (`outbox` or `<schema>.outbox`).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Every relay connection sets `application_name` to this prefix followed by its instance id,
/// so `status` can list the relay processes from `pg_stat_activity`.
pub const APPLICATION_NAME_PREFIX: &str = "outbox-relay:";

/// The `application_name` of a relay instance's sessions: `outbox-relay:<instance>` (Postgres
/// keeps the first 63 bytes).
#[must_use]
pub fn application_name(instance: &str) -> String {
    format!("{APPLICATION_NAME_PREFIX}{instance}")
}

/// Connects, naming the (scrubbed) URL on failure.
///
/// # Errors
/// [`Error::Connect`].
pub fn connect(url: &str) -> Result<PgConnection> {
    connect_as(url, None)
}

/// Connects and sets the session's `application_name` when given (`status` lists relay
/// sessions by it). Names the (scrubbed) URL on failure.
///
/// # Errors
/// [`Error::Connect`], [`Error::Database`].
pub fn connect_as(url: &str, application_name: Option<&str>) -> Result<PgConnection> {
    let mut conn = PgConnection::establish(url).map_err(|e| Error::Connect {
        url: scrub_url(url),
        message: scrub_text(&e.to_string(), url),
    })?;
    if let Some(name) = application_name {
        diesel::sql_query("SELECT set_config('application_name', $1, false)")
            .bind::<Text, _>(name)
            .execute(&mut conn)?;
    }
    Ok(conn)
}

/// Tries to become leader. `Ok(None)`: another instance holds a valid lease.
///
/// # Errors
/// [`Error::Database`].
pub fn try_acquire(
    conn: &mut PgConnection,
    sql: &Sql,
    instance: &str,
    lease_ms: u64,
) -> Result<Option<Lease>> {
    diesel::sql_query(&sql.ensure_row)
        .bind::<Text, _>(&sql.key)
        .execute(conn)?;
    let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
    let row: Option<Acquired> = diesel::sql_query(&sql.acquire)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(instance)
        .bind::<BigInt, _>(lease_ms)
        .get_result(conn)
        .optional()?;
    Ok(row.map(|r| Lease {
        instance: instance.to_owned(),
        epoch: r.leader_epoch,
        server: r.server,
    }))
}

fn lost(sql: &Sql) -> Error {
    Error::LostLeadership(sql.key.clone())
}

/// Extends the lease.
///
/// # Errors
/// [`Error::LostLeadership`] when the lease is no longer ours.
pub fn renew(conn: &mut PgConnection, sql: &Sql, lease: &Lease, lease_ms: u64) -> Result<()> {
    let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
    let row: Option<Epoch> = diesel::sql_query(&sql.renew)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<BigInt, _>(lease_ms)
        .get_result(conn)
        .optional()?;
    row.map(|_| ()).ok_or_else(|| lost(sql))
}

/// Gives the lease up (graceful shutdown) so a standby takes over at once.
///
/// # Errors
/// [`Error::Database`].
pub fn release(conn: &mut PgConnection, sql: &Sql, lease: &Lease) -> Result<()> {
    diesel::sql_query(&sql.release)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .execute(conn)?;
    Ok(())
}

/// The batch in progress, or a new one from the current snapshot.
///
/// # Errors
/// [`Error::LostLeadership`], [`Error::Database`].
pub fn open_batch(conn: &mut PgConnection, sql: &Sql, lease: &Lease) -> Result<Batch> {
    batch_statement(conn, sql, &sql.open_batch, lease)
}

/// Like [`open_batch`], with the upper snapshot taken now even when a saved batch is open (the
/// batch is then a superset of the saved one).
///
/// # Errors
/// [`Error::LostLeadership`], [`Error::Database`].
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
/// [`Error::LostLeadership`], [`Error::Database`].
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
/// behind a pooler that kept the connection) it returns [`Error::LostLeadership`] and writes
/// nothing, so the next term starts from the state row of the server it now talks to.
///
/// # Errors
/// [`Error::LostLeadership`], [`Error::Database`].
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
/// [`Error::LostLeadership`], [`Error::Database`].
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

/// Sets `synchronous_commit` for the session (the relay's own commits), and `enable_seqscan =
/// off`.
///
/// # Errors
/// [`Error::Database`].
pub fn set_synchronous_commit(conn: &mut PgConnection, value: &str) -> Result<()> {
    diesel::sql_query("SELECT set_config('synchronous_commit', $1, false)")
        .bind::<Text, _>(value)
        .execute(conn)?;
    // The outbox is a queue table: rows come and go by the thousand between two ANALYZE runs,
    // so its statistics always say "small" while its pages hold whatever was removed since the
    // last VACUUM. Planned on those statistics, the batch statement's lookup by `tx_id` became a
    // sequential scan of every page (4 ms per capture cycle in the benchmark, seen with
    // auto_explain). Every relay statement is meant to run on an index; this session says so.
    diesel::sql_query("SELECT set_config('enable_seqscan', 'off', false)").execute(conn)?;
    Ok(())
}

/// The next page of the batch after `after_id`, in id order: up to `limit` rows, the page
/// ending before the first row marked [`Fetched::over_budget`] (rows after it are marked too).
/// Empty when the lease is gone.
///
/// # Errors
/// [`Error::Database`].
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

/// Removes delivered rows (or moves them to `outbox_delivered`, see [`Sql::keep_delivered`]),
/// only while the lease is ours. Returns how many were removed.
///
/// # Errors
/// [`Error::LostLeadership`] (nothing removed), [`Error::Database`].
pub fn delete(conn: &mut PgConnection, sql: &Sql, lease: &Lease, ids: &[i64]) -> Result<u64> {
    let statement = if sql.keep_delivered {
        &sql.hot.move_delivered
    } else {
        &sql.hot.delete
    };
    let binds = [
        Value::Text(&sql.key),
        Value::Text(&lease.instance),
        Value::BigInt(lease.epoch),
        Value::BigIntArray(ids),
        Value::Text(&lease.server),
    ];
    let r: Fenced = Prepared::new(statement, &binds).get_result(conn)?;
    if r.leased == 0 {
        return Err(lost(sql));
    }
    Ok(u64::try_from(r.affected).unwrap_or(0))
}

/// Moves rows to the dead letters, only while the lease is ours.
///
/// # Errors
/// [`Error::LostLeadership`] (nothing moved), [`Error::Database`].
pub fn dead_letter(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    rows: &[DeadLetter],
) -> Result<u64> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
    let r: Fenced = diesel::sql_query(&sql.dead_letter)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Text, _>(&lease.server)
        .bind::<Array<Text>, _>(&errors)
        .bind::<Array<Integer>, _>(&attempts)
        .get_result(conn)?;
    if r.leased == 0 {
        return Err(lost(sql));
    }
    Ok(u64::try_from(r.affected).unwrap_or(0))
}

/// `(topic, key)` pairs that have dead letters (for [`crate::PoisonPolicy::HoldKey`]).
///
/// # Errors
/// [`Error::Database`].
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

/// Whether the connected role is a superuser.
///
/// # Errors
/// [`Error::Database`].
pub fn is_superuser(conn: &mut PgConnection) -> Result<bool> {
    #[derive(QueryableByName)]
    struct Super {
        #[diesel(sql_type = Bool)]
        rolsuper: bool,
    }
    Ok(
        diesel::sql_query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .get_result::<Super>(conn)?
            .rolsuper,
    )
}

/// A bind value of a [`Prepared`] statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    Text(&'a str),
    NullableText(Option<&'a str>),
    BigInt(i64),
    BigIntArray(&'a [i64]),
}

/// One of the relay's hot statements as a prepared statement cached on the connection (keyed
/// by its SQL text, so each outbox table has its own): Postgres parses and plans it once per
/// connection instead of once per capture cycle (planning the batch statement alone took
/// 1.3 ms). `$n` placeholders in `sql` refer to `binds[n - 1]`; a placeholder may repeat.
pub(crate) struct Prepared<'a> {
    segments: &'a [Segment],
    binds: &'a [Value<'a>],
}

/// A statement split at its placeholders (see [`Segment::parse`]).
#[derive(Debug, Clone)]
pub(crate) enum Segment {
    Sql(String),
    Bind(usize),
}

impl Segment {
    /// Splits `sql` at `$n` placeholders.
    pub(crate) fn parse(sql: &str) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut text = String::new();
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                let mut n = 0_usize;
                while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                    n = n * 10 + d as usize;
                    chars.next();
                }
                if !text.is_empty() {
                    out.push(Segment::Sql(std::mem::take(&mut text)));
                }
                out.push(Segment::Bind(n));
            } else {
                text.push(c);
            }
        }
        if !text.is_empty() {
            out.push(Segment::Sql(text));
        }
        out
    }
}

impl<'a> Prepared<'a> {
    pub(crate) fn new(segments: &'a [Segment], binds: &'a [Value<'a>]) -> Self {
        Self { segments, binds }
    }
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for Prepared<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        for segment in self.segments {
            match segment {
                Segment::Sql(s) => out.push_sql(s),
                Segment::Bind(n) => {
                    let value = n
                        .checked_sub(1)
                        .and_then(|i| self.binds.get(i))
                        .ok_or_else(|| {
                            diesel::result::Error::QueryBuilderError(
                                format!("statement placeholder ${n} has no value").into(),
                            )
                        })?;
                    match value {
                        Value::Text(v) => out.push_bind_param::<Text, _>(*v)?,
                        Value::NullableText(v) => out.push_bind_param::<Nullable<Text>, _>(v)?,
                        Value::BigInt(v) => out.push_bind_param::<BigInt, _>(v)?,
                        Value::BigIntArray(v) => out.push_bind_param::<Array<BigInt>, _>(*v)?,
                    }
                }
            }
        }
        Ok(())
    }
}

impl diesel::query_builder::QueryId for Prepared<'_> {
    type QueryId = ();
    // Keyed by SQL text in diesel's statement cache (the text differs per table).
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for Prepared<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl RunQueryDsl<PgConnection> for Prepared<'_> {}

#[cfg(test)]
mod tests {
    use super::Segment;

    #[test]
    fn placeholders_split_the_statement_and_may_repeat() {
        let segments = Segment::parse("SELECT $1, $12::text WHERE $1 IS NULL OR x = $3");
        let shape: Vec<String> = segments
            .iter()
            .map(|s| match s {
                Segment::Sql(t) => format!("[{t}]"),
                Segment::Bind(n) => format!("${n}"),
            })
            .collect();
        assert_eq!(
            shape.concat(),
            "[SELECT ]$1[, ]$12[::text WHERE ]$1[ IS NULL OR x = ]$3"
        );
    }
}
