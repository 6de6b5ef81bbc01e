//! Configuration: built-in defaults <- `config/default.toml` <- `DATABASE_URL` <- `RAPPORT_*`.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// Every setting of the service. The README's configuration table lists them all.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// PostgreSQL URL; the database is created if it does not exist.
    pub database_url: String,
    /// HTTP listen address.
    pub listen: String,
    /// Bearer token of the operators' admin API; the admin API is disabled while it is unset.
    pub admin_token: Option<String>,
    /// Base URL of links put in messages (surveys, tracking, unsubscribe).
    pub public_url: String,
    /// 32 random bytes in base64 that seal provider secrets at rest; required to store them.
    pub secret_key: Option<String>,
    /// Keys `secret_key` replaced: they still open what they sealed, until
    /// `rapport secrets rotate` has re-sealed it with `secret_key`. A list, or comma-separated.
    #[serde(deserialize_with = "list_or_commas")]
    pub secret_key_old: Vec<String>,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `rapport=debug,info`.
    pub log_level: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests running longer than this are answered 503.
    pub request_timeout_secs: u64,
    /// Size of the database connection pool of one process.
    pub db_max_connections: u32,
    /// How long to wait for a database connection before failing.
    pub db_connect_timeout_secs: u64,
    /// How long `Idempotency-Key` responses are kept (at least 24 h by contract).
    pub idempotency_retention_hours: u32,
    /// How long shutdown waits for in-flight requests and jobs.
    pub shutdown_grace_secs: u64,
    /// Where the `log` provider writes the messages it "sends", one JSON line each.
    pub outbox_log: String,
    /// Messages a worker claims at once.
    pub outbox_batch_size: i64,
    /// Messages a dispatch loop sends at once.
    pub outbox_concurrency: usize,
    /// Dispatch loops per worker process, each claiming and sending its own batches.
    pub outbox_dispatchers: usize,
    /// How long a claimed message is held before another worker may take it over.
    pub outbox_lease_secs: u64,
    /// Attempts before a message is `failed`.
    pub outbox_max_attempts: i32,
    /// How often workers look for due messages when no notification wakes them.
    pub outbox_poll_interval_ms: u64,
    /// How long a provider may take to answer.
    pub outbox_send_timeout_secs: u64,
    /// Transactions that write ingested events at once (group commit; see README).
    pub ingest_writers: usize,
    /// Most events one group-commit transaction takes from waiting requests.
    pub ingest_max_group: usize,
    /// Time a client has to send a request's headers, and the longest a keep-alive
    /// connection may sit idle, in seconds.
    pub http_header_timeout_secs: u64,
    /// Connections open at once; 0 means three quarters of the file-descriptor limit.
    pub http_max_connections: usize,
    /// Requests per second one tenant's API keys may make (a token bucket); 0 turns it off.
    pub tenant_rate_limit: u32,
    /// Requests a tenant may make at once above its rate, before it gets 429s.
    pub tenant_rate_burst: u32,
    /// Hosts (names or addresses) that tenants' provider URLs and SMTP hosts may name although
    /// they are not public, or over plain http: test servers, on-premise relays. A list, or
    /// one string of comma-separated hosts (`RAPPORT_EGRESS_ALLOW_HOSTS=relay.corp,10.0.0.5`).
    #[serde(deserialize_with = "list_or_commas")]
    pub egress_allow_hosts: Vec<String>,
    /// Bearer token `/metrics` asks for; open when unset.
    pub metrics_token: Option<String>,
    /// `auto` (default): with no database URL given and nothing answering on the default
    /// address, start a private PostgreSQL from the installed server binaries (data in
    /// `var/pgdata`); `always`; or `never`.
    pub embedded_postgres: crate::embedded_pg::Mode,
    /// How long one render of a tenant's template may take, in milliseconds.
    pub template_timeout_ms: u64,
    /// Address space of each process that renders templates, in MiB.
    pub template_memory_mib: u64,
    /// Processes that render templates at once; 0 means one per CPU.
    pub template_workers: usize,
    /// The `rapport` binary to run as a template renderer; this process's own when unset.
    pub template_program: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/rapport".to_owned(),
            listen: "0.0.0.0:8080".to_owned(),
            admin_token: None,
            public_url: "http://localhost:8080".to_owned(),
            secret_key: None,
            secret_key_old: Vec::new(),
            log_format: LogFormat::Text,
            log_level: "info,sqlx=warn".to_owned(),
            max_body_bytes: 2 * 1024 * 1024,
            request_timeout_secs: 30,
            db_max_connections: 20,
            db_connect_timeout_secs: 5,
            idempotency_retention_hours: 24,
            shutdown_grace_secs: 20,
            outbox_log: "var/outbox.jsonl".to_owned(),
            outbox_batch_size: 100,
            outbox_concurrency: 100,
            outbox_dispatchers: 4,
            outbox_lease_secs: 60,
            outbox_max_attempts: 8,
            outbox_poll_interval_ms: 1000,
            outbox_send_timeout_secs: 30,
            ingest_writers: 4,
            ingest_max_group: 1000,
            http_header_timeout_secs: 10,
            http_max_connections: 0,
            tenant_rate_limit: 1000,
            tenant_rate_burst: 2000,
            metrics_token: None,
            egress_allow_hosts: Vec::new(),
            embedded_postgres: crate::embedded_pg::Mode::Auto,
            template_timeout_ms: 1000,
            template_memory_mib: 256,
            template_workers: 0,
            template_program: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &crate::db::redact_url(&self.database_url))
            .field("listen", &self.listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("public_url", &self.public_url)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<set>"))
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<set>"),
            )
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .finish_non_exhaustive()
    }
}

/// A list, or a string of comma-separated items.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(items) => items,
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Config {
    /// Loads the configuration from `file` (if it exists) and the environment.
    pub fn load(file: &Path) -> Result<Config, Box<figment::Error>> {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(Env::prefixed("RAPPORT_").ignore(&["CONFIG"]));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if config
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            config.admin_token = None;
        }
        Ok(config)
    }

    /// The program that renders templates (see [`crate::templates::sandbox`]).
    pub fn template_program(&self) -> std::path::PathBuf {
        match &self.template_program {
            Some(p) => p.into(),
            None => std::env::current_exe().unwrap_or_else(|_| "rapport".into()),
        }
    }

    /// Processes that render templates at once.
    pub fn template_workers(&self) -> usize {
        match self.template_workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// The admin token, when the admin API is enabled.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }
}
