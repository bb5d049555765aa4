//! The relay's SQL: leadership lease, PgQ-style capture batches, and fenced removal.
//!
//! Every statement that reads rows to send or removes rows carries the lease guard, evaluated
//! on the database server's clock: a leader whose lease expired (a paused process, a partition)
//! can neither fetch new rows nor delete anything. Removal takes `FOR SHARE` on the state row, so
//! it serialises against a takeover, which updates that row. Each operation is one autocommit
//! statement: a paused relay never holds a lock.

use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
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
    /// Outbox row id (negative: a tableless event, see [`DeadLetter::event`]).
    pub id: i64,
    /// Why.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
    /// The event itself when it has no outbox row (a tableless event streamed from the WAL):
    /// it is written to the dead letters from here instead of moved from the table.
    pub event: Option<Box<StoredEvent>>,
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
    dead_letter_event: String,
    delete_returning: String,
    move_delivered_returning: String,
    terminate_walsender: String,
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

mod capture;
mod lease;
pub(crate) mod prepared;
mod removal;
pub mod stream;

pub use capture::{
    advance_batch, close_batch, fetch, held_keys, open_batch, open_fresh_batch, save_batch,
};
pub use lease::{release, renew, try_acquire};
use prepared::Segment;
pub use removal::{dead_letter, delete, delete_returning, not_yet_visible};

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
        sql.stream_statements(&f);
        sql.hot = Hot {
            advance_batch: Segment::parse(&sql.advance_batch),
            advance_in_memory: Segment::parse(&sql.advance_in_memory),
            fetch: Segment::parse(&sql.fetch),
            delete: Segment::parse(&sql.delete),
            move_delivered: Segment::parse(&sql.move_delivered),
        };
        sql
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

    /// Whether removal keeps delivered rows in `outbox_delivered`.
    #[must_use]
    pub fn keeps_delivered(&self) -> bool {
        self.keep_delivered
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
