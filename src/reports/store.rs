//! The report queries. Group expressions come from a fixed list, never from request text.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;

use crate::domain::TenantId;
use crate::error::StoreResult;
use crate::support::model::OPEN_TICKET_STATUSES;

/// What a report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Agent,
    Country,
    Channel,
    Week,
}

impl GroupBy {
    /// The group of a ticket row `t` (with its contact `c`), at time column `at`.
    fn ticket_expr(self, at: &str) -> String {
        match self {
            GroupBy::Agent => "coalesce(t.assignee_id::text, 'unassigned')".to_owned(),
            GroupBy::Country => "coalesce(c.country, 'unknown')".to_owned(),
            GroupBy::Channel => "t.channel".to_owned(),
            GroupBy::Week => format!("to_char(date_trunc('week', t.{at}), 'YYYY-MM-DD')"),
        }
    }

    /// The group of a rating row `r`.
    fn rating_expr(self) -> &'static str {
        match self {
            GroupBy::Agent => "coalesce(r.agent_id::text, 'unassigned')",
            GroupBy::Country => "coalesce(r.country, 'unknown')",
            GroupBy::Channel => "coalesce(r.channel, 'unknown')",
            GroupBy::Week => "to_char(date_trunc('week', r.created_at), 'YYYY-MM-DD')",
        }
    }
}

/// One group of the CSAT report.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct CsatRow {
    /// The agent id, country, channel or week (its Monday).
    pub group: String,
    /// The agent's name when grouping by agent.
    pub label: Option<String>,
    pub count: i64,
    pub average: Option<f64>,
    /// Ratings of 1, 2, 3, 4 and 5.
    pub distribution: Vec<i64>,
    /// Share of 4 and 5, in percent.
    pub csat_percent: Option<f64>,
    /// Solved tickets rated through the survey, out of the tickets solved in the period.
    pub solved_tickets: i64,
    pub response_rate: Option<f64>,
}

/// One group of the support report. Durations are in seconds.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct SupportRow {
    pub group: String,
    pub label: Option<String>,
    /// Tickets created in the period.
    pub created: i64,
    /// Tickets solved in the period.
    pub solved: i64,
    pub first_response_median_secs: Option<f64>,
    pub first_response_p90_secs: Option<f64>,
    pub resolution_median_secs: Option<f64>,
    pub resolution_p90_secs: Option<f64>,
    /// Tickets still needing work now (for `week`: created that week).
    pub open_backlog: i64,
}

fn label_join(group: GroupBy, alias: &str) -> String {
    if group == GroupBy::Agent {
        format!("LEFT JOIN agents ag ON ag.tenant_id = $1 AND ag.id::text = {alias}.grp")
    } else {
        "LEFT JOIN (SELECT NULL::text AS name) ag ON true".to_owned()
    }
}

pub async fn csat(
    conn: &mut PgConnection,
    tenant: TenantId,
    group: GroupBy,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> StoreResult<Vec<CsatRow>> {
    let sql = format!(
        "WITH rated AS (
            SELECT {rg} AS grp, count(*) AS n, avg(r.score)::float8 AS average,
                   ARRAY[count(*) FILTER (WHERE r.score = 1), count(*) FILTER (WHERE r.score = 2),
                         count(*) FILTER (WHERE r.score = 3), count(*) FILTER (WHERE r.score = 4),
                         count(*) FILTER (WHERE r.score = 5)] AS distribution,
                   (100.0 * count(*) FILTER (WHERE r.score >= 4) / count(*))::float8 AS csat_percent
            FROM ratings r
            WHERE r.tenant_id = $1 AND r.created_at >= $2 AND r.created_at < $3
            GROUP BY 1),
         solved AS (
            SELECT {tg} AS grp, count(*) AS solved,
                   count(*) FILTER (WHERE EXISTS (SELECT 1 FROM ratings x WHERE x.tenant_id = t.tenant_id
                                    AND x.ticket_id = t.id AND x.source = 'survey')) AS answered
            FROM tickets t JOIN contacts c ON c.tenant_id = t.tenant_id AND c.id = t.contact_id
            WHERE t.tenant_id = $1 AND t.solved_at >= $2 AND t.solved_at < $3
            GROUP BY 1),
         joined AS (
            SELECT coalesce(rated.grp, solved.grp) AS grp, rated.n, rated.average, rated.distribution,
                   rated.csat_percent, solved.solved, solved.answered
            FROM rated FULL OUTER JOIN solved ON solved.grp = rated.grp)
         SELECT j.grp AS group, ag.name AS label, coalesce(j.n, 0) AS count, j.average,
                coalesce(j.distribution, ARRAY[0, 0, 0, 0, 0]::bigint[]) AS distribution, j.csat_percent,
                coalesce(j.solved, 0) AS solved_tickets,
                CASE WHEN coalesce(j.solved, 0) > 0 THEN (100.0 * j.answered / j.solved)::float8 END AS response_rate
         FROM joined j {label}
         ORDER BY j.grp",
        rg = group.rating_expr(),
        tg = group.ticket_expr("solved_at"),
        label = label_join(group, "j"),
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?)
}

pub async fn support(
    conn: &mut PgConnection,
    tenant: TenantId,
    group: GroupBy,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> StoreResult<Vec<SupportRow>> {
    let sql = format!(
        "WITH created AS (
            SELECT {cg} AS grp, count(*) AS created,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM t.first_response_at - t.created_at))
                       FILTER (WHERE t.first_response_at IS NOT NULL) AS fr50,
                   percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM t.first_response_at - t.created_at))
                       FILTER (WHERE t.first_response_at IS NOT NULL) AS fr90
            FROM tickets t JOIN contacts c ON c.tenant_id = t.tenant_id AND c.id = t.contact_id
            WHERE t.tenant_id = $1 AND t.created_at >= $2 AND t.created_at < $3 GROUP BY 1),
         solved AS (
            SELECT {sg} AS grp, count(*) AS solved,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM t.solved_at - t.created_at)) AS res50,
                   percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM t.solved_at - t.created_at)) AS res90
            FROM tickets t JOIN contacts c ON c.tenant_id = t.tenant_id AND c.id = t.contact_id
            WHERE t.tenant_id = $1 AND t.solved_at >= $2 AND t.solved_at < $3 GROUP BY 1),
         backlog AS (
            SELECT {cg} AS grp, count(*) AS open
            FROM tickets t JOIN contacts c ON c.tenant_id = t.tenant_id AND c.id = t.contact_id
            WHERE t.tenant_id = $1 AND t.status IN {OPEN_TICKET_STATUSES} GROUP BY 1),
         joined AS (
            SELECT coalesce(created.grp, solved.grp, backlog.grp) AS grp,
                   coalesce(created.created, 0) AS created, coalesce(solved.solved, 0) AS solved,
                   created.fr50, created.fr90, solved.res50, solved.res90, coalesce(backlog.open, 0) AS open
            FROM created
            FULL OUTER JOIN solved ON solved.grp = created.grp
            FULL OUTER JOIN backlog ON backlog.grp = coalesce(created.grp, solved.grp))
         SELECT j.grp AS group, ag.name AS label, j.created, j.solved,
                j.fr50::float8 AS first_response_median_secs, j.fr90::float8 AS first_response_p90_secs,
                j.res50::float8 AS resolution_median_secs, j.res90::float8 AS resolution_p90_secs,
                j.open AS open_backlog
         FROM joined j {label}
         ORDER BY j.grp",
        cg = group.ticket_expr("created_at"),
        sg = group.ticket_expr("solved_at"),
        label = label_join(group, "j"),
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?)
}
