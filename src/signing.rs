//! Signed tokens for links put in messages (open pixel, click redirect, unsubscribe) and for
//! webhook URLs of providers that do not sign their callbacks. The HMAC-SHA256 key is random,
//! created once per database and shared by every process, so links survive restarts and work
//! whichever process serves them.

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::SecretBox;

type HmacSha256 = Hmac<Sha256>;

/// What the sealed link-signing key is bound to.
const LINK_KEY_AAD: &[u8] = b"service_keys/link_signing";

/// Bytes of MAC kept in a token: 128 bits.
const MAC_LEN: usize = 16;
/// purpose, tenant, subject, index, expires.
const PAYLOAD_LEN: usize = 1 + 16 + 16 + 4 + 4;

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    Open = 1,
    Click = 2,
    Unsubscribe = 3,
    Webhook = 4,
    Survey = 5,
    /// The tag of a ticket's reply address (`support+t42.<mac>@...`).
    ReplyAddress = 6,
}

impl Purpose {
    fn from_byte(b: u8) -> Option<Purpose> {
        match b {
            1 => Some(Purpose::Open),
            2 => Some(Purpose::Click),
            3 => Some(Purpose::Unsubscribe),
            4 => Some(Purpose::Webhook),
            5 => Some(Purpose::Survey),
            6 => Some(Purpose::ReplyAddress),
            _ => None,
        }
    }
}

/// A verified token's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub purpose: Purpose,
    pub tenant: Uuid,
    /// The message (nil for webhook tokens).
    pub subject: Uuid,
    /// The link index of a click token.
    pub index: u32,
    /// Unix seconds after which the token is expired; 0 for never.
    pub expires: u32,
}

impl Claims {
    /// A claim that never expires.
    pub fn new(purpose: Purpose, tenant: Uuid, subject: Uuid, index: u32) -> Claims {
        Claims {
            purpose,
            tenant,
            subject,
            index,
            expires: 0,
        }
    }

    /// Whether the token's time is up (callers decide what an expired token may still do).
    pub fn expired(&self) -> bool {
        self.expires != 0 && i64::from(self.expires) < chrono::Utc::now().timestamp()
    }
}

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(key: Vec<u8>) -> Signer {
        Signer { key }
    }

    /// The database's signing key, created on first use. With a secret key configured it is
    /// stored sealed (one stored in the clear before is sealed now), so reading the database
    /// is not enough to forge links.
    pub async fn load(pool: &PgPool, secrets: &SecretBox) -> Result<Signer, sqlx::Error> {
        let unusable = |e: crate::crypto::CryptoError| {
            sqlx::Error::Configuration(format!("the link-signing key: {e}").into())
        };
        let mut fresh = vec![0u8; 32];
        rand::rng().fill_bytes(&mut fresh);
        let (value, sealed) = if secrets.can_seal() {
            (secrets.seal(&fresh, LINK_KEY_AAD).map_err(unusable)?, true)
        } else {
            (fresh, false)
        };
        sqlx::query(
            "INSERT INTO service_keys (name, value, sealed) VALUES ('link_signing', $1, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&value)
        .bind(sealed)
        .execute(pool)
        .await?;
        let (stored, sealed): (Vec<u8>, bool) =
            sqlx::query_as("SELECT value, sealed FROM service_keys WHERE name = 'link_signing'")
                .fetch_one(pool)
                .await?;
        if sealed {
            let key = secrets.open(&stored, LINK_KEY_AAD).map_err(unusable)?;
            return Ok(Signer { key });
        }
        if secrets.can_seal() {
            let sealed = secrets.seal(&stored, LINK_KEY_AAD).map_err(unusable)?;
            sqlx::query(
                "UPDATE service_keys SET value = $1, sealed = true
                 WHERE name = 'link_signing' AND NOT sealed AND value = $2",
            )
            .bind(&sealed)
            .bind(&stored)
            .execute(pool)
            .await?;
        } else {
            tracing::warn!(
                "the link-signing key is stored in the clear: set RAPPORT_SECRET_KEY to seal it"
            );
        }
        Ok(Signer { key: stored })
    }

    /// Re-seals the stored key with the current secret key (`rapport secrets rotate`); whether
    /// it changed.
    pub async fn reseal(pool: &PgPool, secrets: &SecretBox) -> Result<bool, sqlx::Error> {
        let unusable = |e: crate::crypto::CryptoError| {
            sqlx::Error::Configuration(format!("the link-signing key: {e}").into())
        };
        let row: Option<(Vec<u8>, bool)> =
            sqlx::query_as("SELECT value, sealed FROM service_keys WHERE name = 'link_signing'")
                .fetch_optional(pool)
                .await?;
        let Some((stored, sealed)) = row else {
            return Ok(false);
        };
        let resealed = if sealed {
            secrets.reseal(&stored, LINK_KEY_AAD).map_err(unusable)?
        } else {
            Some(secrets.seal(&stored, LINK_KEY_AAD).map_err(unusable)?)
        };
        let Some(resealed) = resealed else {
            return Ok(false);
        };
        sqlx::query(
            "UPDATE service_keys SET value = $1, sealed = true
             WHERE name = 'link_signing' AND value = $2",
        )
        .bind(&resealed)
        .bind(&stored)
        .execute(pool)
        .await?;
        Ok(true)
    }

    fn mac(&self, payload: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(payload);
        mac.finalize().into_bytes()[..MAC_LEN].to_vec()
    }

    /// A URL-safe token: purpose, tenant, subject and index, with a truncated HMAC.
    pub fn token(&self, claims: Claims) -> String {
        let mut payload = Vec::with_capacity(PAYLOAD_LEN + MAC_LEN);
        payload.push(claims.purpose as u8);
        payload.extend_from_slice(claims.tenant.as_bytes());
        payload.extend_from_slice(claims.subject.as_bytes());
        payload.extend_from_slice(&claims.index.to_be_bytes());
        payload.extend_from_slice(&claims.expires.to_be_bytes());
        let mac = self.mac(&payload);
        payload.extend_from_slice(&mac);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload)
    }

    /// The claims of a genuine token of this purpose, expired or not (see [`Claims::expired`]);
    /// None for anything else.
    pub fn verify(&self, token: &str, purpose: Purpose) -> Option<Claims> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        if bytes.len() != PAYLOAD_LEN + MAC_LEN {
            return None;
        }
        let (payload, mac) = bytes.split_at(PAYLOAD_LEN);
        let expected = self.mac(payload);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(mac, expected.as_slice())) {
            return None;
        }
        let found = Purpose::from_byte(payload[0])?;
        if found != purpose {
            return None;
        }
        Some(Claims {
            purpose: found,
            tenant: Uuid::from_slice(&payload[1..17]).ok()?,
            subject: Uuid::from_slice(&payload[17..33]).ok()?,
            index: u32::from_be_bytes(payload[33..37].try_into().ok()?),
            expires: u32::from_be_bytes(payload[37..41].try_into().ok()?),
        })
    }
}

