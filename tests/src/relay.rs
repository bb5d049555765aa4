//! Running the relay in tests: in-process (a tokio task) or as a real process that can be
//! killed, paused and resumed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diesel::sql_types::BigInt;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use outbox_relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

/// A relay configuration for tests: fast polling, a short lease, superuser allowed (the test
/// server's only role).
#[must_use]
pub fn relay_config(database_url: &str, bootstrap: &str) -> RelayConfig {
    RelayConfig::new(database_url, bootstrap)
        .allow_superuser(true)
        .lease(Duration::from_millis(2000))
        .standby_poll(Duration::from_millis(200))
        .idle_poll_max(Duration::from_millis(20))
}

/// A relay running as a task of the test's runtime.
#[derive(Debug)]
pub struct InProcessRelay {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<outbox_relay::Result<()>>,
}

impl InProcessRelay {
    /// Starts `cfg`.
    pub fn start(cfg: RelayConfig) -> Result<Self> {
        Ok(Self::run(Relay::new(cfg)?))
    }

    /// Runs `relay` (built by the caller, e.g. with a listener).
    pub fn run(relay: Relay) -> Self {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move { relay.run(token).await });
        Self { shutdown, handle }
    }

    /// Graceful shutdown; returns the relay's result.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.handle.await??;
        Ok(())
    }
}

/// A relay process (the `outbox-relay` CLI) that tests can kill -9, SIGSTOP and SIGCONT.
#[derive(Debug)]
pub struct RelayProcess {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts `outbox-relay run` with test settings plus `extra` arguments.
    pub fn spawn(
        binary: &str,
        database_url: &str,
        bootstrap: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("relay.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .args([
                "run",
                "--allow-superuser",
                "--lease-ms",
                "2000",
                "--standby-poll-ms",
                "200",
            ])
            .args(["--idle-poll-max-ms", "20"])
            .args(extra)
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BROKERS", bootstrap)
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_TEST_RELAY_LOG")
                    .unwrap_or_else(|_| "info,pg_walstream=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawn relay process")?;
        Ok(Self {
            child: Some(child),
            log,
            _dir: dir,
        })
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {sig} {} failed", self.pid());
        }
        Ok(())
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes with its TCP connections open.
    pub fn stop(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT.
    pub fn cont(&self) -> Result<()> {
        self.signal("-CONT")
    }

    /// SIGTERM and wait for exit (graceful shutdown); returns whether it exited with 0.
    pub fn terminate(&mut self, timeout: Duration) -> Result<bool> {
        self.signal("-TERM")?;
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Ok(false);
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                bail!("relay did not exit within {timeout:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Everything the process logged.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(dir) = std::env::var("OUTBOX_TEST_KEEP_LOGS") {
            let _ = std::fs::copy(
                &self.log,
                std::path::Path::new(&dir).join(format!("relay-{}.log", self.pid())),
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Rows waiting in the outbox.
pub fn backlog(conn: &mut PgConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    Ok(diesel::sql_query("SELECT count(*) AS n FROM outbox")
        .get_result::<N>(conn)?
        .n)
}

/// The current leader and epoch from the state table.
pub fn leader(conn: &mut PgConnection) -> Result<Option<(String, i64)>> {
    #[derive(QueryableByName)]
    struct L {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        leader_id: Option<String>,
        #[diesel(sql_type = BigInt)]
        leader_epoch: i64,
    }
    let rows: Vec<L> = diesel::sql_query(
        "SELECT leader_id, leader_epoch FROM outbox_relay_state \
         WHERE lease_expires_at > clock_timestamp()",
    )
    .load(conn)?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|l| l.leader_id.map(|id| (id, l.leader_epoch))))
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
