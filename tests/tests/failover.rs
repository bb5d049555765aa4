//! Relay processes under faults: kill -9 of the leader, SIGSTOP of the leader (a zombie that
//! wakes up), broker outage (tansu killed and restarted), broker request errors (mock cluster).
//! Verified from outside: every topic read from offset 0 and compared with the database.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outbox_tests::check::{check, Report};
use outbox_tests::relay::{backlog, leader, wait_until};
use outbox_tests::workload::{create_keys, run_writers, Expected};
use outbox_tests::{
    create_topic, relay_config, unique_name, InProcessRelay, RelayProcess, Tansu, TestDb,
};

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");
/// Most rows one relay can have produced but not yet removed (pages in flight x page size).
const IN_FLIGHT_BOUND: usize = 4 * 1000;

fn summary(r: &Report) -> String {
    format!(
        "read={} missing={} unexpected={} duplicates={} order_violations={} (first {:?}) split_keys={}",
        r.read,
        r.missing.len(),
        r.unexpected.len(),
        r.duplicates,
        r.order_violations.len(),
        r.order_violations.first(),
        r.split_keys.len()
    )
}

async fn read(bootstrap: &str, topic: &str, min: usize) -> Vec<outbox_tests::check::Seen> {
    outbox_tests::check::read_topic_async(
        bootstrap,
        topic,
        min,
        Duration::from_secs(3),
        Duration::from_secs(180),
    )
    .await
}

fn spawn_writers(
    url: &str,
    topic: &str,
    writers: usize,
    txs: usize,
) -> tokio::task::JoinHandle<Expected> {
    let (url, topic) = (url.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || run_writers(&url, &topic, writers, txs, 200, 5).unwrap())
}

