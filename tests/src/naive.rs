//! Deliberately broken relays and writers, one per bug that shipped in hand-rolled outboxes
//! (../shared/PITFALLS.md). The fault suite runs each against the same checker as the real
//! relay, to prove the checker catches the bug:
//!
//! - [`NaiveRelay`]: the "poll by id" design (`WHERE id > last_id`, send one message, await it,
//!   move the cursor): a transaction that took a lower id and commits after a higher id was read
//!   is skipped forever. It is also the benchmark's naive contrast.
//! - [`Broken`] / [`run_broken`]: remove-before-send, advisory-lock leadership, skip on error,
//!   an xmin-horizon cursor, retry-forever without dead letters.
//! - [`run_dual_writers_until`]: the "send to Kafka inside the DB transaction" writer.

use std::time::Duration;

use anyhow::Result;
use diesel::sql_types::BigInt;
use diesel::{PgConnection, RunQueryDsl};
use outbox::StoredEvent;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The naive relay's state: just a cursor.
#[derive(Debug, Default)]
pub struct NaiveRelay {
    /// Highest id sent.
    pub last_id: i64,
}

impl NaiveRelay {
    /// Sends every row with `id > last_id` visible now, one by one, and advances the cursor.
    /// Returns how many it sent.
    pub async fn poll_once(
        &mut self,
        conn: &mut PgConnection,
        producer: &FutureProducer,
    ) -> Result<usize> {
        let rows: Vec<StoredEvent> = diesel::sql_query(format!(
            "SELECT {} FROM outbox WHERE id > $1 ORDER BY id LIMIT 1000",
            outbox::contract::EventColumns::all()
        ))
        .bind::<BigInt, _>(self.last_id)
        .load(conn)?;
        for row in &rows {
            publish(producer, row).await?;
            self.last_id = row.id;
        }
        Ok(rows.len())
    }
}

/// Publishes one outbox row (key, payload, `ce_id`) and waits for the acknowledgement.
pub async fn publish(producer: &FutureProducer, row: &StoredEvent) -> Result<()> {
    let id = row.event_id.to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: "ce_id",
        value: Some(&id),
    });
    producer
        .send(
            FutureRecord::to(&row.topic)
                .key(&row.partition_key)
                .payload(&row.payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A producer with the same safe settings as the relay's, for naive relays and baselines.
pub fn producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()?)
}

/// How a broken relay goes wrong. Each mode is a bug that shipped in some hand-rolled outbox
/// (../shared/PITFALLS.md); the fault suite runs it to prove its checks catch that bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Removes a page, commits, then publishes it: a crash in between loses the page.
    RemoveFirst,
    /// Leadership by a session advisory lock only: a paused leader keeps its session and lock,
    /// so no standby ever takes over (pitfall 4).
    AdvisoryLock,
    /// A finite `message.timeout.ms`, and a failed send is logged and removed anyway ("skip
    /// and move on"): a broker outage longer than the timeout loses events (pitfall 5).
    SkipOnError,
    /// Takes only rows older than the snapshot's xmin horizon: never skips, but one long
    /// transaction stalls every other writer's events (pitfall 2).
    Horizon,
    /// Retries a failed send forever, without dead letters: one poison event blocks
    /// everything behind it (pitfall 10).
    RetryForever,
}

impl std::str::FromStr for Broken {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "remove-first" => Self::RemoveFirst,
            "advisory-lock" => Self::AdvisoryLock,
            "skip-on-error" => Self::SkipOnError,
            "horizon" => Self::Horizon,
            "retry-forever" => Self::RetryForever,
            other => anyhow::bail!(
                "unknown broken relay mode {other:?} (remove-first, advisory-lock, \
                 skip-on-error, horizon, retry-forever)"
            ),
        })
    }
}

/// A producer with the relay's safe settings plus `extra` (e.g. a finite message timeout).
pub fn producer_with(bootstrap: &str, extra: &[(&str, &str)]) -> Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    Ok(cfg.create()?)
}

