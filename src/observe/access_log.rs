//! Access log (`operations.md` issue scope): one JSON line per request, written by a
//! dedicated thread so that no request waits on a write. A request copies its entry, as a
//! compact record, into its worker's own buffer, which the writer takes whole on its tick;
//! when the writer falls behind and a buffer is full, entries are dropped and counted in
//! `apigw_access_log_dropped_total` rather than slowing traffic. Keys, tokens and headers
//! are never logged.

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::observe::series::METHODS;
use crate::rejection::{AUTH_FAILURES, CODES};

/// What one line says, borrowed: from the request that made it (on its worker), from the
/// record it was copied into (on the writer).
pub struct Entry<'a> {
    /// The writer turns it into a date.
    pub time: SystemTime,
    /// The `x-scp-request-id` value's bytes.
    pub request_id: &'a [u8],
    pub client_ip: IpAddr,
    /// The API id, stage name and resource template: text (the request path has them as
    /// `&str`) kept as bytes, so that the writer checks them as UTF-8 only in the rare line
    /// that must escape them.
    pub api_id: Option<&'a [u8]>,
    pub stage: Option<&'a [u8]>,
    pub resource: Option<&'a [u8]>,
    /// Index in `series::METHODS`.
    pub method: usize,
    pub status: u16,
    /// The response's Content-Length, when it has one.
    pub bytes: Option<u64>,
    pub latency: Duration,
    pub integration_latency: Option<Duration>,
    /// Index in `rejection::CODES`.
    pub error_code: Option<usize>,
    /// Why a token or key was refused: index in `rejection::AUTH_FAILURES`.
    pub reason: Option<usize>,
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

