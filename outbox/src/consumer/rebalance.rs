//! Partition ownership across rebalances: which partitions this runner holds (and since which
//! assignment), and the commit of stored offsets when partitions are revoked.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use super::TARGET;

/// A partition: topic and number.
pub(super) type PartitionKey = (String, i32);

/// What the runner knows of one partition.
#[derive(Default)]
pub(super) struct PartitionState {
    /// Bumped on every assignment and revocation; a worker stops when it changes.
    pub(super) generation: u64,
    /// A worker is applying a message right now.
    pub(super) busy: bool,
}

/// The partitions' state, shared by the dispatch loop, the workers and the rebalance callbacks.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) partitions: Mutex<HashMap<PartitionKey, PartitionState>>,
    /// Notified when a worker finishes its messages in hand.
    pub(super) idle: Condvar,
}

/// Commits stored offsets when partitions are revoked, after their in-hand messages finished.
pub(super) struct RunnerContext {
    pub(super) shared: Arc<Shared>,
    /// The group's rebalance protocol is cooperative (from the configured assignor).
    pub(super) cooperative: bool,
}

impl RunnerContext {
    /// Stops the workers of `revoked` after their message in hand, waits for it (at most
    /// 30 s), and commits the stored offsets.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[PartitionKey]) {
        let mut parts = self
            .shared
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in revoked {
            if let Some(s) = parts.get_mut(p) {
                s.generation += 1;
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while revoked.iter().any(|p| parts.get(p).is_some_and(|s| s.busy))
            && std::time::Instant::now() < deadline
        {
            parts = self
                .shared
                .idle
                .wait_timeout(parts, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(parts);
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(target: TARGET, error = %e, "commit on revocation");
        }
        tracing::info!(target: TARGET, partitions = revoked.len(), "partitions revoked; offsets committed");
    }
}

impl ClientContext for RunnerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            tracing::warn!(target: "outbox::consumer::kafka", facility = fac, "{message}");
        }
    }
}

impl ConsumerContext for RunnerContext {
    /// rdkafka's default asks librdkafka for the rebalance protocol here, and that call can hang
    /// forever in the rebalance that closing the consumer runs (librdkafka #4041, rust-rdkafka
    /// #509: seen here as a runner that never returned from shutdown). The protocol follows from
    /// the configured assignor, known when the consumer is made.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => Rebalance::Error(rdkafka::error::KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let done = match (assign, self.cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(target: TARGET, error = %e, assign, "rebalance: (un)assigning partitions failed");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<PartitionKey> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            // Stop the workers of revoked partitions after the message in hand, and wait for it.
            // This runs inside the consumer's poll, on a runtime thread: tell a multi-threaded
            // runtime so its other tasks (the workers finishing those messages among them) move
            // to other threads meanwhile.
            crate::blocking::in_place(|| self.revoke(consumer, &revoked));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut parts = self
                .shared
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for e in tpl.elements() {
                parts
                    .entry((e.topic().to_owned(), e.partition()))
                    .or_default()
                    .generation += 1;
            }
            tracing::info!(target: TARGET, partitions = tpl.count(), "partitions assigned");
        }
    }
}
