//! Security events: what decisions say beyond allow or deny. Each decision's identity
//! outcomes (and whether it was refused as overloaded), its source address and `now` in; the
//! [`SecurityEvent`]s it completes out (a bound token replayed, a burst of forged or expired
//! tokens from one source, a revoked token, a certificate from an unknown CA, an overload),
//! each counted in `portcullis_security_events_total`, logged (rate-limited) and written as
//! an audit line. docs/security-events.md describes each event and the alert rules.
//!
//! The state is bounded whatever the clients do: a window per source for each burst kind,
//! at most [`Thresholds::max_sources`] of them (an attacker chooses its source addresses),
//! the oldest evicted first; and one interval for overload. A decision that is none of
//! these costs two enum matches: this runs on every request.

use crate::facts::RequestFacts;
use crate::identity::{CertRejection, Identity, PeerOutcome, TokenOutcome, TokenRejection};
use crate::metrics::Metrics;
use crate::ratelog::RateLog;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What happened. Each kind has one stable code (the metric's `event` label, the audit
/// line's `event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A token bound to a certificate (RFC 8705 `cnf.x5t#S256`) came with another
    /// certificate, or with none.
    TokenReplay,
    /// Tokens whose signature failed (or whose algorithm is not allowed) came from one
    /// source, [`Thresholds::burst`] of them within [`Thresholds::window`].
    ForgedTokenBurst,
    /// Expired tokens came from one source, [`Thresholds::burst`] of them within
    /// [`Thresholds::window`].
    ExpiredTokenBurst,
    /// A revoked token was used (otherwise valid: signature, time and binding held).
    RevokedToken,
    /// A client certificate did not chain to a trusted CA.
    UnknownCa,
    /// Requests were refused because `limits.max_concurrent` were already being decided.
    Overload,
}

impl EventKind {
    /// Every kind, in the order of [`EventKind::index`].
    pub const ALL: [EventKind; 6] = [
        EventKind::TokenReplay,
        EventKind::ForgedTokenBurst,
        EventKind::ExpiredTokenBurst,
        EventKind::RevokedToken,
        EventKind::UnknownCa,
        EventKind::Overload,
    ];

    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            EventKind::TokenReplay => "token_replay",
            EventKind::ForgedTokenBurst => "forged_token_burst",
            EventKind::ExpiredTokenBurst => "expired_token_burst",
            EventKind::RevokedToken => "revoked_token",
            EventKind::UnknownCa => "unknown_ca",
            EventKind::Overload => "overload",
        }
    }

    /// The severities events of this kind can have (docs/security-events.md says why).
    pub fn severities(self) -> &'static [Severity] {
        match self {
            EventKind::TokenReplay => &[Severity::Critical, Severity::High],
            EventKind::ForgedTokenBurst | EventKind::RevokedToken | EventKind::Overload => {
                &[Severity::High]
            }
            EventKind::ExpiredTokenBurst | EventKind::UnknownCa => &[Severity::Medium],
        }
    }

    fn index(self) -> usize {
        match self {
            EventKind::TokenReplay => 0,
            EventKind::ForgedTokenBurst => 1,
            EventKind::ExpiredTokenBurst => 2,
            EventKind::RevokedToken => 3,
            EventKind::UnknownCa => 4,
            EventKind::Overload => 5,
        }
    }
}

/// How urgent an event is: `critical` wants a human now, `high` within hours, `medium` a
/// look during working hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// Worth a look during working hours.
    Medium,
    /// Worth a look within hours.
    High,
    /// Worth waking someone.
    Critical,
}

