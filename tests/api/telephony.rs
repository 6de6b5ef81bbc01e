//! Telephony: Aircall webhooks replayed in order, reversed and duplicated give the same call,
//! timeline and card; missed calls open one call-back ticket; bad tokens store nothing.

use crate::common;

use axum::http::{Method, StatusCode};
use common::{TestApp, TestTenant};
use serde_json::{Value, json};

const T0: i64 = 1_763_800_000;

async fn tenant(app: &TestApp, slug: &str) -> TestTenant {
    let t = app.tenant(slug).await;
    let r = app
        .put(
            "/v1/integrations/aircall",
            &t.key,
            json!({"webhook_token": "aircall-secret", "api_id": "id1", "api_token": "tok"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.post(
        "/v1/agents",
        &t.key,
        json!({"name": "Marija", "email": "marija@acme.example"}),
    )
    .await;
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana", "phone": "091 234 5678"}),
    )
    .await;
    t
}

fn event(name: &str, data: Value) -> Value {
    json!({"resource": "call", "event": name, "timestamp": T0, "token": "aircall-secret", "data": data})
}

/// A realistic answered inbound call, as Aircall sends it.
fn answered_call(id: i64) -> Vec<Value> {
    let user = json!({"id": 42, "name": "Marija", "email": "marija@acme.example"});
    vec![
        event(
            "call.created",
            json!({"id": id, "direction": "inbound", "status": "initial", "raw_digits": "+385 91 234 5678", "started_at": T0, "answered_at": null, "ended_at": null, "user": null}),
        ),
        event(
            "call.ringing_on_agent",
            json!({"id": id, "direction": "inbound", "status": "initial", "raw_digits": "+385 91 234 5678", "started_at": T0, "user": user}),
        ),
        event(
            "call.answered",
            json!({"id": id, "direction": "inbound", "status": "answered", "raw_digits": "+385 91 234 5678", "started_at": T0, "answered_at": T0 + 5, "user": user}),
        ),
        event(
            "call.hungup",
            json!({"id": id, "direction": "inbound", "status": "done", "raw_digits": "+385 91 234 5678", "started_at": T0, "answered_at": T0 + 5, "ended_at": T0 + 65, "user": user}),
        ),
        event(
            "call.ended",
            json!({"id": id, "direction": "inbound", "status": "done", "raw_digits": "+385 91 234 5678", "started_at": T0, "answered_at": T0 + 5, "ended_at": T0 + 65, "duration": 60, "recording": "https://aircall.example/rec/1.mp3", "missed_call_reason": null, "user": user, "tags": [{"id": 1, "name": "billing"}]}),
        ),
    ]
}

async fn deliver(app: &TestApp, t: &TestTenant, body: &Value) -> (StatusCode, Value) {
    let r = app
        .call(
            Method::POST,
            &format!("/webhooks/aircall/{}", t.id),
            None,
            Some(body.clone()),
        )
        .await;
    (r.status, r.body)
}

/// The call and the contact's call events, without ids and bookkeeping times.
async fn outcome(app: &TestApp, t: &TestTenant) -> (Value, Vec<(String, String)>, Value) {
    let calls = app.get("/v1/calls", &t.key).await.body["data"].clone();
    let mut call = calls[0].clone();
    for k in [
        "id",
        "contact_id",
        "agent_id",
        "created_at",
        "updated_at",
        "ticket_id",
    ] {
        call.as_object_mut().unwrap().remove(k);
    }
    let contact = app.get("/v1/contacts?external_id=ana", &t.key).await.body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tl = app
        .get(
            &format!("/v1/contacts/{contact}/timeline?limit=100"),
            &t.key,
        )
        .await;
    let mut events: Vec<(String, String)> = tl.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("call."))
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["occurred_at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    events.sort();
    let card = app
        .get("/v1/contacts/lookup?phone=%2B385912345678", &t.key)
        .await
        .body;
    let card_calls = json!(
        card["last_interactions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"].as_str().unwrap().starts_with("call."))
            .map(|e| e["type"].clone())
            .collect::<Vec<_>>()
    );
    (call, events, card_calls)
}

#[tokio::test]
async fn a_call_comes_out_the_same_in_order_reversed_and_duplicated() {
    let app = TestApp::new().await;
    let mut outcomes = Vec::new();
    for (slug, order) in [("inorder", 0), ("reversed", 1), ("twice", 2)] {
        let t = tenant(&app, slug).await;
        let mut events = answered_call(1001);
        match order {
            1 => events.reverse(),
            2 => events = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect(),
            _ => {}
        }
        for e in &events {
            let (status, body) = deliver(&app, &t, e).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        outcomes.push(outcome(&app, &t).await);
    }
    let (call, events, _) = &outcomes[0];
    assert_eq!(call["status"], "ended");
    assert_eq!(call["direction"], "inbound");
    assert_eq!(call["external_number"], "+385912345678");
    assert_eq!(call["duration_secs"], 60);
    assert_eq!(call["missed"], false);
    assert_eq!(call["recording_url"], "https://aircall.example/rec/1.mp3");
    assert_eq!(call["user_name"], "Marija");
    assert_eq!(
        events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["call.answered", "call.ended", "call.started"]
    );
    assert_eq!(outcomes[1], outcomes[0], "reversed");
    assert_eq!(outcomes[2], outcomes[0], "duplicated");
    // Matched to the contact and the agent, with no ticket for an answered call.
    let t = TestTenant {
        ..tenant_ref(&app, "inorder").await
    };
    let calls = app.get("/v1/calls", &t.key).await.body["data"].clone();
    assert!(calls[0]["contact_id"].is_string());
    assert!(calls[0]["agent_id"].is_string());
    assert!(calls[0]["ticket_id"].is_null());
    assert_eq!(app.get("/v1/tickets", &t.key).await.body["data"], json!([]));
}

async fn tenant_ref(app: &TestApp, slug: &str) -> TestTenant {
    let id: String = sqlx::query_scalar("SELECT id::text FROM tenants WHERE slug = $1")
        .bind(slug)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let k = app
        .post(
            &format!("/admin/v1/tenants/{id}/api-keys"),
            common::ADMIN,
            json!({"name": "again"}),
        )
        .await;
    TestTenant {
        id,
        key: k.body["key"].as_str().unwrap().to_owned(),
        key_id: k.body["id"].as_str().unwrap().to_owned(),
    }
}

#[tokio::test]
async fn a_missed_call_opens_one_callback_ticket() {
    let app = TestApp::new().await;
    let t = tenant(&app, "acme").await;
    let missed = |id: i64, voicemail: Value| {
        vec![
            event(
                "call.created",
                json!({"id": id, "direction": "inbound", "status": "initial", "raw_digits": "+385912345678", "started_at": T0}),
            ),
            event(
                "call.ended",
                json!({"id": id, "direction": "inbound", "status": "done", "raw_digits": "+385912345678", "started_at": T0,
            "answered_at": null, "ended_at": T0 + 30, "duration": 30, "missed_call_reason": "agents_did_not_answer", "voicemail": voicemail}),
            ),
        ]
    };
    for e in missed(2001, Value::Null)
        .iter()
        .chain(missed(2001, Value::Null).iter())
    {
        assert_eq!(deliver(&app, &t, e).await.0, StatusCode::OK);
    }
    let calls = app.get("/v1/calls", &t.key).await.body["data"].clone();
    assert_eq!(calls[0]["missed"], true);
    assert_eq!(calls[0]["missed_reason"], "agents_did_not_answer");
    let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
    assert_eq!(
        tickets.as_array().unwrap().len(),
        1,
        "one call-back ticket, even with duplicates"
    );
    assert_eq!(tickets[0]["channel"], "phone");
    // Written by Rapport, in the tenant's language (the test tenants' is `hr`).
    assert_eq!(
        tickets[0]["subject"],
        "Propušten poziv s broja +385912345678"
    );
    assert!(
        tickets[0]["assignee_id"].is_string(),
        "assigned like any ticket"
    );
    assert_eq!(calls[0]["ticket_id"], tickets[0]["id"]);
    // The caller is told, by SMS (the number they called from), in their language.
    app.drain().await;
    let notices = |app: &TestApp| -> Vec<Value> {
        app.outbox_log()
            .into_iter()
            .filter(|m| m["to"] == "+385912345678")
            .collect()
    };
    let sent = notices(&app);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["channel"], "sms", "{}", sent[0]);
    assert_eq!(
        sent[0]["text"],
        "Tenant acme: žao nam je što smo propustili Vaš poziv. Nazvat ćemo Vas u najkraćem mogućem roku."
    );

    // A second missed call, with a voicemail, adds to the open phone ticket (and is not
    // announced twice).
    for e in missed(2002, json!("https://aircall.example/vm/2.mp3")) {
        deliver(&app, &t, &e).await;
    }
    app.drain().await;
    assert_eq!(notices(&app).len(), 1);
    let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
    assert_eq!(tickets.as_array().unwrap().len(), 1);
    let detail = app
        .get(
            &format!("/v1/tickets/{}", tickets[0]["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    let messages = detail.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["author"], "system", "not the customer's words");
    assert_eq!(messages[1]["author"], "system");
    assert!(
        messages[1]["body"]
            .as_str()
            .unwrap()
            .contains("glasovna poruka: https://aircall.example/vm/2.mp3"),
        "{}",
        messages[1]["body"]
    );
    let missed_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'call.missed'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(missed_events, 2);
}

#[tokio::test]
async fn bad_tokens_bad_payloads_and_unknown_numbers() {
    let app = TestApp::new().await;
    let t = tenant(&app, "acme").await;
    let mut forged = answered_call(3001)[0].clone();
    forged["token"] = json!("guess");
    let (status, _) = deliver(&app, &t, &forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut no_token = forged.clone();
    no_token.as_object_mut().unwrap().remove("token");
    assert_eq!(
        deliver(&app, &t, &no_token).await.0,
        StatusCode::UNAUTHORIZED
    );
    // A tenant without Aircall, or the wrong tenant's path.
    let other = app.tenant("other").await;
    assert_eq!(
        deliver(&app, &other, &answered_call(3001)[0]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing stored");

    let r = app
        .send(
            axum::http::Request::post(format!("/webhooks/aircall/{}", t.id))
                .header("content-type", "application/json")
                .body(axum::body::Body::from("{oops"))
                .unwrap(),
        )
        .await;
    r.assert_problem(400);
    // Events Rapport does not use are accepted and ignored (issue 19: Aircall disables a
    // webhook whose deliveries keep failing), and store nothing.
    let mut unknown = answered_call(3001)[0].clone();
    unknown["event"] = json!("call.teleported");
    assert_eq!(deliver(&app, &t, &unknown).await.0, StatusCode::OK);
    let mut user_event = answered_call(3001)[0].clone();
    user_event["resource"] = json!("user");
    user_event["event"] = json!("user.created");
    assert_eq!(deliver(&app, &t, &user_event).await.0, StatusCode::OK);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "ignored events store nothing");
    let mut no_id = answered_call(3001)[0].clone();
    no_id["data"].as_object_mut().unwrap().remove("id");
    assert_eq!(
        deliver(&app, &t, &no_id).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // An unknown number creates nothing but is kept on the call.
    let mut stranger = answered_call(3002);
    for e in &mut stranger {
        e["data"]["raw_digits"] = json!("+44 20 7946 0018");
    }
    for e in &stranger {
        assert_eq!(deliver(&app, &t, e).await.0, StatusCode::OK);
    }
    let calls = app.get("/v1/calls", &t.key).await.body["data"].clone();
    assert_eq!(calls[0]["external_number"], "+442079460018");
    assert!(calls[0]["contact_id"].is_null());
    let contacts = app.get("/v1/contacts", &t.key).await.body["data"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(contacts, 1, "no contact created");

    // Settings never show secrets; other tenants see no calls.
    let g = app.get("/v1/integrations/aircall", &t.key).await;
    assert_eq!(g.body["secrets"], json!(["api_token", "webhook_token"]));
    assert!(!g.text.contains("aircall-secret"));
    assert_eq!(
        app.get("/v1/calls", &other.key).await.body["data"],
        json!([])
    );
    let id = calls[0]["id"].as_str().unwrap();
    app.get(&format!("/v1/calls/{id}"), &other.key)
        .await
        .assert_problem(404);
    assert_eq!(
        app.get(&format!("/v1/calls/{id}"), &t.key).await.status,
        StatusCode::OK
    );
}

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn neutral(
    t: &TestTenant,
    id: &str,
    timestamp: i64,
    body: &Value,
    signature: Option<String>,
) -> axum::http::Request<axum::body::Body> {
    let raw = body.to_string();
    let key = rapport::telephony::routes::neutral::secret_key(WHSEC).unwrap();
    let sig = signature.unwrap_or_else(|| {
        rapport::telephony::routes::neutral::sign(&key, id, timestamp, raw.as_bytes())
    });
    axum::http::Request::post(format!("/webhooks/telephony/{}", t.id))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sig)
        .body(axum::body::Body::from(raw))
        .unwrap()
}

#[tokio::test]
async fn the_neutral_intake_is_signed_deduplicated_and_merged_like_aircall() {
    let app = TestApp::new().await;
    let t = tenant(&app, "acme").await;
    app.put(
        "/v1/integrations/telephony",
        &t.key,
        json!({"secret": "whsec_short"}),
    )
    .await
    .assert_problem(422);
    let r = app
        .put(
            "/v1/integrations/telephony",
            &t.key,
            json!({"secret": WHSEC}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let now = chrono::Utc::now().timestamp();
    let new_call = json!({"event": "newCall", "callId": "c-1", "direction": "in", "from": "091 234 5678", "to": "+38515555555", "user": ["Marija"]});
    let answer = json!({"event": "answer", "callId": "c-1", "direction": "in", "user": "Marija", "answeringNumber": "+38515555555"});
    let hangup =
        json!({"event": "hangup", "callId": "c-1", "direction": "in", "cause": "normalClearing"});

    let r = app
        .send(neutral(&t, "msg_1", now - 60, &new_call, None))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A redelivery of the same webhook-id changes nothing.
    let again = app
        .send(neutral(&t, "msg_1", now - 60, &new_call, None))
        .await;
    assert_eq!(again.body["duplicate"], true);
    // Rotation: any of several signatures may match.
    let key = rapport::telephony::routes::neutral::secret_key(WHSEC).unwrap();
    let good = rapport::telephony::routes::neutral::sign(
        &key,
        "msg_2",
        now - 30,
        answer.to_string().as_bytes(),
    );
    let r = app
        .send(neutral(
            &t,
            "msg_2",
            now - 30,
            &answer,
            Some(format!("v1,b2xkLXNpZ25hdHVyZQ== {good}")),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.send(neutral(&t, "msg_3", now, &hangup, None)).await;
    let call = app.get("/v1/calls", &t.key).await.body["data"][0].clone();
    assert_eq!(call["provider"], "neutral");
    assert_eq!(call["status"], "ended");
    assert_eq!(call["external_number"], "+385912345678");
    assert!(call["contact_id"].is_string());
    assert_eq!(call["missed"], false);

    // Forged, stale or unsigned deliveries are refused and change nothing.
    let forged =
        json!({"event": "newCall", "callId": "c-2", "direction": "in", "from": "+385912345678"});
    assert_eq!(
        app.send(neutral(&t, "msg_4", now, &forged, Some("v1,AAAA".into())))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.send(neutral(&t, "msg_5", now - 3600, &forged, None))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let other = app.tenant("other").await;
    assert_eq!(
        app.send(neutral(&other, "msg_6", now, &forged, None))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.get("/v1/calls", &t.key).await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let bad = json!({"event": "teleport", "callId": "c-3"});
    assert_eq!(
        app.send(neutral(&t, "msg_7", now, &bad, None)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // A missed inbound call opens a call-back ticket.
    app.send(neutral(
        &t,
        "msg_8",
        now - 20,
        &json!({"event": "newCall", "callId": "c-4", "direction": "in", "from": "+385912345678"}),
        None,
    ))
    .await;
    app.send(neutral(
        &t,
        "msg_9",
        now,
        &json!({"event": "hangup", "callId": "c-4", "direction": "in", "cause": "noAnswer"}),
        None,
    ))
    .await;
    let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
    assert_eq!(tickets.as_array().unwrap().len(), 1);
    assert_eq!(tickets[0]["channel"], "phone");
}

#[tokio::test]
async fn an_inbound_call_of_a_known_contact_pushes_one_insight_card() {
    use wiremock::matchers::{body_json, header, method, path};
    let app = TestApp::new().await;
    let t = tenant(&app, "acme").await;
    let server = wiremock::MockServer::start().await;
    app.put(
        "/v1/integrations/aircall",
        &t.key,
        json!({"api_base_url": server.uri()}),
    )
    .await;
    let marija = app.get("/v1/agents", &t.key).await.body["data"][0]["id"].clone();
    app.put(
        "/v1/contacts/ana",
        &t.key,
        json!({"last_name": "Horvat", "owner_agent_id": marija,
        "attributes": {"plan": "gold", "available_credit": 4200}}),
    )
    .await;
    app.post("/v1/tickets", &t.key, json!({"contact": {"external_id": "ana"}, "channel": "email", "subject": "Kartica", "body": "x"})).await;
    app.post(
        "/v1/csat",
        &t.key,
        json!({"contact": {"external_id": "ana"}, "score": 4, "source": "phone"}),
    )
    .await;
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "id1:tok")
    );
    wiremock::Mock::given(method("POST"))
        .and(path("/v1/calls/1001/insight_cards"))
        .and(header("authorization", basic.as_str()))
        .and(body_json(json!({"contents": [
            {"type": "title", "text": "Ana Horvat"},
            {"type": "shortText", "label": "Open tickets", "text": "1 (latest #1: Kartica)"},
            {"type": "shortText", "label": "Last CSAT", "text": "4/5"},
            {"type": "shortText", "label": "Advisor", "text": "Marija"},
            {"type": "shortText", "label": "plan", "text": "gold"},
            {"type": "shortText", "label": "available credit", "text": "4200"}
        ]})))
        .respond_with(wiremock::ResponseTemplate::new(201))
        .expect(1)
        .mount(&server)
        .await;
    let created = answered_call(1001)[0].clone();
    deliver(&app, &t, &created).await;
    deliver(&app, &t, &created).await; // redelivered: one card
    assert_eq!(
        rapport::worker::jobs::run_due(
            &app.app.state,
            &rapport::worker::jobs::JobRegistry::standard()
        )
        .await
        .unwrap(),
        1
    );
    server.verify().await;
    let status: String = sqlx::query_scalar("SELECT status FROM jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "done");
}
