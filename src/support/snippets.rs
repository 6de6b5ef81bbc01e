//! Snippets: canned responses with template variables, rendered for a ticket.
//! `PUT/GET /v1/snippets/{key}`, `GET /v1/snippets`, `POST /v1/snippets/{key}/render`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::contacts::store as contacts;
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{Page, PageParams, decode_key_cursor, encode_key_cursor, paginate};
use crate::templates::model::validate_key;
use crate::templates::render;
use crate::templates::routes::render_problem;
use crate::tenancy::Tenant;
use crate::tenants::store as tenants;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_snippets))
        .routes(routes!(put_snippet, get_snippet))
        .routes(routes!(render_snippet))
}

/// A canned response.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Snippet {
    pub key: String,
    pub title: Option<String>,
    /// A minijinja template over `contact`, `ticket`, `agent` and `tenant`.
    #[schema(
        example = "Dear {{ contact.first_name }}, ticket #{{ ticket.number }} is solved. {{ agent.name }}"
    )]
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PUT /v1/snippets/{key}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnippetInput {
    pub title: Option<String>,
    pub body: String,
}

/// `POST /v1/snippets/{key}/render`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderSnippet {
    pub ticket_id: Uuid,
}

/// A rendered snippet.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RenderedSnippet {
    pub text: String,
}

fn not_found(key: &str) -> ApiError {
    ApiError::NotFound(format!("no snippet with key `{key}`"))
}

/// Create or replace a snippet; a syntax error is a 422.
#[utoipa::path(put, path = "/v1/snippets/{key}", tag = "support", security(("api_key" = [])),
    params(("key" = String, Path, description = "Snippet key")), request_body = SnippetInput,
    responses((status = 201, body = Snippet), (status = 200, body = Snippet),
              (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn put_snippet(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ValidJson(body): ValidJson<SnippetInput>,
) -> ApiResult<(StatusCode, Json<Snippet>)> {
    validate_key(&key).map_err(|m| ApiError::field("key", m))?;
    crate::validate::text(&body.body, 20_000).map_err(|m| ApiError::field("body", m))?;
    render::check_syntax(&body.body).map_err(|m| ApiError::field("body", m))?;
    let (snippet, created): (Snippet, bool) = {
        let row: (String, Option<String>, String, DateTime<Utc>, DateTime<Utc>, bool) = sqlx::query_as(
            "INSERT INTO snippets (tenant_id, key, title, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, key) DO UPDATE SET title = EXCLUDED.title, body = EXCLUDED.body, updated_at = now()
             RETURNING key, title, body, created_at, updated_at, (xmax = 0)",
        )
        .bind(tenant.id)
        .bind(&key)
        .bind(&body.title)
        .bind(&body.body)
        .fetch_one(&state.pool)
        .await?;
        (
            Snippet {
                key: row.0,
                title: row.1,
                body: row.2,
                created_at: row.3,
                updated_at: row.4,
            },
            row.5,
        )
    };
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(snippet),
    ))
}

async fn load(state: &AppState, tenant: &Tenant, key: &str) -> ApiResult<Snippet> {
    sqlx::query_as("SELECT key, title, body, created_at, updated_at FROM snippets WHERE tenant_id = $1 AND key = $2")
        .bind(tenant.id)
        .bind(key)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| not_found(key))
}

/// Get a snippet.
#[utoipa::path(get, path = "/v1/snippets/{key}", tag = "support", security(("api_key" = [])),
    params(("key" = String, Path, description = "Snippet key")),
    responses((status = 200, body = Snippet), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_snippet(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Snippet>> {
    Ok(Json(load(&state, &tenant, &key).await?))
}

/// List snippets by key.
#[utoipa::path(get, path = "/v1/snippets", tag = "support", security(("api_key" = [])), params(PageParams),
    responses((status = 200, body = Page<Snippet>)))]
async fn list_snippets(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Snippet>>> {
    let limit = page.limit()?;
    let after = page.cursor.as_deref().map(decode_key_cursor).transpose()?;
    let rows: Vec<Snippet> = sqlx::query_as(
        "SELECT key, title, body, created_at, updated_at FROM snippets
         WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2) ORDER BY key LIMIT $3",
    )
    .bind(tenant.id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(paginate(rows, limit, |s| encode_key_cursor(&s.key))))
}

/// Render a snippet for a ticket, with `contact`, `ticket`, `agent` (the assignee) and
/// `tenant`; a missing variable is a 422, never a blank.
#[utoipa::path(post, path = "/v1/snippets/{key}/render", tag = "support", security(("api_key" = [])),
    params(("key" = String, Path, description = "Snippet key")), request_body = RenderSnippet,
    responses((status = 200, body = RenderedSnippet), (status = 404, body = Problem, content_type = "application/problem+json"),
              (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn render_snippet(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ValidJson(body): ValidJson<RenderSnippet>,
) -> ApiResult<Json<RenderedSnippet>> {
    let snippet = load(&state, &tenant, &key).await?;
    let mut conn = state.pool.acquire().await?;
    let ticket = super::store::get_ticket(&mut conn, tenant.id, body.ticket_id)
        .await?
        .ok_or_else(|| {
            ApiError::field("ticket_id", format!("no ticket with id {}", body.ticket_id))
        })?;
    let contact = contacts::get(&mut conn, tenant.id, ticket.contact_id).await?;
    let tenant_row = tenants::get(&mut conn, tenant.id.0)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("authenticated tenant is missing")))?;
    let agent = match ticket.assignee_id {
        Some(a) => super::store::get_agent(&mut conn, tenant.id, a).await?,
        None => None,
    };
    let mut ctx = render::context(contact.as_ref(), &tenant_row, None, &json!({}));
    ctx["ticket"] = serde_json::to_value(&ticket).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(agent) = agent {
        ctx["agent"] = serde_json::to_value(&agent).map_err(|e| ApiError::Internal(e.into()))?;
    }
    drop(conn);
    let text = state
        .sandbox
        .render_text("snippet.txt", &snippet.body, &ctx, "body")
        .await
        .map_err(|e| render_problem(e, "snippet."))?;
    Ok(Json(RenderedSnippet { text }))
}
