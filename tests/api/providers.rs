//! Provider adapters against local servers that check the exact request each provider
//! documents (wiremock), and email through a real SMTP conversation.

use crate::common;

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use base64::Engine;
use common::{TestApp, TestTenant};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use wiremock::matchers::{body_json, header, method, path};

use wiremock::{Mock, MockServer, Request, ResponseTemplate};

async fn setup(app: &TestApp) -> TestTenant {
    let t = app.tenant("acme").await;
    let r = app
        .put("/v1/templates/notice", &t.key, json!({
            "email": {"hr": {"subject": "Obavijest {{ vars.n }}", "text": "Bok {{ contact.first_name }}", "html": "<p>Bok {{ contact.first_name }}</p>"}},
            "sms": {"hr": {"text": "Obavijest {{ vars.n }}"}},
            "viber": {"hr": {"text": "Viber obavijest {{ vars.n }}"}}
        }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    app.contact(&t, "ana", json!({"first_name": "Ana", "email": "ana@example.com", "phone": "091 234 5678", "viber_id": "vb-01234=="}))
        .await;
    t
}

async fn send(app: &TestApp, t: &TestTenant, channel: &str, n: u32) -> String {
    let r = app
        .post("/v1/messages", &t.key, json!({"contact": {"external_id": "ana"}, "template": "notice", "channel": channel, "variables": {"n": n}}))
        .await;
    assert_eq!(r.body["status"], "queued", "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn message(app: &TestApp, t: &TestTenant, id: &str) -> Value {
    app.get(&format!("/v1/messages/{id}"), &t.key).await.body
}

fn form(req: &Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect()
}

/// The body equals `expected` once the field at `pointer` is removed; that field, a string or an
/// object of `{delivery, seen}` URLs, starts with `prefix`.
fn json_without(
    expected: Value,
    pointer: &'static str,
    prefix: &str,
) -> impl Fn(&Request) -> bool + Send + Sync + 'static {
    let prefix = prefix.to_owned();
    move |req: &Request| {
        let Ok(mut body) = serde_json::from_slice::<Value>(&req.body) else {
            return false;
        };
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let Some(removed) = body
            .pointer_mut(parent)
            .and_then(|p| p.as_object_mut())
            .and_then(|o| o.remove(key))
        else {
            return false;
        };
        let urls: Vec<String> = match &removed {
            Value::String(s) => vec![s.clone()],
            Value::Object(o) => o
                .values()
                .filter_map(|v| v["url"].as_str().map(str::to_owned))
                .collect(),
            _ => vec![],
        };
        body == expected
            && !urls.is_empty()
            && urls
                .iter()
                .all(|u| u.contains("/webhooks/infobip/") && u.starts_with(&prefix))
    }
}

async fn configure(app: &TestApp, t: &TestTenant, channel: &str, body: Value) {
    let r = app
        .put(&format!("/v1/channels/{channel}"), &t.key, body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn twilio_gets_the_documented_request_and_its_answers_are_mapped() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let server = MockServer::start().await;
    configure(
        &app,
        &t,
        "sms",
        json!({"provider": "twilio",
        "settings": {"account_sid": "AC123", "from": "+15005550006", "base_url": server.uri()},
        "secrets": {"auth_token": "tok-secret"}}),
    )
    .await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("AC123:tok-secret")
    );

    // 503 first, then accepted.
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC123/Messages.json"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC123/Messages.json"))
        .and(header("authorization", basic.as_str()))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        // The message id is the request's idempotency token, on every attempt.
        .and(|req: &Request| {
            req.headers
                .get("i-twilio-idempotency-token")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| uuid::Uuid::parse_str(v).is_ok())
        })
        .and(|req: &Request| {
            let mut f = form(req);
            f.sort();
            f.len() == 4
                && f[0] == ("Body".to_owned(), "Obavijest 1".to_owned())
                && f[1] == ("From".to_owned(), "+15005550006".to_owned())
                && f[2].0 == "StatusCallback"
                && f[2].1.starts_with("http://localhost:8080/webhooks/twilio/")
                && f[3] == ("To".to_owned(), "+385912345678".to_owned())
        })
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM0123", "status": "queued"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let id = send(&app, &t, "sms", 1).await;
    app.drain().await;
    let m = message(&app, &t, &id).await;
    assert_eq!(m["status"], "queued", "retry after the 503");
    assert_eq!(m["status_reason"], "twilio: HTTP 503 Service Unavailable");
    sqlx::query("UPDATE messages SET next_attempt_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    app.drain().await;
    let m = message(&app, &t, &id).await;
    assert_eq!(m["status"], "sent");
    assert_eq!(m["provider"], "twilio");
    assert_eq!(m["provider_message_id"], "SM0123");
    server.verify().await;
}

