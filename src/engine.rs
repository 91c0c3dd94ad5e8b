//! The decision engine: request facts and `now` in, exactly one [`Decision`] out. It runs
//! the pipeline (identity, then policy) and is what every front door calls; it does no
//! I/O on the request path.

use crate::config::KeySource;
use crate::config::{Mode, ResponseSettings, Settings};
use crate::facts::{FactsError, RequestFacts};
use crate::fetch::KeyFetcher;
use crate::identity::keys::{KeySet, KeySnapshot};
use crate::identity::{
    CertRejection, CertSources, Identity, PeerOutcome, PeerVerifier, TokenOutcome, TokenRejection,
    TokenSources, TokenVerifier, Verifier,
};
use crate::metrics::Metrics;
use crate::policy::{self, PolicyOutcome, PolicySnapshot};
use crate::problem::{LoadError, Problem};
use crate::proto::envoy::service::auth::v3::CheckRequest;
use arc_swap::ArcSwap;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

/// Why a request was denied. Every variant has exactly one reply (see `reply.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The request itself could not be read.
    UnreadableRequest(FactsError),
    /// `peer.require` is set and no certificate was presented.
    CertificateRequired,
    /// The presented certificate failed verification.
    Certificate(CertRejection),
    /// The presented token failed verification.
    Token(TokenRejection),
    /// No permit matched. `anonymous` when no credential was verified at all.
    NoPermit {
        /// No credential verified: the reply is 401 (authenticate), not 403.
        anonymous: bool,
    },
    /// A forbid policy matched.
    Forbidden,
    /// A policy failed to evaluate; Portcullis denies rather than skip it.
    PolicyError,
    /// `limits.max_concurrent` requests were already being decided.
    Overloaded,
    /// The decision was not made within `limits.request_timeout`: a stage of it, or a key
    /// refresh it waited for, ran past the request's deadline.
    Deadline,
    /// The CheckRequest encoded to more than `limits.max_message_bytes` (but was under the
    /// transport's hard cap, so it could be answered with a deny).
    RequestTooLarge,
    /// The decision's audit line could not be written and `[audit]` says deny
    /// (`disk_full_action`, `disk_error_action`): nothing is let through unrecorded.
    AuditUnavailable,
}

impl DenyReason {
    /// A short stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::UnreadableRequest(_) => "unreadable_request",
            DenyReason::CertificateRequired => "certificate_required",
            DenyReason::Certificate(_) => "invalid_certificate",
            DenyReason::Token(_) => "invalid_token",
            DenyReason::NoPermit { .. } => "no_permit",
            DenyReason::Forbidden => "forbidden",
            DenyReason::PolicyError => "policy_error",
            DenyReason::Overloaded => "overloaded",
            DenyReason::Deadline => "deadline",
            DenyReason::RequestTooLarge => "request_too_large",
            DenyReason::AuditUnavailable => "audit_unavailable",
        }
    }
}

/// A random (version 4) UUID from aws-lc's user-space DRBG: no system call per decision.
fn decision_id() -> String {
    let mut bytes = [0u8; 16];
    match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => uuid::Builder::from_random_bytes(bytes).into_uuid(),
        Err(_) => uuid::Uuid::new_v4(),
    }
    .to_string()
}

/// The outcome of one request.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Decision {
    /// This decision's id (a UUID), in the reply header, the metadata and the audit line.
    pub id: String,
    /// The proxy's request id (`x-request-id`), when it sent one.
    pub request_id: String,
    /// `None` means allow.
    pub denial: Option<DenyReason>,
    /// Dry-run: a denial that was turned into an allow.
    pub dry_run: bool,
    /// What became of the certificate and the token; `None` when the request was refused
    /// before they were looked at (unreadable, overloaded, past the deadline).
    pub identity: Option<Identity>,
    /// The policy evaluation; `None` when the request was refused before it.
    pub policy: Option<PolicyOutcome>,
    /// Human-readable reasons for the audit log and explanations (never a credential).
    pub reasons: Vec<String>,
    /// How long the decision took, in microseconds.
    pub latency_us: u128,
    /// What the shadow policy set said, when one is configured and the live set decided.
    pub shadow: Option<ShadowOutcome>,
}

impl Decision {
    /// Whether the proxy should let the request through.
    pub fn allowed(&self) -> bool {
        self.denial.is_none() || self.dry_run
    }

    /// The principal, as a Cedar entity reference.
    pub fn principal(&self) -> Option<String> {
        self.policy
            .as_ref()
            .map(|p| p.request.principal.to_string())
    }

    /// The determining policy ids.
    pub fn policies(&self) -> &[String] {
        self.policy.as_ref().map_or(&[], |p| &p.determining)
    }

