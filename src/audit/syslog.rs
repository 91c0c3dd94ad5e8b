//! Shipping audit lines to a SIEM: RFC 5424 messages over TLS (RFC 5425), through a bounded
//! on-disk spool. Batches of JSON lines in (from the audit writer); octet-counted frames out,
//! to one receiver; segments deleted once the receiver has their lines.
//!
//! The writer appends to numbered segment files in `spool_dir` and never waits for the
//! network; a shipper thread reads from the oldest segment, sends, and records the position
//! up to which lines are known delivered in a state file (replaced by rename).
//!
//! TLS has no application-level acknowledgement, so delivery is at least once. A line sent
//! counts as delivered only when the connection it went out on is still open (a
//! non-blocking read finds neither end of stream, close_notify, an alert nor an error)
//! [`CONFIRM_AFTER`] after it was sent. Whenever a connection breaks, everything not yet
//! counted as delivered is sent again on the next connection. A line is lost only if the
//! receiver fails to store it although the connection stayed open for [`CONFIRM_AFTER`]
//! after it was sent; a receiver that restarts or crashes otherwise costs duplicates
//! (the same `decision_id` and `seq`), never a gap. docs/audit-syslog.md states the
//! guarantee and its limits.

use crate::config::SyslogSettings;
use crate::ratelog::RateLog;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::pem::PemObject;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How long a connection must stay open after a line went out on it before the line counts
/// as delivered: the time the receiver has to take it from its socket and store it.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(1);
/// The largest segment file (smaller when `spool_max / 8` is smaller).
const SEGMENT_MAX: u64 = 8 * 1024 * 1024;
/// The most read from the spool and sent in one write.
const CHUNK: usize = 64 * 1024;
/// Reconnection backoff: first wait, then doubled up to the cap.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bounds on connecting, on the handshake and on each blocking write.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping the spool lets the shipper send and confirm what is spooled.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often the delivered position is written while it moves within one segment.
const SAVE_EVERY: Duration = Duration::from_millis(250);
/// How often an idle shipper looks at its connection and the spool.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// The state file: "SEGMENT OFFSET\n", the first byte not known delivered.
const STATE: &str = "delivered";
const STATE_TMP: &str = "delivered.tmp";

/// RFC 5424 §6: header field lengths.
const HOSTNAME_MAX: usize = 255;
const APP_NAME_MAX: usize = 48;
const PROCID_MAX: usize = 128;
const MSGID_MAX: usize = 32;
/// Severity of a line without one (RFC 5424 §6.2.1: 6, informational).
const INFORMATIONAL: u8 = 6;

static SHIP_FAILED: RateLog = RateLog::new("syslog shipping failures", 3, Duration::from_secs(60));
static RECONNECTED: RateLog = RateLog::new("syslog reconnections", 3, Duration::from_secs(60));
static SPOOL_FAILED: RateLog = RateLog::new("syslog spool failures", 3, Duration::from_secs(60));

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The spool directory or a file in it.
    #[error("spool \"{path}\": {source}")]
    Spool {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A certificate or key file.
    #[error("\"{path}\": {problem}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The TLS settings as a whole.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// `server_name` is not a DNS name or an IP address.
    #[error("server_name \"{0}\" is not a DNS name or IP address")]
    ServerName(String),
    /// The shipper thread.
    #[error("cannot start the shipper thread: {0}")]
    Thread(io::Error),
}

/// Why a connection to the receiver failed or ended.
#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error("cannot resolve \"{address}\": {source}")]
    Resolve { address: String, source: io::Error },
    #[error("cannot connect to \"{address}\": {source}")]
    Connect { address: String, source: io::Error },
    #[error("TLS handshake with \"{address}\" failed: {source}")]
    Handshake { address: String, source: io::Error },
    #[error("sending failed: {0}")]
    Send(io::Error),
    #[error("the receiver closed the connection")]
    Closed,
    #[error("the connection failed: {0}")]
    Broken(io::Error),
    #[error("cannot read the spool: {0}")]
    Spool(io::Error),
}

/// Counters for metrics, shared with the shipper thread.
#[derive(Debug, Default)]
pub struct SyslogStats {
    shipped: AtomicU64,
    resent: AtomicU64,
    spooled: AtomicU64,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl SyslogStats {
    /// Lines known delivered (see the module documentation for what "known" means).
    pub fn shipped(&self) -> u64 {
        self.shipped.load(Ordering::Relaxed)
    }
    /// Lines sent again after a connection broke (the receiver may have them twice).
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }
    /// Bytes in the spool's files now, including delivered lines of segments not yet deleted.
    pub fn spooled_bytes(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }
    /// Whether the shipper holds a TLS connection to the receiver.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// The last connection or spool error, if any.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
    fn failed(&self, error: String) {
        *lock(&self.last_error) = Some(error);
    }
    fn remove_spooled(&self, bytes: u64) {
        // Never below zero, whatever a hand-edited spool holds.
        let _ = self
            .spooled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(bytes))
            });
    }
}

/// A lock whose holder panicked still guards consistent data: every critical section here
/// is a few assignments.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A position in the spool: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    seg: u64,
    off: u64,
}

/// What the writer has published to the shipper.
#[derive(Debug)]
struct Tail {
    /// The segment being written.
    seg: u64,
    /// Its length in complete lines.
    len: u64,
    /// Set by `Drop`: the shipper stops by then.
    stop: Option<Instant>,
}

struct Shared {
    dir: PathBuf,
    stats: Arc<SyslogStats>,
    tail: Mutex<Tail>,
    wake: Condvar,
}

/// The on-disk spool and its shipper thread.
pub struct Spool {
    shared: Arc<Shared>,
    max: u64,
    segment_max: u64,
    seg: u64,
    file: File,
    /// Bytes of complete batches in `file`.
    len: u64,
    /// A failed write could not be undone: the next batch starts a new segment.
    rotate_next: bool,
    shipper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.dir)
            .field("seg", &self.seg)
            .finish_non_exhaustive()
    }
}

fn segment_name(seg: u64) -> String {
    format!("{seg:020}.seg")
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(segment_name(seg))
}

