//! Calls: the merge of provider updates, their timeline events, call-back tickets, and the API.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{TenantContext, TenantId};
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::store as events;
use crate::http::extract::{ApiPath, ApiQuery};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::support::model::open_ticket_statuses;
use crate::support::store as support;
use crate::validate;

/// A call.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Call {
    pub id: Uuid,
    pub provider: String,
    pub provider_call_id: String,
    pub direction: Option<String>,
    /// The customer's number, E.164 when it could be read.
    pub external_number: Option<String>,
    pub contact_id: Option<Uuid>,
    pub user_name: Option<String>,
    pub agent_id: Option<Uuid>,
    /// `ringing`, `answered` or `ended`.
    pub status: String,
    pub missed: bool,
    pub missed_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<i32>,
    pub recording_url: Option<String>,
    pub voicemail_url: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub tags: Value,
    #[schema(value_type = Vec<Object>)]
    pub comments: Value,
    /// The call-back ticket of a missed call.
    pub ticket_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const CALL_COLUMNS: &str = "id, provider, provider_call_id, direction, external_number, contact_id,
    user_name, agent_id, CASE stage WHEN 3 THEN 'ended' WHEN 2 THEN 'answered' ELSE 'ringing' END AS status,
    missed, missed_reason, started_at, answered_at, ended_at, duration_secs, recording_url,
    voicemail_url, tags, comments, ticket_id, created_at, updated_at";

