//! SQL for agents and tickets, and automatic assignment.
//!
//! Assignment is exact under concurrency: the candidate agents' rows are locked (in id order,
//! so concurrent assignments cannot deadlock) before their open tickets are counted, so two
//! tickets created at once cannot both take an agent's last free slot.

use serde_json::json;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use chrono::{DateTime, Utc};

use super::model::{
    Agent, AgentChanges, AttachmentRef, ContactCard, Delivery, MessageAuthor, OPEN_TICKET_STATUSES,
    Snippet, Status, TenantSettings, Ticket, TicketMessage, open_ticket_statuses,
};
use crate::contacts::model::Contact;
use crate::contacts::store as contacts;
use crate::domain::Patch;
use crate::domain::kinds;
use crate::domain::{TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};
use crate::events::model::Event;
use crate::events::store as events;

/// Which contact a card is of.
#[derive(Debug, Clone, Copy)]
pub enum CardOf<'a> {
    /// The most recently updated live contact with this E.164 number (a screen-pop).
    Phone(&'a str),
    Contact(Uuid),
}

/// The contact card: the contact, its open tickets, its last ten events and its last CSAT
/// score, in one statement (one round trip: the screen-pop is read while the phone rings).
/// It reads `contacts`, `events` and `ratings` too: the one read model agents see a customer by.
pub async fn card(
    conn: &mut PgConnection,
    tenant: TenantId,
    of: CardOf<'_>,
) -> StoreResult<Option<ContactCard>> {
    let contact_columns = contacts::CONTACT_COLUMNS;
    let event_columns = events::EVENT_COLUMNS;
    let (condition, key) = match of {
        CardOf::Phone(phone) => ("c.phone = $2", phone.to_owned()),
        CardOf::Contact(id) => ("c.id = $2::uuid", id.to_string()),
    };
    // The subqueries are the ones of the timeline (`events_timeline`), of the open tickets
    // (`tickets_by_contact`) and of the last rating (`ratings_by_contact`).
    let sql = format!(
        "SELECT {contact_columns},
            (SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.occurred_at DESC, x.id DESC),
                             '[]')
               FROM (SELECT {event_columns} FROM events
                      WHERE tenant_id = c.tenant_id AND contact_id = c.id
                      ORDER BY occurred_at DESC, id DESC LIMIT 10) x) AS last_interactions,
            (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY t.id DESC), '[]')
               FROM (SELECT {TICKET_COLUMNS} FROM tickets
                      WHERE tenant_id = c.tenant_id AND contact_id = c.id
                        AND status IN {OPEN_TICKET_STATUSES}
                      ORDER BY id DESC LIMIT 20) t) AS open_tickets,
            (SELECT r.score FROM ratings r WHERE r.tenant_id = c.tenant_id AND r.contact_id = c.id
              ORDER BY r.created_at DESC, r.id DESC LIMIT 1) AS last_csat
         FROM contacts c
         WHERE c.tenant_id = $1 AND {condition} AND c.erased_at IS NULL
         ORDER BY c.updated_at DESC, c.id DESC LIMIT 1"
    );
    let row: Option<CardRow> = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(key)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|r| ContactCard {
        owner_agent_id: r.contact.owner_agent_id,
        contact: r.contact,
        open_tickets: r.open_tickets.0,
        last_interactions: r.last_interactions.0,
        last_csat: r.last_csat,
    }))
}

/// A row of [`card`].
#[derive(sqlx::FromRow)]
struct CardRow {
    #[sqlx(flatten)]
    contact: Contact,
    last_interactions: Json<Vec<Event>>,
    open_tickets: Json<Vec<Ticket>>,
    last_csat: Option<i16>,
}

/// How many open tickets the contact has.
pub async fn count_open_tickets(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT count(*) FROM tickets WHERE tenant_id = $1 AND contact_id = $2 AND status IN ",
        open_ticket_statuses!(),
    ))
    .bind(tenant)
    .bind(contact)
    .fetch_one(conn)
    .await?)
}

