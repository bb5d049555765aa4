//! Relay configuration: typed settings with documented defaults, raw librdkafka pass-through,
//! and refusal of settings that would break ordering, delivery or security.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use outbox::kafka_settings::{self, canonical_key};
use outbox::redact::{is_secret_key, REDACTED};

use crate::error::{scrub_url, Error, Result};
pub use crate::settings::RelayConfig;

/// What happens to later events of a key after one of its events is dead-lettered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoisonPolicy {
    /// Later events of the key keep flowing; the dead letter is out of line. Default: one bad
    /// event must not stop a key forever, and consumers see the gap as a missing event.
    #[default]
    Continue,
    /// Later events of the key are set aside as dead letters too (error "held"), in id order,
    /// until an operator retries or purges the key's dead letters. For keys where a consumer must
    /// never see event N+1 without event N.
    HoldKey,
}

impl std::str::FromStr for PoisonPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "continue" => Ok(Self::Continue),
            "hold-key" => Ok(Self::HoldKey),
            other => Err(Error::Config(format!(
                "poison_policy {other:?} is unknown: use continue or hold-key"
            ))),
        }
    }
}

/// Where the relay takes the events from (docs/RELAY.md#capture-modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureMode {
    /// Snapshot batches of the outbox table, as PgQ does: no replication slot, works behind any
    /// pooler and on any server, never retains WAL.
    #[default]
    Polling,
    /// The write-ahead log through a logical replication slot (pgoutput): rows of the outbox
    /// table and tableless events (`outbox_emit`), in commit order, as they commit.
    Streaming,
}

impl std::str::FromStr for CaptureMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "polling" => Ok(Self::Polling),
            "streaming" => Ok(Self::Streaming),
            other => Err(Error::Config(format!(
                "capture {other:?} is unknown: use polling or streaming"
            ))),
        }
    }
}

/// Longest `keep_delivered_hours` (one year): replay is for recent incidents; longer archives
/// belong in a warehouse, not next to the hot outbox.
pub(crate) const MAX_KEEP_DELIVERED_HOURS: u64 = 8760;
/// Longest `dead_letters_keep_days` (ten years) other than 0 (forever).
pub(crate) const MAX_DEAD_LETTERS_KEEP_DAYS: u64 = 3650;

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kafka: BTreeMap<&str, &str> = self
            .kafka
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_key(k) {
                    REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        let mut d = f.debug_struct("RelayConfig");
        for (key, value) in self.shown() {
            if key == "database_url" {
                d.field(key, &scrub_url(&value));
            } else {
                d.field(key, &value);
            }
        }
        d.field("kafka", &kafka).finish()
    }
}

impl RelayConfig {
    /// A configuration with every default. `brokers` is `bootstrap.servers`.
    #[must_use]
    pub fn new(database_url: impl Into<String>, brokers: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// Parses a TOML file's contents (see `docs/RELAY.md`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the unknown or malformed key.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Sets a raw librdkafka producer property (checked by [`RelayConfig::validate`]).
    #[must_use]
    pub fn kafka_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(key.into(), value.into());
        self
    }

    /// The largest event the producer accepts: `message.max.bytes` when set (librdkafka's
    /// default otherwise). Larger rows are dead-lettered without being loaded.
    pub(crate) fn max_event_bytes(&self) -> i64 {
        self.kafka
            .iter()
            .find(|(k, _)| canonical_key(k) == "message.max.bytes")
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(crate::store::DEFAULT_MAX_EVENT_BYTES)
    }

    /// The database URL (contains secrets: never log it; use [`scrub_url`]).
    #[must_use]
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The bootstrap servers.
    #[must_use]
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The outbox table location.
    ///
    /// # Errors
    /// [`Error::Outbox`] with an invalid identifier.
    pub fn tables(&self) -> Result<outbox::TableRef> {
        Ok(match &self.schema {
            Some(s) => outbox::TableRef::in_schema(s)?,
            None => outbox::TableRef::default(),
        })
    }

    /// The replication slot streaming capture reads: `slot`, or `outbox_relay` (`outbox_relay_<schema>`).
    #[must_use]
    pub fn slot_name(&self) -> String {
        self.slot.clone().unwrap_or_else(|| match &self.schema {
            Some(s) => format!("outbox_relay_{s}"),
            None => "outbox_relay".into(),
        })
    }

