//! Tenant settings of the support desk: SLA targets per priority and the CSAT alert threshold.
//! `GET/PUT /v1/settings`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::store as events;
use crate::http::extract::ValidJson;
use crate::support::model::OPEN_TICKET_STATUSES;
use crate::tenancy::{Tenant, TenantId};
use crate::validate::{Errors, Invalid};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_settings, put_settings))
}

/// Targets of one priority, in minutes from the ticket's creation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlaTarget {
    pub first_response_mins: Option<u32>,
    pub resolution_mins: Option<u32>,
}

/// A tenant's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// A score at or below this (1-5) alerts the agent; default 2.
    pub csat_alert_threshold: Option<i16>,
    /// SLA targets by priority (`low`, `normal`, `high`, `urgent`).
    #[schema(value_type = Object, example = json!({"urgent": {"first_response_mins": 15, "resolution_mins": 240}}))]
    #[serde(default)]
    pub sla: BTreeMap<String, SlaTarget>,
}

impl TenantSettings {
    fn validate(&self) -> Result<(), Invalid> {
        let mut errors = Errors::new();
        if let Some(t) = self.csat_alert_threshold {
            if !(1..=5).contains(&t) {
                errors.add("csat_alert_threshold", "must be 1 to 5");
            }
        }
        for (priority, target) in &self.sla {
            if !matches!(priority.as_str(), "low" | "normal" | "high" | "urgent") {
                errors.add(
                    format!("sla.{priority}"),
                    "priorities are low, normal, high and urgent",
                );
            }
            for (name, v) in [
                ("first_response_mins", target.first_response_mins),
                ("resolution_mins", target.resolution_mins),
            ] {
                if v.is_some_and(|m| m == 0 || m > 525_600) {
                    errors.add(
                        format!("sla.{priority}.{name}"),
                        "must be 1 to 525600 minutes",
                    );
                }
            }
        }
        errors.finish()
    }
}

async fn load(conn: &mut PgConnection, tenant: TenantId) -> ApiResult<TenantSettings> {
    let raw: serde_json::Value = sqlx::query_scalar("SELECT settings FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(conn)
        .await?;
    Ok(serde_json::from_value(raw).unwrap_or_default())
}

/// The tenant's settings.
#[utoipa::path(get, path = "/v1/settings", tag = "support", security(("api_key" = [])),
    responses((status = 200, body = TenantSettings)))]
async fn get_settings(
    tenant: Tenant,
    State(state): State<AppState>,
) -> ApiResult<Json<TenantSettings>> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(load(&mut conn, tenant.id).await?))
}

/// Replace the tenant's settings.
#[utoipa::path(put, path = "/v1/settings", tag = "support", security(("api_key" = [])),
    request_body = TenantSettings,
    responses((status = 200, body = TenantSettings), (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn put_settings(
    tenant: Tenant,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<TenantSettings>,
) -> ApiResult<Json<TenantSettings>> {
    body.validate()?;
    let value = serde_json::to_value(&body).map_err(|e| ApiError::Internal(e.into()))?;
    sqlx::query("UPDATE tenants SET settings = $2, updated_at = now() WHERE id = $1")
        .bind(tenant.id)
        .bind(value)
        .execute(&state.pool)
        .await?;
    Ok(Json(body))
}

/// tenant, ticket, contact, number, priority, assignee, target minutes.
type Breach = (
    TenantId,
    uuid::Uuid,
    uuid::Uuid,
    i64,
    String,
    Option<uuid::Uuid>,
    i32,
);

/// Stamps SLA breaches of open tickets (each kind once per ticket, so several workers cannot
/// report one twice) and emits `ticket.sla_breached`. The number of breaches found.
pub async fn check_sla(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut found = 0;
    for (kind, stamp, done, target) in [
        (
            "first_response",
            "first_response_breached_at",
            "first_response_at",
            "first_response_mins",
        ),
        (
            "resolution",
            "resolution_breached_at",
            "solved_at",
            "resolution_mins",
        ),
    ] {
        let sql = format!(
            "UPDATE tickets tk SET {stamp} = now()
             FROM tenants tn
             WHERE tn.id = tk.tenant_id AND tk.status IN {OPEN_TICKET_STATUSES}
               AND tk.{stamp} IS NULL AND tk.{done} IS NULL
               AND (tn.settings->'sla'->tk.priority->>'{target}') IS NOT NULL
               AND tk.created_at + make_interval(mins => (tn.settings->'sla'->tk.priority->>'{target}')::int) < now()
             RETURNING tk.tenant_id, tk.id, tk.contact_id, tk.number, tk.priority, tk.assignee_id,
                       (tn.settings->'sla'->tk.priority->>'{target}')::int"
        );
        let rows: Vec<Breach> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?;
        for (tenant, id, contact, number, priority, agent, mins) in rows {
            events::emit_about(
                &mut tx,
                tenant,
                contact,
                "ticket.sla_breached",
                json!({"ticket_id": id, "number": number, "kind": kind, "priority": priority,
                       "target_mins": mins, "agent_id": agent}),
                Some(("ticket", id)),
            )
            .await?;
            found += 1;
        }
    }
    tx.commit().await?;
    Ok(found)
}
