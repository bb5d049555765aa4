//! Kafka client safety policy: the librdkafka settings the relay's producer and the consumer
//! runner enforce, the options they refuse (and why), and librdkafka's property aliases.
//!
//! Plain `(key, value)` strings, no Kafka client needed: the relay's configuration check and
//! producer, and the consumer runner's configuration check and clients, all read it from here.
//! A refused option is reported as a [`Refusal`] naming the setting and why; the value of a
//! secret property ([`crate::redact::is_secret_key`]) is shown as `***`.

use crate::redact::{is_secret_key, REDACTED};

/// A setting a client always gets, whatever the options say, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enforced {
    /// The librdkafka property (its primary name).
    pub key: &'static str,
    /// The value set.
    pub value: &'static str,
    /// Why (the text of the refusal of a weaker value).
    pub reason: &'static str,
}

/// librdkafka's aliases, mapped to the primary property name, so that checks and merges see
/// one name per setting.
pub const ALIASES: &[(&str, &str)] = &[
    ("request.required.acks", "acks"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("retries", "message.send.max.retries"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("queue.buffering.max.ms", "linger.ms"),
    ("retry.backoff.ms", "retry.backoff.ms"),
    ("metadata.broker.list", "bootstrap.servers"),
    (
        "topic.metadata.refresh.interval.ms",
        "topic.metadata.refresh.interval.ms",
    ),
];

/// The primary name of a librdkafka property (see [`ALIASES`]).
#[must_use]
pub fn canonical_key(key: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, primary)| primary)
}

/// A librdkafka boolean, parsed as librdkafka does (true/t/1, false/f/0, any case).
#[must_use]
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" => Some(true),
        "false" | "f" | "0" => Some(false),
        _ => None,
    }
}

/// Why an option is refused. The message names the setting and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The option (or this value of it) is unsafe.
    #[error("kafka option {key}{} is refused: {reason}", value.as_deref().map(|v| format!("={v}")).unwrap_or_default())]
    Setting {
        /// The option as given.
        key: String,
        /// Its value as shown in the message (`***` for a secret), if shown.
        value: Option<String>,
        /// Why it is refused.
        reason: String,
    },
    /// Two names (aliases) of one librdkafka setting were given.
    #[error("kafka options {first} and {second} are the same librdkafka setting: give one")]
    SameSetting {
        /// The one seen first.
        first: String,
        /// The other.
        second: String,
    },
}

impl Refusal {
    /// A refusal of `key` naming its value (`***` when `key` is secret).
    fn with_value(key: &str, value: &str, reason: impl Into<String>) -> Self {
        let shown = if is_secret_key(key) { REDACTED } else { value };
        Refusal::Setting {
            key: key.to_owned(),
            value: Some(shown.to_owned()),
            reason: reason.into(),
        }
    }

    /// A refusal of `key` without its value.
    fn without_value(key: &str, reason: impl Into<String>) -> Self {
        Refusal::Setting {
            key: key.to_owned(),
            value: None,
            reason: reason.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relay's producer
// ---------------------------------------------------------------------------------------------

/// The producer settings the relay enforces (options cannot weaken them; see
/// [`check_producer_option`]), with the reasons.
pub const PRODUCER_ENFORCED: &[Enforced] = &[
    Enforced {
        key: "enable.idempotence",
        value: "true",
        reason: "the idempotent producer is what keeps retries from reordering or duplicating a partition",
    },
    Enforced {
        key: "acks",
        value: "all",
        reason: "only acks=all survives the loss of a broker after acknowledgement",
    },
    Enforced {
        key: "max.in.flight.requests.per.connection",
        value: "5",
        reason: "must be 1 to 5: the idempotent producer keeps order only with at most 5 requests in flight",
    },
    Enforced {
        key: "partitioner",
        value: "murmur2_random",
        reason: "only murmur2_random puts a key on the same partition as Java clients do",
    },
    // A produce request that fails for good (not authorised, unknown server error, too large)
    // stops the producer instead of letting librdkafka bump the epoch and write the requests
    // queued behind it: those hold later events of the same keys, which would then overtake
    // the failed ones when the relay sends them again. The relay counts the failure, starts a
    // new producer and sends everything unacknowledged again, in order.
    Enforced {
        key: "enable.gapless.guarantee",
        value: "true",
        reason: "must stay on: without it a failed produce request lets the requests behind it (later events of the same keys) be written first",
    },
];

/// Settings the relay sets itself, with where to set them instead; giving them as options is
/// refused rather than silently ignored.
pub const PRODUCER_OWNED: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "use brokers / --brokers / KAFKA_BROKERS",
    ),
    (
        "metadata.broker.list",
        "use brokers / --brokers / KAFKA_BROKERS",
    ),
];

/// The reason of the enforced producer setting `key`.
fn producer_reason(key: &str) -> &'static str {
    PRODUCER_ENFORCED
        .iter()
        .find(|e| e.key == key)
        .map_or("", |e| e.reason)
}

