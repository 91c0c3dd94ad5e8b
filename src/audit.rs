//! The audit log: one JSON line per decision, to stdout, stderr or an append-only file.
//! Lines carry decision data only (ids, principal, action, resource, decision, policies,
//! reasons, latency), never a token, key or certificate body.

use crate::config::AuditSink;
use std::io::Write;
use std::sync::Mutex;

/// Where audit lines are written; a write failure is logged, never fatal to a decision.
pub struct AuditLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    pub fn open(sink: &AuditSink) -> Result<AuditLog, String> {
        let out: Box<dyn Write + Send> = match sink {
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
        Ok(AuditLog {
            out: Mutex::new(out),
        })
    }

    /// Writes one line.
    pub fn write(&self, event: &serde_json::Value) {
        let mut line = event.to_string();
        line.push('\n');
        match self.out.lock() {
            Ok(mut out) => {
                if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                    tracing::error!("audit log write failed: {e}");
                }
            }
            Err(_) => tracing::error!("audit log unavailable"),
        }
    }
}
