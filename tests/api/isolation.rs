//! Tenant isolation: another tenant's objects are a 404, exactly as if they did not exist.

use crate::common;

use axum::http::StatusCode;
use common::{ADMIN, TestApp};
use serde_json::json;

#[tokio::test]
async fn no_endpoint_shows_or_touches_another_tenants_data() {
    let app = TestApp::new().await;
    let a = app.tenant("alpha").await;
    let b = app.tenant("beta").await;

    let contact = app
        .contact(
            &a,
            "shared-id",
            json!({"email": "ana@example.com", "phone": "091 234 5678"}),
        )
        .await;
    let cid = contact["id"].as_str().unwrap();
    let ev = app
        .post(
            "/v1/events",
            &a.key,
            json!({"type": "purchase.completed", "contact": {"external_id": "shared-id"},
                                            "idempotency_key": "order-1"}),
        )
        .await;
    let eid = ev.body["id"].as_str().unwrap();

    // Reads by id: 404 for B, the same answer as for an id that never existed.
    let missing = uuid::Uuid::now_v7();
    for path in [
        format!("/v1/contacts/{cid}"),
        format!("/v1/contacts/{cid}/timeline"),
        format!("/v1/events/{eid}"),
    ] {
        let theirs = app.get(&path, &b.key).await;
        theirs.assert_problem(404);
        let never = app
            .get(
                &path
                    .replace(cid, &missing.to_string())
                    .replace(eid, &missing.to_string()),
                &b.key,
            )
            .await;
        never.assert_problem(404);
        assert_eq!(
            app.get(&path, &a.key).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    app.delete(&format!("/v1/contacts/{cid}"), &b.key)
        .await
        .assert_problem(404);

    // Lists and look-ups by address or external id find nothing of A's.
    for path in [
        "/v1/contacts",
        "/v1/contacts?email=ana@example.com",
        "/v1/contacts?phone=%2B385912345678",
        "/v1/contacts?external_id=shared-id",
    ] {
        let r = app.get(path, &b.key).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["data"], json!([]), "{path}");
    }
    app.get("/v1/contacts/lookup?phone=%2B385912345678", &b.key)
        .await
        .assert_problem(404);

    // Events by A's addresses are unknown contacts for B.
    let r = app
        .post(
            "/v1/events",
            &b.key,
            json!({"type": "x.y", "contact": {"email": "ana@example.com"}}),
        )
        .await;
    r.assert_problem(422);
    let r = app
        .post(
            "/v1/events",
            &b.key,
            json!({"type": "x.y", "contact": {"phone": "+385912345678"}}),
        )
        .await;
    r.assert_problem(422);
    // The same external id and idempotency key in B are B's own.
    let r = app
        .post(
            "/v1/events",
            &b.key,
            json!({"type": "purchase.completed", "contact": {"external_id": "shared-id"},
                                            "idempotency_key": "order-1"}),
        )
        .await;
    assert_eq!(r.body["duplicate"], false);
    assert_ne!(r.body["contact_id"], cid);
    let up = app
        .put(
            "/v1/contacts/shared-id",
            &b.key,
            json!({"first_name": "Mallory"}),
        )
        .await;
    assert_eq!(up.status, StatusCode::OK);
    assert_ne!(up.body["id"], cid);

    // Batches: B's items resolve to B's contacts only.
    let r = app
        .post(
            "/v1/contacts/batch",
            &b.key,
            json!({"contacts": [{"external_id": "shared-id", "last_name": "M"}]}),
        )
        .await;
    assert_eq!(r.body["results"][0]["status"], "updated");
    assert_ne!(r.body["results"][0]["contact"]["id"], cid);
    let r = app
        .post("/v1/events/batch", &b.key, json!({"events": [
            {"type": "x.y", "contact": {"email": "ana@example.com"}},
            {"type": "x.y", "contact": {"external_id": "shared-id"}, "idempotency_key": "order-1"}]}))
        .await;
    assert_eq!(r.body["results"][0]["status"], "rejected");
    assert_eq!(r.body["results"][1]["status"], "duplicate");
    assert_ne!(
        r.body["results"][1]["id"], eid,
        "B's own earlier event, not A's"
    );

    // A's contact is untouched.
    let mine = app.get(&format!("/v1/contacts/{cid}"), &a.key).await;
    assert!(mine.body["first_name"].is_null());
    assert_eq!(mine.body["stats"]["purchase.completed"], 1);
    let tl = app
        .get(&format!("/v1/contacts/{cid}/timeline"), &a.key)
        .await;
    assert_eq!(tl.body["data"].as_array().unwrap().len(), 2);

    // Keys: one tenant's key id under another tenant is a 404, and stays live.
    app.delete(
        &format!("/admin/v1/tenants/{}/api-keys/{}", b.id, a.key_id),
        ADMIN,
    )
    .await
    .assert_problem(404);
    assert_eq!(app.get("/v1/contacts", &a.key).await.status, StatusCode::OK);
    let keys = app
        .get(&format!("/admin/v1/tenants/{}/api-keys", b.id), ADMIN)
        .await;
    assert!(!keys.text.contains(&a.key_id));
}
