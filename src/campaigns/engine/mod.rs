//! The rule engine: consumes new events in order per contact, enrols contacts, and runs
//! journeys step by step.
//!
//! Everything about one contact happens in one transaction that holds an advisory lock on the
//! contact: its pending events (in arrival order), then its due journeys. Two events of one
//! contact never race, an enrolment and its first send commit together, and any number of
//! workers can run. Journeys are rows with a `wake_at` in clock time; a timer wake is just a
//! due row. The engine reads the time from [`crate::clock::Clock`], so tests run days of a
//! journey in milliseconds.

mod evaluate;
mod journeys;
mod round;
mod schedule;
mod steps;

use evaluate::*;
use journeys::*;
use round::*;
pub use round::{next_wake, round};
use schedule::*;
pub use steps::quiet_until;
use steps::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::cel as facts;
use super::model::{
    AgentChoice, Audience, Condition, Definition, QuietHours, Reentry, Schedule, Step,
};
use super::model::{CampaignStatus, JourneyStatus};
use super::store::journeys::{Enrolment, Journey, Pending};
use super::store::{self, RunningCampaign, parse_definition};
use crate::AppState;
use crate::contacts::model::Contact;
use crate::contacts::store as contacts;
use crate::domain::{Channel, Purpose};
use crate::domain::{TenantContext, TenantId};
use crate::error::StoreError;
use crate::events::store as events;
use crate::messages::model::{Compose, MessageStatus};
use crate::messages::store::EnqueueError;
use crate::messages::store::{self as messages, SendOptions};
use crate::support::store as support;
use crate::templates::store as templates;

/// Why a round of the engine stopped; the worker logs it and tries again next round.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A message could not be queued for a reason a retry may cure (the renderer is down).
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
}

impl From<sqlx::Error> for EngineError {
    fn from(e: sqlx::Error) -> Self {
        EngineError::Store(e.into())
    }
}

type EngineResult<T> = Result<T, EngineError>;

/// Most events consumed in one transaction (by all its contacts). With ten campaigns matching
/// each event, that is a few thousand journeys and decisions written at its commit.
const EVENTS_PER_TX: i64 = 200;
/// After this many failed evaluations an event is set aside (and logged) so it cannot block
/// the contact's later events for ever.
const MAX_FAILURES: i32 = 5;
/// How often a send held by an open ticket is looked at again (ticket events also wake it).
const HOLD_RECHECK: chrono::Duration = chrono::Duration::hours(1);

/// Campaign versions are immutable, so each is read and compiled once per process.
#[derive(Default)]
pub struct Definitions {
    cache: Mutex<HashMap<(Uuid, i32), Arc<Definition>>>,
}

impl Definitions {
    /// The definition of a campaign version, compiled.
    pub async fn get(
        &self,
        conn: &mut PgConnection,
        tenant: TenantId,
        campaign: Uuid,
        version: i32,
    ) -> EngineResult<Arc<Definition>> {
        if let Some(def) = self.lock().get(&(campaign, version)) {
            return Ok(def.clone());
        }
        let raw = store::version_definition(conn, tenant, campaign, version).await?;
        let def = Arc::new(parse_definition(raw)?);
        let mut cache = self.lock();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert((campaign, version), def.clone());
        Ok(def)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, i32), Arc<Definition>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one round of the engine did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Events consumed.
    pub events: usize,
    /// Contacts whose journeys ran.
    pub contacts: usize,
    /// Contacts enrolled by a schedule.
    pub scheduled: usize,
}

impl Round {
    pub fn is_idle(&self) -> bool {
        self.events == 0 && self.contacts == 0 && self.scheduled == 0
    }
}

/// A scheduled enrolment to look at: campaign, version, occurrence key (`birthday:2026`).
type Scheduled = (Uuid, i32, String);

/// Most contacts evaluated together in one transaction: while evaluation keeps up each has an
/// event or two waiting, and transactions of fewer contacts would spend more of their time on
/// round trips and commits than on the events.
const CONTACTS_PER_TX: usize = 200;
/// Transactions of the engine open at once (one process).
const PARALLEL_TX: usize = 2;
/// Most inbox events (and most due journeys) one round looks at.
const ROUND_SIZE: i64 = 1000;

/// Everything the steps of one contact's journeys need.
pub(super) struct Scope<'a> {
    state: &'a AppState,
    tenant: &'a TenantContext,
    contact: Contact,
    /// The contact as conditions see it (current values).
    facts: Value,
    opts: &'a SendOptions,
    now: DateTime<Utc>,
    /// Status of each running campaign (active or paused) and its current version.
    campaigns: &'a HashMap<Uuid, RunningCampaign>,
    /// The engine's own `campaign.*` events, appended together before the commit.
    emitted: Mutex<Vec<events::Emitted>>,
    /// When the contact last enrolled in each running campaign that re-enrols only after a
    /// while (`reentry: "30d"`), kept up to date as this evaluation enrols.
    last_enrolled: Mutex<HashMap<Uuid, DateTime<Utc>>>,
    /// The conditions of the segments audiences name, read once per chunk (`None`: gone).
    segments: &'a Mutex<HashMap<Uuid, Option<Condition>>>,
}

