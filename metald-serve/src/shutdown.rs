//! How a daemon of ours stops: on SIGTERM or SIGINT it takes no new calls,
//! lets the calls in flight finish for up to a drain timeout, and ends
//! without those still open after it. SIGHUP never stops it: it reloads
//! the port's TLS certificate, when there is one.

use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the server task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
    #[error("the server stopped")]
    Io(#[source] std::io::Error),
}

/// Resolves at the first SIGTERM or SIGINT (never, if neither can be listened for).
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for SIGTERM or SIGINT; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

/// Serves until the server stops, which after `stopped` turns true is when
/// the calls in flight are done, or `drain` later if some are not: those
/// are abandoned rather than keeping the daemon from stopping.
pub async fn drain_then_stop(
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
    mut stopped: watch::Receiver<bool>,
    drain: Duration,
) -> Result<(), ServeError> {
    let drain_over = async {
        if stopped.wait_for(|stopped| *stopped).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        served = &mut server => served.map_err(ServeError::Task)?.map_err(ServeError::Io),
        () = drain_over => {
            tracing::warn!(drain_timeout_seconds = drain.as_secs(), "calls still in flight after the drain timeout; stopping without them");
            server.abort();
            Ok(())
        }
    }
}

/// Answers SIGHUP from now on: the port's TLS files are read again (open
/// connections keep theirs), or, without TLS, `without_tls` is logged.
pub fn answer_hangups(tls: Option<std::sync::Arc<crate::tls::TlsTerminator>>, without_tls: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; a SIGHUP would stop the daemon");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match &tls {
                Some(tls) => match tls.reload() {
                    Ok(()) => {
                        tracing::info!(cert_file = %tls.settings().cert_file.display(), "SIGHUP: TLS certificate reloaded; new connections get it")
                    }
                    Err(error) => tracing::error!(%error, "SIGHUP: the TLS files do not load; the certificate loaded before still serves"),
                },
                None => tracing::info!("SIGHUP: {without_tls}"),
            }
        }
    });
}
