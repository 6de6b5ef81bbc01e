//! `/v1/agents` and `/v1/tickets`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{
    Agent, AgentInput, Author, ContactCard, Delivery, MessageAuthor, NewTicket, NewTicketMessage,
    RenderSnippet, RenderedSnippet, Snippet, SnippetInput, Status, TenantSettings, Ticket,
    TicketDetail, TicketFilter, TicketMessage, TicketPatch,
};
use super::store::{self, CardOf, NewTicketRow};
use crate::AppState;
use crate::contacts::model::LookupParams;
use crate::contacts::store as contacts;
use crate::domain::TenantContext;
use crate::domain::{Patch, kinds};
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::store as events;
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::idempotency::{self, Claimed, Recorded};
use crate::http::pagination::{
    Page, PageParams, decode_id_cursor, decode_key_cursor, encode_id_cursor, encode_key_cursor,
    paginate,
};
use crate::http::problems::ProblemResponse;
use crate::templates::model::validate_key;
use crate::templates::render;
use crate::templates::routes::render_problem;
use crate::tenants::store as tenants;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_agent, list_agents))
        .routes(routes!(get_agent, update_agent))
        .routes(routes!(create_ticket, list_tickets))
        .routes(routes!(get_ticket, update_ticket))
        .routes(routes!(add_message))
        .routes(routes!(get_settings, put_settings))
        .routes(routes!(list_snippets))
        .routes(routes!(put_snippet, get_snippet))
        .routes(routes!(render_snippet))
        .routes(routes!(lookup))
}

fn agent_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no agent with id {id}"))
}

fn ticket_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no ticket with id {id}"))
}

/// Create an agent; waiting tickets the agent can take are assigned at once.
#[utoipa::path(post, path = "/v1/agents", tag = "support", security(("api_key" = [])),
    request_body = AgentInput,
    responses((status = 201, body = Agent), (status = 409, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn create_agent(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<AgentInput>,
) -> ApiResult<(StatusCode, Json<Agent>)> {
    let changes = body
        .validate(true, &tenant.default_country)
        .map_err(|e| ApiError::validation(e.into_vec()))?;
    let changes = &changes;
    let (state, tenant) = (&state, &tenant);
    crate::http::retry::retry_conflicts(move || async move {
        let mut tx = crate::db::begin(&state.pool).await?;
        store::lock_desk(&mut tx, tenant.id).await?;
        let agent = store::create_agent(&mut tx, tenant.id, changes).await?;
        store::assign_waiting(&mut tx, tenant).await?;
        let agent = store::get_agent(&mut tx, tenant.id, agent.id)
            .await?
            .ok_or_else(|| agent_not_found(agent.id))?;
        tx.commit().await?;
        Ok((StatusCode::CREATED, Json(agent)))
    })
    .await
}

/// List agents, newest first.
#[utoipa::path(get, path = "/v1/agents", tag = "support", security(("api_key" = [])), params(PageParams),
    responses((status = 200, body = Page<Agent>)))]
async fn list_agents(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Agent>>> {
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list_agents(&mut conn, tenant.id, before, limit).await?;
    Ok(Json(paginate(rows, limit, |a| encode_id_cursor(a.id))))
}

/// Get an agent, with the number of open tickets assigned.
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Agent id")),
    responses((status = 200, body = Agent), (status = 404, response = ProblemResponse)))]
