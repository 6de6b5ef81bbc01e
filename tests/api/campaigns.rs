//! Campaigns end to end through the HTTP API: the eight SPEC.md scenarios, frequency caps,
//! quiet hours, reentry, versions, and write-time validation. The engine's clock is moved by
//! hand and the worker drained, so days of journeys run in milliseconds without sleeping.

use crate::common;

use axum::http::{Method, StatusCode};
use chrono::{Duration, TimeZone, Utc};
use common::{TestApp, TestTenant, link};
use serde_json::{Value, json};

/// Creates and activates a campaign; returns its id.
async fn campaign(app: &TestApp, t: &TestTenant, def: Value) -> String {
    let r = app.post("/v1/campaigns", &t.key, def).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["status"], "draft");
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(&format!("/v1/campaigns/{id}/activate"), &t.key, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["status"], "active");
    id
}

async fn template(app: &TestApp, t: &TestTenant, key: &str, body: Value) {
    let r = app.put(&format!("/v1/templates/{key}"), &t.key, body).await;
    assert!(r.status.is_success(), "{}", r.text);
}

async fn event(app: &TestApp, t: &TestTenant, contact: &str, kind: &str, properties: Value) {
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": kind, "contact": {"external_id": contact}, "properties": properties}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

/// What the log provider sent: (channel, recipient, text).
fn sent(app: &TestApp) -> Vec<(String, String, String)> {
    app.outbox_log()
        .iter()
        .map(|m| {
            (
                m["channel"].as_str().unwrap_or_default().to_owned(),
                m["to"].as_str().unwrap_or_default().to_owned(),
                m["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn stats(app: &TestApp, t: &TestTenant, id: &str) -> Value {
    let r = app.get(&format!("/v1/campaigns/{id}/stats"), &t.key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body
}

/// The contact's timeline, oldest first, as (type, properties).
async fn timeline(app: &TestApp, t: &TestTenant, contact_id: &str) -> Vec<(String, Value)> {
    let r = app
        .get(
            &format!("/v1/contacts/{contact_id}/timeline?limit=500"),
            &t.key,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut items: Vec<(String, Value)> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "event" || e.get("type").is_some())
        .map(|e| {
            let e = if e.get("event").is_some() {
                &e["event"]
            } else {
                e
            };
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["properties"].clone(),
            )
        })
        .collect();
    items.reverse();
    items
}

fn campaign_steps(items: &[(String, Value)]) -> Vec<String> {
    items
        .iter()
        .filter(|(k, _)| k.starts_with("campaign."))
        .map(|(k, p)| {
            match (
                p["step"].as_str(),
                p["outcome"].as_str(),
                p["reason"].as_str(),
            ) {
                (Some(step), Some(outcome), _) => format!("{k}:{step}:{outcome}"),
                (Some(step), None, _) => format!("{k}:{step}"),
                (None, _, Some(reason)) => format!("{k}:{reason}"),
                _ => k.clone(),
            }
        })
        .collect()
}

fn id_of(contact: &Value) -> String {
    contact["id"].as_str().unwrap().to_owned()
}

async fn journeys(app: &TestApp, t: &TestTenant, campaign: &str) -> Vec<Value> {
    let r = app
        .get(
            &format!("/v1/campaigns/{campaign}/journeys?limit=500"),
            &t.key,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["data"].as_array().unwrap().clone()
}

async fn nudge_templates(app: &TestApp, t: &TestTenant) {
    template(
        app,
        t,
        "nudge",
        json!({"purpose": "marketing",
               "viber": {"hr": {"text": "Viber: {{ contact.first_name }}, vaš kredit čeka"}},
               "sms": {"hr": {"text": "SMS: {{ contact.first_name }}, vaš kredit čeka"}},
               "email": {"hr": {"subject": "Kredit", "text": "Email: {{ contact.first_name }}, vaš kredit čeka"}}}),
    )
    .await;
}

#[tokio::test]
async fn scenario_1_first_purchase_nudge_goes_viber_then_sms_then_email_by_consent() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    nudge_templates(&app, &t).await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "First purchase nudge",
               "trigger": {"event": "credit_check.approved"},
               "steps": [{"type": "wait", "duration": "3d"},
                         {"type": "send", "template": "nudge", "channels": ["viber", "sms", "email"]}],
               "exit_on": ["purchase.completed"]}),
    )
    .await;
    let ana = app.contact(&t, "ana", json!({"first_name": "Ana", "viber_id": "vb-ana", "phone": "091 111 1111",
        "email": "ana@example.com", "consents": {"viber": {"marketing": "opted_in"}, "sms": {"marketing": "opted_in"}}})).await;
    app.contact(
        &t,
        "ivo",
        json!({"first_name": "Ivo", "phone": "091 222 2222", "email": "ivo@example.com",
        "consents": {"sms": {"marketing": "opted_in"}, "email": {"marketing": "opted_in"}}}),
    )
    .await;
    app.contact(
        &t,
        "eva",
        json!({"first_name": "Eva", "email": "eva@example.com",
        "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    let maja = app
        .contact(
            &t,
            "maja",
            json!({"first_name": "Maja", "email": "maja@example.com",
        "consents": {"email": {"marketing": "opted_in"}}}),
        )
        .await;
    for c in ["ana", "ivo", "eva", "maja"] {
        event(&app, &t, c, "credit_check.approved", json!({"limit": 5000})).await;
    }
    app.drain().await;
    assert!(sent(&app).is_empty(), "nothing before three days");
    assert_eq!(stats(&app, &t, &id).await["active"], 4);

    // Maja buys on day 2: her nudge is off.
    app.advance(Duration::days(2));
    event(
        &app,
        &t,
        "maja",
        "purchase.completed",
        json!({"amount": 120}),
    )
    .await;
    app.drain().await;
    app.advance(Duration::days(1) + Duration::minutes(1));
    app.drain().await;

    let mut got = sent(&app);
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "email".into(),
                "eva@example.com".into(),
                "Email: Eva, vaš kredit čeka".into()
            ),
            (
                "sms".into(),
                "+385912222222".into(),
                "SMS: Ivo, vaš kredit čeka".into()
            ),
            (
                "viber".into(),
                "vb-ana".into(),
                "Viber: Ana, vaš kredit čeka".into()
            ),
        ]
    );
    let s = stats(&app, &t, &id).await;
    assert_eq!(s["enrolled"], 4);
    assert_eq!(s["completed"], 3);
    assert_eq!(s["exited"], 1);
    assert_eq!(s["converted"], 1);
    assert_eq!(s["active"], 0);
    assert_eq!(s["sent"], json!({"email": 1, "sms": 1, "viber": 1}));

    let steps = campaign_steps(&timeline(&app, &t, &id_of(&ana)).await);
    assert_eq!(
        steps,
        [
            "campaign.enrolled",
            "campaign.step:wait",
            "campaign.step:send:queued",
            "campaign.completed:completed"
        ]
    );
    let steps = campaign_steps(&timeline(&app, &t, &id_of(&maja)).await);
    assert_eq!(
        steps,
        [
            "campaign.enrolled",
            "campaign.step:wait",
            "campaign.exited:exit_on:purchase.completed"
        ]
    );
    // Draining again sends nothing twice.
    app.advance(Duration::days(30));
    app.drain().await;
    assert_eq!(sent(&app).len(), 3);
}

#[tokio::test]
async fn scenario_2_cross_sell_14_days_after_the_first_purchase_only() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "cross_sell", json!({"purpose": "marketing",
        "email": {"hr": {"subject": "Za vas", "text": "Uz {{ event.properties.product }} paše i torbica"}}})).await;
    for c in ["ana", "ivo", "eva"] {
        app.contact(
            &t,
            c,
            json!({"email": format!("{c}@example.com"),
            "consents": {"email": {"marketing": "opted_in"}}}),
        )
        .await;
    }
    // Ivo bought twice before the campaign existed.
    event(
        &app,
        &t,
        "ivo",
        "purchase.completed",
        json!({"product": "mobitel"}),
    )
    .await;
    event(
        &app,
        &t,
        "ivo",
        "purchase.completed",
        json!({"product": "tablet"}),
    )
    .await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "Second purchase",
               "trigger": {"event": "purchase.completed", "where": "contact.stats.purchase_completed == 1"},
               "steps": [{"type": "wait", "duration": "14d"},
                         {"type": "send", "template": "cross_sell", "channels": ["email"]}],
               "exit_on": ["purchase.completed"]}),
    )
    .await;
    event(
        &app,
        &t,
        "ana",
        "purchase.completed",
        json!({"product": "mobitel"}),
    )
    .await;
    event(
        &app,
        &t,
        "ivo",
        "purchase.completed",
        json!({"product": "laptop"}),
    )
    .await;
    event(
        &app,
        &t,
        "eva",
        "purchase.completed",
        json!({"product": "tv"}),
    )
    .await;
    app.drain().await;
    app.advance(Duration::days(5));
    // Eva's second purchase is what the cross-sell wanted: her journey converts.
    event(
        &app,
        &t,
        "eva",
        "purchase.completed",
        json!({"product": "soundbar"}),
    )
    .await;
    app.drain().await;
    app.advance(Duration::days(9) + Duration::seconds(1));
    app.drain().await;
    assert_eq!(
        sent(&app),
        vec![(
            "email".to_owned(),
            "ana@example.com".to_owned(),
            "Uz mobitel paše i torbica".to_owned()
        )]
    );
    let s = stats(&app, &t, &id).await;
    assert_eq!(
        (s["enrolled"].as_i64(), s["converted"].as_i64()),
        (Some(2), Some(1))
    );
}

