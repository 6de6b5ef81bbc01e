//! CSAT: the survey sent on solve, the public page, single-use scores, low-rating alerts, and
//! ratings from outside tools.

use crate::common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{TestApp, TestTenant};
use serde_json::{Value, json};

struct Setup {
    t: TestTenant,
    agent: String,
    ticket: String,
}

async fn setup(app: &TestApp) -> Setup {
    let t = app.tenant("acme").await;
    app.put("/v1/templates/csat_survey", &t.key, json!({"email": {"hr": {
        "subject": "Kako smo riješili upit #{{ vars.ticket.number }}?", "text": "Ocijenite: {{ vars.survey_url }}"}}})).await;
    let agent = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "Marija", "email": "marija@acme.example"}),
        )
        .await;
    let agent = agent.body["id"].as_str().unwrap().to_owned();
    app.contact(
        &t,
        "ana",
        json!({"first_name": "Ana", "email": "ana@example.com", "country": "HR", "locale": "hr"}),
    )
    .await;
    let tk = app.post("/v1/tickets", &t.key, json!({"contact": {"external_id": "ana"}, "channel": "email", "subject": "Kartica", "body": "x"})).await;
    let ticket = tk.body["id"].as_str().unwrap().to_owned();
    Setup { t, agent, ticket }
}