/// A header value's text as `HeaderValue::to_str` reads it: visible ASCII and tabs, or
/// nothing.
fn header_text(v: &[u8]) -> &str {
    std::str::from_utf8(v)
        .ok()
        .filter(|s| s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
        .unwrap_or("")
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

impl Entry<'_> {
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
        let mut text = |out: &mut Vec<u8>, value: Option<&[u8]>| match value {
            Some(v) if needs_no_escape(v) => quoted(out, v),
            // Text written from a `&str`: lossless.
            _ => {
                let value = value.map(String::from_utf8_lossy);
                ok &= serde_json::to_writer(&mut *out, &value).is_ok();
            }
        };
        let word = |out: &mut Vec<u8>, value: Option<&str>| match value {
            Some(v) => quoted(out, v.as_bytes()),
            None => out.extend_from_slice(b"null"),
        };
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"{\"time\":");
        f.write_time(out, self.time);
        out.extend_from_slice(b",\"request_id\":");
        match self.request_id {
            // Visible ASCII: what `HeaderValue::to_str` accepts (a header value never holds
            // DEL).
            id if needs_no_escape(id) => quoted(out, id),
            id => text(out, Some(header_text(id).as_bytes())),
        }
        out.extend_from_slice(b",\"client_ip\":");
        f.write_ip(out, self.client_ip);
        out.extend_from_slice(b",\"api_id\":");
        text(out, self.api_id);
        out.extend_from_slice(b",\"stage\":");
        text(out, self.stage);
        out.extend_from_slice(b",\"resource\":");
        text(out, self.resource);
        out.extend_from_slice(b",\"method\":");
        word(
            out,
            Some(METHODS.get(self.method).copied().unwrap_or("OTHER")),
        );
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
        word(out, self.error_code.and_then(|c| CODES.get(c).copied()));
        out.extend_from_slice(b",\"reason\":");
        word(out, self.reason.and_then(|r| AUTH_FAILURES.get(r).copied()));
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
    /// One buffer per worker (and one for other threads): a request writes only its own
    /// worker's, under a lock that only the writer takes too, once per tick. Lines of
    /// different workers interleave in the file by batch.
    shards: Arc<[Mutex<Vec<u8>>]>,
    /// Bytes of records a shard holds at most; an entry that does not fit is dropped.
    shard_cap: usize,
    dropped: prometheus::IntCounter,
    closing: Arc<AtomicBool>,
    /// Set by the writer when it has written its last batch: later entries are dropped.
    closed: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Bytes of records waiting for the writer at most, over all workers: about 16,000 lines
/// (a record is about 150 bytes), more than 300 ms of a worker's lines at saturation.
const PENDING_BYTES: usize = 2 << 20;
/// How often the writer takes the workers' records (a line reaches the file at most this
/// late).
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// An entry's record: what the writer needs, copied (the ids and the template too: sharing
/// them would cost an atomic reference count, written by every worker and by the writer).
/// Little-endian: the time, latency and integration latency in nanoseconds (the last
/// `u64::MAX` when absent), the byte count, the status, the method, error code and reason
/// (the last two 0 when absent, else their index + 1), a flags byte, the address (4 or 16
/// bytes), then the request id and the present ones of api id, stage and resource, each a
/// `u32` length and its bytes.
mod record {
    use super::*;

    const BYTES: u8 = 1;
    const RETRIED: u8 = 2;
    const V6: u8 = 4;
    const API: u8 = 8;
    const STAGE: u8 = 16;
    const RESOURCE: u8 = 32;

    fn nanos(d: Duration) -> u64 {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn index(i: Option<usize>) -> u8 {
        i.map_or(0, |i| u8::try_from(i + 1).unwrap_or(0))
    }

    fn text(out: &mut Vec<u8>, t: &[u8]) {
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(t);
    }

    /// Appends `e`'s record to `out`.
    pub fn encode(e: &Entry<'_>, out: &mut Vec<u8>) {
        let since = e
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let mut flags = 0;
        for (set, flag) in [
            (e.bytes.is_some(), BYTES),
            (e.retried, RETRIED),
            (e.client_ip.is_ipv6(), V6),
            (e.api_id.is_some(), API),
            (e.stage.is_some(), STAGE),
            (e.resource.is_some(), RESOURCE),
        ] {
            if set {
                flags |= flag;
            }
        }
        out.extend_from_slice(&nanos(since).to_le_bytes());
        out.extend_from_slice(&nanos(e.latency).to_le_bytes());
        out.extend_from_slice(&e.integration_latency.map_or(u64::MAX, nanos).to_le_bytes());
        out.extend_from_slice(&e.bytes.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&e.status.to_le_bytes());
        out.extend_from_slice(&[
            u8::try_from(e.method).unwrap_or(u8::MAX),
            index(e.error_code),
            index(e.reason),
            flags,
        ]);
        match e.client_ip {
            IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
        text(out, e.request_id);
        for t in [e.api_id, e.stage, e.resource].into_iter().flatten() {
            text(out, t);
        }
    }

    /// Reads one record off the front of `buf`.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_first_chunk::<N>()?;
            self.0 = rest;
            Some(*head)
        }
        fn u64(&mut self) -> Option<u64> {
            self.bytes().map(u64::from_le_bytes)
        }
        fn text(&mut self) -> Option<&'a [u8]> {
            let len = u32::from_le_bytes(self.bytes()?) as usize;
            let (t, rest) = self.0.split_at_checked(len)?;
            self.0 = rest;
            Some(t)
        }
        fn text_if(&mut self, present: bool) -> Option<Option<&'a [u8]>> {
            if !present {
                return Some(None);
            }
            Some(Some(self.text()?))
        }
    }

    /// The first record of `buf` and what follows it; `None` if `buf` does not start with
    /// a whole record (never, for a buffer of records `encode` wrote).
    pub fn decode(buf: &[u8]) -> Option<(Entry<'_>, &[u8])> {
        let mut r = Reader(buf);
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.u64()?);
        let latency = Duration::from_nanos(r.u64()?);
        let integration = r.u64()?;
        let bytes = r.u64()?;
        let status = u16::from_le_bytes(r.bytes()?);
        let [method, error_code, reason, flags] = r.bytes()?;
        let client_ip = if flags & V6 != 0 {
            IpAddr::from(r.bytes::<16>()?)
        } else {
            IpAddr::from(r.bytes::<4>()?)
        };
        let request_id = r.text()?;
        let api_id = r.text_if(flags & API != 0)?;
        let stage = r.text_if(flags & STAGE != 0)?;
        let resource = r.text_if(flags & RESOURCE != 0)?;
        let entry = Entry {
            time,
            request_id,
            client_ip,
            api_id,
            stage,
            resource,
            method: usize::from(method),
            status,
            bytes: (flags & BYTES != 0).then_some(bytes),
            latency,
            integration_latency: (integration != u64::MAX)
                .then(|| Duration::from_nanos(integration)),
            error_code: usize::from(error_code).checked_sub(1),
            reason: usize::from(reason).checked_sub(1),
            retried: flags & RETRIED != 0,
        };
        Some((entry, r.0))
    }
}

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
        let buffers: Arc<[Mutex<Vec<u8>>]> = (0..shards).map(|_| Mutex::default()).collect();
        let closing = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let (stop, done, taken) = (closing.clone(), closed.clone(), buffers.clone());
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
                // Swapped with a worker's buffer on each tick, so that both keep their
                // capacity and no record is copied twice.
                let mut records: Vec<u8> = Vec::new();
                // The writer polls on a tick instead of being woken per entry: a wake-up
                // per entry is a futex call and a context switch on the proxy's core
                // (measured: a fifth of one core at 20k req/s). A tick costs one wake per
                // interval whatever the request rate.
                loop {
                    std::thread::sleep(DRAIN_INTERVAL);
                    // Closed before the last drain: an entry is either queued before it (and
                    // written) or refused after it (and counted as dropped).
                    let last = stop.load(Ordering::Acquire);
                    if last {
                        done.store(true, Ordering::Release);
                    }
                    for shard in taken.iter() {
                        if let Ok(mut pending) = shard.lock() {
                            std::mem::swap(&mut *pending, &mut records);
                        }
                        let mut rest = records.as_slice();
                        while let Some((e, next)) = record::decode(rest) {
                            e.write_json(&mut buf, &mut fmt);
                            if buf.len() >= 60 * 1024 {
                                write(&mut buf);
                            }
                            rest = next;
                        }
                        records.clear();
                    }
                    write(&mut buf);
                    if last {
                        return;
                    }
                }
            })?;
        Ok(Self {
            shard_cap: (PENDING_BYTES / buffers.len()).max(256 << 10),
            shards: buffers,
            dropped,
            closing,
            closed,
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

    /// Hands an entry to the writer; never blocks but for the writer taking the worker's
    /// buffer (a pointer swap, once per tick).
    pub fn log(&self, e: &Entry<'_>) {
        let shard = &self.shards[crate::worker::index().min(self.shards.len() - 1)];
        let queued = shard.lock().is_ok_and(|mut pending| {
            // The lock orders this read after the writer's last drain of this buffer.
            if pending.len() >= self.shard_cap || self.closed.load(Ordering::Relaxed) {
                return false;
            }
            record::encode(e, &mut pending);
            true
        });
        if !queued {
            self.dropped.inc();
        }
    }
}

/// A log dropped without [`AccessLog::close`] (not at a normal shutdown) still gets its
/// queued lines written: the writer drains once more and ends, on its own.
impl Drop for AccessLog {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
                request_id: id.as_bytes(),
                client_ip: IpAddr::from([127, 0, 0, 1]),
                api_id: None,
                stage: None,
                resource: None,
                method: 0,
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
        let expired = AUTH_FAILURES.iter().position(|r| *r == "expired");
        let timeout = CODES.iter().position(|c| *c == "INTEGRATION_TIMEOUT");
        let entry = |ip: IpAddr, request_id: &'static str| Entry {
            time: t,
            request_id: request_id.as_bytes(),
            client_ip: ip,
            api_id: Some("api-\"1\"".as_bytes()),
            stage: Some("prod".as_bytes()),
            resource: None,
            method: 0,
            status: 200,
            bytes: Some(2),
            latency: Duration::from_micros(312),
            integration_latency: None,
            error_code: None,
            reason: expired,
            retried: false,
        };
        let mut f = Formatter::default();
        let mut out = Vec::new();
        entry("203.0.113.9".parse().unwrap(), "a\\b").write_json(&mut out, &mut f);
        let mut second = entry("2001:db8::1".parse().unwrap(), "0f3c");
        (second.bytes, second.retried) = (None, true);
        (second.error_code, second.reason) = (timeout, None);
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

    /// Entries that differ in every field, present and absent.
    fn entries() -> Vec<Entry<'static>> {
        let base = Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_947_633_123_456_789),
            request_id: b"0f3c",
            client_ip: IpAddr::from([203, 0, 113, 9]),
            api_id: Some("api-1".as_bytes()),
            stage: Some("prod".as_bytes()),
            resource: Some("/orders/{id}".as_bytes()),
            method: 1,
            status: 201,
            bytes: Some(0),
            latency: Duration::from_nanos(312_499),
            integration_latency: Some(Duration::ZERO),
            error_code: Some(0),
            reason: Some(AUTH_FAILURES.len() - 1),
            retried: true,
        };
        vec![
            Entry {
                client_ip: "2001:db8::1".parse().unwrap(),
                request_id: b"caf\xe9\t\"",
                api_id: Some("caf\u{e9} \"x\"".as_bytes()),
                bytes: Some(u64::MAX - 1),
                integration_latency: Some(Duration::from_secs(29)),
                error_code: Some(CODES.len() - 1),
                ..base
            },
            Entry {
                request_id: b"",
                api_id: None,
                stage: None,
                resource: None,
                bytes: None,
                integration_latency: None,
                error_code: None,
                reason: None,
                retried: false,
                method: METHODS.len() - 1,
                status: 599,
                ..base
            },
            Entry {
                api_id: None,
                resource: Some("".as_bytes()),
                time: SystemTime::UNIX_EPOCH,
                ..base
            },
            base,
        ]
    }

    fn line(e: &Entry<'_>) -> String {
        let mut out = Vec::new();
        e.write_json(&mut out, &mut Formatter::default());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_record_reads_back_as_the_entry_it_was_made_of() {
        let entries = entries();
        let mut buf = Vec::new();
        for e in &entries {
            record::encode(e, &mut buf);
        }
        let mut rest = buf.as_slice();
        for e in &entries {
            let (back, next) = record::decode(rest).expect("a whole record");
            assert_eq!(back.time, e.time);
            assert_eq!(back.request_id, e.request_id);
            assert_eq!(back.client_ip, e.client_ip);
            assert_eq!(
                (back.api_id, back.stage, back.resource),
                (e.api_id, e.stage, e.resource)
            );
            assert_eq!(
                (back.method, back.status, back.bytes),
                (e.method, e.status, e.bytes)
            );
            assert_eq!(
                (back.latency, back.integration_latency),
                (e.latency, e.integration_latency)
            );
            assert_eq!(
                (back.error_code, back.reason, back.retried),
                (e.error_code, e.reason, e.retried)
            );
            assert_eq!(line(&back), line(e));
            rest = next;
        }
        assert!(rest.is_empty());
        // A cut record is no record (the whole ones before it still read).
        assert!(record::decode(&buf[..buf.len() - 1]).is_some());
        let mut last = Vec::new();
        record::encode(&entries[0], &mut last);
        for cut in 0..last.len() {
            assert!(record::decode(&last[..cut]).is_none(), "{cut}");
        }
    }

    /// A log whose writer never runs: what `log` queues stays queued.
    fn unwritten(cap: usize) -> (AccessLog, prometheus::IntCounter) {
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let log = AccessLog {
            shards: (0..crate::worker::shards())
                .map(|_| Mutex::default())
                .collect(),
            shard_cap: cap,
            dropped: dropped.clone(),
            closing: Arc::default(),
            closed: Arc::default(),
            writer: Mutex::new(None),
        };
        (log, dropped)
    }

    #[test]
    fn entries_past_a_full_buffer_or_after_close_are_dropped_and_counted() {
        let e = &entries()[0];
        let mut one = Vec::new();
        record::encode(e, &mut one);
        // Room for three records: the fourth is dropped.
        let (log, dropped) = unwritten(3 * one.len());
        for _ in 0..4 {
            log.log(e);
        }
        let shard = &log.shards[crate::worker::index().min(log.shards.len() - 1)];
        assert_eq!(shard.lock().unwrap().len(), 3 * one.len());
        assert_eq!(dropped.get(), 1);
        shard.lock().unwrap().clear();
        log.closed.store(true, Ordering::Release);
        log.log(e);
        assert_eq!(dropped.get(), 2);
        assert!(shard.lock().unwrap().is_empty());
    }

    #[test]
    fn close_writes_every_line_logged_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let log = AccessLog::start(Target::File(path.clone()), dropped.clone()).unwrap();
        let entries = entries();
        for e in entries.iter().cycle().take(1_000) {
            log.log(e);
        }
        log.close();
        log.log(&entries[0]);
        let text = std::fs::read_to_string(&path).unwrap();
        let expect: String = entries.iter().cycle().take(1_000).map(line).collect();
        assert_eq!(text, expect);
        assert_eq!(dropped.get(), 1, "the entry logged after close");
    }
}
