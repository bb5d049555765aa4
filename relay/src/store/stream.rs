//! Streaming capture's SQL (on the relay's ordinary connection, not the replication one): the
//! slot's state and its WAL retention, fencing the slot's walsender, the heartbeat, the message
//! prefix, and what `migrate --capture streaming` creates.

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel::{OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};
use outbox::contract::{Table, TableRef};

use super::lease::lost;
use super::{Fenced, Fragments, Lease, Sql};
use crate::error::{Error, Result};

impl Sql {
    /// The fenced statements of streaming capture.
    pub(super) fn stream_statements(&mut self, f: &Fragments) {
        let Fragments { locked_lease, .. } = f;
        // Ends the walsender that streams the slot now (a previous leader's, paused or not):
        // only while the lease is ours (on the server it was taken on, the state row share-
        // locked against a takeover), so a standby never cuts off the leader. Both CTEs are
        // materialized, so nothing is ended before the lease is checked and only this slot's
        // walsender is a candidate (in one WHERE clause the planner evaluated the terminating
        // call on every slot's row before the name filter, ending every walsender on the
        // server).
        self.terminate_walsender = format!(
            "WITH lease AS MATERIALIZED ({locked_lease}), \
             target AS MATERIALIZED (SELECT active_pid FROM pg_replication_slots \
               WHERE slot_name = $4 AND active_pid IS NOT NULL \
               AND active_pid <> pg_backend_pid()) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM target WHERE CASE WHEN EXISTS (SELECT 1 FROM lease) \
              THEN pg_terminate_backend(active_pid) ELSE false END) AS affected"
        );
    }
}

/// A replication slot as `pg_replication_slots` shows it, with its WAL retention.
#[derive(Debug, Clone, QueryableByName)]
pub struct SlotInfo {
    /// The output plugin (`pgoutput` expected).
    #[diesel(sql_type = Nullable<Text>)]
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    #[diesel(sql_type = Text)]
    pub slot_type: String,
    /// The database the slot decodes (logical slots).
    #[diesel(sql_type = Nullable<Text>)]
    pub database: Option<String>,
    /// The database this connection is on.
    #[diesel(sql_type = Text)]
    pub current_database: String,
    /// The walsender streaming it now, if any.
    #[diesel(sql_type = Nullable<Integer>)]
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated: WAL it needs is gone).
    #[diesel(sql_type = Nullable<Text>)]
    pub wal_status: Option<String>,
    /// Where a new stream starts: every transaction committed before it was delivered.
    #[diesel(sql_type = Nullable<Text>)]
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the server keeps for this slot (bytes from `restart_lsn` to the current position).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub retained_bytes: Option<i64>,
    /// WAL written since the confirmed position (bytes): what the relay has not confirmed yet.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub lag_bytes: Option<i64>,
    /// Bytes that can still be written before the slot is invalidated (`max_slot_wal_keep_size`
    /// set), `None` when unbounded.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub safe_wal_size: Option<i64>,
}

/// The slot named `slot`, if it exists.
///
/// # Errors
/// [`Error::Database`].
pub fn slot_info(conn: &mut PgConnection, slot: &str) -> Result<Option<SlotInfo>> {
    let lsn = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
               ELSE pg_current_wal_lsn() END";
    Ok(diesel::sql_query(format!(
        "SELECT plugin::text, slot_type, database::text, current_database()::text AS current_database, \
         active_pid, wal_status, confirmed_flush_lsn::text, \
         pg_wal_lsn_diff({lsn}, restart_lsn)::bigint AS retained_bytes, \
         pg_wal_lsn_diff({lsn}, confirmed_flush_lsn)::bigint AS lag_bytes, \
         safe_wal_size FROM pg_replication_slots WHERE slot_name = $1"
    ))
    .bind::<Text, _>(slot)
    .get_result(conn)
    .optional()?)
}

