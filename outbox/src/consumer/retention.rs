//! Inbox retention: the runner's purger of old inbox rows.

use std::time::Duration;

use diesel::PgConnection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::TARGET;
use crate::{Error, Inbox};

/// Purges old inbox rows every `every` until `shutdown`.
pub(super) fn spawn_purger(
    inbox: Inbox,
    url: String,
    keep: Duration,
    every: Duration,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) {
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let (inbox, url) = (inbox.clone(), url.clone());
            let r = crate::blocking::run(move || {
                use diesel::Connection;
                let mut conn = PgConnection::establish(&url).map_err(|e| {
                    Error::InvalidConfig(crate::redact::text_with_url(&e.to_string(), &url))
                })?;
                inbox.purge(&mut conn, keep, 10_000)
            })
            .await;
            match r {
                Ok(Ok(n)) => tracing::info!(target: TARGET, purged = n, "inbox retention"),
                Ok(Err(e)) => tracing::warn!(target: TARGET, error = %e, "inbox retention failed"),
                Err(e) => tracing::warn!(target: TARGET, error = %e, "inbox retention task failed"),
            }
        }
    });
}
