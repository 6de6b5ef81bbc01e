//! The support desk: agents, tickets, automatic assignment, the status machine, messages.

use crate::common;

use axum::http::StatusCode;
use common::{TestApp, TestTenant};
use serde_json::{Value, json};

async fn agent(
    app: &TestApp,
    t: &TestTenant,
    name: &str,
    languages: &[&str],
    countries: &[&str],
    max: i32,
) -> String {
    let r = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": name, "email": format!("{}@acme.example", name.to_lowercase()),
            "languages": languages, "countries": countries, "max_open_tickets": max}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn ticket(app: &TestApp, t: &TestTenant, contact: &str, subject: &str) -> Value {
    let r = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": contact}, "channel": "email",
            "subject": subject, "body": "Pomoć!", "priority": "high"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body
}

#[tokio::test]
async fn agents_are_validated_and_listed() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let id = agent(&app, &t, "Marija", &["hr", "en"], &["hr"], 3).await;
    let a = app.get(&format!("/v1/agents/{id}"), &t.key).await;
    assert_eq!(a.body["countries"], json!(["HR"]));
    assert_eq!(a.body["open_tickets"], 0);
    let dup = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "X", "email": "marija@acme.example"}),
        )
        .await;
    dup.assert_problem(409);
    let bad = app.post("/v1/agents", &t.key, json!({"email": "nope", "languages": ["klingon"], "countries": ["XX"], "max_open_tickets": -1})).await;
    bad.assert_problem(422);
    let mut fields = bad.error_fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "countries[0]",
            "email",
            "languages[0]",
            "max_open_tickets",
            "name"
        ]
    );
    let r = app
        .call(
            axum::http::Method::PATCH,
            &format!("/v1/agents/{id}"),
            Some(&t.key),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(r.body["active"], false);
    assert_eq!(r.body["name"], "Marija");
    assert_eq!(
        app.get("/v1/agents", &t.key).await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn tickets_go_to_an_agent_who_speaks_the_language_and_covers_the_country() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let marija = agent(&app, &t, "Marija", &["hr"], &["HR"], 5).await;
    let john = agent(&app, &t, "John", &["en"], &["GB"], 5).await;
    app.contact(&t, "ana", json!({"locale": "hr", "country": "HR"}))
        .await;
    app.contact(&t, "tom", json!({"locale": "en-GB", "country": "GB"}))
        .await;
    app.contact(&t, "hans", json!({"locale": "de", "country": "DE"}))
        .await;
    assert_eq!(
        ticket(&app, &t, "ana", "a").await["assignee_id"],
        marija.as_str()
    );
    assert_eq!(
        ticket(&app, &t, "tom", "b").await["assignee_id"],
        john.as_str()
    );
    let waiting = ticket(&app, &t, "hans", "c").await;
    assert!(
        waiting["assignee_id"].is_null(),
        "nobody speaks German: it waits"
    );
    // An agent who can take it joins: assigned at once.
    let greta = agent(&app, &t, "Greta", &["de"], &[], 5).await;
    let id = waiting["id"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/v1/tickets/{id}"), &t.key).await.body["assignee_id"],
        greta.as_str()
    );
}

#[tokio::test]
async fn ties_go_round_robin_and_capacity_frees_when_tickets_are_solved() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let a = agent(&app, &t, "Ana", &["hr"], &["HR"], 1).await;
    let b = agent(&app, &t, "Boris", &["hr"], &["HR"], 1).await;
    app.contact(&t, "c", json!({"locale": "hr", "country": "HR"}))
        .await;
    let t1 = ticket(&app, &t, "c", "1").await;
    let t2 = ticket(&app, &t, "c", "2").await;
    let mut got = vec![
        t1["assignee_id"].as_str().unwrap().to_owned(),
        t2["assignee_id"].as_str().unwrap().to_owned(),
    ];
    got.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(got, want, "one each");
    let t3 = ticket(&app, &t, "c", "3").await;
    assert!(t3["assignee_id"].is_null(), "everyone is at capacity");
    // Solving frees a slot: the waiting ticket is assigned to that agent.
    let id1 = t1["id"].as_str().unwrap();
    let r = app
        .call(
            axum::http::Method::PATCH,
            &format!("/v1/tickets/{id1}"),
            Some(&t.key),
            Some(json!({"status": "solved"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id3 = t3["id"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/v1/tickets/{id3}"), &t.key).await.body["assignee_id"],
        t1["assignee_id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tickets_never_put_an_agent_over_capacity() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    agent(&app, &t, "Ana", &[], &[], 3).await;
    agent(&app, &t, "Boris", &[], &[], 3).await;
    app.contact(&t, "c", json!({})).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let router = app.router.clone();
        let key = t.key.clone();
        tasks.spawn(async move {
            let req = axum::http::Request::post("/v1/tickets")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    json!({"contact": {"external_id": "c"}, "channel": "web_form",
                    "subject": format!("t{i}"), "body": "x"})
                    .to_string(),
                ))
                .unwrap();
            let resp = tower::ServiceExt::oneshot(router, req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::CREATED);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let loads: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM tickets WHERE assignee_id IS NOT NULL GROUP BY assignee_id ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(loads, [3, 3]);
    let numbers: Vec<i64> = sqlx::query_scalar("SELECT number FROM tickets ORDER BY number")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        numbers,
        (1..=12).collect::<Vec<_>>(),
        "sequential per tenant, no gaps or repeats"
    );
}

#[tokio::test]
async fn the_status_machine_and_messages() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let a = agent(&app, &t, "Ana", &[], &[], 5).await;
    let tk = ticket(&app, &t, "c", "Problem").await;
    let id = tk["id"].as_str().unwrap().to_owned();
    assert_eq!(tk["status"], "new");
    assert_eq!(tk["number"], 1);
    assert_eq!(tk["messages"][0]["author"], "contact");
    let patch = |body: Value| {
        let app = &app;
        let path = format!("/v1/tickets/{id}");
        let key = t.key.clone();
        async move {
            app.call(axum::http::Method::PATCH, &path, Some(&key), Some(body))
                .await
        }
    };
    patch(json!({"status": "closed"})).await.assert_problem(409);

    // An internal note is not a first response; a public reply is, and opens the ticket.
    let msg = |body: Value| {
        let app = &app;
        let path = format!("/v1/tickets/{id}/messages");
        let key = t.key.clone();
        async move { app.post(&path, &key, body).await }
    };
    let r = msg(json!({"author": {"agent_id": a}, "body": "checking", "internal": true})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert!(
        app.get(&format!("/v1/tickets/{id}"), &t.key).await.body["first_response_at"].is_null()
    );
    msg(json!({"author": {"agent_id": a}, "body": "We are on it"})).await;
    let now = app.get(&format!("/v1/tickets/{id}"), &t.key).await;
    assert!(now.body["first_response_at"].is_string());
    assert_eq!(now.body["status"], "open");
    msg(json!({"author": "contact", "body": "x", "internal": true}))
        .await
        .assert_problem(422);
    msg(json!({"author": {"agent_id": uuid::Uuid::now_v7()}, "body": "x"}))
        .await
        .assert_problem(422);

    let r = patch(json!({"status": "solved"})).await;
    assert!(r.body["solved_at"].is_string());
    // A customer reply reopens a solved ticket.
    msg(json!({"author": "contact", "body": "Still broken"})).await;
    let now = app.get(&format!("/v1/tickets/{id}"), &t.key).await;
    assert_eq!(now.body["status"], "open");
    assert!(now.body["solved_at"].is_null());
    patch(json!({"status": "solved"})).await;
    patch(json!({"status": "closed"})).await;
    patch(json!({"status": "open"})).await.assert_problem(409);
    msg(json!({"author": "contact", "body": "hello?"}))
        .await
        .assert_problem(409);
    patch(json!({"status": "archived"}))
        .await
        .assert_problem(422);

    let contact_id = tk["contact_id"].as_str().unwrap();
    let tl = app
        .get(
            &format!("/v1/contacts/{contact_id}/timeline?limit=50"),
            &t.key,
        )
        .await;
    let types: Vec<&str> = tl.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for kind in [
        "ticket.created",
        "ticket.assigned",
        "ticket.replied",
        "ticket.solved",
        "ticket.reopened",
        "ticket.closed",
    ] {
        assert!(types.contains(&kind), "{kind} missing from {types:?}");
    }
    let list = app
        .get(
            &format!("/v1/tickets?status=closed&assignee_id={a}"),
            &t.key,
        )
        .await;
    assert_eq!(list.body["data"][0]["id"], id.as_str());
}

#[tokio::test]
async fn the_customer_gets_an_acknowledgement_and_the_card_shows_open_tickets() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.put("/v1/templates/ticket_acknowledgement", &t.key, json!({"email": {"hr": {
        "subject": "Zaprimili smo upit #{{ vars.ticket.number }}", "text": "{{ vars.ticket.subject }}"}}})).await;
    app.contact(
        &t,
        "ana",
        json!({"email": "ana@example.com", "phone": "+385 91 234 5678"}),
    )
    .await;
    let tk = ticket(&app, &t, "ana", "Kartica").await;
    app.drain().await;
    let sent = app.outbox_log();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["to"], "ana@example.com");
    assert_eq!(sent[0]["subject"], "Zaprimili smo upit #1");
    let card = app
        .get("/v1/contacts/lookup?phone=%2B385912345678", &t.key)
        .await;
    assert_eq!(card.body["open_tickets"][0]["id"], tk["id"]);
    // Without the template nothing is sent, and nothing fails.
    let other = app.tenant("beta").await;
    let r = app.post("/v1/tickets", &other.key, json!({"contact": {"external_id": "x"}, "channel": "chat", "subject": "s", "body": "b"})).await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn tickets_and_agents_are_invisible_to_other_tenants() {
    let app = TestApp::new().await;
    let a = app.tenant("acme").await;
    let b = app.tenant("beta").await;
    let agent_a = agent(&app, &a, "Ana", &[], &[], 5).await;
    let tk = ticket(&app, &a, "c", "s").await;
    let id = tk["id"].as_str().unwrap();
    app.get(&format!("/v1/tickets/{id}"), &b.key)
        .await
        .assert_problem(404);
    app.get(&format!("/v1/agents/{agent_a}"), &b.key)
        .await
        .assert_problem(404);
    app.call(
        axum::http::Method::PATCH,
        &format!("/v1/tickets/{id}"),
        Some(&b.key),
        Some(json!({"status": "open"})),
    )
    .await
    .assert_problem(404);
    app.post(
        &format!("/v1/tickets/{id}/messages"),
        &b.key,
        json!({"author": "contact", "body": "x"}),
    )
    .await
    .assert_problem(404);
    assert_eq!(app.get("/v1/tickets", &b.key).await.body["data"], json!([]));
    assert_eq!(app.get("/v1/agents", &b.key).await.body["data"], json!([]));
    // B cannot assign its ticket to A's agent.
    let tb = ticket(&app, &b, "c", "s").await;
    let r = app
        .call(
            axum::http::Method::PATCH,
            &format!("/v1/tickets/{}", tb["id"].as_str().unwrap()),
            Some(&b.key),
            Some(json!({"assignee_id": agent_a})),
        )
        .await;
    r.assert_problem(422);
    // Ticket numbers are per tenant.
    assert_eq!(tb["number"], 1);
}

async fn urgent(app: &TestApp, key: &str) -> String {
    let r = app
        .post("/v1/tickets", key, json!({"contact": {"external_id": "c"}, "channel": "phone", "subject": "s", "body": "b", "priority": "urgent"}))
        .await;
    r.body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn sla_breaches_are_recorded_once_per_kind() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("beta").await;
    let r = app
        .put(
            "/v1/settings",
            &t.key,
            json!({"csat_alert_threshold": 3,
        "sla": {"urgent": {"first_response_mins": 15, "resolution_mins": 60}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        app.get("/v1/settings", &t.key).await.body["sla"]["urgent"]["first_response_mins"],
        15
    );
    let bad = app
        .put(
            "/v1/settings",
            &t.key,
            json!({"csat_alert_threshold": 9, "sla": {"asap": {}, "high": {"resolution_mins": 0}}}),
        )
        .await;
    bad.assert_problem(422);
    let mut fields = bad.error_fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "csat_alert_threshold",
            "sla.asap",
            "sla.high.resolution_mins"
        ]
    );

    let late = urgent(&app, &t.key).await;
    let answered = urgent(&app, &t.key).await;
    let theirs = urgent(&app, &other.key).await;
    sqlx::query("UPDATE tickets SET created_at = now() - interval '20 minutes'")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE tickets SET first_response_at = now() WHERE id = $1::uuid")
        .bind(&answered)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        rapport::support::store::check_sla(&app.pool).await.unwrap(),
        1,
        "only the unanswered one, and not the other tenant's (no SLA)"
    );
    assert_eq!(
        rapport::support::store::check_sla(&app.pool).await.unwrap(),
        0,
        "once"
    );
    sqlx::query("UPDATE tickets SET created_at = now() - interval '2 hours'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        rapport::support::store::check_sla(&app.pool).await.unwrap(),
        2,
        "both miss the resolution target"
    );
    let breaches: Vec<Value> = sqlx::query_scalar(
        "SELECT properties FROM events WHERE type = 'ticket.sla_breached' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(breaches.len(), 3);
    assert_eq!(breaches[0]["ticket_id"], late.as_str());
    assert_eq!(breaches[0]["kind"], "first_response");
    assert_eq!(breaches[0]["target_mins"], 15);
    assert!(breaches.iter().all(|b| b["ticket_id"] != theirs.as_str()));
}

#[tokio::test]
async fn snippets_render_for_a_ticket() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    agent(&app, &t, "Marija", &[], &[], 5).await;
    app.contact(&t, "ana", json!({"first_name": "Ana"})).await;
    let tk = ticket(&app, &t, "ana", "Kartica").await;
    let r = app.put("/v1/snippets/solved", &t.key, json!({"title": "Solved",
        "body": "Poštovana {{ contact.first_name }}, upit #{{ ticket.number }} je riješen. {{ agent.name }}"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        app.get("/v1/snippets/solved", &t.key).await.body["title"],
        "Solved"
    );
    assert_eq!(
        app.get("/v1/snippets", &t.key).await.body["data"][0]["key"],
        "solved"
    );
    let out = app
        .post(
            "/v1/snippets/solved/render",
            &t.key,
            json!({"ticket_id": tk["id"]}),
        )
        .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text);
    assert_eq!(
        out.body["text"],
        "Poštovana Ana, upit #1 je riješen. Marija"
    );

    app.put("/v1/snippets/broken", &t.key, json!({"body": "{{ oops"}))
        .await
        .assert_problem(422);
    app.put(
        "/v1/snippets/missing",
        &t.key,
        json!({"body": "{{ contact.nickname }}"}),
    )
    .await;
    let r = app
        .post(
            "/v1/snippets/missing/render",
            &t.key,
            json!({"ticket_id": tk["id"]}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["snippet.body"]);
    app.post(
        "/v1/snippets/nope/render",
        &t.key,
        json!({"ticket_id": tk["id"]}),
    )
    .await
    .assert_problem(404);

    let other = app.tenant("beta").await;
    app.get("/v1/snippets/solved", &other.key)
        .await
        .assert_problem(404);
    app.put("/v1/snippets/solved", &other.key, json!({"body": "x"}))
        .await;
    let r = app
        .post(
            "/v1/snippets/solved/render",
            &other.key,
            json!({"ticket_id": tk["id"]}),
        )
        .await;
    r.assert_problem(422);
}

/// A transaction that opens tickets for several customers (a campaign round hands contacts
/// over; a missed call and an e-mail do it one at a time) and a helpdesk request that may
/// assign must queue for the desk's agents, not deadlock. Before, the round held the ticket
/// counter and the Slovenian agent when the request had locked the Croatian agent and waited
/// for the Slovenian one; the round then wanted the Croatian agent: a cycle.
#[tokio::test]
async fn tickets_opened_by_a_round_and_by_the_desk_do_not_deadlock() {
    use rapport::domain::TenantId;
    use rapport::support::{model::MessageAuthor, store};
    use std::time::Duration;
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    agent(&app, &t, "Marija", &["hr"], &["HR"], 10).await;
    agent(&app, &t, "Mojca", &["sl"], &["SI"], 10).await;
    let id_of = |v: Value| v["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap();
    let hr = id_of(
        app.contact(&t, "ivana", json!({"locale": "hr-HR", "country": "HR"}))
            .await,
    );
    let sl = id_of(
        app.contact(&t, "spela", json!({"locale": "sl-SI", "country": "SI"}))
            .await,
    );
    let mut conn = app.pool.acquire().await.unwrap();
    let tenant = rapport::tenants::store::context(&mut conn, TenantId(t.id.parse().unwrap()))
        .await
        .unwrap()
        .unwrap();
    drop(conn);
    let open = |contact| store::NewTicketRow {
        contact_id: contact,
        channel: "phone",
        subject: "Povratni poziv",
        body: "Nazovite me",
        category: Some("campaign"),
        priority: "normal",
        author: MessageAuthor::System,
        assignee: None,
    };
    let mut round = rapport::db::begin(&app.pool).await.unwrap();
    store::create_ticket(&mut round, &tenant, &open(sl))
        .await
        .unwrap();
    let desk = app.post(
        "/v1/tickets",
        &t.key,
        json!({"contact": {"external_id": "ivana"}, "channel": "email",
               "subject": "Kartica", "body": "Pomoć!"}),
    );
    let rest = async {
        // Long enough for the request to take whatever agents it can before the round goes on.
        tokio::time::sleep(Duration::from_millis(400)).await;
        store::create_ticket(&mut round, &tenant, &open(hr)).await?;
        round.commit().await.map_err(anyhow::Error::from)
    };
    let (desk, rest) = tokio::join!(desk, rest);
    rest.expect("the round's second ticket, then its commit");
    assert_eq!(desk.status, StatusCode::CREATED, "{}", desk.text);
    let assigned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tickets WHERE assignee_id IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(assigned, 3);
}

/// A helpdesk write that PostgreSQL ends to break a deadlock is run again rather than answered
/// with a 503: everything it wrote was rolled back. The deadlock here is one no lock order in
/// Rapport can prevent: another session holds the ticket, then wants the desk lock the
/// request holds.
#[tokio::test]
async fn a_helpdesk_write_ended_by_a_deadlock_is_run_again() {
    use rapport::domain::TenantId;
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    agent(&app, &t, "Marija", &[], &[], 10).await;
    let tk = ticket(&app, &t, "ana", "Kartica").await;
    let id = tk["id"].as_str().unwrap().to_owned();
    let mut other = rapport::db::begin(&app.pool).await.unwrap();
    sqlx::query("SELECT 1 FROM tickets WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *other)
        .await
        .unwrap();
    let path = format!("/v1/tickets/{id}");
    let patch = app.patch(&path, &t.key, json!({"priority": "low"}));
    let rest = async {
        // Once the request holds the desk lock and waits for the ticket, this session wants the
        // desk lock: PostgreSQL ends the request's transaction, which waited first.
        app.wait_for_session("wait_event_type = 'Lock'").await;
        rapport::support::store::lock_desk(&mut other, TenantId(t.id.parse().unwrap())).await?;
        other.commit().await.map_err(anyhow::Error::from)
    };
    let (patch, rest) = tokio::join!(patch, rest);
    rest.expect("the other session keeps its transaction");
    assert_eq!(patch.status, StatusCode::OK, "{}", patch.text);
    assert_eq!(patch.body["priority"], "low");
}
