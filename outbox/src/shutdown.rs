//! Process lifetimes, in one place for the relay, the consumer runner's services and the
//! demos: SIGTERM and SIGINT cancel one [`CancellationToken`], and every background task of a
//! process is spawned on one [`TaskTracker`], which shutdown closes and waits for.

use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Cancels `token` on the first SIGTERM or SIGINT (the listener runs on `tasks` and ends with
/// the token). What runs under the token then finishes its in-flight work and returns.
///
/// # Errors
/// The signal handlers could not be installed.
pub fn cancel_on_signals(token: &CancellationToken, tasks: &TaskTracker) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = token.clone();
    tasks.spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = token.cancelled() => return,
        };
        tracing::info!(target: "outbox::shutdown", signal = name, "shutdown requested: finishing in-flight work");
        token.cancel();
    });
    Ok(())
}
