//! [`ConsumerConfig`]: the runner's settings and the librdkafka options it refuses.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Error, Inbox};

/// Where the deduplication id of a message comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageId {
    /// A header (default: `ce_id`, set by `outbox-relay`). A message without it is
    /// dead-lettered.
    Header(String),
    /// `topic/partition/offset`: dedups redeliveries of the same record, not producer duplicates.
    TopicPartitionOffset,
}

/// Configuration of a [`ConsumerRunner`](super::ConsumerRunner). Build with
/// [`ConsumerConfig::new`] and the setters.
#[derive(Clone)]
pub struct ConsumerConfig {
    pub(super) brokers: String,
    pub(super) group_id: String,
    pub(super) topics: Vec<String>,
    pub(super) database_url: String,
    pub(super) inbox: Option<Inbox>,
    pub(super) dead_letter_topic: Option<String>,
    pub(super) message_id: MessageId,
    pub(super) max_attempts: u32,
    pub(super) retry_initial: Duration,
    pub(super) retry_max: Duration,
    pub(super) queue_per_partition: usize,
    pub(super) retention: Option<(Duration, Duration)>,
    pub(super) kafka: BTreeMap<String, String>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("database_url", &crate::redact::REDACTED)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("message_id", &self.message_id)
            .field("max_attempts", &self.max_attempts)
            .field("kafka_keys", &self.kafka.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ConsumerConfig {
    /// A runner for `group_id` reading `topics`. Defaults: inbox consumer name = `group_id`,
    /// dead-letter topic `<group_id>.dlq`, message id from `ce_id`, 5 attempts, retry backoff
    /// 100 ms to 5 s, `auto.offset.reset=earliest` (a new group must not skip events).
    #[must_use]
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: &[&str],
        database_url: impl Into<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            database_url: database_url.into(),
            inbox: None,
            dead_letter_topic: None,
            message_id: MessageId::Header("ce_id".into()),
            max_attempts: 5,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            queue_per_partition: 1024,
            retention: None,
            kafka: BTreeMap::new(),
        }
    }

    /// The inbox (consumer name and schema). Defaults to `Inbox::new(group_id)`.
    #[must_use]
    pub fn inbox(mut self, inbox: Inbox) -> Self {
        self.inbox = Some(inbox);
        self
    }

    /// Dead-letter topic. Defaults to `<group_id>.dlq`.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Where message ids come from. Defaults to the `ce_id` header.
    #[must_use]
    pub fn message_id(mut self, source: MessageId) -> Self {
        self.message_id = source;
        self
    }

    /// Handler attempts before dead-lettering. Defaults to 5.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Retry backoff bounds. Defaults to 100 ms and 5 s.
    #[must_use]
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max;
        self
    }

    /// Messages of one partition queued for its worker. When a partition's queue is full (its
    /// handler is slow, retrying or waiting on a lock), its further messages are buffered, up
    /// to ten queues' worth, and the other partitions keep flowing; past that the dispatch
    /// waits for that worker (bounded memory), holding every partition up. Defaults to 1,024
    /// (one full batch, see the module docs).
    #[must_use]
    pub fn queue_per_partition(mut self, n: usize) -> Self {
        self.queue_per_partition = n;
        self
    }

    /// Purge this consumer's inbox rows older than `keep` every `every` (batches of 10,000).
    /// Defaults to off: call [`Inbox::purge`] yourself, or set this. Keep rows longer than any
    /// message can be redelivered (docs/TABLES.md#inbox-retention).
    #[must_use]
    pub fn retention(mut self, keep: Duration, every: Duration) -> Self {
        self.retention = Some((keep, every));
        self
    }

    /// A raw librdkafka consumer property (checked by [`ConsumerConfig::validate`]).
    #[must_use]
    pub fn kafka_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(key.into(), value.into());
        self
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting and why.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.brokers.trim().is_empty() {
            return bad("consumer brokers are empty".into());
        }
        if self.group_id.trim().is_empty() {
            return bad("consumer group_id is empty".into());
        }
        if self.topics.is_empty() {
            return bad("consumer has no topics".into());
        }
        for t in &self.topics {
            crate::validate_topic(t)?;
        }
        if let Some(t) = &self.dead_letter_topic {
            crate::validate_topic(t)?;
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be positive".into());
        }
        if self.queue_per_partition == 0 {
            return bad("queue_per_partition must be positive".into());
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return bad("retry backoff must be positive with max >= initial".into());
        }
        if let Some((keep, every)) = self.retention {
            if keep.is_zero() || every.is_zero() {
                return bad("retention: keep and every must be positive".into());
            }
        }
        crate::kafka_settings::check_consumer_options(
            self.kafka.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(|r| Error::InvalidConfig(r.to_string()))?;
        Ok(())
    }

    /// The dead-letter topic: the one set, or `<group_id>.dlq`.
    pub(super) fn dlq(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.group_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_secret() {
        for url in [
            "postgres://app:s3cr3t@db/app",
            "host=db user=app password=s3cr3t dbname=app",
            "host=db password='s3cr3t x'",
        ] {
            let c = ConsumerConfig::new("b:1", "g", &["t"], url)
                .kafka_option("sasl.password", "hunter2")
                .kafka_option("ssl.key.password", "hunter3");
            let dbg = format!("{c:?}");
            assert!(
                !dbg.contains("s3cr3t") && !dbg.contains("hunter2") && !dbg.contains("hunter3"),
                "{dbg}"
            );
        }
    }

    #[test]
    fn unsafe_kafka_options_are_refused_with_the_reason() {
        let base = || ConsumerConfig::new("b:1", "g", &["t"], "postgres://x");
        for (k, v, why) in [
            (
                "enable.auto.offset.store",
                "true",
                "after the database commit",
            ),
            (
                "isolation.level",
                "read_uncommitted",
                "aborted transactions",
            ),
            ("group.id", "other", "typed configuration"),
            ("bootstrap.servers", "x:1", "typed configuration"),
            (
                "enable.ssl.certificate.verification",
                "false",
                "must stay on",
            ),
        ] {
            let err = base().kafka_option(k, v).validate().unwrap_err();
            assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
            let err = err.to_string();
            assert!(
                err.contains(&format!("kafka option {k} is refused: ")) && err.contains(why),
                "{k}={v}: {err}"
            );
        }
        for (k, v) in [
            ("enable.auto.offset.store", "false"),
            ("isolation.level", " Read_Committed "),
            ("fetch.min.bytes", "1"),
        ] {
            base().kafka_option(k, v).validate().unwrap();
        }
    }
}
