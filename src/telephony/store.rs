//! SQL for calls, telephony integrations and telephony webhook receipts. The call merge
//! (`calls.rs`) decides what a call becomes; this file only reads and writes rows.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{Call, CallDirection, CallRow};
use crate::domain::TenantId;
use crate::error::StoreResult;

/// A call as the API shows it (its status derived from the merge's stage), shared by the two
/// call reads: runtime SQL, as the query macros take literals only.
const CALL_COLUMNS: &str = "id, provider, provider_call_id, direction, external_number, contact_id,
    user_name, agent_id, CASE stage WHEN 3 THEN 'ended' WHEN 2 THEN 'answered' ELSE 'ringing' END AS status,
    missed, missed_reason, started_at, answered_at, ended_at, duration_secs, recording_url,
    voicemail_url, tags, comments, ticket_id, created_at, updated_at";

/// The call's row, created (stage 0) when new, locked until the transaction ends: concurrent
/// deliveries of one call are serialised, so no fact is emitted twice.
pub async fn lock_or_create(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider: &str,
    provider_call_id: &str,
) -> StoreResult<CallRow> {
    sqlx::query!(
        "INSERT INTO calls (tenant_id, id, provider, provider_call_id, stage) VALUES ($1, $2, $3, $4, 0)
         ON CONFLICT (tenant_id, provider, provider_call_id) DO NOTHING",
        tenant.0,
        Uuid::now_v7(),
        provider,
        provider_call_id,
    )
    .execute(&mut *conn)
    .await?;
    Ok(sqlx::query_as(
        "SELECT id, direction, external_number, contact_id, user_name, user_email, agent_id, stage, missed,
                missed_reason, started_at, answered_at, ended_at, duration_secs, recording_url, voicemail_url,
                tags, comments, ticket_id
         FROM calls WHERE tenant_id = $1 AND provider = $2 AND provider_call_id = $3 FOR UPDATE",
    )
    .bind(tenant)
    .bind(provider)
    .bind(provider_call_id)
    .fetch_one(&mut *conn)
    .await?)
}

/// Writes a merged call.
pub async fn save(conn: &mut PgConnection, tenant: TenantId, merged: &CallRow) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE calls SET direction = $3, external_number = $4, contact_id = $5, user_name = $6, user_email = $7,
            agent_id = $8, stage = $9, missed = $10, missed_reason = $11, started_at = $12, answered_at = $13,
            ended_at = $14, duration_secs = $15, recording_url = $16, voicemail_url = $17, tags = $18,
            comments = $19, updated_at = now()
         WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        merged.id,
        merged.direction as Option<CallDirection>,
        merged.external_number.as_deref(),
        merged.contact_id,
        merged.user_name.as_deref(),
        merged.user_email.as_deref(),
        merged.agent_id,
        merged.stage,
        merged.missed,
        merged.missed_reason.as_deref(),
        merged.started_at,
        merged.answered_at,
        merged.ended_at,
        merged.duration_secs,
        merged.recording_url.as_deref(),
        merged.voicemail_url.as_deref(),
        &merged.tags,
        &merged.comments,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Links a call to its call-back ticket.
pub async fn set_ticket(
    conn: &mut PgConnection,
    tenant: TenantId,
    call: Uuid,
    ticket: Uuid,
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE calls SET ticket_id = $3 WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        call,
        ticket,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A call (once a provider has said something about it).
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> StoreResult<Option<Call>> {
    let sql =
        format!("SELECT {CALL_COLUMNS} FROM calls WHERE tenant_id = $1 AND id = $2 AND stage > 0");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// Calls newest first, of one contact or all, before the id `before`, at most `limit`.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Option<Uuid>,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Call>> {
    let sql = format!(
        "SELECT {CALL_COLUMNS} FROM calls WHERE tenant_id = $1 AND stage > 0
           AND ($2::uuid IS NULL OR contact_id = $2) AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(contact)
        .bind(before)
        .bind(limit)
        .fetch_all(conn)
        .await?)
}

/// Erasure: the contact's calls keep their direction, agent, times and duration (for reports)
/// and lose the number, the recordings' links and the comments.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE calls SET external_number = NULL, recording_url = NULL, voicemail_url = NULL,
            comments = '[]', updated_at = now()
         WHERE tenant_id = $1 AND contact_id = $2",
        tenant.0,
        contact,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// An integration's row: settings, sealed secrets, the names of the secrets, last change.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IntegrationRow {
    pub settings: Value,
    pub secrets_sealed: Option<Vec<u8>>,
    pub secret_names: Vec<String>,
    pub updated_at: DateTime<Utc>,
}

/// The integration of this kind, if configured.
pub async fn integration(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: &str,
) -> StoreResult<Option<IntegrationRow>> {
    Ok(sqlx::query_as(
        "SELECT settings, secrets_sealed, secret_names, updated_at FROM integrations
         WHERE tenant_id = $1 AND kind = $2",
    )
    .bind(tenant)
    .bind(kind)
    .fetch_optional(conn)
    .await?)
}

/// Creates or replaces an integration's settings and sealed secrets; when it changed.
pub async fn put_integration(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: &str,
    settings: &serde_json::Map<String, Value>,
    sealed: &[u8],
    secret_names: &[String],
) -> StoreResult<DateTime<Utc>> {
    Ok(sqlx::query_scalar!(
        "INSERT INTO integrations (tenant_id, kind, settings, secrets_sealed, secret_names) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, kind) DO UPDATE SET settings = EXCLUDED.settings, secrets_sealed = EXCLUDED.secrets_sealed,
            secret_names = EXCLUDED.secret_names, updated_at = now()
         RETURNING updated_at",
        tenant.0,
        kind,
        Value::Object(settings.clone()),
        sealed,
        secret_names,
    )
    .fetch_one(conn)
    .await?)
}

/// Every sealed integration secret, locked for re-sealing: (tenant, kind, sealed).
pub async fn sealed_integrations_for_update(
    conn: &mut PgConnection,
) -> StoreResult<Vec<(TenantId, String, Vec<u8>)>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, kind, secrets_sealed FROM integrations
         WHERE secrets_sealed IS NOT NULL FOR UPDATE",
    )
    .fetch_all(conn)
    .await?)
}

/// Replaces an integration's sealed secrets (re-sealed with a new key).
pub async fn reseal_integration(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: &str,
    sealed: &[u8],
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE integrations SET secrets_sealed = $3 WHERE tenant_id = $1 AND kind = $2",
        tenant.0,
        kind,
        sealed,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a delivery of a telephony webhook; false when it was recorded before.
pub async fn first_receipt(
    conn: &mut PgConnection,
    tenant: TenantId,
    delivery_id: &str,
) -> StoreResult<bool> {
    Ok(sqlx::query!(
        "INSERT INTO webhook_receipts (tenant_id, source, delivery_id) VALUES ($1, 'telephony', $2)
         ON CONFLICT DO NOTHING",
        tenant.0,
        delivery_id,
    )
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Stores the provider-neutral intake's signing secret (sealed).
pub async fn put_intake_secret(
    conn: &mut PgConnection,
    tenant: TenantId,
    sealed: &[u8],
) -> StoreResult<()> {
    sqlx::query!(
        "INSERT INTO integrations (tenant_id, kind, settings, secrets_sealed, secret_names) VALUES ($1, 'telephony', '{}', $2, '{secret}')
         ON CONFLICT (tenant_id, kind) DO UPDATE SET secrets_sealed = EXCLUDED.secrets_sealed, updated_at = now()",
        tenant.0,
        sealed,
    )
    .execute(conn)
    .await?;
    Ok(())
}
