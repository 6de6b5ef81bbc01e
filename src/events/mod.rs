//! Events: everything that happens to a contact, sent by the tenant or emitted by Rapport.
//! The log every capability appends to; the timeline and the rule engine read it. Accepting a
//! tenant's events is `crate::ingest`.

pub mod inbox;
pub mod model;
pub mod store;