/// The segments in `dir`, oldest first, with their lengths.
fn segments(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if number.len() != 20 {
            continue;
        }
        if let Ok(seg) = number.parse::<u64>() {
            found.push((seg, entry.metadata()?.len()));
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn read_state(dir: &Path) -> Option<Pos> {
    let text = std::fs::read_to_string(dir.join(STATE)).ok()?;
    let (seg, off) = text.trim().split_once(' ')?;
    Some(Pos {
        seg: seg.parse().ok()?,
        off: off.parse().ok()?,
    })
}

/// Replaces the state file whole (write, then rename), so a crash leaves the old or the new.
fn write_state(dir: &Path, pos: Pos) -> io::Result<()> {
    let tmp = dir.join(STATE_TMP);
    std::fs::write(&tmp, format!("{} {}\n", pos.seg, pos.off))?;
    std::fs::rename(&tmp, dir.join(STATE))
}

/// What a previous run left: where shipping resumes, the next segment number, the bytes
/// on disk. Segments wholly before the delivered position are deleted. Any doubt about the
/// recorded position (a missing segment, an offset past the end or inside a line) resumes
/// earlier, never later: a duplicate, never a loss.
fn recover(dir: &Path) -> io::Result<(Pos, u64, u64)> {
    let mut segs = segments(dir)?;
    // Empty segments (a run that wrote nothing) hold no line: gone, so they cannot pile up
    // over restarts while the receiver is away.
    for &(seg, _) in segs.iter().filter(|(_, len)| *len == 0) {
        std::fs::remove_file(segment_path(dir, seg))?;
    }
    segs.retain(|(_, len)| *len > 0);
    let state = read_state(dir);
    let start = match (state, segs.first()) {
        (_, None) => Pos {
            seg: state.map_or(1, |s| s.seg.saturating_add(1)),
            off: 0,
        },
        (None, Some(&(first, _))) => Pos { seg: first, off: 0 },
        (Some(state), Some(&(first, _))) => match segs.iter().find(|(seg, _)| *seg >= state.seg) {
            Some(&(seg, len)) if seg == state.seg => {
                let on_boundary = state.off == 0
                    || (state.off <= len && byte_at(dir, seg, state.off - 1)? == Some(b'\n'));
                Pos {
                    seg,
                    off: if on_boundary { state.off } else { 0 },
                }
            }
            Some(&(seg, _)) => Pos { seg, off: 0 },
            None => Pos { seg: first, off: 0 },
        },
    };
    for &(seg, _) in segs.iter().filter(|(seg, _)| *seg < start.seg) {
        std::fs::remove_file(segment_path(dir, seg))?;
    }
    segs.retain(|(seg, _)| *seg >= start.seg);
    let next = segs
        .last()
        .map_or(start.seg, |(seg, _)| seg.saturating_add(1));
    let spooled = segs.iter().map(|(_, len)| len).sum();
    Ok((start, next, spooled))
}

fn byte_at(dir: &Path, seg: u64, off: u64) -> io::Result<Option<u8>> {
    let file = File::open(segment_path(dir, seg))?;
    let mut byte = [0u8];
    Ok((file.read_at(&mut byte, off)? == 1).then_some(byte[0]))
}

fn create_segment(dir: &Path, seg: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, seg))
}

fn tls_config(settings: &SyslogSettings) -> Result<Arc<ClientConfig>, OpenError> {
    let pem_error = |path: &Path, problem: String| OpenError::Pem {
        path: path.to_path_buf(),
        problem,
    };
    let ca = std::fs::read(&settings.ca).map_err(|e| pem_error(&settings.ca, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| pem_error(&settings.ca, format!("unreadable PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| pem_error(&settings.ca, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(pem_error(&settings.ca, "no PEM certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OpenError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let pem = std::fs::read(cert).map_err(|e| pem_error(cert, e.to_string()))?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(cert, format!("unreadable PEM: {e}")))?;
            if chain.is_empty() {
                return Err(pem_error(cert, "no PEM certificate found".into()));
            }
            let key_pem = std::fs::read(key).map_err(|e| pem_error(key, e.to_string()))?;
            let private = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| pem_error(key, format!("no usable PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| OpenError::Tls(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

impl Spool {
    /// Opens (creates) the spool directory, takes over lines a previous run left unsent,
    /// and starts the shipper thread.
    pub fn open(settings: &SyslogSettings) -> Result<Spool, String> {
        Spool::open_typed(settings).map_err(|e| format!("audit.syslog: {e}"))
    }

    fn open_typed(settings: &SyslogSettings) -> Result<Spool, OpenError> {
        let dir = settings.spool_dir.clone();
        let spool_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Spool { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(spool_error(&dir))?;
        let tls = tls_config(settings)?;
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|_| OpenError::ServerName(settings.server_name.clone()))?;
        let (start, seg, spooled) = recover(&dir).map_err(spool_error(&dir))?;
        let file = create_segment(&dir, seg).map_err(spool_error(&segment_path(&dir, seg)))?;
        let len = file
            .metadata()
            .map_err(spool_error(&segment_path(&dir, seg)))?
            .len();
        let stats = Arc::new(SyslogStats::default());
        stats.spooled.store(spooled + len, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            dir,
            stats,
            tail: Mutex::new(Tail {
                seg,
                len,
                stop: None,
            }),
            wake: Condvar::new(),
        });
        let mut shipper = Shipper {
            shared: shared.clone(),
            tls,
            server_name,
            address: settings.address.clone(),
            header: Header::new(&settings.app_name, settings.facility),
            delivered: start,
            sent_high: start,
            saved: (start, Instant::now()),
            file: None,
        };
        let handle = std::thread::Builder::new()
            .name("portcullis-syslog".into())
            .spawn(move || shipper.run())
            .map_err(OpenError::Thread)?;
        Ok(Spool {
            shared,
            max: settings.spool_max,
            segment_max: (settings.spool_max / 8).clamp(1, SEGMENT_MAX),
            seg,
            file,
            len,
            rotate_next: false,
            shipper: Some(handle),
        })
    }

    /// Appends a batch of complete lines (each ends with '\n') to the spool. `Ok` means the
    /// bytes are in the kernel (a completed write to a spool file); it never waits for the
    /// network. `StorageFull` when the spool would exceed `spool_max` (nothing appended);
    /// other errors as they come, with a partial write undone.
    pub fn append(&mut self, batch: &[u8]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a syslog batch must end with a newline",
            ));
        }
        let size = batch.len() as u64;
        let stats = self.shared.stats.clone();
        if stats.spooled_bytes().saturating_add(size) > self.max {
            // The segment being written counts with its delivered lines, and the shipper
            // deletes only finished segments: finish it, so that once delivered it goes
            // and a later batch finds room.
            if self.len > 0 {
                let _ = self.rotate();
            }
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("syslog spool full ({} bytes at most)", self.max),
            ));
        }
        if self.rotate_next || (self.len > 0 && self.len + size > self.segment_max) {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(batch) {
            if let Err(undo) = self.file.set_len(self.len) {
                // The segment keeps a partial batch the shipper never reads as part of the
                // tail; it skips it once the segment is complete (a new one starts now).
                self.rotate_next = true;
                let written = self.file.metadata().map_or(0, |m| m.len());
                stats
                    .spooled
                    .fetch_add(written.saturating_sub(self.len), Ordering::Relaxed);
                SPOOL_FAILED.event(|| {
                    tracing::error!("syslog spool: a partial write could not be undone: {undo}")
                });
            }
            return Err(e);
        }
        self.len += size;
        stats.spooled.fetch_add(size, Ordering::Relaxed);
        let len = self.len;
        self.publish(|tail| tail.len = len);
        Ok(())
    }

    /// Counters for metrics: lines shipped, bytes spooled now, connected or not, last error.
    #[allow(dead_code)] // for the metrics, which do not show the spool yet; the tests use it
    pub fn stats(&self) -> Arc<SyslogStats> {
        self.shared.stats.clone()
    }

    /// Starts the next segment; the one before is complete from now on.
    fn rotate(&mut self) -> io::Result<()> {
        let seg = self.seg + 1;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(&self.shared.dir, seg))?;
        self.file = file;
        self.seg = seg;
        self.len = 0;
        self.rotate_next = false;
        self.publish(|tail| {
            tail.seg = seg;
            tail.len = 0;
        });
        Ok(())
    }

    fn publish(&self, change: impl FnOnce(&mut Tail)) {
        change(&mut lock(&self.shared.tail));
        self.shared.wake.notify_all();
    }
}

