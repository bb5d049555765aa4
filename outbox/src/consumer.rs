//! The consumer runner (feature `kafka`): Kafka messages applied once through the inbox.
//!
//! For each message: one transaction records `(consumer, message id)` in the inbox and, when it
//! is new, runs the handler's business change (and any outbox events it enqueues); then, and only
//! then, the offset is stored. Offsets are committed every second and synchronously when
//! partitions are revoked or the runner stops. Messages of one partition are handled in order,
//! partitions in parallel (one worker and one database connection per assigned partition).
//!
//! Batching: when several messages of a partition are already waiting, up to 1,024 of them are
//! applied in ONE transaction, their inbox rows recorded by one statement
//! ([`Inbox::record_batch`]), so a backlog costs one commit and one dedup statement per batch
//! instead of per message; the handler gets the batch's new messages at once through
//! [`Handler::handle_batch`] (by default one [`Handler::handle`] call each; a handler built with
//! [`batch_handler`] makes the business write of the whole batch one statement too). Any
//! failure in a batch rolls the whole batch back and
//! the runner applies those messages one by one, with the per-message retries and dead letters
//! below; so batching never changes what is applied, only how many commits it takes.
//!
//! Handler errors: [`HandlerError::Transient`] is retried with exponential backoff (the message
//! stays in hand, so its partition waits and order is kept); after `max_attempts`, or at once for
//! [`HandlerError::Permanent`], the message goes to the dead-letter topic with headers saying why,
//! and the partition moves on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backoff::backoff::Backoff;
use diesel::PgConnection;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Error, Inbox, MessageRef, Processed, Traceparent};

const TARGET: &str = "outbox::consumer";

/// A message handed to a [`Handler`].
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    /// The message id used for deduplication.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Payload bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl IncomingMessage {
    /// A header as UTF-8 text.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// `ce_type`.
    #[must_use]
    pub fn event_type(&self) -> Option<&str> {
        self.header("ce_type")
    }

    /// The key as UTF-8 text.
    #[must_use]
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The writer's trace context.
    #[must_use]
    pub fn traceparent(&self) -> Option<Traceparent> {
        self.header("traceparent")?.parse().ok()
    }

    /// The payload as JSON.
    ///
    /// # Errors
    /// [`HandlerError::Permanent`]: a payload that does not parse never will.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.payload.as_deref().unwrap_or_default())
            .map_err(|e| HandlerError::Permanent(format!("payload is not the expected JSON: {e}")))
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// May succeed if tried again (a lock timeout, a serialization failure, a lost connection).
    #[error("transient: {0}")]
    Transient(String),
    /// Will fail every time (bad payload, violated business rule): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<diesel::result::Error> for HandlerError {
    fn from(e: diesel::result::Error) -> Self {
        if crate::is_retriable_db(&e) {
            HandlerError::Transient(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        if e.is_retriable() {
            HandlerError::Transient(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

/// Applies one message inside the inbox transaction. Use `conn` for every change (and for
/// [`crate::enqueue`] to publish replies in the same transaction).
///
/// A closure `Fn(&mut PgConnection, &IncomingMessage) -> Result<(), HandlerError>` is a handler.
/// For a backlog, implement [`Handler::handle_batch`] as well (or wrap a batch function with
/// [`batch_handler`]) so the business write of a whole batch is one statement.
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`.
    ///
    /// # Errors
    /// See [`HandlerError`].
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError>;

    /// Handles several NEW messages of one partition, in offset order, inside one transaction
    /// that also records their inbox rows (duplicates are already filtered out). The default
    /// calls [`Handler::handle`] for each, each in its `consume` span.
    ///
    /// An error rolls the whole batch back (inbox rows included); the runner then applies the
    /// messages one at a time through [`Handler::handle`], with the usual retries and dead
    /// letters, so one bad message cannot hold the others back. An override must therefore have
    /// the same effect as calling `handle` on each message in turn.
    ///
    /// # Errors
    /// See [`HandlerError`].
    fn handle_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[&IncomingMessage],
    ) -> Result<(), HandlerError> {
        for m in messages {
            let span = consume_span(m);
            let _entered = span.enter();
            self.handle(conn, m)?;
        }
        Ok(())
    }
}

/// A [`Handler`] from a batch function: `f` receives every new message of a batch at once (one
/// message when the runner applies messages one at a time, after a batch failed).
///
/// ```no_run
/// use diesel::PgConnection;
/// use outbox::consumer::{batch_handler, HandlerError, IncomingMessage};
///
/// let handler = batch_handler(|conn: &mut PgConnection, messages: &[&IncomingMessage]| {
///     let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
///     // one INSERT ... SELECT unnest($1::text[]) for the whole batch
///     # let _ = (conn, ids);
///     Ok::<_, HandlerError>(())
/// });
/// ```
pub fn batch_handler<F>(f: F) -> BatchHandler<F>
where
    F: Fn(&mut PgConnection, &[&IncomingMessage]) -> Result<(), HandlerError>
        + Send
        + Sync
        + 'static,
{
    BatchHandler(f)
}

/// See [`batch_handler`].
#[derive(Debug, Clone)]
pub struct BatchHandler<F>(F);

impl<F> Handler for BatchHandler<F>
where
    F: Fn(&mut PgConnection, &[&IncomingMessage]) -> Result<(), HandlerError>
        + Send
        + Sync
        + 'static,
{
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        (self.0)(conn, &[message])
    }

    fn handle_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[&IncomingMessage],
    ) -> Result<(), HandlerError> {
        let span = tracing::info_span!(
            target: TARGET,
            "consume_batch",
            topic = messages.first().map(|m| m.topic.as_str()).unwrap_or_default(),
            partition = messages.first().map_or(-1, |m| m.partition),
            first_offset = messages.first().map_or(-1, |m| m.offset),
            last_offset = messages.last().map_or(-1, |m| m.offset),
            messages = messages.len(),
        );
        let _entered = span.enter();
        (self.0)(conn, messages)
    }
}

impl<F> Handler for F
where
    F: Fn(&mut PgConnection, &IncomingMessage) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        self(conn, message)
    }
}

/// Where the deduplication id of a message comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageId {
    /// A header (default: `ce_id`, set by `outbox-relay`). A message without it is
    /// dead-lettered.
    Header(String),
    /// `topic/partition/offset`: dedups redeliveries of the same record, not producer duplicates.
    TopicPartitionOffset,
}

