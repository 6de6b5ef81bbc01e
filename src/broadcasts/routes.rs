//! `/v1/broadcasts`: one message to every member of a segment, scheduled, paused, resumed or
//! cancelled, with its progress.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{Broadcast, BroadcastInput, BroadcastStatus, Throttle, parse_local};
use super::store::{self, BroadcastRow, NewBroadcast};
use crate::AppState;
use crate::campaigns::store as campaigns;
use crate::channels::store as channels;
use crate::domain::{Purpose, TenantContext};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;
use crate::messages::store as messages;
use crate::templates::store as templates;
use crate::validate::FieldError;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_broadcast, list_broadcasts))
        .routes(routes!(get_broadcast))
        .routes(routes!(schedule_broadcast))
        .routes(routes!(pause_broadcast))
        .routes(routes!(resume_broadcast))
        .routes(routes!(cancel_broadcast))
}

/// The API's view of a stored broadcast; `delivery` adds what became of its messages.
fn view(b: BroadcastRow, delivery: Option<messages::BroadcastDelivery>) -> Broadcast {
    let mut stats = b.walk_stats();
    if let Some(d) = delivery {
        stats.pending = d.pending;
        stats.sent = d.sent;
        stats.delivered = d.delivered;
        stats.opened = d.opened;
        stats.clicked = d.clicked;
        stats.failed = d.failed;
        stats.cancelled = d.cancelled;
    }
    Broadcast {
        id: b.id,
        name: b.name,
        segment_id: b.segment_id,
        audience: b.audience,
        template: b.template_key,
        channels: b.channels,
        purpose: b.purpose,
        send_at: b.send_at,
        send_at_local: b.send_at_local,
        throttle: b.per_second.map(|p| Throttle {
            per_second: p.unsigned_abs(),
        }),
        quiet_hours: b.quiet_hours,
        frequency_cap: b.frequency_cap,
        suppress_while_ticket_open: b.suppress_while_ticket_open,
        variables: b.variables,
        status: b.status,
        starts_at: b.starts_at,
        stats,
        error: b.error,
        created_at: b.created_at,
        updated_at: b.updated_at,
        scheduled_at: b.scheduled_at,
        started_at: b.started_at,
        finished_at: b.finished_at,
    }
}

/// Create a broadcast (a draft: nothing is sent until it is scheduled). A 422 names the
/// field: an unknown segment or template, an audience that does not compile, a `throttle`
/// above a channel's `max_per_second`, a transactional purpose for a marketing template.
#[utoipa::path(post, path = "/v1/broadcasts", tag = "broadcasts", security(("api_key" = [])),
    request_body = BroadcastInput,
    responses((status = 201, body = Broadcast), (status = 422, response = ProblemResponse)))]
async fn create_broadcast(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(input): ValidJson<BroadcastInput>,
) -> ApiResult<(StatusCode, Json<Broadcast>)> {
    let mut errors = input.check();
    let mut tx = crate::db::begin(&state.pool).await?;
    if let Some(segment) = input.segment_id()
        && !campaigns::hold_segment(&mut tx, tenant.id, segment).await?
    {
        let field = if input.segment.is_some() {
            "segment"
        } else {
            "audience.segment"
        };
        errors.push(FieldError::new(
            field,
            format!("no segment with id {segment}"),
        ));
    }
    let template = templates::get(&mut tx, tenant.id, &input.template).await?;
    let purpose = match &template {
        None => {
            errors.push(FieldError::new(
                "template",
                format!("no template with key `{}`", input.template),
            ));
            Purpose::Marketing
        }
        Some(t) => {
            for c in &input.channels {
                if !t.variants.has(*c) {
                    errors.push(FieldError::new(
                        "channels",
                        format!("the template has no `{}` variant", c.as_str()),
                    ));
                }
            }
            match (t.purpose, input.purpose) {
                (Purpose::Marketing, Some(Purpose::Transactional)) => {
                    errors.push(FieldError::new(
                        "purpose",
                        "the template is marketing: its messages need consent and cannot be sent as transactional",
                    ));
                    Purpose::Marketing
                }
                (Purpose::Marketing, _) => Purpose::Marketing,
                (Purpose::Transactional, asked) => asked.unwrap_or(Purpose::Transactional),
            }
        }
    };
    if let Some(throttle) = &input.throttle {
        let limits = channels::max_per_second(&mut tx, tenant.id).await?;
        for (channel, limit) in limits {
            let named =
                input.channels.is_empty() || input.channels.iter().any(|c| c.as_str() == channel);
            if named && f64::from(throttle.per_second) > limit {
                errors.push(FieldError::new(
                    "throttle.per_second",
                    format!(
                        "{} is above the `{channel}` channel's max_per_second ({limit}); a broadcast may go slower, not faster",
                        throttle.per_second
                    ),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let new = NewBroadcast {
        name: input.name.trim(),
        segment_id: input.segment_id(),
        audience: input.condition(),
        template_key: &input.template,
        channels: input.channels.iter().map(|c| c.as_str()).collect(),
        purpose,
        send_at: input.send_at,
        send_at_local: input
            .send_at_local
            .as_deref()
            .and_then(|l| parse_local(l).ok()),
        per_second: input.throttle.map(|t| t.per_second as i32),
        quiet_hours: input
            .quiet_hours
            .as_ref()
            .and_then(|q| serde_json::to_value(q).ok()),
        frequency_cap: input
            .frequency_cap
            .as_ref()
            .and_then(|f| serde_json::to_value(f).ok()),
        suppress_while_ticket_open: input.suppress_while_ticket_open,
        variables: serde_json::Value::Object(input.variables.clone()),
    };
    let row = store::create(&mut tx, tenant.id, &new).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(row, None))))
}

/// List broadcasts, newest first (with the walk's counts; `GET /v1/broadcasts/{id}` adds
/// delivery).
#[utoipa::path(get, path = "/v1/broadcasts", tag = "broadcasts", security(("api_key" = [])),
    params(PageParams), responses((status = 200, body = Page<Broadcast>)))]
