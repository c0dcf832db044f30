//! Integrations: where an admitted request goes.
//!
//! - `http`: HTTP backends (and, through a fixed connect target, PRIVATELINK endpoints);
//! - `url`: `endpoint_url` templates.

pub mod http;
pub mod url;
