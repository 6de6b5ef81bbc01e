//! `rapport-bench`: measures Rapport's hot paths over loopback HTTP against a real server, and
//! the database's own limit for the same rows, so every figure is also a ratio of what
//! PostgreSQL can do on this machine.
//!
//! By default it starts `rapport serve` (the binary next to this one) on a fresh database,
//! creates its own tenant and data, runs each scenario for `--duration`, prints a table,
//! writes JSON, stops the server and drops the database. See BENCHMARKS.md.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::extract::State;
use clap::Parser;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Semaphore;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "rapport-bench",
    about = "Measure Rapport's hot paths against PostgreSQL's own limit"
)]
struct Args {
    /// Base PostgreSQL URL; the benchmark creates (and drops) its own database on that server.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/rapport"
    )]
    database_url: String,
    /// The `rapport` binary to start (default: the one next to this program).
    #[arg(long)]
    server_bin: Option<String>,
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Concurrent clients for the single-request scenarios.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Scenarios to run, comma-separated: events,batch,rules,dispatch,e2e,reads,contacts,
    /// import,broadcast.
    #[arg(
        long,
        default_value = "events,batch,rules,dispatch,e2e,reads,contacts,import,broadcast"
    )]
    scenarios: String,
    /// Rows of the CSV file the import scenario (7e) loads.
    #[arg(long, default_value_t = 1_000_000)]
    import_rows: u64,
    /// Messages queued for the dispatch scenario.
    #[arg(long, default_value_t = 100_000)]
    dispatch_messages: usize,
    /// Contacts of the tenant in the broadcast scenario (8), half of them members of the
    /// broadcast's segment: written straight into the table, on top of those the other
    /// scenarios made (always the members; others only up to this number).
    #[arg(long, default_value_t = 1_000_000)]
    broadcast_contacts: u64,
    /// Seconds from `schedule` to the broadcast's `send_at` (8a, 8b): its walk starts at
    /// once and queues every message ahead of that time, which 8b then sends from.
    #[arg(long, default_value_t = 40.0)]
    broadcast_lead: f64,
    /// Single events a second posted during the broadcast (8c), for three times `--duration`
    /// from `schedule`.
    #[arg(long, default_value_t = 500.0)]
    broadcast_ingest_rate: f64,
    /// Contacts created before the scenarios run.
    #[arg(long, default_value_t = 10_000)]
    contacts: usize,
    /// Events per second in the end-to-end scenario.
    #[arg(long, default_value_t = 20.0)]
    e2e_rate: f64,
    /// Events per second offered in the realistic rules scenario (3); by default half the rate
    /// scenario 1 measured in the same run (2,000/s when it did not run). A fixed rate
    /// compares two builds at the same load on a host whose speed drifts.
    #[arg(long)]
    realistic_rate: Option<f64>,
    /// Events per second ingested in the steady part of the rules scenario (3b); by default
    /// half the evaluation rate its flat-out part (3a) measured.
    #[arg(long)]
    rules_rate: Option<f64>,
    /// More steady-rate runs after 3b, bisecting for the highest rate at which evaluation
    /// keeps the lag's p99 under a second (3c); 0 skips 3c.
    #[arg(long, default_value_t = 3)]
    rules_probes: u32,
    /// Seconds to wait, after closing the benchmark's connections, before reading the
    /// server's idle memory: it closes provider connections idle for 10 s, at its pool's
    /// next check (every 10 s), so 10 to 20 s after a burst of sends ends.
    #[arg(long, default_value_t = 25.0)]
    idle_wait: f64,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench.json")]
    json: String,
    /// Also write every request of the open-loop scenarios (3, 3b and the halves of 6) to this
    /// CSV file: scenario, when it started (µs into the scenario), its latency (µs). Slow
    /// requests that bunch together in time point at a pause of the host rather than at a
    /// slow request.
    #[arg(long)]
    latency_log: Option<String>,
    /// The pgbench program that measures scenario 1's raw limit (PostgreSQL's own client,
    /// `-M prepared`); when it cannot run, the benchmark's own sqlx client measures it
    /// instead and the row says so.
    #[arg(long, default_value = "pgbench")]
    pgbench: String,
}

const ADMIN: &str = "bench-admin-token";

/// Latencies of one scenario.
#[derive(Default)]
struct Samples {
    micros: Vec<u64>,
    errors: u64,
    /// (start in µs since the scenario began, latency in µs) of each request, in the order
    /// they finished; only the open loop records it.
    timeline: Vec<(u64, u64)>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
        self.errors += other.errors;
    }

    fn pct(&mut self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        self.micros.sort_unstable();
        let i = ((self.micros.len() as f64 - 1.0) * p).round() as usize;
        self.micros[i] as f64 / 1000.0
    }
}

/// One row of the results.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    scenario: String,
    unit: String,
    throughput: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    errors: u64,
    db_limit: Option<f64>,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
    peak_rss_mb: f64,
    cpu_pct: f64,
    notes: String,
}

/// The server process, watched for memory and CPU.
struct Server {
    child: Option<Child>,
    pid: u32,
    url: String,
    db_name: String,
    peak_rss_kb: Arc<AtomicU64>,
}