#[tokio::test]
async fn twilio_400_fails_at_once_and_429_honours_retry_after() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let server = MockServer::start().await;
    configure(&app, &t, "sms", json!({"provider": "twilio",
        "settings": {"account_sid": "AC9", "messaging_service_sid": "MG1", "base_url": server.uri()},
        "secrets": {"auth_token": "t"}})).await;
    Mock::given(method("POST"))
        .and(|req: &Request| form(req).iter().any(|(k, v)| k == "Body" && v == "Obavijest 1"))
        .and(|req: &Request| form(req).iter().any(|(k, v)| k == "MessagingServiceSid" && v == "MG1"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"code": 21211,
            "message": "The 'To' number +385912345678 is not a valid phone number.", "status": 400})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(|req: &Request| {
            form(req)
                .iter()
                .any(|(k, v)| k == "Body" && v == "Obavijest 2")
        })
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "120"))
        .mount(&server)
        .await;
    let bad = send(&app, &t, "sms", 1).await;
    let limited = send(&app, &t, "sms", 2).await;
    app.drain().await;
    let m = message(&app, &t, &bad).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(
        m["status_reason"],
        "twilio 21211: The 'To' number +385912345678 is not a valid phone number."
    );
    assert_eq!(m["attempts"], 1);
    let m = message(&app, &t, &limited).await;
    assert_eq!(m["status"], "queued");
    let next: chrono::DateTime<chrono::Utc> =
        m["next_attempt_at"].as_str().unwrap().parse().unwrap();
    assert!(
        next >= chrono::Utc::now() + chrono::Duration::seconds(110),
        "Retry-After honoured: {next}"
    );
}

#[tokio::test]
async fn infobip_sms_and_viber_get_the_documented_requests() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let server = MockServer::start().await;
    configure(
        &app,
        &t,
        "sms",
        json!({"provider": "infobip",
        "settings": {"base_url": server.uri(), "from": "Acme"}, "secrets": {"api_key": "ib-key"}}),
    )
    .await;
    configure(&app, &t, "viber", json!({"provider": "infobip",
        "settings": {"base_url": format!("{}/", server.uri()), "sender": "AcmeViber"}, "secrets": {"api_key": "ib-key"}})).await;
    let sms = send(&app, &t, "sms", 1).await;
    let viber = send(&app, &t, "viber", 2).await;
    Mock::given(method("POST"))
        .and(path("/sms/2/text/advanced"))
        .and(header("authorization", "App ib-key"))
        .and(json_without(json!({"messages": [{"from": "Acme",
            "destinations": [{"to": "385912345678", "messageId": sms}],
            "text": "Obavijest 1", "callbackData": sms}]}), "/messages/0/notifyUrl", &format!("http://localhost:8080/webhooks/infobip/{}?token=", t.id)))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"bulkId": "b-1", "messages": [{
            "to": "385912345678", "messageId": sms,
            "status": {"groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED", "description": "Message sent to next instance"}}]})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/viber/2/messages"))
        .and(header("authorization", "App ib-key"))
        .and(json_without(json!({"messages": [{"sender": "AcmeViber",
            "destinations": [{"to": "385912345678", "messageId": viber}],
            "content": {"type": "TEXT", "text": "Viber obavijest 2"},
            "options": {"label": "TRANSACTIONAL"}, "callbackData": viber}]}), "/messages/0/webhooks", ""))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"bulkId": "b-2", "messages": [{
            "messageId": viber, "destination": "385912345678",
            "status": {"groupId": 1, "groupName": "PENDING", "id": 7, "name": "PENDING_ENROUTE", "description": "Message sent to next instance"}}]})))
        .expect(1)
        .mount(&server)
        .await;
    app.drain().await;
    for id in [&sms, &viber] {
        let m = message(&app, &t, id).await;
        assert_eq!(m["status"], "sent", "{m}");
        assert_eq!(m["provider"], "infobip");
        assert_eq!(m["provider_message_id"], id.as_str());
    }
    server.verify().await;
}