/// Bytes of MAC in a reply-address tag: 64 bits, for an address that must stay short (a
/// local part is at most 64 characters) and that can only be guessed one email at a time.
const TAG_MAC_LEN: usize = 8;

impl Signer {
    /// The tag that routes a customer's reply to ticket `number` of `tenant`: `t42.<16 hex>`,
    /// lower case, since mail systems may change the case of a local part.
    pub fn ticket_tag(&self, tenant: Uuid, number: i64) -> String {
        let mac = self.tag_mac(tenant, number);
        format!("t{number}.{}", hex::encode(mac))
    }

    fn tag_mac(&self, tenant: Uuid, number: i64) -> Vec<u8> {
        let mut payload = Vec::with_capacity(1 + 16 + 8);
        payload.push(Purpose::ReplyAddress as u8);
        payload.extend_from_slice(tenant.as_bytes());
        payload.extend_from_slice(&number.to_be_bytes());
        self.mac(&payload)[..TAG_MAC_LEN].to_vec()
    }

    /// The ticket number a genuine tag of `tenant` names; None for anything else.
    pub fn verify_ticket_tag(&self, tenant: Uuid, tag: &str) -> Option<i64> {
        let (number, mac) = tag.strip_prefix(['t', 'T'])?.split_once('.')?;
        let number: i64 = number.parse().ok()?;
        let given = hex::decode(mac.to_ascii_lowercase()).ok()?;
        let expected = self.tag_mac(tenant, number);
        bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_slice(),
            expected.as_slice(),
        ))
        .then_some(number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_tags_name_their_tenants_ticket_only() {
        let s = Signer::new(vec![1; 32]);
        let tenant = Uuid::now_v7();
        let tag = s.ticket_tag(tenant, 42);
        assert!(tag.starts_with("t42.") && tag.len() == 4 + 16, "{tag}");
        assert_eq!(s.verify_ticket_tag(tenant, &tag), Some(42));
        assert_eq!(s.verify_ticket_tag(tenant, &tag.to_uppercase()), Some(42));
        assert_eq!(s.verify_ticket_tag(Uuid::now_v7(), &tag), None);
        assert_eq!(
            s.verify_ticket_tag(tenant, &tag.replace("t42", "t43")),
            None
        );
        assert_eq!(s.verify_ticket_tag(tenant, "t42.zz"), None);
        assert_eq!(s.verify_ticket_tag(tenant, "hello"), None);
    }

    #[test]
    fn tokens_verify_only_unaltered_and_for_their_purpose() {
        let s = Signer::new(vec![1; 32]);
        let claims = Claims::new(Purpose::Click, Uuid::now_v7(), Uuid::now_v7(), 3);
        let t = s.token(claims);
        assert_eq!(s.verify(&t, Purpose::Click), Some(claims));
        assert_eq!(s.verify(&t, Purpose::Open), None);
        assert_eq!(Signer::new(vec![2; 32]).verify(&t, Purpose::Click), None);
        let mut tampered = t.clone().into_bytes();
        tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            s.verify(&String::from_utf8(tampered).unwrap(), Purpose::Click),
            None
        );
        assert_eq!(s.verify("garbage", Purpose::Click), None);
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(s in "\\PC{0,120}") {
            let _ = Signer::new(vec![1; 32]).verify(&s, Purpose::Open);
        }
    }
}
