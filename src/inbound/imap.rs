//! A tenant's IMAP mailbox as a way in for email: the worker reads the unseen messages of the
//! configured folder (`imap_*` settings of `PUT /v1/channels/email`), files each one exactly as
//! the email webhook does, and only after that is committed marks it `\Seen` (or moves it to
//! `imap_processed_folder`). Where the server has IDLE the connection waits for new mail and a
//! message is read as it arrives; otherwise the mailbox is polled every `imap_poll_secs`.
//!
//! Exactly once: each message is filed in the transaction that also moves the mailbox's mark
//! (its last UID) past it, under a lease that one worker process holds at a time; a worker that
//! dies between the commit and the `\Seen` flag leaves a message the next round skips by its
//! UID, and a redelivered Message-ID changes nothing anyway.
//!
//! The server is the tenant's, and so is treated like any request made on a tenant's behalf:
//! its host follows the egress policy, every command has a time limit, and what the server may
//! send is metered (a message over the email size limit is left unread, and no answer may
//! exceed it either).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::TryStreamExt;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::email::MAX_EMAIL_BYTES;
use super::receive;
use super::store::{self, MailboxMark};
use crate::AppState;
use crate::channels::settings::{self, Resolved};
use crate::domain::{Channel, TenantId};
use crate::error::StoreError;

/// How long one IMAP command (or the connection, or the login) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// What one answer of the server may carry besides a message.
const ANSWER_SLACK: usize = 1024 * 1024;
/// The most messages read in one round before the lease is renewed.
const ROUND_MESSAGES: usize = 100;

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS from the first byte (port 993).
    Tls,
    /// Plain, then `STARTTLS` (port 143).
    StartTls,
    /// Plain all the way: for a server the operator allowed on a local network only.
    None,
}

/// A tenant's mailbox, from its email channel's settings and secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub user: String,
    password: String,
    pub folder: String,
    pub processed_folder: Option<String>,
}

impl fmt::Debug for MailboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source())
    }
}

impl MailboxConfig {
    /// The mailbox a channel names, if it names one.
    pub fn from_channel(config: &Resolved) -> Option<MailboxConfig> {
        let s = &config.settings;
        let text = |k: &str| {
            s.get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let host = text("imap_host")?;
        let security = match text("imap_security") {
            Some("none") => Security::None,
            Some("starttls") => Security::StartTls,
            _ => Security::Tls,
        };
        let port = s
            .get("imap_port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(if security == Security::Tls { 993 } else { 143 });
        Some(MailboxConfig {
            host: host.to_owned(),
            port,
            security,
            user: text("imap_user")?.to_owned(),
            password: config.secrets.get("imap_password")?.clone(),
            folder: text("imap_folder").unwrap_or("INBOX").to_owned(),
            processed_folder: text("imap_processed_folder").map(str::to_owned),
        })
    }

    /// What the mailbox's mark applies to: another server, user or folder starts afresh.
    pub fn source(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.folder)
    }
}

/// Why a round stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// Said to the tenant (on the channel's `mailbox.last_error`).
    #[error("{0}")]
    Mailbox(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Another worker holds the mailbox now.
    #[error("the mailbox lease was lost")]
    LeaseLost,
    /// The tenant or its mailbox is gone.
    #[error("the mailbox is no longer configured")]
    Gone,
}

fn mailbox_error(what: &str, e: impl fmt::Display) -> ImapError {
    ImapError::Mailbox(format!("imap: {what}: {e}"))
}

/// A byte budget on what the server sends: reads fail once it is spent, so no answer can grow
/// past what the caller allowed for it.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                let left = this.budget.load(Ordering::Relaxed);
                if read > left {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the server sent more than a message may be",
                    )));
                }
                this.budget.store(left - read, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug> Io for T {}

type Session = async_imap::Session<Metered<Box<dyn Io>>>;

/// A logged-in connection to a mailbox, with what its server can do.
pub struct Connection {
    session: Session,
    budget: Arc<AtomicUsize>,
    idle: bool,
    moves: bool,
}

impl Connection {
    /// Allows the next answer(s) `bytes` bytes.
    fn allow(&self, bytes: usize) {
        self.budget.store(bytes, Ordering::Relaxed);
    }
}

async fn within<T, E: fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(mailbox_error(what, e)),
        Err(_) => Err(mailbox_error(what, "no answer in time")),
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls<S: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug + 'static>(
    stream: S,
    host: &str,
) -> Result<Box<dyn Io>, ImapError> {
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| mailbox_error("the host name", e))?;
    let stream = within("TLS handshake", tls_connector().connect(name, stream)).await?;
    Ok(Box::new(stream))
}

