//! scp-gateway: the data plane of an SCP-style API Gateway.
//!
//! The control plane renders one deployment snapshot per API (`snapshot`); the gateway
//! validates and compiles it off the request path into one immutable [`state::GatewayState`]
//! held in a single `ArcSwap`, and serves every client request through the phases of
//! [`pipeline`]. Rejections are data ([`rejection::Rejection`]) turned into responses in one
//! place.

pub mod admin;
pub mod answer_fields;
pub mod app;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod fleet;
pub mod hop_by_hop;
pub mod integration;
pub mod interned;
pub mod log_throttle;
pub mod observe;
pub mod path;
pub mod pipeline;
pub mod policy;
pub mod rejection;
pub mod reload;
pub mod request_id;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod state_db;
pub mod timer;
pub mod upstream;
pub mod worker;
