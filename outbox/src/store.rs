//! Writing events: the [`Outbox`] handle and the free-function shortcuts.

use std::collections::HashSet;

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::pg::Pg;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Array, BigInt, Bytea, Jsonb, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use uuid::Uuid;

use crate::contract::{EventColumns, Function, Table, TableRef};
use crate::migrate;
use crate::stored::StoredEvent;
use crate::{Error, Event, Result};

/// Default payload limit: 1 MiB. Keep it at or below the broker's `message.max.bytes` minus
/// headers; anything the broker refuses anyway is dead-lettered by the relay.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Rows per INSERT statement in [`Outbox::enqueue_batch`]: 8 bind parameters per row must stay
/// under Postgres' 65535 parameter limit.
const ROWS_PER_STATEMENT: usize = 4096;

/// The unique constraint on `outbox.event_id` (see the migrations).
const EVENT_ID_CONSTRAINT: &str = "outbox_event_id_key";

/// Where an event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The row's `id` (positive). In [tableless](Outbox::tableless) mode the negated LSN of the
    /// event's message (negative), unique per event and growing in magnitude in WAL order.
    pub id: i64,
    /// The event id.
    pub event_id: Uuid,
}

/// Writes events into the outbox table inside the caller's transaction.
///
/// ```no_run
/// use diesel::prelude::*;
/// # fn demo(conn: &mut PgConnection) -> Result<(), outbox::Error> {
/// let outbox = outbox::Outbox::new();
/// conn.transaction(|conn| {
///     // ... the business change, on the same connection ...
///     let event = outbox::Event::json("orders", "order-42", "OrderCreated",
///                                     &serde_json::json!({"order_id": 42}))?;
///     outbox.enqueue(conn, &event)?;
///     Ok(())
/// })
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    tables: TableRef,
    max_payload_bytes: usize,
    tableless: bool,
    table_sql: String,
    emit_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An outbox with the defaults: tables found through the connection's `search_path`, payloads
    /// up to [`DEFAULT_MAX_PAYLOAD_BYTES`], events written as rows of the `outbox` table.
    #[must_use]
    pub fn new() -> Self {
        Self::with_tables(TableRef::default())
    }

    /// An outbox whose tables are at `tables`.
    #[must_use]
    pub fn with_tables(tables: TableRef) -> Self {
        Self {
            table_sql: tables.qualify(Table::Outbox),
            emit_sql: tables.qualify_function(Function::Emit),
            tables,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            // Rows work with every relay mode and every wal_level.
            tableless: false,
        }
    }

    /// Uses the tables in `schema` instead of the `search_path`. Defaults to the `search_path`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`] when `schema` is not a plain lowercase identifier.
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        self.tables = TableRef::in_schema(schema)?;
        self.table_sql = self.tables.qualify(Table::Outbox);
        self.emit_sql = self.tables.qualify_function(Function::Emit);
        Ok(self)
    }

    /// Writes events without a row: [`Outbox::enqueue`] and [`Outbox::enqueue_batch`] call the
    /// schema's `outbox_emit`, which validates like the table's constraints (same errors) and
    /// emits a transactional logical decoding message (`pg_logical_emit_message`, format v1 in
    /// `docs/TABLES.md`). The message commits or rolls back with the caller's transaction, like a
    /// row. Defaults to rows of the `outbox` table.
    ///
    /// Pick it for write-heavy outboxes read by a streaming relay: there is no row, no index
    /// entry, no DELETE and nothing to vacuum; the event exists only in the WAL until the
    /// relay's replication slot confirms it. It needs `wal_level = logical` (`outbox_emit`
    /// refuses to run otherwise) and a relay in streaming mode whose slot exists before the first
    /// event is written: a message written before the slot was created is never decoded, and a
    /// polling relay never sees any. Without a table, an event id already pending is not
    /// detected ([`Error::DuplicateEventId`] only for a repeat inside one batch); consumers
    /// deduplicate on the event id anyway. [`Outbox::pending`] still reads the table only.
    #[must_use]
    pub fn tableless(mut self) -> Self {
        self.tableless = true;
        self
    }

    /// Whether events are written without a row ([`Outbox::tableless`]).
    #[must_use]
    pub fn is_tableless(&self) -> bool {
        self.tableless
    }

    /// Largest payload accepted, in bytes. Defaults to [`DEFAULT_MAX_PAYLOAD_BYTES`] (1 MiB).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `limit` is 0.
    pub fn max_payload_bytes(mut self, limit: usize) -> Result<Self> {
        if limit == 0 {
            return Err(Error::InvalidConfig(
                "max_payload_bytes must be positive".into(),
            ));
        }
        self.max_payload_bytes = limit;
        Ok(self)
    }

    /// Where the tables are.
    #[must_use]
    pub fn tables(&self) -> &TableRef {
        &self.tables
    }

    /// Applies the pending migrations (the table contract, [`crate::contract::MIGRATIONS`]) in
    /// this outbox's schema, created if missing. Returns the versions applied. Safe to call on
    /// every start: applied migrations are skipped.
    ///
    /// # Errors
    /// [`Error::Migration`] when a migration fails; nothing of that migration is kept.
    pub fn migrate(&self, conn: &mut PgConnection) -> Result<Vec<String>> {
        migrate::run_migrations(conn, &self.tables)
    }

    /// Checks that every migration is applied, that the tables have the columns and types of the
    /// contract ([`crate::contract::Table::columns`]) and that its functions
    /// ([`crate::contract::Function`]) exist.
    ///
    /// # Errors
    /// [`Error::SchemaMismatch`] listing pending migrations, missing/mistyped columns or missing
    /// functions.
    pub fn verify_schema(&self, conn: &mut PgConnection) -> Result<()> {
        migrate::verify_schema(conn, &self.tables)
    }

    /// Enqueues one event. Must run inside the caller's transaction (`conn.transaction(..)`), so
    /// the event commits or rolls back with the business change.
    ///
    /// # Errors
    /// [`Error::NotInTransaction`], [`Error::PayloadTooLarge`], [`Error::DuplicateEventId`] (which,
    /// like any failed statement, aborts the caller's transaction), [`Error::Database`].
    pub fn enqueue(&self, conn: &mut PgConnection, event: &Event) -> Result<Enqueued> {
        require_transaction(conn)?;
        self.check_size(event)?;
        if self.tableless {
            return self
                .emit(conn, std::slice::from_ref(event))?
                .pop()
                .ok_or(Error::Database(DieselError::NotFound));
        }
        let ids = self
            .insert(conn, std::slice::from_ref(event))
            .map_err(|e| classify(e, || Some(event.event_id)))?;
        Ok(Enqueued {
            id: ids[0],
            event_id: event.event_id,
        })
    }

    /// Enqueues several events with multi-row INSERTs, all or nothing. Must run inside the
    /// caller's transaction. The batch runs in a savepoint: when it fails, none of its events is
    /// written and the caller's transaction is still usable.
    ///
    /// # Errors
    /// As [`Outbox::enqueue`]; [`Error::DuplicateEventId`] names the first duplicate, whether it
    /// is repeated inside the batch or already pending in the table.
    pub fn enqueue_batch(
        &self,
        conn: &mut PgConnection,
        events: &[Event],
    ) -> Result<Vec<Enqueued>> {
        require_transaction(conn)?;
        let mut seen = HashSet::with_capacity(events.len());
        for event in events {
            self.check_size(event)?;
            if !seen.insert(event.event_id) {
                return Err(Error::DuplicateEventId(event.event_id));
            }
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if self.tableless {
            return conn.transaction(|conn| self.emit(conn, events));
        }
        let inserted = conn.transaction::<_, DieselError, _>(|conn| {
            let mut ids = Vec::with_capacity(events.len());
            for chunk in events.chunks(ROWS_PER_STATEMENT) {
                ids.extend(self.insert(conn, chunk)?);
            }
            Ok(ids)
        });
        match inserted {
            Ok(ids) => Ok(ids
                .into_iter()
                .zip(events)
                .map(|(id, e)| Enqueued {
                    id,
                    event_id: e.event_id,
                })
                .collect()),
            Err(e) if is_event_id_violation(&e) => {
                // The savepoint is rolled back, so the transaction can still say which one.
                let duplicate = self.first_pending(conn, events)?;
                Err(classify(e, || duplicate))
            }
            Err(e) => Err(Error::Database(e)),
        }
    }

    /// Pending events, oldest id first (for tests, tools and diagnostics).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub fn pending(&self, conn: &mut PgConnection, limit: i64) -> Result<Vec<StoredEvent>> {
        Ok(diesel::sql_query(format!(
            "SELECT {} FROM {} ORDER BY id LIMIT $1",
            EventColumns::all(),
            self.table_sql
        ))
        .bind::<BigInt, _>(limit)
        .load(conn)?)
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        if event.payload.len() > self.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size: event.payload.len(),
                limit: self.max_payload_bytes,
            });
        }
        Ok(())
    }

    /// Calls `outbox_emit` once per event, in one statement, in the order of `events`.
    fn emit(&self, conn: &mut PgConnection, events: &[Event]) -> Result<Vec<Enqueued>> {
        #[derive(QueryableByName)]
        struct Emitted {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = diesel::sql_types::Uuid)]
            event_id: Uuid,
        }
        let rows: Vec<InsertRow<'_>> = events.iter().map(InsertRow::new).collect();
        let query = EmitEvents {
            emit_sql: &self.emit_sql,
            columns: EmitColumns::new(&rows),
        };
        // No unique constraint to name a duplicate: every error maps as the table's do.
        let emitted: Vec<Emitted> = query.load(conn).map_err(|e| classify(e, || None))?;
        Ok(emitted
            .into_iter()
            .map(|e| Enqueued {
                id: e.id,
                event_id: e.event_id,
            })
            .collect())
    }

    fn insert(&self, conn: &mut PgConnection, events: &[Event]) -> Result<Vec<i64>, DieselError> {
        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        let rows: Vec<InsertRow<'_>> = events.iter().map(InsertRow::new).collect();
        let query = InsertEvents {
            table_sql: &self.table_sql,
            rows: &rows,
        };
        // Postgres returns the rows of a multi-row VALUES insert in VALUES order.
        Ok(query.load::<Id>(conn)?.into_iter().map(|r| r.id).collect())
    }

    fn first_pending(&self, conn: &mut PgConnection, events: &[Event]) -> Result<Option<Uuid>> {
        #[derive(QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::Uuid)]
            event_id: Uuid,
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let found: Vec<Found> = diesel::sql_query(format!(
            "SELECT event_id FROM {} WHERE event_id = ANY($1)",
            self.table_sql
        ))
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
        .load(conn)?;
        let found: HashSet<Uuid> = found.into_iter().map(|f| f.event_id).collect();
        Ok(ids.into_iter().find(|id| found.contains(id)))
    }
}

