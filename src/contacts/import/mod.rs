//! Contact imports: a CSV or NDJSON file of contacts, however large, loaded in the background.
//!
//! Two halves. [`receive`] reads the upload while it streams (never whole in memory), checks
//! its header and encoding, and stores it as chunks of [`CHUNK_ROWS`] rows with each row's
//! line number, all in the transaction that answers 202: a broken upload leaves nothing.
//! [`apply`] (a worker task) writes chunk after chunk with `store::upsert_many`, each chunk in
//! one transaction with the import's counters, its first errors and the chunk's deletion: a
//! restart resumes at the first chunk left, and no row is written twice.
//!
//! This module holds what both halves share: the options, the CSV columns and how a row
//! becomes a [`ContactInput`].

pub mod apply;
pub mod receive;
pub mod routes;
pub mod store;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::model::ContactInput;
use crate::domain::{Channel, ConsentInput, ConsentStatus, Patch, Purpose};
use crate::validate::FieldError;

/// Rows per stored chunk: one transaction of the worker.
pub const CHUNK_ROWS: usize = 1000;
/// Parts an import's rows are spread over by external id; a worker writes them at once, each
/// on its own connection.
pub const PARTS: usize = 4;

/// The part of the rows of this external id (stable for the life of an import: the rows of
/// one contact stay in one part, in file order).
pub fn part_of(external_id: &[u8]) -> usize {
    // FNV-1a: small, and the same in every process.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in external_id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % PARTS as u64) as usize
}
/// Longest row (a CSV record or an NDJSON line) an import takes.
pub const MAX_ROW_BYTES: usize = 1 << 20;
/// How many failed rows an import lists (it counts them all).
pub const MAX_ERRORS: usize = 100;
/// The channel a queued import is announced on, for the workers.
pub const NOTIFY_CHANNEL: &str = "rapport_imports";

/// The import file's format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum ImportFormat {
    Csv,
    Ndjson,
}

impl ImportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportFormat::Csv => "csv",
            ImportFormat::Ndjson => "ndjson",
        }
    }
}

/// Which rows may create and which may update contacts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum ImportMode {
    /// Create missing contacts, update existing ones (the default).
    Upsert,
    /// Only create; rows naming an existing contact are skipped.
    CreateOnly,
    /// Only update; rows naming no contact are skipped.
    UpdateOnly,
}

impl ImportMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportMode::Upsert => "upsert",
            ImportMode::CreateOnly => "create_only",
            ImportMode::UpdateOnly => "update_only",
        }
    }

    pub fn write_mode(self) -> super::store::WriteMode {
        match self {
            ImportMode::Upsert => super::store::WriteMode::Upsert,
            ImportMode::CreateOnly => super::store::WriteMode::CreateOnly,
            ImportMode::UpdateOnly => super::store::WriteMode::UpdateOnly,
        }
    }
}

/// Where an import stands (an upload still coming in shows as `queued`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum ImportStatus {
    /// The upload is still coming in (shown as `queued`).
    #[serde(rename = "queued")]
    Receiving,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl ImportStatus {
    /// Not finished: the workers still have its chunks.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            ImportStatus::Receiving | ImportStatus::Queued | ImportStatus::Running
        )
    }
}

/// How to read an upload, from the request's parameters (or the command line).
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub format: ImportFormat,
    pub mode: ImportMode,
    pub dry_run: bool,
    /// Names the import, and the consents' source: `import:<filename>`.
    pub filename: Option<String>,
    /// CSV column -> field (`null` leaves the column out).
    pub mapping: Map<String, Value>,
    /// CSV field separator; guessed from the header when absent.
    pub delimiter: Option<u8>,
    /// The file's character set; UTF-8 when absent.
    pub encoding: Option<&'static encoding_rs::Encoding>,
    pub idempotency_key: Option<String>,
}

/// A contact field a CSV column fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    ExternalId,
    Email,
    Phone,
    ViberId,
    FirstName,
    LastName,
    Locale,
    Country,
    Timezone,
    Birthday,
    OwnerAgentId,
}

