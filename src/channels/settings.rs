//! Per-tenant channel settings: which provider sends a channel's messages, its settings and
//! its secrets (sealed at rest, never returned).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgConnection;
use utoipa::ToSchema;

use super::store;
use crate::crypto::SecretBox;
use crate::domain::Channel;
use crate::domain::TenantId;
use crate::error::{StoreError, StoreResult};
use crate::validate::{Errors, FieldError, Invalid};

/// What a provider takes.
pub struct ProviderSpec {
    pub channel: Channel,
    pub name: &'static str,
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
    pub secrets_required: &'static [&'static str],
    pub secrets_optional: &'static [&'static str],
}

/// What an email channel takes for customers' replies, whichever provider sends (on top of
/// each provider's own): the address replies about a ticket go to (tagged per ticket), the
/// IMAP mailbox the worker reads, and the password of the inbound webhook.
const EMAIL_INBOUND_SETTINGS: &[&str] = &[
    "reply_address",
    "imap_host",
    "imap_port",
    "imap_security",
    "imap_user",
    "imap_folder",
    "imap_processed_folder",
];
const EMAIL_INBOUND_SECRETS: &[&str] = &["inbound_secret", "imap_password"];

/// Every provider of every channel.
pub const PROVIDERS: &[ProviderSpec] = &[
    ProviderSpec {
        channel: Channel::Email,
        name: "log",
        required: &[],
        optional: &[],
        secrets_required: &[],
        secrets_optional: &[],
    },
    ProviderSpec {
        channel: Channel::Email,
        name: "smtp",
        required: &["host", "from"],
        optional: &["port", "security", "from_name", "reply_to", "timeout_secs"],
        secrets_required: &[],
        secrets_optional: &["username", "password"],
    },
    ProviderSpec {
        channel: Channel::Sms,
        name: "log",
        required: &[],
        optional: &[],
        secrets_required: &[],
        secrets_optional: &[],
    },
    ProviderSpec {
        channel: Channel::Sms,
        name: "twilio",
        required: &["account_sid"],
        optional: &[
            "from",
            "messaging_service_sid",
            "base_url",
            "status_callback_url",
        ],
        secrets_required: &["auth_token"],
        secrets_optional: &[],
    },
    ProviderSpec {
        channel: Channel::Sms,
        name: "infobip",
        required: &["base_url", "from"],
        optional: &["notify_url"],
        secrets_required: &["api_key"],
        secrets_optional: &[],
    },
    ProviderSpec {
        channel: Channel::Viber,
        name: "log",
        required: &[],
        optional: &[],
        secrets_required: &[],
        secrets_optional: &[],
    },
    ProviderSpec {
        channel: Channel::Viber,
        name: "infobip",
        required: &["base_url", "sender"],
        optional: &["notify_url"],
        secrets_required: &["api_key"],
        secrets_optional: &[],
    },
    ProviderSpec {
        channel: Channel::Viber,
        name: "viber",
        required: &["sender_name"],
        optional: &["sender_avatar", "base_url"],
        secrets_required: &["auth_token"],
        secrets_optional: &[],
    },
];

fn spec(channel: Channel, name: &str) -> Option<&'static ProviderSpec> {
    PROVIDERS
        .iter()
        .find(|p| p.channel == channel && p.name == name)
}

/// `PUT /v1/channels/{channel}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelInput {
    /// email: `smtp` or `log`; sms: `twilio`, `infobip` or `log`; viber: `infobip`, `viber` or `log`.
    #[schema(example = "twilio")]
    pub provider: String,
    #[serde(default)]
    #[schema(value_type = Object, example = json!({"account_sid": "AC123", "from": "+15005550006"}))]
    pub settings: Map<String, Value>,
    /// Kept from the previous configuration when absent and the provider is the same.
    #[schema(value_type = Option<Object>, example = json!({"auth_token": "..."}))]
    pub secrets: Option<BTreeMap<String, String>>,
}