impl Severity {
    /// The stable code (the metric's `severity` label).
    pub fn code(self) -> &'static str {
        match self {
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// A source as events count it: an IPv4 address, or the /64 prefix of an IPv6 address (one
/// host usually holds a whole /64, so counting single IPv6 addresses would let one client
/// spread a burst over as many sources as it likes). An IPv4-mapped IPv6 address is IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source that `ip` counts as.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The source address of a request's facts, when it is an IP address (not a Unix socket
/// path, not unknown).
pub fn source_of(facts: &RequestFacts) -> Option<IpAddr> {
    if facts.source_address.is_empty() {
        return None;
    }
    facts.source_address.parse().ok()
}

/// One security event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityEvent {
    /// What happened.
    pub kind: EventKind,
    /// How urgent it is.
    pub severity: Severity,
    /// Where the requests came from, when known (never for overload: it is the server's).
    pub source: Option<Source>,
    /// How many requests the event stands for: 1 for a single request, the threshold for a
    /// burst, the refused requests since the last overload event for overload.
    pub count: u64,
    /// What was seen, for a human. Never a token, key or certificate body.
    pub detail: String,
}

impl SecurityEvent {
    /// The audit line of this event, found while deciding `decision_id`.
    pub fn audit_json(&self, decision_id: &str) -> serde_json::Value {
        json!({
            "type": "security_event",
            "time": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "event": self.kind.code(),
            "severity": self.severity.code(),
            "source": self.source.map(|s| s.to_string()),
            "decision_id": decision_id,
            "count": self.count,
            "detail": self.detail,
        })
    }
}

/// What the watcher reads of one decision.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// The decision's id.
    pub decision_id: &'a str,
    /// What became of the certificate and the token, when they were looked at.
    pub identity: Option<&'a Identity>,
    /// The request was refused because `limits.max_concurrent` were being decided.
    pub overloaded: bool,
    /// The client's address, when known.
    pub source: Option<IpAddr>,
}

impl Seen<'_> {
    /// Nothing here can be an event: no rejected credential, no overload. The hot path.
    fn quiet(&self) -> bool {
        !self.overloaded
            && self.identity.is_none_or(|i| {
                !matches!(i.token, TokenOutcome::Rejected(_))
                    && !matches!(i.peer, PeerOutcome::Rejected(_))
            })
    }
}

/// When bursts and overloads become events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures of one kind from one source that make a burst.
    pub burst: u32,
    /// Failures of one kind from all sources together that make a burst: the sources are
    /// what the proxy reports (for forward-auth, the left-most `X-Forwarded-For` unless the
    /// proxy overwrites it), so an attacker can give each request a new one.
    pub burst_all_sources: u32,
    /// The window a burst is counted in, from the source's first failure in it.
    pub window: Duration,
    /// Sources followed at once per burst kind; past it the oldest window is forgotten.
    pub max_sources: usize,
    /// At most one overload event per interval.
    pub overload_interval: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            burst: 10,
            burst_all_sources: 100,
            window: Duration::from_secs(60),
            max_sources: 10_000,
            overload_interval: Duration::from_secs(60),
        }
    }
}

/// One source's current window of failures of one kind.
#[derive(Debug)]
struct Window {
    started: Instant,
    count: u32,
    /// The burst of this window has been reported.
    fired: bool,
}

/// Windows of failures by source, at most `max_sources` of them. `order` holds the windows'
/// starts oldest first, so expiry and eviction look at its front only.
#[derive(Debug, Default)]
struct Bursts {
    windows: HashMap<Option<Source>, Window>,
    order: VecDeque<(Option<Source>, Instant)>,
}

