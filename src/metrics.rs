//! Prometheus metrics: counters and gauges the engine, the key fetcher and the reloaders
//! update, rendered in the OpenMetrics text format for `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub issuer: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    pub event: String,
    pub severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// The shadow policy set's metrics (`[policy] shadow_dir`).
#[derive(Debug, Clone, Default)]
struct ShadowMetrics {
    decisions: Family<OutcomeLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    policies: Gauge,
}

/// What the shadow set said beside the live set.
const SHADOW_OUTCOMES: [&str; 4] = ["agree", "gained", "lost", "error"];

type FloatGauge = Gauge<f64, AtomicU64>;

/// The audit log's counters, shared with its writer.
#[derive(Debug, Clone, Default)]
pub struct AuditCounters {
    /// Lines written.
    pub written: Counter,
    /// Lines not written whose decisions were denied (`audit_unavailable`).
    pub failed: Counter,
    /// Lines not written whose decisions were served anyway, and event lines not written.
    pub dropped: Counter,
    /// 1 while the sink writes, 0 while its writes fail.
    pub sink_up: Gauge,
    /// Lines known delivered to the syslog receiver.
    pub syslog_shipped: Counter,
    /// Lines sent to the syslog receiver again after a connection broke.
    pub syslog_resent: Counter,
    /// Bytes in the syslog spool.
    pub syslog_spool_bytes: Gauge,
    /// 1 while connected to the syslog receiver.
    pub syslog_connected: Gauge,
}

