//! Relay configuration: typed settings with documented defaults, raw librdkafka pass-through,
//! and refusal of settings that would break ordering, delivery or security.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use outbox::kafka_settings::{self, canonical_key};
use outbox::redact::{is_secret_key, REDACTED};

use crate::error::{scrub_url, Error, Result};

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

/// Everything the relay needs. Build with [`RelayConfig::new`] and the setters, or deserialize
/// from a TOML file (unknown keys are refused). Call [`RelayConfig::validate`] (the relay does).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    #[serde(default)]
    pub(crate) database_url: String,
    #[serde(default)]
    pub(crate) brokers: String,
    #[serde(default)]
    pub(crate) schema: Option<String>,
    #[serde(default)]
    pub(crate) source: Option<String>,
    #[serde(default)]
    pub(crate) instance_id: Option<String>,
    #[serde(default = "defaults::page_size")]
    pub(crate) page_size: i64,
    #[serde(default = "defaults::max_pages_in_flight")]
    pub(crate) max_pages_in_flight: usize,
    #[serde(default = "defaults::idle_poll_max_ms")]
    pub(crate) idle_poll_max_ms: u64,
    #[serde(default = "defaults::lease_ms")]
    pub(crate) lease_ms: u64,
    #[serde(default = "defaults::standby_poll_ms")]
    pub(crate) standby_poll_ms: u64,
    #[serde(default = "defaults::max_attempts")]
    pub(crate) max_attempts: u32,
    #[serde(default)]
    pub(crate) poison_policy: PoisonPolicy,
    #[serde(default = "defaults::shutdown_timeout_ms")]
    pub(crate) shutdown_timeout_ms: u64,
    #[serde(default = "defaults::ack_overdue_ms")]
    pub(crate) ack_overdue_ms: u64,
    #[serde(default)]
    pub(crate) metrics_addr: Option<SocketAddr>,
    #[serde(default)]
    pub(crate) allow_superuser: bool,
    #[serde(default = "defaults::synchronous_commit")]
    pub(crate) synchronous_commit: String,
    #[serde(default)]
    pub(crate) keep_delivered_hours: u64,
    #[serde(default)]
    pub(crate) dead_letters_keep_days: u64,
    #[serde(default = "defaults::purge_interval_ms")]
    pub(crate) purge_interval_ms: u64,
    /// Raw librdkafka producer properties.
    #[serde(default)]
    pub(crate) kafka: BTreeMap<String, String>,
}

mod defaults {
    /// Rows per fetch: large enough to amortise a round trip, small enough to delete quickly.
    pub fn page_size() -> i64 {
        1000
    }
    /// Pages produced ahead of acknowledgement: keeps DB and Kafka busy at once.
    pub fn max_pages_in_flight() -> usize {
        4
    }
    /// Longest sleep when idle; polling speeds up again as soon as a batch has rows.
    pub fn idle_poll_max_ms() -> u64 {
        100
    }
    /// A leader that has not renewed for this long is replaced.
    pub fn lease_ms() -> u64 {
        5000
    }
    /// How often a standby checks whether the lease expired.
    pub fn standby_poll_ms() -> u64 {
        500
    }
    /// Delivery attempts before an event is dead-lettered (permanent errors: at once).
    pub fn max_attempts() -> u32 {
        5
    }
    /// How long shutdown waits for outstanding acknowledgements.
    pub fn shutdown_timeout_ms() -> u64 {
        10_000
    }
    /// An event unacknowledged for this long is set aside with the later events of its key:
    /// an unavailable partition (no leader, too few in-sync replicas) holds up only its own
    /// keys. Long enough that a broker's ordinary hiccup (leader election, a retry) is waited
    /// out in line.
    pub fn ack_overdue_ms() -> u64 {
        10_000
    }
    /// The relay's own session: its commits (lease, batch snapshots, removals) need not wait
    /// for the WAL flush. Losing the last of them in a database crash moves the relay's state
    /// back (WAL is replayed in order), which re-sends events (duplicates) and never skips one.
    /// Applications' commits are not affected.
    pub fn synchronous_commit() -> String {
        "off".to_owned()
    }
    /// How often the leader purges expired delivered events and dead letters: often enough that
    /// each run deletes little, rarely enough that the index scan costs nothing.
    pub fn purge_interval_ms() -> u64 {
        300_000
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
        f.debug_struct("RelayConfig")
            .field("database_url", &scrub_url(&self.database_url))
            .field("brokers", &self.brokers)
            .field("schema", &self.schema)
            .field("source", &self.source)
            .field("instance_id", &self.instance_id)
            .field("page_size", &self.page_size)
            .field("max_pages_in_flight", &self.max_pages_in_flight)
            .field("idle_poll_max_ms", &self.idle_poll_max_ms)
            .field("lease_ms", &self.lease_ms)
            .field("standby_poll_ms", &self.standby_poll_ms)
            .field("max_attempts", &self.max_attempts)
            .field("poison_policy", &self.poison_policy)
            .field("shutdown_timeout_ms", &self.shutdown_timeout_ms)
            .field("ack_overdue_ms", &self.ack_overdue_ms)
            .field("metrics_addr", &self.metrics_addr)
            .field("allow_superuser", &self.allow_superuser)
            .field("synchronous_commit", &self.synchronous_commit)
            .field("keep_delivered_hours", &self.keep_delivered_hours)
            .field("dead_letters_keep_days", &self.dead_letters_keep_days)
            .field("purge_interval_ms", &self.purge_interval_ms)
            .field("kafka", &kafka)
            .finish()
    }
}