async fn solve(app: &TestApp, s: &Setup) {
    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/tickets/{}", s.ticket),
            Some(&s.t.key),
            Some(json!({"status": "solved"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

fn survey_path(app: &TestApp) -> String {
    let sent = app.outbox_log();
    let text = sent
        .iter()
        .find(|m| m["subject"].as_str().is_some_and(|s| s.starts_with("Kako")))
        .expect("survey sent")["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = text.split_whitespace().last().unwrap();
    url.strip_prefix("http://localhost:8080")
        .unwrap()
        .to_owned()
}

fn form(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test]
async fn a_solved_ticket_gets_a_survey_and_a_low_score_alerts_the_agent() {
    let app = TestApp::new().await;
    let s = setup(&app).await;
    solve(&app, &s).await;
    app.drain().await;
    let path = survey_path(&app);

    let page = app.call(Method::GET, &path, None, None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.content_type().starts_with("text/html"));
    assert!(
        page.text.contains(r#"<html lang="hr">"#),
        "in the contact's language"
    );
    assert_eq!(page.text.matches(r#"name="score""#).count(), 5);
    assert!(
        page.text
            .contains(r#"<label class="comment" for="comment">"#)
    );

    let r = app.send(form(&path, "score=2")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("Hvala Vam na ocjeni."), "{}", r.text);
    assert!(
        r.text.contains(r#"name="comment""#),
        "the thank-you page asks for the comment"
    );
    let rating: (
        i16,
        Option<String>,
        Option<String>,
        String,
        String,
        uuid::Uuid,
    ) = sqlx::query_as(
        "SELECT score, channel, country, source, agent_id::text, ticket_id FROM ratings",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(rating.0, 2);
    assert_eq!(rating.1.as_deref(), Some("email"));
    assert_eq!(rating.2.as_deref(), Some("HR"));
    assert_eq!(rating.3, "survey");
    assert_eq!(rating.4, s.agent);
    assert_eq!(rating.5.to_string(), s.ticket);
    let rated: Vec<Value> =
        sqlx::query_scalar("SELECT properties FROM events WHERE type = 'csat.rated'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(rated[0]["score"], 2);
    assert_eq!(rated[0]["low"], true);

    // The alert waits (two minutes by default) for the comment the page asks for next...
    app.drain().await;
    let to_agent = |app: &TestApp| -> Vec<Value> {
        app.outbox_log()
            .into_iter()
            .filter(|m| m["to"] == "marija@acme.example")
            .collect()
    };
    assert!(to_agent(&app).is_empty(), "the alert waits for the comment");
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM messages
         WHERE template_key = 'csat_low_rating_alert'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!((100.0..=120.0).contains(&wait), "{wait}");

    // ...and the comment goes out with it, at once.
    let r = app.send(form(&path, "comment=Predugo+sam+čekala")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.text.contains("Hvala, Vaš komentar je zaprimljen."),
        "{}",
        r.text
    );
    assert!(
        !r.text.contains(r#"name="comment""#),
        "no second comment box"
    );
    app.drain().await;
    let alerts = to_agent(&app);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    // The built-in alert, in the tenant's language (the agent named none of her own).
    assert_eq!(
        alerts[0]["subject"], "Niska ocjena 2/5 \u{2013} Ana [#1]",
        "{}",
        alerts[0]
    );
    let text = alerts[0]["text"].as_str().unwrap();
    assert!(text.contains("Komentar: Predugo sam čekala"), "{text}");

    // The score can be given once.
    let again = app.send(form(&path, "score=5")).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(again.content_type().starts_with("text/html"));
    assert!(again.text.contains("Ovaj ste upit već ocijenili."));
    assert!(again.text.contains("Vaša ocjena: 2 od 5"));
    let page = app.call(Method::GET, &path, None, None).await;
    assert_eq!(
        page.text.matches(r#"name="score""#).count(),
        0,
        "no second score offered"
    );

    // A comment after the alert went out: an internal note on the ticket, and the agent is told.
    let r = app.send(form(&path, "comment=I+nitko+se+nije+javio")).await;
    assert_eq!(r.status, StatusCode::OK);
    let comment: Option<String> = sqlx::query_scalar("SELECT comment FROM ratings")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(comment.as_deref(), Some("I nitko se nije javio"));
    app.drain().await;
    let alerts = to_agent(&app);
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(
        alerts[1]["subject"],
        "Komentar uz ocjenu 2/5 \u{2013} Ana [#1]"
    );
    assert!(
        alerts[1]["text"]
            .as_str()
            .unwrap()
            .contains("Komentar: I nitko se nije javio")
    );
    let ticket = app
        .get(&format!("/v1/tickets/{}", s.ticket), &s.t.key)
        .await;
    let note = ticket.body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(note["author"], "system", "{note}");
    assert_eq!(note["internal"], true, "{note}");
    assert_eq!(
        note["body"],
        "Klijent je naknadno dodao komentar uz ocjenu 2/5:\n\nI nitko se nije javio"
    );

    let card = app.get("/v1/contacts/lookup?phone=0", &s.t.key).await;
    assert_eq!(card.status, StatusCode::UNPROCESSABLE_ENTITY);
    let contact = app.get("/v1/contacts?external_id=ana", &s.t.key).await.body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.put(
        "/v1/contacts/ana",
        &s.t.key,
        json!({"phone": "091 234 5678"}),
    )
    .await;
    let card = app
        .get("/v1/contacts/lookup?phone=0912345678", &s.t.key)
        .await;
    assert_eq!(card.body["contact"]["id"], contact.as_str());
    assert_eq!(card.body["last_csat"], 2);
}

#[tokio::test]
async fn bad_scores_tampered_expired_and_foreign_tokens_get_clear_pages() {
    let app = TestApp::new().await;
    let s = setup(&app).await;
    solve(&app, &s).await;
    app.drain().await;
    let path = survey_path(&app);
    let r = app.send(form(&path, "score=9")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.content_type().starts_with("text/html"));
    let r = app.send(form(&path, "")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    let mut tampered = path.clone();
    tampered.pop();
    tampered.push(if path.ends_with('A') { 'B' } else { 'A' });
    let r = app.call(Method::GET, &tampered, None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.content_type().starts_with("text/html"));

    // A genuine token of another tenant never reaches this tenant's ticket.
    let other = app.tenant("beta").await;
    let signer = app.app.state.links.get(&app.pool).await.unwrap();
    let foreign = rapport::messages::links::survey_url(
        signer,
        "",
        rapport::domain::TenantId(other.id.parse().unwrap()),
        s.ticket.parse().unwrap(),
    );
    let r = app.send(form(&foreign, "score=1")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // An expired token.
    let expired = signer.token(rapport::signing::Claims {
        expires: 1,
        ..rapport::signing::Claims::new(
            rapport::signing::Purpose::Survey,
            s.t.id.parse().unwrap(),
            s.ticket.parse().unwrap(),
            0,
        )
    });
    let r = app
        .call(Method::GET, &format!("/s/{expired}"), None, None)
        .await;
    assert_eq!(r.status, StatusCode::GONE);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ratings")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn ratings_from_outside_tools() {
    let app = TestApp::new().await;
    let s = setup(&app).await;
    let r = app.post("/v1/csat", &s.t.key, json!({"ticket_id": s.ticket, "contact": {"external_id": "ana"}, "score": 5, "source": "typeform"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["agent_id"], s.agent.as_str(), "the ticket's agent");
    app.drain().await;
    assert!(
        app.outbox_log()
            .iter()
            .all(|m| m["to"] != "marija@acme.example"),
        "no alert for a 5"
    );
    let r = app.post("/v1/csat", &s.t.key, json!({"contact": {"external_id": "ana"}, "agent_id": s.agent, "score": 1, "source": "phone", "comment": "rude"})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    app.drain().await;
    assert!(
        app.outbox_log()
            .iter()
            .any(|m| m["to"] == "marija@acme.example")
    );

    for (body, field) in [
        (
            json!({"contact": {"external_id": "ana"}, "score": 6, "source": "x"}),
            "score",
        ),
        (
            json!({"contact": {"external_id": "ana"}, "score": 3, "source": "survey"}),
            "source",
        ),
        (
            json!({"contact": {"external_id": "ghost"}, "score": 3, "source": "x"}),
            "contact",
        ),
        (
            json!({"contact": {"external_id": "ana"}, "score": 3, "source": "x", "ticket_id": uuid::Uuid::now_v7()}),
            "ticket_id",
        ),
    ] {
        let r = app.post("/v1/csat", &s.t.key, body).await;
        r.assert_problem(422);
        assert_eq!(r.error_fields(), [field]);
    }
    // Another tenant cannot rate this tenant's ticket or agent.
    let other = app.tenant("beta").await;
    app.contact(&other, "ana", json!({})).await;
    let r = app.post("/v1/csat", &other.key, json!({"ticket_id": s.ticket, "contact": {"external_id": "ana"}, "score": 1, "source": "x"})).await;
    r.assert_problem(422);
    let r = app.post("/v1/csat", &other.key, json!({"agent_id": s.agent, "contact": {"external_id": "ana"}, "score": 1, "source": "x"})).await;
    r.assert_problem(422);
}

/// A new tenant that wrote no templates: the customer is acknowledged, told the ticket is
/// solved and asked to rate it, in the customer's language; the agent's alert carries the
/// comment, in the agent's language.
#[tokio::test]
async fn a_fresh_tenant_speaks_to_customers_and_agents_in_their_languages() {
    let app = TestApp::new().await;
    let t = app.tenant("fresh").await;
    let agent = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "Mojca", "email": "mojca@fresh.example", "languages": ["sl", "pl"]}),
        )
        .await;
    assert_eq!(agent.status, StatusCode::CREATED, "{}", agent.text);
    app.contact(
        &t,
        "jan",
        json!({"first_name": "Jan", "email": "jan@example.pl", "locale": "pl-PL"}),
    )
    .await;
    let tk = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": "jan"}, "channel": "email",
                   "subject": "Rata kredytu", "body": "Kiedy?"}),
        )
        .await;
    assert_eq!(tk.status, StatusCode::CREATED, "{}", tk.text);
    app.drain().await;
    let to_jan = |app: &TestApp| -> Vec<Value> {
        app.outbox_log()
            .into_iter()
            .filter(|m| m["to"] == "jan@example.pl")
            .collect()
    };
    let sent = to_jan(&app);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["subject"], "Otrzymaliśmy Państwa zgłoszenie [#1]");
    let text = sent[0]["text"].as_str().unwrap();
    assert!(text.starts_with("Dzień dobry,"), "{text}");
    assert!(text.contains("\u{201e}Rata kredytu\u{201d}"), "{text}");
    let html = sent[0]["html"].as_str().unwrap();
    assert!(html.contains("<html lang=\"pl\">"), "{html}");

    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/tickets/{}", tk.body["id"].as_str().unwrap()),
            Some(&t.key),
            Some(json!({"status": "solved"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.drain().await;
    let sent = to_jan(&app);
    let subjects: Vec<&str> = sent.iter().filter_map(|m| m["subject"].as_str()).collect();
    assert_eq!(
        subjects,
        [
            "Otrzymaliśmy Państwa zgłoszenie [#1]",
            "Państwa zgłoszenie zostało rozwiązane [#1]",
            "Jak oceniają Państwo naszą pomoc? [#1]"
        ]
    );
    let survey = sent[2]["text"].as_str().unwrap();
    let url = survey
        .lines()
        .find(|l| l.starts_with("http://"))
        .expect("the survey link on a line of its own");
    let path = url.strip_prefix("http://localhost:8080").unwrap();
    let r = app
        .send(form(path, "score=1&comment=Za+d%C5%82ugo+czeka%C5%82em"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.drain().await;
    let alert = app
        .outbox_log()
        .into_iter()
        .find(|m| m["to"] == "mojca@fresh.example")
        .expect("the agent is alerted");
    assert_eq!(
        alert["subject"], "Nizka ocena 1/5 \u{2013} Jan [#1]",
        "{alert}"
    );
    let text = alert["text"].as_str().unwrap();
    assert!(text.contains("Komentar: Za długo czekałem"), "{text}");
    assert!(
        text.contains("Prosimo, stopite v stik s stranko."),
        "{text}"
    );
}

/// A low score with no comment: the alert goes out when the tenant's wait is over, saying
/// there is no comment.
#[tokio::test]
async fn a_low_score_alone_alerts_the_agent_once_the_wait_is_over() {
    let app = TestApp::new().await;
    let s = setup(&app).await;
    let r = app
        .put(
            "/v1/settings",
            &s.t.key,
            json!({"csat_alert_delay_secs": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .put(
            "/v1/settings",
            &s.t.key,
            json!({"csat_alert_delay_secs": 3601}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["csat_alert_delay_secs"]);
    solve(&app, &s).await;
    app.drain().await;
    let path = survey_path(&app);
    let r = app.send(form(&path, "score=1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.drain().await;
    let alerts = |app: &TestApp| -> Vec<Value> {
        app.outbox_log()
            .into_iter()
            .filter(|m| m["to"] == "marija@acme.example")
            .collect()
    };
    assert!(alerts(&app).is_empty(), "not before the wait is over");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    app.drain().await;
    let sent = alerts(&app);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0]["text"]
            .as_str()
            .unwrap()
            .contains("Komentar: (bez komentara)")
    );
}