    /// One audit line: no token, key or certificate body ever appears here.
    pub fn audit_json(&self) -> serde_json::Value {
        let req = self.policy.as_ref().map(|p| &p.request);
        json!({
            "time": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "decision_id": self.id,
            "request_id": self.request_id,
            "decision": if self.denial.is_none() { "allow" } else { "deny" },
            "enforced": !self.dry_run,
            "reason": self.denial.as_ref().map(DenyReason::code),
            "principal": req.map(|r| r.principal.to_string()),
            "action": req.map(|r| r.action.to_string()),
            "resource": req.map(|r| r.resource.to_string()),
            "policies": self.policies(),
            "reasons": self.reasons,
            "latency_us": self.latency_us,
        })
    }
}

/// A request as a door received it: what [`Engine::answer`] decides.
#[derive(Debug)]
#[non_exhaustive]
pub enum Question<'a> {
    /// An Envoy CheckRequest (the gRPC door, the JSON check API).
    Check(&'a CheckRequest),
    /// A request a proxy described directly (forward-auth, an embedding proxy).
    Facts(&'a RequestFacts),
    /// A request whose facts could not be read: denied (`unreadable_request`).
    Unreadable(FactsError),
    /// A CheckRequest that encoded to this many bytes, over `limits.max_message_bytes`:
    /// denied (`request_too_large`) without being read.
    TooLarge(usize),
}

/// A decision that has been recorded (metrics, audit line), with the reply settings it is
/// rendered with: [`Answer::check_response`] and [`Answer::http_reply`] are the replies.
#[derive(Debug)]
pub struct Answer<'e> {
    decision: Decision,
    pub(crate) settings: &'e ResponseSettings,
}

impl Answer<'_> {
    /// The decision.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The decision, without the reply settings.
    pub fn into_decision(self) -> Decision {
        self.decision
    }

    /// Whether the proxy should let the request through.
    pub fn allowed(&self) -> bool {
        self.decision.allowed()
    }
}

/// What a reload replaces, as one immutable snapshot: a request sees the old one or the
/// new one, never a mix.
#[derive(Debug)]
struct Loaded {
    peer: Option<Arc<PeerVerifier>>,
    policy: Arc<PolicySnapshot>,
    /// The shadow policy set (`[policy] shadow_dir`), when one is configured and loaded.
    shadow: Option<ShadowSet>,
}

/// A shadow policy set beside the live one: evaluated on the same request, never enforced.
#[derive(Debug)]
struct ShadowSet {
    policies: Arc<PolicySnapshot>,
    /// What either set reads: the request both are evaluated on is built for it. `None`
    /// when the two see different claims (one has a schema, the other not): then each is
    /// evaluated on its own request.
    union: Option<Arc<crate::policy::demand::Demand>>,
}

impl ShadowSet {
    fn beside(live: &PolicySnapshot, policies: Arc<PolicySnapshot>) -> ShadowSet {
        ShadowSet {
            union: live.demand().union(policies.demand()).map(Arc::new),
            policies,
        }
    }
}

/// What the shadow policy set (`[policy] shadow_dir`) said about a request the live set
/// decided. It never changes the answer.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ShadowOutcome {
    /// The shadow set's verdict.
    pub verdict: policy::Verdict,
    /// Whether the live policies allowed the request.
    pub live_allowed: bool,
}

impl ShadowOutcome {
    /// `agree`, `gained` (the shadow set allows what the live set denies), `lost` (the
    /// reverse) or `error` (the shadow set failed to evaluate: a deny there).
    pub fn outcome(&self) -> &'static str {
        match (self.verdict.errors.is_empty(), self.verdict.allowed, self.live_allowed) {
            (false, _, _) => "error",
            (true, a, b) if a == b => "agree",
            (true, true, false) => "gained",
            (true, _, _) => "lost",
        }
    }

    /// The audit line's `shadow` field: only for a disagreement (or a shadow error).
    pub fn audit_json(&self) -> Option<serde_json::Value> {
        let outcome = self.outcome();
        (outcome != "agree").then(|| {
            json!({
                "outcome": outcome,
                "decision": if self.verdict.allowed { "allow" } else { "deny" },
                "policies": self.verdict.determining,
                "errors": self.verdict.errors,
            })
        })
    }
}