/// The slot, checked usable by streaming capture: present, logical with pgoutput, on this
/// database, not invalidated. The errors say what to do.
///
/// # Errors
/// [`Error::Slot`] naming the problem and the recovery; [`Error::Database`].
pub fn usable_slot(conn: &mut PgConnection, slot: &str) -> Result<SlotInfo> {
    let problem = |p: String| Error::Slot {
        slot: slot.to_owned(),
        problem: p,
    };
    let Some(info) = slot_info(conn, slot)? else {
        return Err(problem(
            "does not exist: create it with `outbox-relay migrate --capture streaming` \
             (the relay never creates one itself: a new slot starts at the current WAL \
             position, so after a lost slot it would silently skip every event committed \
             since; see docs/OPERATIONS.md#replication-slots)"
                .into(),
        ));
    };
    if info.slot_type != "logical" || info.plugin.as_deref() != Some("pgoutput") {
        return Err(problem(format!(
            "is a {} slot with plugin {:?}: streaming capture needs a logical slot with pgoutput",
            info.slot_type, info.plugin
        )));
    }
    if info.database.as_deref() != Some(info.current_database.as_str()) {
        return Err(problem(format!(
            "decodes database {:?}, not {:?} (the one database_url names): slot names are \
             server-wide, so each database's relay needs its own (set `slot`)",
            info.database, info.current_database
        )));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(problem(
            "was invalidated: the server removed WAL it still needed (max_slot_wal_keep_size \
             exceeded), so events committed since its confirmed position may be gone from \
             the WAL. Recovery: docs/OPERATIONS.md#a-lost-slot (capture with polling what the \
             outbox table still holds, compare with the consumers, then recreate the slot)"
                .into(),
        ));
    }
    Ok(info)
}

/// Ends the walsender streaming `slot` now, unless it is this connection's: only while the
/// lease is ours. Returns how many were ended.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership), [`Error::Database`].
pub fn terminate_walsender(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    slot: &str,
) -> Result<i64> {
    let r: Fenced = diesel::sql_query(&sql.terminate_walsender)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<Text, _>(slot)
        .bind::<Text, _>(&lease.server)
        .get_result(conn)?;
    if r.leased == 0 {
        return Err(lost(sql));
    }
    Ok(r.affected)
}

