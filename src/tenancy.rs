//! Who is calling: the tenant behind an API key, or an operator with the admin token.
//!
//! The `require_tenant` and `require_admin` middlewares authenticate once per request and put
//! the result in the request's extensions; the [`TenantContext`] extractor is the only way a
//! handler gets a [`TenantId`](crate::domain::TenantId).

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::domain::{Operator, TenantContext};
use crate::error::ApiError;
use crate::tenants::model::{KEY_PREFIX, hash_api_key};

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn is_admin_token(state: &AppState, token: &str) -> bool {
    state
        .config
        .admin_token()
        .is_some_and(|admin| bool::from(admin.as_bytes().ct_eq(token.as_bytes())))
}

async fn tenant_for_key(state: &AppState, token: &str) -> Result<Option<TenantContext>, ApiError> {
    if !token.starts_with(KEY_PREFIX) {
        return Ok(None);
    }
    let hash = hash_api_key(token);
    let keys = &state.api_keys;
    if let Some(tenant) = keys.get(&hash) {
        return Ok(Some(tenant));
    }
    let generation = keys.generation();
    let mut conn = state.pool.acquire().await?;
    let tenant = crate::tenants::store::authenticate(&mut conn, &hash).await?;
    if let Some(t) = &tenant {
        keys.put(hash, t.clone(), generation);
    }
    Ok(tenant)
}

/// Channel on which the database announces changes to keys and tenants (see the
/// `auth_notify` migration).
const AUTH_CHANNEL: &str = "rapport_auth";
/// Most keys a process remembers; the cache starts afresh past that.
const MAX_CACHED_KEYS: usize = 10_000;

/// The tenant behind each API key seen lately, so that a request costs no look-up.
///
/// Entries are trusted only while this process listens on [`AUTH_CHANNEL`]: a trigger
/// notifies every process at the commit of any change to `api_keys` or to a tenant's defaults,
/// and the cache is emptied on each notification, so a revoked key stops working everywhere at
/// once. While the listening connection is down, nothing is cached and every request looks
/// its key up. Unknown keys are never cached.
pub struct KeyCache {
    /// Where the listener's connection comes from (the process's `listen_pool`).
    pool: sqlx::PgPool,
    /// Ends the invalidation listener (with the API).
    stop: tokio_util::sync::CancellationToken,
    state: std::sync::Mutex<KeyCacheState>,
    listener: std::sync::OnceLock<()>,
}

#[derive(Default)]
struct KeyCacheState {
    /// Whether the invalidation listener is connected.
    live: bool,
    /// Bumped by every invalidation, so a look-up that raced one is not cached.
    generation: u64,
    tenants: std::collections::HashMap<Vec<u8>, TenantContext>,
}

