//! `outbox-relay`: moves committed events from a Postgres outbox table to Kafka.
//!
//! - **Commit-safe capture.** Rows are taken in PgQ-style batches: the rows whose writing
//!   transaction (`tx_id`, xid8) is visible in the current snapshot and was not in the previous
//!   one. A transaction that took a lower id and commits late lands in a later batch instead of
//!   being skipped, and a long-open transaction delays only its own events.
//! - **Per-key order.** Batches leave in commit order, rows within a batch in id order, through
//!   one idempotent producer (`acks=all`, at most 5 in flight, `murmur2_random`).
//! - **At-least-once.** A row is removed only after Kafka acknowledged it; a crash re-sends at
//!   most what was in flight. Each message carries `ce_id` so consumers deduplicate.
//! - **One active relay per outbox.** A lease with a fencing epoch, checked on the database's
//!   clock by every fetch and removal; standbys take over when it expires. A paused leader that
//!   wakes up cannot remove anything.
//! - **Poison events** are dead-lettered after bounded attempts (at once for permanent errors)
//!   and never block other keys; [`PoisonPolicy`] decides about later events of the same key.
//!
//! ```no_run
//! # async fn demo() -> Result<(), outbox_relay::Error> {
//! let config = outbox_relay::RelayConfig::new("postgres://relay@db/app", "kafka:9092");
//! let relay = outbox_relay::Relay::new(config)?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! relay.run(shutdown).await
//! # }
//! ```

pub mod cdc;
pub mod cli;
mod config;
pub mod dead_letters;
mod engine;
mod error;
pub mod grants;
pub mod metrics;
// The producer and the SQL layer are internals, public only for the test suites.
#[doc(hidden)]
pub mod producer;
pub mod replay;
pub mod retention;
pub mod settings;
pub mod status;
#[doc(hidden)]
pub mod store;

pub use config::{CaptureMode, PoisonPolicy};
pub use engine::{AckListener, Acknowledged, Relay};
pub use error::{scrub_url, Error, Result};
pub use outbox::redact::is_secret_key;
pub use settings::RelayConfig;
