//! The delivery engine: leadership, batches, pipelined pages, acknowledgement, removal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use chrono::Utc;
use diesel::PgConnection;
use outbox::StoredEvent;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer as _, PurgeConfig};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::config::{PoisonPolicy, RelayConfig};
use crate::producer::{self, Failure, Producer};
use crate::store::{self, Batch, DeadLetter, Lease, Sql};
use crate::{metrics as m, Error, Result};

const TARGET: &str = "outbox::relay";

/// One database connection, used from blocking threads (diesel is synchronous).
struct Db {
    url: Arc<str>,
    conn: Option<PgConnection>,
}

impl Db {
    fn new(url: &str) -> Self {
        Self {
            url: url.into(),
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
        let url = Arc::clone(&self.url);
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => match store::connect(&url) {
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
#[derive(Debug)]
pub struct Relay {
    cfg: RelayConfig,
    sql: Arc<Sql>,
    instance: String,
    source: Arc<str>,
}

/// How one capture batch ended.
enum BatchEnd {
    /// Every row was delivered or dead-lettered.
    Done { rows: usize },
    /// Some rows failed transiently; they stay in the outbox and the batch is tried again.
    Retry,
    /// Shutdown was requested; acknowledged rows were removed, the batch stays open.
    Shutdown,
}

enum Outcome {
    Pending(DeliveryFuture),
    Failed(Failure),
    Held,
}

struct Entry {
    id: i64,
    topic: String,
    key: String,
    created_at: chrono::DateTime<Utc>,
    outcome: Outcome,
}

/// Per-term state of the leader.
struct Term<'a> {
    db: &'a mut Db,
    lease: Lease,
    producer: Producer,
    last_renew: Instant,
    attempts: HashMap<i64, u32>,
    held: HashSet<(String, String)>,
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
            sql: Arc::new(Sql::new(&tables)),
            cfg,
            instance,
            source: source.into(),
        })
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
        let mut db = Db::new(&self.cfg.database_url);
        self.startup_checks(&mut db, &shutdown).await?;
        let mut backoff = backoff_policy();
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
                    let result = self.lead(&mut db, lease.clone(), &shutdown).await;
                    m::leader(false);
                    match result {
                        Ok(()) => {
                            let sql = Arc::clone(&self.sql);
                            let _ = db.call(move |c| store::release(c, &sql, &lease)).await;
                            tracing::info!(target: TARGET, "leadership released, relay stopped");
                            return Ok(());
                        }
                        Err(Error::LostLeadership(_)) => {
                            tracing::warn!(target: TARGET, epoch = lease.epoch, "lost leadership; standing by");
                        }
                        Err(e) if e.is_retriable() => {
                            tracing::warn!(target: TARGET, error = %e, "leader term ended; retrying");
                            sleep_or_cancel(next(&mut backoff), &shutdown).await;
                        }
                        Err(e) => return Err(e),
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

    async fn startup_checks(&self, db: &mut Db, shutdown: &CancellationToken) -> Result<()> {
        let tables = self.cfg.tables()?;
        let allow_superuser = self.cfg.allow_superuser;
        let mut backoff = backoff_policy();
        loop {
            let tables = tables.clone();
            let r = db
                .call(move |c| {
                    outbox::verify_schema(c, &tables)?;
                    if store::is_superuser(c)? && !allow_superuser {
                        return Err(Error::Config(
                            "the database role is a superuser: run the relay as a least-privilege \
                             role (docs/OPERATIONS.md) or set allow_superuser / --allow-superuser"
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

    async fn lead(&self, db: &mut Db, lease: Lease, shutdown: &CancellationToken) -> Result<()> {
        let producer = producer::create(&self.cfg)?;
        let mut term = Term {
            db,
            lease,
            producer,
            last_renew: Instant::now(),
            attempts: HashMap::new(),
            held: HashSet::new(),
        };
        let result = self.lead_term(&mut term, shutdown).await;
        if result.is_err() {
            // Nothing more may leave this process under a term that is over.
            term.producer
                .purge(PurgeConfig::default().queue().inflight().non_blocking());
        }
        result
    }

    async fn lead_term(&self, term: &mut Term<'_>, shutdown: &CancellationToken) -> Result<()> {
        let idle_max = Duration::from_millis(self.cfg.idle_poll_max_ms);
        let mut idle = Duration::from_millis(1);
        let mut retry = backoff_policy();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            self.renew_if_due(term).await?;
            let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
            let batch = term
                .db
                .call(move |c| store::open_batch(c, &sql, &lease))
                .await?;
            if self.cfg.poison_policy == PoisonPolicy::HoldKey {
                let sql = Arc::clone(&self.sql);
                term.held = term
                    .db
                    .call(move |c| store::held_keys(c, &sql))
                    .await?
                    .into_iter()
                    .collect();
            }
            match self.deliver_batch(term, &batch, shutdown).await? {
                BatchEnd::Done { rows } => {
                    let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
                    term.db
                        .call(move |c| store::close_batch(c, &sql, &lease))
                        .await?;
                    retry.reset();
                    if rows == 0 {
                        sleep_or_cancel(idle, shutdown).await;
                        idle = (idle * 2).min(idle_max);
                    } else {
                        idle = Duration::from_millis(1);
                    }
                }
                BatchEnd::Retry => {
                    if let Some((code, reason)) = term.producer.client().fatal_error() {
                        return Err(Error::Kafka(KafkaError::MessageProduction(code))).inspect_err(
                            |_| tracing::error!(target: TARGET, %reason, "producer fatal error"),
                        );
                    }
                    sleep_or_cancel(next(&mut retry), shutdown).await;
                }
                BatchEnd::Shutdown => return Ok(()),
            }
        }
    }

    async fn renew_if_due(&self, term: &mut Term<'_>) -> Result<()> {
        if term.last_renew.elapsed() >= self.cfg.lease_duration() / 4 {
            let (sql, lease, ms) = (Arc::clone(&self.sql), term.lease.clone(), self.cfg.lease_ms);
            term.db
                .call(move |c| store::renew(c, &sql, &lease, ms))
                .await?;
            term.last_renew = Instant::now();
        }
        Ok(())
    }

    async fn deliver_batch(
        &self,
        term: &mut Term<'_>,
        batch: &Batch,
        shutdown: &CancellationToken,
    ) -> Result<BatchEnd> {
        let page_size = self.cfg.page_size;
        let mut after_id = 0_i64;
        let mut exhausted = false;
        let mut transient = false;
        let mut rows_total = 0_usize;
        let mut inflight: VecDeque<Vec<Entry>> = VecDeque::new();
        let started = Instant::now();
        loop {
            let stopping = shutdown.is_cancelled();
            if !exhausted
                && !transient
                && !stopping
                && inflight.len() < self.cfg.max_pages_in_flight
            {
                self.renew_if_due(term).await?;
                let (sql, lease, b) = (Arc::clone(&self.sql), term.lease.clone(), batch.clone());
                let rows = term
                    .db
                    .call(move |c| store::fetch(c, &sql, &lease, &b, after_id, page_size))
                    .await?;
                exhausted = i64::try_from(rows.len()).unwrap_or(i64::MAX) < page_size;
                if let Some(last) = rows.last() {
                    after_id = last.id;
                }
                rows_total += rows.len();
                if !rows.is_empty() {
                    let page = self.send_page(term, rows).await;
                    inflight.push_back(page);
                }
                continue;
            }
            let Some(page) = inflight.pop_front() else {
                break;
            };
            if stopping {
                let deadline = Duration::from_millis(self.cfg.shutdown_timeout_ms);
                match tokio::time::timeout(deadline, self.complete_page(term, page)).await {
                    Ok(r) => transient |= r?,
                    Err(_) => {
                        tracing::warn!(target: TARGET, "shutdown timeout: unacknowledged events stay in the outbox");
                        return Ok(BatchEnd::Shutdown);
                    }
                }
            } else {
                transient |= self.complete_page(term, page).await?;
            }
        }
        if shutdown.is_cancelled() {
            return Ok(BatchEnd::Shutdown);
        }
        if rows_total > 0 {
            tracing::debug!(target: TARGET, rows = rows_total, elapsed_secs = started.elapsed().as_secs_f64(), "batch delivered");
        }
        Ok(if transient {
            BatchEnd::Retry
        } else {
            BatchEnd::Done { rows: rows_total }
        })
    }

    /// Produces a page in id order. Returns one entry per row.
    async fn send_page(&self, term: &mut Term<'_>, rows: Vec<StoredEvent>) -> Vec<Entry> {
        let mut page = Vec::with_capacity(rows.len());
        let hold = self.cfg.poison_policy == PoisonPolicy::HoldKey;
        for row in rows {
            let held_key = (row.topic.clone(), row.partition_key.clone());
            let outcome = if hold && term.held.contains(&held_key) {
                Outcome::Held
            } else {
                let outcome = self.send_one(&term.producer, &row).await;
                if hold && matches!(outcome, Outcome::Failed(Failure::Permanent(_))) {
                    term.held.insert(held_key);
                }
                outcome
            };
            page.push(Entry {
                id: row.id,
                topic: row.topic,
                key: row.partition_key,
                created_at: row.created_at,
                outcome,
            });
        }
        page
    }

    async fn send_one(&self, producer: &Producer, row: &StoredEvent) -> Outcome {
        loop {
            let record = FutureRecord::to(&row.topic)
                .key(row.partition_key.as_bytes())
                .payload(row.payload.as_slice())
                .timestamp(row.created_at.timestamp_millis())
                .headers(producer::headers(row, &self.source));
            match producer.send_result(record) {
                Ok(future) => return Outcome::Pending(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Back-pressure, not an error: let librdkafka drain its queue.
                    producer.poll(Timeout::After(Duration::from_millis(10)));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Outcome::Failed(producer::classify(&e)),
            }
        }
    }

    /// Waits for a page's acknowledgements (renewing the lease meanwhile), removes what was
    /// delivered and dead-letters what must be. Returns whether a row failed transiently.
    async fn complete_page(&self, term: &mut Term<'_>, page: Vec<Entry>) -> Result<bool> {
        let mut delivered = Vec::with_capacity(page.len());
        let mut dead = Vec::new();
        let mut transient = false;
        for entry in page {
            let failure = match entry.outcome {
                Outcome::Pending(mut future) => loop {
                    let renew_in = (self.cfg.lease_duration() / 4)
                        .saturating_sub(term.last_renew.elapsed())
                        .max(Duration::from_millis(10));
                    tokio::select! {
                        r = &mut future => break match r {
                            Ok(Ok(_delivery)) => None,
                            Ok(Err((e, _))) => Some(producer::classify(&e)),
                            Err(_canceled) => Some(Failure::Transient("delivery report lost (producer purged)".into())),
                        },
                        () = tokio::time::sleep(renew_in) => self.renew_if_due(term).await?,
                    }
                },
                Outcome::Failed(f) => Some(f),
                Outcome::Held => {
                    dead.push(DeadLetter {
                        id: entry.id,
                        error: "held: an earlier event of this key is dead-lettered (poison_policy = hold-key)".into(),
                        attempts: 0,
                    });
                    continue;
                }
            };
            match failure {
                None => {
                    let age = (Utc::now() - entry.created_at).to_std().unwrap_or_default();
                    m::delivered(age);
                    delivered.push(entry.id);
                }
                Some(f) => {
                    let attempts = term.attempts.entry(entry.id).or_insert(0);
                    *attempts += 1;
                    let permanent = matches!(f, Failure::Permanent(_));
                    m::failed(permanent);
                    tracing::warn!(target: TARGET, id = entry.id, topic = %entry.topic, key = %entry.key, attempt = *attempts, error = f.message(), permanent, "delivery failed");
                    if permanent || *attempts >= self.cfg.max_attempts {
                        dead.push(DeadLetter {
                            id: entry.id,
                            error: f.message().to_owned(),
                            attempts: i32::try_from(*attempts).unwrap_or(i32::MAX),
                        });
                    } else {
                        transient = true;
                    }
                }
            }
        }
        if !delivered.is_empty() {
            let (sql, lease) = (Arc::clone(&self.sql), term.lease.clone());
            term.db
                .call(move |c| store::delete(c, &sql, &lease, &delivered))
                .await?;
        }
        if !dead.is_empty() {
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
        }
        Ok(transient)
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