async fn get_agent(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Agent>> {
    let mut conn = state.pool.acquire().await?;
    store::get_agent(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| agent_not_found(id))
}

/// Change an agent. Activating an agent or raising its capacity assigns waiting tickets.
#[utoipa::path(patch, path = "/v1/agents/{id}", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Agent id")), request_body = AgentInput,
    responses((status = 200, body = Agent), (status = 404, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn update_agent(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ValidJson(body): ValidJson<AgentInput>,
) -> ApiResult<Json<Agent>> {
    let changes = body
        .validate(false, &tenant.default_country)
        .map_err(|e| ApiError::validation(e.into_vec()))?;
    let changes = &changes;
    let (state, tenant) = (&state, &tenant);
    crate::http::retry::retry_conflicts(move || async move {
        let mut tx = crate::db::begin(&state.pool).await?;
        store::lock_desk(&mut tx, tenant.id).await?;
        store::update_agent(&mut tx, tenant.id, id, changes)
            .await?
            .ok_or_else(|| agent_not_found(id))?;
        store::assign_waiting(&mut tx, tenant).await?;
        let agent = store::get_agent(&mut tx, tenant.id, id)
            .await?
            .ok_or_else(|| agent_not_found(id))?;
        tx.commit().await?;
        Ok(Json(agent))
    })
    .await
}

/// Sends `template` about a ticket (see [`super::notify::customer`]).
async fn notify_customer(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    tenant: &TenantContext,
    ticket: &Ticket,
    template: &str,
    extra: serde_json::Value,
) -> ApiResult<()> {
    let opts = state.send_options().await?;
    super::notify::customer(conn, tenant, ticket, template, extra, &opts).await?;
    Ok(())
}

/// Open a ticket. It is assigned automatically, and the customer is sent the
/// `ticket_acknowledgement` template (the built-in one unless the tenant wrote its own).
#[utoipa::path(post, path = "/v1/tickets", tag = "support", security(("api_key" = [])),
    request_body = NewTicket,
    responses((status = 201, body = TicketDetail), (status = 422, response = ProblemResponse)))]
async fn create_ticket(
    tenant: TenantContext,
    State(state): State<AppState>,
    claimed: Option<Extension<Claimed>>,
    ValidJson(body): ValidJson<NewTicket>,
) -> ApiResult<(StatusCode, Extension<Recorded>, Json<TicketDetail>)> {
    let mut errors = crate::validate::Errors::new();
    let subject = errors.check("subject", validate::text(&body.subject, 500));
    let text = errors.check("body", validate::text(&body.body, 100_000));
    let category = body
        .category
        .as_deref()
        .and_then(|c| errors.check("category", validate::text(c, 100)));
    errors.finish()?;
    let subject = &subject;
    let text = &text;
    let category = &category;
    let claimed = &claimed;
    let (state, tenant, body) = (&state, &tenant, &body);
    crate::http::retry::retry_conflicts(move || async move {
        let mut tx = crate::db::begin(&state.pool).await?;
        store::lock_desk(&mut tx, tenant.id).await?;
        let contact_id = match &body.contact.external_id {
            Some(external_id) => {
                let ext = validate::text(external_id, 255)
                    .map_err(|m| ApiError::field("contact.external_id", m))?;
                contacts::ensure_by_external_id(&mut tx, tenant.id, &ext, None, None).await?
            }
            None => contacts::find_by_ref(&mut tx, tenant, &body.contact, "contact")
                .await?
                .ok_or_else(|| {
                    ApiError::field(
                        "contact",
                        "no such contact; refer to new contacts by external_id",
                    )
                })?,
        };
        let row = NewTicketRow {
            author: MessageAuthor::Contact,
            contact_id,
            channel: body.channel.as_str(),
            subject: subject.as_deref().unwrap_or_default(),
            body: text.as_deref().unwrap_or_default(),
            category: category.as_deref(),
            priority: body
                .priority
                .unwrap_or(super::model::Priority::Normal)
                .as_str(),
            assignee: None,
        };
        let ticket = store::create_ticket(&mut tx, tenant, &row).await?;
        notify_customer(
            state,
            &mut tx,
            tenant,
            &ticket,
            "ticket_acknowledgement",
            json!({}),
        )
        .await?;
        let messages = store::messages(&mut tx, tenant.id, ticket.id).await?;
        let detail = TicketDetail { ticket, messages };
        // The ticket (and its acknowledgement) and the Idempotency-Key's response commit together.
        let recorded =
            idempotency::record_in(&mut tx, claimed.as_deref(), StatusCode::CREATED, &detail)
                .await?;
        tx.commit().await?;
        Ok((StatusCode::CREATED, Extension(recorded), Json(detail)))
    })
    .await
}

/// List tickets, newest first.
#[utoipa::path(get, path = "/v1/tickets", tag = "support", security(("api_key" = [])), params(TicketFilter),
    responses((status = 200, body = Page<Ticket>)))]
async fn list_tickets(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(f): ApiQuery<TicketFilter>,
) -> ApiResult<Json<Page<Ticket>>> {
    let page = PageParams {
        limit: f.limit,
        cursor: f.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list_tickets(
        &mut conn,
        tenant.id,
        f.status,
        f.assignee_id,
        f.contact_id,
        before,
        limit,
    )
    .await?;
    Ok(Json(paginate(rows, limit, |t| encode_id_cursor(t.id))))
}

/// Get a ticket with its messages.
#[utoipa::path(get, path = "/v1/tickets/{id}", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Ticket id")),
    responses((status = 200, body = TicketDetail), (status = 404, response = ProblemResponse)))]
