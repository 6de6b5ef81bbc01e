//! The `log` provider: writes each message as one JSON line to a file instead of sending it.
//! The default when no provider is configured, so `rapport serve` runs and "sends" with no
//! credentials; the file shows exactly what would have gone out.

use std::path::PathBuf;

use futures::future::BoxFuture;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Outbound, Provider, Receipt, SendError};

/// Appends messages to a JSON-lines file.
pub struct LogProvider {
    path: PathBuf,
    file: Mutex<Option<tokio::fs::File>>,
}

impl LogProvider {
    pub fn new(path: impl Into<PathBuf>) -> LogProvider {
        LogProvider {
            path: path.into(),
            file: Mutex::new(None),
        }
    }

    async fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir).await?;
            }
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            *guard = Some(file);
        }
        let file = guard
            .as_mut()
            .ok_or_else(|| std::io::Error::other("log file not open"))?;
        file.write_all(line).await?;
        file.flush().await
    }
}

impl Provider for LogProvider {
    fn name(&self) -> &'static str {
        "log"
    }

    fn send<'a>(&'a self, m: &'a Outbound) -> BoxFuture<'a, Result<Receipt, SendError>> {
        Box::pin(async move {
            let record = json!({
                "at": chrono::Utc::now(),
                "tenant_id": m.tenant_id,
                "message_id": m.message_id,
                "channel": m.channel,
                "to": m.to,
                "subject": m.subject,
                "text": m.text,
                "html": m.html,
                "extras": m.extras,
                "marketing": m.marketing,
                "idempotency_key": m.idempotency_key,
            });
            let mut line = record.to_string().into_bytes();
            line.push(b'\n');
            self.append(&line).await.map_err(|e| SendError::Transient {
                reason: format!("cannot write {}: {e}", self.path.display()),
                retry_after: None,
            })?;
            Ok(Receipt {
                provider_message_id: Some(format!("log-{}", m.message_id)),
            })
        })
    }
}
