//! The HTTP edge's building blocks, shared by every capability's routes: extractors that answer
//! problem+json, pagination, idempotency keys, the problem responses the OpenAPI document lists,
//! the per-tenant rate limit, running a transaction PostgreSQL ended again, the operational
//! endpoints and the server itself. The router that puts the capabilities together is
//! `crate::api`, one level up.

pub mod extract;
pub mod idempotency;
pub mod ops;
pub mod pages;
pub mod pagination;
pub mod problems;
pub mod rate_limit;
pub mod retry;
pub mod server;