/// The prefix of the tableless outbox's logical messages (`outbox_message_prefix()`, created
/// by the migrations).
///
/// # Errors
/// [`Error::Config`] when the function is missing (migrations not applied), [`Error::Database`].
pub fn message_prefix(conn: &mut PgConnection, tables: &TableRef) -> Result<String> {
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = Text)]
        p: String,
    }
    let f = match tables.schema() {
        Some(s) => format!("{}.outbox_message_prefix()", s.quoted()),
        None => "outbox_message_prefix()".into(),
    };
    match diesel::sql_query(format!("SELECT {f} AS p")).get_result::<P>(conn) {
        Ok(p) => Ok(p.p),
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("does not exist") =>
        {
            Err(Error::Config(format!(
                "{f} does not exist: apply the migrations (`outbox-relay migrate`)"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes a non-transactional logical message with `prefix`: it reaches the stream at once,
/// behind everything committed before it, and lets an idle relay confirm its position (so an
/// outbox without events does not hold WAL that other tables write).
///
/// # Errors
/// [`Error::Database`].
pub fn emit_heartbeat(conn: &mut PgConnection, prefix: &str) -> Result<()> {
    #[derive(QueryableByName)]
    struct L {
        #[allow(dead_code)]
        #[diesel(sql_type = Text)]
        l: String,
    }
    diesel::sql_query("SELECT pg_logical_emit_message(false, $1, '')::text AS l")
        .bind::<Text, _>(prefix)
        .get_result::<L>(conn)?;
    Ok(())
}

/// The server's `wal_level`.
///
/// # Errors
/// [`Error::Database`].
pub fn wal_level(conn: &mut PgConnection) -> Result<String> {
    #[derive(QueryableByName)]
    struct W {
        #[diesel(sql_type = Text)]
        w: String,
    }
    Ok(
        diesel::sql_query("SELECT current_setting('wal_level') AS w")
            .get_result::<W>(conn)?
            .w,
    )
}

/// Checks that the publication exists, publishes INSERTs and includes the outbox table;
/// returns the table's schema (what the stream's rows are matched against).
///
/// # Errors
/// [`Error::Config`] naming what is missing; [`Error::Database`].
pub fn check_publication(
    conn: &mut PgConnection,
    tables: &TableRef,
    publication: &str,
) -> Result<String> {
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = Nullable<Text>)]
        schema: Option<String>,
        #[diesel(sql_type = Nullable<Bool>)]
        inserts: Option<bool>,
        #[diesel(sql_type = Bool)]
        includes: bool,
    }
    let table = tables.qualify(Table::Outbox);
    let p: P = diesel::sql_query(format!(
        "SELECT (SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass('{table}')) AS schema, \
         (SELECT pubinsert FROM pg_publication WHERE pubname = $1) AS inserts, \
         EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = $1 \
                 AND format('%I.%I', t.schemaname, t.tablename)::regclass = to_regclass('{table}')) AS includes"
    ))
    .bind::<Text, _>(publication)
    .get_result(conn)?;
    let migrate = "create it with `outbox-relay migrate --capture streaming`";
    let Some(schema) = p.schema else {
        return Err(Error::Config(format!(
            "the outbox table {table} does not exist: apply the migrations"
        )));
    };
    match (p.inserts, p.includes) {
        (None, _) => Err(Error::Config(format!(
            "publication {publication:?} does not exist: {migrate}"
        ))),
        (Some(false), _) => Err(Error::Config(format!(
            "publication {publication:?} does not publish INSERTs: streaming capture reads the outbox table's inserts"
        ))),
        (Some(true), false) => Err(Error::Config(format!(
            "publication {publication:?} does not include {schema}.outbox: nothing would be streamed"
        ))),
        (Some(true), true) => Ok(schema),
    }
}

/// Fails with [`Error::MissingGrants`] when the connected role may not stream (no REPLICATION
/// attribute).
///
/// # Errors
/// [`Error::MissingGrants`], [`Error::Database`].
pub fn check_replication_role(conn: &mut PgConnection) -> Result<()> {
    #[derive(QueryableByName)]
    struct R {
        #[diesel(sql_type = Text)]
        role: String,
        #[diesel(sql_type = Bool)]
        ok: bool,
    }
    let r: R = diesel::sql_query(
        "SELECT current_user::text AS role, (rolreplication OR rolsuper) AS ok \
         FROM pg_roles WHERE rolname = current_user",
    )
    .get_result(conn)?;
    if r.ok {
        Ok(())
    } else {
        Err(Error::MissingGrants {
            missing: vec![format!(
                "the REPLICATION attribute for streaming capture (ALTER ROLE \"{}\" REPLICATION)",
                r.role
            )],
            role: r.role,
        })
    }
}

/// Whether the publication exists.
///
/// # Errors
/// [`Error::Database`].
pub fn publication_exists(conn: &mut PgConnection, publication: &str) -> Result<bool> {
    #[derive(QueryableByName)]
    struct E {
        #[diesel(sql_type = Bool)]
        e: bool,
    }
    Ok(
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS e")
            .bind::<Text, _>(publication)
            .get_result::<E>(conn)?
            .e,
    )
}

/// What [`ensure_streaming`] did.
#[derive(Debug, Clone, Default)]
pub struct StreamingSetup {
    /// The publication was created now.
    pub created_publication: bool,
    /// The slot was created now, at this LSN.
    pub created_slot: Option<String>,
    /// Rows in the outbox table when the slot was created: written before it, so not in its
    /// stream (deliver them with polling first, see docs/RELAY.md#switching-modes).
    pub rows_before_slot: i64,
}

/// Creates what streaming capture needs when missing: the publication of the outbox table
/// (INSERT only) and the logical replication slot (pgoutput). Needs a role that may create a
/// publication on the table (its owner) and has REPLICATION.
///
/// # Errors
/// [`Error::Config`] when `wal_level` is not `logical`; [`Error::Database`].
pub fn ensure_streaming(
    conn: &mut PgConnection,
    tables: &TableRef,
    slot: &str,
    publication: &str,
) -> Result<StreamingSetup> {
    let level = wal_level(conn)?;
    if level != "logical" {
        return Err(Error::Config(format!(
            "wal_level is {level:?}: streaming capture needs wal_level = logical (set it in \
             postgresql.conf and restart the server; scripts/setup does it for the local one)"
        )));
    }
    let mut setup = StreamingSetup::default();
    if !publication_exists(conn, publication)? {
        conn.batch_execute(&format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLE {} WITH (publish = 'insert')",
            tables.qualify(Table::Outbox)
        ))?;
        setup.created_publication = true;
    }
    if let Some(info) = slot_info(conn, slot)? {
        if info.database.as_deref() != Some(info.current_database.as_str()) {
            return Err(Error::Slot {
                slot: slot.to_owned(),
                problem: format!(
                    "exists for database {:?}: slot names are server-wide, so each database's \
                     relay needs its own (set `slot`)",
                    info.database
                ),
            });
        }
    } else {
        #[derive(QueryableByName)]
        struct Created {
            #[diesel(sql_type = Text)]
            lsn: String,
        }
        let c: Created = diesel::sql_query(
            "SELECT lsn::text AS lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        )
        .bind::<Text, _>(slot)
        .get_result(conn)?;
        setup.created_slot = Some(c.lsn);
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        setup.rows_before_slot = diesel::sql_query(format!(
            "SELECT count(*) AS n FROM {}",
            tables.qualify(Table::Outbox)
        ))
        .get_result::<Count>(conn)?
        .n;
    }
    Ok(setup)
}

/// Checks each captured table before streaming its changes: it exists, its replica identity
/// gives every change a key (a primary key, `USING INDEX`, or `FULL`), and the table
/// publication publishes it with every operation. Returns the tables' oids.
///
/// # Errors
/// [`Error::Config`] naming the table and the fix; [`Error::Database`].
pub fn check_captured_tables(
    conn: &mut PgConnection,
    tables: &[crate::cdc::TableName],
    publication: &str,
) -> Result<Vec<u32>> {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = Nullable<BigInt>)]
        oid: Option<i64>,
        #[diesel(sql_type = Bool)]
        exists: bool,
        #[diesel(sql_type = Nullable<Text>)]
        identity: Option<String>,
        #[diesel(sql_type = Bool)]
        has_pk: bool,
        #[diesel(sql_type = Bool)]
        published: bool,
        #[diesel(sql_type = Bool)]
        partitioned: bool,
    }
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = Nullable<Bool>)]
        all_ops: Option<bool>,
    }
    let p: P = diesel::sql_query(
        "SELECT (SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate \
                 FROM pg_publication WHERE pubname = $1) AS all_ops",
    )
    .bind::<Text, _>(publication)
    .get_result(conn)?;
    let migrate = "`outbox-relay migrate --capture streaming` with `tables` set creates it";
    match p.all_ops {
        None => {
            return Err(Error::Config(format!(
                "publication {publication:?} of the captured tables does not exist: {migrate}"
            )))
        }
        Some(false) => {
            return Err(Error::Config(format!(
                "publication {publication:?} does not publish every operation (insert, update, \
                 delete, truncate): change capture needs them all"
            )))
        }
        Some(true) => {}
    }
    let mut oids = Vec::new();
    for t in tables {
        let row: T = diesel::sql_query(
            "SELECT c.oid::bigint AS oid, c.oid IS NOT NULL AS exists, \
                    COALESCE(c.relkind = 'p', false) AS partitioned, \
                    c.relreplident::text AS identity, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
                            AND (i.indisprimary OR (c.relreplident = 'i' AND i.indisreplident))) AS has_pk, \
                    EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = $3 \
                            AND p.schemaname = $1 AND p.tablename = $2) AS published \
             FROM (SELECT 1) one \
             LEFT JOIN pg_class c ON c.relname = $2 AND c.relkind IN ('r', 'p') \
               AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)",
        )
        .bind::<Text, _>(&t.schema)
        .bind::<Text, _>(&t.table)
        .bind::<Text, _>(publication)
        .get_result(conn)?;
        if !row.exists {
            return Err(Error::Config(format!(
                "captured table {t} does not exist (check capture_tables)"
            )));
        }
        if row.partitioned {
            return Err(Error::Config(format!(
                "captured table {t} is partitioned: its changes arrive under its partitions' \
                 names; capture the partitions instead"
            )));
        }
        let keyed = match row.identity.as_deref() {
            Some("f") => true,
            Some("d" | "i") => row.has_pk,
            _ => false,
        };
        if !keyed {
            return Err(Error::Config(format!(
                "captured table {t} has no key its changes can carry: give it a primary key, or \
                 set REPLICA IDENTITY USING INDEX (a unique index) or REPLICA IDENTITY FULL (the \
                 whole row is then the key, docs/CDC.md)"
            )));
        }
        if !row.published {
            return Err(Error::Config(format!(
                "captured table {t} is not in publication {publication:?}: {migrate}, or \
                 ALTER PUBLICATION \"{publication}\" ADD TABLE {t}"
            )));
        }
        oids.extend(row.oid.and_then(|o| u32::try_from(o).ok()));
    }
    Ok(oids)
}