/// Which of these contacts have an open ticket (marketing waits for them).
pub async fn with_open_tickets(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
) -> StoreResult<std::collections::HashSet<Uuid>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(concat!(
        "SELECT DISTINCT contact_id FROM tickets
         WHERE tenant_id = $1 AND contact_id = ANY($2) AND status IN ",
        open_ticket_statuses!(),
    ))
    .bind(tenant)
    .bind(contacts)
    .fetch_all(conn)
    .await?;
    Ok(ids.into_iter().collect())
}

/// An agent as the API shows it, with its open-ticket count. Runtime SQL (not `query_as!`):
/// the list is shared by the agent reads and carries the open-status list, which the query
/// macros cannot take from a macro.
const AGENT_COLUMNS: &str = concat!(
    "a.id, a.name, a.email, a.phone, a.languages, a.countries,
    a.max_open_tickets, a.active,
    (SELECT count(*) FROM tickets t WHERE t.tenant_id = a.tenant_id AND t.assignee_id = a.id
       AND t.status IN ",
    open_ticket_statuses!(),
    ") AS open_tickets,
    a.created_at, a.updated_at"
);

/// A ticket's columns, shared by the ticket reads and the contact card's JSON of open tickets
/// (so both show the same fields): runtime SQL, as the query macros take literals only.
pub(crate) const TICKET_COLUMNS: &str =
    "id, number, contact_id, channel, subject, category, priority, status,
    assignee_id, first_response_at, solved_at, closed_at, created_at, updated_at,
    follows_ticket_id";

fn email_taken(e: sqlx::Error) -> StoreError {
    if crate::db::is_unique_violation(&e, Some("agents_email_unique")) {
        StoreError::Conflict("an agent with this email exists".to_owned())
    } else {
        e.into()
    }
}

pub async fn create_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    a: &AgentChanges,
) -> StoreResult<Agent> {
    let id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO agents (tenant_id, id, name, email, phone, languages, countries, max_open_tickets, active)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        tenant.0,
        id,
        a.name.as_deref(),
        a.email.as_deref(),
        a.phone.apply(None),
        a.languages.as_deref().unwrap_or_default(),
        a.countries.as_deref().unwrap_or_default(),
        a.max_open_tickets.unwrap_or(20),
        a.active.unwrap_or(true),
    )
    .execute(&mut *conn)
    .await
    .map_err(email_taken)?;
    get_agent(conn, tenant, id)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("agent vanished")))
}

pub async fn update_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    a: &AgentChanges,
) -> StoreResult<Option<Agent>> {
    let (set_phone, phone) = match &a.phone {
        Patch::Missing => (false, None),
        Patch::Null => (true, None),
        Patch::Value(p) => (true, Some(p.clone())),
    };
    let done = sqlx::query!(
        "UPDATE agents SET name = coalesce($3, name), email = coalesce($4, email),
            phone = CASE WHEN $5 THEN $6 ELSE phone END,
            languages = coalesce($7, languages), countries = coalesce($8, countries),
            max_open_tickets = coalesce($9, max_open_tickets), active = coalesce($10, active),
            updated_at = now()
         WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        id,
        a.name.as_deref(),
        a.email.as_deref(),
        set_phone,
        phone,
        a.languages.as_deref(),
        a.countries.as_deref(),
        a.max_open_tickets,
        a.active,
    )
    .execute(&mut *conn)
    .await
    .map_err(email_taken)?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    get_agent(conn, tenant, id).await
}

pub async fn get_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Agent>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents a WHERE a.tenant_id = $1 AND a.id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

