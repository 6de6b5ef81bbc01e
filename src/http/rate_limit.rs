//! Per-tenant request rates: a token bucket for each tenant, in memory, per process.
//!
//! One tenant's runaway integration must not starve the others of the API's capacity, so
//! every tenant request takes a token; a tenant out of tokens gets a 429 with `Retry-After`
//! (the time until its next token). The admin API and public paths (webhooks, tracking,
//! surveys) are not counted here. With several API processes each keeps its own buckets, so
//! the limit a tenant sees is per process. Time is the service's [`crate::clock::Clock`], so
//! tests decide when a bucket refills.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Token buckets by tenant.
pub struct RateLimiter {
    /// Tokens added a second; 0 turns limiting off.
    rate: f64,
    /// Most tokens a bucket holds.
    burst: f64,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

impl RateLimiter {
    /// `rate` requests a second with bursts of `burst` (at least `rate`); a rate of 0 lets
    /// everything through.
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(rate)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `tenant` at `now`, or says how long until one is there.
    pub fn check(&self, tenant: Uuid, now: DateTime<Utc>) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(tenant).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = (now - bucket.at).to_std().unwrap_or_default().as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = RateLimiter::new(10, 20);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let t0 = Utc::now();
        for _ in 0..20 {
            assert!(limiter.check(a, t0).is_ok());
        }
        let wait = limiter.check(a, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another tenant is not affected.
        assert!(limiter.check(b, t0).is_ok());
        // A tenth of a second later, one more token.
        let t1 = t0 + chrono::Duration::milliseconds(100);
        assert!(limiter.check(a, t1).is_ok());
        assert!(limiter.check(a, t1).is_err());
        // A clock that went back takes nothing and adds nothing.
        assert!(limiter.check(a, t0).is_err());
    }

    #[test]
    fn zero_is_off() {
        let limiter = RateLimiter::new(0, 0);
        let a = Uuid::now_v7();
        for _ in 0..10_000 {
            assert!(limiter.check(a, Utc::now()).is_ok());
        }
    }
}
