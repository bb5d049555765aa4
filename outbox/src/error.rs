//! The crate's one error type.

use diesel::result::DatabaseErrorKind;

/// Result with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when building, enqueueing or reading events.
///
/// Validation errors name the offending input and never write anything. Use
/// [`Error::is_retriable`] to decide whether running the whole transaction again may succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic breaks Kafka's naming rules.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic as given.
        topic: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The partition key is empty or cannot be stored. Every event needs a key so that its
    /// partition, and so its order relative to other events of the same key, is deterministic.
    #[error("invalid partition key: {reason}")]
    InvalidKey {
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The builder was given no payload.
    #[error("missing payload: call .json(..) or .bytes(..) on the event builder")]
    MissingPayload,
    /// The event type is empty or too long.
    #[error("invalid event type {event_type:?}: {reason}")]
    InvalidEventType {
        /// The event type as given.
        event_type: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The content type is empty or not a plausible media type.
    #[error("invalid content type {content_type:?}: {reason}")]
    InvalidContentType {
        /// The content type as given.
        content_type: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The payload is larger than the configured limit.
    #[error("payload too large: {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The payload was declared as JSON but is not valid JSON, or could not be serialized.
    #[error("invalid JSON payload: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// A header name or value is not allowed.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A W3C `traceparent` value is malformed.
    #[error("invalid traceparent {value:?}: expected 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, ids not all zero")]
    InvalidTraceparent {
        /// The value as given.
        value: String,
    },
    /// A schema or table identifier is not a plain lowercase SQL identifier.
    #[error("invalid identifier {ident:?}: {reason}")]
    InvalidIdentifier {
        /// The identifier as given.
        ident: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An event id is already used by a pending event (or twice in one batch).
    #[error("duplicate event id {0}: an event with this id is already in the outbox")]
    DuplicateEventId(uuid::Uuid),
    /// `enqueue` was called outside a transaction. The event would commit on its own, apart from
    /// the business change it describes, which is exactly what an outbox exists to prevent.
    #[error("not in a transaction: enqueue must run inside conn.transaction(..) together with the business change")]
    NotInTransaction,
    /// The database schema does not match this library's migrations.
    #[error("schema mismatch: {0}")]
    SchemaMismatch(String),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The database returned an error.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// The consumer runner's Kafka client could not be made or set up (`what` says which step:
    /// the consumer, the subscription, the dead-letter producer); the client's error is the
    /// source.
    #[cfg(feature = "kafka")]
    #[error("kafka {what}: {source}")]
    Kafka {
        /// Which step failed.
        what: String,
        /// What the client said.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

impl Error {
    /// Whether running the same transaction again may succeed.
    ///
    /// Retriable: serialization failures (SQLSTATE 40001), deadlocks, lock and statement
    /// timeouts and cancels, a read-only server (a switchover), a server shutting down or
    /// recovering, disk full, out of memory, too many connections, closed connections and a
    /// broken transaction manager. Everything else (validation,
    /// constraint violations, duplicates, schema mismatches) fails the same way every time.
    /// diesel 2.3 has no kind for deadlocks and lock timeouts, so those are recognised by the
    /// server's (English) message.
    #[must_use]
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Database(e) => is_retriable_db(e),
            _ => false,
        }
    }
}

/// Whether a diesel error may go away when the transaction is run again.
#[must_use]
pub(crate) fn is_retriable_db(error: &diesel::result::Error) -> bool {
    use diesel::result::Error as D;
    match error {
        // 40001, a closed connection, a command that could not be sent, and 25006 (a
        // read-only transaction: the server is a standby during a switchover).
        D::DatabaseError(
            DatabaseErrorKind::SerializationFailure
            | DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::ReadOnlyTransaction,
            _,
        ) => true,
        // diesel has no kind for these SQLSTATEs: 40P01 deadlock_detected, 55P03
        // lock_not_available, 57014 query_canceled (lock or statement timeout, a cancel),
        // 57P01-57P03 (the server shutting down, restarting or in recovery), 53100 disk_full,
        // 53200 out_of_memory, 53300 too_many_connections. Recognised by the server's message
        // (English, the default lc_messages).
        D::DatabaseError(_, info) => {
            let m = info.message();
            [
                "deadlock detected",
                "lock timeout",
                "could not obtain lock",
                "canceling statement due to",
                "terminating connection due to administrator command",
                "the database system is",
                "could not extend file",
                "No space left on device",
                "out of memory",
                "too many clients",
                "remaining connection slots are reserved",
            ]
            .iter()
            .any(|s| m.contains(s))
        }
        D::BrokenTransactionManager => true,
        _ => false,
    }
}
