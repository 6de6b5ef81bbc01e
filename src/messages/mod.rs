//! Messages: the outbox. A message is inserted in the same transaction as the write that
//! caused it and sent by the worker (`worker::dispatch`); nothing is sent from a request.

pub mod links;
pub mod model;
pub mod routes;
pub mod store;
