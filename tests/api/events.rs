//! Events: ingestion, contact resolution, deduplication, exact ordinals, the timeline.

use crate::common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::{Value, json};

#[tokio::test]
async fn an_event_creates_its_contact_and_counts() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .post("/v1/events", &t.key, json!({"type": "credit_check.approved",
            "contact": {"external_id": "cust-9", "email": "Nova@Example.com", "phone": "091 234 5678"},
            "properties": {"limit": 3000}}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["ordinal"], 1);
    assert_eq!(r.body["duplicate"], false);
    let contact_id = r.body["contact_id"].as_str().unwrap().to_owned();
    let c = app.get(&format!("/v1/contacts/{contact_id}"), &t.key).await;
    assert_eq!(c.body["external_id"], "cust-9");
    assert_eq!(c.body["email"], "nova@example.com");
    assert_eq!(c.body["phone"], "+385912345678");
    assert_eq!(
        c.body["stats"],
        json!({"contact.created": 1, "credit_check.approved": 1})
    );

    // The same contact by email and by phone.
    let by_email = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "purchase.completed", "contact": {"email": "nova@example.com"}}),
        )
        .await;
    assert_eq!(by_email.body["contact_id"], contact_id.as_str());
    let by_phone = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "purchase.completed", "contact": {"phone": "+385912345678"}}),
        )
        .await;
    assert_eq!(by_phone.body["contact_id"], contact_id.as_str());
    assert_eq!(by_phone.body["ordinal"], 2, "the second purchase");

    let ev = app
        .get(
            &format!("/v1/events/{}", r.body["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    assert_eq!(ev.status, StatusCode::OK);
    assert_eq!(ev.body["type"], "credit_check.approved");
    assert_eq!(ev.body["properties"], json!({"limit": 3000}));
    assert_eq!(ev.body["source"], "api");
}

#[tokio::test]
async fn unknown_email_or_phone_is_422_and_writes_nothing() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "a.b", "contact": {"email": "ghost@example.com"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["contact.email"]);
    let r = app
        .post("/v1/events", &t.key, json!({"type": "a.b", "contact": {}}))
        .await;
    r.assert_problem(422);
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "Bad Type", "contact": {"external_id": "x"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["type"]);
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "a", "contact": {"external_id": "x"},
                                            "occurred_at": "2999-01-01T00:00:00Z"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["occurred_at"]);
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "a", "contact": {"external_id": "x"}, "occurred_at": "yesterday"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["occurred_at"]);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn idempotency_key_in_the_body_deduplicates_per_tenant() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("other").await;
    let body = json!({"type": "purchase.completed", "contact": {"external_id": "c"}, "idempotency_key": "order-1"});
    let first = app.post("/v1/events", &t.key, body.clone()).await;
    let second = app.post("/v1/events", &t.key, body.clone()).await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(second.body["duplicate"], true);
    assert_eq!(second.body["ordinal"], 1);
    // Another tenant's key space is its own.
    let theirs = app.post("/v1/events", &other.key, body).await;
    assert_eq!(theirs.body["duplicate"], false);
    let c = app
        .get(
            &format!(
                "/v1/contacts/{}",
                first.body["contact_id"].as_str().unwrap()
            ),
            &t.key,
        )
        .await;
    assert_eq!(c.body["stats"]["purchase.completed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordinals_are_exact_under_concurrent_requests() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.contact(&t, "c", json!({})).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let router = app.router.clone();
        let key = t.key.clone();
        tasks.spawn(async move {
            let body = json!({"type": "purchase.completed", "contact": {"external_id": "c"},
                              "properties": {"i": i}, "idempotency_key": format!("k{}", i % 30)});
            let req = axum::http::Request::post("/v1/events")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap();
            let resp = tower::ServiceExt::oneshot(router, req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        });
    }
    let mut fresh = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        if r["duplicate"] == false {
            fresh.push(r["ordinal"].as_i64().unwrap());
        }
    }
    fresh.sort();
    assert_eq!(
        fresh,
        (1..=30).collect::<Vec<_>>(),
        "30 distinct keys, ordinals 1..=30 once each"
    );
    let ordinals: Vec<i64> = sqlx::query_scalar(
        "SELECT ordinal FROM events WHERE type = 'purchase.completed' ORDER BY ordinal",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(ordinals, (1..=30).collect::<Vec<_>>());
    let count: i64 = sqlx::query_scalar(
        "SELECT count FROM contact_event_counts WHERE event_type = 'purchase.completed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(count, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_on_the_same_new_contacts_neither_deadlock_nor_miscount() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..6 {
        let router = app.router.clone();
        let key = t.key.clone();
        tasks.spawn(async move {
            // Each batch touches the same ten contacts, in a different order.
            let mut events: Vec<Value> = (0..10)
                .map(|c| json!({"type": "cart.abandoned", "contact": {"external_id": format!("c{c}")}}))
                .collect();
            events.rotate_left(b);
            if b % 2 == 1 {
                events.reverse();
            }
            let req = axum::http::Request::post("/v1/events/batch")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(json!({"events": events}).to_string()))
                .unwrap();
            let resp = tower::ServiceExt::oneshot(router, req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let counts: Vec<i64> = sqlx::query_scalar(
        "SELECT count FROM contact_event_counts WHERE event_type = 'cart.abandoned' ORDER BY contact_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(counts, vec![6; 10]);
    let contacts: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(contacts, 10);
}

#[tokio::test]
async fn batch_reports_each_event() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .post("/v1/events/batch", &t.key, json!({"events": [
            {"type": "purchase.completed", "contact": {"external_id": "a"}, "idempotency_key": "o1"},
            {"type": "BAD", "contact": {"external_id": "a"}},
            {"type": "purchase.completed", "contact": {"external_id": "a"}, "idempotency_key": "o1"},
            {"type": "purchase.completed", "contact": {"email": "nobody@example.com"}},
            {"type": "purchase.completed", "contact": {"external_id": "a"}},
            {"type": "purchase.completed", "contact": {"external_id": "b"}}
        ]}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let results = r.body["results"].as_array().unwrap();
    let statuses: Vec<&str> = results
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "accepted",
            "rejected",
            "duplicate",
            "rejected",
            "accepted",
            "accepted"
        ]
    );
    assert_eq!(results[0]["ordinal"], 1);
    assert_eq!(results[2]["id"], results[0]["id"]);
    assert_eq!(
        results[4]["ordinal"], 2,
        "ordinals follow request order within a contact"
    );
    assert_eq!(results[5]["ordinal"], 1);
    assert_eq!(results[1]["errors"][0]["field"], "events[1].type");
    assert_eq!(results[3]["errors"][0]["field"], "events[3].contact.email");
    assert_eq!(
        (
            r.body["accepted"].clone(),
            r.body["duplicates"].clone(),
            r.body["rejected"].clone()
        ),
        (json!(3), json!(1), json!(2))
    );

    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"type": "a", "contact": {"external_id": "a"}}))
        .collect();
    app.post("/v1/events/batch", &t.key, json!({"events": too_many}))
        .await
        .assert_problem(422);
    app.post("/v1/events/batch", &t.key, json!({"events": []}))
        .await
        .assert_problem(422);
}

#[tokio::test]
async fn batch_of_a_thousand_events() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let events: Vec<Value> = (0..1000)
        .map(
            |i| json!({"type": "page.viewed", "contact": {"external_id": format!("c{}", i % 100)}}),
        )
        .collect();
    let r = app
        .post("/v1/events/batch", &t.key, json!({"events": events}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body["accepted"], 1000);
    assert_eq!(r.body["results"][999]["ordinal"], 10);
}

/// A batch naming a known and a new contact by external id: the one-statement path appends
/// nothing (the new contact is missing), and the full path records each event once.
#[tokio::test]
async fn batch_of_known_and_new_contacts_records_each_event_once() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let event = |x: &str| json!({"type": "page.viewed", "contact": {"external_id": x}});
    let first = app.post("/v1/events", &t.key, event("known")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let r = app
        .post(
            "/v1/events/batch",
            &t.key,
            json!({"events": [event("known"), event("new"), event("known")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["accepted"], 3);
    let ordinals: Vec<&Value> = (0..3).map(|i| &r.body["results"][i]["ordinal"]).collect();
    assert_eq!(ordinals, [&json!(2), &json!(1), &json!(3)]);
    let known = &first.body["contact_id"];
    assert_eq!(r.body["results"][0]["contact_id"], *known);
    assert_eq!(r.body["results"][2]["contact_id"], *known);
    let views: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'page.viewed'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(views, 4, "no event is recorded twice");
    let stats = app
        .get(&format!("/v1/contacts/{}", known.as_str().unwrap()), &t.key)
        .await
        .body["stats"]
        .clone();
    assert_eq!(stats["page.viewed"], 3);
}

#[tokio::test]
async fn timeline_is_newest_first_and_paginated() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let c = app.contact(&t, "c", json!({})).await;
    let id = c["id"].as_str().unwrap();
    for (i, day) in [
        "2026-01-03",
        "2026-01-01",
        "2026-01-05",
        "2026-01-02",
        "2026-01-04",
    ]
    .iter()
    .enumerate()
    {
        let r = app
            .post("/v1/events", &t.key, json!({"type": "purchase.completed", "contact": {"external_id": "c"},
                                                "occurred_at": format!("{day}T10:00:00Z"), "properties": {"i": i}}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
    let mut days = Vec::new();
    let mut path = format!("/v1/contacts/{id}/timeline?type=purchase.completed&limit=2");
    loop {
        let page = app.get(&path, &t.key).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        for e in page.body["data"].as_array().unwrap() {
            days.push(e["occurred_at"].as_str().unwrap()[..10].to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(cur) => {
                path = format!(
                    "/v1/contacts/{id}/timeline?type=purchase.completed&limit=2&cursor={cur}"
                )
            }
            None => break,
        }
    }
    assert_eq!(
        days,
        [
            "2026-01-05",
            "2026-01-04",
            "2026-01-03",
            "2026-01-02",
            "2026-01-01"
        ]
    );
    // Everything, including what Rapport emitted itself.
    let all = app
        .get(&format!("/v1/contacts/{id}/timeline"), &t.key)
        .await;
    let types: Vec<&str> = all.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"contact.created"));
    assert_eq!(types.len(), 6);
}

#[tokio::test]
async fn events_appended_in_one_statement_get_exact_ordinals() {
    use rapport::domain::TenantId;
    use rapport::events::store::{Emitted, append_many};
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let ana = app.contact(&t, "ana", json!({})).await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ivo = app.contact(&t, "ivo", json!({})).await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let tenant = TenantId(t.id.parse().unwrap());
    let row = |contact, kind| Emitted {
        tenant,
        contact_id: contact,
        kind,
        properties: json!({}),
        subject: None,
    };
    let mut conn = app.pool.acquire().await.unwrap();
    let rows = [
        row(ana, "message.sent"),
        row(ivo, "message.sent"),
        row(ana, "message.sent"),
        row(ana, "message.failed"),
    ];
    assert_eq!(append_many(&mut conn, &rows).await.unwrap(), 4);
    assert_eq!(append_many(&mut conn, &rows[..1]).await.unwrap(), 1);
    let got: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT contact_id, type, ordinal FROM events WHERE type LIKE 'message.%' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        got,
        [
            (ana, "message.sent".to_owned(), 1),
            (ivo, "message.sent".to_owned(), 1),
            (ana, "message.sent".to_owned(), 2),
            (ana, "message.failed".to_owned(), 1),
            (ana, "message.sent".to_owned(), 3),
        ]
    );
    let stats = app.get(&format!("/v1/contacts/{ana}"), &t.key).await.body["stats"].clone();
    assert_eq!(stats["message.sent"], 3);
}

/// PostgreSQL keeps a JSON number as an exact decimal and writes `1.7976931348623157e308`
/// back as 309 digits; every number Rapport accepted must read back as the same number
/// (the fuzzer found the timeline answering 500 for the largest double).
#[tokio::test]
async fn extreme_numbers_read_back_exactly_where_they_were_written() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let numbers = json!({"max": f64::MAX, "min": f64::MIN, "tiny": 5e-324, "near": 1.7e308,
                         "sum": 0.1 + 0.2, "big": u64::MAX, "neg": i64::MIN});
    let c = app
        .contact(&t, "c", json!({"attributes": numbers.clone()}))
        .await;
    let id = c["id"].as_str().unwrap();
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "credit.checked", "contact": {"external_id": "c"}, "properties": numbers.clone()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);

    let timeline = app
        .get(
            &format!("/v1/contacts/{id}/timeline?type=credit.checked"),
            &t.key,
        )
        .await;
    assert_eq!(timeline.status, StatusCode::OK, "{}", timeline.text);
    assert_eq!(timeline.body["data"][0]["properties"], numbers);
    let contact = app.get(&format!("/v1/contacts/{id}"), &t.key).await;
    assert_eq!(contact.status, StatusCode::OK, "{}", contact.text);
    assert_eq!(contact.body["attributes"], numbers);
}
