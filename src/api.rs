//! Router assembly: the API's routes, its middleware stack and its OpenAPI document. The top of
//! the HTTP side: it names every capability's router; nothing below imports it.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;
use crate::error::{ApiError, PROBLEM_JSON, Problem, problem_response};
use crate::http::{idempotency, ops, problems};
use crate::tenancy::{require_admin, require_tenant};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Rapport API",
        description = "Contacts, events, tickets, calls, ratings and campaigns in one API. \
                       Errors are RFC 9457 problem documents.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "admin", description = "Operators: tenants and API keys (admin token)"),
        (name = "contacts", description = "Contacts, the contact card and the timeline"),
        (name = "events", description = "Everything that happens to a contact"),
        (name = "templates", description = "Per-channel, per-locale message templates"),
        (name = "messages", description = "The outbox: messages and their delivery"),
        (name = "channels", description = "Per-tenant providers of email, SMS and Viber"),
        (name = "support", description = "Agents and tickets: the support desk"),
        (name = "csat", description = "Satisfaction ratings and the public survey page"),
        (name = "campaigns", description = "Rules written once: triggers, steps, journeys and their stats"),
        (name = "segments", description = "Named conditions over the contact: count and members"),
        (name = "broadcasts", description = "One message to every member of a segment, paced and exactly once"),
        (name = "reports", description = "CSAT and support KPIs, computed in SQL"),
        (name = "telephony", description = "Calls from Aircall, matched to contacts and on the timeline"),
        (name = "webhooks", description = "Delivery receipts from providers (signed)"),
        (name = "tracking", description = "Open pixel, click redirect and unsubscribe links in messages"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
    ),
    components(schemas(Problem, crate::reports::store::GroupBy, crate::campaigns::model::JourneyStatus))
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("rk_live_...")
                    .description(Some("A tenant API key"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "email_basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "Inbound email: any user name, the email channel's inbound_secret",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The operators' RAPPORT_ADMIN_TOKEN"))
                    .build(),
            ),
        );
    }
}

/// The groups of routes, each with its own authentication; `uploads` are tenants' routes
/// that stream large bodies (no idempotency middleware, which would buffer them; their own
/// time limit).
struct Groups {
    admin: OpenApiRouter<AppState>,
    tenant: OpenApiRouter<AppState>,
    uploads: OpenApiRouter<AppState>,
    public: OpenApiRouter<AppState>,
}

fn groups() -> Groups {
    Groups {
        admin: OpenApiRouter::new().merge(crate::tenants::routes::router()),
        tenant: OpenApiRouter::new()
            .merge(crate::contacts::routes::router())
            .merge(crate::ingest::routes::router())
            .merge(crate::templates::routes::router())
            .merge(crate::messages::routes::router())
            .merge(crate::channels::routes::router())
            .merge(crate::support::routes::router())
            .merge(crate::csat::routes::router())
            .merge(crate::reports::routes::router())
            .merge(crate::campaigns::routes::router())
            .merge(crate::segments::routes::router())
            .merge(crate::broadcasts::routes::router())
            .merge(crate::telephony::routes::router())
            .merge(crate::inbound::routes::router())
            .merge(crate::contacts::import::routes::router()),
        uploads: crate::contacts::import::routes::upload_router(),
        public: ops::router()
            .merge(crate::tracking::routes::router())
            .merge(crate::webhooks::routes::router())
            .merge(crate::csat::routes::survey::router())
            .merge(crate::telephony::routes::webhooks()),
    }
}

/// The OpenAPI document of every route, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let Groups {
        admin,
        tenant,
        uploads,
        public,
    } = groups();
    let mut api = ApiDoc::openapi();
    api.merge(admin.into_openapi());
    api.merge(tenant.into_openapi());
    api.merge(uploads.into_openapi());
    api.merge(public.into_openapi());
    // After the merge: it adds to every route's operation.
    utoipa::Modify::modify(&problems::CommonProblems, &mut api);
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    open_flattened_inputs(api)
}

