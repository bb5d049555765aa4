//! `outbox-relay status`: what an operator needs at a glance.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use outbox::contract::Table;

use crate::error::Result;

/// Backlog of one topic.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct TopicBacklog {
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Events waiting.
    #[diesel(sql_type = BigInt)]
    pub events: i64,
    /// Age of the oldest waiting event, seconds.
    #[diesel(sql_type = Double)]
    pub oldest_age_secs: f64,
}

/// Dead letters of one topic.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct TopicDeadLetters {
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Dead letters.
    #[diesel(sql_type = BigInt)]
    pub events: i64,
    /// The most recent error.
    #[diesel(sql_type = Text)]
    pub last_error: String,
}

/// The lease.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Leader {
    /// Outbox table.
    #[diesel(sql_type = Text)]
    pub outbox_table: String,
    /// Leading instance, if any.
    #[diesel(sql_type = Nullable<Text>)]
    pub leader_id: Option<String>,
    /// Fencing epoch.
    #[diesel(sql_type = BigInt)]
    pub leader_epoch: i64,
    /// Lease end.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Whether the lease is still valid.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub lease_valid: bool,
}

/// The oldest transaction that holds capture back.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct OldestTransaction {
    /// Backend pid.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub pid: i32,
    /// Seconds open.
    #[diesel(sql_type = Double)]
    pub open_secs: f64,
    /// Application name.
    #[diesel(sql_type = Text)]
    pub application_name: String,
    /// Backend state.
    #[diesel(sql_type = Text)]
    pub state: String,
}

/// A logical replication slot of this database (streaming capture reads one).
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct SlotStatus {
    /// Its name.
    #[diesel(sql_type = Text)]
    pub slot_name: String,
    /// The walsender streaming it now, if any.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub wal_status: Option<String>,
    /// WAL kept for it (bytes).
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    pub retained_bytes: Option<i64>,
    /// WAL written since its confirmed position (bytes).
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    pub lag_bytes: Option<i64>,
}

/// A snapshot of a captured table (change capture, `outbox_cdc_snapshots`).
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct SnapshotStatus {
    /// `schema.table`.
    #[diesel(sql_type = Text)]
    pub table_name: String,
    /// Rows published so far.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub rows_read: i64,
    /// When it was asked for.
    #[diesel(sql_type = Text)]
    pub requested_at: String,
    /// When its last chunk was delivered (`None`: running or waiting).
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub finished_at: Option<String>,
}

/// A relay process connected to the database (from `pg_stat_activity`).
#[derive(Debug, Clone, Serialize)]
pub struct RelaySession {
    /// Instance id, as in the lease (Postgres truncates `application_name` to 63 bytes, so a
    /// long id may be cut short).
    pub instance: String,
    /// `leader` (holds the valid lease), `leader (lease expired)` (named in an expired lease: a
    /// stalled or partitioned leader) or `standby`.
    pub role: String,
    /// Open database sessions of this instance (the relay's, plus the metrics poller's).
    pub connections: i64,
    /// Backend pids of those sessions.
    pub pids: Vec<i32>,
    /// Client addresses (`local` for a Unix socket; empty when the role may not see them).
    pub clients: Vec<String>,
    /// When the oldest of those sessions connected (`None` when the role may not see it).
    pub connected_since: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct SessionRow {
    #[diesel(sql_type = Text)]
    instance: String,
    #[diesel(sql_type = BigInt)]
    connections: i64,
    #[diesel(sql_type = Array<Integer>)]
    pids: Vec<i32>,
    #[diesel(sql_type = Array<Text>)]
    clients: Vec<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    connected_since: Option<DateTime<Utc>>,
}

/// Inbox rows of one consumer.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct InboxConsumer {
    /// Consumer name.
    #[diesel(sql_type = Text)]
    pub consumer: String,
    /// Inbox rows (message ids remembered for deduplication).
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
    /// The oldest row's `processed_at`: retention purges rows older than its window.
    #[diesel(sql_type = Timestamptz)]
    pub oldest_processed_at: DateTime<Utc>,
    /// Age of the oldest row, seconds.
    #[diesel(sql_type = Double)]
    pub oldest_age_secs: f64,
}

/// The inbox table of this database, if it has one.
#[derive(Debug, Clone, Serialize)]
pub struct InboxSizes {
    /// The table looked at.
    pub table: String,
    /// Whether it exists (a relay's database need not have consumers).
    pub exists: bool,
    /// Whether the connected role may read it (when it exists).
    pub readable: bool,
    /// Rows per consumer (empty when the table is missing, unreadable or empty).
    pub consumers: Vec<InboxConsumer>,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Backlog per topic.
    pub backlog: Vec<TopicBacklog>,
    /// Leader per outbox.
    pub leaders: Vec<Leader>,
    /// Relay processes connected now: the leader and the standbys.
    pub relays: Vec<RelaySession>,
    /// Dead letters per topic.
    pub dead_letters: Vec<TopicDeadLetters>,
    /// Oldest open transaction with an xid (its events, and later ones' visibility, wait).
    pub oldest_transaction: Option<OldestTransaction>,
    /// Inbox rows per consumer.
    pub inbox: InboxSizes,
    /// The logical replication slots of this database (streaming capture).
    pub slots: Vec<SlotStatus>,
    /// Snapshots of captured tables, newest request first.
    pub snapshots: Vec<SnapshotStatus>,
}

