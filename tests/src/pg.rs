//! Postgres for tests: fresh databases on the shared server, and private clusters.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

const DB_PREFIX: &str = "outbox_test_";

/// The maintenance database URL used to create and drop test databases.
#[must_use]
pub fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A database created for one test and dropped when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates an empty database on the shared server.
    pub fn new() -> Result<Self> {
        Self::on_server(&admin_url())
    }

    /// Creates an empty database and applies the outbox migrations.
    pub fn migrated() -> Result<Self> {
        let db = Self::new()?;
        outbox::Outbox::new().migrate(&mut db.conn()?)?;
        Ok(db)
    }

    /// Creates an empty database on the server behind `admin_url`.
    pub fn on_server(admin_url: &str) -> Result<Self> {
        static CLEANUP: Once = Once::new();
        let mut admin = PgConnection::establish(admin_url)
            .with_context(|| format!("connect to the test server ({})", scrub(admin_url)))?;
        CLEANUP.call_once(|| drop_leftovers(&mut admin));
        let name = format!(
            "{DB_PREFIX}{}_{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        diesel::sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut admin)?;
        Ok(Self {
            url: replace_db(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        })
    }

    /// Connection URL of the test database.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Database name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to the test database.
    pub fn conn(&self) -> Result<PgConnection> {
        PgConnection::establish(&self.url).with_context(|| format!("connect to {}", self.name))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.admin_url) {
            drop_database(&mut admin, &self.name);
        }
    }
}

/// Drops a test database and the replication slots on it (a slot keeps a database from being
/// dropped, and holds WAL on the shared server until it is).
fn drop_database(admin: &mut PgConnection, name: &str) {
    let slots = format!("FROM pg_replication_slots WHERE database = '{name}'");
    let _ = diesel::sql_query(format!(
        "SELECT pg_terminate_backend(active_pid) {slots} AND active_pid IS NOT NULL"
    ))
    .execute(admin);
    for _ in 0..50 {
        let dropped = diesel::sql_query(format!(
            "SELECT pg_drop_replication_slot(slot_name) {slots} AND active_pid IS NULL"
        ))
        .execute(admin);
        let left = diesel::sql_query(format!("SELECT 1 {slots}"))
            .execute(admin)
            .unwrap_or(0);
        if dropped.is_ok() && left == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(admin);
}

/// Drops test databases left by processes that no longer exist (a crashed or killed run).
fn drop_leftovers(admin: &mut PgConnection) {
    #[derive(QueryableByName)]
    struct Db {
        #[diesel(sql_type = diesel::sql_types::Text)]
        datname: String,
    }
    let Ok(dbs) = diesel::sql_query(format!(
        "SELECT datname::text FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'"
    ))
    .load::<Db>(admin) else {
        return;
    };
    for db in dbs {
        let pid = db.datname[DB_PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            drop_database(admin, &db.datname);
        }
    }
}

/// Removes a password from a URL before it is printed.
#[must_use]
pub fn scrub(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn pg_bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no pg_config and no /usr/lib/postgresql: install the postgresql server")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort();
    candidates
        .pop()
        .context("initdb not found under /usr/lib/postgresql/*/bin")
}

/// A private Postgres cluster on a free port, for tests that stop, crash or reconfigure the
/// database. Runs as the `postgres` OS user when the tests run as root (initdb refuses root).
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
}

impl PgCluster {
    /// initdb + start, with `wal_level=logical`, listening on 127.0.0.1 only.
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// [`PgCluster::start`] with `ssl = on` and a self-signed certificate for `localhost`
    /// (made with the `openssl` command line). Clients may use `sslmode=require`.
    pub fn start_tls() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self> {
        let bindir = pg_bindir()?;
        let dir = tempfile::Builder::new().prefix("outbox-pg-").tempdir()?;
        let cluster = Self {
            port: crate::free_port(),
            bindir,
            dir,
        };
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()?;
            if !status.success() {
                bail!("chown of the cluster directory to postgres failed");
            }
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data_dir(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_connections = 100\nfsync = on\n\
             shared_buffers = 64MB\nlog_min_messages = warning\n",
            cluster.port,
            cluster.dir.path().display()
        );
        if tls {
            cluster.make_certificate()?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        // Appending keeps the file's owner (postgres when running as root).
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(Path::new(&cluster.data_dir()).join("postgresql.conf"))?;
        std::io::Write::write_all(&mut file, conf.as_bytes())?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// A self-signed certificate and key in the data directory, readable only by the server.
    fn make_certificate(&self) -> Result<()> {
        let data = PathBuf::from(self.data_dir());
        let out = Command::new("openssl")
            .args([
                "req", "-new", "-x509", "-days", "2", "-nodes", "-newkey", "rsa:2048",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(data.join("server.key"))
            .arg("-out")
            .arg(data.join("server.crt"))
            .stdin(Stdio::null())
            .output()
            .context("run openssl (install it: scripts/setup)")?;
        if !out.status.success() {
            bail!(
                "openssl req failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        if running_as_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.key"))
                .arg(data.join("server.crt"))
                .status()?;
            if !status.success() {
                bail!("chown of the certificate to postgres failed");
            }
        }
        Ok(())
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let exe = self.bindir.join(program);
        let mut cmd = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the server (after a stop or crash) and waits until it accepts connections.
    pub fn start_server(&self) -> Result<()> {
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while PgConnection::establish(&self.url("postgres")).is_err() {
            if Instant::now() > deadline {
                bail!("private cluster did not accept connections within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: like a crash, no checkpoint; recovery replays WAL on start.
    pub fn stop_immediate(&self) -> Result<()> {
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"],
        )
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) -> Result<()> {
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "fast", "-w", "stop"],
        )
    }

    /// SIGKILL of the postmaster, as in a crash. Its children notice and exit (any still alive
    /// after 10 s are killed too); then [`PgCluster::start_server`] recovers from WAL.
    pub fn kill9(&self) -> Result<()> {
        let pidfile = std::fs::read_to_string(Path::new(&self.data_dir()).join("postmaster.pid"))
            .context("read postmaster.pid")?;
        let pid: u32 = pidfile
            .lines()
            .next()
            .context("empty postmaster.pid")?
            .trim()
            .parse()?;
        let children = children_of(pid);
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -9 {pid} failed");
        }
        // A new postmaster refuses to start while old backends still hold shared memory.
        let deadline = Instant::now() + Duration::from_secs(10);
        let alive = |p: &u32| Path::new(&format!("/proc/{p}")).exists();
        while children.iter().any(alive) || alive(&pid) {
            if Instant::now() > deadline {
                for c in children.iter().filter(|c| alive(c)) {
                    let _ = Command::new("kill").args(["-9", &c.to_string()]).status();
                }
            }
            if Instant::now() > deadline + Duration::from_secs(10) {
                bail!("postgres processes still alive 20 s after kill -9");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The port the cluster listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` on this cluster.
    #[must_use]
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` (empty).
    pub fn create_db(&self, db: &str) -> Result<String> {
        let mut admin = PgConnection::establish(&self.url("postgres"))?;
        diesel::sql_query(format!("CREATE DATABASE \"{db}\"")).execute(&mut admin)?;
        Ok(self.url(db))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// Pids whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                // fields after the parenthesised command: state, ppid, ...
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}