#[tokio::test]
async fn scenario_3_almost_paid_off_fires_once_when_the_ratio_crosses_0_9() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "top_up", json!({"purpose": "marketing",
        "sms": {"hr": {"text": "Gotovo otplaćeno! Novi limit: {{ contact.attributes.credit_limit }}"}}})).await;
    app.contact(
        &t,
        "ana",
        json!({"phone": "091 111 1111", "consents": {"sms": {"marketing": "opted_in"}},
        "attributes": {"credit_limit": 10000, "available_credit": 5000}}),
    )
    .await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "Almost paid off",
               "trigger": {"condition": "contact.attributes.available_credit / contact.attributes.credit_limit > 0.9"},
               "steps": [{"type": "send", "template": "top_up", "channels": ["sms"]}]}),
    )
    .await;
    for available in [8000, 9500, 9700, 8000, 9600] {
        app.contact(
            &t,
            "ana",
            json!({"attributes": {"available_credit": available}}),
        )
        .await;
        app.drain().await;
    }
    // A contact that arrives already above the threshold crosses it on creation.
    app.contact(
        &t,
        "ivo",
        json!({"phone": "091 222 2222", "consents": {"sms": {"marketing": "opted_in"}},
        "attributes": {"credit_limit": 2000, "available_credit": 1990}}),
    )
    .await;
    // Another attribute changing does not re-fire a true condition.
    app.contact(&t, "ivo", json!({"attributes": {"segment": "gold"}}))
        .await;
    app.drain().await;
    let got = sent(&app);
    assert_eq!(
        got.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        ["+385911111111", "+385912222222"],
        "{got:?}"
    );
    assert_eq!(got[0].2, "Gotovo otplaćeno! Novi limit: 10000");
    assert_eq!(stats(&app, &t, &id).await["enrolled"], 2);
}

