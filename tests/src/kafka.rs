//! Kafka-protocol brokers for tests: `tansu` (a real broker process) and librdkafka's mock cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::Message;

fn tansu_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    if let Some(p) = on_path {
        return Ok(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cargo_bin = home.join(".cargo/bin/tansu");
    if cargo_bin.is_file() {
        return Ok(cargo_bin);
    }
    bail!(
        "the tansu broker is not installed: run scripts/setup (or \
         `cargo install tansu --version 0.6.0 --locked --features dynostore,libsql`)"
    )
}

/// A `tansu` broker process on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct Tansu {
    child: Option<Child>,
    port: u16,
    /// The address clients are told to use (another process's, e.g. a TLS terminator's), or
    /// the broker's own.
    advertised: Option<String>,
    storage: String,
    dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts tansu with in-memory storage (fast; loses everything when killed).
    pub fn start() -> Result<Self> {
        Self::start_with_storage("memory://tansu/")
    }

    /// Starts tansu with SQLite storage in a temporary directory (survives kill -9 and restart).
    pub fn start_durable() -> Result<Self> {
        Self::start_with_storage("sqlite://tansu.db")
    }

    fn start_with_storage(storage: &str) -> Result<Self> {
        Self::start_advertising(storage, None)
    }

    fn start_advertising(storage: &str, advertised: Option<String>) -> Result<Self> {
        let mut broker = Self {
            child: None,
            port: crate::free_port(),
            advertised,
            storage: storage.to_owned(),
            dir: tempfile::Builder::new().prefix("outbox-tansu-").tempdir()?,
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.advertised {
            Some(a) => format!("tcp://{a}"),
            None => url.clone(),
        };
        let log = std::fs::File::create(self.dir.path().join("tansu.log"))?;
        let child = Command::new(tansu_bin()?)
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", &self.storage])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn tansu")?;
        self.child = Some(child);
        if self.advertised.is_some() {
            // Metadata would point at the terminator, which is not up yet: wait for the port.
            return wait_for_port(self.port, Duration::from_secs(30));
        }
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("tansu exited during start-up ({status}): {}", self.log());
                }
            }
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", self.bootstrap())
                .create()?;
            if consumer
                .fetch_metadata(None, Duration::from_secs(1))
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("tansu did not answer metadata within 30 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The broker's log so far (for failure messages).
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// `bootstrap.servers` for clients.
    #[must_use]
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL the broker (an outage). The port stays reserved for [`Tansu::restart`].
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `tansu` behind a TLS terminator (`stunnel4`, from Debian): clients speak TLS to
/// `localhost:<port>`, the terminator forwards plain TCP to tansu, and tansu advertises the
/// terminator's address, so every connection a client makes is TLS. The server certificate is
/// for `localhost` only (not `127.0.0.1`), signed by a CA made for this broker; a second CA
/// that signed nothing is there for tests of a wrong CA. Both are killed when dropped.
#[derive(Debug)]
pub struct TlsTansu {
    broker: Tansu,
    stunnel: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsTansu {
    /// Starts tansu (in memory) and the terminator.
    pub fn start() -> Result<Self> {
        let port = crate::free_port();
        let broker =
            Tansu::start_advertising("memory://tansu/", Some(format!("localhost:{port}")))?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-kafka-tls-")
            .tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:localhost\n")?;
        let sh = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .context("run openssl (install it: scripts/setup)")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        for ca in ["ca", "other-ca"] {
            sh(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=outbox test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ])?;
        }
        sh(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ])?;
        sh(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ])?;
        std::fs::write(
            d.join("stunnel.conf"),
            format!(
                "foreground = yes\npid =\noutput = {log}\n[kafka]\naccept = 127.0.0.1:{port}\n\
                 connect = 127.0.0.1:{broker}\ncert = {cert}\nkey = {key}\n",
                log = d.join("stunnel.log").display(),
                broker = broker.port,
                cert = d.join("server.pem").display(),
                key = d.join("server.key").display(),
            ),
        )?;
        let stunnel = Command::new("stunnel4")
            .arg(d.join("stunnel.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn stunnel4 (install it: scripts/setup)")?;
        let tls = Self {
            broker,
            stunnel: Some(stunnel),
            port,
            dir,
        };
        wait_for_port(port, Duration::from_secs(30))?;
        Ok(tls)
    }

    /// `bootstrap.servers` through the terminator, by the certificate's name.
    #[must_use]
    pub fn bootstrap(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// The same terminator by IP address, which the certificate does not name.
    #[must_use]
    pub fn bootstrap_by_ip(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA that signed the broker's certificate.
    #[must_use]
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing the broker presents.
    #[must_use]
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// Client options for TLS with `ca` (IPv4: the terminator listens on 127.0.0.1 only).
    #[must_use]
    pub fn client_options(ca: &std::path::Path) -> Vec<(String, String)> {
        vec![
            ("security.protocol".into(), "ssl".into()),
            ("ssl.ca.location".into(), ca.display().to_string()),
            ("broker.address.family".into(), "v4".into()),
        ]
    }

    /// A client configuration speaking TLS to this broker with the right CA.
    #[must_use]
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        for (k, v) in Self::client_options(&self.ca()) {
            c.set(k, v);
        }
        c
    }

    /// The terminator's log (handshake failures are named there too).
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stunnel.log")).unwrap_or_default()
            + &self.broker.log()
    }
}

