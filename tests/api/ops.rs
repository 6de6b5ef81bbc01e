//! Operations: health, readiness, metrics, the OpenAPI document and the docs page.

use crate::common;

use axum::http::{Method, StatusCode};
use common::TestApp;

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::new().await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["status"], "ready");

    // A database with a pending migration is not ready.
    sqlx::query("DELETE FROM _sqlx_migrations")
        .execute(&app.pool)
        .await
        .unwrap();
    app.call(Method::GET, "/readyz", None, None)
        .await
        .assert_problem(503);
    // An unreachable database is not ready either.
    app.pool.close().await;
    app.call(Method::GET, "/readyz", None, None)
        .await
        .assert_problem(503);
}

#[tokio::test]
async fn metrics_are_labelled_by_route() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let c = app.contact(&t, "c1", serde_json::json!({})).await;
    app.get(
        &format!("/v1/contacts/{}", c["id"].as_str().unwrap()),
        &t.key,
    )
    .await;
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type().starts_with("text/plain"));
    assert!(
        r.text.contains(
            r#"http_requests_total{method="GET",route="/v1/contacts/{id}",status="200"}"#
        ),
        "{}",
        r.text
    );
    assert!(r.text.contains("http_request_duration_seconds_bucket"));
    // Raw ids never become labels.
    assert!(!r.text.contains(c["id"].as_str().unwrap()));
}

/// The served OpenAPI document is the committed one. To update the committed copy after an
/// intended API change: `cargo run -- openapi > docs/openapi.json`.
#[tokio::test]
async fn openapi_document_matches_the_committed_copy() {
    let app = TestApp::new().await;
    let r = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .expect("docs/openapi.json exists");
    let committed: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert!(
        committed == r.body,
        "the API changed: run `cargo run -- openapi > docs/openapi.json` and review the diff"
    );
    // Every route of the contract is documented.
    let paths = r.body["paths"].as_object().unwrap();
    for p in [
        "/admin/v1/tenants",
        "/admin/v1/tenants/{id}/api-keys/{key_id}",
        "/v1/contacts/{id}",
        "/v1/contacts/batch",
        "/v1/contacts/lookup",
        "/v1/contacts/{id}/timeline",
        "/v1/events",
        "/v1/events/batch",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "{p} is not documented");
    }
}

#[tokio::test]
async fn docs_page_renders_the_openapi_document() {
    let app = TestApp::new().await;
    let r = app.call(Method::GET, "/docs", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type().starts_with("text/html"));
    assert!(r.text.contains("/openapi.json"));
}