pub async fn list_agents(
    conn: &mut PgConnection,
    tenant: TenantId,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Agent>> {
    let sql = format!(
        "SELECT {AGENT_COLUMNS} FROM agents a WHERE a.tenant_id = $1 AND ($2::uuid IS NULL OR a.id < $2)
         ORDER BY a.id DESC LIMIT $3"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?)
}

/// Takes the tenant's desk lock (a transaction-scoped advisory lock), which every
/// transaction that may assign tickets takes before any lock on an agent row (an assignment's
/// `last_assigned_at`, an agent's own update) and before the ticket counter or a ticket it
/// will reopen and reassign: [`assign`] and [`create_ticket`] take it themselves, and the
/// handlers and intakes that lock rows first take it at their start. Such transactions then
/// queue for it instead of deadlocking (seen: two ticket updates, each holding the candidates
/// of its first waiting ticket while locking those of its second; a campaign round holding the
/// ticket counter and one agent while a helpdesk request held another and wanted the
/// counter), and assignments see every agent's load without a race. One lock, whatever the
/// number of agents (locking every agent row wrote each row's header: a thousand rows for
/// each ticket of a large call centre). Rows that refer to an agent (a ticket's assignee, a
/// call's agent) are written freely meanwhile. Taking it again in the same transaction waits
/// for nothing.
pub async fn lock_desk(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::text))")
        .bind(DESK_LOCK_CLASS)
        .bind(tenant.0.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// The first key of the desks' advisory locks (the second is a hash of the tenant's id).
const DESK_LOCK_CLASS: i32 = 7402;

/// Assigns an unassigned open ticket to the active agent who speaks the contact's language and
/// covers its country, with the fewest open tickets below capacity; ties go to the agent
/// assigned longest ago (round robin). None when nobody fits: the ticket waits in the queue.
pub async fn assign(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    ticket_id: Uuid,
) -> StoreResult<Option<Uuid>> {
    lock_desk(conn, tenant.id).await?;
    assign_locked(conn, tenant, ticket_id).await
}

/// [`assign`], in a transaction that holds [`lock_desk`] already.
async fn assign_locked(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    ticket_id: Uuid,
) -> StoreResult<Option<Uuid>> {
    let target: Option<(String, String, Uuid)> = sqlx::query_as(concat!(
        "SELECT coalesce(split_part(c.locale, '-', 1), ''), coalesce(c.country, ''), t.contact_id
         FROM tickets t JOIN contacts c ON c.tenant_id = t.tenant_id AND c.id = t.contact_id
         WHERE t.tenant_id = $1 AND t.id = $2 AND t.assignee_id IS NULL
           AND t.status IN ",
        open_ticket_statuses!(),
    ))
    .bind(tenant.id)
    .bind(ticket_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((language, country, contact_id)) = target else {
        return Ok(None);
    };
    let language = if language.is_empty() {
        tenant
            .default_locale
            .split('-')
            .next()
            .unwrap_or_default()
            .to_owned()
    } else {
        language
    };
    let country = if country.is_empty() {
        tenant.default_country.clone()
    } else {
        country
    };
    let candidates: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM agents
         WHERE tenant_id = $1 AND active
           AND (cardinality(languages) = 0 OR $2 = ANY(languages))
           AND (cardinality(countries) = 0 OR $3 = ANY(countries))
         ORDER BY id",
        tenant.id.0,
        &language,
        &country,
    )
    .fetch_all(&mut *conn)
    .await?;
    if candidates.is_empty() {
        return Ok(None);
    }
    let chosen: Option<Uuid> = sqlx::query_scalar(concat!(
        "SELECT a.id FROM agents a
         CROSS JOIN LATERAL (SELECT count(*) AS n FROM tickets t WHERE t.tenant_id = a.tenant_id
                             AND t.assignee_id = a.id AND t.status IN ",
        open_ticket_statuses!(),
        ") load
         WHERE a.tenant_id = $1 AND a.id = ANY($2) AND load.n < a.max_open_tickets
         ORDER BY load.n, a.last_assigned_at NULLS FIRST, a.id
         LIMIT 1",
    ))
    .bind(tenant.id)
    .bind(&candidates)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(agent) = chosen else {
        return Ok(None);
    };
    sqlx::query!(
        "UPDATE agents SET last_assigned_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2",
        tenant.id.0,
        agent,
    )
    .execute(&mut *conn)
    .await?;
    set_assignee(conn, tenant.id, ticket_id, contact_id, agent, true).await?;
    Ok(Some(agent))
}

/// Assigns a ticket (chosen by the desk, or by the caller whatever the agent's load) and puts
/// it on the contact's timeline.
async fn set_assignee(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket_id: Uuid,
    contact_id: Uuid,
    agent: Uuid,
    automatic: bool,
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE tickets SET assignee_id = $3, updated_at = now() WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        ticket_id,
        agent,
    )
    .execute(&mut *conn)
    .await?;
    events::emit_about(
        conn,
        tenant,
        contact_id,
        kinds::TICKET_ASSIGNED,
        json!({"ticket_id": ticket_id, "agent_id": agent, "automatic": automatic}),
        Some(("ticket", ticket_id)),
    )
    .await?;
    Ok(())
}

/// Assigns waiting tickets, oldest first, now that capacity may have freed or an agent joined.
pub async fn assign_waiting(conn: &mut PgConnection, tenant: &TenantContext) -> StoreResult<usize> {
    let waiting: Vec<Uuid> = sqlx::query_scalar(concat!(
        "SELECT id FROM tickets WHERE tenant_id = $1 AND assignee_id IS NULL
           AND status IN ",
        open_ticket_statuses!(),
        " ORDER BY created_at LIMIT 100",
    ))
    .bind(tenant.id)
    .fetch_all(&mut *conn)
    .await?;
    if waiting.is_empty() {
        return Ok(0);
    }
    lock_desk(conn, tenant.id).await?;
    let mut assigned = 0;
    for id in waiting {
        if assign_locked(conn, tenant, id).await?.is_some() {
            assigned += 1;
        }
    }
    Ok(assigned)
}

/// The next number of a per-tenant sequence.
async fn next_number(conn: &mut PgConnection, tenant: TenantId, name: &str) -> StoreResult<i64> {
    Ok(sqlx::query_scalar!(
        "INSERT INTO tenant_counters AS c (tenant_id, name, value) VALUES ($1, $2, 1)
         ON CONFLICT (tenant_id, name) DO UPDATE SET value = c.value + 1 RETURNING value",
        tenant.0,
        name,
    )
    .fetch_one(conn)
    .await?)
}

/// What a new ticket holds, validated.
pub struct NewTicketRow<'a> {
    pub contact_id: Uuid,
    pub channel: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub category: Option<&'a str>,
    pub priority: &'a str,
    /// Who wrote the first message: the customer, or Rapport (a call-back, a hand-over).
    pub author: MessageAuthor,
    /// An agent chosen by the caller (a campaign hands the contact to its advisor); None
    /// assigns automatically.
    pub assignee: Option<Uuid>,
}

/// Opens a ticket with the customer's first message, emits `ticket.created`, and assigns it.
pub async fn create_ticket(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    t: &NewTicketRow<'_>,
) -> StoreResult<Ticket> {
    // The desk lock before the counter, whether this ticket is assigned or not: the
    // transaction may assign another later (a campaign round hands several contacts over).
    lock_desk(conn, tenant.id).await?;
    let id = Uuid::now_v7();
    let number = next_number(conn, tenant.id, "ticket").await?;
    sqlx::query!(
        "INSERT INTO tickets (tenant_id, id, number, contact_id, channel, subject, category, priority, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'new')",
        tenant.id.0,
        id,
        number,
        t.contact_id,
        t.channel,
        t.subject,
        t.category,
        t.priority,
    )
    .execute(&mut *conn)
    .await?;
    insert_message(conn, tenant.id, id, t.author, None, t.body, false).await?;
    events::emit_about(
        conn,
        tenant.id,
        t.contact_id,
        kinds::TICKET_CREATED,
        json!({"ticket_id": id, "number": number, "channel": t.channel, "subject": t.subject,
               "priority": t.priority, "category": t.category}),
        Some(("ticket", id)),
    )
    .await?;
    match t.assignee {
        Some(agent) => set_assignee(conn, tenant.id, id, t.contact_id, agent, false).await?,
        None => {
            assign_locked(conn, tenant, id).await?;
        }
    }
    get_ticket(conn, tenant.id, id)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("ticket vanished")))
}

