//! The inbox: apply each message's effect once ("effectively once").
//!
//! [`Inbox::process`] runs, in ONE transaction: `INSERT INTO inbox (consumer, message_id) ...
//! ON CONFLICT DO NOTHING`, and only when that inserted a row, the handler's business change
//! (which may also enqueue outbox events on the same connection). Both commit or neither does.
//! A redelivered message finds its row and is skipped; two consumers racing on the same message
//! serialise on the primary key: one applies, the other waits, then sees a duplicate. Never
//! `SELECT` first and `INSERT` later: both racers would see "new".
//!
//! ```no_run
//! use diesel::prelude::*;
//! # fn demo(conn: &mut PgConnection) -> Result<(), outbox::Error> {
//! let inbox = outbox::Inbox::new("inventory")?;
//! let outcome = inbox.process(conn, &outbox::MessageRef::id("0193-example"), |conn| {
//!     diesel::sql_query("UPDATE stock SET available = available - 1 WHERE product = 'p-1'")
//!         .execute(conn)?;
//!     Ok::<_, outbox::Error>(())
//! })?;
//! assert!(outcome.is_applied() || outcome.is_duplicate());
//! # Ok(()) }
//! ```

use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

use crate::contract::{Table, TableRef};
use crate::{Error, Result};

/// Longest consumer name and message id accepted (bytes).
pub const MAX_INBOX_ID_LEN: usize = 512;

/// The message being processed: its id and, for diagnostics, where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef<'a> {
    id: &'a str,
    topic: Option<&'a str>,
    partition: Option<i32>,
    offset: Option<i64>,
}

impl<'a> MessageRef<'a> {
    /// A message known by its id only (any stable id the producer set; for this project's
    /// events, the `ce_id` header).
    #[must_use]
    pub fn id(id: &'a str) -> Self {
        Self {
            id,
            topic: None,
            partition: None,
            offset: None,
        }
    }

    /// Records where the message was read (stored with the inbox row, for diagnostics).
    #[must_use]
    pub fn at(mut self, topic: &'a str, partition: i32, offset: i64) -> Self {
        self.topic = Some(topic);
        self.partition = Some(partition);
        self.offset = Some(offset);
        self
    }

    /// The message id.
    #[must_use]
    pub fn message_id(&self) -> &str {
        self.id
    }
}

/// What [`Inbox::process`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// First time: the handler ran and its change committed with the inbox row.
    Applied(T),
    /// Seen before: the handler did not run.
    Duplicate,
}

impl<T> Processed<T> {
    /// Whether the handler ran.
    #[must_use]
    pub fn is_applied(&self) -> bool {
        matches!(self, Processed::Applied(_))
    }

    /// Whether the message was a duplicate.
    #[must_use]
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Processed::Duplicate)
    }
}

/// The inbox of one consumer (a service or handler name).
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
    tables: TableRef,
    insert_sql: String,
}

impl Inbox {
    /// The inbox of `consumer`, in the tables found through the `search_path`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `consumer` is empty, too long or contains NUL.
    pub fn new(consumer: impl Into<String>) -> Result<Self> {
        let consumer = consumer.into();
        check_id("consumer", &consumer)?;
        let tables = TableRef::default();
        Ok(Self {
            insert_sql: insert_sql(&tables),
            consumer,
            tables,
        })
    }