impl KeyCache {
    pub fn new(pool: sqlx::PgPool, stop: tokio_util::sync::CancellationToken) -> KeyCache {
        KeyCache {
            pool,
            stop,
            state: std::sync::Mutex::default(),
            listener: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyCacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached tenant of a key hash (None while the listener is down).
    pub fn get(&self, hash: &[u8]) -> Option<TenantContext> {
        let state = self.lock();
        if !state.live {
            return None;
        }
        state.tenants.get(hash).cloned()
    }

    /// The current generation, read before a look-up whose result is then [`KeyCache::put`].
    pub fn generation(self: &std::sync::Arc<Self>) -> u64 {
        self.listener
            .get_or_init(|| drop(tokio::spawn(listen(std::sync::Arc::downgrade(self)))));
        self.lock().generation
    }

    /// Remembers a key looked up at `generation`, unless an invalidation came since.
    pub fn put(&self, hash: Vec<u8>, tenant: TenantContext, generation: u64) {
        let mut state = self.lock();
        if !state.live || state.generation != generation {
            return;
        }
        if state.tenants.len() >= MAX_CACHED_KEYS {
            state.tenants.clear();
        }
        state.tenants.insert(hash, tenant);
    }

    /// Forgets every key (a key was revoked, or the listener lost track).
    pub fn invalidate(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.tenants.clear();
    }

    fn set_live(&self, live: bool) {
        let mut state = self.lock();
        state.live = live;
        state.generation += 1;
        state.tenants.clear();
    }
}

/// Keeps `cache` told of changes to keys and tenants until it is dropped, its pool closed or
/// its `stop` cancelled; from then on nothing is cached (no one would say it went stale).
async fn listen(cache: std::sync::Weak<KeyCache>) {
    listen_until_stopped(cache.clone()).await;
    if let Some(cache) = cache.upgrade() {
        cache.set_live(false);
    }
}

async fn listen_until_stopped(cache: std::sync::Weak<KeyCache>) {
    let Some((pool, stop)) = cache.upgrade().map(|c| (c.pool.clone(), c.stop.clone())) else {
        return;
    };
    let closed = pool.close_event();
    let closed = async move {
        tokio::select! {
            () = closed => {}
            () = stop.cancelled() => {}
        }
    };
    tokio::pin!(closed);
    loop {
        let connected = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(AUTH_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = &mut closed => return,
            r = connected => match r {
                Ok(l) => l,
                Err(_) if pool.is_closed() => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for API key changes; keys are looked up on every request");
                    tokio::select! {
                        () = &mut closed => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        match cache.upgrade() {
            Some(c) => c.set_live(true),
            None => return,
        }
        loop {
            let received = tokio::select! {
                () = &mut closed => return,
                r = tokio::time::timeout(std::time::Duration::from_secs(30), listener.try_recv()) => r,
            };
            let Some(cache) = cache.upgrade() else {
                return;
            };
            match received {
                // Quiet for a while: still wanted? (checked above)
                Err(_) => {}
                Ok(Ok(Some(_))) => cache.invalidate(),
                // The connection dropped: notifications may have been missed.
                Ok(Ok(None)) | Ok(Err(_)) => {
                    cache.set_live(false);
                    break;
                }
            }
        }
    }
}

/// Lets through requests carrying a live tenant API key; everything else is 401/403.
pub async fn require_tenant(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let Some(token) = bearer(&parts) else {
        return Err(ApiError::Unauthorized(
            "send your API key as `Authorization: Bearer rk_live_...`".to_owned(),
        ));
    };
    match tenant_for_key(&state, token).await? {
        Some(tenant) => {
            if let Err(wait) = state.rate_limits.check(tenant.id.0, state.clock.now()) {
                metrics::counter!("http_rate_limited_total").increment(1);
                return Err(ApiError::TooManyRequests {
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
            parts.extensions.insert(tenant);
            Ok(next.run(Request::from_parts(parts, body)).await)
        }
        None if is_admin_token(&state, token) => Err(ApiError::Forbidden(
            "the admin token cannot be used on tenant paths; use a tenant API key".to_owned(),
        )),
        None => Err(ApiError::Unauthorized(
            "the API key is unknown or has been revoked".to_owned(),
        )),
    }
}

/// Lets through requests carrying the admin token; the admin API is off while none is set.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    if state.config.admin_token().is_none() {
        return Err(ApiError::Forbidden(
            "the admin API is disabled: set RAPPORT_ADMIN_TOKEN (or admin_token in the \
             configuration file) and restart; the `rapport tenant` and `rapport api-key` \
             commands work without it"
                .to_owned(),
        ));
    }
    let Some(token) = bearer(&parts) else {
        return Err(ApiError::Unauthorized(
            "send the admin token as `Authorization: Bearer <token>`".to_owned(),
        ));
    };
    if is_admin_token(&state, token) {
        parts.extensions.insert(Operator);
        return Ok(next.run(Request::from_parts(parts, body)).await);
    }
    if tenant_for_key(&state, token).await?.is_some() {
        return Err(ApiError::Forbidden(
            "a tenant API key cannot be used on admin paths".to_owned(),
        ));
    }
    Err(ApiError::Unauthorized(
        "the admin token is wrong".to_owned(),
    ))
}

impl<S: Send + Sync> FromRequestParts<S> for TenantContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<TenantContext>()
            .cloned()
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!(
                    "TenantContext extractor used on a route without require_tenant"
                ))
            })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Operator>().copied().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "Operator extractor used on a route without require_admin"
            ))
        })
    }
}
