//! Conversations: agents' replies reach the customer (through the outbox, threaded in the
//! customer's mail client), and customers' replies reach the ticket.

use crate::common;

use axum::http::StatusCode;
use common::{TestApp, TestTenant};
use serde_json::{Value, json};

async fn agent(app: &TestApp, t: &TestTenant) -> String {
    let a = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "Marija Kovač", "email": "marija@acme.example"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    a.body["id"].as_str().unwrap().to_owned()
}

async fn reply(app: &TestApp, t: &TestTenant, ticket: &str, body: Value) -> common::Resp {
    app.post(&format!("/v1/tickets/{ticket}/messages"), &t.key, body)
        .await
}

/// Ana (ana@example.com) and her email ticket "Kartica" with `body`: its id.
pub async fn ana_email_ticket(app: &TestApp, t: &TestTenant, body: &str) -> String {
    app.contact(
        t,
        "ana",
        json!({"first_name": "Ana", "email": "ana@example.com"}),
    )
    .await;
    let tk = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "channel": "email",
                   "subject": "Kartica", "body": body}),
        )
        .await;
    assert_eq!(tk.status, StatusCode::CREATED, "{}", tk.text);
    tk.body["id"].as_str().unwrap().to_owned()
}

/// Header lines as a mail reader sees them (folded continuation lines joined).
fn unfold(mail: &str) -> String {
    mail.replace("\n ", " ").replace("\n\t", " ")
}

fn header<'a>(mail: &'a str, name: &str) -> Option<&'a str> {
    mail.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[tokio::test]
