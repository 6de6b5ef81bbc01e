//! SMS through Twilio's Programmable Messaging API:
//! `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP Basic auth with
//! the account SID and auth token.

use futures::future::BoxFuture;
use serde::Deserialize;

use super::http::{base, classify, setting, transport_error};
use super::settings::Resolved;
use super::{Outbound, Provider, Receipt, SendError};

pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";

pub struct Twilio {
    http: reqwest::Client,
    base_url: String,
    account_sid: String,
    auth_token: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    status_callback_url: Option<String>,
}

impl Twilio {
    pub fn new(http: reqwest::Client, config: &Resolved) -> Result<Twilio, String> {
        let s = &config.settings;
        Ok(Twilio {
            http,
            base_url: base(setting(s, "base_url").unwrap_or(DEFAULT_BASE_URL)),
            account_sid: setting(s, "account_sid")
                .ok_or("twilio: account_sid is not set")?
                .to_owned(),
            auth_token: config
                .secrets
                .get("auth_token")
                .ok_or("twilio: auth_token is not set")?
                .clone(),
            from: setting(s, "from").map(str::to_owned),
            messaging_service_sid: setting(s, "messaging_service_sid").map(str::to_owned),
            status_callback_url: setting(s, "status_callback_url").map(str::to_owned),
        })
    }
}

#[derive(Deserialize)]
struct Created {
    sid: String,
}

#[derive(Deserialize)]
struct TwilioError {
    code: Option<i64>,
    message: Option<String>,
}

impl Provider for Twilio {
    fn name(&self) -> &'static str {
        "twilio"
    }

    fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
        Box::pin(async move {
            let body = m.text.as_deref().unwrap_or_default();
            let mut form: Vec<(&str, &str)> = vec![("To", m.to.as_str()), ("Body", body)];
            match (&self.messaging_service_sid, &self.from) {
                (Some(sid), _) => form.push(("MessagingServiceSid", sid)),
                (None, Some(from)) => form.push(("From", from)),
                (None, None) => {
                    return Err(SendError::Permanent {
                        reason: "twilio: neither from nor messaging_service_sid is set".into(),
                    });
                }
            }
            if let Some(cb) = &self.status_callback_url {
                form.push(("StatusCallback", cb));
            }
            let url = format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                self.base_url, self.account_sid
            );
            let response = self
                .http
                .post(&url)
                .basic_auth(&self.account_sid, Some(&self.auth_token))
                // The same token on every attempt of one message, so that a retry after a
                // lost answer can be recognised as the same request.
                .header("I-Twilio-Idempotency-Token", m.message_id.to_string())
                .form(&form)
                .send()
                .await
                .map_err(|e| transport_error("twilio", &e))?;
            let status = response.status();
            let headers = response.headers().clone();
            let text = response
                .text()
                .await
                .map_err(|e| transport_error("twilio", &e))?;
            if status.is_success() {
                let created: Created =
                    serde_json::from_str(&text).map_err(|e| SendError::Transient {
                        reason: format!("twilio: unreadable answer: {e}"),
                        retry_after: None,
                    })?;
                return Ok(Receipt {
                    provider_message_id: Some(created.sid),
                });
            }
            let reason = match serde_json::from_str::<TwilioError>(&text) {
                Ok(TwilioError {
                    code: Some(code),
                    message,
                }) => {
                    format!("twilio {code}: {}", message.unwrap_or_default())
                }
                _ => format!("twilio: HTTP {status}"),
            };
            Err(classify(status, &headers, reason))
        })
    }
}