#[tokio::test]
async fn infobip_rejections_and_errors_fail_with_the_reason() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let server = MockServer::start().await;
    configure(
        &app,
        &t,
        "sms",
        json!({"provider": "infobip",
        "settings": {"base_url": server.uri(), "from": "Acme"}, "secrets": {"api_key": "k"}}),
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/sms/2/text/advanced"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"messages": [{"messageId": "x",
            "status": {"groupId": 5, "groupName": "REJECTED", "id": 51, "name": "REJECTED_DESTINATION", "description": "Invalid destination address"}}]})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/sms/2/text/advanced"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"requestError": {"serviceException": {"messageId": "UNAUTHORIZED", "text": "Invalid login details"}}})))
        .mount(&server)
        .await;
    let rejected = send(&app, &t, "sms", 1).await;
    app.drain().await;
    let unauthorized = send(&app, &t, "sms", 2).await;
    app.drain().await;
    assert_eq!(
        message(&app, &t, &rejected).await["status_reason"],
        "infobip: Invalid destination address"
    );
    let m = message(&app, &t, &unauthorized).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["status_reason"], "infobip: Invalid login details");
}

#[tokio::test]
async fn viber_bot_gets_the_documented_request_and_its_status_codes_are_mapped() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let server = MockServer::start().await;
    configure(&app, &t, "viber", json!({"provider": "viber",
        "settings": {"sender_name": "Acme", "base_url": server.uri()}, "secrets": {"auth_token": "vb-token"}})).await;
    let ok = send(&app, &t, "viber", 1).await;
    Mock::given(method("POST"))
        .and(path("/pa/send_message"))
        .and(header("x-viber-auth-token", "vb-token"))
        .and(body_json(
            json!({"receiver": "vb-01234==", "min_api_version": 1, "sender": {"name": "Acme"},
            "tracking_data": ok, "type": "text", "text": "Viber obavijest 1"}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"status": 0, "status_message": "ok",
            "message_token": 5741311803571721087_i64, "chat_hostname": "SN-CHAT-05_"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    app.drain().await;
    let m = message(&app, &t, &ok).await;
    assert_eq!(m["status"], "sent");
    assert_eq!(m["provider_message_id"], "5741311803571721087");
    server.verify().await;

    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"status": 6, "status_message": "receiverNotSubscribed"})),
        )
        .mount(&server)
        .await;
    let gone = send(&app, &t, "viber", 2).await;
    app.drain().await;
    let m = message(&app, &t, &gone).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["status_reason"], "viber 6: receiverNotSubscribed");
}

/// A minimal SMTP server: records each transaction's envelope and data; optionally refuses
/// every recipient with 550.
pub async fn smtp_sink(refuse_recipients: bool) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let store = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut transcript = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("MAIL FROM") {
                        transcript = format!("{line}\n");
                        b"250 2.1.0 OK\r\n"
                    } else if upper.starts_with("RCPT TO") {
                        transcript.push_str(&format!("{line}\n"));
                        if refuse_recipients {
                            b"550 5.1.1 No such user\r\n"
                        } else {
                            b"250 2.1.5 OK\r\n"
                        }
                    } else if upper == "DATA" {
                        write.write_all(b"354 go ahead\r\n").await.unwrap();
                        while let Ok(Some(data)) = lines.next_line().await {
                            if data == "." {
                                break;
                            }
                            transcript.push_str(&data);
                            transcript.push('\n');
                        }
                        store.lock().unwrap().push(transcript.clone());
                        b"250 2.0.0 queued\r\n"
                    } else if upper == "QUIT" {
                        write.write_all(b"221 bye\r\n").await.unwrap();
                        return;
                    } else {
                        b"250 OK\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, mails)
}

#[tokio::test]
async fn email_goes_through_a_real_smtp_conversation() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let (port, mails) = smtp_sink(false).await;
    configure(&app, &t, "email", json!({"provider": "smtp",
        "settings": {"host": "127.0.0.1", "port": port, "security": "none", "from": "shop@acme.example", "from_name": "Acme"}})).await;
    let id = send(&app, &t, "email", 1).await;
    app.drain().await;
    let m = message(&app, &t, &id).await;
    assert_eq!(m["status"], "sent", "{m}");
    assert_eq!(m["provider"], "smtp");
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(mail.starts_with("MAIL FROM:<shop@acme.example>"), "{mail}");
    assert!(mail.contains("RCPT TO:<ana@example.com>"), "{mail}");
    assert!(mail.contains("From: Acme <shop@acme.example>"), "{mail}");
    assert!(mail.contains("Subject: Obavijest 1"), "{mail}");
    assert!(
        mail.contains(&format!("Message-ID: <{id}@acme.example>")),
        "{mail}"
    );
    assert!(mail.contains("multipart/alternative"), "{mail}");
    assert!(mail.contains("<p>Bok Ana</p>"), "{mail}");
}