/// The bind values of one outbox row.
struct InsertRow<'a> {
    event: &'a Event,
    headers: serde_json::Value,
    traceparent: Option<String>,
}

impl<'a> InsertRow<'a> {
    fn new(event: &'a Event) -> Self {
        Self {
            event,
            headers: serde_json::Value::Object(
                event
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            ),
            traceparent: event.traceparent.map(|t| t.to_string()),
        }
    }
}

/// `INSERT INTO outbox (..) VALUES (..), .. RETURNING id`. A one-row insert (what
/// [`Outbox::enqueue`] runs in every writer transaction) is a prepared statement cached on the
/// connection, keyed by its SQL (so each schema gets its own), which saves the parse and plan
/// per transaction; multi-row inserts vary in size and are not cached.
struct InsertEvents<'a> {
    table_sql: &'a str,
    rows: &'a [InsertRow<'a>],
}

impl diesel::query_builder::QueryFragment<Pg> for InsertEvents<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        if self.rows.len() != 1 {
            out.unsafe_to_cache_prepared();
        }
        out.push_sql("INSERT INTO ");
        out.push_sql(self.table_sql);
        out.push_sql(" (");
        out.push_sql(EventColumns::content());
        out.push_sql(") VALUES ");
        for (i, row) in self.rows.iter().enumerate() {
            let e = row.event;
            out.push_sql(if i == 0 { "(" } else { ",(" });
            out.push_bind_param::<diesel::sql_types::Uuid, _>(&e.event_id)?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(&e.topic)?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(&e.key)?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(&e.event_type)?;
            out.push_sql(",");
            out.push_bind_param::<Bytea, _>(&e.payload)?;
            out.push_sql(",");
            out.push_bind_param::<Jsonb, _>(&row.headers)?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(&e.content_type)?;
            out.push_sql(",");
            out.push_bind_param::<Nullable<Text>, _>(&row.traceparent)?;
            out.push_sql(")");
        }
        out.push_sql(" RETURNING id");
        Ok(())
    }
}

