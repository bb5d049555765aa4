//! Delivery: the events of a page handed to the producer in id order, per-key blocking and
//! waiting, the poison policy, acknowledgements (removal through the session) and dead letters.
//!
//! May call: the [`Session`] (removal, dead letters, lease renewal), `producer`, `metrics`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use crate::config::PoisonPolicy;
use crate::producer::{self, Failure, Producer};
use crate::store::{DeadLetter, Fetched};
use crate::{metrics as m, Result};

use super::session::Session;
use super::{sleep_or_cancel, Acknowledged, Relay, TARGET};

pub(super) enum Outcome {
    Pending(DeliveryFuture),
    Failed(Failure),
    /// Set aside under `hold-key`.
    Held,
    /// Not produced (an earlier event of its key failed in this batch, or shutdown came while the
    /// producer queue was full): it stays in the outbox for the batch's next attempt.
    NotSent,
    /// Not produced: an earlier event of its key is overdue (see [`Term::overdue`]). It stays in
    /// the outbox and goes out after the rewind that follows.
    Waiting,
    /// Sent alone, through the term's one-message-per-request producer (see
    /// [`Relay::send_alone`]): set aside at once like an overdue event, its key waiting for it.
    Alone(DeliveryFuture),
}

pub(super) struct Entry {
    pub(super) id: i64,
    pub(super) topic: String,
    pub(super) key: String,
    pub(super) created_at: chrono::DateTime<Utc>,
    /// When the batch began opening.
    pub(super) batch_started: Instant,
    /// When the page was read from the outbox.
    pub(super) fetched: Instant,
    /// When it was handed to the producer (an acknowledgement is overdue `ack_overdue` later).
    pub(super) sent: tokio::time::Instant,
    /// Its partition, once known (set when it becomes overdue).
    pub(super) partition: Option<i32>,
    pub(super) outcome: Outcome,
    /// The event itself when it has no outbox row (a tableless event): a dead letter is
    /// written from it.
    pub(super) event: Option<Box<outbox::StoredEvent>>,
}

/// What waiting for one delivery report gave.
pub(super) enum Report {
    /// Acknowledged (`None`) or failed.
    Done(Option<Failure>),
    /// Not acknowledged within `ack_overdue`: set it aside.
    Overdue,
    /// Shutdown's deadline passed.
    ShutdownTimeout,
}

#[derive(Default)]
pub(super) struct PageEnd {
    pub(super) retry: bool,
    pub(super) timed_out: bool,
}

pub(super) type TopicKey = (String, String);

/// Per-term state of the leader.
pub(super) struct Term<'a> {
    /// The connection, the statements and the lease.
    pub(super) session: Session<'a>,
    pub(super) producer: Producer,
    pub(super) shutdown: CancellationToken,
    /// When shutdown gives up waiting for acknowledgements (set when shutdown is first seen).
    pub(super) deadline: Option<tokio::time::Instant>,
    /// Failed delivery attempts per row id, and when the next may be made. Kept across terms:
    /// a failure that ends the term (the producer's gap-less guarantee turns every failed
    /// produce request into a fatal producer error) must still count towards `max_attempts`
    /// and wait its backoff.
    pub(super) attempts: &'a mut HashMap<i64, Attempts>,
    /// Keys with dead letters (`hold-key` only).
    pub(super) held: HashSet<TopicKey>,
    /// Keys with a failed event in this batch: their later events wait for the batch's retry.
    pub(super) blocked: HashSet<TopicKey>,
    /// Events whose acknowledgement is overdue (an unavailable partition), still in flight in
    /// the producer. They no longer hold up their page or batch: capture goes on with every
    /// other key, and these are settled as their reports arrive.
    pub(super) overdue: Vec<Entry>,
    /// Keys whose events are not sent for now (they stay in the outbox): an event of theirs
    /// is overdue (`None`), or failed and is to be tried again at the given time. When a key
    /// has nothing overdue and its time has come, capture rewinds to the saved position, which
    /// sends its events in order. The position is not saved while any key waits, so a new
    /// leader resumes before every row left behind.
    pub(super) waiting: HashMap<TopicKey, Option<tokio::time::Instant>>,
    /// The last acknowledgement of the term (or its start).
    pub(super) last_ack: Instant,
    /// The producer for events sent alone (one message per request), made when first needed.
    pub(super) solo: Option<Producer>,
    /// Partition counts of topics that had an overdue event (from the producer's metadata).
    pub(super) partitions: HashMap<String, i32>,
    /// Since when the producer queue has been full (cleared by the next accepted send): past
    /// `ack_overdue`, sends hand their batch back at once instead of each waiting again.
    pub(super) queue_full_since: Option<tokio::time::Instant>,
    /// Partitions with an overdue event: every key on them waits too (it would only queue up
    /// behind the overdue ones; many distinct keys would each hold a page for `ack_overdue`).
    pub(super) overdue_partitions: HashSet<(String, i32)>,
}

