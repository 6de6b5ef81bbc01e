//! Campaigns: rules written once (a trigger, an audience, steps, exit events and policies)
//! that the worker runs for every contact they match, over the best channel each contact has.

pub mod cel;
pub mod engine;
pub mod model;
pub mod routes;
pub mod store;
