//! The time the rule engine reads. Production reads the system clock; tests move a manual
//! clock forward, so days of a journey run in milliseconds and no test sleeps.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// A source of the current time, cheap to clone.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands still at `start` until moved with [`Clock::advance`] or [`Clock::set`].
    pub fn manual(start: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => Utc::now(),
            Some(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Moves a manual clock forward; the system clock ignores it.
    pub fn advance(&self, by: chrono::Duration) {
        if let Some(t) = &self.manual {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            *t += by;
        }
    }

    /// Sets a manual clock; the system clock ignores it.
    pub fn set(&self, to: DateTime<Utc>) {
        if let Some(t) = &self.manual {
            *t.lock().unwrap_or_else(|e| e.into_inner()) = to;
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.manual {
            None => f.write_str("Clock::system"),
            Some(_) => write!(f, "Clock::manual({})", self.now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let start = Utc::now();
        let clock = Clock::manual(start);
        assert_eq!(clock.now(), start);
        clock.advance(chrono::Duration::days(3));
        assert_eq!(clock.now(), start + chrono::Duration::days(3));
        let shared = clock.clone();
        shared.set(start);
        assert_eq!(clock.now(), start);
    }
}
