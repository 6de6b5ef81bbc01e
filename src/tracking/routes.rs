//! Public endpoints reached from customers' mail clients and browsers: `/t/o/{token}` (open
//! pixel), `/t/c/{token}` (click redirect) and `/u/{token}` (unsubscribe).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::contacts::store as contacts;
use crate::domain::TenantId;
use crate::domain::{ConsentStatus, Purpose as ConsentPurpose};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ApiPath;
use crate::http::problems::ProblemResponse;
use crate::messages::store as messages;
use crate::signing::Purpose;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(open_pixel))
        .routes(routes!(click))
        .routes(routes!(unsubscribe_page, unsubscribe))
}

/// A transparent 1x1 GIF.
const PIXEL: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

/// Email open pixel: records the first open. Always answers the image, so a mail client never
/// shows a broken one.
#[utoipa::path(get, path = "/t/o/{token}", tag = "tracking",
    params(("token" = String, Path, description = "Signed token")),
    responses((status = 200, description = "A 1x1 GIF", content_type = "image/gif")))]
async fn open_pixel(State(state): State<AppState>, ApiPath(token): ApiPath<String>) -> Response {
    if let Err(e) = record_open(&state, &token).await {
        tracing::warn!(error = %crate::error::error_chain(&e), "cannot record an open");
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/gif")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-store, max-age=0"),
            ),
        ],
        PIXEL,
    )
        .into_response()
}

async fn record_open(state: &AppState, token: &str) -> Result<(), sqlx::Error> {
    let signer = state.links.get(&state.pool).await?;
    if let Some(claims) = signer.verify(token, Purpose::Open) {
        let mut tx = state.pool.begin().await?;
        messages::mark_opened(&mut tx, TenantId(claims.tenant), claims.subject).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Click redirect: records the click and redirects to the link stored with the message.
#[utoipa::path(get, path = "/t/c/{token}", tag = "tracking",
    params(("token" = String, Path, description = "Signed token")),
    responses((status = 302, description = "To the link's target"),
              (status = 404, response = ProblemResponse)))]
async fn click(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> ApiResult<Response> {
    let signer = state.links.get(&state.pool).await?;
    let not_found = || ApiError::NotFound("this link is not valid".to_owned());
    let claims = signer
        .verify(&token, Purpose::Click)
        .ok_or_else(not_found)?;
    let mut tx = state.pool.begin().await?;
    let target = messages::click(
        &mut tx,
        TenantId(claims.tenant),
        claims.subject,
        claims.index,
    )
    .await?
    .ok_or_else(not_found)?;
    tx.commit().await?;
    let location = HeaderValue::from_str(&target).map_err(|_| not_found())?;
    Ok((
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

/// The unsubscribe page, with a button. Opening the link alone never unsubscribes: mail
/// scanners follow links; mail clients use the one-click POST of `List-Unsubscribe-Post`.
#[utoipa::path(get, path = "/u/{token}", tag = "tracking",
    params(("token" = String, Path, description = "Signed token")),
    responses((status = 200, description = "HTML page", content_type = "text/html"),
              (status = 404, response = ProblemResponse)))]
async fn unsubscribe_page(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> ApiResult<Html<String>> {
    let signer = state.links.get(&state.pool).await?;
    signer
        .verify(&token, Purpose::Unsubscribe)
        .ok_or_else(|| ApiError::NotFound("this link is not valid".to_owned()))?;
    Ok(Html(page(
        "Unsubscribe",
        &format!(
            r#"<p>Stop receiving these messages?</p>
<form method="post" action="/u/{token}"><button type="submit">Unsubscribe</button></form>"#
        ),
    )))
}

/// Unsubscribes (RFC 8058 one-click, or the page's button): records an opt-out of marketing on
/// the message's channel and emits `contact.unsubscribed`.
#[utoipa::path(post, path = "/u/{token}", tag = "tracking",
    params(("token" = String, Path, description = "Signed token")),
    responses((status = 200, description = "HTML confirmation", content_type = "text/html"),
              (status = 404, response = ProblemResponse)))]
async fn unsubscribe(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> ApiResult<(StatusCode, Html<String>)> {
    let signer = state.links.get(&state.pool).await?;
    let not_found = || ApiError::NotFound("this link is not valid".to_owned());
    let claims = signer
        .verify(&token, Purpose::Unsubscribe)
        .ok_or_else(not_found)?;
    let tenant = TenantId(claims.tenant);
    let mut tx = state.pool.begin().await?;
    let message = messages::get(&mut tx, tenant, claims.subject)
        .await?
        .ok_or_else(not_found)?;
    let channel = message.channel;
    let contact_id = message.contact_id.ok_or_else(not_found)?;
    contacts::set_consent(
        &mut tx,
        tenant,
        contact_id,
        channel,
        ConsentPurpose::Marketing,
        ConsentStatus::OptedOut,
        "unsubscribe link",
        Some(message.id),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::OK,
        Html(page(
            "Unsubscribed",
            "<p>You are unsubscribed. You will not receive these messages any more.</p>",
        )),
    ))
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}}button{{font-size:1rem;padding:.6rem 1.2rem}}</style></head>
<body><h1>{title}</h1>{body}</body></html>"#
    )
}
