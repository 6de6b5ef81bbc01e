//! No tenant can take Rapport down: templates and conditions that would exhaust memory or
//! time are refused or stopped, for the tenant who wrote them only.

mod common;

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
    sms_template(
        &app,
        &t,
        "slow",
        "{% set a = 'x' * 10000000 %}{% for i in range(60) %}{% set b = a ~ a %}{% endfor %}done",
    )
    .await;
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
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(messages, 0);
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