impl Bursts {
    /// Counts one failure from `source` at `now`: the burst's size when this failure
    /// completes it (once per window), else `None`.
    fn hit(&mut self, source: Option<Source>, now: Instant, t: &Thresholds) -> Option<u64> {
        let live = |w: &Window| now.saturating_duration_since(w.started) < t.window;
        // Forget the windows that are over; they are at the front.
        while let Some(&(old, started)) = self.order.front() {
            if now.saturating_duration_since(started) < t.window {
                break;
            }
            self.order.pop_front();
            if self.windows.get(&old).is_some_and(|w| w.started == started) {
                self.windows.remove(&old);
            }
        }
        if self.windows.get(&source).is_none_or(|w| !live(w)) {
            // SECURITY: the sources are the clients' to choose; a new one evicts the oldest
            // window rather than grow the map.
            while self.windows.len() >= t.max_sources.max(1) && !self.windows.contains_key(&source)
            {
                let Some((old, started)) = self.order.pop_front() else {
                    break;
                };
                if self.windows.get(&old).is_some_and(|w| w.started == started) {
                    self.windows.remove(&old);
                }
            }
            self.order.push_back((source, now));
            // Records of replaced windows can only linger when threads' clocks were read out
            // of order; whatever happens, `order` stays within twice the cap.
            while self.order.len() > 2 * t.max_sources.max(1) {
                if let Some((old, started)) = self.order.pop_front()
                    && self.windows.get(&old).is_some_and(|w| w.started == started)
                {
                    self.windows.remove(&old);
                }
            }
            self.windows.insert(
                source,
                Window {
                    started: now,
                    count: 0,
                    fired: false,
                },
            );
        }
        let window = self.windows.get_mut(&source)?;
        window.count = window.count.saturating_add(1);
        if !window.fired && window.count >= t.burst {
            window.fired = true;
            Some(u64::from(window.count))
        } else {
            None
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.len()
    }
}

/// Overloads since the last overload event.
#[derive(Debug, Default)]
struct Overloads {
    last_event: Option<Instant>,
    since: u64,
}

impl Overloads {
    /// Counts one refused request: the count to report when an event is due (the first
    /// overload, then at most one per `interval`), else `None`.
    fn hit(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        self.since = self.since.saturating_add(1);
        let due = self
            .last_event
            .is_none_or(|at| now.saturating_duration_since(at) >= interval);
        if due {
            self.last_event = Some(now);
            Some(std::mem::take(&mut self.since))
        } else {
            None
        }
    }
}

/// Watches decisions for security events; one per engine, shared by every request.
#[derive(Debug)]
pub struct SecurityWatch {
    thresholds: Thresholds,
    forged: Mutex<Bursts>,
    expired: Mutex<Bursts>,
    /// The same failures counted across all sources (one window, keyed by no source).
    forged_all: Mutex<Bursts>,
    expired_all: Mutex<Bursts>,
    overloads: Mutex<Overloads>,
    metrics: Arc<Metrics>,
    /// One log budget per kind, in the order of [`EventKind::ALL`].
    logs: [RateLog; 6],
}

/// WARN lines per kind of event per interval (every event is counted and audited anyway).
const LOG_BURST: u32 = 5;
const LOG_INTERVAL: Duration = Duration::from_secs(60);

impl SecurityWatch {
    /// A watcher with the default thresholds, counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> SecurityWatch {
        SecurityWatch::with_thresholds(metrics, Thresholds::default())
    }

    /// A watcher with these thresholds. Every (event, severity) series is created at zero,
    /// so that an alert on its increase sees the first event.
    pub fn with_thresholds(metrics: Arc<Metrics>, thresholds: Thresholds) -> SecurityWatch {
        for kind in EventKind::ALL {
            for severity in kind.severities() {
                metrics.security_events(kind.code(), severity.code(), 0);
            }
        }
        let log = |kind: &'static str| RateLog::new(kind, LOG_BURST, LOG_INTERVAL);
        SecurityWatch {
            thresholds,
            forged: Mutex::default(),
            expired: Mutex::default(),
            forged_all: Mutex::default(),
            expired_all: Mutex::default(),
            overloads: Mutex::default(),
            metrics,
            logs: [
                log("security events: token_replay"),
                log("security events: forged_token_burst"),
                log("security events: expired_token_burst"),
                log("security events: revoked_token"),
                log("security events: unknown_ca"),
                log("security events: overload"),
            ],
        }
    }

    /// Classifies one decision and records what it completes: each event counted, logged
    /// (at most [`LOG_BURST`] WARN lines per kind per minute) and handed to `audit` as its
    /// audit line. Reads the clock only when the decision can be an event.
    pub fn record(&self, seen: &Seen<'_>, audit: impl Fn(&serde_json::Value)) {
        if seen.quiet() {
            return;
        }
        for event in self.observe(seen, Instant::now()) {
            self.metrics
                .security_events(event.kind.code(), event.severity.code(), 1);
            self.logs[event.kind.index()].event(|| {
                tracing::warn!(
                    event = event.kind.code(),
                    severity = event.severity.code(),
                    source = event.source.map(|s| s.to_string()),
                    count = event.count,
                    decision_id = seen.decision_id,
                    "security event: {}",
                    event.detail
                );
            });
            audit(&event.audit_json(seen.decision_id));
        }
    }

