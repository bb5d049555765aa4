//! `outbox-relay dead-letters`: list, show, retry and purge dead-lettered events.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bytea, Double, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use outbox::contract::{EventColumns, Table};

use crate::error::{Error, Result};

/// Which dead letters a command applies to. All set conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exactly this outbox id.
    pub id: Option<i64>,
    /// This topic.
    pub topic: Option<String>,
    /// This partition key.
    pub key: Option<String>,
    /// Dead-lettered longer ago than this.
    pub older_than: Option<Duration>,
    /// `last_error` contains this text (case-insensitive).
    pub error: Option<String>,
}

impl Filter {
    /// Whether no condition is set (the filter matches everything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.topic.is_none()
            && self.key.is_none()
            && self.older_than.is_none()
            && self.error.is_none()
    }

    /// The WHERE clause over parameters $1..$5.
    const WHERE: &'static str = "($1::bigint IS NULL OR id = $1) \
         AND ($2::text IS NULL OR topic = $2) \
         AND ($3::text IS NULL OR partition_key = $3) \
         AND ($4::float8 IS NULL OR dead_lettered_at < clock_timestamp() - $4 * interval '1 second') \
         AND ($5::text IS NULL OR strpos(lower(last_error), lower($5)) > 0)";
}

macro_rules! bind_filter {
    ($q:expr, $f:expr) => {
        $q.bind::<Nullable<BigInt>, _>($f.id)
            .bind::<Nullable<Text>, _>($f.topic.as_deref())
            .bind::<Nullable<Text>, _>($f.key.as_deref())
            .bind::<Nullable<Double>, _>($f.older_than.map(|d| d.as_secs_f64()))
            .bind::<Nullable<Text>, _>($f.error.as_deref())
    };
}

/// One dead letter, without its payload.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Summary {
    /// Outbox id.
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// Event id.
    #[diesel(sql_type = Text)]
    pub event_id: String,
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Partition key.
    #[diesel(sql_type = Text)]
    pub partition_key: String,
    /// Event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Payload size in bytes.
    #[diesel(sql_type = Integer)]
    pub payload_bytes: i32,
    /// Attempts made.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// The last error.
    #[diesel(sql_type = Text)]
    pub last_error: String,
    /// When it was dead-lettered.
    #[diesel(sql_type = Timestamptz)]
    pub dead_lettered_at: DateTime<Utc>,
}

/// One dead letter, whole.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Detail {
    /// Summary fields.
    #[diesel(embed)]
    #[serde(flatten)]
    pub summary: Summary,
    /// Payload.
    #[diesel(sql_type = Bytea)]
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// User headers.
    #[diesel(sql_type = Jsonb)]
    pub headers: serde_json::Value,
    /// Media type.
    #[diesel(sql_type = Text)]
    pub content_type: String,
    /// Trace context.
    #[diesel(sql_type = Nullable<Text>)]
    pub traceparent: Option<String>,
    /// When the event was written.
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

const SUMMARY: &str = "id, event_id::text AS event_id, topic, partition_key, event_type, \
     octet_length(payload) AS payload_bytes, attempts, last_error, dead_lettered_at";

/// Dead letters matching `filter`, oldest id first, at most `limit`.
///
/// # Errors
/// [`Error::Database`].
pub fn list(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<Summary>> {
    let q = diesel::sql_query(format!(
        "SELECT {SUMMARY} FROM {} WHERE {} ORDER BY id LIMIT $6",
        tables.qualify(Table::DeadLetters),
        Filter::WHERE
    ));
    Ok(bind_filter!(q, filter)
        .bind::<BigInt, _>(limit)
        .load(conn)?)
}

/// One dead letter with its payload.
///
/// # Errors
/// [`Error::NoSuchDeadLetter`] when there is no such dead letter; [`Error::Database`].
pub fn show(conn: &mut PgConnection, tables: &outbox::TableRef, id: i64) -> Result<Detail> {
    diesel::sql_query(format!(
        "SELECT {SUMMARY}, payload, headers, content_type, traceparent, created_at FROM {} WHERE id = $1",
        tables.qualify(Table::DeadLetters)
    ))
    .bind::<BigInt, _>(id)
    .load::<Detail>(conn)?
    .pop()
    .ok_or(Error::NoSuchDeadLetter(id))
}

/// Moves matching dead letters back into the outbox under their original ids, keeping their
/// event ids (one transaction). Returns the ids moved. With `dry_run`, changes nothing and
/// returns the ids that would move.
///
/// `created_at` (the Kafka timestamp and `ce_time`) becomes the retry's time, as for a
/// replay: a broker with `log.message.timestamp.before.max.ms` would refuse an old timestamp
/// (INVALID_TIMESTAMP) and the event would be dead-lettered again.
///
/// The original id is the event's place in its key's order: the retried events go out before
/// any later event of their key still in the outbox (committed while the key was held), as
/// they were first committed. New ids would put them behind those (and a later hold would
/// dead-letter events below them, so the next retry would reorder them again).
///
/// # Errors
/// [`Error::Database`] (for instance when an event id is pending in the outbox again).
pub fn retry(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    filter: &Filter,
    dry_run: bool,
) -> Result<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    if dry_run {
        return Ok(list(conn, tables, filter, i64::MAX)?
            .into_iter()
            .map(|s| s.id)
            .collect());
    }
    // Rows keep their ids (their order among the key's events). A tableless event (negative
    // id: it never had a row) becomes a row with a new id, after the rows, in WAL order: a
    // negative id in `outbox` would never be removed after delivery.
    let o = tables.qualify(Table::Outbox);
    let q = diesel::sql_query(format!(
        "WITH moved AS (DELETE FROM {d} WHERE {w} RETURNING *) \
         INSERT INTO {o} (id, {c}, created_at) OVERRIDING SYSTEM VALUE \
         SELECT CASE WHEN m.id < 0 THEN nextval(pg_get_serial_sequence('{o}', 'id')) \
                ELSE m.id END, {c}, now() \
         FROM (SELECT * FROM moved ORDER BY (id < 0), CASE WHEN id < 0 THEN -id ELSE id END) m \
         RETURNING id",
        c = EventColumns::content(),
        d = tables.qualify(Table::DeadLetters),
        w = Filter::WHERE
    ));
    let ids: Vec<Id> = conn.transaction(|c| bind_filter!(q, filter).load(c))?;
    Ok(ids.into_iter().map(|i| i.id).collect())
}

/// Deletes matching dead letters. Returns how many (or would, with `dry_run`).
///
/// # Errors
/// [`Error::Database`].
pub fn purge(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    filter: &Filter,
    dry_run: bool,
) -> Result<usize> {
    if dry_run {
        return Ok(list(conn, tables, filter, i64::MAX)?.len());
    }
    let q = diesel::sql_query(format!(
        "DELETE FROM {} WHERE {}",
        tables.qualify(Table::DeadLetters),
        Filter::WHERE
    ));
    Ok(bind_filter!(q, filter).execute(conn)?)
}

/// Parses `90s`, `15m`, `6h`, `7d` (or plain seconds).
///
/// # Errors
/// [`Error::InvalidValue`] naming the value.
pub fn parse_age(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| Error::InvalidValue {
        what: "age",
        value: s.to_owned(),
        expected: "expected e.g. 90s, 15m, 6h, 7d".into(),
    })?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(Error::InvalidValue {
                what: "age",
                value: s.to_owned(),
                expected: "unit must be s, m, h or d".into(),
            })
        }
    };
    Ok(Duration::from_secs(secs))
}
