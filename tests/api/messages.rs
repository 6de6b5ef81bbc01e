//! Templates and the outbox: rendering, consent, the log provider, retries, crash recovery,
//! several workers at once.

use crate::common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::{TestApp, TestTenant};
use futures::future::BoxFuture;
use rapport::channels::{Outbound, Provider, Receipt, SendError};
use serde_json::{Value, json};

/// A provider that answers from a script (then accepts), and records every call.
#[derive(Default)]
struct Scripted {
    script: Mutex<VecDeque<Result<Receipt, SendError>>>,
    calls: Mutex<Vec<Outbound>>,
}

impl Scripted {
    fn with(script: Vec<Result<Receipt, SendError>>) -> Arc<Scripted> {
        Arc::new(Scripted {
            script: Mutex::new(script.into()),
            calls: Mutex::default(),
        })
    }
    fn calls(&self) -> Vec<Outbound> {
        self.calls.lock().unwrap().clone()
    }
}

impl Provider for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
        self.calls.lock().unwrap().push(m.clone());
        let next = self.script.lock().unwrap().pop_front();
        Box::pin(async move {
            next.unwrap_or_else(|| {
                Ok(Receipt {
                    provider_message_id: Some(format!("p-{}", m.message_id)),
                })
            })
        })
    }
}

fn transient(reason: &str) -> Result<Receipt, SendError> {
    Err(SendError::Transient {
        reason: reason.into(),
        retry_after: None,
    })
}

/// Sends the `order_shipped` SMS to Ana and returns the message id.
async fn send_sms(app: &TestApp, t: &TestTenant, order: &str) -> String {
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "order_shipped",
                                              "channel": "sms", "variables": {"order": order}}),
        )
        .await;
    r.body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {}", r.text))
        .to_owned()
}

async fn setup(app: &TestApp) -> TestTenant {
    let t = app.tenant("acme").await;
    let r = app
        .put("/v1/templates/order_shipped", &t.key, json!({
            "email": {
                "hr": {"subject": "Narudžba {{ vars.order }}", "text": "Bok {{ contact.first_name }}",
                       "html": "<p>Bok {{ contact.first_name }}</p>"},
                "en": {"subject": "Order {{ vars.order }}", "text": "Hi {{ contact.first_name }}"}
            },
            "sms": {"hr": {"text": "{{ tenant.name }}: narudžba {{ vars.order }} je poslana"}}
        }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana", "email": "ana@example.com", "phone": "091 234 5678"}),
    )
    .await;
    t
}

#[tokio::test]
async fn templates_are_validated_stored_and_previewed() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let got = app.get("/v1/templates/order_shipped", &t.key).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["purpose"], "transactional");
    assert_eq!(got.body["email"]["en"]["subject"], "Order {{ vars.order }}");
    let list = app.get("/v1/templates?limit=100", &t.key).await;
    let mine: Vec<&Value> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["source"] == "tenant")
        .collect();
    assert_eq!(mine.len(), 1, "{}", list.text);
    assert_eq!(mine[0]["key"], "order_shipped");

    let bad = app
        .put(
            "/v1/templates/broken",
            &t.key,
            json!({"sms": {"hr": {"text": "{{ unclosed"}, "xx-yy-zz": {"text": "x"}},
                                                     "email": {"en": {"subject": "s"}}}),
        )
        .await;
    bad.assert_problem(422);
    let mut fields = bad.error_fields();
    fields.sort();
    assert_eq!(fields, ["email.en", "sms.hr.text", "sms.xx-yy-zz"]);
    app.put("/v1/templates/empty", &t.key, json!({}))
        .await
        .assert_problem(422);
    app.put("/v1/templates/x", &t.key, json!({"fax": {}}))
        .await
        .assert_problem(422);
    app.put(
        "/v1/templates/Bad%20Key",
        &t.key,
        json!({"sms": {"en": {"text": "x"}}}),
    )
    .await
    .assert_problem(422);

    let p = app
        .post("/v1/templates/order_shipped/preview", &t.key,
              json!({"channel": "email", "contact": {"external_id": "ana"}, "vars": {"order": "A-1"}}))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert_eq!(p.body["locale"], "hr", "the tenant's default locale");
    assert_eq!(p.body["subject"], "Narudžba A-1");
    assert_eq!(p.body["html"], "<p>Bok Ana</p>");
    let p = app
        .post("/v1/templates/order_shipped/preview", &t.key,
              json!({"channel": "email", "locale": "en-GB", "contact": {"external_id": "ana"}, "vars": {"order": "A-1"}}))
        .await;
    assert_eq!(p.body["subject"], "Order A-1");
    // A missing variable is an error at preview time, not a blank.
    let p = app
        .post(
            "/v1/templates/order_shipped/preview",
            &t.key,
            json!({"channel": "email", "contact": {"external_id": "ana"}}),
        )
        .await;
    p.assert_problem(422);
    assert_eq!(p.error_fields(), ["email.hr.subject"]);
    let p = app
        .post(
            "/v1/templates/order_shipped/preview",
            &t.key,
            json!({"channel": "viber", "vars": {"order": 1}}),
        )
        .await;
    p.assert_problem(422);
    app.post(
        "/v1/templates/nope/preview",
        &t.key,
        json!({"channel": "sms"}),
    )
    .await
    .assert_problem(404);
}