impl Drop for Spool {
    /// Stops the shipper: it ships what is spooled for at most [`STOP_GRACE`], and leaves
    /// the rest on disk for the next run.
    fn drop(&mut self) {
        self.publish(|tail| tail.stop = Some(Instant::now() + STOP_GRACE));
        if let Some(shipper) = self.shipper.take() {
            let _ = shipper.join();
        }
    }
}

/// The RFC 5424 header fields that do not change from line to line.
#[derive(Debug, Clone)]
struct Header {
    hostname: String,
    app_name: String,
    procid: String,
    facility: u8,
}

/// A header field as RFC 5424 §6 allows it: printable US-ASCII without spaces, at most
/// `max` characters; otherwise, or when empty, the NILVALUE "-".
fn field(value: &str, max: usize) -> String {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| (33..=126).contains(&b)) {
        return "-".into();
    }
    value[..value.len().min(max)].to_string()
}

impl Header {
    fn new(app_name: &str, facility: u8) -> Header {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Header {
            hostname: field(&hostname, HOSTNAME_MAX),
            app_name: field(app_name, APP_NAME_MAX),
            procid: field(&std::process::id().to_string(), PROCID_MAX),
            facility: facility.min(23),
        }
    }

    /// Appends one line (its '\n' dropped) as an octet-counted frame (RFC 5425 §4.3:
    /// `MSG-LEN SP SYSLOG-MSG`) of an RFC 5424 message whose MSG is the line itself.
    fn frame(&self, line: &[u8], now: SystemTime, out: &mut Vec<u8>) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let value = serde_json::from_slice(line).unwrap_or(serde_json::Value::Null);
        let fields = Fields::of(&value);
        let severity = fields.severity.map_or(INFORMATIONAL, severity);
        let time = fields
            .time
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .unwrap_or(now);
        let msgid = match fields.kind {
            None => "decision".to_string(),
            Some(kind) => field(kind.unwrap_or(""), MSGID_MAX),
        };
        // RFC 5424 §6.2.1: PRI = facility * 8 + severity.
        let pri = u16::from(self.facility) * 8 + u16::from(severity);
        // RFC 5424 §6.4 would put a BOM before a UTF-8 MSG; RFC 8259 §8.1 forbids one
        // before JSON text, and the MSG is JSON for the SIEM to parse, so it goes as
        // MSG-ANY, without a BOM (docs/audit-syslog.md).
        let head = format!(
            "<{pri}>1 {} {} {} {} {msgid} - ",
            humantime::format_rfc3339_micros(time),
            self.hostname,
            self.app_name,
            self.procid,
        );
        out.extend_from_slice(format!("{} ", head.len() + line.len()).as_bytes());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(line);
    }
}

/// The members of a line that shape its header, in our format or in ECS
/// (`format = "ecs"`, src/audit/ecs.rs); anything else in the line is left alone.
struct Fields<'a> {
    time: Option<&'a str>,
    severity: Option<&'a str>,
    /// The line's type: absent for a decision; `Some(None)` when it is not a string.
    kind: Option<Option<&'a str>>,
}

/// ECS's `event.action` for a decision (src/audit/ecs.rs).
const ECS_DECISION: &str = "authorization-decision";

