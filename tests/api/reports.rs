//! Reports computed in SQL, on data with known times and scores.

use crate::common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::{Value, json};

fn row<'a>(report: &'a Value, group: &str) -> &'a Value {
    report["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"] == group)
        .unwrap_or_else(|| panic!("no {group} in {report}"))
}

#[tokio::test]
async fn csat_and_support_reports_by_agent_country_channel_and_week() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let a = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "Ana", "email": "ana@acme.example", "countries": ["HR"]}),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = app
        .post(
            "/v1/agents",
            &t.key,
            json!({"name": "Bob", "email": "bob@acme.example", "countries": ["GB"]}),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.contact(&t, "hr1", json!({"country": "HR"})).await;
    app.contact(&t, "gb1", json!({"country": "GB", "locale": "en"}))
        .await;
    let mut ids = Vec::new();
    for (contact, channel) in [("hr1", "email"), ("hr1", "email"), ("gb1", "sms")] {
        let r = app.post("/v1/tickets", &t.key, json!({"contact": {"external_id": contact}, "channel": channel, "subject": "s", "body": "b"})).await;
        ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    // Known times: t1 answered in 10 min and solved in 2 h; t2 in 30 min and 4 h; t3 in 1 min, open.
    for (id, first, solved) in [
        (&ids[0], 600, Some(7200)),
        (&ids[1], 1800, Some(14400)),
        (&ids[2], 60, None),
    ] {
        sqlx::query(
            "UPDATE tickets SET created_at = now() - interval '1 day',
                first_response_at = now() - interval '1 day' + make_interval(secs => $2),
                solved_at = CASE WHEN $3::int IS NULL THEN NULL ELSE now() - interval '1 day' + make_interval(secs => $3) END,
                status = CASE WHEN $3::int IS NULL THEN 'open' ELSE 'solved' END
             WHERE id = $1::uuid",
        )
        .bind(id).bind(first).bind(solved).execute(&app.pool).await.unwrap();
    }
    // Ratings: t1 rated 2 through the survey; Ana gets a 5 by phone; Bob a 4.
    sqlx::query(
        "INSERT INTO ratings (tenant_id, id, contact_id, ticket_id, agent_id, score, source, channel, country)
         SELECT tenant_id, gen_random_uuid(), contact_id, id, assignee_id, 2, 'survey', channel, 'HR' FROM tickets WHERE id = $1::uuid",
    ).bind(&ids[0]).execute(&app.pool).await.unwrap();
    let r = app.post("/v1/csat", &t.key, json!({"contact": {"external_id": "hr1"}, "agent_id": a, "score": 5, "source": "phone"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    app.post("/v1/csat", &t.key, json!({"ticket_id": ids[2], "contact": {"external_id": "gb1"}, "score": 4, "source": "phone"})).await;

    let csat = app.get("/v1/reports/csat?group_by=agent", &t.key).await;
    assert_eq!(csat.status, StatusCode::OK, "{}", csat.text);
    let ana = row(&csat.body, &a);
    assert_eq!(ana["label"], "Ana");
    assert_eq!(ana["count"], 2);
    assert_eq!(ana["average"], 3.5);
    assert_eq!(ana["distribution"], json!([0, 1, 0, 0, 1]));
    assert_eq!(ana["csat_percent"], 50.0);
    assert_eq!(ana["solved_tickets"], 2);
    assert_eq!(ana["response_rate"], 50.0);
    let bob = row(&csat.body, &b);
    assert_eq!(bob["csat_percent"], 100.0);
    assert!(bob["response_rate"].is_null(), "nothing solved");

    let by_country = app.get("/v1/reports/csat?group_by=country", &t.key).await;
    assert_eq!(row(&by_country.body, "HR")["count"], 2);
    assert_eq!(row(&by_country.body, "GB")["count"], 1);

    let support = app.get("/v1/reports/support?group_by=agent", &t.key).await;
    assert_eq!(support.status, StatusCode::OK, "{}", support.text);
    let ana = row(&support.body, &a);
    assert_eq!(ana["created"], 2);
    assert_eq!(ana["solved"], 2);
    assert_eq!(ana["first_response_median_secs"], 1200.0);
    assert_eq!(ana["first_response_p90_secs"], 1680.0);
    assert_eq!(ana["resolution_median_secs"], 10800.0);
    assert_eq!(ana["resolution_p90_secs"], 13680.0);
    assert_eq!(ana["open_backlog"], 0);
    let bob = row(&support.body, &b);
    assert_eq!(bob["created"], 1);
    assert_eq!(bob["solved"], 0);
    assert_eq!(bob["first_response_median_secs"], 60.0);
    assert_eq!(bob["open_backlog"], 1);

    let by_channel = app
        .get("/v1/reports/support?group_by=channel", &t.key)
        .await;
    assert_eq!(row(&by_channel.body, "email")["solved"], 2);
    assert_eq!(row(&by_channel.body, "sms")["open_backlog"], 1);
    let by_week = app.get("/v1/reports/support?group_by=week", &t.key).await;
    let created: i64 = by_week.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["created"].as_i64().unwrap())
        .sum();
    assert_eq!(created, 3);

    // A period without the data is empty; bad parameters are 400s.
    let old = app
        .get(
            "/v1/reports/support?group_by=agent&from=2020-01-01&to=2020-02-01",
            &t.key,
        )
        .await;
    assert!(
        old.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["created"] == 0 && r["solved"] == 0)
    );
    app.get("/v1/reports/csat?group_by=planet", &t.key)
        .await
        .assert_problem(400);
    app.get("/v1/reports/csat", &t.key)
        .await
        .assert_problem(400);
    app.get(
        "/v1/reports/csat?group_by=agent&from=2026-02-01&to=2026-01-01",
        &t.key,
    )
    .await
    .assert_problem(400);
    app.get("/v1/reports/csat?group_by=agent&from=yesterday", &t.key)
        .await
        .assert_problem(400);

    // Another tenant's report sees none of it.
    let other = app.tenant("beta").await;
    assert_eq!(
        app.get("/v1/reports/csat?group_by=agent", &other.key)
            .await
            .body["data"],
        json!([])
    );
    assert_eq!(
        app.get("/v1/reports/support?group_by=agent", &other.key)
            .await
            .body["data"],
        json!([])
    );
}
