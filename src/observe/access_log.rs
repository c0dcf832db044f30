//! Access log (`operations.md` issue scope): one JSON line per request, written by a
//! dedicated thread so that no request waits on a write. Requests hand their entry over a
//! bounded channel; when the writer falls behind, entries are dropped and counted in
//! `apigw_access_log_dropped_total` rather than slowing traffic. Keys, tokens and headers
//! are never logged.

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;

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
    /// Why a token or key was refused (`rejection::AUTH_FAILURES`).
    pub reason: Option<&'static str>,
    /// The integration request was sent a second time on a new connection.
    pub retried: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// The writer's formatting state: the current second's RFC 3339 prefix, formatted once per
/// second rather than once per line.
#[derive(Default)]
struct Formatter {
    second: i64,
    prefix: String,
    time: String,
    ip: String,
}

impl Formatter {
    /// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` of `t` (UTC, microseconds).
    fn set_time(&mut self, t: time::OffsetDateTime) {
        let t = t.to_offset(time::UtcOffset::UTC);
        let second = t.unix_timestamp();
        if second != self.second || self.prefix.is_empty() {
            self.second = second;
            self.prefix.clear();
            let _ = write!(
                self.prefix,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
        }
        self.time.clear();
        self.time.push_str(&self.prefix);
        let _ = write!(self.time, ".{:06}Z", t.microsecond());
    }

    fn set_ip(&mut self, ip: IpAddr) {
        self.ip.clear();
        match ip {
            IpAddr::V4(v4) => {
                let mut b = itoa::Buffer::new();
                for (i, o) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        self.ip.push('.');
                    }
                    self.ip.push_str(b.format(*o));
                }
            }
            IpAddr::V6(v6) => {
                let _ = write!(self.ip, "{v6}");
            }
        }
    }
}

impl Entry {
    /// Appends the entry's JSON line to `out`.
    /// The line's fields, in this order: `time`, `request_id`, `client_ip`, `api_id`,
    /// `stage`, `resource`, `method`, `status`, `bytes`, `latency_ms`,
    /// `integration_latency_ms`, `error_code`, `reason`, `retried`. Keys are written as they are (they
    /// need no escaping); every value goes through serde_json.
    fn write_json(&self, out: &mut Vec<u8>, f: &mut Formatter) {
        f.set_time(self.time);
        f.set_ip(self.client_ip);
        let start = out.len();
        let mut ok = true;
        let mut field = |out: &mut Vec<u8>, key: &str, value: &dyn erased::Value| {
            out.push(if out.len() == start { b'{' } else { b',' });
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            ok &= value.write(out);
        };
        field(out, "time", &f.time.as_str());
        field(out, "request_id", &self.request_id.to_str().unwrap_or(""));
        field(out, "client_ip", &f.ip.as_str());
        field(out, "api_id", &self.api_id.as_deref());
        field(out, "stage", &self.stage.as_deref());
        field(out, "resource", &self.resource.as_deref());
        field(out, "method", &self.method);
        field(out, "status", &self.status);
        field(out, "bytes", &self.bytes);
        field(out, "latency_ms", &ms(self.latency));
        field(
            out,
            "integration_latency_ms",
            &self.integration_latency.map(ms),
        );
        field(out, "error_code", &self.error_code);
        field(out, "reason", &self.reason);
        field(out, "retried", &self.retried);
        if ok {
            out.extend_from_slice(b"}\n");
        } else {
            out.truncate(start);
        }
    }
}

/// One JSON value written by serde_json, whatever its type.
mod erased {
    pub trait Value {
        fn write(&self, out: &mut Vec<u8>) -> bool;
    }

    impl<T: serde::Serialize> Value for T {
        fn write(&self, out: &mut Vec<u8>) -> bool {
            serde_json::to_writer(out, self).is_ok()
        }
    }
}

/// Where lines go.
#[derive(Debug, Clone)]
pub enum Target {
    Stderr,
    File(PathBuf),
}

pub struct AccessLog {
    /// One queue per worker (and one for other threads): a request writes only its own
    /// worker's queue. Lines of different workers interleave in the file by batch.
    txs: Box<[SyncSender<Entry>]>,
    dropped: prometheus::IntCounter,
    closing: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Entries waiting for the writer at most.
const QUEUE: usize = 16_384;
/// How often the writer drains the queue (a line reaches the file at most this late).
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

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
        let shards = crate::worker::shards();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| sync_channel::<Entry>((QUEUE / shards).max(1024)))
            .unzip();
        let closing = Arc::new(AtomicBool::new(false));
        let closed = closing.clone();
        let writer = std::thread::Builder::new()
            .name("scp-access-log".into())
            .spawn(move || {
                crate::worker::lower_priority(10);
                let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
                let mut fmt = Formatter::default();
                let mut write = |buf: &mut Vec<u8>| {
                    if !buf.is_empty() && out.write_all(buf).and_then(|_| out.flush()).is_err() {
                        let _ = writeln!(
                            std::io::stderr().lock(),
                            "scp-gateway: access log write failed"
                        );
                    }
                    buf.clear();
                };
                // The writer polls on a tick instead of blocking in `recv`: a blocked
                // receiver makes every `try_send` a futex wake and a context switch on the
                // proxy's core (measured: a fifth of one core at 20k req/s). A tick
                // costs one wake per interval whatever the request rate.
                loop {
                    std::thread::sleep(DRAIN_INTERVAL);
                    let mut open = 0;
                    for rx in &rxs {
                        loop {
                            match rx.try_recv() {
                                Ok(e) => {
                                    e.write_json(&mut buf, &mut fmt);
                                    if buf.len() >= 60 * 1024 {
                                        write(&mut buf);
                                    }
                                }
                                Err(TryRecvError::Empty) => {
                                    open += 1;
                                    break;
                                }
                                Err(TryRecvError::Disconnected) => break,
                            }
                        }
                    }
                    write(&mut buf);
                    if open == 0 || closed.load(Ordering::Acquire) {
                        return;
                    }
                }
            })?;
        Ok(Self {
            txs: txs.into_boxed_slice(),
            dropped,
            closing,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Writes what is queued and stops the writer (at shutdown, after the last request:
    /// later entries are counted as dropped).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Hands an entry to the writer; never blocks.
    pub fn log(&self, e: Entry) {
        let tx = &self.txs[crate::worker::index().min(self.txs.len() - 1)];
        match tx.try_send(e) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}
