//! Application load: writer threads doing the app's transaction (a business row, optionally
//! with outbox events), flat out or paced, plus the latency probe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diesel::connection::SimpleConnection;
use diesel::ExpressionMethods;
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::Event;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

diesel::table! {
    bench_orders (id) {
        id -> BigInt,
        customer -> Text,
        amount -> BigInt,
        note -> Text,
        created_at -> Timestamptz,
    }
}

/// The business table the application writes in every transaction.
pub fn create_business_table(conn: &mut PgConnection) -> Result<()> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS bench_orders (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             customer text NOT NULL,
             amount bigint NOT NULL,
             note text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    Ok(())
}

/// One application transaction: a business row and, with a topic, `per_tx` events through
/// `outbox` (rows of the table, or tableless messages). Returns `(id, event id)` of each event.
pub(crate) fn app_tx(
    conn: &mut PgConnection,
    topic: Option<&str>,
    outbox: &outbox::Outbox,
    per_tx: usize,
    seq: usize,
) -> Result<Vec<(i64, String)>> {
    let note = "n".repeat(100);
    conn.transaction::<_, anyhow::Error, _>(|c| {
        // The diesel DSL, as an application writes it: a prepared statement cached on the
        // connection (so is the outbox's one-row INSERT).
        diesel::insert_into(bench_orders::table)
            .values((
                bench_orders::customer.eq(format!("c-{}", seq % 1000)),
                bench_orders::amount.eq(i64::try_from(seq % 10_000)?),
                bench_orders::note.eq(&note),
            ))
            .execute(c)?;
        let Some(topic) = topic else {
            return Ok(Vec::new());
        };
        let events = (0..per_tx)
            .map(|i| {
                Event::builder(
                    topic,
                    format!("k-{}", (seq * per_tx + i) % crate::KEYS),
                    "OrderPlaced",
                )
                .bytes(crate::payload(), "application/octet-stream")
                .build()
            })
            .collect::<outbox::Result<Vec<_>>>()?;
        let rows = if per_tx == 1 {
            vec![outbox.enqueue(c, &events[0])?]
        } else {
            outbox.enqueue_batch(c, &events)?
        };
        Ok(rows
            .iter()
            .map(|r| (r.id, r.event_id.to_string()))
            .collect())
    })
}

/// What a flat-out run measured.
#[derive(Debug, Default)]
pub struct Load {
    pub events: usize,
    pub txs: usize,
    pub elapsed: Duration,
    /// `(since start, backlog, events committed so far)` every 500 ms.
    pub samples: Vec<(Duration, i64, usize)>,
    pub max_backlog: i64,
    pub end_backlog: i64,
    /// WAL the whole server wrote during the window, bytes.
    pub wal_bytes: i64,
}