/// Checks one producer option: refuses librdkafka settings that would lose, duplicate, reorder
/// or expose events (aliases resolved; the message shows the value, `***` when secret).
///
/// # Errors
/// [`Refusal::Setting`] naming the option and why.
pub fn check_producer_option(key: &str, value: &str) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal::with_value(key, value, why));
    let v = value.trim().to_ascii_lowercase();
    if let Some((_, hint)) = PRODUCER_OWNED
        .iter()
        .find(|(k, _)| canonical_key(key) == *k)
    {
        return refuse(&format!("the relay sets it ({hint})"));
    }
    match canonical_key(key) {
        k @ "enable.idempotence" if parse_bool(&v) != Some(true) => refuse(producer_reason(k)),
        k @ "acks" if v != "all" && v != "-1" => refuse(producer_reason(k)),
        k @ "max.in.flight.requests.per.connection" => match v.parse::<u32>() {
            Ok(1..=5) => Ok(()),
            _ => refuse(producer_reason(k)),
        },
        "message.send.max.retries" => refuse(
            "the relay keeps librdkafka's unlimited retries: a retry budget that runs out turns a broker hiccup into a failed event that can be overtaken by later events of its key",
        ),
        "message.timeout.ms" if v != "0" => refuse(
            "must be 0 (never give up, the relay's setting): a timed-out message may still be written, and re-sending it reorders its key",
        ),
        k @ "partitioner" if v != "murmur2_random" => refuse(producer_reason(k)),
        "enable.ssl.certificate.verification" if parse_bool(&v) != Some(true) => {
            refuse("certificate verification must stay on")
        }
        "ssl.endpoint.identification.algorithm" if v != "https" => {
            refuse("host name verification must stay on (https)")
        }
        "transactional.id" => refuse("transactions are not supported by this relay mode"),
        k @ "enable.gapless.guarantee" if parse_bool(&v) != Some(true) => {
            refuse(producer_reason(k))
        }
        _ => Ok(()),
    }
}