async fn get_ticket(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<TicketDetail>> {
    let mut conn = state.pool.acquire().await?;
    let ticket = store::get_ticket(&mut conn, tenant.id, id)
        .await?
        .ok_or_else(|| ticket_not_found(id))?;
    let messages = store::messages(&mut conn, tenant.id, id).await?;
    Ok(Json(TicketDetail { ticket, messages }))
}

/// Change a ticket's status, priority, assignee or category. Illegal status moves are a 409.
/// Solving a ticket tells the customer (template `ticket_solved`, then the `csat_survey`) and
/// frees the agent's capacity for waiting tickets.
#[utoipa::path(patch, path = "/v1/tickets/{id}", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Ticket id")), request_body = TicketPatch,
    responses((status = 200, body = TicketDetail), (status = 404, response = ProblemResponse),
              (status = 409, description = "Illegal status transition", body = Problem, content_type = "application/problem+json"),
              (status = 422, response = ProblemResponse)))]
async fn update_ticket(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ValidJson(body): ValidJson<TicketPatch>,
) -> ApiResult<Json<TicketDetail>> {
    let (state, tenant, body) = (&state, &tenant, &body);
    crate::http::retry::retry_conflicts(move || async move {
        let mut tx = crate::db::begin(&state.pool).await?;
        store::lock_desk(&mut tx, tenant.id).await?;
        let ticket = store::lock_ticket(&mut tx, tenant.id, id)
            .await?
            .ok_or_else(|| ticket_not_found(id))?;
        if let Patch::Value(agent) = body.assignee_id {
            if store::get_agent(&mut tx, tenant.id, agent).await?.is_none() {
                return Err(ApiError::field(
                    "assignee_id",
                    format!("no agent with id {agent}"),
                ));
            }
        }
        let category = match &body.category {
            Patch::Value(c) => {
                Patch::Value(validate::text(c, 100).map_err(|m| ApiError::field("category", m))?)
            }
            other => other.clone(),
        };
        if let Some(next) = body.status {
            store::change_status(&mut tx, tenant.id, &ticket, next).await?;
        }
        let (set_assignee, assignee) = match body.assignee_id {
            Patch::Missing => (false, None),
            Patch::Null => (true, None),
            Patch::Value(a) => (true, Some(a)),
        };
        let (set_category, category) = match category {
            Patch::Missing => (false, None),
            Patch::Null => (true, None),
            Patch::Value(c) => (true, Some(c)),
        };
        store::update_ticket_fields(
            &mut tx,
            tenant.id,
            id,
            body.priority.map(|p| p.as_str()),
            set_assignee.then_some(assignee),
            set_category.then_some(category.as_deref()),
        )
        .await?;
        if set_assignee && assignee != ticket.assignee_id {
            events::emit_about(
                &mut tx,
                tenant.id,
                ticket.contact_id,
                kinds::TICKET_ASSIGNED,
                json!({"ticket_id": id, "agent_id": assignee, "automatic": false}),
                Some(("ticket", id)),
            )
            .await?;
        }
        let updated = store::get_ticket(&mut tx, tenant.id, id)
            .await?
            .ok_or_else(|| ticket_not_found(id))?;
        if body.status == Some(Status::Solved) && ticket.status != Status::Solved {
            notify_customer(state, &mut tx, tenant, &updated, "ticket_solved", json!({})).await?;
            let signer = state.links.get(&state.pool).await?;
            let url = crate::messages::links::survey_url(
                signer,
                state.config.public_url.trim_end_matches('/'),
                tenant.id,
                id,
            );
            notify_customer(
                state,
                &mut tx,
                tenant,
                &updated,
                "csat_survey",
                json!({"survey_url": url}),
            )
            .await?;
        }
        if !updated.status.is_open() || updated.assignee_id.is_none() {
            store::assign_waiting(&mut tx, tenant).await?;
        }
        let updated = store::get_ticket(&mut tx, tenant.id, id)
            .await?
            .ok_or_else(|| ticket_not_found(id))?;
        let messages = store::messages(&mut tx, tenant.id, id).await?;
        tx.commit().await?;
        Ok(Json(TicketDetail {
            ticket: updated,
            messages,
        }))
    })
    .await
}