const FIELDS: [(&str, Field); 11] = [
    ("external_id", Field::ExternalId),
    ("email", Field::Email),
    ("phone", Field::Phone),
    ("viber_id", Field::ViberId),
    ("first_name", Field::FirstName),
    ("last_name", Field::LastName),
    ("locale", Field::Locale),
    ("country", Field::Country),
    ("timezone", Field::Timezone),
    ("birthday", Field::Birthday),
    ("owner_agent_id", Field::OwnerAgentId),
];

/// Columns of the export that an import reads past: they are Rapport's, not the tenant's.
const READ_ONLY: [&str; 3] = ["id", "created_at", "updated_at"];

/// What one CSV column fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    Field(Field),
    Attribute(String),
    Consent(Channel, Purpose),
}

impl Column {
    /// A target as the header or the mapping names it: a field, `attributes.<name>` or
    /// `consents.<channel>.<purpose>`.
    pub fn parse(target: &str) -> Result<Column, String> {
        let t = target.trim();
        if let Some(name) = t.strip_prefix("attributes.") {
            if name.is_empty() || name.len() > 100 {
                return Err(format!("attribute name `{name}` must be 1-100 characters"));
            }
            return Ok(Column::Attribute(name.to_owned()));
        }
        if let Some(rest) = t.strip_prefix("consents.") {
            let (channel, purpose) = rest.split_once('.').unwrap_or((rest, ""));
            let channel = Channel::parse(channel).ok_or_else(|| {
                format!("unknown channel `{channel}` in `{t}`; expected email, sms or viber")
            })?;
            let purpose = Purpose::parse(purpose).ok_or_else(|| {
                format!("unknown purpose `{purpose}` in `{t}`; expected marketing or transactional")
            })?;
            return Ok(Column::Consent(channel, purpose));
        }
        let lower = t.to_ascii_lowercase();
        FIELDS
            .iter()
            .find(|(name, _)| *name == lower)
            .map(|(_, f)| Column::Field(*f))
            .ok_or_else(|| {
                format!(
                    "`{t}` is not a contact field; expected one of {}, `attributes.<name>` or \
                     `consents.<channel>.<purpose>`",
                    FIELDS.map(|(n, _)| n).join(", ")
                )
            })
    }

    /// The target's name, as stored with the import.
    pub fn name(&self) -> String {
        match self {
            Column::Field(f) => FIELDS
                .iter()
                .find(|(_, x)| x == f)
                .map(|(n, _)| (*n).to_owned())
                .unwrap_or_default(),
            Column::Attribute(a) => format!("attributes.{a}"),
            Column::Consent(c, p) => format!("consents.{}.{}", c.as_str(), p.as_str()),
        }
    }
}

/// What each column of `header` fills (`None`: left out), by its name or by `mapping`; every
/// problem at once. The export's own columns (`id`, `created_at`, `updated_at`) are left out,
/// so an export imports as it is.
pub fn resolve_columns(
    header: &[String],
    mapping: &Map<String, Value>,
) -> Result<Vec<Option<Column>>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut columns = Vec::with_capacity(header.len());
    for (n, raw) in header.iter().enumerate() {
        let name = raw.trim();
        let column = match mapping.get(name) {
            Some(Value::Null) => None,
            Some(Value::String(target)) => match Column::parse(target) {
                Ok(c) => Some(c),
                Err(m) => {
                    errors.push(FieldError::new(format!("mapping.{name}"), m));
                    None
                }
            },
            Some(_) => {
                errors.push(FieldError::new(
                    format!("mapping.{name}"),
                    "must be a field name, or null to leave the column out",
                ));
                None
            }
            None if READ_ONLY.contains(&name.to_ascii_lowercase().as_str()) => None,
            None if name.is_empty() => {
                errors.push(FieldError::new(
                    "header",
                    format!("column {} has no name", n + 1),
                ));
                None
            }
            None => match Column::parse(name) {
                Ok(c) => Some(c),
                Err(m) => {
                    errors.push(FieldError::new(
                        "header",
                        format!(
                            "column {} ({m}); name it so, or map it with `mapping` (null leaves it out)",
                            n + 1
                        ),
                    ));
                    None
                }
            },
        };
        columns.push(column);
    }
    for key in mapping.keys() {
        if !header.iter().any(|h| h.trim() == key) {
            errors.push(FieldError::new(
                format!("mapping.{key}"),
                "the file has no such column",
            ));
        }
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in columns.iter().flatten() {
        *seen.entry(c.name()).or_default() += 1;
    }
    for (name, count) in &seen {
        if *count > 1 {
            errors.push(FieldError::new(
                "header",
                format!("{count} columns fill `{name}`"),
            ));
        }
    }
    if !seen.contains_key("external_id") && errors.is_empty() {
        errors.push(FieldError::new(
            "header",
            "no column holds `external_id`, your own id for each contact; name one so or map one with `mapping`",
        ));
    }
    if errors.is_empty() {
        Ok(columns)
    } else {
        Err(errors)
    }
}