fn proc_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Keeps `peak` at the highest RSS of the process, sampled every 50 ms, while it lives.
fn watch_peak(pid: u32, peak: Arc<AtomicU64>) {
    tokio::spawn(async move {
        loop {
            let rss = proc_rss_kb(pid);
            if rss == 0 {
                return;
            }
            peak.fetch_max(rss, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// User + system CPU seconds of a process.
fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is 0, utime is 11, stime is 12.
    (ticks(11) + ticks(12)) / 100.0
}

impl Server {
    async fn start(args: &Args) -> anyhow::Result<Server> {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .with_file_name("rapport")
                .to_string_lossy()
                .into_owned(),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let db_name = format!("rapport_bench_{}", std::process::id());
        let mut db_url = url::Url::parse(&args.database_url)?;
        db_url.set_path(&format!("/{db_name}"));
        let log = std::env::temp_dir().join(format!("{db_name}.jsonl"));
        let child = Command::new(&bin)
            .arg("serve")
            .env("DATABASE_URL", db_url.as_str())
            .env("RAPPORT_LISTEN", format!("127.0.0.1:{port}"))
            .env("RAPPORT_ADMIN_TOKEN", ADMIN)
            .env(
                "RAPPORT_SECRET_KEY",
                "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=",
            )
            .env("RAPPORT_OUTBOX_LOG", &log)
            // The load comes from one tenant: measure the service, not its rate limit.
            .env("RAPPORT_TENANT_RATE_LIMIT", "0")
            // The provider stub listens on loopback.
            .env("RAPPORT_EGRESS_ALLOW_HOSTS", "127.0.0.1")
            .env(
                "RAPPORT_LOG_LEVEL",
                std::env::var("RAPPORT_LOG_LEVEL").unwrap_or_else(|_| "warn,sqlx=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {bin} (build it with `cargo build --release`)"))?;
        let pid = child.id();
        let server = Server {
            child: Some(child),
            pid,
            url: format!("http://127.0.0.1:{port}"),
            db_name,
            peak_rss_kb: Arc::new(AtomicU64::new(0)),
        };
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", server.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the server did not become ready in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watch_peak(pid, server.peak_rss_kb.clone());
        Ok(server)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every scenario shares.
struct Bench {
    args: Args,
    http: reqwest::Client,
    url: String,
    key: String,
    db: PgPool,
    /// The benchmark database's URL (the server's database).
    db_url: String,
    pid: u32,
    peak: Arc<AtomicU64>,
    /// Pre-created contacts: (id, external_id, E.164 phone).
    contacts: Vec<(String, String, String)>,
    stub: Stub,
}

/// A Twilio-shaped HTTP stub that answers after 10 ms and remembers every body it got.
#[derive(Clone, Default)]
struct Stub {
    seen: Arc<Mutex<HashMap<String, (u32, Instant)>>>,
    /// When each request arrived, for the busiest second of a paced channel.
    arrivals: Arc<Mutex<Vec<Instant>>>,
    requests: Arc<AtomicU64>,
    url: String,
}

async fn stub_messages(
    State(stub): State<Stub>,
    body: String,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    tokio::time::sleep(Duration::from_millis(10)).await;
    let text = url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "Body")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    stub.requests.fetch_add(1, Ordering::Relaxed);
    {
        let mut seen = stub.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.entry(text).or_insert((0, Instant::now())).0 += 1;
    }
    stub.arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Instant::now());
    (
        axum::http::StatusCode::CREATED,
        axum::Json(
            json!({"sid": format!("SM{}", uuid::Uuid::new_v4().simple()), "status": "queued"}),
        ),
    )
}

impl Stub {
    async fn start() -> anyhow::Result<Stub> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut stub = Stub {
            url: format!("http://{}", listener.local_addr()?),
            ..Stub::default()
        };
        let app = axum::Router::new()
            .route(
                "/2010-04-01/Accounts/{sid}/Messages.json",
                axum::routing::post(stub_messages),
            )
            .with_state(stub.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        stub.url = stub.url.clone();
        Ok(stub)
    }

    fn reset(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.requests.store(0, Ordering::Relaxed);
    }
}

/// The lag samples of [`Bench::sample_lag`].
struct LagSampler {
    lags: Arc<Mutex<Vec<f64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LagSampler {
    /// Stops sampling: the lags, in microseconds.
    async fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let lags = self.lags.lock().unwrap_or_else(|e| e.into_inner());
        Samples {
            micros: lags.iter().map(|s| (s * 1e6) as u64).collect(),
            ..Samples::default()
        }
    }
}

impl Bench {
    fn row(&self, scenario: &str, unit: &str) -> Row {
        Row {
            scenario: scenario.to_owned(),
            unit: unit.to_owned(),
            throughput: 0.0,
            p50_ms: 0.0,
            p95_ms: 0.0,
            p99_ms: 0.0,
            errors: 0,
            db_limit: None,
            ratio: None,
            target: String::new(),
            met: None,
            peak_rss_mb: 0.0,
            cpu_pct: 0.0,
            notes: String::new(),
        }
    }

    /// Runs `f` (one request) from `clients` loops for `secs`; per-request latencies.
    async fn closed_loop<F, Fut>(&self, clients: usize, secs: f64, f: F) -> (Samples, f64)
    where
        F: Fn(u64) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let counter = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let f = f.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = Samples::default();
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    if f(n).await {
                        s.micros.push(t.elapsed().as_micros() as u64);
                    } else {
                        s.errors += 1;
                    }
                }
                s
            }));
        }
        let mut all = Samples::default();
        for t in tasks {
            if let Ok(s) = t.await {
                all.merge(s);
            }
        }
        (all, start.elapsed().as_secs_f64())
    }

    /// Starts `f` (one request) `rate` times a second for `secs`, whether or not the earlier
    /// ones have finished (at most 512 in flight); per-request latencies.
    async fn open_loop<F, Fut>(&self, rate: f64, secs: f64, f: F) -> (Samples, f64)
    where
        F: Fn(u64) -> Fut,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        let rate = rate.max(1.0);
        let sem = Arc::new(Semaphore::new(512));
        let total = ((rate * secs) as u64).max(1);
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let samples = Arc::new(Mutex::new(Samples::default()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for n in 0..total {
            ticker.tick().await;
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            let request = f(n);
            let samples = samples.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let ok = request.await;
                let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    let latency = t.elapsed().as_micros() as u64;
                    s.micros.push(latency);
                    s.timeline
                        .push((t.duration_since(started).as_micros() as u64, latency));
                } else {
                    s.errors += 1;
                }
                drop(permit);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let secs = started.elapsed().as_secs_f64();
        let s = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
        (s, secs)
    }

    /// Samples, every 100 ms until stopped, the age of the oldest event the rule engine has
    /// not consumed yet (0 when it has consumed them all).
    fn sample_lag(&self) -> LagSampler {
        let db = self.db.clone();
        let lags = Arc::new(Mutex::new(Vec::<f64>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let lags = lags.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let age: Option<f64> = sqlx::query_scalar(
                        // The inbox's first row (its order index), not min() over a join of
                        // every pending event: the sampler must not load the database it
                        // measures.
                        "SELECT extract(epoch FROM clock_timestamp() - e.received_at)::float8
                         FROM (SELECT tenant_id, event_id FROM campaign_inbox ORDER BY seq LIMIT 1) i
                         JOIN events e ON e.tenant_id = i.tenant_id AND e.id = i.event_id",
                    )
                    .fetch_one(&db)
                    .await
                    .unwrap_or(None);
                    lags.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(age.unwrap_or(0.0));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        LagSampler { lags, stop, task }
    }

    /// Waits until the rule engine's inbox is empty, or `limit` after `started`; true when it
    /// emptied.
    async fn inbox_drained(&self, started: Instant, limit: Duration) -> anyhow::Result<bool> {
        while started.elapsed() < limit {
            let left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM campaign_inbox)")
                .fetch_one(&self.db)
                .await?;
            if !left {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    }

    fn post(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
    }

    /// Measures the server's CPU and peak memory around a scenario.
    fn watch(&self) -> (f64, Instant) {
        self.peak.store(proc_rss_kb(self.pid), Ordering::Relaxed);
        (proc_cpu_secs(self.pid), Instant::now())
    }

    /// Appends an open loop's requests to `--latency-log`, when it is given.
    fn log_latencies(&self, scenario: &str, s: &Samples) -> anyhow::Result<()> {
        use std::io::Write;
        let Some(path) = &self.args.latency_log else {
            return Ok(());
        };
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot append to {path}"))?;
        // "6a. GET /v1/contacts/{id}" -> "6a"
        let scenario = scenario
            .split_whitespace()
            .next()
            .unwrap_or(scenario)
            .trim_end_matches('.');
        let mut text = String::with_capacity(s.timeline.len() * 24);
        for (start, latency) in &s.timeline {
            text.push_str(&format!("{scenario},{start},{latency}\n"));
        }
        out.write_all(text.as_bytes())
            .with_context(|| format!("cannot append to {path}"))?;
        Ok(())
    }

    fn finish_watch(&self, row: &mut Row, (cpu0, t0): (f64, Instant)) {
        let cpu = proc_cpu_secs(self.pid) - cpu0;
        row.cpu_pct = 100.0 * cpu / t0.elapsed().as_secs_f64().max(1e-3);
        row.peak_rss_mb = self.peak.load(Ordering::Relaxed) as f64 / 1024.0;
    }

    fn event_body(&self, n: u64, kind: &str) -> Value {
        let c = &self.contacts[(n as usize * 7919) % self.contacts.len()];
        json!({"type": kind, "contact": {"external_id": c.1},
               "properties": {"n": n, "amount": 129.9, "sku": "SKU-42"}})
    }

    /// The benchmark tenant's id (the only tenant of its database).
    async fn tenant_id(&self) -> anyhow::Result<uuid::Uuid> {
        Ok(sqlx::query_scalar("SELECT id FROM tenants LIMIT 1")
            .fetch_one(&self.db)
            .await?)
    }

    /// The benchmark tenant's id, and a pool of `clients` connections of its own for a raw
    /// baseline (not the server's).
    async fn raw_clients(&self, clients: usize) -> anyhow::Result<(uuid::Uuid, sqlx::PgPool)> {
        let tenant = self.tenant_id().await?;
        let pool = PgPoolOptions::new()
            .max_connections(clients as u32)
            .connect_with(self.db.connect_options().as_ref().clone())
            .await?;
        Ok((tenant, pool))
    }

    /// An empty `bench_raw_events`, a copy of `events` with its indexes, for a raw baseline.
    async fn fresh_raw_events(&self) -> anyhow::Result<()> {
        sqlx::query("DROP TABLE IF EXISTS bench_raw_events")
            .execute(&self.db)
            .await?;
        sqlx::query("CREATE TABLE bench_raw_events (LIKE events INCLUDING ALL)")
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// The raw limit: the same event rows straight into a copy of the events table, one row
    /// per commit from `clients` connections, or `batch` rows per statement with UNNEST.
    async fn raw_insert_rate(
        &self,
        clients: usize,
        batch: usize,
        secs: f64,
    ) -> anyhow::Result<f64> {
        self.fresh_raw_events().await?;
        let (tenant, pool) = self.raw_clients(clients).await?;
        let counter = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        let contact_ids: Arc<Vec<uuid::Uuid>> = Arc::new(
            self.contacts
                .iter()
                .filter_map(|c| c.0.parse().ok())
                .collect(),
        );
        for _ in 0..clients {
            let pool = pool.clone();
            let counter = counter.clone();
            let contact_ids = contact_ids.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = counter.fetch_add(batch as u64, Ordering::Relaxed);
                    let ids: Vec<uuid::Uuid> = (0..batch).map(|_| uuid::Uuid::now_v7()).collect();
                    let contacts: Vec<uuid::Uuid> = (0..batch)
                        .map(|i| contact_ids[((n as usize + i) * 7919) % contact_ids.len()])
                        .collect();
                    let props: Vec<Value> = (0..batch)
                        .map(|i| json!({"n": n + i as u64, "amount": 129.9, "sku": "SKU-42"}))
                        .collect();
                    let r = sqlx::query(
                        "INSERT INTO bench_raw_events (tenant_id, id, contact_id, type, occurred_at,
                             properties, source, ordinal)
                         SELECT $1, id, c, 'bench.raw', now(), p, 'api', 1
                         FROM unnest($2::uuid[], $3::uuid[], $4::jsonb[]) AS u(id, c, p)",
                    )
                    .bind(tenant)
                    .bind(&ids)
                    .bind(&contacts)
                    .bind(&props)
                    .execute(&pool)
                    .await;
                    if r.is_err() {
                        counter.fetch_sub(batch as u64, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let rate = counter.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        pool.close().await;
        sqlx::query("DROP TABLE bench_raw_events")
            .execute(&self.db)
            .await?;
        Ok(rate)
    }
}

impl Bench {
    /// Scenario 1's raw limit as PostgreSQL's own client measures it: `pgbench -M prepared`
    /// at `clients` connections, for `secs`, one row per commit into a `LIKE events
    /// INCLUDING ALL` copy; rows like scenario 1's (the tenant, a time-ordered id, one of
    /// 10,000 contacts, the same properties). None when pgbench cannot run here.
    async fn pgbench_insert_rate(&self, clients: usize, secs: f64) -> anyhow::Result<Option<f64>> {
        self.fresh_raw_events().await?;
        let tenant = self.tenant_id().await?;
        let script = std::env::temp_dir().join(format!("rapport-bench-{}.sql", std::process::id()));
        // The id is time-ordered like the server's UUIDv7 (microseconds, then random bits),
        // so the primary key grows at its right edge as it does for the server's rows.
        std::fs::write(
            &script,
            "\\set k random(0, 9999)\n\\set n random(1, 1000000000)\n\
             INSERT INTO bench_raw_events (tenant_id, id, contact_id, type, occurred_at, \
             properties, source, ordinal) VALUES (:tenant::uuid, (lpad(to_hex((extract(epoch \
             FROM clock_timestamp()) * 1000000)::bigint), 16, '0') || substr(md5(random()::text), \
             1, 16))::uuid, md5(:k::text)::uuid, 'bench.raw', now(), jsonb_build_object('n', :n::bigint, \
             'amount', 129.9, 'sku', 'SKU-42'), 'api', 1);\n",
        )
        .context("write the pgbench script")?;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(clients);
        let run = tokio::process::Command::new(&self.args.pgbench)
            .args([
                "-n",
                "-M",
                "prepared",
                "-c",
                &clients.to_string(),
                "-j",
                &threads.to_string(),
            ])
            .args(["-T", &(secs.ceil() as u64).max(1).to_string()])
            .arg("-f")
            .arg(&script)
            .args(["-D", &format!("tenant={tenant}")])
            .arg(&self.db_url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await;
        let _ = std::fs::remove_file(&script);
        sqlx::query("DROP TABLE bench_raw_events")
            .execute(&self.db)
            .await?;
        let out = match run {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                eprintln!(
                    "rapport-bench: pgbench failed ({}), measuring with sqlx instead: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return Ok(None);
            }
            Err(e) => {
                eprintln!(
                    "rapport-bench: cannot run {} ({e}), measuring with sqlx instead",
                    self.args.pgbench
                );
                return Ok(None);
            }
        };
        Ok(pgbench_tps(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Bench {
    /// The raw limit of contact writes: rows like [`sync_contact`]'s, 1,000 per UNNEST
    /// statement from `clients` connections, into a copy of `contacts`; round 0 inserts new
    /// ones, round 1 upserts over the rows round 0 left.
    ///
    /// With `all_rows`, each statement also writes what the server must write with each
    /// contact, into copies of their tables: its `contact.created` / `contact.updated` event and
    /// that event's counter (whose key to the contact stands, as in `contact_event_counts`), in
    /// one statement per 1,000 contacts: the database's limit for the rows a batch writes.
    async fn raw_contact_rate(
        &self,
        clients: usize,
        round: u64,
        secs: f64,
        all_rows: bool,
    ) -> anyhow::Result<f64> {
        let (contacts, events, counts) = if all_rows {
            (
                "bench_raw_contacts_all",
                "bench_raw_contact_events",
                "bench_raw_contact_counts",
            )
        } else {
            ("bench_raw_contacts", "", "")
        };
        // Dropped in the order their keys allow.
        let tables: &[&str] = if all_rows {
            &[counts, events, contacts]
        } else {
            &[contacts]
        };
        if round == 0 {
            for table in tables {
                sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute(&self.db)
                    .await?;
            }
            sqlx::query(&format!(
                "CREATE TABLE {contacts} (LIKE contacts INCLUDING ALL)"
            ))
            .execute(&self.db)
            .await?;
            if all_rows {
                sqlx::query(&format!(
                    "CREATE TABLE {events} (LIKE events INCLUDING ALL)"
                ))
                .execute(&self.db)
                .await?;
                sqlx::query(&format!(
                    "CREATE TABLE {counts} (LIKE contact_event_counts INCLUDING ALL,
                        FOREIGN KEY (tenant_id, contact_id) REFERENCES {contacts} (tenant_id, id))"
                ))
                .execute(&self.db)
                .await?;
            }
        }
        let existing: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {contacts}"))
            .fetch_one(&self.db)
            .await?;
        // One statement: the contacts, then (all_rows) an event and a counter for each one
        // written, by the id the contact has (new, or the stored one when it existed).
        let sql = if all_rows {
            format!(
                "WITH c AS (
                    INSERT INTO {contacts} (tenant_id, id, external_id, first_name, last_name,
                        email, phone, attributes, consents)
                    SELECT $1, u.id, u.x, u.f, u.l, u.e, u.p, u.a, u.c
                    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                                $7::text[], $8::jsonb[], $9::jsonb[]) AS u(id, x, f, l, e, p, a, c)
                    ON CONFLICT (tenant_id, external_id) DO UPDATE
                       SET first_name = excluded.first_name, attributes = excluded.attributes,
                           updated_at = now()
                    RETURNING tenant_id, id, first_name, attributes
                 ), n AS (
                    INSERT INTO {counts} AS cc (tenant_id, contact_id, event_type, count, last_at)
                    SELECT tenant_id, id, $10, 1, now() FROM c ORDER BY id
                    ON CONFLICT (tenant_id, contact_id, event_type)
                    DO UPDATE SET count = cc.count + 1, last_at = excluded.last_at
                    RETURNING contact_id, count
                 )
                 INSERT INTO {events} (tenant_id, id, contact_id, type, occurred_at, properties,
                                       source, ordinal)
                 SELECT c.tenant_id, gen_random_uuid(), c.id, $10, clock_timestamp(),
                        CASE WHEN $11 THEN jsonb_build_object('via', 'upsert')
                             ELSE jsonb_build_object('changes', jsonb_build_object(
                                 'first_name', c.first_name, 'attributes', c.attributes)) END,
                        'rapport', n.count
                 FROM c JOIN n ON n.contact_id = c.id"
            )
        } else {
            format!(
                "INSERT INTO {contacts} (tenant_id, id, external_id, first_name,
                     last_name, email, phone, attributes, consents)
                 SELECT $1, u.id, u.x, u.f, u.l, u.e, u.p, u.a, u.c
                 FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                             $7::text[], $8::jsonb[], $9::jsonb[]) AS u(id, x, f, l, e, p, a, c)
                 ON CONFLICT (tenant_id, external_id) DO UPDATE
                    SET first_name = excluded.first_name, attributes = excluded.attributes,
                        updated_at = now()"
            )
        };
        let sql = Arc::new(sql);
        let kind = if round == 0 {
            "contact.created"
        } else {
            "contact.updated"
        };
        let (tenant, pool) = self.raw_clients(clients).await?;
        let counter = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (pool, counter, done) = (pool.clone(), counter.clone(), done.clone());
            let sql = sql.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let mut n = counter.fetch_add(1000, Ordering::Relaxed);
                    if round > 0 {
                        n %= (existing as u64).max(1000);
                    }
                    let rows: Vec<Value> = (0..1000).map(|i| sync_contact(n + i, round)).collect();
                    let ids: Vec<uuid::Uuid> = (0..1000).map(|_| uuid::Uuid::now_v7()).collect();
                    let text = |k: &str| rows.iter().map(|r| r[k].as_str().map(str::to_owned)).collect::<Vec<_>>();
                    let attributes: Vec<Value> = rows.iter().map(|r| r["attributes"].clone()).collect();
                    let consents: Vec<Value> = rows
                        .iter()
                        .map(|_| json!({"email": {"marketing": {"status": "opted_in", "source": "api", "at": "2026-12-03T00:00:00Z"}}}))
                        .collect();
                    let mut q = sqlx::query(&sql)
                    .bind(tenant)
                    .bind(&ids)
                    .bind(text("external_id"))
                    .bind(text("first_name"))
                    .bind(text("last_name"))
                    .bind(text("email"))
                    .bind(text("phone"))
                    .bind(&attributes)
                    .bind(&consents);
                    if all_rows {
                        q = q.bind(kind).bind(round == 0);
                    }
                    if q.execute(&pool).await.is_ok() {
                        done.fetch_add(1000, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        pool.close().await;
        if round > 0 {
            for table in tables {
                sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute(&self.db)
                    .await?;
            }
        }
        Ok(rate)
    }
}

/// The rate pgbench reports: "tps = 17512.3 (without initial connection time)".
fn pgbench_tps(out: &str) -> Option<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tps = "))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
}

fn fill(row: &mut Row, samples: &mut Samples, count: f64, secs: f64) {
    row.throughput = count / secs.max(1e-6);
    row.p50_ms = samples.pct(0.50);
    row.p95_ms = samples.pct(0.95);
    row.p99_ms = samples.pct(0.99);
    row.errors = samples.errors;
}

async fn setup(args: &Args, server: &Server) -> anyhow::Result<Bench> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let t: Value = http
        .post(format!("{}/admin/v1/tenants", server.url))
        .bearer_auth(ADMIN)
        .json(
            &json!({"name": "Bench", "slug": "bench", "default_country": "HR",
                      "default_locale": "hr", "timezone": "Europe/Zagreb"}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let tenant = t["id"].as_str().context("tenant id")?.to_owned();
    let k: Value = http
        .post(format!("{}/admin/v1/tenants/{tenant}/api-keys", server.url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key = k["key"].as_str().context("api key")?.to_owned();
    let mut db_url = url::Url::parse(&args.database_url)?;
    db_url.set_path(&format!("/{}", server.db_name));
    let db = PgPoolOptions::new()
        .max_connections(8)
        .connect(db_url.as_str())
        .await?;
    let stub = Stub::start().await?;
    let mut bench = Bench {
        args: args.clone(),
        http,
        url: server.url.clone(),
        key,
        db,
        db_url: db_url.to_string(),
        pid: server.pid,
        peak: server.peak_rss_kb.clone(),
        contacts: Vec::new(),
        stub,
    };
    // Contacts, 1,000 a request.
    for chunk in 0..args.contacts.div_ceil(1000) {
        let items: Vec<Value> = (chunk * 1000..((chunk + 1) * 1000).min(args.contacts))
            .map(|i| {
                json!({"external_id": format!("c{i}"), "first_name": "Ana",
                            "phone": format!("+3859{:08}", 10_000_000 + i),
                            "email": format!("c{i}@bench.example"),
                            "consents": {"sms": {"marketing": "opted_in"}},
                            "attributes": {"credit_limit": 10000, "available_credit": 5000}})
            })
            .collect();
        let r: Value = bench
            .post("/v1/contacts/batch", json!({"contacts": items}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for item in r["results"]
            .as_array()
            .or(r["data"].as_array())
            .into_iter()
            .flatten()
        {
            let c = if item.get("contact").is_some() {
                &item["contact"]
            } else {
                item
            };
            if let (Some(id), Some(ext), Some(phone)) = (
                c["id"].as_str(),
                c["external_id"].as_str(),
                c["phone"].as_str(),
            ) {
                bench
                    .contacts
                    .push((id.to_owned(), ext.to_owned(), phone.to_owned()));
            }
        }
    }
    if bench.contacts.is_empty() {
        bail!("no contacts were created");
    }
    Ok(bench)
}

async fn scenario_events(b: &Bench) -> anyhow::Result<Row> {
    let mut row = b.row("1. POST /v1/events", "events/s");
    let w = b.watch();
    let http = b.http.clone();
    let url = format!("{}/v1/events", b.url);
    let key = b.key.clone();
    let bodies: Arc<Vec<Value>> = Arc::new(
        (0..50_000)
            .map(|n| b.event_body(n, "bench.viewed"))
            .collect(),
    );
    let (mut s, secs) = b
        .closed_loop(b.args.concurrency, b.args.duration, move |n| {
            let req = http
                .post(&url)
                .bearer_auth(&key)
                .json(&bodies[n as usize % bodies.len()]);
            async move { matches!(req.send().await, Ok(r) if r.status().as_u16() == 202) }
        })
        .await;
    b.finish_watch(&mut row, w);
    let count = s.micros.len() as f64;
    fill(&mut row, &mut s, count, secs);
    let (raw, client) = match b
        .pgbench_insert_rate(b.args.concurrency, b.args.duration)
        .await?
    {
        Some(raw) => (raw, "pgbench -M prepared"),
        None => (
            b.raw_insert_rate(b.args.concurrency, 1, b.args.duration)
                .await?,
            "the benchmark's sqlx client (FALLBACK: pgbench did not run)",
        ),
    };
    row.db_limit = Some(raw);
    row.ratio = Some(row.throughput / raw);
    row.target = ">= 1.0x raw, p99 < 25 ms".into();
    row.met = Some(row.throughput >= raw && row.p99_ms < 25.0);
    row.notes = format!(
        "raw = one INSERT per commit at concurrency {}, by {client}",
        b.args.concurrency
    );
    Ok(row)
}

async fn scenario_batch(b: &Bench) -> anyhow::Result<Row> {
    let mut row = b.row("2. POST /v1/events/batch (1,000)", "events/s");
    let clients = 4;
    let w = b.watch();
    let http = b.http.clone();
    let url = format!("{}/v1/events/batch", b.url);
    let key = b.key.clone();
    let batches: Arc<Vec<Value>> = Arc::new(
        (0..20u64)
            .map(|k| json!({"events": (0..1000).map(|i| b.event_body(k * 1000 + i, "bench.batched")).collect::<Vec<_>>()}))
            .collect(),
    );
    let (mut s, secs) = b
        .closed_loop(clients, b.args.duration, move |n| {
            let req = http
                .post(&url)
                .bearer_auth(&key)
                .json(&batches[n as usize % batches.len()]);
            async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
        })
        .await;
    b.finish_watch(&mut row, w);
    let count = s.micros.len() as f64 * 1000.0;
    fill(&mut row, &mut s, count, secs);
    let raw = b.raw_insert_rate(clients, 1000, b.args.duration).await?;
    row.db_limit = Some(raw);
    row.ratio = Some(row.throughput / raw);
    row.target = ">= 0.5x raw batched".into();
    row.met = Some(row.throughput >= 0.5 * raw);
    row.notes =
        format!("{clients} clients; raw = UNNEST of 1,000 rows per statement; latency per batch");
    Ok(row)
}

/// One contact of the contact-batch scenario, as a CRM sync sends it: `round` changes the
/// attributes and the name, so a later round updates every contact.
fn sync_contact(n: u64, round: u64) -> Value {
    json!({"external_id": format!("sync{n}"), "first_name": if round == 0 { "Ana" } else { "Ana Marija" },
           "last_name": "Horvat", "email": format!("sync{n}@bench.example"),
           "phone": format!("+3859{:08}", 20_000_000 + n),
           "consents": {"email": {"marketing": "opted_in"}},
           "attributes": {"credit_limit": 10000, "available_credit": 5000 - round as i64, "segment": "gold"}})
}

/// (7) `POST /v1/contacts/batch` of 1,000 at 4 clients: new contacts (7a), then the same
/// contacts again with changed fields (7b); raw = the same rows by UNNEST into a copy of
/// `contacts`, inserted (7a) and upserted (7b) 1,000 per statement.
async fn scenario_contacts(b: &Bench) -> anyhow::Result<Vec<Row>> {
    let clients = 4;
    let mut rows = Vec::new();
    let sent = Arc::new(AtomicU64::new(0));
    for (round, name) in [
        (0u64, "7a. POST /v1/contacts/batch (1,000 new)"),
        (1, "7b. POST /v1/contacts/batch (1,000 existing, changed)"),
    ] {
        let mut row = b.row(name, "contacts/s");
        let w = b.watch();
        let http = b.http.clone();
        let url = format!("{}/v1/contacts/batch", b.url);
        let key = b.key.clone();
        // 7b goes over the contacts 7a created, in the same order.
        let limit = sent.load(Ordering::Relaxed) / 1000;
        let ok = Arc::new(AtomicU64::new(0));
        let counted = ok.clone();
        let (mut s, secs) = b
            .closed_loop(clients, b.args.duration, move |n| {
                // Each pass over 7a's contacts changes them again.
                let (n, pass) = if round == 0 {
                    (n, 0)
                } else {
                    (n % limit.max(1), 1 + n / limit.max(1))
                };
                let items: Vec<Value> = (0..1000)
                    .map(|i| sync_contact(n * 1000 + i, pass))
                    .collect();
                let req = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"contacts": items}));
                let counted = counted.clone();
                async move {
                    let Ok(r) = req.send().await else {
                        return false;
                    };
                    let Ok(body) = r.json::<Value>().await else {
                        return false;
                    };
                    let done = body["created"].as_u64().unwrap_or(0)
                        + body["updated"].as_u64().unwrap_or(0);
                    counted.fetch_add(done, Ordering::Relaxed);
                    done == 1000
                }
            })
            .await;
        b.finish_watch(&mut row, w);
        if round == 0 {
            sent.store(s.micros.len() as u64 * 1000, Ordering::Relaxed);
        }
        let count = ok.load(Ordering::Relaxed) as f64;
        fill(&mut row, &mut s, count, secs);
        let raw = b
            .raw_contact_rate(clients, round, b.args.duration, false)
            .await?;
        let raw_all = b
            .raw_contact_rate(clients, round, b.args.duration, true)
            .await?;
        row.db_limit = Some(raw);
        row.ratio = Some(row.throughput / raw);
        row.target = ">= 0.4x raw UNNEST".into();
        row.met = Some(row.throughput >= 0.4 * raw);
        row.notes = format!(
            "{clients} clients; raw = UNNEST of the same 1,000 rows per statement into a copy of contacts{}; \
             with each contact's event and counter too (what a batch writes): {raw_all:.0}/s, {:.2}x",
            if round == 0 {
                ""
            } else {
                ", ON CONFLICT DO UPDATE"
            },
            row.throughput / raw_all
        );
        rows.push(row);
    }
    // Single requests that name contacts for the first time, against scenario 1's rate.
    let single = b.args.concurrency;
    for (name, put) in [
        ("7c. POST /v1/events naming a new contact", false),
        ("7d. PUT /v1/contacts/{id} of a new contact", true),
    ] {
        let mut row = b.row(name, if put { "contacts/s" } else { "events/s" });
        let w = b.watch();
        let http = b.http.clone();
        let base = b.url.clone();
        let key = b.key.clone();
        let prefix = if put { "put" } else { "ev" };
        let (mut s, secs) = b
            .closed_loop(single, b.args.duration, move |n| {
                let external_id = format!("{prefix}{n}");
                let req = if put {
                    http.put(format!("{base}/v1/contacts/{external_id}"))
                        .bearer_auth(&key)
                        .json(&json!({"first_name": "Ana", "email": format!("{external_id}@bench.example"),
                                      "attributes": {"credit_limit": 10000}}))
                } else {
                    http.post(format!("{base}/v1/events"))
                        .bearer_auth(&key)
                        .json(&json!({"type": "bench.first", "contact": {"external_id": external_id},
                                      "properties": {"n": n}}))
                };
                async move {
                    matches!(req.send().await, Ok(r) if r.status().is_success())
                }
            })
            .await;
        b.finish_watch(&mut row, w);
        let count = s.micros.len() as f64;
        fill(&mut row, &mut s, count, secs);
        row.target = ">= 0.6x scenario 1".into();
        row.notes = format!("{single} clients; each request names a contact never seen before");
        rows.push(row);
    }
    Ok(rows)
}

/// 7e: one CSV file of `--import-rows` new contacts (ten columns: addresses, names, locale,
/// country, two attributes, a consent), uploaded to `POST /v1/contacts/imports`, then
/// followed until the workers have written it. Wall time from the first byte sent to the
/// import's completion, and the server's peak memory meanwhile.
async fn scenario_import(b: &Bench) -> anyhow::Result<Row> {
    let rows = b.args.import_rows;
    let mut csv = Vec::with_capacity(rows as usize * 120);
    csv.extend_from_slice(
        b"external_id,email,phone,first_name,last_name,locale,country,attributes.credit_limit,attributes.plan,consents.email.marketing\n",
    );
    for n in 0..rows {
        use std::io::Write;
        writeln!(
            csv,
            "imp{n},imp{n}@bench.example,+38591{:07},Ana,Horvat,hr,HR,{},gold,opted_in",
            n % 10_000_000,
            5000 + n % 1000
        )?;
    }
    let size_mb = csv.len() as f64 / 1e6;
    let mut row = b.row(
        "7e. POST /v1/contacts/imports (CSV, new contacts)",
        "rows/s",
    );
    let w = b.watch();
    let t0 = Instant::now();
    let r = b
        .http
        .post(format!("{}/v1/contacts/imports?filename=bench.csv", b.url))
        .bearer_auth(&b.key)
        .header("content-type", "text/csv")
        .timeout(Duration::from_secs(3600))
        .body(csv)
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    if status != reqwest::StatusCode::ACCEPTED {
        bail!("the import was refused ({status}): {body}");
    }
    let stored = t0.elapsed().as_secs_f64();
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let done = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let view: Value = b
            .http
            .get(format!("{}/v1/contacts/imports/{id}", b.url))
            .bearer_auth(&b.key)
            .send()
            .await?
            .json()
            .await?;
        if !matches!(view["status"].as_str(), Some("queued" | "running")) {
            break view;
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    b.finish_watch(&mut row, w);
    let created = done["created"].as_u64().unwrap_or(0);
    row.throughput = created as f64 / wall;
    row.errors = rows - created;
    row.target = "< 60 s, RSS < 150 MB".into();
    row.met = Some(done["status"] == "completed" && wall < 60.0 && row.peak_rss_mb < 150.0);
    row.notes = format!(
        "{rows} rows, {size_mb:.0} MB; {wall:.1} s in all: upload and store {stored:.1} s, \
         write {:.1} s; status {}, created {created}",
        wall - stored,
        done["status"]
    );
    Ok(row)
}

/// Half of `--broadcast-contacts` new contacts with `attributes.half` (every 250th of them
/// also `attributes.sample`), and as many more without as bring the tenant to
/// `--broadcast-contacts`; written straight into the table (as a finished import would leave
/// them, with the consents of the API-made ones). Members of each segment.
async fn fill_contacts(b: &Bench, tenant: uuid::Uuid) -> anyhow::Result<(i64, i64)> {
    let consents: Value =
        sqlx::query_scalar("SELECT consents FROM contacts WHERE tenant_id = $1 LIMIT 1")
            .bind(tenant)
            .fetch_one(&b.db)
            .await?;
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&b.db)
        .await?;
    let target = b.args.broadcast_contacts as i64;
    let members = target / 2;
    let extra = members + (target - have - members).max(0);
    for start in (0..extra).step_by(100_000) {
        let end = (start + 100_000).min(extra);
        sqlx::query(
            "INSERT INTO contacts (tenant_id, id, external_id, phone, first_name, locale,
                                   country, attributes, consents)
             SELECT $1, gen_random_uuid(), 'b' || n, '+3859' || (20000000 + n)::text, 'Ana',
                    'hr', 'HR',
                    jsonb_build_object('half', n < $5, 'sample', n < $5 AND n % 250 = 0,
                                       'credit_limit', 10000),
                    $2
             FROM generate_series($3::bigint, $4::bigint - 1) AS n",
        )
        .bind(tenant)
        .bind(&consents)
        .bind(start)
        .bind(end)
        .bind(members)
        .execute(&b.db)
        .await?;
    }
    sqlx::query("VACUUM (ANALYZE) contacts")
        .execute(&b.db)
        .await?;
    let (half, sample): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attributes @> '{\"half\": true}'),
                count(*) FILTER (WHERE attributes @> '{\"sample\": true}')
         FROM contacts WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(&b.db)
    .await?;
    Ok((half, sample))
}

/// Creates a segment and a broadcast of the bench template to it over SMS; its id.
async fn create_broadcast(
    b: &Bench,
    name: &str,
    condition: &str,
    send_at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<String> {
    let seg: Value = b
        .post(
            "/v1/segments",
            json!({"name": name, "condition": condition}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let body = json!({"name": name, "segment": seg["id"], "template": "bench_offer",
                      "channels": ["sms"], "purpose": "marketing", "send_at": send_at,
                      "suppress_while_ticket_open": false});
    let r = b.post("/v1/broadcasts", body).send().await?;
    let status = r.status();
    let made: Value = r.json().await?;
    if !status.is_success() {
        bail!("the broadcast was refused ({status}): {made}");
    }
    Ok(made["id"].as_str().context("broadcast id")?.to_owned())
}

/// Schedules broadcast `id` and follows it: seconds from `schedule` until every member was
/// queued (the walk completed) and until none of its messages waits any more; its progress.
async fn follow_broadcast(b: &Bench, id: &str) -> anyhow::Result<(f64, f64, Value)> {
    let t0 = Instant::now();
    b.post(&format!("/v1/broadcasts/{id}/schedule"), json!({}))
        .send()
        .await?
        .error_for_status()?;
    let mut walked = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if walked.is_none() {
            // The status column, not `GET /v1/broadcasts/{id}`: its delivery stats count the
            // broadcast's messages, a load of the benchmark's own on the database it measures.
            let status: String = sqlx::query_scalar("SELECT status FROM broadcasts WHERE id = $1")
                .bind(uuid::Uuid::parse_str(id)?)
                .fetch_one(&b.db)
                .await?;
            match status.as_str() {
                "completed" => walked = Some(t0.elapsed().as_secs_f64()),
                "failed" | "cancelled" => bail!("broadcast {id} stopped: {status}"),
                _ => {}
            }
        } else {
            // One EXISTS per status, each answered from its partial index (`messages_due`,
            // `messages_leased`), which holds only the messages still waiting: a single
            // EXISTS over both statuses walked the broadcast's sent messages first, ~275 ms
            // a poll, most of a core of the database taken from the sending it measures.
            let left: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE status = 'queued' AND broadcast_id = $1)
                     OR EXISTS (SELECT 1 FROM messages WHERE status = 'sending' AND broadcast_id = $1)",
            )
            .bind(uuid::Uuid::parse_str(id)?)
            .fetch_one(&b.db)
            .await?;
            if !left {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("broadcast {id} did not finish in 30 minutes");
        }
    }
    let done = t0.elapsed().as_secs_f64();
    let view: Value = b
        .http
        .get(format!("{}/v1/broadcasts/{id}", b.url))
        .bearer_auth(&b.key)
        .send()
        .await?
        .json()
        .await?;
    Ok((walked.unwrap_or(done), done, view))
}

/// The database's limit for what a broadcast's walk writes: the rows broadcast `id` wrote
/// (each member's message as it was queued, its `message.queued` event, that event's counter
/// and the frequency-cap record), staged by page of 1,000 members in unlogged tables and
/// written again into copies of their tables (with their indexes, and the keys to contacts
/// and tenants the real tables check) from two connections, as the walk's two page writers
/// do, one statement and one commit a page. Seconds for all the pages; nothing else (no
/// segment scan, no condition, no member reads) is in it.
async fn raw_broadcast_write(b: &Bench, tenant: uuid::Uuid, id: uuid::Uuid) -> anyhow::Result<f64> {
    const TABLES: [(&str, &str, &str); 4] = [
        (
            "messages",
            "bench_raw_b_messages",
            ", FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id), FOREIGN KEY (tenant_id) REFERENCES tenants (id)",
        ),
        ("events", "bench_raw_b_events", ""),
        (
            "contact_event_counts",
            "bench_raw_b_counts",
            ", FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id)",
        ),
        (
            "marketing_sends",
            "bench_raw_b_sends",
            ", FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id)",
        ),
    ];
    let drop_all = || async {
        for (_, raw, _) in TABLES {
            sqlx::query(&format!("DROP TABLE IF EXISTS {raw}, {raw}_stage"))
                .execute(&b.db)
                .await?;
        }
        anyhow::Ok(())
    };
    drop_all().await?;
    let mut columns = HashMap::new();
    for (table, raw, keys) in TABLES {
        sqlx::query(&format!(
            "CREATE TABLE {raw} (LIKE {table} INCLUDING ALL{keys})"
        ))
        .execute(&b.db)
        .await?;
        let cols: String = sqlx::query_scalar(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
             WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
        )
        .bind(table)
        .fetch_one(&b.db)
        .await?;
        columns.insert(table, cols);
    }
    // The messages as the walk queued them (the send since changed their status), by page.
    sqlx::query(
        "CREATE UNLOGGED TABLE bench_raw_b_messages_stage AS
         SELECT m.*, (row_number() OVER (ORDER BY m.contact_id) - 1) / 1000 AS page
         FROM messages m WHERE m.tenant_id = $1 AND m.broadcast_id = $2",
    )
    .bind(tenant)
    .bind(id)
    .execute(&b.db)
    .await?;
    sqlx::query(
        "UPDATE bench_raw_b_messages_stage SET status = 'queued', provider = NULL,
            provider_message_id = NULL, attempts = 0, locked_until = NULL, sent_at = NULL,
            body_text = NULL, updated_at = created_at",
    )
    .execute(&b.db)
    .await?;
    for sql in [
        "CREATE UNLOGGED TABLE bench_raw_b_events_stage AS
         SELECT e.*, s.page FROM events e JOIN bench_raw_b_messages_stage s
           ON e.tenant_id = s.tenant_id AND e.subject_type = 'message' AND e.subject_id = s.id
         WHERE e.type IN ('message.queued', 'message.suppressed')",
        "CREATE UNLOGGED TABLE bench_raw_b_counts_stage AS
         SELECT c.tenant_id, c.contact_id, c.event_type, 1::int8 AS count, c.last_at, s.page
         FROM contact_event_counts c JOIN bench_raw_b_messages_stage s
           ON c.tenant_id = s.tenant_id AND c.contact_id = s.contact_id
         WHERE c.event_type IN ('message.queued', 'message.suppressed')",
        "CREATE UNLOGGED TABLE bench_raw_b_sends_stage AS
         SELECT ms.*, s.page FROM marketing_sends ms JOIN bench_raw_b_messages_stage s
           ON ms.tenant_id = s.tenant_id AND ms.contact_id = s.contact_id AND ms.message_id = s.id",
    ] {
        sqlx::query(sql).execute(&b.db).await?;
    }
    for (_, raw, _) in TABLES {
        sqlx::query(&format!("CREATE INDEX ON {raw}_stage (page)"))
            .execute(&b.db)
            .await?;
        sqlx::query(&format!("ANALYZE {raw}_stage"))
            .execute(&b.db)
            .await?;
    }
    let pages: i64 =
        sqlx::query_scalar("SELECT coalesce(max(page) + 1, 0) FROM bench_raw_b_messages_stage")
            .fetch_one(&b.db)
            .await?;
    let insert = |table: &str, raw: &str| {
        let cols = &columns[table];
        format!("INSERT INTO {raw} ({cols}) SELECT {cols} FROM {raw}_stage WHERE page = $1")
    };
    let sql = Arc::new(format!(
        "WITH m AS ({}), e AS ({}), c AS ({} ORDER BY contact_id, event_type
            ON CONFLICT (tenant_id, contact_id, event_type)
            DO UPDATE SET count = bench_raw_b_counts.count + excluded.count,
                          last_at = greatest(bench_raw_b_counts.last_at, excluded.last_at))
         {}",
        insert("messages", "bench_raw_b_messages"),
        insert("events", "bench_raw_b_events"),
        insert("contact_event_counts", "bench_raw_b_counts"),
        insert("marketing_sends", "bench_raw_b_sends"),
    ));
    let (_, pool) = b.raw_clients(2).await?;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..2 {
        let (pool, next, sql) = (pool.clone(), next.clone(), sql.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let page = next.fetch_add(1, Ordering::Relaxed) as i64;
                if page >= pages {
                    return anyhow::Ok(());
                }
                sqlx::query(&sql).bind(page).execute(&pool).await?;
            }
        }));
    }
    for w in writers {
        w.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    pool.close().await;
    drop_all().await?;
    Ok(secs)
}

/// Scenario 8: one broadcast over SMS to half of a 1,000,000-contact tenant, with single
/// events posted while it runs; then a small one on a channel capped at 100 a second.
async fn scenario_broadcast(b: &Bench) -> anyhow::Result<Vec<Row>> {
    use_stub(b).await?;
    let tenant = b.tenant_id().await?;
    let (members, sampled) = fill_contacts(b, tenant).await?;
    b.http
        .put(format!("{}/v1/templates/bench_offer", b.url))
        .bearer_auth(&b.key)
        .json(&json!({"purpose": "marketing",
                      "sms": {"hr": {"text": "Ponuda za {{ contact.external_id }}: 0% kamata"}}}))
        .send()
        .await?
        .error_for_status()?;
    settle(b).await?;
    let lead = b.args.broadcast_lead;
    let send_at = chrono::Utc::now() + chrono::Duration::milliseconds((lead * 1000.0) as i64);
    let id = create_broadcast(b, "Half", "contact.attributes.half == true", send_at).await?;
    b.stub.reset();
    let w = b.watch();
    // Single events while the broadcast walks and sends.
    let http = b.http.clone();
    let url = format!("{}/v1/events", b.url);
    let key = b.key.clone();
    let bodies: Arc<Vec<Value>> = Arc::new(
        (0..20_000)
            .map(|n| b.event_body(n, "bench.viewed"))
            .collect(),
    );
    let rate = b.args.broadcast_ingest_rate;
    let ingest_for = 3.0 * b.args.duration;
    let ingest = b.open_loop(rate, ingest_for, move |n| {
        let req = http
            .post(&url)
            .bearer_auth(&key)
            .json(&bodies[n as usize % bodies.len()]);
        async move {
            req.send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::ACCEPTED)
        }
    });
    let (followed, (mut samples, ingest_secs)) = tokio::join!(follow_broadcast(b, &id), ingest);
    let (walked, done, view) = followed?;
    let mut walk = b.row(
        "8a. broadcast: schedule -> every member queued",
        "messages/s",
    );
    b.finish_watch(&mut walk, w);
    let stats = &view["stats"];
    let queued = stats["queued"].as_i64().unwrap_or(0);
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE broadcast_id = $1 AND status = 'sent'",
    )
    .bind(uuid::Uuid::parse_str(&id)?)
    .fetch_one(&b.db)
    .await?;
    let requests = b.stub.requests.load(Ordering::Relaxed);
    let distinct = b.stub.seen.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
    let duplicates = requests.saturating_sub(distinct);
    walk.throughput = queued as f64 / walked;
    walk.errors = (members - queued).max(0) as u64;
    walk.target = format!("{members} queued < 30 s, RSS < 150 MB");
    walk.met = Some(queued == members && walked < 30.0 && walk.peak_rss_mb < 150.0);
    // After the send, so that it does not share the cores with it.
    let raw = raw_broadcast_write(b, tenant, uuid::Uuid::parse_str(&id)?).await?;
    walk.db_limit = Some(queued as f64 / raw);
    walk.ratio = Some(raw / walked);
    walk.notes = format!(
        "{} contacts, {members} members: walk {walked:.1} s; scanned {}, targeted {}, \
         queued {queued}, suppressed {}; db_limit = the same rows written again into copies \
         of their tables, a page of 1,000 a statement from 2 connections: {raw:.1} s",
        b.args.broadcast_contacts, stats["scanned"], stats["targeted"], stats["suppressed"]
    );
    let mut send = b.row("8b. broadcast: send_at -> every message sent", "messages/s");
    // Sending starts at send_at (with the walk still going, if it is late).
    let sending = done - lead;
    send.throughput = sent as f64 / sending.max(1e-3);
    send.peak_rss_mb = walk.peak_rss_mb;
    send.cpu_pct = walk.cpu_pct;
    send.errors = (members - sent).max(0) as u64;
    send.target = ">= 5,000/s, zero duplicates".into();
    send.met = Some(send.throughput >= 5000.0 && duplicates == 0 && sent == members);
    send.notes = format!(
        "{sent} of {members} sent in {sending:.1} s from send_at ({lead:.0} s after schedule; \
         all sent {done:.1} s after); stub requests {requests}, duplicates {duplicates}"
    );
    let mut during = b.row("8c. POST /v1/events during the broadcast", "events/s");
    let count = samples.micros.len() as f64;
    fill(&mut during, &mut samples, count, ingest_secs);
    during.target = "p99 < 25 ms".into();
    during.met = Some(during.p99_ms < 25.0 && during.errors == 0);
    during.notes = format!("open loop at {rate}/s for {ingest_for:.0} s from `schedule`");
    // 8d: the channel capped at 100 a second; the busiest second the stub saw.
    let mut paced = b.row(
        "8d. broadcast on a channel at max_per_second 100",
        "messages/s",
    );
    b.http
        .put(format!("{}/v1/channels/sms", b.url))
        .bearer_auth(&b.key)
        .json(&json!({"provider": "twilio",
            "settings": {"account_sid": "ACbench", "from": "+15005550006", "base_url": b.stub.url,
                         "max_per_second": 100},
            "secrets": {"auth_token": "bench"}}))
        .send()
        .await?
        .error_for_status()?;
    settle(b).await?;
    let id = create_broadcast(
        b,
        "Sample",
        "contact.attributes.sample == true",
        chrono::Utc::now(),
    )
    .await?;
    b.stub.reset();
    let w = b.watch();
    let (_, done, _) = follow_broadcast(b, &id).await?;
    b.finish_watch(&mut paced, w);
    let arrivals = b
        .stub
        .arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // The most requests in any window of one second (sliding, not calendar seconds).
    let mut busiest = 0;
    let mut first = 0;
    for (i, at) in arrivals.iter().enumerate() {
        while at.duration_since(arrivals[first]) >= Duration::from_secs(1) {
            first += 1;
        }
        busiest = busiest.max(i + 1 - first);
    }
    let sending = match (arrivals.first(), arrivals.last()) {
        (Some(a), Some(z)) => z.duration_since(*a).as_secs_f64(),
        _ => 0.0,
    };
    paced.throughput = arrivals.len() as f64 / sending.max(1e-3);
    paced.errors = (sampled as u64).saturating_sub(arrivals.len() as u64);
    paced.target = "no second over 110 requests".into();
    paced.met = Some(busiest <= 110 && arrivals.len() as i64 == sampled);
    paced.notes = format!(
        "{} requests for {sampled} members over {sending:.1} s ({done:.1} s from schedule); \
         busiest second {busiest}",
        arrivals.len()
    );
    // Back to an unpaced channel for any scenario that follows.
    use_stub(b).await?;
    Ok(vec![walk, send, during, paced])
}

async fn create_campaign(b: &Bench, body: Value) -> anyhow::Result<String> {
    let c: Value = b
        .post("/v1/campaigns", body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = c["id"].as_str().context("campaign id")?.to_owned();
    b.post(&format!("/v1/campaigns/{id}/activate"), json!({}))
        .send()
        .await?
        .error_for_status()?;
    Ok(id)
}

async fn archive(b: &Bench, id: &str) -> anyhow::Result<()> {
    b.post(&format!("/v1/campaigns/{id}/archive"), json!({}))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// An event ingestion closure for the rules scenarios: `POST /v1/events` of `bodies[n]`.
fn ingest_events(
    b: &Bench,
    bodies: Vec<Value>,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
+ Clone
+ Send
+ 'static {
    let bodies = Arc::new(bodies);
    let http = b.http.clone();
    let url = format!("{}/v1/events", b.url);
    let key = b.key.clone();
    move |n: u64| {
        let req = http
            .post(&url)
            .bearer_auth(&key)
            .json(&bodies[n as usize % bodies.len()]);
        Box::pin(async move { matches!(req.send().await, Ok(r) if r.status().as_u16() == 202) })
    }
}

/// (3) target 3 as a realistic load: 20 active campaigns over ten event types, so that each
/// event triggers exactly two, one that enrols the contact and one whose `where` is false;
/// events posted open loop at half scenario 1's rate; the lag evaluation keeps behind them.
async fn scenario_rules_realistic(b: &Bench, ingestion_rate: Option<f64>) -> anyhow::Result<Row> {
    let mut row = b.row("3. rules: 20 campaigns, 2 triggered per event", "events/s");
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            create_campaign(b, json!({"name": format!("Bench realistic {i} enrols"),
                "trigger": {"event": format!("bench.real{i}")},
                "audience": "contact.attributes.available_credit / contact.attributes.credit_limit < 0.9",
                "steps": [{"type": "exit"}], "reentry": "always"}))
            .await?,
        );
        ids.push(
            create_campaign(b, json!({"name": format!("Bench realistic {i} passes"),
                "trigger": {"event": format!("bench.real{i}"), "where": "event.properties.amount > 1000.0"},
                "steps": [{"type": "exit"}], "reentry": "always"}))
            .await?,
        );
    }
    let bodies = (0..50_000)
        .map(|n| b.event_body(n, &format!("bench.real{}", n % 10)))
        .collect();
    let ingest = ingest_events(b, bodies);
    let (rate, offered) = match (b.args.realistic_rate, ingestion_rate) {
        (Some(fixed), _) => (fixed.max(1.0), "fixed by --realistic-rate"),
        (None, Some(single)) => (single / 2.0, "half of scenario 1's rate"),
        (None, None) => (2_000.0, "scenario 1 not run: 2,000/s"),
    };
    let probe = probe_rules(b, rate, &ingest, Some(&mut row)).await?;
    row.db_limit = ingestion_rate;
    row.ratio = ingestion_rate.map(|r| row.throughput / r);
    row.target = "lag p99 < 1 s at 0.5x scenario 1's rate, open loop".into();
    // Met at half scenario 1's rate or more (a fixed rate may be lower: then not met).
    row.met = Some(probe.kept_up() && ingestion_rate.is_some_and(|single| rate >= single / 2.0));
    row.notes = format!(
        "{rate:.0} events/s offered ({offered}), open loop, ten event types; latencies = age of the oldest unconsumed event; ingestion p99 {:.1} ms; db_limit = scenario 1's rate{}",
        probe.ingestion_p99_ms,
        if probe.drained { "" } else { " (NOT drained)" }
    );
    for id in ids {
        archive(b, &id).await?;
    }
    Ok(row)
}

/// (3a-3c) the stress form of target 3: ten campaigns that all enrol every event.
async fn scenario_rules(b: &Bench, ingestion_rate: Option<f64>) -> anyhow::Result<Vec<Row>> {
    let mut row = b.row(
        "3a. rules flat out (10 campaigns enrol each event)",
        "events/s",
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            create_campaign(b, json!({"name": format!("Bench rule {i}"),
                "trigger": {"event": "bench.rule", "where": format!("event.properties.amount > {i}.0")},
                "audience": "contact.attributes.available_credit / contact.attributes.credit_limit < 0.9",
                "steps": [{"type": "exit"}], "reentry": "always"}))
            .await?,
        );
    }
    let ingest = ingest_events(
        b,
        (0..50_000).map(|n| b.event_body(n, "bench.rule")).collect(),
    );

    // 3a: ingestion as fast as it goes, and how fast evaluation follows.
    let w = b.watch();
    let lag = b.sample_lag();
    let started = Instant::now();
    let (s, secs) = b
        .closed_loop(b.args.concurrency, b.args.duration, ingest.clone())
        .await;
    let ingested = s.micros.len() as f64;
    let limit = Duration::from_secs_f64(b.args.duration * 6.0 + 30.0);
    let drained = b.inbox_drained(started, limit).await?;
    let total = started.elapsed().as_secs_f64();
    let mut lag = lag.stop().await;
    b.finish_watch(&mut row, w);
    fill(&mut row, &mut lag, ingested, total);
    row.errors = s.errors;
    row.db_limit = Some(ingested / secs);
    row.ratio = Some(row.throughput / (ingested / secs));
    row.target = "none (stress: how far evaluation trails ingestion flat out)".into();
    row.notes = format!(
        "throughput = evaluated events/s until the inbox was empty{}; latencies = age of the oldest unconsumed event; db_limit = ingestion rate",
        if drained { "" } else { " (NOT drained)" }
    );

    // 3b: a steady rate below that, and the lag evaluation keeps behind it.
    let evaluated = row.throughput;
    let rate = b.args.rules_rate.unwrap_or(evaluated / 2.0).max(1.0);
    let mut steady = b.row("3b. rule evaluation at a steady rate", "events/s");
    let first = probe_rules(b, rate, &ingest, Some(&mut steady)).await?;
    steady.db_limit = Some(evaluated);
    steady.ratio = Some(steady.throughput / evaluated);
    steady.target = "none (what evaluation sustains; lag p99 < 1 s wanted)".into();
    steady.notes = format!(
        "{rate:.0} events/s offered, open loop{}; latencies = age of the oldest unconsumed event; ingestion p99 {:.1} ms; db_limit = evaluation rate of 3a{}",
        if b.args.rules_rate.is_some() {
            " (--rules-rate)"
        } else {
            " (half of 3a's evaluation rate)"
        },
        first.ingestion_p99_ms,
        if first.drained { "" } else { " (NOT drained)" }
    );
    let mut rows = vec![row, steady];

    // 3c: target 3 read as a steady rate: the highest rate at which the lag stays under a
    // second, found by bisection from 3b's probe.
    if b.args.rules_probes > 0 {
        rows.push(sustained_rate(b, evaluated, first, &ingest, ingestion_rate).await?);
    }
    for id in ids {
        archive(b, &id).await?;
    }
    Ok(rows)
}

/// One open-loop run of the rules scenario at `rate` events/s: the lag evaluation kept behind
/// it. Fills `row` (when given) with the lag's percentiles.
async fn probe_rules<F, Fut>(
    b: &Bench,
    rate: f64,
    ingest: &F,
    row: Option<&mut Row>,
) -> anyhow::Result<Probe>
where
    F: Fn(u64) -> Fut + Clone,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    settle(b).await?;
    let w = b.watch();
    let lag = b.sample_lag();
    let started = Instant::now();
    let (mut s, secs) = b.open_loop(rate, b.args.duration, ingest.clone()).await;
    let limit = Duration::from_secs_f64(b.args.duration * 3.0 + 30.0);
    let drained = b.inbox_drained(started, limit).await?;
    let mut lag = lag.stop().await;
    let lag_ms = [lag.pct(0.50), lag.pct(0.95), lag.pct(0.99)];
    if let Some(row) = row {
        b.log_latencies(&row.scenario, &s)?;
        b.finish_watch(row, w);
        fill(row, &mut lag, s.micros.len() as f64, secs);
        row.errors = s.errors;
    }
    Ok(Probe {
        rate,
        lag_ms,
        drained,
        errors: s.errors,
        ingestion_p99_ms: s.pct(0.99),
    })
}

/// What one run of [`probe_rules`] found.
#[derive(Debug, Clone, Copy)]
struct Probe {
    rate: f64,
    /// The lag's p50, p95 and p99.
    lag_ms: [f64; 3],
    drained: bool,
    errors: u64,
    ingestion_p99_ms: f64,
}

impl Probe {
    /// Evaluation kept up: every event accepted and evaluated, the lag's p99 under a second.
    fn kept_up(&self) -> bool {
        self.drained && self.errors == 0 && self.lag_ms[2] < 1000.0
    }
}

/// 3c: bisects the steady rate between the fastest rate that kept up and the slowest that did
/// not, `--rules-probes` more runs after 3b's `first`. The search starts with 1.25 times 3a's
/// flat-out evaluation rate as its (untried) upper bound, since ingestion at a steady rate
/// leaves evaluation more of the machine than ingestion flat out does.
async fn sustained_rate<F, Fut>(
    b: &Bench,
    evaluated: f64,
    first: Probe,
    ingest: &F,
    ingestion_rate: Option<f64>,
) -> anyhow::Result<Row>
where
    F: Fn(u64) -> Fut + Clone,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut row = b.row("3c. rules: fastest rate, lag p99 < 1 s", "events/s");
    let mut probes = vec![first];
    // Every probe runs between the fastest rate that kept up and the slowest that did not,
    // so the last one that kept up is the fastest.
    let mut best = first.kept_up().then_some(first);
    let mut hi = if first.kept_up() {
        (evaluated * 1.25).max(first.rate * 1.25)
    } else {
        first.rate
    };
    let w = b.watch();
    for _ in 0..b.args.rules_probes {
        if probes.last().is_some_and(|p| !p.drained) {
            // The next run would start behind: stop the search here.
            break;
        }
        let lo = best.map_or(0.0, |p| p.rate);
        let p = probe_rules(b, (lo + hi) / 2.0, ingest, None).await?;
        if p.kept_up() {
            best = Some(p);
        } else {
            hi = p.rate;
        }
        probes.push(p);
    }
    b.finish_watch(&mut row, w);
    let lo = best.map_or(0.0, |p| p.rate);
    row.throughput = lo;
    [row.p50_ms, row.p95_ms, row.p99_ms] = best.map_or([0.0; 3], |p| p.lag_ms);
    row.errors = probes.iter().map(|p| p.errors).sum();
    row.db_limit = ingestion_rate;
    row.ratio = ingestion_rate.map(|r| lo / r);
    row.met = ingestion_rate.map(|r| lo >= 0.25 * r);
    row.target = ">= 0.25x scenario 1's rate with lag p99 < 1 s (target 3c)".into();
    let tried: Vec<String> = probes
        .iter()
        .map(|p| {
            format!(
                "{:.0}/s {} ({:.0} ms{})",
                p.rate,
                if p.kept_up() {
                    "kept up"
                } else {
                    "fell behind"
                },
                p.lag_ms[2],
                if p.drained { "" } else { ", NOT drained" }
            )
        })
        .collect();
    row.notes = format!(
        "throughput = the fastest rate that kept up{}; latencies = its lag; db_limit = scenario 1's rate{}; probes of {} s, 3b's first: {}",
        if probes.iter().all(Probe::kept_up) {
            ", at least (every probe did)"
        } else {
            ""
        },
        if ingestion_rate.is_none() {
            " (not run)"
        } else {
            ""
        },
        b.args.duration,
        tried.join(", ")
    );
    Ok(row)
}

