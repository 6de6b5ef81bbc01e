//! Contact imports: `POST /v1/contacts/imports` (CSV and NDJSON, streamed), progress with
//! errors by line, modes and dry runs, character sets, an export imported back, refusals that
//! leave nothing, idempotency, cancellation, and a worker that dies mid-import.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestApp, TestTenant};

async fn import(
    app: &TestApp,
    t: &TestTenant,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> Value {
    let r = app
        .upload(
            &format!("/v1/contacts/imports{query}"),
            &t.key,
            content_type,
            body.to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        r.headers["location"].to_str().unwrap(),
        format!("/v1/contacts/imports/{id}")
    );
    assert_eq!(r.body["status"], "queued");
    app.run_imports().await;
    let done = app.get(&format!("/v1/contacts/imports/{id}"), &t.key).await;
    assert_eq!(done.status, StatusCode::OK);
    done.body
}

async fn by_external_id(app: &TestApp, t: &TestTenant, external_id: &str) -> Value {
    let r = app
        .get(&format!("/v1/contacts?external_id={external_id}"), &t.key)
        .await;
    r.body["data"][0].clone()
}

async fn contact_count(app: &TestApp, t: &TestTenant) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM contacts WHERE tenant_id = $1::uuid")
        .bind(&t.id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_csv_from_excel_creates_updates_and_lists_errors_by_line() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.contact(
        &t,
        "c2",
        json!({"first_name": "Ivo", "email": "ivo@example.com"}),
    )
    .await;
    app.contact(&t, "c3", json!({"first_name": "Mia"})).await;
    // Semicolons and a BOM, as Excel writes them in Croatia; a quoted field over two lines;
    // a blank line; three bad rows.
    let csv = "\u{feff}Kupac;E-mail;phone;first_name;Kreditni limit;Napomena;consents.sms.marketing;attributes.address\r\n\
        c1;ana@example.com;091 234 5678;Ana;5000;VIP;da;\"Ilica 1\r\nZagreb\"\r\n\
        c2;ivo@example.com;;Ivan;;;;\r\n\
        \r\n\
        c3;;;Mia;;;;\r\n\
        c4;not-an-email;;Iva;;;;\r\n\
        c5;;12;Eva;;;;\r\n\
        c6;;;Ema;;;maybe;\r\n\
        c7;too;few\r\n";
    let mapping = json!({"Kupac": "external_id", "E-mail": "email",
                         "Kreditni limit": "attributes.credit_limit", "Napomena": null});
    let query = format!(
        "?filename=crm.csv&mapping={}",
        urlencode(&mapping.to_string())
    );
    let done = import(&app, &t, &query, "text/csv", csv.as_bytes()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["rows"], 7);
    assert_eq!(done["processed"], 7);
    assert_eq!(done["created"], 1, "{done}");
    assert_eq!(done["updated"], 1);
    assert_eq!(done["unchanged"], 1);
    assert_eq!(done["failed"], 4);
    let errors: Vec<(i64, String)> = done["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_i64().unwrap(),
                e["field"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            (7, "email".to_owned()),
            (8, "phone".to_owned()),
            (9, "consents.sms.marketing".to_owned()),
            (10, "row".to_owned()),
        ],
        "{done}"
    );
    let ana = by_external_id(&app, &t, "c1").await;
    assert_eq!(ana["phone"], "+385912345678");
    assert_eq!(ana["attributes"]["credit_limit"], 5000);
    assert_eq!(ana["attributes"]["address"], "Ilica 1\r\nZagreb");
    assert!(ana["attributes"].get("Napomena").is_none());
    assert_eq!(ana["consents"]["sms"]["marketing"]["status"], "opted_in");
    assert_eq!(
        ana["consents"]["sms"]["marketing"]["source"],
        "import:crm.csv"
    );
    let ivo = by_external_id(&app, &t, "c2").await;
    assert_eq!(ivo["first_name"], "Ivan");
    assert_eq!(
        ivo["email"], "ivo@example.com",
        "an empty cell leaves a field alone"
    );
    let timeline = app
        .get(
            &format!("/v1/contacts/{}/timeline", ana["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    assert_eq!(timeline.body["data"][0]["type"], "contact.created");
    assert_eq!(timeline.body["data"][0]["properties"]["via"], "import");
    // The list shows it, newest first.
    let list = app.get("/v1/contacts/imports", &t.key).await;
    assert_eq!(list.body["data"][0]["id"], done["id"]);
    // Another tenant sees none of it.
    let other = app.tenant("other").await;
    let r = app
        .get(
            &format!("/v1/contacts/imports/{}", done["id"].as_str().unwrap()),
            &other.key,
        )
        .await;
    r.assert_problem(404);
    assert_eq!(
        app.get("/v1/contacts/imports", &other.key).await.body["data"],
        json!([])
    );
}

#[tokio::test]
async fn modes_and_dry_runs_count_without_writing_what_they_must_not() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    app.contact(&t, "old", json!({"first_name": "Stari"})).await;
    let csv = b"external_id,first_name\nold,Novi\nnew,Nova\n";
    let dry = import(&app, &t, "?dry_run=true", "text/csv", csv).await;
    assert_eq!(
        (
            dry["created"].clone(),
            dry["updated"].clone(),
            dry["dry_run"].clone()
        ),
        (json!(1), json!(1), json!(true)),
        "{dry}"
    );
    assert_eq!(contact_count(&app, &t).await, 1, "a dry run writes nothing");
    assert_eq!(by_external_id(&app, &t, "old").await["first_name"], "Stari");

    let create_only = import(&app, &t, "?mode=create_only", "text/csv", csv).await;
    assert_eq!(create_only["created"], 1, "{create_only}");
    assert_eq!(create_only["skipped"], 1);
    assert_eq!(by_external_id(&app, &t, "old").await["first_name"], "Stari");

    let csv = b"external_id,first_name\nold,Novi\nghost,Duh\n";
    let update_only = import(&app, &t, "?mode=update_only", "text/csv", csv).await;
    assert_eq!(update_only["updated"], 1, "{update_only}");
    assert_eq!(update_only["skipped"], 1);
    assert!(by_external_id(&app, &t, "ghost").await.is_null());
    assert_eq!(by_external_id(&app, &t, "old").await["first_name"], "Novi");
}

#[tokio::test]
async fn character_sets_and_an_export_imported_back() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    // windows-1250, named in the Content-Type.
    let (bytes, _, _) =
        encoding_rs::WINDOWS_1250.encode("external_id,first_name,last_name\nš1,Željka,Šimić\n");
    let done = import(&app, &t, "", "text/csv; charset=windows-1250", &bytes).await;
    assert_eq!(done["created"], 1, "{done}");
    assert_eq!(
        by_external_id(&app, &t, "%C5%A11").await["last_name"],
        "Šimić"
    );
    // iso-8859-2, named as a parameter.
    let (bytes, _, _) = encoding_rs::ISO_8859_2.encode("external_id;last_name\nh1;Kőszegi\n");
    let done = import(&app, &t, "?charset=iso-8859-2", "text/csv", &bytes).await;
    assert_eq!(done["created"], 1, "{done}");
    assert_eq!(by_external_id(&app, &t, "h1").await["last_name"], "Kőszegi");

    app.contact(
        &t,
        "p1",
        json!({"first_name": "Ola", "phone": "+48 512 345 678", "country": "PL",
               "attributes": {"plan": "gold", "limit": 1200, "zip": "00123"},
               "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    // The CSV export, imported into another tenant, gives the same contacts.
    let export = app.get("/v1/contacts/export?format=csv", &t.key).await;
    assert_eq!(export.status, StatusCode::OK);
    let copy = app.tenant("copy").await;
    let done = import(
        &app,
        &copy,
        "?filename=export.csv",
        "text/csv",
        &export.bytes,
    )
    .await;
    assert_eq!(done["created"], 3, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let ola = by_external_id(&app, &copy, "p1").await;
    assert_eq!(ola["phone"], "+48512345678");
    assert_eq!(
        ola["attributes"],
        json!({"plan": "gold", "limit": 1200, "zip": "00123"})
    );
    assert_eq!(ola["consents"]["email"]["marketing"]["status"], "opted_in");
    // And the NDJSON export, into a third, as it is.
    let export = app.get("/v1/contacts/export", &t.key).await;
    let third = app.tenant("third").await;
    let done = import(&app, &third, "", "application/x-ndjson", &export.bytes).await;
    assert_eq!(done["created"], 3, "{done}");
    let ola = by_external_id(&app, &third, "p1").await;
    assert_eq!(ola["attributes"]["zip"], "00123");
    // Imported again, nothing changes.
    let again = import(&app, &third, "", "application/x-ndjson", &export.bytes).await;
    assert_eq!(again["unchanged"], 3, "{again}");
}

#[tokio::test]
async fn files_that_cannot_be_read_are_refused_whole() {
    let app = TestApp::with_config(|c| c.import_max_bytes = 4096).await;
    let t = app.tenant("acme").await;
    let post = |query: &'static str, body: Vec<u8>| {
        let (app, key) = (&app, t.key.clone());
        async move {
            app.upload(
                &format!("/v1/contacts/imports{query}"),
                &key,
                "text/csv",
                body,
            )
            .await
        }
    };
    let r = post("", b"external_id,colour\nc1,red\n".to_vec()).await;
    r.assert_problem(422);
    assert!(r.text.contains("colour"), "{}", r.text);
    let r = post("", b"email\na@b.hr\n".to_vec()).await;
    r.assert_problem(422);
    assert!(r.text.contains("external_id"), "{}", r.text);
    let r = post("", b"external_id,last_name\nc1,\xc8ale\n".to_vec()).await;
    r.assert_problem(422);
    assert!(
        r.text.contains("line 2") && r.text.contains("windows-1250"),
        "{}",
        r.text
    );
    let r = post("", b"".to_vec()).await;
    r.assert_problem(422);
    let mut big = b"external_id\n".to_vec();
    for n in 0..1000 {
        big.extend_from_slice(format!("c{n}\n").as_bytes());
    }
    post("", big).await.assert_problem(413);
    post("?mapping=nope", b"external_id\nc1\n".to_vec())
        .await
        .assert_problem(422);
    post("?charset=klingon", b"external_id\nc1\n".to_vec())
        .await
        .assert_problem(422);
    post("?mode=sometimes", b"external_id\nc1\n".to_vec())
        .await
        .assert_problem(400);
    // An upload that breaks off after two chunks.
    let mut rows = b"external_id\n".to_vec();
    for n in 0..2500 {
        rows.extend_from_slice(format!("c{n}\n").as_bytes());
    }
    let parts: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(rows), Err(std::io::Error::other("connection reset"))];
    let app_big = TestApp::new().await;
    let t_big = app_big.tenant("acme").await;
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/contacts/imports")
        .header("authorization", format!("Bearer {}", t_big.key))
        .header("content-type", "text/csv")
        .body(axum::body::Body::from_stream(futures::stream::iter(parts)))
        .unwrap();
    app_big.send(request).await.assert_problem(400);
    // And one whose process died while it came in: swept once its deadline passed.
    sqlx::query(
        "INSERT INTO contact_imports (tenant_id, id, format, mode, dry_run, status, locked_until)
         VALUES ($1::uuid, gen_random_uuid(), 'csv', 'upsert', false, 'receiving', now() - interval '1 second')",
    )
    .bind(&t_big.id)
    .execute(&app_big.pool)
    .await
    .unwrap();
    app_big.run_imports().await;
    assert_eq!(
        import_rows(&app_big).await,
        0,
        "a broken upload leaves nothing"
    );
    assert_eq!(
        import_rows(&app).await,
        0,
        "a refused upload leaves nothing"
    );
}

/// Imports and chunks stored, of every tenant.
async fn import_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM contact_imports) + (SELECT count(*) FROM contact_import_chunks)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_tenant_uploads_two_files_at_a_time() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("other").await;
    // Two uploads whose clients send the header row, then nothing until told.
    let mut senders = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        tx.send(Ok(b"external_id\n".to_vec())).await.unwrap();
        let body = axum::body::Body::from_stream(tokio_stream_of(rx));
        let request = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/contacts/imports")
            .header("authorization", format!("Bearer {}", t.key))
            .header("content-type", "text/csv")
            .body(body)
            .unwrap();
        let router = app.router.clone();
        pending.push(tokio::spawn(async move {
            tower::ServiceExt::oneshot(router, request)
                .await
                .unwrap()
                .status()
        }));
        senders.push(tx);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let third = app
        .upload(
            "/v1/contacts/imports",
            &t.key,
            "text/csv",
            b"external_id\nc1\n".to_vec(),
        )
        .await;
    third.assert_problem(429);
    // Another tenant is not held up.
    let r = app
        .upload(
            "/v1/contacts/imports",
            &other.key,
            "text/csv",
            b"external_id\nc1\n".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    for (n, tx) in senders.into_iter().enumerate() {
        tx.send(Ok(format!("c{n}\n").into_bytes())).await.unwrap();
    }
    for p in pending {
        assert_eq!(p.await.unwrap(), StatusCode::ACCEPTED);
    }
    let r = app
        .upload(
            "/v1/contacts/imports",
            &t.key,
            "text/csv",
            b"external_id\nc1\n".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "the places are given back");
}

fn tokio_stream_of(
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

#[tokio::test]
async fn an_idempotency_key_starts_one_import_and_a_cancel_stops_it() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let send = |key: &'static str| {
        let request = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/contacts/imports")
            .header("authorization", format!("Bearer {}", t.key))
            .header("content-type", "text/csv")
            .header("idempotency-key", key)
            .body(axum::body::Body::from("external_id\nc1\nc2\n"))
            .unwrap();
        app.send(request)
    };
    let first = send("nightly-2026-12-03").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let again = send("nightly-2026-12-03").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.body["id"], first.body["id"]);
    let id = first.body["id"].as_str().unwrap();
    let cancelled = app
        .delete(&format!("/v1/contacts/imports/{id}"), &t.key)
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.text);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(app.run_imports().await, 0);
    assert_eq!(contact_count(&app, &t).await, 0);
}

