//! Ratings: recorded with the ticket, agent, channel and country they are about, as a
//! `csat.rated` event, and with an alert to the agent when the score is low.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::ContactRef;
use crate::domain::TenantId;
use crate::error::{StoreError, StoreResult};
use crate::events::store as events;
use crate::messages::store as messages;

/// The score at or below which the agent is alerted, unless the tenant sets
/// `settings.csat_alert_threshold`.
pub const DEFAULT_ALERT_THRESHOLD: i16 = 2;

/// A satisfaction rating, 1 to 5.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Rating {
    pub id: Uuid,
    pub contact_id: Uuid,
    pub ticket_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub score: i16,
    pub comment: Option<String>,
    /// `survey` for Rapport's page, else what the sender says.
    pub source: String,
    pub channel: Option<String>,
    pub country: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/csat`: a rating from an outside tool.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRating {
    pub ticket_id: Option<Uuid>,
    pub contact: ContactRef,
    /// Defaults to the ticket's assignee.
    pub agent_id: Option<Uuid>,
    #[schema(minimum = 1, maximum = 5)]
    pub score: i16,
    pub comment: Option<String>,
    /// Where the rating comes from (`delighted`, `typeform`...).
    #[schema(example = "typeform")]
    pub source: String,
}

/// What a rating is about, resolved.
pub struct RatingRow<'a> {
    pub contact_id: Uuid,
    pub ticket_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub score: i16,
    pub comment: Option<&'a str>,
    pub source: &'a str,
    pub channel: Option<&'a str>,
}

/// How long a survey's low-score alert waits for the customer's comment, unless the tenant
/// sets `settings.csat_alert_delay_secs`.
pub const DEFAULT_ALERT_DELAY_SECS: i32 = 120;

/// Records a rating (the contact's country at this moment is kept with it), emits `csat.rated`
/// and alerts the agent when the score is at or below the tenant's threshold: at once when the
/// rating comes with its comment or from an outside tool, else after a short wait for the
/// comment the survey page asks for next ([`add_comment`]). A second survey score for one
/// ticket is a 409.
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    r: &RatingRow<'_>,
    max_attempts: i32,
) -> StoreResult<Rating> {
    if !(1..=5).contains(&r.score) {
        return Err(StoreError::field("score", "must be 1 to 5"));
    }
    let rating = sqlx::query_as!(
        Rating,
        "INSERT INTO ratings (tenant_id, id, contact_id, ticket_id, agent_id, score, comment,
            source, channel, country)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, c.country
         FROM contacts c WHERE c.tenant_id = $1 AND c.id = $3
         RETURNING id, contact_id, ticket_id, agent_id, score, comment, source, channel, country,
                   created_at",
        tenant.0,
        Uuid::now_v7(),
        r.contact_id,
        r.ticket_id,
        r.agent_id,
        r.score,
        r.comment,
        r.source,
        r.channel
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| {
        if crate::db::is_unique_violation(&e, Some("ratings_one_survey_per_ticket")) {
            StoreError::Conflict("this ticket has already been rated".to_owned())
        } else {
            e.into()
        }
    })?;
    let rating = rating.ok_or_else(|| StoreError::field("contact", "no such contact"))?;
    let settings = sqlx::query!(
        r#"SELECT coalesce((settings->>'csat_alert_threshold')::smallint, $2) AS "threshold!",
                  coalesce((settings->>'csat_alert_delay_secs')::int, $3) AS "delay!"
           FROM tenants WHERE id = $1"#,
        tenant.0,
        DEFAULT_ALERT_THRESHOLD,
        DEFAULT_ALERT_DELAY_SECS
    )
    .fetch_one(&mut *conn)
    .await?;
    let low = rating.score <= settings.threshold;
    events::emit_about(conn, tenant, rating.contact_id, "csat.rated",
        json!({"rating_id": rating.id, "score": rating.score, "ticket_id": rating.ticket_id,
               "agent_id": rating.agent_id, "source": rating.source, "low": low, "comment": rating.comment}),
        rating.ticket_id.map(|t| ("ticket", t))).await?;
    if let (true, Some(agent)) = (low, rating.agent_id) {
        let wait = rating.comment.is_none() && rating.source == "survey";
        let delay = if wait {
            Duration::from_secs(u64::try_from(settings.delay).unwrap_or(0))
        } else {
            Duration::ZERO
        };
        let alert = alert_agent(
            conn,
            tenant,
            agent,
            "csat_low_rating_alert",
            &rating,
            max_attempts,
            delay,
        )
        .await?;
        if let Some(message) = alert {
            sqlx::query!(
                "UPDATE ratings SET alert_message_id = $3 WHERE tenant_id = $1 AND id = $2",
                tenant.0,
                rating.id,
                message
            )
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(rating)
}

/// Queues `template` (the low-score alert, or the news of a late comment) to the agent, in
/// the agent's language, due after `delay`.
async fn alert_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    agent: Uuid,
    template: &str,
    rating: &Rating,
    max_attempts: i32,
    delay: Duration,
) -> StoreResult<Option<Uuid>> {
    let vars = alert_vars(conn, tenant, rating).await?;
    let alert = messages::ToAgent {
        agent_id: agent,
        about: rating.contact_id,
        template_key: template,
        vars,
        delay,
    };
    let queued = messages::enqueue_template_to_agent(conn, tenant, alert, max_attempts).await;
    Ok(messages::best_effort(queued, tenant, "an alert to the agent")?.flatten())
}

/// What an alert about a rating says: the rating, who gave it, about which ticket.
async fn alert_vars(
    conn: &mut PgConnection,
    tenant: TenantId,
    rating: &Rating,
) -> StoreResult<serde_json::Value> {
    let about = sqlx::query!(
        r#"SELECT coalesce(nullif(trim(concat_ws(' ', c.first_name, c.last_name)), ''), c.email,
                           c.phone, c.external_id, '?') AS "who!",
                  t.number AS "number?", t.subject AS "subject?"
           FROM contacts c LEFT JOIN tickets t ON t.tenant_id = c.tenant_id AND t.id = $3
           WHERE c.tenant_id = $1 AND c.id = $2"#,
        tenant.0,
        rating.contact_id,
        rating.ticket_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    let (who, ticket) = match about {
        Some(a) => (
            a.who,
            a.number.map(|n| json!({"number": n, "subject": a.subject})),
        ),
        None => ("?".to_owned(), None),
    };
    Ok(json!({
        "rating": {"score": rating.score, "comment": rating.comment},
        "customer": who,
        "ticket": ticket,
    }))
}

/// What became of a comment given after the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommentOutcome {
    /// No survey rating to add it to.
    NoRating,
    /// Kept with the rating; no alert was waiting for it.
    Recorded,
    /// Kept, and folded into the low-score alert, which now goes out at once.
    InAlert,
    /// Kept; the alert had gone out, so the comment is an internal note on the ticket and the
    /// agent is told.
    AfterAlert,
}

/// Adds (or replaces) the comment of a survey rating given earlier. A low score's alert still
/// waiting for it takes it and goes out at once; an alert already sent is followed by the
/// `csat_late_comment` email to the agent and an internal note on the ticket, in the tenant's
/// language.
pub async fn add_comment(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
    comment: &str,
    max_attempts: i32,
) -> StoreResult<CommentOutcome> {
    let row = sqlx::query!(
        r#"UPDATE ratings SET comment = $3
           WHERE tenant_id = $1 AND ticket_id = $2 AND source = 'survey'
           RETURNING id, contact_id, ticket_id, agent_id, score, comment, source, channel, country,
                     created_at, alert_message_id"#,
        tenant.0,
        ticket,
        comment
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(CommentOutcome::NoRating);
    };
    let Some(alert) = row.alert_message_id else {
        return Ok(CommentOutcome::Recorded);
    };
    if messages::amend_unsent(conn, tenant, alert, &["rating", "comment"], &json!(comment)).await? {
        return Ok(CommentOutcome::InAlert);
    }
    let rating = Rating {
        id: row.id,
        contact_id: row.contact_id,
        ticket_id: row.ticket_id,
        agent_id: row.agent_id,
        score: row.score,
        comment: row.comment,
        source: row.source,
        channel: row.channel,
        country: row.country,
        created_at: row.created_at,
    };
    let locale: String =
        sqlx::query_scalar!("SELECT default_locale FROM tenants WHERE id = $1", tenant.0)
            .fetch_one(&mut *conn)
            .await?;
    let note = crate::support::notes::late_rating_comment(&locale, rating.score, comment);
    crate::support::store::insert_message(
        conn,
        tenant,
        ticket,
        crate::support::model::MessageAuthor::System,
        None,
        &note,
        true,
    )
    .await?;
    if let Some(agent) = rating.agent_id {
        alert_agent(
            conn,
            tenant,
            agent,
            "csat_late_comment",
            &rating,
            max_attempts,
            Duration::ZERO,
        )
        .await?;
    }
    Ok(CommentOutcome::AfterAlert)
}

/// The survey rating of a ticket, if given.
pub async fn survey_rating(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
) -> StoreResult<Option<Rating>> {
    Ok(sqlx::query_as!(
        Rating,
        "SELECT id, contact_id, ticket_id, agent_id, score, comment, source, channel, country,
                created_at
         FROM ratings WHERE tenant_id = $1 AND ticket_id = $2 AND source = 'survey'",
        tenant.0,
        ticket
    )
    .fetch_optional(conn)
    .await?)
}

/// The contact's latest score.
pub async fn last_score(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> StoreResult<Option<i16>> {
    Ok(sqlx::query_scalar!(
        "SELECT score FROM ratings WHERE tenant_id = $1 AND contact_id = $2
         ORDER BY created_at DESC, id DESC LIMIT 1",
        tenant.0,
        contact
    )
    .fetch_optional(conn)
    .await?)
}

/// Erasure: the contact's ratings keep their score (for reports) and lose their comment.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE ratings SET comment = NULL WHERE tenant_id = $1 AND contact_id = $2",
        tenant.0,
        contact
    )
    .execute(conn)
    .await?;
    Ok(())
}
