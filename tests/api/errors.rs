//! Every bad input is a clear problem+json 4xx, never a 500, and nothing is half-written.

use crate::common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::TestApp;
use serde_json::json;

fn raw(
    method: Method,
    path: &str,
    key: &str,
    content_type: Option<&str>,
    body: &str,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"));
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.get("/nope", &t.key).await.assert_problem(404);
    app.get("/v1/nope", &t.key).await.assert_problem(404);
    let r = app.call(Method::DELETE, "/healthz", None, None).await;
    r.assert_problem(405);
    assert!(r.headers.get("allow").is_some());
    app.call(Method::PATCH, "/v1/events", Some(&t.key), None)
        .await
        .assert_problem(405);
}

#[tokio::test]
async fn malformed_json_is_400_and_wrong_shapes_are_422_with_the_field() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let ct = Some("application/json");
    let r = app
        .send(raw(Method::POST, "/v1/events", &t.key, ct, "{not json"))
        .await;
    r.assert_problem(400);
    let r = app
        .send(raw(Method::POST, "/v1/events", &t.key, ct, ""))
        .await;
    r.assert_problem(400);
    let r = app
        .send(raw(
            Method::POST,
            "/v1/events",
            &t.key,
            ct,
            r#"{"type": "a", "contact": {}} trailing"#,
        ))
        .await;
    r.assert_problem(400);

    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": 5, "contact": {"external_id": "x"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["type"]);

    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "a", "contact": {"external_id": "x", "nickname": "y"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["contact.nickname"]);

    let r = app
        .put(
            "/v1/contacts/c1",
            &t.key,
            json!({"consents": {"fax": {"marketing": "opted_in"}}}),
        )
        .await;
    r.assert_problem(422);
    let r = app
        .put(
            "/v1/contacts/c1",
            &t.key,
            json!({"consents": {"email": {"marketing": "maybe"}}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["consents.email.marketing"]);
    let r = app
        .put("/v1/contacts/c1", &t.key, json!({"owner_agent_id": "nope"}))
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["owner_agent_id"]);
    let r = app.post("/v1/events", &t.key, json!([1, 2])).await;
    r.assert_problem(422);

    // Nothing was written by any of these.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn missing_content_type_is_415() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let body = r#"{"type":"a.b","contact":{"external_id":"x"}}"#;
    app.send(raw(Method::POST, "/v1/events", &t.key, None, body))
        .await
        .assert_problem(415);
    app.send(raw(
        Method::POST,
        "/v1/events",
        &t.key,
        Some("text/plain"),
        body,
    ))
    .await
    .assert_problem(415);
    let ok = app
        .send(raw(
            Method::POST,
            "/v1/events",
            &t.key,
            Some("application/json; charset=utf-8"),
            body,
        ))
        .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.text);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = TestApp::with_config(|c| c.max_body_bytes = 4096).await;
    let t = app.tenant("acme").await;
    let big = format!(
        r#"{{"type":"a","contact":{{"external_id":"x"}},"properties":{{"p":"{}"}}}}"#,
        "x".repeat(10_000)
    );
    let r = app
        .send(raw(
            Method::POST,
            "/v1/events",
            &t.key,
            Some("application/json"),
            &big,
        ))
        .await;
    r.assert_problem(413);
    // Through the idempotency layer too, which reads the body first.
    let mut req = raw(
        Method::POST,
        "/v1/events",
        &t.key,
        Some("application/json"),
        &big,
    );
    req.headers_mut()
        .insert("idempotency-key", "k1".parse().unwrap());
    app.send(req).await.assert_problem(413);
}

#[tokio::test]
async fn bad_uuids_and_query_parameters_are_400() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.get("/v1/contacts/not-a-uuid", &t.key)
        .await
        .assert_problem(400);
    app.delete("/v1/contacts/123", &t.key)
        .await
        .assert_problem(400);
    app.get("/v1/contacts/not-a-uuid/timeline", &t.key)
        .await
        .assert_problem(400);
    app.get("/v1/events/zzz", &t.key).await.assert_problem(400);
    app.get("/admin/v1/tenants/zzz", common::ADMIN)
        .await
        .assert_problem(400);
    app.get("/v1/contacts?limit=abc", &t.key)
        .await
        .assert_problem(400);
    app.get("/v1/contacts?color=red", &t.key)
        .await
        .assert_problem(400);
}

#[tokio::test]
async fn invalid_phone_and_email_are_422_on_that_field() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put(
            "/v1/contacts/c1",
            &t.key,
            json!({"phone": "12345", "email": "nope"}),
        )
        .await;
    r.assert_problem(422);
    let mut fields = r.error_fields();
    fields.sort();
    assert_eq!(fields, ["email", "phone"]);
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "a", "contact": {"phone": "+1 000"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["contact.phone"]);
    let r = app.get("/v1/contacts?phone=abc", &t.key).await;
    r.assert_problem(422);
    let r = app.get("/v1/contacts/lookup?phone=1", &t.key).await;
    r.assert_problem(422);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let app = TestApp::new().await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert!(r.headers.get("x-request-id").is_some());
    let mut req = Request::builder()
        .uri("/healthz")
        .body(Body::empty())
        .unwrap();
    req.headers_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    let r = app.send(req).await;
    assert_eq!(r.headers.get("x-request-id").unwrap(), "abc-123");
}

#[tokio::test]
async fn nul_characters_are_422_not_500() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put("/v1/contacts/c1", &t.key, json!({"first_name": "A\u{0}B"}))
        .await;
    r.assert_problem(422);
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "a.b", "contact": {"external_id": "x"}, "properties": {"k": "\u{0}"}}),
        )
        .await;
    r.assert_problem(422);
    // Through the path, which no JSON check sees: the database's refusal is mapped to a 422.
    let r = app.put("/v1/contacts/a%00b", &t.key, json!({})).await;
    r.assert_problem(422);
    let r = app.get("/v1/contacts?external_id=a%00b", &t.key).await;
    r.assert_problem(422);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// A session PostgreSQL ended (an administrator, a restart) is the database being
/// unavailable for a moment: a 503 problem that says to retry, not a 500.
#[tokio::test]
async fn a_connection_the_server_closed_is_a_503_to_retry() {
    use axum::response::IntoResponse;
    use sqlx::Connection;

    let app = TestApp::new().await;
    let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    app.terminate_backend(pid).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let lost = sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let error = rapport::error::ApiError::from(lost);
    let problem = error.to_problem();
    assert_eq!(problem.status, 503, "{}", problem.detail);
    assert!(problem.detail.contains("retry"), "{}", problem.detail);
    let response = error.into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}
