//! Contacts: a tenant's customers, their addresses, attributes, consents and counters.

pub mod export;
pub mod import;
pub mod model;
pub mod routes;
pub mod store;
pub mod writer;
