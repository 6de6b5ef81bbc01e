//! The connection pool, database creation, migrations and error-mapping helpers.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Why the service could not reach its database; printed as one line at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL ({url}): {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to the database at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("cannot create the database {name} at {url}: {reason}")]
    CannotCreate {
        name: String,
        url: String,
        reason: String,
    },
    #[error("cannot apply migrations to {url}: {reason}")]
    Migrate { url: String, reason: String },
    #[error("{0}")]
    Secrets(String),
}

/// The URL with its password replaced, safe to print.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("****"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// Begins a transaction on a connection from `pool`, safe to cancel.
///
/// sqlx's `Pool::begin` (0.8.6, transact-rs/sqlx#4393) counts the transaction only once the
/// server has answered `BEGIN`: a caller dropped in between (a client that disconnects, a
/// timeout, an aborted task) leaves the session inside a transaction that nothing rolls
/// back, and the pool hands that connection to the next borrower, whose writes then run
/// inside it and are never committed. The `BEGIN` runs in a task of its own, which finishes
/// it whatever happens to the caller: a transaction nobody waits for any more is dropped
/// there, counted, so its rollback is queued as usual.
pub async fn begin(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let pool = pool.clone();
    // The one place `Pool::begin` may be called: in a task nothing cancels.
    #[allow(clippy::disallowed_methods)]
    let begun = tokio::spawn(async move { pool.begin().await });
    match begun.await {
        Ok(tx) => tx,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(sqlx::Error::Protocol(format!("BEGIN was stopped: {e}"))),
    }
}

/// A pooled connection idle for this long is pinged before use (a dead one is replaced).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Connects to the database named by `url`, creating the database first if it is missing.
pub async fn connect(
    url: &str,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, StartupError> {
    let shown = redact_url(url);
    let options = PgConnectOptions::from_str(url).map_err(|source| StartupError::InvalidUrl {
        url: shown.clone(),
        source,
    })?;
    ensure_database(&options, &shown, timeout).await?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(timeout)
        // sqlx pings every connection before handing it out (a round trip per acquire, as
        // many as the one query of a read). Ping only those that sat idle long enough to
        // have been dropped by a restart or a proxy; one in use a moment ago is alive.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        // One large statement or result (a batch of events, a campaign chunk) grows a
        // connection's buffers; give the memory back when the connection returns to the pool.
        .after_release(|conn, _| {
            Box::pin(async move {
                conn.shrink_buffers();
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| StartupError::Unreachable {
            url: shown,
            reason: crate::error::error_chain(&e),
        })
}

/// A pool for `LISTEN` connections only, on the same server and options as `pool`, with room
/// for `listeners` of them, each opened when its listener starts: the API keys' one, and a
/// worker's (`worker::wake`, one for all its loops).
///
/// A listener holds its connection for the life of the process. Taken from the work pool,
/// the listeners (then one for each dispatch loop, jobs, imports, broadcasts, and the API
/// keys' one) held eight of its connections for good with the default four dispatch loops,
/// and a pool of that size or less left nothing for the work: the server never became
/// ready. Apart, they cannot starve it, and `db_max_connections` is what requests and rounds
/// share.
pub fn listen_pool(pool: &PgPool, listeners: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(listeners.max(1))
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Creates the target database when the server answers that it does not exist.
async fn ensure_database(
    options: &PgConnectOptions,
    shown: &str,
    timeout: Duration,
) -> Result<(), StartupError> {
    let attempt = tokio::time::timeout(timeout, options.connect()).await;
    let error = match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            return Ok(());
        }
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(StartupError::Unreachable {
                url: shown.to_owned(),
                reason: format!("no answer within {} s", timeout.as_secs()),
            });
        }
    };
    let missing =
        matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"));
    if !missing {
        return Err(StartupError::Unreachable {
            url: shown.to_owned(),
            reason: crate::error::error_chain(&error),
        });
    }
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let maintenance = options.clone().database("postgres");
    let cannot = |reason: String| StartupError::CannotCreate {
        name: name.clone(),
        url: shown.to_owned(),
        reason,
    };
    let mut conn = maintenance
        .connect()
        .await
        .map_err(|e| cannot(crate::error::error_chain(&e)))?;
    let sql = format!("CREATE DATABASE {}", quote_ident(&name));
    match sqlx::raw_sql(&sql).execute(&mut conn).await {
        Ok(_) => tracing::info!(database = %name, "created the database"),
        // Another process created it between our two attempts.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
        Err(e) => return Err(cannot(crate::error::error_chain(&e))),
    }
    let _ = conn.close().await;
    Ok(())
}

/// Applies pending migrations; safe to run from several processes at once (sqlx takes an
/// advisory lock).
pub async fn migrate(pool: &PgPool, url: &str) -> Result<(), StartupError> {
    MIGRATOR.run(pool).await.map_err(|e| StartupError::Migrate {
        url: redact_url(url),
        reason: crate::error::error_chain(&e),
    })
}

/// Whether every embedded migration has been applied to the database.
pub async fn migrations_applied(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(conn)
            .await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .all(|m| applied.binary_search(&m.version).is_ok()))
}

/// `NOTIFY channel` on `conn`'s session: inside a transaction it is delivered when that
/// commits (and not at all if it rolls back), so listeners never look before the rows are there.
/// PostgreSQL serialises the commits of notifying transactions: keep it off hot paths.
pub async fn notify<'c, E>(conn: E, channel: &str) -> Result<(), sqlx::Error>
where
    E: sqlx::PgExecutor<'c>,
{
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}

/// Double-quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether `e` is a unique violation, optionally of the named constraint or index.
pub fn is_unique_violation(e: &sqlx::Error, constraint: Option<&str>) -> bool {
    match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            constraint.is_none() || db.constraint() == constraint
        }
        _ => false,
    }
}

/// Takes each of the transaction-scoped advisory locks `keys` that no other session holds,
/// without waiting; the keys taken.
pub async fn try_advisory_xact_locks(
    conn: &mut PgConnection,
    keys: &[i64],
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT k FROM unnest($1::int8[]) AS u(k) WHERE pg_try_advisory_xact_lock(k)",
    )
    .bind(keys)
    .fetch_all(conn)
    .await
}