#[tokio::test]
async fn scenario_4_birthday_greeting_at_nine_in_each_contacts_time_zone() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "birthday", json!({"purpose": "marketing",
        "email": {"hr": {"subject": "Sretan rođendan", "text": "Sretan rođendan, {{ contact.first_name }}!"}}})).await;
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana", "email": "ana@example.com", "timezone": "Europe/Zagreb",
        "birthday": "1990-11-23", "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    app.contact(
        &t,
        "bob",
        json!({"first_name": "Bob", "email": "bob@example.com", "timezone": "America/New_York",
        "birthday": "1985-11-23", "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    app.contact(
        &t,
        "eva",
        json!({"first_name": "Eva", "email": "eva@example.com",
        "birthday": "1991-05-01", "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "Birthday", "trigger": {"schedule": "birthday", "at": "09:00"},
               "steps": [{"type": "send", "template": "birthday", "channels": ["email"]}],
               "reentry": "always"}),
    )
    .await;
    let clock = &app.app.state.clock;
    // 08:30 in Zagreb (UTC+1): too early for anyone.
    clock.set(Utc.with_ymd_and_hms(2026, 11, 23, 7, 30, 0).unwrap());
    app.drain().await;
    assert!(sent(&app).is_empty());
    // 09:00 in Zagreb, 03:00 in New York.
    clock.set(Utc.with_ymd_and_hms(2026, 11, 23, 8, 0, 0).unwrap());
    app.drain().await;
    assert_eq!(sent(&app).len(), 1);
    assert_eq!(sent(&app)[0].1, "ana@example.com");
    // 09:00 in New York (UTC-5).
    clock.set(Utc.with_ymd_and_hms(2026, 11, 23, 14, 0, 0).unwrap());
    app.drain().await;
    clock.set(Utc.with_ymd_and_hms(2026, 11, 23, 20, 0, 0).unwrap());
    app.drain().await;
    let got = sent(&app);
    assert_eq!(
        got.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        ["ana@example.com", "bob@example.com"]
    );
    assert_eq!(got[1].2, "Sretan rođendan, Bob!");
    // Next year, again: once.
    clock.set(Utc.with_ymd_and_hms(2027, 11, 23, 9, 0, 0).unwrap());
    app.drain().await;
    app.drain().await;
    assert_eq!(sent(&app).len(), 3);
    assert_eq!(stats(&app, &t, &id).await["enrolled"], 3);
}

#[tokio::test]
async fn scenario_5_abandoned_cart_reminder_after_two_hours_unless_purchased() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "cart", json!({"purpose": "marketing",
        "email": {"hr": {"subject": "Košarica", "text": "Vaša košarica čeka: {{ event.properties.cart_url }}"}}})).await;
    for c in ["ana", "ivo"] {
        app.contact(
            &t,
            c,
            json!({"email": format!("{c}@example.com"),
            "consents": {"email": {"marketing": "opted_in"}}}),
        )
        .await;
    }
    let id = campaign(
        &app,
        &t,
        json!({"name": "Abandoned cart", "trigger": {"event": "cart.abandoned"},
               "steps": [{"type": "wait_for", "event": "purchase.completed", "timeout": "2h",
                          "on_timeout": [{"type": "send", "template": "cart", "channels": ["email"]}]}],
               "reentry": "always"}),
    )
    .await;
    event(
        &app,
        &t,
        "ana",
        "cart.abandoned",
        json!({"cart_url": "https://shop.example/c/1"}),
    )
    .await;
    event(
        &app,
        &t,
        "ivo",
        "cart.abandoned",
        json!({"cart_url": "https://shop.example/c/2"}),
    )
    .await;
    app.drain().await;
    app.advance(Duration::minutes(90));
    event(&app, &t, "ivo", "purchase.completed", json!({})).await;
    app.drain().await;
    app.advance(Duration::minutes(31));
    app.drain().await;
    assert_eq!(
        sent(&app),
        vec![(
            "email".to_owned(),
            "ana@example.com".to_owned(),
            "Vaša košarica čeka: https://shop.example/c/1".to_owned()
        )]
    );
    let s = stats(&app, &t, &id).await;
    assert_eq!(s["completed"], 2);
    assert_eq!(s["sent"], json!({"email": 1}));
}

