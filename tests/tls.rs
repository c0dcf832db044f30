//! Issue 6 (listeners): TLS with a certificate per SNI name, ALPN h2 and http/1.1, and
//! certificates re-read on SIGHUP without dropping open connections.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ca {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// A leaf certificate for `name`, written as PEM files; returns its DER.
fn leaf(ca: &Ca, name: &str, dir: &std::path::Path, file: &str) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap();
    std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    cert.der().clone()
}

fn connector(ca: &Ca, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn connect(
    addr: std::net::SocketAddr,
    ca: &Ca,
    sni: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector(ca, alpn)
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

fn peer_cert(
    s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_certificates_alpn_and_reload() {
    let b = Backend::start("b").await;
    let authority = ca();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    let cert_a = leaf(&authority, "a.test", dir.path(), "a");
    let cert_b = leaf(&authority, "b.test", dir.path(), "b");
    let doc = SnapshotBuilder::new("api1", &["a.test", "b.test"])
        .resource("/items", &[("GET", &b.url("/items"))])
        .build();
    write_json(&dir.path().join("snapshots/api1.json"), &doc);
    let p = |f: &str| dir.path().join(f);
    let toml = format!(
        "[[server.tls]]\nlisten = \"127.0.0.1:0\"\n[[server.tls.certificates]]\nserver_names = [\"a.test\"]\ncert = {:?}\nkey = {:?}\n[[server.tls.certificates]]\nserver_names = [\"b.test\"]\ncert = {:?}\nkey = {:?}\n",
        p("a.crt"),
        p("a.key"),
        p("b.crt"),
        p("b.key")
    );
    let gw = Gateway::start_with_args(dir, &toml, &[]);
    let tls = gw.tls_addr.expect("a TLS listener");

    // Two names, two certificates.
    assert_eq!(
        peer_cert(&connect(tls, &authority, "a.test", b"h2").await),
        cert_a
    );
    assert_eq!(
        peer_cert(&connect(tls, &authority, "b.test", b"h2").await),
        cert_b
    );

    // HTTP/2 through TLS (ALPN h2).
    let stream = connect(tls, &authority, "a.test", b"h2").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = |uri: &str| {
        http::Request::builder()
            .uri(uri)
            .version(http::Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let r = h2
        .send_request(get("https://a.test/prod/items"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    r.into_body().collect().await.unwrap();
    assert_eq!(b.last().headers["x-forwarded-proto"], "https");

    // HTTP/1.1 through TLS.
    let stream = connect(tls, &authority, "b.test", b"http/1.1").await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/prod/items")
        .header("host", "b.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(h1.send_request(req).await.unwrap().status(), 200);

    // New certificate files + SIGHUP: new handshakes get the new certificate, the open
    // HTTP/2 connection keeps working.
    let new_a = leaf(&authority, "a.test", gw.dir.path(), "a");
    assert_ne!(new_a, cert_a);
    gw.signal("HUP");
    let mut renewed = false;
    for _ in 0..50 {
        if peer_cert(&connect(tls, &authority, "a.test", b"h2").await) == new_a {
            renewed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(renewed, "the reloaded certificate is served");
    let r = h2
        .send_request(get("https://a.test/prod/items"))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the connection opened before the reload still works"
    );

    // A broken certificate file on reload keeps the current one.
    std::fs::write(gw.dir.path().join("b.crt"), "not a certificate").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        peer_cert(&connect(tls, &authority, "b.test", b"h2").await),
        cert_b
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_file_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[[server.tls]]\nlisten = \"127.0.0.1:0\"\n[[server.tls.certificates]]\ncert = \"/nonexistent.crt\"\nkey = \"/nonexistent.key\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.tls[0].certificates[0].cert"), "{err}");
}