#[tokio::test]
async fn a_message_goes_queued_then_sent_through_the_log_provider() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "order_shipped",
                                              "channel": "sms", "variables": {"order": "A-7"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["status"], "queued");
    assert_eq!(r.body["recipient"], "+385912345678");
    assert_eq!(r.body["text"], "Tenant acme: narudžba A-7 je poslana");
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(
        app.outbox_log().is_empty(),
        "nothing is sent from the request"
    );

    assert_eq!(app.drain().await, 1);
    let log = app.outbox_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["to"], "+385912345678");
    assert_eq!(log[0]["channel"], "sms");
    assert_eq!(log[0]["idempotency_key"], id.as_str());

    let m = app.get(&format!("/v1/messages/{id}"), &t.key).await;
    assert_eq!(m.body["status"], "sent");
    assert_eq!(m.body["provider"], "log");
    assert_eq!(m.body["attempts"], 1);
    assert_eq!(m.body["delivery_attempts"][0]["outcome"], "sent");
    let history: Vec<&str> = m.body["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["message.queued", "message.sent"]);

    let contact_id = r.body["contact_id"].as_str().unwrap();
    let tl = app
        .get(
            &format!("/v1/contacts/{contact_id}/timeline?type=message.sent"),
            &t.key,
        )
        .await;
    assert_eq!(tl.body["data"][0]["subject_id"], id.as_str());
    let list = app
        .get(
            &format!("/v1/messages?contact_id={contact_id}&status=sent"),
            &t.key,
        )
        .await;
    assert_eq!(list.body["data"][0]["id"], id.as_str());
    app.get("/v1/messages?status=lost", &t.key)
        .await
        .assert_problem(400);
}

