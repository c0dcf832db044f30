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
use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// What one line says.
pub struct Entry {
    /// Read with `SystemTime::now()` (a clock read); the writer turns it into a date.
    pub time: SystemTime,
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

/// True when `s` is written in a JSON string as it is: ASCII with no control character, quote
/// or backslash (what serde_json would escape, or write as multi-byte UTF-8). Checked
/// without an early exit, so that the compiler checks many bytes per instruction: ids and
/// templates are a few dozen bytes, and escaping them with serde_json cost more than the
/// rest of their line.
fn needs_no_escape(s: &[u8]) -> bool {
    s.iter().fold(true, |plain, &b| {
        plain & (0x20..0x80).contains(&b) & (b != b'"') & (b != b'\\')
    })
}

/// A duration in milliseconds rounded to the microsecond, as a JSON number: `0.312`,
/// `12.0`, `1500.25`. The text is what serde_json writes for the `f64` of that many
/// milliseconds (the shortest decimal that reads back as it: trailing zeros dropped, `.0`
/// when whole), written from the integer microseconds with `itoa` instead: formatting a
/// float costs several times more, on every line.
fn write_ms(out: &mut Vec<u8>, d: Duration) {
    // In u64 (`as_nanos` is a u128: its division is a library call).
    let micros = d
        .as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from((d.subsec_nanos() + 500) / 1000));
    let (whole, frac) = (micros / 1000, (micros % 1000) as u16);
    out.extend_from_slice(itoa::Buffer::new().format(whole).as_bytes());
    out.push(b'.');
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let digits = [frac / 100, frac / 10 % 10, frac % 10].map(|d| b'0' + d as u8);
    let keep = 3 - digits.iter().rev().take_while(|d| **d == b'0').count();
    out.extend_from_slice(&digits[..keep]);
}

/// The writer's formatting state: the current second's RFC 3339 prefix, formatted once per
/// second rather than once per line.
#[derive(Default)]
struct Formatter {
    second: Option<u64>,
    prefix: String,
    ip: String,
}