pub async fn insert_message(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
    author: MessageAuthor,
    agent_id: Option<Uuid>,
    body: &str,
    internal: bool,
) -> StoreResult<TicketMessage> {
    Ok(sqlx::query_as!(
        TicketMessage,
        r#"INSERT INTO ticket_messages (tenant_id, id, ticket_id, author, agent_id, body, internal)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING id, author AS "author: MessageAuthor", agent_id, body, internal, created_at,
                     NULL::jsonb AS "delivery: Json<Delivery>", inbound_id,
                     '[]'::jsonb AS "attachments!: Json<Vec<AttachmentRef>>""#,
        tenant.0,
        Uuid::now_v7(),
        ticket,
        author as MessageAuthor,
        agent_id,
        body,
        internal
    )
    .fetch_one(conn)
    .await?)
}

/// Records the inbound message a customer's ticket message came from: the given ticket
/// message, else the ticket's first (a ticket the message opened).
pub async fn set_inbound(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
    ticket_message: Option<Uuid>,
    inbound: Uuid,
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE ticket_messages SET inbound_id = $4
         WHERE tenant_id = $1 AND id = coalesce($3, (SELECT id FROM ticket_messages
                                                       WHERE tenant_id = $1 AND ticket_id = $2
                                                       ORDER BY id LIMIT 1))",
        tenant.0,
        ticket,
        ticket_message,
        inbound
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the outbox message that carries a ticket message to the customer.
pub async fn set_delivery(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket_message: Uuid,
    message: Uuid,
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE ticket_messages SET message_id = $3 WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        ticket_message,
        message
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The ticket's public conversation before `before`, newest first, for quoting in a reply:
/// who wrote each message (the contact's name or address, the agent's name), when, and what.
pub async fn reply_history(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
    before: Uuid,
    limit: i64,
) -> StoreResult<Vec<(String, DateTime<Utc>, String)>> {
    let rows = sqlx::query!(
        r#"SELECT coalesce(a.name, nullif(trim(concat_ws(' ', c.first_name, c.last_name)), ''),
                           c.email, c.phone, '?') AS "who!",
                  tm.created_at, tm.body
           FROM ticket_messages tm
           JOIN tickets t ON t.tenant_id = tm.tenant_id AND t.id = tm.ticket_id
           JOIN contacts c ON c.tenant_id = t.tenant_id AND c.id = t.contact_id
           LEFT JOIN agents a ON a.tenant_id = tm.tenant_id AND a.id = tm.agent_id
           WHERE tm.tenant_id = $1 AND tm.ticket_id = $2 AND tm.id < $3 AND NOT tm.internal
             AND tm.author IN ('contact', 'agent')
           ORDER BY tm.id DESC LIMIT $4"#,
        tenant.0,
        ticket,
        before,
        limit
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.who, r.created_at, r.body))
        .collect())
}

