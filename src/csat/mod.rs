//! Customer satisfaction: ratings from Rapport's own survey page and from outside tools, and
//! alerts to the agent on a low score.

pub mod routes;
pub mod store;
