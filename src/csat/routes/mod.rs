//! `POST /v1/csat`: ratings from outside survey tools.

pub mod survey;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, NewRating, Rating, RatingRow};
use crate::AppState;
use crate::contacts::store as contacts;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ValidJson;
use crate::http::problems::ProblemResponse;
use crate::support::store as support;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_rating))
}

/// Record a rating from an outside tool. A score at or below the tenant's threshold (default 2)
/// alerts the agent by email at once; `csat.rated` goes on the contact's timeline.
#[utoipa::path(post, path = "/v1/csat", tag = "csat", security(("api_key" = [])),
    request_body = NewRating,
    responses((status = 201, body = Rating), (status = 422, response = ProblemResponse)))]
async fn create_rating(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<NewRating>,
) -> ApiResult<(StatusCode, Json<Rating>)> {
    let source = validate::text(&body.source, 100).map_err(|m| ApiError::field("source", m))?;
    if source == "survey" {
        return Err(ApiError::field(
            "source",
            "`survey` is reserved for Rapport's own survey page",
        ));
    }
    if !(1..=5).contains(&body.score) {
        return Err(ApiError::field("score", "must be 1 to 5"));
    }
    let comment = body
        .comment
        .as_deref()
        .map(|c| validate::text(c, 10_000))
        .transpose()
        .map_err(|m| ApiError::field("comment", m))?;
    let mut tx = crate::db::begin(&state.pool).await?;
    let contact_id = contacts::find_by_ref(&mut tx, &tenant, &body.contact, "contact")
        .await?
        .ok_or_else(|| ApiError::field("contact", "no such contact"))?;
    let ticket = match body.ticket_id {
        Some(id) => Some(
            support::get_ticket(&mut tx, tenant.id, id)
                .await?
                .ok_or_else(|| ApiError::field("ticket_id", format!("no ticket with id {id}")))?,
        ),
        None => None,
    };
    if ticket.as_ref().is_some_and(|t| t.contact_id != contact_id) {
        return Err(ApiError::field(
            "ticket_id",
            "the ticket is another contact's",
        ));
    }
    if let Some(agent) = body.agent_id {
        if support::get_agent(&mut tx, tenant.id, agent)
            .await?
            .is_none()
        {
            return Err(ApiError::field(
                "agent_id",
                format!("no agent with id {agent}"),
            ));
        }
    }
    let row = RatingRow {
        contact_id,
        ticket_id: ticket.as_ref().map(|t| t.id),
        agent_id: body
            .agent_id
            .or_else(|| ticket.as_ref().and_then(|t| t.assignee_id)),
        score: body.score,
        comment: comment.as_deref(),
        source: &source,
        channel: ticket.as_ref().map(|t| t.channel.as_str()),
    };
    let rating = store::record(&mut tx, tenant.id, &row, state.config.outbox_max_attempts).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(rating)))
}