impl diesel::query_builder::QueryId for InsertEvents<'_> {
    type QueryId = ();
    // Not one id for every instance: the SQL differs by schema and row count, so diesel keys its
    // statement cache by the SQL text.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for InsertEvents<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl RunQueryDsl<PgConnection> for InsertEvents<'_> {}

/// The bind values of a tableless write, one array per `outbox_emit` argument.
struct EmitColumns<'a> {
    topics: Vec<&'a str>,
    keys: Vec<&'a str>,
    event_types: Vec<&'a str>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<&'a serde_json::Value>,
    content_types: Vec<&'a str>,
    traceparents: Vec<Option<&'a str>>,
    event_ids: Vec<Uuid>,
}

impl<'a> EmitColumns<'a> {
    fn new(rows: &'a [InsertRow<'a>]) -> Self {
        Self {
            topics: rows.iter().map(|r| r.event.topic.as_str()).collect(),
            keys: rows.iter().map(|r| r.event.key.as_str()).collect(),
            event_types: rows.iter().map(|r| r.event.event_type.as_str()).collect(),
            payloads: rows.iter().map(|r| r.event.payload.as_slice()).collect(),
            headers: rows.iter().map(|r| &r.headers).collect(),
            content_types: rows.iter().map(|r| r.event.content_type.as_str()).collect(),
            traceparents: rows.iter().map(|r| r.traceparent.as_deref()).collect(),
            event_ids: rows.iter().map(|r| r.event.event_id).collect(),
        }
    }
}

