//! The relay's error type.

/// Result with the relay's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop the relay or one of its commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid or unsafe; the message says which setting and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A database operation failed.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// Connecting to the database failed (the URL's password is never included).
    #[error("cannot connect to the database at {url}: {message}")]
    Connect {
        /// The database URL with any password replaced by `***`.
        url: String,
        /// What the driver said (with any password scrubbed).
        message: String,
    },
    /// A Kafka client error.
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Another relay holds the lease now; this one must stop delivering and stand by.
    #[error("lost leadership of {0}: another relay took over (or the lease expired)")]
    LostLeadership(String),
    /// The leader gave up its lease: nothing was acknowledged for this long while events were
    /// overdue (it cannot reach the brokers; a standby that can may take over).
    #[error("no acknowledgement for {0:?} while events are overdue: leadership given up")]
    SteppedDown(std::time::Duration),
    /// An error from the outbox library (schema checks, identifiers).
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
    /// I/O (metrics listener, config file).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the relay should back off and try again (database or broker trouble) rather than
    /// exit (bad configuration, schema mismatch).
    #[must_use]
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Database(_)
            | Error::Connect { .. }
            | Error::LostLeadership(_)
            | Error::SteppedDown(_) => true,
            Error::Kafka(e) => !e.is_fatal_config(),
            Error::Outbox(e) => e.is_retriable(),
            Error::Config(_) | Error::Io(_) => false,
        }
    }
}

trait KafkaErrorExt {
    fn is_fatal_config(&self) -> bool;
}

impl KafkaErrorExt for rdkafka::error::KafkaError {
    fn is_fatal_config(&self) -> bool {
        matches!(
            self,
            rdkafka::error::KafkaError::ClientConfig(..)
                | rdkafka::error::KafkaError::ClientCreation(_)
        )
    }
}

/// Replaces the password in a connection string with `***`: URLs
/// (`scheme://user:password@host`, `?password=`) and libpq keyword/value strings
/// (`host=db password='s e c r e t'`). The same as [`outbox::redact::database_url`].
pub use outbox::redact::database_url as scrub_url;

/// Removes the connection string's secrets from `text` (driver messages may echo them):
/// [`outbox::redact::text_with_url`].
pub(crate) use outbox::redact::text_with_url as scrub_text;