/// Who a campaign version admits, its audience resolved. The campaign's own condition is
/// borrowed (this runs for every event that fires a campaign), a segment's is shared.
pub(super) enum Gate<'d> {
    Anyone,
    Own(&'d Condition),
    Segment(Condition),
    /// The segment the audience names is gone (or its condition no longer compiles).
    NoOne,
}

impl Gate<'_> {
    pub(super) fn admits(&self, holds: impl FnOnce(&Condition) -> bool) -> bool {
        match self {
            Gate::Anyone => true,
            Gate::Own(c) => holds(c),
            Gate::Segment(c) => holds(c),
            Gate::NoOne => false,
        }
    }
}

impl Scope<'_> {
    /// The audience of `def`: its own condition, or the named segment's as it is now.
    async fn gate<'d>(
        &self,
        conn: &mut PgConnection,
        def: &'d Definition,
    ) -> EngineResult<Gate<'d>> {
        let segment = match &def.audience {
            None => return Ok(Gate::Anyone),
            Some(Audience::Condition(c)) => return Ok(Gate::Own(c)),
            Some(Audience::Segment(id)) => *id,
        };
        let condition = segment_condition(conn, self.tenant.id, self.segments, segment).await?;
        Ok(condition.map_or(Gate::NoOne, Gate::Segment))
    }

    fn last_enrolled(&self, campaign: Uuid) -> Option<DateTime<Utc>> {
        let last = self.last_enrolled.lock().unwrap_or_else(|e| e.into_inner());
        last.get(&campaign).copied()
    }

    /// Notes an enrolment made now, for the reentry checks that follow in this evaluation.
    fn enrolled(&self, campaign: Uuid) {
        let mut last = self.last_enrolled.lock().unwrap_or_else(|e| e.into_inner());
        last.insert(campaign, self.now);
    }

    /// Puts a decision about a journey on the contact's timeline (at the commit).
    fn emit(&self, kind: &'static str, properties: Value, journey: Uuid) {
        let event = events::Emitted {
            tenant: self.tenant.id,
            contact_id: self.contact.id,
            kind,
            properties,
            subject: Some(("journey", journey)),
        };
        self.emitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }
}

/// The condition of a segment an audience names, read once per chunk (`segments`); None when
/// the segment is gone or its condition no longer compiles.
pub(super) async fn segment_condition(
    conn: &mut PgConnection,
    tenant: TenantId,
    segments: &Mutex<HashMap<Uuid, Option<Condition>>>,
    segment: Uuid,
) -> EngineResult<Option<Condition>> {
    let known = {
        let cache = segments.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(&segment).cloned()
    };
    if let Some(known) = known {
        return Ok(known);
    }
    let source = store::segment_condition(conn, tenant, segment).await?;
    let compiled = source.and_then(|s| match Condition::compile(&s) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(%segment, error = %e, "a segment's condition no longer compiles");
            None
        }
    });
    segments
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(segment, compiled.clone());
    Ok(compiled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaigns::model::LocalTime;
    use chrono::NaiveTime;

    fn hours(start: &str, end: &str) -> QuietHours {
        QuietHours {
            start: LocalTime(NaiveTime::parse_from_str(start, "%H:%M").unwrap()),
            end: LocalTime(NaiveTime::parse_from_str(end, "%H:%M").unwrap()),
        }
    }

    #[test]
    fn overnight_quiet_hours_end_the_next_morning_local_time() {
        let tz: chrono_tz::Tz = "Europe/Zagreb".parse().unwrap();
        let q = hours("21:00", "08:00");
        // 22:30 in Zagreb (UTC+1 in November).
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 21, 30, 0).unwrap();
        assert_eq!(
            quiet_until(&q, tz, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 7, 0, 0).unwrap())
        );
        // 03:00 local: the same morning.
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 2, 0, 0).unwrap();
        assert_eq!(
            quiet_until(&q, tz, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 7, 0, 0).unwrap())
        );
        // Noon: not quiet.
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 11, 0, 0).unwrap();
        assert_eq!(quiet_until(&q, tz, now), None);
    }

    #[test]
    fn daytime_quiet_hours() {
        let q = hours("12:00", "14:00");
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 13, 0, 0).unwrap();
        assert_eq!(
            quiet_until(&q, chrono_tz::UTC, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 14, 0, 0).unwrap())
        );
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 14, 0, 0).unwrap();
        assert_eq!(quiet_until(&q, chrono_tz::UTC, now), None);
    }

    #[test]
    fn contact_as_of_applies_old_or_new_values() {
        let current = json!({"attributes": {"a": 3.0, "b": 1.0}, "email": "x@example.com"});
        let event = Pending {
            seq: 1,
            id: Uuid::nil(),
            kind: "contact.updated".into(),
            properties: json!({"changes": {"attributes.a": {"old": 1.0, "new": 2.0},
                                           "attributes.c": {"old": null, "new": 5.0}}}),
            occurred_at: Utc::now(),
            ordinal: 1,
            source: "rapport".into(),
            subject_id: None,
        };
        let old = contact_as_of(&current, &event, "old");
        assert_eq!(old["attributes"], json!({"a": 1.0, "b": 1.0}));
        let new = contact_as_of(&current, &event, "new");
        assert_eq!(new["attributes"], json!({"a": 2.0, "b": 1.0, "c": 5.0}));
    }
}