impl<'a> Fields<'a> {
    fn of(value: &'a serde_json::Value) -> Fields<'a> {
        let text = |pointer: &str| value.pointer(pointer).and_then(serde_json::Value::as_str);
        let kind = match value.get("type") {
            Some(kind) => Some(kind.as_str()),
            None => text("/event/action")
                .filter(|action| *action != ECS_DECISION)
                .map(Some),
        };
        // ECS keeps an event line's own members under `portcullis.<type>`.
        let severity = text("/severity").or_else(|| {
            let kind = kind.flatten()?;
            value.get("portcullis")?.get(kind)?.get("severity")?.as_str()
        });
        Fields {
            time: text("/time").or_else(|| text("/@timestamp")),
            severity,
            kind,
        }
    }
}

/// A security event's severity as an RFC 5424 severity (§6.2.1); unknown ones are
/// informational.
fn severity(name: &str) -> u8 {
    match name.to_ascii_lowercase().as_str() {
        "critical" => 2,
        "high" => 3,
        "medium" => 4,
        "low" => 5,
        _ => INFORMATIONAL,
    }
}

/// Lines read from the spool, ready to send.
struct Chunk {
    bytes: Vec<u8>,
    start: Pos,
    end: Pos,
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Lines sent on the current connection and not yet known delivered: where each send
/// ended, when it went out, how many lines it held.
type Window = VecDeque<(Pos, Instant, u64)>;

struct Shipper {
    shared: Arc<Shared>,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    address: String,
    header: Header,
    /// The first byte not known delivered.
    delivered: Pos,
    /// The furthest position ever sent: lines before it, sent again, are resent.
    sent_high: Pos,
    /// The position last written to the state file, and when.
    saved: (Pos, Instant),
    /// The segment being read.
    file: Option<(u64, File)>,
}

/// What the shipper learns from the writer: the tail and the stop deadline.
fn snapshot(shared: &Shared) -> (Pos, Option<Instant>) {
    let tail = lock(&shared.tail);
    (
        Pos {
            seg: tail.seg,
            off: tail.len,
        },
        tail.stop,
    )
}

impl Shipper {
    fn run(&mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let (tail, stop) = snapshot(&self.shared);
            if stop.is_some_and(|at| Instant::now() >= at) {
                break;
            }
            // Connect only for lines to send: past a finished segment's end, step on.
            let pending = match self.read(self.delivered, tail) {
                Ok(Some(chunk)) if chunk.bytes.is_empty() => {
                    self.advance(chunk.end, 0);
                    continue;
                }
                Ok(pending) => pending.is_some(),
                Err(e) => {
                    let message = ShipError::Spool(e).to_string();
                    SHIP_FAILED.event(|| tracing::warn!("audit syslog: {message}"));
                    self.shared.stats.failed(message);
                    self.back_off(BACKOFF_MAX);
                    continue;
                }
            };
            if !pending {
                if stop.is_some() {
                    break;
                }
                self.sleep(IDLE_POLL);
                continue;
            }
            let limit = stop.map_or(CONNECT_TIMEOUT, |at| {
                at.saturating_duration_since(Instant::now())
                    .min(CONNECT_TIMEOUT)
            });
            let before = self.delivered;
            let outcome = self.connect(limit).and_then(|tls| {
                self.shared.stats.connected.store(true, Ordering::Relaxed);
                if self.shared.stats.last_error().is_some() {
                    let address = &self.address;
                    RECONNECTED
                        .event(|| tracing::info!("audit syslog: connected to \"{address}\" again"));
                }
                self.session(tls)
            });
            self.shared.stats.connected.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    let message = e.to_string();
                    SHIP_FAILED.event(|| tracing::warn!("audit syslog: {message}"));
                    self.shared.stats.failed(message);
                }
            }
            if self.delivered > before {
                backoff = BACKOFF_MIN;
            }
            self.back_off(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.save();
    }

    /// Waits up to `limit`, or until the writer publishes something.
    fn sleep(&self, limit: Duration) {
        let tail = lock(&self.shared.tail);
        if tail.stop.is_none() {
            let _ = self.shared.wake.wait_timeout(tail, limit);
        } else {
            drop(tail);
            std::thread::sleep(limit.min(IDLE_POLL));
        }
    }

    /// Waits `limit`; new lines do not cut it short, only the spool stopping does (then
    /// tries come every [`IDLE_POLL`] until the grace period ends).
    fn back_off(&self, limit: Duration) {
        let until = Instant::now() + limit;
        let mut tail = lock(&self.shared.tail);
        while tail.stop.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tail = match self.shared.wake.wait_timeout(tail, left) {
                Ok((tail, _)) => tail,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        drop(tail);
        std::thread::sleep(IDLE_POLL);
    }

    fn connect(&self, limit: Duration) -> Result<Tls, ShipError> {
        let address = &self.address;
        let addrs = address
            .to_socket_addrs()
            .map_err(|source| ShipError::Resolve {
                address: address.clone(),
                source,
            })?;
        let limit = limit.max(Duration::from_millis(1));
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut sock = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, limit) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let connect_error = |source| ShipError::Connect {
            address: address.clone(),
            source,
        };
        let sock = sock.ok_or_else(|| connect_error(last))?;
        sock.set_nodelay(true).map_err(connect_error)?;
        // While stopping, `limit` is what is left of the grace period.
        let io_limit = Some(IO_TIMEOUT.min(limit));
        sock.set_read_timeout(io_limit).map_err(connect_error)?;
        sock.set_write_timeout(io_limit).map_err(connect_error)?;
        let handshake_error = |source| ShipError::Handshake {
            address: address.clone(),
            source,
        };
        let conn = ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(|e| handshake_error(io::Error::other(e)))?;
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(handshake_error)?;
        }
        Ok(tls)
    }

    /// Sends from the first line not known delivered, confirms what stayed on an open
    /// connection for [`CONFIRM_AFTER`], until the connection breaks (`Err`) or the spool
    /// is stopping (`Ok`).
    fn session(&mut self, mut tls: Tls) -> Result<(), ShipError> {
        let mut send = self.delivered;
        let mut window = Window::new();
        loop {
            let (tail, stop) = snapshot(&self.shared);
            let now = Instant::now();
            if let Some(at) = stop {
                let left = at.saturating_duration_since(now);
                if left.is_zero() {
                    return Ok(());
                }
                // A write the receiver does not take must not outlast the grace period.
                tls.sock
                    .set_write_timeout(Some(left))
                    .map_err(ShipError::Broken)?;
            }
            let chunk = self.read(send, tail).map_err(ShipError::Spool)?;
            let idle = chunk.is_none();
            if let Some(chunk) = chunk {
                send = chunk.end;
                self.send(&mut tls, chunk, &mut window)?;
            }
            let due = window
                .front()
                .is_some_and(|(_, at, _)| now.saturating_duration_since(*at) >= CONFIRM_AFTER);
            if due || idle {
                alive(&mut tls)?;
                while let Some(&(end, at, lines)) = window.front() {
                    if now.saturating_duration_since(at) < CONFIRM_AFTER {
                        break;
                    }
                    window.pop_front();
                    self.advance(end, lines);
                }
            }
            if idle {
                if stop.is_some() && window.is_empty() {
                    // SECURITY: a clean close only once everything sent is confirmed; the
                    // close itself proves nothing about the lines.
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    return Ok(());
                }
                if self.saved.1.elapsed() >= SAVE_EVERY {
                    self.save();
                }
                self.sleep(IDLE_POLL);
            }
        }
    }