/// Add a message: an agent's reply or internal note, or the customer's reply. An agent's
/// public reply is sent to the customer in the `ticket_reply` template, in the same
/// transaction (its `delivery` shows the outbox message); an email reply threads after the
/// ticket's earlier mails and quotes the conversation. The first public agent reply sets
/// `first_response_at`; a customer reply reopens a pending or solved ticket. An agent may
/// write a `snippet` (with `vars`) instead of a `body`.
#[utoipa::path(post, path = "/v1/tickets/{id}/messages", tag = "support", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Ticket id")), request_body = NewTicketMessage,
    responses((status = 201, body = TicketMessage), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn add_message(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ValidJson(body): ValidJson<NewTicketMessage>,
) -> ApiResult<(StatusCode, Json<TicketMessage>)> {
    let raw = match (&body.body, &body.snippet, &body.author) {
        (Some(text), None, _) => text.clone(),
        (None, Some(key), Author::Agent { agent_id }) => {
            if body.internal {
                return Err(ApiError::field(
                    "snippet",
                    "snippets are for replies; write an internal note as a body",
                ));
            }
            // Rendered before the transaction: no tenant template runs while a connection
            // is held.
            let vars = body.vars.clone().unwrap_or_else(|| json!({}));
            render_snippet_for(&state, &tenant, key, id, Some(*agent_id), vars)
                .await
                .map_err(|e| match e {
                    ApiError::NotFound(m) if m.starts_with("no snippet") => {
                        ApiError::field("snippet", m)
                    }
                    e => e,
                })?
        }
        (None, Some(_), Author::Contact(_)) => {
            return Err(ApiError::field(
                "snippet",
                "only agents write from snippets",
            ));
        }
        (Some(_), Some(_), _) => {
            return Err(ApiError::field(
                "snippet",
                "give a body or a snippet, not both",
            ));
        }
        (None, None, _) => return Err(ApiError::field("body", "is required")),
    };
    if body.vars.is_some() && body.snippet.is_none() {
        return Err(ApiError::field("vars", "only a snippet takes vars"));
    }
    let text = validate::text(&raw, 100_000).map_err(|m| ApiError::field("body", m))?;
    let opts = state.send_options().await?;
    let text = &text;
    let opts = &opts;
    let (state, tenant, body) = (&state, &tenant, &body);
    crate::http::retry::retry_conflicts(move || async move {
        let mut tx = crate::db::begin(&state.pool).await?;
        if matches!(body.author, Author::Contact(_)) {
            // The customer's message may reopen the ticket and assign it: the desk lock before
            // the ticket, as every transaction that may assign (an agent's reply never assigns).
            store::lock_desk(&mut tx, tenant.id).await?;
        }
        let ticket = store::lock_ticket(&mut tx, tenant.id, id)
            .await?
            .ok_or_else(|| ticket_not_found(id))?;
        let status = ticket.status;
        if status == Status::Closed {
            return Err(ApiError::Conflict(
                "the ticket is closed; open a new one".to_owned(),
            ));
        }
        let message = match body.author {
            Author::Agent { agent_id } => {
                let agent = store::get_agent(&mut tx, tenant.id, agent_id)
                    .await?
                    .ok_or_else(|| {
                        ApiError::field("author.agent_id", format!("no agent with id {agent_id}"))
                    })?;
                let mut m = store::insert_message(
                    &mut tx,
                    tenant.id,
                    id,
                    MessageAuthor::Agent,
                    Some(agent_id),
                    text,
                    body.internal,
                )
                .await?;
                if !body.internal {
                    store::mark_first_response(&mut tx, tenant.id, id).await?;
                    if status == Status::New {
                        store::change_status(&mut tx, tenant.id, &ticket, Status::Open).await?;
                    }
                    events::emit_about(
                        &mut tx,
                        tenant.id,
                        ticket.contact_id,
                        kinds::TICKET_REPLIED,
                        json!({"ticket_id": id, "agent_id": agent_id}),
                        Some(("ticket", id)),
                    )
                    .await?;
                    let history = store::reply_history(&mut tx, tenant.id, id, m.id, 3).await?;
                    let vars = json!({
                        "reply": text,
                        "agent": {"id": agent.id, "name": agent.name},
                        "history": quoted_history(&history, &tenant.timezone),
                    });
                    let sent = super::notify::customer(
                        &mut tx,
                        tenant,
                        &ticket,
                        "ticket_reply",
                        vars,
                        opts,
                    )
                    .await?;
                    if let Some(sent) = sent {
                        store::set_delivery(&mut tx, tenant.id, m.id, sent.id).await?;
                        m.delivery = Some(sqlx::types::Json(Delivery {
                            message_id: sent.id,
                            status: sent.status,
                            status_reason: sent.status_reason,
                            channel: sent.channel,
                            to: sent.recipient,
                        }));
                    }
                }
                m
            }
            Author::Contact(_) => {
                if body.internal {
                    return Err(ApiError::field(
                        "internal",
                        "only agents write internal notes",
                    ));
                }
                let m = store::insert_message(
                    &mut tx,
                    tenant.id,
                    id,
                    MessageAuthor::Contact,
                    None,
                    text,
                    false,
                )
                .await?;
                if matches!(status, Status::Pending | Status::Solved) {
                    store::change_status(&mut tx, tenant.id, &ticket, Status::Open).await?;
                    if ticket.assignee_id.is_none() {
                        store::assign(&mut tx, tenant, id).await?;
                    }
                }
                m
            }
        };
        tx.commit().await?;
        Ok((StatusCode::CREATED, Json(message)))
    })
    .await
}

/// The conversation a reply quotes, newest first: who, when (in the tenant's time zone), and
/// the text with each line behind `> `.
fn quoted_history(
    history: &[(String, chrono::DateTime<chrono::Utc>, String)],
    timezone: &str,
) -> serde_json::Value {
    let zone = timezone.parse::<chrono_tz::Tz>().unwrap_or(chrono_tz::UTC);
    history
        .iter()
        .map(|(who, at, body)| {
            let quoted: Vec<String> = body
                .lines()
                .map(|l| {
                    if l.is_empty() {
                        ">".to_owned()
                    } else {
                        format!("> {l}")
                    }
                })
                .collect();
            json!({
                "author": who,
                "at": at.with_timezone(&zone).format("%Y-%m-%d %H:%M").to_string(),
                "body": body,
                "quoted": quoted.join("\n"),
            })
        })
        .collect()
}

/// The tenant's settings.
#[utoipa::path(get, path = "/v1/settings", tag = "support", security(("api_key" = [])),
    responses((status = 200, body = TenantSettings)))]
