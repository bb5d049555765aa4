//! Capture: where the events to deliver come from. The delivery engine asks a [`Capture`] for
//! batches and their pages and tells it when a batch was delivered; it knows nothing else of
//! the source. [`Polling`] is the PgQ-style snapshot capture of the outbox table; a second
//! source (streaming from the WAL) implements the same trait.
//!
//! May call: the [`Session`] (fenced statements), `store` (the polling SQL).

use std::future::Future;

use crate::store::{self, Batch, Fetched};
use crate::Result;

use super::session::Session;

/// Options for opening the next batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Open {
    /// Record the new position where a new leader resumes from.
    pub save: bool,
    /// Read the keys that have dead letters (`hold-key`) in the same round trip, BEFORE the
    /// batch's position is taken (so a retry committed after the read is in this batch with its
    /// key still held, or in a later one).
    pub read_held: bool,
    /// Rows per page.
    pub page_size: i64,
}

/// A batch just opened.
pub(super) struct Opened<B> {
    /// The batch.
    pub batch: B,
    /// Its first page, read in the same round trip (`None` when the batch is known empty).
    pub first_page: Option<Vec<Fetched>>,
    /// The keys with dead letters, when [`Open::read_held`] asked for them.
    pub held: Option<Vec<(String, String)>>,
}

/// A source of batches of events, delivered one after the other, in order.
///
/// A batch is the unit of the relay's position: delivered in full (every event acknowledged
/// and removed, or dead-lettered), it is the lower bound of the next; a new leader resumes
/// from the last saved one. Within a batch, events come in pages ordered by id, each page
/// starting after the last id of the previous one.
pub(super) trait Capture: Send + Sync {
    /// A batch and its position.
    type Batch: Clone + Send + Sync + 'static;

    /// Whether [`Capture::open`] itself waits for events to arrive (streaming): then the
    /// engine does not sleep after an empty batch.
    const PUSHES: bool = false;

    /// Opens the batch after `previous` (delivered in full), or resumes the saved position
    /// (`previous == None`, at the start of a term or after a rewind), and reads its first page.
    fn open(
        &self,
        session: &mut Session<'_>,
        previous: Option<Self::Batch>,
        open: Open,
    ) -> impl Future<Output = Result<Opened<Self::Batch>>> + Send;

    /// The next page of `batch`: events after `after_id`, at most `limit`. An empty or short
    /// page ends the batch.
    fn page(
        &self,
        session: &mut Session<'_>,
        batch: &Self::Batch,
        after_id: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Fetched>>> + Send;

    /// Records `batch` as the position a new leader resumes from: still open, or (`done`)
    /// delivered in full.
    fn save(
        &self,
        session: &mut Session<'_>,
        batch: Self::Batch,
        done: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The id the batch's first page starts after; `None` when the batch is known empty.
    fn start_after(batch: &Self::Batch) -> Option<i64>;

    /// Ends the term's hold on the source (streaming: the last confirmation, then the
    /// replication connection closes, so a standby can stream the slot at once).
    fn finish(&self, _session: &mut Session<'_>) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Capture by transaction visibility, as PgQ does: a batch is the outbox rows whose writing
/// transaction is visible in the batch's snapshot and not in the previous batch's.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Polling;

impl Capture for Polling {
    type Batch = Batch;

    async fn open(
        &self,
        session: &mut Session<'_>,
        previous: Option<Batch>,
        open: Open,
    ) -> Result<Opened<Batch>> {
        session
            .call(move |c, sql, lease| {
                let held = if open.read_held {
                    Some(store::held_keys(c, sql)?)
                } else {
                    None
                };
                let batch = match &previous {
                    Some(d) => store::advance_batch(c, sql, lease, d, open.save)?,
                    // A saved open batch's snapshot predates the held keys just read: take a
                    // new one (a superset: nothing is skipped) when they were read.
                    None if held.is_some() => store::open_fresh_batch(c, sql, lease)?,
                    None => store::open_batch(c, sql, lease)?,
                };
                let first_page = if batch.start_after == i64::MAX {
                    None
                } else {
                    Some(store::fetch(
                        c,
                        sql,
                        lease,
                        &batch,
                        batch.start_after,
                        open.page_size,
                    )?)
                };
                Ok(Opened {
                    batch,
                    first_page,
                    held,
                })
            })
            .await
    }

    async fn page(
        &self,
        session: &mut Session<'_>,
        batch: &Batch,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<Fetched>> {
        let batch = batch.clone();
        session
            .call(move |c, sql, lease| store::fetch(c, sql, lease, &batch, after_id, limit))
            .await
    }

    async fn save(&self, session: &mut Session<'_>, batch: Batch, done: bool) -> Result<()> {
        session
            .call(move |c, sql, lease| store::save_batch(c, sql, lease, &batch, done))
            .await
    }

    fn start_after(batch: &Batch) -> Option<i64> {
        (batch.start_after != i64::MAX).then_some(batch.start_after)
    }
}
