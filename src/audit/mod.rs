//! The audit log: one JSON line per decision, to stdout, stderr or an append-only file.
//! Lines carry decision data only (ids, principal, action, resource, decision, policies,
//! reasons, latency), never a token, key or certificate body.
//!
//! Requests never wait on the disk: a line is handed to a writer thread over a bounded
//! queue, and the writer writes whatever has queued up in one go, flushing whenever the
//! queue runs empty, then lets lines gather for [`GATHER`] before it looks again, so that
//! under load a request hands its line over without waking the writer (a wake-up per
//! line cost about 5% of the server's CPU). Nothing is dropped: when the queue is full,
//! the request waits for room.

use crate::config::{AuditSettings, AuditSink};

mod chain;
pub mod syslog;
use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

/// Lines that may wait for the writer before requests wait for it.
const QUEUE: usize = 64 * 1024;
/// How long the writer lets lines gather after a write: the most a line waits for it.
const GATHER: Duration = Duration::from_millis(2);

enum Message {
    Line(String),
    /// Answered once every line sent before it has been written and flushed.
    Flush(SyncSender<()>),
}

/// Where audit lines are written; a write failure is logged, never fatal to a decision.
pub struct AuditLog {
    queue: Option<SyncSender<Message>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

fn write_all(out: &mut impl Write, line: &str) {
    if let Err(e) = out.write_all(line.as_bytes()) {
        tracing::error!("audit log write failed: {e}");
    }
}

fn flush(out: &mut impl Write) {
    if let Err(e) = out.flush() {
        tracing::error!("audit log write failed: {e}");
    }
}

/// The writer thread: blocks for a message, then takes everything else already queued
/// before flushing, so a busy server makes few large writes and an idle one loses nothing;
/// then it pauses for [`GATHER`], so that a busy server's lines queue up meanwhile and
/// their senders find no sleeping writer to wake.
fn run(out: Box<dyn Write + Send>, queue: Receiver<Message>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = queue.recv() {
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => write_all(&mut out, &line),
                Message::Flush(ack) => acks.push(ack),
            }
            next = queue.try_recv().ok();
        }
        flush(&mut out);
        for ack in acks {
            let _ = ack.send(());
        }
        std::thread::sleep(GATHER);
    }
    flush(&mut out);
}

impl AuditLog {
    pub fn open(settings: &AuditSettings) -> Result<AuditLog, String> {
        let out: Box<dyn Write + Send> = match &settings.sink {
            AuditSink::Stdout => Box::new(std::io::stdout()),
            AuditSink::Stderr => Box::new(std::io::stderr()),
            AuditSink::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("log.audit: {}: cannot open: {e}", path.display()))?,
            ),
        };
        let (queue, lines) = sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || run(out, lines))
            .map_err(|e| format!("log.audit: cannot start the writer thread: {e}"))?;
        Ok(AuditLog {
            queue: Some(queue),
            writer: Some(writer),
        })
    }

    /// Queues one line.
    pub fn write(&self, event: &serde_json::Value) {
        let mut line = event.to_string();
        line.push('\n');
        let sent = self
            .queue
            .as_ref()
            .is_some_and(|q| q.send(Message::Line(line)).is_ok());
        if !sent {
            tracing::error!("audit log unavailable: its writer has stopped");
        }
    }

    /// Waits (at most `limit`) until every line queued so far is written and flushed.
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
