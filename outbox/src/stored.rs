//! Reading the outbox table back: the row type shared with the relay.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::{BigInt, Bytea, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use uuid::Uuid;

/// The Postgres `xid8` type (a 64-bit, epoch-extended transaction id).
#[derive(
    Debug, Clone, Copy, Default, diesel::sql_types::SqlType, diesel::query_builder::QueryId,
)]
#[diesel(postgres_type(name = "xid8"))]
pub struct Xid8;

impl FromSql<Xid8, Pg> for u64 {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let bytes: [u8; 8] = value
            .as_bytes()
            .try_into()
            .map_err(|_| "xid8 value is not 8 bytes")?;
        Ok(u64::from_be_bytes(bytes))
    }
}

/// One row of the outbox table, as the relay reads it: select
/// [`EventColumns::all`](crate::contract::EventColumns::all).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
#[non_exhaustive]
pub struct StoredEvent {
    /// Insertion-ordered id (order within a capture batch).
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// The event id (`ce_id`), unique among pending events.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub event_id: Uuid,
    /// Kafka topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Kafka message key.
    #[diesel(sql_type = Text)]
    pub partition_key: String,
    /// `ce_type`.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Kafka message value.
    #[diesel(sql_type = Bytea)]
    pub payload: Vec<u8>,
    /// User headers.
    #[diesel(sql_type = Jsonb, deserialize_as = HeaderMap)]
    pub headers: BTreeMap<String, String>,
    /// The payload's media type.
    #[diesel(sql_type = Text)]
    pub content_type: String,
    /// The writer's W3C trace context.
    #[diesel(sql_type = Nullable<Text>)]
    pub traceparent: Option<String>,
    /// The writing transaction (`pg_current_xact_id()`).
    #[diesel(sql_type = Xid8)]
    pub tx_id: u64,
    /// When the row was written (the writing transaction's start time).
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

impl StoredEvent {
    /// An event as a capture source other than the table builds it (the relay's streaming
    /// capture): no headers, `application/json`, no trace context, transaction 0, created now;
    /// set the other public fields after.
    #[must_use]
    pub fn new(
        id: i64,
        event_id: Uuid,
        topic: String,
        partition_key: String,
        event_type: String,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            id,
            event_id,
            topic,
            partition_key,
            event_type,
            payload,
            headers: BTreeMap::new(),
            content_type: "application/json".into(),
            traceparent: None,
            tx_id: 0,
            created_at: Utc::now(),
        }
    }
}

/// `jsonb` object of string values, as stored in `headers`.
#[derive(Debug)]
pub struct HeaderMap(BTreeMap<String, String>);

impl From<HeaderMap> for BTreeMap<String, String> {
    fn from(h: HeaderMap) -> Self {
        h.0
    }
}

impl FromSql<Jsonb, Pg> for HeaderMap {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let json = <serde_json::Value as FromSql<Jsonb, Pg>>::from_sql(value)?;
        Ok(HeaderMap(serde_json::from_value(json)?))
    }
}

impl diesel::Queryable<Jsonb, Pg> for HeaderMap {
    type Row = Self;
    fn build(row: Self) -> deserialize::Result<Self> {
        Ok(row)
    }
}
