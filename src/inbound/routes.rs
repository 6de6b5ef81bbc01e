//! `GET /v1/inbound-messages/{id}`: a customer's message as it came; `GET
//! /v1/attachments/{id}`: a file that came with it.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
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
    OpenApiRouter::new()
        .routes(routes!(get_inbound))
        .routes(routes!(get_attachment))
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

/// A `Content-Disposition` that always downloads: the name as ASCII (others replaced) and
/// whole in UTF-8 (RFC 6266 `filename*`).
fn disposition(filename: Option<&str>) -> HeaderValue {
    let name = filename.unwrap_or("attachment");
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '"' | '\\' | ';') || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20");
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// A file a customer sent with an email, as it came, with its content type; always as a
/// download (`Content-Disposition: attachment`) and never rendered in the API's origin. A
/// provider-hosted media item is a redirect to its URL; a file dropped for size is a 404
/// that says so.
#[utoipa::path(get, path = "/v1/attachments/{id}", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Attachment id, as a ticket message lists it")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 307, description = "Hosted by the provider: its URL"),
              (status = 404, response = ProblemResponse)))]
async fn get_attachment(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    let mut conn = state.pool.acquire().await?;
    let file = store::attachment(&mut conn, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no attachment with id {id}")))?;
    if let Some(content) = file.content {
        let content_type = HeaderValue::from_str(&file.content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
        return Ok((
            [
                (header::CONTENT_TYPE, content_type),
                (
                    header::CONTENT_DISPOSITION,
                    disposition(file.filename.as_deref()),
                ),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static("sandbox; default-src 'none'"),
                ),
            ],
            content,
        )
            .into_response());
    }
    if let Some(url) = file.url {
        return Ok(axum::response::Redirect::temporary(&url).into_response());
    }
    Err(ApiError::NotFound(format!(
        "attachment {id} was not kept: {}",
        file.dropped.as_deref().unwrap_or("no content")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_keep_their_names_safely() {
        assert_eq!(
            disposition(Some("račun 12.pdf")),
            "attachment; filename=\"ra_un 12.pdf\"; filename*=UTF-8''ra%C4%8Dun%2012.pdf"
        );
        assert_eq!(
            disposition(Some("a\"b;c.txt")),
            "attachment; filename=\"a_b_c.txt\"; filename*=UTF-8''a%22b%3Bc.txt"
        );
        assert_eq!(
            disposition(None),
            "attachment; filename=\"attachment\"; filename*=UTF-8''attachment"
        );
    }
}