/// The database's enums, domains and array types (what the change envelope's mapping needs
/// beyond the built-in types): `(oid, kind, base or element type)`.
///
/// # Errors
/// [`Error::Database`].
pub fn user_types(conn: &mut PgConnection) -> Result<Vec<(u32, String, u32)>> {
    #[derive(QueryableByName)]
    struct U {
        #[diesel(sql_type = BigInt)]
        oid: i64,
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = BigInt)]
        base: i64,
    }
    let rows: Vec<U> = diesel::sql_query(
        "SELECT oid::bigint AS oid, typtype::text AS kind, \
                (CASE WHEN typtype = 'd' THEN typbasetype ELSE typelem END)::bigint AS base \
         FROM pg_type \
         WHERE typtype IN ('e', 'd') OR (typcategory = 'A' AND typelem <> 0)",
    )
    .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|u| {
            Some((
                u32::try_from(u.oid).ok()?,
                u.kind,
                u32::try_from(u.base).ok()?,
            ))
        })
        .collect())
}

/// Creates the publication of the captured tables (every operation) when missing, and adds
/// the tables it does not publish yet.
///
/// # Errors
/// [`Error::Database`] (the role must own the tables).
pub fn ensure_table_publication(
    conn: &mut PgConnection,
    tables: &[crate::cdc::TableName],
    publication: &str,
) -> Result<Vec<String>> {
    let list = |ts: &[&crate::cdc::TableName]| {
        ts.iter()
            .map(|t| format!("\"{}\".\"{}\"", t.schema, t.table))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut added = Vec::new();
    if !publication_exists(conn, publication)? {
        let all: Vec<_> = tables.iter().collect();
        conn.batch_execute(&format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLE {}",
            list(&all)
        ))?;
        added.extend(tables.iter().map(ToString::to_string));
        return Ok(added);
    }
    #[derive(QueryableByName)]
    struct In {
        #[diesel(sql_type = Bool)]
        published: bool,
    }
    let mut missing = Vec::new();
    for t in tables {
        let r: In = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $3 \
                            AND schemaname = $1 AND tablename = $2) AS published",
        )
        .bind::<Text, _>(&t.schema)
        .bind::<Text, _>(&t.table)
        .bind::<Text, _>(publication)
        .get_result(conn)?;
        if !r.published {
            missing.push(t);
        }
    }
    if !missing.is_empty() {
        conn.batch_execute(&format!(
            "ALTER PUBLICATION \"{publication}\" ADD TABLE {}",
            list(&missing)
        ))?;
        added.extend(missing.iter().map(ToString::to_string));
    }
    Ok(added)
}

