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
    /// The database role is a superuser and `allow_superuser` is not set.
    #[error(
        "the database role is a superuser: run the relay as a least-privilege role \
         (docs/RELAY.md) or set allow_superuser / --allow-superuser"
    )]
    Superuser,
    /// The database role lacks privileges the relay needs (each as `PRIVILEGE on table`).
    #[error(
        "the database role \"{role}\" lacks {}: grant them (docs/ops/relay-role.sql creates a \
         role with exactly what the relay needs)",
        missing.join(", ")
    )]
    MissingGrants {
        /// The connected role.
        role: String,
        /// `PRIVILEGE on table`, one per missing grant.
        missing: Vec<String>,
    },
    /// No dead letter has this id (`dead-letters show`).
    #[error("no dead letter with id {0}")]
    NoSuchDeadLetter(i64),
    /// A command-line or configuration value could not be parsed; the message says which and
    /// what was expected.
    #[error("invalid {what} {value:?}: {expected}")]
    InvalidValue {
        /// What kind of value (`age`, ...).
        what: &'static str,
        /// The value as given.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The Prometheus recorder could not be installed (another one is, or a bucket is invalid).
    #[error("metrics recorder: {0}")]
    Metrics(String),
    /// A blocking database task panicked or was cancelled.
    #[error("database task failed: {0}")]
    TaskFailed(#[source] tokio::task::JoinError),
    /// The replication slot of streaming capture is missing, invalidated or unusable; the
    /// message says which and how to recover (docs/OPERATIONS.md#replication-slots). Never
    /// retried: a new slot would start at the current WAL position and skip every event
    /// committed since the old one stopped.
    #[error("replication slot {slot:?}: {problem}")]
    Slot {
        /// The slot's name.
        slot: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The replication stream failed (connection lost, walsender ended, protocol error): the
    /// term ends and a new one resumes from the slot's confirmed position.
    #[error("replication stream: {0}")]
    Stream(String),
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
            | Error::SteppedDown(_)
            | Error::Stream(_) => true,
            Error::Kafka(e) => !e.is_fatal_config(),
            Error::Outbox(e) => e.is_retriable(),
            // A panicked task is a bug, not weather: stop rather than loop on it.
            Error::Config(_)
            | Error::Io(_)
            | Error::Superuser
            | Error::MissingGrants { .. }
            | Error::NoSuchDeadLetter(_)
            | Error::InvalidValue { .. }
            | Error::Metrics(_)
            | Error::Slot { .. }
            | Error::TaskFailed(_) => false,
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

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::*;

    /// What the relay backs off and retries (database or broker weather) and what stops it (a
    /// configuration, a role or an input an operator must fix).
    #[test]
    fn retriable_classification_by_purpose() {
        let retriable = [
            Error::Database(diesel::result::Error::NotFound),
            Error::Connect {
                url: "postgres://h/d".into(),
                message: "refused".into(),
            },
            Error::LostLeadership("outbox".into()),
            Error::SteppedDown(std::time::Duration::from_secs(60)),
            Error::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::BrokerTransportFailure,
            )),
        ];
        for e in &retriable {
            assert!(e.is_retriable(), "{e}");
        }
        let fatal = [
            Error::Config("page_size must be positive, got 0".into()),
            Error::Superuser,
            Error::MissingGrants {
                role: "relay".into(),
                missing: vec!["DELETE on outbox".into()],
            },
            Error::NoSuchDeadLetter(42),
            Error::InvalidValue {
                what: "age",
                value: "1x".into(),
                expected: "unit must be s, m, h or d".into(),
            },
            Error::Metrics("a recorder is installed".into()),
            Error::Kafka(KafkaError::ClientCreation("bad config".into())),
            Error::Outbox(outbox::Error::SchemaMismatch("pending migrations".into())),
        ];
        for e in &fatal {
            assert!(!e.is_retriable(), "{e}");
        }
        // The messages name the problem (no catch-all prefix).
        assert_eq!(
            Error::NoSuchDeadLetter(42).to_string(),
            "no dead letter with id 42"
        );
        assert!(Error::MissingGrants {
            role: "relay".into(),
            missing: vec!["DELETE on outbox".into(), "SELECT on outbox".into()],
        }
        .to_string()
        .contains("\"relay\" lacks DELETE on outbox, SELECT on outbox"));
    }
}