async fn agent(app: &TestApp, t: &TestTenant, name: &str) -> String {
    let r = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": name, "email": format!("{}@acme.example", name.to_lowercase()),
                   "languages": [], "countries": [], "max_open_tickets": 10}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn scenario_6_low_rating_notifies_the_owner_and_follows_up_carefully_a_five_asks_for_referrals()
 {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    agent(&app, &t, "Marko").await;
    let petra = agent(&app, &t, "Petra").await;
    template(
        &app,
        &t,
        "sorry",
        json!({"purpose": "transactional",
        "email": {"hr": {"subject": "Žao nam je", "text": "Vaša savjetnica će vas nazvati."}}}),
    )
    .await;
    template(
        &app,
        &t,
        "referral",
        json!({"purpose": "marketing",
        "email": {"hr": {"subject": "Preporučite nas", "text": "Preporučite nas prijatelju."}}}),
    )
    .await;
    let ana = app
        .contact(
            &t,
            "ana",
            json!({"first_name": "Ana", "last_name": "Horvat",
        "email": "ana@example.com", "phone": "091 111 1111", "owner_agent_id": petra}),
        )
        .await;
    app.contact(
        &t,
        "ivo",
        json!({"email": "ivo@example.com",
        "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    campaign(
        &app,
        &t,
        json!({"name": "Low rating", "trigger": {"event": "csat.rated", "where": "event.properties.score <= 2"},
               "steps": [{"type": "notify_agent", "agent": "owner", "create_ticket": true},
                         {"type": "send", "template": "sorry", "channels": ["email"]}],
               "reentry": "always"}),
    )
    .await;
    campaign(
        &app,
        &t,
        json!({"name": "Referral", "trigger": {"event": "csat.rated", "where": "event.properties.score == 5"},
               "steps": [{"type": "send", "template": "referral"}]}),
    )
    .await;
    for (c, score) in [("ana", 1), ("ivo", 5)] {
        let r = app
            .post(
                "/v1/csat",
                &t.key,
                json!({"contact": {"external_id": c}, "score": score, "source": "typeform"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    app.drain().await;
    let got = sent(&app);
    let to: Vec<&str> = got.iter().map(|m| m.1.as_str()).collect();
    assert!(
        to.contains(&"petra@acme.example"),
        "the owner is told: {got:?}"
    );
    assert!(
        !to.contains(&"marko@acme.example"),
        "only the owner: {got:?}"
    );
    assert!(got.contains(&(
        "email".into(),
        "ana@example.com".into(),
        "Vaša savjetnica će vas nazvati.".into()
    )));
    assert!(got.contains(&(
        "email".into(),
        "ivo@example.com".into(),
        "Preporučite nas prijatelju.".into()
    )));
    assert_eq!(got.len(), 3, "{got:?}");
    let tickets = app
        .get(&format!("/v1/tickets?contact_id={}", id_of(&ana)), &t.key)
        .await;
    let list = tickets.body["data"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", tickets.text);
    assert_eq!(list[0]["assignee_id"], petra.as_str());
    assert_eq!(list[0]["channel"], "phone");
    assert_eq!(list[0]["priority"], "high");
}

#[tokio::test]
async fn scenario_7_an_open_ticket_holds_marketing_until_it_closes_or_the_deadline_passes() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    // Who got the promo (the tickets' acknowledgements go out by email as well).
    let promos = |app: &TestApp| -> Vec<String> {
        sent(app)
            .into_iter()
            .filter(|m| m.2 == "Akcija!")
            .map(|m| m.1)
            .collect()
    };
    template(
        &app,
        &t,
        "promo",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Akcija!"}}}),
    )
    .await;
    for (c, phone) in [
        ("ana", "091 111 1111"),
        ("ivo", "091 222 2222"),
        ("eva", "091 333 3333"),
    ] {
        app.contact(
            &t,
            c,
            json!({"phone": phone, "email": format!("{c}@example.com"),
            "consents": {"sms": {"marketing": "opted_in"}}}),
        )
        .await;
    }
    let mut tickets = Vec::new();
    for c in ["ana", "ivo"] {
        let r = app
            .post(
                "/v1/tickets",
                &t.key,
                json!({"contact": {"external_id": c}, "channel": "email",
                "subject": "Kartica", "body": "Dvostruka naplata"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        tickets.push(r.body["id"].as_str().unwrap().to_owned());
    }
    let id = campaign(
        &app,
        &t,
        json!({"name": "Promo", "trigger": {"event": "promo.eligible"},
               "steps": [{"type": "send", "template": "promo", "channels": ["sms"]}],
               "hold_limit": "3d"}),
    )
    .await;
    for c in ["ana", "ivo", "eva"] {
        event(&app, &t, c, "promo.eligible", json!({})).await;
    }
    app.drain().await;
    assert_eq!(promos(&app), ["+385913333333"]);

    // Ana's ticket is solved on day 1: her promo goes out.
    app.advance(Duration::days(1));
    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/tickets/{}", tickets[0]),
            Some(&t.key),
            Some(json!({"status": "solved"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.drain().await;
    assert_eq!(promos(&app), ["+385913333333", "+385911111111"]);
    // Ivo's stays open past the three days: his promo is dropped with that reason.
    app.advance(Duration::days(2) + Duration::minutes(1));
    app.drain().await;
    assert_eq!(promos(&app).len(), 2);
    let s = stats(&app, &t, &id).await;
    assert_eq!(s["suppressed"], json!({"ticket_open": 1}));
    assert_eq!(s["sent"], json!({"sms": 2}));
    let ivo = app.get("/v1/contacts?external_id=ivo", &t.key).await.body["data"][0].clone();
    let steps = campaign_steps(&timeline(&app, &t, &id_of(&ivo)).await);
    assert_eq!(
        steps,
        [
            "campaign.enrolled",
            "campaign.step:send:held",
            "campaign.step:send:suppressed",
            "campaign.completed:completed"
        ]
    );
}

#[tokio::test]
async fn scenario_8_email_not_opened_switches_to_sms_and_interested_hands_to_the_advisor() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let petra = agent(&app, &t, "Petra").await;
    template(&app, &t, "offer", json!({"purpose": "marketing",
        "email": {"hr": {"subject": "Ponuda", "text": "Ponuda za vas",
            "html": "<p><a href=\"https://shop.example/offer\">Ponuda</a> <a href=\"https://shop.example/interested\">Zainteresiran sam</a></p>"}}})).await;
    template(
        &app,
        &t,
        "offer_sms",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Ponuda vas čeka u e-pošti"}}}),
    )
    .await;
    for (c, phone) in [("ana", "091 111 1111"), ("ivo", "091 222 2222")] {
        app.contact(
            &t,
            c,
            json!({"first_name": c, "phone": phone, "email": format!("{c}@example.com"),
            "owner_agent_id": petra,
            "consents": {"sms": {"marketing": "opted_in"}, "email": {"marketing": "opted_in"}}}),
        )
        .await;
    }
    let id = campaign(
        &app,
        &t,
        json!({"name": "Offer", "trigger": {"event": "offer.eligible"},
               "suppress_while_ticket_open": false,
               "steps": [
                   {"type": "send", "template": "offer", "channels": ["email"]},
                   {"type": "wait_for", "event": "message.opened", "timeout": "24h",
                    "on_timeout": [{"type": "send", "template": "offer_sms", "channels": ["sms"]}]},
                   {"type": "wait_for", "event": "message.clicked", "timeout": "7d",
                    "where": "event.properties.url.endsWith('/interested')",
                    "on_timeout": [{"type": "exit"}]},
                   {"type": "notify_agent", "agent": "owner", "subject": "Nazvati: zainteresiran za ponudu"}
               ]}),
    )
    .await;
    event(&app, &t, "ana", "offer.eligible", json!({})).await;
    event(&app, &t, "ivo", "offer.eligible", json!({})).await;
    app.drain().await;
    let log = app.outbox_log();
    assert_eq!(log.len(), 2);
    let ana_mail = log.iter().find(|m| m["to"] == "ana@example.com").unwrap();
    let html = ana_mail["html"].as_str().unwrap().to_owned();

    // Ana opens within the day, clicks the offer (not enough), then "Interested".
    app.advance(Duration::hours(3));
    let r = app
        .call(Method::GET, &link(&html, "/t/o/", 0), None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    app.drain().await;
    let r = app
        .call(Method::GET, &link(&html, "/t/c/", 0), None, None)
        .await;
    assert_eq!(r.status, StatusCode::FOUND);
    app.drain().await;
    assert_eq!(
        app.outbox_log().len(),
        2,
        "a click on the offer link hands nothing over"
    );
    let r = app
        .call(Method::GET, &link(&html, "/t/c/", 1), None, None)
        .await;
    assert_eq!(r.headers["location"], "https://shop.example/interested");
    app.drain().await;

    // Ivo never opens: an SMS after 24 hours, and no hand-off after a week.
    app.advance(Duration::hours(22));
    app.drain().await;
    app.advance(Duration::days(8));
    app.drain().await;

    let got = sent(&app);
    let mut to: Vec<&str> = got.iter().map(|m| m.1.as_str()).collect();
    // The two offers go out in either order.
    to[..2].sort();
    assert_eq!(
        to,
        [
            "ana@example.com",
            "ivo@example.com",
            "petra@acme.example",
            "+385912222222"
        ],
        "{got:?}"
    );
    assert_eq!(got[3].2, "Ponuda vas čeka u e-pošti");
    let tickets = app.get("/v1/tickets", &t.key).await;
    let list = tickets.body["data"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", tickets.text);
    assert_eq!(list[0]["assignee_id"], petra.as_str());
    assert_eq!(list[0]["subject"], "Nazvati: zainteresiran za ponudu");
    let s = stats(&app, &t, &id).await;
    assert_eq!(s["sent"], json!({"email": 2, "sms": 1}));
    assert_eq!(
        (s["opened"].as_i64(), s["clicked"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (s["completed"].as_i64(), s["exited"].as_i64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn the_frequency_cap_holds_across_campaigns() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "a",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "A"}}}),
    )
    .await;
    template(
        &app,
        &t,
        "b",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "B"}}}),
    )
    .await;
    app.contact(
        &t,
        "ana",
        json!({"phone": "091 111 1111", "consents": {"sms": {"marketing": "opted_in"}}}),
    )
    .await;
    let cap = json!({"max": 1, "per": "1d"});
    let first = campaign(
        &app,
        &t,
        json!({"name": "A", "trigger": {"event": "sale.started"}, "frequency_cap": cap,
        "reentry": "always", "steps": [{"type": "send", "template": "a"}]}),
    )
    .await;
    let second = campaign(
        &app,
        &t,
        json!({"name": "B", "trigger": {"event": "sale.started"}, "frequency_cap": cap,
        "reentry": "always", "steps": [{"type": "send", "template": "b"}]}),
    )
    .await;
    event(&app, &t, "ana", "sale.started", json!({})).await;
    app.drain().await;
    assert_eq!(
        sent(&app).iter().map(|m| m.2.as_str()).collect::<Vec<_>>(),
        ["A"]
    );
    assert_eq!(
        stats(&app, &t, &second).await["suppressed"],
        json!({"frequency_cap": 1})
    );
    // A day later the cap has room again.
    app.advance(Duration::days(1) + Duration::seconds(1));
    event(&app, &t, "ana", "sale.started", json!({})).await;
    app.drain().await;
    assert_eq!(sent(&app).len(), 2);
    assert_eq!(stats(&app, &t, &first).await["sent"], json!({"sms": 2}));
}

#[tokio::test]
async fn quiet_hours_defer_messages_to_the_morning_in_the_contacts_time_zone() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "a",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Dobro jutro"}}}),
    )
    .await;
    let ana = app
        .contact(
            &t,
            "ana",
            json!({"phone": "091 111 1111", "timezone": "Europe/Zagreb",
        "consents": {"sms": {"marketing": "opted_in"}}}),
        )
        .await;
    campaign(
        &app,
        &t,
        json!({"name": "Quiet", "trigger": {"event": "sale.started"},
        "quiet_hours": {"start": "21:00", "end": "08:00"},
        "steps": [{"type": "send", "template": "a"}]}),
    )
    .await;
    let clock = &app.app.state.clock;
    // 22:30 in Zagreb.
    clock.set(Utc.with_ymd_and_hms(2026, 11, 22, 21, 30, 0).unwrap());
    event(&app, &t, "ana", "sale.started", json!({})).await;
    app.drain().await;
    clock.set(Utc.with_ymd_and_hms(2026, 11, 23, 6, 59, 0).unwrap());
    app.drain().await;
    assert!(sent(&app).is_empty(), "still night in Zagreb");
    clock.set(Utc.with_ymd_and_hms(2026, 11, 23, 7, 0, 0).unwrap());
    app.drain().await;
    assert_eq!(sent(&app).len(), 1, "08:00 in Zagreb");
    let items = timeline(&app, &t, &id_of(&ana)).await;
    let deferred = items
        .iter()
        .find(|(k, p)| k == "campaign.step" && p["outcome"] == "deferred")
        .expect("the deferral is on the timeline");
    assert_eq!(deferred.1["reason"], "quiet_hours");
    assert_eq!(deferred.1["until"], "2026-11-23T07:00:00Z");
}

/// An idle engine looks for work once a minute here (`campaign_poll_interval_ms`), yet an event
/// its own process writes wakes it at once: the statement that puts events in the inbox rings
/// the process's bell.
#[tokio::test]
async fn an_idle_engine_wakes_at_once_for_events_its_process_writes() {
    let app = TestApp::with_config(|c| c.campaign_poll_interval_ms = 60_000).await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "hello",
        json!({"purpose": "transactional", "sms": {"hr": {"text": "Bok!"}}}),
    )
    .await;
    campaign(
        &app,
        &t,
        json!({"name": "Hello", "trigger": {"event": "hello.said"},
               "steps": [{"type": "send", "template": "hello", "channels": ["sms"]}]}),
    )
    .await;
    app.contact(&t, "ana", json!({"phone": "091 111 1111"}))
        .await;
    app.drain().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let engine = tokio::spawn(rapport::worker::run_campaigns(
        app.app.state.clone(),
        rapport::worker::wake::Wake::never(),
        shutdown.clone(),
    ));
    // Past its warm period, the engine's next look is a minute away.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let started = std::time::Instant::now();
    event(&app, &t, "ana", "hello.said", json!({})).await;
    // Without the bell, the engine would sleep through the event.
    let took = common::count_reaches(
        &app.pool,
        "SELECT count(*) FROM messages",
        1,
        started,
        std::time::Duration::from_secs(10),
    )
    .await;
    println!("event to queued message, idle engine: {took:?}");
    shutdown.cancel();
    engine.await.unwrap();
}

#[tokio::test]
async fn reentry_once_never_enrols_twice_even_under_concurrent_events_and_workers() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "a", json!({"sms": {"hr": {"text": "Hvala"}}})).await;
    app.contact(&t, "ana", json!({"phone": "091 111 1111"}))
        .await;
    let once = campaign(
        &app,
        &t,
        json!({"name": "Once", "trigger": {"event": "visit.started"},
        "steps": [{"type": "send", "template": "a"}]}),
    )
    .await;
    let weekly = campaign(
        &app,
        &t,
        json!({"name": "Weekly", "trigger": {"event": "visit.started"},
        "reentry": "7d", "steps": [{"type": "wait", "duration": "1h"}]}),
    )
    .await;
    let posts = (0..12).map(|_| event(&app, &t, "ana", "visit.started", json!({})));
    futures::future::join_all(posts).await;
    let state = &app.app.state;
    let (a, b) = tokio::join!(rapport::worker::drain(state), rapport::worker::drain(state));
    a.unwrap();
    b.unwrap();
    app.drain().await;
    assert_eq!(journeys(&app, &t, &once).await.len(), 1);
    assert_eq!(sent(&app).len(), 1);
    assert_eq!(journeys(&app, &t, &weekly).await.len(), 1);
    // A week later the weekly campaign takes the contact again; `once` never does.
    app.advance(Duration::days(7) + Duration::seconds(1));
    event(&app, &t, "ana", "visit.started", json!({})).await;
    app.drain().await;
    assert_eq!(journeys(&app, &t, &once).await.len(), 1);
    assert_eq!(
        journeys(&app, &t, &weekly).await.len(),
        2,
        "{:?}",
        journeys(&app, &t, &weekly).await
    );
}

#[tokio::test]
async fn reentry_after_a_duration_counts_from_the_last_enrolment_even_once_it_has_ended() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    for who in ["ana", "ivo"] {
        app.contact(&t, who, json!({})).await;
    }
    let daily = campaign(
        &app,
        &t,
        json!({"name": "Daily", "trigger": {"event": "visit.started"},
        "reentry": "1d", "steps": [{"type": "exit"}]}),
    )
    .await;
    // Three visits of ana evaluated together, one of ivo: one journey each, ended at once.
    for who in ["ana", "ana", "ivo", "ana"] {
        event(&app, &t, who, "visit.started", json!({})).await;
    }
    app.drain().await;
    let first = journeys(&app, &t, &daily).await;
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first.iter().all(|j| j["status"] == "exited"), "{first:?}");
    // The journeys have ended, but a day has not passed since they began.
    app.advance(Duration::hours(23));
    event(&app, &t, "ana", "visit.started", json!({})).await;
    app.drain().await;
    assert_eq!(journeys(&app, &t, &daily).await.len(), 2);
    app.advance(Duration::hours(1) + Duration::seconds(1));
    for who in ["ana", "ana"] {
        event(&app, &t, who, "visit.started", json!({})).await;
    }
    app.drain().await;
    let all = journeys(&app, &t, &daily).await;
    assert_eq!(all.len(), 3, "{all:?}");
}

#[tokio::test]
async fn a_campaign_that_cannot_run_is_refused_with_the_field_at_fault() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "sms_only", json!({"sms": {"hr": {"text": "x"}}})).await;
    let base = json!({"name": "X", "trigger": {"event": "a.b"}, "steps": [{"type": "send", "template": "sms_only"}]});
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"steps": [{"type": "send", "template": "nope"}]}),
            "steps[0].template",
            "no template",
        ),
        (
            json!({"steps": [{"type": "send", "template": "sms_only", "channels": ["email"]}]}),
            "steps[0].template",
            "no variant",
        ),
        (
            json!({"steps": [{"type": "send", "template": "sms_only", "channels": ["fax"]}]}),
            "steps[0]",
            "fax",
        ),
        (
            json!({"trigger": {"event": "a.b", "where": "event.properties.x &&& 1"}}),
            "trigger.where",
            "line 1, column",
        ),
        (
            json!({"trigger": {"event": "a.b", "where": "customer.plan == 'gold'"}}),
            "trigger.where",
            "customer",
        ),
        (
            json!({"trigger": {"event": "Not An Event"}}),
            "trigger.event",
            "",
        ),
        (json!({"trigger": {}}), "trigger", "exactly one"),
        (json!({"steps": []}), "steps", "at least one"),
        (
            json!({"steps": [{"type": "wait_for", "event": "a.c"}]}),
            "steps[0].timeout",
            "for ever",
        ),
        (
            json!({"steps": [{"type": "exit"}, {"type": "send", "template": "sms_only"}]}),
            "steps[1]",
            "never run",
        ),
        (
            json!({"steps": [{"type": "wait", "duration": "soon"}]}),
            "steps[0]",
            "duration",
        ),
        (
            json!({"steps": [{"type": "teleport"}]}),
            "steps[0]",
            "teleport",
        ),
        (json!({"reentry": "sometimes"}), "reentry", "reentry"),
        (
            json!({"quiet_hours": {"start": "25:00", "end": "08:00"}}),
            "quiet_hours.start",
            "time",
        ),
        (
            json!({"frequency_cap": {"max": 0, "per": "1d"}}),
            "frequency_cap.max",
            "at least 1",
        ),
        (json!({"exit_on": [42]}), "exit_on[0]", "event"),
    ];
    for (patch, field, message) in cases {
        let mut body = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = app.post("/v1/campaigns", &t.key, body.clone()).await;
        r.assert_problem(422);
        let errors = r.body["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["field"].as_str().unwrap().starts_with(field)
                    && e["message"].as_str().unwrap().contains(message)),
            "{body} -> {}",
            r.text
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM campaigns")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing half-written");
    app.post("/v1/campaigns", &t.key, base).await;
}

