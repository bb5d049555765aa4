//! Leadership: the relay's database connection, and the session of one leader term that owns
//! the connection, the statements and the lease, renews the lease when it is due and fences
//! every write with it.
//!
//! May call: `store` (the SQL). Called by: the engine's term loop, capture and delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::PgConnection;

use crate::store::{self, DeadLetter, Lease, Sql};
use crate::{Error, Result};

use super::TARGET;

/// What a removal did (streaming): the events settled, the rows it did not find.
type Removal = (Vec<i64>, Vec<i64>);

/// One database connection, used from blocking threads (diesel is synchronous).
pub(super) struct Db {
    url: Arc<str>,
    /// `application_name` of the session: `outbox-relay:<instance>` (listed by `status`).
    name: Arc<str>,
    /// `synchronous_commit` of the session.
    synchronous_commit: Arc<str>,
    conn: Option<PgConnection>,
}

impl Db {
    pub(super) fn new(url: &str, name: &str, synchronous_commit: &str) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            synchronous_commit: synchronous_commit.into(),
            conn: None,
        }
    }

    /// Runs `f` on the connection on the blocking pool, connecting first if needed. The connection
    /// is dropped after a database error, so the next call reconnects.
    pub(super) async fn call<T, F>(&mut self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T> + Send + 'static,
    {
        let (url, name, sync) = (
            Arc::clone(&self.url),
            Arc::clone(&self.name),
            Arc::clone(&self.synchronous_commit),
        );
        outbox::blocking::with_connection(&mut self.conn, move |conn| {
            let mut conn = match conn {
                Some(c) => c,
                None => match store::connect_as(&url, Some(&name))
                    .and_then(|mut c| store::set_synchronous_commit(&mut c, &sync).map(|()| c))
                {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            let result = f(&mut conn);
            // Kept unless a database error may have left it broken: the next call reconnects.
            let keep = matches!(result, Ok(_) | Err(Error::LostLeadership(_)));
            (keep.then_some(conn), result)
        })
        .await
        .map_err(Error::TaskFailed)?
    }
}

/// One leader term's hold on the database: the connection, the statements, the lease.
///
/// Every statement that reads rows to send or writes anything runs through [`Session::call`],
/// which hands it the lease to fence with, and first removes the rows acknowledged since the
/// previous call ([`Session::remove_later`]) in the same blocking call.
pub(super) struct Session<'a> {
    db: &'a mut Db,
    sql: Arc<Sql>,
    lease: Lease,
    lease_duration: Duration,
    last_renew: Instant,
    /// Acknowledged rows not yet removed: the next call removes them first (one round of
    /// thread hand-offs less per page). Always removed before a position is saved or the term
    /// ends normally.
    unremoved: Vec<i64>,
    /// Events settled (delivered or dead-lettered) since streaming capture last took them.
    settled: Vec<i64>,
    /// Whether `settled` is kept (streaming capture reads it).
    track_settled: bool,
    /// Rows a removal did not find (streaming: possibly not visible yet), for
    /// [`Session::take_missed`].
    missed: Vec<i64>,
    /// Streaming: rows of dead letters written from their content, removed by a plain delete
    /// (never kept as delivered).
    undelivered: Vec<i64>,
}

impl<'a> Session<'a> {
    /// The session of the term that `lease` (just acquired on `db`) begins.
    pub(super) fn new(
        db: &'a mut Db,
        sql: Arc<Sql>,
        lease: Lease,
        lease_duration: Duration,
    ) -> Self {
        Self {
            db,
            sql,
            lease,
            lease_duration,
            last_renew: Instant::now(),
            unremoved: Vec::new(),
            settled: Vec::new(),
            track_settled: false,
            missed: Vec::new(),
            undelivered: Vec::new(),
        }
    }

    /// Keeps the ids of settled events for [`Session::take_settled`].
    pub(super) fn track_settled(mut self) -> Self {
        self.track_settled = true;
        self
    }

    /// Acknowledged rows that a removal did not find since the last call (streaming capture
    /// decides whether to try again: their transaction may not be visible yet).
    pub(super) fn take_missed(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.missed)
    }

    /// The events settled since the last call: acknowledged (and removed by a call since) or
    /// dead-lettered. Call it after a [`Session::call`], which removes the acknowledged rows.
    pub(super) fn take_settled(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.settled)
    }

    /// Runs `f` on the connection with the statements and the lease, right after removing the
    /// acknowledged rows waiting for removal (removal first, each statement fenced by the lease).
    pub(super) async fn call<T, F>(&mut self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection, &Sql, &Lease) -> Result<T> + Send + 'static,
    {
        let ids = std::mem::take(&mut self.unremoved);
        let dead_rows = std::mem::take(&mut self.undelivered);
        let track = self.track_settled;
        let outcome: Arc<std::sync::Mutex<Option<Removal>>> = Arc::new(std::sync::Mutex::new(None));
        let (sql, lease, out) = (
            Arc::clone(&self.sql),
            self.lease.clone(),
            Arc::clone(&outcome),
        );
        let result = self
            .db
            .call(move |c| {
                // Tableless events (negative ids) have no row.
                let (mut rows, no_row): (Vec<i64>, Vec<i64>) =
                    ids.into_iter().partition(|id| *id > 0);
                let mut removed = if rows.is_empty() {
                    Vec::new()
                } else if track {
                    store::delete_returning(c, &sql, &lease, &rows, sql.keeps_delivered())?
                } else {
                    store::delete(c, &sql, &lease, &rows)?;
                    Vec::new()
                };
                if !dead_rows.is_empty() {
                    removed.extend(store::delete_returning(c, &sql, &lease, &dead_rows, false)?);
                    rows.extend(dead_rows);
                }
                if track {
                    let gone: std::collections::HashSet<i64> = removed.iter().copied().collect();
                    let missed = rows.into_iter().filter(|id| !gone.contains(id)).collect();
                    let mut settled = removed;
                    settled.extend(no_row);
                    *out.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some((settled, missed));
                }
                f(c, &sql, &lease)
            })
            .await;
        if let Some((settled, missed)) = outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            self.settled.extend(settled);
            self.missed.extend(missed);
        }
        result
    }

    /// Queues acknowledged rows for removal by the next call.
    pub(super) fn remove_later(&mut self, ids: impl IntoIterator<Item = i64>) {
        self.unremoved.extend(ids);
    }

    /// Whether acknowledged rows wait for removal.
    pub(super) fn has_unremoved(&self) -> bool {
        !self.unremoved.is_empty() || !self.undelivered.is_empty()
    }

    /// Removes what was acknowledged now (best effort: what stays is sent again by the next
    /// leader, at-least-once).
    pub(super) async fn flush_removals(&mut self) {
        if let Err(e) = self.call(|_, _, _| Ok(())).await {
            tracing::debug!(target: TARGET, error = %e, "could not remove acknowledged rows; they will be sent again");
        }
    }

    /// Moves `rows` to the dead letters (fenced).
    pub(super) async fn dead_letter(&mut self, rows: Vec<DeadLetter>) -> Result<()> {
        let ids: Vec<i64> = if self.track_settled {
            rows.iter().map(|r| r.id).collect()
        } else {
            Vec::new()
        };
        self.call(move |c, sql, lease| store::dead_letter(c, sql, lease, &rows))
            .await?;
        // Streaming writes dead letters from their content; a row's own removal follows (and
        // is retried while the row is not visible yet): settled once removed.
        let (rows, no_row): (Vec<i64>, Vec<i64>) = ids.into_iter().partition(|id| *id > 0);
        self.undelivered.extend(rows);
        self.settled.extend(no_row);
        Ok(())
    }

    /// Renews the lease when a quarter of it has passed since the last renewal.
    ///
    /// # Errors
    /// [`Error::LostLeadership`] when the lease is no longer ours.
    pub(super) async fn renew_if_due(&mut self) -> Result<()> {
        if self.last_renew.elapsed() >= self.lease_duration / 4 {
            self.renew().await?;
        }
        Ok(())
    }

    async fn renew(&mut self) -> Result<()> {
        let ms = u64::try_from(self.lease_duration.as_millis()).unwrap_or(u64::MAX);
        let (sql, lease) = (Arc::clone(&self.sql), self.lease.clone());
        self.db
            .call(move |c| store::renew(c, &sql, &lease, ms))
            .await?;
        self.last_renew = Instant::now();
        Ok(())
    }

    /// How long until the lease is due for renewal (at least 10 ms).
    pub(super) fn renew_in(&self) -> Duration {
        (self.lease_duration / 4)
            .saturating_sub(self.last_renew.elapsed())
            .max(Duration::from_millis(10))
    }

    /// Sleeps `d` (or until `stop`), renewing the lease on the way.
    pub(super) async fn sleep_renewing(
        &mut self,
        d: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<()> {
        let until = Instant::now() + d;
        while !stop.is_cancelled() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            super::sleep_or_cancel(left.min(self.lease_duration / 4), stop).await;
            self.renew_if_due().await?;
        }
        Ok(())
    }

    /// Gives the lease up so a standby takes over at once (best effort: it expires anyway).
    pub(super) async fn release(db: &mut Db, sql: &Arc<Sql>, lease: Lease) {
        let sql = Arc::clone(sql);
        if let Err(e) = db.call(move |c| store::release(c, &sql, &lease)).await {
            tracing::debug!(target: TARGET, error = %e, "lease release failed; it expires on its own");
        }
    }
}
