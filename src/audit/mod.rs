//! The audit log: one line per decision (and per security event), to stdout, stderr or an
//! append-only file, sealed into a hash chain, and optionally shipped to syslog. Lines carry
//! decision data only (ids, principal, action, resource, decision, policies, reasons,
//! latency), never a token, key or certificate body.
//!
//! Nothing is answered without its line: [`AuditLog::record`] returns once the `write` of
//! the line has completed (the line is in the kernel, so killing the process loses nothing
//! answered), or failed. A line for a file is written by the request itself, under the
//! writer's lock: a page-cache write costs a system call, less than handing it to a thread
//! and waiting. A line that may block (a pipe: stdout, stderr) or must be `fsync`ed first
//! goes to the writer thread, which writes whatever has queued up meanwhile in one `write`
//! and one `fsync` (group commit). When a line cannot be written, the settings choose: deny
//! the decision (`deny`, the default) or serve it and count the line as dropped (`serve`).
//!
//! The file sink follows logrotate (it reopens its path on SIGHUP, [`AuditLog::reopen`],
//! and when it sees the path renamed or removed) and rotates by size itself when asked. A
//! failed write is undone (the file is cut back to its last whole line), so the file never
//! holds half a line and the chain never skips one.

use crate::config::{AuditFailureAction, AuditFormat, AuditFsync, AuditSettings, AuditSink};
use crate::metrics::AuditCounters;
use crate::ratelog::RateLog;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

mod chain;
pub(crate) mod ecs;
pub(crate) mod verify;
pub mod syslog;

/// Lines that may wait for the writer before requests wait for room.
const QUEUE: usize = 64 * 1024;
/// The most one `write` carries: a bound on how long a batch holds its requests.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// How often the writer thread looks at an idle log: a broken sink tried again while no
/// line comes to try it, a timed checkpoint.
const RETRY: Duration = Duration::from_secs(1);
/// How often the file's path is checked for a rename (logrotate without a SIGHUP).
const RENAME_CHECK: Duration = Duration::from_millis(500);
/// The longest line looked at when the chain is resumed from an existing file.
const RESUME_TAIL: u64 = 1024 * 1024;

static WRITE_FAILED: RateLog = RateLog::new("audit write failures", 3, Duration::from_secs(30));

/// Why a line was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No space (`ENOSPC`, `EDQUOT`, a full spool): `disk_full_action`.
    Full,
    /// Any other error: `disk_error_action`.
    Error,
}

type Ack = tokio::sync::oneshot::Sender<Result<(), Failure>>;

enum Message {
    /// A line (one JSON object, no newline), and who waits for it to be written.
    Line(String, Option<Ack>),
    /// Answered once every line sent before it has been written (or has failed).
    Flush(SyncSender<()>),
    /// Reopen the file at its path (SIGHUP after logrotate's rename).
    Reopen,
}

/// What became of a decision's audit line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Written: in the kernel, or past the sink's `fsync` when one is configured.
    Written,
    /// Not written, and the settings say serve anyway: the line is counted as dropped.
    Dropped,
    /// Not written, and the settings say deny: the reason, for the decision's reasons.
    Refused(String),
}

