//! Integrations: where an admitted request goes.
//!
//! - `http`: HTTP backends: header rules, the pooled client, 502/504;
//! - `privatelink`: PRIVATELINK endpoints (the HTTP path, connected to the endpoint's target);
//! - `function`: SCF functions (event in, JSON answer out);
//! - `url`: `endpoint_url` templates.

pub mod function;
pub mod http;
pub mod privatelink;
pub mod url;