pub async fn get_ticket(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Ticket>> {
    let sql = format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE tenant_id = $1 AND id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// The ticket, locked for a change.
pub async fn lock_ticket(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Ticket>> {
    let sql =
        format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE tenant_id = $1 AND id = $2 FOR UPDATE");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// The contact's ticket with this number, if there is one.
/// Records that `ticket` was opened by a reply to `closed`, a closed ticket.
pub async fn set_follows(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
    closed: Uuid,
) -> StoreResult<()> {
    sqlx::query("UPDATE tickets SET follows_ticket_id = $3 WHERE tenant_id = $1 AND id = $2")
        .bind(tenant)
        .bind(ticket)
        .bind(closed)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn ticket_id_by_number(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    number: i64,
) -> StoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM tickets WHERE tenant_id = $1 AND contact_id = $2 AND number = $3",
    )
    .bind(tenant)
    .bind(contact)
    .bind(number)
    .fetch_optional(conn)
    .await?)
}

pub async fn messages(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
) -> StoreResult<Vec<TicketMessage>> {
    Ok(sqlx::query_as!(
        TicketMessage,
        r#"SELECT tm.id, tm.author AS "author: MessageAuthor", tm.agent_id, tm.body, tm.internal,
                  tm.created_at,
                  CASE WHEN m.id IS NULL THEN NULL ELSE jsonb_build_object(
                      'message_id', m.id, 'status', m.status, 'status_reason', m.status_reason,
                      'channel', m.channel, 'to', m.recipient) END AS "delivery: Json<Delivery>",
                  tm.inbound_id,
                  (SELECT COALESCE(jsonb_agg(jsonb_build_object('id', a.id,
                          'filename', a.filename, 'content_type', a.content_type, 'size', a.size,
                          'url', a.url, 'dropped', a.dropped) ORDER BY a.position), '[]')
                   FROM inbound_attachments a
                   WHERE a.tenant_id = tm.tenant_id AND a.inbound_id = tm.inbound_id)
                    AS "attachments!: Json<Vec<AttachmentRef>>"
           FROM ticket_messages tm
           LEFT JOIN messages m ON m.tenant_id = tm.tenant_id AND m.id = tm.message_id
           WHERE tm.tenant_id = $1 AND tm.ticket_id = $2 ORDER BY tm.created_at, tm.id"#,
        tenant.0,
        ticket
    )
    .fetch_all(conn)
    .await?)
}

/// Tickets newest first.
pub async fn list_tickets(
    conn: &mut PgConnection,
    tenant: TenantId,
    status: Option<Status>,
    assignee: Option<Uuid>,
    contact: Option<Uuid>,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Ticket>> {
    let sql = format!(
        "SELECT {TICKET_COLUMNS} FROM tickets WHERE tenant_id = $1
           AND ($2::text IS NULL OR status = $2) AND ($3::uuid IS NULL OR assignee_id = $3)
           AND ($4::uuid IS NULL OR contact_id = $4) AND ($5::uuid IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(status.map(Status::as_str))
        .bind(assignee)
        .bind(contact)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?)
}

/// Moves a locked ticket to `next`, stamping `solved_at`/`closed_at`, with its events.
/// Illegal moves are a 409.
pub async fn change_status(
    conn: &mut PgConnection,
    tenant: TenantId,
    t: &Ticket,
    next: Status,
) -> StoreResult<()> {
    let current = t.status;
    if current == next {
        return Ok(());
    }
    if !current.can_become(next) {
        return Err(StoreError::Conflict(format!(
            "a {} ticket cannot become {}",
            current.as_str(),
            next.as_str()
        )));
    }
    sqlx::query!(
        "UPDATE tickets SET status = $3, updated_at = now(),
            solved_at = CASE WHEN $3 = 'solved' THEN now() WHEN $3 = 'open' THEN NULL ELSE solved_at END,
            closed_at = CASE WHEN $3 = 'closed' THEN now() ELSE closed_at END
         WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        t.id,
        next.as_str(),
    )
    .execute(&mut *conn)
    .await?;
    let kind = match (current, next) {
        (_, Status::Solved) => kinds::TICKET_SOLVED,
        (_, Status::Closed) => kinds::TICKET_CLOSED,
        (Status::Solved, Status::Open) => kinds::TICKET_REOPENED,
        _ => kinds::TICKET_STATUS_CHANGED,
    };
    events::emit_about(conn, tenant, t.contact_id, kind,
        json!({"ticket_id": t.id, "number": t.number, "from": current.as_str(), "to": next.as_str()}),
        Some(("ticket", t.id))).await?;
    Ok(())
}

/// Erasure: the contact's tickets keep their number, channel, status and times (for reports);
/// subjects and every message on them (the agents' too, which quote the customer) are blanked.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE ticket_messages m SET body = '(erased)'
         FROM tickets t
         WHERE m.tenant_id = $1 AND t.tenant_id = $1 AND t.contact_id = $2 AND m.ticket_id = t.id",
        tenant.0,
        contact,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "UPDATE tickets SET subject = '(erased)', updated_at = now()
         WHERE tenant_id = $1 AND contact_id = $2",
        tenant.0,
        contact,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The tenant's support settings (defaults when never set).
pub async fn settings(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<TenantSettings> {
    let raw: serde_json::Value =
        sqlx::query_scalar!("SELECT settings FROM tenants WHERE id = $1", tenant.0,)
            .fetch_one(conn)
            .await?;
    Ok(serde_json::from_value(raw).unwrap_or_default())
}

/// Replaces the tenant's support settings.
pub async fn save_settings(
    conn: &mut PgConnection,
    tenant: TenantId,
    settings: &TenantSettings,
) -> StoreResult<()> {
    let value = serde_json::to_value(settings).map_err(|e| StoreError::Internal(e.into()))?;
    sqlx::query!(
        "UPDATE tenants SET settings = $2, updated_at = now() WHERE id = $1",
        tenant.0,
        value,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// tenant, ticket, contact, number, priority, assignee, target minutes.
type Breach = (
    TenantId,
    uuid::Uuid,
    uuid::Uuid,
    i64,
    String,
    Option<uuid::Uuid>,
    i32,
);

/// Stamps SLA breaches of open tickets (each kind once per ticket, so several workers cannot
/// report one twice) and emits `ticket.sla_breached`. The number of breaches found.
pub async fn check_sla(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    let mut found = 0;
    for (kind, stamp, done, target) in [
        (
            "first_response",
            "first_response_breached_at",
            "first_response_at",
            "first_response_mins",
        ),
        (
            "resolution",
            "resolution_breached_at",
            "solved_at",
            "resolution_mins",
        ),
    ] {
        let sql = format!(
            "UPDATE tickets tk SET {stamp} = now()
             FROM tenants tn
             WHERE tn.id = tk.tenant_id AND tk.status IN {OPEN_TICKET_STATUSES}
               AND tk.{stamp} IS NULL AND tk.{done} IS NULL
               AND (tn.settings->'sla'->tk.priority->>'{target}') IS NOT NULL
               AND tk.created_at + make_interval(mins => (tn.settings->'sla'->tk.priority->>'{target}')::int) < now()
             RETURNING tk.tenant_id, tk.id, tk.contact_id, tk.number, tk.priority, tk.assignee_id,
                       (tn.settings->'sla'->tk.priority->>'{target}')::int"
        );
        let rows: Vec<Breach> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?;
        for (tenant, id, contact, number, priority, agent, mins) in rows {
            events::emit_about(
                &mut tx,
                tenant,
                contact,
                kinds::TICKET_SLA_BREACHED,
                json!({"ticket_id": id, "number": number, "kind": kind, "priority": priority,
                       "target_mins": mins, "agent_id": agent}),
                Some(("ticket", id)),
            )
            .await?;
            found += 1;
        }
    }
    tx.commit().await?;
    Ok(found)
}

/// Creates or replaces a snippet; the snippet, and whether it is new.
pub async fn put_snippet(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
    title: Option<&str>,
    body: &str,
) -> StoreResult<(Snippet, bool)> {
    let row = sqlx::query!(
        r#"INSERT INTO snippets (tenant_id, key, title, body) VALUES ($1, $2, $3, $4)
           ON CONFLICT (tenant_id, key) DO UPDATE
              SET title = EXCLUDED.title, body = EXCLUDED.body, updated_at = now()
           RETURNING key, title, body, created_at, updated_at, (xmax = 0) AS "created!""#,
        tenant.0,
        key,
        title,
        body
    )
    .fetch_one(conn)
    .await?;
    let snippet = Snippet {
        key: row.key,
        title: row.title,
        body: row.body,
        created_at: row.created_at,
        updated_at: row.updated_at,
    };
    Ok((snippet, row.created))
}

/// One snippet by key.
pub async fn get_snippet(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
) -> StoreResult<Option<Snippet>> {
    Ok(sqlx::query_as!(
        Snippet,
        "SELECT key, title, body, created_at, updated_at FROM snippets
         WHERE tenant_id = $1 AND key = $2",
        tenant.0,
        key
    )
    .fetch_optional(conn)
    .await?)
}

/// Snippets by key, after `after`, at most `limit`.
pub async fn list_snippets(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&str>,
    limit: i64,
) -> StoreResult<Vec<Snippet>> {
    Ok(sqlx::query_as!(
        Snippet,
        "SELECT key, title, body, created_at, updated_at FROM snippets
         WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2) ORDER BY key LIMIT $3",
        tenant.0,
        after,
        limit
    )
    .fetch_all(conn)
    .await?)
}

/// The agent with this email (case-insensitive).
pub async fn agent_id_by_email(
    conn: &mut PgConnection,
    tenant: TenantId,
    email: &str,
) -> StoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM agents WHERE tenant_id = $1 AND lower(email) = lower($2)",
        tenant.0,
        email,
    )
    .fetch_optional(conn)
    .await?)
}

/// The contact's newest open ticket on `channel`, locked until the transaction ends.
pub async fn lock_open_ticket(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    channel: &str,
) -> StoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT id FROM tickets WHERE tenant_id = $1 AND contact_id = $2 AND channel = $3
           AND status IN ",
        open_ticket_statuses!(),
        " ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
    ))
    .bind(tenant)
    .bind(contact)
    .bind(channel)
    .fetch_optional(conn)
    .await?)
}

