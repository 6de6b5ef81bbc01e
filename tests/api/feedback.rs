//! Feedback from outside: signed delivery receipts (Twilio, Infobip, Viber), the email open
//! pixel, click redirects and one-click unsubscribe.

use crate::common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{TestApp, TestTenant, link};
use hmac::Mac;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn tenant_with_contact(app: &TestApp) -> TestTenant {
    let t = app.tenant("acme").await;
    app.put(
        "/v1/templates/notice",
        &t.key,
        json!({
            "sms": {"hr": {"text": "Obavijest {{ vars.n }}"}},
            "viber": {"hr": {"text": "Viber {{ vars.n }}"}},
            "email": {"hr": {"subject": "Obavijest", "text": "x"}}
        }),
    )
    .await;
    app.contact(
        &t,
        "ana",
        json!({"email": "ana@example.com", "phone": "091 234 5678", "viber_id": "vb-1"}),
    )
    .await;
    t
}

async fn send(app: &TestApp, t: &TestTenant, channel: &str, template: &str, n: u32) -> String {
    let r = app.post("/v1/messages", &t.key, json!({"contact": {"external_id": "ana"}, "template": template, "channel": channel, "variables": {"n": n}})).await;
    assert_eq!(r.body["status"], "queued", "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn status(app: &TestApp, t: &TestTenant, id: &str) -> Value {
    app.get(&format!("/v1/messages/{id}"), &t.key).await.body
}

async fn count_events(app: &TestApp, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE type = $1")
        .bind(kind)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn form_post(uri: &str, headers: &[(&str, &str)], body: String) -> Request<Body> {
    let mut b = Request::post(uri).header("content-type", "application/x-www-form-urlencoded");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn twilio_receipts_are_verified_applied_once_and_mapped() {
    let app = TestApp::new().await;
    let t = tenant_with_contact(&app).await;
    let server = MockServer::start().await;
    app.put("/v1/channels/sms", &t.key, json!({"provider": "twilio",
        "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": server.uri()}, "secrets": {"auth_token": "tw-token"}})).await;
    let sids = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = sids.clone();
    Mock::given(method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ResponseTemplate::new(201).set_body_json(json!({"sid": format!("SM{n}")}))
        })
        .mount(&server)
        .await;
    let delivered = send(&app, &t, "sms", "notice", 1).await;
    let undelivered = send(&app, &t, "sms", "notice", 2).await;
    app.drain().await;
    let sid_of = |m: &Value| m["provider_message_id"].as_str().unwrap().to_owned();
    let sid1 = sid_of(&status(&app, &t, &delivered).await);
    let sid2 = sid_of(&status(&app, &t, &undelivered).await);

    let url = format!("http://localhost:8080/webhooks/twilio/{}", t.id);
    let receipt = |sid: &str, state: &str, error: Option<&str>| {
        let mut params = vec![
            ("MessageSid".to_owned(), sid.to_owned()),
            ("MessageStatus".to_owned(), state.to_owned()),
            ("AccountSid".to_owned(), "AC1".to_owned()),
        ];
        if let Some(code) = error {
            params.push(("ErrorCode".to_owned(), code.to_owned()));
        }
        let signature = rapport::webhooks::routes::twilio_signature("tw-token", &url, &params);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        (signature, body)
    };
    let path = format!("/webhooks/twilio/{}", t.id);

    // A bad signature changes nothing.
    let (_, body) = receipt(&sid1, "delivered", None);
    app.send(form_post(
        &path,
        &[("x-twilio-signature", "AAAA")],
        body.clone(),
    ))
    .await
    .assert_problem(401);
    app.send(form_post(&path, &[], body))
        .await
        .assert_problem(401);
    assert_eq!(status(&app, &t, &delivered).await["status"], "sent");

    let (sig, body) = receipt(&sid1, "delivered", None);
    for _ in 0..2 {
        let r = app
            .send(form_post(
                &path,
                &[("x-twilio-signature", &sig)],
                body.clone(),
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    }
    let m = status(&app, &t, &delivered).await;
    assert_eq!(m["status"], "delivered");
    assert!(m["delivered_at"].is_string());
    assert_eq!(
        count_events(&app, "message.delivered").await,
        1,
        "the duplicate changed nothing"
    );

    let (sig, body) = receipt(&sid2, "undelivered", Some("30003"));
    app.send(form_post(&path, &[("x-twilio-signature", &sig)], body))
        .await;
    let m = status(&app, &t, &undelivered).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["status_reason"], "twilio 30003: undelivered");
    // A late "delivered" cannot roll a failed message forward again, nor a delivered one back.
    let (sig, body) = receipt(&sid1, "failed", Some("30008"));
    app.send(form_post(&path, &[("x-twilio-signature", &sig)], body))
        .await;
    assert_eq!(status(&app, &t, &delivered).await["status"], "delivered");
}

#[tokio::test]
async fn infobip_reports_need_the_signed_notify_url() {
    let app = TestApp::new().await;
    let t = tenant_with_contact(&app).await;
    let other = app.tenant("beta").await;
    let server = MockServer::start().await;
    app.put(
        "/v1/channels/sms",
        &t.key,
        json!({"provider": "infobip",
        "settings": {"base_url": server.uri(), "from": "Acme"}, "secrets": {"api_key": "k"}}),
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/sms/2/text/advanced"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages": [{"status": {"groupName": "PENDING"}}]})),
        )
        .mount(&server)
        .await;
    let a = send(&app, &t, "sms", "notice", 1).await;
    let b = send(&app, &t, "sms", "notice", 2).await;
    app.drain().await;
    let requests = server.received_requests().await.unwrap();
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    let notify = body["messages"][0]["notifyUrl"]
        .as_str()
        .unwrap()
        .to_owned();
    let path_and_query = notify
        .strip_prefix("http://localhost:8080")
        .unwrap()
        .to_owned();

    let report = json!({"results": [
        {"messageId": a, "to": "385912345678", "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET"}},
        {"messageId": b, "to": "385912345678", "status": {"groupId": 2, "groupName": "UNDELIVERABLE", "id": 9, "name": "UNDELIVERABLE_NOT_DELIVERED", "description": "Message sent not delivered"}}
    ]});
    // Without the token, with a forged one, or with another tenant's path: refused.
    app.call(
        axum::http::Method::POST,
        &format!("/webhooks/infobip/{}", t.id),
        None,
        Some(report.clone()),
    )
    .await
    .assert_problem(401);
    app.call(
        axum::http::Method::POST,
        &format!("/webhooks/infobip/{}?token=AAAA", t.id),
        None,
        Some(report.clone()),
    )
    .await
    .assert_problem(401);
    let forged = path_and_query.replace(&t.id, &other.id);
    app.call(
        axum::http::Method::POST,
        &forged,
        None,
        Some(report.clone()),
    )
    .await
    .assert_problem(401);
    assert_eq!(status(&app, &t, &a).await["status"], "sent");

    let r = app
        .call(
            axum::http::Method::POST,
            &path_and_query,
            None,
            Some(report),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(status(&app, &t, &a).await["status"], "delivered");
    let m = status(&app, &t, &b).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["status_reason"], "infobip: Message sent not delivered");
}