    fn send(&mut self, tls: &mut Tls, chunk: Chunk, window: &mut Window) -> Result<(), ShipError> {
        let now = SystemTime::now();
        let mut out = Vec::with_capacity(chunk.bytes.len() + chunk.bytes.len() / 2);
        let mut lines = 0u64;
        let mut resent = 0u64;
        let mut at = chunk.start;
        for line in chunk.bytes.split_inclusive(|b| *b == b'\n') {
            if at < self.sent_high {
                resent += 1;
            }
            at.off += line.len() as u64;
            self.header.frame(line, now, &mut out);
            lines += 1;
        }
        if !out.is_empty() {
            tls.write_all(&out).map_err(ShipError::Send)?;
            tls.flush().map_err(ShipError::Send)?;
        }
        self.shared
            .stats
            .resent
            .fetch_add(resent, Ordering::Relaxed);
        self.sent_high = self.sent_high.max(chunk.end);
        match window.back() {
            // Nothing sent (a segment's end passed): nothing to confirm.
            _ if lines == 0 && window.is_empty() => self.advance(chunk.end, 0),
            Some(&(_, last, _)) if lines == 0 => window.push_back((chunk.end, last, 0)),
            _ => window.push_back((chunk.end, Instant::now(), lines)),
        }
        Ok(())
    }

    /// Reads the complete lines after `pos`, or a step past a finished segment's end;
    /// `None` when there is nothing new.
    fn read(&mut self, pos: Pos, tail: Pos) -> io::Result<Option<Chunk>> {
        if pos.seg > tail.seg || pos == tail {
            return Ok(None);
        }
        let dir = self.shared.dir.clone();
        let file = match &self.file {
            Some((seg, file)) if *seg == pos.seg => file,
            _ => {
                let file = File::open(segment_path(&dir, pos.seg))?;
                &self.file.insert((pos.seg, file)).1
            }
        };
        let finished = pos.seg < tail.seg;
        let limit = if finished {
            file.metadata()?.len()
        } else {
            tail.off
        };
        if pos.off < limit {
            let available = usize::try_from(limit - pos.off).unwrap_or(usize::MAX);
            let mut want = available.min(CHUNK);
            loop {
                let mut bytes = vec![0u8; want];
                let n = file.read_at(&mut bytes, pos.off)?;
                bytes.truncate(n);
                if let Some(last) = bytes.iter().rposition(|b| *b == b'\n') {
                    bytes.truncate(last + 1);
                    let end = Pos {
                        seg: pos.seg,
                        off: pos.off + bytes.len() as u64,
                    };
                    return Ok(Some(Chunk {
                        bytes,
                        start: pos,
                        end,
                    }));
                }
                if n == want && want < available {
                    // A line longer than a chunk: read it whole.
                    want = available;
                    continue;
                }
                break;
            }
            if !finished {
                return Ok(None);
            }
            let skipped = limit - pos.off;
            SPOOL_FAILED.event(|| {
                tracing::warn!(
                    "syslog spool: {skipped} bytes of an incomplete line skipped at the end of segment {}",
                    pos.seg
                )
            });
        }
        if !finished {
            return Ok(None);
        }
        let next = segments(&dir)?
            .into_iter()
            .map(|(seg, _)| seg)
            .find(|seg| *seg > pos.seg)
            .unwrap_or(tail.seg);
        Ok(Some(Chunk {
            bytes: Vec::new(),
            start: pos,
            end: Pos { seg: next, off: 0 },
        }))
    }

    /// Records lines up to `to` as delivered: the state file, then the segments before it.
    fn advance(&mut self, to: Pos, lines: u64) {
        let stats = self.shared.stats.clone();
        stats.shipped.fetch_add(lines, Ordering::Relaxed);
        let from = self.delivered;
        self.delivered = self.delivered.max(to);
        if self.delivered.seg > from.seg {
            // The state first: a crash between the two leaves segments the next run
            // deletes, never a position inside a deleted segment.
            self.save();
            let dir = &self.shared.dir;
            match segments(dir) {
                Ok(segs) => {
                    for (seg, len) in segs.into_iter().filter(|(s, _)| *s < self.delivered.seg) {
                        if std::fs::remove_file(segment_path(dir, seg)).is_ok() {
                            stats.remove_spooled(len);
                        }
                    }
                }
                Err(e) => SPOOL_FAILED
                    .event(|| tracing::warn!("syslog spool: cannot list the segments: {e}")),
            }
        } else if self.saved.1.elapsed() >= SAVE_EVERY {
            self.save();
        }
    }

    fn save(&mut self) {
        if self.saved.0 == self.delivered {
            return;
        }
        match write_state(&self.shared.dir, self.delivered) {
            Ok(()) => self.saved = (self.delivered, Instant::now()),
            // A stale state only means lines sent again after a restart.
            Err(e) => SPOOL_FAILED.event(|| {
                tracing::warn!("syslog spool: cannot record the delivered position: {e}")
            }),
        }
    }
}

/// Whether the receiver still holds the connection open: a non-blocking read that finds
/// nothing to read. End of stream, close_notify, an alert (a rejected client certificate
/// arrives as one after a TLS 1.3 handshake) or an error mean recent lines may be lost.
fn alive(tls: &mut Tls) -> Result<(), ShipError> {
    tls.sock.set_nonblocking(true).map_err(ShipError::Broken)?;
    let result = poll(tls);
    tls.sock.set_nonblocking(false).map_err(ShipError::Broken)?;
    result
}

/// The most a receiver may send between two looks: a syslog receiver has nothing to say
/// (RFC 5425 has no replies), so one that keeps talking is dropped rather than read without
/// end while lines wait.
const MAX_UNSOLICITED: usize = 64 * 1024;

