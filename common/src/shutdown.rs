//! SIGINT and SIGTERM turned into one cancellation token that every task of a daemon watches.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled at the first SIGINT or SIGTERM.
///
/// The watcher task ends when the token is cancelled by anyone, so it never outlives the daemon.
/// Must be called inside a tokio runtime.
pub fn signal_token() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};

    let token = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let watched = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
            () = watched.cancelled() => return,
        }
        watched.cancel();
    });
    Ok(token)
}

/// Installs the `tracing` subscriber every Viola binary uses: `RUST_LOG` filter (default
/// `info`), to stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only on a terminal: logs redirected to files stay plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
