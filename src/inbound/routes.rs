//! `GET /v1/inbound-messages/{id}`: a customer's message as it came.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::InboundMessage;
use super::store;
use crate::AppState;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ApiPath;
use crate::http::problems::ProblemResponse;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_inbound))
}

/// A message a customer sent in, whole: an email's full text with the history it quotes (the
/// ticket shows only the reply), the sender, what it was filed as. Ticket messages name it as
/// `inbound_id`.
#[utoipa::path(get, path = "/v1/inbound-messages/{id}", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Inbound message id")),
    responses((status = 200, body = InboundMessage), (status = 404, response = ProblemResponse)))]
async fn get_inbound(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<InboundMessage>> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no inbound message with id {id}")))
}