/// Configuration of a [`ConsumerRunner`]. Build with [`ConsumerConfig::new`] and the setters.
#[derive(Clone)]
pub struct ConsumerConfig {
    brokers: String,
    group_id: String,
    topics: Vec<String>,
    database_url: String,
    inbox: Option<Inbox>,
    dead_letter_topic: Option<String>,
    message_id: MessageId,
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    queue_per_partition: usize,
    retention: Option<(Duration, Duration)>,
    kafka: BTreeMap<String, String>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("database_url", &"***")
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
        for (k, v) in &self.kafka {
            let v = v.trim().to_ascii_lowercase();
            let refuse = |why: &str| bad(format!("kafka option {k} is refused: {why}"));
            match k.as_str() {
                "enable.auto.offset.store" if v != "false" => {
                    return refuse("offsets must be stored only after the database commit, or a crash loses the message");
                }
                "isolation.level" if v != "read_committed" => {
                    return refuse("read_uncommitted would apply messages of aborted transactions");
                }
                "group.id" | "bootstrap.servers" => {
                    return refuse("set it through the typed configuration");
                }
                "enable.ssl.certificate.verification" if v == "false" => {
                    return refuse("certificate verification must stay on");
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn dlq(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.group_id))
    }
}

type PartitionKey = (String, i32);

#[derive(Default)]
struct PartitionState {
    /// Bumped on every assignment and revocation; a worker stops when it changes.
    generation: u64,
    /// A worker is applying a message right now.
    busy: bool,
}

#[derive(Default)]
struct Shared {
    partitions: Mutex<HashMap<PartitionKey, PartitionState>>,
    idle: Condvar,
}

/// Commits stored offsets when partitions are revoked, after their in-hand messages finished.
struct RunnerContext {
    shared: Arc<Shared>,
}

impl RunnerContext {
    /// Stops the workers of `revoked` after their message in hand, waits for it (at most
    /// 30 s), and commits the stored offsets.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[PartitionKey]) {
        let mut parts = self
            .shared
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in revoked {
            if let Some(s) = parts.get_mut(p) {
                s.generation += 1;
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while revoked.iter().any(|p| parts.get(p).is_some_and(|s| s.busy))
            && std::time::Instant::now() < deadline
        {
            parts = self
                .shared
                .idle
                .wait_timeout(parts, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(parts);
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(target: TARGET, error = %e, "commit on revocation");
        }
        tracing::info!(target: TARGET, partitions = revoked.len(), "partitions revoked; offsets committed");
    }
}

impl ClientContext for RunnerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            tracing::warn!(target: "outbox::consumer::kafka", facility = fac, "{message}");
        }
    }
}

