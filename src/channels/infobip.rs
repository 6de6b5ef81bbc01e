//! SMS and Viber Business Messages through Infobip: `POST {base}/sms/2/text/advanced` and
//! `POST {base}/viber/2/messages`, with `Authorization: App {api_key}`. Our message id is sent
//! as Infobip's `messageId`, so delivery reports name our message.

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::http::{base, classify, setting, transport_error};
use super::settings::Resolved;
use super::{Outbound, Provider, Receipt, SendError};

/// Longest Viber text Infobip accepts.
const VIBER_MAX_TEXT: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sms,
    Viber,
}

pub struct Infobip {
    http: reqwest::Client,
    kind: Kind,
    base_url: String,
    api_key: String,
    sender: String,
    notify_url: Option<String>,
}

impl Infobip {
    pub fn new(http: reqwest::Client, kind: Kind, config: &Resolved) -> Result<Infobip, String> {
        let s = &config.settings;
        let sender_key = if kind == Kind::Sms { "from" } else { "sender" };
        Ok(Infobip {
            http,
            kind,
            base_url: base(setting(s, "base_url").ok_or("infobip: base_url is not set")?),
            api_key: config
                .secrets
                .get("api_key")
                .ok_or("infobip: api_key is not set")?
                .clone(),
            sender: setting(s, sender_key)
                .ok_or("infobip: the sender is not set")?
                .to_owned(),
            notify_url: setting(s, "notify_url").map(str::to_owned),
        })
    }

    fn request(&self, m: &Outbound) -> Result<(String, Value), SendError> {
        // Infobip takes international numbers without the plus.
        let to = m.to.trim_start_matches('+');
        let text = m.text.clone().unwrap_or_default();
        Ok(match self.kind {
            Kind::Sms => {
                let mut message = json!({
                    "from": self.sender,
                    "destinations": [{"to": to, "messageId": m.message_id}],
                    "text": text,
                    "callbackData": m.message_id,
                });
                if let Some(url) = &self.notify_url {
                    message["notifyUrl"] = json!(url);
                }
                (
                    format!("{}/sms/2/text/advanced", self.base_url),
                    json!({"messages": [message]}),
                )
            }
            Kind::Viber => {
                // A button is sent as its link after the text (Infobip's TEXT content).
                let text = match m.extras.get("button") {
                    Some(b) => format!(
                        "{text}\n{}: {}",
                        b.get("text").and_then(Value::as_str).unwrap_or_default(),
                        b.get("url").and_then(Value::as_str).unwrap_or_default()
                    ),
                    None => text,
                };
                if text.chars().count() > VIBER_MAX_TEXT {
                    return Err(SendError::Permanent {
                        reason: format!(
                            "infobip viber: the text is longer than {VIBER_MAX_TEXT} characters"
                        ),
                    });
                }
                let mut message = json!({
                    "sender": self.sender,
                    "destinations": [{"to": to, "messageId": m.message_id}],
                    "content": {"type": "TEXT", "text": text},
                    "options": {"label": if m.marketing { "PROMOTIONAL" } else { "TRANSACTIONAL" }},
                    "callbackData": m.message_id,
                });
                if let Some(url) = &self.notify_url {
                    message["webhooks"] = json!({"delivery": {"url": url}, "seen": {"url": url}});
                }
                (
                    format!("{}/viber/2/messages", self.base_url),
                    json!({"messages": [message]}),
                )
            }
        })
    }
}

impl Provider for Infobip {
    fn name(&self) -> &'static str {
        "infobip"
    }

    fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
        Box::pin(async move {
            let (url, body) = self.request(m)?;
            let response = self
                .http
                .post(&url)
                .header("Authorization", format!("App {}", self.api_key))
                .header("Accept", "application/json")
                .json(&body)
                .send()
                .await
                .map_err(|e| transport_error("infobip", &e))?;
            let status = response.status();
            let headers = response.headers().clone();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                let text = answer
                    .pointer("/requestError/serviceException/text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("HTTP {status}"));
                return Err(classify(status, &headers, format!("infobip: {text}")));
            }
            let first = answer
                .pointer("/messages/0")
                .cloned()
                .unwrap_or(Value::Null);
            let group = first
                .pointer("/status/groupName")
                .and_then(Value::as_str)
                .unwrap_or("");
            if group == "REJECTED" {
                let why = first
                    .pointer("/status/description")
                    .and_then(Value::as_str)
                    .unwrap_or("rejected");
                return Err(SendError::Permanent {
                    reason: format!("infobip: {why}"),
                });
            }
            Ok(Receipt {
                provider_message_id: first
                    .get("messageId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| Some(m.message_id.to_string())),
            })
        })
    }
}