/// Failed attempts of one event.
#[derive(Debug, Clone, Copy)]
pub(super) struct Attempts {
    pub(super) count: u32,
    /// Its last request was refused as too large: the next attempt goes alone.
    pub(super) alone: bool,
    /// Not sent again before this (exponential backoff from the last failure).
    pub(super) retry_at: tokio::time::Instant,
}

/// Wait after the first failed attempt of an event; doubled after each further one.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of an event.
const RETRY_MAX: Duration = Duration::from_secs(60);

pub(super) fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

impl Relay {
    /// Produces a page in id order. Returns one entry per row.
    pub(super) async fn send_page(
        &self,
        term: &mut Term<'_>,
        rows: Vec<Fetched>,
        (batch_started, fetched): (Instant, Instant),
    ) -> Result<Vec<Entry>> {
        let mut page = Vec::with_capacity(rows.len());
        let hold = self.cfg.poison_policy == PoisonPolicy::HoldKey;
        for Fetched {
            event: row, defect, ..
        } in rows
        {
            let key = (row.topic.clone(), row.partition_key.clone());
            let outcome = if hold && term.held.contains(&key) {
                Outcome::Held
            } else if term.waiting.contains_key(&key) {
                Outcome::Waiting
            } else if on_overdue_partition(&term.partitions, &term.overdue_partitions, &key) {
                term.waiting.insert(key.clone(), None);
                Outcome::Waiting
            } else if let Some(at) = term
                .attempts
                .get(&row.id)
                .map(|a| a.retry_at)
                .filter(|at| *at > tokio::time::Instant::now())
            {
                // It failed before (in this term or an earlier one): it and its key's later
                // events wait for its backoff, other keys go on.
                term.waiting.insert(key.clone(), Some(at));
                Outcome::Waiting
            } else if term.blocked.contains(&key) {
                Outcome::NotSent
            } else {
                let alone = term.attempts.get(&row.id).is_some_and(|a| a.alone);
                let outcome = match defect {
                    // A row the table accepts but Kafka never will: dead-lettered (in SQL, by
                    // id: its payload was never loaded), never retried.
                    Some(defect) => Outcome::Failed(Failure::Permanent(defect)),
                    None if alone => self.send_alone(term, &row)?,
                    None => self.send_one(term, &row).await?,
                };
                match &outcome {
                    Outcome::Failed(Failure::Permanent(_)) if hold => {
                        term.held.insert(key);
                    }
                    // Its later events wait; `complete_page` sets when it is tried again.
                    Outcome::Failed(Failure::Transient(_) | Failure::Client(_)) => {
                        term.waiting.entry(key).or_insert(None);
                    }
                    // Its later events wait for its report.
                    Outcome::Alone(_) => {
                        term.waiting.insert(key, None);
                    }
                    Outcome::NotSent => {
                        term.blocked.insert(key);
                    }
                    _ => {}
                }
                outcome
            };
            // Streaming keeps the event for a dead letter written from its content: a row the
            // stream delivers may not be visible to a new snapshot yet, so it cannot always be
            // moved by id (its removal is retried until it is).
            let event = (row.id < 0 || self.cfg.capture == crate::config::CaptureMode::Streaming)
                .then(|| Box::new(row.clone()));
            page.push(Entry {
                event,
                id: row.id,
                topic: row.topic,
                key: row.partition_key,
                created_at: row.created_at,
                batch_started,
                fetched,
                sent: tokio::time::Instant::now(),
                partition: None,
                outcome,
            });
        }
        Ok(page)
    }

    pub(super) async fn send_one(
        &self,
        term: &mut Term<'_>,
        row: &outbox::StoredEvent,
    ) -> Result<Outcome> {
        loop {
            let record = FutureRecord::to(&row.topic)
                .key(row.partition_key.as_bytes())
                .payload(row.payload.as_slice())
                .timestamp(row.created_at.timestamp_millis())
                .headers(producer::headers(row, &self.source));
            match term.producer.send_result(record) {
                Ok(future) => {
                    term.queue_full_since = None;
                    return Ok(Outcome::Pending(future));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Back-pressure, not an error: wait for librdkafka to drain its queue, while
                    // keeping the lease and listening for shutdown.
                    // Not forever: a producer that stopped (a fatal error under the gap-less
                    // guarantee) or a queue that stays full past `ack_overdue` hands the batch
                    // back to the term loop, which checks the producer and the overdue events.
                    let since = *term
                        .queue_full_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if term.shutdown.is_cancelled()
                        || term.producer.client().fatal_error().is_some()
                        || since.elapsed() >= self.cfg.ack_overdue.0
                    {
                        return Ok(Outcome::NotSent);
                    }
                    term.session.renew_if_due().await?;
                    sleep_or_cancel(Duration::from_millis(5), &term.shutdown).await;
                }
                Err((e, _)) => return Ok(Outcome::Failed(producer::classify(&e))),
            }
        }
    }

