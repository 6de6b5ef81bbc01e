//! Test harness: every test gets a fresh, migrated database on the real PostgreSQL, dropped
//! when the test ends (also when it panics), and drives the router in-process.

#![allow(dead_code)]

use std::str::FromStr;
use std::sync::Once;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use rapport::{App, Config};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tower::ServiceExt;

pub const ADMIN: &str = "test-admin-token";
/// 32 bytes of 0x2a, base64: the key that seals provider secrets in tests.
pub const TEST_SECRET_KEY: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// The server under test: `DATABASE_URL`, else the local default.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/rapport".to_owned())
}

/// The server's maintenance database, which always exists (unlike the one `DATABASE_URL` names).
pub fn maintenance() -> PgConnectOptions {
    PgConnectOptions::from_str(&base_url())
        .expect("DATABASE_URL is a PostgreSQL URL")
        .database("postgres")
}

/// A fresh database that is dropped with this value.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        sweep_stale_databases().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!(
            "rapport_test_{now}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let template = migrated_template().await;
        let mut conn = maintenance()
            .connect()
            .await
            .expect("connect to PostgreSQL");
        // A copy of a database migrated once per test run: file copies, not ~15 migrations
        // per test.
        sqlx::raw_sql(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        ))
        .execute(&mut conn)
        .await
        .expect("create test database");
        conn.close().await.ok();
        let mut url = url::Url::parse(&base_url()).unwrap();
        url.set_path(&format!("/{name}"));
        TestDb {
            name,
            url: url.to_string(),
        }
    }

    /// A URL naming a database that does not exist yet (dropped with this value too).
    pub fn unborn() -> TestDb {
        let name = format!(
            "rapport_test_{}_{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut url = url::Url::parse(&base_url()).unwrap();
        url.set_path(&format!("/{name}"));
        TestDb {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{name}.jsonl")));
        // Runs on its own thread and runtime: Drop may run inside (or outside) a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = maintenance().connect().await {
                    let _ =
                        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

/// The name of a database with every migration applied, made once per set of migrations
/// (its name carries their checksum) and kept between runs, as crates.io's test_db does.
async fn migrated_template() -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let mut digest = <sha2::Sha256 as sha2::Digest>::new();
            for m in rapport::db::MIGRATOR.iter() {
                sha2::Digest::update(&mut digest, m.version.to_le_bytes());
                sha2::Digest::update(&mut digest, &*m.checksum);
            }
            let hash = hex::encode(sha2::Digest::finalize(digest));
            let name = format!("rapport_template_{}", &hash[..16]);
            let mut conn = maintenance()
                .connect()
                .await
                .expect("connect to PostgreSQL");
            // One process makes it; the others wait for its advisory lock and find it made.
            sqlx::query("SELECT pg_advisory_lock(727274)")
                .execute(&mut conn)
                .await
                .expect("lock");
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&name)
                    .fetch_one(&mut conn)
                    .await
                    .expect("look for the template");
            if !exists {
                let building = format!("{name}_building");
                for statement in [
                    format!("DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"),
                    format!("CREATE DATABASE \"{building}\""),
                ] {
                    sqlx::raw_sql(&statement)
                        .execute(&mut conn)
                        .await
                        .expect("create the template");
                }
                let mut url = url::Url::parse(&base_url()).unwrap();
                url.set_path(&format!("/{building}"));
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url.as_str())
                    .await
                    .expect("connect to the template");
                rapport::db::migrate(&pool, url.as_str())
                    .await
                    .expect("migrate the template");
                pool.close().await;
                // Renamed only once complete: a killed run never leaves a half-made template.
                sqlx::raw_sql(&format!(
                    "ALTER DATABASE \"{building}\" RENAME TO \"{name}\""
                ))
                .execute(&mut conn)
                .await
                .expect("name the template");
            }
            sqlx::query("SELECT pg_advisory_unlock(727274)")
                .execute(&mut conn)
                .await
                .expect("unlock");
            conn.close().await.ok();
            name
        })
        .await
        .clone()
}

/// Drops test databases left behind by killed runs (older than two hours), once a process.
async fn sweep_stale_databases() {
    static ONCE: Once = Once::new();
    let mut run = false;
    ONCE.call_once(|| run = true);
    if !run {
        return;
    }
    let Ok(mut conn) = maintenance().connect().await else {
        return;
    };
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'rapport\\_test\\_%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for name in names {
        let created = name.split('_').nth(2).and_then(|s| s.parse::<u64>().ok());
        if created.is_some_and(|t| t + 7200 < now) {
            let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    }
}

/// The application on a fresh database.
pub struct TestApp {
    pub app: App,
    pub router: Router,
    pub pool: PgPool,
    pub db: TestDb,
}