#[tokio::test]
async fn updates_make_versions_and_running_journeys_keep_theirs() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "v1", json!({"sms": {"hr": {"text": "prva"}}})).await;
    template(&app, &t, "v2", json!({"sms": {"hr": {"text": "druga"}}})).await;
    for (c, phone) in [
        ("ana", "091 111 1111"),
        ("ivo", "091 222 2222"),
        ("eva", "091 333 3333"),
    ] {
        app.contact(&t, c, json!({"phone": phone})).await;
    }
    let id = campaign(
        &app,
        &t,
        json!({"name": "Versions", "trigger": {"event": "a.b"},
        "steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "v1"}]}),
    )
    .await;
    event(&app, &t, "ana", "a.b", json!({})).await;
    app.drain().await;
    let r = app
        .call(Method::PATCH, &format!("/v1/campaigns/{id}"), Some(&t.key),
              Some(json!({"steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "v2"}]})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["name"], "Versions");
    assert_eq!(r.body["status"], "active");
    let bad = app
        .call(
            Method::PATCH,
            &format!("/v1/campaigns/{id}"),
            Some(&t.key),
            Some(json!({"steps": [{"type": "send", "template": "gone"}]})),
        )
        .await;
    bad.assert_problem(422);
    event(&app, &t, "ivo", "a.b", json!({})).await;
    app.drain().await;

    // Paused: no enrolment, no sending; journeys wait where they are.
    let r = app
        .post(&format!("/v1/campaigns/{id}/pause"), &t.key, json!({}))
        .await;
    assert_eq!(r.body["status"], "paused");
    event(&app, &t, "eva", "a.b", json!({})).await;
    app.advance(Duration::days(2));
    app.drain().await;
    assert!(sent(&app).is_empty());
    app.post(&format!("/v1/campaigns/{id}/activate"), &t.key, json!({}))
        .await;
    app.drain().await;
    let mut got: Vec<(String, String)> = sent(&app).into_iter().map(|m| (m.1, m.2)).collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("+385911111111".into(), "prva".into()),
            ("+385912222222".into(), "druga".into())
        ]
    );
    let versions: Vec<i64> = journeys(&app, &t, &id)
        .await
        .iter()
        .map(|j| j["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 1]);

    // Archived: running journeys exit, and it cannot come back or change.
    event(&app, &t, "eva", "a.b", json!({})).await;
    app.drain().await;
    let r = app
        .post(&format!("/v1/campaigns/{id}/archive"), &t.key, json!({}))
        .await;
    assert_eq!(r.body["status"], "archived");
    let exited = journeys(&app, &t, &id).await;
    assert_eq!(exited[0]["exit_reason"], "campaign_archived");
    app.post(&format!("/v1/campaigns/{id}/activate"), &t.key, json!({}))
        .await
        .assert_problem(409);
    app.call(
        Method::PATCH,
        &format!("/v1/campaigns/{id}"),
        Some(&t.key),
        Some(json!({"name": "Y"})),
    )
    .await
    .assert_problem(409);
    let list = app.get("/v1/campaigns?status=archived", &t.key).await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn campaigns_are_invisible_to_other_tenants() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    template(&app, &t, "a", json!({"sms": {"hr": {"text": "x"}}})).await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "Mine", "trigger": {"event": "a.b"},
        "steps": [{"type": "send", "template": "a"}]}),
    )
    .await;
    for path in [
        format!("/v1/campaigns/{id}"),
        format!("/v1/campaigns/{id}/stats"),
        format!("/v1/campaigns/{id}/journeys"),
    ] {
        app.get(&path, &other.key).await.assert_problem(404);
    }
    app.post(&format!("/v1/campaigns/{id}/pause"), &other.key, json!({}))
        .await
        .assert_problem(404);
    assert_eq!(
        app.get("/v1/campaigns", &other.key).await.body["data"],
        json!([])
    );
    // Another tenant's events never enrol anyone into this campaign.
    app.contact(&other, "ana", json!({"phone": "091 111 1111"}))
        .await;
    event(&app, &other, "ana", "a.b", json!({})).await;
    app.drain().await;
    assert!(sent(&app).is_empty());
}

#[tokio::test]
async fn conditions_see_the_contact_as_it_was_at_each_event_even_when_consumed_late() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "a", json!({"sms": {"hr": {"text": "x"}}})).await;
    app.contact(
        &t,
        "ana",
        json!({"phone": "091 111 1111", "attributes": {"tier": "basic"}}),
    )
    .await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "Nudge", "trigger": {"event": "credit_check.approved"},
        "audience": "!has(contact.stats.purchase_completed) && contact.attributes.tier == 'basic'",
        "steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "a"}],
        "exit_on": ["purchase.completed"]}),
    )
    .await;
    // All three arrive before the worker looks: the credit check still enrols (no purchase
    // and the basic tier at that moment), and the purchase then ends the journey.
    event(&app, &t, "ana", "credit_check.approved", json!({})).await;
    app.contact(&t, "ana", json!({"attributes": {"tier": "gold"}}))
        .await;
    event(&app, &t, "ana", "purchase.completed", json!({})).await;
    app.drain().await;
    let j = journeys(&app, &t, &id).await;
    assert_eq!(j.len(), 1, "{j:?}");
    assert_eq!(j[0]["exit_reason"], "exit_on:purchase.completed");
    assert_eq!(j[0]["converted"], true);
}