/// `SELECT id, event_id FROM outbox_emit(..)`: one call for one event, and for several one
/// statement that calls it per element of the argument arrays, in array order (the messages'
/// LSNs, so the returned ids, follow that order). Both texts depend only on the schema, so both
/// are prepared once per connection.
struct EmitEvents<'a> {
    emit_sql: &'a str,
    columns: EmitColumns<'a>,
}

impl diesel::query_builder::QueryFragment<Pg> for EmitEvents<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        let c = &self.columns;
        if c.topics.len() == 1 {
            out.push_sql("SELECT e.id, e.event_id FROM ");
            out.push_sql(self.emit_sql);
            out.push_sql("(");
            out.push_bind_param::<Text, _>(c.topics[0])?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(c.keys[0])?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(c.event_types[0])?;
            out.push_sql(",");
            out.push_bind_param::<Bytea, _>(c.payloads[0])?;
            out.push_sql(",");
            out.push_bind_param::<Jsonb, _>(c.headers[0])?;
            out.push_sql(",");
            out.push_bind_param::<Text, _>(c.content_types[0])?;
            out.push_sql(",");
            out.push_bind_param::<Nullable<Text>, _>(&c.traceparents[0])?;
            out.push_sql(",");
            out.push_bind_param::<diesel::sql_types::Uuid, _>(&c.event_ids[0])?;
            out.push_sql(") AS e");
            return Ok(());
        }
        out.push_sql("SELECT e.id, e.event_id FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&c.topics)?;
        out.push_sql(",");
        out.push_bind_param::<Array<Text>, _>(&c.keys)?;
        out.push_sql(",");
        out.push_bind_param::<Array<Text>, _>(&c.event_types)?;
        out.push_sql(",");
        out.push_bind_param::<Array<Bytea>, _>(&c.payloads)?;
        out.push_sql(",");
        out.push_bind_param::<Array<Jsonb>, _>(&c.headers)?;
        out.push_sql(",");
        out.push_bind_param::<Array<Text>, _>(&c.content_types)?;
        out.push_sql(",");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&c.traceparents)?;
        out.push_sql(",");
        out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&c.event_ids)?;
        out.push_sql(
            ") WITH ORDINALITY AS u(topic, partition_key, event_type, payload, headers, \
             content_type, traceparent, event_id, n) CROSS JOIN LATERAL ",
        );
        out.push_sql(self.emit_sql);
        out.push_sql(
            "(u.topic, u.partition_key, u.event_type, u.payload, u.headers, u.content_type, \
             u.traceparent, u.event_id) AS e ORDER BY u.n",
        );
        Ok(())
    }
}

impl diesel::query_builder::QueryId for EmitEvents<'_> {
    type QueryId = ();
    // The SQL differs by schema (and single or batch): keyed by its text.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for EmitEvents<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl RunQueryDsl<PgConnection> for EmitEvents<'_> {}

pub(crate) fn require_transaction(conn: &mut PgConnection) -> Result<()> {
    let depth = AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth()?;
    if depth.is_none() {
        return Err(Error::NotInTransaction);
    }
    Ok(())
}

fn is_event_id_violation(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
        if info.constraint_name() == Some(EVENT_ID_CONSTRAINT))
}

fn classify(e: DieselError, duplicate: impl FnOnce() -> Option<Uuid>) -> Error {
    if is_event_id_violation(&e) {
        if let Some(id) = duplicate() {
            return Error::DuplicateEventId(id);
        }
    }
    Error::Database(e)
}
