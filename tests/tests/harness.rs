//! The harness itself: real brokers (tansu and librdkafka's mock cluster) and private Postgres
//! clusters that can be crashed and restarted. Other suites rely on these behaving as documented.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use outbox_tests::{create_topic, kafka::payload_str, read_all, unique_name, PgCluster, Tansu};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

async fn produce(bootstrap: &str, topic: &str, n: usize) {
    let producer = producer(bootstrap);
    for i in 0..n {
        let key = format!("key-{}", i % 3);
        let value = format!("value-{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(&format!("id-{i}")),
        });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivery");
    }
}

fn check_read_back(bootstrap: &str, topic: &str, n: usize) {
    let msgs = read_all(bootstrap, topic, n, Duration::from_secs(30)).unwrap();
    assert_eq!(msgs.len(), n);
    let mut values: Vec<String> = msgs.iter().map(payload_str).collect();
    values.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("value-{i}")).collect();
    expected.sort();
    assert_eq!(values, expected);
    for m in &msgs {
        let h = m.headers().expect("headers");
        assert_eq!(h.get(0).key, "ce_id");
        // one key, one partition (murmur2): all key-0 messages share a partition
    }
    let partitions_of_key0: std::collections::HashSet<i32> = msgs
        .iter()
        .filter(|m| m.key() == Some(b"key-0".as_slice()))
        .map(Message::partition)
        .collect();
    assert_eq!(partitions_of_key0.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tansu_round_trips_messages_with_an_idempotent_producer() {
    let broker = Tansu::start().unwrap();
    let topic = unique_name("harness");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    produce(&broker.bootstrap(), &topic, 30).await;
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || check_read_back(&bootstrap, &topic, 30))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn durable_tansu_keeps_messages_across_kill_and_restart() {
    let mut broker = Tansu::start_durable().unwrap();
    let topic = unique_name("durable");
    create_topic(&broker.bootstrap(), &topic, 1).await.unwrap();
    produce(&broker.bootstrap(), &topic, 5).await;
    broker.kill().unwrap();
    broker.restart().unwrap();
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || check_read_back(&bootstrap, &topic, 5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mock_cluster_round_trips_messages() {
    let cluster = outbox_tests::mock_cluster(3).unwrap();
    let topic = unique_name("mock");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    produce(&bootstrap, &topic, 30).await;
    tokio::task::spawn_blocking(move || check_read_back(&bootstrap, &topic, 30))
        .await
        .unwrap();
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    v: String,
}

#[test]
fn private_cluster_survives_immediate_stop_and_kill_9() {
    let cluster = PgCluster::start().unwrap();
    let url = cluster.create_db("app").unwrap();
    let mut conn = PgConnection::establish(&url).unwrap();
    let wal: Setting = diesel::sql_query("SELECT current_setting('wal_level') AS v")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(wal.v, "logical");
    outbox::Outbox::new().migrate(&mut conn).unwrap();
    let event = outbox::Event::json("orders", "k", "t", &1).unwrap();
    conn.transaction(|c| outbox::Outbox::new().enqueue(c, &event))
        .unwrap();
    drop(conn);

    cluster.stop_immediate().unwrap();
    assert!(PgConnection::establish(&url).is_err(), "server is down");
    cluster.start_server().unwrap();
    let mut conn = PgConnection::establish(&url).unwrap();
    let committed: Row = diesel::sql_query("SELECT count(*) AS n FROM outbox")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(committed.n, 1, "a committed event survives a crash");
    drop(conn);

    cluster.kill9().unwrap();
    cluster.start_server().unwrap();
    let mut conn = PgConnection::establish(&url).unwrap();
    let committed: Row = diesel::sql_query("SELECT count(*) AS n FROM outbox")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(committed.n, 1);
}
