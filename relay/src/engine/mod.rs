//! The delivery engine: leadership, batches, pipelined pages, acknowledgement, removal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer as _, PurgeConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CaptureMode, PoisonPolicy, RelayConfig};
use crate::producer;
use crate::store::{self, Fetched, Lease, Sql};

mod capture;
mod delivery;
mod session;
pub(crate) mod streaming;

use crate::{metrics as m, Error, Result};
use capture::{Capture, Open, Opened, Polling};
use delivery::{on_overdue_partition, Attempts, Entry, Term, TopicKey};
use session::{Db, Session};
use streaming::{StreamSettings, Streaming};

const TARGET: &str = "outbox::relay";

/// How often, at most, the position (the batch snapshots) is written to the state row while
/// batches are delivered; see [`store::advance_batch`].
const SAVE_BATCH_EVERY: Duration = Duration::from_secs(1);

/// A leader with overdue events that has had no acknowledgement at all for this many times
/// `ack_overdue` gives up its lease (one unavailable partition does not: the others go on
/// acknowledging).
const STEP_DOWN_AFTER_OVERDUE: u32 = 6;

/// The relay for one outbox table. See the crate docs for the guarantees.
pub struct Relay {
    cfg: RelayConfig,
    sql: Arc<Sql>,
    instance: String,
    source: Arc<str>,
    ack_listener: Option<AckListener>,
    /// The broken variant of streaming's catch-up (tests only): see
    /// [`Relay::broken_variant_resend_removed_rows`].
    resend_removed: bool,
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
#[derive(Debug, Clone)]
pub struct Acknowledged {
    /// The outbox row id (what [`outbox::Enqueued::id`] returned to the writer).
    pub id: i64,
    /// The event's message key.
    pub partition_key: String,
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
            resend_removed: false,
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