/// Health of the sink, shared by the writer and the readiness check.
#[derive(Debug, Default)]
struct Health {
    broken: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// Where audit lines are written. Dropping it writes what is queued and stops the writer.
pub struct AuditLog {
    queue: Option<SyncSender<Message>>,
    writer: Option<JoinHandle<()>>,
    /// The writer's state; a request writes its own line under this lock when `inline`.
    shared: Arc<Mutex<Writer>>,
    /// Whether requests write their lines themselves (a file, without `fsync = "always"`),
    /// rather than hand them to the writer thread.
    inline: bool,
    health: Arc<Health>,
    counters: AuditCounters,
    full_action: AuditFailureAction,
    error_action: AuditFailureAction,
    format: AuditFormat,
    syslog_stats: Option<Arc<syslog::SyslogStats>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Opens the sink (resuming the chain of an existing file) and starts the writer.
    pub fn open(settings: &AuditSettings, counters: AuditCounters) -> Result<AuditLog, String> {
        let (sink, last) = Sink::open(settings)?;
        let spool = settings
            .syslog
            .as_ref()
            .map(syslog::Spool::open)
            .transpose()?;
        let syslog_stats = spool.as_ref().map(syslog::Spool::stats);
        let signer = match &settings.signing_key {
            Some(path) => Some(
                chain::Signer::load(path).map_err(|e| format!("audit.signing_key: {e}"))?,
            ),
            None => None,
        };
        let chain = settings.chain.then(|| {
            chain::Chain::resume(
                last.as_deref(),
                signer,
                settings.checkpoint_every,
                settings.checkpoint_interval,
            )
        });
        let health = Arc::new(Health::default());
        counters.sink_up.set(1);
        let (queue, lines) = sync_channel(QUEUE);
        let writer = Writer {
            sink,
            spool,
            chain,
            fsync: settings.fsync,
            health: health.clone(),
            counters: counters.clone(),
            broken_since: None,
            failed_since_broken: 0,
            dirty_since: None,
        };
        // A write to a file lands in the page cache: cheaper done by the request itself (a
        // system call) than handed to a thread and waited for (two wake-ups and the
        // context switches, which cost a quarter of the server's CPU per request under
        // load). A pipe may block, and an `fsync` takes milliseconds: those lines go to
        // the writer thread, whose group commit shares one write and one `fsync` among the
        // requests waiting meanwhile, without holding the runtime's threads.
        let inline =
            matches!(settings.sink, AuditSink::File(_)) && settings.fsync != AuditFsync::Always;
        let shared = Arc::new(Mutex::new(writer));
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || Writer::run(thread_shared, lines))
            .map_err(|e| format!("log.audit: cannot start the writer thread: {e}"))?;
        Ok(AuditLog {
            queue: Some(queue),
            writer: Some(thread),
            shared,
            inline,
            health,
            counters,
            full_action: settings.disk_full_action,
            error_action: settings.disk_error_action,
            format: settings.format,
            syslog_stats,
        })
    }

    /// Writes one decision's line and returns once it is written or has failed; what
    /// became of it follows the settings' failure actions. A file's line is written here;
    /// other lines wait for the writer thread's group commit.
    pub async fn record(&self, event: &serde_json::Value) -> Recorded {
        if self.inline {
            let line = self.render(event);
            return match lock(&self.shared).commit(std::slice::from_ref(&line)) {
                Ok(()) => Recorded::Written,
                Err(failure) => self.failed(failure),
            };
        }
        let (ack, written) = tokio::sync::oneshot::channel();
        let sent = self
            .queue
            .as_ref()
            .is_some_and(|q| q.send(Message::Line(self.render(event), Some(ack))).is_ok());
        let failure = if sent {
            match written.await {
                Ok(Ok(())) => return Recorded::Written,
                Ok(Err(failure)) => failure,
                Err(_) => Failure::Error,
            }
        } else {
            Failure::Error
        };
        self.failed(failure)
    }

    /// What becomes of a decision whose line was not written, by the failure actions.
    fn failed(&self, failure: Failure) -> Recorded {
        let action = match failure {
            Failure::Full => self.full_action,
            Failure::Error => self.error_action,
        };
        match action {
            AuditFailureAction::Serve => {
                self.counters.dropped.inc();
                Recorded::Dropped
            }
            AuditFailureAction::Deny => {
                self.counters.failed.inc();
                Recorded::Refused(format!(
                    "audit_unavailable: the decision's audit line could not be written ({})",
                    self.last_error()
                        .unwrap_or_else(|| "the audit writer has stopped".into())
                ))
            }
        }
    }

    /// Queues one line without waiting for it (security events): a failure is counted as
    /// a dropped line.
    pub fn write(&self, event: &serde_json::Value) {
        let sent = self
            .queue
            .as_ref()
            .is_some_and(|q| q.send(Message::Line(self.render(event), None)).is_ok());
        if !sent {
            self.counters.dropped.inc();
        }
    }

    /// The line in the configured format (the chain's fields are added by the writer).
    fn render(&self, event: &serde_json::Value) -> String {
        match self.format {
            AuditFormat::Json => event.to_string(),
            AuditFormat::Ecs => ecs::ecs(event).to_string(),
        }
    }

