//! What an on-call engineer relies on: `status` listing the leader, the standbys and inbox
//! sizes; the least-privilege role; the dashboard and alert rules in `docs/ops/` (checked by
//! promtool and against the metric names a running relay exports); no secret in any log line.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use outbox_tests::relay::{backlog, leader, wait_until};
use outbox_tests::{free_port, read_all, unique_name, RelayProcess, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_relay-under-test");
/// Nothing listens here: the relays need a broker address, these tests need no broker.
const NO_BROKER: &str = "127.0.0.1:1";

fn ops_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/ops")
        .join(name)
}

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

fn status_json(url: &str) -> serde_json::Value {
    let out = cli(&["status", "--json"], &[("DATABASE_URL", url)]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn relays(json: &serde_json::Value) -> Vec<(String, String)> {
    json["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["instance"].as_str().unwrap().to_owned(),
                r["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn line_with<'a>(s: &'a str, words: &[&str]) -> Option<&'a str> {
    s.lines().find(|l| {
        let cells: Vec<&str> = l.split_whitespace().collect();
        words.iter().all(|w| cells.contains(w))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_leader_the_standbys_and_inbox_sizes() {
    let db = TestDb::migrated().unwrap();
    let mut conn = db.conn().unwrap();
    diesel::sql_query(
        "INSERT INTO inbox (consumer, message_id, processed_at) \
         SELECT 'inventory', 'm-' || g, now() - interval '2 hours' FROM generate_series(1, 3) g \
         UNION ALL SELECT 'billing', 'b-' || g, now() FROM generate_series(1, 2) g",
    )
    .execute(&mut conn)
    .unwrap();

    let mut a = RelayProcess::spawn(BIN, db.url(), NO_BROKER, &["--instance-id", "ops-a"]).unwrap();
    wait_until(Duration::from_secs(30), "ops-a leads", || {
        Ok(leader(&mut conn)?.is_some_and(|(id, _)| id == "ops-a"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    let b = RelayProcess::spawn(BIN, db.url(), NO_BROKER, &["--instance-id", "ops-b"]).unwrap();
    wait_until(Duration::from_secs(30), "two relays connected", || {
        Ok(relays(&status_json(db.url())).len() == 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log(), b.log()));

    let out = cli(&["status"], &[("DATABASE_URL", db.url())]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("RELAYS (connected now)"), "{s}");
    assert!(
        line_with(&s, &["ops-a", "leader", "127.0.0.1"]).is_some(),
        "{s}"
    );
    assert!(
        line_with(&s, &["ops-b", "standby", "127.0.0.1"]).is_some(),
        "{s}"
    );
    assert!(s.contains("INBOX (inbox)"), "{s}");
    let inventory = line_with(&s, &["inventory", "3"]).unwrap_or_else(|| panic!("{s}"));
    assert!(inventory.contains("2.0h"), "age of the oldest row: {s}");
    assert!(line_with(&s, &["billing", "2"]).is_some(), "{s}");

    let json = status_json(db.url());
    assert_eq!(
        relays(&json),
        [
            ("ops-a".to_owned(), "leader".to_owned()),
            ("ops-b".to_owned(), "standby".to_owned())
        ]
    );
    assert_eq!(json["leaders"][0]["leader_id"], "ops-a");
    for r in json["relays"].as_array().unwrap() {
        assert!(r["connections"].as_i64().unwrap() >= 1, "{r}");
        assert!(!r["pids"].as_array().unwrap().is_empty(), "{r}");
        assert!(r["connected_since"].is_string(), "{r}");
    }
    let inbox = &json["inbox"];
    assert_eq!(inbox["exists"], true);
    assert_eq!(inbox["readable"], true);
    let consumers: Vec<(&str, i64)> = inbox["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["consumer"].as_str().unwrap(), c["rows"].as_i64().unwrap()))
        .collect();
    assert_eq!(consumers, [("billing", 2), ("inventory", 3)]);
    let age = inbox["consumers"][1]["oldest_age_secs"].as_f64().unwrap();
    assert!((7190.0..7300.0).contains(&age), "{age}");
    assert!(inbox["consumers"][1]["oldest_processed_at"].is_string());

    // The leader dies: its sessions vanish and the standby is listed as the leader.
    a.kill9().unwrap();
    wait_until(Duration::from_secs(30), "ops-b leads alone", || {
        Ok(relays(&status_json(db.url())) == [("ops-b".to_owned(), "leader".to_owned())])
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));

    // A relay database without an inbox: said so, no error.
    diesel::sql_query("DROP TABLE inbox")
        .execute(&mut conn)
        .unwrap();
    let out = cli(&["status"], &[("DATABASE_URL", db.url())]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("(no inbox table in this database)"),
        "{}",
        text(&out)
    );
    let json = status_json(db.url());
    assert_eq!(json["inbox"]["exists"], false);
    assert_eq!(json["inbox"]["consumers"], serde_json::json!([]));
    drop(b);
}

/// A login role for one test, a member of `outbox_relay`; dropped afterwards.
struct LoginRole {
    name: String,
}

impl LoginRole {
    fn create(admin: &mut PgConnection) -> Self {
        let name = unique_name("relay").replace('-', "_");
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN IN ROLE outbox_relay"))
            .unwrap();
        Self { name }
    }
}

impl Drop for LoginRole {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&outbox_tests::pg::admin_url()) {
            let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {}", self.name));
        }
    }
}

/// Runs the CLI until it exits or `timeout` passes (then kills it).
fn run_until_exit(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(child);
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    (status.is_some_and(|s: ExitStatus| !s.success()), out)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_as_the_least_privilege_role_and_names_a_missing_grant() {
    let db = TestDb::migrated().unwrap();
    let mut admin = db.conn().unwrap();
    let sql = std::fs::read_to_string(ops_file("relay-role.sql")).unwrap();
    admin.batch_execute(&sql).unwrap();
    // Safe to run twice.
    admin.batch_execute(&sql).unwrap();
    let role = LoginRole::create(&mut admin);
    let url = db.url().replacen(
        "postgres://postgres@",
        &format!("postgres://{}@", role.name),
        1,
    );
    assert_ne!(url, db.url(), "test URL form changed: {}", db.url());
    {
        #[derive(QueryableByName)]
        struct Super {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            rolsuper: bool,
        }
        let mut c = PgConnection::establish(&url).unwrap();
        let s: Super =
            diesel::sql_query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                .get_result(&mut c)
                .unwrap();
        assert!(!s.rolsuper, "the test role must not be a superuser");
    }

    // librdkafka's mock cluster listens on real sockets, so the relay process reaches it.
    let cluster = outbox_tests::mock_cluster(1).unwrap();
    let topic = unique_name("least-privilege");
    cluster.create_topic(&topic, 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let events: Vec<outbox::Event> = (0..20)
        .map(|i| outbox::Event::json(&topic, format!("k{}", i % 3), "T", &i).unwrap())
        .collect();
    admin
        .transaction(|c| outbox::Outbox::new().enqueue_batch(c, &events))
        .unwrap();
    let relay = RelayProcess::spawn(BIN, &url, &bootstrap, &[]).unwrap();
    wait_until(
        Duration::from_secs(60),
        "delivery as the relay role",
        || Ok(backlog(&mut admin)? == 0),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    let got = read_all(&bootstrap, &topic, 20, Duration::from_secs(30)).unwrap();
    assert_eq!(got.len(), 20);
    // The role also runs `status`, the dead-letter listing included.
    let env = [("DATABASE_URL", url.as_str())];
    let out = cli(&["status"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        line_with(&text(&out), &["leader"]).is_some(),
        "{}",
        text(&out)
    );
    assert!(cli(&["dead-letters", "list"], &env).status.success());
    drop(relay);

    // One grant missing: the relay stops at start-up and names it, instead of re-sending.
    admin
        .batch_execute("REVOKE DELETE ON outbox FROM outbox_relay")
        .unwrap();
    let (failed, out) = run_until_exit(
        &["run"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("KAFKA_BROKERS", &bootstrap),
        ],
        Duration::from_secs(30),
    );
    assert!(failed, "the relay must exit with an error:\n{out}");
    assert!(
        out.contains(&format!("\"{}\" lacks DELETE on outbox", role.name))
            && out.contains("docs/ops/relay-role.sql"),
        "{out}"
    );
}

fn promtool() -> Option<()> {
    match Command::new("promtool").arg("--version").output() {
        Ok(o) if o.status.success() => Some(()),
        _ => None,
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    if promtool().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing in CI: scripts/setup installs it"
        );
        eprintln!(
            "SKIPPED the_alert_rules_pass_promtool_and_their_unit_tests: promtool not found \
             (scripts/setup installs it; in CI this is a failure)"
        );
        return;
    }
    let dir = ops_file("");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "promtool {args:?}:\n{}", text(&out));
    }
}

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// Every `outbox_relay_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("outbox_relay_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// GitHub's anchor for a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_only_metrics_the_relay_exports() {
    // What a running relay exports.
    let db = TestDb::migrated().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let relay = RelayProcess::spawn(BIN, db.url(), NO_BROKER, &["--metrics-addr", &addr]).unwrap();
    let mut body = String::new();
    wait_until(Duration::from_secs(30), "/metrics with every gauge", || {
        body = http_get(port, "/metrics");
        Ok(body.contains("outbox_relay_oldest_transaction_age_seconds")
            && body.contains("outbox_relay_leader 1"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {body}\n{}", relay.log()));
    drop(relay);
    let exported: BTreeSet<String> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(metric_names)
        .collect();
    for name in [
        "outbox_relay_delivered_total",
        "outbox_relay_failed_total",
        "outbox_relay_dead_lettered_total",
        "outbox_relay_backlog",
        "outbox_relay_oldest_event_age_seconds",
        "outbox_relay_dead_letters",
        "outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_oldest_transaction_age_seconds",
        "outbox_relay_leader",
    ] {
        assert!(
            exported.contains(name),
            "{name} is not exported from the start:\n{body}"
        );
    }

    // The dashboard: valid JSON, well-formed panels, the panels the runbook refers to.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ops_file("grafana-dashboard.json")).unwrap())
            .unwrap();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(dashboard["schemaVersion"].as_i64().unwrap() >= 30);
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_i64().unwrap()), "duplicate id: {p}");
        assert!(p["title"].is_string() && p["type"].is_string(), "{p}");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_i64(), "gridPos.{k}: {p}");
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let dashboard_names = metric_names(&exprs.join("\n"));
    for needed in [
        "outbox_relay_backlog",
        "outbox_relay_oldest_event_age_seconds",
        "outbox_relay_delivered_total",
        "outbox_relay_failed_total",
        "outbox_relay_dead_lettered_total",
        "outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_leader",
    ] {
        assert!(dashboard_names.contains(needed), "no panel for {needed}");
    }
    assert!(exprs.iter().any(|e| e.contains("histogram_quantile(0.99")));

    // The alerts: each has a runbook section in docs/OPERATIONS.md.
    let alerts = std::fs::read_to_string(ops_file("alerts.yml")).unwrap();
    let operations = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md"),
    )
    .unwrap();
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| slug(h.trim_start_matches('#')))
        .collect();
    let alert_count = alerts.matches("- alert: ").count();
    let runbooks: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert!(alert_count >= 5);
    assert_eq!(runbooks.len(), alert_count, "every alert has a runbook_url");
    for r in runbooks {
        let anchor = r
            .trim_matches('"')
            .strip_prefix("docs/OPERATIONS.md#")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            anchors.contains(anchor),
            "{r}: no such section in docs/OPERATIONS.md"
        );
    }
    let uncommented: String = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");

    // Nothing they use may be missing from what the relay exports.
    let used: BTreeSet<String> = dashboard_names
        .union(&metric_names(&uncommented))
        .cloned()
        .collect();
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "used in docs/ops but not exported: {unknown:?}\nexported: {exported:?}"
    );
}

/// Runs `outbox-relay run` for `for_how_long`, then SIGTERM; returns everything it printed.
fn run_for(args: &[&str], env: &[(&str, &str)], for_how_long: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    std::thread::sleep(for_how_long);
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn no_password_appears_in_any_log_line_or_error() {
    const DB_PW: &str = "pg-Secret-4711";
    const KAFKA_PW: &str = "kafka-Secret-0815";
    let sasl = [
        "-X",
        "security.protocol=sasl_plaintext",
        "-X",
        "sasl.mechanism=PLAIN",
        "-X",
        "sasl.username=relay",
        "-X",
        &format!("sasl.password={KAFKA_PW}"),
    ];
    let clean = |what: &str, out: &str| {
        assert!(
            !out.contains(DB_PW) && !out.contains(KAFKA_PW),
            "{what}: a password leaked:\n{out}"
        );
    };

    // The database is unreachable: the relay retries and logs why, in text and in JSON.
    let closed = free_port();
    let dsns = [
        format!("postgres://relay:{DB_PW}@127.0.0.1:{closed}/app"),
        format!("host=127.0.0.1 port={closed} user=relay password={DB_PW} dbname=app"),
        format!("postgres://relay@127.0.0.1:{closed}/app?password={DB_PW}"),
    ];
    for dsn in &dsns {
        for format in ["text", "json"] {
            let mut args = vec!["--log-format", format, "run"];
            args.extend(sasl.iter().copied());
            let out = run_for(
                &args,
                &[
                    ("DATABASE_URL", dsn),
                    ("KAFKA_BROKERS", NO_BROKER),
                    ("RUST_LOG", "trace"),
                ],
                Duration::from_secs(2),
            );
            assert!(
                out.contains("cannot connect to the database"),
                "{dsn} {format}: the failure is logged:\n{out}"
            );
            if format == "json" {
                for line in out.lines().filter(|l| l.starts_with('{')) {
                    serde_json::from_str::<serde_json::Value>(line).unwrap();
                }
            }
            clean(&format!("run {format} {dsn}"), &out);
        }
        // One-shot commands report the error without the password.
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["migrate"],
            &["dead-letters", "list"],
        ] {
            let out = cli(args, &[("DATABASE_URL", dsn)]);
            assert!(!out.status.success());
            clean(&format!("{args:?} {dsn}"), &text(&out));
            assert!(text(&out).contains("cannot connect"), "{}", text(&out));
        }
    }

    // The database is reachable (trust authentication ignores the password), the broker is not:
    // librdkafka's own logs, with its configuration and security debugging on.
    let db = TestDb::migrated().unwrap();
    let url = db.url().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{DB_PW}@"),
        1,
    );
    assert_ne!(url, db.url());
    let mut conn = db.conn().unwrap();
    let e = outbox::Event::json("orders", "k", "T", &1).unwrap();
    conn.transaction(|c| outbox::Outbox::new().enqueue(c, &e))
        .unwrap();
    for format in ["text", "json"] {
        let mut args = vec![
            "--log-format",
            format,
            "run",
            "--allow-superuser",
            "--shutdown-timeout-ms",
            "1000",
            "-X",
            "debug=conf,security,broker,msg",
        ];
        args.extend(sasl.iter().copied());
        let out = run_for(
            &args,
            &[
                ("DATABASE_URL", &url),
                ("KAFKA_BROKERS", NO_BROKER),
                ("RUST_LOG", "trace"),
            ],
            Duration::from_secs(3),
        );
        assert!(out.contains("leadership acquired"), "{out}");
        assert!(
            out.contains("sasl.password=***") && out.contains("sasl.password = [redacted]"),
            "the relay and librdkafka logged the settings, redacted:\n{out}"
        );
        clean(&format!("run {format} with a reachable database"), &out);
    }
}