/// A snapshot the relay is to read (a row of `outbox_cdc_snapshots` not finished).
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// `schema.table`.
    pub table: String,
    /// Rows per chunk.
    pub chunk_size: i32,
    /// The key after which the next chunk starts (`None`: the first chunk).
    pub last_key: Option<Vec<String>>,
    /// When it was requested (names this request: asked for again, the table's row is another
    /// request, and this one's progress is no longer saved).
    pub requested_at: String,
}

/// The oldest unfinished snapshot of one of `tables`.
///
/// # Errors
/// [`Error::Database`].
pub fn next_snapshot(
    conn: &mut PgConnection,
    snapshots: &str,
    tables: &[crate::cdc::TableName],
) -> Result<Option<SnapshotRequest>> {
    #[derive(QueryableByName)]
    struct R {
        #[diesel(sql_type = Text)]
        table_name: String,
        #[diesel(sql_type = Integer)]
        chunk_size: i32,
        #[diesel(sql_type = Nullable<diesel::sql_types::Array<Text>>)]
        last_key: Option<Vec<String>>,
        #[diesel(sql_type = Text)]
        requested_at: String,
    }
    let names: Vec<String> = tables.iter().map(ToString::to_string).collect();
    let r: Option<R> = diesel::sql_query(format!(
        "SELECT table_name, chunk_size, last_key, requested_at::text AS requested_at FROM {snapshots} \
         WHERE finished_at IS NULL AND table_name = ANY($1) ORDER BY requested_at LIMIT 1"
    ))
    .bind::<diesel::sql_types::Array<Text>, _>(names)
    .get_result(conn)
    .optional()?;
    Ok(r.map(|r| SnapshotRequest {
        table: r.table_name,
        chunk_size: r.chunk_size,
        last_key: r.last_key,
        requested_at: r.requested_at,
    }))
}

/// Asks for a snapshot of `table` (again from the start if one ran before).
///
/// # Errors
/// [`Error::Database`].
pub fn request_snapshot(
    conn: &mut PgConnection,
    snapshots: &str,
    table: &crate::cdc::TableName,
    chunk_size: i32,
) -> Result<()> {
    diesel::sql_query(format!(
        "INSERT INTO {snapshots} (table_name, chunk_size) VALUES ($1, $2) \
         ON CONFLICT (table_name) DO UPDATE SET chunk_size = EXCLUDED.chunk_size, last_key = NULL, \
           rows_read = 0, requested_at = now(), finished_at = NULL"
    ))
    .bind::<Text, _>(table.to_string())
    .bind::<Integer, _>(chunk_size)
    .execute(conn)?;
    Ok(())
}

