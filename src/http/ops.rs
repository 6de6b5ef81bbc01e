//! Operations endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document, docs.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problems::ProblemResponse;
use crate::AppState;
use crate::error::{ApiError, ApiResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(docs))
        // The docs UI's own files: not API, so not in the OpenAPI document.
        .route(SCALAR_PATH, axum::routing::get(scalar_js))
        .route("/docs/init.js", axum::routing::get(docs_init_js))
        .route(
            "/docs/LICENSE-scalar.txt",
            axum::routing::get(scalar_licence),
        )
}

/// Scalar's API reference, from the npm registry (`@scalar/api-reference`, pinned), embedded so
/// that `/docs` works on a machine without internet access.
const SCALAR_JS: &[u8] = include_bytes!("../../docs/scalar/scalar-api-reference-1.76.0.js");
const SCALAR_PATH: &str = "/docs/scalar-api-reference-1.76.0.js";
const SCALAR_LICENCE: &str = include_str!("../../docs/scalar/LICENSE.txt");
/// Starts the reference on this server's document, with no fonts or proxies from elsewhere.
const DOCS_INIT_JS: &str =
    "Scalar.createApiReference('#app', { url: '/openapi.json', withDefaultFonts: false });\n";

async fn scalar_js() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            // The path names the version: it never changes.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        SCALAR_JS,
    )
        .into_response()
}

async fn docs_init_js() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        DOCS_INIT_JS,
    )
        .into_response()
}

async fn scalar_licence() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        SCALAR_LICENCE,
    )
        .into_response()
}

/// A health answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the database answers and every migration is applied.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Health), (status = 503, response = ProblemResponse)))]
async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(|e| ApiError::Unavailable(format!("the database is unreachable: {e}")))?;
    let applied = crate::db::migrations_applied(&mut conn)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read the migrations table: {e}")))?;
    if !applied {
        return Err(ApiError::Unavailable(
            "migrations are pending; run `rapport migrate`".to_owned(),
        ));
    }
    Ok(Json(Health { status: "ready" }))
}

/// Prometheus metrics; behind a bearer token when `metrics_token` is set.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"),
              (status = 401, response = ProblemResponse)))]
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(expected) = state.config.metrics_token.as_ref().map(|t| t.expose()) {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            given.trim().as_bytes(),
        )) {
            return ApiError::Unauthorized("send the metrics token as a bearer token".to_owned())
                .into_response();
        }
    }
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi_json.as_ref().clone(),
    )
        .into_response()
}

/// Interactive API reference (renders /openapi.json), served entirely by this server.
#[utoipa::path(get, path = "/docs", tag = "ops",
    responses((status = 200, description = "HTML page", content_type = "text/html")))]
async fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE)
}

const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Rapport API reference</title>
</head>
<body>
  <noscript>The machine-readable API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
  <div id="app"></div>
  <script src="/docs/scalar-api-reference-1.76.0.js"></script>
  <script src="/docs/init.js"></script>
  <!-- Scalar API Reference, MIT licence: /docs/LICENSE-scalar.txt -->
</body>
</html>
"#;
