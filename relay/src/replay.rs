//! `outbox-relay replay`: re-publish delivered events kept in `outbox_delivered`
//! (`keep_delivered_hours > 0`) by putting copies back into the outbox, where the running relay
//! sends them again like any new event.
//!
//! The copies get new outbox ids, in the order the originals were delivered, and keep their
//! **event ids**: a consumer whose inbox still holds an event's id skips it as a duplicate. A
//! consumer that lost its data (restored a backup) must also drop the inbox rows of the replayed
//! range, or the replay changes nothing for it. An event that is still pending in the outbox is
//! not copied again, and an event kept twice (delivered, replayed, delivered again) is copied once.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use outbox::contract::{EventColumns, Table};

use crate::error::Result;

/// Which kept events to replay. All set conditions must hold; ranges are inclusive of their
/// start and, for ids, of their end (`until` is exclusive).
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// Delivered at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Delivered before this time.
    pub until: Option<DateTime<Utc>>,
    /// Original outbox id at least this.
    pub from_id: Option<i64>,
    /// Original outbox id at most this.
    pub to_id: Option<i64>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this partition key.
    pub key: Option<String>,
}

impl Range {
    /// Whether no time or id bound is set (topic and key alone still select everything kept
    /// for them).
    #[must_use]
    pub fn is_unbounded(&self) -> bool {
        self.since.is_none()
            && self.until.is_none()
            && self.from_id.is_none()
            && self.to_id.is_none()
    }

    /// The WHERE clause over parameters $1..$6.
    const WHERE: &'static str = "($1::timestamptz IS NULL OR delivered_at >= $1) \
         AND ($2::timestamptz IS NULL OR delivered_at < $2) \
         AND ($3::bigint IS NULL OR id >= $3) \
         AND ($4::bigint IS NULL OR id <= $4) \
         AND ($5::text IS NULL OR topic = $5) \
         AND ($6::text IS NULL OR partition_key = $6)";
}

macro_rules! bind_range {
    ($q:expr, $r:expr) => {
        $q.bind::<Nullable<Timestamptz>, _>($r.since)
            .bind::<Nullable<Timestamptz>, _>($r.until)
            .bind::<Nullable<BigInt>, _>($r.from_id)
            .bind::<Nullable<BigInt>, _>($r.to_id)
            .bind::<Nullable<Text>, _>($r.topic.as_deref())
            .bind::<Nullable<Text>, _>($r.key.as_deref())
    };
}

/// What `outbox_delivered` holds.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Kept {
    /// Rows kept.
    #[diesel(sql_type = BigInt)]
    pub events: i64,
    /// Lowest and highest original id.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub min_id: Option<i64>,
    /// Highest original id.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub max_id: Option<i64>,
    /// Oldest delivery kept.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub oldest: Option<DateTime<Utc>>,
    /// Newest delivery kept.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub newest: Option<DateTime<Utc>>,
}

/// Events per topic.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct TopicCount {
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Events (distinct event ids).
    #[diesel(sql_type = BigInt)]
    pub events: i64,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Kept events (distinct event ids) in the range.
    pub matched: u64,
    /// Copies put into the outbox (the rest were still pending there).
    pub queued: u64,
}

/// The size and span of `outbox_delivered`.
///
/// # Errors
/// [`crate::Error::Database`] (for instance when the migrations are not applied).
pub fn kept(conn: &mut PgConnection, tables: &outbox::TableRef) -> Result<Kept> {
    Ok(diesel::sql_query(format!(
        "SELECT count(*) AS events, min(id) AS min_id, max(id) AS max_id, \
         min(delivered_at) AS oldest, max(delivered_at) AS newest FROM {}",
        tables.qualify(Table::Delivered)
    ))
    .get_result(conn)?)
}

/// Events in `range` per topic (what a replay would re-publish, before skipping pending ones).
///
/// # Errors
/// [`crate::Error::Database`].
pub fn count_by_topic(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    range: &Range,
) -> Result<Vec<TopicCount>> {
    let q = diesel::sql_query(format!(
        "SELECT topic, count(DISTINCT event_id) AS events FROM {} WHERE {} \
         GROUP BY topic ORDER BY topic",
        tables.qualify(Table::Delivered),
        Range::WHERE
    ));
    Ok(bind_range!(q, range).load(conn)?)
}

/// Copies the kept events in `range` back into the outbox in one transaction, in their original
/// delivery order (`delivered_at`, then id), with new ids and their original event ids. Events
/// whose id is pending in the outbox are skipped.
///
/// # Errors
/// [`crate::Error::Database`]; nothing is queued then.
pub fn replay(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    range: &Range,
) -> Result<Replayed> {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let matched_sql = diesel::sql_query(format!(
        "SELECT count(DISTINCT event_id) AS n FROM {} WHERE {}",
        tables.qualify(Table::Delivered),
        Range::WHERE
    ));
    // `created_at` is not copied: the copy's Kafka timestamp is the replay time, so topic
    // retention by timestamp does not drop it at once and commit-to-ack latency stays truthful.
    let insert = diesel::sql_query(format!(
        "INSERT INTO {o} ({c}) SELECT {c} FROM {k} WHERE {w} ORDER BY delivered_at, id \
         ON CONFLICT (event_id) DO NOTHING",
        c = EventColumns::content(),
        o = tables.qualify(Table::Outbox),
        k = tables.qualify(Table::Delivered),
        w = Range::WHERE
    ));
    conn.transaction(|c| {
        let matched = bind_range!(matched_sql, range).get_result::<N>(c)?.n;
        let queued = bind_range!(insert, range).execute(c)?;
        Ok(Replayed {
            matched: u64::try_from(matched).unwrap_or(0),
            queued: queued as u64,
        })
    })
}
