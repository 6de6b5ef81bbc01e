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

/// A setting that must never be printed (a token, a key): `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A PostgreSQL URL, printed with its password replaced.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl std::ops::Deref for DatabaseUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(s: String) -> Self {
        DatabaseUrl(s)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(s: &str) -> Self {
        DatabaseUrl(s.to_owned())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::db::redact_url(&self.0))
    }
}

/// Every setting of the service. The README's configuration table lists them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// PostgreSQL URL; the database is created if it does not exist.
    pub database_url: DatabaseUrl,
    /// HTTP listen address.
    pub listen: String,
    /// Bearer token of the operators' admin API; the admin API is disabled while it is unset.
    pub admin_token: Option<Secret>,
    /// Base URL of links put in messages (surveys, tracking, unsubscribe).
    pub public_url: String,
    /// 32 random bytes in base64 that seal provider secrets at rest; required to store them.
    pub secret_key: Option<Secret>,
    /// Keys `secret_key` replaced: they still open what they sealed, until
    /// `rapport secrets rotate` has re-sealed it with `secret_key`. A list, or comma-separated.
    #[serde(deserialize_with = "list_or_commas")]
    pub secret_key_old: Vec<Secret>,
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
    /// How often an idle campaign engine looks for new events when nothing wakes it (events
    /// written by its own process ring it at once, an API process's by NOTIFY).
    pub campaign_poll_interval_ms: u64,
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
    pub metrics_token: Option<Secret>,
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
    /// What an inbound email's files may take in all, in bytes; the files beyond are listed on
    /// the ticket as dropped, and the message itself is kept.
    pub attachment_max_bytes: usize,
    /// How often the worker looks for tenants' IMAP mailboxes and reads those whose server has
    /// no IDLE; a mailbox with IDLE is read as soon as mail arrives.
    pub imap_poll_secs: u64,
    /// The largest file `POST /v1/contacts/imports` takes, in bytes.
    pub import_max_bytes: u64,
    /// How long an import upload may take, in seconds (other requests have
    /// `request_timeout_secs`).
    pub import_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/rapport".into(),
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
            campaign_poll_interval_ms: 1000,
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
            attachment_max_bytes: crate::inbound::email::DEFAULT_ATTACHMENT_MAX_BYTES,
            imap_poll_secs: 60,
            import_max_bytes: 1 << 30,
            import_timeout_secs: 3600,
            template_program: None,
        }
    }
}

/// A list, or a string of comma-separated items.
fn list_or_commas<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(items) => items.into_iter().map(T::from).collect(),
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|s| T::from(s.to_owned()))
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
        if config.db_max_connections == 0 {
            // sqlx would open a pool no request could ever take a connection from.
            return Err(Box::new(figment::Error::from(
                "db_max_connections must be at least 1".to_owned(),
            )));
        }
        if config
            .admin_token
            .as_ref()
            .map(|t| t.expose())
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
        self.admin_token.as_ref().map(|t| t.expose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret_and_no_database_password() {
        let config = Config {
            database_url: "postgres://rapport:hunter2@db:5432/rapport".into(),
            admin_token: Some("admin-token-value".into()),
            secret_key: Some("c2VjcmV0LWtleS12YWx1ZQ==".into()),
            secret_key_old: vec!["b2xkLWtleS12YWx1ZQ==".into()],
            metrics_token: Some("metrics-token-value".into()),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        for secret in [
            "hunter2",
            "admin-token-value",
            "c2VjcmV0LWtleS12YWx1ZQ==",
            "b2xkLWtleS12YWx1ZQ==",
            "metrics-token-value",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("postgres://rapport:****@db:5432/rapport"));
    }

    #[test]
    fn old_keys_read_from_a_comma_separated_string() {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(("secret_key_old", "a, b"))
            .extract()
            .unwrap();
        let keys: Vec<&str> = config.secret_key_old.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn a_pool_of_no_connections_is_refused_at_start() {
        let file = std::env::temp_dir().join(format!("rapport-config-{}.toml", std::process::id()));
        std::fs::write(&file, "db_max_connections = 0\n").unwrap();
        let loaded = Config::load(&file);
        let _ = std::fs::remove_file(&file);
        let message = loaded.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("db_max_connections must be at least 1"),
            "{message}"
        );
    }
}
