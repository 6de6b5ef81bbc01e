//! Chaos against a real server process: SIGKILL while it dispatches, and PostgreSQL ending its
//! sessions while it ingests. Each check prints what it counted (lost, duplicates) and fails
//! if anything accepted was lost.

use crate::common;

use std::collections::HashMap;

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TEST_SECRET_KEY, TestDb};
use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ADMIN: &str = "chaos-admin";

/// A `rapport serve` process on `db`, and the address it listens on.
struct Server {
    child: Child,
    addr: String,
}

fn start(db: &TestDb, extra: &[(&str, &str)]) -> Server {
    start_as("serve", db, extra)
}

/// A `rapport <command>` process (`serve`, `api` or `worker`) on `db`, once it is ready (a
/// worker alone has no address).
fn start_as(command: &str, db: &TestDb, extra: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rapport"));
    cmd.arg(command)
        .env("DATABASE_URL", &db.url)
        .env(
            "RAPPORT_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        )
        .env("RAPPORT_LISTEN", "127.0.0.1:0")
        .env("RAPPORT_LOG_FORMAT", "json")
        .env("RAPPORT_LOG_LEVEL", "info,sqlx=error")
        .env("RAPPORT_ADMIN_TOKEN", ADMIN)
        .env("RAPPORT_SECRET_KEY", TEST_SECRET_KEY)
        .env("RAPPORT_EGRESS_ALLOW_HOSTS", "127.0.0.1")
        .env("RAPPORT_TENANT_RATE_LIMIT", "0")
        .env("RAPPORT_EMBEDDED_POSTGRES", "never")
        .env(
            "RAPPORT_OUTBOX_LOG",
            std::env::temp_dir().join(format!("{}-chaos.jsonl", db.name)),
        );
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let ready = if command == "worker" {
        "worker started"
    } else {
        "listening"
    };
    let listening = common::spawn_until(&mut cmd, ready, Duration::from_secs(60));
    // Keep draining its log so it never blocks on a full pipe.
    let rest = listening.rest;
    std::thread::spawn(move || while rest.recv().is_ok() {});
    Server {
        child: listening.child,
        addr: listening.addr,
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn kill9(mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tenant_key(http: &reqwest::Client, server: &Server) -> (String, String) {
    let t: Value = http
        .post(server.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(
            &json!({"name": "Chaos", "slug": "chaos", "default_country": "HR",
                      "default_locale": "hr", "timezone": "Europe/Zagreb"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = t["id"].as_str().unwrap().to_owned();
    let k: Value = http
        .post(server.url(&format!("/admin/v1/tenants/{id}/api-keys")))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "chaos"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (id, k["key"].as_str().unwrap().to_owned())
}

/// Three SIGKILLs while 600 SMS go out through a Twilio stub: every message is sent in the
/// end (none lost), and the duplicates the provider saw are counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_dispatch_loses_nothing() {
    const N: usize = 600;
    let db = TestDb::create().await;
    let stub = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex("^/2010-04-01/Accounts/AC1/Messages.json$"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": "SM1", "status": "queued"}))
                .set_delay(Duration::from_millis(200)),
        )
        .mount(&stub)
        .await;
    // A short lease, so that a dead worker's messages are taken over within the test.
    let env = [
        ("RAPPORT_OUTBOX_LEASE_SECS", "2"),
        ("RAPPORT_OUTBOX_CONCURRENCY", "10"),
        ("RAPPORT_OUTBOX_DISPATCHERS", "1"),
    ];
    let http = reqwest::Client::new();
    let mut server = start(&db, &env);
    let (_, key) = tenant_key(&http, &server).await;
    let put = |path: &str, body: Value| {
        http.put(server.url(path))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    assert!(
        put(
            "/v1/channels/sms",
            json!({"provider": "twilio",
            "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": stub.uri()},
            "secrets": {"auth_token": "tok"}})
        )
        .await
        .unwrap()
        .status()
        .is_success()
    );
    assert!(
        put(
            "/v1/templates/note",
            json!({"sms": {"hr": {"text": "Obavijest {{ vars.n }}"}}})
        )
        .await
        .unwrap()
        .status()
        .is_success()
    );
    assert!(
        put("/v1/contacts/ana", json!({"phone": "+385911234567"}))
            .await
            .unwrap()
            .status()
            .is_success()
    );
    // Queue every message first (the worker starts sending at once).
    let mut ids = Vec::with_capacity(N);
    for n in 0..N {
        let r: Value = http
            .post(server.url("/v1/messages"))
            .bearer_auth(&key)
            .json(
                &json!({"contact": {"external_id": "ana"}, "template": "note", "channel": "sms",
                          "variables": {"n": n}}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    // Kill it three times while it sends, starting it again each time.
    let mut kills = 0;
    while kills < 3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let seen = stub.received_requests().await.unwrap_or_default().len();
        if seen >= N {
            break;
        }
        server.kill9();
        kills += 1;
        server = start(&db, &env);
    }
    // Everything sent in the end.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let sent = loop {
        let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE status = 'sent'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if sent as usize >= N || Instant::now() > deadline {
            break sent as usize;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let requests = stub.received_requests().await.unwrap_or_default();
    let mut per_message: HashMap<String, usize> = HashMap::new();
    for r in &requests {
        let token = r
            .headers
            .get("i-twilio-idempotency-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        *per_message.entry(token).or_default() += 1;
    }
    let lost = ids
        .iter()
        .filter(|id| !per_message.contains_key(*id))
        .count();
    let duplicates = requests.len() - per_message.len();
    println!(
        "chaos dispatch: {N} messages, {kills} SIGKILLs, {} provider requests, {lost} lost, \
         {duplicates} duplicate requests (each with the message's idempotency token), {sent} sent",
        requests.len()
    );
    assert_eq!(lost, 0, "accepted messages never reached the provider");
    assert_eq!(sent, N, "every message ends sent");
    drop(server);
    pool.close().await;
}

/// PostgreSQL ends the server's sessions again and again while clients send 1,500 events (each
/// with an idempotency key, retried on 503 as the API asks): none is lost, none is recorded
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminations_during_ingest_lose_nothing() {
    const N: usize = 1_500;
    let db = TestDb::create().await;
    let http = reqwest::Client::new();
    let server = start(&db, &[]);
    let (_, key) = tenant_key(&http, &server).await;
    let admin = sqlx::PgPool::connect_with(common::maintenance())
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let terminated = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (admin, stop, terminated, name) = (
            admin.clone(),
            stop.clone(),
            terminated.clone(),
            db.name.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()) t",
                )
                .bind(&name)
                .fetch_one(&admin)
                .await
                .unwrap_or(0);
                terminated.fetch_add(n as usize, Ordering::Relaxed);
            }
        })
    };
    let retries = Arc::new(AtomicUsize::new(0));
    let url = server.url("/v1/events");
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let (http, key, url, retries) = (http.clone(), key.clone(), url.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            for n in (worker..N).step_by(16) {
                let body = json!({"type": "purchase.completed",
                                  "contact": {"external_id": format!("c{}", n % 50)},
                                  "idempotency_key": format!("order-{n}")});
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let status = http
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    match status {
                        202 => break,
                        503 | 0 if Instant::now() < deadline => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("event {n}: status {other}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    killer.await.unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT idempotency_key) FROM events
         WHERE type = 'purchase.completed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let counted: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(count), 0)::bigint FROM contact_event_counts
         WHERE event_type = 'purchase.completed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "chaos ingest: {N} events, {} sessions ended by PostgreSQL, {} retries after 503 or a \
         lost connection, {rows} recorded ({distinct} distinct), counters {counted}",
        terminated.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed)
    );
    assert_eq!(distinct as usize, N, "lost events");
    assert_eq!(rows, distinct, "events recorded twice");
    assert_eq!(counted, rows, "per-contact counters agree with the events");
    drop(server);
    pool.close().await;
    admin.close().await;
}

/// Creates `n` contacts `m0`..`m{n-1}` through the batch API, each with a phone and SMS
/// marketing consent; every even one is on the `gold` plan.
async fn many_contacts(http: &reqwest::Client, server: &Server, key: &str, n: usize) {
    for start in (0..n).step_by(1000) {
        let items: Vec<Value> = (start..(start + 1000).min(n))
            .map(|i| {
                json!({"external_id": format!("m{i}"),
                       "phone": format!("+38591{:07}", i),
                       "attributes": {"plan": if i % 2 == 0 { "gold" } else { "basic" }},
                       "consents": {"sms": {"marketing": "opted_in"}}})
            })
            .collect();
        let r = http
            .post(server.url("/v1/contacts/batch"))
            .bearer_auth(key)
            .json(&json!({"contacts": items}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }
}

/// Sends the tenant's SMS through Twilio's API at `base_url` (a stub).
async fn put_twilio(http: &reqwest::Client, server: &Server, key: &str, base_url: &str) {
    put_ok(
        http,
        server,
        key,
        "/v1/channels/sms",
        json!({"provider": "twilio",
        "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": base_url},
        "secrets": {"auth_token": "tok"}}),
    )
    .await;
}

/// Creates a broadcast and schedules it at once; its id.
async fn broadcast_now(http: &reqwest::Client, server: &Server, key: &str, body: Value) -> String {
    let made = post_ok(http, server, key, "/v1/broadcasts", body).await;
    let id = made["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/broadcasts/{id}/schedule");
    post_ok(http, server, key, &path, json!({})).await;
    id
}

/// POSTs `body` to `path` and returns the JSON answer, asserting success.
async fn post_ok(
    http: &reqwest::Client,
    server: &Server,
    key: &str,
    path: &str,
    body: Value,
) -> Value {
    let r = http
        .post(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or_default();
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

async fn put_ok(http: &reqwest::Client, server: &Server, key: &str, path: &str, body: Value) {
    let r = http
        .put(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert!(status.is_success(), "{path}: {status} {:?}", r.text().await);
}

/// SIGKILLs while a broadcast to 2,000 of 4,000 contacts is being decided and sent: in the
/// end every member has exactly one message, and every message reached the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_broadcast_sends_each_member_exactly_once() {
    const CONTACTS: usize = 4_000;
    const MEMBERS: i64 = 2_000;
    let db = TestDb::create().await;
    let stub = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex("^/2010-04-01/Accounts/AC1/Messages.json$"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": "SM1", "status": "queued"}))
                .set_delay(Duration::from_millis(20)),
        )
        .mount(&stub)
        .await;
    let env = [
        ("RAPPORT_OUTBOX_LEASE_SECS", "2"),
        ("RAPPORT_OUTBOX_CONCURRENCY", "20"),
    ];
    let http = reqwest::Client::new();
    let mut server = start(&db, &env);
    let (_, key) = tenant_key(&http, &server).await;
    put_twilio(&http, &server, &key, &stub.uri()).await;
    put_ok(
        &http,
        &server,
        &key,
        "/v1/templates/offer",
        json!({"purpose": "marketing", "sms": {"hr": {"text": "Ponuda"}}}),
    )
    .await;
    many_contacts(&http, &server, &key, CONTACTS).await;
    let segment = post_ok(
        &http,
        &server,
        &key,
        "/v1/segments",
        json!({"name": "Gold", "condition": "contact.attributes.plan == 'gold'"}),
    )
    .await;
    let id = broadcast_now(
        &http,
        &server,
        &key,
        json!({"name": "Offer", "segment": segment["id"], "template": "offer",
               "channels": ["sms"]}),
    )
    .await;
    let mut kills = 0;
    while kills < 3 {
        tokio::time::sleep(Duration::from_millis(150 + 200 * kills)).await;
        server.kill9();
        kills += 1;
        server = start(&db, &env);
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let (messages, contacts, sent) = loop {
        let row: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT contact_id), count(*) FILTER (WHERE status = 'sent')
             FROM messages WHERE broadcast_id = $1::uuid",
        )
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
        if row.2 >= MEMBERS || Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Each message went to a member (pages are evaluated split over the cores: the answers
    // must come back in the contacts' order).
    let strangers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages m
         JOIN contacts c ON c.tenant_id = m.tenant_id AND c.id = m.contact_id
         WHERE m.broadcast_id = $1::uuid AND c.attributes ->> 'plan' IS DISTINCT FROM 'gold'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(strangers, 0, "messages to contacts outside the segment");
    let requests = stub.received_requests().await.unwrap_or_default();
    let tokens: std::collections::HashSet<String> = requests
        .iter()
        .filter_map(|r| r.headers.get("i-twilio-idempotency-token"))
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let progress: Value = http
        .get(server.url(&format!("/v1/broadcasts/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!(
        "chaos broadcast: {CONTACTS} contacts, {MEMBERS} members, {kills} SIGKILLs: \
         {messages} messages for {contacts} contacts, {sent} sent, {} provider requests for \
         {} messages ({} resent with the same idempotency token); progress {}",
        requests.len(),
        tokens.len(),
        requests.len() - tokens.len(),
        progress["stats"]
    );
    assert_eq!(messages, MEMBERS, "one message per member");
    assert_eq!(contacts, MEMBERS, "no member got two");
    assert_eq!(sent, MEMBERS, "every message sent");
    assert_eq!(
        tokens.len() as i64,
        MEMBERS,
        "every message reached the provider"
    );
    assert_eq!(progress["stats"]["targeted"], MEMBERS);
    assert_eq!(progress["status"], "completed");
    drop(server);
    pool.close().await;
}

/// Records when each request came.
struct Clocked(Arc<std::sync::Mutex<Vec<Instant>>>);

impl wiremock::Respond for Clocked {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        if let Ok(mut times) = self.0.lock() {
            times.push(Instant::now());
        }
        ResponseTemplate::new(201).set_body_json(json!({"sid": "SM1", "status": "queued"}))
    }
}

/// Two server processes send one broadcast over a channel with `max_per_second: 20`: the
/// provider never sees more than 20 requests (+10%) in any second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_per_second_holds_across_two_worker_processes() {
    const N: usize = 120;
    const RATE: usize = 20;
    let db = TestDb::create().await;
    let stub = MockServer::start().await;
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path_regex("^/2010-04-01/Accounts/AC1/Messages.json$"))
        .respond_with(Clocked(times.clone()))
        .mount(&stub)
        .await;
    let env = [("RAPPORT_OUTBOX_CONCURRENCY", "20")];
    let http = reqwest::Client::new();
    let a = start(&db, &env);
    let b = start(&db, &env);
    let (_, key) = tenant_key(&http, &a).await;
    put_ok(
        &http,
        &a,
        &key,
        "/v1/channels/sms",
        json!({"provider": "twilio",
        "settings": {"account_sid": "AC1", "from": "+15005550006", "base_url": stub.uri(),
                     "max_per_second": RATE},
        "secrets": {"auth_token": "tok"}}),
    )
    .await;
    put_ok(
        &http,
        &a,
        &key,
        "/v1/templates/note",
        json!({"sms": {"hr": {"text": "Obavijest"}}}),
    )
    .await;
    many_contacts(&http, &a, &key, N).await;
    broadcast_now(
        &http,
        &b,
        &key,
        json!({"name": "Notice", "audience": "true", "template": "note",
               "channels": ["sms"]}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while times.lock().map(|t| t.len()).unwrap_or(0) < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = times.lock().map(|t| t.clone()).unwrap_or_default();
    seen.sort();
    // The most requests in any one-second window.
    let busiest = (0..seen.len())
        .map(|i| {
            seen[i..]
                .iter()
                .take_while(|t| **t - seen[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let spread = seen
        .last()
        .zip(seen.first())
        .map(|(l, f)| *l - *f)
        .unwrap_or_default();
    println!(
        "pacing across two processes: {} requests over {:.2} s at max_per_second {RATE}; \
         busiest second {busiest}",
        seen.len(),
        spread.as_secs_f64()
    );
    assert_eq!(seen.len(), N, "every message sent");
    assert!(
        busiest <= RATE + RATE / 10,
        "a second saw {busiest} requests"
    );
    drop((a, b));
}

/// An API process and a worker process apart, the worker's engine set to look for work once a
/// minute when idle: events the API takes reach it at once (the API process announces them by
/// NOTIFY), and a journey's five-second wait ends on time (an idle engine sleeps until the
/// next journey is due, not a poll interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_apart_hears_of_the_apis_events_and_wakes_for_due_journeys() {
    const MESSAGES: &str = "SELECT count(*) FROM messages";
    let db = TestDb::create().await;
    let env = [("RAPPORT_CAMPAIGN_POLL_INTERVAL_MS", "60000")];
    let http = reqwest::Client::new();
    let api = start_as("api", &db, &env);
    let worker = start_as("worker", &db, &env);
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (_, key) = tenant_key(&http, &api).await;
    put_ok(
        &http,
        &api,
        &key,
        "/v1/templates/hello",
        json!({"purpose": "transactional", "sms": {"hr": {"text": "Bok!"}}}),
    )
    .await;
    for (name, trigger, steps) in [
        (
            "Hello",
            "hello.said",
            json!([{"type": "send", "template": "hello"}]),
        ),
        (
            "Later",
            "cart.abandoned",
            json!([{"type": "wait", "duration": "5s"}, {"type": "send", "template": "hello"}]),
        ),
    ] {
        let made = post_ok(
            &http,
            &api,
            &key,
            "/v1/campaigns",
            json!({"name": name, "trigger": {"event": trigger}, "steps": steps}),
        )
        .await;
        let activate = format!("/v1/campaigns/{}/activate", made["id"].as_str().unwrap());
        post_ok(&http, &api, &key, &activate, json!({})).await;
    }
    put_ok(
        &http,
        &api,
        &key,
        "/v1/contacts/ana",
        json!({"phone": "091 111 1111"}),
    )
    .await;
    let event = |kind: &str| {
        http.post(api.url("/v1/events"))
            .bearer_auth(&key)
            .json(&json!({"type": kind, "contact": {"external_id": "ana"}}))
            .send()
    };
    // The worker listens, and its engine is past the warm period `contact.created` began.
    let listening = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%rapport_inbox%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
        == 0
    {
        assert!(Instant::now() < listening, "the worker does not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = Instant::now();
    assert_eq!(event("hello.said").await.unwrap().status(), 202);
    let woken = common::count_reaches(&pool, MESSAGES, 1, sent, Duration::from_secs(10)).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = Instant::now();
    assert_eq!(event("cart.abandoned").await.unwrap().status(), 202);
    let waited = common::count_reaches(&pool, MESSAGES, 2, sent, Duration::from_secs(20)).await;
    println!(
        "worker apart, polling once a minute: event to message {woken:?}; \
         a five-second wait to message {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(5),
        "the wait ended early: {waited:?}"
    );
    drop((api, worker));
    pool.close().await;
}

/// A server whose pool has two connections (`db_max_connections = 2`) still becomes ready,
/// takes events from concurrent clients and sends a broadcast: the worker's `LISTEN`
/// connections (four dispatch loops, jobs, imports, broadcasts) and the API keys' one are
/// apart from the pool, so they cannot take all of it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_connections_serves_and_sends() {
    const N: usize = 40;
    let db = TestDb::create().await;
    let stub = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex("^/2010-04-01/Accounts/AC1/Messages.json$"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM1", "status": "queued"})),
        )
        .mount(&stub)
        .await;
    let env = [
        ("RAPPORT_DB_MAX_CONNECTIONS", "2"),
        ("RAPPORT_OUTBOX_DISPATCHERS", "4"),
        ("RAPPORT_DB_CONNECT_TIMEOUT_SECS", "5"),
    ];
    let http = reqwest::Client::new();
    let server = start(&db, &env);
    let ready = http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    let (_, key) = tenant_key(&http, &server).await;
    put_twilio(&http, &server, &key, &stub.uri()).await;
    put_ok(
        &http,
        &server,
        &key,
        "/v1/templates/note",
        json!({"sms": {"hr": {"text": "Obavijest"}}}),
    )
    .await;
    many_contacts(&http, &server, &key, N).await;
    // Sixteen clients at once, each more than the pool has connections.
    let posts = (0..16).map(|c| {
        let (http, key, url) = (http.clone(), key.clone(), server.url("/v1/events"));
        async move {
            for i in 0..10 {
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"type": "page.viewed",
                                  "contact": {"external_id": format!("m{}", (c * 10 + i) % N)}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202, "{:?}", r.text().await);
            }
        }
    });
    futures::future::join_all(posts).await;
    broadcast_now(
        &http,
        &server,
        &key,
        json!({"name": "Notice", "audience": "true", "template": "note", "channels": ["sms"]}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = stub.received_requests().await.unwrap_or_default().len();
        if seen >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, N, "every member sent to");
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'page.viewed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 160);
    // Besides its pool, the process listens on two connections: API keys, and one for all of
    // the worker's loops (four dispatch loops, jobs, imports, broadcasts).
    let listening: Vec<String> = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%' ORDER BY query",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(listening.len(), 2, "{listening:?}");
    drop(server);
    pool.close().await;
}

/// A caller dropped while its `BEGIN` is on the wire (a client gone, a timeout, an aborted
/// task) leaves no transaction open on the pooled connection: the next borrower's write is
/// committed and seen by everyone (sqlx's own `Pool::begin` leaves the session inside the
/// transaction, and the write with it; `rapport::db::begin` finishes it and rolls it back).
#[tokio::test]
async fn a_cancelled_begin_leaves_no_transaction_on_the_pooled_connection() {
    use sqlx::Connection;
    let db = TestDb::create().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let mut other = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE begin_probe (n bigint)")
        .execute(&pool)
        .await
        .unwrap();
    let mut cut = 0;
    for i in 0..200i64 {
        // Dropped after a few polls, each after the runtime had a turn: before, during or
        // after the BEGIN's round trip.
        let finished = {
            let mut begun = std::pin::pin!(rapport::db::begin(&pool));
            let mut finished = false;
            for _ in 0..=(i % 12) {
                if futures::poll!(begun.as_mut()).is_ready() {
                    finished = true;
                    break;
                }
                tokio::task::yield_now().await;
            }
            finished
        };
        if !finished {
            cut += 1;
        }
        sqlx::query("INSERT INTO begin_probe VALUES ($1)")
            .bind(i)
            .execute(&pool)
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM begin_probe WHERE n = $1")
            .bind(i)
            .fetch_one(&mut other)
            .await
            .unwrap();
        assert_eq!(
            seen, 1,
            "attempt {i}: the write ran inside a leftover transaction"
        );
    }
    assert!(cut > 0, "no BEGIN was cut short");
}
