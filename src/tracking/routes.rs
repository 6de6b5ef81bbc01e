//! Public endpoints reached from customers' mail clients and browsers: `/t/o/{token}` (open
//! pixel), `/t/c/{token}` (click redirect) and `/u/{token}` (unsubscribe, and back).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::contacts::store as contacts;
use crate::domain::{Channel, TenantId};
use crate::domain::{ConsentStatus, Purpose as ConsentPurpose};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ApiPath;
use crate::http::pages::{self, Brand, Page, Words, escape, fill};
use crate::http::problems::ProblemResponse;
use crate::messages::model::Compose;
use crate::messages::store as messages;
use crate::signing::Purpose;
use crate::support::store as support;
use crate::tenants::store as tenants;

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
        let mut tx = crate::db::begin(&state.pool).await?;
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
    let mut tx = crate::db::begin(&state.pool).await?;
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

/// Where an unsubscribe token leads: the message's contact and channel, in the contact's
/// language, under the company's name.
struct Subscription {
    tenant: TenantId,
    message: Uuid,
    contact: Uuid,
    channel: Channel,
    opted_out: bool,
    words: &'static Words,
    brand: Brand,
}

impl Subscription {
    fn page(&self, title: &str, lead: &str, action: Action) -> Response {
        let w = self.words;
        let via = pages::via(w, self.channel);
        let (question, button, class) = match action {
            Action::Unsubscribe => (None, w.unsubscribe_button, ""),
            Action::Resubscribe => (
                Some(w.changed_mind),
                w.resubscribe_button,
                " class=\"secondary\"",
            ),
        };
        let question = question.map_or_else(String::new, |q| format!("<p>{}</p>\n", escape(q)));
        let body = format!(
            r#"<p>{lead}</p>
{question}<form method="post">
<input type="hidden" name="action" value="{action}">
<button type="submit"{class}>{button}</button>
</form>"#,
            lead = fill(lead, &[("channel", via)]),
            action = action.as_str(),
            button = escape(button),
        );
        pages::render(Page {
            status: StatusCode::OK,
            words: w,
            brand: Some(&self.brand),
            title,
            body,
        })
    }
}

/// What the page's one button does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Unsubscribe,
    Resubscribe,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Unsubscribe => "unsubscribe",
            Action::Resubscribe => "resubscribe",
        }
    }
}

async fn subscription(state: &AppState, token: &str) -> ApiResult<Option<Subscription>> {
    let signer = state.links.get(&state.pool).await?;
    let Some(claims) = signer.verify(token, Purpose::Unsubscribe) else {
        return Ok(None);
    };
    let tenant = TenantId(claims.tenant);
    let mut conn = state.pool.acquire().await?;
    let Some(message) = messages::get(&mut conn, tenant, claims.subject).await? else {
        return Ok(None);
    };
    let Some(contact) = message.contact_id else {
        return Ok(None);
    };
    let Some(contact) = contacts::get(&mut conn, tenant, contact).await? else {
        return Ok(None);
    };
    let Some(brand) = tenants::brand(&mut conn, tenant).await? else {
        return Ok(None);
    };
    let locale = contacts::locale_of(&mut conn, tenant, contact.id)
        .await?
        .unwrap_or_default();
    Ok(Some(Subscription {
        tenant,
        message: message.id,
        contact: contact.id,
        channel: message.channel,
        opted_out: contact
            .consents
            .status(message.channel, ConsentPurpose::Marketing)
            == Some(ConsentStatus::OptedOut),
        words: pages::for_locale(&locale),
        brand,
    }))
}

/// The unsubscribe page, in the contact's language, naming the company and the channel, with
/// one button; once unsubscribed, the button subscribes again. Opening the link alone never
/// changes anything: mail scanners follow links; mail clients use the one-click POST of
/// `List-Unsubscribe-Post`.
#[utoipa::path(get, path = "/u/{token}", tag = "tracking",
    params(("token" = String, Path, description = "Signed token")),
    responses((status = 200, description = "HTML page", content_type = "text/html"),
              (status = 404, description = "Not a valid link", content_type = "text/html")))]