/// Records a delivered chunk of `request`: the snapshot resumes after `last_key`; `finished`
/// ends it. Returns false when the table's snapshot was asked for again meanwhile (this
/// request's progress is then not saved: the new one starts from the beginning).
///
/// # Errors
/// [`Error::Database`].
pub fn save_snapshot_progress(
    conn: &mut PgConnection,
    snapshots: &str,
    request: &SnapshotRequest,
    last_key: Option<&[String]>,
    rows: i64,
    finished: bool,
) -> Result<bool> {
    let n = diesel::sql_query(format!(
        "UPDATE {snapshots} SET last_key = COALESCE($2, last_key), rows_read = rows_read + $3, \
           finished_at = CASE WHEN $4 THEN now() END \
         WHERE table_name = $1 AND finished_at IS NULL AND requested_at::text = $5"
    ))
    .bind::<Text, _>(&request.table)
    .bind::<Nullable<diesel::sql_types::Array<Text>>, _>(last_key.map(<[String]>::to_vec))
    .bind::<BigInt, _>(rows)
    .bind::<Bool, _>(finished)
    .bind::<Text, _>(&request.requested_at)
    .execute(conn)?;
    Ok(n == 1)
}

/// How a snapshot reads a table: its columns (in table order) with their type and send function,
/// and the key columns in key order.
#[derive(Debug, Clone)]
pub struct SnapshotPlan {
    /// `"schema"."table"`.
    pub qualified: String,
    /// `(name, type oid, send function, type name, key position)`.
    pub columns: Vec<(String, u32, String, String, Option<i32>)>,
}

impl SnapshotPlan {
    fn key_columns(&self) -> Vec<&(String, u32, String, String, Option<i32>)> {
        let mut k: Vec<_> = self.columns.iter().filter(|c| c.4.is_some()).collect();
        k.sort_by_key(|c| c.4);
        k
    }
}

/// The plan of a snapshot of `table`.
///
/// # Errors
/// [`Error::Config`] when the table has no unique key to read it in order by; [`Error::Database`].
pub fn snapshot_plan(
    conn: &mut PgConnection,
    table: &crate::cdc::TableName,
) -> Result<SnapshotPlan> {
    #[derive(QueryableByName)]
    struct C {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = BigInt)]
        type_oid: i64,
        #[diesel(sql_type = Text)]
        send: String,
        #[diesel(sql_type = Text)]
        type_name: String,
        #[diesel(sql_type = Nullable<Integer>)]
        key_pos: Option<i32>,
    }
    let qualified = format!("\"{}\".\"{}\"", table.schema, table.table);
    let cols: Vec<C> = diesel::sql_query(
        "SELECT a.attname::text AS name, a.atttypid::bigint AS type_oid, \
                t.typsend::regproc::text AS send, pg_catalog.format_type(a.atttypid, NULL) AS type_name, \
                array_position(i.indkey, a.attnum)::int AS key_pos \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN LATERAL (SELECT x.indkey::int2[] AS indkey FROM pg_index x \
                            JOIN pg_class r ON r.oid = x.indrelid \
                            WHERE x.indrelid = a.attrelid \
                              AND ((r.relreplident = 'i' AND x.indisreplident) \
                                OR (r.relreplident <> 'i' AND x.indisprimary))) i ON true \
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.attgenerated = '' \
         ORDER BY a.attnum",
    )
    .bind::<Text, _>(&qualified)
    .load(conn)?;
    let plan = SnapshotPlan {
        qualified,
        columns: cols
            .into_iter()
            .map(|c| {
                (
                    c.name,
                    u32::try_from(c.type_oid).unwrap_or(0),
                    c.send,
                    c.type_name,
                    c.key_pos,
                )
            })
            .collect(),
    };
    if plan.key_columns().is_empty() {
        return Err(Error::Config(format!(
            "a snapshot of {table} reads it in key order: give it a primary key or REPLICA \
             IDENTITY USING INDEX (a unique index)"
        )));
    }
    Ok(plan)
}