/// The pool pings only connections that sat idle (not one per request): a connection that
/// PostgreSQL closed meanwhile (a restart, an administrator) is replaced, never handed out.
#[tokio::test]
async fn pooled_connections_closed_by_the_server_are_replaced() {
    let app = TestApp::new().await;
    // One connection, so that every query below is on the same one until it is replaced.
    let pool = rapport::db::connect(&app.db.url, 1, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Back in the pool (sqlx checks a connection as it returns), then closed by the server.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    app.terminate_backend(pid).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let again: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the dead connection is replaced");
    assert_ne!(again, pid);
    pool.close().await;
}

/// The document is valid on its own, not only equal to its copy: every reference resolves,
/// operation ids are unique, every path parameter is declared, and every operation documents a
/// success and the shared problem answers. (CI also runs openapi-spec-validator and
/// schemathesis over it: tests/openapi_fuzz.sh.)
#[test]
fn the_openapi_document_is_self_consistent() {
    let doc: serde_json::Value =
        serde_json::from_str(&rapport::api::openapi().to_pretty_json().unwrap()).unwrap();
    let text = doc.to_string();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("\"$ref\":\"#/") {
        let tail = &rest[at + 9..];
        let end = tail.find('"').unwrap();
        let pointer = &tail[..end];
        assert!(
            doc.pointer(pointer).is_some(),
            "dangling reference {pointer}"
        );
        rest = &tail[end..];
    }
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_owned();
            assert!(
                ids.insert(id.clone()),
                "operationId {id} repeated ({method} {path})"
            );
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(['{', '}']);
                assert!(
                    declared.contains(&name),
                    "{method} {path}: {name} undeclared"
                );
            }
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses
                    .keys()
                    .any(|s| s.starts_with('2') || s.starts_with('3')),
                "{method} {path} has no success"
            );
            assert!(responses.contains_key("503"), "{method} {path} lacks 503");
            if path.starts_with("/v1/") {
                for status in ["401", "403", "429"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    } // A closed schema (no unknown fields) cannot be a member of an allOf: the other members'
    // fields would make every value invalid (a Campaign is its Definition plus id and status).
    fn no_closed_member(node: &serde_json::Value, doc: &serde_json::Value, at: &str) {
        match node {
            serde_json::Value::Object(map) => {
                for member in map
                    .get("allOf")
                    .and_then(|a| a.as_array())
                    .into_iter()
                    .flatten()
                {
                    let target = member["$ref"]
                        .as_str()
                        .and_then(|r| doc.pointer(r.trim_start_matches('#')))
                        .unwrap_or(member);
                    assert!(
                        target["additionalProperties"] != false,
                        "{at}: an allOf member forbids the other members' fields"
                    );
                }
                for (k, v) in map {
                    no_closed_member(v, doc, &format!("{at}/{k}"));
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    no_closed_member(v, doc, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }
    no_closed_member(&doc, &doc, "");
}

/// The patterns the document gives an event's `type` and a list's `cursor` are what the API
/// enforces: each sample matches the documented pattern (PostgreSQL's regular expressions
/// read it) exactly when the API accepts it.
#[tokio::test]
async fn documented_patterns_are_the_ones_the_api_enforces() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let doc = app
        .call(Method::GET, "/openapi.json", None, None)
        .await
        .body;
    let type_pattern = doc["components"]["schemas"]["NewEvent"]["properties"]["type"]["pattern"]
        .as_str()
        .expect("NewEvent.type has a pattern")
        .to_owned();
    let cursor_pattern = doc["paths"]["/v1/contacts/{id}/timeline"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cursor")
        .and_then(|p| p["schema"]["pattern"].as_str())
        .expect("the timeline's cursor has a pattern")
        .to_owned();
    let matches = |pattern: String, sample: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT $1 ~ $2")
                .bind(sample)
                .bind(pattern)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for kind in [
        "purchase.completed",
        "a",
        "credit_check.approved.v2",
        "Purchase.completed",
        "purchase..completed",
        ".purchase",
        "purchase.",
        "kupnja.završena",
        "purchase completed",
        "purchase-completed",
    ] {
        let r = app
            .post(
                "/v1/events",
                &t.key,
                serde_json::json!({"type": kind, "contact": {"external_id": "ana"}}),
            )
            .await;
        let accepted = r.status == StatusCode::ACCEPTED;
        assert!(
            accepted || r.status == StatusCode::UNPROCESSABLE_ENTITY,
            "{kind}: {}",
            r.text
        );
        assert_eq!(
            matches(type_pattern.clone(), kind.to_owned()).await,
            accepted,
            "`{kind}` against {type_pattern}"
        );
    }
    // The timeline's filter is held to the same rule (its own pattern in the document).
    let filter_pattern = doc["paths"]["/v1/contacts/{id}/timeline"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "type")
        .and_then(|p| p["schema"]["pattern"].as_str())
        .expect("the timeline's type filter has a pattern")
        .to_owned();
    assert_eq!(filter_pattern, type_pattern);
    let contact = app.contact(&t, "ivo", serde_json::json!({})).await;
    let id = contact["id"].as_str().unwrap().to_owned();
    // A real cursor matches; text outside base64url never decodes.
    for _ in 0..3 {
        app.post(
            "/v1/events",
            &t.key,
            serde_json::json!({"type": "a.b", "contact": {"external_id": "ivo"}}),
        )
        .await;
    }
    let page = app
        .get(&format!("/v1/contacts/{id}/timeline?limit=1"), &t.key)
        .await;
    let real = page.body["next_cursor"].as_str().unwrap().to_owned();
    for (kind, valid) in [("a.b", true), ("A.b", false), ("a..b", false)] {
        let r = app
            .get(
                &format!("/v1/contacts/{id}/timeline?type={}", urlencode(kind)),
                &t.key,
            )
            .await;
        if valid {
            assert_eq!(r.status, StatusCode::OK, "{kind}: {}", r.text);
        } else {
            r.assert_problem(400);
        }
        assert_eq!(
            matches(filter_pattern.clone(), kind.to_owned()).await,
            valid
        );
    }
    assert!(
        matches(cursor_pattern.clone(), real.clone()).await,
        "{real}"
    );
    for bad in ["a+b", "a/b", "a=b", "a b", "žž"] {
        assert!(
            !matches(cursor_pattern.clone(), bad.to_owned()).await,
            "{bad}"
        );
        let r = app
            .get(
                &format!("/v1/contacts/{id}/timeline?cursor={}", urlencode(bad)),
                &t.key,
            )
            .await;
        r.assert_problem(400);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