impl Load {
    /// `writers` connections run the app transaction as fast as they can for `window`; with a
    /// relay's acknowledgements (`acked`), the backlog (events committed in this window and not
    /// yet acknowledged) is sampled every 500 ms.
    pub async fn flat_out(
        url: &str,
        topic: Option<&str>,
        outbox: &outbox::Outbox,
        writers: usize,
        per_tx: usize,
        window: Duration,
        acked: Option<&AckLog>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicUsize::new(0));
        let txs = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (url, topic) = (url.to_owned(), topic.map(str::to_owned));
                let outbox = outbox.clone();
                let (stop, events, txs) =
                    (Arc::clone(&stop), Arc::clone(&events), Arc::clone(&txs));
                std::thread::spawn(move || -> Result<()> {
                    let mut c = PgConnection::establish(&url)?;
                    let mut seq = w * 1_000_003;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let ids = app_tx(&mut c, topic.as_deref(), &outbox, per_tx, seq)?;
                        events.fetch_add(ids.len(), Ordering::Relaxed);
                        txs.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut probe = PgConnection::establish(url)?;
        let wal_before = crate::wal_position(&mut probe)?;
        let started = Instant::now();
        let mut load = Self::default();
        let base = acked.map_or(0, AckLog::acked);
        while started.elapsed() < window {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let (Some(a), Some(_)) = (acked, topic) {
                let committed = events.load(Ordering::Relaxed);
                let b = i64::try_from(committed)? - i64::try_from(a.acked() - base)?;
                load.max_backlog = load.max_backlog.max(b);
                load.samples.push((started.elapsed(), b, committed));
            }
        }
        stop.store(true, Ordering::Relaxed);
        load.elapsed = started.elapsed();
        load.wal_bytes = crate::wal_position(&mut probe)? - wal_before;
        load.events = events.load(Ordering::Relaxed);
        load.txs = txs.load(Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        load.end_backlog = load.samples.last().map_or(0, |s| s.1);
        Ok(load)
    }

    #[must_use]
    pub fn tx_rate(&self) -> f64 {
        crate::rate(self.txs, self.elapsed)
    }

    #[must_use]
    pub fn event_rate(&self) -> f64 {
        crate::rate(self.events, self.elapsed)
    }

    /// WAL bytes per transaction over the window.
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn wal_per_tx(&self) -> f64 {
        self.wal_bytes as f64 / self.txs.max(1) as f64
    }

    /// The backlog did not grow over the window: the mean of its last third is within 1.5x the
    /// mean of its first third plus the relay's in-flight allowance (4 pages of 1000).
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn backlog_bounded(&self) -> bool {
        let n = self.samples.len();
        if n < 3 {
            return self.end_backlog <= 5000;
        }
        let mean = |s: &[(Duration, i64, usize)]| {
            s.iter().map(|x| x.1 as f64).sum::<f64>() / s.len().max(1) as f64
        };
        mean(&self.samples[n - n / 3..]) <= mean(&self.samples[..n / 3]) * 1.5 + 5000.0
    }

    /// Events delivered per second over the last third of the window (committed minus the
    /// backlog's growth).
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn delivered_rate_last_third(&self) -> f64 {
        let n = self.samples.len();
        if n < 3 {
            return self.event_rate();
        }
        let (t0, b0, c0) = self.samples[n - 1 - n / 3];
        let (t1, b1, c1) = self.samples[n - 1];
        let delivered = (c1 - c0) as f64 - (b1 - b0) as f64;
        delivered / (t1 - t0).as_secs_f64().max(1e-9)
    }
}

/// A latency distribution, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latencies {
    /// Events per second actually offered.
    pub rate: f64,
    /// Events committed (offered).
    pub committed: usize,
    /// Events the independent consumer received.
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Commit-to-ack: from the writer's COMMIT returning to the relay seeing the broker's
    /// acknowledgement of that event (exact, per event); for the broker-alone baseline, send to
    /// acknowledgement.
    pub ack: Option<AckLatency>,
}

/// Commit-to-ack quantiles (for the broker-alone row: send to ack).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AckLatency {
    pub count: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Share of events acknowledged within 2, 5, 10 and 25 ms of their commit.
    pub within_2ms: f64,
    pub within_5ms: f64,
    pub within_10ms: f64,
    pub within_25ms: f64,
    /// Where the relay's share went (relay rows only).
    pub stages: Option<Stages>,
}

impl AckLatency {
    /// Quantiles and shares of `sorted` (milliseconds, ascending).
    #[allow(clippy::cast_precision_loss)]
    fn from_sorted(sorted: &[f64], stages: Option<Stages>) -> Self {
        let share = |bound: f64| {
            sorted.iter().filter(|a| **a <= bound).count() as f64 / sorted.len().max(1) as f64
        };
        Self {
            count: sorted.len() as f64,
            p50_ms: quantile(sorted, 0.5),
            p99_ms: quantile(sorted, 0.99),
            p999_ms: quantile(sorted, 0.999),
            within_2ms: share(2.0),
            within_5ms: share(5.0),
            within_10ms: share(10.0),
            within_25ms: share(25.0),
            stages,
        }
    }
}

/// The relay's commit-to-ack split in two stages, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    /// Writer's COMMIT returned -> the relay fetched the event's page (capture).
    pub capture_p50_ms: f64,
    pub capture_p99_ms: f64,
    /// Of that, the relay opening the batch and fetching the page (its statements).
    pub open_fetch_p50_ms: f64,
    /// Page fetched -> the broker's acknowledgement seen (send, broker, ack).
    pub send_ack_p50_ms: f64,
    pub send_ack_p99_ms: f64,
}