    /// The partition of `key` in `topic` (the producer's metadata for the partition count,
    /// read once per topic and term); `None` when the metadata cannot be had.
    ///
    /// A failed lookup (the brokers unreachable) is remembered for the term, as 0, so an
    /// outage costs one short lookup per topic, not one per overdue event; the lease is
    /// renewed after it.
    pub(super) async fn partition_of(
        &self,
        term: &mut Term<'_>,
        topic: &str,
        key: &str,
    ) -> Option<i32> {
        if !term.partitions.contains_key(topic) {
            let (producer, t) = (term.producer.clone(), topic.to_owned());
            let count = outbox::blocking::run(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&t), Duration::from_millis(500))
                    .ok()
                    .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                    .and_then(|n| i32::try_from(n).ok())
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
            term.partitions.insert(topic.to_owned(), count);
            if let Err(e) = term.session.renew_if_due().await {
                tracing::debug!(target: TARGET, error = %e, "lease renewal after a metadata lookup failed");
            }
        }
        let count = *term.partitions.get(topic)?;
        (count > 0).then(|| producer::partition_for(key.as_bytes(), count))
    }

    /// Whether a broker answers a metadata request (then an unacknowledged event is one
    /// partition's trouble, not this process being cut off). Counts as an acknowledgement of
    /// life: the next check is a full period later.
    pub(super) async fn brokers_answer(&self, term: &mut Term<'_>) -> bool {
        let producer = term.producer.clone();
        let ok = outbox::blocking::run(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap_or(false);
        if ok {
            term.last_ack = Instant::now();
        }
        ok
    }

    /// Sends an event whose last request was refused as too large in a request of its own,
    /// through a second producer that puts one message in each request. Nothing waits for it
    /// here: its key waits (it is set aside like an overdue event), other keys go on.
    pub(super) fn send_alone(
        &self,
        term: &mut Term<'_>,
        row: &outbox::StoredEvent,
    ) -> Result<Outcome> {
        if term.solo.is_none() {
            term.solo = Some(producer::create_solo(&self.cfg)?);
        }
        let Some(solo) = term.solo.as_ref() else {
            return Ok(Outcome::NotSent);
        };
        tracing::info!(target: TARGET, id = row.id, topic = %row.topic, key = %row.partition_key, "sending alone an event whose request was refused as too large");
        let record = FutureRecord::to(&row.topic)
            .key(row.partition_key.as_bytes())
            .payload(row.payload.as_slice())
            .timestamp(row.created_at.timestamp_millis())
            .headers(producer::headers(row, &self.source));
        Ok(match solo.send_result(record) {
            Ok(future) => Outcome::Alone(future),
            // Back-pressure, not the event's fault: the batch goes again.
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Outcome::NotSent
            }
            Err((e, _)) => Outcome::Failed(producer::classify(&e)),
        })
    }

    /// Waits for one delivery report, renewing the lease meanwhile, until `overdue_at` (then
    /// [`Report::Overdue`]) or shutdown's deadline.
    pub(super) async fn await_report(
        &self,
        term: &mut Term<'_>,
        future: &mut DeliveryFuture,
        overdue_at: tokio::time::Instant,
    ) -> Result<Report> {
        loop {
            let renew_in = term.session.renew_in();
            let deadline = term.deadline;
            tokio::select! {
                // A report that is already there wins over any deadline that has also passed.
                biased;
                r = &mut *future => return Ok(Report::Done(report_failure(r))),
                () = tokio::time::sleep_until(overdue_at) => return Ok(Report::Overdue),
                () = tokio::time::sleep(renew_in) => term.session.renew_if_due().await?,
                () = term.shutdown.cancelled(), if deadline.is_none() => {
                    term.deadline = Some(
                        tokio::time::Instant::now() + self.cfg.shutdown_timeout.0,
                    );
                }
                () = async {
                    if let Some(d) = deadline {
                        tokio::time::sleep_until(d).await;
                    }
                }, if deadline.is_some() => return Ok(Report::ShutdownTimeout),
            }
        }
    }

    /// Waits for a page's acknowledgements, removes what was delivered and dead-letters what
    /// must be. An event not acknowledged within `ack_overdue` is set aside (see
    /// [`Term::overdue`]), so one unavailable partition holds up its own keys only.
    pub(super) async fn complete_page(
        &self,
        term: &mut Term<'_>,
        page: Vec<Entry>,
    ) -> Result<PageEnd> {
        let mut settled = Settled::default();
        let mut end = PageEnd::default();
        let overdue_after = self.cfg.ack_overdue.0;
        for mut entry in page {
            let failure = match std::mem::replace(&mut entry.outcome, Outcome::NotSent) {
                Outcome::Pending(mut future) => {
                    match self
                        .await_report(term, &mut future, entry.sent + overdue_after)
                        .await?
                    {
                        Report::Done(f) => f,
                        Report::Overdue => {
                            entry.partition =
                                self.partition_of(term, &entry.topic, &entry.key).await;
                            if let Some(p) = entry.partition {
                                term.overdue_partitions.insert((entry.topic.clone(), p));
                            }
                            tracing::warn!(target: TARGET, id = entry.id, topic = %entry.topic, partition = ?entry.partition, key = %entry.key, overdue_secs = overdue_after.as_secs_f64(), "acknowledgement overdue: the key's later events (and other keys on its partition) wait, other partitions go on");
                            set_aside(term, entry, future);
                            continue;
                        }
                        Report::ShutdownTimeout => {
                            end.timed_out = true;
                            break;
                        }
                    }
                }
                Outcome::Failed(f) => Some(f),
                Outcome::Alone(future) => {
                    set_aside(term, entry, future);
                    continue;
                }
                Outcome::NotSent => {
                    end.retry = true;
                    continue;
                }
                // Sent after the rewind that follows the overdue events (see `Term::waiting`).
                Outcome::Waiting => continue,
                Outcome::Held => {
                    settled.dead.push(DeadLetter {
                        event: entry.event.take(),
                        id: entry.id,
                        error: "held: an earlier event of this key is dead-lettered (poison_policy = hold-key)".into(),
                        attempts: 0,
                    });
                    continue;
                }
            };
            if let Some((key, retry_at)) = self.settle(term, entry, failure, &mut settled) {
                // Its later events wait (they stay in the outbox); other keys go on.
                let at = term.waiting.entry(key).or_insert(None);
                *at = Some(at.map_or(retry_at, |t| t.max(retry_at)));
            }
        }
        self.apply_settled(term, settled).await?;
        Ok(end)
    }

    /// Settles the overdue events whose reports have arrived (without waiting for the others).
    /// One that failed and is to be tried again keeps its key waiting: the rewind sends it.
    pub(super) async fn settle_overdue(&self, term: &mut Term<'_>) -> Result<()> {
        if term.overdue.is_empty() {
            return Ok(());
        }
        let mut settled = Settled::default();
        for mut entry in std::mem::take(&mut term.overdue) {
            let Outcome::Pending(future) = &mut entry.outcome else {
                continue;
            };
            match tokio::time::timeout(Duration::ZERO, &mut *future).await {
                Ok(r) => {
                    let failure = report_failure(r);
                    let key = (entry.topic.clone(), entry.key.clone());
                    if let Some((_, retry_at)) = self.settle(term, entry, failure, &mut settled) {
                        // Still waiting (it was, being overdue); now for its retry.
                        term.waiting.insert(key, Some(retry_at));
                    }
                }
                Err(_still_waiting) => term.overdue.push(entry),
            }
        }
        term.overdue_partitions = term
            .overdue
            .iter()
            .filter_map(|e| e.partition.map(|p| (e.topic.clone(), p)))
            .collect();
        if term
            .solo
            .as_ref()
            .is_some_and(|p| p.client().fatal_error().is_some())
        {
            // An event refused alone stopped it (gap-less guarantee): a new one next time.
            term.solo = None;
        }
        m::waiting(term.waiting.len(), term.overdue.len());
        self.apply_settled(term, settled).await
    }

    /// Records one event's report: delivered, to be dead-lettered, or to be tried again (then
    /// its key and when are returned).
    pub(super) fn settle(
        &self,
        term: &mut Term<'_>,
        entry: Entry,
        failure: Option<Failure>,
        settled: &mut Settled,
    ) -> Option<(TopicKey, tokio::time::Instant)> {
        let key = (entry.topic, entry.key);
        let Some(f) = failure else {
            let age = (Utc::now() - entry.created_at).to_std().unwrap_or_default();
            m::delivered(age);
            if let Some(listener) = &self.ack_listener {
                listener(Acknowledged {
                    id: entry.id,
                    partition_key: key.1.clone(),
                    batch_started: entry.batch_started,
                    fetched: entry.fetched,
                    acknowledged: Instant::now(),
                });
            }
            term.attempts.remove(&entry.id);
            term.last_ack = Instant::now();
            settled.delivered.push(entry.id);
            return None;
        };
        let alone = term.attempts.get(&entry.id).is_some_and(|a| a.alone);
        let kind = match f {
            Failure::Permanent(_) => "permanent",
            Failure::Transient(_) | Failure::TooLargeInBatch(_) => "transient",
            Failure::Client(_) => "client",
        };
        m::failed(kind);
        let now = tokio::time::Instant::now();
        let (attempts, retry_at) = match f {
            // Not the event's fault: no attempt counted, sent again soon.
            Failure::Client(_) => (
                term.attempts.get(&entry.id).map_or(0, |a| a.count),
                now + Duration::from_millis(100),
            ),
            _ => {
                let a = term.attempts.entry(entry.id).or_insert(Attempts {
                    count: 0,
                    alone: false,
                    retry_at: now,
                });
                a.count += 1;
                if matches!(f, Failure::TooLargeInBatch(_)) && !a.alone {
                    // Sent again alone at once; refused alone, it is permanent (below).
                    a.alone = true;
                    a.retry_at = now;
                } else {
                    a.retry_at = now + retry_delay(a.count);
                }
                (a.count, a.retry_at)
            }
        };
        tracing::warn!(target: TARGET, id = entry.id, topic = %key.0, key = %key.1, attempt = attempts, error = f.message(), kind, "delivery failed");
        let dead_now = match f {
            Failure::Permanent(_) => true,
            // Refused although it was alone in its request: the event itself is too large.
            Failure::TooLargeInBatch(_) if alone => true,
            Failure::Transient(_) | Failure::TooLargeInBatch(_) => {
                attempts >= self.cfg.max_attempts
            }
            Failure::Client(_) => false,
        };
        if !dead_now {
            return Some((key, retry_at));
        }
        settled.dead.push(DeadLetter {
            event: entry.event,
            id: entry.id,
            error: f.message().to_owned(),
            attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        });
        if self.cfg.poison_policy == PoisonPolicy::HoldKey {
            term.held.insert(key);
        }
        None
    }

    /// Queues the delivered rows for removal and dead-letters what must be.
    pub(super) async fn apply_settled(&self, term: &mut Term<'_>, settled: Settled) -> Result<()> {
        let Settled { delivered, dead } = settled;
        // Removed by the next database call (see `Session::remove_later`).
        term.session.remove_later(delivered);
        if dead.is_empty() {
            return Ok(());
        }
        // Only events that failed with an error of their own get here: what a fatal producer
        // error fails is a `Failure::Client` and is sent again.
        for d in &dead {
            term.attempts.remove(&d.id);
        }
        let n = dead.len();
        term.session.dead_letter(dead).await?;
        m::dead_lettered(n);
        tracing::warn!(target: TARGET, count = n, "events dead-lettered");
        Ok(())
    }
}

