//! Kafka over TLS: tansu behind a TLS terminator (`stunnel4`) that presents a certificate for
//! `localhost` signed by a test CA. The relay and the consumer runner deliver and consume with
//! the right CA; a wrong CA or a host name the certificate does not name is refused with a
//! clear error that carries no secret, and nothing is removed from the outbox meanwhile.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel::prelude::*;
use outbox::consumer::{ConsumerConfig, ConsumerRunner, HandlerError, IncomingMessage};
use outbox_tests::relay::{backlog, wait_until};
use outbox_tests::{
    effects, relay_config, unique_name, InProcessRelay, RelayProcess, TestDb, TlsTansu,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");

async fn create_topic(tls: &TlsTansu, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = tls.client_config().create().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = admin
            .create_topics(
                &[NewTopic::new(topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await;
        match r {
            Ok(results) if results.iter().all(Result::is_ok) => return,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "create {topic} over TLS: {other:?}\n{}",
                    tls.log()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn enqueue(conn: &mut PgConnection, topic: &str, n: usize) {
    let events: Vec<outbox::Event> = (0..n)
        .map(|i| outbox::Event::json(topic, format!("k{}", i % 3), "T", &i).unwrap())
        .collect();
    conn.transaction(|c| outbox::Outbox::new().enqueue_batch(c, &events))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_the_consumer_runner_work_over_kafka_tls_with_the_right_ca() {
    let tls = TlsTansu::start().unwrap();
    let db = TestDb::migrated().unwrap();
    effects::create(&mut db.conn().unwrap()).unwrap();
    let topic = unique_name("kafka-tls");
    create_topic(&tls, &topic).await;
    let mut conn = db.conn().unwrap();
    enqueue(&mut conn, &topic, 30);
    let cfg = TlsTansu::client_options(&tls.ca())
        .into_iter()
        .fold(relay_config(db.url(), &tls.bootstrap()), |c, (k, v)| {
            c.kafka_option(k, v)
        });
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(60), "delivery over Kafka TLS", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tls.log()));
    relay.stop().await.unwrap();

    let group = unique_name("tls-group");
    let cfg = TlsTansu::client_options(&tls.ca()).into_iter().fold(
        ConsumerConfig::new(tls.bootstrap(), &group, &[&topic], db.url()),
        |c, (k, v)| c.kafka_option(k, v),
    );
    let handler = |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        effects::apply(conn, &m.message_id, m.key_str().unwrap_or_default())?;
        Ok(())
    };
    let runner = ConsumerRunner::new(cfg, handler).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { runner.run(s).await });
    let r = wait_until(Duration::from_secs(60), "30 effects over Kafka TLS", || {
        Ok(effects::summary(&mut conn)?.0 == 30)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    r.unwrap_or_else(|e| panic!("{e}\n{}", tls.log()));
    assert_eq!(effects::summary(&mut conn).unwrap(), (30, 0, 30));
}

/// A relay process against the terminator with `bootstrap` and `ca`: it must not deliver, must
/// remove nothing, and must say why in its log without showing the database password.
async fn refused(tls: &TlsTansu, bootstrap: &str, ca: &std::path::Path, why: &[&str]) {
    let db = TestDb::migrated().unwrap();
    let topic = unique_name("kafka-tls-refused");
    let mut conn = db.conn().unwrap();
    enqueue(&mut conn, &topic, 10);
    // The test server trusts local connections: the password is never checked, only shown.
    let url = db.url().replacen(
        "postgres://postgres@",
        "postgres://postgres:kafka-tls-s3cret@",
        1,
    );
    assert!(url.contains("kafka-tls-s3cret"), "{url}");
    let options: Vec<String> = TlsTansu::client_options(ca)
        .into_iter()
        .flat_map(|(k, v)| ["-X".to_owned(), format!("{k}={v}")])
        .collect();
    let args: Vec<&str> = options.iter().map(String::as_str).collect();
    let mut relay = RelayProcess::spawn(BIN, &url, bootstrap, &args).unwrap();
    let r = wait_until(
        Duration::from_secs(30),
        "the TLS refusal in the log",
        || Ok(why.iter().any(|w| relay.log().contains(w))),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = relay.log();
    relay.kill9().unwrap();
    r.unwrap_or_else(|e| panic!("{e}\n{log}\n{}", tls.log()));
    if let Some(line) = log.lines().find(|l| why.iter().any(|w| l.contains(w))) {
        eprintln!("refused as expected: {line}");
    }
    assert_eq!(backlog(&mut conn).unwrap(), 10, "nothing removed: {log}");
    assert!(!log.contains("kafka-tls-s3cret"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_host_name_is_refused_clearly_and_nothing_is_removed() {
    let tls = TlsTansu::start().unwrap();
    // A CA that did not sign the broker's certificate.
    refused(
        &tls,
        &tls.bootstrap(),
        &tls.other_ca(),
        &["certificate verify failed"],
    )
    .await;
    // The right CA, but an address the certificate does not name.
    refused(
        &tls,
        &tls.bootstrap_by_ip(),
        &tls.ca(),
        &[
            "certificate verify failed",
            "hostname mismatch",
            "IP address mismatch",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_runner_with_a_wrong_ca_applies_nothing() {
    let tls = TlsTansu::start().unwrap();
    let db = TestDb::migrated().unwrap();
    effects::create(&mut db.conn().unwrap()).unwrap();
    let topic = unique_name("kafka-tls-consumer");
    create_topic(&tls, &topic).await;
    let mut conn = db.conn().unwrap();
    enqueue(&mut conn, &topic, 10);
    let cfg = TlsTansu::client_options(&tls.ca())
        .into_iter()
        .fold(relay_config(db.url(), &tls.bootstrap()), |c, (k, v)| {
            c.kafka_option(k, v)
        });
    let relay = InProcessRelay::start(cfg).unwrap();
    wait_until(Duration::from_secs(60), "delivery over Kafka TLS", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let cfg = TlsTansu::client_options(&tls.other_ca()).into_iter().fold(
        ConsumerConfig::new(tls.bootstrap(), unique_name("g"), &[&topic], db.url()),
        |c, (k, v)| c.kafka_option(k, v),
    );
    let handler = |conn: &mut PgConnection, m: &IncomingMessage| -> Result<(), HandlerError> {
        effects::apply(conn, &m.message_id, "k")?;
        Ok(())
    };
    let runner = ConsumerRunner::new(cfg, handler).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { runner.run(s).await });
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(effects::summary(&mut conn).unwrap().0, 0, "nothing applied");
    assert!(
        tls.log().to_lowercase().contains("alert") || tls.log().contains("SSL"),
        "the terminator saw the refused handshakes: {}",
        tls.log()
    );
}
