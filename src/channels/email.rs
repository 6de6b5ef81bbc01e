//! Email over SMTP with lettre: pooled connections, STARTTLS (the default), implicit TLS or
//! plain (for local relays), `From` per tenant, and a `Message-ID` made from our message id.
//! SMTP 5xx answers are permanent failures; 4xx and connection errors are retried.

use futures::future::BoxFuture;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::http::setting;
use super::settings::Resolved;
use super::{Outbound, Provider, Receipt, SendError};

/// The domain of Rapport's `Message-ID`s: the sender address's.
pub fn sender_domain(from: Option<&str>) -> &str {
    from.and_then(|f| f.rsplit_once('@'))
        .map(|(_, d)| d.trim_end_matches('>'))
        .filter(|d| !d.is_empty())
        .unwrap_or("rapport.local")
}

/// `support@acme.example` with `tag` in its local part (`support+t42.<mac>@acme.example`);
/// None when the result would not be a valid address (a local part is at most 64 characters).
pub fn tagged_address(address: &str, tag: &str) -> Option<String> {
    let (local, domain) = address.trim().rsplit_once('@')?;
    let local = local.split_once('+').map_or(local, |(base, _)| base);
    let tagged = format!("{local}+{tag}");
    (tagged.len() <= 64 && !domain.is_empty()).then(|| format!("{tagged}@{domain}"))
}

/// The tag an address carries in its local part after `+`, if any.
pub fn address_tag(address: &str) -> Option<&str> {
    let (local, _) = address.rsplit_once('@')?;
    local.split_once('+').map(|(_, tag)| tag)
}

pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    host: String,
    port: u16,
    egress: crate::egress::EgressPolicy,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    domain: String,
}

impl Smtp {
    pub fn new(config: &Resolved, egress: crate::egress::EgressPolicy) -> Result<Smtp, String> {
        let s = &config.settings;
        let host = setting(s, "host").ok_or("smtp: host is not set")?;
        egress
            .check_host(host)
            .map_err(|m| format!("smtp: host {m}"))?;
        let security = setting(s, "security").unwrap_or("starttls");
        let default_port = match security {
            "tls" => 465,
            "none" => 25,
            _ => 587,
        };
        let port = s
            .get("port")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(default_port);
        let builder = match security {
            "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                .map_err(|e| format!("smtp: {e}"))?,
            "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
            _ => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                .map_err(|e| format!("smtp: {e}"))?,
        };
        let timeout = s
            .get("timeout_secs")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(30);
        let mut builder = builder
            .port(port)
            .timeout(Some(std::time::Duration::from_secs(timeout)));
        if let Some(user) = config.secrets.get("username") {
            let password = config.secrets.get("password").cloned().unwrap_or_default();
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        let from_address = setting(s, "from").ok_or("smtp: from is not set")?;
        let from = Mailbox::new(
            setting(s, "from_name").map(str::to_owned),
            from_address
                .parse()
                .map_err(|e| format!("smtp: from: {e}"))?,
        );
        let reply_to = setting(s, "reply_to")
            .map(|r| {
                r.parse::<Mailbox>()
                    .map_err(|e| format!("smtp: reply_to: {e}"))
            })
            .transpose()?;
        let domain = sender_domain(Some(from_address)).to_owned();
        Ok(Smtp {
            transport: builder.build(),
            host: host.to_owned(),
            port,
            egress,
            from,
            reply_to,
            domain,
        })
    }

    fn build(&self, m: &Outbound) -> Result<Message, SendError> {
        let permanent = |reason: String| SendError::Permanent { reason };
        let to: Mailbox =
            m.to.parse()
                .map_err(|e| permanent(format!("smtp: invalid recipient: {e}")))?;
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(m.subject.clone().unwrap_or_default())
            .message_id(Some(format!("<{}@{}>", m.message_id, self.domain)));
        // A mail about a ticket threads after the ticket's earlier ones, and its answer comes
        // back to the ticket's own reply address.
        let thread = |key: &str| {
            m.extras
                .get("thread")
                .and_then(|t| t.get(key))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let ticket_reply_to = thread("reply_to").and_then(|r| r.parse::<Mailbox>().ok());
        if let Some(reply_to) = ticket_reply_to.as_ref().or(self.reply_to.as_ref()) {
            builder = builder.reply_to(reply_to.clone());
        }
        if let Some(parent) = thread("in_reply_to") {
            builder = builder.in_reply_to(parent);
        }
        if let Some(references) = thread("references") {
            builder = builder.references(references);
        }
        // RFC 8058 one-click unsubscribe on marketing mail.
        if let Some(url) = m
            .extras
            .get("unsubscribe_url")
            .and_then(serde_json::Value::as_str)
        {
            let header = |name: &str, value: String| {
                HeaderName::new_from_ascii(name.to_owned())
                    .map(|n| HeaderValue::new(n, value))
                    .map_err(|e| permanent(format!("smtp: header {name}: {e}")))
            };
            builder = builder
                .raw_header(header("List-Unsubscribe", format!("<{url}>"))?)
                .raw_header(header(
                    "List-Unsubscribe-Post",
                    "List-Unsubscribe=One-Click".to_owned(),
                )?);
        }
        let built = match (&m.text, &m.html) {
            (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
                text.clone(),
                html.clone(),
            )),
            (None, Some(html)) => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(html.clone()),
            ),
            (text, None) => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(text.clone().unwrap_or_default()),
            ),
        };
        built.map_err(|e| permanent(format!("smtp: cannot build the message: {e}")))
    }
}

impl Provider for Smtp {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
        Box::pin(async move {
            let message = self.build(m)?;
            // lettre resolves the name itself: check what it resolves to now, so a relay name
            // that comes to point inside the network is refused.
            if let Err(e) = self.egress.resolve(&self.host, self.port).await {
                return Err(if e.kind() == std::io::ErrorKind::PermissionDenied {
                    SendError::Permanent {
                        reason: format!("smtp: host {e}"),
                    }
                } else {
                    tracing::info!(error = %e, host = %self.host, "smtp host not resolved");
                    SendError::Transient {
                        reason: "smtp: the host name cannot be resolved".to_owned(),
                        retry_after: None,
                    }
                });
            }
            match self.transport.send(message).await {
                Ok(_) => Ok(Receipt {
                    provider_message_id: Some(format!("<{}@{}>", m.message_id, self.domain)),
                }),
                Err(e) if e.is_permanent() => Err(SendError::Permanent {
                    reason: format!("smtp: {e}"),
                }),
                // A 4xx answer is the server's word and worth showing; a connection that failed
                // is logged for the operator and told to the tenant without its details (which
                // would tell an open port from a closed one).
                Err(e) if e.is_transient() => Err(SendError::Transient {
                    reason: format!("smtp: {e}"),
                    retry_after: None,
                }),
                Err(e) => {
                    tracing::warn!(error = %crate::error::error_chain(&e), host = %self.host, "smtp send failed");
                    Err(SendError::Transient {
                        reason: "smtp: no answer from the server (connection failed or timed out)"
                            .to_owned(),
                        retry_after: None,
                    })
                }
            }
        })
    }
}