impl Formatter {
    /// `"YYYY-MM-DDTHH:MM:SS.uuuuuuZ"` of `t` (UTC, microseconds; quoted: it needs no
    /// escaping). Only the microseconds are formatted per line.
    fn write_time(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        let since = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let second = since.as_secs();
        if self.second != Some(second) {
            self.second = Some(second);
            self.prefix.clear();
            let t = i64::try_from(second)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let _ = write!(
                self.prefix,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
        }
        out.push(b'"');
        out.extend_from_slice(self.prefix.as_bytes());
        let mut micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.extend_from_slice(&digits);
        out.extend_from_slice(b"Z\"");
    }

    /// The address, quoted (digits, dots, colons and hex letters: no escaping).
    fn write_ip(&mut self, out: &mut Vec<u8>, ip: IpAddr) {
        out.push(b'"');
        match ip {
            IpAddr::V4(v4) => {
                let mut b = itoa::Buffer::new();
                for (i, o) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    out.extend_from_slice(b.format(*o).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                self.ip.clear();
                let _ = write!(self.ip, "{v6}");
                out.extend_from_slice(self.ip.as_bytes());
            }
        }
        out.push(b'"');
    }
}

impl Entry {
    /// Appends the entry's JSON line to `out`.
    /// The line's fields, in this order: `time`, `request_id`, `client_ip`, `api_id`,
    /// `stage`, `resource`, `method`, `status`, `bytes`, `latency_ms`,
    /// `integration_latency_ms`, `error_code`, `reason`, `retried`. Keys are written as they
    /// are, with their separators (they need no escaping); so are the values the gateway
    /// makes itself (time, address, numbers, and the method, code and reason names, which
    /// are the gateway's own constants: a unit test checks that they need no escaping). The
    /// values that come from elsewhere (a request id from a trusted proxy, ids and templates
    /// from the snapshot) are written as they are when they need no escaping, and through
    /// serde_json otherwise.
    fn write_json(&self, out: &mut Vec<u8>, f: &mut Formatter) {
        let start = out.len();
        let mut ok = true;
        let quoted = |out: &mut Vec<u8>, v: &[u8]| {
            out.push(b'"');
            out.extend_from_slice(v);
            out.push(b'"');
        };
        let mut text = |out: &mut Vec<u8>, value: Option<&str>| match value {
            Some(v) if needs_no_escape(v.as_bytes()) => quoted(out, v.as_bytes()),
            _ => ok &= serde_json::to_writer(&mut *out, &value).is_ok(),
        };
        let word = |out: &mut Vec<u8>, value: Option<&str>| match value {
            Some(v) => quoted(out, v.as_bytes()),
            None => out.extend_from_slice(b"null"),
        };
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"{\"time\":");
        f.write_time(out, self.time);
        out.extend_from_slice(b",\"request_id\":");
        match self.request_id.as_bytes() {
            // Visible ASCII: what `to_str` accepts (a header value never holds DEL).
            id if needs_no_escape(id) => quoted(out, id),
            _ => text(out, Some(self.request_id.to_str().unwrap_or(""))),
        }
        out.extend_from_slice(b",\"client_ip\":");
        f.write_ip(out, self.client_ip);
        out.extend_from_slice(b",\"api_id\":");
        text(out, self.api_id.as_deref());
        out.extend_from_slice(b",\"stage\":");
        text(out, self.stage.as_deref());
        out.extend_from_slice(b",\"resource\":");
        text(out, self.resource.as_deref());
        out.extend_from_slice(b",\"method\":");
        word(out, Some(self.method));
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(n.format(self.status).as_bytes());
        out.extend_from_slice(b",\"bytes\":");
        match self.bytes {
            Some(b) => out.extend_from_slice(n.format(b).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"latency_ms\":");
        write_ms(out, self.latency);
        out.extend_from_slice(b",\"integration_latency_ms\":");
        match self.integration_latency {
            Some(d) => write_ms(out, d),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"error_code\":");
        word(out, self.error_code);
        out.extend_from_slice(b",\"reason\":");
        word(out, self.reason);
        out.extend_from_slice(if self.retried {
            b",\"retried\":true}\n"
        } else {
            b",\"retried\":false}\n"
        });
        if !ok {
            out.truncate(start);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_read_as_serde_json_writes_them() {
        // What the line said when the writer formatted the float itself.
        let as_float = |d: Duration| {
            let ms = (d.as_secs_f64() * 1_000_000.0).round() / 1000.0;
            serde_json::to_string(&ms).unwrap()
        };
        let mut cases: Vec<Duration> = (0..5_000).map(Duration::from_micros).collect();
        cases.extend((0..2_000).map(|i| Duration::from_nanos(i * 7_919 + 499)));
        cases.extend([
            Duration::from_nanos(1_500),
            Duration::from_millis(12),
            Duration::from_secs(3_600),
            Duration::from_micros(29_000_001),
        ]);
        for d in cases {
            let mut out = Vec::new();
            write_ms(&mut out, d);
            assert_eq!(String::from_utf8(out).unwrap(), as_float(d), "{d:?}");
        }
    }

    #[test]
    fn plain_text_is_written_as_serde_json_writes_it() {
        // Every byte value in every position of a short string, and longer strings with one.
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), b"api-1".to_vec(), vec![b'x'; 100]];
        for b in 0..=255u8 {
            cases.push(vec![b]);
            let mut long = b"/orders/{order-id}/items-0123456789abcdef".to_vec();
            long.insert(b as usize % long.len(), b);
            cases.push(long);
        }
        for case in cases {
            let Ok(text) = std::str::from_utf8(&case) else {
                continue;
            };
            if needs_no_escape(&case) {
                assert_eq!(
                    serde_json::to_string(text).unwrap(),
                    format!("\"{text}\""),
                    "{case:?}"
                );
            }
            let expect_plain = case
                .iter()
                .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\');
            assert_eq!(needs_no_escape(&case), expect_plain, "{case:?}");
        }
    }

    #[test]
    fn a_request_id_reads_as_to_str_reads_it() {
        // The writer relies on this: no header value holds DEL, which `to_str` refuses.
        assert!(HeaderValue::from_bytes(b"a\x7fb").is_err());
        let t = SystemTime::UNIX_EPOCH;
        for raw in [
            &b"0f3c"[..],
            b"a\tb",
            b"a\"b",
            b"caf\xe9",
            b"\x80",
            b"a\\b",
            b"",
        ] {
            let id = HeaderValue::from_bytes(raw).unwrap();
            let e = Entry {
                time: t,
                request_id: id.clone(),
                client_ip: IpAddr::from([127, 0, 0, 1]),
                api_id: None,
                stage: None,
                resource: None,
                method: "GET",
                status: 200,
                bytes: None,
                latency: Duration::ZERO,
                integration_latency: None,
                error_code: None,
                reason: None,
                retried: false,
            };
            let mut out = Vec::new();
            e.write_json(&mut out, &mut Formatter::default());
            let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(line["request_id"], id.to_str().unwrap_or(""), "{raw:?}");
        }
    }

    #[test]
    fn names_written_unescaped_need_no_escaping() {
        let names = crate::observe::series::METHODS
            .iter()
            .chain(&crate::rejection::CODES)
            .chain(&crate::rejection::AUTH_FAILURES);
        for name in names {
            assert_eq!(serde_json::to_string(name).unwrap(), format!("\"{name}\""));
        }
    }

    #[test]
    fn a_line_is_json_with_every_field() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_947_633_000_042);
        let entry = |ip: IpAddr, request_id: &'static str| Entry {
            time: t,
            request_id: HeaderValue::from_static(request_id),
            client_ip: ip,
            api_id: Some("api-\"1\"".into()),
            stage: Some("prod".into()),
            resource: None,
            method: "GET",
            status: 200,
            bytes: Some(2),
            latency: Duration::from_micros(312),
            integration_latency: None,
            error_code: None,
            reason: Some("expired"),
            retried: false,
        };
        let mut f = Formatter::default();
        let mut out = Vec::new();
        entry("203.0.113.9".parse().unwrap(), "a\\b").write_json(&mut out, &mut f);
        let mut second = entry("2001:db8::1".parse().unwrap(), "0f3c");
        (second.bytes, second.retried) = (None, true);
        (second.error_code, second.reason) = (Some("INTEGRATION_TIMEOUT"), None);
        second.integration_latency = Some(Duration::from_millis(29_000));
        second.write_json(&mut out, &mut f);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["time"], "2026-11-29T10:20:33.000042Z");
        assert_eq!(l["request_id"], "a\\b");
        assert_eq!(l["client_ip"], "203.0.113.9");
        assert_eq!(l["api_id"], "api-\"1\"");
        assert_eq!(l["resource"], serde_json::Value::Null);
        assert_eq!(l["latency_ms"], 0.312);
        assert_eq!(l["integration_latency_ms"], serde_json::Value::Null);
        assert_eq!(l["reason"], "expired");
        assert_eq!(l.as_object().unwrap().len(), 14);
        assert_eq!(l["status"], 200);
        assert_eq!(l["bytes"], 2);
        assert_eq!(l["method"], "GET");
        assert_eq!(l["error_code"], serde_json::Value::Null);
        assert_eq!(l["retried"], false);
        let s = &lines[1];
        assert_eq!(s["client_ip"], "2001:db8::1");
        assert_eq!(s["bytes"], serde_json::Value::Null);
        assert_eq!(s["retried"], true);
        assert_eq!(s["error_code"], "INTEGRATION_TIMEOUT");
        assert_eq!(s["reason"], serde_json::Value::Null);
        assert_eq!(s["integration_latency_ms"], 29000.0);
        assert_eq!(lines[1]["time"], l["time"]);
    }
}