/// What one provider event says about a call; absent facts are None.
#[derive(Debug, Clone, Default)]
pub struct CallUpdate {
    pub provider_call_id: String,
    pub inbound: Option<bool>,
    pub external_raw: Option<String>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    /// 1 ringing, 2 answered, 3 ended.
    pub stage: i16,
    pub started_at: Option<DateTime<Utc>>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<i32>,
    pub missed_reason: Option<String>,
    pub recording_url: Option<String>,
    pub voicemail_url: Option<String>,
    /// The whole list, when the event carries it.
    pub tags: Option<Value>,
    pub comments: Option<Value>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    id: Uuid,
    direction: Option<String>,
    external_number: Option<String>,
    contact_id: Option<Uuid>,
    user_name: Option<String>,
    user_email: Option<String>,
    agent_id: Option<Uuid>,
    stage: i16,
    missed: bool,
    missed_reason: Option<String>,
    started_at: Option<DateTime<Utc>>,
    answered_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    duration_secs: Option<i32>,
    recording_url: Option<String>,
    voicemail_url: Option<String>,
    tags: Value,
    comments: Value,
    ticket_id: Option<Uuid>,
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Merges an update into a call (created when new), emits the facts learned for the first time
/// and opens a call-back ticket for a missed inbound call of a known contact.
pub async fn apply(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    provider: &str,
    u: &CallUpdate,
) -> ApiResult<Call> {
    // The row exists (stage 0 when new) and is locked before it is read: concurrent deliveries
    // of one call are serialised, so no fact is emitted twice.
    sqlx::query(
        "INSERT INTO calls (tenant_id, id, provider, provider_call_id, stage) VALUES ($1, $2, $3, $4, 0)
         ON CONFLICT (tenant_id, provider, provider_call_id) DO NOTHING",
    )
    .bind(tenant.id)
    .bind(Uuid::now_v7())
    .bind(provider)
    .bind(&u.provider_call_id)
    .execute(&mut *conn)
    .await?;
    let prev: Row = sqlx::query_as(
        "SELECT id, direction, external_number, contact_id, user_name, user_email, agent_id, stage, missed,
                missed_reason, started_at, answered_at, ended_at, duration_secs, recording_url, voicemail_url,
                tags, comments, ticket_id
         FROM calls WHERE tenant_id = $1 AND provider = $2 AND provider_call_id = $3 FOR UPDATE",
    )
    .bind(tenant.id)
    .bind(provider)
    .bind(&u.provider_call_id)
    .fetch_one(&mut *conn)
    .await?;

    let external = prev.external_number.clone().or_else(|| {
        u.external_raw.as_deref().map(|raw| {
            validate::phone(raw, Some(&tenant.default_country)).unwrap_or_else(|_| raw.to_owned())
        })
    });
    let contact_id =
        match (prev.contact_id, &external) {
            (Some(c), _) => Some(c),
            (None, Some(number)) if number.starts_with('+') => sqlx::query_scalar(
                "SELECT id FROM contacts WHERE tenant_id = $1 AND phone = $2 AND erased_at IS NULL
                 ORDER BY updated_at DESC LIMIT 1",
            )
            .bind(tenant.id)
            .bind(number)
            .fetch_optional(&mut *conn)
            .await?,
            _ => None,
        };
    let user_email = u.user_email.clone().or(prev.user_email.clone());
    let agent_id = match (&user_email, prev.agent_id) {
        (_, Some(a)) if u.user_email.is_none() => Some(a),
        (Some(email), _) => sqlx::query_scalar(
            "SELECT id FROM agents WHERE tenant_id = $1 AND lower(email) = lower($2)",
        )
        .bind(tenant.id)
        .bind(email)
        .fetch_optional(&mut *conn)
        .await?
        .or(prev.agent_id),
        (None, a) => a,
    };
    let direction = prev.direction.clone().or(u
        .inbound
        .map(|i| if i { "inbound" } else { "outbound" }.to_owned()));
    let answered_at = prev.answered_at.or(u.answered_at);
    let stage = prev
        .stage
        .max(u.stage)
        .max(if answered_at.is_some() { 2 } else { 1 });
    let ended_at = prev.ended_at.or(u.ended_at);
    let voicemail_url = u.voicemail_url.clone().or(prev.voicemail_url.clone());
    let missed_reason = prev.missed_reason.clone().or(u.missed_reason.clone());
    let inbound = direction.as_deref() == Some("inbound");
    let missed = prev.missed
        || (stage == 3 && inbound && answered_at.is_none())
        || (inbound
            && (missed_reason.is_some() || voicemail_url.is_some())
            && answered_at.is_none());
    let merged = Row {
        id: prev.id,
        direction,
        external_number: external,
        contact_id,
        user_name: u.user_name.clone().or(prev.user_name.clone()),
        user_email,
        agent_id,
        stage,
        missed,
        missed_reason: if missed && missed_reason.is_none() && voicemail_url.is_some() {
            Some("voicemail".to_owned())
        } else {
            missed_reason
        },
        started_at: earliest(prev.started_at, u.started_at),
        answered_at,
        ended_at,
        duration_secs: prev.duration_secs.max(u.duration_secs),
        recording_url: u.recording_url.clone().or(prev.recording_url.clone()),
        voicemail_url,
        tags: u.tags.clone().unwrap_or(prev.tags.clone()),
        comments: u.comments.clone().unwrap_or(prev.comments.clone()),
        ticket_id: prev.ticket_id,
    };
    sqlx::query(
        "UPDATE calls SET direction = $3, external_number = $4, contact_id = $5, user_name = $6, user_email = $7,
            agent_id = $8, stage = $9, missed = $10, missed_reason = $11, started_at = $12, answered_at = $13,
            ended_at = $14, duration_secs = $15, recording_url = $16, voicemail_url = $17, tags = $18,
            comments = $19, updated_at = now()
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant.id)
    .bind(merged.id)
    .bind(&merged.direction)
    .bind(&merged.external_number)
    .bind(merged.contact_id)
    .bind(&merged.user_name)
    .bind(&merged.user_email)
    .bind(merged.agent_id)
    .bind(merged.stage)
    .bind(merged.missed)
    .bind(&merged.missed_reason)
    .bind(merged.started_at)
    .bind(merged.answered_at)
    .bind(merged.ended_at)
    .bind(merged.duration_secs)
    .bind(&merged.recording_url)
    .bind(&merged.voicemail_url)
    .bind(&merged.tags)
    .bind(&merged.comments)
    .execute(&mut *conn)
    .await?;

    if let Some(contact) = merged.contact_id {
        emit_new_facts(conn, tenant.id, contact, &prev, &merged).await?;
        if merged.missed && inbound && merged.ticket_id.is_none() {
            open_callback_ticket(conn, tenant, contact, &merged).await?;
        }
    }
    get(conn, tenant.id, merged.id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("call vanished")))
}