/// A channel's configuration, without the secrets' values.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChannelConfig {
    pub channel: Channel,
    pub provider: String,
    #[schema(value_type = Object)]
    pub settings: Value,
    /// The names of the secrets that are set.
    pub secrets: Vec<String>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Where to point the provider's webhooks (delivery reports, and customers' messages: the
    /// Twilio number's "a message comes in" URL, Infobip's inbound forwarding URL, the Viber
    /// bot's `set_webhook`). Absent for providers that call nothing back.
    pub webhook_url: Option<String>,
    /// The email channel's IMAP mailbox, when `imap_host` is set: how the worker's reading goes.
    pub mailbox: Option<MailboxStatus>,
}

/// How the worker reads a tenant's IMAP mailbox.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct MailboxStatus {
    /// A worker holds the mailbox and reads it (with IDLE where the server has it).
    pub watched: bool,
    /// The end of the last round.
    pub last_polled_at: Option<DateTime<Utc>>,
    /// What went wrong in the last round (a refused login, an unreachable host, a message left
    /// unread); null when it went well.
    pub last_error: Option<String>,
    /// Messages filed from the mailbox.
    pub fetched: i64,
    /// Messages left unread: over the size limit, or not an email.
    pub skipped: i64,
}

/// A stored configuration with its secrets opened, for building a provider.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub provider: String,
    pub settings: Map<String, Value>,
    pub secrets: BTreeMap<String, String>,
    pub updated_at: DateTime<Utc>,
}

fn associated(tenant: TenantId, channel: Channel) -> Vec<u8> {
    format!("{tenant}/{}", channel.as_str()).into_bytes()
}

/// The highest `settings.max_per_second` a channel takes.
pub const MAX_RATE: f64 = 100_000.0;

/// `settings.max_per_second`, every provider's setting: the most messages a second the
/// channel sends for the tenant, across all worker processes (a Twilio long code takes 1, a
/// short code 100). None when absent or not a number in (0, [`MAX_RATE`]].
pub fn max_per_second(settings: &Map<String, Value>) -> Option<f64> {
    settings
        .get("max_per_second")
        .and_then(Value::as_f64)
        .filter(|r| *r > 0.0 && *r <= MAX_RATE)
}