    /// The events one decision completes at `now`; updates the burst and overload state.
    pub fn observe(&self, seen: &Seen<'_>, now: Instant) -> Vec<SecurityEvent> {
        let mut events = Vec::new();
        if seen.quiet() {
            return events;
        }
        let source = seen.source.map(Source::of);
        let single = |kind, severity, detail: String| SecurityEvent {
            kind,
            severity,
            source,
            count: 1,
            detail,
        };
        if seen.overloaded
            && let Some(count) = lock(&self.overloads).hit(now, self.thresholds.overload_interval)
        {
            events.push(SecurityEvent {
                kind: EventKind::Overload,
                severity: Severity::High,
                source: None,
                count,
                detail: format!(
                    "{count} request(s) refused as overloaded since the last overload event"
                ),
            });
        }
        let Some(identity) = seen.identity else {
            return events;
        };
        if let PeerOutcome::Rejected(CertRejection::UnknownIssuer(why)) = &identity.peer {
            events.push(single(
                EventKind::UnknownCa,
                Severity::Medium,
                format!("client certificate does not chain to a trusted CA: {why}"),
            ));
        }
        let TokenOutcome::Rejected(rejection) = &identity.token else {
            return events;
        };
        // One source's burst, and the burst of all sources together, which no choice of
        // source addresses escapes (each fires once per window).
        let burst = |one: &Mutex<Bursts>, all: &Mutex<Bursts>, kind, severity, what: &str| {
            let within = humantime::format_duration(self.thresholds.window);
            let from_one = lock(one)
                .hit(source, now, &self.thresholds)
                .map(|count| SecurityEvent {
                    kind,
                    severity,
                    source,
                    count,
                    detail: format!("{count} {what} from one source within {within}"),
                });
            let everywhere = Thresholds {
                burst: self.thresholds.burst_all_sources,
                ..self.thresholds
            };
            let from_all = lock(all)
                .hit(None, now, &everywhere)
                .map(|count| SecurityEvent {
                    kind,
                    severity,
                    source: None,
                    count,
                    detail: format!("{count} {what} from all sources together within {within}"),
                });
            from_one.into_iter().chain(from_all)
        };
        match rejection {
            // RFC 8705 §3: the token verified (signature, issuer, time), so it was issued
            // to someone; it came with a certificate that verified and is not theirs.
            TokenRejection::BindingMismatch => events.push(single(
                EventKind::TokenReplay,
                Severity::Critical,
                match identity.peer() {
                    Some(peer) => format!(
                        "certificate-bound token presented with another verified certificate ({})",
                        describe(peer)
                    ),
                    None => "certificate-bound token presented with another certificate".into(),
                },
            )),
            // Without any certificate, or with one no trusted CA issued: replayed from
            // where the holder's key is not. A certificate of a trusted CA that failed for
            // another reason (expired, revoked) is the holder's own, not a replay.
            TokenRejection::BoundWithoutCertificate => {
                let without = match &identity.peer {
                    PeerOutcome::NotPresented => Some("without a certificate"),
                    PeerOutcome::Rejected(CertRejection::UnknownIssuer(_)) => {
                        Some("with a certificate from an unknown CA")
                    }
                    _ => None,
                };
                if let Some(how) = without {
                    events.push(single(
                        EventKind::TokenReplay,
                        Severity::High,
                        format!("certificate-bound token presented {how}"),
                    ));
                }
            }
            TokenRejection::Revoked => events.push(single(
                EventKind::RevokedToken,
                Severity::High,
                "revoked token used (its signature, time and binding were valid)".into(),
            )),
            // `alg` outside the issuer's list is the key-confusion and `none` attempt:
            // forged as surely as a bad signature.
            TokenRejection::BadSignature | TokenRejection::AlgorithmNotAllowed(_) => events
                .extend(burst(
                    &self.forged,
                    &self.forged_all,
                    EventKind::ForgedTokenBurst,
                    Severity::High,
                    "tokens failed signature verification",
                )),
            TokenRejection::Expired => events.extend(burst(
                &self.expired,
                &self.expired_all,
                EventKind::ExpiredTokenBurst,
                Severity::Medium,
                "expired tokens",
            )),
            _ => {}
        }
        events
    }

    /// Sources with a live forged-token window, and with an expired-token window.
    #[cfg(test)]
    fn tracked_sources(&self) -> (usize, usize) {
        (lock(&self.forged).len(), lock(&self.expired).len())
    }
}

