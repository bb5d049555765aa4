//! Kafka-protocol brokers for tests: `tansu` (a real broker process) and librdkafka's mock cluster.

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
        let mut broker = Self {
            child: None,
            port: crate::free_port(),
            storage: storage.to_owned(),
            dir: tempfile::Builder::new().prefix("outbox-tansu-").tempdir()?,
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.path().join("tansu.log"))?;
        let child = Command::new(tansu_bin()?)
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn tansu")?;
        self.child = Some(child);
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
    use rdkafka::consumer::Consumer;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        match md
            .as_ref()
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
        {
            Some(n) if n > 0 => break n,
            _ if std::time::Instant::now() > deadline => {
                anyhow::bail!("no metadata for topic {topic}: {:?}", md.err())
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..i32::try_from(partitions)? {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(0))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
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
