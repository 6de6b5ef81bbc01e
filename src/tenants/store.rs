//! SQL for tenants and API keys.

use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{ApiKey, CreatedApiKey, Tenant, ValidTenant};
use crate::domain::{Brand, TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};

/// Creates a tenant; a taken slug is a 409.
pub async fn create(conn: &mut PgConnection, new: &ValidTenant) -> StoreResult<Tenant> {
    sqlx::query_as!(
        Tenant,
        "INSERT INTO tenants (id, name, slug, default_country, default_locale, timezone)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, name, slug, default_country, default_locale, timezone, created_at,
                   updated_at",
        Uuid::now_v7(),
        new.name,
        new.slug,
        new.default_country,
        new.default_locale,
        new.timezone,
    )
    .fetch_one(conn)
    .await
    .map_err(|e| {
        if crate::db::is_unique_violation(&e, Some("tenants_slug_key")) {
            StoreError::Conflict(format!("a tenant with slug `{}` already exists", new.slug))
        } else {
            e.into()
        }
    })
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<Tenant>> {
    Ok(sqlx::query_as!(
        Tenant,
        "SELECT id, name, slug, default_country, default_locale, timezone, created_at, updated_at
         FROM tenants WHERE id = $1",
        id
    )
    .fetch_optional(conn)
    .await?)
}

/// The name and logo the tenant's public pages show.
pub async fn brand(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<Option<Brand>> {
    Ok(sqlx::query_as!(
        Brand,
        r#"SELECT name, settings->>'logo_url' AS "logo_url?" FROM tenants WHERE id = $1"#,
        tenant.0
    )
    .fetch_optional(conn)
    .await?)
}

/// A tenant by id or by slug, for the command line.
pub async fn find(conn: &mut PgConnection, id_or_slug: &str) -> StoreResult<Option<Tenant>> {
    match Uuid::parse_str(id_or_slug) {
        Ok(id) => get(conn, id).await,
        Err(_) => Ok(sqlx::query_as!(
            Tenant,
            "SELECT id, name, slug, default_country, default_locale, timezone, created_at,
                        updated_at
                 FROM tenants WHERE slug = $1",
            id_or_slug
        )
        .fetch_optional(conn)
        .await?),
    }
}

/// Tenants newest first, after `before` (a cursor id).
pub async fn list(
    conn: &mut PgConnection,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Tenant>> {
    Ok(sqlx::query_as!(
        Tenant,
        "SELECT id, name, slug, default_country, default_locale, timezone, created_at, updated_at
         FROM tenants WHERE ($1::uuid IS NULL OR id < $1)
         ORDER BY id DESC LIMIT $2",
        before,
        limit + 1
    )
    .fetch_all(conn)
    .await?)
}

/// Creates an API key; only its hash is stored.
pub async fn create_key(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &str,
) -> StoreResult<CreatedApiKey> {
    let key = super::model::generate_api_key();
    let prefix: String = key
        .chars()
        .take(super::model::KEY_PREFIX.len() + 6)
        .collect();
    let id = Uuid::now_v7();
    let created_at = sqlx::query_scalar!(
        "INSERT INTO api_keys (tenant_id, id, name, key_hash, key_prefix)
         VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
        tenant.0,
        id,
        name,
        &super::model::hash_api_key(&key)[..],
        prefix,
    )
    .fetch_one(conn)
    .await?;
    Ok(CreatedApiKey {
        id,
        tenant_id: tenant.0,
        name: name.to_owned(),
        key,
        prefix,
        created_at,
    })
}

pub async fn list_keys(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<Vec<ApiKey>> {
    Ok(sqlx::query_as!(
        ApiKey,
        "SELECT id, tenant_id, name, key_prefix AS prefix, created_at, revoked_at
         FROM api_keys WHERE tenant_id = $1 ORDER BY id DESC",
        tenant.0
    )
    .fetch_all(conn)
    .await?)
}

/// Revokes a key at once; false when the tenant has no such key.
pub async fn revoke_key(
    conn: &mut PgConnection,
    tenant: TenantId,
    key_id: Uuid,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
         WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        key_id
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The tenant owning a live key with this hash.
pub async fn authenticate(
    conn: &mut PgConnection,
    key_hash: &[u8],
) -> Result<Option<TenantContext>, sqlx::Error> {
    sqlx::query_as!(
        TenantContext,
        r#"SELECT k.tenant_id AS "id: TenantId", k.id AS key_id, t.default_country,
                  t.default_locale, t.timezone
           FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
           WHERE k.key_hash = $1 AND k.revoked_at IS NULL"#,
        key_hash
    )
    .fetch_optional(conn)
    .await
}

/// The request context of a tenant named in a path (webhooks, which carry no API key).
pub async fn context(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<Option<TenantContext>, sqlx::Error> {
    sqlx::query_as!(
        TenantContext,
        r#"SELECT id AS "id: TenantId", '00000000-0000-0000-0000-000000000000'::uuid AS "key_id!",
                  default_country, default_locale, timezone
           FROM tenants WHERE id = $1"#,
        tenant.0
    )
    .fetch_optional(conn)
    .await
}
