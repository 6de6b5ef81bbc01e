//! Channels: the one trait boundary of the system, because providers are the one thing tests
//! replace. Each provider is a file; [`Channels`] picks the provider that sends a message.

pub mod email;
pub mod http;
pub mod infobip;
pub mod log;
pub mod routes;
pub mod settings;
pub mod store;
pub mod twilio;
pub mod viber;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use futures::future::BoxFuture;
use serde::Serialize;
use uuid::Uuid;

use crate::crypto::SecretBox;
use crate::domain::Channel as ChannelKind;
use crate::domain::TenantId;

/// A rendered message, ready for a provider.
#[derive(Debug, Clone, Serialize)]
pub struct Outbound {
    pub tenant_id: TenantId,
    pub message_id: Uuid,
    pub channel: ChannelKind,
    /// Email address, E.164 number or Viber user id.
    pub to: String,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub extras: serde_json::Value,
    /// Sent to providers that deduplicate, so a retry after a crash is not a second message.
    pub idempotency_key: String,
    pub marketing: bool,
}

/// A provider accepted the message.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub provider_message_id: Option<String>,
}

/// Why a provider did not accept a message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: timeouts, connection errors, 429 and 5xx.
    #[error("{reason}")]
    Transient {
        reason: String,
        /// The provider's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: an invalid number, a rejected request.
    #[error("{reason}")]
    Permanent { reason: String },
    /// The provider asked us to slow down (429): the channel waits, and the message is tried
    /// again without spending one of its attempts.
    #[error("{reason}")]
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// A message provider.
pub trait Provider: Send + Sync {
    /// The provider's name, recorded on each message (`log`, `twilio`...).
    fn name(&self) -> &'static str;

    /// Hands the message to the provider.
    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>>;
}

/// Chooses the provider of a tenant's channel from its stored settings; with nothing
/// configured, the `log` provider "sends" everything, so the service runs with no credentials.
/// Built providers are cached until their settings change (an SMTP pool is kept, not rebuilt
/// per message).
#[derive(Clone)]
pub struct Channels {
    inner: Arc<Inner>,
}

/// Where providers send delivery receipts: the defaults of `status_callback_url` (Twilio) and
/// `notify_url` (Infobip) when the tenant's settings give none.
#[derive(Clone)]
pub struct Callbacks {
    pub public_url: String,
    pub links: Arc<crate::LinkKeys>,
}

/// Where a provider sends a tenant's delivery reports and customers' messages: Twilio's status
/// callbacks and inbound SMS, Infobip's reports and inbound SMS and Viber messages (a signed
/// token in the URL: Infobip signs nothing), the Viber bot's callbacks, and for email the raw
/// MIME webhook (HTTP Basic with the channel's `inbound_secret`). None for providers that call
/// nothing back.
pub fn webhook_url(
    public_url: &str,
    signer: &crate::signing::Signer,
    tenant: TenantId,
    channel: ChannelKind,
    provider: &str,
) -> Option<String> {
    let public_url = public_url.trim_end_matches('/');
    let base = format!("{public_url}/webhooks/{provider}/{tenant}");
    match provider {
        // Mail comes in as raw MIME, whoever sends it out.
        _ if channel == ChannelKind::Email => Some(format!("{public_url}/webhooks/email/{tenant}")),
        "twilio" | "viber" => Some(base),
        "infobip" => {
            let token = signer.token(crate::signing::Claims::new(
                crate::signing::Purpose::Webhook,
                tenant.0,
                uuid::Uuid::nil(),
                0,
            ));
            Some(format!("{base}?token={token}"))
        }
        _ => None,
    }
}

type CacheKey = (TenantId, ChannelKind);
/// A built provider and the `updated_at` of the settings it was built from.
type CacheEntry = (DateTime<Utc>, Arc<dyn Provider>);

struct Inner {
    callbacks: Option<Callbacks>,
    fixed: Option<Arc<dyn Provider>>,
    log: Arc<dyn Provider>,
    http: reqwest::Client,
    secrets: SecretBox,
    egress: crate::egress::EgressPolicy,
    cache: Mutex<HashMap<CacheKey, CacheEntry>>,
}

impl Channels {
    /// Providers from each tenant's settings; `log` where none are stored.
    pub fn new(
        log: Arc<dyn Provider>,
        secrets: SecretBox,
        egress: crate::egress::EgressPolicy,
        send_timeout: Duration,
        callbacks: Callbacks,
    ) -> Channels {
        let http = crate::egress::client_builder(&egress)
            .timeout(send_timeout)
            .connect_timeout(Duration::from_secs(10))
            // A blast opens hundreds of connections to a provider; reused while the blast
            // lasts, they are closed (with their buffers) soon after it.
            .pool_idle_timeout(Duration::from_secs(10))
            .user_agent(concat!("rapport/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Channels {
            inner: Arc::new(Inner {
                callbacks: Some(callbacks),
                fixed: None,
                log,
                http,
                secrets,
                egress,
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Every message of every tenant through `provider` (tests replace providers this way).
    pub fn fixed(provider: Arc<dyn Provider>) -> Channels {
        Channels {
            inner: Arc::new(Inner {
                callbacks: None,
                fixed: Some(provider.clone()),
                log: provider,
                http: reqwest::Client::new(),
                secrets: SecretBox::new(None),
                egress: crate::egress::EgressPolicy::default(),
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The provider that sends `channel` messages of `tenant`. A configuration that cannot be
    /// used (undecryptable secrets...) is a transient error: the message waits for a fix.
    pub async fn provider(
        &self,
        pool: &PgPool,
        tenant: TenantId,
        channel: ChannelKind,
    ) -> Result<Arc<dyn Provider>, SendError> {
        if let Some(fixed) = &self.inner.fixed {
            return Ok(fixed.clone());
        }
        let unusable = |reason: String| SendError::Transient {
            reason: format!(
                "the {} channel's configuration cannot be used: {reason}",
                channel.as_str()
            ),
            retry_after: None,
        };
        let mut conn = pool.acquire().await.map_err(|e| unusable(e.to_string()))?;
        let resolved = settings::resolve(&mut conn, &self.inner.secrets, tenant, channel)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        let Some(mut config) = resolved else {
            return Ok(self.inner.log.clone());
        };
        if config.provider == "log" {
            return Ok(self.inner.log.clone());
        }
        let key = (tenant, channel);
        if let Ok(cache) = self.inner.cache.lock() {
            if let Some((at, provider)) = cache.get(&key) {
                if *at == config.updated_at {
                    return Ok(provider.clone());
                }
            }
        }
        if let Some(cb) = &self.inner.callbacks {
            let signer = cb
                .links
                .get(pool)
                .await
                .map_err(|e| unusable(e.to_string()))?;
            let url = webhook_url(&cb.public_url, signer, tenant, channel, &config.provider);
            match (config.provider.as_str(), url) {
                ("twilio", Some(url)) => {
                    config
                        .settings
                        .entry("status_callback_url")
                        .or_insert_with(|| serde_json::Value::String(url));
                }
                ("infobip", Some(url)) => {
                    config
                        .settings
                        .entry("notify_url")
                        .or_insert_with(|| serde_json::Value::String(url));
                }
                _ => {}
            }
        }
        // Settings saved before the policy, or under a looser one, are checked again here;
        // names are checked once more at each connection.
        if let Some(url) = config.settings.get("base_url").and_then(|v| v.as_str()) {
            self.inner
                .egress
                .check_url(url)
                .map_err(|m| unusable(format!("base_url {m}")))?;
        }
        let http = self.inner.http.clone();
        let built: Arc<dyn Provider> = match (channel, config.provider.as_str()) {
            (ChannelKind::Email, "smtp") => {
                Arc::new(email::Smtp::new(&config, self.inner.egress.clone()).map_err(unusable)?)
            }
            (ChannelKind::Sms, "twilio") => {
                Arc::new(twilio::Twilio::new(http, &config).map_err(unusable)?)
            }
            (ChannelKind::Sms, "infobip") => Arc::new(
                infobip::Infobip::new(http, infobip::Kind::Sms, &config).map_err(unusable)?,
            ),
            (ChannelKind::Viber, "infobip") => Arc::new(
                infobip::Infobip::new(http, infobip::Kind::Viber, &config).map_err(unusable)?,
            ),
            (ChannelKind::Viber, "viber") => {
                Arc::new(viber::ViberBot::new(http, &config).map_err(unusable)?)
            }
            (_, other) => return Err(unusable(format!("unknown provider `{other}`"))),
        };
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.insert(key, (config.updated_at, built.clone()));
        }
        Ok(built)
    }
}
