//! Tenants and API keys: the admin API and authentication.

use crate::common;

use axum::http::{Method, StatusCode};
use common::{ADMIN, TestApp};
use serde_json::json;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn operator_creates_lists_and_gets_tenants() {
    let app = TestApp::new().await;
    let r = app
        .post(
            "/admin/v1/tenants",
            ADMIN,
            json!({"name": "Acme Credit d.o.o.", "default_country": "hr", "default_locale": "hr",
                   "timezone": "Europe/Zagreb"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["slug"], "acme-credit-d-o-o");
    assert_eq!(r.body["default_country"], "HR");
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);

    let got = app.get(&format!("/admin/v1/tenants/{id}"), ADMIN).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, r.body);

    let list = app.get("/admin/v1/tenants", ADMIN).await;
    assert_eq!(list.body["data"][0]["id"], id);
    assert!(list.body["next_cursor"].is_null());

    let dup = app
        .post(
            "/admin/v1/tenants",
            ADMIN,
            json!({"name": "Other", "slug": "acme-credit-d-o-o", "default_country": "SI",
                   "default_locale": "sl", "timezone": "Europe/Ljubljana"}),
        )
        .await;
    dup.assert_problem(409);

    let missing = app
        .get(
            &format!("/admin/v1/tenants/{}", uuid::Uuid::now_v7()),
            ADMIN,
        )
        .await;
    missing.assert_problem(404);
}

#[tokio::test]
async fn tenant_fields_are_validated_all_at_once() {
    let app = TestApp::new().await;
    let r = app
        .post(
            "/admin/v1/tenants",
            ADMIN,
            json!({"name": " ", "default_country": "XX", "default_locale": "english",
                   "timezone": "Mars/Base"}),
        )
        .await;
    r.assert_problem(422);
    let mut fields = r.error_fields();
    fields.sort();
    assert_eq!(
        fields,
        ["default_country", "default_locale", "name", "timezone"]
    );
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(none, 0);
}

#[tokio::test]
async fn tenant_list_paginates_with_a_cursor() {
    let app = TestApp::new().await;
    for i in 0..5 {
        app.tenant(&format!("t{i}")).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/v1/tenants?limit=2&cursor={c}"),
            None => "/admin/v1/tenants?limit=2".to_owned(),
        };
        let page = app.get(&path, ADMIN).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        for t in page.body["data"].as_array().unwrap() {
            seen.push(t["slug"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["t4", "t3", "t2", "t1", "t0"]);
    app.get("/admin/v1/tenants?limit=0", ADMIN)
        .await
        .assert_problem(400);
    app.get("/admin/v1/tenants?limit=501", ADMIN)
        .await
        .assert_problem(400);
    app.get("/admin/v1/tenants?cursor=garbage", ADMIN)
        .await
        .assert_problem(400);
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_and_revocable_at_once() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    assert!(t.key.starts_with("rk_live_"));
    // 32 random bytes, base64url without padding.
    assert_eq!(t.key.len(), "rk_live_".len() + 43);

    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, Sha256::digest(t.key.as_bytes()).to_vec());
    let dump: String = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!dump.contains(&t.key), "the key itself must not be stored");

    let keys = app
        .get(&format!("/admin/v1/tenants/{}/api-keys", t.id), ADMIN)
        .await;
    assert_eq!(keys.body["data"][0]["id"], t.key_id.as_str());
    assert!(keys.body["data"][0].get("key").is_none());
    assert!(!keys.text.contains(&t.key));

    assert_eq!(app.get("/v1/contacts", &t.key).await.status, StatusCode::OK);
    let revoked = app
        .delete(
            &format!("/admin/v1/tenants/{}/api-keys/{}", t.id, t.key_id),
            ADMIN,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let after = app.get("/v1/contacts", &t.key).await;
    after.assert_problem(401);
    assert!(after.headers.get("www-authenticate").is_some());
}

#[tokio::test]
async fn authentication_failures_are_401_and_403() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    // No credentials, unknown keys, wrong scheme.
    app.call(Method::GET, "/v1/contacts", None, None)
        .await
        .assert_problem(401);
    app.get("/v1/contacts", "rk_live_unknown")
        .await
        .assert_problem(401);
    app.get("/v1/contacts", "garbage").await.assert_problem(401);
    // A tenant key on an admin path; the admin token on a tenant path.
    let r = app.get("/admin/v1/tenants", &t.key).await;
    r.assert_problem(403);
    app.get("/v1/contacts", ADMIN).await.assert_problem(403);
    app.get("/admin/v1/tenants", "wrong-admin")
        .await
        .assert_problem(401);
    app.call(Method::GET, "/admin/v1/tenants", None, None)
        .await
        .assert_problem(401);
}

#[tokio::test]
async fn admin_api_is_off_without_an_admin_token() {
    let app = TestApp::with_config(|c| c.admin_token = None).await;
    let r = app.get("/admin/v1/tenants", "anything").await;
    r.assert_problem(403);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("RAPPORT_ADMIN_TOKEN")
    );
}

#[tokio::test]
async fn revoking_an_unknown_key_is_404() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .delete(
            &format!(
                "/admin/v1/tenants/{}/api-keys/{}",
                t.id,
                uuid::Uuid::now_v7()
            ),
            ADMIN,
        )
        .await;
    r.assert_problem(404);
    let r = app
        .post(
            &format!("/admin/v1/tenants/{}/api-keys", uuid::Uuid::now_v7()),
            ADMIN,
            json!({"name": "x"}),
        )
        .await;
    r.assert_problem(404);
}

#[tokio::test]
async fn a_key_revoked_by_another_process_stops_working_at_once() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    // Seen a few times, the key is remembered by this process.
    for _ in 0..5 {
        assert_eq!(app.get("/v1/contacts", &t.key).await.status, StatusCode::OK);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Revoked behind this process's back, as `rapport api-key revoke` in another one would.
    sqlx::query("UPDATE api_keys SET revoked_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let status = app.get("/v1/contacts", &t.key).await.status;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key still works: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