/// Reads the status.
///
/// # Errors
/// [`crate::Error::Database`].
pub fn read(conn: &mut PgConnection, tables: &outbox::TableRef) -> Result<Status> {
    let t = tables.qualify(Table::Outbox);
    let s = tables.qualify(Table::RelayState);
    let d = tables.qualify(Table::DeadLetters);
    let backlog = diesel::sql_query(format!(
        "SELECT topic, count(*) AS events, \
         extract(epoch FROM clock_timestamp() - min(created_at))::float8 AS oldest_age_secs \
         FROM {t} GROUP BY topic ORDER BY topic"
    ))
    .load(conn)?;
    let leaders = diesel::sql_query(format!(
        "SELECT outbox_table, leader_id, leader_epoch, lease_expires_at, \
         coalesce(lease_expires_at > clock_timestamp(), false) AS lease_valid \
         FROM {s} ORDER BY outbox_table"
    ))
    .load(conn)?;
    let dead_letters = diesel::sql_query(format!(
        "SELECT topic, count(*) AS events, \
         (array_agg(last_error ORDER BY dead_lettered_at DESC))[1] AS last_error \
         FROM {d} GROUP BY topic ORDER BY topic"
    ))
    .load(conn)?;
    let oldest_transaction = diesel::sql_query(
        "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8 AS open_secs, \
         coalesce(application_name, '') AS application_name, coalesce(state, '') AS state \
         FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
         ORDER BY xact_start LIMIT 1",
    )
    .load::<OldestTransaction>(conn)?
    .pop();
    let relays = relays(conn, &leaders)?;
    let inbox = inbox(conn, tables)?;
    let slots = diesel::sql_query(
        "SELECT slot_name::text, active_pid, wal_status, \
         pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes, \
         pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag_bytes \
         FROM pg_replication_slots WHERE database = current_database() ORDER BY slot_name",
    )
    .load(conn)?;
    let q = tables.qualify(Table::Snapshots);
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        e: bool,
    }
    let has_snapshots = diesel::sql_query(format!("SELECT to_regclass('{q}') IS NOT NULL AS e"))
        .get_result::<Exists>(conn)?
        .e;
    let snapshots = if has_snapshots {
        diesel::sql_query(format!(
            "SELECT table_name, rows_read, requested_at::text AS requested_at, \
             finished_at::text AS finished_at FROM {q} ORDER BY requested_at DESC"
        ))
        .load(conn)?
    } else {
        Vec::new()
    };
    Ok(Status {
        slots,
        snapshots,
        backlog,
        leaders,
        relays,
        dead_letters,
        oldest_transaction,
        inbox,
    })
}

/// Relay sessions of this database, grouped by instance, with their role.
fn relays(conn: &mut PgConnection, leaders: &[Leader]) -> Result<Vec<RelaySession>> {
    let rows: Vec<SessionRow> = diesel::sql_query(
        "SELECT substr(application_name, length($1) + 1) AS instance, count(*) AS connections, \
         array_agg(pid ORDER BY pid) AS pids, \
         coalesce(array_agg(DISTINCT coalesce(host(client_addr), 'local')) \
           FILTER (WHERE backend_start IS NOT NULL), '{}') AS clients, \
         min(backend_start) AS connected_since \
         FROM pg_stat_activity \
         WHERE left(application_name, length($1)) = $1 AND datname = current_database() \
         GROUP BY 1 ORDER BY 1",
    )
    .bind::<Text, _>(crate::store::APPLICATION_NAME_PREFIX)
    .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            // A truncated application_name is a prefix of the full one.
            let named = |l: &&Leader| {
                l.leader_id
                    .as_deref()
                    .is_some_and(|id| !r.instance.is_empty() && id.starts_with(&r.instance))
            };
            let role = match leaders.iter().find(named) {
                Some(l) if l.lease_valid => "leader",
                Some(_) => "leader (lease expired)",
                None => "standby",
            };
            RelaySession {
                instance: r.instance,
                role: role.to_owned(),
                connections: r.connections,
                pids: r.pids,
                clients: r.clients,
                connected_since: r.connected_since,
            }
        })
        .collect())
}

/// Inbox rows per consumer, when the database has a readable inbox table.
fn inbox(conn: &mut PgConnection, tables: &outbox::TableRef) -> Result<InboxSizes> {
    #[derive(QueryableByName)]
    struct Present {
        #[diesel(sql_type = Bool)]
        present: bool,
        #[diesel(sql_type = Bool)]
        readable: bool,
    }
    let table = tables.qualify(Table::Inbox);
    let p: Present = diesel::sql_query(
        "SELECT to_regclass($1) IS NOT NULL AS present, \
         coalesce(has_table_privilege(to_regclass($1), 'SELECT'), false) AS readable",
    )
    .bind::<Text, _>(&table)
    .get_result(conn)?;
    let consumers = if p.present && p.readable {
        diesel::sql_query(format!(
            "SELECT consumer, count(*) AS rows, min(processed_at) AS oldest_processed_at, \
             extract(epoch FROM clock_timestamp() - min(processed_at))::float8 AS oldest_age_secs \
             FROM {table} GROUP BY consumer ORDER BY consumer"
        ))
        .load(conn)?
    } else {
        Vec::new()
    };
    Ok(InboxSizes {
        table: table.replace('"', ""),
        exists: p.present,
        readable: p.readable,
        consumers,
    })
}
