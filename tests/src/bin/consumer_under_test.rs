//! A consumer process for crash tests.
//!
//! `consumer-under-test runner BROKERS GROUP TOPIC DATABASE_URL`: the outbox consumer runner with
//! a handler that applies [`outbox_tests::effects`]; offsets are committed only on revocation and
//! shutdown (auto-commit every 60 s), so a kill -9 leaves committed effects whose offsets were
//! never committed.
//!
//! `consumer-under-test naive ...`: deliberately broken: the same effect without the inbox
//! (plain at-least-once consumer), to show that the test catches double effects.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use diesel::{Connection, PgConnection};
use outbox::consumer::{ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, brokers, group, topic, url] = args.as_slice() else {
        bail!("usage: consumer-under-test runner|naive BROKERS GROUP TOPIC DATABASE_URL");
    };
    match mode.as_str() {
        "runner" => runner(brokers, group, topic, url),
        "naive" => naive(brokers, group, topic, url),
        other => bail!("unknown mode {other}"),
    }
}

fn runner(brokers: &str, group: &str, topic: &str, url: &str) -> Result<()> {
    let cfg = ConsumerConfig::new(brokers, group, &[topic], url)
        .kafka_option("auto.commit.interval.ms", "60000")
        // A killed member's partitions move after this, not after the 45 s default.
        .kafka_option("session.timeout.ms", "6000")
        .kafka_option("heartbeat.interval.ms", "1000");
    let handler = |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        outbox_tests::effects::apply(conn, &m.message_id, m.key_str().unwrap_or_default())?;
        Ok(())
    };
    let runner = ConsumerRunner::new(cfg, handler)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
        });
        runner.run(shutdown).await
    })?;
    Ok(())
}

fn naive(brokers: &str, group: &str, topic: &str, url: &str) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "60000")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut conn = PgConnection::establish(url).context("connect")?;
    loop {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let id = outbox_tests::check::header(&m.detach(), "ce_id").unwrap_or_default();
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        conn.transaction(|c| outbox_tests::effects::apply(c, &id, &key))?;
    }
}
