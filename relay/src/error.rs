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
    #[error("invalid value {value:?}: {expected}")]
    InvalidValue {
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
            // A panicked task is a bug, not weather: stop rather than loop on it.
            Error::Config(_)
            | Error::Io(_)
            | Error::Superuser
            | Error::MissingGrants { .. }
            | Error::NoSuchDeadLetter(_)
            | Error::InvalidValue { .. }
            | Error::Metrics(_)
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
/// (`host=db password='s e c r e t'`).
#[must_use]
pub fn scrub_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return scrub_password_params(url);
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return scrub_password_params(url);
    };
    let creds = &authority[..at];
    let scrubbed = match creds.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => creds.to_owned(),
    };
    scrub_password_params(&format!(
        "{}{}{}",
        &url[..scheme_end + 3],
        scrubbed,
        &rest[at..]
    ))
}

/// Replaces the value of every `password` parameter (`password=x`, `password = 'x y'`,
/// `&password=x`), case-insensitively.
fn scrub_password_params(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(found) = lower[pos..].find("password") {
        let key_end = pos + found + "password".len();
        let after = &s[key_end..];
        let ws = after.len() - after.trim_start().len();
        if !after[ws..].starts_with('=') {
            out.push_str(&s[pos..key_end]);
            pos = key_end;
            continue;
        }
        let value_start = key_end + ws + 1;
        let v = &s[value_start..];
        let lead = v.len() - v.trim_start().len();
        let v = &v[lead..];
        let value_len = if let Some(quoted) = v.strip_prefix('\'') {
            // libpq quoting: backslash escapes, a closing single quote ends the value
            let mut end = quoted.len();
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end
        } else {
            v.find(['&', ' ', '\t', '\n']).unwrap_or(v.len())
        };
        out.push_str(&s[pos..value_start + lead]);
        out.push_str("***");
        pos = value_start + lead + value_len;
    }
    out.push_str(&s[pos..]);
    out
}

/// Removes every occurrence of the URL's password from `text` (driver messages may echo it).
#[must_use]
pub fn scrub_text(text: &str, url: &str) -> String {
    let mut text = text.replace(url, &scrub_url(url));
    if let Some(pw) = password_of(url) {
        if !pw.is_empty() {
            text = text.replace(&pw, "***");
        }
    }
    text
}

fn password_of(url: &str) -> Option<String> {
    let Some(scheme_end) = url.find("://") else {
        // keyword/value: everything the scrubber would hide
        let scrubbed = scrub_password_params(url);
        return (scrubbed != url).then(|| {
            let lower = url.to_ascii_lowercase();
            let start = lower.find("password")?;
            let v = url[start + "password".len()..]
                .trim_start()
                .strip_prefix('=')?
                .trim_start();
            let v = v.strip_prefix('\'').map_or_else(
                || v.split([' ', '&']).next().unwrap_or_default(),
                |q| q.split('\'').next().unwrap_or_default(),
            );
            Some(v.to_owned())
        })?;
    };
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let creds = &authority[..authority.rfind('@')?];
    creds.split_once(':').map(|(_, p)| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_scrubbing() {
        for (url, expected) in [
            (
                "postgres://relay:s3cr3t@db:5432/app",
                "postgres://relay:***@db:5432/app",
            ),
            ("postgres://relay@db/app", "postgres://relay@db/app"),
            (
                "postgres://db/app?user=x&password=s3cr3t&sslmode=require",
                "postgres://db/app?user=x&password=***&sslmode=require",
            ),
            ("postgres://u:p%40ss@h/d", "postgres://u:***@h/d"),
            (
                "host=db user=relay password=s3cr3t dbname=app",
                "host=db user=relay password=*** dbname=app",
            ),
            (
                "host=db password = 's3 cr\\'3t' dbname=app",
                "host=db password = *** dbname=app",
            ),
            ("host=db PASSWORD=s3cr3t", "host=db PASSWORD=***"),
        ] {
            assert_eq!(scrub_url(url), expected);
        }
        let url = "postgres://relay:s3cr3t@db/app";
        let msg = format!("could not connect to {url}: password s3cr3t rejected");
        let scrubbed = scrub_text(&msg, url);
        assert!(!scrubbed.contains("s3cr3t"), "{scrubbed}");
        let dsn = "host=db user=relay password=s3cr3t";
        let scrubbed = scrub_text(&format!("connect {dsn}: password s3cr3t rejected"), dsn);
        assert!(!scrubbed.contains("s3cr3t"), "{scrubbed}");
    }
}
