//! Rapport: a self-hostable, multi-tenant customer-engagement backend.
//!
//! [`App::build`] connects to the database (creating it when missing) and applies migrations;
//! [`App::run_api`] serves HTTP and [`App::run_worker`] runs the background jobs, both until
//! their shutdown token is cancelled.

pub mod api;
pub mod broadcasts;
pub mod campaigns;
pub mod channels;
pub mod clock;
pub mod config;
pub mod contacts;
pub mod crypto;
pub mod csat;
pub mod db;
pub mod domain;
pub mod egress;
pub mod embedded_pg;
pub mod error;
pub mod events;
pub mod group_commit;
pub mod http;
pub mod inbound;
pub mod ingest;
pub mod jobs;
pub mod messages;
pub mod reports;
pub mod segments;
pub mod signing;
pub mod support;
pub mod telemetry;
pub mod telephony;
pub mod templates;
pub mod tenancy;
pub mod tenants;
pub mod tracking;
pub mod validate;
pub mod webhooks;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What every handler and job shares. Axum hands each extractor and middleware of a request
/// its own copy, so a copy is one reference count ([`StateFields`] holds the fields).
#[derive(Clone)]
pub struct AppState(Arc<StateFields>);

impl std::ops::Deref for AppState {
    type Target = StateFields;

    fn deref(&self) -> &StateFields {
        &self.0
    }
}

/// The fields of [`AppState`].
#[derive(Clone)]
pub struct StateFields {
    pub pool: PgPool,
    /// The process's `LISTEN` connections, apart from `pool` ([`db::listen_pool`]).
    pub listen_pool: PgPool,
    pub config: Arc<Config>,
    pub metrics: PrometheusHandle,
    /// Picks the provider of each message.
    pub channels: channels::Channels,
    /// Seals and opens provider secrets.
    pub secrets: crypto::SecretBox,
    /// Which addresses requests on tenants' behalf may reach.
    pub egress: egress::EgressPolicy,
    /// Signs links in messages and webhook URLs; loaded from the database on first use.
    pub links: Arc<LinkKeys>,
    /// The OpenAPI document, rendered once.
    pub openapi_json: Arc<String>,
    /// The time the rule engine and the rate limits read (a manual clock in tests).
    pub clock: clock::Clock,
    /// Compiled campaign versions.
    pub campaigns: Arc<campaigns::engine::Definitions>,
    /// Group commit of ingested events.
    pub events: Arc<ingest::writer::Writer>,
    /// Group commit of single contact upserts.
    pub contact_writes: Arc<contacts::writer::Writer>,
    /// The tenant behind each API key seen lately.
    pub api_keys: Arc<tenancy::KeyCache>,
    /// What erasing a contact runs besides the contacts table, one per capability.
    pub erasers: Arc<[domain::Eraser]>,
    /// Cancelled once the API has stopped serving: the tasks behind it (group-commit writers,
    /// the API-key cache's listener) finish their work and end.
    pub api_stopped: CancellationToken,
    /// The child processes that render tenants' templates.
    pub sandbox: templates::sandbox::Sandbox,
    /// Each tenant's request rate.
    pub rate_limits: Arc<http::rate_limit::RateLimiter>,
}

/// The link-signing key, loaded once from the database (at start-up by [`App::build`], so a
/// first burst of requests does not each wait for it on a second connection).
pub struct LinkKeys {
    cell: tokio::sync::OnceCell<signing::Signer>,
    secrets: crypto::SecretBox,
}

impl LinkKeys {
    pub fn new(secrets: crypto::SecretBox) -> LinkKeys {
        LinkKeys {
            cell: tokio::sync::OnceCell::new(),
            secrets,
        }
    }

    pub async fn get(&self, pool: &PgPool) -> Result<&signing::Signer, sqlx::Error> {
        self.cell
            .get_or_try_init(|| signing::Signer::load(pool, &self.secrets))
            .await
    }
}

impl AppState {
    /// What enqueueing a message needs besides the transaction.
    pub async fn send_options(&self) -> Result<messages::store::SendOptions, sqlx::Error> {
        Ok(messages::store::SendOptions {
            max_attempts: self.config.outbox_max_attempts,
            public_url: self.config.public_url.trim_end_matches('/').to_owned(),
            signer: self.links.get(&self.pool).await?.clone(),
            sandbox: self.sandbox.clone(),
        })
    }
}

/// A configured, migrated application.
#[derive(Clone)]
pub struct App {
    pub state: AppState,
}

impl App {
    /// Connects (creating the database when missing) and applies pending migrations.
    pub async fn build(config: Config) -> Result<App, db::StartupError> {
        let pool = db::connect(
            &config.database_url,
            config.db_max_connections,
            Duration::from_secs(config.db_connect_timeout_secs),
        )
        .await?;
        db::migrate(&pool, &config.database_url).await?;
        let app = App::from_pool(pool, config);
        app.state
            .secrets
            .check()
            .map_err(|e| db::StartupError::Secrets(e.to_string()))?;
        app.state
            .links
            .get(&app.state.pool)
            .await
            .map_err(|e| db::StartupError::Secrets(e.to_string()))?;
        Ok(app)
    }

