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

/// How long a reader may read nothing new, before it has what it came for, until it is replaced
/// by a fresh consumer resuming after the last offset it read on each partition.
pub const STALL: Duration = Duration::from_secs(15);

/// How [`read_topic_with`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Cap of each fetch in bytes (see [`crate::kafka::reader_at`]); `None`: librdkafka's
    /// default. It must exceed the largest key plus value in the topic.
    pub fetch_max_bytes: Option<usize>,
    /// See [`STALL`].
    pub stall: Duration,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            fetch_max_bytes: None,
            stall: STALL,
        }
    }
}

/// What a read of a topic got, and what got in its way.
#[derive(Debug, Default, Clone)]
pub struct TopicRead {
    /// The messages, each (partition, offset) once.
    pub seen: Vec<Seen>,
    /// Per partition, the offset after the last message read.
    pub next: BTreeMap<i32, i64>,
    /// The broker's high watermark per partition when the read ended (`None`: not known, see
    /// `errors`).
    pub ends: Option<BTreeMap<i32, i64>>,
    /// Client errors the read went on through (a restarting broker, a timed-out request), and
    /// failures to build a fresh consumer or to ask for the watermarks, by text, with how often.
    pub errors: BTreeMap<String, usize>,
    /// Why each consumer after the first was built.
    pub restarts: Vec<String>,
    /// Messages at a (partition, offset) already read, not counted again.
    pub reread: usize,
    /// How long the read took.
    pub elapsed: Duration,
}

impl TopicRead {
    fn error(&mut self, e: impl std::fmt::Display) {
        *self.errors.entry(e.to_string()).or_default() += 1;
    }

    /// Partitions on which the reader stopped below the broker's high watermark, with the
    /// offset it would have read next and the watermark.
    #[must_use]
    pub fn short_of_end(&self) -> Vec<(i32, i64, i64)> {
        self.ends
            .iter()
            .flatten()
            .filter_map(|(p, high)| {
                let next = self.next.get(p).copied().unwrap_or(0);
                (next < *high).then_some((*p, next, *high))
            })
            .collect()
    }

    /// Offsets below the last one read on a partition that the reader did not get (a broker
    /// that skipped some, or a reader that jumped).
    #[must_use]
    pub fn gaps(&self) -> usize {
        let mut read: BTreeMap<i32, usize> = BTreeMap::new();
        for s in &self.seen {
            *read.entry(s.partition).or_default() += 1;
        }
        self.next
            .iter()
            .map(|(p, next)| {
                usize::try_from(*next)
                    .unwrap_or_default()
                    .saturating_sub(read.get(p).copied().unwrap_or_default())
            })
            .sum()
    }

    /// Offsets known to be in the topic that the reader did not read: below the broker's high
    /// watermark past where it stopped, and [`TopicRead::gaps`].
    #[must_use]
    pub fn unread(&self) -> usize {
        let short: i64 = self
            .short_of_end()
            .iter()
            .map(|(_, next, high)| high - next)
            .sum();
        usize::try_from(short).unwrap_or_default() + self.gaps()
    }

    /// Every offset from 0 to the broker's high watermark read, on every partition: what the
    /// reader did not get is not in the topic.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.ends.is_some() && self.short_of_end().is_empty() && self.gaps() == 0
    }

    /// The reader got nothing although the broker holds messages (or could not say): a failure
    /// of the reader, which checks nothing, not evidence that the messages are missing.
    #[must_use]
    pub fn reader_failed(&self) -> bool {
        self.seen.is_empty()
            && self
                .ends
                .as_ref()
                .is_none_or(|e| e.values().any(|h| *h > 0))
    }

    /// One line: what was read, how, and how far.
    #[must_use]
    pub fn summary(&self) -> String {
        let ends = match &self.ends {
            Some(e) => format!(
                "broker holds {} (high watermarks {:?})",
                e.values().sum::<i64>(),
                e.values().collect::<Vec<_>>()
            ),
            None => "broker's high watermarks unknown".to_owned(),
        };
        format!(
            "read {} messages in {:.1} s with {} consumer(s), {} re-read, {} errors gone \
             through; {ends}; read up to {:?}",
            self.seen.len(),
            self.elapsed.as_secs_f64(),
            1 + self.restarts.len(),
            self.reread,
            self.errors.values().sum::<usize>(),
            self.next.values().collect::<Vec<_>>(),
        )
    }

    /// Everything known about the read, for a report that falls short.
    #[must_use]
    pub fn diagnosis(&self) -> String {
        let mut out = self.summary();
        for (p, next, high) in self.short_of_end() {
            out.push_str(&format!(
                "\n  partition {p}: stopped at offset {next}, the broker's end is {high}"
            ));
        }
        if self.gaps() > 0 {
            out.push_str(&format!(
                "\n  {} offsets below the last one read were not read",
                self.gaps()
            ));
        }
        for r in &self.restarts {
            out.push_str(&format!("\n  fresh consumer: {r}"));
        }
        for (e, n) in &self.errors {
            out.push_str(&format!("\n  error x{n}: {e}"));
        }
        out
    }
}

/// Reads `topic` from offset 0 until at least `min` messages arrived and nothing new came for
/// `quiet`, or `timeout` passed. A read that falls short prints what got in its way.
/// [`read_topic`] from async code (on the blocking pool); panics when the read fails, as the
/// suites want.
///
/// # Panics
/// When the topic cannot be read or the blocking task fails.
pub async fn read_topic_async(
    bootstrap: &str,
    topic: &str,
    min: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Seen> {
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_topic(&b, &t, min, quiet, timeout))
        .await
        .expect("reader task")
        .expect("read the topic")
}

pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    min: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Seen>> {
    let deadline = Instant::now() + timeout;
    let read = read_topic_with(
        bootstrap,
        topic,
        min,
        ReadOptions::default(),
        |read, since_new| Instant::now() > deadline || (read >= min && since_new > quiet),
    )?;
    if read.seen.len() < min {
        eprintln!(
            "reader of {topic}: {} of {min}: {}",
            read.seen.len(),
            read.diagnosis()
        );
    }
    Ok(read.seen)
}

/// Reads `topic` from offset 0 until `done(messages read, time since the last new one)` says
/// so (the caller bounds the read with it), replacing a reader that makes no progress (see
/// [`STALL`]) as long as `done` does not hold.
pub fn read_topic_until(
    bootstrap: &str,
    topic: &str,
    done: impl FnMut(usize, Duration) -> bool,
) -> Result<Vec<Seen>> {
    Ok(read_topic_with(bootstrap, topic, usize::MAX, ReadOptions::default(), done)?.seen)
}

/// Reads `topic` from offset 0 (every partition assigned, committed data only) until
/// `done(messages read, time since the last new one)` says so; the caller bounds the read with
/// it. While fewer than `min` messages are in, a consumer that reads nothing new for
/// `options.stall` (twice as long after each fresh one that read nothing either, up to 8 times)
/// is dropped and a fresh one resumes after the last offset read on each partition (offset 0 on
/// the others), so a client stuck on a request the broker never answers in time does not end
/// the read with nothing. The errors the client reports on the way (and goes on through) are
/// kept, with the broker's high watermarks at the end, for the report; each (partition, offset)
/// counts once.
///
/// # Errors
/// When the first consumer cannot be built (no metadata for the topic within 30 s) or the
/// client reports an error other than a broker (re)starting, moving or timing out.
pub fn read_topic_with(
    bootstrap: &str,
    topic: &str,
    min: usize,
    options: ReadOptions,
    mut done: impl FnMut(usize, Duration) -> bool,
) -> Result<TopicRead> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as Code;
    let started = Instant::now();
    let mut read = TopicRead::default();
    let mut positions: HashSet<(i32, i64)> = HashSet::new();
    let mut consumer = Some(crate::kafka::reader_at(
        bootstrap,
        topic,
        &read.next,
        options.fetch_max_bytes,
        Duration::from_secs(30),
    )?);
    let mut last_new = Instant::now();
    // The last new message, or the last fresh consumer.
    let mut last_progress = Instant::now();
    // Doubled (up to 8 times `options.stall`) for each fresh consumer that reads nothing either:
    // a broker still busy with what the last one asked is given longer.
    let mut stall = options.stall;
    loop {
        if done(read.seen.len(), last_new.elapsed()) {
            break;
        }
        let stalled = read.seen.len() < min && last_progress.elapsed() > stall;
        if stalled || consumer.is_none() {
            if stalled {
                read.restarts.push(format!(
                    "at {:.1} s, nothing new for {:.1} s with {} read, resuming at {:?}",
                    started.elapsed().as_secs_f64(),
                    last_progress.elapsed().as_secs_f64(),
                    read.seen.len(),
                    read.next
                ));
                stall = (stall * 2).min(options.stall * 8);
            } else {
                // The last build failed: not in a tight loop.
                std::thread::sleep(Duration::from_secs(1));
            }
            // The old one goes first, with its connections and the request it waits on.
            consumer = None;
            match crate::kafka::reader_at(
                bootstrap,
                topic,
                &read.next,
                options.fetch_max_bytes,
                Duration::from_secs(5),
            ) {
                Ok(c) => consumer = Some(c),
                Err(e) => read.error(format!("building a fresh reader: {e:#}")),
            }
            last_progress = Instant::now();
            continue;
        }
        let Some(c) = consumer.as_ref() else {
            continue;
        };
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let (partition, offset) = (m.partition(), m.offset());
                if !positions.insert((partition, offset)) {
                    read.reread += 1;
                    continue;
                }
                let m = m.detach();
                read.seen.push(Seen {
                    event_id: header(&m, "ce_id").unwrap_or_default(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    partition,
                    offset,
                    payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                });
                let next = read.next.entry(partition).or_default();
                *next = (*next).max(offset + 1);
                last_new = Instant::now();
                last_progress = last_new;
                stall = options.stall;
            }
            // A broker that is (re)starting or slow: librdkafka reconnects and retries by
            // itself; a fresh consumer takes over if that goes nowhere.
            Some(Err(
                e @ KafkaError::MessageConsumption(
                    Code::AllBrokersDown
                    | Code::BrokerTransportFailure
                    | Code::UnknownTopicOrPartition
                    | Code::NotLeaderForPartition
                    | Code::LeaderNotAvailable
                    | Code::RequestTimedOut
                    | Code::OperationTimedOut,
                ),
            )) => read.error(e),
            Some(Err(e)) => {
                read.error(&e);
                read.elapsed = started.elapsed();
                bail!("consume {topic}: {e}; {}", read.diagnosis());
            }
            None => {}
        }
    }
    drop(consumer);
    match crate::kafka::high_watermarks(bootstrap, topic, Duration::from_secs(10)) {
        Ok(ends) => read.ends = Some(ends),
        Err(e) => read.error(format!("asking for the high watermarks: {e:#}")),
    }
    read.elapsed = started.elapsed();
    Ok(read)
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
