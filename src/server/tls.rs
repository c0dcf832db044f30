//! TLS listeners (rustls): a certificate per SNI host name (custom domains), ALPN `h2` and
//! `http/1.1`, and certificates re-read on SIGHUP without touching open connections (a
//! handshake uses the certificates current at its start).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{CertificateConfig, TlsListenerConfig};

/// Certificates by lowercase server name (`*.example.com` for wildcards); the first
/// certificate of the listener answers clients that send no (or an unknown) name.
#[derive(Debug, Default)]
struct Certs {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

fn load_one(c: &CertificateConfig, key_prefix: &str) -> Result<Arc<CertifiedKey>, String> {
    let read = |p: &Path, field: &str| {
        std::fs::read(p)
            .map_err(|e| format!("config key `{key_prefix}.{field}` ({}): {e}", p.display()))
    };
    let cert_pem = read(&c.cert, "cert")?;
    let key_pem = read(&c.key, "key")?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("config key `{key_prefix}.cert`: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "config key `{key_prefix}.cert`: no PEM certificate in {}",
            c.cert.display()
        ));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("config key `{key_prefix}.key`: {e}"))?
        .ok_or_else(|| {
            format!(
                "config key `{key_prefix}.key`: no PEM private key in {}",
                c.key.display()
            )
        })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("config key `{key_prefix}.key`: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

fn load(listener: &TlsListenerConfig, index: usize) -> Result<Certs, String> {
    let mut certs = Certs::default();
    for (j, c) in listener.certificates.iter().enumerate() {
        let prefix = format!("server.tls[{index}].certificates[{j}]");
        let ck = load_one(c, &prefix)?;
        for name in &c.server_names {
            certs.by_name.insert(
                name.trim().trim_end_matches('.').to_ascii_lowercase(),
                ck.clone(),
            );
        }
        certs.default.get_or_insert(ck);
    }
    if certs.default.is_none() {
        return Err(format!(
            "config key `server.tls[{index}].certificates`: at least one certificate is needed"
        ));
    }
    Ok(certs)
}

/// The certificates of one TLS listener, swappable as a whole.
#[derive(Debug)]
pub struct CertStore {
    config: TlsListenerConfig,
    index: usize,
    current: ArcSwap<Certs>,
}

impl CertStore {
    pub fn load(config: &TlsListenerConfig, index: usize) -> Result<Arc<Self>, String> {
        let certs = load(config, index)?;
        Ok(Arc::new(Self {
            config: config.clone(),
            index,
            current: ArcSwap::from_pointee(certs),
        }))
    }

    /// Re-reads the certificate files; on any error the current certificates stay.
    pub fn reload(&self) -> Result<(), String> {
        let certs = load(&self.config, self.index)?;
        self.current.store(Arc::new(certs));
        Ok(())
    }

    /// The rustls server configuration of the listener (ALPN h2, http/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.current.load();
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            if let Some(c) = certs.by_name.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(c) = certs.by_name.get(&format!("*.{parent}")) {
                    return Some(c.clone());
                }
            }
        }
        certs.default.clone()
    }
}
