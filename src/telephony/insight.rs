//! The Aircall insight card: when a known contact calls in, the agent sees who it is before
//! answering (`POST {api}/v1/calls/{id}/insight_cards`, Basic auth api_id:api_token). Pushed by
//! the worker, so the webhook answers within Aircall's 5 s.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::AppState;
use crate::domain::TenantId;
use crate::error::StoreError;
use crate::jobs::{BackgroundJob, JobError};
use crate::support::store::{self as support, CardOf};

/// Pushes the insight card of `contact_id` to Aircall's call `call_id` (Aircall's id).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InsightCard {
    pub call_id: String,
    pub contact_id: Uuid,
}

impl BackgroundJob for InsightCard {
    const KIND: &'static str = "aircall.insight_card";

    async fn run(self, state: &AppState, tenant: TenantId) -> Result<(), JobError> {
        push(state, tenant, &self.call_id, self.contact_id).await
    }
}

/// The card's contents for a contact: name, open tickets, last CSAT, advisor, key attributes
/// (read through the support desk's contact card, the one read model of a customer).
pub async fn contents(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<Vec<Value>, StoreError> {
    let Some(card) = support::card(conn, tenant, CardOf::Contact(contact)).await? else {
        return Ok(Vec::new());
    };
    let c = &card.contact;
    let name = [c.first_name.as_deref(), c.last_name.as_deref()]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let title = Some(name)
        .filter(|n| !n.is_empty())
        .or_else(|| c.phone.clone())
        .unwrap_or_else(|| "Customer".to_owned());
    let mut out = vec![json!({"type": "title", "text": title})];
    let open = support::count_open_tickets(conn, tenant, contact).await?;
    let tickets = match card.open_tickets.first() {
        Some(t) => format!("{open} (latest #{}: {})", t.number, t.subject),
        None => "none".to_owned(),
    };
    out.push(json!({"type": "shortText", "label": "Open tickets", "text": tickets}));
    if let Some(score) = card.last_csat {
        out.push(json!({"type": "shortText", "label": "Last CSAT", "text": format!("{score}/5")}));
    }
    let advisor = match c.owner_agent_id {
        Some(id) => support::get_agent(conn, tenant, id).await?.map(|a| a.name),
        None => None,
    };
    let attributes = &c.attributes;
    if let Some(a) = advisor {
        out.push(json!({"type": "shortText", "label": "Advisor", "text": a}));
    }
    for key in ["plan", "segment", "credit_limit", "available_credit"] {
        if let Some(v) = attributes.get(key).filter(|v| !v.is_null()) {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push(json!({"type": "shortText", "label": key.replace('_', " "), "text": text}));
        }
    }
    Ok(out)
}

/// Builds the card and posts it; errors say whether another attempt may succeed.
async fn push(
    state: &AppState,
    tenant: TenantId,
    call_id: &str,
    contact: Uuid,
) -> Result<(), JobError> {
    let retry = |e: String| JobError::Retry(e);
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(|e| retry(e.to_string()))?;
    let integration = super::integrations::load(&mut conn, &state.secrets, tenant, "aircall")
        .await
        .map_err(|e| retry(e.to_string()))?
        .ok_or_else(|| JobError::Fail("Aircall is not configured any more".into()))?;
    let (Some(api_id), Some(api_token)) = (
        integration.settings.get("api_id").and_then(Value::as_str),
        integration.secrets.get("api_token"),
    ) else {
        return Err(JobError::Fail("no Aircall API credentials".into()));
    };
    let base = integration
        .settings
        .get("api_base_url")
        .and_then(Value::as_str)
        .unwrap_or("https://api.aircall.io");
    let body = json!({"contents": contents(&mut conn, tenant, contact).await.map_err(|e| retry(e.to_string()))?});
    drop(conn);
    state
        .egress
        .check_url(base)
        .map_err(|m| JobError::Fail(format!("aircall: api_base_url {m}")))?;
    let client = crate::egress::client_builder(&state.egress)
        .build()
        .map_err(|e| retry(format!("aircall: {e}")))?;
    let response = client
        .post(format!(
            "{}/v1/calls/{call_id}/insight_cards",
            base.trim_end_matches('/')
        ))
        .basic_auth(api_id, Some(api_token))
        .timeout(std::time::Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(error = %crate::error::error_chain(&e), "aircall request failed");
            retry("aircall: no answer (the API could not be reached in time)".to_owned())
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status.as_u16() == 429 || status.is_server_error() {
        Err(retry(format!("aircall: HTTP {status}")))
    } else {
        Err(JobError::Fail(format!("aircall: HTTP {status}")))
    }
}
