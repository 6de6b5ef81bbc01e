//! Reports, computed in SQL: CSAT and support KPIs grouped by agent, country, channel or week.

pub mod routes;
pub mod store;
