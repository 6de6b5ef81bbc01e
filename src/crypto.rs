//! Encryption of provider secrets at rest: XChaCha20-Poly1305 with a random nonce per value
//! and the row's identity as associated data, so a ciphertext cannot be moved to another row.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// Why secrets cannot be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "no secret key is configured: set RAPPORT_SECRET_KEY to 32 random bytes in base64 \
         (for example `openssl rand -base64 32`)"
    )]
    NoKey,
    #[error("RAPPORT_SECRET_KEY must be 32 bytes in base64")]
    BadKey,
    #[error("the stored secrets cannot be decrypted with the configured key")]
    Undecryptable,
}

/// The configured key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Option<XChaCha20Poly1305>,
    bad_key: bool,
}

impl SecretBox {
    /// From the base64 key of the configuration (none: sealing fails with a clear message).
    pub fn new(key_base64: Option<&str>) -> SecretBox {
        let Some(raw) = key_base64.map(str::trim).filter(|k| !k.is_empty()) else {
            return SecretBox {
                cipher: None,
                bad_key: false,
            };
        };
        match base64::engine::general_purpose::STANDARD.decode(raw) {
            Ok(bytes) if bytes.len() == 32 => SecretBox {
                cipher: XChaCha20Poly1305::new_from_slice(&bytes).ok(),
                bad_key: false,
            },
            _ => SecretBox {
                cipher: None,
                bad_key: true,
            },
        }
    }

    fn cipher(&self) -> Result<&XChaCha20Poly1305, CryptoError> {
        match (&self.cipher, self.bad_key) {
            (Some(c), _) => Ok(c),
            (None, true) => Err(CryptoError::BadKey),
            (None, false) => Err(CryptoError::NoKey),
        }
    }

    /// nonce || ciphertext.
    pub fn seal(&self, plaintext: &[u8], associated: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.cipher()?;
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: associated,
                },
            )
            .map_err(|_| CryptoError::Undecryptable)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], associated: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.cipher()?;
        if sealed.len() < 24 {
            return Err(CryptoError::Undecryptable);
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: associated,
                },
            )
            .map_err(|_| CryptoError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_with_the_same_key_and_row() {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let b = SecretBox::new(Some(&key));
        let sealed = b.seal(b"token", b"tenant-1/sms").unwrap();
        assert_eq!(b.open(&sealed, b"tenant-1/sms").unwrap(), b"token");
        assert!(b.open(&sealed, b"tenant-2/sms").is_err());
        let other = SecretBox::new(Some(
            &base64::engine::general_purpose::STANDARD.encode([8u8; 32]),
        ));
        assert!(other.open(&sealed, b"tenant-1/sms").is_err());
        assert!(matches!(
            SecretBox::new(None).seal(b"x", b""),
            Err(CryptoError::NoKey)
        ));
        assert!(matches!(
            SecretBox::new(Some("short")).seal(b"x", b""),
            Err(CryptoError::BadKey)
        ));
    }
}