#[tokio::test]
async fn viber_callbacks_are_verified_and_mapped() {
    let app = TestApp::new().await;
    let t = tenant_with_contact(&app).await;
    let server = MockServer::start().await;
    app.put("/v1/channels/viber", &t.key, json!({"provider": "viber",
        "settings": {"sender_name": "Acme", "base_url": server.uri()}, "secrets": {"auth_token": "vb-token"}})).await;
    Mock::given(method("POST"))
        .and(path("/pa/send_message"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"status": 0, "status_message": "ok", "message_token": 4912661846655238145_i64}),
        ))
        .mount(&server)
        .await;
    let id = send(&app, &t, "viber", "notice", 1).await;
    app.drain().await;
    let path = format!("/webhooks/viber/{}", t.id);
    let signed = |body: &Value| {
        let raw = body.to_string();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"vb-token").unwrap();
        mac.update(raw.as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        Request::post(&path)
            .header("content-type", "application/json")
            .header("x-viber-content-signature", sig)
            .body(Body::from(raw))
            .unwrap()
    };
    let delivered = json!({"event": "delivered", "timestamp": 1457764197627_i64, "message_token": 4912661846655238145_i64, "user_id": "vb-1"});
    let bad = Request::post(&path)
        .header("content-type", "application/json")
        .header("x-viber-content-signature", "00")
        .body(Body::from(delivered.to_string()))
        .unwrap();
    app.send(bad).await.assert_problem(401);
    assert_eq!(app.send(signed(&delivered)).await.status, StatusCode::OK);
    assert_eq!(status(&app, &t, &id).await["status"], "delivered");
    let seen = json!({"event": "seen", "timestamp": 1457764197627_i64, "message_token": 4912661846655238145_i64, "user_id": "vb-1"});
    app.send(signed(&seen)).await;
    assert_eq!(count_events(&app, "message.opened").await, 1);
    // Viber's own check when the webhook is set.
    assert_eq!(
        app.send(signed(
            &json!({"event": "webhook", "timestamp": 1, "message_token": 1})
        ))
        .await
        .status,
        StatusCode::OK
    );
    // A user who leaves the bot opts out of Viber.
    app.send(signed(
        &json!({"event": "unsubscribed", "timestamp": 1, "user_id": "vb-1"}),
    ))
    .await;
    let c = app.get("/v1/contacts?external_id=ana", &t.key).await;
    assert_eq!(
        c.body["data"][0]["consents"]["viber"]["transactional"]["status"],
        "opted_out"
    );
    assert_eq!(count_events(&app, "contact.unsubscribed").await, 1);
}