    /// TESTS ONLY, a broken variant: streaming sends again every row it re-reads from the slot,
    /// even those an earlier term delivered and removed (the duplicates a slot that resumes
    /// far back would cause without the check).
    #[doc(hidden)]
    #[must_use]
    pub fn broken_variant_resend_removed_rows(mut self) -> Self {
        self.resend_removed = true;
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
        let app_name = store::application_name(&self.instance);
        // Streaming confirms the slot past a row once its removal returned: a removal lost in a
        // database crash (synchronous_commit = off) would leave that row in the table for good,
        // the slot never sending it again. So the relay's own commits wait for the WAL flush.
        let synchronous_commit = match self.cfg.capture {
            CaptureMode::Polling => self.cfg.synchronous_commit.as_str(),
            CaptureMode::Streaming => "on",
        };
        let mut db = Db::new(&self.cfg.database_url, &app_name, synchronous_commit);
        self.startup_checks(&mut db, &shutdown).await?;
        let mut backoff = backoff_policy();
        let mut attempts: HashMap<i64, Attempts> = HashMap::new();
        tracing::info!(target: TARGET, instance = %self.instance, outbox = %self.sql.key(), capture = ?self.cfg.capture, "relay started");
        if self.cfg.capture == CaptureMode::Polling {
            tracing::info!(target: TARGET, "polling capture: per-key order is commit order between capture snapshots and id order within one (two transactions of a key committing in the opposite order of their ids inside one window leave in id order); capture = streaming gives commit order exactly (docs/RELAY.md#capture-modes)");
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let sql = Arc::clone(&self.sql);
            let instance = self.instance.clone();
            let lease_ms = self.cfg.lease.as_ms();
            match db
                .call(move |c| store::try_acquire(c, &sql, &instance, lease_ms))
                .await
            {
                Ok(Some(lease)) => {
                    backoff.reset();
                    tracing::info!(target: TARGET, instance = %lease.instance, epoch = lease.epoch, "leadership acquired");
                    m::leader(true);
                    let result = match self.cfg.capture {
                        CaptureMode::Polling => {
                            self.lead(&Polling, &mut db, &mut attempts, lease.clone(), &shutdown)
                                .await
                        }
                        CaptureMode::Streaming => {
                            let capture = Streaming::new(self.stream_settings(&app_name));
                            self.lead(&capture, &mut db, &mut attempts, lease.clone(), &shutdown)
                                .await
                        }
                    };
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
                                self.cfg.lease_duration() + self.cfg.standby_poll.0 * 2,
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
                    sleep_or_cancel(self.cfg.standby_poll.0, &shutdown).await;
                }
                Err(e) if e.is_retriable() => {
                    tracing::warn!(target: TARGET, error = %e, "cannot reach the database; retrying");
                    sleep_or_cancel(next(&mut backoff), &shutdown).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn stream_settings(&self, app_name: &str) -> StreamSettings {
        StreamSettings {
            url: self.cfg.database_url.clone(),
            application_name: app_name.to_owned(),
            slot: self.cfg.slot_name(),
            publication: self.cfg.publication_name(),
            capture_tables: self.cfg.captured_tables().unwrap_or_default(),
            capture_publication: self.cfg.capture_publication_name(),
            capture_topic: self.cfg.capture_topic_pattern().to_owned(),
            capture_columns: self.cfg.capture_columns().unwrap_or_default(),
            snapshots_table: self
                .cfg
                .tables()
                .map(|t| t.qualify(outbox::contract::Table::Snapshots).to_string())
                .unwrap_or_default(),
            schema: self.cfg.schema.clone(),
            max_event_bytes: usize::try_from(self.cfg.max_event_bytes()).unwrap_or(usize::MAX),
            page_bytes: usize::try_from(store::DEFAULT_PAGE_BYTES).unwrap_or(usize::MAX),
            // A safety net only: a new leader ends the old walsender itself (fenced), and a
            // reader held up by back-pressure (the log full during a broker outage) must not
            // lose its connection to a short timeout.
            wal_sender_timeout: (self.cfg.lease_duration() * 10).max(Duration::from_secs(60)),
            wait: self.cfg.lease_duration() / 8,
            batch_events: usize::try_from(self.cfg.page_size)
                .unwrap_or(1000)
                .saturating_mul(self.cfg.max_pages_in_flight)
                .saturating_mul(2),
            skip_removed: !self.resend_removed,
        }
    }

    async fn release(&self, db: &mut Db, lease: Lease) {
        Session::release(db, &self.sql, lease).await;
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
                    outbox::Outbox::with_tables(tables.clone()).verify_schema(c)?;
                    if store::is_superuser(c)? && !allow_superuser {
                        return Err(Error::Superuser);
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

    async fn lead<C: Capture>(
        &self,
        capture: &C,
        db: &mut Db,
        attempts: &mut HashMap<i64, Attempts>,
        lease: Lease,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let producer = producer::create(&self.cfg)?;
        let mut session = Session::new(db, Arc::clone(&self.sql), lease, self.cfg.lease_duration());
        if C::PUSHES {
            session = session.track_settled();
        }
        let mut term = Term {
            session,
            producer,
            shutdown: shutdown.clone(),
            deadline: None,
            attempts,
            held: HashSet::new(),
            blocked: HashSet::new(),
            overdue: Vec::new(),
            waiting: HashMap::new(),
            last_ack: Instant::now(),
            solo: None,
            partitions: HashMap::new(),
            overdue_partitions: HashSet::new(),
            queue_full_since: None,
        };
        // Retention purges run beside delivery, on their own short-lived connection.
        let purge_stop = shutdown.child_token();
        let tasks = TaskTracker::new();
        crate::retention::spawn(
            &self.cfg,
            store::application_name(&self.instance),
            purge_stop.clone(),
            &tasks,
        );
        let result = self.lead_term(capture, &mut term).await;
        capture.finish(&mut term.session).await;
        m::waiting(0, 0);
        purge_stop.cancel();
        if result.is_err() {
            // Nothing more may leave this process under a term that is over.
            term.producer
                .purge(PurgeConfig::default().queue().inflight().non_blocking());
        }
        // The purge ends after the batch in progress, if any.
        tasks.close();
        tasks.wait().await;
        result
    }

    async fn lead_term<C: Capture>(&self, capture: &C, term: &mut Term<'_>) -> Result<()> {
        let idle_max = self.cfg.idle_poll_max.0;
        let mut idle = Duration::from_millis(1);
        let mut retry = backoff_policy();
        // The batch just delivered in full: its snapshot is the next one's lower bound. `None`
        // at the start of the term: the saved batch (a previous leader's, or ours) is resumed.
        let mut done: Option<C::Batch> = None;
        // A batch to deliver again (some of its rows failed).
        let mut again: Option<C::Batch> = None;
        let mut saved = Instant::now();
        let mut held_read = false;
        loop {
            if term.shutdown.is_cancelled() {
                match done {
                    Some(d) if term.waiting.is_empty() => save(capture, term, d, true).await,
                    _ if term.session.has_unremoved() => term.session.flush_removals().await,
                    _ => {}
                }
                return Ok(());
            }
            term.session.renew_if_due().await?;
            self.settle_overdue(term).await?;
            if self.cut_off(term).await {
                // Cut off from the brokers (events overdue, nothing acknowledged, no metadata):
                // keeping the lease would keep a standby that reaches them from delivering.
                term.session.flush_removals().await;
                return Err(Error::SteppedDown(term.last_ack.elapsed()));
            }
            if resume_due_keys(term) {
                again = None;
                done = None;
            }
            let batch_started = Instant::now();
            let (batch, first_page) = match (again.take(), done.take()) {
                (Some(b), _) => (b, None),
                (None, previous) => {
                    self.open_next(capture, term, previous, &mut saved, &mut held_read)
                        .await?
                }
            };
            term.blocked.clear();
            let end = self
                .deliver_batch(capture, term, &batch, batch_started, first_page)
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
                term.session.flush_removals().await;
                return Err(Error::Kafka(KafkaError::MessageProduction(code)));
            }
            match end {
                BatchEnd::Done { rows } => {
                    done = Some(batch);
                    retry.reset();
                    if rows == 0 && !C::PUSHES {
                        // idle_poll_max_ms < lease / 4 (validated): the lease cannot lapse here.
                        sleep_or_cancel(idle, &term.shutdown).await;
                        idle = (idle * 2).min(idle_max);
                    } else {
                        idle = Duration::from_millis(1);
                    }
                }
                BatchEnd::Retry => {
                    again = Some(batch);
                    term.session
                        .sleep_renewing(next(&mut retry), &term.shutdown)
                        .await?;
                }
                BatchEnd::Shutdown => {
                    if term.waiting.is_empty() {
                        save(capture, term, batch, false).await;
                    } else {
                        term.session.flush_removals().await;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Whether the leader is cut off from the brokers: events overdue, no acknowledgement for
    /// `STEP_DOWN_AFTER_OVERDUE` x `ack_overdue`, and no broker answering a metadata request.
    async fn cut_off(&self, term: &mut Term<'_>) -> bool {
        let silent_for = self.cfg.ack_overdue.0 * STEP_DOWN_AFTER_OVERDUE;
        !term.overdue.is_empty()
            && term.last_ack.elapsed() >= silent_for
            && !self.brokers_answer(term).await
    }

    /// Opens the batch after `previous` (or resumes the saved position) with its first page.
    /// One blocking call: it removes the previous batch's last acknowledged rows first.
    async fn open_next<C: Capture>(
        &self,
        capture: &C,
        term: &mut Term<'_>,
        previous: Option<C::Batch>,
        saved: &mut Instant,
        held_read: &mut bool,
    ) -> Result<(C::Batch, Option<Vec<Fetched>>)> {
        // One blocking call: remove the previous batch's last acknowledged rows,
        // open the next batch, fetch its first page.
        let save =
            (previous.is_none() || saved.elapsed() >= SAVE_BATCH_EVERY) && term.waiting.is_empty();
        // Which keys have dead letters (`hold-key`): read when the term starts;
        // after that only this leader adds any (and records them itself), so they
        // are read again only while some key is held, to see an operator's retry
        // or purge (see `Open::read_held` for why before the batch's position).
        let read_held = self.cfg.poison_policy == PoisonPolicy::HoldKey
            && (!*held_read || !term.held.is_empty());
        let open = Open {
            save,
            read_held,
            page_size: self.cfg.page_size,
        };
        let Opened {
            batch: b,
            first_page: rows,
            held,
        } = capture.open(&mut term.session, previous, open).await?;
        if save {
            *saved = Instant::now();
        }
        if let Some(held) = held {
            term.held = held.into_iter().collect();
            *held_read = true;
        }
        Ok((b, rows))
    }

    async fn deliver_batch<C: Capture>(
        &self,
        capture: &C,
        term: &mut Term<'_>,
        batch: &C::Batch,
        batch_started: Instant,
        mut first_page: Option<Vec<Fetched>>,
    ) -> Result<BatchEnd> {
        let page_size = self.cfg.page_size;
        // An empty batch (found through the tx_id index) needs no fetch at all.
        let mut exhausted = C::start_after(batch).is_none();
        let mut after_id = C::start_after(batch).unwrap_or(i64::MAX);
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
                        term.session.renew_if_due().await?;
                        capture
                            .page(&mut term.session, batch, after_id, page_size)
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
}

/// Keys that waited and whose time has come (nothing of theirs overdue, their retry due, their
/// partition no longer overdue) stop waiting. Returns whether any did: capture then resumes
/// from the saved position (older than every row left behind), which sends their events in
/// order; the other keys go on waiting. Nothing else is in flight then, and what was delivered
/// since that position was removed.
fn resume_due_keys(term: &mut Term<'_>) -> bool {
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
    if !term.waiting.iter().any(|(k, at)| !still_waits(k, at)) {
        return false;
    }
    let before = term.waiting.len();
    term.waiting.retain(|k, at| still_waits(k, at));
    tracing::info!(target: TARGET, resumed = before - term.waiting.len(), still_waiting = term.waiting.len(), "waiting keys are due again; resuming them from the saved position");
    m::waiting(term.waiting.len(), term.overdue.len());
    true
}

/// Removes what was acknowledged and records the position at the end of a term (best effort:
/// if it fails, the next leader resumes an older saved batch and re-sends only what is still in
/// the outbox).
async fn save<C: Capture>(capture: &C, term: &mut Term<'_>, batch: C::Batch, done: bool) {
    if let Err(e) = capture.save(&mut term.session, batch, done).await {
        tracing::debug!(target: TARGET, error = %e, "could not save the batch position");
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
