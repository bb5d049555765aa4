//! Step 2: the Kafka cluster, embedded (librdkafka's mock cluster) or external (`--brokers`).

use std::time::Duration;

use anyhow::{bail, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// The demo's topics: name and partitions (replicated 3 times on the embedded cluster, once on
/// an external one).
const TOPICS: [(&str, i32); 7] = [
    ("orders.events", 6),
    ("inventory.events", 6),
    ("warehouse.movements", 6),
    ("warehouse.capture", 6),
    ("warehouse.dual", 6),
    ("demo-order.dlq", 1),
    ("demo-inventory.dlq", 1),
];

/// The cluster the services and relays talk to.
pub(crate) struct Broker {
    /// The embedded cluster, kept alive for the whole run (`None` with `--brokers`).
    _cluster: Option<MockCluster<'static, DefaultProducerContext>>,
    /// Bootstrap servers.
    pub(crate) bootstrap: String,
}

impl Broker {
    /// Starts the embedded cluster, or creates the topics on `external`, and prints the broker
    /// line.
    pub(crate) fn start(external: Option<&str>) -> Result<Self> {
        let broker = if let Some(b) = external {
            create_topics(b)?;
            Self {
                _cluster: None,
                bootstrap: b.to_owned(),
            }
        } else {
            let cluster = MockCluster::new(3)?;
            for (t, partitions) in TOPICS {
                cluster.create_topic(t, partitions, 3)?;
            }
            Self {
                bootstrap: cluster.bootstrap_servers(),
                _cluster: Some(cluster),
            }
        };
        println!(
            "broker     {}{}",
            broker.bootstrap,
            if external.is_some() {
                ""
            } else {
                " (embedded mock cluster)"
            }
        );
        Ok(broker)
    }
}

/// Creates the demo's topics on an external cluster (existing ones are fine).
fn create_topics(brokers: &str) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics = TOPICS
        .map(|(name, partitions)| NewTopic::new(name, partitions, TopicReplication::Fixed(1)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(admin.create_topics(
        &topics,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for r in results {
        if let Err((name, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("create topic {name}: {code}");
            }
        }
    }
    Ok(())
}