/// The decision engine: everything needed to decide, built once at start-up and shared by
/// `Arc`. Every door of the server (gRPC, forward-auth, JSON) calls it, and a Rust proxy can
/// embed it the same way.
///
/// ```
/// use portcullis::{CheckRequest, Engine, Question, RequestFacts, Settings};
/// use std::time::SystemTime;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # std::fs::create_dir(dir.path().join("policies"))?;
/// std::fs::write(
///     dir.path().join("policies/health.cedar"),
///     r#"permit (principal, action == Action::"GET", resource == Path::"/healthz");"#,
/// )?;
/// let settings = Settings::from_toml("[policy]\ndir = \"policies\"", dir.path())?;
/// let engine = Engine::load(&settings)?;
///
/// // Decided, recorded, and rendered for a proxy that speaks plain HTTP:
/// let facts = RequestFacts { method: "GET".into(), path: "/healthz".into(), ..Default::default() };
/// let answer = engine.answer(Question::Facts(&facts), SystemTime::now).await;
/// assert!(answer.allowed());
/// assert_eq!(answer.decision().principal().as_deref(), Some("Anonymous::\"anonymous\""));
///
/// // An Envoy CheckRequest, answered as Envoy expects:
/// let request: CheckRequest = Default::default(); // no HTTP attributes: unreadable
/// let reply = engine.answer(Question::Check(&request), SystemTime::now).await.check_response();
/// assert_eq!(reply.status.map(|s| s.code), Some(3)); // INVALID_ARGUMENT, a deny
///
/// // The pure decision, recorded nowhere:
/// let facts = RequestFacts { method: "GET".into(), path: "/admin".into(), ..Default::default() };
/// assert!(!engine.decide(&facts, SystemTime::now()).allowed());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    verifier: Verifier,
    loaded: ArcSwap<Loaded>,
    mode: Mode,
    require_peer: bool,
    reply: ResponseSettings,
    fetcher: KeyFetcher,
    metrics: Arc<Metrics>,
    audit: crate::audit::AuditLog,
    /// Security events found in the decisions (docs/security-events.md).
    security: crate::security::SecurityWatch,
    /// The problems of the last failed reload, until a reload succeeds.
    reload_error: Mutex<Option<Vec<String>>>,
    /// The problem of the last failed revocation list reload, until one succeeds.
    revocation_error: crate::reload::ReloadProblem,
    /// Requests being decided now, against `limits.max_concurrent`.
    in_flight: AtomicUsize,
    /// The problems of the shadow policy set's last load, until one succeeds.
    shadow_error: Mutex<Option<Vec<String>>>,
    /// One reload at a time: a reload of the shadow set keeps the live set it read.
    reloading: Mutex<()>,
    /// Headers a recorded request leaves out besides the certificate headers (`[peer] header`).
    record_hidden: Vec<String>,
}

/// One admitted request; dropping it frees its place.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The engine's background work (key fetching, file watches); dropping it stops them.
#[derive(Debug)]
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _watches: Vec<crate::reload::WatchGuard>,
}

impl Drop for Background {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The key sets of issuers whose keys are files, by issuer.
type KeyFiles = Vec<(String, KeySet)>;

/// Loads the reloadable material: trust bundle, intermediates and CRLs; policies, schema and
/// entities; and, on a reload, the key files of issuers whose keys are files. At start-up
/// the token verifier has read those already (and reported their problems).
fn load_reloadable(
    settings: &Settings,
    key_files: KeyFilesToo,
) -> Result<(Loaded, KeyFiles), Vec<Problem>> {
    let mut problems = Vec::new();
    let peer = match &settings.peer {
        None => None,
        Some(p) => PeerVerifier::load(p, settings.cache.certificates)
            .map_err(|e| problems.extend(e.into_iter().map(Problem::new)))
            .ok(),
    };
    let policy = policy::load(&settings.policy)
        .map_err(|e| problems.extend(e))
        .ok();
    let mut keys = Vec::new();
    let issuers = settings
        .issuers
        .iter()
        .filter(|i| i.source == KeySource::Files && key_files == KeyFilesToo::Yes);
    for issuer in issuers {
        match KeySet::load(issuer.jwks_file.as_deref(), &issuer.pem_keys) {
            Ok(set) => keys.push((issuer.issuer.clone(), set)),
            Err(errs) => problems.extend(
                errs.into_iter()
                    .map(|e| Problem::new(format!("issuer \"{}\": {e}", issuer.issuer))),
            ),
        }
    }
    match policy {
        Some(policy) if problems.is_empty() => Ok((
            Loaded {
                peer: peer.map(Arc::new),
                policy: Arc::new(policy),
                shadow: None,
            },
            keys,
        )),
        _ => Err(problems),
    }
}

/// Whether [`load_reloadable`] reads the issuers' key files too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFilesToo {
    /// On a reload.
    Yes,
    /// At start-up, where [`TokenVerifier::load`] reads them: read twice, a missing file
    /// was reported twice.
    No,
}

/// Loads the shadow policy set (`[policy] shadow_dir`) to sit beside `live`: the new set,
/// or on failure `last_good` (logged, counted, kept for [`Engine::shadow_problems`]).
/// `None` when none is configured or none ever loaded.
fn load_shadow(
    settings: &Settings,
    live: &PolicySnapshot,
    metrics: &Metrics,
    error: &Mutex<Option<Vec<String>>>,
    last_good: Option<Arc<PolicySnapshot>>,
) -> Option<ShadowSet> {
    let dir = settings.shadow_dir.as_ref()?;
    let result = policy::load(&policy::candidate(dir, &settings.policy));
    metrics.shadow_reload(result.is_ok());
    let policies = match result {
        Ok(p) => {
            if let Ok(mut e) = error.lock() {
                *e = None;
            }
            Arc::new(p)
        }
        Err(problems) => {
            let messages: Vec<String> = problems.iter().map(Problem::to_string).collect();
            tracing::error!(
                "shadow policies (never enforced) failed to load from {}; {}:\n  - {}",
                dir.display(),
                if last_good.is_some() {
                    "the last good shadow set is still evaluated"
                } else {
                    "no shadow set is evaluated"
                },
                messages.join("\n  - ")
            );
            if let Ok(mut e) = error.lock() {
                *e = Some(messages);
            }
            last_good?
        }
    };
    metrics.shadow_policies(Some(policies.policy_count()));
    Some(ShadowSet::beside(live, policies))
}

