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
            Error::Database(_) | Error::Connect { .. } | Error::LostLeadership(_) => true,
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

/// Replaces the password of a URL (`scheme://user:password@host`) with `***`.
#[must_use]
pub fn scrub_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return scrub_query(url);
    };
    let creds = &authority[..at];
    let scrubbed = match creds.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => creds.to_owned(),
    };
    scrub_query(&format!(
        "{}{}{}",
        &url[..scheme_end + 3],
        scrubbed,
        &rest[at..]
    ))
}

/// Replaces `password=...` in a URL query or a key/value connection string.
fn scrub_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password=") {
        out.push_str(&rest[..i + "password=".len()]);
        out.push_str("***");
        rest = &rest[i + "password=".len()..];
        let end = rest.find(['&', ' ']).unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
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
    let rest = &url[url.find("://")? + 3..];
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
        ] {
            assert_eq!(scrub_url(url), expected);
        }
        let url = "postgres://relay:s3cr3t@db/app";
        let msg = format!("could not connect to {url}: password s3cr3t rejected");
        let scrubbed = scrub_text(&msg, url);
        assert!(!scrubbed.contains("s3cr3t"), "{scrubbed}");
    }
}