/// Checks the input against the provider's spec; all errors at once.
pub fn validate(
    channel: Channel,
    input: &ChannelInput,
    egress: &crate::egress::EgressPolicy,
) -> Result<&'static ProviderSpec, Invalid> {
    let Some(spec) = spec(channel, &input.provider) else {
        let names: Vec<&str> = PROVIDERS
            .iter()
            .filter(|p| p.channel == channel)
            .map(|p| p.name)
            .collect();
        return Err(Invalid::field(
            "provider",
            format!(
                "`{}` is not a {} provider; use one of {}",
                input.provider,
                channel.as_str(),
                names.join(", ")
            ),
        ));
    };
    let mut errors = Errors::new();
    for key in spec.required {
        if !input.settings.contains_key(*key) {
            errors.add(format!("settings.{key}"), "is required");
        }
    }
    for (key, value) in &input.settings {
        let inbound = channel == Channel::Email && EMAIL_INBOUND_SETTINGS.contains(&key.as_str());
        if key == "max_per_second" {
            if max_per_second(&input.settings).is_none() {
                errors.add(
                    "settings.max_per_second",
                    format!("must be a number of messages a second above 0, at most {MAX_RATE}"),
                );
            }
            continue;
        }
        if !spec.required.contains(&key.as_str())
            && !spec.optional.contains(&key.as_str())
            && !inbound
        {
            errors.add(
                format!("settings.{key}"),
                format!("is not a setting of {}", spec.name),
            );
            continue;
        }
        let ok = match key.as_str() {
            "port" | "timeout_secs" | "imap_port" => {
                value.as_u64().is_some_and(|n| (1..=65535).contains(&n))
            }
            _ => value.as_str().is_some_and(|s| !s.trim().is_empty()),
        };
        if !ok {
            errors.add(
                format!("settings.{key}"),
                "must be a non-empty string (a port: a number)",
            );
        }
        // URLs and hosts we connect to follow the egress policy; callback URLs are called by
        // the provider, not by us.
        match (key.as_str(), value.as_str()) {
            ("base_url", Some(s)) => {
                if let Err(m) = egress.check_url(s) {
                    errors.add(format!("settings.{key}"), m);
                }
            }
            ("host" | "imap_host", Some(s)) => {
                if let Err(m) = egress.check_host(s) {
                    errors.add(format!("settings.{key}"), m);
                }
            }
            (k, Some(s))
                if k.ends_with("url")
                    && url::Url::parse(s)
                        .map(|u| !matches!(u.scheme(), "http" | "https"))
                        .unwrap_or(true) =>
            {
                errors.add(format!("settings.{key}"), "must be an http(s) URL");
            }
            _ => {}
        }
    }
    if spec.name == "smtp" {
        if let Some(s) = input.settings.get("security").and_then(Value::as_str) {
            if !matches!(s, "starttls" | "tls" | "none") {
                errors.add("settings.security", "must be starttls, tls or none");
            }
        }
        if let Some(from) = input.settings.get("from").and_then(Value::as_str) {
            if crate::validate::email(from).is_err() {
                errors.add("settings.from", "must be an email address");
            }
        }
    }
    if channel == Channel::Email {
        if let Some(s) = input.settings.get("imap_security").and_then(Value::as_str) {
            if !matches!(s, "starttls" | "tls" | "none") {
                errors.add("settings.imap_security", "must be tls, starttls or none");
            }
        }
        if let (Some("none"), Some(host)) = (
            input.settings.get("imap_security").and_then(Value::as_str),
            input.settings.get("imap_host").and_then(Value::as_str),
        ) {
            if !egress.allows_host(host) {
                errors.add(
                    "settings.imap_security",
                    "none (the password in the clear) only to a host the operator allows; use tls \
                     or starttls",
                );
            }
        }
        if input.settings.contains_key("imap_host") && !input.settings.contains_key("imap_user") {
            errors.add("settings.imap_user", "is required with imap_host");
        }
        if let Some(a) = input.settings.get("reply_address").and_then(Value::as_str) {
            if crate::validate::email(a).is_err() {
                errors.add("settings.reply_address", "must be an email address");
            } else if super::email::tagged_address(a, "t9999999999.0123456789abcdef").is_none() {
                errors.add(
                    "settings.reply_address",
                    "its local part is too long to carry a ticket tag (at most 35 characters)",
                );
            }
        }
    }
    if spec.name == "twilio"
        && !input.settings.contains_key("from")
        && !input.settings.contains_key("messaging_service_sid")
    {
        errors.add("settings.from", "give `from` or `messaging_service_sid`");
    }
    for key in input.secrets.iter().flat_map(|s| s.keys()) {
        let inbound = channel == Channel::Email && EMAIL_INBOUND_SECRETS.contains(&key.as_str());
        if !spec.secrets_required.contains(&key.as_str())
            && !spec.secrets_optional.contains(&key.as_str())
            && !inbound
        {
            errors.add(
                format!("secrets.{key}"),
                format!("is not a secret of {}", spec.name),
            );
        }
    }
    errors.finish()?;
    Ok(spec)
}

/// Stores a configuration. Secrets absent from the input are kept when the provider is the
/// same; the provider's required secrets must be set in the end.
pub async fn put(
    conn: &mut PgConnection,
    secrets_box: &SecretBox,
    egress: &crate::egress::EgressPolicy,
    tenant: TenantId,
    channel: Channel,
    input: &ChannelInput,
) -> StoreResult<ChannelConfig> {
    let spec = validate(channel, input, egress)?;
    let previous = resolve(conn, secrets_box, tenant, channel)
        .await
        .ok()
        .flatten();
    let mut secrets = match (&previous, &input.secrets) {
        (Some(p), None) if p.provider == input.provider => p.secrets.clone(),
        _ => BTreeMap::new(),
    };
    if let Some(given) = &input.secrets {
        if previous
            .as_ref()
            .is_some_and(|p| p.provider == input.provider)
        {
            secrets.extend(given.clone());
        } else {
            secrets = given.clone();
        }
    }
    let imap = input
        .settings
        .contains_key("imap_host")
        .then_some(&"imap_password");
    let missing: Vec<_> = spec
        .secrets_required
        .iter()
        .chain(imap)
        .filter(|k| !secrets.contains_key(**k))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::Invalid(Invalid(
            missing
                .iter()
                .map(|k| FieldError::new(format!("secrets.{k}"), "is required"))
                .collect(),
        )));
    }
    let sealed = if secrets.is_empty() {
        None
    } else {
        let plain = serde_json::to_vec(&secrets).map_err(|e| StoreError::Internal(e.into()))?;
        Some(
            secrets_box
                .seal(&plain, &associated(tenant, channel))
                .map_err(|e| StoreError::Rejected(e.to_string()))?,
        )
    };
    let names: Vec<String> = secrets.keys().cloned().collect();
    let updated_at = store::put(
        conn,
        tenant,
        channel,
        &input.provider,
        &input.settings,
        sealed.as_deref(),
        &names,
    )
    .await?;
    store::set_pacing(conn, tenant, channel, max_per_second(&input.settings)).await?;
    Ok(ChannelConfig {
        channel,
        provider: input.provider.clone(),
        settings: Value::Object(input.settings.clone()),
        secrets: names,
        updated_at: Some(updated_at),
        webhook_url: None,
        mailbox: None,
    })
}