/// The contact's latest ticket on a channel, whatever its status, locked: where a message the
/// customer sends on that channel belongs.
pub async fn lock_latest_ticket(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    channel: &str,
) -> StoreResult<Option<Ticket>> {
    let id: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM tickets WHERE tenant_id = $1 AND contact_id = $2 AND channel = $3
         ORDER BY created_at DESC, id DESC LIMIT 1 FOR UPDATE",
    )
    .bind(tenant)
    .bind(contact)
    .bind(channel)
    .fetch_optional(&mut *conn)
    .await?;
    match id {
        Some(id) => get_ticket(conn, tenant, id).await,
        None => Ok(None),
    }
}

/// Sets a ticket's priority (when given), assignee and category (when `Some`, to the inner
/// value, `None` clearing it).
pub async fn update_ticket_fields(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    priority: Option<&str>,
    assignee: Option<Option<Uuid>>,
    category: Option<Option<&str>>,
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE tickets SET priority = coalesce($3, priority),
            assignee_id = CASE WHEN $4 THEN $5 ELSE assignee_id END,
            category = CASE WHEN $6 THEN $7 ELSE category END, updated_at = now()
         WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        id,
        priority,
        assignee.is_some(),
        assignee.flatten(),
        category.is_some(),
        category.flatten(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Stamps the first public answer of an agent (once).
pub async fn mark_first_response(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<()> {
    sqlx::query!(
        "UPDATE tickets SET first_response_at = coalesce(first_response_at, now()), updated_at = now()
         WHERE tenant_id = $1 AND id = $2",
        tenant.0,
        id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The agent, if it exists and is active.
pub async fn active_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM agents WHERE tenant_id = $1 AND id = $2 AND active",
        tenant.0,
        id,
    )
    .fetch_optional(conn)
    .await?)
}

/// The active agent whose turn it is in the round robin (assigned least recently).
pub async fn next_agent(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM agents WHERE tenant_id = $1 AND active
         ORDER BY last_assigned_at NULLS FIRST, id LIMIT 1",
        tenant.0,
    )
    .fetch_optional(conn)
    .await?)
}