impl ConsumerContext for RunnerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<PartitionKey> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            // Stop the workers of revoked partitions after the message in hand, and wait for it.
            // This runs inside the consumer's poll, on a runtime thread: tell a multi-threaded
            // runtime so its other tasks (the workers finishing those messages among them) move
            // to other threads meanwhile.
            match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| self.revoke(consumer, &revoked));
                }
                _ => self.revoke(consumer, &revoked),
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut parts = self
                .shared
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for e in tpl.elements() {
                parts
                    .entry((e.topic().to_owned(), e.partition()))
                    .or_default()
                    .generation += 1;
            }
            tracing::info!(target: TARGET, partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// Counters of a runner (for reports and health endpoints).
#[derive(Debug, Default)]
pub struct RunnerStats {
    applied: std::sync::atomic::AtomicU64,
    duplicates: std::sync::atomic::AtomicU64,
    dead_lettered: std::sync::atomic::AtomicU64,
}

impl RunnerStats {
    /// Messages whose effect was applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Redelivered messages the inbox skipped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Messages sent to the dead-letter topic.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs a [`Handler`] over a consumer group; see the [module docs](self).
pub struct ConsumerRunner {
    cfg: ConsumerConfig,
    inbox: Inbox,
    handler: Arc<dyn Handler>,
    stats: Arc<RunnerStats>,
}

impl std::fmt::Debug for ConsumerRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRunner")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A partition's messages buffered beyond its queue, in queues' worth, before the dispatch
/// waits for its worker (memory bound).
const WAITING_PER_QUEUE: usize = 10;

/// Most messages of one partition applied in one transaction.
const BATCH_MAX: usize = 1024;

struct Job {
    message: IncomingMessage,
    generation: u64,
}

impl ConsumerRunner {
    /// A runner for `cfg` and `handler`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an invalid or unsafe configuration.
    pub fn new(cfg: ConsumerConfig, handler: impl Handler) -> Result<Self, Error> {
        cfg.validate()?;
        let inbox = match &cfg.inbox {
            Some(i) => i.clone(),
            None => Inbox::new(cfg.group_id.clone())?,
        };
        Ok(Self {
            cfg,
            inbox,
            handler: Arc::new(handler),
            stats: Arc::default(),
        })
    }

    /// The runner's counters.
    #[must_use]
    pub fn stats(&self) -> Arc<RunnerStats> {
        Arc::clone(&self.stats)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("isolation.level", "read_committed")
            .set("partition.assignment.strategy", "cooperative-sticky");
        for (k, v) in &self.cfg.kafka {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.cfg.brokers)
            .set("group.id", &self.cfg.group_id)
            .set("enable.auto.offset.store", "false");
        c.set_log_level(RDKafkaLogLevel::Warning);
        c
    }

    /// Consumes until `shutdown`, then finishes the messages in hand, commits and returns.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the Kafka clients cannot be created or subscribed.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        let shared = Arc::new(Shared::default());
        let consumer: Arc<StreamConsumer<RunnerContext>> = Arc::new(
            self.client_config()
                .create_with_context(RunnerContext {
                    shared: Arc::clone(&shared),
                })
                .map_err(|e| Error::InvalidConfig(format!("kafka consumer: {e}")))?,
        );
        let dlq_producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(|e| Error::InvalidConfig(format!("kafka dead-letter producer: {e}")))?;
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::InvalidConfig(format!("subscribe {topics:?}: {e}")))?;
        let purger = self.cfg.retention.map(|(keep, every)| {
            spawn_purger(
                self.inbox.clone(),
                self.cfg.database_url.clone(),
                keep,
                every,
                shutdown.clone(),
            )
        });
        let workers_done = CancellationToken::new();
        let mut workers: HashMap<PartitionKey, (mpsc::Sender<Job>, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        // Messages of partitions whose worker queue is full, in order, handed over as room
        // frees up (see `queue_per_partition`). Not paused in the client: a pause drops what
        // the client fetched ahead, and the resume that follows was seen to skip those
        // messages (librdkafka 2.12 with this stream consumer), which the offsets stored after
        // them would then lose.
        let mut waiting: HashMap<PartitionKey, std::collections::VecDeque<Job>> = HashMap::new();
        let waiting_max = self
            .cfg
            .queue_per_partition
            .saturating_mul(WAITING_PER_QUEUE);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(target: TARGET, group = %self.cfg.group_id, topics = ?self.cfg.topics, "consumer runner started");
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                m = consumer.recv() => m,
                _ = tick.tick(), if !waiting.is_empty() => {
                    hand_over_waiting(&mut waiting, &workers, &shared);
                    continue;
                }
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(target: TARGET, error = %e, "consume error");
                    continue;
                }
            };
            let key = (msg.topic().to_owned(), msg.partition());
            let generation = shared
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(key.clone())
                .or_default()
                .generation;
            let job = Job {
                message: self.incoming(&msg),
                generation,
            };
            let alive = workers
                .get(&key)
                .is_some_and(|(tx, h)| !tx.is_closed() && !h.is_finished());
            if !alive {
                let (tx, rx) = mpsc::channel(self.cfg.queue_per_partition);
                let handle = tokio::spawn(self.worker(
                    key.clone(),
                    rx,
                    Arc::clone(&consumer),
                    dlq_producer.clone(),
                    Arc::clone(&shared),
                    workers_done.clone(),
                ));
                workers.insert(key.clone(), (tx, handle));
            }
            let Some((tx, _)) = workers.get(&key) else {
                continue;
            };
            if let Some(queue) = waiting.get_mut(&key) {
                if queue.len() < waiting_max {
                    // Behind the partition's earlier messages.
                    queue.push_back(job);
                    continue;
                }
                // Far behind (`queue_per_partition` x WAITING_PER_QUEUE messages): memory is
                // bounded by waiting here, which holds every partition up (as a slow partition
                // did in earlier releases) until this one's worker takes its queue.
                tracing::warn!(target: TARGET, topic = %key.0, partition = key.1, waiting = queue.len(), "a partition's worker is far behind: waiting for it");
                let tx = tx.clone();
                let mut queue = waiting.remove(&key).unwrap_or_default();
                queue.push_back(job);
                for job in queue {
                    if tx.send(job).await.is_err() {
                        break;
                    }
                }
                continue;
            }
            match tx.try_send(job) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    // Never wait here: every other partition would wait too, and a consumer
                    // that stops polling is evicted from the group.
                    tracing::debug!(target: TARGET, topic = %key.0, partition = key.1, "a partition's worker is behind: buffering its messages");
                    waiting.entry(key).or_default().push_back(job);
                }
            }
        }
        // Shutdown: workers finish the message in hand (queued ones are left for redelivery).
        workers_done.cancel();
        for (_, (tx, handle)) in workers.drain() {
            drop(tx);
            let _ = handle.await;
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(target: TARGET, error = %e, "final commit");
        }
        if let Some(p) = purger {
            let _ = p.await;
        }
        tracing::info!(target: TARGET, "consumer runner stopped");
        Ok(())
    }

    fn incoming(&self, msg: &BorrowedMessage<'_>) -> IncomingMessage {
        let headers: Vec<(String, Vec<u8>)> = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let message_id = match &self.cfg.message_id {
            MessageId::Header(name) => headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
                .unwrap_or_default(),
            MessageId::TopicPartitionOffset => {
                format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset())
            }
        };
        IncomingMessage {
            message_id,
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    fn worker(
        &self,
        key: PartitionKey,
        mut rx: mpsc::Receiver<Job>,
        consumer: Arc<StreamConsumer<RunnerContext>>,
        dlq: FutureProducer,
        shared: Arc<Shared>,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (url, inbox, handler) = (
            self.cfg.database_url.clone(),
            self.inbox.clone(),
            Arc::clone(&self.handler),
        );
        let (max_attempts, initial, max) = (
            self.cfg.max_attempts,
            self.cfg.retry_initial,
            self.cfg.retry_max,
        );
        let (dlq_topic, consumer_name) = (self.cfg.dlq(), self.inbox.consumer().to_owned());
        let stats = Arc::clone(&self.stats);
        async move {
            let mut conn: Option<PgConnection> = None;
            loop {
                let first = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    j = rx.recv() => match j { Some(j) => j, None => break },
                };
                // Whatever else of this partition is already queued goes into the same
                // transaction: one commit (one WAL flush) for the lot.
                let mut jobs = vec![first];
                while jobs.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                // Claim the partition for these messages unless it was revoked since dispatch.
                {
                    let mut parts = shared
                        .partitions
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let state = parts.entry(key.clone()).or_default();
                    jobs.retain(|j| j.generation == state.generation);
                    if jobs.is_empty() {
                        continue;
                    }
                    state.busy = true;
                }
                let mut messages: Vec<Arc<IncomingMessage>> =
                    jobs.into_iter().map(|j| Arc::new(j.message)).collect();
                if messages.len() > 1 {
                    let (ms, i, h, u) = (
                        messages.clone(),
                        inbox.clone(),
                        Arc::clone(&handler),
                        url.clone(),
                    );
                    let c = conn.take();
                    let (c, r) =
                        tokio::task::spawn_blocking(move || apply_batch(c, &u, &i, &*h, &ms))
                            .await
                            .unwrap_or_else(|e| {
                                (
                                    None,
                                    Err(HandlerError::Transient(format!("handler panicked: {e}"))),
                                )
                            });
                    conn = c;
                    match r {
                        Ok(applied) => {
                            for (message, applied) in messages.iter().zip(applied) {
                                if applied {
                                    RunnerStats::bump(&stats.applied);
                                } else {
                                    RunnerStats::bump(&stats.duplicates);
                                    tracing::debug!(target: TARGET, message_id = %message.message_id, "duplicate skipped");
                                }
                                if let Err(e) = consumer.store_offset(
                                    &message.topic,
                                    message.partition,
                                    message.offset,
                                ) {
                                    tracing::debug!(target: TARGET, error = %e, "store offset (partition revoked?)");
                                }
                            }
                            messages.clear();
                        }
                        Err(e) => {
                            // Nothing of the batch was committed: go through it one message
                            // at a time, with retries and dead letters, as usual.
                            tracing::debug!(target: TARGET, error = %e, batch = messages.len(), "batch failed; applying one by one");
                        }
                    }
                }
                let mut stopped = false;
                for message in messages {
                    let mut backoff = backoff::ExponentialBackoff {
                        initial_interval: initial,
                        max_interval: max,
                        max_elapsed_time: None,
                        ..backoff::ExponentialBackoff::default()
                    };
                    let mut attempt = 0_u32;
                    let outcome = loop {
                        attempt += 1;
                        let (m, i, h, u) = (
                            Arc::clone(&message),
                            inbox.clone(),
                            Arc::clone(&handler),
                            url.clone(),
                        );
                        let c = conn.take();
                        let (c, r) = tokio::task::spawn_blocking(move || apply(c, &u, &i, &*h, &m))
                            .await
                            .unwrap_or_else(|e| {
                                (
                                    None,
                                    Err(HandlerError::Transient(format!("handler panicked: {e}"))),
                                )
                            });
                        conn = c;
                        match r {
                            Ok(applied) => break Ok(applied),
                            Err(HandlerError::Transient(e))
                                if attempt < max_attempts && !stop.is_cancelled() =>
                            {
                                let wait = backoff.next_backoff().unwrap_or(max);
                                tracing::warn!(target: TARGET, topic = %message.topic, partition = message.partition, offset = message.offset, attempt, error = %e, "handler failed; retrying");
                                tokio::time::sleep(wait).await;
                            }
                            Err(e) => break Err((e, attempt)),
                        }
                    };
                    let done = match outcome {
                        Ok(true) => {
                            RunnerStats::bump(&stats.applied);
                            true
                        }
                        Ok(false) => {
                            RunnerStats::bump(&stats.duplicates);
                            tracing::debug!(target: TARGET, message_id = %message.message_id, "duplicate skipped");
                            true
                        }
                        Err((HandlerError::Transient(_), _)) if stop.is_cancelled() => false,
                        Err((e, attempts)) => {
                            let written = dead_letter(
                                &dlq,
                                &dlq_topic,
                                &consumer_name,
                                &message,
                                &e,
                                attempts,
                                &stop,
                            )
                            .await;
                            if written {
                                RunnerStats::bump(&stats.dead_lettered);
                            }
                            written
                        }
                    };
                    if !done {
                        // Neither applied nor dead-lettered (shutdown came during its retries
                        // or while its dead letter could not be written): no later message of
                        // the partition may be applied or stored, or the committed offset
                        // would pass this one and it would never be delivered again.
                        tracing::info!(target: TARGET, topic = %message.topic, partition = message.partition, offset = message.offset, "stopping: message left for redelivery");
                        stopped = true;
                        break;
                    }
                    if let Err(e) =
                        consumer.store_offset(&message.topic, message.partition, message.offset)
                    {
                        tracing::debug!(target: TARGET, error = %e, "store offset (partition revoked?)");
                    }
                }
                {
                    let mut parts = shared
                        .partitions
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(s) = parts.get_mut(&key) {
                        s.busy = false;
                    }
                }
                shared.idle.notify_all();
                if stopped {
                    break;
                }
            }
        }
    }
}

