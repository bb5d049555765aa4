//! Blocking diesel calls from async code (feature `runtime`, which brings tokio; `kafka`
//! implies it): the one way the consumer runner and the relay run them.
//!
//! A database connection is blocking: calls on it run on tokio's blocking thread pool, never on
//! a runtime thread, and a connection kept between calls travels into the pool and back in an
//! `Option` slot (empty when it has to be re-established).

use diesel::PgConnection;

/// Runs `f` on tokio's blocking thread pool with the connection taken out of `slot`, and puts
/// back the connection `f` returns (`None`: drop it, the next call connects again).
///
/// # Errors
/// The task's [`tokio::task::JoinError`] when `f` panicked (or the runtime is shutting down);
/// `slot` is then left empty.
pub async fn with_connection<T, F>(
    slot: &mut Option<PgConnection>,
    f: F,
) -> Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: FnOnce(Option<PgConnection>) -> (Option<PgConnection>, T) + Send + 'static,
{
    let conn = slot.take();
    let (conn, result) = tokio::task::spawn_blocking(move || f(conn)).await?;
    *slot = conn;
    Ok(result)
}

/// Runs `f` on tokio's blocking thread pool (for a call that opens its own connection).
///
/// # Errors
/// The task's [`tokio::task::JoinError`] when `f` panicked (or the runtime is shutting down).
pub async fn run<T, F>(f: F) -> Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f).await
}

/// Runs blocking `f` on the current thread, first telling a multi-threaded tokio runtime (so
/// its other tasks move to other threads meanwhile); outside a runtime, or on a current-thread
/// runtime, `f` just runs. For blocking work that must happen in place, such as a librdkafka
/// callback called from inside a poll on a runtime thread.
pub fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
