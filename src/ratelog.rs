//! Rate-limited logging for what an outsider can make happen over and over (failed TLS
//! handshakes, dropped or evicted connections, accept errors, unreadable files): for each
//! kind of event, at most a few lines per interval, then one line saying how many similar
//! lines were left out. An event in, a line or nothing out; counting is for metrics.
//!
//! Why: one WARN line per failed handshake lets anyone who can open a TCP connection fill
//! the disk and bury the lines that matter (GitHub issue 12, finding 10e).
//!
//! ```
//! use portcullis::ratelog::RateLog;
//! use std::time::Duration;
//! static FAILED: RateLog = RateLog::new("TLS handshake failures", 5, Duration::from_secs(30));
//! FAILED.event(|| tracing::warn!("TLS handshake failed"));
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A budget of log lines for one kind of event: `burst` lines per `interval`. Cheap to
/// share (`static` or in an `Arc`); safe to use from any thread.
#[derive(Debug)]
pub struct RateLog {
    kind: &'static str,
    burst: u32,
    interval: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current interval began; `None` before the first event.
    started: Option<Instant>,
    /// Lines logged in the current interval.
    logged: u32,
    /// Events left out since the last line logged.
    suppressed: u64,
}

impl RateLog {
    /// A budget of `burst` lines per `interval` for the events called `kind` (used in the
    /// line that reports what was left out, e.g. "TLS handshake failures").
    pub const fn new(kind: &'static str, burst: u32, interval: Duration) -> RateLog {
        RateLog {
            kind,
            burst,
            interval,
            window: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether an event at `now` may be logged: `Some(n)` if so, `n` being how many events
    /// of this kind were left out since the last line logged (say so); `None` to leave
    /// this one out.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting: the counts stand.
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let expired = w
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= self.interval);
        if expired {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed = w.suppressed.saturating_add(1);
            None
        }
    }

    /// Runs `emit` (which logs the event) if the budget allows, first logging one WARN
    /// line with the number of similar events left out, if any.
    pub fn event(&self, emit: impl FnOnce()) {
        if let Some(suppressed) = self.admit(Instant::now()) {
            if suppressed > 0 {
                tracing::warn!(
                    kind = self.kind,
                    suppressed,
                    "{suppressed} similar messages suppressed ({}): at most {} per {}",
                    self.kind,
                    self.burst,
                    humantime::format_duration(self.interval)
                );
            }
            emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_interval_then_the_count_of_what_was_left_out() {
        let log = RateLog::new("test events", 3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // (time, expected verdict)
        let table = [
            (0, Some(0)),
            (1, Some(0)),
            (2, Some(0)),
            (3, None),
            (4, None),
            (9_999, None),
            // A new interval: the first line reports the three left out.
            (10_000, Some(3)),
            (10_001, Some(0)),
            (10_002, Some(0)),
            (10_003, None),
            // Long quiet: a new interval again.
            (60_000, Some(1)),
        ];
        for (ms, expected) in table {
            assert_eq!(log.admit(at(ms)), expected, "at {ms} ms");
        }
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let log = RateLog::new("flood", 5, Duration::from_secs(30));
        let t0 = Instant::now();
        let logged = (0..10_000u64)
            .filter(|i| log.admit(t0 + Duration::from_micros(*i)).is_some())
            .count();
        assert_eq!(logged, 5);
    }

    #[test]
    fn event_runs_the_closure_only_within_the_budget() {
        let log = RateLog::new("closure", 2, Duration::from_secs(3600));
        let mut ran = 0;
        for _ in 0..10 {
            log.event(|| ran += 1);
        }
        assert_eq!(ran, 2);
    }
}