async fn use_stub(b: &Bench) -> anyhow::Result<()> {
    b.http
        .put(format!("{}/v1/channels/sms", b.url))
        .bearer_auth(&b.key)
        .json(&json!({"provider": "twilio",
            "settings": {"account_sid": "ACbench", "from": "+15005550006", "base_url": b.stub.url},
            "secrets": {"auth_token": "bench"}}))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

async fn scenario_dispatch(b: &Bench) -> anyhow::Result<Row> {
    let mut row = b.row("4. dispatch to a 10 ms Twilio stub", "messages/s");
    use_stub(b).await?;
    b.stub.reset();
    let n = b.args.dispatch_messages;
    let tenant = b.tenant_id().await?;
    // Queue the messages straight in the outbox, as committed sends would be.
    for start in (0..n).step_by(10_000) {
        let count = (n - start).min(10_000);
        let contacts: Vec<uuid::Uuid> = (start..start + count)
            .map(|i| {
                b.contacts[i % b.contacts.len()]
                    .0
                    .parse()
                    .unwrap_or_default()
            })
            .collect();
        let phones: Vec<String> = (start..start + count)
            .map(|i| b.contacts[i % b.contacts.len()].2.clone())
            .collect();
        let bodies: Vec<String> = (start..start + count)
            .map(|i| format!("bench message {i}"))
            .collect();
        sqlx::query(
            "INSERT INTO messages (tenant_id, id, contact_id, channel, purpose, recipient, body_text,
                 status, max_attempts, next_attempt_at)
             SELECT $1, uuidv7_bench, c, 'sms', 'transactional', p, b, 'held', 8, now()
             FROM (SELECT gen_random_uuid() AS uuidv7_bench, c, p, b
                   FROM unnest($2::uuid[], $3::text[], $4::text[]) AS u(c, p, b)) x",
        )
        .bind(tenant)
        .bind(&contacts)
        .bind(&phones)
        .bind(&bodies)
        .execute(&b.db)
        .await?;
    }
    let w = b.watch();
    let started = Instant::now();
    sqlx::query(
        "UPDATE messages SET status = 'queued', next_attempt_at = now() WHERE status = 'held'",
    )
    .execute(&b.db)
    .await?;
    sqlx::query("SELECT pg_notify('rapport_outbox', '')")
        .execute(&b.db)
        .await?;
    let mut rss_samples = Vec::new();
    loop {
        // EXISTS, not count(*): counting 100,000 rows five times a second took 50 ms a
        // call of the database the scenario measures.
        let left: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE status IN ('queued', 'sending'))",
        )
        .fetch_one(&b.db)
        .await?;
        rss_samples.push(proc_rss_kb(b.pid));
        if !left || started.elapsed() > Duration::from_secs(900) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    b.finish_watch(&mut row, w);
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE status = 'sent' AND body_text LIKE 'bench message %'",
    )
    .fetch_one(&b.db)
    .await?;
    let requests = b.stub.requests.load(Ordering::Relaxed);
    let distinct = b.stub.seen.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
    let duplicates = requests.saturating_sub(distinct);
    row.throughput = sent as f64 / secs;
    row.errors = (n as u64).saturating_sub(sent as u64);
    row.target = ">= 5,000/s, zero duplicates, flat memory".into();
    let rss_first = rss_samples
        .get(rss_samples.len() / 10)
        .copied()
        .unwrap_or(0) as f64
        / 1024.0;
    let rss_last = rss_samples.last().copied().unwrap_or(0) as f64 / 1024.0;
    row.met = Some(row.throughput >= 5000.0 && duplicates == 0 && sent as usize == n);
    row.notes = format!(
        "{sent} of {n} sent in {secs:.1} s; stub requests {requests}, duplicates {duplicates}; RSS {rss_first:.0} MB at 10% -> {rss_last:.0} MB at the end"
    );
    Ok(row)
}