async fn unsubscribe_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(token): ApiPath<String>,
) -> ApiResult<Response> {
    let Some(sub) = subscription(&state, &token).await? else {
        return Ok(pages::invalid_link(&headers));
    };
    let w = sub.words;
    Ok(if sub.opted_out {
        sub.page(
            w.unsubscribe_title,
            w.already_unsubscribed,
            Action::Resubscribe,
        )
    } else {
        sub.page(
            w.unsubscribe_title,
            w.unsubscribe_question,
            Action::Unsubscribe,
        )
    })
}

/// The unsubscribe page's form (RFC 8058 clients post `List-Unsubscribe=One-Click`).
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "documents the form the handler reads field by field"
)]
pub struct UnsubscribeForm {
    /// `unsubscribe` (the default, and what a one-click POST means) or `resubscribe`.
    #[schema(example = "unsubscribe")]
    action: Option<String>,
    /// What RFC 8058 one-click clients send: `One-Click`.
    #[schema(rename = "List-Unsubscribe")]
    list_unsubscribe: Option<String>,
}

/// Unsubscribes (RFC 8058 one-click, or the page's button): records an opt-out of marketing on
/// the message's channel, emits `contact.unsubscribed` and sends the
/// `unsubscribe_confirmation` template (unless `settings.unsubscribe_confirmation` is false).
/// With `action=resubscribe`, the same token opts the contact in again.
#[utoipa::path(post, path = "/u/{token}", tag = "tracking",
    params(("token" = String, Path, description = "Signed token")),
    request_body(content = UnsubscribeForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "HTML confirmation", content_type = "text/html"),
              (status = 404, description = "Not a valid link", content_type = "text/html")))]
async fn unsubscribe(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(token): ApiPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let Some(sub) = subscription(&state, &token).await? else {
        return Ok(pages::invalid_link(&headers));
    };
    let resubscribe = url::form_urlencoded::parse(&body)
        .any(|(k, v)| k == "action" && v == Action::Resubscribe.as_str());
    let w = sub.words;
    let mut tx = crate::db::begin(&state.pool).await?;
    let page = if resubscribe {
        contacts::set_consent(
            &mut tx,
            sub.tenant,
            sub.contact,
            sub.channel,
            ConsentPurpose::Marketing,
            ConsentStatus::OptedIn,
            "resubscribe link",
            Some(sub.message),
        )
        .await?;
        sub.page(w.resubscribed_title, w.resubscribed, Action::Unsubscribe)
    } else {
        let changed = contacts::set_consent(
            &mut tx,
            sub.tenant,
            sub.contact,
            sub.channel,
            ConsentPurpose::Marketing,
            ConsentStatus::OptedOut,
            "unsubscribe link",
            Some(sub.message),
        )
        .await?;
        if changed {
            confirm_unsubscribe(&state, &mut tx, &sub, &token).await?;
        }
        sub.page(w.unsubscribed_title, w.unsubscribed, Action::Resubscribe)
    };
    tx.commit().await?;
    Ok(page)
}

/// Sends the `unsubscribe_confirmation` template on the channel just left (a transactional
/// message: the opt-out is of marketing), with the way back in `vars.resubscribe_url`.
async fn confirm_unsubscribe(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    sub: &Subscription,
    token: &str,
) -> ApiResult<()> {
    let settings = support::settings(conn, sub.tenant).await?;
    if settings.unsubscribe_confirmation == Some(false) {
        return Ok(());
    }
    let Some(tenant) = tenants::context(conn, sub.tenant).await? else {
        return Ok(());
    };
    let opts = state.send_options().await?;
    let compose = Compose {
        contact_id: sub.contact,
        template_key: "unsubscribe_confirmation",
        channels: &[sub.channel],
        vars: json!({"resubscribe_url": format!("{}/u/{token}", opts.public_url)}),
        event: None,
        journey: None,
        ticket: None,
        suppress: None,
    };
    let queued = messages::enqueue(conn, &tenant, compose, &opts).await;
    messages::best_effort(queued, sub.tenant, "the unsubscribe confirmation")?;
    Ok(())
}
