//! Delivery receipts from providers (`routes`): each authenticated, each moving a message
//! forward only.

pub mod routes;