#[tokio::test]
async fn an_import_resumes_where_a_dead_worker_stopped_and_writes_nothing_twice() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let rows = 12_000;
    let mut csv = String::from("external_id,first_name,attributes.n\n");
    for n in 0..rows {
        csv.push_str(&format!("c{n},Ime{n},{n}\n"));
    }
    let r = app
        .upload("/v1/contacts/imports", &t.key, "text/csv", csv.into_bytes())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id: uuid::Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let progress = || async {
        sqlx::query_scalar::<_, i64>("SELECT rows_done FROM contact_imports WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    // A worker that dies mid-import: its task is dropped between (or in the middle of) chunks.
    let state = app.app.state.clone();
    let dead = uuid::Uuid::now_v7();
    let worker =
        tokio::spawn(async move { rapport::contacts::import::apply::round(&state, dead).await });
    while progress().await < 2000 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    worker.abort();
    let _ = worker.await;
    let at_death = progress().await;
    assert!(at_death < rows, "the worker finished before it was stopped");
    // Its lease runs out (as 60 s after a crash); two workers take over at once.
    sqlx::query(
        "UPDATE contact_imports SET locked_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    let (a, b) = tokio::join!(app.run_imports(), app.run_imports());
    assert!(a + b > 0);
    // The dead worker's transactions are rolled back by the pool in the background; until
    // then a part can look empty to the new workers, which then put the import back in the
    // queue for their next poll (every 2 s in the worker): poll as the worker would.
    for _ in 0..50 {
        let status: String = sqlx::query_scalar("SELECT status FROM contact_imports WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if status == "completed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        app.run_imports().await;
    }
    let done = app
        .get(&format!("/v1/contacts/imports/{id}"), &t.key)
        .await
        .body;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["processed"], rows);
    assert_eq!(done["created"], rows, "{done}");
    assert_eq!(contact_count(&app, &t).await, rows);
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'contact.created'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(created, rows, "each contact created once");
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_import_chunks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(chunks, 0);
}

#[tokio::test]
async fn rows_of_one_contact_apply_in_file_order_across_chunks() {
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let mut csv = String::from("external_id,first_name\n");
    for n in 0..6000 {
        csv.push_str(&format!("c{n},x\n"));
        if n % 500 == 0 {
            csv.push_str(&format!("same,v{n}\n"));
        }
    }
    let done = import(&app, &t, "", "text/csv", csv.as_bytes()).await;
    assert_eq!(done["created"], 6001, "{done}");
    assert_eq!(done["updated"], 11, "{done}");
    assert_eq!(
        by_external_id(&app, &t, "same").await["first_name"],
        "v5500"
    );
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
