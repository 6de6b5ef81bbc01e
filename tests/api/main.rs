//! The integration tests, one binary (zero2prod's layout): each module drives the real
//! PostgreSQL, every test on its own copy of a migrated template database (`common`).

mod common;

mod bench_smoke;
mod broadcasts;
mod campaigns;
mod chaos;
mod cli;
mod contacts;
mod conversations;
mod csat;
mod errors;
mod events;
mod feedback;
mod hardening;
mod idempotency;
mod imports;
mod isolation;
mod mailbox;
mod messages;
mod ops;
mod pages;
mod providers;
mod reports;
mod schema;
mod support;
mod telephony;
mod tenants;