async fn emit_new_facts(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    prev: &Row,
    now: &Row,
) -> ApiResult<()> {
    let base = json!({"call_id": now.id, "direction": now.direction, "number": now.external_number,
                      "agent_id": now.agent_id, "user_name": now.user_name});
    let with = |extra: Value| {
        let mut v = base.clone();
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };
    let fallback = now
        .started_at
        .or(now.answered_at)
        .or(now.ended_at)
        .unwrap_or_else(Utc::now);
    let mut facts: Vec<(&str, DateTime<Utc>, Value)> = Vec::new();
    // A contact matched only now (its number came later) gets the whole story at once.
    let newly_matched = prev.contact_id.is_none();
    if prev.stage == 0 || newly_matched {
        facts.push((
            "call.started",
            now.started_at.unwrap_or(fallback),
            base.clone(),
        ));
    }
    if now.answered_at.is_some() && (prev.answered_at.is_none() || newly_matched) {
        facts.push((
            "call.answered",
            now.answered_at.unwrap_or(fallback),
            base.clone(),
        ));
    }
    if now.stage == 3 && (prev.stage < 3 || newly_matched) {
        let at = now.ended_at.unwrap_or(fallback);
        facts.push((
            "call.ended",
            at,
            with(
                json!({"duration_secs": now.duration_secs, "recording_url": now.recording_url,
            "voicemail_url": now.voicemail_url, "missed": now.missed}),
            ),
        ));
    }
    if now.missed && (!prev.missed || newly_matched) {
        facts.push((
            "call.missed",
            now.ended_at.unwrap_or(fallback),
            with(json!({"reason": now.missed_reason, "voicemail_url": now.voicemail_url})),
        ));
    }
    for (kind, at, properties) in facts {
        events::emit_about_at(
            conn,
            tenant,
            contact,
            kind,
            properties,
            Some(("call", now.id)),
            at,
        )
        .await?;
    }
    Ok(())
}

/// A missed call is added to the contact's open phone ticket, or opens one, for a call-back.
async fn open_callback_ticket(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    contact: Uuid,
    call: &Row,
) -> ApiResult<()> {
    let number = call
        .external_number
        .clone()
        .unwrap_or_else(|| "an unknown number".to_owned());
    let when = call
        .ended_at
        .or(call.started_at)
        .unwrap_or_else(Utc::now)
        .format("%Y-%m-%d %H:%M UTC");
    let note = match &call.voicemail_url {
        Some(url) => format!(
            "Missed call from {number} at {when}, with a voicemail: {url}. Please call back."
        ),
        None => format!("Missed call from {number} at {when}. Please call back."),
    };
    let existing: Option<Uuid> = sqlx::query_scalar(concat!(
        "SELECT id FROM tickets WHERE tenant_id = $1 AND contact_id = $2 AND channel = 'phone'
           AND status IN ",
        open_ticket_statuses!(),
        " ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
    ))
    .bind(tenant.id)
    .bind(contact)
    .fetch_optional(&mut *conn)
    .await?;
    let ticket = match existing {
        Some(id) => {
            support::insert_message(conn, tenant.id, id, "contact", None, &note, false).await?;
            id
        }
        None => {
            let row = support::NewTicketRow {
                contact_id: contact,
                channel: "phone",
                subject: &format!("Missed call from {number}"),
                body: &note,
                category: Some("callback"),
                priority: "high",
                assignee: None,
            };
            support::create_ticket(conn, tenant, &row).await?.id
        }
    };
    sqlx::query("UPDATE calls SET ticket_id = $3 WHERE tenant_id = $1 AND id = $2")
        .bind(tenant.id)
        .bind(call.id)
        .bind(ticket)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> ApiResult<Option<Call>> {
    let sql =
        format!("SELECT {CALL_COLUMNS} FROM calls WHERE tenant_id = $1 AND id = $2 AND stage > 0");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_calls))
        .routes(routes!(get_call))
}

/// Filters of `GET /v1/calls`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CallFilter {
    pub contact_id: Option<Uuid>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List calls, newest first.
#[utoipa::path(get, path = "/v1/calls", tag = "telephony", security(("api_key" = [])), params(CallFilter),
    responses((status = 200, body = Page<Call>)))]
async fn list_calls(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(f): ApiQuery<CallFilter>,
) -> ApiResult<Json<Page<Call>>> {
    let page = PageParams {
        limit: f.limit,
        cursor: f.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let sql = format!(
        "SELECT {CALL_COLUMNS} FROM calls WHERE tenant_id = $1 AND stage > 0
           AND ($2::uuid IS NULL OR contact_id = $2) AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    );
    let mut conn = state.pool.acquire().await?;
    let rows: Vec<Call> = sqlx::query_as(&sql)
        .bind(tenant.id)
        .bind(f.contact_id)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await?;
    Ok(Json(paginate(rows, limit, |c| encode_id_cursor(c.id))))
}

/// Get a call.
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "telephony", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Call id")),
    responses((status = 200, body = Call), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_call(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Call>> {
    let mut conn = state.pool.acquire().await?;
    get(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no call with id {id}")))
}

/// Erasure: the contact's calls keep their direction, agent, times and duration (for reports)
/// and lose the number, the recordings' links and the comments.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE calls SET external_number = NULL, recording_url = NULL, voicemail_url = NULL,
            comments = '[]', updated_at = now()
         WHERE tenant_id = $1 AND contact_id = $2",
    )
    .bind(tenant)
    .bind(contact)
    .execute(conn)
    .await?;
    Ok(())
}
