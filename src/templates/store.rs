//! SQL for templates.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::model::{Template, Variants};
use crate::domain::Purpose;
use crate::domain::TenantId;
use crate::error::StoreResult;

struct TemplateRow {
    key: String,
    purpose: Purpose,
    variants: Json<Variants>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    created: bool,
}

/// Creates or replaces a template; true when it was created.
pub async fn put(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
    purpose: Purpose,
    variants: &Variants,
) -> StoreResult<(Template, bool)> {
    let row = sqlx::query_as!(
        TemplateRow,
        r#"INSERT INTO templates (tenant_id, key, purpose, variants) VALUES ($1, $2, $3, $4)
           ON CONFLICT (tenant_id, key) DO UPDATE
              SET purpose = EXCLUDED.purpose, variants = EXCLUDED.variants, updated_at = now()
           RETURNING key, purpose AS "purpose: Purpose", variants AS "variants: Json<Variants>",
                     created_at, updated_at, (xmax = 0) AS "created!""#,
        tenant.0,
        key,
        purpose.as_str(),
        Json(variants) as _,
    )
    .fetch_one(conn)
    .await?;
    let created = row.created;
    Ok((into_template(row), created))
}

fn into_template(row: TemplateRow) -> Template {
    Template {
        purpose: row.purpose,
        key: row.key,
        variants: row.variants.0,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
) -> StoreResult<Option<Template>> {
    let row = sqlx::query_as!(
        TemplateRow,
        r#"SELECT key, purpose AS "purpose: Purpose", variants AS "variants: Json<Variants>",
                  created_at, updated_at, false AS "created!"
           FROM templates WHERE tenant_id = $1 AND key = $2"#,
        tenant.0,
        key
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(into_template))
}

/// Templates by key, after `after`.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&str>,
    limit: i64,
) -> StoreResult<Vec<Template>> {
    let rows = sqlx::query_as!(
        TemplateRow,
        r#"SELECT key, purpose AS "purpose: Purpose", variants AS "variants: Json<Variants>",
                  created_at, updated_at, false AS "created!"
           FROM templates WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2)
           ORDER BY key LIMIT $3"#,
        tenant.0,
        after,
        limit + 1
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(into_template).collect())
}
