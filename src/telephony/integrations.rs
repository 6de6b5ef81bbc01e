//! Per-tenant telephony integrations: settings and secrets, sealed like channel secrets and
//! never returned. The API is `PUT/GET /v1/integrations/aircall` (`routes`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use super::model::{AircallConfig, Integration};
use super::store;
use crate::crypto::SecretBox;
use crate::domain::TenantId;
use crate::error::{StoreError, StoreResult};

/// What a sealed integration secret is bound to (moving it to another tenant or kind fails).
pub fn associated(tenant: TenantId, kind: &str) -> Vec<u8> {
    format!("{tenant}/integration/{kind}").into_bytes()
}

/// The integration of this kind with its secrets opened; None when not configured.
pub async fn load(
    conn: &mut PgConnection,
    secrets_box: &SecretBox,
    tenant: TenantId,
    kind: &str,
) -> StoreResult<Option<Integration>> {
    let Some(row) = store::integration(conn, tenant, kind).await? else {
        return Ok(None);
    };
    let (settings, sealed) = (row.settings, row.secrets_sealed);
    let secrets = match sealed {
        Some(bytes) => {
            // An operator's key problem, not the caller's: a clear 503 to retry once fixed.
            let unusable = |e: &dyn std::fmt::Display| {
                tracing::error!(%tenant, kind, error = %e, "an integration's secrets cannot be opened");
                StoreError::Unavailable(format!(
                    "the {kind} integration's secrets cannot be opened: {e}"
                ))
            };
            let plain = secrets_box
                .open(&bytes, &associated(tenant, kind))
                .map_err(|e| unusable(&e))?;
            serde_json::from_slice(&plain).map_err(|e| unusable(&e))?
        }
        None => BTreeMap::new(),
    };
    Ok(Some(Integration {
        settings: settings.as_object().cloned().unwrap_or_default(),
        secrets,
    }))
}

pub fn config(i: &Integration, updated_at: Option<DateTime<Utc>>) -> AircallConfig {
    AircallConfig {
        api_id: i
            .settings
            .get("api_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        api_base_url: i
            .settings
            .get("api_base_url")
            .and_then(Value::as_str)
            .unwrap_or("https://api.aircall.io")
            .to_owned(),
        secrets: i.secrets.keys().cloned().collect(),
        updated_at,
    }
}

/// Re-seals every tenant's integration secrets with the current key (`rapport secrets
/// rotate`); how many rows changed. Nothing is written if one row cannot be opened.
pub async fn reseal_all(conn: &mut PgConnection, secrets_box: &SecretBox) -> anyhow::Result<u64> {
    let rows = store::sealed_integrations_for_update(conn).await?;
    let mut changed = Vec::new();
    for (tenant, kind, sealed) in rows {
        if let Some(resealed) = secrets_box
            .reseal(&sealed, &associated(tenant, &kind))
            .map_err(|e| anyhow::anyhow!("integration {kind} of tenant {tenant}: {e}"))?
        {
            changed.push((tenant, kind, resealed));
        }
    }
    for (tenant, kind, resealed) in &changed {
        store::reseal_integration(conn, *tenant, kind, resealed).await?;
    }
    Ok(changed.len() as u64)
}