/// Connects (to a public address, or a host the operator allowed), secures and logs in.
pub async fn connect(
    config: &MailboxConfig,
    egress: &crate::egress::EgressPolicy,
) -> Result<Connection, ImapError> {
    egress
        .check_host(&config.host)
        .map_err(|m| mailbox_error("the host", m))?;
    let addresses = within(
        "resolving the host",
        egress.resolve(&config.host, config.port),
    )
    .await?;
    let tcp = within("connecting", TcpStream::connect(&addresses[..]))
        .await
        .map_err(|e| {
            tracing::info!(error = %e, host = %config.host, "imap connection failed");
            ImapError::Mailbox(format!(
                "imap: cannot connect to {}:{}",
                config.host, config.port
            ))
        })?;
    let _ = tcp.set_nodelay(true);
    let budget = Arc::new(AtomicUsize::new(ANSWER_SLACK));
    let stream: Box<dyn Io> = match config.security {
        Security::Tls => tls(tcp, &config.host).await?,
        Security::None => Box::new(tcp),
        Security::StartTls => {
            let mut plain = async_imap::Client::new(Metered {
                inner: tcp,
                budget: budget.clone(),
            });
            within("greeting", plain.read_response()).await?;
            within("STARTTLS", plain.run_command_and_check_ok("STARTTLS", None)).await?;
            tls(plain.into_inner().inner, &config.host).await?
        }
    };
    budget.store(ANSWER_SLACK, Ordering::Relaxed);
    let mut client = async_imap::Client::new(Metered {
        inner: stream,
        budget: budget.clone(),
    });
    if config.security != Security::StartTls {
        within("greeting", client.read_response()).await?;
    }
    budget.store(ANSWER_SLACK, Ordering::Relaxed);
    let login = tokio::time::timeout(
        COMMAND_TIMEOUT,
        client.login(&config.user, &config.password),
    )
    .await
    .map_err(|_| mailbox_error("login", "no answer in time"))?;
    let mut session = login.map_err(|(e, _)| {
        tracing::info!(error = %e, mailbox = ?config, "imap login refused");
        ImapError::Mailbox(format!(
            "imap: {} refused the user name or password of {}",
            config.host, config.user
        ))
    })?;
    budget.store(ANSWER_SLACK, Ordering::Relaxed);
    let caps = within("CAPABILITY", session.capabilities()).await?;
    if let Some(folder) = &config.processed_folder {
        // Made once; a server that has it already says NO, which is fine.
        budget.store(ANSWER_SLACK, Ordering::Relaxed);
        let _ = within("CREATE", session.create(folder)).await;
    }
    Ok(Connection {
        idle: caps.has_str("IDLE"),
        moves: caps.has_str("MOVE"),
        session,
        budget,
    })
}

/// What a round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Messages filed.
    pub fetched: usize,
    /// Messages left unread: too big, or not an email Rapport can read.
    pub skipped: usize,
    /// More unseen messages wait than one round reads.
    pub more: bool,
}

