//! The request policies of `request-pipeline.md` steps 4–13, one module each. Every policy
//! is compiled from the snapshot once (off the request path) and answers with its own
//! typed outcome; `pipeline.rs` composes them in the contract's order.

pub mod acl;
pub mod apikey;
pub mod client_addr;
pub mod cors;
pub mod jwt;
pub mod quota;
pub mod resource_policy;
pub mod throttle;