/// Acknowledgements the in-process relay reports ([`outbox_relay::Relay::on_acknowledged`]): all
/// of them counted, and while recording is on, id -> (page fetched, acknowledgement seen).
#[derive(Clone, Default)]
pub struct AckLog {
    recording: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    /// Subtracted from a tableless event's acknowledged id (negative) before it is matched to
    /// the id `outbox_emit` returned (0 when the two agree, as measured at the start of the
    /// tableless scenarios).
    tableless_offset: Arc<std::sync::atomic::AtomicI64>,
    acks: Arc<Mutex<HashMap<i64, outbox_relay::Acknowledged>>>,
}

impl AckLog {
    /// The listener to give the relay.
    #[must_use]
    pub fn listener(&self) -> outbox_relay::AckListener {
        let (recording, acks) = (Arc::clone(&self.recording), Arc::clone(&self.acks));
        let count = Arc::clone(&self.count);
        let offset = Arc::clone(&self.tableless_offset);
        Arc::new(move |a: outbox_relay::Acknowledged| {
            count.fetch_add(1, Ordering::Relaxed);
            if recording.load(Ordering::Relaxed) {
                let id = if a.id < 0 {
                    a.id - offset.load(Ordering::Relaxed)
                } else {
                    a.id
                };
                if let Ok(mut m) = acks.lock() {
                    m.insert(id, a);
                }
            }
        })
    }

    /// Sets the offset between a tableless event's acknowledged id and its enqueued id.
    pub fn set_tableless_offset(&self, offset: i64) {
        self.tableless_offset.store(offset, Ordering::Relaxed);
    }

    /// Acknowledgements seen so far (recording or not).
    #[must_use]
    pub fn acked(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `target` acknowledgements were seen in all; fails when none came for
    /// `stall` (with the count, so a hang is reported, not waited out). Returns the wait.
    pub async fn wait_for(&self, target: usize, stall: Duration) -> Result<Duration> {
        let started = Instant::now();
        let (mut last, mut moved) = (self.acked(), Instant::now());
        while self.acked() < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.acked();
            if now != last {
                (last, moved) = (now, Instant::now());
            } else if moved.elapsed() > stall {
                anyhow::bail!(
                    "{now} of {target} events acknowledged; none for {:.0} s",
                    stall.as_secs_f64()
                );
            }
        }
        Ok(started.elapsed())
    }

    pub(crate) fn start(&self) {
        if let Ok(mut m) = self.acks.lock() {
            m.clear();
        }
        self.recording.store(true, Ordering::Relaxed);
    }