/// One chunk between watermarks: a low watermark message, the next `n` rows after `after`
/// in key order (each column in its binary send form, as pgoutput sends it, and the key as
/// text), a high watermark message.
///
/// # Errors
/// [`Error::Database`].
pub fn snapshot_chunk(
    conn: &mut PgConnection,
    plan: &SnapshotPlan,
    marker_prefix: &str,
    marker: &str,
    after: Option<&[String]>,
    n: i32,
) -> Result<Chunk> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Array<Nullable<diesel::sql_types::Bytea>>)]
        cols: Vec<Option<Vec<u8>>>,
        #[diesel(sql_type = diesel::sql_types::Array<Text>)]
        key: Vec<String>,
        #[diesel(sql_type = Text)]
        snap: String,
    }
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let cols = plan
        .columns
        .iter()
        .map(|(name, _, send, _, _)| format!("{send}({})", quote(name)))
        .collect::<Vec<_>>()
        .join(", ");
    let keys = plan.key_columns();
    let key_list = keys
        .iter()
        .map(|k| quote(&k.0))
        .collect::<Vec<_>>()
        .join(", ");
    let key_text = keys
        .iter()
        .map(|k| format!("{}::text", quote(&k.0)))
        .collect::<Vec<_>>()
        .join(", ");
    let after_tuple = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("($1::text[])[{}]::{}", i + 1, k.3))
        .collect::<Vec<_>>()
        .join(", ");
    let emit = |conn: &mut PgConnection, what: &str| -> Result<u64> {
        let l: Lsn =
            diesel::sql_query("SELECT pg_logical_emit_message(false, $1, $2)::text AS lsn")
                .bind::<Text, _>(marker_prefix)
                .bind::<Text, _>(format!("{what}:{marker}"))
                .get_result(conn)?;
        parse_lsn(&l.lsn)
    };
    emit(conn, "low")?;
    // Without an OR, so the key's index serves each chunk as a range scan.
    let filter = if after.is_some() {
        format!("WHERE ({key_list}) > ({after_tuple})")
    } else {
        "WHERE $1::text[] IS NULL".to_owned()
    };
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT ARRAY[{cols}]::bytea[] AS cols, ARRAY[{key_text}] AS key, \
                pg_current_snapshot()::text AS snap FROM {} \
         {filter} ORDER BY {key_list} LIMIT $2",
        plan.qualified
    ))
    .bind::<Nullable<diesel::sql_types::Array<Text>>, _>(after.map(<[String]>::to_vec))
    .bind::<Integer, _>(n)
    .load(conn)?;
    let high = emit(conn, "high")?;
    let snapshot = rows.first().map(|r| r.snap.clone());
    Ok(Chunk {
        rows: rows.into_iter().map(|r| (r.cols, r.key)).collect(),
        high,
        snapshot,
    })
}

/// One row of a chunk: its columns in their binary send form (NULL: `None`), and its key as
/// text.
pub type ChunkRow = (Vec<Option<Vec<u8>>>, Vec<String>);

/// A chunk read by [`snapshot_chunk`].
#[derive(Debug)]
pub struct Chunk {
    /// The rows, in key order.
    pub rows: Vec<ChunkRow>,
    /// The LSN of the high watermark.
    pub high: u64,
    /// The snapshot the rows were read in (`xmin:xmax:xip,...`); `None` for no rows.
    pub snapshot: Option<String>,
}

#[derive(QueryableByName)]
struct Lsn {
    #[diesel(sql_type = Text)]
    lsn: String,
}

/// `16/B374D848` as a number.
///
/// # Errors
/// [`Error::Stream`] when it is not an LSN.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let bad = || Error::Stream(format!("{s:?} is not an LSN"));
    let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
    let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
    let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
    Ok((hi << 32) | lo)
}