#[tokio::test]
async fn consent_and_addresses_decide_the_channel_or_suppress_with_a_reason() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    // No channel given: the first the template has, the contact has an address for and may get.
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "order_shipped",
                                                    "variables": {"order": "1"}}),
        )
        .await;
    assert_eq!(r.body["channel"], "email");
    app.contact(
        &t,
        "ana",
        json!({"consents": {"email": {"transactional": "opted_out"}}}),
    )
    .await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "order_shipped",
                                                    "variables": {"order": "2"}}),
        )
        .await;
    assert_eq!(r.body["channel"], "sms", "email opted out, so sms");
    let r = app.post("/v1/messages", &t.key, json!({"contact": {"external_id": "ana"}, "template": "order_shipped",
                                                    "channel": "email", "variables": {"order": "3"}})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body["status"], "suppressed");
    assert_eq!(r.body["status_reason"], "opted_out");

    // Marketing needs an opt-in.
    app.put(
        "/v1/templates/promo",
        &t.key,
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Popust!"}}}),
    )
    .await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "promo"}),
        )
        .await;
    assert_eq!(r.body["status"], "suppressed");
    assert_eq!(r.body["status_reason"], "no_consent");
    app.contact(
        &t,
        "ana",
        json!({"consents": {"sms": {"marketing": "opted_in"}}}),
    )
    .await;
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "promo"}),
        )
        .await;
    assert_eq!(r.body["status"], "queued");

    // No address for the channel.
    app.contact(&t, "bob", json!({"email": "bob@example.com"}))
        .await;
    let r = app.post("/v1/messages", &t.key, json!({"contact": {"external_id": "bob"}, "template": "order_shipped",
                                                    "channel": "viber", "variables": {"order": "4"}})).await;
    assert_eq!(r.body["status_reason"], "no_variant");
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "bob"}, "template": "promo"}),
        )
        .await;
    assert_eq!(r.body["status_reason"], "no_address");

    // Suppressed messages are never sent, and are on the timeline with their reason.
    let sent_before = app.drain().await;
    assert_eq!(sent_before, 3);
    let sup = app.get("/v1/messages?status=suppressed", &t.key).await;
    assert_eq!(sup.body["data"].as_array().unwrap().len(), 4);
    let bob = app.get("/v1/contacts?external_id=bob", &t.key).await;
    let bob_id = bob.body["data"][0]["id"].as_str().unwrap();
    let tl = app
        .get(
            &format!("/v1/contacts/{bob_id}/timeline?type=message.suppressed"),
            &t.key,
        )
        .await;
    assert_eq!(tl.body["data"].as_array().unwrap().len(), 2);

    // Bad requests write nothing.
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ana"}, "template": "nope"}),
        )
        .await;
    r.assert_problem(422);
    let r = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": "ghost"}, "template": "promo"}),
        )
        .await;
    r.assert_problem(422);
    let r = app.post("/v1/messages", &t.key, json!({"contact": {"external_id": "ana"}, "template": "order_shipped", "channel": "sms"})).await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["template.sms.hr.text"]);
}

