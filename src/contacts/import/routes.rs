//! `/v1/contacts/imports`: upload a file of contacts, follow its progress, cancel it.
//!
//! The upload route streams its body (no body limit but the operator's `import_max_bytes`,
//! its own time limit `import_timeout_secs`) and takes its `Idempotency-Key` itself, since the
//! generic middleware would have to hold the whole file to hash it: a repeated key answers
//! with the import it started, without reading the file again.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::receive::{ReceiveError, receive};
use super::{ContactImport, ImportFormat, ImportMode, ImportOptions};
use crate::AppState;
use crate::domain::{TenantContext, TenantId};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ApiQuery};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;

/// The upload route: mounted without the idempotency middleware and with its own time limit.
pub fn upload_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_import, list_imports))
}

/// Progress and cancellation.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_import, cancel_import))
}

/// `POST /v1/contacts/imports` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// `csv` or `ndjson`; by default from the Content-Type (`text/csv`,
    /// `application/x-ndjson`), else CSV.
    #[param(inline)]
    pub format: Option<ImportFormat>,
    /// `upsert` (default), `create_only` or `update_only`.
    #[param(inline)]
    pub mode: Option<ImportMode>,
    /// Validate and count what would happen; write nothing.
    pub dry_run: Option<bool>,
    /// Names the import; consents it records get the source `import:<filename>`.
    pub filename: Option<String>,
    /// CSV: a JSON object from column names to fields (`{"E-mail": "email", "Limit":
    /// "attributes.credit_limit", "Note": null}`); other columns are read by their names.
    pub mapping: Option<String>,
    /// CSV: `,` `;` `tab` or `|`; guessed from the header row when absent.
    pub delimiter: Option<String>,
    /// The file's character set (`utf-8` by default; `windows-1250`, `iso-8859-2`...);
    /// the Content-Type's `charset` says it too.
    pub charset: Option<String>,
}

async fn load(pool: &sqlx::PgPool, tenant: TenantId, id: Uuid) -> ApiResult<ContactImport> {
    super::store::fetch(pool, tenant, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no import with id {id}")))
}

/// The import's options from its parameters and headers (`Content-Type`, `Idempotency-Key`);
/// the command line builds its options here too.
pub fn options(params: ImportParams, headers: &HeaderMap) -> ApiResult<ImportOptions> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (media, charset_param) = match content_type.split_once(';') {
        Some((m, rest)) => (
            m.trim().to_owned(),
            rest.split(';').find_map(|p| {
                p.trim()
                    .strip_prefix("charset=")
                    .map(|c| c.trim_matches('"').to_owned())
            }),
        ),
        None => (content_type.trim().to_owned(), None),
    };
    let format = params.format.unwrap_or(match media.as_str() {
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => ImportFormat::Ndjson,
        _ => ImportFormat::Csv,
    });
    let mapping: Map<String, Value> = match params.mapping.as_deref() {
        None => Map::new(),
        Some(raw) => serde_json::from_str(raw).map_err(|e| {
            ApiError::field(
                "mapping",
                format!("must be a JSON object of column names to fields: {e}"),
            )
        })?,
    };
    if format == ImportFormat::Ndjson && !mapping.is_empty() {
        return Err(ApiError::field("mapping", "applies to CSV files only"));
    }
    let delimiter = match params.delimiter.as_deref() {
        None => None,
        Some(",") => Some(b','),
        Some(";") => Some(b';'),
        Some("|") => Some(b'|'),
        Some("tab" | "\t") => Some(b'\t'),
        Some(other) => {
            return Err(ApiError::field(
                "delimiter",
                format!("`{other}` is not a separator; expected `,` `;` `tab` or `|`"),
            ));
        }
    };
    let encoding = match params.charset.or(charset_param) {
        None => None,
        Some(label) => Some(
            encoding_rs::Encoding::for_label(label.trim().as_bytes()).ok_or_else(|| {
                ApiError::field(
                    "charset",
                    format!(
                        "`{label}` is not a character set (utf-8, windows-1250, iso-8859-2...)"
                    ),
                )
            })?,
        ),
    };
    let filename = params
        .filename
        .map(|f| crate::validate::text(&f, 255).map_err(|m| ApiError::field("filename", m)))
        .transpose()?;
    let idempotency_key = crate::http::idempotency::key_of(headers)?;
    Ok(ImportOptions {
        format,
        mode: params.mode.unwrap_or(ImportMode::Upsert),
        dry_run: params.dry_run.unwrap_or(false),
        filename,
        mapping,
        delimiter,
        encoding,
        idempotency_key,
    })
}

