//! Background key-set fetching: remote JWKS URLs and OIDC discovery in; fresh key
//! snapshots swapped whole into the verifier's key cells out. The request path never
//! fetches: it may only ask for one early refresh when it meets an unknown `kid`
//! (rate-limited per issuer, a single fetch in flight) and wait for it, bounded.

use crate::config::{IssuerSettings, KeySource, check_fetch_url};
use crate::identity::TokenVerifier;
use crate::identity::keys::{KeyCell, KeySet, KeySnapshot};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// First retry delay after a failed fetch; doubled up to `refresh_min`.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Cap on a discovery document.
const MAX_DISCOVERY_SIZE: usize = 64 * 1024;

/// Why a fetch failed. Messages carry no key material.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent more than {max} bytes")]
    TooLarge { url: String, max: usize },
    #[error("discovery document: {0}")]
    Discovery(String),
    #[error("key set: {0}")]
    KeySet(String),
}

struct KidState {
    last: Option<Instant>,
    in_flight: bool,
}

struct Remote {
    settings: IssuerSettings,
    cell: KeyCell,
    client: reqwest::Client,
    kid_tx: mpsc::Sender<()>,
    kid_rx: Mutex<Option<mpsc::Receiver<()>>>,
    generation: watch::Sender<u64>,
    kid: Mutex<KidState>,
    metrics: Arc<Metrics>,
    /// The keys the last fetched document had that were unfit to verify (warned once).
    refused: Mutex<Vec<String>>,
}

/// The fetchers of every issuer with remote keys.
pub struct KeyFetcher {
    remotes: HashMap<String, Arc<Remote>>,
}

impl std::fmt::Debug for KeyFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFetcher")
            .field("issuers", &self.remotes.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn client_for(settings: &IssuerSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.fetch.timeout)
        .connect_timeout(settings.fetch.timeout)
        // SECURITY: a redirect could lead to plain http or another host; key URLs are exact.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &settings.fetch.ca_bundle {
        let pem = crate::files::read(path).map_err(|e| e.to_string())?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no CERTIFICATE found", path.display()));
        }
        // Only this bundle: a private identity provider is not vouched for by public CAs.
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}

impl KeyFetcher {
    /// Prepares a fetcher for every issuer whose keys are remote.
    pub fn new(
        issuers: &[IssuerSettings],
        verifier: &TokenVerifier,
        metrics: Arc<Metrics>,
    ) -> Result<KeyFetcher, Vec<String>> {
        let mut problems = Vec::new();
        let mut remotes = HashMap::new();
        for s in issuers.iter().filter(|s| s.source != KeySource::Files) {
            let Some(cell) = verifier.key_cell(&s.issuer) else {
                continue;
            };
            match client_for(s) {
                Ok(client) => {
                    let (kid_tx, kid_rx) = mpsc::channel(1);
                    let remote = Remote {
                        settings: s.clone(),
                        cell,
                        client,
                        kid_tx,
                        kid_rx: Mutex::new(Some(kid_rx)),
                        generation: watch::Sender::new(0),
                        kid: Mutex::new(KidState {
                            last: None,
                            in_flight: false,
                        }),
                        metrics: metrics.clone(),
                        refused: Mutex::new(Vec::new()),
                    };
                    remotes.insert(s.issuer.clone(), Arc::new(remote));
                }
                Err(e) => problems.push(format!("issuer \"{}\": {e}", s.issuer)),
            }
        }
        if problems.is_empty() {
            Ok(KeyFetcher { remotes })
        } else {
            Err(problems)
        }
    }

    /// Starts one background task per remote issuer on the current tokio runtime.
    pub fn spawn(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.remotes
            .values()
            .filter_map(|r| {
                let rx = r.kid_rx.lock().ok()?.take()?;
                Some(tokio::spawn(run(r.clone(), rx)))
            })
            .collect()
    }

    /// Fetches every remote key set once (for `portcullis check`); returns the failures.
    pub async fn fetch_all_once(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for r in self.remotes.values() {
            if let Err(e) = r.refresh().await {
                failures.push(format!("issuer \"{}\": {e}", r.settings.issuer));
            }
        }
        failures
    }

    /// Issuers that must have keys before the server is ready, and do not yet.
    pub fn not_ready(&self) -> Vec<String> {
        self.remotes
            .values()
            .filter(|r| r.settings.fetch.required_at_start && r.cell.load().is_none())
            .map(|r| r.settings.issuer.clone())
            .collect()
    }

    /// Asks for an early refresh because a token named an unknown `kid`, and waits for it
    /// up to the issuer's `unknown_kid_wait`. True when a fetch completed meanwhile.
    /// At most one such refresh per `unknown_kid_interval` per issuer; concurrent callers
    /// wait for the one in flight.
    pub async fn refresh_for_unknown_kid(&self, issuer: &str) -> bool {
        let Some(r) = self.remotes.get(issuer) else {
            return false;
        };
        let mut rx = r.generation.subscribe();
        {
            let Ok(mut st) = r.kid.lock() else {
                return false;
            };
            if !st.in_flight {
                let now = Instant::now();
                if st.last.is_some_and(|last| {
                    now.duration_since(last) < r.settings.fetch.unknown_kid_interval
                }) {
                    return false;
                }
                st.last = Some(now);
                st.in_flight = true;
                // Capacity 1: a full channel means a refresh is already queued.
                let _ = r.kid_tx.try_send(());
            }
        }
        // `subscribe` marked the current generation seen: any fetch finishing from here on wakes us.
        matches!(
            tokio::time::timeout(r.settings.fetch.unknown_kid_wait, rx.changed()).await,
            Ok(Ok(()))
        )
    }
}