    /// With `[audit.syslog]`: what copies the shipper's counters into the metrics at each
    /// scrape.
    pub fn scrape_hook(&self) -> Option<Box<dyn Fn() + Send + Sync>> {
        let stats = self.syslog_stats.clone()?;
        let counters = self.counters.clone();
        Some(Box::new(move || {
            let raise = |counter: &prometheus_client::metrics::counter::Counter, to: u64| {
                counter.inc_by(to.saturating_sub(counter.get()));
            };
            raise(&counters.syslog_shipped, stats.shipped());
            raise(&counters.syslog_resent, stats.resent());
            counters
                .syslog_spool_bytes
                .set(i64::try_from(stats.spooled_bytes()).unwrap_or(i64::MAX));
            counters.syslog_connected.set(i64::from(stats.connected()));
        }))
    }

    /// Reopens the file at its configured path (after logrotate renamed it).
    pub fn reopen(&self) {
        if let Some(q) = &self.queue {
            let _ = q.send(Message::Reopen);
        }
    }

    /// Why the sink is not writing, while it is not.
    pub fn broken(&self) -> Option<String> {
        self.health
            .broken
            .load(Ordering::Acquire)
            .then(|| self.last_error().unwrap_or_default())
    }

    fn last_error(&self) -> Option<String> {
        self.health.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Waits (at most `limit`) until every line queued so far is written (or has failed).
    pub fn flush(&self, limit: Duration) -> bool {
        let (ack, done) = sync_channel(1);
        self.queue
            .as_ref()
            .is_some_and(|q| q.send(Message::Flush(ack)).is_ok())
            && done.recv_timeout(limit).is_ok()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written everything.
        drop(self.queue.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer's state, also after a thread panicked holding it (the state stays
/// consistent: a batch is written whole or cut back).
fn lock(shared: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The end of an existing audit file: a torn last line (a write the host crashed in) is cut,
/// so that the next line does not join it (a line's reply waits for its whole write, so
/// that line's decision was never answered). Returns the new length and the last whole
/// line, which the chain resumes after.
fn repair_tail(path: &Path, file: &File, len: u64) -> std::io::Result<(u64, Option<String>)> {
    use std::os::unix::fs::FileExt;
    let start = len.saturating_sub(RESUME_TAIL);
    let mut tail = vec![0; usize::try_from(len - start).unwrap_or(0)];
    file.read_exact_at(&mut tail, start)?;
    let whole = match tail.iter().rposition(|&b| b == b'\n') {
        Some(at) => at + 1,
        None if start == 0 => 0,
        // No line end in the last MiB: not a torn line of ours; leave it to `audit verify`.
        None => return Ok((len, None)),
    };
    let new_len = start + whole as u64;
    if new_len < len {
        file.set_len(new_len)?;
        tracing::warn!(
            "audit log {}: cut a torn last line of {} bytes (a write cut short by a crash; its decision was never answered)",
            path.display(),
            len - new_len
        );
    }
    let last = tail[..whole]
        .strip_suffix(b"\n")
        .and_then(|lines| lines.rsplit(|&b| b == b'\n').next())
        .map(|line| String::from_utf8_lossy(line).into_owned());
    Ok((new_len, last))
}

enum Out {
    Stdout,
    Stderr,
    File {
        path: PathBuf,
        file: File,
        /// Bytes in the file: where a failed write is cut back to.
        len: u64,
        /// The identity of the file we write, to see a rename of its path.
        id: (u64, u64),
        checked: Instant,
    },
}

/// Where the writer writes, with the built-in rotation.
struct Sink {
    out: Out,
    rotate_size: Option<u64>,
    rotate_keep: usize,
}

/// The file at `path` opened to append (and read back its tail), with its length and
/// identity; never blocking on a FIFO, refusing anything but a regular file.
fn open_append(path: &Path) -> std::io::Result<(File, u64, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    let file = crate::files::open_append(path).map_err(|e| match e {
        crate::files::FileError::Io { source, .. } => source,
        crate::files::FileError::NotRegular { kind, .. } => {
            std::io::Error::other(format!("not a regular file (it is {kind})"))
        }
        other => std::io::Error::other(other.to_string()),
    })?;
    let meta = file.metadata()?;
    Ok((file, meta.len(), (meta.dev(), meta.ino())))
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Sink {
    /// The sink, and the last whole line of an existing file (to resume its chain from).
    fn open(settings: &AuditSettings) -> Result<(Sink, Option<String>), String> {
        let mut last_line = None;
        let out = match &settings.sink {
            AuditSink::Stdout => Out::Stdout,
            AuditSink::Stderr => Out::Stderr,
            AuditSink::File(path) => {
                let (file, len, id) = open_append(path)
                    .map_err(|e| format!("log.audit: {}: cannot open: {e}", path.display()))?;
                let (len, last) = repair_tail(path, &file, len)
                    .map_err(|e| format!("log.audit: {}: cannot repair: {e}", path.display()))?;
                last_line = last;
                Out::File {
                    path: path.clone(),
                    file,
                    len,
                    id,
                    checked: Instant::now(),
                }
            }
        };
        Ok((
            Sink {
                out,
                rotate_size: settings.rotate_size,
                rotate_keep: settings.rotate_keep,
            },
            last_line,
        ))
    }

    /// Writes a batch whole or not at all: a failed file write is cut back.
    fn write(&mut self, batch: &[u8]) -> std::io::Result<()> {
        match &mut self.out {
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(batch).and_then(|()| out.flush())
            }
            Out::Stderr => std::io::stderr().lock().write_all(batch),
            Out::File { file, len, .. } => match file.write_all(batch) {
                Ok(()) => {
                    *len += batch.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    // Half a batch must not stay: the next line would follow a torn one.
                    if let Err(cut) = file.set_len(*len) {
                        tracing::error!("audit log: cannot cut back a failed write: {cut}");
                    }
                    Err(e)
                }
            },
        }
    }

    /// Takes back the last `bytes` written (a batch that another sink failed to take).
    fn undo(&mut self, bytes: usize) {
        if let Out::File { file, len, .. } = &mut self.out {
            let to = len.saturating_sub(bytes as u64);
            match file.set_len(to) {
                Ok(()) => *len = to,
                Err(e) => tracing::error!("audit log: cannot cut back a failed batch: {e}"),
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match &mut self.out {
            Out::File { file, .. } => file.sync_data(),
            _ => Ok(()),
        }
    }

    /// Whether the built-in rotation is due before the next batch.
    fn rotation_due(&self) -> bool {
        match (&self.out, self.rotate_size) {
            (Out::File { len, .. }, Some(max)) => *len >= max,
            _ => false,
        }
    }

    /// The built-in rotation: FILE.(n-1) → FILE.n, …, FILE → FILE.1, then a new FILE.
    fn rotate(&mut self) -> std::io::Result<()> {
        let Out::File { path, .. } = &self.out else {
            return Ok(());
        };
        let path = path.clone();
        let numbered = |n: usize| {
            let mut name = path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        let keep = self.rotate_keep;
        if keep == 0 {
            std::fs::remove_file(&path)?;
        } else {
            let _ = std::fs::remove_file(numbered(keep));
            for n in (1..keep).rev() {
                match std::fs::rename(numbered(n), numbered(n + 1)) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&path, numbered(1))?;
        }
        self.reopen()
    }

    /// Opens the path again (a new file when it was renamed or removed).
    fn reopen(&mut self) -> std::io::Result<()> {
        if let Out::File {
            path,
            file,
            len,
            id,
            checked,
        } = &mut self.out
        {
            let (new, new_len, new_id) = open_append(path)?;
            // Whatever the old file holds is whole: each write was whole or cut back.
            let _ = file.flush();
            *file = new;
            *len = new_len;
            *id = new_id;
            *checked = Instant::now();
        }
        Ok(())
    }

    /// Whether the path now names another file than the one written (or none): logrotate
    /// renamed it without telling us. Checked at most every [`RENAME_CHECK`].
    fn renamed(&mut self) -> bool {
        match &mut self.out {
            Out::File {
                path, id, checked, ..
            } if checked.elapsed() >= RENAME_CHECK => {
                *checked = Instant::now();
                file_id(path) != Some(*id)
            }
            _ => false,
        }
    }
}

/// The writer thread's state.
struct Writer {
    sink: Sink,
    /// With `[audit.syslog]`: every batch the sink took goes to the spool too.
    spool: Option<syslog::Spool>,
    chain: Option<chain::Chain>,
    fsync: AuditFsync,
    health: Arc<Health>,
    counters: AuditCounters,
    /// Since when writes fail, while they do.
    broken_since: Option<SystemTime>,
    /// Lines that failed while broken: told in the line that marks the recovery.
    failed_since_broken: u64,
    /// Since when lines were written without an `fsync` (with `fsync = "<interval>"`).
    dirty_since: Option<Instant>,
}

fn classify(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
            Failure::Full
        }
        _ => Failure::Error,
    }
}

impl Writer {
    /// The writer thread: group commit for the lines sent to it (sinks that may block,
    /// `fsync = "always"`, security events), and the housekeeping of an idle log (a
    /// broken sink tried again, timed checkpoints and `fsync`, reopening).
    fn run(shared: Arc<Mutex<Writer>>, queue: Receiver<Message>) {
        loop {
            let wait = lock(&shared).idle_wait();
            let first = match queue.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut lines = Vec::new();
            let mut acks = Vec::new();
            let mut flushes = Vec::new();
            let mut reopen = false;
            let mut bytes = 0;
            let mut next = first;
            while let Some(message) = next {
                match message {
                    Message::Line(line, ack) => {
                        bytes += line.len() + 1;
                        lines.push(line);
                        acks.push(ack);
                    }
                    Message::Flush(ack) => flushes.push(ack),
                    Message::Reopen => reopen = true,
                }
                next = if bytes < MAX_BATCH_BYTES {
                    queue.try_recv().ok()
                } else {
                    None
                };
            }
            let mut writer = lock(&shared);
            if reopen {
                writer.reopen();
            }
            let result = writer.commit(&lines);
            if result.is_err() {
                // Lines nobody waits for (security events) are counted here; the others
                // by their requests, which know the failure action.
                let unwaited = acks.iter().filter(|a| a.is_none()).count();
                writer.counters.dropped.inc_by(unwaited as u64);
            }
            writer.sync_if_due();
            drop(writer);
            for ack in acks.into_iter().flatten() {
                let _ = ack.send(result);
            }
            for flush in flushes {
                let _ = flush.send(());
            }
        }
        let mut writer = lock(&shared);
        let _ = writer.commit(&[]);
        writer.close_with_checkpoint();
        if writer.fsync != AuditFsync::Never {
            let _ = writer.sink.sync();
        }
    }

    /// How long to wait for a line before doing housekeeping: trying a broken sink
    /// again, an `fsync` that is due.
    ///
    /// Requests write a file's lines themselves, so the thread does not see the sink break
    /// or lines wait for their `fsync` while it sleeps: it looks at least every [`RETRY`],
    /// and every `fsync` interval.
    fn idle_wait(&self) -> Duration {
        let mut wait = RETRY;
        if let AuditFsync::Every(every) = self.fsync {
            wait = wait.min(every);
            if let Some(since) = self.dirty_since {
                wait = wait.min(every.saturating_sub(since.elapsed()));
            }
        }
        wait
    }

    fn reopen(&mut self) {
        if let Err(e) = self.sink.reopen() {
            // The old file stays open: lines keep going somewhere rather than nowhere.
            WRITE_FAILED.event(|| tracing::error!("audit log: cannot reopen: {e}"));
        }
    }

    /// Writes `lines` as one batch, with the line marking a recovery first when the sink
    /// was broken (with no lines, only that line: the retry of a broken sink).
    fn commit(&mut self, lines: &[String]) -> Result<(), Failure> {
        let checkpoint_due = self
            .chain
            .as_ref()
            .is_some_and(|c| c.checkpoint_due(Instant::now()));
        if lines.is_empty() && self.broken_since.is_none() && !checkpoint_due {
            return Ok(());
        }
        if self.sink.renamed() {
            self.reopen();
        }
        if self.sink.rotation_due() {
            // The old file ends with a checkpoint over its last line.
            self.close_with_checkpoint();
            if let Err(e) = self.sink.rotate() {
                WRITE_FAILED.event(|| tracing::error!("audit log: rotation failed: {e}"));
            }
        }
        let mark = self.chain.as_ref().map(chain::Chain::mark);
        let mut batch = Vec::with_capacity(lines.iter().map(|l| l.len() + 120).sum());
        if let Some(since) = self.broken_since {
            let recovered = serde_json::json!({
                "type": "audit_recovered",
                "time": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
                "broken_since": humantime::format_rfc3339_micros(since).to_string(),
                "lines_not_written": self.failed_since_broken,
            });
            self.append(&recovered.to_string(), &mut batch);
        }
        for line in lines {
            self.append(line, &mut batch);
        }
        if let Some(chain) = &mut self.chain
            && chain.checkpoint_due(Instant::now())
        {
            chain.checkpoint(&mut batch);
        }
        let written = self.write_batch(&batch);
        match written {
            Ok(()) => {
                if self.broken_since.take().is_some() {
                    tracing::warn!(
                        "audit log: writing again; {} line(s) were not written meanwhile",
                        self.failed_since_broken
                    );
                    self.failed_since_broken = 0;
                    self.health.broken.store(false, Ordering::Release);
                    self.counters.sink_up.set(1);
                }
                self.counters.written.inc_by(lines.len() as u64);
                if matches!(self.fsync, AuditFsync::Every(_)) && self.dirty_since.is_none() {
                    self.dirty_since = Some(Instant::now());
                }
                Ok(())
            }
            Err(e) => {
                self.failed_since_broken += lines.len() as u64;
                if let (Some(chain), Some(mark)) = (&mut self.chain, mark) {
                    chain.rewind(mark);
                }
                let failure = classify(&e);
                let message = e.to_string();
                WRITE_FAILED.event(|| tracing::error!("audit log write failed: {message}"));
                if let Ok(mut last) = self.health.last_error.lock() {
                    *last = Some(message);
                }
                if self.broken_since.is_none() {
                    self.broken_since = Some(SystemTime::now());
                    self.health.broken.store(true, Ordering::Release);
                    self.counters.sink_up.set(0);
                }
                Err(failure)
            }
        }
    }

    /// Writes a checkpoint over the lines since the last one, if signing (before a rotation
    /// and at shutdown).
    fn close_with_checkpoint(&mut self) {
        let Some(chain) = &mut self.chain else {
            return;
        };
        let mark = chain.mark();
        let mut line = Vec::new();
        chain.checkpoint(&mut line);
        if line.is_empty() {
            return;
        }
        if let Err(e) = self.write_batch(&line) {
            if let Some(chain) = &mut self.chain {
                chain.rewind(mark);
            }
            WRITE_FAILED.event(|| tracing::error!("audit log: checkpoint not written: {e}"));
        }
    }

    /// Writes a batch to the sink (with its `fsync` when `always`) and to the syslog spool
    /// (a full one is `StorageFull`, so `disk_full_action`): to both or, as far as the sink
    /// can be cut back, to neither.
    fn write_batch(&mut self, batch: &[u8]) -> std::io::Result<()> {
        self.sink
            .write(batch)
            .and_then(|()| {
                if self.fsync == AuditFsync::Always {
                    self.sink.sync()
                } else {
                    Ok(())
                }
            })
            .and_then(|()| match &mut self.spool {
                Some(spool) => spool
                    .append(batch)
                    .inspect_err(|_| self.sink.undo(batch.len())),
                None => Ok(()),
            })
    }

    fn append(&mut self, line: &str, batch: &mut Vec<u8>) {
        match &mut self.chain {
            Some(chain) => chain.seal(line, batch),
            None => {
                batch.extend_from_slice(line.as_bytes());
                batch.push(b'\n');
            }
        }
    }

    /// With `fsync = "<interval>"`: syncs once the oldest unsynced line is that old.
    fn sync_if_due(&mut self) {
        let due = match (self.fsync, self.dirty_since) {
            (AuditFsync::Every(every), Some(since)) => since.elapsed() >= every,
            _ => false,
        };
        if due {
            if let Err(e) = self.sink.sync() {
                WRITE_FAILED.event(|| tracing::error!("audit log: fsync failed: {e}"));
            }
            self.dirty_since = None;
        }
    }
}