/// Import contacts from a CSV or NDJSON file of any size.
///
/// The body is read as it streams and stored in chunks; the answer (202) comes once the whole
/// file is stored, and the worker writes it in the background: follow it with
/// `GET /v1/contacts/imports/{id}`. CSV: a header row; columns are fields by name
/// (`external_id` required; `email`, `phone`, ... `attributes.<name>`,
/// `consents.<channel>.<purpose>`), or by `mapping`; empty cells leave a field as it is;
/// the separator is guessed. NDJSON: one contact per line as `PUT /v1/contacts/{id}` takes it
/// (with `external_id`); the export's lines import as they are. A file that cannot be read
/// (bad header, wrong character set, a row over 1 MiB) is refused whole with 422.
/// `Idempotency-Key` answers a repeat with the first import (200). A tenant uploads two
/// files at a time (429 beyond); a repeat while the first upload is still coming in is a
/// 409.
#[utoipa::path(post, path = "/v1/contacts/imports", tag = "contacts",
    security(("api_key" = [])),
    params(ImportParams),
    request_body(content((String = "text/csv"), (String = "application/x-ndjson")),
                 description = "The file"),
    responses(
        (status = 202, description = "Stored and queued", body = ContactImport),
        (status = 200, description = "The import this Idempotency-Key started", body = ContactImport),
        (status = 400, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 413, response = ProblemResponse),
        (status = 422, response = ProblemResponse),
        (status = 429, response = ProblemResponse),
    ))]
async fn create_import(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ImportParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let opts = options(params, &headers)?;
    let _slot = UploadSlot::take(tenant.id)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let config = &state.config;
    let deadline = config.import_timeout_secs + 60;
    let received = receive(
        &state.pool,
        &tenant,
        opts,
        reader,
        config.import_max_bytes,
        deadline,
    )
    .await;
    let (status, id) = match received {
        Ok(Ok(id)) => (StatusCode::ACCEPTED, id),
        Ok(Err(existing)) => (StatusCode::OK, existing),
        Err(ReceiveError::Invalid(errors)) => return Err(ApiError::validation(errors)),
        Err(ReceiveError::TooLarge(n)) => {
            return Err(ApiError::PayloadTooLarge(format!(
                "an import may be at most {n} bytes (the operator's import_max_bytes)"
            )));
        }
        Err(ReceiveError::Body(m)) => return Err(ApiError::BadRequest(m)),
        Err(e @ ReceiveError::InProgress) => return Err(ApiError::Conflict(e.to_string())),
        Err(ReceiveError::Db(e)) => return Err(e.into()),
    };
    let view = load(&state.pool, tenant.id, id).await?;
    let location = format!("/v1/contacts/imports/{id}");
    Ok((status, [(header::LOCATION, location)], Json(view)).into_response())
}

/// Uploads one process reads at once, and of them one tenant's: each holds a thread and a
/// few chunks of memory for as long as its client sends.
const MAX_UPLOADS: usize = 8;
const MAX_TENANT_UPLOADS: usize = 2;

static UPLOADS: std::sync::Mutex<Vec<TenantId>> = std::sync::Mutex::new(Vec::new());

/// A place among the uploads being read; given back when dropped.
struct UploadSlot(TenantId);

impl UploadSlot {
    fn take(tenant: TenantId) -> ApiResult<UploadSlot> {
        let mut uploads = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
        let mine = uploads.iter().filter(|t| **t == tenant).count();
        if uploads.len() >= MAX_UPLOADS || mine >= MAX_TENANT_UPLOADS {
            return Err(ApiError::TooManyRequests {
                retry_after_secs: 30,
            });
        }
        uploads.push(tenant);
        Ok(UploadSlot(tenant))
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = uploads.iter().position(|t| *t == self.0) {
            uploads.swap_remove(i);
        }
    }
}

/// An import's progress: rows read, written, created, updated, unchanged, skipped, failed, and
/// the first 100 failed rows with their line numbers.
#[utoipa::path(get, path = "/v1/contacts/imports/{id}", tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Import id")),
    responses((status = 200, body = ContactImport), (status = 404, response = ProblemResponse)))]
async fn get_import(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<ContactImport>> {
    Ok(Json(load(&state.pool, tenant.id, id).await?))
}

/// Stop an import that has not finished: rows written so far stay, the rest are dropped.
#[utoipa::path(delete, path = "/v1/contacts/imports/{id}", tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Import id")),
    responses((status = 200, description = "Cancelled (or already finished)", body = ContactImport),
              (status = 404, response = ProblemResponse)))]
async fn cancel_import(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<ContactImport>> {
    super::store::cancel(&state.pool, tenant.id, id).await?;
    Ok(Json(load(&state.pool, tenant.id, id).await?))
}

/// `GET /v1/contacts/imports` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportListParams {
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// The tenant's imports, newest first.
#[utoipa::path(get, path = "/v1/contacts/imports", tag = "contacts",
    security(("api_key" = [])),
    params(ImportListParams),
    responses((status = 200, body = Page<ContactImport>), (status = 400, response = ProblemResponse)))]
async fn list_imports(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ImportListParams>,
) -> ApiResult<Json<Page<ContactImport>>> {
    let page = PageParams {
        limit: params.limit,
        cursor: params.cursor,
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let rows = super::store::list(&state.pool, tenant.id, before, limit + 1).await?;
    Ok(Json(paginate(rows, limit, |i| encode_id_cursor(i.id))))
}