impl Drop for TlsTansu {
    fn drop(&mut self) {
        if let Some(mut c) = self.stunnel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// librdkafka's in-process mock cluster with `brokers` brokers.
pub fn mock_cluster(brokers: i32) -> Result<MockCluster<'static, DefaultProducerContext>> {
    Ok(MockCluster::new(brokers)?)
}

/// Creates `topic` with `partitions` partitions (replication 1) and waits until it is usable.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((name, code)) = r {
            bail!("create topic {name}: {code}");
        }
    }
    Ok(())
}

/// An independent reader of `topic` from offset 0: every partition assigned directly (no group,
/// so no rebalance can rewind it when a broker restarts), committed data only, no commits.
pub fn reader(bootstrap: &str, topic: &str) -> Result<BaseConsumer> {
    reader_at(
        bootstrap,
        topic,
        &BTreeMap::new(),
        None,
        Duration::from_secs(30),
    )
}

/// [`reader`] resuming at `next[p]` on each partition `p` that `next` names (offset 0 on the
/// others), waiting up to `metadata_wait` for the topic's partitions.
///
/// `fetch_max_bytes` caps each fetch (`fetch.max.bytes`, and `message.max.bytes`, which
/// librdkafka wants no larger). tansu 0.6.0 bounds a fetch by nothing else (it ignores
/// `max.partition.fetch.bytes`, counts only keys and values, and serves up to 5 MB), and its
/// SQLite storage looks up each record's headers by scanning every header it stores: one fetch
/// of a large topic from the start can take longer than the client's request timeout
/// (`socket.timeout.ms` + `fetch.wait.max.ms`), which then sends the same fetch again, for ever.
/// A record larger than the cap is never served by tansu (it returns nothing rather than the one
/// record), so the cap must exceed the largest key plus value of the topic.
pub fn reader_at(
    bootstrap: &str,
    topic: &str,
    next: &BTreeMap<i32, i64>,
    fetch_max_bytes: Option<usize>,
    metadata_wait: Duration,
) -> Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    if let Some(bytes) = fetch_max_bytes {
        config
            .set("fetch.max.bytes", bytes.to_string())
            .set("message.max.bytes", bytes.to_string());
    }
    let consumer: BaseConsumer = config.create()?;
    let partitions = partition_count(&consumer, topic, metadata_wait)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        let at = next.get(&p).copied().unwrap_or(0);
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(at))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// The number of partitions of `topic`, asking until `wait` has passed.
fn partition_count(consumer: &BaseConsumer, topic: &str, wait: Duration) -> Result<i32> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let md = consumer.fetch_metadata(
            Some(topic),
            left.clamp(Duration::from_millis(100), Duration::from_secs(5)),
        );
        match md
            .as_ref()
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
        {
            Some(n) if n > 0 => return Ok(i32::try_from(n)?),
            _ if Instant::now() > deadline => {
                bail!(
                    "no metadata for topic {topic} within {wait:?}: {:?}",
                    md.err()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The broker's high watermark (the offset after the last message) of each partition of
/// `topic`, asked within about `wait`.
pub fn high_watermarks(bootstrap: &str, topic: &str, wait: Duration) -> Result<BTreeMap<i32, i64>> {
    let deadline = Instant::now() + wait;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("isolation.level", "read_committed")
        .create()?;
    let partitions = partition_count(&consumer, topic, wait)?;
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        let (_, high) = consumer
            .fetch_watermarks(topic, p, left)
            .with_context(|| format!("watermarks of {topic} [{p}]"))?;
        ends.insert(p, high);
    }
    Ok(ends)
}

/// Reads every message of `topic` from offset 0 until `expected` messages arrived or `timeout`
/// passed (an independent reader for checking what a relay published). Uses its own group.
pub fn read_all(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>> {
    let consumer = reader(bootstrap, topic)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(e)) => bail!("consume {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// The payload of a message as UTF-8 (lossy), for assertions.
#[must_use]
pub fn payload_str(m: &OwnedMessage) -> String {
    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()
}
