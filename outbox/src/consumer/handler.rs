//! What a handler receives and returns: [`IncomingMessage`], [`Handler`], [`HandlerError`].

use diesel::PgConnection;
use serde::de::DeserializeOwned;

use super::TARGET;
use crate::{Error, Traceparent};

/// A message handed to a [`Handler`].
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    /// The message id used for deduplication.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Payload bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl IncomingMessage {
    /// A header as UTF-8 text.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// `ce_type`.
    #[must_use]
    pub fn event_type(&self) -> Option<&str> {
        self.header("ce_type")
    }

    /// The key as UTF-8 text.
    #[must_use]
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The writer's trace context.
    #[must_use]
    pub fn traceparent(&self) -> Option<Traceparent> {
        self.header("traceparent")?.parse().ok()
    }

    /// The payload as JSON.
    ///
    /// # Errors
    /// [`HandlerError::Permanent`]: a payload that does not parse never will.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.payload.as_deref().unwrap_or_default())
            .map_err(|e| HandlerError::Permanent(format!("payload is not the expected JSON: {e}")))
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// May succeed if tried again (a lock timeout, a serialization failure, a lost connection).
    #[error("transient: {0}")]
    Transient(String),
    /// Will fail every time (bad payload, violated business rule): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<diesel::result::Error> for HandlerError {
    fn from(e: diesel::result::Error) -> Self {
        if crate::is_retriable_db(&e) {
            HandlerError::Transient(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        if e.is_retriable() {
            HandlerError::Transient(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

/// Applies one message inside the inbox transaction. Use `conn` for every change (and for
/// [`crate::Outbox::enqueue`] to publish replies in the same transaction).
///
/// A closure `Fn(&mut PgConnection, &IncomingMessage) -> Result<(), HandlerError>` is a handler.
/// For a backlog, implement [`Handler::handle_batch`] as well (or wrap a batch function with
/// [`batch_handler`]) so the business write of a whole batch is one statement.
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`.
    ///
    /// # Errors
    /// See [`HandlerError`].
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError>;

    /// Handles several NEW messages of one partition, in offset order, inside one transaction
    /// that also records their inbox rows (duplicates are already filtered out). The default
    /// calls [`Handler::handle`] for each, each in its `consume` span.
    ///
    /// An error rolls the whole batch back (inbox rows included); the runner then applies the
    /// messages one at a time through [`Handler::handle`], with the usual retries and dead
    /// letters, so one bad message cannot hold the others back. An override must therefore have
    /// the same effect as calling `handle` on each message in turn.
    ///
    /// # Errors
    /// See [`HandlerError`].
    fn handle_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[&IncomingMessage],
    ) -> Result<(), HandlerError> {
        for m in messages {
            let span = consume_span(m);
            let _entered = span.enter();
            self.handle(conn, m)?;
        }
        Ok(())
    }
}

/// A [`Handler`] from a batch function: `f` receives every new message of a batch at once (one
/// message when the runner applies messages one at a time, after a batch failed).
///
/// ```no_run
/// use diesel::PgConnection;
/// use outbox::consumer::{batch_handler, HandlerError, IncomingMessage};
///
/// let handler = batch_handler(|conn: &mut PgConnection, messages: &[&IncomingMessage]| {
///     let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
///     // one INSERT ... SELECT unnest($1::text[]) for the whole batch
///     # let _ = (conn, ids);
///     Ok::<_, HandlerError>(())
/// });
/// ```
pub fn batch_handler<F>(f: F) -> BatchHandler<F>
where
    F: Fn(&mut PgConnection, &[&IncomingMessage]) -> Result<(), HandlerError>
        + Send
        + Sync
        + 'static,
{
    BatchHandler(f)
}

/// See [`batch_handler`].
#[derive(Debug, Clone)]
pub struct BatchHandler<F>(F);

impl<F> Handler for BatchHandler<F>
where
    F: Fn(&mut PgConnection, &[&IncomingMessage]) -> Result<(), HandlerError>
        + Send
        + Sync
        + 'static,
{
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        (self.0)(conn, &[message])
    }

    fn handle_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[&IncomingMessage],
    ) -> Result<(), HandlerError> {
        let span = tracing::info_span!(
            target: TARGET,
            "consume_batch",
            topic = messages.first().map(|m| m.topic.as_str()).unwrap_or_default(),
            partition = messages.first().map_or(-1, |m| m.partition),
            first_offset = messages.first().map_or(-1, |m| m.offset),
            last_offset = messages.last().map_or(-1, |m| m.offset),
            messages = messages.len(),
        );
        let _entered = span.enter();
        (self.0)(conn, messages)
    }
}

impl<F> Handler for F
where
    F: Fn(&mut PgConnection, &IncomingMessage) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        self(conn, message)
    }
}

/// The span a message is handled in.
pub(super) fn consume_span(message: &IncomingMessage) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "consume",
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        message_id = %message.message_id,
        traceparent = message.header("traceparent").unwrap_or_default(),
    )
}