/// Work done just before each scrape (copying counters kept elsewhere into the metrics).
type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// Every metric Portcullis exports.
pub struct Metrics {
    audit: AuditCounters,
    scrape_hooks: Mutex<Vec<ScrapeHook>>,
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    key_fetches: Family<FetchLabels, Counter>,
    key_set_size: Family<IssuerLabels, Gauge>,
    key_last_success_age: Family<IssuerLabels, FloatGauge>,
    revocation_entries: Gauge,
    revocation_reloads: Family<ResultLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    listener_events: Family<ListenerLabels, Counter>,
    security_events: Family<SecurityLabels, Counter>,
    latency: Histogram,
    shadow: ShadowMetrics,
    /// Last successful fetch per issuer, seconds since the epoch; ages are computed at scrape.
    last_success: Mutex<BTreeMap<String, f64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis");
        let decisions = Family::default();
        registry.register(
            "decisions",
            "Decisions by outcome and reason",
            decisions.clone(),
        );
        let key_fetches = Family::default();
        registry.register(
            "key_fetches",
            "Key-set fetches by issuer and result",
            key_fetches.clone(),
        );
        let key_set_size = Family::default();
        registry.register(
            "key_set_keys",
            "Keys in the issuer's current key set",
            key_set_size.clone(),
        );
        let key_last_success_age = Family::default();
        registry.register(
            "key_set_age_seconds",
            "Seconds since the issuer's key set was last fetched successfully",
            key_last_success_age.clone(),
        );
        let revocation_entries = Gauge::default();
        registry.register(
            "revocation_entries",
            "Entries in the revocation list",
            revocation_entries.clone(),
        );
        let revocation_reloads = Family::default();
        registry.register(
            "revocation_reloads",
            "Revocation list reloads by result",
            revocation_reloads.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "reloads",
            "Reloads of policies and trust material by result",
            reloads.clone(),
        );
        let listener_events = Family::default();
        registry.register(
            "listener_events",
            "Connections the listeners dropped or evicted, by listener and event",
            listener_events.clone(),
        );
        let security_events = Family::default();
        registry.register(
            "security_events",
            "Security events (docs/security-events.md) by event and severity",
            security_events.clone(),
        );
        // 10 us to ~80 ms: decisions are fast; the tail matters against Envoy's 200 ms budget.
        let latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.00001, 2.0, 14,
        ));
        registry.register(
            "decision_seconds",
            "Time to decide one request",
            latency.clone(),
        );
        let audit = AuditCounters::default();
        registry.register(
            "audit_lines_written",
            "Audit lines written",
            audit.written.clone(),
        );
        registry.register(
            "audit_lines_failed",
            "Audit lines that could not be written; their decisions were denied",
            audit.failed.clone(),
        );
        registry.register(
            "audit_lines_dropped",
            "Audit lines that could not be written while the requests were served anyway",
            audit.dropped.clone(),
        );
        registry.register(
            "audit_sink_up",
            "1 while the audit sink accepts writes, 0 while its writes fail",
            audit.sink_up.clone(),
        );
        registry.register(
            "audit_syslog_lines_shipped",
            "Audit lines known delivered to the syslog receiver",
            audit.syslog_shipped.clone(),
        );
        registry.register(
            "audit_syslog_lines_resent",
            "Audit lines sent to the syslog receiver again after a connection broke",
            audit.syslog_resent.clone(),
        );
        registry.register(
            "audit_syslog_spool_bytes",
            "Bytes waiting in the syslog spool (with delivered lines of segments not yet deleted)",
            audit.syslog_spool_bytes.clone(),
        );
        registry.register(
            "audit_syslog_connected",
            "1 while connected to the syslog receiver",
            audit.syslog_connected.clone(),
        );
        let shadow = ShadowMetrics::default();
        registry.register(
            "shadow_decisions",
            "Decisions of the shadow policy set beside the live one, by outcome (agree, gained, lost, error)",
            shadow.decisions.clone(),
        );
        registry.register(
            "shadow_reloads",
            "Loads of the shadow policy set by result",
            shadow.reloads.clone(),
        );
        registry.register(
            "shadow_policies",
            "Policies in the shadow policy set being evaluated (0: none)",
            shadow.policies.clone(),
        );
        Metrics {
            shadow,
            audit,
            scrape_hooks: Mutex::new(Vec::new()),
            reloads,
            listener_events,
            security_events,
            latency,
            registry,
            decisions,
            key_fetches,
            key_set_size,
            key_last_success_age,
            revocation_entries,
            revocation_reloads,
            last_success: Mutex::new(BTreeMap::new()),
        }
    }

    /// The audit log's counters, for its writer.
    pub fn audit(&self) -> AuditCounters {
        self.audit.clone()
    }

    pub fn decision(&self, decision: &str, reason: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: decision.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A key-set fetch finished; `keys` is the new key count on success.
    pub fn key_fetch(&self, issuer: &str, keys: Option<usize>) {
        let result = if keys.is_some() { "success" } else { "failure" };
        self.key_fetches
            .get_or_create(&FetchLabels {
                issuer: issuer.into(),
                result: result.into(),
            })
            .inc();
        if let Some(n) = keys {
            self.key_set_size
                .get_or_create(&IssuerLabels {
                    issuer: issuer.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            if let Ok(mut m) = self.last_success.lock() {
                m.insert(issuer.to_string(), epoch_secs());
            }
        }
    }

    pub fn revocation_reload(&self, entries: Option<usize>) {
        let result = if entries.is_some() {
            "success"
        } else {
            "failure"
        };
        self.revocation_reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        if let Some(n) = entries {
            self.revocation_entries
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The shadow policy set's outcome for one decision (`ShadowOutcome::outcome`).
    pub fn shadow_decision(&self, outcome: &str) {
        self.shadow
            .decisions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A load of the shadow policy set; the first one shows every outcome at 0.
    pub fn shadow_reload(&self, ok: bool) {
        for outcome in SHADOW_OUTCOMES {
            drop(self.shadow.decisions.get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            }));
        }
        let result = if ok { "success" } else { "failure" };
        self.shadow
            .reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// How many shadow policies are evaluated (`None`: none).
    pub fn shadow_policies(&self, count: Option<usize>) {
        self.shadow
            .policies
            .set(count.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    }

    /// A listener dropped or evicted a connection: `listener` is "grpc" or "http", `event`
    /// what happened ("evicted", "handshake_failed", "handshake_timeout", "body_timeout").
    pub fn listener_event(&self, listener: &str, event: &str) {
        self.listener_events
            .get_or_create(&ListenerLabels {
                listener: listener.into(),
                event: event.into(),
            })
            .inc();
    }

    /// `n` security events of kind `event` with `severity` (`n` = 0 creates the series).
    pub fn security_events(&self, event: &str, severity: &str, n: u64) {
        self.security_events
            .get_or_create(&SecurityLabels {
                event: event.into(),
                severity: severity.into(),
            })
            .inc_by(n);
    }

    pub fn latency(&self, micros: u128) {
        self.latency.observe(micros as f64 / 1e6);
    }

    /// Runs `hook` before each scrape.
    pub fn on_scrape(&self, hook: ScrapeHook) {
        if let Ok(mut hooks) = self.scrape_hooks.lock() {
            hooks.push(hook);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        if let Ok(hooks) = self.scrape_hooks.lock() {
            for hook in hooks.iter() {
                hook();
            }
        }
        let now = epoch_secs();
        if let Ok(m) = self.last_success.lock() {
            for (issuer, at) in m.iter() {
                self.key_last_success_age
                    .get_or_create(&IssuerLabels {
                        issuer: issuer.clone(),
                    })
                    .set(now - at);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
