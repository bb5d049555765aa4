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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{kafka_settings, Error, Inbox};

mod config;
mod dead_letters;
mod handler;
mod rebalance;
mod retention;
mod worker;

pub use config::{ConsumerConfig, MessageId};
pub use handler::{batch_handler, BatchHandler, Handler, HandlerError, IncomingMessage};

use rebalance::{PartitionKey, RunnerContext, Shared};
use worker::Worker;

const TARGET: &str = "outbox::consumer";

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
        for (k, v) in kafka_settings::CONSUMER_DEFAULTS {
            c.set(*k, *v);
        }
        for (k, v) in &self.cfg.kafka {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.cfg.brokers)
            .set("group.id", &self.cfg.group_id);
        for e in kafka_settings::CONSUMER_ENFORCED {
            c.set(e.key, e.value);
        }
        c.set_log_level(RDKafkaLogLevel::Warning);
        c
    }

    /// Consumes until `shutdown`, then finishes the messages in hand, commits and returns.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the Kafka clients cannot be created or subscribed.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        let shared = Arc::new(Shared::default());
        let config = self.client_config();
        // librdkafka uses the cooperative protocol when every configured assignor is
        // cooperative (only `cooperative-sticky` is).
        let cooperative = config
            .get("partition.assignment.strategy")
            .is_some_and(|s| s.split(',').all(|a| a.trim() == "cooperative-sticky"));
        let consumer: Arc<StreamConsumer<RunnerContext>> = Arc::new(
            config
                .create_with_context(RunnerContext {
                    shared: Arc::clone(&shared),
                    cooperative,
                })
                .map_err(|source| Error::Kafka {
                    what: "consumer".into(),
                    source,
                })?,
        );
        let dlq_producer = dead_letters::producer(&self.cfg.brokers)?;
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|source| Error::Kafka {
            what: format!("subscribe {topics:?}"),
            source,
        })?;
        // Every task of the runner (partition workers, the purger): shutdown waits for all.
        let tasks = TaskTracker::new();
        if let Some((keep, every)) = self.cfg.retention {
            retention::spawn_purger(
                self.inbox.clone(),
                self.cfg.database_url.clone(),
                keep,
                every,
                shutdown.clone(),
                &tasks,
            );
        }
        let mut dispatch = Dispatch {
            workers: HashMap::new(),
            waiting: HashMap::new(),
            waiting_max: self
                .cfg
                .queue_per_partition
                .saturating_mul(WAITING_PER_QUEUE),
            workers_done: CancellationToken::new(),
            tasks,
            consumer: Arc::clone(&consumer),
            dlq_producer,
            shared: Arc::clone(&shared),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(target: TARGET, group = %self.cfg.group_id, topics = ?self.cfg.topics, "consumer runner started");
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                m = consumer.recv() => m,
                _ = tick.tick(), if !dispatch.waiting.is_empty() => {
                    dispatch.hand_over_waiting();
                    continue;
                }
            };
            match msg {
                Ok(m) => {
                    let (key, job) = self.job(&shared, &m);
                    dispatch.hand(self, key, job).await;
                }
                Err(e) => tracing::warn!(target: TARGET, error = %e, "consume error"),
            }
        }
        let tasks = dispatch.finish().await;
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(target: TARGET, error = %e, "final commit");
        }
        // The purger ends at shutdown (after its pass in progress, if any).
        tasks.close();
        tasks.wait().await;
        tracing::info!(target: TARGET, "consumer runner stopped");
        Ok(())
    }

    /// The message as its partition's worker takes it, tagged with the partition's current
    /// assignment (a job of an earlier assignment is dropped, not applied).
    fn job(&self, shared: &Shared, msg: &BorrowedMessage<'_>) -> (PartitionKey, Job) {
        let key = (msg.topic().to_owned(), msg.partition());
        let generation = shared
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .generation;
        let job = Job {
            message: self.incoming(msg),
            generation,
        };
        (key, job)
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
        consumer: Arc<StreamConsumer<RunnerContext>>,
        dlq: FutureProducer,
        shared: Arc<Shared>,
        stop: CancellationToken,
    ) -> Worker {
        Worker {
            key,
            url: self.cfg.database_url.clone(),
            inbox: self.inbox.clone(),
            handler: Arc::clone(&self.handler),
            max_attempts: self.cfg.max_attempts,
            retry_initial: self.cfg.retry_initial,
            retry_max: self.cfg.retry_max,
            dlq_topic: self.cfg.dlq(),
            consumer_name: self.inbox.consumer().to_owned(),
            stats: Arc::clone(&self.stats),
            consumer,
            dlq,
            shared,
            stop,
        }
    }
}

