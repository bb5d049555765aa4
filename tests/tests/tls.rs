//! Postgres over TLS: the relay delivers through `sslmode=require` to a private cluster with
//! `ssl = on`, and `sslmode=require` against a server without TLS fails with a clear error that
//! carries no password.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use outbox_tests::check::read_topic;
use outbox_tests::relay::{backlog, wait_until};
use outbox_tests::{
    create_topic, relay_config, unique_name, InProcessRelay, PgCluster, RelayProcess, Tansu,
};

const BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Relay sessions with (`true`) or without TLS.
fn relay_sessions(conn: &mut PgConnection, tls: bool) -> i64 {
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name LIKE 'outbox-relay:%' AND s.ssl = $1",
    )
    .bind::<diesel::sql_types::Bool, _>(tls)
    .get_result::<N>(conn)
    .unwrap()
    .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_over_postgres_tls_with_sslmode_require() {
    let cluster = PgCluster::start_tls().unwrap();
    let url = format!("{}?sslmode=require", cluster.create_db("app").unwrap());
    let mut conn = PgConnection::establish(&url).unwrap();
    outbox::Outbox::new().migrate(&mut conn).unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("tls");
    create_topic(&broker.bootstrap(), &topic, 2).await.unwrap();
    let events: Vec<outbox::Event> = (0..20)
        .map(|i| outbox::Event::json(&topic, format!("k{}", i % 3), "T", &i).unwrap())
        .collect();
    conn.transaction(|c| outbox::Outbox::new().enqueue_batch(c, &events))
        .unwrap();
    let relay = InProcessRelay::start(relay_config(&url, &broker.bootstrap())).unwrap();
    wait_until(Duration::from_secs(30), "delivery over TLS", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    assert!(
        relay_sessions(&mut conn, true) >= 1,
        "the relay's session uses TLS"
    );
    assert_eq!(relay_sessions(&mut conn, false), 0);
    relay.stop().await.unwrap();
    let seen = read_topic(
        &broker.bootstrap(),
        &topic,
        20,
        Duration::from_millis(300),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(seen.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_against_a_server_without_tls_fails_clearly_and_shows_no_password() {
    let cluster = PgCluster::start().unwrap();
    let url = format!(
        "postgres://postgres:tls-s3cret@127.0.0.1:{}/postgres?sslmode=require",
        cluster.port()
    );
    let Err(err) = outbox_relay::store::connect(&url) else {
        panic!("sslmode=require connected to a server without TLS");
    };
    let err = err.to_string();
    assert!(
        err.contains("server does not support SSL") && err.contains("postgres:***@"),
        "{err}"
    );
    assert!(!err.contains("tls-s3cret"), "{err}");

    let out = Command::new(BIN)
        .args(["status"])
        .env("DATABASE_URL", &url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        text.contains("server does not support SSL") && !text.contains("tls-s3cret"),
        "{text}"
    );

    // The running relay retries, logging the same scrubbed error.
    let relay = RelayProcess::spawn(BIN, &url, "127.0.0.1:1", &[]).unwrap();
    wait_until(Duration::from_secs(20), "the connection error", || {
        Ok(relay.log().contains("server does not support SSL"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert!(!relay.log().contains("tls-s3cret"), "{}", relay.log());
}
