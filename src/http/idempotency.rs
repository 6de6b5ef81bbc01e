//! The `Idempotency-Key` header on creating POSTs, with Stripe's semantics.
//!
//! The first request with a key claims it (a row with a lease); its response is stored when it
//! succeeds and replayed, status and body, to every later request with the same key and the
//! same body. The same key with another body is a 422; a request arriving while the first still
//! runs is a 409 (so concurrent duplicates have exactly one effect). Error responses are not
//! stored: every write is transactional, so an error means nothing was written and the client
//! may retry with the same key. A claim whose process died is taken over once its lease ends.
//!
//! Handlers whose effect must never happen twice (a message queued, a ticket opened, which
//! send something to a customer) store their response with [`record_in`] inside the
//! transaction of the effect: if the process dies after that commit, a retry replays the
//! response instead of doing it again. Other handlers' responses are stored just after.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::AppState;
use crate::domain::TenantContext;
use crate::error::ApiError;

pub const HEADER: &str = "idempotency-key";
/// Set on replayed responses.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long a running request holds its key before another process may take it over.
const LEASE_SECS: f64 = 60.0;

/// The key a request claimed, for a handler that stores its response in its own transaction
/// ([`record_in`]).
#[derive(Debug, Clone)]
pub struct Claimed {
    scope: Uuid,
    key: String,
}

/// On a response whose handler stored it with [`record_in`], so the middleware does not again.
#[derive(Debug, Clone, Copy)]
pub struct Recorded(pub bool);

/// Stores `body` (as JSON, with `status`) as the response to the request's key, in the caller's
/// transaction, so that the effect and its response commit together. Without a key it does
/// nothing. The caller must answer with exactly this status and body, and [`Recorded`].
pub async fn record_in<T: serde::Serialize>(
    conn: &mut sqlx::PgConnection,
    claimed: Option<&Claimed>,
    status: axum::http::StatusCode,
    body: &T,
) -> Result<Recorded, ApiError> {
    let Some(claimed) = claimed else {
        return Ok(Recorded(false));
    };
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.into()))?;
    sqlx::query(
        "UPDATE idempotency_keys
         SET status = $3, content_type = 'application/json', response_body = $4, locked_until = NULL
         WHERE tenant_id = $1 AND key = $2",
    )
    .bind(claimed.scope)
    .bind(&claimed.key)
    .bind(i16::try_from(status.as_u16()).unwrap_or(200))
    .bind(bytes)
    .execute(conn)
    .await?;
    Ok(Recorded(true))
}

enum Claim {
    Fresh,
    Replay {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
    Mismatch,
    InProgress,
}

/// The request's `Idempotency-Key`, if it has one: 1 to 255 visible ASCII characters, else a
/// 400.
pub fn key_of(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(HEADER)
        .map(|raw| {
            raw.to_str()
                .ok()
                .filter(|k| (1..=255).contains(&k.len()))
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Idempotency-Key must be 1 to 255 visible ASCII characters".to_owned(),
                    )
                })
        })
        .transpose()
}

/// Middleware: applies to POST requests carrying the header; others pass straight through.
pub async fn idempotency(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if request.method() != Method::POST {
        return Ok(next.run(request).await);
    }
    let Some(key) = key_of(request.headers())? else {
        return Ok(next.run(request).await);
    };
    let scope = request
        .extensions()
        .get::<TenantContext>()
        .map(|t| t.id.0)
        .unwrap_or(Uuid::nil());
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge("the request body is larger than the server accepts".into())
        })?;
    let hash = request_hash(&parts.method, parts.uri.path(), &bytes);

    match claim(&state, scope, &key, &hash).await? {
        Claim::Fresh => {}
        Claim::Replay {
            status,
            content_type,
            body,
        } => return Ok(replay(status, content_type, body)),
        Claim::Mismatch => {
            return Err(ApiError::Unprocessable(format!(
                "Idempotency-Key `{key}` was already used with a different request body"
            )));
        }
        Claim::InProgress => {
            return Err(ApiError::Conflict(format!(
                "a request with Idempotency-Key `{key}` is still being processed; retry later"
            )));
        }
    }

    let mut parts = parts;
    parts.extensions.insert(Claimed {
        scope,
        key: key.clone(),
    });
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !response.status().is_success() {
        release(&state, scope, &key).await;
        return Ok(response);
    }
    if matches!(
        response.extensions().get::<Recorded>(),
        Some(Recorded(true))
    ) {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            release(&state, scope, &key).await;
            return Err(ApiError::Internal(anyhow::anyhow!(
                "cannot buffer response: {e}"
            )));
        }
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    store(
        &state,
        scope,
        &key,
        parts.status.as_u16(),
        content_type,
        &body,
    )
    .await;
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// What makes two requests "the same": method, path and body, the body as JSON when it is JSON
/// (so whitespace and the order of keys do not matter), else its bytes.
fn request_hash(method: &Method, path: &str, body: &Bytes) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => h.update(canonical(&json).as_bytes()),
        Err(_) => h.update(body),
    }
    h.finalize().to_vec()
}