/// The pid inside a default instance id (`host-pid-random`).
fn pid_of(instance: &str) -> u32 {
    instance.rsplit('-').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_standby_takes_over_nothing_lost() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("kill9");
    create_topic(&broker.bootstrap(), &topic, 6).await.unwrap();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let mut relays = [
        RelayProcess::spawn(RELAY_BIN, db.url(), &broker.bootstrap(), &[]).unwrap(),
        RelayProcess::spawn(RELAY_BIN, db.url(), &broker.bootstrap(), &[]).unwrap(),
    ];
    wait_until(Duration::from_secs(30), "a leader", || {
        Ok(leader(&mut conn)?.is_some())
    })
    .await
    .unwrap();
    let writers = spawn_writers(db.url(), &topic, 8, 400);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (first, epoch) = leader(&mut conn).unwrap().unwrap();
    let victim = relays
        .iter()
        .position(|r| r.pid() == pid_of(&first))
        .unwrap();
    relays[victim].kill9().unwrap();
    let killed_at = Instant::now();
    wait_until(Duration::from_secs(15), "takeover", || {
        Ok(leader(&mut conn)?.is_some_and(|(id, e)| id != first && e > epoch))
    })
    .await
    .unwrap();
    let takeover = killed_at.elapsed();
    let expected = writers.await.unwrap();
    wait_until(Duration::from_secs(120), "backlog drained", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    let report = check(
        &read(&broker.bootstrap(), &topic, expected.len()).await,
        &expected,
    );
    assert!(report.is_consistent(), "{}", summary(&report));
    assert!(report.duplicates <= IN_FLIGHT_BOUND, "{}", summary(&report));
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    eprintln!(
        "kill -9: {} events, takeover {takeover:?}, {}",
        expected.len(),
        summary(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_the_leader_standby_takes_over_and_the_zombie_steps_down() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("sigstop");
    create_topic(&broker.bootstrap(), &topic, 6).await.unwrap();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let relays = [
        RelayProcess::spawn(RELAY_BIN, db.url(), &broker.bootstrap(), &[]).unwrap(),
        RelayProcess::spawn(RELAY_BIN, db.url(), &broker.bootstrap(), &[]).unwrap(),
    ];
    wait_until(Duration::from_secs(30), "a leader", || {
        Ok(leader(&mut conn)?.is_some())
    })
    .await
    .unwrap();
    let writers = spawn_writers(db.url(), &topic, 6, 300);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (first, epoch) = leader(&mut conn).unwrap().unwrap();
    let zombie = relays.iter().find(|r| r.pid() == pid_of(&first)).unwrap();
    zombie.stop().unwrap();
    let stopped_at = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "takeover from the paused leader",
        || Ok(leader(&mut conn)?.is_some_and(|(id, e)| id != first && e > epoch)),
    )
    .await
    .unwrap();
    let takeover = stopped_at.elapsed();
    let expected = writers.await.unwrap();
    wait_until(Duration::from_secs(120), "backlog drained", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    zombie.cont().unwrap();
    // The zombie must notice, purge what it had queued, and stand by without removing anything.
    let log = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = zombie.log();
            if log.contains("lost leadership") || Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(log.contains("lost leadership"), "zombie log:\n{log}");
    let (now_leader, _) = leader(&mut conn).unwrap().unwrap();
    assert_ne!(now_leader, first, "the zombie did not take leadership back");
    let report = check(
        &read(&broker.bootstrap(), &topic, expected.len()).await,
        &expected,
    );
    assert!(report.is_consistent(), "{}", summary(&report));
    assert!(report.duplicates <= IN_FLIGHT_BOUND, "{}", summary(&report));
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    eprintln!(
        "SIGSTOP: {} events, takeover {takeover:?}, {}",
        expected.len(),
        summary(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_nothing_lost_order_kept_lag_returns_to_zero() {
    let db = TestDb::migrated().unwrap();
    let mut broker = Tansu::start_durable().unwrap();
    let topic = unique_name("outage");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let relay = InProcessRelay::start(relay_config(db.url(), &broker.bootstrap())).unwrap();
    let first = spawn_writers(db.url(), &topic, 4, 100).await.unwrap();
    broker.kill().unwrap();
    // Writers keep committing while the broker is down; nothing may be lost.
    let second = spawn_writers(db.url(), &topic, 4, 100).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        backlog(&mut conn).unwrap() > 0,
        "events wait in the outbox during the outage"
    );
    broker.restart().unwrap();
    let healed = Instant::now();
    wait_until(Duration::from_secs(120), "lag back to zero", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    let lag_recovery = healed.elapsed();
    relay.stop().await.unwrap();
    let mut expected = first;
    expected.extend(second);
    let report = check(
        &read(&broker.bootstrap(), &topic, expected.len()).await,
        &expected,
    );
    assert!(report.is_consistent(), "{}", summary(&report));
    assert!(report.duplicates <= IN_FLIGHT_BOUND, "{}", summary(&report));
    eprintln!(
        "broker outage: {} events, lag zero {lag_recovery:?} after restart, {}",
        expected.len(),
        summary(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_request_errors_and_a_broker_down_are_retried_in_order() {
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr;
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(3).unwrap();
    let topic = unique_name("mock");
    cluster.create_topic(&topic, 6, 3).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    // Retriable produce errors, injected before and during the run.
    let errors = [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    ];
    cluster.request_errors(RDKafkaApiKey::Produce, &errors.repeat(5));
    let relay = InProcessRelay::start(relay_config(db.url(), &bootstrap)).unwrap();
    let first = spawn_writers(db.url(), &topic, 4, 100).await.unwrap();
    cluster.request_errors(RDKafkaApiKey::Produce, &errors.repeat(5));
    cluster.broker_down(2).unwrap();
    let second = spawn_writers(db.url(), &topic, 4, 100).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(2).unwrap();
    wait_until(Duration::from_secs(120), "lag back to zero", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let mut expected = first;
    expected.extend(second);
    let report = check(&read(&bootstrap, &topic, expected.len()).await, &expected);
    assert!(report.is_consistent(), "{}", summary(&report));
    assert_eq!(
        report.duplicates,
        0,
        "the idempotent producer absorbs retries: {}",
        summary(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_under_load_nothing_lost_nothing_uncommitted_order_kept() {
    use outbox_tests::workload::{committed, run_resilient_writers_until};
    use outbox_tests::PgCluster;
    let cluster = PgCluster::start().unwrap();
    let url = cluster.create_db("app").unwrap();
    {
        let mut conn = diesel::Connection::establish(&url).unwrap();
        outbox::Outbox::new().migrate(&mut conn).unwrap();
        create_keys(&mut conn, 50).unwrap();
    }
    let broker = Tansu::start().unwrap();
    let topic = unique_name("pgcrash");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let relay = InProcessRelay::start(relay_config(&url, &broker.bootstrap())).unwrap();
    // Writers run until told to stop, so they are busy across the crash however fast they are.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (u, t, st) = (url.clone(), topic.clone(), std::sync::Arc::clone(&stop));
    let writers = tokio::task::spawn_blocking(move || {
        run_resilient_writers_until(&u, &t, 4, usize::MAX, 50, Duration::from_millis(2), &st)
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.stop_immediate().unwrap(); // crash: no checkpoint, in-flight transactions lost
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_server().unwrap(); // recovery from WAL
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = writers.await.unwrap();
    let mut conn: diesel::PgConnection = diesel::Connection::establish(&url).unwrap();
    wait_until(Duration::from_secs(120), "lag back to zero", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let expected = committed(&mut conn).unwrap();
    assert!(failed > 0, "the crash must have hit the writers");
    let report = check(
        &read(&broker.bootstrap(), &topic, expected.len()).await,
        &expected,
    );
    // I1 nothing committed lost, I2 nothing uncommitted published, I3 order, I4 bounded duplicates
    assert!(report.is_consistent(), "{}", summary(&report));
    assert!(report.duplicates <= IN_FLIGHT_BOUND, "{}", summary(&report));
    eprintln!(
        "postgres crash: {} committed events, {failed} transactions failed, {}",
        expected.len(),
        summary(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_relay_that_removes_before_sending_loses_events_at_kill_9() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("naive-kill9");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let writers = spawn_writers(db.url(), &topic, 4, 1000);
    // Three kill -9 cycles while the writers are busy: the naive relay is almost always between
    // removing a page and publishing it, so each kill loses that page.
    for _ in 0..3 {
        let mut naive = std::process::Command::new(env!("CARGO_BIN_EXE_naive-relay"))
            .args(["remove-first", db.url(), &broker.bootstrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        naive.kill().unwrap(); // the same kill -9 the real relay survives
        naive.wait().unwrap();
    }
    let expected = writers.await.unwrap();
    // A correct relay delivers what is left; what the naive one removed but never sent is gone.
    let relay = InProcessRelay::start(relay_config(db.url(), &broker.bootstrap())).unwrap();
    wait_until(Duration::from_secs(60), "backlog drained", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    relay.stop().await.unwrap();
    let report = check(&read(&broker.bootstrap(), &topic, 1).await, &expected);
    assert!(
        !report.missing.is_empty(),
        "the checker must catch the lost events: {}",
        summary(&report)
    );
    eprintln!(
        "naive relay killed: {} of {} events lost",
        report.missing.len(),
        expected.len()
    );
}

/// Runs a broken relay in this process until the returned flag is set; the handle yields how
/// many events it gave up on.
fn spawn_broken(
    mode: outbox_tests::naive::Broken,
    url: &str,
    bootstrap: &str,
    extra: &[(&str, &str)],
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<usize>,
) {
    let producer = outbox_tests::naive::producer_with(bootstrap, extra).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, flag) = (url.to_owned(), std::sync::Arc::clone(&stop));
    let task = tokio::spawn(async move {
        outbox_tests::naive::run_broken(mode, &url, &producer, &flag)
            .await
            .unwrap()
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_advisory_lock_leadership_never_fails_over_from_a_paused_leader() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("advlock");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_naive-relay"))
            .args(["advisory-lock", db.url(), &broker.bootstrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut leader = spawn();
    wait_until(Duration::from_secs(20), "the advisory lock taken", || {
        use diesel::RunQueryDsl;
        Ok(diesel::sql_query(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .get_result::<N>(&mut conn)?
        .n == 1)
    })
    .await
    .unwrap();
    let mut standby = spawn();
    let mut expected = spawn_writers(db.url(), &topic, 4, 100).await.unwrap();
    // Healthy, the lock-based relay delivers like any other.
    wait_until(Duration::from_secs(60), "healthy delivery", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &leader.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    expected.extend(spawn_writers(db.url(), &topic, 4, 100).await.unwrap());
    // The lease-based relay's standby takes over within 10 s; give this one twice that.
    let recovered = wait_until(Duration::from_secs(20), "lag back to zero", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await;
    let report = check(&read(&broker.bootstrap(), &topic, 1).await, &expected);
    leader.kill().unwrap(); // SIGKILL ends a stopped process too
    standby.kill().unwrap();
    let _ = (leader.wait(), standby.wait());
    assert!(
        recovered.is_err() && !report.missing.is_empty(),
        "the paused lock holder must stall delivery (I6) and leave events undelivered (I1): {}",
        summary(&report)
    );
    eprintln!(
        "advisory-lock leadership, leader paused: after 20 s {} of {} events still undelivered",
        report.missing.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_relay_that_skips_failed_sends_loses_events_when_the_brokers_are_down() {
    let db = TestDb::migrated().unwrap();
    let cluster = outbox_tests::mock_cluster(3).unwrap();
    let topic = unique_name("mock-skip");
    cluster.create_topic(&topic, 6, 3).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let (stop, task) = spawn_broken(
        outbox_tests::naive::Broken::SkipOnError,
        db.url(),
        &bootstrap,
        &[("message.timeout.ms", "2000")],
    );
    let mut expected = spawn_writers(db.url(), &topic, 4, 100).await.unwrap();
    for b in 1..=3 {
        cluster.broker_down(b).unwrap();
    }
    expected.extend(spawn_writers(db.url(), &topic, 4, 100).await.unwrap());
    tokio::time::sleep(Duration::from_secs(5)).await; // longer than the message timeout
    for b in 1..=3 {
        cluster.broker_up(b).unwrap();
    }
    wait_until(Duration::from_secs(60), "outbox emptied", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let skipped = task.await.unwrap();
    let report = check(&read(&bootstrap, &topic, 1).await, &expected);
    assert!(
        skipped > 0 && !report.missing.is_empty(),
        "the checker must catch what the relay gave up on: skipped {skipped}, {}",
        summary(&report)
    );
    eprintln!(
        "skip-on-error relay, brokers down 5 s: {skipped} sends given up, {} of {} events lost",
        report.missing.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_relay_that_skips_failed_sends_loses_events_in_a_broker_outage() {
    let db = TestDb::migrated().unwrap();
    let mut broker = Tansu::start_durable().unwrap();
    let topic = unique_name("outage-skip");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let mut conn = db.conn().unwrap();
    create_keys(&mut conn, 200).unwrap();
    let (stop, task) = spawn_broken(
        outbox_tests::naive::Broken::SkipOnError,
        db.url(),
        &broker.bootstrap(),
        &[("message.timeout.ms", "2000")],
    );
    // Few events: this relay awaits each send from the durable (slow) broker one by one.
    let mut expected = spawn_writers(db.url(), &topic, 2, 40).await.unwrap();
    broker.kill().unwrap();
    expected.extend(spawn_writers(db.url(), &topic, 2, 40).await.unwrap());
    tokio::time::sleep(Duration::from_secs(5)).await; // longer than the message timeout
    broker.restart().unwrap();
    wait_until(Duration::from_secs(60), "outbox emptied", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let skipped = task.await.unwrap();
    let report = check(&read(&broker.bootstrap(), &topic, 1).await, &expected);
    assert!(
        skipped > 0 && !report.missing.is_empty(),
        "the checker must catch what the relay gave up on: skipped {skipped}, {}",
        summary(&report)
    );
    eprintln!(
        "skip-on-error relay, broker killed 5 s: {skipped} sends given up, {} of {} events lost",
        report.missing.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_variant_a_dual_write_publishes_what_a_postgres_crash_rolled_back() {
    use outbox_tests::workload::committed;
    use outbox_tests::PgCluster;
    let cluster = PgCluster::start().unwrap();
    let url = cluster.create_db("app").unwrap();
    {
        let mut conn = diesel::Connection::establish(&url).unwrap();
        outbox::Outbox::new().migrate(&mut conn).unwrap();
        create_keys(&mut conn, 50).unwrap();
    }
    let broker = Tansu::start().unwrap();
    let topic = unique_name("dualwrite");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (u, b, t, st) = (
        url.clone(),
        broker.bootstrap(),
        topic.clone(),
        std::sync::Arc::clone(&stop),
    );
    let writers = tokio::task::spawn_blocking(move || {
        outbox_tests::naive::run_dual_writers_until(&u, &b, &t, 4, 50, &st)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.stop_immediate().unwrap(); // the same crash the outbox survives
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_server().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writers.await.unwrap().unwrap();
    let mut conn: diesel::PgConnection = diesel::Connection::establish(&url).unwrap();
    let expected = committed(&mut conn).unwrap();
    let report = check(&read(&broker.bootstrap(), &topic, 1).await, &expected);
    assert!(
        !report.unexpected.is_empty(),
        "the checker must catch events whose transaction the crash rolled back (I2): {}",
        summary(&report)
    );
    eprintln!(
        "dual write across a Postgres crash: {} committed, {} published but never committed",
        expected.len(),
        report.unexpected.len()
    );
}