/// Moves waiting messages to their workers' queues as room frees up. Messages of a partition
/// revoked since are dropped (Kafka delivers them again to whoever owns the partition now).
fn hand_over_waiting(
    waiting: &mut HashMap<PartitionKey, std::collections::VecDeque<Job>>,
    workers: &HashMap<PartitionKey, (mpsc::Sender<Job>, tokio::task::JoinHandle<()>)>,
    shared: &Shared,
) {
    waiting.retain(|key, queue| {
        let generation = shared
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .map(|s| s.generation);
        queue.retain(|j| Some(j.generation) == generation);
        let Some((tx, _)) = workers.get(key) else {
            return false;
        };
        while let Some(job) = queue.pop_front() {
            match tx.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    queue.push_front(job);
                    return true;
                }
                // The worker ended (shutdown): nothing more to hand over.
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        false
    });
}

/// Purges old inbox rows every `every` until `shutdown`.
fn spawn_purger(
    inbox: Inbox,
    url: String,
    keep: Duration,
    every: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let (inbox, url) = (inbox.clone(), url.clone());
            let r = tokio::task::spawn_blocking(move || {
                use diesel::Connection;
                let mut conn = PgConnection::establish(&url)
                    .map_err(|e| Error::InvalidConfig(scrub(&e.to_string(), &url)))?;
                inbox.purge(&mut conn, keep, 10_000)
            })
            .await;
            match r {
                Ok(Ok(n)) => tracing::info!(target: TARGET, purged = n, "inbox retention"),
                Ok(Err(e)) => tracing::warn!(target: TARGET, error = %e, "inbox retention failed"),
                Err(e) => tracing::warn!(target: TARGET, error = %e, "inbox retention task failed"),
            }
        }
    })
}