impl RelayConfig {
    /// A configuration with every default. `brokers` is `bootstrap.servers`.
    #[must_use]
    pub fn new(database_url: impl Into<String>, brokers: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            brokers: brokers.into(),
            schema: None,
            source: None,
            instance_id: None,
            page_size: defaults::page_size(),
            max_pages_in_flight: defaults::max_pages_in_flight(),
            idle_poll_max_ms: defaults::idle_poll_max_ms(),
            lease_ms: defaults::lease_ms(),
            standby_poll_ms: defaults::standby_poll_ms(),
            max_attempts: defaults::max_attempts(),
            poison_policy: PoisonPolicy::default(),
            shutdown_timeout_ms: defaults::shutdown_timeout_ms(),
            ack_overdue_ms: defaults::ack_overdue_ms(),
            metrics_addr: None,
            allow_superuser: false,
            synchronous_commit: defaults::synchronous_commit(),
            keep_delivered_hours: 0,
            dead_letters_keep_days: 0,
            purge_interval_ms: defaults::purge_interval_ms(),
            kafka: BTreeMap::new(),
        }
    }

    /// Parses a TOML file's contents (see `docs/RELAY.md`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the unknown or malformed key.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Schema holding the outbox tables. Defaults to the connection's `search_path`.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// `ce_source` of every message. Defaults to `/outbox-relay/<schema or "default">`.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// This process's name in the lease. Defaults to `<hostname>-<pid>-<random>`.
    #[must_use]
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Rows per fetch. Defaults to 1000.
    #[must_use]
    pub fn page_size(mut self, n: i64) -> Self {
        self.page_size = n;
        self
    }

    /// Pages produced ahead of acknowledgement. Defaults to 4.
    #[must_use]
    pub fn max_pages_in_flight(mut self, n: usize) -> Self {
        self.max_pages_in_flight = n;
        self
    }

    /// Longest idle sleep between polls. Defaults to 100 ms.
    #[must_use]
    pub fn idle_poll_max(mut self, d: Duration) -> Self {
        self.idle_poll_max_ms = millis(d);
        self
    }

    /// Lease length: a leader silent this long is replaced. Defaults to 5 s.
    #[must_use]
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease_ms = millis(d);
        self
    }

    /// How often a standby checks the lease. Defaults to 500 ms.
    #[must_use]
    pub fn standby_poll(mut self, d: Duration) -> Self {
        self.standby_poll_ms = millis(d);
        self
    }

    /// Delivery attempts before dead-lettering. Defaults to 5.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// What happens to later events of a dead-lettered key. Defaults to
    /// [`PoisonPolicy::Continue`].
    #[must_use]
    pub fn poison_policy(mut self, p: PoisonPolicy) -> Self {
        self.poison_policy = p;
        self
    }

    /// How long shutdown waits for acknowledgements. Defaults to 10 s.
    #[must_use]
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout_ms = millis(d);
        self
    }

    /// An event whose acknowledgement is overdue by this long is set aside, still in flight,
    /// and the later events of its key wait for it (they stay in the outbox); every other key
    /// keeps flowing. So a partition that is unavailable (its leader down, too few in-sync
    /// replicas) holds up only the keys on it. Defaults to 10 s.
    #[must_use]
    pub fn ack_overdue(mut self, d: Duration) -> Self {
        self.ack_overdue_ms = millis(d);
        self
    }

    /// Serve `/metrics` and `/healthz` here. Defaults to off.
    #[must_use]
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Run even when the database role is a superuser. Defaults to false (least privilege).
    #[must_use]
    pub fn allow_superuser(mut self, yes: bool) -> Self {
        self.allow_superuser = yes;
        self
    }

    /// `synchronous_commit` of the relay's own database session (default `off`: its commits do
    /// not wait for the WAL flush; a database crash can only make it re-send, never skip). Use
    /// `on` to trade relay throughput and latency for fewer duplicates after a crash.
    #[must_use]
    pub fn synchronous_commit(mut self, value: impl Into<String>) -> Self {
        self.synchronous_commit = value.into();
        self
    }

    /// Keep delivered events this many hours in `outbox_delivered` (for `outbox-relay replay`),
    /// then purge them. Defaults to 0: delete them at once. When positive, removal after
    /// acknowledgement becomes a move in the same fenced statement, and the leader purges
    /// expired rows every [`RelayConfig::purge_interval`] in batches of 10,000.
    #[must_use]
    pub fn keep_delivered_hours(mut self, hours: u64) -> Self {
        self.keep_delivered_hours = hours;
        self
    }

    /// Purge dead letters older than this many days (by `dead_lettered_at`). Defaults to 0:
    /// keep them until an operator retries or purges them.
    #[must_use]
    pub fn dead_letters_keep_days(mut self, days: u64) -> Self {
        self.dead_letters_keep_days = days;
        self
    }

    /// How often the leader purges expired delivered events and dead letters (also once when it
    /// becomes leader). Defaults to 5 minutes.
    #[must_use]
    pub fn purge_interval(mut self, d: Duration) -> Self {
        self.purge_interval_ms = millis(d);
        self
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

    /// Checks every setting; the message names the setting and why it is refused.
    ///
    /// # Errors
    /// [`Error::Config`] or [`Error::Outbox`] (schema identifier).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.database_url.trim().is_empty() {
            return bad("database_url is empty (set DATABASE_URL or --database-url)".into());
        }
        if self.brokers.trim().is_empty() {
            return bad("brokers is empty (set KAFKA_BROKERS or --brokers)".into());
        }
        self.tables()?;
        if !["on", "off", "local", "remote_write", "remote_apply"]
            .contains(&self.synchronous_commit.as_str())
        {
            return Err(Error::Config(format!(
                "synchronous_commit {:?} is unknown: use on, off, local, remote_write or remote_apply",
                self.synchronous_commit
            )));
        }
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
            ("idle_poll_max_ms", self.idle_poll_max_ms),
            ("lease_ms", self.lease_ms),
            ("standby_poll_ms", self.standby_poll_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms),
            ("ack_overdue_ms", self.ack_overdue_ms),
            ("purge_interval_ms", self.purge_interval_ms),
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
        if self.lease_ms < 1000 {
            return bad(format!(
                "lease_ms must be at least 1000 (a shorter lease flaps on ordinary pauses), got {}",
                self.lease_ms
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
        if self.purge_interval_ms < 1000 {
            return bad(format!(
                "purge_interval_ms must be at least 1000, got {}",
                self.purge_interval_ms
            ));
        }
        if self.standby_poll_ms >= self.lease_ms {
            return bad("standby_poll_ms must be shorter than lease_ms".into());
        }
        if self.idle_poll_max_ms >= self.lease_ms / 4 {
            return bad(format!(
                "idle_poll_max_ms must be shorter than lease_ms / 4 ({} ms), or the lease lapses while idle",
                self.lease_ms / 4
            ));
        }
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
                    "queue.buffering.max.messages={v} is below page_size x max_pages_in_flight                      ({in_flight_rows}): the producer queue would fill before a page completes"
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
        Duration::from_millis(self.lease_ms)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