impl Engine {
    /// Loads trust material, keys and policies; every problem is reported.
    pub fn load(settings: &Settings) -> Result<Engine, LoadError> {
        let mut problems: Vec<Problem> = Vec::new();
        let metrics = Arc::new(Metrics::new());
        let tokens = TokenVerifier::load(&settings.issuers, &settings.token, settings.cache.tokens)
            .map_err(|e| problems.extend(e.into_iter().map(Problem::new)))
            .ok();
        let fetcher = tokens.as_ref().and_then(|t| {
            KeyFetcher::new(&settings.issuers, t, metrics.clone())
                .map_err(|e| problems.extend(e.into_iter().map(Problem::new)))
                .ok()
        });
        let loaded = load_reloadable(settings, KeyFilesToo::No)
            .map_err(|e| problems.extend(e))
            .ok();
        let shadow_error = Mutex::new(None);
        let loaded = loaded.map(|(mut loaded, keys)| {
            loaded.shadow = load_shadow(settings, &loaded.policy, &metrics, &shadow_error, None);
            (loaded, keys)
        });
        let audit = crate::audit::AuditLog::open(&settings.audit, metrics.audit())
            .map_err(|e| problems.push(Problem::new(e)))
            .ok();
        if let Some(hook) = audit.as_ref().and_then(crate::audit::AuditLog::scrape_hook) {
            metrics.on_scrape(hook);
        }
        match (tokens, fetcher, loaded, audit) {
            (Some(tokens), Some(fetcher), Some((loaded, _)), Some(audit))
                if problems.is_empty() =>
            {
                if settings.token.revoked.is_some() {
                    metrics.revocation_reload(Some(tokens.revocation().load().len()));
                }
                let sources = TokenSources {
                    header: settings.token.header.clone(),
                    cookie: settings.token.cookie.clone(),
                    pass_schemes: settings.token.pass_schemes.clone(),
                };
                let certs = settings
                    .peer
                    .as_ref()
                    .map_or_else(CertSources::default, |p| CertSources {
                        header: p.header.clone(),
                        xfcc: p.xfcc,
                    });
                Ok(Engine {
                    settings: settings.clone(),
                    verifier: Verifier::new(tokens, sources, certs),
                    loaded: ArcSwap::from_pointee(loaded),
                    mode: settings.mode,
                    require_peer: settings.peer.as_ref().is_some_and(|p| p.require),
                    reply: settings.response.clone(),
                    fetcher,
                    security: crate::security::SecurityWatch::new(metrics.clone()),
                    metrics,
                    audit,
                    reload_error: Mutex::new(None),
                    revocation_error: Default::default(),
                    in_flight: AtomicUsize::new(0),
                    shadow_error,
                    reloading: Mutex::new(()),
                    record_hidden: settings
                        .peer
                        .as_ref()
                        .and_then(|p| p.header.clone())
                        .into_iter()
                        .collect(),
                })
            }
            _ => Err(LoadError::new(
                "",
                problems.into_iter().map(|p| settings.place(p)).collect(),
            )),
        }
    }

    /// Re-reads policies, schema, entities, trust bundle, intermediates, CRLs and key files.
    /// A valid new set replaces the old one whole; an invalid one changes nothing, and its
    /// problems are logged, counted and shown in `/readyz` until a reload succeeds.
    pub fn reload(&self) -> Result<(), LoadError> {
        let _one_at_a_time = self.reloading.lock();
        let result = load_reloadable(&self.settings, KeyFilesToo::Yes);
        self.metrics.reload(result.is_ok());
        let current = self.loaded.load_full();
        // The shadow set reloads on its own: its failure keeps its last good version and
        // never touches the live set; the live set's failure does not hold it back.
        let live = match &result {
            Ok((loaded, _)) => &loaded.policy,
            Err(_) => &current.policy,
        };
        let last_good = current.shadow.as_ref().map(|s| s.policies.clone());
        let mut shadow = load_shadow(
            &self.settings,
            live,
            &self.metrics,
            &self.shadow_error,
            last_good,
        );
        if result.is_err() && self.settings.shadow_dir.is_some() {
            let old = self.loaded.swap(Arc::new(Loaded {
                peer: current.peer.clone(),
                policy: current.policy.clone(),
                shadow: shadow.take(),
            }));
            release_off_the_request_path(old);
        }
        drop(current);
        match result {
            Ok((mut loaded, key_files)) => {
                loaded.shadow = shadow;
                for (issuer, keys) in key_files {
                    if let Some(cell) = self.verifier.tokens().key_cell(&issuer) {
                        cell.store(Some(Arc::new(KeySnapshot {
                            keys,
                            usable_until: None,
                        })));
                    }
                }
                tracing::info!(policies = loaded.policy.policy_count(), "reloaded");
                let old = self.loaded.swap(Arc::new(loaded));
                release_off_the_request_path(old);
                if let Ok(mut e) = self.reload_error.lock() {
                    *e = None;
                }
            }
            Err(problems) => {
                let error = LoadError::new("reloading", problems);
                tracing::error!(
                    "reload failed, the last good policies and trust material keep serving:\n  - {}",
                    error.messages().join("\n  - ")
                );
                if let Ok(mut e) = self.reload_error.lock() {
                    *e = Some(error.messages());
                }
                return Err(error);
            }
        }
        Ok(())
    }