/// The separator a header line uses: the most frequent of `,` `;` tab and `|` outside quotes
/// (Excel writes `;` in Croatian, Slovenian, Hungarian and Polish settings); `,` when none.
pub fn guess_delimiter(header: &[u8]) -> u8 {
    let mut counts = [0usize; 4];
    let candidates = [b',', b';', b'\t', b'|'];
    let mut quoted = false;
    for b in header {
        if *b == b'"' {
            quoted = !quoted;
        } else if !quoted {
            if let Some(i) = candidates.iter().position(|c| c == b) {
                counts[i] += 1;
            }
        }
    }
    let (best, count) = counts
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (**c, usize::MAX - i))
        .unwrap_or((0, &0));
    if *count == 0 { b',' } else { candidates[best] }
}

/// An attribute cell as JSON: `true`/`false`, a number that reads back as written, an object
/// or array; anything else is text (so `00123` and a 20-digit account number stay as they
/// are).
pub fn attribute_value(cell: &str) -> Value {
    match cell {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    let first = cell.as_bytes().first().copied().unwrap_or(b' ');
    if first == b'-' || first.is_ascii_digit() {
        if let Ok(n) = serde_json::from_str::<serde_json::Number>(cell) {
            if n.to_string() == cell {
                return Value::Number(n);
            }
        }
    } else if first == b'{' || first == b'[' {
        if let Ok(v) = serde_json::from_str::<Value>(cell) {
            return v;
        }
    }
    Value::String(cell.to_owned())
}

/// A consent cell: `opted_in` / `opted_out`, or yes/no, true/false, 1/0 (and da/ne, igen/nem,
/// tak/nie from the markets' own spreadsheets).
pub fn consent_value(cell: &str) -> Result<ConsentStatus, String> {
    match cell.to_lowercase().as_str() {
        "opted_in" | "yes" | "y" | "true" | "1" | "da" | "igen" | "tak" => {
            Ok(ConsentStatus::OptedIn)
        }
        "opted_out" | "no" | "n" | "false" | "0" | "ne" | "nem" | "nie" => {
            Ok(ConsentStatus::OptedOut)
        }
        _ => Err(format!(
            "`{cell}` is not a consent; expected opted_in or opted_out (or yes/no, 1/0)"
        )),
    }
}

/// One CSV record as an upsert: its external id and the changes. Empty cells leave a field as
/// it is.
pub fn csv_row(
    columns: &[Option<Column>],
    record: &csv::StringRecord,
) -> Result<(String, ContactInput), Vec<FieldError>> {
    if record.len() != columns.len() {
        return Err(vec![FieldError::new(
            "row",
            format!(
                "has {} fields where the header has {}",
                record.len(),
                columns.len()
            ),
        )]);
    }
    let mut input = ContactInput::default();
    let mut external_id = None;
    let mut errors = Vec::new();
    for (column, cell) in columns.iter().zip(record.iter()) {
        let cell = cell.trim();
        let Some(column) = column else { continue };
        if cell.is_empty() {
            continue;
        }
        let text = || Patch::Value(cell.to_owned());
        match column {
            Column::Field(Field::ExternalId) => external_id = Some(cell.to_owned()),
            Column::Field(Field::Email) => input.email = text(),
            Column::Field(Field::Phone) => input.phone = text(),
            Column::Field(Field::ViberId) => input.viber_id = text(),
            Column::Field(Field::FirstName) => input.first_name = text(),
            Column::Field(Field::LastName) => input.last_name = text(),
            Column::Field(Field::Locale) => input.locale = text(),
            Column::Field(Field::Country) => input.country = text(),
            Column::Field(Field::Timezone) => input.timezone = text(),
            Column::Field(Field::Birthday) => input.birthday = text(),
            Column::Field(Field::OwnerAgentId) => match uuid::Uuid::parse_str(cell) {
                Ok(id) => input.owner_agent_id = Patch::Value(id),
                Err(_) => errors.push(FieldError::new(
                    "owner_agent_id",
                    format!("`{cell}` is not an agent id (a UUID)"),
                )),
            },
            Column::Attribute(name) => {
                input
                    .attributes
                    .get_or_insert_with(Map::new)
                    .insert(name.clone(), attribute_value(cell));
            }
            Column::Consent(channel, purpose) => match consent_value(cell) {
                Ok(status) => {
                    input
                        .consents
                        .get_or_insert_with(BTreeMap::new)
                        .entry(channel.as_str().to_owned())
                        .or_default()
                        .insert(
                            purpose.as_str().to_owned(),
                            ConsentInput {
                                status,
                                source: None,
                                at: None,
                            },
                        );
                }
                Err(m) => errors.push(FieldError::new(column.name(), m)),
            },
        }
    }
    let Some(external_id) = external_id else {
        errors.push(FieldError::new("external_id", "is required"));
        return Err(errors);
    };
    if errors.is_empty() {
        Ok((external_id, input))
    } else {
        Err(errors)
    }
}

/// One NDJSON line as an upsert: an object as `PUT /v1/contacts/{id}` takes it, with its
/// `external_id`; a line of the export (with `id`, `stats`, `last_event_at`, `created_at`,
/// `updated_at`, which are left out) too.
pub fn ndjson_row(line: &[u8]) -> Result<(String, ContactInput), Vec<FieldError>> {
    let invalid = |m: String| vec![FieldError::new("row", m)];
    let mut object: Map<String, Value> =
        serde_json::from_slice(line).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
    for key in ["id", "stats", "last_event_at", "created_at", "updated_at"] {
        object.remove(key);
    }
    let input: ContactInput = serde_path_to_error::deserialize(Value::Object(object))
        .map_err(|e| vec![FieldError::new(e.path().to_string(), e.inner().to_string())])?;
    match input.external_id.as_deref().map(str::trim) {
        Some(x) if !x.is_empty() => Ok((x.to_owned(), input)),
        _ => Err(vec![FieldError::new("external_id", "is required")]),
    }
}

/// One failed row of an import.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportRowError {
    /// The file's line the row starts on (the header is line 1).
    pub line: i64,
    pub field: String,
    pub message: String,
}