async fn run(r: Arc<Remote>, mut kid_rx: mpsc::Receiver<()>) {
    let mut backoff = RETRY_MIN;
    // The first fetch starts at once.
    let mut wait = Duration::ZERO;
    loop {
        let for_unknown_kid = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            got = kid_rx.recv() => match got {
                Some(()) => true,
                None => return,
            },
        };
        let result = r.refresh().await;
        if for_unknown_kid && let Ok(mut st) = r.kid.lock() {
            st.in_flight = false;
        }
        wait = match result {
            Ok(interval) => {
                backoff = RETRY_MIN;
                interval
            }
            Err(_) => {
                let retry = backoff;
                backoff = (backoff * 2).min(r.settings.fetch.refresh_min);
                retry
            }
        };
    }
}

fn epoch_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Remote {
    /// One fetch: on success the new snapshot is stored and the next refresh interval
    /// returned; on failure the last good snapshot stays (until it is too stale).
    async fn refresh(&self) -> Result<Duration, FetchError> {
        let issuer = &self.settings.issuer;
        let result = self.fetch().await;
        match &result {
            Ok((keys, _)) => {
                tracing::info!(issuer, keys = keys.len(), kids = ?keys.kids().collect::<Vec<_>>(), "key set fetched");
                self.metrics.key_fetch(issuer, Some(keys.len()));
            }
            Err(e) => {
                self.metrics.key_fetch(issuer, None);
                let stale = self
                    .cell
                    .load()
                    .as_ref()
                    .and_then(|s| s.usable_until)
                    .is_some_and(|until| epoch_secs() > until);
                if stale {
                    tracing::error!(
                        issuer,
                        "key set fetch failed and the last good keys are too stale: rejecting this issuer's tokens until the provider answers: {e}"
                    );
                } else {
                    tracing::warn!(
                        issuer,
                        "key set fetch failed, keeping the last good keys: {e}"
                    );
                }
            }
        }
        let outcome = result.map(|(keys, max_age)| {
            let usable_until = epoch_secs().saturating_add(
                i64::try_from(self.settings.fetch.max_staleness.as_secs()).unwrap_or(i64::MAX),
            );
            self.cell.store(Some(Arc::new(KeySnapshot {
                keys,
                usable_until: Some(usable_until),
            })));
            let f = &self.settings.fetch;
            max_age
                .unwrap_or(f.refresh_max)
                .clamp(f.refresh_min, f.refresh_max)
        });
        self.generation.send_modify(|g| *g += 1);
        outcome
    }

    async fn fetch(&self) -> Result<(KeySet, Option<Duration>), FetchError> {
        let jwks_uri = match &self.settings.source {
            KeySource::JwksUri(uri) => uri.clone(),
            KeySource::Discovery => self.discover().await?,
            KeySource::Files => return Err(FetchError::KeySet("keys come from files".into())),
        };
        let (body, max_age) = self.get(&jwks_uri, self.settings.fetch.max_size).await?;
        let text = String::from_utf8(body).map_err(|_| FetchError::KeySet("not UTF-8".into()))?;
        let (keys, notes, refused) =
            KeySet::from_fetched_jwks(&text).map_err(FetchError::KeySet)?;
        for n in notes {
            tracing::debug!(issuer = %self.settings.issuer, "{n}");
        }
        // A warning when the left-out keys change, not on every fetch of the same document.
        if let Ok(mut last) = self.refused.lock()
            && *last != refused
        {
            for r in &refused {
                tracing::warn!(issuer = %self.settings.issuer, "key left out of the fetched key set: {r}");
            }
            *last = refused;
        }
        Ok((keys, max_age))
    }

    /// OpenID Connect Discovery 1.0 §4: the document's `issuer` must equal ours exactly.
    async fn discover(&self) -> Result<String, FetchError> {
        let issuer = &self.settings.issuer;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let (body, _) = self.get(&url, MAX_DISCOVERY_SIZE).await?;
        #[derive(serde::Deserialize)]
        struct Doc {
            issuer: String,
            jwks_uri: String,
        }
        let doc: Doc = serde_json::from_slice(&body)
            .map_err(|e| FetchError::Discovery(format!("not a discovery document: {e}")))?;
        // SECURITY: a document for another issuer could make us trust its keys for ours.
        if doc.issuer != *issuer {
            return Err(FetchError::Discovery(format!(
                "issuer \"{}\" does not equal the configured \"{issuer}\"",
                doc.issuer.chars().take(128).collect::<String>()
            )));
        }
        check_fetch_url(&doc.jwks_uri)
            .map_err(|e| FetchError::Discovery(format!("jwks_uri: {e}")))?;
        Ok(doc.jwks_uri)
    }

    /// GET with a size cap; returns the body and the `Cache-Control: max-age`, if any.
    async fn get(&self, url: &str, max: usize) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        let transport = |e: reqwest::Error| FetchError::Transport {
            url: url.to_string(),
            reason: error_chain(&e),
        };
        let mut resp = self.client.get(url).send().await.map_err(transport)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        let too_large = || FetchError::TooLarge {
            url: url.to_string(),
            max,
        };
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let max_age = resp
            .headers()
            .get_all(reqwest::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|d| {
                d.trim()
                    .strip_prefix("max-age=")?
                    .trim_matches('"')
                    .parse::<u64>()
                    .ok()
            })
            .map(Duration::from_secs);
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
