//! The delivery engine: leadership, batches, pipelined pages, acknowledgement, removal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use chrono::Utc;
use diesel::PgConnection;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer as _, PurgeConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{PoisonPolicy, RelayConfig};
use crate::producer::{self, Failure, Producer};
use crate::store::{self, Batch, DeadLetter, Fetched, Lease, Sql};
use crate::{metrics as m, Error, Result};

const TARGET: &str = "outbox::relay";

/// How often, at most, the position (the batch snapshots) is written to the state row while
/// batches are delivered; see [`store::advance_batch`].
const SAVE_BATCH_EVERY: Duration = Duration::from_secs(1);

/// A leader with overdue events that has had no acknowledgement at all for this many times
/// `ack_overdue` gives up its lease (one unavailable partition does not: the others go on
/// acknowledging).
const STEP_DOWN_AFTER_OVERDUE: u32 = 6;

/// One database connection, used from blocking threads (diesel is synchronous).
struct Db {
    url: Arc<str>,
    /// `application_name` of the session: `outbox-relay:<instance>` (listed by `status`).
    name: Arc<str>,
    /// `synchronous_commit` of the session.
    synchronous_commit: Arc<str>,
    conn: Option<PgConnection>,
}

impl Db {
    fn new(url: &str, name: &str, synchronous_commit: &str) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            synchronous_commit: synchronous_commit.into(),
            conn: None,
        }
    }

    /// Runs `f` on the connection in `spawn_blocking`, connecting first if needed. The connection
    /// is dropped after a database error, so the next call reconnects.
    async fn call<T, F>(&mut self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.take();
        let (url, name, sync) = (
            Arc::clone(&self.url),
            Arc::clone(&self.name),
            Arc::clone(&self.synchronous_commit),
        );
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => match store::connect_as(&url, Some(&name))
                    .and_then(|mut c| store::set_synchronous_commit(&mut c, &sync).map(|()| c))
                {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            let result = f(&mut conn);
            (Some(conn), result)
        })
        .await
        .map_err(|e| Error::Config(format!("database task failed: {e}")))?;
        if matches!(result, Ok(_) | Err(Error::LostLeadership(_))) {
            self.conn = conn;
        }
        result
    }
}

/// The relay for one outbox table. See the crate docs for the guarantees.
pub struct Relay {
    cfg: RelayConfig,
    sql: Arc<Sql>,
    instance: String,
    source: Arc<str>,
    ack_listener: Option<AckListener>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("cfg", &self.cfg)
            .field("instance", &self.instance)
            .field("source", &self.source)
            .field("ack_listener", &self.ack_listener.is_some())
            .finish_non_exhaustive()
    }
}

/// One event the broker acknowledged, as reported to a listener set with
/// [`Relay::on_acknowledged`].
#[derive(Debug, Clone, Copy)]
pub struct Acknowledged {
    /// The outbox row id (what [`outbox::Enqueued::id`] returned to the writer).
    pub id: i64,
    /// When the relay began opening the event's batch (taking the snapshot).
    pub batch_started: Instant,
    /// When the relay read the event's page from the outbox.
    pub fetched: Instant,
    /// When the relay saw the broker's acknowledgement (the row is removed after this).
    pub acknowledged: Instant,
}

/// See [`Relay::on_acknowledged`].
pub type AckListener = Arc<dyn Fn(Acknowledged) + Send + Sync>;

/// How one capture batch ended.
enum BatchEnd {
    /// Every row was delivered or dead-lettered.
    Done { rows: usize },
    /// Some rows failed or were held back; they stay in the outbox and the batch is tried again.
    Retry,
    /// Shutdown was requested; acknowledged rows were removed, the batch stays open.
    Shutdown,
}