/// The dispatch loop's state: one worker per partition (its queue and task), and the messages
/// of partitions whose queue is full, in order, handed over as room frees up (see
/// `queue_per_partition`). Not paused in the client: a pause drops what the client fetched
/// ahead, and the resume that follows was seen to skip those messages (librdkafka 2.12 with
/// this stream consumer), which the offsets stored after them would then lose.
struct Dispatch {
    workers: HashMap<PartitionKey, (mpsc::Sender<Job>, tokio::task::JoinHandle<()>)>,
    waiting: HashMap<PartitionKey, std::collections::VecDeque<Job>>,
    waiting_max: usize,
    workers_done: CancellationToken,
    /// Every task of the runner (partition workers, the purger): shutdown waits for all.
    tasks: TaskTracker,
    consumer: Arc<StreamConsumer<RunnerContext>>,
    dlq_producer: FutureProducer,
    shared: Arc<Shared>,
}

impl Dispatch {
    /// Hands `job` to its partition's worker (started if it has none, or its last one ended),
    /// behind the partition's messages already waiting. Never waits for a worker, except for
    /// one far behind (then memory is bounded by waiting here).
    async fn hand(&mut self, runner: &ConsumerRunner, key: PartitionKey, job: Job) {
        let alive = self
            .workers
            .get(&key)
            .is_some_and(|(tx, h)| !tx.is_closed() && !h.is_finished());
        if !alive {
            let (tx, rx) = mpsc::channel(runner.cfg.queue_per_partition);
            let worker = runner.worker(
                key.clone(),
                Arc::clone(&self.consumer),
                self.dlq_producer.clone(),
                Arc::clone(&self.shared),
                self.workers_done.clone(),
            );
            let handle = self.tasks.spawn(worker.run(rx));
            self.workers.insert(key.clone(), (tx, handle));
        }
        let Some((tx, _)) = self.workers.get(&key) else {
            return;
        };
        if let Some(queue) = self.waiting.get_mut(&key) {
            if queue.len() < self.waiting_max {
                // Behind the partition's earlier messages.
                queue.push_back(job);
                return;
            }
            // Far behind (`queue_per_partition` x WAITING_PER_QUEUE messages): memory is
            // bounded by waiting here, which holds every partition up (as a slow partition
            // did in earlier releases) until this one's worker takes its queue.
            tracing::warn!(target: TARGET, topic = %key.0, partition = key.1, waiting = queue.len(), "a partition's worker is far behind: waiting for it");
            let tx = tx.clone();
            let mut queue = self.waiting.remove(&key).unwrap_or_default();
            queue.push_back(job);
            for job in queue {
                if tx.send(job).await.is_err() {
                    break;
                }
            }
            return;
        }
        match tx.try_send(job) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                // Never wait here: every other partition would wait too, and a consumer
                // that stops polling is evicted from the group.
                tracing::debug!(target: TARGET, topic = %key.0, partition = key.1, "a partition's worker is behind: buffering its messages");
                self.waiting.entry(key).or_default().push_back(job);
            }
        }
    }

    /// Hands waiting messages to their workers as far as their queues have room (dropping
    /// those of an assignment revoked since: Kafka delivers them again to whoever owns the
    /// partition now).
    fn hand_over_waiting(&mut self) {
        let (workers, shared) = (&self.workers, &self.shared);
        self.waiting.retain(|key, queue| {
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

    /// Shutdown: workers finish the message in hand (queued ones are left for redelivery) and
    /// end. Returns the tracker, still holding the purger: the final offset commit comes
    /// first, so a purge pass in progress cannot hold it up.
    async fn finish(mut self) -> TaskTracker {
        self.workers_done.cancel();
        for (_, (tx, handle)) in self.workers.drain() {
            drop(tx);
            let _ = handle.await;
        }
        self.tasks
    }
}