#[tokio::test]
async fn opens_clicks_and_unsubscribes_are_tracked_through_signed_links() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.put("/v1/templates/offer", &t.key, json!({"purpose": "marketing", "email": {"hr": {
        "subject": "Ponuda",
        "html": "<html><body><p>Ponuda za {{ contact.first_name }}</p><a href=\"https://shop.example/offer?a=1&amp;b=2\">Pogledaj</a> <a href=\"https://shop.example/interested\">Zanima me</a> <a href=\"{{ unsubscribe_url }}\">Odjava</a></body></html>",
        "text": "Odjava: {{ unsubscribe_url }}"}}})).await;
    app.contact(&t, "ana", json!({"first_name": "Ana", "email": "ana@example.com", "consents": {"email": {"marketing": "opted_in"}}})).await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "offer"}),
        )
        .await;
    assert_eq!(r.body["status"], "queued", "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    app.drain().await;
    let sent = app.outbox_log();
    let html = sent[0]["html"].as_str().unwrap();
    assert!(
        !html.contains("shop.example"),
        "links go through the redirect: {html}"
    );
    assert!(
        sent[0]["extras"]["unsubscribe_url"]
            .as_str()
            .unwrap()
            .starts_with("http://localhost:8080/u/")
    );
    assert!(sent[0]["text"].as_str().unwrap().contains("/u/"));

    // Click: a redirect to the stored target, and an event naming the link.
    let click = link(html, "/t/c/", 1);
    let r = app.call(axum::http::Method::GET, &click, None, None).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.headers["location"], "https://shop.example/interested");
    let first = link(html, "/t/c/", 0);
    let r = app.call(axum::http::Method::GET, &first, None, None).await;
    assert_eq!(r.headers["location"], "https://shop.example/offer?a=1&b=2");
    let clicked: Vec<Value> = sqlx::query_scalar(
        "SELECT properties FROM events WHERE type = 'message.clicked' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(clicked[0]["url"], "https://shop.example/interested");
    assert_eq!(clicked[0]["link"], 1);
    // A tampered token is a 404, never a redirect anywhere.
    let mut tampered = click.clone();
    tampered.pop();
    tampered.push(if click.ends_with('A') { 'B' } else { 'A' });
    app.call(axum::http::Method::GET, &tampered, None, None)
        .await
        .assert_problem(404);

    // Open: a GIF every time, one event.
    let pixel = link(html, "/t/o/", 0);
    for _ in 0..2 {
        let r = app.call(axum::http::Method::GET, &pixel, None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.content_type(), "image/gif");
    }
    assert_eq!(count_events(&app, "message.opened").await, 1);
    assert!(
        status(&app, &t, &id).await["status"] == "delivered",
        "an open proves delivery"
    );
    let r = app
        .call(axum::http::Method::GET, "/t/o/garbage", None, None)
        .await;
    assert_eq!(r.content_type(), "image/gif");

    // Unsubscribe: the page never unsubscribes by itself; the POST does.
    let unsubscribe = link(html, "/u/", 0);
    let page = app
        .call(axum::http::Method::GET, &unsubscribe, None, None)
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("<form method=\"post\""));
    // In the contact's language (the tenant's, Croatian), naming the company and the channel.
    assert!(page.text.contains(r#"<html lang="hr">"#));
    assert!(
        page.text.contains("<span>Tenant acme</span>"),
        "{}",
        page.text
    );
    assert!(
        page.text
            .contains("Želite li se odjaviti s naših ponuda i novosti koje šaljemo e-poštom?"),
        "{}",
        page.text
    );
    assert_eq!(count_events(&app, "contact.unsubscribed").await, 0);
    let one_click = Request::post(&unsubscribe)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("List-Unsubscribe=One-Click"))
        .unwrap();
    let done = app.send(one_click).await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(done.text.contains("Odjavljeni ste"), "{}", done.text);
    assert!(done.text.contains(r#"value="resubscribe""#), "a way back");
    let c = app.get("/v1/contacts?external_id=ana", &t.key).await;
    assert_eq!(
        c.body["data"][0]["consents"]["email"]["marketing"]["status"],
        "opted_out"
    );
    assert_eq!(
        c.body["data"][0]["consents"]["email"]["marketing"]["source"],
        "unsubscribe link"
    );
    assert_eq!(count_events(&app, "contact.unsubscribed").await, 1);
    // The next offer is suppressed.
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "offer"}),
        )
        .await;
    assert_eq!(r.body["status"], "suppressed");
    // Unsubscribed, not merely never asked.
    assert_eq!(r.body["status_reason"], "opted_out");
    // The contact is told, on the channel left, with the way back.
    app.drain().await;
    let confirmation = app
        .outbox_log()
        .into_iter()
        .find(|m| m["subject"] == "Odjava je potvrđena")
        .expect("the unsubscribe confirmation is sent");
    assert_eq!(confirmation["to"], "ana@example.com");
    let text = confirmation["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("http://localhost:8080{unsubscribe}")),
        "{text}"
    );
    // A second one-click POST changes nothing and sends nothing more.
    let again = Request::post(&unsubscribe)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("List-Unsubscribe=One-Click"))
        .unwrap();
    assert_eq!(app.send(again).await.status, StatusCode::OK);
    assert_eq!(count_events(&app, "contact.unsubscribed").await, 1);
    let page = app
        .call(axum::http::Method::GET, &unsubscribe, None, None)
        .await;
    assert!(page.text.contains("Već ste odjavljeni"), "{}", page.text);

    // Re-subscribing on the same token.
    let back = Request::post(&unsubscribe)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("action=resubscribe"))
        .unwrap();
    let back = app.send(back).await;
    assert_eq!(back.status, StatusCode::OK);
    assert!(
        back.text.contains("Ponovno ste prijavljeni"),
        "{}",
        back.text
    );
    let c = app.get("/v1/contacts?external_id=ana", &t.key).await;
    assert_eq!(
        c.body["data"][0]["consents"]["email"]["marketing"]["status"],
        "opted_in"
    );
    assert_eq!(
        c.body["data"][0]["consents"]["email"]["marketing"]["source"],
        "resubscribe link"
    );
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "offer"}),
        )
        .await;
    assert_eq!(r.body["status"], "queued", "{}", r.text);

    // A link that leads nowhere is a page too, in the browser's language.
    let garbage = Request::get("/u/garbage")
        .header("accept-language", "pl-PL,pl;q=0.9,en;q=0.5")
        .body(Body::empty())
        .unwrap();
    let r = app.send(garbage).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.content_type().starts_with("text/html"));
    assert!(
        r.text.contains("Ten link jest nieprawidłowy."),
        "{}",
        r.text
    );
}
