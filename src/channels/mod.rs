//! Channels: the one trait boundary of the system, because providers are the one thing tests
//! replace. Each provider is a file; [`Channels`] picks the provider that sends a message.

pub mod log;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use uuid::Uuid;

use crate::contacts::model::Channel as ChannelKind;
use crate::tenancy::TenantId;

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
}

/// A message provider.
pub trait Provider: Send + Sync {
    /// The provider's name, recorded on each message (`log`, `twilio`...).
    fn name(&self) -> &'static str;

    /// Hands the message to the provider.
    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>>;
}

/// Chooses the provider of a tenant's channel. With nothing configured, the `log` provider
/// "sends" everything, so the service runs with no credentials.
#[derive(Clone)]
pub struct Channels {
    default: Arc<dyn Provider>,
}

impl Channels {
    /// Every channel through `default`.
    pub fn new(default: Arc<dyn Provider>) -> Channels {
        Channels { default }
    }

    /// The provider that sends `channel` messages of `tenant`.
    pub fn provider(&self, _tenant: TenantId, _channel: ChannelKind) -> Arc<dyn Provider> {
        self.default.clone()
    }
}
