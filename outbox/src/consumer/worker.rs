//! A partition's worker: takes the partition's queued messages, applies them through the inbox
//! (as one batch when several wait, then one by one with retries), dead-letters what the
//! handler gives up on, and stores each offset after its message is settled.

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use diesel::PgConnection;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::rebalance::{PartitionKey, RunnerContext, Shared};
use super::{dead_letters, handler::consume_span, Handler, HandlerError, IncomingMessage};
use super::{Job, RunnerStats, BATCH_MAX, TARGET};
use crate::{Inbox, MessageRef, Processed};

/// Everything one partition's worker needs (its database connection is kept apart, in
/// [`Worker::run`]: a connection is not `Sync`, and the worker is shared across its awaits).
pub(super) struct Worker {
    pub(super) key: PartitionKey,
    pub(super) url: String,
    pub(super) inbox: Inbox,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) max_attempts: u32,
    pub(super) retry_initial: Duration,
    pub(super) retry_max: Duration,
    pub(super) dlq_topic: String,
    pub(super) consumer_name: String,
    pub(super) stats: Arc<RunnerStats>,
    pub(super) consumer: Arc<StreamConsumer<RunnerContext>>,
    pub(super) dlq: FutureProducer,
    pub(super) shared: Arc<Shared>,
    pub(super) stop: CancellationToken,
}

/// How one message's attempts ended: applied (`true`) or a duplicate (`false`), or the last
/// error and the number of attempts made.
type Outcome = Result<bool, (HandlerError, u32)>;

