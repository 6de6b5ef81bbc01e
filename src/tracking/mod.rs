//! Email tracking and unsubscribe: the endpoints behind the links `messages::links` mints (an
//! open pixel, click redirects and one-click unsubscribe), each checking its signed token.

pub mod routes;