async fn scenario_e2e(b: &Bench) -> anyhow::Result<Row> {
    let mut row = b.row("5. event -> provider (end to end)", "events/s");
    use_stub(b).await?;
    b.stub.reset();
    b.http
        .put(format!("{}/v1/templates/bench_e2e", b.url))
        .bearer_auth(&b.key)
        .json(&json!({"sms": {"hr": {"text": "e2e {{ event.properties.n }}"}}}))
        .send()
        .await?
        .error_for_status()?;
    let id = create_campaign(b, json!({"name": "Bench e2e", "trigger": {"event": "bench.e2e"},
        "steps": [{"type": "send", "template": "bench_e2e", "channels": ["sms"]}], "reentry": "always"}))
    .await?;
    let w = b.watch();
    let accepted: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let total = (b.args.e2e_rate * b.args.duration).ceil() as u64;
    let interval = Duration::from_secs_f64(1.0 / b.args.e2e_rate);
    let mut ticker = tokio::time::interval(interval);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for n in 0..total {
        ticker.tick().await;
        let req = b.post("/v1/events", b.event_body(1_000_000 + n, "bench.e2e"));
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            if let Ok(r) = req.send().await
                && r.status().as_u16() == 202
            {
                accepted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(1_000_000 + n, Instant::now());
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wait_until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < wait_until {
        if b.stub.seen.lock().unwrap_or_else(|e| e.into_inner()).len() as u64 >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    b.finish_watch(&mut row, w);
    let seen = b
        .stub
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let accepted = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut s = Samples::default();
    for (n, at) in &accepted {
        match seen.get(&format!("e2e {n}")) {
            Some((_, arrived)) => s
                .micros
                .push(arrived.saturating_duration_since(*at).as_micros() as u64),
            None => s.errors += 1,
        }
    }
    s.errors += total - accepted.len() as u64;
    let count = s.micros.len() as f64;
    fill(&mut row, &mut s, count, secs);
    row.target = "p99 < 100 ms from the 202 to the provider".into();
    row.met = Some(row.p99_ms < 100.0 && row.errors == 0);
    row.notes = format!("{} events at {} /s", total, b.args.e2e_rate);
    archive(b, &id).await?;
    Ok(row)
}

async fn scenario_reads(b: &Bench) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (name, lookup) in [
        ("6a. GET /v1/contacts/{id}", false),
        ("6b. GET /v1/contacts/lookup (card)", true),
    ] {
        let mut row = b.row(name, "requests/s");
        let paths: Arc<Vec<String>> = Arc::new(
            b.contacts
                .iter()
                .map(|c| {
                    if lookup {
                        format!(
                            "{}/v1/contacts/lookup?phone={}",
                            b.url,
                            c.2.replace('+', "%2B")
                        )
                    } else {
                        format!("{}/v1/contacts/{}", b.url, c.0)
                    }
                })
                .collect(),
        );
        // The maximum, closed loop.
        let http = b.http.clone();
        let key = b.key.clone();
        let p = paths.clone();
        let (max, max_secs) = b
            .closed_loop(b.args.concurrency, b.args.duration / 2.0, move |n| {
                let req = http
                    .get(&p[(n as usize * 7919) % p.len()])
                    .bearer_auth(&key);
                async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
            })
            .await;
        let max_rate = max.micros.len() as f64 / max_secs;
        // Half of it, open loop: latency at a load the server can carry.
        let rate = (max_rate / 2.0).max(1.0);
        let w = b.watch();
        let http = b.http.clone();
        let key = b.key.clone();
        let (mut s, secs) = b
            .open_loop(rate, b.args.duration / 2.0, |n| {
                let req = http
                    .get(&paths[(n as usize * 7919) % paths.len()])
                    .bearer_auth(&key);
                async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
            })
            .await;
        b.log_latencies(&row.scenario, &s)?;
        b.finish_watch(&mut row, w);
        let count = s.micros.len() as f64;
        fill(&mut row, &mut s, count, secs);
        row.db_limit = Some(max_rate);
        row.ratio = Some(row.throughput / max_rate);
        row.target = "p99 < 5 ms at half the maximum".into();
        row.met = Some(row.p99_ms < 5.0);
        row.notes = format!(
            "maximum {max_rate:.0}/s at concurrency {}; measured open loop at half",
            b.args.concurrency
        );
        rows.push(row);
    }
    Ok(rows)
}

fn print_table(rows: &[Row], idle_mb: f64, idle_end_mb: f64, peak_mb: f64) {
    println!();
    println!(
        "{:<38} {:>11} {:>9} {:>9} {:>9} {:>7} {:>11} {:>7} {:>8} {:>6}  target",
        "scenario",
        "throughput",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "db limit",
        "ratio",
        "RSS MB",
        "CPU%",
    );
    for r in rows {
        println!(
            "{:<38} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>11} {:>7} {:>8.0} {:>6.0}  {} [{}]",
            r.scenario,
            r.throughput,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.errors,
            r.db_limit
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "-".into()),
            r.ratio
                .map(|v| format!("{v:.2}x"))
                .unwrap_or_else(|| "-".into()),
            r.peak_rss_mb,
            r.cpu_pct,
            r.target,
            match r.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            }
        );
        if !r.notes.is_empty() {
            println!("{:<38} {}", "", r.notes);
        }
    }
    println!();
    println!(
        "server RSS: idle {idle_mb:.0} MB at start, {idle_end_mb:.0} MB idle at the end, peak {peak_mb:.0} MB (targets: < 40 MB idle, < 150 MB peak)"
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wanted: Vec<&str> = args.scenarios.split(',').map(str::trim).collect();
    let mut server = Server::start(&args).await?;
    let result = run(&args, &server, &wanted).await;
    server.stop();
    drop_database(&args, &server.db_name).await;
    result
}

async fn run(args: &Args, server: &Server, wanted: &[&str]) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_mb = proc_rss_kb(server.pid) as f64 / 1024.0;
    let overall_peak = Arc::new(AtomicU64::new(0));
    watch_peak(server.pid, overall_peak.clone());
    eprintln!(
        "rapport-bench: server pid {} at {}, idle RSS {idle_mb:.0} MB; setting up {} contacts",
        server.pid, server.url, args.contacts
    );
    if let Some(path) = &args.latency_log {
        std::fs::write(path, "scenario,start_us,latency_us\n")
            .with_context(|| format!("cannot write {path}"))?;
    }
    let bench = setup(args, server).await?;
    let mut rows = Vec::new();
    for name in wanted {
        settle(&bench).await?;
        eprintln!("rapport-bench: running {name}");
        match *name {
            "events" => rows.push(scenario_events(&bench).await?),
            "batch" => rows.push(scenario_batch(&bench).await?),
            "rules" => {
                // Target 3 is set against scenario 1's rate, when this run measured it.
                let single = rows
                    .iter()
                    .find(|r: &&Row| r.scenario.starts_with("1."))
                    .map(|r| r.throughput);
                rows.push(scenario_rules_realistic(&bench, single).await?);
                settle(&bench).await?;
                rows.extend(scenario_rules(&bench, single).await?)
            }
            "dispatch" => rows.push(scenario_dispatch(&bench).await?),
            "e2e" => rows.push(scenario_e2e(&bench).await?),
            "reads" => rows.extend(scenario_reads(&bench).await?),
            "contacts" => {
                let mut found = scenario_contacts(&bench).await?;
                // 7c and 7d are set against scenario 1's rate, when this run measured it.
                if let Some(single) = rows
                    .iter()
                    .find(|r: &&Row| r.scenario.starts_with("1."))
                    .map(|r| r.throughput)
                {
                    for row in found
                        .iter_mut()
                        .filter(|r| r.scenario.starts_with("7c") || r.scenario.starts_with("7d"))
                    {
                        row.db_limit = Some(single);
                        row.ratio = Some(row.throughput / single);
                        row.met = Some(row.throughput >= 0.6 * single);
                    }
                }
                rows.extend(found)
            }
            "import" => rows.push(scenario_import(&bench).await?),
            "broadcast" => rows.extend(scenario_broadcast(&bench).await?),
            other => bail!("unknown scenario `{other}`"),
        }
    }
    // Idle means no load and no client: close our connections, then give the server the
    // time to close its idle provider connections (10 s) and collect its allocator (every 5 s).
    drop(bench);
    tokio::time::sleep(Duration::from_secs_f64(args.idle_wait)).await;
    let idle_end_mb = proc_rss_kb(server.pid) as f64 / 1024.0;
    let peak_mb = overall_peak.load(Ordering::Relaxed) as f64 / 1024.0;
    print_table(&rows, idle_mb, idle_end_mb, peak_mb);
    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "os": std::env::consts::OS,
    });
    let out = json!({
        "machine": machine,
        "duration_secs": args.duration,
        "concurrency": args.concurrency,
        "server": {"idle_rss_mb": idle_mb, "idle_rss_end_mb": idle_end_mb, "peak_rss_mb": peak_mb},
        "scenarios": rows,
    });
    std::fs::write(&args.json, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("write {}", args.json))?;
    eprintln!("rapport-bench: results written to {}", args.json);
    Ok(())
}

/// Like pgbench, each scenario (and each part of the rules scenario) starts from vacuumed,
/// analysed tables and a fresh checkpoint, so it does not measure the autovacuum of the rows
/// the previous one left.
async fn settle(b: &Bench) -> anyhow::Result<()> {
    sqlx::query("VACUUM (ANALYZE)").execute(&b.db).await?;
    sqlx::query("CHECKPOINT").execute(&b.db).await?;
    Ok(())
}

async fn drop_database(args: &Args, name: &str) {
    let Ok(mut url) = url::Url::parse(&args.database_url) else {
        return;
    };
    url.set_path("/postgres");
    if let Ok(pool) = PgPoolOptions::new()
        .max_connections(1)
        .connect(url.as_str())
        .await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&pool)
            .await;
    }
}
