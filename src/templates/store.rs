//! SQL for templates.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::defaults;
use super::model::{Template, TemplateSource, Variants};
use crate::domain::Purpose;
use crate::domain::TenantId;
use crate::error::{StoreError, StoreResult};

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
    let template = resolve(key, Some(into_template(row)))
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("a saved template resolves")))?;
    Ok((template, created))
}

fn into_template(row: TemplateRow) -> Template {
    Template {
        purpose: row.purpose,
        source: TemplateSource::Tenant,
        key: row.key,
        variants: row.variants.0,
        created_at: Some(row.created_at),
        updated_at: Some(row.updated_at),
    }
}

/// The template in use for `key`: the tenant's own (`own`) over the built-in default, either
/// alone, or none.
fn resolve(key: &str, own: Option<Template>) -> Option<Template> {
    match (own, defaults::get(key)) {
        (None, None) => None,
        (Some(t), None) => Some(t),
        (None, Some(d)) => Some(Template {
            key: key.to_owned(),
            purpose: d.purpose,
            source: TemplateSource::Default,
            variants: d.variants.clone(),
            created_at: None,
            updated_at: None,
        }),
        (Some(t), Some(d)) => Some(Template {
            source: TemplateSource::Customised,
            variants: d.variants.overlaid(&t.variants),
            ..t
        }),
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
    Ok(resolve(key, row.map(into_template)))
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
    // The tenant's first `limit + 1` after the cursor and every default after it, merged by
    // key: a tenant's template not fetched sorts after all of these, so the first `limit + 1`
    // of the merge are the page (and whether there is another).
    let mut own: std::collections::BTreeMap<String, Template> = rows
        .into_iter()
        .map(|r| (r.key.clone(), into_template(r)))
        .collect();
    let mut keys: Vec<String> = own.keys().cloned().collect();
    keys.extend(
        defaults::keys()
            .filter(|k| after.is_none_or(|a| *k > a))
            .map(str::to_owned),
    );
    keys.sort();
    keys.dedup();
    keys.truncate(usize::try_from(limit + 1).unwrap_or(usize::MAX));
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let mine = own.remove(&k);
            resolve(&k, mine)
        })
        .collect())
}
