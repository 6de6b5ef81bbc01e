//! Viber through the Viber REST bot API: `POST {base}/pa/send_message` with
//! `X-Viber-Auth-Token`. Viber answers HTTP 200 with a `status` code; 0 is success.

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::http::{base, classify, setting, transport_error};
use super::settings::Resolved;
use super::{Outbound, Provider, Receipt, SendError};

pub const DEFAULT_BASE_URL: &str = "https://chatapi.viber.com";
/// Viber's "too many requests" status: worth retrying. Every other non-zero status
/// (receiver not subscribed, bad data...) is permanent.
const RATE_LIMITED: i64 = 12;

pub struct ViberBot {
    http: reqwest::Client,
    base_url: String,
    auth_token: String,
    sender_name: String,
    sender_avatar: Option<String>,
}

impl ViberBot {
    pub fn new(http: reqwest::Client, config: &Resolved) -> Result<ViberBot, String> {
        let s = &config.settings;
        Ok(ViberBot {
            http,
            base_url: base(setting(s, "base_url").unwrap_or(DEFAULT_BASE_URL)),
            auth_token: config
                .secrets
                .get("auth_token")
                .ok_or("viber: auth_token is not set")?
                .clone(),
            sender_name: setting(s, "sender_name")
                .ok_or("viber: sender_name is not set")?
                .to_owned(),
            sender_avatar: setting(s, "sender_avatar").map(str::to_owned),
        })
    }
}

impl Provider for ViberBot {
    fn name(&self) -> &'static str {
        "viber"
    }

    fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
        Box::pin(async move {
            let mut sender = json!({"name": self.sender_name});
            if let Some(avatar) = &self.sender_avatar {
                sender["avatar"] = json!(avatar);
            }
            let mut body = json!({
                "receiver": m.to,
                "min_api_version": 1,
                "sender": sender,
                "tracking_data": m.message_id,
                "type": "text",
                "text": m.text.clone().unwrap_or_default(),
            });
            if let Some(button) = m.extras.get("button") {
                body["keyboard"] = json!({
                    "Type": "keyboard",
                    "Buttons": [{"ActionType": "open-url", "ActionBody": button.get("url"),
                                 "Text": button.get("text")}],
                });
            }
            let response = self
                .http
                .post(format!("{}/pa/send_message", self.base_url))
                .header("X-Viber-Auth-Token", &self.auth_token)
                .json(&body)
                .send()
                .await
                .map_err(|e| transport_error("viber", &e))?;
            let status = response.status();
            let headers = response.headers().clone();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                return Err(classify(status, &headers, format!("viber: HTTP {status}")));
            }
            let code = answer.get("status").and_then(Value::as_i64).unwrap_or(-1);
            let message = answer
                .get("status_message")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            match code {
                0 => Ok(Receipt {
                    provider_message_id: answer.get("message_token").map(|t| match t {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }),
                }),
                RATE_LIMITED => Err(SendError::Transient {
                    reason: format!("viber {code}: {message}"),
                    retry_after: None,
                }),
                _ => Err(SendError::Permanent {
                    reason: format!("viber {code}: {message}"),
                }),
            }
        })
    }
}
