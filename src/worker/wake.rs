//! One `LISTEN` connection for all of a worker's loops.
//!
//! The jobs, imports, broadcasts and every dispatch loop wait for a `NOTIFY` on their channel
//! (or their poll interval). Each used to hold a `LISTEN` connection of its own: seven
//! PostgreSQL connections per worker with the default four dispatch loops, idle but counted
//! against the server's `max_connections`. [`Wakeups`] holds one, listening on every channel,
//! and hands out a [`Wake`] per loop; a notification wakes every loop of its channel.
//!
//! A notification that comes while a loop is busy is not lost: the loop's next wait returns at
//! once (a `watch` channel remembers that something changed since the loop last looked). Lost
//! connections are reopened with a growing pause; notifications sent meanwhile are missed,
//! which the loops' polls cover, and every loop is woken once when listening resumes.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The worker's listener, with one signal per channel.
pub struct Wakeups {
    senders: HashMap<&'static str, watch::Sender<u64>>,
}

/// A loop's side: waits for the next notification on its channel.
#[derive(Clone)]
pub struct Wake {
    rx: watch::Receiver<u64>,
}

impl Wake {
    /// Returns when a notification came since this `Wake` last returned (at once if one came
    /// meanwhile); never, once the listener has stopped (the loop polls).
    pub async fn notified(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether a notification came since this `Wake` last returned or was asked, without
    /// waiting; asking counts as seeing it.
    pub fn take(&mut self) -> bool {
        let came = self.rx.has_changed().unwrap_or(false);
        self.rx.mark_unchanged();
        came
    }

    /// A `Wake` that never wakes: polling only.
    pub fn never() -> Wake {
        let (tx, rx) = watch::channel(0);
        drop(tx);
        Wake { rx }
    }
}

/// The first pause before reopening the listener's connection; it doubles at each failure.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest pause between attempts to reopen the listener's connection.
const MAX_RETRY: Duration = Duration::from_secs(30);

impl Wakeups {
    /// Starts listening on `channels` from a connection of `pool` until `shutdown`.
    pub fn start(pool: PgPool, channels: &[&'static str], shutdown: CancellationToken) -> Wakeups {
        let senders: HashMap<&'static str, watch::Sender<u64>> =
            channels.iter().map(|c| (*c, watch::channel(0).0)).collect();
        let wakeups = Wakeups { senders };
        let forward = wakeups.senders.clone();
        let names: Vec<&'static str> = channels.to_vec();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = listen(pool, names, forward) => {}
            }
        });
        wakeups
    }

    /// A signal for one loop on `channel` (one of those given to [`Wakeups::start`]).
    pub fn subscribe(&self, channel: &str) -> Wake {
        match self.senders.get(channel) {
            Some(tx) => Wake { rx: tx.subscribe() },
            None => {
                tracing::error!(channel, "no listener for this channel; polling only");
                Wake::never()
            }
        }
    }
}

fn wake_all(senders: &HashMap<&'static str, watch::Sender<u64>>) {
    for tx in senders.values() {
        tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Listens until the task is dropped, reopening the connection when it is lost.
async fn listen(
    pool: PgPool,
    channels: Vec<&'static str>,
    senders: HashMap<&'static str, watch::Sender<u64>>,
) {
    let mut pause = FIRST_RETRY;
    loop {
        let opened = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        let failed = match opened {
            Err(e) => e,
            Ok(mut listener) => {
                // Whatever was notified while nobody listened is looked for now.
                wake_all(&senders);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            pause = FIRST_RETRY;
                            if let Some(tx) = senders.get(n.channel()) {
                                tx.send_modify(|v| *v = v.wrapping_add(1));
                            }
                        }
                        // The connection was lost; the next call reopens it and listens again.
                        Ok(None) => wake_all(&senders),
                        Err(e) => break e,
                    }
                }
            }
        };
        tracing::warn!(error = %crate::error::error_chain(&failed), retry_in = ?pause,
            "cannot LISTEN; the worker polls meanwhile");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}