fn poll(tls: &mut Tls) -> Result<(), ShipError> {
    let mut heard = 0usize;
    loop {
        match tls.conn.read_tls(&mut tls.sock) {
            Ok(0) => return Err(ShipError::Closed),
            Ok(n) => {
                heard = heard.saturating_add(n);
                if heard > MAX_UNSOLICITED {
                    return Err(ShipError::Broken(io::Error::other(format!(
                        "the receiver sent more than {MAX_UNSOLICITED} bytes unasked"
                    ))));
                }
                tls.conn
                    .process_new_packets()
                    .map_err(|e| ShipError::Broken(io::Error::other(e)))?;
                let mut sink = [0u8; 512];
                loop {
                    match tls.conn.reader().read(&mut sink) {
                        Ok(0) => return Err(ShipError::Closed),
                        // A syslog receiver has nothing to say; whatever it says is ignored.
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(ShipError::Broken(e)),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ShipError::Broken(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::Authority;

    fn header() -> Header {
        Header {
            hostname: "gate-1".into(),
            app_name: "portcullis".into(),
            procid: "42".into(),
            facility: 13,
        }
    }

    fn framed(line: &str) -> String {
        let mut out = Vec::new();
        let now = humantime::parse_rfc3339("2026-01-02T03:04:05.000006Z").unwrap();
        header().frame(line.as_bytes(), now, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Splits an octet-counted frame, checking that its length is the message's in bytes.
    fn unframe(frame: &str) -> &str {
        let (len, msg) = frame.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len(), "{frame}");
        msg
    }

    #[test]
    fn a_decision_line_becomes_one_octet_counted_rfc5424_message() {
        let line = r#"{"time":"2026-12-03T15:40:34.123456Z","decision_id":"d-1","seq":7,"decision":"allow"}"#;
        let frame = framed(&format!("{line}\n"));
        assert_eq!(
            unframe(&frame),
            format!("<110>1 2026-12-03T15:40:34.123456Z gate-1 portcullis 42 decision - {line}")
        );
    }

    #[test]
    fn pri_is_facility_times_eight_plus_the_mapped_severity() {
        let cases = [
            (r#"{"severity":"critical"}"#, "<106>", "decision"),
            (
                r#"{"severity":"high","type":"security"}"#,
                "<107>",
                "security",
            ),
            (r#"{"severity":"MEDIUM"}"#, "<108>", "decision"),
            (r#"{"severity":"low"}"#, "<109>", "decision"),
            (r#"{"severity":"unheard-of"}"#, "<110>", "decision"),
            (r#"{"severity":3}"#, "<110>", "decision"),
            (r#"{}"#, "<110>", "decision"),
            // Not a printable token: NILVALUE.
            (r#"{"type":"has space"}"#, "<110>", "-"),
            (
                r#"{"type":"0123456789abcdef0123456789abcdefX"}"#,
                "<110>",
                "0123456789abcdef0123456789abcdef",
            ),
            (r#"{"type":7}"#, "<110>", "-"),
            // Not JSON at all: shipped as it is, with every default.
            ("not json", "<110>", "decision"),
            // The same lines in ECS (format = "ecs").
            (r#"{"event":{"action":"authorization-decision"},"portcullis":{}}"#, "<110>", "decision"),
            (
                r#"{"event":{"action":"security_event"},"portcullis":{"security_event":{"severity":"high"}}}"#,
                "<107>",
                "security_event",
            ),
            (r#"{"event":{"action":"checkpoint"}}"#, "<110>", "checkpoint"),
        ];
        for (line, pri, msgid) in cases {
            let frame = framed(line);
            let msg = unframe(&frame);
            assert!(msg.starts_with(pri), "{line}: {msg}");
            let fields: Vec<&str> = msg.splitn(8, ' ').collect();
            assert_eq!(fields[5], msgid, "{line}");
            assert_eq!(fields[7], line, "{line}");
        }
    }

    #[test]
    fn an_ecs_line_gives_its_timestamp() {
        let line = r#"{"@timestamp":"2026-12-03T15:40:34.123456Z","event":{"action":"authorization-decision"}}"#;
        let msg = unframe(&framed(line)).to_string();
        assert!(msg.starts_with("<110>1 2026-12-03T15:40:34.123456Z gate-1 "), "{msg}");
    }

    #[test]
    fn the_length_counts_bytes_and_the_time_falls_back_to_now() {
        let line = r#"{"principal":"Zoë","time":"yesterday"}"#;
        let msg = unframe(&framed(line)).to_string();
        assert!(msg.contains(" 2026-01-02T03:04:05.000006Z "), "{msg}");
        assert!(msg.ends_with(line), "no BOM, the line as it is: {msg}");
    }

    #[test]
    fn header_fields_are_printable_ascii_within_their_limits() {
        assert_eq!(field("", 48), "-");
        assert_eq!(field("two words", 48), "-");
        assert_eq!(field("héte", 48), "-");
        assert_eq!(field(&"a".repeat(300), HOSTNAME_MAX).len(), 255);
        assert_eq!(field("host\n", 255), "host");
        assert_eq!(Header::new("", 99).app_name, "-");
        assert_eq!(Header::new("", 99).facility, 23);
    }

    struct Fixture {
        dir: tempfile::TempDir,
        settings: SyslogSettings,
    }

    /// Settings for a receiver that is not there (a port nothing listens on): nothing is
    /// ever delivered, so the spool only grows.
    fn fixture(spool_max: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::root("syslog test ca");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let settings = SyslogSettings {
            address: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            ca: dir.path().join("ca.pem"),
            cert: None,
            key: None,
            spool_dir: dir.path().join("spool"),
            spool_max,
            app_name: "portcullis".into(),
            facility: 13,
        };
        Fixture { dir, settings }
    }

    fn line(i: usize, width: usize) -> String {
        let id = format!("{{\"decision_id\":\"d-{i}\",\"pad\":\"");
        format!(
            "{id}{}\"}}\n",
            "x".repeat(width.saturating_sub(id.len() + 3))
        )
    }

    #[test]
    fn segments_roll_over_and_the_spool_counts_its_bytes() {
        let f = fixture(8 * 1000);
        let mut spool = Spool::open(&f.settings).unwrap();
        for i in 0..20 {
            spool.append(line(i, 100).as_bytes()).unwrap();
        }
        let segs = segments(&f.settings.spool_dir).unwrap();
        // 1000-byte segments of 100-byte lines: ten per segment.
        assert_eq!(segs.iter().map(|s| s.1).collect::<Vec<_>>(), [1000, 1000]);
        assert_eq!(spool.stats().spooled_bytes(), 2000);
        assert_eq!(spool.stats().shipped(), 0);
        // A batch larger than a segment gets a segment of its own.
        let big: String = (20..35).map(|i| line(i, 100)).collect();
        spool.append(big.as_bytes()).unwrap();
        let segs = segments(&f.settings.spool_dir).unwrap();
        assert_eq!(
            segs.iter().map(|s| s.1).collect::<Vec<_>>(),
            [1000, 1000, 1500]
        );
        assert!(spool.append(b"no newline").is_err());
    }

    #[test]
    fn a_full_spool_refuses_the_whole_batch_and_takes_one_that_fits() {
        let f = fixture(1000);
        let mut spool = Spool::open(&f.settings).unwrap();
        for i in 0..9 {
            spool.append(line(i, 100).as_bytes()).unwrap();
        }
        let two: String = (9..11).map(|i| line(i, 100)).collect();
        let error = spool.append(two.as_bytes()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        let on_disk: u64 = segments(&f.settings.spool_dir)
            .unwrap()
            .iter()
            .map(|s| s.1)
            .sum();
        assert_eq!(on_disk, 900, "nothing of the refused batch was written");
        assert_eq!(spool.stats().spooled_bytes(), 900);
        spool.append(line(9, 100).as_bytes()).unwrap();
        let error = spool.append(b"{}\n").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        // The segment being written was finished, so the shipper may delete it.
        let segs = segments(&f.settings.spool_dir).unwrap();
        assert_eq!(segs.last(), Some(&(segs.len() as u64, 0)), "{segs:?}");
        drop(spool);
        // The bound holds across a restart: the next run counts what is left.
        let mut spool = Spool::open(&f.settings).unwrap();
        assert_eq!(spool.stats().spooled_bytes(), 1000);
        let error = spool.append(b"{}\n").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
    }

    fn write_segment(dir: &Path, seg: u64, text: &str) {
        std::fs::write(segment_path(dir, seg), text).unwrap();
    }

    #[test]
    fn recovery_resumes_at_the_recorded_position_and_never_later() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let setup = |state: Option<&str>| {
            for seg in [3, 4, 5] {
                write_segment(d, seg, "{\"a\":1}\n{\"b\":2}\n");
            }
            match state {
                Some(s) => std::fs::write(d.join(STATE), s).unwrap(),
                None => {
                    let _ = std::fs::remove_file(d.join(STATE));
                }
            }
        };
        let cases: [(Option<&str>, (u64, u64), u64); 7] = [
            // No state: everything from the oldest segment.
            (None, (3, 0), 6),
            // Within a segment, on a line boundary: the delivered segment before it goes.
            (Some("4 8\n"), (4, 8), 6),
            // Inside a line (a damaged state file): the segment's start.
            (Some("4 5\n"), (4, 0), 6),
            // Past the segment's end: its start.
            (Some("4 99\n"), (4, 0), 6),
            // A segment already deleted: the next one's start.
            (Some("2 8\n"), (3, 0), 6),
            // Past every segment: from the oldest, a duplicate rather than a loss.
            (Some("9 0\n"), (3, 0), 6),
            // Garbage: as if there were none.
            (Some("x y\n"), (3, 0), 6),
        ];
        for (state, (seg, off), next) in cases {
            setup(state);
            let (start, next_seg, spooled) = recover(d).unwrap();
            assert_eq!(start, Pos { seg, off }, "{state:?}");
            assert_eq!(next_seg, next, "{state:?}");
            let left: Vec<u64> = segments(d).unwrap().iter().map(|s| s.0).collect();
            assert_eq!(left, (seg..=5).collect::<Vec<_>>(), "{state:?}");
            assert_eq!(spooled, 16 * left.len() as u64, "{state:?}");
        }
        // An empty spool after everything was delivered continues the numbering.
        for seg in segments(d).unwrap() {
            std::fs::remove_file(segment_path(d, seg.0)).unwrap();
        }
        write_state(d, Pos { seg: 5, off: 16 }).unwrap();
        assert_eq!(recover(d).unwrap(), (Pos { seg: 6, off: 0 }, 6, 0));
        // Empty segments left by runs that wrote nothing go; numbering continues.
        write_segment(d, 6, "");
        write_segment(d, 7, "{\"c\":3}\n");
        write_segment(d, 8, "");
        write_state(d, Pos { seg: 6, off: 0 }).unwrap();
        assert_eq!(recover(d).unwrap(), (Pos { seg: 7, off: 0 }, 8, 8));
        assert_eq!(segments(d).unwrap(), [(7, 8)]);
        assert!(!d.join(STATE_TMP).exists());
    }

    #[test]
    fn a_reopened_spool_keeps_unsent_lines_and_writes_a_new_segment() {
        let f = fixture(1 << 20);
        let mut spool = Spool::open(&f.settings).unwrap();
        spool.append(line(1, 50).as_bytes()).unwrap();
        drop(spool);
        let mut spool = Spool::open(&f.settings).unwrap();
        spool.append(line(2, 50).as_bytes()).unwrap();
        let segs = segments(&f.settings.spool_dir).unwrap();
        assert_eq!(segs, [(1, 50), (2, 50)]);
        assert_eq!(spool.stats().spooled_bytes(), 100);
        let _ = &f.dir;
    }

    /// New lines must not cut a reconnection backoff short: a receiver that is down is
    /// tried at 100 ms, 200 ms, 400 ms, 800 ms..., not once per batch.
    #[test]
    fn reconnection_backs_off_whatever_the_writer_appends() {
        let mut f = fixture(1 << 20);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        f.settings.address = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let mut spool = Spool::open(&f.settings).unwrap();
        let started = Instant::now();
        let mut accepted = 0;
        let mut i = 0;
        while started.elapsed() < Duration::from_millis(1600) {
            spool.append(line(i, 80).as_bytes()).unwrap();
            i += 1;
            // Not TLS: each connection fails its handshake once this end closes it.
            while let Ok((conn, _)) = listener.accept() {
                drop(conn);
                accepted += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(i > 100, "{i} batches");
        // Attempts at about 0, 0.1, 0.3, 0.7 and 1.5 s (handshake failures included).
        assert!(
            (2..=6).contains(&accepted),
            "{accepted} connections in 1.6 s"
        );
        assert_eq!(spool.stats().shipped(), 0);
        assert!(
            spool
                .stats()
                .last_error()
                .is_some_and(|e| e.contains("handshake"))
        );
    }

    type Served = StreamOwned<rustls::ServerConnection, TcpStream>;

    /// A TLS receiver in the test's own hands: (listener, its configuration, the CA file).
    fn tls_receiver(dir: &Path) -> (std::net::TcpListener, Arc<rustls::ServerConfig>, PathBuf) {
        let ca = Authority::root("receiver ca");
        let leaf = ca.issue(&crate::demo::LeafSpec::loopback_server());
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf.der)], key)
            .unwrap();
        let path = dir.join("receiver-ca.pem");
        std::fs::write(&path, ca.cert_pem()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        (listener, Arc::new(config), path)
    }

    fn accept(listener: &std::net::TcpListener, config: &Arc<rustls::ServerConfig>) -> Served {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok((sock, _)) => {
                    sock.set_nonblocking(false).unwrap();
                    sock.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                    return StreamOwned::new(conn, sock);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection from the shipper");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Reads until `needle` has arrived (at most 10 s); everything read.
    fn read_until(conn: &mut Served, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(needle) {
            assert!(Instant::now() < deadline, "{needle} did not arrive");
            match conn.read(&mut buf) {
                Ok(0) => panic!("the shipper closed the connection"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        String::from_utf8(got).unwrap()
    }

    fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !done() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The delivery rule, deterministically: lines a receiver read and then dropped with
    /// the connection (a crash before storing them) are sent again; lines that stayed on
    /// an open connection for `CONFIRM_AFTER` are not.
    #[test]
    fn lines_the_receiver_dropped_are_sent_again_and_confirmed_ones_are_not() {
        let mut f = fixture(1 << 20);
        let (listener, config, ca) = tls_receiver(f.dir.path());
        f.settings.address = listener.local_addr().unwrap().to_string();
        f.settings.ca = ca;
        let mut spool = Spool::open(&f.settings).unwrap();
        let stats = spool.stats();
        let batch: String = (0..5).map(|i| line(i, 60)).collect();
        spool.append(batch.as_bytes()).unwrap();

        // The receiver reads the five lines, then goes before storing them.
        let mut conn = accept(&listener, &config);
        let first = read_until(&mut conn, "\"d-4\"");
        let (len, frame) = first.split_once(' ').unwrap();
        assert!(
            len.parse::<usize>().is_ok() && frame.starts_with("<110>1 "),
            "{first}"
        );
        drop(conn);

        // The next connection gets all five again, and they count as delivered once it
        // has stayed open for CONFIRM_AFTER.
        let mut conn = accept(&listener, &config);
        let again = read_until(&mut conn, "\"d-4\"");
        for i in 0..5 {
            assert!(
                again.contains(&format!("\"d-{i}\"")),
                "d-{i} not sent again: {again}"
            );
        }
        assert!(
            wait_for(Duration::from_secs(5), || stats.shipped() == 5),
            "shipped {}",
            stats.shipped()
        );
        assert_eq!(stats.resent(), 5);
        // The position is recorded (at most SAVE_EVERY after the confirmation).
        let recorded = Some(Pos { seg: 1, off: 300 });
        assert!(wait_for(Duration::from_secs(2), || read_state(
            &f.settings.spool_dir
        ) == recorded));
        drop(conn);
        assert!(wait_for(Duration::from_secs(5), || !stats.connected()));

        // After that connection goes, only new lines travel.
        let more: String = (5..8).map(|i| line(i, 60)).collect();
        spool.append(more.as_bytes()).unwrap();
        let mut conn = accept(&listener, &config);
        let third = read_until(&mut conn, "\"d-7\"");
        for i in 0..5 {
            assert!(
                !third.contains(&format!("\"d-{i}\"")),
                "d-{i} sent again: {third}"
            );
        }
        assert!(wait_for(Duration::from_secs(5), || stats.shipped() == 8));
        assert_eq!(stats.resent(), 5);
        drop(spool);
        drop(conn);
    }

    /// A receiver that talks without end (RFC 5425 receivers say nothing) is dropped at
    /// the next look, not read for ever; what it got is not counted as delivered.
    #[test]
    fn a_receiver_that_keeps_talking_is_dropped_and_its_lines_not_confirmed() {
        let mut f = fixture(1 << 20);
        let (listener, config, ca) = tls_receiver(f.dir.path());
        f.settings.address = listener.local_addr().unwrap().to_string();
        f.settings.ca = ca;
        let mut spool = Spool::open(&f.settings).unwrap();
        let stats = spool.stats();
        spool.append(line(0, 60).as_bytes()).unwrap();
        let mut conn = accept(&listener, &config);
        read_until(&mut conn, "\"d-0\"");
        let chatter = vec![b'x'; 16 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats
            .last_error()
            .is_none_or(|e| !e.contains("unasked"))
        {
            assert!(Instant::now() < deadline, "the chatter was read without end");
            // The shipper hangs up at some point: stop writing then.
            if conn.write_all(&chatter).and_then(|()| conn.flush()).is_err() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert_eq!(stats.shipped(), 0, "a line counted delivered to a broken receiver");
        drop(spool);
    }

    /// SECURITY: a receiver whose certificate (from the right CA) is not for `server_name`
    /// gets nothing; the lines stay spooled.
    #[test]
    fn a_receiver_certificate_for_another_name_gets_nothing() {
        let mut f = fixture(1 << 20);
        let (listener, config, ca) = tls_receiver(f.dir.path());
        f.settings.address = listener.local_addr().unwrap().to_string();
        f.settings.ca = ca;
        f.settings.server_name = "siem.example".into();
        let mut spool = Spool::open(&f.settings).unwrap();
        let stats = spool.stats();
        spool.append(line(0, 60).as_bytes()).unwrap();
        let mut conn = accept(&listener, &config);
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match conn.read(&mut buf) {
                Ok(n) => panic!("the receiver got {n} bytes"),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    assert!(Instant::now() < deadline, "the shipper neither sent nor failed");
                }
                // The client refused the handshake.
                Err(_) => break,
            }
        }
        assert!(
            wait_for(Duration::from_secs(5), || stats
                .last_error()
                .is_some_and(|e| e.contains("not valid for name \"siem.example\""))),
            "{:?}",
            stats.last_error()
        );
        assert_eq!(stats.shipped(), 0);
        assert_eq!(stats.spooled_bytes(), 60);
    }

    #[test]
    fn a_bad_ca_file_or_server_name_fails_open() {
        let mut f = fixture(1000);
        f.settings.server_name = "not a name".into();
        let error = Spool::open(&f.settings).unwrap_err();
        assert!(error.contains("server_name \"not a name\""), "{error}");
        f.settings.ca = f.dir.path().join("missing.pem");
        let error = Spool::open(&f.settings).unwrap_err();
        assert!(error.starts_with("audit.syslog: \""), "{error}");
        std::fs::write(f.dir.path().join("empty.pem"), "").unwrap();
        f.settings.ca = f.dir.path().join("empty.pem");
        let error = Spool::open(&f.settings).unwrap_err();
        assert!(error.contains("no PEM certificate found"), "{error}");
    }
}