/// An import and how far it got.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ContactImport {
    pub id: Uuid,
    pub filename: Option<String>,
    pub format: ImportFormat,
    pub mode: ImportMode,
    pub dry_run: bool,
    pub status: ImportStatus,
    /// Rows in the file (blank lines not counted).
    pub rows: i64,
    /// Rows written so far (or, in a dry run, checked).
    pub processed: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    /// Left alone by the mode.
    pub skipped: i64,
    pub failed: i64,
    /// Up to 100 failed rows (the first found), in line order.
    #[sqlx(json)]
    pub errors: Vec<ImportRowError>,
    /// Why the import failed, or the last failed attempt at a chunk (retried).
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl ContactImport {
    /// Failed rows in line order (the parts are written at once, so they are found out of it).
    pub(crate) fn by_line(mut self) -> ContactImport {
        self.errors.sort_by_key(|e| e.line);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn columns_by_name_or_mapping() {
        let mapping: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "Kupac": "external_id", "E-mail": "email", "Napomena": null,
            "Limit": "attributes.credit_limit"
        }))
        .unwrap_or_default();
        let cols = resolve_columns(
            &header(&[
                "Kupac",
                "E-mail",
                "Napomena",
                "Limit",
                "consents.sms.marketing",
                "id",
            ]),
            &mapping,
        );
        let cols = cols.unwrap_or_default();
        assert_eq!(cols.len(), 6);
        assert_eq!(cols[0], Some(Column::Field(Field::ExternalId)));
        assert_eq!(cols[2], None);
        assert_eq!(cols[3], Some(Column::Attribute("credit_limit".to_owned())));
        assert_eq!(
            cols[4],
            Some(Column::Consent(Channel::Sms, Purpose::Marketing))
        );
        assert_eq!(cols[5], None);
    }

    #[test]
    fn column_problems_are_listed_together() {
        let mapping: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"Nope": "email", "x": "colour"}))
                .unwrap_or_default();
        let errors = resolve_columns(&header(&["x", "Tel", "email", "EMAIL"]), &mapping)
            .err()
            .unwrap_or_default();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"mapping.x"), "{errors:?}");
        assert!(fields.contains(&"mapping.Nope"), "{errors:?}");
        assert!(
            errors.iter().any(|e| e.message.contains("column 2")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.message.contains("2 columns fill `email`")),
            "{errors:?}"
        );
        let missing = resolve_columns(&header(&["email"]), &Map::new())
            .err()
            .unwrap_or_default();
        assert!(missing[0].message.contains("external_id"));
    }

    #[test]
    fn delimiters_are_guessed_from_the_header() {
        assert_eq!(guess_delimiter(b"external_id;email;\"a,b\"\n"), b';');
        assert_eq!(guess_delimiter(b"external_id,email\n"), b',');
        assert_eq!(guess_delimiter(b"external_id\temail\n"), b'\t');
        assert_eq!(guess_delimiter(b"external_id\n"), b',');
    }

    #[test]
    fn cells_become_typed_attributes_only_when_exact() {
        assert_eq!(attribute_value("5000"), serde_json::json!(5000));
        assert_eq!(attribute_value("-2.5"), serde_json::json!(-2.5));
        assert_eq!(attribute_value("00123"), serde_json::json!("00123"));
        assert_eq!(
            attribute_value("12345678901234567890123"),
            serde_json::json!("12345678901234567890123")
        );
        assert_eq!(attribute_value("1e3"), serde_json::json!("1e3"));
        assert_eq!(attribute_value("true"), serde_json::json!(true));
        assert_eq!(attribute_value("[1,2]"), serde_json::json!([1, 2]));
        assert_eq!(attribute_value("Zagreb"), serde_json::json!("Zagreb"));
        assert_eq!(consent_value("DA"), Ok(ConsentStatus::OptedIn));
        assert_eq!(consent_value("opted_out"), Ok(ConsentStatus::OptedOut));
        assert!(consent_value("maybe").is_err());
    }

    #[test]
    fn rows_leave_empty_cells_alone_and_list_every_error() {
        let columns = resolve_columns(
            &header(&[
                "external_id",
                "email",
                "owner_agent_id",
                "consents.email.marketing",
                "attributes.plan",
            ]),
            &Map::new(),
        )
        .unwrap_or_default();
        let record = csv::StringRecord::from(vec!["c1", "", "", "yes", "gold"]);
        let (id, input) = csv_row(&columns, &record).unwrap_or_default();
        assert_eq!(id, "c1");
        assert_eq!(input.email, Patch::Missing);
        assert_eq!(
            input.attributes.unwrap_or_default()["plan"],
            serde_json::json!("gold")
        );
        let bad = csv::StringRecord::from(vec!["", "x", "not-a-uuid", "maybe", ""]);
        let errors = csv_row(&columns, &bad).err().unwrap_or_default();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["owner_agent_id", "consents.email.marketing", "external_id"]
        );
        let short = csv::StringRecord::from(vec!["c1"]);
        assert!(csv_row(&columns, &short).is_err());
    }

    #[test]
    fn ndjson_rows_take_the_exports_lines() {
        let line = br#"{"id":"0190","external_id":"c1","email":"ana@example.com","stats":{},"created_at":"x","updated_at":"y","consents":{"email":{"marketing":{"status":"opted_in","source":"web"}}}}"#;
        let (id, input) = ndjson_row(line).unwrap_or_default();
        assert_eq!(id, "c1");
        assert_eq!(input.email, Patch::Value("ana@example.com".to_owned()));
        let errors = ndjson_row(br#"{"external_id":"c1","colour":"red"}"#)
            .err()
            .unwrap_or_default();
        assert!(errors[0].message.contains("colour"), "{errors:?}");
        assert!(ndjson_row(b"[1]").is_err());
        assert!(ndjson_row(br#"{"email":"a@b.hr"}"#).is_err());
    }
}