/// A poisoned lock only means a panic elsewhere while counting: the counts stand.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who a verified certificate names, for a detail: its SPIFFE ID, else its subject.
fn describe(peer: &crate::identity::PeerIdentity) -> String {
    match peer.spiffe_id() {
        Some(id) => id.to_string(),
        None => format!("subject \"{}\"", peer.subject()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "192.0.2.1";
    const B: &str = "192.0.2.2";

    fn watch(t: Thresholds) -> SecurityWatch {
        SecurityWatch::with_thresholds(Arc::new(Metrics::new()), t)
    }

    fn identity(peer: PeerOutcome, token: TokenOutcome) -> Identity {
        Identity { peer, token }
    }

    fn token(r: TokenRejection) -> Identity {
        identity(PeerOutcome::NotPresented, TokenOutcome::Rejected(r))
    }

    fn seen<'a>(identity: Option<&'a Identity>, source: &str) -> Seen<'a> {
        Seen {
            decision_id: "d-1",
            identity,
            overloaded: false,
            source: source.parse().ok(),
        }
    }

    /// What a case expects: (kind, severity) of each event.
    type Expected = Vec<(EventKind, Severity)>;

    /// (kind, severity) of each event.
    fn kinds(events: &[SecurityEvent]) -> Expected {
        events.iter().map(|e| (e.kind, e.severity)).collect()
    }

    #[test]
    fn each_single_request_event_fires_and_ordinary_decisions_fire_nothing() {
        use EventKind::*;
        use Severity::*;
        let unknown_ca = || PeerOutcome::Rejected(CertRejection::UnknownIssuer("no path".into()));
        let table: Vec<(&str, Identity, Expected)> = vec![
            (
                "bound token, other certificate",
                token(TokenRejection::BindingMismatch),
                vec![(TokenReplay, Critical)],
            ),
            (
                "bound token, no certificate",
                token(TokenRejection::BoundWithoutCertificate),
                vec![(TokenReplay, High)],
            ),
            (
                "bound token, certificate of an unknown CA",
                identity(
                    unknown_ca(),
                    TokenOutcome::Rejected(TokenRejection::BoundWithoutCertificate),
                ),
                vec![(UnknownCa, Medium), (TokenReplay, High)],
            ),
            (
                "bound token, the holder's own certificate expired: not a replay",
                identity(
                    PeerOutcome::Rejected(CertRejection::Expired),
                    TokenOutcome::Rejected(TokenRejection::BoundWithoutCertificate),
                ),
                vec![],
            ),
            (
                "revoked token",
                token(TokenRejection::Revoked),
                vec![(RevokedToken, High)],
            ),
            (
                "certificate of an unknown CA",
                identity(unknown_ca(), TokenOutcome::NotPresented),
                vec![(UnknownCa, Medium)],
            ),
            // Ordinary outcomes: nothing.
            (
                "anonymous",
                identity(PeerOutcome::NotPresented, TokenOutcome::NotPresented),
                vec![],
            ),
            (
                "expired certificate",
                identity(
                    PeerOutcome::Rejected(CertRejection::Expired),
                    TokenOutcome::NotPresented,
                ),
                vec![],
            ),
            (
                "wrong audience",
                token(TokenRejection::WrongAudience {
                    found: vec!["x".into()],
                    accepted: vec!["api".into()],
                }),
                vec![],
            ),
            (
                "malformed token",
                token(TokenRejection::Malformed("x".into())),
                vec![],
            ),
            ("unbound token", token(TokenRejection::Unbound), vec![]),
            (
                "unknown kid",
                token(TokenRejection::UnknownKey {
                    issuer: "i".into(),
                    kid: "k".into(),
                }),
                vec![],
            ),
            // One forged or expired token is not a burst.
            ("one forged token", token(TokenRejection::BadSignature), vec![]),
            ("one expired token", token(TokenRejection::Expired), vec![]),
        ];
        let now = Instant::now();
        for (name, id, expected) in table {
            let w = watch(Thresholds::default());
            let events = w.observe(&seen(Some(&id), A), now);
            assert_eq!(kinds(&events), expected, "{name}");
            for e in &events {
                assert_eq!((e.count, e.source), (1, Some(Source::of(A.parse().unwrap()))), "{name}");
            }
        }
        // Refused before the credentials were looked at, not overloaded: nothing.
        let w = watch(Thresholds::default());
        assert!(w.observe(&seen(None, A), now).is_empty());
    }

    #[test]
    fn bursts_fire_once_per_window_per_source_at_the_threshold() {
        let t = Thresholds {
            burst: 10,
            window: Duration::from_secs(60),
            ..Thresholds::default()
        };
        for (rejection, kind, severity) in [
            (
                TokenRejection::BadSignature,
                EventKind::ForgedTokenBurst,
                Severity::High,
            ),
            (
                TokenRejection::AlgorithmNotAllowed("HS256".into()),
                EventKind::ForgedTokenBurst,
                Severity::High,
            ),
            (
                TokenRejection::Expired,
                EventKind::ExpiredTokenBurst,
                Severity::Medium,
            ),
        ] {
            let w = watch(t);
            let id = token(rejection.clone());
            let t0 = Instant::now();
            let at = |s: u64| t0 + Duration::from_secs(s);
            let fire = |source: &str, s: u64| w.observe(&seen(Some(&id), source), at(s));
            // 9 from A, 9 from B: below the threshold, nothing.
            for _ in 0..9 {
                assert!(fire(A, 1).is_empty(), "{rejection:?}: below the threshold");
                assert!(fire(B, 1).is_empty(), "{rejection:?}: another source");
            }
            // A's tenth within the window: one event, with A and the count.
            let events = fire(A, 59);
            assert_eq!(kinds(&events), vec![(kind, severity)], "{rejection:?}");
            assert_eq!(events[0].count, 10);
            assert_eq!(events[0].source, Some(Source::of(A.parse().unwrap())));
            // More in the same window: nothing more.
            for _ in 0..50 {
                assert!(fire(A, 59).is_empty(), "{rejection:?}: once per window");
            }
            // B's window (started at 1 s) is over at 61 s: its nine are forgotten.
            assert!(fire(B, 61).is_empty(), "{rejection:?}: B's old window");
            // A's window is over too: a new one, which fires again at its tenth.
            for _ in 0..9 {
                assert!(fire(A, 70).is_empty(), "{rejection:?}: A's new window");
            }
            assert_eq!(kinds(&fire(A, 71)), vec![(kind, severity)], "{rejection:?}");
        }
    }

    /// SECURITY: the sources are the proxy's report (a client-written `X-Forwarded-For`
    /// behind some proxies): a burst spread over a new source per request still fires,
    /// once per window, counted across all sources.
    #[test]
    fn a_burst_spread_over_many_sources_fires_once_across_them() {
        let w = watch(Thresholds::default());
        let id = token(TokenRejection::BadSignature);
        let t0 = Instant::now();
        let mut events = Vec::new();
        for i in 0..250u32 {
            let source = format!("198.51.{}.{}", i / 250, i % 250);
            events.extend(w.observe(&seen(Some(&id), &source), t0 + Duration::from_millis(i.into())));
            if i == 98 {
                assert!(events.is_empty(), "fired below 100: {events:?}");
            }
        }
        assert_eq!(kinds(&events), vec![(EventKind::ForgedTokenBurst, Severity::High)]);
        assert_eq!((events[0].count, events[0].source), (100, None));
        assert!(events[0].detail.contains("all sources"), "{}", events[0].detail);
    }

    #[test]
    fn nine_per_window_never_fires() {
        let w = watch(Thresholds::default());
        let id = token(TokenRejection::BadSignature);
        let t0 = Instant::now();
        for minute in 0..10u64 {
            for i in 0..9u64 {
                let at = t0 + Duration::from_secs(minute * 60 + i);
                assert!(w.observe(&seen(Some(&id), A), at).is_empty());
            }
        }
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let w = watch(Thresholds::default());
        let id = token(TokenRejection::BadSignature);
        let now = Instant::now();
        let events: Vec<_> = (1..=10)
            .flat_map(|i| w.observe(&seen(Some(&id), &format!("2001:db8:1:2::{i:x}")), now))
            .collect();
        assert_eq!(kinds(&events), vec![(EventKind::ForgedTokenBurst, Severity::High)]);
        assert_eq!(
            events[0].source.map(|s| s.to_string()).as_deref(),
            Some("2001:db8:1:2::/64")
        );
        // Another /64 counts on its own; an IPv4-mapped address is its IPv4 address.
        assert!(w.observe(&seen(Some(&id), "2001:db8:1:3::1"), now).is_empty());
        assert_eq!(
            Source::of("::ffff:192.0.2.1".parse().unwrap()),
            Source::of(A.parse().unwrap())
        );
    }

    #[test]
    fn unknown_sources_count_together() {
        let w = watch(Thresholds::default());
        let id = token(TokenRejection::Expired);
        let now = Instant::now();
        let events: Vec<_> = (0..10)
            .flat_map(|_| w.observe(&seen(Some(&id), "/run/envoy.sock"), now))
            .collect();
        assert_eq!(kinds(&events), vec![(EventKind::ExpiredTokenBurst, Severity::Medium)]);
        assert_eq!(events[0].source, None);
    }

    #[test]
    fn the_per_source_state_stays_bounded_under_100k_sources() {
        // The burst across all sources (which this spread makes) is another test's.
        let t = Thresholds {
            burst_all_sources: u32::MAX,
            ..Thresholds::default()
        };
        let w = watch(t);
        let forged = token(TokenRejection::BadSignature);
        let expired = token(TokenRejection::Expired);
        let now = Instant::now();
        for i in 0..100_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)).to_string();
            assert!(w.observe(&seen(Some(&forged), &ip), now).is_empty());
            assert!(w.observe(&seen(Some(&expired), &ip), now).is_empty());
        }
        assert_eq!(w.tracked_sources(), (t.max_sources, t.max_sources));
        for bursts in [&w.forged, &w.expired] {
            assert!(lock(bursts).order.len() <= t.max_sources);
        }
        // The newest sources are the ones kept: the last one still bursts at its tenth.
        let last = "10.1.134.159"; // 10.0.0.0 + 99_999
        let events: Vec<_> = (0..9)
            .flat_map(|_| w.observe(&seen(Some(&forged), last), now))
            .collect();
        assert_eq!(kinds(&events), vec![(EventKind::ForgedTokenBurst, Severity::High)]);
    }

    #[test]
    fn overload_is_one_event_per_interval_with_the_count() {
        let w = watch(Thresholds::default());
        let t0 = Instant::now();
        let overloaded = |s: u64| {
            let seen = Seen {
                overloaded: true,
                ..seen(None, A)
            };
            w.observe(&seen, t0 + Duration::from_secs(s))
        };
        let first = overloaded(0);
        assert_eq!(kinds(&first), vec![(EventKind::Overload, Severity::High)]);
        assert_eq!((first[0].count, first[0].source), (1, None));
        for s in 1..60 {
            assert!(overloaded(s).is_empty(), "at {s} s");
        }
        // The next one, a minute on, counts the 59 left out and itself.
        let next = overloaded(60);
        assert_eq!(next[0].count, 60);
    }

    #[test]
    fn record_counts_and_audits_each_event_and_never_a_credential() {
        let metrics = Arc::new(Metrics::new());
        let w = SecurityWatch::new(metrics.clone());
        // Every series exists from the start, at zero.
        let text = metrics.render();
        for kind in EventKind::ALL {
            for severity in kind.severities() {
                let series = format!(
                    "portcullis_security_events_total{{event=\"{}\",severity=\"{}\"}} 0",
                    kind.code(),
                    severity.code()
                );
                assert!(text.contains(&series), "{series} in\n{text}");
            }
        }
        let lines = Mutex::new(Vec::new());
        let id = token(TokenRejection::BindingMismatch);
        let s = Seen {
            decision_id: "0b5e",
            ..seen(Some(&id), A)
        };
        w.record(&s, |line| lock(&lines).push(line.clone()));
        // A quiet decision records nothing.
        let quiet = identity(PeerOutcome::NotPresented, TokenOutcome::NotPresented);
        w.record(&seen(Some(&quiet), A), |line| lock(&lines).push(line.clone()));
        let lines = lock(&lines).clone();
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        for (key, value) in [
            ("type", json!("security_event")),
            ("event", json!("token_replay")),
            ("severity", json!("critical")),
            ("source", json!(A)),
            ("decision_id", json!("0b5e")),
            ("count", json!(1)),
        ] {
            assert_eq!(line[key], value, "{key} in {line}");
        }
        let time = line["time"].as_str().unwrap_or_default();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert!(
            metrics.render().contains(
                "portcullis_security_events_total{event=\"token_replay\",severity=\"critical\"} 1"
            )
        );
    }
}
