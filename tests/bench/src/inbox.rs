//! S6: the inbox consumer against raw consumption and batched inbox inserts, on the same
//! broker and database.

use std::time::{Duration, Instant};

use anyhow::Result;
use diesel::sql_types::{Array, Text};
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::consumer::{ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage};
use outbox_tests::{create_topic, effects, unique_name};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Rates, messages per second.
pub struct Inbox {
    pub raw: f64,
    pub p_ins: f64,
    pub runner: f64,
}

/// Produces `n` messages, then measures raw consumption, batched inbox INSERTs and the runner
/// (inbox dedup + one business write per message).
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
    let cfg = ConsumerConfig::new(bootstrap.to_owned(), unique_name("runner"), &[&topic], url);
    let handler = |c: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        effects::apply(c, &m.message_id, m.key_str().unwrap_or_default())?;
        Ok(())
    };
    let runner = ConsumerRunner::new(cfg, handler)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { runner.run(token).await });
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let (done, _, _) = effects::summary(&mut conn)?;
        if usize::try_from(done)? >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the runner applied {done} of {n} in 30 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runner_time = started.elapsed();
    stop.cancel();
    task.await??;
    let (distinct, twice, _) = effects::summary(&mut conn)?;
    anyhow::ensure!(
        twice == 0 && usize::try_from(distinct)? == n,
        "inbox run inconsistent: {distinct} distinct effects, {twice} applied twice"
    );
    Ok(Inbox {
        raw: crate::rate(n, raw),
        p_ins: crate::rate(n, p_ins),
        runner: crate::rate(n, runner_time),
    })
}