/// JSON with object keys sorted and no insignificant whitespace.
fn canonical(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

type StoredRow = (Vec<u8>, Option<i16>, Option<String>, Option<Vec<u8>>, bool);

async fn claim(state: &AppState, scope: Uuid, key: &str, hash: &[u8]) -> Result<Claim, ApiError> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, key, request_hash, locked_until)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))
         ON CONFLICT (tenant_id, key) DO NOTHING",
    )
    .bind(scope)
    .bind(key)
    .bind(hash)
    .bind(LEASE_SECS)
    .execute(&state.pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claim::Fresh);
    }
    let row: Option<StoredRow> = sqlx::query_as(
        "SELECT request_hash, status, content_type, response_body,
                coalesce(locked_until < now(), false) AS expired
         FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(&state.pool)
    .await?;
    let Some((stored_hash, status, content_type, body, expired)) = row else {
        // Released between our insert and select: the first request failed; let the client retry.
        return Ok(Claim::InProgress);
    };
    if stored_hash != hash {
        return Ok(Claim::Mismatch);
    }
    if let Some(status) = status {
        return Ok(Claim::Replay {
            status: u16::try_from(status).unwrap_or(200),
            content_type,
            body: body.unwrap_or_default(),
        });
    }
    if expired {
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3)
             WHERE tenant_id = $1 AND key = $2 AND status IS NULL AND locked_until < now()",
        )
        .bind(scope)
        .bind(key)
        .bind(LEASE_SECS)
        .execute(&state.pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::Fresh);
        }
    }
    Ok(Claim::InProgress)
}

fn replay(status: u16, content_type: Option<String>, body: Vec<u8>) -> Response {
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK);
    let mut response = (status, body).into_response();
    if let Some(ct) = content_type.and_then(|ct| HeaderValue::from_str(&ct).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

async fn store(
    state: &AppState,
    scope: Uuid,
    key: &str,
    status: u16,
    content_type: Option<String>,
    body: &[u8],
) {
    let result = sqlx::query(
        "UPDATE idempotency_keys
         SET status = $3, content_type = $4, response_body = $5, locked_until = NULL
         WHERE tenant_id = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .bind(i16::try_from(status).unwrap_or(200))
    .bind(content_type)
    .bind(body)
    .execute(&state.pool)
    .await;
    if let Err(e) = result {
        tracing::error!(error = %crate::error::error_chain(&e), "cannot store idempotent response");
    }
}

async fn release(state: &AppState, scope: Uuid, key: &str) {
    let result = sqlx::query(
        "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND status IS NULL",
    )
    .bind(scope)
    .bind(key)
    .execute(&state.pool)
    .await;
    if let Err(e) = result {
        tracing::error!(error = %crate::error::error_chain(&e), "cannot release idempotency key");
    }
}

/// Deletes stored responses older than the retention; run by the worker.
pub async fn purge_expired(pool: &sqlx::PgPool, retention_hours: u32) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
    )
    .bind(i32::try_from(retention_hours).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Erasure: stored responses that name the contact (its id, or one of its addresses) are
/// forgotten at once rather than kept for the retention period. A retry with such a key is then
/// treated as a new request.
pub async fn forget_mentions(
    conn: &mut sqlx::PgConnection,
    tenant: crate::domain::TenantId,
    needles: &[String],
) -> Result<u64, sqlx::Error> {
    let needles: Vec<&str> = needles
        .iter()
        .map(String::as_str)
        .filter(|n| n.len() >= 3)
        .collect();
    if needles.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE tenant_id = $1 AND response_body IS NOT NULL
           AND EXISTS (SELECT 1 FROM unnest($2::text[]) n
                       WHERE position(convert_to(n, 'UTF8') IN response_body) > 0)",
    )
    .bind(tenant)
    .bind(&needles)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