#[tokio::test]
async fn transient_failures_retry_with_backoff_and_permanent_ones_fail_at_once() {
    let mut app = TestApp::new().await;
    let t = setup(&app).await;
    let provider = Scripted::with(vec![
        transient("503 Service Unavailable"),
        Ok(Receipt {
            provider_message_id: Some("SM1".into()),
        }),
        Err(SendError::Permanent {
            reason: "21211: invalid 'To' number".into(),
        }),
    ]);
    app.use_provider(provider.clone());
    let send = |order: &str| json!({"contact": {"external_id": "ana"}, "template": "order_shipped", "channel": "sms", "variables": {"order": order}});
    let a = app.post("/v1/messages", &t.key, send("1")).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.drain().await;
    let m = app.get(&format!("/v1/messages/{a}"), &t.key).await;
    assert_eq!(m.body["status"], "queued", "scheduled for a retry");
    assert_eq!(m.body["status_reason"], "503 Service Unavailable");
    let next: chrono::DateTime<chrono::Utc> =
        m.body["next_attempt_at"].as_str().unwrap().parse().unwrap();
    assert!(
        next > chrono::Utc::now(),
        "backoff puts the retry in the future"
    );

    // Time passes: the retry is due, and the provider accepts.
    sqlx::query("UPDATE messages SET next_attempt_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    app.drain().await;
    let m = app.get(&format!("/v1/messages/{a}"), &t.key).await;
    assert_eq!(m.body["status"], "sent");
    assert_eq!(m.body["attempts"], 2);
    let outcomes: Vec<&str> = m.body["delivery_attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["retry", "sent"]);

    // Next in the script: a permanent error fails the next message at once.
    let b = app.post("/v1/messages", &t.key, send("2")).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.drain().await;
    let m = app.get(&format!("/v1/messages/{b}"), &t.key).await;
    assert_eq!(m.body["status"], "failed");
    assert_eq!(m.body["status_reason"], "21211: invalid 'To' number");
    assert_eq!(m.body["attempts"], 1);
    let history: Vec<&str> = m.body["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["message.queued", "message.failed"]);
    // Every call carried the message's idempotency key.
    let calls = provider.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].idempotency_key, calls[1].idempotency_key);
}

#[tokio::test]
async fn after_the_last_attempt_a_message_fails_with_the_reason() {
    let mut app = TestApp::with_config(|c| c.outbox_max_attempts = 3).await;
    let t = setup(&app).await;
    app.use_provider(Scripted::with(vec![
        transient("timeout"),
        transient("timeout"),
        transient("429 Too Many Requests"),
    ]));
    let id = send_sms(&app, &t, "1").await;
    for _ in 0..3 {
        sqlx::query("UPDATE messages SET next_attempt_at = now()")
            .execute(&app.pool)
            .await
            .unwrap();
        app.drain().await;
    }
    let m = app.get(&format!("/v1/messages/{id}"), &t.key).await;
    assert_eq!(m.body["status"], "failed");
    assert_eq!(
        m.body["status_reason"],
        "gave up after 3 attempts: 429 Too Many Requests"
    );
}

#[tokio::test]
async fn a_message_held_by_a_dead_worker_is_sent_by_another() {
    let mut app = TestApp::new().await;
    let t = setup(&app).await;
    let provider = Scripted::with(vec![]);
    app.use_provider(provider.clone());
    let id = send_sms(&app, &t, "1").await;
    // A worker claims it and dies before recording anything.
    let claimed = rapport::messages::store::claim(&app.pool, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        app.drain().await,
        0,
        "held under a live lease: nobody else takes it"
    );
    // The lease expires.
    sqlx::query("UPDATE messages SET locked_until = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(app.drain().await, 1);
    let m = app.get(&format!("/v1/messages/{id}"), &t.key).await;
    assert_eq!(m.body["status"], "sent");
    assert_eq!(m.body["attempts"], 2);
    let outcomes: Vec<&str> = m.body["delivery_attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["lost", "sent"],
        "the lost attempt is on the record"
    );
    // The dead worker comes back: its stale outcome is refused (fenced by the attempt number).
    let stale = rapport::messages::store::record_attempt(
        &app.pool,
        &claimed[0],
        "scripted",
        chrono::Utc::now(),
        &rapport::messages::store::AttemptOutcome::Failed {
            reason: "late".into(),
        },
    )
    .await
    .unwrap();
    assert!(!stale);
    assert_eq!(
        app.get(&format!("/v1/messages/{id}"), &t.key).await.body["status"],
        "sent"
    );
    assert_eq!(provider.calls().len(), 1);
}

#[tokio::test]
async fn a_lease_lost_on_the_last_attempt_fails_the_message() {
    let app = TestApp::with_config(|c| c.outbox_max_attempts = 1).await;
    let t = setup(&app).await;
    let id = send_sms(&app, &t, "1").await;
    rapport::messages::store::claim(&app.pool, 10, Duration::from_secs(60))
        .await
        .unwrap();
    sqlx::query("UPDATE messages SET locked_until = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        rapport::messages::store::sweep_expired_leases(&app.pool)
            .await
            .unwrap(),
        1
    );
    let m = app.get(&format!("/v1/messages/{id}"), &t.key).await;
    assert_eq!(m.body["status"], "failed");
    assert_eq!(
        m.body["status_reason"],
        "the worker stopped during the last attempt"
    );
    let history: Vec<&str> = m.body["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["message.queued", "message.failed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_workers_send_every_message_exactly_once() {
    let mut app = TestApp::with_config(|c| {
        c.outbox_batch_size = 7;
        c.db_max_connections = 24;
    })
    .await;
    let t = setup(&app).await;
    let provider = Scripted::with(vec![]);
    app.use_provider(provider.clone());
    let items: Vec<Value> = (0..200).map(|i| json!({"external_id": format!("c{i}"), "phone": format!("+38591{:07}", 1000000 + i)})).collect();
    app.post("/v1/contacts/batch", &t.key, json!({"contacts": items}))
        .await;
    for i in 0..200 {
        let r = app
            .post(
                "/v1/messages",
                &t.key,
                json!({"contact": {"external_id": format!("c{i}")},
            "template": "order_shipped", "channel": "sms", "variables": {"order": i}}),
            )
            .await;
        assert_eq!(r.body["status"], "queued", "{}", r.text);
    }
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let state = app.app.state.clone();
        workers.spawn(async move { rapport::worker::dispatch::drain(&state).await.unwrap() });
    }
    let mut handled = 0;
    while let Some(n) = workers.join_next().await {
        handled += n.unwrap();
    }
    assert_eq!(handled, 200);
    let calls = provider.calls();
    assert_eq!(calls.len(), 200);
    let mut ids: Vec<_> = calls.iter().map(|c| c.message_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "no message sent twice");
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE status = 'sent'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(sent, 200);
}

/// Waits until message `id` is sent, at most `within`.
async fn sent_within(app: &TestApp, t: &TestTenant, id: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let m = app.get(&format!("/v1/messages/{id}"), &t.key).await;
        if m.body["status"] == "sent" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "not sent: {}", m.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's listener, connected and listening.
const LISTENING: &str = "query LIKE 'LISTEN%rapport_outbox%' AND state = 'idle'";

/// The dispatch loops wake on NOTIFY through the worker's one listener, and keep waking after
/// that listener's connection is killed (it is reopened).
#[tokio::test]
async fn the_worker_wakes_on_notify_even_after_losing_its_listener() {
    use rapport::messages::store::NOTIFY_CHANNEL;
    use rapport::worker::wake::Wakeups;
    let app = TestApp::with_config(|c| c.outbox_poll_interval_ms = 60_000).await;
    let t = setup(&app).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let state = app.app.state.clone();
    let wakeups = Wakeups::start(
        state.listen_pool.clone(),
        &[NOTIFY_CHANNEL, rapport::jobs::store::NOTIFY_CHANNEL],
        shutdown.clone(),
    );
    let worker = tokio::spawn(rapport::worker::dispatch::run(
        state,
        wakeups.subscribe(NOTIFY_CHANNEL),
        shutdown.clone(),
    ));
    app.wait_for_session(LISTENING).await;
    let one = send_sms(&app, &t, "1").await;
    // Polling is a minute away: only the notification can deliver it within the deadline.
    sent_within(&app, &t, &one, Duration::from_secs(10)).await;

    let listeners = app.sessions("query LIKE 'LISTEN%rapport_outbox%'").await;
    assert_eq!(
        listeners.len(),
        1,
        "one listener for every loop and channel"
    );
    app.terminate_backend(listeners[0]).await;
    app.wait_for_session(LISTENING).await;
    let two = send_sms(&app, &t, "2").await;
    sent_within(&app, &t, &two, Duration::from_secs(10)).await;
    shutdown.cancel();
    worker.await.unwrap();
}

#[tokio::test]
async fn messages_and_templates_are_invisible_to_other_tenants() {
    let app = TestApp::new().await;
    let a = setup(&app).await;
    let b = app.tenant("beta").await;
    let id = send_sms(&app, &a, "1").await;
    app.get(&format!("/v1/messages/{id}"), &b.key)
        .await
        .assert_problem(404);
    assert_eq!(
        app.get("/v1/messages", &b.key).await.body["data"],
        json!([])
    );
    app.get("/v1/templates/order_shipped", &b.key)
        .await
        .assert_problem(404);
    // The other tenant sees the built-in defaults only.
    let listed = app.get("/v1/templates?limit=100", &b.key).await;
    let listed = listed.body["data"].as_array().unwrap();
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(|t| t["source"] == "default"),
        "{listed:?}"
    );
    app.post(
        "/v1/templates/order_shipped/preview",
        &b.key,
        json!({"channel": "sms"}),
    )
    .await
    .assert_problem(404);
    app.contact(&b, "ana", json!({"phone": "+385911111111"}))
        .await;
    let r = app
        .post(
            "/v1/messages",
            &b.key,
            json!({"contact": {"external_id": "ana"}, "template": "order_shipped"}),
        )
        .await;
    r.assert_problem(422);
    // B cannot preview with A's contact.
    let a_contact =
        app.get("/v1/contacts?external_id=ana", &a.key).await.body["data"][0]["id"].clone();
    let r = app
        .post(
            "/v1/templates/x/preview",
            &b.key,
            json!({"channel": "sms", "contact_id": a_contact}),
        )
        .await;
    r.assert_problem(404);
}

#[tokio::test]
async fn built_in_templates_are_listed_shown_and_overridden_per_channel_and_locale() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let own = app
        .put(
            "/v1/templates/aaa_offer",
            &t.key,
            json!({"sms": {"hr": {"text": "Ponuda"}}}),
        )
        .await;
    assert_eq!(own.status, StatusCode::CREATED, "{}", own.text);
    assert_eq!(own.body["source"], "tenant");

    // Every page, two at a time: the tenant's key and the defaults, in key order.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut url = "/v1/templates?limit=2".to_owned();
    loop {
        let page = app.get(&url, &t.key).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        for item in page.body["data"].as_array().unwrap() {
            seen.push((
                item["key"].as_str().unwrap().to_owned(),
                item["source"].as_str().unwrap().to_owned(),
            ));
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/templates?limit=2&cursor={c}"),
            None => break,
        }
    }
    let keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "aaa_offer",
            "callback_notice",
            "csat_late_comment",
            "csat_low_rating_alert",
            "csat_survey",
            "sms_stop_confirmation",
            "ticket_acknowledgement",
            "ticket_reply",
            "ticket_solved",
            "unsubscribe_confirmation"
        ]
    );
    assert!(seen[1..].iter().all(|(_, s)| s == "default"), "{seen:?}");

    // A default can be read, to copy and edit.
    let ack = app
        .get("/v1/templates/ticket_acknowledgement", &t.key)
        .await;
    assert_eq!(ack.status, StatusCode::OK, "{}", ack.text);
    assert_eq!(ack.body["source"], "default");
    assert_eq!(ack.body["created_at"], Value::Null);
    for locale in ["en", "hr", "sl", "hu", "pl"] {
        assert!(ack.body["email"][locale]["subject"].is_string(), "{locale}");
        assert!(ack.body["email"][locale]["html"].is_string(), "{locale}");
        assert!(ack.body["sms"][locale]["text"].is_string(), "{locale}");
        assert!(ack.body["viber"][locale]["text"].is_string(), "{locale}");
    }

    // The tenant's Croatian SMS replaces the default's; everything else stays.
    let mine = app
        .put(
            "/v1/templates/ticket_acknowledgement",
            &t.key,
            json!({"sms": {"hr": {"text": "Acme: upit #{{ vars.ticket.number }} je zaprimljen."}}}),
        )
        .await;
    assert_eq!(mine.status, StatusCode::CREATED, "{}", mine.text);
    assert_eq!(mine.body["source"], "customised");
    assert_eq!(
        mine.body["sms"]["hr"]["text"],
        "Acme: upit #{{ vars.ticket.number }} je zaprimljen."
    );
    assert_eq!(mine.body["sms"]["pl"], ack.body["sms"]["pl"]);
    assert_eq!(mine.body["email"]["hr"], ack.body["email"]["hr"]);
    let again = app
        .get("/v1/templates/ticket_acknowledgement", &t.key)
        .await;
    assert_eq!(again.body["source"], "customised");
    assert_eq!(again.body["sms"]["hr"], mine.body["sms"]["hr"]);
}
