//! The Idempotency-Key header: replay, mismatch, concurrency, scope, expiry of dead claims.

use crate::common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{ADMIN, Resp, TestApp};
use serde_json::{Value, json};

fn post_with_key(path: &str, token: &str, key: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn count(app: &TestApp, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn same_key_same_body_replays_the_first_response() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let body = json!({"type": "purchase.completed", "contact": {"external_id": "c"}});
    let first = app
        .send(post_with_key("/v1/events", &t.key, "req-1", &body))
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = app
        .send(post_with_key("/v1/events", &t.key, "req-1", &body))
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.text, first.text, "same body, byte for byte");
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(
        again.headers.get("content-type").unwrap(),
        "application/json"
    );
    assert_eq!(
        count(&app, "events WHERE type = 'purchase.completed'").await,
        1
    );

    // Admin POSTs too.
    let tenant = json!({"name": "Beta", "default_country": "SI", "default_locale": "sl", "timezone": "Europe/Ljubljana"});
    let a = app
        .send(post_with_key("/admin/v1/tenants", ADMIN, "t-1", &tenant))
        .await;
    let b = app
        .send(post_with_key("/admin/v1/tenants", ADMIN, "t-1", &tenant))
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(b.status, StatusCode::CREATED);
    assert_eq!(a.body["id"], b.body["id"]);
    assert_eq!(count(&app, "tenants").await, 2);
}

#[tokio::test]
async fn same_key_different_body_is_422() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let a = json!({"type": "purchase.completed", "contact": {"external_id": "c"}});
    let b = json!({"type": "purchase.completed", "contact": {"external_id": "d"}});
    assert_eq!(
        app.send(post_with_key("/v1/events", &t.key, "k", &a))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    let r = app.send(post_with_key("/v1/events", &t.key, "k", &b)).await;
    r.assert_problem(422);
    // Another path with the same key is another request too.
    let r = app
        .send(post_with_key(
            "/v1/events/batch",
            &t.key,
            "k",
            &json!({"events": [a]}),
        ))
        .await;
    r.assert_problem(422);
}

#[tokio::test]
async fn failed_requests_are_not_stored_so_a_corrected_retry_runs() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let bad = json!({"type": "purchase.completed", "contact": {"email": "later@example.com"}});
    app.send(post_with_key("/v1/events", &t.key, "k", &bad))
        .await
        .assert_problem(422);
    app.contact(&t, "x", json!({"email": "later@example.com"}))
        .await;
    let r = app
        .send(post_with_key("/v1/events", &t.key, "k", &bad))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

#[tokio::test]
async fn keys_are_scoped_per_tenant() {
    let app = TestApp::new().await;
    let a = app.tenant("a").await;
    let b = app.tenant("b").await;
    let body = json!({"type": "x.y", "contact": {"external_id": "c"}});
    let ra = app
        .send(post_with_key("/v1/events", &a.key, "shared", &body))
        .await;
    let rb = app
        .send(post_with_key("/v1/events", &b.key, "shared", &body))
        .await;
    assert_eq!(rb.status, StatusCode::ACCEPTED);
    assert!(rb.headers.get("idempotent-replayed").is_none());
    assert_ne!(ra.body["id"], rb.body["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_have_exactly_one_effect() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let body = json!({"contacts": [{"external_id": "c1"}, {"external_id": "c2"}]});
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let router = app.router.clone();
        let req = post_with_key("/v1/contacts/batch", &t.key, "same", &body);
        tasks.spawn(async move {
            let resp = tower::ServiceExt::oneshot(router, req).await.unwrap();
            let status = resp.status();
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        });
    }
    let mut ok_bodies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (status, text) = r.unwrap();
        match status {
            StatusCode::OK => ok_bodies.push(text),
            StatusCode::CONFLICT => assert!(text.contains("still being processed")),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert!(!ok_bodies.is_empty());
    assert!(
        ok_bodies.windows(2).all(|w| w[0] == w[1]),
        "every success is the same response"
    );
    assert_eq!(count(&app, "contacts").await, 2);
    assert_eq!(
        count(&app, "events WHERE type = 'contact.created'").await,
        2
    );
}

#[tokio::test]
async fn a_claim_left_by_a_dead_process_is_taken_over_after_its_lease() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let body = json!({"type": "x.y", "contact": {"external_id": "c"}});
    app.send(post_with_key("/v1/events", &t.key, "k", &body))
        .await;
    // Simulate a process that died mid-request on another key: claimed, never finished.
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, key, request_hash, locked_until)
         SELECT tenant_id, 'dead', request_hash, now() + interval '1 minute' FROM idempotency_keys",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let r: Resp = app
        .send(post_with_key("/v1/events", &t.key, "dead", &body))
        .await;
    r.assert_problem(409);
    sqlx::query(
        "UPDATE idempotency_keys SET locked_until = now() - interval '1 second' WHERE key = 'dead'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let r = app
        .send(post_with_key("/v1/events", &t.key, "dead", &body))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

#[tokio::test]
async fn invalid_keys_are_400_and_old_keys_are_purged() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let body = json!({"type": "x.y", "contact": {"external_id": "c"}});
    let long = "k".repeat(256);
    app.send(post_with_key("/v1/events", &t.key, &long, &body))
        .await
        .assert_problem(400);

    app.send(post_with_key("/v1/events", &t.key, "old", &body))
        .await;
    app.send(post_with_key("/v1/events", &t.key, "new", &body))
        .await;
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let purged = rapport::worker::purge_once(&app.app.state).await.unwrap();
    assert_eq!(purged, 1);
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(keys, ["new"]);
}
