//! `/v1/messages`: send a transactional message now; list and read messages.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{Compose, Message, MessageDetail, MessageFilter, NewMessage, STATUSES};
use super::store;
use crate::AppState;
use crate::contacts::store as contacts;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::events::store as events;
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::idempotency::{self, Claimed, Recorded};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_message, list_messages))
        .routes(routes!(get_message))
}

/// Send a message now. It is queued (or recorded as suppressed, with the reason: no consent,
/// no address...) and handed to the provider by the worker.
#[utoipa::path(post, path = "/v1/messages", tag = "messages",
    security(("api_key" = [])),
    request_body = NewMessage,
    responses((status = 202, description = "Queued, or suppressed with a reason", body = Message),
              (status = 422, response = ProblemResponse)))]
async fn send_message(
    tenant: TenantContext,
    State(state): State<AppState>,
    claimed: Option<Extension<Claimed>>,
    ValidJson(body): ValidJson<NewMessage>,
) -> ApiResult<(StatusCode, Extension<Recorded>, Json<Message>)> {
    let contact_id = {
        let mut conn = state.pool.acquire().await?;
        contacts::find_by_ref(&mut conn, &tenant, &body.contact, "contact")
            .await?
            .ok_or_else(|| ApiError::field("contact", "no such contact"))?
    };
    let channels: Vec<_> = body.channel.into_iter().collect();
    let compose = Compose {
        contact_id,
        template_key: &body.template,
        channels: &channels,
        vars: Value::Object(body.variables.clone().unwrap_or_default()),
        event: None,
        journey: None,
        ticket: None,
        suppress: None,
    };
    let opts = state.send_options().await?;
    // The template runs here, with no connection held: a render error is this request's 422.
    let composed = store::compose(&state.pool, &tenant, &compose, &opts).await?;
    let mut tx = crate::db::begin(&state.pool).await?;
    let message = store::enqueue_composed(&mut tx, &tenant, &compose, composed, &opts).await?;
    // The message and the Idempotency-Key's response commit together: a retry after a crash
    // replays, never queues it again.
    let recorded =
        idempotency::record_in(&mut tx, claimed.as_deref(), StatusCode::ACCEPTED, &message).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Extension(recorded), Json(message)))
}

/// List messages, newest first.
#[utoipa::path(get, path = "/v1/messages", tag = "messages",
    security(("api_key" = [])),
    params(MessageFilter),
    responses((status = 200, body = Page<Message>)))]
async fn list_messages(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<MessageFilter>,
) -> ApiResult<Json<Page<Message>>> {
    let page = PageParams {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    if let Some(status) = filter.status.as_deref() {
        if !STATUSES.contains(&status) {
            return Err(ApiError::BadRequest(format!(
                "status must be one of {}",
                STATUSES.join(", ")
            )));
        }
    }
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(
        &mut conn,
        tenant.id,
        filter.contact_id,
        filter.status.as_deref(),
        before,
        limit,
    )
    .await?;
    Ok(Json(paginate(rows, limit, |m| encode_id_cursor(m.id))))
}

/// Get a message with its delivery attempts and history.
#[utoipa::path(get, path = "/v1/messages/{id}", tag = "messages",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Message id")),
    responses((status = 200, body = MessageDetail), (status = 404, response = ProblemResponse)))]
async fn get_message(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<MessageDetail>> {
    let mut conn = state.pool.acquire().await?;
    let message = store::get(&mut conn, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no message with id {id}")))?;
    let delivery_attempts = store::attempts(&mut conn, tenant.id, id).await?;
    let history = events::about_message(&mut conn, tenant.id, id).await?;
    Ok(Json(MessageDetail {
        message,
        delivery_attempts,
        history,
    }))
}

impl From<store::EnqueueError> for ApiError {
    fn from(e: store::EnqueueError) -> Self {
        use store::EnqueueError as E;
        match e {
            E::ContactNotFound(_) => ApiError::NotFound(e.to_string()),
            E::UnknownTemplate(key) => {
                ApiError::field("template", format!("no template with key `{key}`"))
            }
            E::NoVariant => ApiError::field("template", "the template has no variant"),
            E::Render(e) => crate::templates::routes::render_problem(e, "template."),
            E::Store(e) => e.into(),
        }
    }
}