async fn list_broadcasts(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Broadcast>>> {
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, tenant.id, before, limit).await?;
    let page = paginate(rows, limit, |b| encode_id_cursor(b.id));
    Ok(Json(Page {
        data: page.data.into_iter().map(|b| view(b, None)).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// A broadcast with its progress: members found, queued, deferred past quiet hours,
/// suppressed by reason, and what became of the messages (sent, delivered, opened, clicked,
/// failed).
#[utoipa::path(get, path = "/v1/broadcasts/{id}", tag = "broadcasts", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Broadcast id")),
    responses((status = 200, body = Broadcast), (status = 404, response = ProblemResponse)))]
async fn get_broadcast(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Broadcast>> {
    let mut conn = state.pool.acquire().await?;
    let row = store::get(&mut conn, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::from(store::not_found(id)))?;
    let delivery = messages::broadcast_delivery(&mut conn, tenant.id, id).await?;
    Ok(Json(view(row, Some(delivery))))
}

async fn locked(
    tx: &mut sqlx::PgConnection,
    tenant: &TenantContext,
    id: Uuid,
) -> ApiResult<BroadcastRow> {
    store::lock(tx, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::from(store::not_found(id)))
}

fn refuse(b: &BroadcastRow, what: &str) -> ApiError {
    ApiError::Conflict(format!(
        "a {} broadcast cannot be {what}",
        b.status.as_str()
    ))
}

/// Schedule a draft: its walk starts at `send_at` (now without one), or for `send_at_local`
/// shortly before that local time comes in the earliest time zone among the tenant's
/// contacts.
#[utoipa::path(post, path = "/v1/broadcasts/{id}/schedule", tag = "broadcasts", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Broadcast id")),
    responses((status = 200, body = Broadcast), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn schedule_broadcast(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Broadcast>> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let b = locked(&mut tx, &tenant, id).await?;
    if b.status != BroadcastStatus::Draft {
        return Err(refuse(&b, "scheduled"));
    }
    let zones = if b.send_at_local.is_some() {
        crate::contacts::store::time_zones(&mut tx, tenant.id).await?
    } else {
        Vec::new()
    };
    let tenant_zone = tenant.timezone.parse().unwrap_or(chrono_tz::UTC);
    let starts = super::starts_at(&b, &zones, tenant_zone, state.clock.now());
    let row = store::set_status(
        &mut tx,
        tenant.id,
        id,
        BroadcastStatus::Scheduled,
        Some(starts),
        None,
    )
    .await?;
    store::wake(&mut tx).await?;
    tx.commit().await?;
    Ok(Json(view(row, None)))
}

/// Pause: no more members are decided and no queued message of the broadcast is sent (the
/// few a worker is handing to a provider at that moment still go).
#[utoipa::path(post, path = "/v1/broadcasts/{id}/pause", tag = "broadcasts", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Broadcast id")),
    responses((status = 200, body = Broadcast), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn pause_broadcast(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Broadcast>> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let b = locked(&mut tx, &tenant, id).await?;
    if !matches!(
        b.status,
        BroadcastStatus::Scheduled | BroadcastStatus::Running | BroadcastStatus::Completed
    ) {
        return Err(refuse(&b, "paused"));
    }
    messages::pause_broadcast(&mut tx, tenant.id, id).await?;
    let row =
        store::set_status(&mut tx, tenant.id, id, BroadcastStatus::Paused, None, None).await?;
    tx.commit().await?;
    Ok(Json(view(row, None)))
}

/// Resume a paused broadcast: its held messages are queued again (spaced by its `throttle`,
/// none before its own time) and its walk goes on where it stopped.
#[utoipa::path(post, path = "/v1/broadcasts/{id}/resume", tag = "broadcasts", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Broadcast id")),
    responses((status = 200, body = Broadcast), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn resume_broadcast(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Broadcast>> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let b = locked(&mut tx, &tenant, id).await?;
    if b.status != BroadcastStatus::Paused {
        return Err(refuse(&b, "resumed"));
    }
    let next_slot = messages::resume_broadcast(&mut tx, tenant.id, id, b.per_second).await?;
    let status = if b.finished_at.is_some() {
        BroadcastStatus::Completed
    } else if b.started_at.is_some() {
        BroadcastStatus::Running
    } else {
        BroadcastStatus::Scheduled
    };
    let row = store::set_status(&mut tx, tenant.id, id, status, None, Some(next_slot)).await?;
    store::wake(&mut tx).await?;
    tx.commit().await?;
    Ok(Json(view(row, None)))
}

/// Cancel for good: no more members are decided, and the broadcast's unsent messages are
/// suppressed with the reason `cancelled`.
#[utoipa::path(post, path = "/v1/broadcasts/{id}/cancel", tag = "broadcasts", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Broadcast id")),
    responses((status = 200, body = Broadcast), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn cancel_broadcast(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Broadcast>> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let b = locked(&mut tx, &tenant, id).await?;
    if matches!(
        b.status,
        BroadcastStatus::Cancelled | BroadcastStatus::Failed
    ) {
        return Err(refuse(&b, "cancelled"));
    }
    messages::cancel_broadcast(&mut tx, tenant.id, id).await?;
    let row = store::set_status(
        &mut tx,
        tenant.id,
        id,
        BroadcastStatus::Cancelled,
        None,
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(view(row, None)))
}