#[tokio::test]
async fn erasing_a_contact_ends_its_journeys_and_keeps_no_copy_of_the_trigger() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "a", json!({"sms": {"hr": {"text": "x"}}})).await;
    let ana = app
        .contact(&t, "ana", json!({"phone": "091 111 1111"}))
        .await;
    let id = campaign(
        &app,
        &t,
        json!({"name": "Later", "trigger": {"event": "a.b"},
        "steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "a"}]}),
    )
    .await;
    event(&app, &t, "ana", "a.b", json!({"secret": "personal"})).await;
    app.drain().await;
    let r = app
        .delete(&format!("/v1/contacts/{}", id_of(&ana)), &t.key)
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    app.advance(Duration::days(2));
    app.drain().await;
    assert!(sent(&app).is_empty());
    let j = journeys(&app, &t, &id).await;
    assert_eq!(j[0]["status"], "exited");
    assert_eq!(j[0]["exit_reason"], "contact_erased");
    let kept: Value = sqlx::query_scalar("SELECT trigger_event FROM journeys")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, json!({}));
}

/// Only a running journey keeps its copy of the trigger event (its later steps read it); one
/// that ends, at once or later, keeps the event's id only.
#[tokio::test]
async fn only_running_journeys_keep_a_copy_of_the_trigger_event() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "a",
        json!({"sms": {"hr": {"text": "Kod {{ event.properties.code }}"}}}),
    )
    .await;
    app.contact(&t, "ana", json!({"phone": "091 111 1111"}))
        .await;
    let now = campaign(
        &app,
        &t,
        json!({"name": "Now", "trigger": {"event": "a.b"}, "reentry": "always",
               "steps": [{"type": "exit"}]}),
    )
    .await;
    let later = campaign(
        &app,
        &t,
        json!({"name": "Later", "trigger": {"event": "a.b"},
        "steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "a"}]}),
    )
    .await;
    event(&app, &t, "ana", "a.b", json!({"code": "X7"})).await;
    app.drain().await;
    let copy = |campaign: String| {
        let pool = app.pool.clone();
        async move {
            let (status, copy, trigger): (String, Value, Option<uuid::Uuid>) = sqlx::query_as(
                "SELECT status, trigger_event, trigger_event_id FROM journeys
                 WHERE campaign_id = $1::uuid",
            )
            .bind(campaign)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert!(trigger.is_some(), "the event's id is kept");
            (status, copy)
        }
    };
    let (status, kept) = copy(now.clone()).await;
    assert_ne!(status, "active");
    assert_eq!(kept, json!({}), "ended at once: no copy");
    let (status, kept) = copy(later.clone()).await;
    assert_eq!(status, "active");
    assert_eq!(kept["properties"]["code"], "X7");

    app.advance(Duration::days(2));
    app.drain().await;
    let texts: Vec<String> = sent(&app).into_iter().map(|(_, _, text)| text).collect();
    assert_eq!(
        texts,
        ["Kod X7"],
        "the later step still read the trigger event"
    );
    let (status, kept) = copy(later).await;
    assert_eq!(status, "completed");
    assert_eq!(kept, json!({}), "ended later: the copy is dropped");
}

#[tokio::test]
async fn many_contacts_are_evaluated_together_with_the_same_decisions_as_one_by_one() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    // Every event starts a journey that ends at once; a second campaign waits an hour, so a
    // contact's later events in the same round find its journey running.
    let always = campaign(
        &app,
        &t,
        json!({"name": "Always", "trigger": {"event": "page.viewed"}, "reentry": "always",
               "steps": [{"type": "exit"}]}),
    )
    .await;
    let waiting = campaign(
        &app,
        &t,
        json!({"name": "Waiting", "trigger": {"event": "page.viewed"}, "reentry": "always",
               "steps": [{"type": "wait", "duration": "1h"}]}),
    )
    .await;
    // 120 contacts (more than one transaction's worth), three events each, in one batch.
    let items: Vec<Value> = (0..360)
        .map(|i| {
            json!({"type": "page.viewed", "contact": {"external_id": format!("c{}", i % 120)},
                        "properties": {"n": i}})
        })
        .collect();
    let r = app
        .post("/v1/events/batch", &t.key, json!({"events": items}))
        .await;
    assert_eq!(r.body["accepted"], 360, "{}", r.text);
    app.drain().await;

    let count = |sql: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("SELECT count(*) FROM campaign_inbox").await, 0);
    // `always`: a journey per event, each ended by its exit step.
    let ended = journeys(&app, &t, &always).await;
    assert_eq!(ended.len(), 360);
    assert!(ended.iter().all(|j| j["status"] == "exited"), "{ended:?}");
    // `waiting`: one running journey per contact; its later events could not start another.
    let running = journeys(&app, &t, &waiting).await;
    assert_eq!(running.len(), 120);
    assert!(running.iter().all(|j| j["status"] == "active"));
    // The decisions are on each timeline, counted exactly.
    assert_eq!(
        count("SELECT count(*) FROM events WHERE type = 'campaign.enrolled'").await,
        480
    );
    assert_eq!(
        count("SELECT count(*) FROM events WHERE type = 'campaign.exited'").await,
        360
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM contact_event_counts
             WHERE event_type = 'campaign.enrolled' AND count = 4"
        )
        .await,
        120
    );
    // An hour later every waiting journey completes.
    app.advance(Duration::hours(1) + Duration::seconds(1));
    app.drain().await;
    let done = journeys(&app, &t, &waiting).await;
    assert!(done.iter().all(|j| j["status"] == "completed"), "{done:?}");
}

