//! Telephony: calls from Aircall (and, later, a provider-neutral intake), matched to contacts,
//! on the timeline, and never lost: a missed inbound call opens a call-back ticket.
//!
//! Webhooks arrive at least once and in any order, so a call is merged, never overwritten: a
//! call only moves forward (ringing, answered, ended), a fact once known is kept, and each
//! timeline event (`call.started`, `call.answered`, `call.ended`, `call.missed`) is emitted
//! once, when its fact is first learned, stamped with the call's own time. Replaying the same
//! call in order, reversed or duplicated gives the same call and the same timeline.

pub mod calls;
pub mod insight;
pub mod integrations;
pub mod model;
pub mod routes;
pub mod store;