/// Checks the relay's producer options in order: each with [`check_producer_option`], and no
/// two names of one setting.
///
/// # Errors
/// The first [`Refusal`].
pub fn check_producer_options<'a>(
    options: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), Refusal> {
    let mut seen = std::collections::HashMap::new();
    for (key, value) in options {
        check_producer_option(key, value)?;
        if let Some(other) = seen.insert(canonical_key(key), key) {
            return Err(Refusal::SameSetting {
                first: other.to_owned(),
                second: key.to_owned(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The consumer runner
// ---------------------------------------------------------------------------------------------

/// The consumer settings the runner enforces (set after the options), with the reasons.
pub const CONSUMER_ENFORCED: &[Enforced] = &[Enforced {
    key: "enable.auto.offset.store",
    value: "false",
    reason: "offsets must be stored only after the database commit, or a crash loses the message",
}];

/// The runner's consumer defaults (set before the options; `isolation.level` may only be given
/// as `read_committed`, see [`check_consumer_option`]). `auto.offset.reset=earliest`: a new
/// group must not skip events.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    ("enable.auto.commit", "true"),
    ("auto.commit.interval.ms", "1000"),
    ("isolation.level", "read_committed"),
    ("partition.assignment.strategy", "cooperative-sticky"),
];

/// The settings of the consumer runner's dead-letter producer: idempotent, `acks=all`, keys
/// partitioned as Java clients do.
pub const DEAD_LETTER_PRODUCER_ENFORCED: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
];

/// Checks one consumer-runner option (the message names the option, not its value).
///
/// # Errors
/// [`Refusal::Setting`] naming the option and why.
pub fn check_consumer_option(key: &str, value: &str) -> Result<(), Refusal> {
    let v = value.trim().to_ascii_lowercase();
    let refuse = |why: &str| Err(Refusal::without_value(key, why));
    // By the primary name, booleans as librdkafka reads them: an alias or `0` for `false` must
    // not get past a rule.
    match canonical_key(key) {
        "enable.auto.offset.store" if parse_bool(&v) != Some(false) => {
            refuse(CONSUMER_ENFORCED[0].reason)
        }
        "isolation.level" if v != "read_committed" => {
            refuse("read_uncommitted would apply messages of aborted transactions")
        }
        "group.id" | "bootstrap.servers" => refuse("set it through the typed configuration"),
        "enable.ssl.certificate.verification" if parse_bool(&v) != Some(true) => {
            refuse("certificate verification must stay on")
        }
        "ssl.endpoint.identification.algorithm" if v != "https" => {
            refuse("host name verification must stay on (https)")
        }
        _ => Ok(()),
    }
}

/// Checks the consumer runner's options in order with [`check_consumer_option`].
///
/// # Errors
/// The first [`Refusal`].
pub fn check_consumer_options<'a>(
    options: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), Refusal> {
    options
        .into_iter()
        .try_for_each(|(k, v)| check_consumer_option(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The consumer's rules see through aliases and librdkafka's boolean spellings (they did
    /// not before: `enable.ssl.certificate.verification=0` turned verification off).
    #[test]
    fn consumer_rules_see_aliases_and_every_boolean_spelling() {
        for (k, v) in [
            ("enable.ssl.certificate.verification", "0"),
            ("enable.ssl.certificate.verification", "F"),
            ("enable.ssl.certificate.verification", "off"),
            ("ssl.endpoint.identification.algorithm", "none"),
            ("metadata.broker.list", "evil:9092"),
            ("enable.auto.offset.store", "1"),
            ("enable.auto.offset.store", "true"),
            ("isolation.level", "read_uncommitted"),
        ] {
            assert!(check_consumer_option(k, v).is_err(), "{k}={v} passed");
        }
        for (k, v) in [
            ("enable.auto.offset.store", "0"),
            ("enable.auto.offset.store", "false"),
            ("enable.ssl.certificate.verification", "1"),
            ("ssl.endpoint.identification.algorithm", "https"),
            ("fetch.wait.max.ms", "10"),
        ] {
            check_consumer_option(k, v).unwrap();
        }
    }

    #[test]
    fn aliases_resolve_to_the_primary_name() {
        assert_eq!(canonical_key("request.required.acks"), "acks");
        assert_eq!(canonical_key("queue.buffering.max.ms"), "linger.ms");
        assert_eq!(canonical_key("linger.ms"), "linger.ms");
        assert_eq!(canonical_key("compression.type"), "compression.type");
    }

    #[test]
    fn every_enforced_producer_value_passes_its_own_check() {
        for e in PRODUCER_ENFORCED {
            check_producer_option(e.key, e.value).unwrap();
            assert!(!e.reason.is_empty(), "{}", e.key);
        }
        for e in CONSUMER_ENFORCED {
            check_consumer_option(e.key, e.value).unwrap();
        }
        for (k, v) in CONSUMER_DEFAULTS {
            check_consumer_option(k, v).unwrap();
        }
    }

    #[test]
    fn refusals_name_the_setting_and_why_and_hide_secrets() {
        let r = check_producer_option("request.required.acks", "0").unwrap_err();
        assert_eq!(
            r.to_string(),
            "kafka option request.required.acks=0 is refused: only acks=all survives the loss of a broker after acknowledgement"
        );
        let r = check_producer_option("metadata.broker.list", "x:1").unwrap_err();
        assert!(
            r.to_string().contains("the relay sets it (use brokers"),
            "{r}"
        );
        let r = check_producer_options([("linger.ms", "5"), ("queue.buffering.max.ms", "50")])
            .unwrap_err();
        assert_eq!(
            r.to_string(),
            "kafka options linger.ms and queue.buffering.max.ms are the same librdkafka setting: give one"
        );
        let r = check_consumer_option("isolation.level", "read_uncommitted").unwrap_err();
        assert_eq!(
            r.to_string(),
            "kafka option isolation.level is refused: read_uncommitted would apply messages of aborted transactions"
        );
        // A secret's value never appears (a check refusing a secret property shows ***).
        let r = Refusal::with_value("sasl.password", "hunter2", "why");
        assert_eq!(
            r.to_string(),
            "kafka option sasl.password=*** is refused: why"
        );
        assert!(!format!("{r:?}").contains("hunter2"));
        check_consumer_options([
            ("fetch.min.bytes", "1"),
            ("isolation.level", "READ_COMMITTED"),
        ])
        .unwrap();
    }
}