    /// An application on an existing, migrated pool (tests use this).
    pub fn from_pool(pool: PgPool, config: Config) -> App {
        let old_keys: Vec<&str> = config.secret_key_old.iter().map(|k| k.expose()).collect();
        let secrets = crypto::SecretBox::with_old_keys(
            config.secret_key.as_ref().map(|k| k.expose()),
            &old_keys,
        );
        let links = Arc::new(LinkKeys::new(secrets.clone()));
        let egress = egress::EgressPolicy::new(&config.egress_allow_hosts);
        let channels = channels::Channels::new(
            std::sync::Arc::new(channels::log::LogProvider::new(&config.outbox_log)),
            secrets.clone(),
            egress.clone(),
            Duration::from_secs(config.outbox_send_timeout_secs),
            channels::Callbacks {
                public_url: config.public_url.trim_end_matches('/').to_owned(),
                links: links.clone(),
            },
        );
        let openapi_json = api::openapi()
            .to_pretty_json()
            .unwrap_or_else(|_| "{}".to_owned());
        let api_stopped = CancellationToken::new();
        // The API keys' listener, and a worker's (`worker::wake`).
        let listen_pool = db::listen_pool(&pool, 2);
        let events = Arc::new(ingest::writer::Writer::new(
            pool.clone(),
            config.ingest_writers,
            config.ingest_max_group,
            api_stopped.clone(),
        ));
        let contact_writes = Arc::new(contacts::writer::Writer::new(
            pool.clone(),
            config.ingest_writers,
            api_stopped.clone(),
        ));
        let sandbox = templates::sandbox::Sandbox::new(
            config.template_program(),
            templates::sandbox::Limits {
                timeout: Duration::from_millis(config.template_timeout_ms),
                memory_mib: config.template_memory_mib,
                workers: config.template_workers(),
            },
        );
        App {
            state: AppState(Arc::new(StateFields {
                egress,
                rate_limits: Arc::new(http::rate_limit::RateLimiter::new(
                    config.tenant_rate_limit,
                    config.tenant_rate_burst,
                )),
                sandbox,
                erasers: Arc::new([
                    |c, t, id| Box::pin(events::store::erase_contact(c, t, id)),
                    |c, t, id| Box::pin(campaigns::store::journeys::erase_contact(c, t, id)),
                    |c, t, id| Box::pin(messages::store::erase_contact(c, t, id)),
                    |c, t, id| Box::pin(support::store::erase_contact(c, t, id)),
                    |c, t, id| Box::pin(csat::store::erase_contact(c, t, id)),
                    |c, t, id| Box::pin(telephony::store::erase_contact(c, t, id)),
                    |c, t, id| Box::pin(inbound::store::erase_contact(c, t, id)),
                ]),
                events,
                contact_writes,
                api_keys: Arc::new(tenancy::KeyCache::new(
                    listen_pool.clone(),
                    api_stopped.clone(),
                )),
                api_stopped,
                listen_pool,
                pool,
                config: Arc::new(config),
                metrics: telemetry::metrics_handle(),
                channels,
                secrets,
                links,
                openapi_json: Arc::new(openapi_json),
                clock: clock::Clock::system(),
                campaigns: Arc::new(campaigns::engine::Definitions::default()),
            })),
        }
    }

    /// The same application with other providers (tests replace them with local servers).
    pub fn with_channels(mut self, channels: channels::Channels) -> App {
        Arc::make_mut(&mut self.state.0).channels = channels;
        self
    }

    /// The same application reading the time from `clock` (tests move a manual clock).
    pub fn with_clock(mut self, clock: clock::Clock) -> App {
        Arc::make_mut(&mut self.state.0).clock = clock;
        self
    }

    /// The HTTP application, for serving or for driving in-process.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves HTTP on `listener` until `shutdown` is cancelled, then lets in-flight requests
    /// finish (up to the configured grace period). See [`http::server`] for the limits.
    pub async fn run_api(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let config = &self.state.config;
        let limits = http::server::EdgeLimits {
            header_read_timeout: Duration::from_secs(config.http_header_timeout_secs.max(1)),
            max_connections: match config.http_max_connections {
                0 => http::server::default_max_connections(),
                n => n,
            },
            grace: Duration::from_secs(config.shutdown_grace_secs),
        };
        let served = http::server::serve(listener, self.router(), limits, shutdown).await;
        self.state.api_stopped.cancel();
        served
    }

    /// Runs the background jobs until `shutdown` is cancelled.
    pub async fn run_worker(&self, shutdown: CancellationToken) {
        worker::run(self.state.clone(), shutdown).await;
    }
}