    /// Every file a reload reads, to watch (the policy directory is watched whole).
    fn reloadable_files(&self) -> Vec<std::path::PathBuf> {
        let s = &self.settings;
        let mut paths = Vec::new();
        paths.extend(s.policy.schema.iter().cloned());
        paths.extend(s.policy.entities.iter().cloned());
        if let Some(p) = &s.peer {
            paths.push(p.trust_bundle.clone());
            paths.extend(p.intermediates.iter().cloned());
            paths.extend(p.crls.iter().cloned());
        }
        for i in s.issuers.iter().filter(|i| i.source == KeySource::Files) {
            paths.extend(i.jwks_file.iter().cloned());
            paths.extend(i.pem_keys.iter().map(|(p, _)| p.clone()));
        }
        paths
    }

    /// Starts the background work: key fetching and file watches (hot reload, revocation
    /// list). Call it inside a tokio runtime and keep the result alive while serving.
    pub fn start(self: &Arc<Self>) -> Result<Background, String> {
        let mut watches = Vec::new();
        if let Some(path) = &self.settings.token.revoked {
            watches.push(crate::reload::watch_revocations(
                path.clone(),
                self.verifier.tokens().revocation(),
                self.metrics.clone(),
                self.revocation_error.clone(),
            )?);
        }
        let weak = Arc::downgrade(self);
        let mut dirs = vec![self.settings.policy.dir.clone()];
        let mut files = self.reloadable_files();
        match &self.settings.shadow_dir {
            // A shadow directory that is not there must not keep the server from serving:
            // it is loaded again on SIGHUP and on any change to the live files.
            Some(shadow) if !shadow.is_dir() => tracing::warn!(
                "shadow policies: {} is not a directory; not watched",
                shadow.display()
            ),
            Some(shadow) => {
                dirs.push(shadow.clone());
                for name in ["schema.cedarschema", "schema.cedarschema.json", "entities.json"] {
                    files.push(shadow.join(name));
                }
            }
            None => {}
        }
        watches.push(crate::reload::watch(
            &files,
            &dirs,
            move || {
                if let Some(engine) = weak.upgrade() {
                    let _ = engine.reload();
                }
            },
        )?);
        Ok(Background {
            tasks: self.fetcher.spawn(),
            _watches: watches,
        })
    }

    /// The problems of the shadow policy set's last load (`[policy] shadow_dir`), if it
    /// failed: it is not evaluated (at start) or its last good version is (after a reload).
    /// Never a reason to refuse to serve; `portcullis validate` reports them.
    pub fn shadow_problems(&self) -> Option<Vec<String>> {
        self.shadow_error.lock().ok().and_then(|e| e.clone())
    }

    /// How many shadow policies are evaluated now (`None`: no shadow set is).
    pub fn shadow_policy_count(&self) -> Option<usize> {
        self.loaded
            .load()
            .shadow
            .as_ref()
            .map(|s| s.policies.policy_count())
    }

    /// How many policies are loaded now.
    pub fn policy_count(&self) -> usize {
        self.loaded.load().policy.policy_count()
    }

    /// Whether the loaded policies were validated against a schema.
    pub fn has_schema(&self) -> bool {
        self.loaded.load().policy.has_schema()
    }

    /// Fetches every remote key set once, for offline use (`portcullis check`).
    pub async fn fetch_keys_once(&self) -> Vec<String> {
        self.fetcher.fetch_all_once().await
    }