/// Sets an event in flight aside (see [`Term::overdue`]): its key waits until it settles.
pub(super) fn set_aside(term: &mut Term<'_>, mut entry: Entry, future: DeliveryFuture) {
    term.waiting
        .insert((entry.topic.clone(), entry.key.clone()), None);
    entry.outcome = Outcome::Pending(future);
    term.overdue.push(entry);
    m::waiting(term.waiting.len(), term.overdue.len());
}

/// Whether `key` is on a partition with an overdue event.
pub(super) fn on_overdue_partition(
    partitions: &HashMap<String, i32>,
    overdue: &HashSet<(String, i32)>,
    key: &TopicKey,
) -> bool {
    !overdue.is_empty()
        && partitions.get(&key.0).is_some_and(|n| {
            *n > 0
                && overdue.contains(&(key.0.clone(), producer::partition_for(key.1.as_bytes(), *n)))
        })
}

/// Events settled by their reports, applied together (one removal, one dead-letter statement).
#[derive(Default)]
pub(super) struct Settled {
    pub(super) delivered: Vec<i64>,
    pub(super) dead: Vec<DeadLetter>,
}

/// The failure a delivery report carries, if any.
pub(super) fn report_failure(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Option<Failure> {
    match r {
        Ok(Ok(_delivery)) => None,
        Ok(Err((e, _))) => Some(producer::classify_report(&e)),
        Err(_canceled) => Some(Failure::Client(
            "delivery report lost (producer purged)".into(),
        )),
    }
}