enum Outcome {
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

struct Entry {
    id: i64,
    topic: String,
    key: String,
    created_at: chrono::DateTime<Utc>,
    /// When the batch began opening.
    batch_started: Instant,
    /// When the page was read from the outbox.
    fetched: Instant,
    /// When it was handed to the producer (an acknowledgement is overdue `ack_overdue` later).
    sent: tokio::time::Instant,
    /// Its partition, once known (set when it becomes overdue).
    partition: Option<i32>,
    outcome: Outcome,
}

/// What waiting for one delivery report gave.
enum Report {
    /// Acknowledged (`None`) or failed.
    Done(Option<Failure>),
    /// Not acknowledged within `ack_overdue`: set it aside.
    Overdue,
    /// Shutdown's deadline passed.
    ShutdownTimeout,
}

#[derive(Default)]
struct PageEnd {
    retry: bool,
    timed_out: bool,
}

type TopicKey = (String, String);

/// Per-term state of the leader.
struct Term<'a> {
    db: &'a mut Db,
    lease: Lease,
    producer: Producer,
    shutdown: CancellationToken,
    /// When shutdown gives up waiting for acknowledgements (set when shutdown is first seen).
    deadline: Option<tokio::time::Instant>,
    last_renew: Instant,
    /// Failed delivery attempts per row id, and when the next may be made. Kept across terms:
    /// a failure that ends the term (the producer's gap-less guarantee turns every failed
    /// produce request into a fatal producer error) must still count towards `max_attempts`
    /// and wait its backoff.
    attempts: &'a mut HashMap<i64, Attempts>,
    /// Keys with dead letters (`hold-key` only).
    held: HashSet<TopicKey>,
    /// Keys with a failed event in this batch: their later events wait for the batch's retry.
    blocked: HashSet<TopicKey>,
    /// Acknowledged rows not yet removed: the next database call removes them first, in the
    /// same blocking call (one round of thread hand-offs less per page). Always removed before
    /// a batch position is saved or the term ends normally.
    unremoved: Vec<i64>,
    /// Events whose acknowledgement is overdue (an unavailable partition), still in flight in
    /// the producer. They no longer hold up their page or batch: capture goes on with every
    /// other key, and these are settled as their reports arrive.
    overdue: Vec<Entry>,
    /// Keys whose events are not sent for now (they stay in the outbox): an event of theirs
    /// is overdue (`None`), or failed and is to be tried again at the given time. When a key
    /// has nothing overdue and its time has come, capture rewinds to the saved position, which
    /// sends its events in order. The position is not saved while any key waits, so a new
    /// leader resumes before every row left behind.
    waiting: HashMap<TopicKey, Option<tokio::time::Instant>>,
    /// The last acknowledgement of the term (or its start).
    last_ack: Instant,
    /// The producer for events sent alone (one message per request), made when first needed.
    solo: Option<Producer>,
    /// Partition counts of topics that had an overdue event (from the producer's metadata).
    partitions: HashMap<String, i32>,
    /// Partitions with an overdue event: every key on them waits too (it would only queue up
    /// behind the overdue ones; many distinct keys would each hold a page for `ack_overdue`).
    overdue_partitions: HashSet<(String, i32)>,
}

/// Failed attempts of one event.
#[derive(Debug, Clone, Copy)]
struct Attempts {
    count: u32,
    /// Its last request was refused as too large: the next attempt goes alone.
    alone: bool,
    /// Not sent again before this (exponential backoff from the last failure).
    retry_at: tokio::time::Instant,
}

/// Wait after the first failed attempt of an event; doubled after each further one.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of an event.
const RETRY_MAX: Duration = Duration::from_secs(60);

fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

impl Relay {
    /// A relay for `cfg` (validated here).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid or unsafe configuration.
    pub fn new(cfg: RelayConfig) -> Result<Self> {
        cfg.validate()?;
        let tables = cfg.tables()?;
        let instance = cfg.instance_id.clone().unwrap_or_else(default_instance_id);
        let source = cfg.source.clone().unwrap_or_else(|| {
            format!(
                "/outbox-relay/{}",
                tables.schema().map_or("default", |s| s.as_str())
            )
        });
        Ok(Self {
            sql: Arc::new(
                Sql::new(&tables)
                    .keep_delivered(cfg.keeps_delivered())
                    .byte_limits(cfg.max_event_bytes(), store::DEFAULT_PAGE_BYTES),
            ),
            cfg,
            instance,
            source: source.into(),
            ack_listener: None,
        })
    }