async fn get_settings(
    tenant: TenantContext,
    State(state): State<AppState>,
) -> ApiResult<Json<TenantSettings>> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(store::settings(&mut conn, tenant.id).await?))
}

/// Replace the tenant's settings.
#[utoipa::path(put, path = "/v1/settings", tag = "support", security(("api_key" = [])),
    request_body = TenantSettings,
    responses((status = 200, body = TenantSettings), (status = 422, response = ProblemResponse)))]
async fn put_settings(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<TenantSettings>,
) -> ApiResult<Json<TenantSettings>> {
    body.validate()?;
    let mut conn = state.pool.acquire().await?;
    store::save_settings(&mut conn, tenant.id, &body).await?;
    Ok(Json(body))
}

fn snippet_not_found(key: &str) -> ApiError {
    ApiError::NotFound(format!("no snippet with key `{key}`"))
}

/// Create or replace a snippet; a syntax error is a 422.
#[utoipa::path(put, path = "/v1/snippets/{key}", tag = "support", security(("api_key" = [])),
    params(("key" = String, Path, description = "Snippet key")), request_body = SnippetInput,
    responses((status = 201, body = Snippet), (status = 200, body = Snippet),
              (status = 422, response = ProblemResponse)))]
async fn put_snippet(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ValidJson(body): ValidJson<SnippetInput>,
) -> ApiResult<(StatusCode, Json<Snippet>)> {
    validate_key(&key).map_err(|m| ApiError::field("key", m))?;
    crate::validate::text(&body.body, 20_000).map_err(|m| ApiError::field("body", m))?;
    render::check_syntax(&body.body).map_err(|m| ApiError::field("body", m))?;
    let mut conn = state.pool.acquire().await?;
    let (snippet, created) = store::put_snippet(
        &mut conn,
        tenant.id,
        &key,
        body.title.as_deref(),
        &body.body,
    )
    .await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(snippet),
    ))
}

