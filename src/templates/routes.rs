//! `/v1/templates`: create or replace, read, list, preview.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{PreviewRequest, Rendered, Template, TemplateInput, validate_key};
use super::sandbox::SandboxError;
use super::{render, store};
use crate::AppState;
use crate::contacts::routes::contact_not_found;
use crate::contacts::store as contacts;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{Page, PageParams, decode_key_cursor, encode_key_cursor, paginate};
use crate::http::problems::ProblemResponse;
use crate::tenants::store as tenants;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_templates))
        .routes(routes!(put_template, get_template))
        .routes(routes!(preview))
}

fn template_not_found(key: &str) -> ApiError {
    ApiError::NotFound(format!("no template with key `{key}`"))
}

/// Create or replace a template.
///
/// Variants are given per channel, then per locale: `{"email": {"hr": {subject, html, text}},
/// "sms": {"hr": {text}}, "viber": {"hr": {text, button}}}`. Texts are minijinja templates over
/// `contact`, `tenant`, `event` and `vars`; a syntax error is a 422 naming the text.
#[utoipa::path(put, path = "/v1/templates/{key}", tag = "templates",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Template key, such as `ticket_acknowledgement`")),
    request_body = TemplateInput,
    responses((status = 201, description = "Created", body = Template),
              (status = 200, description = "Replaced", body = Template),
              (status = 422, response = ProblemResponse)))]
async fn put_template(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ValidJson(body): ValidJson<TemplateInput>,
) -> ApiResult<impl IntoResponse> {
    validate_key(&key).map_err(|m| ApiError::field("key", m))?;
    let (purpose, variants) = body
        .validate()
        .map_err(|e| ApiError::validation(e.into_vec()))?;
    let mut conn = state.pool.acquire().await?;
    let (template, created) = store::put(&mut conn, tenant.id, &key, purpose, &variants).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(template)))
}

/// Get a template.
#[utoipa::path(get, path = "/v1/templates/{key}", tag = "templates",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Template key")),
    responses((status = 200, body = Template), (status = 404, response = ProblemResponse)))]
async fn get_template(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Template>> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, &key)
        .await?
        .map(Json)
        .ok_or_else(|| template_not_found(&key))
}

/// List templates by key.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    security(("api_key" = [])),
    params(PageParams),
    responses((status = 200, body = Page<Template>)))]
async fn list_templates(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Template>>> {
    let limit = page.limit()?;
    let after = page.cursor.as_deref().map(decode_key_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, tenant.id, after.as_deref(), limit).await?;
    Ok(Json(paginate(rows, limit, |t| encode_key_cursor(&t.key))))
}

/// Render a template without sending it; a missing variable is a 422 naming the text.
#[utoipa::path(post, path = "/v1/templates/{key}/preview", tag = "templates",
    security(("api_key" = [])),
    params(("key" = String, Path, description = "Template key")),
    request_body = PreviewRequest,
    responses((status = 200, body = Rendered),
              (status = 404, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn preview(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ValidJson(body): ValidJson<PreviewRequest>,
) -> ApiResult<Json<Rendered>> {
    let mut conn = state.pool.acquire().await?;
    let template = store::get(&mut conn, tenant.id, &key)
        .await?
        .ok_or_else(|| template_not_found(&key))?;
    let contact_id = match (&body.contact_id, &body.contact) {
        (Some(id), _) => Some(*id),
        (None, Some(r)) => Some(
            contacts::find_by_ref(&mut conn, &tenant, r, "contact")
                .await?
                .ok_or_else(|| ApiError::field("contact", "no such contact"))?,
        ),
        (None, None) => None,
    };
    let contact = match contact_id {
        Some(id) => Some(
            contacts::get(&mut conn, tenant.id, id)
                .await?
                .ok_or_else(|| contact_not_found(id))?,
        ),
        None => None,
    };
    let tenant_row = tenants::get(&mut conn, tenant.id.0)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("authenticated tenant is missing")))?;
    let wanted = match &body.locale {
        Some(l) => vec![validate::locale(l).map_err(|m| ApiError::field("locale", m))?],
        None => contact
            .as_ref()
            .and_then(|c| c.locale.clone())
            .into_iter()
            .chain([tenant.default_locale.clone()])
            .collect(),
    };
    let available = template.variants.locales(body.channel);
    let wanted_refs: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let locale = render::pick_locale(&available, &wanted_refs).ok_or_else(|| {
        ApiError::field(
            "locale",
            format!(
                "the template has no {} variant in {}; it has {:?}",
                body.channel.as_str(),
                wanted.join(" or "),
                available
            ),
        )
    })?;
    let event = body.event.clone().map(Value::Object);
    let vars = Value::Object(body.vars.clone().unwrap_or_default());
    let ctx = render::context(contact.as_ref(), &tenant_row, event.as_ref(), &vars);
    // A tenant's template may run until its deadline: not while holding a connection.
    drop(conn);
    let rendered = state
        .sandbox
        .render(&template.variants, body.channel, locale, &ctx)
        .await
        .map_err(|e| render_problem(e, ""))?;
    Ok(Json(rendered))
}

/// A failed render as the client sees it: the template's fault is a 422 naming the text
/// (under `prefix`), ours a 503.
pub fn render_problem(e: SandboxError, prefix: &str) -> ApiError {
    match e {
        SandboxError::Render(e) => ApiError::field(format!("{prefix}{}", e.field), e.message),
        SandboxError::Unavailable(why) => {
            tracing::error!(%why, "template renderer unavailable");
            ApiError::Unavailable("templates cannot be rendered at the moment".to_owned())
        }
    }
}