    pub(crate) fn stop(&self) -> HashMap<i64, outbox_relay::Acknowledged> {
        self.recording.store(false, Ordering::Relaxed);
        self.acks
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// Exact commit-to-ack quantiles from the writers' commit instants and the relay's
/// acknowledgements, with the split into capture (commit to page fetched) and send-to-ack.
#[allow(clippy::cast_precision_loss)]
fn commit_to_ack(
    committed: &HashMap<i64, Instant>,
    acks: &HashMap<i64, outbox_relay::Acknowledged>,
) -> Option<AckLatency> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut total = Vec::with_capacity(committed.len());
    let mut capture = Vec::with_capacity(committed.len());
    let mut open = Vec::with_capacity(committed.len());
    let mut send = Vec::with_capacity(committed.len());
    for (id, c) in committed {
        if let Some(a) = acks.get(id) {
            total.push(ms(a.acknowledged.saturating_duration_since(*c)));
            capture.push(ms(a.fetched.saturating_duration_since(*c)));
            open.push(ms(a.fetched.saturating_duration_since(a.batch_started)));
            send.push(ms(a.acknowledged.saturating_duration_since(a.fetched)));
        }
    }
    if total.is_empty() {
        return None;
    }
    for v in [&mut total, &mut capture, &mut open, &mut send] {
        v.sort_by(f64::total_cmp);
    }
    Some(AckLatency::from_sorted(
        &total,
        Some(Stages {
            capture_p50_ms: quantile(&capture, 0.5),
            capture_p99_ms: quantile(&capture, 0.99),
            open_fetch_p50_ms: quantile(&open, 0.5),
            send_ack_p50_ms: quantile(&send, 0.5),
            send_ack_p99_ms: quantile(&send, 0.99),
        }),
    ))
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A thread reading `topic` from its current end while `reading` is set: `(ce_id, received)`.
fn spawn_tail_reader(
    bootstrap: &str,
    topic: &str,
    reading: &Arc<AtomicBool>,
    received: &Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Result<Vec<(String, Instant)>>> {
    let (b, t, r) = (bootstrap.to_owned(), topic.to_owned(), Arc::clone(reading));
    let n = Arc::clone(received);
    std::thread::spawn(move || {
        let c = tail_consumer(&b, &t)?;
        let mut got = Vec::new();
        while r.load(Ordering::Relaxed) {
            if let Some(m) = c.poll(Duration::from_millis(20)) {
                let m = m?;
                let at = Instant::now();
                if let Some(id) = outbox_tests::check::header(&m.detach(), "ce_id") {
                    got.push((id, at));
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(got)
    })
}

/// A consumer positioned at the current end of every partition of `topic`.
fn tail_consumer(bootstrap: &str, topic: &str) -> Result<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", outbox_tests::unique_name("bench-latency"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .context("topic metadata")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..i32::try_from(partitions)? {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

impl Load {
    /// Paced writers offering `rate` events/s (one event per transaction) for `window`; each
    /// event's latency runs from the writer's COMMIT returning to an independent consumer
    /// receiving it (commit-to-consume, an upper bound of commit-to-ack).
    #[allow(clippy::cast_precision_loss)]
    #[allow(clippy::too_many_arguments)]
    pub async fn paced_latency(
        url: &str,
        bootstrap: &str,
        topic: &str,
        outbox: &outbox::Outbox,
        writers: usize,
        rate: f64,
        window: Duration,
        acks: &AckLog,
    ) -> Result<Latencies> {
        let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let committed_rows: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reading = Arc::new(AtomicBool::new(true));
        let received = Arc::new(AtomicUsize::new(0));
        let consumer = spawn_tail_reader(bootstrap, topic, &reading, &received);
        // Let the consumer start fetching before anything is written.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let per_writer = Duration::from_secs_f64(writers as f64 / rate.max(1.0));
        let acked_before = acks.acked();
        acks.start();
        let started = Instant::now();
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (url, topic) = (url.to_owned(), topic.to_owned());
                let outbox = outbox.clone();
                let (stop, committed, rows) = (
                    Arc::clone(&stop),
                    Arc::clone(&committed),
                    Arc::clone(&committed_rows),
                );
                std::thread::spawn(move || -> Result<()> {
                    let mut c = PgConnection::establish(&url)?;
                    // Spread the writers' schedules over one interval.
                    let mut next = Instant::now() + per_writer.mul_f64(w as f64 / writers as f64);
                    let mut seq = w * 1_000_003;
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += per_writer;
                        seq += 1;
                        let ids = app_tx(&mut c, Some(&topic), &outbox, 1, seq)?;
                        let at = Instant::now();
                        let mut map = committed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        let mut by_row = rows.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        for (row, id) in ids {
                            map.insert(id, at);
                            by_row.insert(row, at);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        let offered_for = started.elapsed();
        let total = committed
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .len();
        // Wait for the stragglers (bounded): until the consumer has every event, 3 s at most.
        let waiting = Instant::now();
        while received.load(Ordering::Relaxed) < total && waiting.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Acknowledgements may trail the consumer by a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        reading.store(false, Ordering::Relaxed);
        let got = consumer
            .join()
            .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
        let acked = acks.acked() - acked_before;
        let (ack, matched) = {
            let rows = committed_rows
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            let seen = acks.stop();
            let matched = rows.keys().filter(|id| seen.contains_key(id)).count();
            (commit_to_ack(&rows, &seen), matched)
        };
        let committed = committed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut ms: Vec<f64> = got
            .iter()
            .filter_map(|(id, at)| {
                committed
                    .get(id)
                    .map(|c| at.saturating_duration_since(*c).as_secs_f64() * 1000.0)
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        anyhow::ensure!(
            ms.len() * 100 >= total * 99,
            "only {} of {total} events were consumed within 3 s of the end ({} messages on the \
             topic; the relay acknowledged {acked} events meanwhile, {matched} of them matched \
             to these commits)",
            ms.len(),
            got.len()
        );
        Ok(Latencies {
            rate: crate::rate(total, offered_for),
            committed: total,
            count: ms.len(),
            p50_ms: quantile(&ms, 0.5),
            p99_ms: quantile(&ms, 0.99),
            p999_ms: quantile(&ms, 0.999),
            max_ms: ms.last().copied().unwrap_or_default(),
            ack,
        })
    }
}

/// A transaction that wrote one outbox event and stays open until [`Held::commit`].
pub struct Held {
    release: std::sync::mpsc::Sender<()>,
    handle: std::thread::JoinHandle<Result<Duration>>,
}

/// Opens the transaction (returns once it has written its event through `outbox`).
pub async fn hold_open(url: &str, topic: &str, outbox: &outbox::Outbox) -> Result<Held> {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened) = std::sync::mpsc::channel::<()>();
    let (url, topic) = (url.to_owned(), topic.to_owned());
    let outbox = outbox.clone();
    let handle = std::thread::spawn(move || -> Result<Duration> {
        use diesel::connection::{AnsiTransactionManager, TransactionManager};
        let mut c = PgConnection::establish(&url)?;
        AnsiTransactionManager::begin_transaction(&mut c)?;
        let e = Event::builder(&topic, "held", "Held")
            .bytes(crate::payload(), "application/octet-stream")
            .build()?;
        outbox.enqueue(&mut c, &e)?;
        let started = Instant::now();
        let _ = opened_tx.send(());
        let _ = wait.recv();
        AnsiTransactionManager::commit_transaction(&mut c)?;
        Ok(started.elapsed())
    });
    tokio::task::spawn_blocking(move || opened.recv()).await??;
    Ok(Held { release, handle })
}

impl Held {
    /// Commits; returns how long the transaction was open.
    pub async fn commit(self) -> Result<Duration> {
        let _ = self.release.send(());
        let handle = self.handle;
        tokio::task::spawn_blocking(move || {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("holder panicked"))
        })
        .await??
    }
}

/// The broker's own latency floor: messages produced at `rate` per second with the relay's
/// producer settings, each timed from the send call to an independent consumer receiving it
/// (no database involved).
#[allow(clippy::cast_precision_loss)]
pub async fn broker_latency(
    cfg: &outbox_relay::RelayConfig,
    bootstrap: &str,
    topic: &str,
    rate: f64,
    window: Duration,
) -> Result<Latencies> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = outbox_relay::producer::client_config(cfg).create()?;
    let reading = Arc::new(AtomicBool::new(true));
    let received = Arc::new(AtomicUsize::new(0));
    let consumer = spawn_tail_reader(bootstrap, topic, &reading, &received);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let body = crate::payload();
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut pending: Vec<tokio::task::JoinHandle<Result<Duration>>> = Vec::new();
    let started = Instant::now();
    let mut next = Instant::now();
    let mut i = 0_usize;
    while started.elapsed() < window {
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        next += interval;
        i += 1;
        let id = uuid::Uuid::now_v7().to_string();
        let key = format!("k-{}", i % crate::KEYS);
        let headers = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(&id),
        });
        let at = Instant::now();
        sent.insert(id.clone(), at);
        let delivery = producer
            .send_result(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&body)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)?;
        pending.push(tokio::spawn(async move {
            delivery.await?.map_err(|(e, _)| e)?;
            Ok(at.elapsed())
        }));
    }
    let mut acks = Vec::with_capacity(pending.len());
    for p in pending {
        acks.push(p.await??.as_secs_f64() * 1000.0);
    }
    acks.sort_by(f64::total_cmp);
    let offered_for = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    reading.store(false, Ordering::Relaxed);
    let got = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
    let mut ms: Vec<f64> = got
        .iter()
        .filter_map(|(id, at)| {
            sent.get(id)
                .map(|s| at.saturating_duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let ack = AckLatency::from_sorted(&acks, None);
    Ok(Latencies {
        rate: crate::rate(sent.len(), offered_for),
        committed: sent.len(),
        count: ms.len(),
        p50_ms: quantile(&ms, 0.5),
        p99_ms: quantile(&ms, 0.99),
        p999_ms: quantile(&ms, 0.999),
        max_ms: ms.last().copied().unwrap_or_default(),
        ack: Some(ack),
    })
}
