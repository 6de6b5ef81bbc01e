//! Message templates: per-channel, per-locale variants rendered with minijinja.

pub mod defaults;
pub mod model;
pub mod render;
pub mod routes;
pub mod sandbox;
pub mod store;
