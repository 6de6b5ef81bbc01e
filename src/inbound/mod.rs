//! Customers' messages coming in: an SMS, a Viber message or an email, once per provider
//! message id (an email's Message-ID). Each is matched to a contact (an unknown sender becomes one), then either
//! changes consent (a `STOP` or `START` keyword, with the tenant's own words) or joins the
//! conversation: the contact's latest ticket on that channel, reopened when solved, or a new
//! one (acknowledged and assigned like any other). Every one emits `message.received` on the
//! contact's timeline. The providers' webhooks (`crate::webhooks`) parse and authenticate;
//! this folder decides.

pub mod email;
pub mod imap;
pub mod model;
pub mod receive;
pub mod routes;
pub mod store;