    /// Calls `listener` for every event the broker acknowledges, before its row is removed, with
    /// when its page was fetched and when the acknowledgement was seen: per-stage latency for
    /// benchmarks and tests (`outbox-bench` times commit-to-ack with it). It runs on the
    /// delivery path, so it must be cheap and must not block.
    #[must_use]
    pub fn on_acknowledged(mut self, listener: AckListener) -> Self {
        self.ack_listener = Some(listener);
        self
    }

    /// This process's id in the lease.
    #[must_use]
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Runs until `shutdown` is cancelled: stands by, leads when the lease is free, delivers.
    /// On shutdown it stops fetching, waits for outstanding acknowledgements (up to the
    /// shutdown timeout), removes what was acknowledged, and gives up the lease.
    ///
    /// # Errors
    /// Only what retrying cannot fix: a schema mismatch, a superuser role without
    /// `allow_superuser`, a producer configuration librdkafka refuses.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let app_name = crate::status::application_name(&self.instance);
        let mut db = Db::new(
            &self.cfg.database_url,
            &app_name,
            &self.cfg.synchronous_commit,
        );
        self.startup_checks(&mut db, &shutdown).await?;
        let mut backoff = backoff_policy();
        let mut attempts: HashMap<i64, Attempts> = HashMap::new();
        tracing::info!(target: TARGET, instance = %self.instance, outbox = %self.sql.key(), "relay started");
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let sql = Arc::clone(&self.sql);
            let instance = self.instance.clone();
            let lease_ms = self.cfg.lease_ms;
            match db
                .call(move |c| store::try_acquire(c, &sql, &instance, lease_ms))
                .await
            {
                Ok(Some(lease)) => {
                    backoff.reset();
                    tracing::info!(target: TARGET, instance = %lease.instance, epoch = lease.epoch, "leadership acquired");
                    m::leader(true);
                    let result = self
                        .lead(&mut db, &mut attempts, lease.clone(), &shutdown)
                        .await;
                    m::leader(false);
                    match result {
                        Ok(()) => {
                            self.release(&mut db, lease).await;
                            tracing::info!(target: TARGET, "leadership released, relay stopped");
                            return Ok(());
                        }
                        Err(Error::LostLeadership(_)) => {
                            tracing::warn!(target: TARGET, epoch = lease.epoch, "lost leadership; standing by");
                        }
                        Err(e @ Error::SteppedDown(_)) => {
                            tracing::warn!(target: TARGET, error = %e, "stepping down: a relay that reaches the brokers may take over");
                            self.release(&mut db, lease).await;
                            // Give the standbys a full round to take the lease first.
                            sleep_or_cancel(
                                self.cfg.lease_duration()
                                    + Duration::from_millis(self.cfg.standby_poll_ms) * 2,
                                &shutdown,
                            )
                            .await;
                        }
                        Err(e) if e.is_retriable() => {
                            tracing::warn!(target: TARGET, error = %e, "leader term ended; retrying");
                            // Let a standby (or this process, after the backoff) start afresh.
                            self.release(&mut db, lease).await;
                            sleep_or_cancel(next(&mut backoff), &shutdown).await;
                        }
                        Err(e) => {
                            self.release(&mut db, lease).await;
                            return Err(e);
                        }
                    }
                }
                Ok(None) => {
                    sleep_or_cancel(Duration::from_millis(self.cfg.standby_poll_ms), &shutdown)
                        .await;
                }
                Err(e) if e.is_retriable() => {
                    tracing::warn!(target: TARGET, error = %e, "cannot reach the database; retrying");
                    sleep_or_cancel(next(&mut backoff), &shutdown).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn release(&self, db: &mut Db, lease: Lease) {
        let sql = Arc::clone(&self.sql);
        if let Err(e) = db.call(move |c| store::release(c, &sql, &lease)).await {
            tracing::debug!(target: TARGET, error = %e, "lease release failed; it expires on its own");
        }
    }

    async fn startup_checks(&self, db: &mut Db, shutdown: &CancellationToken) -> Result<()> {
        let tables = self.cfg.tables()?;
        let allow_superuser = self.cfg.allow_superuser;
        let required = crate::grants::required(&self.cfg);
        let mut backoff = backoff_policy();
        loop {
            let (tables, required) = (tables.clone(), required.clone());
            let r = db
                .call(move |c| {
                    crate::grants::check(c, &tables, &required)?;
                    outbox::verify_schema(c, &tables)?;
                    if store::is_superuser(c)? && !allow_superuser {
                        return Err(Error::Config(
                            "the database role is a superuser: run the relay as a least-privilege \
                             role (docs/RELAY.md) or set allow_superuser / --allow-superuser"
                                .into(),
                        ));
                    }
                    Ok(())
                })
                .await;
            match r {
                Err(e) if e.is_retriable() && !shutdown.is_cancelled() => {
                    tracing::warn!(target: TARGET, error = %e, "start-up check failed; retrying");
                    sleep_or_cancel(next(&mut backoff), shutdown).await;
                }
                other => return other,
            }
        }
    }

    async fn lead(
        &self,
        db: &mut Db,
        attempts: &mut HashMap<i64, Attempts>,
        lease: Lease,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let producer = producer::create(&self.cfg)?;
        let mut term = Term {
            db,
            lease,
            producer,
            shutdown: shutdown.clone(),
            deadline: None,
            last_renew: Instant::now(),
            attempts,
            held: HashSet::new(),
            blocked: HashSet::new(),
            unremoved: Vec::new(),
            overdue: Vec::new(),
            waiting: HashMap::new(),
            last_ack: Instant::now(),
            solo: None,
            partitions: HashMap::new(),
            overdue_partitions: HashSet::new(),
        };
        // Retention purges run beside delivery, on their own short-lived connection.
        let purge_stop = shutdown.child_token();
        let purge = crate::retention::spawn(
            &self.cfg,
            crate::status::application_name(&self.instance),
            purge_stop.clone(),
        );
        let result = self.lead_term(&mut term).await;
        m::waiting(0, 0);
        purge_stop.cancel();
        if result.is_err() {
            // Nothing more may leave this process under a term that is over.
            term.producer
                .purge(PurgeConfig::default().queue().inflight().non_blocking());
        }
        if let Some(purge) = purge {
            // Ends after the batch in progress, if any.
            let _ = purge.await;
        }
        result
    }

    async fn lead_term(&self, term: &mut Term<'_>) -> Result<()> {
        let idle_max = Duration::from_millis(self.cfg.idle_poll_max_ms);
        let mut idle = Duration::from_millis(1);
        let mut retry = backoff_policy();
        // The batch just delivered in full: its snapshot is the next one's lower bound. `None`
        // at the start of the term: the saved batch (a previous leader's, or ours) is resumed.
        let mut done: Option<Batch> = None;
        // A batch to deliver again (some of its rows failed).
        let mut again: Option<Batch> = None;
        let mut saved = Instant::now();
        let mut held_read = false;
        loop {
            if term.shutdown.is_cancelled() {
                match done {
                    Some(d) if term.waiting.is_empty() => self.save_batch(term, d, true).await,
                    _ if !term.unremoved.is_empty() => {
                        if let Err(e) = self.call_removing(term, |_| Ok(())).await {
                            tracing::debug!(target: TARGET, error = %e, "could not remove acknowledged rows; they will be sent again");
                        }
                    }
                    _ => {}
                }
                return Ok(());
            }
            self.renew_if_due(term).await?;
            self.settle_overdue(term).await?;
            let silent_for =
                Duration::from_millis(self.cfg.ack_overdue_ms) * STEP_DOWN_AFTER_OVERDUE;
            if !term.overdue.is_empty()
                && term.last_ack.elapsed() >= silent_for
                && !self.brokers_answer(term).await
            {
                // Cut off from the brokers (events overdue, nothing acknowledged, no metadata):
                // keeping the lease would keep a standby that reaches them from delivering.
                if let Err(e) = self.call_removing(term, |_| Ok(())).await {
                    tracing::debug!(target: TARGET, error = %e, "could not remove acknowledged rows; they will be sent again");
                }
                return Err(Error::SteppedDown(term.last_ack.elapsed()));
            }
            let overdue_keys: HashSet<TopicKey> = term
                .overdue
                .iter()
                .map(|e| (e.topic.clone(), e.key.clone()))
                .collect();
            let now = tokio::time::Instant::now();
            let (partitions, overdue_partitions) = (&term.partitions, &term.overdue_partitions);
            let still_waits = |k: &TopicKey, at: &Option<tokio::time::Instant>| {
                overdue_keys.contains(k)
                    || at.is_some_and(|t| t > now)
                    || on_overdue_partition(partitions, overdue_partitions, k)
            };
            if term.waiting.iter().any(|(k, at)| !still_waits(k, at)) {
                // Some waiting keys have nothing overdue any more and their retry is due:
                // resume from the saved position (older than every row left behind), which
                // sends their events in order; the other keys go on waiting. Nothing else is
                // in flight here, and what was delivered since that position was removed.
                let before = term.waiting.len();
                term.waiting.retain(|k, at| still_waits(k, at));
                tracing::info!(target: TARGET, resumed = before - term.waiting.len(), still_waiting = term.waiting.len(), "waiting keys are due again; resuming them from the saved position");
                m::waiting(term.waiting.len(), term.overdue.len());
                again = None;
                done = None;
            }
            let batch_started = Instant::now();
            let (batch, first_page) = match (again.take(), done.take()) {
                (Some(b), _) => (b, None),
                (None, previous) => {
                    // One blocking call: remove the previous batch's last acknowledged rows,
                    // open the next batch, fetch its first page.
                    let save = (previous.is_none() || saved.elapsed() >= SAVE_BATCH_EVERY)
                        && term.waiting.is_empty();
                    let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
                    let page_size = self.cfg.page_size;
                    // Which keys have dead letters (`hold-key`): read when the term starts;
                    // after that only this leader adds any (and records them itself), so they
                    // are read again only while some key is held, to see an operator's retry
                    // or purge. Always BEFORE the batch's snapshot: a retry committed after
                    // the read is then either in this batch with its key still held (its
                    // events held again, in order) or in a later one; read after the
                    // snapshot, a freed key's later event in this batch would leave before
                    // the retried ones.
                    let read_held = self.cfg.poison_policy == PoisonPolicy::HoldKey
                        && (!held_read || !term.held.is_empty());
                    let (b, rows, held) = self
                        .call_removing(term, move |c| {
                            let held = if read_held {
                                Some(store::held_keys(c, &sql)?)
                            } else {
                                None
                            };
                            let b = match &previous {
                                Some(d) => store::advance_batch(c, &sql, &lease, d, save)?,
                                // A saved open batch's snapshot predates the held keys just
                                // read: take a new one (a superset) when they were read.
                                None if held.is_some() => store::open_fresh_batch(c, &sql, &lease)?,
                                None => store::open_batch(c, &sql, &lease)?,
                            };
                            let rows = if b.start_after == i64::MAX {
                                None
                            } else {
                                Some(store::fetch(c, &sql, &lease, &b, b.start_after, page_size)?)
                            };
                            Ok((b, rows, held))
                        })
                        .await?;
                    if save {
                        saved = Instant::now();
                    }
                    if let Some(held) = held {
                        term.held = held.into_iter().collect();
                        held_read = true;
                    }
                    (b, rows)
                }
            };
            term.blocked.clear();
            let end = self
                .deliver_batch(term, &batch, batch_started, first_page)
                .await?;
            if let (false, Some((code, reason))) = (
                matches!(end, BatchEnd::Shutdown),
                term.producer.client().fatal_error(),
            ) {
                // Under the gap-less guarantee a failed produce request stops the producer:
                // nothing after it in its partition was written. The failed events were
                // counted (and dead-lettered when due) like any failure; what was acknowledged
                // is removed; the rest goes again, in order, with a new producer (failed
                // events after their backoff, which the attempts kept across terms remember).
                tracing::warn!(target: TARGET, %reason, "producer stopped (gap-less guarantee or fatal error); starting a new term");
                if let Err(e) = self.call_removing(term, |_| Ok(())).await {
                    tracing::debug!(target: TARGET, error = %e, "could not remove acknowledged rows; they will be sent again");
                }
                return Err(Error::Kafka(KafkaError::MessageProduction(code)));
            }
            match end {
                BatchEnd::Done { rows } => {
                    done = Some(batch);
                    retry.reset();
                    if rows == 0 {
                        // idle_poll_max_ms < lease / 4 (validated): the lease cannot lapse here.
                        sleep_or_cancel(idle, &term.shutdown).await;
                        idle = (idle * 2).min(idle_max);
                    } else {
                        idle = Duration::from_millis(1);
                    }
                }
                BatchEnd::Retry => {
                    again = Some(batch);
                    self.sleep_renewing(term, next(&mut retry)).await?;
                }
                BatchEnd::Shutdown => {
                    if term.waiting.is_empty() {
                        self.save_batch(term, batch, false).await;
                    } else if let Err(e) = self.call_removing(term, |_| Ok(())).await {
                        tracing::debug!(target: TARGET, error = %e, "could not remove acknowledged rows; they will be sent again");
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Removes what was acknowledged and records the position at the end of a term (best
    /// effort: if it fails, the next leader resumes an older saved batch and re-sends only what
    /// is still in the outbox).
    async fn save_batch(&self, term: &mut Term<'_>, batch: Batch, done: bool) {
        let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
        if let Err(e) = self
            .call_removing(term, move |c| {
                store::save_batch(c, &sql, &lease, &batch, done)
            })
            .await
        {
            tracing::debug!(target: TARGET, error = %e, "could not save the batch position");
        }
    }

    /// Runs `f` on the connection right after removing the acknowledged rows waiting for
    /// removal, in the same blocking call (removal first, each statement fenced by the lease).
    async fn call_removing<T, F>(&self, term: &mut Term<'_>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T> + Send + 'static,
    {
        let ids = std::mem::take(&mut term.unremoved);
        let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
        term.db
            .call(move |c| {
                if !ids.is_empty() {
                    store::delete(c, &sql, &lease, &ids)?;
                }
                f(c)
            })
            .await
    }

    async fn renew_if_due(&self, term: &mut Term<'_>) -> Result<()> {
        if term.last_renew.elapsed() >= self.cfg.lease_duration() / 4 {
            self.renew(term).await?;
        }
        Ok(())
    }

    async fn renew(&self, term: &mut Term<'_>) -> Result<()> {
        let (sql, lease, ms) = (Arc::clone(&self.sql), term.lease.clone(), self.cfg.lease_ms);
        term.db
            .call(move |c| store::renew(c, &sql, &lease, ms))
            .await?;
        term.last_renew = Instant::now();
        Ok(())
    }

    /// Sleeps `d` (or until shutdown), renewing the lease on the way.
    async fn sleep_renewing(&self, term: &mut Term<'_>, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        while !term.shutdown.is_cancelled() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sleep_or_cancel(left.min(self.cfg.lease_duration() / 4), &term.shutdown).await;
            self.renew_if_due(term).await?;
        }
        Ok(())
    }

    async fn deliver_batch(
        &self,
        term: &mut Term<'_>,
        batch: &Batch,
        batch_started: Instant,
        mut first_page: Option<Vec<Fetched>>,
    ) -> Result<BatchEnd> {
        let page_size = self.cfg.page_size;
        let mut after_id = batch.start_after;
        // An empty batch (found through the tx_id index) needs no fetch at all.
        let mut exhausted = after_id == i64::MAX;
        let mut retry = false;
        let mut rows_total = 0_usize;
        let mut inflight: VecDeque<Vec<Entry>> = VecDeque::new();
        let started = Instant::now();
        loop {
            let stopping = term.shutdown.is_cancelled();
            if !exhausted && !retry && !stopping && inflight.len() < self.cfg.max_pages_in_flight {
                let rows = match first_page.take() {
                    Some(rows) => rows,
                    None => {
                        self.renew_if_due(term).await?;
                        let (sql, lease, b) =
                            (Arc::clone(&self.sql), term.lease.clone(), batch.clone());
                        self.call_removing(term, move |c| {
                            store::fetch(c, &sql, &lease, &b, after_id, page_size)
                        })
                        .await?
                    }
                };
                let mut rows = rows;
                let fetched = Instant::now();
                let returned = rows.len();
                // Rows past the page's byte budget are not part of it: the next page starts
                // at the first of them.
                let cut = rows.iter().position(|r| r.over_budget);
                if let Some(cut) = cut {
                    rows.truncate(cut);
                }
                if cut.is_none() && i64::try_from(returned).unwrap_or(i64::MAX) < page_size {
                    // A fenced fetch returns nothing, so a lapsed lease looks like the end of the
                    // batch here; that is safe because closing the batch is fenced by the same
                    // lease (a lapsed lease never comes back: renewal requires it unexpired), so
                    // the batch is not marked done and the next leader resumes it.
                    exhausted = true;
                }
                if let Some(last) = rows.last() {
                    after_id = last.id;
                }
                rows_total += rows.len();
                if !rows.is_empty() {
                    let page = self.send_page(term, rows, (batch_started, fetched)).await?;
                    inflight.push_back(page);
                }
                continue;
            }
            let Some(page) = inflight.pop_front() else {
                break;
            };
            let end = self.complete_page(term, page).await?;
            retry |= end.retry;
            if end.timed_out {
                tracing::warn!(target: TARGET, "shutdown timeout: unacknowledged events stay in the outbox");
                term.producer
                    .purge(PurgeConfig::default().queue().inflight().non_blocking());
                return Ok(BatchEnd::Shutdown);
            }
        }
        if term.shutdown.is_cancelled() {
            return Ok(BatchEnd::Shutdown);
        }
        if rows_total > 0 {
            tracing::debug!(target: TARGET, rows = rows_total, elapsed_secs = started.elapsed().as_secs_f64(), "batch delivered");
        }
        Ok(if retry {
            BatchEnd::Retry
        } else {
            BatchEnd::Done { rows: rows_total }
        })
    }

    /// Produces a page in id order. Returns one entry per row.
    async fn send_page(
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
            page.push(Entry {
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

    async fn send_one(&self, term: &mut Term<'_>, row: &outbox::StoredEvent) -> Result<Outcome> {
        loop {
            let record = FutureRecord::to(&row.topic)
                .key(row.partition_key.as_bytes())
                .payload(row.payload.as_slice())
                .timestamp(row.created_at.timestamp_millis())
                .headers(producer::headers(row, &self.source));
            match term.producer.send_result(record) {
                Ok(future) => return Ok(Outcome::Pending(future)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Back-pressure, not an error: wait for librdkafka to drain its queue, while
                    // keeping the lease and listening for shutdown.
                    if term.shutdown.is_cancelled() {
                        return Ok(Outcome::NotSent);
                    }
                    self.renew_if_due(term).await?;
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
    async fn partition_of(&self, term: &mut Term<'_>, topic: &str, key: &str) -> Option<i32> {
        if !term.partitions.contains_key(topic) {
            let (producer, t) = (term.producer.clone(), topic.to_owned());
            let count = tokio::task::spawn_blocking(move || {
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
            if let Err(e) = self.renew_if_due(term).await {
                tracing::debug!(target: TARGET, error = %e, "lease renewal after a metadata lookup failed");
            }
        }
        let count = *term.partitions.get(topic)?;
        (count > 0).then(|| producer::partition_for(key.as_bytes(), count))
    }

    /// Whether a broker answers a metadata request (then an unacknowledged event is one
    /// partition's trouble, not this process being cut off). Counts as an acknowledgement of
    /// life: the next check is a full period later.
    async fn brokers_answer(&self, term: &mut Term<'_>) -> bool {
        let producer = term.producer.clone();
        let ok = tokio::task::spawn_blocking(move || {
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
    fn send_alone(&self, term: &mut Term<'_>, row: &outbox::StoredEvent) -> Result<Outcome> {
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
    async fn await_report(
        &self,
        term: &mut Term<'_>,
        future: &mut DeliveryFuture,
        overdue_at: tokio::time::Instant,
    ) -> Result<Report> {
        loop {
            let renew_in = (self.cfg.lease_duration() / 4)
                .saturating_sub(term.last_renew.elapsed())
                .max(Duration::from_millis(10));
            let deadline = term.deadline;
            tokio::select! {
                // A report that is already there wins over any deadline that has also passed.
                biased;
                r = &mut *future => return Ok(Report::Done(report_failure(r))),
                () = tokio::time::sleep_until(overdue_at) => return Ok(Report::Overdue),
                () = tokio::time::sleep(renew_in) => self.renew_if_due(term).await?,
                () = term.shutdown.cancelled(), if deadline.is_none() => {
                    term.deadline = Some(
                        tokio::time::Instant::now() + Duration::from_millis(self.cfg.shutdown_timeout_ms),
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
    async fn complete_page(&self, term: &mut Term<'_>, page: Vec<Entry>) -> Result<PageEnd> {
        let mut settled = Settled::default();
        let mut end = PageEnd::default();
        let overdue_after = Duration::from_millis(self.cfg.ack_overdue_ms);
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
    async fn settle_overdue(&self, term: &mut Term<'_>) -> Result<()> {
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
    fn settle(
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
    async fn apply_settled(&self, term: &mut Term<'_>, settled: Settled) -> Result<()> {
        let Settled { delivered, dead } = settled;
        // Removed by the next database call (see `Term::unremoved`).
        term.unremoved.extend(delivered);
        if dead.is_empty() {
            return Ok(());
        }
        // Only events that failed with an error of their own get here: what a fatal producer
        // error fails is a `Failure::Client` and is sent again.
        for d in &dead {
            term.attempts.remove(&d.id);
        }
        let n = dead.len();
        let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
        term.db
            .call(move |c| store::dead_letter(c, &sql, &lease, &dead))
            .await?;
        m::dead_lettered(n);
        tracing::warn!(target: TARGET, count = n, "events dead-lettered");
        Ok(())
    }
}

/// Sets an event in flight aside (see [`Term::overdue`]): its key waits until it settles.
fn set_aside(term: &mut Term<'_>, mut entry: Entry, future: DeliveryFuture) {
    term.waiting
        .insert((entry.topic.clone(), entry.key.clone()), None);
    entry.outcome = Outcome::Pending(future);
    term.overdue.push(entry);
    m::waiting(term.waiting.len(), term.overdue.len());
}

/// Whether `key` is on a partition with an overdue event.
fn on_overdue_partition(
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
struct Settled {
    delivered: Vec<i64>,
    dead: Vec<DeadLetter>,
}

/// The failure a delivery report carries, if any.
fn report_failure(
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

fn backoff_policy() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(5),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

fn next(b: &mut ExponentialBackoff) -> Duration {
    b.next_backoff().unwrap_or(Duration::from_secs(5))
}

async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = shutdown.cancelled() => {}
    }
}

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rand[..8])
}
