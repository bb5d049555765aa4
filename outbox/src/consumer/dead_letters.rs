//! The dead-letter topic: messages the handler gave up on, published with headers saying why.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use super::{HandlerError, IncomingMessage, TARGET};
use crate::Error;

/// The dead-letter producer: idempotent, `acks=all`, keys partitioned as Java clients do.
pub(super) fn producer(brokers: &str) -> Result<FutureProducer, Error> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in crate::kafka_settings::DEAD_LETTER_PRODUCER_ENFORCED {
        c.set(*k, *v);
    }
    c.create().map_err(|source| Error::Kafka {
        what: "dead-letter producer".into(),
        source,
    })
}

/// Publishes `message` to the dead-letter topic with the reason; retries until it is written or
/// the runner stops. Returns whether it was written.
pub(super) async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    consumer: &str,
    message: &IncomingMessage,
    error: &HandlerError,
    attempts: u32,
    stop: &CancellationToken,
) -> bool {
    let (kind, reason) = match error {
        HandlerError::Transient(r) => ("transient", r.as_str()),
        HandlerError::Permanent(r) => ("permanent", r.as_str()),
    };
    let attempts = attempts.to_string();
    let partition = message.partition.to_string();
    let offset = message.offset.to_string();
    let mut delay = Duration::from_millis(100);
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 7);
        for (k, v) in &message.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (k, v) in [
            ("dlq_reason", reason),
            ("dlq_error_kind", kind),
            ("dlq_consumer", consumer),
            ("dlq_attempts", attempts.as_str()),
            ("dlq_original_topic", message.topic.as_str()),
            ("dlq_original_partition", partition.as_str()),
            ("dlq_original_offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = &message.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &message.payload {
            record = record.payload(p.as_slice());
        }
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => {
                tracing::warn!(target: TARGET, topic = %message.topic, partition = message.partition, offset = message.offset, dlq = topic, reason, "message dead-lettered");
                return true;
            }
            Err((e, _)) => {
                tracing::error!(target: TARGET, error = %e, dlq = topic, "cannot write to the dead-letter topic; retrying");
                if stop.is_cancelled() {
                    return false;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