    /// The publication streaming capture reads: `publication`, or `outbox_relay`
    /// (`outbox_relay_<schema>`). Publications belong to a database; slot names are server-wide.
    #[must_use]
    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| match &self.schema {
                Some(s) => format!("outbox_relay_{s}"),
                None => "outbox_relay".into(),
            })
    }

    /// The tables whose changes streaming capture publishes (`capture_tables`), parsed.
    ///
    /// # Errors
    /// [`Error::Config`] naming the entry that is not `schema.table`.
    pub fn captured_tables(&self) -> Result<Vec<crate::cdc::TableName>> {
        match &self.capture_tables {
            None => Ok(Vec::new()),
            Some(list) => crate::cdc::parse_tables(list)
                .map_err(|e| Error::Config(format!("capture_tables: {e}"))),
        }
    }

    /// The column choices of the captured tables, parsed.
    ///
    /// # Errors
    /// [`Error::Config`] naming the entry.
    pub fn capture_columns(&self) -> Result<crate::cdc::Columns> {
        crate::cdc::parse_columns(
            &self.captured_tables()?,
            self.capture_include_columns.as_deref(),
            self.capture_exclude_columns.as_deref(),
            self.capture_key_columns.as_deref(),
        )
        .map_err(Error::Config)
    }

    /// The publication of the captured tables: `capture_publication`, or
    /// `<publication>_tables`.
    #[must_use]
    pub fn capture_publication_name(&self) -> String {
        self.capture_publication
            .clone()
            .unwrap_or_else(|| format!("{}_tables", self.publication_name()))
    }

    /// The topic pattern of change events.
    #[must_use]
    pub fn capture_topic_pattern(&self) -> &str {
        &self.capture_topic
    }

    /// Checks every setting; the message names the setting and why it is refused.
    ///
    /// # Errors
    /// [`Error::Config`] or [`Error::Outbox`] (schema identifier).
    pub fn validate(&self) -> Result<()> {
        self.check_connection()?;
        self.check_ranges()?;
        self.check_timing()?;
        self.check_kafka()
    }

    /// The database, the brokers, the schema and the relay session's commits.
    fn check_connection(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.database_url.trim().is_empty() {
            return bad("database_url is empty (set DATABASE_URL or --database-url)".into());
        }
        if self.brokers.trim().is_empty() {
            return bad("brokers is empty (set KAFKA_BROKERS or --brokers)".into());
        }
        self.tables()?;
        let captured = self.captured_tables()?;
        self.capture_columns()?;
        if !captured.is_empty() && self.capture != CaptureMode::Streaming {
            return bad(format!(
                "capture_tables names {} table(s), but change capture reads the WAL: set capture = \"streaming\"",
                captured.len()
            ));
        }
        if !captured.is_empty() {
            for t in &captured {
                if t.schema == self.schema.as_deref().unwrap_or("public") && t.table == "outbox" {
                    return bad(format!("capture_tables names the outbox table {t} itself"));
                }
            }
            let topic = crate::cdc::topic_for(&self.capture_topic, &captured[0]);
            if topic.is_empty()
                || topic.len() > 249
                || !topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return bad(format!(
                    "capture_topic {:?} makes topic {topic:?} for {}: a Kafka topic is 1 to 249 of a-z, A-Z, 0-9, '.', '_', '-'",
                    self.capture_topic, captured[0]
                ));
            }
        }
        for (what, name) in [
            ("slot", self.slot_name()),
            ("publication", self.publication_name()),
            ("capture_publication", self.capture_publication_name()),
        ] {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return bad(format!(
                    "{what} {name:?} is not a valid name: 1 to 63 of a-z, 0-9 and _"
                ));
            }
        }
        if !["on", "off", "local", "remote_write", "remote_apply"]
            .contains(&self.synchronous_commit.as_str())
        {
            return Err(Error::Config(format!(
                "synchronous_commit {:?} is unknown: use on, off, local, remote_write or remote_apply",
                self.synchronous_commit
            )));
        }
        Ok(())
    }

    /// Each number within its limits.
    fn check_ranges(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.page_size <= 0 {
            return bad(format!(
                "page_size must be positive, got {}",
                self.page_size
            ));
        }
        if self.page_size > 50_000 {
            return bad(format!(
                "page_size must be at most 50000, got {}",
                self.page_size
            ));
        }
        for (name, v) in [
            ("max_pages_in_flight", self.max_pages_in_flight as u64),
            ("idle_poll_max_ms", self.idle_poll_max.as_ms()),
            ("lease_ms", self.lease.as_ms()),
            ("standby_poll_ms", self.standby_poll.as_ms()),
            ("max_attempts", u64::from(self.max_attempts)),
            ("shutdown_timeout_ms", self.shutdown_timeout.as_ms()),
            ("ack_overdue_ms", self.ack_overdue.as_ms()),
            ("purge_interval_ms", self.purge_interval.as_ms()),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive, got 0"));
            }
        }
        if self.max_pages_in_flight > 64 {
            return bad(format!(
                "max_pages_in_flight must be at most 64, got {}",
                self.max_pages_in_flight
            ));
        }
        if self.lease.as_ms() < 1000 {
            return bad(format!(
                "lease_ms must be at least 1000 (a shorter lease flaps on ordinary pauses), got {}",
                self.lease.as_ms()
            ));
        }
        if self.keep_delivered_hours > MAX_KEEP_DELIVERED_HOURS {
            return bad(format!(
                "keep_delivered_hours must be at most {MAX_KEEP_DELIVERED_HOURS} (one year), got {}",
                self.keep_delivered_hours
            ));
        }
        if self.dead_letters_keep_days > MAX_DEAD_LETTERS_KEEP_DAYS {
            return bad(format!(
                "dead_letters_keep_days must be at most {MAX_DEAD_LETTERS_KEEP_DAYS} (0 keeps them forever), got {}",
                self.dead_letters_keep_days
            ));
        }
        if self.purge_interval.as_ms() < 1000 {
            return bad(format!(
                "purge_interval_ms must be at least 1000, got {}",
                self.purge_interval.as_ms()
            ));
        }
        Ok(())
    }

    /// The timings against each other: a lease that cannot lapse while idle or on standby.
    fn check_timing(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.standby_poll.as_ms() >= self.lease.as_ms() {
            return bad("standby_poll_ms must be shorter than lease_ms".into());
        }
        if self.idle_poll_max.as_ms() >= self.lease.as_ms() / 4 {
            return bad(format!(
                "idle_poll_max_ms must be shorter than lease_ms / 4 ({} ms), or the lease lapses while idle",
                self.lease.as_ms() / 4
            ));
        }
        Ok(())
    }

    /// The raw librdkafka options (the shared Kafka safety policy) and the producer queue.
    fn check_kafka(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        kafka_settings::check_producer_options(
            self.kafka.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(|r| Error::Config(r.to_string()))?;
        let in_flight_rows = self
            .page_size
            .saturating_mul(self.max_pages_in_flight as i64);
        if let Some(v) = self.kafka_value("queue.buffering.max.messages") {
            if v.parse::<i64>().is_ok_and(|n| n < in_flight_rows) {
                return bad(format!(
                    "queue.buffering.max.messages={v} is below page_size x max_pages_in_flight ({in_flight_rows}): the producer queue would fill before a page completes"
                ));
            }
        }
        Ok(())
    }

    /// A raw Kafka option by its primary name (aliases resolved).
    pub(crate) fn kafka_value(&self, key: &str) -> Option<&str> {
        self.kafka
            .iter()
            .find(|(k, _)| canonical_key(k) == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether delivered events are kept in `outbox_delivered` (`keep_delivered_hours > 0`).
    #[must_use]
    pub fn keeps_delivered(&self) -> bool {
        self.keep_delivered_hours > 0
    }

    /// Whether the leader purges anything (`keep_delivered_hours` or `dead_letters_keep_days`).
    pub(crate) fn purges(&self) -> bool {
        self.keep_delivered_hours > 0 || self.dead_letters_keep_days > 0
    }

    pub(crate) fn lease_duration(&self) -> Duration {
        Duration::from_millis(self.lease.as_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RelayConfig {
        RelayConfig::new("postgres://u:pw@localhost/db", "127.0.0.1:9092")
    }

    #[test]
    fn defaults_are_valid() {
        base().validate().unwrap();
    }

    #[test]
    fn unsafe_kafka_settings_are_refused_with_the_reason() {
        for (k, v, why) in [
            ("enable.idempotence", "false", "idempotent producer"),
            ("acks", "1", "acks=all"),
            ("request.required.acks", "0", "acks=all"),
            ("max.in.flight.requests.per.connection", "6", "at most 5"),
            ("max.in.flight", "100", "at most 5"),
            ("message.timeout.ms", "30000", "timed-out message"),
            ("delivery.timeout.ms", "600000", "timed-out message"),
            ("enable.idempotence", "0", "idempotent producer"),
            ("enable.ssl.certificate.verification", "F", "verification"),
            ("metadata.broker.list", "x:1", "the relay sets it"),
            ("partitioner", "consistent_random", "Java clients"),
            (
                "enable.gapless.guarantee",
                "false",
                "later events of the same keys",
            ),
            (
                "enable.ssl.certificate.verification",
                "false",
                "verification",
            ),
            ("ssl.endpoint.identification.algorithm", "none", "host name"),
            ("bootstrap.servers", "x:1", "the relay sets it"),
            ("retries", "0", "unlimited retries"),
            ("message.send.max.retries", "3", "unlimited retries"),
            ("transactional.id", "x", "transactions"),
        ] {
            let err = base()
                .kafka_option(k, v)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(k) && err.contains(why), "{k}={v}: {err}");
        }
        for (k, v) in [
            ("acks", "all"),
            ("acks", "-1"),
            ("max.in.flight.requests.per.connection", "5"),
            ("message.timeout.ms", "0"),
            ("enable.idempotence", "1"),
            ("linger.ms", "20"),
            ("compression.type", "lz4"),
        ] {
            base().kafka_option(k, v).validate().unwrap();
        }
    }

    #[test]
    fn aliases_of_one_setting_are_refused_together() {
        let err = base()
            .kafka_option("linger.ms", "5")
            .kafka_option("queue.buffering.max.ms", "50")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("same librdkafka setting"), "{err}");
        let err = base()
            .kafka_option("queue.buffering.max.messages", "100")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("producer queue would fill"), "{err}");
    }

    #[test]
    fn bad_numbers_and_identifiers_are_refused() {
        assert!(base()
            .idle_poll_max(Duration::from_secs(2))
            .validate()
            .is_err());
        assert!(base().max_pages_in_flight(1000).validate().is_err());
        assert!(base().page_size(0).validate().is_err());
        assert!(base().page_size(-5).validate().is_err());
        assert!(base().max_pages_in_flight(0).validate().is_err());
        assert!(base().lease(Duration::from_millis(10)).validate().is_err());
        assert!(base().max_attempts(0).validate().is_err());
        assert!(base().shutdown_timeout(Duration::ZERO).validate().is_err());
        let err = base()
            .schema("Bad-Schema")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid identifier"), "{err}");
        assert!(RelayConfig::new("", "b").validate().is_err());
        assert!(RelayConfig::new("postgres://x", " ").validate().is_err());
    }

    #[test]
    fn retention_settings_are_checked_by_name() {
        base()
            .keep_delivered_hours(24)
            .dead_letters_keep_days(30)
            .validate()
            .unwrap();
        for (cfg, key) in [
            (base().keep_delivered_hours(100_000), "keep_delivered_hours"),
            (
                base().dead_letters_keep_days(5000),
                "dead_letters_keep_days",
            ),
            (
                base().purge_interval(Duration::from_millis(10)),
                "purge_interval_ms",
            ),
            (base().purge_interval(Duration::ZERO), "purge_interval_ms"),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let c = RelayConfig::from_toml(
            "database_url = 'x'\nbrokers = 'b'\nkeep_delivered_hours = 48\ndead_letters_keep_days = 7\n",
        )
        .unwrap();
        assert!(c.keeps_delivered() && c.dead_letters_keep_days == 7);
        assert!(!base().keeps_delivered() && !base().purges());
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let c = base()
            .kafka_option("sasl.password", "hunter2")
            .kafka_option("ssl.key.password", "hunter3");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("hunter3") && !dbg.contains(":pw@"),
            "{dbg}"
        );
        let err = base()
            .kafka_option("sasl.password", "hunter2")
            .kafka_option("acks", "1")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"));
        for url in [
            "postgres://relay:s3cr3t@db/app?sslpassword=k3y",
            "host=db user=relay password=s3cr3t sslpassword=k3y dbname=app",
            "host=db password='s3cr3t x' dbname=app",
        ] {
            let c = RelayConfig::new(url, "b:1")
                .kafka_option("sasl.oauthbearer.client.secret", "hunter4");
            let dbg = format!("{c:?}");
            assert!(
                !dbg.contains("s3cr3t") && !dbg.contains("k3y") && !dbg.contains("hunter4"),
                "{dbg}"
            );
        }
    }

    #[test]
    fn toml_refuses_unknown_keys() {
        let ok = RelayConfig::from_toml(
            "database_url = 'postgres://x'\nbrokers = 'b:1'\npage_size = 10\n[kafka]\n'linger.ms' = '5'\n",
        )
        .unwrap();
        assert_eq!(ok.page_size, 10);
        let err = RelayConfig::from_toml("database_url = 'x'\nbrokers = 'b'\npage_sise = 10\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("page_sise"), "{err}");
    }
}