/// The engine reads a contact's `stats` only when a condition that may run reads them; every
/// place such a condition can hide still sees them: a segment the audience names, a journey's
/// goal, and a journey that follows an older version of its campaign.
#[tokio::test]
async fn conditions_that_read_stats_see_them_wherever_they_are_written() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "a", json!({"sms": {"hr": {"text": "x"}}})).await;
    for (c, phone) in [("ana", "091 111 1111"), ("ivo", "091 222 2222")] {
        app.contact(&t, c, json!({"phone": phone})).await;
    }
    // Ana bought twice, Ivo once: counts of another type than the events that follow.
    for c in ["ana", "ana", "ivo"] {
        event(&app, &t, c, "purchase.completed", json!({})).await;
    }
    let r = app
        .post(
            "/v1/segments",
            &t.key,
            json!({"name": "Repeat buyers",
                   "condition": "contact.stats['purchase.completed'] >= 2"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let segment = r.body["id"].as_str().unwrap().to_owned();
    let by_segment = campaign(
        &app,
        &t,
        json!({"name": "Repeat buyers' offer", "trigger": {"event": "credit_check.approved"},
               "audience": {"segment": segment},
               "steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "a"}]}),
    )
    .await;
    let by_goal = campaign(
        &app,
        &t,
        json!({"name": "Visit nudge", "trigger": {"event": "site.visited"},
               "steps": [{"type": "wait", "duration": "1d"}, {"type": "send", "template": "a"}],
               "exit_on": [{"event": "cart.abandoned",
                            "where": "contact.stats['purchase.completed'] >= 2"}]}),
    )
    .await;
    for c in ["ana", "ivo"] {
        event(&app, &t, c, "credit_check.approved", json!({})).await;
        event(&app, &t, c, "site.visited", json!({})).await;
    }
    app.drain().await;
    let enrolled: Vec<Value> = journeys(&app, &t, &by_segment).await;
    assert_eq!(
        enrolled.len(),
        1,
        "only Ana is a repeat buyer: {enrolled:?}"
    );
    // The goal's campaign moves on to a version whose conditions read no stats; the
    // journeys already running keep version 1, and its goal.
    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/campaigns/{by_goal}"),
            Some(&t.key),
            Some(json!({"exit_on": ["cart.emptied"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["version"], 2);
    // Archived, the segment's campaign no longer asks for stats.
    let r = app
        .post(
            &format!("/v1/campaigns/{by_segment}/archive"),
            &t.key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for c in ["ana", "ivo"] {
        event(&app, &t, c, "cart.abandoned", json!({})).await;
    }
    app.drain().await;
    let mut ends: Vec<(i64, Value)> = journeys(&app, &t, &by_goal)
        .await
        .into_iter()
        .map(|j| (j["version"].as_i64().unwrap(), j["exit_reason"].clone()))
        .collect();
    ends.sort_by_key(|e| e.1.is_null());
    assert_eq!(
        ends,
        [(1, json!("exit_on:cart.abandoned")), (1, Value::Null)],
        "Ana's journey reached its goal, Ivo's did not"
    );
}
