//! The `outbox-relay` binary as an operator uses it: migrate, status, refused settings, secret
//! redaction, the superuser guard, /metrics and /healthz, SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

use diesel::prelude::*;
use outbox_tests::relay::{backlog, wait_until};
use outbox_tests::{create_topic, free_port, unique_name, RelayProcess, Tansu, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn migrate_then_status_on_a_fresh_database() {
    let db = TestDb::new().unwrap();
    let out = cli(&["migrate", "--database-url", db.url()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("applied 20261122000001"),
        "{}",
        text(&out)
    );
    let again = cli(&["migrate"], &[("DATABASE_URL", db.url())]);
    assert!(
        text(&again).contains("schema is up to date"),
        "{}",
        text(&again)
    );

    let mut conn = db.conn().unwrap();
    let e = outbox::Event::json("orders", "order-1", "OrderCreated", &1).unwrap();
    conn.transaction(|c| outbox::Outbox::new().enqueue(c, &e))
        .unwrap();
    let out = cli(&["status"], &[("DATABASE_URL", db.url())]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("BACKLOG") && s.contains("orders") && s.contains("LEADER"),
        "{s}"
    );
    assert!(
        s.contains("(no relay has run yet)") && s.contains("DEAD LETTERS"),
        "{s}"
    );
    let out = cli(&["status", "--json"], &[("DATABASE_URL", db.url())]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["backlog"][0]["topic"], "orders");
    assert_eq!(json["backlog"][0]["events"], 1);
}

#[test]
fn unsafe_settings_are_refused_with_the_reason_and_no_secret_is_printed() {
    let env = [
        ("DATABASE_URL", "postgres://relay:s3cr3t-pw@127.0.0.1:1/app"),
        ("KAFKA_BROKERS", "127.0.0.1:1"),
    ];
    for (opt, why) in [
        ("enable.idempotence=false", "idempotent producer"),
        ("acks=1", "acks=all"),
        ("max.in.flight.requests.per.connection=10", "at most 5"),
        ("enable.ssl.certificate.verification=false", "verification"),
    ] {
        let out = cli(&["run", "-X", opt, "-X", "sasl.password=hunter2"], &env);
        let s = text(&out);
        assert!(!out.status.success(), "{opt}: {s}");
        assert!(s.contains("refused") && s.contains(why), "{opt}: {s}");
        assert!(
            !s.contains("hunter2") && !s.contains("s3cr3t-pw"),
            "{opt}: {s}"
        );
    }
    let out = cli(&["run", "--page-size", "0"], &env);
    assert!(
        text(&out).contains("page_size must be positive"),
        "{}",
        text(&out)
    );
    // A connection error names the database without its password.
    let out = cli(&["status"], &env);
    let s = text(&out);
    assert!(!out.status.success());
    assert!(
        s.contains("relay:***@127.0.0.1:1/app") && !s.contains("s3cr3t-pw"),
        "{s}"
    );
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "database_url = 'postgres://x@127.0.0.1:1/x'\nbrokers = 'b:1'\npage_sise = 5\n",
    )
    .unwrap();
    let out = cli(&["run", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("page_sise"), "{}", text(&out));
}

#[test]
fn the_relay_refuses_a_superuser_role_unless_told() {
    let db = TestDb::migrated().unwrap();
    let mut cmd = Command::new(BIN);
    let out = cmd
        .args(["run"])
        .env("DATABASE_URL", db.url())
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("superuser"), "{}", text(&out));
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served_and_sigterm_exits_cleanly() {
    let db = TestDb::migrated().unwrap();
    let broker = Tansu::start().unwrap();
    let topic = unique_name("metrics");
    create_topic(&broker.bootstrap(), &topic, 3).await.unwrap();
    let mut conn = db.conn().unwrap();
    let events: Vec<outbox::Event> = (0..100)
        .map(|i| outbox::Event::json(&topic, format!("k{}", i % 7), "T", &i).unwrap())
        .collect();
    conn.transaction(|c| outbox::Outbox::new().enqueue_batch(c, &events))
        .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut relay = RelayProcess::spawn(
        BIN,
        db.url(),
        &broker.bootstrap(),
        &["--metrics-addr", &addr],
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "delivery", || {
        Ok(backlog(&mut conn)? == 0)
    })
    .await
    .unwrap();
    let mut body = String::new();
    wait_until(Duration::from_secs(15), "metrics", || {
        body = http_get(port, "/metrics");
        Ok(metric(&body, "outbox_relay_delivered_total") == Some(100.0)
            && metric(&body, "outbox_relay_backlog") == Some(0.0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {body}\n{}", relay.log()));
    for name in [
        "outbox_relay_leader 1",
        "outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_oldest_event_age_seconds",
        "outbox_relay_dead_letters",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    let health = http_get(port, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("\"leader\":true"),
        "{health}"
    );
    let status = cli(&["status"], &[("DATABASE_URL", db.url())]);
    assert!(text(&status).contains("valid"), "{}", text(&status));
    assert!(
        relay.terminate(Duration::from_secs(20)).unwrap(),
        "SIGTERM exits 0:\n{}",
        relay.log()
    );
    let log = relay.log();
    assert!(log.contains("leadership released"), "{log}");
}

#[test]
fn dead_letters_can_be_listed_shown_retried_and_purged() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    // Three dead letters: two of key a (in order), one of key b.
    diesel::sql_query(
        "INSERT INTO outbox (topic, partition_key, event_type, payload) VALUES \
         ('orders', 'a', 'First', convert_to('{\"n\":1}', 'UTF8')), \
         ('orders', 'a', 'Second', convert_to('{\"n\":2}', 'UTF8')), \
         ('audit', 'b', 'Other', '\\x00ff'::bytea)",
    )
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query(
        "WITH m AS (DELETE FROM outbox RETURNING *) INSERT INTO outbox_dead_letters \
         SELECT id, event_id, topic, partition_key, event_type, payload, headers, content_type, \
         traceparent, tx_id, created_at, 1, CASE WHEN topic = 'audit' THEN 'Broker: Topic authorization failed' \
         ELSE 'Broker: Message size too large' END, now() FROM m",
    )
    .execute(&mut conn)
    .unwrap();
    let env = [("DATABASE_URL", db.url())];

    let out = cli(&["dead-letters", "list"], &env);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("orders") && s.contains("audit") && s.contains("Message size too large"),
        "{s}"
    );
    let out = cli(
        &["dead-letters", "list", "--error", "AUTHORIZATION", "--json"],
        &env,
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    let audit_id = json[0]["id"].as_i64().unwrap().to_string();
    let out = cli(&["dead-letters", "show", &audit_id], &env);
    assert!(
        text(&out).contains("binary, hex") && text(&out).contains("00ff"),
        "{}",
        text(&out)
    );
    assert!(!cli(&["dead-letters", "show", "999999"], &env)
        .status
        .success());

    // Retry needs a filter or --all; dry run changes nothing.
    let out = cli(&["dead-letters", "retry"], &env);
    assert!(
        !out.status.success() && text(&out).contains("--all"),
        "{}",
        text(&out)
    );
    let out = cli(&["dead-letters", "retry", "--key", "a", "--dry-run"], &env);
    assert!(
        text(&out).contains("2 dead letters would move"),
        "{}",
        text(&out)
    );
    assert_eq!(outbox_tests::relay::backlog(&mut conn).unwrap(), 0);
    let out = cli(&["dead-letters", "retry", "--key", "a"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dead letters retried"),
        "the action is logged: {}",
        text(&out)
    );
    let pending = outbox::Outbox::new().pending(&mut conn, 10).unwrap();
    let types: Vec<&str> = pending.iter().map(|p| p.event_type.as_str()).collect();
    assert_eq!(types, ["First", "Second"], "back in their original order");

    // Purge refuses without confirmation, honours --dry-run, then deletes with --yes.
    let out = cli(&["dead-letters", "purge", "--topic", "audit"], &env);
    assert!(
        !out.status.success() && text(&out).contains("not confirmed"),
        "{}",
        text(&out)
    );
    let out = cli(
        &["dead-letters", "purge", "--topic", "audit", "--dry-run"],
        &env,
    );
    assert!(
        text(&out).contains("1 dead letters would be deleted"),
        "{}",
        text(&out)
    );
    let out = cli(
        &["dead-letters", "purge", "--topic", "audit", "--yes"],
        &env,
    );
    assert!(
        text(&out).contains("1 dead letters deleted"),
        "{}",
        text(&out)
    );
    let out = cli(&["dead-letters", "list", "--older-than", "1x"], &env);
    assert!(
        !out.status.success() && text(&out).contains("unit must be"),
        "{}",
        text(&out)
    );
    let out = cli(&["dead-letters", "list"], &env);
    assert!(
        text(&out).contains("(no dead letters match)"),
        "{}",
        text(&out)
    );
}