/// Runs the broken relay `mode` against `url` until `stop` is set. Returns how many events it
/// gave up on (`SkipOnError`) so a test can tell the bug was exercised.
pub async fn run_broken(
    mode: Broken,
    url: &str,
    producer: &FutureProducer,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<usize> {
    use diesel::Connection;
    use std::sync::atomic::Ordering::Relaxed;
    #[derive(diesel::QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let mut conn = PgConnection::establish(url)?;
    let mut leader = false;
    let mut skipped = 0;
    let cols = outbox::contract::EventColumns::all();
    while !stop.load(Relaxed) {
        if mode == Broken::AdvisoryLock && !leader {
            leader = diesel::sql_query("SELECT pg_try_advisory_lock(4242) AS locked")
                .get_result::<Locked>(&mut conn)?
                .locked;
            if !leader {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let rows: Vec<StoredEvent> = match mode {
            Broken::RemoveFirst => conn.transaction(|c| {
                diesel::sql_query(format!(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 200) \
                     RETURNING {cols}"
                ))
                .load(c)
            })?,
            Broken::Horizon => diesel::sql_query(format!(
                "SELECT {cols} FROM outbox \
                 WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY id LIMIT 200"
            ))
            .load(&mut conn)?,
            _ => diesel::sql_query(format!("SELECT {cols} FROM outbox ORDER BY id LIMIT 200"))
                .load(&mut conn)?,
        };
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if mode == Broken::RemoveFirst {
            // The window: removed and committed, not yet published (a slow network, a GC pause).
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut sent = Vec::with_capacity(rows.len());
        for row in &rows {
            loop {
                match publish(producer, row).await {
                    Ok(()) => break,
                    Err(e) if mode == Broken::SkipOnError => {
                        eprintln!("send of id {} failed, skipping: {e}", row.id);
                        skipped += 1;
                        break;
                    }
                    Err(_) if mode == Broken::RetryForever && !stop.load(Relaxed) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            sent.push(row.id);
        }
        if mode != Broken::RemoveFirst {
            diesel::sql_query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind::<diesel::sql_types::Array<BigInt>, _>(&sent)
                .execute(&mut conn)?;
        }
    }
    Ok(skipped)
}

/// The articles' "distributed transaction": each writer publishes its event to Kafka from
/// inside its database transaction, before COMMIT (a dual write). A crash of Postgres between the
/// send and the commit leaves an event in Kafka whose transaction never committed (I2). Writers
/// record `written (event_id, key, seq)` like the resilient writers; they run until `stop`.
pub fn run_dual_writers_until(
    url: &str,
    bootstrap: &str,
    topic: &str,
    writers: usize,
    keys: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    use diesel::Connection;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::sync::atomic::Ordering::Relaxed;
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS written (event_id text PRIMARY KEY, key text NOT NULL, \
         seq bigint NOT NULL)",
    )
    .execute(&mut conn)?;
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (url, bootstrap, topic, stop) = (
                url.to_owned(),
                bootstrap.to_owned(),
                topic.to_owned(),
                std::sync::Arc::clone(stop),
            );
            std::thread::spawn(move || -> Result<()> {
                #[derive(diesel::QueryableByName)]
                struct Seq {
                    #[diesel(sql_type = BigInt)]
                    seq: i64,
                }
                let producer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("enable.idempotence", "true")
                    .set("partitioner", "murmur2_random")
                    .create()?;
                let mut conn: Option<PgConnection> = None;
                let mut t = 0_usize;
                while !stop.load(Relaxed) {
                    t += 1;
                    let key = format!("key-{}", (w * 7919 + t * 104_729) % keys);
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match PgConnection::establish(&url) {
                            Ok(c) => conn.insert(c),
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        },
                    };
                    let r = c.transaction::<_, anyhow::Error, _>(|c| {
                        let seq = diesel::sql_query(
                            "UPDATE key_seq SET seq = seq + 1 WHERE key = $1 RETURNING seq",
                        )
                        .bind::<diesel::sql_types::Text, _>(&key)
                        .get_result::<Seq>(c)?
                        .seq;
                        let id = uuid::Uuid::new_v4().to_string();
                        diesel::sql_query("INSERT INTO written VALUES ($1, $2, $3)")
                            .bind::<diesel::sql_types::Text, _>(&id)
                            .bind::<diesel::sql_types::Text, _>(&key)
                            .bind::<BigInt, _>(seq)
                            .execute(c)?;
                        let payload = format!("{{\"seq\":{seq}}}");
                        let headers = OwnedHeaders::new().insert(Header {
                            key: "ce_id",
                            value: Some(&id),
                        });
                        producer
                            .send(
                                BaseRecord::to(&topic)
                                    .key(&key)
                                    .payload(&payload)
                                    .headers(headers),
                            )
                            .map_err(|(e, _)| e)?;
                        producer.flush(Duration::from_secs(10))?;
                        // Whatever the application does between the send and the commit.
                        std::thread::sleep(Duration::from_millis(20));
                        Ok(())
                    });
                    if r.is_err() {
                        conn = None;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    Ok(())
}

/// A broken streaming relay: reads the slot's transactions and confirms each one as soon as it
/// is read, before anything is sent, then stops (as if killed) having sent nothing. Returns how
/// many transactions it confirmed. What it confirmed is gone from the slot's stream.
///
/// # Errors
/// The replication connection's.
pub async fn confirm_on_read(database_url: &str, slot: &str, publication: &str) -> Result<usize> {
    use pg_walstream::{
        CancellationToken, EventType, LogicalReplicationStream, ReplicationStreamConfig,
        RetryConfig, StreamingMode,
    };
    let config = ReplicationStreamConfig::new(
        slot.to_owned(),
        publication.to_owned(),
        1,
        StreamingMode::Off,
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(3600),
        RetryConfig::default(),
    )
    .with_messages(true)
    .with_binary(true)
    .with_existing_slot_required(true);
    let sep = if database_url.contains('?') { '&' } else { '?' };
    let conninfo = format!("{database_url}{sep}replication=database");
    let mut stream = LogicalReplicationStream::new(&conninfo, config).await?;
    stream.start(None).await?;
    let stop = CancellationToken::new();
    let mut commits = 0;
    loop {
        let next =
            tokio::time::timeout(std::time::Duration::from_secs(3), stream.next_event(&stop)).await;
        let Ok(event) = next else { break };
        if let EventType::Commit { end_lsn, .. } = event?.event_type {
            stream.shared_lsn_feedback.update_flushed_lsn(end_lsn);
            stream.shared_lsn_feedback.update_applied_lsn(end_lsn);
            stream.send_feedback().await?;
            commits += 1;
        }
    }
    Ok(commits)
}