#[tokio::test]
async fn an_smtp_5xx_is_a_permanent_failure() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let (port, _) = smtp_sink(true).await;
    configure(&app, &t, "email", json!({"provider": "smtp",
        "settings": {"host": "127.0.0.1", "port": port, "security": "none", "from": "shop@acme.example"}})).await;
    let id = send(&app, &t, "email", 1).await;
    app.drain().await;
    let m = message(&app, &t, &id).await;
    assert_eq!(m["status"], "failed");
    assert!(
        m["status_reason"]
            .as_str()
            .unwrap()
            .contains("No such user"),
        "{m}"
    );
    assert_eq!(m["attempts"], 1);
}

#[tokio::test]
async fn channel_settings_keep_secrets_sealed_and_unshown() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let other = app.tenant("beta").await;
    let r = app.put("/v1/channels/sms", &t.key, json!({"provider": "twilio",
        "settings": {"account_sid": "AC1", "from": "+15005550006"}, "secrets": {"auth_token": "very-secret-token"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["secrets"], json!(["auth_token"]));
    assert!(!r.text.contains("very-secret-token"));
    let g = app.get("/v1/channels/sms", &t.key).await;
    assert_eq!(g.body["provider"], "twilio");
    assert!(!g.text.contains("very-secret-token"));
    let all = app.get("/v1/channels", &t.key).await;
    assert_eq!(all.body["data"].as_array().unwrap().len(), 3);
    assert_eq!(all.body["data"][0]["provider"], "log");
    let raw: String = sqlx::query_scalar("SELECT row_to_json(c)::text FROM channel_settings c")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!raw.contains("very-secret-token"), "sealed at rest");

    // Settings change without resending the secret: it is kept.
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "twilio",
        "settings": {"account_sid": "AC1", "from": "+15005550007"}}),
        )
        .await;
    assert_eq!(r.body["secrets"], json!(["auth_token"]));
    // Another provider needs its own secrets.
    let r = app.put("/v1/channels/sms", &t.key, json!({"provider": "infobip", "settings": {"base_url": "https://x.api.infobip.com", "from": "A"}})).await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["secrets.api_key"]);

    // Validation.
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "smtp", "settings": {}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["provider"]);
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "smtp", "settings": {"port": "x", "colour": "red", "from": "nope"}}),
        )
        .await;
    r.assert_problem(422);
    let mut fields = r.error_fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "settings.colour",
            "settings.from",
            "settings.host",
            "settings.port"
        ]
    );
    app.put("/v1/channels/fax", &t.key, json!({"provider": "log"}))
        .await
        .assert_problem(404);

    // Isolation: the other tenant sees its own (default) configuration.
    let theirs = app.get("/v1/channels/sms", &other.key).await;
    assert_eq!(theirs.body["provider"], "log");
    app.delete("/v1/channels/sms", &other.key)
        .await
        .assert_problem(404);
    assert_eq!(
        app.delete("/v1/channels/sms", &t.key).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get("/v1/channels/sms", &t.key).await.body["provider"],
        "log"
    );
}

#[tokio::test]
async fn secrets_cannot_be_stored_without_a_secret_key() {
    let app = TestApp::with_config(|c| c.secret_key = None).await;
    let t = app.tenant("acme").await;
    let r = app.put("/v1/channels/sms", &t.key, json!({"provider": "twilio",
        "settings": {"account_sid": "AC1", "from": "+15005550006"}, "secrets": {"auth_token": "x"}})).await;
    r.assert_problem(422);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("RAPPORT_SECRET_KEY")
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM channel_settings")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn marketing_email_carries_one_click_unsubscribe_headers() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let (port, mails) = smtp_sink(false).await;
    configure(&app, &t, "email", json!({"provider": "smtp",
        "settings": {"host": "127.0.0.1", "port": port, "security": "none", "from": "news@acme.example"}})).await;
    app.put(
        "/v1/templates/promo",
        &t.key,
        json!({"purpose": "marketing",
        "email": {"hr": {"subject": "Akcija", "text": "Odjava: {{ unsubscribe_url }}"}}}),
    )
    .await;
    app.contact(
        &t,
        "ana",
        json!({"consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "promo"}),
        )
        .await;
    assert_eq!(r.body["status"], "queued", "{}", r.text);
    send(&app, &t, "email", 2).await; // transactional: no unsubscribe headers
    app.drain().await;
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 2);
    let (marketing, transactional): (Vec<_>, Vec<_>) =
        mails.iter().partition(|m| m.contains("Subject: Akcija"));
    let m = marketing[0];
    assert!(
        m.contains("List-Unsubscribe: <http://localhost:8080/u/"),
        "{m}"
    );
    assert!(
        m.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        "{m}"
    );
    assert!(!transactional[0].contains("List-Unsubscribe"));
}
