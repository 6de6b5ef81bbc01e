//! Segments and broadcasts through the HTTP API: segment conditions checked, counted and
//! listed; a broadcast sent once to each member with suppressions counted by reason; local
//! send times across time zones and quiet hours; pause and resume; a broadcast's pace and a
//! channel's `max_per_second`; a provider's 429 slowing the channel without spending
//! attempts. The two process-level checks (SIGKILL mid-broadcast, the rate across two
//! worker processes) are in `chaos.rs`.

use crate::common;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::{TestApp, TestTenant};
use serde_json::{Value, json};

async fn template(app: &TestApp, t: &TestTenant, key: &str, body: Value) {
    let r = app.put(&format!("/v1/templates/{key}"), &t.key, body).await;
    assert!(r.status.is_success(), "{}", r.text);
}

async fn segment(app: &TestApp, t: &TestTenant, name: &str, condition: &str) -> String {
    let r = app
        .post(
            "/v1/segments",
            &t.key,
            json!({"name": name, "condition": condition}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn broadcast(app: &TestApp, t: &TestTenant, body: Value) -> String {
    let r = app.post("/v1/broadcasts", &t.key, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["status"], "draft");
    r.body["id"].as_str().unwrap().to_owned()
}

async fn act(app: &TestApp, t: &TestTenant, id: &str, action: &str) -> Value {
    let r = app
        .post(&format!("/v1/broadcasts/{id}/{action}"), &t.key, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{action}: {}", r.text);
    r.body
}

async fn progress(app: &TestApp, t: &TestTenant, id: &str) -> Value {
    let r = app.get(&format!("/v1/broadcasts/{id}"), &t.key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body
}

/// The broadcast's messages as stored: (contact external id, status, reason, next attempt).
async fn messages_of(
    app: &TestApp,
    id: &str,
) -> Vec<(String, String, Option<String>, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT c.external_id, m.status, m.status_reason, m.next_attempt_at
         FROM messages m JOIN contacts c ON c.tenant_id = m.tenant_id AND c.id = m.contact_id
         WHERE m.broadcast_id = $1::uuid ORDER BY c.external_id",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// The plain comparisons a condition implies are tested by the database before contacts are
/// read whole; whatever it rules out, the condition would have refused: each condition
/// counts and lists the same members as the same condition behind `|| false` (which the
/// database cannot narrow), across values of every JSON type, missing attributes, numbers
/// written as integers and decimals, strings too long for conditions, and erased contacts.
#[tokio::test]
async fn the_database_narrows_a_walk_without_changing_its_members() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let plans = [
        json!("gold"),
        json!("silver"),
        json!("Gold"),
        json!(true),
        json!(4),
    ];
    let scores = [
        json!(3),
        json!(3.0),
        json!(4.5),
        json!("4"),
        json!(-1),
        json!(1e-9),
    ];
    let mut erased = String::new();
    for i in 0..45usize {
        let mut attributes = serde_json::Map::new();
        if i % 7 != 0 {
            attributes.insert("plan".into(), plans[i % plans.len()].clone());
        }
        if i % 5 != 0 {
            attributes.insert("score".into(), scores[i % scores.len()].clone());
        }
        attributes.insert("half".into(), json!(i % 2 == 0));
        if i % 11 == 0 {
            attributes.insert("half".into(), json!("true"));
        }
        if i % 9 == 0 {
            attributes.insert("note".into(), json!("n".repeat(5_000)));
        } else if i % 3 == 0 {
            attributes.insert("note".into(), json!("short"));
        }
        let country = ["HR", "SI", "HU"][i % 3];
        let locale = ["hr", "sl", "en"][i % 3];
        let mut body = json!({"attributes": attributes, "locale": locale});
        if i % 4 != 0 {
            body["country"] = json!(country);
        }
        let made = app.contact(&t, &format!("n{i:02}"), body).await;
        if i == 2 {
            erased = made["id"].as_str().unwrap().to_owned();
        }
    }
    let r = app.delete(&format!("/v1/contacts/{erased}"), &t.key).await;
    assert!(r.status.is_success(), "{}", r.text);
    let conditions = [
        "contact.attributes.half == true",
        "contact.attributes.plan == 'gold' && contact.country == 'HR'",
        "contact.attributes.plan in ['gold', 'silver'] && contact.attributes.half == false",
        "contact.attributes.score >= 3",
        "3 < contact.attributes.score && contact.locale in ['hr', 'sl']",
        "contact.attributes.score == 3 && has(contact.attributes.plan)",
        "contact.attributes.score <= 0.0 || contact.attributes.score == 4.5",
        "has(contact.attributes.note) && contact.attributes.note != 'short'",
        "contact.attributes.note == 'short' && contact.attributes.plan == true",
        "contact.attributes.plan == 4 && contact.country in ['HR', 'HU']",
        "contact.attributes.score > 0 && contact.attributes.score < 1",
    ];
    let mut total = 0;
    for condition in conditions {
        let narrowed = segment(&app, &t, "narrowed", condition).await;
        let whole = segment(&app, &t, "whole", &format!("({condition}) || false")).await;
        let count = |id: String| {
            let app = &app;
            let t = &t;
            async move {
                let r = app.get(&format!("/v1/segments/{id}/count"), &t.key).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
                let listed = app
                    .get(&format!("/v1/segments/{id}/contacts?limit=100"), &t.key)
                    .await;
                assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
                let ids: Vec<String> = listed.body["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["external_id"].as_str().unwrap().to_owned())
                    .collect();
                (
                    r.body["count"].as_u64().unwrap(),
                    r.body["scanned"].clone(),
                    ids,
                )
            }
        };
        let (n, scanned, listed) = count(narrowed).await;
        let (expected, all, members) = count(whole).await;
        assert_eq!((n, &listed), (expected, &members), "{condition}");
        assert_eq!(
            scanned, all,
            "{condition}: every live contact is walked past"
        );
        assert_eq!(scanned, 44);
        assert_eq!(listed.len() as u64, n);
        assert!(!listed.contains(&"n02".to_owned()), "an erased contact");
        total += n;
    }
    assert!(total > 40, "the conditions pick members: {total}");
}

#[tokio::test]
async fn segment_conditions_are_checked_counted_and_listed() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    // A condition that does not compile is a 422 with its position; one that looks at an
    // event (segments have none) or at an unknown name is refused too.
    let r = app
        .post(
            "/v1/segments",
            &t.key,
            json!({"name": "Bad", "condition": "contact.attributes.plan == "}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["condition"]);
    assert!(r.text.contains("line 1, column"), "{}", r.text);
    for bad in ["event.type == 'x'", "customer.plan == 'gold'"] {
        let r = app
            .post(
                "/v1/segments",
                &t.key,
                json!({"name": "Bad", "condition": bad}),
            )
            .await;
        r.assert_problem(422);
        assert!(r.text.contains("segment conditions see"), "{}", r.text);
    }
    let r = app
        .post(
            "/v1/segments",
            &t.key,
            json!({"name": " ", "condition": "true"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["name"]);

    for i in 0..10 {
        app.contact(
            &t,
            &format!("c{i}"),
            json!({"attributes": {"credit_limit": 10000, "available_credit": i * 1000}}),
        )
        .await;
    }
    // c9 bought something just now: "no purchase in 30 days" leaves it out.
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "purchase.completed", "contact": {"external_id": "c9"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let c9 = app.get("/v1/contacts?external_id=c9", &t.key).await;
    assert!(
        c9.body["data"][0]["last_event_at"]["purchase.completed"].is_string(),
        "{}",
        c9.text
    );
    let id = segment(
        &app,
        &t,
        "Credit left, no purchase in 30 days",
        "contact.attributes.available_credit / contact.attributes.credit_limit > 0.55 && \
         (!has(contact.last_event_at.purchase_completed) || \
          now - contact.last_event_at.purchase_completed > duration('720h'))",
    )
    .await;
    let r = app.get(&format!("/v1/segments/{id}/count"), &t.key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["count"], 3, "{}", r.text);
    assert_eq!(r.body["scanned"], 10);
    assert!(r.body["took_ms"].is_u64());

    let first = app
        .get(&format!("/v1/segments/{id}/contacts?limit=2"), &t.key)
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let ids = |r: &common::Resp| -> Vec<String> {
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["external_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["c6", "c7"]);
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let rest = app
        .get(
            &format!("/v1/segments/{id}/contacts?limit=2&cursor={cursor}"),
            &t.key,
        )
        .await;
    assert_eq!(ids(&rest), ["c8"]);
    assert!(rest.body["next_cursor"].is_null());

    // Another tenant sees neither the segment nor the contacts.
    let other = app.tenant("other").await;
    app.get(&format!("/v1/segments/{id}/count"), &other.key)
        .await
        .assert_problem(404);

    let r = app
        .patch(
            &format!("/v1/segments/{id}"),
            &t.key,
            json!({"condition": "contact.attributes.available_credit >"}),
        )
        .await;
    r.assert_problem(422);
    let r = app
        .patch(
            &format!("/v1/segments/{id}"),
            &t.key,
            json!({"condition": "contact.attributes.available_credit >= 8000.0"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.get(&format!("/v1/segments/{id}/count"), &t.key).await;
    assert_eq!(r.body["count"], 2, "{}", r.text);

    // A segment a broadcast names stays; one no broadcast names can go.
    template(&app, &t, "note", json!({"sms": {"hr": {"text": "Bok"}}})).await;
    broadcast(
        &app,
        &t,
        json!({"name": "B", "segment": id, "template": "note", "channels": ["sms"]}),
    )
    .await;
    app.delete(&format!("/v1/segments/{id}"), &t.key)
        .await
        .assert_problem(409);
    let spare = segment(&app, &t, "Spare", "true").await;
    let r = app.delete(&format!("/v1/segments/{spare}"), &t.key).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let list = app.get("/v1/segments", &t.key).await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_broadcast_reaches_each_member_once_and_counts_suppressions_by_reason() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "offer",
        json!({"purpose": "marketing",
               "sms": {"hr": {"text": "Ponuda za {{ contact.first_name }}"}},
               "email": {"hr": {"subject": "Ponuda", "text": "Ponuda za {{ contact.first_name }}"}}}),
    )
    .await;
    let sms_in = json!({"sms": {"marketing": "opted_in"}});
    let gold = |extra: Value| {
        let mut body = json!({"first_name": "Ana", "attributes": {"plan": "gold"}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    app.contact(
        &t,
        "a1",
        gold(json!({"phone": "091 111 1111", "consents": sms_in})),
    )
    .await;
    app.contact(
        &t,
        "a2",
        gold(json!({"email": "a2@example.com",
                    "consents": {"email": {"marketing": "opted_in"}}})),
    )
    .await;
    app.contact(&t, "a3", gold(json!({"phone": "091 333 3333"})))
        .await;
    app.contact(
        &t,
        "a4",
        gold(json!({"phone": "091 444 4444", "consents": {"sms": {"marketing": "opted_out"}}})),
    )
    .await;
    app.contact(&t, "a5", gold(json!({}))).await;
    app.contact(
        &t,
        "a6",
        gold(json!({"phone": "091 666 6666", "consents": sms_in})),
    )
    .await;
    app.contact(
        &t,
        "a7",
        gold(json!({"phone": "091 777 7777", "consents": sms_in})),
    )
    .await;
    app.contact(
        &t,
        "b1",
        json!({"phone": "091 999 9999", "consents": sms_in, "attributes": {"plan": "basic"}}),
    )
    .await;
    let r = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": "a6"}, "channel": "email",
                   "subject": "Kartica", "body": "Dvostruka naplata"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // a7 had a marketing message today: the cap of one a day leaves it out.
    let first = broadcast(
        &app,
        &t,
        json!({"name": "Earlier", "audience": "contact.external_id == 'a7'",
               "template": "offer", "channels": ["sms"]}),
    )
    .await;
    act(&app, &t, &first, "schedule").await;
    app.drain().await;
    assert_eq!(progress(&app, &t, &first).await["stats"]["sent"], 1);

    let gold_segment = segment(&app, &t, "Gold", "contact.attributes.plan == 'gold'").await;
    let r = app
        .get(&format!("/v1/segments/{gold_segment}/count"), &t.key)
        .await;
    assert_eq!(r.body["count"], 7);
    let id = broadcast(
        &app,
        &t,
        json!({"name": "December offer", "segment": gold_segment, "template": "offer",
               "channels": ["sms", "email"], "purpose": "marketing",
               "frequency_cap": {"max": 1, "per": "1d"}}),
    )
    .await;
    let scheduled = act(&app, &t, &id, "schedule").await;
    assert_eq!(scheduled["status"], "scheduled");
    app.drain().await;
    // Once more: nothing is decided or sent twice.
    app.drain().await;
    let p = progress(&app, &t, &id).await;
    assert_eq!(p["status"], "completed", "{p}");
    let s = &p["stats"];
    assert_eq!(s["scanned"], 8, "{p}");
    assert_eq!(s["targeted"], 7, "{p}");
    assert_eq!(s["queued"], 2, "{p}");
    assert_eq!(s["sent"], 2, "{p}");
    assert_eq!(s["pending"], 0, "{p}");
    assert_eq!(
        s["suppressed"],
        json!({"no_consent": 1, "opted_out": 1, "no_address": 1, "ticket_open": 1,
               "frequency_cap": 1}),
        "{p}"
    );
    let messages = messages_of(&app, &id).await;
    let outcome: Vec<(&str, &str, Option<&str>)> = messages
        .iter()
        .map(|(c, s, r, _)| (c.as_str(), s.as_str(), r.as_deref()))
        .collect();
    assert_eq!(
        outcome,
        [
            ("a1", "sent", None),
            ("a2", "sent", None),
            (
                "a3",
                "suppressed",
                Some("sms: no_consent; email: no_address")
            ),
            (
                "a4",
                "suppressed",
                Some("sms: opted_out; email: no_address")
            ),
            (
                "a5",
                "suppressed",
                Some("sms: no_address; email: no_address")
            ),
            ("a6", "suppressed", Some("ticket_open")),
            ("a7", "suppressed", Some("frequency_cap")),
        ]
    );
    // What the providers got: a1 by SMS, a2 by email, a7 once (the earlier broadcast).
    let log: Vec<Value> = app
        .outbox_log()
        .into_iter()
        .filter(|m| m["marketing"] == true)
        .collect();
    let to: Vec<&str> = log.iter().map(|m| m["to"].as_str().unwrap()).collect();
    assert_eq!(to.len(), 3, "{log:?}");
    assert!(to.contains(&"+385911111111") && to.contains(&"a2@example.com"));
    // Broadcast messages carry the usual events (campaigns can follow up on them).
    let a1 = app.get("/v1/contacts?external_id=a1", &t.key).await;
    let a1_id = a1.body["data"][0]["id"].as_str().unwrap().to_owned();
    let timeline = app
        .get(&format!("/v1/contacts/{a1_id}/timeline?limit=100"), &t.key)
        .await;
    assert!(
        timeline.text.contains("message.queued"),
        "{}",
        timeline.text
    );
    assert!(timeline.text.contains(&id), "{}", timeline.text);

    // Cancelled after it completed: nothing was left to cancel; a second cancel is a 409.
    let cancelled = act(&app, &t, &id, "cancel").await;
    assert_eq!(cancelled["status"], "cancelled");
    app.post(&format!("/v1/broadcasts/{id}/cancel"), &t.key, json!({}))
        .await
        .assert_problem(409);
    app.post(&format!("/v1/broadcasts/{id}/schedule"), &t.key, json!({}))
        .await
        .assert_problem(409);
}

#[tokio::test]
async fn broadcasts_are_checked_when_written() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "offer",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Ponuda"}}}),
    )
    .await;
    let r = app
        .post(
            "/v1/broadcasts",
            &t.key,
            json!({"name": "", "template": "nope", "channels": ["email"],
                   "send_at": "2027-01-01T10:00:00Z", "send_at_local": "2027-01-01T10:00",
                   "throttle": {"per_second": 0}}),
        )
        .await;
    r.assert_problem(422);
    let mut fields = r.error_fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "name",
            "segment",
            "send_at_local",
            "template",
            "throttle.per_second"
        ],
        "{}",
        r.text
    );
    let r = app
        .post(
            "/v1/broadcasts",
            &t.key,
            json!({"name": "X", "audience": "true", "template": "offer",
                   "purpose": "transactional", "channels": ["email"],
                   "send_at_local": "tomorrow 10am"}),
        )
        .await;
    r.assert_problem(422);
    let mut fields = r.error_fields();
    fields.sort();
    assert_eq!(
        fields,
        ["channels", "purpose", "send_at_local"],
        "{}",
        r.text
    );
    let r = app
        .post(
            "/v1/broadcasts",
            &t.key,
            json!({"name": "X", "segment": "0193a8c0-0000-7000-8000-000000000000",
                   "template": "offer"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["segment"]);
    // A broadcast may go slower than its channel's max_per_second, not faster.
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "log", "settings": {"max_per_second": 5}}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "log", "settings": {"max_per_second": -1}}),
        )
        .await;
    r.assert_problem(422);
    let r = app
        .post(
            "/v1/broadcasts",
            &t.key,
            json!({"name": "X", "audience": "true", "template": "offer",
                   "throttle": {"per_second": 10}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["throttle.per_second"]);
    broadcast(
        &app,
        &t,
        json!({"name": "X", "audience": "true", "template": "offer",
               "throttle": {"per_second": 5}}),
    )
    .await;
    let other = app.tenant("other").await;
    let list = app.get("/v1/broadcasts", &other.key).await;
    assert_eq!(list.body["data"], json!([]));
}

#[tokio::test]
async fn local_send_times_follow_each_contacts_zone_and_quiet_hours_defer() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "note", json!({"sms": {"hr": {"text": "Bok"}}})).await;
    for (c, zone) in [
        ("zagreb", Some("Europe/Zagreb")),
        ("london", Some("Europe/London")),
        ("newyork", Some("America/New_York")),
        ("tenant", None),
    ] {
        let mut body = json!({"phone": "091 111 1111"});
        if let Some(zone) = zone {
            body["timezone"] = json!(zone);
        }
        app.contact(&t, c, body).await;
    }
    let local = "2027-01-15T10:00";
    let id = broadcast(
        &app,
        &t,
        json!({"name": "Morning", "audience": "true", "template": "note",
               "channels": ["sms"], "send_at_local": local}),
    )
    .await;
    let s = act(&app, &t, &id, "schedule").await;
    // The walk starts a quarter of an hour before 10:00 comes in the earliest zone (Zagreb).
    let starts: DateTime<Utc> = s["starts_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(starts.to_rfc3339(), "2027-01-15T08:45:00+00:00");
    app.drain().await;
    assert_eq!(progress(&app, &t, &id).await["status"], "scheduled");
    app.advance(starts - app.now() + Duration::minutes(1));
    app.drain().await;
    let at: Vec<(String, String)> = messages_of(&app, &id)
        .await
        .into_iter()
        .map(|(c, s, _, at)| {
            assert_eq!(s, "queued");
            (c, at.to_rfc3339())
        })
        .collect();
    assert_eq!(
        at,
        [
            ("london".to_owned(), "2027-01-15T10:00:00+00:00".to_owned()),
            ("newyork".to_owned(), "2027-01-15T15:00:00+00:00".to_owned()),
            ("tenant".to_owned(), "2027-01-15T09:00:00+00:00".to_owned()),
            ("zagreb".to_owned(), "2027-01-15T09:00:00+00:00".to_owned()),
        ]
    );
    // 22:00 local falls in quiet hours (21:00-08:00): every message waits for 08:00 there.
    let id = broadcast(
        &app,
        &t,
        json!({"name": "Late", "audience": "true", "template": "note", "channels": ["sms"],
               "send_at_local": "2027-01-20T22:00",
               "quiet_hours": {"start": "21:00", "end": "08:00"}}),
    )
    .await;
    let s = act(&app, &t, &id, "schedule").await;
    let starts: DateTime<Utc> = s["starts_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(starts.to_rfc3339(), "2027-01-20T20:45:00+00:00");
    app.advance(starts - app.now() + Duration::minutes(1));
    app.drain().await;
    let p = progress(&app, &t, &id).await;
    assert_eq!(p["stats"]["deferred_quiet_hours"], 4, "{p}");
    let at: Vec<String> = messages_of(&app, &id)
        .await
        .into_iter()
        .map(|(_, _, _, at)| at.to_rfc3339())
        .collect();
    assert_eq!(
        at,
        [
            "2027-01-21T08:00:00+00:00",
            "2027-01-21T13:00:00+00:00",
            "2027-01-21T07:00:00+00:00",
            "2027-01-21T07:00:00+00:00",
        ]
    );
}

#[tokio::test]
async fn pause_holds_queued_messages_and_resume_spaces_them_at_the_broadcasts_pace() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "note", json!({"sms": {"hr": {"text": "Bok"}}})).await;
    for i in 0..4 {
        app.contact(
            &t,
            &format!("c{i}"),
            json!({"phone": format!("091 000 000{i}")}),
        )
        .await;
    }
    let id = broadcast(
        &app,
        &t,
        json!({"name": "Paced", "audience": "true", "template": "note", "channels": ["sms"],
               "throttle": {"per_second": 2}}),
    )
    .await;
    act(&app, &t, &id, "schedule").await;
    app.walk_broadcasts().await;
    // Two a second: each message half a second after the one before.
    let at: Vec<DateTime<Utc>> = messages_of(&app, &id).await.iter().map(|m| m.3).collect();
    let mut sorted = at.clone();
    sorted.sort();
    for pair in sorted.windows(2) {
        assert_eq!(pair[1] - pair[0], Duration::milliseconds(500), "{sorted:?}");
    }
    let p = act(&app, &t, &id, "pause").await;
    assert_eq!(p["status"], "paused");
    let held = messages_of(&app, &id).await;
    assert!(held.iter().all(|m| m.1 == "paused"), "{held:?}");
    let r = app.get("/v1/messages?status=paused", &t.key).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 4, "{}", r.text);
    app.drain().await;
    assert!(app.outbox_log().is_empty());
    let r = act(&app, &t, &id, "resume").await;
    assert_eq!(r["status"], "completed");
    let requeued = messages_of(&app, &id).await;
    assert!(requeued.iter().all(|m| m.1 == "queued"), "{requeued:?}");
    // Sent as they come due: wait for the last slot (1.5 s after the first).
    tokio::time::sleep(std::time::Duration::from_millis(1700)).await;
    app.drain().await;
    assert_eq!(app.outbox_log().len(), 4);
    let p = progress(&app, &t, &id).await;
    assert_eq!(p["stats"]["sent"], 4, "{p}");
}

#[tokio::test]
async fn a_providers_429_holds_the_channel_without_spending_attempts() {
    use wiremock::matchers::{method, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let stub = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex("^/2010-04-01/Accounts/AC1/Messages.json$"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_json(json!({"code": 20429, "message": "Too Many Requests"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&stub)
        .await;
    Mock::given(method("POST"))
        .and(path_regex("^/2010-04-01/Accounts/AC1/Messages.json$"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM1", "status": "queued"})),
        )
        .with_priority(2)
        .mount(&stub)
        .await;
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "twilio",
                   "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": stub.uri()},
                   "secrets": {"auth_token": "tok"}}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    template(&app, &t, "note", json!({"sms": {"hr": {"text": "Bok"}}})).await;
    app.contact(&t, "ana", json!({"phone": "091 111 1111"}))
        .await;
    for _ in 0..2 {
        let r = app
            .post(
                "/v1/messages",
                &t.key,
                json!({"contact": {"external_id": "ana"}, "template": "note", "channel": "sms"}),
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text);
    }
    app.drain().await;
    let requests = || async { stub.received_requests().await.unwrap_or_default().len() };
    // The first send met a 429: the channel waits a second, the message keeps its attempts.
    let before = requests().await;
    assert!(before >= 1, "the provider was not called");
    let rows: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT status, attempts, max_attempts FROM messages ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let default = rapport::config::Config::default().outbox_max_attempts;
    assert!(
        rows.iter()
            .any(|(s, a, m)| s == "queued" && *a == 1 && *m == default + 1),
        "{rows:?}"
    );
    app.drain().await;
    assert_eq!(requests().await, before, "the held channel was used");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    app.drain().await;
    let rows: Vec<(String,)> = sqlx::query_as("SELECT status FROM messages")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.0 == "sent"), "{rows:?}");
}

/// A campaign's audience may name a segment: who enrols follows the segment as it is when the
/// contact is evaluated, a segment of another tenant or none is a 422, and a segment a live
/// campaign names cannot be deleted until the campaign is archived.
#[tokio::test]
async fn a_campaign_audience_can_name_a_segment() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    template(&app, &t, "hello", json!({"sms": {"hr": {"text": "Bok!"}}})).await;
    for (who, tier, phone) in [
        ("ana", "gold", "091 111 1111"),
        ("ivo", "basic", "091 222 2222"),
    ] {
        app.contact(
            &t,
            who,
            json!({"phone": phone, "attributes": {"tier": tier}}),
        )
        .await;
    }
    let gold = segment(&app, &t, "Gold", "contact.attributes.tier == 'gold'").await;
    let theirs = segment(&app, &other, "Theirs", "true").await;
    let def = |audience: Value| {
        json!({"name": "Welcome", "trigger": {"event": "visit.started"}, "audience": audience,
               "reentry": "always", "steps": [{"type": "send", "template": "hello"}]})
    };
    for bad in [
        json!({"segment": theirs}),
        json!({"segment": "not-an-id"}),
        json!({"segment": gold, "extra": 1}),
        json!(5),
    ] {
        let r = app.post("/v1/campaigns", &t.key, def(bad.clone())).await;
        r.assert_problem(422);
        assert!(
            r.error_fields().iter().all(|f| f.starts_with("audience")),
            "{bad}: {}",
            r.text
        );
    }
    let r = app
        .post("/v1/campaigns", &t.key, def(json!({"segment": gold})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["audience"], json!({"segment": gold}));
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(&format!("/v1/campaigns/{id}/activate"), &t.key, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let visit = |who: &'static str| {
        let app = &app;
        let key = t.key.clone();
        async move {
            let r = app
                .post(
                    "/v1/events",
                    &key,
                    json!({"type": "visit.started", "contact": {"external_id": who}}),
                )
                .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        }
    };
    let sent_to = |app: &TestApp| -> Vec<String> {
        let mut to: Vec<String> = app
            .outbox_log()
            .iter()
            .map(|m| m["to"].as_str().unwrap_or_default().to_owned())
            .collect();
        to.sort();
        to
    };
    visit("ana").await;
    visit("ivo").await;
    app.drain().await;
    assert_eq!(sent_to(&app), ["+385911111111"]);
    // The segment changes: so does who enrols.
    let r = app
        .patch(
            &format!("/v1/segments/{gold}"),
            &t.key,
            json!({"condition": "contact.attributes.tier == 'basic'"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    visit("ana").await;
    visit("ivo").await;
    app.drain().await;
    assert_eq!(sent_to(&app), ["+385911111111", "+385912222222"]);
    // A broadcast names a segment the same way; another tenant's is unknown here.
    template(
        &app,
        &other,
        "hello",
        json!({"sms": {"hr": {"text": "Bok!"}}}),
    )
    .await;
    let body = |segment: &str| {
        json!({"name": "Blast", "audience": {"segment": segment}, "template": "hello",
               "channels": ["sms"]})
    };
    let r = app.post("/v1/broadcasts", &t.key, body(&theirs)).await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["audience.segment"], "{}", r.text);
    let r = app.post("/v1/broadcasts", &other.key, body(&theirs)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["segment_id"], json!(theirs));
    assert_eq!(r.body["audience"], Value::Null);
    // Named by a live campaign: not deleted; once the campaign is archived, it can be.
    app.delete(&format!("/v1/segments/{gold}"), &t.key)
        .await
        .assert_problem(409);
    let r = app
        .post(&format!("/v1/campaigns/{id}/archive"), &t.key, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.delete(&format!("/v1/segments/{gold}"), &t.key).await;
    assert!(r.status.is_success(), "{}", r.text);
}

/// A broadcast with a `send_at` is walked a quarter of an hour ahead: every message is queued
/// for that instant, none leaves before it.
#[tokio::test]
async fn a_send_at_broadcast_is_queued_ahead_and_sent_on_time() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(&app, &t, "note", json!({"sms": {"hr": {"text": "Bok"}}})).await;
    for c in ["ana", "ivo"] {
        app.contact(&t, c, json!({"phone": "091 111 1111"})).await;
    }
    let send_at = chrono::SubsecRound::trunc_subsecs(app.now() + Duration::hours(2), 0);
    let id = broadcast(
        &app,
        &t,
        json!({"name": "At two", "audience": "true", "template": "note",
               "channels": ["sms"], "send_at": send_at}),
    )
    .await;
    let s = act(&app, &t, &id, "schedule").await;
    let starts: DateTime<Utc> = s["starts_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(starts, send_at - Duration::minutes(15));
    app.advance(Duration::minutes(110));
    app.drain().await;
    let queued = messages_of(&app, &id).await;
    assert_eq!(queued.len(), 2, "{queued:?}");
    for (_, status, _, at) in &queued {
        assert_eq!(status, "queued");
        assert_eq!(*at, send_at);
    }
    // Due at send_at (the outbox claims by the database's clock, which the test cannot move).
    assert!(app.outbox_log().is_empty());
}

/// A walk of several pages, written two at a time on their own connections, ends exact: every
/// member has one message, every contact was walked past once, the counters add up and the
/// cursor stands at the tenant's last contact. A pause then a resume while it is being
/// written leaves it just as exact.
#[tokio::test]
async fn a_walk_of_many_pages_written_two_at_a_time_is_exact() {
    const CONTACTS: i64 = 9_001;
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "offer",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Ponuda"}}}),
    )
    .await;
    // A made contact's consents, then the rest written straight into the table (an import's
    // result), half of them members.
    let made = app
        .contact(
            &t,
            "c0",
            json!({"phone": "091 000 0000", "attributes": {"half": true},
                   "consents": {"sms": {"marketing": "opted_in"}}}),
        )
        .await;
    sqlx::query(
        "INSERT INTO contacts (tenant_id, id, external_id, phone, first_name, locale, country,
                               attributes, consents)
         SELECT c.tenant_id, gen_random_uuid(), 'c' || n, '+3859' || (20000000 + n)::text,
                'Ana', 'hr', 'HR', jsonb_build_object('half', n % 2 = 0), c.consents
         FROM contacts c, generate_series(1, $2 - 1) AS n WHERE c.id = $1::uuid",
    )
    .bind(made["id"].as_str().unwrap())
    .bind(CONTACTS)
    .execute(&app.pool)
    .await
    .unwrap();
    let members = (CONTACTS + 1) / 2;
    let half = segment(&app, &t, "Half", "contact.attributes.half == true").await;
    for pause in [false, true] {
        let id = broadcast(
            &app,
            &t,
            json!({"name": format!("Many pages (pause: {pause})"), "segment": half,
                   "template": "offer", "channels": ["sms"], "purpose": "marketing"}),
        )
        .await;
        act(&app, &t, &id, "schedule").await;
        if pause {
            // The pause lands once the turn has committed its first page, with the next ones
            // in flight: they roll back, and the resumed walk goes on from the last page
            // committed.
            let state = app.app.state.clone();
            let turn = tokio::spawn(async move {
                rapport::broadcasts::round(&state, uuid::Uuid::now_v7()).await
            });
            let scanned = || async {
                sqlx::query_scalar::<_, i64>("SELECT scanned FROM broadcasts WHERE id = $1::uuid")
                    .bind(&id)
                    .fetch_one(&app.pool)
                    .await
                    .unwrap()
            };
            while scanned().await == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            act(&app, &t, &id, "pause").await;
            turn.await.unwrap().expect("broadcast round");
            let paused_at = scanned().await;
            assert!(
                paused_at > 0 && paused_at < CONTACTS,
                "paused mid-walk: {paused_at}"
            );
            act(&app, &t, &id, "resume").await;
        }
        app.walk_broadcasts().await;
        let view = progress(&app, &t, &id).await;
        assert_eq!(view["status"], "completed", "{view}");
        let stats = &view["stats"];
        assert_eq!(stats["scanned"], CONTACTS, "{view}");
        assert_eq!(stats["targeted"], members, "{view}");
        assert_eq!(stats["queued"], members, "{view}");
        let (messages, contacts, wrong): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT m.contact_id),
                    count(*) FILTER (WHERE c.attributes -> 'half' <> 'true')
             FROM messages m JOIN contacts c ON c.tenant_id = m.tenant_id AND c.id = m.contact_id
             WHERE m.broadcast_id = $1::uuid",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(
            (messages, contacts, wrong),
            (members, members, 0),
            "pause: {pause}"
        );
        let at_end: bool = sqlx::query_scalar(
            "SELECT b.cursor = (SELECT id FROM contacts WHERE tenant_id = b.tenant_id
                                 ORDER BY id DESC LIMIT 1)
             FROM broadcasts b WHERE b.id = $1::uuid",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert!(at_end, "the cursor stands at the last contact");
    }
}

/// Members are read without their counters when neither the condition nor the template reads
/// them (a quarter of a walk's read); a template that shows `contact.stats`, or a condition
/// on them, gets the true counts.
#[tokio::test]
async fn a_broadcast_reads_the_contacts_counters_when_its_template_or_condition_does() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    template(
        &app,
        &t,
        "count",
        json!({"sms": {"hr": {"text": "Kupnji: {{ contact.stats['purchase.completed'] }}"}}}),
    )
    .await;
    template(
        &app,
        &t,
        "plain",
        json!({"sms": {"hr": {"text": "Bok {{ contact.first_name }}"}}}),
    )
    .await;
    app.contact(
        &t,
        "k1",
        json!({"first_name": "Ana", "phone": "091 111 1111"}),
    )
    .await;
    app.contact(
        &t,
        "k2",
        json!({"first_name": "Ivo", "phone": "091 222 2222"}),
    )
    .await;
    for _ in 0..2 {
        let r = app
            .post(
                "/v1/events",
                &t.key,
                json!({"type": "purchase.completed", "contact": {"external_id": "k1"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
    let texts = |id: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, Option<String>)>(
                "SELECT c.external_id, m.status, m.body_text
                 FROM messages m JOIN contacts c ON c.tenant_id = m.tenant_id AND c.id = m.contact_id
                 WHERE m.broadcast_id = $1::uuid ORDER BY c.external_id",
            )
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let send = |name: &str, audience: &str, template: &str| json!({"name": name, "audience": audience, "template": template, "channels": ["sms"]});
    // The template reads the counters; the condition does not.
    let counted = broadcast(
        &app,
        &t,
        send("Counted", "contact.external_id == 'k1'", "count"),
    )
    .await;
    act(&app, &t, &counted, "schedule").await;
    // Neither does.
    let plain = broadcast(&app, &t, send("Plain", "true", "plain")).await;
    act(&app, &t, &plain, "schedule").await;
    // The condition does.
    let buyers = broadcast(
        &app,
        &t,
        send(
            "Buyers",
            "contact.stats['purchase.completed'] >= 2",
            "plain",
        ),
    )
    .await;
    act(&app, &t, &buyers, "schedule").await;
    app.drain().await;
    let sent = |who: &str, text: &str| (who.to_owned(), "sent".to_owned(), Some(text.to_owned()));
    assert_eq!(texts(counted).await, vec![sent("k1", "Kupnji: 2")]);
    assert_eq!(
        texts(plain).await,
        vec![sent("k1", "Bok Ana"), sent("k2", "Bok Ivo")]
    );
    assert_eq!(texts(buyers).await, vec![sent("k1", "Bok Ana")]);
}