/// The worker's connection, or a new one (a failure to connect is transient, URL scrubbed).
fn reuse_or_connect(conn: Option<PgConnection>, url: &str) -> Result<PgConnection, HandlerError> {
    use diesel::Connection;
    match conn {
        Some(c) => Ok(c),
        None => PgConnection::establish(url).map_err(|e| {
            HandlerError::Transient(format!(
                "connect to the database: {}",
                scrub(&e.to_string(), url)
            ))
        }),
    }
}

/// One attempt: the inbox transaction. Returns whether the handler ran (false: duplicate).
fn apply(
    conn: Option<PgConnection>,
    url: &str,
    inbox: &Inbox,
    handler: &dyn Handler,
    message: &IncomingMessage,
) -> (Option<PgConnection>, Result<bool, HandlerError>) {
    let mut conn = match reuse_or_connect(conn, url) {
        Ok(c) => c,
        Err(e) => return (None, Err(e)),
    };
    if message.message_id.is_empty() {
        return (
            Some(conn),
            Err(HandlerError::Permanent(
                "the message has no id (ce_id header) to deduplicate on".into(),
            )),
        );
    }
    let r = process_in_span(&mut conn, inbox, handler, message);
    let keep = !matches!(&r, Err(HandlerError::Transient(_)));
    (keep.then_some(conn), r)
}

