//! The error answers every route can give, declared once for the whole OpenAPI document.
//!
//! Each route documents what is particular to it (a 404 for an unknown id, a 409 for an
//! illegal transition); what comes from the shared machinery (authentication, the rate limit,
//! JSON and query extraction, body limits, a busy database) is added here to every operation
//! it applies to, as a reference to one `Problem` response. So the document lists every
//! status a client can meet, and a new route cannot forget one.

use utoipa::openapi::path::{HttpMethod, Operation, ParameterIn};
use utoipa::openapi::{Components, ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// The name of the shared response under `components.responses`.
const PROBLEM: &str = "Problem";

/// The shared problem+json response, for a route to name a status particular to it:
/// `(status = 404, response = ProblemResponse)` refers to the one declaration.
pub struct ProblemResponse;

impl<'s> utoipa::ToResponse<'s> for ProblemResponse {
    fn response() -> (&'s str, RefOr<Response>) {
        (PROBLEM, RefOr::T(problem_response()))
    }
}

/// Adds the shared error answers to every operation (see the module's doc).
pub struct CommonProblems;

impl utoipa::Modify for CommonProblems {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Components::default);
        components
            .responses
            .insert(PROBLEM.to_owned(), RefOr::T(problem_response()));
        for (path, item) in openapi.paths.paths.iter_mut() {
            let public = !path.starts_with("/v1/") && !path.starts_with("/admin/v1/");
            for (method, operation) in [
                (HttpMethod::Get, item.get.as_mut()),
                (HttpMethod::Post, item.post.as_mut()),
                (HttpMethod::Put, item.put.as_mut()),
                (HttpMethod::Patch, item.patch.as_mut()),
                (HttpMethod::Delete, item.delete.as_mut()),
            ] {
                if let Some(operation) = operation {
                    add_problems(path, &method, operation, public);
                }
            }
        }
    }
}

fn problem_response() -> Response {
    ResponseBuilder::new()
        .description(
            "An RFC 9457 problem document: `type`, `title`, `status`, `detail`, and `errors` \
             (each invalid field) on validation failures",
        )
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

fn add_problems(path: &str, method: &HttpMethod, operation: &mut Operation, public: bool) {
    let mut statuses: Vec<&str> = vec!["503"];
    let params = operation.parameters.as_deref().unwrap_or_default();
    let has_path_params = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Path));
    let has_query = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Query));
    if has_path_params {
        statuses.extend(["400", "404"]);
    }
    if has_query {
        statuses.extend(["400", "422"]);
    }
    if operation.request_body.is_some() {
        statuses.extend(["400", "413", "415", "422"]);
    }
    if !public {
        // Every tenant and admin route authenticates; a tenant key on an admin path and the
        // admin token on a tenant path are 403s; tenants have a request rate.
        statuses.extend(["401", "403"]);
        if path.starts_with("/v1/") {
            statuses.push("429");
        }
        if !matches!(method, HttpMethod::Get) {
            // A write can meet a unique name already taken or a state that forbids it.
            statuses.push("409");
        }
        if matches!(method, HttpMethod::Post) {
            // The Idempotency-Key header: malformed (400), reused with another body (422),
            // or still in use (409).
            statuses.extend(["400", "409", "422"]);
        }
    }
    for status in statuses {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::new(format!("#/components/responses/{PROBLEM}"))));
    }
}