/// A response, with its body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts an RFC 9457 problem with this status.
    pub fn assert_problem(&self, status: u16) -> &Self {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "body: {}",
            self.text
        );
        for field in ["type", "title", "status", "detail"] {
            assert!(
                self.body.get(field).is_some(),
                "problem without {field}: {}",
                self.text
            );
        }
        assert_eq!(self.body["status"], status);
        self
    }

    /// The `field` names of a validation problem's errors.
    pub fn error_fields(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["field"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A tenant with a live API key.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub id: String,
    pub key: String,
    pub key_id: String,
}

impl TestApp {
    pub async fn new() -> TestApp {
        Self::with_config(|_| {}).await
    }

    pub async fn with_config(adjust: impl FnOnce(&mut Config)) -> TestApp {
        init_logs();
        let db = TestDb::create().await;
        let outbox_log = std::env::temp_dir().join(format!("{}.jsonl", db.name));
        let mut config = Config {
            database_url: db.url.clone().into(),
            admin_token: Some(ADMIN.into()),
            db_max_connections: 16,
            outbox_log: outbox_log.to_string_lossy().into_owned(),
            secret_key: Some(TEST_SECRET_KEY.into()),
            // Tests run in their harness's process: templates render in the real binary.
            template_program: Some(env!("CARGO_BIN_EXE_rapport").to_owned()),
            // Providers in tests are local servers (wiremock, an SMTP sink).
            egress_allow_hosts: vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ..Config::default()
        };
        adjust(&mut config);
        let mut options = PgPoolOptions::new();
        // An audit: `RAPPORT_TEST_POOL_MAX=1 cargo test --test api` runs every test on a pool
        // of one connection, where code that holds a connection while it waits for another
        // times out in 8 s instead of passing (tests that hold one themselves fail too).
        if let Ok(n) = std::env::var("RAPPORT_TEST_POOL_MAX") {
            config.db_max_connections = n.parse().expect("RAPPORT_TEST_POOL_MAX is a number");
            options = options.acquire_timeout(std::time::Duration::from_secs(8));
        }
        let pool = options
            .max_connections(config.db_max_connections)
            .connect(&db.url)
            .await
            .expect("connect to the test database");
        rapport::db::migrate(&pool, &db.url).await.expect("migrate");
        // The engine's clock stands still unless a test moves it with `advance`.
        let app = App::from_pool(pool.clone(), config)
            .with_clock(rapport::clock::Clock::manual(chrono::Utc::now()));
        // As `App::build` does: the link keys are loaded before anything runs.
        app.state
            .links
            .get(&pool)
            .await
            .expect("load the link keys");
        TestApp {
            router: app.router(),
            app,
            pool,
            db,
        }
    }

    /// Sends every message through `provider` from now on.
    pub fn use_provider(&mut self, provider: std::sync::Arc<dyn rapport::channels::Provider>) {
        self.app = self
            .app
            .clone()
            .with_channels(rapport::channels::Channels::fixed(provider));
        self.router = self.app.router();
    }

    /// Runs the campaign engine and the dispatcher until neither has anything to do; the
    /// number of things done.
    pub async fn drain(&self) -> usize {
        rapport::worker::drain(&self.app.state)
            .await
            .expect("drain")
    }

    /// Walks every due broadcast, as the worker does (without sending); the turns taken.
    pub async fn walk_broadcasts(&self) -> usize {
        let holder = uuid::Uuid::now_v7();
        let mut turns = 0;
        while rapport::broadcasts::round(&self.app.state, holder)
            .await
            .expect("broadcast round")
        {
            turns += 1;
        }
        turns
    }

    /// Writes every queued contact import, as the worker does; the number of turns taken.
    pub async fn run_imports(&self) -> usize {
        let holder = uuid::Uuid::now_v7();
        let mut turns = 0;
        while rapport::contacts::import::apply::round(&self.app.state, holder)
            .await
            .expect("import round")
        {
            turns += 1;
        }
        turns
    }

    /// Posts `body` as it is, with this content type.
    pub async fn upload(&self, path: &str, token: &str, content_type: &str, body: Vec<u8>) -> Resp {
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }

    /// Moves the engine's clock forward.
    pub fn advance(&self, by: chrono::Duration) {
        self.app.state.clock.advance(by);
    }

    /// The engine's current time.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.app.state.clock.now()
    }

    /// The lines the `log` provider wrote, parsed.
    pub fn outbox_log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.app.state.config.outbox_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Sends a request; `body` is sent as JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = match body {
            Some(b) => builder
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&b).unwrap()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        };
        self.send(request).await
    }

    /// Sends a prepared request.
    /// Serves the app on a loopback port, as `serve` does, until the token is cancelled.
    pub async fn serve(&self) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let (server, stop) = (self.app.clone(), token.clone());
        tokio::spawn(async move { server.run_api(listener, stop).await });
        (addr, token)
    }

    pub async fn send(&self, request: Request<Body>) -> Resp {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
            bytes: bytes.to_vec(),
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PUT, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PATCH, path, Some(token), Some(body))
            .await
    }

    /// Ends a PostgreSQL session as an administrator or a restart would (`57P01` on its next
    /// statement).
    pub async fn terminate_backend(&self, pid: i32) {
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        assert!(killed, "no backend {pid}");
    }

    /// The ids of this test database's sessions that match `condition` (SQL over
    /// `pg_stat_activity`).
    pub async fn sessions(&self, condition: &str) -> Vec<i32> {
        sqlx::query_scalar(&format!(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND ({condition})"
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Waits (at most 10 s) until a session matches `condition`, as [`TestApp::sessions`].
    pub async fn wait_for_session(&self, condition: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.sessions(condition).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no session where {condition}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Creates a tenant (country HR unless the slug says `gb`) and an API key for it.
    pub async fn tenant(&self, slug: &str) -> TestTenant {
        let country = if slug.contains("gb") { "GB" } else { "HR" };
        let t = self
            .post(
                "/admin/v1/tenants",
                ADMIN,
                json!({"name": format!("Tenant {slug}"), "slug": slug, "default_country": country,
                       "default_locale": "hr", "timezone": "Europe/Zagreb"}),
            )
            .await;
        assert_eq!(t.status, StatusCode::CREATED, "{}", t.text);
        let id = t.body["id"].as_str().unwrap().to_owned();
        let k = self
            .post(
                &format!("/admin/v1/tenants/{id}/api-keys"),
                ADMIN,
                json!({"name": "test"}),
            )
            .await;
        assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
        TestTenant {
            id,
            key: k.body["key"].as_str().unwrap().to_owned(),
            key_id: k.body["id"].as_str().unwrap().to_owned(),
        }
    }

    /// Upserts a contact and returns its body.
    pub async fn contact(&self, t: &TestTenant, external_id: &str, body: Value) -> Value {
        let r = self
            .put(&format!("/v1/contacts/{external_id}"), &t.key, body)
            .await;
        assert!(r.status.is_success(), "{}", r.text);
        r.body
    }
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            let config = Config {
                log_level: "debug,sqlx=warn".into(),
                ..Config::default()
            };
            rapport::telemetry::init_logging(&config);
        }
    });
}