/// The inbox row and the handler's effect of one message, in the message's `consume` span
/// (whose parent is the writer's trace when the message carries `traceparent`).
fn process_in_span(
    conn: &mut PgConnection,
    inbox: &Inbox,
    handler: &dyn Handler,
    message: &IncomingMessage,
) -> Result<bool, HandlerError> {
    let span = consume_span(message);
    let _entered = span.enter();
    let msg_ref =
        MessageRef::id(&message.message_id).at(&message.topic, message.partition, message.offset);
    inbox
        .process::<(), HandlerError, _>(conn, &msg_ref, |c| handler.handle(c, message))
        .map(|p| matches!(p, Processed::Applied(())))
}

/// The span a message is handled in.
fn consume_span(message: &IncomingMessage) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "consume",
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        message_id = %message.message_id,
        traceparent = message.header("traceparent").unwrap_or_default(),
    )
}

/// Several messages of one partition in ONE transaction: one statement records all their inbox
/// rows, then [`Handler::handle_batch`] gets the messages that were new. Any error rolls the whole batch
/// back; the caller then applies the messages one by one, so a failing message is retried or
/// dead-lettered on its own.
fn apply_batch(
    conn: Option<PgConnection>,
    url: &str,
    inbox: &Inbox,
    handler: &dyn Handler,
    messages: &[Arc<IncomingMessage>],
) -> (Option<PgConnection>, Result<Vec<bool>, HandlerError>) {
    let mut conn = match reuse_or_connect(conn, url) {
        Ok(c) => c,
        Err(e) => return (None, Err(e)),
    };
    if messages.iter().any(|m| m.message_id.is_empty()) {
        return (
            Some(conn),
            Err(HandlerError::Permanent("a message without an id".into())),
        );
    }
    let r = diesel::Connection::transaction::<_, HandlerError, _>(&mut conn, |c| {
        let refs: Vec<MessageRef<'_>> = messages
            .iter()
            .map(|m| MessageRef::id(&m.message_id).at(&m.topic, m.partition, m.offset))
            .collect();
        let new = inbox.record_batch(c, &refs)?;
        let fresh: Vec<&IncomingMessage> = messages
            .iter()
            .zip(&new)
            .filter(|(_, &new)| new)
            .map(|(m, _)| &**m)
            .collect();
        if !fresh.is_empty() {
            handler.handle_batch(c, &fresh)?;
        }
        Ok(new)
    });
    let keep = !matches!(&r, Err(HandlerError::Transient(_)));
    (keep.then_some(conn), r)
}

