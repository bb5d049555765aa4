//! The independent checker: what reached Kafka, compared with what the database committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;

/// One message as the checker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `ce_id` header.
    pub event_id: String,
    /// Message key.
    pub key: String,
    /// Partition and offset.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Payload as text.
    pub payload: String,
}

/// Header value by name.
#[must_use]
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// Reads `topic` from offset 0 until at least `min` messages arrived and nothing new came for
/// `quiet`, or `timeout` passed.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    min: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Seen>> {
    let deadline = Instant::now() + timeout;
    read_topic_until(bootstrap, topic, |read, since_new| {
        Instant::now() > deadline || (read >= min && since_new > quiet)
    })
}

/// Reads `topic` from offset 0 until `done(messages read, time since the last new one)` says
/// so. Long runs read while they go (a reader on its own thread), so the check at the end does
/// not depend on how fast the broker serves a large topic from the start.
pub fn read_topic_until(
    bootstrap: &str,
    topic: &str,
    mut done: impl FnMut(usize, Duration) -> bool,
) -> Result<Vec<Seen>> {
    let consumer = crate::kafka::reader(bootstrap, topic)?;
    let mut last_new = Instant::now();
    let mut out = Vec::new();
    loop {
        if done(out.len(), last_new.elapsed()) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let m = m.detach();
                out.push(Seen {
                    event_id: header(&m, "ce_id").unwrap_or_default(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                });
                last_new = Instant::now();
            }
            // A broker that is (re)starting: librdkafka reconnects by itself.
            Some(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::AllBrokersDown
                | rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                | rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                | rdkafka::types::RDKafkaErrorCode::NotLeaderForPartition
                | rdkafka::types::RDKafkaErrorCode::LeaderNotAvailable
                | rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
            ))) => {}
            Some(Err(e)) => bail!("consume {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// What the checker found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Committed events that never reached Kafka (I1).
    pub missing: Vec<String>,
    /// Messages whose event was never committed (I2).
    pub unexpected: Vec<String>,
    /// Extra copies (I4: allowed only from in-flight work at a fault).
    pub duplicates: usize,
    /// Keys whose sequence went backwards at first delivery (I3).
    pub order_violations: Vec<String>,
    /// Keys found on more than one partition.
    pub split_keys: Vec<String>,
    /// Messages read.
    pub read: usize,
}

impl Report {
    /// No loss, nothing unexpected, order kept, one partition per key.
    #[must_use]
    pub fn is_consistent(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.order_violations.is_empty()
            && self.split_keys.is_empty()
    }
}

/// Compares `seen` with the committed events: `expected` maps event id to `(key, seq)`, where
/// `seq` is the event's position in its key's commit order.
#[must_use]
pub fn check(seen: &[Seen], expected: &HashMap<String, (String, u64)>) -> Report {
    let mut report = Report {
        read: seen.len(),
        ..Report::default()
    };
    // Kafka order: by partition, then offset.
    let mut ordered: Vec<&Seen> = seen.iter().collect();
    ordered.sort_by_key(|s| (s.partition, s.offset));
    let mut first_seen: HashSet<&str> = HashSet::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut partitions: BTreeMap<&str, HashSet<i32>> = BTreeMap::new();
    for s in ordered {
        partitions.entry(&s.key).or_default().insert(s.partition);
        let Some((key, seq)) = expected.get(&s.event_id) else {
            report.unexpected.push(s.event_id.clone());
            continue;
        };
        if !first_seen.insert(&s.event_id) {
            report.duplicates += 1;
            continue;
        }
        if let Some(prev) = last_seq.insert(key, *seq) {
            if *seq < prev {
                report
                    .order_violations
                    .push(format!("{key}: {seq} after {prev}"));
            }
        }
    }
    for id in expected.keys() {
        if !first_seen.contains(id.as_str()) {
            report.missing.push(id.clone());
        }
    }
    report.missing.sort();
    for (key, parts) in partitions {
        if parts.len() > 1 {
            report.split_keys.push(key.to_owned());
        }
    }
    report
}