/// Get a snippet.
#[utoipa::path(get, path = "/v1/snippets/{key}", tag = "support", security(("api_key" = [])),
    params(("key" = String, Path, description = "Snippet key")),
    responses((status = 200, body = Snippet), (status = 404, response = ProblemResponse)))]
async fn get_snippet(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
) -> ApiResult<Json<Snippet>> {
    let mut conn = state.pool.acquire().await?;
    let snippet = store::get_snippet(&mut conn, tenant.id, &key).await?;
    Ok(Json(snippet.ok_or_else(|| snippet_not_found(&key))?))
}

/// List snippets by key.
#[utoipa::path(get, path = "/v1/snippets", tag = "support", security(("api_key" = [])), params(PageParams),
    responses((status = 200, body = Page<Snippet>)))]
async fn list_snippets(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Snippet>>> {
    let limit = page.limit()?;
    let after = page.cursor.as_deref().map(decode_key_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list_snippets(&mut conn, tenant.id, after.as_deref(), limit + 1).await?;
    Ok(Json(paginate(rows, limit, |s| encode_key_cursor(&s.key))))
}

/// Render a snippet for a ticket, with `contact`, `ticket`, `agent` (the assignee) and
/// `tenant`; a missing variable is a 422, never a blank.
#[utoipa::path(post, path = "/v1/snippets/{key}/render", tag = "support", security(("api_key" = [])),
    params(("key" = String, Path, description = "Snippet key")), request_body = RenderSnippet,
    responses((status = 200, body = RenderedSnippet), (status = 404, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn render_snippet(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ValidJson(body): ValidJson<RenderSnippet>,
) -> ApiResult<Json<RenderedSnippet>> {
    let text = render_snippet_for(&state, &tenant, &key, body.ticket_id, None, json!({}))
        .await
        .map_err(|e| match e {
            ApiError::NotFound(m) if m.starts_with("no ticket") => ApiError::field("ticket_id", m),
            e => e,
        })?;
    Ok(Json(RenderedSnippet { text }))
}

/// A snippet rendered for a ticket, as `agent` (else the ticket's assignee) would send it: it
/// sees `contact`, `ticket`, `agent`, `tenant` and `vars`. The template runs with no database
/// connection held.
async fn render_snippet_for(
    state: &AppState,
    tenant: &TenantContext,
    key: &str,
    ticket_id: Uuid,
    agent: Option<Uuid>,
    vars: serde_json::Value,
) -> ApiResult<String> {
    let mut conn = state.pool.acquire().await?;
    let snippet = store::get_snippet(&mut conn, tenant.id, key)
        .await?
        .ok_or_else(|| snippet_not_found(key))?;
    let ticket = store::get_ticket(&mut conn, tenant.id, ticket_id)
        .await?
        .ok_or_else(|| ticket_not_found(ticket_id))?;
    let contact = contacts::get(&mut conn, tenant.id, ticket.contact_id).await?;
    let tenant_row = tenants::get(&mut conn, tenant.id.0)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("authenticated tenant is missing")))?;
    let agent = match agent.or(ticket.assignee_id) {
        Some(a) => store::get_agent(&mut conn, tenant.id, a).await?,
        None => None,
    };
    let mut ctx = render::context(contact.as_ref(), &tenant_row, None, &vars);
    ctx["ticket"] = serde_json::to_value(&ticket).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(agent) = agent {
        ctx["agent"] = serde_json::to_value(&agent).map_err(|e| ApiError::Internal(e.into()))?;
    }
    drop(conn);
    state
        .sandbox
        .render_text("snippet.txt", &snippet.body, &ctx, "body")
        .await
        .map_err(|e| render_problem(e, "snippet."))
}

/// The contact card for a screen-pop: the contact, open tickets, last interactions, last CSAT.
#[utoipa::path(get, path = "/v1/contacts/lookup", tag = "contacts",
    security(("api_key" = [])),
    params(LookupParams),
    responses((status = 200, body = ContactCard), (status = 404, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn lookup(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<LookupParams>,
) -> ApiResult<Json<ContactCard>> {
    let phone = validate::phone(&params.phone, Some(&tenant.default_country))
        .map_err(|m| ApiError::field("phone", m))?;
    let mut conn = state.pool.acquire().await?;
    let card = store::card(&mut conn, tenant.id, CardOf::Phone(&phone))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no contact has the phone number {phone}")))?;
    Ok(Json(card))
}