/// Reads the folder's unseen messages after the mark, each filed and the mark moved in one
/// transaction, then flagged `\Seen` or moved.
pub async fn read_new(
    state: &AppState,
    conn: &mut Connection,
    tenant: TenantId,
    holder: Uuid,
    config: &MailboxConfig,
    mark: MailboxMark,
) -> Result<(Round, Option<String>), ImapError> {
    conn.allow(ANSWER_SLACK);
    let folder = within("SELECT", conn.session.select(&config.folder)).await?;
    let validity = folder.uid_validity.map(i64::from);
    let source = config.source();
    let mut mark = if mark.source.as_deref() == Some(&source) && mark.uid_validity == validity {
        mark
    } else {
        // Another mailbox, or the server renumbered this one: start again from its unseen
        // messages (Message-IDs recognise any filed before).
        MailboxMark {
            source: Some(source),
            uid_validity: validity,
            last_uid: 0,
        }
    };
    conn.allow(ANSWER_SLACK);
    let found = within(
        "SEARCH",
        conn.session
            .uid_search(format!("UID {}:* UNSEEN", mark.last_uid + 1)),
    )
    .await?;
    let mut uids: Vec<u32> = found
        .into_iter()
        .filter(|u| i64::from(*u) > mark.last_uid)
        .collect();
    uids.sort_unstable();
    let mut round = Round {
        more: uids.len() > ROUND_MESSAGES,
        ..Round::default()
    };
    uids.truncate(ROUND_MESSAGES);
    let mut problem = None;
    let opts = state.send_options().await?;
    for uid in uids {
        conn.allow(ANSWER_SLACK);
        let sizes: Vec<async_imap::types::Fetch> = within("FETCH", async {
            conn.session
                .uid_fetch(uid.to_string(), "(UID RFC822.SIZE)")
                .await?
                .try_collect()
                .await
        })
        .await?;
        let size = sizes.iter().find_map(|f| f.size).unwrap_or(0) as usize;
        let raw = if size > MAX_EMAIL_BYTES {
            None
        } else {
            conn.allow(size + ANSWER_SLACK);
            let fetched: Vec<async_imap::types::Fetch> = within("FETCH", async {
                conn.session
                    .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
            fetched.iter().find_map(|f| f.body().map(<[u8]>::to_vec))
        };
        mark.last_uid = i64::from(uid);
        let parsed = match &raw {
            None => Err(format!(
                "message UID {uid} ({size} bytes) is over the {MAX_EMAIL_BYTES} bytes an email \
                 may be: left unread"
            )),
            Some(raw) => super::email::parse(raw, state.config.attachment_max_bytes)
                .map_err(|e| format!("message UID {uid}: {e}: left unread")),
        };
        let filed = match &parsed {
            Ok(message) => file(state, tenant, holder, &mark, Some(message), &opts).await,
            Err(_) => Err(ImapError::Mailbox(String::new())),
        };
        match (filed, parsed) {
            (Ok(()), _) => {
                round.fetched += 1;
                conn.allow(ANSWER_SLACK);
                done_with(conn, uid, config).await?;
            }
            (Err(ImapError::Store(StoreError::Invalid(e))), _) => {
                problem = Some(format!("message UID {uid}: {e}: left unread"));
                file(state, tenant, holder, &mark, None, &opts).await?;
                round.skipped += 1;
            }
            (Err(_), Err(reason)) => {
                problem = Some(reason);
                file(state, tenant, holder, &mark, None, &opts).await?;
                round.skipped += 1;
            }
            (Err(e), Ok(_)) => return Err(e),
        }
    }
    Ok((round, problem))
}

/// Files one message (None: skips it) and moves the mark past it, in one transaction.
async fn file(
    state: &AppState,
    tenant: TenantId,
    holder: Uuid,
    mark: &MailboxMark,
    message: Option<&super::model::Inbound>,
    opts: &crate::messages::store::SendOptions,
) -> Result<(), ImapError> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let ctx = crate::tenants::store::context(&mut tx, tenant)
        .await?
        .ok_or(ImapError::Gone)?;
    if let Some(m) = message {
        receive::receive(&mut tx, &ctx, m, opts).await?;
    }
    if !store::advance_mailbox(&mut tx, tenant, holder, mark, message.is_none()).await? {
        return Err(ImapError::LeaseLost);
    }
    tx.commit().await?;
    Ok(())
}

/// After its commit: the message leaves the unseen ones (moved, or flagged `\Seen`).
async fn done_with(
    conn: &mut Connection,
    uid: u32,
    config: &MailboxConfig,
) -> Result<(), ImapError> {
    let set = uid.to_string();
    match &config.processed_folder {
        Some(folder) if conn.moves => {
            within("MOVE", conn.session.uid_mv(&set, folder)).await?;
        }
        Some(folder) => {
            within("COPY", conn.session.uid_copy(&set, folder)).await?;
            flag_seen(conn, &set).await?;
        }
        None => flag_seen(conn, &set).await?,
    }
    Ok(())
}

async fn flag_seen(conn: &mut Connection, set: &str) -> Result<(), ImapError> {
    within("STORE", async {
        conn.session
            .uid_store(set, "+FLAGS.SILENT (\\Seen)")
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
    .await?;
    Ok(())
}

/// The tenant's mailbox as configured now; None when it names none.
async fn configured(
    state: &AppState,
    tenant: TenantId,
) -> Result<Option<MailboxConfig>, ImapError> {
    let mut conn = state.pool.acquire().await?;
    match settings::resolve(&mut conn, &state.secrets, tenant, Channel::Email).await {
        Ok(Some(resolved)) => Ok(MailboxConfig::from_channel(&resolved)),
        Ok(None) => Ok(None),
        Err(settings::ResolveError::Database(e)) => Err(e.into()),
        Err(e) => Err(ImapError::Mailbox(format!(
            "the email channel's secrets cannot be opened: {e}"
        ))),
    }
}

fn poll_every(state: &AppState) -> Duration {
    Duration::from_secs(state.config.imap_poll_secs.max(1))
}

fn lease_secs(state: &AppState) -> i64 {
    i64::try_from(state.config.imap_poll_secs.max(1) * 3 + 30).unwrap_or(i64::MAX)
}

/// One round on a tenant's mailbox, start to end (connect, read, log out), under its own
/// lease: for `rapport` commands and tests. None when another worker holds the mailbox.
pub async fn poll_once(state: &AppState, tenant: TenantId) -> Result<Option<Round>, ImapError> {
    let holder = Uuid::now_v7();
    let Some(mark) = store::claim_mailbox(&state.pool, tenant, holder, lease_secs(state)).await?
    else {
        return Ok(None);
    };
    let result = async {
        let config = configured(state, tenant).await?.ok_or(ImapError::Gone)?;
        let mut conn = connect(&config, &state.egress).await?;
        let outcome = read_new(state, &mut conn, tenant, holder, &config, mark).await;
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, conn.session.logout()).await;
        outcome
    }
    .await;
    let error = match &result {
        Ok((_, problem)) => problem.clone(),
        Err(e) => Some(e.to_string()),
    };
    store::mailbox_polled(&state.pool, tenant, holder, error.as_deref()).await?;
    store::release_mailbox(&state.pool, tenant, holder).await?;
    result.map(|(round, _)| Some(round))
}

/// Watches one tenant's mailbox while this process holds its lease: a round, then IDLE until
/// the server says mail came (or `imap_poll_secs` pass), or a sleep where the server has no
/// IDLE. Reconnects when the settings change or the connection fails.
async fn watch(state: AppState, tenant: TenantId, holder: Uuid, stop: CancellationToken) {
    let every = poll_every(&state);
    let mut open: Option<(Connection, MailboxConfig)> = None;
    loop {
        let mark = match store::claim_mailbox(&state.pool, tenant, holder, lease_secs(&state)).await
        {
            Ok(Some(mark)) => mark,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "imap: cannot renew the mailbox lease");
                if pause(&stop, every).await {
                    break;
                }
                continue;
            }
        };
        let outcome: Result<Round, ImapError> = async {
            let config = configured(&state, tenant).await?.ok_or(ImapError::Gone)?;
            if open.as_ref().is_none_or(|(_, c)| *c != config) {
                open = None;
                open = Some((connect(&config, &state.egress).await?, config.clone()));
            }
            let (conn, config) = open.as_mut().ok_or(ImapError::Gone)?;
            let (round, problem) = read_new(&state, conn, tenant, holder, config, mark).await?;
            store::mailbox_polled(&state.pool, tenant, holder, problem.as_deref()).await?;
            Ok(round)
        }
        .await;
        let wait_for_mail = match outcome {
            Ok(round) if round.more => continue,
            Ok(_) => true,
            Err(ImapError::Gone | ImapError::LeaseLost) => break,
            Err(e) => {
                tracing::info!(%tenant, error = %e, "imap round failed");
                open = None;
                if let Err(e) =
                    store::mailbox_polled(&state.pool, tenant, holder, Some(&e.to_string())).await
                {
                    tracing::warn!(%tenant, error = %e, "imap: cannot record the round");
                }
                false
            }
        };
        if stop.is_cancelled() {
            break;
        }
        match open.take() {
            Some((conn, config)) if wait_for_mail && conn.idle => {
                match idle(conn, every, &stop).await {
                    Ok(conn) => open = Some((conn, config)),
                    Err(e) => tracing::info!(%tenant, error = %e, "imap IDLE failed"),
                }
                if stop.is_cancelled() {
                    break;
                }
            }
            kept => {
                open = kept;
                if pause(&stop, every).await {
                    break;
                }
            }
        }
    }
    if let Some((mut conn, _)) = open {
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, conn.session.logout()).await;
    }
    if let Err(e) = store::release_mailbox(&state.pool, tenant, holder).await {
        tracing::warn!(%tenant, error = %e, "imap: cannot release the mailbox lease");
    }
}

