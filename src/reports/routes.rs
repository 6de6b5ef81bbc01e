//! `/v1/reports/csat` and `/v1/reports/support`.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, CsatRow, GroupBy, SupportRow};
use crate::AppState;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ApiQuery;
use crate::http::problems::ProblemResponse;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(csat_report))
        .routes(routes!(support_report))
}

/// The period and grouping of a report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// `agent`, `country`, `channel` or `week`.
    pub group_by: GroupBy,
    /// Start (inclusive): RFC 3339 or `YYYY-MM-DD`; default 30 days ago.
    pub from: Option<String>,
    /// End (exclusive): RFC 3339 or `YYYY-MM-DD`; default now.
    pub to: Option<String>,
}

/// A report.
#[derive(Debug, Serialize, ToSchema)]
pub struct Report<T> {
    pub group_by: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub data: Vec<T>,
}

fn parse_time(field: &str, raw: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{field} must be an RFC 3339 time or a YYYY-MM-DD date"
            ))
        })
}

fn period(p: &ReportParams) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let to =
        p.to.as_deref()
            .map(|t| parse_time("to", t))
            .transpose()?
            .unwrap_or_else(Utc::now);
    let from = p
        .from
        .as_deref()
        .map(|f| parse_time("from", f))
        .transpose()?
        .unwrap_or(to - chrono::Duration::days(30));
    if from >= to {
        return Err(ApiError::BadRequest("from must be before to".to_owned()));
    }
    if to - from > chrono::Duration::days(3660) {
        return Err(ApiError::BadRequest(
            "the period can be at most ten years".to_owned(),
        ));
    }
    Ok((from, to))
}

fn name(g: GroupBy) -> String {
    match g {
        GroupBy::Agent => "agent",
        GroupBy::Country => "country",
        GroupBy::Channel => "channel",
        GroupBy::Week => "week",
    }
    .to_owned()
}

/// CSAT by agent, country, channel or week: count, average, distribution 1-5, CSAT % (share of
/// 4 and 5) and response rate (solved tickets rated through the survey).
#[utoipa::path(get, path = "/v1/reports/csat", tag = "reports", security(("api_key" = [])), params(ReportParams),
    responses((status = 200, body = Report<CsatRow>), (status = 400, response = ProblemResponse)))]
async fn csat_report(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<ReportParams>,
) -> ApiResult<Json<Report<CsatRow>>> {
    let (from, to) = period(&p)?;
    let mut conn = state.pool.acquire().await?;
    let data = store::csat(&mut conn, tenant.id, p.group_by, from, to).await?;
    Ok(Json(Report {
        group_by: name(p.group_by),
        from,
        to,
        data,
    }))
}

/// Support KPIs by agent, country, channel or week: created, solved, median and p90 first
/// response and resolution times (seconds), open backlog.
#[utoipa::path(get, path = "/v1/reports/support", tag = "reports", security(("api_key" = [])), params(ReportParams),
    responses((status = 200, body = Report<SupportRow>), (status = 400, response = ProblemResponse)))]
async fn support_report(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<ReportParams>,
) -> ApiResult<Json<Report<SupportRow>>> {
    let (from, to) = period(&p)?;
    let mut conn = state.pool.acquire().await?;
    let data = store::support(&mut conn, tenant.id, p.group_by, from, to).await?;
    Ok(Json(Report {
        group_by: name(p.group_by),
        from,
        to,
        data,
    }))
}
