//! Contacts: upsert, merge, consents, phones, batches, lists, erasure, the card.

use crate::common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::{Value, json};

/// external_id, email, phone, first_name, attributes, country.
type ErasedRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Value,
    Option<String>,
);

#[tokio::test]
async fn upsert_creates_then_updates_and_merges_attributes() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put(
            "/v1/contacts/cust-1",
            &t.key,
            json!({"email": " Ana@Example.COM ", "first_name": "Ana", "phone": "091 234 5678",
                   "birthday": "1990-04-17", "timezone": "Europe/Zagreb",
                   "attributes": {"credit_limit": 5000, "available_credit": 1000, "plan": "gold"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["external_id"], "cust-1");
    assert_eq!(r.body["email"], "ana@example.com");
    assert_eq!(r.body["phone"], "+385912345678");
    assert_eq!(r.body["birthday"], "1990-04-17");

    let r = app
        .put(
            "/v1/contacts/cust-1",
            &t.key,
            json!({"last_name": "Horvat", "attributes": {"available_credit": 4600, "plan": null, "segment": "vip"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(r.body["first_name"], "Ana", "absent fields are kept");
    assert_eq!(r.body["last_name"], "Horvat");
    assert_eq!(
        r.body["attributes"],
        json!({"credit_limit": 5000, "available_credit": 4600, "segment": "vip"})
    );

    // null clears a field.
    let r = app
        .put("/v1/contacts/cust-1", &t.key, json!({"birthday": null}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["birthday"].is_null());

    // The changes are on the timeline with old and new values.
    let tl = app
        .get(
            &format!("/v1/contacts/{id}/timeline?type=contact.updated"),
            &t.key,
        )
        .await;
    let updates = tl.body["data"].as_array().unwrap();
    assert_eq!(updates.len(), 2);
    let changes = &updates[1]["properties"]["changes"];
    assert_eq!(
        changes["attributes.available_credit"],
        json!({"old": 1000, "new": 4600})
    );
    assert_eq!(
        changes["attributes.plan"],
        json!({"old": "gold", "new": null})
    );
    assert_eq!(changes["last_name"], json!({"old": null, "new": "Horvat"}));
    let created = app
        .get(
            &format!("/v1/contacts/{id}/timeline?type=contact.created"),
            &t.key,
        )
        .await;
    assert_eq!(created.body["data"].as_array().unwrap().len(), 1);

    // An upsert that changes nothing emits nothing.
    let same = app
        .put(
            "/v1/contacts/cust-1",
            &t.key,
            json!({"last_name": "Horvat"}),
        )
        .await;
    assert_eq!(same.status, StatusCode::OK);
    let tl = app
        .get(
            &format!("/v1/contacts/{id}/timeline?type=contact.updated"),
            &t.key,
        )
        .await;
    assert_eq!(tl.body["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn consents_merge_per_channel_and_purpose_with_when_and_where() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let c = app
        .contact(&t, "c1", json!({"consents": {"email": {"marketing": "opted_in"},
                                               "sms": {"marketing": {"status": "opted_out", "source": "stop reply",
                                                                     "at": "2026-01-02T03:04:05Z"}}}}))
        .await;
    assert_eq!(c["consents"]["email"]["marketing"]["status"], "opted_in");
    assert_eq!(c["consents"]["email"]["marketing"]["source"], "api");
    assert!(c["consents"]["email"]["marketing"]["at"].is_string());
    assert_eq!(c["consents"]["sms"]["marketing"]["source"], "stop reply");
    assert_eq!(
        c["consents"]["sms"]["marketing"]["at"],
        "2026-01-02T03:04:05Z"
    );

    let c = app
        .contact(
            &t,
            "c1",
            json!({"consents": {"email": {"transactional": "opted_out"}}}),
        )
        .await;
    assert_eq!(
        c["consents"]["email"]["marketing"]["status"], "opted_in",
        "kept"
    );
    assert_eq!(
        c["consents"]["email"]["transactional"]["status"],
        "opted_out"
    );
    assert_eq!(c["consents"]["sms"]["marketing"]["status"], "opted_out");
}

#[tokio::test]
async fn phones_use_the_contacts_country_then_the_tenants() {
    let app = TestApp::new().await;
    let hr = app.tenant("acme").await;
    let c = app
        .contact(&hr, "a", json!({"phone": "091 234 5678"}))
        .await;
    assert_eq!(c["phone"], "+385912345678");
    let c = app
        .contact(&hr, "b", json!({"phone": "020 7946 0018", "country": "GB"}))
        .await;
    assert_eq!(c["phone"], "+442079460018");
    assert_eq!(c["country"], "GB");
    // The stored country is used for a later national number.
    let c = app
        .contact(&hr, "b", json!({"phone": "020 7946 0019"}))
        .await;
    assert_eq!(c["phone"], "+442079460019");
    let c = app
        .contact(&hr, "c", json!({"phone": "+386 40 123 456"}))
        .await;
    assert_eq!(c["phone"], "+38640123456");
    // A number invalid in the contact's country is a 422 on `phone`, and nothing changes.
    let r = app
        .put(
            "/v1/contacts/b",
            &hr.key,
            json!({"phone": "12", "first_name": "X"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["phone"]);
    let again = app.get("/v1/contacts?external_id=b", &hr.key).await;
    assert!(again.body["data"][0]["first_name"].is_null());
}

#[tokio::test]
async fn batch_upsert_reports_each_item_and_keeps_the_good_ones() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.contact(&t, "existing", json!({"first_name": "Old"}))
        .await;
    let r = app
        .post(
            "/v1/contacts/batch",
            &t.key,
            json!({"contacts": [
                {"external_id": "n1", "email": "n1@example.com"},
                {"external_id": "n2", "phone": "not a phone"},
                {"email": "no-id@example.com"},
                {"external_id": "existing", "first_name": "New"},
                {"external_id": "existing", "first_name": "New"},
                {"external_id": "n3", "email": "bad"}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let statuses = item_statuses(&r);
    assert_eq!(
        statuses,
        [
            "created",
            "rejected",
            "rejected",
            "updated",
            "unchanged",
            "rejected"
        ]
    );
    assert_eq!(
        r.body["results"][1]["errors"][0]["field"],
        "contacts[1].phone"
    );
    assert_eq!(
        r.body["results"][2]["errors"][0]["field"],
        "contacts[2].external_id"
    );
    assert_eq!(
        r.body["results"][5]["errors"][0]["field"],
        "contacts[5].email"
    );
    assert_eq!(r.body["created"], 1);
    assert_eq!(r.body["rejected"], 3);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 2);

    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"external_id": format!("x{i}")}))
        .collect();
    let r = app
        .post("/v1/contacts/batch", &t.key, json!({"contacts": too_many}))
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["contacts"]);
}

#[tokio::test]
async fn batch_of_a_thousand_contacts() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let items: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"external_id": format!("c{i}"), "email": format!("c{i}@example.com"),
                        "attributes": {"n": i}})
        })
        .collect();
    let r = app
        .post("/v1/contacts/batch", &t.key, json!({"contacts": items}))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        &r.text[..r.text.len().min(500)]
    );
    assert_eq!(r.body["created"], 1000);
    assert_eq!(r.body["results"][999]["index"], 999);
    assert_eq!(r.body["results"][999]["contact"]["external_id"], "c999");
}

#[tokio::test]
async fn list_filters_and_paginates() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    for i in 0..7 {
        app.contact(
            &t,
            &format!("c{i}"),
            json!({"email": format!("c{i}@example.com"),
                                                 "phone": format!("091 234 56{i:02}")}),
        )
        .await;
    }
    let mut ids = Vec::new();
    let mut path = "/v1/contacts?limit=3".to_owned();
    loop {
        let page = app.get(&path, &t.key).await;
        assert_eq!(page.status, StatusCode::OK);
        for c in page.body["data"].as_array().unwrap() {
            ids.push(c["external_id"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/contacts?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids, ["c6", "c5", "c4", "c3", "c2", "c1", "c0"]);

    let by_email = app.get("/v1/contacts?email=C3@Example.com", &t.key).await;
    assert_eq!(by_email.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(by_email.body["data"][0]["external_id"], "c3");
    let by_phone = app.get("/v1/contacts?phone=%2B385912345604", &t.key).await;
    assert_eq!(by_phone.body["data"][0]["external_id"], "c4");
    let by_national = app.get("/v1/contacts?phone=091%20234%205605", &t.key).await;
    assert_eq!(by_national.body["data"][0]["external_id"], "c5");
    let by_ext = app.get("/v1/contacts?external_id=c0", &t.key).await;
    assert_eq!(by_ext.body["data"][0]["external_id"], "c0");
}

#[tokio::test]
async fn erasure_removes_personal_data_and_keeps_aggregates() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let c = app
        .contact(
            &t,
            "c1",
            json!({"email": "ana@example.com", "phone": "091 234 5678", "first_name": "Ana",
                                 "country": "HR", "attributes": {"iban": "HR12"}}),
        )
        .await;
    let id = c["id"].as_str().unwrap();
    let e = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "purchase.completed", "contact": {"external_id": "c1"},
                                            "properties": {"card": "4111"}}),
        )
        .await;
    assert_eq!(e.status, StatusCode::ACCEPTED);

    assert_eq!(
        app.delete(&format!("/v1/contacts/{id}"), &t.key)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    app.get(&format!("/v1/contacts/{id}"), &t.key)
        .await
        .assert_problem(404);
    app.delete(&format!("/v1/contacts/{id}"), &t.key)
        .await
        .assert_problem(404);
    app.get(&format!("/v1/contacts/{id}/timeline"), &t.key)
        .await
        .assert_problem(404);
    app.get("/v1/contacts/lookup?phone=0912345678", &t.key)
        .await
        .assert_problem(404);
    assert_eq!(
        app.get("/v1/contacts?email=ana@example.com", &t.key)
            .await
            .body["data"],
        json!([])
    );

    let row: ErasedRow = sqlx::query_as(
        "SELECT external_id, email, phone, first_name, attributes, country FROM contacts",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row.0, None);
    assert_eq!(row.1, None);
    assert_eq!(row.2, None);
    assert_eq!(row.3, None);
    assert_eq!(row.4, json!({}));
    assert_eq!(
        row.5.as_deref(),
        Some("HR"),
        "the country stays for aggregates"
    );
    let props: Vec<Value> = sqlx::query_scalar("SELECT properties FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(props.iter().all(|p| p == &json!({})));
    let count: i64 = sqlx::query_scalar(
        "SELECT count FROM contact_event_counts WHERE event_type = 'purchase.completed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(count, 1, "the counters stay");

    // The external id is free again: a new contact, not the erased one.
    let again = app.put("/v1/contacts/c1", &t.key, json!({})).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_ne!(again.body["id"], id);
}

#[tokio::test]
async fn contact_card_by_phone() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let c = app
        .contact(
            &t,
            "c1",
            json!({"phone": "+385 91 234 5678", "first_name": "Ana"}),
        )
        .await;
    for i in 0..12 {
        app.post(
            "/v1/events",
            &t.key,
            json!({"type": "page.viewed", "contact": {"external_id": "c1"},
                                              "properties": {"n": i}}),
        )
        .await;
    }
    let card = app
        .get("/v1/contacts/lookup?phone=091%20234%205678", &t.key)
        .await;
    assert_eq!(card.status, StatusCode::OK, "{}", card.text);
    assert_eq!(card.body["contact"]["id"], c["id"]);
    let last = card.body["last_interactions"].as_array().unwrap();
    assert_eq!(last.len(), 10);
    assert_eq!(last[0]["properties"]["n"], 11);
    assert_eq!(card.body["open_tickets"], json!([]));
    assert!(card.body["last_csat"].is_null());

    // An open ticket is on the card as the ticket API shows it, a solved one is not; the
    // last interactions are the timeline's first ten, field for field.
    let ticket = |subject: &str| {
        json!({"contact": {"external_id": "c1"}, "channel": "phone", "subject": subject,
               "body": "Call me back", "priority": "high"})
    };
    let solved = app.post("/v1/tickets", &t.key, ticket("Solved")).await;
    assert_eq!(solved.status, StatusCode::CREATED, "{}", solved.text);
    let solved_id = solved.body["id"].as_str().unwrap();
    for status in ["open", "solved"] {
        let r = app
            .patch(
                &format!("/v1/tickets/{solved_id}"),
                &t.key,
                json!({"status": status}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let open = app.post("/v1/tickets", &t.key, ticket("Open")).await;
    assert_eq!(open.status, StatusCode::CREATED, "{}", open.text);
    let mut shown = app
        .get(
            &format!("/v1/tickets/{}", open.body["id"].as_str().unwrap()),
            &t.key,
        )
        .await
        .body;
    shown.as_object_mut().unwrap().remove("messages");
    let card = app
        .get("/v1/contacts/lookup?phone=%2B385912345678", &t.key)
        .await;
    assert_eq!(card.status, StatusCode::OK, "{}", card.text);
    assert_eq!(card.body["open_tickets"], json!([shown]));
    let timeline = app
        .get(
            &format!(
                "/v1/contacts/{}/timeline?limit=10",
                c["id"].as_str().unwrap()
            ),
            &t.key,
        )
        .await;
    assert_eq!(card.body["last_interactions"], timeline.body["data"]);
    // Newest first: the ticket, then its acknowledgement queued.
    assert_eq!(
        card.body["last_interactions"][0]["type"], "message.queued",
        "newest first"
    );
    assert_eq!(card.body["last_interactions"][1]["type"], "ticket.created");
    app.get("/v1/contacts/lookup?phone=091%20000%200000", &t.key)
        .await
        .assert_problem(404);
    app.get("/v1/contacts/lookup", &t.key)
        .await
        .assert_problem(400);
}

#[tokio::test]
async fn put_rejects_a_body_external_id_that_differs_from_the_path() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put("/v1/contacts/a", &t.key, json!({"external_id": "b"}))
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["external_id"]);
    let r = app
        .put("/v1/contacts/a", &t.key, json!({"external_id": "a"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_batch_applies_its_items_in_order_and_concurrent_batches_create_each_contact_once() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .post(
            "/v1/contacts/batch",
            &t.key,
            json!({"contacts": [
                {"external_id": "ana", "first_name": "Ana", "country": "SI",
                 "attributes": {"tier": "gold", "limit": 100}},
                {"external_id": "ana", "phone": "031 234 567"},
                {"external_id": "ivo", "owner_agent_id": "0190f0f0-0000-7000-8000-000000000000"},
                {"external_id": "ana", "attributes": {"tier": null}},
                {"external_id": "ivo", "phone": "555", "country": "HR"}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let statuses = item_statuses(&r);
    assert_eq!(
        statuses,
        ["created", "updated", "rejected", "updated", "rejected"]
    );
    // The phone read in Ana's country, set by an earlier item of the same batch.
    let ana = &r.body["results"][3]["contact"];
    assert_eq!(ana["phone"], "+38631234567", "{ana}");
    assert_eq!(ana["attributes"], json!({"limit": 100}));
    assert_eq!(
        r.body["results"][2]["errors"][0]["field"],
        "contacts[2].owner_agent_id"
    );
    assert_eq!(
        r.body["results"][4]["errors"][0]["field"],
        "contacts[4].phone"
    );
    let kinds: Vec<(String, Value)> = sqlx::query_as(
        "SELECT type, properties FROM events WHERE type LIKE 'contact.%' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(kinds[0].0, "contact.created");
    assert_eq!(
        kinds[1].1["changes"]["phone"],
        json!({"old": null, "new": "+38631234567"})
    );
    assert_eq!(
        kinds[2].1["changes"]["attributes.tier"],
        json!({"old": "gold", "new": null})
    );
    let ivo: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts WHERE external_id = 'ivo'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(ivo, 0, "a rejected item writes nothing");

    // Four batches at once over the same 300 new contacts, in different orders: no deadlock,
    // one contact and one contact.created each, every item created or updated.
    let batches: Vec<Vec<Value>> = (0..4)
        .map(|k| {
            let mut items: Vec<Value> = (0..300)
                .map(|i| json!({"external_id": format!("c{i}"), "attributes": {"from": k}}))
                .collect();
            if k % 2 == 1 {
                items.reverse();
            }
            items
        })
        .collect();
    let results = futures::future::join_all(
        batches
            .into_iter()
            .map(|items| app.post("/v1/contacts/batch", &t.key, json!({"contacts": items}))),
    )
    .await;
    let mut created = 0;
    for r in &results {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["rejected"], 0, "{}", r.text);
        created += r.body["created"].as_i64().unwrap();
    }
    assert_eq!(created, 300, "each contact created by exactly one batch");
    let (contacts, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM contacts WHERE external_id LIKE 'c%'),
                (SELECT count(*) FROM events WHERE type = 'contact.created')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((contacts, events), (300, 301));
}

#[tokio::test]
async fn export_streams_every_contact_as_ndjson_or_csv() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("other").await;
    app.contact(&other, "theirs", json!({"email": "theirs@example.com"}))
        .await;
    // Header only, for a tenant with no contacts yet.
    let empty = app.get("/v1/contacts/export?format=csv", &t.key).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.text.lines().count(), 1, "{}", empty.text);
    // More than a page (1,000) of contacts.
    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"external_id": format!("c{i:04}"), "attributes": {"n": i}}))
        .collect();
    app.post("/v1/contacts/batch", &t.key, json!({"contacts": items}))
        .await;
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana, \"Anči\"", "last_name": "Šimić", "email": "ana@example.com",
               "phone": "091 234 5678", "attributes": {"city": "Zagreb", "limit": 5000},
               "consents": {"sms": {"marketing": "opted_in"}}}),
    )
    .await;

    let r = app.get("/v1/contacts/export", &t.key).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/x-ndjson");
    let lines: Vec<Value> = r
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1001, "every contact once, this tenant's only");
    let mut ids: Vec<&str> = lines.iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 1001);
    assert_eq!(lines[1000]["last_name"], "Šimić");

    let r = app
        .get(
            "/v1/contacts/export?format=csv&email=ana@example.com",
            &t.key,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type().starts_with("text/csv"),
        "{}",
        r.content_type()
    );
    let mut reader = csv::Reader::from_reader(r.text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1, "filtered as the list is");
    let col = |name: &str| {
        let i = header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"));
        rows[0][i].to_owned()
    };
    assert_eq!(col("first_name"), "Ana, \"Anči\"", "quoted as CSV quotes");
    assert_eq!(col("phone"), "+385912345678");
    assert_eq!(col("consents.sms.marketing"), "opted_in");
    assert_eq!(col("consents.email.marketing"), "");
    assert_eq!(col("attributes.city"), "Zagreb");
    assert_eq!(col("attributes.limit"), "5000");
    assert_eq!(
        col("attributes.n"),
        "",
        "a column for every attribute any contact has"
    );

    // Through the compression layer too.
    let gz = app
        .send(
            axum::http::Request::get("/v1/contacts/export?format=csv")
                .header("authorization", format!("Bearer {}", t.key))
                .header("accept-encoding", "gzip")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(gz.status, StatusCode::OK);
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert!(gz.bytes.len() > 100, "{}", gz.bytes.len());

    let r = app.get("/v1/contacts/export?format=xml", &t.key).await;
    r.assert_problem(400);
}

#[tokio::test]
async fn export_with_filters_that_match_nothing_is_empty() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .get(
            "/v1/contacts/export?format=ndjson&email=0%400.com&external_id=",
            &t.key,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.text, "");
    // A filter PostgreSQL cannot take is refused before the answer starts.
    let r = app
        .get("/v1/contacts/export?external_id=a%00b", &t.key)
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["external_id"]);
}

/// Each item's `status` in a batch answer, in order.
fn item_statuses(r: &common::Resp) -> Vec<String> {
    r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn concurrent_puts_share_transactions_and_keep_each_answer_their_own() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let puts = (0..60).map(|i| {
        // Every third request names the same contact; one in ten is invalid.
        let external_id = if i % 3 == 0 {
            "shared".to_owned()
        } else {
            format!("p{i}")
        };
        let body = if i % 10 == 7 {
            json!({"phone": "555"})
        } else {
            json!({"attributes": {format!("k{i}"): i}})
        };
        let app = &app;
        let key = t.key.clone();
        async move {
            (
                i,
                app.put(&format!("/v1/contacts/{external_id}"), &key, body)
                    .await,
            )
        }
    });
    let answers = futures::future::join_all(puts).await;
    let mut created_shared = 0;
    for (i, r) in &answers {
        if i % 10 == 7 {
            r.assert_problem(422);
            assert_eq!(r.error_fields(), ["phone"], "{}", r.text);
            continue;
        }
        assert!(r.status.is_success(), "{i}: {}", r.text);
        let key = format!("k{i}");
        assert_eq!(r.body["attributes"][&key], *i, "{i}: {}", r.text);
        if i % 3 == 0 && r.status == StatusCode::CREATED {
            created_shared += 1;
        }
    }
    assert_eq!(created_shared, 1, "the shared contact is created once");
    let (contacts, created): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM contacts),
                (SELECT count(*) FROM events WHERE type = 'contact.created')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // 40 distinct p-contacts minus the invalid ones among them, plus the shared one.
    let distinct = (0..60).filter(|i| i % 3 != 0 && i % 10 != 7).count() as i64 + 1;
    assert_eq!((contacts, created), (distinct, distinct));
}