async fn an_agents_email_reply_reaches_the_customer_threaded_after_the_earlier_mails() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let (port, mails) = crate::providers::smtp_sink(false).await;
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "smtp",
        "settings": {"host": "127.0.0.1", "port": port, "security": "none",
                     "from": "podrska@acme.example", "from_name": "Acme"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let marija = agent(&app, &t).await;
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana", "email": "ana@example.com", "phone": "091 234 5678"}),
    )
    .await;
    let tk = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "channel": "email", "subject": "Kartica",
                   "body": "Kartica mi ne radi.\nMolim pomoć."}),
        )
        .await;
    assert_eq!(tk.status, StatusCode::CREATED, "{}", tk.text);
    let ticket = tk.body["id"].as_str().unwrap().to_owned();
    app.drain().await;
    let ack = mails.lock().unwrap()[0].clone();
    let ack_id = header(&ack, "Message-ID")
        .expect("the acknowledgement's Message-ID")
        .to_owned();
    assert!(ack_id.ends_with("@acme.example>"), "{ack_id}");

    // A public reply: queued in the same transaction, shown with its delivery.
    let r = reply(
        &app,
        &t,
        &ticket,
        json!({"author": {"agent_id": marija}, "body": "Kartica je odblokirana."}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let delivery = r.body["delivery"].clone();
    assert_eq!(delivery["status"], "queued", "{delivery}");
    assert_eq!(delivery["channel"], "email");
    assert_eq!(delivery["to"], "ana@example.com");
    app.drain().await;
    let sent = mails.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let mail = unfold(&sent[1]);
    assert!(mail.contains("RCPT TO:<ana@example.com>"), "{mail}");
    assert_eq!(header(&mail, "Subject"), Some("Re: Kartica [#1]"), "{mail}");
    assert_eq!(
        header(&mail, "In-Reply-To"),
        Some(ack_id.as_str()),
        "{mail}"
    );
    assert_eq!(header(&mail, "References"), Some(ack_id.as_str()), "{mail}");
    let reply_id = format!(
        "<{}@acme.example>",
        delivery["message_id"].as_str().unwrap()
    );
    assert_eq!(header(&mail, "Message-ID"), Some(reply_id.as_str()));
    assert!(mail.contains("Kartica je odblokirana."), "{mail}");
    assert!(mail.contains("Marija Kova"), "the agent signs: {mail}");
    // The customer's words, quoted below the reply.
    assert!(mail.contains("> Kartica mi ne radi."), "{mail}");
    assert!(mail.contains("> Molim pomo"), "{mail}");

    let detail = app.get(&format!("/v1/tickets/{ticket}"), &t.key).await;
    let messages = detail.body["messages"].as_array().unwrap();
    assert_eq!(messages[1]["delivery"]["status"], "sent", "{}", messages[1]);
    assert!(
        messages[0]["delivery"].is_null(),
        "the customer's own message"
    );

    // An internal note never goes out.
    let r = reply(
        &app,
        &t,
        &ticket,
        json!({"author": {"agent_id": marija}, "body": "Provjeriti limit.", "internal": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert!(r.body["delivery"].is_null());
    app.drain().await;
    assert_eq!(mails.lock().unwrap().len(), 2);

    // The next reply threads after both earlier mails.
    let r = reply(
        &app,
        &t,
        &ticket,
        json!({"author": {"agent_id": marija}, "body": "Javite ako još zapinje."}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    app.drain().await;
    let mail = unfold(&mails.lock().unwrap()[2]);
    assert_eq!(
        header(&mail, "In-Reply-To"),
        Some(reply_id.as_str()),
        "{mail}"
    );
    assert_eq!(
        header(&mail, "References"),
        Some(format!("{ack_id} {reply_id}").as_str()),
        "{mail}"
    );
}

#[tokio::test]
async fn replies_go_on_the_tickets_channel_or_the_best_one_and_can_come_from_snippets() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let marija = agent(&app, &t).await;
    app.contact(
        &t,
        "ivo",
        json!({"first_name": "Ivo", "phone": "091 765 4321"}),
    )
    .await;
    let snippet = app
        .put(
            "/v1/snippets/unblocked",
            &t.key,
            json!({"body": "Poštovani {{ contact.first_name }}, kartica radi od {{ vars.when }}. {{ agent.name }}"}),
        )
        .await;
    assert!(snippet.status.is_success(), "{}", snippet.text);
    let mut tickets = Vec::new();
    for channel in ["sms", "chat"] {
        let tk = app
            .post(
                "/v1/tickets",
                &t.key,
                json!({"contact": {"external_id": "ivo"}, "channel": channel,
                       "subject": "Kartica", "body": "?"}),
            )
            .await;
        assert_eq!(tk.status, StatusCode::CREATED, "{}", tk.text);
        tickets.push(tk.body["id"].as_str().unwrap().to_owned());
    }
    let r = reply(
        &app,
        &t,
        &tickets[0],
        json!({"author": {"agent_id": marija}, "snippet": "unblocked", "vars": {"when": "9:00"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        r.body["body"],
        "Poštovani Ivo, kartica radi od 9:00. Marija Kovač"
    );
    assert_eq!(r.body["delivery"]["channel"], "sms");
    assert_eq!(r.body["delivery"]["to"], "+385917654321");
    // A chat ticket: the contact's best channel (no email on file: SMS).
    let r = reply(
        &app,
        &t,
        &tickets[1],
        json!({"author": {"agent_id": marija}, "body": "Pišem Vam SMS-om."}),
    )
    .await;
    assert_eq!(r.body["delivery"]["channel"], "sms", "{}", r.text);
    app.drain().await;
    let texts: Vec<String> = app
        .outbox_log()
        .into_iter()
        .filter(|m| m["to"] == "+385917654321" && m["channel"] == "sms")
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        texts
            .contains(&"Poštovani Ivo, kartica radi od 9:00. Marija Kovač\nTenant acme".to_owned()),
        "{texts:?}"
    );
    assert!(
        texts.contains(&"Pišem Vam SMS-om.\nTenant acme".to_owned()),
        "{texts:?}"
    );

    // What a reply cannot be.
    for (body, field) in [
        (json!({"author": {"agent_id": marija}}), "body"),
        (
            json!({"author": {"agent_id": marija}, "body": "x", "snippet": "unblocked"}),
            "snippet",
        ),
        (
            json!({"author": "contact", "snippet": "unblocked"}),
            "snippet",
        ),
        (
            json!({"author": {"agent_id": marija}, "snippet": "nope"}),
            "snippet",
        ),
        (
            json!({"author": {"agent_id": marija}, "body": "x", "vars": {}}),
            "vars",
        ),
        (
            json!({"author": {"agent_id": marija}, "snippet": "unblocked"}),
            "snippet.body",
        ),
    ] {
        let r = reply(&app, &t, &tickets[0], body.clone()).await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), [field], "{body}: {}", r.text);
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ticket_messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 4, "nothing half-written");
}

mod inbound {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use hmac::Mac;
    use wiremock::matchers::{body_string_contains, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const TWILIO_TOKEN: &str = "tw-token";

    /// A tenant on Twilio (against a stub that records what it is sent), with agent Marija and
    /// contact Ana (+385912345678).
    async fn twilio_tenant(app: &TestApp) -> (TestTenant, MockServer, String) {
        let t = app.tenant("acme").await;
        let server = MockServer::start().await;
        let r = app
            .put(
                "/v1/channels/sms",
                &t.key,
                json!({"provider": "twilio",
            "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": server.uri()},
            "secrets": {"auth_token": TWILIO_TOKEN}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            r.body["webhook_url"],
            format!("http://localhost:8080/webhooks/twilio/{}", t.id),
            "the URL to give Twilio's number"
        );
        let sids = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        Mock::given(method("POST"))
            .respond_with(move |_: &wiremock::Request| {
                let n = sids.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                ResponseTemplate::new(201).set_body_json(json!({"sid": format!("SMout{n}")}))
            })
            .mount(&server)
            .await;
        let marija = agent(app, &t).await;
        app.contact(
            &t,
            "ana",
            json!({"first_name": "Ana", "phone": "091 234 5678",
                   "consents": {"sms": {"marketing": "opted_in"}}}),
        )
        .await;
        (t, server, marija)
    }

    /// A customer's SMS as Twilio posts it, signed.
    fn twilio_sms(t: &TestTenant, sid: &str, from: &str, body: &str) -> Request<Body> {
        let url = format!("http://localhost:8080/webhooks/twilio/{}", t.id);
        let params: Vec<(String, String)> = [
            ("MessageSid", sid),
            ("SmsSid", sid),
            ("AccountSid", "AC1"),
            ("From", from),
            ("To", "+15005550006"),
            ("Body", body),
            ("NumMedia", "0"),
            ("SmsStatus", "received"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let signature = rapport::webhooks::routes::twilio_signature(TWILIO_TOKEN, &url, &params);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        Request::post(format!("/webhooks/twilio/{}", t.id))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(Body::from(body))
            .unwrap()
    }

    /// The bodies Twilio was asked to send, in order.
    async fn sms_sent(server: &MockServer) -> Vec<String> {
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path().ends_with("/Messages.json"))
            .map(|r| {
                url::form_urlencoded::parse(&r.body)
                    .find(|(k, _)| k == "Body")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    async fn count(app: &TestApp, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
    }

    #[tokio::test]
    async fn an_sms_conversation_goes_both_ways_on_one_ticket() {
        let app = TestApp::new().await;
        let (t, server, marija) = twilio_tenant(&app).await;

        // The customer writes first: a new SMS ticket, acknowledged by SMS, answered TwiML.
        let r = app
            .send(twilio_sms(
                &t,
                "SMin1",
                "+385912345678",
                "Kartica mi ne radi",
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.content_type(), "text/xml");
        assert!(r.text.contains("<Response></Response>"), "{}", r.text);
        let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
        assert_eq!(tickets.as_array().unwrap().len(), 1);
        assert_eq!(tickets[0]["channel"], "sms");
        assert_eq!(tickets[0]["subject"], "Kartica mi ne radi");
        let ticket = tickets[0]["id"].as_str().unwrap().to_owned();

        // A redelivery changes nothing.
        let again = app
            .send(twilio_sms(
                &t,
                "SMin1",
                "+385912345678",
                "Kartica mi ne radi",
            ))
            .await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(count(&app, "SELECT count(*) FROM ticket_messages").await, 1);
        assert_eq!(
            count(&app, "SELECT count(*) FROM inbound_messages").await,
            1
        );

        // The agent answers; Twilio is asked to send it.
        let r = reply(
            &app,
            &t,
            &ticket,
            json!({"author": {"agent_id": marija}, "body": "Provjeravamo, javimo se."}),
        )
        .await;
        assert_eq!(r.body["delivery"]["channel"], "sms", "{}", r.text);
        app.drain().await;
        let sent = sms_sent(&server).await;
        // Two messages queued apart, sent in either order.
        assert_eq!(sent.len(), 2, "the acknowledgement and the reply: {sent:?}");
        assert!(
            sent.contains(&"Provjeravamo, javimo se.\nTenant acme".to_owned()),
            "{sent:?}"
        );

        // The ticket is solved; the customer's next SMS reopens it.
        let r = app
            .call(
                axum::http::Method::PATCH,
                &format!("/v1/tickets/{ticket}"),
                Some(&t.key),
                Some(json!({"status": "solved"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app
            .send(twilio_sms(&t, "SMin2", "+385912345678", "I dalje ne radi!"))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let detail = app.get(&format!("/v1/tickets/{ticket}"), &t.key).await;
        assert_eq!(detail.body["status"], "open", "reopened");
        let messages = detail.body["messages"].as_array().unwrap();
        let last = messages.last().unwrap();
        assert_eq!(last["author"], "contact");
        assert_eq!(last["body"], "I dalje ne radi!");
        assert_eq!(
            app.get("/v1/tickets", &t.key).await.body["data"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        // The timeline shows both directions.
        let contact = app.get("/v1/contacts?external_id=ana", &t.key).await.body["data"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let timeline = app
            .get(
                &format!("/v1/contacts/{contact}/timeline?limit=100"),
                &t.key,
            )
            .await;
        let kinds: Vec<&str> = timeline.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["type"].as_str())
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "message.received").count(),
            2,
            "{kinds:?}"
        );
        assert!(kinds.contains(&"message.sent"), "{kinds:?}");
        assert!(kinds.contains(&"ticket.reopened"), "{kinds:?}");
        let received = timeline.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "message.received")
            .unwrap()
            .clone();
        assert_eq!(received["properties"]["channel"], "sms", "{received}");
        assert_eq!(received["properties"]["ticket_id"], ticket.as_str());

        // A forged signature is a 401 and writes nothing.
        let mut forged = twilio_sms(&t, "SMin3", "+385912345678", "x");
        forged
            .headers_mut()
            .insert("x-twilio-signature", "AAAA".parse().unwrap());
        app.send(forged).await.assert_problem(401);
        assert_eq!(
            count(&app, "SELECT count(*) FROM inbound_messages").await,
            2
        );
    }

    #[tokio::test]
    async fn stop_and_start_change_consent_and_open_no_ticket() {
        let app = TestApp::new().await;
        let (t, server, _) = twilio_tenant(&app).await;
        let r = app
            .send(twilio_sms(&t, "SMs1", "+385912345678", " Stop "))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let ana = app.get("/v1/contacts?external_id=ana", &t.key).await.body["data"][0].clone();
        assert_eq!(ana["consents"]["sms"]["marketing"]["status"], "opted_out");
        assert_eq!(ana["consents"]["sms"]["marketing"]["source"], "sms STOP");
        assert_eq!(count(&app, "SELECT count(*) FROM tickets").await, 0);
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM events WHERE type = 'contact.unsubscribed'"
            )
            .await,
            1
        );
        app.drain().await;
        let sent = sms_sent(&server).await;
        assert_eq!(
            sent,
            [
                "Tenant acme: odjavljeni ste i više nećete primati marketinške poruke. Za ponovnu prijavu odgovorite START."
            ]
        );
        // The tenant's own word, then START.
        let r = app
            .put("/v1/settings", &t.key, json!({"start_keywords": ["OPET"]}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.send(twilio_sms(&t, "SMs2", "+385912345678", "opet"))
            .await;
        let ana = app.get("/v1/contacts?external_id=ana", &t.key).await.body["data"][0].clone();
        assert_eq!(ana["consents"]["sms"]["marketing"]["status"], "opted_in");
        assert_eq!(count(&app, "SELECT count(*) FROM tickets").await, 0);
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT kind FROM inbound_messages ORDER BY id")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(kinds, ["keyword", "keyword"]);
        let r = app
            .put(
                "/v1/settings",
                &t.key,
                json!({"stop_keywords": ["two words"]}),
            )
            .await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), ["stop_keywords"]);
    }

    #[tokio::test]
    async fn a_stranger_on_viber_becomes_a_contact_with_a_ticket_and_gets_the_answer_on_viber() {
        let app = TestApp::new().await;
        let t = app.tenant("acme").await;
        let server = MockServer::start().await;
        let r = app
            .put(
                "/v1/channels/viber",
                &t.key,
                json!({"provider": "viber",
            "settings": {"sender_name": "Acme", "base_url": server.uri()},
            "secrets": {"auth_token": "vb-token"}}),
            )
            .await;
        assert_eq!(
            r.body["webhook_url"],
            format!("http://localhost:8080/webhooks/viber/{}", t.id)
        );
        Mock::given(method("POST"))
            .and(path("/pa/send_message"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"status": 0, "status_message": "ok", "message_token": 5_i64}),
            ))
            .mount(&server)
            .await;
        let marija = agent(&app, &t).await;
        let event = json!({"event": "message", "timestamp": 1457764197627_i64,
            "message_token": 4912661846655238145_i64,
            "sender": {"id": "01234567890A=", "name": "Ivo", "language": "hr", "country": "HR"},
            "message": {"type": "text", "text": "Gdje je moja kartica?"}});
        let raw = event.to_string();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"vb-token").unwrap();
        mac.update(raw.as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        let post = |sig: &str| {
            Request::post(format!("/webhooks/viber/{}", t.id))
                .header("content-type", "application/json")
                .header("x-viber-content-signature", sig)
                .body(Body::from(raw.clone()))
                .unwrap()
        };
        app.send(post("00")).await.assert_problem(401);
        assert_eq!(
            count(&app, "SELECT count(*) FROM contacts").await,
            0,
            "nothing written"
        );
        for _ in 0..2 {
            assert_eq!(app.send(post(&sig)).await.status, StatusCode::OK);
        }
        assert_eq!(
            count(&app, "SELECT count(*) FROM contacts").await,
            1,
            "once"
        );
        let created: Value =
            sqlx::query_scalar("SELECT properties FROM events WHERE type = 'contact.created'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(created["via"], "inbound");
        let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
        assert_eq!(tickets[0]["channel"], "viber");
        let ticket = tickets[0]["id"].as_str().unwrap().to_owned();
        let r = reply(
            &app,
            &t,
            &ticket,
            json!({"author": {"agent_id": marija}, "body": "Poslana je jučer."}),
        )
        .await;
        assert_eq!(r.body["delivery"]["channel"], "viber", "{}", r.text);
        assert_eq!(r.body["delivery"]["to"], "01234567890A=");
        app.drain().await;
        let texts: Vec<Value> = server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
            .collect();
        assert!(
            texts.iter().any(|b| b["receiver"] == "01234567890A="
                && b["text"] == "Poslana je jučer.\n\nMarija Kovač, Tenant acme"),
            "{texts:?}"
        );
    }

    #[tokio::test]
    async fn infobip_forwards_sms_and_viber_to_the_signed_url_only() {
        let app = TestApp::new().await;
        let t = app.tenant("acme").await;
        let server = MockServer::start().await;
        let r = app
            .put(
                "/v1/channels/sms",
                &t.key,
                json!({"provider": "infobip",
            "settings": {"base_url": server.uri(), "from": "Acme"},
            "secrets": {"api_key": "ib-key"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let url = r.body["webhook_url"].as_str().unwrap().to_owned();
        let path_and_query = url
            .strip_prefix("http://localhost:8080")
            .unwrap()
            .to_owned();
        assert!(path_and_query.contains("?token="), "{url}");
        Mock::given(method("POST"))
            .and(body_string_contains("messages"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"messages": [{"messageId": "out-1", "status": {"groupName": "PENDING"}}]}),
            ))
            .mount(&server)
            .await;
        app.contact(&t, "ana", json!({"phone": "091 234 5678"}))
            .await;
        let post = |uri: &str, body: Value| {
            Request::post(uri)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap()
        };
        let sms = json!({"results": [{"messageId": "ib-in-1", "from": "385912345678",
            "to": "385998765432", "text": "Treba mi pomoć", "cleanText": "Treba mi pomoć",
            "keyword": "", "receivedAt": "2026-12-02T10:00:00.000+0000", "smsCount": 1}],
            "messageCount": 1, "pendingMessageCount": 0});
        let wrong = format!("/webhooks/infobip/{}?token=forged", t.id);
        app.send(post(&wrong, sms.clone()))
            .await
            .assert_problem(401);
        let r = app.send(post(&path_and_query, sms)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let viber = json!({"results": [{"messageId": "ib-in-2", "from": "385912345678",
            "to": "AcmeViber", "integrationType": "VIBER", "receivedAt": "2026-12-02T10:01:00.000+0000",
            "message": {"type": "TEXT", "text": "I na Viberu"}}], "messageCount": 1});
        let r = app.send(post(&path_and_query, viber)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        // Both from Ana (the number without its +), each on its channel's ticket.
        assert_eq!(count(&app, "SELECT count(*) FROM contacts").await, 1);
        let channels: Vec<String> =
            sqlx::query_scalar("SELECT channel FROM tickets ORDER BY number")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(channels, ["sms", "viber"]);
        let bad = json!({"results": [{"messageId": "ib-in-3", "text": "no sender"}]});
        let r = app.send(post(&path_and_query, bad)).await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), ["results[0].from"]);
    }
}

pub mod email_in {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use base64::Engine;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/mail/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// A raw mail to the tenant's email webhook, with HTTP Basic auth.
    pub fn post(t: &TestTenant, raw: Vec<u8>, password: &str, content_type: &str) -> Request<Body> {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("postfix:{password}"));
        Request::post(format!("/webhooks/email/{}", t.id))
            .header("content-type", content_type)
            .header("authorization", format!("Basic {auth}"))
            .body(Body::from(raw))
            .unwrap()
    }

    async fn setup(app: &TestApp) -> TestTenant {
        let t = app.tenant("acme").await;
        let r = app
            .put(
                "/v1/channels/email",
                &t.key,
                json!({"provider": "log", "secrets": {"inbound_secret": "s3cret"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            r.body["webhook_url"],
            format!("http://localhost:8080/webhooks/email/{}", t.id)
        );
        t
    }

    async fn ticket_messages(app: &TestApp, t: &TestTenant, ticket: &str) -> Vec<Value> {
        app.get(&format!("/v1/tickets/{ticket}"), &t.key).await.body["messages"]
            .as_array()
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn a_reply_by_email_joins_its_ticket_without_the_quoted_history() {
        let app = TestApp::new().await;
        let t = setup(&app).await;
        let ticket = super::ana_email_ticket(&app, &t, "Ne radi.").await;
        app.drain().await;
        let ack = app
            .outbox_log()
            .into_iter()
            .find(|m| m["to"] == "ana@example.com")
            .expect("acknowledged");
        // The acknowledgement's Message-ID, as the customer's mail client quotes it.
        let ack_id = format!("<{}@rapport.local>", ack["message_id"].as_str().unwrap());
        let raw = String::from_utf8(fixture("utf-8-reply.eml"))
            .unwrap()
            .replace("IN_REPLY_TO", &ack_id);
        // Solved meanwhile: the reply reopens it.
        app.call(
            axum::http::Method::PATCH,
            &format!("/v1/tickets/{ticket}"),
            Some(&t.key),
            Some(json!({"status": "solved"})),
        )
        .await;
        app.drain().await;
        let to_ana = |app: &TestApp| {
            app.outbox_log()
                .into_iter()
                .filter(|m| m["to"] == "ana@example.com")
                .count()
        };
        let sent = to_ana(&app);
        for _ in 0..2 {
            let r = app
                .send(post(
                    &t,
                    raw.clone().into_bytes(),
                    "s3cret",
                    "message/rfc822",
                ))
                .await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        }
        let messages = ticket_messages(&app, &t, &ticket).await;
        assert_eq!(messages.len(), 2, "once, on the same ticket: {messages:?}");
        assert_eq!(
            messages[1]["body"], "Još uvijek ne radi, probala sam ponovno.",
            "the quoted history stays out of the ticket"
        );
        let detail = app.get(&format!("/v1/tickets/{ticket}"), &t.key).await;
        assert_eq!(detail.body["status"], "open");
        // The whole text is kept with the inbound record the ticket message names.
        let inbound = messages[1]["inbound_id"]
            .as_str()
            .expect("inbound_id")
            .to_owned();
        let original = app
            .get(&format!("/v1/inbound-messages/{inbound}"), &t.key)
            .await;
        assert_eq!(original.status, StatusCode::OK, "{}", original.text);
        let full = original.body["body"].as_str().unwrap();
        assert!(full.contains("> Zaprimili smo Vaš upit."), "{full}");
        assert_eq!(original.body["subject"], "Re: Kartica [#1]");
        assert_eq!(original.body["sender"], "ana@example.com");
        assert_eq!(
            original.body["provider_message_id"],
            "CAFx=reply1@mail.gmail.com"
        );
        assert_eq!(original.body["ticket_id"], ticket.as_str());
        let other = app.tenant("other").await;
        app.get(&format!("/v1/inbound-messages/{inbound}"), &other.key)
            .await
            .assert_problem(404);

        // An out-of-office answer is recorded and goes nowhere.
        let r = app
            .send(post(
                &t,
                fixture("auto-reply.eml"),
                "s3cret",
                "message/rfc822",
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        assert_eq!(ticket_messages(&app, &t, &ticket).await.len(), 2);
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT kind FROM inbound_messages ORDER BY id")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(kinds, ["reply", "auto_reply"]);
        app.drain().await;
        assert_eq!(
            to_ana(&app),
            sent,
            "nothing answers a reply to a ticket or an auto-reply"
        );
    }

    #[tokio::test]
    async fn mail_in_windows_1250_and_iso_8859_2_reads_as_written() {
        let app = TestApp::new().await;
        let t = setup(&app).await;
        for name in ["windows-1250.eml", "iso-8859-2.eml"] {
            let r = app
                .send(post(&t, fixture(name), "s3cret", "message/rfc822"))
                .await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{name}: {}", r.text);
        }
        let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
        let mut subjects: Vec<String> = tickets
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["subject"].as_str().unwrap().to_owned())
            .collect();
        subjects.sort();
        assert_eq!(subjects, ["Kártya nem működik", "Žalba: povrat novca"]);
        let croatian = tickets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["subject"] == "Žalba: povrat novca")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let body = ticket_messages(&app, &t, &croatian).await[0]["body"].clone();
        assert!(
            body.as_str()
                .unwrap()
                .contains("čekam već tri dana povrat novca za narudžbu 4471. Žalim se!"),
            "{body}"
        );
        let hungarian = tickets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["subject"] != "Žalba: povrat novca")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let body = ticket_messages(&app, &t, &hungarian).await[0]["body"].clone();
        assert!(
            body.as_str()
                .unwrap()
                .contains("A kártyám nem működik külföldön."),
            "HTML only: its text: {body}"
        );
        assert!(!body.as_str().unwrap().contains('<'), "{body}");
        // Strangers by email became contacts, the address as mail servers compare it.
        let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM contacts ORDER BY email")
            .fetch_all(&app.pool)
            .await
            .unwrap();
        assert_eq!(
            emails,
            ["durdica.simic@example.hr", "gabor.kovacs@example.hu"]
        );
    }

    #[tokio::test]
    async fn the_mail_webhook_refuses_strangers_non_mail_and_huge_bodies() {
        let app = TestApp::new().await;
        let t = setup(&app).await;
        let raw = fixture("windows-1250.eml");
        app.send(post(&t, raw.clone(), "guess", "message/rfc822"))
            .await
            .assert_problem(401);
        let no_auth = Request::post(format!("/webhooks/email/{}", t.id))
            .header("content-type", "message/rfc822")
            .body(Body::from(raw.clone()))
            .unwrap();
        app.send(no_auth).await.assert_problem(401);
        // A tenant that set no inbound secret takes no mail.
        let other = app.tenant("other").await;
        app.send(post(&other, raw.clone(), "", "message/rfc822"))
            .await
            .assert_problem(401);
        app.send(post(&t, raw.clone(), "s3cret", "application/json"))
            .await
            .assert_problem(415);
        let r = app
            .send(post(
                &t,
                b"this is not mail".to_vec(),
                "s3cret",
                "message/rfc822",
            ))
            .await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), ["body"]);
        let huge = vec![b'a'; 30 * 1024 * 1024];
        let r = app.send(post(&t, huge, "s3cret", "message/rfc822")).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inbound_messages")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "nothing written");
    }
}

mod bounces {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use base64::Engine;

    /// A delivery status notification as Postfix writes it (RFC 3464).
    fn dsn(message_id: &str, recipient: &str, status: &str, diagnostic: &str) -> Vec<u8> {
        format!(
            "From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r
To: podrska@acme.example\r
Subject: Undelivered Mail Returned to Sender\r
Message-ID: <dsn-{status}-{recipient}@mx.example.com>\r
Auto-Submitted: auto-replied\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r
\r
--B1\r
Content-Type: text/plain; charset=us-ascii\r
\r
This is the mail system at host mx.example.com. I'm sorry to have to inform you that your\r
message could not be delivered to one or more recipients.\r
\r
--B1\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; mx.example.com\r
\r
Final-Recipient: rfc822; {recipient}\r
Original-Recipient: rfc822;{recipient}\r
Action: failed\r
Status: {status}\r
Diagnostic-Code: smtp; {diagnostic}\r
\r
--B1\r
Content-Type: text/rfc822-headers\r
\r
From: Acme <podrska@acme.example>\r
To: {recipient}\r
Subject: Obavijest\r
Message-ID: {message_id}\r
\r
--B1--\r
"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn a_bounce_fails_the_mail_and_a_hard_one_stops_mail_to_the_address() {
        let app = TestApp::new().await;
        let t = app.tenant("acme").await;
        let (port, _mails) = crate::providers::smtp_sink(false).await;
        let r = app
            .put(
                "/v1/channels/email",
                &t.key,
                json!({"provider": "smtp",
            "settings": {"host": "127.0.0.1", "port": port, "security": "none",
                         "from": "podrska@acme.example"},
            "secrets": {"inbound_secret": "s3cret"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.put(
            "/v1/templates/notice",
            &t.key,
            json!({"email": {"hr": {
            "subject": "Obavijest", "text": "Bok"}}}),
        )
        .await;
        for (who, email) in [("ana", "ana@example.com"), ("ivo", "ivo@example.com")] {
            app.contact(&t, who, json!({"email": email})).await;
        }
        let send = |who: &'static str| {
            let app = &app;
            let key = t.key.clone();
            async move {
                app.post(
                    "/v1/messages",
                    &key,
                    json!({"contact": {"external_id": who}, "template": "notice"}),
                )
                .await
            }
        };
        let to_ana = send("ana").await.body["id"].as_str().unwrap().to_owned();
        let to_ivo = send("ivo").await.body["id"].as_str().unwrap().to_owned();
        app.drain().await;
        let post = |raw: Vec<u8>| {
            let auth = base64::engine::general_purpose::STANDARD.encode("mx:s3cret");
            Request::post(format!("/webhooks/email/{}", t.id))
                .header("content-type", "message/rfc822")
                .header("authorization", format!("Basic {auth}"))
                .body(Body::from(raw))
                .unwrap()
        };
        let hard = dsn(
            &format!("<{to_ana}@acme.example>"),
            "ana@example.com",
            "5.1.1",
            "550 5.1.1 <ana@example.com>: Recipient address rejected: User unknown",
        );
        let soft = dsn(
            &format!("<{to_ivo}@acme.example>"),
            "ivo@example.com",
            "4.2.2",
            "452 4.2.2 Mailbox full",
        );
        for raw in [hard, soft] {
            let r = app.send(post(raw)).await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        }
        let ana = app.get(&format!("/v1/messages/{to_ana}"), &t.key).await;
        assert_eq!(ana.body["status"], "failed", "{}", ana.text);
        assert_eq!(
            ana.body["status_reason"],
            "bounced 5.1.1: smtp; 550 5.1.1 <ana@example.com>: Recipient address rejected: User unknown"
        );
        let ivo = app.get(&format!("/v1/messages/{to_ivo}"), &t.key).await;
        assert_eq!(ivo.body["status"], "failed");
        // The mail server is no contact and opens no ticket.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(n, 2);
        let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM inbound_messages")
            .fetch_all(&app.pool)
            .await
            .unwrap();
        assert_eq!(kinds, ["bounce", "bounce"]);

        // No more mail to the address that refused for good; a full mailbox is only a failure.
        let again = send("ana").await;
        assert_eq!(again.body["status"], "suppressed", "{}", again.text);
        assert_eq!(again.body["status_reason"], "bounced");
        assert_eq!(send("ivo").await.body["status"], "queued");
        // A new address takes mail again.
        app.put(
            "/v1/contacts/ana",
            &t.key,
            json!({"email": "ana.h@example.com"}),
        )
        .await;
        assert_eq!(send("ana").await.body["status"], "queued");
    }
}
