//! Shared test harness for the workspace's suites.
//!
//! - [`TestDb`]: a fresh database per test on the local Postgres (dropped afterwards; leftovers of
//!   crashed runs are dropped by the next run).
//! - [`PgCluster`]: a private Postgres cluster on a free port (`wal_level=logical`) that tests can
//!   stop, crash (`-m immediate`, `kill -9`) and restart.
//! - [`Tansu`]: a real Kafka-protocol broker (`tansu`) on a free port that tests can kill and
//!   restart; [`mock_cluster`]: librdkafka's in-process mock cluster for fast tests and fault
//!   injection.
//! - [`unique_name`]: random topic and group names.
//!
//! Environment: `OUTBOX_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! is the maintenance database used to create test databases; `TANSU_BIN` overrides the `tansu`
//! binary (default: `tansu` on `PATH`, then `~/.cargo/bin/tansu`).

#![allow(clippy::missing_panics_doc, clippy::missing_errors_doc)]

pub mod check;
pub mod effects;
pub mod kafka;
pub mod naive;
pub mod pg;
pub mod relay;
pub mod workload;

pub use kafka::{create_topic, mock_cluster, read_all, Tansu, TlsTansu};
pub use pg::{PgCluster, TestDb};
pub use relay::{relay_config, InProcessRelay, RelayProcess};

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};

/// A name unique to this test run: `prefix-<pid>-<counter>-<random>`.
#[must_use]
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}-{n}-{}", std::process::id(), &rand[..8])
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
#[must_use]
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}
