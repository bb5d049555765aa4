//! What the two brokers on a development machine do with Kafka transactions. Exactly-once
//! delivery (issue 16) needs a broker where a `read_committed` reader sees the records of
//! committed transactions only, and where a fenced producer's records are not visible. These
//! probes pin down that neither broker available here is one, so no test of the project may
//! claim to prove exactly-once on them. If a probe starts failing, the broker gained the
//! missing part: the exactly-once tests can then run on it.

use std::time::{Duration, Instant};

use outbox_tests::kafka::{create_topic, mock_cluster, reader, Tansu};
use rdkafka::consumer::Consumer;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};

fn transactional(
    bootstrap: &str,
    id: &str,
) -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "10000")
        .create()
        .expect("transactional producer")
}

fn send(p: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>, topic: &str, value: &str) {
    p.send(BaseRecord::to(topic).key("k").payload(value))
        .map_err(|(e, _)| e)
        .expect("enqueue");
    p.flush(Duration::from_secs(10)).expect("flush");
}

/// Every payload a `read_committed` reader sees on `topic` within `quiet` of the last one.
fn read_committed(bootstrap: &str, topic: &str, quiet: Duration) -> Vec<String> {
    let consumer = reader(bootstrap, topic).expect("reader");
    let mut seen = Vec::new();
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while last.elapsed() < quiet && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            last = Instant::now();
        }
    }
    drop(consumer.unassign());
    seen
}

/// librdkafka's mock cluster (librdkafka 2.12.1) accepts the whole transactional protocol, but
/// its EndTxn writes no commit or abort marker and its fetch reports no aborted transaction: a
/// `read_committed` reader sees an aborted transaction's records. Nor does it fence: a
/// producer whose transactional id another producer initialised since still commits, and its
/// records show.
#[test]
fn the_mock_cluster_shows_aborted_records_to_read_committed_readers() {
    let cluster = mock_cluster(3).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("probe", 1, 1).expect("topic");
    let p = transactional(&bootstrap, "probe-tx");
    p.init_transactions(Duration::from_secs(10)).expect("init");
    p.begin_transaction().expect("begin");
    send(&p, "probe", "aborted");
    p.abort_transaction(Duration::from_secs(10)).expect("abort");
    p.begin_transaction().expect("begin");
    send(&p, "probe", "committed");
    p.commit_transaction(Duration::from_secs(10))
        .expect("commit");

    // A zombie: a second producer with the same transactional id starts while the first has
    // a transaction open. On a broker with transactions the first is fenced: its commit is
    // refused and its record never shows.
    p.begin_transaction().expect("begin");
    let successor = transactional(&bootstrap, "probe-tx");
    successor
        .init_transactions(Duration::from_secs(10))
        .expect("successor init");
    let _ = p.send(BaseRecord::to("probe").key("k").payload("zombie"));
    let _ = p.flush(Duration::from_secs(5));
    let zombie_commit = p.commit_transaction(Duration::from_secs(10));

    let seen = read_committed(&bootstrap, "probe", Duration::from_secs(3));
    eprintln!("mock cluster, read_committed sees {seen:?}; the zombie's commit: {zombie_commit:?}");
    assert!(
        seen.iter().any(|v| v == "aborted"),
        "the mock cluster now hides aborted records from read_committed readers ({seen:?}): \
         it may carry the exactly-once tests"
    );
    assert!(
        zombie_commit.is_ok() && seen.iter().any(|v| v == "zombie"),
        "the mock cluster now fences a producer whose transactional id was taken over \
         ({zombie_commit:?}, {seen:?}): it may carry the exactly-once tests"
    );
}

/// tansu 0.6.0 hands out transactional producer ids but routes no EndTxn request: a commit never
/// completes.
#[tokio::test]
async fn tansu_completes_no_transaction() {
    let broker = Tansu::start().expect("tansu");
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "probe-tansu", 1)
        .await
        .expect("topic");
    let outcome = tokio::task::spawn_blocking(move || {
        let p = transactional(&bootstrap, "probe-tx");
        p.init_transactions(Duration::from_secs(10))
            .and_then(|()| p.begin_transaction())
            .and_then(|()| {
                send(&p, "probe-tansu", "committed?");
                p.commit_transaction(Duration::from_secs(10))
            })
    })
    .await
    .expect("probe task");
    eprintln!("tansu 0.6.0, a transaction's commit: {outcome:?}");
    assert!(
        outcome.is_err(),
        "tansu completed a transaction: it may carry the exactly-once tests"
    );
}
