//! Transactional outbox for diesel and Postgres.
//!
//! Write a business change and the events that describe it in ONE local transaction; the
//! `outbox-relay` worker moves committed events to Kafka, in commit order per key, never skipping
//! one and never publishing a rolled-back one. Consumers deduplicate with the `inbox` table.
//!
//! ```no_run
//! use diesel::prelude::*;
//! # fn demo(conn: &mut PgConnection) -> Result<(), outbox::Error> {
//! let outbox = outbox::Outbox::new(); // or .schema("svc")?, .max_payload_bytes(..)?
//! outbox.migrate(conn)?; // once, at start-up
//! conn.transaction(|conn| {
//!     diesel::sql_query("INSERT INTO orders (id) VALUES (42)").execute(conn)?;
//!     let event = outbox::Event::builder("orders", "order-42", "OrderCreated")
//!         .json(&serde_json::json!({"order_id": 42}))
//!         .header("x-tenant", "acme")
//!         .build()?;
//!     outbox.enqueue(conn, &event)?;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! The tables are a stable SQL contract (`docs/TABLES.md`): services in other languages enqueue
//! with a plain `INSERT INTO outbox (topic, partition_key, event_type, payload) VALUES (..)`.

#[cfg(feature = "runtime")]
pub mod blocking;
#[cfg(feature = "kafka")]
pub mod consumer;
pub mod contract;
mod error;
mod event;
mod ident;
mod inbox;
pub mod kafka_settings;
mod migrate;
pub mod redact;
#[cfg(feature = "runtime")]
pub mod shutdown;
mod store;
mod stored;
pub mod trace;

#[cfg(feature = "kafka")]
pub(crate) use error::is_retriable_db;
pub use error::{Error, Result};
pub use event::{
    validate_topic, Event, EventBuilder, JSON_CONTENT_TYPE, MAX_NAME_LEN, MAX_TOPIC_LEN,
    RESERVED_HEADERS,
};
pub use ident::TableRef;
pub use inbox::{Inbox, MessageRef, Processed, MAX_INBOX_ID_LEN};
pub use store::{Enqueued, Outbox, DEFAULT_MAX_PAYLOAD_BYTES};
pub use stored::StoredEvent;
pub use trace::{current_traceparent, TraceContextLayer, Traceparent};
