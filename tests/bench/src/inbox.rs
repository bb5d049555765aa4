//! S6: the inbox consumer against raw consumption and batched inbox inserts, on the same
//! broker and database.

use std::time::{Duration, Instant};

use anyhow::Result;
use diesel::sql_types::{Array, Text};
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::consumer::{
    batch_handler, ConsumerConfig, ConsumerRunner, Handler, HandlerError, IncomingMessage,
};
use outbox_tests::{create_topic, effects, unique_name};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Rates, messages per second.
pub struct Inbox {
    pub raw: f64,
    pub p_ins: f64,
    /// The runner with a per-message handler (one business statement per message).
    pub runner: f64,
    /// The runner with a batch handler (one business statement per batch).
    pub runner_batch: f64,
}

/// Produces `n` messages, then measures raw consumption, batched inbox INSERTs and the runner
/// (inbox dedup + business write) with a per-message and with a batch handler.
pub async fn run(url: &str, bootstrap: &str, n: usize, partitions: i32) -> Result<Inbox> {
    let topic = unique_name("bench-inbox");
    create_topic(bootstrap, &topic, partitions).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let body = crate::payload();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let key = format!("k-{}", i % crate::KEYS);
        let h = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(id.as_str()),
        });
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&body).headers(h))
                .map_err(|(e, _)| e)?,
        );
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }

    let (b, t) = (bootstrap.to_owned(), topic.clone());
    let raw = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", unique_name("raw"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        c.subscribe(&[t.as_str()])?;
        let mut got = 0;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        while got < n && Instant::now() < deadline {
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                m?;
                started.get_or_insert_with(Instant::now);
                got += 1;
            }
        }
        anyhow::ensure!(got == n, "raw consumer read {got} of {n}");
        Ok(started.map(|s| s.elapsed()).unwrap_or_default())
    })
    .await??;

    let mut conn = PgConnection::establish(url)?;
    let ids: Vec<String> = (0..n).map(|i| format!("p-{i}")).collect();
    let started = Instant::now();
    for chunk in ids.chunks(1000) {
        conn.transaction(|c| {
            diesel::sql_query(
                "INSERT INTO inbox (consumer, message_id) SELECT 'bench', unnest($1::text[])",
            )
            .bind::<Array<Text>, _>(chunk)
            .execute(c)
        })?;
    }
    let p_ins = started.elapsed();

    effects::create(&mut conn)?;
    let per_message = |c: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        effects::apply(c, &m.message_id, m.key_str().unwrap_or_default())?;
        Ok(())
    };
    let runner = time_runner(url, bootstrap, &topic, n, &mut conn, per_message).await?;
    let batched = batch_handler(
        |c: &mut PgConnection, ms: &[&IncomingMessage]| -> Result<(), HandlerError> {
            let ids: Vec<&str> = ms.iter().map(|m| m.message_id.as_str()).collect();
            let keys: Vec<&str> = ms.iter().map(|m| m.key_str().unwrap_or_default()).collect();
            effects::apply_batch(c, &ids, &keys)?;
            Ok(())
        },
    );
    let runner_batch = time_runner(url, bootstrap, &topic, n, &mut conn, batched).await?;
    Ok(Inbox {
        raw: crate::rate(n, raw),
        p_ins: crate::rate(n, p_ins),
        runner: crate::rate(n, runner),
        runner_batch: crate::rate(n, runner_batch),
    })
}

/// Runs a consumer runner (own group, so it reads the topic from the start) until all `n` effects
/// are committed. The clock starts at the first committed effect, as raw consumption's starts
/// at the first message: the group join is not part of either rate.
async fn time_runner(
    url: &str,
    bootstrap: &str,
    topic: &str,
    n: usize,
    conn: &mut PgConnection,
    handler: impl Handler,
) -> Result<Duration> {
    diesel::sql_query("TRUNCATE effects").execute(conn)?;
    let cfg = ConsumerConfig::new(bootstrap.to_owned(), unique_name("runner"), &[topic], url);
    let runner = ConsumerRunner::new(cfg, handler)?;
    let stats = runner.stats();
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { runner.run(token).await });
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut started = None;
    loop {
        // The runner's own counter (bumped after each commit): no polling query competing with
        // the runner for the database.
        let done = stats.applied();
        if done > 0 {
            started.get_or_insert_with(Instant::now);
        }
        if usize::try_from(done)? >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the runner applied {done} of {n} in 30 min"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    stop.cancel();
    task.await??;
    let (distinct, twice, _) = effects::summary(conn)?;
    anyhow::ensure!(
        twice == 0 && usize::try_from(distinct)? == n,
        "inbox run inconsistent: {distinct} distinct effects, {twice} applied twice"
    );
    Ok(elapsed)
}