impl Worker {
    /// Applies the partition's messages until `stop`, the end of the queue, or a message that
    /// could be neither applied nor dead-lettered.
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut conn: Option<PgConnection> = None;
        while let Some(jobs) = self.next_jobs(&mut rx).await {
            let Some(mut messages) = self.claim(jobs) else {
                continue;
            };
            if messages.len() > 1 {
                self.apply_as_batch(&mut conn, &mut messages).await;
            }
            let stopped = self.apply_one_by_one(&mut conn, &messages).await;
            self.release();
            if stopped {
                break;
            }
        }
    }

    /// The next message and whatever else of this partition is already queued (at most
    /// [`BATCH_MAX`]), to go into the same transaction: one commit (one WAL flush) for the
    /// lot. `None`: stop.
    async fn next_jobs(&self, rx: &mut mpsc::Receiver<Job>) -> Option<Vec<Job>> {
        let first = tokio::select! {
            biased;
            () = self.stop.cancelled() => return None,
            j = rx.recv() => j?,
        };
        let mut jobs = vec![first];
        while jobs.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        Some(jobs)
    }

    /// Claims the partition for these messages (marks it busy) unless it was revoked since
    /// dispatch; drops the messages of an earlier assignment. `None`: nothing left.
    fn claim(&self, mut jobs: Vec<Job>) -> Option<Vec<Arc<IncomingMessage>>> {
        let mut parts = self
            .shared
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = parts.entry(self.key.clone()).or_default();
        jobs.retain(|j| j.generation == state.generation);
        if jobs.is_empty() {
            return None;
        }
        state.busy = true;
        Some(jobs.into_iter().map(|j| Arc::new(j.message)).collect())
    }

    /// Releases the claim and wakes a revocation waiting for it.
    fn release(&self) {
        {
            let mut parts = self
                .shared
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(s) = parts.get_mut(&self.key) {
                s.busy = false;
            }
        }
        self.shared.idle.notify_all();
    }

    /// Applies `messages` in ONE transaction. When it commits, their offsets are stored and
    /// `messages` is emptied; when it fails, nothing of it was committed and `messages` stays
    /// for [`Worker::apply_one_by_one`].
    async fn apply_as_batch(
        &self,
        conn: &mut Option<PgConnection>,
        messages: &mut Vec<Arc<IncomingMessage>>,
    ) {
        let (ms, i, h, u) = (
            messages.clone(),
            self.inbox.clone(),
            Arc::clone(&self.handler),
            self.url.clone(),
        );
        let r = crate::blocking::with_connection(conn, move |c| apply_batch(c, &u, &i, &*h, &ms))
            .await
            .unwrap_or_else(|e| Err(HandlerError::Transient(format!("handler panicked: {e}"))));
        match r {
            Ok(applied) => {
                for (message, applied) in messages.iter().zip(applied) {
                    if applied {
                        RunnerStats::bump(&self.stats.applied);
                    } else {
                        RunnerStats::bump(&self.stats.duplicates);
                        tracing::debug!(target: TARGET, message_id = %message.message_id, "duplicate skipped");
                    }
                    self.store_offset(message);
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

    /// Applies `messages` one at a time, each with its retries, dead-lettering what fails for
    /// good, storing each offset once its message is settled. Returns whether the worker must
    /// stop: a message was neither applied nor dead-lettered.
    async fn apply_one_by_one(
        &self,
        conn: &mut Option<PgConnection>,
        messages: &[Arc<IncomingMessage>],
    ) -> bool {
        for message in messages {
            let outcome = self.apply_with_retries(conn, message).await;
            if !self.settle(message, outcome).await {
                // Neither applied nor dead-lettered (shutdown came during its retries
                // or while its dead letter could not be written): no later message of
                // the partition may be applied or stored, or the committed offset
                // would pass this one and it would never be delivered again.
                tracing::info!(target: TARGET, topic = %message.topic, partition = message.partition, offset = message.offset, "stopping: message left for redelivery");
                return true;
            }
            self.store_offset(message);
        }
        false
    }

    /// Attempts `message` until it is applied, fails for good, runs out of attempts, or a
    /// transient failure meets shutdown; transient failures wait with exponential backoff.
    async fn apply_with_retries(
        &self,
        conn: &mut Option<PgConnection>,
        message: &Arc<IncomingMessage>,
    ) -> Outcome {
        let mut backoff = backoff::ExponentialBackoff {
            initial_interval: self.retry_initial,
            max_interval: self.retry_max,
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        let mut attempt = 0_u32;
        loop {
            attempt += 1;
            let (m, i, h, u) = (
                Arc::clone(message),
                self.inbox.clone(),
                Arc::clone(&self.handler),
                self.url.clone(),
            );
            let r = crate::blocking::with_connection(conn, move |c| apply(c, &u, &i, &*h, &m))
                .await
                .unwrap_or_else(|e| Err(HandlerError::Transient(format!("handler panicked: {e}"))));
            match r {
                Ok(applied) => break Ok(applied),
                Err(HandlerError::Transient(e))
                    if attempt < self.max_attempts && !self.stop.is_cancelled() =>
                {
                    let wait = backoff.next_backoff().unwrap_or(self.retry_max);
                    tracing::warn!(target: TARGET, topic = %message.topic, partition = message.partition, offset = message.offset, attempt, error = %e, "handler failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => break Err((e, attempt)),
            }
        }
    }

    /// Counts the outcome, dead-lettering a failed message. Returns whether the message is
    /// settled (applied, a duplicate, or dead-lettered), so its offset may be stored.
    async fn settle(&self, message: &IncomingMessage, outcome: Outcome) -> bool {
        match outcome {
            Ok(true) => {
                RunnerStats::bump(&self.stats.applied);
                true
            }
            Ok(false) => {
                RunnerStats::bump(&self.stats.duplicates);
                tracing::debug!(target: TARGET, message_id = %message.message_id, "duplicate skipped");
                true
            }
            Err((HandlerError::Transient(_), _)) if self.stop.is_cancelled() => false,
            Err((e, attempts)) => {
                let written = dead_letters::dead_letter(
                    &self.dlq,
                    &self.dlq_topic,
                    &self.consumer_name,
                    message,
                    &e,
                    attempts,
                    &self.stop,
                )
                .await;
                if written {
                    RunnerStats::bump(&self.stats.dead_lettered);
                }
                written
            }
        }
    }

    /// Stores the offset of a settled message (committed within a second, or on revocation).
    fn store_offset(&self, message: &IncomingMessage) {
        if let Err(e) =
            self.consumer
                .store_offset(&message.topic, message.partition, message.offset)
        {
            tracing::debug!(target: TARGET, error = %e, "store offset (partition revoked?)");
        }
    }
}

/// The worker's connection, or a new one (a failure to connect is transient, URL scrubbed).
fn reuse_or_connect(conn: Option<PgConnection>, url: &str) -> Result<PgConnection, HandlerError> {
    use diesel::Connection;
    match conn {
        Some(c) => Ok(c),
        None => PgConnection::establish(url).map_err(|e| {
            HandlerError::Transient(format!(
                "connect to the database: {}",
                crate::redact::text_with_url(&e.to_string(), url)
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
