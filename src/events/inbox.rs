//! The campaigns' inbox bell: how the campaign engine learns that events are waiting for it
//! without asking the database every few milliseconds.
//!
//! The statements that append events ([`super::store`]) ring this process's bell when they
//! put rows in `campaign_inbox`; the engine's loop in the same process wakes at once. A process
//! that runs the API without a worker ([`forward`]) passes the rings on as a PostgreSQL
//! `NOTIFY` on [`NOTIFY_CHANNEL`], which the workers' listener hands to their engines, at most
//! once per [`FORWARD_EVERY`] however many events come.
//!
//! The NOTIFY is not sent from the appending transaction: PostgreSQL serialises the commits of
//! every transaction that notifies (one lock for the whole cluster, held through the commit),
//! which cut one-row commits from ~14,500 to ~4,900 a second on the development machine
//! (pgbench, 32 clients). The bell rings when the statement has run, before its transaction
//! commits, so a woken engine may look before the events are visible: it keeps looking every
//! 25 ms for a while after each ring (`worker::run_campaigns`), which covers the commit, and
//! its slow poll covers the rest.
//!
//! The bell is process-wide, like the inbox rows it announces: any `AppState` of the process
//! may have written them, and every engine loop of the process may take them.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The channel on which API-only processes announce new inbox events to the workers.
pub const NOTIFY_CHANNEL: &str = "rapport_inbox";

/// The shortest time between two NOTIFYs of one process: a ring during it is passed on at its
/// end, together with every other ring meanwhile.
pub const FORWARD_EVERY: Duration = Duration::from_millis(25);

static BELL: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::Sender::new(0));

/// Says that this process has just put events in the inbox (their transaction may not have
/// committed yet). Cheap: a counter and a wake-up of the loops waiting, no I/O.
pub fn ring() {
    BELL.send_modify(|n| *n = n.wrapping_add(1));
}

/// A receiver whose `changed()` returns at the next ring after this call.
pub fn subscribe() -> watch::Receiver<u64> {
    BELL.subscribe()
}

/// Passes this process's rings on to the workers as a NOTIFY on [`NOTIFY_CHANNEL`], at most
/// once per [`FORWARD_EVERY`], until `shutdown`. A NOTIFY that fails is logged and dropped:
/// the workers' polls find the events anyway.
pub async fn forward(pool: PgPool, shutdown: CancellationToken) {
    let mut bell = subscribe();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = bell.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if let Err(e) = crate::db::notify(&pool, NOTIFY_CHANNEL).await {
            tracing::debug!(error = %e, "cannot announce new inbox events to the workers");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FORWARD_EVERY) => {}
        }
    }
}