/// Sleeps `every` or until `stop`; whether it was stopped.
async fn pause(stop: &CancellationToken, every: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(every) => false,
    }
}

/// IDLE until the server reports a change, `every` passes or `stop`.
async fn idle(
    conn: Connection,
    every: Duration,
    stop: &CancellationToken,
) -> Result<Connection, ImapError> {
    let Connection {
        session,
        budget,
        idle: can_idle,
        moves,
    } = conn;
    budget.store(ANSWER_SLACK, Ordering::Relaxed);
    let mut handle = session.idle();
    within("IDLE", handle.init()).await?;
    {
        // The handle's own timeout restarts at every keep-alive the server sends: the outer
        // one ends the wait on time whatever the server does, so the lease is renewed.
        let (wait, _interrupt) = handle.wait_with_timeout(every);
        tokio::select! {
            r = tokio::time::timeout(every, wait) => {
                if let Ok(r) = r {
                    r.map_err(|e| mailbox_error("IDLE", e))?;
                }
            }
            () = stop.cancelled() => {}
        }
    }
    budget.store(ANSWER_SLACK, Ordering::Relaxed);
    let session = within("DONE", handle.done()).await?;
    // What the server announced while idle (EXISTS, EXPUNGE) is read afresh by the next round.
    while session.unsolicited_responses.try_recv().is_ok() {}
    Ok(Connection {
        session,
        budget,
        idle: can_idle,
        moves,
    })
}

/// Reads every configured mailbox this process can get the lease of, until `shutdown`: looks
/// for mailboxes every `imap_poll_secs`, one task per mailbox.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let holder = Uuid::now_v7();
    let every = poll_every(&state);
    let mut watching: std::collections::HashMap<TenantId, tokio::task::JoinHandle<()>> =
        std::collections::HashMap::new();
    loop {
        watching.retain(|_, task| !task.is_finished());
        match store::configured_mailboxes(&state.pool).await {
            Ok(tenants) => {
                for tenant in tenants {
                    if watching.contains_key(&tenant) {
                        continue;
                    }
                    // A lease held by another live worker: its mailbox, not ours.
                    match store::claim_mailbox(&state.pool, tenant, holder, lease_secs(&state))
                        .await
                    {
                        Ok(Some(_)) => {
                            let task = tokio::spawn(watch(
                                state.clone(),
                                tenant,
                                holder,
                                shutdown.child_token(),
                            ));
                            watching.insert(tenant, task);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(%tenant, error = %e, "imap: cannot claim a mailbox")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "imap: cannot list the mailboxes"),
        }
        if pause(&shutdown, every).await {
            break;
        }
    }
    for (_, task) in watching {
        let _ = task.await;
    }
}
