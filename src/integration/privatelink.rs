//! PRIVATELINK integration (`snapshot.md`, "privatelink_endpoints"): the request for
//! `endpoint_url` is sent to the endpoint's `target` address. The URI is rewritten to the
//! target (so connections are made to, and pooled by, the target), the `Host` header keeps
//! the URL's authority, and for `https` the TLS server name (SNI and certificate check) is
//! the URL's host, through a client kept per (target, server name).

use std::sync::Arc;

use dashmap::DashMap;
use http::header::{HeaderMap, HeaderValue, HOST};
use http::uri::{Authority, Scheme, Uri};

use super::http::{client, HttpClient};
use crate::config::UpstreamConfig;
use crate::rejection::Rejection;
use crate::snapshot::compile::PrivateLinkTarget;

pub struct PrivateLinkClients {
    upstream: UpstreamConfig,
    tls: Arc<rustls::ClientConfig>,
    https: DashMap<(String, String), HttpClient>,
}

impl PrivateLinkClients {
    pub fn new(upstream: UpstreamConfig, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            upstream,
            tls,
            https: DashMap::new(),
        }
    }

    /// Rewrites a request for `url` to go to the endpoint's target. Returns the client to
    /// send it with and the rewritten URI; sets `Host` to the URL's authority.
    pub fn route(
        &self,
        plain: &HttpClient,
        url: &Uri,
        endpoint: &PrivateLinkTarget,
        headers: &mut HeaderMap,
    ) -> Result<(HttpClient, Uri), Rejection> {
        let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
            return Err(Rejection::IntegrationFailure);
        };
        let target = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.port)
        } else {
            format!("{}:{}", endpoint.host, endpoint.port)
        };
        let target: Authority = target.parse().map_err(|_| Rejection::IntegrationFailure)?;
        let mut parts = url.clone().into_parts();
        parts.authority = Some(target.clone());
        let uri = Uri::from_parts(parts).map_err(|_| Rejection::IntegrationFailure)?;
        headers.insert(
            HOST,
            HeaderValue::from_str(authority.as_str()).map_err(|_| Rejection::IntegrationFailure)?,
        );
        if *scheme != Scheme::HTTPS {
            return Ok((plain.clone(), uri));
        }
        let name = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let key = (target.to_string(), name.clone());
        if let Some(c) = self.https.get(&key) {
            return Ok((c.clone(), uri));
        }
        let server_name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|_| Rejection::IntegrationFailure)?;
        let c = client(&self.upstream, &self.tls, Some(server_name));
        self.https.insert(key, c.clone());
        Ok((c, uri))
    }
}
