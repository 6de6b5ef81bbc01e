//! The HTTP edge: accepting connections with the limits a public server needs.
//!
//! `axum::serve` gives hyper no timer, so a client that sends half a request, or opens a
//! connection and says nothing, holds a socket forever; and it accepts until the process runs
//! out of file descriptors, after which every accept fails (`/healthz` included). This loop
//! gives hyper a timer (a header-read timeout, which also closes keep-alive connections idle
//! for that long) and holds a permit per open connection: at the cap it stops accepting, so
//! new clients wait in the kernel's backlog instead of failing.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits of the HTTP edge.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Time a client has to send a request's headers, counted from when the connection starts
    /// waiting for a request (so it is also the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long in-flight requests may finish after shutdown is asked for.
    pub grace: Duration,
}

/// The most connections this process can hold open: three quarters of its file-descriptor
/// limit (the rest is for the database pool, providers and logs), at least 64.
pub fn default_max_connections() -> usize {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            let soft = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
            return (soft / 4 * 3).clamp(64, 100_000);
        }
    }
    1024
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight requests
/// finish for up to `limits.grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: EdgeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout);
    let service = TowerToHyperService::new(router);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: not fatal. Wait a
                // little so a full descriptor table is not spun on.
                tracing::warn!(error = %e, "accept failed");
                metrics::counter!("http_accept_errors_total").increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // hyper's timer starts once it knows the protocol, and telling HTTP/1 from HTTP/2
        // waits for the first bytes: a client that sends none is cut off here instead.
        let (builder, service, watcher) = (builder.clone(), service.clone(), graceful.watcher());
        let timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ => tracing::debug!("connection closed before its first byte"),
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.grace) => {
            tracing::warn!(
                grace_secs = limits.grace.as_secs(),
                "in-flight requests cut off after the grace period"
            );
        }
    }
    Ok(())
}
