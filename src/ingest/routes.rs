//! `/v1/events`: ingestion, one at a time or in batches, and reading one back.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::events::model::{
    Accepted, Event, EventBatch, EventBatchItem, EventBatchResult, EventItemStatus, NewEvent,
};
use crate::events::store;
use crate::http::extract::{ApiPath, ValidJson};
use crate::http::problems::ProblemResponse;
use crate::ingest::{self, FieldPrefix, MAX_BATCH, Outcome};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_event))
        .routes(routes!(create_events))
        .routes(routes!(get_event))
}

/// Record an event. The contact is found by external id (created when new), email or phone.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    security(("api_key" = [])),
    request_body = NewEvent,
    responses((status = 202, description = "Recorded (or a duplicate of a recorded event)", body = Accepted),
              (status = 422, response = ProblemResponse)))]
async fn create_event(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<NewEvent>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let valid =
        ingest::validate(body, &tenant, FieldPrefix::Single).map_err(ApiError::validation)?;
    let outcome = state.events.ingest(tenant, vec![Ok(valid)]).await?;
    match outcome.into_iter().next() {
        Some(Outcome::Accepted(accepted)) => Ok((StatusCode::ACCEPTED, Json(accepted))),
        Some(Outcome::Rejected(errors)) => Err(ApiError::validation(errors)),
        None => Err(ApiError::Internal(anyhow::anyhow!(
            "no outcome for an event"
        ))),
    }
}

/// Record up to 1,000 events; one bad item does not fail the others.
#[utoipa::path(post, path = "/v1/events/batch", tag = "events",
    security(("api_key" = [])),
    request_body = EventBatch,
    responses((status = 202, description = "Per-item results, in request order", body = EventBatchResult),
              (status = 422, response = ProblemResponse)))]
async fn create_events(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<EventBatch>,
) -> ApiResult<(StatusCode, Json<EventBatchResult>)> {
    if body.events.is_empty() || body.events.len() > MAX_BATCH {
        return Err(ApiError::field(
            "events",
            format!("must hold 1 to {MAX_BATCH} events"),
        ));
    }
    let items = body
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| ingest::validate(e, &tenant, FieldPrefix::Batch(i)))
        .collect();
    let outcomes = state.events.ingest(tenant, items).await?;
    let results: Vec<EventBatchItem> = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, outcome)| match outcome {
            Outcome::Accepted(a) => EventBatchItem {
                index,
                status: if a.duplicate {
                    EventItemStatus::Duplicate
                } else {
                    EventItemStatus::Accepted
                },
                id: Some(a.id),
                contact_id: Some(a.contact_id),
                ordinal: Some(a.ordinal),
                errors: None,
            },
            Outcome::Rejected(errors) => EventBatchItem {
                index,
                status: EventItemStatus::Rejected,
                id: None,
                contact_id: None,
                ordinal: None,
                errors: Some(errors),
            },
        })
        .collect();
    let count = |s: EventItemStatus| results.iter().filter(|r| r.status == s).count();
    Ok((
        StatusCode::ACCEPTED,
        Json(EventBatchResult {
            accepted: count(EventItemStatus::Accepted),
            duplicates: count(EventItemStatus::Duplicate),
            rejected: count(EventItemStatus::Rejected),
            results,
        }),
    ))
}

/// Get an event.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "events",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Event id")),
    responses((status = 200, body = Event), (status = 404, response = ProblemResponse)))]
async fn get_event(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Event>> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no event with id {id}")))
}
