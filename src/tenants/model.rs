//! Tenant and API-key types, and the validation of what operators send.

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, Errors, Invalid};

/// A company using Rapport; all its data is invisible to every other tenant.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    /// ISO 3166-1 alpha-2; national phone numbers are read in this country.
    pub default_country: String,
    pub default_locale: String,
    /// IANA time zone.
    pub timezone: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /admin/v1/tenants`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    #[schema(example = "Acme Credit")]
    pub name: String,
    /// Derived from the name when absent.
    #[schema(example = "acme-credit")]
    pub slug: Option<String>,
    #[schema(example = "HR")]
    pub default_country: String,
    #[schema(example = "hr")]
    pub default_locale: String,
    #[schema(example = "Europe/Zagreb")]
    pub timezone: String,
}

/// A [`NewTenant`] that passed validation, normalised.
#[derive(Debug, Clone)]
pub struct ValidTenant {
    pub name: String,
    pub slug: String,
    pub default_country: String,
    pub default_locale: String,
    pub timezone: String,
}

impl NewTenant {
    pub fn validate(&self) -> Result<ValidTenant, Invalid> {
        let mut errors = Errors::new();
        let name = errors.check("name", validate::text(&self.name, 200));
        let slug = match &self.slug {
            Some(s) => errors.check("slug", validate::slug(s)),
            None => {
                let derived = validate::slugify(&self.name);
                if derived.is_empty() && name.is_some() {
                    errors.add("slug", "cannot derive a slug from the name; give one");
                }
                Some(derived)
            }
        };
        let default_country =
            errors.check("default_country", validate::country(&self.default_country));
        let default_locale = errors.check("default_locale", validate::locale(&self.default_locale));
        let timezone = errors.check("timezone", validate::timezone(&self.timezone));
        errors.finish()?;
        match (name, slug, default_country, default_locale, timezone) {
            (
                Some(name),
                Some(slug),
                Some(default_country),
                Some(default_locale),
                Some(timezone),
            ) => Ok(ValidTenant {
                name,
                slug,
                default_country,
                default_locale,
                timezone,
            }),
            _ => Err(Invalid::field("body", "invalid tenant")),
        }
    }
}

/// An API key as listed: the secret itself is never shown again after creation.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The answer to creating a key: the only time `key` is shown.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    /// The secret key; store it now, it cannot be shown again.
    #[schema(example = "rk_live_3q2-7wEvhX0M2Jc2OQ8HcGkOQ3j0q7XgH2b7z8mS0hA")]
    pub key: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
}

/// `POST /admin/v1/tenants/{id}/api-keys`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    #[schema(example = "checkout backend")]
    pub name: String,
}

/// Prefix of every tenant API key.
pub const KEY_PREFIX: &str = "rk_live_";

/// A new API key: 32 random bytes, base64url, behind `rk_live_`.
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The SHA-256 of a key, as stored. Keys carry 256 bits of entropy, so a fast hash suffices.
pub fn hash_api_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}
