//! No tenant can take Rapport down: templates and conditions that would exhaust memory or
//! time are refused or stopped, for the tenant who wrote them only.

use crate::common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{TestApp, TestTenant};
use serde_json::{Value, json};

async fn setup(app: &TestApp) -> TestTenant {
    let t = app.tenant("acme").await;
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana", "phone": "+385911234567", "locale": "hr"}),
    )
    .await;
    t
}

async fn sms_template(app: &TestApp, t: &TestTenant, key: &str, text: &str) {
    let r = app
        .put(
            &format!("/v1/templates/{key}"),
            &t.key,
            json!({"sms": {"hr": {"text": text}}}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
}

async fn preview(app: &TestApp, t: &TestTenant, key: &str) -> common::Resp {
    app.post(
        &format!("/v1/templates/{key}/preview"),
        &t.key,
        json!({"channel": "sms", "contact": {"external_id": "ana"}}),
    )
    .await
}

/// Messages written, of every tenant.
async fn message_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Each of these aborted the whole process, or grew it by gigabytes, before templates ran in
/// a child of their own.
const BOMBS: &[&str] = &[
    "{{ {'a': 1}|tojson(indent=100000000000) }}",
    "{{ 'a\nb'|indent(100000000000) }}",
    "{{ range(10000)|join('x' * 10000000) }}",
    "{% set ns = namespace(a='x' * 1000000) %}{% for i in range(40) %}{% set ns.a = ns.a ~ ns.a %}{% endfor %}{{ ns.a|length }}",
];

#[tokio::test]
async fn template_bombs_are_a_422_for_their_tenant_and_nothing_for_anyone_else() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let other = app.tenant("other").await;
    app.contact(&other, "ivo", json!({"phone": "+385917654321"}))
        .await;
    sms_template(&app, &other, "hello", "Bok {{ contact.phone }}").await;
    for (n, bomb) in BOMBS.iter().enumerate() {
        let key = format!("bomb{n}");
        sms_template(&app, &t, &key, bomb).await;
        let r = preview(&app, &t, &key).await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), ["sms.hr"], "{bomb}: {}", r.text);
        let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("MiB of memory") || message.contains("more than"),
            "{bomb}: {message}"
        );
        // The other tenant's templates still render, in this same process.
        let ok = app
            .post(
                "/v1/templates/hello/preview",
                &other.key,
                json!({"channel": "sms", "contact": {"external_id": "ivo"}}),
            )
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
        assert_eq!(ok.body["text"], "Bok +385917654321");
    }
}

#[tokio::test]
async fn a_template_that_burns_cpu_is_stopped_at_its_deadline() {
    let app = TestApp::with_config(|c| c.template_timeout_ms = 500).await;
    let t = setup(&app).await;
    sms_template(&app, &t, "slow", SLOW).await;
    let started = Instant::now();
    let r = preview(&app, &t, "slow").await;
    r.assert_problem(422);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(r.text.contains("within 500 ms"), "{}", r.text);
    // The next render gets a fresh child.
    sms_template(&app, &t, "fine", "Bok {{ contact.first_name }}").await;
    let ok = preview(&app, &t, "fine").await;
    assert_eq!(ok.body["text"], "Bok Ana", "{}", ok.text);
}

#[tokio::test]
async fn a_bomb_in_a_message_is_refused_and_nothing_is_written() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    sms_template(&app, &t, "bomb", BOMBS[0]).await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "bomb", "channel": "sms"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["template.sms.hr"]);
    assert_eq!(message_count(&app).await, 0, "nothing is written");
}

