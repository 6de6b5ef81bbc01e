//! Tenants (the companies using Rapport) and their API keys: the operators' admin API.

pub mod model;
pub mod routes;
pub mod store;
