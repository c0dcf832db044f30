//! Access log (`operations.md` issue scope): one JSON line per request, written by a
//! dedicated thread so that no request waits on a write. Requests hand their entry over a
//! bounded channel; when the writer falls behind, entries are dropped and counted in
//! `apigw_access_log_dropped_total` rather than slowing traffic. Keys, tokens and headers
//! are never logged.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;

/// What one line says.
pub struct Entry {
    pub time: time::OffsetDateTime,
    pub request_id: HeaderValue,
    pub client_ip: IpAddr,
    pub api_id: Option<Arc<str>>,
    pub stage: Option<Arc<str>>,
    pub resource: Option<Arc<str>>,
    pub method: &'static str,
    pub status: u16,
    /// The response's Content-Length, when it has one.
    pub bytes: Option<u64>,
    pub latency: Duration,
    pub integration_latency: Option<Duration>,
    pub error_code: Option<&'static str>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    request_id: &'a str,
    client_ip: String,
    api_id: Option<&'a str>,
    stage: Option<&'a str>,
    resource: Option<&'a str>,
    method: &'a str,
    status: u16,
    bytes: Option<u64>,
    latency_ms: f64,
    integration_latency_ms: Option<f64>,
    error_code: Option<&'a str>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl Entry {
    fn to_json(&self) -> Vec<u8> {
        let line = Line {
            time: self
                .time
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            request_id: self.request_id.to_str().unwrap_or(""),
            client_ip: self.client_ip.to_string(),
            api_id: self.api_id.as_deref(),
            stage: self.stage.as_deref(),
            resource: self.resource.as_deref(),
            method: self.method,
            status: self.status,
            bytes: self.bytes,
            latency_ms: ms(self.latency),
            integration_latency_ms: self.integration_latency.map(ms),
            error_code: self.error_code,
        };
        let mut v = serde_json::to_vec(&line).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Where lines go.
#[derive(Debug, Clone)]
pub enum Target {
    Stderr,
    File(PathBuf),
}

pub struct AccessLog {
    tx: SyncSender<Entry>,
    dropped: prometheus::IntCounter,
}

/// Entries waiting for the writer at most.
const QUEUE: usize = 65_536;

impl AccessLog {
    /// Starts the writer thread.
    pub fn start(target: Target, dropped: prometheus::IntCounter) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match &target {
            Target::Stderr => Box::new(std::io::stderr()),
            Target::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel::<Entry>(QUEUE);
        std::thread::Builder::new()
            .name("scp-access-log".into())
            .spawn(move || {
                let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
                loop {
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(e) => {
                            buf.extend_from_slice(&e.to_json());
                            // Take whatever else is queued, then write once.
                            while buf.len() < 60 * 1024 {
                                match rx.try_recv() {
                                    Ok(e) => buf.extend_from_slice(&e.to_json()),
                                    Err(_) => break,
                                }
                            }
                            if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                                eprintln!("scp-gateway: access log write failed");
                            }
                            buf.clear();
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Self { tx, dropped })
    }

    /// Hands an entry to the writer; never blocks.
    pub fn log(&self, e: Entry) {
        match self.tx.try_send(e) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}