#[tokio::test]
async fn a_bomb_in_an_active_campaign_ends_the_journey_with_the_reason() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    sms_template(&app, &t, "bomb", BOMBS[1]).await;
    let r = app
        .post(
            "/v1/campaigns",
            &t.key,
            json!({"name": "Bomb", "trigger": {"event": "bomb.armed"},
                   "steps": [{"type": "send", "template": "bomb", "channels": ["sms"]}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(&format!("/v1/campaigns/{id}/activate"), &t.key, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "bomb.armed", "contact": {"external_id": "ana"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    app.drain().await;
    let r = app
        .get(&format!("/v1/campaigns/{id}/journeys"), &t.key)
        .await;
    let journeys = r.body["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(journeys.len(), 1, "{}", r.text);
    assert_eq!(journeys[0]["status"], "exited", "{}", r.text);
    let reason = journeys[0]["exit_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("send_failed") && reason.contains("MiB of memory"),
        "{reason}"
    );
}

/// A template that runs until the sandbox's deadline stops it.
const SLOW: &str =
    "{% set a = 'x' * 10000000 %}{% for i in range(600) %}{% set b = a ~ a %}{% endfor %}done";

#[tokio::test]
async fn a_slow_template_holds_no_database_connection_while_it_runs() {
    // Two connections for everything, and one renderer: two requests that held a connection
    // while their template ran (or waited for the renderer) would leave none for anyone else
    // until the deadline. One renderer also keeps this test from taking more than one core
    // from the tests that run beside it.
    let app = TestApp::with_config(|c| {
        c.db_max_connections = 2;
        c.template_timeout_ms = 2_000;
        c.template_workers = 1;
    })
    .await;
    let t = setup(&app).await;
    sms_template(&app, &t, "slow", SLOW).await;
    let send = || {
        app.post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "slow", "channel": "sms"}),
        )
    };
    let senders = futures::future::join_all((0..2).map(|_| send()));
    let reader = async {
        // Once the renders are under way.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let r = app.get("/v1/contacts?external_id=ana", &t.key).await;
        (r, started.elapsed())
    };
    let (sent, (read, waited)) = tokio::join!(senders, reader);
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    assert!(
        waited < Duration::from_millis(1_000),
        "a read waited {waited:?} for a connection while templates ran"
    );
    for r in sent {
        r.assert_problem(422);
    }
    assert_eq!(message_count(&app).await, 0, "nothing is written");
}

#[tokio::test]
async fn the_engine_queues_a_send_unrendered_and_the_worker_renders_it() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    sms_template(&app, &t, "hello", "Bok {{ contact.first_name }}").await;
    let r = app
        .post(
            "/v1/campaigns",
            &t.key,
            json!({"name": "Hello", "trigger": {"event": "hello.said"},
                   "steps": [{"type": "send", "template": "hello", "channels": ["sms"]}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    app.post(&format!("/v1/campaigns/{id}/activate"), &t.key, json!({}))
        .await;
    let r = app
        .post(
            "/v1/events",
            &t.key,
            json!({"type": "hello.said", "contact": {"external_id": "ana"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // The engine alone: the message is queued with its template still to run, so no tenant
    // template ran inside the engine's transaction.
    for _ in 0..10 {
        rapport::campaigns::engine::round(&app.app.state, false)
            .await
            .unwrap();
    }
    let (status, text, compose): (String, Option<String>, Option<Value>) =
        sqlx::query_as("SELECT status, body_text, compose FROM messages")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), text), ("queued", None));
    let compose = compose.expect("the template waits in the row");
    assert_eq!(compose["locale"], "hr");
    assert_eq!(compose["context"]["contact"]["first_name"], "Ana");
    app.drain().await;
    let (status, text, compose): (String, Option<String>, Option<Value>) =
        sqlx::query_as("SELECT status, body_text, compose FROM messages")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "sent");
    assert_eq!(text.as_deref(), Some("Bok Ana"));
    assert_eq!(compose, None);
    let log = app.outbox_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["text"], "Bok Ana");
}

#[tokio::test]
async fn a_condition_that_would_exhaust_memory_is_refused_on_save() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let list = format!("[{}]", vec!["1"; 100].join(","));
    let audience = format!("size({list}.map(a,{list}.map(b,{list}.map(c,{list}.map(d,1))))) > 0");
    let started = Instant::now();
    let r = app
        .post(
            "/v1/campaigns",
            &t.key,
            json!({"name": "Bomb", "trigger": {"event": "x.y"}, "audience": audience,
                   "steps": [{"type": "exit"}]}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["audience"], "{}", r.text);
    assert!(started.elapsed() < Duration::from_secs(2));
    let campaigns: i64 = sqlx::query_scalar("SELECT count(*) FROM campaigns")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(campaigns, 0);
    let _: Value = r.body;
}

/// A raw `GET /healthz` on a new connection; the status line, or the error.
async fn healthz(addr: std::net::SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(
            String::from_utf8_lossy(&out)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(line)) => Ok(line),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_and_the_cap_queues_new_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::with_config(|c| {
        c.http_header_timeout_secs = 1;
        c.http_max_connections = 8;
    })
    .await;
    let (addr, stop) = app.serve().await;
    // Twenty clients: half send half a request, half nothing at all.
    let mut slow = Vec::new();
    for n in 0..20 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if n % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                .await
                .unwrap();
        }
        slow.push(s);
    }
    // Past the cap, a new client waits in the backlog and is served once the idle ones
    // are cut off, well within its patience.
    let started = Instant::now();
    assert_eq!(healthz(addr).await.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Every slow connection was closed by the server.
    for mut s in slow {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match read {
            Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => panic!("a slow connection is still open"),
        }
    }
    stop.cancel();
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let app = TestApp::with_config(|c| {
        c.tenant_rate_limit = 5;
        c.tenant_rate_burst = 5;
    })
    .await;
    let t = app.tenant("acme").await;
    let other = app.tenant("other").await;
    for _ in 0..5 {
        let r = app.get("/v1/contacts", &t.key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = app.get("/v1/contacts", &t.key).await;
    r.assert_problem(429);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.body["type"], "urn:rapport:problem:rate-limited");
    // Another tenant, and the operators, are not slowed by it.
    assert_eq!(
        app.get("/v1/contacts", &other.key).await.status,
        StatusCode::OK
    );
    for _ in 0..10 {
        let r = app.get("/admin/v1/tenants", common::ADMIN).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // The service's clock decides the refill (it stands still in tests): a second later the
    // tenant has five tokens again, and only five.
    app.advance(chrono::Duration::seconds(1));
    for _ in 0..5 {
        let r = app.get("/v1/contacts", &t.key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    app.get("/v1/contacts", &t.key).await.assert_problem(429);
}

#[tokio::test]
async fn metrics_can_be_put_behind_a_token() {
    let app = TestApp::with_config(|c| c.metrics_token = Some("scrape-me".into())).await;
    let r = app
        .call(axum::http::Method::GET, "/metrics", None, None)
        .await;
    r.assert_problem(401);
    let r = app
        .call(axum::http::Method::GET, "/metrics", Some("scrape-me"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let open = TestApp::new().await;
    let r = open
        .call(axum::http::Method::GET, "/metrics", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn provider_urls_must_be_public_https_unless_an_operator_allows_the_host() {
    let app = TestApp::with_config(|c| c.egress_allow_hosts.clear()).await;
    let t = app.tenant("acme").await;
    for url in [
        "http://169.254.169.254/latest",
        "https://169.254.169.254/latest",
        "http://10.0.0.1",
        "https://10.0.0.1",
        "https://127.0.0.1:5432",
        "https://[::1]:8080",
        "https://localhost",
        "http://api.twilio.com",
    ] {
        let r = app
            .put(
                "/v1/channels/sms",
                &t.key,
                json!({"provider": "twilio", "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": url},
                       "secrets": {"auth_token": "x"}}),
            )
            .await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), ["settings.base_url"], "{url}: {}", r.text);
    }
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "smtp", "settings": {"host": "127.0.0.1", "from": "a@acme.hr"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["settings.host"]);
    let r = app
        .put(
            "/v1/integrations/aircall",
            &t.key,
            json!({"webhook_token": "tok", "api_id": "id", "api_token": "secret",
                   "api_base_url": "http://169.254.169.254"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["api_base_url"], "{}", r.text);
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "twilio", "settings": {"account_sid": "AC1", "from": "+15005550006",
                   "base_url": "https://api.twilio.com"}, "secrets": {"auth_token": "x"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn a_private_address_saved_under_a_looser_policy_is_refused_when_sending() {
    // Saved while the operator allowed 127.0.0.1 ...
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "twilio", "settings": {"account_sid": "AC1", "from": "+15005550006",
                   "base_url": "https://127.0.0.1:9"}, "secrets": {"auth_token": "x"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    sms_template(&app, &t, "hi", "Bok").await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "hi", "channel": "sms"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    // ... and sent by a worker whose operator no longer does.
    let mut config = (*app.app.state.config).clone();
    config.egress_allow_hosts.clear();
    let strict = rapport::App::from_pool(app.pool.clone(), config);
    rapport::worker::drain(&strict.state).await.unwrap();
    let m = app.get(&format!("/v1/messages/{id}"), &t.key).await;
    assert_ne!(m.body["status"], "sent", "{}", m.text);
    let reason = m.body["status_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("must be a public address"), "{}", m.text);
}

/// Every row of every tenant-owned table, as text (stored responses decoded).
async fn everything_of(app: &TestApp, tenant: &str) -> Vec<(String, String)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND column_name = 'tenant_id' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(tables.len() > 15, "{tables:?}");
    let tenant: uuid::Uuid = tenant.parse().unwrap();
    let mut rows = Vec::new();
    for table in tables {
        let texts: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT row_to_json(t)::text FROM {table} t WHERE tenant_id = $1"
        ))
        .bind(tenant)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        rows.extend(texts.into_iter().map(|t| (table.clone(), t)));
    }
    let responses: Vec<String> = sqlx::query_scalar(
        "SELECT convert_from(response_body, 'UTF8') FROM idempotency_keys
         WHERE tenant_id = $1 AND response_body IS NOT NULL",
    )
    .bind(tenant)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.extend(
        responses
            .into_iter()
            .map(|r| ("idempotency_keys.response_body".to_owned(), r)),
    );
    rows
}

#[tokio::test]
async fn erasure_leaves_no_personal_data_in_any_table_and_keeps_the_aggregates() {
    use axum::body::Body;
    use axum::http::Request;
    let mut app = TestApp::new().await;
    app.use_provider(std::sync::Arc::new(common_provider::Accepting));
    let t = app.tenant("acme").await;
    let r = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "Marko", "email": "marko@acme.example", "languages": ["hr"],
                   "countries": ["HR"], "max_open_tickets": 5}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let agent = r.body["id"].as_str().unwrap().to_owned();
    let ana = app
        .contact(
            &t,
            "crm-ana-7781",
            json!({"first_name": "Anastazija", "last_name": "Horvatić", "email": "anastazija.h@example.hr",
                   "phone": "+385911234567", "locale": "hr", "attributes": {"iban": "HR1210010051863000160"}}),
        )
        .await;
    let id = ana["id"].as_str().unwrap().to_owned();
    let personal = [
        "crm-ana-7781",
        "Anastazija",
        "Horvatić",
        "anastazija.h@example.hr",
        "385911234567",
        "HR1210010051863000160",
    ];
    app.put(
        "/v1/templates/hello",
        &t.key,
        json!({"sms": {"hr": {"text": "Bok {{ contact.first_name }}, {{ contact.phone }}"}},
               "email": {"hr": {"subject": "Za {{ contact.first_name }} {{ contact.last_name }}",
                                "text": "{{ contact.email }}"}}}),
    )
    .await;
    for channel in ["sms", "email"] {
        let body = json!({"contact": {"external_id": "crm-ana-7781"}, "template": "hello", "channel": channel});
        let request = Request::post("/v1/messages")
            .header("authorization", format!("Bearer {}", t.key))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("send-{channel}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        let r = app.send(request).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
    app.drain().await;
    let r = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": "crm-ana-7781"}, "channel": "email",
                   "subject": "Anastazija Horvatić: refund", "body": "Call me on +385911234567",
                   "priority": "normal"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let ticket = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/v1/tickets/{ticket}/messages"),
            &t.key,
            json!({"author": {"agent_id": agent}, "body": "Dear Anastazija, we called +385911234567", "internal": false}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = app
        .post(
            "/v1/csat",
            &t.key,
            json!({"ticket_id": ticket, "contact": {"external_id": "crm-ana-7781"}, "score": 2,
                   "comment": "I am Anastazija Horvatić and nobody called", "source": "typeform"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    sqlx::query(
        "INSERT INTO calls (tenant_id, id, provider, provider_call_id, direction, external_number,
            contact_id, stage, recording_url, comments)
         VALUES ($1, gen_random_uuid(), 'aircall', '1', 'inbound', '+385911234567', $2, 3,
            'https://rec.example/385911234567.mp3', '[\"Anastazija called\"]')",
    )
    .bind(t.id.parse::<uuid::Uuid>().unwrap())
    .bind(id.parse::<uuid::Uuid>().unwrap())
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO inbound_messages (tenant_id, id, channel, provider, provider_message_id,
            contact_id, sender, body)
         VALUES ($1, gen_random_uuid(), 'sms', 'twilio', 'SMin', $2, '+385911234567',
            'Anastazija here')",
    )
    .bind(t.id.parse::<uuid::Uuid>().unwrap())
    .bind(id.parse::<uuid::Uuid>().unwrap())
    .execute(&app.pool)
    .await
    .unwrap();
    app.drain().await;

    let before = everything_of(&app, &t.id).await;
    for needle in personal {
        assert!(
            before.iter().any(|(_, row)| row.contains(needle)),
            "{needle} was never stored"
        );
    }
    let r = app.delete(&format!("/v1/contacts/{id}"), &t.key).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let after = everything_of(&app, &t.id).await;
    let left: Vec<_> = after
        .iter()
        .filter(|(_, row)| personal.iter().any(|n| row.contains(n)))
        .collect();
    assert!(
        left.is_empty(),
        "personal data left after erasure: {left:#?}"
    );

    // The API shows nothing of the person either, and the aggregates still count.
    for path in [
        format!("/v1/messages?contact_id={id}"),
        format!("/v1/tickets/{ticket}"),
        format!("/v1/contacts/{id}/timeline"),
    ] {
        let r = app.get(&path, &t.key).await;
        for needle in personal {
            assert!(
                !r.text.contains(needle),
                "{path} still shows {needle}: {}",
                r.text
            );
        }
    }
    let ratings: i64 = sqlx::query_scalar("SELECT count(*) FROM ratings WHERE score = 2")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(ratings, 1);
    let messages: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE status = 'sent' AND contact_id = $1",
    )
    .bind(id.parse::<uuid::Uuid>().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        messages, 4,
        "the SMS, the email, the ticket's acknowledgement and the agent's reply still count"
    );
}

mod common_provider {
    use futures::future::BoxFuture;
    use rapport::channels::{Outbound, Provider, Receipt, SendError};

    /// Accepts every message.
    pub struct Accepting;

    impl Provider for Accepting {
        fn name(&self) -> &'static str {
            "accepting"
        }
        fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
            Box::pin(async move {
                Ok(Receipt {
                    provider_message_id: Some(format!("p-{}", m.message_id)),
                })
            })
        }
    }
}

#[tokio::test]
async fn secrets_rotate_moves_every_secret_to_the_new_key() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put(
            "/v1/channels/sms",
            &t.key,
            json!({"provider": "twilio", "settings": {"account_sid": "AC1", "from": "+15005550006"},
                   "secrets": {"auth_token": "very-secret-token"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .put(
            "/v1/integrations/aircall",
            &t.key,
            json!({"webhook_token": "tok-1", "api_id": "id", "api_token": "secret"}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    app.app.state.links.get(&app.pool).await.unwrap();
    let link_key_before: Vec<u8> =
        sqlx::query_scalar("SELECT value FROM service_keys WHERE name = 'link_signing'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let new_key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let rotate = |key: &str, old: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rapport"))
            .args(["secrets", "rotate"])
            .env("DATABASE_URL", &app.db.url)
            .env("RAPPORT_SECRET_KEY", key)
            .env("RAPPORT_SECRET_KEY_OLD", old)
            .env(
                "RAPPORT_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
            )
            .output()
            .unwrap()
    };
    // Without the old key the new one opens nothing: start-up says so, nothing changes.
    let out = rotate(new_key, "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be decrypted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rotate(new_key, common::TEST_SECRET_KEY);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 channel configurations, 1 integrations, the link-signing key"),
        "{stdout}"
    );
    let link_key_after: Vec<u8> =
        sqlx::query_scalar("SELECT value FROM service_keys WHERE name = 'link_signing'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_ne!(link_key_before, link_key_after);
    // The new key alone now opens everything; the old one nothing.
    let mut config = (*app.app.state.config).clone();
    config.secret_key = Some(new_key.into());
    let rotated = rapport::App::from_pool(app.pool.clone(), config.clone());
    let mut conn = app.pool.acquire().await.unwrap();
    let tenant = rapport::domain::TenantId(t.id.parse().unwrap());
    let sms = rapport::channels::settings::resolve(
        &mut conn,
        &rotated.state.secrets,
        tenant,
        rapport::domain::Channel::Sms,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(sms.secrets["auth_token"], "very-secret-token");
    assert!(rotated.state.links.get(&app.pool).await.is_ok());
    let old_only = rapport::crypto::SecretBox::new(Some(common::TEST_SECRET_KEY));
    assert!(
        rapport::channels::settings::resolve(
            &mut conn,
            &old_only,
            tenant,
            rapport::domain::Channel::Sms
        )
        .await
        .is_err()
    );
    // A second run has nothing left to do.
    let out = rotate(new_key, common::TEST_SECRET_KEY);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 channel configurations, 0 integrations\n"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn the_link_signing_key_is_sealed_at_rest_and_loaded_at_start() {
    let app = TestApp::new().await;
    // TestApp builds from a pool: the key is loaded on first use, and sealed when created.
    app.app.state.links.get(&app.pool).await.unwrap();
    let (sealed, len): (bool, i32) = sqlx::query_as(
        "SELECT sealed, length(value) FROM service_keys WHERE name = 'link_signing'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(sealed);
    assert!(len > 32, "nonce and tag around the 32-byte key");
}

#[tokio::test]
async fn aircall_events_rapport_does_not_use_are_accepted_and_ignored() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let r = app
        .put(
            "/v1/integrations/aircall",
            &t.key,
            json!({"webhook_token": "tok-1"}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    for (resource, event) in [
        ("user", "user.connected"),
        ("number", "number.closed"),
        ("call", "call.tagged_unknown"),
    ] {
        let r = app
            .call(
                axum::http::Method::POST,
                &format!("/webhooks/aircall/{}", t.id),
                None,
                Some(json!({"resource": resource, "event": event, "timestamp": 1, "token": "tok-1", "data": {"id": 1}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{event}: {}", r.text);
        assert_eq!(r.body["call_id"], Value::Null);
    }
    // A wrong token is still a 401, and reads the same for a tenant that does not exist.
    let wrong = app
        .call(
            axum::http::Method::POST,
            &format!("/webhooks/aircall/{}", t.id),
            None,
            Some(
                json!({"resource": "user", "event": "user.connected", "token": "nope", "data": {}}),
            ),
        )
        .await;
    let ghost = app
        .call(
            axum::http::Method::POST,
            &format!("/webhooks/aircall/{}", uuid::Uuid::now_v7()),
            None,
            Some(
                json!({"resource": "user", "event": "user.connected", "token": "nope", "data": {}}),
            ),
        )
        .await;
    wrong.assert_problem(401);
    ghost.assert_problem(401);
    assert_eq!(wrong.body["detail"], ghost.body["detail"]);
}

#[tokio::test]
async fn an_idempotent_message_and_its_stored_response_commit_in_one_transaction() {
    use axum::body::Body;
    use axum::http::Request;
    let app = TestApp::new().await;
    let t = setup(&app).await;
    sms_template(&app, &t, "hi", "Bok").await;
    let post = |key: &str, path: &str, body: Value| {
        Request::post(path)
            .header("authorization", format!("Bearer {}", t.key))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let body = json!({"contact": {"external_id": "ana"}, "template": "hi", "channel": "sms"});
    let first = app.send(post("m-1", "/v1/messages", body.clone())).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let id: uuid::Uuid = first.body["id"].as_str().unwrap().parse().unwrap();
    // Same transaction id: a crash after the commit cannot leave the message without its
    // stored response (a retry would then queue a second one).
    let (message_xmin, key_xmin): (String, String) = sqlx::query_as(
        "SELECT (SELECT xmin::text FROM messages WHERE id = $1),
                (SELECT xmin::text FROM idempotency_keys WHERE key = 'm-1')",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(message_xmin, key_xmin);
    let again = app.send(post("m-1", "/v1/messages", body)).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);

    let ticket = json!({"contact": {"external_id": "ana"}, "channel": "sms", "subject": "Refund",
                        "body": "Please", "priority": "normal"});
    let first = app.send(post("t-1", "/v1/tickets", ticket.clone())).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let id: uuid::Uuid = first.body["id"].as_str().unwrap().parse().unwrap();
    let (ticket_xmin, key_xmin): (String, String) = sqlx::query_as(
        "SELECT (SELECT xmin::text FROM tickets WHERE id = $1),
                (SELECT xmin::text FROM idempotency_keys WHERE key = 't-1')",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(ticket_xmin, key_xmin);
    let again = app.send(post("t-1", "/v1/tickets", ticket)).await;
    assert_eq!(again.body, first.body);
    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(tickets, 1);
}

#[tokio::test]
async fn the_same_json_with_other_whitespace_or_key_order_is_the_same_idempotent_request() {
    use axum::body::Body;
    use axum::http::Request;
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let post = |raw: &str| {
        Request::post("/v1/events")
            .header("authorization", format!("Bearer {}", t.key))
            .header("content-type", "application/json")
            .header("idempotency-key", "e-1")
            .body(Body::from(raw.to_owned()))
            .unwrap()
    };
    let first = app
        .send(post(
            r#"{"type":"purchase.completed","contact":{"external_id":"c"}}"#,
        ))
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let again = app
        .send(post(
            "{\n  \"contact\": { \"external_id\": \"c\" },\n  \"type\": \"purchase.completed\"\n}",
        ))
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    assert_eq!(again.body, first.body);
    let other = app
        .send(post(
            r#"{"type":"purchase.completed","contact":{"external_id":"d"}}"#,
        ))
        .await;
    other.assert_problem(422);
}

#[tokio::test]
async fn the_docs_work_offline_and_pages_carry_security_headers() {
    let app = TestApp::new().await;
    let page = app.call(axum::http::Method::GET, "/docs", None, None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        !page.text.contains("https://"),
        "nothing from elsewhere: {}",
        page.text
    );
    let scripts: Vec<&str> = page
        .text
        .split("<script src=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    assert_eq!(scripts.len(), 2, "{}", page.text);
    for src in scripts {
        let r = app.call(axum::http::Method::GET, src, None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{src}");
        assert!(r.content_type().starts_with("text/javascript"), "{src}");
        assert!(r.text.len() > 40, "{src}");
    }
    let licence = app
        .call(
            axum::http::Method::GET,
            "/docs/LICENSE-scalar.txt",
            None,
            None,
        )
        .await;
    assert!(licence.text.contains("MIT License"));
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    // A customer's page: no framing, no outside resources, no referrer with its token.
    let unsubscribe = app
        .call(axum::http::Method::GET, "/s/not-a-valid-token", None, None)
        .await;
    for (name, value) in [
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(unsubscribe.headers[name], value, "{}", unsubscribe.text);
    }
    assert!(
        unsubscribe.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
}

#[tokio::test]
async fn an_owner_agent_must_be_one_of_the_tenants_agents() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("other").await;
    let theirs = app
        .post(
            "/v1/agents",
            &other.key,
            json!({"name": "Eve", "email": "eve@other.example", "languages": ["hr"], "countries": ["HR"], "max_open_tickets": 5}),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::CREATED, "{}", theirs.text);
    for agent in [theirs.body["id"].clone(), json!(uuid::Uuid::now_v7())] {
        let r = app
            .put("/v1/contacts/ana", &t.key, json!({"owner_agent_id": agent}))
            .await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), ["owner_agent_id"], "{}", r.text);
    }
    let r = app
        .post(
            "/v1/contacts/batch",
            &t.key,
            json!({"contacts": [{"external_id": "ivo", "owner_agent_id": theirs.body["id"]}]}),
        )
        .await;
    assert!(r.text.contains("owner_agent_id"), "{}", r.text);
    let contacts: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(contacts, 0);
}

/// The tasks behind the API end with it: once `run_api` has drained its requests, the event
/// writers finish what was queued and stop, so a later ingest is refused (503), not queued
/// for writers that are gone.
#[tokio::test]
async fn the_event_writers_stop_with_the_api() {
    let app = TestApp::new().await;
    let t = app.tenant("writers").await;
    let event = json!({"type": "order.placed", "contact": {"external_id": "c-1"}});
    let (_, stop) = app.serve().await;
    let r = app.post("/v1/events", &t.key, event.clone()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(!app.app.state.api_stopped.is_cancelled());
    stop.cancel();
    let started = Instant::now();
    while !app.app.state.api_stopped.is_cancelled() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "run_api did not return"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = app.post("/v1/events", &t.key, event).await;
    r.assert_problem(503);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'order.placed'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 1);
}

/// A render child's address space is capped from its first instruction, not from the moment
/// its own code sets the cap: the allocator reserves an arena of 1 GiB before `main`, which a
/// late cap would leave the template free to fill.
#[tokio::test]
async fn a_render_child_is_capped_before_it_starts() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_rapport"));
    let mut child = rapport::templates::sandbox::child_command(program, 256)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ask = async |source: &str| {
        let request = json!({"Text": {"name": "t", "source": source, "field": "f", "ctx": {}}});
        stdin
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).await.unwrap();
        line
    };
    assert_eq!(ask("{{ 1 + 1 }}").await.trim(), r#"{"Text":"2"}"#);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib <= 256 * 1024,
        "VmPeak {peak_kib} kB over a 256 MiB cap"
    );
    // A bomb ends the child (no answer) instead of growing it past the cap.
    let bomb = BOMBS[3];
    assert_eq!(ask(bomb).await, "");
    let exit = child.wait().await.unwrap();
    assert!(!exit.success());
}
