//! Events: everything that happens to a contact, sent by the tenant or emitted by Rapport.
//! The timeline and the rule engine both read them.

pub mod ingest;
pub mod model;
pub mod routes;
pub mod store;
pub mod writer;