/// Checks the column choices against the tables: every named column exists, and a configured
/// key is carried by every change (columns of the replica identity's key, or any column with
/// `REPLICA IDENTITY FULL`: a DELETE's old row holds only those).
///
/// # Errors
/// [`Error::Config`] naming the table and column; [`Error::Database`].
pub fn check_capture_columns(conn: &mut PgConnection, columns: &crate::cdc::Columns) -> Result<()> {
    #[derive(QueryableByName)]
    struct Full {
        #[diesel(sql_type = Bool)]
        full: bool,
    }
    for (t, o) in columns {
        let plan = snapshot_plan(conn, t).or_else(|e| match e {
            // No unique key: a FULL identity table; its columns are still listed below.
            Error::Config(_) => Ok(SnapshotPlan {
                qualified: String::new(),
                columns: Vec::new(),
            }),
            other => Err(other),
        })?;
        let full: Full = diesel::sql_query(
            "SELECT c.relreplident = 'f' AS full FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind::<Text, _>(&t.schema)
        .bind::<Text, _>(&t.table)
        .get_result(conn)?;
        #[derive(QueryableByName)]
        struct Col {
            #[diesel(sql_type = Text)]
            name: String,
        }
        let names: Vec<String> = diesel::sql_query(
            "SELECT a.attname::text AS name FROM pg_attribute a \
             WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass \
               AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind::<Text, _>(&t.schema)
        .bind::<Text, _>(&t.table)
        .load::<Col>(conn)?
        .into_iter()
        .map(|c| c.name)
        .collect();
        let named = o
            .include
            .iter()
            .flatten()
            .chain(&o.exclude)
            .chain(o.key.iter().flatten());
        for c in named {
            if !names.contains(c) {
                return Err(Error::Config(format!(
                    "{t} has no column {c:?} (capture_*_columns)"
                )));
            }
        }
        if let Some(key) = &o.key {
            let identity: Vec<&String> = plan
                .columns
                .iter()
                .filter(|c| c.4.is_some())
                .map(|c| &c.0)
                .collect();
            if !full.full {
                if let Some(c) = key.iter().find(|c| !identity.contains(c)) {
                    return Err(Error::Config(format!(
                        "capture_key_columns: {t}.{c} is not in its replica identity, so a DELETE \
                         would not carry it: key by replica identity columns, or set REPLICA \
                         IDENTITY FULL on {t}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The key each captured table's events carry by default, and whether its replica identity
/// is FULL: the primary key (identity DEFAULT), the identity index's columns (USING INDEX),
/// and with FULL the primary key when there is one, else every column.
///
/// # Errors
/// [`Error::Database`].
pub fn table_keys(
    conn: &mut PgConnection,
    tables: &[crate::cdc::TableName],
) -> Result<Vec<(crate::cdc::TableName, bool, Vec<String>)>> {
    #[derive(QueryableByName)]
    struct K {
        #[diesel(sql_type = Bool)]
        full: bool,
        #[diesel(sql_type = diesel::sql_types::Array<Text>)]
        key: Vec<String>,
    }
    let mut out = Vec::new();
    for t in tables {
        let k: K = diesel::sql_query(
            "WITH c AS (SELECT oid, relreplident FROM pg_class \
                        WHERE oid = format('%I.%I', $1::text, $2::text)::regclass), \
                  i AS (SELECT x.indkey::int2[] AS cols FROM pg_index x, c \
                        WHERE x.indrelid = c.oid AND ((c.relreplident = 'i' AND x.indisreplident) \
                           OR (c.relreplident <> 'i' AND x.indisprimary))) \
             SELECT c.relreplident = 'f' AS full, \
                    COALESCE((SELECT array_agg(a.attname::text ORDER BY array_position(i.cols, a.attnum)) \
                              FROM pg_attribute a, i WHERE a.attrelid = c.oid AND a.attnum = ANY(i.cols)), \
                             (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a \
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                                AND a.attgenerated = '')) AS key \
             FROM c",
        )
        .bind::<Text, _>(&t.schema)
        .bind::<Text, _>(&t.table)
        .get_result(conn)?;
        out.push((t.clone(), k.full, k.key));
    }
    Ok(out)
}

/// `pg_current_snapshot()` as text (`xmin:xmax:xip,...`).
///
/// # Errors
/// [`Error::Database`].
pub fn current_snapshot(conn: &mut PgConnection) -> Result<String> {
    #[derive(QueryableByName)]
    struct S {
        #[diesel(sql_type = Text)]
        snap: String,
    }
    Ok(
        diesel::sql_query("SELECT pg_current_snapshot()::text AS snap")
            .get_result::<S>(conn)?
            .snap,
    )
}

/// The server's WAL flush position now (`pg_current_wal_flush_lsn()`).
///
/// # Errors
/// [`Error::Database`], or a position that cannot be read.
pub fn flush_lsn(conn: &mut PgConnection) -> Result<u64> {
    #[derive(QueryableByName)]
    struct L {
        #[diesel(sql_type = Text)]
        lsn: String,
    }
    let l = diesel::sql_query("SELECT pg_current_wal_flush_lsn()::text AS lsn")
        .get_result::<L>(conn)?;
    parse_lsn(&l.lsn)
}

/// Of these outbox events (`ids`, each with its event id and its writing transaction as
/// `xid8` text), the ones whose row is already gone from `table` (the outbox, qualified): no row
/// holds that id WITH that event id, and the transaction is visible, in ONE snapshot (the
/// statement's, which `pg_current_snapshot()` also reports), so a row whose commit is not
/// visible yet is never taken as gone. Matching the event id too: after an identity reset (a
/// restore, `ALTER ... RESTART`) another event can hold the id, and neither row may stand for the
/// other. Only the relay removes outbox rows, after delivering or dead-lettering them: a row gone
/// was settled by an earlier term.
///
/// # Errors
/// [`Error::Database`].
pub fn already_removed(
    conn: &mut PgConnection,
    table: &str,
    ids: &[i64],
    event_ids: &[uuid::Uuid],
    tx_ids: &[String],
) -> Result<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    Ok(diesel::sql_query(format!(
        "SELECT t.id FROM unnest($1::bigint[], $2::uuid[], $3::text[]) AS t(id, event_id, tx) \
         WHERE pg_visible_in_snapshot(t.tx::xid8, pg_current_snapshot()) \
         AND NOT EXISTS (SELECT 1 FROM {table} o WHERE o.id = t.id AND o.event_id = t.event_id)"
    ))
    .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(event_ids)
    .bind::<diesel::sql_types::Array<Text>, _>(tx_ids)
    .load::<Id>(conn)?
    .into_iter()
    .map(|i| i.id)
    .collect())
}