    /// Uses the tables in `schema`. Defaults to the `search_path`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`].
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        self.tables = TableRef::in_schema(schema)?;
        self.insert_sql = insert_sql(&self.tables);
        Ok(self)
    }

    /// The consumer name.
    #[must_use]
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Runs `handler` once per message id: see the module docs. Opens its own
    /// transaction (a savepoint when already inside one).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an empty or oversized message id; the handler's error (the
    /// transaction is rolled back, the inbox row with it, so the message can be retried);
    /// [`Error::Database`].
    pub fn process<T, E, F>(
        &self,
        conn: &mut PgConnection,
        message: &MessageRef<'_>,
        handler: F,
    ) -> std::result::Result<Processed<T>, E>
    where
        F: FnOnce(&mut PgConnection) -> std::result::Result<T, E>,
        E: From<Error> + From<diesel::result::Error>,
    {
        check_id("message id", message.id).map_err(E::from)?;
        conn.transaction(|conn| {
            if !self.record(conn, message)? {
                return Ok(Processed::Duplicate);
            }
            handler(conn).map(Processed::Applied)
        })
    }

    /// Inserts the inbox row inside the caller's transaction; returns whether it was new. Use
    /// this when you manage the transaction yourself, and apply the effect only on `true`.
    ///
    /// # Errors
    /// [`Error::NotInTransaction`] outside a transaction; [`Error::Database`].
    pub fn record(&self, conn: &mut PgConnection, message: &MessageRef<'_>) -> Result<bool> {
        crate::store::require_transaction(conn)?;
        check_id("message id", message.id)?;
        let inserted = diesel::sql_query(&self.insert_sql)
            .bind::<Text, _>(&self.consumer)
            .bind::<Text, _>(message.id)
            .bind::<Nullable<Text>, _>(message.topic)
            .bind::<Nullable<Integer>, _>(message.partition)
            .bind::<Nullable<BigInt>, _>(message.offset)
            .execute(conn)?;
        Ok(inserted == 1)
    }

    /// Inserts the inbox rows of several messages with ONE statement inside the caller's
    /// transaction; returns, for each message in order, whether its effect must be applied now:
    /// `true` for the first occurrence of an id that was new, `false` for an id already in the
    /// inbox or repeated earlier in `messages`.
    ///
    /// # Errors
    /// [`Error::NotInTransaction`] outside a transaction; [`Error::InvalidConfig`] for an empty
    /// or oversized id; [`Error::Database`].
    pub fn record_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[MessageRef<'_>],
    ) -> Result<Vec<bool>> {
        #[derive(QueryableByName)]
        struct New {
            #[diesel(sql_type = Text)]
            message_id: String,
        }
        crate::store::require_transaction(conn)?;
        for m in messages {
            check_id("message id", m.id)?;
        }
        let ids: Vec<&str> = messages.iter().map(|m| m.id).collect();
        let topics: Vec<Option<&str>> = messages.iter().map(|m| m.topic).collect();
        let partitions: Vec<Option<i32>> = messages.iter().map(|m| m.partition).collect();
        let offsets: Vec<Option<i64>> = messages.iter().map(|m| m.offset).collect();
        let new: Vec<New> = diesel::sql_query(format!(
            "INSERT INTO {} (consumer, message_id, topic, kafka_partition, kafka_offset) \
             SELECT $1, m.id, m.topic, m.part, m.off \
             FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[]) \
                  WITH ORDINALITY AS m(id, topic, part, off, n) ORDER BY m.n \
             ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id",
            self.tables.qualify(Table::Inbox)
        ))
        .bind::<Text, _>(&self.consumer)
        .bind::<diesel::sql_types::Array<Text>, _>(&ids)
        .bind::<diesel::sql_types::Array<Nullable<Text>>, _>(&topics)
        .bind::<diesel::sql_types::Array<Nullable<Integer>>, _>(&partitions)
        .bind::<diesel::sql_types::Array<Nullable<BigInt>>, _>(&offsets)
        .load(conn)?;
        let mut new: std::collections::HashSet<String> =
            new.into_iter().map(|n| n.message_id).collect();
        Ok(messages.iter().map(|m| new.remove(m.id)).collect())
    }

    /// Whether `message_id` was processed by this consumer (diagnostics and tests only: never
    /// decide whether to apply an effect with it).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub fn contains(&self, conn: &mut PgConnection, message_id: &str) -> Result<bool> {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let n: N = diesel::sql_query(format!(
            "SELECT count(*) AS n FROM {} WHERE consumer = $1 AND message_id = $2",
            self.tables.qualify(Table::Inbox)
        ))
        .bind::<Text, _>(&self.consumer)
        .bind::<Text, _>(message_id)
        .get_result(conn)?;
        Ok(n.n > 0)
    }

    /// Deletes this consumer's inbox rows older than `older_than`, `batch` rows per statement
    /// (short transactions, no long locks). Returns how many were deleted. Pick `older_than`
    /// above the longest time a message can be redelivered (docs/TABLES.md#inbox-retention).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero `batch`; [`Error::Database`].
    pub fn purge(&self, conn: &mut PgConnection, older_than: Duration, batch: i64) -> Result<u64> {
        if batch <= 0 {
            return Err(Error::InvalidConfig("purge batch must be positive".into()));
        }
        let secs = older_than.as_secs_f64();
        let sql = format!(
            "DELETE FROM {t} WHERE ctid IN (SELECT ctid FROM {t} WHERE consumer = $1 \
             AND processed_at < clock_timestamp() - $2 * interval '1 second' LIMIT $3)",
            t = self.tables.qualify(Table::Inbox)
        );
        let mut total = 0_u64;
        loop {
            let n = diesel::sql_query(&sql)
                .bind::<Text, _>(&self.consumer)
                .bind::<diesel::sql_types::Double, _>(secs)
                .bind::<BigInt, _>(batch)
                .execute(conn)?;
            total += n as u64;
            if i64::try_from(n).unwrap_or(i64::MAX) < batch {
                return Ok(total);
            }
        }
    }
}

fn insert_sql(tables: &TableRef) -> String {
    format!(
        "INSERT INTO {} (consumer, message_id, topic, kafka_partition, kafka_offset) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, message_id) DO NOTHING",
        tables.qualify(Table::Inbox)
    )
}

fn check_id(what: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        return Err(Error::InvalidConfig(format!("{what} must not be empty")));
    }
    if v.len() > MAX_INBOX_ID_LEN {
        return Err(Error::InvalidConfig(format!(
            "{what} is longer than {MAX_INBOX_ID_LEN} bytes"
        )));
    }
    if v.contains('\0') {
        return Err(Error::InvalidConfig(format!(
            "{what} must not contain NUL characters"
        )));
    }
    Ok(())
}
