//! The support desk: agents, tickets, their messages, and automatic assignment.

pub mod model;
pub mod notes;
pub mod notify;
pub mod routes;
pub mod store;
