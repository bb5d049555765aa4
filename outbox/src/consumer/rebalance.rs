//! Partition ownership across rebalances: which partitions this runner holds (and since which
//! assignment), and the commit of stored offsets when partitions are revoked.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::ClientContext;

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