fn scrub(text: &str, url: &str) -> String {
    match url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
    {
        Some((creds, _)) => match creds.split_once(':') {
            Some((_, pw)) if !pw.is_empty() => text.replace(pw, "***"),
            _ => text.to_owned(),
        },
        None => text.to_owned(),
    }
}

/// Publishes `message` to the dead-letter topic with the reason; retries until it is written or
/// the runner stops. Returns whether it was written.
async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    consumer: &str,
    message: &IncomingMessage,
    error: &HandlerError,
    attempts: u32,
    stop: &CancellationToken,
) -> bool {
    let (kind, reason) = match error {
        HandlerError::Transient(r) => ("transient", r.as_str()),
        HandlerError::Permanent(r) => ("permanent", r.as_str()),
    };
    let attempts = attempts.to_string();
    let partition = message.partition.to_string();
    let offset = message.offset.to_string();
    let mut delay = Duration::from_millis(100);
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 7);
        for (k, v) in &message.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (k, v) in [
            ("dlq_reason", reason),
            ("dlq_error_kind", kind),
            ("dlq_consumer", consumer),
            ("dlq_attempts", attempts.as_str()),
            ("dlq_original_topic", message.topic.as_str()),
            ("dlq_original_partition", partition.as_str()),
            ("dlq_original_offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = &message.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &message.payload {
            record = record.payload(p.as_slice());
        }
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => {
                tracing::warn!(target: TARGET, topic = %message.topic, partition = message.partition, offset = message.offset, dlq = topic, reason, "message dead-lettered");
                return true;
            }
            Err((e, _)) => {
                tracing::error!(target: TARGET, error = %e, dlq = topic, "cannot write to the dead-letter topic; retrying");
                if stop.is_cancelled() {
                    return false;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
