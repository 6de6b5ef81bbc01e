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
    #[error("RAPPORT_SECRET_KEY (and each RAPPORT_SECRET_KEY_OLD) must be 32 bytes in base64")]
    BadKey,
    #[error(
        "the stored secrets cannot be decrypted with the configured key (nor with \
         RAPPORT_SECRET_KEY_OLD): set the key they were sealed with"
    )]
    Undecryptable,
}

/// The configured key, and the keys it replaced (which still open, never seal).
#[derive(Clone)]
pub struct SecretBox {
    cipher: Option<XChaCha20Poly1305>,
    bad_key: bool,
    old: Vec<XChaCha20Poly1305>,
}

fn cipher_from(key_base64: &str) -> Result<XChaCha20Poly1305, CryptoError> {
    match base64::engine::general_purpose::STANDARD.decode(key_base64.trim()) {
        Ok(bytes) if bytes.len() == 32 => {
            XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| CryptoError::BadKey)
        }
        _ => Err(CryptoError::BadKey),
    }
}

impl SecretBox {
    /// From the base64 key of the configuration (none: sealing fails with a clear message).
    pub fn new(key_base64: Option<&str>) -> SecretBox {
        SecretBox::with_old_keys(key_base64, &[])
    }

    /// The current key and older ones: secrets sealed with an old key still open, so a key can
    /// be replaced and everything re-sealed (`rapport secrets rotate`) while the service runs.
    /// An old key that is not 32 bytes in base64 is a configuration error at start-up
    /// ([`SecretBox::check`]).
    pub fn with_old_keys(key_base64: Option<&str>, old: &[&str]) -> SecretBox {
        let old_ciphers: Vec<_> = old
            .iter()
            .filter(|k| !k.trim().is_empty())
            .map(|k| cipher_from(k))
            .collect();
        let bad_old = old_ciphers.iter().any(Result::is_err);
        let old = old_ciphers.into_iter().filter_map(Result::ok).collect();
        let Some(raw) = key_base64.map(str::trim).filter(|k| !k.is_empty()) else {
            return SecretBox {
                cipher: None,
                bad_key: bad_old,
                old,
            };
        };
        match cipher_from(raw) {
            Ok(c) => SecretBox {
                cipher: Some(c),
                bad_key: bad_old,
                old,
            },
            Err(_) => SecretBox {
                cipher: None,
                bad_key: true,
                old,
            },
        }
    }

    /// A configured key that is not 32 bytes in base64 (the current or an old one).
    pub fn check(&self) -> Result<(), CryptoError> {
        if self.bad_key {
            return Err(CryptoError::BadKey);
        }
        Ok(())
    }

    /// Whether a current key is configured, so that secrets can be sealed.
    pub fn can_seal(&self) -> bool {
        self.cipher.is_some()
    }

    fn cipher(&self) -> Result<&XChaCha20Poly1305, CryptoError> {
        match (&self.cipher, self.bad_key) {
            (Some(c), _) => Ok(c),
            (None, true) => Err(CryptoError::BadKey),
            (None, false) => Err(CryptoError::NoKey),
        }
    }

    /// Opens `sealed` with the current key or an old one, and seals it again with the current
    /// key; `None` when it was sealed with the current key already.
    pub fn reseal(&self, sealed: &[u8], associated: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        let current = self.cipher()?;
        if open_with(current, sealed, associated).is_ok() {
            return Ok(None);
        }
        let plain = self.open(sealed, associated)?;
        self.seal(&plain, associated).map(Some)
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

    /// Opens with the current key, else with each old key in turn.
    pub fn open(&self, sealed: &[u8], associated: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let current = self.cipher.as_ref().into_iter();
        let mut any = false;
        for cipher in current.chain(self.old.iter()) {
            any = true;
            if let Ok(plain) = open_with(cipher, sealed, associated) {
                return Ok(plain);
            }
        }
        if !any {
            self.cipher()?;
        }
        Err(CryptoError::Undecryptable)
    }
}

fn open_with(
    cipher: &XChaCha20Poly1305,
    sealed: &[u8],
    associated: &[u8],
) -> Result<Vec<u8>, CryptoError> {
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

    #[test]
    fn old_keys_open_and_reseal_moves_to_the_new_key() {
        let old = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let new = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let sealed = SecretBox::new(Some(&old)).seal(b"token", b"row").unwrap();
        let rotated = SecretBox::with_old_keys(Some(&new), &[old.as_str()]);
        assert_eq!(rotated.open(&sealed, b"row").unwrap(), b"token");
        let resealed = rotated.reseal(&sealed, b"row").unwrap().unwrap();
        assert_eq!(
            SecretBox::new(Some(&new)).open(&resealed, b"row").unwrap(),
            b"token"
        );
        assert!(SecretBox::new(Some(&old)).open(&resealed, b"row").is_err());
        assert_eq!(rotated.reseal(&resealed, b"row").unwrap(), None);
        assert!(
            SecretBox::with_old_keys(Some(&new), &["short"])
                .check()
                .is_err()
        );
    }
}