/// The path of the `nth` link under `prefix` (`/t/c/`, `/t/o/`) in a sent HTML body.
pub fn link(html: &str, prefix: &str, nth: usize) -> String {
    let base = "http://localhost:8080";
    let start = html
        .match_indices(&format!("{base}{prefix}"))
        .nth(nth)
        .expect("link present")
        .0;
    let end = html[start..].find(['"', '\'']).unwrap() + start;
    html[start + base.len()..end].to_owned()
}

/// Waits until `count` (a `SELECT count(*) ...`) is exactly `n` on `pool`, looking every
/// 20 ms; how long that took from `since`. Panics, saying how many there were, after
/// `patience` or as soon as there are more than `n`.
pub async fn count_reaches(
    pool: &sqlx::PgPool,
    count: &str,
    n: i64,
    since: std::time::Instant,
    patience: std::time::Duration,
) -> std::time::Duration {
    loop {
        let seen: i64 = sqlx::query_scalar(count).fetch_one(pool).await.unwrap();
        assert!(seen <= n, "{seen}, more than {n}: {count}");
        if seen == n {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < patience,
            "{seen} of {n} after {patience:?}: {count}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A `rapport serve` process started from `cmd` (JSON logs on stderr) once it logs that it
/// listens: the process, its address, the log lines so far, and the rest as they come. The
/// caller owns the process: kill or wait for it.
pub struct Listening {
    pub child: std::process::Child,
    pub addr: String,
    pub lines: Vec<String>,
    pub rest: std::sync::mpsc::Receiver<String>,
}

pub fn spawn_listening(
    cmd: &mut std::process::Command,
    patience: std::time::Duration,
) -> Listening {
    spawn_until(cmd, "listening", patience)
}

/// A `rapport` process started from `cmd` (JSON logs on stderr) once it logs `message` (such
/// as `listening`, or `worker started` for a worker alone); `addr` is the line's `address`, if
/// any.
pub fn spawn_until(
    cmd: &mut std::process::Command,
    message: &str,
    patience: std::time::Duration,
) -> Listening {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start rapport");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + patience;
    let mut lines = Vec::new();
    loop {
        let Ok(line) =
            rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not log {message:?}: {lines:#?}");
        };
        lines.push(line.clone());
        let Ok(json) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if json["message"] == message {
            let addr = json["address"].as_str().unwrap_or_default().to_owned();
            return Listening {
                child,
                addr,
                lines,
                rest: rx,
            };
        }
    }
}
