//! `GET /v1/contacts/export`: every live contact of the tenant, streamed as NDJSON (one
//! contact per line, as the API shows it) or CSV (one column per field, consent and
//! attribute, as the import reads them), in constant memory: pages of [`PAGE`] contacts, each
//! its own short query, written while the client reads.

use axum::body::{Body, Bytes};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::model::Contact;
use super::store::{self, ListFilter};
use crate::domain::{Channel, Purpose, TenantId};

/// Contacts per query and per chunk written.
const PAGE: i64 = 1000;

/// The export's formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Ndjson,
    Csv,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// The fixed CSV columns, before `consents.<channel>.<purpose>` and `attributes.<name>`.
const CSV_FIELDS: &[&str] = &[
    "id",
    "external_id",
    "email",
    "phone",
    "viber_id",
    "first_name",
    "last_name",
    "locale",
    "country",
    "timezone",
    "birthday",
    "owner_agent_id",
    "created_at",
    "updated_at",
];

const CONSENT_COLUMNS: [(Channel, Purpose); 6] = [
    (Channel::Email, Purpose::Marketing),
    (Channel::Email, Purpose::Transactional),
    (Channel::Sms, Purpose::Marketing),
    (Channel::Sms, Purpose::Transactional),
    (Channel::Viber, Purpose::Marketing),
    (Channel::Viber, Purpose::Transactional),
];

fn csv_header(attributes: &[String]) -> Vec<String> {
    CSV_FIELDS
        .iter()
        .map(|f| (*f).to_owned())
        .chain(
            CONSENT_COLUMNS
                .iter()
                .map(|(c, p)| format!("consents.{}.{}", c.as_str(), p.as_str())),
        )
        .chain(attributes.iter().map(|a| format!("attributes.{a}")))
        .collect()
}

/// A JSON value as a CSV cell: strings as they are, null as nothing, the rest as JSON.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn csv_record(c: &Contact, attributes: &[String]) -> Vec<String> {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let mut record = vec![
        c.id.to_string(),
        text(&c.external_id),
        text(&c.email),
        text(&c.phone),
        text(&c.viber_id),
        text(&c.first_name),
        text(&c.last_name),
        text(&c.locale),
        text(&c.country),
        text(&c.timezone),
        c.birthday.map(|d| d.to_string()).unwrap_or_default(),
        c.owner_agent_id.map(|a| a.to_string()).unwrap_or_default(),
        c.created_at.to_rfc3339(),
        c.updated_at.to_rfc3339(),
    ];
    for (channel, purpose) in CONSENT_COLUMNS {
        record.push(
            c.consents
                .status(channel, purpose)
                .map(|s| cell(Some(&serde_json::json!(s))))
                .unwrap_or_default(),
        );
    }
    for a in attributes {
        record.push(cell(c.attributes.get(a)));
    }
    record
}

/// One page as bytes in `format` (with the CSV header first when `header` is given).
fn encode(
    format: Format,
    contacts: &[Contact],
    attributes: &[String],
    header: bool,
) -> Result<Vec<u8>, String> {
    match format {
        Format::Ndjson => {
            let mut out = Vec::with_capacity(contacts.len() * 512);
            for c in contacts {
                serde_json::to_writer(&mut out, c).map_err(|e| e.to_string())?;
                out.push(b'\n');
            }
            Ok(out)
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::with_capacity(contacts.len() * 256));
            if header {
                w.write_record(csv_header(attributes))
                    .map_err(|e| e.to_string())?;
            }
            for c in contacts {
                w.write_record(csv_record(c, attributes))
                    .map_err(|e| e.to_string())?;
            }
            w.into_inner().map_err(|e| e.to_string())
        }
    }
}

/// The export's body: a task reads page after page and hands each to the response as it is
/// written (at most two pages wait), so memory stays flat and a client that goes away stops
/// it. A database error mid-way ends the body abruptly, which the client sees as a broken
/// transfer, never as a complete file.
pub async fn stream(
    pool: PgPool,
    tenant: TenantId,
    filter: ListFilter,
    format: Format,
) -> Result<Body, crate::error::StoreError> {
    let attributes = match format {
        Format::Csv => {
            let mut conn = pool.acquire().await?;
            store::attribute_names(&mut conn, tenant).await?
        }
        Format::Ndjson => Vec::new(),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        let mut after: Option<Uuid> = None;
        let mut first = true;
        loop {
            let page = async {
                let mut conn = pool.acquire().await?;
                store::export_page(&mut conn, tenant, &filter, after, PAGE).await
            }
            .await;
            let contacts = match page {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "the contact export stopped");
                    let _ = tx.send(Err(std::io::Error::other("export failed"))).await;
                    return;
                }
            };
            if contacts.is_empty() && !(first && format == Format::Csv) {
                return;
            }
            let chunk = match encode(format, &contacts, &attributes, first) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "the contact export stopped");
                    let _ = tx.send(Err(std::io::Error::other("export failed"))).await;
                    return;
                }
            };
            first = false;
            after = contacts.last().map(|c| c.id);
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                // The client went away.
                return;
            }
            if (contacts.len() as i64) < PAGE {
                return;
            }
        }
    });
    // Fused: the compression layer polls a body once more after its end, which an unfused
    // `unfold` answers with a panic.
    let body = futures::StreamExt::fuse(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    Ok(Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_text_or_json() {
        assert_eq!(cell(None), "");
        assert_eq!(cell(Some(&serde_json::json!("Zagreb, HR"))), "Zagreb, HR");
        assert_eq!(cell(Some(&serde_json::json!(10000))), "10000");
        assert_eq!(cell(Some(&serde_json::json!({"a": 1}))), "{\"a\":1}");
        let header = csv_header(&["credit_limit".to_owned()]);
        assert_eq!(header[0], "id");
        assert!(header.contains(&"consents.sms.marketing".to_owned()));
        assert_eq!(
            header.last().map(String::as_str),
            Some("attributes.credit_limit")
        );
    }
}