/// A response that flattens an input type (a `Campaign` is its `Definition` plus id and
/// status) comes out of utoipa as `allOf: [$ref Input, {...}]`. The input forbids unknown
/// fields, which makes every such response invalid against its own schema: the closed member
/// rejects the other member's fields. Here each such `$ref` is replaced by an open copy of the
/// input, so requests stay closed and responses validate.
fn open_flattened_inputs(api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use serde_json::Value;
    fn walk(node: &mut Value, closed: &serde_json::Map<String, Value>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::Array(members)) = map.get_mut("allOf") {
                    for member in members.iter_mut() {
                        let target = member
                            .get("$ref")
                            .and_then(Value::as_str)
                            .and_then(|r| r.strip_prefix("#/components/schemas/"))
                            .and_then(|name| closed.get(name));
                        if let Some(open) = target {
                            *member = open.clone();
                        }
                    }
                }
                map.values_mut().for_each(|v| walk(v, closed));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, closed)),
            _ => {}
        }
    }
    let Ok(mut doc) = serde_json::to_value(&api) else {
        return api;
    };
    let closed: serde_json::Map<String, Value> = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .map(|schemas| {
            schemas
                .iter()
                .filter(|(_, s)| s.get("additionalProperties") == Some(&Value::Bool(false)))
                .map(|(name, s)| {
                    let mut open = s.clone();
                    if let Some(o) = open.as_object_mut() {
                        o.remove("additionalProperties");
                    }
                    (name.clone(), open)
                })
                .collect()
        })
        .unwrap_or_default();
    walk(&mut doc, &closed);
    serde_json::from_value(doc).unwrap_or(api)
}

/// The whole HTTP application with its middleware.
pub fn router(state: AppState) -> Router {
    let Groups {
        admin,
        tenant,
        uploads,
        public,
    } = groups();
    let (admin, _) = admin.split_for_parts();
    let (tenant, _) = tenant.split_for_parts();
    let (uploads, _) = uploads.split_for_parts();
    let (public, _) = public.split_for_parts();
    // route_layer: the outer layer (added last) runs first, so authentication precedes
    // idempotency, which needs to know the tenant.
    let admin = admin
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let tenant = tenant
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_tenant,
        ));
    let uploads = uploads.route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_tenant,
    ));
    let max_body = state.config.max_body_bytes;
    let timeout = |secs: u64| {
        TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(secs))
    };
    let request_timeout = state.config.request_timeout_secs;
    Router::new()
        .merge(admin.layer(timeout(request_timeout)))
        .merge(tenant.layer(timeout(request_timeout)))
        .merge(uploads.layer(timeout(state.config.import_timeout_secs)))
        .merge(public.layer(timeout(request_timeout)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track_metrics))
        .layer(middleware::from_fn(security_headers))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(make_span))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(middleware::from_fn(problem_for_bare_errors))
                .layer(CompressionLayer::new())
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(DefaultBodyLimit::max(max_body)),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("there is no such path; see /openapi.json or /docs".to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn make_span(request: &Request<axum::body::Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
    )
}

/// Responses made by layers (timeouts, limits) carry no problem body; give them one so that
/// every 4xx and 5xx of the API is problem+json.
async fn problem_for_bare_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // Problem documents and deliberate pages (the survey's HTML answers) pass through; bare
    // bodies and the plain-text defaults of layers and extractors get a problem document.
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|ct| ct.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with(PROBLEM_JSON) || content_type.starts_with("text/html") {
        return response;
    }
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than the server accepts",
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => {
            "the request took too long; retry later"
        }
        StatusCode::METHOD_NOT_ALLOWED => "this method is not allowed on this path",
        _ => "the request failed",
    };
    let mut problem = problem_response(&Problem {
        kind: "about:blank".to_owned(),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail: detail.to_owned(),
        errors: None,
    });
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = response.headers().get(&name) {
            problem.headers_mut().insert(name, v.clone());
        }
    }
    problem
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = %message, "handler panicked");
    ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
}

/// Headers every browser-facing answer needs: pages customers open from a message (survey,
/// unsubscribe) load nothing from elsewhere, cannot be framed (clickjacking a one-click
/// unsubscribe), and do not leak their tokened URL as a referrer; no answer is sniffed as
/// another type. `/docs` loads its own script and keeps a policy that allows it; the customer
/// pages of `crate::http::pages` state a narrower one of their own.
async fn security_headers(request: Request, next: Next) -> Response {
    let is_docs = request.uri().path() == "/docs";
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/html"));
    if html {
        let policy = if is_docs {
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; font-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        } else {
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        };
        // A page that states its own, narrower policy (`crate::http::pages`) keeps it.
        headers
            .entry(header::CONTENT_SECURITY_POLICY)
            .or_insert(header::HeaderValue::from_static(policy));
        headers.insert(
            header::X_FRAME_OPTIONS,
            header::HeaderValue::from_static("DENY"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            header::HeaderValue::from_static("no-referrer"),
        );
    }
    response
}

/// Counts requests and their latency by method, matched route and status.
async fn track_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}