    /// Ready when every issuer that must have keys at start has them; else the issuers
    /// still waiting.
    /// Whether the engine can answer as configured; if not, why (each reason a sentence):
    /// an issuer whose keys must be fetched before serving has none yet, or the audit sink
    /// fails its writes.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let waiting = self.fetcher.not_ready();
        if !waiting.is_empty() {
            problems.push(format!("no keys yet for issuer(s) {}", waiting.join(", ")));
        }
        if let Some(why) = self.audit.broken() {
            problems.push(format!("the audit log cannot be written: {why}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The problems of the last reload, if it failed (the previous set is still serving),
    /// and of the last revocation list reload, if that failed.
    pub fn last_reload_error(&self) -> Option<Vec<String>> {
        let mut problems = self
            .reload_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_default();
        if let Some(p) = self.revocation_error.lock().ok().and_then(|e| e.clone()) {
            problems.push(p);
        }
        (!problems.is_empty()).then_some(problems)
    }

    /// The engine's metrics, for the server's `/metrics`.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The forward-auth door's settings, when it is configured.
    pub(crate) fn forward_auth(&self) -> Option<&crate::config::ForwardAuthSettings> {
        self.settings.forward_auth.as_ref()
    }

    /// What replies are rendered with (`[response]`): for a decision made with
    /// [`Engine::decide`], which records nothing and renders nothing.
    pub fn reply_settings(&self) -> &ResponseSettings {
        &self.reply
    }

    /// Waits (at most `limit`) until every audit line of the decisions so far is written.
    pub fn flush_audit(&self, limit: std::time::Duration) -> bool {
        self.audit.flush(limit)
    }

    /// The configured `[limits]`.
    pub fn limits(&self) -> &crate::config::Limits {
        &self.settings.limits
    }

    /// Verified tokens held in the cache now.
    pub fn cached_tokens(&self) -> usize {
        self.verifier.tokens().cached()
    }

    /// Forged tokens (signature failed) held in their cache now.
    pub fn cached_forgeries(&self) -> usize {
        self.verifier.tokens().forgeries()
    }

    /// A place among the `max_concurrent` requests being decided, or `None` when full.
    fn admit(&self) -> Option<Admission<'_>> {
        let max = self.settings.limits.max_concurrent;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission(&self.in_flight))
    }

    /// A denial decided without looking at the request (overload, deadline).
    fn refused(&self, request_id: String, reason: DenyReason) -> Decision {
        let why = match reason {
            DenyReason::Overloaded => format!(
                "overloaded: {} requests already being decided",
                self.settings.limits.max_concurrent
            ),
            _ => self.past_deadline("while waiting"),
        };
        self.finish(
            Instant::now(),
            request_id,
            Some(reason),
            None,
            None,
            vec![why],
        )
    }

    /// The audit reason of a `deadline` denial, saying where the decision stood.
    fn past_deadline(&self, stage: &str) -> String {
        format!(
            "deadline: no decision within the request timeout of {}, past it {stage}",
            humantime::format_duration(self.settings.limits.request_timeout)
        )
    }

    /// The `deadline` denial of a decision that ran past `deadline` in a stage.
    fn late(&self, started: Instant, facts: &RequestFacts, stage: &str) -> Decision {
        self.finish(
            started,
            facts.request_id.clone(),
            Some(DenyReason::Deadline),
            None,
            None,
            vec![self.past_deadline(stage)],
        )
    }

    /// A decision for a CheckRequest that encoded to `size` bytes, over
    /// `limits.max_message_bytes`: denied without reading it.
    fn too_large(&self, size: usize) -> Decision {
        self.finish(
            Instant::now(),
            String::new(),
            Some(DenyReason::RequestTooLarge),
            None,
            None,
            vec![format!(
                "request of {size} bytes is larger than max_message_bytes ({})",
                self.settings.limits.max_message_bytes
            )],
        )
    }

    /// Answers one request as a door received it: decides it (with `[limits]` and one
    /// early key refresh), records the decision (its metrics and its audit line, which is
    /// written before this returns: a decision whose line cannot be written is denied,
    /// `audit_unavailable`, unless `[audit]` says `serve`), and returns it with what its
    /// reply is rendered with ([`Answer::check_response`] for
    /// Envoy, [`Answer::http_reply`] for a plain HTTP proxy). Every door of the server
    /// calls this, once per request, and an embedding proxy should too.
    ///
    /// Limits: past `max_concurrent` requests in flight it denies at once (`overloaded`),
    /// and a decision not made within `request_timeout` of its start (reading the request
    /// included) is denied (`deadline`). When the only problem is a token signed with a
    /// `kid` the issuer's key set lacks, it asks for one early key refresh (bounded wait,
    /// rate-limited) and decides again; `now` is read for each attempt.
    pub async fn answer(&self, question: Question<'_>, now: impl Fn() -> SystemTime) -> Answer<'_> {
        let deadline = Instant::now() + self.settings.limits.request_timeout;
        let mut source = None;
        let decision = match question {
            Question::Check(request) => {
                match RequestFacts::from_check(request, &self.settings.limits) {
                    Ok(facts) => {
                        source = crate::security::source_of(&facts);
                        self.decide_refreshing_by(&facts, now, deadline).await
                    }
                    Err(e) => self.unreadable(e),
                }
            }
            Question::Facts(facts) => {
                source = crate::security::source_of(facts);
                self.decide_refreshing_by(facts, now, deadline).await
            }
            Question::Unreadable(e) => self.unreadable(e),
            Question::TooLarge(size) => self.too_large(size),
        };
        let decision = self.observe(decision, source).await;
        Answer {
            decision,
            settings: &self.reply,
        }
    }

    /// SECURITY: the deadline holds two ways. The synchronous stages check it between
    /// them (`decide_by`), since a timer cannot interrupt work that never yields; the
    /// timer covers the one wait, a key refresh. Either way the answer is `deadline`.
    async fn decide_refreshing_by(
        &self,
        facts: &RequestFacts,
        now: impl Fn() -> SystemTime,
        deadline: Instant,
    ) -> Decision {
        let Some(_admitted) = self.admit() else {
            return self.refused(facts.request_id.clone(), DenyReason::Overloaded);
        };
        let decide = async {
            let first = self.decide_by(facts, now(), deadline);
            if let Some(DenyReason::Token(TokenRejection::UnknownKey { issuer, .. })) =
                &first.denial
                && self.fetcher.refresh_for_unknown_kid(issuer).await
            {
                return self.decide_by(facts, now(), deadline);
            }
            first
        };
        match tokio::time::timeout_at(deadline.into(), decide).await {
            Ok(decision) => decision,
            Err(_) => self.refused(facts.request_id.clone(), DenyReason::Deadline),
        }
    }

    /// A decision for a request whose facts could not be read.
    fn unreadable(&self, error: FactsError) -> Decision {
        self.finish(
            Instant::now(),
            String::new(),
            Some(DenyReason::UnreadableRequest(error.clone())),
            None,
            None,
            vec![error.to_string()],
        )
    }

    /// Records a final decision: its audit line, its metrics, and the security events it
    /// completes (`source`: the client's address). Once per request.
    ///
    /// SECURITY: the answer waits for its audit line to be written. When it cannot be,
    /// `[audit]` chooses: deny (`audit_unavailable`, the default, enforced even in dry-run
    /// mode) or serve with the line counted as dropped.
    async fn observe(&self, mut decision: Decision, source: Option<std::net::IpAddr>) -> Decision {
        let mut line = decision.audit_json();
        if let (Some(policy), serde_json::Value::Object(fields)) = (&decision.policy, &mut line) {
            if self.settings.audit.record_requests {
                fields.insert(
                    "cedar_request".into(),
                    policy::record(&policy.request, &self.record_hidden),
                );
            }
            if let Some(shadow) = decision.shadow.as_ref().and_then(ShadowOutcome::audit_json) {
                fields.insert("shadow".into(), shadow);
            }
        }
        if let Some(shadow) = &decision.shadow {
            self.metrics.shadow_decision(shadow.outcome());
        }
        if let crate::audit::Recorded::Refused(why) = self.audit.record(&line).await
        {
            decision.denial = Some(DenyReason::AuditUnavailable);
            decision.dry_run = false;
            decision.reasons.push(why);
        }
        let outcome = match (&decision.denial, decision.dry_run) {
            (None, _) => "allow",
            (Some(_), true) => "dry_run_deny",
            (Some(_), false) => "deny",
        };
        let reason = decision.denial.as_ref().map_or("", DenyReason::code);
        self.metrics.decision(outcome, reason);
        self.metrics.latency(decision.latency_us);
        let seen = crate::security::Seen {
            decision_id: &decision.id,
            identity: decision.identity.as_ref(),
            overloaded: matches!(decision.denial, Some(DenyReason::Overloaded)),
            source,
        };
        self.security.record(&seen, |line| self.audit.write(line));
        decision
    }

    /// Reopens the audit file at its path: after logrotate renamed it (SIGHUP).
    pub fn reopen_audit(&self) {
        self.audit.reopen();
    }

    /// Decides an Envoy CheckRequest, within `limits.request_timeout` of the call.
    pub fn check(&self, request: &CheckRequest, now: SystemTime) -> Decision {
        let deadline = Instant::now() + self.settings.limits.request_timeout;
        match RequestFacts::from_check(request, &self.settings.limits) {
            Ok(facts) => self.decide_by(&facts, now, deadline),
            Err(e) => self.unreadable(e),
        }
    }

    /// Decides one request from its facts, within `limits.request_timeout` of the call:
    /// past it, the decision is the `deadline` denial.
    pub fn decide(&self, facts: &RequestFacts, now: SystemTime) -> Decision {
        self.decide_by(
            facts,
            now,
            Instant::now() + self.settings.limits.request_timeout,
        )
    }

    /// Decides one request, checking `deadline` between the stages (after the
    /// certificate, after the token, after policy).
    ///
    /// SECURITY: a decision finished after its deadline is not given, whatever it says:
    /// the caller was promised an answer within `request_timeout`, and work an attacker can
    /// make slow must not decide late (the stages themselves are bounded: certificate
    /// sizes and intermediates, token size, policy count).
    fn decide_by(&self, facts: &RequestFacts, now: SystemTime, deadline: Instant) -> Decision {
        let started = Instant::now();
        // One snapshot for the whole decision: never half of a reload.
        let loaded = self.loaded.load();
        let peer = self.verifier.verify_peer(loaded.peer.as_deref(), facts, now);
        if Instant::now() >= deadline {
            return self.late(started, facts, "after the certificate");
        }
        let token = self.verifier.verify_token(facts, &peer, now);
        if Instant::now() >= deadline {
            return self.late(started, facts, "after the token");
        }
        let identity = Identity { peer, token };
        let mut reasons = Vec::new();
        let mut denial = None;
        match &identity.peer {
            PeerOutcome::Rejected(e) => {
                reasons.push(format!("certificate: {e}"));
                denial = Some(DenyReason::Certificate(e.clone()));
            }
            PeerOutcome::NotPresented if self.require_peer => {
                reasons.push("certificate: required but not presented".into());
                denial = Some(DenyReason::CertificateRequired);
            }
            PeerOutcome::NotConfigured => {
                reasons.push(
                    "certificate: presented but no [peer] trust bundle is configured; ignored"
                        .into(),
                );
            }
            PeerOutcome::NotPresented | PeerOutcome::Verified(_) => {}
        }
        if let TokenOutcome::Rejected(e) = &identity.token {
            reasons.push(format!("token: {e}"));
            // A certificate rejection, found first, stays the reply's reason.
            denial.get_or_insert(DenyReason::Token(e.clone()));
        }
        // SECURITY: a presented credential that fails verification fails the request;
        // it is never ignored in favour of the other credential or an anonymous policy.
        if denial.is_some() {
            return self.finish(
                started,
                facts.request_id.clone(),
                denial,
                Some(identity),
                None,
                reasons,
            );
        }
        let union = loaded.shadow.as_ref().and_then(|s| s.union.as_ref());
        let outcome = match union {
            None => loaded.policy.evaluate(facts, &identity, now),
            // One request, built for what either set reads, for both.
            Some(union) => loaded.policy.evaluate_for(facts, &identity, union, now),
        };
        if Instant::now() >= deadline {
            return self.late(started, facts, "after policy");
        }
        // The shadow set, after the live decision is made and only within its deadline:
        // its outcome is recorded, never enforced, and its cost is its own evaluation.
        let shadow = loaded.shadow.as_ref().and_then(|shadow| {
            (Instant::now() < deadline).then(|| ShadowOutcome {
                verdict: match &shadow.union {
                    Some(union) => shadow.policies.judge(&outcome.request, union),
                    None => {
                        let own = shadow.policies.demand();
                        let request = shadow.policies.map_for(facts, &identity, own, now);
                        shadow.policies.judge(&request, own)
                    }
                },
                live_allowed: outcome.allowed,
            })
        });
        let anonymous = identity.peer().is_none() && identity.token().is_none();
        let denial = if !outcome.errors.is_empty() {
            reasons.extend(outcome.errors.iter().map(|e| format!("policy error: {e}")));
            Some(DenyReason::PolicyError)
        } else if outcome.allowed {
            None
        } else if outcome.determining.is_empty() {
            reasons.push("no permit policy matched".into());
            Some(DenyReason::NoPermit { anonymous })
        } else {
            reasons.push(format!("forbidden by {}", outcome.determining.join(", ")));
            Some(DenyReason::Forbidden)
        };
        let mut decision = self.finish(
            started,
            facts.request_id.clone(),
            denial,
            Some(identity),
            Some(outcome),
            reasons,
        );
        decision.shadow = shadow;
        decision
    }

    fn finish(
        &self,
        started: Instant,
        request_id: String,
        denial: Option<DenyReason>,
        identity: Option<Identity>,
        policy: Option<PolicyOutcome>,
        reasons: Vec<String>,
    ) -> Decision {
        Decision {
            id: decision_id(),
            request_id,
            dry_run: denial.is_some() && self.mode == Mode::DryRun,
            denial,
            identity,
            policy,
            reasons,
            latency_us: started.elapsed().as_micros(),
            shadow: None,
        }
    }
}

/// Drops a replaced snapshot on a thread of its own once no decision holds it any more.
/// Freeing a large one (a million entities: seconds) in whichever request released it last
/// would stall that request, and the others queued behind it on the runtime's threads.
/// (Swapping settles arc-swap's borrowed references into counted ones, so the strong count
/// sees every holder.)
fn release_off_the_request_path<T: Send + Sync + 'static>(old: Arc<T>) {
    let spawned = std::thread::Builder::new()
        .name("portcullis-release".into())
        .spawn(move || {
            // Decisions are bounded by `request_timeout`; past a minute, give up waiting and
            // let the last holder free it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(old);
        });
    // Without a thread, the snapshot is freed here, on the reload's own thread, as before.
    drop(spawned);
}