/// The configuration as shown: `log` with no settings when none is stored.
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: Channel,
) -> StoreResult<ChannelConfig> {
    Ok(match store::get(conn, tenant, channel).await? {
        Some(row) => ChannelConfig {
            channel,
            mailbox: if row.settings.get("imap_host").is_some() {
                Some(store::mailbox_status(conn, tenant).await?)
            } else {
                None
            },
            provider: row.provider,
            settings: row.settings,
            secrets: row.secret_names,
            updated_at: Some(row.updated_at),
            webhook_url: None,
        },
        None => ChannelConfig {
            channel,
            provider: "log".to_owned(),
            settings: Value::Object(Map::new()),
            secrets: Vec::new(),
            updated_at: None,
            webhook_url: None,
            mailbox: None,
        },
    })
}

/// The stored configuration with its secrets opened; None when the channel uses `log`.
pub async fn resolve(
    conn: &mut PgConnection,
    secrets_box: &SecretBox,
    tenant: TenantId,
    channel: Channel,
) -> Result<Option<Resolved>, ResolveError> {
    let Some(row) = store::get(conn, tenant, channel)
        .await
        .map_err(ResolveError::Database)?
    else {
        return Ok(None);
    };
    let (provider, settings, sealed, updated_at) = (
        row.provider,
        row.settings,
        row.secrets_sealed,
        row.updated_at,
    );
    let secrets = match sealed {
        Some(bytes) => {
            let plain = secrets_box
                .open(&bytes, &associated(tenant, channel))
                .map_err(ResolveError::Crypto)?;
            serde_json::from_slice(&plain)
                .map_err(|_| ResolveError::Crypto(crate::crypto::CryptoError::Undecryptable))?
        }
        None => BTreeMap::new(),
    };
    Ok(Some(Resolved {
        provider,
        settings: settings.as_object().cloned().unwrap_or_default(),
        secrets,
        updated_at,
    }))
}

/// Why a stored configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("{0}")]
    Crypto(#[source] crate::crypto::CryptoError),
}

/// Re-seals every tenant's channel secrets with the current key (`rapport secrets rotate`),
/// opening them with the current or an old key; how many rows changed. One row that cannot be
/// opened with any configured key stops the command before anything is written.
pub async fn reseal_all(conn: &mut PgConnection, secrets_box: &SecretBox) -> anyhow::Result<u64> {
    let rows = store::sealed_for_update(conn).await?;
    let mut changed = Vec::new();
    for (tenant, channel, sealed) in rows {
        let aad = format!("{tenant}/{channel}").into_bytes();
        if let Some(resealed) = secrets_box
            .reseal(&sealed, &aad)
            .map_err(|e| anyhow::anyhow!("channel {channel} of tenant {tenant}: {e}"))?
        {
            changed.push((tenant, channel, resealed));
        }
    }
    for (tenant, channel, resealed) in &changed {
        store::reseal(conn, *tenant, channel, resealed).await?;
    }
    Ok(changed.len() as u64)
}
