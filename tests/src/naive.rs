//! A deliberately broken relay: the "poll by id" design of many hand-rolled outboxes
//! (`WHERE id > last_id`, send one message, await it, move the cursor). Fault tests run it to
//! prove that they catch the bug it has: a transaction that took a lower id and commits after
//! a higher id was read is skipped forever.

use std::time::Duration;

use anyhow::Result;
use diesel::sql_types::BigInt;
use diesel::{PgConnection, RunQueryDsl};
use outbox::StoredEvent;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The naive relay's state: just a cursor.
#[derive(Debug, Default)]
pub struct NaiveRelay {
    /// Highest id sent.
    pub last_id: i64,
}

impl NaiveRelay {
    /// Sends every row with `id > last_id` visible now, one by one, and advances the cursor.
    /// Returns how many it sent.
    pub async fn poll_once(
        &mut self,
        conn: &mut PgConnection,
        producer: &FutureProducer,
    ) -> Result<usize> {
        let rows: Vec<StoredEvent> = diesel::sql_query(format!(
            "SELECT {} FROM outbox WHERE id > $1 ORDER BY id LIMIT 1000",
            outbox::STORED_EVENT_COLUMNS
        ))
        .bind::<BigInt, _>(self.last_id)
        .load(conn)?;
        for row in &rows {
            publish(producer, row).await?;
            self.last_id = row.id;
        }
        Ok(rows.len())
    }
}

/// Publishes one outbox row (key, payload, `ce_id`) and waits for the acknowledgement.
pub async fn publish(producer: &FutureProducer, row: &StoredEvent) -> Result<()> {
    let id = row.event_id.to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: "ce_id",
        value: Some(&id),
    });
    producer
        .send(
            FutureRecord::to(&row.topic)
                .key(&row.partition_key)
                .payload(&row.payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A producer with the same safe settings as the relay's, for naive relays and baselines.
pub fn producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()?)
}
